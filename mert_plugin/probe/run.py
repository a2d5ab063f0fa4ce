"""Probe several feature sets (and hand-crafted baselines) on every task of a corpus."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from ..corpus.tables import TaskTable, read_task_csv, split_counts
from .compare import compare, paired_bootstrap
from .features import BASELINES, ProbeError, handcrafted_features, load_feature_set
from .mlp import ProbeConfig, encode_labels, pool_draws, probe_feature_set
from .report import parse_train_log, write_report


def corpus_tasks(corpus_dir, names: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """Tasks of a corpus folder (from its ``corpus.json``): ``{name: task entry + "csv_path"}``."""
    corpus_dir = Path(corpus_dir)
    manifest_path = corpus_dir / "corpus.json"
    if not manifest_path.is_file():
        raise ProbeError(f"{corpus_dir} has no corpus.json (build one with mert-corpus, or pass task CSVs)")
    try:
        tasks = json.loads(manifest_path.read_text())["tasks"]
    except (ValueError, KeyError) as exc:
        raise ProbeError(f"{manifest_path} is not a corpus manifest: {exc}") from None
    if names:
        unknown = [n for n in names if n not in tasks]
        if unknown:
            raise ProbeError(f"task(s) {unknown} not in {manifest_path}; it has {sorted(tasks)}")
        tasks = {n: tasks[n] for n in names}
    return {n: {**t, "csv_path": str(corpus_dir / t["csv"])} for n, t in tasks.items()}


def _chance(y_train: np.ndarray, y_test: np.ndarray, multilabel: bool) -> float:
    """Score of a probe that ignores its input: always the most frequent training class
    (accuracy), or 0.5 ROC-AUC for multi-label."""
    if multilabel:
        return 0.5
    return float(np.mean(y_test == np.bincount(y_train).argmax()))


def compare_to_main(results: Mapping[str, dict], y_test: np.ndarray, test_pieces: Sequence[str],
                    multilabel: bool) -> Dict[str, dict]:
    """The first feature set against every other one and every baseline, paired over the test
    pieces (:mod:`.compare`): ``{other: comparison}``. Takes the per-clip ``test_outputs`` out of
    ``results`` (they stay out of the report: a multi-label task's would be large)."""
    outputs = {name: np.asarray(res.pop("test_outputs")) for name, res in results.items()}
    names = list(results)
    out = {}
    for other in names[1:]:
        boot = paired_bootstrap(outputs[names[0]], outputs[other], y_test, test_pieces, multilabel=multilabel)
        a, b = results[names[0]], results[other]
        out[other] = compare(a["score"], a["std"], b["score"], b["std"], boot)
    return out


def _draws(folders) -> list:
    """A feature set's folders: one folder, or a non-empty list of folders (draws of one model)."""
    if isinstance(folders, (list, tuple)):
        if not folders:
            raise ProbeError("a feature set was given an empty list of folders")
        return list(folders)
    return [folders]


def run_probe(out_dir, *, feature_sets: Mapping[str, object], corpus_dir=None,
              tasks: Optional[Sequence[str]] = None, task_csvs: Optional[Mapping[str, object]] = None,
              audio_root=None, baselines: Sequence[str] = ("cqt",), seeds: Sequence[int] = (0, 1, 2),
              config: ProbeConfig = ProbeConfig(), train_log=None, progress: bool = True) -> dict:
    """Probe every feature set and baseline on every task; write ``report.json``,
    ``report.md`` and ``plots/`` into ``out_dir`` and return the report.

    * ``feature_sets``: ``{name: folder}`` in the format of :mod:`.features` (the first
      one is the "main" set whose ``per_layer`` scores appear at the top of each task);
      e.g. ``{"pretrained": ..., "random_init": ...}``. A list of folders for one name holds
      independent draws of one model (random inits with different seeds): each is probed and
      the results are pooled (:func:`.mlp.pool_draws`), so its score is the mean over draws
      and its std holds the draw-to-draw spread.
    * Tasks: those of ``corpus_dir/corpus.json`` (all, or ``tasks``), plus ``task_csvs``
      (``{name: csv}``, format of :mod:`mert_plugin.corpus.tables`).
    * ``audio_root``: folder the CSV paths are relative to (default ``corpus_dir``, else
      the CSV's folder); needed for baselines only.
    * ``baselines``: hand-crafted features computed from the audio (``cqt``, ``mfcc``).
    * ``train_log``: a SpeechBrain ``train_log.txt`` whose loss curves are plotted.

    Each task's entry has ``comparisons``: the first feature set against every other set and
    baseline (score difference, seed spread, paired bootstrap interval over the test pieces and
    the decision better / worse / not distinguishable; :mod:`.compare`).
    """
    t0 = time.perf_counter()
    if not feature_sets and not baselines:
        raise ProbeError("nothing to probe: give at least one feature set or baseline")
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ProbeError(f"unknown baseline(s) {bad}; choose from {list(BASELINES)}")
    if set(feature_sets) & set(baselines):
        raise ProbeError(f"feature-set name(s) {sorted(set(feature_sets) & set(baselines))} clash with baselines")
    if not seeds:
        raise ProbeError("at least one seed is needed")
    log_records = parse_train_log(train_log) if train_log else None  # fail early, before hours of probing

    specs: Dict[str, dict] = corpus_tasks(corpus_dir, tasks) if corpus_dir else {}
    for name, csv in (task_csvs or {}).items():
        specs[name] = {"csv_path": str(csv)}
    if not specs:
        raise ProbeError("no tasks: give a corpus folder and/or task CSVs")

    baseline_cache: Dict[str, Dict[str, np.ndarray]] = {b: {} for b in baselines}
    report: Dict = {"probe": {}, "feature_sets": list(feature_sets), "baselines": list(baselines),
                    "settings": {**config.to_dict(), "seeds": [int(s) for s in seeds]}}
    for task, spec in specs.items():
        multilabel = {"multilabel": True, "multiclass": False}.get(spec.get("type"))
        table: TaskTable = read_task_csv(spec["csv_path"], name=task, multilabel=multilabel)
        classes = list(spec.get("classes") or table.classes)
        unknown = sorted(set(table.classes) - set(classes))
        if unknown:
            raise ProbeError(f"task {task!r}: labels {unknown[:5]} are not among the manifest's classes")
        y = encode_labels(table.labels, classes, table.multilabel)
        root = Path(audio_root or corpus_dir or Path(spec["csv_path"]).parent)
        features = {name: [load_feature_set(f, table.paths, name) for f in _draws(folders)]
                    for name, folders in feature_sets.items()}
        for kind in baselines:
            todo = [p for p in dict.fromkeys(table.paths) if p not in baseline_cache[kind]]
            if todo:  # tasks that share clips (key/composer/instrument) compute them once
                for p, f in zip(todo, handcrafted_features(root, todo, kind, progress=progress)):
                    baseline_cache[kind][p] = f
            features[kind] = [np.stack([baseline_cache[kind][p] for p in table.paths])]
        results = {}
        for name, xs in features.items():
            draws = []
            for i, x in enumerate(xs):
                if progress:
                    draw = f" (draw {i + 1} of {len(xs)})" if len(xs) > 1 else ""
                    print(f"probe {task}/{name}{draw}: {x.shape[0]} clips x {x.shape[1]} layers x {x.shape[2]} "
                          "dims", flush=True)
                draws.append(probe_feature_set(x, y, table.splits, num_classes=len(classes),
                                               multilabel=table.multilabel, seeds=seeds, config=config))
            results[name] = pool_draws(draws)
        splits = np.asarray(table.splits)
        entry: Dict = {"metric": "roc_auc" if table.multilabel else "accuracy", "num_classes": len(classes),
                       "num_clips": split_counts(table.splits),
                       "chance": _chance(y[splits == "train"], y[splits == "test"], table.multilabel)}
        for name, res in results.items():
            entry[name], entry[f"{name}_std"] = res["score"], res["std"]
            if table.multilabel:
                entry[f"{name}_ap"], entry[f"{name}_ap_std"] = res["ap"], res["ap_std"]
        entry["comparisons"] = compare_to_main(results, y[splits == "test"],
                                               np.asarray(table.pieces, dtype=object)[splits == "test"],
                                               table.multilabel)
        main = next(iter(results.values()))
        entry.update(per_layer=main["per_layer"], per_layer_std=main["per_layer_std"],
                     best_layer=main["best_layer"], feature_sets=results)
        report["probe"][task] = entry
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return write_report(report, out_dir, log_records, train_log)
