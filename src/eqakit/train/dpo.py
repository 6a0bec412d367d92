"""``stage: dpo``: preference tuning on chosen/rejected pairs, as LLaMA-Factory's DPO stage trains.

A pair's two answers share the prompt and its frames, so they train as two branches of one packed
row (`eqakit.train.packing.pack_pair`): the frames go through the vision tower once and the prompt
is attended to once, and each answer sees exactly what it would see alone (the same log-likelihoods
as the two separate sequences; tests check loss and gradients within 1e-5). With
``shared_prefix_packing: false`` the two answers are separate rows, as LLaMA-Factory batches them.

The losses are LLaMA-Factory's (``pref_loss``): ``sigmoid`` (DPO: the answers' summed log-likelihood
ratios to a reference model, with ``dpo_label_smoothing``), ``orpo`` and ``simpo`` (mean token
log-likelihoods, no reference), plus ``pref_ftx`` times the chosen answer's SFT loss. The reference
is the model before tuning: for LoRA the same model with its adapter switched off, for full and
freeze tuning a frozen copy. A micro-batch's loss is the mean over its pairs, and the logs carry
LLaMA-Factory's metrics (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``; for ORPO ``sft_loss`` and
``odds_ratio_loss``), averaged over the pairs since the last log; an evaluation on held-out pairs
(``val_size``, ``eval_dataset``) logs ``eval_loss`` and the same metrics prefixed ``eval_``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from eqakit.config import Config
from eqakit.data.encode import IGNORE_INDEX
from eqakit.train.data import Collator
from eqakit.train.packing import PackedCollator, pack_pair, picked_logits
from eqakit.train.trainer import EqakitTrainer


@dataclass(frozen=True)
class PairLogps:
    """Each pair's chosen and rejected answers: summed token log-likelihoods and token counts."""

    chosen: torch.Tensor  # (pairs,)
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass(frozen=True)
class PreferenceLoss:
    """LLaMA-Factory's preference losses, from its keys."""

    kind: str  # pref_loss: sigmoid, orpo or simpo
    beta: float
    ftx: float
    label_smoothing: float
    simpo_gamma: float

    @classmethod
    def from_config(cls, cfg: Config) -> PreferenceLoss:
        f = cfg.finetuning
        return cls(f.pref_loss, f.pref_beta, f.pref_ftx, f.dpo_label_smoothing, f.simpo_gamma)

    @property
    def uses_reference(self) -> bool:
        """DPO (sigmoid) compares with a reference model; ORPO and SimPO do not."""
        return self.kind == "sigmoid"

    def __call__(
        self, policy: PairLogps, reference: PairLogps | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each pair's loss, and the metrics LLaMA-Factory logs, per pair."""
        if self.kind == "sigmoid":
            assert reference is not None
            chosen, rejected = policy.chosen, policy.rejected
            chosen_ratio, rejected_ratio = chosen - reference.chosen, rejected - reference.rejected
            margin = self.beta * (chosen_ratio - rejected_ratio)
            smoothing = self.label_smoothing
            losses = -F.logsigmoid(margin) * (1 - smoothing) - F.logsigmoid(-margin) * smoothing
            chosen_rewards, rejected_rewards = self.beta * chosen_ratio, self.beta * rejected_ratio
        else:  # the mean token log-likelihood, without a reference
            chosen, rejected = policy.chosen / policy.chosen_tokens, policy.rejected / policy.rejected_tokens
            if self.kind == "orpo":
                log_odds = (chosen - rejected) - (
                    torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected))
                )
                odds_ratio = -F.logsigmoid(log_odds)
                losses = -chosen + self.beta * odds_ratio
            else:  # simpo
                losses = -F.logsigmoid(self.beta * (chosen - rejected - self.simpo_gamma / self.beta))
            chosen_rewards, rejected_rewards = self.beta * chosen, self.beta * rejected
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        metrics = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen.detach(),
            "logps/rejected": rejected.detach(),
        }
        sft = -policy.chosen / policy.chosen_tokens
        if self.kind == "orpo":
            metrics |= {"sft_loss": sft.detach(), "odds_ratio_loss": odds_ratio.detach()}
        if self.ftx > 1e-6:
            losses = losses + self.ftx * sft
        return losses, metrics


def packed_pair_logps(logits_for: Callable[[torch.Tensor], torch.Tensor], batch: dict[str, Any]) -> PairLogps:
    """The answers' log-likelihoods from packed pair rows (branch 0 chosen, 1 rejected): only the
    logits of learned positions are computed, and nothing is read from the device
    (`eqakit.train.packing.picked_logits`)."""
    picked, labels, where = picked_logits(logits_for, batch)
    token_logps = picked.log_softmax(-1).gather(1, labels[:, None])[:, 0]
    slot = where[:, 0] * 2 + where[:, 1]  # (row, branch) flattened
    rows = batch["input_ids"].shape[0]
    sums = torch.zeros(rows * 2, device=picked.device).index_add(0, slot, token_logps).view(rows, 2)
    counts = torch.zeros(rows * 2, device=picked.device).index_add(0, slot, torch.ones_like(token_logps))
    counts = counts.view(rows, 2)
    return PairLogps(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1])


def plain_pair_logps(logits: torch.Tensor, labels: torch.Tensor) -> PairLogps:
    """The answers' log-likelihoods from separate rows: the pairs' chosen rows, then their rejected
    rows (``logits`` (2 x pairs, length, vocab), ``labels`` as the collator pads them)."""
    targets = labels[:, 1:].to(logits.device)
    learned = targets != IGNORE_INDEX
    token_logps = logits[:, :-1].float().log_softmax(-1).gather(2, targets.clamp_min(0)[..., None])[..., 0]
    sums = (token_logps * learned).sum(-1)
    counts = learned.sum(-1).to(sums.dtype)
    pairs = labels.shape[0] // 2
    return PairLogps(sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:])


@dataclass
class PairCollator:
    """Pairs ({"chosen": ..., "rejected": ...}) into one batch: each pair one packed row (the prompt
    once, two branches), or with ``packed`` false two rows, the chosen ones first."""

    pad_token_id: int
    packed: bool = True

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        if self.packed:
            return PackedCollator(self.pad_token_id).collate_rows(
                [pack_pair(p["chosen"], p["rejected"]) for p in pairs]
            )
        sides = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        return Collator(self.pad_token_id)(sides)


class DPOTrainer(EqakitTrainer):
    """EqakitTrainer whose loss is the preference loss of a batch of pairs."""

    def __init__(self, *args: Any, preference: PreferenceLoss, ref_model: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.preference = preference
        self.ref_model = ref_model  # full and freeze tuning; LoRA switches its adapter off instead
        # a micro-batch's loss is the mean over its pairs: the Trainer divides it by the accumulation
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        # metric sums over the pairs since the last log, of training and of evaluation
        self._logged: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self._pairs = {"train": 0, "eval": 0}

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        encoder_outputs = self._encoder_outputs(inputs)
        policy = self._pair_logps(model, inputs, encoder_outputs)
        reference = None
        if self.preference.uses_reference:
            with torch.no_grad(), self._reference() as ref:
                reference = self._pair_logps(ref, inputs, encoder_outputs)
        losses, metrics = self.preference(policy, reference)
        self._remember(metrics)
        loss = losses.mean()
        if (
            not any(key in inputs for key in ("pixel_values", "pixel_values_videos"))
            and encoder_outputs is None
        ):
            loss = loss + self._untouched_tower_term(model)
        return (loss, None) if return_outputs else loss

    def _pair_logps(
        self, model: Any, inputs: dict[str, Any], encoder_outputs: dict[str, Any] | None
    ) -> PairLogps:
        if "packed_picks" in inputs:
            return packed_pair_logps(self._packed_forward(model, inputs, encoder_outputs), inputs)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if encoder_outputs is not None:
            model_inputs["mm_encoder_outputs"] = encoder_outputs
        return plain_pair_logps(model(**model_inputs).logits, inputs["labels"])

    def _reference(self) -> contextlib.AbstractContextManager[Any]:
        """The reference model: the frozen copy, or the policy with its LoRA adapter switched off."""
        if self.ref_model is not None:
            return contextlib.nullcontext(self.ref_model)
        policy = self.accelerator.unwrap_model(self.model)
        return _adapter_off(policy, self.model)

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor, None, None]:
        """Evaluation: the preference loss of a batch of held-out pairs (its metrics are kept for
        the evaluation's log, as ``eval_rewards/...``)."""
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None

    def _remember(self, metrics: dict[str, torch.Tensor]) -> None:
        phase = "train" if self.model.training else "eval"
        kept = self._logged[phase]
        for key, values in metrics.items():
            kept[key] = kept[key] + values.sum() if key in kept else values.sum()
        self._pairs[phase] += len(next(iter(metrics.values())))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training and evaluation logs gain the preference metrics, averaged over the pairs (of
        every process) since the last log of their kind."""
        for phase, marker, prefix in (("train", "loss", ""), ("eval", "eval_loss", "eval_")):
            if marker in logs and self._logged[phase]:
                logs = {**logs, **{prefix + k: v for k, v in self._means(phase).items()}}
        super().log(logs, start_time)

    def _means(self, phase: str) -> dict[str, float]:
        kept = self._logged[phase]
        keys = sorted(kept)
        count = torch.tensor(float(self._pairs[phase]), device=kept[keys[0]].device)
        sums = torch.stack([kept[k] for k in keys] + [count])
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        *totals, pairs = sums.tolist()
        self._logged[phase], self._pairs[phase] = {}, 0
        return {k: round(v / max(pairs, 1.0), 4) for k, v in zip(keys, totals, strict=True)}


@contextlib.contextmanager
def _adapter_off(peft_model: Any, model: Any) -> Any:
    with peft_model.disable_adapter():
        yield model
