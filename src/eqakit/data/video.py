"""Videos as Qwen-VL models see them: which frames, at what times, of what size.

A video is either a list of frame images (already sampled, as LLaMA-Factory takes them) or a video
file (on disk, or its bytes from an API request), decoded with PyAV (the backend transformers' video loader uses by default). Frames are
chosen the way LLaMA-Factory 0.9.5 chooses them:

- a video file: ``min(frames, video_maxlen, floor(duration * video_fps))`` frames spread evenly over
  the whole video (at least one); a frame's time is its index over the stream's average frame rate;
- a frame list: every frame, at ``1 / video_fps`` seconds apart; a list longer than ``video_maxlen`` is
  sampled down evenly (LLaMA-Factory would feed all of them) and the caller reports it.

Qwen-VL models encode a video two frames at a time (its temporal patch); an odd number of frames gets
its last frame repeated, as the video processor does. Probing reads sizes and frame counts only;
`decode` produces the pixels when a batch needs them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

TEMPORAL_PATCH = 2  # frames per temporal patch: every supported model's (Geometry.of checks it)


class VideoError(ValueError):
    """A video that cannot be read, is empty, or has frames of different sizes."""


@dataclass(frozen=True)
class VideoSource:
    """Where a video comes from: a list of frame image files, one video file, or a video file's
    bytes (an API request's data URI)."""

    frames: tuple[Path, ...] = ()
    file: Path | None = None
    data: bytes | None = None
    # The FFmpeg demuxers it may be read as (a declared type's); "" is any of VIDEO_CONTAINERS.
    containers: str = ""

    def describe(self) -> str:
        if self.data is not None:
            return f"the video ({len(self.data)} bytes)"
        return (
            f"video {self.file}"
            if self.file is not None
            else f"{len(self.frames)} frames from {self.frames[0]}"
        )

    @property
    def is_container(self) -> bool:
        """A video file (on disk or in memory) rather than a list of frames."""
        return self.file is not None or self.data is not None


@dataclass(frozen=True)
class VideoInfo:
    """A probed video: its frame size, the frames chosen (indices into the source) and the rate
    that times them (frame ``i`` is at ``i / fps`` seconds: a file's average frame rate, a frame
    list's video_fps).

    ``indices`` always has an even length (the last frame repeated when needed); ``available`` is
    how many frames the source has; ``sampled_down`` marks a frame list longer than
    ``video_maxlen``, sampled down to it (reported).
    """

    size: tuple[int, int]  # (width, height)
    indices: tuple[int, ...]
    fps: float
    available: int
    sampled_down: bool = False

    @property
    def clips(self) -> int:
        return len(self.indices) // TEMPORAL_PATCH

    @property
    def times(self) -> tuple[float, ...]:
        """Each chosen frame's time, in seconds."""
        return tuple(i / self.fps for i in self.indices)

    def keep(self, clips: int) -> VideoInfo:
        """The same video with only ``clips`` temporal patches, spread evenly over the chosen frames."""
        if clips >= self.clips:
            return self
        pick = np.linspace(0, self.clips - 1, clips).round().astype(int)
        rows = [c * TEMPORAL_PATCH + i for c in pick for i in range(TEMPORAL_PATCH)]
        return replace(self, indices=tuple(self.indices[r] for r in rows))

    @property
    def sampled_fps(self) -> float:
        """The rate of the chosen frames (LLaMA-Factory's ``fps_per_video`` for Qwen2.5-VL): a frame
        list's video_fps, or a file's chosen frames over its duration."""
        return len(set(self.indices)) * self.fps / max(self.available, 1)

    def clip_times(self) -> list[float]:
        """Each temporal patch's time: the mean of its first and last frame's (Qwen3VLProcessor's rule)."""
        t = self.times
        return [(t[i] + t[i + TEMPORAL_PATCH - 1]) / 2 for i in range(0, len(t), TEMPORAL_PATCH)]


@dataclass(frozen=True)
class Video:
    """A decoded video: its probed ``info`` and the chosen frames (``info.indices`` order)."""

    info: VideoInfo
    frames: tuple[Image.Image, ...]

    def keep(self, kept: VideoInfo) -> Video:
        """The video cut to ``kept`` (from `VideoInfo.keep`: a subset of this video's frames)."""
        by_index = dict(zip(self.info.indices, self.frames, strict=True))
        return Video(kept, tuple(by_index[i] for i in kept.indices))


def probe_bounded(
    source: VideoSource, fps: float, maxlen: int, max_pixels: int, target_pixels: int, limit: str = ""
) -> VideoInfo:
    """`probe`, refusing frames over ``max_pixels`` (the setting named ``limit``) before any is
    decoded and shrinking (`reduced`) those much larger than ``target_pixels``: what a video sent to
    a server is decoded at."""
    info = probe(source, fps, maxlen)
    check_frame_size(info, max_pixels, limit)
    return reduced(info, target_pixels)


def check_frame_size(info: VideoInfo, max_pixels: int, limit: str = "") -> None:
    """Refuse a video whose header announces frames over ``max_pixels`` (the setting named ``limit``)."""
    width, height = info.size
    if width * height > max_pixels:
        named = f" ({limit})" if limit else ""
        raise VideoError(
            f"the video's frames are {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels}{named}; send a smaller video"
        )


def load(source: VideoSource, fps: float, maxlen: int) -> Video:
    """Probe and decode a video (what predict sends the engine)."""
    info = probe(source, fps, maxlen)
    return Video(info, tuple(decode(source, info)))


def from_frames(frames: list[Image.Image], fps: float, maxlen: int) -> Video:
    """A video given as decoded frames (an API request's frame list), chosen as a frame list's are."""
    sizes = sorted({im.size for im in frames})
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise VideoError(f"the frames of one video must have one size; these have {shown}")
    info = listed(len(frames), sizes[0] if sizes else (0, 0), fps, maxlen)
    return Video(info, tuple(frames[i] for i in info.indices))


def reduced(info: VideoInfo, target_pixels: int) -> VideoInfo:
    """``info`` with a frame size shrunk by a whole factor while it stays over 4x ``target_pixels``
    (2x per side: the processor's own resize still has detail to work from), so a long HD video
    sent to the API is never held at full size."""
    width, height = info.size
    if width * height <= 4 * target_pixels:
        return info
    factor = max(1, int(math.sqrt(width * height / (4 * target_pixels))))
    return replace(info, size=(max(1, width // factor), max(1, height // factor)))


def _even(indices: list[int]) -> tuple[int, ...]:
    """The indices with the last repeated up to a whole number of temporal patches (the processor's pad)."""
    while len(indices) % TEMPORAL_PATCH:
        indices.append(indices[-1])
    return tuple(indices)


def probe(source: VideoSource, fps: float, maxlen: int) -> VideoInfo:
    """Choose a video's frames and read their size without decoding pixels (a file: its header)."""
    if source.is_container:
        return _probe_file(source, fps, maxlen)
    if not source.frames:
        raise VideoError("the video has no frames")
    sizes = set()
    for path in source.frames:
        try:
            with Image.open(path) as image:
                sizes.add(image.size)
        except FileNotFoundError:
            raise VideoError(f"frame file not found: {path}") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise VideoError(f"frame {path} cannot be read ({exc})") from None
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        raise VideoError(f"the frames of one video must have one size; these have {shown}")
    return listed(len(source.frames), sizes.pop(), fps, maxlen)


def listed(count: int, size: tuple[int, int], fps: float, maxlen: int) -> VideoInfo:
    """The frames chosen of a video given as ``count`` frames of one ``size``: all, 1/fps seconds apart,
    or ``maxlen`` of them spread evenly."""
    if count < 1:
        raise VideoError("the video has no frames")
    chosen = list(range(count))
    if count > maxlen:
        chosen = [int(i) for i in np.linspace(0, count - 1, maxlen).round().astype(int)]
    return VideoInfo(size, _even(chosen), fps, count, count > maxlen)


# The containers FFmpeg may read a video as (its demuxers' names). FFmpeg picks a demuxer by
# sniffing the bytes, whatever a file or data URI claims to be; some demuxers (concat, HLS and other
# playlists, image2 sequences) open further files, so bytes from a request could read files beside
# the server. None of these does.
VIDEO_CONTAINERS = "mov,mp4,matroska,webm,avi,mpegts,flv,ogg"


def _open(source: VideoSource):  # noqa: ANN202 - av's container type
    import av

    name = source.describe()
    if source.file is not None and not Path(source.file).is_file():
        raise VideoError(f"video file not found: {source.file}")
    try:
        container = av.open(
            io.BytesIO(source.data) if source.data is not None else str(source.file),
            "r",
            options={"format_whitelist": source.containers or VIDEO_CONTAINERS},
        )
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        readable = (
            f"a {source.containers} container, as its type says"
            if source.containers
            else "a container eqakit reads (MP4/MOV, Matroska/WebM, AVI, MPEG-TS, FLV, Ogg)"
        )
        raise VideoError(f"{name} cannot be read as a video in {readable}: {exc}") from None
    streams = [s for s in container.streams if s.type == "video"]
    if not streams:
        container.close()
        raise VideoError(f"{name} has no video stream")
    return container, streams[0]


def _probe_file(source: VideoSource, fps: float, maxlen: int) -> VideoInfo:
    import av

    name = source.describe()
    container, stream = _open(source)
    try:
        size = (stream.width, stream.height)
        total = stream.frames
        rate = float(stream.average_rate) if stream.average_rate else 0.0
        duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
        if not total or not rate:  # a header without counts: count by demuxing (no decoding)
            total = sum(1 for packet in container.demux(stream) if packet.size)
            rate = rate or (total / duration if duration else fps)
        duration = duration or (total / rate if rate else 0.0)
    except av.FFmpegError as exc:
        raise VideoError(f"{name} cannot be read ({exc})") from None
    finally:
        container.close()
    if not total or not size[0] or not size[1]:
        raise VideoError(f"{name} has no frames")
    count = min(total, maxlen, max(1, math.floor(duration * fps)))
    chosen = [int(i) for i in np.linspace(0, total - 1, count).astype(np.int32)]
    return VideoInfo(size, _even(chosen), rate, total)


FrameCheck = Callable[[int, int], None]


def open_rgb(path: Path) -> Image.Image:
    """An image file as every stage feeds it to the model: decoded, RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


def decode(
    source: VideoSource,
    info: VideoInfo,
    on_frame: FrameCheck | None = None,
    max_frame_pixels: int | None = None,
) -> list[Image.Image]:
    """The chosen frames as RGB images of ``info.size``, in ``info.indices`` order (repeats included);
    a video file's frames are scaled to ``info.size`` while decoding when it is smaller (`reduced`).

    A server bounds what a request's video costs: ``on_frame(width, height)`` is called for every
    frame decoded (chosen or not, at the size it really has, which a stream may change mid-file)
    and may raise `VideoError` to stop; FFmpeg refuses a frame over ``max_frame_pixels`` before it
    allocates it.
    """
    if not source.is_container:
        frames = {i: open_rgb(source.frames[i]) for i in sorted(set(info.indices))}
    else:
        import av

        wanted = set(info.indices)
        frames = {}
        name = source.describe()
        container, stream = _open(source)
        if max_frame_pixels is not None:
            stream.codec_context.options = {"max_pixels": str(max_frame_pixels)}
        try:
            for index, frame in enumerate(container.decode(stream)):
                if on_frame is not None:
                    on_frame(frame.width, frame.height)
                if index in wanted:
                    if (frame.width, frame.height) != info.size:
                        frame = frame.reformat(width=info.size[0], height=info.size[1])
                    frames[index] = frame.to_image().convert("RGB")
                if len(frames) == len(wanted):
                    break
        except av.FFmpegError as exc:
            larger = f": a frame over {max_frame_pixels} pixels, or corrupt data" if max_frame_pixels else ""
            raise VideoError(f"{name} cannot be decoded ({exc}){larger}") from None
        finally:
            container.close()
        missing = sorted(wanted - set(frames))
        if missing:
            raise VideoError(f"{name} ends before frame {missing[0]}")
    out = [frames[i] for i in info.indices]
    if any(im.size != info.size for im in out):
        raise VideoError(f"the frames of {source.describe()} changed size since they were probed")
    return out
