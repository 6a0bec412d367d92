"""`eqakit prepare openeqa` end to end: both sources, output schema, determinism, resume, splits."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eqakit.cli import main
from eqakit.data.frames import (
    FrameError,
    FrameOptions,
    convert_frame,
    select_frames,
    target_size,
    visual_tokens,
)
from eqakit.data.openeqa import group_episodes, parse_questions
from eqakit.data.openeqa_categories import OPENEQA_CATEGORIES
from eqakit.data.prepare import PrepareOptions, episode_slug, prepare_openeqa
from eqakit.data.split import choose_test_split, split_episodes

REAL_QUESTIONS = Path("/work/shared/openeqa/open-eqa-v0.json")
SEED_ENTRY = {
    "file_name": None,
    "columns": {"prompt": "instruction", "query": "input", "response": "output", "images": "images"},
}
# (episode_history, number of rgb frames, digits in frame names)
EPISODES = [
    ("hm3d-v0/000-hm3d-BFRyYbPCCPE", 20, 5),
    ("scannet-v0/002-scannet-scene0709_00", 13, 6),
    ("hm3d-v0/001-hm3d-wcojb4TFT35", 5, 5),  # fewer than 8: all are used
    ("scannet-v0/189-scannet-scene0500_00", 9, 6),
]


@functools.cache
def frame_png(episode: int, index: int, size: tuple[int, int] = (160, 120)) -> bytes:
    """A frame whose red level encodes its index (index * 8) and green level its episode."""
    rng = np.random.default_rng(episode * 1000 + index)
    pixels = np.empty((size[1], size[0], 3), dtype=np.int16)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = index * 8, 40 * episode, 128
    pixels += rng.integers(-3, 4, pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_questions(episodes: list[tuple[str, int, int]], per_episode: int = 4) -> list[dict]:
    questions = []
    for e, (history, _, _) in enumerate(episodes):
        for i in range(per_episode):
            q = {
                "question": f"What is object {i} in room {e}?",
                "answer": f"Thing {e}-{i}",
                "category": OPENEQA_CATEGORIES[(e + i) % len(OPENEQA_CATEGORIES)],
                "question_id": f"q-{e}-{i}",
                "episode_history": history,
            }
            if i == 0:
                q["extra_answers"] = [f"thing {e}", "a thing", "it", ""]
            questions.append(q)
    return questions


def write_official(
    root: Path, episodes: list[tuple[str, int, int]] = EPISODES, size: tuple[int, int] = (160, 120)
) -> tuple[Path, Path]:
    """OpenEQA's official layout: questions JSON + frames/<episode_history>/NNNNN-rgb.png (+ depth, pose)."""
    frames = root / "frames"
    for e, (history, count, digits) in enumerate(episodes):
        folder = frames / history
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"{i:0{digits}d}-rgb.png").write_bytes(frame_png(e, i, size))
        (folder / f"{0:0{digits}d}-depth.png").write_bytes(b"not an rgb frame: never read")
        (folder / f"{0:0{digits}d}.txt").write_text("pose")
    questions = root / "open-eqa-v0.json"
    questions.write_text(json.dumps(make_questions(episodes), indent=2))
    return questions, frames


def run(*args: str) -> int:
    return main(["prepare", "openeqa", *args])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of a dataset dir except the summary and the run record (which record times)."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("prepare_summary.json", "eqakit_run.json")
    }


def test_official_layout_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    questions, frames = write_official(tmp_path)
    out = tmp_path / "data"
    options = ["--max-pixels", "4096", "--workers", "1", "--test-size", "0.25"]
    assert (
        run("--questions", str(questions), "--frames", str(frames), "--output-dir", str(out), *options) == 0
    )

    info = json.loads((out / "dataset_info.json").read_text())
    assert info == {
        name: {**SEED_ENTRY, "file_name": f"{name}.jsonl"} for name in ("open_eqa_train_val", "open_eqa_test")
    }
    train, test = read_jsonl(out / "open_eqa_train_val.jsonl"), read_jsonl(out / "open_eqa_test.jsonl")
    assert len(train) + len(test) == 16 and test
    assert not {r["episode_history"] for r in train} & {r["episode_history"] for r in test}
    source = {q["question_id"]: q for q in json.loads(questions.read_text())}
    for row in train + test:
        q = source[row["question_id"]]
        e = next(i for i, ep in enumerate(EPISODES) if ep[0] == q["episode_history"])
        history, count, _ = EPISODES[e]
        expected = select_frames(count, 8)
        slug = episode_slug(history)
        assert row["images"] == [f"open_eqa_frames/{slug}/{i:03d}.jpg" for i in range(len(expected))]
        assert row["instruction"] == "<image>" * len(expected) + q["question"]
        assert (row["input"], row["output"], row["category"]) == ("", q["answer"], q["category"])
        assert row["episode_history"] == history
        assert row.get("extra_answers") == q.get("extra_answers")
        for path, source_index in zip(row["images"], expected, strict=True):
            with Image.open(out / path) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
                red, green, _ = np.asarray(image, dtype=float).reshape(-1, 3).mean(axis=0)
            assert abs(red - source_index * 8) < 3 and abs(green - 40 * e) < 3  # the right source frame
    assert episode_slug(EPISODES[0][0]) == "hm3d-v0__000-hm3d-BFRyYbPCCPE"

    summary = json.loads((out / "prepare_summary.json").read_text())
    made = json.loads((out / "eqakit_run.json").read_text())  # the run record: the summary, traced
    assert (
        made["stage"] == "prepare"
        and made["eqakit"]
        and made["torch"]
        and made["frames"] == summary["frames"]
    )
    assert summary["frames"] == {
        **summary["frames"],
        "written": 8 + 8 + 5 + 8,
        "reused": 0,
        "sizes": {"64x64": 29},
    }
    splits = summary["splits"]
    assert splits["open_eqa_test"]["questions"] == len(test) and splits["open_eqa_train_val"]["episodes"] == 3
    assert sum(splits["open_eqa_train_val"]["categories"].values()) == len(train)
    tokens = sorted(sum(visual_tokens(64, 64) for _ in r["images"]) for r in train + test)
    assert summary["visual_tokens_per_sample"] == {
        "min": tokens[0],
        "mean": round(sum(tokens) / len(tokens), 1),
        "max": tokens[-1],
    }
    assert summary["episodes_with_fewer_frames"] == [
        {
            "episode_history": EPISODES[2][0],
            "frames_available": 5,
            "frames_used": 5,
            "episode_id": episode_slug(EPISODES[2][0]),
        }
    ]
    assert summary["problems"] == [] and summary["skipped"] == {"questions": 0, "episodes": 0}
    printed = capsys.readouterr().out
    assert "open_eqa_test" in printed and "visual tokens per sample: min 20, mean" in printed
    assert "1 episode(s) had fewer frames" in printed


def test_hf_parquet_matches_official_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A HF copy (one row per question, frames repeated) gives the same dataset as the official layout."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    questions, frames = write_official(tmp_path)
    rows = make_questions(EPISODES)
    for row in rows:
        e = next(i for i, ep in enumerate(EPISODES) if ep[0] == row["episode_history"])
        row["videos"] = [{"bytes": frame_png(e, i), "path": None} for i in range(EPISODES[e][1])]
        row.setdefault("extra_answers", None)
    features = datasets.Features(
        {
            **{k: datasets.Value("string") for k in ("question", "answer", "category", "question_id")},
            "episode_history": datasets.Value("string"),
            "extra_answers": datasets.List(datasets.Value("string")),
            "videos": datasets.List(datasets.Image()),
        }
    )
    columns = {k: [r[k] for r in rows] for k in features}
    parquet_dir = tmp_path / "hf" / "data"
    parquet_dir.mkdir(parents=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(
        parquet_dir / "train-00000-of-00001.parquet"
    )

    common = ["--max-pixels", "4096", "--workers", "1"]
    assert (
        run(
            "--questions",
            str(questions),
            "--frames",
            str(frames),
            "--output-dir",
            str(tmp_path / "a"),
            *common,
        )
        == 0
    )
    assert run("--hf-dataset", str(tmp_path / "hf"), "--output-dir", str(tmp_path / "b"), *common) == 0
    assert output_files(tmp_path / "a").keys() == output_files(tmp_path / "b").keys()
    a, b = output_files(tmp_path / "a"), output_files(tmp_path / "b")
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert len(jpgs) == 29 and all(a[k] == b[k] for k in jpgs)
    for name in ("open_eqa_train_val.jsonl", "open_eqa_test.jsonl"):
        assert a[name] == b[name]
    summary = json.loads((tmp_path / "b" / "prepare_summary.json").read_text())
    assert summary["source"]["frames_column"] == "videos"


def test_hf_saved_dataset_with_frame_paths(tmp_path: Path) -> None:
    """load_from_disk directory, an `images` column of relative path strings, a named split."""
    import datasets

    root = tmp_path / "saved"
    episodes = EPISODES[:2]
    rows = make_questions(episodes, per_episode=2)
    for e, (_, count, _) in enumerate(episodes):
        (root / "img" / str(e)).mkdir(parents=True)
        for i in range(count):
            (root / "img" / str(e) / f"{i:03d}.png").write_bytes(frame_png(e, i))
    for row in rows:
        e = next(i for i, ep in enumerate(episodes) if ep[0] == row["episode_history"])
        row["images"] = [f"img/{e}/{i:03d}.png" for i in range(episodes[e][1])]
        row.pop("extra_answers", None)
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns)}).save_to_disk(str(root))

    out = tmp_path / "out"
    assert (
        run("--hf-dataset", str(root), "--hf-split", "test", "--output-dir", str(out), "--workers", "1") == 0
    )
    rows_out = read_jsonl(out / "open_eqa_train_val.jsonl") + read_jsonl(out / "open_eqa_test.jsonl")
    assert len(rows_out) == 4 and all(len(r["images"]) == 8 for r in rows_out)
    with Image.open(out / rows_out[0]["images"][0]) as image:
        assert image.size == (160, 96)  # 160x120 fits 200,704 pixels: sides rounded to 32, not upscaled


def test_deterministic_across_runs_and_workers(tmp_path: Path) -> None:
    questions, frames = write_official(tmp_path)
    results = []
    for name, workers in (("one", "1"), ("again", "1"), ("two", "2")):
        out = tmp_path / name
        args = ["--questions", str(questions), "--frames", str(frames), "--output-dir", str(out)]
        assert run(*args, "--workers", workers, "--max-side", "96") == 0
        results.append(output_files(out))
    assert results[0] == results[1] == results[2]
    assert len([k for k in results[0] if k.endswith(".jpg")]) == 29


def test_resume_after_interrupted_run(tmp_path: Path) -> None:
    questions, frames = write_official(tmp_path)
    source = ["--questions", str(questions), "--frames", str(frames), "--workers", "1"]
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert run(*source, "--output-dir", str(clean)) == 0
    assert run(*source, "--output-dir", str(resumed)) == 0
    # Make `resumed` look killed mid-run: not registered, one episode half-written in its temporary
    # folder, one never started, stale JSONL, a leftover temporary summary.
    (resumed / "dataset_info.json").unlink()
    (resumed / "open_eqa_test.jsonl").write_text('{"half": ')
    (resumed / ".prepare_summary.json.x.tmp").write_text("{")
    root = resumed / "open_eqa_frames"
    half = root / episode_slug(EPISODES[1][0])
    half.rename(root / f".tmp.{half.name}")
    (root / f".tmp.{half.name}" / "003.jpg").unlink()
    (root / f".tmp.{half.name}" / "manifest.json").unlink()
    missing = root / episode_slug(EPISODES[3][0])
    for f in missing.iterdir():
        f.unlink()
    missing.rmdir()
    untouched = root / episode_slug(EPISODES[0][0]) / "000.jpg"
    before = untouched.stat().st_mtime_ns

    assert run(*source, "--output-dir", str(resumed)) == 0
    assert output_files(resumed) == output_files(clean)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert untouched.stat().st_mtime_ns == before  # finished episodes are not rewritten
    summary = json.loads((resumed / "prepare_summary.json").read_text())
    assert (summary["frames"]["written"], summary["frames"]["reused"]) == (16, 13)

    # Different frame options: every episode is redone, none reused from the old settings.
    assert run(*source, "--output-dir", str(resumed), "--quality", "40") == 0
    summary = json.loads((resumed / "prepare_summary.json").read_text())
    assert (summary["frames"]["written"], summary["frames"]["reused"]) == (29, 0)
    assert untouched.read_bytes() != (clean / untouched.relative_to(resumed)).read_bytes()


def test_killed_run_leaves_no_partial_files_and_resumes(tmp_path: Path) -> None:
    episodes = [(f"hm3d-v0/{i:03d}-hm3d-scene{i}", 8, 5) for i in range(6)]
    questions, frames = write_official(tmp_path, episodes, size=(480, 360))
    source = ["--questions", str(questions), "--frames", str(frames), "--workers", "1"]
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "eqakit", "prepare", "openeqa", *source, "--output-dir", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = out / "open_eqa_frames"
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if root.is_dir() and any(not p.name.startswith(".") for p in root.iterdir()):
            break
        time.sleep(0.002)
    process.kill()
    if process.wait() == 0:
        pytest.skip("the run finished before it could be killed")
    assert not (out / "dataset_info.json").exists()
    finished = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert 0 < len(finished) < len(episodes)
    for folder in finished:  # whatever was renamed into place is complete
        assert sorted(p.name for p in folder.iterdir()) == [f"{i:03d}.jpg" for i in range(8)] + [
            "manifest.json"
        ]
        for jpg in folder.glob("*.jpg"):
            with Image.open(jpg) as image:
                image.load()

    assert run(*source, "--output-dir", str(out)) == 0
    assert run(*source, "--output-dir", str(tmp_path / "clean")) == 0
    assert output_files(out) == output_files(tmp_path / "clean")


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _children(pid: int) -> dict[int, str]:
    """PID -> start time of the processes whose parent is `pid` (psutil is not a dependency)."""
    found = {}
    for entry in Path("/proc").iterdir():
        fields = _proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == pid:
            found[int(entry.name)] = fields[19]
    return found


def _running(pid: int, started: str) -> bool:
    """Whether that very process (same start time, not a zombie waiting for PID 1) still runs."""
    fields = _proc_stat(pid)
    return fields is not None and fields[19] == started and fields[0] not in ("Z", "X")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_killed_prepare_takes_its_workers_and_resource_tracker_along(tmp_path: Path) -> None:
    """`kill -9` of `prepare --workers 2` mid-run: its pool workers and resource tracker exit too."""
    episodes = [(f"hm3d-v0/{i:03d}-hm3d-scene{i}", 8, 5) for i in range(40)]
    questions, frames = write_official(tmp_path, episodes, size=(480, 360))
    out = tmp_path / "out"
    source = ["--questions", str(questions), "--frames", str(frames), "--output-dir", str(out)]
    command = [sys.executable, "-m", "eqakit", "prepare", "openeqa", *source, "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: dict[int, str] = {}
    commands: dict[int, bytes] = {}
    deadline = time.monotonic() + 60
    try:
        while process.poll() is None and time.monotonic() < deadline:
            children.update(_children(process.pid))
            commands.update({pid: command for pid in children if (command := _cmdline(pid))})
            workers = [pid for pid, command in commands.items() if b"spawn_main" in command]
            root = out / "open_eqa_frames"
            busy = root.is_dir() and any(not p.name.startswith(".") for p in root.iterdir())
            if len(workers) == 2 and busy:  # both started, and writing episodes
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"no two busy workers seen (exit code {process.poll()}, children {children})")
    finally:
        process.kill()
        process.wait()
    assert any(b"resource_tracker" in command for command in commands.values()), commands

    deadline = time.monotonic() + 10
    while any(_running(*child) for child in children.items()) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = {pid: commands[pid] for pid, started in children.items() if _running(pid, started)}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, left


def test_existing_dataset_info_is_merged(tmp_path: Path) -> None:
    questions, frames = write_official(tmp_path)
    out = tmp_path / "data"
    out.mkdir()
    other = {"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}
    (out / "dataset_info.json").write_text(json.dumps(other))
    assert (
        run(
            "--questions", str(questions), "--frames", str(frames), "--output-dir", str(out), "--workers", "1"
        )
        == 0
    )
    info = json.loads((out / "dataset_info.json").read_text())
    assert list(info) == ["alpaca_en_demo", "open_eqa_train_val", "open_eqa_test"]


def test_split_by_question_is_seeded(tmp_path: Path) -> None:
    questions, frames = write_official(tmp_path)
    tests = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        out = tmp_path / name
        args = ["--questions", str(questions), "--frames", str(frames), "--output-dir", str(out)]
        assert (
            run(*args, "--split-by", "question", "--seed", seed, "--test-size", "0.25", "--workers", "1") == 0
        )
        tests.append([r["question_id"] for r in read_jsonl(out / "open_eqa_test.jsonl")])
    assert len(tests[0]) == 4 and tests[0] == tests[1] and tests[0] != tests[2]


@pytest.mark.parametrize(
    ("width", "height"), [(1920, 1080), (1296, 968), (640, 480), (160, 120), (100, 20), (20, 10), (5000, 300)]
)
@pytest.mark.parametrize(
    ("max_pixels", "max_side"), [(200704, None), (589824, None), (50000, 128), (1024, None)]
)
@pytest.mark.parametrize("side", [32, 28], ids=["qwen3_vl", "qwen2_5_vl"])
def test_target_size_needs_no_resampling_by_qwen(
    width: int, height: int, max_pixels: int, max_side: int | None, side: int
) -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    w, h = target_size(width, height, max_pixels=max_pixels, max_side=max_side, side=side)
    assert w % side == 0 and h % side == 0 and w * h <= max(max_pixels, side * side)
    assert max_side is None or max(w, h) <= max_side
    assert w <= max(side, width) and h <= max(side, height)
    # what the model's processor does with it (the seed's image_min/max_pixels): nothing
    assert smart_resize(h, w, factor=side, min_pixels=side * side, max_pixels=max(max_pixels, 589824)) == (
        h,
        w,
    )
    # aspect kept within one token step of rounding, unless a side hit the one-token floor
    if w > side and h > side:
        assert abs(math.log((w / h) / (width / height))) <= math.log((w + side) / w) + math.log(
            (h + side) / h
        )


def test_target_size_examples() -> None:
    assert target_size(1920, 1080, max_pixels=200704) == (576, 320)
    assert target_size(1296, 968, max_pixels=200704) == (512, 384)
    assert target_size(1920, 1080, max_pixels=10**9, max_side=640) == (640, 352)
    assert visual_tokens(576, 320) == 180
    assert (
        FrameOptions(num_frames=0, max_pixels=100, max_side=8, quality=0).problems()
        and not FrameOptions().problems()
    )


def test_convert_frame_jpeg_source_and_modes() -> None:
    """JPEG sources decode at a reduced scale (draft) and still give the exact size; any mode -> RGB."""
    options = FrameOptions(max_pixels=4096, quality=90)
    big = io.BytesIO()
    Image.new("RGB", (1280, 960), (200, 40, 90)).save(big, format="JPEG", quality=95)
    data, size = convert_frame(big.getvalue(), options)
    assert size == (64, 64) and data == convert_frame(big.getvalue(), options)[0]
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.size, image.mode) == ("JPEG", (64, 64), "RGB")
        assert np.allclose(np.asarray(image, dtype=float).mean(axis=(0, 1)), (200, 40, 90), atol=4)
    for mode in ("L", "P", "RGBA", "I;16"):
        buf = io.BytesIO()
        Image.new(mode, (40, 70)).save(buf, format="PNG")
        assert convert_frame(buf.getvalue(), options)[1] == (32, 64)
    with pytest.raises(FrameError, match="no image data"):
        convert_frame(None, options)


def test_select_frames_like_openeqa_baselines() -> None:
    assert select_frames(100, 8) == list(np.round(np.linspace(0, 99, 8)).astype(int))
    assert select_frames(8, 8) == list(range(8)) and select_frames(3, 8) == [0, 1, 2]
    assert select_frames(9, 1) == [0]


@pytest.mark.skipif(not REAL_QUESTIONS.exists(), reason="needs the real OpenEQA question file")
def test_episode_split_on_real_openeqa_questions() -> None:
    records = json.loads(REAL_QUESTIONS.read_text())
    questions, problems = parse_questions(records, [str(i) for i in range(len(records))])
    assert (len(questions), problems) == (1636, [])
    episodes = group_episodes(questions)
    assert len(episodes) == 152
    test = choose_test_split(episodes, 0.15, "episode", seed=42)
    assert test == choose_test_split(episodes, 0.15, "episode", seed=42)
    assert test != choose_test_split(episodes, 0.15, "episode", seed=7)
    test_episodes = {q.episode_history for q in questions if q.question_id in test}
    train_episodes = {q.episode_history for q in questions if q.question_id not in test}
    assert test_episodes and train_episodes and not test_episodes & train_episodes
    assert abs(len(test) / len(questions) - 0.15) < 0.01
    total = Counter(q.category for q in questions)
    in_test = Counter(q.category for q in questions if q.question_id in test)
    assert all(abs(in_test[c] / total[c] - 0.15) < 0.02 for c in OPENEQA_CATEGORIES), in_test


def test_episode_split_balances_categories() -> None:
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.6, size=(80, 7)) + np.eye(7, dtype=int)[rng.integers(0, 7, 80)]
    for test_size in (0.1, 0.3, 0.5):
        chosen = split_episodes(counts, test_size, seed=3)
        share = counts[chosen].sum(axis=0) / counts.sum(axis=0)
        assert np.all(np.abs(share - test_size) < 0.04), share
    assert split_episodes(counts[:2], 0.01, 0).sum() == 1 and split_episodes(counts[:2], 0.99, 0).sum() == 1


def test_cli_options_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    questions, frames = write_official(tmp_path)
    out = str(tmp_path / "out")
    assert run("--questions", str(questions), "--output-dir", out) == 2
    assert "pass --questions FILE and --frames DIR" in capsys.readouterr().err
    assert (
        run("--questions", str(questions), "--frames", str(frames), "--hf-dataset", "x", "--output-dir", out)
        == 2
    )
    assert "not both" in capsys.readouterr().err
    bad = [
        "--quality",
        "0",
        "--test-size",
        "1.5",
        "--num-frames",
        "0",
        "--workers",
        "0",
        "--max-pixels",
        "10",
    ]
    assert run("--questions", str(questions), "--frames", str(frames), "--output-dir", out, *bad) == 2
    err = capsys.readouterr().err
    for option in ("--quality", "--test-size", "--num-frames", "--workers", "--max-pixels"):
        assert option in err
    with pytest.raises(SystemExit) as exc:
        run("--split-by", "scene", "--output-dir", out)
    assert exc.value.code == 2
    assert not os.path.exists(out)


def test_frames_for_qwen2_5_vl_are_multiples_of_its_28_pixel_tokens(tmp_path: Path, capsys) -> None:
    """--arch qwen2_5_vl: frames on Qwen2.5-VL's 28x28-pixel token grid, its 196-token default area,
    and the summary counts its tokens."""
    questions, frames = write_official(tmp_path / "src")
    out = tmp_path / "data"
    argv = [
        "--questions",
        str(questions),
        "--frames",
        str(frames),
        "--workers",
        "1",
        "--output-dir",
        str(out),
    ]
    assert run(*argv, "--arch", "qwen2_5_vl") == 0
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["options"]["token_side"] == 28 and summary["options"]["max_pixels"] == 196 * 28 * 28
    assert summary["frames"]["sizes"] == {"140x112": 29}  # the 160x120 sources, on the 28-pixel grid
    assert summary["visual_tokens_per_sample"]["max"] == 8 * visual_tokens(140, 112, 28) == 160
    assert "visual tokens per sample: min 100, mean" in capsys.readouterr().out


def test_python_api_returns_summary(tmp_path: Path) -> None:
    questions, frames = write_official(tmp_path)
    summary = prepare_openeqa(
        tmp_path / "out", questions=questions, frames=frames, options=PrepareOptions(workers=1, test_size=0.3)
    )
    assert summary["splits"]["open_eqa_test"]["episodes"] >= 1 and summary["options"]["workers"] == 1


def test_as_video_writes_each_episodes_frames_once_as_a_video(tmp_path: Path, capsys, geometry) -> None:
    """--as-video: the same frames, each row one <video> whose videos entry lists them; registered with
    a videos column, read back as frame-list videos that plan within cutoff_len."""
    from transformers import AutoProcessor

    from eqakit.data.dataset import load_samples
    from eqakit.data.encode import PromptFormat, plan_sample
    from eqakit.data.video import probe

    questions, frames = write_official(tmp_path / "src")
    out = tmp_path / "data"
    argv = ["prepare", "openeqa", "--questions", str(questions), "--frames", str(frames), "--num-frames", "6"]
    assert main([*argv, "--output-dir", str(out), "--as-video"]) == 0
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["open_eqa_test"]["columns"] == {
        "prompt": "instruction", "query": "input", "response": "output", "videos": "videos"
    }  # fmt: skip
    rows = [
        json.loads(line)
        for name in ("open_eqa_train_val", "open_eqa_test")
        for line in (out / f"{name}.jsonl").read_text().splitlines()
    ]
    assert all(
        r["instruction"].startswith("<video>") and "images" not in r and len(r["videos"]) == 1 for r in rows
    )
    by_episode = {r["episode_history"]: r["videos"][0] for r in rows}
    assert all(len(v) == min(6, dict((h, n) for h, n, _ in EPISODES)[e]) for e, v in by_episode.items())
    written = sorted(p.relative_to(out).as_posix() for p in (out / "open_eqa_frames").rglob("*.jpg"))
    assert written == sorted(f for v in by_episode.values() for f in v)  # each frame once, shared by the rows

    samples = load_samples("open_eqa_train_val", out)
    processor = AutoProcessor.from_pretrained(build_tiny())
    video = probe(samples[0].videos[0], fps=2.0, maxlen=128)
    plan = plan_sample(
        samples[0].messages,
        [],
        processor.tokenizer,
        PromptFormat(cutoff_len=4096),
        videos=[video],
        geometry=geometry,
    )
    assert plan.videos[0].grid[0] == len(video.indices) // 2 and plan.length <= 4096


@functools.cache
def build_tiny() -> Path:
    import tempfile

    from eqakit.model.tiny import build_tiny_model

    return build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
