"""Next-token choice for a batch whose rows each have their own decoding settings.

The order and definitions follow transformers' logits processors, so a request decodes as
``model.generate`` would: repetition penalty (over prompt and generated tokens), then temperature,
top-k, top-p, and a draw from the rest. Each sampling row draws from its own `torch.Generator`, so a
seeded request gives the same text whatever else shares its batch.

Tokens are chosen for the whole batch at once: each row's settings are a column of tensors on the
device (`Sampler`), and a step reads the device once, for the chosen tokens. Each read makes the
host wait until the accelerator's queue drains, so a check or a draw per row would stall it again
and again.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from eqakit.engine.hf.model import upload
from eqakit.engine.params import SamplingParams

FAILED = -1  # a row's token when its distribution is not a number (see `Sampler.choose`)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator for a sampling request (seeded when the request has a seed); None when greedy."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


@dataclass(frozen=True)
class Settings:
    """The rows' settings as tensors, one row each for the rows that sample (``rows``: their indices;
    None when every row does). ``top_k``, ``top_p`` and ``penalty`` are None when no row uses them."""

    rows: torch.Tensor | None
    temperature: torch.Tensor  # (n, 1)
    top_k: torch.Tensor | None  # (n, 1) k, 0 for no limit
    most: int  # the largest k
    top_p: torch.Tensor | None  # (n, 1) the cumulative probability removed, -1 for none
    penalty: torch.Tensor | None  # (rows, 1) every row's repetition penalty (1.0: none)


class Sampler:
    """The decoding state of a batch's rows: settings, generators, and the tokens each row has seen.

    Kept in step with the batch (`select`, `merge`) as rows leave and join; the settings are
    uploaded once per change of the batch, not per step.
    """

    def __init__(
        self, params: list[SamplingParams], prompts: list[torch.Tensor], vocab: int, device: torch.device
    ) -> None:
        """``prompts``: each row's prompt ids (on the host), which a repetition penalty counts as seen."""
        self.params = list(params)
        self.generators = [make_generator(p, device) for p in params]
        self.vocab = vocab
        self.device = device
        self.seen = _seen(self.params, prompts, device)
        self._settings: Settings | None = None

    def choose(self, logits: torch.Tensor) -> list[int | Exception]:
        """One next token per row of ``logits`` (rows, vocab), float32, with a single read of the device.

        A sampling row whose distribution is not a number (nan logits: accepted settings cannot make
        one, see `scale`) gets an exception instead of a token: it fails its own request, not the batch.
        """
        settings = self.settings()
        scores = logits
        if settings.penalty is not None:
            assert self.seen is not None
            scores = apply_repetition_penalty(scores, self.seen, settings.penalty)
        generators = [g for g in self.generators if g is not None]
        if not generators:
            chosen = scores.argmax(dim=-1)
        elif settings.rows is None:
            chosen = self._sample(scores, settings, generators)
        else:
            chosen = scores.argmax(dim=-1)  # the greedy rows' tokens
            chosen[settings.rows] = self._sample(scores[settings.rows], settings, generators)
        if self.seen is not None:
            self.seen = torch.cat([self.seen, chosen[:, None].clamp_min(0)], dim=1)
        return [
            token if token != FAILED else FloatingPointError("the next-token distribution is not a number")
            for token in chosen.tolist()
        ]

    def _sample(
        self, scores: torch.Tensor, settings: Settings, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """The sampling rows' draws; FAILED for a row of nan (or of -inf only), whose softmax is nan."""
        warped = warp(scores, settings)
        drawn = draw(warped.softmax(dim=-1), generators)
        return drawn.masked_fill(~(warped.amax(dim=-1) > -torch.inf), FAILED)

    def settings(self) -> Settings:
        """The rows' settings on the device, built on the host when the batch changes."""
        if self._settings is None:
            self._settings = _settings(self.params, self.vocab, self.device)
        return self._settings

    def select(self, keep: list[int]) -> None:
        """Keep only the given rows (in this order)."""
        self.params = [self.params[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        if self.seen is not None:
            self.seen = self.seen[upload(torch.tensor(keep, dtype=torch.long), self.device)]
        self._settings = None

    def merge(self, other: Sampler) -> None:
        """Append ``other``'s rows."""
        if self.seen is not None or other.seen is not None:
            mine, theirs = _seen_rows(self), _seen_rows(other)
            width = max(mine.shape[1], theirs.shape[1])
            self.seen = torch.cat([_widen(mine, width), _widen(theirs, width)])
        self.params += other.params
        self.generators += other.generators
        self._settings = None


def _seen_rows(sampler: Sampler) -> torch.Tensor:
    """The rows' seen token ids; token 0 for a sampler whose rows have no repetition penalty."""
    if sampler.seen is not None:
        return sampler.seen
    return torch.zeros((len(sampler.params), 1), dtype=torch.long, device=sampler.device)


def _widen(ids: torch.Tensor, width: int) -> torch.Tensor:
    """``ids`` (rows, n) to ``width`` columns, each row repeating its first id: seen twice is seen once."""
    return torch.cat([ids, ids[:, :1].expand(-1, width - ids.shape[1])], dim=1)


def _seen(
    params: list[SamplingParams], prompts: list[torch.Tensor], device: torch.device
) -> torch.Tensor | None:
    """(rows, ids): each penalised row's prompt ids, widened as `_widen` does (a row without a penalty:
    token 0, which its penalty of 1.0 leaves as it is); None when no row has a penalty."""
    if all(p.repetition_penalty == 1.0 for p in params):
        return None
    none = torch.zeros(1, dtype=torch.long)
    rows = [ids if p.repetition_penalty != 1.0 else none for p, ids in zip(params, prompts, strict=True)]
    width = max(len(ids) for ids in rows)
    return upload(torch.cat([_widen(ids[None], width) for ids in rows]), device)


def _settings(params: list[SamplingParams], vocab: int, device: torch.device) -> Settings:
    """The rows' `Settings`, built on the host and uploaded without waiting for the device."""
    drawing = [row for row, p in enumerate(params) if not p.greedy]
    sampled = [params[row] for row in drawing]
    limits = [p.top_k if 0 < p.top_k < vocab else 0 for p in sampled]
    penalties = [p.repetition_penalty for p in params]
    return Settings(
        rows=upload(torch.tensor(drawing, dtype=torch.long), device) if len(drawing) < len(params) else None,
        temperature=_column([p.temperature for p in sampled], device),
        top_k=upload(torch.tensor(limits, dtype=torch.long)[:, None], device) if any(limits) else None,
        most=max(limits, default=0),
        top_p=_column([1 - p.top_p if p.top_p < 1.0 else -1.0 for p in sampled], device)
        if any(p.top_p < 1.0 for p in sampled)
        else None,
        penalty=_column(penalties, device) if any(p != 1.0 for p in penalties) else None,
    )


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    """(n, 1) float32: one value per row, as a Python float becomes in ``scores / value``."""
    return upload(torch.tensor(values, dtype=torch.float32)[:, None], device)


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: shrink the scores of the tokens each row has
    seen (``seen`` (rows, ids)) by its ``penalty`` (rows, 1)."""
    picked = scores.gather(1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seen, picked)


def scale(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``scores / temperature`` per row, kept finite for every accepted temperature and penalty.

    A tiny temperature (1e-300, 0 in float32) or a repetition penalty's overflow turns the top
    scores into +inf, and the softmax of inf - inf is nan. Where the division overflows, the
    temperature is so small against the row's maximum that every other score, divided, lies further
    below it than exp can resolve (the gap is at least one float32 step at the maximum; for any
    maximum above 1e-30), so the softmax gives the others nothing: the draw is among the maxima
    alone, as it is where the maximum is +inf already. Elsewhere rows divide exactly as
    transformers' TemperatureLogitsWarper does.
    """
    scaled = scores / temperature
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(top > -torch.inf, top, torch.nan)  # a row of -inf only keeps none: its draw fails
    only_top = torch.where(scores == top, 0.0, -torch.inf)
    return torch.where(torch.isfinite(scaled.amax(dim=-1, keepdim=True)), scaled, only_top)


def warp(scores: torch.Tensor, settings: Settings) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) filtering of the sampling rows' scores, as transformers does them."""
    scores = scale(scores, settings.temperature)  # a new tensor, filtered in place below
    if settings.top_k is not None:
        k = settings.top_k
        kth = torch.topk(scores, settings.most).values.gather(1, (k - 1).clamp_min(0))
        kth = torch.where(k > 0, kth, -torch.inf)  # no limit: nothing lies below -inf
        scores.masked_fill_(scores < kth, -torch.inf)
    if settings.top_p is not None:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= settings.top_p
        remove[:, -1] = False  # always keep the most likely token
        scores.masked_fill_(remove.scatter(1, order, remove), -torch.inf)
    return scores


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of ``probs``, row i drawn with ``generators[i]``.

    What ``torch.multinomial(probs[i], 1, generator=generators[i])`` draws (its exponential race,
    ``argmax(p / q)`` with q ~ Exp(1)), without its checks of the input, which read the device.
    """
    noise = torch.empty_like(probs)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)
