"""The engine a config asks for: eqakit's transformers engine, or vLLM's (``infer_backend: vllm``).

Both take the same requests (`eqakit.engine.Request`), render them with the same template and image
budget, and offer what their callers use: ``params``, ``prepare``, ``plan``, ``generate_iter``
(predict), ``stream`` (chat) and ``worker`` (api, webui).

    engine = load_engine(load_config("infer", "configs/infer_openeqa.yaml"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eqakit.engine.engine import Engine

if TYPE_CHECKING:
    from eqakit.config.load import Config
    from eqakit.engine.vllm import VllmEngine


def load_engine(
    cfg: Config, *, max_batch_size: int | None = None, max_batch_tokens: int | None = None
) -> Engine | VllmEngine:
    """Load the config's model on its backend.

    ``max_batch_size``: the transformers engine's batch (None: 8), vLLM's max_num_seqs (None: vLLM's).
    ``max_batch_tokens``: the transformers engine's KV-cache budget (`Engine`); vLLM manages its own
    cache within vllm_gpu_util.
    """
    if cfg.model.infer_backend == "vllm":
        from eqakit.engine.vllm import VllmEngine

        return VllmEngine.from_config(cfg, max_batch_size=max_batch_size)
    options: dict[str, int] = {"max_batch_size": max_batch_size} if max_batch_size else {}
    return Engine.from_config(cfg, max_batch_tokens=max_batch_tokens, **options)
