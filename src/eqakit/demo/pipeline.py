"""`eqakit demo`: the whole pipeline, offline, on the tiny model and synthetic scenes, in minutes.

    eqakit demo                          # everything under runs/demo/, resuming what is already done
    eqakit demo --output-dir /tmp/demo --fresh
    eqakit demo --episodes 80 --epochs 6 # a quicker, weaker run

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
can score. Fine-tuning works when the fine-tuned model beats the base on every metric and the blind
baseline on exact match; the summary says whether it did, what the numbers mean (a random base, synthetic
rooms) and where the tuned model is still below the blind baseline. The console shows the stages, their
progress bars and the summary; what the stages print goes to demo.log; report.md holds the summary,
the loss curve and a few answers side by side.

A stage whose output exists is skipped, so a rerun resumes where an interrupted one stopped
(training from its newest checkpoint); --fresh deletes the directory and starts clean. The
directory remembers the options it was made with (demo.json) and refuses to resume under others.
Raises EqakitError for that, and for --fresh on a directory that is not a demo's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from eqakit.data.template import NOTHINK
from eqakit.errors import EqakitError
from eqakit.evaluate.baseline import blind_baseline, json_lines
from eqakit.evaluate.report import METRIC_LABELS
from eqakit.fsutil import write_text_atomic

# Settings of the demo's model and runs, chosen so that fine-tuning visibly works (the fine-tuned
# model beats the blind baseline, so it reads the frames) in about five minutes on 2 CPU cores.
#
# The tiny model is wider and deeper than the test suite's, and its weights are drawn at
# 1/sqrt(width) instead of Qwen's 0.02 (tuned for width 2048): at width 128, 0.02 leaves attention
# almost uniform over the ~100 image tokens, and LoRA then needs many more steps to learn to look
# at the question and at the few tokens that answer it.
TINY_SIZES: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "head_dim": 32,
    "intermediate_size": 256,
    "vision_hidden_size": 64,
    "vision_intermediate_size": 128,
    "initializer_range": 0.09,
}
FRAMES = {"num_frames": 8, "max_pixels": 64 * 64 * 4}  # 128x96: 12 visual tokens a frame
# Enough rooms that the model must learn to read the frames rather than remember the training
# episodes: with 40 it memorises them (training loss falls, held-out scores barely move), and 200
# beat 120 trained for 50% longer.
EPISODES = 200
# Ops on a model this small are too short to share among threads: one thread is within ~20% of
# two on an idle 2-core machine, and ten times faster on a busy one, where every parallel op
# waits for whichever thread the scheduler has set aside.
TORCH_THREADS = 1
TRAIN: dict[str, Any] = {
    "stage": "sft",
    "do_train": True,
    "finetuning_type": "lora",
    "lora_target": "all",
    "lora_rank": 16,
    "lora_alpha": 32,
    "template": NOTHINK,
    "cutoff_len": 1024,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 3.0e-3,
    "num_train_epochs": 8,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 20,
    "logging_steps": 10,
    "save_steps": 500,
    "save_total_limit": 2,
    "plot_loss": True,
    "report_to": "none",
    "seed": 42,
    "dataset": "open_eqa_train_val",
    "val_size": 0.05,
    "eval_strategy": "steps",
    "eval_steps": 500,
}
PREDICT: dict[str, Any] = {
    "stage": "sft",
    "do_predict": True,
    "predict_with_generate": True,
    "finetuning_type": "lora",
    "template": NOTHINK,
    "eval_dataset": "open_eqa_test",
    "cutoff_len": 1024,
    "per_device_eval_batch_size": 16,
    "max_new_tokens": 16,
    "do_sample": False,
    "temperature": 0.0,
    "report_to": "none",
}
STAGES = 7
EM = "predict_exact_match"
METRICS = ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", EM, "predict_token_f1")
SETTINGS_FILE = "demo.json"  # the options a demo directory was made with; a rerun must match them
LOG_FILE = "demo.log"  # what the stages print (data reports, loss records), kept off the console
REPORT_FILE = "report.md"
SCREENSHOTS = "screenshots"  # where docs/screenshots.py --out puts its picture of each web UI tab


def _write_config(path: Path, settings: dict[str, Any]) -> Path:
    return write_text_atomic(path, yaml.safe_dump(settings, sort_keys=False))


class _Progress:
    """Prints each stage as it starts, whether it is skipped (done by an earlier run), and its time.

    What a stage prints (data reports, the Trainer's loss records) goes to ``log`` instead of the
    console, which keeps the stage lines, the progress bars (on stderr) and the summary."""

    def __init__(self, log: Path) -> None:
        self.number, self.name, self.started = 0, "", None
        self.log = log
        self._quiet = contextlib.ExitStack()

    def stage(self, name: str, done: bool) -> bool:
        """Announce the next stage; True when it has to run (its prints then go to the log)."""
        self.finish()
        self.number, self.name = self.number + 1, name
        print(f"[{self.number}/{STAGES}] {name}{' (done, skipped)' if done else ''}", flush=True)
        self.started = None if done else time.perf_counter()
        if not done:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            sink = self._quiet.enter_context(self.log.open("a", encoding="utf-8"))
            sink.write(f"\n===== [{self.number}/{STAGES}] {name} =====\n")
            self._quiet.enter_context(contextlib.redirect_stdout(sink))
        return not done

    def finish(self) -> None:
        self._quiet.close()
        if self.started is not None:
            print(
                f"[{self.number}/{STAGES}] {self.name}: {time.perf_counter() - self.started:.0f} s",
                flush=True,
            )
            self.started = None


def _same_answers(a: Path, b: Path) -> tuple[int, int]:
    def answers(path: Path) -> dict[str, str]:
        rows = json_lines(path / "generated_predictions.jsonl")
        return {r.get("question_id", r["prompt"]): r["predict"] for r in rows}

    first, second = answers(a), answers(b)
    return sum(first[k] == second.get(k) for k in first), len(first)


def _results(directory: Path) -> dict[str, Any]:
    results = json.loads((directory / "predict_results.json").read_text(encoding="utf-8"))
    return {**results, "num_samples": results.get("predict_samples")}


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Record the options on the first run; refuse to resume a directory made with other ones."""
    path = out / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != settings:
            raise EqakitError(
                f"{out} holds a demo made with {_options(before)}, not {_options(settings)}: rerun with "
                f"those options to resume it, add --fresh to start it again, or choose another --output-dir"
            )
        return
    write_text_atomic(path, json.dumps(settings, indent=2) + "\n")


def _options(settings: dict[str, Any]) -> str:
    return " ".join(f"--{k} {v}" for k, v in settings.items() if v is not None)


def run_demo(
    out: Path, episodes: int = EPISODES, seed: int = 0, epochs: float | None = None
) -> dict[str, Any]:
    """Run (or resume) every stage under ``out``; return the base, fine-tuned and blind scores.

    ``epochs`` overrides TRAIN's num_train_epochs (a quicker, weaker run). Torch runs on
    TORCH_THREADS threads meanwhile and is given back its thread count afterwards.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        return _run(Path(out), episodes, seed, epochs)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, episodes: int, seed: int, epochs: float | None) -> dict[str, Any]:
    started = time.perf_counter()
    _check_settings(out, {"episodes": episodes, "seed": seed, "epochs": epochs})
    progress = _Progress(out / LOG_FILE)
    try:
        _stages(progress, out, episodes, seed, epochs)
    finally:
        progress.finish()  # the log closed and the console back, also when a stage fails
    same, total = _same_answers(out / "tuned", out / "merged_eval")
    configs = out / "configs"
    base, tuned = (_results(out / d) for d in ("base", "tuned"))
    blind = blind_baseline(out / "data")
    verdict = {
        "beats_base": all(tuned[k] > base[k] for k in METRICS),
        "beats_blind": tuned[EM] > blind[EM],
        "merged_agrees": same == total,
    }
    lines = _summary(base, tuned, blind, (same, total), verdict, configs / "infer.yaml")
    print("\n" + "\n".join(lines))
    report = write_text_atomic(out / REPORT_FILE, _report(out, lines))
    seconds = time.perf_counter() - started
    took = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
    print(f"\nDemo finished in {took}. The report: {report}; every stage's output: {out / LOG_FILE}")
    return {"base": base, "tuned": tuned, "blind": blind, **verdict}


def _stages(progress: _Progress, out: Path, episodes: int, seed: int, epochs: float | None) -> None:
    """Run each stage whose output is missing, in order."""
    from eqakit.config import load_config
    from eqakit.data.frames import FrameOptions
    from eqakit.data.prepare import PrepareOptions, prepare_openeqa
    from eqakit.demo.synth import generate
    from eqakit.evaluate.predict import run_predict
    from eqakit.export import run_export
    from eqakit.model.tiny import build_tiny_model
    from eqakit.train.callbacks import newest_complete_checkpoint
    from eqakit.train.sft import run_train

    model, synth, data = out / "model", out / "synth", out / "data"
    lora, base_eval, tuned_eval, merged, merged_eval = (
        out / n for n in ("lora", "base", "tuned", "merged", "merged_eval")
    )
    configs = out / "configs"
    if progress.stage("build the tiny Qwen3-VL", (model / "config.json").is_file()):
        build_tiny_model(model, seed=seed, overwrite=model.exists(), **TINY_SIZES)
    if progress.stage(
        f"render synthetic rooms ({episodes} episodes)", (synth / "open-eqa-v0.json").is_file()
    ):
        generate(synth, episodes=episodes, seed=seed, overwrite=synth.exists())
    if progress.stage("prepare the data (episode split)", (data / "dataset_info.json").is_file()):
        options = PrepareOptions(frames=FrameOptions(**FRAMES), seed=seed)
        prepare_openeqa(data, questions=synth / "open-eqa-v0.json", frames=synth / "frames", options=options)

    common = {"model_name_or_path": str(model), "dataset_dir": str(data)}
    base_cfg = _write_config(
        configs / "predict_base.yaml", {**common, **PREDICT, "output_dir": str(base_eval)}
    )
    if progress.stage("predict with the base model", (base_eval / "predict_results.json").is_file()):
        run_predict(load_config("train", base_cfg))

    train = {**common, **TRAIN, "output_dir": str(lora)}
    if epochs is not None:
        train["num_train_epochs"] = epochs
    train_cfg = _write_config(configs / "train.yaml", train)
    if progress.stage("fine-tune with LoRA", (lora / "adapter_model.safetensors").is_file()):
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
    if progress.stage("predict with the fine-tuned adapter", (tuned_eval / "predict_results.json").is_file()):
        run_predict(load_config("train", tuned_cfg))

    merge_cfg = _write_config(
        configs / "merge.yaml",
        {
            "model_name_or_path": str(model),
            "adapter_name_or_path": str(lora),
            "template": NOTHINK,
            "finetuning_type": "lora",
            "export_dir": str(merged),
            "export_size": 1,
        },
    )
    merged_cfg = _write_config(
        configs / "predict_merged.yaml",
        {**common, **PREDICT, "model_name_or_path": str(merged), "output_dir": str(merged_eval)},
    )
    if progress.stage(
        "merge and export, then check the merged model", (merged_eval / "predict_results.json").is_file()
    ):
        if not (merged / "config.json").is_file():
            run_export(load_config("export", merge_cfg))
        run_predict(load_config("train", merged_cfg))
    progress.finish()
    _write_config(
        configs / "infer.yaml",
        {"model_name_or_path": str(merged), "template": NOTHINK, "finetuning_type": "lora"},
    )


def _summary(
    base: dict[str, Any],
    tuned: dict[str, Any],
    blind: dict[str, Any],
    agreement: tuple[int, int],
    verdict: dict[str, bool],
    infer_cfg: Path,
) -> list[str]:
    """What the demo's numbers are and what they mean, as the lines printed and put in the report."""
    lines = [
        "=" * 78,
        f"Held-out test episodes ({tuned['num_samples']} questions): base model versus LoRA fine-tuned",
        "",
    ]
    lines.append(f"  {'metric':<10}{'base':>10}{'fine-tuned':>12}{'change':>10}{'blind':>10}")
    for key in METRICS:
        lines.append(
            f"  {METRIC_LABELS[key]:<10}{base[key]:>10.2f}{tuned[key]:>12.2f}"
            f"{tuned[key] - base[key]:>+10.2f}{blind[key]:>10.2f}"
        )
    lines += [
        "",
        "  base: the tiny model with random weights, as built: its answers are noise and it scores about 0,",
        "        so 'change' is all the model learned here, not a gain over a pretrained model.",
        "  blind: each question answered with its most common answer in the training split, frames unseen:",
        "        what a model that never looks at the rooms can score.",
        "  The rooms are synthetic (coloured boxes in rendered scenes): these numbers show the pipeline",
        "  works end to end, not how Qwen3-VL-2B scores on OpenEQA.",
        "",
        f"Exact match per category ({'base':>6} {'tuned':>6} {'blind':>6})",
    ]
    below = []
    for category, scores in tuned.get("predict_per_category", {}).items():
        before = base.get("predict_per_category", {}).get(category, {}).get(EM, 0.0)
        guess = blind["predict_per_category"].get(category, {}).get(EM, 0.0)
        mine = scores.get(EM, 0.0)
        if mine < guess:
            below.append(category)
        mark = "  below blind" if mine < guess else ""
        lines.append(f"  {category:<30}{before:6.2f} {mine:6.2f} {guess:6.2f}{mark}")
    same, total = agreement
    reads = (
        "it reads the frames"
        if not below
        else f"overall it reads the frames, yet in {len(below)} of {len(tuned.get('predict_per_category', {}))} "
        f"categories it is still below the blind baseline ({', '.join(below)})"
    )
    eqakit = _command()
    lines += [
        "",
        f"{'yes' if verdict['beats_base'] else 'NO '}  fine-tuned beats the base model on every metric",
        f"{'yes' if verdict['beats_blind'] else 'NO '}  fine-tuned exact match beats the blind baseline "
        f"({tuned[EM]:.2f} vs {blind[EM]:.2f}): {reads}",
        f"{'yes' if verdict['merged_agrees'] else 'NO '}  the merged model gives the adapter's answer "
        f"on {same}/{total} test questions",
        "",
        "Serve the merged model:",
        f"  API_PORT=8000 {eqakit} api {infer_cfg}",
        f"  {eqakit} webui {infer_cfg}",
        f"  {eqakit} chat {infer_cfg}",
    ]
    return lines


def _command() -> str:
    """How to run this eqakit from the user's shell: ``eqakit`` when it is the one on PATH, else its
    path (``make demo`` runs .venv/bin/eqakit, which a plain shell does not find)."""
    here = Path(sys.executable).parent / "eqakit"
    on_path = shutil.which("eqakit")
    if on_path and Path(on_path).resolve() == here.resolve():
        return "eqakit"
    with contextlib.suppress(ValueError):
        return str(here.relative_to(Path.cwd()))
    return str(here)


def _screenshots(out: Path) -> list[str]:
    """report.md's web UI section: the tabs as docs/screenshots.py took them on this demo, in the
    order it took them (the page's), or how to take them: that needs Chromium, which the demo itself
    does not need."""
    shots = sorted((out / SCREENSHOTS).glob("*.png"), key=lambda shot: shot.stat().st_mtime)
    lines = ["## The web UI on this demo", ""]
    if not shots:
        take = f".venv/bin/python docs/screenshots.py {out} --out {out / SCREENSHOTS}"
        return [
            *lines,
            f"No screenshots yet: `{take}` takes one of each tab (it needs Playwright and Chromium); "
            "run the demo again (its stages are done, so it only writes this report again) to show them here.",
            "",
        ]
    for shot in shots:
        lines += [f"![{shot.stem}]({SCREENSHOTS}/{shot.name})", ""]
    return lines


def _report(out: Path, summary: list[str]) -> str:
    """report.md: the summary, the loss curve, the web UI's tabs, a few answers side by side, and
    where everything is."""
    tuned = json_lines(out / "tuned" / "generated_predictions.jsonl")
    base = {r["index"]: r["predict"] for r in json_lines(out / "base" / "generated_predictions.jsonl")}
    lines = ["# eqakit demo", "", "```", *summary, "```", ""]
    if (out / "lora" / "training_loss.png").is_file():
        lines += ["## Training loss", "", "![training loss](lora/training_loss.png)", ""]
    lines += _screenshots(out)
    lines += [
        "## Answers to the first test questions",
        "",
        "| question | reference | base | fine-tuned |",
        "|---|---|---|---|",
    ]
    for row in tuned[:8]:
        question = row["prompt"].rsplit("<|vision_end|>", 1)[-1].split("<|im_end|>")[0].strip()
        cells = [question, row["label"], base.get(row["index"], ""), row["predict"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    lines += [
        "",
        "## Where everything is",
        "",
        "- `configs/`: each stage's YAML, to rerun it by hand (`eqakit train configs/train.yaml`, ...)",
        "- `lora/`: the adapter, its checkpoints, `trainer_log.jsonl`",
        "- `base/`, `tuned/`, `merged_eval/`: predictions (`generated_predictions.jsonl`), scores and `report.md`",
        "- `merged/`: the merged model; `data/`: the prepared dataset; `synth/`: the rendered rooms",
        f"- `{SCREENSHOTS}/`: the web UI's tabs on this demo, when taken",
        f"- `{LOG_FILE}`: everything the stages printed",
        "",
    ]
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="eqakit demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument(
        "--episodes", type=int, default=EPISODES, help=f"synthetic episodes (default {EPISODES})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the rooms and the split")
    parser.add_argument(
        "--epochs",
        type=float,
        default=None,
        help=f"training epochs (default {TRAIN['num_train_epochs']}; fewer is quicker and weaker)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="delete the output directory first and start clean"
    )
    args = parser.parse_args(argv)
    out = args.output_dir
    if args.fresh and out.exists():
        if not ((out / "configs").is_dir() or (out / SETTINGS_FILE).is_file()) and any(out.iterdir()):
            raise EqakitError(f"--fresh refuses to delete {out}: it does not look like a demo directory")
        shutil.rmtree(out)
    run_demo(out, episodes=args.episodes, seed=args.seed, epochs=args.epochs)
    return 0
