"""Issue 27, "the first hour": the runs a user has made, as the web UI offers them.

A runs folder as weeks of work leave it: finished LoRA runs, one still training (checkpoints only),
a checkpoint a killed save left half-written, a base, a tuned and a cut-short predict run, and an
OpenEQA dataset dir. The Results and Export tabs propose the newest run; every adapter picker
offers each run's final adapter and its complete checkpoints, told apart; the Train tab resumes
from the checkpoint picked; the Results tab puts runs and the blind baseline side by side. A real
`eqakit webui` (started in that folder, no config) and headless Chromium.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import write_toy_dataset, write_toy_preferences
from eqakit.serve.webui_evaluate import NO_ADAPTER
from test_webui import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, wait_seen, watch, webui_server
from test_webui_first_hour import box, pick

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent"),
]

QUESTION = "<image><image>What color is the ball?"
CATEGORY = "attribute recognition"
BLIND = "blind baseline"  # the comparison's row for answering without the frames


def age(path: Path, minutes: int) -> None:
    """Make ``path`` look written ``minutes`` ago: the order the page proposes runs in."""
    when = 1_700_000_000 - 60 * minutes
    os.utime(path, (when, when))


def adapter(folder: Path, base: str, minutes: int, complete: bool = True) -> None:
    """What the page reads of a LoRA adapter or checkpoint: adapter_config.json (its recorded base),
    a checkpoint's trainer_state.json and, once the save finished, the trainer's completion marker."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    if folder.name.startswith("checkpoint-"):
        state = {"global_step": int(folder.name[11:]), "log_history": []}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        if complete:
            (folder / "eqakit_checkpoint_complete").write_text(folder.name[11:])
    age(folder / "adapter_config.json", minutes)


def predict_run(folder: Path, answers: list[str], minutes: int, exact_match: float | None) -> None:
    """A predict run's answers to the toy questions (Red, Green) and, when it finished, the scores
    `eqakit predict` wrote (``exact_match``; None: cut short, no predict_results.json)."""
    folder.mkdir(parents=True)
    rows = [
        {"prompt": f"<|im_start|>user\n{QUESTION}<|im_end|>", "predict": answer, "label": label}
        | {"category": CATEGORY}
        for answer, label in zip(answers, ["Red", "Green"], strict=True)
    ]
    (folder / "generated_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    age(folder / "generated_predictions.jsonl", minutes)
    if exact_match is not None:
        per_category = {CATEGORY: {"predict_exact_match": exact_match, "num_samples": 2}}
        results = {"predict_exact_match": exact_match, "predict_bleu-4": 1.5, "predict_samples": 2}
        (folder / "predict_results.json").write_text(
            json.dumps(results | {"predict_per_category": per_category})
        )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("runs-folder")
    data = write_toy_dataset(cwd / "data", episodes=2, questions=1)
    # prepare openeqa's splits: the blind baseline answers "Red", the most common training answer
    train = [
        {"instruction": QUESTION, "output": color, "category": CATEGORY} for color in ("Red", "Red", "Blue")
    ]
    test = [{"instruction": QUESTION, "output": color, "category": CATEGORY} for color in ("Red", "Green")]
    for name, rows in (("open_eqa_train_val", train), ("open_eqa_test", test)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for model in ("base", "other"):
        (cwd / "models" / model).mkdir(parents=True)
    runs = cwd / "runs"
    adapter(runs / "old-lora", "models/base", minutes=50)
    adapter(runs / "training" / "checkpoint-3", "models/base", minutes=30)  # a run still going
    adapter(runs / "new-lora" / "checkpoint-2", "models/other", minutes=20)
    adapter(runs / "new-lora" / "checkpoint-3", "models/base", minutes=15)
    adapter(runs / "new-lora" / "checkpoint-4", "models/base", minutes=5, complete=False)  # a killed save
    adapter(runs / "new-lora", "models/base", minutes=10)
    predict_run(runs / "base", ["cabinet", "cabinet"], minutes=40, exact_match=0.0)
    predict_run(runs / "cut", ["Red", "Red"], minutes=35, exact_match=None)
    predict_run(runs / "tuned", ["Red", "Green"], minutes=25, exact_match=100.0)
    return cwd


@pytest.fixture(scope="module")
def page(workdir: Path) -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api")
    with (
        webui_server([], workdir / "server.log", cwd=workdir) as url,
        sync_api.sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#chat-input textarea")
        yield page
        browser.close()


def options(page, elem_id: str) -> list[str]:
    """The entries a dropdown offers, as a user sees them when opening it (without the chosen one's ✓)."""
    box(page, elem_id).click()
    shown = page.locator(f"#{elem_id}").get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")
    box(page, elem_id).blur()  # a focused box does not open again on a click
    return [text.removeprefix("✓").strip() for text in shown]


def base_is(page, path: str) -> None:
    page.wait_for_function(
        "path => document.querySelector('#exp-base textarea, #exp-base input').value === path", arg=path
    )


def test_results_and_export_propose_the_newest_run(page) -> None:
    """Item 1: the newest predict run (not the first listed, not nothing) opens with one click; the
    Export tab starts on the newest adapter, with the base that adapter records."""
    page.get_by_role("tab", name="Results").click()
    assert box(page, "res-dir").input_value() == "runs/tuned"
    watch(page, "#res-notice")
    page.locator("#res-open").click()
    assert "2 predictions, 0 wrong" in wait_seen(page, "#res-notice", "predictions")

    page.get_by_role("tab", name="Export").click()
    assert box(page, "exp-adapter").input_value() == "runs/new-lora (final)"
    base_is(page, "models/base")


def test_adapter_pickers_offer_each_runs_complete_checkpoints(page) -> None:
    """Item 2: the Evaluate and Export tabs offer a run's final adapter and its complete checkpoints,
    labelled apart, newest run first; the checkpoint a killed save left is not offered. A picked
    checkpoint is the adapter used: its own recorded base follows."""
    offered = [
        "runs/new-lora (final)",
        "runs/new-lora/checkpoint-3",
        "runs/new-lora/checkpoint-2",
        "runs/training/checkpoint-3",
        "runs/old-lora (final)",
    ]
    page.get_by_role("tab", name="Evaluate").click()
    assert options(page, "ev-adapter") == ["none (the model alone)", *offered]

    page.get_by_role("tab", name="Export").click()
    assert options(page, "exp-adapter") == offered
    watch(page, "#exp-status")
    pick(page, "exp-adapter", "runs/new-lora/checkpoint-2")
    base_is(page, "models/other")
    assert "models/other, the model the adapter was trained on" in wait_seen(
        page, "#exp-status", "trained on"
    )


def test_train_tab_resumes_from_the_checkpoint_picked(page, tiny_model_dir: Path) -> None:
    """Item 2: the Train tab lists the output dir's complete checkpoints, the newest proposed, and
    Resume continues from the one picked: `eqakit train` loads it (and, the stand-in checkpoint
    holding no weights, says it cannot)."""
    page.get_by_role("tab", name="Train").click()
    box(page, "tr-model_name_or_path").fill(str(tiny_model_dir))
    box(page, "tr-dataset").fill("toy")
    box(page, "tr-output_dir").fill("runs/new-lora")
    box(page, "tr-output_dir").press("Tab")
    page.wait_for_function(
        "() => document.querySelector('#tr-resume-from input').value === 'runs/new-lora/checkpoint-3'"
    )
    assert options(page, "tr-resume-from") == ["runs/new-lora/checkpoint-3", "runs/new-lora/checkpoint-2"]
    pick(page, "tr-resume-from", "runs/new-lora/checkpoint-2")

    watch(page, "#tr-notice")
    page.locator("#tr-resume").click()
    assert "from runs/new-lora/checkpoint-2" in wait_seen(page, "#tr-notice", "Resumed")
    page.wait_for_function(
        "() => document.querySelector('#tr-status').innerText.includes('Error')", timeout=120_000
    )
    status = page.locator("#tr-status").inner_text()
    assert "valid checkpoint at runs/new-lora/checkpoint-2" in status, status


def test_train_tab_offers_dpo_and_full_tuning(workdir: Path, page, tiny_model_dir: Path) -> None:
    """Issue 25: the Train tab's Stage and Method dropdowns run `stage: dpo` with full tuning on a
    preference dataset: the LoRA keys the form shows stay out of that run, the run finishes with a
    whole model and LLaMA-Factory's DPO metrics in trainer_log.jsonl; "Evaluate this run" hands the
    model itself to the Evaluate tab."""
    write_toy_preferences(workdir / "prefs", episodes=2, questions=1)
    page.get_by_role("tab", name="Train").click()
    box(page, "tr-model_name_or_path").fill(str(tiny_model_dir))
    box(page, "tr-dataset_dir").fill("prefs")
    box(page, "tr-dataset").fill("prefs")
    box(page, "tr-output_dir").fill("runs/dpo-full")
    assert options(page, "tr-stage") == ["sft", "dpo"]
    pick(page, "tr-stage", "dpo")
    pick(page, "tr-finetuning_type", "full")
    pick(page, "tr-pref_loss", "orpo")
    box(page, "tr-num_train_epochs").fill("1")
    box(page, "tr-per_device_train_batch_size").fill("2")
    box(page, "tr-logging_steps").fill("1")
    watch(page, "#tr-notice")
    page.locator("#tr-start").click()
    assert "Started" in wait_seen(page, "#tr-notice", "Started"), page.locator("#tr-notice").inner_text()
    page.wait_for_function(
        "() => document.querySelector('#tr-status').innerText.includes('Finished')", timeout=120_000
    )
    assert "the model is in" in page.locator("#tr-status").inner_text()
    out = workdir / "runs" / "dpo-full"
    assert (out / "model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert "rewards/accuracies" in records[0] and "odds_ratio_loss" in records[0]
    ran = (out / "eqakit_config.yaml").read_text()
    assert "stage: dpo" in ran and "finetuning_type: full" in ran and "lora_rank" not in ran
    # a whole trained model goes to Evaluate as the model, with no adapter
    page.locator("#tr-evaluate").click()
    page.wait_for_function(
        "() => document.querySelector('#ev-model input, #ev-model textarea')?.value?.endsWith('runs/dpo-full')"
    )
    assert box(page, "ev-adapter").input_value() == NO_ADAPTER[0]


def test_results_tab_puts_runs_and_the_blind_baseline_side_by_side(workdir: Path, page) -> None:
    """Item 3: one row per predict run (the newest, oldest first; a cut-short run scored from its
    answers), the blind baseline of the dataset dir, exact match per category; picking changes it,
    and a run made since (in the Evaluate tab, say) joins it when the tab is opened again."""
    page.get_by_role("tab", name="Results").click()
    table = "#res-compare-table"
    page.wait_for_function(f"() => document.querySelector('{table}').innerText.includes('{BLIND}')")
    rows = page.locator(f"{table} table").first.locator("tbody tr").all_inner_texts()
    cells = [row.split("\t") for row in rows]
    assert [c[0] for c in cells] == ["runs/base", "runs/cut (unfinished)", "runs/tuned", BLIND]
    em = page.locator(f"{table} table").first.locator("thead th").all_inner_texts().index("EM")
    assert [c[em] for c in cells] == ["0.00", "50.00", "100.00", "50.00"]
    per_category = page.locator(f"{table} table").nth(1).locator("tbody tr").all_inner_texts()
    assert per_category == ["\t".join([CATEGORY, "0.00", "50.00", "100.00", "50.00"])]

    page.locator("#res-compare .token", has_text="runs/cut").locator(".token-remove").click()
    page.wait_for_function(f"() => !document.querySelector('{table}').innerText.includes('runs/cut')")
    rows = page.locator(f"{table} table").first.locator("tbody tr").all_inner_texts()
    assert [row.split("\t")[0] for row in rows] == ["runs/base", "runs/tuned", BLIND]

    predict_run(workdir / "runs" / "merged", ["Red", "Green"], minutes=1, exact_match=100.0)
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("tab", name="Results").click()
    page.wait_for_function(f"() => document.querySelector('{table}').innerText.includes('runs/merged')")
    rows = page.locator(f"{table} table").first.locator("tbody tr").all_inner_texts()
    assert [row.split("\t")[0] for row in rows] == ["runs/base", "runs/tuned", "runs/merged", BLIND]
    assert box(page, "res-dir").input_value() == "runs/tuned"  # the run the user had open stays
