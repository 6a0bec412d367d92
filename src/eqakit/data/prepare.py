"""`eqakit prepare openeqa`: OpenEQA -> a LLaMA-Factory dataset directory, in one command.

    eqakit prepare openeqa --questions open-eqa-v0.json --frames frames/ --output-dir data/openeqa
    eqakit prepare openeqa --hf-dataset Embodied1/open-eqa --output-dir data/openeqa --workers 8

What it does, in order:
1. Read and validate the source (official layout or a Hugging Face copy): every question and every
   episode's frames folder. Problems are collected, not raised one by one.
2. ``--on-error fail`` (default): any problem stops here with all of them listed and nothing
   registered. ``skip``: bad questions and episodes are left out and listed in the summary.
3. Write each episode's frames once (``--num-frames`` evenly spaced, resized for the model's token grid (`--arch`), JPEG) over
   ``--workers`` processes; finished episodes from an earlier run with the same options are reused.
   Unreadable frames found here are handled like step 2's problems.
4. Split by episode (default: no scene in both splits, categories balanced) or by question (the seed
   tutorial's random split), deterministic from ``--seed``.
5. Write open_eqa_train_val.jsonl, open_eqa_test.jsonl, prepare_summary.json and, last,
   dataset_info.json (merged into an existing one), each atomically.

dataset_info.json carries the two datasets only when the directory is complete: a run removes them
before it changes anything and adds them back at the very end, so a failed or killed run never leaves
a registered dataset that is partial or silently wrong. Same inputs and options give byte-identical
JSONL and JPEG files, whatever ``--workers``.

Raises ConfigError for invalid options and DataError for unusable input.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eqakit.data.frames import (
    DEFAULT_TOKENS,
    MANIFEST,
    EpisodeJob,
    EpisodeResult,
    FrameOptions,
    finished_sizes,
    select_frames,
    visual_tokens,
    write_episode,
)
from eqakit.data.openeqa import Episode, HFSource, OfficialSource, Problem
from eqakit.data.openeqa_categories import OPENEQA_CATEGORIES
from eqakit.data.split import choose_test_split
from eqakit.errors import ConfigError, DataError
from eqakit.fsutil import disk_errors, write_text_atomic
from eqakit.model.arch import ARCHITECTURES
from eqakit.run_record import provenance, write_record

TRAIN, TEST = "open_eqa_train_val", "open_eqa_test"
FRAMES_DIR = "open_eqa_frames"
SUMMARY_FILE = "prepare_summary.json"
RECORD = "eqakit_run.json"  # the summary again, headed by `eqakit.run_record.provenance`
DATASET_INFO = "dataset_info.json"
# Registered exactly as in the seed tutorial.
COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "images": "images"}
# --as-video: each episode's frames are one video (a frame list), bound to one <video> placeholder.
VIDEO_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "videos": "videos"}


def dataset_entries(as_video: bool) -> dict[str, dict[str, Any]]:
    """Our two datasets' dataset_info.json entries, with an images or a videos column."""
    columns = VIDEO_COLUMNS if as_video else COLUMNS
    return {name: {"file_name": f"{name}.jsonl", "columns": dict(columns)} for name in (TRAIN, TEST)}


MAX_LISTED_PROBLEMS = 30
# Problems that make a whole episode unusable (the others concern one question).
_EPISODE_KINDS = {
    "missing_frames_folder",
    "no_frames",
    "broken_frame",
    "corrupt_image",
    "episode_id_collision",
}


@dataclass(frozen=True)
class PrepareOptions:
    """Everything `prepare_openeqa` can be told besides its source and output directory."""

    frames: FrameOptions = field(default_factory=FrameOptions)
    test_size: float = 0.15  # share of questions in open_eqa_test
    split_by: str = "episode"  # "episode": no scene in both splits; "question": the seed's random split
    seed: int = 42
    workers: int | None = None  # processes writing frames; None: all cores
    on_error: str = "fail"  # "fail": stop and register nothing; "skip": leave bad input out and report it
    as_video: bool = False  # rows hold each episode's frames as one video (<video>, videos column)

    def problems(self) -> list[str]:
        found = self.frames.problems()
        if not 0 < self.test_size < 1:
            found.append(f"--test-size must be between 0 and 1 (exclusive), got {self.test_size}")
        if self.split_by not in ("episode", "question"):
            found.append(f"--split-by must be 'episode' or 'question', got {self.split_by!r}")
        if self.workers is not None and self.workers < 1:
            found.append(f"--workers must be at least 1, got {self.workers}")
        if self.on_error not in ("fail", "skip"):
            found.append(f"--on-error must be 'fail' or 'skip', got {self.on_error!r}")
        return found


def prepare_openeqa(
    output_dir: str | Path,
    *,
    questions: str | Path | None = None,
    frames: str | Path | None = None,
    hf_dataset: str | None = None,
    hf_split: str = "train",
    options: PrepareOptions | None = None,
) -> dict[str, Any]:
    """Build the dataset directory from the official layout (questions + frames) or a HF dataset.

    Returns the summary also written to prepare_summary.json. Raises ConfigError for invalid options
    and DataError for unusable input (with ``on_error="fail"``, for any problem at all).
    """
    started = time.perf_counter()
    options = options or PrepareOptions()
    errors = options.problems()
    if hf_dataset is not None and (questions is not None or frames is not None):
        errors.append("pass either --hf-dataset or --questions/--frames, not both")
    elif hf_dataset is None and (questions is None or frames is None):
        errors.append("pass --questions FILE and --frames DIR (official layout), or --hf-dataset ID_OR_PATH")
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        errors.append(f"--output-dir {output_dir} exists and is not a directory")
    if errors:
        raise ConfigError("invalid prepare options:\n  " + "\n  ".join(errors))
    source = HFSource(hf_dataset, hf_split) if hf_dataset is not None else OfficialSource(questions, frames)
    workers = options.workers or _all_cores()
    out = Path(output_dir)

    loaded = source.load()
    problems = list(loaded.problems)
    ids, collisions = _episode_ids(loaded.episodes)
    problems += collisions
    bad = {p.episode_history for p in problems if p.kind in _EPISODE_KINDS}
    if options.on_error == "fail" and problems:
        raise DataError(_problem_report(problems, out))
    episodes = [e for e in loaded.episodes if e.episode_history not in bad]
    _check_splittable(episodes, options)

    out.mkdir(parents=True, exist_ok=True)
    _update_dataset_info(out / DATASET_INFO, register=False)
    frames_root = out / FRAMES_DIR
    frames_root.mkdir(exist_ok=True)
    _remove_leftovers(out, frames_root)
    run = _write_frames(source, episodes, ids, frames_root, options.frames, workers)
    problems += run.problems
    if options.on_error == "fail" and run.problems:
        raise DataError(_problem_report(problems, out))
    episodes = [e for e in episodes if e.episode_history in run.sizes]
    _check_splittable(episodes, options)

    test = choose_test_split(episodes, options.test_size, options.split_by, options.seed)
    rows: dict[str, list[dict[str, Any]]] = {TRAIN: [], TEST: []}
    for episode in episodes:
        folder = f"{FRAMES_DIR}/{ids[episode.episode_history]}"
        images = [f"{folder}/{i:03d}.jpg" for i in range(len(run.sizes[episode.episode_history]))]
        for q in episode.questions:
            rows[TEST if q.question_id in test else TRAIN].append(_row(q, images, options.as_video))
    for name, split_rows in rows.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split_rows)
        write_text_atomic(out / f"{name}.jsonl", text)
    _remove_stale_episodes(frames_root, {ids[e.episode_history] for e in episodes})

    summary = _summary(source, options, workers, loaded.records, episodes, rows, run, problems, ids, started)
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_record(out / RECORD, {**provenance("prepare"), **summary})
    _update_dataset_info(out / DATASET_INFO, register=True, as_video=options.as_video)
    print(_format_summary(summary, out))
    return summary


def _all_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def episode_slug(episode_history: str) -> str:
    """A readable folder name: 'hm3d-v0/000-hm3d-BFRyYbPCCPE' -> 'hm3d-v0__000-hm3d-BFRyYbPCCPE'."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", episode_history.strip("/").replace("/", "__"))
    return "_" + slug[1:] if slug.startswith(".") else slug  # dot names are reserved for temporary folders


def _episode_ids(episodes: list[Episode]) -> tuple[dict[str, str], list[Problem]]:
    """Folder name per episode; names that collide (ignoring case, for macOS and Windows) are problems."""
    ids = {e.episode_history: episode_slug(e.episode_history) for e in episodes}
    groups: dict[str, list[str]] = {}
    for history, slug in ids.items():
        groups.setdefault(slug.lower(), []).append(history)
    problems = []
    for members in groups.values():
        if len(members) > 1:
            for history in members:
                others = ", ".join(repr(m) for m in members if m != history)
                message = f"folder name {ids[history]!r} collides with episode(s) {others}; rename one episode_history"
                problems.append(Problem("episode_id_collision", message, history))
    return ids, problems


def _check_splittable(episodes: list[Episode], options: PrepareOptions) -> None:
    questions = sum(len(e.questions) for e in episodes)
    if options.split_by == "episode" and len(episodes) < 2:
        raise DataError(
            f"{len(episodes)} usable episode(s): an episode split needs at least 2 (or use --split-by question)"
        )
    if questions < 2:
        raise DataError(f"{questions} usable question(s): a train/test split needs at least 2")


@dataclass
class _FramesRun:
    sizes: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)  # per finished episode
    problems: list[Problem] = field(default_factory=list)
    fewer_frames: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0
    reused: int = 0
    seconds: float = 0.0


def _write_frames(
    source: OfficialSource | HFSource,
    episodes: list[Episode],
    ids: dict[str, str],
    frames_root: Path,
    options: FrameOptions,
    workers: int,
) -> _FramesRun:
    """Write every episode's frames (reusing finished ones) over `workers` processes, with a progress bar."""
    run = _FramesRun()

    def work() -> Iterator[tuple[Episode, EpisodeJob | EpisodeResult]]:
        """An episode's job, or its finished result when an earlier run made it from the same key.

        Lazy, so a HF source's frame bytes are read only shortly before a worker needs them."""
        for episode in episodes:
            indices = select_frames(episode.frame_count, options.num_frames)
            if len(indices) < options.num_frames:
                fewer = {"episode_history": episode.episode_history, "frames_available": episode.frame_count}
                run.fewer_frames.append(fewer)
            chosen = source.frames(episode, indices)
            key = {
                "options": asdict(options),
                "frames_available": episode.frame_count,
                "sources": [f.identity for f in chosen],
            }
            folder = frames_root / ids[episode.episode_history]
            sizes = finished_sizes(folder, key)
            if sizes is not None:
                yield episode, EpisodeResult(sizes=sizes, reused=True)
            else:
                refs, labels = tuple(f.ref for f in chosen), tuple(f.label for f in chosen)
                yield episode, EpisodeJob(str(folder), refs, labels, key, options)

    started = time.perf_counter()
    with tqdm(total=len(episodes), unit="episode", desc="prepare", dynamic_ncols=True) as bar:
        for episode, result in _execute(work(), workers):
            if result.error is not None:
                problem = Problem(
                    "corrupt_image", result.error, episode.episode_history, path=result.error_path
                )
                run.problems.append(problem)
            else:
                run.sizes[episode.episode_history] = result.sizes
                if result.reused:
                    run.reused += len(result.sizes)
                else:
                    run.written += len(result.sizes)
            run.seconds = time.perf_counter() - started
            bar.set_postfix_str(f"{run.written / max(run.seconds, 1e-9):.1f} frames/s", refresh=False)
            bar.update()
    return run


def _execute(
    work: Iterable[tuple[Episode, EpisodeJob | EpisodeResult]], workers: int
) -> Iterator[tuple[Episode, EpisodeResult]]:
    """Run the jobs, yielding results in input order, with at most 2 * workers jobs in flight."""
    if workers == 1:
        for episode, job in work:
            yield episode, write_episode(job) if isinstance(job, EpisodeJob) else job
        return
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_exit_with_parent
    )
    pending: deque[tuple[Episode, Future | EpisodeResult]] = deque()
    try:
        for episode, job in work:
            pending.append((episode, pool.submit(write_episode, job) if isinstance(job, EpisodeJob) else job))
            while pending and (len(pending) > 2 * workers or not isinstance(pending[0][1], Future)):
                yield _resolved(*pending.popleft())
        while pending:
            yield _resolved(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _exit_with_parent() -> None:
    """Pool initializer: end this worker as soon as the `prepare` process that started it is gone.

    A pool worker waits for jobs on a queue whose write end it holds itself, so when its parent is
    killed (``kill -9``, the OOM killer) it would wait forever, and with it multiprocessing's
    resource tracker, which exits only once every process holding its pipe has. A spawned child
    gets a parent sentinel: the read end of a pipe whose only write end the parent holds, so it
    becomes readable (EOF) when the parent dies, however it dies. A daemon thread blocks on it (no
    polling, no PID reuse, nothing Linux-only like PR_SET_PDEATHSIG, which also tracks the parent
    *thread*) and ends the process. The tracker then sees EOF and exits too. A worker ended
    mid-episode leaves at most a ``.tmp.`` or ``.old.`` folder, which the next run deletes.
    """
    parent = multiprocessing.parent_process()
    threading.Thread(target=_exit_when_gone, args=(parent,), name="exit-with-parent", daemon=True).start()


def _exit_when_gone(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()  # returns when the parent's sentinel reports EOF
    os._exit(1)


def _resolved(episode: Episode, result: Future | EpisodeResult) -> tuple[Episode, EpisodeResult]:
    return episode, result.result() if isinstance(result, Future) else result


def _row(q: Any, images: list[str], as_video: bool = False) -> dict[str, Any]:
    media = {"videos": [images]} if as_video else {"images": images}
    row = {
        "instruction": ("<video>" if as_video else "<image>" * len(images)) + q.question,
        "input": "",
        "output": q.answer,
        **media,
        "question_id": q.question_id,
        "category": q.category,
        "episode_history": q.episode_history,
    }
    if q.extra_answers:
        row["extra_answers"] = list(q.extra_answers)
    return row


def _update_dataset_info(path: Path, *, register: bool, as_video: bool = False) -> None:
    """Add (or remove) our two datasets, keeping any others a LLaMA-Factory data dir already lists."""
    info: dict[str, Any] = {}
    if path.exists():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path} exists but is not valid JSON ({exc}); fix or delete it") from exc
        if not isinstance(info, dict):
            raise DataError(f"{path} exists but is not a JSON object; fix or delete it")
    for name in (TRAIN, TEST):
        info.pop(name, None)
    if register:
        info.update(dataset_entries(as_video))
    if info:
        write_text_atomic(path, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    else:
        path.unlink(missing_ok=True)


def _remove_leftovers(out: Path, frames_root: Path) -> None:
    """Delete the temporary files and folders an interrupted run may have left behind."""
    for name in (*(f"{n}.jsonl" for n in (TRAIN, TEST)), SUMMARY_FILE, DATASET_INFO):
        for leftover in out.glob(f".{name}.*.tmp"):
            leftover.unlink()
    for prefix in (".tmp.", ".old."):
        for leftover in frames_root.glob(f"{prefix}*"):
            shutil.rmtree(leftover)


def _remove_stale_episodes(frames_root: Path, keep: set[str]) -> None:
    """Delete episode folders an earlier run wrote (they hold a manifest) that this dataset no longer uses."""
    for folder in frames_root.iterdir():
        if folder.is_dir() and folder.name not in keep and (folder / MANIFEST).is_file():
            shutil.rmtree(folder)


def _summary(
    source: OfficialSource | HFSource,
    options: PrepareOptions,
    workers: int,
    records: int,
    episodes: list[Episode],
    rows: dict[str, list[dict[str, Any]]],
    run: _FramesRun,
    problems: list[Problem],
    ids: dict[str, str],
    started: float,
) -> dict[str, Any]:
    splits = {}
    for name, split_rows in rows.items():
        categories = Counter(r["category"] for r in split_rows)
        splits[name] = {
            "episodes": len({r["episode_history"] for r in split_rows}),
            "questions": len(split_rows),
            "categories": {c: categories[c] for c in OPENEQA_CATEGORIES},
        }
    tokens = [
        sum(visual_tokens(*s, options.frames.token_side) for s in run.sizes[e.episode_history])
        for e in episodes
        for _ in e.questions
    ]
    sizes = Counter(f"{w}x{h}" for e in episodes for w, h in run.sizes[e.episode_history])
    questions_out = sum(len(split_rows) for split_rows in rows.values())
    seconds = time.perf_counter() - started
    return {
        "source": source.describe(),
        "options": {
            **asdict(options.frames),
            **{k: v for k, v in asdict(options).items() if k != "frames"},
            "workers": workers,
        },
        "splits": splits,
        "frames": {
            "written": run.written,
            "reused": run.reused,
            "sizes": dict(sorted(sizes.items())),
            "source_frames_per_second": round(run.written / run.seconds, 2) if run.seconds > 0 else None,
        },
        "visual_tokens_per_sample": {
            "min": min(tokens),
            "mean": round(sum(tokens) / len(tokens), 1),
            "max": max(tokens),
        },
        "episodes_with_fewer_frames": [
            {**f, "frames_used": f["frames_available"], "episode_id": ids[f["episode_history"]]}
            for f in run.fewer_frames
            if f["episode_history"] in run.sizes
        ],
        "skipped": {
            "questions": records - questions_out,
            "episodes": len({p.episode_history for p in problems if p.kind in _EPISODE_KINDS}),
        },
        "problem_counts": dict(sorted(Counter(p.kind for p in problems).items())),
        "problems": [p.to_json() for p in problems],
        "seconds": round(seconds, 2),
    }


def _format_summary(summary: dict[str, Any], out: Path) -> str:
    splits = summary["splits"]
    lines = [f"eqakit prepare: dataset written to {out}", f"  {'split':<28}{'episodes':>9}{'questions':>11}"]
    lines += [f"  {name:<28}{s['episodes']:>9}{s['questions']:>11}" for name, s in splits.items()]
    lines.append(f"  {'category':<28}{'train_val':>9}{'test':>11}{'test share':>12}")
    for c in OPENEQA_CATEGORIES:
        train, test = splits[TRAIN]["categories"][c], splits[TEST]["categories"][c]
        share = f"{test / (train + test):.1%}" if train + test else "-"
        lines.append(f"  {c:<28}{train:>9}{test:>11}{share:>12}")
    frames, tokens = summary["frames"], summary["visual_tokens_per_sample"]
    rate = frames["source_frames_per_second"]
    rate = f", {rate} source frames/s" if rate else ""
    sizes = ", ".join(f"{size} ({count})" for size, count in frames["sizes"].items())
    lines.append(f"  frames: {frames['written']} written, {frames['reused']} reused; sizes {sizes}{rate}")
    lines.append(
        f"  visual tokens per sample: min {tokens['min']}, mean {tokens['mean']}, max {tokens['max']}"
    )
    fewer = summary["episodes_with_fewer_frames"]
    if fewer:
        lines.append(
            f"  {len(fewer)} episode(s) had fewer frames than --num-frames {summary['options']['num_frames']}; all were used"
        )
    if summary["problems"]:
        skipped = summary["skipped"]
        counts = ", ".join(f"{k} {v}" for k, v in summary["problem_counts"].items())
        lines.append(
            f"  problems: {len(summary['problems'])} ({counts}); skipped {skipped['episodes']} episode(s), {skipped['questions']} question(s)"
        )
        lines += [f"    - {_describe(p)}" for p in summary["problems"][:MAX_LISTED_PROBLEMS]]
    lines.append(f"  time: {summary['seconds']:.1f} s; details in {out / SUMMARY_FILE}")
    return "\n".join(lines)


def _describe(problem: dict[str, str]) -> str:
    return str(Problem(**problem))


def _problem_report(problems: list[Problem], out: Path) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(Counter(p.kind for p in problems).items()))
    lines = [f"{len(problems)} problem(s) in the input ({counts}):"]
    lines += [f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    lines.append(
        f"Nothing was registered in {out / DATASET_INFO}. Fix the input, or rerun with --on-error skip to leave these out."
    )
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    """`eqakit prepare openeqa ...`: parse the command line and run `prepare_openeqa`."""
    parser = argparse.ArgumentParser(
        prog="eqakit prepare", description="Build a LLaMA-Factory dataset directory."
    )
    datasets = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    p = datasets.add_parser(
        "openeqa",
        help="OpenEQA (official layout or a Hugging Face copy)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults, frame_defaults = PrepareOptions(), FrameOptions()
    source = p.add_argument_group("source: official layout (--questions and --frames) or --hf-dataset")
    source.add_argument(
        "--questions", type=Path, metavar="FILE", help="open-eqa-v0.json: a JSON list of questions"
    )
    source.add_argument(
        "--frames", type=Path, metavar="DIR", help="folder holding <episode_history>/*-rgb.png"
    )
    source.add_argument(
        "--hf-dataset",
        metavar="ID_OR_PATH",
        help="hub id (e.g. Embodied1/open-eqa), saved dataset dir, parquet file or glob",
    )
    source.add_argument(
        "--hf-split", metavar="SPLIT", default="train", help="split of --hf-dataset (default: %(default)s)"
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        metavar="DIR",
        required=True,
        help="dataset directory to write (may already exist)",
    )
    frames = p.add_argument_group("frames")
    frames.add_argument(
        "--num-frames",
        metavar="N",
        type=int,
        default=frame_defaults.num_frames,
        help="frames per episode, evenly spaced (default: %(default)s)",
    )
    frames.add_argument(
        "--max-pixels",
        metavar="N",
        type=int,
        default=None,
        help=f"max frame area (default: {DEFAULT_TOKENS} visual tokens: {frame_defaults.max_pixels} pixels for "
        "Qwen3-VL's 32x32-pixel tokens, 153664 for Qwen2.5-VL's 28x28)",
    )
    frames.add_argument(
        "--arch",
        choices=list(ARCHITECTURES),
        default="qwen3_vl",
        help="the model the frames are for: their sides are multiples of its visual token's "
        "(32 pixels for Qwen3-VL, 28 for Qwen2.5-VL) so its processor never resizes them (default: %(default)s)",
    )
    frames.add_argument(
        "--max-side",
        metavar="N",
        type=int,
        default=None,
        help="max frame width or height (default: no limit)",
    )
    frames.add_argument(
        "--quality",
        metavar="Q",
        type=int,
        default=frame_defaults.quality,
        help="JPEG quality 1-100 (default: %(default)s)",
    )
    frames.add_argument(
        "--as-video",
        action="store_true",
        help="rows hold each episode's frames as one video (<video> and a videos column of frame lists) "
        "instead of --num-frames images; train with video_fps/video_max_pixels",
    )
    split = p.add_argument_group("split")
    split.add_argument(
        "--test-size",
        metavar="F",
        type=float,
        default=defaults.test_size,
        help="share of questions in the test split (default: %(default)s)",
    )
    split.add_argument(
        "--split-by",
        choices=("episode", "question"),
        default=defaults.split_by,
        help="episode: no scene in both splits (default); question: random questions, as in the seed tutorial",
    )
    split.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=defaults.seed,
        help="seed of the split (default: %(default)s)",
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--workers", metavar="N", type=int, default=None, help="processes writing frames (default: all cores)"
    )
    run.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default=defaults.on_error,
        help="fail: stop and list every problem (default); skip: leave bad questions/episodes out and report them",
    )
    args = parser.parse_args(argv)
    side = ARCHITECTURES[args.arch].token_side
    options = PrepareOptions(
        frames=FrameOptions(
            num_frames=args.num_frames,
            max_pixels=args.max_pixels if args.max_pixels is not None else DEFAULT_TOKENS * side * side,
            token_side=side,
            max_side=args.max_side,
            quality=args.quality,
        ),
        test_size=args.test_size,
        split_by=args.split_by,
        seed=args.seed,
        workers=args.workers,
        on_error=args.on_error,
        as_video=args.as_video,
    )
    with disk_errors(args.output_dir, lambda: "the episodes already written are reused"):
        prepare_openeqa(
            args.output_dir,
            questions=args.questions,
            frames=args.frames,
            hf_dataset=args.hf_dataset,
            hf_split=args.hf_split,
            options=options,
        )
    return 0
