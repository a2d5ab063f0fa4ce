"""Runner configs (``-c``) shipped with the package: s3prl's pip package ships none.

``example.yaml``: a few-step smoke test of ``-d example``; ``music_classification.yaml``:
``-d music_classification``. Get a path with :func:`s3prl_upstream.config_path`.
"""
