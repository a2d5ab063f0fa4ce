"""Hugging Face Hub resolution and hub-ready folders.

``MERTModel.from_pretrained("org/name")`` goes through ``huggingface_hub`` (download when
online, the cache otherwise, ``HF_HUB_OFFLINE``, ``revision``), and ``save_pretrained``
writes what the hub's MERT folders hold. Nothing here reaches the network: the caches are
laid out as ``huggingface_hub`` lays them out (``models--org--name/blobs/<sha256>``,
``snapshots/<commit>/<file>`` symlinks into ``blobs``, ``refs/<branch>`` holding the
commit), and the "online" case points ``HF_ENDPOINT`` at a closed local port. The
environment-variable cases run in a subprocess, because huggingface_hub reads
``HF_HOME``/``HF_HUB_CACHE``/``HF_HUB_OFFLINE`` once, at import.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from mert_plugin import CheckpointError, MERTModel
from mert_plugin.checkpoint import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def add_snapshot(cache: str, repo_id: str, commit: str, files: dict, refs=("main",)) -> str:
    """Store ``files`` ({name: local path}) as revision ``commit`` of ``repo_id`` in hub cache layout."""
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo_dir, "snapshots", commit)
    os.makedirs(os.path.join(repo_dir, "blobs"), exist_ok=True)
    os.makedirs(snap, exist_ok=True)
    for name, src in files.items():
        data = open(src, "rb").read()
        blob = os.path.join(repo_dir, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snap), os.path.join(snap, name))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo_dir, "refs", ref), "w") as f:
            f.write(commit)
    return snap


def saved(tmp_path, name, seed, bin_weights=False):
    folder = tmp_path / name
    model = MERTModel.from_preset("mert-tiny", seed=seed)
    model.save_pretrained(str(folder), safe_serialization=not bin_weights)
    weights = "pytorch_model.bin" if bin_weights else "model.safetensors"
    return model, {"config.json": str(folder / "config.json"), weights: str(folder / weights)}


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def hub_cache(tmp_path):
    """A cache with m-a-p/MERT-v1-95M at two commits (main -> A, tag v2 -> B) and a .bin-only repo."""
    cache = str(tmp_path / "home" / "hub")
    model_a, files_a = saved(tmp_path, "a", 1)
    model_b, files_b = saved(tmp_path, "b", 2)
    model_c, files_c = saved(tmp_path, "c", 3, bin_weights=True)
    add_snapshot(cache, "m-a-p/MERT-v1-95M", COMMIT_A, files_a, refs=("main",))
    add_snapshot(cache, "m-a-p/MERT-v1-95M", COMMIT_B, files_b, refs=("v2",))
    add_snapshot(cache, "someone/mert-bin", COMMIT_A, files_c)
    return cache, {"main": model_a, "v2": model_b, "bin": model_c}


def test_hub_id_from_cache_with_revision(hub_cache):
    cache, models = hub_cache
    kw = {"cache_dir": cache, "local_files_only": True}
    assert same_weights(MERTModel.from_pretrained("m-a-p/MERT-v1-95M", **kw), models["main"])
    assert same_weights(MERTModel.from_pretrained("m-a-p/MERT-v1-95M", revision="v2", **kw), models["v2"])
    assert same_weights(MERTModel.from_pretrained("m-a-p/MERT-v1-95M", revision=COMMIT_B, **kw), models["v2"])
    assert same_weights(MERTModel.from_pretrained("someone/mert-bin", **kw), models["bin"])  # weights_only .bin
    with pytest.raises(CheckpointError, match=r"m-a-p/MERT-v1-330M \(revision main\): config.json is not in the "
                                              r"Hugging Face cache .*local_files_only=True"):
        MERTModel.from_pretrained("m-a-p/MERT-v1-330M", **kw)
    with pytest.raises(CheckpointError, match="revision nope"):
        MERTModel.from_pretrained("m-a-p/MERT-v1-95M", revision="nope", **kw)
    with pytest.raises(CheckpointError, match="force_download"):
        MERTModel.from_pretrained("m-a-p/MERT-v1-95M", force_download=True, **kw)


def test_cached_config_without_weights_is_a_clear_error(tmp_path):
    cache = str(tmp_path / "hub")
    _, files = saved(tmp_path, "m", 0)
    add_snapshot(cache, "org/no-weights", COMMIT_A, {"config.json": files["config.json"]})
    with pytest.raises(CheckpointError, match="no weight file .* is not in the Hugging Face cache"):
        load_checkpoint("org/no-weights", cache_dir=cache, local_files_only=True)


def test_local_folder_wins_over_hub_id(tmp_path, monkeypatch):
    model, _ = saved(tmp_path, "org/name", 4)  # a folder spelled like a hub id
    monkeypatch.chdir(tmp_path)
    assert same_weights(MERTModel.from_pretrained("org/name", local_files_only=True), model)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from mert_plugin import CheckpointError, MERTModel
    out = {}
    for name, kw in (("main", {}), ("v2", {"revision": "v2"}))[:int(sys.argv[1])]:
        m = MERTModel.from_pretrained("m-a-p/MERT-v1-95M", **kw)
        out[name] = float(sum(p.double().sum() for p in m.state_dict().values()))
    if int(sys.argv[1]) > 1:
        try:
            MERTModel.from_pretrained("m-a-p/MERT-v1-330M")
        except CheckpointError as exc:
            out["error"] = str(exc)
    print(json.dumps(out))
""")


def _run(env_extra, tmp_path, loads=2):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(env_extra, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(loads)], env=env, cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _checksum(model):
    return float(sum(p.double().sum() for p in model.state_dict().values()))


def test_env_hf_home_and_offline(hub_cache, tmp_path):
    """HF_HOME locates the cache; with HF_HUB_OFFLINE=1 it is read, never the network."""
    cache, models = hub_cache
    out = _run({"HF_HOME": os.path.dirname(cache), "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert out["main"] == pytest.approx(_checksum(models["main"]), rel=0, abs=1e-9)
    assert out["v2"] == pytest.approx(_checksum(models["v2"]), rel=0, abs=1e-9)
    assert out["main"] != out["v2"]
    assert "HF_HUB_OFFLINE is set" in out["error"] and cache in out["error"], out["error"]


def test_unreachable_hub_falls_back_to_cache(hub_cache, tmp_path):
    """Online (no HF_HUB_OFFLINE) but the endpoint refuses connections: huggingface_hub serves the
    cached snapshot of ``main``. (A file that is not cached costs huggingface_hub's retries, about
    23 s, before the error; not exercised here.)"""
    cache, models = hub_cache
    out = _run({"HF_HOME": os.path.dirname(cache), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"},
               tmp_path, loads=1)
    assert out["main"] == pytest.approx(_checksum(models["main"]), rel=0, abs=1e-9)


def test_env_hf_hub_cache(hub_cache, tmp_path):
    cache, models = hub_cache
    out = _run({"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert out["main"] == pytest.approx(_checksum(models["main"]), rel=0, abs=1e-9)


# ------------------------------------------------------------------ save_pretrained
@pytest.mark.parametrize("preset,rate,normalize", [("mert-tiny", 24000, False), ("mert-v0", 16000, True)])
def test_save_pretrained_writes_preprocessor_and_card(tmp_path, preset, rate, normalize):
    transformers = pytest.importorskip("transformers")
    if preset == "mert-v0":  # the v0 geometry is 95M parameters: keep the weights tiny, the rate is what matters
        from mert_plugin import MERTConfig
        cfg = MERTConfig.from_preset("mert-tiny")
        cfg.sample_rate = 16000
        model = MERTModel(cfg)
    else:
        model = MERTModel.from_preset(preset, seed=0)
    folder = tmp_path / "out"
    model.save_pretrained(str(folder))
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre == {"do_normalize": normalize, "feature_extractor_type": "Wav2Vec2FeatureExtractor",
                   "feature_size": 1, "padding_side": "right", "padding_value": 0.0,
                   "return_attention_mask": True, "sampling_rate": rate}
    fe = transformers.AutoFeatureExtractor.from_pretrained(str(folder))
    assert type(fe).__name__ == "Wav2Vec2FeatureExtractor"
    assert (fe.sampling_rate, fe.do_normalize, fe.return_attention_mask) == (rate, normalize, True)
    inputs = fe([0.1 * torch.randn(rate).numpy()], sampling_rate=rate, return_tensors="pt")
    assert inputs["input_values"].shape == (1, rate) and inputs["attention_mask"].all()
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "pipeline_tag: feature-extraction" in card
    assert f"{rate} Hz" in card and "HubertModel.from_pretrained" in card
    # A card someone wrote is kept; the preprocessor follows an explicit do_normalize.
    (folder / "README.md").write_text("my card\n")
    from mert_plugin.checkpoint import save_pretrained
    save_pretrained(model, str(folder), do_normalize=not normalize)
    assert (folder / "README.md").read_text() == "my card\n"
    assert json.loads((folder / "preprocessor_config.json").read_text())["do_normalize"] is (not normalize)
