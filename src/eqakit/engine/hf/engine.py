"""One inference engine for every consumer of generation: predict, api, webui, chat, judge's local runs.

Messages go in (OpenAI-shaped, images as PIL images), text comes out (whole, or as a stream of
deltas), with token counts and a finish reason. Prompts are rendered by `eqakit.data.template` and
encoded by `eqakit.data.encode`, exactly as in training. Underneath, `Runner` decodes many requests
as one continuously refilled batch (filled by `eqakit.engine.hf.scheduler.Scheduler`), runs each distinct image through the vision tower once,
prefills each shared prompt prefix (an episode's frames) once, and appends to its KV cache in place
(eqakit.engine.hf.kv) instead of copying it every token. Every one of these is exact: greedy
decoding gives the tokens ``model.generate`` gives for each request alone (tests check each).

    engine = HFEngine.from_config(load_config("infer", "configs/infer_openeqa.yaml"))
    reply = engine.chat([{"role": "user", "content": [{"type": "image", "image": frame},
                                                      {"type": "text", "text": "What is on the table?"}]}])
    for delta in engine.stream(Request(messages, engine.params(temperature=0))):
        print(delta, end="")

Thread safety: every model step takes the engine's lock, so calls from several threads are safe
but run one step at a time. A server should give all requests to one `EngineWorker`
(eqakit.engine.hf.worker, built by `eqakit.engine.load.start_worker`), which batches concurrent
requests together. `HFEngine` implements `eqakit.engine.base.InferenceEngine`.

Raises RequestError (a bad request: wrong image count, bad parameter, prompt too long) before any
model work for that request; EqakitError from `from_config` for a model that cannot be loaded.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from eqakit.data.encode import Plan, PromptFormat
from eqakit.data.template import Message
from eqakit.data.video import VideoInfo
from eqakit.engine.base import EngineUnavailable, RequestFailed, TextStream
from eqakit.engine.hf.caches import LRUCache, PrefixState, VisualFeatures
from eqakit.engine.hf.model import HFModel
from eqakit.engine.hf.prepare import Prepared, prepare_request
from eqakit.engine.hf.runner import Job, Reuse, Runner
from eqakit.engine.hf.scheduler import Scheduler
from eqakit.engine.params import Completion, Request, SamplingParams
from eqakit.engine.prompt import plan_prompt

if TYPE_CHECKING:
    from eqakit.config.load import Config

MiB = 1 << 20


class HFEngine:
    """Batched, cached Qwen-VL generation over a transformers model (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        format: PromptFormat | None = None,  # noqa: A002 - the InferenceEngine attribute's name
        defaults: SamplingParams | None = None,
        skip_special_tokens: bool = True,
        max_batch_size: int = 8,
        max_batch_tokens: int | None = None,
        vision_cache_mib: int = 1024,
        prefix_cache_mib: int = 2048,
        min_prefix_tokens: int = 64,
        eos_token_ids: Iterable[int] | None = None,
    ) -> None:
        """``format``: how prompts are rendered and bounded (default: `PromptFormat`'s, the config
        defaults). ``max_batch_size`` bounds the sequences decoded together and ``max_batch_tokens`` (None: no
        bound) their KV cache, in token columns over all rows (`Runner.footprint`): the memory a user
        gives generation, filled with as many sequences as it holds. A request longer than the whole
        budget still runs, alone. With a budget, rows share a prefix instead of copying it
        (`Runner`), so that the budget holds more of them. ``vision_cache_mib`` / ``prefix_cache_mib`` of 0 turn that reuse off
        (for comparisons);
        ``eos_token_ids`` replaces the default end-of-sequence set (generation_config's, <|im_end|>,
        <|endoftext|>)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = HFModel(model, processor)
        self.tokenizer = processor.tokenizer
        self.format = format or PromptFormat()
        self.defaults = defaults or SamplingParams()
        self.skip_special_tokens = skip_special_tokens
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.reuse = Reuse(
            LRUCache[VisualFeatures](vision_cache_mib * MiB) if vision_cache_mib > 0 else None,
            LRUCache[PrefixState](prefix_cache_mib * MiB) if prefix_cache_mib > 0 else None,
            min_prefix_tokens,
        )
        self.eos = frozenset(eos_token_ids if eos_token_ids is not None else self._default_eos(model))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        self.lock = threading.RLock()
        self.closed = False  # `shutdown` was called

    @classmethod
    def from_config(cls, cfg: Config, **options: Any) -> HFEngine:
        """Load the config's model (adapters merged, quantized if asked) on the best device, and wrap it.

        ``options`` are HFEngine keyword arguments (e.g. max_batch_size).
        """
        from eqakit.model.load import load_inference_model, load_processor, pick_device, pick_dtype

        device = pick_device()
        dtype = pick_dtype(cfg.model.infer_dtype, device)
        processor = load_processor(cfg.model)
        model = load_inference_model(cfg.model, device=device, dtype=dtype)
        return cls(
            model,
            processor,
            format=PromptFormat.from_config(cfg),
            defaults=SamplingParams.from_generating(cfg.generating),
            skip_special_tokens=cfg.generating.skip_special_tokens,
            **options,
        )

    def _default_eos(self, model: Any) -> set[int]:
        ids = set(self.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if configured is not None:
            ids |= set(configured if isinstance(configured, list | tuple) else [configured])
        return ids

    # ---- requests ----------------------------------------------------------------------------

    def params(self, **overrides: Any) -> SamplingParams:
        """The config's decoding defaults with some fields replaced (None means "keep the default")."""
        return self.defaults.replace(**overrides)

    def plan(
        self,
        messages: list[Message],
        image_sizes: list[tuple[int, int]],
        system: str | None = None,
        videos: Sequence[VideoInfo] = (),
    ) -> Plan:
        """Check that a prompt fits cutoff_len from its image sizes and probed videos alone (raises
        PromptTooLong / RequestError).

        What `prepare` will do, minus the pixels: a dataset can be checked before its images are decoded.
        """
        return plan_prompt(
            messages, image_sizes, system, self.tokenizer, self.model.geometry, self.format, list(videos)
        )

    def prepare(self, request: Request) -> Prepared:
        """Render and tokenize a request (raises RequestError / PromptTooLong); cheap, no model work."""
        return prepare_request(request, self.tokenizer, self.model, self.format)

    def shutdown(self) -> None:
        """Stop: release the cached visual features and prefixes (and the accelerator memory they
        held); a later request raises EngineUnavailable, as on the vLLM backend. Idempotent."""
        with self.lock:
            self.closed = True
            for cache in (self.reuse.vision_cache, self.reuse.prefix_cache):
                if cache is not None:
                    cache.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def placement(self) -> dict[str, str]:
        return {
            "backend": "transformers",
            "device": str(self.model.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
        }

    def scheduler(self) -> Scheduler:
        """A fresh batch on this engine's model, caches and lock, with its admission rule (for
        `generate_iter`, `stream` and `EngineWorker` alike)."""
        if self.closed:
            raise EngineUnavailable("the engine is shut down")
        runner = Runner(
            self.model,
            self.tokenizer,
            reuse=self.reuse,
            eos=self.eos,
            pad_id=self.pad_id,
            skip_special_tokens=self.skip_special_tokens,
            lock=self.lock,
            share_prefixes=self.max_batch_tokens is not None,
        )
        return Scheduler(runner, self.max_batch_size, self.max_batch_tokens)

    # ---- generation --------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request | Prepared]) -> list[Completion]:
        """Completions of all requests, in order. Every request is checked before any is run; one
        that fails raises `RequestFailed`."""
        prepared = [r if isinstance(r, Prepared) else self.prepare(r) for r in requests]
        results = dict(self.generate_iter(prepared))
        return [results[i] for i in range(len(prepared))]

    def generate_iter(self, requests: Iterable[Request | Prepared]) -> Iterator[tuple[int, Completion]]:
        """(index, completion) pairs as requests finish, reading ``requests`` lazily as room frees up.

        Put requests that share frames next to each other: they are admitted together and share one
        prefix prefill. A request that fails (its prefill or a step raises) raises `RequestFailed`.
        """
        source = enumerate(requests)
        finished: deque[tuple[int, Completion]] = deque()
        failed: list[RequestFailed] = []
        exhausted = False

        def fail(index: int, error: BaseException) -> None:
            failed.append(RequestFailed(index, error))
            failed[-1].__cause__ = error

        def take(_: bool) -> Job | None:
            nonlocal exhausted
            item = None if exhausted else next(source, None)
            if item is None:
                exhausted = True
                return None
            index, request = item
            prepared = request if isinstance(request, Prepared) else self.prepare(request)
            return Job(
                prepared,
                on_done=lambda c, i=index: finished.append((i, c)),
                on_error=lambda e, i=index: fail(i, e),
            )

        scheduler = self.scheduler()
        while True:
            scheduler.advance(take)
            while finished:
                yield finished.popleft()
            if failed:
                raise failed[0]
            if exhausted and scheduler.idle:
                return

    def stream(self, request: Request) -> TextStream:
        """Text deltas of one request; the request is checked now, generation runs as you iterate."""
        return TextStream(self._stream(self.prepare(request)))

    def _stream(self, prepared: Prepared) -> Generator[str, None, Completion]:
        deltas: deque[str] = deque()
        done: list[Completion] = []
        failed: list[BaseException] = []
        waiting = [Job(prepared, on_done=done.append, on_delta=deltas.append, on_error=failed.append)]
        scheduler = self.scheduler()
        while True:
            scheduler.advance(lambda _: waiting.pop() if waiting else None)
            while deltas:
                yield deltas.popleft()
            if failed:
                raise failed[0]
            if done:
                return done[0]

    def chat(self, messages: list[dict[str, Any]], *, system: str | None = None, **params: Any) -> Completion:
        """One reply to a conversation, with the config's decoding defaults overridden by ``params``."""
        return self.generate([Request(messages, self.params(**params), system=system)])[0]
