"""Qwen3-VL-MoE and Qwen2.5-VL through the whole workflow: tiny-model, train, predict, export, serve;
LoRA's targets as LLaMA-Factory chooses them there, the fused experts refused by name, and a
template that does not fit the checkpoint refused before anything loads."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from conftest import write_toy_dataset
from eqakit.cli import main
from eqakit.config import load_config
from eqakit.errors import ConfigError


def _train_config(tmp: Path, model: Path, data: Path, **extra) -> Path:
    import yaml

    keys = {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": 4, "template": "qwen3_vl_nothink", "dataset": "toy",
        "dataset_dir": str(data), "output_dir": str(tmp / "lora"), "max_steps": 3, "save_strategy": "no",
        "per_device_train_batch_size": 4, "learning_rate": 1e-2, "report_to": "none", **extra,
    }  # fmt: skip
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


def test_tiny_moe_is_the_real_class_with_experts(tiny_moe_dir: Path) -> None:
    config = json.loads((tiny_moe_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl_moe" and config["architectures"] == [
        "Qwen3VLMoeForConditionalGeneration"
    ]
    assert (
        config["text_config"]["num_local_experts"] == 4 and config["text_config"]["num_experts_per_tok"] == 2
    )
    assert json.loads((tiny_moe_dir / "eqakit_tiny_model.json").read_text())["arch"] == "qwen3_vl_moe"


def _workflow(model_dir: Path, tmp_path: Path, template: str, **train: object) -> tuple[Path, Path]:
    """train -> predict -> export -> predict on the export (the same answers) -> serve the export
    (the openai SDK's answer to an image question is the engine's); returns (adapter, export)."""
    from openai import OpenAI
    from transformers import AutoModelForImageTextToText

    from eqakit.engine import HFEngine, Request
    from eqakit.evaluate.predict import run_predict
    from eqakit.serve.api import create_app
    from test_api import data_uri, encoded, jpeg, serving

    data = write_toy_dataset(tmp_path / "data", episodes=3, questions=2, frames=2)
    assert main(["train", str(_train_config(tmp_path, model_dir, data, template=template, **train))]) == 0
    predict = {
        "model_name_or_path": str(model_dir), "adapter_name_or_path": str(tmp_path / "lora"),
        "template": template, "do_predict": True, "predict_with_generate": True, "eval_dataset": "toy",
        "dataset_dir": str(data), "output_dir": str(tmp_path / "eval"), "max_new_tokens": 6, "do_sample": False,
        "report_to": "none",
    }  # fmt: skip
    run_predict(load_config("train", extra=predict))
    rows = (tmp_path / "eval" / "generated_predictions.jsonl").read_text().splitlines()
    assert len(rows) == 6

    merge = tmp_path / "merge.yaml"
    merge.write_text(
        f"model_name_or_path: {model_dir}\nadapter_name_or_path: {tmp_path / 'lora'}\n"
        f"template: {template}\nfinetuning_type: lora\nexport_dir: {tmp_path / 'merged'}\n"
    )
    assert main(["export", str(merge)]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    assert type(merged) is type(base)
    run_predict(load_config("train", extra={**predict, "adapter_name_or_path": None, "model_name_or_path": str(tmp_path / "merged"), "output_dir": str(tmp_path / "eval-merged")}))  # fmt: skip
    again = (tmp_path / "eval-merged" / "generated_predictions.jsonl").read_text().splitlines()
    assert [json.loads(r)["predict"] for r in again] == [json.loads(r)["predict"] for r in rows]

    cfg = load_config("infer", None, [f"model_name_or_path={tmp_path / 'merged'}", f"template={template}"])
    engine = HFEngine.from_config(cfg)
    image = encoded(jpeg(seed=3))
    content = [
        {"type": "image_url", "image_url": {"url": data_uri(image)}},
        {"type": "text", "text": "Where?"},
    ]
    with serving(create_app(engine, model_name="m", settings=cfg.api)) as (url, _):
        reply = OpenAI(base_url=f"{url}/v1", api_key="x").chat.completions.create(
            model="m", messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0
        )
    with Image.open(io.BytesIO(image)) as decoded:
        pil = decoded.convert("RGB")
    expected = engine.generate(
        [Request([{"role": "user", "content": "<image>Where?"}], engine.params(max_new_tokens=6, temperature=0), images=[pil])]
    )  # fmt: skip
    assert reply.choices[0].message.content == expected[0].text
    return tmp_path / "lora", tmp_path / "merged"


def _adapted(adapter: Path) -> set[str]:
    """The module names an adapter's LoRA weights sit on, without the layer numbers."""
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())  # noqa: SIM118
    return {re.sub(r"\.\d+\.", ".N.", k.split(".lora_")[0]).removeprefix("base_model.model.") for k in keys}


@pytest.mark.slow
def test_moe_trains_predicts_exports_and_serves(lively_moe_dir: Path, tmp_path: Path) -> None:
    """`lora_target: all` adapts the attention projections only (the experts are fused parameters and
    the router is no linear layer: LLaMA-Factory adapts neither); the export has Qwen's expert layout."""
    adapter, merged = _workflow(lively_moe_dir, tmp_path, "qwen3_vl_nothink")
    assert {name.rsplit(".", 1)[-1] for name in _adapted(adapter)} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with safe_open(merged / "model.safetensors", "pt") as weights:  # Qwen's published layout
        names = [k for k in weights.keys() if ".layers.0.mlp.experts." in k]  # noqa: SIM118
        shapes = {k.rsplit(".", 1)[-1]: weights.get_slice(k).get_shape() for k in names}
    assert shapes == {"gate_up_proj": [4, 64, 256], "down_proj": [4, 128, 64]}  # (experts, in, out): vLLM's


@pytest.mark.slow
def test_qwen2_5_vl_trains_predicts_exports_and_serves(lively_qwen2_5_dir: Path, tmp_path: Path) -> None:
    """Qwen2.5-VL with the tutorial's LoRA and its vision tower and merger trained too: the vision
    blocks' own linear layers (gate/up/down, not Qwen3-VL's linear_fc1/fc2) take LoRA, the merger
    trains in full, and there is no deepstack merger to look for."""
    adapter, _ = _workflow(
        lively_qwen2_5_dir,
        tmp_path,
        "qwen2_vl",
        freeze_vision_tower=False,
        freeze_multi_modal_projector=False,
    )
    adapted = _adapted(adapter)
    assert {n for n in adapted if ".language_model." in n} == {
        f"model.language_model.layers.N.{kind}.{p}"
        for kind, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for p in (f"{n}_proj" for n in names)
    }
    assert {n for n in adapted if ".visual.blocks." in n} == {
        f"model.visual.blocks.N.{p}"
        for p in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        assert any(".visual.merger." in k for k in weights.keys())  # noqa: SIM118


def test_template_must_fit_the_checkpoint(
    tiny_qwen2_5_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """qwen3_vl_nothink on a Qwen2.5-VL checkpoint (or qwen2_vl on Qwen3-VL) is refused by name before
    anything loads; without the key, each checkpoint gets its own."""
    data = write_toy_dataset(tmp_path / "data", episodes=1, questions=1, frames=1)
    for model, template, fits in ((tiny_qwen2_5_dir, "qwen3_vl_nothink", "qwen2_vl"), (tiny_model_dir, "qwen2_vl", "qwen3_vl_nothink or qwen3_vl")):  # fmt: skip
        with pytest.raises(ConfigError) as caught:
            load_config("train", _train_config(tmp_path, model, data, template=template))
        assert f"key 'template': {template!r} does not fit" in str(caught.value)
        assert f"; use {fits}" in str(caught.value)
    for model, chosen in ((tiny_qwen2_5_dir, "qwen2_vl"), (tiny_model_dir, "qwen3_vl_nothink")):
        path = _train_config(tmp_path, model, data)
        keys = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "template"}
        path.write_text(yaml.safe_dump(keys))
        assert load_config("train", path).data.template == chosen


def test_moe_experts_are_refused_as_lora_targets_with_the_reason(tiny_moe_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from eqakit.train.lora import apply_lora

    data = write_toy_dataset(tmp_path / "data", episodes=1, questions=1, frames=1)
    cfg = load_config("train", _train_config(tmp_path, tiny_moe_dir, data, lora_target="q_proj,gate_proj"))
    model = AutoModelForImageTextToText.from_pretrained(tiny_moe_dir, dtype=torch.float32)
    with pytest.raises(ConfigError, match="gate_proj: this model's experts are fused parameters"):
        apply_lora(model, cfg)


def test_an_adapter_of_the_dense_model_is_refused_on_the_moe_model(
    tiny_model_dir: Path, tiny_moe_dir: Path, tmp_path: Path
) -> None:
    """Checked before any weight loads into PEFT: the tensor that does not fit, and both architectures."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from eqakit.errors import EqakitError
    from eqakit.model.load import load_inference_model

    dense = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|gate_proj)")
    get_peft_model(dense, config).save_pretrained(tmp_path / "dense-lora")
    args = load_config(
        "infer",
        None,
        [
            f"model_name_or_path={tiny_moe_dir}",
            f"adapter_name_or_path={tmp_path / 'dense-lora'}",
            "template=qwen3_vl_nothink",
        ],
    ).model
    with pytest.raises(EqakitError) as caught:
        load_inference_model(args)
    message = str(caught.value)
    assert f"was trained on {tiny_model_dir}, a 'qwen3_vl' model" in message
    assert f"base model {str(tiny_moe_dir)!r} is a 'qwen3_vl_moe' model" in message


def test_an_adapter_of_qwen2_5_vl_is_refused_on_qwen3_vl_even_where_its_shapes_fit(
    tiny_model_dir: Path, tiny_qwen2_5_dir: Path, tmp_path: Path
) -> None:
    """The tiny models' attention projections have the same shapes in both families; the adapter's
    recorded base says which family it learned on, and that is checked first."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from eqakit.errors import EqakitError
    from eqakit.model.load import load_inference_model

    qwen2_5 = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_5_dir, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")
    get_peft_model(qwen2_5, config).save_pretrained(tmp_path / "qwen2-5-lora")
    keys = [f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={tmp_path / 'qwen2-5-lora'}"]
    with pytest.raises(EqakitError, match="a 'qwen2_5_vl' model; base model .* is a 'qwen3_vl' model"):
        load_inference_model(load_config("infer", None, [*keys, "template=qwen3_vl_nothink"]).model)


def test_a_cached_hub_id_chooses_and_checks_its_template(
    tiny_qwen2_5_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id whose checkpoint is in the local Hugging Face cache is read there (nothing is
    downloaded): its template is chosen when absent and a misfit is refused, as for a directory."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-VL-3B-Instruct"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for name in ("config.json", "chat_template.jinja"):
        shutil.copy(tiny_qwen2_5_dir / name, snapshot / name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = ["model_name_or_path=Qwen/Qwen2.5-VL-3B-Instruct"]
    assert load_config("infer", None, hub).data.template == "qwen2_vl"
    with pytest.raises(
        ConfigError, match="'qwen3_vl' does not fit 'Qwen/Qwen2.5-VL-3B-Instruct', a Qwen2.5-VL"
    ):
        load_config("infer", None, [*hub, "template=qwen3_vl"])
    other = ["model_name_or_path=Qwen/Qwen3-VL-2B-Instruct"]  # not cached: the key stays required
    with pytest.raises(ConfigError, match="template is required"):
        load_config("infer", None, other)
