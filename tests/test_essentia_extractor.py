"""OnnxPredictMERT with the real essentia package: MonoLoader in, MERTModel as the reference."""
import numpy as np
import pytest
import soundfile as sf
import torch

import essentia
import essentia.standard as es
import extractors.essentia as ext_essentia
from extractors.export_onnx import export_onnx
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
    ({"patchHopSize": 100}, "patchHopSize must be in"),
    ({"patchHopSize": 130000}, "patchHopSize must be in"),
    ({"batchSize": 0}, "batchSize"),
    ({"lastPatchMode": "repeat"}, "lastPatchMode"),
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
