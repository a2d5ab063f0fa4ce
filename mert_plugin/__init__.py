"""Native PyTorch implementation of MERT (arXiv 2306.00107).

Public API::

    from mert_plugin import MERTConfig, MERTModel, load_audio, extract_features
"""
from .audio import find_audio_files, load_audio, prepare_waveform
from .config import MERTConfig
from .errors import AudioError, CheckpointError, ConfigError, MERTError
from .extract import extract_features, iter_windows, plan_windows
from .model import MERTModel, MERTOutput

__version__ = "0.1.0"
__all__ = [
    "MERTConfig", "MERTModel", "MERTOutput", "load_audio", "prepare_waveform", "find_audio_files",
    "extract_features", "iter_windows", "plan_windows",
    "MERTError", "AudioError", "ConfigError", "CheckpointError",
]
