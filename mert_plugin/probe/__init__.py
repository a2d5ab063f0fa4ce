"""Probing frozen features with MLPs (MARBLE protocol), with baselines and reports.

Public API::

    run_probe(out_dir, feature_sets={"pretrained": DIR, "random_init": DIR}, corpus_dir=CORPUS,
              baselines=("cqt",), seeds=(0, 1, 2), train_log=None) -> report dict
              (a list of folders for one name: independent draws of one model, pooled)
    probe_feature_set(x [N, L, D], y, splits, num_classes=..., multilabel=...) -> summary dict
    save_clip_features(feature_dir, rel_audio_path, array [L, D] or [L, T, D]) -> path
    load_feature_set(feature_dir, rel_paths) -> [N, L, D]

See docs/CORPUS_AND_PROBING.md.
"""
from .features import (BASELINES, HandcraftedExtractor, ProbeError, feature_file, handcrafted_features,
                       load_feature_set, save_clip_features)
from .mlp import ProbeConfig, pool_draws, probe_feature_set, train_probes
from .report import parse_train_log, plot_train_log
from .run import corpus_tasks, run_probe

__all__ = [
    "BASELINES", "HandcraftedExtractor", "ProbeConfig", "ProbeError", "corpus_tasks", "feature_file",
    "handcrafted_features", "load_feature_set", "parse_train_log", "plot_train_log", "pool_draws", "probe_feature_set",
    "run_probe", "save_clip_features", "train_probes",
]
