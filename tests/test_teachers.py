"""Teachers: EnCodec codes (official loading, fitted demo mode), nnAudio CQT, MFCC k-means."""
import functools
import math
import os
import pickle

import numpy as np
import pytest
import torch

from mert_plugin import MERTConfig
from mert_plugin.errors import CheckpointError, MERTError
from mert_plugin.teachers import (ENCODEC_CHECKPOINT, CQTKMeansTeacher, CQTTeacher, LabelGenerator, MFCCKMeansTeacher,
                                  MFCCTarget, shape_spectrum,
                                  build_encodec_24khz)


def synth_music(seconds: float, seed: int, sr: int = 24000) -> torch.Tensor:
    """Notes of random pitch/length with 3 harmonics and decays, some noisy: [N] float32."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    out = np.zeros(n, np.float32)
    t = 0
    while t < n:
        dur = int(rng.uniform(0.08, 0.4) * sr)
        f0 = 55 * 2 ** (rng.integers(0, 60) / 12)
        tt = np.arange(min(dur, n - t)) / sr
        env = np.exp(-tt * rng.uniform(2, 10)) * rng.uniform(0.05, 0.5)
        note = sum(np.sin(2 * np.pi * f0 * h * tt) / h for h in (1, 2, 3)) * env
        if rng.random() < 0.2:
            note = note + rng.standard_normal(len(tt)) * 0.1 * env
        out[t: t + len(tt)] += note
        t += dur
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=None)
def shared_fitted_generator() -> LabelGenerator:
    """A 'fitted' teacher (random seeded EnCodec encoder, k-means codebooks) + CQT, built once per
    session and shared by the test modules that import the fixture below."""
    gen = LabelGenerator.from_spec("fitted", use_cqt=True, seed=0)
    gen.fit([synth_music(4.0, 1), synth_music(4.0, 2)], iters=10)
    return gen


@pytest.fixture
def fitted_generator():
    return shared_fitted_generator()


@pytest.fixture(scope="session")
def fitted_state(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "fitted.safetensors")
    shared_fitted_generator().save_state(path)
    return path


def student_frames(n):
    return MERTConfig.from_preset("mert-v1-95m").num_frames(n)


# ---------------------------------------------------------------- EnCodec
def test_random_encodec_codes_are_all_zero_but_fitted_codes_are_diverse(fitted_generator):
    # The trap the fitted mode exists for: an untrained EnCodec has all-zero codebooks.
    wav = synth_music(2.0, 5)[None]
    random_model = build_encodec_24khz(pretrained=False)
    codes = random_model.encode(wav[:, None])[0][0]
    assert codes.shape == (1, 8, 150) and int(codes.abs().max()) == 0
    fitted, _ = fitted_generator(wav)
    for k in range(8):
        assert fitted[0, k].unique().numel() >= 10, f"codebook {k} is not diverse"


@pytest.mark.parametrize("n", [24000, 24079, 24080, 72007])
def test_codes_shape_and_frame_alignment(fitted_generator, n):
    wav = synth_music(3.1, 7)[None]
    codes, cqt = fitted_generator(wav[:, :n])
    t = student_frames(n)
    assert codes.shape == (1, 8, t) and codes.dtype == torch.long
    assert cqt.shape == (1, t, 336) and cqt.dtype == torch.float32
    # EnCodec is causal: a clip's codes are the first T codes of any longer clip it starts,
    # so the kept frames are the leading ones (the 1-2 extra tail frames were dropped).
    # (Up to float rounding: conv kernels differ with the input length and can flip a near-tie.)
    full, _ = fitted_generator(wav)
    assert float((codes == full[:, :, :t]).float().mean()) > 0.98


def test_very_short_clips_give_one_label_per_student_frame(fitted_generator):
    for n in (400, 719, 720, 1040):
        codes, cqt = fitted_generator(torch.randn(1, n) * 0.1)
        assert codes.shape[-1] == cqt.shape[1] == student_frames(n)
    with pytest.raises(MERTError, match="shorter than one frame"):
        fitted_generator(torch.zeros(1, 399))


def test_bad_arrays_get_clear_errors(fitted_generator):
    for bad, reason in [(torch.zeros(2, 1, 24000), r"\[B, N\]"), (torch.zeros(1, 24000, dtype=torch.int16), "float"),
                        (np.zeros(24000, np.float32), "torch.Tensor"),
                        (torch.full((1, 24000), float("nan")), "NaN")]:
        with pytest.raises(MERTError, match=reason):
            fitted_generator(bad)


def test_codes_onset_lands_in_the_right_frame(fitted_generator):
    start = 320 * 100 + 17
    silence = torch.zeros(1, 48000)
    onset = silence.clone()
    onset[0, start:] = 2 * synth_music(2.0, 3)[: 48000 - start]
    c0, _ = fitted_generator(silence)
    c1, _ = fitted_generator(onset)
    changed = (c0 != c1).any(1)[0].nonzero()[:, 0]
    assert int(changed[0]) == start // 320  # frame 100 covers samples [32000, 32400)


def test_labels_do_not_depend_on_right_padding(fitted_generator):
    clip = synth_music(1.3, 4)
    batch = torch.zeros(2, 48000)
    batch[0, : clip.numel()] = clip
    batch[1] = synth_music(2.0, 8)
    codes_b, cqt_b = fitted_generator(batch)
    codes_1, cqt_1 = fitted_generator(clip[None])
    t = codes_1.shape[-1]
    assert float((codes_b[0, :, :t] == codes_1[0]).float().mean()) > 0.98  # float rounding may flip a near-tie
    torch.testing.assert_close(cqt_b[0, :t], cqt_1[0], rtol=1e-5, atol=1e-6)


def test_encodec_teacher_uses_encodec_own_encode(fitted_generator):
    wav = synth_music(1.0, 9)[None]
    ours = fitted_generator.acoustic(wav)
    theirs = fitted_generator.acoustic.model.encode(wav[:, None])[0][0]
    assert torch.equal(ours, theirs)


def test_fitted_teacher_refuses_to_label_before_fit():
    gen = LabelGenerator.from_spec("fitted", use_cqt=False)
    assert not gen.ready
    with pytest.raises(MERTError, match="fit"):
        gen(torch.zeros(1, 24000))


def test_fitted_state_round_trip(fitted_generator, fitted_state, tmp_path):
    wav = synth_music(1.5, 11)[None]
    again = LabelGenerator.from_spec("fitted", use_cqt=False, teacher_state=fitted_state)
    assert again.ready
    assert torch.equal(again(wav)[0], fitted_generator(wav)[0])
    assert again.describe()["teacher_state_sha256"] == fitted_generator.describe()["teacher_state_sha256"]
    mfcc = LabelGenerator.from_spec("mfcc-kmeans", use_cqt=False)
    with pytest.raises(CheckpointError, match="'fitted' teacher state"):
        mfcc.load_state(fitted_state)
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="bogus.safetensors"):
        again.load_state(str(bogus))


def test_official_checkpoint_missing_names_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(CheckpointError) as err:
        LabelGenerator.from_spec("encodec")
    msg = str(err.value)
    assert ENCODEC_CHECKPOINT in msg and os.path.join(str(tmp_path / "torch_home"), "hub", "checkpoints") in msg
    with pytest.raises(CheckpointError, match="not found"):
        LabelGenerator.from_spec("encodec", encodec_checkpoint=str(tmp_path / "nowhere.th"))


def test_official_checkpoint_loads_from_path_and_hub_cache(fitted_generator, tmp_path, monkeypatch):
    # Stand-in weights (the real file cannot be downloaded here): the fitted model's state dict.
    state = fitted_generator.acoustic.model.state_dict()
    path = tmp_path / "my_encodec_24khz.th"
    torch.save(state, path)
    wav = synth_music(1.0, 12)[None]
    expected = fitted_generator(wav)[0]
    gen = LabelGenerator.from_spec("encodec", encodec_checkpoint=str(path), use_cqt=False)
    assert torch.equal(gen(wav)[0], expected)
    # Under the official name in encodec's own cache, the SHA-256 prefix of the name is enforced.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / ENCODEC_CHECKPOINT)
    with pytest.raises(CheckpointError, match="checksum"):
        LabelGenerator.from_spec("encodec", use_cqt=False)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["MERT_TEST_MARKER"],))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_is_loaded_without_running_pickled_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MERT_TEST_MARKER", str(marker))
    path = tmp_path / "evil.th"
    with open(path, "wb") as f:
        pickle.dump({"encoder.x": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="evil.th"):
        LabelGenerator.from_spec("encodec", encodec_checkpoint=str(path), use_cqt=False)
    assert not marker.exists()


# -------------------------------------------------------------------- CQT
@pytest.fixture(scope="module")
def cqt_teacher():
    return CQTTeacher(chunk_frames=64)  # small chunks: exercise the chunked path


def test_cqt_equals_nnaudio_reference(cqt_teacher):
    ref = cqt_teacher.reference_module()
    wav = torch.stack([synth_music(1.3, 21), torch.randn(31200) * 0.1])
    ours = cqt_teacher(wav)
    theirs = ref(wav).transpose(1, 2)
    assert ours.shape == theirs.shape == (2, 31200 // 320 + 1, 336)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5


@pytest.mark.parametrize("freq", [55.0, 440.0, 1000.0, 32.7 * 2 ** (301 / 48)])
def test_cqt_pure_tone_peaks_in_right_bin(cqt_teacher, freq):
    sr = 24000
    wav = torch.sin(2 * math.pi * freq * torch.arange(3 * sr, dtype=torch.float64) / sr).float()[None]
    cqt = cqt_teacher(wav)[0]
    middle = cqt[100:125].mean(0)  # frames far from the zero-padded ends
    expected = round(48 * math.log2(freq / 32.7))  # bin k is centred on 32.7 * 2**(k / 48) Hz
    assert int(middle.argmax()) == expected


def test_cqt_onset_lands_in_the_right_frame(cqt_teacher):
    sr, start = 24000, 320 * 60
    wav = torch.zeros(1, 2 * sr)
    tt = torch.arange(2 * sr - start) / sr
    wav[0, start:] = torch.sin(2 * math.pi * 2000.0 * tt)
    energy = cqt_teacher(wav)[0, :, round(48 * math.log2(2000 / 32.7))]
    steady = float(energy[80:100].mean())
    first_half = int((energy > steady / 2).nonzero()[0])
    assert abs(first_half - start // 320) <= 1  # frame t is centred on sample 320 * t


# ---------------------------------------------------------------- MERT-v0
def test_mfcc_kmeans_teacher_labels_one_per_v0_frame(tmp_path):
    gen = LabelGenerator.from_spec("mfcc-kmeans", use_cqt=False, num_clusters=50)
    assert gen.sample_rate == 16000
    train = [synth_music(3.0, s, sr=16000) for s in (31, 32)]
    gen.fit(train, iters=10)
    wav = synth_music(2.0, 33, sr=16000)
    for n in (16000, 16399, 32000):
        codes, cqt = gen(wav[None, :n])
        assert cqt is None
        assert codes.shape == (1, 1, MERTConfig.from_preset("mert-v0").num_frames(n))
    codes = gen(wav[None])[0]
    assert codes.unique().numel() >= 10 and int(codes.max()) < 50
    path = str(tmp_path / "v0.safetensors")
    gen.save_state(path)
    again = LabelGenerator.from_spec("mfcc-kmeans", use_cqt=False, num_clusters=50, teacher_state=path)
    assert torch.equal(again(wav[None])[0], codes)


def test_mfcc_features_are_kaldi_mfcc_with_deltas():
    import torchaudio.compliance.kaldi as kaldi

    wav = synth_music(1.0, 41, sr=16000)
    feats = MFCCKMeansTeacher().features(wav[None])[0]
    mfcc = kaldi.mfcc(wav[None], sample_frequency=16000, use_energy=False, frame_shift=20.0)
    assert feats.shape == (mfcc.shape[0], 39)
    torch.testing.assert_close(feats[:, :13], mfcc)
    # delta at an interior frame: HTK regression over +-2 frames
    t = 10
    delta = sum(k * (mfcc[t + k] - mfcc[t - k]) for k in (1, 2)) / 10
    torch.testing.assert_close(feats[t, 13:26], delta, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ cqt-kmeans
def _held_note(midi: int, seconds: float = 1.0, sr: int = 24000) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    return sum(torch.sin(2 * math.pi * f0 * h * t) / h for h in (1, 2, 3)).float() * 0.3


def test_cqt_kmeans_codes_are_stable_in_a_note_level_free_and_name_the_pitch(tmp_path):
    notes = {m: _held_note(m, 3.0) for m in (48, 55, 60, 67, 72)}
    gen = LabelGenerator.from_spec("cqt-kmeans", use_cqt=True, num_clusters=8, num_codebooks=2, seed=0)
    gen.fit([synth_music(4.0, 1), *notes.values()], iters=10)
    assert gen.acoustic.cqt is gen.cqt  # one CQT module for the target and the codes
    majority = {}
    for m, wav in notes.items():
        codes, cqt = gen(wav[None])
        assert codes.shape == (1, 2, student_frames(wav.numel())) and cqt.shape[1] == codes.shape[2]
        inner = codes[0, 0, 75:-75]  # the middle second: the low bins' kernels reach ~1.4 s past the edges
        values, counts = inner.unique(return_counts=True)
        assert float(counts.max()) / inner.numel() > 0.9  # one code while the note is held
        majority[m] = int(values[counts.argmax()])
        quiet, _ = gen(0.01 * wav[None])  # -40 dB: the same spectrum, so the same codes
        assert float((quiet[0, 0, 75:-75] == inner).float().mean()) > 0.95
        torch.testing.assert_close(gen.acoustic(wav[None])[:, :, : codes.shape[2]], codes)  # same codes alone
    assert len(set(majority.values())) >= 4  # five pitches, (at least) four different codes
    state = str(tmp_path / "cqtkm.safetensors")
    gen.save_state(state)
    again = LabelGenerator.from_spec("cqt-kmeans", use_cqt=False, teacher_state=state, num_clusters=8, num_codebooks=2)
    assert torch.equal(again(notes[60][None])[0], gen(notes[60][None])[0])
    with pytest.raises(CheckpointError, match="centroids"):
        LabelGenerator.from_spec("cqt-kmeans", use_cqt=False, teacher_state=state, num_clusters=16)
    with pytest.raises(MERTError, match="too few"):
        CQTKMeansTeacher(num_clusters=64).fit([_held_note(60, 0.2)])


def _bright_note(midi: int, seconds: float = 3.0, sr: int = 24000) -> torch.Tensor:
    """The same pitch as _held_note with another timbre: 8 equal harmonics, odd ones louder."""
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    return sum(torch.sin(2 * math.pi * f0 * h * t) * (1.0 if h % 2 else 0.5) for h in range(1, 9)).float() * 0.1


def test_cqt_kmeans_linear_spectrum_codes_name_the_pitch_across_timbres(tmp_path):
    pitches = (48, 55, 60, 67, 72)
    notes = [(m, f(m, 3.0)) for m in pitches for f in (_held_note, _bright_note)]
    gen = LabelGenerator.from_spec("cqt-kmeans", use_cqt=False, num_clusters=5, seed=0, cqt_spectrum="linear")
    assert gen.acoustic.spectrum == "linear"
    gen.fit([w for _, w in notes], iters=20)
    majority = {}
    for m, wav in notes:
        inner = gen(wav[None])[0][0, 0, 75:-75]
        values, counts = inner.unique(return_counts=True)
        majority.setdefault(m, []).append(int(values[counts.argmax()]))
    assert sum(a == b for a, b in majority.values()) >= 4  # both timbres of a pitch share its code
    assert len({v[0] for v in majority.values()}) >= 4  # and the pitches differ
    cqt = gen.acoustic.cqt(notes[0][1][None])
    feats = gen.acoustic.features_from_cqt(cqt)
    torch.testing.assert_close(feats, shape_spectrum(cqt).view(1, -1, 84, 4).mean(-1))
    state = str(tmp_path / "linear.safetensors")
    gen.save_state(state)
    again = LabelGenerator.from_spec("cqt-kmeans", use_cqt=False, teacher_state=state, num_clusters=5,
                                     cqt_spectrum="linear")
    assert torch.equal(again(notes[3][1][None])[0], gen(notes[3][1][None])[0])
    with pytest.raises(CheckpointError, match="'linear' spectrum"):  # a dB teacher must not read linear centroids
        LabelGenerator.from_spec("cqt-kmeans", use_cqt=False, teacher_state=state, num_clusters=5)
    with pytest.raises(MERTError, match="spectrum"):
        CQTKMeansTeacher(spectrum="log")


def test_mfcc_target_is_torchaudio_mfcc_level_free_on_the_cqt_grid(cqt_teacher):
    import mert_plugin.compat

    mert_plugin.compat.ensure_torchaudio_importable()
    import torchaudio

    target = MFCCTarget()
    music = synth_music(3.0, 5)
    quiet = torch.cat([synth_music(1.0, 6), torch.randn(24000) * 1e-6, synth_music(1.0, 7)])  # a silent second
    out = target(torch.stack([music, quiet]))
    assert out.shape == (2, cqt_teacher(music[None]).shape[1], 19) == (2, target.num_frames(72000), 19)
    reference = torchaudio.transforms.MFCC(24000, n_mfcc=20, log_mels=False, melkwargs=dict(
        n_fft=1024, hop_length=320, n_mels=64, center=True))
    for clip, got in zip((music, quiet), out):  # each clip on its own: the 80 dB floor is per clip
        expected = reference(clip[None])[0].T[:, 1:]
        audible = got.abs().sum(-1) > 0
        torch.testing.assert_close(got[audible], expected[audible], rtol=1e-4, atol=1e-3)
    silent = out[1, 80:145]  # frames wholly inside the near-silent second (75..150, less the window's reach)
    assert float(silent.abs().max()) < 1e-3 and bool((out[1, :70].abs().amax(-1) > 0.1).all())
    for gain in (0.05, 10.0):  # c0 (the level) is left out: the same target at any gain
        torch.testing.assert_close(target(music[None] * gain)[0], out[0], rtol=1e-3, atol=2e-3)
    # a crop at a multiple of the hop sees the same frames, away from its edges (with a noise floor
    # above the 80 dB floor, which is set by each crop's own loudest band)
    noisy = music + torch.randn(music.shape, generator=torch.Generator().manual_seed(0)) * 0.01
    start, n = 40, 48000
    full, crop = target(noisy[None])[0], target(noisy[start * 320: start * 320 + n][None])[0]
    torch.testing.assert_close(crop[3:-3], full[start + 3: start + target.num_frames(n) - 3], rtol=1e-4, atol=1e-3)
