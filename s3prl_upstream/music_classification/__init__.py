"""``-d music_classification``: clip-level music classification from a ``path,label,split`` CSV.

Laid out like ``s3prl/downstream/<name>/`` (``expert.py`` + ``dataset.py``);
:func:`s3prl_upstream.register` makes it importable as
``s3prl.downstream.music_classification``. Config: ``s3prl_upstream/configs/music_classification.yaml``.
"""
