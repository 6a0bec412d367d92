"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen3-VL (seed 0), built once per session; tests must not modify it."""
    from eqakit.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "qwen3-vl-tiny")


def geometry_of(model_dir: Path):
    """The `eqakit.data.encode.Geometry` of a saved model (read from its config.json)."""
    from transformers import AutoConfig

    from eqakit.data.encode import Geometry

    return Geometry.of(AutoConfig.from_pretrained(model_dir))


@pytest.fixture(scope="session")
def geometry(tiny_model_dir: Path):
    """The tiny Qwen3-VL's geometry (what `plan_sample` plans images and videos with)."""
    return geometry_of(tiny_model_dir)


COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def write_toy_dataset(
    root: Path, episodes: int = 6, questions: int = 4, frames: int = 2, as_video: bool = False
) -> Path:
    """A LLaMA-Factory dataset dir like `eqakit prepare` writes: a coloured ball per episode, "What color?".

    Registered as ``toy`` (all rows) in dataset_info.json; frames are small JPEGs shared by the
    questions of an episode, as in OpenEQA; ``as_video``: each episode's frames are one video (a
    ``videos`` column of frame lists, one ``<video>`` placeholder).
    """
    import json

    from PIL import Image, ImageDraw

    rows = []
    for ep in range(episodes):
        color = list(COLORS)[ep % len(COLORS)]
        images = []
        for k in range(frames):
            image = Image.new("RGB", (128, 96), (200, 200, 200))
            ImageDraw.Draw(image).ellipse([30 + 10 * k, 30, 70 + 10 * k, 70], fill=COLORS[color])
            path = root / "open_eqa_frames" / f"ep{ep}" / f"{k:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=90)
            images.append(path.relative_to(root).as_posix())
        for q in range(questions):
            media = {"videos": [images]} if as_video else {"images": images}
            rows.append(
                {
                    "instruction": ("<video>" if as_video else "<image>" * frames)
                    + "What color is the ball?",
                    "input": "",
                    "output": color.capitalize(),
                    **media,
                    "question_id": f"q{ep}-{q}",
                    "category": "attribute recognition",
                    "episode_history": f"toy/ep{ep}",
                }
            )
    (root / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    columns.update({"videos": "videos"} if as_video else {"images": "images"})
    (root / "dataset_info.json").write_text(
        json.dumps({"toy": {"file_name": "toy.jsonl", "columns": columns}})
    )
    return root


def write_toy_preferences(
    root: Path, episodes: int = 4, questions: int = 2, formatting: str = "sharegpt"
) -> Path:
    """A preference dataset (``ranking: true``) over the toy episodes' frames, registered as
    ``prefs``: each question's chosen answer is the ball's colour, the rejected one another colour
    (in a longer phrase, so the two sides differ in length)."""
    import json

    write_toy_dataset(root, episodes=episodes, questions=questions)
    names = list(COLORS)
    rows = []
    for row in map(json.loads, (root / "toy.jsonl").read_text().splitlines()):
        wrong = names[(names.index(row["output"].lower()) + 1) % len(names)]
        chosen, rejected = row["output"], f"I think it is {wrong}, probably."
        if formatting == "sharegpt":
            rows.append(
                {
                    "conversations": [{"from": "human", "value": row["instruction"]}],
                    "chosen": {"from": "gpt", "value": chosen},
                    "rejected": {"from": "gpt", "value": rejected},
                    "images": row["images"],
                }
            )
        else:
            rows.append(
                {
                    "instruction": row["instruction"],
                    "chosen": chosen,
                    "rejected": rejected,
                    "images": row["images"],
                }
            )
    (root / "prefs.json").write_text(json.dumps(rows), encoding="utf-8")
    info = json.loads((root / "dataset_info.json").read_text())
    columns = {"chosen": "chosen", "rejected": "rejected", "images": "images"}
    columns |= {"messages": "conversations"} if formatting == "sharegpt" else {"prompt": "instruction"}
    info["prefs"] = {"file_name": "prefs.json", "ranking": True, "formatting": formatting, "columns": columns}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def assert_close_to_scale(actual, expected, rel: float = 1e-6) -> None:
    """Float tensors equal within ``rel`` of ``expected``'s largest magnitude.

    Merged weights, packed rows and cached features change the order of float32 sums, and the
    last bits then depend on the CPU's kernels (AVX512 or not): an absolute bound that passes on
    one machine fails on another. 1e-6 of the scale is a few float32 ulps of the largest value.
    """
    scale = float(expected.abs().max())
    diff = float((actual - expected).abs().max())
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel:g} x scale {scale:.3g}"


@pytest.fixture
def toy_dataset(tmp_path: Path) -> Path:
    """A fresh toy dataset directory per test (tests may corrupt it)."""
    return write_toy_dataset(tmp_path / "data")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: thread start-up dominates on a shared 2-core machine (use via pytestmark)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_lively(source: Path, out: Path, scale: float = 6) -> Path:
    """A copy of a tiny model with its matrices scaled (x6): greedy answers then depend on the input.

    The random tiny model at its initial scale echoes newlines whatever it is shown, so two decoders
    would agree even if one ignored the images; engine, predict, API and vLLM tests compare on these.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from eqakit.model.merge import publish_expert_layout

    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.ndim >= 2 and "embed_tokens" not in name:
                weight.mul_(scale)
    model.save_pretrained(out)
    publish_expert_layout(sorted(out.glob("model*.safetensors")), model.config)  # MoE: as Qwen publishes it
    AutoProcessor.from_pretrained(source).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lively_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, scaled by `make_lively`."""
    return make_lively(tiny_model_dir, tmp_path_factory.mktemp("lively") / "model")


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen3-VL-MoE (seed 0: `eqakit tiny-model --arch qwen3_vl_moe`); do not modify."""
    from eqakit.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-moe") / "qwen3-vl-moe-tiny", arch="qwen3_vl_moe")


@pytest.fixture(scope="session")
def lively_moe_dir(tiny_moe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny MoE model, scaled by `make_lively`."""
    return make_lively(tiny_moe_dir, tmp_path_factory.mktemp("lively-moe") / "model")


@pytest.fixture(scope="session")
def tiny_qwen2_5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen2.5-VL (seed 0: `eqakit tiny-model --arch qwen2_5_vl`); do not modify."""
    from eqakit.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-5") / "qwen2-5-vl-tiny", arch="qwen2_5_vl")


@pytest.fixture(scope="session")
def lively_qwen2_5_dir(tiny_qwen2_5_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2.5-VL, scaled by `make_lively` x10 (at x6 it still echoes newlines, as the others at x1)."""
    return make_lively(tiny_qwen2_5_dir, tmp_path_factory.mktemp("lively-qwen2-5") / "model", scale=10)


LIVELY = {"qwen3_vl": "lively_dir", "qwen3_vl_moe": "lively_moe_dir", "qwen2_5_vl": "lively_qwen2_5_dir"}


def device_under_test():
    """The device the exactness tests put their model on: ``EQAKIT_TEST_DEVICE`` (default ``cpu``).

    benchmarks/gpu_check.sh sets ``cuda`` to run the engine's equivalence with ``model.generate`` and
    the packing and vision-cache exactness tests on a GPU; only the tests that take the
    `device_under_test` fixture (or call this) follow it, everything else stays on the CPU.
    """
    import os

    import torch

    device = torch.device(os.environ.get("EQAKIT_TEST_DEVICE", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.exit(f"EQAKIT_TEST_DEVICE={device}: torch {torch.__version__} sees no CUDA device", 2)
    return device


@pytest.fixture(scope="session", name="device_under_test")
def device_under_test_fixture():
    """`device_under_test` as a fixture."""
    return device_under_test()
