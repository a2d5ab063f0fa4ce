"""Offline labels: equality with online labels, resume, sharding, bad inputs, SIGKILL, torchrun."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from mert_plugin import MERTConfig, load_audio
from mert_plugin.errors import MERTError
from mert_plugin.labels import (META_FILE, generate_labels, label_paths, parse_shard, shard_from_env)
from mert_plugin.teachers import LabelGenerator
from test_teachers import fitted_generator, fitted_state, synth_music  # noqa: F401  (fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(folder, count, seconds=1.0, seed=0):
    os.makedirs(folder, exist_ok=True)
    names = []
    for i in range(count):
        name = f"clip{i:02d}.wav"
        sf.write(os.path.join(folder, name), synth_music(seconds + 0.05 * (i % 3), seed + i).numpy(), 24000)
        names.append(name)
    return names


def outputs(folder):
    """{relative path: (inode, mtime_ns)} of the finished label files under ``folder``."""
    found = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".npy"):
                st = os.stat(os.path.join(root, f))
                found[os.path.relpath(os.path.join(root, f), folder)] = (st.st_ino, st.st_mtime_ns)
    return found


def cli(*args, env=None, **kw):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "mert_plugin.labels", *args, "--threads", "1", "--quiet"],
                            cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# ---------------------------------------------------------------- library
def test_offline_labels_equal_online_labels(fitted_generator, tmp_path):
    names = write_corpus(tmp_path / "audio", 3)
    sf.write(tmp_path / "audio" / "at44k.wav", synth_music(1.2, 50, sr=44100).numpy(), 44100)
    summary = generate_labels([str(tmp_path / "audio")], str(tmp_path / "labels"), fitted_generator, progress=False)
    assert summary.ok and summary.done == 4
    for name in names + ["at44k.wav"]:
        wav = load_audio(str(tmp_path / "audio" / name), 24000)
        codes, cqt = fitted_generator(wav[None])
        codes_path, cqt_path = label_paths(str(tmp_path / "labels"), name)
        off_codes, off_cqt = np.load(codes_path), np.load(cqt_path)
        assert off_codes.dtype == np.int16 and off_cqt.dtype == np.float16
        t = MERTConfig().num_frames(wav.numel())
        assert off_codes.shape == (8, t) and off_cqt.shape == (t, 336)
        assert np.array_equal(off_codes, codes[0].numpy())
        np.testing.assert_allclose(off_cqt.astype(np.float32), cqt[0].numpy(), rtol=1e-3, atol=1e-3)
        # The recipe's crop: audio from sample 320 * k, labels from frame k, as many as the student makes.
        k, n = 7, 16000
        assert off_codes[:, k: k + MERTConfig().num_frames(n)].shape[1] == MERTConfig().num_frames(n)


def test_rerun_skips_finished_files_without_rewriting(fitted_generator, tmp_path):
    write_corpus(tmp_path / "audio", 3)
    out = str(tmp_path / "labels")
    generate_labels([str(tmp_path / "audio")], out, fitted_generator, progress=False)
    before = outputs(out)
    os.remove(label_paths(out, "clip01.wav")[1])  # an unfinished file: its CQT is missing
    summary = generate_labels([str(tmp_path / "audio")], out, fitted_generator, progress=False)
    assert (summary.done, summary.skipped) == (1, 2)
    after = outputs(out)
    assert after.keys() == before.keys()
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"clip01.cqt.npy"}  # the codes of clip01 were finished and stay untouched


def test_bad_inputs_are_reported_by_name_and_the_batch_goes_on(fitted_generator, tmp_path):
    audio = tmp_path / "audio"
    good = write_corpus(audio, 2)
    (audio / "empty.wav").write_bytes(b"")
    (audio / "header_only.wav").write_bytes(open(audio / good[0], "rb").read()[:44])
    (audio / "random.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    truncated = open(audio / good[1], "rb").read()
    (audio / "truncated.flac").write_bytes(truncated[:100])
    (audio / "folder.wav").mkdir()
    sf.write(audio / "short.wav", np.zeros(300, np.float32), 24000)
    nan = synth_music(0.5, 3).numpy()
    nan[100] = np.nan
    sf.write(audio / "nan.wav", nan, 24000, subtype="FLOAT")
    # Valid but unusual: silence, many channels, odd sample rates.
    sf.write(audio / "silence.wav", np.zeros(24000, np.float32), 24000)
    sf.write(audio / "six_channels.wav", np.random.default_rng(1).standard_normal((12000, 6)).astype(np.float32) * 0.1,
             12000)
    sf.write(audio / "rate_7350.wav", synth_music(1.0, 4, sr=7350).numpy(), 7350)
    out = str(tmp_path / "labels")
    missing = str(tmp_path / "does_not_exist.wav")
    summary = generate_labels([str(audio), missing], out, fitted_generator, progress=False)
    failed = {os.path.basename(path) for path, _ in summary.failed}
    assert failed == {"empty.wav", "header_only.wav", "random.wav", "truncated.flac", "short.wav", "nan.wav",
                      "does_not_exist.wav"}
    # folder.wav is a folder inside a folder walk: not an input at all
    assert summary.done == 5
    for path, reason in summary.failed:
        assert reason.startswith(path)
    written = {os.path.basename(k).split(".")[0] for k in outputs(out)}
    assert written == {"clip00", "clip01", "silence", "six_channels", "rate_7350"}
    # Too long for the memory budget: reported, not attempted.
    summary = generate_labels([str(audio / "clip00.wav")], str(tmp_path / "capped"), fitted_generator,
                              progress=False, max_seconds=0.5)
    assert "longer than the 0.5 s limit" in summary.failed[0][1] and not outputs(str(tmp_path / "capped"))
    # A folder named like audio, given explicitly, is reported too.
    summary = generate_labels([str(audio / "folder.wav")], out, fitted_generator, progress=False)
    assert summary.failed == [(str(audio / "folder.wav"), f"{audio / 'folder.wav'}: folder holds no audio files")]


def test_label_paths_strip_only_audio_extensions():
    assert label_paths("L", "a/b.FLAC") == (os.path.join("L", "a", "b.codes.npy"), os.path.join("L", "a", "b.cqt.npy"))
    assert label_paths("L", "take.2")[0] == os.path.join("L", "take.2.codes.npy")


def test_same_output_name_is_refused_not_overwritten(fitted_generator, tmp_path):
    audio = tmp_path / "audio"
    write_corpus(audio, 1)
    sf.write(audio / "clip00.flac", synth_music(1.0, 9).numpy(), 24000)
    summary = generate_labels([str(audio)], str(tmp_path / "labels"), fitted_generator, progress=False)
    assert summary.done == 1 and len(summary.failed) == 1
    assert "same output name" in summary.failed[0][1]


def test_labels_of_another_teacher_are_not_mixed_in(fitted_generator, tmp_path):
    write_corpus(tmp_path / "audio", 1)
    out = str(tmp_path / "labels")
    generate_labels([str(tmp_path / "audio")], out, fitted_generator, progress=False)
    other = LabelGenerator.from_spec("fitted", seed=1)
    other.fit([synth_music(2.0, 77)], iters=3)
    with pytest.raises(MERTError, match="another teacher"):
        generate_labels([str(tmp_path / "audio")], out, other, progress=False)


def test_shards_partition_the_inputs(fitted_generator, tmp_path, monkeypatch):
    write_corpus(tmp_path / "audio", 5)
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    generate_labels([str(tmp_path / "audio")], whole, fitted_generator, write_cqt=False, progress=False)
    counts = [generate_labels([str(tmp_path / "audio")], parts, fitted_generator, shard=(i, 2), write_cqt=False,
                              progress=False).done for i in range(2)]
    assert counts == [3, 2]
    assert outputs(parts).keys() == outputs(whole).keys()
    for name in outputs(whole):
        assert np.array_equal(np.load(os.path.join(parts, name)), np.load(os.path.join(whole, name)))
    # Dealt in output-name order, whatever the order of the arguments (as mert-extract deals its shards).
    files = [str(tmp_path / "audio" / f"clip{i:02d}.wav") for i in (3, 0, 4, 1, 2)]
    first = str(tmp_path / "first")
    assert generate_labels(files, first, fitted_generator, shard=(0, 2), write_cqt=False, progress=False).done == 3
    assert sorted(outputs(first)) == ["clip00.codes.npy", "clip02.codes.npy", "clip04.codes.npy"]
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert shard_from_env() == (3, 4)
    assert parse_shard("1/8") == (1, 8)
    for bad in ("8/8", "x/2", "1"):
        with pytest.raises(MERTError):
            parse_shard(bad)


# -------------------------------------------------------------------- CLI
@pytest.mark.filterwarnings("ignore")
def test_cli_sigkill_midway_then_rerun_matches_an_uninterrupted_run(fitted_state, tmp_path):
    audio = str(tmp_path / "audio")
    write_corpus(audio, 16, seconds=1.0)
    common = ["--teacher", "fitted", "--teacher-state", fitted_state]
    ref_dir, dir_ = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    ref = cli(audio, "-o", ref_dir, *common)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    victim = cli(audio, "-o", dir_, *common)
    deadline = time.time() + 120
    while len([f for f in outputs(dir_) if f.endswith(".codes.npy")]) < 3 and time.time() < deadline:
        assert victim.poll() is None, victim.stderr.read()
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    finished_before = outputs(dir_)
    assert 0 < len(finished_before) < 32, "the kill should land mid-run"
    for name in finished_before:  # nothing partial: every visible output is complete and correct
        assert np.array_equal(np.load(os.path.join(dir_, name)), np.load(os.path.join(ref_dir, name)))

    rerun = cli(audio, "-o", dir_, *common)
    assert rerun.wait(timeout=300) == 0
    assert "skipped" in rerun.stderr.read()
    after = outputs(dir_)
    assert after.keys() == outputs(ref_dir).keys()
    for name in finished_before:  # finished files were not rewritten
        assert after[name] == finished_before[name]
    for name in after:
        assert np.array_equal(np.load(os.path.join(dir_, name)), np.load(os.path.join(ref_dir, name)))
    leftovers = [f for _, _, files in os.walk(dir_) for f in files if ".tmp" in f]
    assert leftovers == []


def test_cli_exit_codes_and_one_line_errors(fitted_state, tmp_path):
    audio = tmp_path / "audio"
    write_corpus(audio, 1)
    (audio / "broken.wav").write_bytes(b"RIFF\x00\x00")
    proc = cli(str(audio), "-o", str(tmp_path / "out"), "--teacher", "fitted", "--teacher-state", fitted_state,
               "--no-cqt")
    assert proc.wait(timeout=300) == 1
    err = proc.stderr.read()
    assert "broken.wav" in err and "Traceback" not in err and "1 failed" in err
    assert os.path.exists(label_paths(str(tmp_path / "out"), "clip00.wav")[0])
    assert not os.path.exists(label_paths(str(tmp_path / "out"), "clip00.wav")[1])

    proc = cli(str(audio), "-o", str(tmp_path / "out2"), env={"TORCH_HOME": str(tmp_path / "empty_home")})
    assert proc.wait(timeout=300) == 2
    err = proc.stderr.read()
    assert err.startswith("error: EnCodec teacher weights not found") and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out2")


def test_cli_fits_the_demo_teacher_then_runs_under_torchrun(tmp_path):
    audio = str(tmp_path / "audio")
    write_corpus(audio, 5, seconds=1.0)
    state = str(tmp_path / "state.safetensors")
    out = str(tmp_path / "labels")
    # --fit belongs to a single process: under several ranks it is refused.
    refused = cli(audio, "-o", out, "--teacher", "fitted", "--teacher-state", state, "--fit", "--shard", "0/2")
    assert refused.wait(timeout=300) == 2 and "single process" in refused.stderr.read()
    fit = cli(audio, "-o", out, "--teacher", "fitted", "--teacher-state", state, "--fit", "--no-cqt",
              "--fit-max-files", "3")
    assert fit.wait(timeout=300) == 0, fit.stderr.read()
    assert "NOT MERT's EnCodec labels" in fit.stderr.read()
    generated = set(outputs(out))
    for f in generated:
        os.remove(os.path.join(out, f))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mert_plugin.labels", audio, "-o", out, "--teacher", "fitted", "--teacher-state", state,
         "--no-cqt", "--threads", "1"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "shard 0/2: 3 files" in proc.stderr and "shard 1/2: 2 files" in proc.stderr
    assert set(outputs(out)) == generated and len(generated) == 5
    assert os.path.exists(os.path.join(out, META_FILE))
