"""`eqakit webui`: chat with a Qwen-VL model in the browser, and watch it answer OpenEQA questions.

    eqakit webui                                  # enter a model path on the page, press Load
    eqakit webui configs/infer_openeqa.yaml       # the config's model is loaded at start
    eqakit webui configs/infer_openeqa.yaml --port 7861 max_new_tokens=256
    eqakit webui configs/training_args.yaml       # a training config fills the Train tab instead
    API_KEY=... eqakit webui CONFIG --host 0.0.0.0 --allowed-host gpu-box.lan --allow-dir /data/runs

Step 3.5 of the tutorial, on eqakit's engine: a model path (base or merged) and an optional adapter
path with Load and Unload buttons and a status line; a system prompt; several images or videos per
turn (upload, drag and drop, paste; a switch sends the images as the frames of one video) with text; sliders for max new tokens, temperature and top-p; an
enable-thinking switch (qwen3_vl template); answers stream token by token; Clear starts over. Every
turn's images stay in the conversation the model sees. The OpenEQA tab shows a prepared dataset's
question: its frames, the reference answer and the model's answer side by side. The Train tab runs
`eqakit train` from a form (or any training YAML), with Start, Stop, Resume and a live loss curve;
it survives a page reload. The Evaluate tab
runs predict on a dataset and shows its score tables. The Results tab
opens a predict run: its scores per category, its answers filtered by category and by wrong ones,
each beside its reference and frames; and puts several runs side by side (base, tuned, the blind
baseline), overall and per category. The Export tab merges an adapter into its base (`eqakit
export`, with its progress). Load options: dtype, quantization and backend. Every tab's paths start
from what the config leads to (`eqakit.serve.webui_paths.Workspace`: the merged model's base, its
adapter's dataset dir and runs folder, new timestamped output dirs); the runs, adapters (each run's
final one and its complete checkpoints) and datasets that exist are offered to pick, the newest
run proposed; and the next step is one click away: "Evaluate this run" after training, "Load
in Chat" after an export.

Whoever reaches the page runs models, trains and writes files, so (`eqakit.serve.webui_access`):
it binds to 127.0.0.1 unless --host says otherwise; it answers only a Host header naming loopback,
the --host address or an --allowed-host name (no DNS rebinding); bound beyond loopback it warns,
and refuses to start without an access key (API_KEY, as for `eqakit api`, or --access-key-file),
which the page's login then asks for on every route; Train, Evaluate, Export and Save config write
only inside the working directory, the config's directory and each --allow-dir. Problems (no model
loaded, a bad path, a path outside those directories, a file that is not an image, a model that
fails to load, a prompt too long) are shown on the page as one clear line; the app keeps working.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from eqakit.config import Config, load_config, parse_overrides, read_yaml
from eqakit.config.args import GeneratingArguments
from eqakit.config.load import infer_kind
from eqakit.data.encode import VideoBudget
from eqakit.data.template import NOTHINK, QWEN2_VL, TEMPLATE_SYSTEM, TEMPLATES, THINK, strip_thinking
from eqakit.errors import EqakitError
from eqakit.serve.webui_access import AccessGate, HostCheck, WriteRoots, access_key, is_loopback, key_check
from eqakit.serve.webui_evaluate import build_evaluate_tab
from eqakit.serve.webui_export import build_export_tab
from eqakit.serve.webui_model import (
    QUANTIZATION,
    VIDEO_SUFFIXES,
    LoadOptions,
    ModelSlot,
    UIError,
    backends,
    error_line,
    open_image,
    open_video,
    stats_line,
    throttled,
)
from eqakit.serve.webui_openeqa import build_openeqa_tab
from eqakit.serve.webui_paths import Workspace
from eqakit.serve.webui_results import build_results_tab
from eqakit.serve.webui_train import build_train_tab, to_evaluate

# {"role": "user", "text": str, "images": [path], "videos": [path | [frame path]]} or
# {"role": "assistant", "text": str}
Turn = dict[str, Any]
THINK_TAGS = [("<think>", "</think>")]


def chat_messages(history: list[Turn], budget: VideoBudget | None = None) -> list[dict[str, Any]]:
    """The conversation as engine messages: every user turn with its images and videos (``budget``:
    how videos are sampled and sized), answers without reasoning."""
    budget = budget or VideoBudget()
    messages = []
    for turn in history:
        if turn["role"] == "user":
            parts: list[dict[str, Any]] = [{"type": "image", "image": open_image(p)} for p in turn["images"]]
            parts += [{"type": "video", "video": open_video(v, budget)} for v in turn.get("videos", [])]
            if turn["text"]:
                parts.append({"type": "text", "text": turn["text"]})
            messages.append({"role": "user", "content": parts})
        else:
            messages.append({"role": "assistant", "content": strip_thinking(turn["text"])})
    return messages


def chatbot_view(history: list[Turn]) -> list[dict[str, Any]]:
    """What gr.Chatbot shows: images and videos as files (a video sent as frames: its frames), text as
    markdown, <think> blocks folded by the Chatbot."""
    view: list[dict[str, Any]] = []
    for turn in history:
        if turn["role"] == "user":
            files = [*turn["images"]]
            for video in turn.get("videos", []):
                files += video if isinstance(video, list) else [video]
            view += [{"role": "user", "content": {"path": p, "alt_text": Path(p).name}} for p in files]
            if turn["text"]:
                view.append({"role": "user", "content": turn["text"]})
        else:
            view.append({"role": "assistant", "content": turn["text"]})
    return view


def respond(
    slot: ModelSlot,
    message: dict[str, Any] | None,
    history: list[Turn],
    system: str,
    max_new_tokens: float,
    temperature: float,
    top_p: float,
    thinking: bool,
    frames_as_video: bool = False,
) -> Iterator[tuple[Any, ...]]:
    """Stream one answer; yields (chatbot, history, textbox, notice).

    Video files attached are videos; with ``frames_as_video`` the images attached are the frames
    of one video. A message that cannot be sent (no model, a file that is neither an image nor a
    video, a prompt too long) stays in the textbox (minus any file that cannot be read) and the
    conversation is unchanged.
    """
    message = message or {}
    text = (message.get("text") or "").strip()
    files = list(message.get("files") or [])
    keep = (chatbot_view(history), history)
    if not text and not files:
        yield *keep, gr.skip(), error_line("type a question or attach an image first")
        return
    budget = slot.video_budget()
    good, problems = [], []
    for path in files:
        try:
            if str(path).lower().endswith(VIDEO_SUFFIXES):
                open_video(str(path), budget)
            else:
                open_image(path)
            good.append(path)
        except UIError as exc:
            problems.append(exc)
    if problems:
        yield *keep, {"text": text, "files": good}, error_line(problems)
        return
    videos: list[Any] = [p for p in good if str(p).lower().endswith(VIDEO_SUFFIXES)]
    images = [p for p in good if p not in videos]
    if frames_as_video and images:
        videos, images = [*videos, images], []
    user: Turn = {"role": "user", "text": text, "images": images, "videos": videos}
    try:
        stream = slot.stream(
            chat_messages([*history, user], budget),
            system=system,
            enable_thinking=thinking,
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
        )
    except UIError as exc:
        yield *keep, gr.skip(), error_line(exc)
        return
    reply: Turn = {"role": "assistant", "text": ""}
    turns = [*history, user, reply]
    yield chatbot_view(turns), turns, None, "Generating…"
    start = time.perf_counter()
    try:
        for delta in throttled(stream):
            reply["text"] += delta
            yield chatbot_view(turns), turns, gr.skip(), "Generating…"
    except UIError as exc:  # the message goes back into the textbox: nothing typed is lost
        yield *keep, {"text": text, "files": files}, error_line(exc)
        return
    yield chatbot_view(turns), turns, gr.skip(), stats_line(stream.completion, time.perf_counter() - start)


def load_into_slot(
    slot: ModelSlot,
    model_path: str,
    adapter_path: str,
    template: str,
    dtype: str,
    quantization: str,
    backend: str,
) -> Iterator[str]:
    """Status lines for the Load button: "Loading..." at once (a real model takes a while), then the result."""
    yield f"Loading `{model_path.strip()}`…"
    try:
        yield slot.load(model_path, adapter_path, template, LoadOptions(dtype, quantization, backend))
    except UIError as exc:
        yield f"{error_line(exc)}\n\n{slot.status()}"


def unload_slot(slot: ModelSlot) -> str:
    """The status line after the Unload button."""
    try:
        return slot.unload()
    except UIError as exc:
        return f"{error_line(exc)}\n\n{slot.status()}"


def create_app(
    slot: ModelSlot, roots: WriteRoots, cfg: Config | None = None, train: dict[str, Any] | None = None
) -> gr.Blocks:
    """The web UI's page around ``slot``; the tabs that write or run do so only inside ``roots``;
    ``cfg`` (the command line's config) fills in the fields' defaults; ``train`` (the command line's
    training config, when it is one) fills the Train tab."""
    system_default = ""
    template, thinking, allow_outside_media = NOTHINK, False, False
    place = Workspace.from_config(cfg)
    generating = cfg.generating if cfg is not None else GeneratingArguments()
    gen_defaults = {k: getattr(generating, k) for k in ("max_new_tokens", "temperature", "top_p")}
    load = LoadOptions()
    if cfg is not None:
        bits = {v: k for k, v in QUANTIZATION.items()}[cfg.model.quantization_bit]
        load = LoadOptions(cfg.model.infer_dtype, bits, cfg.model.infer_backend)
        template = cfg.data.template or template
        thinking = template == THINK and cfg.data.enable_thinking
        system_default = cfg.data.default_system or ""
        allow_outside_media = cfg.data.allow_outside_media

    with gr.Blocks(title="eqakit", analytics_enabled=False) as app:
        gr.Markdown("## eqakit: train, evaluate, export and chat with Qwen-VL models")
        with gr.Row(equal_height=True):
            model_box = gr.Textbox(
                place.model, label="Model path (base or merged)", scale=4, elem_id="model-path"
            )
            adapter_box = gr.Textbox(
                place.adapter, label="Adapter path (optional LoRA)", scale=3, elem_id="adapter-path"
            )
            template_box = gr.Dropdown(
                list(TEMPLATES), value=template, label="Template", scale=2, elem_id="template"
            )
            load_btn = gr.Button("Load", variant="primary", scale=1, elem_id="load-btn")
            unload_btn = gr.Button("Unload", scale=1, elem_id="unload-btn")
        with gr.Row(equal_height=True):  # LLaMA Board's load options: the config's keys, its defaults
            dtype_box = gr.Dropdown(
                ["auto", "bfloat16", "float16", "float32"],
                value=load.dtype,
                label="Dtype (infer_dtype; auto: bf16 on CUDA, fp32 on CPU)",
                elem_id="load-dtype",
            )
            quant_box = gr.Dropdown(
                list(QUANTIZATION),
                value=load.quantization,
                label="Quantization (bitsandbytes, CUDA only)",
                elem_id="load-quantization",
            )
            backend_box = gr.Dropdown(
                backends(), value=load.backend, label="Backend (vLLM where installed)", elem_id="load-backend"
            )
        status = gr.Markdown(slot.status(), elem_id="model-status")
        with gr.Accordion("Generation", open=True), gr.Row():
            max_tokens = gr.Slider(1, 4096, gen_defaults["max_new_tokens"], step=1, label="Max new tokens")
            temperature = gr.Slider(
                0.0, 1.5, gen_defaults["temperature"], step=0.01, label="Temperature (0: greedy)"
            )
            top_p = gr.Slider(0.01, 1.0, gen_defaults["top_p"], step=0.01, label="Top-p")
            think = gr.Checkbox(
                thinking, label="Enable thinking", info="qwen3_vl template only", elem_id="thinking"
            )
        settings = [max_tokens, temperature, top_p, think]

        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat"):
                # One rule everywhere (LLaMA-Factory's): an empty system prompt means default_system; the
                # placeholder says so, so clearing the box never brings the default back unannounced.
                empty = (
                    f"(empty: the config's default_system is used: {system_default})"
                    if system_default
                    else "(empty: the template's own default, if it has one: qwen2_vl's "
                    f'"{TEMPLATE_SYSTEM[QWEN2_VL]}")'
                )
                system = gr.Textbox(
                    system_default, label="System prompt", lines=2, placeholder=empty, elem_id="system-prompt"
                )
                history = gr.State([])
                chatbot = gr.Chatbot(
                    label="Conversation",
                    height=460,
                    reasoning_tags=THINK_TAGS,
                    elem_id="chatbot",
                    buttons=["copy"],
                )
                textbox = gr.MultimodalTextbox(
                    placeholder="Ask about images or videos; attach them with the clip, by drag and drop, or paste",
                    file_count="multiple",
                    sources=["upload"],
                    max_plain_text_length=1_000_000,  # long pasted text stays text instead of becoming a .txt file
                    show_label=False,
                    elem_id="chat-input",
                )
                frames_as_video = gr.Checkbox(
                    False,
                    label="Send the attached images as the frames of one video",
                    info="video files (mp4, webm, mov, mkv, avi) are always videos",
                    elem_id="frames-as-video",
                )
                notice = gr.Markdown(elem_id="chat-notice")
                clear_btn = gr.Button("Clear conversation", elem_id="clear-btn")

            build_openeqa_tab(slot, settings, place.dataset_dir, allow_outside_media)
            evaluate_run, trained_model, trained_dir = build_train_tab(
                app,
                roots,
                place,
                train or {"template": template, **place.train_keys()},
                str(cfg.source) if train else "",
            )
            evaluated_model, evaluated_adapter = build_evaluate_tab(roots, place, template, settings)
            build_results_tab(place, allow_outside_media)
            load_export, exported = build_export_tab(roots, place, template)

        # the next step, one click away: a trained adapter or model to Evaluate, an exported model to Chat
        evaluate_run.click(
            lambda base, out: (*to_evaluate(base, out), gr.Tabs(selected="evaluate")),
            [trained_model, trained_dir],
            [evaluated_model, evaluated_adapter, tabs],
        )
        load_export.click(
            lambda model: (model, "", gr.Tabs(selected="chat")), exported, [model_box, adapter_box, tabs]
        ).then(
            partial(load_into_slot, slot),
            [model_box, adapter_box, template_box, dtype_box, quant_box, backend_box],
            status,
        )

        load_btn.click(
            partial(load_into_slot, slot),
            [model_box, adapter_box, template_box, dtype_box, quant_box, backend_box],
            status,
        )
        unload_btn.click(lambda: unload_slot(slot), None, status)
        app.load(slot.status, None, status)  # a page opened later shows the model loaded now
        sent = textbox.submit(
            partial(respond, slot),
            [textbox, history, system, *settings, frames_as_video],
            [chatbot, history, textbox, notice],
            concurrency_limit=8,  # several tabs at once: the engine worker batches their answers
        )
        reset = (lambda: ([], [], ""), None, [chatbot, history, notice])
        clear_btn.click(*reset, cancels=[sent])
        chatbot.clear(*reset, cancels=[sent])
    return app


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="eqakit webui",
        description="Chat with a Qwen-VL model in the browser (Gradio).",
        epilog="environment: API_KEY (the access key the page asks for, as `eqakit api` reads it; "
        "required with a --host beyond loopback)",
    )
    parser.add_argument("config", nargs="?", help="YAML config whose model is loaded at start (optional)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that override the config")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; any other needs an access key)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name the page answers to besides loopback and --host (a reverse proxy's, a LAN "
        "name); repeatable",
    )
    parser.add_argument(
        "--access-key-file",
        metavar="FILE",
        help="file holding the access key the page asks for as its password (default: $API_KEY)",
    )
    parser.add_argument(
        "--allow-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory Train, Evaluate, Export and Save config may write to, besides the working "
        "directory and the config's; repeatable",
    )
    args = parser.parse_intermixed_args(argv)

    key = access_key(args.access_key_file)
    if key is None and not is_loopback(args.host):
        raise EqakitError(
            f"--host {args.host} lets other machines run models, train and write files: set an access "
            "key first (API_KEY=... in the environment, or --access-key-file FILE), or bind 127.0.0.1"
        )
    roots = WriteRoots.at_start(args.config, args.allow_dir)
    overrides = parse_overrides(args.overrides)
    cfg, train = None, None
    raw = read_yaml(args.config) if args.config is not None else {}
    if infer_kind(raw) == "train":
        # A training config (the tutorial's training_args.yaml) fills the Train tab; nothing loads.
        cfg = load_config("train", args.config, args.overrides)
        train = {**raw, **overrides}
        print(f"eqakit webui: {args.config} is a training config: the Train tab holds it", flush=True)
    slot = ModelSlot(None if train else args.config, None if train else overrides)
    if args.config is not None and train is None:
        cfg = load_config("infer", args.config, args.overrides)
        print(f"eqakit webui: loading {cfg.model.model_name_or_path} ...", flush=True)
        print(f"eqakit webui: {slot.load_from(cfg)}", flush=True)
    app = create_app(slot, roots, cfg, train)
    # Every request passes the Host check; with a key, /gradio_api needs the login too (Gradio's
    # auth guards the rest). Given at the app's creation: middleware cannot be added once it serves.
    middleware = [Middleware(HostCheck, bound=args.host, allowed=args.allowed_host)]
    if key is not None:
        middleware.append(Middleware(AccessGate))
    where = ", ".join(str(d) for d in roots.dirs)
    if not is_loopback(args.host):
        print(
            f"eqakit webui: warning: listening on {args.host}:{args.port}: anyone who can reach it and "
            f"holds the access key can run models, train and write files in {where}",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"eqakit webui: Train, Evaluate, Export and Save config write only in {where} (more: --allow-dir)",
        flush=True,
    )
    try:
        app.queue().launch(
            server_name=args.host,
            server_port=args.port,
            show_error=False,
            ssr_mode=False,
            share=False,  # never a public gradio.live link (GRADIO_SHARE): it would bypass --host
            auth=key_check(key) if key is not None else None,
            auth_message="The access key (API_KEY or --access-key-file) is the password; any user name.",
            app_kwargs={"middleware": middleware},
        )
    except OSError as exc:
        raise EqakitError(f"cannot serve on {args.host}:{args.port} ({exc}); choose another --port") from None
    return 0
