"""mert-extract: outputs vs the library, both backends, resume after SIGKILL, hostile inputs, shards.

Reference features come from mert_plugin.extract_features(model, load_audio(path)),
an independent code path (whole-file decode, in-memory windows).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from extractors import cli
from extractors.export_onnx import export_onnx
from extractors.stream import StreamWindower, decode_stream
from mert_plugin import MERTModel, extract_features, load_audio
from mert_plugin.extract import plan_windows

SR = 24000
TORCH_WINDOW = cli.DEFAULT_WINDOW_SECONDS  # mert-extract's torch default (the fixed graph below: 5 s)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """mert-tiny (seed 2) as an HF folder and as a .onnx graph, plus the PyTorch model."""
    root = tmp_path_factory.mktemp("models")
    model = MERTModel.from_preset("mert-tiny", seed=2).eval()
    model.save_pretrained(str(root / "hf"))
    export_onnx(model, str(root / "tiny.onnx"), source="preset mert-tiny (random weights, seed 2)")
    return str(root / "hf"), str(root / "tiny.onnx"), model


def _tone(seconds, rate, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    x = 0.3 * np.sin(2 * np.pi * (220 + 20 * seed) * t) + 0.02 * rng.standard_normal(t.shape)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.fixture(scope="module")
def music(tmp_path_factory):
    """A small library: nested folders, several rates, channels, formats and lengths."""
    root = tmp_path_factory.mktemp("music")
    (root / "album" / "cd1").mkdir(parents=True)
    specs = {"a.wav": (3.0, 44100, 2), "album/b.flac": (12.3, 48000, 1), "album/cd1/c.wav": (0.5, 24000, 1),
             "album/cd1/d.ogg": (6.2, 22050, 2), "e.wav": (5.0, 24000, 1)}
    for i, (name, (secs, rate, ch)) in enumerate(specs.items()):
        sf.write(root / name, _tone(secs, rate, ch, seed=i), rate)
    return root, sorted(specs)


def _run(argv, capsys=None):
    rc = cli.main(argv + ["--no-progress", "--threads", "1"])
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def _npy(name):
    return os.path.splitext(name)[0] + ".npy"


def _manifest(out):
    return [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]


def test_torch_backend_matches_library_and_mirrors_folders(models, music, tmp_path, capsys):
    hf, _, model = models
    root, names = music
    out = tmp_path / "feats"
    rc, err = _run([str(root), "--model", hf, "--output-dir", str(out)], capsys)
    assert rc == 0, err
    for name in names:
        ref = extract_features(model, load_audio(str(root / name), SR), window_seconds=TORCH_WINDOW).numpy()
        got = np.load(out / _npy(name))
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5, name
    records = _manifest(out)
    assert sorted(r["output"] for r in records) == sorted(_npy(n) for n in names)
    assert all(r["status"] == "ok" for r in records)
    settings = json.loads((out / "mert-extract.json").read_text())
    assert settings["backend"] == "torch" and settings["layers"] == list(range(5))
    assert "5 written, 0 already done, 0 failed" in err


def test_onnx_backend_matches_torch_backend(models, music, tmp_path, capsys):
    _, graph, model = models
    root, names = music
    out = tmp_path / "feats"
    rc, err = _run([str(root), "--model", graph, "--output-dir", str(out), "--batch-size", "3"], capsys)
    assert rc == 0, err
    for name in names:
        ref = extract_features(model, load_audio(str(root / name), SR)).numpy()
        assert np.abs(np.load(out / _npy(name)) - ref).max() <= 1e-4, name
    assert json.loads((out / "mert-extract.json").read_text())["backend"] == "onnx"


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_layers_mean_pooling_and_float16(models, music, tmp_path, backend):
    hf, graph, model = models
    root, names = music
    out = tmp_path / "feats"
    model_arg = hf if backend == "torch" else graph
    rc, _ = _run([str(root / "album"), "--model", model_arg, "--output-dir", str(out), "--layers", "4,0",
                  "--pooling", "mean", "--dtype", "float16"])
    assert rc == 0
    name = "album/b.flac"
    ref = extract_features(model, load_audio(str(root / name), SR), layers=[4, 0], pooling="mean",
                           window_seconds=TORCH_WINDOW if backend == "torch" else 5.0).numpy()
    got = np.load(out / "b.npy")
    assert got.dtype == np.float16 and got.shape == (2, model.config.hidden_size)
    assert np.abs(got.astype(np.float32) - ref).max() <= 2e-3  # float16 rounding


def test_window_and_overlap_options(models, music, tmp_path):
    hf, graph, model = models
    root, _ = music
    out = tmp_path / "feats"
    rc, _ = _run([str(root / "album" / "b.flac"), "--model", hf, "--output-dir", str(out), "--window-seconds", "2",
                  "--overlap-seconds", "0.5", "--layers", "last"])
    assert rc == 0
    wav = load_audio(str(root / "album" / "b.flac"), SR)
    ref = extract_features(model, wav, layers=[-1], window_seconds=2, overlap_seconds=0.5).numpy()
    assert np.abs(np.load(out / "b.npy") - ref).max() <= 1e-5
    rc, _ = _run([str(root), "--model", graph, "--output-dir", str(tmp_path / "o2"), "--window-seconds", "2"])
    assert rc == cli.EXIT_USAGE  # the graph's window is fixed at 5 s


def test_streaming_windows_equal_plan_windows():
    """The streamed windows are exactly plan_windows' for any length and chunking."""
    rng = random.Random(0)
    for window, overlap in ((120000, 24000), (4000, 1000), (2000, 0), (1000, 990), (120000, 0)):
        for _ in range(150):
            n = rng.randint(400, rng.choice([3, 30]) * window)
            x = np.arange(n, dtype=np.float32)
            sw, got, i = StreamWindower(window, overlap, 320, 400), [], 0
            while i < n:
                step = rng.randint(1, 70000)
                got += sw.push(x[i:i + step])
                i += step
            got += sw.finish()
            assert [w for w, _ in got] == plan_windows(n, window, overlap, 320, 400)
            assert all(np.array_equal(a, x[w.sample_start:w.sample_end]) for w, a in got)


@pytest.mark.parametrize("rate, channels", [(44100, 2), (8000, 1), (96000, 3), (24000, 1)])
def test_block_decoding_is_identical_to_load_audio(tmp_path, rate, channels):
    path = tmp_path / "x.wav"
    sf.write(path, _tone(3.3, rate, channels), rate, subtype="FLOAT")
    streamed = np.concatenate(list(decode_stream(str(path), SR, block_frames=5000)))
    assert np.array_equal(streamed, load_audio(str(path), SR).numpy())


def _hostile_corpus(root):
    """Bad inputs (must fail by name) and awkward-but-valid ones (must work)."""
    rng = np.random.default_rng(5)
    bad, good = {}, {}
    (root / "empty.wav").write_bytes(b"")
    bad["empty.wav"] = "empty file"
    sf.write(root / "header_only.wav", np.zeros((0, 1), np.float32), 44100)
    bad["header_only.wav"] = "no samples"
    sf.write(root / "full.flac", _tone(2.0, 44100), 44100)
    data = (root / "full.flac").read_bytes()
    (root / "full.flac").unlink()
    (root / "truncated.flac").write_bytes(data[: len(data) // 2])
    bad["truncated.flac"] = "cannot decode"
    for ext in ("wav", "flac", "mp3", "ogg"):
        (root / f"random.{ext}").write_bytes(rng.bytes(4096))
        bad[f"random.{ext}"] = "cannot decode"
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        x = _tone(1.0, 24000).astype(np.float32)
        x[1000] = value
        sf.write(root / name, x, 24000, subtype="FLOAT")
        bad[name] = "NaN or infinite"
    sf.write(root / "too_short.wav", _tone(0.01, 24000), 24000)  # 240 samples < 400
    bad["too_short.wav"] = "too short"
    os.symlink(root / "does_not_exist.wav", root / "dangling.wav")
    bad["dangling.wav"] = "no such file"
    os.mkfifo(root / "pipe.wav")  # would block a naive reader forever
    bad["pipe.wav"] = "not a regular file"
    (root / "folder.wav").mkdir()  # a folder named like audio: walked, not decoded
    sf.write(root / "folder.wav" / "inside.wav", _tone(1.0, 16000), 16000)
    good["folder.wav/inside.wav"] = 16000
    sf.write(root / "silence.wav", np.zeros(30000, np.float32), 24000)
    good["silence.wav"] = 24000
    sf.write(root / "eight_channels.wav", _tone(1.5, 44100, 8), 44100)
    good["eight_channels.wav"] = 44100
    for rate in (7350, 11025, 192000):
        sf.write(root / f"rate_{rate}.flac", _tone(1.2, rate), rate)
        good[f"rate_{rate}.flac"] = rate
    sf.write(root / "exactly_400.wav", _tone(400 / 24000, 24000), 24000)
    good["exactly_400.wav"] = 24000
    return bad, good


def test_hostile_inputs_fail_by_name_and_the_rest_goes_on(models, tmp_path, capsys):
    hf, _, model = models
    root = tmp_path / "in"
    root.mkdir()
    bad, good = _hostile_corpus(root)
    out = tmp_path / "feats"
    rc, err = _run([str(root), str(tmp_path / "no_such_folder"), "--model", hf, "--output-dir", str(out)], capsys)
    assert rc == cli.EXIT_FAILED
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("failed: ")]
    for name, reason in bad.items():
        hits = [l for l in lines if str(root / name) in l]
        assert len(hits) == 1 and reason in hits[0], (name, hits)
    assert any("no_such_folder" in l and "no such file" in l for l in lines)
    assert len(lines) == len(bad) + 1
    for name, rate in good.items():
        got = np.load(out / _npy(name))
        ref = extract_features(model, load_audio(str(root / name), SR)).numpy()
        assert got.shape == ref.shape and np.isfinite(got).all() and np.abs(got - ref).max() <= 1e-5, name
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.npy"))
    assert written == sorted(_npy(n) for n in good)  # nothing for the bad ones
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    failed = [r for r in _manifest(out) if r["status"] == "failed"]
    assert len(failed) == len(bad) + 1 and all(r["error"] for r in failed)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_reported(models, tmp_path, capsys):
    hf, _, _ = models
    sf.write(tmp_path / "locked.wav", _tone(1.0, 24000), 24000)
    os.chmod(tmp_path / "locked.wav", 0)
    rc, err = _run([str(tmp_path / "locked.wav"), "--model", hf, "--output-dir", str(tmp_path / "o")], capsys)
    assert rc == cli.EXIT_FAILED and "permission denied" in err


def _snapshot(out):
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.npy")}


def test_sigkill_then_rerun_finishes_the_rest_and_rewrites_nothing(models, tmp_path):
    hf, _, model = models
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    names = [f"sub/t{i:02d}.wav" if i % 2 else f"t{i:02d}.wav" for i in range(10)]
    for i, name in enumerate(names):
        sf.write(root / name, _tone(15.0, 44100, 2, seed=i), 44100)
    out = tmp_path / "feats"
    cmd = [sys.executable, "-m", "extractors.cli", str(root), "--model", hf, "--output-dir", str(out),
           "--threads", "1", "--batch-size", "2", "--no-progress", "--window-seconds", "5"]  # several windows a file
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = random.Random()
    finished = {}
    for attempt in range(2):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = len(finished) + 1 + attempt
        deadline = time.time() + 120
        while len(list(out.rglob("*.npy"))) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the next file
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        now = _snapshot(out)
        assert all(now[k] == v for k, v in finished.items())  # nothing finished was rewritten
        for name in now:  # whatever is visible under a final name is complete and correct
            ref = extract_features(model, load_audio(str(root / name.replace(".npy", ".wav")), SR)).numpy()
            assert np.abs(np.load(out / name) - ref).max() <= 1e-5
        finished = now
    assert 0 < len(finished) < len(names), "the kills should land mid-run"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{len(names) - len(finished)} written, {len(finished)} already done, 0 failed" in done.stderr
    final = _snapshot(out)
    assert all(final[k] == v for k, v in finished.items())
    assert sorted(final) == sorted(_npy(n) for n in names)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # temporaries of the killed runs are gone
    for name in names:
        ref = extract_features(model, load_audio(str(root / name), SR)).numpy()
        assert np.abs(np.load(out / _npy(name)) - ref).max() <= 1e-5
    ok = {r["output"] for r in _manifest(out) if r["status"] == "ok"}
    assert ok == {_npy(n) for n in names}  # the manifest lists every output, even ones finished at the kill


def test_shards_partition_the_inputs(models, music, tmp_path):
    hf, _, _ = models
    root, names = music
    out = tmp_path / "feats"
    for i in range(3):
        rc, _ = _run([str(root), "--model", hf, "--output-dir", str(out), "--shard", f"{i}/3", "--layers", "last"])
        assert rc == 0
    shards = [[json.loads(l)["output"] for l in open(out / f"manifest.shard{i}of3.jsonl")] for i in range(3)]
    assert sorted(o for s in shards for o in s) == sorted(_npy(n) for n in names)  # each file on exactly one shard
    assert [len(s) for s in shards] == [2, 2, 1]  # 5 files over 3 shards: balanced, not as a hash falls
    # Sorted output names dealt round-robin: a, album/b, album/cd1/c, album/cd1/d, e.
    assert [sorted(s) for s in shards] == [["a.npy", "album/cd1/d.npy"], ["album/b.npy", "e.npy"],
                                           ["album/cd1/c.npy"]]


def test_deal_shards_balances_counts_whatever_the_order():
    names = ["c.npy", "a.npy", "b.npy"]
    owner = cli.deal_shards(names, 2)
    assert owner == {"a.npy": 0, "b.npy": 1, "c.npy": 0}  # 3 inputs over 2 processes: 2 + 1, none idle
    assert cli.deal_shards(reversed(names), 2) == owner  # the order of the arguments does not matter
    many = cli.deal_shards([f"t{i:03d}.npy" for i in range(101)] + [None, "t000.npy"], 4)  # None: a missing input
    counts = [list(many.values()).count(k) for k in range(4)]
    assert sorted(counts) == [25, 25, 25, 26] and len(many) == 101
    assert cli.deal_shards(["x.npy"], 3) == {"x.npy": 0}


def test_rerun_after_adding_files_moves_shards_but_recomputes_and_repeats_nothing(models, music, tmp_path, capsys):
    """Adding an input shifts the round-robin deal: a finished output may now belong to the other shard,
    which skips it and does not record it a second time."""
    hf, _, _ = models
    root, _ = music
    lib, out = tmp_path / "lib", tmp_path / "feats"
    lib.mkdir()
    for name in ("a.wav", "e.wav"):
        shutil.copy(root / name, lib / name)

    def both_shards():
        errs = []
        for i in range(2):
            rc, err = _run([str(lib), "--model", hf, "--output-dir", str(out), "--shard", f"{i}/2", "--layers",
                            "last"], capsys)
            assert rc == 0, err
            errs.append(err)
        return errs

    errs = both_shards()  # a -> 0, e -> 1
    assert "1 written, 0 already done" in errs[0] and "1 written, 0 already done" in errs[1]
    before = _snapshot(out)
    shutil.copy(root / "album" / "b.flac", lib / "b.flac")  # now a, b, e: a -> 0, b -> 1, e -> 0
    errs = both_shards()
    assert "shard 0/2: 0 written, 2 already done" in errs[0]  # e moved to shard 0: skipped, not recomputed
    assert "shard 1/2: 1 written, 0 already done" in errs[1]  # 2 + 1: the new file went to the lighter shard
    after = _snapshot(out)
    assert all(after[k] == v for k, v in before.items()) and sorted(after) == ["a.npy", "b.npy", "e.npy"]
    records = [json.loads(l) for i in range(2) for l in open(out / f"manifest.shard{i}of2.jsonl")]
    assert sorted(r["output"] for r in records) == ["a.npy", "b.npy", "e.npy"]  # each recorded once
    assert all(r["status"] == "ok" for r in records)


def test_rerun_with_other_settings_is_refused_unless_overwrite(models, music, tmp_path, capsys):
    hf, _, _ = models
    root, _ = music
    out = tmp_path / "feats"
    args = [str(root / "a.wav"), "--model", hf, "--output-dir", str(out)]
    assert _run(args + ["--layers", "last"])[0] == 0
    before = _snapshot(out)
    rc, err = _run(args + ["--layers", "0"], capsys)
    assert rc == cli.EXIT_USAGE and "other settings" in err and "layers" in err
    assert _snapshot(out) == before
    rc, _ = _run(args + ["--layers", "0", "--overwrite"])
    assert rc == 0 and _snapshot(out) != before


def test_clashing_names_keep_their_extensions(models, tmp_path):
    hf, _, _ = models
    for ext in ("wav", "flac"):
        sf.write(tmp_path / f"song.{ext}", _tone(1.0, 24000), 24000)
    out = tmp_path / "feats"
    rc, _ = _run([str(tmp_path / "song.wav"), str(tmp_path / "song.flac"), "--model", hf, "--output-dir", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.npy")) == ["song.flac.npy", "song.wav.npy"]


@pytest.mark.parametrize("argv, message", [
    (["--shard", "3/3"], "0 <= i < n"),
    (["--shard", "x"], "i/n"),
    (["--layers", "9"], "out of range"),
    (["--layers", "a,b"], "--layers must be"),
    (["--backend", "onnx"], "needs --model FILE.onnx"),
    (["--overlap-seconds", "30"], "shorter than the 30 s window"),
    (["--device", "tpu"], "--device must be"),
    (["--precision", "fp16", "--device", "cpu"], "needs a GPU"),
    (["--batch-seconds", "0"], "must be positive"),
])
def test_bad_arguments_are_one_line_errors(models, music, tmp_path, capsys, argv, message):
    hf, _, _ = models
    rc, err = _run([str(music[0]), "--model", hf, "--output-dir", str(tmp_path / "o")] + argv, capsys)
    assert rc == cli.EXIT_USAGE
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err


def test_unloadable_model_is_a_one_line_error(music, tmp_path, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    rc, err = _run([str(music[0]), "--model", str(tmp_path / "junk.onnx"), "--output-dir", str(tmp_path / "o")],
                   capsys)
    assert rc == cli.EXIT_USAGE and "cannot load the ONNX model" in err and "Traceback" not in err
    rc, err = _run([str(music[0]), "--model", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "o")],
                   capsys)
    assert rc == cli.EXIT_USAGE and "error: " in err and "Traceback" not in err


def test_output_path_blocked_by_a_folder_fails_that_input_only(models, tmp_path, capsys):
    hf, _, _ = models
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, _tone(1.0, 24000), 24000)
    out = tmp_path / "feats"
    (out / "a.npy").mkdir(parents=True)  # something in the way of a.npy
    rc, err = _run([str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "--model", hf, "--output-dir", str(out)],
                   capsys)
    assert rc == cli.EXIT_FAILED and "cannot write" in err and "Traceback" not in err
    assert (out / "b.npy").is_file() and (out / "a.npy").is_dir()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
