"""Atomic file writes, their temporary names and the cleanup of stale temporaries.

Every file the project writes for others to read (features, labels, manifests,
checkpoints, exported graphs, reports) is written the same way: under a
temporary name in its own folder, flushed to disk (``fsync``), then renamed
over the final name (``os.replace``). A reader, or a process killed at any
moment, sees the old file or the new one, never half of one.

One temporary-name scheme: ``.NAME.PID.tmp`` (``.NAME.PID-TAG.tmp`` when one
writer needs several temporaries for the same file), hidden, next to NAME, PID
being the writing process. A killed writer cannot remove its temporary;
:func:`remove_stale_temporaries` deletes those of NAME whose process no longer
exists, and keeps those of running processes (they may be writing NAME now).
PIDs are those of this machine: on a folder shared by several machines, a
temporary left by a killed process elsewhere is removed only when no process
here has that PID.

Use :func:`atomic_write_bytes` / ``_text`` / ``_json`` / :func:`atomic_save_npy`
for data in memory, :func:`atomic_path` for libraries that write a file
themselves (``torch.save``, ``safetensors``, ``onnx``), and
:func:`pending_file` when several files must be renamed in a chosen order.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
from typing import Iterator, List, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]
SUFFIX = ".tmp"
_TAG = re.compile(r"^[A-Za-z0-9_]+$")


# ---------------------------------------------------------------- names
def temporary_path(path: PathLike, tag: str = "", pid: Optional[int] = None) -> str:
    """``.NAME.PID.tmp`` (or ``.NAME.PID-TAG.tmp``) next to ``path``, for this process by default."""
    folder, name = os.path.split(os.fspath(path))
    if not name:
        raise ValueError(f"{path!r} names a folder, not a file")
    if tag and not _TAG.match(tag):
        raise ValueError(f"temporary tag {tag!r}: letters, digits and _ only")
    pid = os.getpid() if pid is None else int(pid)
    return os.path.join(folder, f".{name}.{pid}{'-' + tag if tag else ''}{SUFFIX}")


def temporary_owner(entry: str, name: str) -> Optional[int]:
    """The PID in ``entry`` if it is a temporary of ``name`` (both plain file names), else None.

    The PID is the last dot-separated part before ``.tmp``, so the temporaries
    of ``a`` and of ``a.7`` are never mistaken for each other.
    """
    prefix = f".{name}."
    if not (entry.startswith(prefix) and entry.endswith(SUFFIX)) or len(entry) <= len(prefix) + len(SUFFIX):
        return None
    pid, _, tag = entry[len(prefix):-len(SUFFIX)].partition("-")
    if not (pid.isascii() and pid.isdigit()) or (tag and not _TAG.match(tag)):
        return None
    return int(pid)


def process_exists(pid: int) -> bool:
    """True if a process with this PID runs on this machine (whoever owns it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def remove_stale_temporaries(path: PathLike) -> List[str]:
    """Delete the temporaries of ``path`` left by processes that no longer exist; return them.

    Temporaries of running processes (this one included) are kept.
    """
    folder, name = os.path.split(os.fspath(path))
    removed = []
    for full in glob.glob(os.path.join(glob.escape(folder or "."), f".{glob.escape(name)}.*{SUFFIX}")):
        pid = temporary_owner(os.path.basename(full), name)
        if pid is None or pid == os.getpid() or process_exists(pid):
            continue
        try:
            os.unlink(full)
        except FileNotFoundError:
            continue  # another cleaner was first
        removed.append(full)
    return removed


# ---------------------------------------------------------------- durability
def fsync_file(path: PathLike) -> None:
    """Flush ``path``'s data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: PathLike) -> None:
    """Flush a folder's entries (renames into it) to disk, where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders
    finally:
        os.close(fd)


def commit(tmp: PathLike, path: PathLike) -> None:
    """fsync ``tmp``, then rename it over ``path`` in one step."""
    fsync_file(tmp)
    os.replace(tmp, path)


def discard(tmp: PathLike) -> None:
    """Remove a temporary if it is there."""
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- writers
class PendingFile:
    """A temporary for ``final`` (``.path``) that becomes ``final`` on :meth:`commit`."""

    def __init__(self, final: PathLike, tag: str = "", makedirs: bool = True):
        self.final = os.fspath(final)
        if makedirs:
            os.makedirs(os.path.dirname(os.path.abspath(self.final)), exist_ok=True)
        self.path = temporary_path(self.final, tag)
        self.committed = False

    def commit(self) -> None:
        commit(self.path, self.final)
        self.committed = True

    def discard(self) -> None:
        if not self.committed:
            discard(self.path)


@contextlib.contextmanager
def pending_file(path: PathLike, tag: str = "", makedirs: bool = True) -> Iterator[PendingFile]:
    """Yield a :class:`PendingFile`; write ``.path``, call ``.commit()`` when complete. Whatever
    was not committed when the block ends (normally or by an exception) is deleted."""
    pending = PendingFile(path, tag, makedirs)
    try:
        yield pending
    finally:
        pending.discard()


@contextlib.contextmanager
def atomic_path(path: PathLike, makedirs: bool = True) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s new content to; it replaces ``path`` when the
    block ends normally and is deleted if the block raises.

    >>> with atomic_path("model.safetensors") as tmp:   # doctest: +SKIP
    ...     safetensors.torch.save_file(state, tmp)
    """
    with pending_file(path, makedirs=makedirs) as pending:
        yield pending.path
        pending.commit()


def atomic_write_bytes(path: PathLike, data: bytes, makedirs: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (creating its folder by default)."""
    with atomic_path(path, makedirs) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: PathLike, text: str, makedirs: bool = True) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically (no newline translation)."""
    atomic_write_bytes(path, text.encode("utf-8"), makedirs)


def json_text(obj, indent: Optional[int] = 2, sort_keys: bool = True) -> str:
    """The project's JSON file layout: ``indent`` 2, sorted keys (same data -> same bytes), final newline."""
    return json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n"


def atomic_write_json(path: PathLike, obj, indent: Optional[int] = 2, sort_keys: bool = True,
                      makedirs: bool = True) -> None:
    """Write ``obj`` as JSON (see :func:`json_text`) to ``path`` atomically."""
    atomic_write_text(path, json_text(obj, indent, sort_keys), makedirs)


def atomic_save_npy(path: PathLike, array, makedirs: bool = True) -> None:
    """``numpy.save`` ``array`` to ``path`` (a .npy file, name kept as given) atomically."""
    import numpy as np

    with atomic_path(path, makedirs) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def create_exclusive(path: PathLike, data: bytes) -> bool:
    """Create ``path`` with ``data``, complete, unless it exists: True if this call created it.

    Concurrent callers agree on one file: the content is written to a temporary
    and hard-linked to ``path``, which fails if another caller was first.
    """
    with pending_file(path) as pending:
        with open(pending.path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(pending.path, pending.final)
        except FileExistsError:
            return False
    return True
