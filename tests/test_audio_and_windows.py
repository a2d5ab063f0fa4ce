"""Audio input validation and long-audio windowing of the core package."""
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from mert_plugin import AudioError, MERTError, MERTModel, extract_features, load_audio, plan_windows
from mert_plugin.audio import find_audio_files, prepare_waveform
from mert_plugin.extract import iter_windows


def _tone(freq, sr, seconds, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else x


def _peak_hz(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


@pytest.mark.parametrize("fmt,sub", [("wav", "PCM_16"), ("flac", "PCM_24"), ("ogg", "VORBIS"), ("mp3", "MPEG_LAYER_III")])
def test_formats_resample_and_mixdown(tmp_path, fmt, sub):
    path = tmp_path / f"tone.{fmt}"
    sf.write(path, _tone(1000.0, 44100, 1.0, channels=2), 44100, subtype=sub)
    wav = load_audio(str(path), 24000)
    assert wav.dtype == torch.float32 and wav.dim() == 1
    assert abs(wav.numel() - 24000) < 2400  # mp3/ogg codecs add a little padding
    assert abs(_peak_hz(wav.numpy(), 24000) - 1000.0) < 5.0
    # Stereo channels of amplitude 0.25 and 0.5 mix down to 0.375 (mean), not a sum.
    assert 0.3 < np.abs(wav.numpy()[2000:-2000]).max() < 0.45


def test_many_channels_silence_and_odd_rates_are_valid(tmp_path):
    p = tmp_path / "six.wav"
    sf.write(p, np.zeros((7919, 6), np.float32), 7919)  # a prime sample rate, 1 s, silence
    wav = load_audio(str(p), 24000)
    assert wav.numel() == 24000 and float(wav.abs().max()) == 0.0


def test_bad_inputs_name_the_file_and_reason(tmp_path):
    cases = {}
    (tmp_path / "empty.wav").write_bytes(b"")
    cases["empty.wav"] = "empty file"
    sf.write(tmp_path / "header_only.wav", np.zeros((0,), np.float32), 24000)
    cases["header_only.wav"] = "no samples|cannot decode"
    (tmp_path / "random.flac").write_bytes(os.urandom(4096))
    cases["random.flac"] = "cannot decode"
    full = tmp_path / "full.wav"
    sf.write(full, _tone(440, 24000, 1.0), 24000)
    (tmp_path / "truncated.mp3").write_bytes(b"ID3" + os.urandom(200))
    cases["truncated.mp3"] = "cannot decode|no samples"
    nan = _tone(440, 24000, 0.5)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 24000, subtype="FLOAT")
    cases["nan.wav"] = "NaN or infinite"
    sf.write(tmp_path / "short.wav", np.zeros(300, np.float32), 24000)
    cases["short.wav"] = "too short: 300 samples"
    (tmp_path / "folder.wav").mkdir()
    cases["folder.wav"] = "is a folder"
    cases["missing.wav"] = "no such file"
    for name, reason in cases.items():
        with pytest.raises(AudioError, match=reason) as exc:
            load_audio(str(tmp_path / name), 24000)
        assert name in str(exc.value)


def test_prepare_waveform_rejects_wrong_shapes():
    with pytest.raises(AudioError, match="1-D mono signal"):
        prepare_waveform(np.zeros((2, 3, 1000), np.float32), 24000, 24000)
    with pytest.raises(AudioError, match="numeric"):
        prepare_waveform(np.array(["a", "b"]), 24000, 24000)
    with pytest.raises(AudioError, match="sample rate"):
        prepare_waveform(np.zeros(1000, np.float32), 0, 24000)
    pcm = (np.ones(1000) * 16384).astype(np.int16)
    assert abs(prepare_waveform(pcm, 24000, 24000)[0].item() - 0.5) < 1e-3


def test_model_rejects_wrong_shapes_clearly():
    model = MERTModel.from_preset("mert-tiny", seed=0).eval()
    with pytest.raises(MERTError, match=r"\[batch, samples\]"):
        model(torch.zeros(1, 2, 1000))
    with pytest.raises(MERTError, match="at least 400"):
        model(torch.zeros(1, 399))
    with pytest.raises(MERTError, match="floating point"):
        model(torch.zeros(1, 1000, dtype=torch.long))
    with pytest.raises(MERTError, match="padding_mask must match"):
        model(torch.zeros(2, 1000), padding_mask=torch.zeros(2, 999, dtype=torch.bool))


def test_find_audio_files_mirrors_structure(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for p in ("a/x.wav", "a/b/y.flac", "a/notes.txt"):
        (tmp_path / p).write_bytes(b"0")
    found = find_audio_files([str(tmp_path / "a"), str(tmp_path / "a" / "x.wav"), str(tmp_path / "nope.wav")])
    rels = [r for _, r in found]
    # Folder walk (txt skipped), explicit duplicate dropped, missing input kept for reporting.
    assert sorted(rels[:2]) == ["b/y.flac", "x.wav"] and rels[2:] == [None]


@pytest.mark.parametrize("how", ["chmod", "scandir"])
def test_find_audio_files_reports_unreadable_folders(tmp_path, monkeypatch, caplog, how):
    import errno
    import logging

    # the recipe folder stands alone (SpeechBrain-style): its modules import from that folder
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                             "speechbrain_recipes", "MERT"))
    from prepare_music import scan_folder

    locked = tmp_path / "a" / "locked"
    locked.mkdir(parents=True)
    sf.write(str(tmp_path / "a" / "x.wav"), np.zeros(24000, np.float32), 24000)
    sf.write(str(locked / "y.wav"), np.zeros(24000, np.float32), 24000)
    if how == "chmod":
        os.chmod(locked, 0)
        if os.access(locked, os.R_OK):  # root (CAP_DAC_OVERRIDE): permission bits do not stop reads
            os.chmod(locked, 0o755)
            pytest.skip("this user reads folders whatever their permission bits (root)")
    else:  # as the walk sees an unreadable folder, for any user
        real = os.scandir

        def scandir(path="."):
            if os.fspath(path) == str(locked):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        unreadable = []
        found = find_audio_files([str(tmp_path / "a")], unreadable=unreadable)
        assert [rel for _, rel in found] == ["x.wav"]
        assert unreadable == [(str(locked), "Permission denied")]
        # Without a list to fill: a warning naming the folder.
        with caplog.at_level(logging.WARNING, logger="mert_plugin.audio"):
            assert [rel for _, rel in find_audio_files([str(tmp_path / "a")])] == ["x.wav"]
        assert f"cannot read folder {locked} (Permission denied)" in caplog.text
        # The recipe's data preparation lists it with the skipped files (skipped.txt).
        rows, skipped = scan_folder(str(tmp_path / "a"), min_duration=0.5, progress=False)
        assert [r[0] for r in rows] == ["x.wav"]
        assert skipped == [(str(locked), "cannot read folder (Permission denied)")]
    finally:
        os.chmod(locked, 0o755)


@pytest.mark.parametrize("n", [120000 + 320, 300000, 24000 * 17 + 123, 24000 * 61])
@pytest.mark.parametrize("overlap", [24000, 0, 80])  # 0 and < 1 hop: a window steps past its last frame
def test_window_plan_tiles_every_frame_once(n, overlap):
    plan = plan_windows(n, window=120000, overlap=overlap)
    total = (n - 400) // 320 + 1
    assert plan[0].keep_start == 0 and plan[-1].keep_end == total
    for prev, cur in zip(plan, plan[1:]):
        assert prev.keep_end == cur.keep_start
        assert cur.sample_start % 320 == 0 and cur.sample_start == cur.frame_offset * 320
    for w in plan:
        frames_in_window = (w.sample_end - w.sample_start - 400) // 320 + 1
        assert w.frame_offset <= w.keep_start < w.keep_end <= w.frame_offset + frames_in_window
        assert w.sample_end - w.sample_start >= 120000 - 320
    # Away from the ends, each kept frame has >= 0.5 s (37 frames) of context on both sides.
    for w in plan[1:-1] if overlap == 24000 else []:
        frames_in_window = (w.sample_end - w.sample_start - 400) // 320 + 1
        assert w.keep_start - w.frame_offset >= 37 and w.frame_offset + frames_in_window - w.keep_end >= 37


def test_windowed_extraction_matches_direct_windows():
    """Each stitched frame equals the model's output for the window it was taken from."""
    model = MERTModel.from_preset("mert-tiny", seed=0).eval()
    wav = torch.randn(24000 * 11 + 500)
    feats = extract_features(model, wav, window_seconds=4.0, overlap_seconds=1.0)
    assert feats.shape == (5, model.num_frames(wav.numel()), 128)
    plan = plan_windows(wav.numel(), 96000, 24000)
    with torch.no_grad():
        for w in plan:
            direct = torch.stack(model(wav[w.sample_start:w.sample_end][None]).hidden_states)[:, 0]
            sl = slice(w.keep_start - w.frame_offset, w.keep_end - w.frame_offset)
            assert torch.allclose(feats[:, w.keep_start:w.keep_end], direct[:, sl], atol=1e-5)
    # Short input: one pass, identical to calling the model.
    short = torch.randn(30000)
    with torch.no_grad():
        assert torch.equal(extract_features(model, short)[:, :], torch.stack(model(short[None]).hidden_states)[:, 0])
    mean = extract_features(model, wav, layers=[-1], pooling="mean", window_seconds=4.0)
    assert torch.allclose(mean[0], feats[-1].mean(0), atol=1e-5)


def test_iter_windows_memory_is_bounded_by_window():
    model = MERTModel.from_preset("mert-tiny", seed=0).eval()
    wav = torch.randn(24000 * 30)
    sizes = [s.shape[1] for _, _, s in iter_windows(model, wav, window_seconds=2.0, overlap_seconds=0.5,
                                                    layers=[2], batch_size=2)]
    assert max(sizes) <= model.num_frames(48000) and sum(sizes) == model.num_frames(wav.numel())
    with pytest.raises(MERTError, match="out of range"):
        next(iter_windows(model, wav, layers=[9]))
