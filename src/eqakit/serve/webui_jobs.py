"""Long jobs the web UI starts (export, predict): an eqakit command in a process of its own.

The page stays responsive, the job's memory is returned when it ends, and its log (progress bars
included: they rewrite their line with \\r) is shown as it goes. One job of a kind runs at a time.
The config the page's fields stand for is written to a temporary YAML file and given to the same
command a user would type, so the page does exactly what the CLI does, with the CLI's messages.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from eqakit.serve.webui_model import UIError

LOG_LINES = 12  # log lines a page shows while a job runs


class Job:
    """Runs ``eqakit VERB config.yaml`` one at a time and reports its log as it comes."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self._busy = threading.Lock()

    def run(self, keys: dict[str, Any]) -> Iterator[list[str]]:
        """The log so far (non-empty lines), every half second and once more at the end; raises
        UIError with the command's last line when it fails."""
        if not self._busy.acquire(blocking=False):
            raise UIError(f"an {self.verb} is already running; wait for it to finish")
        try:
            with tempfile.TemporaryDirectory(prefix=f"eqakit-webui-{self.verb}-") as tmp:
                config = Path(tmp) / f"{self.verb}.yaml"
                config.write_text(yaml.safe_dump(keys, sort_keys=True), encoding="utf-8")
                process = subprocess.Popen(
                    [sys.executable, "-m", "eqakit", self.verb, str(config)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                )
                lines: deque[str] = deque(maxlen=500)
                reader = threading.Thread(target=_read, args=(process, lines), daemon=True)
                reader.start()
                while process.poll() is None:
                    yield list(lines)
                    time.sleep(0.5)
                reader.join(timeout=10)
            if process.returncode != 0:
                raise UIError(
                    lines[-1] if lines else f"eqakit {self.verb} exited with status {process.returncode}"
                )
            yield list(lines)
        finally:
            self._busy.release()


def _read(process: subprocess.Popen, lines: deque[str]) -> None:
    assert process.stdout is not None
    for chunk in process.stdout:
        lines.extend(part.rstrip() for part in chunk.replace("\r", "\n").split("\n") if part.strip())


def tail(lines: list[str]) -> str:
    return "\n".join(lines[-LOG_LINES:])
