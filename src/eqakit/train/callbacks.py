"""Trainer callbacks: LLaMA-Factory's trainer_log.jsonl, crash-safe checkpoint markers, graceful stops."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from eqakit.fsutil import write_text_atomic

COMPLETE_MARKER = "eqakit_checkpoint_complete"


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


PREFERENCE_METRICS = ("rewards/", "logps/", "sft_loss", "odds_ratio_loss")  # stage: dpo's logs


class LogCallback(TrainerCallback):
    """Appends one line per log step to output_dir/trainer_log.jsonl, in LLaMA-Factory's format.

    Keys: current_steps, total_steps, loss, eval_loss, lr, epoch, percentage, elapsed_time,
    remaining_time, samples_per_second, and with include_num_input_tokens_seen LLaMA-Factory's
    throughput (input tokens per second) and total_tokens; with stage: dpo, accuracy (LLaMA-Factory's
    name for rewards/accuracies) and the preference metrics (`eqakit.train.dpo`).
    """

    def __init__(self) -> None:
        self.start = time.time()
        self.start_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start, self.start_step = time.time(), state.global_step  # resumed runs start mid-way

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs or "train_loss" in logs:  # skip the end-of-run summary
            return
        elapsed = time.time() - self.start
        done = max(state.global_step - self.start_step, 1)
        remaining = elapsed / done * (state.max_steps - state.global_step)
        samples_per_step = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        )
        tokens = (
            logs.get("num_input_tokens_seen", state.num_input_tokens_seen) if _counts_tokens(args) else None
        )
        record = {
            "current_steps": state.global_step,
            "total_steps": state.max_steps,
            "loss": logs.get("loss"),
            "eval_loss": logs.get("eval_loss"),
            "lr": logs.get("learning_rate"),
            "epoch": round(state.epoch or 0.0, 4),
            "percentage": round(100 * state.global_step / max(state.max_steps, 1), 2),
            "elapsed_time": _clock(elapsed),
            "remaining_time": _clock(remaining),
            "samples_per_second": round(done * samples_per_step / max(elapsed, 1e-9), 3),
            "throughput": round(tokens / max(elapsed, 1e-9), 2) if tokens is not None else None,
            "total_tokens": tokens,
            "accuracy": logs.get("rewards/accuracies"),  # LLaMA-Factory's key for DPO's
            **{k: v for k, v in logs.items() if k.startswith(PREFERENCE_METRICS)},
        }
        record = {k: v for k, v in record.items() if v is not None}
        with open(os.path.join(args.output_dir, "trainer_log.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _counts_tokens(args: Any) -> bool:
    value = args.include_num_input_tokens_seen
    return value not in (False, None, "no")


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint directory complete once the Trainer has written all of it.

    transformers writes checkpoint-N in place; a process killed mid-save leaves a directory that
    looks like the newest checkpoint. Resume only trusts directories carrying this marker.
    """

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                write_text_atomic(checkpoint / COMPLETE_MARKER, str(state.global_step))  # never empty


def newest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The highest checkpoint-N under output_dir that was completely written, or None."""
    complete = []
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if path.is_dir() and suffix.isdigit() and (path / COMPLETE_MARKER).is_file():
            complete.append((int(suffix), path))
    return max(complete)[1] if complete else None


class StopOnSignal(TrainerCallback):
    """A graceful stop: the first SIGINT or SIGTERM lets the current optimizer step finish, saves a
    complete checkpoint there and ends training; a second one stops at once (KeyboardInterrupt).

    Ctrl-C in a terminal and the web UI's Stop (SIGTERM) both end a run this way, so it resumes from
    where it stopped with ``resume_from_checkpoint: true``. Under torchrun every process must stop at
    the same step (they meet in each step's gradient all-reduce), so the request is all-reduced at
    each step's end. Use it as a context manager around the run: it owns the handlers only inside.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None  # the step training stopped at, once it has
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._agreed(args):
            control.should_log = control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step

    def _agreed(self, args: Any) -> bool:
        if args.world_size <= 1:
            return self.requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.requested)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
