"""Learning curves: a cheap probe of a model at several points of its pretraining.

:func:`learning_curve` takes the student at several checkpoints (``(updates, model)``
pairs, e.g. the recipe's per-epoch snapshots plus the random initialisation at 0),
mean-pools every layer of every clip of a few corpus tasks, and fits a logistic
regression on the z-scored, concatenated layers (train split) scored on the test
split. It is a minute's work on 2 CPU cores for ``mert-tiny``, so a report can show
whether the features improve *during* pretraining, not only at the end; the MLP
probes of :func:`~mert_plugin.probe.run.run_probe` remain the reference numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..audio import load_audio
from ..corpus.tables import read_task_csv
from .features import ProbeError
from .mlp import feature_geometry


def pooled_layers(model, audio_root: Path, paths: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """[N, L+1, D] time-averaged hidden states of each whole clip (see :func:`pool_waveforms`)."""
    wavs = [load_audio(str(audio_root / rel), model.sample_rate) for rel in paths]
    return pool_waveforms(model, wavs, batch_size)


@torch.no_grad()
def pool_waveforms(model, wavs: Sequence[torch.Tensor], batch_size: int = 16) -> np.ndarray:
    """[N, L+1, D] time-averaged hidden states of each waveform [n_i].

    Clips of equal length share a batch (no padding, so each clip's result is the one it gets
    alone: conv 0's GroupNorm and the attention work per clip).
    """
    model.eval()
    out: List[np.ndarray] = [None] * len(wavs)
    by_length: Dict[int, List[int]] = {}
    for i, w in enumerate(wavs):
        by_length.setdefault(w.numel(), []).append(i)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            idx = group[start:start + batch_size]
            states = model(torch.stack([wavs[i] for i in idx])).hidden_states
            pooled = torch.stack([s.mean(1) for s in states], 1).float().numpy()  # [b, L+1, D]
            for j, i in enumerate(idx):
                out[i] = pooled[j]
    return np.stack(out)


def logistic_predict(x_train: np.ndarray, y_train: Sequence[str], x_test: np.ndarray, c: float = 0.1,
                     max_iter: int = 500) -> np.ndarray:
    """Test predictions ``[N_test]`` of a logistic regression on z-scored (training statistics),
    layer-concatenated features ``[N, L, D]`` (or ``[N, D]``)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    a = ((x_train - mean) / std).reshape(len(x_train), -1)
    b = ((x_test - mean) / std).reshape(len(x_test), -1)
    with warnings.catch_warnings():  # a few hundred clips x ~600 dims: lbfgs may stop at max_iter, harmlessly
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=max_iter).fit(a, list(y_train)).predict(b)


def logistic_score(x_train: np.ndarray, y_train: Sequence[str], x_test: np.ndarray, y_test: Sequence[str],
                   c: float = 0.1) -> float:
    """Test accuracy of a logistic regression on z-scored, layer-concatenated features [N, L, D]."""
    return float(np.mean(logistic_predict(x_train, y_train, x_test, c) == np.asarray(list(y_test))))


def learning_curve(models: Sequence[Tuple[int, object]], corpus_dir, tasks: Sequence[str] = ("pitch", "instrument"),
                   progress: bool = True) -> Dict:
    """Probe each ``(updates, model)`` on ``tasks`` of a corpus; returns
    ``{"updates": [...], "tasks": {task: [accuracy per model]}, "effective_rank": {task: [min over layers]}}``."""
    from ..progress import progress_bar

    corpus = Path(corpus_dir)
    if not models:
        raise ProbeError("learning_curve: no models given")
    tables = {}
    for task in tasks:
        csv_path = corpus / f"{task}.csv"
        if not csv_path.is_file():
            raise ProbeError(f"learning_curve: {csv_path} not found (task {task!r} is not in this corpus)")
        table = read_task_csv(csv_path, name=task)
        keep = [i for i, s in enumerate(table.splits) if s in ("train", "test")]
        # the audio is read once per task and serves every model
        sample_rate = models[0][1].sample_rate
        tables[task] = ([load_audio(str(corpus / table.paths[i]), sample_rate) for i in keep],
                        [table.labels[i][0] for i in keep], [table.splits[i] for i in keep])
    curve: Dict = {"updates": [int(u) for u, _ in models], "tasks": {t: [] for t in tasks},
                   "effective_rank": {t: [] for t in tasks}}
    for updates, model in progress_bar(models, desc="learning curve", unit="model", disable=not progress):
        for task, (wavs, labels, splits) in tables.items():
            x = pool_waveforms(model, wavs)
            train = np.array([s == "train" for s in splits])
            y = np.array(labels)
            curve["tasks"][task].append(logistic_score(x[train], y[train], x[~train], y[~train]))
            curve["effective_rank"][task].append(min(feature_geometry(x[train])["effective_rank"]))
    return curve


def plot_learning_curve(curve: Dict, path) -> Path:
    """Accuracy (and the smallest per-layer effective rank) against pretraining updates, one PNG."""
    from .report import _plt, _save

    plt = _plt()
    tasks = list(curve["tasks"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for task in tasks:
        axes[0].plot(curve["updates"], curve["tasks"][task], marker="o", label=task)
        axes[0].axhline(curve["tasks"][task][0], ls=":", lw=1, color=axes[0].lines[-1].get_color())
        axes[1].plot(curve["updates"], curve["effective_rank"][task], marker="o", label=task)
    axes[0].set(xlabel="pretraining updates", ylabel="test accuracy (logistic, all layers)",
                title="probe during pretraining (dotted: random init)")
    axes[1].set(xlabel="pretraining updates", ylabel="effective rank (smallest layer)",
                title="feature geometry (collapse -> 1)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    plt.close(fig)
    return path


def snapshots(folder, at_most: int = 0) -> List[Tuple[int, str]]:
    """``(updates, path)`` of the recipe's per-epoch snapshots (``epoch_NNN/snapshot.json``), in order.

    ``at_most`` > 0 keeps that many, evenly spread and always the last, so a longer run does not
    make its learning curve (one feature extraction of the corpus per snapshot) longer too."""
    import json

    found = []
    for snap in sorted(Path(folder).glob("epoch_*/snapshot.json")):
        found.append((int(json.loads(snap.read_text())["updates"]), str(snap.parent)))
    found.sort()
    if 0 < at_most < len(found):
        found = [found[(i + 1) * len(found) // at_most - 1] for i in range(at_most)]
    return found
