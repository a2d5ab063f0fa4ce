"""``mert-extract``: MERT features for files, folders and globs, one ``.npy`` per input.

::

    mert-extract music/ "extra/*.flac" --model MERT-v1-95M --output-dir feats/
    mert-extract music/ --model mert95m.onnx --output-dir feats/ --layers 6,12 --pooling mean
    mert-extract music/ --model MERT-v1-95M --output-dir feats/ --shard 3/16   # job array task 3 of 16
    mert-extract music/ --model MERT-v1-95M --output-dir feats/ --device cuda --precision bf16
    torchrun --nproc_per_node=8 -m extractors.cli music/ --model MERT-v1-95M --output-dir feats/  # 8 GPUs

Outputs mirror the input folders (``music/a/b.wav`` -> ``feats/a/b.npy``):
[L, T, D] float32 per input (``--pooling mean``: [L, D]), L = the selected hidden
states in the order given. ``feats/manifest.jsonl`` has one line per input
(``status`` ok or failed, with the reason) and ``feats/mert-extract.json`` the
settings.

Guarantees: long tracks are decoded in blocks and encoded in windows
(:func:`mert_plugin.extract.plan_windows`), so memory does not grow with
length; windows of many inputs share a model call (``--batch-seconds`` of
audio, similar lengths together, padding masked out), and the next inputs are
decoded in a background thread while the model runs; under ``torchrun`` each
process takes the shard RANK of WORLD_SIZE on its own device (cuda:LOCAL_RANK); each output is written under a temporary name and renamed when complete;
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
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from mert_plugin.audio import find_audio_files
from mert_plugin.errors import AudioError, MERTError, run_cli
from mert_plugin.extract import Window

from .onnx_model import (DEFAULT_DYNAMIC_WINDOW_SECONDS, OUTPUT_ALL, OUTPUT_LAST, OnnxMERT, fill_window,
                         normalise_layers)
from .outputs import FeatureWriter, Manifest, check_settings, npy_shape, ok_outputs_in
from .stream import StreamWindower, decode_stream

SETTINGS_FILE = "mert-extract.json"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_WINDOW_SECONDS = DEFAULT_DYNAMIC_WINDOW_SECONDS  # torch and dynamic-length graphs (fixed graphs: theirs)
DEFAULT_BATCH_SECONDS = {"cpu": 30.0, "cuda": 600.0}  # audio per model call
SHORT_RATIO = 0.75  # a window joins a sub-batch only if at least this share of its longest (little padding)


# ------------------------------------------------------------------ backends
def padded_forward(model, audio, lengths, num_layers: Optional[int] = None):
    """Hidden states of a zero-padded batch ``audio`` [B, N] with ``lengths`` [B] real samples:
    the first ``num_frames(lengths[b])`` frames of row b equal ``model(audio[b, :lengths[b]])``.

    The padding is masked as in the exported graph (:class:`extractors.export_onnx.ExportWrapper`):
    conv 0's GroupNorm takes its statistics over the real samples only (in float32, also under
    autocast), padded frames are zeroed before the positional conv and are never attention keys.
    """
    import torch
    import torch.nn.functional as F

    from mert_plugin.model import conv_output_lengths

    from .export_onnx import _masked_group_norm

    cfg = model.config
    layers = model.feature_extractor.conv_layers
    x = layers[0].conv(audio.unsqueeze(1))
    if layers[0].layer_norm is not None:
        valid = torch.div(lengths - cfg.conv_kernel[0], cfg.conv_stride[0], rounding_mode="floor") + 1
        x = _masked_group_norm(x.float(), layers[0].layer_norm, valid)
    x = F.gelu(x)
    for layer in layers[1:]:
        x = layer(x)
    hidden = model.feature_projection(x.transpose(1, 2))
    frame_mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < conv_output_lengths(lengths, cfg)[:, None]
    return model.encoder(hidden, frame_mask, num_layers)


class TorchBackend:
    """PyTorch ``MERTModel`` on ``device``: windows of any lengths -> [B, L_sel, t_max, D] float32.

    Windows of equal length run as a plain batch (exactly ``model(batch)``); mixed lengths are
    zero-padded and masked (:func:`padded_forward`). ``precision`` bf16/fp16 runs under
    ``torch.autocast``; the states come back as float32.
    """

    name = "torch"

    def __init__(self, model, layers: List[int], window: int, overlap: int, device: str = "cpu",
                 precision: str = "fp32"):
        import torch

        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        cfg = model.config
        self.sample_rate, self.hop, self.rf = cfg.sample_rate, cfg.hop_length, cfg.receptive_field
        self.num_states, self.dim = cfg.num_hidden_states, cfg.hidden_size
        self.layers, self.window, self.overlap = layers, window, overlap
        self.precision = precision
        self._autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def cost(self, length: int) -> int:
        """Samples one window of ``length`` costs in a batch (before padding to its longest)."""
        return length

    def encode(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        import contextlib

        import torch

        lengths = [x.shape[0] for x in windows]
        width = max(lengths)
        if min(lengths) == width:
            batch = torch.from_numpy(np.stack(windows))
        else:
            batch = torch.zeros(len(windows), width)
            for b, x in enumerate(windows):
                batch[b, :x.shape[0]] = torch.from_numpy(x)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        amp = torch.autocast(self.device.type, dtype=self._autocast) if self._autocast is not None \
            else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            if min(lengths) == width:
                states = self.model(batch, num_layers=max(self.layers)).hidden_states
            else:
                lens = torch.tensor(lengths, device=self.device)
                states = padded_forward(self.model, batch, lens, max(self.layers))
            return torch.stack([states[i] for i in self.layers], dim=1).float().cpu().numpy()


class OnnxBackend:
    """ONNX graph: any windows -> [B, L_sel, T, D] (short ones padded and masked).

    A fixed-window graph pads every window to its window; a dynamic-length one pads a
    batch to its longest window only (:meth:`OnnxMERT.run` trims the rest).
    """

    name = "onnx"

    def __init__(self, graph: OnnxMERT, layers: List[int], overlap: int):
        info = graph.info
        self.graph = graph
        self.sample_rate, self.hop, self.rf = info.sample_rate, info.hop_length, info.receptive_field
        self.num_states, self.dim = info.num_hidden_states, info.hidden_size
        self.layers, self.window, self.overlap = layers, info.window, overlap
        self.precision, self.device = info.precision, graph.device

    def cost(self, length: int) -> int:
        return length if self.graph.info.dynamic else self.window

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


def deal_shards(names: Iterable[Optional[str]], n: int) -> Dict[str, int]:
    """Output name -> shard in [0, n): the run's distinct output names, sorted, dealt round-robin
    (the k-th name goes to shard k mod n), so shards differ by at most one input.

    Why this rule. Every process of one command (torchrun ranks, or the tasks of a ``--shard i/n``
    job array, started at different times) must agree on it without talking to each other, and a
    rerun must give the same split, so it depends only on the list of output names: sorted, it does
    not depend on the order of the arguments or of the folder walk either. It replaces a hash of
    each name mod n, which was independent of the other inputs but could leave a shard idle (3 long
    tracks over 2 processes all hashed to rank 0). Greedy by file size (largest first, to the least
    loaded shard) would balance audio rather than counts, but it needs a stat per file (slow on
    network file systems), bytes are not seconds across formats, and a file still being copied in
    changes size between the tasks of a job array, which could then disagree and process it twice
    or never. The same names always give the same split; names added or removed shift the deal, so
    a rerun may move files between shards, but outputs already written are skipped whichever shard
    owns them now. Equal names (an exact clash) land on one shard, which reports the clash.
    """
    return {name: k % n for k, name in enumerate(sorted({x for x in names if x is not None}))}


# -------------------------------------------------------------------- runner
class Extractor:
    """Runs the decode thread and the model loop over a list of jobs."""

    def __init__(self, backend, out_dir: str, manifest: Manifest, pooling: str, dtype, batch_size: int,
                 progress, batch_samples: Optional[int] = None):
        self.backend, self.out_dir, self.manifest = backend, out_dir, manifest
        self.pooling, self.dtype, self.batch_size, self.progress = pooling, dtype, max(1, batch_size), progress
        # Audio per model call (padded); at least one window. None: batch_size windows decide alone.
        self.batch_samples = None if batch_samples is None else max(int(batch_samples), 1)
        self._pending_cost = 0
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
        cost = self.backend.cost(x.shape[0])
        if self._pending and self.batch_samples is not None and self._pending_cost + cost > self.batch_samples:
            self._flush()
        self._pending.append((job, w, x))
        self._pending_cost += cost
        job.pending += 1
        if len(self._pending) >= self.batch_size:
            self._flush()

    def sub_batches(self, lengths: Sequence[int]) -> List[List[int]]:
        """Indices of the pending windows grouped into model calls: longest first, a window
        joining a call only if it is at least SHORT_RATIO of the call's longest (little padding)
        and the padded call stays within the batch budget."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        groups: List[List[int]] = []
        for i in order:
            g = groups[-1] if groups else None
            if g is not None:
                longest = self.backend.cost(lengths[g[0]])
                fits = self.batch_samples is None or (len(g) + 1) * longest <= self.batch_samples
                if fits and len(g) < self.batch_size and self.backend.cost(lengths[i]) >= SHORT_RATIO * longest:
                    g.append(i)
                    continue
            groups.append([i])
        return groups

    def _flush(self) -> None:
        batch, self._pending, self._pending_cost = self._pending, [], 0
        if not batch:
            return
        results: List[tuple] = [None] * len(batch)  # (states [L, t, D] or None, reason)
        for group in self.sub_batches([x.shape[0] for _, _, x in batch]):
            try:
                states = self.backend.encode([batch[i][2] for i in group])
            except MERTError as exc:
                reason = str(exc)
            except Exception as exc:  # e.g. out of memory in the runtime: fail these inputs, keep going
                reason = f"inference failed: {type(exc).__name__}: {exc}"
            else:
                reason = None
            for b, i in enumerate(group):
                results[i] = (None if reason else states[b], reason)
        for (job, w, _), (states, reason) in zip(batch, results):  # in arrival order: frames of a job in order
            job.pending -= 1
            if job.failed:
                continue
            if reason is not None:
                self._fail(job, f"{job.path}: {reason}")
                continue
            lo, hi = w.keep_start - w.frame_offset, w.keep_end - w.frame_offset
            try:
                job.writer.write(w.keep_start, states[:, lo:hi])
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
        self._pending_cost = sum(self.backend.cost(p[2].shape[0]) for p in self._pending)
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


def shard_from_env() -> Optional[tuple]:
    """``(RANK, WORLD_SIZE)`` when started by torchrun (or any launcher that sets both), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise MERTError("RANK and WORLD_SIZE must be integers") from None
    if not 0 <= rank < world:
        raise MERTError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return None if world == 1 else (rank, world)


def resolve_device(spec: str, backend: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` -> the device this process runs on.

    ``cuda`` and ``auto`` pick ``cuda:LOCAL_RANK`` (torchrun's GPU of this process); ``auto``
    falls back to the CPU when the backend has no GPU, ``cuda`` says what is missing.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "cpu":
        return "cpu"
    if not (spec in ("auto", "cuda") or (spec.startswith("cuda:") and spec[5:].isdigit())):
        raise MERTError(f"--device must be cpu, cuda, cuda:N or auto, got {spec!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if backend == "onnx":
        import onnxruntime as ort

        has_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
        if spec == "auto" and not has_gpu:
            return "cpu"
        # onnx_providers() says what is missing for an explicit cuda.
        return spec if ":" in spec else f"cuda:{local_rank}"
    import torch

    if not torch.cuda.is_available():
        if spec == "auto":
            return "cpu"
        raise MERTError(f"--device {spec}: torch {torch.__version__} sees no CUDA device (a CPU-only build, or no "
                        "GPU visible: check CUDA_VISIBLE_DEVICES); use --device cpu or auto")
    if ":" in spec:
        if int(spec[5:]) >= torch.cuda.device_count():
            raise MERTError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return spec
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def cpu_has_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 / AMX); without them bf16 is slow."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


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
    p.add_argument("--shard", help="i/n: process only shard i of n (0-based), e.g. $SLURM_ARRAY_TASK_ID/16 "
                                   "(default under torchrun: RANK/WORLD_SIZE)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (default: cuda:LOCAL_RANK when this backend has a GPU, else cpu)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="compute precision: torch runs bf16/fp16 under autocast; an onnx graph computes in the "
                        "precision it was exported with (mert-export-onnx --quantize). Default: fp32 / the graph's")
    p.add_argument("--window-seconds", type=float,
                   help=f"window length (default {DEFAULT_WINDOW_SECONDS:g} s; a fixed-window onnx graph: its own)")
    p.add_argument("--overlap-seconds", type=float, default=1.0, help="overlap of consecutive windows (1 s)")
    p.add_argument("--batch-size", type=int, default=64, help="at most this many windows per model call (64)")
    p.add_argument("--batch-seconds", type=float,
                   help="audio per model call, padding included (default 30 s on the CPU, 600 s on a GPU); windows "
                        "of several inputs share a call")
    p.add_argument("--threads", type=int, default=0, help="compute threads (default: the library's choice)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored precision")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute and replace existing outputs (default: skip finished ones)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_backend(args, window_seconds: Optional[float]):
    """Build the backend named by the arguments (model loading errors are MERTErrors)."""
    backend = args.backend or ("onnx" if (args.model or "").endswith(".onnx") else "torch")
    device = resolve_device(getattr(args, "device", "auto"), backend)
    precision = getattr(args, "precision", None)
    if backend == "onnx":
        if not args.model or not args.model.endswith(".onnx"):
            raise MERTError("--backend onnx needs --model FILE.onnx (write one with mert-export-onnx)")
        graph = OnnxMERT(args.model, num_threads=args.threads, device=device, window_seconds=window_seconds)
        info = graph.info
        if precision is not None and precision != info.precision:
            how = "bf16 is for the torch backend" if precision == "bf16" else \
                f"export one with mert-export-onnx --quantize {precision}" if precision == "fp16" else \
                "export it without --quantize"
            raise MERTError(f"{args.model} computes in {info.precision}; --precision {precision} needs a "
                            f"{precision} graph ({how})")
        overlap = int(round(args.overlap_seconds * info.sample_rate))
        return OnnxBackend(graph, parse_layers(args.layers, info.num_hidden_states), overlap)
    import torch

    from mert_plugin.model import MERTModel

    if args.model and args.model.endswith(".onnx"):
        raise MERTError("--backend torch needs a PyTorch checkpoint, not a .onnx graph")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    precision = precision or "fp32"
    if precision == "fp16" and device == "cpu":
        raise MERTError("--precision fp16 needs a GPU (torch has no fast fp16 kernels on the CPU); use bf16 or fp32")
    if precision == "bf16" and device == "cpu" and not cpu_has_bf16():
        print("warning: this CPU has no bf16 units (AVX512-BF16 or AMX): --precision bf16 runs on slow fallback "
              "kernels here, many times slower than fp32", file=sys.stderr)
    model = MERTModel.from_preset(args.preset, seed=args.seed) if args.preset else MERTModel.from_pretrained(args.model)
    sr = model.sample_rate
    window = int(round((window_seconds or DEFAULT_WINDOW_SECONDS) * sr))
    overlap = int(round(args.overlap_seconds * sr))
    return TorchBackend(model, parse_layers(args.layers, model.config.num_hidden_states), window, overlap,
                        device=device, precision=precision)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rerun = "finished outputs are kept; rerun the same command to do the rest"
    return run_cli(lambda: run(args), user_error_status=EXIT_USAGE, interrupted=f"interrupted: {rerun}",
                   terminated=f"terminated: {rerun}")  # SIGTERM: a cluster's pre-emption, cleaned up like Ctrl-C


def run(args) -> int:
    from mert_plugin.progress import progress_bar

    explicit_shard = parse_shard(args.shard)
    shard = explicit_shard or shard_from_env()
    if args.batch_size < 1:
        raise MERTError("--batch-size must be at least 1")
    if args.batch_seconds is not None and args.batch_seconds <= 0:
        raise MERTError("--batch-seconds must be positive")
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
    settings = {
        "format": "mert-extract/1", "backend": backend.name, "model": model_id, "layers": backend.layers,
        "pooling": args.pooling, "dtype": args.dtype, "sample_rate": backend.sample_rate,
        "window_samples": backend.window, "overlap_samples": backend.overlap, "hidden_size": backend.dim,
        "output_shape": "[layers, frames, dim]" if args.pooling == "none" else "[layers, dim]",
    }
    if backend.precision != "fp32":  # absent for fp32, so folders made before --precision existed still resume
        settings["precision"] = backend.precision
    check_settings(os.path.join(out_dir, SETTINGS_FILE), settings, overwrite=args.overwrite)
    manifest_name = "manifest.jsonl" if shard is None else f"manifest.shard{shard[0]}of{shard[1]}.jsonl"
    manifest = Manifest(os.path.join(out_dir, manifest_name), truncate=args.overwrite)

    found = find_audio_files(args.inputs)
    names = output_names(found)
    owner = deal_shards(names.values(), shard[1]) if shard is not None else {}
    # Outputs that a manifest of this folder records as done: this one's, or another shard's when a rerun
    # moved files between shards; each finished output is recorded in one manifest only.
    recorded = ok_outputs_in(out_dir)
    jobs, problems, skipped, claimed = [], [], 0, {}
    for i, (path, rel) in enumerate(found):
        name = names.get(i)
        if name is not None and shard is not None and owner[name] != shard[0]:
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
                if name not in recorded:  # finished just before a kill, its line lost: record it now
                    manifest.add({"input": path, "output": name, "status": "ok", "shape": list(shape)})
                continue
            print(f"warning: {final} is not a readable .npy; recomputing it", file=sys.stderr)
        jobs.append(Job(path, name, final))

    total = len(jobs) + len(problems)
    device_kind = "cuda" if str(backend.device).startswith("cuda") else "cpu"
    batch_seconds = args.batch_seconds if args.batch_seconds is not None else DEFAULT_BATCH_SECONDS[device_kind]
    # Under torchrun only rank 0 draws a bar; explicit --shard runs each draw their own.
    quiet = args.no_progress or (explicit_shard is None and shard is not None and shard[0] != 0)
    with progress_bar(total=total, unit="file", disable=quiet) as bar:
        extractor = Extractor(backend, out_dir, manifest, args.pooling, np.dtype(args.dtype), args.batch_size, bar,
                              batch_samples=int(round(batch_seconds * backend.sample_rate)))
        for path, name, reason in problems:
            extractor.record_failure(path, name, reason)
        try:
            extractor.run(jobs)
        finally:
            manifest.close()
    prefix = f"shard {shard[0]}/{shard[1]}: " if shard is not None else ""
    print(f"{prefix}{extractor.written} written, {skipped} already done, {extractor.failed} failed "
          f"(details: {os.path.join(args.output_dir, manifest_name)})", file=sys.stderr)
    return EXIT_FAILED if extractor.failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
