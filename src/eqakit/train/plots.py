"""Loss curves as PNG (LLaMA-Factory's plot_loss): raw values and an EMA-smoothed line."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from eqakit.fsutil import write_bytes_atomic


def smooth(values: list[float]) -> list[float]:
    """LLaMA-Factory's smoothing: an EMA whose weight grows with the number of points."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for value in values:
        last = last * weight + (1 - weight) * value
        out.append(last)
    return out


def plot_loss(output_dir: Path, keys: tuple[str, ...] = ("loss", "eval_loss", "eval_accuracy")) -> list[Path]:
    """Write training_<key>.png for each key found in trainer_state.json's log history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = json.loads((output_dir / "trainer_state.json").read_text(encoding="utf-8"))
    written = []
    for key in keys:
        points = [(e["step"], e[key]) for e in state.get("log_history", []) if key in e]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        ax.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
        ax.set_title(f"{key} of {output_dir.name}")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
        path = output_dir / f"training_{key}.png"
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        write_bytes_atomic(path, png.getvalue())
        written.append(path)
    return written
