"""Everything about LoRA adapters, for every stage that takes ``adapter_name_or_path``.

An adapter is checked before anything heavy happens: `find_adapters` checks each directory (its
adapter_config.json, its weights, that it is LoRA), `check_adapters_fit` that every tensor it holds
names a module of the base with matching sizes (the error names the first tensor that does not fit;
PEFT's own errors come late and list hundreds of size mismatches at once), and `apply_adapter`
wraps PEFT's loading with one error message. Inference (`eqakit.model.load`), training
(`eqakit.train.lora`), export (`eqakit.model.merge`) and the vLLM backend use these.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from eqakit.errors import EqakitError
from eqakit.model.arch import local_model_type

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# Which side of the base module each LoRA tensor's size must match: A reads the module's input,
# B writes its output (for embeddings the input is the vocabulary and the output the embedding).
LORA_SIDES = {
    "lora_A": "in",
    "lora_embedding_A": "in",
    "lora_B": "out",
    "lora_embedding_B": "out",
    "lora_magnitude_vector": "out",  # DoRA's, one per output
}


def check_adapter_dir(path: str) -> Path:
    """An adapter directory, or a clear error naming the missing file."""
    adapter = Path(path).expanduser()
    config = adapter / "adapter_config.json"
    if not config.is_file():
        raise EqakitError(
            f"adapter {path!r}: {config} not found; adapter_name_or_path must be a LoRA adapter directory "
            "(the output_dir or a checkpoint-N directory of `eqakit train`)"
        )
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EqakitError(f"adapter {path!r}: {config} is not valid JSON ({exc})") from None
    return adapter


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


def adapter_digest(adapter: Path) -> str:
    """The sha256 of an adapter's weights file: the adapter's identity wherever it is copied."""
    weights = next(adapter / name for name in ADAPTER_WEIGHTS if (adapter / name).is_file())
    digest = hashlib.sha256()
    with weights.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.cache
def _warn_once(note: str) -> None:
    """A warning about an adapter, printed once however many stages check it (predict's preflight,
    then its engine's load)."""
    print(f"eqakit: warning: {note}", file=sys.stderr, flush=True)


def check_base(adapters: list[Path], base_name: str) -> list[str]:
    """Warnings for adapters whose adapter_config.json names another base than ``base_name`` (same
    shapes, maybe other weights). Raises EqakitError where the mistake is certain: the base is an
    eqakit export that already holds the adapter (its change would apply twice), or an export of the
    very model the adapter was trained on with other adapters merged in (not the weights it learned on).
    """
    export = export_record(Path(base_name).expanduser())
    merged = export.get("adapters") or []
    notes = []
    for adapter in adapters:
        trained_on = adapter_config(adapter).get("base_model_name_or_path")
        digest = adapter_digest(adapter) if merged else None
        for entry in merged:
            same_file = entry.get("sha256") == digest
            same_place = Path(str(entry.get("path", ""))).expanduser().resolve() == adapter.resolve()
            if same_file or same_place:
                raise EqakitError(
                    f"adapter {str(adapter)!r} is already merged into {base_name!r} (its eqakit_export.json "
                    "lists it); merging it again would apply its change twice: use the base it was trained "
                    f"on ({trained_on or 'see its adapter_config.json'}) as model_name_or_path, or this model "
                    "without adapter_name_or_path"
                )
        if not trained_on or _same_model(trained_on, base_name):
            continue
        if merged and _same_model(trained_on, str(export.get("base_model", ""))):
            raise EqakitError(
                f"adapter {str(adapter)!r} was trained on {trained_on!r}, but {base_name!r} is that model with "
                f"{len(merged)} other adapter(s) merged into it (its eqakit_export.json): use {trained_on!r} as "
                "model_name_or_path"
            )
        notes.append(
            f"adapter {str(adapter)!r} was trained on {trained_on!r}, not on {base_name!r}; "
            "the result is right only if the two hold the same weights"
        )
    return notes


def export_record(model_dir: Path) -> dict[str, Any]:
    """The eqakit_export.json of a model `eqakit export` wrote (empty for any other model)."""
    try:
        record = json.loads((model_dir / "eqakit_export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _same_model(recorded: str, chosen: str) -> bool:
    """Whether two model names or paths name the same model (local paths compared resolved)."""
    if recorded == chosen:
        return True
    first, second = Path(recorded).expanduser(), Path(chosen).expanduser()
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def adapter_tensor_names(adapter: Path) -> list[str]:
    """The names of an adapter's tensors (read from the file's header, no weights loaded)."""
    safetensors = adapter / "adapter_model.safetensors"
    if safetensors.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors), framework="pt") as weights:
            return list(weights.keys())
    return list(torch.load(adapter / "adapter_model.bin", map_location="meta", weights_only=True))


def adapter_parts(adapter: Path) -> tuple[bool, list[str]]:
    """What an adapter holds beyond LoRA on the language model: whether it has LoRA on the vision
    tower (``freeze_vision_tower: false``), and the names of the full tensors it replaces (the
    mergers under ``freeze_multi_modal_projector: false``, ``additional_target``'s modules)."""
    names = [n.removeprefix(PEFT_PREFIX) for n in adapter_tensor_names(adapter)]
    tower = any(".visual." in f".{n}" and ".lora_" in n for n in names)
    return tower, [n for n in names if ".lora_" not in n]


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

    for note in check_base(adapters, base_name):
        _warn_once(note)
    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    tensors = dict(model.state_dict())
    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or None
    ours = getattr(model.config, "model_type", None)
    for adapter in adapters:
        trained_on = adapter_config(adapter).get("base_model_name_or_path") or "an unrecorded model"
        theirs = local_model_type(trained_on)
        if theirs and ours and theirs != ours:  # shapes may agree (same widths) where meanings do not
            raise EqakitError(
                f"adapter {str(adapter)!r} was trained on {trained_on}, a {theirs!r} model; base model "
                f"{base_name!r} is a {ours!r} model: use a base of the adapter's architecture as model_name_or_path"
            )
        weights = load_peft_weights(str(adapter), device="cpu", key_mapping=mapping)

        def position(key: str) -> tuple[int, str]:
            stem = key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]
            return order.get(stem, -1), key

        for key in sorted(weights, key=position):
            reason = _mismatch(key, tuple(weights[key].shape), modules, tensors)
            if reason:
                hint = (
                    "its adapter_config.json names this path as its base: was the model there replaced?"
                    if trained_on == base_name
                    else f"the adapter was trained on {trained_on}; use that base model (same architecture "
                    "and size) as model_name_or_path"
                )
                raise EqakitError(
                    f"adapter {str(adapter)!r} does not fit base model {base_name!r}: tensor {key} {reason}; {hint}"
                )


def apply_adapter(model: Any, adapter: Path | str, base_name: str | None, *, trainable: bool = False) -> Any:
    """``model`` wrapped in a PeftModel with ``adapter`` loaded (trainable or frozen), or EqakitError
    naming the adapter, the base and PEFT's first size mismatch."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = str(exc).strip().splitlines()
        detail = next((line.strip() for line in lines if "size mismatch" in line), lines[-1] if lines else "")
        raise EqakitError(f"adapter {str(adapter)!r} does not fit model {base_name!r}: {detail}") from None
