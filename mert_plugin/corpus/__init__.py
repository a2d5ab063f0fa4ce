"""Embedded default corpus: music21 scores rendered to 24 kHz audio clips with labels.

Public API::

    build_corpus(out_dir, num_pieces=20, clip_seconds=5.0, seed=0, renderer="auto", ...) -> manifest dict
    (renderer: "auto" = sampled GM instruments via tinysoundfont when installed, else the built-in synth;
     its instrument classes are families of GM programs, split by program: test instruments are unseen)
    import_folder(audio_dir, labels_csv, out_dir, task="custom", ...) -> manifest dict
    read_task_csv(csv_path) -> TaskTable

See docs/CORPUS_AND_PROBING.md for the output layout and CSV formats.
"""
from .build import ALL_TASKS, build_corpus, resolve_renderer
from .render import GM_INSTRUMENTS, GM_PROGRAMS, TIMBRES, Note, RenderError, render_soundfont, render_synth
from .scores import DEFAULT_COMPOSERS, KEY_CLASSES, key_of, score_to_notes, transpose_key
from .tables import CorpusError, TaskTable, assign_splits, read_task_csv

__all__ = [
    "ALL_TASKS", "DEFAULT_COMPOSERS", "GM_INSTRUMENTS", "GM_PROGRAMS", "KEY_CLASSES", "TIMBRES", "CorpusError", "Note",
    "RenderError", "TaskTable", "assign_splits", "build_corpus", "key_of", "read_task_csv", "render_soundfont",
    "render_synth", "resolve_renderer", "score_to_notes", "transpose_key",
]
