"""transformers' Trainer plus the two exact speed-ups: cached visual features and shared-prefix packing.

Everything else (optimizer, schedule, accumulation, clipping, logging, checkpoints, DDP, DeepSpeed)
is the Trainer's own, so the TrainingArguments keys behave exactly as documented there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from eqakit.train.packing import EpisodeBatchSampler, PackedCollator, packed_inputs, packed_loss
from eqakit.train.vision_cache import VisionFeatureCache


class EqakitTrainer(Trainer):
    """Trainer whose batches may carry image keys (looked up in ``vision_cache``) or packed rows."""

    def __init__(
        self,
        *args: Any,
        vision_cache: VisionFeatureCache | None = None,
        episode_groups: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.vision_cache = vision_cache
        self.episode_groups = episode_groups

    def _get_collator_with_removed_columns(self, data_collator: Any, description: str | None = None) -> Any:
        """eqakit's collators emit exactly what compute_loss consumes (image keys, packing layout)."""
        return data_collator

    def get_train_dataloader(self) -> DataLoader:
        if self.episode_groups is None:
            return super().get_train_dataloader()
        sampler = EpisodeBatchSampler(self.episode_groups, self._train_batch_size, self.args.seed)
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=PackedCollator(self.processing_class.tokenizer.pad_token_id),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers
            and self.args.dataloader_num_workers > 0,
        )
        return self.accelerator.prepare(loader)

    def _encoder_outputs(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        keys = inputs.pop("image_keys", None)
        if not keys:
            return None
        return self.vision_cache.encoder_outputs(keys)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        encoder_outputs = self._encoder_outputs(inputs)
        if "packed_targets" not in inputs:
            if encoder_outputs is not None:
                inputs["mm_encoder_outputs"] = encoder_outputs
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        dtype = next(base.parameters()).dtype
        model_inputs = packed_inputs(base.model.get_rope_index, inputs, dtype)
        extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
        if encoder_outputs is not None:
            extra["mm_encoder_outputs"] = encoder_outputs
            extra.pop("pixel_values", None)

        def logits_for(positions: torch.Tensor) -> torch.Tensor:
            return model(**model_inputs, **extra, logits_to_keep=positions).logits

        loss = packed_loss(logits_for, inputs)
        return (loss, None) if return_outputs else loss
