"""Crash-safe outputs of ``mert-extract``: feature files, the manifest, the settings record.

Every feature file is built under a temporary name next to its final path
(``.NAME.npy.PID.tmp``, see :mod:`mert_plugin.atomic`) and renamed into place
only when complete, so a killed run leaves either a finished ``.npy`` or
nothing under the final name. The temporaries of a killed run are removed when
that output is next worked on.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from mert_plugin.atomic import (atomic_save_npy, atomic_write_text, commit, create_exclusive, discard, json_text,
                                remove_stale_temporaries, temporary_path)
from mert_plugin.errors import MERTError


class FeatureWriter:
    """Receives stitched frames of one track and writes ``final`` (.npy) atomically.

    ``pooling="none"``: [L, T, D] with T unknown until the end. Layer 0 goes
    straight into the temporary .npy after a reserved header, layers 1..L-1
    into spool files appended at the end, so memory stays at one window.
    ``pooling="mean"``: a running float64 sum -> [L, D].
    """

    HEADER_BYTES = 256  # reserved .npy v1 header (a multiple of 64, room for any shape)

    def __init__(self, final: str, num_layers: int, dim: int, pooling: str = "none", dtype=np.float32):
        self.final, self.layers, self.dim, self.pooling = final, num_layers, dim, pooling
        self.dtype = np.dtype(dtype)
        self.frames = 0
        self._files: List = []
        self._paths: List[str] = []
        self._sum: Optional[np.ndarray] = None
        os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
        remove_stale_temporaries(final)
        if pooling == "none":
            for layer in range(num_layers):
                path = temporary_path(final, "" if layer == 0 else f"layer{layer}")
                f = open(path, "wb")
                self._paths.append(path)
                self._files.append(f)
            self._files[0].write(b"\0" * self.HEADER_BYTES)

    def write(self, start: int, states: np.ndarray) -> None:
        """``states`` [L, t, D] for global frames [start, start + t); must arrive in order."""
        if start != self.frames:
            raise RuntimeError(f"{self.final}: frames must arrive in order (expected {self.frames}, got {start})")
        if self.pooling == "mean":
            part = states.sum(axis=1, dtype=np.float64)
            self._sum = part if self._sum is None else self._sum + part
        else:
            block = np.ascontiguousarray(states, dtype=self.dtype)
            for layer, f in enumerate(self._files):
                f.write(block[layer].tobytes())
        self.frames += states.shape[1]

    def commit(self, expected_frames: int) -> tuple:
        """Finish, check the frame count, rename into place; returns the array shape."""
        if self.frames != expected_frames:
            self.abort()
            raise RuntimeError(f"{self.final}: wrote {self.frames} frames, expected {expected_frames}")
        if self.pooling == "mean":
            arr = (self._sum / max(self.frames, 1)).astype(self.dtype)
            atomic_save_npy(self.final, arr)
            return arr.shape
        shape = (self.layers, self.frames, self.dim)
        main = self._files[0]
        for path, f in zip(self._paths[1:], self._files[1:]):
            f.close()
            with open(path, "rb") as src:
                while True:
                    buf = src.read(1 << 24)
                    if not buf:
                        break
                    main.write(buf)
            os.unlink(path)
        main.seek(0)
        main.write(_npy_header(shape, self.dtype, self.HEADER_BYTES))
        main.close()
        self._files = []
        commit(self._paths[0], self.final)
        return shape

    def abort(self) -> None:
        """Drop everything written so far (nothing appears under the final name)."""
        for f in self._files:
            f.close()
        self._files = []
        for p in self._paths:
            discard(p)


def _npy_header(shape: Sequence[int], dtype: np.dtype, total: int) -> bytes:
    """A .npy v1.0 header padded to exactly ``total`` bytes."""
    d = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.lib.format.dtype_to_descr(dtype), tuple(shape))
    body_len = total - 10  # magic (6) + version (2) + header length (2)
    if len(d) + 1 > body_len:
        raise RuntimeError(f"shape {shape} does not fit the reserved .npy header")
    body = d + " " * (body_len - len(d) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + body.encode("latin1")


def npy_shape(path: str) -> Optional[tuple]:
    """Shape of a finished .npy (header only), or None if it is not a readable .npy."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
        return tuple(shape)
    except Exception:
        return None


# ------------------------------------------------------------------ manifest
class Manifest:
    """Append-only JSON-lines record of every input: ``{"input", "output", "status", ...}``.

    One line per finished or failed input, written with a single ``write`` and
    flushed; a line cut short by a kill is ignored when read back.
    """

    def __init__(self, path: str, truncate: bool = False):
        self.path = path
        self.ok_outputs = set()
        if truncate and os.path.exists(path):
            os.unlink(path)
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            self.ok_outputs = _ok_outputs(data)
            needs_newline = bool(data) and not data.endswith(b"\n")
        else:
            needs_newline = False
        self._f = open(path, "ab")
        if needs_newline:  # terminate a line cut short by a kill
            self._f.write(b"\n")

    def add(self, record: Dict) -> None:
        self._f.write((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
        self._f.flush()
        if record.get("status") == "ok":
            self.ok_outputs.add(record.get("output"))

    def close(self) -> None:
        self._f.close()


def _ok_outputs(data: bytes) -> set:
    """The outputs that manifest lines ``data`` record as ok (a line cut short by a kill is skipped)."""
    out = set()
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("status") == "ok":
            out.add(rec.get("output"))
    return out


def ok_outputs_in(folder: str) -> set:
    """Outputs recorded as ok by any manifest of ``folder`` (``manifest.jsonl`` and every shard's
    ``manifest.shardIofN.jsonl``), read as they are now (other shards may still be appending)."""
    out = set()
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "manifest*.jsonl"))):
        try:
            with open(path, "rb") as f:
                out |= _ok_outputs(f.read())
        except OSError:  # removed meanwhile, or unreadable: it records nothing we can rely on
            continue
    return out


def check_settings(path: str, settings: Dict, overwrite: bool = False) -> None:
    """Record ``settings`` in ``path`` (first run) or check they match (resumed run).

    Resuming with other settings would mix features of two kinds in one
    folder, so it is refused unless ``overwrite``. Creation is atomic, so
    concurrent shards agree on one record.
    """
    text = json_text(settings)
    if overwrite:
        atomic_write_text(path, text)
        return
    if not os.path.exists(path):
        create_exclusive(path, text.encode("utf-8"))  # another shard may have been first: then compare
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as exc:
        raise MERTError(f"{path}: cannot read the settings of the earlier run ({exc}); "
                        "use --overwrite to start afresh") from None
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        details = "; ".join(f"{k}: {old.get(k)!r} then, {settings.get(k)!r} now" for k in diff)
        raise MERTError(f"{os.path.dirname(path) or '.'} holds features made with other settings ({details}); "
                        "use another --output-dir, or --overwrite to recompute everything")
