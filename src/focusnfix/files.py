"""Atomic file writes, and readers of the files users hand in (prompts, JSON, arrays).

Everything the project writes that a crash must not leave half-written (LoRA, checkpoints,
reference cache items, metrics, reports, PNGs) goes through :func:`atomic_write`: the data is
written to a temporary file in the target's directory and moved into place with ``os.replace``,
which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from focusnfix.errors import InputError


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` and move the temporary file to ``path`` (mode 0644), synced to disk:
    a kill or a power cut leaves the old file or the new one, never a part.

    Args:
        path: the final file; its parent directory is created.
        write: writes the whole content to the temporary path it is given.
        suffix: suffix of the temporary file (some writers pick the format from it, e.g. ``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=partial_name(path.name), suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(path.parent)
    return path


#: in the name of every file or folder being written before its rename into place
PARTIAL_MARK = ".partial-"


def partial_name(name: str) -> str:
    """The name prefix of a file or folder being written as ``name`` (a hidden name with
    :data:`PARTIAL_MARK`): what a kill leaves of it is found and removed by :func:`remove_partials`."""
    return f".{name}{PARTIAL_MARK}"


def remove_partials(folder: str | Path) -> list[Path]:
    """Remove what killed writers left in ``folder`` (not its subfolders): files and folders named by
    :func:`partial_name`. Call it only where no other process writes into ``folder`` (a run folder
    under its lock). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if entry.name.startswith(".") and PARTIAL_MARK in entry.name:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def sync_tree(folder: str | Path) -> None:
    """fsync every file in ``folder`` (recursively), then the folders: before a rename publishes them."""
    folder = Path(folder)
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    for d in [*sorted(x for x in folder.rglob("*") if x.is_dir()), folder]:
        _fsync_dir(d)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path``.

    Raises:
        InputError: the path is missing, a directory, or not UTF-8 text; ``what`` names the file's role.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what}: {path} is a directory, expected a file")
    if not path.is_file():
        raise InputError(f"{what}: {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{what}: {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None


def read_json(path: str | Path, what: str, expect: type | tuple[type, ...] = dict) -> Any:
    """The JSON document of ``path``, checked to be an ``expect`` (dict, list or a tuple of them) at the top.

    Raises:
        InputError: missing, not UTF-8, not valid JSON, or another top-level type.
    """
    try:
        doc = json.loads(read_text(path, what))
    except json.JSONDecodeError as err:
        raise InputError(f"{what}: {path} is not valid JSON ({err})") from None
    if not isinstance(doc, expect):
        names = {dict: "an object", list: "a list"}
        kinds = expect if isinstance(expect, tuple) else (expect,)
        kind = " or ".join(names.get(k, k.__name__) for k in kinds)
        raise InputError(f"{what}: {path} must hold {kind} at the top, got {type(doc).__name__}")
    return doc


def read_npz(path: str | Path, what: str) -> dict[str, np.ndarray]:
    """Every array of a ``.npz`` file (loaded eagerly, no pickled objects).

    Raises:
        InputError: missing, or not a readable npz archive of plain arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what}: {path} does not exist")
    if not zipfile.is_zipfile(path) and path.read_bytes()[:6] != b"\x93NUMPY":
        raise InputError(f"{what}: {path} is not an npz archive (a zip of .npy arrays, as numpy.savez writes)")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            arrays = None
        else:
            with data:
                arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{what}: {path} is not a readable npz archive of arrays ({err})") from None
    if arrays is None:
        raise InputError(f"{what}: {path} holds one array, expected an npz archive of named arrays")
    return arrays


def read_prompts_file(path: str | Path, what: str = "prompts file") -> list[str]:
    """Prompts of a UTF-8 text file: one per line; blank lines and lines starting with ``#`` skipped.

    Raises:
        InputError: the file is missing, not UTF-8 text, or holds no prompt; ``what`` names the
            field or option the path came from.
    """
    text = read_text(path, what)
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"{what}: {path} holds no prompts (one prompt per line expected)")
    return prompts


def file_sha256(path: str | Path) -> str:
    """Streamed sha256 of a file (first 16 hex digits): a LoRA's identity in run and evaluation records."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


__all__ = ["PARTIAL_MARK", "atomic_write", "atomic_write_text", "file_sha256", "partial_name", "remove_partials", "sync_tree", "read_json", "read_npz", "read_prompts_file", "read_text"]

