"""`eqakit train CONFIG.yaml [key=value ...]`: fine-tuning of a Qwen-VL model (SFT or DPO; LoRA, full or freeze), or prediction.

Like `llamafactory-cli train`: ``do_train: true`` fine-tunes, ``do_predict: true`` generates
answers for ``eval_dataset`` and scores them (see `eqakit.evaluate.predict`).

    eqakit train configs/training_args.yaml
    eqakit train configs/training_args.yaml resume_from_checkpoint=true
    torchrun --nproc_per_node 2 -m eqakit train configs/training_args.yaml

Training, in order: validate the config; check output_dir (refuse a non-empty one unless
overwrite_output_dir or resume_from_checkpoint); read and check every sample (missing or corrupt
images, placeholder/image mismatch, empty answers, samples too long even with scaled-down images:
all reported before the first step, with nothing written); split off val_size; load the model and
wrap it in LoRA (or, for full and freeze tuning, mark the weights that train); train with
transformers' Trainer; save the adapter (or the whole model), processor, metrics, logs and loss
plots to output_dir.

Raises ConfigError (exit 2) for bad settings, DataError (exit 1) for bad data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eqakit.config import Config, load_config
from eqakit.data.encode import Geometry, ImageBudget, PromptFormat
from eqakit.data.media import media_key
from eqakit.errors import ConfigError, DataError, Stopped
from eqakit.fsutil import disk_errors, write_text_atomic
from eqakit.model.arch import VISION_PREFIX, vision_tower
from eqakit.run_record import write_run_record
from eqakit.train.callbacks import CheckpointMarker, LogCallback, StopOnSignal, newest_complete_checkpoint
from eqakit.train.data import (
    Collator,
    KeyedImages,
    PlannedDataset,
    load_training_samples,
    make_dataset,
    plan_samples,
    split_train_val,
)
from eqakit.train.trainer import EqakitTrainer, checkpoint_trainable_layers, greedy_tokens, token_accuracy
from eqakit.train.vision_cache import VisionFeatureCache


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="eqakit train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="LLaMA-Factory-style YAML (e.g. configs/training_args.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that replace the file's")
    args = parser.parse_args(argv)
    cfg = load_config("train", args.config, args.overrides)
    out = Path(cfg.training.output_dir)
    if cfg.training.do_predict:
        from eqakit.evaluate.predict import run_predict

        with disk_errors(out, lambda: "predict resumes after the answers already written"):
            run_predict(cfg)
    else:
        with disk_errors(out, lambda: _resume_hint(out)):
            run_train(cfg)
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """After a run that succeeded on every process (torchrun, DeepSpeed): leave together and close
    the process group, so its communication threads stop before the interpreter does. Left to exit,
    gloo's threads can outlive it and abort the process (SIGABRT: "terminate called without an
    active exception") after a complete run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _resume_hint(out: Path) -> str:
    """What rerunning a training run that stopped on a full disk will do."""
    found = newest_complete_checkpoint(out)
    if found is None:
        return "no checkpoint was completed, so it starts over (overwrite_output_dir=true)"
    return (
        f"with resume_from_checkpoint=true it continues from {found.name}, the last complete checkpoint "
        "(the one being written was removed)"
    )


def resolve_resume(cfg: Config) -> str | None:
    """The checkpoint to resume from, after refusing to write into someone else's output_dir."""
    out = Path(cfg.training.output_dir)
    wanted = cfg.training.resume_from_checkpoint
    if wanted in (None, False, "false", "False", ""):
        if out.is_dir() and any(out.iterdir()) and not cfg.model.overwrite_output_dir:
            found = newest_complete_checkpoint(out)
            hint = f"resume_from_checkpoint=true (continues from {found.name}), " if found else ""
            raise ConfigError(
                f"output_dir {out} exists and is not empty; set {hint}overwrite_output_dir=true, or choose another output_dir"
            )
        return None
    if wanted in (True, "true", "True"):
        found = newest_complete_checkpoint(out)
        if found is None:
            raise ConfigError(
                f"resume_from_checkpoint: true, but {out} holds no complete checkpoint-N directory"
            )
        return str(found)
    path = Path(str(wanted))
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(
            f"resume_from_checkpoint: {path} is not a checkpoint directory (no trainer_state.json)"
        )
    return str(path)


def _eval_samples(cfg: Config, processor: Any, geometry: Geometry) -> tuple[list[Any], list[Any]] | None:
    """eval_dataset's planned samples, when training evaluates on a dataset of its own."""
    if not cfg.data.eval_dataset:
        return None
    samples = load_training_samples(cfg, cfg.data.eval_dataset)
    plans, samples, _ = plan_samples(samples, processor.tokenizer, geometry, cfg)
    return plans, samples


def vision_trains(cfg: Config, skeleton: Callable[[], Any]) -> tuple[bool, list[str] | None]:
    """Whether any weight of the vision tower or its mergers trains, and for full and freeze tuning
    the weights that train: read before any weight loads, from the model's meta-device ``skeleton``
    where the keys alone do not say (for LoRA they do, but for ``additional_target``'s modules)."""
    from eqakit.train.full import trainable_names
    from eqakit.train.lora import additional_modules

    f = cfg.finetuning
    if f.finetuning_type != "lora":
        names = trainable_names(skeleton(), cfg)
        return any(n.startswith(VISION_PREFIX) for n in names), names
    extra = additional_modules(cfg, skeleton()) if f.additional_target else []
    tower = not (f.freeze_vision_tower and f.freeze_multi_modal_projector)
    return tower or any(f"{n}.".startswith(VISION_PREFIX) for n in extra), None


@dataclass(frozen=True)
class Checked:
    """What `preflight` found: all training needs before it loads weights."""

    resume: str | None  # the checkpoint to continue from
    dtype: Any  # torch.dtype the model computes in (`eqakit.model.load.train_dtype`)
    processor: Any
    plans: list[Any]
    samples: list[Any]
    report: Any  # PlanReport: what planning left out or scaled down
    extra_eval: tuple[list[Any], list[Any]] | None  # eval_dataset's plans and samples
    trainable: list[str] | None  # full and freeze tuning: the weights that train (None: LoRA)
    vision_trains: bool  # some weight of the vision tower or its mergers trains: no feature cache

    def describe(self) -> str:
        s = self.report.summary()
        resumes = f"continues from {self.resume}" if self.resume else "starts a new run"
        trains = f"; trains {len(self.trainable)} weight tensors" if self.trainable is not None else ""
        return (
            f"{s['kept']}/{s['samples']} samples kept ({s['scaled_down_to_fit']} scaled down to fit "
            f"cutoff_len, {s['dropped_too_long']} dropped as too long); {resumes}{trains}"
        )


def preflight(cfg: Config) -> Checked:
    """Every check `eqakit train` makes before its first heavy step (loading weights), those that
    need the config alone first: the evaluation set's presence, the output dir's state, the model's
    config, dtype, processor and adapters; then every row of the datasets and the size of its media
    (each sample planned), and the evaluation set. `eqakit config` runs it too, so a config it calls
    valid starts training."""
    from eqakit.model.load import (
        check_model,
        declared_dtype,
        load_processor,
        model_config,
        skeleton,
        train_dtype,
    )

    t = cfg.training
    if t.eval_strategy.value != "no" and not cfg.data.val_size and not cfg.data.eval_dataset:
        raise ConfigError(
            f"eval_strategy: {t.eval_strategy.value} needs an evaluation set: set val_size (e.g. 0.1) "
            "or eval_dataset, or set eval_strategy: no"
        )
    resume = resolve_resume(cfg)
    geometry = check_model(cfg.model)
    dtype = train_dtype(t.bf16, t.fp16, t.device, declared_dtype(model_config(cfg.model)))
    tower, trainable = vision_trains(
        cfg, lambda: skeleton(model_config(cfg.model), cfg.model.trust_remote_code)
    )
    processor = load_processor(cfg.model)
    samples = load_training_samples(cfg)
    if not samples:
        raise DataError(f"dataset {cfg.data.dataset!r} has no rows")
    plans, samples, report = plan_samples(samples, processor.tokenizer, geometry, cfg)
    if not plans:
        raise DataError(
            f"no sample of {cfg.data.dataset!r} fits cutoff_len {cfg.data.cutoff_len}: {report.summary()}"
        )
    extra_eval = _eval_samples(cfg, processor, geometry)
    return Checked(resume, dtype, processor, plans, samples, report, extra_eval, trainable, tower)


def training_environment(cfg: Config) -> dict[str, str]:
    """What transformers now reads from the environment that LLaMA-Factory's keys set:
    logging_dir is TensorBoard's TENSORBOARD_LOGGING_DIR (transformers > 5.6 dropped the key)."""
    logging_dir = cfg.finetuning.logging_dir
    return {"TENSORBOARD_LOGGING_DIR": str(Path(logging_dir).expanduser())} if logging_dir else {}


def run_train(cfg: Config) -> dict[str, float]:
    """Fine-tune (LoRA, full or freeze); returns the final training metrics.

    Ctrl-C or SIGTERM stops at the end of the current step with a complete checkpoint and raises
    Stopped (see StopOnSignal); before training begins it stops with nothing written.
    """
    with StopOnSignal() as stop:
        return _train(cfg, stop)


def _train(cfg: Config, stop: StopOnSignal) -> dict[str, float]:
    """The recipe, top to bottom: checks, data, model, output directory, trainer, results."""
    checked = preflight(cfg)
    data = _datasets(cfg, checked)
    model, reference = _model(cfg, checked, data)
    if stop.requested:
        raise Stopped("before the first training step; nothing was written to output_dir")
    _start_output_dir(cfg, checked, data)
    trainer = _trainer(cfg, checked, data, model, reference, stop)
    result = trainer.train(resume_from_checkpoint=checked.resume)
    _finish(cfg, trainer, result.metrics, stop, evaluates=data.eval_set is not None)
    return result.metrics


@dataclass(frozen=True)
class TrainingData:
    """The planned samples as datasets, and the vision cache their batches name features in."""

    train_set: PlannedDataset
    eval_set: PlannedDataset | None
    cache: VisionFeatureCache | None  # built with the model (`_model`), filled before the first step
    keyed: KeyedImages | None  # the cache's keys of each sample's media
    fmt: PromptFormat


def _datasets(cfg: Config, checked: Checked) -> TrainingData:
    """Training and evaluation sets (val_size split off, or eval_dataset), with cache keys when the
    vision tower is frozen (`VisionFeatureCache`)."""
    budget = ImageBudget.from_config(cfg)
    cache = (
        VisionFeatureCache() if cfg.finetuning.vision_feature_cache and not checked.vision_trains else None
    )
    fmt = PromptFormat.from_config(cfg)
    keyed = KeyedImages(budget.min_pixels, fmt.video.min_pixels) if cache is not None else None
    every = make_dataset(checked.plans, checked.samples, checked.processor, fmt, keyed)
    train_rows, val_rows = split_train_val(len(checked.plans), cfg.data.val_size, cfg.training.seed)
    train_set = every.subset(train_rows)
    if val_rows:
        eval_set = every.subset(val_rows)
    elif checked.extra_eval:
        eval_set = make_dataset(*checked.extra_eval, checked.processor, fmt, keyed)
    else:
        eval_set = None
    if cfg.training.process_index == 0:
        _print_data_report(checked.report, len(train_set), len(eval_set) if eval_set else 0)
    return TrainingData(train_set, eval_set, cache, keyed, fmt)


def _model(cfg: Config, checked: Checked, data: TrainingData) -> tuple[Any, Any]:
    """The model to train, loaded in the checked dtype, its vision features cached, tuned (LoRA, full
    or freeze) and checkpointed; and DPO's reference model where it needs one."""
    import transformers

    from eqakit.model.load import load_base_model
    from eqakit.train.full import apply_full
    from eqakit.train.lora import apply_lora

    transformers.set_seed(cfg.training.seed)  # LoRA initialisation is part of the run's randomness
    t = cfg.training
    if t.deepspeed:
        # ZeRO-3 partitions the weights while they load, over DeepSpeed's own view of the processes:
        # without this it sees one process and refuses the batch size transformers worked out for all
        import deepspeed

        deepspeed.init_distributed()
    if t.process_index == 0:
        keys = (
            "bf16: true"
            if t.bf16
            else "fp16: true"
            if t.fp16
            else "neither bf16 nor fp16 set: LLaMA-Factory's choice here"
        )
        print(
            f"compute dtype: {str(checked.dtype).removeprefix('torch.')} ({keys}); trainable weights float32"
        )
    model = load_base_model(cfg.model, device=t.device, dtype=checked.dtype)
    if data.cache is not None:
        with _whole(vision_tower(model)):
            data.cache.build(
                model,
                checked.processor,
                data.fmt,
                data.keyed,
                t.device,
                show_progress=t.local_process_index == 0,
            )
    # DPO's reference is the model before tuning: a frozen copy for full and freeze tuning (LoRA
    # switches its adapter off instead)
    dpo = _preference(cfg)
    reference = _frozen_copy(model) if dpo and dpo.uses_reference and checked.trainable is not None else None
    model = apply_lora(model, cfg) if checked.trainable is None else apply_full(model, cfg)
    if t.gradient_checkpointing:  # transformers' key: the Trainer checkpoints every layer
        model.enable_input_require_grads()
    elif not cfg.finetuning.disable_gradient_checkpointing:  # LLaMA-Factory's default
        checkpoint_trainable_layers(model, cfg.finetuning.use_reentrant_gc)
    return model, reference


def _preference(cfg: Config) -> Any:
    """DPO's `PreferenceLoss` (``stage: dpo``), else None."""
    from eqakit.train.dpo import PreferenceLoss

    return PreferenceLoss.from_config(cfg) if cfg.finetuning.stage == "dpo" else None


def _start_output_dir(cfg: Config, checked: Checked, data: TrainingData) -> None:
    """output_dir before the first step (process 0): a fresh log for a fresh run, the log cut back
    to the checkpoint a resumed run continues from, and the run record."""
    if cfg.training.process_index != 0:
        return
    out = Path(cfg.training.output_dir)
    if checked.resume is None and (out / "trainer_log.jsonl").exists():
        (out / "trainer_log.jsonl").unlink()  # overwrite_output_dir: a fresh run starts a fresh log
    if checked.resume is not None:
        state = json.loads((Path(checked.resume) / "trainer_state.json").read_text())
        _truncate_log(out, int(state["global_step"]))
    write_run_record(
        cfg,
        out,
        {
            "data": checked.report.summary(),
            "compute_dtype": str(checked.dtype).removeprefix("torch."),
            "train_samples": len(data.train_set),
            "eval_samples": len(data.eval_set) if data.eval_set else 0,
        },
    )


def _trainer(
    cfg: Config, checked: Checked, data: TrainingData, model: Any, reference: Any, stop: StopOnSignal
) -> EqakitTrainer:
    """The Trainer for the stage: SFT's (episode groups packed over their shared prefix) or DPO's."""
    from eqakit.train.dpo import DPOTrainer, PairCollator
    from eqakit.train.lora import trainable_summary

    os.environ.update(training_environment(cfg))
    dpo = _preference(cfg)
    packing = cfg.finetuning.shared_prefix_packing
    groups = _episode_groups(data.train_set) if packing and dpo is None else None
    if cfg.training.local_process_index == 0:
        print(trainable_summary(model))
        if dpo:
            packed = "on, each pair's answers over one prompt" if packing else "off"
        else:
            packed = f"on, {len(groups)} groups" if groups else "off"
        cached = f"on, {len(data.cache)} images/videos" if data.cache else "off"
        checkpointing = "off" if cfg.finetuning.disable_gradient_checkpointing else "on"
        print(
            f"speed-ups: vision feature cache {cached}; shared-prefix packing {packed}; "
            f"gradient checkpointing {checkpointing}"
        )
    pad = checked.processor.tokenizer.pad_token_id
    common = {
        "model": model,
        "args": cfg.training,
        "train_dataset": data.train_set,
        "eval_dataset": data.eval_set,
        "processing_class": checked.processor,
        "callbacks": [LogCallback(), CheckpointMarker(), stop],
        "vision_cache": data.cache,
        "loraplus_lr_ratio": cfg.finetuning.loraplus_lr_ratio,
    }
    if dpo is not None:
        return DPOTrainer(
            **common, data_collator=PairCollator(pad, packing), preference=dpo, ref_model=reference
        )
    accuracy = cfg.finetuning.compute_accuracy
    return EqakitTrainer(
        **common,
        data_collator=Collator(pad),
        episode_groups=groups,
        compute_metrics=token_accuracy if accuracy else None,
        preprocess_logits_for_metrics=greedy_tokens if accuracy else None,
    )


def _finish(
    cfg: Config, trainer: EqakitTrainer, metrics: dict[str, float], stop: StopOnSignal, evaluates: bool
) -> None:
    """After the last step: a stopped run names its checkpoint; a finished one saves the model,
    metrics and state, evaluates (unless the last step just did) and plots its losses."""
    from eqakit.train.plots import plot_loss

    out = Path(cfg.training.output_dir)
    state = trainer.state
    if stop.stopped_at is not None and state.global_step < state.max_steps:
        raise Stopped(
            f"at step {state.global_step} of {state.max_steps}: {out / f'checkpoint-{state.global_step}'} "
            "is complete; continue with resume_from_checkpoint=true"
        )
    trainer.save_model()
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if evaluates:
        done = [e for e in state.log_history if "eval_loss" in e and e["step"] == state.global_step]
        evaluated = (
            {k: v for k, v in done[-1].items() if k.startswith("eval_") or k == "epoch"}
            if done
            else trainer.evaluate()
        )
        trainer.log_metrics("eval", evaluated)
        trainer.save_metrics("eval", evaluated)
    if cfg.finetuning.plot_loss and trainer.is_world_process_zero():
        for path in plot_loss(out):
            print(f"wrote {path}")


def _frozen_copy(model: Any) -> Any:
    """A copy of ``model`` that never trains: DPO's reference for full and freeze tuning."""
    import copy

    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def _whole(module: Any) -> Any:
    """A context in which ``module``'s weights are whole: under DeepSpeed ZeRO-3, which partitions
    them over the processes while the model loads, gathered on every process (each builds the vision
    cache over the same images, so all take part in the gathers); elsewhere they already are."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()))


def _episode_groups(dataset: PlannedDataset) -> list[list[int]]:
    """Rows of the training set grouped by their images or videos (an OpenEQA episode's questions)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i in range(len(dataset)):
        groups.setdefault(media_key(dataset.samples[i], dataset.plans[i]), []).append(i)
    return list(groups.values())


def _truncate_log(out: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed, so the log matches one unbroken run."""
    path = out / "trainer_log.jsonl"
    if not path.exists():
        return
    lines = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("current_steps", 0) <= step
    ]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def _print_data_report(report: Any, n_train: int, n_eval: int) -> None:
    s = report.summary()
    tokens = s["image_tokens_per_sample"]
    print(
        f"data: {s['kept']}/{s['samples']} samples kept ({n_train} train, {n_eval} eval); "
        f"{s['scaled_down_to_fit']} had images or frames scaled down to fit cutoff_len, {s['dropped_too_long']} dropped as too long; "
        f"image tokens per sample min {tokens['min']} mean {tokens['mean']} max {tokens['max']}"
    )
    if "videos_sampled_to_video_maxlen" in s:
        print(
            f"videos: {s['videos_sampled_to_video_maxlen']} video(s) sampled down to video_maxlen; "
            f"{s['samples_with_frames_dropped_to_fit']} sample(s) lost {s['frames_dropped_to_fit']} frame(s) "
            "to fit cutoff_len (their frames at the smallest size did not fit)"
        )
