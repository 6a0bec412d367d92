"""Filesystem steps shared by the verbs that write: atomic file writes, swapping in finished
directories, and one clear line when the disk is full."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from eqakit.errors import EqakitError

# A write refused by the disk, not by a bug: full, over quota, over the file size limit, read-only.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
# How libraries that do not raise OSError word it: Rust's std::io (tokenizers, safetensors) says
# "(os error 28)"; torch.save's stream writer drops the errno.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_DISK_WORDS = {
    os.strerror(errno.ENOSPC): os.strerror(errno.ENOSPC),
    os.strerror(errno.EDQUOT): os.strerror(errno.EDQUOT),
    "file write failed": "a file write failed (most often a full disk)",
}


class DiskFull(EqakitError):
    """A stage could not write its output: the disk (or quota) is full or refuses writes."""

    label = "cannot write"


def disk_failure(error: BaseException) -> str | None:
    """Why ``error`` (or an exception it was raised from) is a write refused by the disk, else None."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS:
            return os.strerror(cause.errno)
        text = str(cause)
        code = _RUST_OS_ERROR.search(text)
        if code and int(code.group(1)) in DISK_ERRNOS:
            return os.strerror(int(code.group(1)))
        for words, reason in _DISK_WORDS.items():
            if words in text:
                return reason
        cause = cause.__cause__ or cause.__context__
    return None


@contextmanager
def disk_errors(directory: str | os.PathLike[str], then: Callable[[], str]) -> Iterator[None]:
    """A write refused by the disk inside this block becomes one line (`DiskFull`): the directory
    being written, what to free, and ``then()``: what running the command again will do (what was
    kept). Other errors pass through unchanged."""
    try:
        yield
    except Exception as exc:
        reason = disk_failure(exc)
        if reason is None:
            raise
        raise DiskFull(
            f"{directory}: {reason}. Free space on its disk (df -h {directory}), then run the same "
            f"command again: {then()}"
        ) from None


_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` so that readers see the old content or the new, never half of it.

    The text goes to a hidden ``.NAME.XXXX.tmp`` file in the same directory (created with the
    umask's permissions, as ``open`` would, not mkstemp's 0600), is flushed and fsynced, then
    renamed over ``path``; the directory is fsynced too where the OS allows it, so the rename
    survives a crash. On any failure the temporary file is removed and ``path`` is untouched.
    """
    return _write_atomic(Path(path), text, "w", encoding)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """:func:`write_text_atomic` for bytes (a rendered PNG, ...)."""
    return _write_atomic(Path(path), data, "wb", None)


def _write_atomic(path: Path, data: str | bytes, mode: str, encoding: str | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _create_temp(path: Path) -> tuple[int, Path]:
    """An exclusive new file beside ``path``; mode 0o666 lets the kernel apply the umask (no umask race)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o666), tmp
        except FileExistsError:
            continue


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; a no-op where directories cannot be opened (Windows)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the data itself is already synced
    finally:
        os.close(fd)


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
