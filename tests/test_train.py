"""`eqakit train` on the tiny model: learning, outputs, resume, refusals, bad data."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import assert_close_to_scale, write_toy_dataset
from eqakit.cli import main
from eqakit.train.callbacks import COMPLETE_MARKER, newest_complete_checkpoint
from eqakit.train.trainer import LOSS_TOTAL_FILE


def config(tmp_path: Path, model: Path, data: Path, **overrides: object) -> Path:
    settings = {
        "model_name_or_path": str(model),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 8,
        "dataset": "toy",
        "dataset_dir": str(data),
        "template": "qwen3_vl_nothink",
        "cutoff_len": 512,
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 0.01,
        "num_train_epochs": 5,
        "logging_steps": 1,
        "save_steps": 5,
        "report_to": "none",
        "lr_scheduler_type": "cosine",
        "dataloader_num_workers": 0,
        "seed": 42,
    }
    settings.update(overrides)
    settings = {k: v for k, v in settings.items() if v is not None}  # None: leave the key out
    path = tmp_path / "train.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()), encoding="utf-8")
    return path


def losses(out: Path) -> list[float]:
    return [
        r["loss"]
        for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
        if "loss" in r
    ]


def test_lora_training_learns_and_writes_everything(tmp_path, tiny_model_dir, toy_dataset, capsys) -> None:
    cfg = config(
        tmp_path,
        tiny_model_dir,
        toy_dataset,
        val_size=0.125,
        eval_strategy="steps",
        eval_steps=10,
        plot_loss=True,
        include_num_input_tokens_seen=True,
    )
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "out"
    # the tiny model overfits the toy set: training loss falls by more than half
    history = losses(out)
    assert history[-1] < history[0] / 2, history
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "chat_template.jinja",
        "train_results.json",
        "eval_results.json",
        "all_results.json",
        "trainer_state.json",
        "training_loss.png",
        "training_eval_loss.png",
        "eqakit_config.yaml",
        "eqakit_run.json",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] > 0
    made = json.loads((out / "eqakit_run.json").read_text())
    assert (made["stage"], made["compute_dtype"]) == ("train", "float32")  # a CPU's dtype
    assert made["resolved_config"]["lora_dropout"] == 0.0 and "lora_dropout" not in made["config"]
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    for key in (
        "current_steps",
        "total_steps",
        "loss",
        "lr",
        "epoch",
        "percentage",
        "elapsed_time",
        "remaining_time",
        "throughput",
        "total_tokens",
    ):
        assert key in records[0], key
    assert any("eval_loss" in r for r in records)
    assert Image.open(out / "training_loss.png").size[0] > 300
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints and all((c / COMPLETE_MARKER).is_file() for c in checkpoints)

    # only the language model's projections carry LoRA weights: no lm_head, embeddings or vision
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("language_model" in k and ("lora_A" in k or "lora_B" in k) for k in adapter)
    projections = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it learned

    # the adapter loads with plain PEFT on the untouched base model
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, out)
    for name, param in model.base_model.model.state_dict().items():
        key = name.replace(".base_layer", "")
        if "lora_" not in name and key in reference:
            assert torch.equal(param, reference[key]), name  # base weights unchanged
    printed = capsys.readouterr().out
    assert "data: 24/24 samples kept (21 train, 3 eval)" in printed


def test_refuses_non_empty_output_dir_and_deletes_nothing(
    tmp_path, tiny_model_dir, toy_dataset, capsys
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", str(config(tmp_path, tiny_model_dir, toy_dataset))]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _outside_image(data: Path) -> Path:
    """A good image outside the dataset directory."""
    outside = data.parent / "elsewhere" / "frame.jpg"
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes((data / "open_eqa_frames" / "ep0" / "000.jpg").read_bytes())
    return outside


def _corrupt(data: Path, how: str) -> str:
    rows = [json.loads(line) for line in (data / "toy.jsonl").read_text().splitlines()]
    if how == "invalid utf-8":
        lines = (data / "toy.jsonl").read_bytes().splitlines(keepends=True)
        lines[3] = lines[3].replace(b'"output": "', b'"output": "Gr\xfcn ', 1)
        (data / "toy.jsonl").write_bytes(b"".join(lines))
        column = lines[3].index(b"\xfc") + 1
        return f"toy.jsonl:4: not valid UTF-8: byte 0xfc at byte {column} of line 4"
    if how == "invalid utf-8 in a .json dataset":
        text = json.dumps(rows, indent=1).replace('"output": "Red"', '"output": "Rouge \udcff"', 1)
        (data / "toy.json").write_bytes(text.encode("utf-8", "surrogateescape"))  # writes the byte 0xff
        line = text[: text.index("\udcff")].count("\n") + 1
        info = json.loads((data / "dataset_info.json").read_text())
        info["toy"]["file_name"] = "toy.json"
        (data / "dataset_info.json").write_text(json.dumps(info))
        return f"toy.json:{line}: not valid UTF-8: byte 0xff at byte"
    if how == "image path leaving the dataset dir":
        rows[2]["images"][0] = "../../../../../../../../../../etc/passwd"
        expected = "toy.jsonl:3: column 'images' item 0: image '../../../../../../../../../../etc/passwd' resolves to /etc/passwd, outside"
    elif how == "absolute image path outside":
        rows[4]["images"][1] = outside = str(_outside_image(data))
        expected = f"toy.jsonl:5: column 'images' item 1: image {outside!r} resolves to"
    elif how == "symlink out of the dataset dir":
        (data / rows[8]["images"][0]).unlink()
        (data / rows[8]["images"][0]).symlink_to(outside := _outside_image(data))
        expected = (
            f"toy.jsonl:9: column 'images' item 0: image {rows[8]['images'][0]!r} resolves to "
            f"{outside.resolve()}, outside {data.resolve()}"
        )
    elif how == "looping image symlink":
        (data / rows[12]["images"][1]).unlink()
        (data / rows[12]["images"][1]).symlink_to(data / rows[12]["images"][1])
        expected = f"toy.jsonl:13: column 'images' item 1: image {rows[12]['images'][1]!r} cannot be resolved"
    elif how == "image path not a string":
        rows[6]["images"][0] = 7
        expected = "toy.jsonl:7: column 'images' item 0: an image path must be a string, got int"
    elif how == "lone surrogate":
        rows[2]["output"] = "Red \ud800"  # json.dumps writes the escape "\ud800"
        expected = "toy.jsonl:3: column 'output' (character 4) holds a lone surrogate"
    elif how == "missing image":
        (data / rows[3]["images"][0]).unlink()
        expected = "image file not found"
    elif how == "corrupt image":
        (data / rows[0]["images"][1]).write_bytes(b"not a jpeg at all")
        expected = "cannot be read"
    elif how == "placeholder count":
        rows[5]["instruction"] = "<image>What color is the ball?"
        expected = "toy.jsonl:6: the text has 1 image placeholder(s) but the sample has 2 image(s)"
    elif how == "empty answer":
        rows[2]["output"] = "  "
        expected = "toy.jsonl:3: empty answer"
    elif how == "video placeholder":  # a <video> without a video: never trained on as text
        rows[4]["instruction"] = "<video>" + rows[4]["instruction"]
        expected = "toy.jsonl:5: the text has 1 video placeholder(s) but the sample has 0 video(s)"
    elif how == "audio placeholder":  # LLaMA-Factory's; eqakit must not train on it as text
        rows[4]["instruction"] = "<audio>" + rows[4]["instruction"]
        expected = (
            "toy.jsonl:5: the text holds a <audio> placeholder, and eqakit reads images and videos only"
        )
    elif how == "audios column":
        info = json.loads((data / "dataset_info.json").read_text())
        info["toy"]["columns"]["audios"] = "audios"
        (data / "dataset_info.json").write_text(json.dumps(info))
        expected = (
            "dataset 'toy' in " + str(data / "dataset_info.json") + ": column 'audios' is not read by eqakit"
        )
    elif how == "missing video":
        info = json.loads((data / "dataset_info.json").read_text())
        info["toy"]["columns"]["videos"] = "videos"
        (data / "dataset_info.json").write_text(json.dumps(info))
        rows[2]["instruction"] = "<video>" + rows[2]["instruction"]
        rows[2]["videos"] = ["walk.mp4"]
        expected = f"toy.jsonl:3: video 0: video file not found: {data / 'walk.mp4'}"
    else:
        raise AssertionError(how)
    (data / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return expected


@pytest.mark.parametrize(
    "how",
    [
        "missing image",
        "corrupt image",
        "placeholder count",
        "empty answer",
        "video placeholder",
        "audio placeholder",
        "audios column",
        "missing video",
        "invalid utf-8",
        "invalid utf-8 in a .json dataset",
        "image path leaving the dataset dir",
        "absolute image path outside",
        "symlink out of the dataset dir",
        "looping image symlink",
        "image path not a string",
        "lone surrogate",
    ],
)
def test_bad_rows_stop_before_training_with_nothing_written(
    tmp_path, tiny_model_dir, toy_dataset, capsys, how
) -> None:
    expected = _corrupt(toy_dataset, how)
    assert main(["train", str(config(tmp_path, tiny_model_dir, toy_dataset))]) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_images_outside_the_dataset_dir_need_allow_outside_media(
    tmp_path, tiny_model_dir, toy_dataset, capsys
) -> None:
    """Absolute image paths inside dataset_dir are fine; a frames folder symlinked in needs the opt-in."""
    rows = [json.loads(line) for line in (toy_dataset / "toy.jsonl").read_text().splitlines()]
    for row in rows:
        row["images"] = [str(toy_dataset / image) for image in row["images"]]
    (toy_dataset / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tmp_path, tiny_model_dir, toy_dataset, num_train_epochs=1, save_strategy="no")
    assert main(["train", str(cfg)]) == 0

    elsewhere = tmp_path / "other-disk" / "ep0"
    elsewhere.parent.mkdir()
    (toy_dataset / "open_eqa_frames" / "ep0").rename(elsewhere)
    (toy_dataset / "open_eqa_frames" / "ep0").symlink_to(elsewhere, target_is_directory=True)
    capsys.readouterr()
    assert main(["train", str(cfg), f"output_dir={tmp_path / 'refused'}"]) == 1
    err = capsys.readouterr().err
    assert f"toy.jsonl:1: column 'images' item 0: image {rows[0]['images'][0]!r} resolves to" in err
    assert f"{elsewhere.resolve() / '000.jpg'}, outside" in err and "allow_outside_media: true" in err
    assert not (tmp_path / "refused").exists()
    allowed = [f"output_dir={tmp_path / 'allowed'}", "allow_outside_media=true"]
    assert main(["train", str(cfg), *allowed]) == 0
    assert (tmp_path / "allowed" / "adapter_model.safetensors").is_file()


def test_unknown_dataset_and_model_without_processor(tmp_path, tiny_model_dir, toy_dataset, capsys) -> None:
    assert main(["train", str(config(tmp_path, tiny_model_dir, toy_dataset, dataset="toi"))]) == 1
    assert "dataset 'toi' is not registered" in capsys.readouterr().err
    bare = tmp_path / "bare-model"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert main(["train", str(config(tmp_path, bare, toy_dataset))]) == 1
    assert "could not load the processor" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_of_another_architecture_is_refused_by_model_type(
    tmp_path, tiny_model_dir, toy_dataset, capsys
) -> None:
    """A checkpoint of another architecture is named with its model_type before weights load."""
    other = tmp_path / "llava"
    shutil.copytree(tiny_model_dir, other)
    config_file = other / "config.json"
    config_file.write_text(config_file.read_text().replace('"qwen3_vl"', '"llava_onevision"'))
    cfg = config(tmp_path, other, toy_dataset)
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    supported = (
        "qwen3_vl (Qwen3-VL, dense), qwen3_vl_moe (Qwen3-VL, mixture of experts), qwen2_5_vl (Qwen2.5-VL)"
    )
    assert f"model_name_or_path '{other}' is a 'llava_onevision' model; eqakit supports {supported}" in err, (
        err
    )
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_base_is_refused(tmp_path, tiny_model_dir, toy_dataset, capsys) -> None:
    from eqakit.model.tiny import build_tiny_model

    wider = build_tiny_model(tmp_path / "wider", hidden_size=96, intermediate_size=160)
    first = config(tmp_path, wider, toy_dataset, num_train_epochs=1, output_dir=str(tmp_path / "wide-out"))
    assert main(["train", str(first)]) == 0
    capsys.readouterr()
    cfg = config(tmp_path, tiny_model_dir, toy_dataset, adapter_name_or_path=str(tmp_path / "wide-out"))
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "does not fit" in err and "lora_" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_incomplete_checkpoint_is_never_the_newest(tmp_path) -> None:
    for step, complete in ((5, True), (10, True), (15, False)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if complete:
            (path / COMPLETE_MARKER).write_text(str(step))
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_unbroken_run(tmp_path, tiny_model_dir, toy_dataset) -> None:
    """A run killed with SIGKILL and resumed ends with the same adapter and the same logged losses."""
    common = {"num_train_epochs": 4, "save_steps": 3, "per_device_train_batch_size": 2}
    unbroken = config(tmp_path, tiny_model_dir, toy_dataset, output_dir=str(tmp_path / "unbroken"), **common)
    assert main(["train", str(unbroken)]) == 0

    broken_dir = tmp_path / "broken"
    broken = (
        config(tmp_path / "b", tiny_model_dir, toy_dataset, output_dir=str(broken_dir), **common)
        if ((tmp_path / "b").mkdir() or True)
        else None
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "eqakit", "train", str(broken)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (broken_dir / "checkpoint-6" / COMPLETE_MARKER).exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (broken_dir / "checkpoint-6").exists() and not (broken_dir / "adapter_model.safetensors").exists()
    assert main(["train", str(broken), "resume_from_checkpoint=true"]) == 0

    a = load_file(tmp_path / "unbroken" / "adapter_model.safetensors")
    b = load_file(broken_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert losses(broken_dir) == pytest.approx(losses(tmp_path / "unbroken"), rel=1e-4)
    train_loss = [
        json.loads((d / "train_results.json").read_text())["train_loss"]
        for d in (tmp_path / "unbroken", broken_dir)
    ]
    assert train_loss[1] == pytest.approx(train_loss[0], rel=1e-4)


@pytest.mark.slow
def test_sigterm_stops_at_a_step_with_a_checkpoint_and_resume_finishes(
    tmp_path, tiny_model_dir, toy_dataset
) -> None:
    """SIGTERM (the web UI's Stop; Ctrl-C is SIGINT, handled alike) ends the step, saves a complete
    checkpoint there, exits 130 naming it and writes no final adapter; resume finishes the run."""
    out = tmp_path / "out"
    cfg = config(tmp_path, tiny_model_dir, toy_dataset, num_train_epochs=100, save_steps=10_000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "eqakit", "train", str(cfg)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "trainer_log.jsonl").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr[-2000:]
    [checkpoint] = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 0 < step < 600 and (checkpoint / COMPLETE_MARKER).is_file()
    assert f"eqakit train: stopped: at step {step} of 600: {checkpoint} is complete" in stderr
    assert not (out / "adapter_model.safetensors").exists()
    assert [
        json.loads(line)["current_steps"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
    ][-1] == step  # the stop step is logged

    assert main(["train", str(cfg), "resume_from_checkpoint=true"]) == 0
    steps = [
        json.loads(line)["current_steps"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 601)) and (out / "adapter_model.safetensors").is_file()


def test_a_resumed_run_reports_the_unbroken_runs_train_loss(tmp_path, tiny_model_dir, toy_dataset) -> None:
    """train_loss covers the whole run after a resume: from the checkpoint's running total (here with
    a step not logged yet, as save_steps 3 and logging_steps 2 do not align), or rebuilt from the
    logged losses of a checkpoint written without it (at step 6, where they cover every step)."""
    common = {"num_train_epochs": 2, "save_steps": 3, "logging_steps": 2}
    unbroken = tmp_path / "unbroken"
    cfg = config(tmp_path, tiny_model_dir, toy_dataset, output_dir=str(unbroken), **common)
    assert main(["train", str(cfg)]) == 0
    expected = json.loads((unbroken / "train_results.json").read_text())["train_loss"]
    for checkpoint, keep_total in (("checkpoint-3", True), ("checkpoint-6", False)):
        out = tmp_path / f"resumed-from-{checkpoint}"
        shutil.copytree(unbroken / checkpoint, out / checkpoint)  # what a run killed after that save leaves
        if not keep_total:
            (out / checkpoint / LOSS_TOTAL_FILE).unlink()
        assert main(["train", str(cfg), f"output_dir={out}", "resume_from_checkpoint=true"]) == 0
        assert json.loads((out / "train_results.json").read_text())["train_loss"] == pytest.approx(
            expected, rel=1e-4
        )
        final = json.loads((out / "trainer_state.json").read_text())["log_history"][-1]
        assert final["train_loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path, tiny_model_dir, toy_dataset) -> None:
    """torchrun --nproc_per_node 2 -m eqakit train: gloo DDP halves the steps per epoch."""
    cfg = config(tmp_path, tiny_model_dir, toy_dataset, num_train_epochs=1, per_device_train_batch_size=2)
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "eqakit", "train", str(cfg)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert records[0]["total_steps"] == 6  # 24 samples / (2 per device x 2 processes)
    assert len({r["current_steps"] for r in records}) == len(records)  # one process writes the log
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def run_torchrun(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun ARGS`` in a process group of its own, killed whole when it outlives ``timeout``
    (a hang fails the test, it does not stall the suite)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    process = subprocess.Popen(
        [str(torchrun), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: kill theirs too, or the workers keep
        # its output pipes open and this wait would never end
        for worker in _children(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker, signal.SIGKILL)
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung for {timeout} s; its log ends:\n{err[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _children(parent: int) -> list[int]:
    """The pids of ``parent``'s child processes (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if f"\nPPid:\t{parent}\n" in (entry / "status").read_text():
                    found.append(int(entry.name))
    return found


def step_log(out: Path) -> list[dict]:
    """Each logged training step's loss, gradient norm and tokens fed so far."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h and "train_loss" not in h]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "accumulation"), [("lora", 1), ("lora", 4), ("lora", 8), ("full", 4)])
def test_two_processes_train_the_one_process_steps(
    tmp_path, tiny_model_dir, method: str, accumulation: int
) -> None:
    """torchrun with 2 gloo processes at accumulation 1, 4 and 8 trains the steps one process trains
    at twice the accumulation (the same global batch): per step the same loss and gradient norm
    within 1e-5 and the same tokens fed (each process takes whole episodes of a step; at 1 a
    step is one episode and the second process stands in). Episodes of 1 to 4 questions, so the
    processes pack different numbers of rows. Full tuning too (every language-model weight under DDP)."""
    data = write_toy_dataset(tmp_path / "data")
    rows = (data / "toy.jsonl").read_text().splitlines()
    (data / "toy.jsonl").write_text("\n".join(rows[3:9] + rows[10:]) + "\n")  # episodes of 1, 3, 4, 4, 4, 4
    common = {"per_device_train_batch_size": 2, "num_train_epochs": 2, "save_strategy": "no"}
    common |= {"include_num_input_tokens_seen": True, "preprocessing_num_workers": 1}
    if method == "full":
        common |= {"finetuning_type": "full", "lora_rank": None, "lora_target": None, "learning_rate": 1e-3}
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    one = config(tmp_path / "one", tiny_model_dir, data, output_dir=str(tmp_path / "one" / "out"),
                 gradient_accumulation_steps=2 * accumulation, **common)  # fmt: skip
    two = config(tmp_path / "two", tiny_model_dir, data, output_dir=str(tmp_path / "two" / "out"),
                 gradient_accumulation_steps=accumulation, **common)  # fmt: skip
    result = run_torchrun(["--nproc_per_node", "2", "-m", "eqakit", "train", str(two)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["train", str(one)]) == 0
    alone, together = step_log(tmp_path / "one" / "out"), step_log(tmp_path / "two" / "out")
    assert len(alone) == len(together) == 2 * -(-20 // (4 * accumulation))
    for a, b in zip(alone, together, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), (a, b)
        assert b["num_input_tokens_seen"] == a["num_input_tokens_seen"], (a, b)


def _process_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of the training process with ``rank`` among those the torchrun ``launcher`` started
    (its children: torchrun gives each a session of its own)."""
    for pid in _children(launcher):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    return None


@pytest.mark.slow
def test_a_process_that_dies_mid_run_is_named_and_the_run_resumes(tmp_path, tiny_model_dir) -> None:
    """A rank killed mid-run (SIGKILL, as the OOM killer does): the other is stopped, not left waiting
    in a collective; torchrun names the rank; the last complete checkpoint resumes the run to its end."""
    data = write_toy_dataset(tmp_path / "data")
    out = tmp_path / "out"
    cfg = config(tmp_path, tiny_model_dir, data, per_device_train_batch_size=2, num_train_epochs=8,
                 save_steps=2, preprocessing_num_workers=1)  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "-m", "eqakit", "train", str(cfg)]
    with (tmp_path / "stderr.txt").open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and not (out / "checkpoint-2" / COMPLETE_MARKER).exists():
                assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                time.sleep(0.05)
            victim = _process_of_rank(process.pid, 1)
            assert victim is not None, "no process of rank 1"
            os.kill(victim, signal.SIGKILL)
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the surviving process hung after rank 1 died")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    log = (tmp_path / "stderr.txt").read_text()
    assert process.returncode != 0
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", log) and "Signal 9 (SIGKILL)" in log, log[-3000:]
    kept = newest_complete_checkpoint(out)
    assert kept is not None and not (out / "adapter_model.safetensors").exists()

    resumed = run_torchrun([*command[1:], "resume_from_checkpoint=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] and (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_on_two_processes_trains_the_one_process_steps(
    tmp_path, tiny_model_dir, stage: int
) -> None:
    """DeepSpeed ZeRO-2 and ZeRO-3 (gloo on the CPU) with the vision cache and step packing: per step
    the loss of one process without DeepSpeed at twice the accumulation, the same adapter (gathered
    from ZeRO-3's shards), and resumed from a checkpoint the same run. ZeRO-3 partitions the weights
    while the model loads: the cache is built with the vision tower's gathered."""
    pytest.importorskip("deepspeed")
    data = write_toy_dataset(tmp_path / "data")
    ds = Path(__file__).parents[1] / "configs" / f"ds_z{stage}_config.json"  # LLaMA-Factory's, as shipped
    common = {
        "per_device_train_batch_size": 2,
        "num_train_epochs": 2,
        "save_steps": 2,
        "preprocessing_num_workers": 1,
    }
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    one = config(tmp_path / "one", tiny_model_dir, data, output_dir=str(tmp_path / "one" / "out"),
                 gradient_accumulation_steps=4, **common)  # fmt: skip
    two = config(tmp_path / "two", tiny_model_dir, data, output_dir=str(tmp_path / "two" / "out"),
                 gradient_accumulation_steps=2, deepspeed=str(ds), **common)  # fmt: skip
    result = run_torchrun(["--nproc_per_node", "2", "-m", "eqakit", "train", str(two)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["train", str(one)]) == 0
    alone, together = step_log(tmp_path / "one" / "out"), step_log(tmp_path / "two" / "out")
    assert len(alone) == len(together) == 2 * -(-24 // 8)
    for a, b in zip(alone, together, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
    trained = load_file(tmp_path / "two" / "out" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "one" / "out" / "adapter_model.safetensors")
    assert trained.keys() == reference.keys()
    for key, weight in reference.items():  # the whole adapter, gathered from the shards under ZeRO-3
        assert trained[key].shape == weight.shape, key
        assert_close_to_scale(trained[key], weight, rel=1e-4)

    out = tmp_path / "two" / "out"  # resumed from its DeepSpeed checkpoint at step 2: the same run
    for step in (4, 6):
        shutil.rmtree(out / f"checkpoint-{step}")
    result = run_torchrun(
        ["--nproc_per_node", "2", "-m", "eqakit", "train", str(two), "resume_from_checkpoint=true"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = step_log(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in alone]
    for a, b in zip(alone, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
    again = load_file(out / "adapter_model.safetensors")
    for key, weight in reference.items():
        assert_close_to_scale(again[key], weight, rel=1e-4)


@pytest.mark.slow
def test_two_processes_train_the_vision_tower_beside_text_only_rows(tmp_path, tiny_model_dir) -> None:
    """LoRA on the vision tower (``freeze_vision_tower: false``) with text-only rows mixed in, as in
    LLaMA-Factory's demo data: a process whose micro-batch has no image still gives the tower's
    weights a (zero) gradient, so DDP neither fails nor waits; the steps equal one process's."""
    data = write_toy_dataset(tmp_path / "data")
    text_rows = [
        {"instruction": f"What is {k} plus {k}?", "input": "", "output": str(2 * k), "images": []}
        for k in range(8)
    ]
    with (data / "toy.jsonl").open("a") as rows:
        rows.writelines(json.dumps(r) + "\n" for r in text_rows)
    common = {"per_device_train_batch_size": 2, "num_train_epochs": 2, "save_strategy": "no"}
    common |= {"freeze_vision_tower": False, "preprocessing_num_workers": 1}
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    one = config(tmp_path / "one", tiny_model_dir, data, output_dir=str(tmp_path / "one" / "out"),
                 gradient_accumulation_steps=4, **common)  # fmt: skip
    two = config(tmp_path / "two", tiny_model_dir, data, output_dir=str(tmp_path / "two" / "out"),
                 gradient_accumulation_steps=2, **common)  # fmt: skip
    result = run_torchrun(["--nproc_per_node", "2", "-m", "eqakit", "train", str(two)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["train", str(one)]) == 0
    alone, together = step_log(tmp_path / "one" / "out"), step_log(tmp_path / "two" / "out")
    assert len(alone) == len(together) == 2 * -(-32 // 8)
    for a, b in zip(alone, together, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), (a, b)


@pytest.mark.parametrize(
    ("settings", "printed"),
    [
        ({}, "gradient checkpointing on"),  # LLaMA-Factory's default
        ({"use_reentrant_gc": False}, "gradient checkpointing on"),
        ({"gradient_checkpointing": True}, "gradient checkpointing on"),  # transformers' key: every layer
    ],
)
def test_gradient_checkpointing_gives_the_same_losses(
    tmp_path, tiny_model_dir, toy_dataset, capsys, settings, printed
) -> None:
    runs = {}
    for name, extra in (("off", {"disable_gradient_checkpointing": True}), ("on", settings)):
        out = tmp_path / f"gc-{name}"
        cfg = config(
            tmp_path,
            tiny_model_dir,
            toy_dataset,
            output_dir=str(out),
            num_train_epochs=1,
            save_strategy="no",
            **extra,
        )
        capsys.readouterr()
        assert main(["train", str(cfg)]) == 0
        assert ("gradient checkpointing off" if name == "off" else printed) in capsys.readouterr().out
        runs[name] = losses(out)
    assert runs["on"] == pytest.approx(runs["off"], rel=1e-5)


def test_compute_accuracy_reports_eval_accuracy(tmp_path, tiny_model_dir, toy_dataset) -> None:
    """compute_accuracy: eval_accuracy beside eval_loss at every evaluation and in eval_results.json."""
    cfg = config(
        tmp_path,
        tiny_model_dir,
        toy_dataset,
        num_train_epochs=2,
        val_size=0.25,
        eval_strategy="epoch",
        save_strategy="no",
        compute_accuracy=True,
        plot_loss=True,
    )
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "out"
    evals = [
        e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "eval_loss" in e
    ]
    assert len(evals) == 2 and all(0.0 <= e["eval_accuracy"] <= 1.0 for e in evals)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_accuracy"] == evals[-1]["eval_accuracy"]
    assert (out / "training_eval_accuracy.png").is_file()


@pytest.mark.parametrize("projector_trains", [False, True])
def test_freeze_language_model_trains_nothing_in_it(tiny_model_dir, tmp_path, projector_trains) -> None:
    """freeze_language_model: LoRA on the vision blocks (and the mergers in full when unfrozen), nothing
    in the language model or lm_head (with the vision tower frozen too it is refused: tests/test_config.py)."""
    from transformers import AutoModelForImageTextToText

    from eqakit.config import load_config
    from eqakit.train.lora import apply_lora

    cfg = load_config(
        "train",
        None,
        [
            f"model_name_or_path={tiny_model_dir}",
            "template=qwen3_vl_nothink",
            "do_train=true",
            "dataset=toy",
            f"output_dir={tmp_path}",
            "freeze_language_model=true",
            "freeze_vision_tower=false",
            f"freeze_multi_modal_projector={str(not projector_trains).lower()}",
        ],
    )
    model = apply_lora(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".visual." in n for n in trainable), trainable
    assert any(".blocks." in n and "lora_" in n for n in trainable)
    assert any("merger" in n for n in trainable) == projector_trains


def test_freeze_language_model_refuses_an_adapter_that_trains_it(
    tmp_path, tiny_model_dir, toy_dataset, capsys
) -> None:
    cfg = config(tmp_path, tiny_model_dir, toy_dataset, num_train_epochs=1, save_strategy="no")
    assert main(["train", str(cfg)]) == 0
    again = [
        f"adapter_name_or_path={tmp_path / 'out'}",
        f"output_dir={tmp_path / 'again'}",
        "freeze_language_model=true",
        "freeze_vision_tower=false",
    ]
    capsys.readouterr()
    assert main(["train", str(cfg), *again]) == 2
    assert "freeze_language_model: true, but adapter" in capsys.readouterr().err
    assert main(["train", str(cfg), *again, "create_new_adapter=true"]) == 0
    adapter = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert adapter and all("visual.blocks" in k for k in adapter)


def test_unfrozen_projector_trains_the_mergers(tmp_path, tiny_model_dir, toy_dataset) -> None:
    cfg = config(
        tmp_path,
        tiny_model_dir,
        toy_dataset,
        num_train_epochs=1,
        save_strategy="no",
        freeze_multi_modal_projector=False,
    )
    assert main(["train", str(cfg)]) == 0
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any("visual.merger" in k for k in adapter) and any("deepstack_merger_list.0" in k for k in adapter)


def test_full_and_freeze_select_the_weights_llama_factory_selects(tmp_path, tiny_model_dir) -> None:
    """LLaMA-Factory's selection, names matched as substrings: ``.{layer}.`` in every stack of layers
    not frozen; the mergers with freeze_multi_modal_projector: false; the vision feature cache on
    exactly when no vision weight is selected."""
    from eqakit.config import load_config
    from eqakit.model.load import model_config, skeleton
    from eqakit.train.sft import vision_trains

    base = [f"model_name_or_path={tiny_model_dir}", "do_train=true", "dataset=toy", f"output_dir={tmp_path}"]

    def selected(*settings: str) -> tuple[list[str], bool]:
        cfg = load_config("train", None, [*base, *settings])
        tower, names = vision_trains(cfg, lambda: skeleton(model_config(cfg.model)))
        return names, not tower

    every = [n for n, _ in skeleton(model_config(load_config("train", None, base).model)).named_parameters()]
    language = [n for n in every if ".language_model." in n]
    assert selected("finetuning_type=full") == (language, True)
    names, cached = selected(
        "finetuning_type=full", "freeze_vision_tower=false", "freeze_multi_modal_projector=false"
    )
    assert names == every and not cached
    assert selected("finetuning_type=freeze", "freeze_trainable_layers=1") == (
        [n for n in language if ".layers.1." in n],
        True,
    )
    names, cached = selected(
        "finetuning_type=freeze", "freeze_trainable_layers=-1", "freeze_vision_tower=false"
    )
    assert names == [n for n in every if ".0." in n and ".visual.merger." not in n] and not cached
    assert any(".visual.blocks.0." in n for n in names) and any(
        ".deepstack_merger_list.0." in n for n in names
    )
    names, cached = selected(
        "finetuning_type=freeze",
        "freeze_trainable_modules=mlp",
        "freeze_extra_modules=embed_tokens",
        "freeze_multi_modal_projector=false",
    )
    assert names == [
        n
        for n in every
        if ".mlp." in n and ".language_model." in n or "embed_tokens" in n or ".visual.merger." in n
    ]
    assert not cached


def test_freeze_beyond_the_models_layers_is_refused_before_anything_is_written(
    tmp_path, tiny_model_dir, toy_dataset, capsys
) -> None:
    cfg = config(tmp_path, tiny_model_dir, toy_dataset, lora_rank=None, lora_target=None)
    wrong = ["finetuning_type=freeze", "freeze_trainable_layers=3", "freeze_trainable_modules=mlp,attention"]
    assert main(["train", str(cfg), *wrong]) == 2
    err = capsys.readouterr().err
    assert "key 'freeze_trainable_layers': 3 is beyond the model's 2 language-model layers" in err
    assert not (tmp_path / "out").exists()
    assert main(["train", str(cfg), *wrong[:1], "freeze_trainable_modules=mlp,attention"]) == 2
    assert (
        "key 'freeze_trainable_modules': attention is not a module of the model's layers"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_and_freeze_tuning_write_a_model_that_predict_and_export_load(
    tmp_path, tiny_model_dir, toy_dataset, capsys, method
) -> None:
    """finetuning_type full trains every language-model weight, freeze the last layer's; the vision
    tower stays as it was (and its cache on); output_dir is a whole model that predict and export load."""
    from transformers import AutoModelForImageTextToText

    layer = {"freeze_trainable_layers": 1} if method == "freeze" else {}
    cfg = config(
        tmp_path,
        tiny_model_dir,
        toy_dataset,
        finetuning_type=method,
        lora_rank=None,
        lora_target=None,
        num_train_epochs=2,
        save_steps=6,
        **layer,
    )
    assert main(["train", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "vision feature cache on" in printed and "shared-prefix packing on" in printed
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert (out / "checkpoint-6" / COMPLETE_MARKER).is_file()
    history = losses(out)
    assert history[-1] < history[0], history
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed and not any(".visual." in k for k in changed)
    if method == "full":
        assert changed == {k for k in after if ".language_model." in k}  # lm_head is tied to the embedding
    else:
        last = max(int(k.split(".layers.")[1].split(".")[0]) for k in after if ".layers." in k)
        assert changed == {k for k in after if f".language_model.layers.{last}." in k}

    # the whole model loads by itself: predict from it, export it
    predict = [
        "do_train=false",
        "do_predict=true",
        "predict_with_generate=true",
        f"model_name_or_path={out}",
        "eval_dataset=toy",
        "max_samples=2",
        "max_new_tokens=4",
        f"output_dir={tmp_path / 'pred'}",
    ]
    assert main(["train", str(cfg), *predict]) == 0
    assert len((tmp_path / "pred" / "generated_predictions.jsonl").read_text().splitlines()) == 2
    export = tmp_path / "export.yaml"
    export.write_text(
        f"model_name_or_path: {out}\ntemplate: qwen3_vl_nothink\nexport_dir: {tmp_path / 'merged'}\n",
        encoding="utf-8",
    )
    assert main(["export", str(export)]) == 0
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").state_dict()
    assert all(torch.equal(exported[k], v) for k, v in after.items() if k in exported)


def test_dora_trains_magnitudes_and_exports_merged(tmp_path, tiny_model_dir, toy_dataset) -> None:
    """use_dora: the adapter carries DoRA's magnitudes, trained; export merges them as peft does."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    cfg = config(tmp_path, tiny_model_dir, toy_dataset, use_dora=True, num_train_epochs=1, save_strategy="no")
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    adapter = load_file(out / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in adapter.items() if "lora_magnitude_vector" in k}
    assert len(magnitudes) == sum("lora_A" in k for k in adapter)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    name = next(k for k in magnitudes if "q_proj" in k)
    module = name.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
    initial = base.get_submodule(module).weight.norm(dim=1)  # DoRA starts at the weight's row norms
    assert not torch.allclose(magnitudes[name], initial)
    export = tmp_path / "export.yaml"
    export.write_text(
        f"model_name_or_path: {tiny_model_dir}\nadapter_name_or_path: {out}\n"
        f"template: qwen3_vl_nothink\nexport_dir: {tmp_path / 'merged'}\n",
        encoding="utf-8",
    )
    assert main(["export", str(export)]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").state_dict()
    expected = PeftModel.from_pretrained(base, out).merge_and_unload().state_dict()
    assert_close_to_scale(merged[module + ".weight"], expected[module + ".weight"])


def test_loraplus_gives_lora_b_its_learning_rate(tmp_path, tiny_model_dir, toy_dataset) -> None:
    """loraplus_lr_ratio: LLaMA-Factory's groups, lora_B (and 1-D weights) at learning_rate x ratio."""
    cfg = config(
        tmp_path,
        tiny_model_dir,
        toy_dataset,
        loraplus_lr_ratio=16.0,
        lr_scheduler_type="constant",
        max_steps=1,
        save_steps=1,
        freeze_multi_modal_projector=False,  # the mergers' norms: 1-D weights beside lora_B
    )
    assert main(["train", str(cfg)]) == 0
    groups = torch.load(tmp_path / "out" / "checkpoint-1" / "optimizer.pt")["param_groups"]
    sizes = {g["lr"]: len(g["params"]) for g in groups}
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    fast = sum("lora_B" in k or v.ndim == 1 for k, v in adapter.items())
    assert sizes == {0.01: len(adapter) - fast, 0.16: fast}, sizes


def test_additional_target_trains_whole_modules(tmp_path, tiny_model_dir, toy_dataset, capsys) -> None:
    """additional_target: the named modules train in full beside LoRA and travel in the adapter; one
    inside the vision tower turns the feature cache off. Unknown or LoRA-adapted names are refused."""
    cfg = config(tmp_path, tiny_model_dir, toy_dataset, num_train_epochs=1, save_strategy="no")
    for target, error in (
        ("normal", "normal matches no module"),
        ("q_proj", "q_proj names layers LoRA adapts"),
    ):
        assert main(["train", str(cfg), f"additional_target={target}"]) == 2
        assert f"key 'additional_target': {error}" in capsys.readouterr().err
    assert main(["train", str(cfg), "additional_target=norm"]) == 0
    assert "vision feature cache off" in capsys.readouterr().out  # the mergers' norms train
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    whole = {k for k in adapter if ".lora_" not in k}
    assert any("language_model.norm" in k for k in whole) and any("visual.merger.norm" in k for k in whole)
    trained = next(k for k in whole if "language_model.norm.weight" in k)
    assert not torch.equal(adapter[trained], base["model.language_model.norm.weight"])


def test_webui_openeqa_tab_reads_outside_media_only_when_the_config_allows(tmp_path) -> None:
    """The web UI's OpenEQA tab passes the config's allow_outside_media on, as training does (this
    lives here: tests/test_webui.py needs a browser)."""
    pytest.importorskip("gradio")
    from conftest import write_toy_dataset
    from eqakit.serve.webui_model import UIError
    from eqakit.serve.webui_openeqa import open_split

    data = write_toy_dataset(tmp_path / "data", episodes=1, questions=1, frames=1)
    elsewhere = tmp_path / "other-disk" / "ep0"
    elsewhere.parent.mkdir()
    (data / "open_eqa_frames" / "ep0").rename(elsewhere)
    (data / "open_eqa_frames" / "ep0").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UIError, match="allow_outside_media: true"):
        open_split(str(data), "toy")
    samples, _, chosen = open_split(str(data), "toy", allow_outside_media=True)
    assert (chosen, len(samples)) == ("toy", 1) and samples[0].images[0].is_file()
