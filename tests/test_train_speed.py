"""The training speed-ups are exact: cached visual features, shared-prefix packing, gradient checkpointing
and parallel planning give the plain loss, gradients, accuracy and plans."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, EvalPrediction, TrainingArguments
from transformers.modeling_layers import GradientCheckpointingLayer

from conftest import assert_close_to_scale, device_under_test
from eqakit.config import load_config
from eqakit.data.encode import PromptFormat
from eqakit.errors import DataError
from eqakit.model.load import load_geometry
from eqakit.train.data import Collator, KeyedImages, PlannedDataset, load_training_samples, plan_samples
from eqakit.train.full import apply_full
from eqakit.train.lora import apply_lora
from eqakit.train.packing import EpisodeBatchSampler, PackedCollator
from eqakit.train.trainer import EqakitTrainer, checkpoint_trainable_layers, greedy_tokens, token_accuracy
from eqakit.train.vision_cache import VisionFeatureCache


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return _setup(tiny_model_dir, tmp_path_factory, as_video=False)


@pytest.fixture(scope="module")
def video_setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same episodes with their frames as videos of 4 frames (2 temporal patches, timestamps between)."""
    return _setup(tiny_model_dir, tmp_path_factory, as_video=True)


@pytest.fixture(scope="module")
def qwen2_5_setup(tiny_qwen2_5_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The image episodes on Qwen2.5-VL (patch 14, window attention, no deepstack; template qwen2_vl)."""
    return _setup(tiny_qwen2_5_dir, tmp_path_factory, as_video=False, template="qwen2_vl")


@pytest.fixture(scope="module")
def qwen2_5_video_setup(tiny_qwen2_5_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The video episodes on Qwen2.5-VL (one pad per video, positions spaced by second_per_grid_ts:
    2 s per temporal patch at video_fps 1, so a path that lost it, taking its default of 1, would differ)."""
    return _setup(tiny_qwen2_5_dir, tmp_path_factory, as_video=True, template="qwen2_vl", video_fps=1)


@pytest.fixture(scope="module")
def full_setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The image episodes, every language-model weight training (finetuning_type: full)."""
    return _setup(tiny_model_dir, tmp_path_factory, as_video=False, method=["finetuning_type=full"])


@pytest.fixture(scope="module")
def freeze_setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The image episodes, the last language-model layer's attention training (finetuning_type: freeze),
    with the vision tower unfrozen but untouched by the layer selection: the cache still applies."""
    return _setup(
        tiny_model_dir,
        tmp_path_factory,
        as_video=False,
        method=[
            "finetuning_type=freeze",
            "freeze_trainable_layers=1",
            "freeze_trainable_modules=self_attn",
            "freeze_extra_modules=embed_tokens",
            "freeze_vision_tower=false",
        ],
    )


@pytest.fixture(scope="module")
def moe_setup(tiny_moe_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The image episodes on Qwen3-VL-MoE (LoRA on the attention projections only)."""
    return _setup(tiny_moe_dir, tmp_path_factory, as_video=False)


# each equivalence test's data and model: images or videos, on each architecture
SETUPS = {
    "images": "setup",
    "video": "video_setup",
    "qwen3_vl_moe": "moe_setup",
    "qwen2_5_vl": "qwen2_5_setup",
    "qwen2_5_vl-video": "qwen2_5_video_setup",
}


def _setup(
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    as_video: bool,
    template: str = "qwen3_vl_nothink",
    video_fps: float = 2.0,
    method: tuple[str, ...] | list[str] = ("lora_rank=4",),
    dtype: torch.dtype = torch.float32,
):
    """A trainer over the tiny model (``dtype``; LoRA weights fp32 as training makes them) and the
    toy episodes, with plain and cache-keyed datasets of them."""
    from conftest import write_toy_dataset

    data = write_toy_dataset(
        tmp_path_factory.mktemp("speed") / "data",
        episodes=3,
        questions=4,
        frames=4 if as_video else 2,
        as_video=as_video,
    )
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
            f"template={template}",
            f"video_fps={video_fps}",
            "do_train=true",
            "dataset=toy",
            f"dataset_dir={data}",
            f"output_dir={out}",
            "report_to=none",
            *method,
        ],
    )
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    fmt = PromptFormat.from_config(cfg)
    plans, samples, _ = plan_samples(
        load_training_samples(cfg), processor.tokenizer, load_geometry(cfg.model), cfg
    )
    torch.manual_seed(0)
    device = device_under_test()  # EQAKIT_TEST_DEVICE (default cpu): the exactness tests on a GPU too
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=dtype).to(device)
    cache = VisionFeatureCache()
    keyed = KeyedImages(fmt.budget.min_pixels, fmt.video.min_pixels)
    keys = [keyed.keys(plan, s) for plan, s in zip(plans, samples, strict=True)]
    cache.build(model, processor, fmt, keyed, device, show_progress=False)
    tune = apply_lora if cfg.finetuning.finetuning_type == "lora" else apply_full
    model = tune(model, cfg)
    for name, param in model.named_parameters():  # non-zero B so the adapter matters in the comparison
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.eval()
    args = TrainingArguments(output_dir=str(out), report_to="none", use_cpu=device.type == "cpu")
    trainer = EqakitTrainer(model=model, args=args, processing_class=processor, vision_cache=cache)
    plain = PlannedDataset(plans, samples, processor, fmt)
    cached = PlannedDataset(plans, samples, processor, fmt, keys)
    return trainer, model, plain, cached, processor, cache


def _loss(trainer, batch) -> float:
    with torch.no_grad():  # the batch moved to the trainer's device, as training moves it
        return float(trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch))))


@pytest.mark.parametrize("medium", list(SETUPS))
def test_vision_cache_gives_the_plain_loss(request, medium) -> None:
    trainer, model, plain, cached, processor, cache = request.getfixturevalue(SETUPS[medium])
    # 3 episodes x 2 frames, or 3 videos, each through the tower once
    assert len(cache) == (3 if medium.endswith("video") else 6)
    collate = Collator(processor.tokenizer.pad_token_id)
    for rows in ([0, 1], [3, 4, 8], [11]):
        a = _loss(trainer, collate([plain[i] for i in rows]))
        b_batch = collate([cached[i] for i in rows])
        assert "pixel_values" not in b_batch and "pixel_values_videos" not in b_batch
        if not medium.endswith("video"):
            assert len(b_batch["image_keys"]) == 2 * len(rows)
        else:
            assert len(b_batch["video_keys"]) == len(rows) and b_batch["video_grid_thw"][0, 0] == 2
        assert _loss(trainer, b_batch) == pytest.approx(
            a, rel=2e-6
        )  # float32 sums in another order: relative


@pytest.mark.parametrize("medium", list(SETUPS))
@pytest.mark.parametrize("use_cache", [False, True])
def test_shared_prefix_packing_gives_the_plain_loss(request, use_cache, medium) -> None:
    trainer, model, plain, cached, processor, cache = request.getfixturevalue(SETUPS[medium])
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


@pytest.mark.parametrize("world", [2, 3])
def test_each_process_takes_whole_episodes_of_the_same_steps(world: int) -> None:
    """At any world size with the same global batch the steps hold the same samples; each process
    takes whole episodes of a step, yields ``accumulation`` micro-batches for every step (so every
    process joins every collective), and one without samples in a step gets a `StandIn`."""
    from eqakit.train.packing import StandIn

    groups = [
        list(range(start, start + n)) for start, n in ((0, 5), (5, 1), (6, 7), (13, 3), (16, 2), (18, 6))
    ]
    one = EpisodeBatchSampler(groups, batch_size=2, seed=4, accumulation=2 * world)
    shards = [
        EpisodeBatchSampler(groups, 2, 4, accumulation=2, world_size=world, rank=r) for r in range(world)
    ]
    for epoch in (0, 1):
        for sampler in (one, *shards):
            sampler.set_epoch(epoch)
        steps = one.steps()
        per_rank = [list(s) for s in shards]
        assert all(
            len(batches) == len(s) == 2 * len(steps) for batches, s in zip(per_rank, shards, strict=True)
        )
        for k, step in enumerate(steps):
            shares = [[i for b in batches[2 * k : 2 * k + 2] for i in b] for batches in per_rank]
            own = [[i for i in share if isinstance(i, int)] for share in shares]
            assert sorted(i for share in own for i in share) == sorted(step)
            for share in own:  # whole episodes: every sample of the step from an episode is here or absent
                for g in {one.group_of[i] for i in share}:
                    assert {i for i in step if one.group_of[i] == g} <= set(share)
            for share, mine in zip(shares, own, strict=True):
                assert share == mine if mine else share == [StandIn(step[0])]
    lone = [EpisodeBatchSampler([[0, 1, 2, 3]], 1, 4, accumulation=2, world_size=2, rank=r) for r in (0, 1)]
    (step,) = lone[0].steps()  # one episode, the whole step: the second process stands in
    assert sorted(i for b in lone[0] for i in b) == [0, 1, 2, 3]
    assert list(lone[1]) == [[], [StandIn(step[0])]]


def _gradients(model, trainer, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    trainer.compute_loss(model, dict(batch)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("vision_trains", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(request, tmp_path, vision_trains, arch) -> None:
    """Reentrant (LLaMA-Factory's default) and non-reentrant checkpointing: the gradients of a plain
    batch without it, on cached and packed batches; with the vision tower's LoRA too."""
    qwen2_5 = arch == "qwen2_5_vl"
    trainer, model, plain, cached, processor, cache = request.getfixturevalue(
        SETUPS["qwen2_5_vl" if qwen2_5 else "images"]
    )
    tiny_model_dir = request.getfixturevalue("tiny_qwen2_5_dir" if qwen2_5 else "tiny_model_dir")
    if vision_trains:  # a model of its own: the vision tower runs (no cache) and its blocks train
        cfg = load_config(
            "train",
            None,
            [
                f"model_name_or_path={tiny_model_dir}",
                f"template={'qwen2_vl' if qwen2_5 else 'qwen3_vl_nothink'}",
                "do_train=true",
                "dataset=toy",
                f"output_dir={tmp_path}",
                "lora_rank=4",
                "freeze_vision_tower=false",
            ],
        )
        torch.manual_seed(0)
        model = apply_lora(
            AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32), cfg
        )
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
        trainer = EqakitTrainer(model=model, args=args, processing_class=processor)
    pad = processor.tokenizer.pad_token_id
    rows = [4, 5, 8]
    batches = {
        "plain": Collator(pad)([plain[i] for i in rows]),
        "packed": PackedCollator(pad)([plain[i] for i in rows]),
    }
    if not vision_trains:
        batches["cached"] = Collator(pad)([cached[i] for i in rows])
        batches["cached+packed"] = PackedCollator(pad)([cached[i] for i in rows])
    model.train()
    try:
        reference = _gradients(model, trainer, batches["plain"])
        assert any("visual" in n for n in reference) == vision_trains
        for use_reentrant in (True, False):
            checkpoint_trainable_layers(model, use_reentrant)
            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            assert any(m.gradient_checkpointing for m in layers)
            assert all(
                m.gradient_checkpointing == vision_trains for m in model.base_model.model.model.visual.blocks
            )
            for name, batch in batches.items():
                grads = _gradients(model, trainer, batch)
                assert grads.keys() == reference.keys()
                for key, grad in grads.items():
                    assert grad.abs().sum() > 0 or reference[key].abs().sum() == 0, (name, key)
                    torch.testing.assert_close(
                        grad, reference[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}"
                    )
            base = model.base_model.model  # transformers < 5.25 names it gradient_checkpointing_disable
            (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
    finally:
        model.zero_grad()
        model.eval()


def test_token_accuracy_is_the_same_with_cached_features(setup) -> None:
    """eval_accuracy (LLaMA-Factory's compute_accuracy) from plain batches and from cached-feature ones."""
    trainer, model, plain, cached, processor, cache = setup
    args = TrainingArguments(
        output_dir=trainer.args.output_dir, report_to="none", use_cpu=True, per_device_eval_batch_size=3
    )
    results = {}
    for name, dataset in (("plain", plain), ("cached", cached)):
        evaluator = EqakitTrainer(
            model=model,
            args=args,
            processing_class=processor,
            data_collator=Collator(processor.tokenizer.pad_token_id),
            vision_cache=cache,
            compute_metrics=token_accuracy,
            preprocess_logits_for_metrics=greedy_tokens,
        )
        results[name] = evaluator.evaluate(dataset)
    assert 0.0 <= results["plain"]["eval_accuracy"] <= 1.0
    assert results["cached"]["eval_accuracy"] == results["plain"]["eval_accuracy"]
    assert results["cached"]["eval_loss"] == pytest.approx(results["plain"]["eval_loss"], rel=2e-6)


def test_token_accuracy_counts_learned_tokens_per_sample_then_averages() -> None:
    """Position t predicts token t + 1; prompt and padding (-100) count nowhere; samples weigh equally."""
    labels = torch.tensor([[-100, 5, 6, 7, -100], [-100, -100, 8, -100, -100]])
    preds = torch.tensor([[5, 6, 0, 9, 9], [0, 8, 1, 1, 1]])  # sample 0: 2 of 3 right; sample 1: 1 of 1
    metrics = token_accuracy(EvalPrediction(predictions=preds.numpy(), label_ids=labels.numpy()))
    assert metrics == {"accuracy": pytest.approx((2 / 3 + 1) / 2)}
    assert greedy_tokens((torch.tensor([[[0.1, 0.9], [0.8, 0.2]]]),), labels).tolist() == [[1, 0]]


def test_parallel_planning_gives_the_serial_plans(setup, tiny_model_dir, tmp_path) -> None:
    """preprocessing_num_workers: the same plans, samples and report as one process, errors included."""
    trainer, model, plain, cached, processor, cache = setup
    data = plain.samples[0].images[0].parents[2]
    base = [
        f"model_name_or_path={tiny_model_dir}",
        "template=qwen3_vl_nothink",
        "do_train=true",
        "dataset=toy",
        f"dataset_dir={data}",
        f"output_dir={tmp_path}",
    ]
    serial_cfg = load_config("train", None, base)
    parallel_cfg = load_config(
        "train", None, [*base, "preprocessing_num_workers=2", "preprocessing_batch_size=5"]
    )
    samples = load_training_samples(serial_cfg)
    serial = plan_samples(samples, processor.tokenizer, load_geometry(serial_cfg.model), serial_cfg)
    parallel = plan_samples(samples, processor.tokenizer, load_geometry(parallel_cfg.model), parallel_cfg)
    assert serial[0] == parallel[0] and serial[1] == parallel[1]
    assert serial[2].summary() == parallel[2].summary() and serial[2].kept == len(samples)
    broken = [*samples[:7], replace(samples[7], images=[data / "missing.jpg"]), *samples[8:]]
    errors = []
    for cfg in (serial_cfg, parallel_cfg):
        with pytest.raises(DataError) as err:
            plan_samples(broken, processor.tokenizer, load_geometry(cfg.model), cfg)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "missing.jpg" in errors[0]


@pytest.mark.parametrize(
    ("method", "use_cache"),
    [("setup", False), ("setup", True), ("full_setup", True), ("freeze_setup", True)],
    ids=["lora", "lora-cached", "full-cached", "freeze-cached"],
)
def test_packing_spans_the_optimizer_step_and_keeps_its_gradient(
    request, tmp_path, method, use_cache
) -> None:
    """At batch 2 x accumulation 6 (the 12 samples of 3 episodes: one optimizer step), the step is
    packed as a whole: 3 rows (one per episode) in 3 real micro-batches instead of 6, none larger
    (padded) than the largest unpacked micro-batch, and the step's gradient is the unpacked one's
    (the loss summed over the step's answer tokens and divided by their count). For LoRA, full and
    freeze tuning alike: the vision feature cache and packing stay exact while no vision weight trains."""
    import copy

    from transformers import TrainerCallback

    from eqakit.train.sft import _episode_groups
    from eqakit.train.trainer import SKIP

    _, model, plain, cached, processor, cache = request.getfixturevalue(method)
    pad = processor.tokenizer.pad_token_id
    grads: dict[str, dict[str, torch.Tensor]] = {}

    class Grab(TrainerCallback):
        def __init__(self, mode: str) -> None:
            self.mode = mode

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads[self.mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    trainers = {}
    for mode in ("unpacked", "packed"):
        args = TrainingArguments(
            output_dir=str(tmp_path / mode),
            report_to="none",
            use_cpu=device_under_test().type == "cpu",
            per_device_train_batch_size=2,
            gradient_accumulation_steps=6,
            max_steps=1,
            max_grad_norm=0.0,  # the raw gradient is compared
            save_strategy="no",
            include_num_input_tokens_seen=True,  # the seed's: counts packed rows, skips empty slots
            seed=3,
        )
        dataset = cached if use_cache and mode == "packed" else plain
        trainers[mode] = EqakitTrainer(
            model=copy.deepcopy(model),
            args=args,
            train_dataset=dataset,
            data_collator=Collator(pad),
            processing_class=processor,
            callbacks=[Grab(mode)],
            vision_cache=cache if use_cache and mode == "packed" else None,
            episode_groups=_episode_groups(dataset) if mode == "packed" else None,
        )
        trainers[mode].train()

    packed = trainers["packed"]
    batches, items = packed.get_batch_samples(iter(packed.get_train_dataloader()), 6, torch.device("cpu"))
    real = [b for b in batches if SKIP not in b]
    assert len(batches) == 6 and len(real) == 3 and all(SKIP in b for b in batches[:3])
    assert [b["input_ids"].shape[0] for b in real] == [1, 1, 1]  # an episode's 4 questions: one row
    unpacked_largest = max(len(plain[i]["input_ids"]) for i in range(12)) * 2
    assert all(b["input_ids"].numel() <= unpacked_largest for b in real)
    assert int(items) == sum(int((plain[i]["labels"][1:] != -100).sum()) for i in range(12))

    assert grads["packed"].keys() == grads["unpacked"].keys()
    for name, grad in grads["unpacked"].items():
        assert grad.abs().sum() > 0, name
        assert_close_to_scale(grads["packed"][name], grad, rel=1e-5)


@pytest.mark.parametrize("medium", ["images", "video"])
def test_episode_groups_follow_the_shared_images_or_video(request, medium) -> None:
    """An episode's questions form one group whether its frames are images or one video."""
    from eqakit.train.sft import _episode_groups

    _, _, plain, _, _, _ = request.getfixturevalue("setup" if medium == "images" else "video_setup")
    assert _episode_groups(plain) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
