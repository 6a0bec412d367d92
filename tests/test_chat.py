"""`eqakit chat` driven through stdin like a person at a terminal: a real process, the tiny model.

Each answer must be the engine's greedy answer to the conversation so far (computed here), which
differs when an attached image or the history is lost; each reply is read before the next line is
typed, so the answer must reach the terminal while the chat is still waiting for input.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from eqakit.config import load_config
from eqakit.engine import HFEngine
from test_webui import chatty_model_dir  # noqa: F401  (a fixture: the tiny model with visible answers)

pytestmark = pytest.mark.slow


class Terminal:
    """A process whose stdout is collected as it comes; `expect` waits for text after what was read."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(  # a session of its own: a failed test kills its children too
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.output = ""
        self.read = 0
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        while chunk := os.read(self.process.stdout.fileno(), 4096):
            self.output += chunk.decode("utf-8", errors="replace")

    def type(self, line: str) -> None:
        self.process.stdin.write(f"{line}\n".encode())
        self.process.stdin.flush()

    def expect(self, text: str, timeout: float = 60.0) -> str:
        """The output from the last match up to and including ``text``."""
        deadline = time.monotonic() + timeout
        while (found := self.output.find(text, self.read)) < 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                os.killpg(self.process.pid, signal.SIGKILL)  # children would hold stderr open
                pytest.fail(
                    f"{text!r} not printed; output:\n{self.output}\nstderr:\n{self.process.stderr.read()}"
                )
            time.sleep(0.02)
        start, self.read = self.read, found + len(text)
        return self.output[start : self.read]


def user(text: str, *images: Image.Image) -> dict:
    return {
        "role": "user",
        "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}],
    }


@pytest.mark.parametrize(
    ("model", "template"),
    [("chatty_model_dir", "qwen3_vl_nothink"), ("lively_qwen2_5_dir", "qwen2_vl")],
    ids=["qwen3_vl", "qwen2_5_vl"],
)
def test_chat_streams_images_clear_and_bad_input(request, model: str, template: str, tmp_path: Path) -> None:
    model_dir = request.getfixturevalue(model)
    config = tmp_path / "chat.yaml"
    config.write_text(
        f"model_name_or_path: {model_dir}\ntemplate: {template}\nmax_new_tokens: 12\ntemperature: 0\n"
    )
    red = Image.new("RGB", (96, 72), (200, 200, 200))
    ImageDraw.Draw(red).ellipse([20, 12, 68, 60], fill=(220, 30, 30))
    red.save(tmp_path / "red.png")
    (tmp_path / "notes.txt").write_text("not an image")

    chat = Terminal([sys.executable, "-m", "eqakit", "chat", str(config)])
    reference = HFEngine.from_config(load_config("infer", config))
    first = user("What is this?", red)
    one = reference.chat([first]).text
    history = [first, {"role": "assistant", "content": one}, user("Tell me more.")]
    two = reference.chat(history).text
    fresh = reference.chat([user("Tell me more.")]).text
    assert len({one, two, fresh}) == 3, "the test needs answers that depend on the conversation"

    chat.expect("/exit")  # the banner lists the commands
    chat.type(f"/image {tmp_path / 'missing.png'}")
    assert "Error: missing.png: cannot read" in chat.expect("not attached.")
    chat.type(f"/image '{tmp_path / 'notes.txt'}'")  # quoted, as terminals paste dragged files
    assert "notes.txt: the data is not a png, jpeg, webp, gif or bmp image" in chat.expect("not attached.")
    chat.type(f"/image {tmp_path / 'red.png'}")
    chat.expect("Attached red.png (1 image for your next message).")

    chat.type("What is this?")
    chat.expect(f"Assistant: {one}\n")
    chat.type("Tell me more.")  # the first turn, image included, stays in the conversation
    chat.expect(f"Assistant: {two}\n")
    chat.type("/clear")
    chat.expect("Conversation cleared.")
    chat.type("Tell me more.")
    chat.expect(f"Assistant: {fresh}\n")

    # a folder of frames is one video; a missing video file is one error line
    from eqakit.serve.webui_model import open_video

    frames = tmp_path / "frames"
    frames.mkdir()
    for k, color in enumerate(((220, 30, 30), (30, 30, 220), (30, 180, 30))):
        Image.new("RGB", (64, 48), color).save(frames / f"{k:03d}.png")
    chat.type("/clear")
    chat.expect("Conversation cleared.")
    chat.type(f"/video {tmp_path / 'missing.mp4'}")
    assert "missing.mp4: video file not found" in chat.expect("not attached.")
    chat.type(f"/video {frames}")
    chat.expect("Attached frames (1 video for your next message).")
    video = open_video(sorted(str(p) for p in frames.iterdir()), reference.format.video)
    seen = reference.chat(
        [
            {
                "role": "user",
                "content": [{"type": "video", "video": video}, {"type": "text", "text": "What happens?"}],
            }
        ]
    )
    chat.type("What happens?")
    chat.expect(f"Assistant: {seen.text}\n")
    chat.type("/exit")
    assert chat.process.wait(timeout=30) == 0
    assert "Traceback" not in chat.output + chat.process.stderr.read().decode()
