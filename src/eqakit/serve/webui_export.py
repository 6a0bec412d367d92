"""The web UI's Export tab: merge an adapter into its base model and write the result (`eqakit export`).

The page's fields are the export config's keys (model_name_or_path, adapter_name_or_path, template,
export_dir, export_size, overwrite_output_dir), checked by the config loader before anything runs,
so a bad value is the CLI's own message. The export itself is `eqakit export` in a process of its
own (`eqakit.serve.webui_jobs`), its log shown as it goes (which adapter is being merged, the
shards being written), and a warning it prints (an adapter trained on another path than the base)
shown in the status line. Writing is atomic, so an export stopped half-way leaves no export_dir that
looks complete. The export_dir must lie inside the page's `WriteRoots`.

The adapter starts as the config's, else the newest under the runs dir (its final adapter, or
its newest complete checkpoint while it trains); each run's checkpoints are offered beside its
final adapter. The base model starts as the base that adapter records, else the base the loaded
model was exported from, and follows the adapter chosen (the base its adapter_config.json
records): merging an adapter into a model that already holds it, the easy mistake when the loaded
model is an export, is not the default. An export that is done is one click from the Chat tab
("Load in Chat").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from eqakit.config import load_config
from eqakit.config.args import ModelArguments
from eqakit.data.template import TEMPLATES
from eqakit.errors import EqakitError
from eqakit.serve.webui_access import WriteRoots
from eqakit.serve.webui_jobs import LOG_LINES, Job, tail, warnings
from eqakit.serve.webui_model import UIError, error_line
from eqakit.serve.webui_paths import Workspace, adapter_base, adapter_choices, export_base, proposed

REPLACE = "Replace a non-empty export dir"  # the checkbox, named by the message that needs it


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


def check_export_dir(export_dir: str, overwrite: bool) -> None:
    """Refuse, in the page's words, an export dir that holds files when "Replace" is not ticked (the
    CLI refuses it too, naming its config key)."""
    target = Path(export_dir.strip()).expanduser()
    content = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if content and not overwrite:
        shown = ", ".join(content[:5]) + (", ..." if len(content) > 5 else "")
        raise UIError(
            f"export dir {target} exists and is not empty (it holds {shown}): tick "
            f'"{REPLACE}" to replace it, or choose another export dir'
        )


def local_base(adapter: str) -> str | None:
    """The base the (first) adapter records, when that model exists here (a hub id does not)."""
    recorded = adapter_base(adapter.split(",")[0])
    return recorded if recorded and Path(recorded).expanduser().exists() else None


def follow_base(adapter: str, base: str) -> tuple[Any, str]:
    """(the base model field, a note): the base the chosen adapter was trained on, when it records
    one that exists here and the field names another model. Merging into another model (an export
    that already holds this adapter, say) is rarely meant; the user may still type it back."""
    recorded = local_base(adapter)
    if not recorded or recorded == base.strip():
        return gr.skip(), ""
    why = f" ({base.strip()} is an export with its adapters merged in)" if export_base(base.strip()) else ""
    return recorded, f"Base model set to {recorded}, the model the adapter was trained on{why}."


def build_export_tab(roots: WriteRoots, place: Workspace, template: str) -> tuple[gr.Button, gr.State]:
    """The Export tab (inside the caller's gr.Blocks); fields start from ``place`` (the base model,
    not a model that already holds an adapter); the merged model is written inside ``roots``.
    Returns the "Load in Chat" button and the state holding the export dir it loads."""
    job = Job("export")
    adapters = adapter_choices(place.root)
    adapter = proposed(adapters, place.adapter)
    with gr.Tab("Export") as tab:
        gr.Markdown("Merge a LoRA adapter into its base model and write one self-contained model directory.")
        with gr.Row(equal_height=True):
            adapter_box = gr.Dropdown(
                adapters,
                value=adapter,
                allow_custom_value=True,
                label="Adapter path(s), comma-separated (pick a run or checkpoint, or type a path)",
                scale=3,
                elem_id="exp-adapter",
            )
            base_box = gr.Textbox(
                (adapter and local_base(adapter)) or place.base,
                label="Base model path (the adapter's own base: choosing an adapter fills it in)",
                scale=3,
                elem_id="exp-base",
            )
            template_box = gr.Dropdown(
                list(TEMPLATES), value=template, label="Template", scale=2, elem_id="exp-template"
            )
        with gr.Row(equal_height=True):
            dir_box = gr.Textbox(place.propose("export"), label="Export dir", scale=3, elem_id="exp-dir")
            size_box = gr.Number(
                ModelArguments.export_size,
                label="Shard size (GB)",
                minimum=0.001,
                scale=1,
                elem_id="exp-size",
            )
            overwrite_box = gr.Checkbox(False, label=REPLACE, elem_id="exp-overwrite")
            export_btn = gr.Button("Export", variant="primary", scale=1, elem_id="exp-btn")
        status = gr.Markdown(elem_id="exp-status")
        exported = gr.State("")
        chat_btn = gr.Button("Load in Chat", visible=False, elem_id="exp-chat")
        log = gr.Textbox(
            label="Progress", lines=LOG_LINES, max_lines=LOG_LINES, interactive=False, elem_id="exp-log"
        )

        def export(base: str, adapter: str | None, *fields: Any) -> Iterator[tuple[Any, ...]]:
            hidden = gr.Button(visible=False)
            try:
                keys = export_keys(base, adapter or "", *fields)
                roots.check_keys(keys)
                yield "Exporting…", "", "", hidden
                check_export_dir(keys["export_dir"], keys["overwrite_output_dir"])
                lines: list[str] = []
                for lines in job.run(keys):
                    yield "Exporting…", tail(lines), "", hidden
                summary = next((line for line in reversed(lines) if line.startswith("wrote ")), lines[-1])
                said = warnings(lines)
                done = f"Done, with a warning: {' '.join(said)}\n\n{summary}" if said else f"Done: {summary}"
                yield done, tail(lines), keys["export_dir"], gr.Button(visible=True)
            except UIError as exc:
                yield error_line(exc), gr.skip(), "", hidden

        adapter_box.change(follow_base, [adapter_box, base_box], [base_box, status], show_progress="hidden")

        def relist(current: str | None) -> Any:
            """The adapters listed again: the chosen one kept, else the newest proposed."""
            found = adapter_choices(place.root)
            return gr.update(choices=found, value=proposed(found, current))

        tab.select(relist, adapter_box, adapter_box)
        export_btn.click(
            export,
            [base_box, adapter_box, template_box, dir_box, size_box, overwrite_box],
            [status, log, exported, chat_btn],
        )
    return chat_btn, exported
