"""`eqakit webui` end to end: a real server process, a real headless Chromium, the tiny model.

Each answer on the page is checked against the engine run in this process on the same conversation
(greedy decoding, so the tokens must match): the answer text, and the prompt token count the page
reports, which changes if an image of an earlier turn, the system prompt or the history were lost.
Screenshots go to the test's tmp dir (``.../webui*/shots``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from conftest import write_toy_dataset
from eqakit.config import load_config
from eqakit.data.dataset import load_samples
from eqakit.engine import Completion, HFEngine, Request
from eqakit.serve.webui_train import SERIES_COLORS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SYSTEM = "You are a careful robot. Answer in one word."
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium)"
    ),
]


@pytest.fixture(scope="session")
def chatty_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the embedding rows of whitespace tokens zeroed (they are tied to the output).

    The random tiny model echoes the last prompt token, a newline, so its answers are all newlines:
    a browser shows nothing. Without whitespace tokens it answers with visible noise ("stairs...").
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    tokenizer = processor.tokenizer
    blank = [i for i in range(model.lm_head.weight.shape[0]) if not tokenizer.decode([i]).strip()]
    with torch.no_grad():
        model.lm_head.weight[blank] = 0
    out = tmp_path_factory.mktemp("chatty") / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ball(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (96, 72)) -> Path:
    image = Image.new("RGB", size, (200, 200, 200))
    ImageDraw.Draw(image).ellipse([20, 12, 68, 60], fill=color)
    image.save(path)
    return path


@contextlib.contextmanager
def webui_server(
    args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[str]:
    """`eqakit webui ARGS --port P` in a process of its own (output to ``log``, API_KEY only if ``env``
    gives it), once its page answers: its URL; stopped on exit."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k != "API_KEY"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "eqakit", "webui", *args, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**base, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", **(env or {})},
            cwd=cwd,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                assert process.poll() is None, f"eqakit webui exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"eqakit webui did not start:\n{log.read_text()}"
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def site(chatty_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A running `eqakit webui CONFIG --port P` (its model loaded at start), and its inputs; the
    tests' tmp dirs are --allow-dir, so the tabs that write may write there."""
    root = tmp_path_factory.mktemp("webui")
    dataset = write_toy_dataset(root / "data", episodes=2, questions=2, frames=2)
    config = root / "infer.yaml"
    config.write_text(
        f"model_name_or_path: {chatty_model_dir}\ntemplate: qwen3_vl_nothink\n"
        f"max_new_tokens: 40\ntemperature: 0\ndataset_dir: {dataset}\n"
    )
    log = root / "server.log"
    args = [str(config), "--allow-dir", str(tmp_path_factory.getbasetemp())]
    with webui_server(args, log) as url:
        shots = root / "shots"
        shots.mkdir()
        files = root / "files"
        files.mkdir()
        (files / "notes.txt").write_text("not an image")
        yield {
            "url": url,
            "config": config,
            "dataset": dataset,
            "model": chatty_model_dir,
            "log": log,
            "shots": shots,
            "red": ball(files / "red.png", (220, 30, 30)),
            "blue": ball(files / "blue.png", (30, 30, 220), (72, 96)),
            "notes": files / "notes.txt",
        }


@pytest.fixture(scope="module")
def reference(site: dict) -> Iterator[HFEngine]:
    """The engine in this process, on the server's config: what the page must show."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # leave the other core to the server
    yield HFEngine.from_config(load_config("infer", site["config"]))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def page(site: dict) -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(site["url"])
        page.wait_for_selector("#chat-input textarea")
        yield page
        browser.close()


# ---- page helpers ----------------------------------------------------------------------------

WATCH = """sel => {
  window.__seen = window.__seen || {};
  const log = window.__seen[sel] = [];
  const el = document.querySelector(sel);
  const read = () => {
    if (sel !== '#chatbot') return {bubbles: 0, text: el.innerText};
    const bots = el.querySelectorAll('[data-testid="bot"]');
    return {bubbles: bots.length, text: bots.length ? bots[bots.length - 1].innerText : ''};
  };
  new MutationObserver(() => log.push(read())).observe(el, {subtree: true, childList: true, characterData: true});
}"""


def watch(page, selector: str) -> None:
    """Record every text the element shows from now on (answers stream faster than polling sees);
    for the chatbot, the last answer's text and how many answers there are."""
    page.evaluate(WATCH, selector)


def seen(page, selector: str) -> list[dict]:
    return page.evaluate("sel => window.__seen[sel]", selector)


def wait_seen(page, selector: str, needle: str, after: str | None = None) -> str:
    """Wait until the watched element shows ``needle`` (after it showed ``after``, if given: the text of
    the previous answer stays until the new one starts); return that text."""
    page.wait_for_function(
        """([sel, needle, after]) => {
          const texts = (window.__seen[sel] || []).map(t => t.text);
          const start = after === null ? 0 : texts.findIndex(t => t.includes(after));
          return start >= 0 && texts.slice(start).some(t => t.includes(needle));
        }""",
        arg=[selector, needle, after],
    )
    texts = [t["text"] for t in seen(page, selector)]
    start = 0 if after is None else next(i for i, t in enumerate(texts) if after in t)
    return next(t for t in texts[start:] if needle in t)


def send(page, text: str, files: list[Path] = (), expect: str = "tokens/s") -> str:
    """Attach ``files``, type ``text``, press Enter; return the chat notice once it shows ``expect``."""
    if files:
        page.locator("#chat-input input[type=file]").set_input_files([str(f) for f in files])
        page.wait_for_function(
            "n => document.querySelectorAll('#chat-input [aria-label=\"File thumbnail\"]').length === n",
            arg=len(files),
        )
    page.locator("#chat-input textarea").fill(text)
    watch(page, "#chat-notice")
    watch(page, "#chatbot")
    page.locator("#chat-input textarea").press("Enter")
    return wait_seen(page, "#chat-notice", expect, after="Generating" if expect == "tokens/s" else None)


def normal(text: str) -> str:
    return " ".join(text.split())


def prompt_tokens(notice: str) -> int:
    match = re.search(r"(\d+) prompt tokens", notice)
    assert match, notice
    return int(match.group(1))


def expect_answer(page, notice: str, expected: Completion) -> None:
    """The page's last answer and prompt size are the engine's, and the answer arrived in pieces."""
    assert prompt_tokens(notice) == expected.prompt_tokens
    bubbles = page.locator('#chatbot [data-testid="bot"]')
    final = normal(expected.text)
    assert normal(bubbles.last.inner_text()) == final != ""
    shown = {len(normal(t["text"])) for t in seen(page, "#chatbot") if t["bubbles"] == bubbles.count()}
    assert any(0 < n < len(final) for n in shown), f"the answer did not stream: lengths shown {sorted(shown)}"


def load_config_keys(site: dict) -> dict:
    """The site's config file as keys (to load another model with its settings)."""
    import yaml

    return yaml.safe_load(site["config"].read_text())


def user(text: str, *images: Path) -> dict:
    parts = [{"type": "image", "image": Image.open(p).convert("RGB")} for p in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def body_text(page) -> str:
    return page.locator("body").inner_text()


# ---- tests -----------------------------------------------------------------------------------


def test_chat_streams_images_system_prompt_history_and_clear(site: dict, page, reference: HFEngine) -> None:
    assert "Model loaded" in page.locator("#model-status").inner_text()
    assert (
        f"Running on local URL:  http://127.0.0.1:{site['url'].rsplit(':', 1)[1].strip('/')}"
        in site["log"].read_text()
    )

    first = user("What is in these pictures?", site["red"], site["blue"])
    notice = send(page, "What is in these pictures?", [site["red"], site["blue"]])
    expected = reference.chat([first])
    expect_answer(page, notice, expected)
    assert page.locator('#chatbot [data-testid="user"] img').count() == 2
    page.screenshot(path=site["shots"] / "chat-two-images.png", full_page=True)

    # A new system prompt applies to the whole conversation, whose first turn keeps its two images.
    page.locator("#system-prompt textarea").fill(SYSTEM)
    notice = send(page, "Which one is red?")
    history = [first, {"role": "assistant", "content": expected.text}, user("Which one is red?")]
    expected = reference.chat(history, system=SYSTEM)
    expect_answer(page, notice, expected)
    page.screenshot(path=site["shots"] / "chat-system-prompt.png", full_page=True)

    page.locator("#clear-btn").click()
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"bot\"]')")
    notice = send(page, "Hello")
    expect_answer(page, notice, reference.chat([user("Hello")], system=SYSTEM))
    assert page.locator('#chatbot [data-testid="user"]').count() == 1
    page.screenshot(path=site["shots"] / "chat-cleared.png", full_page=True)
    page.locator("#system-prompt textarea").fill("")
    page.locator("#clear-btn").click()
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"bot\"]')")


def test_chat_takes_a_video_file_and_images_as_one_video(site: dict, page, reference: HFEngine) -> None:
    """An mp4 attached is a video; with the switch on, attached images are the frames of one video;
    each answer is the engine's for the same video; an unreadable video is one error line."""
    import av

    from eqakit.serve.webui_model import open_video

    files = site["shots"].parent / "files"
    video = files / "walk.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for k in range(20):
            frame = Image.new("RGB", (96, 64), (200, 200, 200))
            ImageDraw.Draw(frame).ellipse([4 * k, 16, 4 * k + 30, 46], fill=(220, 30, 30))
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    budget = reference.format.video
    watch(page, "#chatbot")
    notice = send(page, "Where does the ball go?", [video])
    part = {"type": "video", "video": open_video(str(video), budget)}
    expected = reference.chat(
        [{"role": "user", "content": [part, {"type": "text", "text": "Where does the ball go?"}]}]
    )
    expect_answer(page, notice, expected)
    assert page.locator('#chatbot [data-testid="user"] video').count() == 1
    page.screenshot(path=site["shots"] / "chat-video.png", full_page=True)
    page.locator("#clear-btn").click()
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"bot\"]')")

    page.locator("#frames-as-video input").check()
    frames = [site["red"], site["blue"].with_name("red-too.png")]
    Image.open(site["red"]).save(frames[1])
    notice = send(page, "Is the ball moving?", frames)
    part = {"type": "video", "video": open_video([str(f) for f in frames], budget)}
    expected = reference.chat(
        [{"role": "user", "content": [part, {"type": "text", "text": "Is the ball moving?"}]}]
    )
    expect_answer(page, notice, expected)
    page.locator("#frames-as-video input").uncheck()
    page.locator("#clear-btn").click()
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"bot\"]')")

    junk = files / "junk.mp4"
    junk.write_bytes(b"not a video" * 50)
    notice = send(page, "What is this?", [junk], expect="junk.mp4")
    assert "cannot be read" in notice and "Traceback" not in notice
    page.goto(site["url"])  # the next test starts from a fresh page: no text, files or notice left
    page.wait_for_selector("#chat-input textarea")


def test_errors_show_a_message_and_the_app_keeps_working(site: dict, page, reference: HFEngine) -> None:
    shots = site["shots"]
    bubbles = page.locator('#chatbot [data-testid="bot"]')

    # A file that is not an image: a message, the conversation untouched, the text and the good image kept.
    notice = send(page, "Describe it.", [site["notes"], site["red"]], expect="Error")
    assert "notes.txt" in notice and "not a png, jpeg, webp, gif or bmp image" in notice
    assert bubbles.count() == 0
    assert page.locator("#chat-input textarea").input_value() == "Describe it."
    page.wait_for_function(
        "() => document.querySelectorAll('#chat-input [aria-label=\"File thumbnail\"]').length === 1"
    )
    page.screenshot(path=shots / "error-not-an-image.png", full_page=True)
    notice = send(page, "Describe it.")  # the kept image goes with it
    expect_answer(page, notice, reference.chat([user("Describe it.", site["red"])]))

    # No model loaded: the message stays in the textbox.
    page.locator("#unload-btn").click()
    page.wait_for_function(
        "() => document.querySelector('#model-status').innerText.includes('no model loaded')"
    )
    notice = send(page, "Still there?", expect="Error")
    assert "no model loaded" in notice
    assert page.locator("#chat-input textarea").input_value() == "Still there?"

    # A path that does not exist, and a model whose weights are damaged.
    broken = site["shots"].parent / "broken-model"
    shutil.copytree(site["model"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    for path, reason in (("/nonexistent/model", "does not exist"), (str(broken), "deserializing header")):
        page.locator("#model-path textarea, #model-path input").first.fill(path)
        watch(page, "#model-status")
        page.locator("#load-btn").click()
        status = wait_seen(page, "#model-status", "Error", after="Loading")
        assert reason in status and "No model loaded" in status, status
    page.screenshot(path=shots / "error-bad-model.png", full_page=True)

    # Load the good model again: the chat answers, with the history from before the errors.
    page.locator("#model-path textarea, #model-path input").first.fill(str(site["model"]))
    watch(page, "#model-status")
    page.locator("#load-btn").click()
    wait_seen(page, "#model-status", "Model loaded", after="Loading")
    notice = send(page, "Still there?")
    first = user("Describe it.", site["red"])
    answer = reference.chat([first]).text
    expect_answer(
        page, notice, reference.chat([first, {"role": "assistant", "content": answer}, user("Still there?")])
    )
    assert "Traceback" not in body_text(page)
    page.screenshot(path=shots / "error-recovered.png", full_page=True)


def test_openeqa_mode_shows_frames_reference_and_model_answer(site: dict, page, reference: HFEngine) -> None:
    page.get_by_role("tab", name="OpenEQA").click()
    assert page.locator("#eqa-dir textarea, #eqa-dir input").first.input_value() == str(site["dataset"])

    # A directory without dataset_info.json: a message.
    page.locator("#eqa-dir textarea, #eqa-dir input").first.fill(str(site["dataset"] / "open_eqa_frames"))
    watch(page, "#eqa-notice")
    page.locator("#eqa-open").click()
    assert "dataset_info.json" in wait_seen(page, "#eqa-notice", "Error")

    page.locator("#eqa-dir textarea, #eqa-dir input").first.fill(str(site["dataset"]))
    watch(page, "#eqa-notice")
    page.locator("#eqa-open").click()
    wait_seen(page, "#eqa-notice", "4 questions in toy")
    page.locator("#eqa-question input").click()
    page.get_by_role("option").filter(has_text="q1-0").click()
    page.wait_for_function("() => document.querySelector('#eqa-question-text').innerText.includes('q1-0')")
    page.wait_for_function("() => document.querySelectorAll('#eqa-frames img').length === 2")
    assert page.locator("#eqa-reference textarea").input_value() == "Green"
    assert "What color is the ball?" in page.locator("#eqa-question-text").inner_text()

    watch(page, "#eqa-notice")
    page.locator("#eqa-ask").click()
    notice = wait_seen(page, "#eqa-notice", "tokens/s", after="Generating")
    sample = next(s for s in load_samples("toy", site["dataset"]) if s.meta["question_id"] == "q1-0")
    frames = [Image.open(p).convert("RGB") for p in sample.images]
    expected = reference.generate([Request(sample.prompt_messages, reference.params(), images=frames)])[0]
    assert prompt_tokens(notice) == expected.prompt_tokens
    assert normal(page.locator("#eqa-answer textarea").input_value()) == normal(expected.text) != ""
    page.screenshot(path=site["shots"] / "openeqa.png", full_page=True)


def test_openeqa_mode_asks_a_video_question_with_its_video(
    site: dict, page, reference: HFEngine, tmp_path
) -> None:
    """A dataset prepared with --as-video: the tab sent its frames as images only, and the question
    failed ("more video placeholders than videos"). It now shows the video's frames and asks the
    model with the video, as predict does."""
    from eqakit.data.video import load

    videos = write_toy_dataset(tmp_path / "videos", episodes=1, questions=1, frames=4, as_video=True)
    page.get_by_role("tab", name="OpenEQA").click()
    page.locator("#eqa-dir textarea, #eqa-dir input").first.fill(str(videos))
    watch(page, "#eqa-notice")
    page.locator("#eqa-open").click()
    wait_seen(page, "#eqa-notice", "1 questions in toy")
    page.wait_for_function("() => document.querySelectorAll('#eqa-frames img').length === 4")
    question = page.locator("#eqa-question-text").inner_text()
    assert "What color is the ball?" in question and "<video>" not in question

    watch(page, "#eqa-notice")
    page.locator("#eqa-ask").click()
    notice = wait_seen(page, "#eqa-notice", "tokens/s", after="Generating")
    sample = load_samples("toy", videos)[0]
    budget = reference.format.video
    video = load(sample.videos[0], budget.fps, budget.maxlen)
    expected = reference.generate([Request(sample.prompt_messages, reference.params(), videos=[video])])[0]
    assert prompt_tokens(notice) == expected.prompt_tokens
    assert normal(page.locator("#eqa-answer textarea").input_value()) == normal(expected.text) != ""


def test_thinking_switch_with_the_qwen3_vl_template(site: dict, page) -> None:
    page.get_by_role("tab", name="Chat").click()
    page.locator("#template input").click()
    page.get_by_role("option", name="qwen3_vl", exact=True).click()
    watch(page, "#model-status")
    page.locator("#load-btn").click()
    assert "template qwen3_vl," in wait_seen(page, "#model-status", "Model loaded", after="Loading")
    page.locator("#clear-btn").click()
    page.locator("#thinking input").check()

    thinking = HFEngine.from_config(load_config("infer", site["config"], ["template=qwen3_vl"]))
    question = [user("Think first: which color?", site["blue"])]
    on, off = thinking.generate(
        [Request(question, thinking.params(), enable_thinking=t) for t in (True, False)]
    )
    assert on.prompt_tokens != off.prompt_tokens  # thinking off puts an empty <think> block in the prompt
    expect_answer(page, send(page, "Think first: which color?", [site["blue"]]), on)
    page.screenshot(path=site["shots"] / "thinking.png", full_page=True)


def test_load_options_dtype_quantization_and_backend(site: dict, page) -> None:
    """LLaMA Board's load options: the dtype loads the model in it; 4-bit on a CPU says why it cannot;
    the backend list offers vLLM only where it is installed."""
    page.get_by_role("tab", name="Chat").click()
    page.locator("#template input").click()
    page.get_by_role("option", name="qwen3_vl_nothink", exact=True).click()
    page.locator("#load-backend input").click()
    offered = page.locator("#load-backend").get_by_role("option").all_inner_texts()
    assert [o.strip().lstrip("✓").strip() for o in offered] == ["huggingface"] + (
        ["vllm"] if importlib.util.find_spec("vllm") else []
    )
    page.keyboard.press("Escape")

    page.locator("#load-quantization input").click()
    page.get_by_role("option", name="4-bit", exact=True).click()
    watch(page, "#model-status")
    page.locator("#load-btn").click()
    status = wait_seen(page, "#model-status", "Error", after="Loading")
    assert "quantization_bit: 4 needs a CUDA GPU" in status and "No model loaded" in status, status

    page.locator("#load-quantization input").click()
    page.get_by_role("option", name="none", exact=True).click()
    page.locator("#load-dtype input").click()
    page.get_by_role("option", name="bfloat16", exact=True).click()
    watch(page, "#model-status")
    page.locator("#load-btn").click()
    assert "bfloat16, huggingface" in wait_seen(page, "#model-status", "Model loaded", after="Loading")
    half = HFEngine.from_config(load_config("infer", site["config"], ["infer_dtype=bfloat16"]))
    assert half.model.dtype == torch.bfloat16
    page.locator("#clear-btn").click()
    expect_answer(
        page, send(page, "Which color?", [site["red"]]), half.chat([user("Which color?", site["red"])])
    )
    page.screenshot(path=site["shots"] / "load-options.png", full_page=True)


def test_a_qwen2_5_vl_model_loads_with_its_template_and_answers(site: dict, page, lively_qwen2_5_dir) -> None:
    """Another architecture from the page: Qwen2.5-VL with qwen3_vl_nothink is refused naming the
    template that fits; with qwen2_vl it loads and answers an image question as the engine does."""

    def load(model: Path, template: str, outcome: str = "Model loaded") -> str:
        page.locator("#model-path input, #model-path textarea").first.fill(str(model))
        page.locator("#template input").click()
        page.get_by_role("option", name=template, exact=True).click()
        watch(page, "#model-status")
        page.locator("#load-btn").click()
        return wait_seen(page, "#model-status", outcome, after="Loading")

    page.get_by_role("tab", name="Chat").click()
    page.locator("#load-dtype input").click()  # the engine here runs float32 (an earlier test chose bf16)
    page.get_by_role("option", name="float32", exact=True).click()
    try:
        misfit = load(lively_qwen2_5_dir, "qwen3_vl_nothink", "Error")
        assert "'qwen3_vl_nothink' does not fit" in misfit and "use qwen2_vl" in misfit, misfit
        assert "template qwen2_vl," in load(lively_qwen2_5_dir, "qwen2_vl")
        keys = [f"model_name_or_path={lively_qwen2_5_dir}", "template=qwen2_vl"]
        qwen2_5 = HFEngine.from_config(load_config("infer", site["config"], keys))
        page.locator("#clear-btn").click()
        # blue: the file input takes a new file (the test before this one attached red)
        expected = qwen2_5.chat([user("Which color?", site["blue"])])
        expect_answer(page, send(page, "Which color?", [site["blue"]]), expected)
        page.screenshot(path=site["shots"] / "qwen2-5-vl.png", full_page=True)
    finally:  # the site's own model and template again, for the tests after this one
        load(site["model"], "qwen3_vl_nothink")
        page.locator("#clear-btn").click()


def test_results_tab_lists_a_predict_runs_answers_with_frames(site: dict, page, tmp_path: Path) -> None:
    """A real predict run on the site's dataset, opened in the Results tab: the tables, the filters by
    category and by wrong answers, and a question with its frames, reference and answer."""
    from eqakit.evaluate.metrics import sample_scores
    from eqakit.evaluate.predict import run_predict

    out = tmp_path / "predict"
    keys = {
        "model_name_or_path": str(site["model"]),
        "template": "qwen3_vl_nothink",
        "do_predict": True,
        "predict_with_generate": True,
        "eval_dataset": "toy",
        "dataset_dir": str(site["dataset"]),
        "output_dir": str(out),
        "max_new_tokens": 6,
        "do_sample": False,
        "report_to": "none",
    }
    run_predict(load_config("train", extra=keys))
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    rows[1]["predict"] = rows[1]["label"]  # one right answer, so that the filter has something to drop
    (out / "generated_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    wrong = [r for r in rows if sample_scores(r["predict"], r["label"])["predict_exact_match"] == 0]
    assert 0 < len(wrong) < len(rows), "the check needs right and wrong answers"

    page.get_by_role("tab", name="Results").click()
    assert page.locator("#res-data textarea, #res-data input").first.input_value() == str(site["dataset"])
    page.locator("#res-dir textarea, #res-dir input").first.fill(str(tmp_path / "nowhere"))
    watch(page, "#res-notice")
    page.locator("#res-open").click()
    assert "generated_predictions.jsonl not found" in wait_seen(page, "#res-notice", "Error")

    page.locator("#res-dir textarea, #res-dir input").first.fill(str(out))
    watch(page, "#res-notice")
    page.locator("#res-open").click()
    # (the needle is the new message's own: the error above, still shown while queued, says "predictions" too)
    opened = wait_seen(page, "#res-notice", f"{len(rows)} predictions,")
    assert f"{len(rows)} predictions, {len(wrong)} wrong" in opened
    table = page.locator("#res-table").inner_text()
    assert "Overall" in table and "attribute recognition" in table

    page.locator("#res-wrong input").check()
    assert f"{len(wrong)} shown" in wait_seen(page, "#res-notice", "shown")
    page.locator("#res-question input").click()
    options = page.locator("#res-question").get_by_role("option")
    assert options.count() == len(wrong) and all("✗" in t for t in options.all_inner_texts())
    options.first.click()
    page.wait_for_function("() => document.querySelector('#res-answer textarea').value.length > 0")
    first = wrong[0]
    assert page.locator("#res-answer textarea").input_value() == first["predict"]
    assert page.locator("#res-reference textarea").input_value() == first["label"]
    page.wait_for_function("() => document.querySelectorAll('#res-frames img').length >= 2")
    assert "What color is the ball?" in page.locator("#res-question-text").inner_text()
    page.screenshot(path=site["shots"] / "results.png", full_page=True)


def test_export_tab_merges_an_adapter_with_progress(site: dict, page, tmp_path: Path) -> None:
    """Export from the page: a bad export dir is the CLI's message; a real adapter is merged by
    `eqakit export` with its log shown, and the result loads with plain transformers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(site["model"], dtype=torch.float32)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter = tmp_path / "adapter"
    get_peft_model(base, lora).save_pretrained(adapter)

    page.get_by_role("tab", name="Export").click()
    assert page.locator("#exp-base textarea, #exp-base input").first.input_value() == str(site["model"])
    page.locator("#exp-adapter textarea, #exp-adapter input").first.fill(str(adapter))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    page.locator("#exp-dir textarea, #exp-dir input").first.fill(str(taken))
    watch(page, "#exp-status")
    page.locator("#exp-btn").click()
    status = wait_seen(page, "#exp-status", "Error", after="Exporting")
    assert "exists and is not empty" in status and (taken / "keep.txt").read_text() == "mine", status

    # A dir outside the page's directories (its cwd, its config's, --allow-dir): refused, on the page.
    outside = Path(tempfile.gettempdir()) / f"eqakit-webui-not-allowed-{os.getpid()}" / "merged"
    page.locator("#exp-dir textarea, #exp-dir input").first.fill(str(outside))
    watch(page, "#exp-status")
    page.locator("#exp-btn").click()
    status = wait_seen(page, "#exp-status", "outside the directories")
    assert f"export_dir {outside} is outside" in status and "--allow-dir" in status, status
    assert not outside.parent.exists()

    merged = tmp_path / "merged"
    page.locator("#exp-dir textarea, #exp-dir input").first.fill(str(merged))
    watch(page, "#exp-status")
    page.locator("#exp-btn").click()
    status = wait_seen(page, "#exp-status", "Done", after="Exporting")
    assert f"wrote {merged}" in status and "1 adapter(s) merged" in status, status
    assert "merging adapter 1/1" in page.locator("#exp-log textarea").input_value()
    loaded = AutoModelForImageTextToText.from_pretrained(merged).state_dict()
    original = AutoModelForImageTextToText.from_pretrained(site["model"]).state_dict()
    assert loaded.keys() == original.keys()  # a plain model: no LoRA tensors left
    changed = [k for k in original if not torch.equal(loaded[k], original[k])]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)  # merged in
    page.screenshot(path=site["shots"] / "export.png", full_page=True)

    # The Chat tab loads the merged model and answers as the engine does on it.
    page.get_by_role("tab", name="Chat").click()
    page.locator("#model-path textarea, #model-path input").first.fill(str(merged))
    page.locator("#adapter-path textarea, #adapter-path input").first.fill("")
    page.locator("#load-dtype input").click()
    page.get_by_role("option", name="float32", exact=True).click()
    watch(page, "#model-status")
    page.locator("#load-btn").click()
    assert str(merged) in wait_seen(page, "#model-status", "Model loaded", after="Loading")
    engine = HFEngine.from_config(
        load_config("infer", extra={**load_config_keys(site), "model_name_or_path": str(merged)})
    )
    page.locator("#clear-btn").click()
    question = user("Which color is the ball?")
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"bot\"]')")
    expect_answer(page, send(page, "Which color is the ball?"), engine.chat([question]))


def test_evaluate_tab_runs_predict_and_shows_its_scores(site: dict, page, tmp_path: Path) -> None:
    """Predict from the page: an unregistered dataset is the CLI's message; a real run writes the
    predictions file (the CLI's) and the page shows its overall and per-category tables."""
    page.get_by_role("tab", name="Evaluate").click()
    assert page.locator("#ev-data textarea, #ev-data input").first.input_value() == str(site["dataset"])
    page.locator("#ev-split textarea, #ev-split input").first.fill("nope")
    page.locator("#ev-out textarea, #ev-out input").first.fill(str(tmp_path / "refused"))
    watch(page, "#ev-status")
    page.locator("#ev-run").click()
    status = wait_seen(page, "#ev-status", "Error", after="Predicting")
    assert "dataset 'nope' is not registered" in status and not (tmp_path / "refused").exists(), status

    out = tmp_path / "predict"
    page.locator("#ev-split textarea, #ev-split input").first.fill("toy")
    page.locator("#ev-out textarea, #ev-out input").first.fill(str(out))
    watch(page, "#ev-status")
    page.locator("#ev-run").click()
    status = wait_seen(page, "#ev-status", "Done", after="Predicting")
    rows = (out / "generated_predictions.jsonl").read_text().splitlines()
    assert f"Done: {len(rows)} predictions in {out}" in status and len(rows) == 4, status
    assert (out / "predict_results.json").is_file()
    table = page.locator("#ev-table").inner_text()
    assert "Overall" in table and "attribute recognition" in table
    assert "predict" in page.locator("#ev-log textarea").input_value()
    page.screenshot(path=site["shots"] / "evaluate.png", full_page=True)


def train_yaml(path: Path, model: Path, data: Path, out: Path) -> Path:
    """A training config in the tutorial's shape for the tiny model: 900 short steps (~15 s)."""
    settings = {
        "stage": "sft",
        "do_train": True,
        "model_name_or_path": str(model),
        "finetuning_type": "lora",
        "lora_target": "all",
        "template": "qwen3_vl_nothink",
        "dataset_dir": str(data),
        "dataset": "toy",
        "cutoff_len": 512,
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "num_train_epochs": 150,
        "learning_rate": 0.01,
        "logging_steps": 5,
        "save_steps": 10_000,
        "val_size": 0.125,
        "eval_strategy": "steps",
        "eval_steps": 40,
        "report_to": "none",
    }
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()), encoding="utf-8")
    return path


def field(page, key: str):
    return page.locator(f"#tr-{key} textarea, #tr-{key} input").first


def train_status(page, needle: str) -> str:
    page.wait_for_function(
        "needle => document.querySelector('#tr-status').innerText.includes(needle)",
        arg=needle,
        timeout=120_000,
    )
    return page.locator("#tr-status").inner_text()


def wait_curve(page, colour: str, points: int) -> None:
    """Wait until the loss plot draws a line of ``colour`` through at least ``points`` points."""
    page.wait_for_function(
        """([colour, points]) => [...document.querySelectorAll('#tr-plot path')].some(
             p => p.getAttribute('stroke') === colour && (p.getAttribute('d') || '').split('L').length >= points)""",
        arg=[colour, points],
    )


def train_notice(page, needle: str) -> str:
    page.wait_for_function(
        "needle => document.querySelector('#tr-notice').innerText.includes(needle)", arg=needle
    )
    return page.locator("#tr-notice").inner_text()


def shown_step(page) -> int:
    match = re.search(r"step (\d+) / (\d+)", page.locator("#tr-status").inner_text())
    assert match, page.locator("#tr-status").inner_text()
    return int(match.group(1))


def pixels_of(page, selector: str, colour: str) -> int:
    """How many pixels of an element are close to ``colour`` ("#rrggbb"): a plot line's, say."""
    import io

    import numpy as np

    want = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    image = np.asarray(Image.open(io.BytesIO(page.locator(selector).screenshot())).convert("RGB"), dtype=int)
    return int((np.abs(image - want).sum(axis=-1) < 60).sum())


def test_train_tab_starts_watches_stops_resumes_and_finishes(site: dict, page, tmp_path: Path) -> None:
    """A training YAML loaded into the form runs as `eqakit train`: step counter and loss curve update,
    a reloaded page re-attaches, Stop leaves a complete checkpoint, Resume finishes with the adapter;
    a bad value and a used output dir are the CLI's own messages."""
    data = write_toy_dataset(tmp_path / "data")
    out = tmp_path / "run"
    config = train_yaml(tmp_path / "train.yaml", site["model"], data, out)
    page.get_by_role("tab", name="Train").click()
    field(page, "config").fill(str(config))
    page.locator("#tr-load").click()
    page.wait_for_function(
        "out => document.querySelector('#tr-output_dir input, #tr-output_dir textarea').value === out",
        arg=str(out),
    )
    assert "Loaded" in page.locator("#tr-load-status").inner_text()
    page.wait_for_function("() => document.querySelector('#tr-datasets').innerText.includes('24')")
    assert "toy" in page.locator("#tr-datasets").inner_text()
    assert field(page, "per_device_train_batch_size").input_value() == "4"

    field(page, "learning_rate").fill("-1")
    field(page, "learning_rate").press("Tab")
    page.locator("#tr-start").click()
    status = train_notice(page, "Error")
    assert "invalid configuration" in status and "learning_rate" in status, status
    assert not out.exists()
    field(page, "learning_rate").fill("0.01")
    field(page, "learning_rate").press("Tab")

    page.locator("#tr-start").click()
    train_status(page, "Running: step")
    first = shown_step(page)
    page.wait_for_function(
        "first => { const m = document.querySelector('#tr-status').innerText.match(/step (\\d+) \\//);"
        " return m && Number(m[1]) > first; }",
        arg=first,
    )
    page.wait_for_function(
        "() => document.querySelector('#tr-status').innerText.match(/step ([2-9]\\d|\\d{3}) \\//)"
    )  # a few points on the curve
    wait_curve(page, SERIES_COLORS["train"], points=10)
    assert pixels_of(page, "#tr-plot", SERIES_COLORS["train"]) > 100  # the train loss curve is drawn

    page.locator("#tr-stop").click()
    status = train_status(page, "Stopped")
    [checkpoint] = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    total = json.loads((out / "trainer_log.jsonl").read_text().splitlines()[0])["total_steps"]
    assert f"at step {step} of {total}" in status and 0 < step < total, status
    assert (checkpoint / "eqakit_checkpoint_complete").is_file()
    assert not (out / "adapter_model.safetensors").exists()

    # Resume, then Stop while the run still loads: the page points to Resume again, not to Start
    # (issue 27: "nothing to resume; press Start", then Start refused for the checkpoint it found).
    page.locator("#tr-resume").click()
    train_notice(page, "Resumed")
    page.locator("#tr-stop").click()
    status = train_status(page, "press Resume")
    assert f"continue from {checkpoint.name}" in status and "nothing to resume" not in status, status
    page.locator("#tr-start").click()
    refused = train_notice(page, "Error")
    assert f"press Resume to continue from {checkpoint.name}" in refused, refused
    assert "resume_from_checkpoint" not in refused and "overwrite_output_dir" not in refused, refused

    page.locator("#tr-resume").click()
    train_status(page, "Running: step")
    page.reload()  # the run belongs to the server: a new page finds it
    page.get_by_role("tab", name="Train").click()
    page.wait_for_function(
        "out => document.querySelector('#tr-output_dir input, #tr-output_dir textarea').value === out",
        arg=str(out),
    )
    assert field(page, "config").input_value() == str(config)
    status = train_status(page, "Finished")
    assert f"step {total} / {total}" in status and (out / "adapter_model.safetensors").is_file(), status
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps = [r["current_steps"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == total  # one unbroken log across the stop
    assert any("eval_loss" in r for r in records)
    assert "train_loss" in page.locator("#tr-log textarea").input_value()
    wait_curve(page, SERIES_COLORS["eval"], points=3)
    assert pixels_of(page, "#tr-plot", SERIES_COLORS["eval"]) > 30  # and the eval loss curve
    assert "eval loss" in page.locator("#tr-plot").inner_text()
    page.screenshot(path=site["shots"] / "train.png", full_page=True)

    # the step axis shows whole steps, the loss axis short numbers (not 10.5, not 18.151303)
    ticks = page.evaluate("() => [...document.querySelectorAll('#tr-plot svg text')].map(t => t.textContent)")
    numbers = [t.replace(",", "") for t in ticks if re.fullmatch(r"[\d.,]+", t.strip())]
    assert numbers and all(len(n.split(".")[-1]) <= 3 or "." not in n for n in numbers), ticks
    assert page.locator("#tr-evaluate").is_visible()
    page.locator("#tr-evaluate").click()
    page.wait_for_function("out => document.querySelector('#ev-adapter input')?.value === out", arg=str(out))
    page.get_by_role("tab", name="Train").click()

    page.locator("#tr-start").click()
    status = train_notice(page, "Error")
    assert "exists and is not empty" in status and 'tick "Replace a non-empty output dir"' in status, status
    assert "resume_from_checkpoint" not in status, status


def test_webui_given_a_training_config_fills_the_train_tab(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`eqakit webui configs/training_args.yaml` (the tutorial's first step) opens with the Train tab's
    form holding the file's values, command-line overrides applied, and no model loaded."""
    import requests

    data = write_toy_dataset(tmp_path / "data", episodes=1, questions=1)
    config = train_yaml(tmp_path / "train.yaml", tiny_model_dir, data, tmp_path / "run")
    log = tmp_path / "server.log"
    with webui_server([str(config), "lora_rank=4"], log) as url:
        page = requests.get(f"{url}config", timeout=10).json()
        values = {
            c["props"].get("elem_id"): c["props"].get("value") for c in page["components"] if "props" in c
        }
        assert values["tr-config"] == str(config)
        assert values["tr-output_dir"] == str(tmp_path / "run")
        assert values["tr-num_train_epochs"] == 150 and values["tr-lora_rank"] == 4
        assert "toy" in values["tr-datasets"] and "is a training config" in log.read_text()
        assert "No model loaded" in values["model-status"] or "no model" in values["model-status"].lower()
