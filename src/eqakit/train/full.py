"""Train the model's own weights, as LLaMA-Factory's ``finetuning_type: full`` and ``freeze`` do.

``full`` trains every weight outside the frozen parts; ``freeze`` trains the
``freeze_trainable_layers`` last layers (or the first, when negative), limited to
``freeze_trainable_modules``, plus ``freeze_extra_modules`` and, with
``freeze_multi_modal_projector: false``, the mergers. The frozen parts are the architecture's
(`eqakit.model.arch.Architecture`): the vision tower under ``freeze_vision_tower``, the mergers under
``freeze_multi_modal_projector``, the language model and lm_head under ``freeze_language_model``.

Names are matched as LLaMA-Factory matches them (substrings of parameter names: ``.27.`` is layer
27 of every stack of layers, the language model's and the vision tower's alike; an extra module
``norm`` is every parameter whose name holds ``norm``), so a config selects the same weights in both
tools. What LLaMA-Factory clamps or reports only at the first step is refused here by name before
any weight loads: a layer count beyond the model's, a module it does not have, nothing to train.
Trainable weights are kept in fp32 (under DeepSpeed ZeRO-3 in the dtype it partitions them in).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from eqakit.config import Config
from eqakit.errors import ConfigError
from eqakit.model.arch import Architecture, of_model
from eqakit.train.lora import listed


def frozen_keys(cfg: Config, arch: Architecture) -> tuple[str, ...]:
    """The name substrings of the parts that stay frozen (LLaMA-Factory's forbidden modules)."""
    f = cfg.finetuning
    return (
        (arch.vision_keys if f.freeze_vision_tower else ())
        + (arch.projector_keys if f.freeze_multi_modal_projector else ())
        + (arch.language_keys if f.freeze_language_model else ())
    )


def trainable_names(model: Any, cfg: Config) -> list[str]:
    """The parameters full or freeze tuning trains in ``model`` (a loaded model or a meta-device
    skeleton of one), in the model's order; ConfigError when the selection names what the model
    lacks or selects nothing."""
    arch = of_model(model)
    names = [name for name, _ in model.named_parameters()]
    wanted = (
        _freeze_selection(model, names, cfg, arch) if cfg.finetuning.finetuning_type == "freeze" else ("",)
    )
    frozen = frozen_keys(cfg, arch)
    chosen = [n for n in names if any(w in n for w in wanted) and not any(k in n for k in frozen)]
    if not chosen:
        raise ConfigError(
            f"finetuning_type: {cfg.finetuning.finetuning_type} selects no weight outside the frozen parts "
            f"({', '.join(frozen)}): {_what_to_change(cfg)}"
        )
    return chosen


def _what_to_change(cfg: Config) -> str:
    if cfg.finetuning.finetuning_type == "freeze":
        return "change freeze_trainable_layers or freeze_trainable_modules, or unfreeze a part"
    return "set freeze_vision_tower, freeze_multi_modal_projector or freeze_language_model to false"


def _freeze_selection(model: Any, names: list[str], cfg: Config, arch: Architecture) -> list[str]:
    """LLaMA-Factory's trainable-name substrings for ``freeze``: ``.{layer}.{module}`` for each chosen
    layer and module, the extra modules, and the mergers when they are not frozen."""
    f = cfg.finetuning
    layers = model.config.text_config.num_hidden_layers
    count = f.freeze_trainable_layers
    if abs(count) > layers:
        raise ConfigError(
            f"key 'freeze_trainable_layers': {count} is beyond the model's {layers} language-model "
            f"layers: use at most {layers} (the last n) or at least -{layers} (the first n)"
        )
    layer_ids = range(layers - count, layers) if count > 0 else range(-count)
    in_layers = sorted({n.split(".0.")[-1].split(".")[0] for n in names if ".0." in n})
    outside = sorted({n.split(".")[-2] for n in names if re.search(r"\.\d+\.", n) is None})
    modules, extra = listed(f.freeze_trainable_modules), listed(f.freeze_extra_modules)
    problems = [
        f"key 'freeze_trainable_modules': {m} is not a module of the model's layers; "
        f"choose from all, {', '.join(in_layers)}"
        for m in modules
        if m != "all" and m not in in_layers
    ] + [
        f"key 'freeze_extra_modules': {m} is not a module outside the model's layers; "
        f"choose from {', '.join(outside)}"
        for m in extra
        if m not in outside
    ]
    if problems:
        raise ConfigError("; ".join(problems))
    wanted = [f".{i}.{'' if m == 'all' else m}" for m in modules for i in layer_ids]
    mergers = list(arch.projector_keys) if not f.freeze_multi_modal_projector else []
    return wanted + extra + mergers


def apply_full(model: Any, cfg: Config) -> Any:
    """Make exactly the selected weights trainable, in fp32 (LLaMA-Factory's upcast), and return the model."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    chosen = set(trainable_names(model, cfg))
    upcast = not is_deepspeed_zero3_enabled()  # ZeRO-3 keeps its partitions in their own dtype
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
        if name in chosen and upcast:
            param.data = param.data.to(torch.float32)
    return model
