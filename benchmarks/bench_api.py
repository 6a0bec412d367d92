"""API serving under concurrency: eqakit's server against a one-request-at-a-time HF-generate server.

    .venv/bin/python benchmarks/bench_api.py                          # tiny model, 1/8/32 clients
    .venv/bin/python benchmarks/bench_api.py --config benchmarks/configs/qwen3-vl-2b-instruct.config.json \\
        --text-layers 7 --episodes 2 --questions 4 --max-tokens 16 --dtype bfloat16

Both servers run in this process on 127.0.0.1, over the same model object, one after the other:
- reference: what LLaMA-Factory's `api` does by default: an OpenAI-compatible FastAPI route that
  serves one request at a time (a semaphore of 1) with the processor and ``model.generate``;
- eqakit: `eqakit.serve.api.create_app` (the engine worker batches concurrent requests; visual
  features and the frames' KV prefix are shared between questions about the same episode).

Clients: C threads (1, 8, 32), each posting its next request as soon as the previous one returns.
Requests are OpenEQA-shaped: 8 camera-like JPEG frames (512x384, as `eqakit prepare` writes them)
as base64 data URIs plus a question, several questions per episode, interleaved across episodes.
Each concurrency level gets fresh episodes, so no level finds the previous level's images cached.
Greedy decoding; the answers of the two servers are compared request by request. Prints each
server's throughput and p50/p99 latency per level and eqakit's throughput ratio (target: >= 4x at 8).
With ``--vllm`` the same levels then run against `eqakit api` on vLLM's engine (infer_backend: vllm),
answers compared with the reference's (GPU: run it in an environment with ``pip install 'eqakit[vllm]'``).
With ``--llamafactory`` they run against LLaMA-Factory 0.9.5's own `llamafactory-cli api` (its own
venv and process, its defaults: one request at a time), and eqakit's throughput is divided by its.
Model options are bench_predict.py's (tiny model with weights scaled so answers vary, or a
random-weight config such as Qwen3-VL-2B-Instruct's, optionally with fewer layers).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
import uvicorn
from bench_predict import BUDGET, QUESTIONS, build_model, camera_frame, until_eos
from fastapi import FastAPI, Request
from PIL import Image

from eqakit.config.args import ApiArguments
from eqakit.data.encode import PromptFormat
from eqakit.data.template import render_prompt
from eqakit.engine import HFEngine
from eqakit.serve.api import create_app
from eqakit.serve.server import bind


def reference_app(model: Any, processor: Any) -> FastAPI:
    """LLaMA-Factory's default API: one request at a time, processor + HF generate, greedy."""
    app = FastAPI()
    one_at_a_time = asyncio.Semaphore(1)
    eos = set(model.generation_config.eos_token_id)
    size = {"shortest_edge": BUDGET.min_pixels, "longest_edge": BUDGET.max_pixels}

    def generate(body: dict[str, Any]) -> str:
        images, text = [], ""
        for part in body["messages"][-1]["content"]:
            if part["type"] == "image_url":
                data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                text += "<image>"
            else:
                text += part["text"]
        prompt = render_prompt([{"role": "user", "content": text}])
        inputs = processor(
            text=[prompt], images=images or None, images_kwargs={"size": size}, return_tensors="pt"
        )
        with torch.inference_mode():
            out = model.generate(
                **inputs.to(model.device), do_sample=False, max_new_tokens=body["max_tokens"]
            )
        tokens = until_eos(out[0, inputs["input_ids"].shape[1] :].tolist(), eos)
        return processor.tokenizer.decode(tokens, skip_special_tokens=True)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await request.json()
        async with one_at_a_time:
            text = await asyncio.to_thread(generate, body)
        return {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        }

    return app


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """The app under uvicorn on a free port of 127.0.0.1, in a thread; yields the completions URL."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
    finally:
        server.should_exit = True
        thread.join()


def workload(
    level: int, episodes: int, questions: int, frames: int, size: tuple[int, int], max_tokens: int
) -> list[str]:
    """JSON bodies, interleaved across episodes (q0 of every episode, then q1, ...)."""
    per_episode = []
    for episode in range(episodes):
        rng = np.random.default_rng(1000 * level + episode)
        uris = []
        for _ in range(frames):
            buf = io.BytesIO()
            camera_frame(rng, *size).save(buf, "JPEG", quality=85)
            uris.append(f"data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}")
        bodies = []
        for q in range(questions):
            content = [{"type": "image_url", "image_url": {"url": u}} for u in uris]
            content.append({"type": "text", "text": QUESTIONS[(episode + q) % len(QUESTIONS)]})
            bodies.append(
                json.dumps(
                    {
                        "model": "any",
                        "messages": [{"role": "user", "content": content}],
                        "temperature": 0,
                        "max_tokens": max_tokens,
                    }
                )
            )
        per_episode.append(bodies)
    return [per_episode[e][q] for q in range(questions) for e in range(episodes)]


def run_clients(url: str, bodies: list[str], clients: int) -> tuple[float, list[float], list[str]]:
    """(wall seconds, per-request latencies, answers in request order) with ``clients`` closed-loop clients."""
    answers: list[str] = [""] * len(bodies)
    latencies: list[float] = [0.0] * len(bodies)
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                start = time.perf_counter()
                reply = session.post(
                    url, data=bodies[i], headers={"Content-Type": "application/json"}, timeout=3600
                )
                latencies[i] = time.perf_counter() - start
                reply.raise_for_status()
                answers[i] = reply.json()["choices"][0]["message"]["content"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return time.perf_counter() - start, latencies, answers


def summary(name: str, wall: float, latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return (
        f"{name:>13}: {len(latencies) / wall:7.3f} req/s   p50 {statistics.median(ordered):7.2f} s   "
        f"p99 {p99:7.2f} s   ({wall:.1f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="model config JSON (random weights); default: the tiny test model")
    parser.add_argument("--text-layers", type=int, help="cut the language model to this many layers")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--weight-scale",
        type=float,
        help="scale random weights (default: 12 for the tiny model, so greedy answers differ between questions "
        "and the agreement check means something; 1 for a config)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels")
    parser.add_argument("--episodes", type=int, default=4, help="episodes per level")
    parser.add_argument("--questions", type=int, default=8, help="questions per episode")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--frame-size", default="512x384")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--batch-size", type=int, default=ApiArguments.api_max_batch_size, help="api_max_batch_size"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="also serve the same weights with infer_backend: vllm (needs vLLM) and compare it with the reference",
    )
    parser.add_argument(
        "--vllm-config",
        default="{}",
        help="JSON of further infer-config keys for the vLLM run (e.g. vllm_gpu_util)",
    )
    parser.add_argument(
        "--llamafactory",
        action="store_true",
        help="also serve the same weights with LLaMA-Factory 0.9.5's `llamafactory-cli api` (installs .venv-lf)",
    )
    args = parser.parse_args()
    if args.config is None and args.weight_scale is None:
        args.weight_scale = 12.0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    with tempfile.TemporaryDirectory() as workdir:
        model, processor = build_model(args, Path(workdir))
        if args.vllm or args.llamafactory:  # loaded from a directory; kept until those runs
            served = Path(tempfile.mkdtemp(prefix="eqakit-bench-served-"))
            model.save_pretrained(served)
            processor.save_pretrained(served)
    model = model.to(device)
    width, height = map(int, args.frame_size.split("x"))
    levels = [int(c) for c in args.clients.split(",")]
    print(
        f"{platform.processor() or platform.machine()} ({device}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.dtype}; model: {args.config or 'tiny'} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params); per level {args.episodes} episodes x "
        f"{args.questions} questions, {args.frames} frames of {args.frame_size}, greedy, max_tokens {args.max_tokens}",
        flush=True,
    )
    engine = HFEngine(model, processor, format=PromptFormat(budget=BUDGET), max_batch_size=args.batch_size)
    settings = ApiArguments(api_max_batch_size=args.batch_size, api_max_new_tokens=max(args.max_tokens, 1))
    warm = workload(0, 1, 1, args.frames, (width, height), args.max_tokens)
    references: dict[int, tuple[list[str], float, list[str]]] = {}
    ours_walls: dict[int, float] = {}
    for level in levels:
        bodies = workload(level, args.episodes, args.questions, args.frames, (width, height), args.max_tokens)
        with serving(reference_app(model, processor)) as url:
            run_clients(url, warm, 1)
            ref_wall, ref_lat, ref_answers = run_clients(url, bodies, level)
        with serving(create_app(engine, settings=settings)) as url:
            run_clients(url, warm, 1)
            ours_wall, ours_lat, ours_answers = run_clients(url, bodies, level)
        references[level] = (bodies, ref_wall, ref_answers)
        ours_walls[level] = ours_wall
        same = sum(a == b for a, b in zip(ours_answers, ref_answers, strict=True))
        print(f"{level} concurrent clients, {len(bodies)} requests:")
        print(summary("reference", ref_wall, ref_lat))
        print(summary("eqakit", ours_wall, ours_lat))
        print(
            f"    ratio: {ref_wall / ours_wall:.1f}x the reference's throughput; same answers: {same}/{len(bodies)} "
            f"({len(set(ref_answers))} distinct), e.g. {ours_answers[0][:40]!r}",
            flush=True,
        )
    if args.llamafactory:
        run_llamafactory(args, served, warm, references, ours_walls)
    if args.vllm:
        del model, engine
        run_vllm(args, served, settings, warm, references)
    if args.vllm or args.llamafactory:
        shutil.rmtree(served, ignore_errors=True)


def against_reference(
    name: str, url: str, warm: list[str], references: dict[int, tuple[list[str], float, list[str]]]
) -> Iterator[tuple[int, float, float, int, int]]:
    """The reference run's levels against the server at ``url`` (warmed first), each printed with
    its throughput and latency: (level, wall, reference wall, answers equal to the reference's, requests)."""
    run_clients(url, warm, 1)
    for level, (bodies, ref_wall, ref_answers) in references.items():
        wall, latencies, answers = run_clients(url, bodies, level)
        same = sum(a == b for a, b in zip(answers, ref_answers, strict=True))
        print(f"{level} concurrent clients, {len(bodies)} requests:")
        print(summary(name, wall, latencies))
        yield level, wall, ref_wall, same, len(bodies)


def run_llamafactory(
    args: argparse.Namespace,
    served: Path,
    warm: list[str],
    references: dict[int, tuple[list[str], float, list[str]]],
    ours_walls: dict[int, float],
) -> None:
    """The same levels against LLaMA-Factory's own OpenAI-compatible server, in its own process."""
    import subprocess

    from lf_runner import llamafactory_cli, write_yaml

    cli = llamafactory_cli()
    port = bind("127.0.0.1", 0)
    number = port.getsockname()[1]
    port.close()
    config = write_yaml(
        served / "lf_api.yaml",
        {
            "model_name_or_path": str(served),
            "template": "qwen3_vl_nothink",
            "infer_backend": "huggingface",
            "infer_dtype": args.dtype,
            "image_min_pixels": BUDGET.min_pixels,
            "image_max_pixels": BUDGET.max_pixels,
            "trust_remote_code": True,
        },
    )
    env = {
        **os.environ,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(number),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    log = (served / "lf_api.log").open("wb")
    server = subprocess.Popen([str(cli), "api", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{number}/v1/chat/completions"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(
                    f"llamafactory-cli api exited:\n{(served / 'lf_api.log').read_text()[-3000:]}"
                )
            try:
                if requests.get(f"http://127.0.0.1:{number}/v1/models", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llamafactory-cli api did not start within 600 s")
            time.sleep(1)
        for level, wall, ref_wall, same, count in against_reference("LLaMA-Factory", url, warm, references):
            print(
                f"    eqakit: {wall / ours_walls[level]:.1f}x LLaMA-Factory's throughput (LLaMA-Factory: "
                f"{ref_wall / wall:.2f}x the reference's); its answers equal the reference's {same}/{count}",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def run_vllm(
    args: argparse.Namespace,
    served: Path,
    settings: ApiArguments,
    warm: list[str],
    references: dict[int, tuple[list[str], float, list[str]]],
) -> None:
    """The same levels against `eqakit api` with infer_backend: vllm (one engine for all levels)."""
    from eqakit.config import load_config
    from eqakit.engine.vllm import VllmEngine

    overrides = [
        f"model_name_or_path={served}",
        "template=qwen3_vl_nothink",
        "infer_backend=vllm",
        f"infer_dtype={args.dtype}",
        f"image_min_pixels={BUDGET.min_pixels}",
        f"image_max_pixels={BUDGET.max_pixels}",
        *(
            f"{key}={json.dumps(value) if isinstance(value, dict) else value}"
            for key, value in json.loads(args.vllm_config).items()
        ),
    ]
    cfg = load_config("infer", None, overrides)
    start = time.perf_counter()
    engine = VllmEngine.from_config(cfg, max_batch_size=args.batch_size)
    print(f"vLLM engine ready in {time.perf_counter() - start:.0f} s", flush=True)
    with serving(create_app(engine, settings=settings)) as url:
        for _, wall, ref_wall, same, count in against_reference("vllm", url, warm, references):
            print(
                f"    ratio: {ref_wall / wall:.1f}x the reference's throughput; same answers: {same}/{count}"
            )


if __name__ == "__main__":
    main()
