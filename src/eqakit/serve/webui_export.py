"""The web UI's Export tab: merge an adapter into its base model and write the result (`eqakit export`).

The page's fields are the export config's keys (model_name_or_path, adapter_name_or_path, template,
export_dir, export_size, overwrite_output_dir), checked by the config loader before anything runs,
so a bad value is the CLI's own message. The export itself is `eqakit export` in a process of its
own: the page stays responsive, the merge's memory is returned when it ends, and its log (which
adapter is being merged, the shards being written) is shown as it goes. Writing is atomic, so an
export stopped half-way leaves no export_dir that looks complete.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

from eqakit.config import load_config
from eqakit.config.args import ModelArguments
from eqakit.data.template import TEMPLATES
from eqakit.errors import EqakitError
from eqakit.serve.webui_model import UIError, error_line

LOG_LINES = 12  # log lines the page shows while an export runs


def export_keys(
    base: str, adapter: str, template: str, export_dir: str, shard_gb: float, overwrite: bool
) -> dict[str, Any]:
    """The export config the fields stand for, checked as `eqakit export` checks it (raises UIError)."""
    keys = {
        "model_name_or_path": base.strip() or None,
        "adapter_name_or_path": adapter.strip() or None,
        "template": template,
        "export_dir": export_dir.strip() or None,
        "export_size": shard_gb,
        "overwrite_output_dir": overwrite,
    }
    try:
        load_config("export", None, None, keys)
    except EqakitError as exc:
        raise UIError(str(exc)) from None
    return {k: v for k, v in keys.items() if v is not None}


class Exporter:
    """Runs one `eqakit export` at a time and reports its log lines as they come."""

    def __init__(self) -> None:
        self._busy = threading.Lock()

    def run(self, keys: dict[str, Any]) -> Iterator[str]:
        """Log tails while the export runs, then its summary line; raises UIError when it fails."""
        if not self._busy.acquire(blocking=False):
            raise UIError("an export is already running; wait for it to finish")
        try:
            with tempfile.TemporaryDirectory(prefix="eqakit-webui-export-") as tmp:
                config = Path(tmp) / "export.yaml"
                config.write_text(yaml.safe_dump(keys, sort_keys=True), encoding="utf-8")
                process = subprocess.Popen(
                    [sys.executable, "-m", "eqakit", "export", str(config)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                )
                lines: deque[str] = deque(maxlen=200)
                reader = threading.Thread(target=_read, args=(process, lines), daemon=True)
                reader.start()
                while process.poll() is None:
                    yield "\n".join(list(lines)[-LOG_LINES:])
                    time.sleep(0.5)
                reader.join(timeout=10)
            shown = [line for line in lines if line.strip()]
            if process.returncode != 0:
                raise UIError(
                    shown[-1] if shown else f"eqakit export exited with status {process.returncode}"
                )
            yield next((line for line in reversed(shown) if line.startswith("wrote ")), shown[-1])
        finally:
            self._busy.release()


def _read(process: subprocess.Popen, lines: deque[str]) -> None:
    """Collect the process's output; progress bars rewrite their line with \\r, so that splits too."""
    assert process.stdout is not None
    for chunk in process.stdout:
        lines.extend(part.rstrip() for part in chunk.replace("\r", "\n").split("\n") if part.strip())


def build_export_tab(base: str, adapter: str, template: str) -> None:
    """The Export tab (inside the caller's gr.Blocks); fields default to the web UI's config."""
    exporter = Exporter()
    with gr.Tab("Export"):
        gr.Markdown("Merge a LoRA adapter into its base model and write one self-contained model directory.")
        with gr.Row(equal_height=True):
            base_box = gr.Textbox(base, label="Base model path", scale=3, elem_id="exp-base")
            adapter_box = gr.Textbox(
                adapter, label="Adapter path(s), comma-separated", scale=3, elem_id="exp-adapter"
            )
            template_box = gr.Dropdown(
                list(TEMPLATES), value=template, label="Template", scale=2, elem_id="exp-template"
            )
        with gr.Row(equal_height=True):
            dir_box = gr.Textbox(label="Export dir", scale=3, elem_id="exp-dir")
            size_box = gr.Number(
                ModelArguments.export_size,
                label="Shard size (GB, export_size)",
                minimum=0.001,
                scale=1,
                elem_id="exp-size",
            )
            overwrite_box = gr.Checkbox(
                False, label="Replace a non-empty export dir (overwrite_output_dir)", elem_id="exp-overwrite"
            )
            export_btn = gr.Button("Export", variant="primary", scale=1, elem_id="exp-btn")
        status = gr.Markdown(elem_id="exp-status")
        log = gr.Textbox(
            label="Progress", lines=LOG_LINES, max_lines=LOG_LINES, interactive=False, elem_id="exp-log"
        )

        def export(*fields: Any) -> Iterator[tuple[str, str]]:
            try:
                keys = export_keys(*fields)
                yield "Exporting…", ""
                tail = ""
                for tail in exporter.run(keys):
                    if not tail.startswith("wrote "):
                        yield "Exporting…", tail
                yield f"Done: {tail}", gr.skip()
            except UIError as exc:
                yield error_line(exc), gr.skip()

        export_btn.click(
            export, [base_box, adapter_box, template_box, dir_box, size_box, overwrite_box], [status, log]
        )
