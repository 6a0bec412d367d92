"""Next-token choice for a batch whose rows each have their own decoding settings.

The order and definitions follow transformers' logits processors, so a request decodes as
``model.generate`` would: repetition penalty (over prompt and generated tokens), then temperature,
top-k, top-p, and a draw from the rest. Each sampling row draws from its own `torch.Generator`, so a
seeded request gives the same text whatever else shares its batch.
"""

from __future__ import annotations

import secrets

import torch

from eqakit.engine.params import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator for a sampling request (seeded when the request has a seed); None when greedy."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor for one row: shrink the scores of tokens already seen."""
    picked = scores.gather(0, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(0, seen, picked)


def scale(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``scores / temperature``, kept finite for every accepted temperature and penalty.

    A tiny temperature (1e-300) or repetition penalty turns scores into +inf, and the softmax of
    inf - inf is nan, which ``torch.multinomial`` refuses. Shifting by the maximum first (in float64)
    changes no probability; it is done only when plain division overflows, so ordinary values divide
    exactly as transformers' TemperatureLogitsWarper does. Scores that are +inf already (a penalty's overflow)
    mean "infinitely more likely than the rest": the draw is among those alone.
    """
    top = scores.max()
    if torch.isposinf(top):
        return torch.where(torch.isposinf(scores), 0.0, -float("inf")).to(scores.dtype)
    scaled = scores / temperature
    if torch.isfinite(scaled.max()):
        return scaled
    # float64: a temperature such as 1e-300 is 0 in float32, and 0 / 0 is nan
    return ((scores.double() - float(top)) / temperature).to(scores.dtype)


def warp(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) filtering of one row's scores, as transformers does them."""
    scores = scale(scores, params.temperature)
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - params.top_p
        remove[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(0, order, remove), -float("inf"))
    return scores


def choose_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seen: list[list[int] | None],
    generators: list[torch.Generator | None],
) -> list[int | Exception]:
    """One next token per row of ``logits`` (B, vocab), float32.

    ``seen`` holds each row's prompt and generated token ids (used only by a repetition penalty).
    A row whose draw raises gets the exception instead of a token: accepted settings cannot make
    sampling fail (see `scale`), but should one still do so, it fails its own request, not the batch.
    """
    plain_greedy = [p.greedy and p.repetition_penalty == 1.0 for p in params]
    chosen: list[int | Exception] = logits.argmax(dim=-1).tolist() if any(plain_greedy) else [0] * len(params)
    for row, p in enumerate(params):
        if plain_greedy[row]:
            continue
        try:
            chosen[row] = _choose(logits[row], p, seen[row], generators[row])
        except Exception as error:  # one row's numerical failure must not fail the others
            chosen[row] = error
    return chosen


def _choose(
    scores: torch.Tensor, p: SamplingParams, seen: list[int] | None, generator: torch.Generator | None
) -> int:
    if p.repetition_penalty != 1.0 and seen is not None:
        ids = torch.tensor(seen, dtype=torch.long, device=scores.device)
        scores = apply_repetition_penalty(scores, ids, p.repetition_penalty)
    if p.greedy:
        return int(scores.argmax())
    probs = warp(scores, p).softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
