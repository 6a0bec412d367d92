"""Host-device synchronisations per decode step: at most 2 for a whole batch (issue 24).

Each read of a device value stalls an accelerator until its queue drains; a decode step needs one,
the chosen tokens. Counted on the CPU by `sync_count.SyncCounter`, for two run lengths of the same
batch, so that prefill and start-up cancel and the difference is the decode steps' own, and for each
step alone (rows finish at different steps, so some steps also drop rows). Sampling is vectorised
over the batch for this; the last tests check that the batch still draws what each row would draw
alone with transformers' logits processors and ``torch.multinomial``, and that extreme or nan scores
still give a token, or fail their own row only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from eqakit.data.encode import ImageBudget, PromptFormat
from eqakit.engine import HFEngine, Request, SamplingParams
from eqakit.engine.hf.runner import Runner
from eqakit.engine.hf.sampling import Sampler
from sync_count import SyncCounter

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = 8
SHORT, LONG = 8, 24  # new tokens (plus 0-2 per row): LONG - SHORT decode steps apart
BUDGET = 2  # syncs per decode step: the chosen tokens (and one spare)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def tutorial(**changes: object) -> SamplingParams:
    """The tutorial's eval_args.yaml sampling (temperature 0.2), with nucleus filtering on."""
    return SamplingParams(**{"do_sample": True, "temperature": 0.2, "top_p": 0.9, "top_k": 50, **changes})


def frames(count: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)) for _ in range(count)]


def questions(params: SamplingParams) -> list[Request]:
    """Questions over the same frames (an episode: branches of one shared prefix), and a text-only chat
    that shares nothing (a row attended to alone)."""
    images = frames()
    content = "<image><image>Question {}: where is it?"
    asked = [
        Request([{"role": "user", "content": content.format(i)}], params, images=images)
        for i in range(ROWS - 1)
    ]
    return [*asked, Request([{"role": "user", "content": "Where am I?"}], params)]


class Steps:
    """Syncs counted by `SyncCounter` inside each `Runner.step` (installed by the fixture), and the
    most rows that decoded on one shared prefix."""

    def __init__(self) -> None:
        self.counter: SyncCounter | None = None
        self.counts: list[int] = []
        self.branches = 0


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Steps:
    record = Steps()
    step = Runner.step

    def counted(runner: Runner) -> None:
        shared = runner.kv.shared() if runner.kv is not None else None
        for _, members in shared.groups if shared is not None else ():
            record.branches = max(record.branches, len(members))
        before = record.counter.total if record.counter is not None else 0
        step(runner)
        if record.counter is not None:
            record.counts.append(record.counter.total - before)

    monkeypatch.setattr(Runner, "step", counted)
    return record


def run(engine: HFEngine, requests: list[Request], new_tokens: int, steps: Steps) -> SyncCounter:
    """The syncs of one generate of ``requests`` (row i: new_tokens + i % 3 tokens), seeded per row."""
    lengths = [new_tokens + i % 3 for i in range(len(requests))]
    for i, (request, length) in enumerate(zip(requests, lengths, strict=True)):
        request.params = request.params.replace(max_new_tokens=length, seed=i)
    prepared = [engine.prepare(r) for r in requests]
    with SyncCounter() as counter:
        steps.counter = counter
        completions = engine.generate(prepared)
    steps.counter = None
    assert [c.completion_tokens for c in completions] == lengths
    return counter


@pytest.mark.parametrize(
    ("params", "options"),
    [
        pytest.param(SamplingParams(do_sample=False), {}, id="greedy"),
        pytest.param(SamplingParams(do_sample=False, repetition_penalty=1.3), {}, id="greedy-penalty"),
        pytest.param(tutorial(), {}, id="sampling"),
        pytest.param(tutorial(), {"max_batch_tokens": 10**6}, id="shared-prefix"),
        pytest.param(tutorial(repetition_penalty=1.1), {"max_batch_tokens": 10**6}, id="shared-penalty"),
    ],
)
def test_a_decode_step_reads_the_device_at_most_twice(model, processor, steps, params, options) -> None:
    engine = HFEngine(
        model,
        processor,
        format=PromptFormat("qwen3_vl_nothink", budget=ImageBudget(32 * 32, 96 * 96)),
        max_batch_size=ROWS,
        min_prefix_tokens=8,
        eos_token_ids=[],  # every row runs to its length
        **options,
    )
    requests = questions(params)
    run(engine, requests, 1, steps)  # fills the caches, so that both measured runs reuse them
    short, long = run(engine, requests, SHORT, steps), run(engine, requests, LONG, steps)
    per_step = (long.total - short.total) / (LONG - SHORT)
    if "max_batch_tokens" in options:  # the questions decode as branches of their frames, held once
        assert steps.branches == ROWS - 1
    assert per_step <= BUDGET, f"{per_step:g} syncs per step; in the longer run: {dict(long.by_op)}"
    assert max(steps.counts) <= BUDGET, f"syncs in each step: {steps.counts}"


def reference(
    logits: torch.Tensor, params: SamplingParams, seen: list[int], generator: torch.Generator
) -> int:
    """One row's token as ``model.generate`` chooses it: transformers' processors, then multinomial."""
    scores = logits[None]
    ids = torch.tensor([seen])
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
    if params.greedy:
        return int(scores.argmax())
    scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(ids, scores)
    return int(torch.multinomial(scores.softmax(dim=-1), 1, generator=generator))


def test_the_batch_draws_what_each_row_draws_alone() -> None:
    """Per-row settings in one batch, rows leaving and joining: every row's tokens are those that
    transformers' processors and ``torch.multinomial`` draw for it alone with the same seed."""
    vocab = 500
    settings = [
        SamplingParams(do_sample=False),
        tutorial(seed=1),
        SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=2),
        tutorial(repetition_penalty=1.3, top_p=0.5, seed=3),
        SamplingParams(do_sample=False, repetition_penalty=0.7),
        SamplingParams(temperature=0.7, top_p=0.95, top_k=vocab, seed=5),  # top_k = vocab: no limit
        SamplingParams(temperature=1.3, top_p=0.8, top_k=3, repetition_penalty=1.2, seed=6),
    ]
    torch.manual_seed(0)
    prompts = [torch.randint(0, vocab, (12,)) for _ in settings]
    seen = [p.tolist() for p in prompts]
    generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in settings]
    first, second = Sampler(settings[:4], prompts[:4], vocab, torch.device("cpu")), None
    rows = [0, 1, 2, 3]  # which settings each row of the batch has
    for step in range(12):
        if step == 3:  # the others join
            second = Sampler(settings[4:], prompts[4:], vocab, torch.device("cpu"))
            first.merge(second)
            rows += [4, 5, 6]
        if step == 7:  # some leave
            keep = [0, 2, 3, 5, 6]
            first.select(keep)
            rows = [rows[i] for i in keep]
        logits = torch.randn(len(rows), vocab) * 4
        tokens = first.choose(logits)
        want = [reference(logits[i], settings[r], seen[r], generators[r]) for i, r in enumerate(rows)]
        assert tokens == want, f"step {step}"
        for r, token in zip(rows, want, strict=True):
            seen[r].append(token)


def test_extreme_scores_are_drawn_among_their_maxima_and_nan_fails_its_row_alone() -> None:
    vocab = 50
    params = [SamplingParams(temperature=1e-300, seed=0)] + [tutorial(seed=i) for i in (1, 2, 3)]
    sampler = Sampler(params, [torch.tensor([0])] * 4, vocab, torch.device("cpu"))
    logits = torch.randn(4, vocab)
    logits[0, 7] = logits[0].max() + 1
    logits[1, [3, 9]] = torch.inf  # a repetition penalty's overflow
    logits[2, 4] = torch.nan
    logits[3] = -torch.inf
    tokens = sampler.choose(logits)
    assert tokens[0] == 7 and tokens[1] in (3, 9)
    assert isinstance(tokens[2], FloatingPointError) and isinstance(tokens[3], FloatingPointError)


def test_a_pass_without_padding_runs_sdpas_fused_causal_kernel(model, processor, monkeypatch) -> None:
    """One prompt alone (prefill and decode) reaches ``scaled_dot_product_attention`` with no mask,
    so an accelerator runs its fused causal kernel; a left-padded batch still hands it a mask. The
    tokens are those of ``model.generate`` either way (the engine's equivalence tests)."""
    calls: list[tuple[bool, bool]] = []  # (mask given, is_causal) of each language-model attention
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, is_causal=False, **kwargs):
        calls.append((attn_mask is not None, bool(is_causal)))
        return sdpa(query, key, value, attn_mask, *args, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    engine = HFEngine(model, processor, format=PromptFormat("qwen3_vl_nothink"), eos_token_ids=[])
    greedy = SamplingParams(do_sample=False, max_new_tokens=3)
    alone = [Request([{"role": "user", "content": "Where am I?"}], greedy)]
    engine.generate([engine.prepare(r) for r in alone])
    layers = model.config.text_config.num_hidden_layers
    assert calls[:layers] == [(False, True)] * layers  # the prefill: fused causal, no mask
    assert set(calls[layers:]) == {(False, False)}  # one token a step: nothing to mask
    calls.clear()
    padded = [*alone, Request([{"role": "user", "content": "Where is the red ball now?"}], greedy)]
    engine.generate([engine.prepare(r) for r in padded])
    assert calls and all(given for given, _ in calls)
