"""The web UI's Evaluate tab: predict on a dataset with a model (and adapter), then its score tables.

The fields are predict's config keys (model_name_or_path, adapter_name_or_path, template,
dataset_dir, eval_dataset, output_dir, per_device_eval_batch_size, and the page's generation
settings), checked by the config loader first, so a bad value is the CLI's message. The run is
`eqakit train` with ``do_predict: true`` in a process of its own (`eqakit.serve.webui_jobs`), its
progress shown as it goes; it resumes an interrupted run in the same output_dir as the CLI does.
At the end the overall and per-category tables (BLEU-4, ROUGE, exact match, token F1) of its
predictions are shown; the Results tab opens the same output_dir question by question. The
output_dir must lie inside the page's `WriteRoots`.
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
from eqakit.serve.webui_results import read_predictions

DEFAULT_SPLIT = "open_eqa_test"


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


def build_evaluate_tab(
    roots: WriteRoots, model: str, adapter: str, template: str, dataset_dir: str, settings: list[Any]
) -> None:
    """The Evaluate tab (inside the caller's gr.Blocks); ``settings`` are the page's generation
    controls (max new tokens, temperature, top-p, thinking); predictions are written inside ``roots``."""
    job = Job("train")
    with gr.Tab("Evaluate"):
        gr.Markdown("Predict on a dataset (`eqakit train` with `do_predict: true`) and score the answers.")
        with gr.Row(equal_height=True):
            model_box = gr.Textbox(model, label="Model path (base or merged)", scale=3, elem_id="ev-model")
            adapter_box = gr.Textbox(adapter, label="Adapter path (optional)", scale=3, elem_id="ev-adapter")
            template_box = gr.Dropdown(
                list(TEMPLATES), value=template, label="Template", scale=2, elem_id="ev-template"
            )
        with gr.Row(equal_height=True):
            data_box = gr.Textbox(dataset_dir, label="Dataset dir", scale=3, elem_id="ev-data")
            split_box = gr.Textbox(DEFAULT_SPLIT, label="Dataset (eval_dataset)", scale=2, elem_id="ev-split")
            out_box = gr.Textbox(label="Output dir", scale=3, elem_id="ev-out")
            batch_box = gr.Number(2, label="Batch size", minimum=1, precision=0, scale=1, elem_id="ev-batch")
            run_btn = gr.Button("Run predict", variant="primary", scale=1, elem_id="ev-run")
        status = gr.Markdown(elem_id="ev-status")
        log = gr.Textbox(
            label="Progress", lines=LOG_LINES, max_lines=LOG_LINES, interactive=False, elem_id="ev-log"
        )
        table = gr.Markdown(elem_id="ev-table")

        def evaluate(*fields: Any) -> Iterator[tuple[str, str, str]]:
            try:
                keys = predict_keys(*fields)
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

        run_btn.click(
            evaluate,
            [model_box, adapter_box, template_box, data_box, split_box, out_box, batch_box, *settings],
            [status, log, table],
        )
