"""The batch's KV cache: rows aligned at the right, a padding mask, and room to grow in place.

transformers' DynamicLayer appends a token by concatenating it to the whole cache, a copy of every
key and value at every decode step (for a 2B model with 8 rows of 1,600 tokens, about 1.5 GB per
step; on a CPU that costs more than the step's arithmetic). `GrowingLayer` keeps spare columns
after the last token and writes new ones in place; the cache is copied only when rows join or
leave the batch, or the room runs out. A prefix that rows share (an episode's frames) is not in
the rows at all: each row points at it (`KVBatch.prefixes`), and it is held once.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from eqakit.engine.hf.attention import SharedPrefix
from eqakit.engine.hf.caches import PrefixState
from eqakit.engine.hf.model import upload

ROOM = 64  # spare columns reserved when a layer is (re)allocated, at least


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views of a buffer with spare columns at the end."""

    def __init__(self, room: int = ROOM) -> None:
        super().__init__()
        self.room = room
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self.length = 0

    def fill(self, keys: torch.Tensor, values: torch.Tensor, room: int | None = None) -> None:
        """Replace the contents with ``keys``/``values`` (rows, heads, length, dim), reserving ``room`` columns."""
        rows, heads, length, dim = keys.shape
        spare = self.room if room is None else room
        self._keys = keys.new_empty((rows, heads, length + spare, dim))
        self._values = values.new_empty((rows, values.shape[1], length + spare, values.shape[3]))
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self.length = length
        self._expose()

    def _expose(self) -> None:
        assert self._keys is not None and self._values is not None
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]
        self.dtype, self.device = self._keys.dtype, self._keys.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._keys is None or self._values is None:
            self.fill(key_states, value_states)
            return self.keys, self.values
        new = key_states.shape[2]
        if self.length + new > self._keys.shape[2]:
            self.fill(self.keys, self.values, room=max(self.room, new, self.length // 4))
        self._keys[:, :, self.length : self.length + new] = key_states
        self._values[:, :, self.length : self.length + new] = value_states
        self.length += new
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class KVBatch:
    """Keys and values of the rows being decoded (on ``device``), with ``mask`` (rows, columns): 1
    marks a real token.

    The mask is built and kept on the host, where the rows' layout is known: the model's forward
    pass uploads it, and trimming the columns rows no longer need reads no device value.
    ``prefixes`` holds, per row, the shared prefix the row continues (None: none). Its keys and
    values are not in the row: they stay in the `PrefixState`, once for all rows that share it, and
    attention reads them from there (`eqakit.engine.hf.attention`).
    """

    def __init__(
        self,
        layers: list[GrowingLayer],
        mask: torch.Tensor,
        device: torch.device,
        prefixes: list[PrefixState | None] | None = None,
    ) -> None:
        self.layers = layers
        self.mask = mask
        self.device = device
        self.prefixes = prefixes if prefixes is not None else [None] * int(mask.shape[0])
        self._shared: SharedPrefix | None = None

    @classmethod
    def empty(cls, prefixes: list[PrefixState | None], num_layers: int, device: torch.device) -> KVBatch:
        """One row per prefix, holding nothing yet: its own tokens are appended by the next forward pass."""
        mask = torch.zeros((len(prefixes), 0), dtype=torch.long)
        return cls([GrowingLayer() for _ in range(num_layers)], mask, device, list(prefixes))

    def shared(self) -> SharedPrefix | None:
        """The rows' shared prefixes grouped for attention (None when no row has one), with the rows
        that have none: decided here, once per batch, so that attention never asks the device."""
        if self._shared is None and any(p is not None for p in self.prefixes):
            groups: dict[int, tuple[PrefixState, list[int]]] = {}
            for row, prefix in enumerate(self.prefixes):
                if prefix is not None:
                    groups.setdefault(id(prefix), (prefix, []))[1].append(row)
            alone = [row for row, prefix in enumerate(self.prefixes) if prefix is None]
            self._shared = SharedPrefix(
                tuple((p, self._index(rows)) for p, rows in groups.values()),
                self._index(alone) if alone else None,
            )
        return self._shared

    def _index(self, rows: list[int]) -> torch.Tensor:
        return upload(torch.tensor(rows, dtype=torch.long), self.device)

    def prefix_tokens(self) -> int:
        """Tokens held by the distinct shared prefixes the rows continue."""
        return sum({id(p): p.length for p in self.prefixes if p is not None}.values())

    @classmethod
    def from_states(
        cls, states: list[PrefixState | None], num_layers: int, device: torch.device, room: int = ROOM
    ) -> KVBatch:
        """One row per state (None: an empty row), left-padded to the longest, room reserved after."""
        length = max((s.length for s in states if s is not None), default=0)
        mask = torch.zeros((len(states), length), dtype=torch.long)
        layers = [GrowingLayer(room) for _ in range(num_layers)]
        present = [s for s in states if s is not None]
        if not present:
            return cls(layers, mask, device)
        for row, state in enumerate(states):
            if state is not None:
                mask[row, length - state.length :] = 1
        for i, layer in enumerate(layers):
            k0, v0 = present[0].layers[i]
            keys = k0.new_zeros((len(states), k0.shape[1], length, k0.shape[3]))
            values = v0.new_zeros((len(states), v0.shape[1], length, v0.shape[3]))
            for row, state in enumerate(states):
                if state is not None:
                    k, v = state.layers[i]
                    keys[row, :, length - state.length :] = k[0]
                    values[row, :, length - state.length :] = v[0]
            layer.fill(keys, values, room)
        return cls(layers, mask, device)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def cache(self) -> Cache:
        """A transformers Cache over these layers; the model's forward pass appends to them in place."""
        return Cache(layers=list(self.layers))

    def extend_mask(self, columns: torch.Tensor) -> None:
        """Mask columns (rows, new), on the host, for tokens about to be fed."""
        self.mask = torch.cat([self.mask, columns.to(self.mask.dtype)], dim=1)

    def state(self, row: int) -> PrefixState:
        """One row's keys and values as compact tensors (for the prefix cache); the row must be unpadded."""
        return PrefixState(
            tuple(
                (layer.keys[row : row + 1].clone(), layer.values[row : row + 1].clone())
                for layer in self.layers
            ),
            int(self.mask.shape[1]),
        )

    def select(self, keep: list[int]) -> None:
        """Keep only the given rows, and drop leading columns that are padding in all of them."""
        rows = torch.tensor(keep, dtype=torch.long)
        self.prefixes = [self.prefixes[i] for i in keep]
        self._shared = None
        mask = self.mask[rows]
        lead = int((mask.numpy().cumsum(axis=1) == 0).sum(axis=1).min())  # host data: no device read
        self.mask = mask[:, lead:]
        index = upload(rows, self.device)
        for layer in self.layers:
            layer.fill(layer.keys[index, :, lead:], layer.values[index, :, lead:])

    def merge(self, other: KVBatch) -> None:
        """Append ``other``'s rows, left-padding whichever batch is shorter."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        self.prefixes = self.prefixes + other.prefixes
        self._shared = None
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(other.mask, length, 1)])
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            keys = torch.cat([_left_pad(mine.keys, length, 2), _left_pad(theirs.keys, length, 2)])
            values = torch.cat([_left_pad(mine.values, length, 2), _left_pad(theirs.values, length, 2)])
            mine.fill(keys, values)


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
