"""Generated tokens to text, one token at a time: stream deltas and stop strings.

A streamed delta must never show text the final answer will not have, so the tracker holds back
(1) an incomplete UTF-8 character at the end (the tokenizer decodes it as U+FFFD until its last byte
arrives) and (2) a tail that could be the start of a stop string. The concatenated deltas always
equal the final text, and the final text ends before the first stop string, as OpenAI's API does.
"""

from __future__ import annotations

from typing import Any


class TextTracker:
    """The text of one sequence's generated tokens (end-of-turn tokens excluded)."""

    def __init__(
        self, tokenizer: Any, stop: tuple[str, ...], *, skip_special_tokens: bool, live: bool
    ) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._skip = skip_special_tokens
        self._live = live or bool(stop)  # decode every step only when someone looks at the text
        self._ids: list[int] = []
        self._emitted = 0
        self._final: str | None = None

    def _decode(self) -> str:
        return self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return the text that is now safe to show and whether a stop string appeared."""
        self._ids.append(token_id)
        if not self._live:
            return "", False
        text = self._decode()
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._final = text[: min(hits)]
            delta = self._final[self._emitted :]
            self._emitted = len(self._final)
            return delta, True
        end = len(text.rstrip("\ufffd"))
        held = max((self._partial_stop(text[:end], stop) for stop in self._stop), default=0)
        safe = max(end - held, self._emitted)
        delta = text[self._emitted : safe]
        self._emitted = safe
        return delta, False

    @staticmethod
    def _partial_stop(text: str, stop: str) -> int:
        """Length of the longest proper prefix of ``stop`` that ``text`` ends with."""
        return next((k for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])), 0)

    def finish(self) -> tuple[str, str]:
        """The final text and the delta not yet shown."""
        text = self._final if self._final is not None else self._decode()
        delta = text[self._emitted :]
        self._emitted = len(text)
        return text, delta
