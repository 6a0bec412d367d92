"""Visual features of each distinct training image, computed once per run.

The vision tower and projector are frozen during LoRA training, and OpenEQA asks ~11 questions
about the same 8 frames (or the same video), so LLaMA-Factory's way (the vision tower on every sample, every epoch)
repeats the same computation ~11 x epochs times. Here every distinct image (by decoded content and
size range: `eqakit.data.encode.features_key`, the engine's key too) goes through the tower once, before the first step; batches then carry keys instead of
pixels and the model receives the stored features (``mm_encoder_outputs``). Exact: the features are
the ones the tower would compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from eqakit.data.encode import PromptFormat, pixel_values, video_pixel_values
from eqakit.model.arch import deepstack_of, encoder_output

if TYPE_CHECKING:
    from eqakit.train.data import KeyedImages

Features = tuple[torch.Tensor, list[torch.Tensor]]  # merged tokens, one tensor per deepstack layer (if any)


class VisionFeatureCache:
    """Image or video key -> (merged visual tokens, deepstack features if the model has them), on
    the model's device."""

    def __init__(self) -> None:
        self.features: dict[bytes, Features] = {}

    def __len__(self) -> int:
        return len(self.features)

    @torch.no_grad()
    def build(
        self,
        model: Any,
        processor: Any,
        fmt: PromptFormat,
        keyed: KeyedImages,
        device: torch.device,
        batch_size: int = 8,
        show_progress: bool = True,
    ) -> None:
        """Run the vision tower over the images and videos ``keyed`` names that are not yet cached."""
        todo = [(k, p, cap) for k, (p, cap) in keyed.wanted.items() if k not in self.features]
        videos = [(k, s, v) for k, (s, v) in keyed.wanted_videos.items() if k not in self.features]
        visual = (
            model.model if hasattr(model, "model") and hasattr(model.model, "get_image_features") else model
        )
        budget = fmt.budget
        bar = tqdm(
            total=len(todo) + len(videos), desc="vision features", unit="item", disable=not show_progress
        )
        by_cap: dict[int, list[tuple[bytes, Path]]] = {}
        for key, path, cap in todo:
            by_cap.setdefault(cap, []).append((key, path))
        for cap, items in by_cap.items():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                pil = [keyed.media.image(path) for _, path in chunk]
                pixels, grid = pixel_values(pil, processor.image_processor, budget.min_pixels, cap)
                out = visual.get_image_features(pixels.to(device), grid.to(device))
                levels = deepstack_of(out)
                for i, (key, _) in enumerate(chunk):
                    self.features[key] = (out.pooler_output[i].detach(), [f[i].detach() for f in levels])
                bar.update(len(chunk))
        for key, source, video in videos:  # one video per call: its frames are many images already
            frames = list(keyed.media.video(source, video.info).frames)
            pixels, grid = video_pixel_values(frames, processor.video_processor, video, fmt.video.min_pixels)
            out = visual.get_video_features(pixels.to(device), grid.to(device))
            self.features[key] = (out.pooler_output[0].detach(), [f[0].detach() for f in deepstack_of(out)])
            bar.update(1)
        bar.close()

    def encoder_outputs(self, image_keys: list[bytes], video_keys: list[bytes] = ()) -> dict[str, Any]:
        """What the model's forward accepts as ``mm_encoder_outputs`` for images and videos in these orders."""
        out = {}
        for medium, keys in (("image", image_keys), ("video", video_keys)):
            if keys:
                pooled = tuple(self.features[k][0] for k in keys)
                layers = len(self.features[keys[0]][1])
                deepstack = [tuple(self.features[k][1][layer] for k in keys) for layer in range(layers)]
                out[medium] = encoder_output(pooled, deepstack)
        return out
