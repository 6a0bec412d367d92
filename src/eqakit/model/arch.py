"""What eqakit knows about each architecture of the Qwen-VL family, in one place.

Everything else reads a model's facts from its config or module tree through here: which
LLaMA-Factory templates fit it, how its videos are marked up, its vision blocks' linear layers
(LoRA on the vision tower), its vision-to-language mergers (``freeze_multi_modal_projector:
false``), the parts full and freeze tuning keep frozen, and the shape of the visual features its
forward accepts (``mm_encoder_outputs``: Qwen3-VL's carry deepstack features for its first language
layers, Qwen2.5-VL's do not). The patch and merge sizes are the config's
(`eqakit.data.encode.Geometry`).

Supported (config.json ``model_type``):
- ``qwen3_vl``: Qwen3-VL dense (2B/4B/8B/32B), templates ``qwen3_vl_nothink`` and ``qwen3_vl``;
- ``qwen3_vl_moe``: Qwen3-VL mixture of experts (30B-A3B, 235B-A22B), the same templates;
- ``qwen2_5_vl``: Qwen2.5-VL (3B/7B/32B/72B), template ``qwen2_vl``: patch 14, window attention in
  the vision tower, no deepstack; a video is one span of pads whose temporal positions are spaced
  by ``second_per_grid_ts``, where Qwen3-VL writes a timestamp before every temporal patch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eqakit.data.template import NOTHINK, QWEN2_VL, THINK, thinking_template
from eqakit.errors import EqakitError


@dataclass(frozen=True)
class Architecture:
    """One supported ``model_type``: its name for people, the templates that fit it (the default
    first), whether its videos carry a timestamp per temporal patch (Qwen3-VL) or one
    ``second_per_grid_ts`` per video (Qwen2.5-VL), and the side in pixels of one visual token of its
    published checkpoints (patch x merge: what `eqakit prepare` sizes frames for before any model is
    at hand; a loaded model's own config is read through `eqakit.data.encode.Geometry`)."""

    model_type: str
    name: str
    templates: tuple[str, ...]
    timestamped_video: bool
    token_side: int
    # LLaMA-Factory's names of the parts full and freeze tuning keep frozen (``freeze_vision_tower``,
    # ``freeze_multi_modal_projector``, ``freeze_language_model``), matched as substrings of
    # parameter names as its ``get_forbidden_modules`` does
    vision_keys: tuple[str, ...] = (
        "visual.pos_embed",
        "visual.patch_embed",
        "visual.blocks",
        "visual.deepstack_merger_list",
    )
    projector_keys: tuple[str, ...] = ("visual.merger",)
    language_keys: tuple[str, ...] = ("language_model", "lm_head")


ARCHITECTURES = {
    a.model_type: a
    for a in (
        Architecture("qwen3_vl", "Qwen3-VL, dense", (NOTHINK, THINK), timestamped_video=True, token_side=32),
        Architecture(
            "qwen3_vl_moe",
            "Qwen3-VL, mixture of experts",
            (NOTHINK, THINK),
            timestamped_video=True,
            token_side=32,
        ),
        Architecture(
            "qwen2_5_vl",
            "Qwen2.5-VL",
            (QWEN2_VL,),
            timestamped_video=False,
            token_side=28,
            vision_keys=("visual.patch_embed", "visual.blocks"),
        ),
    )
}


def supported_list() -> str:
    return ", ".join(f"{a.model_type} ({a.name})" for a in ARCHITECTURES.values())


def architecture(model_type: str | None, name: str = "the model") -> Architecture:
    """The architecture of a config.json ``model_type``; anything else is refused by name."""
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None:
        raise EqakitError(
            f"model_name_or_path {name!r} is a {model_type!r} model; eqakit supports {supported_list()}"
        )
    return arch


def checkpoint_dir(name: str | Path) -> Path | None:
    """Where a checkpoint's files are on this machine: a local directory, or a hub id's snapshot in
    the local Hugging Face cache (nothing is downloaded); None when neither holds a config.json."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    text = str(name)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(text, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def local_model_type(name: str | Path) -> str | None:
    """The ``model_type`` of a checkpoint's config.json on this machine (`checkpoint_dir`); None when
    there is none to read."""
    root = checkpoint_dir(name)
    if root is None:
        return None
    try:
        model_type = json.loads((root / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def checkpoint_template(model_dir: str | Path) -> str | None:
    """The template a local checkpoint calls for when the config names none (LLaMA-Factory falls back
    to the tokenizer's template): its architecture's only one, or for Qwen3-VL ``qwen3_vl`` when its
    chat template's generation prompt opens a ``<think>`` block (Thinking models), else
    ``qwen3_vl_nothink``. None when neither the config nor the chat template says (a hub id that is
    not in the local cache)."""
    arch = ARCHITECTURES.get(local_model_type(model_dir) or "")
    if arch is not None and len(arch.templates) == 1:
        return arch.templates[0]
    root = checkpoint_dir(model_dir)
    thinking = thinking_template(root) if root is not None else None
    if thinking is None:
        return None
    return THINK if thinking else NOTHINK


def template_problem(template: str | None, model_type: str | None, name: str) -> str | None:
    """Why ``template`` does not fit a checkpoint of ``model_type`` (None when it fits or either is
    unknown): a Qwen2.5-VL checkpoint renders with qwen2_vl, a Qwen3-VL one with qwen3_vl(_nothink)."""
    arch = ARCHITECTURES.get(model_type or "")
    if template is None or arch is None or template in arch.templates:
        return None
    return (
        f"key 'template': {template!r} does not fit {name!r}, a {arch.name} model ({arch.model_type}); "
        f"use {' or '.join(arch.templates)}"
    )


def of_model(model: Any) -> Architecture:
    """The architecture of a loaded model (a PEFT wrapper's base)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return architecture(getattr(base.config, "model_type", None), type(base).__name__)


# The language model's decoder layers, as every supported architecture names them (peft's regexes
# and adapter checks anchor on it).
LM_PREFIX = r"model\.language_model\.layers\.\d+\."


VISION_PREFIX = "model.visual."  # every parameter of the vision tower and its mergers


def vision_tower(model: Any) -> Any:
    """The vision tower (patch embedding, blocks, mergers) of a loaded model or its PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.visual


def vision_linear_names(module_names: list[str]) -> list[str]:
    """The vision blocks' linear layers among ``module_names`` (full names of a model's linear
    layers): what ``freeze_vision_tower: false`` adapts with LoRA. Qwen3-VL's blocks hold
    attn.qkv/proj and mlp.linear_fc1/fc2, Qwen2.5-VL's attn.qkv/proj and mlp.gate/up/down_proj."""
    return [n for n in module_names if n.startswith("model.visual.blocks.")]


def projector_names(model: Any) -> list[str]:
    """The vision-to-language mergers, trained in full by ``freeze_multi_modal_projector: false``:
    ``merger``, and each of Qwen3-VL's deepstack mergers by its own name (peft needs them so)."""
    visual = vision_tower(model)
    names = ["merger"]
    for i, _ in enumerate(getattr(visual, "deepstack_merger_list", ())):
        names.append(f"deepstack_merger_list.{i}")
    return names


def deepstack_of(output: Any) -> list[Any]:
    """The deepstack levels of a vision-tower output (Qwen3-VL's); none for Qwen2.5-VL."""
    return list(getattr(output, "deepstack_features", None) or ())


def encoder_output(pooled: tuple[Any, ...], deepstack: list[tuple[Any, ...]]) -> Any:
    """Visual features in the form the model's ``mm_encoder_outputs`` argument takes: per-item merged
    tokens, plus (Qwen3-VL) one tuple per deepstack level."""
    if deepstack:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        return BaseModelOutputWithDeepstackFeatures(pooler_output=pooled, deepstack_features=deepstack)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=pooled)
