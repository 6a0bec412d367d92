"""`eqakit api`: a real uvicorn server on 127.0.0.1 with the tiny model, called by real clients.

The tutorial's own curl command and requests client, the openai SDK (whole and streamed), concurrent
clients (batched by the engine, answers identical to solo ones), every bad input from the issue
followed by a good request, random malformed requests, API keys, client disconnects, load and
memory, and SIGTERM on a real `eqakit api` process. The tiny model's weights are scaled up as in
tests/test_engine.py so that greedy answers depend on the prompt.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from eqakit.config import load_config
from eqakit.engine import HFEngine
from eqakit.serve.api import Service, create_app
from eqakit.serve.server import ApiServer, bind

ROOT = Path(__file__).resolve().parents[1]
EQAKIT = [sys.executable, "-m", "eqakit"]

# Step 3.6 of the tutorial, verbatim apart from the image path and the URL (filled in below).
TUTORIAL_CURL = """IMAGE_B64=$(base64 -i /path/to/your/image.jpg)

curl -X POST http://localhost:8000/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "Qwen3-VL",
    "messages": [{
      "role": "user",
      "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,'${IMAGE_B64}'"}},
        {"type": "text", "text": "这张图片里有什么?"}
      ]
    }],
    "temperature": 0.2,
    "max_tokens": 128
  }'
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api")
    (root / "media").mkdir()
    (root / "outside").mkdir()
    jpeg(1).save(root / "media" / "frame.jpg")
    jpeg(2).save(root / "outside" / "secret.jpg")
    (root / "media" / "link.jpg").symlink_to(root / "outside" / "secret.jpg")
    return root / "media"


def settings(model_dir: Path, *extra: str) -> list[str]:
    return [
        f"model_name_or_path={model_dir}",
        "template=qwen3_vl_nothink",
        "max_new_tokens=2",
        "cutoff_len=1024",
        "api_max_new_tokens=300",
        "api_max_images=4",
        "api_max_body_mb=1",
        "api_max_image_pixels=1000000",
        "api_max_n=4",
        "api_batch_window_ms=20",
        *extra,
    ]


@contextmanager
def serving(app, header_timeout_s: float = 10.0) -> Iterator[tuple[str, Service]]:
    """The app under uvicorn on a free port of 127.0.0.1, in a thread."""
    sock = bind("127.0.0.1", 0)
    server = ApiServer(app, app.state.service.drain, log_level="warning", header_timeout_s=header_timeout_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.service
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def engine(lively_dir: Path, media_dir: Path) -> HFEngine:
    cfg = load_config("infer", None, settings(lively_dir, f"api_media_dir={media_dir}"))
    return HFEngine.from_config(cfg, max_batch_size=cfg.api.api_max_batch_size)


@pytest.fixture(scope="module")
def server(engine: HFEngine, lively_dir: Path, media_dir: Path) -> Iterator[tuple[str, Service]]:
    cfg = load_config("infer", None, settings(lively_dir, f"api_media_dir={media_dir}"))
    with serving(create_app(engine, model_name="tiny-served", settings=cfg.api)) as running:
        yield running


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


def jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(question: str, *images: bytes, **fields) -> dict:
    content = [image_part(data_uri(im)) for im in images] + [{"type": "text", "text": question}]
    return {"model": "anything", "messages": [{"role": "user", "content": content}], **fields}


def post(url: str, body, **kw) -> requests.Response:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return requests.post(f"{url}/v1/chat/completions", data=data, timeout=60, **kw)


def assert_good(url: str) -> None:
    """The server still answers a valid request."""
    reply = post(url, ask("Is the door open?", max_tokens=1, temperature=0))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


def assert_error(reply: requests.Response, status: int, needle: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if needle is not None:
        assert needle in error["message"] or needle == error["param"], error
    return error


# ---- the tutorial's clients and the openai SDK ------------------------------------------------------


@pytest.fixture(scope="module")
def process(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """A real `eqakit api` process configured through the environment, as the tutorial starts it."""
    tmp = tmp_path_factory.mktemp("process")
    config = tmp / "infer_openeqa.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\ntemplate: qwen3_vl_nothink\nfinetuning_type: lora\n"
        "trust_remote_code: true\nmax_new_tokens: 8\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "API_PORT": str(port), "API_MODEL_NAME": "Qwen3-VL-served", "OMP_NUM_THREADS": "1"}
    env.pop("API_KEY", None)
    env.pop("API_HOST", None)
    log = (tmp / "server.log").open("wb")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen([*EQAKIT, "api", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:  # not listening yet, or listening while the model loads
            time.sleep(0.2)
    assert proc.poll() is None, (tmp / "server.log").read_text()
    yield url, proc, tmp / "server.log"
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    log.close()


def test_the_tutorials_curl_command_works(process, tmp_path: Path) -> None:
    url, *_ = process
    image = tmp_path / "image.jpg"
    jpeg(3).save(image)
    command = TUTORIAL_CURL.replace("/path/to/your/image.jpg", str(image)).replace(
        "http://localhost:8000", url
    )
    # The tutorial was written on macOS, whose `base64 -i FILE` prints one line; GNU base64 wraps at 76
    # columns (and bash then splits ${IMAGE_B64}), so the command runs with a macOS-like base64.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "base64").write_text('#!/bin/sh\nexec /usr/bin/base64 -w 0 "$@"\n')
    (shim / "base64").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    reply = json.loads(out.stdout)
    assert reply["model"] == "Qwen3-VL-served"
    assert reply["object"] == "chat.completion" and isinstance(reply["choices"][0]["message"]["content"], str)
    assert reply["usage"]["prompt_tokens"] > 10

    # The shipped example works with GNU base64 as it is.
    example = subprocess.run(
        ["bash", str(ROOT / "examples" / "curl_chat.sh"), str(image), url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert example.returncode == 0, example.stderr
    assert json.loads(example.stdout)["choices"][0]["message"]["role"] == "assistant"


def test_the_tutorials_requests_client_works(process, tmp_path: Path) -> None:
    url, *_ = process
    jpeg(4).save(tmp_path / "000.jpg")
    env = {**os.environ, "API_URL": f"{url}/v1/chat/completions", "IMAGE_PATH": str(tmp_path / "000.jpg")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "requests_client.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("模型回答:"), out.stdout
    models = requests.get(f"{url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["Qwen3-VL-served"]


def test_openai_sdk_whole_and_streamed(url: str, tmp_path: Path) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny-served"]
    content = [image_part(data_uri(encoded(jpeg(5)))), {"type": "text", "text": "What is on the table?"}]
    messages = [{"role": "user", "content": content}]
    whole = client.chat.completions.create(model="gpt-4o", messages=messages, temperature=0, max_tokens=12)
    assert whole.model == "tiny-served" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="x",
            messages=messages,
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens

    # The raw stream is OpenAI's SSE: data lines, then [DONE].
    with requests.post(
        f"{url}/v1/chat/completions", json={**ask("Hi"), "stream": True}, stream=True, timeout=60
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line for line in raw.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])

    # The shipped example runs against the server.
    frame = tmp_path / "000.jpg"
    jpeg(6).save(frame)
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "openai_client.py"),
            str(frame),
            "--base-url",
            f"{url}/v1",
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "[tiny-served]" in out.stdout and "streamed:" in out.stdout


def test_sampling_fields_n_stop_seed(url: str) -> None:
    body = ask("Describe the room.", encoded(jpeg(7)), temperature=1.0, top_p=0.9, seed=11, n=3, max_tokens=8)
    first, second = post(url, body).json(), post(url, body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in first["choices"]] == [
        c["message"]["content"] for c in second["choices"]
    ]
    assert first["usage"]["completion_tokens"] <= 24

    greedy = post(
        url, ask("Describe the room.", max_completion_tokens=10, max_tokens=3, temperature=0)
    ).json()
    text = greedy["choices"][0]["message"]["content"]
    assert greedy["usage"]["completion_tokens"] == 10 or greedy["choices"][0]["finish_reason"] == "stop"
    if len(text) > 2:  # a stop string cuts the text before it, as OpenAI's API does
        stop = text[1:3]
        cut = post(url, ask("Describe the room.", max_tokens=10, temperature=0, stop=[stop])).json()
        assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"


# ---- concurrency, disconnects, load ----------------------------------------------------------------


def test_concurrent_requests_are_batched_and_exact(url: str, server) -> None:
    _, service = server
    frames = [encoded(jpeg(20 + i)) for i in range(2)]
    kinds = [
        ask("What color is the chair?", *frames, temperature=0, max_tokens=12),
        ask("Is the door open?", encoded(jpeg(5, (160, 128))), temperature=0, max_tokens=12),
        ask("Where is the lamp?", temperature=0, max_tokens=12),
        ask("What color is the chair?", temperature=0, max_tokens=12),
    ]
    alone = [post(url, body).json()["choices"][0]["message"]["content"] for body in kinds]
    assert len(set(alone)) > 1  # answers depend on the prompt, so a mix-up between rows would show
    service.worker.peak_batch = 0
    barrier = threading.Barrier(8)

    def client(i: int) -> requests.Response:
        barrier.wait()
        return post(url, kinds[i % 4])

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(client, range(8)))
    assert all(r.status_code == 200 for r in replies)
    assert [r.json()["choices"][0]["message"]["content"] for r in replies] == [alone[i % 4] for i in range(8)]
    assert service.worker.peak_batch >= 4  # decoded together, not one after another


def health(url: str) -> dict:
    return requests.get(f"{url}/health", timeout=10).json()


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_disconnects_cancels_its_generation(url: str) -> None:
    before = health(url)["cancelled"]
    started = time.monotonic()
    with requests.post(
        f"{url}/v1/chat/completions", json=ask("Talk.", max_tokens=300, stream=True), stream=True, timeout=60
    ) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith(b"data: ")
    assert wait_for(lambda: health(url)["in_flight"] == 0, timeout=5)
    assert health(url)["cancelled"] == before + 1
    assert time.monotonic() - started < 5  # 300 tokens take longer: it stopped early

    # A non-streaming request whose client goes away is cancelled too.
    body = json.dumps(ask("Talk.", max_tokens=300)).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_for(lambda: health(url)["in_flight"] == 1, timeout=5)
    assert wait_for(lambda: health(url)["in_flight"] == 0, timeout=5)
    assert health(url)["cancelled"] == before + 2
    assert_good(url)


def test_64_clients_and_flat_memory(url: str) -> None:
    import psutil

    body = json.dumps(ask("Is the door open?", max_tokens=1, temperature=0))

    def client(count: int) -> list[int]:
        with requests.Session() as session:
            return [
                session.post(f"{url}/v1/chat/completions", data=body, timeout=120).status_code
                for _ in range(count)
            ]

    process = psutil.Process()
    with ThreadPoolExecutor(64) as pool:
        statuses = [s for batch in pool.map(client, [10] * 64) for s in batch]
        assert statuses == [200] * 640
        rss_before = process.memory_info().rss
        statuses = [s for batch in pool.map(client, [6] * 64) for s in batch]
        assert statuses == [200] * 384
    grown = (process.memory_info().rss - rss_before) / 2**20
    assert grown < 40, f"memory grew by {grown:.1f} MiB over 384 requests"
    assert health(url)["in_flight"] == 0


# ---- bad input -------------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims another size (a decompression bomb's shape, without the bytes)."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def image_body(url: str, **fields) -> dict:
    return {
        "messages": [{"role": "user", "content": [image_part(url), {"type": "text", "text": "What?"}]}],
        **fields,
    }


GOOD = ask("Where is the lamp?")
JPEG = encoded(jpeg(9))
BAD_INPUTS = {
    "malformed json": (b'{"messages": [', 400, None),
    "not an object": (b"[1, 2]", 400, None),
    "not utf-8": (b"\xff\xfe\x00", 400, None),
    "nan temperature": (
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        400,
        "temperature",
    ),
    "messages is a string": ({"messages": "hello"}, 400, "messages"),
    "no messages field": ({"model": "x"}, 400, "messages"),
    "empty messages": ({"messages": []}, 400, "messages"),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    "no role": ({"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    "content is a number": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    "text part not a string": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        400,
        "messages[0].content[0].text",
    ),
    "unknown part type": (
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]},
        400,
        "messages[0].content[0]",
    ),
    "image_url is a string": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        400,
        None,
    ),
    "ends with assistant": ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    "system after user": (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "user", "content": "c"},
            ]
        },
        400,
        "messages",
    ),
    "image in system message": (
        {
            "messages": [
                {"role": "system", "content": [image_part(data_uri(JPEG))]},
                {"role": "user", "content": "x"},
            ]
        },
        400,
        "messages[0].content[0]",
    ),
    "image placeholder in text": (ask("<image> what?"), 400, "messages[0].content[0]"),
    "wrong temperature type": ({**GOOD, "temperature": "hot"}, 400, "temperature"),
    "wrong n type": ({**GOOD, "n": "2"}, 400, "n"),
    "wrong stream type": ({**GOOD, "stream": "yes"}, 400, "stream"),
    "wrong stop type": ({**GOOD, "stop": 5}, 400, "stop"),
    "empty stop string": ({**GOOD, "stop": [""]}, 400, "stop"),
    "temperature below range": ({**GOOD, "temperature": -0.5}, 400, "temperature"),
    "temperature above range": ({**GOOD, "temperature": 2.5}, 400, "temperature"),
    "top_p zero": ({**GOOD, "top_p": 0}, 400, "top_p"),
    "top_p above one": ({**GOOD, "top_p": 1.5}, 400, "top_p"),
    "max_tokens zero": ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens negative": ({**GOOD, "max_tokens": -5}, 400, "max_tokens"),
    "max_tokens over limit": ({**GOOD, "max_tokens": 301}, 400, "max_tokens"),
    "max_completion_tokens zero": ({**GOOD, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    "n zero": ({**GOOD, "n": 0}, 400, "n"),
    "n over limit": ({**GOOD, "n": 5}, 400, "n"),
    "seed too large": ({**GOOD, "seed": 2**70}, 400, "seed"),
    "tools": ({**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    "logprobs": ({**GOOD, "logprobs": True}, 400, "logprobs"),
    "bad base64": (image_body("data:image/png;base64,@@not base64@@"), 400, "messages[0].content[0]"),
    "not an image": (image_body(data_uri(b"hello, I am not an image")), 400, "messages[0].content[0]"),
    "svg data uri": (image_body("data:image/svg+xml;base64,PHN2Zz4="), 400, "messages[0].content[0]"),
    "truncated image": (image_body(data_uri(JPEG[: len(JPEG) // 2])), 400, "messages[0].content[0]"),
    "decompression bomb": (
        image_body(data_uri(png_claiming(100_000, 100_000), "image/png")),
        400,
        "messages[0].content[0]",
    ),
    "over the pixel limit": (
        image_body(data_uri(png_claiming(1200, 1000), "image/png")),
        400,
        "messages[0].content[0]",
    ),
    "too many images": (ask("What?", *[JPEG] * 5), 400, "messages"),
    "body over the size limit": (ask("x" * (1 << 20)), 413, None),
    "prompt too long": (ask("lamp " * 2000), 400, "messages"),
    "file url": (image_body("file:///etc/passwd"), 400, "messages[0].content[0]"),
    "path outside media dir": (image_body("../outside/secret.jpg"), 400, "messages[0].content[0]"),
    "absolute path outside media dir": (image_body("/etc/passwd"), 400, "messages[0].content[0]"),
    "symlink out of media dir": (image_body("link.jpg"), 400, "messages[0].content[0]"),
    "remote urls disabled": (image_body("http://example.com/a.jpg"), 400, "messages[0].content[0]"),
    "lone surrogate in text": (
        b'{"messages": [{"role": "user", "content": "a\\ud800"}]}',
        400,
        "messages[0].content",
    ),
    "extreme aspect ratio": (
        image_body(data_uri(encoded(Image.new("RGB", (1000, 2)), "PNG"), "image/png")),
        400,
        None,
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_and_the_server_keeps_working(url: str, name: str) -> None:
    body, status, param = BAD_INPUTS[name]
    error = assert_error(post(url, body), status, param)
    assert "Traceback" not in error["message"]
    if name == "prompt too long":
        assert error["code"] == "context_length_exceeded"
    assert_good(url)


def test_images_from_the_media_dir_and_data_uris_of_every_format(url: str, media_dir: Path) -> None:
    for path in ("frame.jpg", str(media_dir / "frame.jpg")):
        assert post(url, image_body(path, max_tokens=1)).status_code == 200
    for fmt, mime in (
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
    ):
        reply = post(url, image_body(data_uri(encoded(jpeg(1), fmt), mime), max_tokens=1))
        assert reply.status_code == 200, (fmt, reply.text)


def test_random_malformed_requests_never_get_a_5xx(url: str) -> None:
    rng = random.Random(0)
    junk = [
        None,
        True,
        -1,
        0,
        2**64,
        1.5,
        "",
        "x",
        "\x00",
        [],
        {},
        [None],
        {"a": 1},
        "data:image/png;base64,AAAA",
        "http://[::1",
        "\ud800",
        "../../etc/passwd",
    ]
    keys = [
        "model",
        "messages",
        "temperature",
        "top_p",
        "max_tokens",
        "n",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "max_completion_tokens",
        "top_k",
        "role",
        "content",
        "type",
        "text",
        "image_url",
        "url",
    ]

    def mutate(node, depth: int = 0):
        if isinstance(node, dict) and node and rng.random() < 0.7:
            key = rng.choice([*node, rng.choice(keys)])
            action = rng.random()
            if action < 0.3:
                return {k: v for k, v in node.items() if k != key}
            if action < 0.7 or key not in node:
                return {**node, key: rng.choice(junk)}
            return {**node, key: mutate(node[key], depth + 1)}
        if isinstance(node, list) and node and rng.random() < 0.7:
            i = rng.randrange(len(node))
            return [*node[:i], mutate(node[i], depth + 1), *node[i + 1 :]]
        return rng.choice(junk)

    base = image_body(data_uri(encoded(jpeg(3), "PNG"), "image/png"), max_tokens=1)
    bodies: list[bytes] = []
    for _ in range(300):
        kind = rng.random()
        if kind < 0.8:
            bodies.append(json.dumps(mutate(base)).encode())
        else:
            raw = json.dumps(base).encode()
            cut = rng.randrange(len(raw))
            bodies.append(raw[:cut] + bytes(rng.randrange(256) for _ in range(rng.randrange(4))))

    def send(body: bytes) -> int:
        return requests.post(f"{url}/v1/chat/completions", data=body, timeout=60).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, bodies))
    assert all(s < 500 for s in statuses), sorted(set(statuses))
    assert any(s == 400 for s in statuses)
    assert_good(url)


def test_api_key_is_required_when_set(engine: HFEngine, lively_dir: Path) -> None:
    cfg = load_config("infer", None, settings(lively_dir))
    with serving(create_app(engine, model_name="keyed", api_key="s3cret", settings=cfg.api)) as (url, _):
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret"},
            {"Authorization": "Basic s3cret"},
        ):
            error = assert_error(post(url, GOOD, headers=headers), 401)
            assert error["code"] == "invalid_api_key"
            assert_error(requests.get(f"{url}/v1/models", headers=headers, timeout=10), 401)
        ok = post(url, {**GOOD, "max_tokens": 1}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["model"] == "keyed"
        assert requests.get(f"{url}/health", timeout=10).status_code == 200  # for load balancers


def test_unknown_routes_and_methods_answer_in_openai_shape(url: str) -> None:
    assert_error(requests.get(f"{url}/v1/nothing", timeout=10), 404)
    assert_error(requests.get(f"{url}/v1/chat/completions", timeout=10), 405)
    assert_error(requests.get(f"{url}/v1/models/other", timeout=10), 404)
    assert requests.get(f"{url}/v1/models/tiny-served", timeout=10).json()["id"] == "tiny-served"


# ---- the process: environment and SIGTERM (last: it stops the process) -------------------------------


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(process) -> None:
    url, proc, log = process
    events: list[str] = []

    def long_stream() -> None:
        body = ask("Talk.", max_tokens=150, stream=True)
        with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=60) as reply:
            events.extend(line.decode() for line in reply.iter_lines() if line)

    client = threading.Thread(target=long_stream)
    client.start()
    assert wait_for(lambda: len(events) >= 2, timeout=30)
    proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: requests.get(f"{url}/health", timeout=10).status_code == 503, timeout=5)
    assert_error(requests.post(f"{url}/v1/chat/completions", json=GOOD, timeout=10), 503)
    assert len(events) < 150 and proc.poll() is None  # still streaming, still running
    client.join(60)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(30) == 0
    assert re.search(r"serving 'Qwen3-VL-served'", log.read_text())
