"""OnnxPredictMERT with the real essentia package: MonoLoader in, MERTModel as the reference."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

import essentia
import essentia.standard as es
import extractors.essentia as ext_essentia
from extractors.essentia_meta import check_onnxpredict_contract
from extractors.export_onnx import export_onnx
from extractors.onnx_model import metadata_path
from mert_plugin import MERTModel, extract_features
from mert_plugin.errors import AudioError, MERTError

SR = 24000
WINDOW = 120000


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """mert-tiny (seed 11) as a .onnx + .json, and the same model in PyTorch."""
    path = tmp_path_factory.mktemp("graph") / "tiny.onnx"
    model = MERTModel.from_preset("mert-tiny", seed=11).eval()
    export_onnx(model, str(path), source="preset mert-tiny (random weights, seed 11)")
    return str(path), model


def _music(seconds, rate, channels=1, seed=0):
    """Two notes and a bit of noise; [N] or [N, channels]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 261.6 * t) * (t % 1.0 < 0.5) + 0.2 * np.sin(2 * np.pi * 392.0 * t)
    x = x + 0.01 * rng.standard_normal(t.shape)
    if channels > 1:
        x = np.stack([x * (1 - 0.2 * c) for c in range(channels)], axis=1)
    return x.astype(np.float32)


def _monoloader(path):
    return es.MonoLoader(filename=str(path), sampleRate=SR, resampleQuality=4)()


def _predict(graph_path, **params):
    return es.OnnxPredictMERT(graphFilename=graph_path, numThreads=1, **params)


def test_importing_registers_it_in_essentia_standard():
    assert es.OnnxPredictMERT is ext_essentia.OnnxPredictMERT


def test_one_window_equals_pytorch_on_monoloader_audio(graph, tmp_path):
    path, model = graph
    sf.write(tmp_path / "one.wav", _music(WINDOW / SR, SR), SR, subtype="FLOAT")
    audio = _monoloader(tmp_path / "one.wav")
    assert audio.dtype == np.float32 and audio.shape == (WINDOW,)
    with torch.no_grad():
        ref = model(torch.from_numpy(audio)[None])
    last = _predict(path)(audio)
    every = _predict(path, output="all")(audio)
    layer2 = _predict(path, output="layer_2")(audio)
    assert last.dtype == np.float32 and last.shape == (374, model.config.hidden_size)
    assert np.abs(last - ref.last_hidden_state[0].numpy()).max() <= 1e-4
    assert every.shape == (model.config.num_hidden_states, 374, model.config.hidden_size)
    assert np.abs(every - torch.stack(ref.hidden_states)[:, 0].numpy()).max() <= 1e-4
    assert np.abs(layer2 - ref.hidden_states[2][0].numpy()).max() <= 1e-4


@pytest.mark.parametrize("seconds, rate, channels", [(13.0, 44100, 2), (1.3, 48000, 1), (5.01, 22050, 1)])
def test_any_length_matches_windowed_pytorch(graph, tmp_path, seconds, rate, channels):
    """Stitching: same frames as mert_plugin.extract_features on the same MonoLoader output."""
    path, model = graph
    sf.write(tmp_path / "x.wav", _music(seconds, rate, channels), rate)
    audio = _monoloader(tmp_path / "x.wav")
    ref = extract_features(model, torch.from_numpy(audio)).numpy()  # [L+1, T, D]
    got = _predict(path, output="all")(audio)
    assert got.shape == ref.shape == (model.config.num_hidden_states, model.num_frames(audio.size),
                                      model.config.hidden_size)
    assert np.abs(got - ref).max() <= 1e-4


def test_patch_hop_size_and_batch_size(graph):
    path, model = graph
    audio = _music(11.0, SR)
    ref = extract_features(model, torch.from_numpy(audio), layers=[-1], overlap_seconds=3.0)[0].numpy()
    for batch in (1, 3, -1):
        got = _predict(path, patchHopSize=48000, batchSize=batch)(audio)  # 2 s hop = 3 s overlap
        assert np.abs(got - ref).max() <= 1e-4
    assert _predict(path, patchHopSize=48000).paramValue("patchHopSize") == 48000


def test_batch_size_minus_one_and_zero_run_all_windows_at_once(graph):
    """Essentia's TensorflowPredict* convention: -1 or 0 = every patch in one call."""
    path, _ = graph
    audio = _music(14.0, SR, seed=3)
    one = _predict(path, batchSize=1)(audio)
    for batch in (-1, 0):
        algo = _predict(path, batchSize=batch)
        calls = []
        real_run = algo._model.run
        algo._model.run = lambda *a, **k: calls.append(1) or real_run(*a, **k)  # count onnxruntime calls
        assert np.array_equal(algo(audio), one)
        assert len(calls) == 1


def test_named_layer_outputs_select_the_same_states(graph):
    """output='hidden_state_N' (the graph's per-layer output names) = layer N of 'hidden_states'."""
    path, model = graph
    audio = _music(6.0, SR, seed=4)
    every = _predict(path, output="hidden_states")(audio)
    assert np.array_equal(every, _predict(path, output="all")(audio))
    for n in range(model.config.num_hidden_states):
        assert np.array_equal(_predict(path, output=f"hidden_state_{n}")(audio), every[n])
    assert np.array_equal(_predict(path, output="last_hidden_state")(audio), every[-1])
    pool = essentia.Pool()
    pool.set("audio", audio)
    assert _predict(path, output="hidden_states")(pool).descriptorNames() == ["hidden_states"]
    out = _predict(path, output="hidden_state_2")(pool)
    assert out.descriptorNames() == ["hidden_state_2"]
    assert np.array_equal(out["hidden_state_2"][0, 0], every[2])


def test_hop_of_one_window_means_no_overlap(graph):
    """patchHopSize = window: windows abut on the frame grid (374 frames apart), no frame is lost."""
    path, model = graph
    audio = _music(13.0, SR, seed=5)
    got = _predict(path, patchHopSize=WINDOW, output="all")(audio)
    # 374 frames = 119680 samples between starts: an overlap of 320 samples in PyTorch's planner.
    ref = extract_features(model, torch.from_numpy(audio), overlap_seconds=(WINDOW - 374 * 320) / SR).numpy()
    assert got.shape == ref.shape == (model.config.num_hidden_states, model.num_frames(audio.size),
                                      model.config.hidden_size)
    assert np.abs(got - ref).max() <= 1e-4


def test_repeat_mode_fills_a_short_clip_by_repeating_it(graph):
    """lastPatchMode='repeat' (Essentia's name): the clip tiled to one window, run unmasked, its own frames kept."""
    path, model = graph
    audio = _music(2.0, SR, seed=6)
    got = _predict(path, lastPatchMode="repeat", output="all")(audio)
    tiled = np.concatenate([audio, audio, audio])[:WINDOW]
    with torch.no_grad():
        ref = torch.stack(model(torch.from_numpy(tiled)[None]).hidden_states)[:, 0].numpy()
    frames = model.num_frames(audio.size)
    assert got.shape == (model.config.num_hidden_states, frames, model.config.hidden_size)
    assert np.abs(got - ref[:, :frames]).max() <= 1e-4
    exact = _predict(path, lastPatchMode="pad", output="all")(audio)
    assert np.abs(got - exact).max() > 1e-3  # the repeated audio is context: not the unpadded result


@pytest.mark.parametrize("extra", [0, 100, 239])
def test_repeat_mode_on_long_input_changes_only_the_last_window(graph, extra):
    """A long input's last window is short by < 1 hop (or full); repeat fills only that window."""
    path, model = graph
    n = 2 * WINDOW + 5 * 320 + extra
    audio = _music(n / SR, SR, seed=7)[:n]
    pad = _predict(path, output="all")(audio)
    rep = _predict(path, output="all", lastPatchMode="repeat")(audio)
    assert rep.shape == pad.shape == (model.config.num_hidden_states, model.num_frames(n), model.config.hidden_size)
    from mert_plugin.extract import plan_windows
    last = plan_windows(n, WINDOW, SR, 320, 400)[-1]
    assert np.array_equal(rep[:, :last.keep_start], pad[:, :last.keep_start])
    real = n - last.sample_start
    if real >= WINDOW:
        assert np.array_equal(rep, pad)
    else:
        tail = np.resize(audio[last.sample_start:], WINDOW)  # the last window, its samples repeated
        with torch.no_grad():
            ref = torch.stack(model(torch.from_numpy(tail)[None]).hidden_states)[:, 0].numpy()
        keep = slice(last.keep_start - last.frame_offset, last.keep_end - last.frame_offset)
        assert np.abs(rep[:, last.keep_start:] - ref[:, keep]).max() <= 1e-4


@pytest.mark.parametrize("via_accumulator", [False, True])
def test_streaming_network_feeds_it_through_a_pool(graph, tmp_path, via_accumulator):
    """The supported streaming route: a real essentia.streaming network stores the decoded audio in a
    Pool (MonoLoader -> [RealAccumulator ->] pool 'audio'); OnnxPredictMERT takes that Pool. The
    frames go back into a Pool that YamlOutput writes, as a network's PoolStorage/FileOutput would."""
    import essentia.streaming as ess

    path, model = graph
    sf.write(tmp_path / "s.wav", _music(7.0, 44100, channels=2, seed=8), 44100)
    pool = essentia.Pool()
    loader = ess.MonoLoader(filename=str(tmp_path / "s.wav"), sampleRate=SR, resampleQuality=4)
    if via_accumulator:
        acc = ess.RealAccumulator()
        loader.audio >> acc.data
        acc.array >> (pool, "audio")
    else:
        loader.audio >> (pool, "audio")
    essentia.run(loader)
    standard = _monoloader(tmp_path / "s.wav")
    assert np.array_equal(pool["audio"], standard)

    out = _predict(path, output="hidden_state_2")(pool)
    emb = out["hidden_state_2"][0, 0]
    ref = extract_features(model, torch.from_numpy(standard), layers=[2])[0].numpy()
    assert emb.shape == ref.shape == (model.num_frames(standard.size), model.config.hidden_size)
    assert np.abs(emb - ref).max() <= 1e-4

    frames = essentia.Pool()
    for frame in emb:
        frames.add("mert.hidden_state_2", frame)
    es.YamlOutput(filename=str(tmp_path / "emb.json"), format="json")(frames)
    import json
    written = np.asarray(json.loads((tmp_path / "emb.json").read_text())["mert"]["hidden_state_2"])
    assert written.shape == emb.shape and np.allclose(written, emb, rtol=1e-5, atol=1e-6)


def test_discard_mode_never_feeds_padding(graph):
    path, model = graph
    assert _predict(path, lastPatchMode="discard")(_music(2.0, SR)).shape == (0, model.config.hidden_size)
    audio = _music(5.0, SR)[:WINDOW]
    with torch.no_grad():
        ref = model(torch.from_numpy(audio)[None]).last_hidden_state[0].numpy()
    assert np.abs(_predict(path, lastPatchMode="discard")(audio) - ref).max() <= 1e-4


def test_pool_in_pool_out(graph):
    path, _ = graph
    audio = _music(7.0, SR)
    pool = essentia.Pool()
    pool.set("audio", audio)
    algo = _predict(path, output="layer_-1")
    out = algo(pool)
    assert isinstance(out, essentia.Pool) and out.descriptorNames() == ["layer_-1"]
    tensor = out["layer_-1"]
    assert tensor.shape[:2] == (1, 1)
    assert np.array_equal(tensor[0, 0], algo(audio))
    every = _predict(path, output="all")(pool)
    assert every["hidden_states"].shape[:2] == (1, 5)


@pytest.mark.parametrize("signal, message", [
    (np.zeros((48000, 2), np.float32), "mono signal as a 1-D array"),
    (np.zeros(0, np.float32), "too short"),
    (np.zeros(399, np.float32), "too short: 399 samples"),
    (np.array([0.0, np.nan] * 1000, np.float32), "NaN or infinite"),
    (np.array([0.0, np.inf] * 1000, np.float32), "NaN or infinite"),
    (np.zeros(48000, np.int16), "expected float samples"),
    ("not audio", "expected float samples"),
])
def test_bad_signals_get_clear_errors(graph, signal, message):
    with pytest.raises(AudioError, match=message):
        _predict(graph[0])(signal)


def test_silence_and_float64_input_work(graph):
    path, model = graph
    silence = _predict(path)(np.zeros(30000, np.float64))
    assert silence.shape == (model.num_frames(30000), model.config.hidden_size) and np.isfinite(silence).all()


def test_pool_without_audio_is_a_clear_error(graph):
    pool = essentia.Pool()
    pool.set("signal", _music(1.0, SR))
    with pytest.raises(AudioError, match="no 'audio' descriptor"):
        _predict(graph[0])(pool)
    pool = essentia.Pool()
    pool.add("audio", _music(1.0, SR))
    pool.add("audio", _music(1.0, SR))
    with pytest.raises(AudioError, match="pool.set"):
        _predict(graph[0])(pool)


@pytest.mark.parametrize("params, message", [
    ({"output": "layer_9"}, "output must be"),
    ({"output": "embeddings"}, "output must be"),
    ({"output": "hidden_state_5"}, "output must be"),
    ({"patchHopSize": 100}, "patchHopSize must be 0 or in"),
    ({"patchHopSize": 130000}, "patchHopSize must be 0 or in"),
    ({"patchHopSize": -320}, "patchHopSize must be >= 0"),
    ({"batchSize": -2}, "batchSize must be >= 1, or -1 or 0"),
    ({"lastPatchMode": "zeros"}, "lastPatchMode must be one of \\['pad', 'repeat', 'discard'\\]"),
    ({"graphFileName": "x.onnx"}, "unknown parameter"),
])
def test_bad_parameters_get_clear_errors(graph, params, message):
    with pytest.raises(MERTError, match=message):
        es.OnnxPredictMERT(graphFilename=graph[0], **params)


def test_missing_or_broken_graph(tmp_path):
    with pytest.raises(MERTError, match="graphFilename is required"):
        es.OnnxPredictMERT()
    with pytest.raises(MERTError, match="no such ONNX file"):
        es.OnnxPredictMERT(graphFilename=str(tmp_path / "nope.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\x00" * 100)
    with pytest.raises(MERTError, match="cannot load the ONNX model"):
        es.OnnxPredictMERT(graphFilename=str(tmp_path / "junk.onnx"))


def _onnxpredict_emulated(graph_path, pool, inputs, outputs):
    """Essentia's C++ OnnxPredict (MTG/essentia PR #1488 at f66c52f3, onnxpredict.cpp compute()), in Python.

    Each input is the Pool's rank-4 float32 tensor under the input's name, with its non-batch
    singleton dims squeezed; the session is run for ``outputs`` only; each result is stored under
    its name with the shape OnnxPredict gives it: the output's *declared* shape right-aligned into
    [batch, 1, 1, 1], batch taken from the first input.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(graph_path, providers=["CPUExecutionProvider"])
    feed = {}
    for name in inputs:
        tensor = np.asarray(pool[name])
        assert tensor.ndim == 4 and tensor.dtype == np.float32  # an Essentia Tensor<Real>
        feed[name] = tensor.reshape([tensor.shape[0]] + [d for d in tensor.shape[1:] if d > 1])
    declared = {o.name: o.shape for o in session.get_outputs()}
    out = essentia.Pool()
    for name, value in zip(outputs, session.run(outputs, feed)):
        shape = [feed[inputs[0]].shape[0], 1, 1, 1]
        for j in range(1, len(declared[name])):
            shape[4 - j] = declared[name][len(declared[name]) - j]
        assert value.size == np.prod(shape)  # the declared shape is the runtime shape
        out.set(name, np.ascontiguousarray(value.reshape(shape), dtype=np.float32))
    return out


def test_exported_graph_meets_cpp_onnxpredict_contract(graph):
    """What FILE.json tells a C++ OnnxPredict user works: float32 'audio' in, static rank <= 4 outputs named as in
    the schema, the recommended layer by name. The installed essentia has no OnnxPredict (no released wheel has),
    so it is emulated with onnxruntime; with an essentia that has it, the real one is run too."""
    path, model = graph
    meta = json.loads(open(metadata_path(path)).read())
    call = meta["inference"]["onnxpredict"]
    emb = meta["inference"]["embedding_output"]
    assert [o["name"] for o in meta["schema"]["outputs"] if o["output_purpose"] == "embeddings"] == [emb]
    assert call["algorithm"] == "OnnxPredict"
    assert call["parameters"]["inputs"] == [meta["schema"]["inputs"][0]["name"]] == ["audio"]
    assert call["parameters"]["outputs"] == [emb] and emb != "last_hidden_state"
    io = check_onnxpredict_contract(path, meta["schema"])  # every output of the graph
    assert dict(io["inputs"]) == call["input_pool"]
    assert dict(io["outputs"])[emb] == call["output_pool"][emb]
    assert {name for name, _ in io["outputs"]} == {o["name"] for o in meta["schema"]["outputs"]}

    windows = np.stack([_music(5.0, SR, seed=9)[:WINDOW], _music(5.0, SR, seed=10)[:WINDOW]])
    pool = essentia.Pool()
    pool.set("audio", windows[:, None, None, :])  # (B, 1, 1, W), as call["input_pool"] says
    wanted = [emb, "hidden_states"]
    got = _onnxpredict_emulated(path, pool, call["parameters"]["inputs"], wanted)
    k = int(emb.rsplit("_", 1)[1])
    frames, dim = model.num_frames(WINDOW), model.config.hidden_size
    assert list(got[emb].shape) == [2] + call["output_pool"][emb][1:] == [2, 1, frames, dim]
    assert got["hidden_states"].shape == (2, model.config.num_hidden_states, frames, dim)
    for b in range(2):
        mine = _predict(path, output=emb)(windows[b])
        assert np.abs(got[emb][b, 0] - mine).max() <= 1e-5
        with torch.no_grad():
            ref = model(torch.from_numpy(windows[b])[None]).hidden_states[k][0].numpy()
        assert np.abs(got[emb][b, 0] - ref).max() <= 1e-4
        assert np.array_equal(got["hidden_states"][b, k], got[emb][b, 0])
    if hasattr(es, "OnnxPredict"):  # a source build of MTG/essentia with PR #1488
        real = es.OnnxPredict(**dict(call["parameters"], graphFilename=path))(pool)
        assert np.abs(real[emb] - got[emb]).max() <= 1e-5
    else:
        assert "OnnxPredict" not in es.algorithmNames()
