"""The parts of a memory estimate: the checkpoint's shapes, a term (something the accelerator
holds), an estimate (terms and the moments they are alive at), and the terms every stage has:
the weights and the cache of image features (see `eqakit.memory`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from eqakit.data.encode import Plan

if TYPE_CHECKING:
    from eqakit.config.args import ModelArguments
    from eqakit.data.dataset import Sample

GiB = 1 << 30
FP32 = 4
# Optimizer state per trainable weight, by a part of the optim key's value; else AdamW's two fp32 moments.
OPTIMIZER_STATE = {"sgd": 0, "adafactor": 0, "lion": FP32, "8bit": 2}
ADAMW_STATE = 2 * FP32
# The engine's LRU caches (`eqakit.engine.hf.engine.HFEngine`'s defaults), full after enough distinct
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


def bf16_here(device: torch.device) -> bool:
    """Whether the GPU computes in bf16; one named but absent here is taken to (fp16 costs the same)."""
    return torch.cuda.is_bf16_supported() if device.type == "cuda" and torch.cuda.is_available() else True


def dtype_name(dtype: torch.dtype) -> str:
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
    how = f"{sum(ckpt.params.values()):,} parameters in {dtype_name(dtype)}"
    how += f", {quantized:,} of them in {bits} bits" if quantized else ""
    how += f", {sum(ckpt.params[n] for n in fp32):,} trained in place in float32" if fp32 else ""
    lower = "quantization_bit: 4 (CUDA, bitsandbytes)"
    if dtype == torch.float32:
        lower = "a 16-bit dtype (bf16: true, or infer_dtype: bfloat16: half of fp32's bytes), or " + lower
    return Term("weights", int(total), how, lower)


def patches_of(grid: tuple[int, int, int]) -> int:
    return grid[0] * grid[1] * grid[2]


def distinct_media(plans: list[Plan], samples: list[Sample]) -> dict[tuple[Any, ...], tuple[int, int, int]]:
    """Each distinct image and video (by file and pixel cap, as the feature caches key them): its grid."""
    seen: dict[tuple[Any, ...], tuple[int, int, int]] = {}
    for plan, sample in zip(plans, samples, strict=True):
        for path, grid in zip(sample.images, plan.grids, strict=True):
            seen[(str(path), plan.max_pixels)] = grid
        for source, video in zip(sample.videos, plan.videos, strict=True):
            seen[(source, video.info.indices, video.max_pixels)] = video.grid
    return seen


def feature_cache_term(
    plans: list[Plan], samples: list[Sample], shapes: Shapes, dtype: torch.dtype, bound: int | None = None
) -> Term:
    """Every distinct image's features (the merger's and each deepstack level's), once; at most
    ``bound`` bytes (the engine's LRU)."""
    grids = distinct_media(plans, samples).values()
    tokens = sum(patches_of(g) for g in grids) // shapes.merge**2
    nbytes = tokens * shapes.hidden * shapes.levels * dtype.itemsize
    how = f"{len(grids):,} distinct images/videos, {tokens:,} visual tokens x {shapes.levels} levels x {shapes.hidden}"
    if bound is not None and nbytes > bound:
        nbytes, how = bound, how + f", capped at the cache's {bound >> 20} MiB"
    return Term("vision feature cache", nbytes, how, "image_max_pixels (fewer visual tokens per image)")
