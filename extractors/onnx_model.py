"""Run a MERT graph written by ``mert-export-onnx`` with onnxruntime (CPU or CUDA).

A fixed-window graph takes ``audio`` [batch, W] (W = the export window in samples) and,
optionally, ``num_samples`` [batch] (real samples per window, default W), and
returns ``last_hidden_state`` [batch, T_w, D] and ``hidden_states``
[batch, L+1, T_w, D]. Audio of any other length is cut into windows with the
same rule as :func:`mert_plugin.extract.plan_windows` (frame-aligned windows,
overlaps split in the middle); a window shorter than W -- the last one, or a
whole track shorter than W -- is zero-padded to W with ``num_samples`` set to
its real length, so the graph masks the padding out and the frames equal an
unpadded PyTorch run; frames beyond the real audio are dropped.

A dynamic-length graph (``mert-export-onnx --length dynamic``) takes ``audio``
[batch, N] for any N; its runner uses ``DEFAULT_DYNAMIC_WINDOW_SECONDS`` windows
unless told otherwise, and trims each batch to its longest real window (the
rest is masked padding, so trimming it changes nothing but the cost).

Graphs made with ``--quantize fp16|int8`` keep float32 inputs and outputs;
``GraphInfo.precision`` says what they compute in.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mert_plugin.errors import AudioError, CheckpointError, MERTError
from mert_plugin.extract import Window, plan_windows

INPUT_NAME = "audio"
INPUT_LENGTHS = "num_samples"  # optional: real samples per window, default W
OUTPUT_LAST = "last_hidden_state"
OUTPUT_ALL = "hidden_states"
# Keys written into the graph's metadata_props, so a graph without its JSON still runs.
PROP_PREFIX = "mert."
LAST_PATCH_MODES = ("pad", "discard")
DEFAULT_DYNAMIC_WINDOW_SECONDS = 30.0
PRECISIONS = ("fp32", "fp16", "int8")


def metadata_path(graph_path: str) -> str:
    """``FILE.onnx`` -> ``FILE.json`` (the Essentia-style metadata next to the graph)."""
    return os.path.splitext(os.fspath(graph_path))[0] + ".json"


@dataclass(frozen=True)
class GraphInfo:
    """What a runner needs to know about an exported graph."""

    sample_rate: int
    window: int               # input samples per window (static)
    hop_length: int           # samples per output frame
    receptive_field: int      # samples seen by one frame
    frames_per_window: int    # T_w
    num_hidden_states: int    # L + 1
    hidden_size: int          # D
    dynamic: bool = False     # True: any input length (``window`` is then the runner's default window)
    precision: str = "fp32"   # what the graph computes in: fp32, fp16 or int8 (inputs/outputs stay float32)

    def num_frames(self, num_samples: int) -> int:
        """Frames a full pass over ``num_samples`` samples gives (0 if too short)."""
        n = int(num_samples)
        return (n - self.receptive_field) // self.hop_length + 1 if n >= self.receptive_field else 0


class OnnxMERT:
    """An exported MERT graph in an onnxruntime CPU session.

    ``run(batch[B, W], lengths[B]) -> [B, L+1, T_w, D]`` (or [B, T_w, D] for the last state).
    ``info`` holds rate, window and geometry, read from ``FILE.json`` when present
    (cross-checked against the graph) or else from the graph's own metadata.
    """

    def __init__(self, path: str, num_threads: int = 0, device: str = "cpu",
                 window_seconds: Optional[float] = None):
        import onnxruntime as ort

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such ONNX file")
        providers = onnx_providers(device)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: ORT warns about unused initialisers etc.
        # No arena: a last, smaller batch would make the arena grow; with plain
        # allocations the big activations go back to the OS (peak RSS -150 MiB, same speed).
        opts.enable_cpu_mem_arena = False
        try:
            self.session = ort.InferenceSession(path, opts, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/... types
            reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: cannot load the ONNX model ({reason})") from None
        self.path = path
        self.device = device
        self.metadata: Optional[Dict] = _read_json(metadata_path(path))
        self.info = self._graph_info(window_seconds)

    # ----------------------------------------------------------------- set-up
    def _graph_info(self, window_seconds: Optional[float] = None) -> GraphInfo:
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if INPUT_NAME not in inputs or OUTPUT_ALL not in outputs or OUTPUT_LAST not in outputs:
            raise CheckpointError(f"{self.path}: not a mert-export-onnx graph (expected input '{INPUT_NAME}' "
                                  f"and outputs '{OUTPUT_LAST}', '{OUTPUT_ALL}'; found {sorted(inputs)} -> "
                                  f"{sorted(outputs)})")
        in_shape, all_shape = inputs[INPUT_NAME], outputs[OUTPUT_ALL]
        dynamic = len(in_shape) == 2 and not isinstance(in_shape[1], int)
        if len(in_shape) != 2 or len(all_shape) != 4 or not isinstance(all_shape[1], int) \
                or not isinstance(all_shape[3], int) or isinstance(all_shape[2], int) == dynamic:
            raise CheckpointError(f"{self.path}: expected a graph audio [batch, W] -> hidden_states "
                                  f"[batch, L+1, T, D] (W and T fixed, or both dynamic); got {in_shape} -> "
                                  f"{all_shape}")
        props = self.session.get_modelmeta().custom_metadata_map
        inference = (self.metadata or {}).get("inference", {})

        def field(name):
            value = inference.get(name, props.get(PROP_PREFIX + name))
            if value is None:
                raise CheckpointError(f"{self.path}: '{name}' is missing from both {metadata_path(self.path)} "
                                      "and the graph's metadata; re-export with mert-export-onnx")
            return int(value)

        precision = str((self.metadata or {}).get("export", {}).get("precision",
                                                                    props.get(PROP_PREFIX + "precision", "fp32")))
        if precision not in PRECISIONS:
            raise CheckpointError(f"{self.path}: unknown graph precision {precision!r} (expected one of "
                                  f"{list(PRECISIONS)})")
        sample_rate, hop, rf = field("sample_rate"), field("hop_length"), field("receptive_field")
        if dynamic:
            declared = ((self.metadata or {}).get("schema", {}).get("inputs") or [{}])[0].get("shape", [None, None])[-1]
            if isinstance(declared, int):
                raise CheckpointError(f"{metadata_path(self.path)} says the window is {declared} samples but "
                                      f"{self.path} takes any length; the two files do not belong together")
            seconds = DEFAULT_DYNAMIC_WINDOW_SECONDS if window_seconds is None else float(window_seconds)
            window = int(round(seconds * sample_rate))
            if window < rf:
                raise MERTError(f"a {seconds:g} s window is shorter than one frame ({rf} samples)")
            return GraphInfo(sample_rate=sample_rate, window=window, hop_length=hop, receptive_field=rf,
                             frames_per_window=(window - rf) // hop + 1, num_hidden_states=all_shape[1],
                             hidden_size=all_shape[3], dynamic=True, precision=precision)
        info = GraphInfo(sample_rate=sample_rate, window=in_shape[1], hop_length=hop,
                         receptive_field=rf, frames_per_window=all_shape[2],
                         num_hidden_states=all_shape[1], hidden_size=all_shape[3], precision=precision)
        if window_seconds is not None and int(round(window_seconds * sample_rate)) != info.window:
            raise MERTError(f"{self.path} has a fixed window of {info.window / sample_rate:g} s; a "
                            f"{window_seconds:g} s window cannot be used with it (export a dynamic-length "
                            "graph with mert-export-onnx --length dynamic)")
        if self.metadata is not None:
            declared = self.metadata.get("schema", {}).get("inputs", [{}])[0].get("shape", [None, None])[-1]
            if declared != info.window:
                raise CheckpointError(f"{metadata_path(self.path)} says the window is {declared} samples but "
                                      f"{self.path} takes {info.window}; the two files do not belong together")
        if info.num_frames(info.window) != info.frames_per_window:
            raise CheckpointError(f"{self.path}: {info.window} samples should give "
                                  f"{info.num_frames(info.window)} frames, the graph declares "
                                  f"{info.frames_per_window}")
        return info

    # ---------------------------------------------------------------- running
    def run(self, batch: np.ndarray, lengths: Optional[Sequence[int]] = None,
            output: str = OUTPUT_ALL) -> np.ndarray:
        """``batch`` [B, W] float32 (zero-padded windows with ``lengths`` real samples
        each; None = all full) -> ``output`` ([B, L+1, T_w, D] or [B, T_w, D]).
        Frames past ``info.num_frames(lengths[b])`` are padding and meaningless."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.info.dynamic:
            if batch.ndim != 2 or batch.shape[1] < self.info.receptive_field:
                raise MERTError(f"{self.path}: expected windows shaped [batch, samples >= "
                                f"{self.info.receptive_field}], got {list(batch.shape)}")
            if lengths is not None:  # trailing columns that are padding in every row: masked, so not run
                width = max(int(max(lengths)), self.info.receptive_field)
                if width < batch.shape[1]:
                    batch = np.ascontiguousarray(batch[:, :width])
        elif batch.ndim != 2 or batch.shape[1] != self.info.window:
            raise MERTError(f"{self.path}: expected windows shaped [batch, {self.info.window}], "
                            f"got {list(batch.shape)}")
        feed = {INPUT_NAME: batch}
        if lengths is not None:
            feed[INPUT_LENGTHS] = np.asarray(lengths, dtype=np.float32).reshape(batch.shape[0])
        return self.session.run([output], feed)[0]

    def encode(self, audio: np.ndarray, layers: Optional[Sequence[int]] = None, overlap: Optional[int] = None,
               batch_size: int = 4, last_patch: str = "pad") -> np.ndarray:
        """Hidden states of a mono track ``audio`` [N] -> [len(layers), frames, D] float32.

        ``layers`` index the L+1 hidden states (negative from the end; None = all).
        ``overlap`` in samples (default one second). ``frames`` equals
        ``info.num_frames(N)`` except with ``last_patch="discard"`` (see
        :func:`plan_fixed_windows`).
        """
        info = self.info
        sel = normalise_layers(layers, info.num_hidden_states)
        overlap = info.sample_rate if overlap is None else int(overlap)
        plan, total = plan_fixed_windows(audio.shape[0], info.window, overlap, info.hop_length,
                                         info.receptive_field, last_patch)
        out = np.empty((len(sel), total, info.hidden_size), dtype=np.float32)
        only_last = sel == [info.num_hidden_states - 1]
        for i in range(0, len(plan), max(1, int(batch_size))):
            group = plan[i:i + batch_size]
            batch = np.stack([fill_window(audio, w, info.window) for w in group])
            lengths = [min(w.sample_end - w.sample_start, info.window) for w in group]
            if only_last:
                states = self.run(batch, lengths, OUTPUT_LAST)[:, None]
            else:
                states = self.run(batch, lengths, OUTPUT_ALL)[:, sel]
            for b, w in enumerate(group):
                out[:, w.keep_start:w.keep_end] = states[b, :, w.keep_start - w.frame_offset:
                                                         w.keep_end - w.frame_offset]
        return out


def onnx_providers(device: str = "cpu") -> List:
    """onnxruntime execution providers for ``device`` (``cpu``, ``cuda``, ``cuda:N``).

    CUDA needs the ``onnxruntime-gpu`` package (it replaces ``onnxruntime``); without
    it this raises a :class:`MERTError` that says so instead of silently running on the CPU.
    """
    import onnxruntime as ort

    device = str(device)
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise MERTError(f"--device {device} with an ONNX model needs onnxruntime's CUDA execution provider, "
                            f"which this onnxruntime {ort.__version__} does not have (providers: "
                            f"{', '.join(available)}); install onnxruntime-gpu in place of onnxruntime, or use "
                            "--device cpu, or the torch backend")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise MERTError(f"unknown device {device!r} for the ONNX backend (cpu, cuda or cuda:N)")


# ----------------------------------------------------------------- windowing
def plan_fixed_windows(num_samples: int, window: int, overlap: int, hop: int, receptive_field: int,
                       last_patch: str = "pad") -> Tuple[List[Window], int]:
    """Windows for a graph of fixed input length ``window``; returns ``(plan, frames)``.

    The plan is :func:`mert_plugin.extract.plan_windows`'s. Its last window may
    be up to one hop shorter than ``window``, and a track shorter than
    ``window`` is one short window; ``last_patch`` says what happens to those:

    * ``"pad"``: they are zero-padded and the padding is masked out in the
      graph (``num_samples``); every frame of the track is returned;
    * ``"discard"``: only complete windows are run: a track shorter than
      ``window`` gives no frames, and a longer one loses at most its final
      frame (the plan is made for a prefix whose last window is complete).
    """
    if last_patch not in LAST_PATCH_MODES:
        raise MERTError(f"lastPatchMode must be one of {list(LAST_PATCH_MODES)}, got {last_patch!r}")
    n = int(num_samples)
    if n < receptive_field:
        raise AudioError(f"{n} samples is shorter than one frame ({receptive_field} samples)")
    if last_patch == "discard":
        if n < window:
            return [], 0
        plan = plan_windows(n, window, overlap, hop, receptive_field)
        if plan[-1].sample_end - plan[-1].sample_start < window:
            # The last window is short by less than a hop: drop the final frame so
            # that the remainder after the last whole frame is hop - 1 samples.
            frames = (n - receptive_field) // hop + 1
            n = receptive_field + (frames - 2) * hop + hop - 1
            plan = plan_windows(n, window, overlap, hop, receptive_field)
        return plan, plan[-1].keep_end
    plan = plan_windows(n, window, overlap, hop, receptive_field)
    return plan, plan[-1].keep_end


def fill_window(audio: np.ndarray, w: Window, window: int) -> np.ndarray:
    """The ``window`` input samples for planned window ``w``, zero-padded if short."""
    seg = audio[w.sample_start:min(w.sample_end, w.sample_start + window)]
    if seg.shape[0] == window:
        return seg
    return np.concatenate([seg, np.zeros(window - seg.shape[0], dtype=np.float32)])


def normalise_layers(layers: Optional[Sequence[int]], num_states: int) -> List[int]:
    """Indices into the ``num_states`` hidden states (negative from the end; None = all)."""
    if layers is None:
        return list(range(num_states))
    out = []
    for layer in layers:
        idx = int(layer) + num_states if int(layer) < 0 else int(layer)
        if not 0 <= idx < num_states:
            raise MERTError(f"layer {layer} out of range: the model has hidden states 0..{num_states - 1}")
        out.append(idx)
    return out


def _read_json(path: str) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the model metadata ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: model metadata must be a JSON object")
    return data
