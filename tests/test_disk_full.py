"""Every stage on a full disk: one line naming the directory and what to free, nothing half-written
that a rerun takes as complete, and the rerun (after freeing space) carries on from what was kept.

The disk is a real one: a tmpfs of a few hundred KiB mounted for the test (root only; elsewhere the
tests are skipped), grown with a remount when the test "frees space".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from conftest import write_toy_dataset

EQAKIT = [sys.executable, "-m", "eqakit"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, Callable[[int], None]]]:
    """A tmpfs mount point, and a function that sets its size in KiB (mounting it the first time)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = False

    def size(kib: int) -> None:
        nonlocal mounted
        options = f"remount,size={kib}k" if mounted else f"size={kib}k"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted = True

    try:
        yield disk, size
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def eqakit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EQAKIT, *args], capture_output=True, text=True, timeout=600)


def refused_in_one_line(done: subprocess.CompletedProcess, verb: str, directory: Path, then: str) -> None:
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    pieces = [piece for line in done.stderr.splitlines() for piece in line.split("\r")]  # tqdm's \r
    errors = [piece[piece.index("eqakit ") :] for piece in pieces if f"eqakit {verb}: " in piece]
    assert len(errors) == 1, done.stderr[-3000:]
    line = errors[0]
    assert line.startswith(f"eqakit {verb}: cannot write: {directory}: No space left on device."), line
    assert f"df -h {directory}" in line and then in line, line


def write_config(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump(keys))
    return path


def test_training_on_a_full_disk_keeps_the_complete_checkpoints_and_resumes(
    tiny_model_dir: Path, tmp_path: Path, small_disk
) -> None:
    disk, size = small_disk
    size(1200)  # two checkpoints of the tiny model fit, not three
    data = write_toy_dataset(tmp_path / "data")
    out = disk / "run"
    config = write_config(
        tmp_path / "train.yaml",
        model_name_or_path=str(tiny_model_dir), stage="sft", do_train=True, finetuning_type="lora",
        dataset="toy", dataset_dir=str(data), template="qwen3_vl_nothink", output_dir=str(out),
        report_to="none", max_steps=6, save_steps=2, lora_rank=8, per_device_train_batch_size=2,
    )  # fmt: skip
    done = eqakit("train", str(config))
    refused_in_one_line(done, "train", out, "with resume_from_checkpoint=true it continues from checkpoint-4")
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]  # the cut checkpoint-6 was removed
    size(8000)
    done = eqakit("train", str(config), "resume_from_checkpoint=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


def test_predict_export_and_prepare_on_a_full_disk(tiny_model_dir: Path, tmp_path: Path, small_disk) -> None:
    disk, size = small_disk
    size(16)
    data = write_toy_dataset(tmp_path / "data")
    predictions = disk / "predict"
    config = write_config(
        tmp_path / "predict.yaml",
        model_name_or_path=str(tiny_model_dir), stage="sft", do_predict=True, predict_with_generate=True,
        finetuning_type="lora", eval_dataset="toy", dataset_dir=str(data), template="qwen3_vl_nothink",
        output_dir=str(predictions), report_to="none", max_new_tokens=40,
    )  # fmt: skip
    done = eqakit("train", str(config))
    refused_in_one_line(done, "train", predictions, "predict resumes after the answers already written")
    kept = len((predictions / "generated_predictions.jsonl").read_text(errors="replace").splitlines())
    size(4000)
    done = eqakit("train", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming: {kept - 1}" in done.stdout or f"resuming: {kept}" in done.stdout, done.stdout
    assert len((predictions / "generated_predictions.jsonl").read_text().splitlines()) == 24

    size(shutil.disk_usage(disk).used // 1024 + 200)  # the tiny model's 1.6 MB do not fit
    merged = disk / "merged"
    config = write_config(
        tmp_path / "export.yaml",
        model_name_or_path=str(tiny_model_dir), template="qwen3_vl_nothink", export_dir=str(merged),
    )  # fmt: skip
    done = eqakit("export", str(config))
    refused_in_one_line(done, "export", merged, "was left as it was and the partial copy removed")
    assert sorted(p.name for p in disk.iterdir()) == ["predict"]  # no staging directory left behind

    source = tmp_path / "openeqa"
    assert eqakit("synth", "--output-dir", str(source), "--episodes", "6").returncode == 0
    prepared = disk / "data"
    command = ["prepare", "openeqa", "--questions", str(source / "open-eqa-v0.json")]
    command += ["--frames", str(source / "frames"), "--output-dir", str(prepared), "--workers", "1"]
    done = eqakit(*command)
    refused_in_one_line(done, "prepare", prepared, "the episodes already written are reused")
    frames = prepared / "open_eqa_frames"
    assert not [p for p in frames.iterdir() if p.name.startswith(".")]  # no half-written episode
    finished = sum(1 for p in frames.iterdir() if (p / "manifest.json").is_file())
    size(12000)  # the prepared dataset fits
    done = eqakit(*command)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((prepared / "prepare_summary.json").read_text())
    assert summary["frames"]["reused"] == 8 * finished and finished > 0, summary["frames"]
