"""transformers' Trainer plus the two exact speed-ups: cached visual features and shared-prefix packing
(across each optimizer step: `get_batch_samples`).

Everything else (optimizer, schedule, accumulation, clipping, logging, checkpoints, DDP, DeepSpeed)
is the Trainer's own, so the TrainingArguments keys behave exactly as documented there. One figure
is eqakit's: ``train_loss`` after a resume covers the whole run, as it does for an unbroken one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import EvalPrediction, Trainer
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from eqakit.data.encode import IGNORE_INDEX
from eqakit.model.arch import vision_tower
from eqakit.train.callbacks import COMPLETE_MARKER
from eqakit.train.data import plain_positions
from eqakit.train.packing import (
    EpisodeBatchSampler,
    PackedCollator,
    StandIn,
    micro_batches,
    pack_rows,
    packed_inputs,
    packed_loss,
    packed_positions,
    padded_size,
)
from eqakit.train.vision_cache import VisionFeatureCache

LOSS_TOTAL_FILE = "eqakit_loss_total.json"  # in each checkpoint: the run's summed per-step losses
SKIP = "eqakit_skip"  # marks a micro-batch slot that step packing left empty (see get_batch_samples)
STAND_IN = "eqakit_stand_in"  # marks a micro-batch whose loss counts zero (`StandIn`)
LAYOUT = "eqakit_visual_layout"  # a micro-batch's `VisualLayout`, found on the host


class StepDataset(torch.utils.data.Dataset):
    """The training set as `EpisodeBatchSampler` indexes it: an index, or a `StandIn` for one."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | StandIn) -> dict[str, Any]:
        if isinstance(key, StandIn):
            return {**self.dataset[key.index], STAND_IN: True}
        return self.dataset[key]


class EpochDataLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` reaches its batch sampler (the Trainer calls it each epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def _as_list(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DataLoader's collate function with step packing: the step is packed as a whole later."""
    return features


def learned_tokens(features: list[dict[str, Any]]) -> int:
    """Answer tokens a loss is taken over: labels after the first position (nothing predicts it), as
    transformers counts ``num_items_in_batch``. Counted with numpy: the samples are host tensors
    (``Tensor.numpy`` refuses a device one), so the count never waits for an accelerator."""
    return sum(int(np.count_nonzero(f["labels"].numpy()[1:] != IGNORE_INDEX)) for f in features)


def on_host(batch: dict[str, Any]) -> bool:
    """Whether a batch's tensors are still on the host (the Trainer moves them in `training_step`)."""
    return batch["input_ids"].device.type == "cpu"


def host_input_tokens(batch: dict[str, Any], mode: str, pad_token_id: int | None) -> int:
    """``include_num_input_tokens_seen``'s count for a host batch, as transformers counts it
    (``non_padding``: the attention mask's ones, else the tokens that are not padding; ``all``:
    every token), read with numpy, so that counting waits for nothing on the device."""
    ids = batch["input_ids"]
    if mode != "non_padding":
        return ids.numel()
    if "attention_mask" in batch:
        return int(batch["attention_mask"].numpy().sum())
    return int(np.count_nonzero(ids.numpy() != pad_token_id)) if pad_token_id is not None else ids.numel()


@dataclass(frozen=True)
class VisualLayout:
    """Where a micro-batch's image and video tokens are, found on the host before it moves: their
    counts, and ``positions`` (2, visual tokens), the row and column of each in row-major order,
    which is the order of the features and of a boolean mask's true elements."""

    image_tokens: int
    video_tokens: int
    positions: torch.Tensor

    @classmethod
    def of(cls, input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> VisualLayout:
        ids = input_ids.numpy()
        image, video = ids == image_token_id, ids == video_token_id
        where = torch.from_numpy(np.stack(np.nonzero(image | video)))
        return cls(int(image.sum()), int(video.sum()), where)


@contextlib.contextmanager
def visual_layout_known(base: Any, layout: VisualLayout) -> Iterator[None]:
    """Within it, the Qwen-VL model ``base`` takes where its visual tokens are from ``layout``
    (``positions`` on the model's device) instead of reading the device.

    transformers' forward reads the device to check that a batch has as many image (video) tokens as
    features (``get_placeholder_mask``: twice per medium), and Qwen3-VL adds its deepstack features
    at the visual tokens by boolean-mask indexing (``_deepstack_process``: a nonzero and a masked
    write in the forward, three more in the backward, per deepstack layer). Here the counts are
    checked against the layout's, and the features are added at ``positions`` with the same
    indexing operators given index tensors: the same elements, the same sums, so the same numbers.
    Both are shadowed on the instance for the duration only, where the model has them.
    """
    model = base.model
    text = getattr(model, "language_model", None)
    with contextlib.ExitStack() as stack:
        if hasattr(model, "get_placeholder_mask"):
            stack.enter_context(
                _shadowed(model, "get_placeholder_mask", partial(_placeholders, model, layout))
            )
        if text is not None and hasattr(text, "_deepstack_process"):
            stack.enter_context(_shadowed(text, "_deepstack_process", partial(_add_deepstack, layout)))
        yield


@contextlib.contextmanager
def _shadowed(module: Any, name: str, function: Callable[..., Any]) -> Iterator[None]:
    """``module.name`` is ``function`` within (an instance attribute hides the class's method)."""
    vars(module)[name] = function
    try:
        yield
    finally:
        del vars(module)[name]


def _placeholders(
    model: Any,
    layout: VisualLayout,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor,
    image_features: torch.Tensor | None = None,
    video_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``get_placeholder_mask`` (the same masks), its token counts taken from the host."""
    if input_ids is None:
        return type(model).get_placeholder_mask(
            model, input_ids, inputs_embeds, image_features, video_features
        )
    width = inputs_embeds.shape[-1]
    for medium, tokens, features in (
        ("Image", layout.image_tokens, image_features),
        ("Video", layout.video_tokens, video_features),
    ):
        if features is not None and tokens * width != features.numel():
            raise ValueError(
                f"{medium} features and {medium.lower()} tokens do not match, "
                f"tokens: {tokens}, features: {features.shape[0]}"
            )
    image = (input_ids == model.config.image_token_id).unsqueeze(-1).to(inputs_embeds.device)
    video = (input_ids == model.config.video_token_id).unsqueeze(-1).to(inputs_embeds.device)
    return image, video


def _add_deepstack(
    layout: VisualLayout, hidden_states: torch.Tensor, visual_pos_masks: Any, visual_embeds: torch.Tensor
) -> torch.Tensor:
    """Qwen3-VL's ``_deepstack_process`` at the layout's positions instead of a boolean mask."""
    if visual_embeds.shape[0] != layout.positions.shape[1]:
        raise ValueError(
            f"{visual_embeds.shape[0]} deepstack features for {layout.positions.shape[1]} visual tokens"
        )
    rows, columns = layout.positions[0], layout.positions[1]
    visual_embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype)
    hidden_states = hidden_states.clone()
    hidden_states[rows, columns, :] = hidden_states[rows, columns, :] + visual_embeds
    return hidden_states


@dataclass(frozen=True)
class LossSoFar:
    """A run's training loss up to its step `step`: `loss_sum`, the sum of `steps` per-step losses."""

    step: int
    steps: int  # all of them, except in checkpoints without LOSS_TOTAL_FILE (see `read`)
    loss_sum: float

    @classmethod
    def read(cls, checkpoint: str | Path) -> LossSoFar:
        """The loss so far of the run that wrote `checkpoint`.

        A checkpoint without LOSS_TOTAL_FILE (older eqakit, plain transformers) is rebuilt from its
        logged means: exact up to the last log, which is the checkpoint's own step when save_steps
        is a multiple of logging_steps; steps after the last log are left out of the mean.
        """
        checkpoint = Path(checkpoint)
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        saved = checkpoint / LOSS_TOTAL_FILE
        if saved.is_file():
            record = json.loads(saved.read_text(encoding="utf-8"))
            return cls(int(state["global_step"]), int(record["steps"]), float(record["loss_sum"]))
        total, last = 0.0, 0
        for entry in state["log_history"]:
            if "loss" in entry:
                total += entry["loss"] * (entry["step"] - last)
                last = entry["step"]
        return cls(int(state["global_step"]), last, total)

    @property
    def mean(self) -> float:
        return self.loss_sum / max(self.steps, 1)


def checkpoint_trainable_layers(model: Any, use_reentrant: bool) -> None:
    """Gradient checkpointing as LLaMA-Factory applies it: on every layer that holds trainable weights.

    Such a layer keeps only its input and recomputes its activations in the backward pass (the
    same numbers, in less memory, for about a third more compute). Layers with nothing to train
    (the frozen vision tower) are left alone: recomputing them would cost time and save nothing.
    The reentrant implementation reaches the weights inside a layer only if the layer's input
    requires gradients: transformers hooks the language model's input embeddings for that, and the
    vision tower's patch embedding is hooked here when its blocks train (it has no such hook).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5.25 renamed gradient_checkpointing_enable (5.19-5.24) activation_checkpointing_enable
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable({"use_reentrant": use_reentrant})
    for module in base.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = any(p.requires_grad for p in module.parameters())
    visual = vision_tower(base)
    if use_reentrant and any(p.requires_grad for p in visual.blocks.parameters()):
        visual.patch_embed.register_forward_hook(lambda module, args, output: output.requires_grad_(True))


def greedy_tokens(logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """The most likely token at every position: what `token_accuracy` needs, kept instead of the logits.

    The Trainer accumulates what this returns over the whole evaluation set, so ids (batch x
    sequence) rather than logits (x vocabulary, ~150k for Qwen) bound evaluation memory, as in
    LLaMA-Factory. A tuple is the model output less the loss, with the logits first.
    """
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)


def token_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """LLaMA-Factory's ``compute_accuracy``: per sample, the share of learned tokens predicted exactly
    (position t predicts token t + 1), then the mean over samples.

    Padding between batches (-100, the Trainer's) and unlearned prompt tokens carry IGNORE_INDEX
    in the labels, so they count nowhere.
    """
    preds = torch.as_tensor(prediction.predictions)[:, :-1]
    labels = torch.as_tensor(prediction.label_ids)[:, 1:]
    learned = labels != IGNORE_INDEX
    hits = ((preds == labels) & learned).sum(dim=1)
    return {"accuracy": float((hits / learned.sum(dim=1)).mean())}


class EqakitTrainer(Trainer):
    """Trainer whose batches may carry image keys (looked up in ``vision_cache``) or packed rows."""

    def __init__(
        self,
        *args: Any,
        vision_cache: VisionFeatureCache | None = None,
        episode_groups: list[list[int]] | None = None,
        loraplus_lr_ratio: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.vision_cache = vision_cache
        self.episode_groups = episode_groups
        self.loraplus_lr_ratio = loraplus_lr_ratio
        # Training losses are divided by the step's count of answer tokens (`compute_loss`): the
        # Trainer must count them (it does so for models that take loss kwargs) and not divide again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._tower_weights: list[torch.nn.Parameter] | None = None  # see `_untouched_tower_term`
        self._loss_before: LossSoFar | None = None  # the resumed checkpoint's
        self._train_loss: float | None = None
        self._nan_filter_on_device = False  # see `_nan_filter_moved`

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> TrainOutput:
        """Trainer.train, with ``train_loss`` the mean over every step of the run, resumed or not.

        transformers counts only the steps of this call after a resume (5.24 averages over them,
        some earlier 5.x releases divide their sum by all steps), so a resumed run reported a figure no
        unbroken run would. The checkpoint's running total (see `_save_checkpoint`) restores the rest.
        `resume_from_checkpoint` is a checkpoint directory: `sft.resolve_resume` resolves ``true``.
        """
        self._loss_before = LossSoFar.read(resume_from_checkpoint) if resume_from_checkpoint else None
        with self._nan_filter_moved():
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        metrics = {**output.metrics, "train_loss": self._train_loss}
        return TrainOutput(output.global_step, self._train_loss, metrics)

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The configured optimizer; with ``loraplus_lr_ratio`` (LoRA+), LLaMA-Factory's parameter
        groups: lora_B weights and every other 1-D trainable weight learn at learning_rate x ratio
        (with weight decay where the Trainer would apply it), the rest at learning_rate."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        lr, fast = self.args.learning_rate, self.args.learning_rate * self.loraplus_lr_ratio
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                b_side = "lora_B" in name or param.ndim == 1
                decayed = self.args.weight_decay if not b_side or name in decay else 0.0
                groups.setdefault((fast if b_side else lr, decayed), []).append(param)
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        params = [{"params": p, "lr": rate, "weight_decay": wd} for (rate, wd), p in groups.items()]
        self.optimizer = optimizer_cls(params, **kwargs)
        return self.optimizer

    @contextlib.contextmanager
    def _nan_filter_moved(self) -> Iterator[None]:
        """Within it, ``logging_nan_inf_filter`` is applied on the device (`_filtered`) instead of by
        the Trainer's loop, which reads every micro-batch's loss to apply it (``isnan``, then
        ``isinf``: two synchronisations per micro-batch, 16 per step at accumulation 8). The filter
        is the same: a non-finite loss adds the mean logged so far instead of itself. Evaluation and
        saved arguments see the user's setting (`_users_nan_filter`)."""
        wanted = self.args.logging_nan_inf_filter
        self.args.logging_nan_inf_filter, self._nan_filter_on_device = False, wanted
        try:
            yield
        finally:
            self.args.logging_nan_inf_filter, self._nan_filter_on_device = wanted, False

    @contextlib.contextmanager
    def _users_nan_filter(self) -> Iterator[None]:
        """The user's ``logging_nan_inf_filter`` back in the arguments, within `_nan_filter_moved`."""
        saved = self.args.logging_nan_inf_filter
        self.args.logging_nan_inf_filter = saved or self._nan_filter_on_device
        try:
            yield
        finally:
            self.args.logging_nan_inf_filter = saved

    def _filtered(self, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss as the Trainer's NaN filter would add it to its running total: a
        non-finite one is replaced by the total's mean per step since the last log, on the device."""
        if not self._nan_filter_on_device:
            return loss
        steps = 1 + self.state.global_step - self._globalstep_last_logged
        return torch.where(torch.isfinite(loss), loss, self._tr_loss / steps)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Trainer.evaluate, with the user's ``logging_nan_inf_filter`` (it filters evaluation losses)."""
        with self._users_nan_filter():
            return super().evaluate(*args, **kwargs)

    def _loss_so_far(self, pending: float) -> LossSoFar:
        """The run's loss through the current step: the resumed checkpoint's plus this call's.

        ``_total_loss_scalar`` is the Trainer's sum of this call's per-step losses up to its last
        log (in 5.x, where ``train_loss`` is computed from it); `pending` is what it has not logged yet.
        """
        before = self._loss_before or LossSoFar(0, 0, 0.0)
        step = self.state.global_step
        return LossSoFar(
            step, before.steps + step - before.step, before.loss_sum + self._total_loss_scalar + pending
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Replace the end-of-training ``train_loss`` by the whole run's (after the Trainer added
        its unlogged remainder to ``_total_loss_scalar``), in the log history as in the result."""
        if "train_loss" in logs:
            logs["train_loss"] = self._train_loss = self._loss_so_far(0.0).mean
        super().log(logs, start_time)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Save the checkpoint, then the run's loss so far into it (before CheckpointMarker marks it).

        Steps since the last log are averaged over processes as the next log would (all ranks save).
        A save that fails (a full disk) removes the folder it was writing, so no half-written
        checkpoint is left to take the space or to be resumed from; a folder of that step from an
        earlier run loses its completion mark first, for the same reason.
        """
        folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        try:
            with self._users_nan_filter():  # the arguments saved beside the weights
                super()._save_checkpoint(model, trial)
            pending = nested_gather(self._tr_loss, self.args.parallel_mode).mean().item()
            if self.args.should_save:
                so_far = self._loss_so_far(pending)
                record = {"global_step": so_far.step, "steps": so_far.steps, "loss_sum": so_far.loss_sum}
                (folder / LOSS_TOTAL_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def _get_collator_with_removed_columns(self, data_collator: Any, description: str | None = None) -> Any:
        """eqakit's collators emit exactly what compute_loss consumes (image keys, packing layout)."""
        return data_collator

    def get_train_dataloader(self) -> DataLoader:
        """With step packing, each process's own share of every optimizer step (`EpisodeBatchSampler`):
        not accelerate's sharding, which deals micro-batches to processes in turn and so splits
        steps and episodes across them."""
        if self.episode_groups is None:
            return super().get_train_dataloader()
        sampler = EpisodeBatchSampler(
            self.episode_groups,
            self._train_batch_size,
            self.args.seed,
            self.args.gradient_accumulation_steps,
            self.args.world_size,
            self.args.process_index,
        )
        return EpochDataLoader(
            StepDataset(self.train_dataset),
            batch_sampler=sampler,
            collate_fn=_as_list,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers
            and self.args.dataloader_num_workers > 0,
        )

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list, Any]:
        """One optimizer step's micro-batches, packed across the whole step (shared-prefix packing).

        The process's samples of the step are packed into rows (an episode's questions in one) and the
        rows regrouped into micro-batches no larger, padded, than the step's largest unpacked one. The
        Trainer still runs ``num_batches`` micro-batches per step (its accumulation and sync logic
        count them), so the slots packing freed come first and are skipped (`training_step`): the
        last micro-batch, the one that synchronizes gradients across processes, is always a real one.
        Under DDP every process feeds as many real micro-batches (those with fewer rows repeat one
        with zero loss, a process without samples in the step its `StandIn`). The loss is divided by
        the step's count of answer tokens over all processes, as transformers does unpacked.
        """
        if self.episode_groups is None:
            batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
        else:
            batches, items = self._packed_step(epoch_iterator, num_batches, device)
        return [self._prepared_on_host(b) for b in batches], items

    def _packed_step(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The step's micro-batches packed across the step (see `get_batch_samples`)."""
        unpacked: list[list[dict[str, Any]]] = []
        for _ in range(num_batches):
            try:
                unpacked.append(next(epoch_iterator))
            except StopIteration:
                break
        if not unpacked:
            return [], None
        collate = PackedCollator(self.processing_class.tokenizer.pad_token_id)
        features = [f for part in unpacked for f in part]
        own = [f for f in features if STAND_IN not in f]
        if own:
            real = [part for part in unpacked if part]
            budget = max(padded_size(part) for part in real)
            batches = [collate.collate_rows(group) for group in micro_batches(pack_rows(own, budget), budget)]
            if len(batches) > len(real):  # rows packed worse than the unpacked grouping: keep that grouping
                batches = [collate(part) for part in real]
        else:  # nothing of this process's own in the step: its StandIn
            stand_in = {k: v for k, v in features[0].items() if k != STAND_IN}
            batches = [{**collate([stand_in]), STAND_IN: True}]
        if self.args.world_size > 1:
            # DDP's forward runs collectives (buffer broadcast, bucket rebuild), so every process feeds
            # as many micro-batches, in the same slots: the fewer packed rows, the more stand-ins
            counts = self.accelerator.gather(torch.tensor([len(batches)], device=device))
            spare = min(batches, key=lambda b: b["input_ids"].numel())
            batches = [{**spare, STAND_IN: True} for _ in range(int(counts.max()) - len(batches))] + batches
        batches = [{SKIP: True}] * (len(unpacked) - len(batches)) + batches
        items = self._prepare_input(torch.tensor(learned_tokens(own)))
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            items = self.accelerator.gather(items).sum()
        return batches, items

    def _prepared_on_host(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A micro-batch with what the forward would otherwise read from the device, computed while
        it is still on the host: M-RoPE positions (``position_ids``: `packing.packed_positions` for
        packed rows, `data.plain_positions` for padded ones, with the model's own ``get_rope_index``,
        which reads every grid as a Python number) and its `VisualLayout`."""
        if SKIP in batch or not on_host(batch):
            return batch
        base = self._base_model(self.model)
        out = dict(batch)
        if "position_ids" not in out:
            positions = (packed_positions if "packed_branches" in out else plain_positions)(
                base.model.get_rope_index, out
            )
            if positions is not None:
                out["position_ids"] = positions
        config = base.model.config
        out[LAYOUT] = VisualLayout.of(out["input_ids"], config.image_token_id, config.video_token_id)
        return out

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Trainer.training_step, told where the visual tokens are (`visual_layout_known`), its loss
        NaN-filtered on the device (`_filtered`)."""
        if SKIP in inputs:  # a slot step packing left empty: no forward, no backward, no loss
            return torch.zeros((), device=self.args.device)
        layout = inputs.get(LAYOUT)
        inputs = {k: v for k, v in inputs.items() if k != LAYOUT}
        with self._layout_known(model, layout):
            return self._filtered(super().training_step(model, inputs, num_items_in_batch))

    def _layout_known(self, model: Any, layout: VisualLayout | None) -> contextlib.AbstractContextManager:
        if layout is None:
            return contextlib.nullcontext()
        moved = replace(layout, positions=self._prepare_input(layout.positions))
        return visual_layout_known(self._base_model(model), moved)

    def _prepare_input(self, data: Any) -> Any:
        """Trainer._prepare_input, with a host tensor copied to CUDA without blocking: a blocking copy
        waits for every kernel queued before it, a synchronisation no count on the CPU can see. It
        goes through page-locked memory (PyTorch's caching host allocator keeps the block until the
        copy from it is done), in stream order, as the engine uploads (`engine.hf.model.upload`)."""
        if (
            isinstance(data, torch.Tensor)
            and data.device.type == "cpu"
            and self.args.device.type == "cuda"
            and not self.is_deepspeed_enabled
        ):
            return data.pin_memory().to(self.args.device, non_blocking=True)
        return super()._prepare_input(data)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        return 0 if SKIP in inputs else super().floating_point_ops(inputs)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """include_num_input_tokens_seen counts the tokens fed to the model (packed rows hold an
        episode's frames once); an empty slot or a stand-in counts none, but still joins the gather
        that sums the count over processes (a process skipping it would leave the others waiting)."""
        mode = self.args.include_num_input_tokens_seen
        if mode != "no" and self.args.world_size == 1 and (SKIP in inputs or on_host(inputs)):
            # one process: counted on the host, from the batch before it moved (nothing to gather)
            if SKIP not in inputs and STAND_IN not in inputs:
                pad = getattr(self.processing_class, "pad_token_id", None)
                self.state.num_input_tokens_seen += host_input_tokens(inputs, mode, pad)
        elif SKIP not in inputs and STAND_IN not in inputs:
            super()._track_num_input_tokens(inputs)
        elif mode != "no":
            none = torch.zeros((), dtype=torch.int64, device=self.args.device)
            self.state.num_input_tokens_seen += self.accelerator.gather(none).sum().item()

    def _encoder_outputs(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        keys, video_keys = inputs.pop("image_keys", None), inputs.pop("video_keys", None)
        if not keys and not video_keys:
            return None
        return self.vision_cache.encoder_outputs(keys or [], video_keys or [])

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The loss of a plain or packed batch. In training (``num_items_in_batch`` given: the optimizer
        step's answer tokens, or in evaluation the batch's) it is the batch's summed cross-entropy
        divided by that count, so an accumulated step's loss is its token mean whatever the
        micro-batches hold, packed or not; transformers would average per-micro-batch means here, as
        Qwen3-VL declares ``accepts_loss_kwargs = False``."""
        stand_in = inputs.pop(STAND_IN, False)
        encoder_outputs = self._encoder_outputs(inputs)
        outputs = None
        if "packed_picks" in inputs:
            loss = self._packed_loss(model, inputs, encoder_outputs, num_items_in_batch)
        else:
            if encoder_outputs is not None:
                inputs["mm_encoder_outputs"] = encoder_outputs
            if num_items_in_batch is None:
                return super().compute_loss(model, inputs, return_outputs)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            logits = outputs.logits[:, :-1]
            targets = labels[:, 1:].to(logits.device)
            loss = (
                torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1).float(),
                    targets.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                / num_items_in_batch
            )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
        if stand_in:
            loss = loss * 0.0  # every weight's gradient is zero, and every collective still runs
        if not any(key in inputs for key in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")):
            loss = loss + self._untouched_tower_term(model)
        return (loss, outputs) if return_outputs else loss

    def _base_model(self, model: Any) -> Any:
        """The Qwen-VL model inside DDP and PEFT wrappers."""
        base = self.accelerator.unwrap_model(model)
        return base.get_base_model() if hasattr(base, "get_base_model") else base

    def _untouched_tower_term(self, model: Any) -> torch.Tensor | float:
        """Zero, times every trainable weight of the vision tower (LoRA on it, a trained merger):
        added to the loss of a batch without images or videos, it gives those weights a zero
        gradient. DDP waits for a gradient of every trainable weight in each backward; a text-only
        micro-batch would otherwise leave the tower's without one (hiyouga/LLaMA-Factory#5616)."""
        if self._tower_weights is None:
            base = self.accelerator.unwrap_model(model)
            base = base.get_base_model() if hasattr(base, "get_base_model") else base
            self._tower_weights = [p for p in vision_tower(base).parameters() if p.requires_grad]
        if not self._tower_weights or self.args.world_size == 1:
            return 0.0
        return 0.0 * sum(weight.sum() for weight in self._tower_weights)

    def _packed_loss(
        self, model: Any, inputs: dict[str, Any], encoder_outputs: dict[str, Any] | None, num_items: Any
    ) -> torch.Tensor:
        return packed_loss(self._packed_forward(model, inputs, encoder_outputs), inputs, num_items)

    def _packed_forward(
        self, model: Any, inputs: dict[str, Any], encoder_outputs: dict[str, Any] | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The model on a packed batch, as a function of the positions whose logits are wanted."""
        base = self._base_model(model)
        dtype = next(base.parameters()).dtype
        model_inputs = packed_inputs(base.model.get_rope_index, inputs, dtype)
        media = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
        extra = {k: inputs[k] for k in media if k in inputs}
        if encoder_outputs is not None:
            extra["mm_encoder_outputs"] = encoder_outputs
            extra.pop("pixel_values", None)
            extra.pop("pixel_values_videos", None)

        def logits_for(positions: torch.Tensor) -> torch.Tensor:
            return model(**model_inputs, **extra, logits_to_keep=positions).logits

        return logits_for
