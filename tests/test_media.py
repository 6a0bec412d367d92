"""A dataset's media problems, found at once and worded once (`eqakit.data.media`), by every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_toy_dataset
from eqakit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _broken(root: Path) -> Path:
    """The toy dataset with four different media problems in four rows, each file its own."""
    data = write_toy_dataset(root, episodes=2, questions=3)
    rows = [json.loads(line) for line in (data / "toy.jsonl").read_text().splitlines()]
    rows[0]["images"][1] = "gone.jpg"
    (data / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    rows[1]["images"][0] = "corrupt.jpg"
    (data / "junk.mp4").write_bytes(b"not a video" * 50)
    rows[3]["instruction"] = "<video>" + rows[3]["instruction"]
    rows[3]["videos"] = ["junk.mp4"]
    rows[4]["instruction"] = "<image>What color is the ball?"  # two images listed
    (data / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = json.loads((data / "dataset_info.json").read_text())
    info["toy"]["columns"]["videos"] = "videos"
    (data / "dataset_info.json").write_text(json.dumps(info))
    return data


def _config(tmp_path: Path, name: str, model: Path, data: Path, **stage: object) -> Path:
    settings = {
        "model_name_or_path": str(model),
        "finetuning_type": "lora",
        "dataset_dir": str(data),
        "template": "qwen3_vl_nothink",
        "cutoff_len": 512,
        "output_dir": str(tmp_path / name),
        "report_to": "none",
        **stage,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()), encoding="utf-8")
    return path


def test_train_and_predict_report_every_media_problem_in_the_same_words(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Training's planning and predict's preflight read a dataset's media through one check: the
    same rows give the same error, every problem named with its row, before any output is written."""
    data = _broken(tmp_path / "data")
    train = _config(tmp_path, "train", tiny_model_dir, data, stage="sft", do_train=True, dataset="toy")
    predict = _config(
        tmp_path,
        "predict",
        tiny_model_dir,
        data,
        stage="sft",
        do_predict=True,
        eval_dataset="toy",
        predict_with_generate=True,
    )
    errors = []
    for cfg in (train, predict):
        assert main(["train", str(cfg)]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        errors.append(err[err.index("bad images or videos in the dataset:") :])
    assert errors[0] == errors[1]
    problems = errors[0].splitlines()[1:]
    toy = data / "toy.jsonl"
    assert [p.strip().split(": ", 1)[0] for p in problems] == [f"{toy}:{n}" for n in (1, 2, 4, 5)]
    assert f"image file not found: {data / 'gone.jpg'}" in problems[0]
    assert f"image {data / 'corrupt.jpg'} cannot be read" in problems[1]
    assert "video 0: video" in problems[2] and "junk.mp4 cannot be read" in problems[2]
    assert "the text has 1 image placeholder(s) but the sample has 2 image(s)" in problems[3]
    assert not (tmp_path / "train").exists() and not (tmp_path / "predict").exists()


def test_an_episodes_frames_are_decoded_once_across_threads_and_least_recently_used_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Predict's decoding threads, training's dataset and the OpenEQA tab share `MediaCache`: the
    questions of an episode, asked for at once, get the same decoded frames, each file read once."""
    from concurrent.futures import ThreadPoolExecutor

    import eqakit.data.media as media
    from eqakit.data.dataset import load_samples

    data = write_toy_dataset(tmp_path / "data", episodes=3, questions=4)
    samples = load_samples("toy", data)
    opened: list[Path] = []
    open_rgb = media.open_rgb

    def counted(path: Path) -> Image.Image:
        opened.append(path)
        return open_rgb(path)

    monkeypatch.setattr(media, "open_rgb", counted)
    cache = media.MediaCache(size=4)
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(lambda s: cache.load(s, [])[0], samples[:4] * 4))
    assert sorted(opened) == sorted(samples[0].images)
    assert all(images[i] is loaded[0][i] for images in loaded for i in range(2))
    assert [im.tobytes() for im in loaded[0]] == [open_rgb(p).tobytes() for p in samples[0].images]

    for sample in (samples[4], samples[8]):  # two more episodes: 4 entries hold only the last two
        cache.load(sample, [])
    cache.load(samples[0], [])
    assert len(opened) == 8


def test_the_openeqa_tab_asks_with_the_frames_predict_decodes(tmp_path: Path) -> None:
    """The OpenEQA tab checks and decodes a row as predict does: a video row (`prepare --as-video`)
    is asked with its video, an image row with its images; a broken row is one error in the
    dataset check's words."""
    from eqakit.data.dataset import load_samples
    from eqakit.data.encode import VideoBudget
    from eqakit.data.media import MediaCache
    from eqakit.data.video import load
    from eqakit.serve.webui_model import UIError
    from eqakit.serve.webui_openeqa import media_of, shown_frames

    budget, cache = VideoBudget(), MediaCache()
    videos = load_samples("toy", write_toy_dataset(tmp_path / "videos", 1, 1, frames=4, as_video=True))[0]
    images, clips = media_of(videos, budget, cache)
    expected = load(videos.videos[0], budget.fps, budget.maxlen)
    assert images == [] and [c.info for c in clips] == [expected.info]
    assert [f.tobytes() for f in clips[0].frames] == [f.tobytes() for f in expected.frames]
    assert [caption for _, caption in shown_frames(videos, images, clips)][:2] == [
        "video 1, 0.0 s",
        "video 1, 0.5 s",
    ]

    data = _broken(tmp_path / "data")
    rows = load_samples("toy", data)
    images, clips = media_of(rows[2], budget, cache)
    assert len(images) == 2 and clips == []
    with pytest.raises(UIError, match=r"bad images or videos in the dataset:\n  .*toy\.jsonl:4: video 0: "):
        media_of(rows[3], budget, cache)
