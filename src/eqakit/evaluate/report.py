"""Markdown tables of evaluation scores: report.md beside the predictions, and base-vs-fine-tuned tables.

Takes the dicts that ``metrics.score_predictions`` and the LLM-Match judge return (overall ``predict_*``
means, ``num_samples``, ``per_category``), so one report format serves every score eqakit computes.

    write_report("runs/eval/report.md", score_predictions(rows), extra={"model": "Qwen3-VL-2B"})
    print(compare_table(base_scores, tuned_scores, names=("base", "LoRA")))
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eqakit.fsutil import write_text_atomic

# Column titles of the metrics a report shows, in order; keys absent from the scores are skipped.
METRIC_LABELS: dict[str, str] = {
    "predict_llm_match": "LLM-Match",
    "predict_bleu-4": "BLEU-4",
    "predict_rouge-1": "ROUGE-1",
    "predict_rouge-2": "ROUGE-2",
    "predict_rouge-l": "ROUGE-L",
    "predict_exact_match": "EM",
    "predict_token_f1": "Token F1",
}


def _metrics_in(*scores: Mapping[str, Any]) -> list[str]:
    return [key for key in METRIC_LABELS if any(key in s for s in scores)]


def score_cell(value: Any) -> str:
    """A score as tables show it: two decimals, or "-" where there is none."""
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table of ``rows`` under ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def scores_markdown(scores: Mapping[str, Any]) -> str:
    """The overall table and, when the scores have categories, the per-category table."""
    metrics = _metrics_in(scores)
    overall = markdown_table(
        ["Samples", *(METRIC_LABELS[m] for m in metrics)],
        [[str(scores.get("num_samples", "-")), *(score_cell(scores.get(m)) for m in metrics)]],
    )
    parts = ["## Overall", "", overall]
    per_category: Mapping[str, Mapping[str, Any]] = scores.get("per_category") or {}
    if per_category:
        rows = [
            [name, str(cat.get("num_samples", "-")), *(score_cell(cat.get(m)) for m in metrics)]
            for name, cat in per_category.items()
        ]
        parts += [
            "",
            "## Per category",
            "",
            markdown_table(["Category", "Samples", *(METRIC_LABELS[m] for m in metrics)], rows),
        ]
    return "\n".join(parts)


def write_report(
    path: str | os.PathLike[str],
    scores: Mapping[str, Any],
    title: str = "Evaluation report",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write report.md: a title, an optional table of run facts (``extra``: model, runtime...), the scores.

    Scores are shown x100 with 2 decimals, as LLaMA-Factory users quote them.
    """
    parts = [f"# {title}", ""]
    if extra:
        parts += [markdown_table(["Setting", "Value"], [[str(k), str(v)] for k, v in extra.items()]), ""]
    parts += [scores_markdown(scores), ""]
    return write_text_atomic(path, "\n".join(parts))


def compare_table(
    a_scores: Mapping[str, Any], b_scores: Mapping[str, Any], names: Sequence[str] = ("base", "fine-tuned")
) -> str:
    """A markdown table of two runs' overall metrics side by side, with the change from the first."""
    if len(names) != 2:
        raise ValueError(f"compare_table needs two names, got {list(names)!r}")
    rows = []
    for key in _metrics_in(a_scores, b_scores):
        a, b = a_scores.get(key), b_scores.get(key)
        delta = f"{b - a:+.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "-"
        rows.append([METRIC_LABELS[key], score_cell(a), score_cell(b), delta])
    rows.append(["Samples", str(a_scores.get("num_samples", "-")), str(b_scores.get("num_samples", "-")), ""])
    return markdown_table(["Metric", names[0], names[1], "Change"], rows)
