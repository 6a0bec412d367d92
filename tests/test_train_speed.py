"""The training speed-ups are exact: cached visual features and shared-prefix packing give the plain loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

from eqakit.config import load_config
from eqakit.data.encode import ImageBudget
from eqakit.train.data import Collator, PlannedDataset, load_training_samples, plan_samples
from eqakit.train.lora import apply_lora
from eqakit.train.packing import EpisodeBatchSampler, PackedCollator
from eqakit.train.trainer import EqakitTrainer
from eqakit.train.vision_cache import VisionFeatureCache, image_key


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from conftest import write_toy_dataset

    data = write_toy_dataset(tmp_path_factory.mktemp("speed") / "data", episodes=3, questions=4, frames=2)
    # questions of different lengths, so branches differ in length and position
    import json

    rows = [json.loads(line) for line in (data / "toy.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["instruction"] += " Look carefully." * (i % 3)
        row["output"] += " ball" * (i % 2)
    (data / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("speed-out")
    cfg = load_config(
        "train",
        None,
        [
            f"model_name_or_path={tiny_model_dir}",
            "template=qwen3_vl_nothink",
            "do_train=true",
            "dataset=toy",
            f"dataset_dir={data}",
            f"output_dir={out}",
            "report_to=none",
            "lora_rank=4",
        ],
    )
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    budget = ImageBudget(cfg.model.image_min_pixels, cfg.model.image_max_pixels)
    plans, samples, _ = plan_samples(load_training_samples(cfg), processor.tokenizer, cfg, budget)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cache = VisionFeatureCache()
    digests: dict = {}
    keys = [
        [image_key(p, plan.max_pixels, digests) for p in s.images]
        for plan, s in zip(plans, samples, strict=True)
    ]
    wanted = {
        k: (p, plan.max_pixels)
        for plan, s, ks in zip(plans, samples, keys, strict=True)
        for k, p in zip(ks, s.images, strict=True)
    }
    cache.build(model, processor, budget, wanted, torch.device("cpu"), show_progress=False)
    model = apply_lora(model, cfg)
    for name, param in model.named_parameters():  # non-zero B so the adapter matters in the comparison
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.eval()
    args = TrainingArguments(output_dir=str(out), report_to="none", use_cpu=True)
    trainer = EqakitTrainer(model=model, args=args, processing_class=processor, vision_cache=cache)
    plain = PlannedDataset(plans, samples, processor, budget)
    cached = PlannedDataset(plans, samples, processor, budget, keys)
    return trainer, model, plain, cached, processor, cache


def _loss(trainer, batch) -> float:
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, dict(batch)))


def test_vision_cache_gives_the_plain_loss(setup) -> None:
    trainer, model, plain, cached, processor, cache = setup
    assert len(cache) == 6  # 3 episodes x 2 frames, each through the tower once
    collate = Collator(processor.tokenizer.pad_token_id)
    for rows in ([0, 1], [3, 4, 8], [11]):
        a = _loss(trainer, collate([plain[i] for i in rows]))
        b_batch = collate([cached[i] for i in rows])
        assert "pixel_values" not in b_batch and len(b_batch["image_keys"]) == 2 * len(rows)
        assert _loss(trainer, b_batch) == pytest.approx(
            a, rel=2e-6
        )  # float32 sums in another order: relative


@pytest.mark.parametrize("use_cache", [False, True])
def test_shared_prefix_packing_gives_the_plain_loss(setup, use_cache) -> None:
    trainer, model, plain, cached, processor, cache = setup
    dataset = cached if use_cache else plain
    pad = processor.tokenizer.pad_token_id
    for rows in ([0, 1, 2, 3], [4, 5, 8], [0, 5, 9, 10]):  # one episode; two episodes; three
        features = [dataset[i] for i in rows]
        reference = _loss(trainer, Collator(pad)([plain[i] for i in rows]))
        packed = PackedCollator(pad)(features)
        assert packed["input_ids"].shape[0] == len({r // 4 for r in rows})  # one row per episode
        assert packed["attention_mask"].sum() < sum(len(f["input_ids"]) for f in features)  # frames held once
        assert _loss(trainer, packed) == pytest.approx(reference, rel=1e-5)


def test_episode_batches_cover_every_sample_once_and_reshuffle(setup) -> None:
    sampler = EpisodeBatchSampler([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], batch_size=4, seed=1)
    first = list(sampler)
    assert sorted(i for b in first for i in b) == list(range(12)) and len(first) == len(sampler) == 3
    assert all(len({i // 4 for i in b}) == 1 for b in first)  # a batch of 4 is one episode here
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first  # deterministic per epoch, so resumed runs see the same batches
