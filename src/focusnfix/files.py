"""Atomic file writes and the one prompt-file reader.

Everything the project writes that a crash must not leave half-written (LoRA, checkpoints,
reference cache items, metrics, reports, PNGs) goes through :func:`atomic_write`: the data is
written to a temporary file in the target's directory and moved into place with ``os.replace``,
which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from focusnfix.errors import InputError


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` and move the temporary file to ``path`` (mode 0644).

    Args:
        path: the final file; its parent directory is created.
        write: writes the whole content to the temporary path it is given.
        suffix: suffix of the temporary file (some writers pick the format from it, e.g. ``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_prompts_file(path: str | Path, what: str = "prompts file") -> list[str]:
    """Prompts of a UTF-8 text file: one per line; blank lines and lines starting with ``#`` skipped.

    Raises:
        InputError: the file is missing, not UTF-8 text, or holds no prompt; ``what`` names the
            field or option the path came from.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what}: {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{what}: {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"{what}: {path} holds no prompts (one prompt per line expected)")
    return prompts


__all__ = ["atomic_write", "atomic_write_text", "read_prompts_file"]
