"""What an output directory says about how it was made, written by every verb that makes one.

``eqakit train`` (``eqakit_run.json``), predict (``eqakit_predict.json`` beside the predictions, so
a prediction into a training run's directory keeps that run's record) and ``eqakit export``
(``eqakit_export.json``) record the same provenance: eqakit's version and git
commit, torch, transformers and peft, the config file and the keys the user set, so a result can be
traced to the code and settings that produced it. Each verb adds what is its own.
"""

from __future__ import annotations

import json
import subprocess
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


def record(cfg: Config, extra: dict[str, Any]) -> dict[str, Any]:
    """A run's record: versions, commit, config file and the keys set, then what the verb adds."""
    import peft
    import torch
    import transformers

    return {
        "eqakit": __version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "config_file": str(cfg.source) if cfg.source else None,
        "config": user_config(cfg),
        **extra,
    }


def write_record(cfg: Config, path: Path, extra: dict[str, Any]) -> Path:
    """Write `record` to ``path`` (JSON) atomically: a reader never sees half of it."""
    return write_text_atomic(path, json.dumps(record(cfg, extra), indent=2, default=str) + "\n")


def write_run_record(cfg: Config, out: Path, extra: dict[str, Any]) -> None:
    """A training run's output_dir describes itself: ``eqakit_config.yaml`` (the keys set, ready to
    run again) and ``eqakit_run.json`` (`record`)."""
    out.mkdir(parents=True, exist_ok=True)
    settings = yaml.safe_dump(user_config(cfg), sort_keys=True, allow_unicode=True)
    write_text_atomic(out / "eqakit_config.yaml", settings)
    write_record(cfg, out / "eqakit_run.json", extra)
