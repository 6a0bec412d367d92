"""OpenEQA sources for `eqakit prepare`: the official layout and Hugging Face copies.

Both give the same thing: validated questions grouped into episodes (in first-appearance order), the
problems found on the way, and a way to fetch an episode's frames by index. Everything a user can get
wrong is returned as a `Problem` naming the question or episode (and file) so `prepare` can stop with
all of them listed (``--on-error fail``) or leave the bad ones out (``skip``). Only what makes the whole
source unusable (a missing questions file, a dataset without a frames column) raises `DataError`.

Official layout: a JSON list of ``{question_id, question, answer, category, episode_history,
[extra_answers]}`` and ``FRAMES/<episode_history>/*-rgb.png`` (5- or 6-digit names; depth images and
pose files beside them are ignored).

Hugging Face: the same question columns plus a list-of-frames column (``videos``, ``frames`` or
``images``) repeated on every question of an episode; the first row of each episode gives its frames.
Frames are read from the undecoded Arrow storage ({bytes, path} structs, or path strings), so image
columns that `datasets` would decode to PIL images cost no decode here.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from eqakit.data.frames import FrameRef
from eqakit.data.openeqa_categories import OPENEQA_CATEGORIES
from eqakit.errors import DataError

QUESTION_FIELDS = ("question_id", "question", "answer", "category", "episode_history")
FRAME_COLUMNS = ("videos", "frames", "images")
RGB_SUFFIXES = ("-rgb.png", "-rgb.jpg", "-rgb.jpeg")
IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory binds each occurrence to the next image


@dataclass(frozen=True)
class Problem:
    """Something wrong with one question or episode; `kind` is a stable name for counting."""

    kind: str
    message: str
    episode_history: str | None = None
    question_id: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        place = []
        if self.episode_history:
            place.append(f"episode {self.episode_history}")
        if self.question_id:
            place.append(f"question {self.question_id}")
        if self.path:
            place.append(f"({self.path})")
        return f"{' '.join(place)}: {self.message}" if place else self.message

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class OpenEQAQuestion:
    question_id: str
    question: str
    answer: str
    category: str
    episode_history: str
    extra_answers: tuple[str, ...] = ()


@dataclass
class Episode:
    episode_history: str
    questions: list[OpenEQAQuestion] = field(default_factory=list)
    frame_count: int = 0  # source frames available


@dataclass
class LoadedSource:
    """What a source's `load` returns: usable episodes, the problems found, and how many records it read."""

    episodes: list[Episode]
    problems: list[Problem]
    records: int


@dataclass(frozen=True)
class SourceFrame:
    ref: FrameRef
    label: str  # how messages name it
    identity: list[Any]  # what a finished episode's manifest compares against (name and size/hash)


def parse_questions(records: list[Any], where: list[str]) -> tuple[list[OpenEQAQuestion], list[Problem]]:
    """Validate question records (`where[i]` names record i, e.g. "row 12"); bad ones become problems."""
    problems: list[Problem] = []
    parsed: list[OpenEQAQuestion | None] = []
    for record, place in zip(records, where, strict=True):
        question, found = _parse_question(record, place)
        parsed.append(question)
        problems += found
    ids = Counter(q.question_id for q in parsed if q is not None)
    duplicated = {qid for qid, n in ids.items() if n > 1}
    for qid in sorted(duplicated):
        places = [
            place for q, place in zip(parsed, where, strict=True) if q is not None and q.question_id == qid
        ]
        message = f"duplicate question_id in {', '.join(places)}; question ids must be unique"
        problems.append(Problem("duplicate_question_id", message, question_id=qid))
    questions = [q for q in parsed if q is not None and q.question_id not in duplicated]
    return questions, problems


def _parse_question(record: Any, place: str) -> tuple[OpenEQAQuestion | None, list[Problem]]:
    if not isinstance(record, dict):
        return None, [Problem("bad_record", f"{place} is a {type(record).__name__}, expected an object")]
    qid = _nameable(record.get("question_id"))
    episode = _nameable(record.get("episode_history"))

    def problem(kind: str, message: str) -> Problem:
        return Problem(kind, f"{place}: {message}", episode_history=episode, question_id=qid)

    problems = []
    for name in QUESTION_FIELDS:
        value = record.get(name)
        if value is None:
            problems.append(problem("missing_field", f"missing field {name!r}"))
        elif not isinstance(value, str):
            problems.append(
                problem("bad_field", f"field {name!r} must be a string, got {type(value).__name__}")
            )
        elif not value.strip():
            problems.append(problem("empty_field", f"field {name!r} is empty"))
        elif (at := _unencodable_at(value)) is not None:
            problems.append(problem("bad_text", _bad_text_message(repr(name), value, at)))
    if problems:
        return None, problems
    if not _is_safe_relative(record["episode_history"]):
        problems.append(
            problem(
                "bad_field",
                f"episode_history {record['episode_history']!r} must be a relative path without '..'",
            )
        )
    category = record["category"]
    if category not in OPENEQA_CATEGORIES:
        close = difflib.get_close_matches(category, OPENEQA_CATEGORIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        known = ", ".join(OPENEQA_CATEGORIES)
        problems.append(
            problem("unknown_category", f"unknown category {category!r}{hint}; OpenEQA's are: {known}")
        )
    for name in ("question", "answer"):
        if IMAGE_PLACEHOLDER in record[name]:
            problems.append(
                problem(
                    "image_placeholder", f"{name} contains {IMAGE_PLACEHOLDER!r}, which would bind to a frame"
                )
            )
    # Passed through verbatim for judging: the real set has an empty string among them (98bbe1fa...).
    extra = record.get("extra_answers")
    if extra is not None and not (isinstance(extra, list) and all(isinstance(a, str) for a in extra)):
        problems.append(problem("bad_field", "extra_answers must be a list of strings"))
    else:
        for i, answer in enumerate(extra or ()):
            if (at := _unencodable_at(answer)) is not None:
                problems.append(problem("bad_text", _bad_text_message(f"extra_answers[{i}]", answer, at)))
    if problems:
        return None, problems
    fields = {name: record[name] for name in QUESTION_FIELDS}
    return OpenEQAQuestion(**fields, extra_answers=tuple(extra or ())), []


def _unencodable_at(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode, or None.

    JSON's ``\\ud800`` escape decodes to a lone UTF-16 surrogate: a Python string, but not text. It
    would fail only when the JSONL is written, after every frame, so it is a problem of its question.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _nameable(value: Any) -> str | None:
    """`value` when it can name a question or episode in messages and the summary, else None."""
    if isinstance(value, str) and value.strip() and _unencodable_at(value) is None:
        return value
    return None


def _bad_text_message(field_name: str, value: str, at: int) -> str:
    return (
        f"field {field_name} holds the lone surrogate {value[at]!r} at character {at} "
        "(an unpaired \\uD800-\\uDFFF escape), which is not valid text; fix or remove it"
    )


def _is_safe_relative(path: str) -> bool:
    parts = PurePosixPath(path.replace("\\", "/")).parts
    return bool(parts) and not path.startswith(("/", "\\")) and ":" not in parts[0] and ".." not in parts


def group_episodes(questions: list[OpenEQAQuestion]) -> list[Episode]:
    """Questions grouped by episode_history, episodes and questions in first-appearance order."""
    episodes: dict[str, Episode] = {}
    for q in questions:
        episodes.setdefault(q.episode_history, Episode(q.episode_history)).questions.append(q)
    return list(episodes.values())


class OfficialSource:
    """OpenEQA as released: a questions JSON file and a frames directory."""

    def __init__(self, questions_file: str | Path, frames_dir: str | Path) -> None:
        self.questions_file = Path(questions_file)
        self.frames_dir = Path(frames_dir)
        self._frame_files: dict[str, list[Path]] = {}

    def describe(self) -> dict[str, str]:
        return {"questions": str(self.questions_file), "frames": str(self.frames_dir)}

    def load(self) -> LoadedSource:
        records = _read_questions_file(self.questions_file)
        if not self.frames_dir.is_dir():
            raise DataError(
                f"frames directory {self.frames_dir} does not exist (pass --frames DIR holding <episode_history>/*-rgb.png)"
            )
        name = self.questions_file.name
        questions, problems = parse_questions(records, [f"{name} item {i}" for i in range(len(records))])
        episodes = group_episodes(questions)
        for episode in episodes:
            folder = self.frames_dir / episode.episode_history
            if not folder.is_dir():
                problems.append(
                    Problem(
                        "missing_frames_folder",
                        "frames folder not found",
                        episode.episode_history,
                        path=str(folder),
                    )
                )
                continue
            files, broken = _list_frames(folder)
            for path, reason in broken:
                problems.append(Problem("broken_frame", reason, episode.episode_history, path=str(path)))
            if broken:
                continue
            if not files:
                others = sum(1 for _ in folder.iterdir())
                message = f"no *-rgb.png frames in the folder ({others} other entries)"
                problems.append(Problem("no_frames", message, episode.episode_history, path=str(folder)))
                continue
            self._frame_files[episode.episode_history] = files
            episode.frame_count = len(files)
        return LoadedSource(episodes, problems, len(records))

    def frames(self, episode: Episode, indices: list[int]) -> list[SourceFrame]:
        files = self._frame_files[episode.episode_history]
        chosen = []
        for i in indices:
            path = files[i]
            label = f"frame {path.relative_to(self.frames_dir).as_posix()}"
            try:
                stat = path.stat()
            except OSError:  # gone since it was listed: writing the episode reports it, by name
                chosen.append(SourceFrame(str(path), label, [path.name, None]))
                continue
            chosen.append(SourceFrame(str(path), label, [path.name, stat.st_size, stat.st_mtime_ns]))
        return chosen


def _list_frames(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The folder's rgb frames in order, and those that are no readable file, each with the reason.

    Checked here, before anything is written, because a frame symlink that dangles or loops would
    otherwise fail only when its episode is written, half-way through the run. `os.scandir` knows
    regular files from the directory listing, so only symlinks cost a `stat`.
    """
    files, broken = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.lower().endswith(RGB_SUFFIXES):
                continue
            path = Path(entry.path)
            try:
                # follows symlinks: a dangling one is no file, a looping one raises
                if entry.is_file():
                    files.append(path)
                    continue
                os.stat(path)
            except OSError as exc:
                what = f"a symlink to {os.readlink(path)!r}" if entry.is_symlink() else "an entry"
                broken.append((path, f"frame is {what} that cannot be followed ({exc.strerror})"))
            else:
                broken.append((path, "frame is not a regular file"))
    return sorted(files, key=_frame_order), sorted(broken)


def _frame_order(path: Path) -> tuple[int, str]:
    """Numeric order of 00012-rgb.png / 000012-rgb.png names; others after them, by name."""
    stem = path.name.split("-", 1)[0]
    return (int(stem), path.name) if stem.isdigit() else (2**63, path.name)


def _read_questions_file(path: Path) -> list[Any]:
    if not path.is_file():
        raise DataError(f"questions file {path} not found (pass --questions open-eqa-v0.json)")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"questions file {path} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(
            f"questions file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    if not isinstance(records, list):
        raise DataError(
            f"questions file {path} must hold a JSON list of questions, found a {type(records).__name__}"
        )
    if not records:
        raise DataError(f"questions file {path} holds no questions")
    return records


class HFSource:
    """A Hugging Face copy of OpenEQA: a hub id, a saved dataset directory, or parquet files."""

    def __init__(self, dataset: str, split: str = "train") -> None:
        self.dataset = dataset
        self.split = split
        self._first_row: dict[str, int] = {}
        self._column: Any = None  # pyarrow ChunkedArray of frame lists
        self.frames_column = ""
        self._base_dir: Path | None = None

    def describe(self) -> dict[str, str]:
        return {"hf_dataset": self.dataset, "hf_split": self.split, "frames_column": self.frames_column}

    def load(self) -> LoadedSource:
        import pyarrow as pa
        import pyarrow.compute as pc

        ds, self._base_dir = _open_hf_dataset(self.dataset, self.split)
        columns = list(ds.column_names)
        accepted = ", ".join(FRAME_COLUMNS)
        found = [c for c in FRAME_COLUMNS if c in columns]
        if not found:
            raise DataError(
                f"HF dataset {self.dataset} has no frames column: its columns are {', '.join(columns)}; eqakit accepts {accepted}"
            )
        self.frames_column = found[0]
        missing = [c for c in QUESTION_FIELDS if c not in columns]
        if missing:
            raise DataError(
                f"HF dataset {self.dataset} lacks question column(s) {', '.join(missing)}: its columns are {', '.join(columns)}"
            )
        column = ds.with_format("arrow")[self.frames_column]
        item = (
            column.type.value_type
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            else None
        )
        is_image = (
            item is not None and pa.types.is_struct(item) and {"bytes", "path"} <= {f.name for f in item}
        )
        if not (is_image or (item is not None and pa.types.is_string(item))):
            raise DataError(
                f"column {self.frames_column!r} of HF dataset {self.dataset} has type {column.type}; "
                "expected a list of images ({bytes, path}) or of image paths"
            )
        self._column = column
        records = ds.select_columns(
            [c for c in (*QUESTION_FIELDS, "extra_answers") if c in columns]
        ).to_list()
        for row, record in enumerate(records):
            episode = record.get("episode_history")
            if isinstance(episode, str):
                self._first_row.setdefault(episode, row)
        questions, problems = parse_questions(records, [f"row {i}" for i in range(len(records))])
        episodes = group_episodes(questions)
        lengths = pc.list_value_length(column).to_pylist()
        for episode in episodes:
            row = self._first_row[episode.episode_history]
            episode.frame_count = lengths[row] or 0
            if not episode.frame_count:
                message = f"row {row} (the episode's first) has no frames in column {self.frames_column!r}"
                problems.append(Problem("no_frames", message, episode.episode_history))
        return LoadedSource(episodes, problems, len(records))

    def frames(self, episode: Episode, indices: list[int]) -> list[SourceFrame]:
        row = self._first_row[episode.episode_history]
        values = self._column[row].values
        return [self._frame(values[i].as_py(), f"row {row} frame {i}") for i in indices]

    def _frame(self, item: Any, label: str) -> SourceFrame:
        data, path = (item.get("bytes"), item.get("path")) if isinstance(item, dict) else (None, item)
        if data:
            return SourceFrame(data, label, ["sha256", hashlib.sha256(data).hexdigest()])
        if not path:
            return SourceFrame(None, label, [label, None])
        resolved = Path(path) if Path(path).is_absolute() or self._base_dir is None else self._base_dir / path
        label = f"{label} ({path})"
        if not resolved.is_file():
            return SourceFrame(str(resolved), label, [str(resolved), None])
        stat = resolved.stat()
        return SourceFrame(str(resolved), label, [str(resolved), stat.st_size, stat.st_mtime_ns])


def _open_hf_dataset(spec: str, split: str) -> tuple[Any, Path | None]:
    """Load `spec` as a saved dataset directory, parquet files, or a hub id; returns it and its base dir."""
    import datasets

    path = Path(spec)
    if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"saved dataset {spec} has no split {split!r}; its splits are {', '.join(loaded)} (use --hf-split)"
                )
            loaded = loaded[split]
        return loaded, path
    files = _parquet_files(spec, split)
    if not files and (path.exists() or glob.has_magic(spec)):
        raise DataError(f"{spec} holds no parquet files and is not a dataset saved with save_to_disk")
    try:
        if files:
            loaded = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
            return loaded, files[0].parent
        return datasets.load_dataset(spec, split=split), None
    except Exception as exc:  # hub and parquet readers raise many kinds (not found, offline, corrupt file)
        raise DataError(
            f"cannot load HF dataset {spec!r} split {split!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _parquet_files(spec: str, split: str) -> list[Path]:
    """Parquet files named by a file, a glob, or a directory (there, the split's files if named by it)."""
    if glob.has_magic(spec):
        return sorted(Path(p) for p in glob.glob(spec, recursive=True) if p.endswith(".parquet"))
    path = Path(spec)
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    if not path.is_dir():
        return []
    files = sorted(path.rglob("*.parquet"))
    of_split = [
        f for f in files if f.name.startswith(f"{split}-") or f.stem == split or f.parent.name == split
    ]
    return of_split or files
