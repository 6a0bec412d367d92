"""Peak accelerator memory of a run, estimated before any weight loads: `eqakit config FILE --memory`.

"How much GPU memory do I need?" is answered from what a run knows before its first heavy step: the
checkpoint's config.json (shapes; parameter counts from a meta-device skeleton), the token counts
its preflight planned for every sample, and the keys. Each term is something the accelerator holds:

- weights, in the dtype the run computes in (trainable ones in fp32; ``quantization_bit``'s linear
  layers in 4 or 8 bits);
- what trains: LoRA's fp32 weights, every trainable weight's fp32 gradient and optimizer state;
- training's vision feature cache (each distinct image's features, once), and while it is built,
  the vision tower's working set;
- activations under gradient checkpointing: a checkpointed layer keeps its input hidden state, and
  in the backward pass one layer at a time recomputes all of its activations;
- logits: fp32 over the vocabulary at every position of a micro-batch, or only at the answer
  tokens when packing;
- predict and serving: the batch's KV cache, the engine's caches of image features and prompt
  prefixes, the vision tower over the batch's images and a prefill's working set.

Terms are not all alive at once: the logits are freed before the backward pass recomputes a layer,
an evaluation step's never meet a training step's, and the cache is built before anything trains.
So the estimate adds up, at each such moment, the terms alive then; the peak is the largest sum.
It compares with ``torch.cuda.max_memory_allocated``, not with nvidia-smi, which adds the CUDA
context and what the allocator keeps cached. tests/test_memory.py checks it against the measured
peak of real runs on the CPU (the tiny model, and Qwen3-VL-2B's widths in fp32 and bf16).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from eqakit.data.encode import IGNORE_INDEX, IMAGE_PAD, VIDEO_PAD, Plan

if TYPE_CHECKING:
    from eqakit.config import Config
    from eqakit.config.args import ModelArguments
    from eqakit.data.dataset import Sample
    from eqakit.train.sft import Checked

GiB = 1 << 30
FP32 = 4
# Optimizer state per trainable weight, by a part of the optim key's value; else AdamW's two fp32 moments.
OPTIMIZER_STATE = {"sgd": 0, "adafactor": 0, "lion": FP32, "8bit": 2}
ADAMW_STATE = 2 * FP32
# The engine's LRU caches (`eqakit.engine.hf.engine.Engine`'s defaults), full after enough distinct
# images and prompts; the shortest prefix it caches (`Reuse`); the KV columns a row reserves ahead.
ENGINE_VISION_CACHE = 1024 << 20
ENGINE_PREFIX_CACHE = 2048 << 20
MIN_PREFIX_TOKENS = 64
ROOM = 64
CACHE_BATCH = 8  # images per vision-tower call while training's cache is built (`VisionFeatureCache`)
LAYER_0 = r"model\.language_model\.layers\.0\."

# The moments at which terms are alive (a term with none is alive throughout).
BUILD, LOSS, BACKWARD, EVAL = (
    "building the vision cache",
    "the loss",
    "the backward pass",
    "an evaluation step",
)
TOWER, PREFILL, SAMPLING = "the vision tower", "a prefill", "sampling"


@dataclass(frozen=True)
class Shapes:
    """The sizes the terms are made of, read from the checkpoint's config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # per token: a MoE layer's experts per token x expert width
    vocab: int
    levels: int  # feature tensors per visual token: the merger's, and one per deepstack merger
    vision_hidden: int
    vision_depth: int
    vision_intermediate: int
    merge: int  # merge x merge patches make one visual token
    patch_values: int  # pixel values per patch (channels x temporal patch x patch x patch)

    @classmethod
    def of(cls, config: Any) -> Shapes:
        text, vision = config.text_config, config.vision_config
        experts = getattr(text, "num_experts_per_tok", 0) if hasattr(text, "moe_intermediate_size") else 0
        channels = getattr(vision, "in_channels", None) or getattr(vision, "in_chans", 3)
        return cls(
            hidden=text.hidden_size,
            layers=text.num_hidden_layers,
            heads=text.num_attention_heads,
            kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            intermediate=experts * text.moe_intermediate_size if experts else text.intermediate_size,
            vocab=text.vocab_size,
            levels=1 + len(getattr(vision, "deepstack_visual_indexes", None) or ()),
            vision_hidden=vision.hidden_size,
            vision_depth=vision.depth,
            vision_intermediate=vision.intermediate_size,
            merge=vision.spatial_merge_size,
            patch_values=channels * vision.temporal_patch_size * vision.patch_size**2,
        )

    def layer_activations(self) -> int:
        """Values per token one decoder layer keeps for its backward pass (what its norms, fp32
        inside, projections, q/k norms, attention with GQA's keys and values repeated to every
        head, and gated MLP save), plus the gradients in flight while it runs backward."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 5 * self.hidden + 6 * q + 5 * kv + 6 * self.intermediate

    def inference_activations(self) -> int:
        """Values per token of one decoder layer's working set without gradients (freed as it goes)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 3 * self.hidden + 2 * q + 2 * kv + 3 * self.intermediate

    def tower_bytes(self, dtype: torch.dtype, trains: bool) -> int:
        """Bytes per patch in the vision tower: its fp32 input pixels, then the larger of two working
        sets: Qwen3-VL's position embedding (4 learned ones per patch, weighted in fp32) and one
        block's MLP beside the residual stream and the features returned; when the tower trains,
        each block's saved activations too."""
        h, i, b = self.vision_hidden, self.vision_intermediate, dtype.itemsize
        position = 4 * h * (b + FP32 + (FP32 if b != FP32 else 0)) + h * b
        block = (3 * h + 2 * i + self.levels * self.hidden // self.merge**2) * b
        saved = self.vision_depth * (11 * h + 4 * i) * b if trains else 0
        return self.patch_values * FP32 + saved + max(position, block)

    def kv_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of keys and values one token leaves in the cache (all layers)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype.itemsize


@dataclass(frozen=True)
class Checkpoint:
    """What the estimate reads of the checkpoint: config.json and a meta-device skeleton (no weights)."""

    config: Any
    skeleton: torch.nn.Module
    shapes: Shapes
    params: dict[str, int]  # parameter name -> elements (a tied weight once)
    linear: dict[str, tuple[int, int]]  # linear layer name -> (in, out) features

    @classmethod
    def of(cls, model_args: ModelArguments) -> Checkpoint:
        from eqakit.model.load import model_config, skeleton

        config = model_config(model_args)
        net = skeleton(config, model_args.trust_remote_code)
        modules = net.named_modules()
        linear = {n: (m.in_features, m.out_features) for n, m in modules if isinstance(m, torch.nn.Linear)}
        return cls(config, net, Shapes.of(config), {n: p.numel() for n, p in net.named_parameters()}, linear)

    def inside(self, modules: list[str]) -> set[str]:
        """The parameters inside the named modules (full names, or names peft matches by their end)."""
        names = [
            n for n, _ in self.skeleton.named_modules() if any(n == m or n.endswith(f".{m}") for m in modules)
        ]
        return {p for p in self.params if any(p.startswith(f"{n}.") for n in names)}


@dataclass(frozen=True)
class Term:
    """One thing the accelerator holds: its size, how it was counted, what would lower it, and the
    moments it is alive at (none: throughout)."""

    name: str
    nbytes: int
    how: str
    lower: str
    when: tuple[str, ...] = ()


@dataclass(frozen=True)
class Estimate:
    """The terms of one stage, and its peak: the largest sum of the terms alive at one moment."""

    stage: str
    setting: str  # device and dtypes, in words
    terms: tuple[Term, ...]
    notes: tuple[str, ...] = ()

    def moments(self) -> dict[str, int]:
        """Bytes alive at each moment some term is limited to ("" when every term is held throughout)."""
        names = list(dict.fromkeys(m for t in self.terms for m in t.when)) or [""]
        return {m: sum(t.nbytes for t in self.terms if not t.when or m in t.when) for m in names}

    @property
    def peak(self) -> int:
        return max(self.moments().values())

    def report(self) -> str:
        """The terms, the moments, the largest terms at the peak with what lowers them; the peak last."""
        moments = self.moments()
        at = max(moments, key=moments.__getitem__)
        lines = [f"# memory estimate for {self.stage} ({self.setting}):"]
        for t in self.terms:
            lines.append(
                f"#   {t.name:<34} {_size(t.nbytes):>10}  [{', '.join(t.when) or 'throughout'}] {t.how}"
            )
        if len(moments) > 1:
            sums = [f"{m} {_size(n)}" + (" (the peak)" if m == at else "") for m, n in moments.items()]
            lines.append(f"# alive at once: {'; '.join(sums)}")
        lines.append("# largest terms at the peak, and what lowers them:")
        alive = sorted((t for t in self.terms if not t.when or at in t.when), key=lambda t: -t.nbytes)
        lines += [f"#   {t.name} ({_size(t.nbytes)}): {t.lower}" for t in alive[:3]]
        lines += [f"# {note}" for note in self.notes]
        lines.append(f"estimated peak accelerator memory: {self.peak / GiB:.1f} GiB")
        return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB // 10 else f"{nbytes / (1 << 20):.1f} MiB"


def estimate(kind: str, cfg: Config, found: Any, device: torch.device | None = None) -> Estimate:
    """The estimate for the stage ``kind`` and ``cfg`` describe (train, predict: a train config with
    do_predict, serve: an infer config), from what its preflight ``found`` (`eqakit.train.sft.Checked`;
    `eqakit.evaluate.predict.preflight`'s tuple), on ``device`` (default: the run's here)."""
    from eqakit.model.load import pick_device

    if kind == "train":
        device = device or cfg.training.device
        return predict(cfg, *found[:3], device) if cfg.training.do_predict else training(cfg, found, device)
    return serving(cfg, device or pick_device())


def _bf16_here(device: torch.device) -> bool:
    """Whether the GPU computes in bf16; one named but absent here is taken to (fp16 costs the same)."""
    return torch.cuda.is_bf16_supported() if device.type == "cuda" and torch.cuda.is_available() else True


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weights_term(ckpt: Checkpoint, dtype: torch.dtype, bits: int | None, fp32: set[str]) -> Term:
    """The weights in ``dtype``, the ``fp32`` ones (those trained in place) in fp32; with ``bits``
    every linear layer's weight but lm_head in 4 or 8 bits (bitsandbytes' 4-bit adds an fp32 scale
    per 64 weights)."""
    per_weight = {4: 0.5 + FP32 / 64, 8: 1.0}.get(bits or 0)
    total, quantized = 0.0, 0
    for name, n in ckpt.params.items():
        layer = name.removesuffix(".weight")
        if name in fp32:
            total += n * FP32
        elif per_weight and layer in ckpt.linear and layer != "lm_head":
            total, quantized = total + n * per_weight, quantized + n
        else:
            total += n * dtype.itemsize
    how = f"{sum(ckpt.params.values()):,} parameters in {_name(dtype)}"
    how += f", {quantized:,} of them in {bits} bits" if quantized else ""
    how += f", {sum(ckpt.params[n] for n in fp32):,} trained in place in float32" if fp32 else ""
    lower = "quantization_bit: 4 (CUDA, bitsandbytes)"
    if dtype == torch.float32:
        lower = "a 16-bit dtype (bf16: true, or infer_dtype: bfloat16: half of fp32's bytes), or " + lower
    return Term("weights", int(total), how, lower)


def _patches(grid: tuple[int, int, int]) -> int:
    return grid[0] * grid[1] * grid[2]


def _media(plans: list[Plan], samples: list[Sample]) -> dict[tuple[Any, ...], tuple[int, int, int]]:
    """Each distinct image and video (by file and pixel cap, as the feature caches key them): its grid."""
    seen: dict[tuple[Any, ...], tuple[int, int, int]] = {}
    for plan, sample in zip(plans, samples, strict=True):
        for path, grid in zip(sample.images, plan.grids, strict=True):
            seen[(str(path), plan.max_pixels)] = grid
        for source, video in zip(sample.videos, plan.videos, strict=True):
            seen[(source, video.info.indices, video.max_pixels)] = video.grid
    return seen


def _media_key(plan: Plan, sample: Sample) -> tuple[Any, ...]:
    """What packing and predict group samples by: their images and videos (an OpenEQA episode's)."""
    return tuple(str(p) for p in sample.images) + tuple(
        (s, v.info.indices, v.max_pixels) for s, v in zip(sample.videos, plan.videos, strict=True)
    )


def feature_cache_term(
    plans: list[Plan], samples: list[Sample], shapes: Shapes, dtype: torch.dtype, bound: int | None = None
) -> Term:
    """Every distinct image's features (the merger's and each deepstack level's), once; at most
    ``bound`` bytes (the engine's LRU)."""
    grids = _media(plans, samples).values()
    tokens = sum(_patches(g) for g in grids) // shapes.merge**2
    nbytes = tokens * shapes.hidden * shapes.levels * dtype.itemsize
    how = f"{len(grids):,} distinct images/videos, {tokens:,} visual tokens x {shapes.levels} levels x {shapes.hidden}"
    if bound is not None and nbytes > bound:
        nbytes, how = bound, how + f", capped at the cache's {bound >> 20} MiB"
    return Term("vision feature cache", nbytes, how, "image_max_pixels (fewer visual tokens per image)")


# ---- training -------------------------------------------------------------------------------------


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
        groups[_media_key(plan, sample)].append(plan)
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
            images[plan.max_pixels][str(path)] = _patches(grid)
        calls += [_patches(v.grid) for v in plan.videos]
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
    dtype = train_dtype(t.bf16, t.fp16, device, declared_dtype(ckpt.config), _bf16_here(device))
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
    most = max(sum(map(_patches, p.grids + [v.grid for v in p.videos])) for p in train[0])
    patches = 0 if cached else batch[0] // batch[2] * most
    per = layer_bytes(cfg, ckpt, dtype, lora=checked.trainable is None)
    terms += step_terms(cfg, checked, shapes, dtype, batch, per, patches)
    if evaluates:
        terms += eval_terms(cfg, evaluated, shapes, dtype)
    setting = f"{device.type}, compute dtype {_name(dtype)}, trainable weights float32"
    return Estimate(f"training ({cfg.finetuning.finetuning_type})", setting, tuple(terms))


# ---- predict and serving --------------------------------------------------------------------------


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
    order = sorted(range(len(plans)), key=lambda i: (_media_key(plans[i], samples[i]), i))
    prefixes: dict[tuple[Any, ...], int] = {}
    rows = width = 0
    for i in order[:MAX_ROWS]:
        prefix, key = _prefix(plans[i], vision_end), _media_key(plans[i], samples[i])
        wider = max(width, plans[i].length - prefix)
        held = {**prefixes, key: prefix} if prefix else prefixes
        if rows and sum(held.values()) + (rows + 1) * (wider + ahead) > budget:
            break
        prefixes, rows, width = held, rows + 1, wider
    patches = sum(
        map(_patches, _media([plans[i] for i in order[:rows]], [samples[i] for i in order[:rows]]).values())
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
    prefixes = {_media_key(p, s): _prefix(p, vision_end) for p, s in zip(plans, samples, strict=True)}
    tokens = sum(prefixes.values())
    how = f"{sum(map(bool, prefixes.values())):,} distinct prefixes, {tokens:,} tokens; at most {ENGINE_PREFIX_CACHE >> 20} MiB"
    return Term(
        "prefix cache", min(tokens * shapes.kv_bytes(dtype), ENGINE_PREFIX_CACHE), how, "image_max_pixels"
    )


def _infer_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    from eqakit.model.load import DTYPES, optimal_dtype

    name = cfg.model.infer_dtype
    return optimal_dtype(device, None, _bf16_here(device)) if name == "auto" else DTYPES[name]


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
    return Estimate("predict", f"{device.type}, {_name(dtype)}", tuple(terms), _backend_notes(cfg))


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
        "serving (eqakit api)", f"{device.type}, {_name(dtype)}", tuple(terms), _backend_notes(cfg)
    )


def _backend_notes(cfg: Config) -> tuple[str, ...]:
    if cfg.model.infer_backend != "vllm":
        return ()
    return (
        f"infer_backend: vllm claims vllm_gpu_util ({cfg.model.vllm_gpu_util}) of the accelerator's memory "
        "whatever the model needs; the terms above are the transformers engine's",
    )
