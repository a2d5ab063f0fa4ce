"""Compatibility fixes that let s3prl 0.4.18 run on current torch/torchaudio/huggingface_hub.

s3prl 0.4.18 (its latest release) was written against torchaudio < 2.9,
huggingface_hub < 1.0 and torch < 2.6. On today's stacks ``import s3prl.hub``
and the downstream runner break in a few places. Each fix below first
*detects* the breakage and patches only what is actually broken, so on an old
stack where s3prl works as released nothing is touched. :func:`apply` returns
the names of the fixes it applied (``docs/S3PRL.md`` lists them with causes).

=========================  ================================================  ==========================================
fix                        symptom without it                                patch
=========================  ================================================  ==========================================
``torchaudio_cpu``         ``import torchaudio`` fails: the 2.11 wheel is    stub ``torchaudio._extension`` (only on a
                           CUDA-linked, torch is a CPU build                 CPU torch + CUDA torchaudio; see
                                                                             ``_mert_torchaudio_shim``)
``set_audio_backend``      ``import s3prl.hub`` and ``run_downstream.main``  no-op ``torchaudio.set_audio_backend``
                           call the function removed in torchaudio 2.9       (it was already a no-op since 2.2)
``sox_effects``            ``import s3prl.hub`` imports the removed          stub module whose functions raise a
                           ``torchaudio.sox_effects``                        clear error if a downstream calls them
``hf_hub_classes``         ``runner.py`` imports ``HfFolder``/``Repository`` placeholders that raise a clear error
                           removed in huggingface_hub 1.0                    when used (only ``--push_to_hf_hub``)
``weights_only_namespace`` ``-m evaluate -e`` / resume: torch >= 2.6 loads   allow-list ``argparse.Namespace`` for
                           with ``weights_only=True`` and rejects the        ``weights_only`` loading (the checkpoint
                           ``argparse.Namespace`` s3prl stores in its        stays safely loaded; no full unpickling)
                           checkpoints
=========================  ================================================  ==========================================

Launcher-level fixes (missing ``tensorboardX``, ``LOCAL_RANK`` from
``torchrun``, ``--device`` on CPU-only machines) live in
:mod:`s3prl_upstream.run_downstream`.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import types
from typing import Callable, List, NamedTuple


class Fix(NamedTuple):
    """One compatibility fix: ``needed()`` detects the breakage, ``patch()`` repairs it."""

    name: str
    needed: Callable[[], bool]
    patch: Callable[[], None]


# ----------------------------------------------------------------- torchaudio
def _torchaudio_import_broken() -> bool:
    if "torchaudio" in sys.modules or "torchaudio._extension" in sys.modules:
        return False  # already imported, or the start-up .pth shim already ran
    import _mert_torchaudio_shim

    return _mert_torchaudio_shim._torch_is_cpu_build() and _mert_torchaudio_shim._torchaudio_is_cuda_build()


def _patch_torchaudio_import() -> None:
    from mert_plugin.compat import ensure_torchaudio_importable

    ensure_torchaudio_importable()


def _set_audio_backend_missing() -> bool:
    import torchaudio

    return not hasattr(torchaudio, "set_audio_backend")


def _patch_set_audio_backend() -> None:
    import torchaudio

    def set_audio_backend(backend=None):
        """Removed in torchaudio 2.9 (a no-op since 2.2); kept as a no-op for s3prl."""

    torchaudio.set_audio_backend = set_audio_backend


def _sox_effects_missing() -> bool:
    if "torchaudio.sox_effects" in sys.modules:
        return False
    import torchaudio  # noqa: F401  (find_spec of a submodule needs the parent imported)

    return importlib.util.find_spec("torchaudio.sox_effects") is None


def _patch_sox_effects() -> None:
    import torchaudio

    module = types.ModuleType("torchaudio.sox_effects")
    module.__doc__ = "Placeholder: torchaudio.sox_effects was removed in torchaudio 2.9."

    def _removed(*args, **kwargs):
        raise RuntimeError(
            "torchaudio.sox_effects was removed in torchaudio 2.9; this s3prl downstream needs "
            "torchaudio < 2.9 (use a downstream that reads audio with soundfile, such as music_classification)")

    module.apply_effects_tensor = _removed
    module.apply_effects_file = _removed
    module.effect_names = _removed
    sys.modules["torchaudio.sox_effects"] = module
    torchaudio.sox_effects = module


# ------------------------------------------------------------ huggingface_hub
_HF_REMOVED = ("HfFolder", "Repository")


def _hf_classes_missing() -> bool:
    import huggingface_hub

    return any(not hasattr(huggingface_hub, name) for name in _HF_REMOVED)


def _removed_hf_class(name: str) -> type:
    message = (f"huggingface_hub.{name} was removed in huggingface_hub 1.0; s3prl's "
               f"--push_to_hf_hub / --hub huggingface features that use it are unavailable")

    def _raise(*args, **kwargs):
        raise RuntimeError(message)

    return type(name, (), {"__doc__": f"Placeholder: {message}.", "__init__": _raise,
                           "get_token": staticmethod(_raise), "save_token": staticmethod(_raise)})


def _patch_hf_classes() -> None:
    import huggingface_hub

    for name in _HF_REMOVED:
        if not hasattr(huggingface_hub, name):
            setattr(huggingface_hub, name, _removed_hf_class(name))


# ----------------------------------------------------------------------- torch
def _namespace_rejected_by_torch_load() -> bool:
    """True if plain ``torch.load`` (as s3prl calls it) refuses an ``argparse.Namespace``."""
    import torch

    buf = io.BytesIO()
    torch.save({"Args": argparse.Namespace(probe=1)}, buf)
    buf.seek(0)
    try:
        torch.load(buf, map_location="cpu")
    except Exception:  # torch >= 2.6: UnpicklingError "Unsupported global: argparse.Namespace"
        return hasattr(torch.serialization, "add_safe_globals")
    return False


def _patch_namespace_safe_global() -> None:
    import torch

    # Allow-listing keeps weights_only loading (no arbitrary code); Namespace only
    # stores attributes, so admitting it cannot execute anything.
    torch.serialization.add_safe_globals([argparse.Namespace])


FIXES: List[Fix] = [
    Fix("torchaudio_cpu", _torchaudio_import_broken, _patch_torchaudio_import),
    Fix("set_audio_backend", _set_audio_backend_missing, _patch_set_audio_backend),
    Fix("sox_effects", _sox_effects_missing, _patch_sox_effects),
    Fix("hf_hub_classes", _hf_classes_missing, _patch_hf_classes),
    Fix("weights_only_namespace", _namespace_rejected_by_torch_load, _patch_namespace_safe_global),
]

_applied: List[str] = []


def apply() -> List[str]:
    """Apply every fix whose breakage is detected in this process; idempotent.

    Must run before the first ``import s3prl...``. Returns the names of all
    fixes applied in this process so far.
    """
    for fix in FIXES:
        if fix.name not in _applied and fix.needed():
            fix.patch()
            _applied.append(fix.name)
    return list(_applied)
