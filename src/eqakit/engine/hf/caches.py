"""The engine's two reuse caches: visual features per image, and KV states per prompt prefix.

OpenEQA asks about a dozen questions about the same 8 frames. Both caches are exact (the vision
tower and projector are frozen, and attention is causal, so a prefix's keys and values do not
depend on what follows it); they only trade memory for repeated work. Each is a least-recently-used
map bounded in bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

V = TypeVar("V")


@dataclass(frozen=True)
class VisualFeatures:
    """The vision tower + merger output of one image: what fills its image-pad tokens.

    ``deepstack`` holds the features Qwen3-VL adds (none for Qwen2.5-VL) to the first language layers' hidden states at
    the image's positions (one tensor per deepstack level).
    """

    embeds: torch.Tensor  # (image tokens, hidden)
    deepstack: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.embeds, *self.deepstack))


@dataclass(frozen=True)
class PrefixState:
    """Keys and values of a prompt prefix, one (keys, values) pair per layer, each (1, heads, length, dim)."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    length: int

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


class LRUCache(Generic[V]):
    """A map that forgets its least recently used entries when it holds more than ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[bytes, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def peek(self, key: bytes) -> V | None:
        """The entry, without counting a hit or refreshing it (for planning, not use)."""
        return self._items.get(key)

    def get(self, key: bytes) -> V | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return value

    def put(self, key: bytes, value: V) -> None:
        """Keep ``value`` (an entry larger than the whole budget is not kept)."""
        size = value.nbytes  # type: ignore[attr-defined]
        if key in self._items or size > self.max_bytes:
            return
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes  # type: ignore[attr-defined]

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
