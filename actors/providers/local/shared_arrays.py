"""Read-only model arrays that every process of a node maps from one file.

Each session is its own Ray worker, with no fork server to share what one
process loaded: an array read into each process is private memory in each
(issue 13 item 5: a live session actor ≤ 60 MB USS). Arrays mapped from the
same file are one copy in the page cache, counted as shared once two
processes map them: Silero's prepared weights, 1.4 MB a session read into
each, cost a session nothing this way (docs/benchmarks.md, "A session
worker under 60 MB by default").

The file lives in this user's private directory (actors/private_dir.py): the
arrays are a model's weights, so whoever can write there decides what the
model computes. It is written whole under a temporary name and renamed into
place, so a reader sees either no file or a complete one; one that does not
parse, or whose size does not match its header, is rebuilt. Without a
private directory, or when the file cannot be written, the arrays are
built in this process's memory instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from actors.private_dir import private_dir

log = logging.getLogger(__name__)

MAGIC = b"VA-ARRAYS-1\n"
MAX_HEADER_BYTES = 16 << 10
"""A header names a few arrays and their shapes; anything larger is not one of these files."""
_ALIGN = 64


def shared_arrays(name: str, build: Callable[[], dict[str, np.ndarray]],
                  supersedes: str = "") -> dict[str, np.ndarray]:
    """`build()`'s float32 arrays, mapped read-only from `<private dir>/arrays/<name>`
    (written from `build()` the first time); `name` should change whenever
    what `build` returns would (a version, the source file's size and mtime).
    `supersedes`: the name prefix of the older versions this one replaces,
    removed once it is written (a reinstalled model would otherwise leave
    each old file behind; a process mapping one keeps its mapping)."""
    base = private_dir("shared model weights")
    if base is None:
        return build()
    directory = base / "arrays"
    with contextlib.suppress(OSError):  # cannot be made: written nowhere, kept in memory below
        directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / name
    with contextlib.suppress(OSError, ValueError, TypeError):  # none yet, or not a whole one: rebuilt
        return _mapped(path)
    arrays = build()
    try:
        _write(path, arrays)
        if supersedes:
            _remove_older(directory, supersedes, name)
        return _mapped(path)
    except OSError as e:  # a full or read-only disk costs memory, not the model
        log.warning("%s not shared (%s): kept in this process", name, e)
        return arrays


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    entries, offset = [], 0
    for key, array in arrays.items():
        entries.append([key, list(array.shape), offset])
        offset += array.size
    header = json.dumps(entries).encode()
    start = _data_offset(len(header))
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(header)) + header)
            f.write(bytes(start - f.tell()))
            for array in arrays.values():
                f.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _remove_older(directory: Path, prefix: str, current: str) -> None:
    for older in directory.glob(f"{prefix}*"):
        if older.name != current:
            with contextlib.suppress(OSError):
                older.unlink()


def _data_offset(header_bytes: int) -> int:
    return -(-(len(MAGIC) + 4 + header_bytes) // _ALIGN) * _ALIGN


def _mapped(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the file at `path`; ValueError if it is not a whole one."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 4)
        if len(head) != len(MAGIC) + 4 or not head.startswith(MAGIC):
            raise ValueError(f"{path} is not an arrays file")
        (size,) = struct.unpack("<I", head[len(MAGIC):])
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header of {size} bytes")
        entries = json.loads(f.read(size))
        total = os.fstat(f.fileno()).st_size
    start = _data_offset(size)
    count = sum(int(np.prod(shape)) for _, shape, _ in entries)
    if total != start + 4 * count:
        raise ValueError(f"{path} is {total} bytes, its header says {start + 4 * count}")
    flat = np.memmap(path, dtype="<f4", mode="r", offset=start, shape=(count,)).view(np.ndarray)
    return {key: flat[offset:offset + int(np.prod(shape))].reshape(shape) for key, shape, offset in entries}
