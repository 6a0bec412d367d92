"""LLaMA-Factory-compatible BLEU/ROUGE, SQuAD-style EM/F1, score aggregation and the markdown reports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from eqakit.errors import DataError
from eqakit.evaluate.metrics import (
    METRIC_KEYS,
    answer_tokens,
    bleu_rouge,
    exact_match,
    normalize_answer,
    sample_scores,
    score_predictions,
    token_f1,
)
from eqakit.evaluate.report import compare_table, write_report


def test_identical_strings_score_100_everywhere():
    scores = sample_scores("The red chair is next to the table.", "The red chair is next to the table.")
    assert scores == {key: 100.0 for key in METRIC_KEYS}


def test_disjoint_strings_score_0():
    assert bleu_rouge("xyz", "abc") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}


def test_single_character_hand_computed():
    # NLTK method3 gives the empty 2/3/4-gram precisions 1/2, 1/4, 1/8: BLEU = (1 * 1/2 * 1/4 * 1/8) ** (1/4).
    # One word and no bigram: ROUGE-1 and ROUGE-L match fully, ROUGE-2 has nothing to match.
    assert bleu_rouge("a", "a") == {
        "rouge-1": 100.0,
        "rouge-2": 0.0,
        "rouge-l": 100.0,
        "bleu-4": round(100 * (1 / 64) ** 0.25, 4),
    }


def test_chinese_partial_match_hand_computed():
    predict, label = "厨房里有一把红色的椅子", "厨房里有一把蓝色的椅子"
    # Characters: 11 each, one differs (红/蓝); it spoils 1 of 11 unigrams, 2 of 10 bigrams, 3 of 9
    # trigrams, 4 of 8 four-grams. Same length, so no brevity penalty.
    bleu = (10 / 11 * 8 / 10 * 6 / 9 * 4 / 8) ** 0.25
    # jieba words: 厨房/里/有/一把/红色/的/椅子 vs the same with 蓝色: 6 of 7 words, 4 of 6 bigrams
    # (厨房里, 里有, 有一把, 的椅子), longest common subsequence 6 words. rouge_chinese's F adds 1e-8.
    f1 = 2 * (6 / 7) ** 2 / (6 / 7 + 6 / 7 + 1e-8)
    f2 = 2 * (4 / 6) ** 2 / (4 / 6 + 4 / 6 + 1e-8)
    assert bleu_rouge(predict, label) == {
        "rouge-1": round(f1 * 100, 4),
        "rouge-2": round(f2 * 100, 4),
        "rouge-l": round(f1 * 100, 4),
        "bleu-4": round(bleu * 100, 4),
    }
    assert bleu_rouge(predict, label)["bleu-4"] == 70.1688


def test_english_partial_match_against_the_libraries():
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    predict, label = "There is a brown sofa in the living room.", "a grey sofa"
    expected_bleu = sentence_bleu(
        [list(label)], list(predict), smoothing_function=SmoothingFunction().method3
    )
    expected = Rouge().get_scores(" ".join(jieba.cut(predict)), " ".join(jieba.cut(label)))[0]
    scores = bleu_rouge(predict, label)
    assert scores["bleu-4"] == round(expected_bleu * 100, 4)
    for name in ("rouge-1", "rouge-2", "rouge-l"):
        assert scores[name] == round(expected[name]["f"] * 100, 4)
    assert 0 < scores["rouge-1"] < 100 and 0 < scores["bleu-4"] < 100


@pytest.mark.parametrize("predict", ["", "\n"])
def test_empty_prediction_scores_0(predict):
    assert sample_scores(predict, "red chair") == {key: 0.0 for key in METRIC_KEYS}


def test_blank_prediction_keeps_llamafactory_character_bleu():
    # LLaMA-Factory's BLEU runs over characters, so spaces match the label's space; ROUGE sees no word.
    scores = sample_scores("   ", "red chair")
    assert scores["predict_rouge-1"] == scores["predict_rouge-l"] == scores["predict_token_f1"] == 0.0
    assert 0 < scores["predict_bleu-4"] < 10


def test_empty_label_gives_zero_rouge_like_llamafactory():
    assert bleu_rouge("red chair", "") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Red Chair!", "red chair"),
        ("  a   sofa, an armchair  ", "sofa armchair"),
        ("There's the theatre.", "there s theatre"),
        ("红色的椅子。", "红色的椅子"),
        ("¿Qué?", "qué"),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_normalises_and_accepts_extra_answers():
    assert exact_match("The red chair.", ["red chair"]) == 100.0
    assert exact_match("red chairs", ["red chair"]) == 0.0
    assert exact_match("grey", ["gray"]) == 0.0
    assert exact_match("Grey.", ["gray", "light grey", "grey"]) == 100.0
    scores = sample_scores("Grey.", "gray", extra_answers=["grey"])
    assert scores["predict_exact_match"] == 100.0
    assert scores["predict_bleu-4"] < 100  # BLEU/ROUGE look at the label only, as LLaMA-Factory does


def test_token_f1():
    # pred {red, chair}, gold {red, wooden, chair}: precision 1, recall 2/3 -> F1 0.8
    assert token_f1("the red chair", ["a red wooden chair"]) == 80.0
    assert token_f1("blue", ["red"]) == 0.0
    assert token_f1("", [""]) == 100.0
    assert token_f1("", ["red"]) == 0.0
    assert token_f1("red wooden chair", ["chair", "red wooden chair"]) == 100.0  # best answer counts


def test_chinese_tokens_are_characters():
    assert answer_tokens("红色的椅子, The chair") == ["红", "色", "的", "椅", "子", "chair"]
    # {红,色,椅,子} against {红,色,的,椅,子}: precision 1, recall 4/5
    assert token_f1("红色椅子", ["红色的椅子"]) == round(100 * 2 * 0.8 / 1.8, 4)


def test_score_predictions_overall_and_per_category():
    rows = [
        {"predict": "red chair", "label": "red chair", "category": "world knowledge"},
        {"predict": "blue", "label": "a green sofa", "category": "object recognition"},
        {"predict": "a sofa", "label": "sofa", "category": "object recognition"},
        {"predict": "the kitchen", "label": "kitchen"},  # no category: overall only
        {"predict": "grey", "label": "gray", "category": "my own category", "extra_answers": ["grey"]},
    ]
    scores = score_predictions(rows)
    per_sample = [sample_scores(r["predict"], r["label"], r.get("extra_answers")) for r in rows]
    for key in METRIC_KEYS:
        assert scores[key] == pytest.approx(float(np.mean([s[key] for s in per_sample])), abs=0)
    assert scores["num_samples"] == 5
    assert scores["predict_exact_match"] == 80.0
    # OpenEQA's categories in the paper's order, others after them
    assert list(scores["per_category"]) == ["object recognition", "world knowledge", "my own category"]
    recognition = scores["per_category"]["object recognition"]
    assert recognition["num_samples"] == 2
    assert recognition["predict_exact_match"] == 50.0
    assert recognition["predict_bleu-4"] == pytest.approx(
        (per_sample[1]["predict_bleu-4"] + per_sample[2]["predict_bleu-4"]) / 2
    )
    assert scores["per_category"]["world knowledge"]["predict_rouge-l"] == 100.0


def test_score_predictions_rejects_bad_rows():
    with pytest.raises(DataError, match="row 1 needs string 'predict'"):
        score_predictions([{"predict": "a", "label": "a"}, {"label": "b"}])
    with pytest.raises(DataError, match="no predictions"):
        score_predictions([])


def test_jieba_prints_nothing():
    code = "from eqakit.evaluate.metrics import bleu_rouge; print(bleu_rouge('厨房里有一把椅子', '厨房里有椅子'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr == ""
    assert "rouge-1" in result.stdout


# ---- report.md ------------------------------------------------------------------------------------


def test_write_report(tmp_path):
    rows = [
        {"predict": "blue", "label": "green", "category": "attribute recognition"},
        {"predict": "red chair", "label": "red chair", "category": "object recognition"},
        {"predict": "blue", "label": "blue", "category": "attribute recognition"},
    ]
    scores = score_predictions(rows)
    path = write_report(
        tmp_path / "eval" / "report.md", scores, title="Qwen3-VL on OpenEQA", extra={"model": "tiny"}
    )
    assert path == tmp_path / "eval" / "report.md"
    assert [p.name for p in path.parent.iterdir()] == ["report.md"]  # no temporary file left behind
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "# Qwen3-VL on OpenEQA"
    assert "| model | tiny |" in lines
    header = "| Samples | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | EM | Token F1 |"
    overall = lines[lines.index(header) + 2]
    assert overall.startswith("| 3 | ") and f"| {scores['predict_bleu-4']:.2f} |" in overall
    assert "| Category | Samples | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | EM | Token F1 |" in lines
    category_rows = [
        line for line in lines if line.startswith(("| object recognition", "| attribute recognition"))
    ]
    assert (
        category_rows[0] == "| object recognition | 1 | 100.00 | 100.00 | 100.00 | 100.00 | 100.00 | 100.00 |"
    )
    assert category_rows[1].startswith("| attribute recognition | 2 |")  # OpenEQA's order, not the rows'
    assert category_rows[1].split(" | ")[6] == "50.00"  # EM column


def test_write_report_replaces_an_old_report(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    write_report(path, {"predict_llm_match": 62.5, "num_samples": 8})
    text = path.read_text()
    assert "old" not in text
    assert "| Samples | LLM-Match |" in text and "| 8 | 62.50 |" in text
    assert "Per category" not in text


def test_compare_table():
    base = {"predict_bleu-4": 10.0, "predict_rouge-l": 20.5, "num_samples": 260}
    tuned = {"predict_bleu-4": 28.37, "predict_rouge-l": 34.08, "predict_llm_match": 40.0, "num_samples": 260}
    lines = compare_table(base, tuned, names=("Qwen3-VL-2B", "LoRA")).splitlines()
    assert lines[0] == "| Metric | Qwen3-VL-2B | LoRA | Change |"
    assert lines[2:] == [
        "| LLM-Match | - | 40.00 | - |",
        "| BLEU-4 | 10.00 | 28.37 | +18.37 |",
        "| ROUGE-L | 20.50 | 34.08 | +13.58 |",
        "| Samples | 260 | 260 |  |",
    ]
    with pytest.raises(ValueError):
        compare_table(base, tuned, names=("only one",))
