"""Wrap a Qwen-VL model in LoRA adapters the way LLaMA-Factory's ``finetuning_type: lora`` does.

``lora_target: all`` adapts every linear layer of the language model, as LLaMA-Factory's
``find_all_linear_modules`` does: the q/k/v/o/gate/up/down projections of the dense model; the
attention projections of Qwen3-VL-MoE, whose experts are fused parameters and whose router is not
a linear layer (neither is adapted there, by LLaMA-Factory either); never lm_head (tied to the
embedding) nor the embeddings. ``freeze_vision_tower: false`` adds the vision blocks' linear
layers to the LoRA targets and ``freeze_multi_modal_projector: false`` trains the mergers in full
(both read from the module tree: `eqakit.model.arch`); ``freeze_language_model: true`` takes the
language model out of the targets, as LLaMA-Factory's forbidden modules do; ``additional_target``
trains more modules in full, ``use_dora`` makes the adapter DoRA. Earlier adapters in
``adapter_name_or_path`` are merged; the last is trained further unless ``create_new_adapter``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from eqakit.config import Config
from eqakit.errors import ConfigError
from eqakit.model.adapters import apply_adapter, find_adapters
from eqakit.model.arch import LM_PREFIX, projector_names, vision_linear_names

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")  # an MLP's, fused in MoE experts


def target_pattern(cfg: Config, module_names: list[str]) -> str:
    """A regex over full module names (``module_names``: the model's linear layers) for peft's
    ``target_modules``; unknown names are a ConfigError."""
    wanted = cfg.finetuning.lora_target.strip()
    lm_names = sorted({n.rsplit(".", 1)[-1] for n in module_names if re.match(LM_PREFIX, n)})
    names = tuple(lm_names) if wanted == "all" else tuple(n.strip() for n in wanted.split(",") if n.strip())
    missing = [n for n in names if n not in lm_names]
    if missing:
        fused = [n for n in missing if n in EXPERT_PROJECTIONS]
        why = (
            f" ({', '.join(fused)}: this model's experts are fused parameters, not linear layers, which "
            "LoRA as LLaMA-Factory applies it does not adapt)"
            if fused and "gate_proj" not in lm_names
            else ""
        )
        raise ConfigError(
            f"key 'lora_target': {', '.join(missing)} match no linear layer of the language model{why}; "
            f"use 'all' or a comma list of: {', '.join(lm_names)}"
        )
    parts = (
        []
        if cfg.finetuning.freeze_language_model
        else [LM_PREFIX + r".*\b(" + "|".join(map(re.escape, names)) + r")"]
    )
    vision = vision_linear_names(module_names)
    if not cfg.finetuning.freeze_vision_tower and vision:
        parts.append("|".join(map(re.escape, vision)))
    return "^(" + "|".join(f"({p})" for p in parts) + ")$"


def listed(text: str | None) -> list[str]:
    """A LLaMA-Factory comma list (``additional_target: norm,embed_tokens``) as its names."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def additional_modules(cfg: Config, model: Any) -> list[str]:
    """The modules ``additional_target`` trains in full, by their full names, matched as peft matches
    ``modules_to_save`` (the name itself or a name ending in ``.`` + it); ConfigError for a name that
    matches no module, or one LoRA already adapts (peft would refuse it at the first step)."""
    names = [n for n, _ in model.named_modules()]
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    adapted = re.compile(target_pattern(cfg, linear))
    found, problems = [], []
    for target in listed(cfg.finetuning.additional_target):
        matches = [n for n in names if n == target or n.endswith("." + target)]
        if not matches:
            problems.append(f"{target} matches no module of the model")
        elif any(adapted.match(n) for n in matches):
            problems.append(f"{target} names layers LoRA adapts (lora_target); list other modules")
        found += matches
    if problems:
        raise ConfigError(f"key 'additional_target': {'; '.join(problems)}")
    return found


def apply_lora(model: Any, cfg: Config) -> Any:
    """Freeze the base, merge earlier adapters, and return a PeftModel whose LoRA weights train in fp32."""
    from peft import LoraConfig, get_peft_model

    adapters = [str(p) for p in find_adapters(cfg.model.adapter_paths)]  # their fit: `sft.preflight`
    resume_adapter = None
    if adapters and not cfg.finetuning.create_new_adapter:
        adapters, resume_adapter = adapters[:-1], adapters[-1]
    base_name = cfg.model.model_name_or_path
    for adapter in adapters:
        model = apply_adapter(model, adapter, base_name, trainable=False).merge_and_unload()
    for param in model.parameters():
        param.requires_grad_(False)
    if resume_adapter is not None:
        model = apply_adapter(model, resume_adapter, base_name, trainable=True)
    else:
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        full = [] if cfg.finetuning.freeze_multi_modal_projector else projector_names(model)
        full += listed(cfg.finetuning.additional_target)
        lora = LoraConfig(
            r=cfg.finetuning.lora_rank,
            lora_alpha=cfg.finetuning.lora_alpha or 2 * cfg.finetuning.lora_rank,
            lora_dropout=cfg.finetuning.lora_dropout,
            target_modules=target_pattern(cfg, linear),
            modules_to_save=full or None,
            use_rslora=cfg.finetuning.use_rslora,
            use_dora=cfg.finetuning.use_dora,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if cfg.finetuning.freeze_language_model:
        _refuse_language_model_training(model, resume_adapter)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # LoRA weights train in fp32 even on a bf16 base
    return model


def _refuse_language_model_training(model: Any, adapter: str | None) -> None:
    """freeze_language_model holds for a resumed adapter too: one that adapts the language model is refused.

    LLaMA-Factory would train such an adapter's language-model layers regardless; eqakit says so instead.
    """
    inside = [n for n, p in model.named_parameters() if p.requires_grad and ".language_model." in n]
    if inside:
        raise ConfigError(
            f"freeze_language_model: true, but adapter {adapter!r} trains the language model ({inside[0]}, "
            f"{len(inside)} tensors): set create_new_adapter: true to merge it and train a new adapter"
        )


def trainable_summary(model: Any) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f}%)"
