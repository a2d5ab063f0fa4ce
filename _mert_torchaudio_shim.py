"""Make ``import torchaudio`` work on a CPU-only torch build.

PyPI's torchaudio 2.11 wheel links its native libraries against CUDA
(libc10_cuda.so, libcudart.so.13). With the CPU build of torch those libraries
cannot load and ``import torchaudio`` raises ``OSError`` -- which also breaks
``import encodec``, ``import speechbrain`` and ``import s3prl.hub``.

Loaded through a ``.pth`` file (see ``python -m mert_plugin.compat``), this
module registers a stub ``torchaudio._extension`` *before* torchaudio is
imported, but only when torch is a CPU build and the installed torchaudio is a
CUDA build. torchaudio then imports with its pure-Python parts (resample,
MelSpectrogram, MFCC, ...) and raises a clear error in the few functions that
need the C++ extension. It never imports torch itself (start-up cost ~1 ms).
"""
import importlib.util
import os
import sys
import types


def _torch_is_cpu_build():
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    return os.path.isdir(lib) and not os.path.exists(os.path.join(lib, "libc10_cuda.so"))


def _torchaudio_is_cuda_build():
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or not spec.submodule_search_locations:
        return False
    root = list(spec.submodule_search_locations)[0]
    try:
        with open(os.path.join(root, "version.py")) as f:
            return "+cu" in f.read()
    except OSError:
        return False


def install():
    """Register the stub extension module if (and only if) it is needed."""
    if "torchaudio" in sys.modules or "torchaudio._extension" in sys.modules:
        return False
    if not (_torch_is_cpu_build() and _torchaudio_is_cuda_build()):
        return False
    ext = types.ModuleType("torchaudio._extension")
    ext._IS_TORCHAUDIO_EXT_AVAILABLE = False
    ext._IS_ALIGN_AVAILABLE = False

    def fail_if_no_align(fn):
        def _raise(*args, **kwargs):
            raise RuntimeError(
                "torchaudio's C++ extension is unavailable (CUDA-linked wheel on a CPU torch build)"
            )
        return _raise

    ext.fail_if_no_align = fail_if_no_align
    ext._load_lib = lambda lib: False
    ext._check_cuda_version = lambda: None
    sys.modules["torchaudio._extension"] = ext
    return True


install()
