"""Probe outputs: ``report.json``, ``report.md`` and PNG plots (matplotlib, Agg backend),
plus the parser and plot for a SpeechBrain ``train_log.txt``."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ..atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from .features import ProbeError

# "key: value" where the key starts with a letter and may contain spaces/dots/dashes
# ("train loss", "valid ce_acoustic"), and the value is a float in any notation.
_PAIR = re.compile(r"([A-Za-z_][A-Za-z0-9_ ./\-]*?)\s*:\s*"
                   r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)(?![\w.])", re.IGNORECASE)


def parse_train_log(path) -> List[Dict[str, float]]:
    """Parse a SpeechBrain ``train_log.txt`` into one dict per epoch line, e.g.
    ``epoch: 1, lr: 1.00e-04 - train loss: 2.31 - valid loss: 2.1`` ->
    ``{"epoch": 1.0, "lr": 1e-4, "train loss": 2.31, "valid loss": 2.1}``.
    Lines without an ``epoch`` number (headers, ``Epoch loaded: ... - test loss`` lines) are
    skipped; keys are lower-cased."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"train log not found: {path}")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        pairs = {k.strip().lower(): float(v) for k, v in _PAIR.findall(line)}
        if "epoch" in pairs and math.isfinite(pairs["epoch"]):
            records.append(pairs)
    if not records:
        raise ProbeError(f"{path}: no 'epoch: N, ... - train loss: X' lines found")
    return records


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


# Logged counters, not training signals: left out of the loss plot.
_BOOKKEEPING = ("updates", "masked_frames", "masked_fraction", "steps", "step")


def plot_train_log(records: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Training curves of a parsed train log against the epoch (one PNG), one panel per
    metric (``loss``, ``acoustic_ce``, ``cqt_mse``, ``acoustic_acc``, ...) with its train
    (solid) and valid (dashed) series, so that terms of very different scales stay
    readable. Learning rates and counters (updates, masked frames) are left out."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    keys = sorted({k for r in records for k in r if k != "epoch" and not k.split()[-1].startswith("lr")})
    metrics: Dict[str, List[str]] = {}
    for k in keys:
        metric = k.split(" ", 1)[1] if k.split(" ", 1)[0] in ("train", "valid") and " " in k else k
        if metric not in _BOOKKEEPING:
            metrics.setdefault(metric, []).append(k)
    # The total loss first, then the other terms in name order.
    names = sorted(metrics, key=lambda m: (m != "loss", m)) or ["loss"]
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.set_visible(False)
            continue
        for k in metrics.get(names[i], []):
            pts = [(r["epoch"], r[k]) for r in records if k in r and math.isfinite(r[k])]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=k.split(" ", 1)[0],
                        ls="--" if k.startswith("valid") else "-")
        ax.set_title(names[i], fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("pre-training")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_layers(task: str, entry: Mapping, path: Path) -> Path:
    """Test score per layer (mean +- std over seeds) for every multi-layer feature set, with
    the weighted-sum scores (dashed), single-vector baselines (dotted) and chance (grey)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, res) in enumerate(entry["feature_sets"].items()):
        color = f"C{i}"
        if res["mode"] == "weighted_sum":
            xs = list(range(len(res["per_layer"])))
            ax.errorbar(xs, res["per_layer"], yerr=res["per_layer_std"], marker="o", ms=3, capsize=2,
                        color=color, label=f"{name} (per layer)")
            ax.axhline(res["score"], color=color, ls="--", lw=1, label=f"{name} (weighted sum)")
        else:
            ax.axhline(res["score"], color=color, ls=":", lw=1.5, label=name)
    if entry.get("chance") is not None:
        ax.axhline(entry["chance"], color="grey", lw=1, label="chance")
    ax.set_xlabel("layer (0 = CNN/embedding output)")
    ax.set_ylabel(entry["metric"])
    ax.set_title(f"{task}: probe score per layer (test, mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
    return path


def _fmt(mean: Optional[float], std: Optional[float]) -> str:
    return "n/a" if mean is None else f"{mean:.3f} ± {std:.3f}"


def write_markdown(report: Mapping, path: Path) -> Path:
    """A human summary of ``report`` (tables + plot links)."""
    probe = report["probe"]
    sets = list(report["feature_sets"]) + list(report["baselines"])
    lines = ["# Probe report", "",
             f"MLP probe (MARBLE protocol), seeds {report['settings']['seeds']}; score = test metric, "
             "mean ± std over seeds. Multi-layer features: learnable weighted sum of layers; "
             "'best layer' is chosen on the validation split.", "",
             "| task | metric | chance | " + " | ".join(sets) + " | best layer (" + sets[0] + ") |",
             "|" + "---|" * (len(sets) + 4)]
    for task, e in probe.items():
        cells = [_fmt(e[s], e[f"{s}_std"]) for s in sets]
        fs0 = e["feature_sets"][sets[0]]
        best = f"{fs0['best_layer']}: {_fmt(fs0['best_layer_score'], fs0['best_layer_std'])}"
        chance = "-" if e.get("chance") is None else f"{e['chance']:.3f}"
        lines.append(f"| {task} | {e['metric']} | {chance} | " + " | ".join(cells) + f" | {best} |")
    pooled = [(task, name, fs) for task, e in probe.items() for name, fs in e["feature_sets"].items()
              if fs.get("draws", 1) > 1]
    if pooled:
        lines += ["", "Pooled feature sets (independent draws of one model, e.g. random inits with different "
                  "seeds): score and std over every draw and probe seed; each draw's own score:", ""]
        for task, name, fs in pooled:
            lines.append(f"- {task}, {name}: {fs['draws']} draws: " + ", ".join(
                _fmt(m, s) for m, s in zip(fs["draw_scores"], fs["draw_stds"])))
    comparisons = [(task, other, c) for task, e in probe.items() for other, c in e.get("comparisons", {}).items()]
    if comparisons:
        lines += ["", f"Paired comparisons of {sets[0]} with the others (test split). Difference = score of "
                  f"{sets[0]} minus the other's; the interval is a paired bootstrap over test pieces (all clips of "
                  "a piece drawn together); 'better'/'worse' need the difference beyond the seed spread AND an "
                  "interval that excludes 0 (`mert_plugin/probe/compare.py`):", "",
                  "| task | compared | difference | interval (test pieces) | seed spread | decision |",
                  "|---|---|---|---|---|---|"]
        for task, other, c in comparisons:
            interval = "-" if c["ci_low"] is None else (f"{c['ci_low']:+.3f} .. {c['ci_high']:+.3f} "
                                                        f"({c['test_pieces']})")
            lines.append(f"| {task} | {sets[0]} − {other} | {c['margin']:+.3f} | {interval} | "
                         f"{c['seed_spread']:.3f} | {c['decision']} |")
    lines += ["", "Clips per split:", ""]
    for task, e in probe.items():
        n = e["num_clips"]
        lines.append(f"- {task}: {e['num_classes']} classes; train {n['train']}, valid {n['valid']}, "
                     f"test {n['test']}")
    geometry = [(task, name, fs["geometry"]) for task, e in probe.items()
                for name, fs in e["feature_sets"].items() if fs.get("geometry") and name in report["feature_sets"]]
    if geometry:
        lines += ["", "Feature geometry (training clips, z-scored; per layer). An effective rank near 1 and a "
                  "large first-component share mean the clips lie on a line (e.g. loudness), whatever the "
                  "scores say:", "", "| task | features | effective rank | first-component share |", "|---|---|---|---|"]
        for task, name, g in geometry:
            lines.append(f"| {task} | {name} | " + " ".join(f"{v:.1f}" for v in g["effective_rank"]) + " | "
                         + " ".join(f"{v:.2f}" for v in g["pc1_share"]) + " |")
    lines.append("")
    for task, e in probe.items():
        if e.get("plot"):
            lines += [f"![{task}]({e['plot']})", ""]
    if report.get("pretraining"):
        pre = report["pretraining"]
        lines += ["## Pre-training", "", f"{pre['epochs']} epochs parsed from `{pre['train_log']}`; "
                  "last: " + ", ".join(f"{k} {v:.4g}" for k, v in pre["last"].items()
                                  if k != "epoch" and v is not None), "",
                  f"![pre-training losses]({pre['plot']})", ""]
    lines += ["Synthetic corpus caveat: scores on rendered scores measure what the features encode about "
              "these synthetic renderings, not performance on recorded music.", ""]
    atomic_write_text(path, "\n".join(lines))
    return path


def write_report(report: Dict, out_dir, train_log: Optional[Sequence[Mapping[str, float]]] = None,
                 train_log_path: Optional[str] = None) -> Dict:
    """Write plots, ``report.json`` and ``report.md`` into ``out_dir``; returns ``report``
    with the plot paths (relative to ``out_dir``) filled in."""
    out = Path(out_dir)
    for task, entry in report["probe"].items():
        rel = f"plots/layers_{task}.png"
        plot_layers(task, entry, out / rel)
        entry["plot"] = rel
    if train_log:
        plot_train_log(train_log, out / "plots/pretrain_loss.png")
        report["pretraining"] = {"train_log": str(train_log_path), "epochs": len(train_log),
                                 "last": dict(train_log[-1]), "plot": "plots/pretrain_loss.png",
                                 "curves": {k: [r.get(k) for r in train_log]
                                            for k in sorted({k for r in train_log for k in r})}}
    report = _json_safe(report)
    atomic_write_json(out / "report.json", report)
    write_markdown(report, out / "report.md")
    return report


def _json_safe(obj):
    """NaN/inf -> None, so that report.json is strict JSON (json.dumps would write NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
