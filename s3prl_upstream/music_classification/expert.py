"""SUPERB-style clip-level music classification downstream for s3prl's runner.

Registered as ``s3prl.downstream.music_classification`` by
:func:`s3prl_upstream.register`, so ``-d music_classification`` works with the
unmodified runner. Model: the upstream's (weighted-sum) features -> linear
projector -> s3prl's own ``UtteranceLevel`` head (mean pooling over the clip's
frames -> linear), trained with cross-entropy, as SUPERB's emotion and speaker
ID tasks. Config keys (``downstream_expert``)::

    datarc: {csv, root, train_batch_size, eval_batch_size, num_workers, max_seconds}
    modelrc: {projector_dim, select: UtteranceLevel, UtteranceLevel: {pooling: MeanPooling}}

Evaluation splits write ``<split>_predictions.csv`` (path,label,predicted) to the
experiment folder; the best ``dev`` accuracy saves ``dev-best.ckpt``;
``-m inference -t clip.wav`` prints the predicted label of one file.
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

from mert_plugin.atomic import atomic_write_text
from mert_plugin.audio import load_audio
from mert_plugin.errors import MERTError

from .dataset import SAMPLE_RATE, MusicClipDataset, canonical_split, check_audio_files, read_clip_table


def _check_config(downstream_expert) -> tuple:
    """``(datarc, modelrc)``; :class:`MERTError` naming the key for a missing or bad setting."""
    where = "config downstream_expert"
    if not isinstance(downstream_expert, dict) or not all(
            isinstance(downstream_expert.get(k), dict) for k in ("datarc", "modelrc")):
        raise MERTError(f"{where}: needs the sections datarc and modelrc")
    datarc, modelrc = downstream_expert["datarc"], downstream_expert["modelrc"]
    for section, name, key, minimum in (("datarc", datarc, "train_batch_size", 1),
                                        ("datarc", datarc, "eval_batch_size", 1),
                                        ("datarc", datarc, "num_workers", 0),
                                        ("modelrc", modelrc, "projector_dim", 1)):
        value = name.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise MERTError(f"{where}.{section}.{key} must be an integer >= {minimum}, got {value!r}")
    max_seconds = datarc.get("max_seconds")
    if max_seconds is not None and (not isinstance(max_seconds, (int, float)) or max_seconds <= 0):
        raise MERTError(f"{where}.datarc.max_seconds must be a positive number or null, got {max_seconds!r}")
    if "select" not in modelrc:
        raise MERTError(f"{where}.modelrc.select must name an s3prl downstream model (e.g. UtteranceLevel)")
    _check_model_names(modelrc, f"{where}.modelrc")
    return datarc, modelrc


def _check_model_names(rc: dict, where: str) -> None:
    """s3prl ``eval()``s ``select``/``pooling`` strings (also from a ``-e`` checkpoint's
    config): allow only names of its own model classes, never an expression."""
    import s3prl.downstream.model as models

    for key, value in rc.items():
        if key in ("select", "pooling"):
            if not (isinstance(value, str) and value.isidentifier() and isinstance(getattr(models, value, None), type)):
                raise MERTError(f"{where}.{key}: {value!r} is not a model in s3prl.downstream.model")
        elif isinstance(value, dict):
            _check_model_names(value, f"{where}.{key}")


class DownstreamExpert(nn.Module):
    """s3prl DownstreamExpert: ``forward(split, features [B x [T_i, D]], labels, paths, records) -> loss``."""

    def __init__(self, upstream_dim: int, downstream_expert: dict, expdir: str, **kwargs):
        super().__init__()
        from s3prl.downstream.model import get_downstream_model

        self.datarc, self.modelrc = _check_config(downstream_expert)
        self.expdir = expdir
        csv_path = self.datarc.get("csv")
        if not csv_path:
            raise MERTError("music_classification needs a clip table: "
                            "-o config.downstream_expert.datarc.csv=/path/to/task.csv")
        self.clips = read_clip_table(csv_path)
        self.root = self.datarc.get("root") or os.path.dirname(os.path.abspath(csv_path))
        self.classes = sorted({c.label for c in self.clips})
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        counts = Counter(c.split for c in self.clips)
        if not counts["train"]:
            raise MERTError(f"{csv_path}: no rows with split 'train'")
        print(f"[music_classification] {csv_path}: {len(self.classes)} classes, "
              f"{dict(sorted(counts.items()))} clips; audio root {self.root}")
        self.datasets = {}
        for split in counts:
            rows = [c for c in self.clips if c.split == split]
            self.datasets[split] = MusicClipDataset(
                rows, self.root, self.class_index, self.datarc.get("max_seconds"), random_crop=split == "train")
        check_audio_files([d.full_path(c) for d in self.datasets.values() for c in d.clips], csv_path)

        self.projector = nn.Linear(upstream_dim, self.modelrc["projector_dim"])
        self.model = get_downstream_model(self.modelrc["projector_dim"], len(self.classes), self.modelrc)
        self.objective = nn.CrossEntropyLoss()
        self.register_buffer("best_score", torch.zeros(1))

    # ------------------------------------------------------------ interface
    def get_dataloader(self, split: str, epoch: int = 0) -> DataLoader:
        dataset = self.datasets.get(canonical_split(split))
        if dataset is None:
            raise MERTError(f"{self.datarc['csv']}: no rows for split {split!r} "
                            f"(has {sorted(self.datasets)})")
        if split == "train":
            from s3prl.utility.data import get_ddp_sampler

            sampler = get_ddp_sampler(dataset, epoch)
            return DataLoader(dataset, batch_size=self.datarc["train_batch_size"], shuffle=sampler is None,
                              sampler=sampler, num_workers=self.datarc["num_workers"],
                              collate_fn=dataset.collate_fn)
        return DataLoader(dataset, batch_size=self.datarc["eval_batch_size"], shuffle=False,
                          num_workers=self.datarc["num_workers"], collate_fn=dataset.collate_fn)

    def forward(self, split, features, labels, paths, records, **kwargs):
        device = features[0].device
        lengths = torch.tensor([len(f) for f in features], device=device)
        hidden = self.projector(pad_sequence(features, batch_first=True))
        logits, _ = self.model(hidden, lengths)  # mean over each clip's own frames
        labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        loss = self.objective(logits, labels)
        predicted = logits.argmax(dim=-1)
        records["loss"].append(loss.item())
        records["acc"] += (predicted == labels).float().cpu().tolist()
        records["path"] += list(paths)
        records["label"] += [self.classes[i] for i in labels.cpu().tolist()]
        records["predicted"] += [self.classes[i] for i in predicted.cpu().tolist()]
        return loss

    def load_audio(self, path):
        """Used by ``-m inference -t file``: mono 16 kHz [n], read with soundfile (not torchaudio)."""
        return load_audio(str(path), SAMPLE_RATE)

    def inference(self, features, filenames):
        """``-m inference``: print ``<file>: <predicted label>`` for each clip."""
        lengths = torch.tensor([len(f) for f in features], device=features[0].device)
        logits, _ = self.model(self.projector(pad_sequence(features, batch_first=True)), lengths)
        for name, index in zip(filenames, logits.argmax(dim=-1).tolist()):
            print(f"[music_classification] {name}: {self.classes[index]}")

    def log_records(self, split, records, logger, global_step, **kwargs):
        save_names = []
        for key in ("loss", "acc"):
            if records[key]:
                value = torch.tensor(records[key], dtype=torch.float).mean().item()
                logger.add_scalar(f"music_classification/{split}-{key}", value, global_step=global_step)
                if key == "acc" and split != "train":
                    print(f"[music_classification] {split} acc at step {global_step}: {value:.4f}")
                    if split == "dev" and value > self.best_score.item():
                        self.best_score.fill_(value)
                        save_names.append(f"{split}-best.ckpt")
        if split != "train" and records["path"]:
            self._write_predictions(split, records)
        return save_names

    def _write_predictions(self, split, records) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "label", "predicted"])
        writer.writerows(zip(records["path"], records["label"], records["predicted"]))
        # never a half-written predictions file
        atomic_write_text(os.path.join(self.expdir, f"{split}_predictions.csv"), buf.getvalue())
