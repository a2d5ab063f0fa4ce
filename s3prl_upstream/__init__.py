"""MERT for s3prl: ``-u mert`` upstreams and a music downstream, without forking s3prl.

s3prl 0.4.18 has no plugin mechanism: ``s3prl.hub`` is a static list of
upstream entries and downstreams are imported as ``s3prl.downstream.<d>.expert``.
:func:`register` applies the compatibility fixes (:mod:`s3prl_upstream.compat`),
adds the hub entries (:mod:`s3prl_upstream.hubconf`) to the shared
``s3prl.hub`` module object and makes the ``music_classification`` downstream
importable under ``s3prl.downstream``. After it, the runner and
``s3prl.nn.S3PRLUpstream("mert", path_or_url=...)`` resolve the entries.

Command line: ``python -m s3prl_upstream.run_downstream <run_downstream.py args>``
(or ``mert-s3prl-downstream``). Importing this package imports neither s3prl nor
torchaudio; :func:`register` does.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import List

UPSTREAM_ENTRIES = ("mert", "mert_local", "mert_v1_95m", "mert_v1_330m", "mert_v0")
# s3prl downstream name -> our package implementing it (s3prl's downstream/<d>/ layout)
DOWNSTREAMS = {"music_classification": "s3prl_upstream.music_classification"}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

__all__ = ["register", "config_path", "shipped_configs", "UPSTREAM_ENTRIES", "DOWNSTREAMS"]


def register() -> List[str]:
    """Make ``-u mert*`` and ``-d music_classification`` resolvable by s3prl in this process.

    Idempotent. Returns the compatibility fixes applied in this process (see
    :mod:`s3prl_upstream.compat`). Call it before constructing s3prl objects
    (the runner, ``S3PRLUpstream``); under DDP every worker must call it.
    """
    from . import compat

    applied = compat.apply()
    import s3prl.hub as hub

    from . import hubconf

    for name in UPSTREAM_ENTRIES:
        entry = getattr(hubconf, name)
        existing = getattr(hub, name, None)
        if existing is not None and existing is not entry:
            warnings.warn(f"s3prl.hub already has an entry {name!r}; replacing it with the MERT upstream")
        setattr(hub, name, entry)

    import s3prl.downstream

    for name, package in DOWNSTREAMS.items():
        target = f"s3prl.downstream.{name}"
        pkg = importlib.import_module(package)
        native = os.path.join(os.path.dirname(s3prl.downstream.__file__), name)
        if os.path.isdir(native) or sys.modules.get(target, pkg) is not pkg:
            warnings.warn(f"{target} already exists; replacing it with {package}")
        sys.modules[target] = pkg
        sys.modules[f"{target}.expert"] = importlib.import_module(f"{package}.expert")
        setattr(s3prl.downstream, name, pkg)
    return applied


def shipped_configs() -> List[str]:
    """Names of the runner configs shipped in ``s3prl_upstream/configs``."""
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def config_path(name: str) -> str:
    """Path of a shipped runner config (``example``, ``music_classification``) for ``-c``."""
    path = os.path.join(CONFIG_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        from mert_plugin.errors import ConfigError

        raise ConfigError(f"no shipped s3prl config {name!r}; shipped: {shipped_configs()}")
    return path
