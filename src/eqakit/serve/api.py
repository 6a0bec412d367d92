"""`eqakit api`: an OpenAI-compatible chat server over eqakit's engine (step 3.6 of the tutorial).

Features:
- GET /v1/models, POST /v1/chat/completions (OpenAI's schema: string or list content with text and
  image_url parts, temperature, top_p, max_tokens / max_completion_tokens, n, stop, seed, stream
  with OpenAI's Server-Sent Events and ``stream_options.include_usage``), GET /health;
- the ``model`` field accepts any name; responses carry the served model's id;
- concurrent requests are decoded together by one `EngineWorker` (a short batching window, shared
  visual-feature cache and prompt-prefix reuse); the event loop never waits on model work: images
  are decoded and prompts tokenized on worker threads, generation runs on the engine's thread;
- ``infer_backend: vllm`` puts the same API in front of vLLM's engine instead (eqakit.engine.vllm);
- a client that disconnects cancels its generation (and the decoding of its videos);
- video files are decoded on a pool of their own, so a request's body is never parsed behind
  another's video; each request's decoding is bounded in frames, pixels and time
  (``api_max_decoded_frames``, ``api_max_decoded_pixels``, ``api_video_timeout``);
- every bad request gets a 4xx in OpenAI's error shape, and fails only itself: the server keeps
  serving, other requests in its batch are not harmed (see tests/test_api_hostile.py);
- message text is text: special tokens typed by a client (``<|im_end|>``, ``<|image_pad|>``) are
  tokenized as characters, never as control tokens (eqakit.data.encode.TextEncoder);
- slow clients cannot hold connections: headers must arrive within ``api_header_timeout`` and the
  body within ``api_body_timeout`` (408); malformed HTTP gets a JSON 400;
- ``/health`` answers without the API key (for load balancers; it reveals only counters), every
  other route, the OpenAPI schema at ``/openapi.json`` included, needs it;
- API_KEY: ``Authorization: Bearer`` compared in constant time, 401 otherwise;
- SIGTERM (or Ctrl-C): new requests get 503, in-flight ones finish (up to api_drain_timeout), exit 0.

Environment (read here, at the command line only): API_HOST (default 127.0.0.1), API_PORT (8000),
API_KEY (unset: no authentication), API_MODEL_NAME (default: the model directory's name).

    API_PORT=8000 eqakit api configs/infer_openeqa.yaml
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
        -d '{"model": "any", "messages": [{"role": "user", "content": "Hello"}]}'

Raises ConfigError (exit 2) for a bad config or environment variable, EqakitError when the model
cannot be loaded or the port cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from eqakit.config import Config, load_config
from eqakit.config.args import ApiArguments
from eqakit.data.encode import VideoBudget
from eqakit.data.template import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from eqakit.data.video import Video
from eqakit.engine import (
    Completion,
    EngineUnavailable,
    InferenceEngine,
    PromptTooLong,
    RequestError,
    Submission,
    Worker,
    load_engine,
    make_worker,
)
from eqakit.engine import Request as EngineRequest
from eqakit.engine.base import PreparedRequest
from eqakit.errors import ConfigError
from eqakit.serve.images import (
    DecodeAllowance,
    ImagePolicy,
    MiB,
    PixelAllowance,
    RecentImages,
    load_image,
    load_video,
    video_from_frames,
)
from eqakit.serve.protocol import (
    ApiError,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ImagePart,
    ModelCard,
    ModelList,
    Usage,
    VideoPart,
    completion_id,
    now,
    parse_chat_request,
)
from eqakit.serve.server import TRIM, ApiServer, Drain, DrainGate, bind

log = logging.getLogger("eqakit.api")
MAX_STOP = 16
LARGE_BODY = 8 * MiB  # after a request this large, or one that decoded this many pixels,
LARGE_DECODE = 16_000_000  # freed memory is handed back to the OS (see server.DrainGate)
T = TypeVar("T")
MAX_VIDEO_FRAMES = 1024  # frame URLs one video part may list (video_maxlen then samples them)


@dataclass
class Service:
    """What the routes share: the engine and its worker, the limits, and live counters."""

    engine: InferenceEngine
    worker: Worker
    policy: ImagePolicy
    limits: ApiArguments
    model_name: str
    api_key: str | None
    created: int
    drain: Drain  # SIGTERM: new requests get 503, in-flight ones finish
    cancelled: int = 0  # generations stopped because their client went away
    recent: RecentImages = field(default_factory=RecentImages)  # an episode's frames, decoded once
    # Video files are decoded here, never on the threads that parse bodies and decode images; at most
    # half the cores decode videos, so the engine keeps the rest.
    video_decoder: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(
            max(1, (os.cpu_count() or 2) // 2), thread_name_prefix="eqakit-video"
        )
    )


def create_app(
    engine: InferenceEngine,
    *,
    model_name: str = "eqakit",
    api_key: str | None = None,
    settings: ApiArguments | None = None,
) -> FastAPI:
    """The FastAPI app serving ``engine``; its worker thread starts and stops with the app's lifespan."""
    limits = settings or ApiArguments()
    worker = make_worker(engine, batch_window_s=limits.api_batch_window_ms / 1000)
    drain = Drain(limits.api_drain_timeout)
    policy = ImagePolicy.from_args(limits, target_pixels=engine.format.budget.max_pixels)
    service = Service(engine, worker, policy, limits, model_name, api_key or None, now(), drain)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await asyncio.to_thread(worker.close, limits.api_drain_timeout)
        service.video_decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="eqakit",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind the API key
        redirect_slashes=False,  # a 307 would take its Location from the client's Host header
    )
    app.state.service = service
    app.add_middleware(DrainGate, drain=drain)
    _add_error_handlers(app)

    def authorize(request: Request) -> None:
        if service.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), service.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": service.model_name,
            "in_flight": worker.in_flight,
            "peak_batch": worker.peak_batch,
            "cancelled": service.cancelled,
        }

    @app.get("/openapi.json", dependencies=[Depends(authorize)], include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=service.model_name, created=service.created)]).model_dump()

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != service.model_name:
            raise ApiError(
                404,
                f"model {model_id!r} is not served here; this server serves {service.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return ModelCard(id=service.model_name, created=service.created).model_dump()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        body = await _read_body(request, int(limits.api_max_body_mb * MiB), limits.api_body_timeout)
        allowance = PixelAllowance(limits.api_max_request_pixels)
        decoding = DecodeAllowance(
            limits.api_max_decoded_frames, limits.api_max_decoded_pixels, limits.api_video_timeout
        )
        if len(body) >= LARGE_BODY:
            request.scope[TRIM] = True
        try:
            chat = await _off_loop(parse_chat_request, body)
            del body
            prepared = await _prepare(service, chat, allowance, decoding, request)
        finally:
            if allowance.used >= LARGE_DECODE:
                request.scope[TRIM] = True
        submissions = _submit(worker, prepared)
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        if chat.stream:
            return StreamingResponse(
                _events(service, submissions, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        completions = await _results_unless_gone(request, service, submissions)
        if completions is None:
            return Response(status_code=499)  # the client has gone; nobody reads this
        return JSONResponse(_completion(service, completions).model_dump())

    return app


# ---- request handling ------------------------------------------------------------------------------


async def _off_loop(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on a worker thread. A StopIteration escaping it would be set on an asyncio
    future, which asyncio refuses, and the request would hang for ever: it becomes a RuntimeError (500)."""

    def run() -> T:
        try:
            return function(*args)
        except (StopIteration, StopAsyncIteration) as exc:
            raise RuntimeError(f"{type(exc).__name__} in {function.__name__}") from None

    return await asyncio.to_thread(run)


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    too_large = ApiError(
        413, f"the request body is larger than {limit} bytes (api_max_body_mb)", code="request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {timeout_s:g} s (api_body_timeout)", code="timeout"
        ) from None


def _bounded(value: int | None, name: str, high: int, setting: str) -> int | None:
    if value is not None and not 1 <= value <= high:
        raise ApiError(400, f"{name} must be between 1 and {high} ({setting}), got {value}", param=name)
    return value


async def _prepare(
    service: Service,
    chat: ChatCompletionRequest,
    allowance: PixelAllowance,
    decoding: DecodeAllowance,
    request: Request,
) -> list[PreparedRequest]:
    """One prepared engine request per choice (n), media decoded and prompt tokenized off the event
    loop (video files on the service's video pool, stopped if the client leaves)."""
    limits = service.limits
    max_tokens = _bounded(chat.max_tokens, "max_tokens", limits.api_max_new_tokens, "api_max_new_tokens")
    max_tokens = (
        _bounded(
            chat.max_completion_tokens,
            "max_completion_tokens",
            limits.api_max_new_tokens,
            "api_max_new_tokens",
        )
        or max_tokens
    )
    n = _bounded(chat.n, "n", limits.api_max_n, "api_max_n") or 1
    stop = [chat.stop] if isinstance(chat.stop, str) else chat.stop
    if stop is not None and len(stop) > MAX_STOP:
        raise ApiError(400, f"stop may hold at most {MAX_STOP} strings, got {len(stop)}", param="stop")
    media = sum(
        isinstance(p, ImagePart | VideoPart)
        for m in chat.messages
        if isinstance(m.content, list)
        for p in m.content
    )
    if media > limits.api_max_images:
        raise ApiError(
            400,
            f"the request has {media} images and videos, more than the limit of {limits.api_max_images} "
            "(api_max_images)",
            param="messages",
        )
    params = service.engine.params(
        max_new_tokens=max_tokens,
        temperature=chat.temperature,
        top_p=chat.top_p,
        top_k=chat.top_k,
        repetition_penalty=chat.repetition_penalty,
        stop=stop,
        seed=chat.seed,
    )
    videos = await _video_files(service, chat, allowance, decoding, request)
    messages = await _off_loop(
        _engine_messages, chat, service.policy, service.recent, allowance, service.engine.format.video, videos
    )
    first = await _off_loop(service.engine.prepare, EngineRequest(messages, params))
    if chat.seed is None:
        return [first] * n  # each unseeded sampling row draws its own random seed
    return [
        dataclasses.replace(
            first, request=dataclasses.replace(first.request, params=params.replace(seed=seed))
        )
        for seed in ((chat.seed + i) % 2**63 for i in range(n))
    ]


async def _video_files(
    service: Service,
    chat: ChatCompletionRequest,
    allowance: PixelAllowance,
    decoding: DecodeAllowance,
    request: Request,
) -> dict[str, Video]:
    """The request's video files decoded on the video pool, by part position ("i.j"), one after
    another; when the client disconnects, decoding stops at the next frame."""
    budget = service.engine.format.video
    loop = asyncio.get_running_loop()
    videos: dict[str, Video] = {}
    for i, message in enumerate(chat.messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            if not isinstance(part, VideoPart) or not isinstance(part.video_url.url, str) or budget is None:
                continue
            where = f"messages[{i}].content[{j}]"
            job = loop.run_in_executor(
                service.video_decoder,
                load_video,
                part.video_url.url,
                service.policy,
                where,
                budget,
                allowance,
                decoding,
            )
            try:
                while not (await asyncio.wait({job}, timeout=0.2))[0]:
                    if await request.is_disconnected():
                        decoding.cancel()
            except BaseException:
                decoding.cancel()  # the handler was cancelled: so is the decoding
                raise
            videos[f"{i}.{j}"] = job.result()
    return videos


def _engine_messages(
    chat: ChatCompletionRequest,
    policy: ImagePolicy,
    recent: RecentImages | None = None,
    allowance: PixelAllowance | None = None,
    video_budget: VideoBudget | None = None,
    video_files: dict[str, Video] | None = None,
) -> list[dict[str, Any]]:
    """OpenAI messages as the engine's: developer -> system, image_url parts -> decoded images,
    video_url parts -> decoded videos (a video file, already decoded into ``video_files`` by
    `_video_files`, or a list of frame image URLs, decoded here)."""

    def text(value: str, where: str) -> dict[str, Any]:
        for placeholder, part in ((IMAGE_PLACEHOLDER, "image_url"), (VIDEO_PLACEHOLDER, "video_url")):
            if placeholder in value:
                raise RequestError(
                    f"{where}: text must not contain {placeholder!r}; send {part.split('_')[0]}s as {part} parts",
                    param=where,
                )
        return {"type": "text", "text": value}

    def video(url: str | list[str], where: str, key: str) -> dict[str, Any]:
        if video_budget is None:
            raise RequestError(f"{where}: this server's model takes no video", param=where)
        if isinstance(url, str):
            return {"type": "video", "video": (video_files or {})[key]}
        if len(url) > MAX_VIDEO_FRAMES:
            raise RequestError(
                f"{where}: a video of {len(url)} frames; send at most {MAX_VIDEO_FRAMES}", param=where
            )
        frame_policy = dataclasses.replace(policy, target_pixels=video_budget.max_pixels)
        frames = [
            load_image(u, frame_policy, f"{where}.video_url.url[{k}]", recent, allowance)
            for k, u in enumerate(url)
        ]
        return {"type": "video", "video": video_from_frames(frames, video_budget, where)}

    messages = []
    for i, message in enumerate(chat.messages):
        content = message.content if message.content is not None else ""
        if isinstance(content, str):
            parts = [text(content, f"messages[{i}].content")]
        else:
            parts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if isinstance(part, ImagePart):
                    parts.append(
                        {
                            "type": "image",
                            "image": load_image(part.image_url.url, policy, where, recent, allowance),
                        }
                    )
                elif isinstance(part, VideoPart):
                    parts.append(video(part.video_url.url, where, f"{i}.{j}"))
                else:
                    parts.append(text(part.text, where))
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": parts})
    return messages


def _submit(worker: Worker, prepared: list[PreparedRequest]) -> list[Submission]:
    submissions: list[Submission] = []
    try:
        for item in prepared:
            submissions.append(worker.submit(item))
    except BaseException:
        for submission in submissions:
            submission.cancel()
        raise
    return submissions


def _cancel_unfinished(service: Service, submissions: list[Submission]) -> None:
    for submission in submissions:
        if not submission.future.done():
            submission.cancel()
            service.cancelled += 1


async def _results_unless_gone(
    request: Request, service: Service, submissions: list[Submission]
) -> list[Completion] | None:
    """Every choice's completion, or None when the client disconnects first (its generations are cancelled)."""
    results = asyncio.gather(*(s.aresult() for s in submissions))
    try:
        while True:
            done, _ = await asyncio.wait({results}, timeout=0.5)
            if done:
                return results.result()
            if await request.is_disconnected():
                return None
    finally:
        _cancel_unfinished(service, submissions)
        if not results.done():
            results.cancel()


def _usage(completions: list[Completion]) -> Usage:
    prompt = completions[0].prompt_tokens
    generated = sum(c.completion_tokens for c in completions)
    return Usage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)


def _completion(service: Service, completions: list[Completion]) -> ChatCompletion:
    return ChatCompletion(
        id=completion_id(),
        created=now(),
        model=service.model_name,
        choices=[
            Choice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
            for i, c in enumerate(completions)
        ],
        usage=_usage(completions),
    )


async def _events(service: Service, submissions: list[Submission], include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk per choice, content deltas, a finish chunk per choice, usage, [DONE]."""
    request_id, created = completion_id(), now()

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return ChatCompletionChunk(
            id=request_id, created=created, model=service.model_name, choices=choices, usage=usage
        ).sse(include_usage)

    queue: asyncio.Queue[tuple[int, str | None, Exception | None]] = asyncio.Queue()

    async def pump(index: int, submission: Submission) -> None:
        try:
            async for delta in submission.astream():
                queue.put_nowait((index, delta, None))
            queue.put_nowait((index, None, None))
        except Exception as error:  # the engine failed this request; reported as an error event
            queue.put_nowait((index, None, error))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(submissions)]
    try:
        for i in range(len(submissions)):
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        left = len(submissions)
        while left:
            index, delta, error = await queue.get()
            if error is not None:
                log.error("generation failed: %r", error)
                failure = ApiError(500, "the model failed on this request", type="server_error")
                yield f"data: {json.dumps(failure.body())}\n\n"
                return
            if delta is not None:
                yield chunk([ChunkChoice(index=index, delta=Delta(content=delta))])
                continue
            left -= 1
            finish = submissions[index].result(timeout=0).finish_reason
            yield chunk([ChunkChoice(index=index, delta=Delta(), finish_reason=finish)])
        if include_usage:
            yield chunk([], _usage([s.result(timeout=0) for s in submissions]))
        yield "data: [DONE]\n\n"
    finally:
        for task in pumps:
            task.cancel()
        _cancel_unfinished(service, submissions)


# ---- errors --------------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        code = "context_length_exceeded" if isinstance(exc, PromptTooLong) else None
        return ApiError(400, str(exc), param=exc.param, code=code).response()

    @app.exception_handler(EngineUnavailable)
    async def unavailable(_: Request, exc: EngineUnavailable) -> JSONResponse:
        return ApiError(503, str(exc), type="server_error", code="unavailable").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(
            exc.status_code, str(exc.detail), code=str(exc.detail).lower().replace(" ", "_")
        ).response()

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return ApiError(500, "internal server error", type="server_error").response()


# ---- the command -----------------------------------------------------------------------------------


def default_model_name(cfg: Config) -> str:
    """The id /v1/models reports when API_MODEL_NAME is unset: a local model's directory name, or the hub id."""
    path = cfg.model.model_name_or_path or "eqakit"
    return Path(path).name if Path(path).is_dir() else path


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="eqakit api",
        description="Serve a model with an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health).",
        epilog="environment: API_HOST (default 127.0.0.1), API_PORT (8000), API_KEY (Bearer key; unset: open), "
        "API_MODEL_NAME (id reported; default: the model directory's name)",
    )
    parser.add_argument("config", help="infer YAML (e.g. configs/infer_openeqa.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    args = parser.parse_args(argv)

    host = os.environ.get("API_HOST") or "127.0.0.1"
    raw_port = os.environ.get("API_PORT") or "8000"
    if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
        raise ConfigError(f"API_PORT must be a port number (1-65535), got {raw_port!r}")
    api_key = os.environ.get("API_KEY") or None

    cfg = load_config("infer", args.config, args.overrides)
    ImagePolicy.from_args(cfg.api)  # a bad media dir or network fails before the model loads
    sock = bind(host, int(raw_port))
    engine = load_engine(
        cfg, max_batch_size=cfg.api.api_max_batch_size, max_batch_tokens=cfg.api.api_max_batch_tokens
    )
    name = os.environ.get("API_MODEL_NAME") or default_model_name(cfg)
    app = create_app(engine, model_name=name, api_key=api_key, settings=cfg.api)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(
            f"eqakit api: warning: listening on {host} without API_KEY: anyone who can reach it can use it",
            file=sys.stderr,
        )
    print(
        f"eqakit api: serving {name!r} at http://{host}:{raw_port}/v1 (API key {'required' if api_key else 'off'})",
        file=sys.stderr,
    )
    try:
        ApiServer(app, app.state.service.drain, header_timeout_s=cfg.api.api_header_timeout).run(
            sockets=[sock]
        )
    finally:
        engine.shutdown()  # the worker stopped with the app; the engine is this command's to release
    return 0
