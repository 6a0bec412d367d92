"""The paths the web UI's fields start from, and the runs, adapters and datasets it offers to pick.

A user who starts ``eqakit webui runs/demo/configs/infer.yaml`` should not retype a path the
config already leads to. `Workspace.from_config` follows it: the model it loads; the base that
model was exported from (its ``eqakit_export.json``), so that Train and Export start from the base
and not from a model that already holds an adapter; the training run of its adapter (an adapter's
output_dir keeps the ``eqakit_config.yaml`` it was trained with), which names the dataset dir; and
the folder that run sits in, where new runs are proposed (timestamped, as LLaMA Board does) and
existing ones are listed. A key the config sets itself always wins.

The listing functions look only a few levels down (runs are folders of a runs folder), skip hidden
folders, and return newest first (by the time the run last wrote its output), so a field that
starts on the first offers the run just made; a field offering them still takes any typed path.
Adapters are offered per run: its final adapter, labelled "(final)", then its checkpoints (only
those the trainer marked complete: a folder a killed save left is not one to evaluate, merge or
resume from), so a user can tell an end result from a step on the way.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eqakit.config import Config
from eqakit.data.dataset import read_dataset_info
from eqakit.errors import EqakitError
from eqakit.model.adapters import export_record
from eqakit.train.callbacks import COMPLETE_MARKER

TRAIN_RECORD = "eqakit_config.yaml"  # written by `eqakit train` into its output_dir
ADAPTER_CONFIG = "adapter_config.json"
PREDICTIONS = "generated_predictions.jsonl"
SEARCH_DEPTH = 2  # runs_dir/group/run (a run's checkpoint-N folders are looked for in each run)
CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # the Trainer's name for the folder of step N
SKIPPED = {"node_modules", "__pycache__", "site-packages"}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file's content; empty when it is missing or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def export_base(model: str) -> str | None:
    """The base model an eqakit export was merged from (its eqakit_export.json), or None for any other model."""
    base = export_record(Path(model).expanduser()).get("base_model") if model else None
    return str(base) if base else None


def adapter_base(adapter: str) -> str | None:
    """The base model an adapter records (adapter_config.json's base_model_name_or_path), or None."""
    if not adapter.strip():
        return None
    base = read_json(Path(adapter.strip()).expanduser() / ADAPTER_CONFIG).get("base_model_name_or_path")
    return str(base) if base else None


def trained_with(adapter: str) -> dict[str, Any]:
    """The config an adapter was trained with: its output_dir's eqakit_config.yaml (a checkpoint's:
    the run's), empty when `eqakit train` did not write it."""
    folder = Path(adapter).expanduser()
    for candidate in (folder, folder.parent):
        try:
            keys = yaml.safe_load((candidate / TRAIN_RECORD).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(keys, dict):
            return keys
    return {}


def stamp() -> str:
    """The time now as a folder name suffix: runs started a second apart get their own dir."""
    return time.strftime("%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class Workspace:
    """Where the page's fields start: every path from the command line's config or what it leads to."""

    model: str = ""  # the model the config loads
    adapter: str = ""  # the config's adapter (comma-separated when several)
    base: str = ""  # the model to train on and merge into: ``model``, or the base it was exported from
    dataset_dir: str = ""  # the config's, else the one the model's adapter was trained on
    runs_dir: str = ""  # where new runs are proposed and existing ones looked for
    training: dict[str, Any] = field(default_factory=dict)  # the config the model's adapter was trained with

    @classmethod
    def from_config(cls, cfg: Config | None) -> Workspace:
        if cfg is None:
            return cls(dataset_dir="data" if (Path("data") / "dataset_info.json").is_file() else "")
        model = cfg.model.model_name_or_path or ""
        adapter = cfg.model.adapter_name_or_path or ""
        base = export_base(model) or model
        merged = export_record(Path(model).expanduser()).get("adapters") or [{}]
        trained = adapter.split(",")[0].strip() or str(merged[0].get("path") or "")
        record = trained_with(trained) if trained else {}
        if "dataset_dir" in cfg.user_keys:
            dataset_dir = cfg.data.dataset_dir
        else:
            dataset_dir = str(record.get("dataset_dir") or "")
        if trained:
            runs_dir = str(Path(trained).expanduser().parent)
        elif cfg.source is not None:
            runs_dir = str(Path(cfg.source).parent)
        else:
            runs_dir = ""
        return cls(model, adapter, base, dataset_dir, runs_dir, record)

    def propose(self, kind: str) -> str:
        """A new output dir for a run of ``kind`` ("train", "predict", "export"), timestamped."""
        return str(Path(self.runs_dir or "saves") / f"{kind}-{stamp()}")

    def train_keys(self) -> dict[str, Any]:
        """The Train tab's form when no training config was given: the config the loaded model's
        adapter was trained with (if any), on the base model and dataset dir, in a new output dir."""
        done = ("output_dir", "adapter_name_or_path", "resume_from_checkpoint", "overwrite_output_dir")
        keys = {k: v for k, v in self.training.items() if k not in done}
        return {
            **keys,
            "model_name_or_path": self.base,
            "dataset_dir": self.dataset_dir,
            "output_dir": self.propose("train"),
        }

    @property
    def root(self) -> Path:
        """The folder whose runs the page lists."""
        return Path(self.runs_dir or ".").expanduser()


def _folders(root: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """``root`` and the folders under it, ``depth`` levels down, hidden and package folders left out."""
    found, level = [root], [root]
    for _ in range(depth):
        below = []
        for folder in level:
            try:
                below += [
                    p
                    for p in folder.iterdir()
                    if p.is_dir() and not p.name.startswith(".") and p.name not in SKIPPED
                ]
            except OSError:
                continue
        found += below
        level = below
    return found


def _holding(root: Path, name: str) -> list[str]:
    """The folders under ``root`` that hold a file ``name``, newest first."""
    hits = {p for p in _folders(root) if (p / name).is_file()}
    return [str(p) for p in sorted(hits, key=lambda p: (p / name).stat().st_mtime, reverse=True)]


def complete_checkpoints(run: Path) -> list[Path]:
    """The checkpoint-N folders of ``run`` the trainer finished writing (COMPLETE_MARKER), highest
    step first: the ones it is safe to resume from, evaluate or merge."""
    steps = []
    for path in run.glob("checkpoint-*"):
        match = CHECKPOINT.fullmatch(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            steps.append((int(match[1]), path))
    return [path for _, path in sorted(steps, reverse=True)]


def checkpoint_choices(output_dir: str) -> list[str]:
    """The complete checkpoints of the run in ``output_dir``, highest step first (none for an empty field)."""
    return (
        [str(p) for p in complete_checkpoints(Path(output_dir.strip()).expanduser())]
        if output_dir.strip()
        else []
    )


def adapter_choices(root: Path) -> list[tuple[str, str]]:
    """The LoRA adapters under ``root`` as (label, path): per run, its final adapter ("runs/x (final)")
    then its complete checkpoints ("runs/x/checkpoint-40"); runs newest first, by their newest
    adapter_config.json (a run still training offers its checkpoints alone)."""
    runs = []
    for folder in _folders(root):
        if CHECKPOINT.fullmatch(folder.name):
            continue  # offered with its run
        adapters = [p for p in complete_checkpoints(folder) if (p / ADAPTER_CONFIG).is_file()]
        choices = [(str(p), str(p)) for p in adapters]
        if (folder / ADAPTER_CONFIG).is_file():
            adapters.append(folder)
            choices.insert(0, (f"{folder} (final)", str(folder)))
        if adapters:
            runs.append((max((p / ADAPTER_CONFIG).stat().st_mtime for p in adapters), choices))
    runs.sort(key=lambda run: run[0], reverse=True)
    return [choice for _, choices in runs for choice in choices]


def find_predict_runs(root: Path) -> list[str]:
    """Folders under ``root`` a predict run wrote (generated_predictions.jsonl), newest first."""
    return _holding(root, PREDICTIONS)


def find_datasets(dataset_dir: str) -> list[str]:
    """The dataset names dataset_dir's dataset_info.json registers (none when it cannot be read)."""
    if not dataset_dir.strip():
        return []
    try:
        return list(read_dataset_info(Path(dataset_dir.strip()).expanduser()))
    except EqakitError:
        return []


def proposed(choices: list[str] | list[tuple[str, str]], current: str | None) -> str | None:
    """The value a dropdown shows once ``choices`` are listed again: the user's own, else the newest
    (the first), so a run made since the page opened is the one proposed."""
    values = [c[1] if isinstance(c, tuple) else c for c in choices]
    return current or (values[0] if values else None)
