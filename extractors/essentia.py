"""``OnnxPredictMERT``: MERT embeddings as an Essentia-style algorithm.

Released Essentia wheels have no ``OnnxPredict`` and a Python package cannot
register a C++ algorithm, so this is a Python class with Essentia's calling
conventions (those of ``TensorflowPredictMAEST``/``...EffnetDiscogs``)::

    import extractors.essentia  # also makes essentia.standard.OnnxPredictMERT available
    from essentia.standard import MonoLoader, OnnxPredictMERT

    audio = MonoLoader(filename="song.wav", sampleRate=24000, resampleQuality=4)()
    emb = OnnxPredictMERT(graphFilename="mert.onnx", output="hidden_state_6")(audio)   # [frames, D]
    all_layers = OnnxPredictMERT(graphFilename="mert.onnx", output="hidden_states")(audio)  # [L+1, frames, D]

The graph is a fixed-window export by ``mert-export-onnx``; its rate and
window come from ``FILE.json`` (or the graph). Audio longer than one window is
cut into windows every ``patchHopSize`` samples (default: window minus one
second, i.e. 1 s overlap) on the frame grid, and the frames are stitched with
the rule of :func:`mert_plugin.extract.plan_windows`, so the output has one
frame per 320 samples exactly like a full pass. Input of exactly one window
gives exactly the PyTorch model's output on that audio.

It is not registered with Essentia's C++ factory: it does not appear in
``essentia.standard.algorithmNames()`` and cannot be a node of an
``essentia.streaming`` network (those are C++ only). A streaming network can
feed it through a Pool: ``MonoLoader.audio >> (pool, "audio")``, run the
network, then ``OnnxPredictMERT(...)(pool)`` (see docs/EXTRACTORS.md).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from mert_plugin.errors import AudioError, MERTError

from .essentia_meta import LAYER_OUTPUT_PREFIX, parse_layer_output
from .onnx_model import INPUT_NAME, OUTPUT_ALL, OUTPUT_LAST, OnnxMERT, plan_fixed_windows

ALGORITHM_NAME = "OnnxPredictMERT"
LAST_PATCH_MODES = ("pad", "repeat", "discard")

# name -> (default, type and range as on Essentia's reference pages, description)
PARAMETERS: Dict[str, tuple] = {
    "graphFilename": ("", "string", "the name of the .onnx file written by mert-export-onnx (the sample rate and "
                                    "window are read from FILE.json next to it, else from the graph)"),
    "output": (OUTPUT_LAST, "string",
               "the graph output to return: 'hidden_state_N' (hidden state N, 0 = encoder input; FILE.json marks "
               "the one recommended for transfer with output_purpose 'embeddings'), 'last_hidden_state', or "
               "'hidden_states' (all of them; 'all' is a synonym). 'layer_N' is accepted too, with N negative "
               "counting from the end"),
    "batchSize": (4, "integer ∈ [-1, ∞)",
                  "the number of windows per onnxruntime call. Set it to -1 or 0 to run all the windows of the "
                  "input in a single call (memory grows with the input length)"),
    "patchHopSize": (0, "integer ∈ [0, ∞)",
                     "the number of samples between the beginnings of adjacent windows, rounded down to the "
                     "320-sample frame hop, at least one hop and at most one window; a hop of one window or "
                     "more than the window's frames cover means no overlap. 0: the window minus one second "
                     "(96000 samples for a 5 s window, i.e. 1 s of overlap)"),
    "lastPatchMode": ("pad", "string ∈ {pad, repeat, discard}",
                      "what to do with a window that the audio does not fill (a signal shorter than one window, "
                      "or the last window of a longer one, which is short by less than one hop): 'pad' zero-pads "
                      "it and masks the padding out (exact: every frame equals an unpadded run), 'repeat' fills "
                      "it by repeating its samples from the start, as Essentia's TensorflowPredict* repeat "
                      "frames (approximate: the repeated audio is context for the real frames), 'discard' runs "
                      "complete windows only (a signal shorter than one window gives no frames). 'pad' and "
                      "'repeat' return one frame per 320 samples of the input"),
    "numThreads": (0, "integer ∈ [0, ∞)", "onnxruntime intra-op threads (0: onnxruntime's default)"),
}


class OnnxPredictMERT:
    """MERT hidden states of mono audio at the model's rate (24 kHz).

    Input: a 1-D float32 array (``MonoLoader(sampleRate=24000)`` output), or an
    ``essentia.Pool`` holding it under ``"audio"`` (``pool.set("audio", x)``).
    Output: float32 [frames, D] (``output="all"``: [L+1, frames, D]); for Pool
    input, a Pool with that array under the output's name (``"hidden_states"``
    for ``"all"``) as a rank-4 tensor [1, 1, frames, D] / [1, L+1, frames, D].
    """

    __doc__ += "\n\nParameters:\n" + "\n".join(f"  {k} ({v[1]}, default = {v[0]!r}):\n    {v[2]}"
                                               for k, v in PARAMETERS.items())

    def __init__(self, **params: Any):
        self._params: Dict[str, Any] = {k: v[0] for k, v in PARAMETERS.items()}
        self._model: Optional[OnnxMERT] = None
        self._model_key = None
        self.configure(**params)

    # ------------------------------------------------------- Essentia protocol
    def name(self) -> str:
        return ALGORITHM_NAME

    def parameterNames(self) -> List[str]:
        return list(PARAMETERS)

    def paramValue(self, name: str) -> Any:
        if name not in PARAMETERS:
            raise MERTError(f"{ALGORITHM_NAME}: no parameter named {name!r}; parameters are {list(PARAMETERS)}")
        return self._params[name]

    def inputNames(self) -> List[str]:
        return ["signal"]

    def outputNames(self) -> List[str]:
        return ["embeddings"]

    def reset(self) -> None:
        """Stateless between calls; present for Essentia compatibility."""

    def configure(self, **params: Any) -> None:
        """Set parameters (unnamed ones keep their current values) and load the graph if it changed."""
        unknown = sorted(set(params) - set(PARAMETERS))
        if unknown:
            raise MERTError(f"{ALGORITHM_NAME}: unknown parameter(s) {unknown}; parameters are {list(PARAMETERS)}")
        new = dict(self._params, **params)
        if not new["graphFilename"]:
            raise MERTError(f"{ALGORITHM_NAME}: graphFilename is required (a .onnx file from mert-export-onnx)")
        for key in ("batchSize", "patchHopSize", "numThreads"):
            if isinstance(new[key], bool) or not isinstance(new[key], (int, np.integer)):
                raise MERTError(f"{ALGORITHM_NAME}: {key} must be an integer, got {new[key]!r}")
        if new["lastPatchMode"] not in LAST_PATCH_MODES:
            raise MERTError(f"{ALGORITHM_NAME}: lastPatchMode must be one of {list(LAST_PATCH_MODES)}, "
                            f"got {new['lastPatchMode']!r}")
        if new["batchSize"] < -1:
            raise MERTError(f"{ALGORITHM_NAME}: batchSize must be >= 1, or -1 or 0 (all windows in one call), "
                            f"got {new['batchSize']}")
        if new["patchHopSize"] < 0 or new["numThreads"] < 0:
            bad = "patchHopSize" if new["patchHopSize"] < 0 else "numThreads"
            raise MERTError(f"{ALGORITHM_NAME}: {bad} must be >= 0, got {new[bad]}")
        key = (str(new["graphFilename"]), int(new["numThreads"]))
        model = self._model if key == self._model_key else OnnxMERT(key[0], num_threads=key[1])
        info = model.info
        hop = int(new["patchHopSize"]) or info.window - info.sample_rate
        if not info.hop_length <= hop <= info.window:
            raise MERTError(f"{ALGORITHM_NAME}: patchHopSize must be 0 or in [{info.hop_length}, {info.window}] "
                            f"samples for this graph, got {new['patchHopSize']}")
        # On the frame grid, and no further than the frames one window gives: a longer hop
        # would leave frames that no window computes.
        hop = min(hop // info.hop_length, info.frames_per_window) * info.hop_length
        self._layers = _parse_output(str(new["output"]), info.num_hidden_states)
        self._params, self._model, self._model_key, self._hop = new, model, key, hop

    def compute(self, signal):
        """Run on a 1-D float32 signal (or a Pool holding it under ``"audio"``)."""
        import essentia

        if isinstance(signal, essentia.Pool):
            return self._compute_pool(signal)
        return self._compute_array(signal)

    __call__ = compute

    # ------------------------------------------------------------ internals
    def _compute_array(self, signal) -> np.ndarray:
        info = self._model.info
        audio = _check_signal(signal, info.receptive_field, info.sample_rate)
        mode = self._params["lastPatchMode"]
        frames = None
        if mode == "repeat":
            audio, frames = _repeat_last_window(audio, info, self._hop)
        batch = self._params["batchSize"]
        states = self._model.encode(audio, layers=self._layers, overlap=info.window - self._hop,
                                    batch_size=len(audio) if batch in (-1, 0) else batch,
                                    last_patch="discard" if mode == "discard" else "pad")
        if frames is not None:
            states = states[:, :frames]
        return states if self._layers is None or len(self._layers) > 1 else states[0]

    def _compute_pool(self, pool):
        import essentia

        if INPUT_NAME not in pool.descriptorNames():
            raise AudioError(f"{ALGORITHM_NAME}: the input Pool has no '{INPUT_NAME}' descriptor "
                             f"(it has {pool.descriptorNames()}); use pool.set('{INPUT_NAME}', signal)")
        value = pool[INPUT_NAME]
        if isinstance(value, list) or np.ndim(value) != 1:
            shape = [len(value)] if isinstance(value, list) else list(np.shape(value))
            raise AudioError(f"{ALGORITHM_NAME}: Pool '{INPUT_NAME}' holds {shape} values (e.g. from pool.add "
                             f"of whole vectors); it must hold one mono signal: connect a streaming network's "
                             f"audio with `loader.audio >> (pool, '{INPUT_NAME}')`, or use "
                             f"pool.set('{INPUT_NAME}', signal)")
        result = self._compute_array(value)
        tensor = result[None] if result.ndim == 3 else result[None, None]
        out = essentia.Pool()
        out.set(self._pool_key(), np.ascontiguousarray(tensor, dtype=np.float32))
        return out

    def _pool_key(self) -> str:
        output = self._params["output"]
        return OUTPUT_ALL if output == "all" else output


def _parse_output(output: str, num_states: int) -> Optional[List[int]]:
    """Hidden-state indices an ``output`` name selects (None = all of them), or a clear error."""
    if output in ("all", OUTPUT_ALL):
        return None
    if output == OUTPUT_LAST:
        return [num_states - 1]
    index = parse_layer_output(output)
    if index is not None and index < num_states:
        return [index]
    if output.startswith("layer_"):
        try:
            idx = int(output[len("layer_"):])
        except ValueError:
            idx = None
        if idx is not None and -num_states <= idx < num_states:
            return [idx % num_states]
    raise MERTError(f"{ALGORITHM_NAME}: output must be '{LAYER_OUTPUT_PREFIX}N' with N in [0, {num_states - 1}], "
                    f"'{OUTPUT_LAST}' or '{OUTPUT_ALL}' (or 'all', or 'layer_N' with N negative from the end), "
                    f"got {output!r}")


def _repeat_last_window(audio: np.ndarray, info, hop: int):
    """``lastPatchMode="repeat"``: extend ``audio`` so that no window is short; return it and the frame count.

    The window the audio does not fill is filled by repeating its own samples
    from its start (as Essentia's ``VectorRealToTensor`` repeats frames), and is
    then run unmasked like any full window. Only the frames of the real input
    are kept: ``info.num_frames(len(audio))`` of them.
    """
    n = audio.shape[0]
    frames = info.num_frames(n)
    if n < info.window:
        return np.resize(audio, info.window), frames
    plan, _ = plan_fixed_windows(n, info.window, info.window - hop, info.hop_length, info.receptive_field, "pad")
    last = plan[-1]
    real = min(last.sample_end, n) - last.sample_start
    if real >= info.window:
        return audio, frames
    # The extension ends the last window at sample_start + window; the plan's windows and
    # frame count stay the same (the extension is shorter than one hop).
    filled = np.resize(audio[last.sample_start:], info.window)
    return np.concatenate([audio, filled[real:]]), frames


def _check_signal(signal, receptive_field: int, sample_rate: int) -> np.ndarray:
    """A finite mono float32 signal [N] with N >= the receptive field, or a clear error."""
    try:
        audio = np.asarray(signal)
    except Exception:  # e.g. ragged lists
        raise AudioError(f"{ALGORITHM_NAME}: input is not an array of samples ({type(signal).__name__})") from None
    if audio.dtype.kind != "f":
        raise AudioError(f"{ALGORITHM_NAME}: expected float samples (MonoLoader output), got dtype {audio.dtype}")
    if audio.ndim != 1:
        hint = " (mix stereo down first, e.g. with MonoLoader or MonoMixer)" if audio.ndim == 2 else ""
        raise AudioError(f"{ALGORITHM_NAME}: expected a mono signal as a 1-D array, got shape "
                         f"{list(audio.shape)}{hint}")
    if audio.size < receptive_field:
        raise AudioError(f"{ALGORITHM_NAME}: signal too short: {audio.size} samples; at least {receptive_field} "
                         f"({receptive_field / sample_rate * 1000:.1f} ms at {sample_rate} Hz) give one frame")
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if not np.isfinite(audio).all():
        raise AudioError(f"{ALGORITHM_NAME}: signal contains NaN or infinite samples")
    return audio


def _register() -> None:
    """Make ``essentia.standard.OnnxPredictMERT`` resolve to this class (if essentia is installed)."""
    try:
        import essentia.standard as es
    except ImportError:
        return
    setattr(es, ALGORITHM_NAME, OnnxPredictMERT)


_register()
