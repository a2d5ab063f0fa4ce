"""mert-export-onnx: graph interface, metadata, parity with PyTorch, refusal and crash safety.

Uses mert-tiny (random weights); each export takes a few seconds.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from extractors import export_onnx as ex
from extractors.onnx_model import OnnxMERT, metadata_path
from mert_plugin import MERTModel
from mert_plugin.errors import MERTError

WINDOW = 120000  # 5 s at 24 kHz
FRAMES = 374


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """mert-tiny (seed 3) exported through the command line, plus the same model in PyTorch."""
    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    rc = ex.main(["--preset", "mert-tiny", "--seed", "3", "--output", str(out), "--threads", "1"])
    assert rc == 0
    return out, MERTModel.from_preset("mert-tiny", seed=3).eval()


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _corrupt_one_weight(path):
    """Change one large initializer in place, as a silently wrong exporter would."""
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[: arr.size // 4] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))


def test_graph_has_fixed_window_and_dynamic_batch(exported):
    path, model = exported
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output}
    assert ins["audio"][1:] == [WINDOW] and isinstance(ins["audio"][0], str)
    dim, states = model.config.hidden_size, model.config.num_hidden_states
    assert outs["last_hidden_state"][1:] == [FRAMES, dim]
    assert outs["hidden_states"][1:] == [states, FRAMES, dim]
    for i in range(states):  # one output per hidden state, for OnnxPredict users who ask by name
        assert outs[f"hidden_state_{i}"][1:] == [FRAMES, dim]
    assert all(isinstance(o[0], str) for o in outs.values())  # batch is symbolic
    # The optional lengths input carries a default, so callers may feed audio alone.
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == ["audio"]
    assert [i.name for i in sess.get_overridable_initializers()] == ["num_samples"]
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["mert.sample_rate"] == "24000" and props["mert.window_samples"] == str(WINDOW)
    # One self-contained file: no external-data side files next to it.
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.json", "tiny.onnx"]


def test_metadata_follows_essentia_format(exported):
    path, model = exported
    meta = json.loads(open(metadata_path(str(path))).read())
    for key in ("name", "type", "link", "version", "description", "author", "release_date", "framework",
                "framework_version", "model_types", "dataset", "schema", "inference", "citation", "weights_license"):
        assert meta[key], key
    assert meta["classes"] == []  # as Essentia's embedding models
    assert set(meta["dataset"]) == {"name", "citation", "size", "metrics"} and "random" in meta["dataset"]["name"]
    assert meta["framework"] == "onnx" and meta["model_types"] == ["onnx"]
    assert meta["framework_version"] == onnx.__version__
    assert meta["schema"]["inputs"][0] == {"name": "audio", "type": "float", "shape": ["batch_size", WINDOW]}
    outs = {o["name"]: o for o in meta["schema"]["outputs"]}
    assert outs["last_hidden_state"]["shape"] == ["batch_size", FRAMES, model.config.hidden_size]
    for o in meta["schema"]["outputs"]:
        assert set(o) >= {"name", "type", "shape", "description", "output_purpose"} and o["description"], o
    # A middle layer is the recommended embedding (mert-tiny: 4 layers -> hidden state 2), not the last one.
    assert [o["name"] for o in meta["schema"]["outputs"] if o["output_purpose"] == "embeddings"] == ["hidden_state_2"]
    assert meta["inference"]["embedding_output"] == "hidden_state_2"
    assert outs["hidden_state_2"]["shape"] == ["batch_size", FRAMES, model.config.hidden_size]
    assert outs["hidden_states"]["shape"] == ["batch_size", model.config.num_hidden_states, FRAMES,
                                              model.config.hidden_size]
    assert meta["inference"]["sample_rate"] == 24000
    assert meta["inference"]["algorithm"] == "OnnxPredictMERT"
    assert "2306.00107" in meta["citation"]
    assert "random" in meta["weights_license"]
    assert max(meta["export"]["parity_max_abs_diff"].values()) <= 1e-4


def test_onnxruntime_matches_pytorch_on_new_inputs(exported):
    """Independent of the export's own check: other signals, batch 3, and short windows."""
    path, model = exported
    sess = _session(path)
    rng = np.random.default_rng(7)
    t = np.arange(WINDOW) / 24000
    sweep = 0.4 * np.sin(2 * np.pi * (100 + 400 * t) * t)
    batch = np.stack([sweep, 0.05 * rng.standard_normal(WINDOW), np.zeros(WINDOW)]).astype(np.float32)
    last, all_states, *layers = sess.run(None, {"audio": batch})
    assert len(layers) == model.config.num_hidden_states
    for i, layer in enumerate(layers):
        assert np.array_equal(layer, all_states[:, i])
    with torch.no_grad():
        ref = model(torch.from_numpy(batch))
    assert np.abs(last - ref.last_hidden_state.numpy()).max() <= 1e-4
    assert np.abs(all_states - torch.stack(ref.hidden_states, 1).numpy()).max() <= 1e-4
    # Short windows: zero-padded, lengths given; the valid frames equal an unpadded run.
    lengths = np.array([WINDOW, 30000, 401], dtype=np.float32)
    padded = batch.copy()
    for b, n in enumerate(lengths.astype(int)):
        padded[b, n:] = 0.0
    all_states = sess.run(["hidden_states"], {"audio": padded, "num_samples": lengths})[0]
    for b, n in enumerate(lengths.astype(int)):
        with torch.no_grad():
            ref = torch.stack(model(torch.from_numpy(batch[b:b + 1, :n])).hidden_states, 1)[0].numpy()
        assert np.abs(all_states[b, :, : ref.shape[1]] - ref).max() <= 1e-4


def test_parity_failure_exits_nonzero_writes_nothing_and_keeps_previous_export(exported, tmp_path, monkeypatch,
                                                                             capsys):
    """Fault injection: the exporter's graph gets one weight changed before the parity gate."""
    real = ex._export_graph

    def export_then_corrupt(wrapper, graph_path, *args, **kwargs):
        ops = real(wrapper, graph_path, *args, **kwargs)
        _corrupt_one_weight(graph_path)
        return ops

    monkeypatch.setattr(ex, "_export_graph", export_then_corrupt)
    path, _ = exported
    out = tmp_path / "m.onnx"
    out.write_bytes(path.read_bytes())  # an earlier good export at the same place
    (tmp_path / "m.json").write_text('{"earlier": true}')
    rc = ex.main(["--preset", "mert-tiny", "--output", str(out), "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("error: ONNX export failed the parity check") and "> 1e-04" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert out.read_bytes() == path.read_bytes()
    assert json.loads((tmp_path / "m.json").read_text()) == {"earlier": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.onnx"]  # no temporaries left


@pytest.mark.parametrize("argv, message", [
    (["--output", "{d}/model.pt"], "must end in .onnx"),
    (["--output", "{d}/missing/model.onnx"], "output folder does not exist"),
    (["--output", "{d}/m.onnx", "--window-seconds", "0.01"], "shorter than one frame"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, message):
    rc = ex.main(["--preset", "mert-tiny"] + [a.format(d=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and message in err[-1] and err[-1].startswith("error: ")
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_preset_is_a_clean_error(tmp_path, capsys):
    rc = ex.main(["--preset", "mert-huge", "--output", str(tmp_path / "m.onnx")])
    assert rc == 1 and "unknown preset" in capsys.readouterr().err


def _valid_pair(onnx_path):
    """True if a graph and its metadata are present, complete and belong together."""
    graph = OnnxMERT(str(onnx_path), num_threads=1)  # raises if unreadable or mismatched with the JSON
    return graph.metadata is not None and graph.info.window == graph.metadata["schema"]["inputs"][0]["shape"][1]


def test_killed_export_never_leaves_half_written_files(exported, tmp_path):
    """SIGKILL the exporter at random moments over an earlier export; only complete,
    matching files may ever be visible, and a full rerun replaces them."""
    earlier, _ = exported
    out = tmp_path / "m.onnx"
    out.write_bytes(earlier.read_bytes())
    (tmp_path / "m.json").write_bytes(open(metadata_path(str(earlier)), "rb").read())
    cmd = [sys.executable, "-m", "extractors.export_onnx", "--preset", "mert-tiny", "--seed", "5",
           "--output", str(out), "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = random.Random()
    for delay in (rng.uniform(1.0, 5.0), rng.uniform(5.0, 10.0)):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finals = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
        assert finals in (["m.onnx"], ["m.json", "m.onnx"]), f"after {delay:.1f} s: {finals}"
        if finals == ["m.json", "m.onnx"]:
            assert _valid_pair(out)
        else:  # killed between the renames: the new graph still runs alone
            OnnxMERT(str(out), num_threads=1)
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    assert _valid_pair(out)
    assert json.loads(open(metadata_path(str(out))).read())["export"]["source"].endswith("seed 5)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.onnx"]  # temporaries cleaned up


def test_export_removes_temporaries_of_dead_exports_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                  # its pid now belongs to no process
    stale = [tmp_path / f".m.onnx.{dead.pid}.tmp", tmp_path / f".m.json.{dead.pid}.tmp"]
    alive = tmp_path / f".m.onnx.{os.getppid()}.tmp"  # a running process: maybe another export
    other = tmp_path / ".other.onnx.123.tmp"
    for p in stale + [alive, other]:
        p.write_bytes(b"partial")
    assert ex.main(["--preset", "mert-tiny", "--output", str(tmp_path / "m.onnx"), "--threads", "1"]) == 0
    assert not any(p.exists() for p in stale)
    assert alive.exists() and other.exists()
    assert _valid_pair(tmp_path / "m.onnx")


def test_graph_without_its_json_still_runs_and_mismatched_json_is_refused(exported, tmp_path):
    path, model = exported
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(path.read_bytes())
    graph = OnnxMERT(str(lone), num_threads=1)
    assert graph.metadata is None and graph.info.window == WINDOW and graph.info.sample_rate == 24000
    meta = json.loads(open(metadata_path(str(path))).read())
    meta["schema"]["inputs"][0]["shape"] = ["batch_size", 48000]
    (tmp_path / "lone.json").write_text(json.dumps(meta))
    with pytest.raises(MERTError, match="do not belong together"):
        OnnxMERT(str(lone), num_threads=1)
    (tmp_path / "junk.onnx").write_bytes(os.urandom(2000))
    with pytest.raises(MERTError, match="cannot load the ONNX model"):
        OnnxMERT(str(tmp_path / "junk.onnx"))


def test_dynamic_length_int8_graph_runs_any_length_and_records_its_gate(tmp_path, capsys):
    """--length dynamic --quantize int8: any input length, frames close to PyTorch fp32, gate figures in the JSON."""
    out = tmp_path / "dyn8.onnx"
    rc = ex.main(["--preset", "mert-tiny", "--seed", "3", "--output", str(out), "--threads", "1",
                  "--window-seconds", "1", "--length", "dynamic", "--quantize", "int8"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["schema"]["inputs"][0]["shape"] == ["batch_size", "num_samples"]
    assert meta["inference"]["window_samples"] is None
    acc = meta["export"]["accuracy_vs_fp32"]
    assert meta["export"]["precision"] == "int8" and meta["export"]["length"] == "dynamic"
    assert len(acc["layer_mean_cosine"]) == 5 and min(acc["layer_mean_cosine"]) >= acc["min_cosine_required"]
    assert acc["max_abs_diff"] > 1e-4  # it really is quantised (fp32 parity would be ~1e-6)
    proto = onnx.load(str(out), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["mert.precision"] == "int8" and props["mert.window_samples"] == "dynamic"
    # Dynamic graphs fuse attention by default; folded weights let every linear layer be quantised,
    # the q/k/v projection included: no float MatMul is left.
    ops = [n.op_type for n in proto.graph.node]
    assert meta["export"]["attention"] == "fused" and ops.count("MultiHeadAttention") == 4
    assert "MatMul" not in ops and ops.count("MatMulInteger") == 4 * 4 + 1
    graph = OnnxMERT(out, num_threads=1, window_seconds=2.0)
    assert graph.info.dynamic and graph.info.precision == "int8" and graph.info.window == 48000
    model = MERTModel.from_preset("mert-tiny", seed=3).eval()
    x = ex.parity_inputs(57_777, 24000)["chord"]
    with torch.inference_mode():
        ref = torch.stack(model(torch.from_numpy(x)[None]).hidden_states, 1)[0].numpy()
    got = graph.run(x[None], [x.shape[0]])[0]
    assert got.shape == ref.shape
    assert ex.frame_cosines(got, ref).mean(-1).min() >= 0.99
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the fp32 temporary is gone


def test_quantised_graph_failing_its_gate_is_not_written(tmp_path, monkeypatch, capsys):
    """Fault injection: the quantiser's output gets one weight changed; the cosine gate refuses it."""
    real = ex.quantize_graph

    def quantize_then_corrupt(src, dst, mode):
        real(src, dst, mode)
        _corrupt_one_weight(dst)

    monkeypatch.setattr(ex, "quantize_graph", quantize_then_corrupt)
    out = tmp_path / "m16.onnx"
    rc = ex.main(["--preset", "mert-tiny", "--output", str(out), "--threads", "1", "--window-seconds", "1",
                  "--quantize", "fp16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: the fp16 graph failed its accuracy gate")
    assert list(tmp_path.iterdir()) == []


def test_fused_attention_matches_pytorch_on_padded_batches_and_standard_stays_opset_only(tmp_path):
    """--attention fused (the dynamic default): one MultiHeadAttention per layer, padding keys masked
    through the extra head dimension; frames of a padded batch equal PyTorch on the unpadded audio.
    --attention standard: opset-20 ops only, same numbers."""
    model = MERTModel.from_preset("mert-tiny", seed=5).eval()
    graphs = {}
    for attention in ("fused", "standard"):
        path = tmp_path / f"{attention}.onnx"
        meta = ex.export_onnx(model, str(path), window_seconds=1.0, length="dynamic",
                              attention=None if attention == "fused" else attention)
        assert meta["export"]["attention"] == attention
        proto = onnx.load(str(path), load_external_data=False)
        ops = [n.op_type for n in proto.graph.node]
        domains = {o.domain for o in proto.opset_import}
        if attention == "fused":
            assert ops.count("MultiHeadAttention") == 4 and "Softmax" not in ops and "com.microsoft" in domains
        else:
            assert "MultiHeadAttention" not in ops and ops.count("Softmax") == 4 and domains <= {"", "ai.onnx"}
        graphs[attention] = OnnxMERT(path, num_threads=1)
    sig = ex.parity_inputs(40_000, 24000)
    lengths = [40_000, 17_321, 401]  # a full row, a short one, and one frame
    batch = np.stack([sig["chord"], sig["noise"], sig["chord"][::-1].copy()])
    for b, n in enumerate(lengths):
        batch[b, n:] = 0.0
    got = {a: g.run(batch, lengths) for a, g in graphs.items()}
    for b, n in enumerate(lengths):
        with torch.inference_mode():
            ref = torch.stack(model(torch.from_numpy(batch[b:b + 1, :n])).hidden_states, 1)[0].numpy()
        for a in graphs:
            assert np.abs(got[a][b, :, :ref.shape[1]] - ref).max() <= 1e-4, (a, b)
    # A graph made for the fixed window (Essentia) stays standard unless asked.
    fixed = ex.export_onnx(model, str(tmp_path / "fixed.onnx"), window_seconds=1.0)
    assert fixed["export"]["attention"] == "standard"
