"""Filesystem steps shared by every verb that writes a directory (tiny-model, synth, export)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename a finished staging directory to ``output_dir``, replacing what is there last.

    The old contents are moved aside first and put back if the final rename fails, so at every
    moment ``output_dir`` is either the old complete directory or the new one.
    """
    if output_dir.is_dir() and any(output_dir.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".old", dir=output_dir.parent))
        os.replace(output_dir, old)  # replaces the empty placeholder `old`
        try:
            os.replace(staging, output_dir)
        except OSError:
            os.replace(old, output_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output_dir)  # an empty directory can be replaced in one rename
