"""The inference engine: every speed feature decodes exactly what `model.generate` decodes alone.

The reference for each request is plain ``model.generate`` on the Qwen3VLProcessor's inputs, one
request at a time, greedy, fp32. The tiny model's random weights are scaled up here so that its
greedy answers depend on the question and the frames (at initialisation scale it repeats its last
input token, which would make any two decoders agree).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import LIVELY
from eqakit.data.encode import Geometry, ImageBudget, PromptFormat, materialize, plan_sample
from eqakit.data.template import render_prompt
from eqakit.engine import (
    EngineUnavailable,
    HFEngine,
    PromptTooLong,
    Request,
    RequestError,
    SamplingParams,
)
from eqakit.engine.hf.caches import PrefixState
from eqakit.engine.hf.kv import GrowingLayer, KVBatch
from eqakit.engine.hf.runner import Runner
from eqakit.engine.hf.worker import EngineWorker
from eqakit.model.arch import of_model

BUDGET = ImageBudget(32 * 32, 768 * 768)
QUESTIONS = (
    "What color is the chair?",
    "Where is the lamp?",
    "How many cups are on the table?",
    "Is the door open?",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(LIVELY))
def model_dir(request: pytest.FixtureRequest) -> Path:
    """Every test here runs on each architecture: Qwen3-VL dense and MoE, Qwen2.5-VL."""
    return request.getfixturevalue(LIVELY[request.param])


@pytest.fixture(scope="module")
def model(model_dir: Path, device_under_test: torch.device):
    """fp32, on EQAKIT_TEST_DEVICE (default cpu; benchmarks/gpu_check.sh: cuda)."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device_under_test).eval()


@pytest.fixture(scope="module")
def processor(model_dir: Path):
    return AutoProcessor.from_pretrained(model_dir)


def frames(seed: int, count: int = 4, size: tuple[int, int] = (160, 128)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)
    ]


def greedy(max_new_tokens: int = 10, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, **kw)


def episode_requests(max_new_tokens: int = 10) -> list[Request]:
    """Three episodes (4 frames each, 80 image tokens), 2-4 questions each, plus a text-only chat."""
    requests = []
    for episode in range(3):
        images = frames(episode)
        for question in QUESTIONS[: 2 + episode]:
            content = "<image>" * len(images) + question
            requests.append(
                Request([{"role": "user", "content": content}], greedy(max_new_tokens), images=images)
            )
    chat = [{"role": "system", "content": "You are a robot."}, {"role": "user", "content": "Where am I?"}]
    requests.insert(3, Request(chat, greedy(max_new_tokens)))
    return requests


def reference(model, processor, request: Request, **generate_kw) -> list[int]:
    """model.generate on the processor's inputs: what LLaMA-Factory's predict does per sample."""
    text = render_prompt(request.messages, template_of(model), system=request.system)
    size = {"shortest_edge": BUDGET.min_pixels, "longest_edge": BUDGET.max_pixels}
    inputs = processor(
        text=[text], images=request.images or None, images_kwargs={"size": size}, return_tensors="pt"
    ).to(model.device)
    out = model.generate(
        **inputs, do_sample=False, max_new_tokens=request.params.max_new_tokens, **generate_kw
    )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def expected(model, processor) -> list[list[int]]:
    return [reference(model, processor, r) for r in episode_requests()]


def template_of(model) -> str:
    """The model's architecture's default template (qwen3_vl_nothink, or qwen2_vl for Qwen2.5-VL)."""
    return of_model(model).templates[0]


def make_format(model, cutoff_len: int = 2048) -> PromptFormat:
    return PromptFormat(template_of(model), cutoff_len=cutoff_len, budget=BUDGET)


def make_engine(model, processor, cutoff_len: int = 2048, **kw) -> HFEngine:
    return HFEngine(model, processor, format=make_format(model, cutoff_len), **kw)


def test_prompt_tokens_are_the_processors_and_the_training_encoders(model, processor) -> None:
    request = episode_requests()[0]
    prepared = make_engine(model, processor).prepare(request)
    text = render_prompt(request.messages, template_of(model))
    size = {"shortest_edge": BUDGET.min_pixels, "longest_edge": BUDGET.max_pixels}
    hf = processor(text=[text], images=request.images, images_kwargs={"size": size}, return_tensors="pt")
    plan = plan_sample(
        request.messages,
        [im.size for im in request.images],
        processor.tokenizer,
        make_format(model),
        add_generation_prompt=True,
        geometry=Geometry.of(model.config),
    )
    train = materialize(plan, request.images, processor, BUDGET)
    assert prepared.ids.tolist() == hf["input_ids"][0].tolist() == train["input_ids"].tolist()
    # 160x128 frames: 5x4 tokens of 32x32 pixels (Qwen3-VL), 6x5 of 28x28 (Qwen2.5-VL)
    want = 20 if model.config.vision_config.patch_size == 16 else 30
    assert [s.length for s in prepared.images] == [want] * 4


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(
            {"max_batch_size": 1, "vision_cache_mib": 0, "prefix_cache_mib": 0}, id="reference-path"
        ),
        pytest.param(
            {"max_batch_size": 4, "vision_cache_mib": 0, "prefix_cache_mib": 0}, id="batched-left-padding"
        ),
        pytest.param({"max_batch_size": 1, "prefix_cache_mib": 0}, id="vision-cache"),
        pytest.param(
            {"max_batch_size": 1, "vision_cache_mib": 0, "min_prefix_tokens": 16}, id="shared-prefix"
        ),
        pytest.param({"max_batch_size": 3, "min_prefix_tokens": 16}, id="all-together"),
    ],
)
def test_greedy_tokens_equal_plain_generate(model, processor, expected, options) -> None:
    engine = make_engine(model, processor, **options)
    completions = engine.generate(episode_requests())
    assert [c.token_ids for c in completions] == expected
    assert all(c.finish_reason == "length" and c.completion_tokens == 10 for c in completions)
    vision, prefix = engine.reuse.vision_cache, engine.reuse.prefix_cache
    if vision is not None:  # the 9 image requests have 3 distinct sets of 4 frames: each runs once
        assert vision.misses == 12 and vision.hits > 0
    if prefix is not None:  # one prefix per episode, prefilled once, reused by its other questions
        assert prefix.misses == 3 and prefix.hits > 0


def test_the_kv_budget_fills_the_batch_and_is_never_exceeded(model, processor, expected, monkeypatch) -> None:
    """per_device_eval_batch_size as memory: as many rows as the KV-token budget holds, never more,
    and the same tokens as plain generate. A budget of 4.5 whole sequences holds more than 4 rows:
    an episode's frames are held once for all its questions."""
    requests = episode_requests()
    engine = make_engine(model, processor, max_batch_size=64, min_prefix_tokens=16)
    longest = max(engine.prepare(r).length for r in requests) + 10
    engine.max_batch_tokens = budget = 4 * longest + longest // 2  # room for 4 rows, not 5
    seen: list[tuple[int, int]] = []
    shared: list[int] = []
    step = Runner.step

    def recording_step(self: Runner) -> None:
        seen.append((self.active, self.footprint([])))
        assert self.kv is not None
        if self.kv.prefix_tokens():  # rows hold their own tokens only, never a copy of the frames
            assert self.kv.mask.shape[1] < min(p.length for p in self.kv.prefixes if p is not None)
            shared.append(self.active)
        step(self)

    monkeypatch.setattr(Runner, "step", recording_step)
    assert [c.token_ids for c in engine.generate(requests)] == expected
    assert max(rows for rows, _ in seen) > 4 and max(shared) > 1  # several rows on one held prefix
    assert max(tokens for _, tokens in seen) <= budget
    engine.max_batch_tokens = 1  # smaller than any request: each still runs, alone
    seen.clear()
    assert [c.token_ids for c in engine.generate(requests[:3])] == expected[:3]
    assert max(rows for rows, _ in seen) == 1


def test_rows_join_and_leave_a_running_batch(model, processor) -> None:
    """Continuous batching: different lengths finish at different steps; waiting requests take their place."""
    requests = episode_requests()
    long_text = "Describe every room of the house, from the hallway to the attic. " * 12
    requests.insert(5, Request([{"role": "user", "content": long_text}], greedy()))  # prefilled apart
    for request, n in zip(requests, [3, 12, 5, 1, 9, 8, 2, 12, 4, 7, 6], strict=True):
        request.params = greedy(n)
    want = [reference(model, processor, r) for r in requests]
    engine = make_engine(model, processor, max_batch_size=3, min_prefix_tokens=16)
    assert [c.token_ids for c in engine.generate(requests)] == want


def test_a_chat_turn_continues_from_the_cached_frames(model, processor) -> None:
    """Turn 2 of a chat reuses turn 1's frames from the prefix cache and prefills its own new image."""
    engine = make_engine(model, processor, min_prefix_tokens=16)
    first, second = frames(5, 2), frames(6, 1)
    turn1 = [{"role": "user", "content": "<image><image>Where is the lamp?"}]
    reply = engine.generate([Request(turn1, greedy(), images=first)])[0]
    turn2 = [
        *turn1,
        {"role": "assistant", "content": reply.text},
        {
            "role": "user",
            "content": [{"type": "image", "image": second[0]}, {"type": "text", "text": "And now?"}],
        },
    ]
    request = Request(turn2, greedy(), images=first)
    hits = engine.reuse.prefix_cache.hits
    assert engine.generate([request])[0].token_ids == reference(
        model, processor, Request(turn2, greedy(), images=first + second)
    )
    assert engine.reuse.prefix_cache.hits == hits + 1


def test_kv_rows_grow_in_place_join_and_leave() -> None:
    torch.manual_seed(0)
    layer = GrowingLayer(room=3)
    chunks = [torch.randn(2, 2, n, 4) for n in (5, 1, 1, 1, 4, 1)]  # outgrows its room twice
    for chunk in chunks:
        keys, values = layer.update(chunk, -chunk)
    assert torch.equal(keys, torch.cat(chunks, dim=2)) and torch.equal(values, -keys)
    assert layer.get_seq_length() == 13

    def state(length: int) -> PrefixState:
        return PrefixState(((torch.full((1, 2, length, 4), float(length)),) * 2,), length)

    batch = KVBatch.from_states([state(3), None, state(5)], num_layers=1, device=torch.device("cpu"))
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    batch.select([0])  # the leading padding nobody needs is dropped
    assert batch.mask.tolist() == [[1, 1, 1]] and batch.layers[0].keys.shape == (1, 2, 3, 4)
    batch.merge(KVBatch.from_states([state(4)], num_layers=1, device=torch.device("cpu")))
    assert batch.mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert batch.layers[0].keys[0, 0, :, 0].tolist() == [0, 3, 3, 3]


def test_stops_on_end_of_sequence_tokens(model, processor, expected) -> None:
    request = episode_requests()[0]
    eos = expected[0][4]  # a token greedy decoding reaches at step 5
    engine = make_engine(model, processor, eos_token_ids=[eos])
    completion = engine.generate([request])[0]
    assert completion.token_ids == reference(model, processor, request, eos_token_id=eos)
    assert completion.token_ids[-1] == eos and len(completion.token_ids) <= 5
    assert completion.finish_reason == "stop"
    assert completion.text == processor.tokenizer.decode(completion.token_ids[:-1], skip_special_tokens=True)


def test_stop_strings_cut_the_text_and_the_stream(model, processor) -> None:
    engine = make_engine(model, processor)
    full = engine.generate([episode_requests(12)[1]])[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip() and len(full.text) > 6
    request = episode_requests(12)[1]
    request.params = greedy(12, stop=(stop, "never-appears"))
    stream = engine.stream(request)
    deltas = list(stream)
    completion = stream.completion
    assert completion is not None and completion.finish_reason == "stop"
    assert completion.text == full.text[: full.text.index(stop)]
    assert "".join(deltas) == completion.text
    assert full.token_ids[: len(completion.token_ids)] == completion.token_ids


def test_stream_deltas_concatenate_to_the_text(model, processor) -> None:
    engine = make_engine(model, processor)
    request = episode_requests(16)[2]
    stream = engine.stream(request)
    deltas = list(stream)
    assert len(deltas) > 1
    assert stream.completion is not None
    assert "".join(deltas) == stream.completion.text == engine.generate([request])[0].text


def test_seeded_sampling_is_reproducible_whatever_the_batch(model, processor) -> None:
    def sampled(seed: int | None) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.9, top_k=40, seed=seed
        )

    engine = make_engine(model, processor, max_batch_size=4)
    base = episode_requests()
    alone = Request(base[0].messages, sampled(7), images=base[0].images)
    first = engine.generate([alone])[0].token_ids
    again = engine.generate([alone])[0].token_ids
    crowd = [Request(r.messages, sampled(i), images=r.images, system=r.system) for i, r in enumerate(base)]
    in_a_batch = engine.generate([*crowd[:2], alone, *crowd[2:]])[2].token_ids
    other_seed = engine.generate([Request(alone.messages, sampled(8), images=alone.images)])[0].token_ids
    assert first == again == in_a_batch
    assert other_seed != first


def test_repetition_penalty_matches_generate(model, processor) -> None:
    request = episode_requests(12)[4]
    request.params = greedy(12, repetition_penalty=1.3)
    engine = make_engine(model, processor)
    assert engine.generate([request])[0].token_ids == reference(
        model, processor, request, repetition_penalty=1.3
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_parameters_are_refused_by_name(fields, param) -> None:
    with pytest.raises(RequestError) as info:
        SamplingParams(**fields)
    assert info.value.param == param


def test_bad_requests_fail_before_work_and_the_engine_still_works(model, processor) -> None:
    engine = make_engine(model, processor, max_batch_size=2)
    good = episode_requests()[0]
    two_placeholders = Request(
        [{"role": "user", "content": "<image><image>What?"}], greedy(), images=frames(0, 1)
    )
    with pytest.raises(RequestError, match="more image placeholders"):
        engine.generate([good, two_placeholders])
    with pytest.raises(RequestError, match="more than its messages"):
        engine.prepare(Request([{"role": "user", "content": "Hi"}], greedy(), images=frames(0, 1)))
    with pytest.raises(RequestError, match="end with a user message"):
        engine.prepare(Request([{"role": "assistant", "content": "Hi"}], greedy()))
    tight = make_engine(model, processor, cutoff_len=8)
    with pytest.raises(PromptTooLong):
        tight.prepare(good)
    assert engine.generate([good])[0].completion_tokens == 10


def test_images_are_scaled_down_to_fit_cutoff_len(model, processor) -> None:
    request = episode_requests()[0]  # 4 x 20 image tokens + 17 text tokens
    prepared = make_engine(model, processor, cutoff_len=60).prepare(request)
    assert prepared.scaled_down and prepared.length <= 60
    assert all(s.max_pixels < BUDGET.max_pixels for s in prepared.images)


@pytest.mark.parametrize("by_tokens", [False, True], ids=["by-count", "by-kv-budget"])
def test_worker_batches_concurrent_requests(model, processor, expected, by_tokens, monkeypatch) -> None:
    engine = make_engine(model, processor, max_batch_size=64 if by_tokens else 4, min_prefix_tokens=16)
    requests = episode_requests()
    footprints: list[int] = []
    if by_tokens:  # room for 3 whole sequences: the rest wait for room, in order
        engine.max_batch_tokens = 3 * (max(engine.prepare(r).length for r in requests) + 10) + 5
        step = Runner.step
        monkeypatch.setattr(Runner, "step", lambda self: (footprints.append(self.footprint([])), step(self)))
    worker = EngineWorker(engine, batch_window_s=0.05).start()
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        results[i] = worker.submit(requests[i]).result(timeout=60).token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(requests))] == expected
    assert 2 <= worker.peak_batch <= (64 if by_tokens else 4)  # batched, within the bound
    assert max(footprints, default=0) <= (engine.max_batch_tokens or 0)

    async def streamed() -> tuple[str, str]:
        submission = worker.submit(requests[1])
        text = "".join([delta async for delta in submission.astream()])
        return text, (await submission.aresult()).text

    text, final = asyncio.run(streamed())
    assert text == final and text

    cancelled = worker.submit(Request(requests[0].messages, greedy(200), images=requests[0].images))
    cancelled.cancel()
    with pytest.raises(RequestError):
        worker.submit(Request([], greedy()))
    assert worker.close(timeout=30)
    assert worker.in_flight == 0
    with pytest.raises(EngineUnavailable):
        worker.submit(requests[0])
