"""bench/fast_mode_probes.py: the accuracy contract's rules (summed seed spread, cosine on every clip, NO when
any criterion fails), on hand-made reports; nothing is extracted or trained."""
import importlib.util
from pathlib import Path

import numpy as np

_PATH = Path(__file__).resolve().parent.parent / "bench" / "fast_mode_probes.py"
_spec = importlib.util.spec_from_file_location("fast_mode_probes", _PATH)
fmp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fmp)

REF = fmp.REFERENCE


def _entry(ref, ref_std, **modes):
    e = {"metric": "accuracy", REF: ref, f"{REF}_std": ref_std}
    for name, (score, std) in modes.items():
        e[name.replace("_", " ")], e[f"{name.replace('_', ' ')}_std"] = score, std
    return e


def _cos(worst):
    return {"clips": 3, "layer_mean": [0.9999] * 5, "worst_clip_layer_mean": worst, "worst_clip": "x.wav",
            "worst_layer": 0, "min_frame": worst - 0.01}


def test_within_spread_uses_the_summed_seed_spread():
    assert fmp.within_spread(0.50, 0.02, 0.53, 0.01)        # 0.03 <= 0.02 + 0.01 (ties pass, float noise aside)
    assert not fmp.within_spread(0.50, 0.02, 0.531, 0.01)
    assert fmp.within_spread(0.50, 0.02, 0.47, 0.01)        # a loss and a gain are judged alike
    assert fmp.within_spread(0.50, 0.0, 0.50, 0.0) and not fmp.within_spread(0.50, 0.0, 0.51, 0.0)


def test_a_mode_meets_the_contract_only_if_every_criterion_passes():
    probe = {"pitch": _entry(0.50, 0.02, onnx_int8=(0.49, 0.01), torch_bf16=(0.40, 0.01)),
             "key": _entry(0.10, 0.03, onnx_int8=(0.12, 0.02), torch_bf16=(0.10, 0.0))}
    cosines = {"onnx int8": _cos(0.9995), "torch bf16": _cos(0.9999), "onnx fp16": _cos(0.98)}
    v = fmp.mode_verdicts(probe, cosines, ["onnx int8", "torch bf16", "onnx fp16"])
    passed = {m: [ok for _, ok, _ in checks] for m, checks in v.items()}
    # cosine (layer mean), frame, pitch, key; no gates given: no gate criterion
    assert passed["onnx int8"] == [True, True, True, True]
    assert passed["torch bf16"] == [True, True, False, True]        # pitch: -0.10 against a spread of 0.03
    assert passed["onnx fp16"] == [False, False, False, False]      # cosine and frame too low, probed on no task
    assert [d for n, _, d in v["torch bf16"] if n.startswith("pitch")] == ["-0.100 vs 0.030"]
    assert fmp.mode_verdicts(probe, {}, ["onnx int8"])["onnx int8"][0][1] is False  # no cosine: not met


def test_cosine_summary_finds_the_worst_clip_and_layer():
    per_clip = {"a.wav": np.array([0.999, 0.998]), "b.wav": np.array([0.997, 0.9999])}
    lowest = {"a.wav": np.array([0.99, 0.98]), "b.wav": np.array([0.95, 0.99])}
    s = fmp.cosine_summary(per_clip, lowest)
    assert s["worst_clip"] == "b.wav" and s["worst_layer"] == 0 and s["worst_clip_layer_mean"] == 0.997
    assert np.allclose(s["layer_mean"], [0.998, 0.99895]) and s["min_frame"] == 0.95 and s["clips"] == 2


def _names_failed(checks):
    return [n for n, ok, _ in checks if not ok]


def test_a_lost_frame_or_a_failed_export_gate_alone_fails_the_mode():
    probe = {"pitch": _entry(0.50, 0.02, onnx_int8=(0.50, 0.01), onnx_fp16=(0.50, 0.01))}
    lost_frame = dict(_cos(0.9995), min_frame=0.51)              # every layer mean fine, one frame lost
    cosines = {"onnx int8": lost_frame, "onnx fp16": _cos(0.9999)}
    gates = {"onnx int8": (True, "int8 gate 0.99950 >= 0.99"), "onnx fp16": (False, "fp16 gate 0.99850 < 0.999")}
    v = fmp.mode_verdicts(probe, cosines, ["onnx int8", "onnx fp16"], gates=gates)
    assert _names_failed(v["onnx int8"]) == [f"frame >= {fmp.CONTRACT_FRAME}"]
    assert _names_failed(v["onnx fp16"]) == ["export gate"]
    assert [n for n, _, _ in v["onnx fp16"]] == [f"cosine >= {fmp.CONTRACT_COSINE}", f"frame >= {fmp.CONTRACT_FRAME}",
                                                 "export gate", "pitch within seed spread"]
