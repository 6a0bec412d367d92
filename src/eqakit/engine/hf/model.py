"""The transformers backend: the three things the engine asks of a Qwen-VL model.

(1) visual features of images (vision tower + merger, and Qwen3-VL's deepstack mergers), (2) M-RoPE positions of
a prompt, (3) a forward pass of the language model over new tokens with a KV cache, explicit
positions and a padding mask, returning the last position's logits. Working at this level, rather
than through ``model.generate``, is what lets the engine reuse features and prefix caches and mix
requests in one batch. Visual features enter through the model's own ``mm_encoder_outputs``
argument, so image tokens are filled (and deepstack features added) by transformers' code.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from eqakit.data.encode import (
    Geometry,
    PadIds,
    VideoPlan,
    mm_token_types,
    pixel_values,
    video_pixel_values,
    video_times,
)
from eqakit.engine.hf.attention import SharedPrefix
from eqakit.engine.hf.attention import install as install_shared_prefix_attention
from eqakit.engine.hf.caches import VisualFeatures
from eqakit.model.arch import deepstack_of, encoder_output

VISION_CHUNK = 16  # images per vision-tower call: bounds activation memory on large batches


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor``, built on the host, on ``device`` without making the host wait for the device.

    A blocking copy to CUDA synchronises the stream: the host waits for every kernel queued before
    it. So the tensor goes through page-locked memory (PyTorch's caching host allocator, which keeps
    a block until the copy from it is done) and is copied asynchronously, in stream order. Other
    devices (MPS) copy as usual.
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def unwrap(model: Any) -> Any:
    """The Qwen-VL model inside a PEFT wrapper (adapters stay active: PEFT injects them in place)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(base, "model") and hasattr(base.model, "language_model") and hasattr(base, "lm_head")):
        raise TypeError(f"the engine runs Qwen-VL models; got {type(base).__name__}")
    return base


class HFModel:
    """A loaded Qwen-VL (possibly with unmerged adapters) and its image processor."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model
        self.core = unwrap(model)
        self.image_processor = processor.image_processor
        self.video_processor = getattr(processor, "video_processor", None)
        self.device = next(self.core.parameters()).device
        self.dtype = self.core.lm_head.weight.dtype
        self.image_token_id = int(self.core.config.image_token_id)
        self.pads = PadIds(self.image_token_id, int(self.core.config.video_token_id))
        self.geometry = Geometry.of(self.core.config)
        # transformers renamed the KV-cache argument (past_key_values -> cache) within 5.x; a cache
        # passed under the other name is swallowed by **kwargs and every decode step silently
        # recomputes without it, so the name is read off the model's own signature.
        forward = inspect.signature(self.core.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        install_shared_prefix_attention(self.core.model.language_model)

    def image_features(
        self, images: list[Any], min_pixels: int, max_pixels: int, grids: list[tuple[int, int, int]]
    ) -> list[VisualFeatures]:
        """Features of images resized within [min_pixels, max_pixels] to their planned ``grids``, as the
        processor would for a prompt (`eqakit.data.encode.pixel_values`: training's pixels)."""
        out: list[VisualFeatures] = []
        for start in range(0, len(images), VISION_CHUNK):
            end = start + VISION_CHUNK
            pixels, grid = pixel_values(
                images[start:end], self.image_processor, min_pixels, max_pixels, grids[start:end]
            )
            result = self.core.model.get_image_features(
                pixels.to(self.device), grid.to(self.device), return_dict=True
            )
            levels = deepstack_of(result)
            for i, embeds in enumerate(result.pooler_output):
                out.append(VisualFeatures(embeds, tuple(level[i] for level in levels)))
        return out

    def video_features(self, frames: tuple[Any, ...], video: VideoPlan, min_pixels: int) -> VisualFeatures:
        """Features of one planned video's frames (`eqakit.data.encode.video_pixel_values`: training's)."""
        if self.video_processor is None:
            raise TypeError("the checkpoint's processor has no video processor")
        pixels, grid = video_pixel_values(list(frames), self.video_processor, video, min_pixels)
        result = self.core.model.get_video_features(
            pixels.to(self.device), grid.to(self.device), return_dict=True
        )
        return VisualFeatures(result.pooler_output[0], tuple(level[0] for level in deepstack_of(result)))

    def rope_positions(
        self, ids: torch.Tensor, grids: list[tuple[int, int, int]], videos: list[VideoPlan] | tuple[()] = ()
    ) -> torch.Tensor:
        """M-RoPE positions (3, length) of a prompt whose image and video pads are already expanded."""
        mm = mm_token_types(ids, self.pads)
        grid = torch.tensor(grids, dtype=torch.long) if grids else None
        video_grid = torch.tensor([v.grid for v in videos], dtype=torch.long) if videos else None
        positions, _ = self.core.model.get_rope_index(
            ids[None], mm[None], image_grid_thw=grid, video_grid_thw=video_grid, **video_times(list(videos))
        )
        return positions[:, 0]

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: Any,
        features: list[VisualFeatures],
        *,
        logits: bool = True,
        shared: SharedPrefix | None = None,
        video_features: list[VisualFeatures] | tuple[()] = (),
    ) -> torch.Tensor | None:
        """Run new tokens (B, T) at ``positions`` (3, B, T) over ``cache``; ``mask`` (B, cached + T) marks
        real tokens (the three on the host). ``features`` fill the image pads of ``ids`` in row-major
        order, ``video_features`` its video pads; ``shared`` names the prefixes rows continue, attended
        to in place of cached columns. Returns the float32 logits (B, vocab) of each row's last position."""
        encoder_outputs = {}
        for medium, feats in (("image", features), ("video", video_features)):
            if feats:
                levels = len(feats[0].deepstack)
                encoder_outputs[medium] = encoder_output(
                    tuple(f.embeds for f in feats),
                    [tuple(f.deepstack[level] for f in feats) for level in range(levels)],
                )
        # no padding and no shared prefix: no mask, so sdpa runs its fused causal kernel (`attention._mask`)
        plain = shared is None and bool(mask.numpy().all())
        out = self.core.model(
            input_ids=upload(ids, self.device),
            attention_mask=None if plain else upload(mask, self.device),
            position_ids=upload(positions, self.device),
            mm_encoder_outputs=encoder_outputs or None,
            use_cache=True,
            **{self._cache_arg: cache},
            **({"shared_prefix": shared} if shared is not None else {}),
        )
        if not logits:
            return None
        return self.core.lm_head(out.last_hidden_state[:, -1]).float()
