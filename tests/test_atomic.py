"""mert_plugin.atomic: writes are all-or-nothing, one temporary-name scheme, stale temporaries of dead
processes only are removed."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mert_plugin import atomic

ATOMIC_PY = atomic.__file__


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid now belongs to no process
    assert not atomic.process_exists(proc.pid)
    return proc.pid


def _temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(atomic.SUFFIX))


def test_writers_round_trip_and_leave_no_temporaries(tmp_path):
    atomic.atomic_write_bytes(tmp_path / "new" / "deep" / "b.bin", b"\x00\x01")  # creates the folders
    atomic.atomic_write_text(tmp_path / "t.csv", "a,b\r\nc\n")
    atomic.atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]})
    atomic.atomic_write_json(tmp_path / "k.json", {"b": 1, "a": 2}, sort_keys=False)
    atomic.atomic_save_npy(tmp_path / "x.npy", np.arange(6, dtype=np.int16).reshape(2, 3))
    with atomic.atomic_path(tmp_path / "lib.out") as tmp:
        assert os.path.basename(tmp) == f".lib.out.{os.getpid()}.tmp" and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "w") as f:  # as torch.save / safetensors / onnx would
            f.write("made by a library")

    assert (tmp_path / "new" / "deep" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.csv").read_bytes() == b"a,b\r\nc\n"  # no newline translation
    assert (tmp_path / "j.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert list(json.loads((tmp_path / "k.json").read_text())) == ["b", "a"]
    assert np.array_equal(np.load(tmp_path / "x.npy"), np.arange(6).reshape(2, 3))
    assert (tmp_path / "lib.out").read_text() == "made by a library"
    assert _temporaries(tmp_path) == []


def test_an_exception_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"new, half")
            raise RuntimeError("disk full, say")
    assert target.read_bytes() == b"old"
    assert _temporaries(tmp_path) == []


def test_a_kill_mid_write_keeps_the_old_file_and_the_next_cleanup_removes_its_temporary(tmp_path):
    target = tmp_path / "feats.npy"
    target.write_bytes(b"old")
    child = f"""
import importlib.util, os, signal
spec = importlib.util.spec_from_file_location("atomic", {ATOMIC_PY!r})
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
with atomic.atomic_path({str(target)!r}) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"new, half")
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.Popen([sys.executable, "-c", child])
    assert proc.wait() == -signal.SIGKILL
    assert target.read_bytes() == b"old"
    left = tmp_path / f".feats.npy.{proc.pid}.tmp"
    assert _temporaries(tmp_path) == [left.name]
    assert left.read_bytes() == b"new, half"
    assert atomic.remove_stale_temporaries(target) == [str(left)]
    assert _temporaries(tmp_path) == [] and target.read_bytes() == b"old"


def test_stale_temporaries_of_dead_processes_only_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    target = tmp_path / "m.onnx"
    stale = [atomic.temporary_path(target, pid=dead), atomic.temporary_path(target, "layer1", pid=dead)]
    kept = [
        atomic.temporary_path(target, pid=alive),        # another process, running: maybe writing m.onnx now
        atomic.temporary_path(target, "layer1", pid=alive),
        atomic.temporary_path(target),                   # this process
        atomic.temporary_path(tmp_path / "m.onnx.7", pid=dead),  # another file's
        atomic.temporary_path(tmp_path / "other.onnx", pid=dead),
        str(tmp_path / f".m.onnx.{dead}.part"),          # not a temporary of the scheme
        str(tmp_path / f".m.onnx.x{dead}.tmp"),
    ]
    for p in stale + kept:
        with open(p, "wb") as f:
            f.write(b"partial")
    assert sorted(atomic.remove_stale_temporaries(target)) == sorted(stale)
    assert not any(os.path.exists(p) for p in stale)
    assert all(os.path.exists(p) for p in kept)


def test_temporary_names_of_different_files_are_never_confused():
    assert atomic.temporary_owner(".a.7.tmp", "a") == 7
    assert atomic.temporary_owner(".a.7.tmp", "a.7") is None
    assert atomic.temporary_owner(".a.7.99.tmp", "a") is None
    assert atomic.temporary_owner(".a.7.99.tmp", "a.7") == 99
    assert atomic.temporary_owner(".b.npy.12-layer1.tmp", "b.npy") == 12
    assert atomic.temporary_owner(".b.npy.tmp", "b.npy") is None
    assert atomic.temporary_owner("b.npy.12.tmp", "b.npy") is None
    with pytest.raises(ValueError):
        atomic.temporary_path("x.npy", tag="a.b")


def test_pending_files_are_renamed_in_the_order_committed_and_discarded_otherwise(tmp_path):
    with atomic.pending_file(tmp_path / "g.onnx") as graph, atomic.pending_file(tmp_path / "g.json") as meta:
        for p in (graph, meta):
            with open(p.path, "w") as f:
                f.write(os.path.basename(p.final))
        graph.commit()
        assert (tmp_path / "g.onnx").exists() and not (tmp_path / "g.json").exists()
    assert not (tmp_path / "g.json").exists() and _temporaries(tmp_path) == []  # never committed


def test_create_exclusive_creates_once(tmp_path):
    path = tmp_path / "settings.json"
    assert atomic.create_exclusive(path, b"first")
    assert not atomic.create_exclusive(path, b"second")
    assert path.read_bytes() == b"first" and _temporaries(tmp_path) == []
