"""Attention over a prompt prefix that many rows share, held once instead of copied into every row.

The questions of an OpenEQA episode share their system prompt and frames: 1,500+ tokens of keys and
values per layer, against a few dozen for each question. Copying that prefix into every row of
the batch would make its memory, not the work, decide how many questions decode together. Here a
row's KV cache holds only its own tokens (question and answer); the prefix stays where the prefix
cache keeps it, once, and each row's attention is computed over both:

    softmax([q.Kp, q.Ks]) . [Vp; Vs]  =  (e^(q.Kp - m) . Vp + e^(q.Ks - m) . Vs) / (sum e^(q.Kp - m) + sum e^(q.Ks - m))

with m the row's maximum score: the same function as attention over the concatenation (the
equivalence tests compare greedy tokens with ``model.generate``), computed in float32.

`install` registers this as an attention implementation of transformers (its public
``AttentionInterface``) for the language model only; rows with no shared prefix, and every forward
pass without one (prefix computation, plain prompts), go through transformers' sdpa unchanged: a
pass without padding hands it no mask at all, so it runs the fused causal kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from eqakit.engine.hf.caches import PrefixState

NAME = "eqakit_shared_prefix"


@dataclass(frozen=True)
class SharedPrefix:
    """For one forward pass: each shared prefix and the batch rows (indices) that continue it, and
    the rows that continue none (None when there are none). Known on the host before the pass, so
    that no layer asks the device which rows are which."""

    groups: tuple[tuple[PrefixState, torch.Tensor], ...]
    alone: torch.Tensor | None


def _mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """sdpa's boolean mask. With no padding mask (the engine passes none for a pass without padding
    and without a shared prefix: `eqakit.engine.hf.model.Model.forward`) sdpa may skip it and run
    its fused causal kernel; with one, the mask is always materialized, because deciding to skip
    would read the padding mask back from the device (``all()``) once per forward pass."""
    allow_skip = kwargs.get("attention_mask") is None
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": allow_skip})


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    shared_prefix: SharedPrefix | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (B, Hq, T, D), key/value (B, Hkv, S, D) from the cache,
    ``attention_mask`` (B, 1, T, S) boolean; returns (B, T, Hq, D)."""
    if shared_prefix is None or not shared_prefix.groups:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, q_heads, steps, dim = query.shape
    kv_heads = key.shape[1]
    repeat = q_heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    # group query heads by the KV head they read: (B, Hkv, repeat * T, D), no copy of K or V
    q = query.float().reshape(rows, kv_heads, repeat * steps, dim)
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale
    if attention_mask is not None:
        allowed = attention_mask.to(torch.bool).repeat(1, 1, repeat, 1)
        scores = scores.masked_fill(~allowed, -torch.inf)
    values = value.float()
    out = torch.empty(rows, kv_heads, repeat * steps, dim, dtype=torch.float32, device=query.device)
    for state, members in shared_prefix.groups:
        prefix_keys, prefix_values = state.layers[module.layer_idx]  # (1, Hkv, P, D)
        out[members] = _with_prefix(
            q[members],
            scores[members],
            values[members],
            prefix_keys[0].float(),
            prefix_values[0].float(),
            scale,
        )
    alone = shared_prefix.alone
    if alone is not None:
        out[alone] = _softmax_attend(scores[alone], values[alone])
    out = out.reshape(rows, q_heads, steps, dim).transpose(1, 2).contiguous()
    return out.to(query.dtype), None


def _with_prefix(
    q: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of n rows' queries q (n, Hkv, M, D) over one prefix (Hkv, P, D) and their own keys.

    The rows are folded into the query dimension for the prefix's two matrix products, so the
    prefix is read once per layer and step, not broadcast (copied) to every row.
    """
    n, kv_heads, m, dim = q.shape
    length = prefix_keys.shape[1]
    folded = q.transpose(0, 1).reshape(kv_heads, n * m, dim)
    prefix_scores = (torch.matmul(folded, prefix_keys.transpose(-1, -2)) * scale).view(kv_heads, n, m, length)
    prefix_scores = prefix_scores.transpose(0, 1)  # (n, Hkv, M, P)
    top = torch.maximum(prefix_scores.amax(dim=-1, keepdim=True), scores.amax(dim=-1, keepdim=True))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    prefix_weights, own_weights = (prefix_scores - top).exp(), (scores - top).exp()
    from_prefix = torch.matmul(prefix_weights.transpose(0, 1).reshape(kv_heads, n * m, length), prefix_values)
    numerator = from_prefix.view(kv_heads, n, m, dim).transpose(0, 1) + torch.matmul(own_weights, values)
    denominator = prefix_weights.sum(dim=-1, keepdim=True) + own_weights.sum(dim=-1, keepdim=True)
    return numerator / denominator


def _softmax_attend(scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Plain attention; a query with every key masked (a padding position) gets zeros, not nan, so
    padding never spreads nan into the real positions' values."""
    top = scores.amax(dim=-1, keepdim=True)
    weights = (scores - torch.where(torch.isfinite(top), top, torch.zeros_like(top))).exp()
    total = weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.matmul(weights, values) / total


def install(language_model: Any) -> None:
    """Make ``language_model`` (Qwen3-VL's text model) attend with `shared_prefix_attention`."""
    AttentionInterface.register(NAME, shared_prefix_attention)
    AttentionMaskInterface.register(NAME, _mask)
    language_model.config._attn_implementation = NAME
