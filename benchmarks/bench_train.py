"""LoRA training throughput: LLaMA-Factory's way against eqakit's, same model, same data, one process.

    .venv/bin/python benchmarks/bench_train.py [--episodes 3] [--scale 4] [--epochs 1] [--bf16]
    .venv/bin/python benchmarks/bench_train.py --llamafactory   # + LLaMA-Factory 0.9.5 itself, seed's YAML
    .venv/bin/python benchmarks/bench_train.py --only-llamafactory --arch qwen2_5_vl   # on Qwen2.5-VL-3B's shapes
    .venv/bin/python benchmarks/bench_train.py --stage dpo --llamafactory --pairs 8 --bf16   # LF's DPO example

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
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import tempfile
import time
from pathlib import Path

import torch
import yaml

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


def build_model(workdir: Path, scale: int, arch: str = "qwen3_vl") -> Path:
    """Random weights at the 2B's (or Qwen2.5-VL-3B's) widths, depth / scale, saved with the tiny
    model's processor."""
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
    model = AutoModelForImageTextToText.from_config(config)
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
    args = parser.parse_args()
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
