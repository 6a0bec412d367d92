"""Bad input to `eqakit prepare openeqa`: each is reported with its id, `fail` registers nothing, `skip`
leaves exactly the bad part out, and after fixing the input the same directory comes out right."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.test_prepare import (
    EPISODES,
    frame_png,
    make_questions,
    output_files,
    read_jsonl,
    run,
    write_official,
)

from eqakit.data.frames import select_frames
from eqakit.data.prepare import episode_slug


@dataclass
class Defect:
    kind: str
    mentions: list[str]  # texts the error message must contain (ids, paths)
    skipped_episodes: set[str]
    skipped_questions: set[str]
    while_writing: bool = False  # found only when the episode's frames are written


def _rgb(frames: Path, e: int, index: int) -> Path:
    history, _, digits = EPISODES[e]
    return frames / history / f"{index:0{digits}d}-rgb.png"


def missing_folder(questions: list[dict], frames: Path) -> Defect:
    shutil.rmtree(frames / EPISODES[1][0])
    return Defect(
        "missing_frames_folder", [EPISODES[1][0], str(frames / EPISODES[1][0])], {EPISODES[1][0]}, set()
    )


def no_frames(questions: list[dict], frames: Path) -> Defect:
    for png in (frames / EPISODES[1][0]).glob("*-rgb.png"):
        png.unlink()  # depth images and pose files remain: they are not frames
    return Defect("no_frames", [EPISODES[1][0], "no *-rgb.png frames"], {EPISODES[1][0]}, set())


def corrupt_image(questions: list[dict], frames: Path) -> Defect:
    path = _rgb(frames, 1, select_frames(13, 8)[3])
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return Defect(
        "corrupt_image", [EPISODES[1][0], str(path), "cannot read image"], {EPISODES[1][0]}, set(), True
    )


def truncated_image(questions: list[dict], frames: Path) -> Defect:
    path = _rgb(frames, 3, select_frames(9, 8)[-1])
    path.write_bytes(path.read_bytes()[:200])
    return Defect("corrupt_image", [EPISODES[3][0], str(path)], {EPISODES[3][0]}, set(), True)


def dangling_symlink(questions: list[dict], frames: Path) -> Defect:
    path = _rgb(frames, 2, 2)
    path.unlink()
    path.symlink_to("moved-away-rgb.png")
    mentions = [EPISODES[2][0], str(path), "symlink to 'moved-away-rgb.png'", "No such file"]
    return Defect("broken_frame", mentions, {EPISODES[2][0]}, set())


def looping_symlink(questions: list[dict], frames: Path) -> Defect:
    path = _rgb(frames, 0, select_frames(20, 8)[3])
    path.unlink()
    path.symlink_to(path.name)
    mentions = [EPISODES[0][0], str(path), "Too many levels of symbolic links"]
    return Defect("broken_frame", mentions, {EPISODES[0][0]}, set())


def lone_surrogate(questions: list[dict], frames: Path) -> Defect:
    questions[3]["question"] = "Where is the \ud800 lamp?"  # json.dumps writes the escape "\ud800"
    return Defect(
        "bad_text", ["q-0-3", "item 3", "'question'", "'\\ud800' at character 13"], set(), {"q-0-3"}
    )


def duplicate_question_id(questions: list[dict], frames: Path) -> Defect:
    questions[5]["question_id"] = questions[1]["question_id"]
    return Defect("duplicate_question_id", ["q-0-1", "item 1", "item 5"], set(), {"q-0-1"})


def missing_field(questions: list[dict], frames: Path) -> Defect:
    del questions[2]["answer"]
    return Defect("missing_field", ["q-0-2", "item 2", "'answer'"], set(), {"q-0-2"})


def empty_field(questions: list[dict], frames: Path) -> Defect:
    questions[9]["question"] = "   "
    return Defect("empty_field", ["q-2-1", "'question' is empty"], set(), {"q-2-1"})


def wrong_type(questions: list[dict], frames: Path) -> Defect:
    questions[10]["answer"] = 3
    return Defect("bad_field", ["q-2-2", "'answer' must be a string, got int"], set(), {"q-2-2"})


def unknown_category(questions: list[dict], frames: Path) -> Defect:
    questions[6]["category"] = "object recogniton"
    return Defect("unknown_category", ["q-1-2", "did you mean 'object recognition'"], set(), {"q-1-2"})


def image_placeholder(questions: list[dict], frames: Path) -> Defect:
    questions[7]["question"] = "What is shown in <image>?"
    return Defect("image_placeholder", ["q-1-3", "'<image>'"], set(), {"q-1-3"})


def unsafe_episode_path(questions: list[dict], frames: Path) -> Defect:
    questions[12]["episode_history"] = "../outside"
    return Defect("bad_field", ["q-3-0", "'../outside'"], set(), {"q-3-0"})


def episode_id_collision(questions: list[dict], frames: Path) -> Defect:
    clash = EPISODES[0][0].replace("/", "__")  # the same folder name as EPISODES[0]
    shutil.copytree(frames / EPISODES[0][0], frames / clash)
    questions.append({**questions[0], "question_id": "q-clash", "episode_history": clash})
    return Defect("episode_id_collision", [clash, EPISODES[0][0]], {clash, EPISODES[0][0]}, set())


DEFECTS = [
    missing_folder,
    no_frames,
    corrupt_image,
    truncated_image,
    dangling_symlink,
    looping_symlink,
    lone_surrogate,
    duplicate_question_id,
    missing_field,
    empty_field,
    wrong_type,
    unknown_category,
    image_placeholder,
    unsafe_episode_path,
    episode_id_collision,
]


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda d: d.__name__)
def test_bad_input(defect: Callable, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    questions_file, frames = write_official(tmp_path)
    questions = json.loads(questions_file.read_text())
    expected = defect(questions, frames)
    questions_file.write_text(json.dumps(questions))
    out = tmp_path / "out"
    args = [
        "--questions",
        str(questions_file),
        "--frames",
        str(frames),
        "--output-dir",
        str(out),
        "--workers",
        "1",
    ]

    # fail: non-zero exit, every problem named, nothing registered
    capsys.readouterr()
    assert run(*args) == 1
    err = capsys.readouterr().err
    assert expected.kind in err and "--on-error skip" in err
    for text in expected.mentions:
        assert text in err
    if expected.while_writing:  # what is left is finished episodes, for the rerun to reuse
        assert [p.name for p in out.iterdir()] == ["open_eqa_frames"]
        for folder in (out / "open_eqa_frames").iterdir():
            assert not folder.name.startswith(".") and (folder / "manifest.json").is_file()
    else:  # found before anything was written
        assert not out.exists()

    # skip: the rest is prepared; the bad episodes and questions are left out and listed
    assert run(*args, "--on-error", "skip") == 0
    rows = read_jsonl(out / "open_eqa_train_val.jsonl") + read_jsonl(out / "open_eqa_test.jsonl")
    kept_episodes = {r["episode_history"] for r in rows}
    kept_ids = {r["question_id"] for r in rows}
    assert not kept_episodes & expected.skipped_episodes and not kept_ids & expected.skipped_questions
    all_ids = {q["question_id"] for q in questions if isinstance(q.get("question_id"), str)}
    lost = {q["question_id"] for q in questions if q.get("episode_history") in expected.skipped_episodes}
    assert kept_ids == all_ids - lost - expected.skipped_questions
    folders = {p.name for p in (out / "open_eqa_frames").iterdir()}
    assert folders == {episode_slug(h) for h in kept_episodes}
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["problem_counts"][expected.kind] >= 1
    assert summary["skipped"]["questions"] == len(questions) - len(rows)
    assert summary["skipped"]["episodes"] == len(expected.skipped_episodes)
    assert expected.kind in capsys.readouterr().out
    assert json.loads((out / "dataset_info.json").read_text()).keys() == {
        "open_eqa_train_val",
        "open_eqa_test",
    }

    # fixed input, same directory: the result equals a clean run's
    shutil.rmtree(frames)
    write_official(tmp_path / "fixed")
    fixed = tmp_path / "fixed" / "open-eqa-v0.json", tmp_path / "fixed" / "frames"
    clean_args = ["--questions", str(fixed[0]), "--frames", str(fixed[1]), "--workers", "1"]
    assert run(*clean_args, "--output-dir", str(out)) == 0
    assert run(*clean_args, "--output-dir", str(tmp_path / "clean")) == 0
    assert output_files(out) == output_files(tmp_path / "clean")


def test_frame_errors_keep_finished_episodes_for_the_rerun(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    questions_file, frames = write_official(tmp_path)
    good = _rgb(frames, 1, select_frames(13, 8)[0]).read_bytes()
    corrupt_image([], frames)
    out = tmp_path / "out"
    args = [
        "--questions",
        str(questions_file),
        "--frames",
        str(frames),
        "--output-dir",
        str(out),
        "--workers",
        "2",
    ]
    assert run(*args) == 1
    assert not (out / "dataset_info.json").exists()
    _rgb(frames, 1, select_frames(13, 8)[3]).write_bytes(good)
    assert run(*args) == 0
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert (summary["frames"]["written"], summary["frames"]["reused"]) == (8, 21)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("[{'question': 1}", "is not valid JSON"),
        ('{"question_id": "x"}', "must hold a JSON list of questions, found a dict"),
        ("[]", "holds no questions"),
    ],
)
def test_unusable_questions_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: str | None, message: str
) -> None:
    questions_file, frames = write_official(tmp_path)
    if content is None:
        questions_file.unlink()
    else:
        questions_file.write_text(content)
    for mode in ("fail", "skip"):
        args = [
            "--questions",
            str(questions_file),
            "--frames",
            str(frames),
            "--output-dir",
            str(tmp_path / "out"),
        ]
        assert run(*args, "--on-error", mode) == 1
        err = capsys.readouterr().err
        assert message in err and str(questions_file) in err
    assert not (tmp_path / "out").exists()


def test_missing_frames_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    questions_file, _ = write_official(tmp_path)
    args = [
        "--questions",
        str(questions_file),
        "--frames",
        str(tmp_path / "nope"),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert run(*args) == 1
    assert "frames directory" in capsys.readouterr().err


def test_many_problems_are_listed_with_a_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    questions_file, frames = write_official(tmp_path)
    questions = json.loads(questions_file.read_text())
    for q in questions:
        q["category"] = "navigation"
    questions += [{**questions[0], "question_id": f"extra-{i}"} for i in range(30)]
    questions_file.write_text(json.dumps(questions))
    assert (
        run("--questions", str(questions_file), "--frames", str(frames), "--output-dir", str(tmp_path / "o"))
        == 1
    )
    err = capsys.readouterr().err
    assert "46 problem(s) in the input (unknown_category 46)" in err and "... and 16 more" in err


def test_everything_skipped_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    questions_file, frames = write_official(tmp_path)
    for history, *_ in EPISODES[1:]:
        shutil.rmtree(frames / history)
    args = ["--questions", str(questions_file), "--frames", str(frames), "--output-dir", str(tmp_path / "o")]
    assert run(*args, "--on-error", "skip") == 1
    assert "1 usable episode(s): an episode split needs at least 2" in capsys.readouterr().err
    assert not (tmp_path / "o" / "dataset_info.json").exists()


def test_invalid_existing_dataset_info(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    questions_file, frames = write_official(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_info.json").write_text("{not json")
    assert run("--questions", str(questions_file), "--frames", str(frames), "--output-dir", str(out)) == 1
    assert f"{out / 'dataset_info.json'} exists but is not valid JSON" in capsys.readouterr().err
    assert (out / "dataset_info.json").read_text() == "{not json"  # left for the user to fix


def _write_parquet(path: Path, rows: list[dict], frames_column: str = "videos") -> None:
    import datasets

    features = {
        k: datasets.Value("string")
        for k in ("question", "answer", "category", "question_id", "episode_history")
    }
    if frames_column:
        features[frames_column] = datasets.List(datasets.Image())
    columns = {k: [r.get(k) for r in rows] for k in features}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(path)


def _hf_rows(episodes: list[tuple[str, int, int]]) -> list[dict]:
    rows = make_questions(episodes, per_episode=2)
    for row in rows:
        e = next(i for i, ep in enumerate(episodes) if ep[0] == row["episode_history"])
        row["videos"] = [{"bytes": frame_png(e, i), "path": None} for i in range(episodes[e][1])]
    return rows


def test_hf_dataset_without_frames_column(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    _write_parquet(tmp_path / "noframes.parquet", _hf_rows(EPISODES[:2]), frames_column="")
    for mode in ("fail", "skip"):
        args = ["--hf-dataset", str(tmp_path / "noframes.parquet"), "--output-dir", str(tmp_path / "o")]
        assert run(*args, "--on-error", mode) == 1
        err = capsys.readouterr().err
        assert (
            "has no frames column: its columns are question, answer, category, question_id, episode_history"
            in err
        )
        assert "accepts videos, frames, images" in err
    assert run("--hf-dataset", str(tmp_path / "missing-*.parquet"), "--output-dir", str(tmp_path / "o")) == 1
    assert "holds no parquet files" in capsys.readouterr().err


def test_hf_rows_with_empty_or_corrupt_frames(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    rows = _hf_rows(EPISODES)
    for row in rows:
        if row["episode_history"] == EPISODES[1][0]:
            row["videos"] = []
        if row["episode_history"] == EPISODES[2][0]:
            row["videos"][2] = {"bytes": b"garbage", "path": None}
    _write_parquet(tmp_path / "hf" / "train.parquet", rows)
    args = ["--hf-dataset", str(tmp_path / "hf"), "--output-dir", str(tmp_path / "o"), "--workers", "1"]
    assert run(*args) == 1
    err = capsys.readouterr().err
    assert f"episode {EPISODES[1][0]}: row 2 (the episode's first) has no frames in column 'videos'" in err
    assert run(*args, "--on-error", "skip") == 0
    summary = json.loads((tmp_path / "o" / "prepare_summary.json").read_text())
    assert summary["problem_counts"] == {"corrupt_image": 1, "no_frames": 1}
    assert f"episode {EPISODES[2][0]}" in capsys.readouterr().out
    problem = next(p for p in summary["problems"] if p["kind"] == "corrupt_image")
    assert problem["episode_history"] == EPISODES[2][0] and "row 4 frame 2" in problem["message"]


def test_a_frame_deleted_after_listing_is_a_named_problem(tmp_path: Path) -> None:
    """The official source lists an episode's frames when it loads; a frame that is gone when the
    episode is written (deleted mid-run) is a frame error naming the file (an episode problem, as
    for a corrupt frame), never a traceback."""
    from eqakit.data.frames import FrameError, FrameOptions, convert_frame
    from eqakit.data.openeqa import OfficialSource

    questions_file, frames = write_official(tmp_path)
    source = OfficialSource(questions_file, frames)
    episode = source.load().episodes[0]
    victim = sorted((frames / episode.episode_history).glob("*-rgb.png"))[0]
    victim.unlink()
    chosen = source.frames(episode, list(range(episode.frame_count)))
    gone = [f for f in chosen if f.identity[1] is None]
    assert [f.identity for f in gone] == [[victim.name, None]] and victim.name in gone[0].label
    with pytest.raises(FrameError, match=victim.name):
        convert_frame(gone[0].ref, FrameOptions())
