#!/usr/bin/env python3
"""Does pretraining teach ``mert-tiny`` music? A fast in-memory pretraining + probe loop.

Runs the project's ``MERTPretrainer`` on the training clips of a corpus (``mert-corpus build``)
held in memory, with the reference CQT as the musical target and optionally the ``cqt-kmeans``
teacher's codes, then probes the student (logistic regression on z-scored, mean-pooled layers,
train -> test split; effective rank of the pooled features) on pitch, instrument and the single notes'
instrument family (programs unseen, and heard: odd notes -> even notes) and the instrument task with
every GM program held out in turn, next to its own random initialisation. A setting costs minutes
instead of a full ``make demo``; the demo's MLP probes and five-criterion verdict remain the
reference (docs/LEARNING.md has the runs)::

    python bench/pretrain_learning.py --corpus CORPUS --updates 600 --cqt-target db-frame \\
        --feature-penalty 0 --feature-grad-mult 1.0 --out results/run.json

The CQT of every training clip is computed once and cached in ``CORPUS/.cache/bench_cqt.pt``.
"""
from __future__ import annotations

import argparse
import dataclasses
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mert_plugin import MERTModel, load_audio  # noqa: E402
from mert_plugin.objective import MERTPretrainer, ObjectiveConfig  # noqa: E402
from mert_plugin.probe.curve import logistic_score, pooled_layers  # noqa: E402
from mert_plugin.probe.mlp import feature_geometry  # noqa: E402
from mert_plugin.teachers import CQTKMeansTeacher, CQTTeacher  # noqa: E402

TASKS = ("pitch", "instrument")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="a mert-corpus folder (pitch.csv, instrument.csv, ...)")
    ap.add_argument("--updates", type=int, default=600)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=60, help="linear warm-up updates, then linear decay to 0")
    ap.add_argument("--batch", type=int, default=4, help="clips per batch")
    ap.add_argument("--crop", type=float, default=2.0, help="crop seconds (a batch is cut to its shortest clip)")
    ap.add_argument("--teacher", choices=["cqt-kmeans", "pitch-labels", "family-labels", "none"],
                    default="cqt-kmeans",
                    help="pitch-labels: a supervised ceiling, not pretraining (every frame's code is its clip's "
                         "MIDI pitch; trains on the pitch task's training clips only); family-labels: the same "
                         "for the instrument family (every frame's code is its clip's family; trains on the "
                         "pitch and instrument tasks' training clips, which play training programs only)")
    ap.add_argument("--clusters", type=int, default=128)
    ap.add_argument("--fit-files", type=int, default=0,
                    help="fit the k-means on this many evenly spread training clips (0: all; the recipe: 64)")
    ap.add_argument("--code-spectrum", nargs="+", choices=["db", "linear", "mfcc", "joint"], default=["db"],
                    help="cqt-kmeans features, one codebook each (e.g. 'linear db': pitch codes + timbre codes; "
                         "'mfcc': k-means over MFCC 1-19, a level-free spectral envelope, see mfcc_codes; "
                         "'joint': linear spectrum and MFCCs in one k-means, see joint_codes)")
    ap.add_argument("--codebook-weights", nargs="+", type=float, help="one CE weight per codebook (default: all 1)")
    ap.add_argument("--mfcc-target", type=float, default=0.0,
                    help="> 0: also regress each masked frame's standardised MFCCs 1-19 with a linear head on the "
                         "last layer, at this weight (ObjectiveConfig.mfcc_weight; LEARNING.md 7.6-7.7)")
    ap.add_argument("--level-weight", type=float, default=0.0,
                    help="> 0: also regress each masked frame's level within its crop (ObjectiveConfig.level_weight)")
    ap.add_argument("--envelope-weight", type=float, default=0.0,
                    help="> 0: also regress 8 statistics of each crop's level curve from the time-averaged last "
                         "layer (ObjectiveConfig.envelope_weight)")
    ap.add_argument("--envelope-dims", type=int, default=0,
                    help="the envelope head reads this many leading dimensions (0: all; ObjectiveConfig.envelope_dims)")
    ap.add_argument("--cqt-target", choices=["linear", "linear-frame", "db", "db-frame", "none"], default="db-frame")
    ap.add_argument("--feature-penalty", type=float, default=0.0, help="MERT: 10")
    ap.add_argument("--feature-grad-mult", type=float, default=1.0, help="MERT 95M: 0.1; 0 freezes the stem")
    ap.add_argument("--pred-nomask", type=float, default=0.0)
    ap.add_argument("--mixture", type=float, default=0.5, help="in-batch noise mixture probability")
    ap.add_argument("--probe-every", type=int, default=0, help="also probe every N updates")
    ap.add_argument("--preset", default="mert-tiny", help="the student's geometry (the demo's: mert-small)")
    ap.add_argument("--conv-dim", type=int, default=0, help="stem channels (0: the preset's)")
    ap.add_argument("--mask-prob", type=float, default=0.8)
    ap.add_argument("--pretrain-splits", nargs="+", choices=["train", "valid", "test"], default=["train"],
                    help="the splits whose clips pretraining hears (default: train; adding valid/test is a "
                         "diagnostic that leaks the probes' held-out audio into pretraining, LEARNING.md 7.10)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    ap.add_argument("--out", help="write the settings, losses and probe results here (JSON)")
    ap.add_argument("--save-model", help="save the trained student here (save_pretrained folder)")
    return ap.parse_args(argv)


def read_rows(corpus: Path, task: str):
    with open(corpus / f"{task}.csv", newline="") as f:
        return list(csv.DictReader(f))


def clip_cqts(corpus: Path, paths, cqt: CQTTeacher):
    """Linear CQT [T, 336] of every clip, cached (fp16) in CORPUS/.cache/bench_cqt.pt."""
    cache_path = corpus / ".cache" / "bench_cqt.pt"
    cache = torch.load(cache_path, weights_only=True) if cache_path.is_file() else {}
    missing = [p for p in paths if p not in cache]
    for p in missing:
        cache[p] = cqt(load_audio(str(corpus / p), 24000)[None])[0].half()
    if missing:
        from mert_plugin.atomic import atomic_path

        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_path) as tmp:
            torch.save(cache, tmp)
    return [cache[p].float() for p in paths]


def mfcc_codes(audio, frames, clusters: int, seed: int, silence_db: float = 50.0):
    """Timbre codes: k-means over each frame's MFCCs 1..19 (c0, the frame's level, left out;
    a gain changes only c0), 24 kHz, hop 320 (the student's grid), frames more than ``silence_db``
    below the clip's loudest frame set to zero. ``frames``: each clip's CQT frame count.
    Returns one [1, T] code tensor per clip."""
    return kmeans_codes(mfcc_frames(audio, frames, silence_db), clusters, seed)


def joint_codes(audio, cqts, clusters: int, seed: int, teacher: CQTKMeansTeacher):
    """Pitch-and-timbre codes: k-means over each frame's linear semitone spectrum (the recipe's
    pitch features) concatenated with its MFCCs 1..19, the MFCC block scaled to the spectrum block's
    total variance, so that one code names a pitch played with a timbre (LEARNING.md 7.6)."""
    spec = [teacher.features_from_cqt(c[None])[0] for c in cqts]
    mf = mfcc_frames(audio, [c.shape[0] for c in cqts])
    scale = (torch.cat(spec).var(0).sum() / torch.cat(mf).var(0).sum().clamp(min=1e-12)).sqrt()
    return kmeans_codes([torch.cat([a, scale * b], 1) for a, b in zip(spec, mf)], clusters, seed)


def kmeans_codes(feats, clusters: int, seed: int):
    """k-means over frames [T, D] of every clip (100k sampled) -> one [1, T] code tensor per clip."""
    from mert_plugin.teachers import kmeans, nearest

    flat = torch.cat(feats)
    sample = flat[torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed))[:100_000]]
    centroids = kmeans(sample, clusters, iters=20, seed=seed)
    return [nearest(x, centroids)[None] for x in feats]


def mfcc_frames(audio, frames, silence_db: float = 50.0):
    """Each clip's MFCCs 1..19 on the student's frame grid [T, 19] (the recipe's ``MFCCTarget``, whole
    clips; the last frame repeated where the clip gives fewer than T)."""
    from mert_plugin.teachers import MFCCTarget

    target = MFCCTarget(silence_db=silence_db)
    feats = []
    for wav, t in zip(audio, frames):
        m = target(wav[None])[0][:t]  # [T, 19]
        feats.append(torch.cat([m, m[-1:].expand(t - m.shape[0], -1)]) if m.shape[0] < t else m)
    return feats


def pretraining_paths(corpus: Path, tasks, splits) -> list:
    """The clips pretraining hears: every row of ``tasks`` whose split is in ``splits``, once each."""
    return sorted({r["path"] for t in tasks if (corpus / f"{t}.csv").is_file()
                   for r in read_rows(corpus, t) if r["split"] in splits})


def family_label_codes(corpus: Path, paths, frames) -> list:
    """The supervised family teacher: one ``[1, T]`` code tensor per clip, every frame coded with
    its clip's instrument family (the instrument task's label; a pitch clip's ``timbre`` column),
    families numbered in sorted order."""
    family = {r["path"]: r["timbre"] for r in read_rows(corpus, "pitch")}
    family.update({r["path"]: r["label"] for r in read_rows(corpus, "instrument")})
    names = sorted(set(family.values()))
    return [torch.full((1, t), names.index(family[p]), dtype=torch.long) for p, t in zip(paths, frames)]


def scores(x, y, fit, rank):
    """Logistic probes fitted on ``x[fit]`` and scored on ``x[~fit]``: per layer and all layers."""
    return {"layers": [logistic_score(x[fit][:, l:l + 1], y[fit], x[~fit][:, l:l + 1], y[~fit], c=1.0)
                       for l in range(x.shape[1])],
            "all_layers": logistic_score(x[fit], y[fit], x[~fit], y[~fit]), "effective_rank": rank}


def by_program(x, rows):
    """Every GM program the test instrument in turn (all splits; logistic probe on all layers;
    ``mert_plugin.probe.heldout``): ``{"accuracy": mean over programs, "per_program": {program: acc}}``."""
    from mert_plugin.probe.heldout import compare_by_group

    result = compare_by_group({"model": x}, [r["label"] for r in rows], np.array([int(r["program"]) for r in rows]))
    return {"accuracy": result["accuracy"]["model"], "per_program": result["per_group"]["model"]}


def probe(model, corpus: Path):
    out = {}
    for task in TASKS:
        rows = read_rows(corpus, task)
        # every program held out in turn needs the valid clips too; the split probes use train and test
        lopo = task == "instrument" and rows and all(r.get("program") for r in rows)
        if not lopo:
            rows = [r for r in rows if r["split"] in ("train", "test")]
        x = pooled_layers(model, corpus, [r["path"] for r in rows])
        if lopo:
            out["instrument-by-program"] = by_program(x, rows)
            kept = np.array([r["split"] in ("train", "test") for r in rows], dtype=bool)
            rows, x = [r for r, k in zip(rows, kept) if k], x[kept]
        train = np.array([r["split"] == "train" for r in rows])
        y = np.array([r["label"] for r in rows])
        rank = feature_geometry(x[train])["effective_rank"]
        out[task] = scores(x, y, train, rank)
        if task == "pitch":  # the same instruments on both sides: half of the training clips -> the other half
            xs, ys = x[train], y[train]
            out["pitch-seen"] = scores(xs, ys, np.random.default_rng(0).permutation(len(ys)) % 2 == 0, rank)
            if all(r.get("timbre") for r in rows):  # the notes' instrument family (NSynth-like; LEARNING.md 7.6)
                fam = np.array([r["timbre"] for r in rows])
                odd = np.array([int(r["label"]) % 2 == 1 for r in rows])[train]  # heard programs: odd -> even notes
                out["family-notes"] = scores(x, fam, train, rank)  # programs never heard: train -> test programs
                out["family-notes-seen"] = scores(xs, fam[train], odd, rank)
    return out


def show(name, result):
    for task, e in result.items():
        if task == "instrument-by-program":
            print(f"  {name:>8} {task}: mean over {len(e['per_program'])} held-out programs {e['accuracy']:.3f}",
                  flush=True)
            continue
        print(f"  {name:>8} {task:<10} per layer {' '.join(f'{a:.3f}' for a in e['layers'])}  all layers "
              f"{e['all_layers']:.3f}  rank {' '.join(f'{r:.1f}' for r in e['effective_rank'])}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = Path(args.corpus)
    tasks = {"pitch-labels": ("pitch",), "family-labels": ("pitch", "instrument")}.get(
        args.teacher, ("pitch", "instrument", "composer", "key"))
    paths = pretraining_paths(corpus, tasks, args.pretrain_splits)
    audio = [load_audio(str(corpus / p), 24000) for p in paths]
    minutes = sum(a.numel() for a in audio) / 24000 / 60
    print(f"{len(audio)} pretraining clips ({'/'.join(args.pretrain_splits)} splits), {minutes:.1f} min", flush=True)
    cqt_teacher = CQTTeacher()
    cqts = clip_cqts(corpus, paths, cqt_teacher)
    codes = None
    if args.teacher == "cqt-kmeans":
        fit = cqts if not args.fit_files else [cqts[round(i * len(cqts) / args.fit_files)]
                                                 for i in range(min(args.fit_files, len(cqts)))]
        books = []
        for spectrum in args.code_spectrum:  # one codebook per spectrum
            if spectrum == "mfcc":
                books.append(mfcc_codes(audio, [c.shape[0] for c in cqts], args.clusters, args.seed))
                continue
            if spectrum == "joint":
                lin = CQTKMeansTeacher(args.clusters, 1, seed=args.seed, cqt=cqt_teacher, spectrum="linear")
                books.append(joint_codes(audio, cqts, args.clusters, args.seed, lin))
                continue
            teacher = CQTKMeansTeacher(args.clusters, 1, seed=args.seed, cqt=cqt_teacher, spectrum=spectrum)
            teacher.fit_features(torch.cat([teacher.features_from_cqt(c[None])[0] for c in fit]))
            books.append([teacher.codes_from_cqt(c[None])[0] for c in cqts])  # [1, T] each
        codes = [torch.cat(per_clip, 0) for per_clip in zip(*books)]  # [K, T] each
    elif args.teacher == "pitch-labels":
        midi = {r["path"]: int(r["label"]) for r in read_rows(corpus, "pitch")}
        codes = [torch.full((1, c.shape[0]), midi[p], dtype=torch.long) for p, c in zip(paths, cqts)]
    elif args.teacher == "family-labels":
        codes = family_label_codes(corpus, paths, [c.shape[0] for c in cqts])
    top = max(int(c.max()) for c in codes) if codes and args.teacher != "cqt-kmeans" else -1
    if top >= args.clusters:
        sys.exit(f"error: --teacher {args.teacher} codes go up to {top}; --clusters {args.clusters} must be larger")

    torch.manual_seed(args.seed)
    student = MERTModel.from_preset(args.preset, seed=args.seed)
    if args.conv_dim:
        config = dataclasses.replace(student.config, conv_dim=[args.conv_dim] * len(student.config.conv_dim))
        torch.manual_seed(args.seed)
        student = MERTModel(config)
        student.reset_parameters()
    results = {"settings": vars(args), "random_init": probe(student, corpus), "log": [], "probes": {},
               "student": {"hidden_size": student.config.hidden_size,
                           "parameters": sum(p.numel() for p in student.parameters())}}
    show("random", results["random_init"])
    config = ObjectiveConfig(num_codebooks=codes[0].shape[0] if codes else 1, codebook_size=args.clusters, final_dim=32,
                             use_acoustic=codes is not None, use_cqt=args.cqt_target != "none",
                             cqt_target=args.cqt_target if args.cqt_target != "none" else "linear",
                             feature_penalty_weight=args.feature_penalty, feature_grad_mult=args.feature_grad_mult,
                             pred_nomask_weight=args.pred_nomask,
                             codebook_weights=tuple(args.codebook_weights) if args.codebook_weights else None,
                             level_weight=args.level_weight, mfcc_weight=args.mfcc_target,
                             envelope_weight=args.envelope_weight, envelope_dims=args.envelope_dims,
                             mixture_prob=args.mixture,
                             mask_prob=args.mask_prob)
    trainer = MERTPretrainer(student, config).train()
    params = list(trainer.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    crop, hop = int(args.crop * 24000) // 320 * 320, 320
    t0 = time.perf_counter()
    for step in range(1, args.updates + 1):
        scale = min(step / max(1, args.warmup), max(0.0, (args.updates - step) / max(1, args.updates - args.warmup)))
        for group in opt.param_groups:
            group["lr"] = args.lr * scale
        idx = torch.randint(len(audio), (args.batch,), generator=gen).tolist()
        n = min(crop, min(audio[i].numel() for i in idx) // hop * hop)
        frames = student.num_frames(n)
        starts = [hop * int(torch.randint(0, (audio[i].numel() - n) // hop + 1, (1,), generator=gen)) for i in idx]
        wav = torch.stack([audio[i][s:s + n] for i, s in zip(idx, starts)])
        cut = min(min(cqts[i].shape[0] - s // hop for i, s in zip(idx, starts)), frames)
        cqt = torch.stack([cqts[i][s // hop: s // hop + cut] for i, s in zip(idx, starts)])
        code = torch.stack([codes[i][:, s // hop: s // hop + cut] for i, s in zip(idx, starts)]) if codes else None
        out = trainer(wav, codes=code, cqt=cqt if config.use_cqt else None, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        results["log"].append({k: float(v) for k, v in out.terms.items() if not k[-1].isdigit()})
        if step % 100 == 0 or step == args.updates:
            recent = results["log"][-100:]
            means = {k: np.mean([r[k] for r in recent]) for k in ("loss", "acoustic_ce", "acoustic_acc", "cqt_mse", "level_mse", "mfcc_mse", "envelope_mse", "unmasked_acoustic_acc")
                     if k in recent[-1]}
            print(f"update {step} ({time.perf_counter() - t0:.0f} s) " + " ".join(f"{k} {v:.4g}" for k, v in means.items()),
                  flush=True)
        if args.probe_every and step % args.probe_every == 0 and step < args.updates:
            results["probes"][step] = probe(student, corpus)
            show(f"u{step}", results["probes"][step])
            trainer.train()
    if args.save_model:
        student.save_pretrained(args.save_model)
    results["probes"][args.updates] = probe(student, corpus)
    show("trained", results["probes"][args.updates])
    if args.out:
        from mert_plugin.atomic import atomic_write_json

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
