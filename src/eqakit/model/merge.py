"""Merge LoRA adapters into a base model in place, and write the result as shards.

`eqakit export` is the only user; the steps live here so that the verb reads as a story. The
memory rule is one copy of the model: the base is loaded once in the dtype that is written (when
that is the checkpoint's dtype, transformers maps the safetensors file, so loading copies nothing),
each adapter is merged into the weights it targets (PEFT's ``merge_and_unload``: W += scale * B @ A
one layer at a time, B @ A in fp32 and one rounding into W; writes land in copy-on-write pages, never
in the base's files), and transformers' ``save_pretrained`` writes the shards one at a time straight
from the model's tensors.

Adapters are found, checked and applied by `eqakit.model.adapters`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from eqakit.model.adapters import apply_adapter
from eqakit.model.load import declared_dtype


def log(message: str) -> None:
    """A progress line on stderr, beside transformers' and PEFT's progress bars."""
    print(f"[eqakit export] {message}", file=sys.stderr, flush=True)


def config_dtype(config: Any) -> torch.dtype:
    """The dtype a checkpoint's config declares (`declared_dtype`); fp32 if none."""
    return declared_dtype(config) or torch.float32


def merge_adapters(model: torch.nn.Module, adapters: list[Path], base_name: str | None) -> torch.nn.Module:
    """Merge ``adapters`` into ``model``'s weights in order; returns the plain (adapter-free) model."""
    for i, adapter in enumerate(adapters, 1):
        log(f"merging adapter {i}/{len(adapters)}: {adapter}")
        peft_model = apply_adapter(model, adapter, base_name)
        model = peft_model.merge_and_unload(progressbar=True)
        del peft_model
    return model


def write_weights(model: Any, directory: Path, shard_gb: float) -> list[Path]:
    """config.json, generation_config.json and safetensors shards of at most ``shard_gb`` GB (+ index).

    ``save_pretrained`` takes one shard's tensors at a time and hands safetensors pointers to them,
    so writing adds no copy of the model. Returns the shard files written.
    """
    model.save_pretrained(directory, max_shard_size=int(shard_gb * 10**9))
    shards = sorted(directory.glob("model*.safetensors"))
    publish_expert_layout(shards, model.config)
    for shard in shards:  # safetensors creates files 0600: let the server's user read the model too
        os.chmod(shard, 0o666 & ~_umask())
    return shards


EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def publish_expert_layout(shards: list[Path], config: Any) -> None:
    """Qwen3-VL-MoE's fused experts in the layout Qwen publishes them in: gate_up_proj (experts,
    hidden, 2 x intermediate), down_proj (experts, intermediate, hidden).

    transformers 5 transposes a published checkpoint's experts on load and keeps them so in memory;
    its save_pretrained does not transpose them back for this model (its reverse mapping fails), and
    vLLM reads only the published layout. Each tensor found in the in-memory layout (told apart by
    the config's sizes) is transposed, so whatever transformers writes, the shards hold the
    published layout, which transformers and vLLM both load. Other models are left as written.
    """
    if getattr(config, "model_type", None) != "qwen3_vl_moe":
        return
    from safetensors import safe_open
    from safetensors.torch import save_file

    text = config.text_config
    hidden, inner = text.hidden_size, text.moe_intermediate_size
    if hidden in (inner, 2 * inner):  # both layouts have the same shape: nothing to tell apart
        return
    in_memory = {EXPERTS[0]: [2 * inner, hidden], EXPERTS[1]: [hidden, inner]}
    for shard in shards:
        with safe_open(shard, "pt") as handle:
            names = list(handle.keys())
            wrong = [
                name
                for name in names
                for suffix in EXPERTS
                if name.endswith(suffix) and handle.get_slice(name).get_shape()[1:] == in_memory[suffix]
            ]
            if not wrong:
                continue
            tensors = {name: handle.get_tensor(name) for name in names}
            metadata = handle.metadata()
        for name in wrong:
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
        partial = shard.with_name(shard.name + ".partial")
        save_file(tensors, partial, metadata=metadata or {"format": "pt"})
        os.replace(partial, shard)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def convert_to_bin(directory: Path) -> list[Path]:
    """Rewrite ``directory``'s safetensors shards as pickled .bin shards (export_legacy_format: true).

    transformers 5 writes only safetensors; this converts one shard at a time (the model itself is
    already freed), renaming files and index the way transformers 4 named them.
    """
    from safetensors.torch import load_file

    written = []
    for shard in sorted(directory.glob("model*.safetensors")):
        target = directory / shard.name.replace("model", "pytorch_model", 1).replace(".safetensors", ".bin")
        partial = target.with_name(target.name + ".partial")
        torch.save(load_file(shard), partial)
        os.replace(partial, target)
        shard.unlink()
        written.append(target)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {
            k: v.replace("model", "pytorch_model", 1).replace(".safetensors", ".bin")
            for k, v in data["weight_map"].items()
        }
        (directory / "pytorch_model.bin.index.json").write_text(
            json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        index.unlink()
    return written
