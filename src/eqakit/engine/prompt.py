"""A request's messages to a fitted prompt plan: the part both backends share.

`bind_images` pairs a request's images with its image parts; `plan_prompt` renders and tokenizes the
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
from eqakit.engine.params import PromptTooLong, Request, RequestError


def bind_images(request: Request) -> list[Image.Image]:
    """The request's images in prompt order: inline image parts, and ``images`` for parts without one."""
    supplied = iter(request.images)
    bound: list[Image.Image] = []
    for i, message in enumerate(request.messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content", param="messages")
        try:
            parts = content_parts(message.get("content"))
        except ValueError as exc:
            raise RequestError(f"messages[{i}]: {exc}", param="messages") from None
        for part in (p for p in parts if p["type"] == "image"):
            image = part.get("image", None)
            if image is None:
                image = next(supplied, None)
                if image is None:
                    raise RequestError(
                        f"messages[{i}] has more image placeholders than the request has images "
                        f"({len(request.images)})",
                        param="messages",
                    )
            if not isinstance(image, Image.Image):
                raise RequestError(
                    f"messages[{i}]: an image part must hold a decoded PIL image, got {type(image).__name__}",
                    param="messages",
                )
            bound.append(image)
    leftover = sum(1 for _ in supplied)
    if leftover:
        raise RequestError(
            f"the request has {leftover} image(s) more than its messages have image placeholders",
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
) -> tuple[Plan, list[Image.Image]]:
    """A request's plan (its own thinking switch applied) and its images in prompt order; what both
    backends start from. Raises RequestError (PromptTooLong when it cannot fit)."""
    if request.enable_thinking is not None:
        fmt = replace(fmt, enable_thinking=request.enable_thinking)
    images = bind_images(request)
    return plan_prompt(
        request.messages, [im.size for im in images], request.system, tokenizer, geometry, fmt
    ), images
