"""The web UI's Evaluate tab: predict on a dataset with a model (and adapter), then its score tables.

The fields are predict's config keys (model_name_or_path, adapter_name_or_path, template,
dataset_dir, eval_dataset, output_dir, per_device_eval_batch_size, and the page's generation
settings), checked by the config loader first, so a bad value is the CLI's message. The run is
`eqakit train` with ``do_predict: true`` in a process of its own (`eqakit.serve.webui_jobs`), its
progress shown as it goes; it resumes an interrupted run in the same output_dir as the CLI does.
At the end the overall and per-category tables (BLEU-4, ROUGE, exact match, token F1) of its
predictions are shown; the Results tab opens the same output_dir question by question. The
output_dir must lie inside the page's `WriteRoots`.

The fields start from the web UI's config (`eqakit.serve.webui_paths.Workspace`): its model and
adapter, the dataset dir it leads to, a new timestamped output dir. The adapter and the dataset are
picked from what exists (each run's final adapter and complete checkpoints under the runs dir, the
datasets dataset_info.json registers) or typed; the Train tab's "Evaluate this run" fills the
model and adapter in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from eqakit.config import load_config
from eqakit.data.template import TEMPLATES, THINK
from eqakit.errors import EqakitError
from eqakit.evaluate.metrics import score_predictions
from eqakit.evaluate.report import scores_markdown
from eqakit.serve.webui_access import WriteRoots
from eqakit.serve.webui_jobs import LOG_LINES, Job, tail
from eqakit.serve.webui_model import UIError, error_line
from eqakit.serve.webui_paths import Workspace, adapter_choices, find_datasets
from eqakit.serve.webui_results import read_predictions

DEFAULT_SPLIT = "open_eqa_test"
NO_ADAPTER = ("none (the model alone)", "")  # the adapter choice that evaluates the model itself


def predict_keys(
    model: str,
    adapter: str,
    template: str,
    dataset_dir: str,
    dataset: str,
    output_dir: str,
    batch_size: float,
    max_new_tokens: float,
    temperature: float,
    top_p: float,
    thinking: bool,
) -> dict[str, Any]:
    """The predict config the fields stand for, checked as `eqakit train` checks it (raises UIError)."""
    keys: dict[str, Any] = {
        "stage": "sft",
        "do_predict": True,
        "predict_with_generate": True,
        "finetuning_type": "lora",
        "model_name_or_path": model.strip() or None,
        "adapter_name_or_path": adapter.strip() or None,
        "template": template,
        "dataset_dir": dataset_dir.strip() or None,
        "eval_dataset": dataset.strip() or None,
        "output_dir": output_dir.strip() or None,
        "per_device_eval_batch_size": int(batch_size),
        "max_new_tokens": int(max_new_tokens),
        "temperature": float(temperature),  # 0: greedy, as everywhere
        "top_p": float(top_p),
        "report_to": "none",
    }
    if template == THINK:
        keys["enable_thinking"] = bool(thinking)
    try:
        load_config("train", None, None, keys)
    except EqakitError as exc:
        raise UIError(str(exc)) from None
    return {k: v for k, v in keys.items() if v is not None}


def default_split(names: list[str]) -> str:
    """The dataset proposed among ``names``: OpenEQA's test split when registered, else the first."""
    return DEFAULT_SPLIT if DEFAULT_SPLIT in names or not names else names[0]


def split_choices(dataset_dir: str, chosen: str | None) -> Any:
    """The dataset dropdown for a dataset dir: the datasets it registers, ``chosen`` kept if among them."""
    names = find_datasets(dataset_dir)
    return gr.update(choices=names, value=chosen if chosen in names else default_split(names))


def build_evaluate_tab(
    roots: WriteRoots, place: Workspace, template: str, settings: list[Any]
) -> tuple[gr.Textbox, gr.Dropdown]:
    """The Evaluate tab (inside the caller's gr.Blocks); ``place`` gives the fields' start; ``settings``
    are the page's generation controls (max new tokens, temperature, top-p, thinking); predictions
    are written inside ``roots``. Returns the model and adapter fields (the Train tab fills them)."""
    job = Job("train")
    names = find_datasets(place.dataset_dir)
    with gr.Tab("Evaluate", id="evaluate") as tab:
        gr.Markdown("Predict on a dataset (`eqakit train` with `do_predict: true`) and score the answers.")
        with gr.Row(equal_height=True):
            model_box = gr.Textbox(
                place.model, label="Model path (base or merged)", scale=3, elem_id="ev-model"
            )
            adapter_box = gr.Dropdown(
                [NO_ADAPTER, *adapter_choices(place.root)],
                value=place.adapter,
                allow_custom_value=True,
                label="Adapter path (optional: pick a run or checkpoint, or type a path)",
                scale=3,
                elem_id="ev-adapter",
            )
            template_box = gr.Dropdown(
                list(TEMPLATES), value=template, label="Template", scale=2, elem_id="ev-template"
            )
        with gr.Row(equal_height=True):
            data_box = gr.Textbox(place.dataset_dir, label="Dataset dir", scale=3, elem_id="ev-data")
            split_box = gr.Dropdown(
                names,
                value=default_split(names),
                allow_custom_value=True,
                label="Dataset",
                scale=2,
                elem_id="ev-split",
            )
            out_box = gr.Textbox(place.propose("predict"), label="Output dir", scale=3, elem_id="ev-out")
            batch_box = gr.Number(2, label="Batch size", minimum=1, precision=0, scale=1, elem_id="ev-batch")
            run_btn = gr.Button("Run predict", variant="primary", scale=1, elem_id="ev-run")
        status = gr.Markdown(elem_id="ev-status")
        log = gr.Textbox(
            label="Progress", lines=LOG_LINES, max_lines=LOG_LINES, interactive=False, elem_id="ev-log"
        )
        table = gr.Markdown(elem_id="ev-table")

        def evaluate(model: str, adapter: str | None, *fields: Any) -> Iterator[tuple[str, str, str]]:
            try:
                keys = predict_keys(model, adapter or "", *fields)
                roots.check_keys(keys)
                yield "Predicting…", "", ""
                lines: list[str] = []
                for lines in job.run(keys):
                    yield "Predicting…", tail(lines), gr.skip()
                rows = read_predictions(keys["output_dir"])
                summary = scores_markdown(score_predictions(rows))
                done = f"Done: {len(rows)} predictions in {keys['output_dir']} (the Results tab opens them)"
                yield done, tail(lines), summary
            except UIError as exc:
                yield error_line(exc), gr.skip(), gr.skip()

        data_box.blur(split_choices, [data_box, split_box], split_box, show_progress="hidden")
        tab.select(lambda: gr.update(choices=[NO_ADAPTER, *adapter_choices(place.root)]), None, adapter_box)
        run_btn.click(
            evaluate,
            [model_box, adapter_box, template_box, data_box, split_box, out_box, batch_box, *settings],
            [status, log, table],
        )
    return model_box, adapter_box
