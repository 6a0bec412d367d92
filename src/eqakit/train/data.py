"""Training data: samples planned up front, tensors made per batch.

Every sample is checked before the first training step (images exist and decode, ``<image>``
placeholders match images, the answer is not empty, the sample fits ``cutoff_len`` after scaling its
images down), so a bad row stops the run before anything is written. Pixel values are produced
lazily in ``__getitem__``: a whole OpenEQA split of pre-computed pixels would not fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from eqakit.config import Config
from eqakit.data.dataset import Sample, load_samples
from eqakit.data.encode import (
    IGNORE_INDEX,
    IMAGE_PAD,
    Geometry,
    ImageBudget,
    Plan,
    PromptFormat,
    SampleTooLong,
    expand_tokens,
    image_digest,
    image_key,
    materialize,
    plan_sample,
)
from eqakit.errors import DataError


@dataclass
class PlanReport:
    """What planning did to the data: shown to the user and saved with the run."""

    samples: int = 0
    kept: int = 0
    scaled_down: int = 0
    dropped_too_long: list[str] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        tokens = self.image_tokens or [0]
        return {
            "samples": self.samples,
            "kept": self.kept,
            "scaled_down_to_fit": self.scaled_down,
            "dropped_too_long": len(self.dropped_too_long),
            "dropped_rows": self.dropped_too_long[:20],
            "image_tokens_per_sample": {
                "min": min(tokens),
                "mean": round(sum(tokens) / len(tokens), 1),
                "max": max(tokens),
            },
        }


def _read_size(path: Path, sizes: dict[Path, tuple[int, int]]) -> str | None:
    """Decode `path` once (into `sizes`); the reason it cannot be read, if it cannot."""
    if path in sizes:
        return None
    try:
        with Image.open(path) as image:
            image.load()
            sizes[path] = image.size
    except FileNotFoundError:
        return f"image file not found: {path}"
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        return f"image {path} cannot be read ({exc})"
    return None


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
# ("bad_images", [reason, ...]).
Outcome = tuple[str, Any]


def _plan_chunk(
    samples: list[Sample], tokenizer: Any, settings: PlanSettings, sizes: dict[Path, tuple[int, int]]
) -> list[Outcome]:
    """Plan `samples` in order; `sizes` caches decoded image sizes across calls."""
    outcomes: list[Outcome] = []
    for sample in samples:
        bad = [f"{sample.source}: {r}" for r in (_read_size(p, sizes) for p in sample.images) if r]
        if bad:
            outcomes.append(("bad_images", bad))
            continue
        if not sample.answer.strip():
            outcomes.append(("bad_row", f"{sample.source}: empty answer"))
            continue
        try:
            plan = plan_sample(
                sample.messages,
                [sizes[p] for p in sample.images],
                tokenizer,
                settings.format,
                system=sample.system,
                train_on_prompt=settings.train_on_prompt,
                mask_history=settings.mask_history,
                geometry=settings.geometry,
            )
        except SampleTooLong as exc:
            outcomes.append(("too_long", f"{sample.source}: {exc}"))
        except ValueError as exc:
            outcomes.append(("bad_row", f"{sample.source}: {exc}"))
        else:
            outcomes.append(("plan", plan))
    return outcomes


_worker: tuple[Any, PlanSettings, dict[Path, tuple[int, int]]] | None = None  # in a planning process


def _start_worker(tokenizer: Any, settings: PlanSettings) -> None:
    global _worker
    _worker = (tokenizer, settings, {})


def _plan_in_worker(samples: list[Sample]) -> list[Outcome]:
    tokenizer, settings, sizes = _worker
    return _plan_chunk(samples, tokenizer, settings, sizes)


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


def _first_20(problems: list[str]) -> str:
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return "\n  ".join(problems[:20]) + more


def plan_samples(
    samples: list[Sample], processor: Any, cfg: Config
) -> tuple[list[Plan], list[Sample], PlanReport]:
    """Decode, tokenize and budget every sample; drop (and count) those that cannot fit cutoff_len.

    Unreadable images are reported first, then bad rows; either stops the run. With
    ``preprocessing_num_workers`` of 2 or more, batches of ``preprocessing_batch_size`` samples are
    planned in that many processes (LLaMA-Factory's ``num_proc`` / ``batch_size``), so decoding a
    large dataset's images is not bound to one core; the result is the same as in one process.
    """
    tokenizer = processor.tokenizer
    settings = PlanSettings.from_config(cfg, Geometry.of_processor(processor))
    workers, batch = cfg.data.preprocessing_num_workers or 1, cfg.data.preprocessing_batch_size
    if workers >= 2 and len(samples) > batch:
        outcomes = _plan_parallel(samples, tokenizer, settings, workers, batch)
    else:
        outcomes = _plan_chunk(samples, tokenizer, settings, {})
    bad_images = [reason for kind, value in outcomes if kind == "bad_images" for reason in value]
    if bad_images:
        raise DataError("bad images in the dataset:\n  " + _first_20(bad_images))
    problems = [value for kind, value in outcomes if kind == "bad_row"]
    if problems:
        raise DataError("bad rows in the dataset:\n  " + _first_20(problems))
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
    report.kept = len(plans)
    return plans, kept, report


class PlannedDataset(torch.utils.data.Dataset):
    """Planned samples; pixel values are computed when a sample is fetched.

    With ``image_keys`` (one list per sample, see `eqakit.train.vision_cache`) a sample carries the
    keys of its images' cached features instead of pixels.
    """

    def __init__(
        self,
        plans: list[Plan],
        samples: list[Sample],
        processor: Any,
        budget: ImageBudget,
        image_keys: list[list[bytes]] | None = None,
    ) -> None:
        self.plans, self.samples, self.processor, self.budget = plans, samples, processor, budget
        self.image_keys = image_keys
        self.image_pad_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def __len__(self) -> int:
        return len(self.plans)

    def subset(self, rows: list[int]) -> PlannedDataset:
        keys = [self.image_keys[i] for i in rows] if self.image_keys is not None else None
        return PlannedDataset(
            [self.plans[i] for i in rows], [self.samples[i] for i in rows], self.processor, self.budget, keys
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Model inputs, plus ``image_refs`` (the image paths) so packing can tell which samples share frames."""
        plan, sample = self.plans[index], self.samples[index]
        if self.image_keys is not None:
            out: dict[str, Any] = expand_tokens(plan, self.image_pad_id)
            if plan.grids:
                out["image_grid_thw"] = torch.tensor(plan.grids, dtype=torch.long)
                out["image_keys"] = self.image_keys[index]
        else:
            images = []
            for path in sample.images:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            out = materialize(plan, images, self.processor, self.budget)
        out["image_refs"] = tuple(str(p) for p in sample.images)
        return out


@dataclass
class KeyedImages:
    """Content keys of the images a run uses (`eqakit.data.encode.image_key`), and which file at which
    size cap each key stands for."""

    min_pixels: int
    wanted: dict[bytes, tuple[Path, int]] = field(default_factory=dict)
    digests: dict[Path, bytes] = field(default_factory=dict)  # each file decoded once

    def keys(self, plan: Plan, sample: Sample) -> list[bytes]:
        keys = [image_key(self._digest(p), self.min_pixels, plan.max_pixels) for p in sample.images]
        self.wanted.update({k: (p, plan.max_pixels) for k, p in zip(keys, sample.images, strict=True)})
        return keys

    def _digest(self, path: Path) -> bytes:
        if path not in self.digests:
            with Image.open(path) as image:
                self.digests[path] = image_digest(image)
        return self.digests[path]


def make_dataset(
    plans: list[Plan], samples: list[Sample], processor: Any, budget: ImageBudget, keyed: KeyedImages | None
) -> PlannedDataset:
    """A dataset of planned samples; with ``keyed`` its samples carry cached-feature keys, not pixels."""
    keys = [keyed.keys(plan, s) for plan, s in zip(plans, samples, strict=True)] if keyed else None
    return PlannedDataset(plans, samples, processor, budget, keys)


@dataclass
class Collator:
    """Right-pads a training batch and concatenates its images (the model reads grids in order)."""

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
        with_images = [f for f in features if "image_grid_thw" in f]
        if with_images:
            batch["image_grid_thw"] = torch.cat([f["image_grid_thw"] for f in with_images])
            if "image_keys" in with_images[0]:
                batch["image_keys"] = [k for f in with_images for k in f["image_keys"]]
            else:
                batch["pixel_values"] = torch.cat([f["pixel_values"] for f in with_images])
        return batch


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
    """The samples of `names` (default: the training datasets), read as the config's data keys say."""
    d = cfg.data
    return load_samples(
        names or d.dataset,
        d.dataset_dir,
        d.media_dir,
        d.max_samples,
        allow_outside_media=d.allow_outside_media,
    )
