"""Issue 27: the demo's report.md shows the web UI's tabs on that demo, or says how to take them.

`eqakit demo` must not need Chromium, so the report embeds screenshots only when they exist in the
demo dir (docs/screenshots.py --out DEMO/screenshots takes them); the report is built from a demo
dir's files, so a few files stand in for a finished demo here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from eqakit.demo.pipeline import _report


def finished_demo(out: Path) -> Path:
    """The files `_report` reads from a finished demo: the base and tuned answers, the loss curve."""
    for name, answer in (("base", "cabinet"), ("tuned", "Red")):
        row = {
            "index": 0,
            "prompt": "<|im_start|>user\nWhat color?<|im_end|>",
            "label": "Red",
            "predict": answer,
        }
        (out / name).mkdir(parents=True)
        (out / name / "generated_predictions.jsonl").write_text(json.dumps(row) + "\n")
    (out / "lora").mkdir()
    (out / "lora" / "training_loss.png").write_bytes(b"png")
    return out


def test_the_report_says_how_to_take_screenshots_until_there_are_some(tmp_path: Path) -> None:
    out = finished_demo(tmp_path / "demo")
    report = _report(out, ["summary"])
    assert "![training loss](lora/training_loss.png)" in report
    assert f"docs/screenshots.py {out} --out {out / 'screenshots'}" in report
    assert "![webui-" not in report


def test_the_report_embeds_the_screenshots_in_the_order_they_were_taken(tmp_path: Path) -> None:
    """docs/screenshots.py takes the tabs in the page's order; the report keeps it (not the alphabet's)."""
    out = finished_demo(tmp_path / "demo")
    (out / "screenshots").mkdir()
    for age, tab in enumerate(("chat", "train", "evaluate")):
        shot = out / "screenshots" / f"webui-{tab}.png"
        shot.write_bytes(b"png")
        os.utime(shot, (1_000_000 + age, 1_000_000 + age))
    report = _report(out, ["summary"])
    shown = [line for line in report.splitlines() if line.startswith("![webui-")]
    assert shown == [
        "![webui-chat](screenshots/webui-chat.png)",
        "![webui-train](screenshots/webui-train.png)",
        "![webui-evaluate](screenshots/webui-evaluate.png)",
    ]
    assert "docs/screenshots.py" not in report
    assert report.index("training loss") < report.index("webui-chat") < report.index("Answers to the first")
