"""The one Markdown table benchmarks/gpu_check.sh ends with, from the JSON rows its parts append.

    python3 benchmarks/gpu_table.py add ROWS.jsonl CHECK SETTING RESULT [key=value ...]
    python3 benchmarks/gpu_table.py render ROWS.jsonl

bench_train.py --steady and bench_predict.py --decode append their own rows (``--rows``); the shell
adds the preflight's and the tests' with ``add``. A part that timed out or crashed before writing
its row gets one saying so from the shell, so the table always has a line per part.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

COLUMNS = (
    "Check",
    "Setting",
    "Result",
    "Time",
    "Throughput",
    "Peak allocated",
    "--memory estimate",
    "Syncs / step",
)


def _num(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, int | float) and not math.isnan(value) else None


def cells(row: dict[str, Any]) -> list[str]:
    """A row's cells, by what its check measured."""
    time = throughput = peak = estimate = syncs = ""
    result = str(row.get("result", ""))
    if row["check"] == "train" and result == "ok":
        loss = _num(row, "loss")
        result = f"ok, compute {row['compute_dtype']}" + (
            f", mean loss {loss:.3f}" if loss is not None else ""
        )
        cache = _num(row, "vision_cache_s")
        time = f"{row['step_s']:.3f} s/step after {row['warmup']} warm-up; vision cache " + (
            "off" if cache is None else f"{cache:.1f} s"
        )
        throughput = f"{row['samples_per_s']:.1f} samples/s"
    if row["check"] == "train" and (got := _num(row, "peak_gib")) is not None:
        peak = f"{got:.2f} GiB"
    if row["check"] == "train" and (want := _num(row, "estimate_gib")) is not None:
        estimate = f"{want:.2f} GiB"
        if (got := _num(row, "peak_gib")) is not None and want:
            estimate += f" (measured / estimate {got / want:.2f})"
    if row["check"] == "predict" and result == "ok":
        time = f"{row['decode_steps']} decode steps, {row['mean_rows']:.1f} rows each"
        throughput = f"{row['decode_tokens_per_s']:.0f} decode tokens/s; {row['samples_per_s']:.2f} samples/s"
        syncs = f"{row['syncs_per_step']:.2f} counted (max {row['syncs_in_step_max']} in a step)"
        if (cuda := _num(row, "cuda_syncs_per_step")) is not None:
            syncs += f"; {cuda:.2f} by CUDA"
    if "seconds" in row and not time:
        time = f"{float(row['seconds']):.0f} s"
    return [row["check"], str(row.get("setting", "")), result, time, throughput, peak, estimate, syncs]


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells(row)) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) >= 5 and argv[0] == "add":
        row: dict[str, Any] = {"check": argv[2], "setting": argv[3], "result": argv[4]}
        row.update(arg.split("=", 1) for arg in argv[5:])
        with Path(argv[1]).open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return 0
    if len(argv) == 2 and argv[0] == "render":
        path = Path(argv[1])
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        print(render([json.loads(line) for line in text.splitlines() if line.strip()]))
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
