"""A request's messages to the transformers engine's model inputs, through the same template and
encoder as training.

`eqakit.engine.prompt.plan_request` renders and tokenizes the prompt and fits its images into
``cutoff_len`` (scaling them down rather than cutting image tokens). Here the plan's
image pads are expanded to one token per 32x32 pixels, M-RoPE positions are computed, and the
prompt is marked with the points where its prefix may be shared with other requests: after each
image (the frames of an OpenEQA episode) and before each turn but the reply's own (a system prompt,
earlier chat turns). Each such point gets a key that hashes the tokens and image contents before it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from eqakit.data.encode import PromptFormat, VideoPlan, expand_pads, features_key, image_digest, video_digest
from eqakit.engine.hf.model import HFModel
from eqakit.engine.params import Request, RequestError
from eqakit.engine.prompt import plan_request


@dataclass(frozen=True)
class MediaSlot:
    """One image or video of a prompt: where its tokens are (a video's: from its first visual token
    to its last), and the key of its features at this size. A video slot has ``video`` (its plan)
    and ``frames``; an image slot has ``image``."""

    image: Image.Image | None
    key: bytes
    start: int
    length: int
    min_pixels: int
    max_pixels: int
    grid: tuple[int, int, int]  # (t, h, w) in patches, as planned
    video: VideoPlan | None = None
    frames: tuple[Image.Image, ...] = ()

    @property
    def kind(self) -> str:
        return "image" if self.video is None else "video"


@dataclass
class Prepared:
    """A request ready for prefill."""

    request: Request
    ids: torch.Tensor  # (length,) token ids, image pads expanded
    positions: torch.Tensor  # (3, length) M-RoPE positions
    images: list[MediaSlot]
    cuts: list[tuple[int, bytes]]  # (prefix length, prefix key), shortest first
    scaled_down: bool = False  # images were shrunk to fit cutoff_len
    next_position: int = field(init=False)

    def __post_init__(self) -> None:
        self.next_position = int(self.positions.max()) + 1 if self.ids.numel() else 0

    @property
    def length(self) -> int:
        return int(self.ids.numel())


def prepare_request(request: Request, tokenizer: Any, model: HFModel, fmt: PromptFormat) -> Prepared:
    """Render, tokenize and position a request; raises RequestError (PromptTooLong when it cannot fit)."""
    planned, images, videos = plan_request(request, tokenizer, model.geometry, fmt)

    low, high = fmt.budget.min_pixels, planned.max_pixels
    video_grids = [v.grid for v in planned.videos]
    try:
        ids, spans, video_spans = expand_pads(
            planned.input_ids, planned.grids, model.pads, model.geometry.merge, video_grids
        )
    except ValueError as exc:  # cannot happen (message text never yields pads); never a hang
        raise RequestError(str(exc), param="messages") from None
    slots = [
        MediaSlot(image, features_key(image_digest(image), low, high), start, length, low, high, grid)
        for image, (start, length), grid in zip(images, spans, planned.grids, strict=True)
    ]
    vlow = fmt.video.min_pixels
    for video, plan, (start, length) in zip(videos, planned.videos, video_spans, strict=True):
        key = features_key(video_digest(video.frames), vlow, plan.max_pixels)
        slots.append(
            MediaSlot(None, key, start, length, vlow, plan.max_pixels, plan.grid, plan, video.frames)
        )
    slots.sort(key=lambda slot: slot.start)
    ids_tensor = torch.tensor(ids, dtype=torch.long)
    positions = model.rope_positions(ids_tensor, planned.grids, planned.videos)
    return Prepared(request, ids_tensor, positions, slots, _cuts(ids, slots, tokenizer), planned.scaled_down)


def _cuts(ids: list[int], slots: list[MediaSlot], tokenizer: Any) -> list[tuple[int, bytes]]:
    """Prefix boundaries (after an image, before a turn) with keys over the tokens and images before them."""
    vision_end, im_start = tokenizer.convert_tokens_to_ids(["<|vision_end|>", "<|im_start|>"])
    turns = [i for i, t in enumerate(ids) if t == im_start][:-1]  # the last one opens the reply
    points = sorted({i + 1 for i, t in enumerate(ids) if t == vision_end} | {i for i in turns if i})
    inside = [(s.start, s.start + s.length) for s in slots if s.video is not None]
    # a prefix leaves at least one token to prefill, and never ends inside a video (its features are whole)
    points = [p for p in points if p < len(ids) and not any(a < p <= b for a, b in inside)]
    hasher = hashlib.blake2b(digest_size=16)
    cuts: list[tuple[int, bytes]] = []
    previous = 0
    images = iter(slots)
    pending = next(images, None)
    for point in points:
        hasher.update(torch.tensor(ids[previous:point], dtype=torch.int64).numpy().tobytes())
        while pending is not None and pending.start < point:
            hasher.update(pending.key)
            pending = next(images, None)
        cuts.append((point, hasher.copy().digest()))
        previous = point
    return cuts
