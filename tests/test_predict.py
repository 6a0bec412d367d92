"""`eqakit train eval_args.yaml` (do_predict): files, keys, resume, bad input, on the tiny model."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText

from eqakit.config import load_config
from eqakit.data.media import MediaCache
from eqakit.errors import DataError
from eqakit.evaluate.predict import run_predict

QUESTIONS = (
    ("What color is the sofa?", "Red.", "attribute recognition"),
    ("Where is the lamp?", "On the table.", "object localization"),
    ("Is the door open?", "Yes.", "object state recognition"),
    ("What is on the bed?", "A pillow.", "object recognition"),
)
LF_KEYS = (
    "predict_bleu-4",
    "predict_rouge-1",
    "predict_rouge-2",
    "predict_rouge-l",
    "predict_runtime",
    "predict_samples_per_second",
    "predict_steps_per_second",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_dataset(root: Path, episodes: int = 3) -> Path:
    """A prepared OpenEQA-style dataset: 4 JPEG frames per episode, shared by its 3-4 questions."""
    rows = []
    for episode in range(episodes):
        rng = np.random.default_rng(episode)
        images = []
        for k in range(4):
            path = root / "open_eqa_frames" / f"ep{episode}" / f"{k:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (128, 160, 3), dtype=np.uint8)).save(path, quality=85)
            images.append(path.relative_to(root).as_posix())
        for q, (question, answer, category) in enumerate(QUESTIONS[: 3 + episode % 2]):
            rows.append(
                {
                    "instruction": "<image>" * 4 + question,
                    "input": "",
                    "output": answer,
                    "images": images,
                    "question_id": f"ep{episode}-q{q}",
                    "category": category,
                    "episode_history": f"hm3d-v0/ep{episode}",
                }
            )
    rows.insert(2, rows.pop())  # episodes interleaved in the file, as a shuffled split would be
    (root / "open_eqa_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    columns = {"prompt": "instruction", "query": "input", "response": "output", "images": "images"}
    info = {"open_eqa_test": {"file_name": "open_eqa_test.jsonl", "columns": columns}}
    (root / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data")


def config(model_dir: Path, dataset: Path, output: Path, **extra):
    keys = {
        "model_name_or_path": str(model_dir),
        "template": "qwen3_vl_nothink",
        "do_predict": True,
        "predict_with_generate": True,
        "eval_dataset": "open_eqa_test",
        "dataset_dir": str(dataset),
        "output_dir": str(output),
        "per_device_eval_batch_size": 2,
        "max_new_tokens": 8,
        "do_sample": False,
        "report_to": "none",
        **extra,
    }
    return load_config("train", extra=keys)


def rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "generated_predictions.jsonl").read_text().splitlines()]


def test_predict_writes_llama_factory_files(lively_dir: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    results = run_predict(config(lively_dir, dataset, out))

    written = rows(out)
    source = [json.loads(line) for line in (dataset / "open_eqa_test.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in written] == [s["question_id"] for s in source]  # dataset order
    for row, sample in zip(written, source, strict=True):
        assert row["label"] == sample["output"] and row["category"] == sample["category"]
        assert row["prompt"].startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")
        assert row["prompt"].endswith(
            sample["instruction"].replace("<image>", "") + "<|im_end|>\n<|im_start|>assistant\n"
        )
        assert row["images"] == sample["images"]
        assert isinstance(row["predict"], str)
    assert len({r["predict"] for r in written}) > 1  # answers depend on the question and frames

    on_disk = json.loads((out / "predict_results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in (*LF_KEYS, "predict_exact_match", "predict_token_f1"):
        assert isinstance(on_disk[key], float), key
    assert on_disk["predict_samples"] == on_disk["predict_generated"] == len(source)
    assert set(on_disk["predict_per_category"]) == {c for _, _, c in QUESTIONS}
    assert set(LF_KEYS) <= set(json.loads((out / "all_results.json").read_text()))
    report = (out / "report.md").read_text()
    assert "BLEU-4" in report and "object localization" in report
    made = json.loads((out / "eqakit_predict.json").read_text())  # how they were made
    assert made["model"] == str(lively_dir) and made["results"] == on_disk and made["samples"] == len(source)
    assert made["config"]["eval_dataset"] == "open_eqa_test" and made["transformers"] and "git_commit" in made
    assert (made["stage"], made["backend"], made["device"], made["dtype"]) == (
        "predict",
        "transformers",
        "cpu",
        "float32",
    )
    assert made["resolved_config"]["repetition_penalty"] == 1.0 and "repetition_penalty" not in made["config"]


def test_an_interrupted_run_resumes_and_ends_identical(
    lively_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    whole = tmp_path / "whole"
    run_predict(config(lively_dir, dataset, whole))
    expected = (whole / "generated_predictions.jsonl").read_text()

    cut = tmp_path / "cut"
    cut.mkdir()
    lines = expected.splitlines(keepends=True)
    # two rows finished, a third cut short by the kill; rows land in completion order, not file order
    (cut / "generated_predictions.jsonl").write_text(lines[5] + lines[1] + lines[2][:40])
    results = run_predict(config(lively_dir, dataset, cut))

    assert results["predict_resumed"] == 2
    assert results["predict_generated"] == len(lines) - 2
    assert (cut / "generated_predictions.jsonl").read_text() == expected
    assert (
        results["predict_bleu-4"]
        == json.loads((whole / "predict_results.json").read_text())["predict_bleu-4"]
    )


def test_preprocessing_workers_decode_frames_ahead_with_the_same_answers(
    lively_dir: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """preprocessing_num_workers (the seed's eval YAML sets 4): frames decoded by threads, same file."""
    alone, threads = tmp_path / "one", tmp_path / "four"
    run_predict(config(lively_dir, dataset, alone, preprocessing_num_workers=1))
    seen: set[str] = set()
    load = MediaCache.load

    def recording(self, sample, videos):
        seen.add(threading.current_thread().name)
        return load(self, sample, videos)

    monkeypatch.setattr(MediaCache, "load", recording)
    run_predict(config(lively_dir, dataset, threads, preprocessing_num_workers=4))
    assert any(name.startswith("eqakit-frames") for name in seen)
    assert (alone / "generated_predictions.jsonl").read_text() == (
        threads / "generated_predictions.jsonl"
    ).read_text()
    frame = dataset / "open_eqa_frames" / "ep1" / "001.jpg"
    frame.write_bytes(frame.read_bytes()[:400])  # truncated: named, before any generation, as with 1
    with pytest.raises(DataError, match=r"open_eqa_test\.jsonl:\d+: image .*ep1/001\.jpg cannot be"):
        run_predict(config(lively_dir, dataset, tmp_path / "bad", preprocessing_num_workers=4))


def test_sampling_is_reproducible_run_to_run(lively_dir: Path, dataset: Path, tmp_path: Path) -> None:
    """LLaMA-Factory's default decoding samples (do_sample true); each sample's seed comes from `seed`."""
    first, second = tmp_path / "a", tmp_path / "b"
    run_predict(config(lively_dir, dataset, first, do_sample=True, temperature=0.9, top_p=0.9, seed=3))
    run_predict(config(lively_dir, dataset, second, do_sample=True, temperature=0.9, top_p=0.9, seed=3))
    assert rows(first) == rows(second)


def test_too_long_samples_are_scaled_or_left_out_and_counted(
    lively_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    lines = (dataset / "open_eqa_test.jsonl").read_text().splitlines()
    wordy = json.loads(lines[0])
    wordy["instruction"] = "<image>" * 4 + "Where is the lamp? " * 40
    wordy["question_id"] = "wordy"
    (dataset / "open_eqa_test.jsonl").write_text("\n".join([*lines, json.dumps(wordy)]) + "\n")

    out = tmp_path / "eval"
    results = run_predict(config(lively_dir, dataset, out, cutoff_len=60))
    assert results["predict_too_long"] == 1
    assert results["predict_scaled_down"] == len(lines)  # 4 x 20 image tokens do not fit in 60
    assert [r["question_id"] for r in rows(out)] == [json.loads(line)["question_id"] for line in lines]


def test_bad_rows_are_reported_before_any_work(lively_dir: Path, dataset: Path, tmp_path: Path) -> None:
    lines = (dataset / "open_eqa_test.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    broken["images"] = broken["images"][:3]
    (dataset / "open_eqa_test.jsonl").write_text("\n".join([lines[0], json.dumps(broken), *lines[2:]]) + "\n")
    missing = dataset / "open_eqa_frames" / "ep2" / "001.jpg"
    missing.unlink()

    out = tmp_path / "eval"
    with pytest.raises(DataError) as info:
        run_predict(config(lively_dir, dataset, out))
    message = str(info.value)
    assert "open_eqa_test.jsonl:2" in message and "4 image placeholder(s)" in message
    assert str(missing) in message
    assert not (out / "generated_predictions.jsonl").exists()

    with pytest.raises(DataError, match="open_eqa_tset"):
        run_predict(config(lively_dir, dataset, out, eval_dataset="open_eqa_tset"))

    shutil.copy(dataset / "open_eqa_frames" / "ep2" / "000.jpg", missing)
    (dataset / "open_eqa_test.jsonl").write_text("\n".join(lines) + "\n")
    assert run_predict(config(lively_dir, dataset, out))["predict_samples"] == len(lines)


def test_bad_settings_and_a_foreign_adapter_stop_before_any_work(
    lively_dir: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import LoraConfig, get_peft_model

    from eqakit.cli import main
    from eqakit.model.tiny import build_tiny_model

    out = tmp_path / "eval"
    base_args = [
        f"model_name_or_path={lively_dir}",
        "template=qwen3_vl_nothink",
        "do_predict=true",
        "predict_with_generate=true",
        "eval_dataset=open_eqa_test",
        f"dataset_dir={dataset}",
        f"output_dir={out}",
        "report_to=none",
    ]
    cfg = tmp_path / "predict.yaml"
    cfg.write_text("stage: sft\n")
    for bad, expected in (
        ("max_new_tokens=0", "key 'max_new_tokens': 0 is out of range (must be >= 1)"),
        ("top_p=1.5", "key 'top_p': 1.5 is out of range (must be <= 1.0)"),
    ):
        assert main(["train", str(cfg), *base_args, bad]) == 2
        assert expected in capsys.readouterr().err

    other = build_tiny_model(tmp_path / "wider", hidden_size=96, intermediate_size=160)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    get_peft_model(AutoModelForImageTextToText.from_pretrained(other), lora).save_pretrained(
        tmp_path / "foreign"
    )
    assert main(["train", str(cfg), *base_args, f"adapter_name_or_path={tmp_path / 'foreign'}"]) == 1
    err = capsys.readouterr().err
    assert "does not fit base model" in err and "lora_A" in err and "Traceback" not in err
    assert not (out / "generated_predictions.jsonl").exists()


@pytest.mark.slow
def test_two_processes_predict_the_one_process_file(lively_dir: Path, dataset: Path, tmp_path: Path) -> None:
    """torchrun: each process answers whole episodes; process 0 merges the answers into one
    generated_predictions.jsonl in dataset order, the one process's file, and leaves no part file.
    Parts an interrupted run left are read as done by the next run, at any world size."""
    from test_train import run_torchrun

    alone = run_predict(config(lively_dir, dataset, tmp_path / "one"))
    keys = {
        "model_name_or_path": str(lively_dir), "template": "qwen3_vl_nothink", "do_predict": True,
        "predict_with_generate": True, "eval_dataset": "open_eqa_test", "dataset_dir": str(dataset),
        "output_dir": str(tmp_path / "two"), "per_device_eval_batch_size": 2, "max_new_tokens": 8,
        "do_sample": False, "report_to": "none",
    }  # fmt: skip
    (tmp_path / "predict.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
    result = run_torchrun(["--nproc_per_node", "2", "-m", "eqakit", "train", str(tmp_path / "predict.yaml")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert rows(tmp_path / "two") == rows(tmp_path / "one")
    assert not list((tmp_path / "two").glob("*.rank*"))
    together = json.loads((tmp_path / "two" / "predict_results.json").read_text())
    assert together["predict_bleu-4"] == alone["predict_bleu-4"] and together["predict_samples"] == 10

    interrupted = tmp_path / "three"
    interrupted.mkdir()
    done = (tmp_path / "one" / "generated_predictions.jsonl").read_text().splitlines()
    (interrupted / "generated_predictions.rank1.jsonl").write_text("\n".join(done[:4]) + "\n" + done[4][:20])
    resumed = run_predict(config(lively_dir, dataset, interrupted))
    assert resumed["predict_resumed"] == 4
    assert rows(interrupted) == rows(tmp_path / "one") and not list(interrupted.glob("*.rank*"))


def test_predict_resumes_after_a_line_cut_inside_a_character(
    lively_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    """A disk that filled up in the middle of a UTF-8 character leaves bytes that do not decode: the
    rerun keeps the complete rows before them and answers the rest."""
    first = tmp_path / "first"
    run_predict(config(lively_dir, dataset, first))
    complete = (first / "generated_predictions.jsonl").read_bytes().splitlines(keepends=True)[:3]
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "generated_predictions.jsonl").write_bytes(b"".join(complete) + '{"predict": "沙发'.encode()[:-1])
    results = run_predict(config(lively_dir, dataset, cut))
    assert results["predict_resumed"] == 3
    assert rows(cut) == rows(first)
