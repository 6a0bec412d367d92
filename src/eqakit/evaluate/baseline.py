"""The frames-blind baseline: what a model that never looks at the frames can score.

Each test question is answered with the answer given most often to the same question in training
(or the most common answer overall): the best a model that ignores the frames can learn from the
training split. A tuned model must beat it to show that it reads the frames. The demo's summary and
the web UI's Results tab put it beside the runs.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from eqakit.data.template import readable
from eqakit.evaluate.metrics import score_predictions


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def blind_baseline(data: Path) -> dict[str, Any]:
    """Scores of answering each test question with its most common training answer, frames unseen.

    This is the best a model that ignores the frames can learn from the training split, so a
    fine-tuned model that beats its exact match must be reading the frames.
    """

    def question(row: dict[str, Any]) -> str:
        return readable(row["instruction"])

    answers: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()  # for a test question never asked in training
    for row in json_lines(data / "open_eqa_train_val.jsonl"):
        answers[question(row)][row["output"]] += 1
        overall[row["output"]] += 1
    guesses = [
        {
            "predict": (answers.get(question(row)) or overall).most_common(1)[0][0],
            "label": row["output"],
            "extra_answers": row.get("extra_answers"),
            "category": row.get("category"),
        }
        for row in json_lines(data / "open_eqa_test.jsonl")
    ]
    scores = score_predictions(guesses)
    per_category = scores.pop("per_category")
    return {**scores, "predict_per_category": per_category}
