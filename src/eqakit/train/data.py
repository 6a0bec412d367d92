"""Training data: samples planned up front, tensors made per batch.

Every sample is checked before the first training step (its media as predict checks them,
`eqakit.data.media.MediaCheck`: images exist and decode, videos probe, placeholders match them; the
answer is not empty; the sample fits ``cutoff_len`` after scaling its images down), so a bad row
stops the run before anything is written. Pixel values are produced lazily in ``__getitem__``: a
whole OpenEQA split of pre-computed pixels would not fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from eqakit.config import Config
from eqakit.data.dataset import Sample, load_samples
from eqakit.data.encode import (
    IGNORE_INDEX,
    VIDEO_TIMES,
    Geometry,
    PadIds,
    Plan,
    PromptFormat,
    SampleTooLong,
    VideoBudget,
    expand_tokens,
    features_key,
    image_digest,
    materialize,
    plan_sample,
    video_digest,
    video_times,
)
from eqakit.data.media import MediaCache, MediaCheck, media_key, raise_problems
from eqakit.data.video import VideoInfo, VideoSource
from eqakit.errors import DataError

TRAIN_LRU = 16  # decoded images or videos kept: an episode's, while its packed questions are fetched


@dataclass
class PlanReport:
    """What planning did to the data: shown to the user and saved with the run."""

    samples: int = 0
    kept: int = 0
    scaled_down: int = 0
    dropped_too_long: list[str] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)
    videos_sampled_down: int = 0  # frame lists longer than video_maxlen
    frames_dropped_samples: int = 0  # samples whose videos lost frames to fit cutoff_len
    frames_dropped: int = 0

    def summary(self) -> dict[str, Any]:
        tokens = self.image_tokens or [0]
        videos = {}
        if self.videos_sampled_down or self.frames_dropped:
            videos = {
                "videos_sampled_to_video_maxlen": self.videos_sampled_down,
                "samples_with_frames_dropped_to_fit": self.frames_dropped_samples,
                "frames_dropped_to_fit": self.frames_dropped,
            }
        return {
            "samples": self.samples,
            "kept": self.kept,
            "scaled_down_to_fit": self.scaled_down,
            **videos,
            "dropped_too_long": len(self.dropped_too_long),
            "dropped_rows": self.dropped_too_long[:20],
            "image_tokens_per_sample": {
                "min": min(tokens),
                "mean": round(sum(tokens) / len(tokens), 1),
                "max": max(tokens),
            },
        }


@dataclass(frozen=True)
class PlanSettings:
    """The config keys planning reads: all a planning process needs besides the tokenizer."""

    format: PromptFormat
    train_on_prompt: bool
    mask_history: bool
    geometry: Geometry

    @classmethod
    def from_config(cls, cfg: Config, geometry: Geometry) -> PlanSettings:
        d = cfg.data
        return cls(PromptFormat.from_config(cfg), d.train_on_prompt, d.mask_history, geometry)


# What planning made of one sample: ("plan", Plan), ("too_long", reason), ("bad_row", reason) or
# ("bad_media", [reason, ...]).
Outcome = tuple[str, Any]


def _plan_chunk(
    samples: list[Sample], tokenizer: Any, settings: PlanSettings, media: MediaCheck
) -> list[Outcome]:
    """Plan `samples` in order; `media` keeps image sizes and probed videos across calls."""
    outcomes: list[Outcome] = []
    for sample in samples:
        bad = media.problems(sample)
        if bad:
            outcomes.append(("bad_media", bad))
        elif not sample.answer.strip():
            outcomes.append(("bad_row", f"{sample.source}: empty answer"))
        elif sample.rejected is not None:
            outcomes.append(_plan_pair(sample, tokenizer, settings, media))
        else:
            outcomes.append(_plan_one(sample, tokenizer, settings, media))
    return outcomes


def _plan_one(
    sample: Sample, tokenizer: Any, settings: PlanSettings, media: MediaCheck, reserve: int = 0
) -> Outcome:
    try:
        plan = plan_sample(
            sample.messages,
            media.sizes(sample),
            tokenizer,
            settings.format,
            videos=media.videos(sample),
            system=sample.system,
            train_on_prompt=settings.train_on_prompt,
            mask_history=settings.mask_history,
            geometry=settings.geometry,
            reserve=reserve,
        )
    except SampleTooLong as exc:
        return ("too_long", f"{sample.source}: {exc}")
    except ValueError as exc:
        return ("bad_row", f"{sample.source}: {exc}")
    return ("plan", plan)


@dataclass(frozen=True)
class PairPlan:
    """A preference pair planned: its chosen and rejected conversations, with the same media plan
    (the same images at the same size, the same video frames), so that they share one prompt. Its
    media, as reports and feature keys read them, are the chosen side's (the same)."""

    chosen: Plan
    rejected: Plan

    @property
    def max_pixels(self) -> int:
        return self.chosen.max_pixels

    @property
    def grids(self) -> list[tuple[int, int, int]]:
        return self.chosen.grids

    @property
    def videos(self) -> list[Any]:
        return self.chosen.videos

    @property
    def scaled_down(self) -> bool:
        return self.chosen.scaled_down

    @property
    def frames_dropped(self) -> int:
        return self.chosen.frames_dropped

    @property
    def num_image_tokens(self) -> int:
        return self.chosen.num_image_tokens

    @property
    def length(self) -> int:
        """Tokens of the pair packed as one row: the chosen conversation, then the rejected answer."""
        return self.chosen.length + sum(label != IGNORE_INDEX for label in self.rejected.labels)


def _plan_pair(sample: Sample, tokenizer: Any, settings: PlanSettings, media: MediaCheck) -> Outcome:
    """Plan both sides of a preference pair, each learning its final answer only (as LLaMA-Factory
    scores them), fitting cutoff_len with room for the longer answer so both get one media plan."""
    settings = replace(settings, train_on_prompt=False, mask_history=True)
    rejected = replace(
        sample, messages=[*sample.prompt_messages, {"role": "assistant", "content": sample.rejected}]
    )
    sides = (sample, rejected)
    first = [_plan_one(side, tokenizer, settings, media) for side in sides]
    if any(kind != "plan" for kind, _ in first):
        return next(outcome for outcome in first if outcome[0] != "plan")
    learned = [sum(label != IGNORE_INDEX for label in plan.labels) for _, plan in first]
    planned = [
        _plan_one(side, tokenizer, settings, media, reserve=max(learned) - mine)
        for side, mine in zip(sides, learned, strict=True)
    ]
    if any(kind != "plan" for kind, _ in planned):
        return next(outcome for outcome in planned if outcome[0] != "plan")
    chosen, other = (plan for _, plan in planned)
    if (chosen.grids, chosen.max_pixels, chosen.videos) != (other.grids, other.max_pixels, other.videos):
        return ("bad_row", f"{sample.source}: the chosen and rejected answers could not share one media plan")
    return ("plan", PairPlan(chosen, other))


_worker: tuple[Any, PlanSettings, MediaCheck] | None = None  # in a planning process


def _start_worker(tokenizer: Any, settings: PlanSettings) -> None:
    global _worker
    _worker = (tokenizer, settings, MediaCheck(settings.format.video))


def _plan_in_worker(samples: list[Sample]) -> list[Outcome]:
    tokenizer, settings, media = _worker
    return _plan_chunk(samples, tokenizer, settings, media)


def _plan_parallel(
    samples: list[Sample], tokenizer: Any, settings: PlanSettings, workers: int, batch: int
) -> list[Outcome]:
    """`_plan_chunk` over batches of `batch` samples in `workers` processes, outcomes in sample order.

    Processes are spawned, not forked: a fork would copy the tokenizer's thread pool and torch's
    threads in whatever state they are, which can deadlock the child.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    chunks = [samples[i : i + batch] for i in range(0, len(samples), batch)]
    with ProcessPoolExecutor(
        min(workers, len(chunks)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(tokenizer, settings),
    ) as pool:
        return [outcome for chunk in pool.map(_plan_in_worker, chunks) for outcome in chunk]


def plan_samples(
    samples: list[Sample], tokenizer: Any, geometry: Geometry, cfg: Config
) -> tuple[list[Plan], list[Sample], PlanReport]:
    """Decode, tokenize and budget every sample; drop (and count) those that cannot fit cutoff_len.

    Media problems (`eqakit.data.media.MediaCheck`, predict's check too) are reported first, then
    bad rows; either stops the run. With ``preprocessing_num_workers`` of 2 or more, batches of
    ``preprocessing_batch_size`` samples are planned in that many processes (LLaMA-Factory's
    ``num_proc`` / ``batch_size``), so decoding a large dataset's images is not bound to one core;
    the result is the same as in one process.
    """
    settings = PlanSettings.from_config(cfg, geometry)
    workers, batch = cfg.data.preprocessing_num_workers or 1, cfg.data.preprocessing_batch_size
    if workers >= 2 and len(samples) > batch:
        outcomes = _plan_parallel(samples, tokenizer, settings, workers, batch)
    else:
        outcomes = _plan_chunk(samples, tokenizer, settings, MediaCheck(settings.format.video))
    raise_problems([reason for kind, value in outcomes if kind == "bad_media" for reason in value])
    raise_problems([value for kind, value in outcomes if kind == "bad_row"], "bad rows")
    report = PlanReport(samples=len(samples))
    plans, kept = [], []
    for sample, (kind, value) in zip(samples, outcomes, strict=True):
        if kind == "too_long":
            report.dropped_too_long.append(value)
        elif kind == "plan":
            plans.append(value)
            kept.append(sample)
            report.scaled_down += value.scaled_down
            report.image_tokens.append(value.num_image_tokens)
            report.videos_sampled_down += sum(v.info.sampled_down for v in value.videos)
            report.frames_dropped_samples += value.frames_dropped > 0
            report.frames_dropped += value.frames_dropped
    report.kept = len(plans)
    return plans, kept, report


class PlannedDataset(torch.utils.data.Dataset):
    """Planned samples; pixel values are computed when a sample is fetched.

    With ``keys`` (one (image keys, video keys) pair per sample, see `eqakit.train.vision_cache`) a
    sample carries the keys of its images' and videos' cached features instead of pixels. Pixels
    come from ``media`` (subsets share it), where an episode's frames, fetched together when its
    questions are packed, are decoded once.
    """

    def __init__(
        self,
        plans: list[Plan],
        samples: list[Sample],
        processor: Any,
        fmt: PromptFormat,
        keys: list[tuple[list[bytes], list[bytes]]] | None = None,
        media: MediaCache | None = None,
    ) -> None:
        self.plans, self.samples, self.processor, self.fmt = plans, samples, processor, fmt
        self.keys = keys
        self.media = media or MediaCache(TRAIN_LRU)
        self.pads = PadIds.of(processor.tokenizer)

    def __len__(self) -> int:
        return len(self.plans)

    def subset(self, rows: list[int]) -> PlannedDataset:
        keys = [self.keys[i] for i in rows] if self.keys is not None else None
        plans, samples = [self.plans[i] for i in rows], [self.samples[i] for i in rows]
        return PlannedDataset(plans, samples, self.processor, self.fmt, keys, self.media)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Model inputs, plus the sample's ``media_key`` (its images and videos, as planned) so
        packing can tell which samples share them. A preference pair: ``{"chosen": ..., "rejected": ...}``, the media
        made once for both (the same tensors; packed, the row holds them once)."""
        plan = self.plans[index]
        if isinstance(plan, PairPlan):
            chosen = self._inputs(index, plan.chosen)
            return {"chosen": chosen, "rejected": {**chosen, **expand_tokens(plan.rejected, self.pads)}}
        return self._inputs(index, plan)

    def _inputs(self, index: int, plan: Plan) -> dict[str, Any]:
        sample = self.samples[index]
        if self.keys is not None:
            out: dict[str, Any] = expand_tokens(plan, self.pads)
            image_keys, video_keys = self.keys[index]
            if plan.grids:
                out["image_grid_thw"] = torch.tensor(plan.grids, dtype=torch.long)
                out["image_keys"] = image_keys
            if plan.videos:
                out["video_grid_thw"] = torch.tensor([v.grid for v in plan.videos], dtype=torch.long)
                out.update(video_times(plan.videos))
                out["video_keys"] = video_keys
        else:
            images, videos = self.media.load(sample, [v.info for v in plan.videos])
            frames = [list(video.frames) for video in videos]
            out = materialize(plan, images, self.processor, self.fmt.budget, frames, self.fmt.video)
        out["media_key"] = media_key(sample, self.plans[index])
        return out


@dataclass
class KeyedImages:
    """Content keys of the images and videos a run uses (`eqakit.data.encode.features_key`), and what
    each key stands for: an image file at a size cap, or a planned video of a source. ``media``
    decodes them, here and in `eqakit.train.vision_cache`."""

    min_pixels: int
    video_min_pixels: int = VideoBudget.min_pixels
    wanted: dict[bytes, tuple[Path, int]] = field(default_factory=dict)
    wanted_videos: dict[bytes, tuple[VideoSource, Any]] = field(default_factory=dict)
    digests: dict[Any, bytes] = field(default_factory=dict)  # each file decoded once
    media: MediaCache = field(default_factory=lambda: MediaCache(TRAIN_LRU))

    def keys(self, plan: Plan, sample: Sample) -> tuple[list[bytes], list[bytes]]:
        keys = [features_key(self._digest(p), self.min_pixels, plan.max_pixels) for p in sample.images]
        self.wanted.update({k: (p, plan.max_pixels) for k, p in zip(keys, sample.images, strict=True)})
        video_keys = []
        for source, video in zip(sample.videos, plan.videos, strict=True):
            key = features_key(
                self._video_digest(source, video.info), self.video_min_pixels, video.max_pixels
            )
            self.wanted_videos[key] = (source, video)
            video_keys.append(key)
        return keys, video_keys

    def _digest(self, path: Path) -> bytes:
        if path not in self.digests:
            self.digests[path] = image_digest(self.media.image(path))
        return self.digests[path]

    def _video_digest(self, source: VideoSource, info: VideoInfo) -> bytes:
        """A hash of the chosen frames' contents, in order (the same frames give the same key)."""
        if (source, info.indices) not in self.digests:
            self.digests[source, info.indices] = video_digest(self.media.video(source, info).frames)
        return self.digests[source, info.indices]


def make_dataset(
    plans: list[Plan], samples: list[Sample], processor: Any, fmt: PromptFormat, keyed: KeyedImages | None
) -> PlannedDataset:
    """A dataset of planned samples; with ``keyed`` its samples carry cached-feature keys, not pixels."""
    keys = [keyed.keys(plan, s) for plan, s in zip(plans, samples, strict=True)] if keyed else None
    return PlannedDataset(plans, samples, processor, fmt, keys)


# Per medium: its grids, its pixel values and its cached-feature keys, as batches carry them.
MEDIA = (
    ("image_grid_thw", "pixel_values", "image_keys"),
    ("video_grid_thw", "pixel_values_videos", "video_keys"),
)
# Per-item tensors batches concatenate beside the grids: Qwen2.5-VL's seconds per temporal patch.
PER_ITEM = (VIDEO_TIMES,)


@dataclass
class Collator:
    """Right-pads a training batch and concatenates its images and videos (the model reads grids in order)."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)

        def pad(key: str, value: int) -> torch.Tensor:
            out = torch.full((len(features), longest), value, dtype=features[0][key].dtype)
            for i, f in enumerate(features):
                out[i, : len(f[key])] = f[key]
            return out

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id),
            "labels": pad("labels", IGNORE_INDEX),
            "mm_token_type_ids": pad("mm_token_type_ids", 0),
            "attention_mask": torch.zeros(len(features), longest, dtype=torch.long),
        }
        for i, f in enumerate(features):
            batch["attention_mask"][i, : len(f["input_ids"])] = 1
        for key in PER_ITEM:
            if any(key in f for f in features):
                batch[key] = torch.cat([f[key] for f in features if key in f])
        for grid, pixels, keys in MEDIA:
            having = [f for f in features if grid in f]
            if having:
                batch[grid] = torch.cat([f[grid] for f in having])
                if keys in having[0]:
                    batch[keys] = [k for f in having for k in f[keys]]
                else:
                    batch[pixels] = torch.cat([f[pixels] for f in having])
        return batch


def plain_positions(rope_index: Any, batch: dict[str, Any]) -> torch.Tensor | None:
    """M-RoPE positions ``(3, rows, length)`` of a right-padded batch (`Collator`), as the model's
    forward computes them when given none: ``rope_index`` (its ``get_rope_index``) over the batch
    with its attention mask. ``get_rope_index`` reads every grid as a Python number, so the trainer
    calls this on the host, before the batch moves. None for a batch without images or videos: the
    model then counts positions itself, reading nothing."""
    grids, video_grids = batch.get("image_grid_thw"), batch.get("video_grid_thw")
    if grids is None and video_grids is None:
        return None
    times = {VIDEO_TIMES: batch[VIDEO_TIMES]} if VIDEO_TIMES in batch else {}
    return rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=grids,
        video_grid_thw=video_grids,
        attention_mask=batch["attention_mask"],
        **times,
    )[0]


def split_train_val(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """LLaMA-Factory's split: ``datasets.train_test_split(test_size=val_size, seed=seed)`` over the rows.

    The same call on the same row count gives the same validation rows as LLaMA-Factory.
    """
    if not val_size:
        return list(range(n)), []
    from datasets import Dataset

    test_size: float | int = int(val_size) if val_size >= 1 else val_size
    if n < 2 or (isinstance(test_size, int) and test_size >= n):
        raise DataError(f"val_size {val_size} leaves no training rows out of {n}")
    split = Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=test_size, seed=seed)
    return list(split["train"]["i"]), list(split["test"]["i"])


def load_training_samples(cfg: Config, names: str | None = None) -> list[Sample]:
    """The samples of `names` (default: the training datasets), read as the config's data keys say:
    preference pairs for ``stage: dpo``."""
    d = cfg.data
    return load_samples(
        names or d.dataset,
        d.dataset_dir,
        d.media_dir,
        d.max_samples,
        allow_outside_media=d.allow_outside_media,
        ranking=cfg.finetuning.stage == "dpo",
    )
