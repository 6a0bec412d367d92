"""Merge LoRA adapters into a base model in place, and write the result as shards.

`eqakit export` is the only user; the steps live here so that the verb reads as a story. The
memory rule is one copy of the model: the base is loaded once in the dtype that is written (when
that is the checkpoint's dtype, transformers maps the safetensors file, so loading copies nothing),
each adapter is merged into the weights it targets (PEFT's ``merge_and_unload``: W += scale * B @ A
one layer at a time, B @ A in fp32 and one rounding into W; writes land in copy-on-write pages, never
in the base's files), and transformers' ``save_pretrained`` writes the shards one at a time straight
from the model's tensors.

An adapter is checked against the base before anything heavy happens: every tensor it holds must
name a module of the base with matching sizes, otherwise the error names the first tensor that does
not fit (PEFT's own errors come late and list hundreds of size mismatches at once).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from eqakit.errors import EqakitError
from eqakit.model.load import DTYPES, check_adapter_dir

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# Which side of the base module each LoRA tensor's size must match: A reads the module's input,
# B writes its output (for embeddings the input is the vocabulary and the output the embedding).
LORA_SIDES = {"lora_A": "in", "lora_embedding_A": "in", "lora_B": "out", "lora_embedding_B": "out"}


def log(message: str) -> None:
    """A progress line on stderr, beside transformers' and PEFT's progress bars."""
    print(f"[eqakit export] {message}", file=sys.stderr, flush=True)


def find_adapters(paths: list[str]) -> list[Path]:
    """The adapter directories, each with its adapter_config.json and weights file, or a clear error."""
    adapters = []
    for path in paths:
        adapter = check_adapter_dir(path)
        if not any((adapter / name).is_file() for name in ADAPTER_WEIGHTS):
            present = ", ".join(sorted(p.name for p in adapter.iterdir())[:10]) or "nothing"
            raise EqakitError(
                f"adapter {path!r} has adapter_config.json but no {' or '.join(ADAPTER_WEIGHTS)} "
                f"(it holds: {present}); point adapter_name_or_path at a complete adapter directory"
            )
        peft_type = adapter_config(adapter).get("peft_type", "LORA")
        if peft_type != "LORA":
            raise EqakitError(
                f"adapter {path!r} is a {peft_type} adapter ({adapter / 'adapter_config.json'}: peft_type); "
                "eqakit merges LoRA adapters only"
            )
        adapters.append(adapter)
    return adapters


def adapter_config(adapter: Path) -> dict[str, Any]:
    """The adapter's adapter_config.json as a mapping (already checked by `find_adapters`)."""
    return json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))


def config_dtype(config: Any) -> torch.dtype:
    """The dtype a checkpoint's config.json declares (top level, else the text model's); fp32 if none.

    Qwen3-VL-2B-Instruct declares ``dtype: bfloat16`` only inside ``text_config``.
    """
    for cfg in (config, getattr(config, "text_config", None)):
        declared = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(declared, torch.dtype):
            return declared
        if isinstance(declared, str) and declared in DTYPES:
            return DTYPES[declared]
    return torch.float32


def skeleton(config: Any, trust_remote_code: bool = False) -> torch.nn.Module:
    """The base model's module tree on the meta device: its shapes, no memory, built in a second."""
    from transformers import AutoModelForImageTextToText

    try:
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise EqakitError(
            f"model type {getattr(config, 'model_type', '?')!r} is not an image-text-to-text model "
            f"eqakit can export: {exc}"
        ) from None


def _sides(module: torch.nn.Module) -> dict[str, int | None]:
    if isinstance(module, torch.nn.Embedding):
        return {"in": module.num_embeddings, "out": module.embedding_dim}
    return {
        "in": getattr(module, "in_features", getattr(module, "in_channels", None)),
        "out": getattr(module, "out_features", getattr(module, "out_channels", None)),
    }


def _mismatch(
    key: str, shape: tuple[int, ...], modules: dict[str, Any], tensors: dict[str, Any]
) -> str | None:
    """Why the adapter tensor ``key`` cannot apply to the base, or None when it fits."""
    name = key.removeprefix(PEFT_PREFIX)
    parts = name.split(".")
    kind = next((p for p in parts if p.startswith("lora_")), None)
    if kind is None:  # a full tensor (modules_to_save): must replace a base tensor of the same shape
        base = tensors.get(name)
        if base is not None and tuple(base.shape) != shape:
            return f"has shape {list(shape)}, the base model's {name} has {list(base.shape)}"
        return None
    module_name = ".".join(parts[: parts.index(kind)])
    module = modules.get(module_name)
    if module is None:
        return f"targets {module_name}, which the base model does not have"
    side = LORA_SIDES.get(kind)
    size = _sides(module)[side] if side else None
    if size is None:
        return None
    got = shape[0] if side == "out" else shape[1] if len(shape) > 1 else None
    if got != size:
        what = "input" if side == "in" else "output"
        return (
            f"has shape {list(shape)}, but the base model's {module_name} ({type(module).__name__}) "
            f"has {what} size {size}"
        )
    return None


def check_adapters_fit(model: torch.nn.Module, adapters: list[Path], base_name: str) -> None:
    """Raise EqakitError naming the first adapter tensor (in model order) that does not fit ``model``."""
    from peft.utils import load_peft_weights

    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    tensors = dict(model.state_dict())
    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or None
    for adapter in adapters:
        weights = load_peft_weights(str(adapter), device="cpu", key_mapping=mapping)

        def position(key: str) -> tuple[int, str]:
            stem = key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]
            return order.get(stem, -1), key

        for key in sorted(weights, key=position):
            reason = _mismatch(key, tuple(weights[key].shape), modules, tensors)
            if reason:
                trained_on = adapter_config(adapter).get("base_model_name_or_path") or "an unrecorded model"
                hint = (
                    "its adapter_config.json names this path as its base: was the model there replaced?"
                    if trained_on == base_name
                    else f"the adapter was trained on {trained_on}; use that base model (same architecture "
                    "and size) as model_name_or_path"
                )
                raise EqakitError(
                    f"adapter {str(adapter)!r} does not fit base model {base_name!r}: tensor {key} {reason}; {hint}"
                )


def merge_adapters(model: torch.nn.Module, adapters: list[Path]) -> torch.nn.Module:
    """Merge ``adapters`` into ``model``'s weights in order; returns the plain (adapter-free) model."""
    from peft import PeftModel

    for i, adapter in enumerate(adapters, 1):
        log(f"merging adapter {i}/{len(adapters)}: {adapter}")
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise EqakitError(f"could not apply adapter {str(adapter)!r}: {exc}") from None
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
    for shard in shards:  # safetensors creates files 0600: let the server's user read the model too
        os.chmod(shard, 0o666 & ~_umask())
    return shards


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
