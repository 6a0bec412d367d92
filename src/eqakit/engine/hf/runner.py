"""The decode loop: continuous batching over a KV cache the engine manages itself.

A `Runner` holds the sequences being decoded as one batch: a `KVBatch` whose rows are aligned
at the right (new tokens append to every row) and a padding mask over its columns. Rows join
(`admit`) whenever there is room and leave as soon as they finish, so a long answer never holds
a batch of short ones hostage.

Joining is where the reuse happens:
1. images: visual features come from the feature cache; only unseen images (at their size) go
   through the vision tower, all of them in one call;
2. shared prefixes: each prompt's longest shareable prefix (the system prompt and frames of an
   OpenEQA episode) is computed once, kept in the prefix cache, and copied into every row that
   starts with it; only the rest of each prompt (the question) is prefilled, left-padded so the
   rows end together. M-RoPE positions come from the whole prompt, so a suffix continues exactly
   where its prefix stopped.
Padding columns sit before a row's prefix or between its prefix and suffix; the mask hides them,
and positions are explicit, so a row decodes exactly as it would alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from eqakit.engine.hf.caches import LRUCache, PrefixState, VisualFeatures
from eqakit.engine.hf.kv import KVBatch
from eqakit.engine.hf.model import HFModel
from eqakit.engine.hf.prepare import MediaSlot, Prepared
from eqakit.engine.hf.sampling import Sampler
from eqakit.engine.hf.text import TextTracker
from eqakit.engine.params import Completion, FinishReason


@dataclass
class Job:
    """A prepared request and where its output goes (callbacks run on the engine's thread)."""

    prepared: Prepared
    on_done: Callable[[Completion], None]
    on_delta: Callable[[str], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    cancelled: Callable[[], bool] | None = None

    def is_cancelled(self) -> bool:
        return self.cancelled is not None and self.cancelled()


@dataclass(frozen=True)
class Reuse:
    """Which reuse features are on (each is exact; turning one off is for tests and benchmarks)."""

    vision_cache: LRUCache[VisualFeatures] | None
    prefix_cache: LRUCache[PrefixState] | None
    min_prefix_tokens: int = 64  # shorter prefixes are not worth a separate forward pass


class _Row:
    """One sequence being decoded."""

    def __init__(self, job: Job, tracker: TextTracker) -> None:
        self.job = job
        self.params = job.prepared.request.params
        self.tokens: list[int] = []
        self.next_position = job.prepared.next_position  # M-RoPE position of the next token fed
        self.tracker = tracker

    def push(self, token: int | Exception, eos: frozenset[int]) -> bool:
        """Record the next token, stream its text; True when the sequence is finished (or its draw failed)."""
        if isinstance(token, Exception):
            _fail(self.job, token)
            return True
        self.tokens.append(token)
        reason: FinishReason | None = None
        if token in eos:
            reason = "stop"
        else:
            delta, stopped = self.tracker.add(token)
            self._emit(delta)
            if stopped:
                reason = "stop"
            elif len(self.tokens) >= self.params.max_new_tokens:
                reason = "length"
        if reason is None:
            return False
        text, rest = self.tracker.finish()
        self._emit(rest)
        self.job.on_done(Completion(text, self.tokens, self.job.prepared.length, reason))
        return True

    def _emit(self, delta: str) -> None:
        if delta and self.job.on_delta is not None:
            self.job.on_delta(delta)


def _fail(job: Job, error: BaseException) -> None:
    if job.on_error is not None:
        job.on_error(error)


def _by_length(lengths: list[int], slack: int = 64) -> list[list[int]]:
    """Indices grouped so that left-padding each group to its longest costs at most about as much as
    its real tokens: a long uncached prompt is not prefilled alongside a batch of short questions."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        group = groups[-1] if groups else None
        if (
            group is not None
            and lengths[i] * (len(group) + 1) <= 2 * (sum(lengths[j] for j in group) + lengths[i]) + slack
        ):
            group.append(i)
        else:
            groups.append([i])
    return groups


class Runner:
    """A batch of sequences being decoded together; see the module docstring."""

    def __init__(
        self,
        model: HFModel,
        tokenizer: Any,
        *,
        reuse: Reuse,
        eos: frozenset[int],
        pad_id: int,
        skip_special_tokens: bool,
        lock: threading.RLock,
        share_prefixes: bool = False,
    ) -> None:
        """``share_prefixes``: rows continuing a cached prefix point at it (held once, attended to by
        `eqakit.engine.hf.attention`) instead of holding a copy. Worth it when memory bounds the batch
        (a KV-token budget): it lets an episode's questions decode together. Without a budget the
        copies are attended to by transformers' sdpa, which is faster per step on a CPU (bench_api,
        tiny model, 8 clients: 13.7 against 10.6 requests/s)."""
        self.share_prefixes = share_prefixes
        self.model = model
        self.tokenizer = tokenizer
        self.reuse = reuse
        self.eos = eos
        self.pad_id = pad_id
        self.skip_special_tokens = skip_special_tokens
        self.lock = lock
        self.rows: list[_Row] = []
        self.kv: KVBatch | None = None
        self.sampler: Sampler | None = None  # the rows' decoding settings, in step with ``kv``
        self.num_layers = model.core.config.text_config.num_hidden_layers

    @property
    def active(self) -> int:
        return len(self.rows)

    def footprint(self, joining: list[Prepared]) -> int:
        """The most KV-cache tokens the batch will hold if ``joining`` joins now.

        With ``share_prefixes`` each shared prefix (an episode's frames) is held once, whatever number
        of rows continue it, and rows hold their own tokens; without, each row holds its copy. Rows
        are aligned at the right, so they cost rows x width, and every step widens them by one until
        the longest remaining answer is done.
        """
        prefixes: dict[object, int] = {
            id(p): p.length for p in (self.kv.prefixes if self.kv is not None else []) if p
        }
        width = int(self.kv.mask.shape[1]) if self.kv is not None else 0
        for prepared in joining:
            cut = self._base_cut(prepared) if self.share_prefixes else None
            if cut is not None:
                assert self.reuse.prefix_cache is not None
                cached = self.reuse.prefix_cache.peek(cut[1])  # the very state running rows may share
                prefixes[id(cached) if cached is not None else cut[1]] = cut[0]
            width = max(width, prepared.length - (cut[0] if cut else 0))
        ahead = max(
            [r.params.max_new_tokens - len(r.tokens) for r in self.rows]
            + [p.request.params.max_new_tokens for p in joining],
            default=0,
        )
        return sum(prefixes.values()) + (len(self.rows) + len(joining)) * (width + ahead)

    def _base_cut(self, prepared: Prepared) -> tuple[int, bytes] | None:
        """The prefix (length, key) a prompt continues from the prefix cache, if any: its longest cut."""
        if self.reuse.prefix_cache is None:
            return None
        targets = [(n, key) for n, key in prepared.cuts if n >= self.reuse.min_prefix_tokens]
        return targets[-1] if targets else None

    # ---- joining -----------------------------------------------------------------------------

    def admit(self, jobs: list[Job]) -> None:
        """Prefill new requests and add them to the batch (those finished by their first token complete here)."""
        jobs = [job for job in jobs if not job.is_cancelled()]
        if not jobs:
            return
        with self.lock, torch.inference_mode():
            try:
                features = self._features(jobs)
                bases = self._bases(jobs, features)
            except Exception as error:
                self._one_by_one(jobs, error)
                return
            suffixes = [
                job.prepared.length - (b.length if b else 0) for job, b in zip(jobs, bases, strict=True)
            ]
            for group in _by_length(suffixes):
                try:
                    self._join(
                        [jobs[i] for i in group], [features[i] for i in group], [bases[i] for i in group]
                    )
                except Exception as error:
                    self._one_by_one([jobs[i] for i in group], error)

    def _one_by_one(self, jobs: list[Job], error: Exception) -> None:
        """After a failed prefill: a lone job fails with the error; a group is admitted again job by job,
        so only the request at fault fails and the rows already decoding are untouched."""
        if len(jobs) == 1:
            _fail(jobs[0], error)
            return
        for job in jobs:
            self.admit([job])

    def _join(
        self, jobs: list[Job], features: list[list[VisualFeatures]], bases: list[PrefixState | None]
    ) -> None:
        logits, kv = self._prefill(jobs, features, bases)
        rows = [_Row(job, self._tracker(job)) for job in jobs]
        sampler = Sampler(
            [r.params for r in rows], [job.prepared.ids for job in jobs], logits.shape[-1], logits.device
        )
        tokens = sampler.choose(logits)
        keep = [
            i
            for i, (row, token) in enumerate(zip(rows, tokens, strict=True))
            if not row.push(token, self.eos)
        ]
        if not keep:
            return
        if len(keep) < len(rows):
            kv.select(keep)
            sampler.select(keep)
        if self.kv is None or self.sampler is None:
            self.rows, self.kv, self.sampler = [rows[i] for i in keep], kv, sampler
        else:
            self.kv.merge(kv)
            self.sampler.merge(sampler)
            self.rows += [rows[i] for i in keep]

    def _tracker(self, job: Job) -> TextTracker:
        return TextTracker(
            self.tokenizer,
            job.prepared.request.params.stop,
            skip_special_tokens=self.skip_special_tokens,
            live=job.on_delta is not None,
        )

    def _features(self, jobs: list[Job]) -> list[list[VisualFeatures]]:
        """Visual features of every image of every job, in prompt order."""
        cache = self.reuse.vision_cache
        if cache is None:  # the reference behaviour: each request runs its own images
            return [self._compute_list(job.prepared.images) for job in jobs]
        slots = {s.key: s for job in jobs for s in job.prepared.images}
        found = {key: cache.get(key) for key in slots}
        fresh = self._compute([(key, slots[key]) for key, value in found.items() if value is None])
        for key, value in fresh.items():
            cache.put(key, value)
            found[key] = value  # held here too, in case the cache is too small to keep them all
        return [[found[s.key] for s in job.prepared.images] for job in jobs]

    def _compute_list(self, slots: list[MediaSlot]) -> list[VisualFeatures]:
        """A job's own features, slot by slot (its images in one vision call, each video in one)."""
        images = [s for s in slots if s.video is None]
        computed = iter(
            self.model.image_features(
                [s.image for s in images],
                images[0].min_pixels,
                images[0].max_pixels,
                [s.grid for s in images],
            )
            if images
            else []
        )
        return [
            next(computed) if s.video is None else self.model.video_features(s.frames, s.video, s.min_pixels)
            for s in slots
        ]

    def _compute(self, items: list[tuple[bytes, MediaSlot]]) -> dict[bytes, VisualFeatures]:
        """Features of the given (key, slot) pairs, one vision call per image size cap and per video."""
        by_size: dict[tuple[int, int], list[tuple[bytes, MediaSlot]]] = {}
        out: dict[bytes, VisualFeatures] = {}
        for key, slot in items:
            if slot.video is not None:
                out[key] = self.model.video_features(slot.frames, slot.video, slot.min_pixels)
            else:
                by_size.setdefault((slot.min_pixels, slot.max_pixels), []).append((key, slot))
        for (low, high), group in by_size.items():
            slots = [slot for _, slot in group]
            features = self.model.image_features([s.image for s in slots], low, high, [s.grid for s in slots])
            out.update(zip([key for key, _ in group], features, strict=True))
        return out

    def _bases(self, jobs: list[Job], features: list[list[VisualFeatures]]) -> list[PrefixState | None]:
        """Each job's longest shareable prefix state, computed once per distinct prefix and cached."""
        cache = self.reuse.prefix_cache
        if cache is None:
            return [None] * len(jobs)
        bases: list[PrefixState | None] = []
        computed: dict[bytes, PrefixState] = {}  # held here too, in case the cache is too small to keep them
        for job, feats in zip(jobs, features, strict=True):
            cuts = job.prepared.cuts
            cut = self._base_cut(job.prepared)
            if cut is None:
                bases.append(None)
                continue
            length, key = cut
            state = computed.get(key) or cache.get(key)
            if state is None:
                start = next((cache.get(k) for n, k in reversed(cuts) if n < length and k in cache), None)
                state = self._extend(job.prepared, feats, start, length)
                cache.put(key, state)
            computed[key] = state
            bases.append(state)
        return bases

    def _extend(
        self, prepared: Prepared, features: list[VisualFeatures], start: PrefixState | None, end: int
    ) -> PrefixState:
        """The KV state of ``prepared``'s first ``end`` tokens, continuing from a shorter cached prefix."""
        begin = start.length if start is not None else 0
        kv = KVBatch.from_states([start], self.num_layers, self.model.device, room=0)
        kv.extend_mask(torch.ones((1, end - begin), dtype=torch.long))
        pairs = [
            (slot, f) for slot, f in zip(prepared.images, features, strict=True) if begin <= slot.start < end
        ]
        images, videos = _by_kind(pairs)
        self.model.forward(
            prepared.ids[begin:end][None],
            prepared.positions[:, begin:end][:, None],
            kv.mask,
            kv.cache(),
            images,
            logits=False,
            video_features=videos,
        )
        return kv.state(0)

    def _prefill(
        self, jobs: list[Job], features: list[list[VisualFeatures]], bases: list[PrefixState | None]
    ) -> tuple[torch.Tensor, KVBatch]:
        """Prefill every job's prompt after its base prefix, in one left-padded batch."""
        starts = [b.length if b is not None else 0 for b in bases]
        width = max(job.prepared.length - start for job, start in zip(jobs, starts, strict=True))
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        positions = torch.ones((3, len(jobs), width), dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        pairs: list[tuple[MediaSlot, VisualFeatures]] = []
        for row, (job, start) in enumerate(zip(jobs, starts, strict=True)):
            p = job.prepared
            size = p.length - start
            ids[row, width - size :] = p.ids[start:]
            positions[:, row, width - size :] = p.positions[:, start:]
            mask[row, width - size :] = 1
            pairs += [
                (slot, f) for slot, f in zip(p.images, features[row], strict=True) if slot.start >= start
            ]
        if self.share_prefixes:
            kv = KVBatch.empty(bases, self.num_layers, self.model.device)
        else:
            kv = KVBatch.from_states(bases, self.num_layers, self.model.device)
        kv.extend_mask(mask)
        images, videos = _by_kind(pairs)
        logits = self.model.forward(
            ids, positions, kv.mask, kv.cache(), images, shared=kv.shared(), video_features=videos
        )
        assert logits is not None
        return logits, kv

    # ---- decoding ----------------------------------------------------------------------------

    def step(self) -> None:
        """Decode one token for every row; drop the rows that finished or were cancelled."""
        if not self.rows or self.kv is None or self.sampler is None:
            return
        with self.lock, torch.inference_mode():
            batch = len(self.rows)
            ids = torch.tensor([[r.tokens[-1]] for r in self.rows], dtype=torch.long)
            positions = torch.tensor([r.next_position for r in self.rows], dtype=torch.long)
            positions = positions.view(1, batch, 1).expand(3, batch, 1)
            self.kv.extend_mask(torch.ones((batch, 1), dtype=torch.long))
            logits = self.model.forward(
                ids, positions, self.kv.mask, self.kv.cache(), [], shared=self.kv.shared()
            )
            assert logits is not None
            for row in self.rows:
                row.next_position += 1
            tokens = self.sampler.choose(logits)
            keep = [
                i
                for i, (row, token) in enumerate(zip(self.rows, tokens, strict=True))
                if not row.job.is_cancelled() and not row.push(token, self.eos)
            ]
            if not keep:
                self.rows, self.kv, self.sampler = [], None, None
            elif len(keep) < batch:
                self.kv.select(keep)
                self.sampler.select(keep)
                self.rows = [self.rows[i] for i in keep]

    def fail(self, error: BaseException) -> None:
        """Report ``error`` to every row in the batch and empty it (after a failed forward pass)."""
        rows, self.rows, self.kv, self.sampler = self.rows, [], None, None
        for row in rows:
            _fail(row.job, error)


def _by_kind(
    pairs: list[tuple[MediaSlot, VisualFeatures]],
) -> tuple[list[VisualFeatures], list[VisualFeatures]]:
    """Features of images and of videos, each in prompt order (the model fills each kind's pads in order)."""
    return [f for s, f in pairs if s.video is None], [f for s, f in pairs if s.video is not None]
