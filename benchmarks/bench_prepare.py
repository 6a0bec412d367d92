"""Throughput of `eqakit prepare openeqa` against a bare decode-resize-encode loop in PIL.

    .venv/bin/python benchmarks/bench_prepare.py [--episodes 6] [--frames 30] [--workdir DIR] [--repeat 2]

Synthetic 1920x1080 PNG frames (noisy gradients, so PNG decoding costs what it costs on camera frames)
in OpenEQA's official layout. The reference is the loop a user would write: open each frame prepare
selects, convert to RGB, resize to the same size with the same filter, JPEG-encode at the same quality,
in one process. eqakit runs the whole command (validation, frame selection, resumable per-episode
writes, split, JSONL) with --workers 1 and with all cores. Outputs must agree byte for byte.
Prints source frames/s for each, the per-core time ratio (target: <= 1.3) and the multi-core speedup.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from eqakit.data.frames import RESAMPLE, FrameOptions, select_frames, target_size
from eqakit.data.openeqa_categories import OPENEQA_CATEGORIES
from eqakit.data.prepare import PrepareOptions, episode_slug, prepare_openeqa

SIZE = (1920, 1080)


def synth_frame(args: tuple[Path, int]) -> None:
    """One camera-like frame: smooth colour gradients plus sensor noise, saved as PNG (default level)."""
    path, seed = args
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : SIZE[1], 0 : SIZE[0]].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    channels = [127 + 100 * np.sin(x / (300 + 90 * c) + y / (500 - 70 * c) + phase[c]) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, (SIZE[1], SIZE[0], 3)).astype(np.float32)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, format="PNG")


def make_dataset(root: Path, episodes: int, frames: int, workers: int) -> tuple[Path, Path]:
    """Official layout under `root` (reused when already there)."""
    questions_file, frames_dir = root / "questions.json", root / "frames"
    histories = [f"hm3d-v0/{e:03d}-hm3d-bench{e}" for e in range(episodes)]
    jobs = []
    for e, history in enumerate(histories):
        (frames_dir / history).mkdir(parents=True, exist_ok=True)
        for i in range(frames):
            path = frames_dir / history / f"{i:05d}-rgb.png"
            if not path.exists():
                jobs.append((path, e * 1000 + i))
    if jobs:
        print(f"writing {len(jobs)} synthetic {SIZE[0]}x{SIZE[1]} PNG frames to {frames_dir} ...", flush=True)
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(synth_frame, jobs))
    questions = [
        {
            "question_id": f"{e}-{c}",
            "question": f"Question {c} about episode {e}?",
            "answer": "An answer.",
            "category": category,
            "episode_history": history,
        }
        for e, history in enumerate(histories)
        for c, category in enumerate(OPENEQA_CATEGORIES)
    ]
    questions_file.write_text(json.dumps(questions))
    return questions_file, frames_dir


def bare_loop(frames_dir: Path, options: FrameOptions) -> dict[str, bytes]:
    """The reference: PIL open -> RGB -> resize -> JPEG over the frames prepare selects, one process."""
    out = {}
    for folder in sorted(p for p in frames_dir.glob("*/*") if p.is_dir()):
        files = sorted(folder.glob("*-rgb.png"))
        for k, i in enumerate(select_frames(len(files), options.num_frames)):
            image = Image.open(files[i]).convert("RGB")
            size = target_size(*image.size, max_pixels=options.max_pixels, max_side=options.max_side)
            buf = io.BytesIO()
            image.resize(size, RESAMPLE).save(buf, format="JPEG", quality=options.quality)
            out[f"{episode_slug(folder.relative_to(frames_dir).as_posix())}/{k:03d}.jpg"] = buf.getvalue()
    return out


def timed(fn, repeat: int):
    """Best wall time and best CPU time of this process over `repeat` calls, and the last result.

    CPU time is what "per core" means on a shared machine: other processes' load inflates wall time
    but not it. (With --workers > 1 the work runs in child processes, so only wall time counts.)
    """
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--frames", type=int, default=30, help="source frames per episode")
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2, help="best of N timings")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the synthetic frames here between runs"
    )
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    questions, frames_dir = make_dataset(workdir, args.episodes, args.frames, cores)
    frame_options = FrameOptions(num_frames=args.num_frames)
    n_frames = args.episodes * min(args.num_frames, args.frames)

    t_bare, cpu_bare, reference = timed(lambda: bare_loop(frames_dir, frame_options), args.repeat)

    def prepare(workers: int) -> Path:
        out = workdir / f"out-{workers}"
        shutil.rmtree(out, ignore_errors=True)  # no reuse of finished episodes: measure the work
        options = PrepareOptions(frames=frame_options, workers=workers)
        prepare_openeqa(out, questions=questions, frames=frames_dir, options=options)
        return out

    results = {workers: timed(lambda w=workers: prepare(w), args.repeat) for workers in sorted({1, cores})}
    for workers, (_, _, out) in results.items():
        written = {
            p.relative_to(out / "open_eqa_frames").as_posix(): p.read_bytes() for p in out.rglob("*.jpg")
        }
        assert written == reference, f"prepare --workers {workers} wrote different JPEGs than the bare loop"

    (t_one, cpu_one, _), (t_all, _, _) = results[1], results[cores]
    size = target_size(*SIZE, max_pixels=frame_options.max_pixels)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {cores} cores, Python {platform.python_version()}"
    )
    print(
        f"{n_frames} source frames {SIZE[0]}x{SIZE[1]} PNG -> {size[0]}x{size[1]} JPEG q{frame_options.quality}"
    )
    print("outputs: identical JPEG bytes")
    for name, seconds, cpu in (
        ("bare PIL loop, 1 process", t_bare, cpu_bare),
        ("eqakit prepare --workers 1", t_one, cpu_one),
        (f"eqakit prepare --workers {cores}", t_all, None),
    ):
        cpu_text = f", CPU {cpu:6.2f} s" if cpu is not None else ""
        print(f"{name:<30} wall {seconds:6.2f} s{cpu_text:<15} {n_frames / seconds:6.1f} source frames/s")
    print(
        f"per-core ratio (prepare --workers 1 / bare loop): wall {t_one / t_bare:.2f}x, CPU {cpu_one / cpu_bare:.2f}x (target <= 1.3x)"
    )
    print(f"multi-core speedup ({cores} workers vs 1, wall): {t_one / t_all:.2f}x")
    if args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
