"""MARBLE-style MLP probes, trained for every layer at once.

One probe = [optional softmax-weighted layer sum] -> Linear(D, 512) -> ReLU ->
Dropout(0.2) -> Linear(512, C), Adam (lr 1e-3, no weight decay), batch 64,
ReduceLROnPlateau (x0.5 after 3 epochs without progress), early stopping on the
validation metric (patience 10), at most 100 epochs (MERT_SPEC.md section 6.1).

Speed: the L single-layer probes and the weighted-sum probe of one seed are stacked
into ``P = L + 1`` independent MLPs whose weights are ``[P, ...]`` tensors, trained
together with batched matmuls on the same mini-batches. Adam is element-wise and the
summed loss gives each probe exactly its own gradient, so this equals training them
one by one; each probe is its own Adam parameter group, so the plateau schedule and
early stopping stay per probe too, and stopped probes drop out of the computation.

Shapes: N = clips, L = layers, D = feature size, C = classes, P = probes, B = batch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .features import ProbeError


@dataclass
class ProbeConfig:
    hidden: int = 512
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 100
    patience: int = 10       # early stopping: epochs without a better validation score
    lr_patience: int = 3     # ReduceLROnPlateau patience
    lr_factor: float = 0.5
    standardize: bool = True  # z-score each layer with train statistics (see docs)
    # Learning-rate multiplier for the softmax layer weights. 1 = MARBLE. With few
    # training steps (small corpora) the weights then stay close to a plain layer average;
    # a larger value lets them find the informative layers sooner.
    layer_lr_scale: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


class StackedProbes(nn.Module):
    """``P`` independent MLP probes run as one batched MLP. Probe ``p < L`` reads layer
    ``p``; with ``weighted`` the last probe reads ``sum_l softmax(w)_l * x[:, l]`` with
    learnable ``w`` (all zero at the start, i.e. a plain average, as in MARBLE).

    Each probe has its own parameter tensors (``probe_params(p)``), stacked at every
    forward pass, so that an optimiser can give each probe its own parameter group
    (learning rate) and a probe left out of the forward pass gets no gradient at all."""

    def __init__(self, num_layers: int, dim: int, num_classes: int, hidden: int, dropout: float,
                 weighted: bool, generator: torch.Generator):
        super().__init__()
        self.num_layers, self.weighted, self.dropout = num_layers, weighted, dropout
        num_probes = num_layers + int(weighted)

        def uniform(*shape, fan_in):  # nn.Linear's default init, drawn from our generator
            return nn.Parameter((torch.rand(*shape, generator=generator) * 2 - 1) / math.sqrt(fan_in))

        self.w1 = nn.ParameterList([uniform(dim, hidden, fan_in=dim) for _ in range(num_probes)])
        self.b1 = nn.ParameterList([uniform(hidden, fan_in=dim) for _ in range(num_probes)])
        self.w2 = nn.ParameterList([uniform(hidden, num_classes, fan_in=hidden) for _ in range(num_probes)])
        self.b2 = nn.ParameterList([uniform(num_classes, fan_in=hidden) for _ in range(num_probes)])
        self.layer_logits = nn.Parameter(torch.zeros(num_layers)) if weighted else None

    @property
    def num_probes(self) -> int:
        return len(self.w1)

    def probe_params(self, p: int) -> List[nn.Parameter]:
        extra = [self.layer_logits] if self.weighted and p == self.num_probes - 1 else []
        return [self.w1[p], self.b1[p], self.w2[p], self.b2[p]] + extra

    def layer_weights(self) -> Optional[Tensor]:
        return torch.softmax(self.layer_logits, 0) if self.weighted else None

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None,
                active: Optional[Sequence[int]] = None) -> Tensor:
        """``[B, L, D] -> logits [P', B, C]`` for the probes in ``active`` (sorted indices,
        default all). Dropout is applied when ``generator`` is given (training), drawn from
        it so that runs are reproducible."""
        active = list(range(self.num_probes)) if active is None else list(active)
        singles = [p for p in active if p < self.num_layers]
        inputs = [x.transpose(0, 1)[singles]] if singles else []  # [L', B, D]: probe l reads layer l
        if len(singles) < len(active):  # the weighted-sum probe is active
            inputs.append(torch.einsum("l,bld->bd", self.layer_weights(), x)[None])
        inp = torch.cat(inputs, dim=0)  # [P', B, D]

        def stack(params):
            return torch.stack([params[p] for p in active])

        h = torch.relu(torch.baddbmm(stack(self.b1)[:, None], inp, stack(self.w1)))
        if generator is not None and self.dropout > 0:
            keep = torch.rand(h.shape, generator=generator) >= self.dropout
            h = h * keep / (1.0 - self.dropout)
        return torch.baddbmm(stack(self.b2)[:, None], h, stack(self.w2))


# --------------------------------------------------------------------------- metrics

def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """``[P, N, C], [N] -> [P]``"""
    return (logits.argmax(-1) == y[None]).float().mean(1)


def macro_roc_auc(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Macro ROC-AUC over classes that have both positives and negatives.
    ``scores [P, N, C], y {0,1} [N, C] -> [P]``. Uses the rank-sum (Mann-Whitney) form with
    averaged ranks for ties, i.e. the same value as ``sklearn.metrics.roc_auc_score``."""
    from scipy.stats import rankdata

    pos = y.sum(0)
    valid = (pos > 0) & (pos < len(y))
    if not valid.any():
        return np.full(scores.shape[0], np.nan)
    ranks = rankdata(scores[:, :, valid], axis=1)  # [P, N, C']
    yv = y[:, valid].astype(bool)
    n_pos, n_neg = pos[valid], len(y) - pos[valid]
    rank_sum = (ranks * yv[None]).sum(1)  # [P, C']
    auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return auc.mean(1)


def macro_average_precision(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[P, N, C], [N, C] -> [P]`` (sklearn, macro over classes with a positive)."""
    from sklearn.metrics import average_precision_score

    keep = y.sum(0) > 0
    return np.array([average_precision_score(y[:, keep], s[:, keep], average="macro") for s in scores])


# --------------------------------------------------------------------------- training

def _standardize(x_train: np.ndarray, *others: np.ndarray):
    """z-score every layer and dimension with train statistics (layers of a transformer
    differ in scale by orders of magnitude; Adam then sees comparable inputs)."""
    mu = x_train.mean(0, keepdims=True)
    sd = x_train.std(0, keepdims=True) + 1e-5
    return [(a - mu) / sd for a in (x_train,) + others]


def feature_geometry(x_train: np.ndarray) -> Dict[str, List[float]]:
    """How spread out the pooled training features are, per layer: ``x_train [N, L, D]`` ->
    ``{"effective_rank": [L], "pc1_share": [L]}`` on z-scored features.

    ``effective_rank`` is exp(entropy) of the normalised PCA spectrum (1 = all clips on one
    line, up to min(N, D)); ``pc1_share`` is the variance fraction of the first component.
    A collapsed representation (one nuisance factor such as loudness dominating every
    dimension) shows up here even when probe scores look plausible.
    """
    ranks, shares = [], []
    z_all = _standardize(np.asarray(x_train, dtype=np.float64))[0]
    for layer in range(x_train.shape[1]):
        var = np.linalg.svd(z_all[:, layer], compute_uv=False) ** 2
        total = var.sum()
        if total <= 0:  # constant features
            ranks.append(0.0), shares.append(1.0)
            continue
        p = var / total
        p = p[p > 0]
        ranks.append(float(np.exp(-(p * np.log(p)).sum())))
        shares.append(float(var[0] / total))
    return {"effective_rank": ranks, "pc1_share": shares}


def _predict(model: StackedProbes, x: Tensor, chunk: int = 1024) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)], dim=1)


def _loss(logits: Tensor, y: Tensor, multilabel: bool) -> Tensor:
    """Per-probe mean loss ``[P]`` (cross-entropy, or BCE for multi-label)."""
    p, b, c = logits.shape
    if multilabel:
        return nn.functional.binary_cross_entropy_with_logits(
            logits, y[None].expand(p, -1, -1), reduction="none").mean((1, 2))
    return nn.functional.cross_entropy(logits.reshape(p * b, c), y.repeat(p), reduction="none").view(p, b).mean(1)


def _score(logits: Tensor, y: Tensor, multilabel: bool) -> Tensor:
    if multilabel:
        return torch.from_numpy(macro_roc_auc(torch.sigmoid(logits).numpy(), y.numpy())).float()
    return accuracy(logits, y)


@dataclass
class SeedRun:
    """One seed's probes. Arrays are over probes: ``[L]`` single layers, then the weighted sum."""

    valid: np.ndarray          # primary metric on the validation split at the chosen epoch
    test: np.ndarray           # primary metric on the test split
    test_ap: Optional[np.ndarray]  # macro AP (multi-label only)
    best_epoch: np.ndarray
    epochs_run: int
    layer_weights: Optional[np.ndarray]  # [L] softmax weights of the weighted-sum probe
    # The reported probe's (weighted sum, else the only layer) test outputs: predicted class
    # [N_test], or tag probabilities [N_test, C] for multi-label (for paired comparisons).
    test_outputs: Optional[np.ndarray] = None


def train_probes(x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray,
                 x_test: np.ndarray, y_test: np.ndarray, *, num_classes: int, multilabel: bool, seed: int,
                 config: ProbeConfig = ProbeConfig()) -> SeedRun:
    """Train one probe per layer (and a weighted-sum probe when L > 1) for one seed.

    ``x_*``: ``[N, L, D]`` pooled features; ``y_*``: class indices ``[N]`` or, for
    multi-label, a 0/1 matrix ``[N, C]``. Each probe keeps the parameters of its best
    validation epoch (the first one reaching its best score) and is scored on test.
    """
    for name, x in (("train", x_train), ("valid", x_valid), ("test", x_test)):
        if len(x) == 0:
            raise ProbeError(f"the {name} split is empty (need train, valid and test clips)")
    if multilabel and not np.any((y_valid.sum(0) > 0) & (y_valid.sum(0) < len(y_valid))):
        raise ProbeError("no tag has both positive and negative clips in the valid split: "
                         "ROC-AUC, the early-stopping metric, is undefined")
    if config.standardize:
        x_train, x_valid, x_test = _standardize(x_train, x_valid, x_test)
    g = torch.Generator().manual_seed(int(seed))
    xt, xv, xs = (torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32) for a in (x_train, x_valid, x_test))
    ydt = torch.float32 if multilabel else torch.long
    yt, yv, ys = (torch.as_tensor(a, dtype=ydt) for a in (y_train, y_valid, y_test))
    n, num_layers, dim = xt.shape
    model = StackedProbes(num_layers, dim, num_classes, config.hidden, config.dropout,
                          weighted=num_layers > 1, generator=g)
    p = model.num_probes
    # One parameter group per probe: its own learning rate (plateau schedule), and the
    # probes left out of the forward pass have no gradient, so Adam skips them. The layer
    # weights get a last group of their own (learning rate x layer_lr_scale).
    groups = [{"params": [q for q in model.probe_params(i) if q is not model.layer_logits]} for i in range(p)]
    if model.weighted:
        groups.append({"params": [model.layer_logits], "lr": config.lr * config.layer_lr_scale})
    opt = torch.optim.Adam(groups, lr=config.lr, weight_decay=0.0)
    names = {id(q): k for k, q in model.named_parameters()}
    best_score = torch.full((p,), -math.inf)
    best_epoch = torch.zeros(p, dtype=torch.long)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bad, lr_bad = torch.zeros(p, dtype=torch.long), torch.zeros(p, dtype=torch.long)
    stopped = torch.zeros(p, dtype=torch.bool)
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        perm = torch.randperm(n, generator=g)
        active = [i for i in range(p) if not stopped[i]]
        for i in range(0, n, config.batch_size):
            idx = perm[i:i + config.batch_size]
            opt.zero_grad(set_to_none=True)
            _loss(model(xt[idx], g, active), yt[idx], multilabel).sum().backward()
            opt.step()
        score = _score(_predict(model, xv), yv, multilabel)
        # Strictly better validation metric only, as MARBLE monitors it: a probe whose
        # accuracy saturates stops instead of chasing an ever smaller loss.
        better = (score > best_score + 1e-9) & ~stopped
        for i in torch.nonzero(better).flatten().tolist():
            best_score[i], best_epoch[i] = score[i], epoch
            for prm in model.probe_params(i):
                best_state[names[id(prm)]] = prm.detach().clone()
        bad = torch.where(better, 0, bad + 1)
        lr_bad = torch.where(better, 0, lr_bad + 1)
        for i in torch.nonzero(lr_bad > config.lr_patience).flatten().tolist():
            opt.param_groups[i]["lr"] *= config.lr_factor  # ReduceLROnPlateau, per probe
            if model.weighted and i == p - 1:
                opt.param_groups[p]["lr"] *= config.lr_factor
            lr_bad[i] = 0
        stopped |= bad >= config.patience
        if stopped.all():
            break
    model.load_state_dict(best_state)
    logits = _predict(model, xs)
    test = _score(logits, ys, multilabel).numpy()
    test_ap = macro_average_precision(torch.sigmoid(logits).numpy(), ys.numpy()) if multilabel else None
    lw = model.layer_weights()
    head = logits[-1]  # the weighted-sum probe is the last one; with L == 1 the only one
    outputs = torch.sigmoid(head).numpy() if multilabel else head.argmax(-1).numpy()
    return SeedRun(valid=best_score.numpy(), test=test, test_ap=test_ap, best_epoch=best_epoch.numpy(),
                   epochs_run=epoch, layer_weights=None if lw is None else lw.detach().numpy(),
                   test_outputs=outputs)


# --------------------------------------------------------------------------- several seeds

def encode_labels(labels: Sequence[Sequence[str]], classes: Sequence[str], multilabel: bool) -> np.ndarray:
    """Tags -> class indices ``[N]`` or a 0/1 matrix ``[N, C]``."""
    index = {c: i for i, c in enumerate(classes)}
    if multilabel:
        y = np.zeros((len(labels), len(classes)), dtype=np.float32)
        for i, tags in enumerate(labels):
            y[i, [index[t] for t in tags]] = 1.0
        return y
    return np.array([index[tags[0]] for tags in labels], dtype=np.int64)


def probe_feature_set(x: np.ndarray, y: np.ndarray, splits: Sequence[str], *, num_classes: int,
                      multilabel: bool, seeds: Sequence[int] = (0, 1, 2),
                      config: ProbeConfig = ProbeConfig()) -> Dict[str, object]:
    """Probe every layer of one feature set ``x [N, L, D]`` with several seeds.

    Returns a JSON-ready summary: ``score``/``std`` (the weighted-sum probe, or the single
    layer when L == 1; mean and std over seeds), ``per_layer``/``per_layer_std``,
    ``best_layer`` (chosen on the *validation* mean, then reported on test),
    ``layer_weights`` (mean softmax weights), per-seed ``runs``, the training features'
    ``geometry`` (:func:`feature_geometry`), for multi-label AP, and ``test_outputs``: every
    seed's test outputs of the reported probe, ``[S][N_test]`` predicted classes or
    ``[S][N_test][C]`` tag probabilities, in the order of the test clips in ``x`` (what a paired
    comparison of two feature sets needs, :mod:`.compare`; ``run_probe`` drops them from its report).
    """
    splits = np.asarray(splits)
    parts = {s: np.flatnonzero(splits == s) for s in ("train", "valid", "test")}
    runs: List[SeedRun] = []
    for seed in seeds:
        runs.append(train_probes(x[parts["train"]], y[parts["train"]], x[parts["valid"]], y[parts["valid"]],
                                 x[parts["test"]], y[parts["test"]], num_classes=num_classes,
                                 multilabel=multilabel, seed=seed, config=config))
    num_layers = x.shape[1]
    test = np.stack([r.test for r in runs])      # [S, P]
    valid = np.stack([r.valid for r in runs])    # [S, P]
    head = num_layers if num_layers > 1 else 0   # index of the weighted-sum probe, else the only layer
    best = int(np.argmax(valid[:, :num_layers].mean(0)))
    out: Dict[str, object] = {
        "metric": "roc_auc" if multilabel else "accuracy",
        "mode": "weighted_sum" if num_layers > 1 else "single_layer",
        "score": float(test[:, head].mean()), "std": float(test[:, head].std()),
        "runs": [float(v) for v in test[:, head]],
        "per_layer": [float(v) for v in test[:, :num_layers].mean(0)],
        "per_layer_std": [float(v) for v in test[:, :num_layers].std(0)],
        "per_layer_valid": [float(v) for v in valid[:, :num_layers].mean(0)],
        "best_layer": best, "best_layer_score": float(test[:, best].mean()),
        "best_layer_std": float(test[:, best].std()),
        "best_epochs": [[int(e) for e in r.best_epoch] for r in runs],
        "seeds": [int(s) for s in seeds],
        "geometry": feature_geometry(x[parts["train"]]),
        "test_outputs": [r.test_outputs.tolist() for r in runs],
    }
    if num_layers > 1:
        out["layer_weights"] = [float(v) for v in np.mean([r.layer_weights for r in runs], axis=0)]
    if multilabel:
        ap = np.stack([r.test_ap for r in runs])
        out["ap"], out["ap_std"] = float(ap[:, head].mean()), float(ap[:, head].std())
        out["per_layer_ap"] = [float(v) for v in ap[:, :num_layers].mean(0)]
    return out


def pool_draws(draws: Sequence[Mapping[str, object]]) -> Dict[str, object]:
    """One summary for several independent draws of a model, e.g. random initialisations with
    different seeds, each probed by :func:`probe_feature_set` with the same probe seeds.

    A single draw of an untrained model is one sample of "random init": its probe score moves
    with the model seed by more than with the probe seed (docs/LEARNING.md 7.8), so a comparison
    with one draw can flip either way. Pooled, every (draw, probe seed) run counts as one run:
    ``score`` is the mean over all runs and ``std`` their std, so the std (and hence the seed
    spread of :mod:`.compare`) holds the draw-to-draw spread too; ``test_outputs`` are all
    runs' outputs (``[D * S, N_test]``). Per layer: the mean and the pooled std (the law of total
    variance over the draws' means and stds); ``geometry``: the per-layer mean over the draws.
    ``draw_scores`` / ``draw_stds`` keep each draw's own figures. One draw is returned as it is.
    """
    if not draws:
        raise ProbeError("pool_draws: no draws")
    if len(draws) == 1:
        return dict(draws[0])
    modes = {d["mode"] for d in draws}
    if len(modes) > 1 or len({len(d["per_layer"]) for d in draws}) > 1:
        raise ProbeError("pool_draws: the draws have different layer counts; they are not draws of one model")

    def total_std(means, stds) -> np.ndarray:
        means, stds = np.asarray(means, dtype=np.float64), np.asarray(stds, dtype=np.float64)
        return np.sqrt((stds ** 2).mean(0) + means.var(0))

    first = draws[0]
    runs = [v for d in draws for v in d["runs"]]
    per_layer = np.mean([d["per_layer"] for d in draws], axis=0)
    per_layer_std = total_std([d["per_layer"] for d in draws], [d["per_layer_std"] for d in draws])
    per_layer_valid = np.mean([d["per_layer_valid"] for d in draws], axis=0)
    best = int(np.argmax(per_layer_valid))
    out: Dict[str, object] = {
        "metric": first["metric"], "mode": first["mode"],
        "score": float(np.mean(runs)), "std": float(np.std(runs)), "runs": [float(v) for v in runs],
        "per_layer": [float(v) for v in per_layer], "per_layer_std": [float(v) for v in per_layer_std],
        "per_layer_valid": [float(v) for v in per_layer_valid],
        "best_layer": best, "best_layer_score": float(per_layer[best]),
        "best_layer_std": float(per_layer_std[best]),
        "best_epochs": [e for d in draws for e in d["best_epochs"]],
        "seeds": list(first["seeds"]),
        "draws": len(draws),
        "draw_scores": [float(d["score"]) for d in draws], "draw_stds": [float(d["std"]) for d in draws],
        "geometry": {k: [float(v) for v in np.mean([d["geometry"][k] for d in draws], axis=0)]
                     for k in first["geometry"]},
    }
    if "test_outputs" in first:
        out["test_outputs"] = [o for d in draws for o in d["test_outputs"]]
    if "layer_weights" in first:
        out["layer_weights"] = [float(v) for v in np.mean([d["layer_weights"] for d in draws], axis=0)]
    if "ap" in first:
        out["ap"] = float(np.mean([d["ap"] for d in draws]))
        out["ap_std"] = float(total_std([[d["ap"]] for d in draws], [[d["ap_std"]] for d in draws])[0])
        out["per_layer_ap"] = [float(v) for v in np.mean([d["per_layer_ap"] for d in draws], axis=0)]
    return out
