"""Host-device synchronisations per optimizer step in training: at most 10 (issue 24).

Each read of a device value stalls an accelerator until its queue drains. Counted on the CPU by
`sync_count.SyncCounter` as a GPU would feel them, over a whole training run from the CLI, for two
run lengths (start-up, planning, the vision cache and the end of training cancel in the difference).
What stays on the host on a GPU too is left out: collation (the DataLoader's, and the step packing
of `EqakitTrainer.get_batch_samples`, which works on the samples before they move), and torch.optim's
step, whose step counters are host tensors. Before the masks, positions and loss bookkeeping were
built on the host, a step read the device about 120 times here (M-RoPE positions from device grids,
packing's reads of the batch, Qwen3-VL's placeholder check and boolean-mask deepstack, the Trainer's
NaN filter and token count); now it reads it for the Trainer's logging only. The last tests check
that the batches prepared on the host give exactly the loss and gradients of the plain forward.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import write_toy_dataset, write_toy_preferences
from eqakit.cli import main
from eqakit.train.data import Collator
from eqakit.train.packing import PackedCollator
from eqakit.train.trainer import EpochDataLoader, EqakitTrainer, learned_tokens
from sync_count import SyncCounter
from test_train_speed import _setup

pytestmark = pytest.mark.usefixtures("one_thread")

BUDGET = 10  # syncs per optimizer step
SHORT, LONG = 2, 7  # optimizer steps; both within the first epoch (7 steps of 8 samples)


class Window:
    """Syncs counted over `EqakitTrainer.train`, less those in the parts that stay on the host."""

    def __init__(self) -> None:
        self.counter: SyncCounter | None = None
        self.left_out = 0

    def leaving_out(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            before = self.counter.total if self.counter is not None else 0
            try:
                return function(*args, **kwargs)
            finally:
                if self.counter is not None:
                    self.left_out += self.counter.total - before

        return run

    @property
    def total(self) -> int:
        return self.counter.total - self.left_out


@pytest.fixture
def window(monkeypatch: pytest.MonkeyPatch) -> Window:
    counted = Window()
    train, create_optimizer = EqakitTrainer.train, EqakitTrainer.create_optimizer

    def counting_train(trainer: EqakitTrainer, *args: Any, **kwargs: Any) -> Any:
        with SyncCounter() as counter:
            counted.counter = counter
            return train(trainer, *args, **kwargs)

    def host_stepped(trainer: EqakitTrainer, model: Any = None) -> torch.optim.Optimizer:
        optimizer = create_optimizer(trainer, model)
        optimizer.step = counted.leaving_out(optimizer.step)  # host step counters (torch.optim)
        return optimizer

    monkeypatch.setattr(EqakitTrainer, "train", counting_train)
    monkeypatch.setattr(EqakitTrainer, "create_optimizer", host_stepped)
    monkeypatch.setattr(
        EqakitTrainer, "get_batch_samples", counted.leaving_out(EqakitTrainer.get_batch_samples)
    )
    monkeypatch.setattr(EpochDataLoader, "__iter__", counted.leaving_out(EpochDataLoader.__iter__))
    return counted


def config(tmp_path: Path, model: Path, data: Path, steps: int, stage: str = "sft") -> Path:
    """The tutorial's training settings that bear on the count (LoRA on every linear layer, packing
    and the vision cache by default, gradient checkpointing, logging every 5 steps, tokens seen
    counted), at batch 2 x accumulation 4; DPO on LLaMA-Factory's example's preference dataset."""
    settings = {
        "model_name_or_path": str(model),
        "stage": stage,
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 8,
        "dataset": "toy" if stage == "sft" else "prefs",
        "dataset_dir": str(data),
        "template": "qwen3_vl_nothink",
        "cutoff_len": 512,
        "output_dir": str(tmp_path / f"out-{steps}"),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "max_grad_norm": 1.0,
        "learning_rate": 0.01,
        "max_steps": steps,
        "logging_steps": 5,
        "save_steps": 1000,
        "include_num_input_tokens_seen": True,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "seed": 42,
    }
    path = tmp_path / f"train-{steps}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()), encoding="utf-8")
    return path


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_an_optimizer_step_reads_the_device_at_most_10_times(tmp_path, tiny_model_dir, window, stage) -> None:
    write = write_toy_dataset if stage == "sft" else write_toy_preferences
    data = write(tmp_path / "data", episodes=14, questions=4)
    totals = []
    for steps in (SHORT, LONG):
        window.left_out = 0
        assert main(["train", str(config(tmp_path, tiny_model_dir, data, steps, stage))]) == 0
        assert window.counter.total > 0  # the counter saw the run (start-up reads the device)
        totals.append((window.total, dict(window.counter.by_op)))
    (short, _), (long, by_op) = totals
    per_step = (long - short) / (LONG - SHORT)
    assert per_step <= BUDGET, (
        f"{per_step:g} syncs per optimizer step; the longer run, host parts included: {by_op}"
    )


@pytest.fixture(scope="module")
def images(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return _setup(tiny_model_dir, tmp_path_factory, as_video=False)


@pytest.fixture(scope="module")
def video(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return _setup(tiny_model_dir, tmp_path_factory, as_video=True)


@pytest.fixture(scope="module")
def moe(tiny_moe_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Qwen3-VL-MoE (deepstack too)."""
    return _setup(tiny_moe_dir, tmp_path_factory, as_video=False)


@pytest.fixture(scope="module")
def qwen2_5_video(tiny_qwen2_5_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Qwen2.5-VL (no deepstack; positions spaced by second_per_grid_ts)."""
    return _setup(tiny_qwen2_5_dir, tmp_path_factory, as_video=True, template="qwen2_vl", video_fps=1)


def _gradients(model: Any) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("setup", ["images", "video", "moe", "qwen2_5_video"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_batches_prepared_on_host_give_the_same_loss_and_gradients(request, setup, packed) -> None:
    """A micro-batch with its positions and visual layout from the host (`_prepared_on_host`), run by
    `training_step` with the model told the layout, gives bit for bit the loss and gradients of the
    forward that computes them from the device; and the packed step reads the device not at all
    (a padded one at most twice: transformers' sdpa path asks whether its padding mask is all ones,
    then whether it pads only the end, to call the kernel with ``is_causal`` instead of a mask)."""
    trainer, model, _, cached, processor, _ = request.getfixturevalue(setup)
    pad = processor.tokenizer.pad_token_id
    features = [cached[i] for i in (0, 1, 2, 5, 6)]  # two episodes, questions of different lengths
    batch = (PackedCollator(pad) if packed else Collator(pad))(features)
    items = torch.tensor(learned_tokens(features))
    model.train()
    model.zero_grad()
    reference = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    reference.backward()
    want = _gradients(model)

    prepared = trainer._prepared_on_host(batch)
    assert "position_ids" in prepared
    with SyncCounter() as syncs:
        loss = trainer.training_step(model, prepared, items)
    got = _gradients(model)
    model.eval()
    assert syncs.total <= (0 if packed else 2), dict(syncs.by_op)
    assert torch.equal(loss, reference.detach())
    assert got.keys() == want.keys() and want
    for name, grad in want.items():
        assert torch.equal(got[name], grad), name


def test_the_nan_filter_runs_on_the_device_as_transformers_applies_it(images) -> None:
    """Within training the Trainer's NaN filter (a read of every micro-batch's loss) is off and eqakit
    applies it on the device: a non-finite loss adds the running total's mean per step since the last
    log, as transformers adds it; evaluation and the saved arguments see the user's setting."""
    trainer = images[0]
    state = (trainer.state.global_step, getattr(trainer, "_globalstep_last_logged", 0))
    with trainer._nan_filter_moved():
        assert not trainer.args.logging_nan_inf_filter
        with trainer._users_nan_filter():
            assert trainer.args.logging_nan_inf_filter
        trainer._tr_loss, trainer.state.global_step, trainer._globalstep_last_logged = torch.tensor(6.0), 2, 0
        with SyncCounter() as syncs:
            nan, finite = trainer._filtered(torch.tensor(float("nan"))), trainer._filtered(torch.tensor(1.5))
        assert syncs.total == 0
        assert float(nan) == 6.0 / (1 + 2 - 0) and float(finite) == 1.5
    assert trainer.args.logging_nan_inf_filter
    trainer.state.global_step, trainer._globalstep_last_logged = state
