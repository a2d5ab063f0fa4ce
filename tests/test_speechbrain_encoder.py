"""MERTEncoder as a SpeechBrain lobe, and WaveformEncoder.from_hparams on exported models.

The reference for the features is ``transformers.HubertModel`` loaded from the
same ``save_pretrained`` folder (an independent implementation); SpeechBrain's
own ``WaveformEncoder``, ``Pretrainer`` and HyperPyYAML do the loading.
"""
import os

import numpy as np
import pytest
import torch

from mert_plugin import MERTModel
from mert_plugin.errors import ConfigError, MERTError
from mert_plugin.speechbrain import INFERENCE_CKPT, MERTEncoder, save_inference_files

transformers = pytest.importorskip("transformers")
TOL = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random mert-tiny student saved with save_pretrained, and the HF reference of it."""
    folder = str(tmp_path_factory.mktemp("export"))
    model = MERTModel.from_preset("mert-tiny", seed=3).eval()
    model.save_pretrained(folder)
    reference = transformers.HubertModel.from_pretrained(folder).eval()
    return folder, reference


def _reference_states(reference, wav):
    with torch.no_grad():
        out = reference(wav, output_hidden_states=True)
    return torch.stack(out.hidden_states)  # [L+1, B, T, D]


def test_outputs_and_layer_selection_match_hubert(exported):
    folder, reference = exported
    wav = torch.randn(2, 24000 + 123)
    ref = _reference_states(reference, wav)
    cases = [
        (dict(), ref[-1]),
        (dict(output_all_hiddens=True), ref),
        (dict(layers=2), ref[2]),
        (dict(layers=[0, -1]), ref[[0, -1]]),
        (dict(layers=[1, 3], output_all_hiddens=True), ref[[1, 3]]),
    ]
    for kwargs, expected in cases:
        enc = MERTEncoder(source=folder, **kwargs)
        got = enc(wav)
        assert got.shape == expected.shape, kwargs
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0, msg=str(kwargs))
    # Full relative lengths mean no padding: identical to no wav_lens at all.
    enc = MERTEncoder(source=folder, output_all_hiddens=True)
    torch.testing.assert_close(enc(wav, torch.ones(2)), enc(wav), atol=0, rtol=0)


def test_padding_uses_the_attention_mask(exported):
    folder, reference = exported
    wav = torch.randn(2, 36000)
    wav[1, 24000:] = 0.0
    enc = MERTEncoder(source=folder)
    got = enc(wav, torch.tensor([1.0, 24000 / 36000]))
    attention_mask = torch.ones(2, 36000, dtype=torch.long)
    attention_mask[1, 24000:] = 0
    with torch.no_grad():
        expected = reference(wav, attention_mask=attention_mask).last_hidden_state
    valid = MERTModel.from_pretrained(folder).num_frames(24000)
    torch.testing.assert_close(got[1, :valid], expected[1, :valid], atol=TOL, rtol=0)
    torch.testing.assert_close(got[0], expected[0], atol=TOL, rtol=0)


def test_normalize_wav_matches_hf_feature_extractor(exported):
    folder, reference = exported
    wav = 0.3 * torch.randn(1, 16000) + 0.2
    fe = transformers.Wav2Vec2FeatureExtractor(sampling_rate=24000, do_normalize=True, return_attention_mask=True)
    normed = torch.from_numpy(np.asarray(fe(wav[0].numpy(), sampling_rate=24000)["input_values"][0]))[None]
    expected = _reference_states(reference, normed.float())[-1]
    got = MERTEncoder(source=folder, normalize_wav=True)(wav)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_freeze_and_fine_tuning(exported):
    folder, _ = exported
    wav = torch.randn(2, 8000)
    frozen = MERTEncoder(source=folder, freeze=True)
    frozen.train()  # a Brain calls modules.train(); a frozen encoder must stay in eval mode
    assert not frozen.model.training
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen(wav).requires_grad

    tuned = MERTEncoder(source=folder, freeze=False, freeze_feature_extractor=True)
    tuned.train()
    assert tuned.model.training
    out = tuned(wav)
    # A fixed random projection, not out.pow(2): the output leaves a LayerNorm at its init weights (1, 0),
    # whose squared sum over the features is constant up to eps, so that loss's gradient was rounding
    # noise (~1e-10 here) and "non-zero" held by chance.
    direction = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(1))
    (out * direction).sum().backward()
    assert all(p.grad is None for p in tuned.model.feature_extractor.parameters())
    assert tuned.model.encoder.layers[0].attention.q_proj.weight.grad.abs().max() > 1e-3  # ~0.2


def test_usable_from_hyperpyyaml(exported):
    from hyperpyyaml import load_hyperpyyaml

    folder, reference = exported
    hp = load_hyperpyyaml(f"""
encoder: !new:mert_plugin.speechbrain.MERTEncoder
    source: {folder}
    freeze: True
    output_all_hiddens: True
    layers: [2, 4]
""")
    wav = torch.randn(1, 12000)
    torch.testing.assert_close(hp["encoder"](wav), _reference_states(reference, wav)[[2, 4]], atol=TOL, rtol=0)


def test_bad_arguments_give_clear_errors(exported):
    folder, _ = exported
    with pytest.raises(ConfigError, match="exactly one of source, preset or config"):
        MERTEncoder()
    with pytest.raises(ConfigError, match="exactly one"):
        MERTEncoder(source=folder, preset="mert-tiny")
    with pytest.raises(ConfigError, match=r"out of range.*5 hidden states"):
        MERTEncoder(source=folder, layers=[0, 5])
    with pytest.raises(ConfigError, match="layers must be"):
        MERTEncoder(source=folder, layers=[])
    with pytest.raises(MERTError, match=r"expects wav \[batch, samples\]"):
        MERTEncoder(preset="mert-tiny")(torch.randn(2, 2, 8000))


def test_waveform_encoder_from_hparams_loads_export(exported, tmp_path):
    from speechbrain.inference.encoders import WaveformEncoder

    folder, reference = exported
    target = tmp_path / "model"
    MERTModel.from_pretrained(folder).save_pretrained(str(target))
    save_inference_files(str(target), str(target), output_all_hiddens=True)
    enc = WaveformEncoder.from_hparams(source=str(target), savedir=str(tmp_path / "cache"))
    wav = torch.randn(2, 30000)
    feats = enc.encode_batch(wav, torch.ones(2))
    torch.testing.assert_close(feats, _reference_states(reference, wav), atol=TOL, rtol=0)
    assert enc.audio_normalizer.sample_rate == 24000

    # Layer selection in the inference file.
    save_inference_files(str(target), str(tmp_path / "sel"), layers=[1, 2])
    enc = WaveformEncoder.from_hparams(source=str(tmp_path / "sel"), savedir=str(tmp_path / "cache2"))
    torch.testing.assert_close(enc.encode_batch(wav, torch.ones(2)), _reference_states(reference, wav)[[1, 2]],
                               atol=TOL, rtol=0)


def test_inference_weights_are_loaded_strictly(exported, tmp_path):
    """SpeechBrain's default transfer only warns on missing keys (random weights would
    silently remain); the lobe's own transfer hook refuses a checkpoint that does not fit."""
    from speechbrain.inference.encoders import WaveformEncoder

    folder, _ = exported
    save_inference_files(folder, str(tmp_path))
    from mert_plugin import MERTConfig

    narrower = dict(MERTConfig.from_preset("mert-tiny").to_dict(), hidden_size=64, intermediate_size=128)
    torch.save(MERTEncoder(config=narrower).state_dict(), os.path.join(str(tmp_path), INFERENCE_CKPT))
    with pytest.raises(MERTError, match="do not fit this MERTEncoder"):
        WaveformEncoder.from_hparams(source=str(tmp_path), savedir=str(tmp_path / "cache"))


# ------------------------------------------------ SpeechBrain 1.1's own MERT lobe, swapped
def test_signature_matches_speechbrain_mert_lobe():
    """Same positional order, names and defaults as speechbrain.integrations.huggingface.mert.MERT."""
    import inspect

    sb_mert = pytest.importorskip("speechbrain.integrations.huggingface.mert")
    theirs = list(inspect.signature(sb_mert.MERT.__init__).parameters.values())[1:]
    ours = list(inspect.signature(MERTEncoder.__init__).parameters.values())[1:1 + len(theirs)]
    assert [p.name for p in ours] == [p.name for p in theirs]
    for a, b in zip(ours, theirs):
        if b.default is not inspect.Parameter.empty:
            assert a.default == b.default, a.name
    assert ours[1].default is None  # save_path is required there; optional here (local sources need none)


# A yaml as written for SpeechBrain's lobe (its recipes' spelling), with only the class swapped.
_SB_LOBE_YAML = """
save_folder: {save}
mert_hub: m-a-p/MERT-v1-95M
mert_folder: !ref <save_folder>/mert_checkpoint
freeze_mert: True
mert: !new:{cls}
    source: !ref <mert_hub>
    output_norm: True
    freeze: !ref <freeze_mert>
    freeze_feature_extractor: True
    save_path: !ref <mert_folder>
    output_all_hiddens: True
positional: !new:{cls} [{local}, {save}/unused, False, False]
"""


def test_yaml_for_speechbrain_lobe_works_by_swapping_the_class(exported, tmp_path, monkeypatch):
    """``source`` a hub id, ``save_path`` the HF cache folder (as SpeechBrain's lobe uses it): a
    tiny checkpoint laid out there as huggingface_hub lays it out, read offline."""
    from huggingface_hub import constants
    from hyperpyyaml import load_hyperpyyaml

    from test_hub import add_snapshot  # the hub cache layout (tests/test_hub.py)

    folder, reference = exported
    save = tmp_path / "save"
    files = {n: os.path.join(folder, n) for n in ("config.json", "model.safetensors", "preprocessor_config.json")}
    add_snapshot(str(save / "mert_checkpoint"), "m-a-p/MERT-v1-95M", "c" * 40, files)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    hp = load_hyperpyyaml(_SB_LOBE_YAML.format(save=save, local=folder, cls="mert_plugin.speechbrain.MERTEncoder"))
    enc = hp["mert"]
    assert enc.freeze and enc.output_all_hiddens and enc.output_norm and not enc.normalize_wav
    wav = torch.randn(2, 20000)
    ref = _reference_states(reference, wav)
    expected = torch.nn.functional.layer_norm(ref, ref.shape[-1:])  # per frame (see the class docstring)
    torch.testing.assert_close(enc(wav, torch.ones(2)), expected, atol=1e-4, rtol=0)
    pos = hp["positional"]  # [source, save_path, output_norm, freeze]
    assert not pos.freeze and not pos.output_norm and not pos.output_all_hiddens
    torch.testing.assert_close(pos(wav), ref[-1], atol=TOL, rtol=0)
    with pytest.raises(ConfigError, match="apply_spec_augment"):
        MERTEncoder(folder, apply_spec_augment=True)
