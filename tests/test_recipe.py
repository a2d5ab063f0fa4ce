"""The SpeechBrain MERT recipe: data preparation, crops, atomic checkpoints, and the
tiny recipe run end to end with SpeechBrain's own Brain (single process and
2-process torchrun/gloo), killed with SIGKILL and resumed.

Audio is synthesised into tmp folders. The end-to-end tests are marked slow
(about 2 minutes together on 2 cores).
"""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "speechbrain_recipes", "MERT")
TRAIN = os.path.join(RECIPE, "train.py")
TINY = os.path.join(RECIPE, "hparams", "mert_tiny.yaml")
SR = 24000
# The recipe folder stands alone as SpeechBrain recipes do: its helpers (data, label_step,
# prepare_music, checkpointing) are top-level modules of that folder, which `python train.py`
# puts on sys.path. The tests import them, and resolve the yamls' class paths, the same way.
if RECIPE not in sys.path:
    sys.path.insert(0, RECIPE)


def _write_corpus(folder, n=24, seconds=(2.0, 3.0), seed=0):
    """Decaying chords plus noise, in sub-folders, one of them at 44.1 kHz stereo."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "a"), exist_ok=True)
    os.makedirs(os.path.join(folder, "b"), exist_ok=True)
    for i in range(n):
        sr = 44100 if i == 0 else SR
        t = np.arange(int(rng.uniform(*seconds) * sr)) / sr
        x = sum(0.2 * np.sin(2 * np.pi * 110 * 2 ** (rng.integers(0, 36) / 12) * t) for _ in range(3))
        x = x * np.exp(-t * rng.uniform(0.2, 2.0)) + 0.02 * rng.standard_normal(t.size)
        if i == 0:
            x = np.stack([x, 0.5 * x], axis=1)
        sf.write(os.path.join(folder, "ab"[i % 2], f"clip{i:02d}.{'flac' if i % 3 == 0 else 'wav'}"),
                 x.astype(np.float32), sr)


def _write_hostile(folder):
    open(os.path.join(folder, "empty.wav"), "wb").close()
    with open(os.path.join(folder, "junk.mp3"), "wb") as f:
        f.write(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    bad = np.zeros(SR * 2, dtype=np.float32)
    bad[10] = np.nan
    sf.write(os.path.join(folder, "nan.wav"), bad, SR, subtype="FLOAT")
    sf.write(os.path.join(folder, "short.wav"), np.zeros(200, dtype=np.float32), SR)
    os.makedirs(os.path.join(folder, "folder.wav"), exist_ok=True)
    return {"empty.wav": "empty file", "junk.mp3": "cannot decode", "nan.wav": "NaN",
            "short.wav": "too short"}


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------ data preparation
def test_prepare_music_split_is_deterministic_and_bad_files_are_listed(tmp_path):
    from prepare_music import main, prepare_music

    data = tmp_path / "data"
    _write_corpus(str(data), n=12)
    bad = _write_hostile(str(data))
    # Same stem, other extension: the labels would clash, so the second in sorted order is refused.
    sf.write(str(data / "b" / "clip01.flac"), 0.1 * np.ones(SR * 2, dtype=np.float32), SR)
    paths = prepare_music(str(data), str(tmp_path / "m1"), valid_fraction=0.25, min_duration=1.0, progress=False)
    train, valid = _read_csv(paths["train"]), _read_csv(paths["valid"])
    ids = sorted(r["ID"] for r in train + valid)
    expected = sorted(os.path.relpath(os.path.join(r, f), data).replace(os.sep, "/")
                      for r, _, fs in os.walk(data) for f in fs if f.startswith("clip"))
    expected.remove("b/clip01.wav")
    assert ids == expected and valid and train
    assert all(r["path"] == f"$data_root/{r['ID']}" for r in train + valid)
    first = next(r for r in train + valid if r["ID"] == "a/clip00.flac")
    assert abs(float(first["duration"]) - sf.info(str(data / "a" / "clip00.flac")).duration) < 1e-3
    with open(paths["skipped"], encoding="utf-8") as f:
        skipped = dict(line.rstrip("\n").split("\t") for line in f)
    for name, reason in bad.items():
        assert reason in skipped[str(data / name)], (name, skipped)
    assert "another extension" in skipped[str(data / "b" / "clip01.wav")]

    # Deterministic, and adding files never moves existing ones between splits.
    sf.write(str(data / "a" / "new.wav"), 0.1 * np.ones(SR * 2, dtype=np.float32), SR)
    again = prepare_music(str(data), str(tmp_path / "m2"), valid_fraction=0.25, min_duration=1.0, progress=False)
    valid2 = {r["ID"] for r in _read_csv(again["valid"])}
    assert {r["ID"] for r in valid} <= valid2 | {"a/new.wav"}
    assert {r["ID"] for r in train} <= {r["ID"] for r in _read_csv(again["train"])}
    # The command line says that files were skipped (exit 2) and fails cleanly on a bad folder.
    assert main([str(data), str(tmp_path / "m3"), "--valid_fraction", "0.25"]) == 2
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "m4")]) == 1


# -------------------------------------------------------------------- crops
def test_crops_are_hop_aligned_and_labels_follow_them(tmp_path):
    from mert_plugin import MERTConfig, load_audio
    from mert_plugin.labels import label_paths
    from data import CropCollate

    config = MERTConfig.from_preset("mert-tiny")
    rng = np.random.default_rng(0)
    items = []
    for i, (seconds, sr) in enumerate([(3.0, SR), (2.2, SR), (2.6, 44100)]):
        path = str(tmp_path / f"f{i}.wav")
        sf.write(path, (0.1 * rng.standard_normal(int(seconds * sr))).astype(np.float32), sr)
        frames = config.num_frames(int(round(seconds * SR)))
        codes_path, cqt_path = label_paths(str(tmp_path / "labels"), f"f{i}.wav")
        os.makedirs(os.path.dirname(codes_path), exist_ok=True)
        # Label value = frame index (+ file offset), so the crop position can be read back.
        np.save(codes_path, np.tile(np.arange(frames, dtype=np.int16) + 100 * i, (8, 1)))
        np.save(cqt_path, np.repeat(np.arange(frames, dtype=np.float16)[:, None], 336, axis=1))
        items.append({"id": f"f{i}.wav", "path": path, "duration": seconds})

    collate = CropCollate(config, 2.0, label_folder=str(tmp_path / "labels"), seed=7)
    seen = set()
    for epoch in range(4):
        collate.epoch = epoch
        batch = collate(items)
        n = batch.wav.shape[1]
        assert n == 48000  # every clip cut to exactly crop_seconds, as the reference's max_sample_size
        assert batch.codes.shape[:2] == (3, 8) and batch.cqt.shape[2] == 336
        assert batch.codes.shape[2] == batch.cqt.shape[1] == config.num_frames(n)
        for i, start in enumerate(batch.starts.tolist()):
            assert start % 320 == 0
            full = load_audio(items[i]["path"], SR)
            assert start + n <= full.numel()
            torch.testing.assert_close(batch.wav[i], full[start:start + n], atol=1e-6, rtol=0)
            assert batch.codes[i, 3, 0] == start // 320 + 100 * i
            assert batch.cqt[i, 0, 0] == start // 320
        seen.add(tuple(batch.starts.tolist()))
        again = collate(items)
        assert torch.equal(again.wav, batch.wav) and torch.equal(again.codes, batch.codes)
    assert len(seen) > 1  # crops change with the epoch


def test_a_batch_is_cut_to_its_shortest_clip_when_that_is_shorter_than_the_crop(tmp_path):
    from mert_plugin import MERTConfig
    from data import CropCollate

    config = MERTConfig.from_preset("mert-tiny")
    items = []
    for i, seconds in enumerate([6.0, 3.3, 4.0]):
        path = str(tmp_path / f"f{i}.wav")
        sf.write(path, np.full(int(seconds * SR), 0.1, np.float32), SR)
        items.append({"id": f"f{i}.wav", "path": path, "duration": seconds})
    collate = CropCollate(config, 5.0, load_codes=False, load_cqt=False)
    lengths = set()
    for epoch in range(5):
        collate.epoch = epoch
        lengths.add((collate(items).wav.shape[1], collate(items[::2]).wav.shape[1], collate(items[:1]).wav.shape[1]))
    # fairseq RawAudioDataset(pad=False): min(shortest clip, max_sample_size), in whole hops; no random length
    assert lengths == {(int(3.3 * SR) // 320 * 320, 4 * SR, 5 * SR)}


# -------------------------------------------------------------- checkpoints
_INTERRUPTED_SAVE = r"""
import os, sys, torch
from speechbrain.utils.checkpoints import Checkpointer, mark_as_loader, mark_as_saver, register_checkpoint_hooks
sys.path.insert(0, sys.argv[3])
from checkpointing import AtomicCheckpointer

@register_checkpoint_hooks
class DiesOnSecondSave:
    calls = 0
    @mark_as_saver
    def save(self, path):
        DiesOnSecondSave.calls += 1
        with open(path, "w") as f:
            f.write("x" * 1000)
        if DiesOnSecondSave.calls == 2:
            os._exit(9)  # killed in the middle of writing the second checkpoint
    @mark_as_loader
    def load(self, path, end_of_epoch):
        pass

cls = AtomicCheckpointer if sys.argv[2] == "atomic" else Checkpointer
model = torch.nn.Linear(3, 3)
ckpt = cls(sys.argv[1], recoverables={"model": model, "zz_marker": DiesOnSecondSave()})
ckpt.save_checkpoint(meta={"n": 1})
with torch.no_grad():
    model.weight.fill_(2.0)
ckpt.save_checkpoint(meta={"n": 2})
"""


@pytest.mark.parametrize("kind", ["atomic", "speechbrain"])
def test_checkpoint_killed_while_written_is_never_resumed(tmp_path, kind):
    from speechbrain.utils.checkpoints import Checkpointer
    from checkpointing import AtomicCheckpointer

    folder = str(tmp_path / "save")
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED_SAVE, folder, kind, RECIPE], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    model = torch.nn.Linear(3, 3)
    cls = AtomicCheckpointer if kind == "atomic" else Checkpointer
    ckpt = cls(folder, recoverables={"model": model})
    chosen = ckpt.recover_if_possible()
    if kind == "atomic":
        assert chosen.meta["n"] == 1 and not torch.all(model.weight == 2.0)
        assert sorted(os.listdir(folder)) == [chosen.path.name]  # the partial write was cleaned up
    else:
        # Why the recipe does not use SpeechBrain's Checkpointer as is: it writes CKPT.yaml first,
        # so the interrupted checkpoint looks complete and is the one it resumes from.
        assert chosen.meta["n"] == 2


def test_half_deleted_or_truncated_checkpoints_are_skipped(tmp_path):
    from checkpointing import AtomicCheckpointer

    model = torch.nn.Linear(4, 4)
    ckpt = AtomicCheckpointer(str(tmp_path), recoverables={"model": model, "other": torch.nn.Linear(2, 2)})
    good = ckpt.save_checkpoint(meta={"n": 1})
    time.sleep(0.01)
    second = ckpt.save_checkpoint(meta={"n": 2})
    os.remove(second.paramfiles["other"])  # as a killed deletion would leave it
    assert ckpt.find_checkpoint().path == good.path
    third = ckpt.save_checkpoint(meta={"n": 3})
    with open(third.paramfiles["model"], "r+b") as f:
        f.truncate(10)
    assert ckpt.find_checkpoint().path == good.path


def test_config_record_refuses_another_geometry(tmp_path):
    from mert_plugin import MERTModel
    from mert_plugin.errors import CheckpointError
    from checkpointing import ConfigRecord

    path = str(tmp_path / "mert_config.ckpt")
    tiny = MERTModel.from_preset("mert-tiny")
    ConfigRecord(tiny).save(path)
    ConfigRecord(tiny).load(path, end_of_epoch=True)
    config = tiny.config.to_dict()
    config["num_hidden_layers"] = 2
    from mert_plugin import MERTConfig

    other = MERTModel(MERTConfig.from_dict(config))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        ConfigRecord(other).load(path, end_of_epoch=True)


def test_rng_state_round_trip(tmp_path):
    from checkpointing import RNGState

    path = str(tmp_path / "rng.ckpt")
    RNGState().save(path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    RNGState().load(path, end_of_epoch=False)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


# ------------------------------------------------------------------ the recipe
def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


def _recipe_args(data, out, *extra):
    return [TINY, f"--data_folder={data}", f"--output_folder={out}", "--device=cpu", "--noprogressbar", *extra]


def _run(cmd, timeout=300):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=RECIPE, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    data = tmp_path_factory.mktemp("corpus")
    _write_corpus(str(data))
    _write_hostile(str(data))
    return str(data)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One uninterrupted single-process run of the tiny recipe (offline labels)."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    log = _run([sys.executable, TRAIN, *_recipe_args(corpus, out)])
    return out, log


@pytest.mark.slow
def test_tiny_recipe_trains_logs_and_exports(trained):
    out, log = trained
    with open(os.path.join(out, "train_log.txt"), encoding="utf-8") as f:
        lines = f.read().strip().splitlines()
    assert [line.split(",")[0] for line in lines] == ["epoch: 1", "epoch: 2"]
    for term in ("train loss", "train acoustic_ce", "train cqt_mse", "train feature_penalty", "train acoustic_acc",
                 "valid loss", "valid acoustic_ce", "valid cqt_mse"):
        assert term in lines[-1], term
    first = float(lines[0].split("train loss: ")[1].split(",")[0])
    last = float(lines[-1].split("train loss: ")[1].split(",")[0])
    assert last < first  # it learns something in two epochs
    # total_updates: 0 (the tiny default): the learning rate decays to about zero at the end of the last epoch.
    lrs = [float(line.split("lr: ")[1].split(",")[0]) for line in lines]
    assert lrs[-1] <= 0.25 * lrs[0], lrs
    assert "total_updates: 0 ->" in log
    skipped = open(os.path.join(out, "skipped.txt"), encoding="utf-8").read()
    assert all(name in skipped for name in ("empty.wav", "junk.mp3", "nan.wav", "short.wav"))
    n_train = len(_read_csv(os.path.join(out, "train.csv")))
    assert len([f for f in os.listdir(os.path.join(out, "labels", "a")) if f.endswith(".codes.npy")]) > 0
    assert n_train >= 20
    assert "Fitting the 'cqt-kmeans' teacher" in log  # mert_tiny.yaml's teacher
    # validation reports the masked codes' baselines next to the student's accuracy
    for term in ("valid acoustic_acc", "valid unigram_acc", "valid unigram_ce", "valid copy_acc"):
        assert term in lines[-1], term
    # a snapshot of the student after every epoch, with the updates made so far
    snaps = sorted(os.listdir(os.path.join(out, "snapshots")))
    assert snaps == ["epoch_001", "epoch_002"]
    updates = [json.load(open(os.path.join(out, "snapshots", s, "snapshot.json")))["updates"] for s in snaps]
    assert 0 < updates[0] < updates[1] == int(lines[-1].split("updates: ")[1].split(" ")[0].rstrip(","))
    # step-level log: one line every log_interval (mert_tiny: 10) updates, with the loss and the terms
    with open(os.path.join(out, "train_steps_log.txt"), encoding="utf-8") as f:
        steps = f.read().strip().splitlines()
    total = updates[1]
    assert [int(line.split("updates: ")[1].split(",")[0]) for line in steps] == list(range(10, total + 1, 10))
    assert all("train loss: " in line and "train acoustic_ce: " in line and "seconds: " in line for line in steps)
    assert not os.path.exists(os.path.join(out, "tensorboard"))  # off by default


@pytest.mark.slow
def test_export_and_checkpoint_load_everywhere(trained, tmp_path):
    from speechbrain.inference.encoders import WaveformEncoder

    from mert_plugin import MERTModel

    out, _ = trained
    export = os.path.join(out, "export")
    model = MERTModel.from_pretrained(export)
    ckpts = sorted(d for d in os.listdir(os.path.join(out, "save")) if d.startswith("CKPT+"))
    from_ckpt = MERTModel.from_pretrained(os.path.join(out, "save", ckpts[-1]))
    for k, v in model.state_dict().items():
        assert torch.equal(v, from_ckpt.state_dict()[k]), k  # the last checkpoint is what was exported
    untrained = MERTModel.from_preset("mert-tiny", seed=1234)
    assert not torch.equal(model.encoder.layers[0].attention.q_proj.weight,
                           untrained.encoder.layers[0].attention.q_proj.weight)

    enc = WaveformEncoder.from_hparams(source=export, savedir=str(tmp_path / "sb"))
    wav = torch.randn(2, 24000)
    with torch.no_grad():
        expected = model(wav).last_hidden_state
    torch.testing.assert_close(enc.encode_batch(wav, torch.ones(2)), expected, atol=1e-5, rtol=0)


def _latest_complete_checkpoint(save):
    from checkpointing import checkpoint_problem

    best = None
    for d in os.listdir(save):
        path = os.path.join(save, d)
        if d.startswith("CKPT+") and os.path.isfile(os.path.join(path, "CKPT.yaml")) and not checkpoint_problem(path):
            mtime = os.path.getmtime(os.path.join(path, "CKPT.yaml"))
            best = max(best or (mtime, path), (mtime, path))
    return best and best[1]


def _intra_epoch_checkpoint_of(save, epoch):
    """True once a complete intra-epoch checkpoint of ``epoch`` exists (its epoch counter, saved
    with it, says which epoch: no comparison with the moment the test noticed the epoch start,
    which a busy machine delays past the checkpoints of that epoch)."""
    if not os.path.isdir(save):
        return False
    for d in os.listdir(save):
        try:
            if not d.startswith("CKPT+") or "brain_intra_epoch_ckpt" not in open(os.path.join(save, d, "CKPT.yaml")).read():
                continue  # a CKPT+ folder appears complete: AtomicCheckpointer renames it into place
            if open(os.path.join(save, d, "counter.ckpt")).read().strip() == str(epoch):
                return True
        except OSError:  # not complete yet, or deleted meanwhile
            pass
    return False


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid):
    """SIGKILL ``pid`` and every process below it, as a crash of the machine would.
    (torchrun starts its workers in sessions of their own, so a process-group kill misses them.)"""
    for _ in range(10):
        targets = [pid] + _descendants(pid)
        for target in targets:
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
        if not _descendants(pid):
            return


def _start_and_kill(cmd, out, epoch, rng):
    """Run ``cmd``; SIGKILL its whole process group at a random moment (0-0.3 s) after an
    intra-epoch checkpoint of ``epoch`` exists (later would risk the run having finished: a tiny
    epoch lasts about a second). Returns the newest complete checkpoint then."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=RECIPE)
    save = os.path.join(out, "save")
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            assert proc.poll() is None, "the run finished before it could be killed"
            if _intra_epoch_checkpoint_of(save, epoch):
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    assert not os.path.isdir(os.path.join(out, "export")), "killed too late: the run had already finished"
    return _latest_complete_checkpoint(save)


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_from_last_checkpoint(trained, corpus, tmp_path):
    """Killed mid-epoch, the rerun continues from the newest checkpoint and ends
    bit-for-bit where the uninterrupted run ended (RNG, data position, optimizer
    and scheduler are all restored)."""
    ref_out, _ = trained
    out = str(tmp_path / "out")
    shared = [f"--label_folder={ref_out}/labels", f"--teacher_state={ref_out}/teacher_state.safetensors",
              "--ckpt_interval_steps=2"]
    cmd = [sys.executable, TRAIN, *_recipe_args(corpus, out, *shared)]
    last = _start_and_kill(cmd, out, epoch=2, rng=random.Random(os.getpid()))
    assert last is not None
    log = _run(cmd)
    assert f"Loading a checkpoint from {last}" in log

    from safetensors.torch import load_file

    ref = load_file(os.path.join(ref_out, "export", "model.safetensors"))
    got = load_file(os.path.join(out, "export", "model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    with open(os.path.join(out, "train_log.txt"), encoding="utf-8") as f:
        assert [line.split(",")[0] for line in f.read().strip().splitlines()] == ["epoch: 1", "epoch: 2"]


@pytest.mark.slow
def test_torchrun_two_processes_gloo_killed_and_resumed(corpus, trained, tmp_path):
    ref_out, _ = trained
    out = str(tmp_path / "ddp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN]
    args = _recipe_args(corpus, out, "--distributed_backend=gloo", f"--label_folder={ref_out}/labels",
                        f"--teacher_state={ref_out}/teacher_state.safetensors", "--ckpt_interval_steps=1")
    last = _start_and_kill(torchrun + args, out, epoch=1, rng=random.Random(os.getpid() + 1))
    assert last is not None
    log = _run(torchrun + args)
    assert f"Loading a checkpoint from {last}" in log
    with open(os.path.join(out, "train_log.txt"), encoding="utf-8") as f:
        lines = f.read().strip().splitlines()
    assert [line.split(",")[0] for line in lines] == ["epoch: 1", "epoch: 2"]
    # Each process saw half the batches: half the single-process updates per epoch.
    single = open(os.path.join(ref_out, "train_log.txt"), encoding="utf-8").read().splitlines()
    updates = [int(line.split("updates: ")[1].split(" ")[0]) for line in (single[0], lines[0])]
    assert updates[1] == (updates[0] + 1) // 2
    from mert_plugin import MERTModel

    MERTModel.from_pretrained(os.path.join(out, "export"))


# ------------------------------------------------- DDP: few batches, uneven batches
def _write_tracks(folder, n, seconds, sr=SR, ext="wav", stereo=False):
    """``n`` tone-plus-noise tracks of ``seconds`` each (ogg written in 1 s blocks: libsndfile's
    vorbis encoder crashes on one big write)."""
    rng = np.random.default_rng(5)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        t = np.arange(int(seconds * sr)) / sr
        x = 0.2 * np.sin(2 * np.pi * 110 * 2 ** (i / 4) * t) + 0.05 * rng.standard_normal(t.size)
        x = (np.stack([x, 0.7 * x], axis=1) if stereo else x).astype(np.float32)
        with sf.SoundFile(os.path.join(folder, f"track{i}.{ext}"), "w", sr, 2 if stereo else 1) as f:
            for start in range(0, len(x), sr):
                f.write(x[start:start + sr])


def _torchrun(nproc):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN]


def _epochs_and_updates(out):
    with open(os.path.join(out, "train_log.txt"), encoding="utf-8") as f:
        lines = f.read().strip().splitlines()
    return [line.split(",")[0] for line in lines], [int(line.split("updates: ")[1].split(" ")[0]) for line in lines]


@pytest.mark.parametrize("n_batches,world", [(1, 2), (1, 3), (2, 3), (3, 2), (4, 2), (5, 4), (6, 3)])
def test_ddp_batch_sampler_gives_every_process_the_same_number_of_whole_batches(n_batches, world):
    """The wrapper the Brain uses under DDP (SpeechBrain's, fixed for a process that gets a single
    batch): each process gets ceil(batches / processes) whole batches, padded by repeating batches,
    together every batch; train.py derives total_updates from the same count."""
    from speechbrain.dataio.sampler import DistributedSamplerWrapper

    from data import batches_per_process, distributed_batch_sampler

    class Batches:  # a batch sampler: yields lists of clip indices
        def __init__(self):
            self.epoch = None

        def __iter__(self):
            return iter([[2 * i, 2 * i + 1] for i in range(n_batches)])

        def __len__(self):
            return n_batches

        def set_epoch(self, epoch):
            self.epoch = epoch

    sampler = Batches()
    assert distributed_batch_sampler(sampler) is sampler  # single process: left alone
    shares = []
    for rank in range(world):
        wrapped = distributed_batch_sampler(DistributedSamplerWrapper(sampler, num_replicas=world, rank=rank,
                                                                      shuffle=True))
        wrapped.set_epoch(3)
        assert sampler.epoch == 3
        share = list(wrapped)
        assert len(share) == len(wrapped) == batches_per_process(n_batches, world)
        assert all(isinstance(b, list) and b in list(sampler) for b in share), share
        shares.append(share)
    assert {tuple(b) for share in shares for b in share} == {tuple(b) for b in sampler}


def test_manifest_without_rows_is_an_empty_dataset(tmp_path):
    """A folder of one file (or valid_fraction: 0) has no validation rows; SpeechBrain's
    from_csv fails on that, so the recipe's datasets would not be built."""
    from data import make_dataset

    path = tmp_path / "valid.csv"
    path.write_text("ID,duration,path\n")
    dataset = make_dataset(str(path), str(tmp_path))
    assert len(dataset) == 0 and list(dataset) == []
    assert len(dataset.filtered_sorted(key_test={"id": lambda i: True})) == 0


@pytest.mark.slow
def test_torchrun_few_long_files_fewer_batches_than_processes_then_resume(trained, tmp_path):
    """Three long stereo ogg tracks (data preparation: 2 train, 1 valid): one batch an epoch
    for two processes. SpeechBrain's DDP wrapper crashed here ('int' object is not iterable)."""
    ref_out, _ = trained
    data, out = str(tmp_path / "tracks"), str(tmp_path / "ddp")
    _write_tracks(data, 3, 12.0, sr=44100, ext="ogg", stereo=True)
    args = _recipe_args(data, out, "--distributed_backend=gloo",
                        f"--teacher_state={ref_out}/teacher_state.safetensors")
    log = _run(_torchrun(2) + args + ["--number_of_epochs=1"])
    assert len(_read_csv(os.path.join(out, "train.csv"))) == 2 and len(_read_csv(os.path.join(out, "valid.csv"))) == 1
    assert "total_updates: 0 -> 1 (1 epochs x 1 updates)" in log
    assert _epochs_and_updates(out) == (["epoch: 1"], [1])
    # Resumed for a second epoch from the end-of-epoch checkpoint.
    last = _latest_complete_checkpoint(os.path.join(out, "save"))
    log = _run(_torchrun(2) + args + ["--number_of_epochs=2"])
    assert f"Loading a checkpoint from {last}" in log
    assert _epochs_and_updates(out) == (["epoch: 1", "epoch: 2"], [1, 2])
    from mert_plugin import MERTModel

    MERTModel.from_pretrained(os.path.join(out, "export"))


@pytest.mark.slow
def test_mfcc_target_trains_under_torchrun_and_its_statistics_resume(trained, tmp_path):
    """``--mfcc_weight``: the MFCC head trains in a two-process gloo run, its loss is logged, and its
    running statistics are checkpointed with the heads and keep counting after a resume."""
    ref_out, _ = trained
    data, out = str(tmp_path / "tracks"), str(tmp_path / "ddp")
    _write_tracks(data, 3, 12.0)
    args = _recipe_args(data, out, "--distributed_backend=gloo", "--mfcc_weight=1",
                        f"--teacher_state={ref_out}/teacher_state.safetensors")
    counts = []
    for epochs in (1, 2):
        _run(_torchrun(2) + args + [f"--number_of_epochs={epochs}"])
        heads = torch.load(os.path.join(_latest_complete_checkpoint(os.path.join(out, "save")), "heads.ckpt"),
                           weights_only=True)
        counts.append(float(heads["mfcc_count"]))
        assert heads["mfcc_head.weight"].shape == (19, 128) and bool((heads["mfcc_m2"] > 0).all())
    # one 2 s crop per process and update: 149 frames each time (every process keeps rank 0's statistics)
    assert counts[0] >= 149 and counts[1] > counts[0]
    with open(os.path.join(out, "train_log.txt"), encoding="utf-8") as f:
        lines = f.read().strip().splitlines()
    assert len(lines) == 2 and all("train mfcc_mse" in line and "valid mfcc_mse" in line for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("files,world", [(2, 3), (3, 2)])
def test_torchrun_uneven_batches(trained, tmp_path, files, world):
    """One clip per batch (max_batch_length = the tiny crop, 2 s), no validation split:
    2 batches for 3 processes, 3 batches for 2; every process trains on ceil(batches / processes)."""
    ref_out, _ = trained
    data, out = str(tmp_path / "clips"), str(tmp_path / "ddp")
    _write_tracks(data, files, 2.5)
    per_process = -(-files // world)
    log = _run(_torchrun(world) + _recipe_args(
        data, out, "--distributed_backend=gloo", f"--teacher_state={ref_out}/teacher_state.safetensors",
        "--valid_fraction=0.0", "--number_of_epochs=1", "--dynamic_batching={max_batch_length: 2.0}"))
    assert len(_read_csv(os.path.join(out, "train.csv"))) == files
    assert f"total_updates: 0 -> {per_process} (1 epochs x {per_process} updates)" in log
    assert _epochs_and_updates(out) == (["epoch: 1"], [per_process])
    assert os.path.isfile(os.path.join(out, "export", "model.safetensors"))


# Runs train.main under torchrun and counts, when the process group is destroyed, the DDP
# wrappers still alive (their reducers hold the group).
_DESTROY_PROBE = """
import gc, os, sys
sys.path.insert(0, {recipe!r})
sys.argv[0] = os.path.join({recipe!r}, "train.py")
import torch
import train

destroy = torch.distributed.destroy_process_group

def counting_destroy(*args, **kwargs):
    alive = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    print(f"rank {{os.environ['RANK']}}: DDP wrappers alive at destroy_process_group: {{alive}}", flush=True)
    return destroy(*args, **kwargs)

torch.distributed.destroy_process_group = counting_destroy
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_torchrun_releases_the_brain_before_destroying_the_process_group(trained, tmp_path):
    """SpeechBrain's checkpointer keeps the Brain, and so its DDP wrappers and their process
    group, in a reference cycle. Left to interpreter exit, the gloo group is released during
    teardown, where a finished process can abort; train.main collects it before destroying."""
    ref_out, _ = trained
    data, out = str(tmp_path / "clips"), str(tmp_path / "ddp")
    _write_tracks(data, 2, 2.5)
    probe = tmp_path / "destroy_probe.py"
    probe.write_text(_DESTROY_PROBE.format(recipe=RECIPE))
    log = _run(_torchrun(2)[:-1] + [str(probe)] + _recipe_args(
        data, out, "--distributed_backend=gloo", f"--teacher_state={ref_out}/teacher_state.safetensors",
        "--valid_fraction=0.0", "--number_of_epochs=1", "--dynamic_batching={max_batch_length: 2.0}"))
    assert _epochs_and_updates(out) == (["epoch: 1"], [1])  # DDP did train
    for rank in (0, 1):
        assert f"rank {rank}: DDP wrappers alive at destroy_process_group: 0" in log


# --------------------------------------------------------------- downstream
def _write_pitch_task(folder, n=18):
    """Three pitch classes; CSV columns path,label,split (+ an extra column, as the demo corpus has)."""
    rng = np.random.default_rng(3)
    os.makedirs(os.path.join(folder, "audio"), exist_ok=True)
    rows = []
    for i in range(n):
        label = ("low", "mid", "high")[i % 3]
        f0 = {"low": 110.0, "mid": 440.0, "high": 1760.0}[label] * 2 ** rng.uniform(-0.2, 0.2)
        t = np.arange(SR) / SR
        sf.write(os.path.join(folder, "audio", f"n{i:02d}.wav"),
                 (0.3 * np.sin(2 * np.pi * f0 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32), SR)
        rows.append({"path": f"audio/n{i:02d}.wav", "label": label,
                     "split": ("train", "train", "train", "train", "valid", "test")[i // 3], "piece": str(i)})
    with open(os.path.join(folder, "pitch.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split", "piece"])
        writer.writeheader()
        writer.writerows(rows)
    return os.path.join(folder, "pitch.csv")


def test_downstream_csv_errors_are_clear(tmp_path):
    from mert_plugin.errors import MERTError
    sys.path.insert(0, os.path.join(RECIPE, "downstream"))  # a recipe folder of its own
    try:
        from train_classifier import read_task_csv
    finally:
        sys.path.remove(os.path.join(RECIPE, "downstream"))

    csv_path = _write_pitch_task(str(tmp_path))
    splits = read_task_csv(csv_path, str(tmp_path))
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [12, 3, 3]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\naudio/n00.wav,low\n")
    with pytest.raises(MERTError, match="missing column"):
        read_task_csv(str(bad), str(tmp_path))
    bad.write_text("path,label,split\naudio/n00.wav,low;mid,train\n")
    with pytest.raises(MERTError, match="single-label"):
        read_task_csv(str(bad), str(tmp_path))
    bad.write_text("path,label,split\naudio/n00.wav,low,holdout\n")
    with pytest.raises(MERTError, match="unknown split"):
        read_task_csv(str(bad), str(tmp_path))


@pytest.mark.slow
def test_downstream_classifier_on_frozen_export(trained, tmp_path):
    out, _ = trained
    data = str(tmp_path / "task")
    csv_path = _write_pitch_task(data)
    result = str(tmp_path / "cls")
    script = os.path.join(RECIPE, "downstream", "train_classifier.py")
    yaml_path = os.path.join(RECIPE, "downstream", "hparams", "classify.yaml")
    _run([sys.executable, script, yaml_path, f"--data_folder={data}", f"--csv={csv_path}",
          f"--pretrained={out}/export", f"--output_folder={result}", "--number_of_epochs=2", "--device=cpu",
          "--noprogressbar"])
    with open(os.path.join(result, "train_log.txt"), encoding="utf-8") as f:
        lines = f.read().strip().splitlines()
    assert lines[0].startswith("epoch: 1") and "layer_weights: [" in lines[0] and "valid accuracy" in lines[0]
    assert "test accuracy" in lines[-1]
    weights = lines[1].split("layer_weights: [")[1].split("]")[0].split(", ")
    assert len(weights) == 5 and abs(sum(map(float, weights)) - 1.0) < 0.01  # mert-tiny: 4 layers + input
    with open(os.path.join(result, "save", "label_encoder.txt"), encoding="utf-8") as f:
        assert {"'low'", "'mid'", "'high'"} <= {line.split(" => ")[0] for line in f if "=>" in line}


# ------------------------------------------------------- stand-alone recipe folder
@pytest.mark.parametrize("yaml_name", ["mert_tiny.yaml", "mert.yaml", "mert_330m.yaml"])
def test_yaml_class_paths_resolve_from_the_tests(yaml_name, tmp_path):
    """The yamls name the recipe's helpers as SpeechBrain recipes do (``!new:data.CropCollate``,
    ``!new:checkpointing.AtomicCheckpointer``): they resolve with the recipe folder on sys.path,
    as ``python train.py`` has it (the student is swapped for mert-tiny to keep this fast)."""
    from hyperpyyaml import load_hyperpyyaml

    with open(os.path.join(RECIPE, "hparams", yaml_name), encoding="utf-8") as f:
        hp = load_hyperpyyaml(f, {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "out"),
                                  "preset": "mert-tiny"})
    assert type(hp["train_collate"]).__module__ == "data"
    assert type(hp["checkpointer"]).__name__ == "AtomicCheckpointer"
    assert type(hp["checkpointer"]).__module__ == "checkpointing"
    assert hp["log_interval"] > 0 and hp["train_steps_log"].endswith("train_steps_log.txt")
    assert hp["use_tensorboard"] is False
    assert type(hp["train_steps_logger"]).__name__ == "FileTrainLogger"


def test_tiny_yaml_objective_knobs_are_command_line_overrides(tmp_path):
    """The settings that docs/LEARNING.md varies are top-level keys of mert_tiny.yaml that reach
    the ObjectiveConfig, so ``train.py hparams/mert_tiny.yaml --mixture_prob=0`` (and the demo's
    ``--recipe-arg``) changes the objective, not only a key nobody reads."""
    from hyperpyyaml import load_hyperpyyaml

    knobs = {"mask_prob": 0.3, "mixture_prob": 0.0, "mixture_min_samples": 4800,
             "mixture_max_samples": 9600, "level_weight": 2.0, "mfcc_weight": 3.0,
             "envelope_weight": 3.0, "envelope_dims": 16}
    path = os.path.join(RECIPE, "hparams", "mert_tiny.yaml")
    with open(path, encoding="utf-8") as f:
        default = load_hyperpyyaml(f, {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "a")})
    with open(path, encoding="utf-8") as f:
        changed = load_hyperpyyaml(f, {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "b"),
                                       **knobs})
    for key, value in knobs.items():
        assert getattr(default["objective"], key) != value, key  # the override is a change
        assert getattr(changed["objective"], key) == value, key


def test_stem_lr_scale_slows_only_the_conv_stem(tmp_path):
    """``stem_lr_scale`` puts the conv stem in its own optimizer group at that multiple of the
    scheduled lr, also after SpeechBrain's scheduler has set one lr on every group; an Adam step
    then moves the stem's weights that much less (Adam's first step moves each weight by ~lr)."""
    from hyperpyyaml import load_hyperpyyaml
    import train

    with open(TINY, encoding="utf-8") as f:
        hp = load_hyperpyyaml(f, {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "out"),
                                  "stem_lr_scale": 0.1, "mixture_prob": 0.0})
    torch.manual_seed(0)
    brain = train.MERTBrain(modules=hp["modules"], opt_class=hp["opt_class"], hparams=hp,
                            run_opts={"device": "cpu"})
    brain.init_optimizers()
    groups = brain.optimizer.param_groups
    stem = list(hp["student"].feature_extractor.parameters())
    assert len(groups) == 2 and {id(p) for p in groups[1]["params"]} == {id(p) for p in stem}
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in brain.modules.parameters())
    for _ in range(3):
        hp["lr_scheduler"](brain.optimizer)
        brain._apply_lr_scales()
    assert groups[0]["lr"] > 0 and groups[1]["lr"] == pytest.approx(0.1 * groups[0]["lr"])

    before = {id(p): p.detach().clone() for p in brain.modules.parameters()}
    wav = 0.1 * torch.randn(2, SR)
    frames, cfg = hp["student"].num_frames(SR), hp["objective"]
    codes = torch.randint(0, cfg.codebook_size, (2, cfg.num_codebooks, frames))
    out = hp["pretrainer"](wav, codes=codes, cqt=torch.rand(2, frames, cfg.cqt_bins))
    out.loss.backward()
    brain.optimizer.step()
    moved = {i: max(float((p.detach() - before[id(p)]).abs().max()) for p in g["params"] if p.grad is not None)
             for i, g in enumerate(groups)}
    assert moved[1] < 0.2 * moved[0], moved  # the stem took ~1/10 of the step


def test_recipe_folder_needs_no_package_import():
    """No module of the recipe imports it as a package (speechbrain_recipes.*), and there is no
    __init__.py: the folder is copied or run as it is, with mert_plugin installed."""
    for root, _, files in os.walk(RECIPE):
        assert "__init__.py" not in files, root
        for name in files:
            if name.endswith((".py", ".yaml")):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    assert "speechbrain_recipes" not in f.read(), os.path.join(root, name)
    with open(os.path.join(RECIPE, "extra_requirements.txt"), encoding="utf-8") as f:
        reqs = [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]
    assert any(r.startswith("mert-plugin") or r.startswith("mert_plugin") for r in reqs), reqs


@pytest.mark.slow
def test_debug_shortens_every_step_and_keeps_output_folder_clean(corpus, tmp_path):
    """``--debug`` (SpeechBrain's flag): a few files prepared, labelled and trained on, the export
    written; outputs in a temporary folder (removed) or, with --debug_persistently, in
    <output_folder>/debug; step logs every update and TensorBoard events when asked."""
    out = str(tmp_path / "out")
    log = _run([sys.executable, TRAIN, *_recipe_args(corpus, out, "--debug", "--debug_persistently",
                                                   "--log_interval=1", "--use_tensorboard=True")])
    debug = os.path.join(out, "debug")
    assert "--debug: outputs in" in log
    rows = _read_csv(os.path.join(debug, "train.csv")) + _read_csv(os.path.join(debug, "valid.csv"))
    assert 0 < len(rows) <= 6  # data preparation checked 6 files of the 28 in the corpus
    labelled = [f for _, _, files in os.walk(os.path.join(debug, "labels")) for f in files
                if f.endswith(".codes.npy")]
    assert 0 < len(labelled) <= 6
    assert os.path.isfile(os.path.join(debug, "export", "model.safetensors"))
    assert not os.path.exists(os.path.join(debug, "snapshots"))
    with open(os.path.join(debug, "train_steps_log.txt"), encoding="utf-8") as f:
        steps = f.read().strip().splitlines()
    assert steps and steps[0].startswith("epoch: 1, updates: 1, lr: ") and "train loss: " in steps[0]
    tb = os.path.join(debug, "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))
    assert not os.path.exists(os.path.join(out, "train.csv"))  # nothing a real run would reuse
    # without --debug_persistently nothing is left behind
    out2 = str(tmp_path / "out2")
    log = _run([sys.executable, TRAIN, *_recipe_args(corpus, out2, "--debug")])
    tmp = log.split("--debug: outputs in ")[1].split(";")[0]
    assert not os.path.exists(tmp) and not os.path.exists(os.path.join(out2, "train.csv"))
