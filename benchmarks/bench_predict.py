"""Predict throughput: LLaMA-Factory's way against eqakit's engine, same model, same inputs, one process.

    .venv/bin/python benchmarks/bench_predict.py                      # tiny model, 4 episodes x 8 questions
    .venv/bin/python benchmarks/bench_predict.py --config benchmarks/configs/qwen3-vl-2b-instruct.config.json \\
        --text-layers 7 --episodes 2 --questions 4 --max-new-tokens 16 --dtype bfloat16
    python3 benchmarks/bench_predict.py --decode --config benchmarks/configs/qwen3-vl-2b-instruct.config.json \\
        --dtype bfloat16 --device cuda --rows rows.jsonl     # decode rate and syncs (gpu_check.sh)

Workload: OpenEQA-shaped, as `eqakit prepare` writes it: episodes of F camera-like frames (512x384:
192 visual tokens each, 1,536 per question at 8 frames), each asked several short questions.
Model: random weights, either the tiny test model (weights scaled so greedy answers vary with the
input) or a config such as Qwen3-VL-2B-Instruct's (``--text-layers`` cuts the depth, keeping the
vision:text ratio 24:28), with the tiny model's tokenizer (the config's special-token ids are
remapped to it; the vocabulary size, and so the lm_head cost, stays the config's).

Reference (what LLaMA-Factory's predict does): per batch of ``--batch-size`` samples, the processor
on each sample's text and frames, then ``model.generate`` over the left-padded batch; no reuse.
eqakit: `HFEngine.generate` (continuous batching, visual-feature cache, shared-prefix KV reuse) sized
as `eqakit train` predict sizes it (``--batch-size`` x (``--cutoff-len`` + new tokens) KV tokens),
then by count at the same batch size and at ``--engine-batch-size``. Greedy; outputs are compared token by token.
Also prints the FLOP floor of the work eqakit must do (each unique image through the vision tower
once, each unique prefix once, every suffix and decode step) at this CPU's measured matmul rate.

``--decode``: only eqakit's engine, at the tutorial's sampling (configs/eval_args.yaml: temperature
0.2, top_p 1.0, LLaMA-Factory's top_k 50, sampling on) and batch as predict sizes it from that
file's per_device_eval_batch_size 2 (a KV budget of 2 x (cutoff_len + max_new_tokens) tokens), every
row decoding ``--max-new-tokens`` (no end-of-sequence stop): decode tokens per second over the
decode steps alone (each step's time, the GPU drained at its end) and host-device synchronisations
per decode step, counted as tests/test_syncs.py counts them (`sync_count.SyncCounter`, two run
lengths differenced so prefill and start-up cancel) and, on CUDA, as CUDA itself reports them
(``torch.cuda.set_sync_debug_mode``: a warning at each synchronising call).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from eqakit.data.encode import ImageBudget, PromptFormat
from eqakit.data.template import render_prompt
from eqakit.engine import HFEngine, Request, SamplingParams
from eqakit.model.tiny import build_tiny_model

BUDGET = ImageBudget(32 * 32, 768 * 768)
REPO = Path(__file__).resolve().parents[1]
QUESTIONS = (
    "What color is the sofa?",
    "Where did I leave my keys?",
    "Is the kitchen light on?",
    "How many chairs are at the table?",
    "What is on the wall above the bed?",
    "Which room is the plant in?",
    "Can I sit on the ottoman?",
    "What is the rug made of?",
    "Is the window open?",
    "What is to the left of the television?",
    "Where is the laundry basket?",
)


def camera_frame(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour gradients plus sensor noise: costs what a camera frame costs to process."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    channels = [127 + 100 * np.sin(x / (60 + 20 * c) + y / (90 - 15 * c) + phase[c]) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def workload(episodes: int, questions: int, frames: int, size: tuple[int, int]) -> list[Request]:
    requests = []
    for episode in range(episodes):
        rng = np.random.default_rng(episode)
        images = [camera_frame(rng, *size) for _ in range(frames)]
        for q in range(questions):
            content = "<image>" * frames + QUESTIONS[(episode + q) % len(QUESTIONS)]
            requests.append(Request([{"role": "user", "content": content}], images=images))
    return requests


def build_model(args: argparse.Namespace, workdir: Path, device: str = "cpu") -> tuple[Any, Any]:
    """The model (random weights, built on ``device``: a GPU initialises the 2B's in a second) and
    the tiny model's processor."""
    tiny = build_tiny_model(workdir / "tiny")
    processor = AutoProcessor.from_pretrained(tiny)
    dtype = getattr(torch, args.dtype)
    if args.config is None:
        model = AutoModelForImageTextToText.from_pretrained(tiny, dtype=dtype)
        scale = 6.0 if args.weight_scale is None else args.weight_scale
    else:
        raw = json.loads(Path(args.config).read_text())
        ids = processor.tokenizer.convert_tokens_to_ids
        raw.update(
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
        raw["text_config"].update(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"))
        if args.text_layers:
            vision = raw["vision_config"]
            depth = max(
                1, round(args.text_layers * vision["depth"] / raw["text_config"]["num_hidden_layers"])
            )
            ratio = depth / vision["depth"]
            vision["deepstack_visual_indexes"] = sorted(
                {min(depth - 1, int(i * ratio)) for i in vision["deepstack_visual_indexes"]}
            )
            vision["depth"] = depth
            raw["text_config"]["num_hidden_layers"] = args.text_layers
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**raw)).to(dtype)
        model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
        model.generation_config.pad_token_id = ids("<|endoftext|>")
        scale = 1.0 if args.weight_scale is None else args.weight_scale
    if scale != 1.0:
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if weight.ndim >= 2 and "embed_tokens" not in name:
                    weight.mul_(scale)
    return model.eval(), processor


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def reference(model: Any, processor: Any, requests: list[Request], batch: int, new: int) -> list[list[int]]:
    """LLaMA-Factory's predict loop: processor per sample, HF generate over left-padded batches."""
    processor.tokenizer.padding_side = "left"
    eos = set(model.generation_config.eos_token_id)
    size = {"shortest_edge": BUDGET.min_pixels, "longest_edge": BUDGET.max_pixels}
    out: list[list[int]] = []
    with torch.inference_mode():
        for start in range(0, len(requests), batch):
            chunk = requests[start : start + batch]
            texts = [render_prompt(r.messages) for r in chunk]
            images = [im for r in chunk for im in r.images]
            inputs = processor(
                text=texts, images=images, images_kwargs={"size": size}, padding=True, return_tensors="pt"
            )
            generated = model.generate(**inputs.to(model.device), do_sample=False, max_new_tokens=new)
            width = inputs["input_ids"].shape[1]
            out += [until_eos(row[width:].tolist(), eos) for row in generated]
    return out


def breakdown(model: Any, processor: Any, requests: list[Request], args: argparse.Namespace) -> str:
    """Seconds in the vision tower, prompt prefill (prefixes and questions), decode steps and the rest,
    for the run `eqakit train` predict does (fresh caches), timed around the engine's own calls."""
    budget = args.batch_size * (args.cutoff_len + args.max_new_tokens)
    engine = HFEngine(
        model, processor, format=PromptFormat(budget=BUDGET), max_batch_size=64, max_batch_tokens=budget
    )
    spent = dict.fromkeys(("vision", "prefill", "decode"), 0.0)

    def timing(owner: Any, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def timed(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                spent[phase] += time.perf_counter() - start

        setattr(owner, name, timed)

    timing(engine.model, "image_features", "vision")
    scheduler = engine.scheduler()
    for name, phase in (("_extend", "prefill"), ("_prefill", "prefill"), ("step", "decode")):
        timing(scheduler.runner, name, phase)
    engine.scheduler = lambda: scheduler  # type: ignore[method-assign]
    start = time.perf_counter()
    engine.generate(requests)
    total = time.perf_counter() - start
    rest = total - sum(spent.values())
    return ", ".join(f"{k} {v:.1f} s" for k, v in spent.items()) + f", other {rest:.1f} s (of {total:.1f} s)"


def flop_floor(model: Any, requests: list[Request], engine: HFEngine, new: int) -> float:
    """Multiply-adds x2 of the work eqakit cannot avoid: unique images, unique prefixes, suffixes, decode."""
    text, vision = model.config.text_config, model.config.vision_config
    lm_params = sum(p.numel() for n, p in model.model.language_model.named_parameters() if "embed" not in n)
    vision_params = sum(p.numel() for p in model.model.visual.parameters())
    kv_width = text.num_attention_heads * text.head_dim
    prepared = [engine.prepare(r) for r in requests]
    images = {s.key: s for p in prepared for s in p.images}
    patches = sum(s.length * vision.spatial_merge_size**2 for s in images.values())
    per_image = [s.length * vision.spatial_merge_size**2 for s in images.values()]
    flops = 2 * vision_params * patches + sum(
        4 * vision.depth * vision.hidden_size * n * n for n in per_image
    )
    prefixes = {p.cuts[-1][1]: p.cuts[-1][0] for p in prepared if p.cuts}
    tokens = sum(prefixes.values()) + sum(p.length - (p.cuts[-1][0] if p.cuts else 0) for p in prepared)
    tokens += new * len(prepared)
    context = sum(p.length * new + new * new / 2 for p in prepared) + sum(
        n * n / 2 for n in prefixes.values()
    )
    flops += 2 * lm_params * tokens + 4 * text.num_hidden_layers * kv_width * context
    flops += 2 * text.hidden_size * text.vocab_size * new * len(prepared)  # logits at generated positions
    return flops


def matmul_rate(dtype: torch.dtype, device: str = "cpu") -> float:
    size = 2048 if device == "cpu" else 8192
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < 2.0:
        a @ b
        reps += 1
    sync()
    return 2 * size**3 * reps / (time.perf_counter() - start)


def write_dataset(requests: list[Request], root: Path) -> str:
    """The workload as a LLaMA-Factory dataset dir (alpaca rows, frames as JPEG files); its name."""
    rows, saved = [], {}
    for index, request in enumerate(requests):
        paths = []
        for image in request.images:
            if id(image) not in saved:
                path = root / "frames" / f"{len(saved):05d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path, quality=95)
                saved[id(image)] = path.relative_to(root).as_posix()
            paths.append(saved[id(image)])
        text = request.messages[0]["content"]
        rows.append({"instruction": text, "input": "", "output": f"answer {index}", "images": paths})
    (root / "bench.json").write_text(json.dumps(rows), encoding="utf-8")
    columns = {"prompt": "instruction", "query": "input", "response": "output", "images": "images"}
    (root / "dataset_info.json").write_text(
        json.dumps({"bench": {"file_name": "bench.json", "columns": columns}})
    )
    return "bench"


def versus_llamafactory(
    args: argparse.Namespace, model: Any, processor: Any, requests: list[Request]
) -> None:
    """The seed's eval_args.yaml (paths, new tokens and greedy decoding changed) run by
    `llamafactory-cli train` and by `eqakit train`, one after the other, on the same files."""
    from lf_runner import EQAKIT, llamafactory_cli, timed, write_yaml

    cli = llamafactory_cli()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model.save_pretrained(work / "model")
        processor.save_pretrained(work / "model")
        name = write_dataset(requests, work / "data")
        config = yaml.safe_load((REPO / "configs" / "eval_args.yaml").read_text(encoding="utf-8"))
        config.pop("adapter_name_or_path")
        config.update(
            model_name_or_path=str(work / "model"),
            dataset_dir=str(work / "data"),
            eval_dataset=name,
            max_new_tokens=args.max_new_tokens,
            per_device_eval_batch_size=args.batch_size,
            cutoff_len=args.cutoff_len,
            do_sample=False,  # greedy, so that the two tools' answers can be compared
        )
        runs, answers = {}, {}
        env = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
        for tool, command in (("LLaMA-Factory 0.9.5", [str(cli)]), ("eqakit", EQAKIT)):
            out = work / tool.split()[0]
            path = write_yaml(work / f"{out.name}.yaml", {**config, "output_dir": str(out)})
            runs[tool] = timed([*command, "train", str(path)], work / f"{out.name}.log", env)
            lines = (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
            answers[tool] = [json.loads(line)["predict"] for line in lines]
            print(
                f"{tool}: `train eval.yaml` {runs[tool].seconds:.1f} s, {len(requests) / runs[tool].seconds:.3f} "
                f"samples/s (whole command), peak RSS {runs[tool].peak_rss_gb:.2f} GB",
                flush=True,
            )
        lf, ours = runs["LLaMA-Factory 0.9.5"], runs["eqakit"]
        same = sum(a == b for a, b in zip(answers["eqakit"], answers["LLaMA-Factory 0.9.5"], strict=True))
        print(
            f"eqakit vs LLaMA-Factory: {lf.seconds / ours.seconds:.2f}x the speed (whole command), peak RSS "
            f"{ours.peak_rss_gb / lf.peak_rss_gb:.2f}x; same answers {same}/{len(requests)}",
            flush=True,
        )


class DecodeProbe:
    """`Runner.step` (one decode step for the whole batch) patched while in use: each step's rows and
    time (the device drained before and after it), and the syncs the counters saw inside it."""

    def __init__(self, sync: Callable[[], None]) -> None:
        from eqakit.engine.hf.runner import Runner

        self.runner_class, self.step, self.sync = Runner, Runner.step, sync
        self.steps: list[tuple[int, float]] = []  # (rows, seconds)
        self.inside: list[int] = []  # syncs counted inside each step (with a counter installed)
        self.counter: Any = None

    def __enter__(self) -> DecodeProbe:
        step = self.step

        def probed(runner: Any) -> None:
            rows, before = len(runner.rows), self.counter.total if self.counter else 0
            self.sync()
            start = time.perf_counter()
            step(runner)
            self.sync()
            self.steps.append((rows, time.perf_counter() - start))
            if self.counter is not None:
                self.inside.append(self.counter.total - before)

        self.runner_class.step = probed
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner_class.step = self.step


def decode(
    model: Any, processor: Any, requests: list[Request], args: argparse.Namespace, device: str
) -> dict:
    """``--decode``: decode tokens/s and syncs per decode step at the tutorial's sampling (see the
    module's docstring); returns the row gpu_check.sh tabulates."""
    from eqakit.config import load_config
    from eqakit.evaluate.predict import MAX_ROWS, kv_budget

    sys.path.insert(0, str(REPO / "tests"))
    from sync_count import SyncCounter

    overrides = [f"max_new_tokens={args.max_new_tokens}", f"cutoff_len={args.cutoff_len}"]
    cfg = load_config("train", str(REPO / "configs" / "eval_args.yaml"), overrides)
    base = SamplingParams.from_generating(cfg.generating)
    budget = kv_budget(cfg)
    engine = HFEngine(
        model,
        processor,
        format=PromptFormat(budget=BUDGET),
        max_batch_size=MAX_ROWS,
        max_batch_tokens=budget,
        eos_token_ids=[],  # every row decodes max_new_tokens: the same work whatever it samples
    )
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def asked(new: int) -> list[Request]:  # seeded per row, so runs repeat
        return [
            Request(r.messages, base.replace(max_new_tokens=new, seed=i), images=r.images)
            for i, r in enumerate(requests)
        ]

    engine.generate(asked(2))  # warm-up: kernels chosen, caches filled (prefill is not what is timed)
    with DecodeProbe(sync) as probe:
        start = time.perf_counter()
        engine.generate(asked(args.max_new_tokens))
        sync()
        whole = time.perf_counter() - start
    rows = sum(r for r, _ in probe.steps)
    seconds = sum(t for _, t in probe.steps)

    # syncs: two run lengths, differenced per decode step (prefill and start-up cancel), as
    # tests/test_syncs.py counts them; on CUDA also CUDA's own count of synchronising calls
    counted, on_cuda, steps = {}, {}, {}
    short, long = 4, 12
    for new in (short, long):
        with DecodeProbe(lambda: None) as probe_syncs, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with SyncCounter() as counter:
                    probe_syncs.counter = counter
                    engine.generate(asked(new))
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        counted[new], steps[new] = counter.total, len(probe_syncs.steps)
        on_cuda[new] = sum("synchronizing CUDA operation" in str(w.message) for w in caught)
    span = max(steps[long] - steps[short], 1)
    row = {
        "check": "predict",
        "setting": (
            f"eval_args.yaml sampling (temperature {base.temperature}, top_p {base.top_p}, top_k "
            f"{base.top_k}), {args.dtype}, {args.config and Path(args.config).stem or 'tiny model'}, {device}"
        ),
        "result": "ok",
        "requests": len(requests),
        "max_new_tokens": args.max_new_tokens,
        "kv_budget_tokens": budget,
        "decode_steps": len(probe.steps),
        "mean_rows": rows / max(len(probe.steps), 1),
        "decode_tokens_per_s": rows / seconds if seconds else float("nan"),
        "samples_per_s": len(requests) / whole,
        "syncs_per_step": (counted[long] - counted[short]) / span,
        "syncs_in_step_max": max(probe_syncs.inside, default=0),
        "cuda_syncs_per_step": (on_cuda[long] - on_cuda[short]) / span if cuda else None,
    }
    print(
        f"decode at the tutorial's sampling: {row['decode_tokens_per_s']:.1f} tokens/s over {len(probe.steps)} "
        f"steps of {row['mean_rows']:.1f} rows on average (KV budget {budget} tokens); {len(requests)} "
        f"requests in {whole:.1f} s; syncs per decode step {row['syncs_per_step']:.2f} counted "
        f"(at most {row['syncs_in_step_max']} inside one step)"
        + (f", {row['cuda_syncs_per_step']:.2f} by CUDA's sync debug mode" if cuda else ""),
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="model config JSON (random weights); default: the tiny test model")
    parser.add_argument("--text-layers", type=int, help="cut the language model to this many layers")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--weight-scale", type=float, help="scale random weights (default 6 for tiny, else 1)"
    )
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--questions", type=int, default=8, help="questions per episode")
    parser.add_argument("--frames", type=int, default=8, help="frames per episode")
    parser.add_argument("--frame-size", default="512x384", help="WxH of the prepared frames")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2, help="per_device_eval_batch_size (both ways)")
    parser.add_argument("--engine-batch-size", type=int, default=8, help="a second eqakit run at this batch")
    parser.add_argument("--cutoff-len", type=int, default=2048, help="cutoff_len (sizes predict's KV budget)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument(
        "--llamafactory",
        action="store_true",
        help="also run LLaMA-Factory 0.9.5 itself and `eqakit train` on the seed's eval YAML (installs .venv-lf)",
    )
    parser.add_argument(
        "--decode",
        action="store_true",
        help="only the engine at the tutorial's sampling: decode tokens/s and syncs per decode step",
    )
    parser.add_argument("--rows", type=Path, help="--decode: append the result as a JSON line (gpu_check.sh)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    with tempfile.TemporaryDirectory() as workdir:
        model, processor = build_model(args, Path(workdir), device)
    model = model.to(device)
    width, height = map(int, args.frame_size.split("x"))
    requests = workload(args.episodes, args.questions, args.frames, (width, height))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=False)
    for r in requests:
        r.params = params
    n = len(requests)
    print(
        f"{platform.processor() or platform.machine()} ({device}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.dtype}; model: {args.config or 'tiny'} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
        f"params); {args.episodes} episodes x {args.questions} questions, {args.frames} frames of "
        f"{args.frame_size}, max_new_tokens {args.max_new_tokens}",
        flush=True,
    )

    if args.decode:
        row = decode(model, processor, requests, args, device)
        if args.rows:
            with args.rows.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        return

    start = time.perf_counter()
    ref = reference(model, processor, requests, args.batch_size, args.max_new_tokens)
    ref_s = time.perf_counter() - start
    print(
        f"reference (HF generate, batch {args.batch_size}): {n / ref_s:.3f} samples/s ({ref_s:.1f} s)",
        flush=True,
    )

    engine = None
    budget = args.batch_size * (args.cutoff_len + args.max_new_tokens)  # what `eqakit train` predict uses
    runs = [(f"KV budget of batch {args.batch_size} = {budget} tokens, as predict sizes it", 64, budget)]
    runs += [
        (f"batch {b} by count", b, None) for b in dict.fromkeys([args.batch_size, args.engine_batch_size])
    ]
    for label, batch, tokens in runs:
        engine = HFEngine(
            model,
            processor,
            format=PromptFormat(budget=BUDGET),
            max_batch_size=batch,
            max_batch_tokens=tokens,
        )
        start = time.perf_counter()
        ours = [c.token_ids for c in engine.generate(requests)]
        ours_s = time.perf_counter() - start
        same = sum(a == b for a, b in zip(ours, ref, strict=True))
        print(
            f"eqakit engine ({label}): {n / ours_s:.3f} samples/s ({ours_s:.1f} s), "
            f"{ref_s / ours_s:.1f}x the reference; identical outputs: {same}/{n}",
            flush=True,
        )
    assert engine is not None
    print(
        f"where eqakit's time goes (KV-budget run): {breakdown(model, processor, requests, args)}", flush=True
    )
    flops = flop_floor(model, requests, engine, args.max_new_tokens)
    rate = matmul_rate(getattr(torch, args.dtype), device)
    print(
        f"FLOP floor: {flops / 1e9:.1f} GFLOP at the measured {rate / 1e9:.0f} GFLOP/s "
        f"({args.dtype} square matmul) = {flops / rate:.2f} s, {n / (flops / rate):.2f} samples/s",
        flush=True,
    )
    if args.llamafactory:
        versus_llamafactory(args, model, processor, requests)


if __name__ == "__main__":
    main()
