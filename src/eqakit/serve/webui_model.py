"""The web UI's model: load it, unload it, stream answers from it, and say plainly what went wrong.

The page holds one model at a time: an engine (`load_engine`: transformers or vLLM) behind its
worker, so answers for several browser tabs are decoded together as one batch. Anything a user can get wrong (no model loaded, a
bad path, a file that is not an image, a model that fails to load, a prompt that does not fit)
becomes a `UIError` whose message the page shows; an unexpected failure is logged with its
traceback on the server console and shown on the page as one line, and the app keeps working.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import logging
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from eqakit.config import Config, load_config
from eqakit.config.args import ApiArguments
from eqakit.data.encode import VideoBudget
from eqakit.data.video import Video, VideoError, VideoSource, decode, from_frames, probe_bounded
from eqakit.engine import (
    Completion,
    EngineUnavailable,
    InferenceEngine,
    Request,
    RequestError,
    TextStream,
    Worker,
    load_engine,
    make_worker,
)
from eqakit.errors import EqakitError
from eqakit.model.load import pick_device, pick_dtype
from eqakit.serve.images import decode_image

log = logging.getLogger("eqakit.webui")
MAX_IMAGE_PIXELS = ApiArguments().api_max_image_pixels  # the API's guard against decompression bombs


class UIError(EqakitError):
    """A problem to show the user as one line (never a traceback)."""


def open_image(path: str | Path) -> Image.Image:
    """A local image file decoded to RGB (the API's decoder: five formats, bomb-safe), or a UIError."""
    name = Path(path).name
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise UIError(f"{name}: cannot read {path} ({exc.strerror or exc})") from None
    try:
        return decode_image(data, MAX_IMAGE_PIXELS, where=name)
    except RequestError as exc:
        raise UIError(str(exc)) from None


VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg")


def open_video(video: str | list[str], budget: VideoBudget) -> Video:
    """A video file (PyAV), or image files as the frames of one video, chosen and decoded as in
    training (video_fps, video_maxlen); frames much larger than video_max_pixels are shrunk while
    decoded. Raises UIError naming the file. The last few are kept decoded: every turn sends the
    whole conversation again."""
    return _open_video(video if isinstance(video, str) else tuple(video), budget)


@functools.lru_cache(maxsize=4)
def _open_video(video: str | tuple[str, ...], budget: VideoBudget) -> Video:
    if isinstance(video, tuple):
        try:
            return from_frames([open_image(p) for p in video], budget.fps, budget.maxlen)
        except VideoError as exc:
            raise UIError(f"the images sent as one video: {exc}") from None
    name = Path(video).name
    source = VideoSource(file=Path(video).expanduser())
    try:
        info = probe_bounded(source, budget.fps, budget.maxlen, MAX_IMAGE_PIXELS, budget.max_pixels)
        return Video(info, tuple(decode(source, info)))
    except VideoError as exc:
        raise UIError(f"{name}: {exc}") from None


@dataclass
class LoadedModel:
    """The model in use, and how it was asked for."""

    engine: InferenceEngine
    worker: Worker
    model_path: str
    adapter_path: str
    template: str
    seconds: float
    setup: str  # dtype, quantization and backend, as the status line shows them

    def describe(self) -> str:
        adapter = f" + adapter `{self.adapter_path}`" if self.adapter_path else ""
        return (
            f"Model loaded: `{self.model_path}`{adapter} (template {self.template}, {self.setup}, "
            f"{self.seconds:.1f} s to load)"
        )


QUANTIZATION = {"none": None, "4-bit": 4, "8-bit": 8}  # the page's choices -> quantization_bit


@dataclass(frozen=True)
class LoadOptions:
    """The page's load options, LLaMA Board's: dtype, quantization and backend (the config's keys
    infer_dtype, quantization_bit and infer_backend, with their meanings and their checks)."""

    dtype: str = "auto"
    quantization: str = "none"
    backend: str = "huggingface"

    def keys(self) -> dict[str, Any]:
        if self.quantization not in QUANTIZATION:
            raise UIError(f"quantization must be one of {', '.join(QUANTIZATION)}, got {self.quantization!r}")
        return {
            "infer_dtype": self.dtype,
            "quantization_bit": QUANTIZATION[self.quantization],
            "infer_backend": self.backend,
        }


def backends() -> list[str]:
    """The inference backends this installation can run: vLLM only where it is installed."""
    return ["huggingface", *(["vllm"] if importlib.util.find_spec("vllm") is not None else [])]


def _setup(cfg: Config) -> str:
    """How the model was loaded, for the status line: dtype (auto resolved), quantization, backend."""
    model = cfg.model
    dtype = model.infer_dtype
    if model.infer_backend == "huggingface":
        dtype = str(pick_dtype(dtype, pick_device())).removeprefix("torch.")
    bits = f", {model.quantization_bit}-bit" if model.quantization_bit else ""
    return f"{dtype}{bits}, {model.infer_backend}"


class ModelSlot:
    """Holds at most one loaded model; Load replaces it, Unload frees it.

    ``config_path`` and ``overrides`` are the command line's CONFIG.yaml and key=value settings; the
    page's model path, adapter path and template are applied on top of them at each Load.
    """

    def __init__(
        self, config_path: str | Path | None = None, overrides: dict[str, Any] | None = None
    ) -> None:
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.loaded: LoadedModel | None = None
        self.loading: str | None = None  # the model being loaded, for messages meanwhile
        self._lock = threading.Lock()

    def settings(
        self,
        model_path: str,
        adapter_path: str = "",
        template: str | None = None,
        options: LoadOptions | None = None,
    ) -> Config:
        """The config a Load with these page fields would use (raises ConfigError)."""
        extra = {**self.overrides, "model_name_or_path": model_path.strip() or None}
        extra["adapter_name_or_path"] = adapter_path.strip() or None
        if template:
            extra["template"] = template
        if options is not None:
            extra |= options.keys()
        return load_config("infer", self.config_path, None, extra)

    def load_from(self, cfg: Config) -> str:
        """Load the model a config names, replacing the current one; returns the status line.

        Raises UIError with the reason: a config or path problem, or anything a broken checkpoint
        raises (its traceback goes to the server log, not to the page).
        """
        name = cfg.model.model_name_or_path or ""
        if not self._lock.acquire(blocking=False):
            raise UIError("a model is being loaded or unloaded; wait for it to finish")
        try:
            self._unload()
            self.loading = name
            start = time.perf_counter()
            engine = load_engine(cfg)
            adapter = cfg.model.adapter_name_or_path or ""
            worker = make_worker(engine).start()
            self.loaded = LoadedModel(
                engine,
                worker,
                name,
                adapter,
                engine.format.template,
                time.perf_counter() - start,
                _setup(cfg),
            )
            return self.loaded.describe()
        except EqakitError as exc:
            raise UIError(f"could not load the model: {exc}") from None
        except Exception as exc:  # a broken checkpoint fails in many ways; the app must survive them all
            log.exception("loading %s failed", name)
            raise UIError(f"could not load the model {name!r}: {type(exc).__name__}: {exc}") from None
        finally:
            self.loading = None
            self._lock.release()

    def load(
        self,
        model_path: str,
        adapter_path: str = "",
        template: str | None = None,
        options: LoadOptions | None = None,
    ) -> str:
        """Load from the page's fields; returns the status line, raises UIError with the reason."""
        if not model_path.strip():
            raise UIError("enter a model path (a local model directory or a hub id), then press Load")
        try:
            cfg = self.settings(model_path, adapter_path, template, options)
        except EqakitError as exc:
            raise UIError(f"could not load the model: {exc}") from None
        return self.load_from(cfg)

    def unload(self) -> str:
        """Free the model (answers in progress finish first, for up to 30 s)."""
        if not self._lock.acquire(blocking=False):
            raise UIError("a model is being loaded or unloaded; wait for it to finish")
        try:
            was = self.loaded
            self._unload()
            return f"Unloaded `{was.model_path}`; no model loaded" if was else "No model loaded"
        finally:
            self._lock.release()

    def _unload(self) -> None:
        loaded, self.loaded = self.loaded, None
        if loaded is None:
            return
        loaded.worker.close(timeout=30.0)
        loaded.engine.shutdown()
        del loaded
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def video_budget(self) -> VideoBudget:
        """How the loaded model's config samples and sizes videos (the defaults while none is loaded)."""
        return self.loaded.engine.format.video if self.loaded else VideoBudget()

    def status(self) -> str:
        if self.loaded:
            return self.loaded.describe()
        return f"Loading `{self.loading}`…" if self.loading else "No model loaded"

    def stream(
        self,
        messages: list[dict[str, Any]],
        *,
        images: list[Image.Image] | None = None,
        videos: list[Video] | None = None,
        system: str | None = None,
        enable_thinking: bool | None = None,
        **params: Any,
    ) -> TextStream:
        """Text deltas of the model's reply (``completion`` set at the end); raises UIError.

        ``params`` override the config's sampling defaults (max_new_tokens, temperature, top_p).
        """
        loaded = self.loaded
        if loaded is None and self.loading:
            raise UIError(
                f"the model {self.loading} is still loading; try again when the status line says so"
            )
        if loaded is None:
            raise UIError("no model loaded: enter a model path and press Load")
        try:
            request = self.request(loaded, messages, images, system, enable_thinking, videos, **params)
            submission = loaded.worker.submit(request)
        except EngineUnavailable:
            raise UIError("the model is being unloaded; load a model and try again") from None
        except EqakitError as exc:
            raise UIError(str(exc)) from None
        return TextStream(self._deltas(submission))

    @staticmethod
    def request(
        loaded: LoadedModel,
        messages: list[dict[str, Any]],
        images: list[Image.Image] | None = None,
        system: str | None = None,
        enable_thinking: bool | None = None,
        videos: list[Video] | None = None,
        **params: Any,
    ) -> Request:
        """The engine request for a turn: the page's system prompt is the conversation's own (an
        empty one means default_system, as everywhere); ``params`` override the sampling defaults."""
        return Request(
            messages,
            loaded.engine.params(**params),
            images=list(images or []),
            videos=list(videos or []),
            system=system,
            enable_thinking=enable_thinking,
        )

    @staticmethod
    def _deltas(submission: Any) -> Generator[str, None, Completion]:
        try:
            yield from submission
            return submission.result()
        except Exception as exc:  # a failed forward pass (e.g. out of memory) fails this answer only
            log.exception("generation failed")
            raise UIError(f"generation failed: {type(exc).__name__}: {exc}") from None
        finally:
            if not submission.future.done():  # the page stopped listening: stop decoding for it
                submission.cancel()


def error_line(problems: Any) -> str:
    """Markdown for one or more problems (never a traceback)."""
    items = [str(p) for p in problems] if isinstance(problems, list) else [str(problems)]
    return (
        "**Error:** " + items[0] if len(items) == 1 else "**Errors:**\n" + "\n".join(f"- {p}" for p in items)
    )


def stats_line(completion: Completion | None, seconds: float) -> str:
    """Token counts and speed of one answer (what a user compares between settings)."""
    if completion is None:
        return ""
    rate = completion.completion_tokens / seconds if seconds > 0 else 0.0
    line = (
        f"{completion.prompt_tokens} prompt tokens · {completion.completion_tokens} new tokens · "
        f"{seconds:.1f} s ({rate:.1f} tokens/s)"
    )
    return line + (" · stopped at max new tokens" if completion.finish_reason == "length" else "")


def throttled(deltas: Iterable[str], interval: float = 0.05) -> Iterator[str]:
    """Deltas merged so the page updates at most every ``interval`` seconds.

    Each page update costs Gradio a few milliseconds (the whole conversation is re-serialised and
    diffed); yielding every token of a fast model made the page 10x slower than the model.
    """
    pending, last = "", 0.0
    for delta in deltas:
        pending += delta
        if time.monotonic() - last >= interval:
            yield pending
            pending, last = "", time.monotonic()
    if pending:
        yield pending
