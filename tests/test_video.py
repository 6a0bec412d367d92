"""Videos on the one path to model inputs: frames chosen as LLaMA-Factory chooses them, tokens and pixels
equal to Qwen3VLProcessor's, the token budget covering video, bad videos refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from PIL import Image
from transformers import AutoProcessor
from transformers.video_utils import VideoMetadata

from conftest import geometry_of
from eqakit.data.encode import PromptFormat, SampleTooLong, VideoBudget, materialize, plan_sample
from eqakit.data.template import render
from eqakit.data.video import VideoError, VideoSource, decode, probe


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    return AutoProcessor.from_pretrained(tiny_model_dir)


# transformers 5.19-5.24's Qwen3VLProcessor wraps each video's timestamped patches in one more
# <|vision_start|>...<|vision_end|> pair; Qwen's layout (transformers 4.57 and >= 5.25, LLaMA-Factory)
# and eqakit's have none. These releases are within eqakit's range (vLLM 0.32 needs < 5.20).
OUTER_VIDEO_PAIR = Version("5.19") <= Version(transformers.__version__) < Version("5.25")


def qwen_layout(inputs, tokenizer):
    """The processor's inputs in Qwen's video layout: on the releases that add the outer pair, the
    same inputs without it, after checking that the pair is the whole difference (one per video)."""
    if not OUTER_VIDEO_PAIR or "video_grid_thw" not in inputs or "second_per_grid_ts" in inputs:
        return inputs
    start, end, image_pad, video_pad = tokenizer.convert_tokens_to_ids(
        ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    )
    ids = inputs["input_ids"][0].tolist()
    outer = {i for i, t in enumerate(ids) if t == start and ids[i + 1] not in (image_pad, video_pad)}
    outer |= {i for i, t in enumerate(ids) if t == end and ids[i - 1] == end}
    assert len(outer) == 2 * len(inputs["video_grid_thw"]), (
        f"transformers {transformers.__version__}'s processor differs from Qwen's video layout by more "
        f"than one outer vision pair per video: {tokenizer.decode(ids)}"
    )
    keep = torch.tensor([i not in outer for i in range(len(ids))])
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in inputs:
            inputs[key] = inputs[key][:, keep]
    return inputs


def name_difference(tokenizer, theirs: list[int], ours: list[int]) -> str:
    """Where two token sequences first part, each side decoded around it (what a test reports when a
    new transformers release changes what its processor makes)."""
    at = next(
        (i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), min(len(theirs), len(ours))
    )
    window = slice(max(at - 8, 0), at + 12)
    return (
        f"transformers {transformers.__version__}'s processor and eqakit part at token {at} "
        f"({len(theirs)} vs {len(ours)} tokens):\n  processor: ...{tokenizer.decode(theirs[window])!r}\n"
        f"  eqakit:    ...{tokenizer.decode(ours[window])!r}"
    )


def frames_of(n: int, size: tuple[int, int] = (96, 64)) -> list[Image.Image]:
    rng = np.random.RandomState(n)
    return [Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def write_frames(root: Path, frames: list[Image.Image]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        paths.append(root / f"{i:03d}.png")
        frame.save(paths[-1])
    return paths


def write_video(
    path: Path, frames: list[Image.Image], fps: int = 10, codec: str = "mpeg4", pix_fmt: str = "yuv420p"
) -> Path:
    """A video file of ``frames`` (its container from the suffix); uncompressed ``rawvideo``/``rgb24``
    in an .avi takes any frame size (MPEG-4 and H.264 refuse odd ones)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_frames_are_chosen_as_llamafactory_chooses_them(tmp_path: Path) -> None:
    """A file: min(frames, maxlen, floor(duration * fps)) frames spread with linspace, timed by the
    stream's rate; a frame list: all frames 1/fps apart, sampled down to maxlen; odd counts padded."""
    video = write_video(tmp_path / "walk.mp4", frames_of(30), fps=10)  # 3 seconds
    info = probe(VideoSource(file=video), fps=2.0, maxlen=128)
    assert info.available == 30 and info.size == (96, 64)
    assert list(info.indices) == [int(i) for i in np.linspace(0, 29, 6).astype(np.int32)]
    assert info.times == tuple(i / 10 for i in info.indices)
    assert probe(VideoSource(file=video), fps=2.0, maxlen=4).indices == tuple(
        int(i) for i in np.linspace(0, 29, 4).astype(np.int32)
    )
    paths = write_frames(tmp_path / "frames", frames_of(5))
    listed = probe(VideoSource(frames=tuple(paths)), fps=2.0, maxlen=128)
    assert listed.indices == (0, 1, 2, 3, 4, 4) and listed.times == (0.0, 0.5, 1.0, 1.5, 2.0, 2.0)
    assert listed.clip_times() == [0.25, 1.25, 2.0] and not listed.sampled_down
    short = probe(VideoSource(frames=tuple(paths)), fps=2.0, maxlen=3)
    assert short.indices == (0, 2, 4, 4) and short.sampled_down
    decoded = decode(VideoSource(frames=tuple(paths)), listed)
    assert len(decoded) == 6 and decoded[5].tobytes() == decoded[4].tobytes()


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("kind", ["frames", "file"])
def test_tokens_and_pixels_equal_the_processors(request, tmp_path: Path, kind: str, arch: str) -> None:
    """A conversation with an image and a video: our ids, modality types, pixel values and grids are
    Qwen3VLProcessor's (or Qwen2_5_VLProcessor's, with its second_per_grid_ts) for the same frames,
    times and sizes."""
    qwen2_5 = arch == "qwen2_5_vl"
    processor = AutoProcessor.from_pretrained(
        request.getfixturevalue("tiny_qwen2_5_dir" if qwen2_5 else "tiny_model_dir")
    )
    if kind == "frames":
        source = VideoSource(frames=tuple(write_frames(tmp_path / "f", frames_of(5, (128, 96)))))
    else:
        source = VideoSource(file=write_video(tmp_path / "v.mp4", frames_of(24, (128, 96)), fps=8))
    video_budget = VideoBudget(min_pixels=16 * 16, max_pixels=64 * 64, fps=2.0, maxlen=16)
    fmt = PromptFormat("qwen2_vl" if qwen2_5 else "qwen3_vl_nothink", cutoff_len=4096, video=video_budget)
    info = probe(source, video_budget.fps, video_budget.maxlen)
    image = Image.new("RGB", (96, 64), (255, 0, 0))
    messages = [
        {"role": "user", "content": "<image>Here is the room: <video> Where is the ball?"},
        {"role": "assistant", "content": "On the sofa"},
    ]
    geometry = geometry_of(request.getfixturevalue("tiny_qwen2_5_dir" if qwen2_5 else "tiny_model_dir"))
    plan = plan_sample(messages, [image.size], processor.tokenizer, fmt, videos=[info], geometry=geometry)
    frames = decode(source, info)
    ours = materialize(plan, [image], processor, fmt.budget, [frames], video_budget)

    # the chat template's markup: one video pad in a vision pair, which the processor expands
    text = "".join(
        s.text for s in render(messages, fmt.template, add_generation_prompt=False, video_times=[None])
    )
    # the times the processor computes from the metadata: our chosen indices over their frame rate
    assert info.fps == (video_budget.fps if kind == "frames" else 8.0)
    metadata = VideoMetadata(total_num_frames=len(frames), fps=info.fps, frames_indices=list(info.indices))
    per_frame = 1 if qwen2_5 else len(frames)  # Qwen2-VL's video processor bounds each frame's pixels
    if qwen2_5:  # its positions follow the chosen frames' rate: their count over the source's length
        unique = sorted(set(info.indices))
        metadata = VideoMetadata(total_num_frames=info.available, fps=info.fps, frames_indices=unique)
    ref = processor(
        text=[text],
        images=[image],
        videos=[frames],
        video_metadata=[metadata],
        images_kwargs={
            "size": {"shortest_edge": fmt.budget.min_pixels, "longest_edge": fmt.budget.max_pixels}
        },
        videos_kwargs={
            "do_sample_frames": False,
            "return_metadata": True,
            "cap_pixels_per_frame": False,
            "size": {"shortest_edge": per_frame * 16 * 16, "longest_edge": per_frame * 64 * 64},
        },
        return_tensors="pt",
    )
    ref = qwen_layout(ref, processor.tokenizer)
    if qwen2_5:
        assert ours["second_per_grid_ts"].tolist() == pytest.approx(ref["second_per_grid_ts"].tolist())
    theirs = ref["input_ids"][0].tolist()
    assert theirs == ours["input_ids"].tolist(), name_difference(
        processor.tokenizer, theirs, ours["input_ids"].tolist()
    )
    assert torch.equal(ref["mm_token_type_ids"][0], ours["mm_token_type_ids"])
    assert torch.equal(ref["pixel_values"], ours["pixel_values"])
    assert torch.equal(ref["pixel_values_videos"], ours["pixel_values_videos"])
    assert torch.equal(ref["video_grid_thw"], ours["video_grid_thw"])
    assert (ours["labels"][ours["mm_token_type_ids"] > 0] == -100).all()


def test_the_token_budget_scales_frames_then_drops_them(processor, geometry) -> None:
    """Frames shrink first; below the smallest size whole temporal patches go, evenly; counted."""
    info = probe_frames(16, (512, 384))
    messages = [
        {"role": "user", "content": "<video>What is here?"},
        {"role": "assistant", "content": "A sofa"},
    ]
    budget = VideoBudget(min_pixels=64 * 64, max_pixels=256 * 256)
    full = plan_sample(
        messages,
        [],
        processor.tokenizer,
        PromptFormat(cutoff_len=8192, video=budget),
        videos=[info],
        geometry=geometry,
    )
    assert not full.scaled_down and full.frames_dropped == 0 and full.videos[0].grid[0] == 8
    scaled = plan_sample(
        messages,
        [],
        processor.tokenizer,
        PromptFormat(cutoff_len=400, video=budget),
        videos=[info],
        geometry=geometry,
    )
    assert scaled.scaled_down and scaled.frames_dropped == 0 and scaled.length <= 400
    dropped = plan_sample(
        messages,
        [],
        processor.tokenizer,
        PromptFormat(cutoff_len=90, video=budget),
        videos=[info],
        geometry=geometry,
    )
    assert dropped.frames_dropped > 0 and dropped.length <= 90
    kept = dropped.videos[0].info
    assert (
        len(kept.indices) == 16 - dropped.frames_dropped and kept.indices[0] == 0 and kept.indices[-1] == 15
    )
    with pytest.raises(SampleTooLong):
        plan_sample(
            messages,
            [],
            processor.tokenizer,
            PromptFormat(cutoff_len=20, video=budget),
            videos=[info],
            geometry=geometry,
        )


def probe_frames(n: int, size: tuple[int, int]):
    from eqakit.data.video import VideoInfo

    return VideoInfo(size, tuple(range(n)), 2.0, n)


def test_bad_videos_are_named(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="video file not found"):
        probe(VideoSource(file=tmp_path / "missing.mp4"), 2.0, 8)
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    with pytest.raises(VideoError, match="junk.mp4 cannot be read"):
        probe(VideoSource(file=tmp_path / "junk.mp4"), 2.0, 8)
    paths = write_frames(tmp_path / "a", frames_of(2, (64, 64))) + write_frames(
        tmp_path / "b", frames_of(1, (32, 64))
    )
    with pytest.raises(VideoError, match="one size; these have 32x64, 64x64"):
        probe(VideoSource(frames=tuple(paths)), 2.0, 8)


def _video_dataset(root: Path, rows: list[dict], videos_column: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = {
        "prompt": "instruction",
        "response": "output",
        **({"videos": "videos"} if videos_column else {}),
    }
    (root / "dataset_info.json").write_text(json.dumps({"v": {"file_name": "v.jsonl", "columns": columns}}))
    return root


def _two_videos(data: Path, size: tuple[int, int], listed: int, filed: int) -> tuple[list[dict], list[str]]:
    """A dataset ``v`` of two rows: a video of ``listed`` frame files, and an mp4 of ``filed`` frames at 10 fps."""
    frames = [p.relative_to(data).as_posix() for p in write_frames(data / "ep0", frames_of(listed, size))]
    write_video(data / "ep1.mp4", frames_of(filed, size), fps=10)
    rows = [
        {"instruction": "<video>Where is the ball?", "output": "On the sofa", "videos": [frames]},
        {"instruction": "<video>What color is the wall?", "output": "White", "videos": ["ep1.mp4"]},
    ]
    _video_dataset(data, rows)
    return rows, frames


def _train(tiny_model_dir: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    import yaml

    config = out.with_name(out.name + ".yaml")
    keys = {
        "model_name_or_path": str(tiny_model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "dataset": "v", "dataset_dir": str(data), "template": "qwen3_vl_nothink", "output_dir": str(out), "report_to": "none", "max_steps": 2,
        "lora_rank": 4, "per_device_train_batch_size": 2, "save_strategy": "no", "video_max_pixels": 4096,
    }  # fmt: skip
    config.write_text(yaml.safe_dump(keys))
    return subprocess.run(
        [sys.executable, "-m", "eqakit", "train", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_train_on_videos_and_refuse_bad_rows_by_name(
    tiny_model_dir: Path, tiny_qwen2_5_dir: Path, tmp_path: Path
) -> None:
    """`eqakit train` on frame-list and video-file rows (Qwen3-VL, then Qwen2.5-VL); a placeholder count that differs from the
    videos, and an unreadable video, stop the run naming the row, with nothing written."""
    data = tmp_path / "data"
    rows, frames = _two_videos(data, (64, 64), 6, 20)
    done = _train(tiny_model_dir, data, tmp_path / "out", "video_maxlen=4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    record = json.loads((tmp_path / "out" / "eqakit_run.json").read_text())
    assert record["data"]["videos_sampled_to_video_maxlen"] == 1  # the 6-frame list, to 4
    assert "1 video(s) sampled down to video_maxlen" in done.stdout
    qwen2_5 = _train(tiny_qwen2_5_dir, data, tmp_path / "out-qwen2-5", "video_maxlen=4", "template=qwen2_vl")
    assert qwen2_5.returncode == 0, qwen2_5.stderr[-3000:]
    assert (tmp_path / "out-qwen2-5" / "adapter_model.safetensors").exists()

    bad = _video_dataset(
        tmp_path / "bad", [{**rows[0], "instruction": "<video><video>Where?", "videos": [frames]}]
    )
    (bad / "ep0").symlink_to(data / "ep0")
    failed = _train(tiny_model_dir, bad, tmp_path / "out-bad", "allow_outside_media=true")
    assert failed.returncode != 0 and "v.jsonl:1" in failed.stderr and "2 video placeholder" in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "out-bad").exists()

    (data / "broken.mp4").write_bytes(b"\x00" * 100)
    broken = _video_dataset(tmp_path / "broken", [{**rows[1], "videos": [str(data / "broken.mp4")]}])
    failed = _train(tiny_model_dir, broken, tmp_path / "out-broken", "allow_outside_media=true")
    assert (
        failed.returncode != 0
        and "v.jsonl:1" in failed.stderr
        and "broken.mp4 cannot be read" in failed.stderr
    )
    assert "Traceback" not in failed.stderr


# ---- the engine: video requests decode exactly what model.generate decodes --------------------------

VIDEO_BUDGET = VideoBudget(
    min_pixels=16 * 16, max_pixels=768 * 768, fps=1.0, maxlen=16
)  # 1 fps: Qwen2.5-VL's second_per_grid_ts is 2, not its default of 1


def _chat_template_text(messages: list[dict], videos: list, template: str = "qwen3_vl_nothink") -> str:
    """The prompt as the checkpoint's chat template writes it (one video pad per video), for the processor."""
    from eqakit.data.template import render_prompt

    return render_prompt(messages, template, video_times=[None] * len(videos))


def _reference(model, processor, request, budget=VIDEO_BUDGET) -> list[int]:
    """model.generate on the processor's inputs. Qwen2.5-VL: its processor times the video from the
    metadata (chosen frames over all frames at the source's rate) and bounds each frame's pixels."""
    qwen2_5 = model.config.model_type == "qwen2_5_vl"
    text = _chat_template_text(
        request.messages, request.videos, "qwen2_vl" if qwen2_5 else "qwen3_vl_nothink"
    )
    kwargs = {}
    if request.videos:
        frames = len(request.videos[0].frames)
        per = 1 if qwen2_5 else frames
        kwargs = {
            "videos": [list(v.frames) for v in request.videos],
            "video_metadata": [
                VideoMetadata(total_num_frames=v.info.available, fps=v.info.fps, frames_indices=sorted(set(v.info.indices)))
                if qwen2_5
                else VideoMetadata(total_num_frames=len(v.frames), fps=v.info.fps, frames_indices=list(v.info.indices))
                for v in request.videos
            ],
            "videos_kwargs": {
                "do_sample_frames": False,
                "return_metadata": True,
                "cap_pixels_per_frame": False,
                "size": {"shortest_edge": per * budget.min_pixels, "longest_edge": per * budget.max_pixels},
            },
        }  # fmt: skip
    size = {"shortest_edge": 32 * 32, "longest_edge": 768 * 768}
    inputs = processor(
        text=[text],
        images=request.images or None,
        images_kwargs={"size": size},
        return_tensors="pt",
        **kwargs,
    )
    inputs = qwen_layout(inputs, processor.tokenizer)
    if qwen2_5 and request.videos:
        assert inputs["second_per_grid_ts"].tolist() == pytest.approx(
            [2 / v.info.sampled_fps for v in request.videos]
        )
    out = model.generate(**inputs, do_sample=False, max_new_tokens=request.params.max_new_tokens)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def lively(lively_dir: Path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(lively_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(lively_dir)


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def lively_any(request: pytest.FixtureRequest):
    """The lively model of each video style: Qwen3-VL's timestamps, Qwen2.5-VL's second_per_grid_ts."""
    from transformers import AutoModelForImageTextToText

    from conftest import LIVELY

    path = request.getfixturevalue(LIVELY[request.param])
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


def _video_requests(tmp_path: Path):
    from eqakit.data.video import load
    from eqakit.engine import Request, SamplingParams

    greedy = SamplingParams(max_new_tokens=8, do_sample=False)
    requests = []
    for episode in range(2):
        source = VideoSource(
            frames=tuple(write_frames(tmp_path / f"ep{episode}", frames_of(4 + 4 * episode, (160, 128))))
        )
        video = load(source, VIDEO_BUDGET.fps, VIDEO_BUDGET.maxlen)
        for question in ("Where is the lamp?", "What color is the chair?", "Is the door open?")[
            : 2 + episode
        ]:
            requests.append(
                Request([{"role": "user", "content": "<video>" + question}], greedy, videos=[video])
            )
    image = Image.new("RGB", (96, 64), (0, 128, 255))
    mixed = [{"role": "user", "content": "<image>and<video>: the same room?"}]
    requests.append(Request(mixed, greedy, images=[image], videos=[requests[0].videos[0]]))
    return requests


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "options",
    [
        pytest.param(
            {"max_batch_size": 1, "vision_cache_mib": 0, "prefix_cache_mib": 0}, id="reference-path"
        ),
        pytest.param({"max_batch_size": 4, "vision_cache_mib": 0, "prefix_cache_mib": 0}, id="batched"),
        pytest.param({"max_batch_size": 3, "min_prefix_tokens": 8}, id="all-together"),
    ],
)
def test_engine_video_answers_equal_plain_generate(lively_any, tmp_path: Path, options) -> None:
    """Frames, timestamps (Qwen3-VL) or temporal positions (Qwen2.5-VL), M-RoPE positions and features
    of videos through the engine (batched, feature cache, shared prefixes): the greedy tokens of
    model.generate on the processor's inputs."""
    from eqakit.data.encode import ImageBudget
    from eqakit.engine import HFEngine

    model, processor = lively_any
    requests = _video_requests(tmp_path)
    expected = [_reference(model, processor, r) for r in requests]
    assert expected[0] != expected[2]  # the answers depend on the video (else this test could not fail)
    template = "qwen2_vl" if model.config.model_type == "qwen2_5_vl" else "qwen3_vl_nothink"
    budget = ImageBudget(32 * 32, 768 * 768)
    fmt = PromptFormat(template, cutoff_len=2048, budget=budget, video=VIDEO_BUDGET)
    engine = HFEngine(model, processor, format=fmt, **options)
    assert [c.token_ids for c in engine.generate(requests)] == expected
    if (
        engine.reuse.vision_cache is not None
    ):  # two distinct videos and one image: each through the tower once
        assert engine.reuse.vision_cache.misses == 3
    if engine.reuse.prefix_cache is not None:
        assert engine.reuse.prefix_cache.hits > 0


@pytest.mark.usefixtures("one_thread")
def test_predict_answers_video_rows_as_generate_does(lively_any, tmp_path: Path) -> None:
    """`do_predict` on frame-list and video-file rows: each prediction is model.generate's answer on
    the processor's inputs for the same frames; the predictions file shows the timestamped prompt
    (Qwen3-VL) or one video pad (Qwen2.5-VL)."""
    from eqakit.config import load_config
    from eqakit.data.video import load
    from eqakit.engine import Request, SamplingParams
    from eqakit.evaluate.predict import run_predict

    model, processor = lively_any
    qwen2_5 = model.config.model_type == "qwen2_5_vl"
    data = tmp_path / "data"
    rows, frames = _two_videos(data, (160, 128), 8, 40)
    keys = {
        "model_name_or_path": str(model.name_or_path), "template": "qwen2_vl" if qwen2_5 else "qwen3_vl_nothink", "do_predict": True,
        "predict_with_generate": True, "eval_dataset": "v", "dataset_dir": str(data), "output_dir": str(tmp_path / "eval"),
        "max_new_tokens": 8, "do_sample": False, "report_to": "none", "video_max_pixels": 768 * 768,
    }  # fmt: skip
    run_predict(load_config("train", extra=keys))
    written = [
        json.loads(line)
        for line in (tmp_path / "eval" / "generated_predictions.jsonl").read_text().splitlines()
    ]
    markup = (
        "<|vision_start|><|video_pad|><|vision_end|>" if qwen2_5 else "seconds><|vision_start|><|video_pad|>"
    )
    assert len(written) == 2 and all(markup in r["prompt"] for r in written)
    assert qwen2_5 == ("seconds>" not in written[0]["prompt"])
    assert written[0]["predict"] != written[1]["predict"]  # the answers depend on the video
    budget = VideoBudget(min_pixels=16 * 16, max_pixels=768 * 768, fps=2.0, maxlen=128)
    for row, source in zip(
        written,
        [VideoSource(frames=tuple(data / f for f in frames)), VideoSource(file=data / "ep1.mp4")],
        strict=True,
    ):
        request = Request(
            [{"role": "user", "content": row["prompt"] and rows[row["index"]]["instruction"]}],
            SamplingParams(max_new_tokens=8, do_sample=False),
            videos=[load(source, budget.fps, budget.maxlen)],
        )
        expected = _reference(model, processor, request, budget)
        assert row["predict"] == processor.tokenizer.decode(expected, skip_special_tokens=True)


# ---- the API: video_url parts ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_server(lively_dir: Path):
    from eqakit.config import load_config
    from eqakit.engine import HFEngine
    from eqakit.serve.api import create_app
    from test_api import serving

    keys = [
        f"model_name_or_path={lively_dir}", "template=qwen3_vl_nothink", "max_new_tokens=6", "cutoff_len=2048",
        "video_max_pixels=589824", "video_maxlen=16", "api_max_request_pixels=2000000", "api_batch_window_ms=5",
    ]  # fmt: skip
    cfg = load_config("infer", None, keys)
    engine = HFEngine.from_config(cfg)
    with serving(create_app(engine, model_name="tiny-video", settings=cfg.api)) as (url, _):
        yield url, engine


def _video_part(url) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def _png_uri(image: Image.Image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.usefixtures("one_thread")
def test_the_api_answers_video_files_and_frame_lists_as_the_engine_does(video_server, tmp_path: Path) -> None:
    """The openai SDK sends a video file (data:video/mp4) and a list of frame data URIs; each answer is
    the engine's for the same video; bad videos are 400s naming the part."""
    import base64

    import requests
    from openai import OpenAI

    from eqakit.data.video import from_frames, load
    from eqakit.engine import Request, SamplingParams

    url, engine = video_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    mp4 = write_video(tmp_path / "walk.mp4", frames_of(40, (160, 128)), fps=10).read_bytes()
    frames = frames_of(8, (160, 128))
    parts = {
        "file": _video_part("data:video/mp4;base64," + base64.b64encode(mp4).decode()),
        "frames": _video_part([_png_uri(f) for f in frames]),
    }
    budget = engine.format.video
    videos = {
        "file": load(VideoSource(data=mp4), budget.fps, budget.maxlen),
        "frames": from_frames(frames, budget.fps, budget.maxlen),
    }
    answers = {}
    for kind, part in parts.items():
        reply = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": [part, {"type": "text", "text": "Where is the lamp?"}]}],
            max_tokens=6,
            temperature=0,
        )
        request = Request(
            [{"role": "user", "content": "<video>Where is the lamp?"}],
            SamplingParams(max_new_tokens=6, do_sample=False),
            videos=[videos[kind]],
        )
        answers[kind] = reply.choices[0].message.content
        assert answers[kind] == engine.generate([request])[0].text
    assert answers["file"] != answers["frames"]

    def refused(part: dict, needle: str) -> None:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}],
        }
        reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"].startswith("messages[0].content[0]") and needle in error["message"], error

    refused(
        _video_part("data:video/mp4;base64," + base64.b64encode(b"junk" * 100).decode()), "cannot be read"
    )
    refused(_video_part("data:video/x-unknown;base64,AAAA"), "unsupported data URI type")
    refused(_video_part([_png_uri(frames[0]), _png_uri(frames_of(1, (64, 64))[0])]), "one size; these have")
    refused(_video_part([]), "no frames")
    refused(_video_part([_png_uri(f) for f in frames_of(16, (640, 480))]), "api_max_request_pixels")
    refused({"type": "text", "text": "<video>"}, "must not contain '<video>'")
    big = write_video(tmp_path / "big.mp4", frames_of(12, (640, 480)), fps=2).read_bytes()
    refused(_video_part("data:video/mp4;base64," + base64.b64encode(big).decode()), "api_max_request_pixels")


def test_vllm_gets_one_bare_pad_per_video_and_expands_it_to_ours(processor, geometry) -> None:
    """What the vLLM backend sends for a Qwen3-VL video: one bare ``<|video_pad|>`` (vLLM 0.32 on
    transformers >= 5.10 expands only that token, keeping what surrounds it); expanded as vLLM does
    (each patch's timestamp tokenized alone, then its vision pair), it is the prompt eqakit plans,
    with no outer vision pair. Images stay as they are."""
    from eqakit.data.encode import PadIds
    from eqakit.engine import Request, SamplingParams
    from eqakit.engine.vllm.engine import bare_video_prompt

    tok = processor.tokenizer
    videos = [probe_frames(6, (96, 64)), probe_frames(4, (64, 64))]
    messages = [{"role": "user", "content": "<video>then<image><video>: what changed?"}]
    fmt = PromptFormat(cutoff_len=4096)
    plan = plan_sample(
        messages, [(32, 32)], tok, fmt, videos=videos, add_generation_prompt=True, geometry=geometry
    )
    pads = PadIds.of(tok)
    start, end = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    sent = bare_video_prompt(Request(messages, SamplingParams()), tok, fmt, pads.video)
    assert sent.count(pads.video) == 2 and sent.count(pads.image) == 1
    expanded: list[int] = []
    times = iter([v.clip_times() for v in videos])
    for token in sent:
        if token != pads.video:
            expanded.append(token)
            continue
        for t in next(times):
            expanded += [*tok.encode(f"<{t:.1f} seconds>", add_special_tokens=False), start, pads.video, end]
    assert expanded == plan.input_ids


def test_a_playlist_sent_as_video_bytes_reads_no_other_file(tmp_path: Path, monkeypatch) -> None:
    """FFmpeg sniffs the demuxer from the bytes: an ffconcat playlist (or any demuxer that opens
    further files) is refused as a container eqakit does not read, before it opens what it names, so
    whether a file exists is not told either."""
    frame = write_frames(tmp_path / "frames", frames_of(1))[0]
    monkeypatch.chdir(tmp_path)
    for target in (frame.relative_to(tmp_path).as_posix(), "frames/missing.png"):
        playlist = f"ffconcat version 1.0\nfile '{target}'\n".encode()
        with pytest.raises(VideoError, match="container eqakit reads") as err:
            probe(VideoSource(data=playlist), 2.0, 8)
        assert target not in str(err.value) and "not found" not in str(err.value)
    real = write_video(tmp_path / "v.mp4", frames_of(4, (64, 64)), fps=4)
    assert probe(VideoSource(data=real.read_bytes()), 2.0, 8).available == 4


# ---- tiny and odd frames -------------------------------------------------------------------------

TINY_SIZES = [(1, 1), (3, 1), (64, 1), (100, 3)]  # 1 or 3 pixels high: once read as a channel axis


def _tiny_rows(data: Path) -> list[dict]:
    """One row per tiny size as frame files, and one as an AVI file: the questions of a dataset ``v``."""
    rows = []
    for width, height in TINY_SIZES:
        paths = write_frames(data / f"ep{width}x{height}", frames_of(4, (width, height)))
        frames = [p.relative_to(data).as_posix() for p in paths]
        rows.append({"instruction": f"<video>Is it {width} wide?", "output": "Yes", "videos": [frames]})
    write_video(data / "thin.avi", frames_of(6, (3, 1)), fps=2, codec="rawvideo", pix_fmt="rgb24")
    rows.append({"instruction": "<video>How thin?", "output": "Very", "videos": ["thin.avi"]})
    _video_dataset(data, rows)
    return rows


@pytest.mark.slow
def test_tiny_frames_are_predicted_and_trained_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Frames 1 or 3 pixels high were read by the video processor as channels first: the row crashed
    training mid-run and vanished from predict's output with exit 0. Now every row is answered and
    trained on."""
    from eqakit.config import load_config
    from eqakit.evaluate.predict import run_predict

    data = tmp_path / "data"
    rows = _tiny_rows(data)
    keys = {
        "model_name_or_path": str(tiny_model_dir), "template": "qwen3_vl_nothink", "do_predict": True,
        "predict_with_generate": True, "eval_dataset": "v", "dataset_dir": str(data),
        "output_dir": str(tmp_path / "eval"), "max_new_tokens": 3, "do_sample": False, "report_to": "none",
    }  # fmt: skip
    run_predict(load_config("train", extra=keys))
    written = (tmp_path / "eval" / "generated_predictions.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in written) == list(range(len(rows)))
    done = _train(tiny_model_dir, data, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_request_that_fails_is_raised_not_dropped(tiny_model_dir: Path) -> None:
    """A request the engine cannot answer (here a video whose frames are not the size it claims)
    raises RequestFailed naming it, from generate and generate_iter, and its neighbours are not lost
    silently either: generate never returns fewer completions than requests."""
    from eqakit.config import load_config
    from eqakit.data.video import Video, from_frames
    from eqakit.engine import HFEngine, Request, RequestFailed, SamplingParams

    engine = HFEngine.from_config(
        load_config("infer", None, [f"model_name_or_path={tiny_model_dir}", "template=qwen3_vl_nothink"])
    )
    greedy = SamplingParams(max_new_tokens=2, do_sample=False)
    honest = from_frames(frames_of(4, (64, 64)), 2.0, 8)
    lying = Video(honest.info, tuple(frames_of(4, (128, 96))))
    requests = [
        Request([{"role": "user", "content": "<video>Where?"}], greedy, videos=[video])
        for video in (honest, lying, honest)
    ]
    with pytest.raises(RequestFailed, match="request 1 failed: video frame sizes changed") as failure:
        engine.generate(requests)
    assert failure.value.index == 1
    assert len(engine.generate([requests[0], requests[2]])) == 2
