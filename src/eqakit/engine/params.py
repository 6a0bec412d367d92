"""What a caller asks the engine for, and what it gets back.

`SamplingParams` carries LLaMA-Factory's decoding keys with their meanings (``do_sample: false`` or
``temperature: 0`` decode greedily; ``top_k: 0`` means no limit) plus the per-request extras the API
needs (stop strings, a seed). Values are checked when the object is built, so a bad request fails
before any model work with a `RequestError` that names the offending field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from PIL import Image

from eqakit.config.args import GeneratingArguments
from eqakit.data.template import Message
from eqakit.data.video import Video
from eqakit.errors import EqakitError

FinishReason = Literal["stop", "length"]


class RequestError(EqakitError):
    """A request the engine cannot run; ``param`` names the offending field (for API error bodies)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLong(RequestError):
    """The prompt does not fit cutoff_len even with its images scaled down to the smallest allowed size."""


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request (LLaMA-Factory semantics)."""

    max_new_tokens: int = GeneratingArguments.max_new_tokens  # defaults: the config's (one home)
    temperature: float = GeneratingArguments.temperature
    top_p: float = GeneratingArguments.top_p
    top_k: int = GeneratingArguments.top_k
    do_sample: bool = GeneratingArguments.do_sample
    repetition_penalty: float = GeneratingArguments.repetition_penalty
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        problems = list(self._problems())
        if problems:
            param, reason = problems[0]
            raise RequestError(f"{param} {reason}", param=param)

    def _problems(self) -> Any:
        def number(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        if (
            not isinstance(self.max_new_tokens, int)
            or isinstance(self.max_new_tokens, bool)
            or self.max_new_tokens < 1
        ):
            yield "max_new_tokens", f"must be a positive integer, got {self.max_new_tokens!r}"
        if not number(self.temperature) or self.temperature < 0:
            yield "temperature", f"must be a number >= 0 (0 decodes greedily), got {self.temperature!r}"
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            yield "top_p", f"must be in (0, 1], got {self.top_p!r}"
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            yield "top_k", f"must be an integer >= 0 (0: no limit), got {self.top_k!r}"
        if not number(self.repetition_penalty) or self.repetition_penalty <= 0:
            yield "repetition_penalty", f"must be a number > 0 (1.0: none), got {self.repetition_penalty!r}"
        if not isinstance(self.do_sample, bool):
            yield "do_sample", f"must be true or false, got {self.do_sample!r}"
        if any(not isinstance(s, str) or not s for s in self.stop):
            yield "stop", f"must be non-empty strings, got {list(self.stop)!r}"
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            yield "seed", f"must be an integer, got {self.seed!r}"

    @property
    def greedy(self) -> bool:
        """LLaMA-Factory decodes greedily when do_sample is false or the temperature is 0."""
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_generating(cls, args: GeneratingArguments, **overrides: Any) -> SamplingParams:
        """The config's generating keys (predict, chat, api defaults), with per-request overrides."""
        names = {f.name for f in fields(cls)}
        base = {k: getattr(args, k) for k in names if hasattr(args, k)}
        return cls(**{**base, **overrides})

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (None values are ignored: "not given")."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class Request:
    """One conversation to continue.

    ``messages`` use OpenAI's shape: role system/user/assistant, content a string or a list of parts
    (``{"type": "text", "text": ...}``, ``{"type": "image", "image": PIL.Image}``). Image parts without
    an ``image`` (and LLaMA-Factory ``<image>`` placeholders in text) take ``images`` in order; video
    parts (``{"type": "video", "video": Video}``, ``<video>``) take ``videos`` likewise.
    ``system`` is used when the messages have no system message. ``enable_thinking`` overrides the
    config's for this request (qwen3_vl template: the web UI's thinking switch); None keeps it.
    """

    messages: list[Message]
    params: SamplingParams = field(default_factory=SamplingParams)
    images: list[Image.Image] = field(default_factory=list)
    system: str | None = None
    enable_thinking: bool | None = None
    videos: list[Video] = field(default_factory=list)


@dataclass
class Completion:
    """The engine's answer to one request."""

    text: str
    token_ids: list[int]  # generated tokens, including a final end-of-turn token when one was produced
    prompt_tokens: int  # text and image tokens of the prompt
    finish_reason: FinishReason

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
