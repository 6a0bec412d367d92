"""Counting host-device synchronisations on the CPU, the way a GPU would feel them.

On an accelerator, reading a value computed on the device (a token, a flag, a count) makes the host
wait until every kernel queued before it has run. On a CPU nothing waits, so such reads cost
nothing and go unnoticed; `SyncCounter` counts them instead: the aten operators whose result (or
output shape) depends on device values, seen through a `TorchDispatchMode`, and the Python
conversions (``item``, ``int``, ``float``, ``bool``, ``tolist``, use as an index), which under
``torch.inference_mode`` (the engine's) or for ``tolist`` read the tensor without dispatching any
operator. Each conversion counts once, whatever it dispatches underneath. On a CPU a host tensor
looks like a device one, so reads of host tensors count too (the count is an upper bound);
``Tensor.numpy`` is left out: it refuses a device tensor, so what it reads is on the host wherever
the code runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# scalar reads (item, int, float, bool, `if tensor`), and operators whose output size is data-dependent
READS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.repeat_interleave.Tensor,
}
# indexing with a boolean mask first finds the mask's true positions (nonzero)
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# what Python reads from a tensor directly
CONVERSIONS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as syncs:`` counts device reads (``syncs.total``, ``syncs.by_op``)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self._patched: dict[str, Callable[..., Any]] = {}
        self._converting = False

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self._converting and (func in READS or (func in INDEXING and _has_mask(args[1]))):
            self.by_op[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> SyncCounter:
        for name in CONVERSIONS:
            self._patched[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name, original))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        super().__exit__(*exc)

    def _counting(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._converting:  # tolist calling item, say
                return original(tensor, *args, **kwargs)
            self.by_op[f"Tensor.{name}"] += 1
            self._converting = True
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._converting = False

        return read


def _has_mask(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
