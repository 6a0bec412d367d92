"""Qwen3-VL-MoE through the whole workflow: tiny-model, train, predict, export, serve; LoRA's targets
as LLaMA-Factory chooses them there, and the fused experts refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
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


@pytest.mark.slow
def test_moe_trains_predicts_exports_and_serves(lively_moe_dir: Path, tmp_path: Path) -> None:
    """`lora_target: all` adapts the attention projections only (the experts are fused parameters and
    the router is no linear layer: LLaMA-Factory adapts neither); the adapter predicts; the merged
    export loads in transformers and answers as the adapter did; the API serves it."""
    from transformers import AutoModelForImageTextToText

    from eqakit.engine import Engine, Request

    data = write_toy_dataset(tmp_path / "data", episodes=3, questions=2, frames=2)
    assert main(["train", str(_train_config(tmp_path, lively_moe_dir, data))]) == 0
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as weights:
        targets = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in weights.keys()}  # noqa: SIM118
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}

    predict = {
        "model_name_or_path": str(lively_moe_dir), "adapter_name_or_path": str(tmp_path / "lora"),
        "template": "qwen3_vl_nothink", "do_predict": True, "predict_with_generate": True, "eval_dataset": "toy",
        "dataset_dir": str(data), "output_dir": str(tmp_path / "eval"), "max_new_tokens": 6, "do_sample": False,
        "report_to": "none",
    }  # fmt: skip
    from eqakit.evaluate.predict import run_predict

    run_predict(load_config("train", extra=predict))
    rows = [
        json.loads(line)
        for line in (tmp_path / "eval" / "generated_predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 6

    merge = tmp_path / "merge.yaml"
    merge.write_text(
        f"model_name_or_path: {lively_moe_dir}\nadapter_name_or_path: {tmp_path / 'lora'}\n"
        f"template: qwen3_vl_nothink\nfinetuning_type: lora\nexport_dir: {tmp_path / 'merged'}\n"
    )
    assert main(["export", str(merge)]) == 0
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as weights:  # Qwen's published layout
        names = [k for k in weights.keys() if ".layers.0.mlp.experts." in k]  # noqa: SIM118
        shapes = {k.rsplit(".", 1)[-1]: weights.get_slice(k).get_shape() for k in names}
    assert shapes == {"gate_up_proj": [4, 64, 256], "down_proj": [4, 128, 64]}  # (experts, in, out): vLLM's
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert type(merged).__name__ == "Qwen3VLMoeForConditionalGeneration"
    run_predict(load_config("train", extra={**predict, "adapter_name_or_path": None, "model_name_or_path": str(tmp_path / "merged"), "output_dir": str(tmp_path / "eval-merged")}))  # fmt: skip
    again = [
        json.loads(line)
        for line in (tmp_path / "eval-merged" / "generated_predictions.jsonl").read_text().splitlines()
    ]
    assert [r["predict"] for r in again] == [r["predict"] for r in rows]

    from openai import OpenAI

    from eqakit.serve.api import create_app
    from test_api import serving

    cfg = load_config(
        "infer", None, [f"model_name_or_path={tmp_path / 'merged'}", "template=qwen3_vl_nothink"]
    )
    engine = Engine.from_config(cfg)
    with serving(create_app(engine, model_name="moe", settings=cfg.api)) as (url, _):
        reply = OpenAI(base_url=f"{url}/v1", api_key="x").chat.completions.create(
            model="moe", messages=[{"role": "user", "content": "Where am I?"}], max_tokens=6, temperature=0
        )
    expected = engine.generate(
        [
            Request(
                [{"role": "user", "content": "Where am I?"}], engine.params(max_new_tokens=6, temperature=0)
            )
        ]
    )
    assert reply.choices[0].message.content == expected[0].text


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
    assert (
        "mlp.gate_proj" in message and "(a 'qwen3_vl' model; this base is a 'qwen3_vl_moe' model)" in message
    )
