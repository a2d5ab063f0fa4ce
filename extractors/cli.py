"""``mert-extract``: MERT features for files, folders and globs, one ``.npy`` per input.

::

    mert-extract music/ "extra/*.flac" --model MERT-v1-95M --output-dir feats/
    mert-extract music/ --model mert95m.onnx --output-dir feats/ --layers 6,12 --pooling mean
    mert-extract music/ --model MERT-v1-95M --output-dir feats/ --shard 3/16   # job array task 3 of 16

Outputs mirror the input folders (``music/a/b.wav`` -> ``feats/a/b.npy``):
[L, T, D] float32 per input (``--pooling mean``: [L, D]), L = the selected hidden
states in the order given. ``feats/manifest.jsonl`` has one line per input
(``status`` ok or failed, with the reason) and ``feats/mert-extract.json`` the
settings.

Guarantees: long tracks are decoded in blocks and encoded in windows
(:func:`mert_plugin.extract.plan_windows`), so memory does not grow with
length; the next inputs are decoded in a background thread while the model
runs; each output is written under a temporary name and renamed when complete;
a rerun skips finished outputs without touching them (resume after a kill);
a broken input is reported by name and reason, nothing is written for it, and
the rest go on. Exit status: 0 all inputs done, 1 some failed, 2 bad usage
or a model that cannot be loaded, 130/143 interrupted.
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from mert_plugin.audio import find_audio_files
from mert_plugin.errors import AudioError, MERTError, run_cli
from mert_plugin.extract import Window

from .onnx_model import OUTPUT_ALL, OUTPUT_LAST, OnnxMERT, fill_window, normalise_layers
from .outputs import FeatureWriter, Manifest, check_settings, npy_shape
from .stream import StreamWindower, decode_stream

SETTINGS_FILE = "mert-extract.json"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# ------------------------------------------------------------------ backends
class TorchBackend:
    """PyTorch ``MERTModel``: windows of equal length -> [B, L_sel, t, D]."""

    name = "torch"

    def __init__(self, model, layers: List[int], window: int, overlap: int):
        self.model = model.eval()
        cfg = model.config
        self.sample_rate, self.hop, self.rf = cfg.sample_rate, cfg.hop_length, cfg.receptive_field
        self.num_states, self.dim = cfg.num_hidden_states, cfg.hidden_size
        self.layers, self.window, self.overlap = layers, window, overlap

    def can_batch(self, a: np.ndarray, b: np.ndarray) -> bool:
        return a.shape[0] == b.shape[0]  # no padding: it would change conv-0 GroupNorm statistics

    def encode(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            states = self.model(torch.from_numpy(np.stack(windows)), num_layers=max(self.layers)).hidden_states
            return torch.stack([states[i] for i in self.layers], dim=1).numpy()


class OnnxBackend:
    """Fixed-window ONNX graph: any windows -> [B, L_sel, T_w, D] (short ones padded and masked)."""

    name = "onnx"

    def __init__(self, graph: OnnxMERT, layers: List[int], overlap: int):
        info = graph.info
        self.graph = graph
        self.sample_rate, self.hop, self.rf = info.sample_rate, info.hop_length, info.receptive_field
        self.num_states, self.dim = info.num_hidden_states, info.hidden_size
        self.layers, self.window, self.overlap = layers, info.window, overlap

    def can_batch(self, a: np.ndarray, b: np.ndarray) -> bool:
        return True

    def encode(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        batch = np.stack([fill_window(x, Window(0, x.shape[0], 0, 0, 0), self.window) for x in windows])
        lengths = [min(x.shape[0], self.window) for x in windows]
        if self.layers == [self.num_states - 1]:
            return self.graph.run(batch, lengths, OUTPUT_LAST)[:, None]
        return self.graph.run(batch, lengths, OUTPUT_ALL)[:, self.layers]


# ---------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One input and its output; counters track windows in flight."""

    path: str
    output: str                  # relative to the output folder
    final: str                   # absolute path of the .npy
    writer: Optional[FeatureWriter] = None
    pending: int = 0             # windows queued for the model, not yet written
    ended: bool = False
    failed: bool = False
    num_samples: int = 0
    total_frames: int = 0


def output_names(found: Sequence[tuple]) -> Dict[int, Optional[str]]:
    """Index -> output path relative to the output folder (``a/b.wav`` -> ``a/b.npy``).

    If two inputs would share a name (``b.wav`` and ``b.flac``), both keep their
    extension (``b.wav.npy``, ``b.flac.npy``); an exact clash stays a clash and
    is reported for the later input.
    """
    stems = defaultdict(list)
    for i, (_, rel) in enumerate(found):
        if rel is not None:
            stems[os.path.splitext(rel)[0] + ".npy"].append(i)
    out = {}
    for name, idx in stems.items():
        for i in idx:
            out[i] = name if len(idx) == 1 else found[i][1] + ".npy"
    return out


def in_shard(name: str, shard: Optional[tuple]) -> bool:
    """Stable assignment of an output to one of n shards (independent of the other inputs)."""
    if shard is None:
        return True
    i, n = shard
    return zlib.crc32(name.encode("utf-8")) % n == i


# -------------------------------------------------------------------- runner
class Extractor:
    """Runs the decode thread and the model loop over a list of jobs."""

    def __init__(self, backend, out_dir: str, manifest: Manifest, pooling: str, dtype, batch_size: int,
                 progress):
        self.backend, self.out_dir, self.manifest = backend, out_dir, manifest
        self.pooling, self.dtype, self.batch_size, self.progress = pooling, dtype, max(1, batch_size), progress
        self.failed = 0
        self.written = 0
        self._pending: List[tuple] = []
        self._open: Dict[int, Job] = {}

    def run(self, jobs: List[Job]) -> None:
        q: "queue.Queue" = queue.Queue(maxsize=max(4, 2 * self.batch_size))
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(jobs, q, stop), name="mert-decode", daemon=True)
        producer.start()
        try:
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    if self._pending:  # nothing decoded yet: use the time to run what we have
                        self._flush()
                        continue
                    item = q.get()
                kind = item[0]
                if kind == "done":
                    break
                job = item[1]
                if kind == "begin":
                    try:
                        job.writer = FeatureWriter(job.final, len(self.backend.layers), self.backend.dim,
                                                   self.pooling, self.dtype)
                    except OSError as exc:  # e.g. a folder where the output file should go
                        self._fail(job, f"{job.path}: cannot write {job.final} ({exc.strerror or exc})")
                        continue
                    self._open[id(job)] = job
                elif kind == "window" and not job.failed:
                    self._add_window(job, item[2], item[3])
                elif kind == "end" and not job.failed:
                    job.ended, job.num_samples, job.total_frames = True, item[2], item[3]
                    if job.pending == 0:
                        self._commit(job)
                elif kind == "fail":
                    self._fail(job, item[2])
            self._flush()
        finally:
            stop.set()
            for job in list(self._open.values()):  # interrupted: leave nothing half-written
                if job.writer is not None:
                    job.writer.abort()
            producer.join(timeout=5)

    # -- decode thread
    def _produce(self, jobs: List[Job], q: "queue.Queue", stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        b = self.backend
        for job in jobs:
            if not put(("begin", job)):
                return
            try:
                windower = StreamWindower(b.window, b.overlap, b.hop, b.rf)
                for chunk in decode_stream(job.path, b.sample_rate):
                    for w, x in windower.push(chunk):
                        if not put(("window", job, w, x)):
                            return
                for w, x in windower.finish():
                    if not put(("window", job, w, x)):
                        return
                n = windower.num_samples
                item = ("end", job, n, (n - b.rf) // b.hop + 1)
            except AudioError as exc:
                item = ("fail", job, str(exc))
            except Exception as exc:  # a bug or an odd codec error: report it, keep the batch going
                item = ("fail", job, f"{job.path}: unexpected {type(exc).__name__}: {exc}")
            if not put(item):
                return
        put(("done",))

    # -- model loop
    def _add_window(self, job: Job, w: Window, x: np.ndarray) -> None:
        if self._pending and not self.backend.can_batch(self._pending[0][2], x):
            self._flush()
        self._pending.append((job, w, x))
        job.pending += 1
        if len(self._pending) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            states = self.backend.encode([x for _, _, x in batch])
        except MERTError as exc:
            reason = str(exc)
        except Exception as exc:  # e.g. out of memory in the runtime: fail these inputs, keep going
            reason = f"inference failed: {type(exc).__name__}: {exc}"
        else:
            reason = None
        for b, (job, w, _) in enumerate(batch):
            job.pending -= 1
            if job.failed:
                continue
            if reason is not None:
                self._fail(job, f"{job.path}: {reason}")
                continue
            lo, hi = w.keep_start - w.frame_offset, w.keep_end - w.frame_offset
            try:
                job.writer.write(w.keep_start, states[b, :, lo:hi])
            except OSError as exc:  # disk full, output folder removed, ...
                self._fail(job, f"{job.path}: cannot write {job.final} ({exc.strerror or exc})")
                continue
            if job.ended and job.pending == 0:
                self._commit(job)

    def _commit(self, job: Job) -> None:
        try:
            shape = job.writer.commit(job.total_frames)
        except OSError as exc:
            self._fail(job, f"{job.path}: cannot write {job.final} ({exc.strerror or exc})")
            return
        self._open.pop(id(job), None)
        self.manifest.add({"input": job.path, "output": job.output, "status": "ok", "shape": list(shape),
                           "frames": job.total_frames,
                           "seconds": round(job.num_samples / self.backend.sample_rate, 3)})
        self.written += 1
        self.progress.update(1)

    def _fail(self, job: Job, reason: str) -> None:
        if job.failed:
            return
        job.failed = True
        self._pending = [p for p in self._pending if p[0] is not job]
        job.pending = 0
        if job.writer is not None:
            job.writer.abort()
        self._open.pop(id(job), None)
        self.record_failure(job.path, job.output, reason)

    def record_failure(self, path: str, output: Optional[str], reason: str) -> None:
        self.manifest.add({"input": path, "output": output, "status": "failed", "error": reason})
        self.failed += 1
        self.progress.write(f"failed: {reason}", file=sys.stderr)
        self.progress.update(1)
        self.progress.set_postfix(failed=self.failed)


# ----------------------------------------------------------------------- CLI
def parse_layers(spec: str, num_states: int) -> List[int]:
    """``all``, ``last`` or comma-separated indices (negative from the end) -> indices."""
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(num_states))
    if spec == "last":
        return [num_states - 1]
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise MERTError(f"--layers must be 'all', 'last' or indices like '6' or '0,6,12', got {spec!r}") from None
    if not values:
        raise MERTError("--layers is empty")
    return normalise_layers(values, num_states)


def parse_shard(spec: Optional[str]) -> Optional[tuple]:
    if spec is None:
        return None
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise MERTError(f"--shard must be i/n (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise MERTError(f"--shard i/n needs 0 <= i < n, got {spec!r}")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mert-extract", description="MERT features for audio files, folders and globs: "
                                "one .npy per input, a manifest, resumable.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files, folders (recursive) or globs")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="PyTorch checkpoint (HF folder, cached hub id, fairseq .pt, SpeechBrain "
                                     "checkpoint folder) or a .onnx graph from mert-export-onnx")
    src.add_argument("--preset", help="randomly initialised preset (tests and demos only)")
    p.add_argument("--seed", type=int, default=0, help="seed for --preset weights")
    p.add_argument("--output-dir", required=True, help="folder for the .npy files and the manifest")
    p.add_argument("--backend", choices=("torch", "onnx"), help="default: onnx for a .onnx --model, else torch")
    p.add_argument("--layers", default="all", help="hidden states: all (default), last, or e.g. 6 or 0,6,12")
    p.add_argument("--pooling", choices=("none", "mean"), default="none",
                   help="none: [L, T, D] per input; mean: mean over time, [L, D] (MARBLE)")
    p.add_argument("--shard", help="i/n: process only shard i of n (0-based), e.g. $SLURM_ARRAY_TASK_ID/16")
    p.add_argument("--window-seconds", type=float,
                   help="window length (torch default 5 s; onnx: fixed by the graph)")
    p.add_argument("--overlap-seconds", type=float, default=1.0, help="overlap of consecutive windows (1 s)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per model call (default 4)")
    p.add_argument("--threads", type=int, default=0, help="compute threads (default: the library's choice)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored precision")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute and replace existing outputs (default: skip finished ones)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_backend(args, window_seconds: Optional[float]):
    """Build the backend named by the arguments (model loading errors are MERTErrors)."""
    backend = args.backend or ("onnx" if (args.model or "").endswith(".onnx") else "torch")
    if backend == "onnx":
        if not args.model or not args.model.endswith(".onnx"):
            raise MERTError("--backend onnx needs --model FILE.onnx (write one with mert-export-onnx)")
        graph = OnnxMERT(args.model, num_threads=args.threads)
        info = graph.info
        if window_seconds is not None and int(round(window_seconds * info.sample_rate)) != info.window:
            raise MERTError(f"{args.model} has a fixed window of {info.window / info.sample_rate:g} s; "
                            f"--window-seconds {window_seconds:g} cannot be used with it")
        overlap = int(round(args.overlap_seconds * info.sample_rate))
        return OnnxBackend(graph, parse_layers(args.layers, info.num_hidden_states), overlap)
    import torch

    from mert_plugin.model import MERTModel

    if args.model and args.model.endswith(".onnx"):
        raise MERTError("--backend torch needs a PyTorch checkpoint, not a .onnx graph")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = MERTModel.from_preset(args.preset, seed=args.seed) if args.preset else MERTModel.from_pretrained(args.model)
    sr = model.sample_rate
    window = int(round((window_seconds or 5.0) * sr))
    overlap = int(round(args.overlap_seconds * sr))
    return TorchBackend(model, parse_layers(args.layers, model.config.num_hidden_states), window, overlap)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rerun = "finished outputs are kept; rerun the same command to do the rest"
    return run_cli(lambda: run(args), user_error_status=EXIT_USAGE, interrupted=f"interrupted: {rerun}",
                   terminated=f"terminated: {rerun}")  # SIGTERM: a cluster's pre-emption, cleaned up like Ctrl-C


def run(args) -> int:
    from mert_plugin.progress import progress_bar

    shard = parse_shard(args.shard)
    if args.batch_size < 1:
        raise MERTError("--batch-size must be at least 1")
    if args.overlap_seconds < 0:
        raise MERTError("--overlap-seconds must not be negative")
    backend = load_backend(args, args.window_seconds)
    if not 0 <= backend.overlap < backend.window:
        raise MERTError(f"--overlap-seconds must be shorter than the {backend.window / backend.sample_rate:g} s window")
    out_dir = os.path.abspath(args.output_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise MERTError(f"{args.output_dir}: exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    model_id = f"preset {args.preset} seed {args.seed}" if args.preset else os.path.abspath(args.model) \
        if os.path.exists(args.model) else args.model
    check_settings(os.path.join(out_dir, SETTINGS_FILE), {
        "format": "mert-extract/1", "backend": backend.name, "model": model_id, "layers": backend.layers,
        "pooling": args.pooling, "dtype": args.dtype, "sample_rate": backend.sample_rate,
        "window_samples": backend.window, "overlap_samples": backend.overlap, "hidden_size": backend.dim,
        "output_shape": "[layers, frames, dim]" if args.pooling == "none" else "[layers, dim]",
    }, overwrite=args.overwrite)
    manifest_name = "manifest.jsonl" if shard is None else f"manifest.shard{shard[0]}of{shard[1]}.jsonl"
    manifest = Manifest(os.path.join(out_dir, manifest_name), truncate=args.overwrite)

    found = find_audio_files(args.inputs)
    names = output_names(found)
    jobs, problems, skipped, claimed = [], [], 0, {}
    for i, (path, rel) in enumerate(found):
        name = names.get(i)
        if name is not None and not in_shard(name, shard):
            continue
        if name is None:
            if shard is None or shard[0] == 0:  # report a missing input once, not in every shard
                problems.append((path, None, f"{path}: no such file or folder (or the pattern matched nothing)"))
            continue
        if name in claimed:
            problems.append((path, name, f"{path}: output {name} would overwrite that of {claimed[name]}; "
                                         "pass their folders instead of the files"))
            continue
        claimed[name] = path
        final = os.path.join(out_dir, name)
        if not args.overwrite and os.path.isfile(final):
            shape = npy_shape(final)
            if shape is not None:
                skipped += 1
                if name not in manifest.ok_outputs:  # finished just before a kill: record it now
                    manifest.add({"input": path, "output": name, "status": "ok", "shape": list(shape)})
                continue
            print(f"warning: {final} is not a readable .npy; recomputing it", file=sys.stderr)
        jobs.append(Job(path, name, final))

    total = len(jobs) + len(problems)
    with progress_bar(total=total, unit="file", disable=args.no_progress) as bar:
        extractor = Extractor(backend, out_dir, manifest, args.pooling, np.dtype(args.dtype), args.batch_size, bar)
        for path, name, reason in problems:
            extractor.record_failure(path, name, reason)
        try:
            extractor.run(jobs)
        finally:
            manifest.close()
    print(f"{extractor.written} written, {skipped} already done, {extractor.failed} failed "
          f"(details: {os.path.join(args.output_dir, manifest_name)})", file=sys.stderr)
    return EXIT_FAILED if extractor.failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
