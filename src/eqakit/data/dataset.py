"""Datasets registered in ``dataset_dir/dataset_info.json``, read the way LLaMA-Factory reads them.

Two formats, as in LLaMA-Factory: ``alpaca`` (instruction/input/output columns; instruction and
input joined by "\\n"; optional system and history columns) and ``sharegpt`` (a list of
{from, value} turns). A preference dataset (``ranking: true``) has ``chosen`` and ``rejected``
answers instead of one (strings in alpaca, {from, value} turns in sharegpt): each row is one pair,
the chosen answer as the sample's last message and the rejected one in ``Sample.rejected``. An ``images`` column lists image paths relative to ``media_dir`` (default:
``dataset_dir``), which must lead into dataset_dir or media_dir unless the user opts out
(``allow_outside_media``); ``<image>`` placeholders in the text bind to them in order. A ``videos``
column lists videos, each a video file path or a list of frame image paths, bound to ``<video>``
placeholders in order (`eqakit.data.video` reads them). Extra columns
(question_id, category, episode_history, extra_answers, ...) are kept as metadata so predictions
can be scored per category.

    samples = load_samples("open_eqa_test", dataset_dir="data", max_samples=100)
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eqakit.data.template import Message
from eqakit.data.video import VideoSource
from eqakit.errors import DataError

ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": None,
    "history": None,
    "images": None,
    "videos": None,
}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": None, "images": None, "videos": None}
RANKING_COLUMNS = {"chosen": "chosen", "rejected": "rejected"}  # a preference dataset's, either format
MEDIA_PLACEHOLDERS = ("<image>", "<video>")
UNREAD_PLACEHOLDERS = ("<audio>",)  # LLaMA-Factory's; refused rather than trained on as text
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
}


@dataclass
class Sample:
    """One conversation: messages whose ``<image>`` placeholders bind to ``images`` in order."""

    messages: list[Message]
    images: list[Path]
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "file:line", for error messages
    videos: list[VideoSource] = field(default_factory=list)  # bound to <video> placeholders in order
    rejected: str | None = None  # a preference pair's rejected answer (the chosen one ends messages)

    @property
    def prompt_messages(self) -> list[Message]:
        """The conversation up to (not including) its final answer: what the model is asked."""
        return (
            self.messages[:-1]
            if self.messages and self.messages[-1]["role"] == "assistant"
            else self.messages
        )

    @property
    def answer(self) -> str:
        last = self.messages[-1] if self.messages else {}
        return last.get("content", "") if last.get("role") == "assistant" else ""


def read_dataset_info(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / "dataset_info.json"
    if not path.is_file():
        raise DataError(
            f"{path} not found: dataset_dir must hold a dataset_info.json (create one with `eqakit prepare openeqa`)"
        )
    try:
        info = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise DataError(f"{path} must map dataset names to their descriptions")
    return info


@dataclass(frozen=True)
class RegisteredDataset:
    """One entry of dataset_info.json as a page lists it: its file, format and row count."""

    name: str
    file_name: str
    formatting: str
    rows: int | None  # None when the file cannot be read (``problem`` says why)
    problem: str = ""


def registered_datasets(dataset_dir: str | Path) -> list[RegisteredDataset]:
    """The datasets dataset_dir registers, each with its row count; raises DataError for a missing or
    malformed dataset_info.json. Files are counted once per (size, mtime)."""
    dataset_dir = Path(dataset_dir)
    found = []
    for name, entry in read_dataset_info(dataset_dir).items():
        entry = entry if isinstance(entry, dict) else {}
        file_name = str(entry.get("file_name", ""))
        rows, problem = None, ""
        if not file_name:
            problem = "no file_name (eqakit reads local files only)"
        else:
            try:
                rows = _count_rows(dataset_dir / file_name)
            except (DataError, OSError) as exc:
                problem = str(exc)
        found.append(
            RegisteredDataset(name, file_name, str(entry.get("formatting", "alpaca")), rows, problem)
        )
    return found


def _count_rows(path: Path) -> int:
    stat = path.stat() if path.is_file() else None
    return _count_rows_of(path, stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1)


@functools.lru_cache(maxsize=64)
def _count_rows_of(path: Path, size: int, mtime_ns: int) -> int:
    return len(_read_rows(path))


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; invalid bytes are an error naming the line they are on.

    Python's decode error gives a byte offset only, which is of no use for finding the row.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8: byte {data[exc.start]:#04x} at byte {column} of line {line} "
            f"(file offset {exc.start}, {exc.reason}); save the file as UTF-8"
        ) from None


def _read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a .json (list) or .jsonl file, each with its "file:line" for error messages."""
    if not path.is_file():
        raise DataError(f"dataset file {path} not found")
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise DataError(f"{path} must hold a JSON list of rows")
        return [(f"{path}[{i}]", row) for i, row in enumerate(data)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number} is not valid JSON: {exc}") from None
    return rows


def _lone_surrogate(value: Any, key: str) -> str | None:
    """Where in `value` (``key``, ``key[2]``, ``key[0]['value']``) a string UTF-8 cannot encode is.

    JSON's ``\\ud800`` escape is valid JSON but decodes to a lone surrogate, which no tokenizer
    takes: caught here, the row is named; later, it is a TypeError deep in the tokenizer.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{key} (character {exc.start})"
    elif isinstance(value, list | dict):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for index, item in items:
            if (bad := _lone_surrogate(item, f"{key}[{index!r}]")) is not None:
                return bad
    return None


def _field(row: dict[str, Any], column: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if column not in row:
        raise DataError(f"{where}: missing column {column!r} (the row has: {', '.join(sorted(row))})")
    value = row[column]
    if not isinstance(value, kind):
        raise DataError(
            f"{where}: column {column!r} must be a {getattr(kind, '__name__', kind)}, got {type(value).__name__}"
        )
    return value


def alpaca_messages(
    row: dict[str, Any], columns: dict[str, str | None], where: str
) -> tuple[list[Message], str | None]:
    """An alpaca row's messages and system prompt (the judge reads a prepared split's questions so too)."""
    prompt = _field(row, columns["prompt"], where)
    query = row.get(columns["query"]) if columns.get("query") else None
    if query:
        prompt = f"{prompt}\n{query}"
    messages: list[Message] = []
    if columns.get("history") and row.get(columns["history"]):
        for turn in _field(row, columns["history"], where, list):
            if not (isinstance(turn, list | tuple) and len(turn) == 2):
                raise DataError(f"{where}: history entries must be [question, answer] pairs")
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages.append({"role": "user", "content": prompt})
    response = row.get(columns["response"]) if columns.get("response") else None
    if response is not None:
        if not isinstance(response, str):
            raise DataError(f"{where}: column {columns['response']!r} must be a string")
        messages.append({"role": "assistant", "content": response})
    system = row.get(columns["system"]) if columns.get("system") else None
    return messages, system


def _sharegpt(
    row: dict[str, Any], columns: dict[str, str | None], tags: dict[str, str], where: str
) -> tuple[list[Message], str | None]:
    turns = _field(row, columns["messages"], where, list)
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    system = row.get(columns["system"]) if columns.get("system") else None
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        role = roles.get(turn.get(tags["role_tag"])) if isinstance(turn, dict) else None
        if role is None:
            raise DataError(
                f"{where}: turn {i} has role {turn.get(tags['role_tag']) if isinstance(turn, dict) else turn!r}; "
                f"expected one of {', '.join(roles)}"
            )
        content = turn.get(tags["content_tag"], "")
        if role == "system":
            if i != 0:
                raise DataError(f"{where}: a system turn may only come first")
            system = content
            continue
        messages.append({"role": role, "content": content})
    return messages, system


class _MediaRoots:
    """Where a dataset's images may be: inside dataset_dir or media_dir, after resolving symlinks.

    A row's image path is read as given, so without this check a dataset file could make a
    training run read any file the user can read (``../../../../etc/passwd``, an absolute path, a
    symlink inside the directory pointing out of it). ``allow_outside_media`` lifts it, for images
    kept elsewhere on purpose (e.g. a frames folder symlinked in from another disk).
    """

    def __init__(self, dataset_dir: Path, media: Path, allow_outside: bool) -> None:
        self.roots = {dataset_dir.resolve(), media.resolve()}
        self.allow_outside = allow_outside
        self.checked: set[Path] = set()

    def check(self, path: Path, image: str, where: str, what: str = "image") -> None:
        if self.allow_outside or path in self.checked:
            return
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            raise DataError(f"{where}: {what} {image!r} cannot be resolved ({exc})") from None
        if not any(resolved.is_relative_to(root) for root in self.roots):
            roots = " or ".join(sorted(str(r) for r in self.roots))
            raise DataError(
                f"{where}: {what} {image!r} resolves to {resolved}, outside {roots}; move it inside, "
                f"or set allow_outside_media: true if {what}s outside the dataset directory are meant"
            )
        self.checked.add(path)


def _video(video: Any, place: str, media: Path, roots: _MediaRoots) -> VideoSource:
    """A videos-column item: a video file path, or a non-empty list of frame image paths."""

    def path_of(item: Any, where: str, what: str) -> Path:
        if not isinstance(item, str):
            raise DataError(f"{where}: a {what} path must be a string, got {type(item).__name__}")
        path = Path(item)
        path = path if path.is_absolute() else media / path
        roots.check(path, item, where, what)
        return path

    if isinstance(video, list):
        if not video:
            raise DataError(f"{place}: a video given as frames needs at least one frame")
        return VideoSource(
            frames=tuple(path_of(f, f"{place} frame {j}", "frame") for j, f in enumerate(video))
        )
    return VideoSource(file=path_of(video, place, "video"))


def load_samples(
    names: str,
    dataset_dir: str | Path,
    media_dir: str | Path | None = None,
    max_samples: int | None = None,
    *,
    allow_outside_media: bool = False,
    ranking: bool = False,
) -> list[Sample]:
    """All samples of the comma-separated dataset names, in file order (max_samples per dataset).

    Image paths must resolve inside dataset_dir or media_dir unless ``allow_outside_media``.
    ``ranking``: the datasets must be preference datasets (``stage: dpo``), else must not be, as
    LLaMA-Factory requires.
    """
    dataset_dir = Path(dataset_dir)
    media = Path(media_dir) if media_dir else dataset_dir
    roots = _MediaRoots(dataset_dir, media, allow_outside_media)
    info = read_dataset_info(dataset_dir)
    samples: list[Sample] = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in info:
            close = difflib.get_close_matches(name, list(info), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; it has: {', '.join(info) or 'nothing'}"
            raise DataError(
                f"dataset {name!r} is not registered in {dataset_dir / 'dataset_info.json'}{hint}"
            )
        entry = info[name]
        if "file_name" not in entry:
            raise DataError(
                f"dataset {name!r}: eqakit reads local files only; set file_name in dataset_info.json"
            )
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            raise DataError(
                f"dataset {name!r}: formatting {formatting!r} is not supported (alpaca or sharegpt)"
            )
        if bool(entry.get("ranking", False)) != ranking:
            raise DataError(
                f"dataset {name!r} is a preference dataset (ranking: true in {dataset_dir / 'dataset_info.json'}): "
                "train it with stage: dpo"
                if not ranking
                else f"stage: dpo trains on preference pairs, and dataset {name!r} has none: register one "
                "with ranking: true and chosen/rejected columns"
            )
        defaults = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
        if ranking:  # the answers are chosen/rejected: an alpaca response column is not read
            defaults = {
                **defaults,
                **RANKING_COLUMNS,
                **({"response": None} if formatting == "alpaca" else {}),
            }
        registered = entry.get("columns", {})
        unknown = sorted(set(registered) - set(defaults))
        if unknown:  # LLaMA-Factory's videos, audios, tools, chosen/rejected, kto_tag: never dropped silently
            raise DataError(
                f"dataset {name!r} in {dataset_dir / 'dataset_info.json'}: column "
                f"{', '.join(repr(c) for c in unknown)} is not read by eqakit ({formatting} reads "
                f"{', '.join(defaults)}); its data would be lost, so remove it or the dataset's rows that need it"
            )
        columns = {**defaults, **registered}
        tags = {**SHAREGPT_TAGS, **entry.get("tags", {})}
        used = {c for c in columns.values() if c}
        rows = _read_rows(dataset_dir / entry["file_name"])
        for where, row in rows[: max_samples or None]:
            if not isinstance(row, dict):
                raise DataError(f"{where}: a row must be a JSON object")
            for column, value in row.items():
                if (bad := _lone_surrogate(value, repr(column))) is not None:
                    raise DataError(
                        f"{where}: column {bad} holds a lone surrogate (an unpaired \\uD800-\\uDFFF "
                        "escape), which is not valid text; fix or remove it"
                    )
            if formatting == "alpaca":
                messages, system = alpaca_messages(row, columns, where)
            else:
                messages, system = _sharegpt(row, columns, tags, where)
            rejected = None
            if ranking:
                chosen, rejected = _pair(row, columns, tags, formatting, where)
                if messages and messages[-1]["role"] == "assistant":
                    raise DataError(
                        f"{where}: a preference row's conversation must end with the user's turn; its "
                        f"answers are the {columns['chosen']!r} and {columns['rejected']!r} columns"
                    )
                messages.append({"role": "assistant", "content": chosen})
            for placeholder in UNREAD_PLACEHOLDERS:
                if any(placeholder in str(m.get("content", "")) for m in messages):
                    raise DataError(
                        f"{where}: the text holds a {placeholder} placeholder, and eqakit reads images and "
                        "videos only (<image> with an images column, <video> with a videos column); remove "
                        "the row or turn its media into images or videos"
                    )
            images = []
            if columns.get("images") and row.get(columns["images"]):
                for i, image in enumerate(_field(row, columns["images"], where, list)):
                    place = f"{where}: column {columns['images']!r} item {i}"
                    if not isinstance(image, str):
                        raise DataError(
                            f"{place}: an image path must be a string, got {type(image).__name__}"
                        )
                    path = Path(image)
                    path = path if path.is_absolute() else media / path
                    roots.check(path, image, place)
                    images.append(path)
            videos = []
            if columns.get("videos") and row.get(columns["videos"]):
                for i, video in enumerate(_field(row, columns["videos"], where, list)):
                    videos.append(
                        _video(video, f"{where}: column {columns['videos']!r} item {i}", media, roots)
                    )
            meta = {k: v for k, v in row.items() if k not in used}
            samples.append(Sample(messages, images, system, meta, where, videos, rejected))
    return samples


def _pair(
    row: dict[str, Any], columns: dict[str, str | None], tags: dict[str, str], formatting: str, where: str
) -> tuple[str, str]:
    """A preference row's chosen and rejected answers: two different, non-empty texts without media
    placeholders (the pair shares the prompt's images and videos)."""
    answers = []
    for side in ("chosen", "rejected"):
        column = columns[side]
        if formatting == "alpaca":
            text = _field(row, column, where)
        else:
            turn = _field(row, column, where, dict)
            if turn.get(tags["role_tag"]) != tags["assistant_tag"]:
                raise DataError(
                    f"{where}: column {column!r} must be the assistant's turn ({tags['role_tag']}: "
                    f"{tags['assistant_tag']!r}), got {tags['role_tag']}: {turn.get(tags['role_tag'])!r}"
                )
            text = turn.get(tags["content_tag"])
            if not isinstance(text, str):
                raise DataError(f"{where}: column {column!r} has no {tags['content_tag']!r} text")
        if not text.strip():
            raise DataError(f"{where}: column {column!r} is empty")
        placeholder = next((p for p in MEDIA_PLACEHOLDERS if p in text), None)
        if placeholder:
            raise DataError(
                f"{where}: column {column!r} holds a {placeholder} placeholder; a pair's answers share "
                "the prompt's images and videos, so media belong in the prompt"
            )
        answers.append(text)
    if answers[0] == answers[1]:
        raise DataError(
            f"{where}: columns {columns['chosen']!r} and {columns['rejected']!r} are the same answer"
        )
    return answers[0], answers[1]
