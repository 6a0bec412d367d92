"""Peak accelerator memory of a run, estimated before any weight loads: `eqakit config FILE --memory`.

"How much GPU memory do I need?" is answered from what a run knows before its first heavy step: the
checkpoint's config.json (shapes; parameter counts from a meta-device skeleton), the token counts
its preflight planned for every sample, and the keys. Each term is something the accelerator holds:

- weights, in the dtype the run computes in (trainable ones in fp32; ``quantization_bit``'s linear
  layers in 4 or 8 bits);
- what trains: LoRA's fp32 weights, every trainable weight's fp32 gradient and optimizer state;
- training's vision feature cache (each distinct image's features, once), and while it is built,
  the vision tower's working set;
- activations under gradient checkpointing: a checkpointed layer keeps its input hidden state, and
  in the backward pass one layer at a time recomputes all of its activations;
- logits: fp32 over the vocabulary at every position of a micro-batch, or only at the answer
  tokens when packing;
- predict and serving: the batch's KV cache, the engine's caches of image features and prompt
  prefixes, the vision tower over the batch's images and a prefill's working set.

Terms are not all alive at once: the logits are freed before the backward pass recomputes a layer,
an evaluation step's never meet a training step's, and the cache is built before anything trains.
So the estimate adds up, at each such moment, the terms alive then; the peak is the largest sum.
It compares with ``torch.cuda.max_memory_allocated``, not with nvidia-smi, which adds the CUDA
context and what the allocator keeps cached. tests/test_memory.py checks it against the measured
peak of real runs on the CPU (the tiny model, and Qwen3-VL-2B's widths in fp32 and bf16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from eqakit.memory.inference import predict, serving
from eqakit.memory.terms import Estimate
from eqakit.memory.training import training

if TYPE_CHECKING:
    from eqakit.config import Config


def estimate(kind: str, cfg: Config, found: Any, device: torch.device | None = None) -> Estimate:
    """The estimate for the stage ``kind`` and ``cfg`` describe (train, predict: a train config with
    do_predict, serve: an infer config), from what its preflight ``found`` (`eqakit.train.sft.Checked`,
    `eqakit.evaluate.predict.Checked`), on ``device`` (default: the run's here)."""
    from eqakit.model.load import pick_device

    if kind == "train":
        device = device or cfg.training.device
        if cfg.training.do_predict:
            return predict(cfg, found.samples, found.sizes, found.videos, device)
        return training(cfg, found, device)
    return serving(cfg, device or pick_device())
