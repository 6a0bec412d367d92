"""Issue 27, "The first hour": the web UI started on a demo-like run folder, as a new user starts it.

``eqakit webui runs/demo/configs/infer.yaml`` (relative paths, the config naming only the merged
model) must take every path from what that config leads to, offer the runs that exist, refuse a
wrong export before it is built and speak the page's words. A real server and headless Chromium.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_toy_dataset
from eqakit.serve.webui_jobs import Command
from test_webui import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, wait_seen, watch, webui_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent"),
]


@pytest.fixture(scope="module")
def demo(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working dir holding runs/demo as `eqakit demo` leaves it: model, data, a LoRA run with its
    eqakit_config.yaml, the merged export (eqakit_export.json), a predict run and configs/infer.yaml."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    cwd = tmp_path_factory.mktemp("first-hour")
    runs = Path("runs/demo")
    shutil.copytree(tiny_model_dir, cwd / runs / "model")
    write_toy_dataset(cwd / runs / "data", episodes=1, questions=2)
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(cwd / runs / "model", dtype=torch.float32)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(cwd / runs / "lora")
    settings = json.loads((cwd / runs / "lora" / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(runs / "model")  # as the demo records it: relative
    (cwd / runs / "lora" / "adapter_config.json").write_text(json.dumps(settings))
    trained = {
        "model_name_or_path": str(runs / "model"),
        "dataset_dir": str(runs / "data"),
        "dataset": "toy",
        "template": "qwen3_vl_nothink",
        "output_dir": str(runs / "lora"),
        "lora_rank": 4,
    }
    (cwd / runs / "lora" / "eqakit_config.yaml").write_text(yaml.safe_dump(trained))
    shutil.copytree(tiny_model_dir, cwd / runs / "merged")
    record = {"base_model": str(runs / "model"), "adapters": [{"path": str(runs / "lora"), "sha256": "x"}]}
    (cwd / runs / "merged" / "eqakit_export.json").write_text(json.dumps(record))
    rows = json.loads((cwd / runs / "data" / "dataset_info.json").read_text())
    samples = [json.loads(line) for line in (cwd / runs / "data" / "toy.jsonl").read_text().splitlines()]
    predictions = [
        {"prompt": "<|im_start|>user\nWhat color is the ball?<|im_end|>", "predict": "Red", "label": "Green"}
        | {"category": "attribute recognition", "images": s.get("images", [])}
        for s in samples
    ]
    (cwd / runs / "tuned").mkdir()
    (cwd / runs / "tuned" / "generated_predictions.jsonl").write_text(
        "".join(json.dumps(p) + "\n" for p in predictions)
    )
    assert "toy" in rows
    (cwd / runs / "configs").mkdir()
    (cwd / runs / "configs" / "infer.yaml").write_text(
        f"model_name_or_path: {runs / 'merged'}\ntemplate: qwen3_vl_nothink\nfinetuning_type: lora\n"
    )
    return cwd


@pytest.fixture(scope="module")
def page(demo: Path) -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api")
    server = webui_server(["runs/demo/configs/infer.yaml"], demo / "server.log", cwd=demo)
    with server as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#chat-input textarea")
        yield page
        browser.close()


def box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def pick(page, elem_id: str, option: str) -> None:
    """Choose ``option`` in a dropdown, as a user does: open it and click the entry."""
    box(page, elem_id).click()
    page.locator(f"#{elem_id}").get_by_role("option", name=option, exact=True).click()


def test_every_default_path_comes_from_the_config(demo: Path, page) -> None:
    """Item 4: the OpenEQA, Train, Evaluate, Results and Export tabs start from the run folder the
    config leads to (the merged model's base, its adapter's dataset dir), not from `data`."""
    data = "runs/demo/data"
    page.get_by_role("tab", name="OpenEQA").click()
    assert box(page, "eqa-dir").input_value() == data

    page.get_by_role("tab", name="Train").click()
    assert box(page, "tr-dataset_dir").input_value() == data
    assert box(page, "tr-model_name_or_path").input_value() == "runs/demo/model"  # not the export
    assert box(page, "tr-output_dir").input_value().startswith("runs/demo/train-")
    assert box(page, "tr-lora_rank").input_value() == "4"  # the adapter's own training config
    page.wait_for_function("() => document.querySelector('#tr-datasets').innerText.includes('toy')")
    assert "Error" not in page.locator("#tr-datasets").inner_text()
    # "empty: default" fields are empty, not 0
    assert box(page, "tr-lora_alpha").input_value() == ""
    assert box(page, "tr-eval_steps").input_value() == ""

    page.get_by_role("tab", name="Evaluate").click()
    assert box(page, "ev-data").input_value() == data
    assert box(page, "ev-split").input_value() == "toy"  # the dataset the dir registers
    assert box(page, "ev-out").input_value().startswith("runs/demo/predict-")
    box(page, "ev-adapter").click()
    assert "runs/demo/lora (final)" in page.locator("#ev-adapter").get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")

    page.get_by_role("tab", name="Results").click()
    assert box(page, "res-data").input_value() == data
    assert box(page, "res-dir").input_value() == "runs/demo/tuned"  # the newest run, proposed
    watch(page, "#res-notice")
    page.locator("#res-open").click()
    wait_seen(page, "#res-notice", "2 predictions")
    page.wait_for_function("() => document.querySelector('#res-answer textarea').value === 'Red'")
    page.wait_for_function("() => document.querySelectorAll('#res-frames img').length >= 1")
    assert "What color is the ball?" in page.locator("#res-question-text").inner_text()

    page.get_by_role("tab", name="Export").click()
    assert box(page, "exp-adapter").input_value() == "runs/demo/lora (final)"  # the newest adapter
    assert box(page, "exp-base").input_value() == "runs/demo/model"


def test_export_follows_the_adapters_base_and_shows_its_warning(demo: Path, page) -> None:
    """Item 1: the base follows the adapter chosen (not the export that already holds it); a base on
    another path exports "Done, with a warning"; a used export dir names the checkbox; Load in Chat."""
    page.get_by_role("tab", name="Export").click()
    box(page, "exp-adapter").fill("")  # choose it afresh: the tab proposes it already
    box(page, "exp-adapter").press("Tab")
    box(page, "exp-base").fill("runs/demo/merged")
    box(page, "exp-base").press("Tab")
    pick(page, "exp-adapter", "runs/demo/lora (final)")
    page.wait_for_function(
        "() => document.querySelector('#exp-base textarea, #exp-base input').value === 'runs/demo/model'"
    )
    assert "trained on" in page.locator("#exp-status").inner_text()

    taken = demo / "runs/demo/taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    box(page, "exp-dir").fill("runs/demo/taken")
    watch(page, "#exp-status")
    page.locator("#exp-btn").click()
    status = wait_seen(page, "#exp-status", "Error")
    assert 'tick "Replace a non-empty export dir"' in status and "overwrite_output_dir" not in status, status

    shutil.copytree(demo / "runs/demo/model", demo / "runs/demo/model-copy")
    box(page, "exp-base").fill("runs/demo/model-copy")
    box(page, "exp-dir").fill("runs/demo/exported")
    watch(page, "#exp-status")
    page.locator("#exp-btn").click()
    status = wait_seen(page, "#exp-status", "Done", after="Exporting")
    assert status.startswith("Done, with a warning: adapter") and "was trained on 'runs/demo/model'" in status
    assert "wrote runs/demo/exported" in status
    assert "\x1b" not in page.locator("#exp-log textarea").input_value()

    watch(page, "#model-status")
    page.locator("#exp-chat").click()
    assert "runs/demo/exported" in wait_seen(page, "#model-status", "Model loaded", after="Loading")
    assert box(page, "model-path").input_value() == "runs/demo/exported"


def test_log_lines_lose_terminal_codes(tmp_path: Path) -> None:
    """Item 5: a nested progress bar's cursor moves (ESC [A) and colours never reach a log pane."""
    command = Command.__new__(Command)  # the log reader alone, no process
    command.log = tmp_path / "log.txt"
    command.log.write_bytes(b"merging 1/2\r\x1b[A\x1b[2Kshard 3/4 \x1b[32mok\x1b[0m\n")
    assert command.lines() == ["merging 1/2", "shard 3/4 ok"]
