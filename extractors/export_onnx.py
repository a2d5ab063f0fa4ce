"""``mert-export-onnx``: a fixed-window ONNX graph of a MERT model, gated on parity.

The graph takes ``audio`` [batch, W] float32 (W = window in samples, default
5 s at the model's rate = 120000 -> 374 frames) and, optionally,
``num_samples`` [batch] (real samples per zero-padded window; default W), and
returns

* ``last_hidden_state`` [batch, T_w, D]
* ``hidden_states``     [batch, L+1, T_w, D] (all hidden states, stacked)

with only the batch axis dynamic, as Essentia's ``OnnxPredict`` requires
(every non-batch output dim static). It is exported with the dynamo-based
``torch.onnx`` exporter, checked against the PyTorch model with onnxruntime on
noise and on a synthetic chord (batch 1 and 2, and a short masked window), and
written only if the max abs difference is within ``tolerance`` (1e-4).
``FILE.json`` next to it holds Essentia-style model metadata
(``schema.inputs[0].shape`` = [batch, W]).

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
import datetime
import logging
import os
import sys
import warnings
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mert_plugin.atomic import json_text, pending_file, remove_stale_temporaries
from mert_plugin.errors import MERTError, run_cli
from mert_plugin.model import MERTModel, conv_output_lengths

from .onnx_model import INPUT_LENGTHS, INPUT_NAME, OUTPUT_ALL, OUTPUT_LAST, PROP_PREFIX, metadata_path

DEFAULT_TOLERANCE = 1e-4
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
        return states[-1], torch.stack(states, dim=1)


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


def parity_inputs(window: int, sample_rate: int) -> Dict[str, np.ndarray]:
    """Two test signals of ``window`` samples: seeded noise and a decaying A-minor chord with vibrato."""
    rng = np.random.default_rng(0)
    t = np.arange(window) / sample_rate
    chord = sum(np.sin(2 * np.pi * f * t + 0.3 * np.sin(2 * np.pi * 5 * t)) for f in (220.0, 261.63, 329.63))
    chord = 0.3 * chord * np.exp(-t / 2.0) + 0.01 * rng.standard_normal(window)
    noise = 0.1 * rng.standard_normal(window)
    return {"noise": noise.astype(np.float32), "chord": chord.astype(np.float32)}


def check_parity(model: MERTModel, graph_path: str, window: int, num_threads: int = 0) -> Dict[str, float]:
    """Max |onnxruntime - PyTorch| per output.

    Cases: noise and chord alone (batch 1, ``audio`` only), both together (batch
    2), and a batch of a full window plus a short one (``num_samples`` given),
    whose valid frames are compared with ``model`` on the unpadded audio.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(graph_path, opts, providers=["CPUExecutionProvider"])
    sig = parity_inputs(window, model.sample_rate)
    short = max(model.config.receptive_field, window * 2 // 5)
    cases = [([sig["noise"]], None), ([sig["chord"]], None), ([sig["chord"], sig["noise"]], None),
             ([sig["noise"], sig["chord"]], [window, short])]
    worst = {OUTPUT_LAST: 0.0, OUTPUT_ALL: 0.0}
    for signals, lengths in cases:
        feed = {INPUT_NAME: np.stack(signals)}
        if lengths is not None:
            feed[INPUT_LENGTHS] = np.asarray(lengths, dtype=np.float32)
        got_last, got_all = session.run([OUTPUT_LAST, OUTPUT_ALL], feed)
        for b, x in enumerate(signals):
            n = window if lengths is None else lengths[b]
            with torch.inference_mode():
                out = model(torch.from_numpy(x[:n])[None])
            ref_last, ref_all = out.last_hidden_state[0].numpy(), torch.stack(out.hidden_states, 1)[0].numpy()
            t = ref_last.shape[0]
            for name, got, ref in ((OUTPUT_LAST, got_last[b, :t], ref_last), (OUTPUT_ALL, got_all[b, :, :t], ref_all)):
                if got.shape != ref.shape:
                    raise ParityError(f"onnxruntime returned {name} shaped {list(got.shape)}, "
                                      f"PyTorch {list(ref.shape)}")
                diff = float(np.nan_to_num(np.abs(got - ref), nan=np.inf).max())
                worst[name] = max(worst[name], diff)
    return worst


def export_onnx(model: MERTModel, output: str, window_seconds: float = 5.0, tolerance: float = DEFAULT_TOLERANCE,
                name: Optional[str] = None, description: Optional[str] = None,
                weights_license: Optional[str] = None, source: Optional[str] = None,
                verbose: bool = False) -> Dict:
    """Export ``model`` to ``output`` (``.onnx``) and ``output``'s ``.json``; return the metadata.

    Raises :class:`ParityError` (and writes nothing) if onnxruntime and PyTorch
    differ by more than ``tolerance``. Puts ``model`` in eval mode.
    """
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
    with pending_file(output) as graph, pending_file(final_json) as graph_json:
        output_ops = _export_graph(wrapper, graph.path, window, cfg, verbose)
        diffs = check_parity(model, graph.path, window)
        worst = max(diffs.values())
        if not worst <= tolerance:
            raise ParityError(f"ONNX export failed the parity check: max |onnxruntime - PyTorch| = {worst:.3g} "
                              f"> {tolerance:.0e} ({', '.join(f'{k} {v:.3g}' for k, v in diffs.items())}); "
                              f"nothing was written to {output}")
        meta = build_metadata(model, output, window, diffs, tolerance, name=name, description=description,
                              weights_license=weights_license, source=source, output_ops=output_ops)
        with open(graph_json.path, "w", encoding="utf-8") as f:
            f.write(json_text(meta, sort_keys=False))  # MTG's field order
        # Order matters for a kill between the renames: never pair a new graph with old metadata.
        if os.path.exists(final_json):
            os.unlink(final_json)
        graph.commit()
        graph_json.commit()
        return meta


def _export_graph(wrapper: ExportWrapper, path: str, window: int, cfg, verbose: bool) -> Dict[str, str]:
    """Dynamo export: batch axis dynamic, all other dims static, one self-contained file.

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
    onnx_log = logging.getLogger("torch.onnx")
    old_level = onnx_log.level
    with warnings.catch_warnings():
        if not verbose:  # the exporter warns about optional torchvision ops and deprecations
            warnings.simplefilter("ignore")
            onnx_log.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(wrapper, (example, lengths), dynamo=True,
                                        input_names=[INPUT_NAME, INPUT_LENGTHS],
                                        output_names=[OUTPUT_LAST, OUTPUT_ALL],
                                        dynamic_shapes={"audio": {0: batch}, "num_samples": {0: batch}},
                                        verbose=verbose)
        except ModuleNotFoundError as exc:
            raise MERTError(f"ONNX export needs the '{exc.name}' package (pip install onnxscript onnx)") from None
        finally:
            onnx_log.setLevel(old_level)
    ir_model = program.model
    graph = ir_model.graph
    for value in graph.outputs:
        dims = list(value.shape)
        if any(not isinstance(d, int) for d in dims[1:]):
            raise MERTError(f"exported output {value.name} has a dynamic non-batch shape {dims}; "
                            "Essentia's OnnxPredict needs static shapes")
    _drop_softmax_nan_guards(graph)
    lengths_input = next(v for v in graph.inputs if v.name == INPUT_LENGTHS)
    lengths_input.const_value = ir.tensor(np.array([window], dtype=np.float32), name=INPUT_LENGTHS)
    graph.register_initializer(lengths_input)
    props = {"sample_rate": cfg.sample_rate, "window_samples": window, "hop_length": cfg.hop_length,
             "receptive_field": cfg.receptive_field, "num_hidden_states": cfg.num_hidden_states,
             "hidden_size": cfg.hidden_size}
    for k, v in props.items():
        ir_model.metadata_props[PROP_PREFIX + k] = str(v)
    ir_model.doc_string = "MERT encoder, fixed-window export by mert-export-onnx (mert-plugin)"
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
                   output_ops: Optional[Dict[str, str]] = None) -> Dict:
    """Essentia model metadata (the fields of MTG's ``*.json`` files) for the exported graph."""
    import onnx
    import onnxruntime

    cfg = model.config
    frames = cfg.num_frames(window)
    states, dim = cfg.num_hidden_states, cfg.hidden_size
    stem = os.path.splitext(os.path.basename(output))[0]
    source = source or "unknown weights"
    ops = output_ops or {}
    return {
        "name": name or stem,
        "type": "audio embedding extractor (self-supervised music encoder)",
        "link": "",
        "version": "1",
        "description": description or (
            f"MERT encoder ({cfg.num_hidden_layers} layers x {dim}) from {source}, exported as a fixed "
            f"{window / cfg.sample_rate:g} s window ({window} samples at {cfg.sample_rate} Hz) giving {frames} "
            f"frames ({cfg.frame_rate:g} frames/s). Outputs: last_hidden_state and all {states} hidden "
            "states. Longer audio is cut into windows overlapping by 1 s (patchHopSize) and stitched."),
        "author": "",
        "email": "",
        "release_date": datetime.date.today().isoformat(),
        "framework": "onnx",
        "framework_version": onnx.__version__,
        "model_types": ["onnx"],
        "weights_license": weights_license or default_weights_license(source),
        "citation": MERT_CITATION,
        "schema": {
            "inputs": [
                {"name": INPUT_NAME, "type": "float", "shape": ["batch_size", window]},
                {"name": INPUT_LENGTHS, "type": "float", "shape": ["batch_size"], "optional": True,
                 "default": [window],
                 "description": "real samples per window (the rest is padding and is masked out); "
                                "leave unset for full windows"},
            ],
            "outputs": [
                {"name": OUTPUT_LAST, "type": "float", "shape": ["batch_size", frames, dim],
                 "op": ops.get(OUTPUT_LAST, ""), "output_purpose": "embeddings"},
                {"name": OUTPUT_ALL, "type": "float", "shape": ["batch_size", states, frames, dim],
                 "op": ops.get(OUTPUT_ALL, ""), "output_purpose": ""},
            ],
        },
        "inference": {
            "sample_rate": cfg.sample_rate,
            "algorithm": "OnnxPredictMERT",
            "window_samples": window,
            "frames_per_window": frames,
            "hop_length": cfg.hop_length,
            "receptive_field": cfg.receptive_field,
            "frame_rate": cfg.frame_rate,
            "patch_hop_size": window - cfg.sample_rate,
            "num_hidden_states": states,
            "hidden_size": dim,
        },
        "export": {
            "source": source,
            "exporter": f"torch.onnx (dynamo) {torch.__version__}",
            "parity_max_abs_diff": diffs,
            "parity_tolerance": tolerance,
            "parity_runtime": f"onnxruntime {onnxruntime.__version__}",
        },
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
    p.add_argument("--window-seconds", type=float, default=5.0, help="fixed input window (default 5 s)")
    p.add_argument("--name", help="model name in the metadata (default: the output file stem)")
    p.add_argument("--description", help="description in the metadata")
    p.add_argument("--weights-license", help="licence of the weights, recorded in the metadata")
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
                       verbose=args.verbose)
    diff = max(meta["export"]["parity_max_abs_diff"].values())
    print(f"wrote {args.output} and {metadata_path(args.output)} (window {meta['inference']['window_samples']} "
          f"samples -> {meta['inference']['frames_per_window']} frames; parity max abs diff {diff:.2e})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
