"""`eqakit config FILE --memory`: the estimate's terms, and the estimate against the measured peak.

The peak is measured on the CPU, where torch's allocator reports every block it hands out and takes
back (`torch.profiler` with ``profile_memory``): the running sum of live blocks, in order, is the
peak a device allocator would count. Work that stays on the host on an accelerator is left out:
blocks allocated and freed inside an image processor's call (pixels are prepared on the CPU, only
the result moves) or inside ``from_pretrained`` (a checkpoint is read on the CPU, then moved).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from conftest import write_toy_dataset
from eqakit.cli import main
from eqakit.config import load_config
from eqakit.memory import Estimate, estimate

HOST = "eqakit-test: host work"
TOLERANCE = 0.25  # the bound on |estimate - measured| / measured
TRAIN = {
    "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_target": "all", "lora_rank": 8,
    "dataset": "toy", "template": "qwen3_vl_nothink", "cutoff_len": 512,
    "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 0.01,
    "max_steps": 3, "save_strategy": "no", "report_to": "none", "dataloader_num_workers": 0,
}  # fmt: skip
PREDICT = {
    "stage": "sft", "do_predict": True, "predict_with_generate": True, "eval_dataset": "toy",
    "template": "qwen3_vl_nothink", "cutoff_len": 512, "max_new_tokens": 16,
    "per_device_eval_batch_size": 2, "do_sample": False, "report_to": "none",
}  # fmt: skip
# Qwen3-VL-2B-Instruct's widths (../shared/qwen3-vl-2b-instruct.config.json) at 2 layers per tower
WIDTHS_2B = {
    "hidden_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 6144, "vision_depth": 2, "vision_hidden_size": 1024,
    "vision_intermediate_size": 4096, "vision_num_heads": 16, "vision_num_position_embeddings": 2304,
    "deepstack_visual_indexes": (1,),
}  # fmt: skip


@contextlib.contextmanager
def host_work() -> Iterator[None]:
    """Image and video processors and checkpoint loading run under a profiler label meaning "host"."""
    from torch.profiler import record_function
    from transformers.image_processing_utils import BaseImageProcessor
    from transformers.modeling_utils import PreTrainedModel
    from transformers.video_processing_utils import BaseVideoProcessor

    saved = []
    wanted = (
        (BaseImageProcessor, "__call__"),
        (BaseVideoProcessor, "__call__"),
        (PreTrainedModel, "from_pretrained"),
    )
    # each where it is defined, once (5.25's video processors inherit the image processors' __call__)
    owners = {(next(c for c in cls.__mro__ if name in c.__dict__), name) for cls, name in wanted}
    for cls, name in owners:
        original = cls.__dict__[name]
        function = original.__func__ if isinstance(original, classmethod) else original

        @functools.wraps(function)
        def labelled(*args: Any, _function: Callable[..., Any] = function, **kwargs: Any) -> Any:
            with record_function(HOST):
                return _function(*args, **kwargs)

        setattr(cls, name, classmethod(labelled) if isinstance(original, classmethod) else labelled)
        saved.append((cls, name, original))
    try:
        yield
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)


def _events(prof: Any) -> list[tuple[int, int, int, int | None]]:
    """(time, bytes, address, end of the host label around it or None) of every CPU allocation
    (bytes > 0) and free (bytes < 0), in time order."""
    from torch._C._profiler import _EventType

    events = []
    stack = [(node, None) for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, host_end = stack.pop()
        if node.tag == _EventType.Allocation:
            if node.extra_fields.device.type == "cpu":
                events.append(
                    (node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr, host_end)
                )
            continue
        if host_end is None and node.name == HOST:
            host_end = node.end_time_ns
        stack.extend((child, host_end) for child in node.children)
    return sorted(events, key=lambda e: e[0])


def measured_peak(run: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> int:
    """The most bytes of tensors alive at once while ``run`` runs, host work's temporaries left out.

    Checkpoints load in the calling thread (the profiler does not see transformers' loader threads)."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    with host_work(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = _events(prof)
    allocated: dict[int, tuple[int, int | None]] = {}
    temporary: set[int] = set()
    for i, (time, size, address, host_end) in enumerate(events):
        if size > 0:
            allocated[address] = (i, host_end)
        elif address in allocated:
            j, end = allocated.pop(address)
            if end is not None and time <= end:
                temporary |= {i, j}
    live = peak = 0
    for i, (_, size, _, _) in enumerate(events):
        if i not in temporary:
            live += size
            peak = max(peak, live)
    return peak


def assert_close(estimated: Estimate, measured: int) -> None:
    error = estimated.peak / measured - 1
    assert abs(error) <= TOLERANCE, (
        f"estimate {estimated.peak / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB ({error:+.0%})\n"
        + estimated.report()
    )


def train_estimate(cfg: Any) -> Estimate:
    from eqakit.train.sft import preflight

    return estimate("train", cfg, preflight(cfg))


def predict_estimate(cfg: Any) -> Estimate:
    from eqakit.evaluate.predict import preflight

    return estimate("train", cfg, preflight(cfg))


def term(est: Estimate, name: str) -> Any:
    return next(t for t in est.terms if t.name == name)


def test_terms_on_the_tiny_model(tiny_model_dir: Path, toy_dataset: Path, tmp_path: Path) -> None:
    """Each term counts what the run holds: the loaded weights' bytes, peft's trainable LoRA weights
    (x 16 bytes: fp32 weight, gradient, two AdamW moments), each distinct frame's features once,
    the KV cache's bytes per token; the peak is the largest moment, and the last line says it."""
    from transformers import AutoModelForImageTextToText

    from eqakit.memory.terms import Shapes
    from eqakit.train.lora import apply_lora

    keys = {**TRAIN, "model_name_or_path": str(tiny_model_dir), "dataset_dir": str(toy_dataset)}
    cfg = load_config("train", extra={**keys, "output_dir": str(tmp_path / "out")})
    est = train_estimate(cfg)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert term(est, "weights").nbytes == sum(p.numel() * p.element_size() for p in model.parameters())
    lora = apply_lora(model, cfg)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert term(est, "LoRA weights + grads + optimizer").nbytes == trainable * 16
    # 6 episodes x 2 frames of 128x96 pixels: 4 x 3 visual tokens each, merger + 1 deepstack level
    assert term(est, "vision feature cache").nbytes == 12 * 12 * 2 * 64 * 4
    kv = Shapes.of(model.config).kv_bytes(torch.float32)
    assert kv == 2 * 2 * 2 * 16 * 4  # layers x (keys, values) x kv heads x head dim x fp32
    moments = est.moments()
    assert set(moments) == {"building the vision cache", "the loss", "the backward pass"}
    assert est.peak == max(moments.values())
    assert est.report().splitlines()[-1] == f"estimated peak accelerator memory: {est.peak / 2**30:.1f} GiB"


@pytest.mark.parametrize("packing", [True, False])
def test_training_estimate_is_within_25_percent_of_the_measured_peak(
    packing: bool, tiny_model_dir: Path, toy_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eqakit.train.sft import run_train

    keys = {**TRAIN, "model_name_or_path": str(tiny_model_dir), "dataset_dir": str(toy_dataset)}
    cfg = load_config(
        "train", extra={**keys, "output_dir": str(tmp_path / "out"), "shared_prefix_packing": packing}
    )
    est = train_estimate(cfg)
    assert_close(est, measured_peak(lambda: run_train(cfg), monkeypatch))


def test_predict_estimate_is_within_25_percent_of_the_measured_peak(
    tiny_model_dir: Path, toy_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eqakit.evaluate.predict import run_predict

    keys = {**PREDICT, "model_name_or_path": str(tiny_model_dir), "dataset_dir": str(toy_dataset)}
    cfg = load_config("train", extra={**keys, "output_dir": str(tmp_path / "out")})
    est = predict_estimate(cfg)
    assert_close(est, measured_peak(lambda: run_predict(cfg), monkeypatch))


def larger_frames(root: Path) -> Path:
    """The toy dataset with 448x336-pixel frames (140 visual tokens each), so that activations,
    KV cache and prefixes weigh as they do on OpenEQA's frames."""
    write_toy_dataset(root)
    for path in root.rglob("*.jpg"):
        with Image.open(path) as image:
            image.resize((448, 336)).save(path, quality=90)
    return root


@pytest.mark.slow
def test_estimates_at_qwen3_vl_2b_widths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3-VL-2B's widths (2 layers): LoRA training in bf16 with fp32 LoRA weights, as a GPU runs
    the tutorial's file (the CPU would choose fp32: the dtype rule is stubbed for the run and the
    estimate alike), unpacked so that the backward pass's activations and the logits make the peak
    (packed, two layers leave it to the vision cache's build); and predict in bf16."""
    import eqakit.model.load
    from eqakit.evaluate.predict import run_predict
    from eqakit.model.tiny import build_tiny_model
    from eqakit.train.sft import run_train

    model = build_tiny_model(tmp_path / "widths-2b", **WIDTHS_2B)
    data = larger_frames(tmp_path / "data")
    monkeypatch.setattr(eqakit.model.load, "train_dtype", lambda *args, **kwargs: torch.bfloat16)
    keys = {
        **TRAIN,
        "model_name_or_path": str(model),
        "dataset_dir": str(data),
        "shared_prefix_packing": False,
    }
    keys["max_steps"] = 2  # the second step holds the optimizer's state: the peak is there
    cfg = load_config("train", extra={**keys, "output_dir": str(tmp_path / "train")})
    est = train_estimate(cfg)
    assert "compute dtype bfloat16" in est.setting
    assert max(est.moments(), key=est.moments().__getitem__) == "the backward pass"
    assert_close(est, measured_peak(lambda: run_train(cfg), monkeypatch))

    keys = {**PREDICT, "model_name_or_path": str(model), "dataset_dir": str(data), "infer_dtype": "bfloat16"}
    keys["max_new_tokens"] = 8
    cfg = load_config("train", extra={**keys, "output_dir": str(tmp_path / "predict")})
    est = predict_estimate(cfg)
    assert term(est, "prefix cache").nbytes > 0  # an episode's frames are a prefix worth caching here
    assert_close(est, measured_peak(lambda: run_predict(cfg), monkeypatch))


def test_cli_prints_the_estimate_last(
    tiny_model_dir: Path, toy_dataset: Path, tmp_path: Path, capsys
) -> None:
    """`eqakit config FILE --memory` ends with the estimate; the largest terms come with the keys
    that lower them; ``--device cuda`` estimates a GPU run from a machine without one."""
    keys = {**TRAIN, "model_name_or_path": str(tiny_model_dir), "dataset_dir": str(toy_dataset)}
    path = tmp_path / "train.yaml"
    path.write_text(json.dumps({**keys, "output_dir": str(tmp_path / "out")}), encoding="utf-8")
    assert main(["config", str(path), "--memory"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"estimated peak accelerator memory: \d+\.\d GiB", lines[-1])
    assert "# largest terms at the peak, and what lowers them:" in lines
    assert any(line.startswith("#   weights (") and "bf16: true" in line for line in lines)

    assert main(["config", str(path), "--memory", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "(cuda, compute dtype float16" in out  # the tiny checkpoint declares fp32: LLaMA-Factory's fp16
    assert re.search(r"estimated peak accelerator memory: \d+\.\d GiB\n$", out)


def test_cli_refuses_memory_where_it_cannot_estimate(tmp_path: Path, capsys) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("model_name_or_path: m\ntemplate: qwen3_vl_nothink\nexport_dir: out\n")
    with pytest.raises(SystemExit):
        main(["config", str(path), "--memory"])
    assert "`eqakit export` needs about 1.25x" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["config", str(path), "--memory", "--keys-only"])
    assert "--memory needs the checks --keys-only leaves out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["config", str(path), "--device", "cuda"])
    assert "add --memory" in capsys.readouterr().err


def test_serving_estimate_counts_the_api_batch(tiny_model_dir: Path) -> None:
    """An infer config: api_max_batch_size rows of cutoff_len + max_new_tokens of KV cache."""
    cfg = load_config(
        "infer",
        extra={
            "model_name_or_path": str(tiny_model_dir),
            "template": "qwen3_vl_nothink",
            "api_max_batch_size": 4,
        },
    )
    est = estimate("infer", cfg, None, torch.device("cpu"))
    rows = 4 * (cfg.data.cutoff_len + cfg.generating.max_new_tokens)
    assert term(est, "KV cache").nbytes == rows * 2 * 2 * 2 * 16 * 4
