"""Read a LLaMA-Factory-style YAML file plus ``key=value`` overrides into typed, validated config.

Precedence is defaults < YAML < command line. Every problem (unknown key, wrong type, value out of
range, LLaMA-Factory option eqakit does not implement, contradictory settings) is collected and
reported at once in one `ConfigError`, naming the key, the value received and what is allowed.
Values are never rewritten behind the user's back.

    cfg = load_config("train", "configs/training_args.yaml", ["learning_rate=1e-4"])
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from eqakit.config.args import (
    GROUPS,
    ApiArguments,
    DataArguments,
    FinetuningArguments,
    GeneratingArguments,
    ModelArguments,
)
from eqakit.config.lf_unsupported import LLAMA_FACTORY_UNSUPPORTED, REASONS
from eqakit.errors import ConfigError
from eqakit.model.arch import checkpoint_template, local_model_type, template_problem

Kind = Literal["train", "infer", "export"]

# Range rules for the transformers TrainingArguments keys users set most; the eqakit groups carry
# theirs in field metadata. transformers validates the rest itself (its errors are passed on).
TRAINING_RULES: dict[str, dict[str, Any]] = {
    "learning_rate": {"min": 0.0, "min_exclusive": True},
    "num_train_epochs": {"min": 0.0, "min_exclusive": True},
    "per_device_train_batch_size": {"min": 1},
    "per_device_eval_batch_size": {"min": 1},
    "gradient_accumulation_steps": {"min": 1},
    "logging_steps": {"min": 0.0, "min_exclusive": True},
    "save_steps": {"min": 0.0, "min_exclusive": True},
    "eval_steps": {"min": 0.0, "min_exclusive": True},
    "max_grad_norm": {"min": 0.0},
    "warmup_steps": {"min": 0},
    "warmup_ratio": {"min": 0.0, "max": 1.0},
    "weight_decay": {"min": 0.0},
    "dataloader_num_workers": {"min": 0},
    "save_total_limit": {"min": 1},
}


# Keys whose YAML values are richer than transformers' annotation says (LLaMA-Factory accepts
# ``resume_from_checkpoint: true`` for "the newest checkpoint in output_dir").
TYPE_OVERRIDES: dict[str, Any] = {"resume_from_checkpoint": bool | str | None}


@dataclass
class Config:
    """Everything one run needs, built once at the CLI edge and passed down."""

    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    generating: GeneratingArguments
    api: ApiArguments = dataclasses.field(default_factory=ApiArguments)
    training: Any | None = None  # transformers.Seq2SeqTrainingArguments for kind "train"
    source: Path | None = None
    user_keys: tuple[str, ...] = ()  # keys the user set (file or command line), for self-describing outputs

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as one flat LLaMA-Factory-style mapping (what a YAML file would hold)."""
        flat: dict[str, Any] = {}
        for group in (self.model, self.data, self.finetuning, self.generating, self.api):
            flat.update(dataclasses.asdict(group))
        if self.training is not None:
            flat.update(self.training.to_dict())
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in flat.items()}


def _training_class() -> type:
    from transformers import Seq2SeqTrainingArguments  # heavy import: only for `train`

    return Seq2SeqTrainingArguments


def _groups(kind: Kind) -> list[type]:
    groups: list[type] = list(GROUPS)
    if kind == "train":
        groups.append(_training_class())
    return groups


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a config file (YAML or JSON) as a mapping, with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value lines, found a {type(data).__name__}")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings from the command line; values are read as YAML scalars (true, 8, 1e-4, text)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(
                f"command-line override {item!r} must look like key=value (e.g. learning_rate=1e-4)"
            )
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
    return out


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/command-line value to the field's type, or raise ValueError with the reason."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError("must be set (null is not allowed)")
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:
            allowed = [m.value for m in enums[0]]
            raw = value.value if isinstance(value, enum.Enum) else value
            if raw is False and "no" in allowed:
                raw = "no"  # YAML 1.1 reads an unquoted `no` (as in `save_strategy: no`) as false
            if raw not in allowed:
                raise ValueError(f"is not allowed; choose one of: {', '.join(map(str, allowed))}")
            return raw
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else "has the wrong type: " + "; or ".join(errors))
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple):
            return list(value)
        raise ValueError("must be a list or a comma-separated string")
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError("must be a mapping or a JSON object string") from None
            if isinstance(parsed, dict):
                return parsed
        raise ValueError("must be a mapping")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "yes", "on")
        raise ValueError("must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError("must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())  # PyYAML reads 5e-5 (no dot) as a string
            except ValueError:
                pass
        raise ValueError("must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ValueError("must be a string")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if value not in allowed:
            raise ValueError(f"is not allowed; choose one of: {', '.join(map(str, allowed))}")
        return value
    return value


def _check_rules(value: Any, rules: dict[str, Any]) -> str | None:
    """The reason a coerced value breaks its field's rules, or None."""
    if value is None:
        return None
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        return f"is not allowed; choose one of: {', '.join(map(str, choices))}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = rules.get("min"), rules.get("max")
        if low is not None:
            if rules.get("min_exclusive") and value <= low:
                return f"is out of range (must be > {low})"
            if value < low:
                return f"is out of range (must be >= {low})"
        if high is not None:
            if rules.get("max_exclusive") and value >= high:
                return f"is out of range (must be < {high})"
            if value > high:
                return f"is out of range (must be <= {high})"
    return None


def _unknown_key_message(key: str, kind: Kind, known: set[str]) -> str:
    if key in LLAMA_FACTORY_UNSUPPORTED:
        reason = f" ({REASONS[key]})" if key in REASONS else ""
        return f"{key!r} is a LLaMA-Factory option eqakit does not support{reason}; remove it"
    if kind != "train":
        training = {f.name for f in dataclasses.fields(_training_class())}
        if key in training:
            return f"{key!r} is a training key: it applies to `eqakit train`, not here; remove it"
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}"


def _cross_checks(kind: Kind, values: dict[str, Any], given: set[str]) -> list[str]:
    """Contradictions between keys, with LLaMA-Factory's rules where it has them.

    ``values`` holds every key (defaults filled in), ``given`` the keys the user set: a key set where
    it can have no effect is refused, as a key eqakit does not know would be.
    """
    problems = []
    get = values.get
    if not get("model_name_or_path"):
        problems.append(
            "model_name_or_path is required (a local model directory or a hub id such as Qwen/Qwen3-VL-2B-Instruct)"
        )
    if get("template") is None:
        problems.append(
            "template is required: set template: qwen3_vl_nothink (or qwen3_vl for thinking) for Qwen3-VL, "
            "qwen2_vl for Qwen2.5-VL; it is chosen from the checkpoint only when model_name_or_path is a "
            "local directory"
        )
    elif get("model_name_or_path"):
        name = get("model_name_or_path")
        misfit = template_problem(get("template"), local_model_type(name), name)
        if misfit:
            problems.append(misfit)
    if get("packing"):
        problems.append("packing: true is not supported by eqakit; set packing: false or remove the key")
    if get("flash_attn") == "fa2":
        problems += _flash_attention_problems(kind, get)
    if (get("image_min_pixels") or 0) > (get("image_max_pixels") or 0):
        problems.append(
            f"image_min_pixels ({get('image_min_pixels')}) is larger than image_max_pixels ({get('image_max_pixels')})"
        )
    if get("infer_backend") == "vllm" and kind != "export":
        if get("quantization_bit") is not None:
            problems.append(
                "quantization_bit loads with bitsandbytes on the huggingface backend; with infer_backend: vllm "
                "serve a quantized checkpoint or set vllm_config: {quantization: ...}, and remove quantization_bit"
            )
        if get("api_max_batch_tokens") is not None:
            problems.append(
                "api_max_batch_tokens budgets the transformers engine's KV cache; vLLM manages its own "
                "(vllm_gpu_util): remove api_max_batch_tokens"
            )
        if "api_batch_window_ms" in given:
            problems.append(
                "api_batch_window_ms is how long the transformers engine waits to batch requests; vLLM "
                "schedules continuously and has no window: remove api_batch_window_ms"
            )
        cutoff = get("cutoff_len", DataArguments.cutoff_len)
        maxlen = get("vllm_maxlen", ModelArguments.vllm_maxlen)
        if maxlen <= cutoff:
            problems.append(
                f"vllm_maxlen ({maxlen}) must exceed cutoff_len ({cutoff}): prompts may take cutoff_len tokens "
                "and the reply needs room; raise vllm_maxlen or lower cutoff_len"
            )
    if kind == "export" and not get("export_dir"):
        problems.append("export_dir is required: the directory the merged model is written to")
    if kind == "train":
        if not get("do_train") and not get("do_predict"):
            problems.append("set do_train: true (fine-tune) or do_predict: true (predict on eval_dataset)")
        if get("do_train") and get("do_predict"):
            problems.append(
                "do_train and do_predict are both true: run training and prediction as two configs"
            )
        if get("do_train") and not get("dataset"):
            problems.append("do_train needs dataset: the name(s) of training datasets in dataset_info.json")
        if get("do_predict") and not get("eval_dataset"):
            problems.append("do_predict needs eval_dataset: the name(s) of the datasets to predict on")
        if get("do_predict") and not get("predict_with_generate"):
            problems.append("do_predict needs predict_with_generate: true to write predictions")
        if get("do_train") and get("predict_with_generate"):
            problems.append("predict_with_generate cannot be true while training (do_train: true)")
        if get("bf16") and get("fp16"):
            problems.append("bf16 and fp16 are both true: choose one")
        problems += _training_checks(values, given)
    return problems


def _flash_attention_problems(kind: Kind, get: Any) -> list[str]:
    """``flash_attn: fa2``, refused before any weight loads where it cannot run or would be wrong."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        return [
            "flash_attn: fa2 needs the flash-attn package (pip install flash-attn) and a CUDA GPU; use flash_attn: auto"
        ]
    if not _has_accelerator():
        return ["flash_attn: fa2 needs a CUDA GPU; use flash_attn: auto (sdpa)"]
    if kind == "train" and get("do_train") and get("shared_prefix_packing"):
        # FA2's kernels take a padding mask only; packed rows need "each branch sees the shared
        # prefix", which transformers would hand them as a 4D mask they misread
        return [
            "flash_attn: fa2 cannot attend packed rows (shared_prefix_packing: true, the default): set "
            "shared_prefix_packing: false to train with fa2, or flash_attn: sdpa to keep packing"
        ]
    return []


LORA_KEYS = (
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target",
    "use_rslora",
    "create_new_adapter",
    "use_dora",
    "loraplus_lr_ratio",
    "additional_target",
)
FREEZE_KEYS = ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules")


def _tuning_method_problems(get: Any, given: set[str]) -> list[str]:
    """Keys of one fine-tuning method set for another, and a full or freeze run with nothing to
    train. LLaMA-Factory refuses adapters and use_rslora outside LoRA and ignores the rest; eqakit
    names each, so a setting never looks applied when it is not."""
    method = get("finetuning_type")
    problems = []
    if method != "lora":
        if get("adapter_name_or_path"):
            problems.append(  # LLaMA-Factory: "Adapter is only valid for the LoRA method."
                f"adapter_name_or_path works with finetuning_type: lora only; with {method}, merge the "
                "adapters first (eqakit export) and train the merged model"
            )
        if get("quantization_bit"):
            problems.append(  # LLaMA-Factory: "Quantization is only compatible with the LoRA or OFT method."
                f"quantization_bit trains with finetuning_type: lora only (QLoRA); remove it for {method}"
            )
        problems += [
            f"{key} applies to finetuning_type: lora, not {method}: remove it"
            for key in LORA_KEYS
            if key in given
        ]
        if (
            get("freeze_vision_tower")
            and get("freeze_multi_modal_projector")
            and get("freeze_language_model")
        ):
            problems.append(
                f"finetuning_type: {method} with freeze_vision_tower, freeze_multi_modal_projector and "
                "freeze_language_model all true trains nothing: set one of them to false"
            )
    if method != "freeze":
        problems += [
            f"{key} applies to finetuning_type: freeze, not {method}: remove it"
            for key in FREEZE_KEYS
            if key in given
        ]
    elif get("freeze_trainable_layers") == 0 and not get("freeze_extra_modules"):
        problems.append(
            "freeze_trainable_layers: 0 trains no layer: use n > 0 for the last n layers, -n for the first n"
        )
    return problems


PREFERENCE_KEYS = ("pref_beta", "pref_loss", "pref_ftx", "dpo_label_smoothing", "simpo_gamma")


def _preference_problems(get: Any, given: set[str]) -> list[str]:
    """``stage: dpo`` and its keys: each key where it has an effect, the rest refused by name."""
    if get("stage") != "dpo":
        return [
            f"{key} applies to stage: dpo, not {get('stage')}: remove it"
            for key in PREFERENCE_KEYS
            if key in given
        ]
    problems = []
    if not get("do_train") or get("do_predict"):
        problems.append("stage: dpo trains (do_train: true); predict with stage: sft and do_predict: true")
    loss = get("pref_loss")
    if get("dpo_label_smoothing") and loss != "sigmoid":  # LLaMA-Factory refuses it too
        problems.append(f"dpo_label_smoothing applies to pref_loss: sigmoid, not {loss}: remove it")
    if "simpo_gamma" in given and loss != "simpo":
        problems.append(f"simpo_gamma applies to pref_loss: simpo, not {loss}: remove it")
    problems += [  # a pair is scored on its final answers only, as LLaMA-Factory scores it
        f"{key} has no effect with stage: dpo (each pair learns its final answers only): remove it"
        for key in ("train_on_prompt", "mask_history", "compute_accuracy")
        if key in given and get(key)
    ]
    if get("finetuning_type") != "lora" and loss == "sigmoid" and get("deepspeed"):
        problems.append(
            f"stage: dpo with finetuning_type: {get('finetuning_type')} keeps a frozen reference copy, "
            "which eqakit does not partition under DeepSpeed: remove deepspeed, or use finetuning_type: lora"
        )
    return problems


def _training_checks(values: dict[str, Any], given: set[str]) -> list[str]:
    """The LoRA, evaluation, checkpointing and preprocessing keys of `eqakit train`, checked together."""
    problems = []
    get = values.get
    if get("compute_accuracy"):
        if get("predict_with_generate"):
            problems.append(  # LLaMA-Factory refuses the pair too
                "compute_accuracy scores teacher-forced tokens, predict_with_generate generated text: "
                "remove compute_accuracy (do_predict reports its own metrics)"
            )
        elif not get("val_size") and not get("eval_dataset"):
            problems.append(
                "compute_accuracy reports accuracy on the evaluation set: set val_size (e.g. 0.1) or "
                "eval_dataset, or remove compute_accuracy"
            )
    if get("do_train"):
        problems += _tuning_method_problems(get, given)
    problems += _preference_problems(get, given)
    if get("freeze_language_model") and get("do_train") and get("finetuning_type") == "lora":
        if get("freeze_vision_tower"):
            problems.append(  # LLaMA-Factory fails there too: peft finds no layer to adapt
                "freeze_language_model: true with freeze_vision_tower: true leaves LoRA no layer to adapt "
                "(the vision blocks are the only ones left): set freeze_vision_tower: false"
            )
        if get("lora_target", "all").strip() != "all":
            problems.append(
                f"lora_target {get('lora_target')!r} names language-model layers, which "
                "freeze_language_model: true keeps free of LoRA: set lora_target: all or remove one of them"
            )
    if get("disable_gradient_checkpointing"):
        if get("gradient_checkpointing"):
            problems.append(
                "gradient_checkpointing: true and disable_gradient_checkpointing: true contradict each "
                "other: remove one (checkpointing is on unless disable_gradient_checkpointing is true)"
            )
        if "use_reentrant_gc" in given:
            problems.append(
                "use_reentrant_gc has no effect with disable_gradient_checkpointing: true; remove it"
            )
    if get("warmup_ratio") and get("warmup_steps"):
        problems.append(  # transformers <= 5.6 let warmup_steps win without a word
            f"warmup_ratio: {get('warmup_ratio')} and warmup_steps: {get('warmup_steps'):g} both set the "
            "warmup: keep one"
        )
    if get("deepspeed"):
        problems += _deepspeed_problems(get("deepspeed"), get)
    if get("fsdp") and (get("use_cpu") or not _has_accelerator()):
        problems.append(  # accelerate then sets up plain DDP, with no word about fsdp
            f"key 'fsdp': {get('fsdp')!r} needs GPUs: on the CPU transformers' Trainer silently trains "
            "with plain DDP instead; remove fsdp here (or use deepspeed, which runs on the CPU too)"
        )
    if "preprocessing_batch_size" in given and (get("preprocessing_num_workers") or 1) < 2:
        problems.append(
            "preprocessing_batch_size sizes the work handed to planning processes: set "
            "preprocessing_num_workers to 2 or more, or remove preprocessing_batch_size"
        )
    return problems


def _deepspeed_problems(setting: Any, get: Any) -> list[str]:
    """The ``deepspeed`` key (a JSON file, as LLaMA-Factory's examples give it, or a mapping): a file
    that exists and parses, a ZeRO stage DeepSpeed has, and DeepSpeed installed."""
    if isinstance(setting, str):
        path = Path(setting).expanduser()
        try:
            setting = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return [f"key 'deepspeed': {setting} not found (a DeepSpeed JSON file, relative to {Path.cwd()})"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return [f"key 'deepspeed': {setting} is not a readable JSON file ({exc})"]
    if not isinstance(setting, dict):
        return [f"key 'deepspeed': expected a JSON file or a mapping, got {type(setting).__name__}"]
    zero = setting.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        return [f"key 'deepspeed': zero_optimization.stage {stage!r} is not a ZeRO stage (0, 1, 2 or 3)"]
    if importlib.util.find_spec("deepspeed") is None:
        return ["key 'deepspeed': DeepSpeed is not installed: pip install 'eqakit[deepspeed]'"]
    return []


def key_defaults(kind: Kind) -> dict[str, Any]:
    """Every key a verb of ``kind`` reads, with the value it takes when a config leaves it out."""
    return {
        name: (fld.default if fld.default is not dataclasses.MISSING else None)
        for cls in _groups(kind)
        for name, fld in _fields(cls).items()
    }


def field_choices(kind: Kind, key: str) -> tuple[Any, ...]:
    """The values a key with a fixed set of them takes (a page's dropdown offers these)."""
    for cls in _groups(kind):
        fld = _fields(cls).get(key)
        if fld is not None:
            return tuple(fld.metadata.get("choices", ()))
    raise KeyError(key)


def load_config(
    kind: Kind,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Config:
    """Build a validated `Config` for a verb of the given kind.

    ``kind`` is "train" (model, data, LoRA, generation and Seq2SeqTrainingArguments keys),
    "infer" (api, chat, webui) or "export" (the same keys, export_dir required).
    ``extra`` are programmatic settings applied between the file and the command line.
    """
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    raw.update(extra or {})
    raw.update(parse_overrides(overrides or []))
    groups = _groups(kind)
    fields_by_group = [_fields(cls) for cls in groups]
    known = {name for fields in fields_by_group for name in fields}
    problems = [_unknown_key_message(k, kind, known) for k in raw if k not in known]

    values: dict[str, Any] = {}
    for cls, fields in zip(groups, fields_by_group, strict=True):
        hints = typing.get_type_hints(cls)
        for name, fld in fields.items():
            if name not in raw:
                continue
            value = raw[name]
            try:
                coerced = _coerce(name, value, TYPE_OVERRIDES.get(name, hints.get(name, fld.type)))
            except ValueError as exc:
                reason = str(exc)
                if "choose one of" not in reason:
                    reason += f" (expected {_type_name(hints.get(name, fld.type))})"
                problems.append(f"key {name!r}: {_fmt(value)} {reason}")
                continue
            rules = (
                {**fld.metadata, **TRAINING_RULES.get(name, {})} if cls not in GROUPS else dict(fld.metadata)
            )
            reason = _check_rules(coerced, rules)
            if reason:
                problems.append(f"key {name!r}: {_fmt(value)} {reason}")
                continue
            values[name] = coerced

    if values.get("template") is None and values.get("model_name_or_path"):
        # as LLaMA-Factory falls back to the tokenizer's chat template: the checkpoint's own decides
        chosen = checkpoint_template(values["model_name_or_path"])
        if chosen is not None:
            values["template"] = chosen
    problems += _cross_checks(kind, {**key_defaults(kind), **values}, set(values))
    where = f" in {path}" if path is not None else ""
    if problems:
        raise ConfigError(f"invalid configuration{where}:\n" + "\n".join(f"  - {p}" for p in problems))

    if kind == "train" and values.get("warmup_ratio"):
        # transformers > 5.6 reads a warmup_steps below 1 as the ratio warmup_ratio was
        values["warmup_steps"] = values["warmup_ratio"]
    if (
        kind == "train"
        and values.get("ddp_find_unused_parameters") is None
        and not values.get("gradient_checkpointing")
        and not values.get("disable_gradient_checkpointing")
    ):
        # eqakit checkpoints the trainable layers itself (LLaMA-Factory's default), and DDP's search
        # for unused weights marks those inside a reentrant checkpoint ready twice (an error); every
        # trainable weight gets a gradient at every step (a text-only batch gives the vision
        # tower's a zero one). LLaMA-Factory sets the same for LoRA under DDP.
        values["ddp_find_unused_parameters"] = False
    if kind == "train" and "use_cpu" not in values and not _has_accelerator():
        # transformers only starts CPU DDP (gloo) under torchrun when use_cpu is set, and it fixes the
        # device when the arguments are built, so a machine without an accelerator says so here.
        values["use_cpu"] = True
    built = []
    for cls, fields in zip(groups, fields_by_group, strict=True):
        kwargs = {k: v for k, v in values.items() if k in fields}
        try:
            built.append(cls(**kwargs))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"invalid configuration{where}: {exc}") from None
    model, data, finetuning, generating, api = built[: len(GROUPS)]
    training = built[len(GROUPS)] if kind == "train" else None
    return Config(
        model=model,
        data=data,
        finetuning=finetuning,
        generating=generating,
        api=api,
        training=training,
        source=Path(path) if path is not None else None,
        user_keys=tuple(raw),
    )


def infer_kind(raw: dict[str, Any]) -> Kind:
    """Which verb a config file is for, from its keys (for `eqakit config`)."""
    if raw.get("do_train") or raw.get("do_predict"):
        return "train"
    return "export" if raw.get("export_dir") else "infer"


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


def describe_keys(kind: Kind) -> str:
    """A help page listing every eqakit key with its default and meaning (transformers keys by reference)."""
    lines = []
    for cls in GROUPS:
        lines.append(f"{cls.__name__}:")
        for fld in dataclasses.fields(cls):
            default = fld.default if fld.default is not dataclasses.MISSING else None
            lines.append(f"  {fld.name} (default {default!r}): {fld.metadata.get('help', '')}")
    if kind == "train":
        lines.append("Seq2SeqTrainingArguments: every transformers training key (output_dir, learning_rate,")
        lines.append("  num_train_epochs, per_device_train_batch_size, eval_strategy, save_steps, ...).")
    return "\n".join(lines)
