"""`eqakit export CONFIG.yaml [key=value ...]`: merge LoRA adapters into the base model and write it.

Step 3.4 of the tutorial (`llamafactory-cli export merge_openeqa.yaml`): the web UI, the API, vLLM
and plain transformers then load one self-contained model, no adapter needed.

    eqakit export configs/merge_openeqa.yaml
    eqakit export configs/merge_openeqa.yaml export_dir=saves/merged export_size=1 export_dtype=float16

What happens, in order:
1. Everything cheap is checked first: export_dir (refused when it exists and is not empty, unless
   overwrite_output_dir: true), each adapter's adapter_config.json and weights, and that every
   adapter tensor fits a module of the base model (on a meta-device skeleton: no weights loaded).
2. The base model is loaded once, in the dtype that is written (the base's own, bf16 for Qwen3-VL,
   unless export_dtype says otherwise), on export_device (cpu, or auto: CUDA when available).
3. The adapters (adapter_name_or_path, comma-separated) are merged into its weights in order, in place.
4. config.json, generation_config.json, the processor/tokenizer/chat-template files, weight shards
   of at most export_size GB (+ index; .bin with export_legacy_format: true), a README.md model card
   and eqakit_export.json go to a hidden directory beside export_dir, renamed into place at the end.

Peak memory is about one copy of the model (measured by benchmarks/bench_export_memory.py). A killed
export leaves only a hidden ``.NAME.export-PID.tmp`` directory (the next run removes it), never an
export_dir that looks complete, and an existing export_dir is replaced only at the very end. A
config file kept inside export_dir (the tutorial keeps merge_openeqa.yaml there) is not counted as
content and is carried over into the new export_dir.

Raises ConfigError for a bad config, EqakitError for a non-empty export_dir, a missing adapter or
adapter_config.json, or an adapter that does not fit the base model (naming the first tensor).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig

from eqakit import run_record
from eqakit.config import Config, load_config
from eqakit.errors import ConfigError, EqakitError
from eqakit.fsutil import disk_errors, move_into_place
from eqakit.model.adapters import adapter_config, adapter_digest, find_adapters
from eqakit.model.load import DTYPES, check_model, load_base_model, load_processor
from eqakit.model.merge import config_dtype, convert_to_bin, log, merge_adapters, write_weights

# Files beside (in) an adapter directory that the model card reports, in this order.
TRAINING_CONFIGS = ("eqakit_config.yaml", "training_args.yaml")
METRIC_FILES = ("all_results.json", "eval_results.json", "predict_results.json")
LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules", "bias")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="eqakit export",
        description="Merge LoRA adapters into the base model and write a self-contained model directory.",
    )
    parser.add_argument("config", help="LLaMA-Factory-style YAML file (e.g. configs/merge_openeqa.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that replace the file's")
    args = parser.parse_args(argv)
    cfg = load_config("export", args.config, args.overrides)
    started = time.perf_counter()
    export_dir = Path(cfg.model.export_dir).expanduser()
    with disk_errors(export_dir, lambda: f"{export_dir} was left as it was and the partial copy removed"):
        run_export(cfg)
    record = json.loads((export_dir / "eqakit_export.json").read_text(encoding="utf-8"))
    print(
        f"wrote {export_dir}: {len(record['weight_files'])} weight file(s), {_size(record['weight_bytes'])} "
        f"{record['dtype']}, {len(record['adapters'])} adapter(s) merged, {time.perf_counter() - started:.1f} s. "
        f"Use it with model_name_or_path: {export_dir} (and no adapter_name_or_path)."
    )
    return 0


@dataclass(frozen=True)
class ExportPlan:
    """What `preflight` checked and found: where the model goes, what goes with it, how it is written."""

    export_dir: Path
    carried: list[Path]  # config files inside export_dir that the new model keeps
    adapters: list[Path]
    processor: Any
    dtype: torch.dtype
    device: torch.device

    def describe(self) -> str:
        return (
            f"{len(self.adapters)} adapter(s) fit the base; writes {self.export_dir} in "
            f"{str(self.dtype).removeprefix('torch.')} on {self.device}"
        )


def preflight(cfg: Config) -> ExportPlan:
    """Every check `eqakit export` makes before it loads weights: the export dir's state, the base
    model's config and processor, each adapter's fit and its recorded base. `eqakit config` runs it
    too, so a config it calls valid exports."""
    args = cfg.model
    if args.quantization_bit is not None:
        raise ConfigError(
            f"quantization_bit: {args.quantization_bit} cannot be used with `eqakit export`: adapters are merged "
            "into full-precision weights; remove quantization_bit (quantize the exported model afterwards)"
        )
    export_dir = Path(args.export_dir).expanduser()
    carried = _carried_files(cfg.source, export_dir)
    adapters = find_adapters(args.adapter_paths)
    _check_export_dir(
        export_dir, args.overwrite_output_dir, carried, [Path(args.model_name_or_path), *adapters]
    )
    check_model(args)
    processor = load_processor(args)
    config = _load_config(args)
    dtype, device = _export_dtype(args.export_dtype, config), _export_device(args.export_device)
    return ExportPlan(export_dir, carried, adapters, processor, dtype, device)


def run_export(cfg: Config) -> Path:
    """Merge ``cfg.model.adapter_paths`` into the base model and write it to ``cfg.model.export_dir``."""
    args = cfg.model
    plan = preflight(cfg)
    export_dir, carried, adapters, processor = plan.export_dir, plan.carried, plan.adapters, plan.processor
    dtype, device = plan.dtype, plan.device
    if adapters:
        log(f"{len(adapters)} adapter(s) checked against {args.model_name_or_path}")
    else:
        log("no adapter_name_or_path: writing the base model itself (re-sharded, in the export dtype)")

    export_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(export_dir)
    staging = export_dir.parent / f".{export_dir.name}.export-{os.getpid()}.tmp"
    staging.mkdir()
    started = time.perf_counter()
    try:
        _merge_and_write(args, adapters, dtype, device, staging)
        gc.collect()  # the model is gone: the .bin conversion below gets its memory
        if args.export_legacy_format:
            log("converting the shards to .bin (export_legacy_format: true)")
            convert_to_bin(staging)
        processor.save_pretrained(staging)
        weights = sorted(p for p in staging.iterdir() if p.suffix in (".safetensors", ".bin"))
        record = _record(cfg, adapters, dtype, device, weights, time.perf_counter() - started)
        (staging / "eqakit_export.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(model_card(record, adapters), encoding="utf-8")
        for path in carried:
            if (staging / path.name).exists():
                raise EqakitError(f"config file {path} has the name of an exported file; rename it and rerun")
            shutil.copy2(path, staging / path.name)
        move_into_place(staging, export_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote {export_dir}")
    return export_dir


def _merge_and_write(
    args: Any, adapters: list[Path], dtype: torch.dtype, device: torch.device, directory: Path
) -> None:
    """Load, merge and write the weights; the model lives only inside this call."""
    log(f"loading {args.model_name_or_path} in {str(dtype).removeprefix('torch.')} on {device}")
    model = load_base_model(args, device=device, dtype=dtype)
    model = merge_adapters(model, adapters, args.model_name_or_path)
    log(f"writing weights to {directory} in shards of at most {args.export_size:g} GB")
    write_weights(model, directory, args.export_size)


def _load_config(args: Any) -> Any:
    try:
        return AutoConfig.from_pretrained(
            args.model_name_or_path,
            trust_remote_code=args.trust_remote_code,
            cache_dir=args.cache_dir,
            revision=args.model_revision,
        )
    except (OSError, ValueError) as exc:
        raise EqakitError(f"could not read the config of {args.model_name_or_path!r}: {exc}") from None


def _export_dtype(name: str, config: Any) -> torch.dtype:
    """export_dtype, or for ``auto`` the dtype the base model's config.json declares."""
    return config_dtype(config) if name == "auto" else DTYPES[name]


def _export_device(name: str) -> torch.device:
    """``cpu``, or for ``auto`` CUDA when available (merging on MPS gains nothing over the CPU)."""
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu")


def _carried_files(config_file: Path | None, export_dir: Path) -> list[Path]:
    """The config being run, when it sits directly in export_dir (the tutorial's layout)."""
    if config_file is None or not export_dir.is_dir():
        return []
    path = config_file.resolve()
    return [path] if path.parent == export_dir.resolve() else []


def _check_export_dir(export_dir: Path, overwrite: bool, carried: list[Path], protected: list[Path]) -> None:
    if export_dir.exists() and not export_dir.is_dir():
        raise EqakitError(f"export_dir {export_dir} is a file, not a directory; choose another export_dir")
    target = export_dir.resolve()
    for path in protected:
        if path.exists() and (path.resolve() == target or target in path.resolve().parents):
            raise EqakitError(
                f"export_dir {export_dir} would replace {path}, an input of this export; choose another export_dir"
            )
    if not export_dir.is_dir():
        return
    resolved = {p.resolve() for p in carried}
    content = sorted(p.name for p in export_dir.iterdir() if p.resolve() not in resolved)
    if content and not overwrite:
        shown = ", ".join(content[:5]) + (", ..." if len(content) > 5 else "")
        raise EqakitError(
            f"export_dir {export_dir} exists and is not empty (it holds {shown}); set overwrite_output_dir: true "
            "(or pass overwrite_output_dir=true) to replace it, or choose another export_dir"
        )


def _remove_stale_staging(export_dir: Path) -> None:
    """Delete temporary directories that killed exports to ``export_dir`` left behind."""
    pattern = re.compile(rf"\.{re.escape(export_dir.name)}\.export-(\d+)\.tmp")
    for path in export_dir.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir():
            continue
        pid = int(match.group(1))
        if _alive(pid):
            raise EqakitError(
                f"another export (process {pid}) is writing {export_dir} through {path}; wait for it to finish "
                f"or, if no such export runs, delete {path}"
            )
        log(f"removing {path}, left by an export that did not finish")
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _record(
    cfg: Config,
    adapters: list[Path],
    dtype: torch.dtype,
    device: torch.device,
    weights: list[Path],
    seconds: float,
) -> dict:
    """eqakit_export.json: what was merged, how, and with which versions."""
    return run_record.record(
        cfg,
        "export",
        {
            "base_model": cfg.model.model_name_or_path,
            "adapters": [
                {
                    "path": str(a),
                    "sha256": adapter_digest(a),  # how a later export knows this adapter is merged here
                    "lora": {k: _plain(adapter_config(a).get(k)) for k in LORA_KEYS},
                }
                for a in adapters
            ],
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "weight_files": [p.name for p in weights],
            "weight_bytes": sum(p.stat().st_size for p in weights),
            "seconds": round(seconds, 1),
        },
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**8 else f"{nbytes / 1e6:.1f} MB"


def _plain(value: Any) -> Any:
    return sorted(value) if isinstance(value, list | set | tuple) else value


def model_card(record: dict, adapters: list[Path]) -> str:
    """README.md: base model, adapters with their LoRA settings, training config and metrics, usage."""
    base, n, where = record["base_model"], len(record["adapters"]), record["config"]["export_dir"]
    fmt = "pickle .bin" if record["weight_files"][0].endswith(".bin") else "safetensors"
    lines = [
        "---",
        yaml.safe_dump(
            {
                "base_model": base,
                "library_name": "transformers",
                "pipeline_tag": "image-text-to-text",
                "tags": ["eqakit", "lora", "merged", "embodied-question-answering"],
            },
            sort_keys=False,
        ).strip(),
        "---",
        "",
        f"# {Path(where).name}",
        "",
        f"`{base}` with {n} LoRA adapter(s) merged into its weights by eqakit {record['eqakit']} "
        f"(`eqakit export`). Weights: {record['dtype']}, {len(record['weight_files'])} {fmt} file(s), "
        f"{_size(record['weight_bytes'])}. Chat template: the base model's "
        f"(eqakit template `{record['config'].get('template')}`).",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        f'model = AutoModelForImageTextToText.from_pretrained("{where}", dtype="auto")',
        f'processor = AutoProcessor.from_pretrained("{where}")',
        "```",
        "",
        f"or `model_name_or_path: {where}` (and no `adapter_name_or_path`) in an eqakit or LLaMA-Factory config.",
        "",
        "## Base model",
        "",
        f"`{base}`",
        "",
        "## Adapters, merged in this order",
    ]
    for i, (adapter, info) in enumerate(zip(adapters, record["adapters"], strict=True), 1):
        lines += ["", f"### {i}. `{info['path']}`", "", "| LoRA setting | value |", "|---|---|"]
        lines += [f"| {k} | {json.dumps(v)} |" for k, v in info["lora"].items() if v is not None]
        lines += _training_section(adapter) + _metrics_section(adapter)
    if not adapters:
        lines += ["", "None: this is the base model, re-written."]
    lines += [
        "",
        "## Export",
        "",
        f"eqakit {record['eqakit']}, transformers {record['transformers']}, peft {record['peft']}, "
        f"torch {record['torch']}; merged on {record['device']} in {record['seconds']} s. "
        "Settings: eqakit_export.json.",
        "",
    ]
    return "\n".join(lines)


def _training_section(adapter: Path) -> list[str]:
    lines = []
    for name in TRAINING_CONFIGS:
        if (adapter / name).is_file():
            text = (adapter / name).read_text(encoding="utf-8").strip()
            lines += ["", f"Training config ({name}):", "", "```yaml", text, "```"]
    state = adapter / "trainer_state.json"
    if state.is_file():
        try:
            data = json.loads(state.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return [*lines, "", "trainer_state.json is not valid JSON."]
        losses = [e["loss"] for e in data.get("log_history", []) if "loss" in e]
        facts = {
            "global_step": data.get("global_step"),
            "epoch": data.get("epoch"),
            "last logged loss": losses[-1] if losses else None,
            "best_metric": data.get("best_metric"),
        }
        lines += [
            "",
            "Training state (trainer_state.json): "
            + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in facts.items()
                if v is not None
            ),
        ]
    return lines


def _metrics_section(adapter: Path) -> list[str]:
    """Metrics from the result files beside the adapter, each value once."""
    rows: dict[str, tuple[Any, str]] = {}
    for name in METRIC_FILES:
        path = adapter / name
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict):
            continue
        for key, value in data.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                rows.setdefault(key, (value, name))
    if not rows:
        return []
    lines = ["", "| metric | value | from |", "|---|---|---|"]
    return lines + [f"| {k} | {v:.4g} | {src} |" for k, (v, src) in rows.items()]
