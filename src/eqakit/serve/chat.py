"""`eqakit chat`: talk to a Qwen-VL model in the terminal, images and videos included.

    eqakit chat configs/infer_openeqa.yaml
    eqakit chat configs/infer_openeqa.yaml temperature=0 max_new_tokens=256

Type a message and press Enter; the answer is printed as it is generated. Commands:

    /image PATH   attach an image to your next message (repeat for several images)
    /video PATH   attach a video file, or a folder of frame images as one video
    /clear        start a new conversation (drops attached images too)
    /exit         quit (Ctrl-D too; Ctrl-C stops an answer in progress)

The model sees every earlier turn, images included, rendered by the same template as in training;
the config's default_system is the system prompt and its generating keys the decoding settings.
A bad path, a file that is not an image or a prompt too long prints a message; the chat goes on.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, TextIO

from eqakit.config import load_config
from eqakit.data.template import strip_thinking
from eqakit.engine import InferenceEngine, Request, load_engine
from eqakit.errors import EqakitError
from eqakit.serve.webui_model import open_image, open_video

COMMANDS = """Commands:
  /image PATH   attach an image to your next message (repeat for several)
  /video PATH   attach a video file, or a folder of frame images as one video
  /clear        start a new conversation
  /exit         quit"""


class ChatSession:
    """One terminal conversation: the turns so far and the images waiting for the next message."""

    def __init__(self, engine: InferenceEngine, out: TextIO) -> None:
        self.engine = engine
        self.out = out
        self.messages: list[dict[str, Any]] = []
        self.attached: list[dict[str, Any]] = []  # image and video parts for the next message

    def say(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=self.out, flush=True)

    def handle(self, line: str) -> bool:
        """Act on one input line; False means the user asked to leave."""
        text = line.strip()
        if not text:
            return True
        command, _, argument = text.partition(" ")
        if command == "/exit":
            return False
        if command == "/clear":
            self.messages, self.attached = [], []
            self.say("Conversation cleared.")
        elif command in ("/image", "/video"):
            self.attach(argument.strip(), command[1:])
        elif command == "/help":
            self.say(COMMANDS)
        elif re.fullmatch(r"/[a-z]+", command):
            self.say(f"Unknown command {command}. {COMMANDS}")
        else:
            self.ask(text)
        return True

    def attach(self, argument: str, kind: str = "image") -> None:
        path = argument.strip("'\"")  # terminals quote dragged-in paths
        if not path:
            self.say(f"Usage: /{kind} PATH")
            return
        try:
            if kind == "image":
                self.attached.append({"type": "image", "image": open_image(Path(path).expanduser())})
            else:
                folder = Path(path).expanduser()
                video = sorted(str(p) for p in folder.iterdir() if p.is_file()) if folder.is_dir() else path
                self.attached.append({"type": "video", "video": open_video(video, self.engine.format.video)})
        except EqakitError as exc:
            self.say(f"Error: {exc}. The {kind} was not attached.")
            return
        counts = [
            f"{n} {kind}{'s' if n > 1 else ''}"
            for kind in ("image", "video")
            if (n := sum(part["type"] == kind for part in self.attached))
        ]
        self.say(f"Attached {Path(path).name} ({' and '.join(counts)} for your next message).")

    def request(self, text: str) -> Request:
        """The engine request for the next turn: the conversation so far, then ``text`` with the
        attached images (the config's default_system applies; decoding settings are the config's)."""
        user = {"role": "user", "content": [*self.attached, {"type": "text", "text": text}]}
        return Request([*self.messages, user], self.engine.params())

    def ask(self, text: str) -> None:
        """Stream the answer to ``text`` (with the attached images); a failed turn leaves no trace."""
        request = self.request(text)
        user = request.messages[-1]
        self.attached = []
        try:
            stream = self.engine.stream(request)
        except EqakitError as exc:
            self.say(f"Error: {exc}. The message was not sent.")
            return
        self.say("Assistant: ", end="")
        reply = ""
        try:
            for delta in stream:
                reply += delta
                self.say(delta, end="")
        except KeyboardInterrupt:
            self.say(" [stopped]")
        else:
            self.say()
        self.messages += [user, {"role": "assistant", "content": strip_thinking(reply)}]


def run(session: ChatSession) -> None:
    """Read commands and messages from stdin (with line editing on a terminal) until /exit or EOF."""
    session.say(f"Chatting with {session.engine.format.template}. {COMMANDS}")
    while True:
        try:
            line = input("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            session.say()
            return
        if not session.handle(line):
            return


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="eqakit chat",
        description="Chat with a Qwen-VL model in the terminal (streaming, images, videos).",
    )
    parser.add_argument("config", help="YAML config naming the model (LLaMA-Factory keys)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that override the config")
    args = parser.parse_args(argv)
    cfg = load_config("infer", args.config, args.overrides)
    print(f"eqakit chat: loading {cfg.model.model_name_or_path} ...", file=sys.stderr, flush=True)
    engine = load_engine(cfg)
    try:
        run(ChatSession(engine, sys.stdout))
    finally:
        engine.shutdown()
    return 0
