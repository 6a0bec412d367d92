"""The engine a config asks for, and the worker that batches requests for it.

``infer_backend: huggingface`` (the default) gives eqakit's transformers engine (`eqakit.engine.hf`),
``infer_backend: vllm`` vLLM's (`eqakit.engine.vllm`). Both implement
`eqakit.engine.base.InferenceEngine`; their callers use that interface only.

    engine = load_engine(load_config("infer", "configs/infer_openeqa.yaml"))
    worker = make_worker(engine, batch_window_s=0.01).start()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eqakit.engine.base import InferenceEngine, Worker
from eqakit.engine.hf.engine import HFEngine
from eqakit.engine.hf.worker import EngineWorker

if TYPE_CHECKING:
    from eqakit.config.load import Config


def load_engine(
    cfg: Config, *, max_batch_size: int | None = None, max_batch_tokens: int | None = None
) -> InferenceEngine:
    """Load the config's model on its backend.

    ``max_batch_size``: the transformers engine's batch (None: 8), vLLM's max_num_seqs (None: vLLM's).
    ``max_batch_tokens``: the transformers engine's KV-cache budget (`HFEngine`); vLLM manages its own
    cache within vllm_gpu_util (the config refuses api_max_batch_tokens with vLLM).
    """
    if cfg.model.infer_backend == "vllm":
        from eqakit.engine.vllm import VllmEngine  # vLLM is optional: imported only when asked for

        return VllmEngine.from_config(cfg, max_batch_size=max_batch_size)
    options: dict[str, int] = {"max_batch_size": max_batch_size} if max_batch_size else {}
    return HFEngine.from_config(cfg, max_batch_tokens=max_batch_tokens, **options)


def make_worker(engine: InferenceEngine, *, batch_window_s: float = 0.01) -> Worker:
    """A worker over ``engine``, not started yet (``.start()`` it). ``batch_window_s``: how long the transformers engine's worker
    waits for more requests to start with the first (vLLM schedules continuously and has no window;
    the config refuses api_batch_window_ms with vLLM)."""
    if isinstance(engine, HFEngine):
        return EngineWorker(engine, batch_window_s=batch_window_s)
    from eqakit.engine.vllm import VllmEngine, VllmWorker

    if isinstance(engine, VllmEngine):
        return VllmWorker(engine)
    raise TypeError(f"no worker for the engine {type(engine).__name__}")
