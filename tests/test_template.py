"""One path from messages to tokens: template rendering, labels, image-token budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from eqakit.data.encode import (
    IGNORE_INDEX,
    ImageBudget,
    PromptFormat,
    SampleTooLong,
    materialize,
    plan_sample,
)
from eqakit.data.template import count_parts, render, render_prompt, strip_thinking


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    return AutoProcessor.from_pretrained(tiny_model_dir)


CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}],
    [
        {"role": "system", "content": "You are a robot."},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Where is the cup?"}],
        },
        {"role": "assistant", "content": "On the table"},
        {"role": "user", "content": [{"type": "text", "text": "And the ball?"}]},
        {"role": "assistant", "content": "Under the chair"},
    ],
]


VIDEO_CONVERSATION = [
    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What did I pass?"}]},
    {"role": "assistant", "content": "A sofa"},
]


@pytest.mark.parametrize("messages", [*CONVERSATIONS, VIDEO_CONVERSATION])
def test_render_equals_the_checkpoints_chat_template(processor, messages) -> None:
    """eqakit's renderer and the model's own Jinja template agree, for training and for generation;
    a video without times (``None``) is the template's one-pad markup, which processors expand."""
    videos = [None] * count_parts(messages, "video")
    ours = "".join(s.text for s in render(messages, add_generation_prompt=False, video_times=videos))
    assert ours == processor.apply_chat_template(messages, tokenize=False)
    prompt = render_prompt(messages[:-1], video_times=videos)
    assert prompt == processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("messages", [*CONVERSATIONS, VIDEO_CONVERSATION])
def test_qwen2_vl_renders_qwen2_5_vls_chat_template(tiny_qwen2_5_dir: Path, messages) -> None:
    """``qwen2_vl``: Qwen2.5-VL's own template, its default system prompt when a conversation has
    none, one pad per video (no timestamps); ``default_system`` replaces that prompt, as in LLaMA-Factory."""
    qwen2_5 = AutoProcessor.from_pretrained(tiny_qwen2_5_dir)
    videos = [None] * count_parts(messages, "video")
    ours = "".join(
        s.text for s in render(messages, "qwen2_vl", add_generation_prompt=False, video_times=videos)
    )
    assert ours == qwen2_5.apply_chat_template(messages, tokenize=False)
    prompt = render_prompt(messages[:-1], "qwen2_vl", video_times=videos)
    assert prompt == qwen2_5.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    own = render_prompt(messages[:-1], "qwen2_vl", default_system="Answer briefly.", video_times=videos)
    assert own.startswith(
        "<|im_start|>system\n"
        + ("You are a robot." if messages[0]["role"] == "system" else "Answer briefly.")
    )
    assert not render_prompt(messages[-2:-1], "qwen2_vl", default_system="", video_times=videos).startswith(
        "<|im_start|>system"
    )


def test_labels_token_by_token(processor, geometry) -> None:
    """Only each answer, its <|im_end|> and the newline after it are learned; everything else is -100."""
    tok = processor.tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>What is it?"},
        {"role": "assistant", "content": "A red ball"},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "On the floor"},
    ]
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    budget = ImageBudget(32 * 32, 64 * 64)
    plan = plan_sample(
        messages,
        [image.size],
        tok,
        PromptFormat(cutoff_len=512, budget=budget),
        geometry=geometry,
    )
    enc = materialize(plan, [image], processor, budget)
    ids, labels = enc["input_ids"].tolist(), enc["labels"].tolist()
    expected_text = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        + "<|image_pad|>" * 4
        + "<|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\nA red ball<|im_end|>\n"
        "<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\nOn the floor<|im_end|>\n"
    )
    assert tok.decode(ids, skip_special_tokens=False) == expected_text
    learned = [
        tok.decode([t], skip_special_tokens=False)
        for t, lab in zip(ids, labels, strict=True)
        if lab != IGNORE_INDEX
    ]
    assert "".join(learned) == "A red ball<|im_end|>\nOn the floor<|im_end|>\n"
    for token, label in zip(ids, labels, strict=True):
        assert label in (IGNORE_INDEX, token)
    first = ids.index(tok.convert_tokens_to_ids("<|im_end|>"))
    assert all(lab == IGNORE_INDEX for lab in labels[: first + 1])  # nothing of the prompt is learned
    assert int(enc["mm_token_type_ids"].sum()) == 4 and enc["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_mask_history_and_train_on_prompt(processor, geometry) -> None:
    tok = processor.tokenizer
    messages = CONVERSATIONS[0] + [
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Hey"},
    ]
    budget = ImageBudget()
    last_only = plan_sample(
        messages, [], tok, PromptFormat(cutoff_len=128, budget=budget), mask_history=True, geometry=geometry
    )
    learned = tok.decode(
        [t for t, lab in zip(last_only.input_ids, last_only.labels, strict=True) if lab != IGNORE_INDEX]
    )
    assert learned == "Hey<|im_end|>\n"
    everything = plan_sample(
        messages,
        [],
        tok,
        PromptFormat(cutoff_len=128, budget=budget),
        train_on_prompt=True,
        geometry=geometry,
    )
    assert everything.labels == everything.input_ids


def test_thinking_template() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    no_think = render(messages, "qwen3_vl", enable_thinking=False, add_generation_prompt=False)
    assert (
        no_think[0].text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and not no_think[0].learn
    )
    assert no_think[1].text == "Hello<|im_end|>\n"
    think = render(messages, "qwen3_vl", enable_thinking=True, add_generation_prompt=False)
    assert think[1].text == "<think>\n\n</think>\n\nHello<|im_end|>\n" and think[1].learn
    assert render_prompt(messages[:1], "qwen3_vl", enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    assert strip_thinking("<think>\nhmm\n</think>\n\nRed") == "Red"


def test_images_scaled_down_to_fit_cutoff_and_never_truncated(processor, geometry) -> None:
    tok = processor.tokenizer
    messages = [
        {"role": "user", "content": "<image><image>What color?"},
        {"role": "assistant", "content": "Red"},
    ]
    budget = ImageBudget(32 * 32, 768 * 768)
    big = [(1920, 1080), (1920, 1080)]
    full = plan_sample(messages, big, tok, PromptFormat(cutoff_len=4096, budget=budget), geometry=geometry)
    assert not full.scaled_down and full.length > 1000
    fitted = plan_sample(messages, big, tok, PromptFormat(cutoff_len=300, budget=budget), geometry=geometry)
    assert fitted.scaled_down and fitted.length <= 300
    images = [Image.new("RGB", size, (0, 0, 255)) for size in big]
    enc = materialize(fitted, images, processor, budget)
    assert len(enc["input_ids"]) == fitted.length  # every image token present, within cutoff_len
    with pytest.raises(SampleTooLong):
        plan_sample(messages, big, tok, PromptFormat(cutoff_len=12, budget=budget), geometry=geometry)


def test_placeholder_count_must_match_images(processor, geometry) -> None:
    messages = [{"role": "user", "content": "<image><image>Q?"}, {"role": "assistant", "content": "A"}]
    with pytest.raises(ValueError, match="2 image placeholder"):
        plan_sample(
            messages,
            [(64, 64)],
            processor.tokenizer,
            PromptFormat(cutoff_len=128, budget=ImageBudget()),
            geometry=geometry,
        )


def test_encoding_matches_the_processor(processor, geometry) -> None:
    """Our ids and pixels equal what Qwen3VLProcessor makes of the same conversation."""
    images = [Image.new("RGB", (96, 64), (255, 0, 0)), Image.new("RGB", (320, 240), (0, 0, 255))]
    messages = [
        {"role": "user", "content": "<image><image>What color is the ball?"},
        {"role": "assistant", "content": "Red"},
    ]
    budget = ImageBudget(1024, 589824)
    plan = plan_sample(
        messages,
        [im.size for im in images],
        processor.tokenizer,
        PromptFormat(cutoff_len=2048, budget=budget),
        geometry=geometry,
    )
    enc = materialize(plan, images, processor, budget)
    text = "".join(s.text for s in render(messages, add_generation_prompt=False))
    ref = processor(
        text=[text],
        images=images,
        return_tensors="pt",
        images_kwargs={"size": {"shortest_edge": 1024, "longest_edge": 589824}},
    )
    assert torch.equal(ref["input_ids"][0], enc["input_ids"])
    assert torch.equal(ref["pixel_values"], enc["pixel_values"])
    assert torch.equal(ref["mm_token_type_ids"][0], enc["mm_token_type_ids"])


def test_one_model_inputs_step_expands_pads_and_checks_grids(processor) -> None:
    """expand_pads is the only pad expansion (training and the engine); pixel_values refuses pixels
    whose grid is not the planned one, so image tokens and features can never disagree."""
    from eqakit.data.encode import PadIds, expand_pads, features_key, image_digest, pixel_values

    pad, vpad = 7, 8
    pads = PadIds(pad, vpad)
    ids, spans, videos = expand_pads([1, pad, 2, pad], [(1, 4, 4), (1, 2, 6)], pads, merge=2)
    assert ids == [1, *[pad] * 4, 2, *[pad] * 3] and spans == [(1, 4), (6, 3)] and videos == []
    with pytest.raises(ValueError, match="2 image pads and 0 video pads for 1 images"):
        expand_pads([pad, pad], [(1, 2, 2)], pads, merge=2)
    # a video of two temporal patches (one pad each, a timestamp token between) and an image
    ids, spans, videos = expand_pads(
        [vpad, 3, vpad, pad], [(1, 2, 2)], pads, merge=2, video_grids=[(2, 4, 2)]
    )
    assert ids == [*[vpad] * 2, 3, *[vpad] * 2, pad] and spans == [(5, 1)] and videos == [(0, 5)]
    # Qwen2.5-VL's markup: one pad for the whole video, all its temporal patches' tokens in one run
    ids, spans, videos = expand_pads([1, vpad, 2], [], pads, merge=2, video_grids=[(2, 4, 2)])
    assert ids == [1, *[vpad] * 4, 2] and spans == [] and videos == [(1, 4)]
    with pytest.raises(ValueError, match="3 video pads for 0 images and 1 videos of 2 temporal patches"):
        expand_pads([vpad] * 3, [], pads, merge=2, video_grids=[(2, 2, 2)])

    image = Image.new("RGB", (64, 48), (10, 20, 30))
    values, grid = pixel_values([image], processor.image_processor, 32 * 32, 64 * 64, [(1, 4, 4)])
    assert grid.tolist() == [[1, 4, 4]] and values.shape[0] == 16
    with pytest.raises(ValueError, match="image sizes changed since planning"):
        pixel_values([image], processor.image_processor, 32 * 32, 64 * 64, [(1, 2, 2)])

    same = Image.new("RGB", (64, 48), (10, 20, 30))
    assert features_key(image_digest(image), 1, 2) == features_key(image_digest(same), 1, 2)
    assert features_key(image_digest(image), 1, 2) != features_key(image_digest(image), 1, 3)
