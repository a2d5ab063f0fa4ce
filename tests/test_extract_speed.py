"""bench/extract_speed.py's accuracy contract: each criterion (layer-mean cosine, lowest single frame, the
ONNX graph's recorded export gate) is checked on its own, and a mode failing any one of them FAILS, named.
Small random weights (mert-tiny) and generated audio; nothing is timed."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from extractors import export_onnx as ex
from extractors.cli import TorchBackend
from extractors.onnx_model import metadata_path
from mert_plugin import MERTModel

_BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(_BENCH))  # the script imports its sibling _common
_spec = importlib.util.spec_from_file_location("extract_speed", _BENCH / "extract_speed.py")
es = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(es)

SR = es.SR


def _failed(checks):
    return [name.split(" ")[0] for name, ok, _ in checks if not ok]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """mert-tiny (seed 0), its int8 dynamic graph as mert-export-onnx writes it, 2 s of generated audio, and
    the torch fp32 hidden states of that audio through mert-extract's windowing (the reference)."""
    model = MERTModel.from_preset("mert-tiny", seed=0).eval()
    path = tmp_path_factory.mktemp("graphs") / "tiny-int8.onnx"
    ex.export_onnx(model, str(path), window_seconds=1.0, length="dynamic", quantize="int8", source="test")
    clip = es.synthetic(2.0)
    layers = list(range(model.config.num_hidden_states))
    ref = es.encode_track(TorchBackend(model, layers, 30 * SR, SR, device="cpu"), clip)
    return path, clip, ref


def _run_graph(path, clip):
    """The graph as the bench's --extra runs it: its hidden states and the gate its JSON records."""
    name, backend, fast = es.extra_backend(f"x={path}", 1, "cpu")
    assert fast  # an int8 graph is a fast mode
    return es.encode_track(backend, clip), ex.recorded_gate(backend.graph.metadata)


def test_the_int8_graph_as_exported_meets_every_criterion(tiny):
    path, clip, ref = tiny
    got, gate = _run_graph(path, clip)
    checks = es.contract_checks(got, ref, gate)
    assert [n.split(" ")[0] for n, _, _ in checks] == ["layer-mean", "frame", "export"]
    assert _failed(checks) == [] and es.contract_verdict(checks).startswith("meets (3/3)")


def test_a_graph_whose_recorded_gate_failed_fails_only_on_the_gate(tiny, tmp_path):
    """Same graph and frames, but its JSON records a gate under the bound (as bench/onnx_variants.py writes for
    a variant it reports instead of refusing): the cosines on the clip pass, the mode still FAILS."""
    path, clip, ref = tiny
    copy = tmp_path / "variant.onnx"
    copy.write_bytes(path.read_bytes())
    meta = json.loads(Path(metadata_path(path)).read_text())
    acc = meta["export"]["accuracy_vs_fp32"]
    acc["layer_mean_cosine"] = [0.98643] + acc["layer_mean_cosine"][1:]
    Path(metadata_path(copy)).write_text(json.dumps(meta))
    got, gate = _run_graph(copy, clip)
    checks = es.contract_checks(got, ref, gate)
    assert _failed(checks) == ["export"]
    verdict = es.contract_verdict(checks)
    assert verdict.startswith("FAILS") and "export gate" in verdict and "0.98643 < 0.99" in verdict
    assert "layer-mean" not in verdict and "frame" not in verdict


def test_a_mode_that_loses_one_frame_fails_only_on_the_frame_criterion(tiny):
    """One frame of one hidden state replaced by noise: every layer's mean stays >= 0.99, the frame does not."""
    _, _, ref = tiny
    got = ref.copy()
    frames = got.shape[1]
    assert frames >= 120  # one lost frame moves its layer's mean by (1 - its cosine) / frames
    got[2, frames // 2] = np.random.default_rng(0).standard_normal(got.shape[2]).astype(np.float32)
    mean_cos, min_cos = es.cosines(got, ref)
    assert mean_cos >= es.CONTRACT and min_cos < es.CONTRACT_FRAME
    for gate in (None, (True, "int8 gate 0.99990 >= 0.99")):  # a torch mode; an ONNX graph whose gate passed
        checks = es.contract_checks(got, ref, gate)
        assert _failed(checks) == ["frame"]
        assert es.contract_verdict(checks).startswith(f"FAILS: frame >= {es.CONTRACT_FRAME} (")


def test_recorded_gate_reads_the_metadata():
    gate = ex.recorded_gate
    parity = {"parity_max_abs_diff": {"hidden_states": 5e-6}, "parity_tolerance": 1e-4}
    assert gate({"export": dict(parity, precision="fp32")})[0]
    assert not gate({"export": {"parity_max_abs_diff": {"hidden_states": 2e-4}, "parity_tolerance": 1e-4,
                                "precision": "fp32"}})[0]
    assert not gate(None)[0]                                            # no JSON: nothing recorded
    assert not gate({"export": dict(parity, precision="int8")})[0]      # quantised, no accuracy figures
    int8 = dict(parity, precision="int8", accuracy_vs_fp32={"layer_mean_cosine": [0.9995, 0.9991]})
    assert gate({"export": int8})[0]                                    # bound from QUANTIZE_MIN_COSINE
    fp16 = dict(parity, precision="fp16", accuracy_vs_fp32={"layer_mean_cosine": [0.9985]})
    assert not gate({"export": fp16})[0]                                # fp16's own bound is 0.999
