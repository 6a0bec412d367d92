"""LoRA training throughput: LLaMA-Factory's way against eqakit's, same model, same data, one process.

    .venv/bin/python benchmarks/bench_train.py [--episodes 3] [--scale 4] [--epochs 1] [--bf16]
    .venv/bin/python benchmarks/bench_train.py --llamafactory   # + LLaMA-Factory 0.9.5 itself, seed's YAML
    .venv/bin/python benchmarks/bench_train.py --only-llamafactory --arch qwen2_5_vl   # on Qwen2.5-VL-3B's shapes
    .venv/bin/python benchmarks/bench_train.py --stage dpo --llamafactory --pairs 8 --bf16   # LF's DPO example
    python3 benchmarks/bench_train.py --steady 6 --scale 1 --rows rows.jsonl   # GPU: steady state (gpu_check.sh)
    .venv/bin/python benchmarks/bench_train.py --steady 2 --warmup 1 --tiny --episodes 2   # its dry run here

Model: random weights with Qwen3-VL-2B-Instruct's widths (benchmarks/configs/qwen3-vl-2b-instruct.config.json:
hidden 2048, 16 heads, vision width 1024, vocabulary 151,936) and its depth divided by ``--scale`` in
the 2B's ratio (vision blocks : LM layers = 24 : 28, so 6 : 7 at scale 4), with the tiny model's
tokenizer and processor. Data: `eqakit synth` episodes prepared by `eqakit prepare openeqa` (8 frames
per question, ~11 questions per episode, episode split off).

Reference: transformers' Trainer + PEFT with one sample per question, pixels and the vision tower on
every sample, full-vocabulary logits for every position (what LLaMA-Factory does): eqakit's own
trainer with ``vision_feature_cache: false`` and ``shared_prefix_packing: false``, which falls back
to exactly the Trainer's default loss. eqakit: both speed-ups on (the defaults). Both train the same
number of question/answer pairs with the same hyper-parameters; both losses are printed (they differ
only through batch composition: eqakit draws a micro-batch from one episode).

``--llamafactory``: the seed's training_args.yaml (configs/training_args.yaml: batch 2 x accumulation
8, gradient checkpointing on in both tools, paths, epochs and evaluation changed) run by
`llamafactory-cli train` (0.9.5, its own venv: benchmarks/install_llamafactory.sh) and by
`eqakit train`, one after the other, each a process of its own: wall time, peak RSS, optimizer steps
and the final loss of each.

``--stage dpo --llamafactory``: LLaMA-Factory's own DPO example (``DPO_EXAMPLE``, its
examples/train_lora/qwen3vl_lora_dpo.yaml: LoRA, ``pref_loss: sigmoid``, ``pref_beta: 0.1``, batch
1 x accumulation 8) on preference pairs built from the same prepared questions (`preference_pairs`:
chosen = the question's answer, rejected = another answer from its episode, else its category), in
LLaMA-Factory's sharegpt preference format with the frames, which both tools read. Printed besides
the times: each tool's step-1 loss (ln 2 = 0.6931 with LoRA's B = 0, when the policy is the
reference) and step-1 ``logps/chosen`` / ``logps/rejected`` (the summed answer log-likelihoods under
the same weights: equal only if both tools score the same pairs the same way), and where the time
goes (start-up, the vision cache, the loop, the tokens each fed). Only the LLaMA-Factory comparison
exists for DPO (no in-process reference).

``--steady N``: the tutorial's training_args.yaml itself (batch 2 x accumulation 8, gradient
checkpointing, LoRA rank 8 on all layers; evaluation and saving off) run in this process by
`run_train` for ``--warmup`` + N optimizer steps, once per setting: the tutorial's dtype (neither
bf16 nor fp16 set: LLaMA-Factory's rule picks, bf16 on a GPU that has it since the checkpoint is
saved in bf16 as Qwen publishes it), ``bf16: true``, and ``bf16: true`` with ``flash_attn: fa2``
where flash-attn is installed. Per setting: the compute dtype chosen, seconds per optimizer step
after the warm-up steps (the GPU synchronised at each step's end), the vision feature cache's build
time, ``torch.cuda.max_memory_allocated`` beside `eqakit config --memory`'s estimate of the same
run (`eqakit.memory`), and the last logged loss. A setting that fails or is refused is a row too.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import platform
import re
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainerCallback

from eqakit.config import load_config
from eqakit.data.frames import DEFAULT_TOKENS, FrameOptions
from eqakit.data.prepare import PrepareOptions, prepare_openeqa
from eqakit.demo.synth import generate
from eqakit.model.arch import ARCHITECTURES
from eqakit.model.tiny import build_tiny_model
from eqakit.train.sft import run_train

REAL_CONFIG = Path(__file__).resolve().parent / "configs" / "qwen3-vl-2b-instruct.config.json"
QWEN2_5_CONFIG = Path(__file__).resolve().parent / "configs" / "qwen2.5-vl-3b-instruct.config.json"
TEMPLATES = {"qwen3_vl": "qwen3_vl_nothink", "qwen2_5_vl": "qwen2_vl"}
REPO = Path(__file__).resolve().parents[1]
# LLaMA-Factory 0.9.5's examples/train_lora/qwen3vl_lora_dpo.yaml, every key (its eval keys are
# commented out there); the benchmark changes paths, epochs, logging, saving, workers and dtype
DPO_EXAMPLE = {
    "model_name_or_path": "Qwen/Qwen3-VL-4B-Instruct",
    "image_max_pixels": 262144,
    "video_max_pixels": 16384,
    "trust_remote_code": True,
    "stage": "dpo",
    "do_train": True,
    "finetuning_type": "lora",
    "lora_rank": 8,
    "lora_target": "all",
    "pref_beta": 0.1,
    "pref_loss": "sigmoid",
    "dataset": "rlhf_v",
    "template": "qwen3_vl_nothink",
    "cutoff_len": 2048,
    "max_samples": 1000,
    "preprocessing_num_workers": 16,
    "dataloader_num_workers": 4,
    "output_dir": "saves/qwen3-vl-4b/lora/dpo",
    "logging_steps": 10,
    "save_steps": 500,
    "plot_loss": True,
    "overwrite_output_dir": True,
    "save_only_model": False,
    "report_to": "none",
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "learning_rate": 5.0e-6,
    "num_train_epochs": 3.0,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "bf16": True,
    "ddp_timeout": 180000000,
    "resume_from_checkpoint": None,
}
PREFERENCE_DATASET = "open_eqa_dpo"


def build_model(
    workdir: Path,
    scale: int,
    arch: str = "qwen3_vl",
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> Path:
    """Random weights at the 2B's (or Qwen2.5-VL-3B's) widths, depth / scale, saved with the tiny
    model's processor; initialised on ``device`` (a GPU does the 2B's in a second), saved in
    ``dtype`` (None: float32, as before; the config then declares it, as Qwen's declares bf16)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    qwen2_5 = arch == "qwen2_5_vl"
    tiny = build_tiny_model(workdir / "tiny", arch=arch)
    real = json.loads((QWEN2_5_CONFIG if qwen2_5 else REAL_CONFIG).read_text())
    config = AutoConfig.from_pretrained(tiny)
    text, vision = real["text_config"], real["vision_config"]
    text_keys = [
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    ]
    for key in text_keys + ([] if qwen2_5 else ["head_dim"]):
        setattr(config.text_config, key, text[key])
    config.text_config.num_hidden_layers = text["num_hidden_layers"] // scale
    if getattr(config.text_config, "layer_types", None):  # one per layer (Qwen2.5-VL's: all full attention)
        config.text_config.layer_types = ["full_attention"] * config.text_config.num_hidden_layers
    section = text["rope_scaling"]["mrope_section"] if qwen2_5 else [24, 20, 20]
    config.text_config.rope_parameters = {**config.text_config.rope_parameters, "mrope_section": section}
    vision_keys = ["hidden_size", "intermediate_size", "num_heads", "out_hidden_size"]
    for key in vision_keys + (["window_size"] if qwen2_5 else ["num_position_embeddings"]):
        setattr(config.vision_config, key, vision[key])
    config.vision_config.depth = vision["depth"] // scale
    if qwen2_5:  # every 8th block attends in full (the last included), the others within windows
        config.vision_config.fullatt_block_indexes = [i // scale for i in vision["fullatt_block_indexes"]]
    else:
        config.vision_config.deepstack_visual_indexes = [
            i // scale for i in vision["deepstack_visual_indexes"]
        ]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config)
    if dtype is not None:
        model.to(dtype)
    out = workdir / "model"
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny).save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {params / 1e6:.0f} M parameters (vision depth {config.vision_config.depth}, "
        f"LM layers {config.text_config.num_hidden_layers}, widths of "
        f"{'Qwen2.5-VL-3B' if qwen2_5 else 'Qwen3-VL-2B'})"
    )
    return out


def run(name: str, model: Path, data: Path, out: Path, args: argparse.Namespace, fast: bool) -> dict:
    overrides = [
        f"model_name_or_path={model}",
        f"template={TEMPLATES[args.arch]}",
        "do_train=true",
        "stage=sft",
        "finetuning_type=lora",
        "lora_target=all",
        "lora_rank=8",
        "dataset=open_eqa_train_val",
        f"dataset_dir={data}",
        f"output_dir={out}",
        "report_to=none",
        "cutoff_len=2048",
        f"per_device_train_batch_size={args.batch_size}",
        "gradient_accumulation_steps=1",
        f"num_train_epochs={args.epochs}",
        "learning_rate=1e-4",
        "logging_steps=1",
        "save_strategy=no",
        "lr_scheduler_type=constant",
        f"bf16={str(args.bf16).lower()}",
        "seed=42",
        f"vision_feature_cache={str(fast).lower()}",
        f"shared_prefix_packing={str(fast).lower()}",
    ]
    cfg = load_config("train", None, overrides)
    start = time.perf_counter()
    metrics = run_train(cfg)
    wall = time.perf_counter() - start
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    samples = json.loads((out / "eqakit_run.json").read_text())["train_samples"] * args.epochs
    result = {
        "name": name,
        "wall_s": wall,
        "train_runtime_s": metrics["train_runtime"],
        "samples": samples,
        "samples_per_s": samples / wall,
        "final_loss": [r["loss"] for r in log if "loss" in r][-1],
        "mean_loss": metrics["train_loss"],
    }
    print(json.dumps(result))
    return result


def preference_pairs(data: Path, pairs: int | None = None) -> str:
    """The prepared training questions as preference pairs, registered in ``data``'s dataset_info.json
    in LLaMA-Factory's sharegpt preference format (both tools read the file): chosen = the question's
    answer, rejected = the next different answer from its episode, else from its category, else any.
    Returns the dataset's name."""
    everyone = [json.loads(line) for line in (data / "open_eqa_train_val.jsonl").read_text().splitlines()]
    rows = everyone[:pairs] if pairs else everyone

    def rejected(row: dict) -> str:
        for same in ("episode_history", "category", None):
            others = [o["output"] for o in everyone if same is None or o[same] == row[same]]
            start = others.index(row["output"]) if row["output"] in others else 0
            for other in others[start:] + others[:start]:
                if other != row["output"]:
                    return other
        raise SystemExit(f"every prepared question has the answer {row['output']!r}: no pair to build")

    records = [
        {
            "conversations": [
                {"from": "human", "value": "\n".join(t for t in (r["instruction"], r["input"]) if t)}
            ],
            "chosen": {"from": "gpt", "value": r["output"]},
            "rejected": {"from": "gpt", "value": rejected(r)},
            "images": r["images"],
        }
        for r in rows
    ]
    (data / f"{PREFERENCE_DATASET}.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    info = json.loads((data / "dataset_info.json").read_text())
    info[PREFERENCE_DATASET] = {
        "file_name": f"{PREFERENCE_DATASET}.json",
        "ranking": True,
        "formatting": "sharegpt",
        "columns": {
            "messages": "conversations",
            "chosen": "chosen",
            "rejected": "rejected",
            "images": "images",
        },
    }
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(f"preference data: {len(records)} pairs in {data / f'{PREFERENCE_DATASET}.json'}", flush=True)
    return PREFERENCE_DATASET


def vision_seconds(log: Path) -> float | None:
    """How long eqakit's vision feature cache took to build (its progress bar's elapsed time)."""
    found = re.findall(r"vision features: 100%.*?\[(?:(\d+):)?(\d+):(\d+)<", log.read_text(errors="replace"))
    if not found:
        return None
    hours, minutes, seconds = found[-1]
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)


def versus_llamafactory(model: Path, data: Path, workdir: Path, args: argparse.Namespace) -> None:
    """The seed's training YAML (or, with ``--stage dpo``, LLaMA-Factory's DPO example) run by
    LLaMA-Factory 0.9.5 and by eqakit, one after the other."""
    from lf_runner import EQAKIT, llamafactory_cli, timed, write_yaml

    cli = llamafactory_cli()
    dpo = args.stage == "dpo"
    if dpo:
        config = {
            **DPO_EXAMPLE,
            "dataset": preference_pairs(data, args.pairs),
            "preprocessing_num_workers": 2,  # the example's 16 and 4 are for a many-core machine
            "dataloader_num_workers": 0,
            "include_num_input_tokens_seen": True,
        }
        config.pop("resume_from_checkpoint")  # null: a fresh run either way
    else:
        config = yaml.safe_load((REPO / "configs" / "training_args.yaml").read_text(encoding="utf-8"))
    config.update(
        model_name_or_path=str(model),
        template=TEMPLATES[args.arch],
        dataset_dir=str(data),
        num_train_epochs=float(args.epochs),
        eval_strategy="no",  # training time only; evaluation is predict's benchmark
        val_size=0.0,
        save_strategy="no",
        logging_steps=1,
        bf16=args.bf16,
    )
    if args.bf16 and not torch.cuda.is_available():
        config["use_cpu"] = True  # LLaMA-Factory's transformers refuses bf16 on the CPU without it
    env = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    runs, logs, loops, history = {}, {}, {}, {}
    yaml_name = "the DPO example" if dpo else "training_args.yaml"
    for tool, command in (("LLaMA-Factory 0.9.5", [str(cli)]), ("eqakit", EQAKIT)):
        out = workdir / f"{args.stage}-{tool.split()[0]}"
        path = write_yaml(workdir / f"{out.name}.yaml", {**config, "output_dir": str(out)})
        runs[tool] = timed([*command, "train", str(path)], workdir / f"{out.name}.log", env)
        logs[tool] = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        history[tool] = [
            r for r in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in r
        ]
        steps = [r for r in logs[tool] if "loss" in r]
        losses = ", ".join(f"{r['loss']:.4f}" for r in steps)
        loops[tool] = json.loads((out / "train_results.json").read_text())["train_runtime"]
        vision = vision_seconds(workdir / f"{out.name}.log") if tool == "eqakit" else None
        rest = runs[tool].seconds - loops[tool] - (vision or 0)
        tokens = history[tool][-1].get("num_input_tokens_seen")
        print(
            f"{tool}: `train {yaml_name}` {runs[tool].seconds:.1f} s (whole command) = "
            + (f"vision cache {vision:.0f} s + " if vision is not None else "")
            + f"training loop {loops[tool]:.1f} s + {rest:.1f} s start-up, data and saving; "
            f"{runs[tool].cpu_seconds:.0f} CPU s, peak RSS {runs[tool].peak_rss_gb:.2f} GB, "
            f"{len(steps)} optimizer steps, losses {losses}"
            + (f", {tokens} input tokens fed" if tokens else ""),
            flush=True,
        )
    lf, ours = runs["LLaMA-Factory 0.9.5"], runs["eqakit"]
    print(
        f"eqakit vs LLaMA-Factory (batch {config['per_device_train_batch_size']} x accumulation "
        f"{config['gradient_accumulation_steps']}): {lf.seconds / ours.seconds:.2f}x the speed (whole command"
        f"{', target >= 3x' if dpo else ''}), "
        f"{loops['LLaMA-Factory 0.9.5'] / loops['eqakit']:.2f}x (training loop), "
        f"{lf.cpu_seconds / ours.cpu_seconds:.2f}x (CPU seconds of the whole command), "
        f"peak RSS {ours.peak_rss_gb / lf.peak_rss_gb:.2f}x",
        flush=True,
    )
    if dpo:  # at step 1 the adapter's B is 0: the policy is the reference, so every pair's loss is ln 2
        for tool, records in history.items():
            first = records[0]
            print(
                f"{tool} step 1: loss {first['loss']:.4f} (ln 2 = {math.log(2):.4f}), logps/chosen "
                f"{first['logps/chosen']:.4f}, logps/rejected {first['logps/rejected']:.4f}, "
                f"rewards/margins {first['rewards/margins']:.4f}",
                flush=True,
            )


# ---- --steady: the tutorial's YAML, steady state, memory beside the estimate ------------------------

# settings of the steady-state rows: (name, key overrides); fa2 only where flash-attn is installed
STEADY_SETTINGS = {
    "tutorial": ["bf16=false", "fp16=false"],  # the YAML's own: LLaMA-Factory's dtype rule decides
    "bf16": ["bf16=true"],
    "bf16+fa2": ["bf16=true", "flash_attn=fa2"],
}


class StepClock(TrainerCallback):
    """Wall-clock time at the end of each optimizer step, the GPU drained first (``sync``), so that a
    step's time is its kernels' and not only their queueing."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self.begin = 0.0
        self.ends: list[float] = []

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begin = self._now()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ends.append(self._now())


@contextlib.contextmanager
def instrumented(clock: Any, spent: dict[str, float], sync: bool) -> Iterator[None]:
    """`run_train` with ``clock`` among its callbacks and the vision cache's build timed into
    ``spent["vision_cache_s"]``; both patched for the block only."""
    from eqakit.train import sft
    from eqakit.train.vision_cache import VisionFeatureCache

    build, original_init = VisionFeatureCache.build, sft.EqakitTrainer.__init__

    def timed_build(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return build(self, *args, **kwargs)
        finally:
            if sync:
                torch.cuda.synchronize()
            spent["vision_cache_s"] = time.perf_counter() - start

    def init(self: Any, *args: Any, **kwargs: Any) -> None:  # the trainer `run_train` builds
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), clock]
        original_init(self, *args, **kwargs)

    VisionFeatureCache.build = timed_build  # type: ignore[method-assign]
    sft.EqakitTrainer.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        VisionFeatureCache.build = build  # type: ignore[method-assign]
        sft.EqakitTrainer.__init__ = original_init  # type: ignore[method-assign]


def steady_row(
    name: str, model: Path, data: Path, out: Path, args: argparse.Namespace, label: str
) -> dict[str, Any]:
    """One setting of the tutorial's YAML: warm-up + N optimizer steps; see the module's docstring."""
    from eqakit.config.check import preflight
    from eqakit.errors import EqakitError
    from eqakit.memory import estimate

    cuda = args.device == "cuda"
    steps = args.warmup + args.steady
    overrides = [
        f"model_name_or_path={model}",
        f"dataset_dir={data}",
        f"output_dir={out}",
        "eval_strategy=no",  # training time only; no val split taken out
        "val_size=0",
        "save_strategy=no",
        "plot_loss=false",
        f"max_steps={steps}",  # the data repeats as epochs would
        "report_to=none",
        *(["use_cpu=true"] if args.device == "cpu" else []),
        *STEADY_SETTINGS[name],
    ]
    row: dict[str, Any] = {"check": "train", "setting": f"{name}, {label}"}
    try:
        cfg = load_config("train", str(REPO / "configs" / "training_args.yaml"), overrides)
        est = estimate("train", cfg, preflight("train", cfg), torch.device(args.device))
        row["estimate_gib"] = est.peak / 2**30
        cfg = load_config("train", str(REPO / "configs" / "training_args.yaml"), overrides)
        clock, spent = StepClock(sync=cuda), {}
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row["allocated_before_gib"] = torch.cuda.memory_allocated() / 2**30
        start = time.perf_counter()
        with instrumented(clock, spent, cuda):
            metrics = run_train(cfg)
        row["wall_s"] = time.perf_counter() - start
    except Exception as error:  # a crash or a refusal is this setting's result, not the benchmark's end
        traceback.print_exc()  # into the log; the table gets the first line
        first = (str(error).strip().splitlines() or [""])[0][:200]
        row["result"] = ("refused: " if isinstance(error, EqakitError) else "crashed: ") + (
            f"{type(error).__name__}: {first}"
        )
        print(json.dumps(row), flush=True)
        return row
    finally:
        gc.collect()
        if cuda:
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
    record = json.loads((out / "eqakit_run.json").read_text())
    ends = clock.ends
    first = ends[args.warmup - 1] if args.warmup else clock.begin
    per_step = (ends[-1] - first) / (len(ends) - args.warmup) if len(ends) > args.warmup else math.nan
    samples = cfg.training.per_device_train_batch_size * cfg.training.gradient_accumulation_steps
    row.update(
        result="ok",
        compute_dtype=record["compute_dtype"],
        steps=len(ends),
        warmup=args.warmup,
        step_s=per_step,
        samples_per_s=samples / per_step,
        vision_cache_s=spent.get("vision_cache_s"),
        loss=metrics.get("train_loss"),  # the mean over every step (the tutorial logs every 5th)
        estimate_line=est.report().splitlines()[-1],
    )
    print(json.dumps(row), flush=True)
    return row


def steady(model: Path, data: Path, workdir: Path, args: argparse.Namespace, label: str) -> list[dict]:
    """Every setting asked for (fa2 a row saying why not, without flash-attn); rows appended to --rows."""
    rows = []
    for name in args.settings:
        if "fa2" in name and importlib.util.find_spec("flash_attn") is None:
            row = {
                "check": "train",
                "setting": f"{name}, {label}",
                "result": "skipped: flash_attn not installed",
            }
        elif "bf16" in name and args.device == "cpu" and not args.cpu_bf16:
            row = {"check": "train", "setting": f"{name}, {label}", "result": "skipped on the CPU"}
        else:
            row = steady_row(name, model, data, workdir / f"steady-{name}", args, label)
        rows.append(row)
        if args.rows:
            with args.rows.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    for row in rows:
        if row.get("result") == "ok":
            peak = f"{row['peak_gib']:.2f} GiB" if "peak_gib" in row else "n/a (CPU)"
            cache = row["vision_cache_s"]
            print(
                f"{row['setting']}: compute {row['compute_dtype']}, {row['step_s']:.3f} s per optimizer step "
                f"({row['samples_per_s']:.2f} samples/s) after {row['warmup']} warm-up steps; vision cache "
                f"{'off' if cache is None else f'{cache:.1f} s'}; peak allocated {peak} vs estimate "
                f"{row['estimate_gib']:.2f} GiB; mean loss {row['loss']}",
                flush=True,
            )
        else:
            print(f"{row['setting']}: {row['result']}", flush=True)
    return rows


def frames_for(arch: str) -> FrameOptions:
    """`eqakit prepare`'s frames for the model: on its visual-token grid (`prepare --arch`)."""
    side = ARCHITECTURES[arch].token_side
    return FrameOptions(token_side=side, max_pixels=DEFAULT_TOKENS * side * side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--scale", type=int, default=4, choices=(1, 2, 4))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (CPUs with AVX512-BF16)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--llamafactory",
        action="store_true",
        help="also run LLaMA-Factory 0.9.5 itself and `eqakit train` on the seed's training YAML",
    )
    parser.add_argument("--only-llamafactory", action="store_true", help="skip the in-process comparison")
    parser.add_argument(
        "--stage",
        choices=("sft", "dpo"),
        default="sft",
        help="dpo: LLaMA-Factory's DPO example against `eqakit train` on preference pairs of the same "
        "questions (with --llamafactory; there is no in-process comparison for DPO)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="--stage dpo: the first N training questions' pairs (default all)",
    )
    parser.add_argument(
        "--arch",
        choices=list(TEMPLATES),
        default="qwen3_vl",
        help="qwen3_vl: Qwen3-VL-2B's widths; qwen2_5_vl: Qwen2.5-VL-3B's (frames on its 28-pixel grid, "
        "template qwen2_vl)",
    )
    parser.add_argument(
        "--steady",
        type=int,
        metavar="N",
        help="the tutorial's training_args.yaml (2 x 8) per setting: seconds per optimizer step over N "
        "steps after --warmup, vision cache build, peak memory beside the --memory estimate",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="--steady: optimizer steps left out of the time"
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=list(STEADY_SETTINGS),
        default=list(STEADY_SETTINGS),
        help="--steady: which rows (tutorial: bf16/fp16 unset, LLaMA-Factory's rule; fa2 needs flash-attn)",
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of the 2B's widths")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="--steady: where")
    parser.add_argument("--cpu-bf16", action="store_true", help="--steady on the CPU: run the bf16 rows too")
    parser.add_argument("--rows", type=Path, help="--steady: append each row as a JSON line (gpu_check.sh)")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.steady is not None and (args.steady < 1 or args.warmup < 0):
        parser.error("--steady: at least 1 measured step, --warmup at least 0")
    if args.stage == "dpo" and not (args.llamafactory or args.only_llamafactory):
        parser.error("--stage dpo compares with LLaMA-Factory only: add --llamafactory")
    if args.episodes < 2:
        parser.error("--episodes: at least 2 (prepare keeps one episode for its test split)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="eqakit-bench-train-"))
    generate(workdir / "synth", episodes=args.episodes, seed=0)
    data = workdir / "data"
    prepare_openeqa(
        data,
        questions=workdir / "synth" / "open-eqa-v0.json",
        frames=workdir / "synth" / "frames",
        options=PrepareOptions(frames=frames_for(args.arch), test_size=0.15),  # >= 1 episode each
    )
    if args.steady is not None:
        started = time.perf_counter()
        if args.tiny:
            model, label = build_tiny_model(workdir / "tiny", arch=args.arch), "tiny model"
        else:  # saved in bf16, as Qwen publishes the 2B: the tutorial's dtype rule then picks bf16
            model = build_model(workdir, args.scale, args.arch, args.device, torch.bfloat16)
            label = f"2B widths, depth / {args.scale}" if args.scale > 1 else "2B architecture"
        print(f"data and model ready in {time.perf_counter() - started:.1f} s", flush=True)
        steady(model, data, workdir, args, f"{label}, {args.device}")
        return
    model = build_model(workdir, args.scale, args.arch)
    if args.llamafactory or args.only_llamafactory:
        versus_llamafactory(model, data, workdir, args)
        if args.only_llamafactory or args.stage == "dpo":
            return
    reference = run(
        "reference (Trainer + PEFT, per-question samples)", model, data, workdir / "ref", args, False
    )
    ours = run("eqakit (vision cache + shared-prefix packing)", model, data, workdir / "eqakit", args, True)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {'bf16' if args.bf16 else 'fp32'}"
    )
    for r in (reference, ours):
        print(
            f"{r['name']:<52} {r['samples_per_s']:7.3f} samples/s  wall {r['wall_s']:7.1f} s  "
            f"loss {r['final_loss']:.4f} (mean {r['mean_loss']:.4f})"
        )
    print(f"speed-up: {ours['samples_per_s'] / reference['samples_per_s']:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
