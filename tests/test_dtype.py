"""The dtype each stage computes in, chosen as LLaMA-Factory chooses it (the accelerator's abilities
stood in for, so the rule is tested here without one), and fp32 trainable weights under it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from eqakit.errors import ConfigError
from eqakit.model.load import declared_dtype, optimal_dtype, pick_dtype, train_dtype

CUDA, CPU, MPS = torch.device("cuda"), torch.device("cpu"), torch.device("mps")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    ("device", "declared", "bf16_supported", "expected"),
    [
        (CUDA, BF16, True, BF16),  # Qwen3-VL-2B on an A100 or H100: bf16 although bf16: false
        (CUDA, None, True, BF16),
        (CUDA, FP32, True, FP16),  # a checkpoint saved in fp32: fp16, LLaMA-Factory's second choice
        (CUDA, BF16, False, FP16),  # a T4 or V100
        (CPU, BF16, None, FP32),
        (MPS, BF16, None, FP32),  # LLaMA-Factory counts no fp16 on MPS
    ],
)
def test_optimal_dtype_is_llama_factorys(device, declared, bf16_supported, expected) -> None:
    assert optimal_dtype(device, declared, bf16_supported) == expected


def test_the_keys_win_and_the_tutorials_bf16_false_means_the_optimal_dtype() -> None:
    assert train_dtype(True, False, CPU, FP32) == BF16
    assert train_dtype(False, True, CUDA, BF16, bf16_supported=True) == FP16
    assert train_dtype(False, False, CUDA, BF16, bf16_supported=True) == BF16  # training_args.yaml on a GPU
    assert train_dtype(False, False, CPU, BF16) == FP32
    assert pick_dtype("auto", CPU) == FP32 and pick_dtype("float16", CPU) == FP16


def test_a_key_the_device_cannot_honour_is_refused_with_its_fix() -> None:
    with pytest.raises(ConfigError, match=r"^fp16: true needs a GPU .* remove fp16 to train in float32"):
        train_dtype(False, True, CPU, BF16)
    with pytest.raises(ConfigError, match=r"^bf16: true needs a GPU with bfloat16 .* set fp16: true"):
        train_dtype(True, False, CUDA, BF16, bf16_supported=False)
    assert train_dtype(False, True, MPS, BF16) == FP16


def test_fp16_on_the_cpu_stops_train_before_any_weight_loads(
    tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    from conftest import write_toy_dataset
    from eqakit.cli import main

    data = write_toy_dataset(tmp_path / "data", episodes=2, questions=2)
    keys = {"model_name_or_path": str(tiny_model_dir), "stage": "sft", "do_train": True, "dataset": "toy",
            "dataset_dir": str(data), "template": "qwen3_vl_nothink", "output_dir": str(tmp_path / "out"),
            "report_to": "none", "fp16": True}  # fmt: skip
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(keys))
    assert main(["train", str(tmp_path / "train.yaml")]) != 0
    err = capsys.readouterr().err
    assert "fp16: true needs a GPU" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_declared_dtype_is_read_where_qwen_writes_it() -> None:
    from transformers import Qwen3VLConfig

    assert declared_dtype(Qwen3VLConfig(text_config={"dtype": "bfloat16"})) == BF16
    assert declared_dtype(Qwen3VLConfig()) is None


def test_lora_weights_train_in_fp32_over_a_bf16_model(tiny_model_dir: Path) -> None:
    """What LLaMA-Factory's cast_trainable_params_to_fp32 does: the adapter trains in fp32 while the
    frozen base computes in bf16."""
    from eqakit.config import load_config
    from eqakit.model.load import load_base_model
    from eqakit.train.lora import apply_lora

    keys = {"model_name_or_path": str(tiny_model_dir), "stage": "sft", "do_train": True, "dataset": "toy",
            "template": "qwen3_vl_nothink", "output_dir": "unused", "finetuning_type": "lora"}  # fmt: skip
    cfg = load_config("train", extra=keys)
    model = apply_lora(load_base_model(cfg.model, device=CPU, dtype=BF16), cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    assert trainable and all(p.dtype == FP32 for p in trainable)
    assert frozen and all(p.dtype == BF16 for p in frozen)
