"""Text-similarity scores for predictions, computed exactly as LLaMA-Factory does, plus EM and token F1.

Users compare eqakit's numbers with LLaMA-Factory's (the tutorial reports BLEU-4 28.37, ROUGE-1 34.76,
ROUGE-2 9.17, ROUGE-L 34.08), so BLEU and ROUGE follow LLaMA-Factory's ``ComputeSimilarity``
(src/llamafactory/train/sft/metric.py) to the digit:

- BLEU-4: NLTK ``sentence_bleu`` over the *characters* of label and prediction, default weights,
  ``SmoothingFunction().method3``;
- ROUGE-1/2/L: ``rouge_chinese`` F-scores over jieba-segmented, space-joined words; 0 when either side
  has no word after segmentation;
- each x100 and rounded to 4 decimals per sample, then averaged over samples with ``np.mean``.

Exact match and token F1 are SQuAD-style (lowercase, strip punctuation, drop English articles, collapse
whitespace) and take the best over the label and any ``extra_answers``, which OpenEQA gives for some
questions. Two additions make them meaningful for Chinese answers: Unicode punctuation (，。？) is
stripped too, and each CJK character is its own token, as MLQA's evaluation does.

    >>> score_predictions([{"predict": "The red chair.", "label": "red chair"}])["predict_exact_match"]
    100.0
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jieba
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from eqakit.data.openeqa_categories import OPENEQA_CATEGORIES
from eqakit.errors import DataError

jieba.setLogLevel(logging.CRITICAL)  # jieba logs "Building prefix dict..." to stderr on first use

# Key names of the overall scores, in report order. The first four are LLaMA-Factory's own names.
METRIC_KEYS: tuple[str, ...] = (
    "predict_bleu-4",
    "predict_rouge-1",
    "predict_rouge-2",
    "predict_rouge-l",
    "predict_exact_match",
    "predict_token_f1",
)

_SMOOTHING = SmoothingFunction().method3
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")


def bleu_rouge(predict: str, label: str) -> dict[str, float]:
    """LLaMA-Factory's per-sample BLEU-4 and ROUGE-1/2/L, x100, rounded to 4 decimals."""
    hypothesis = list(jieba.cut(predict))
    reference = list(jieba.cut(label))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        rouge = {name: result[name]["f"] for name in ("rouge-1", "rouge-2", "rouge-l")}
    scores = {name: round(value * 100, 4) for name, value in rouge.items()}
    bleu = sentence_bleu([list(label)], list(predict), smoothing_function=_SMOOTHING)
    scores["bleu-4"] = round(float(bleu) * 100, 4)
    return scores


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (lowercase, no punctuation, no articles, single spaces), Unicode-aware."""
    text = text.lower()
    text = "".join(
        " " if ch in _ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P") else ch for ch in text
    )
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """Tokens of a normalised answer: whitespace-separated words, with every CJK character on its own."""
    return _CJK.sub(r" \1 ", normalize_answer(text)).split()


def exact_match(predict: str, answers: Sequence[str]) -> float:
    """100 if the normalised prediction equals any normalised answer, else 0."""
    normalized = normalize_answer(predict)
    return 100.0 if any(normalized == normalize_answer(a) for a in answers) else 0.0


def token_f1(predict: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 (x100, rounded to 4 decimals), the best over the answers."""
    pred_tokens = answer_tokens(predict)
    best = 0.0
    for answer in answers:
        gold_tokens = answer_tokens(answer)
        if not pred_tokens or not gold_tokens:
            # SQuAD: two empty answers agree fully; one empty answer shares nothing.
            best = max(best, float(pred_tokens == gold_tokens))
            continue
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common:
            precision, recall = common / len(pred_tokens), common / len(gold_tokens)
            best = max(best, 2 * precision * recall / (precision + recall))
    return round(best * 100, 4)


def sample_scores(predict: str, label: str, extra_answers: Sequence[str] | None = None) -> dict[str, float]:
    """Every metric for one prediction, keyed like METRIC_KEYS. BLEU/ROUGE use the label only."""
    answers = [label, *(extra_answers or [])]
    scores = {f"predict_{name}": value for name, value in bleu_rouge(predict, label).items()}
    scores["predict_exact_match"] = exact_match(predict, answers)
    scores["predict_token_f1"] = token_f1(predict, answers)
    return {key: scores[key] for key in METRIC_KEYS}


def sort_categories(names: Iterable[str]) -> list[str]:
    """OpenEQA's categories in the paper's order first, then any others alphabetically: stable tables."""
    rank = {name: i for i, name in enumerate(OPENEQA_CATEGORIES)}
    return sorted(set(names), key=lambda name: (rank.get(name, len(rank)), name))


def _means(samples: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    means: dict[str, Any] = {key: float(np.mean([s[key] for s in samples])) for key in METRIC_KEYS}
    means["num_samples"] = len(samples)
    return means


def score_predictions(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean scores over prediction rows, overall and per category.

    Each row needs ``predict`` and ``label`` (strings) and may carry ``category`` and ``extra_answers``.
    Returns the METRIC_KEYS means, ``num_samples``, and ``per_category`` mapping each category (in
    sort_categories order; rows without one are left out) to the same means and its count.
    """
    overall: list[dict[str, float]] = []
    by_category: dict[str, list[dict[str, float]]] = {}
    for index, row in enumerate(rows):
        predict, label = row.get("predict"), row.get("label")
        if not isinstance(predict, str) or not isinstance(label, str):
            raise DataError(
                f"prediction row {index} needs string 'predict' and 'label' fields, got "
                f"predict={predict!r}, label={label!r}"
            )
        scores = sample_scores(predict, label, row.get("extra_answers"))
        overall.append(scores)
        category = row.get("category")
        if category:
            by_category.setdefault(str(category), []).append(scores)
    if not overall:
        raise DataError("no predictions to score: the prediction rows are empty")
    result = _means(overall)
    result["per_category"] = {name: _means(by_category[name]) for name in sort_categories(by_category)}
    return result
