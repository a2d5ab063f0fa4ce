"""Checkpoint interop and safety: fairseq .pt without fairseq, HF cache, configs, hostile files."""
import os
import sys
import types

import pytest
import torch

from mert_plugin import CheckpointError, ConfigError, MERTConfig, MERTModel
from mert_plugin.checkpoint import load_checkpoint, restricted_load

omegaconf = pytest.importorskip("omegaconf")


def _to_fairseq_key(k):
    """HF -> fairseq names (the inverse of the map in MERT's convert_MERT_HF.py)."""
    if k.startswith("feature_projection.projection."):
        return "post_extract_proj." + k.split(".")[-1]
    if k.startswith("feature_projection.layer_norm."):
        return "layer_norm." + k.split(".")[-1]
    if k.startswith("encoder.pos_conv_embed.conv."):
        return "encoder.pos_conv.0." + k.split(".")[-1]
    if k == "masked_spec_embed":
        return "mask_emb"
    if k.startswith("feature_extractor.conv_layers."):
        p = k.split(".")
        return f"feature_extractor.conv_layers.{p[2]}.{'0' if p[3] == 'conv' else '2'}.{p[4]}"
    k = k.replace(".attention.", ".self_attn.").replace(".layer_norm.", ".self_attn_layer_norm.") \
        if k.startswith("encoder.layers.") else k
    return k.replace(".feed_forward.intermediate_dense.", ".fc1.").replace(".feed_forward.output_dense.", ".fc2.")


class _FakeFairseqModules:
    """Temporarily provide fairseq.data.dictionary.Dictionary so a checkpoint can be *written*
    the way fairseq writes it; loading happens after these modules are gone."""

    def __enter__(self):
        class Dictionary:
            def __init__(self):
                self.symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in range(1024)]
                self.indices = {s: i for i, s in enumerate(self.symbols)}

        Dictionary.__module__ = "fairseq.data.dictionary"
        Dictionary.__qualname__ = "Dictionary"
        self.names = ["fairseq", "fairseq.data", "fairseq.data.dictionary"]
        for n in self.names:
            sys.modules[n] = types.ModuleType(n)
        sys.modules["fairseq.data.dictionary"].Dictionary = Dictionary
        return Dictionary

    def __exit__(self, *exc):
        for n in self.names:
            sys.modules.pop(n, None)


def _write_fairseq_ckpt(model: MERTModel, path, layer_norm_first=False):
    state = {_to_fairseq_key(k): v for k, v in model.state_dict().items()}
    state["final_proj.weight"] = torch.randn(8 * 64, model.config.hidden_size)
    state["label_embs_concat"] = torch.rand(8 * 1028, 64)
    c = model.config
    cfg = omegaconf.OmegaConf.create({
        "model": {
            "_name": "mert", "extractor_mode": "default", "encoder_layers": c.num_hidden_layers,
            "encoder_embed_dim": c.hidden_size, "encoder_ffn_embed_dim": c.intermediate_size,
            "encoder_attention_heads": c.num_attention_heads, "activation_fn": "gelu",
            "layer_norm_first": layer_norm_first, "conv_bias": False,
            "conv_feature_layers": "[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2",
            "conv_pos": c.num_conv_pos_embeddings, "conv_pos_groups": c.num_conv_pos_embedding_groups,
            "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0, "encoder_layerdrop": 0.05,
            "dropout_input": 0.1, "final_dim": 64, "mask_prob": 0.8, "attention_relax": -1.0,
            "deepnorm": False, "feature_extractor_cqt": False,
        },
        "task": {"_name": "mert_pretraining", "sample_rate": 24000, "label_rate": 75,
                 "labels": [f"encodec_{i}" for i in range(8)]},
    })
    with _FakeFairseqModules() as Dictionary:
        torch.save({"cfg": cfg, "model": state, "task_state": {"dictionaries": [Dictionary() for _ in range(8)]},
                    "extra_state": {"epoch": 3, "train_iterator": {"epoch": 3}}, "optimizer_history": []}, path)
    assert "fairseq" not in sys.modules


@pytest.mark.parametrize("pre_ln", [False, True])
def test_fairseq_checkpoint_loads_without_fairseq(tmp_path, pre_ln):
    config = MERTConfig.from_preset("mert-tiny")
    config.do_stable_layer_norm = pre_ln
    torch.manual_seed(0)
    ref = MERTModel(config)
    ref.reset_parameters()
    ref.eval()
    path = tmp_path / "MERT_fairseq.pt"
    _write_fairseq_ckpt(ref, path, layer_norm_first=pre_ln)
    loaded = MERTModel.from_pretrained(str(path))
    assert "fairseq" not in sys.modules and "fairseq.data.dictionary" not in sys.modules
    assert loaded.config.do_stable_layer_norm == pre_ln
    assert loaded.config.conv_dim == [64] * 7 and loaded.sample_rate == 24000
    wav = torch.randn(1, 12000)
    with torch.no_grad():
        a, b = ref(wav).hidden_states, loaded(wav).hidden_states
    assert all(torch.equal(x, y) for x, y in zip(a, b))


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_hostile_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil_pt = tmp_path / "evil_fairseq.pt"
    torch.save({"cfg": None, "model": {}, "payload": _Exploit(marker)}, evil_pt)
    with pytest.raises(CheckpointError, match="refusing to load global"):
        restricted_load(str(evil_pt))
    with pytest.raises(CheckpointError):
        MERTModel.from_pretrained(str(evil_pt))
    # An HF folder whose .bin carries a payload goes through weights_only=True.
    folder = tmp_path / "hf"
    folder.mkdir()
    MERTConfig.from_preset("mert-tiny").save_json(str(folder / "config.json"))
    torch.save({"x": _Exploit(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot load weights safely"):
        MERTModel.from_pretrained(str(folder))
    assert not marker.exists()


def test_truncated_and_missing_weights_give_clear_errors(tmp_path):
    model = MERTModel.from_preset("mert-tiny", seed=0)
    model.save_pretrained(str(tmp_path / "m"))
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        MERTModel.from_pretrained(str(tmp_path / "m"))
    w.unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        MERTModel.from_pretrained(str(tmp_path / "m"))
    with pytest.raises(CheckpointError, match="no such file"):
        MERTModel.from_pretrained(str(tmp_path / "absent"))


# Hub ids (huggingface_hub download, cache, HF_HUB_OFFLINE, revision): tests/test_hub.py


def test_weight_norm_spellings_are_equivalent():
    model = MERTModel.from_preset("mert-tiny", seed=0)
    state = model.state_dict()
    renamed = {k.replace("weight_g", "parametrizations.weight.original0")
               .replace("weight_v", "parametrizations.weight.original1"): v for k, v in state.items()}
    prefixed = {"hubert." + k: v for k, v in renamed.items()}
    prefixed["classifier.weight"] = torch.zeros(2, 2)  # a task head is dropped
    other = MERTModel(model.config)
    other.load_state_dict(prefixed)
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())


def test_config_validation(tmp_path):
    good = MERTConfig.from_preset("mert-v1-95m").to_hf_dict(model_type="mert_model")
    assert MERTConfig.from_dict(good).hidden_size == 768
    with pytest.raises(ConfigError, match="unknown config fields.*hiden_size"):
        MERTConfig.from_dict({**good, "hiden_size": 512})
    assert MERTConfig.from_dict({**good, "hiden_size": 512}, strict=False).hidden_size == 768
    with pytest.raises(ConfigError, match="not divisible by num_attention_heads"):
        MERTConfig.from_dict({**good, "hidden_size": 770})
    with pytest.raises(ConfigError, match="equal length"):
        MERTConfig.from_dict({**good, "conv_kernel": [10, 3]})
    with pytest.raises(ConfigError, match="deepnorm"):
        MERTConfig.from_dict({**good, "deepnorm": True})
    with pytest.raises(ConfigError, match="model_type"):
        MERTConfig.from_dict({**good, "model_type": "bert"})
    with pytest.raises(ConfigError, match=r"layerdrop must be a number in \[0, 1\]"):
        MERTConfig.from_dict({**good, "layerdrop": 2})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MERTConfig.from_json_file(str(bad))
    with pytest.raises(ConfigError, match="unknown preset"):
        MERTConfig.from_preset("mert-v9")
    # Plain HuBERT configs (MERT-v0) carry no sample rate: 16 kHz is implied.
    v0 = MERTConfig.from_preset("mert-v0").to_hf_dict()
    v0.pop("sample_rate")
    assert MERTConfig.from_dict(v0).sample_rate == 16000


def test_speechbrain_checkpoint_folder(tmp_path):
    model = MERTModel.from_preset("mert-tiny", seed=2)
    ckpt = tmp_path / "CKPT+2026-11-26+00-00-00+00"
    ckpt.mkdir()
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, ckpt / "student.ckpt")
    model.config.save_json(str(ckpt / "mert_config.ckpt"))
    config, state = load_checkpoint(str(ckpt))
    assert config.hidden_size == 128
    loaded = MERTModel.from_pretrained(str(ckpt))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
