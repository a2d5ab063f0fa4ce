"""s3prl hub entries for MERT (``-u mert``, ``-u mert_v1_95m``, ...).

Every entry has the signature s3prl's runner and ``s3prl.nn.S3PRLUpstream``
call: ``entry(ckpt=None, model_config=None, refresh=False, **kwargs)``.

* ``mert_local``: s3prl's ``<name>_local`` convention (``hubert_local``,
  ``wav2vec2_local``, ...): a local checkpoint of any geometry, ``-k`` required
  (HF folder, fairseq ``.pt``, SpeechBrain recipe ``CKPT+...`` folder).
* ``mert``: the same, kept for existing commands; without ``-k``, MERT-v1-95M.
* ``mert_v1_95m``, ``mert_v1_330m``, ``mert_v0``: the released models. Without
  ``-k`` they resolve through ``huggingface_hub`` as s3prl's and transformers'
  users expect: downloaded into the HF cache when the hub can be reached, read
  from the cache otherwise or with ``HF_HUB_OFFLINE=1``; ``-r`` (refresh)
  downloads again. With ``-k`` the checkpoint must have that model's geometry.
  ``mert_v0`` normalises each clip (zero mean, unit variance) as its HF
  processor does; the v1 entries feed raw audio, as theirs do.

Keyword arguments (``S3PRLUpstream(..., extra_conf={...})``) go to
:class:`~s3prl_upstream.expert.UpstreamExpert`: ``feature_grad_mult``, ``normalize_wav``.

``refresh`` re-downloads a named release from the hub (``force_download``); it is
ignored with ``-k`` (a local checkpoint). Like ``s3prl/upstream/<name>/hubconf.py``, this file can be
copied into a fork of s3prl unchanged, next to ``expert.py``.
"""
from __future__ import annotations

from typing import Optional

from .expert import UpstreamExpert as _UpstreamExpert

# entry name -> (hub id of the released weights, preset whose geometry -k must have,
#                whether its HF processor normalises the waveform (do_normalize))
_RELEASES = {
    "mert": ("m-a-p/MERT-v1-95M", None, False),
    "mert_local": (None, None, False),
    "mert_v1_95m": ("m-a-p/MERT-v1-95M", "mert-v1-95m", False),
    "mert_v1_330m": ("m-a-p/MERT-v1-330M", "mert-v1-330m", False),
    "mert_v0": ("m-a-p/MERT-v0", "mert-v0", True),
}


def _build(entry: str, ckpt: Optional[str], model_config: Optional[str], refresh: bool = False,
           **kwargs) -> _UpstreamExpert:
    repo_id, preset, normalize = _RELEASES[entry]
    if not ckpt and model_config is None:
        if repo_id is None:
            from mert_plugin.errors import CheckpointError

            raise CheckpointError(f"-u {entry} needs -k: a local MERT checkpoint (HF folder, fairseq .pt or "
                                  f"SpeechBrain CKPT+... folder); for a released model use -u mert_v1_95m, "
                                  f"mert_v1_330m or mert_v0")
        ckpt, preset = _hub_release(entry, repo_id, refresh), None  # the release is what it is
    kwargs.setdefault("normalize_wav", normalize)
    return _UpstreamExpert(ckpt, model_config, expected_preset=preset, **kwargs)


def _hub_release(entry: str, repo_id: str, refresh: bool = False) -> str:
    """Snapshot folder of ``repo_id`` through huggingface_hub (download, or the HF cache when
    offline / HF_HUB_OFFLINE=1), or a CheckpointError saying what to do."""
    from mert_plugin.checkpoint import resolve_hub_model
    from mert_plugin.errors import CheckpointError

    try:
        return resolve_hub_model(repo_id, force_download=bool(refresh))
    except CheckpointError as exc:
        raise CheckpointError(f"-u {entry} without -k: {exc} A local folder or file is passed with -k "
                              f"(-u mert_local -k PATH).") from None


def mert_local(ckpt: Optional[str] = None, model_config: Optional[str] = None, refresh: bool = False, **kwargs):
    """MERT from a local checkpoint of any geometry (``-k``, required), as s3prl's ``*_local`` entries."""
    return _build("mert_local", ckpt, model_config, **kwargs)


def mert(ckpt: Optional[str] = None, model_config: Optional[str] = None, refresh: bool = False, **kwargs):
    """MERT from a local checkpoint of any geometry (``-k``); MERT-v1-95M through the HF hub without it."""
    return _build("mert", ckpt, model_config, refresh=refresh, **kwargs)


def mert_v1_95m(ckpt: Optional[str] = None, model_config: Optional[str] = None, refresh: bool = False, **kwargs):
    """MERT-v1-95M (12 layers, 768-d, 24 kHz); weights from ``-k`` or the HF hub/cache."""
    return _build("mert_v1_95m", ckpt, model_config, refresh=refresh, **kwargs)


def mert_v1_330m(ckpt: Optional[str] = None, model_config: Optional[str] = None, refresh: bool = False, **kwargs):
    """MERT-v1-330M (24 layers, 1024-d, 24 kHz); weights from ``-k`` or the HF hub/cache."""
    return _build("mert_v1_330m", ckpt, model_config, refresh=refresh, **kwargs)


def mert_v0(ckpt: Optional[str] = None, model_config: Optional[str] = None, refresh: bool = False, **kwargs):
    """MERT-v0 (12 layers, 768-d, 16 kHz: no resampling); weights from ``-k`` or the HF hub/cache."""
    return _build("mert_v0", ckpt, model_config, refresh=refresh, **kwargs)
