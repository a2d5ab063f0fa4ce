"""Checkpointing pieces shared by the SpeechBrain recipes.

* :class:`AtomicCheckpointer`: SpeechBrain's ``Checkpointer`` writes
  ``CKPT.yaml`` *first* and the parameter files after it, straight into the
  final ``CKPT+...`` folder, so a run killed while saving leaves a folder that
  looks complete and is picked on resume (then fails on a truncated file, or
  silently loads half a state). Here every file goes into a hidden
  ``.partial-CKPT+...`` folder, the meta file (with a size manifest) is written
  last, the files are fsynced and the folder is renamed into place. Folders
  whose manifest does not match (e.g. half-deleted) are ignored.
* :class:`RNGState`: torch/numpy/python RNG states per rank, so a resumed run
  draws the same masks, crops and noise as an uninterrupted one.
* :class:`ConfigRecord`: ``mert_config.ckpt`` = ``MERTConfig.save_json`` of the
  student, which makes any recipe checkpoint folder loadable with
  ``MERTModel.from_pretrained``; on resume it refuses a different geometry.
* :class:`StateDictSubset`: saves part of a module (the pretraining heads
  without the student, which has its own ``student.ckpt``).
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from typing import Dict, Sequence

import numpy as np
import torch

from mert_plugin.atomic import fsync_dir, fsync_file
from mert_plugin.compat import ensure_torchaudio_importable
from mert_plugin.config import MERTConfig
from mert_plugin.errors import CheckpointError

ensure_torchaudio_importable()
from speechbrain.utils import checkpoints as sb_ckpt  # noqa: E402
from speechbrain.utils.distributed import (  # noqa: E402
    ddp_barrier, ddp_broadcast, get_rank, if_main_process,
)

logger = logging.getLogger(__name__)
PARTIAL_PREFIX = ".partial-"
MANIFEST_KEY = "mert_files"  # meta entry: {file name: size in bytes}


class AtomicCheckpointer(sb_ckpt.Checkpointer):
    """A ``speechbrain.utils.checkpoints.Checkpointer`` whose checkpoints appear
    all at once: an interrupted save is never the one resumed from."""

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=logging.INFO):
        final = tmp = None
        if if_main_process():
            final = self._new_checkpoint_dirpath() if name is None else self._custom_checkpoint_dirpath(name)
            tmp = final.with_name(PARTIAL_PREFIX + final.name)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        tmp, final = ddp_broadcast((tmp, final), src=0)

        paramfiles = {}
        for key, obj in self.recoverables.items():
            path = tmp / f"{key}{sb_ckpt.PARAMFILE_EXT}"
            hook = self.custom_save_hooks.get(key) or sb_ckpt.get_default_hook(obj, sb_ckpt.DEFAULT_SAVE_HOOKS)
            if hook is None:
                raise RuntimeError(f"Don't know how to save {type(obj)}; register a save hook")
            hook(obj, path)  # most hooks write on the main process only
            paramfiles[key] = final / path.name
        ddp_barrier()  # every rank's files are on disk

        checkpoint = None
        if if_main_process():
            files = {}
            for entry in sorted(os.listdir(tmp)):
                full = os.path.join(tmp, entry)
                fsync_file(full)
                files[entry] = os.path.getsize(full)
            meta = dict(meta)
            meta[MANIFEST_KEY] = files
            saved_meta = self._save_checkpoint_metafile(tmp / sb_ckpt.METAFNAME, meta, end_of_epoch)
            fsync_file(tmp / sb_ckpt.METAFNAME)
            old = None
            if final.exists():  # a reused custom name: move the old one aside first
                old = final.with_name(PARTIAL_PREFIX + "old-" + final.name)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            kind = "end-of-epoch" if end_of_epoch else "intra-epoch"
            logger.log(verbosity, f"Saved an {kind} checkpoint in {final}")
            checkpoint = sb_ckpt.Checkpoint(final, saved_meta, paramfiles)
        ddp_barrier()
        return checkpoint

    def _list_checkpoint_dirs(self):
        dirs = []
        for path in super()._list_checkpoint_dirs():
            problem = checkpoint_problem(path)
            if problem:
                logger.warning(f"Ignoring incomplete checkpoint {path}: {problem}")
            else:
                dirs.append(path)
        return dirs

    def recover_if_possible(self, *args, **kwargs):
        if if_main_process():  # leftovers of saves that were killed
            for entry in os.listdir(self.checkpoints_dir):
                if entry.startswith(PARTIAL_PREFIX):
                    logger.info(f"Removing interrupted checkpoint write {entry}")
                    shutil.rmtree(self.checkpoints_dir / entry, ignore_errors=True)
        return super().recover_if_possible(*args, **kwargs)


def checkpoint_problem(path) -> str:
    """'' if the checkpoint folder matches its manifest, else the reason."""
    import yaml

    try:
        with open(os.path.join(path, sb_ckpt.METAFNAME), encoding="utf-8") as f:
            meta = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        return f"unreadable {sb_ckpt.METAFNAME} ({exc})"
    if not isinstance(meta, dict):
        return f"{sb_ckpt.METAFNAME} is not a mapping"
    for name, size in (meta.get(MANIFEST_KEY) or {}).items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != size:
            return f"{name} has {os.path.getsize(full)} bytes, expected {size}"
    return ""


class RNGState:
    """Checkpoint entry holding each rank's torch, CUDA, numpy and python RNG state
    (``rng.ckpt`` for rank 0, ``rng.ckpt.rank<r>`` for the others)."""

    @sb_ckpt.mark_as_saver
    def save(self, path):
        rank = get_rank()
        if rank not in (None, 0, "0"):
            path = f"{path}.rank{rank}"
        np_state = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(state, path)

    @sb_ckpt.mark_as_loader
    def load(self, path, end_of_epoch):
        del end_of_epoch
        rank = get_rank()
        if rank not in (None, 0, "0"):
            path = f"{path}.rank{rank}"
        if not os.path.isfile(path):
            logger.warning(f"No RNG state {path} (different number of processes?); keeping the current one")
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        torch.set_rng_state(state["torch"])
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        random.setstate(_as_tuple(state["python"]))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


RNGState = sb_ckpt.register_checkpoint_hooks(RNGState, save_on_main_only=False)


@sb_ckpt.register_checkpoint_hooks
class ConfigRecord:
    """Checkpoint entry ``<name>.ckpt`` = the model's ``MERTConfig`` as HF JSON."""

    def __init__(self, model):
        self.model = model

    @sb_ckpt.mark_as_saver
    def save(self, path):
        self.model.config.save_json(path)

    @sb_ckpt.mark_as_loader
    def load(self, path, end_of_epoch):
        del end_of_epoch
        saved = MERTConfig.from_json_file(path).to_dict()
        current = self.model.config.to_dict()
        diff = sorted(k for k in current if saved.get(k) != current[k])
        if diff:
            raise CheckpointError(f"{path}: the checkpoint's model config differs from this run's in {diff}; "
                                  f"use a new output_folder or the same preset")


@sb_ckpt.register_checkpoint_hooks
class StateDictSubset:
    """Checkpoint entry holding ``module``'s parameters except those under ``exclude`` prefixes."""

    def __init__(self, module: torch.nn.Module, exclude: Sequence[str] = ("student.",)):
        self.module = module
        self.exclude = tuple(exclude)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in self.module.state_dict().items() if not k.startswith(self.exclude)}

    @sb_ckpt.mark_as_saver
    def save(self, path):
        torch.save(self.state_dict(), path)

    @sb_ckpt.mark_as_loader
    def load(self, path, end_of_epoch):
        del end_of_epoch
        state = torch.load(path, map_location="cpu", weights_only=True)
        result = self.module.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(self.exclude)]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{path}: does not fit {type(self.module).__name__} "
                                  f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")
