#!/usr/bin/env python3
"""Clip classification with a frozen MERT encoder under a learnable weighted sum of layers.

The encoder (``mert_plugin.speechbrain.MERTEncoder``, frozen) returns all its
hidden states; a softmax-weighted sum over layers, mean pooling over frames and
one linear layer are trained with cross-entropy. Data: a CSV with columns
``path`` (relative to ``data_folder``), ``label`` and ``split``
(``train``/``valid``/``test``), as the demo corpus writes.

    python train_classifier.py hparams/classify.yaml --data_folder=DEMO --csv=DEMO/key.csv \\
        --pretrained=results/mert_tiny/1234/export --output_folder=results/classify_key
"""
import csv
import logging
import os
import sys

import torch
import yaml
from hyperpyyaml import load_hyperpyyaml

import mert_plugin.compat

mert_plugin.compat.ensure_torchaudio_importable()
import speechbrain as sb  # noqa: E402

from mert_plugin.audio import load_audio  # noqa: E402
from mert_plugin.errors import MERTError  # noqa: E402

logger = logging.getLogger(__name__)
SPLIT_NAMES = {"train": "train", "valid": "valid", "val": "valid", "dev": "valid", "validation": "valid",
               "test": "test"}


class ClassifierBrain(sb.Brain):
    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, lens = batch.sig
        states = self.modules.encoder(wavs, lens)        # [L, B, T, D], no gradients
        feats = self.modules.weighted_sum(states)         # [B, T, D]
        pooled = self.hparams.pooling(feats, lens).squeeze(1)  # [B, D]
        return self.modules.classifier(pooled)            # [B, C] logits

    def compute_objectives(self, logits, batch, stage):
        labels = batch.label_encoded.data.squeeze(-1)
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.total += labels.numel()
        return torch.nn.functional.cross_entropy(logits, labels)

    def on_stage_start(self, stage, epoch=None):
        self.correct, self.total = 0, 0

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"loss": stage_loss, "accuracy": self.correct / max(1, self.total)}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
        elif stage == sb.Stage.VALID:
            weights = [round(w, 3) for w in self.modules.weighted_sum.layer_weights().tolist()]
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], "layer_weights": weights},
                train_stats=self.train_stats, valid_stats=stats)
            self.checkpointer.save_and_keep_only(meta=stats, max_keys=["accuracy"], num_to_keep=1,
                                                 importance_keys=[])
        else:
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=stats)
            self.test_stats = stats


def read_task_csv(csv_path, data_folder):
    """-> {split: {id: {"path", "label"}}}; rows with an unknown split or a missing file are reported."""
    splits = {"train": {}, "valid": {}, "test": {}}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label", "split"} - set(reader.fieldnames or [])
        if missing:
            raise MERTError(f"{csv_path}: missing column(s) {sorted(missing)} (need path,label,split)")
        for row in reader:
            split = SPLIT_NAMES.get(row["split"].strip().lower())
            path = os.path.join(data_folder, row["path"])
            if split is None:
                raise MERTError(f"{csv_path}: unknown split {row['split']!r} for {row['path']}")
            if ";" in row["label"]:
                raise MERTError(f"{csv_path}: {row['path']} has several labels; this recipe is single-label")
            if not os.path.isfile(path):
                logger.warning(f"skipping {path}: no such file")
                continue
            splits[split][row["path"]] = {"path": path, "label": row["label"].strip()}
    for name in ("train", "valid"):
        if not splits[name]:
            raise MERTError(f"{csv_path}: no {name} rows")
    return splits


def dataio_prepare(hparams):
    from speechbrain.dataio.dataset import DynamicItemDataset

    splits = read_task_csv(hparams["csv"], hparams["data_folder"])
    max_samples = int(hparams["max_seconds"] * hparams["sample_rate"])

    @sb.utils.data_pipeline.takes("path")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(path):
        return load_audio(path, hparams["sample_rate"])[:max_samples]

    label_encoder = sb.dataio.encoder.CategoricalEncoder()

    @sb.utils.data_pipeline.takes("label")
    @sb.utils.data_pipeline.provides("label_encoded")
    def label_pipeline(label):
        return torch.LongTensor([label_encoder.encode_label(label)])

    datasets = {}
    for name, data in splits.items():
        if data:
            datasets[name] = DynamicItemDataset(data, dynamic_items=[audio_pipeline, label_pipeline],
                                                output_keys=["id", "sig", "label_encoded"])
    label_encoder.load_or_create(path=os.path.join(hparams["save_folder"], "label_encoder.txt"),
                                 from_didatasets=[datasets["train"]], output_key="label")
    unseen = {r["label"] for s in ("valid", "test") for r in splits[s].values()} - set(label_encoder.lab2ind)
    if unseen:
        raise MERTError(f"labels {sorted(unseen)[:5]} occur in valid/test but not in train")
    if len(label_encoder) != hparams["num_classes"]:
        raise MERTError(f"{hparams['csv']}: {len(label_encoder)} classes in train, but num_classes is "
                        f"{hparams['num_classes']}; pass --num_classes={len(label_encoder)}")
    return datasets


def count_train_classes(csv_path, data_folder):
    return len({r["label"] for r in read_task_csv(csv_path, data_folder)["train"].values()})


def main(argv):
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    given = yaml.safe_load(overrides) if isinstance(overrides, str) else dict(overrides or {})
    given = given or {}
    if not given.get("num_classes") and "csv" in given and "data_folder" in given:
        given["num_classes"] = count_train_classes(given["csv"], given["data_folder"])
        overrides = yaml.safe_dump(given)
    sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=hparams_file, overrides=overrides)
    datasets = dataio_prepare(hparams)  # CategoricalEncoder.load_or_create writes on the main process only
    brain = ClassifierBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                            run_opts=run_opts, checkpointer=hparams["checkpointer"])
    brain.fit(brain.hparams.epoch_counter, datasets["train"], datasets["valid"],
              train_loader_kwargs=hparams["train_dataloader_opts"],
              valid_loader_kwargs=hparams["valid_dataloader_opts"])
    if "test" in datasets:
        brain.evaluate(datasets["test"], max_key="accuracy", test_loader_kwargs=hparams["valid_dataloader_opts"])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return brain


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except MERTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
