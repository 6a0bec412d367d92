"""A request's messages to the engine's model inputs, through the same template and encoder as training.

`eqakit.data.template` renders the prompt and `eqakit.data.encode.plan_sample` tokenizes it and fits
its images into ``cutoff_len`` (scaling them down rather than cutting image tokens). Here the plan's
image pads are expanded to one token per 32x32 pixels, M-RoPE positions are computed, and the
prompt is marked with the points where its prefix may be shared with other requests: after each
image (the frames of an OpenEQA episode) and before each turn but the reply's own (a system prompt,
earlier chat turns). Each such point gets a key that hashes the tokens and image contents before it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from PIL import Image

from eqakit.data.encode import ImageBudget, Plan, SampleTooLong, plan_sample
from eqakit.data.template import Message, content_parts
from eqakit.engine.caches import image_digest
from eqakit.engine.hf import HFModel
from eqakit.engine.params import PromptTooLong, Request, RequestError


@dataclass(frozen=True)
class ImageSlot:
    """One image of a prompt: where its tokens are, and the key of its features at this size."""

    image: Image.Image
    key: bytes
    start: int
    length: int
    min_pixels: int
    max_pixels: int


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


class Geometry(Protocol):
    """What planning a prompt needs of a model: its patch size and spatial merge (tokens per image)."""

    patch: int
    merge: int


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are rendered and bounded (from the config's template and data keys)."""

    template: str = "qwen3_vl_nothink"
    enable_thinking: bool = False
    default_system: str | None = None
    cutoff_len: int = 2048
    budget: ImageBudget = field(default_factory=ImageBudget)


def bind_images(request: Request) -> list[Image.Image]:
    """The request's images in prompt order: inline image parts, and ``images`` for parts without one."""
    supplied = iter(request.images)
    bound: list[Image.Image] = []
    for i, message in enumerate(request.messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content", param="messages")
        try:
            parts = content_parts(message.get("content"))
        except ValueError as exc:
            raise RequestError(f"messages[{i}]: {exc}", param="messages") from None
        for part in (p for p in parts if p["type"] == "image"):
            image = part.get("image", None)
            if image is None:
                image = next(supplied, None)
                if image is None:
                    raise RequestError(
                        f"messages[{i}] has more image placeholders than the request has images "
                        f"({len(request.images)})",
                        param="messages",
                    )
            if not isinstance(image, Image.Image):
                raise RequestError(
                    f"messages[{i}]: an image part must hold a decoded PIL image, got {type(image).__name__}",
                    param="messages",
                )
            bound.append(image)
    leftover = sum(1 for _ in supplied)
    if leftover:
        raise RequestError(
            f"the request has {leftover} image(s) more than its messages have image placeholders",
            param="messages",
        )
    return bound


def plan_prompt(
    messages: list[Message],
    image_sizes: list[tuple[int, int]],
    system: str | None,
    tokenizer: Any,
    model: Geometry,
    fmt: PromptFormat,
) -> Plan:
    """The prompt's tokens and image sizes within cutoff_len (needs only image sizes, no pixels)."""
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    try:
        return plan_sample(  # thread-safe: requests are planned on several threads at once
            messages,
            image_sizes,
            tokenizer,
            template=fmt.template,
            cutoff_len=fmt.cutoff_len,
            budget=fmt.budget,
            enable_thinking=fmt.enable_thinking,
            system=system if system is not None else fmt.default_system,
            add_generation_prompt=True,
            patch=model.patch,
            merge=model.merge,
        )
    except SampleTooLong as exc:
        raise PromptTooLong(f"the prompt is too long: {exc}", param="messages") from None
    except ValueError as exc:
        raise RequestError(str(exc), param="messages") from None


def plan_request(
    request: Request, tokenizer: Any, model: Geometry, fmt: PromptFormat
) -> tuple[Plan, list[Image.Image]]:
    """A request's plan (its own thinking switch applied) and its images in prompt order; what both
    backends start from. Raises RequestError (PromptTooLong when it cannot fit)."""
    if request.enable_thinking is not None:
        fmt = replace(fmt, enable_thinking=request.enable_thinking)
    images = bind_images(request)
    return plan_prompt(
        request.messages, [im.size for im in images], request.system, tokenizer, model, fmt
    ), images


def prepare_request(request: Request, tokenizer: Any, model: HFModel, fmt: PromptFormat) -> Prepared:
    """Render, tokenize and position a request; raises RequestError (PromptTooLong when it cannot fit)."""
    planned, images = plan_request(request, tokenizer, model, fmt)

    merge2 = model.merge * model.merge
    ids: list[int] = []
    slots: list[ImageSlot] = []
    grids = iter(planned.grids)
    sized = f"{fmt.budget.min_pixels}:{planned.max_pixels}".encode()
    for token in planned.input_ids:
        if token != model.image_token_id:
            ids.append(token)
            continue
        grid = next(grids, None)
        if grid is None:  # cannot happen (message text never yields image pads); never a StopIteration
            raise RequestError("the prompt has more image tokens than images", param="messages")
        t, h, w = grid
        count = t * h * w // merge2
        image = images[len(slots)]
        key = image_digest(image) + sized
        slots.append(ImageSlot(image, key, len(ids), count, fmt.budget.min_pixels, planned.max_pixels))
        ids += [token] * count
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
