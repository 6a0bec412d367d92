"""Stop strings are found as the text grows, in time linear in the text (`StopMatcher`)."""

from __future__ import annotations

import random
import time

from eqakit.engine.hf.text import StopMatcher


def brute(text: str, stops: tuple[str, ...]) -> tuple[int | None, int]:
    """Where the first stop string starts, and the longest end of ``text`` that is a proper prefix
    of one (what the matcher must say), by trying every position and length."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    held = max(
        (k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
        default=0,
    )
    return (min(hits) if hits else None), held


def test_the_matcher_agrees_with_brute_force_piece_by_piece() -> None:
    rng = random.Random(0)
    for _ in range(300):
        stops = tuple(
            "".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))
        )
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        matcher, end = StopMatcher(stops), 0
        while end < len(text):
            end = min(len(text), end + rng.randint(1, 4))
            first, held = matcher.feed(text[:end])
            expected_first, expected_held = brute(text[:end], stops)
            if first is not None or expected_first is not None:  # the step the first stop appears in
                assert first == expected_first, (stops, text[:end])
                break
            assert held == expected_held, (stops, text[:end])


def test_text_that_changes_behind_the_end_is_read_anew() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("a ST") == (None, 2)
    assert matcher.feed("b STO") == (None, 3)  # not an extension: read from the start
    assert matcher.feed("b STOP here") == (2, 0)


def test_long_stop_strings_cost_linear_time() -> None:
    """16 stop strings of 30,000 characters, 400 steps of generated text: a few hundred ms (the
    former per-token rescan took seconds per step here)."""
    rng = random.Random(1)
    stops = tuple("x" * 29_999 + str(i % 10) for i in range(16))
    matcher = StopMatcher(stops)
    text = ""
    started = time.perf_counter()
    for _ in range(400):
        text += "".join(rng.choice("xy ") for _ in range(4))
        first, _ = matcher.feed(text)
        assert first is None
    assert time.perf_counter() - started < 5.0
