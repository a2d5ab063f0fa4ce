"""s3prl hub entries for MERT (``-u mert``, ``-u mert_v1_95m``, ...).

Every entry has the signature s3prl's runner and ``s3prl.nn.S3PRLUpstream``
call: ``entry(ckpt=None, model_config=None, refresh=False, **kwargs)``.

* ``mert``: any MERT checkpoint given with ``-k`` (HF folder, fairseq ``.pt``,
  SpeechBrain recipe ``CKPT+...`` folder); without ``-k``, MERT-v1-95M.
* ``mert_v1_95m``, ``mert_v1_330m``, ``mert_v0``: the released models. Without
  ``-k`` the weights come from the local Hugging Face cache only (nothing is
  downloaded); with ``-k`` the checkpoint must have that model's geometry.
  ``mert_v0`` normalises each clip (zero mean, unit variance) as its HF
  processor does; the v1 entries feed raw audio, as theirs do.

Keyword arguments (``S3PRLUpstream(..., extra_conf={...})``) go to
:class:`~s3prl_upstream.expert.UpstreamExpert`: ``feature_grad_mult``, ``normalize_wav``.

``refresh`` is accepted for interface compatibility and ignored: nothing is
ever downloaded. Like ``s3prl/upstream/<name>/hubconf.py``, this file can be
copied into a fork of s3prl unchanged, next to ``expert.py``.
"""
from __future__ import annotations

from typing import Optional

from .expert import UpstreamExpert as _UpstreamExpert

# entry name -> (hub id of the released weights, preset whose geometry -k must have,
#                whether its HF processor normalises the waveform (do_normalize))
_RELEASES = {
    "mert": ("m-a-p/MERT-v1-95M", None, False),
    "mert_v1_95m": ("m-a-p/MERT-v1-95M", "mert-v1-95m", False),
    "mert_v1_330m": ("m-a-p/MERT-v1-330M", "mert-v1-330m", False),
    "mert_v0": ("m-a-p/MERT-v0", "mert-v0", True),
}


def _build(entry: str, ckpt: Optional[str], model_config: Optional[str], **kwargs) -> _UpstreamExpert:
    repo_id, preset, normalize = _RELEASES[entry]
    if not ckpt and model_config is None:
        ckpt, preset = _cached_release(entry, repo_id), None  # the release is what it is
    kwargs.setdefault("normalize_wav", normalize)
    return _UpstreamExpert(ckpt, model_config, expected_preset=preset, **kwargs)


def _cached_release(entry: str, repo_id: str) -> str:
    """Folder of ``repo_id`` in the local HF cache, or a CheckpointError saying what to put where."""
    from mert_plugin.checkpoint import resolve_hf_cache
    from mert_plugin.errors import CheckpointError

    try:
        return resolve_hf_cache(repo_id)
    except CheckpointError as exc:
        raise CheckpointError(f"-u {entry} without -k reads the local Hugging Face cache only. {exc} "
                              f"Such a folder or file is passed with -k.") from None


def mert(ckpt: Optional[str] = None, model_config: Optional[str] = None, refresh: bool = False, **kwargs):
    """MERT from a local checkpoint of any geometry (``-k``); MERT-v1-95M from the HF cache without it."""
    return _build("mert", ckpt, model_config, **kwargs)


def mert_v1_95m(ckpt: Optional[str] = None, model_config: Optional[str] = None, refresh: bool = False, **kwargs):
    """MERT-v1-95M (12 layers, 768-d, 24 kHz); weights from ``-k`` or the local HF cache."""
    return _build("mert_v1_95m", ckpt, model_config, **kwargs)


def mert_v1_330m(ckpt: Optional[str] = None, model_config: Optional[str] = None, refresh: bool = False, **kwargs):
    """MERT-v1-330M (24 layers, 1024-d, 24 kHz); weights from ``-k`` or the local HF cache."""
    return _build("mert_v1_330m", ckpt, model_config, **kwargs)


def mert_v0(ckpt: Optional[str] = None, model_config: Optional[str] = None, refresh: bool = False, **kwargs):
    """MERT-v0 (12 layers, 768-d, 16 kHz: no resampling); weights from ``-k`` or the local HF cache."""
    return _build("mert_v0", ckpt, model_config, **kwargs)
