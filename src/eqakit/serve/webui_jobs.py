"""Long jobs the web UI starts (train, predict, export): an eqakit command in a process of its own.

The page stays responsive, the job's memory is returned when it ends, and its log (progress bars
included: they rewrite their line with \\r) is shown as it goes. The config the page's fields stand
for is written to a YAML file and given to the same command a user would type, so the page does
exactly what the CLI does, with the CLI's messages (its warnings picked out for the status line).
Terminal control codes (a nested progress bar moving the cursor up) are removed. The command's output goes to a file rather than
a pipe, so a job outlives the page that started it, and a web UI that exits mid-run does not break
the job's writes (Ctrl-C on the web UI reaches the job too: training then stops at a checkpoint).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from eqakit.serve.webui_model import UIError

LOG_LINES = 12  # log lines a page shows while a job runs
LOG_TAIL_BYTES = 64_000  # how much of a job's log is read for them
WARNING = "eqakit: warning: "  # how every eqakit command starts a warning line (on stderr)
# ANSI escape sequences: colours, cursor moves (tqdm's "\x1b[A" for a bar above), erasing a line
TERMINAL_CODES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


class Command:
    """``eqakit VERB config.yaml`` started now, its config and log in a folder of its own."""

    def __init__(self, verb: str, keys: dict[str, Any]) -> None:
        self.verb = verb
        self.folder = Path(tempfile.mkdtemp(prefix=f"eqakit-webui-{verb}-"))
        config = self.folder / f"{verb}.yaml"
        config.write_text(yaml.safe_dump(keys, sort_keys=True, allow_unicode=True), encoding="utf-8")
        self.log = self.folder / "log.txt"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "eqakit", verb, str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def lines(self) -> list[str]:
        """The non-empty lines at the end of the log (a progress bar's redraws are lines of their own)."""
        try:
            with self.log.open("rb") as f:
                f.seek(max(f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES, 0))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return []
        text = TERMINAL_CODES.sub("", text).replace("\r", "\n")
        return [part.rstrip() for part in text.split("\n") if part.strip()]

    def failure(self) -> str:
        """What the command said when it failed: its "eqakit VERB: ..." message (all its lines)."""
        lines = self.lines()
        start = next(
            (i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith(f"eqakit {self.verb}: ")), None
        )
        if start is None:
            return lines[-1] if lines else f"eqakit {self.verb} exited with status {self.returncode}"
        return "\n".join(lines[start:]).removeprefix(f"eqakit {self.verb}: ").removeprefix("error: ")

    def stop(self) -> None:
        """SIGTERM: training finishes its step and saves a checkpoint; a second one ends it at once."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)

    def remove(self) -> None:
        """Delete the config and log (the process keeps its open files)."""
        shutil.rmtree(self.folder, ignore_errors=True)


class Job:
    """Runs ``eqakit VERB config.yaml`` one at a time and reports its log as it comes."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self._busy = threading.Lock()

    def run(self, keys: dict[str, Any]) -> Iterator[list[str]]:
        """The log so far (non-empty lines), every half second and once more at the end; raises
        UIError with the command's message when it fails."""
        if not self._busy.acquire(blocking=False):
            raise UIError(f"an {self.verb} is already running; wait for it to finish")
        command = None
        try:
            command = Command(self.verb, keys)
            while command.running:
                yield command.lines()
                time.sleep(0.5)
            if command.returncode != 0:
                raise UIError(command.failure())
            yield command.lines()
        finally:
            if command is not None:
                command.remove()
            self._busy.release()


def warnings(lines: list[str]) -> list[str]:
    """The warnings among a command's log lines, without their "eqakit: warning: " prefix."""
    return [line.removeprefix(WARNING) for line in lines if line.startswith(WARNING)]


def tail(lines: list[str]) -> str:
    return "\n".join(lines[-LOG_LINES:])
