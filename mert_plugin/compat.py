"""Environment compatibility helpers.

``python -m mert_plugin.compat install-pth`` writes a ``.pth`` file into the
active environment's site-packages that loads :mod:`_mert_torchaudio_shim` at
interpreter start, so that CUDA-linked torchaudio wheels import on CPU-only
torch (needed by ``encodec``, ``speechbrain`` and ``s3prl``).
``python -m mert_plugin.compat check`` imports those packages and reports.
"""
import importlib
import os
import sys
import sysconfig

from .atomic import atomic_write_text

PTH_NAME = "zz_mert_torchaudio_shim.pth"


def ensure_torchaudio_importable():
    """Apply the torchaudio CPU shim in this process if it is needed and not yet applied."""
    import _mert_torchaudio_shim

    _mert_torchaudio_shim.install()


def install_pth():
    site = sysconfig.get_paths()["purelib"]
    path = os.path.join(site, PTH_NAME)
    atomic_write_text(path, "import _mert_torchaudio_shim\n")
    print(f"wrote {path}")


def check():
    failed = []
    for name in ("torch", "torchaudio", "encodec", "nnAudio", "speechbrain", "onnxruntime", "essentia"):
        try:
            mod = importlib.import_module(name)
            print(f"  {name:<12} {getattr(mod, '__version__', '?')}")
        except Exception as exc:  # report every failing import, not just the first
            failed.append(name)
            print(f"  {name:<12} FAILED: {type(exc).__name__}: {exc}")
    import torch

    if torch.version.cuda is None and any(n.startswith("nvidia") for n in _installed()):
        print("  warning: nvidia-* CUDA packages are installed next to a CPU torch")
    return 1 if failed else 0


def _installed():
    from importlib import metadata

    return [d.metadata["Name"].lower() for d in metadata.distributions()]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "check"
    if cmd == "install-pth":
        install_pth()
        return 0
    if cmd == "check":
        return check()
    print("usage: python -m mert_plugin.compat [install-pth|check]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
