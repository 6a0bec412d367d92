"""The OpenAI chat-completions schema: request validation, response and stream-chunk shapes, error bodies.

Requests are validated strictly (a string where a number belongs is an error, not a guess), unknown
fields are ignored as OpenAI-compatible servers commonly do, and OpenAI features eqakit does not
implement (tools, logprobs, penalties...) are refused by name rather than silently dropped. Every
problem becomes an `ApiError` that renders as OpenAI's ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        if self.status == 408:  # the rest of a stalled body will not be read: the connection ends
            headers = {"Connection": "close"}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ---- requests --------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    """A video file (a data:video/...;base64 URI, a URL or a media-dir path), or its frames as image URLs."""

    url: str | list[str]


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    # "developer" is OpenAI's newer name for the system message.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None  # refused when not empty: this server runs no tools


class StreamOptions(_Strict):
    include_usage: bool = False


# OpenAI request fields eqakit does not implement, with the value that means "not used".
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "function_call": (None, "none"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "audio": (None,),
    "prediction": (None,),
}


class ChatCompletionRequest(_Strict):
    """POST /v1/chat/completions. ``top_k`` and ``repetition_penalty`` are extensions (as in vLLM)."""

    model: str | None = None  # any name: the server answers with the model it serves
    messages: list[ChatMessage]
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """A validated request from a raw body (raises ApiError 400 naming the field)."""
    try:
        # strict=False: tolerate raw newlines inside strings
        data = json.loads(body, strict=False, object_pairs_hook=_unique_keys)
    except DuplicateKey as exc:
        raise ApiError(400, f"the request body repeats the key {exc.key!r}; send each key once") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    _check_unicode(data)
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        message, param = describe_validation_error(exc, data)
        raise ApiError(400, message, param=param) from None
    except RecursionError:
        raise ApiError(400, "the request is nested too deeply") from None
    for name, unused in UNSUPPORTED.items():
        if name in data and not any(
            data[name] == value and type(data[name]) is type(value) for value in unused
        ):
            raise ApiError(400, f"{name} is not supported by this server; remove it", param=name)
    response_type = (request.response_format or {}).get("type", "text")
    if response_type != "text":
        raise ApiError(
            400, f"response_format {response_type!r} is not supported; only text", param="response_format"
        )
    if request.modalities and set(request.modalities) != {"text"}:
        raise ApiError(400, "only the text output modality is supported", param="modalities")
    if not request.messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    for i, message in enumerate(request.messages):
        if message.role in ("system", "developer", "user") and message.content is None:
            raise ApiError(
                400, f"messages[{i}]: a {message.role} message needs content", param=f"messages[{i}].content"
            )
        if message.tool_calls:
            raise ApiError(
                400,
                f"messages[{i}].tool_calls: tool calls are not supported by this server; remove them",
                param=f"messages[{i}].tool_calls",
            )
        if message.role != "user" and isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart | VideoPart):
                    medium = "images" if isinstance(part, ImagePart) else "videos"
                    raise ApiError(
                        400,
                        f"messages[{i}].content[{j}]: {medium} are only allowed in user messages, not {message.role}",
                        param=f"messages[{i}].content[{j}]",
                    )
    return request


class DuplicateKey(ValueError):
    """A JSON object names one key twice (json.loads would silently keep the last value)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return data


def _check_unicode(data: Any) -> None:
    """Refuse strings with lone surrogates (JSON's "\\ud800"): no tokenizer or UTF-8 encoder takes them."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            stack += [(f"{path}.{k}" if path else str(k), v) for k, v in node.items()]
            stack += [(path or "request", k) for k in node]
        elif isinstance(node, list):
            stack += [(f"{path}[{i}]", v) for i, v in enumerate(node)]
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(
                    400, f"{path}: the text is not valid Unicode (a lone surrogate)", param=path
                ) from None


def _path(loc: tuple[int | str, ...], data: Any, missing: bool) -> str:
    """A pydantic error location as a path into the request (messages[0].content[1].image_url).

    Pydantic puts union branch names ('str', 'list[...]', discriminator tags) among the field names;
    walking the request itself tells them apart: a field is a key of the object at that point (or,
    for a missing field, the last item).
    """
    out, node = "", data
    for k, item in enumerate(loc):
        if isinstance(item, int) and isinstance(node, list) and 0 <= item < len(node):
            out, node = out + f"[{item}]", node[item]
        elif (
            isinstance(item, str)
            and isinstance(node, dict)
            and (item in node or (missing and k == len(loc) - 1))
        ):
            out, node = (f"{out}.{item}" if out else item), node.get(item)
    return out


def describe_validation_error(exc: ValidationError, data: Any) -> tuple[str, str | None]:
    """The most specific problem of a validation error, as (message, param)."""
    errors = [(e, _path(e["loc"], data, e["type"] == "missing")) for e in exc.errors(include_url=False)]
    deepest = max(path.count(".") + path.count("[") for _, path in errors)
    chosen = [(e, path) for e, path in errors if path.count(".") + path.count("[") == deepest]
    first, param = chosen[0]
    reasons = list(dict.fromkeys(e["msg"] for e, path in chosen if path == param))
    got = "" if first["type"] == "missing" else f" (got {json.dumps(first.get('input'), default=str)[:80]})"
    return f"{param or 'request'}: {'; or '.join(reasons)}{got}", param or None


# ---- responses -------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None

    def sse(self, include_usage: bool) -> str:
        """One Server-Sent Event; ``usage`` is present (null until the last chunk) only when asked for."""
        data = self.model_dump(exclude=None if include_usage else {"usage"}, exclude_none=False)
        for choice in data["choices"]:  # OpenAI omits unset delta fields
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "eqakit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
