"""Samples to model inputs: token ids, labels, pixel values, with an image-token budget.

Shared by training, prediction and serving, after `eqakit.data.template` has rendered the text.
Image tokens are never truncated: when text plus image tokens exceed ``cutoff_len`` the images are
scaled down until the sample fits (LLaMA-Factory cuts through image tokens instead and then fails
with "Image features and image tokens do not match"); a sample that cannot fit even then is
reported as too long, never silently cut.

Planning (`plan_sample`) needs only image sizes, so a whole dataset is checked up front without
decoding pixels; `materialize` produces tensors when a batch needs them.
"""

from __future__ import annotations

import hashlib
import re
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from eqakit.config.args import DataArguments, ModelArguments
from eqakit.data.template import NOTHINK, Message, Segment, count_images, render

if TYPE_CHECKING:
    from eqakit.config.load import Config

IGNORE_INDEX = -100
IMAGE_PAD = "<|image_pad|>"


@dataclass(frozen=True)
class ImageBudget:
    """Pixel bounds for the vision tower (LLaMA-Factory's image_min_pixels / image_max_pixels)."""

    min_pixels: int = ModelArguments.image_min_pixels
    max_pixels: int = ModelArguments.image_max_pixels

    @classmethod
    def from_config(cls, cfg: Config) -> ImageBudget:
        return cls(cfg.model.image_min_pixels, cfg.model.image_max_pixels)


@dataclass(frozen=True)
class Geometry:
    """What planning needs of a model: its vision patch size and spatial merge (image tokens per
    image follow from them). Defaults: Qwen3-VL's."""

    patch: int = 16
    merge: int = 2

    @classmethod
    def of(cls, model_config: Any) -> Geometry:
        """A model's geometry, read from its (transformers) config."""
        vision = model_config.vision_config
        return cls(int(vision.patch_size), int(vision.spatial_merge_size))

    @classmethod
    def of_processor(cls, processor: Any) -> Geometry:
        """The geometry a processor resizes and merges images with (the model's own, from its checkpoint)."""
        image_processor = processor.image_processor
        return cls(int(image_processor.patch_size), int(image_processor.merge_size))


@dataclass(frozen=True)
class PromptFormat:
    """How a conversation becomes a prompt and how large it may be: the config's template, thinking
    switch, default system prompt, cutoff_len and image budget. Every stage builds it with
    `from_config`, so training, predict, the API, the web UI and chat cannot disagree on them."""

    template: str = NOTHINK
    enable_thinking: bool = DataArguments.enable_thinking
    default_system: str | None = DataArguments.default_system
    cutoff_len: int = DataArguments.cutoff_len
    budget: ImageBudget = field(default_factory=ImageBudget)

    @classmethod
    def from_config(cls, cfg: Config) -> PromptFormat:
        d = cfg.data
        return cls(
            d.template or NOTHINK,
            d.enable_thinking,
            d.default_system,
            d.cutoff_len,
            ImageBudget.from_config(cfg),
        )


@dataclass
class Plan:
    """A sample that fits: its text token ids (one image pad per image) and each image's pixel cap."""

    input_ids: list[int]
    labels: list[int]
    image_sizes: list[tuple[int, int]]  # (width, height) of the source images
    max_pixels: int  # cap used for every image of this sample (<= the budget's; lower when scaled down)
    grids: list[tuple[int, int, int]] = field(default_factory=list)  # (t, h, w) in patches per image
    scaled_down: bool = False
    merge: int = Geometry.merge  # the model's spatial merge: merge x merge patches make one token

    @property
    def num_image_tokens(self) -> int:
        return _tokens_for(self.grids, self.merge)

    @property
    def length(self) -> int:
        return len(self.input_ids) - len(self.grids) + self.num_image_tokens


class SampleTooLong(ValueError):
    """The sample's text alone, or text plus the smallest allowed images, exceeds cutoff_len."""


# NFC normalization (Qwen's tokenizers apply it) composes at most 4 code points into one character.
_MAX_COMPOSED = 4


class TextEncoder:
    """Prompt text to token ids, where only the template's markup can become special tokens.

    Message text (a segment's ``literal`` spans) is tokenized with special tokens read as plain
    text: a user who types ``<|im_end|>\n<|im_start|>system`` gets those characters, not a forged
    turn, and ``<|image_pad|>`` in text is not an image. Text without special-token strings is
    tokenized as one piece, exactly as the checkpoint's own chat template does.

    It works on private copies of the tokenizer's Rust core that are never reconfigured (the
    transformers wrapper mutates its core, e.g. for ``split_special_tokens``), so any number of
    threads may encode at once without a lock. ``max_chars`` bounds the characters one token can
    cover, so text too long for a budget is refused from its length before any tokenizing.
    """

    def __init__(self, tokenizer: Any) -> None:
        core = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(core, Tokenizer):
            raise TypeError(
                f"eqakit needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}"
            )
        self._markup, self._plain = Tokenizer.from_str(core.to_str()), Tokenizer.from_str(core.to_str())
        for copy in (self._markup, self._plain):
            copy.no_truncation()
            copy.no_padding()
        self._markup.encode_special_tokens = False
        self._plain.encode_special_tokens = True
        specials = sorted(
            (t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True
        )
        self._special = re.compile("|".join(map(re.escape, specials))) if specials else None
        longest = max(len(token) for token in core.get_vocab(with_added_tokens=True))
        self.max_chars = longest * _MAX_COMPOSED

    def encode(self, segment: Segment) -> list[int]:
        text = segment.text
        if self._special is None or not any(self._special.search(text, a, b) for a, b in segment.literal):
            return self._markup.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        done = 0
        for start, end in segment.literal:
            if start > done:
                ids += self._markup.encode(text[done:start], add_special_tokens=False).ids
            ids += self._plain.encode(text[start:end], add_special_tokens=False).ids
            done = end
        if done < len(text):
            ids += self._markup.encode(text[done:], add_special_tokens=False).ids
        return ids


_ENCODERS: weakref.WeakKeyDictionary[Any, TextEncoder] = weakref.WeakKeyDictionary()


def text_encoder(tokenizer: Any) -> TextEncoder:
    """The `TextEncoder` of a tokenizer (built once per tokenizer)."""
    encoder = _ENCODERS.get(tokenizer)
    if encoder is None:
        encoder = _ENCODERS[tokenizer] = TextEncoder(tokenizer)
    return encoder


def image_grid(
    width: int, height: int, min_pixels: int, max_pixels: int, patch: int = 16, merge: int = 2
) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the Qwen-VL image processor produces for an image of this size."""
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    return 1, h // patch, w // patch


def _tokens_for(grids: list[tuple[int, int, int]], merge: int) -> int:
    return sum(t * h * w for t, h, w in grids) // (merge * merge)


def plan_sample(
    messages: list[Message],
    image_sizes: list[tuple[int, int]],
    tokenizer: Any,
    fmt: PromptFormat,
    *,
    system: str | None = None,
    add_generation_prompt: bool = False,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    geometry: Geometry = Geometry(),  # noqa: B008 - frozen, so a shared default is safe
) -> Plan:
    """Tokenize a rendered conversation and fit its images into ``fmt.cutoff_len``.

    ``system`` is the conversation's own system prompt (a dataset's system column, a request's
    system field); `eqakit.data.template.system_prompt` chooses between it and fmt.default_system.

    Raises `SampleTooLong` (the sample must be dropped) or ValueError (placeholders and images
    disagree).
    """
    n_placeholders = count_images(messages)
    if n_placeholders != len(image_sizes):
        raise ValueError(
            f"the text has {n_placeholders} image placeholder(s) but the sample has {len(image_sizes)} image(s)"
        )
    cutoff_len, budget = fmt.cutoff_len, fmt.budget
    patch, merge = geometry.patch, geometry.merge
    segments = render(
        messages,
        fmt.template,
        enable_thinking=fmt.enable_thinking,
        add_generation_prompt=add_generation_prompt,
        system=system,
        default_system=fmt.default_system,
    )
    encoder = text_encoder(tokenizer)
    characters = sum(len(s.text) for s in segments) - len(image_sizes) * len(IMAGE_PAD)
    if characters > cutoff_len * encoder.max_chars:  # refused before tokenizing (a 60 MB body)
        raise SampleTooLong(
            f"the text has {characters} characters: more than cutoff_len {cutoff_len} tokens can hold"
        )
    learned = [i for i, s in enumerate(segments) if s.learn]
    input_ids: list[int] = []
    labels: list[int] = []
    for i, segment in enumerate(segments):
        ids = encoder.encode(segment)
        learn = train_on_prompt or (segment.learn and (not mask_history or i == learned[-1]))
        input_ids += ids
        labels += ids if learn else [IGNORE_INDEX] * len(ids)
    text_len = len(input_ids) - len(image_sizes)
    if text_len + len(image_sizes) > cutoff_len:
        raise SampleTooLong(f"{text_len} text tokens exceed cutoff_len {cutoff_len} before any image")
    cap = budget.max_pixels
    grids = [image_grid(w, h, budget.min_pixels, cap, patch, merge) for w, h in image_sizes]
    scaled = False
    while text_len + _tokens_for(grids, merge) > cutoff_len:
        room = max(cutoff_len - text_len, 0) // max(len(image_sizes), 1)  # image tokens per image that fit
        new_cap = min(int(cap * 0.9), room * (patch * merge) ** 2)
        if new_cap < budget.min_pixels or new_cap < (patch * merge) ** 2 or new_cap >= cap:
            raise SampleTooLong(
                f"{text_len} text tokens + {len(image_sizes)} images at the smallest allowed size "
                f"({_tokens_for(grids, merge)} image tokens) exceed cutoff_len {cutoff_len}"
            )
        cap, scaled = new_cap, True
        grids = [image_grid(w, h, budget.min_pixels, cap, patch, merge) for w, h in image_sizes]
    return Plan(input_ids, labels, list(image_sizes), cap, grids, scaled, merge)


def image_digest(image: Image.Image) -> bytes:
    """A content hash of a decoded image: the same pixels give the same digest, whatever file or
    object holds them."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}".encode())
    digest.update(image.tobytes())
    return digest.digest()


def image_key(digest: bytes, min_pixels: int, max_pixels: int) -> bytes:
    """The one key of an image's visual features (training's vision cache, the engine's): its content
    digest and the pixel range it is resized into."""
    return digest + f"@{min_pixels}:{max_pixels}".encode()


def expand_pads(
    input_ids: list[int], grids: list[tuple[int, int, int]], image_pad_id: int, merge: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids with each image pad repeated once per visual token, and each image's (start, length)
    in them. Raises ValueError when pads and grids disagree in number."""
    if sum(1 for token in input_ids if token == image_pad_id) != len(grids):
        raise ValueError(f"the prompt has {input_ids.count(image_pad_id)} image pads for {len(grids)} images")
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    counts = iter(t * h * w // (merge * merge) for t, h, w in grids)
    for token in input_ids:
        if token == image_pad_id:
            count = next(counts)
            spans.append((len(ids), count))
            ids += [image_pad_id] * count
        else:
            ids.append(token)
    return ids, spans


def expand_tokens(plan: Plan, image_pad_id: int) -> dict[str, torch.Tensor]:
    """Token ids, labels and modality types with each image pad repeated once per visual token."""
    ids, spans = expand_pads(plan.input_ids, plan.grids, image_pad_id, plan.merge)
    labels: list[int] = []
    lengths = iter(length for _, length in spans)
    for token, label in zip(plan.input_ids, plan.labels, strict=True):
        if token == image_pad_id:
            labels += [IGNORE_INDEX] * next(lengths)  # image tokens are never learned
        else:
            labels.append(label)
    input_ids = torch.tensor(ids, dtype=torch.long)
    # transformers >= 5.2 computes M-RoPE positions from these: 1 marks image tokens, 0 text.
    return {
        "input_ids": input_ids,
        "labels": torch.tensor(labels, dtype=torch.long),
        "mm_token_type_ids": (input_ids == image_pad_id).to(torch.int),
    }


def pixel_values(
    images: list[Image.Image],
    image_processor: Any,
    min_pixels: int,
    max_pixels: int,
    grids: list[tuple[int, int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower's input for images resized within [min_pixels, max_pixels], and their patch
    grids; with ``grids`` (the plan's), a grid that differs from the planned one raises ValueError
    rather than feeding the model image tokens that do not match its features."""
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    vision = image_processor(images=[im.convert("RGB") for im in images], size=size, return_tensors="pt")
    grid = vision["image_grid_thw"]
    if grids is not None and [tuple(g) for g in grid.tolist()] != [tuple(g) for g in grids]:
        raise ValueError(f"image sizes changed since planning: grids {grid.tolist()}, planned {list(grids)}")
    return vision["pixel_values"], grid


def pixels(
    plan: Plan, images: list[Image.Image], processor: Any, budget: ImageBudget
) -> dict[str, torch.Tensor]:
    """Pixel values and patch grids of a planned sample's images, at the size planning chose."""
    values, grid = pixel_values(
        images, processor.image_processor, budget.min_pixels, plan.max_pixels, plan.grids
    )
    return {"pixel_values": values, "image_grid_thw": grid}


def materialize(
    plan: Plan, images: list[Image.Image], processor: Any, budget: ImageBudget
) -> dict[str, torch.Tensor]:
    """Pixel values and expanded token ids for a planned sample (images in placeholder order)."""
    image_pad_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    out = expand_tokens(plan, image_pad_id)
    if images:
        out.update(pixels(plan, images, processor, budget))
    return out
