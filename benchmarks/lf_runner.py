"""Running LLaMA-Factory itself beside eqakit, for the benchmarks that compare the two on one YAML.

LLaMA-Factory 0.9.5 lives in its own virtual environment (``.venv-lf``, made on first use by
``install_llamafactory.sh``), because it pins transformers <= 5.6 and eqakit tests the newest 5.x.
Each tool runs as a command in a subprocess of its own, so its wall time and peak RSS are its own.

    lf = llamafactory_cli()                            # installs it the first time (a few minutes)
    run = timed([str(lf), "train", "eval.yaml"], log=workdir / "lf.log")
    print(run.seconds, run.peak_rss_gb)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LF_VENV = REPO / ".venv-lf"
EQAKIT = [sys.executable, "-m", "eqakit"]


def llamafactory_cli(venv: Path = LF_VENV) -> Path:
    """``llamafactory-cli`` of a venv holding LLaMA-Factory 0.9.5 (installed there on first use)."""
    if not (venv / ".installed").exists():
        print(f"installing LLaMA-Factory 0.9.5 into {venv} (once; a few minutes) ...", flush=True)
        subprocess.run(["bash", str(REPO / "benchmarks" / "install_llamafactory.sh"), str(venv)], check=True)
    return venv / "bin" / "llamafactory-cli"


@dataclass(frozen=True)
class Run:
    """A finished command: wall seconds, the peak resident memory of its main process, and the CPU
    seconds (user + system) it and the children it waited for used: less sensitive than the wall time
    to other jobs on the machine, though OpenMP's spinning threads still count."""

    seconds: float
    peak_rss_gb: float
    cpu_seconds: float = 0.0


def timed(command: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``command`` with its output in ``log``; raise with the log's tail if it fails."""
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed:\n{tail}")
    return Run(seconds, usage.ru_maxrss / 1024**2, usage.ru_utime + usage.ru_stime)


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=True), encoding="utf-8")
    return path
