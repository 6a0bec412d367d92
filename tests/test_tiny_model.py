"""`eqakit tiny-model`: a real-class Qwen3-VL with Qwen3-VL-2B-Instruct's tokens, format and processor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from eqakit.cli import main
from eqakit.model.tiny import REGULAR_ADDED_TOKENS, SPECIAL_TOKENS, build_tiny_model, chat_template


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def _room(width: int, height: int, sofa: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (width, height), (220, 210, 190))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, height * 2 // 3, width, height), fill=(120, 90, 60))  # floor
    draw.rectangle((width // 4, height // 2, width * 3 // 4, height * 5 // 6), fill=sofa)
    return image


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_cli_builds_a_model_the_auto_classes_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny"
    assert main(["tiny-model", "--output-dir", str(out), "--seed", "3"]) == 0
    assert str(out) in capsys.readouterr().out

    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"  # torchvision ("fast") backend
    assert type(processor.video_processor).__name__ == "Qwen3VLVideoProcessor"
    assert json.loads((out / "eqakit_tiny_model.json").read_text())["seed"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no staging directory left behind


def test_non_empty_output_dir_is_refused_unless_overwrite(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    assert main(["tiny-model", "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and str(out) in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]

    assert main(["tiny-model", "--output-dir", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists()
    # seed 0 again: the replacement is the fixture's model, byte for byte
    assert (out / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["tiny-model", "--output-dir", str(empty)]) == 0  # an empty directory is fine
    assert (empty / "config.json").is_file()

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["tiny-model", "--output-dir", str(a_file), "--overwrite"]) == 1
    assert "is a file" in capsys.readouterr().err


def test_small_and_in_safetensors(tiny_model_dir: Path) -> None:
    files = {p.name: p.stat().st_size for p in tiny_model_dir.iterdir()}
    assert sum(files.values()) < 10_000_000
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt")) for name in files)


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    for path in tiny_model_dir.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name

    other = _tensors(build_tiny_model(tmp_path / "other", seed=1))
    base = _tensors(tiny_model_dir)
    assert other.keys() == base.keys()
    name = "model.language_model.embed_tokens.weight"
    assert not torch.equal(other[name], base[name])


def test_sizes_are_keyword_arguments(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "bigger", hidden_size=96, num_hidden_layers=3, vision_depth=3)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 96
    assert config["text_config"]["num_hidden_layers"] == 3
    assert config["vision_config"]["out_hidden_size"] == 96
    assert config["vision_config"]["depth"] == 3

    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        build_tiny_model(tmp_path / "bad", deepstack_visual_indexes=(5,))
    with pytest.raises(TypeError):
        build_tiny_model(tmp_path / "bad", hidden=8)
    assert not (tmp_path / "bad").exists()


def test_config_mirrors_qwen3_vl_2b_structure(model) -> None:
    config = model.config
    text, vision = config.text_config, config.vision_config
    assert config.tie_word_embeddings and text.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (16, 2, 2)
    assert vision.out_hidden_size == text.hidden_size
    assert list(vision.deepstack_visual_indexes) == [1]
    rope = text.rope_parameters
    assert rope["mrope_interleaved"] is True and rope["rope_theta"] == 5000000
    assert sum(rope["mrope_section"]) == text.head_dim // 2


def test_special_tokens_and_ids_match_the_config(model, processor) -> None:
    tokenizer = processor.tokenizer
    config, generation = model.config, model.generation_config
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS + REGULAR_ADDED_TOKENS}
    # Qwen's layout: the added tokens follow the BPE vocabulary, in Qwen's order.
    first = ids["<|endoftext|>"]
    assert list(ids.values()) == list(range(first, first + len(ids)))
    assert 2000 <= first <= 4000
    for token, token_id in ids.items():
        assert tokenizer.encode(f"a{token}b", add_special_tokens=False)[1] == token_id
    assert set(SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)
    assert "<think>" not in tokenizer.all_special_tokens and "<tool_call>" not in tokenizer.all_special_tokens

    assert config.image_token_id == ids["<|image_pad|>"] == processor.image_token_id
    assert config.video_token_id == ids["<|video_pad|>"] == processor.video_token_id
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert config.text_config.bos_token_id == ids["<|endoftext|>"]
    assert config.text_config.eos_token_id == ids["<|im_end|>"]
    assert config.text_config.vocab_size >= len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "right"  # as Qwen's; batched generation asks for left itself

    assert generation.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert generation.pad_token_id == ids["<|endoftext|>"]
    assert generation.do_sample is True
    assert (generation.top_k, generation.top_p, generation.temperature) == (20, 0.8, 0.7)

    text = "How many red chairs are to the left of the sofa in the kitchen? Two. 红色"
    ids_ = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids_) == text
    assert len(ids_) < 25  # a trained BPE, not one token per byte


CONVERSATION_TEXT = (
    "<|im_start|>system\nYou are a robot's helpful eyes.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
    "What colour is the sofa?<|im_end|>\n"
    "<|im_start|>assistant\nRed.<|im_end|>\n"
)


def _conversation(images: list[Image.Image]) -> list[dict]:
    return [
        {"role": "system", "content": "You are a robot's helpful eyes."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images[0]},
                {"type": "image", "image": images[1]},
                {"type": "text", "text": "What colour is the sofa?"},
            ],
        },
        {"role": "assistant", "content": "Red."},
    ]


def test_chat_template_renders_qwen3_vl_instruct_format(tiny_model_dir: Path, processor) -> None:
    messages = _conversation([_room(96, 64, (200, 0, 0)), _room(64, 64, (0, 0, 200))])
    assert processor.apply_chat_template(messages, tokenize=False) == CONVERSATION_TEXT
    assert (
        processor.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
        == CONVERSATION_TEXT.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n"
    )
    # No default system prompt; string content; a video; the tokenizer alone renders the same.
    plain = [{"role": "user", "content": "Is the door open?"}]
    expected = "<|im_start|>user\nIs the door open?<|im_end|>\n<|im_start|>assistant\n"
    assert processor.apply_chat_template(plain, add_generation_prompt=True, tokenize=False) == expected
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False) == expected
    video = [
        {"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "Hi"}]}
    ]
    assert processor.apply_chat_template(video, tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n"
    )
    # The saved template is the packaged one (importlib.resources finds the package data).
    assert (tiny_model_dir / "chat_template.jinja").read_text(encoding="utf-8") == chat_template()


def test_two_images_forward_and_generate(model, processor) -> None:
    images = [_room(96, 64, (200, 0, 0)), _room(320, 240, (0, 0, 200))]
    prompt = processor.apply_chat_template(
        _conversation(images)[:2], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[prompt], images=images, return_tensors="pt")

    # 96x64 is below Qwen3-VL's 65,536-pixel minimum: it is scaled up to 320x224 (multiples of 32),
    # that is a 20x14 grid of 16-pixel patches, merged 2x2 into 70 visual tokens.
    grids = inputs["image_grid_thw"].tolist()
    assert grids[0] == [1, 14, 20]
    per_image = [t * h * w // 4 for t, h, w in grids]
    assert per_image[0] == 70
    input_ids = inputs["input_ids"][0]
    assert int((input_ids == model.config.image_token_id).sum()) == sum(per_image)
    assert int((input_ids == model.config.vision_start_token_id).sum()) == 2

    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, len(input_ids), model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()

    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new_tokens = generated[0, len(input_ids) :]
    assert 1 <= len(new_tokens) <= 4
    assert torch.equal(generated[0, : len(input_ids)], input_ids)
    assert isinstance(processor.decode(new_tokens), str)
