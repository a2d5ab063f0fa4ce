#!/usr/bin/env python3
"""Pretrain MERT with SpeechBrain.

    python train.py hparams/mert.yaml --data_folder=/path/to/music
    torchrun --nproc_per_node=8 train.py hparams/mert.yaml --data_folder=/path/to/music
    torchrun --nproc_per_node=2 train.py hparams/mert_tiny.yaml --data_folder=DIR \\
        --distributed_backend=gloo --device=cpu

Everything tunable is in the yaml. Steps: data preparation (prepare_music.py)
and the teacher step (fit the demo teacher / offline labels) on the main
process, then ``Brain.fit`` (resumes from the last checkpoint of
``output_folder`` if there is one), then export of the student to
``<output_folder>/export`` (HF folder + SpeechBrain inference files).

As in SpeechBrain's recipes, the helpers (data.py, label_step.py,
prepare_music.py, checkpointing.py) are imported from this folder, and the
yamls name them so (``!new:data.CropCollate``); ``mert_plugin`` comes from
``pip install`` of the mert-plugin project (extra_requirements.txt).

``--debug`` (SpeechBrain's flag) shortens every step, not only ``Brain.fit``:
data preparation checks and labels a few files, the teacher is fitted on
them, and all outputs (manifests, labels, checkpoints, logs, export) go to a
temporary folder (``<output_folder>/debug`` with ``--debug_persistently``), so
a debug run never leaves short manifests or labels where a real run would
reuse them.
"""
import gc
import logging
import os
import sys
import tempfile
import time

import torch
from hyperpyyaml import load_hyperpyyaml

import mert_plugin.compat

mert_plugin.compat.ensure_torchaudio_importable()
import speechbrain as sb  # noqa: E402
from speechbrain.utils.distributed import run_on_main  # noqa: E402

from mert_plugin.errors import MERTError  # noqa: E402
from mert_plugin.speechbrain import save_inference_files  # noqa: E402
import label_step  # noqa: E402  (this recipe's own helpers, next to train.py)
from data import (  # noqa: E402
    batches_per_process, dataio_prepare, distributed_batch_sampler, make_batch_sampler)
from prepare_music import prepare_music  # noqa: E402

logger = logging.getLogger(__name__)

# --debug: files checked by data preparation, then used (and labelled) per split
DEBUG_FILES = {"train": 4, "valid": 2}


class MERTBrain(sb.Brain):
    """Masked prediction of teacher labels; the objective is ``MERTPretrainer``."""

    label_generator = None  # online teachers (frozen, outside `modules` so DDP ignores them)
    tensorboard = None  # optional TensorboardLogger (use_tensorboard)

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        codes, cqt = batch.codes, batch.cqt
        if self.label_generator is not None:  # online teachers, on the clean crops
            with torch.autocast(device_type=self.device_type, enabled=False):  # labels in fp32
                online_codes, online_cqt = self.label_generator(batch.wav)
            codes = codes if online_codes is None else online_codes
            cqt = cqt if online_cqt is None else online_cqt
        return self.modules.pretrainer(batch.wav, codes=codes, cqt=cqt)

    def compute_objectives(self, out, batch, stage):
        for name, value in out.terms.items():
            if name[-1].isdigit():  # per-codebook terms (acoustic_ce_0..7) stay out of the log
                continue
            self.term_sums[name] = self.term_sums.get(name, 0.0) + float(value)
        self.term_batches += 1
        return out.loss

    def init_optimizers(self):
        """One optimizer over every parameter; with ``stem_lr_scale`` != 1 the conv stem's parameters
        form a second group whose lr is that multiple of the scheduled one (docs/LEARNING.md 7.6).
        Under Adam ``feature_grad_mult`` cannot slow the stem (it scales the stem's gradients,
        which Adam normalises away); a learning-rate factor can."""
        scale = float(getattr(self.hparams, "stem_lr_scale", 1.0))
        if scale == 1.0 or self.opt_class is None:
            return super().init_optimizers()
        stem = {id(p) for p in self.hparams.student.feature_extractor.parameters()}
        params = list(self.modules.parameters())
        self.optimizer = self.opt_class([  # group 0 holds the scheduled lr the logs report
            {"params": [p for p in params if id(p) not in stem]},
            {"params": [p for p in params if id(p) in stem], "lr_scale": scale}])
        self.optimizers_dict = {"opt_class": self.optimizer}
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)

    def _apply_lr_scales(self):
        """SpeechBrain's schedulers set one lr on every group; groups with an ``lr_scale`` get it scaled."""
        lr = self.optimizer.param_groups[0]["lr"]
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def on_fit_start(self):
        super().on_fit_start()  # wraps DDP, builds the optimizer, recovers the last checkpoint
        if self.label_generator is not None:
            self.label_generator.to(self.device)
        sched = self.hparams.lr_scheduler
        if sched.current_step == 0:  # first update at the first warm-up value, not at the peak
            for group in self.optimizer.param_groups:
                group["lr"] = sched.calculate_lr(1)
        self._apply_lr_scales()

    def _train_loader_specifics(self, dataset, loader_kwargs):
        # Under DDP SpeechBrain wraps the batch sampler (DistributedSamplerWrapper: every process
        # gets ceil(batches / processes), padded by repeating batches); that wrapper breaks for a
        # process given a single batch, so it is swapped for the same wrapper, fixed.
        loader_kwargs = super()._train_loader_specifics(dataset, loader_kwargs)
        if "batch_sampler" in loader_kwargs:
            loader_kwargs["batch_sampler"] = distributed_batch_sampler(loader_kwargs["batch_sampler"])
            if self.distributed_launch:
                self.train_sampler = loader_kwargs["batch_sampler"]  # Brain calls its set_epoch
        return loader_kwargs

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        self.interval_loss = getattr(self, "interval_loss", 0.0) + float(loss.detach() if torch.is_tensor(loss) else loss)
        self.interval_batches = getattr(self, "interval_batches", 0) + 1
        if should_step:
            self.hparams.lr_scheduler(self.optimizer)
            self._apply_lr_scales()
            interval = getattr(self.hparams, "log_interval", 0) or 0
            if interval > 0 and self.optimizer_step % interval == 0:
                self._log_steps()

    def _log_steps(self):
        """One line of ``train_steps_log`` (and TensorBoard): the means over the batches since the
        last line, on the main process's batches (no all-reduce: a step must not wait for others)."""
        now = time.time()
        seen = self.interval_batches
        stats = {"loss": self.interval_loss / max(1, seen)}
        last = getattr(self, "interval_terms", {})
        for name, total in self.term_sums.items():  # the epoch's running sums: differences since the last line
            n = self.term_batches - last.get("#batches", 0)
            if n > 0 and name in ("acoustic_ce", "acoustic_acc", "cqt_mse", "level_mse", "mfcc_mse",
                                  "envelope_mse", "feature_penalty"):
                stats[name] = (total - last.get(name, 0.0)) / n
        meta = {"epoch": self.hparams.epoch_counter.current, "updates": self.optimizer_step,
                "lr": self.optimizer.param_groups[0]["lr"], "batches": seen}
        if getattr(self, "interval_start", None) is not None:
            meta["seconds"] = round(now - self.interval_start, 2)
        if sb.utils.distributed.if_main_process():
            self.hparams.train_steps_logger.log_stats(stats_meta=meta, train_stats=stats)
            if self.tensorboard is not None:  # x axis: optimizer updates
                for name, value in {"lr": meta["lr"], **stats}.items():
                    self.tensorboard.writer.add_scalar(f"steps/{name}", value, self.optimizer_step)
        self.interval_loss, self.interval_batches, self.interval_start = 0.0, 0, now
        self.interval_terms = {**self.term_sums, "#batches": self.term_batches}

    def on_stage_start(self, stage, epoch=None):
        self.term_sums, self.term_batches = {}, 0
        if stage == sb.Stage.TRAIN:  # step log intervals restart with the epoch's term sums
            self.interval_loss, self.interval_batches, self.interval_terms = 0.0, 0, {}
            self.interval_start = time.time()
        if stage == sb.Stage.TRAIN:
            self.hparams.train_collate.epoch = epoch

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"loss": stage_loss, **self._term_means(all_ranks=stage == sb.Stage.TRAIN)}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            if self.hparams.valid_set_size:
                return
            stats = None
        meta = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], "updates": self.optimizer_step}
        self.hparams.train_logger.log_stats(stats_meta=meta, train_stats=self.train_stats, valid_stats=stats)
        if self.tensorboard is not None:
            self.tensorboard.log_stats(stats_meta={"epoch": epoch}, train_stats=self.train_stats, valid_stats=stats)
        self.checkpointer.save_and_keep_only(meta={"loss": stage_loss, "epoch": epoch},
                                             num_to_keep=self.hparams.checkpoints_to_keep, importance_keys=[])
        self.checkpointer.delete_checkpoints(  # the epoch is complete: its intra-epoch checkpoints are stale
            num_to_keep=0, ckpt_predicate=lambda c: sb.core.INTRA_EPOCH_CKPT_FLAG in c.meta)
        if getattr(self.hparams, "snapshot_folder", None) and sb.utils.distributed.if_main_process():
            save_snapshot(self.hparams.student, self.hparams.snapshot_folder, epoch, self.optimizer_step)

    def _term_means(self, all_ranks):
        names = sorted(self.term_sums)
        totals = torch.tensor([self.term_sums[n] for n in names] + [self.term_batches], dtype=torch.float64)
        if all_ranks and torch.distributed.is_initialized():  # each rank saw its own share of the data
            totals = totals.to(self.device)  # NCCL reduces CUDA tensors only
            totals = sb.utils.distributed.ddp_all_reduce(totals, torch.distributed.ReduceOp.SUM).cpu()
        return {n: float(v) / max(1.0, float(totals[-1])) for n, v in zip(names, totals[:-1])}


def save_snapshot(student, folder, epoch, updates):
    """The student after ``epoch`` (``folder/epoch_NNN``, a ``from_pretrained`` folder), so that
    probes can show learning over time; ``snapshot.json`` records the updates made."""
    from mert_plugin.atomic import atomic_write_json

    target = os.path.join(folder, f"epoch_{epoch:03d}")
    student.save_pretrained(target)
    atomic_write_json(os.path.join(target, "snapshot.json"), {"epoch": epoch, "updates": updates})


def code_counts(label_folder, ids, num_codebooks, codebook_size, max_files=2000):
    """[K, C] counts of the offline codes of ``ids`` (the unigram baseline of the masked prediction),
    from at most ``max_files`` evenly spread files (start-up stays short on a large corpus)."""
    import numpy as np

    from mert_plugin.labels import label_paths

    counts = np.zeros((num_codebooks, codebook_size), np.int64)
    for clip_id in label_step.spread(sorted(ids), max_files):
        codes = np.load(label_paths(label_folder, clip_id)[0], mmap_mode="r", allow_pickle=False)
        for k in range(min(num_codebooks, codes.shape[0])):
            counts[k] += np.bincount(np.asarray(codes[k], np.int64), minlength=codebook_size)[:codebook_size]
    return torch.from_numpy(counts)


def export_student(student, export_folder):
    student.save_pretrained(export_folder)
    save_inference_files(student, export_folder)
    logger.info(f"Exported the student to {export_folder}")


def on_main(func, **kwargs):
    """``run_on_main`` that also stops the other processes when the main one fails
    (they would otherwise wait at its barrier until the DDP timeout)."""
    def guarded():
        try:
            return "ok", func(**kwargs)
        except MERTError as exc:
            return "error", str(exc)
        except Exception as exc:
            logger.exception(f"{func.__name__} failed")
            return "crash", f"{func.__name__} failed on the main process: {type(exc).__name__}: {exc}"

    status, value = run_on_main(guarded)
    if status == "error":
        raise MERTError(value)
    if status == "crash":
        raise RuntimeError(value)
    return value


def main(argv):
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    sb.utils.distributed.ddp_init_group(run_opts)  # torchrun: RANK/LOCAL_RANK in the environment
    debug_tmp = []  # a --debug run's temporary output folder, removed at the end
    try:
        run(hparams_file, run_opts, overrides, debug_tmp)
    finally:
        # SpeechBrain's checkpointer holds the Brain (a recoverable), the Brain its DDP wrappers and
        # their reducers the process group: a reference cycle that outlives run(). Collected only at
        # interpreter exit, the gloo group is released while Python is being torn down, where it can
        # abort a process that has finished (seen as "terminate called without an active exception" on
        # rank 1 in some loaded two-process test runs). Collect it now, while the interpreter is whole.
        gc.collect()
        if torch.distributed.is_initialized():
            if debug_tmp and sys.exc_info()[0] is None:
                torch.distributed.barrier()  # nobody is still using the debug folder
            torch.distributed.destroy_process_group()
        if debug_tmp and sb.utils.distributed.if_main_process():
            import shutil

            shutil.rmtree(debug_tmp[0], ignore_errors=True)


def run(hparams_file, run_opts, overrides, debug_tmp):
    """Data preparation, the teacher step, ``Brain.fit`` and the export. ``debug_tmp`` receives
    the temporary output folder of a ``--debug`` run."""
    debug = bool(run_opts.get("debug"))
    with open(hparams_file, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)  # run_opts go to the Brain, never into hparams
    if debug:
        overrides = debug_overrides(hparams, overrides, run_opts)
        if not run_opts.get("debug_persistently"):
            debug_tmp.append(overrides["output_folder"])
        with open(hparams_file, encoding="utf-8") as f:
            hparams = load_hyperpyyaml(f, overrides)
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=hparams_file, overrides=overrides)
    if debug:
        logger.info(f"--debug: outputs in {hparams['output_folder']}; at most {sum(DEBUG_FILES.values())} "
                    f"files prepared and labelled")
    on_main(prepare_music, data_folder=hparams["data_folder"], save_folder=hparams["manifest_folder"],
            valid_fraction=hparams["valid_fraction"], min_duration=hparams["min_duration"],
            check_decode=hparams["check_decode"], skip_prep=hparams["skip_prep"],
            max_files=sum(DEBUG_FILES.values()) if debug else 0)
    on_main(label_step.prepare, hparams=hparams, device=run_opts["device"] or sb.utils.distributed.infer_device())
    datasets = dataio_prepare(hparams)
    train(hparams, run_opts, datasets)
    on_main(export_student, student=hparams["student"], export_folder=hparams["export_folder"])


def debug_overrides(hparams, overrides, run_opts):
    """``--debug``: the yaml overrides that send every output to a debug folder and shorten
    data preparation and labelling (``Brain.fit`` itself stops after ``--debug_batches``)."""
    import yaml

    if run_opts.get("debug_persistently"):
        folder = os.path.join(hparams["output_folder"], "debug")
    else:  # SpeechBrain's own debug checkpoints go to a temporary folder too
        folder = tempfile.mkdtemp(prefix="mert_debug_")
        if torch.distributed.is_initialized():  # every process must use the main process's folder
            box = [folder]
            torch.distributed.broadcast_object_list(box, src=0)
            folder = box[0]
    values = yaml.safe_load(overrides) if isinstance(overrides, str) and overrides.strip() else dict(overrides or {})
    values.update(output_folder=folder, max_train_files=DEBUG_FILES["train"], max_valid_files=DEBUG_FILES["valid"],
                  teacher_fit_files=DEBUG_FILES["train"])
    if "snapshot_folder" in hparams:
        values["snapshot_folder"] = ""
    return values


def make_tensorboard_logger(save_dir):
    """SpeechBrain's ``TensorboardLogger``. Its writer is ``torch.utils.tensorboard``'s, which needs
    the ``tensorboard`` package; without it, the same logger writes through ``tensorboardX``
    (the same event files)."""
    from speechbrain.utils.train_logger import TensorboardLogger

    try:
        return TensorboardLogger(save_dir)
    except ImportError:
        pass
    try:
        import tensorboardX
    except ImportError:
        raise MERTError("use_tensorboard needs the tensorboard or the tensorboardX package "
                        "(pip install tensorboardX)") from None

    class TensorboardXLogger(TensorboardLogger):
        def __init__(self, save_dir):  # TensorboardLogger.__init__ with tensorboardX's writer
            self.save_dir = save_dir
            self.writer = tensorboardX.SummaryWriter(save_dir) if sb.utils.distributed.if_main_process() else None
            self.global_step = {"train": {}, "valid": {}, "test": {}, "meta": 0}

    return TensorboardXLogger(save_dir)


def train(hparams, run_opts, datasets):
    brain = MERTBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                      run_opts=run_opts, checkpointer=hparams["checkpointer"])
    brain.label_generator = label_step.online_generator(hparams)
    if hparams.get("use_tensorboard"):
        brain.tensorboard = make_tensorboard_logger(hparams["tensorboard_logs"])
    if label_step.teacher_plan(hparams)["offline_codes"]:  # validation then reports the unigram baseline
        objective = hparams["objective"]
        hparams["pretrainer"].set_code_prior(code_counts(
            hparams["label_folder"], [i for i in datasets["train"].data_ids], objective.num_codebooks,
            objective.codebook_size))
    loader = {"num_workers": hparams["num_workers"], "generator": torch.Generator().manual_seed(hparams["seed"])}
    train_sampler = make_batch_sampler(datasets["train"], hparams["crop_seconds"], **hparams["dynamic_batching"])
    # Brain calls set_epoch only on samplers it made itself (or wrapped for DDP): without this the
    # batch order would depend on how many epochs this process has run, not on the epoch number.
    brain.train_sampler = train_sampler
    sched = hparams["lr_scheduler"]
    if sched.num_training_steps <= 0:  # total_updates: 0 = decay to zero at the end of the last epoch
        # DDP gives every process the same number of batches (padded by repeating batches); the
        # Brain steps after every grad_accumulation_factor-th batch and flushes the rest at the epoch's end.
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        per_process = batches_per_process(len(train_sampler), world)
        per_epoch = per_process // hparams["grad_accumulation_factor"]
        if per_epoch == 0:
            logger.warning("an epoch holds %d batches per process, fewer than grad_accumulation_factor (%d): "
                           "no update will be made", per_process, hparams["grad_accumulation_factor"])
        sched.num_training_steps = max(1, per_epoch * hparams["number_of_epochs"])
        logger.info("total_updates: 0 -> %d (%d epochs x %d updates)", sched.num_training_steps,
                    hparams["number_of_epochs"], per_epoch)
        if sched.num_warmup_steps >= sched.num_training_steps:  # else the rate would never leave warm-up
            warmup = max(1, round(0.08 * sched.num_training_steps))  # the reference's share (32k of 400k)
            logger.warning("warmup_updates %d >= the run's %d updates: warming up over %d (8 %%) instead",
                           sched.num_warmup_steps, sched.num_training_steps, warmup)
            sched.num_warmup_steps = warmup
    valid_loader = None
    if len(datasets["valid"]):  # fixed order: the same masks are drawn every epoch and after a resume
        valid_sampler = make_batch_sampler(datasets["valid"], hparams["crop_seconds"], **{
            **hparams["dynamic_batching"], "shuffle": False, "batch_ordering": "ascending"})
        valid_loader = {**loader, "collate_fn": hparams["valid_collate"], "batch_sampler": valid_sampler}
    brain.fit(brain.hparams.epoch_counter, datasets["train"], datasets["valid"] if valid_loader else None,
              train_loader_kwargs={**loader, "collate_fn": hparams["train_collate"], "batch_sampler": train_sampler},
              valid_loader_kwargs=valid_loader or {})


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except MERTError as exc:  # bad data or configuration: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
