"""Load Qwen-VL checkpoints, processors and LoRA adapters the same way for every verb.

A model is named by a local directory or a hub id (``Qwen/Qwen3-VL-2B-Instruct``); adapters by
PEFT directories. Inference merges the adapters in order into the base weights (LLaMA-Factory's
behaviour: one set of weights, no adapter overhead per token); training merges all but the last
and keeps the last one trainable, or adds a fresh one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from eqakit.config.args import ModelArguments
from eqakit.data.encode import Geometry
from eqakit.errors import ConfigError, EqakitError
from eqakit.model.adapters import apply_adapter, check_adapters_fit, find_adapters
from eqakit.model.arch import architecture, local_model_type

ATTENTION = {"auto": "sdpa", "sdpa": "sdpa", "disabled": "eager", "fa2": "flash_attention_2"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU, unless a device is named. Under torchrun each process takes
    its own GPU (``LOCAL_RANK``)."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def declared_dtype(config: Any) -> torch.dtype | None:
    """The dtype a checkpoint's config declares (top level, else the text model's), or None.

    Qwen3-VL-2B-Instruct declares ``dtype: bfloat16`` only inside ``text_config``.
    """
    for cfg in (config, getattr(config, "text_config", None)):
        declared = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(declared, torch.dtype):
            return declared
        if isinstance(declared, str) and declared in DTYPES:
            return DTYPES[declared]
    return None


def optimal_dtype(
    device: torch.device, declared: torch.dtype | None, bf16_supported: bool | None = None
) -> torch.dtype:
    """The dtype LLaMA-Factory computes in when no key names one (its ``infer_optim_dtype``): bf16
    where the GPU has it and the checkpoint is bf16 (or declares nothing), else fp16 on CUDA, else
    fp32 (the CPU; Apple's MPS too, as LLaMA-Factory counts no fp16 there). ``bf16_supported``
    stands for the GPU's answer (tests)."""
    if device.type != "cuda":
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported and declared in (torch.bfloat16, None) else torch.float16


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The inference dtype: ``auto`` is `optimal_dtype` (bf16 on a GPU that has it, fp16 on other
    GPUs, fp32 on the CPU and MPS); otherwise the named dtype."""
    return optimal_dtype(device, None) if name == "auto" else DTYPES[name]


def train_dtype(
    bf16: bool,
    fp16: bool,
    device: torch.device,
    declared: torch.dtype | None,
    bf16_supported: bool | None = None,
) -> torch.dtype:
    """The dtype training loads the model in, as LLaMA-Factory chooses it: ``bf16: true`` or
    ``fp16: true`` name it; with neither (the tutorial's ``bf16: false``) `optimal_dtype` does, so a
    GPU trains in bf16 or fp16, not fp32. The trainable LoRA weights stay fp32 (PEFT's
    ``autocast_adapter_dtype``, LLaMA-Factory's ``cast_trainable_params_to_fp32``).

    A key the device cannot honour is refused here, before any weight loads (transformers would
    accept both and train slowly or fail inside a kernel)."""
    if bf16:
        if device.type == "cuda" and not (
            torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        ):
            raise ConfigError(
                "bf16: true needs a GPU with bfloat16 (NVIDIA Ampere or newer) and this one has none: "
                "set fp16: true, or remove bf16 to let eqakit choose (fp16 here, as LLaMA-Factory does)"
            )
        return torch.bfloat16
    if fp16:
        if device.type == "cpu":
            raise ConfigError(
                "fp16: true needs a GPU (mixed precision in float16 on the CPU is slower than float32 and "
                "loses precision): remove fp16 to train in float32, or set bf16: true"
            )
        return torch.float16
    return optimal_dtype(device, declared, bf16_supported)


def _check_model_source(name: str) -> None:
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") != 1
    if looks_local and not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise EqakitError(
            f"model_name_or_path {name!r} {what}: give a directory written by save_pretrained "
            "(or `eqakit export`), or a hub id such as Qwen/Qwen3-VL-2B-Instruct"
        )


def check_supported(name: str, model_args: ModelArguments) -> None:
    """Refuse, before any weights load, a checkpoint whose architecture eqakit does not handle.

    Another architecture would load through the Auto classes and then fail deep inside the vision
    cache, the template or the LoRA setup; its model_type is known from config.json at once. A hub
    id not in the local cache is left to the loader, whose error says so.
    """
    if (Path(name).expanduser() / "config.json").is_file():
        architecture(local_model_type(name), name)
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            name,
            trust_remote_code=model_args.trust_remote_code,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
        )
    except (OSError, ValueError, AttributeError):
        return
    architecture(config.model_type, name)


def _from_checkpoint(auto_class: Any, what: str, model_args: ModelArguments, path: str | None) -> Any:
    """One of the checkpoint's parts (``auto_class.from_pretrained``), after the source and its
    architecture are checked; a part that cannot be read is one error naming it."""
    name = path or model_args.model_name_or_path
    _check_model_source(name)
    check_supported(name, model_args)
    try:
        return auto_class.from_pretrained(
            name,
            trust_remote_code=model_args.trust_remote_code,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
        )
    except OSError as exc:
        raise EqakitError(f"could not load the {what} of {name!r}: {exc}") from None


def load_geometry(model_args: ModelArguments, path: str | None = None) -> Geometry:
    """What planning needs of the checkpoint (`eqakit.data.encode.Geometry`), read from its
    config.json alone, so samples are planned before any weight loads."""
    from transformers import AutoConfig

    return Geometry.of(_from_checkpoint(AutoConfig, "config", model_args, path))


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


def model_config(model_args: ModelArguments) -> Any:
    """The checkpoint's (transformers) config, after its source and architecture are checked."""
    from transformers import AutoConfig

    return _from_checkpoint(AutoConfig, "config", model_args, None)


def check_model(model_args: ModelArguments) -> Geometry:
    """What every stage checks of its model before any weight loads: the checkpoint's source, config
    and architecture, and that each adapter (``adapter_name_or_path``) fits it, on a meta-device
    skeleton of the model's shapes; returns the planning geometry."""
    config = model_config(model_args)
    adapters = find_adapters(model_args.adapter_paths)
    if adapters:
        check_adapters_fit(
            skeleton(config, model_args.trust_remote_code), adapters, model_args.model_name_or_path
        )
    return Geometry.of(config)


def load_processor(model_args: ModelArguments, path: str | None = None) -> Any:
    """The checkpoint's processor (tokenizer + image processor + chat template)."""
    from transformers import AutoProcessor

    return _from_checkpoint(AutoProcessor, "processor", model_args, path)


def _quantization(model_args: ModelArguments, dtype: torch.dtype, device: torch.device) -> Any:
    if model_args.quantization_bit is None:
        return None
    if device.type != "cuda":
        raise EqakitError(
            f"quantization_bit: {model_args.quantization_bit} needs a CUDA GPU (bitsandbytes); this machine has "
            f"{device.type}. Remove quantization_bit to run unquantized."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise EqakitError("quantization_bit needs bitsandbytes: pip install 'eqakit[bnb]'") from None
    from transformers import BitsAndBytesConfig

    if model_args.quantization_bit == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base_model(model_args: ModelArguments, *, device: torch.device, dtype: torch.dtype) -> Any:
    """The base (or merged) Qwen-VL model on ``device`` in ``dtype``, without adapters."""
    from transformers import AutoModelForImageTextToText

    name = model_args.model_name_or_path
    _check_model_source(name)
    check_supported(name, model_args)
    attn = ATTENTION[model_args.flash_attn]
    if attn == "flash_attention_2" and device.type != "cuda":
        raise EqakitError("flash_attn: fa2 needs a CUDA GPU with flash-attn installed; use flash_attn: auto")
    quant = _quantization(model_args, dtype, device)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            name,
            dtype=dtype,
            attn_implementation=attn,
            quantization_config=quant,
            trust_remote_code=model_args.trust_remote_code,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            device_map={"": device} if quant is not None else None,
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise EqakitError(f"could not load model {name!r}: {exc}") from None
    if quant is None:
        model.to(device)
    return model


def load_inference_model(
    model_args: ModelArguments, *, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Any:
    """Base model with ``adapter_name_or_path`` applied for inference (merged in order when possible).
    The adapters' fit is checked first, on a skeleton (`check_model`), before any weight loads."""
    device = device or pick_device()
    dtype = dtype or pick_dtype(model_args.infer_dtype, device)
    check_model(model_args)
    adapters = find_adapters(model_args.adapter_paths)
    model = load_base_model(model_args, device=device, dtype=dtype)
    if adapters and model_args.quantization_bit is not None and len(adapters) > 1:
        raise EqakitError("a quantized model takes one adapter; merge the others first with `eqakit export`")
    for adapter in adapters:
        model = apply_adapter(model, adapter, model_args.model_name_or_path)
        if model_args.quantization_bit is None:
            model = model.merge_and_unload()
    model.eval()
    return model
