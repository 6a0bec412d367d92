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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as video_smart_resize

from eqakit.config.args import DataArguments, ModelArguments
from eqakit.data.template import NOTHINK, VIDEO_PAD, Message, Segment, count_parts, mismatched_media, render
from eqakit.data.video import TEMPORAL_PATCH, VideoInfo

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
class VideoBudget:
    """How videos are sampled and sized (LLaMA-Factory's video_fps, video_maxlen and the per-frame
    video_min_pixels / video_max_pixels)."""

    min_pixels: int = ModelArguments.video_min_pixels
    max_pixels: int = ModelArguments.video_max_pixels
    fps: float = ModelArguments.video_fps
    maxlen: int = ModelArguments.video_maxlen

    @classmethod
    def from_config(cls, cfg: Config) -> VideoBudget:
        m = cfg.model
        return cls(m.video_min_pixels, m.video_max_pixels, m.video_fps, m.video_maxlen)


@dataclass(frozen=True)
class Geometry:
    """What planning needs of a model: its vision patch size and spatial merge (image tokens per
    image follow from them), and how it times videos. Always read from the model's own config
    (`of`), so no stage can plan one architecture's layout for another.

    ``timestamps``: Qwen3-VL writes each temporal patch's time in the text and its video processor
    bounds all frames' pixels together; Qwen2.5-VL (False) spaces the patches' M-RoPE positions by
    ``second_per_grid_ts`` and bounds each frame's pixels alone."""

    patch: int
    merge: int
    timestamps: bool

    @classmethod
    def of(cls, model_config: Any) -> Geometry:
        """A model's geometry, read from its (transformers) config; an unsupported ``model_type`` is
        refused by name (`eqakit.model.arch.architecture`)."""
        from eqakit.model.arch import architecture

        arch = architecture(getattr(model_config, "model_type", None))
        vision = model_config.vision_config
        if int(getattr(vision, "temporal_patch_size", TEMPORAL_PATCH)) != TEMPORAL_PATCH:
            raise ValueError(
                f"the model's vision_config.temporal_patch_size is {vision.temporal_patch_size}; eqakit "
                f"plans videos in temporal patches of {TEMPORAL_PATCH} frames, as every Qwen-VL model has"
            )
        return cls(int(vision.patch_size), int(vision.spatial_merge_size), arch.timestamped_video)

    def video_pads(self, clips: int) -> int:
        """How many video pads a video of ``clips`` temporal patches renders as: one per patch
        (timestamped markup) or one for the whole video."""
        return clips if self.timestamps else 1

    def video_times(self, videos: Sequence[VideoInfo]) -> list[list[float] | None]:
        """What `eqakit.data.template.render` marks each video up with: its temporal-patch times,
        or None (one pad) for a model without timestamps."""
        return [v.clip_times() if self.timestamps else None for v in videos]


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
    video: VideoBudget = field(default_factory=VideoBudget)

    @classmethod
    def from_config(cls, cfg: Config) -> PromptFormat:
        d = cfg.data
        return cls(
            d.template or NOTHINK,
            d.enable_thinking,
            d.default_system,
            d.cutoff_len,
            ImageBudget.from_config(cfg),
            VideoBudget.from_config(cfg),
        )


@dataclass(frozen=True)
class VideoPlan:
    """A planned video: the frames kept (``info``), the frame-area cap they are resized under, the
    resulting (temporal patches, h, w) grid in patches and the pads its markup has (one per temporal
    patch, or one). ``second_per_grid`` is None where the text carries the times (Qwen3-VL), else the
    seconds one temporal patch spans (Qwen2.5-VL's ``second_per_grid_ts``)."""

    info: VideoInfo
    max_pixels: int
    grid: tuple[int, int, int]
    pads: int = 1
    second_per_grid: float | None = None


@dataclass
class Plan:
    """A sample that fits: its text token ids (one image pad per image) and each image's pixel cap."""

    input_ids: list[int]
    labels: list[int]
    image_sizes: list[tuple[int, int]]  # (width, height) of the source images
    max_pixels: int  # cap used for every image of this sample (<= the budget's; lower when scaled down)
    grids: list[tuple[int, int, int]]  # (t, h, w) in patches per image
    scaled_down: bool
    merge: int  # the model's spatial merge: merge x merge patches make one token
    videos: list[VideoPlan] = field(default_factory=list)
    frames_dropped: int = 0  # video frames left out to fit cutoff_len

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens of the sample: its images' and its videos'."""
        return _tokens_for(self.grids + [v.grid for v in self.videos], self.merge)

    @property
    def length(self) -> int:
        pads = len(self.grids) + sum(v.pads for v in self.videos)
        return len(self.input_ids) - pads + self.num_image_tokens


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
    width: int, height: int, min_pixels: int, max_pixels: int, patch: int, merge: int
) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the Qwen-VL image processor produces for an image of this size."""
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    return 1, h // patch, w // patch


def video_grid(
    frames: int,
    width: int,
    height: int,
    min_pixels: int,
    max_pixels: int,
    patch: int,
    merge: int,
    timestamps: bool,
) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the video processor produces for ``frames`` frames of this size with
    each frame's area within [min_pixels, max_pixels] (`video_size` is its size argument): Qwen3-VL's
    (``timestamps``) or Qwen2-VL's, which resizes each frame as an image."""
    if timestamps:
        low, high = video_size(frames, min_pixels, max_pixels).values()
        h, w = video_smart_resize(
            frames,
            height,
            width,
            temporal_factor=TEMPORAL_PATCH,
            factor=patch * merge,
            min_pixels=low,
            max_pixels=high,
        )
    else:
        h, w = smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    return frames // TEMPORAL_PATCH, h // patch, w // patch


def video_size(frames: int, min_pixels: int, max_pixels: int, timestamps: bool = True) -> dict[str, int]:
    """The video processor's ``size`` for a per-frame pixel range: Qwen3-VL's bounds all frames'
    pixels together (``timestamps``), Qwen2-VL's each frame's."""
    scale = frames if timestamps else 1
    return {"shortest_edge": scale * min_pixels, "longest_edge": scale * max_pixels}


def _tokens_for(grids: list[tuple[int, int, int]], merge: int) -> int:
    return sum(t * h * w for t, h, w in grids) // (merge * merge)


def _shrink(cap: int, low: int, room: int, factor: int) -> int | None:
    """The next, smaller pixel cap when a sample does not fit (``room``: visual tokens per item that
    would fit), or None when the cap cannot go lower."""
    new_cap = min(int(cap * 0.9), room * factor * factor)
    if new_cap < low or new_cap < factor * factor or new_cap >= cap:
        return None
    return new_cap


def plan_sample(
    messages: list[Message],
    image_sizes: list[tuple[int, int]],
    tokenizer: Any,
    fmt: PromptFormat,
    *,
    videos: list[VideoInfo] | tuple[VideoInfo, ...] = (),
    system: str | None = None,
    add_generation_prompt: bool = False,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    geometry: Geometry,
    reserve: int = 0,
) -> Plan:
    """Tokenize a rendered conversation and fit its images and videos into ``fmt.cutoff_len``.

    ``reserve``: text tokens to leave room for beyond this conversation's own, so that another with
    the same prompt and a longer answer (a preference pair's other side) gets the same media plan.

    ``system`` is the conversation's own system prompt (a dataset's system column, a request's
    system field); `eqakit.data.template.system_prompt` chooses between it and fmt.default_system.
    ``videos`` are the probed videos (`eqakit.data.video.probe`) of the ``<video>`` parts, in order.
    Images and video frames are scaled down first; when the smallest allowed sizes do not fit,
    video frames are left out (whole temporal patches, evenly, longest video first): the most
    frames that fit are kept.

    Raises `SampleTooLong` (the sample must be dropped) or ValueError (placeholders and media disagree).
    """
    if problems := mismatched_media(messages, len(image_sizes), len(videos)):
        raise ValueError(problems[0])
    encoder = text_encoder(tokenizer)

    def attempt(infos: list[VideoInfo]) -> Plan:
        input_ids, labels = _tokenize(
            messages,
            encoder,
            fmt,
            geometry.video_times(infos),
            system,
            add_generation_prompt,
            train_on_prompt,
            mask_history,
        )
        pads = len(image_sizes) + sum(geometry.video_pads(v.clips) for v in infos)
        text_len = len(input_ids) - pads + reserve
        return _fit(input_ids, labels, text_len, image_sizes, infos, fmt, geometry)

    infos = list(videos)
    while True:
        try:
            plan = attempt(infos)
            break
        except SampleTooLong:
            if all(v.clips == 1 for v in infos):
                raise
        # the longest video keeps the most temporal patches that fit (fewer always fit if more do)
        longest = max(range(len(infos)), key=lambda i: infos[i].clips)
        low, high = 1, infos[longest].clips - 1
        while low < high:
            middle = (low + high + 1) // 2
            try:
                attempt([*infos[:longest], infos[longest].keep(middle), *infos[longest + 1 :]])
                low = middle
            except SampleTooLong:
                high = middle - 1
        infos[longest] = infos[longest].keep(low)
    plan.frames_dropped = sum(len(a.indices) - len(b.indices) for a, b in zip(videos, infos, strict=True))
    return plan


def _tokenize(
    messages: list[Message],
    encoder: TextEncoder,
    fmt: PromptFormat,
    video_times: list[list[float] | None],
    system: str | None,
    add_generation_prompt: bool,
    train_on_prompt: bool,
    mask_history: bool,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of the rendered conversation (one pad per image and per temporal patch,
    or per video where ``video_times`` holds None: `eqakit.data.template.render`)."""
    segments = render(
        messages,
        fmt.template,
        enable_thinking=fmt.enable_thinking,
        add_generation_prompt=add_generation_prompt,
        system=system,
        default_system=fmt.default_system,
        video_times=video_times,
    )
    video_pad_count = sum(1 if times is None else len(times) for times in video_times)
    pads = count_parts(messages, "image") * len(IMAGE_PAD) + video_pad_count * len(VIDEO_PAD)
    characters = sum(len(s.text) for s in segments) - pads
    if characters > fmt.cutoff_len * encoder.max_chars:  # refused before tokenizing (a 60 MB body)
        raise SampleTooLong(
            f"the text has {characters} characters: more than cutoff_len {fmt.cutoff_len} tokens can hold"
        )
    learned = [i for i, s in enumerate(segments) if s.learn]
    input_ids: list[int] = []
    labels: list[int] = []
    for i, segment in enumerate(segments):
        ids = encoder.encode(segment)
        learn = train_on_prompt or (segment.learn and (not mask_history or i == learned[-1]))
        input_ids += ids
        labels += ids if learn else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def prompt_ids(
    messages: list[Message],
    tokenizer: Any,
    fmt: PromptFormat,
    video_times: list[list[float] | None],
    system: str | None = None,
) -> list[int]:
    """A generation prompt's token ids with each video marked up as ``video_times`` says (no budget:
    the vLLM backend plans with `plan_sample`, then sends the chat template's one-pad video markup,
    which vLLM expands itself)."""
    ids, _ = _tokenize(messages, text_encoder(tokenizer), fmt, video_times, system, True, False, False)
    return ids


Grid = tuple[int, int, int]


def _grids(
    image_sizes: list[tuple[int, int]],
    videos: list[VideoInfo],
    cap: int,
    vcap: int,
    fmt: PromptFormat,
    geometry: Geometry,
) -> tuple[list[Grid], list[Grid]]:
    """The images' and videos' grids under pixel caps ``cap`` (images) and ``vcap`` (video frames)."""
    patch, merge, low, vlow = geometry.patch, geometry.merge, fmt.budget.min_pixels, fmt.video.min_pixels
    return (
        [image_grid(w, h, low, cap, patch, merge) for w, h in image_sizes],
        [video_grid(len(v.indices), *v.size, vlow, vcap, patch, merge, geometry.timestamps) for v in videos],
    )


def _fit(
    input_ids: list[int],
    labels: list[int],
    text_len: int,
    image_sizes: list[tuple[int, int]],
    videos: list[VideoInfo],
    fmt: PromptFormat,
    geometry: Geometry,
) -> Plan:
    """Scale images and video frames down (both by the same steps) until the sample fits cutoff_len."""
    cutoff_len, budget, vbudget = fmt.cutoff_len, fmt.budget, fmt.video
    patch, merge = geometry.patch, geometry.merge
    video_pad_counts = [geometry.video_pads(v.clips) for v in videos]
    pads = len(image_sizes) + sum(video_pad_counts)
    if text_len + pads > cutoff_len:
        what = "image or video" if videos else "image"
        raise SampleTooLong(f"{text_len} text tokens exceed cutoff_len {cutoff_len} before any {what}")

    cap, vcap = budget.max_pixels, vbudget.max_pixels
    image_grids, video_grids = _grids(image_sizes, videos, cap, vcap, fmt, geometry)
    scaled = False
    while text_len + _tokens_for(image_grids + video_grids, merge) > cutoff_len:
        room = max(cutoff_len - text_len, 0) // pads  # visual tokens per image or temporal patch that fit
        new_cap = _shrink(cap, budget.min_pixels, room, patch * merge) if image_sizes else None
        new_vcap = _shrink(vcap, vbudget.min_pixels, room, patch * merge) if videos else None
        if new_cap is None and new_vcap is None:
            items = f"{len(image_sizes)} images" + (f" and {len(videos)} videos" if videos else "")
            raise SampleTooLong(
                f"{text_len} text tokens + {items} at the smallest allowed size "
                f"({_tokens_for(image_grids + video_grids, merge)} visual tokens) exceed cutoff_len {cutoff_len}"
            )
        cap, vcap, scaled = new_cap or cap, new_vcap or vcap, True
        image_grids, video_grids = _grids(image_sizes, videos, cap, vcap, fmt, geometry)
    planned = [
        VideoPlan(v, vcap, g, n, None if geometry.timestamps else TEMPORAL_PATCH / v.sampled_fps)
        for v, g, n in zip(videos, video_grids, video_pad_counts, strict=True)
    ]
    return Plan(input_ids, labels, list(image_sizes), cap, image_grids, scaled, merge, planned)


def image_digest(image: Image.Image) -> bytes:
    """A content hash of a decoded image: the same pixels give the same digest, whatever file or
    object holds them."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}".encode())
    digest.update(image.tobytes())
    return digest.digest()


def video_digest(frames: list[Image.Image] | tuple[Image.Image, ...]) -> bytes:
    """A content hash of a video's chosen frames, in order (never equal to an image's digest)."""
    digest = hashlib.blake2b(b"video", digest_size=16)
    for frame in frames:
        digest.update(image_digest(frame))
    return digest.digest()


def features_key(digest: bytes, min_pixels: int, max_pixels: int) -> bytes:
    """The one key of an image's or a video's visual features (training's vision cache, the
    engine's): its content digest and the pixel range it is resized into."""
    return digest + f"@{min_pixels}:{max_pixels}".encode()


@dataclass(frozen=True)
class PadIds:
    """The token ids of the image pad and the video pad (a tokenizer's)."""

    image: int
    video: int

    @classmethod
    def of(cls, tokenizer: Any) -> PadIds:
        image, video = tokenizer.convert_tokens_to_ids([IMAGE_PAD, VIDEO_PAD])
        return cls(int(image), int(video))


Span = tuple[int, int]  # (start, length) in expanded token ids


def expand_pads(
    input_ids: list[int],
    grids: list[Grid],
    pads: PadIds,
    merge: int,
    video_grids: list[Grid] | tuple[Grid, ...] = (),
) -> tuple[list[int], list[Span], list[Span]]:
    """Token ids with each image pad repeated once per visual token, and each video's pads too: one
    pad per temporal patch (Qwen3-VL's markup, timestamps between) or one for the whole video
    (Qwen2.5-VL's); each image's (start, length) in them, and each video's (from its first visual
    token to its last). Raises ValueError when pads and grids disagree."""
    clips = [t for t, _, _ in video_grids]
    n_image, n_video = input_ids.count(pads.image), input_ids.count(pads.video)
    per_clip = n_video == sum(clips)
    if n_image != len(grids) or not (per_clip or n_video == len(video_grids)):
        raise ValueError(
            f"the prompt has {n_image} image pads and {n_video} video pads for {len(grids)} images "
            f"and {len(video_grids)} videos of {sum(clips)} temporal patches"
        )
    if not per_clip:  # one pad per video: it stands for all its temporal patches
        clips = [1] * len(video_grids)
        video_grids = [(1, h * t, w) for t, h, w in video_grids]
    image_counts = iter(t * h * w // (merge * merge) for t, h, w in grids)
    video_counts = iter(h * w // (merge * merge) for t, h, w in video_grids for _ in range(t))
    clip_left = iter(c for t in clips for c in range(t - 1, -1, -1))  # patches left in its video
    ids: list[int] = []
    spans: list[Span] = []
    video_spans: list[Span] = []
    start = 0
    for token in input_ids:
        if token == pads.image:
            count = next(image_counts)
            spans.append((len(ids), count))
            ids += [pads.image] * count
        elif token == pads.video:
            left = next(clip_left)
            if left == clips[len(video_spans)] - 1:
                start = len(ids)
            ids += [pads.video] * next(video_counts)
            if left == 0:
                video_spans.append((start, len(ids) - start))
        else:
            ids.append(token)
    return ids, spans, video_spans


def expand_tokens(plan: Plan, pads: PadIds) -> dict[str, torch.Tensor]:
    """Token ids, labels and modality types with each image and video pad repeated once per visual
    token (visual tokens are never learned)."""
    video_grids = [v.grid for v in plan.videos]
    ids, _, _ = expand_pads(plan.input_ids, plan.grids, pads, plan.merge, video_grids)
    input_ids = torch.tensor(ids, dtype=torch.long)
    is_visual = (input_ids == pads.image) | (input_ids == pads.video)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[~is_visual] = torch.tensor(
        [
            label
            for token, label in zip(plan.input_ids, plan.labels, strict=True)
            if token not in (pads.image, pads.video)
        ],
        dtype=torch.long,
    )
    return {
        "input_ids": input_ids,
        "labels": labels,
        "mm_token_type_ids": mm_token_types(input_ids, pads),
    }


def mm_token_types(ids: torch.Tensor, pads: PadIds) -> torch.Tensor:
    """What transformers (>= 5.2) computes M-RoPE positions from: 1 marks image tokens, 2 video, 0 text."""
    return (ids == pads.image).to(torch.int) + 2 * (ids == pads.video).to(torch.int)


def channels_first(image: Image.Image) -> torch.Tensor:
    """An image as the (3, H, W) uint8 tensor transformers' processors convert it to, given with its
    layout stated: left to guess, they read an image 1 or 3 pixels high as channels-first."""
    hwc = np.array(image.convert("RGB"))  # writable: torch warns on PIL's read-only buffer
    return torch.from_numpy(hwc).permute(2, 0, 1).contiguous()


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
    vision = image_processor(
        images=[channels_first(im) for im in images],
        size=size,
        input_data_format="channels_first",
        return_tensors="pt",
    )
    grid = vision["image_grid_thw"]
    if grids is not None and [tuple(g) for g in grid.tolist()] != [tuple(g) for g in grids]:
        raise ValueError(f"image sizes changed since planning: grids {grid.tolist()}, planned {list(grids)}")
    return vision["pixel_values"], grid


def video_pixel_values(
    frames: list[Image.Image], video_processor: Any, video: VideoPlan, min_pixels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower's input for one planned video's frames (``video.info`` order, repeats
    included), resized as planned; raises ValueError when the processor's grid is not the plan's."""
    from transformers.video_utils import VideoMetadata

    info = video.info
    metadata = VideoMetadata(total_num_frames=len(frames), fps=None, frames_indices=list(range(len(frames))))
    out = video_processor(
        videos=[torch.stack([channels_first(im) for im in frames])],
        video_metadata=[metadata],
        do_sample_frames=False,
        cap_pixels_per_frame=False,
        input_data_format="channels_first",
        size=video_size(len(info.indices), min_pixels, video.max_pixels, video.second_per_grid is None),
        return_tensors="pt",
    )
    grid = out["video_grid_thw"]
    if [tuple(g) for g in grid.tolist()] != [video.grid]:
        raise ValueError(
            f"video frame sizes changed since planning: grid {grid.tolist()}, planned {video.grid}"
        )
    return out["pixel_values_videos"], grid


def materialize(
    plan: Plan,
    images: list[Image.Image],
    processor: Any,
    budget: ImageBudget,
    videos: list[list[Image.Image]] | tuple[()] = (),
    video_budget: VideoBudget = VideoBudget(),  # noqa: B008 - frozen
) -> dict[str, torch.Tensor]:
    """Expanded token ids, and pixel values and patch grids at the sizes planning chose, for a planned
    sample (images and videos in placeholder order)."""
    out = expand_tokens(plan, PadIds.of(processor.tokenizer))
    if images:
        values, grid = pixel_values(
            images, processor.image_processor, budget.min_pixels, plan.max_pixels, plan.grids
        )
        out.update(pixel_values=values, image_grid_thw=grid)
    if videos:
        made = [
            video_pixel_values(frames, processor.video_processor, video, video_budget.min_pixels)
            for frames, video in zip(videos, plan.videos, strict=True)
        ]
        out["pixel_values_videos"] = torch.cat([v for v, _ in made])
        out["video_grid_thw"] = torch.cat([g for _, g in made])
        out.update(video_times(plan.videos))
    return out


VIDEO_TIMES = "second_per_grid_ts"  # Qwen2.5-VL's per-video input beside video_grid_thw


def video_times(videos: list[VideoPlan]) -> dict[str, torch.Tensor]:
    """``second_per_grid_ts`` for planned videos whose model takes it (Qwen2.5-VL), else nothing."""
    times = [v.second_per_grid for v in videos]
    if not times or times[0] is None:
        return {}
    return {VIDEO_TIMES: torch.tensor(times, dtype=torch.float32)}
