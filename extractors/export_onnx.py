"""``mert-export-onnx``: a fixed-window ONNX graph of a MERT model, gated on parity.

The graph takes ``audio`` [batch, W] float32 (W = window in samples, default
5 s at the model's rate = 120000 -> 374 frames) and, optionally,
``num_samples`` [batch] (real samples per zero-padded window; default W), and
returns

* ``last_hidden_state`` [batch, T_w, D]
* ``hidden_states``     [batch, L+1, T_w, D] (all hidden states, stacked)
* ``hidden_state_0`` ... ``hidden_state_L`` [batch, T_w, D] (one per hidden
  state, so that Essentia's C++ ``OnnxPredict`` can ask for a layer by name;
  the JSON marks a middle one, :func:`extractors.essentia_meta.recommended_layer`,
  with ``output_purpose: "embeddings"``)

with only the batch axis dynamic, as Essentia's ``OnnxPredict`` requires
(every non-batch output dim static). It is exported with the dynamo-based
``torch.onnx`` exporter, checked against the PyTorch model with onnxruntime on
noise and on a synthetic chord (batch 1 and 2, and a short masked window), and
written only if the max abs difference is within ``tolerance`` (1e-4).
``FILE.json`` next to it holds Essentia-style model metadata
(``schema.inputs[0].shape`` = [batch, W]).

Options: ``length="dynamic"`` (``--length dynamic``) makes the sample axis
dynamic too (any input length, for the Python runners; Essentia's C++
``OnnxPredict`` needs the default fixed window). ``quantize="fp16"|"int8"``
(``--quantize``) converts the checked fp32 graph to fp16 compute or int8
dynamically quantised MatMuls (float32 inputs and outputs either way) and gates
it on accuracy instead: every hidden state's mean frame cosine similarity to
PyTorch fp32 on the test signals must reach ``QUANTIZE_MIN_COSINE`` (the
measured figures go into the metadata). ``attention="fused"``
(``--attention fused``, the default of dynamic-length graphs) writes each
layer's attention as one onnxruntime ``com.microsoft.MultiHeadAttention`` node
(its CPU flash-attention kernel) instead of opset-20 MatMul/Softmax; see
:func:`_fused_attention`. Every graph has its weight expressions folded into
plain initializers (:func:`_fold_weights`), so that the quantiser sees each
linear layer's weight, the q/k/v projection included.

Nothing half-written is ever left behind: both files are written under
temporary names in the target folder and renamed into place after the checks;
an older ``FILE.json`` is removed before the new graph is renamed in, so a
graph is never paired with metadata of another export.

Usage::

    mert-export-onnx --model path/to/MERT-v1-95M --output mert95m.onnx
    mert-export-onnx --preset mert-tiny --output tiny.onnx   # random weights (tests, demos)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import sys
import types
import warnings
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mert_plugin.atomic import json_text, pending_file, remove_stale_temporaries
from mert_plugin.errors import MERTError, run_cli
from mert_plugin.model import MERTModel, conv_output_lengths

from .essentia_meta import (layer_output_name, onnxpredict_call, output_schema, provenance_fields,
                            recommended_layer)
from .onnx_model import INPUT_LENGTHS, INPUT_NAME, OUTPUT_ALL, OUTPUT_LAST, PROP_PREFIX, metadata_path

DEFAULT_TOLERANCE = 1e-4
LENGTHS = ("fixed", "dynamic")
ATTENTIONS = ("standard", "fused")
# Added to the attention score of a padding key by the fused graph's extra head dimension (see
# _fused_attention); exp() of it times the softmax scale is 0 in fp32 (fp16 conversion clamps it to -65504,
# which still is).
_MASKED_KEY_SCORE = -1e9
# Accuracy gate of the quantised graphs: min over hidden states of the mean frame cosine to fp32.
QUANTIZE_MIN_COSINE = {"fp16": 0.999, "int8": 0.99}
MERT_CITATION = """@article{li2023mert,
  title={MERT: Acoustic Music Understanding Model with Large-Scale Self-supervised Training},
  author={Li, Yizhi and Yuan, Ruibin and Zhang, Ge and Ma, Yinghao and Chen, Xingran and Yin, Hanzhi and Xiao, Chenghao and Lin, Chenghua and Ragni, Anton and Benetos, Emmanouil and Gyenge, Norbert and Dannenberg, Roger and Liu, Ruibo and Chen, Wenhu and Xia, Gus and Shi, Yemin and Huang, Wenhao and Wang, Zili and Guo, Yike and Fu, Jie},
  journal={arXiv preprint arXiv:2306.00107},
  year={2023}
}"""


class ParityError(MERTError):
    """The exported graph does not reproduce the PyTorch model; nothing was written."""


class ExportWrapper(nn.Module):
    """The graph's computation: a MERT window that knows how much of it is real audio.

    ``(audio [B, W], num_samples [B] float) -> (last_hidden_state [B, T, D],
    hidden_states [B, L+1, T, D])``. Samples from ``num_samples[b]`` on are
    padding: the conv-0 GroupNorm takes its statistics over the real part only,
    and padded frames are zeroed before the positional conv and are never
    attention keys. So the first ``num_frames(num_samples[b])`` frames equal
    ``model(audio[b, :num_samples[b]])`` -- a short window gives the same
    numbers as an unpadded run, which a plain zero-padded window does not (the
    GroupNorm and attention would see the zeros). With ``num_samples = W`` this
    is exactly ``model(audio)``. This is ``ConvFeatureExtractor`` with a
    length-masked first GroupNorm; everything else is the model's own modules.
    The states are also returned one by one (the graph's ``hidden_state_N`` outputs).
    """

    def __init__(self, model: MERTModel):
        super().__init__()
        self.model = model

    def forward(self, audio: Tensor, num_samples: Tensor):
        cfg = self.model.config
        lengths = num_samples.to(torch.int64)
        layers = self.model.feature_extractor.conv_layers
        x = layers[0].conv(audio.unsqueeze(1))                                   # [B, C, T0]
        if layers[0].layer_norm is not None:
            x = _masked_group_norm(x, layers[0].layer_norm,
                                   torch.div(lengths - cfg.conv_kernel[0], cfg.conv_stride[0],
                                             rounding_mode="floor") + 1)
        x = F.gelu(x)
        for layer in layers[1:]:
            x = layer(x)
        hidden = self.model.feature_projection(x.transpose(1, 2))                 # [B, T, D]
        frames = torch.arange(hidden.shape[1], device=hidden.device)
        frame_mask = frames[None, :] < conv_output_lengths(lengths, cfg)[:, None]  # [B, T]
        states = self.model.encoder(hidden, frame_mask)
        return (states[-1], torch.stack(states, dim=1)) + tuple(states)


def _masked_group_norm(x: Tensor, norm: nn.GroupNorm, valid: Tensor) -> Tensor:
    """GroupNorm(C, C) of x [B, C, T] with statistics over the first ``valid[b]`` steps only.

    Two-pass mean and variance (as GroupNorm itself; the one-pass E[x^2] - E[x]^2
    lost a decimal of parity), then one fused scale-and-shift of x.
    """
    mask = (torch.arange(x.shape[-1], device=x.device)[None, :] < valid[:, None]).unsqueeze(1).to(x.dtype)
    count = mask.sum(-1, keepdim=True).clamp(min=1.0)                        # [B, 1, 1]
    mean = (x * mask).sum(-1, keepdim=True) / count                          # [B, C, 1]
    d = (x - mean) * mask
    var = (d * d).sum(-1, keepdim=True) / count
    scale = norm.weight[None, :, None] * torch.rsqrt(var + norm.eps)
    return x * scale + (norm.bias[None, :, None] - mean * scale)


_FUSED_OP = None  # (torch custom op, its ONNX translation), made on first use


def _fused_attention_op():
    """A torch op ``mert_export::ort_mha(q, k, v, num_heads, scale)`` on [B, T, H*hd] tensors
    (plain SDPA in PyTorch) and its translation to ``com.microsoft.MultiHeadAttention``."""
    global _FUSED_OP
    if _FUSED_OP is not None:
        return _FUSED_OP
    import onnxscript
    from onnx.defs import OpSchema

    @torch.library.custom_op("mert_export::ort_mha", mutates_args=())
    def ort_mha(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float) -> Tensor:
        qh, kh, vh = (x.unflatten(-1, (num_heads, -1)).transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale).transpose(1, 2).flatten(2)

    @ort_mha.register_fake
    def _(q, k, v, num_heads, scale):
        return v.new_empty(q.shape[0], q.shape[1], v.shape[2])

    param = OpSchema.FormalParameter
    schema = OpSchema("MultiHeadAttention", "com.microsoft", 1,
                      inputs=[param("query", "T"), param("key", "T"), param("value", "T")],
                      outputs=[param("output", "T")], type_constraints=[("T", ["tensor(float)"], "")],
                      attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                                  OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")])
    mha = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MultiHeadAttention", schema)

    def ort_mha_onnx(q, k, v, num_heads: int, scale: float):
        return mha(q, k, v, num_heads=num_heads, scale=scale)

    _FUSED_OP = (ort_mha, {torch.ops.mert_export.ort_mha.default: ort_mha_onnx})
    return _FUSED_OP


def _fused_attention_forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
    """``SelfAttention.forward`` as one ``MultiHeadAttention`` node, for the export only.

    onnxruntime's CPU kernel uses flash attention (no [T, T] score matrix in memory) only
    without a key padding mask or attention bias. So padding keys are masked through the
    scores themselves: each head's query gets an extra component 1 and each key an extra
    component 0 (real frame) or ``_MASKED_KEY_SCORE`` (padding), and the softmax scale stays
    1/sqrt(head_dim). A real key's score is exactly the plain one (adding 1 * 0); a padding
    key's is about -1e8 after scaling, whose exp() is 0, as with SDPA's boolean mask.
    """
    b, t, d = x.shape
    heads, hd = self.num_heads, self.head_dim
    w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
    bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
    q, k, v = F.linear(x, w, bias).split(d, dim=-1)
    if attn_mask is not None:
        valid = attn_mask[:, 0, 0, :]                                            # [B, T], True = real
        key_score = torch.zeros_like(valid, dtype=x.dtype).masked_fill(~valid, _MASKED_KEY_SCORE)
        q4, k4 = q.unflatten(-1, (heads, hd)), k.unflatten(-1, (heads, hd))     # [B, T, H, hd]
        q = torch.cat([q4, torch.ones_like(q4[..., :1])], -1).flatten(2)
        k = torch.cat([k4, key_score[:, :, None, None].expand_as(k4[..., :1])], -1).flatten(2)
    out = _fused_attention_op()[0](q, k, v, heads, 1.0 / float(hd) ** 0.5)
    return self.out_proj(out)


@contextlib.contextmanager
def _fused_attention(model: MERTModel):
    """Within the block, every layer of ``model`` runs :func:`_fused_attention_forward`."""
    layers = [layer.attention for layer in model.encoder.layers]
    try:
        for attention in layers:
            attention.forward = types.MethodType(_fused_attention_forward, attention)
        yield
    finally:
        for attention in layers:
            attention.__dict__.pop("forward", None)


def _fold_weights(ir_model) -> None:
    """Fold every expression of weights alone into one initializer (in place).

    The exporter's own folding leaves large tensors alone, so the graph concatenated the
    q, k and v weights on every call (onnxruntime folds that when it loads the graph, so fp32
    speed does not change) and the int8 quantiser, which quantises a MatMul only if its weight
    is an initializer, left the q/k/v projection -- a quarter of the linear layers' work -- in
    fp32. The weight-normed positional convolution folds too.
    """
    from onnxscript.optimizer import fold_constants

    fold_constants(ir_model, input_size_limit=1 << 40, output_size_limit=1 << 40)


def parity_inputs(window: int, sample_rate: int) -> Dict[str, np.ndarray]:
    """Two test signals of ``window`` samples: seeded noise and a decaying A-minor chord with vibrato."""
    rng = np.random.default_rng(0)
    t = np.arange(window) / sample_rate
    chord = sum(np.sin(2 * np.pi * f * t + 0.3 * np.sin(2 * np.pi * 5 * t)) for f in (220.0, 261.63, 329.63))
    chord = 0.3 * chord * np.exp(-t / 2.0) + 0.01 * rng.standard_normal(window)
    noise = 0.1 * rng.standard_normal(window)
    return {"noise": noise.astype(np.float32), "chord": chord.astype(np.float32)}


def _parity_cases(model: MERTModel, window: int, dynamic: bool = False):
    """(signals, lengths) batches of the gates; a dynamic graph also gets other lengths."""
    sig = parity_inputs(window, model.sample_rate)
    short = max(model.config.receptive_field, window * 2 // 5)
    cases = [([sig["noise"]], None), ([sig["chord"]], None), ([sig["chord"], sig["noise"]], None),
             ([sig["noise"], sig["chord"]], [window, short])]
    if dynamic:  # an unpadded length that is not the example's, and a padded batch of it
        odd = window * 3 // 5 + 123
        cases += [([sig["chord"][:odd]], None), ([sig["chord"][:odd], np.concatenate([sig["noise"][:short], np.zeros(
            odd - short, dtype=np.float32)])], [odd, short])]
    return cases


def _session(graph_path: str, num_threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.log_severity_level = 3
    return ort.InferenceSession(graph_path, opts, providers=["CPUExecutionProvider"])


def check_parity(model: MERTModel, graph_path: str, window: int, num_threads: int = 0,
                 dynamic: bool = False) -> Dict[str, float]:
    """Max |onnxruntime - PyTorch| per output.

    Cases: noise and chord alone (batch 1, ``audio`` only), both together (batch
    2), and a batch of a full window plus a short one (``num_samples`` given),
    whose valid frames are compared with ``model`` on the unpadded audio
    (``dynamic``: also an unpadded input of another length, and a padded batch of it).
    """
    session = _session(graph_path, num_threads)
    layer_names = [layer_output_name(i) for i in range(model.config.num_hidden_states)]
    worst = {OUTPUT_LAST: 0.0, OUTPUT_ALL: 0.0, "hidden_state_N": 0.0}
    for signals, lengths in _parity_cases(model, window, dynamic):
        feed = {INPUT_NAME: np.stack(signals)}
        if lengths is not None:
            feed[INPUT_LENGTHS] = np.asarray(lengths, dtype=np.float32)
        got_last, got_all, *got_layers = session.run([OUTPUT_LAST, OUTPUT_ALL] + layer_names, feed)
        for b, x in enumerate(signals):
            n = x.shape[0] if lengths is None else lengths[b]
            with torch.inference_mode():
                out = model(torch.from_numpy(x[:n])[None])
            ref_last, ref_all = out.last_hidden_state[0].numpy(), torch.stack(out.hidden_states, 1)[0].numpy()
            t = ref_last.shape[0]
            pairs = [(OUTPUT_LAST, got_last[b, :t], ref_last), (OUTPUT_ALL, got_all[b, :, :t], ref_all)]
            pairs += [("hidden_state_N", got[b, :t], ref_all[i]) for i, got in enumerate(got_layers)]
            for name, got, ref in pairs:
                if got.shape != ref.shape:
                    raise ParityError(f"onnxruntime returned {name} shaped {list(got.shape)}, "
                                      f"PyTorch {list(ref.shape)}")
                diff = float(np.nan_to_num(np.abs(got - ref), nan=np.inf).max())
                worst[name] = max(worst[name], diff)
    return worst


def frame_cosines(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity of every frame: [..., T, D] x2 -> [..., T] (float64; NaN/Inf count as 0)."""
    got, ref = np.nan_to_num(got.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0), ref.astype(np.float64)
    num = (got * ref).sum(-1)
    den = np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)


def check_accuracy(model: MERTModel, graph_path: str, window: int, num_threads: int = 0,
                   dynamic: bool = False) -> Dict:
    """Frame cosine similarity of a (quantised) graph's hidden states to PyTorch fp32, on the
    parity cases: ``{"layer_mean_cosine": [per state], "layer_min_cosine": [...], "max_abs_diff"}``."""
    session = _session(graph_path, num_threads)
    cos: list = []
    worst = 0.0
    for signals, lengths in _parity_cases(model, window, dynamic):
        feed = {INPUT_NAME: np.stack(signals)}
        if lengths is not None:
            feed[INPUT_LENGTHS] = np.asarray(lengths, dtype=np.float32)
        got_all = session.run([OUTPUT_ALL], feed)[0]
        for b, x in enumerate(signals):
            n = x.shape[0] if lengths is None else lengths[b]
            with torch.inference_mode():
                ref = torch.stack(model(torch.from_numpy(x[:n])[None]).hidden_states, 1)[0].numpy()
            got = got_all[b, :, :ref.shape[1]]
            cos.append(frame_cosines(got, ref))
            worst = max(worst, float(np.nan_to_num(np.abs(got - ref), nan=np.inf).max()))
    per_frame = np.concatenate(cos, axis=1)  # [L+1, all frames]
    return {"layer_mean_cosine": [round(float(v), 6) for v in per_frame.mean(1)],
            "layer_min_cosine": [round(float(v), 6) for v in per_frame.min(1)],
            "max_abs_diff": worst}


def recorded_gate(metadata: Optional[Dict]) -> Tuple[bool, str]:
    """``(passed, detail)``: whether the gate recorded in a graph's JSON (``OnnxMERT.metadata``; None: no JSON)
    passed. fp32 parity max abs diff <= its tolerance and, for a quantised graph, its ``accuracy_vs_fp32``
    lowest layer-mean cosine >= ``min_cosine_required`` (``QUANTIZE_MIN_COSINE`` of its precision when not
    recorded, as in the variants ``bench/onnx_variants.py`` writes). :func:`export_onnx` writes no graph that
    fails; a graph from elsewhere, or a benchmark's variant, may: nothing recorded counts as failed."""
    export = (metadata or {}).get("export")
    if not export:
        return False, "not recorded (no .json metadata with an export block)"
    diffs, tol = export.get("parity_max_abs_diff"), export.get("parity_tolerance")
    if not diffs or tol is None:
        return False, "fp32 parity not recorded"
    worst = max(float(v) for v in diffs.values())
    parity = f"parity {worst:.1e} {'<=' if worst <= tol else '>'} {tol:.0e}"
    if not worst <= tol:
        return False, parity
    precision = export.get("precision", "fp32")
    if precision == "fp32":
        return True, parity
    acc = export.get("accuracy_vs_fp32")
    required = (acc or {}).get("min_cosine_required", QUANTIZE_MIN_COSINE.get(precision))
    if not acc or not acc.get("layer_mean_cosine") or required is None:
        return False, f"{precision} accuracy gate not recorded"
    got = min(float(v) for v in acc["layer_mean_cosine"])
    return got >= required, f"{precision} gate {got:.5f} {'>=' if got >= required else '<'} {required}"


def quantize_graph(src: str, dst: str, mode: str) -> None:
    """Write ``src`` (an fp32 graph) to ``dst`` as fp16 compute or int8 dynamically quantised MatMuls."""
    import onnx

    if mode == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert_float_to_float16(onnx.load(src), keep_io_types=True)
        onnx.save(converted, dst)
    elif mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        ort_log = logging.getLogger()
        old = ort_log.level
        ort_log.setLevel(logging.ERROR)  # "consider pre-processing" advice
        try:
            # MatMuls only: every linear layer (weights folded at export, q/k/v included). The conv
            # stem stays fp32: quantised (ConvInteger, or written as MatMuls) it failed the 0.99 gate on
            # 95M weights -- one activation scale per call loses the quiet frames -- and ConvInteger ran
            # 2.6x slower than fp32 Conv (bench/onnx_variants.py, docs/BENCHMARKS.md).
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        finally:
            ort_log.setLevel(old)
    else:
        raise MERTError(f"quantize must be fp16 or int8, got {mode!r}")


def export_onnx(model: MERTModel, output: str, window_seconds: float = 5.0, tolerance: float = DEFAULT_TOLERANCE,
                name: Optional[str] = None, description: Optional[str] = None,
                weights_license: Optional[str] = None, source: Optional[str] = None,
                verbose: bool = False, length: str = "fixed", quantize: Optional[str] = None,
                embedding_layer: Optional[int] = None, author: Optional[str] = None, email: Optional[str] = None,
                link: Optional[str] = None, dataset: Optional[str] = None, attention: Optional[str] = None) -> Dict:
    """Export ``model`` to ``output`` (``.onnx``) and ``output``'s ``.json``; return the metadata.

    ``embedding_layer`` (default :func:`recommended_layer`) is the hidden state the
    JSON marks for transfer; ``author``, ``email``, ``link`` and ``dataset`` override
    what :func:`extractors.essentia_meta.provenance_fields` derives from ``source``.

    Raises :class:`ParityError` (and writes nothing) if onnxruntime and PyTorch
    differ by more than ``tolerance`` (or, with ``quantize``, if the quantised graph
    misses its cosine gate). ``length="dynamic"``: any input length (``window_seconds``
    is then only the example and test length). ``attention``: ``"standard"`` (opset-20
    ops) or ``"fused"`` (onnxruntime's ``MultiHeadAttention``); default fused for a
    dynamic-length graph, standard for a fixed one (Essentia). Puts ``model`` in eval mode.
    """
    if length not in LENGTHS:
        raise MERTError(f"length must be one of {list(LENGTHS)}, got {length!r}")
    if attention is None:
        attention = "fused" if length == "dynamic" else "standard"
    if attention not in ATTENTIONS:
        raise MERTError(f"attention must be one of {list(ATTENTIONS)}, got {attention!r}")
    if quantize is not None and quantize not in QUANTIZE_MIN_COSINE:
        raise MERTError(f"quantize must be one of {sorted(QUANTIZE_MIN_COSINE)}, got {quantize!r}")
    dynamic = length == "dynamic"
    if embedding_layer is not None and not 0 <= int(embedding_layer) < model.config.num_hidden_states:
        raise MERTError(f"embedding layer {embedding_layer} out of range: the model has hidden states "
                        f"0..{model.config.num_hidden_states - 1}")
    output = os.fspath(output)
    if not output.endswith(".onnx"):
        raise MERTError(f"{output}: the output file name must end in .onnx")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise MERTError(f"{folder}: output folder does not exist")
    cfg = model.config
    window = int(round(window_seconds * cfg.sample_rate))
    frames = cfg.num_frames(window)
    if frames < 1:
        raise MERTError(f"a {window_seconds} s window ({window} samples) is shorter than one frame "
                        f"({cfg.receptive_field} samples)")
    final_json = metadata_path(output)
    for path in (output, final_json):
        remove_stale_temporaries(path)  # a killed export leaves them (a graph can be hundreds of MB)
    # eval() on the exact module exported: dropout and layerdrop must be off in the graph.
    model.eval()
    wrapper = ExportWrapper(model).eval()
    with pending_file(output) as graph, pending_file(final_json) as graph_json, \
            pending_file(output, tag="fp32") as fp32_graph:
        fp32_path = fp32_graph.path if quantize else graph.path
        output_ops = _export_graph(wrapper, fp32_path, window, cfg, verbose, dynamic, attention == "fused")
        diffs = check_parity(model, fp32_path, window, dynamic=dynamic)
        worst = max(diffs.values())
        if not worst <= tolerance:
            raise ParityError(f"ONNX export failed the parity check: max |onnxruntime - PyTorch| = {worst:.3g} "
                              f"> {tolerance:.0e} ({', '.join(f'{k} {v:.3g}' for k, v in diffs.items())}); "
                              f"nothing was written to {output}")
        accuracy = None
        if quantize:
            quantize_graph(fp32_path, graph.path, quantize)
            fp32_graph.discard()
            accuracy = check_accuracy(model, graph.path, window, dynamic=dynamic)
            accuracy["min_cosine_required"] = QUANTIZE_MIN_COSINE[quantize]
            got = min(accuracy["layer_mean_cosine"])
            if not got >= QUANTIZE_MIN_COSINE[quantize]:
                raise ParityError(f"the {quantize} graph failed its accuracy gate: a hidden state's mean frame "
                                  f"cosine to PyTorch fp32 is {got:.6f} < {QUANTIZE_MIN_COSINE[quantize]} "
                                  f"(per state: {accuracy['layer_mean_cosine']}); nothing was written to {output}")
            _set_graph_props(graph.path, {"precision": quantize})
        meta = build_metadata(model, output, window, diffs, tolerance, name=name, description=description,
                              weights_license=weights_license, source=source, output_ops=output_ops,
                              length=length, precision=quantize or "fp32", accuracy=accuracy,
                              embedding_layer=embedding_layer, author=author, email=email, link=link,
                              dataset=dataset, attention=attention)
        with open(graph_json.path, "w", encoding="utf-8") as f:
            f.write(json_text(meta, sort_keys=False))  # MTG's field order
        # Order matters for a kill between the renames: never pair a new graph with old metadata.
        if os.path.exists(final_json):
            os.unlink(final_json)
        graph.commit()
        graph_json.commit()
        return meta


def _set_graph_props(path: str, props: Dict[str, str]) -> None:
    """Add ``mert.*`` metadata_props to the graph at ``path`` (rewritten in place: a temporary)."""
    import onnx

    proto = onnx.load(path)
    for k, v in props.items():
        entry = next((p for p in proto.metadata_props if p.key == PROP_PREFIX + k), None)
        if entry is None:
            entry = proto.metadata_props.add()
            entry.key = PROP_PREFIX + k
        entry.value = str(v)
    onnx.save(proto, path)


def _export_graph(wrapper: ExportWrapper, path: str, window: int, cfg, verbose: bool,
                  dynamic: bool = False, fused: bool = False) -> Dict[str, str]:
    """Dynamo export: batch axis dynamic, all other dims static (``dynamic``: the sample and
    frame axes too), one self-contained file; weight expressions folded (:func:`_fold_weights`);
    ``fused``: attention as ``com.microsoft.MultiHeadAttention`` (:func:`_fused_attention`).

    ``num_samples`` becomes an input with a default value (an overridable
    initializer holding [W]), so callers that feed only ``audio`` -- such as
    Essentia's ``OnnxPredict`` -- get plain full-window results.
    Returns the op type producing each output (recorded in the metadata).
    """
    import onnx_ir as ir

    example = torch.zeros(2, window)  # batch 2, so the exporter does not specialise batch to 1
    example[0].normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([float(window), float(window // 2)])
    batch = torch.export.Dim("batch", min=1, max=1024)
    audio_dims = {0: batch}
    if dynamic:  # up to 1 h per call; at least the receptive field
        audio_dims[1] = torch.export.Dim("samples", min=cfg.receptive_field, max=3600 * cfg.sample_rate)
    onnx_log = logging.getLogger("torch.onnx")
    old_level = onnx_log.level
    with warnings.catch_warnings():
        if not verbose:  # the exporter warns about optional torchvision ops and deprecations
            warnings.simplefilter("ignore")
            onnx_log.setLevel(logging.ERROR)
        try:
            table = _fused_attention_op()[1] if fused else None
            with _fused_attention(wrapper.model) if fused else contextlib.nullcontext():
                program = torch.onnx.export(wrapper, (example, lengths), dynamo=True,
                                            input_names=[INPUT_NAME, INPUT_LENGTHS],
                                            output_names=[OUTPUT_LAST, OUTPUT_ALL] + [
                                                layer_output_name(i) for i in range(cfg.num_hidden_states)],
                                            dynamic_shapes={"audio": audio_dims, "num_samples": {0: batch}},
                                            custom_translation_table=table, verbose=verbose)
        except ModuleNotFoundError as exc:
            raise MERTError(f"ONNX export needs the '{exc.name}' package (pip install onnxscript onnx)") from None
        finally:
            onnx_log.setLevel(old_level)
    ir_model = program.model
    graph = ir_model.graph
    for value in graph.outputs:
        dims = list(value.shape)
        if not dynamic and any(not isinstance(d, int) for d in dims[1:]):
            raise MERTError(f"exported output {value.name} has a dynamic non-batch shape {dims}; "
                            "Essentia's OnnxPredict needs static shapes")
    _drop_softmax_nan_guards(graph)
    _fold_weights(ir_model)
    lengths_input = next(v for v in graph.inputs if v.name == INPUT_LENGTHS)
    lengths_input.const_value = ir.tensor(np.array([window], dtype=np.float32), name=INPUT_LENGTHS)
    graph.register_initializer(lengths_input)
    props = {"sample_rate": cfg.sample_rate, "window_samples": "dynamic" if dynamic else window,
             "hop_length": cfg.hop_length,
             "receptive_field": cfg.receptive_field, "num_hidden_states": cfg.num_hidden_states,
             "hidden_size": cfg.hidden_size}
    for k, v in props.items():
        ir_model.metadata_props[PROP_PREFIX + k] = str(v)
    ir_model.doc_string = (f"MERT encoder, {'dynamic-length' if dynamic else 'fixed-window'} export by "
                           "mert-export-onnx (mert-plugin)")
    program.save(path, external_data=False)
    return {value.name: (value.producer().op_type if value.producer() is not None else "")
            for value in graph.outputs}


def _drop_softmax_nan_guards(graph) -> int:
    """Remove ``Where(IsNaN(p), 0, p)`` after attention softmaxes; returns how many.

    The exporter adds this guard for rows whose keys are all masked. Here every
    row has at least one real key (``num_samples`` >= the receptive field, as the
    runners enforce), so the guard only costs two passes over every attention
    matrix (~7% of the run time). The parity gate checks the result.
    """
    removed = 0
    for node in list(graph):
        if node.op_type != "IsNaN" or node.inputs[0] is None:
            continue
        probs = node.inputs[0]
        users = [use.node for use in node.outputs[0].uses()]
        if probs.producer() is None or probs.producer().op_type != "Softmax" or len(users) != 1:
            continue
        where = users[0]
        if where.op_type != "Where" or where.inputs[0] is not node.outputs[0] or where.inputs[2] is not probs:
            continue
        if where.outputs[0].is_graph_output():
            continue
        where.outputs[0].replace_all_uses_with(probs)
        graph.remove([where, node], safe=True)
        removed += 1
    return removed


def build_metadata(model: MERTModel, output: str, window: int, diffs: Dict[str, float], tolerance: float,
                   name: Optional[str] = None, description: Optional[str] = None,
                   weights_license: Optional[str] = None, source: Optional[str] = None,
                   output_ops: Optional[Dict[str, str]] = None, length: str = "fixed", precision: str = "fp32",
                   accuracy: Optional[Dict] = None, embedding_layer: Optional[int] = None,
                   author: Optional[str] = None, email: Optional[str] = None, link: Optional[str] = None,
                   dataset: Optional[str] = None, attention: str = "standard") -> Dict:
    """Essentia model metadata (the fields of MTG's ``*.json`` files) for the exported graph.

    Every output in ``schema.outputs`` has a description; the recommended hidden
    state (``embedding_layer``, default a middle layer) has ``output_purpose:
    "embeddings"``. ``inference.onnxpredict`` says what a user of Essentia's C++
    ``OnnxPredict`` calls instead of ``OnnxPredictMERT``.

    A dynamic-length graph has ``"num_samples"`` / ``"frames"`` as its non-batch input and
    frame dims and no fixed window (``inference.window_samples`` is null)."""
    import onnx
    import onnxruntime

    cfg = model.config
    frames = cfg.num_frames(window)
    states, dim = cfg.num_hidden_states, cfg.hidden_size
    stem = os.path.splitext(os.path.basename(output))[0]
    source = source or "unknown weights"
    ops = output_ops or {}
    dynamic = length == "dynamic"
    in_len, t_len = ("num_samples", "frames") if dynamic else (window, frames)
    shape_text = ("any input length (dynamic-length graph for Python runners; not for Essentia's C++ "
                  "OnnxPredict)" if dynamic else
                  f"a fixed {window / cfg.sample_rate:g} s window ({window} samples at {cfg.sample_rate} Hz) giving "
                  f"{frames} frames")
    compute = {"fp32": "", "fp16": " Computes in fp16 (float32 inputs and outputs).",
               "int8": " MatMuls dynamically quantised to int8 (float32 inputs and outputs)."}[precision]
    if attention == "fused":
        compute += " Attention is onnxruntime's com.microsoft.MultiHeadAttention (needs onnxruntime)."
    export_block = {
        "source": source,
        "exporter": f"torch.onnx (dynamo) {torch.__version__}",
        "parity_max_abs_diff": diffs,
        "parity_tolerance": tolerance,
        "parity_runtime": f"onnxruntime {onnxruntime.__version__}",
        "length": length,
        "precision": precision,
        "attention": attention,
    }
    if accuracy is not None:  # the quantised graph's own gate (parity_* is that of the fp32 graph it came from)
        export_block["accuracy_vs_fp32"] = accuracy
    k = recommended_layer(cfg.num_hidden_layers) if embedding_layer is None else int(embedding_layer)
    provenance = provenance_fields(source, MERT_CITATION, author=author, email=email, link=link, dataset=dataset)
    onnxpredict = ({"algorithm": "OnnxPredict", "usable": False,
                    "notes": "a dynamic-length graph has no static output shapes, which OnnxPredict needs; "
                             "export with --length fixed"} if dynamic else
                   onnxpredict_call(output, window, frames, dim, k))
    return {
        "name": name or stem,
        "type": "audio embedding extractor (self-supervised music encoder)",
        "link": provenance["link"],
        "version": "1",
        "description": description or (
            f"MERT encoder ({cfg.num_hidden_layers} layers x {dim}) from {source}, exported for {shape_text} "
            f"({cfg.frame_rate:g} frames/s). Outputs: hidden_state_0 .. hidden_state_{states - 1} "
            f"(hidden_state_{k}, a middle layer, is the recommended embedding), last_hidden_state, and all "
            f"{states} stacked as hidden_states. Longer audio is cut into windows overlapping by 1 s "
            "(patchHopSize) and stitched." + compute),
        "author": provenance["author"],
        "email": provenance["email"],
        "release_date": datetime.date.today().isoformat(),
        "framework": "onnx",
        "framework_version": onnx.__version__,
        "classes": provenance["classes"],
        "model_types": ["onnx"],
        "dataset": provenance["dataset"],
        "weights_license": weights_license or default_weights_license(source),
        "citation": MERT_CITATION,
        "schema": {
            "inputs": [
                {"name": INPUT_NAME, "type": "float", "shape": ["batch_size", in_len]},
                {"name": INPUT_LENGTHS, "type": "float", "shape": ["batch_size"], "optional": True,
                 "default": [window] if not dynamic else "the input length",
                 "description": "real samples per window (the rest is padding and is masked out); "
                                "leave unset for full windows"},
            ],
            "outputs": output_schema(cfg.num_hidden_layers, t_len, dim, cfg.do_stable_layer_norm, k, ops),
        },
        "inference": {
            "sample_rate": cfg.sample_rate,
            "algorithm": "OnnxPredictMERT",
            "window_samples": None if dynamic else window,
            "frames_per_window": None if dynamic else frames,
            "hop_length": cfg.hop_length,
            "receptive_field": cfg.receptive_field,
            "frame_rate": cfg.frame_rate,
            "patch_hop_size": None if dynamic else window - cfg.sample_rate,
            "num_hidden_states": states,
            "hidden_size": dim,
            "embedding_output": layer_output_name(k),
            "onnxpredict": onnxpredict,
        },
        "export": export_block,
        "mert_config": cfg.to_dict(),
    }


def default_weights_license(source: str) -> str:
    """What we can say about the weights' licence from where they came from."""
    if source.startswith("preset "):
        return ("none: randomly initialised weights (not trained on any data); "
                "no licence restrictions from pretrained weights")
    if "mert-v1" in source.lower():
        return "CC-BY-NC-4.0 (MERT-v1 weights by m-a-p: non-commercial use only)"
    return f"unknown: weights from {source}; state their licence with --weights-license"


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mert-export-onnx",
        description="Export a MERT model to a fixed-window ONNX graph plus Essentia-style JSON metadata; "
                    "refuses to write if onnxruntime and PyTorch outputs differ by more than 1e-4.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF folder, cached hub id, fairseq .pt or SpeechBrain checkpoint folder")
    src.add_argument("--preset", help="randomly initialised preset (mert-tiny, mert-v1-95m, ...) for tests/demos")
    p.add_argument("--seed", type=int, default=0, help="seed for --preset weights (default 0)")
    p.add_argument("--output", required=True, help="FILE.onnx (FILE.json is written next to it)")
    p.add_argument("--window-seconds", type=float, default=5.0,
                   help="fixed input window (default 5 s); with --length dynamic only the test length")
    p.add_argument("--length", choices=LENGTHS, default="fixed",
                   help="fixed (default): the window is baked in, as Essentia's C++ OnnxPredict needs; dynamic: "
                        "any input length, for mert-extract and the Python runners (no wasted overlap)")
    p.add_argument("--quantize", choices=sorted(QUANTIZE_MIN_COSINE),
                   help="fp16: fp16 compute (for GPUs); int8: int8 dynamically quantised MatMuls (CPU). Gated on "
                        "frame cosine similarity to fp32 instead of the 1e-4 parity (figures in the JSON)")
    p.add_argument("--attention", choices=ATTENTIONS,
                   help="fused: each layer's attention as onnxruntime's com.microsoft.MultiHeadAttention (flash "
                        "attention on the CPU, faster; needs onnxruntime); standard: opset-20 MatMul/Softmax, for any "
                        "ONNX runtime. Default: fused with --length dynamic, standard with fixed (Essentia)")
    p.add_argument("--name", help="model name in the metadata (default: the output file stem)")
    p.add_argument("--description", help="description in the metadata")
    p.add_argument("--weights-license", help="licence of the weights, recorded in the metadata")
    p.add_argument("--embedding-layer", type=int,
                   help="hidden state marked as the embedding output in the metadata (default: a middle layer, "
                        "6 for MERT's 12- and 24-layer models)")
    p.add_argument("--author", help="author in the metadata (default: m-a-p for MERT releases, else 'unknown')")
    p.add_argument("--email", help="contact e-mail in the metadata")
    p.add_argument("--link", help="link in the metadata (default: the release's model page, else the MERT paper)")
    p.add_argument("--dataset", help="name of the training data in the metadata (default: from the source)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--verbose", action="store_true", help="show the exporter's own progress messages")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args), user_error_status=1)


def _run(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.preset:
        model = MERTModel.from_preset(args.preset, seed=args.seed)
        source = f"preset {args.preset} (random weights, seed {args.seed})"
    else:
        model = MERTModel.from_pretrained(args.model)
        source = args.model
    print(f"exporting {source} -> {args.output} ...", file=sys.stderr)
    meta = export_onnx(model, args.output, window_seconds=args.window_seconds, name=args.name,
                       description=args.description, weights_license=args.weights_license, source=source,
                       verbose=args.verbose, length=args.length, quantize=args.quantize,
                       embedding_layer=args.embedding_layer, author=args.author, email=args.email,
                       link=args.link, dataset=args.dataset, attention=args.attention)
    diff = max(meta["export"]["parity_max_abs_diff"].values())
    accuracy = meta["export"].get("accuracy_vs_fp32")
    if accuracy is not None:
        print(f"{args.quantize}: min mean frame cosine to fp32 over hidden states "
              f"{min(accuracy['layer_mean_cosine']):.6f} (gate {accuracy['min_cosine_required']})", file=sys.stderr)
    shape = "any length" if args.length == "dynamic" else \
        f"window {meta['inference']['window_samples']} samples -> {meta['inference']['frames_per_window']} frames"
    print(f"wrote {args.output} and {metadata_path(args.output)} ({shape}; fp32 parity max abs diff {diff:.2e})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
