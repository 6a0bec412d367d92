"""`eqakit demo`: the whole pipeline, offline, on the tiny model and synthetic scenes.

    eqakit demo                          # everything under runs/demo/, resuming what is already done
    eqakit demo --output-dir /tmp/demo --fresh

Stages, each the same code the real commands run, each writing a directory and a YAML config a
user can rerun by hand (runs/demo/configs/):
  1. model    build the tiny random Qwen3-VL (`eqakit tiny-model`)
  2. synth    render synthetic rooms in OpenEQA's official layout (`eqakit synth`)
  3. data     prepare them, split by episode (`eqakit prepare openeqa`)
  4. base     predict the test split with the untrained model (`eqakit train predict.yaml`)
  5. lora     fine-tune with LoRA (`eqakit train train.yaml`)
  6. tuned    predict again with the adapter
  7. merged   merge and export the adapter (`eqakit export merge.yaml`), then check the merged model
              gives the adapter's answers
and prints base versus fine-tuned (overall and per category) beside the blind baseline: the most
common training answer for each question, which scores what a model that never looks at the frames
can score.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml

from eqakit.errors import EqakitError

# Settings of the demo's model and runs; chosen so fine-tuning visibly works within minutes on 2 cores.
TINY_SIZES: dict[str, Any] = {}
FRAMES = {"num_frames": 8, "max_pixels": 64 * 64 * 4}
TRAIN: dict[str, Any] = {
    "stage": "sft",
    "do_train": True,
    "finetuning_type": "lora",
    "lora_target": "all",
    "lora_rank": 16,
    "lora_alpha": 32,
    "template": "qwen3_vl_nothink",
    "cutoff_len": 1024,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 5.0e-3,
    "num_train_epochs": 6,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 5,
    "logging_steps": 5,
    "save_steps": 50,
    "plot_loss": True,
    "report_to": "none",
    "seed": 42,
    "dataset": "open_eqa_train_val",
    "val_size": 0.05,
    "eval_strategy": "steps",
    "eval_steps": 50,
}
PREDICT: dict[str, Any] = {
    "stage": "sft",
    "do_predict": True,
    "predict_with_generate": True,
    "finetuning_type": "lora",
    "template": "qwen3_vl_nothink",
    "eval_dataset": "open_eqa_test",
    "cutoff_len": 1024,
    "per_device_eval_batch_size": 16,
    "max_new_tokens": 16,
    "do_sample": False,
    "temperature": 0.0,
    "report_to": "none",
}


def _write_config(path: Path, settings: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return path


def _stage(number: int, name: str, done: bool) -> bool:
    print(f"\n[{number}/7] {name}{' (done, skipped)' if done else ''}", flush=True)
    return not done


def blind_baseline(data: Path) -> dict[str, Any]:
    """Exact match of answering each test question with its most common training answer."""
    from eqakit.evaluate.metrics import exact_match

    def rows(name: str) -> list[dict[str, Any]]:
        return [
            json.loads(line) for line in (data / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        ]

    def question(row: dict[str, Any]) -> str:
        return row["instruction"].replace("<image>", "").strip()

    answers: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for row in rows("open_eqa_train_val"):
        answers[question(row)][row["output"]] += 1
        overall[row["output"]] += 1
    fallback = overall.most_common(1)[0][0]
    scores = []
    for row in rows("open_eqa_test"):
        guess = answers[question(row)].most_common(1)[0][0] if answers.get(question(row)) else fallback
        scores.append(exact_match(guess, [row["output"], *row.get("extra_answers", [])]))
    return {"predict_exact_match": sum(scores) / len(scores), "num_samples": len(scores)}


def _same_answers(a: Path, b: Path) -> tuple[int, int]:
    def answers(path: Path) -> dict[str, str]:
        rows = [json.loads(line) for line in (path / "generated_predictions.jsonl").read_text().splitlines()]
        return {r.get("question_id", r["prompt"]): r["predict"] for r in rows}

    first, second = answers(a), answers(b)
    return sum(first[k] == second.get(k) for k in first), len(first)


def _results(directory: Path) -> dict[str, Any]:
    results = json.loads((directory / "predict_results.json").read_text(encoding="utf-8"))
    return {**results, "num_samples": results.get("predict_samples")}


def run_demo(out: Path, episodes: int = 40, seed: int = 0) -> dict[str, Any]:
    """Run (or resume) every stage under ``out``; return the base, fine-tuned and blind scores."""
    from eqakit.config import load_config
    from eqakit.data.frames import FrameOptions
    from eqakit.data.prepare import PrepareOptions, prepare_openeqa
    from eqakit.demo.synth import generate
    from eqakit.evaluate.predict import run_predict
    from eqakit.evaluate.report import compare_table
    from eqakit.export import run_export
    from eqakit.model.tiny import build_tiny_model
    from eqakit.train.callbacks import newest_complete_checkpoint
    from eqakit.train.sft import run_train

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model, synth, data = out / "model", out / "synth", out / "data"
    lora, base_eval, tuned_eval, merged, merged_eval = (
        out / n for n in ("lora", "base", "tuned", "merged", "merged_eval")
    )
    configs = out / "configs"

    if _stage(1, "tiny Qwen3-VL", (model / "config.json").is_file()):
        build_tiny_model(model, seed=seed, **TINY_SIZES)
    if _stage(2, f"synthetic scenes ({episodes} episodes)", (synth / "open-eqa-v0.json").is_file()):
        generate(synth, episodes=episodes, seed=seed, overwrite=synth.exists())
    if _stage(3, "prepare (episode split)", (data / "dataset_info.json").is_file()):
        options = PrepareOptions(frames=FrameOptions(**FRAMES), seed=seed)
        prepare_openeqa(data, questions=synth / "open-eqa-v0.json", frames=synth / "frames", options=options)

    common = {"model_name_or_path": str(model), "dataset_dir": str(data)}
    base_cfg = _write_config(
        configs / "predict_base.yaml", {**common, **PREDICT, "output_dir": str(base_eval)}
    )
    if _stage(4, "predict with the base model", (base_eval / "predict_results.json").is_file()):
        run_predict(load_config("train", base_cfg))

    train_cfg = _write_config(configs / "train.yaml", {**common, **TRAIN, "output_dir": str(lora)})
    if _stage(5, "LoRA fine-tuning", (lora / "adapter_model.safetensors").is_file()):
        resume = ["resume_from_checkpoint=true"] if lora.is_dir() and newest_complete_checkpoint(lora) else []
        run_train(
            load_config(
                "train", train_cfg, resume or (["overwrite_output_dir=true"] if lora.exists() else [])
            )
        )

    tuned_cfg = _write_config(
        configs / "predict_tuned.yaml",
        {**common, **PREDICT, "adapter_name_or_path": str(lora), "output_dir": str(tuned_eval)},
    )
    if _stage(6, "predict with the fine-tuned adapter", (tuned_eval / "predict_results.json").is_file()):
        run_predict(load_config("train", tuned_cfg))

    merge_cfg = _write_config(
        configs / "merge.yaml",
        {
            "model_name_or_path": str(model),
            "adapter_name_or_path": str(lora),
            "template": "qwen3_vl_nothink",
            "finetuning_type": "lora",
            "export_dir": str(merged),
            "export_size": 1,
        },
    )
    merged_cfg = _write_config(
        configs / "predict_merged.yaml",
        {**common, **PREDICT, "model_name_or_path": str(merged), "output_dir": str(merged_eval)},
    )
    if _stage(
        7, "merge, export, and check the merged model", (merged_eval / "predict_results.json").is_file()
    ):
        if not (merged / "config.json").is_file():
            run_export(load_config("export", merge_cfg))
        run_predict(load_config("train", merged_cfg))
    same, total = _same_answers(tuned_eval, merged_eval)
    infer_cfg = _write_config(
        configs / "infer.yaml",
        {"model_name_or_path": str(merged), "template": "qwen3_vl_nothink", "finetuning_type": "lora"},
    )

    base, tuned = (_results(d) for d in (base_eval, tuned_eval))
    blind = blind_baseline(data)
    _print_summary(base, tuned, blind, same, total, compare_table, infer_cfg, time.perf_counter() - started)
    return {"base": base, "tuned": tuned, "blind": blind, "merged_agrees": same == total}


def _print_summary(
    base: dict,
    tuned: dict,
    blind: dict,
    same: int,
    total: int,
    compare_table: Any,
    infer_cfg: Path,
    seconds: float,
) -> None:
    print("\n" + "=" * 78)
    print("Held-out test episodes: base model versus LoRA fine-tuned\n")
    print(compare_table(base, tuned, names=("base", "fine-tuned")))
    print(
        f"\nBlind baseline (most common training answer per question, frames unseen): "
        f"exact match {blind['predict_exact_match']:.2f}"
    )
    print("\nExact match per category (base -> fine-tuned):")
    for category, scores in tuned.get("predict_per_category", {}).items():
        before = base.get("predict_per_category", {}).get(category, {}).get("predict_exact_match", 0.0)
        print(f"  {category:<26} {before:6.2f} -> {scores.get('predict_exact_match', 0.0):6.2f}")
    print(f"\nMerged model gives the adapter's answer on {same}/{total} test questions.")
    print(
        f"\nServe the merged model:\n  API_PORT=8000 eqakit api {infer_cfg}\n  eqakit webui {infer_cfg}\n"
        f"  eqakit chat {infer_cfg}"
    )
    print(f"\nDemo finished in {seconds / 60:.1f} min.")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="eqakit demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--episodes", type=int, default=40, help="synthetic episodes (default 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fresh", action="store_true", help="delete the output directory first and start clean"
    )
    args = parser.parse_args(argv)
    if args.fresh and args.output_dir.exists():
        if not (args.output_dir / "configs").is_dir() and any(args.output_dir.iterdir()):
            raise EqakitError(
                f"--fresh refuses to delete {args.output_dir}: it does not look like a demo directory"
            )
        shutil.rmtree(args.output_dir)
    run_demo(args.output_dir, episodes=args.episodes, seed=args.seed)
    return 0
