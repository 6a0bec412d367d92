"""`eqakit synth`: synthetic embodied-QA data in OpenEQA's official layout.

The demo and the tests need OpenEQA-shaped data that can be made anywhere in seconds: real OpenEQA
frames come from HM3D and ScanNet under their own terms and cannot be downloaded here. Each episode
is a rendered room seen by a panning camera (scenes.py, render.py) with about 11 questions over the 7 OpenEQA
categories whose answers depend on what the frames show (questions.py). The output looks like the
real thing, quirks included, so `eqakit prepare openeqa` is exercised as it will be on real data:

    DIR/open-eqa-v0.json                                    # [{question, answer, category, question_id,
                                                            #   episode_history, [extra_answers]}, ...]
    DIR/frames/hm3d-v0/000-hm3d-<11 chars>/00000-rgb.png    # HM3D-style: five-digit frame numbers
    DIR/frames/scannet-v0/021-scannet-scene0423_00/000000-rgb.png   # ScanNet-style: six digits
    ... and in some episodes NNNNN-depth.png and NNNNN.txt (pose) beside the frames, as in the real data.

Same seed and options give byte-identical files. Everything is written into a temporary directory
next to DIR and renamed into place at the end, so an interrupted run leaves no partial dataset.

    eqakit synth --output-dir data/synth --episodes 40 --seed 0
    eqakit synth --output-dir data/synth-hd --frame-size 1920x1080 --overwrite
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from eqakit.demo.questions import SceneQuestion, ask
from eqakit.demo.render import depth_frame, pose_text, render_frames
from eqakit.demo.scenes import Scene, sample_scene
from eqakit.errors import ConfigError, DataError
from eqakit.fsutil import move_into_place

QUESTIONS_FILE = "open-eqa-v0.json"
MIN_SIDE, MAX_SIDE = 32, 4096
DISTRACTOR_EVERY = 3  # episodes 0, 3, 6... get depth and pose files beside some frames
PNG_LEVEL = 3  # zlib level: within a few percent of level 6's size here, at about half the time


def generate(
    output_dir: Path,
    episodes: int = 40,
    seed: int = 0,
    frame_size: tuple[int, int] = (320, 240),
    overwrite: bool = False,
    workers: int | None = None,
) -> Path:
    """Write a synthetic OpenEQA dataset to `output_dir` and return the path of its questions file.

    Episodes are rendered by `workers` threads (default: one per core); PNG encoding is most of
    the time. Raises ConfigError for bad options and DataError when `output_dir` is a file or is
    not empty (unless `overwrite`, which replaces it).
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    _check_options(episodes, frame_size, workers)
    output_dir = Path(output_dir)
    _check_destination(output_dir, overwrite)
    plans = [_plan_episode(seed, index, hm3d=index < (episodes + 1) // 2) for index in range(episodes)]

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    staging = scratch / "data"  # made by mkdir, so it gets the usual permissions, not mkdtemp's 0700
    try:
        staging.mkdir()
        jobs = [
            (staging / "frames" / history, scene, frame_size, index % DISTRACTOR_EVERY == 0)
            for index, (history, scene, _) in enumerate(plans)
        ]
        _render_all(jobs, workers)
        rows = [_row(q, qid, history) for history, _, questions in plans for q, qid in questions]
        _write_text(staging / QUESTIONS_FILE, json.dumps(rows, indent=4, ensure_ascii=False))
        move_into_place(staging, output_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return output_dir / QUESTIONS_FILE


def _check_options(episodes: int, frame_size: tuple[int, int], workers: int) -> None:
    problems = []
    if episodes < 1:
        problems.append(f"episodes must be at least 1, got {episodes}")
    if workers < 1:
        problems.append(f"workers must be at least 1, got {workers}")
    width, height = frame_size
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        problems.append(
            f"frame size must be between {MIN_SIDE} and {MAX_SIDE} pixels a side, got {width}x{height}"
        )
    elif not 0.5 <= width / height <= 3.0:
        problems.append(f"frame aspect ratio must be between 1:2 and 3:1, got {width}x{height}")
    if problems:
        raise ConfigError("; ".join(problems))


def _check_destination(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"output path {output_dir} is a file, not a directory; choose another --output-dir")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise DataError(
            f"output directory {output_dir} is not empty; pass --overwrite to replace it or choose another --output-dir"
        )


def _plan_episode(seed: int, index: int, hm3d: bool) -> tuple[str, Scene, list[tuple[SceneQuestion, str]]]:
    """Scene, questions and ids of one episode, from its own random stream (seed, episode index)."""
    rng = random.Random(f"eqakit-synth:{seed}:{index}")
    if hm3d:
        history = (
            f"hm3d-v0/{index:03d}-hm3d-{''.join(rng.choices(string.ascii_letters + string.digits, k=11))}"
        )
    else:
        history = f"scannet-v0/{index:03d}-scannet-scene0{rng.randrange(807):03d}_0{rng.randrange(3)}"
    scene = sample_scene(rng)
    questions = [(q, str(uuid.UUID(int=rng.getrandbits(128), version=4))) for q in ask(scene, rng)]
    return history, scene, questions


def _row(question: SceneQuestion, question_id: str, history: str) -> dict:
    """One entry of open-eqa-v0.json, keys in the real file's order."""
    row = {
        "question": question.question,
        "answer": question.answer,
        "category": question.category,
        "question_id": question_id,
        "episode_history": history,
    }
    if question.extra_answers:
        row["extra_answers"] = list(question.extra_answers)
    return row


def _render_all(jobs: list[tuple[Path, Scene, tuple[int, int], bool]], workers: int) -> None:
    """Write every episode's frames, in worker threads when there is more than one episode and worker."""
    total = sum(scene.frames for _, scene, _, _ in jobs)
    with tqdm(total=total, unit="frame", desc="eqakit synth") as progress:
        if workers == 1 or len(jobs) == 1:
            for job in jobs:
                progress.update(_write_frames(*job))
            return
        # threads, not processes: Pillow releases the GIL while it draws and encodes
        pool = ThreadPoolExecutor(min(workers, len(jobs)))
        try:
            for done in as_completed([pool.submit(_write_frames, *job) for job in jobs]):
                progress.update(done.result())
        finally:
            pool.shutdown(cancel_futures=True)  # on an error or Ctrl-C, don't render the rest


def _write_frames(folder: Path, scene: Scene, size: tuple[int, int], distractors: bool) -> int:
    """Render one episode into `folder`; return the number of frames written."""
    folder.mkdir(parents=True)
    digits = 5 if folder.parent.name == "hm3d-v0" else 6
    for index, (frame, cam) in enumerate(render_frames(scene, size)):
        stem = f"{index:0{digits}d}"
        frame.save(folder / f"{stem}-rgb.png", format="PNG", compress_level=PNG_LEVEL)
        if distractors and index % 5 == 0:
            depth_frame(cam, size).save(folder / f"{stem}-depth.png", format="PNG", compress_level=PNG_LEVEL)
            _write_text(folder / f"{stem}.txt", pose_text(cam))
    return scene.frames


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _frame_size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 320x240 or 1920x1080, got {text!r}")
    return int(width), int(height)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="eqakit synth",
        description="Generate synthetic embodied-QA data in OpenEQA's official layout "
        "(open-eqa-v0.json + frames/<episode_history>/*-rgb.png).",
    )
    parser.add_argument(
        "--output-dir", type=Path, required=True, help="directory to create (must be empty or absent)"
    )
    parser.add_argument("--episodes", type=int, default=40, help="number of episodes (rooms), default 40")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument(
        "--frame-size",
        type=_frame_size,
        default=(320, 240),
        metavar="WxH",
        help="frame size in pixels, default 320x240 (real OpenEQA frames are 1296x968 to 1920x1080)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--workers", type=int, default=None, help="rendering threads, default: one per core")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = generate(args.output_dir, args.episodes, args.seed, args.frame_size, args.overwrite, args.workers)
    rows = json.loads(path.read_text(encoding="utf-8"))
    print(
        f"wrote {len(rows)} questions over {args.episodes} episodes to {path} "
        f"(frames in {args.output_dir / 'frames'}) in {time.perf_counter() - start:.1f} s"
    )
    return 0
