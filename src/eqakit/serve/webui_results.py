"""The web UI's Results tab: a predict run's answers beside the references and the frames the model saw.

Open a directory `eqakit train` (``do_predict``) wrote: its ``generated_predictions.jsonl`` is read
(a run still going, or cut short, shows what it has), scored per question as predict scores it
(`eqakit.evaluate.metrics.sample_scores`: exact match and token F1 against the reference and
OpenEQA's extra answers) and summed up in the overall and per-category tables of ``report.md``.
Filter by category and by wrong answers (exact match 0), pick a question, and see its frames,
the reference and the model's answer side by side. Frames are read from the dataset directory the
rows' image paths are relative to, under the same rule as training: inside it, unless
``allow_outside_media``. The predict runs under the web UI's runs dir are offered to pick, the
newest first and proposed (a typed path works too); an opened run shows its first question at once.

"Runs side by side" puts several predict runs in one table, one row each (base, tuned, merged...):
the scores `eqakit predict` wrote when it finished (predict_results.json), or for a run cut short
its answers so far, scored here; then exact match per category, one column per run. When the
dataset dir holds `eqakit prepare openeqa`'s splits, the blind baseline (each test question answered
with its most common training answer, frames unseen) is a row too: a tuned model below it in a
category is not reading the frames there. Runs made since the page listed them join the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from eqakit.data.template import readable
from eqakit.errors import EqakitError
from eqakit.evaluate.baseline import blind_baseline
from eqakit.evaluate.metrics import sample_scores, score_predictions, sort_categories
from eqakit.evaluate.predict import PREDICTIONS
from eqakit.evaluate.report import METRIC_LABELS, markdown_table, score_cell, scores_markdown
from eqakit.serve.webui_model import UIError, error_line, open_image
from eqakit.serve.webui_paths import Workspace, find_predict_runs, proposed, read_json

ALL = "All categories"
RESULTS = "predict_results.json"  # the scores `eqakit predict` writes when it finishes
COMPARED = 6  # the newest runs put side by side when the page starts
BLIND = "blind baseline"
EM = "predict_exact_match"


def read_predictions(out_dir: str) -> list[dict[str, Any]]:
    """The rows of a predict run, each with its ``scores``; raises UIError naming the file and line."""
    if not out_dir.strip():
        raise UIError("enter the output_dir of a predict run (it holds generated_predictions.jsonl)")
    path = Path(out_dir.strip()).expanduser() / PREDICTIONS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UIError(f"{path} not found: open a directory that `eqakit train` (do_predict) wrote") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UIError(f"{path} cannot be read ({exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UIError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("predict", "label")):
            raise UIError(f"{path}:{number}: a prediction row needs string 'predict' and 'label' fields")
        extra = row.get("extra_answers")
        if extra is not None and not (isinstance(extra, list) and all(isinstance(a, str) for a in extra)):
            raise UIError(f"{path}:{number}: 'extra_answers' must be a list of strings")
        row["scores"] = sample_scores(row["predict"], row["label"], extra)
        rows.append(row)
    if not rows:
        raise UIError(f"{path} holds no predictions yet")
    return rows


def question_of(row: dict[str, Any]) -> str:
    """The question as a person reads it: the prompt's last user turn without its image or video markup."""
    prompt = str(row.get("prompt", ""))
    return readable(prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0])


def wrong(row: dict[str, Any]) -> bool:
    return row["scores"]["predict_exact_match"] == 0


def matching(rows: list[dict[str, Any]], category: str, wrong_only: bool) -> list[int]:
    """Indices of the rows in ``category`` (or all), and only the wrong ones if asked."""
    return [
        i
        for i, row in enumerate(rows)
        if (category == ALL or row.get("category") == category) and (not wrong_only or wrong(row))
    ]


def choice(index: int, row: dict[str, Any]) -> tuple[str, str]:
    scores = row["scores"]
    mark = "✗" if wrong(row) else "✓"
    qid = row.get("question_id", f"row {index + 1}")
    category = row.get("category")
    head = " · ".join(str(x) for x in (qid, category) if x)
    f1 = scores["predict_token_f1"]
    return f"{mark} {head} · F1 {f1:.2f} · {question_of(row)[:80]}", str(index)


def frames_of(row: dict[str, Any], dataset_dir: str, allow_outside_media: bool) -> list[Any]:
    """The row's frames, decoded (the API's decoder); paths relative to ``dataset_dir``."""
    root = Path(dataset_dir.strip()).expanduser()
    images = []
    for given in row.get("images") or []:
        path = Path(str(given))
        path = path if path.is_absolute() else root / path
        resolved = path.resolve()
        if not allow_outside_media and not resolved.is_relative_to(root.resolve()):
            raise UIError(
                f"frame {given!r} resolves to {resolved}, outside the dataset directory {root}; "
                "open the dataset the run predicted on, or start the web UI with allow_outside_media: true"
            )
        images.append(open_image(resolved))
    return images


def run_scores(out_dir: str) -> tuple[dict[str, Any], bool]:
    """A predict run's scores (overall, ``num_samples``, ``per_category``) and whether it finished:
    predict_results.json when it did, else its answers so far scored as predict scores them (raises
    UIError when there are none)."""
    results = read_json(Path(out_dir.strip()).expanduser() / RESULTS)
    if results:
        per_category = results.get("predict_per_category") or {}
        return {**results, "num_samples": results.get("predict_samples"), "per_category": per_category}, True
    return score_predictions(read_predictions(out_dir)), False


def blind_scores(dataset_dir: str) -> dict[str, Any] | None:
    """The blind baseline of a dataset dir `eqakit prepare openeqa` wrote (its train_val and test
    splits), or None for any other dir: without those splits there is nothing to answer blind from."""
    try:
        scores = blind_baseline(Path(dataset_dir.strip()).expanduser())
    except (OSError, KeyError, ValueError, EqakitError):
        return None
    return {**scores, "per_category": scores.pop("predict_per_category")}


def compare_markdown(named: list[tuple[str, dict[str, Any]]]) -> str:
    """One row per run with its overall scores, then exact match per category with a column per run
    (``named``: each run's name and `run_scores`): where a tuned model gains on its base, and where
    it is still below the blind baseline."""
    metrics = [key for key in METRIC_LABELS if any(key in scores for _, scores in named)]
    rows = [
        [name, str(s.get("num_samples", "-")), *(score_cell(s.get(m)) for m in metrics)] for name, s in named
    ]
    parts = [markdown_table(["Run", "Samples", *(METRIC_LABELS[m] for m in metrics)], rows)]
    categories = sort_categories(c for _, scores in named for c in scores["per_category"])
    if categories:
        rows = [
            [c, *(score_cell(s["per_category"].get(c, {}).get(EM)) for _, s in named)] for c in categories
        ]
        parts += [
            "**Exact match per category**",
            markdown_table(["Category", *(name for name, _ in named)], rows),
        ]
    return "\n\n".join(parts)


def compare_runs(out_dirs: list[str] | None, dataset_dir: str) -> str:
    """Markdown: the chosen predict runs side by side, the blind baseline last (when the dataset dir
    has one); a run that cannot be read is named with why, the others still shown."""
    named, problems = [], []
    for out_dir in out_dirs or []:
        try:
            scores, finished = run_scores(out_dir)
        except UIError as exc:
            problems.append(exc)
            continue
        named.append((out_dir if finished else f"{out_dir} (unfinished)", scores))
    blind = blind_scores(dataset_dir) if named else None
    if blind is not None:
        named.append((BLIND, blind))
    shown = compare_markdown(named) if named else "Pick predict runs to put side by side."
    return f"{error_line(problems)}\n\n{shown}" if problems else shown


def build_results_tab(place: Workspace, allow_outside_media: bool) -> None:
    """The Results tab (inside the caller's gr.Blocks); ``place`` gives the runs offered and the dataset dir."""
    runs = find_predict_runs(place.root)
    with gr.Tab("Results") as tab:
        with gr.Row(equal_height=True):
            out_box = gr.Dropdown(
                runs,
                value=proposed(runs, None),
                allow_custom_value=True,
                label="Predict run (its output dir: pick one or type a path)",
                scale=4,
                elem_id="res-dir",
            )
            data_box = gr.Textbox(
                place.dataset_dir, label="Dataset dir (the rows' frames)", scale=3, elem_id="res-data"
            )
            open_btn = gr.Button("Open", variant="primary", scale=1, elem_id="res-open")
        notice = gr.Markdown(elem_id="res-notice")
        table = gr.Markdown(elem_id="res-table")
        with gr.Row(equal_height=True):
            category_box = gr.Dropdown([ALL], value=ALL, label="Category", scale=2, elem_id="res-category")
            wrong_box = gr.Checkbox(False, label="Wrong answers only (exact match 0)", elem_id="res-wrong")
        question_box = gr.Dropdown([], label="Question", elem_id="res-question")
        question_text = gr.Markdown(elem_id="res-question-text")
        with gr.Row():
            frames = gr.Gallery(label="Frames", columns=4, height=300, elem_id="res-frames")
            with gr.Column():
                reference = gr.Textbox(
                    label="Reference answer(s)", interactive=False, elem_id="res-reference"
                )
                answer = gr.Textbox(label="Model answer", interactive=False, elem_id="res-answer")
                scores = gr.Markdown(elem_id="res-scores")
        with gr.Accordion("Runs side by side", open=True):
            compare_box = gr.Dropdown(
                runs,
                value=runs[:COMPARED][::-1],  # oldest first: base, tuned, merged, in the order they were made
                multiselect=True,
                allow_custom_value=True,
                label="Predict runs (one row each; pick more or type a path)",
                elem_id="res-compare",
            )
            compare_table = gr.Markdown(elem_id="res-compare-table")
        rows_state = gr.State([])
        listed = gr.State(runs)  # the runs the page offered last: any other is new since

        def open_run(out_dir: str | None) -> tuple[Any, ...]:
            try:
                rows = read_predictions(out_dir or "")
            except UIError as exc:
                return (
                    [],
                    error_line(exc),
                    "",
                    gr.update(choices=[ALL], value=ALL),
                    gr.update(choices=[], value=None),
                )
            categories = sorted({str(r["category"]) for r in rows if r.get("category")})
            summary = scores_markdown(score_predictions(rows))
            shown = [choice(i, r) for i, r in enumerate(rows)]
            note = f"{len(rows)} predictions, {sum(wrong(r) for r in rows)} wrong (exact match 0)"
            return (
                rows,
                note,
                summary,
                gr.update(choices=[ALL, *categories], value=ALL),
                gr.update(choices=shown, value=shown[0][1]),  # the first question shown at once
            )

        def refilter(rows: list[dict[str, Any]], category: str, wrong_only: bool) -> tuple[Any, str]:
            keep = matching(rows, category or ALL, wrong_only)
            return gr.update(choices=[choice(i, rows[i]) for i in keep], value=None), f"{len(keep)} shown"

        def show(rows: list[dict[str, Any]], index: str | None, data_dir: str) -> tuple[Any, ...]:
            if index is None or not rows:
                return [], "", "", "", "", ""
            row = rows[int(index)]
            refs = [row["label"], *(row.get("extra_answers") or [])]
            s = row["scores"]
            line = f"exact match {s['predict_exact_match']:.0f} · token F1 {s['predict_token_f1']:.2f}"
            try:
                images = frames_of(row, data_dir, allow_outside_media)
                note = f"{len(images)} frames"
            except EqakitError as exc:
                images, note = [], error_line(exc)
            return images, f"**{question_of(row)}**", " | ".join(refs), row["predict"], line, note

        outputs = [rows_state, notice, table, category_box, question_box]
        open_btn.click(open_run, [out_box], outputs)
        out_box.input(open_run, [out_box], outputs)

        def relist(current: str | None, compared: list[str] | None, offered: list[str]) -> tuple[Any, ...]:
            """The runs listed again: the picked run kept (or the newest proposed); runs made since the
            last listing join the comparison."""
            found = find_predict_runs(place.root)
            new = [run for run in reversed(found) if run not in offered]
            return (
                gr.update(choices=found, value=proposed(found, current)),
                gr.update(choices=found, value=[*(compared or []), *new]),
                found,
            )

        tab.select(relist, [out_box, compare_box, listed], [out_box, compare_box, listed]).then(
            compare_runs, [compare_box, data_box], compare_table
        )
        compare_box.input(compare_runs, [compare_box, data_box], compare_table)
        for box in (category_box, wrong_box):
            box.change(refilter, [rows_state, category_box, wrong_box], [question_box, notice])
        question_box.change(
            show,
            [rows_state, question_box, data_box],
            [frames, question_text, reference, answer, scores, notice],
        )
