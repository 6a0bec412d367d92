"""`eqakit synth`: OpenEQA's official layout, questions that need the frames, determinism, safe writes."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from eqakit.cli import main
from eqakit.data.openeqa_categories import OPENEQA_CATEGORIES
from eqakit.demo.scenes import COLORS, DOOR_COLORS, WALL_COLORS
from eqakit.demo.synth import generate
from eqakit.errors import ConfigError, DataError

KEYS = ["question", "answer", "category", "question_id", "episode_history"]  # the real file's order
HISTORY = re.compile(r"^(hm3d-v0/\d{3}-hm3d-[A-Za-z0-9]{11}|scannet-v0/\d{3}-scannet-scene0\d{3}_0\d)$")
SMALL = (160, 120)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten episodes at a non-default frame size."""
    out = tmp_path_factory.mktemp("synth") / "small"
    generate(out, episodes=10, seed=0, frame_size=SMALL)
    return out


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Forty episodes (the default count) at a tiny frame size: enough questions for statistics."""
    out = tmp_path_factory.mktemp("synth") / "large"
    questions = generate(out, episodes=40, seed=3, frame_size=(64, 48))
    return out, json.loads(questions.read_text())


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _by_episode(rows: list[dict]) -> dict[str, list[dict]]:
    episodes: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        episodes[row["episode_history"]].append(row)
    return episodes


def _rgb_frames(root: Path, history: str) -> list[Path]:
    return sorted((root / "frames" / history).glob("*-rgb.png"))


def test_questions_file_has_openeqa_schema(large: tuple[Path, list[dict]]) -> None:
    root, rows = large
    assert (root / "open-eqa-v0.json").read_text().startswith('[\n    {\n        "question": ')
    for row in rows:
        assert list(row)[:5] == KEYS and set(row) <= {*KEYS, "extra_answers"}
        assert all(isinstance(row[k], str) and row[k].strip() for k in KEYS)
        assert row["category"] in OPENEQA_CATEGORIES
        assert HISTORY.match(row["episode_history"]), row["episode_history"]
        assert str(uuid.UUID(row["question_id"])) == row["question_id"]
        assert 1 <= len(row["answer"].split()) <= 4, row
        if "extra_answers" in row:
            extra = row["extra_answers"]
            assert len(extra) == 4 and all(isinstance(a, str) and a for a in extra)
            assert row["answer"] not in extra
    assert len({row["question_id"] for row in rows}) == len(rows)
    assert set(OPENEQA_CATEGORIES) == {row["category"] for row in rows}
    with_extra = sum("extra_answers" in row for row in rows) / len(rows)
    assert 0.08 <= with_extra <= 0.25

    episodes = _by_episode(rows)
    assert len(episodes) == 40
    counts = [len(questions) for questions in episodes.values()]
    assert all(8 <= n <= 14 for n in counts) and 9.5 <= sum(counts) / len(counts) <= 12.5
    covering_all = sum(len({q["category"] for q in qs}) == 7 for qs in episodes.values())
    assert covering_all >= 36
    for questions in episodes.values():
        assert len({q["question"] for q in questions}) == len(questions)  # no question asked twice


def test_frames_follow_hm3d_and_scannet_naming(small: Path) -> None:
    rows = json.loads((small / "open-eqa-v0.json").read_text())
    histories = sorted(_by_episode(rows))
    assert {h.split("/")[0] for h in histories} == {"hm3d-v0", "scannet-v0"}
    on_disk = sorted(str(p.relative_to(small / "frames")) for p in (small / "frames").glob("*/*"))
    assert on_disk == histories
    for history in histories:
        frames = _rgb_frames(small, history)
        digits = 5 if history.startswith("hm3d") else 6
        assert 20 <= len(frames) <= 60
        assert [f.name for f in frames] == [f"{i:0{digits}d}-rgb.png" for i in range(len(frames))]
        for frame in frames[:: len(frames) - 1]:
            with Image.open(frame) as image:
                assert image.format == "PNG" and image.mode == "RGB" and image.size == SMALL


def test_depth_and_pose_distractors_beside_some_frames(small: Path) -> None:
    depth = sorted((small / "frames").rglob("*-depth.png"))
    poses = sorted((small / "frames").rglob("*.txt"))
    assert depth and poses
    assert len({p.parent for p in depth}) < 10  # only some episodes have them
    for path in depth:
        assert (path.parent / path.name.replace("-depth", "-rgb")).exists()
        with Image.open(path) as image:
            assert image.mode == "I;16" and image.size == SMALL
    for path in poses:
        matrix = [[float(v) for v in line.split()] for line in path.read_text().splitlines()]
        assert len(matrix) == 4 and all(len(row) == 4 for row in matrix) and matrix[3] == [0, 0, 0, 1]


def test_same_seed_same_bytes_other_seed_differs(small: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", episodes=10, seed=0, frame_size=SMALL, workers=1)
    assert _tree(again.parent) == _tree(small)
    other = generate(tmp_path / "other", episodes=10, seed=1, frame_size=SMALL)
    assert other.read_bytes() != again.read_bytes()
    first = _rgb_frames(small, json.loads(again.read_text())[0]["episode_history"])[0]
    assert (
        first.read_bytes()
        != _rgb_frames(other.parent, json.loads(other.read_text())[0]["episode_history"])[0].read_bytes()
    )


def test_questions_cannot_be_answered_without_the_frames(large: tuple[Path, list[dict]]) -> None:
    """A blind model (the most common answer to each question in other episodes) scores poorly."""
    _, rows = large
    episodes = list(_by_episode(rows).values())
    train, test = [q for qs in episodes[::2] for q in qs], [q for qs in episodes[1::2] for q in qs]
    answers: dict[str, Counter] = defaultdict(Counter)
    by_category: dict[str, Counter] = defaultdict(Counter)
    for row in train:
        answers[row["question"]][row["answer"]] += 1
        by_category[row["category"]][row["answer"]] += 1

    def blind(row: dict) -> str:
        return (answers.get(row["question"]) or by_category[row["category"]]).most_common(1)[0][0]

    accuracy = sum(blind(row) == row["answer"] for row in test) / len(test)
    assert accuracy < 0.4
    for question, counts in answers.items():  # no template has a usual answer
        if counts.total() >= 15:
            assert counts.most_common(1)[0][1] / counts.total() <= 0.75, (question, counts)


def _colors_in(root: Path, history: str) -> set[tuple[int, int, int]]:
    colors: set[tuple[int, int, int]] = set()
    for frame in _rgb_frames(root, history)[::2]:
        with Image.open(frame) as image:
            colors |= {rgb for _, rgb in image.getcolors(maxcolors=1 << 16)}
    return colors


def test_answers_match_what_the_frames_show(small: Path) -> None:
    """Check answers against the pixels: sky colour, lit-lamp halo, open doorway, object colours."""
    root, rows = small, json.loads((small / "open-eqa-v0.json").read_text())
    day_sky, night_sky, lamp_halo, doorway = (135, 195, 240), (20, 25, 60), (255, 240, 160), (45, 40, 40)
    seen: Counter = Counter()
    for row in rows:
        question, answer = row["question"], row["answer"]
        if question == "Is it day or night outside?":
            colors = _colors_in(root, row["episode_history"])
            assert (day_sky in colors, night_sky in colors) == (answer == "Day", answer == "Night"), row
        elif question == "Is the lamp on or off?":
            assert (lamp_halo in _colors_in(root, row["episode_history"])) == (answer == "On"), row
        elif question == "Is the door open or closed?":
            assert (doorway in _colors_in(root, row["episode_history"])) == (answer == "Open"), row
        elif question in ("What color is the door?", "What color are the walls?"):
            palette = DOOR_COLORS if "door" in question else WALL_COLORS
            assert palette[answer] in _colors_in(root, row["episode_history"]), row
        elif question.startswith("What color is the") and question[18:-1] not in ("mug", "book", "vase"):
            assert COLORS[answer] in _colors_in(root, row["episode_history"]), row
        else:
            continue
        seen[(question if "color" not in question else "color", answer)] += 1
    assert {answer for (question, answer) in seen if question.startswith("Is it day")} == {"Day", "Night"}
    assert {answer for (question, answer) in seen if question.startswith("Is the lamp")} == {"On", "Off"}
    assert {answer for (question, answer) in seen if question.startswith("Is the door")} == {"Open", "Closed"}
    assert len({answer for (question, answer) in seen if question == "color"}) >= 6


def test_cli_writes_default_size_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    assert main(["synth", "--output-dir", str(out), "--episodes", "4"]) == 0
    rows = json.loads((out / "open-eqa-v0.json").read_text())
    assert len(_by_episode(rows)) == 4
    with Image.open(next((out / "frames").rglob("*-rgb.png"))) as image:
        assert image.size == (320, 240)
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]


def test_refuses_a_non_empty_directory_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["synth", "--output-dir", str(out), "--episodes", "1"]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]

    assert main(["synth", "--output-dir", str(out), "--episodes", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["frames", "open-eqa-v0.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate(empty, episodes=1, frame_size=(64, 48)).exists()  # an empty directory is fine


def test_bad_options_are_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="episodes must be at least 1"):
        generate(tmp_path / "a", episodes=0)
    with pytest.raises(ConfigError, match="between 32 and 4096 pixels"):
        generate(tmp_path / "a", frame_size=(10, 10))
    with pytest.raises(DataError, match="is a file"):
        (tmp_path / "file").write_text("")
        generate(tmp_path / "file", episodes=1)
    with pytest.raises(SystemExit) as exc:  # argparse's own exit for a malformed value
        main(["synth", "--output-dir", str(tmp_path / "b"), "--frame-size", "wide"])
    assert exc.value.code == 2 and "WIDTHxHEIGHT" in capsys.readouterr().err
    assert main(["synth", "--output-dir", str(tmp_path / "b"), "--workers", "0"]) == 2
    assert "workers must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
