"""``infer_backend: vllm``: generation on vLLM's engine (see eqakit.engine.vllm.engine)."""

from eqakit.engine.vllm.engine import VllmEngine, VllmPrepared
from eqakit.engine.vllm.worker import VllmWorker

__all__ = ["VllmEngine", "VllmPrepared", "VllmWorker"]
