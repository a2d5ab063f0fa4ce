"""Data pipeline of the MERT pretraining recipe.

* :func:`dataio_prepare`: the recipe's train/valid datasets and collates.
* :func:`make_dataset`: a SpeechBrain ``DynamicItemDataset`` over a manifest
  from ``prepare_music.py`` (items ``{id, path, duration}``).
* :func:`make_batch_sampler`: SpeechBrain's ``DynamicBatchSampler``, batching
  by the *cropped* duration (long files are cut to ``crop_seconds``).
* :func:`distributed_batch_sampler`: SpeechBrain's DDP wrapper of that sampler,
  usable when a process gets a single batch (fewer batches than processes).
* :class:`CropCollate`: reads the audio and crops it. Every clip of a batch
  is cut to ``crop_seconds`` or, when the batch's shortest clip is shorter, to
  that clip's length, as the reference does (fairseq ``RawAudioDataset`` with
  ``pad=False``: ``min(shortest, max_sample_size)``), so no clip is padded and
  conv 0's GroupNorm never sees padding. Each clip's
  start is a random multiple of the 320-sample hop, so offline labels (frame
  ``t`` of the whole file) are cut at frame ``start // 320``. The draws are a
  function of (seed, epoch, clip ids) only: identical across processes, data
  loader workers and resumed runs.
"""
from __future__ import annotations

import csv
import functools
import math
import random
import zlib
from dataclasses import dataclass, fields
from typing import List, Optional

import numpy as np
import torch
from torch import Tensor

from mert_plugin.audio import load_audio
from mert_plugin.config import MERTConfig
from mert_plugin.errors import MERTError
import label_step


def make_dataset(csv_path: str, data_folder: str):
    """``DynamicItemDataset`` with output keys ``id``, ``path``, ``duration`` (empty for a
    manifest without rows, e.g. no validation split)."""
    from speechbrain.dataio.dataset import DynamicItemDataset

    with open(csv_path, newline="", encoding="utf-8") as f:
        empty = next(csv.DictReader(f), None) is None
    if empty:  # SpeechBrain cannot build a dataset from no rows (IndexError): an empty view of one row
        dataset = DynamicItemDataset({"-": {"path": "", "duration": 0.0}}).filtered_sorted(
            key_test={"id": lambda _: False})
    else:
        dataset = DynamicItemDataset.from_csv(csv_path, replacements={"data_root": data_folder})
    dataset.set_output_keys(["id", "path", "duration"])
    return dataset


def make_batch_sampler(dataset, crop_seconds: float, **sampler_kwargs):
    """``DynamicBatchSampler`` over the clips' cropped durations (seconds)."""
    from speechbrain.dataio.sampler import DynamicBatchSampler

    lengths = [min(float(dataset.data[i]["duration"]), crop_seconds) for i in dataset.data_ids]
    return DynamicBatchSampler(dataset, lengths_list=lengths, **sampler_kwargs)


def batches_per_process(num_batches: int, world_size: int) -> int:
    """Batches each DDP process trains on per epoch: ``DistributedSampler`` (drop_last=False,
    as SpeechBrain wraps a batch sampler) pads the batch list by repeating batches until
    every process gets the same number."""
    return math.ceil(num_batches / max(1, world_size))


@functools.lru_cache(maxsize=None)  # one class (speechbrain is imported lazily, as elsewhere here)
def _distributed_batch_sampler_class():
    from speechbrain.dataio.sampler import DistributedSamplerWrapper
    from torch.utils.data.distributed import DistributedSampler

    class DistributedBatchSampler(DistributedSamplerWrapper):
        """SpeechBrain's ``DistributedSamplerWrapper`` around a batch sampler, with the
        process's share built as a list. The parent returns ``iter(itemgetter(*positions)(batches))``:
        with one position (a process given a single batch, e.g. fewer batches than processes)
        ``itemgetter`` returns that batch itself, so the loader iterated over its clip indices
        (``TypeError: 'int' object is not iterable``). Padding, shuffling and ``set_epoch`` are
        the parent's."""

        def __iter__(self):
            batches = list(self.sampler)
            return iter([batches[i] for i in DistributedSampler.__iter__(self)])

    return DistributedBatchSampler


def distributed_batch_sampler(sampler):
    """``sampler`` unchanged, unless it is SpeechBrain's ``DistributedSamplerWrapper``
    (what ``Brain`` makes of a batch sampler under DDP): then the same wrapper, same
    settings, whose iteration also works for a process that gets a single batch."""
    from speechbrain.dataio.sampler import DistributedSamplerWrapper

    if type(sampler) is not DistributedSamplerWrapper:
        return sampler
    return _distributed_batch_sampler_class()(
        sampler.sampler, num_replicas=sampler.num_replicas, rank=sampler.rank, shuffle=sampler.shuffle,
        seed=sampler.seed, drop_last=sampler.drop_last)


@dataclass
class PretrainBatch:
    """One training batch.

    ids: B clip ids; wav: [B, N] clean audio, N a multiple of the hop;
    starts: [B] crop start sample in each file; codes: [B, K, T'] long or None;
    cqt: [B, T', bins] float or None (offline labels, cut at start // hop).
    """

    ids: List[str]
    wav: Tensor
    starts: Tensor
    codes: Optional[Tensor] = None
    cqt: Optional[Tensor] = None

    def to(self, device, non_blocking: bool = False) -> "PretrainBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, Tensor):
                moved[k] = v.to(device, non_blocking=non_blocking)
        return PretrainBatch(**moved)

    def pin_memory(self) -> "PretrainBatch":
        return PretrainBatch(**{f.name: (v.pin_memory() if isinstance(v, Tensor) else v)
                                for f in fields(self) for v in [getattr(self, f.name)]})

    def __len__(self) -> int:
        return len(self.ids)


class CropCollate:
    """Collate ``{id, path, duration}`` items into a :class:`PretrainBatch`.

    Arguments
    ---------
    config : MERTConfig
        The student's config (sample rate, hop, frame count).
    crop_seconds : float
        Crop length (the reference's ``max_sample_size``); a batch whose
        shortest clip is shorter is cut to that clip's length. Files shorter
        than the reference's ``min_sample_size`` are left out earlier, by data
        preparation (``min_duration``).
    label_folder : str, optional
        Offline labels (``mert_plugin.labels`` layout).
    load_codes, load_cqt : bool
        Which offline labels to read (False for labels made online).
    seed : int
        Base seed of the crop draws; ``epoch`` (set by the Brain) is mixed in.
    vary_with_epoch : bool
        False for validation: the same crops every epoch.
    """

    def __init__(self, config: MERTConfig, crop_seconds: float, label_folder: Optional[str] = None,
                 load_codes: bool = True, load_cqt: bool = True, seed: int = 0, vary_with_epoch: bool = True):
        if not crop_seconds > 0:
            raise MERTError(f"crop_seconds must be > 0, got {crop_seconds}")
        self.config = config
        self.hop = config.hop_length
        self.crop_samples = self._to_hops(crop_seconds * config.sample_rate)
        self.label_folder = label_folder
        self.load_codes = load_codes
        self.load_cqt = load_cqt
        self.seed = seed
        self.vary_with_epoch = vary_with_epoch
        self.epoch = 0

    def _to_hops(self, samples: float) -> int:
        return max(self.hop, int(samples) // self.hop * self.hop)

    def rng(self, ids: List[str]) -> random.Random:
        epoch = self.epoch if self.vary_with_epoch else 0
        return random.Random(zlib.crc32(f"{self.seed}|{epoch}|{'|'.join(ids)}".encode("utf-8")))

    def __call__(self, items: List[dict]) -> PretrainBatch:
        ids = [it["id"] for it in items]
        rng = self.rng(ids)
        handles = [_AudioHandle(it["path"], self.config.sample_rate) for it in items]
        shortest = min(h.num_samples for h in handles) // self.hop * self.hop
        length = min(self.crop_samples, shortest)
        if length < self.config.receptive_field:
            raise MERTError(f"batch {ids}: clips too short to crop ({shortest} samples)")
        starts = [self.hop * rng.randint(0, (h.num_samples - length) // self.hop) for h in handles]
        wav = torch.stack([h.read(s, length) for h, s in zip(handles, starts)])
        batch = PretrainBatch(ids=ids, wav=wav, starts=torch.tensor(starts))
        if self.load_codes or self.load_cqt:
            if self.label_folder is None:
                raise MERTError("CropCollate: offline labels requested without a label_folder")
            self._add_labels(batch, length)
        return batch

    def _add_labels(self, batch: PretrainBatch, length: int) -> None:
        from mert_plugin.labels import label_paths

        frames = self.config.num_frames(length)
        codes, cqts = [], []
        for clip_id, start in zip(batch.ids, batch.starts.tolist()):
            codes_path, cqt_path = label_paths(self.label_folder, clip_id)
            first = start // self.hop
            if self.load_codes:
                codes.append(_load_frames(codes_path, clip_id, first, frames, time_axis=1))
            if self.load_cqt:
                cqts.append(_load_frames(cqt_path, clip_id, first, frames, time_axis=0))
        if codes:
            n = min(c.shape[1] for c in codes)
            batch.codes = torch.from_numpy(np.stack([c[:, :n] for c in codes]).astype(np.int64))
        if cqts:
            n = min(c.shape[0] for c in cqts)
            batch.cqt = torch.from_numpy(np.stack([c[:n] for c in cqts]).astype(np.float32))


def _load_frames(path: str, clip_id: str, first: int, frames: int, time_axis: int) -> np.ndarray:
    """Frames [first, first + frames) of a label array (memory-mapped, so only they are read)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MERTError(f"{clip_id}: cannot read offline labels {path} ({exc}); rerun the label step or set "
                        f"online_teachers: True") from None
    index = [slice(None)] * arr.ndim
    index[time_axis] = slice(first, first + frames)
    return np.ascontiguousarray(arr[tuple(index)])


class _AudioHandle:
    """A file's length at the model rate, and crops of it. Files already at the
    model rate are read crop by crop; others are decoded and resampled whole."""

    def __init__(self, path: str, sample_rate: int):
        import soundfile as sf

        self.path, self.sample_rate, self._wav = path, sample_rate, None
        try:
            info = sf.info(path)
            native = info.samplerate == sample_rate
        except Exception:
            native = False  # let load_audio produce the error message
        if native:
            self.num_samples = info.frames
        else:
            self._wav = load_audio(path, sample_rate)
            self.num_samples = self._wav.numel()

    def read(self, start: int, length: int) -> Tensor:
        if self._wav is not None:
            return self._wav[start:start + length]
        import soundfile as sf

        data, _ = sf.read(self.path, start=start, frames=length, dtype="float32", always_2d=True)
        if data.shape[0] != length:
            raise MERTError(f"{self.path}: shorter than when the manifest was written; rerun data preparation")
        if not np.isfinite(data).all():
            raise MERTError(f"{self.path}: contains NaN or infinite samples")
        return torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0].copy())


def dataio_prepare(hparams):
    """Datasets (selected files; with offline labels, only labelled ones) and the collates' label source."""
    plan = label_step.teacher_plan(hparams)
    datasets = {}
    for split in ("train", "valid"):
        dataset = make_dataset(hparams[f"{split}_csv"], hparams["data_folder"])
        keep = [clip_id for _, clip_id in label_step.selected_files(hparams, split)]
        if plan["offline_codes"] or plan["offline_cqt"]:
            keep = label_step.labelled_ids(keep, hparams["label_folder"], plan["offline_codes"], plan["offline_cqt"])
        keep = set(keep)
        datasets[split] = dataset.filtered_sorted(key_test={"id": lambda i: i in keep})
        collate = hparams[f"{split}_collate"]
        collate.label_folder = hparams["label_folder"]
        collate.load_codes, collate.load_cqt = plan["offline_codes"], plan["offline_cqt"]
    if not len(datasets["train"]):
        raise MERTError(f"{hparams['train_csv']}: no usable training files")
    hparams["valid_set_size"] = len(datasets["valid"])
    return datasets
