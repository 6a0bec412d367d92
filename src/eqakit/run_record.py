"""What an output directory says about how it was made, written by every verb that makes one.

Every record starts with `provenance`: the stage, eqakit's version and git commit, torch,
transformers and peft, so a result can be traced to the code that produced it. Verbs run from a
config add the config file, the keys the user set (``config``: what reproduces the run) and the
whole resolved config (``resolved_config``: every default as it was then), then what is their own:

- ``eqakit train``: ``eqakit_run.json`` and ``eqakit_config.yaml`` in output_dir (`write_run_record`);
- ``eqakit predict``: ``eqakit_predict.json`` beside the predictions, so that a prediction into a
  training run's directory keeps that run's record;
- ``eqakit export``: ``eqakit_export.json`` in the export (its adapters' digests mark them merged);
- ``eqakit prepare``: ``eqakit_run.json`` in the dataset directory, with its options and summary;
- ``eqakit judge``: the provenance heads its ``*_summary.json`` beside the predictions.
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from eqakit import __version__
from eqakit.config import Config
from eqakit.fsutil import write_text_atomic


def git_commit() -> str | None:
    """The commit of the eqakit checkout running (None for an installed wheel or without git)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def user_config(cfg: Config) -> dict[str, Any]:
    """The keys the user set (file and overrides), resolved: what reproduces the run."""
    return {k: v for k, v in cfg.to_dict().items() if k in cfg.user_keys}


def provenance(stage: str) -> dict[str, Any]:
    """The stage and the code that ran it. Versions are read from the installed packages' metadata,
    so a verb that never imports peft (prepare, judge) does not pay its import for a record."""
    return {
        "stage": stage,
        "eqakit": __version__,
        "git_commit": git_commit(),
        **{name: _installed(name) for name in ("torch", "transformers", "peft")},
    }


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def record(cfg: Config, stage: str, extra: dict[str, Any]) -> dict[str, Any]:
    """A config-driven verb's record: `provenance`, the config file, the keys the user set and the
    whole resolved config, then what the verb adds."""
    return {
        **provenance(stage),
        "config_file": str(cfg.source) if cfg.source else None,
        "config": user_config(cfg),
        "resolved_config": cfg.to_dict(),
        **extra,
    }


def write_record(path: Path, content: dict[str, Any]) -> Path:
    """Write a record to ``path`` (JSON) atomically: a reader never sees half of it."""
    return write_text_atomic(path, json.dumps(content, indent=2, default=str, ensure_ascii=False) + "\n")


def write_run_record(cfg: Config, out: Path, extra: dict[str, Any]) -> None:
    """A training run's output_dir describes itself: ``eqakit_config.yaml`` (the keys set, ready to
    run again) and ``eqakit_run.json`` (`record`)."""
    out.mkdir(parents=True, exist_ok=True)
    settings = yaml.safe_dump(user_config(cfg), sort_keys=True, allow_unicode=True)
    write_text_atomic(out / "eqakit_config.yaml", settings)
    write_record(out / "eqakit_run.json", record(cfg, "train", extra))
