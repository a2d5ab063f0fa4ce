"""The HEAR benchmark API over MERT (https://hearbenchmark.com, "common API").

::

    from extractors import hear
    model = hear.load_model("mert.onnx")          # or an HF folder / checkpoint, or "" for the default
    emb, ts = hear.get_timestamp_embeddings(audio, model)   # audio [n_sounds, n_samples] at 48 kHz
    scene = hear.get_scene_embeddings(audio, model)          # [n_sounds, D]

The HEAR validator accepts only 16000/22050/32000/44100/48000 Hz, so the model
takes 48 kHz (``model.sample_rate``) and resamples to MERT's 24 kHz inside
(soxr, very high quality: 48 -> 24 kHz is an exact 2:1 ratio).
Timestamp embeddings are one hidden state per MERT frame (75 per second,
13.3 ms apart; timestamps are frame centres in ms); long sounds are windowed
like :func:`mert_plugin.extract_features`. Scene embeddings are their mean
over time (the MARBLE protocol).
"""
from __future__ import annotations

import os
from typing import Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from mert_plugin.audio import resample
from mert_plugin.errors import AudioError, MERTError
from mert_plugin.extract import extract_features
from mert_plugin.model import MERTModel

from .onnx_model import OnnxMERT, normalise_layers

INPUT_SAMPLE_RATE = 48000
DEFAULT_MODEL_ENV = "MERT_HEAR_MODEL"
DEFAULT_MODEL = "m-a-p/MERT-v1-95M"  # resolved as transformers does (download, or the HF cache offline)


class HEARModel(nn.Module):
    """A MERT encoder (PyTorch or ONNX) with the HEAR attributes.

    ``sample_rate`` (input rate, 48000), ``scene_embedding_size`` and
    ``timestamp_embedding_size`` (both D). ``layer`` picks the hidden state
    (default -1, the last one, which the MERT authors suggest for general use).
    """

    sample_rate = INPUT_SAMPLE_RATE

    def __init__(self, encoder: Union[MERTModel, OnnxMERT], layer: int = -1):
        super().__init__()
        if isinstance(encoder, MERTModel):
            self.mert, self.onnx = encoder.eval(), None
            states, dim, self.mert_rate = encoder.config.num_hidden_states, encoder.config.hidden_size, \
                encoder.sample_rate
            self.hop, self.receptive_field = encoder.config.hop_length, encoder.config.receptive_field
        else:
            self.mert, self.onnx = None, encoder
            info = encoder.info
            states, dim, self.mert_rate = info.num_hidden_states, info.hidden_size, info.sample_rate
            self.hop, self.receptive_field = info.hop_length, info.receptive_field
        self.layer = normalise_layers([layer], states)[0]
        self.scene_embedding_size = int(dim)
        self.timestamp_embedding_size = int(dim)

    def frame_embeddings(self, sound: np.ndarray) -> np.ndarray:
        """One sound [N] at 48 kHz -> [T, D] float32 (T frames at MERT's rate)."""
        wav = resample(sound.astype(np.float32, copy=False), self.sample_rate, self.mert_rate)
        if wav.shape[0] < self.receptive_field:
            raise AudioError(f"sound of {sound.shape[0]} samples at {self.sample_rate} Hz is too short: MERT needs "
                             f"at least {self.receptive_field / self.mert_rate * 1000:.1f} ms for one frame")
        if self.onnx is not None:
            return self.onnx.encode(wav, layers=[self.layer])[0]
        return extract_features(self.mert, torch.from_numpy(np.ascontiguousarray(wav)), layers=[self.layer])[0].numpy()

    def timestamps_ms(self, num_frames: int) -> np.ndarray:
        """Centre of each frame's receptive field, in ms."""
        t = np.arange(num_frames, dtype=np.float64)
        return ((t * self.hop + self.receptive_field / 2) / self.mert_rate * 1000.0).astype(np.float32)


def load_model(model_file_path: str = "", layer: int = -1, num_threads: int = 0) -> HEARModel:
    """Load MERT for HEAR.

    ``model_file_path``: a ``.onnx`` graph from ``mert-export-onnx``, anything
    :meth:`MERTModel.from_pretrained` reads (HF folder, hub id, fairseq
    ``.pt``, SpeechBrain checkpoint folder), or ``preset:NAME`` for random
    weights (tests). Empty: ``$MERT_HEAR_MODEL``, else ``m-a-p/MERT-v1-95M`` through
    ``huggingface_hub`` (downloaded when online; the cache offline or with ``HF_HUB_OFFLINE=1``).
    """
    path = model_file_path or os.environ.get(DEFAULT_MODEL_ENV, "") or DEFAULT_MODEL
    if str(path).endswith(".onnx"):
        encoder = OnnxMERT(path, num_threads=num_threads)
    elif str(path).startswith("preset:"):
        encoder = MERTModel.from_preset(str(path)[len("preset:"):], seed=0).eval()
    else:
        encoder = MERTModel.from_pretrained(path)
    return HEARModel(encoder, layer=layer)


def get_timestamp_embeddings(audio: Tensor, model: HEARModel) -> Tuple[Tensor, Tensor]:
    """audio [n_sounds, n_samples] at ``model.sample_rate`` ->
    (embeddings [n_sounds, n_frames, D] float32, timestamps [n_sounds, n_frames] in ms)."""
    sounds = _check_audio(audio)
    with torch.inference_mode():
        frames = [model.frame_embeddings(s) for s in sounds]
    emb = torch.from_numpy(np.stack(frames)).to(audio.device)
    ts = torch.from_numpy(np.tile(model.timestamps_ms(emb.shape[1]), (emb.shape[0], 1))).to(audio.device)
    return emb, ts


def get_scene_embeddings(audio: Tensor, model: HEARModel) -> Tensor:
    """audio [n_sounds, n_samples] at ``model.sample_rate`` -> [n_sounds, D] float32 (mean over frames)."""
    emb, _ = get_timestamp_embeddings(audio, model)
    return emb.mean(dim=1)


def _check_audio(audio) -> np.ndarray:
    if not isinstance(audio, Tensor):
        raise MERTError(f"audio must be a torch.Tensor [n_sounds, n_samples], got {type(audio).__name__}")
    if audio.dim() != 2:
        raise AudioError(f"audio must be [n_sounds, n_samples], got shape {list(audio.shape)}")
    if not audio.is_floating_point():
        raise AudioError(f"audio must be floating point, got {audio.dtype}")
    sounds = audio.detach().to("cpu", torch.float32).numpy()
    if sounds.shape[0] == 0:
        raise AudioError("audio holds no sounds (n_sounds = 0)")
    if not np.isfinite(sounds).all():
        raise AudioError("audio contains NaN or infinite samples")
    return sounds
