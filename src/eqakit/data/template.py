"""The one place that turns chat messages into Qwen-VL prompt text.

Training, prediction, the API, the web UI and terminal chat all render through here, so a model
is served with exactly the format it was trained on (train/serve template mismatch is the most
common silent bug in this field). Text-level only: `eqakit.data.encode` turns the segments into
token ids, labels and pixel values.

Templates (LLaMA-Factory names):
- ``qwen3_vl_nothink``: Qwen3-VL-Instruct's format. No default system prompt;
  ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn; each image is
  ``<|vision_start|><|image_pad|><|vision_end|>``; the reply follows ``<|im_start|>assistant\\n``.
- ``qwen2_vl``: Qwen2-VL / Qwen2.5-VL's format: the same turns, the default system prompt "You are a
  helpful assistant." (``default_system`` replaces it), images as above.
- ``qwen3_vl``: the same turns for thinking models. With ``enable_thinking: false`` an empty
  ``<think>\\n\\n</think>\\n\\n`` block is put in the prompt (not learned); with thinking enabled an answer
  without a think block gets the empty block in front of it and learns it, as LLaMA-Factory does.

Videos are marked up as the model's architecture times them (`eqakit.data.encode.Geometry`, from
the model's config; never from the template's name): a video of a model with timestamps (Qwen3-VL)
is, per temporal patch of two frames, ``<{t:.1f} seconds><|vision_start|><|video_pad|><|vision_end|>``
(what Qwen's own processor makes of the chat template's ``<|vision_start|><|video_pad|><|vision_end|>``:
transformers 4.57 and >= 5.25, LLaMA-Factory and vLLM; transformers 5.19-5.24 added an outer vision
pair around the patches, which the model never saw in training); a video of a model without them
(Qwen2.5-VL) is the chat template's one ``<|vision_start|><|video_pad|><|vision_end|>``, its frames'
times entering the positions instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NOTHINK = "qwen3_vl_nothink"
THINK = "qwen3_vl"
QWEN2_VL = "qwen2_vl"
TEMPLATES = (NOTHINK, THINK, QWEN2_VL)  # LLaMA-Factory's names; the first is the default
# LLaMA-Factory's template default_system, used when the config's default_system is not set
TEMPLATE_SYSTEM = {QWEN2_VL: "You are a helpful assistant."}
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IMAGE_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
VISION_START, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"
_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")

Message = dict[str, Any]  # {"role": "system"|"user"|"assistant", "content": str | list[part]}
_MISSING: Any = object()


@dataclass(frozen=True)
class Segment:
    """A stretch of prompt text; ``learn`` marks the answer text whose tokens carry labels.

    ``literal`` holds the (start, end) character spans of ``text`` that came from a message (user,
    system or assistant text) rather than from the template: the encoder tokenizes those as plain
    text, so ``<|im_end|>`` typed by a user can never close a turn or forge a system prompt.
    """

    text: str
    learn: bool
    literal: tuple[tuple[int, int], ...] = ()


def video_tokens(clip_times: list[float] | None) -> str:
    """A video's prompt markup: one pad per temporal patch after its time (a timestamped model,
    Qwen3-VL), or with no times (``None``) the chat template's one pad for the whole video
    (Qwen2.5-VL, and what vLLM expands itself); pads are expanded per visual token later."""
    if clip_times is None:
        return f"{VISION_START}{VIDEO_PAD}{VISION_END}"
    return "".join(f"<{t:.1f} seconds>{VISION_START}{VIDEO_PAD}{VISION_END}" for t in clip_times)


class _Builder:
    """Accumulates a segment's text, recording which spans are message text (see `Segment.literal`).

    ``video_times`` holds, for each video in prompt order, its temporal-patch times, or None for
    the chat template's one-pad markup (`video_tokens`).
    """

    def __init__(self, video_times: list[list[float] | None]) -> None:
        self.text = ""
        self.spans: list[tuple[int, int]] = []
        self.videos = iter(video_times)

    def markup(self, text: str) -> None:
        self.text += text

    def literal(self, text: str) -> None:
        if text:
            self.spans.append((len(self.text), len(self.text) + len(text)))
            self.text += text

    def content(self, content: Any) -> None:
        """A user message's content: its text parts literal, its images and videos the vision markup."""
        for part in content_parts(content):
            if part["type"] == "image":
                self.markup(IMAGE_TOKENS)
            elif part["type"] == "video":
                times = next(self.videos, _MISSING)
                if times is _MISSING:
                    raise ValueError("the text has more video placeholders than the sample has videos")
                self.markup(video_tokens(times))
            else:
                self.literal(part["text"])

    def take(self, learn: bool) -> Segment:
        segment = Segment(self.text, learn, tuple(self.spans))
        self.text, self.spans = "", []
        return segment


def content_parts(content: Any) -> list[dict[str, Any]]:
    """Normalise OpenAI-style content (a string or a list of parts) into text and image parts.

    Strings may hold LLaMA-Factory ``<image>`` and ``<video>`` placeholders; each becomes an image or
    video part (bound to the sample's images or videos in order by the caller).
    """
    if content is None:
        return []
    if isinstance(content, str):
        parts: list[dict[str, Any]] = []
        for piece in _PLACEHOLDERS.split(content):
            if piece in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                parts.append({"type": "image" if piece == IMAGE_PLACEHOLDER else "video"})
            elif piece:
                parts.append({"type": "text", "text": piece})
        return parts
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.extend(content_parts(part))
            elif isinstance(part, dict) and part.get("type") == "text":
                out.extend(content_parts(part.get("text", "")))
            elif isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                out.append({"type": "image", **{k: v for k, v in part.items() if k != "type"}})
            elif isinstance(part, dict) and part.get("type") in ("video", "video_url"):
                out.append({"type": "video", **{k: v for k, v in part.items() if k != "type"}})
            else:
                raise ValueError(f"unsupported message content part: {part!r}")
        return out
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def count_parts(messages: list[Message], kind: str = "image") -> int:
    """How many parts of ``kind`` (image or video) the messages hold."""
    return sum(1 for m in messages for p in content_parts(m.get("content")) if p["type"] == kind)


def mismatched_media(messages: list[Message], images: int, videos: int) -> list[str]:
    """Where the messages' image and video placeholders disagree with the media given: one wording
    for a dataset's rows (`eqakit.data.media.MediaCheck`) and a request's (`encode.plan_sample`)."""
    return [
        f"the text has {wanted} {kind} placeholder(s) but the sample has {given} {kind}(s)"
        for kind, given in (("image", images), ("video", videos))
        if (wanted := count_parts(messages, kind)) != given
    ]


def _text(content: Any) -> str:
    return "".join(p.get("text", "") for p in content_parts(content))


def system_prompt(own: str | None, default: str | None) -> str | None:
    """The one rule for the system prompt, LLaMA-Factory's (``system or default_system``): a
    conversation's own system prompt, or ``default_system`` when it has none or an empty one."""
    return own or default


def render(
    messages: list[Message],
    template: str = NOTHINK,
    *,
    enable_thinking: bool = False,
    add_generation_prompt: bool = True,
    system: str | None = None,
    default_system: str | None = None,
    video_times: list[list[float] | None] | None = None,
) -> list[Segment]:
    """Render a conversation as prompt segments. ``video_times`` has an entry per video, in prompt
    order: its temporal-patch times for a timestamped model, or None for the one-pad markup
    (`video_tokens`; the model's `eqakit.data.encode.Geometry` says which). None: no videos.

    With ``add_generation_prompt`` (inference) the messages end with a user turn and the result ends
    with the assistant header. Without it (training) every assistant turn is a learned segment:
    its text, ``<|im_end|>`` and the newline after it. The conversation's own system prompt is its
    first message when that is a system message, else ``system`` (a dataset's system column, a
    request's system field); `system_prompt` decides between it and ``default_system``.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; eqakit renders {' and '.join(TEMPLATES)}")
    thinking_template = template == THINK
    segments: list[Segment] = []
    prompt = _Builder(video_times or [])
    if messages and messages[0].get("role") == "system":
        system, messages = _text(messages[0].get("content")), messages[1:]
    if default_system is None:
        default_system = TEMPLATE_SYSTEM.get(template)
    system = system_prompt(system, default_system)
    if system:
        prompt.markup("<|im_start|>system\n")
        prompt.literal(system)
        prompt.markup("<|im_end|>\n")
    last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "user":
            prompt.markup("<|im_start|>user\n")
            prompt.content(message.get("content"))
            prompt.markup("<|im_end|>\n")
        elif role == "assistant":
            answer = _text(message.get("content"))
            prompt.markup("<|im_start|>assistant\n")
            if thinking_template:
                if i != last_assistant or not enable_thinking:
                    answer = _THINK_BLOCK.sub("", answer)  # earlier turns never keep their reasoning
                if "<think>" not in answer:
                    if enable_thinking:
                        answer = EMPTY_THOUGHT + answer
                    else:
                        prompt.markup(EMPTY_THOUGHT)
            segments.append(prompt.take(learn=False))
            prompt.literal(answer)
            prompt.markup("<|im_end|>\n")
            segments.append(prompt.take(learn=True))
        else:
            raise ValueError(
                f"message {i}: role must be system (first only), user or assistant, got {role!r}"
            )
    if add_generation_prompt:
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("the conversation must end with a user message to generate a reply")
        prompt.markup("<|im_start|>assistant\n")
        if thinking_template and not enable_thinking:
            prompt.markup(EMPTY_THOUGHT)
    if prompt.text:
        segments.append(prompt.take(learn=False))
    return segments


def render_prompt(messages: list[Message], template: str = NOTHINK, **kwargs: Any) -> str:
    """The full prompt text for generation (what the model sees before it answers)."""
    return "".join(s.text for s in render(messages, template, add_generation_prompt=True, **kwargs))


def thinking_template(model_dir: str | Path) -> bool | None:
    """Whether a local checkpoint's own chat template opens a ``<think>`` block in its generation
    prompt (Qwen3-VL-Thinking); None when the directory holds no Qwen chat template (a hub id)."""
    root = Path(model_dir).expanduser()
    text = None
    try:
        if (root / "chat_template.jinja").is_file():
            text = (root / "chat_template.jinja").read_text(encoding="utf-8")
        else:
            for name in ("chat_template.json", "tokenizer_config.json"):
                if (root / name).is_file():
                    text = json.loads((root / name).read_text(encoding="utf-8")).get("chat_template")
                    if text:
                        break
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(text, str) or "<|im_start|>" not in text:
        return None
    generation = text[text.rfind("add_generation_prompt") :]
    return "<think>" in generation


# What a rendered prompt marks a medium with: an image's pad, a video's pads (one per temporal patch,
# each after its "<t seconds>" stamp on Qwen3-VL).
_RENDERED_MEDIA = re.compile(
    r"(?:<\d+(?:\.\d+)? seconds>)?<\|vision_start\|>(?:<\|image_pad\|>|<\|video_pad\|>)+<\|vision_end\|>"
)


def readable(text: str) -> str:
    """A question as a person reads it: without its <image>/<video> placeholders, or, in a rendered
    prompt, without the markup they became (what the web UI shows and an LLM judge is sent)."""
    text = text.replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "")
    return _RENDERED_MEDIA.sub("", text).strip()


def strip_thinking(text: str) -> str:
    """The answer without a leading reasoning block (for scoring and for display as the final answer)."""
    return _THINK_BLOCK.sub("", text).strip() if "</think>" in text else text.strip()
