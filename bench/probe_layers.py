#!/usr/bin/env python3
"""Where in a model does pitch or instrument live? Logistic probes of the stem and every layer.

For each model (a ``save_pretrained`` folder, or ``random:SEED[:PRESET]`` for a preset at its random
initialisation, ``mert-tiny`` unless named; the demo's student is ``mert-small``) and each task of a ``mert-corpus`` folder, every clip is encoded whole and
mean-pooled at the convolutional stem's output (``conv_features``: before the feature projection,
not one of MERT's hidden states) and at every hidden state. A logistic regression is fitted on the
training split and scored on the test split, twice per point:

* **z-scored**, as ``bench/pretrain_learning.py`` and the demo's learning curve probe;
* **whitened** (PCA-whitened with training statistics), which undoes any linear mixing: a feature
  set whose one direction dominates every dimension (a low effective rank) but still carries the
  other directions scores higher here than z-scored.

Also printed per point: the effective rank and first-component share of the z-scored training
features (``mert_plugin.probe.mlp.feature_geometry``). docs/LEARNING.md 7.3 has the runs::

    python bench/probe_layers.py --corpus demo_output/corpus \\
        --model random:1234:mert-small demo_output/pretrain/export
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mert_plugin import MERTModel, load_audio  # noqa: E402
from mert_plugin.probe.curve import logistic_score  # noqa: E402
from mert_plugin.probe.mlp import feature_geometry  # noqa: E402


def load_model(spec: str) -> MERTModel:
    if spec.startswith("random:"):
        _, seed, *preset = spec.split(":")
        return MERTModel.from_preset(preset[0] if preset else "mert-tiny", seed=int(seed))
    return MERTModel.from_pretrained(spec)


@torch.no_grad()
def pooled_points(model: MERTModel, corpus: Path, paths) -> dict:
    """``{"stem": [N, C], "h0": [N, D], ...}``: time-averaged features of each whole clip."""
    model.eval()
    points: dict = {}
    for rel in paths:
        out = model(load_audio(str(corpus / rel), model.sample_rate)[None])
        for name, x in [("stem", out.conv_features)] + [(f"h{i}", h) for i, h in enumerate(out.hidden_states)]:
            points.setdefault(name, []).append(x.mean(1)[0].float().numpy())
    return {k: np.stack(v) for k, v in points.items()}


def whiten(train: np.ndarray, test: np.ndarray):
    """PCA-whiten both sets with the training mean and covariance (directions with a variance
    under 1e-8 of the largest are dropped)."""
    mean = train.mean(0)
    _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
    keep = s > s[0] * 1e-4
    proj = vt[keep].T / s[keep] * np.sqrt(len(train))
    return (train - mean) @ proj, (test - mean) @ proj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="a mert-corpus folder (pitch.csv, instrument.csv, ...)")
    ap.add_argument("--model", nargs="+", required=True, help="save_pretrained folders, or random:SEED[:PRESET]")
    ap.add_argument("--tasks", nargs="+", default=["pitch", "instrument"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = Path(args.corpus)
    for spec in args.model:
        model = load_model(spec)
        for task in args.tasks:
            with open(corpus / f"{task}.csv", newline="") as f:
                rows = [r for r in csv.DictReader(f) if r["split"] in ("train", "test")]
            points = pooled_points(model, corpus, [r["path"] for r in rows])
            train = np.array([r["split"] == "train" for r in rows])
            y = np.array([str(r["label"]) for r in rows])
            print(f"{spec} / {task} ({train.sum()} train, {(~train).sum()} test clips)")
            for name, x in points.items():
                z = logistic_score(x[train][:, None], y[train], x[~train][:, None], y[~train], c=1.0)
                a, b = whiten(x[train], x[~train])
                w = logistic_score(a[:, None], y[train], b[:, None], y[~train], c=1.0)
                geo = feature_geometry(x[train][:, None])
                print(f"  {name:<5} z-scored {z:.3f}  whitened {w:.3f}  effective rank "
                      f"{geo['effective_rank'][0]:5.1f}  first component {geo['pc1_share'][0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
