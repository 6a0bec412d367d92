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


def warp(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) filtering of one row's scores, as transformers does them."""
    scores = scores / params.temperature
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
    seen: list[list[int]],
    generators: list[torch.Generator | None],
) -> list[int]:
    """One next token per row of ``logits`` (B, vocab), float32.

    ``seen`` holds each row's prompt and generated token ids (used only by a repetition penalty).
    """
    plain_greedy = [p.greedy and p.repetition_penalty == 1.0 for p in params]
    chosen = logits.argmax(dim=-1).tolist() if any(plain_greedy) else [0] * len(params)
    for row, p in enumerate(params):
        if plain_greedy[row]:
            continue
        scores = logits[row]
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(seen[row], dtype=torch.long, device=scores.device)
            scores = apply_repetition_penalty(scores, ids, p.repetition_penalty)
        if p.greedy:
            chosen[row] = int(scores.argmax())
            continue
        probs = warp(scores, p).softmax(dim=-1)
        chosen[row] = int(torch.multinomial(probs, 1, generator=generators[row]))
    return chosen
