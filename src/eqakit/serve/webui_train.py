"""The web UI's Train tab: LLaMA Board's training page, on `eqakit train`.

"Config file" + "Load config" read any training YAML (the tutorial's included) into the form; the
form shows the keys people change most (model, data, output dir, the tutorial's hyper-parameters)
and keeps every other key of the file as it is. The preview is the YAML that will run, checked as
`eqakit train` checks it, and can be saved. "Start" runs `eqakit train` on it in a process of its own
(`eqakit.serve.webui_jobs.Command`), one run per output dir; the process belongs to the web UI
server, not to the page, so a reloaded page finds it again (the newest run refills the form). While
it runs, the page reads output_dir/trainer_log.jsonl (the file LLaMA-Factory's board reads too):
step / total, samples/s, ETA and the train and eval loss curves, beside the last log lines. "Stop"
sends SIGTERM: the step finishes, a complete checkpoint is saved and the process exits (see
`eqakit.train.callbacks.StopOnSignal`); "Resume" starts it again from the checkpoint chosen beside
it: the output dir's complete checkpoints, the newest proposed.
What the page says next (after a stop, or when Start or Resume cannot run) follows what the output
dir holds, in the page's words: press Resume where a checkpoint is, Start where none is, tick
"Replace a non-empty output dir" or take the proposed new output dir otherwise. A new run's plot
starts empty (the log a replaced run left is not its curve); its axes show whole steps and short
losses.

Started without a training config, the form holds the one the loaded model's adapter was trained
with (`eqakit.serve.webui_paths.Workspace`), on the base model, with a new timestamped output dir;
"Evaluate this run" hands a finished run to the Evaluate tab.

Save config, Start and Resume write only inside the page's `WriteRoots` (the config saved, and the
run's output_dir and other keys naming where it writes), and run only a Config file from inside them.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import yaml

from eqakit.config import Config, load_config, read_yaml
from eqakit.config.load import LORA_KEYS, PREFERENCE_KEYS, field_choices, key_defaults
from eqakit.data.dataset import registered_datasets
from eqakit.errors import EqakitError
from eqakit.fsutil import write_text_atomic
from eqakit.serve.webui_access import WriteRoots
from eqakit.serve.webui_jobs import LOG_LINES, Command, tail
from eqakit.serve.webui_model import UIError, error_line
from eqakit.serve.webui_paths import Workspace, checkpoint_choices, proposed
from eqakit.train.callbacks import newest_complete_checkpoint

# The form: (key, label, kind). Everything else a loaded config holds is kept unchanged.
PATHS = [
    ("model_name_or_path", "Model path", str),
    ("dataset_dir", "Dataset dir", str),
    ("dataset", "Dataset (comma-separated)", str),
    ("output_dir", "Output dir", str),
]
# What trains and how: dropdowns of the values eqakit takes (the keys' own choices).
CHOICES = [
    ("stage", "Stage (sft: answers; dpo: chosen over rejected pairs)", str),
    ("finetuning_type", "Method", str),
    ("pref_loss", "Preference loss (dpo)", str),
]
NUMBERS = [
    ("num_train_epochs", "Epochs", float),
    ("learning_rate", "Learning rate", float),
    ("per_device_train_batch_size", "Batch size (per device)", int),
    ("gradient_accumulation_steps", "Gradient accumulation", int),
    ("lora_rank", "LoRA rank", int),
    ("lora_alpha", "LoRA alpha (empty: 2 x rank)", int),
    ("lora_dropout", "LoRA dropout", float),
    ("cutoff_len", "Cutoff length (tokens)", int),
    ("image_max_pixels", "Image max pixels", int),
    ("image_min_pixels", "Image min pixels", int),
    ("val_size", "Validation size", float),
    ("eval_steps", "Eval steps (empty: logging steps)", int),
    ("save_steps", "Save steps", int),
    ("logging_steps", "Logging steps", int),
    ("pref_beta", "Preference beta (dpo)", float),
]
# Numbers whose empty field means "eqakit's default": text fields, as a number field shows 0 for empty.
OPTIONAL = {"lora_alpha", "eval_steps"}
SWITCHES = [("overwrite_output_dir", "Replace a non-empty output dir", bool)]
FORM = PATHS + CHOICES + NUMBERS + SWITCHES
# Keys of one method or stage, left out of a run of another (the config check refuses them there).
ONLY_WITH = {("finetuning_type", "lora"): LORA_KEYS, ("stage", "dpo"): PREFERENCE_KEYS}
REPLACE = SWITCHES[0][1]
LOG_FILE = "trainer_log.jsonl"
SERIES = (("loss", "train"), ("eval_loss", "eval"))  # trainer_log.jsonl key -> plotted series
SERIES_COLORS = {"train": "#ea580c", "eval": "#2563eb"}


def form_values(base: dict[str, Any]) -> list[Any]:
    """The form's field values for a config: its own value of each key, else eqakit's default."""
    defaults = key_defaults("train")
    values = []
    for key, _, kind in FORM:
        value = base.get(key, defaults.get(key))
        if kind is str or key in OPTIONAL:
            value = "" if value is None else str(value)
        elif kind is bool:
            value = bool(value)
        values.append(value)
    return values


def number(text: str | None, kind: type) -> Any:
    """An optional number field's value: None when empty, the text itself when it is no number (so
    the config check names the key)."""
    text = (text or "").strip()
    try:
        return kind(float(text)) if text else None
    except ValueError:
        return text


def run_keys(base: dict[str, Any], fields: list[Any]) -> dict[str, Any]:
    """The config that runs: the loaded file's keys with the form's values over them (an empty field
    leaves the key out, so its default applies)."""
    keys = dict(base)
    for (key, _, kind), value in zip(FORM, fields, strict=True):
        if kind is str:
            value = (value or "").strip() or None
        elif key in OPTIONAL:
            value = number(value, kind)
        elif kind is bool:
            value = True if value else None
        elif value is not None and kind is int and float(value).is_integer():
            value = int(value)
        if value is None:
            keys.pop(key, None)
        else:
            keys[key] = value
    keys.setdefault("do_train", True)
    keys.pop("resume_from_checkpoint", None)  # Start starts, Resume resumes
    defaults = key_defaults("train")
    for (key, value), only in ONLY_WITH.items():
        if keys.get(key, defaults[key]) != value:
            for other in only:
                keys.pop(other, None)
    return keys


def check_keys(keys: dict[str, Any]) -> Config:
    """The config `eqakit train` would build from these keys; raises UIError with its own message
    if it would refuse them."""
    if keys.get("do_predict"):
        raise UIError("this config predicts (do_predict: true): run it from the Evaluate tab")
    if not keys.get("output_dir"):
        raise UIError("set an output dir: the adapter, checkpoints and logs go there")
    try:
        return load_config("train", None, None, keys)
    except EqakitError as exc:
        raise UIError(str(exc)) from None


def preview(base: dict[str, Any], *fields: Any) -> tuple[str, str]:
    """(the YAML that would run, whether `eqakit train` accepts it)."""
    keys = run_keys(base, list(fields))
    text = yaml.safe_dump(keys, sort_keys=True, allow_unicode=True)
    try:
        check_keys(keys)
    except UIError as exc:
        return text, error_line(exc)
    return text, "The config is valid."


def datasets_table(dataset_dir: str) -> str:
    """Markdown: the datasets a dataset dir registers and their sizes (or why it has none)."""
    if not dataset_dir.strip():
        return ""
    try:
        found = registered_datasets(Path(dataset_dir.strip()).expanduser())
    except EqakitError as exc:
        return error_line(exc)
    if not found:
        return f"{dataset_dir.strip()}/dataset_info.json registers no dataset"
    lines = ["| dataset | file | format | samples |", "| --- | --- | --- | --- |"]
    for d in found:
        rows = f"{d.rows:,}" if d.rows is not None else f"unreadable: {d.problem}"
        lines.append(f"| `{d.name}` | {d.file_name} | {d.formatting} | {rows} |")
    return "\n".join(lines)


def read_log(output_dir: Path) -> list[dict[str, Any]]:
    """trainer_log.jsonl's records; a line being written (not yet complete) is left for next time."""
    try:
        text = (output_dir / LOG_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "current_steps" in record:
            records.append(record)
    return records


def loss_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The train and eval loss per step, in the long form gr.LinePlot draws one line per series from."""
    rows = [
        {"step": r["current_steps"], "loss": r[key], "series": series}
        for r in records
        for key, series in SERIES
        if isinstance(r.get(key), (int, float))
    ]
    frame = pd.DataFrame(rows, columns=["step", "loss", "series"])
    # typed even when empty: the plot's axes take their kind (quantitative, nominal) from the dtypes
    return frame.astype({"step": "int64", "loss": "float64", "series": "str"})


def loss_caption(records: list[dict[str, Any]]) -> str:
    """The newest train and eval loss, under the plot."""
    last = {
        series: next((r[key] for r in reversed(records) if isinstance(r.get(key), (int, float))), None)
        for key, series in SERIES
    }
    return ", ".join(f"{series} loss {value:.4g}" for series, value in last.items() if value is not None)


def progress_line(records: list[dict[str, Any]]) -> str:
    if not records:
        return ""
    r = records[-1]
    return (
        f"step {r['current_steps']} / {r['total_steps']} ({r.get('percentage', 0):.1f}%), "
        f"{r.get('samples_per_second', 0):g} samples/s, elapsed {r.get('elapsed_time', '?')}, "
        f"ETA {r.get('remaining_time', '?')}"
    )


def trained(output_dir: Path) -> str | None:
    """What a finished run left in ``output_dir``: "adapter" (LoRA), "model" (full or freeze tuning:
    the whole model, transformers' ``save_model``), or None."""
    if (output_dir / "adapter_model.safetensors").is_file():
        return "adapter"
    if (output_dir / "config.json").is_file() and any(output_dir.glob("model*.safetensors*")):
        return "model"
    return None


def to_evaluate(base: str, output_dir: str) -> tuple[str, str]:
    """(model, adapter) the Evaluate tab gets from a finished run: the base and the run's adapter,
    or, for a whole trained model, the run itself with no adapter."""
    if trained(Path(output_dir.strip()).expanduser()) == "model":
        return output_dir, ""
    return base, output_dir


def next_step(output_dir: Path) -> str:
    """What to press now, given what ``output_dir`` holds (no button leads to a refusal)."""
    found = newest_complete_checkpoint(output_dir) if output_dir.is_dir() else None
    made = trained(output_dir)
    if made is not None:
        return f"the {made} is in {output_dir}"
    if found is not None:
        return f"press Resume to continue from {found.name}"
    if output_dir.is_dir() and any(output_dir.iterdir()):
        return f'tick "{REPLACE}" and press Start, or choose another output dir'
    return "nothing to resume; press Start"


def check_output_dir(output_dir: Path, resume: bool, replace: bool, proposal: str) -> None:
    """Refuse, in the page's words, a Start into a used output dir or a Resume with nothing to resume
    (`eqakit train` refuses both too, naming its config keys)."""
    found = newest_complete_checkpoint(output_dir) if output_dir.is_dir() else None
    if resume and found is None:
        raise UIError(f"{output_dir} holds no complete checkpoint to resume from: press Start")
    if not resume and not replace and output_dir.is_dir() and any(output_dir.iterdir()):
        finished = (output_dir / "train_results.json").is_file()  # written once training ends
        hint = f"press Resume to continue from {found.name}, " if found and not finished else ""
        raise UIError(
            f'output dir {output_dir} exists and is not empty; {hint}tick "{REPLACE}" to start over '
            f"in it, or choose another output dir (such as {proposal})"
        )


@dataclass
class TrainRun:
    """One `eqakit train` started from the page."""

    output_dir: Path
    keys: dict[str, Any]
    command: Command
    resumed: bool
    config_file: str = ""  # the Config file box when it started, shown again to a reloaded page
    stopping: bool = False
    started: float = field(default_factory=time.time)

    def finished(self) -> bool:
        """Whether training wrote its final results: a Stop that comes after that (while the process
        exits) ends a finished run, not a stopped one."""
        results = self.output_dir / "train_results.json"
        return results.is_file() and results.stat().st_mtime >= self.started

    def status(self, records: list[dict[str, Any]]) -> str:
        progress = progress_line(records)
        code = self.command.returncode
        if code is None and self.stopping:
            return (
                f"**Stopping**: finishing the step and saving a checkpoint; {progress} "
                "(press Stop again to end at once, losing the step)"
            )
        if code is None:
            doing = "Resuming" if self.resumed else "Starting"
            return (
                f"**Running**: {progress}"
                if progress
                else f"**{doing}**: reading the data, loading the model…"
            )
        if code == 0 or (self.stopping and self.finished()):
            made = "adapter" if self.keys.get("finetuning_type", "lora") == "lora" else "model"
            return f"**Finished**: {progress}; the {made} is in {self.output_dir}"
        if code == 130:
            said = self.command.failure().removeprefix("stopped: ").split(";")[0]
            return f"**Stopped** {said}; {next_step(self.output_dir)}"
        if code < 0 and self.stopping:  # the signal came before training had set up its handler
            return f"**Stopped** before training began; {next_step(self.output_dir)}"
        return error_line(self.command.failure())

    def records(self) -> list[dict[str, Any]]:
        """The run's log records: a new run (not resumed) has none until it writes its own log, so a
        log that a replaced run left is not drawn as this run's curve."""
        log = self.output_dir / LOG_FILE
        if not self.resumed and (not log.is_file() or log.stat().st_mtime < self.started):
            return []
        return read_log(self.output_dir)


@dataclass
class TrainRuns:
    """The runs this web UI started, by output dir: one live run per dir, the newest first to re-attach."""

    runs: dict[Path, TrainRun] = field(default_factory=dict)
    newest: TrainRun | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(
        self,
        keys: dict[str, Any],
        resume: bool,
        config_file: str = "",
        proposal: str = "",
        checkpoint: str | None = None,
    ) -> TrainRun:
        """Start `eqakit train` on ``keys``; with ``resume``, from ``checkpoint`` (else the newest
        complete one), which the run's keys then name: the run resumes from the checkpoint the page
        said, even if another is saved meanwhile."""
        from eqakit.train.sft import resolve_resume  # the CLI's own output_dir and checkpoint checks

        if resume:
            keys = {**keys, "resume_from_checkpoint": checkpoint or True}
        cfg = check_keys(keys)
        out = Path(keys["output_dir"]).expanduser().resolve()
        with self.lock:
            live = self.runs.get(out)
            if live is not None and live.command.running:
                raise UIError(f"a run is already writing to {out}: Stop it first")
            check_output_dir(out, resume, bool(keys.get("overwrite_output_dir")), proposal)
            try:
                source = resolve_resume(cfg)
            except EqakitError as exc:
                raise UIError(str(exc)) from None
            if source is not None:
                keys = {**keys, "resume_from_checkpoint": source}
            if live is not None:
                live.command.remove()
            run = TrainRun(out, keys, Command("train", keys), resume, config_file)
            self.runs[out] = self.newest = run
        return run

    def find(self, output_dir: str) -> TrainRun | None:
        if not output_dir.strip():
            return None
        return self.runs.get(Path(output_dir.strip()).expanduser().resolve())


def build_train_tab(
    app: gr.Blocks, roots: WriteRoots, place: Workspace, base: dict[str, Any], config_path: str = ""
) -> tuple[gr.Button, gr.Textbox, gr.Textbox]:
    """The Train tab (inside ``app``); ``base`` (the command line's training config, read from
    ``config_path``, with its key=value overrides; else ``place``'s) fills the form at start; runs
    and saved configs stay inside ``roots``, new output dirs are proposed in ``place``. Returns the
    "Evaluate this run" button and the model and output dir fields it hands over."""
    runs = TrainRuns()
    with gr.Tab("Train"):
        gr.Markdown(
            "Fine-tune (SFT or DPO; LoRA, full or freeze): `eqakit train` on the config below, in a process of its own "
            "(reload the page and it is still here)."
        )
        loaded = gr.State(base)
        with gr.Row(equal_height=True):
            config_box = gr.Textbox(config_path, label="Config file", scale=5, elem_id="tr-config")
            load_btn = gr.Button("Load config", scale=1, elem_id="tr-load")
        load_status = gr.Markdown(elem_id="tr-load-status")
        initial = form_values(base)
        boxes: list[Any] = []
        with gr.Row(equal_height=True):
            for (key, label, _), value in zip(PATHS, initial, strict=False):
                boxes.append(gr.Textbox(value, label=label, elem_id=f"tr-{key}"))
        datasets = gr.Markdown(datasets_table(initial[1]), elem_id="tr-datasets")
        with gr.Row(equal_height=True):
            for (key, label, _), value in zip(CHOICES, initial[len(PATHS) :], strict=False):
                options = list(field_choices("train", key))
                boxes.append(gr.Dropdown(options, value=value, label=label, elem_id=f"tr-{key}"))
        numbers_at = len(PATHS) + len(CHOICES)
        for row in range(0, len(NUMBERS), 4):
            with gr.Row(equal_height=True):
                for (key, label, kind), value in zip(
                    NUMBERS[row : row + 4], initial[numbers_at + row :], strict=False
                ):
                    if key in OPTIONAL:
                        boxes.append(
                            gr.Textbox(value, label=label, placeholder="default", elem_id=f"tr-{key}")
                        )
                        continue
                    boxes.append(
                        gr.Number(
                            value,
                            label=label,
                            precision=0 if kind is int else None,
                            elem_id=f"tr-{key}",
                        )
                    )
        for (key, label, _), value in zip(SWITCHES, initial[numbers_at + len(NUMBERS) :], strict=True):
            boxes.append(gr.Checkbox(value, label=label, elem_id=f"tr-{key}"))
        with gr.Accordion("Config that runs (YAML)", open=False):
            shown, valid = preview(base, *initial)
            yaml_box = gr.Code(shown, language="yaml", interactive=False, elem_id="tr-preview")
            check = gr.Markdown(valid, elem_id="tr-check")
            with gr.Row(equal_height=True):
                save_box = gr.Textbox(
                    label="Save config to", placeholder="path/to/train.yaml", scale=5, elem_id="tr-save-path"
                )
                save_btn = gr.Button("Save config", scale=1, elem_id="tr-save")
        with gr.Row():
            start_btn = gr.Button("Start", variant="primary", elem_id="tr-start")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="tr-stop")
            resume_btn = gr.Button("Resume", elem_id="tr-resume")
            checkpoints = checkpoint_choices(initial[3])
            resume_box = gr.Dropdown(
                checkpoints,
                value=proposed(checkpoints, None),
                label="Resume from (the output dir's complete checkpoints)",
                elem_id="tr-resume-from",
            )
        notice = gr.Markdown(elem_id="tr-notice")  # what the last button did (or why it could not)
        status = gr.Markdown(elem_id="tr-status")  # the watched run, refreshed while it runs
        plot = gr.LinePlot(
            loss_frame([]),
            x="step",
            y="loss",
            color="series",
            color_map=SERIES_COLORS,  # fixed: the page starts with no data to derive colours from
            title="Loss",
            height=300,
            x_axis_format="d",  # whole steps
            y_axis_format=".3~g",  # 18.2, not 18.151303
            elem_id="tr-plot",
        )
        log = gr.Textbox(
            label="Log", lines=LOG_LINES, max_lines=LOG_LINES, interactive=False, elem_id="tr-log"
        )
        evaluate_btn = gr.Button("Evaluate this run", visible=False, elem_id="tr-evaluate")
        seen = gr.State(-1)  # how many log records the plot shows
        timer = gr.Timer(1.0, active=False)  # ticks only while a run started here is live

        def load(path: str) -> tuple[Any, ...]:
            try:
                keys = read_yaml(path.strip())
            except EqakitError as exc:
                return (gr.skip(), error_line(exc), *[gr.skip()] * len(FORM))
            shown = sum(key in keys for key, _, _ in FORM)
            note = f"Loaded {path.strip()}: {len(keys)} keys, {shown} of them in the form; the others run as written."
            return (keys, note, *form_values(keys))

        def start(
            resume: bool, checkpoint: str | None, config_file: str, keys: dict[str, Any], *fields: Any
        ) -> tuple[str, Any]:
            try:
                if config_file.strip():
                    roots.check(config_file, "config file")
                run_config = run_keys(keys, list(fields))
                roots.check_keys(run_config)
                run = runs.start(run_config, resume, config_file, place.propose("train"), checkpoint)
            except UIError as exc:
                return error_line(exc), gr.skip()
            if resume:
                begun = f"Resumed `eqakit train` from {run.keys['resume_from_checkpoint']}, writing"
            else:
                begun = "Started `eqakit train` writing"
            return f"{begun} to {run.output_dir}", gr.Timer(active=True)

        def stop(output_dir: str) -> tuple[str, Any]:
            run = runs.find(output_dir)
            if run is None or not run.command.running:
                where = output_dir.strip() or "(no output dir)"
                return error_line(f"no run started here is writing to {where}"), gr.skip()
            run.stopping = True  # a second Stop sends a second SIGTERM: StopOnSignal then ends at once
            run.command.stop()
            return "Stop sent: the run ends after this step, with a checkpoint", gr.Timer(active=True)

        def poll(output_dir: str, shown: int) -> tuple[Any, ...]:
            run = runs.find(output_dir)
            folder = Path(output_dir.strip()).expanduser()
            if run is not None:
                records = run.records()
                text, lines = run.status(records), tail(run.command.lines())
            else:
                records = read_log(folder) if output_dir.strip() else []
                text = (
                    f"Not started from this page; {LOG_FILE} shows {progress_line(records)}"
                    if records
                    else ""
                )
                lines = gr.skip()
            # A new caption with each new point makes the page redraw the chart, not only its data: the
            # colour of each series is set at a redraw, from the series the data then has.
            # The step axis spans the whole run: one point is not drawn on ticks 10.0, 10.5, ...
            span = [0, records[-1].get("total_steps") or records[-1]["current_steps"]] if records else None
            frame = (
                gr.update(value=loss_frame(records), caption=loss_caption(records), x_lim=span)
                if len(records) != shown
                else gr.skip()
            )
            live = run is not None and run.command.running
            done = bool(output_dir.strip()) and not live and trained(folder) is not None
            # the checkpoints to resume from, listed again once a run is over (not while it saves more)
            saved = checkpoint_choices(output_dir)
            resumable = gr.skip() if live else gr.update(choices=saved, value=proposed(saved, None))
            return (
                text,
                frame,
                lines,
                len(records),
                gr.Timer(active=live),
                gr.Button(visible=done),
                resumable,
            )

        def attach() -> tuple[Any, ...]:
            """A page opened (or reloaded) while runs exist shows the newest one."""
            run = runs.newest
            if run is None:
                return (gr.skip(),) * (3 + len(FORM))
            keys = {k: v for k, v in run.keys.items() if k != "resume_from_checkpoint"}
            return (run.config_file, keys, *form_values(keys), gr.Timer(active=True))

        load_btn.click(load, config_box, [loaded, load_status, *boxes])
        gr.on(
            [box.change for box in boxes] + [loaded.change],
            preview,
            [loaded, *boxes],
            [yaml_box, check],
            show_progress="hidden",
        )
        boxes[1].change(datasets_table, boxes[1], datasets, show_progress="hidden")
        save_btn.click(partial(save_config, roots), [save_box, yaml_box], load_status, api_name="save_config")
        start_btn.click(
            partial(start, False, None), [config_box, loaded, *boxes], [notice, timer], api_name="train_start"
        )
        resume_btn.click(
            partial(start, True),
            [resume_box, config_box, loaded, *boxes],
            [notice, timer],
            api_name="train_resume",
        )
        stop_btn.click(stop, boxes[3], [notice, timer])
        watched = [status, plot, log, seen, timer, evaluate_btn, resume_box]
        timer.tick(poll, [boxes[3], seen], watched, show_progress="hidden")
        # another output dir: show its run (or its trainer_log.jsonl) and draw its curve afresh
        boxes[3].change(lambda out: poll(out, -1), boxes[3], watched, show_progress="hidden")
        app.load(attach, None, [config_box, loaded, *boxes, timer])
    return evaluate_btn, boxes[0], boxes[3]


def save_config(roots: WriteRoots, path: str, text: str) -> str:
    """Write the previewed YAML to ``path`` (atomically: a crash leaves the old file whole), which must
    lie inside ``roots``: this writes any text the caller sends, not only the preview."""
    if not path.strip():
        return error_line("type the path to save the config to")
    try:
        roots.check(path, "config path")
    except UIError as exc:
        return error_line(exc)
    target = Path(path.strip()).expanduser()
    if target.is_dir():
        return error_line(f"{target} is a directory: give a file name such as {target / 'train.yaml'}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, text)
    except OSError as exc:
        return error_line(f"cannot write {target} ({exc.strerror or exc})")
    return f"Saved {target}; run it with `eqakit train {target}`"
