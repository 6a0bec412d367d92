"""`stage: dpo`: preference pairs read and checked, packed pairs exact, the losses LLaMA-Factory's,
and a run from the CLI that learns the preference and logs LLaMA-Factory's metrics."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, TrainingArguments

from conftest import assert_close_to_scale, write_toy_preferences
from eqakit.cli import main
from eqakit.config import load_config
from eqakit.data.encode import PromptFormat
from eqakit.train.data import KeyedImages, make_dataset
from eqakit.train.dpo import DPOTrainer, PairCollator, PairLogps, PreferenceLoss
from eqakit.train.full import apply_full
from eqakit.train.lora import apply_lora
from eqakit.train.sft import preflight
from eqakit.train.vision_cache import VisionFeatureCache


def keys(model: Path, data: Path, out: Path, **extra: object) -> list[str]:
    settings = {
        "model_name_or_path": model,
        "template": "qwen3_vl_nothink",
        "stage": "dpo",
        "do_train": True,
        "dataset": "prefs",
        "dataset_dir": data,
        "output_dir": out,
        "report_to": "none",
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def _gradients(trainer: DPOTrainer, model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("method", "pref_loss"),
    [("lora", "sigmoid"), ("lora", "orpo"), ("lora", "simpo"), ("full", "sigmoid")],
)
def test_packed_pairs_give_the_separate_sequences_loss_and_gradients(
    lively_dir, tmp_path, method, pref_loss
) -> None:
    """A pair packed as one row (prompt and frames once, the two answers as branches, features from
    the vision cache) gives the loss and gradients of the two answers as separate rows with pixels,
    within 1e-5; the reference (LoRA off, or the frozen copy) the same way. Answers differ in
    length and the policy differs from the reference, so every term counts."""
    data = write_toy_preferences(tmp_path / "data", episodes=3, questions=2)
    extra = {"pref_loss": pref_loss, "pref_ftx": 0.5}
    extra |= {"finetuning_type": "full"} if method == "full" else {"lora_rank": 4}
    cfg = load_config("train", None, keys(lively_dir, data, tmp_path / "out", **extra))
    checked = preflight(cfg)
    processor, fmt = checked.processor, PromptFormat.from_config(cfg)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(lively_dir, dtype=torch.float32)
    cache, keyed = VisionFeatureCache(), KeyedImages(fmt.budget.min_pixels, fmt.video.min_pixels)
    cached = make_dataset(checked.plans, checked.samples, processor, fmt, keyed)
    cache.build(model, processor, fmt, keyed, torch.device("cpu"), show_progress=False)
    plain = make_dataset(checked.plans, checked.samples, processor, fmt, None)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if method == "full" else None
    model = apply_lora(model, cfg) if method == "lora" else apply_full(model, cfg)
    with torch.no_grad():  # move the policy away from the reference
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * (0.05 if "lora_B" in name else 0.002))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    preference = PreferenceLoss.from_config(cfg)
    pad = processor.tokenizer.pad_token_id
    results = {}
    for name, dataset, packed, features in (("plain", plain, False, None), ("packed", cached, True, cache)):
        trainer = DPOTrainer(
            model=model, args=args, processing_class=processor, vision_cache=features,
            preference=preference, ref_model=reference,
        )  # fmt: skip
        batch = PairCollator(pad, packed)([dataset[i] for i in range(len(dataset))])
        assert ("packed_picks" in batch) == packed and ("image_keys" in batch) == packed
        results[name] = _gradients(trainer, model, batch)
    (plain_loss, plain_grads), (packed_loss, packed_grads) = results["plain"], results["packed"]
    assert packed_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain_grads.keys() == packed_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert_close_to_scale(packed_grads[name], grad, rel=1e-5)


def test_the_losses_are_llama_factorys() -> None:
    """DPO with label smoothing on summed log-likelihoods; ORPO and SimPO on token means; pref_ftx adds
    the chosen answer's mean token NLL; rewards as LLaMA-Factory logs them."""
    policy = PairLogps(
        torch.tensor([-4.0, -9.0]),
        torch.tensor([-6.0, -5.0]),
        torch.tensor([2.0, 3.0]),
        torch.tensor([3.0, 1.0]),
    )
    reference = PairLogps(
        torch.tensor([-5.0, -8.0]), torch.tensor([-5.0, -6.0]), policy.chosen_tokens, policy.rejected_tokens
    )

    def logsigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    dpo = PreferenceLoss("sigmoid", beta=0.1, ftx=0.0, label_smoothing=0.2, simpo_gamma=0.5)
    losses, metrics = dpo(policy, reference)
    margin = 0.1 * ((-4 + 5) - (-6 + 5))  # pair 0: beta x (chosen ratio - rejected ratio)
    assert float(losses[0]) == pytest.approx(-0.8 * logsigmoid(margin) - 0.2 * logsigmoid(-margin))
    assert metrics["rewards/chosen"].tolist() == pytest.approx([0.1, -0.1])
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]

    simpo = PreferenceLoss("simpo", beta=2.0, ftx=0.0, label_smoothing=0.0, simpo_gamma=0.5)
    losses, _ = simpo(policy, None)
    assert float(losses[0]) == pytest.approx(-logsigmoid(2.0 * ((-2.0 - -2.0) - 0.5 / 2.0)))

    orpo = PreferenceLoss("orpo", beta=0.1, ftx=1.0, label_smoothing=0.0, simpo_gamma=0.5)
    losses, metrics = orpo(policy, None)
    chosen, rejected = -9.0 / 3, -5.0 / 1  # pair 1's mean token log-likelihoods
    log_odds = (chosen - rejected) - (math.log1p(-math.exp(chosen)) - math.log1p(-math.exp(rejected)))
    expected = -chosen + 0.1 * -logsigmoid(log_odds)
    assert float(losses[1]) == pytest.approx(expected + 1.0 * -chosen)  # pref_ftx adds the SFT loss again
    assert float(metrics["odds_ratio_loss"][1]) == pytest.approx(-logsigmoid(log_odds))


def test_dpo_from_the_cli_learns_the_preference_and_logs_llama_factorys_metrics(
    tiny_model_dir, tmp_path
) -> None:
    """LoRA DPO: at step 1 the policy is the reference (B starts at zero), so the loss is ln 2; the
    rewards' accuracy and margin grow; trainer_log.jsonl carries LLaMA-Factory's keys; the adapter
    is written."""
    data = write_toy_preferences(tmp_path / "data", formatting="alpaca")
    settings = keys(
        tiny_model_dir, data, tmp_path / "out", per_device_train_batch_size=2, learning_rate=0.01,
        num_train_epochs=4, logging_steps=1, save_steps=100, lr_scheduler_type="constant", pref_beta=0.5,
    )  # fmt: skip
    assert main(["train", _write(tmp_path, settings)]) == 0
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "accuracy"):
        assert key in records[0], key
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"] + 0.1
    assert records[-1]["accuracy"] == 1.0 and records[-1]["loss"] < 0.6
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "eqakit_run.json").read_text())["config"]["stage"] == "dpo"


def test_dpo_evaluates_held_out_pairs(tiny_model_dir, tmp_path) -> None:
    """val_size: held-out pairs get the preference loss (eval_loss) and LLaMA-Factory's metrics
    prefixed eval_, apart from the training pairs' metrics."""
    data = write_toy_preferences(tmp_path / "data")
    settings = keys(
        tiny_model_dir, data, tmp_path / "out", per_device_train_batch_size=2, num_train_epochs=1,
        val_size=0.25, eval_strategy="steps", eval_steps=2, logging_steps=1, save_steps=100,
    )  # fmt: skip
    assert main(["train", _write(tmp_path, settings)]) == 0
    out = tmp_path / "out"
    evaluated = json.loads((out / "eval_results.json").read_text())
    assert 0.0 < evaluated["eval_loss"] < 1.0 and 0.0 <= evaluated["eval_rewards/accuracies"] <= 1.0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    assert evals and all("eval_rewards/margins" in h and "rewards/margins" not in h for h in evals)
    logged = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in logged)


@pytest.mark.slow
def test_dpo_on_two_processes(tiny_model_dir, tmp_path) -> None:
    """torchrun with 2 gloo processes: each takes its share of the pairs, the reference runs with the
    adapter off inside DDP (the loss is ln 2 at the first step), and the metrics are logged."""
    from test_train import run_torchrun

    data = write_toy_preferences(tmp_path / "data")
    settings = keys(
        tiny_model_dir, data, tmp_path / "out", per_device_train_batch_size=2, num_train_epochs=2,
        logging_steps=1, save_steps=100, preprocessing_num_workers=1,
    )  # fmt: skip
    result = run_torchrun(["--nproc_per_node", "2", "-m", "eqakit", "train", _write(tmp_path, settings)])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    # 8 pairs, 4 per step over the two processes: 2 steps an epoch (each process took its share)
    assert len(records) == 4 and records[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all("rewards/margins" in r for r in records)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_orpo_full_tuning_writes_a_whole_model(tiny_model_dir, tmp_path) -> None:
    data = write_toy_preferences(tmp_path / "data", episodes=2)
    settings = keys(
        tiny_model_dir, data, tmp_path / "out", finetuning_type="full", pref_loss="orpo",
        per_device_train_batch_size=2, num_train_epochs=2, save_steps=100, logging_steps=1,
    )  # fmt: skip
    assert main(["train", _write(tmp_path, settings)]) == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert "odds_ratio_loss" in records[0] and "sft_loss" in records[0]


def _write(tmp_path: Path, settings: list[str]) -> str:
    path = tmp_path / "run.yaml"
    path.write_text("".join(line.replace("=", ": ", 1) + "\n" for line in settings), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda rows: rows[1].pop("rejected"), "prefs.json[1]: missing column 'rejected'"),
        (
            lambda rows: rows[2].update(rejected=rows[2]["chosen"]),
            "prefs.json[2]: columns 'chosen' and 'rejected' are the same answer",
        ),
        (
            lambda rows: rows[0]["chosen"].update(value="<image>Red"),
            "prefs.json[0]: column 'chosen' holds a <image> placeholder",
        ),
        (
            lambda rows: rows[3]["rejected"].update({"from": "human"}),
            "prefs.json[3]: column 'rejected' must be the assistant's turn",
        ),
    ],
)
def test_bad_pairs_stop_before_anything_is_written(
    tiny_model_dir, tmp_path, capsys, change, expected
) -> None:
    data = write_toy_preferences(tmp_path / "data")
    rows = json.loads((data / "prefs.json").read_text())
    change(rows)
    (data / "prefs.json").write_text(json.dumps(rows))
    assert main(["train", _write(tmp_path, keys(tiny_model_dir, data, tmp_path / "out"))]) == 1
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_stage_and_dataset_kind_must_agree(tiny_model_dir, tmp_path, capsys) -> None:
    """As in LLaMA-Factory: dpo needs a preference dataset (ranking: true), sft refuses one."""
    data = write_toy_preferences(tmp_path / "data")
    assert main(["train", _write(tmp_path, keys(tiny_model_dir, data, tmp_path / "out", dataset="toy"))]) == 1
    assert "stage: dpo trains on preference pairs, and dataset 'toy' has none" in capsys.readouterr().err
    assert main(["train", _write(tmp_path, keys(tiny_model_dir, data, tmp_path / "out", stage="sft"))]) == 1
    assert "dataset 'prefs' is a preference dataset (ranking: true" in capsys.readouterr().err
