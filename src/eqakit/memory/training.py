"""Training's memory terms: what trains, the largest micro-batch's activations and logits (packed
or not), evaluation steps, and the vision cache with its build (see `eqakit.memory`)."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from eqakit.data.encode import IGNORE_INDEX, IMAGE_PAD, VIDEO_PAD, Plan
from eqakit.data.media import media_key
from eqakit.memory.terms import (
    ADAMW_STATE,
    BACKWARD,
    BUILD,
    CACHE_BATCH,
    EVAL,
    FP32,
    LAYER_0,
    LOSS,
    OPTIMIZER_STATE,
    Checkpoint,
    Estimate,
    Shapes,
    Term,
    bf16_here,
    dtype_name,
    feature_cache_term,
    patches_of,
    weights_term,
)

if TYPE_CHECKING:
    from eqakit.config import Config
    from eqakit.data.dataset import Sample
    from eqakit.train.sft import Checked


def adapted(cfg: Config, ckpt: Checkpoint) -> list[str]:
    """The linear layers LoRA adapts (`eqakit.train.lora.target_pattern`)."""
    from eqakit.train.lora import target_pattern

    pattern = re.compile(target_pattern(cfg, list(ckpt.linear)))
    return [name for name in ckpt.linear if pattern.match(name)]


def trainable_term(
    cfg: Config, ckpt: Checkpoint, checked: Checked, when: tuple[str, ...]
) -> tuple[Term, set[str]]:
    """What trains, alive ``when``, and the base weights trained in place (in fp32). LoRA: rank x
    (in + out) per adapted layer (+ DoRA's magnitudes) and the modules peft copies to train in full
    (unfrozen mergers, ``additional_target``), each weight in fp32 with its gradient and optimizer
    state; full and freeze tuning: each trainable weight's gradient and optimizer state."""
    from eqakit.model.arch import projector_names
    from eqakit.train.lora import listed

    f = cfg.finetuning
    state = FP32 + next(
        (b for part, b in OPTIMIZER_STATE.items() if part in str(cfg.training.optim)), ADAMW_STATE
    )
    if checked.trainable is not None:
        n = sum(ckpt.params[p] for p in checked.trainable)
        how = f"{n:,} weights x {state} bytes: fp32 gradient, optimizer state"
        lower = "finetuning_type: lora, or freeze with fewer freeze_trainable_layers"
        return Term("grads + optimizer state", n * state, how, lower, when), set(checked.trainable)
    lora = sum(
        f.lora_rank * sum(ckpt.linear[m]) + (ckpt.linear[m][1] if f.use_dora else 0)
        for m in adapted(cfg, ckpt)
    )
    copies = ckpt.inside(
        ([] if f.freeze_multi_modal_projector else projector_names(ckpt.skeleton))
        + listed(f.additional_target)
    )
    n = lora + sum(ckpt.params[p] for p in copies)
    how = f"{n:,} weights ({lora:,} LoRA) x {FP32 + state} bytes: fp32 weight, gradient, optimizer state"
    return Term(
        "LoRA weights + grads + optimizer", n * (FP32 + state), how, "lora_rank, lora_target", when
    ), set()


def layer_bytes(cfg: Config, ckpt: Checkpoint, dtype: torch.dtype, lora: bool) -> int:
    """Bytes per token one decoder layer keeps for its backward pass: `Shapes.layer_activations` in
    the compute dtype, and with LoRA on a 16-bit model the fp32 copy of each adapted layer's input
    that peft makes to meet its fp32 weights (and keeps for their gradients)."""
    base = ckpt.shapes.layer_activations() * dtype.itemsize
    if not lora or dtype == torch.float32:
        return base
    return base + FP32 * sum(ckpt.linear[n][0] for n in adapted(cfg, ckpt) if re.match(LAYER_0, n))


def _packed_length(members: list[Plan], pads: set[int]) -> int:
    """One packed row's length (`eqakit.train.packing.pack_rows`): the members' shared prefix, which
    must hold every visual token and learn nothing, once; then each member's remainder."""
    lengths = [p.length for p in members]
    first = members[0].input_ids
    limit = min(len(p.input_ids) for p in members) - 1
    n = 0
    while n < limit and all(p.input_ids[n] == first[n] and p.labels[n] == IGNORE_INDEX for p in members):
        n += 1
    if len(members) < 2 or n < max((i + 1 for i, t in enumerate(first) if t in pads), default=0):
        return sum(lengths)
    prefix = n + lengths[0] - len(first)  # the visual tokens all lie in the prefix
    return prefix + sum(length - prefix for length in lengths)


def _row(members: list[Plan], step: int, budget: int, pads: set[int]) -> tuple[int, int]:
    """(length, learned tokens) of the row packing makes of an episode's questions in one step: its
    ``step`` longest, as many as fit ``budget`` tokens (`pack_rows` starts another row beyond it)."""
    members = sorted(members, key=lambda p: p.length, reverse=True)[:step]
    fit = next((k for k in range(2, len(members) + 1) if _packed_length(members[:k], pads) > budget), None)
    row = members[: fit - 1] if fit else members
    return _packed_length(row, pads), sum(label != IGNORE_INDEX for p in row for label in p.labels)


def micro_batch(
    plans: list[Plan], samples: list[Sample], cfg: Config, pads: set[int]
) -> tuple[int, int, int]:
    """(tokens, positions whose logits the loss takes, longest row) of the largest training micro-batch.

    Unpacked: ``per_device_train_batch_size`` samples padded to the longest, logits everywhere.
    Packed (`eqakit.train.packing`): a step's ``batch x gradient_accumulation_steps`` samples come
    episode by episode, each episode's in one row (its frames once), rows grouped into micro-batches
    no larger, padded, than the unpacked one; the step with the most rows (the smallest episodes)
    fills its micro-batch with the longest. Logits are taken at the learned positions only.
    """
    t = cfg.training
    batch = min(t.per_device_train_batch_size, len(plans))
    longest = max(p.length for p in plans)
    budget = batch * longest
    if not cfg.finetuning.shared_prefix_packing:
        return budget, budget, longest
    step = min(batch * t.gradient_accumulation_steps, len(plans))
    groups: dict[tuple[Any, ...], list[Plan]] = defaultdict(list)
    for plan, sample in zip(plans, samples, strict=True):
        groups[media_key(sample, plan)].append(plan)
    rows = [_row(g, step, budget, pads) for g in groups.values()]
    row, learned = max(r[0] for r in rows), max(r[1] for r in rows)
    sizes = sorted(len(g) for g in groups.values())
    in_step = next((k for k in range(1, len(sizes) + 1) if sum(sizes[:k]) >= step), len(sizes))
    per_batch = max(1, min(in_step, budget // row))
    return per_batch * row, per_batch * learned, row


def _layers(cfg: Config, checked: Checked, shapes: Shapes) -> tuple[int, int]:
    """(language-model layers that keep only their input, layers that keep all their activations).

    eqakit checkpoints the layers holding trainable weights (`checkpoint_trainable_layers`;
    transformers' ``gradient_checkpointing: true``: every layer). The backward pass runs through
    every layer (the reentrant checkpoint makes the input embeddings require gradients), so a layer
    that is not checkpointed keeps all its activations."""
    f = cfg.finetuning
    if cfg.training.gradient_checkpointing:
        return shapes.layers, 0
    if f.disable_gradient_checkpointing:
        return 0, shapes.layers
    if checked.trainable is None:
        trained = 0 if f.freeze_language_model else shapes.layers
    else:
        found = (re.search(r"language_model\.layers\.(\d+)\.", n) for n in checked.trainable)
        trained = len({m.group(1) for m in found if m})
    return trained, shapes.layers - trained


def step_terms(
    cfg: Config,
    checked: Checked,
    shapes: Shapes,
    dtype: torch.dtype,
    batch: tuple[int, int, int],
    per: int,
    patches: int,
) -> list[Term]:
    """A training step's activations (checkpoints, one layer recomputed at ``per`` bytes a token,
    layers kept whole, the attention mask, the vision tower's when it runs in the step) and logits:
    the loss keeps their fp32 log-softmax, then come its gradient and the logits' (packed: plus the
    model's own logits at the kept positions, in the compute dtype)."""
    tokens, positions, row = batch
    b, step = dtype.itemsize, (LOSS, BACKWARD)
    stored, whole = _layers(cfg, checked, shapes)
    packed = cfg.finetuning.shared_prefix_packing
    lower = "per_device_train_batch_size, cutoff_len, image_max_pixels"
    how = f"{stored} layers x {tokens:,} tokens (the largest micro-batch) x {shapes.hidden}"
    terms = [Term("activations: checkpoints", stored * tokens * shapes.hidden * b, how, lower, step)]
    mask = f"{tokens:,} x {row:,}" + (" (packed rows' 4D mask and its boolean)" if packed else " (boolean)")
    terms.append(Term("attention mask", tokens * row * (b + 1 if packed else 1), mask, lower, step))
    if stored:
        how = f"{tokens:,} tokens x {per:,} bytes, recomputed"
        terms.append(Term("activations: one layer", tokens * per, how, lower, (BACKWARD,)))
    if whole:
        how = f"{whole} layers not checkpointed x {tokens:,} tokens x {per:,} bytes"
        terms.append(Term("activations: whole layers", whole * tokens * per, how, lower, step))
    if patches:
        tower = shapes.tower_bytes(dtype, checked.vision_trains)
        why = "image_max_pixels; vision_feature_cache: true (a frozen tower then runs once per image)"
        terms.append(
            Term(
                "activations: vision tower",
                patches * tower,
                f"{patches:,} patches x {tower:,} bytes",
                why,
                step,
            )
        )
    per_logit = 3 * FP32 + (b if packed else 0)
    how = f"{positions:,} {'learned ' if packed else ''}positions x {shapes.vocab:,} vocabulary x {per_logit} bytes"
    lower = "per_device_train_batch_size, cutoff_len" + ("" if packed else "; shared_prefix_packing: true")
    return [*terms, Term("logits", positions * shapes.vocab * per_logit, how, lower, (LOSS,))]


def eval_terms(cfg: Config, plans: list[Plan], shapes: Shapes, dtype: torch.dtype) -> list[Term]:
    """An evaluation step during training: unpacked, no gradients; transformers' loss upcasts the
    logits of every position to fp32 and takes their log-softmax."""
    tokens = min(cfg.training.per_device_eval_batch_size, len(plans)) * max(p.length for p in plans)
    b, per = dtype.itemsize, shapes.inference_activations()
    per_logit = b + (FP32 if b != FP32 else 0) + FP32
    lower = "per_device_eval_batch_size, cutoff_len; eval_strategy: no (no evaluation while training)"
    how = f"{tokens:,} positions x {shapes.vocab:,} vocabulary x {per_logit} bytes"
    return [
        Term(
            "eval activations",
            tokens * per * b,
            f"{tokens:,} tokens x {per:,} values of one layer",
            lower,
            (EVAL,),
        ),
        Term("eval logits", tokens * shapes.vocab * per_logit, how, lower, (EVAL,)),
    ]


def build_term(plans: list[Plan], samples: list[Sample], shapes: Shapes, dtype: torch.dtype) -> Term:
    """The vision tower's working set while the cache is built, in its largest call: up to 8
    distinct images of one pixel cap, or one video; no gradients."""
    images: dict[int, dict[str, int]] = defaultdict(dict)  # pixel cap -> image -> patches
    calls = []
    for plan, sample in zip(plans, samples, strict=True):
        for path, grid in zip(sample.images, plan.grids, strict=True):
            images[plan.max_pixels][str(path)] = patches_of(grid)
        calls += [patches_of(v.grid) for v in plan.videos]
    calls += [sum(sorted(by_image.values(), reverse=True)[:CACHE_BATCH]) for by_image in images.values()]
    per = shapes.tower_bytes(dtype, trains=False)
    how = f"{max(calls):,} patches x {per:,} bytes"
    return Term("vision tower (cache build)", max(calls) * per, how, "image_max_pixels", (BUILD,))


def training(cfg: Config, checked: Checked, device: torch.device) -> Estimate:
    """Training's peak, from the preflight's plans (`eqakit.train.sft.preflight`), in the dtype the
    run would choose (`eqakit.model.load.train_dtype`)."""
    from eqakit.model.load import declared_dtype, train_dtype
    from eqakit.train.data import split_train_val

    t = cfg.training
    ckpt = Checkpoint.of(cfg.model)
    shapes = ckpt.shapes
    dtype = train_dtype(t.bf16, t.fp16, device, declared_dtype(ckpt.config), bf16_here(device))
    plans, samples = checked.plans, checked.samples
    train_rows, val_rows = split_train_val(len(plans), cfg.data.val_size, t.seed)
    evaluated = [plans[i] for i in val_rows] or (checked.extra_eval[0] if checked.extra_eval else [])
    evaluates = bool(evaluated) and t.eval_strategy.value != "no"
    trainable, fp32 = trainable_term(cfg, ckpt, checked, (LOSS, BACKWARD) + ((EVAL,) if evaluates else ()))
    terms = [weights_term(ckpt, dtype, cfg.model.quantization_bit, fp32), trainable]
    train = [plans[i] for i in train_rows], [samples[i] for i in train_rows]
    pads = set(checked.processor.tokenizer.convert_tokens_to_ids([IMAGE_PAD, VIDEO_PAD]))
    batch = micro_batch(*train, cfg, pads)
    cached = cfg.finetuning.vision_feature_cache and not checked.vision_trains
    if cached:
        extra = checked.extra_eval or ([], [])
        everything = plans + extra[0], samples + extra[1]
        cache = feature_cache_term(*everything, shapes, dtype)
        lower = f"{cache.lower}, or vision_feature_cache: false (the tower then runs at every step)"
        terms += [replace(cache, lower=lower), build_term(*everything, shapes, dtype)]
    # without the cache the tower runs in every step, over each row's images (the longest sample's)
    most = max(sum(map(patches_of, p.grids + [v.grid for v in p.videos])) for p in train[0])
    patches = 0 if cached else batch[0] // batch[2] * most
    per = layer_bytes(cfg, ckpt, dtype, lora=checked.trainable is None)
    terms += step_terms(cfg, checked, shapes, dtype, batch, per, patches)
    if evaluates:
        terms += eval_terms(cfg, evaluated, shapes, dtype)
    setting = f"{device.type}, compute dtype {dtype_name(dtype)}, trainable weights float32"
    return Estimate(f"training ({cfg.finetuning.finetuning_type})", setting, tuple(terms))
