"""`eqakit export`: the merged model equals base + adapter, loads anywhere, and bad exports are refused.

Adapters are real PEFT LoRA adapters on the tiny Qwen3-VL (the language model's q/k/v/o/gate/up/down
projections, random non-zero B so they change the outputs); inputs are real processor outputs with
two images.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from conftest import assert_close_to_scale
from eqakit.config import load_config
from eqakit.errors import ConfigError, EqakitError
from eqakit.export import cli, run_export
from eqakit.model.merge import config_dtype

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "merge_openeqa.yaml"
LM_PROJECTIONS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
LM_Q_V = r".*language_model\.layers\.\d+\.self_attn\.(q|v)_proj"

# Runs in a fresh interpreter: plain transformers, no eqakit.
GENERATE_SCRIPT = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

images = [Image.open(p).convert("RGB") for p in sys.argv[1:3]]
out = {}
for directory in sys.argv[3:]:
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What color is the sofa?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    out[directory] = ids[0].tolist()
print(json.dumps(out))
"""

# Runs `eqakit export` and SIGKILLs it right after the first weight shard is on disk.
KILL_SCRIPT = """
import os, signal, sys
import transformers.modeling_utils as modeling_utils

write_shard = modeling_utils.safe_save_file

def write_then_die(*args, **kwargs):
    write_shard(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

modeling_utils.safe_save_file = write_then_die
from eqakit.export import cli
cli(sys.argv[1:])
"""


def _make_adapter(model, out: Path, seed: int, **lora) -> Path:
    """Save a LoRA adapter for ``model`` whose A and B are random (non-zero), so it changes outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(out)
    return out


def _load(directory: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoConfig, AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("adapters")
    a = _make_adapter(_load(tiny_model_dir), root / "a", 1, r=8, lora_alpha=16, target_modules=LM_PROJECTIONS)
    # What an `eqakit train` output_dir holds beside the adapter; the model card reports it.
    (a / "eqakit_config.yaml").write_text("learning_rate: 0.0001\nlora_rank: 8\n", encoding="utf-8")
    state = {"global_step": 12, "epoch": 3.0, "log_history": [{"loss": 1.5}, {"loss": 0.75}]}
    (a / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    (a / "eval_results.json").write_text(json.dumps({"eval_loss": 0.8125, "epoch": 3.0}), encoding="utf-8")
    (a / "predict_results.json").write_text(json.dumps({"predict_bleu-4": 28.37}), encoding="utf-8")
    b = _make_adapter(
        _load(tiny_model_dir), root / "b", 2, r=4, lora_alpha=8, use_rslora=True, target_modules=LM_Q_V
    )
    # The same architecture at another size: intermediate_size 96 instead of 128.
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.text_config.intermediate_size = 96
    other = AutoModelForImageTextToText.from_config(config)
    wrong = _make_adapter(other, root / "wrong", 3, r=8, lora_alpha=16, target_modules=LM_PROJECTIONS)
    return {"a": a, "b": b, "wrong": wrong}


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("frames")
    paths = []
    for i, sofa in enumerate([(200, 40, 40), (40, 60, 200)]):
        image = Image.new("RGB", (320, 240), (230, 220, 200))
        ImageDraw.Draw(image).rectangle([60 + 40 * i, 120, 220, 200], fill=sofa)
        image.save(root / f"frame{i}.png")
        paths.append(root / f"frame{i}.png")
    return paths


@pytest.fixture(scope="module")
def inputs(tiny_model_dir: Path, image_paths: list[Path]) -> dict:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What color is the sofa?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [Image.open(p).convert("RGB") for p in image_paths]
    return dict(processor(text=[prompt], images=images, return_tensors="pt"))


def _reference(tiny_model_dir: Path, adapters: list[Path]):
    """Base model with the last adapter applied by PEFT unmerged (earlier ones merged first)."""
    from peft import PeftModel

    model = _load(tiny_model_dir)
    for adapter in adapters[:-1]:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return PeftModel.from_pretrained(model, str(adapters[-1])).eval()


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _greedy(model, inputs: dict) -> list[int]:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=8, do_sample=False)[0].tolist()


def _export(tiny_model_dir: Path, adapters: str, export_dir: Path, *overrides: str) -> Path:
    argv = [str(CONFIG), f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={adapters}"]
    assert cli([*argv, f"export_dir={export_dir}", *overrides]) == 0
    return export_dir


@pytest.fixture(scope="module")
def shipped_export(tiny_model_dir: Path, adapters: dict[str, Path], tmp_path_factory) -> Path:
    """The tutorial's merge_openeqa.yaml, unchanged apart from its three paths."""
    out = tmp_path_factory.mktemp("shipped") / "merge"
    cfg = load_config(
        "export",
        CONFIG,
        [
            f"model_name_or_path={tiny_model_dir}",
            f"adapter_name_or_path={adapters['a']}",
            f"export_dir={out}",
        ],
    )
    assert (cfg.model.export_size, cfg.model.export_device, cfg.model.export_legacy_format) == (
        2,
        "auto",
        False,
    )
    return run_export(cfg)


def test_merged_model_equals_base_plus_adapter(tiny_model_dir, adapters, shipped_export, inputs) -> None:
    merged = _load(shipped_export)
    reference = _reference(tiny_model_dir, [adapters["a"]])
    base_logits = _logits(_load(tiny_model_dir), inputs)
    merged_logits, reference_logits = _logits(merged, inputs), _logits(reference, inputs)
    assert (reference_logits - base_logits).abs().max() > 0.05  # the adapter matters
    assert_close_to_scale(merged_logits, reference_logits)
    assert _greedy(merged, inputs) == _greedy(reference, inputs)
    assert merged.dtype == torch.float32  # the base model's dtype
    with safe_open(shipped_export / "model.safetensors", "pt") as f:
        names = f.keys()
    assert names and not [k for k in names if "lora" in k]


def test_export_dir_is_a_complete_model_with_a_model_card(shipped_export, adapters, tiny_model_dir) -> None:
    names = {p.name for p in shipped_export.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "processor_config.json"}
    expected |= {
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
        "eqakit_export.json",
    }
    assert expected <= names, expected - names
    assert not list(shipped_export.parent.glob(f".{shipped_export.name}.*"))  # no temporary directory left
    card = (shipped_export / "README.md").read_text(encoding="utf-8")
    for fact in (
        f"base_model: {tiny_model_dir}",
        str(adapters["a"]),
        "| r | 8 |",
        "| lora_alpha | 16 |",
        "lora_rank: 8",  # the training config
        "global_step 12",
        "last logged loss 0.75",
        "| eval_loss | 0.8125 | eval_results.json |",
        "| predict_bleu-4 | 28.37 | predict_results.json |",
    ):
        assert fact in card, fact
    record = json.loads((shipped_export / "eqakit_export.json").read_text(encoding="utf-8"))
    assert record["dtype"] == "float32" and record["adapters"][0]["path"] == str(adapters["a"])


@pytest.mark.slow
def test_shards_legacy_format_and_a_fresh_process_loads_them(
    tiny_model_dir, adapters, inputs, image_paths, tmp_path
) -> None:
    limit = 1_000_000  # export_size 0.001 GB
    sharded = _export(tiny_model_dir, adapters["a"], tmp_path / "sharded", "export_size=0.001")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2 and not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text(encoding="utf-8"))
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            names = f.keys()
            assert sum(f.get_tensor(k).nbytes for k in names) <= limit, shard.name

    legacy = _export(
        tiny_model_dir, adapters["a"], tmp_path / "legacy", "export_size=0.001", "export_legacy_format=true"
    )
    bins = sorted(legacy.glob("pytorch_model-*.bin"))
    assert len(bins) == len(shards) and not list(legacy.glob("*.safetensors"))
    legacy_index = json.loads((legacy / "pytorch_model.bin.index.json").read_text(encoding="utf-8"))
    assert set(legacy_index["weight_map"].values()) == {p.name for p in bins}
    assert legacy_index["weight_map"].keys() == index["weight_map"].keys()

    run = subprocess.run(
        [sys.executable, "-c", GENERATE_SCRIPT, *map(str, image_paths), str(sharded), str(legacy)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    generated = json.loads(run.stdout.strip().splitlines()[-1])
    expected = _greedy(_reference(tiny_model_dir, [adapters["a"]]), inputs)
    assert generated == {str(sharded): expected, str(legacy): expected}


def test_two_adapters_are_merged_in_order(tiny_model_dir, adapters, inputs, tmp_path) -> None:
    def snapshot() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in [*tiny_model_dir.iterdir(), *adapters["a"].iterdir()]}

    inputs_before = snapshot()
    both = _export(tiny_model_dir, f"{adapters['a']}, {adapters['b']}", tmp_path / "both")
    # Merged in memory (copy-on-write over the mmap'd checkpoint), never in the base's files.
    assert snapshot() == inputs_before
    reference = _reference(tiny_model_dir, [adapters["a"], adapters["b"]])
    merged_logits, reference_logits = _logits(_load(both), inputs), _logits(reference, inputs)
    assert_close_to_scale(merged_logits, reference_logits)
    only_a = _logits(_reference(tiny_model_dir, [adapters["a"]]), inputs)
    assert (merged_logits - only_a).abs().max() > 0.01  # the second adapter was applied too
    card = (both / "README.md").read_text(encoding="utf-8")
    assert card.index(f"### 1. `{adapters['a']}`") < card.index(f"### 2. `{adapters['b']}`")
    assert "| use_rslora | true |" in card


def test_export_dtype_sets_the_written_dtype_even_without_adapters(tiny_model_dir, tmp_path) -> None:
    out = _export(tiny_model_dir, "", tmp_path / "bf16", "export_dtype=bfloat16")
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["dtype"] == "bfloat16"
    assert "None: this is the base model, re-written." in (out / "README.md").read_text(encoding="utf-8")
    with safe_open(out / "model.safetensors", "pt") as f:
        names = f.keys()
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}


def test_auto_dtype_reads_the_text_config_like_qwen3_vl_2b() -> None:
    from transformers import Qwen3VLConfig

    assert config_dtype(Qwen3VLConfig(text_config={"dtype": "bfloat16"})) == torch.bfloat16
    assert config_dtype(Qwen3VLConfig(dtype="float16", text_config={"dtype": "bfloat16"})) == torch.float16
    assert config_dtype(Qwen3VLConfig()) == torch.float32


def test_non_empty_export_dir_is_refused_unless_overwrite(tiny_model_dir, adapters, tmp_path) -> None:
    out = tmp_path / "merge"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(
        EqakitError, match=r"exists and is not empty \(it holds notes.txt\).*overwrite_output_dir"
    ):
        _export(tiny_model_dir, adapters["a"], out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    _export(tiny_model_dir, adapters["a"], out, "overwrite_output_dir=true")
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()


def test_config_file_inside_export_dir_is_kept(tiny_model_dir, adapters, tmp_path) -> None:
    """The tutorial creates the merge directory and writes merge_openeqa.yaml into it first."""
    out = tmp_path / "merge"
    out.mkdir()
    config = out / "merge_openeqa.yaml"
    text = CONFIG.read_text(encoding="utf-8")
    text = text.replace("Qwen/Qwen3-VL-2B-Instruct", str(tiny_model_dir))
    text = text.replace("saves/Qwen3-VL-2B-Instruct/lora/train_openeqa", str(adapters["a"]))
    config.write_text(text.replace("saves/Qwen3-VL-2B-Instruct/lora/merge", str(out)), encoding="utf-8")
    assert cli([str(config)]) == 0
    assert config.read_text(encoding="utf-8").startswith("# Merge the LoRA adapter")
    assert (out / "model.safetensors").is_file()
    with pytest.raises(EqakitError, match="not empty"):  # now it holds a model
        cli([str(config)])


def test_mismatched_adapter_names_the_first_tensor_and_keeps_the_old_export(
    tiny_model_dir, adapters, shipped_export, tmp_path
) -> None:
    out = _export(tiny_model_dir, adapters["b"], tmp_path / "merge")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    tensor = "base_model.model.model.language_model.layers.0.mlp.gate_proj.lora_B.weight"
    with pytest.raises(EqakitError, match=rf"does not fit base model .*tensor {tensor} has shape \[96, 8\]"):
        _export(tiny_model_dir, adapters["wrong"], out, "overwrite_output_dir=true")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge"]


def test_missing_adapter_config_is_named(tiny_model_dir, adapters, tmp_path) -> None:
    broken = tmp_path / "adapter"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(
        (adapters["a"] / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(EqakitError, match=rf"{broken / 'adapter_config.json'} not found"):
        _export(tiny_model_dir, str(broken), tmp_path / "merge")
    assert not (tmp_path / "merge").exists()


def test_quantized_export_is_refused(tiny_model_dir, adapters, tmp_path) -> None:
    with pytest.raises(ConfigError, match="quantization_bit: 4 cannot be used with `eqakit export`"):
        _export(tiny_model_dir, adapters["a"], tmp_path / "merge", "quantization_bit=4")
    assert not (tmp_path / "merge").exists()


def test_export_dir_that_would_replace_an_input_is_refused(tiny_model_dir, adapters, tmp_path) -> None:
    with pytest.raises(EqakitError, match="an input of this export"):
        _export(tiny_model_dir, adapters["a"], adapters["a"].parent, "overwrite_output_dir=true")
    assert (adapters["a"] / "adapter_config.json").is_file()


@pytest.mark.slow
def test_killed_export_never_leaves_a_complete_looking_dir(tiny_model_dir, adapters, tmp_path) -> None:
    out = _export(tiny_model_dir, adapters["a"], tmp_path / "merge")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = [str(CONFIG), f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={adapters['b']}"]
    argv += [f"export_dir={out}", "export_size=0.001", "overwrite_output_dir=true"]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # replaced only at the very end
    leftovers = [p for p in tmp_path.iterdir() if p.name != "merge"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".merge.export-")  # hidden, and incomplete
    assert not (leftovers[0] / "README.md").exists()

    _export(tiny_model_dir, adapters["b"], out, "overwrite_output_dir=true")  # the next run cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge"]
    assert json.loads((out / "eqakit_export.json").read_text(encoding="utf-8"))["adapters"][0]["path"] == str(
        adapters["b"]
    )


def test_merged_model_answers_through_the_engine_like_base_plus_adapter(
    tiny_model_dir, adapters, shipped_export, image_paths
) -> None:
    """The served path: eqakit's engine on the export gives the adapter's greedy answers."""
    from eqakit.engine import HFEngine, Request

    images = [Image.open(p).convert("RGB") for p in image_paths]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What color is the sofa?"}]
    answers = []
    for model, adapter in ((shipped_export, None), (tiny_model_dir, adapters["a"])):
        keys = [f"model_name_or_path={model}", "template=qwen3_vl_nothink"]
        keys += [f"adapter_name_or_path={adapter}"] if adapter else []
        engine = HFEngine.from_config(load_config("infer", None, keys))
        request = Request(
            [{"role": "user", "content": content}], engine.params(temperature=0, max_new_tokens=8), images
        )
        answers.append(engine.generate([request])[0].token_ids)
    assert answers[0] == answers[1]


def test_an_adapter_is_not_merged_into_a_model_that_already_holds_it_or_its_sibling(
    tiny_model_dir, adapters, shipped_export, tmp_path, capsys
) -> None:
    """The web UI's Export tab offered the loaded model (the demo's merged one) as the base: merging
    another adapter of the same base into it, or the same adapter again, was silently wrong."""
    import shutil

    def export(base: Path, adapter: Path, out: str) -> Path:
        keys = [
            f"model_name_or_path={base}",
            f"adapter_name_or_path={adapter}",
            f"export_dir={tmp_path / out}",
        ]
        return run_export(load_config("export", CONFIG, keys))

    copy = shutil.copytree(adapters["a"], tmp_path / "a-copy")  # the same adapter, moved
    for adapter in (adapters["a"], copy):
        with pytest.raises(EqakitError, match="is already merged into .* would apply its change twice"):
            export(shipped_export, adapter, "twice")
    with pytest.raises(EqakitError, match="is that model with 1 other adapter.* merged into it"):
        export(shipped_export, adapters["b"], "sibling")
    assert not (tmp_path / "twice").exists() and not (tmp_path / "sibling").exists()

    moved_base = shutil.copytree(tiny_model_dir, tmp_path / "base-copy")  # another path, maybe other weights
    capsys.readouterr()
    export(moved_base, adapters["b"], "moved")
    assert f"was trained on '{tiny_model_dir}', not on '{moved_base}'" in capsys.readouterr().err
