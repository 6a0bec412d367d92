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

from eqakit.data.encode import PromptFormat, expand_pads, image_digest, image_key
from eqakit.engine.hf.model import HFModel
from eqakit.engine.params import Request, RequestError
from eqakit.engine.prompt import plan_request


@dataclass(frozen=True)
class ImageSlot:
    """One image of a prompt: where its tokens are, and the key of its features at this size."""

    image: Image.Image
    key: bytes
    start: int
    length: int
    min_pixels: int
    max_pixels: int
    grid: tuple[int, int, int]  # (t, h, w) in patches, as planned


@dataclass
class Prepared:
    """A request ready for prefill."""

    request: Request
    ids: torch.Tensor  # (length,) token ids, image pads expanded
    positions: torch.Tensor  # (3, length) M-RoPE positions
    images: list[ImageSlot]
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
    planned, images = plan_request(request, tokenizer, model.geometry, fmt)

    low, high = fmt.budget.min_pixels, planned.max_pixels
    try:
        ids, spans = expand_pads(planned.input_ids, planned.grids, model.image_token_id, model.geometry.merge)
    except ValueError as exc:  # cannot happen (message text never yields image pads); never a hang
        raise RequestError(str(exc), param="messages") from None
    slots = [
        ImageSlot(image, image_key(image_digest(image), low, high), start, length, low, high, grid)
        for image, (start, length), grid in zip(images, spans, planned.grids, strict=True)
    ]
    ids_tensor = torch.tensor(ids, dtype=torch.long)
    positions = model.rope_positions(ids_tensor, planned.grids)
    return Prepared(request, ids_tensor, positions, slots, _cuts(ids, slots, tokenizer), planned.scaled_down)


def _cuts(ids: list[int], slots: list[ImageSlot], tokenizer: Any) -> list[tuple[int, bytes]]:
    """Prefix boundaries (after an image, before a turn) with keys over the tokens and images before them."""
    vision_end, im_start = tokenizer.convert_tokens_to_ids(["<|vision_end|>", "<|im_start|>"])
    turns = [i for i, t in enumerate(ids) if t == im_start][:-1]  # the last one opens the reply
    points = sorted({i + 1 for i, t in enumerate(ids) if t == vision_end} | {i for i in turns if i})
    points = [p for p in points if p < len(ids)]  # a prefix leaves at least one token to prefill
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
