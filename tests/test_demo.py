"""`eqakit demo` on a reduced run: every stage's output, fine-tuning that reads the frames, resume.

The run is the real pipeline with fewer rooms and epochs than the default (about a minute and a half
on 2 cores), so it is weaker than `make demo`, yet it must still beat the base model on every metric
and the blind baseline on exact match.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import pytest

from eqakit.cli import main
from eqakit.config import load_config
from eqakit.demo.pipeline import METRICS, TINY_SIZES, run_demo
from eqakit.evaluate.metrics import exact_match
from eqakit.model.tiny import build_tiny_model

OPTIONS = {"episodes": 80, "seed": 0, "epochs": 6}
ARGS = ["--episodes", "80", "--seed", "0", "--epochs", "6"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, run_demo(out, **OPTIONS)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_fine_tuned_beats_the_base_model_and_the_blind_baseline(demo: tuple[Path, dict]) -> None:
    _, results = demo
    base, tuned, blind = results["base"], results["tuned"], results["blind"]
    for metric in METRICS:
        assert tuned[metric] > base[metric], metric
    assert tuned["predict_exact_match"] > blind["predict_exact_match"]
    assert results["beats_base"] and results["beats_blind"]


@pytest.mark.slow
def test_fine_tuned_answers_depend_on_the_room(demo: tuple[Path, dict]) -> None:
    """The same question gets different answers in different rooms, mostly the right ones."""
    out, _ = demo
    answers: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in _jsonl(out / "tuned" / "generated_predictions.jsonl"):
        question = row["prompt"].rsplit("<|vision_end|>", 1)[-1].split("<|im_end|>")[0]
        answers[question].append((row["predict"], row["label"]))
    floor = answers["What is the floor made of?"]
    assert len({predict for predict, _ in floor}) >= 2
    assert sum(exact_match(predict, [label]) > 0 for predict, label in floor) > len(floor) / 2


@pytest.mark.slow
def test_every_stage_wrote_its_outputs(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    for path in (
        "demo.json",
        "model/config.json",
        "model/model.safetensors",
        "synth/open-eqa-v0.json",
        "data/dataset_info.json",
        "data/open_eqa_train_val.jsonl",
        "data/open_eqa_test.jsonl",
        "lora/adapter_model.safetensors",
        "lora/adapter_config.json",
        "lora/trainer_log.jsonl",
        "lora/training_loss.png",
        "merged/config.json",
        "merged/model.safetensors",
    ):
        assert (out / path).is_file(), path
    assert len(list((out / "synth" / "frames").rglob("*-rgb.png"))) >= 80 * 20
    for stage in ("base", "tuned", "merged_eval"):
        assert (out / stage / "predict_results.json").is_file(), stage
        assert len(_jsonl(out / stage / "generated_predictions.jsonl")) == len(
            _jsonl(out / "data" / "open_eqa_test.jsonl")
        )
    configs = out / "configs"
    for name in ("predict_base", "train", "predict_tuned", "predict_merged"):
        load_config("train", configs / f"{name}.yaml")  # raises on anything `eqakit train` would refuse
    load_config("export", configs / "merge.yaml")
    assert load_config("train", configs / "train.yaml").training.num_train_epochs == 6


@pytest.mark.slow
def test_the_base_model_is_the_untouched_random_model(demo: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = demo
    fresh = build_tiny_model(tmp_path / "fresh", seed=0, **TINY_SIZES)
    assert _sha(out / "model" / "model.safetensors") == _sha(fresh / "model.safetensors")
    assert _sha(out / "merged" / "model.safetensors") != _sha(fresh / "model.safetensors")


@pytest.mark.slow
def test_merged_model_gives_the_adapters_answers(demo: tuple[Path, dict]) -> None:
    out, results = demo
    tuned = {r["question_id"]: r["predict"] for r in _jsonl(out / "tuned" / "generated_predictions.jsonl")}
    merged = {
        r["question_id"]: r["predict"] for r in _jsonl(out / "merged_eval" / "generated_predictions.jsonl")
    }
    assert merged == tuned
    assert results["merged_agrees"]


@pytest.mark.slow
def test_rerun_skips_every_stage_in_seconds(demo: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    out, results = demo
    adapter = out / "lora" / "adapter_model.safetensors"
    stamp = adapter.stat().st_mtime_ns
    capsys.readouterr()
    started = time.perf_counter()
    assert main(["demo", "--output-dir", str(out), *ARGS]) == 0
    assert time.perf_counter() - started < 30
    printed = capsys.readouterr().out
    assert printed.count("(done, skipped)") == 7
    assert f"{results['tuned']['predict_exact_match']:.2f}" in printed
    assert "yes  fine-tuned exact match beats the blind baseline" in printed
    assert adapter.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_other_options_refuse_to_resume(demo: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    out, _ = demo
    assert main(["demo", "--output-dir", str(out), "--episodes", "81", "--seed", "0", "--epochs", "6"]) == 1
    error = capsys.readouterr().err
    assert "--episodes 80" in error and "--fresh" in error
    assert json.loads((out / "demo.json").read_text()) == OPTIONS


def test_fresh_refuses_a_directory_that_is_not_a_demo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    assert main(["demo", "--output-dir", str(tmp_path), "--fresh"]) == 1
    assert "does not look like a demo directory" in capsys.readouterr().err
    assert keep.read_text() == "mine"


@pytest.mark.slow
def test_the_console_stays_short_and_the_report_and_log_keep_the_rest(
    demo: tuple[Path, dict], capsys: pytest.CaptureFixture
) -> None:
    """466 lines with 179 raw loss records were printed; now the stages' prints go to demo.log and
    report.md holds the summary, the loss curve and answers side by side."""
    out, _ = demo
    log = (out / "demo.log").read_text(encoding="utf-8")
    assert "'loss'" in log and "data: " in log and "===== [5/7] fine-tune with LoRA =====" in log
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "![training loss](lora/training_loss.png)" in report
    assert "| question | reference | base | fine-tuned |" in report and "random weights" in report
    capsys.readouterr()
    assert main(["demo", "--output-dir", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "'loss'" not in printed and len(printed.splitlines()) < 60


def test_the_summary_says_what_the_numbers_mean() -> None:
    """A random base, synthetic rooms, and the categories where the tuned model is below blind."""
    from eqakit.demo.pipeline import _summary

    def scores(em: float, per: dict[str, float]) -> dict:
        return {
            **dict.fromkeys(METRICS, em),
            "num_samples": 10,
            "predict_per_category": {c: {"predict_exact_match": v} for c, v in per.items()},
        }

    base = scores(0.0, {"counting": 0.0, "spatial": 0.0})
    tuned = scores(40.0, {"counting": 60.0, "spatial": 10.0})
    blind = scores(20.0, {"counting": 20.0, "spatial": 30.0})
    verdict = {"beats_base": True, "beats_blind": True, "merged_agrees": True}
    text = "\n".join(_summary(base, tuned, blind, (10, 10), verdict, Path("runs/demo/configs/infer.yaml")))
    assert "random weights" in text and "synthetic" in text
    assert "in 1 of 2 categories it is still below the blind baseline (spatial)" in text
    assert [line for line in text.splitlines() if "below blind" in line] == [
        next(line for line in text.splitlines() if line.strip().startswith("spatial"))
    ]
