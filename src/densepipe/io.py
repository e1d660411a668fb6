"""Atomic file output: write to a temp file beside the target, then rename, so a
failed or killed stage never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes its file 0600; the renamed output gets what a plain open() would have given it.
_FILE_MODE = 0o666 & ~_umask()


class UnreadableFile(ValueError):
    """An input file that exists but cannot be read as what it should be (damaged, truncated,
    another kind of file): named with the stage that writes it."""


def read_or_explain(path: str | Path, reader: Callable[[Path], object], what: str, remedy: str):
    """reader(path), with any failure but a missing file turned into an UnreadableFile."""
    path = Path(path)
    try:
        return reader(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001  (whatever the format's reader raises on bad bytes)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnreadableFile(f"{path} cannot be read as {what} ({detail}); {remedy}") from None


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _FILE_MODE)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text(path: str | Path, text: str) -> None:
    write_with(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def write_bytes(path: str | Path, data: bytes) -> None:
    write_with(path, lambda p: p.write_bytes(data))
