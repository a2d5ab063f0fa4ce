"""Offline label generation: ``mert-labels`` and :func:`generate_labels`.

For every audio file, the teachers' labels of the *whole file* are written to
``<out>/<relative name without extension>.codes.npy`` (int16 [K, T]) and
``.cqt.npy`` (float16 [T, 336]), T = the student's frames for the file. A
training recipe crops audio at a start that is a multiple of 320 samples and
takes labels from frame ``start // 320`` for as many frames as the student
produces.

Reliability:

* each output is written to a hidden temporary name and renamed into place,
  so a file is either complete or absent, whatever kills the process;
* a rerun skips files whose outputs exist (it never rewrites them) and finishes
  the rest; stale temporary files of a killed run are removed;
* a bad input (unreadable, empty, too short, non-finite, ...) is reported by
  name and the batch goes on; the exit status is 1 if any file failed;
* ``labels.json`` records which teacher made the labels; a run with a
  different teacher into the same folder is refused instead of mixing labels.

Sharding: ``--shard i/n`` or, under ``torchrun``, ``RANK`` / ``WORLD_SIZE``
(no process group is needed: shards are independent). The de-duplicated input
list is sorted by output name and shard i takes every n-th entry starting at
i, as ``mert-extract`` deals its shards: the split depends only on the names,
not on the order of the arguments, every rank sees the same list, and shards
differ by at most one file. Name clashes are settled in argument order first
(the first input keeps the name).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .atomic import atomic_save_npy, atomic_write_json, remove_stale_temporaries
from .audio import AUDIO_EXTENSIONS, find_audio_files, load_audio
from .errors import MERTError, run_cli
from .teachers import ACOUSTIC_KINDS, FITTABLE_KINDS, LabelGenerator

logger = logging.getLogger(__name__)

META_FILE = "labels.json"
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Summary:
    """Outcome of one :func:`generate_labels` call (this shard only)."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (input, reason)

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        return (f"{self.total} files: {self.done} labelled, {self.skipped} skipped (already done), "
                f"{len(self.failed)} failed")


# ------------------------------------------------------------------ naming
def label_paths(label_dir: str, relative_name: str) -> Tuple[str, str]:
    """-> (codes_path, cqt_path): ``label_dir/<relative_name without extension>.codes.npy`` / ``.cqt.npy``.

    Only an audio extension (:data:`~mert_plugin.audio.AUDIO_EXTENSIONS`) is removed, so ids
    with dots (``take.2``) keep their full name.
    """
    stem, ext = os.path.splitext(relative_name)
    if ext.lower() not in AUDIO_EXTENSIONS:
        stem = relative_name
    base = os.path.join(label_dir, stem)
    return base + ".codes.npy", base + ".cqt.npy"


def _unsafe_name(relative_name: str) -> Optional[str]:
    norm = os.path.normpath(relative_name)
    if os.path.isabs(relative_name) or norm == "." or norm.startswith(".." + os.sep) or norm == "..":
        return f"relative name {relative_name!r} would write outside the output folder"
    return None


# ---------------------------------------------------------------- sharding
def parse_shard(text: str) -> Tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise MERTError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise MERTError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard_from_env() -> Tuple[int, int]:
    """This process's shard: torch.distributed if initialised, else ``RANK``/``WORLD_SIZE`` (torchrun), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise MERTError("RANK / WORLD_SIZE must be integers") from None
    if not 0 <= rank < world:
        raise MERTError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


# ------------------------------------------------------------------ writing
def _complete(path: str) -> bool:
    """True if ``path`` is a readable .npy file (header check only)."""
    try:
        np.load(path, mmap_mode="r")
        return True
    except (OSError, ValueError):
        return False


def _check_meta(out_dir: str, generator: LabelGenerator) -> None:
    """Refuse to mix labels of different teachers in one folder; record the teacher otherwise."""
    path = os.path.join(out_dir, META_FILE)
    mine = generator.describe()
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                theirs = json.load(f)
        except (OSError, ValueError) as exc:
            raise MERTError(f"{path}: unreadable label metadata ({exc}); remove it or use another folder") from None
        keys = [k for k in mine if k != "cqt"] + [k for k in theirs if k not in mine]
        clash = [k for k in keys if mine.get(k) != theirs.get(k)]
        if mine["cqt"] and theirs.get("cqt") and mine["cqt"] != theirs["cqt"]:
            clash.append("cqt")
        if clash:
            raise MERTError(f"{out_dir} holds labels of another teacher (differs in {', '.join(clash)}): "
                            f"{theirs} vs {mine}; use another output folder")
        if not (mine["cqt"] and not theirs.get("cqt")):
            return
    atomic_write_json(path, mine)


# ------------------------------------------------------------------ labels
def _resolve_inputs(inputs) -> List[Tuple[str, Optional[str], Optional[str]]]:
    """-> [(path, relative_name, reason it cannot be labelled or None)], de-duplicated, in input order."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if items and all(isinstance(x, (tuple, list)) and len(x) == 2 for x in items):
        return [(os.fspath(p), r, "no relative name given" if not r else _unsafe_name(os.fspath(r))) for p, r in items]
    out, seen = [], set()
    for item in map(os.fspath, items):
        found = find_audio_files([item])
        if not found:
            out.append((item, None, "folder holds no audio files" if os.path.isdir(item) else "no audio file matched"))
        for path, rel in found:
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                out.append((path, rel, "no such file" if rel is None else _unsafe_name(rel)))
    return out


def generate_labels(inputs: Union[Sequence[str], Sequence[Tuple[str, str]]], out_dir: str,
                    generator: LabelGenerator, shard: Tuple[int, int] = (0, 1), write_cqt: bool = True,
                    progress: bool = True, max_seconds: Optional[float] = None) -> Summary:
    """Label every file of this shard; see the module docstring for the guarantees.

    Args:
        inputs: files, folders (recursive) and globs, or explicit ``(path, relative_name)`` pairs.
        out_dir: output folder (created).
        generator: the teachers (:meth:`LabelGenerator.from_spec`), on any device.
        shard: (i, n): this call handles files i, i+n, i+2n, ... of the list sorted by output name.
        write_cqt: also write CQT targets (needs a generator with the CQT teacher).
        progress: show a tqdm progress bar.
        max_seconds: fail (by name) files longer than this instead of labelling them; EnCodec
            encodes whole files and needs about 12 MB of memory per second of audio.
    Returns:
        :class:`Summary` for this shard.
    """
    from .progress import progress_bar

    rank, world = shard
    if not (world >= 1 and 0 <= rank < world):
        raise MERTError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    if write_cqt and generator.cqt is None:
        raise MERTError("write_cqt=True needs a LabelGenerator with the CQT teacher (use_cqt=True)")
    if generator.acoustic is None and not write_cqt:
        raise MERTError("nothing to write: the generator has no acoustic teacher and write_cqt=False")
    if not generator.ready:
        raise MERTError(f"the {generator.acoustic_kind!r} teacher is not fitted: fit it or load its teacher state")
    os.makedirs(out_dir, exist_ok=True)
    _check_meta(out_dir, generator)

    # Name clashes are settled on the whole list, so every shard agrees on them.
    summary = Summary()
    jobs, owner = [], {}
    for path, rel, reason in _resolve_inputs(inputs):
        if reason is None:
            key = os.path.normcase(os.path.normpath(label_paths("", rel)[0]))
            if key in owner:
                reason = f"same output name as {owner[key]}"
            else:
                owner[key] = path
        jobs.append((path, rel, reason))
    # Dealt in output-name order (inputs without a name by their path, after the named ones).
    jobs.sort(key=lambda job: (job[1] is None, label_paths("", job[1])[0] if job[1] is not None else job[0], job[0]))
    mine = jobs[rank::world]
    summary.total = len(mine)
    device = next(iter(generator.buffers()), torch.zeros(())).device
    bar = progress_bar(mine, disable=not progress, unit="file",
                       desc=f"labels {rank}/{world}" if world > 1 else "labels", file=sys.stderr)
    for path, rel, reason in bar:
        if reason is None:
            codes_path, cqt_path = label_paths(out_dir, rel)
            wanted = [p for p, on in ((codes_path, generator.acoustic is not None), (cqt_path, write_cqt)) if on]
            missing = [p for p in wanted if not (os.path.exists(p) and _complete(p))]
            if not missing:
                summary.skipped += 1
                continue
            try:
                _label_one(path, generator, device, missing, codes_path, cqt_path, max_seconds)
                summary.done += 1
                continue
            except MERTError as exc:
                reason = str(exc)
            except Exception as exc:  # one broken file must not stop the batch
                logger.debug("labelling %s failed", path, exc_info=True)
                reason = f"{type(exc).__name__}: {exc}"
        if not reason.startswith(path):
            reason = f"{path}: {reason}"
        summary.failed.append((path, reason))
        bar.write(f"failed: {reason}", file=sys.stderr)
    bar.close()
    return summary


def _label_one(path: str, generator: LabelGenerator, device, missing: List[str], codes_path: str,
               cqt_path: str, max_seconds: Optional[float]) -> None:
    wav = load_audio(path, generator.sample_rate)
    seconds = wav.numel() / generator.sample_rate
    if max_seconds is not None and seconds > max_seconds:
        raise MERTError(f"{path}: {seconds:.1f} s is longer than the {max_seconds:g} s limit (--max-seconds)")
    codes, cqt = generator(wav.to(device)[None])
    os.makedirs(os.path.dirname(codes_path) or ".", exist_ok=True)
    # CQT first: the codes file doubles as the "finished" mark in file listings.
    if cqt_path in missing:
        arr = cqt[0].float().clamp(max=FLOAT16_MAX).cpu().numpy().astype(np.float16)
        remove_stale_temporaries(cqt_path)
        atomic_save_npy(cqt_path, arr)
    if codes_path in missing:
        arr = codes[0].cpu().numpy()
        if arr.size and int(arr.max()) > np.iinfo(np.int16).max:
            raise MERTError(f"codes up to {int(arr.max())} do not fit int16")
        remove_stale_temporaries(codes_path)
        atomic_save_npy(codes_path, arr.astype(np.int16))


# --------------------------------------------------------------------- CLI
def _iter_fit_audio(files: Iterable[Tuple[str, Optional[str]]], sample_rate: int, limit: int):
    used = 0
    for path, rel in files:
        if used >= limit:
            return
        if rel is None:
            continue
        try:
            wav = load_audio(path, sample_rate)
        except MERTError as exc:
            print(f"fit: skipping {exc}", file=sys.stderr)
            continue
        used += 1
        yield wav


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mert-labels",
        description="Write MERT teacher labels (EnCodec codes as int16 [K, T], CQT as float16 [T, 336]) for "
                    "audio files. Resumable: rerun the same command to finish an interrupted job.")
    p.add_argument("inputs", nargs="+", help="audio files, folders (recursive) or glob patterns")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--teacher", choices=ACOUSTIC_KINDS, default="encodec",
                   help="acoustic teacher: official EnCodec (default), 'fitted' (demo/test only: k-means on a "
                        "random EnCodec encoder), 'mfcc-kmeans' (MERT-v0 style, 16 kHz), 'cqt-kmeans' (k-means over a "
                        "level-free semitone CQT, 24 kHz) or 'none'")
    p.add_argument("--encodec-checkpoint", help="path to encodec_24khz-d7cc33bc.th or its folder "
                                                "(default: torch.hub cache)")
    p.add_argument("--teacher-state", help="state file of a 'fitted' / 'mfcc-kmeans' / 'cqt-kmeans' teacher")
    p.add_argument("--fit", action="store_true", help="fit the teacher on the inputs if --teacher-state does "
                                                      "not exist yet, and save it there (single process only)")
    p.add_argument("--fit-max-files", type=int, default=200, help="files used by --fit (default 200)")
    p.add_argument("--num-clusters", type=int, help="codes per codebook of the k-means teachers "
                                                   "(default: 500 mfcc-kmeans, 128 cqt-kmeans)")
    p.add_argument("--num-codebooks", type=int, default=1, help="codebooks of the cqt-kmeans teacher (default 1)")
    p.add_argument("--cqt-spectrum", choices=("db", "linear"), default="db",
                   help="cqt-kmeans features: each frame's semitone spectrum in dB (default) or linear, re its peak")
    p.add_argument("--seed", type=int, default=0, help="seed of the fitted teacher")
    p.add_argument("--no-cqt", action="store_true", help="write codes only")
    p.add_argument("--max-seconds", type=float, help="report files longer than this as failed instead of "
                                                     "labelling them (EnCodec needs ~12 MB per second of audio)")
    p.add_argument("--shard", help="i/n: handle every n-th file starting at i (default: RANK/WORLD_SIZE, else 0/1)")
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK when CUDA is available, else cpu)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    shard = parse_shard(args.shard) if args.shard else shard_from_env()
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    needs_state = args.teacher in FITTABLE_KINDS
    if needs_state and not args.teacher_state:
        raise MERTError(f"--teacher {args.teacher} needs --teacher-state (add --fit to create it)")
    if args.teacher_state and not needs_state:
        raise MERTError(f"--teacher-state applies to --teacher {' / '.join(FITTABLE_KINDS)}, not {args.teacher}")
    generator = LabelGenerator.from_spec(args.teacher, encodec_checkpoint=args.encodec_checkpoint,
                                         use_cqt=not args.no_cqt, teacher_state=args.teacher_state,
                                         seed=args.seed, num_clusters=args.num_clusters,
                                         num_codebooks=args.num_codebooks, cqt_spectrum=args.cqt_spectrum)
    if needs_state and not generator.ready:
        if not args.fit:
            raise MERTError(f"{args.teacher_state}: no such teacher state; run once with --fit to create it")
        if shard[1] > 1:
            raise MERTError("--fit must run in a single process: fit first without sharding, then label")
        generator.fit(_iter_fit_audio(find_audio_files(args.inputs), generator.sample_rate, args.fit_max_files))
        generator.save_state(args.teacher_state)
        print(f"saved teacher state to {args.teacher_state}", file=sys.stderr)
    generator.to(device)
    # Under torchrun only rank 0 draws a bar; explicit --shard runs each draw their own.
    progress = not args.quiet and (bool(args.shard) or shard[0] == 0)
    summary = generate_labels(args.inputs, args.output, generator, shard=shard, write_cqt=not args.no_cqt,
                              progress=progress, max_seconds=args.max_seconds)
    prefix = f"shard {shard[0]}/{shard[1]}: " if shard[1] > 1 else ""
    print(f"{prefix}{summary}", file=sys.stderr)
    return 0 if summary.ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), interrupted="interrupted: rerun the same command to finish")


if __name__ == "__main__":
    sys.exit(main())
