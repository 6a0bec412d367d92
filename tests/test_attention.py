"""Every accepted ``flash_attn`` x packing trains the same model (issue 24 item 2).

``flash_attn`` picks transformers' attention implementation (`eqakit.model.load.ATTENTION`): sdpa for
``auto`` and ``sdpa``, eager for ``disabled``, flash-attention 2 for ``fa2``. Packed rows hand the
model a 4D mask of branches over a shared prefix, which sdpa and eager take as it is; the loss and
the gradients must be those of the plain, padded batch on the eager path, whichever runs. fa2 reads
only a 2D padding mask (its ``_upad_input``), so it takes padded rows alone: packing with fa2 is
refused by name before the model loads (`tests/test_config.py`), and the last test checks the mask
a padded batch hands it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from eqakit.config import load_config
from eqakit.model.load import ATTENTION, load_base_model
from eqakit.train.data import Collator
from eqakit.train.packing import PackedCollator
from eqakit.train.trainer import learned_tokens
from test_train_speed import _setup

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = (0, 1, 2, 5, 6)  # two episodes, questions of different lengths


@pytest.fixture(scope="module")
def images(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return _setup(tiny_model_dir, tmp_path_factory, as_video=False)


def _loss_and_gradients(trainer: Any, model: Any, batch: dict[str, Any], items: torch.Tensor):
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.eval()
    return loss.detach(), grads


@pytest.mark.parametrize("flash_attn", ["auto", "sdpa", "disabled"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_each_implementation_and_packing_gives_the_plain_eager_loss_and_gradients(
    images, flash_attn: str, packed: bool
) -> None:
    trainer, model, _, cached, processor, _ = images
    base = model.get_base_model()
    pad = processor.tokenizer.pad_token_id
    features = [cached[i] for i in ROWS]
    items = torch.tensor(learned_tokens(features))
    try:
        base.set_attn_implementation("eager")
        want_loss, want = _loss_and_gradients(trainer, model, Collator(pad)(features), items)
        base.set_attn_implementation(ATTENTION[flash_attn])
        assert base.config.text_config._attn_implementation == ATTENTION[flash_attn]
        batch = (PackedCollator(pad) if packed else Collator(pad))(features)
        loss, got = _loss_and_gradients(trainer, model, batch, items)
    finally:
        base.set_attn_implementation("sdpa")
    assert torch.allclose(loss, want_loss, rtol=1e-5, atol=1e-6), (float(loss), float(want_loss))
    assert got.keys() == want.keys() and want
    for name, grad in want.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.fixture(scope="module")
def images_bf16(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return _setup(tiny_model_dir, tmp_path_factory, as_video=False, dtype=torch.bfloat16)


@pytest.mark.parametrize("flash_attn", ["auto", "sdpa", "disabled"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_bf16_runs_each_implementation_and_packing_to_the_fp32_loss(
    images, images_bf16, flash_attn: str, packed: bool
) -> None:
    """The dtype axis of the matrix (bf16 is what a GPU trains the tutorial's YAML in): no crash, a
    finite loss and gradients, within bf16's precision of the fp32 run's loss."""
    trainer, model, _, cached, processor, _ = images_bf16
    pad = processor.tokenizer.pad_token_id
    features = [cached[i] for i in ROWS]
    items = torch.tensor(learned_tokens(features))
    fp32_loss, _ = _loss_and_gradients(images[0], images[1], Collator(pad)(features), items)
    base = model.get_base_model()
    try:
        base.set_attn_implementation(ATTENTION[flash_attn])
        batch = (PackedCollator(pad) if packed else Collator(pad))(features)
        loss, grads = _loss_and_gradients(trainer, model, batch, items)
    finally:
        base.set_attn_implementation("sdpa")
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads.values())
    assert abs(float(loss) - float(fp32_loss)) <= 0.02 * abs(float(fp32_loss)), (
        float(loss),
        float(fp32_loss),
    )


@pytest.mark.parametrize("flash_attn", ["auto", "sdpa", "disabled"])
def test_the_key_loads_its_implementation(tiny_model_dir: Path, flash_attn: str) -> None:
    cfg = load_config("chat", extra={"model_name_or_path": str(tiny_model_dir), "flash_attn": flash_attn})
    model = load_base_model(cfg.model, device=torch.device("cpu"), dtype=torch.float32)
    assert model.config.text_config._attn_implementation == ATTENTION[flash_attn]


def test_fa2_is_handed_a_right_padded_2d_mask(images) -> None:
    """What transformers' flash-attention path reads as padding (``_upad_input``): a 2D (rows, length)
    integer mask of ones then zeros, one run per row, and no position ids restarting mid-row (which
    it would read as packed sequences)."""
    _, _, _, cached, processor, _ = images
    features = [cached[i] for i in ROWS]
    batch = Collator(processor.tokenizer.pad_token_id)(features)
    mask = batch["attention_mask"]
    assert mask.dim() == 2 and mask.dtype in (torch.long, torch.int)
    lengths = [len(f["input_ids"]) for f in features]
    assert mask.sum(dim=1).tolist() == lengths
    for row, length in zip(mask, lengths, strict=True):
        assert row[:length].all() and not row[length:].any()  # ones, then padding at the end
    assert "position_ids" not in batch
