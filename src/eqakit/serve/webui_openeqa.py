"""The web UI's OpenEQA tab: one question of a prepared dataset, its frames, and both answers side by side.

Pick a directory written by `eqakit prepare openeqa` (any LLaMA-Factory dataset directory with
images works), a split registered in its dataset_info.json and a question; the tab shows the frames,
the question, the reference answer (and the extra answers OpenEQA gives some questions) and, after
"Ask the model", the loaded model's answer streamed next to it. The model is asked exactly what
`eqakit train` (do_predict) asks it: the row's instruction with its frames, through the same template.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from eqakit.data.dataset import Sample, load_samples, read_dataset_info
from eqakit.data.encode import VideoBudget
from eqakit.data.media import MediaCache, check_media, question_text
from eqakit.data.template import strip_thinking
from eqakit.data.video import Video
from eqakit.errors import DataError, EqakitError
from eqakit.serve.webui_model import (
    ModelSlot,
    UIError,
    error_line,
    stats_line,
    throttled,
)

PREFERRED_SPLIT = "open_eqa_test"
UI_LRU = 16  # decoded images or videos kept: a question's frames, shown, are not decoded again when asked


def question_choices(samples: list[Sample]) -> list[tuple[str, str]]:
    """Dropdown entries "question_id · category · question" -> row index."""
    choices = []
    for i, sample in enumerate(samples):
        qid = sample.meta.get("question_id", f"row {i + 1}")
        category = sample.meta.get("category")
        label = " · ".join(str(x) for x in (qid, category, question_text(sample)[:90]) if x)
        choices.append((label, str(i)))
    return choices


def open_split(
    dataset_dir: str, split: str | None, allow_outside_media: bool = False
) -> tuple[list[Sample], list[str], str]:
    """(samples, split names, chosen split) of a dataset directory; raises UIError with the reason.

    Rows whose images resolve outside the directory are refused unless ``allow_outside_media`` (the
    config's key) says otherwise, as in training and predict.
    """
    root = Path(dataset_dir.strip()).expanduser()
    if not dataset_dir.strip():
        raise UIError("enter the directory `eqakit prepare openeqa` wrote (it holds dataset_info.json)")
    try:
        names = list(read_dataset_info(root))
        if not names:
            raise UIError(f"{root / 'dataset_info.json'} registers no dataset")
        chosen = split if split in names else (PREFERRED_SPLIT if PREFERRED_SPLIT in names else names[0])
        samples = load_samples(chosen, root, allow_outside_media=allow_outside_media)
    except EqakitError as exc:
        raise UIError(str(exc)) from None
    if not samples:
        raise UIError(f"dataset {chosen!r} in {root} has no rows")
    return samples, names, chosen


def media_of(sample: Sample, budget: VideoBudget, cache: MediaCache) -> tuple[list[Any], list[Video]]:
    """The question's images and videos, checked and decoded as predict does them, so the model is
    asked what predict asks it (UIError listing the row's media problems)."""
    try:
        return cache.load(sample, check_media([sample], budget)[1][0])
    except DataError as exc:
        raise UIError(str(exc)) from None


def shown_frames(sample: Sample, images: list[Any], videos: list[Video]) -> list[tuple[Any, str]]:
    """The gallery's (image, caption) pairs: the row's images, then its videos' chosen frames."""
    return [(im, Path(p).name) for im, p in zip(images, sample.images, strict=True)] + [
        (frame, f"video {v + 1}, {time:.1f} s")
        for v, video in enumerate(videos)
        for frame, time in zip(video.frames, video.info.times, strict=True)
    ]


def build_openeqa_tab(
    slot: ModelSlot,
    settings: list[gr.components.Component],
    dataset_dir: str,
    allow_outside_media: bool = False,
) -> None:
    """Add the OpenEQA tab to the Blocks being built; ``settings`` are max_new_tokens, temperature,
    top_p and the thinking switch of the generation panel; ``allow_outside_media`` is the config's."""
    cache = MediaCache(UI_LRU)
    with gr.Tab("OpenEQA"):
        samples = gr.State([])
        with gr.Row(equal_height=True):
            dir_box = gr.Textbox(dataset_dir, label="Prepared dataset directory", scale=5, elem_id="eqa-dir")
            open_btn = gr.Button("Open", scale=1, elem_id="eqa-open")
        with gr.Row():
            split_box = gr.Dropdown([], label="Split", scale=1, elem_id="eqa-split")
            question_box = gr.Dropdown([], label="Question", scale=4, elem_id="eqa-question")
        notice = gr.Markdown(elem_id="eqa-notice")
        with gr.Row():
            gallery = gr.Gallery(label="Frames", columns=4, height=420, scale=3, elem_id="eqa-frames")
            with gr.Column(scale=2):
                question_md = gr.Markdown(elem_id="eqa-question-text")
                with gr.Row():
                    reference = gr.Textbox(
                        label="Reference answer", lines=3, interactive=False, elem_id="eqa-reference"
                    )
                    answer = gr.Textbox(
                        label="Model answer", lines=3, interactive=False, elem_id="eqa-answer"
                    )
                ask_btn = gr.Button("Ask the model", variant="primary", elem_id="eqa-ask")

        views = [gallery, question_md, reference, answer]

        def on_question(rows: list[Sample], index: str | None) -> tuple[Any, ...]:
            """(frames, question, reference, answer, notice) of one row."""
            if index is None or not rows:
                return [], "", "", "", ""
            sample = rows[int(index)]
            meta = sample.meta
            header = " · ".join(
                str(meta[k]) for k in ("question_id", "category", "episode_history") if meta.get(k)
            )
            reference_text = sample.answer
            if meta.get("extra_answers"):
                reference_text += "\n\nAlso accepted: " + "; ".join(map(str, meta["extra_answers"]))
            try:
                frames, problem = shown_frames(sample, *media_of(sample, slot.video_budget(), cache)), ""
            except UIError as exc:
                frames, problem = [], error_line(exc)
            return frames, f"**{header}**\n\n{question_text(sample)}", reference_text, "", problem

        def on_open(directory: str, split: str | None) -> tuple[Any, ...]:
            """(rows, split, question, *views, notice): the split's first question is shown at once."""
            try:
                rows, names, chosen = open_split(directory, split, allow_outside_media)
            except UIError as exc:
                return [], gr.update(), gr.update(choices=[], value=None), [], "", "", "", error_line(exc)
            choices = question_choices(rows)
            *shown, problem = on_question(rows, choices[0][1])
            note = problem or f"{len(rows)} questions in {chosen}"
            return (
                rows,
                gr.update(choices=names, value=chosen),
                gr.update(choices=choices, value="0"),
                *shown,
                note,
            )

        def on_ask(
            rows: list[Sample],
            index: str | None,
            max_new_tokens: float,
            temperature: float,
            top_p: float,
            thinking: bool,
        ) -> Iterator[tuple[str, str]]:
            """Stream the model's answer to the shown question; yields (answer, notice)."""
            if index is None or not rows:
                yield "", error_line("open a dataset and pick a question first")
                return
            sample = rows[int(index)]
            try:
                images, videos = media_of(sample, slot.video_budget(), cache)
                stream = slot.stream(
                    sample.prompt_messages,
                    images=images,
                    videos=videos,
                    system=sample.system,
                    enable_thinking=thinking,
                    max_new_tokens=int(max_new_tokens),
                    temperature=float(temperature),
                    top_p=float(top_p),
                )
                text, start = "", time.perf_counter()
                yield "", "Generating…"
                for delta in throttled(stream):
                    text += delta
                    yield text, "Generating…"
            except UIError as exc:
                yield "", error_line(exc)
                return
            yield strip_thinking(text), stats_line(stream.completion, time.perf_counter() - start)

        opened = [samples, split_box, question_box, *views, notice]
        open_btn.click(on_open, [dir_box, split_box], opened)
        dir_box.submit(on_open, [dir_box, split_box], opened)
        split_box.input(on_open, [dir_box, split_box], opened)
        question_box.input(on_question, [samples, question_box], [*views, notice])
        ask_btn.click(on_ask, [samples, question_box, *settings], [answer, notice], concurrency_limit=8)
