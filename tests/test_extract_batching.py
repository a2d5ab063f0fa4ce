"""mert-extract: devices, precision, cross-file batching and torchrun sharding, each compared with the
fp32 single-file path (mert_plugin.extract_features on load_audio, one file at a time).

The CUDA code path cannot run here (CPU-only torch, no onnxruntime-gpu); what is tested is that asking
for it is a one-line error naming what is missing, and that ``auto`` picks the CPU.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from extractors import cli
from extractors.export_onnx import export_onnx, frame_cosines
from mert_plugin import MERTModel, extract_features, load_audio

SR = 24000
WINDOW = 3.0  # seconds: small, so that a few seconds of audio make several windows of several lengths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """mert-tiny (seed 5): HF folder, dynamic-length fp32 and int8 graphs, and the PyTorch model."""
    root = tmp_path_factory.mktemp("models")
    model = MERTModel.from_preset("mert-tiny", seed=5).eval()
    model.save_pretrained(str(root / "hf"))
    src = "preset mert-tiny (random weights, seed 5)"
    export_onnx(model, str(root / "dyn.onnx"), window_seconds=1.0, length="dynamic", source=src)
    export_onnx(model, str(root / "dyn8.onnx"), window_seconds=1.0, length="dynamic", quantize="int8", source=src)
    return {"hf": str(root / "hf"), "dyn": str(root / "dyn.onnx"), "int8": str(root / "dyn8.onnx"), "model": model}


def _music(seconds, rate, seed):
    """A few partials with vibrato and a little noise: closer to music than a sine."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    f0 = 110.0 * 2 ** (seed / 12)
    x = sum(0.2 / k * np.sin(2 * np.pi * k * f0 * t + 0.5 * np.sin(2 * np.pi * 4 * t)) for k in (1, 2, 3, 5))
    return (x * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t)) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


LENGTHS = {"short.wav": (0.7, 24000), "mid.wav": (2.2, 44100), "long.flac": (7.45, 48000), "two.wav": (4.1, 24000)}


@pytest.fixture(scope="module")
def music(tmp_path_factory):
    root = tmp_path_factory.mktemp("music")
    for i, (name, (secs, rate)) in enumerate(LENGTHS.items()):
        sf.write(root / name, _music(secs, rate, i), rate)
    return root


def _reference(model, path, **kw):
    """The fp32 single-file path."""
    return extract_features(model, load_audio(str(path), SR), window_seconds=WINDOW, **kw).numpy()


def _run(argv, capsys=None):
    rc = cli.main(argv + ["--no-progress", "--threads", "1", "--window-seconds", str(WINDOW)])
    return rc, (capsys.readouterr().err if capsys is not None else "")


@pytest.fixture
def calls(monkeypatch):
    """The window lengths of every model call (the real encode still runs)."""
    seen = []
    for cls in (cli.TorchBackend, cli.OnnxBackend):
        real = cls.encode

        def spy(self, windows, _real=real):
            seen.append(sorted(x.shape[0] for x in windows))
            return _real(self, windows)

        monkeypatch.setattr(cls, "encode", spy)
    return seen


def test_padded_forward_equals_unpadded_runs(models):
    model = models["model"]
    lengths = [24000, 17_321, 401, 9_600]
    audio = torch.zeros(len(lengths), max(lengths))
    for b, n in enumerate(lengths):
        audio[b, :n] = torch.from_numpy(_music(n / SR, SR, b)[:n])
    with torch.inference_mode():
        states = cli.padded_forward(model, audio, torch.tensor(lengths))
        for b, n in enumerate(lengths):
            ref = model(audio[b:b + 1, :n]).hidden_states
            t = model.num_frames(n)
            for got, want in zip(states, ref):
                assert (got[b, :t] - want[0]).abs().max() <= 1e-5, (n, t)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_windows_of_several_files_share_a_batch_and_equal_the_single_file_path(models, music, tmp_path, calls,
                                                                                backend):
    model = models["model"]
    out = tmp_path / "feats"
    source = ["--model", models["hf"]] if backend == "torch" else ["--model", models["dyn"]]
    rc, _ = _run([str(music), "--output-dir", str(out), "--batch-seconds", "60", "--device", "cpu"] + source)
    assert rc == 0
    # Windows of different files and lengths went through one call (the short ones together).
    assert any(len(set(c)) > 1 for c in calls), calls
    assert len(calls) < sum(len(c) for c in calls)
    tol = 1e-5 if backend == "torch" else 1e-4
    for name in LENGTHS:
        got = np.load(out / (os.path.splitext(name)[0] + ".npy"))
        ref = _reference(model, music / name)
        assert got.shape == ref.shape and np.abs(got - ref).max() <= tol, name


def test_sub_batches_group_similar_lengths_within_the_budget(models):
    model = models["model"]
    backend = cli.TorchBackend(model, [4], 72000, 24000)
    ex = cli.Extractor(backend, "", None, "none", np.float32, 8, None, batch_samples=150_000)
    groups = ex.sub_batches([72000, 1000, 70000, 30000, 900, 29000, 800])
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert groups == [[0, 2], [3, 5], [1, 4, 6]]  # no 72000 next to a 1000: padding stays below 1/4
    ex.batch_size = 2
    assert ex.sub_batches([1000, 1000, 1000]) == [[0, 1], [2]]


def test_bf16_on_cpu_is_close_to_fp32_and_recorded(models, music, tmp_path, capsys):
    model = models["model"]
    out = tmp_path / "feats"
    rc, err = _run([str(music), "--model", models["hf"], "--output-dir", str(out), "--device", "cpu",
                    "--precision", "bf16", "--batch-seconds", "60"], capsys)
    assert rc == 0, err
    assert ("no bf16 units" in err) == (not cli.cpu_has_bf16())  # warned where bf16 is a slow fallback
    for name in LENGTHS:
        got = np.load(out / (os.path.splitext(name)[0] + ".npy"))
        ref = _reference(model, music / name)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.abs(got - ref).max() > 1e-4  # it did compute in bf16
        cos = frame_cosines(got, ref)  # [L, T]
        assert cos.mean(-1).min() >= 0.99, (name, cos.mean(-1))
    assert json.loads((out / "mert-extract.json").read_text())["precision"] == "bf16"
    rc, err = _run([str(music), "--model", models["hf"], "--output-dir", str(out)], capsys)  # fp32 into it
    assert rc == cli.EXIT_USAGE and "other settings" in err and "precision" in err


def test_int8_graph_runs_and_is_recorded_as_int8(models, music, tmp_path, capsys):
    model = models["model"]
    out = tmp_path / "feats"
    rc, err = _run([str(music / "long.flac"), "--model", models["int8"], "--output-dir", str(out)], capsys)
    assert rc == 0, err
    got, ref = np.load(out / "long.npy"), _reference(model, music / "long.flac")
    assert got.shape == ref.shape and frame_cosines(got, ref).mean(-1).min() >= 0.99
    assert json.loads((out / "mert-extract.json").read_text())["precision"] == "int8"
    rc, err = _run([str(music / "long.flac"), "--model", models["dyn"], "--output-dir", str(tmp_path / "o"),
                    "--precision", "fp16"], capsys)
    assert rc == cli.EXIT_USAGE and "mert-export-onnx --quantize fp16" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the CUDA path would run")
@pytest.mark.parametrize("which, message", [("hf", "sees no CUDA device"), ("dyn", "install onnxruntime-gpu")])
def test_cuda_without_a_gpu_is_a_one_line_error_and_auto_is_cpu(models, music, tmp_path, capsys, which, message):
    base = [str(music / "short.wav"), "--model", models[which]]
    rc, err = _run(base + ["--output-dir", str(tmp_path / "a"), "--device", "cuda"], capsys)
    assert rc == cli.EXIT_USAGE and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    rc, err = _run(base + ["--output-dir", str(tmp_path / "b"), "--device", "auto"], capsys)
    assert rc == 0, err


def test_torchrun_two_processes_write_one_folder(models, music, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    model = models["model"]
    out = tmp_path / "feats"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "extractors.cli", str(music), "--model",
           models["hf"], "--output-dir", str(out), "--no-progress", "--threads", "1", "--window-seconds",
           str(WINDOW), "--device", "auto"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shard 0/2:" in done.stderr and "shard 1/2:" in done.stderr
    manifests = sorted(p.name for p in out.glob("manifest*.jsonl"))
    assert manifests == ["manifest.shard0of2.jsonl", "manifest.shard1of2.jsonl"]
    records = [json.loads(line) for m in manifests for line in open(out / m)]
    assert sorted(r["output"] for r in records) == sorted(os.path.splitext(n)[0] + ".npy" for n in LENGTHS)
    assert all(r["status"] == "ok" for r in records)
    # Balanced: the 4 sorted output names dealt round-robin, 2 per rank, each file on exactly one rank.
    per_rank = [sorted(json.loads(line)["output"] for line in open(out / m)) for m in manifests]
    assert per_rank == [["long.npy", "short.npy"], ["mid.npy", "two.npy"]]
    assert "shard 0/2: 2 written" in done.stderr and "shard 1/2: 2 written" in done.stderr
    for name in LENGTHS:
        got = np.load(out / (os.path.splitext(name)[0] + ".npy"))
        assert np.abs(got - _reference(model, music / name)).max() <= 1e-5, name
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # resumes: nothing to do
    assert again.returncode == 0 and "0 written" in again.stderr
