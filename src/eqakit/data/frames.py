"""Frames for `eqakit prepare`: which frames to keep, how big to make them, and writing an episode's set.

The geometry is chosen so the model's processor never resamples again at training or inference time:
Qwen3-VL cuts images into 16-pixel patches merged 2x2, so one visual token covers 32x32 pixels (28x28
for Qwen2.5-VL's 14-pixel patches: ``token_side``), and it resizes any image whose sides are not
multiples of that or whose area exceeds its ``max_pixels``. Frames written here have sides that are
multiples of ``token_side`` and an area within ``--max-pixels``, so they pass through untouched (as
long as the training config's ``image_max_pixels`` is not below ours) and their token count is known
now: ``(w / side) * (h / side)``.

`write_episode` is the unit of work `eqakit prepare` spreads over processes. It writes an episode's
frames into a temporary folder and renames it into place, so a kill at any moment leaves either a
finished episode folder or none; the folder's ``manifest.json`` records what it was made from, so a
rerun can tell finished work from stale work.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PIXELS_PER_TOKEN_SIDE = 32  # Qwen3-VL's 16-pixel patches, merged 2x2 into one visual token
DEFAULT_TOKENS = 196  # visual tokens a frame at most: 8 frames + a question fit cutoff_len 2048
DEFAULT_MAX_PIXELS = DEFAULT_TOKENS * PIXELS_PER_TOKEN_SIDE**2  # 200,704
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# Bicubic like the Qwen2-VL image processor; PIL's resize filters antialias when shrinking.
RESAMPLE = Image.Resampling.BICUBIC

FrameRef = str | bytes | None  # a file path, encoded image bytes, or None when the source holds no data


class FrameError(Exception):
    """A frame that cannot be read or decoded; the message names the frame."""


@dataclass(frozen=True)
class FrameOptions:
    """What decides the frames written; a change to any of these invalidates finished episodes."""

    num_frames: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int | None = None
    quality: int = 85
    token_side: int = PIXELS_PER_TOKEN_SIDE  # pixels per visual token side: patch x merge of the model

    def problems(self) -> list[str]:
        """Every invalid value, described with what is allowed (empty when all are valid)."""
        side = self.token_side
        found = []
        if self.num_frames < 1:
            found.append(f"--num-frames must be at least 1, got {self.num_frames}")
        if self.max_pixels < side * side:
            found.append(
                f"--max-pixels must be at least {side * side} (one {side}x{side} token), got {self.max_pixels}"
            )
        if self.max_side is not None and self.max_side < side:
            found.append(f"--max-side must be at least {side}, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            found.append(f"--quality must be between 1 and 100 (JPEG quality), got {self.quality}")
        return found


def select_frames(available: int, wanted: int) -> list[int]:
    """Indices of `wanted` frames spread evenly over `available`, like OpenEQA's baselines; all if fewer."""
    if available <= wanted:
        return list(range(available))
    return [int(i) for i in np.round(np.linspace(0, available - 1, wanted)).astype(int)]


def target_size(
    width: int,
    height: int,
    *,
    max_pixels: int,
    max_side: int | None = None,
    side: int = PIXELS_PER_TOKEN_SIDE,
) -> tuple[int, int]:
    """Output (width, height): multiples of ``side`` (one visual token's), area <= max_pixels, longest
    side <= max_side, no upscaling.

    The ideal scale is the largest that meets every limit (capped at 1); each side is then rounded down
    or up to a multiple of ``side``, and of the combinations that still meet the limits the one closest
    to the source's aspect ratio wins (then the larger). Rounding down on both sides always qualifies.
    """
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    if max_side is not None:
        scale = min(scale, max_side / max(width, height))
    limit_w, limit_h = max(side, width), max(side, height)  # never upscale, but keep one token at least

    def fits(w: int, h: int) -> bool:
        return (
            w * h <= max_pixels
            and (max_side is None or max(w, h) <= max_side)
            and w <= limit_w
            and h <= limit_h
        )

    ideal_w, ideal_h = width * scale / side, height * scale / side
    widths = {max(1, math.floor(ideal_w)), max(1, math.ceil(ideal_w))}
    heights = {max(1, math.floor(ideal_h)), max(1, math.ceil(ideal_h))}
    candidates = [(w * side, h * side) for w in widths for h in heights if fits(w * side, h * side)]
    if not candidates:  # only when the source is smaller than one token on a side
        return side, side
    aspect = math.log(width / height)
    return min(candidates, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


def visual_tokens(width: int, height: int, side: int = PIXELS_PER_TOKEN_SIDE) -> int:
    """Visual tokens for a frame whose sides are multiples of ``side`` (32: Qwen3-VL, 28: Qwen2.5-VL)."""
    return (width // side) * (height // side)


def convert_frame(ref: FrameRef, options: FrameOptions) -> tuple[bytes, tuple[int, int]]:
    """Decode, resize and JPEG-encode one frame; returns the JPEG bytes and their (width, height).

    Deterministic: the same input and options give the same bytes (no EXIF, no timestamps). JPEG
    sources are decoded at a reduced DCT scale when that still leaves at least the target size.
    """
    if ref is None:
        raise FrameError("no image data (neither bytes nor a path)")
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as image:
            size = target_size(
                *image.size, max_pixels=options.max_pixels, max_side=options.max_side, side=options.token_side
            )
            if image.format == "JPEG":
                image.draft("RGB", size)
            image.load()
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            resized = rgb if rgb.size == size else rgb.resize(size, RESAMPLE)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise FrameError(f"cannot read image: {exc}") from exc
    out = io.BytesIO()
    resized.save(out, format="JPEG", quality=options.quality)
    return out.getvalue(), size


@dataclass(frozen=True)
class EpisodeJob:
    """One episode's frames to write: sources in output order, and the manifest that marks it done."""

    folder: str  # final folder, e.g. DIR/open_eqa_frames/<episode_id>
    refs: tuple[FrameRef, ...]
    labels: tuple[str, ...]  # how each source frame is named in messages
    key: dict  # options and source identities; a finished folder with the same key is reused
    options: FrameOptions


@dataclass(frozen=True)
class EpisodeResult:
    sizes: tuple[tuple[int, int], ...] = ()  # (width, height) of each frame written
    error: str | None = None  # names the frame that failed
    error_path: str | None = None
    reused: bool = False  # found finished by an earlier run


def finished_sizes(folder: Path, key: dict) -> tuple[tuple[int, int], ...] | None:
    """The frame sizes of a finished episode folder made from `key`, or None if it must be (re)made."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return None
    sizes = tuple((int(w), int(h)) for w, h in manifest.get("sizes", ()))
    names = [f"{i:03d}.jpg" for i in range(len(sizes))]
    if len(sizes) != len(key["sources"]) or not all((folder / n).is_file() for n in names):
        return None
    return sizes


def write_episode(job: EpisodeJob) -> EpisodeResult:
    """Write 000.jpg, 001.jpg, ... and manifest.json into a temporary folder, then rename it into place."""
    final = Path(job.folder)
    tmp = final.with_name(f".tmp.{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sizes = []
    try:
        for index, (ref, label) in enumerate(zip(job.refs, job.labels, strict=True)):
            try:
                data, size = convert_frame(ref, job.options)
            except FrameError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                return EpisodeResult(
                    error=f"{label}: {exc}", error_path=ref if isinstance(ref, str) else None
                )
            (tmp / f"{index:03d}.jpg").write_bytes(data)
            sizes.append(size)
        manifest = {"version": MANIFEST_VERSION, "key": job.key, "sizes": sizes}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    except BaseException:  # a full disk: the space the half-written episode took is given back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, final)
    return EpisodeResult(sizes=tuple(sizes))


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is first moved aside, so `dst` is never half-written."""
    if dst.exists():
        old = dst.with_name(f".old.{dst.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)
