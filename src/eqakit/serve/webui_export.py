"""The web UI's Export tab: merge an adapter into its base model and write the result (`eqakit export`).

The page's fields are the export config's keys (model_name_or_path, adapter_name_or_path, template,
export_dir, export_size, overwrite_output_dir), checked by the config loader before anything runs,
so a bad value is the CLI's own message. The export itself is `eqakit export` in a process of its
own (`eqakit.serve.webui_jobs`), its log shown as it goes (which adapter is being merged, the
shards being written). Writing is atomic, so an export stopped half-way leaves no export_dir that
looks complete. The export_dir must lie inside the page's `WriteRoots`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from eqakit.config import load_config
from eqakit.config.args import ModelArguments
from eqakit.data.template import TEMPLATES
from eqakit.errors import EqakitError
from eqakit.serve.webui_access import WriteRoots
from eqakit.serve.webui_jobs import LOG_LINES, Job, tail
from eqakit.serve.webui_model import UIError, error_line


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


def build_export_tab(roots: WriteRoots, base: str, adapter: str, template: str) -> None:
    """The Export tab (inside the caller's gr.Blocks); fields default to the web UI's config; the
    merged model is written inside ``roots``."""
    job = Job("export")
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
                roots.check_keys(keys)
                yield "Exporting…", ""
                lines: list[str] = []
                for lines in job.run(keys):
                    yield "Exporting…", tail(lines)
                summary = next((line for line in reversed(lines) if line.startswith("wrote ")), lines[-1])
                yield f"Done: {summary}", tail(lines)
            except UIError as exc:
                yield error_line(exc), gr.skip()

        export_btn.click(
            export, [base_box, adapter_box, template_box, dir_box, size_box, overwrite_box], [status, log]
        )
