"""Images or video, and how many frames: the same rooms, the same training, the same visual-token budget.

    .venv/bin/python benchmarks/bench_video.py                     # the demo's 200 rooms, 8 epochs
    .venv/bin/python benchmarks/bench_video.py --episodes 80 --epochs 4 --workdir /tmp/bench-video

The question researchers ask of an embodied-QA model: does seeing an episode as a video (Qwen3-VL's
temporal patches, timestamps between them) beat seeing it as separate images, and do more frames
at a lower resolution beat fewer sharper ones, at equal cost? Three arms on the demo's synthetic
rooms (`eqakit synth`), one episode split, each trained and evaluated exactly as `eqakit demo` does
(its tiny model, LoRA settings and epochs):

- ``images8``: 8 frames as 8 images of 128x96 (12 visual tokens each: 96 per question);
- ``video8``: the 8 frames as one video at 192x128 (4 temporal patches of 24 tokens: 96);
- ``video16``: 16 frames as one video at 128x96 (8 temporal patches of 12 tokens: 96).

Prints, per arm: visual and text tokens per question (text: the question, the template and a
video's timestamps), training and predict time, exact match and
token F1 on the held-out episodes, beside the blind baseline (each question's most common training
answer: what a model that never looks at the frames scores). Not a test: a run takes tens of
minutes on 2 CPU cores. Every arm runs in this process, one after the other; run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer

from eqakit.config import load_config
from eqakit.data.frames import FrameOptions
from eqakit.data.prepare import PrepareOptions, prepare_openeqa
from eqakit.demo.pipeline import EM, PREDICT, TINY_SIZES, TORCH_THREADS, TRAIN, blind_baseline
from eqakit.demo.synth import generate
from eqakit.evaluate.predict import run_predict
from eqakit.model.tiny import build_tiny_model
from eqakit.train.sft import run_train

F1 = "predict_token_f1"
# arm -> (frames per episode, frame area written by prepare, as a video)
ARMS: dict[str, tuple[int, int, bool]] = {
    "images8": (8, 128 * 96, False),
    "video8": (8, 192 * 128, True),
    "video16": (16, 128 * 96, True),
}


def _arm(name: str, work: Path, model: Path, synth: Path, seed: int, epochs: float) -> dict[str, Any]:
    frames, pixels, as_video = ARMS[name]
    data, lora, tuned = (work / name / part for part in ("data", "lora", "tuned"))
    if not (data / "dataset_info.json").is_file():
        options = PrepareOptions(
            frames=FrameOptions(num_frames=frames, max_pixels=pixels), seed=seed, as_video=as_video
        )
        prepare_openeqa(data, questions=synth / "open-eqa-v0.json", frames=synth / "frames", options=options)
    # the processor keeps the frames prepare wrote (no resize): the arms differ only in layout
    media = {"video_max_pixels": pixels, "image_max_pixels": pixels}
    common = {"model_name_or_path": str(model), "dataset_dir": str(data), **media}
    train = {**common, **TRAIN, "num_train_epochs": epochs, "output_dir": str(lora)}
    started = time.perf_counter()
    if not (lora / "adapter_model.safetensors").is_file():
        run_train(load_config("train", extra={**train, "overwrite_output_dir": True}))
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    predict = {**common, **PREDICT, "adapter_name_or_path": str(lora), "output_dir": str(tuned)}
    if not (tuned / "predict_results.json").is_file():
        run_predict(load_config("train", extra=predict))
    predict_s = time.perf_counter() - started
    record = json.loads((lora / "eqakit_run.json").read_text())["data"]
    results = json.loads((tuned / "predict_results.json").read_text())
    blind = blind_baseline(data)
    rows = [json.loads(line) for line in (tuned / "generated_predictions.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model)
    pads = set(tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"]))
    text = [
        sum(t not in pads for t in tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
        for r in rows
    ]
    return {
        "visual_tokens": record["image_tokens_per_sample"]["mean"],
        "text_tokens": statistics.mean(text),
        "train_s": train_s,
        "predict_s": predict_s,
        "em": results[EM],
        "f1": results[F1],
        "blind_em": blind[EM],
        "blind_f1": blind[F1],
        "questions": results.get("predict_samples"),
    }


# Run in LLaMA-Factory's venv: its own loader (dataset_info.json, the qwen3_vl_nothink template, its
# Qwen3-VL plugin) on a dataset dir; prints the token ids of the first N rows, one "IDS [...]" line each.
LF_LOADER = r"""
import json, sys, tempfile
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
model, data, dataset, n, pixels = sys.argv[1:6]
args = dict(stage="sft", do_train=True, model_name_or_path=model, dataset=dataset, dataset_dir=data,
            template="qwen3_vl_nothink", cutoff_len=4096, output_dir=tempfile.mkdtemp(), finetuning_type="lora",
            report_to="none", overwrite_cache=True, max_samples=int(n), video_max_pixels=int(pixels),
            image_max_pixels=int(pixels))
model_args, data_args, training_args, _, _ = get_train_args(args)
tokenizer_module = load_tokenizer(model_args)
template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
rows = get_dataset(template, model_args, data_args, training_args, "sft", **tokenizer_module)["train_dataset"]
for row in rows:
    print("IDS", json.dumps(row["input_ids"]))
"""


def versus_llamafactory(work: Path, model: Path, rows: int = 8) -> None:
    """LLaMA-Factory 0.9.5's loader on each arm's directory: the rows' tokens against eqakit's.

    Both expand each frame pair into the same visual tokens and timestamps, without an outer
    ``<|vision_start|>``/``<|vision_end|>`` pair around a video (Qwen's layout: transformers 4.57 and
    >= 5.25; 5.19-5.24's Qwen3VLProcessor added one).
    """
    import subprocess

    from lf_runner import LF_VENV, llamafactory_cli
    from transformers import AutoConfig, AutoProcessor

    from eqakit.data.dataset import load_samples
    from eqakit.data.encode import Geometry, PadIds, PromptFormat, VideoBudget, expand_tokens, plan_sample
    from eqakit.data.video import probe

    llamafactory_cli()  # installs LLaMA-Factory 0.9.5 into .venv-lf the first time
    processor = AutoProcessor.from_pretrained(model)
    geometry = Geometry.of(AutoConfig.from_pretrained(model))
    pads = PadIds.of(processor.tokenizer)
    for name, (_, pixels, _) in ARMS.items():
        data = work / name / "data"
        lf = subprocess.run(
            [str(LF_VENV / "bin" / "python"), "-c", LF_LOADER, str(model), str(data), "open_eqa_train_val", str(rows), str(pixels)],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        theirs = [json.loads(line[4:]) for line in lf if line.startswith("IDS ")]
        budget = VideoBudget(max_pixels=pixels)
        fmt = PromptFormat(cutoff_len=4096, video=budget)
        same = 0
        for sample, lf_ids in zip(
            load_samples("open_eqa_train_val", data, max_samples=rows), theirs, strict=True
        ):
            videos = [probe(v, budget.fps, budget.maxlen) for v in sample.videos]
            sizes = [Image.open(p).size for p in sample.images]
            plan = plan_sample(
                sample.messages, sizes, processor.tokenizer, fmt, videos=videos, geometry=geometry
            )
            ours = expand_tokens(plan, pads)["input_ids"].tolist()
            same += ours == lf_ids
        print(f"LLaMA-Factory's loader on {name}: {len(theirs)} rows; the same token ids as eqakit's: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-video"))
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=TRAIN["num_train_epochs"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument(
        "--llamafactory",
        action="store_true",
        help="also read each arm's directory with LLaMA-Factory 0.9.5's loader (.venv-lf) and compare tokens",
    )
    args = parser.parse_args()
    torch.set_num_threads(TORCH_THREADS)
    work = args.workdir / f"e{args.episodes}-x{args.epochs:g}-s{args.seed}"
    model, synth = work / "model", work / "synth"
    if not (model / "config.json").is_file():
        build_tiny_model(model, seed=args.seed, overwrite=model.exists(), **TINY_SIZES)
    if not (synth / "open-eqa-v0.json").is_file():
        generate(synth, episodes=args.episodes, seed=args.seed, overwrite=synth.exists())
    results = {}
    for name in args.arms.split(","):
        print(f"\n=== {name} ===", flush=True)
        results[name] = _arm(name, work, model, synth, args.seed, args.epochs)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    load = os.getloadavg()[0]
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f}; "
          f"{args.episodes} rooms, {args.epochs:g} epochs; {results[next(iter(results))]['questions']} test questions")  # fmt: skip
    header = f"{'arm':<9}{'visual tok':>11}{'text tok':>9}{'train s':>9}{'predict s':>10}{'EM':>7}{'F1':>7}"
    print(header)
    for name, r in results.items():
        print(
            f"{name:<9}{r['visual_tokens']:>11.0f}{r['text_tokens']:>9.0f}{r['train_s']:>9.0f}"
            f"{r['predict_s']:>10.0f}{r['em']:>7.1f}{r['f1']:>7.1f}"
        )
    first = next(iter(results.values()))
    print(f"{'blind':<9}{'-':>11}{'-':>9}{'-':>9}{'-':>10}{first['blind_em']:>7.1f}{first['blind_f1']:>7.1f}")
    print("(times of a stage found done by an earlier run are ~0: delete the workdir for a timed run)")
    if args.llamafactory:
        versus_llamafactory(work, model)


if __name__ == "__main__":
    main()
