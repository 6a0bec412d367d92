"""A request's messages to a fitted prompt plan: the part both backends share.

`bind_images` and `bind_videos` pair a request's images and videos with its parts; `plan_prompt` renders and tokenizes the
conversation through `eqakit.data.encode.plan_sample` (the template and image budget training used)
and fits its images into cutoff_len. The transformers engine expands the plan into model inputs
(`eqakit.engine.hf.prepare`); vLLM receives it as token ids and images (`eqakit.engine.vllm`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from PIL import Image

from eqakit.data.encode import Geometry, Plan, PromptFormat, SampleTooLong, plan_sample
from eqakit.data.template import Message, content_parts
from eqakit.data.video import Video, VideoInfo
from eqakit.engine.params import PromptTooLong, Request, RequestError


def bind_images(request: Request) -> list[Image.Image]:
    """The request's images in prompt order: inline image parts, and ``images`` for parts without one."""
    return _bind(request, "image", request.images, Image.Image, "a decoded PIL image")


def bind_videos(request: Request) -> list[Video]:
    """The request's videos in prompt order: inline video parts, and ``videos`` for parts without one."""
    return _bind(request, "video", request.videos, Video, "a decoded Video")


def _bind(request: Request, kind: str, supplied_list: list[Any], cls: type, what: str) -> list[Any]:
    supplied = iter(supplied_list)
    bound: list[Any] = []
    for i, message in enumerate(request.messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content", param="messages")
        try:
            parts = content_parts(message.get("content"))
        except ValueError as exc:
            raise RequestError(f"messages[{i}]: {exc}", param="messages") from None
        for part in (p for p in parts if p["type"] == kind):
            item = part.get(kind, None)
            if item is None:
                item = next(supplied, None)
                if item is None:
                    raise RequestError(
                        f"messages[{i}] has more {kind} placeholders than the request has {kind}s "
                        f"({len(supplied_list)})",
                        param="messages",
                    )
            if not isinstance(item, cls):
                raise RequestError(
                    f"messages[{i}]: an {kind} part must hold {what}, got {type(item).__name__}",
                    param="messages",
                )
            bound.append(item)
    leftover = sum(1 for _ in supplied)
    if leftover:
        raise RequestError(
            f"the request has {leftover} {kind}(s) more than its messages have {kind} placeholders",
            param="messages",
        )
    return bound


def plan_prompt(
    messages: list[Message],
    image_sizes: list[tuple[int, int]],
    system: str | None,
    tokenizer: Any,
    geometry: Geometry,
    fmt: PromptFormat,
    videos: list[VideoInfo] | tuple[()] = (),
) -> Plan:
    """The prompt's tokens and image sizes within cutoff_len (needs only image sizes, no pixels).

    ``system`` is the conversation's own system prompt (`eqakit.data.template.system_prompt`)."""
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    try:
        return plan_sample(  # thread-safe: requests are planned on several threads at once
            messages,
            image_sizes,
            tokenizer,
            fmt,
            videos=videos,
            system=system,
            add_generation_prompt=True,
            geometry=geometry,
        )
    except SampleTooLong as exc:
        raise PromptTooLong(f"the prompt is too long: {exc}", param="messages") from None
    except ValueError as exc:
        raise RequestError(str(exc), param="messages") from None


def plan_request(
    request: Request, tokenizer: Any, geometry: Geometry, fmt: PromptFormat
) -> tuple[Plan, list[Image.Image], list[Video]]:
    """A request's plan (its own thinking switch applied), its images in prompt order and its videos
    cut to the frames the plan kept; what both backends start from. Raises RequestError
    (PromptTooLong when it cannot fit)."""
    if request.enable_thinking is not None:
        fmt = replace(fmt, enable_thinking=request.enable_thinking)
    images, videos = bind_images(request), bind_videos(request)
    plan = plan_prompt(
        request.messages,
        [im.size for im in images],
        request.system,
        tokenizer,
        geometry,
        fmt,
        [v.info for v in videos],
    )
    return plan, images, [v.keep(p.info) for v, p in zip(videos, plan.videos, strict=True)]
