"""Teacher preparation for the MERT recipe (run on the main process via ``run_on_main``).

* :func:`fit_teacher`: the explicit ``fitted`` demo/test teacher (and the
  ``mfcc-kmeans`` one) learns its codebooks once from training audio; the
  state goes to ``teacher_state`` and every process loads it from there.
* :func:`ensure_offline_labels`: labels every manifest file that has none
  yet with ``mert_plugin.labels.generate_labels`` (whole files, written
  atomically, finished files skipped), so a rerun or a resumed run only labels
  what is missing.
* :func:`labelled_ids`: the ids whose label files exist (files that could not
  be labelled are left out of training, with a warning).
* :func:`teacher_plan`, :func:`prepare`, :func:`online_generator`: the recipe's
  use of the above, driven by its hparams (``acoustic_teacher``,
  ``online_teachers``, ``online_cqt``, ``max_*_files``, ...).
"""
from __future__ import annotations

import csv
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from mert_plugin.audio import load_audio
from mert_plugin.errors import MERTError

logger = logging.getLogger(__name__)


def read_manifest(csv_path: str, data_folder: str, max_files: int = 0) -> List[Tuple[str, str]]:
    """-> [(audio path, id)] of a ``prepare_music`` manifest (see :func:`spread` for ``max_files``)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = [(row["path"].replace("$data_root", data_folder), row["ID"]) for row in csv.DictReader(f)]
    return spread(rows, max_files)


def spread(items: Sequence, max_items: int = 0) -> list:
    """At most ``max_items`` items evenly spaced through ``items`` (all of them for 0): a
    deterministic subset that covers the whole (sorted) corpus."""
    items = list(items)
    if max_items <= 0 or len(items) <= max_items:
        return items
    return [items[i * len(items) // max_items] for i in range(max_items)]


def build_generator(acoustic: str, encodec_checkpoint: Optional[str], use_cqt: bool,
                    teacher_state: Optional[str], seed: int = 0, **teacher_options):
    """``LabelGenerator.from_spec`` with the state file only for teachers that have one;
    ``teacher_options``: ``num_clusters`` / ``num_codebooks`` of the k-means teachers."""
    from mert_plugin.teachers import FITTABLE_KINDS, LabelGenerator

    state = teacher_state if acoustic in FITTABLE_KINDS else None
    gen = LabelGenerator.from_spec(acoustic=acoustic, encodec_checkpoint=encodec_checkpoint, use_cqt=use_cqt,
                                   teacher_state=state, seed=seed, **teacher_options)
    if not gen.ready:
        raise MERTError(f"the {acoustic!r} teacher is not fitted: {teacher_state} is missing")
    return gen


def fit_teacher(acoustic: str, teacher_state: str, files: Sequence[Tuple[str, str]], seed: int = 0,
                teacher_options: Optional[dict] = None, **fit_kwargs) -> None:
    """Fit a fitted-kind acoustic teacher on ``files`` [(path, id)] unless ``teacher_state``
    exists; ``fit_kwargs`` go to the teacher's ``fit`` (e.g. ``iters``)."""
    from mert_plugin.teachers import FITTABLE_KINDS, LabelGenerator

    if acoustic not in FITTABLE_KINDS or os.path.isfile(teacher_state):
        return
    gen = LabelGenerator.from_spec(acoustic=acoustic, use_cqt=False, seed=seed, **(teacher_options or {}))
    logger.info(f"Fitting the {acoustic!r} teacher on {len(files)} training files")
    gen.fit(_load_all(files, gen.sample_rate), **fit_kwargs)
    gen.save_state(teacher_state)


def _load_all(files: Sequence[Tuple[str, str]], sample_rate: int) -> Iterable:
    for path, _ in files:
        try:
            yield load_audio(path, sample_rate)
        except MERTError as exc:
            logger.warning(f"teacher fit: skipping {exc}")


def ensure_offline_labels(files: Sequence[Tuple[str, str]], label_folder: str, acoustic: str,
                          encodec_checkpoint: Optional[str], use_cqt: bool, teacher_state: Optional[str],
                          seed: int = 0, device: Optional[str] = None,
                          teacher_options: Optional[dict] = None) -> Dict[str, int]:
    """Label the ``files`` [(path, id)] that have no labels in ``label_folder`` yet."""
    from mert_plugin.labels import generate_labels

    todo = [(path, clip_id) for path, clip_id in files
            if not has_labels(label_folder, clip_id, acoustic != "none", use_cqt)]
    if not todo:
        logger.info(f"Offline labels in {label_folder} are complete")
        return {"labelled": 0}
    logger.info(f"Computing offline labels for {len(todo)} files into {label_folder}")
    gen = build_generator(acoustic, encodec_checkpoint, use_cqt, teacher_state, seed, **(teacher_options or {}))
    if device:
        gen.to(device)
    summary = generate_labels(todo, label_folder, gen, write_cqt=use_cqt, progress=True)
    for path, reason in summary.failed:
        logger.warning(f"no labels for {path}: {reason}")
    return {"labelled": summary.done, "failed": len(summary.failed)}


def has_labels(label_folder: str, clip_id: str, codes: bool = True, cqt: bool = True) -> bool:
    from mert_plugin.labels import label_paths

    codes_path, cqt_path = label_paths(label_folder, clip_id)
    return (not codes or os.path.isfile(codes_path)) and (not cqt or os.path.isfile(cqt_path))


def labelled_ids(ids: Sequence[str], label_folder: str, codes: bool, cqt: bool) -> List[str]:
    ok = [i for i in ids if has_labels(label_folder, i, codes, cqt)]
    if len(ok) < len(ids):
        logger.warning(f"{len(ids) - len(ok)} file(s) have no offline labels (labelling failed) and are left out")
    return ok


# ------------------------------------------------------------ recipe glue
def selected_files(hparams, split):
    """[(path, id)] of the split's manifest, limited to ``max_<split>_files`` (0 = all)."""
    return read_manifest(hparams[f"{split}_csv"], hparams["data_folder"], hparams[f"max_{split}_files"])


def teacher_plan(hparams):
    """Which labels come from files (offline) and which from the training step (online)."""
    acoustic, use_cqt = hparams["acoustic_teacher"], hparams["objective"].use_cqt
    online_codes = acoustic != "none" and hparams["online_teachers"]
    online_cqt = use_cqt and (hparams["online_teachers"] or hparams["online_cqt"])
    return {"acoustic": acoustic, "offline_codes": acoustic != "none" and not online_codes,
            "offline_cqt": use_cqt and not online_cqt, "online_codes": online_codes, "online_cqt": online_cqt}


def prepare(hparams, device=None):
    """Main process: fit the demo teacher if needed, then compute missing offline labels."""
    plan = teacher_plan(hparams)
    fit_teacher(plan["acoustic"], hparams["teacher_state"],
                spread(selected_files(hparams, "train"), hparams["teacher_fit_files"]),
                hparams["seed"], hparams.get("teacher_options") or {}, **hparams["teacher_fit_options"])
    if plan["offline_codes"] or plan["offline_cqt"]:
        ensure_offline_labels(
            selected_files(hparams, "train") + selected_files(hparams, "valid"), hparams["label_folder"],
            plan["acoustic"] if plan["offline_codes"] else "none", hparams["encodec_checkpoint"],
            plan["offline_cqt"], hparams["teacher_state"], hparams["seed"], device,
            hparams.get("teacher_options") or {})


def online_generator(hparams):
    """The frozen LabelGenerator for the labels made in the training step, or None."""
    plan = teacher_plan(hparams)
    if not (plan["online_codes"] or plan["online_cqt"]):
        return None
    return build_generator(plan["acoustic"] if plan["online_codes"] else "none", hparams["encodec_checkpoint"],
                           plan["online_cqt"], hparams["teacher_state"], hparams["seed"],
                           **(hparams.get("teacher_options") or {}))
