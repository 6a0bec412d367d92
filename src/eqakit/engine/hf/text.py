"""Generated tokens to text, one token at a time: stream deltas and stop strings.

A streamed delta must never show text the final answer will not have, so the tracker holds back
(1) an incomplete UTF-8 character at the end (the tokenizer decodes it as U+FFFD until its last byte
arrives) and (2) a tail that could be the start of a stop string. The concatenated deltas always
equal the final text, and the final text ends before the first stop string, as OpenAI's API does.
"""

from __future__ import annotations

from typing import Any


def _prefix_function(pattern: str) -> list[int]:
    """Knuth-Morris-Pratt: for each position, the length of the longest proper prefix of
    ``pattern[: i + 1]`` that is also its suffix."""
    table = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = table[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        table[i] = k
    return table


class StopMatcher:
    """The stop strings found in text that grows at its end, in time linear in the text.

    One Knuth-Morris-Pratt automaton per stop string reads each new character once, so a request
    with long stop strings costs its neighbours nothing per token (a rescan of the text for every
    stop and every prefix length did: quadratic in the stop's length, per token). It tells where
    the first stop string starts and how much of the text's end could still become one.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._tables = [_prefix_function(stop) for stop in stops]
        self._reset()

    def _reset(self) -> None:
        self._text = ""
        self._states = [0] * len(self._stops)

    def feed(self, text: str) -> tuple[int | None, int]:
        """Read ``text`` (the text so far; what was read before must be its start, else it is read
        anew). Returns where the earliest stop string found starts (None: none yet) and the length
        of the longest end of the text that is a proper prefix of a stop string."""
        if not text.startswith(self._text):
            self._reset()
        first = None
        for i in range(len(self._text), len(text)):
            char = text[i]
            for n, (stop, table) in enumerate(zip(self._stops, self._tables, strict=True)):
                k = self._states[n]
                while k and stop[k] != char:
                    k = table[k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):
                    start = i + 1 - len(stop)
                    first = start if first is None else min(first, start)
                    k = table[k - 1]
                self._states[n] = k
        self._text = text
        return first, max(self._states, default=0)


class TextTracker:
    """The text of one sequence's generated tokens (end-of-turn tokens excluded)."""

    def __init__(
        self, tokenizer: Any, stop: tuple[str, ...], *, skip_special_tokens: bool, live: bool
    ) -> None:
        self._tokenizer = tokenizer
        self._stops = StopMatcher(stop)
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
        end = len(text.rstrip("\ufffd"))  # an incomplete character is not text yet
        first, held = self._stops.feed(text[:end])
        if first is not None:
            self._final = text[:first]
            delta = self._final[self._emitted :]
            self._emitted = len(self._final)
            return delta, True
        safe = max(end - held, self._emitted)
        delta = text[self._emitted : safe]
        self._emitted = safe
        return delta, False

    def finish(self) -> tuple[str, str]:
        """The final text and the delta not yet shown."""
        text = self._final if self._final is not None else self._decode()
        delta = text[self._emitted :]
        self._emitted = len(text)
        return text, delta
