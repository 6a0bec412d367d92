"""A dataset's images and videos, from rows to pixels: one path for every consumer.

Training's planning, predict, the training vision cache, the judge and the web UI's OpenEQA tab read
a dataset's media through here, so they agree on what is wrong with a row (`MediaCheck`: every
problem of every row at once, in one wording), on the pixels (`MediaCache`: each file decoded once,
RGB), on which questions share frames (`media_key`) and on the question a person reads
(`question_text`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from eqakit.data.dataset import Sample
from eqakit.data.template import mismatched_media, readable
from eqakit.data.video import Video, VideoError, VideoInfo, VideoSource, decode, open_rgb, probe
from eqakit.errors import DataError

if TYPE_CHECKING:  # encode imports torch, which the judge and the OpenEQA tab's listing never need
    from eqakit.data.encode import Plan, VideoBudget

SHOWN = 20  # problems listed in one error; the rest are counted


def raise_problems(problems: list[str], what: str = "bad images or videos") -> None:
    """Stop on a dataset's problems (media: `MediaCheck.problems` of every row), the first
    ``SHOWN`` listed one a line and the rest counted."""
    if problems:
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise DataError(f"{what} in the dataset:\n  " + "\n  ".join(problems[:SHOWN]) + more)


class MediaCheck:
    """Image sizes and probed videos, each file read once, and each row's media problems.

    Images are decoded whole, so a truncated file stops the run before any work rather than midway;
    videos are probed without decoding pixels (a file's header, a frame list's sizes). A problem is
    reported for every row it affects (an episode's missing frame names each of its questions), so
    the report is the same whether rows are checked in one process or in several.
    """

    def __init__(self, budget: VideoBudget) -> None:
        self.budget = budget
        self._images: dict[Path, tuple[int, int] | str] = {}
        self._videos: dict[VideoSource, VideoInfo | str] = {}

    def problems(self, sample: Sample) -> list[str]:
        """What is wrong with the row's media, each line naming the row (``sample.source``):
        placeholders that disagree with its images or videos, files missing or unreadable."""
        found = mismatched_media(sample.messages, len(sample.images), len(sample.videos))
        found += [size for size in map(self._image, sample.images) if isinstance(size, str)]
        found += [
            f"video {i}: {info}"
            for i, info in enumerate(map(self._video, sample.videos))
            if isinstance(info, str)
        ]
        return [f"{sample.source}: {problem}" for problem in found]

    def sizes(self, sample: Sample) -> list[tuple[int, int]]:
        """The row's image sizes (a row without `problems`)."""
        return [self._image(path) for path in sample.images]  # type: ignore[misc]

    def videos(self, sample: Sample) -> list[VideoInfo]:
        """The row's probed videos (a row without `problems`)."""
        return [self._video(source) for source in sample.videos]  # type: ignore[misc]

    def _image(self, path: Path) -> tuple[int, int] | str:
        if path not in self._images:
            try:
                with Image.open(path) as image:
                    image.load()
                    self._images[path] = image.size
            except FileNotFoundError:
                self._images[path] = f"image file not found: {path}"
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                self._images[path] = f"image {path} cannot be read ({exc})"
        return self._images[path]

    def _video(self, source: VideoSource) -> VideoInfo | str:
        if source not in self._videos:
            try:
                self._videos[source] = probe(source, self.budget.fps, self.budget.maxlen)
            except VideoError as exc:
                self._videos[source] = str(exc)
        return self._videos[source]


def check_media(
    samples: list[Sample], budget: VideoBudget
) -> tuple[list[list[tuple[int, int]]], list[list[VideoInfo]]]:
    """Every row's image sizes and probed videos; DataError listing every row's media problems."""
    check = MediaCheck(budget)
    raise_problems([problem for sample in samples for problem in check.problems(sample)])
    return [check.sizes(s) for s in samples], [check.videos(s) for s in samples]


class MediaCache:
    """Decoded images (RGB) and videos' chosen frames, the least recently used dropped beyond
    ``size``: an episode's frames are decoded once while its questions are answered or trained on,
    also when several threads ask for them at the same time. A copy sent to another process (a
    DataLoader worker) starts empty."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._entries: OrderedDict[Any, Future[Any]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"size": self.size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["size"])

    def load(self, sample: Sample, videos: list[VideoInfo]) -> tuple[list[Image.Image], list[Video]]:
        """The row's images and its videos' chosen frames (``videos``: as probed or planned);
        DataError naming the row and the file that cannot be decoded."""
        try:
            return [self.image(path) for path in sample.images], [
                self.video(source, info) for source, info in zip(sample.videos, videos, strict=True)
            ]
        except DataError as exc:
            raise DataError(f"{sample.source}: {exc}") from None

    def image(self, path: Path) -> Image.Image:
        return self._get(path, f"image {path}", lambda: open_rgb(path))

    def video(self, source: VideoSource, info: VideoInfo) -> Video:
        return self._get((source, info), source.describe(), lambda: Video(info, tuple(decode(source, info))))

    def _get(self, key: Any, what: str, make: Callable[[], Any]) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if mine := entry is None:
                entry = self._entries[key] = Future()
                if len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            self._entries.move_to_end(key)
        if mine:
            try:
                entry.set_result(make())
            except (OSError, ValueError) as exc:  # VideoError is a ValueError
                entry.set_exception(DataError(f"{what} cannot be decoded ({exc})"))
        return entry.result()


def media_key(sample: Sample, plan: Plan | None = None) -> tuple[Any, ...]:
    """What an episode's questions share, the key training's packing and episode batches and
    predict's order go by: the row's image files and videos. With the row's ``plan``, each video as
    planned (its chosen frames and pixel cap): only questions planned alike share its features."""
    images = tuple(str(path) for path in sample.images)
    if plan is None:
        return images + tuple(str(source) for source in sample.videos)
    return images + tuple(
        (source, video.info.indices, video.max_pixels)
        for source, video in zip(sample.videos, plan.videos, strict=True)
    )


def question_text(sample: Sample) -> str:
    """The question as a person reads it (what the web UI shows and an LLM judge is sent): the
    last user message without its image and video placeholders."""
    content = sample.prompt_messages[-1]["content"] if sample.prompt_messages else ""
    return readable(content) if isinstance(content, str) else ""
