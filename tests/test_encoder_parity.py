"""Numerical parity of MERTModel against transformers.HubertModel (the independent reference).

Each released geometry is built as a random-weight ``HubertModel``, stored the
way the hub stores MERT (``model_type: mert_model``, ``pytorch_model.bin`` with
``weight_g``/``weight_v``), loaded with ``MERTModel.from_pretrained`` and compared
hidden state by hidden state in fp32.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import HubertConfig, HubertModel  # noqa: E402

from mert_plugin import MERTConfig, MERTModel  # noqa: E402

TOL = 1e-5
TF_MAJOR = int(transformers.__version__.split(".")[0])


def _randomise(model, seed):
    """Give every parameter (norm scales and biases too) non-trivial random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                std = 1.0 / p[0].numel() ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _hub_style_folder(hf_model, config: MERTConfig, folder, model_type="mert_model"):
    """Save like the MERT hub repos: remote-code config.json and weight_g/weight_v in a .bin."""
    os.makedirs(folder, exist_ok=True)
    state = {}
    for k, v in hf_model.state_dict().items():
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        state[k] = v.clone()
    assert "encoder.pos_conv_embed.conv.weight_g" in state
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    cfg = config.to_hf_dict(model_type=model_type)
    if model_type == "mert_model":
        cfg["auto_map"] = {"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"}
        cfg["transformers_version"] = "4.24.0"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)


def _reference_states(hf_out, config: MERTConfig):
    """Hidden states with MERT's (transformers 4.x) semantics.

    transformers >= 5 records hidden_states with layer hooks, so for pre-LN
    ("stable layer norm") models its last entry is the *un-normalised* output of
    the last layer, while MERT's remote code and transformers 4.x return the
    final-LayerNorm output there (= last_hidden_state). Rebuild the 4.x tuple.
    """
    states = list(hf_out.hidden_states)
    if config.do_stable_layer_norm and TF_MAJOR >= 5:
        assert not torch.allclose(states[-1], hf_out.last_hidden_state)
        states[-1] = hf_out.last_hidden_state
    return states


def _hf_model(config: MERTConfig, seed: int):
    d = config.to_hf_dict()
    d.pop("model_type"), d.pop("architectures")
    torch.manual_seed(seed)
    return _randomise(HubertModel(HubertConfig(**d)), seed).eval()


def _max_diff(a, b):
    """Largest |a - b| over all states, each scaled by max(1, max|a|).

    Normalised states (every post-LN state, the last pre-LN one) are O(1), so
    this is the absolute error there. The un-normalised pre-LN residual stream
    grows to |x| ~ 20 with random weights, where fp32 rounding alone moves
    transformers' own output by ~1.5e-5 between 1 and 2 threads; for those the
    bound is relative to the state's magnitude.
    """
    assert len(a) == len(b)
    worst = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape
        worst = max(worst, (x - y).abs().max().item() / max(1.0, x.abs().max().item()))
    return worst


@pytest.mark.parametrize("preset", ["mert-v1-95m", "mert-v1-330m", "mert-v0"])
def test_released_geometries_match_hubert(preset, tmp_path):
    config = MERTConfig.from_preset(preset)
    hf = _hf_model(config, seed=1)
    _hub_style_folder(hf, config, tmp_path / "hub", model_type="hubert" if preset == "mert-v0" else "mert_model")
    ours = MERTModel.from_pretrained(str(tmp_path / "hub"))
    assert ours.config.do_stable_layer_norm == config.do_stable_layer_norm
    assert ours.sample_rate == config.sample_rate

    wav = torch.randn(2, int(1.2 * config.sample_rate))
    with torch.no_grad():
        ref = _reference_states(hf(wav, output_hidden_states=True), config)
        out = ours(wav)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert out.last_hidden_state.shape == (2, config.num_frames(wav.shape[1]), config.hidden_size)
    assert _max_diff(ref, out.hidden_states) <= TOL
    assert (out.last_hidden_state - ref[-1]).abs().max().item() <= TOL

    # save_pretrained -> plain HubertModel (no remote code) gives the same states.
    ours.save_pretrained(str(tmp_path / "ours"))
    with open(tmp_path / "ours" / "config.json") as f:
        assert json.load(f)["model_type"] == "hubert"
    reloaded = HubertModel.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        ref2 = _reference_states(reloaded(wav, output_hidden_states=True), config)
    assert _max_diff(ref2, out.hidden_states) <= TOL


def test_padding_mask_matches_attention_mask():
    config = MERTConfig.from_preset("mert-tiny")
    hf = _hf_model(config, seed=2)
    ours = MERTModel(config).eval()
    ours.load_state_dict(hf.state_dict())  # parametrizations.* spelling
    wav = torch.randn(3, 24000)
    attn = torch.ones(3, 24000, dtype=torch.long)
    attn[1, 15000:] = 0
    attn[2, 5000:] = 0
    with torch.no_grad():
        ref = hf(wav, attention_mask=attn, output_hidden_states=True)
        out = ours(wav, padding_mask=attn == 0)
    valid = out.frame_mask
    assert valid.sum(1).tolist() == [config.num_frames(n) for n in (24000, 15000, 5000)]
    for x, y in zip(_reference_states(ref, config), out.hidden_states):
        assert (x - y)[valid].abs().max().item() <= TOL


def test_hidden_state_semantics_pre_ln():
    """330M-style pre-LN: only the last state is layer-normed; earlier states keep their scale."""
    config = MERTConfig.from_preset("mert-tiny")
    config.do_stable_layer_norm = True
    model = _randomise(MERTModel(config), 3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 24000))
        hs = out.hidden_states
        ln = model.encoder.layer_norm
        # The last state is LN(output of the last layer)...
        last_layer = model.encoder.layers[-1](hs[-2])
        assert torch.allclose(hs[-1], ln(last_layer), atol=1e-6)
    # ...and the residual stream before it is not normalised.
    assert abs(hs[-2].std().item() - 1.0) > 0.05


def test_num_layers_stops_early_with_identical_prefix():
    model = MERTModel.from_preset("mert-tiny", seed=0).eval()
    wav = torch.randn(1, 16000)
    with torch.no_grad():
        full = model(wav).hidden_states
        part = model(wav, num_layers=2).hidden_states
    assert len(part) == 3
    assert all(torch.equal(a, b) for a, b in zip(full[:3], part))


def test_frame_counts_follow_conv_formula():
    config = MERTConfig.from_preset("mert-v1-95m")
    assert config.hop_length == 320 and config.receptive_field == 400
    assert config.frame_rate == 75.0
    # MERT_SPEC 1.3: 3 s -> 224, 5 s -> 374, 5.12 s -> 383 frames.
    assert [config.num_frames(n) for n in (72000, 120000, 122880)] == [224, 374, 383]
    model = MERTModel.from_preset("mert-tiny", seed=0).eval()
    for n in (400, 719, 720, 24000, 24321):
        with torch.no_grad():
            t = model(torch.randn(1, n)).last_hidden_state.shape[1]
        assert t == model.num_frames(n) == (n - 400) // 320 + 1
