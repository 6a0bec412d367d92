"""Predict's and serving's memory terms: the engine's caches and the batch it decodes: KV cache,
vision tower, prefill and sampling (see `eqakit.memory`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from eqakit.data.encode import Plan
from eqakit.data.media import media_key
from eqakit.memory.terms import (
    ENGINE_PREFIX_CACHE,
    ENGINE_VISION_CACHE,
    FP32,
    MIN_PREFIX_TOKENS,
    PREFILL,
    ROOM,
    SAMPLING,
    TOWER,
    Checkpoint,
    Estimate,
    Shapes,
    Term,
    bf16_here,
    distinct_media,
    dtype_name,
    feature_cache_term,
    patches_of,
    weights_term,
)

if TYPE_CHECKING:
    from eqakit.config import Config
    from eqakit.data.dataset import Sample


@dataclass(frozen=True)
class Batch:
    """The rows the engine decodes together: their count, their longest own part (after a shared
    prefix), the longest prefix they continue (each is prefilled alone), and their images' patches."""

    rows: int
    width: int
    prefix: int
    patches: int


def _prefix(plan: Plan, vision_end: int) -> int:
    """The prefix the engine caches and shares (`eqakit.engine.hf.prepare`): up to the prompt's last
    visual item, when that is at least `MIN_PREFIX_TOKENS` long; else 0."""
    ends = [i for i, t in enumerate(plan.input_ids) if t == vision_end]
    length = ends[-1] + 1 + plan.length - len(plan.input_ids) if ends else 0
    return length if length >= MIN_PREFIX_TOKENS else 0


def first_batch(plans: list[Plan], samples: list[Sample], cfg: Config, vision_end: int) -> Batch:
    """The batch predict starts with: questions in its order (episode by episode) admitted while
    the KV cache they may grow to fits ``kv_budget`` (`eqakit.engine.hf.runner.Runner.footprint`:
    each shared prefix once, rows as wide as the widest plus max_new_tokens ahead)."""
    from eqakit.evaluate.predict import MAX_ROWS, kv_budget

    budget, ahead = kv_budget(cfg), cfg.generating.max_new_tokens
    order = sorted(range(len(plans)), key=lambda i: (media_key(samples[i], plans[i]), i))
    prefixes: dict[tuple[Any, ...], int] = {}
    rows = width = 0
    for i in order[:MAX_ROWS]:
        prefix, key = _prefix(plans[i], vision_end), media_key(samples[i], plans[i])
        wider = max(width, plans[i].length - prefix)
        held = {**prefixes, key: prefix} if prefix else prefixes
        if rows and sum(held.values()) + (rows + 1) * (wider + ahead) > budget:
            break
        prefixes, rows, width = held, rows + 1, wider
    patches = sum(
        map(
            patches_of,
            distinct_media([plans[i] for i in order[:rows]], [samples[i] for i in order[:rows]]).values(),
        )
    )
    return Batch(rows, width, max(prefixes.values(), default=0), patches)


def engine_terms(batch: Batch, ahead: int, shapes: Shapes, dtype: torch.dtype, lower: str) -> list[Term]:
    """The batch's own KV cache (each row's columns, with the room the cache reserves ahead); one
    after another, the vision tower over the batch's new images, the prefill's working set (one
    layer at a time, nothing kept), and the last positions' fp32 logits with the sampler's copies."""
    kv, per, tower = shapes.kv_bytes(dtype), shapes.inference_activations(), shapes.tower_bytes(dtype, False)
    columns = batch.width + max(ROOM, ahead)
    prefill = max(batch.prefix, batch.rows * batch.width)
    logits = 6 * FP32  # fp32 logits, their softmax, sorted values and int64 indices
    geometry = f"{shapes.layers} layers x 2 x {shapes.kv_heads} heads x {shapes.head_dim}"
    return [
        Term("KV cache", batch.rows * columns * kv, f"{batch.rows} rows x {columns:,} columns x {kv:,} bytes ({geometry})", lower),
        Term("vision tower", batch.patches * tower, f"{batch.patches:,} patches x {tower:,} bytes", f"image_max_pixels, {lower}", (TOWER,)),
        Term("prefill activations", prefill * per * dtype.itemsize, f"{prefill:,} tokens x {per:,} values", lower, (PREFILL,)),
        Term("logits + sampling", batch.rows * shapes.vocab * logits, f"{batch.rows} rows x {shapes.vocab:,} x {logits} bytes", lower, (SAMPLING,)),
    ]  # fmt: skip


def prefix_cache_term(
    plans: list[Plan], samples: list[Sample], shapes: Shapes, dtype: torch.dtype, vision_end: int
) -> Term:
    """The engine's prefix cache: each distinct prompt prefix (an episode's frames), keys and values
    in every layer, at most the cache's bound."""
    prefixes = {media_key(s, p): _prefix(p, vision_end) for p, s in zip(plans, samples, strict=True)}
    tokens = sum(prefixes.values())
    how = f"{sum(map(bool, prefixes.values())):,} distinct prefixes, {tokens:,} tokens; at most {ENGINE_PREFIX_CACHE >> 20} MiB"
    return Term(
        "prefix cache", min(tokens * shapes.kv_bytes(dtype), ENGINE_PREFIX_CACHE), how, "image_max_pixels"
    )


def _infer_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    from eqakit.model.load import DTYPES, optimal_dtype

    name = cfg.model.infer_dtype
    return optimal_dtype(device, None, bf16_here(device)) if name == "auto" else DTYPES[name]


def predict(
    cfg: Config, samples: list[Sample], sizes: list[Any], videos: list[Any], device: torch.device
) -> Estimate:
    """Predict's peak (`eqakit.evaluate.predict`): each sample planned as the engine plans it; the
    weights in the inference dtype, the engine's caches over the dataset's distinct images and
    prefixes, and the first batch's KV cache, vision tower and prefill."""
    from eqakit.data.encode import Geometry, PromptFormat
    from eqakit.engine.params import PromptTooLong
    from eqakit.engine.prompt import plan_prompt
    from eqakit.model.load import load_processor

    ckpt = Checkpoint.of(cfg.model)
    shapes, dtype = ckpt.shapes, _infer_dtype(cfg, device)
    tokenizer = load_processor(cfg.model).tokenizer
    geometry, fmt = Geometry.of(ckpt.config), PromptFormat.from_config(cfg)
    plans, kept = [], []
    for sample, size, clips in zip(samples, sizes, videos, strict=True):
        try:
            plans.append(
                plan_prompt(sample.prompt_messages, size, sample.system, tokenizer, geometry, fmt, clips)
            )
            kept.append(sample)
        except PromptTooLong:
            continue  # predict leaves it out too
    vision_end = tokenizer.convert_tokens_to_ids("<|vision_end|>")
    lower = "per_device_eval_batch_size, cutoff_len, max_new_tokens"
    terms = [
        weights_term(ckpt, dtype, cfg.model.quantization_bit, set()),
        feature_cache_term(plans, kept, shapes, dtype, ENGINE_VISION_CACHE),
        prefix_cache_term(plans, kept, shapes, dtype, vision_end),
        *engine_terms(
            first_batch(plans, kept, cfg, vision_end), cfg.generating.max_new_tokens, shapes, dtype, lower
        ),
    ]
    return Estimate("predict", f"{device.type}, {dtype_name(dtype)}", tuple(terms), _backend_notes(cfg))


def serving(cfg: Config, device: torch.device) -> Estimate:
    """`eqakit api`'s peak under a burst: ``api_max_batch_size`` requests of cutoff_len prompt
    tokens, all visual, admitted together (or as many as ``api_max_batch_tokens`` holds), each
    with max_new_tokens ahead; the engine's caches full (a server sees enough distinct images and
    prompts to fill them)."""
    ckpt = Checkpoint.of(cfg.model)
    shapes, dtype, api = ckpt.shapes, _infer_dtype(cfg, device), cfg.api
    prompt, ahead = cfg.data.cutoff_len, cfg.generating.max_new_tokens
    rows = api.api_max_batch_size
    if api.api_max_batch_tokens is not None:
        rows = max(1, min(rows, api.api_max_batch_tokens // (prompt + ahead)))
    full = "the engine's bound, reached after enough distinct"
    lower = "api_max_batch_size or api_max_batch_tokens, cutoff_len, max_new_tokens"
    terms = [
        weights_term(ckpt, dtype, cfg.model.quantization_bit, set()),
        Term("vision feature cache", ENGINE_VISION_CACHE, f"{full} images", "(a fixed bound)"),
        Term("prefix cache", ENGINE_PREFIX_CACHE, f"{full} prompts", "(a fixed bound)"),
        *engine_terms(Batch(rows, prompt, 0, rows * prompt * shapes.merge**2), ahead, shapes, dtype, lower),
    ]
    return Estimate(
        "serving (eqakit api)", f"{device.type}, {dtype_name(dtype)}", tuple(terms), _backend_notes(cfg)
    )


def _backend_notes(cfg: Config) -> tuple[str, ...]:
    if cfg.model.infer_backend != "vllm":
        return ()
    return (
        f"infer_backend: vllm claims vllm_gpu_util ({cfg.model.vllm_gpu_util}) of the accelerator's memory "
        "whatever the model needs; the terms above are the transformers engine's",
    )
