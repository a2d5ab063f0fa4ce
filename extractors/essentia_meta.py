"""Essentia conventions for an exported MERT graph: output names, model JSON fields, OnnxPredict's contract.

Shared by ``mert-export-onnx`` (which writes the graph and ``FILE.json``) and
``OnnxPredictMERT`` (which reads them). Nothing here imports torch or essentia.

* **Per-layer outputs.** Besides ``last_hidden_state`` and the stacked
  ``hidden_states``, the graph has one output per hidden state,
  ``hidden_state_0`` ... ``hidden_state_L``, so that Essentia's C++
  ``OnnxPredict`` (which selects outputs by name) can ask for one layer.
* **The recommended layer** (``output_purpose: "embeddings"`` in ``FILE.json``)
  is a middle layer, :func:`recommended_layer`: MARBLE, MERT's own evaluation
  suite, probes MERT-v1-95M and -330M on layer 6 more often than on any other
  (MTG mood/theme, MTG top-50, NSynth instrument; the other tasks use layers
  1-10 or a weighted sum of all).
* **The OnnxPredict contract** (MTG/essentia PR #1488, the only OnnxPredict
  there is; no released Essentia has it): every input is a float32 tensor read
  from the input Pool under its ONNX name, rank 4 ``(B, 1, 1, W)`` squeezed to
  ``(B, W)``; the output's *declared* shape, right-aligned into 4 dims with the
  batch of the first input, is the shape stored in the output Pool under the
  output's name. So outputs need rank <= 4 and static non-batch dims.
  :func:`check_onnxpredict_contract` checks a graph against it.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Sequence

from mert_plugin.errors import CheckpointError

LAYER_OUTPUT_PREFIX = "hidden_state_"
MERT_PAPER = "https://arxiv.org/abs/2306.00107"
MERT_ISSUES = "https://github.com/yizhilll/MERT/issues"
MAP_AUTHORS = ("Yizhi Li, Ruibin Yuan, Ge Zhang et al. (m-a-p, Multimodal Art Projection), "
               "MERT: arXiv 2306.00107")
# Released weights: (name in the source, hub id, pre-training audio as stated on m-a-p's model cards).
RELEASES = (
    ("mert-v1-330m", "m-a-p/MERT-v1-330M", "160K hours"),
    ("mert-v1-95m", "m-a-p/MERT-v1-95M", "20K hours"),
    ("mert-v0-public", "m-a-p/MERT-v0-public", "900 hours"),
    ("mert-v0", "m-a-p/MERT-v0", "1000 hours"),
)
# What Essentia's C++ OnnxPredict (PR #1488) can store in a Pool.
ONNXPREDICT_MAX_RANK = 4


def layer_output_name(index: int) -> str:
    """The graph output holding hidden state ``index`` (0 = encoder input, L = last layer)."""
    return f"{LAYER_OUTPUT_PREFIX}{int(index)}"


def parse_layer_output(name: str) -> Optional[int]:
    """``"hidden_state_6"`` -> 6; None for any other name."""
    match = re.fullmatch(re.escape(LAYER_OUTPUT_PREFIX) + r"(\d+)", name)
    return int(match.group(1)) if match else None


def recommended_layer(num_hidden_layers: int) -> int:
    """The hidden state recommended for transfer: 6 for MERT's 12- and 24-layer releases
    (MARBLE's most frequent probing layer for both sizes), the middle layer for other depths."""
    layers = int(num_hidden_layers)
    return 6 if layers in (12, 24) else max(1, layers // 2)


def release_of(source: str) -> Optional[Dict[str, str]]:
    """The m-a-p release a source (path, hub id, or preset description) names, if any."""
    low = os.fspath(source).lower()
    if low.startswith("preset "):
        return None
    for key, hub_id, hours in RELEASES:
        if key in low:
            return {"hub_id": hub_id, "hours": hours}
    return None


def provenance_fields(source: str, citation: str, author: Optional[str] = None, email: Optional[str] = None,
                      link: Optional[str] = None, dataset: Optional[str] = None) -> Dict[str, Any]:
    """``link``, ``author``, ``email``, ``classes`` and ``dataset`` of the model JSON.

    m-a-p releases get their model page, authors and the size of their
    pre-training audio from the model card; random presets say that they saw no
    data; anything else (e.g. a checkpoint of this project's recipe) says
    "unknown" unless the caller states it. Explicit arguments always win.
    """
    release = release_of(source)
    if release is not None:
        fields = {"link": f"https://huggingface.co/{release['hub_id']}", "author": MAP_AUTHORS,
                  "email": f"(no e-mail; contact through {MERT_ISSUES})",
                  "dataset": {"name": f"{release['hub_id']} pre-training audio (m-a-p's music collection, "
                                      "unlabelled: self-supervised; see the MERT paper)",
                              "citation": citation, "size": release["hours"], "metrics": {}}}
    elif os.fspath(source).startswith("preset "):
        fields = {"link": MERT_PAPER,
                  "author": "mert-plugin (random initialisation of the MERT architecture of Li et al.)",
                  "email": "", "dataset": {"name": "none: random initialisation, never trained",
                                           "citation": "", "size": "0 hours", "metrics": {}}}
    else:
        fields = {"link": MERT_PAPER, "author": f"unknown (weights from {source}); state it with --author",
                  "email": "", "dataset": {"name": f"unknown (weights from {source}); state it with --dataset",
                                           "citation": "", "size": "unknown", "metrics": {}}}
    if author:
        fields["author"] = author
    if email:
        fields["email"] = email
    if link:
        fields["link"] = link
    if dataset:
        fields["dataset"] = dict(fields["dataset"], name=dataset)
    # Essentia's embedding extractors (e.g. discogs-effnet's embedding models) carry "classes": [].
    return {"link": fields["link"], "author": fields["author"], "email": fields["email"], "classes": [],
            "dataset": fields["dataset"]}


def state_description(index: int, num_hidden_layers: int, pre_ln: bool) -> str:
    """What hidden state ``index`` is (MERT_SPEC §2.2; transformers' HubertModel semantics)."""
    if index == 0:
        return ("hidden state 0: the encoder input (CNN features projected to the model width plus the "
                + ("positional convolution; not layer-normed)" if pre_ln else
                   "positional convolution, after the encoder LayerNorm)"))
    if index == num_hidden_layers:
        return (f"hidden state {index}: output of the last transformer layer"
                + (" after the final LayerNorm" if pre_ln else "") + " (the same values as last_hidden_state)")
    return (f"hidden state {index}: output of transformer layer {index}"
            + (" (pre-LN residual stream: not layer-normed, its scale grows with depth)" if pre_ln else ""))


def output_schema(num_hidden_layers: int, frames, dim: int, pre_ln: bool, embedding_layer: int,
                  ops: Optional[Dict[str, str]] = None, batch: str = "batch_size") -> List[Dict[str, Any]]:
    """``schema.outputs``: name, type, shape, op, description, output_purpose for every graph output."""
    ops = ops or {}
    states = num_hidden_layers + 1
    per_window = f"{frames} frames per window" if isinstance(frames, int) else "one frame per 320 input samples"
    frame_note = f"{per_window}; frame t covers input samples 320 t .. 320 t + 399 (75 frames/s at 24 kHz, 50 at 16 kHz)"

    def entry(name, shape, description, purpose=""):
        return {"name": name, "type": "float", "shape": shape, "op": ops.get(name, ""),
                "description": description, "output_purpose": purpose}

    outputs = [
        entry("last_hidden_state", [batch, frames, dim],
              f"output of the last transformer layer, [batch, frames, {dim}]; {frame_note}"),
        entry("hidden_states", [batch, states, frames, dim],
              f"all {states} hidden states stacked, [batch, {states}, frames, {dim}]: index 0 is the encoder "
              f"input, index i the output of transformer layer i; {frame_note}"),
    ]
    for i in range(states):
        text = state_description(i, num_hidden_layers, pre_ln) + f", [batch, frames, {dim}]"
        if i == embedding_layer:
            text += ("; recommended for transfer learning (a middle layer: MERT's users and MARBLE's probes "
                     "pick middle layers, the best one depends on the task)")
        outputs.append(entry(layer_output_name(i), [batch, frames, dim], text,
                             "embeddings" if i == embedding_layer else ""))
    return outputs


def onnxpredict_call(graph_file: str, window: int, frames: int, dim: int, embedding_layer: int) -> Dict[str, Any]:
    """What a user of Essentia's C++ ``OnnxPredict`` (PR #1488) calls instead of ``OnnxPredictMERT``."""
    output = layer_output_name(embedding_layer)
    return {
        "algorithm": "OnnxPredict",
        "availability": "not in any released Essentia: a source build of MTG/essentia PR #1488 (--with-onnx)",
        "parameters": {"graphFilename": os.path.basename(graph_file), "inputs": ["audio"], "outputs": [output],
                       "squeeze": True},
        "input_pool": {"audio": ["batch_size", 1, 1, window]},
        "output_pool": {output: ["batch_size", 1, frames, dim]},
        "notes": (f"Cut the mono signal (at inference.sample_rate) into windows of exactly {window} samples "
                  "yourself (no padding: num_samples keeps its default, so every window must be all real audio); "
                  "OnnxPredict returns every window's frames and does no stitching. Any output in "
                  "schema.outputs can be asked for by name; hidden_states comes back as "
                  "[batch_size, L+1, frames, D]."),
    }


def check_onnxpredict_contract(graph_path: str, schema: Optional[Dict[str, Any]] = None,
                               outputs: Optional[Sequence[str]] = None) -> Dict[str, List]:
    """Check a graph against what Essentia's C++ ``OnnxPredict`` needs; return its I/O as OnnxPredict sees it.

    Reads the graph's inputs and outputs through onnxruntime (the library
    OnnxPredict is built on, so names, element types and declared shapes are
    the ones it gets) and checks: one required input, float32, rank 2 with a
    symbolic batch and a static length; each output in ``outputs`` (default:
    all) float32, rank <= 4, batch symbolic, other dims static; and, with
    ``schema`` (the ``schema`` block of ``FILE.json``), that the input and
    every listed output exist in the graph under the schema's names with the
    schema's static dims. Raises :class:`CheckpointError` listing every
    violation. Returns ``{"inputs": [(name, 4-d pool shape)], "outputs": [...]}``
    with ``"batch_size"`` in the batch position.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(os.fspath(graph_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types
        raise CheckpointError(f"{graph_path}: cannot load the ONNX model ({str(exc).strip()[:300]})") from None
    problems: List[str] = []
    inputs = {i.name: i for i in session.get_inputs()}
    declared = {o.name: o for o in session.get_outputs()}
    wanted = list(outputs) if outputs is not None else list(declared)

    def static_tail(shape):
        return all(isinstance(d, int) and d > 0 for d in shape[1:])

    if len(inputs) != 1:
        problems.append(f"expected one required input, found {sorted(inputs)}")
    pool_inputs = []
    for name, value in inputs.items():
        if value.type != "tensor(float)":
            problems.append(f"input {name} is {value.type}, OnnxPredict feeds float32")
        if len(value.shape) != 2 or isinstance(value.shape[0], int) or not static_tail(value.shape):
            problems.append(f"input {name} is shaped {value.shape}; expected [batch, samples] with a symbolic "
                            "batch and a static length")
        else:
            pool_inputs.append((name, ["batch_size", 1, 1, value.shape[1]]))
    pool_outputs = []
    for name in wanted:
        if name not in declared:
            problems.append(f"no output named {name} (the graph has {sorted(declared)})")
            continue
        shape = declared[name].shape
        if declared[name].type != "tensor(float)":
            problems.append(f"output {name} is {declared[name].type}, OnnxPredict reads float32")
        if len(shape) > ONNXPREDICT_MAX_RANK or len(shape) < 2:
            problems.append(f"output {name} has rank {len(shape)}; OnnxPredict stores [batch, ...] outputs of "
                            f"rank 2 to {ONNXPREDICT_MAX_RANK}")
        elif isinstance(shape[0], int) or not static_tail(shape):
            problems.append(f"output {name} is shaped {shape}; OnnxPredict takes the shape it stores from the "
                            "declaration, so every non-batch dim must be static (and the batch symbolic)")
        else:
            pool_outputs.append((name, ["batch_size"] + [1] * (ONNXPREDICT_MAX_RANK - len(shape))
                                 + list(shape[1:])))
    if schema is not None:
        for spec in schema.get("inputs", [])[:1]:
            value = inputs.get(spec.get("name"))
            if value is None:
                problems.append(f"schema input {spec.get('name')!r} is not a required input of the graph "
                                f"({sorted(inputs)})")
            elif list(value.shape[1:]) != list(spec.get("shape", [])[1:]):
                problems.append(f"schema input {spec['name']} is shaped {spec.get('shape')}, the graph "
                                f"{value.shape}")
        for spec in schema.get("outputs", []):
            value = declared.get(spec.get("name"))
            if value is None:
                problems.append(f"schema output {spec.get('name')!r} is not an output of the graph")
            elif list(value.shape[1:]) != list(spec.get("shape", [])[1:]):
                problems.append(f"schema output {spec['name']} is shaped {spec.get('shape')}, the graph "
                                f"{value.shape}")
    if problems:
        raise CheckpointError(f"{graph_path} does not meet Essentia OnnxPredict's contract: "
                              + "; ".join(problems))
    return {"inputs": pool_inputs, "outputs": pool_outputs}
