"""HEAR API (extractors.hear): the checks of the HEAR validator, and values against MERTModel.

The official hear-validator needs tensorflow, which this project does not
install; the same checks are written out here.
"""
import numpy as np
import pytest
import soxr
import torch

from extractors import hear
from extractors.export_onnx import export_onnx
from mert_plugin import MERTModel, extract_features
from mert_plugin.errors import MERTError

HEAR_RATES = (16000, 22050, 32000, 44100, 48000)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("hear") / "tiny.onnx"
    export_onnx(MERTModel.from_preset("mert-tiny", seed=0), str(path))
    return str(path)


@pytest.fixture(scope="module", params=["torch", "onnx"])
def model(request, graph):
    return hear.load_model("preset:mert-tiny" if request.param == "torch" else graph, num_threads=1)


def _noise(n_sounds, seconds, rate, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n_sounds, int(seconds * rate)), generator=g) * 2 - 1


def test_model_attributes(model):
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate in HEAR_RATES
    assert isinstance(model.scene_embedding_size, int) and isinstance(model.timestamp_embedding_size, int)
    assert model.to("cpu") is model


@pytest.mark.parametrize("seconds", [1.07, 1.98, 4.0, 7.3])
def test_timestamp_embeddings_pass_the_validator_checks(model, seconds):
    audio = _noise(2, seconds, model.sample_rate)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.dtype == torch.float32 and emb.ndim == 3 and ts.ndim == 2
    assert emb.shape[0] == 2 and emb.shape[:2] == ts.shape and emb.shape[2] == model.timestamp_embedding_size
    diff = np.diff(ts.numpy())
    assert np.abs(diff - diff.mean()).max() <= 1.0 and diff.max() <= 50.0  # regular, <= 50 ms apart
    assert ts.min() <= diff.mean()                                          # starts at the beginning
    assert seconds * 1000 - 50 <= ts.max() <= seconds * 1000                 # ends inside the audio


def test_scene_embeddings_pass_the_validator_checks(model):
    emb = hear.get_scene_embeddings(_noise(4, 2.74, model.sample_rate), model)
    assert emb.dtype == torch.float32 and emb.shape == (4, model.scene_embedding_size)


def test_values_are_mert_frames_of_the_resampled_audio(model):
    """Timestamp embeddings = last hidden state of MERT on the 24 kHz audio; scene = their mean."""
    reference = MERTModel.from_preset("mert-tiny", seed=0).eval()
    audio = _noise(2, 6.5, model.sample_rate, seed=3) * 0.3
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    for i in range(2):
        wav = soxr.resample(audio[i].numpy(), model.sample_rate, 24000, quality="VHQ")
        ref = extract_features(reference, torch.from_numpy(wav), layers=[-1])[0]
        assert emb.shape[1] == ref.shape[0] == reference.num_frames(wav.shape[0])
        assert (emb[i] - ref).abs().max() <= 1e-4
    assert ts[0, 1] - ts[0, 0] == pytest.approx(1000 * 320 / 24000, abs=1e-3)  # 75 frames per second
    scene = hear.get_scene_embeddings(audio, model)
    assert (scene - emb.mean(dim=1)).abs().max() <= 1e-6


def test_layer_choice():
    first = hear.load_model("preset:mert-tiny", layer=0)
    last = hear.load_model("preset:mert-tiny")
    audio = _noise(1, 1.0, 48000)
    a, _ = hear.get_timestamp_embeddings(audio, first)
    b, _ = hear.get_timestamp_embeddings(audio, last)
    assert a.shape == b.shape and not torch.allclose(a, b)
    with pytest.raises(MERTError, match="out of range"):
        hear.load_model("preset:mert-tiny", layer=9)


@pytest.mark.parametrize("audio, message", [
    (torch.zeros(48000), r"\[n_sounds, n_samples\]"),
    (torch.zeros(1, 100), "too short"),
    (torch.full((1, 48000), float("nan")), "NaN or infinite"),
    (torch.zeros(1, 48000, dtype=torch.int16), "floating point"),
    (np.zeros((1, 48000), np.float32), "torch.Tensor"),
])
def test_bad_audio_gets_clear_errors(audio, message):
    with pytest.raises(MERTError, match=message):
        hear.get_timestamp_embeddings(audio, hear.load_model("preset:mert-tiny"))


def test_default_model_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(hear.DEFAULT_MODEL_ENV, str(tmp_path / "no_such_model"))
    with pytest.raises(MERTError):
        hear.load_model()
