"""Frozen teachers that label audio for MERT pretraining (MERT_SPEC.md §4).

* :class:`EncodecTeacher` -- the acoustic teacher of MERT-v1: the first 8 RVQ
  codebooks of EnCodec 24 kHz at 6 kbps, 1024 codes each, 75 Hz. Either the
  official checkpoint, or (explicitly, for tests and demos only) a *fitted*
  teacher: a randomly initialised, seeded EnCodec encoder whose 8 codebooks are
  fitted by residual k-means on your own audio.
* :class:`CQTTeacher` -- the musical teacher: nnAudio's CQT with the reference
  settings (linear magnitude, 336 bins, 75 Hz), computed on clean audio.
* :class:`MFCCKMeansTeacher` -- MERT-v0 style labels: k-means over MFCC + deltas
  at 16 kHz / 50 Hz (HuBERT iteration-1 features), fitted on your data.
* :class:`MFCCTarget` -- not a MERT teacher: each frame's MFCCs 1-19 on the 75 Hz
  grid, a continuous timbre target for small-scale runs (``mfcc_weight``).
* :class:`LabelGenerator` -- the teachers together, cropped to the student's
  frames; used offline (``mert-labels``) and online (in the training step).

Frame alignment: the student has ``T = (N - 400) // 320 + 1`` frames for N
samples. EnCodec produces ``ceil(N / 320)`` frames (one or two more) and the
centred CQT ``N // 320 + 1``; as the reference (``forward_targets`` keeps
``arange(T)``), the *first* T label frames are kept and the extra tail frames
are dropped. EnCodec is causal and the CQT pads with zeros, so a clip's labels
do not change when the batch is right-padded with zeros (up to float rounding,
which can flip a code at a near-tie).
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .atomic import atomic_path
from .config import MERTConfig
from .errors import CheckpointError, MERTError

logger = logging.getLogger(__name__)

ENCODEC_CHECKPOINT = "encodec_24khz-d7cc33bc.th"
ENCODEC_BANDWIDTH = 6.0
ENCODEC_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + ENCODEC_CHECKPOINT
STATE_FORMAT = "mert-plugin-teacher-state"
MIN_FRAMES_PER_CODE = 4  # fitted teacher: fewer frames per code than this fits fewer codes
UNUSED_CODE_VALUE = 1.0e4  # coordinate of codes left unused by the fitted teacher (never nearest)

# The reference CQT target (mert_model.py class model_cqt_pred).
CQT_SETTINGS = dict(hop_length=320, fmin=32.7, n_bins=336, bins_per_octave=48, filter_scale=1, norm=1,
                    window="hann", center=True, pad_mode="constant", output_format="Magnitude")

FITTED_WARNING = ("acoustic teacher 'fitted': codebooks are k-means fitted on YOUR audio over a randomly "
                  "initialised EnCodec encoder (seed {seed}). These are NOT MERT's EnCodec labels; use them "
                  "only for tests and offline demos.")


# ----------------------------------------------------------------- utilities
def _student_frames(num_samples: int) -> int:
    """Frames of every MERT student (400-sample receptive field, 320-sample hop)."""
    return MERTConfig().num_frames(num_samples)


def _as_batch(wav: Tensor, name: str = "wav") -> Tensor:
    if not isinstance(wav, Tensor):
        raise MERTError(f"{name} must be a torch.Tensor, got {type(wav).__name__}")
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2 or not wav.is_floating_point():
        raise MERTError(f"{name} must be a float tensor [B, N] (mono), got {wav.dtype} {list(wav.shape)}")
    if not bool(torch.isfinite(wav).all()):
        raise MERTError(f"{name} contains NaN or infinite samples")
    return wav


def kmeans(x: Tensor, k: int, iters: int = 20, seed: int = 0, chunk: int = 8192) -> Tensor:
    """Lloyd's k-means. x [N, D] -> centroids [k, D].

    Initialised from k distinct random samples (with repetition when N < k, which
    leaves codes unused); an empty cluster keeps its previous centroid, as
    EnCodec's own k-means init. Written in torch so that it runs on the GPU too.
    """
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    idx = torch.randperm(n, generator=g)[:k] if n >= k else torch.randint(n, (k,), generator=g)
    centroids = x[idx.to(x.device)].clone()
    for _ in range(iters):
        assign = nearest(x, centroids, chunk)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
    return centroids


def nearest(x: Tensor, centroids: Tensor, chunk: int = 8192) -> Tensor:
    """Index of the nearest centroid (squared Euclidean) for each row: [N, D] -> [N] long."""
    c_sq = centroids.pow(2).sum(-1)
    out = [(c_sq - 2 * part @ centroids.T).argmin(-1) for part in x.split(chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def _sha256_prefix(path: str, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


# ------------------------------------------------------------------- EnCodec
def resolve_encodec_checkpoint(path: Optional[str] = None) -> str:
    """Find the official EnCodec 24 kHz weights.

    ``path`` may be the file or a folder holding it; without ``path``, encodec's
    own cache (``torch.hub.get_dir()/checkpoints/``) is searched. Raises
    :class:`CheckpointError` naming the file and where to put it.
    """
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    candidates = []
    if path is not None:
        path = os.fspath(path)
        candidates.append(os.path.join(path, ENCODEC_CHECKPOINT) if os.path.isdir(path) else path)
    else:
        candidates.append(os.path.join(cache, ENCODEC_CHECKPOINT))
    for c in candidates:
        if os.path.isfile(c):
            return c
    where = candidates[0]
    raise CheckpointError(
        f"EnCodec teacher weights not found: {where}. Download {ENCODEC_CHECKPOINT} from {ENCODEC_URL} and "
        f"put it in {cache} (encodec's own cache; TORCH_HOME moves it) or pass its path "
        "(--encodec-checkpoint / encodec_checkpoint=). For offline tests and demos without it, use the "
        "explicit acoustic='fitted' teacher.")


def build_encodec_24khz(checkpoint: Optional[str] = None, pretrained: bool = True, seed: int = 0):
    """EnCodec 24 kHz (``encodec`` package) in eval mode at 6 kbps.

    ``pretrained=True`` loads the official weights (see
    :func:`resolve_encodec_checkpoint`) with ``torch.load(weights_only=True)``;
    the SHA-256 prefix in the official file name is checked. ``pretrained=False``
    gives a random model drawn from ``seed`` (without touching the global RNG);
    its codebooks are all zero until fitted.
    """
    from .compat import ensure_torchaudio_importable

    ensure_torchaudio_importable()
    from encodec import EncodecModel

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", FutureWarning)  # encodec uses the old weight_norm API
        torch.manual_seed(seed)
        model = EncodecModel.encodec_model_24khz(pretrained=False)
    if pretrained:
        file = resolve_encodec_checkpoint(checkpoint)
        if os.path.basename(file) == ENCODEC_CHECKPOINT:
            expected = ENCODEC_CHECKPOINT.split("-")[1].split(".")[0]
            actual = _sha256_prefix(file, len(expected))
            if actual != expected:
                raise CheckpointError(f"{file}: checksum {actual} does not match the official {expected} "
                                      "(corrupt or partial download?)")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot load EnCodec weights ({type(exc).__name__}: {exc})") from None
        try:
            model.load_state_dict(state)
        except Exception as exc:
            raise CheckpointError(f"{file}: not an EnCodec 24 kHz state dict ({exc})") from None
    model.set_target_bandwidth(ENCODEC_BANDWIDTH)
    return model.eval()


class EncodecTeacher(nn.Module):
    """RVQ codes of EnCodec 24 kHz at 6 kbps: wav [B, N] -> codes [B, 8, ceil(N/320)] long.

    ``mode`` is ``"pretrained"`` (official weights) or ``"fitted"`` (random seeded
    encoder + codebooks from :meth:`fit`). Codes always go through encodec's own
    encoder and ``ResidualVectorQuantizer.encode``.
    """

    sample_rate = 24000

    def __init__(self, model, mode: str, seed: int = 0):
        super().__init__()
        self.model = model
        self.mode = mode
        self.seed = seed
        self.fitted = mode == "pretrained"
        layers = model.quantizer.vq.layers
        self.num_codebooks = model.quantizer.get_num_quantizers_for_bandwidth(model.frame_rate, ENCODEC_BANDWIDTH)
        self.codebook_size = model.quantizer.bins
        self._codebooks = [layers[i]._codebook for i in range(self.num_codebooks)]
        self.requires_grad_(False)

    @classmethod
    def pretrained(cls, checkpoint: Optional[str] = None) -> "EncodecTeacher":
        return cls(build_encodec_24khz(checkpoint, pretrained=True), "pretrained")

    @classmethod
    def random_fitted(cls, seed: int = 0) -> "EncodecTeacher":
        """The explicit demo/test teacher; call :meth:`fit` (or :meth:`load_tensors`) before use."""
        logger.warning(FITTED_WARNING.format(seed=seed))
        return cls(build_encodec_24khz(pretrained=False, seed=seed), "fitted", seed)

    def latents(self, wav: Tensor) -> Tensor:
        """Encoder output: wav [B, N] -> [B, 128, ceil(N/320)]."""
        return self.model.encoder(wav.unsqueeze(1))

    @torch.no_grad()
    def forward(self, wav: Tensor) -> Tensor:
        if not self.fitted:
            raise MERTError("the 'fitted' EnCodec teacher has no codebooks yet: call fit() on training audio "
                            "or load a saved teacher state (teacher_state=...)")
        emb = self.latents(wav)
        codes = self.model.quantizer.encode(emb, self.model.frame_rate, ENCODEC_BANDWIDTH)  # [K, B, T]
        return codes.transpose(0, 1)

    @torch.no_grad()
    def fit(self, wavs: Iterable[Tensor], iters: int = 20, max_frames: int = 100_000) -> None:
        """Residual k-means: stage k clusters what stages < k left unexplained.

        ``wavs``: tensors [N] or [B, N] at 24 kHz. At most ``max_frames`` latent
        frames (a seeded random subset) are clustered.
        """
        if self.mode != "fitted":
            raise MERTError("only the 'fitted' EnCodec teacher can be fitted; the official one is fixed")
        device = next(self.model.parameters()).device
        frames = [self.latents(_as_batch(w).to(device)).transpose(1, 2).reshape(-1, self.model.encoder.dimension)
                  for w in wavs]
        if not frames:
            raise MERTError("cannot fit the teacher: no audio given")
        x = torch.cat(frames).float()
        if x.shape[0] > max_frames:
            g = torch.Generator().manual_seed(self.seed)
            x = x[torch.randperm(x.shape[0], generator=g)[:max_frames].to(device)]
        # With fewer than MIN_FRAMES_PER_CODE frames per code, stage 1 would give
        # every frame its own centroid and leave nothing for stages 2-8: fit
        # fewer codes and park the rest far away, where nothing is ever nearest.
        used = min(self.codebook_size, max(1, x.shape[0] // MIN_FRAMES_PER_CODE))
        if used < self.codebook_size:
            logger.warning("only %d frames to fit on: using %d of the %d codes per codebook",
                           x.shape[0], used, self.codebook_size)
        residual = x
        for k, book in enumerate(self._codebooks):
            centroids = kmeans(residual, used, iters=iters, seed=self.seed + k)
            residual = residual - centroids[nearest(residual, centroids)]
            full = centroids.new_full((self.codebook_size, centroids.shape[1]), UNUSED_CODE_VALUE)
            full[:used] = centroids
            self._set_codebook(book, full)
        self.fitted = True
        logger.warning("fitted teacher: %d codebooks x %d codes fitted on %d frames (seed %d)",
                       len(self._codebooks), used, x.shape[0], self.seed)

    @staticmethod
    def _set_codebook(book, centroids: Tensor) -> None:
        book.embed.copy_(centroids)
        book.embed_avg.copy_(centroids)
        book.inited.fill_(1.0)

    def state_tensors(self) -> dict:
        """Everything a fitted teacher needs: encoder weights and the 8 codebooks."""
        out = {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in self.model.encoder.state_dict().items()}
        for k, book in enumerate(self._codebooks):
            out[f"codebook.{k}"] = book.embed.detach().cpu().contiguous()
        return out

    def load_tensors(self, tensors: dict, source: str) -> None:
        try:
            self.model.encoder.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items()
                                                if k.startswith("encoder.")})
            for k, book in enumerate(self._codebooks):
                self._set_codebook(book, tensors[f"codebook.{k}"].to(book.embed))
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{source}: not a fitted EnCodec teacher state ({exc})") from None
        self.fitted = True


# ----------------------------------------------------------------------- CQT
class CQTTeacher(nn.Module):
    """The reference CQT target: wav [B, N] -> linear magnitude [B, N // 320 + 1, 336].

    The kernels are nnAudio's ``CQT1992v2`` kernels for the reference settings
    (``CQT_SETTINGS``). The module computes the same sums as nnAudio's forward
    but skips the zero taps: each kernel is centred in a 65 536-sample window yet
    only ``ceil(Q * sr / f_k)`` long, so the bins are convolved in groups of
    ``group_bins`` with the group's non-zero span only (about 6x fewer
    multiply-adds; outputs equal nnAudio's to float rounding, see the tests).
    Time is processed in chunks of ``chunk_frames`` to bound memory on long files.
    """

    def __init__(self, sample_rate: int = 24000, group_bins: int = 12, chunk_frames: int = 2048):
        super().__init__()
        self.sample_rate = sample_rate
        self.hop_length = CQT_SETTINGS["hop_length"]
        self.n_bins = CQT_SETTINGS["n_bins"]
        self.chunk_frames = chunk_frames
        ref = self.reference_module()
        real, imag = ref.cqt_kernels_real[:, 0], ref.cqt_kernels_imag[:, 0]
        self.kernel_width = int(ref.kernel_width)
        self.register_buffer("scale", ref.lenghts.sqrt().clone(), persistent=False)  # nnAudio "librosa" norm
        nonzero = (real != 0) | (imag != 0)
        self.spans: List[Tuple[int, int, int, int]] = []
        for b0 in range(0, self.n_bins, group_bins):
            b1 = min(b0 + group_bins, self.n_bins)
            taps = nonzero[b0:b1].any(0).nonzero()[:, 0]
            s, e = int(taps[0]), int(taps[-1]) + 1
            self.register_buffer(f"kernel_{b0}", torch.cat([real[b0:b1, s:e], imag[b0:b1, s:e]])[:, None].clone(),
                                 persistent=False)  # [2 * bins, 1, e - s]
            self.spans.append((b0, b1, s, e))

    def reference_module(self):
        """nnAudio's own CQT module with the reference settings (for parity checks)."""
        from nnAudio.features.cqt import CQT1992v2

        return CQT1992v2(sr=self.sample_rate, fmax=None, trainable=False, verbose=False, **CQT_SETTINGS)

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length + 1

    @torch.no_grad()
    def forward(self, wav: Tensor) -> Tensor:
        wav = _as_batch(wav).float()
        total = self.num_frames(wav.shape[1])
        half = self.kernel_width // 2
        padded = F.pad(wav, (half, half)).unsqueeze(1)  # nnAudio: centre=True, constant (zero) padding
        out = wav.new_empty(wav.shape[0], total, self.n_bins)
        hop = self.hop_length
        for t0 in range(0, total, self.chunk_frames):
            t1 = min(total, t0 + self.chunk_frames)
            for b0, b1, s, e in self.spans:
                y = F.conv1d(padded[..., t0 * hop + s: (t1 - 1) * hop + e], getattr(self, f"kernel_{b0}"), stride=hop)
                n = b1 - b0
                scale = self.scale[b0:b1, None]
                re, im = y[:, :n] * scale, y[:, n:] * scale
                out[:, t0:t1, b0:b1] = torch.sqrt(re.pow(2) + im.pow(2)).transpose(1, 2)
        return out


# ---------------------------------------------------------------- MERT-v0 style
class _CentroidState:
    """State of a k-means teacher: its ``centroids`` buffer (saved by ``LabelGenerator.save_state``)."""

    centroids: Tensor
    fitted: bool

    def state_tensors(self) -> dict:
        return {"centroids": self.centroids.detach().cpu().contiguous()}

    def load_tensors(self, tensors: dict, source: str) -> None:
        c = tensors.get("centroids")
        if c is None or c.shape != self.centroids.shape:
            raise CheckpointError(f"{source}: expected centroids of shape {list(self.centroids.shape)}, got "
                                  f"{None if c is None else list(c.shape)} (another number of clusters/codebooks?)")
        self.centroids.copy_(c)
        self.fitted = True


class MFCCKMeansTeacher(_CentroidState, nn.Module):
    """k-means labels over MFCC + delta + delta-delta (39-d), MERT-v0 / HuBERT iteration 1.

    wav [B, N] at 16 kHz -> labels [B, 1, (N - 400) // 320 + 1], one per student
    frame: Kaldi MFCCs (torchaudio) with 25 ms windows every 20 ms (HuBERT used
    10 ms and a 100 Hz label rate; 20 ms gives the student's 50 Hz frame grid
    directly). Fit with :meth:`fit` on training audio (``num_clusters``
    defaults to 500, MARBLE's ``hubert-music_k_500_mfcc``).
    """

    def __init__(self, num_clusters: int = 500, sample_rate: int = 16000, seed: int = 0):
        super().__init__()
        self.sample_rate = sample_rate
        self.codebook_size = num_clusters
        self.num_codebooks = 1
        self.seed = seed
        self.register_buffer("centroids", torch.zeros(num_clusters, 39))
        self.fitted = False

    def features(self, wav: Tensor) -> Tensor:
        """wav [B, N] -> [B, T, 39]."""
        from .compat import ensure_torchaudio_importable

        ensure_torchaudio_importable()
        import torchaudio.compliance.kaldi as kaldi
        import torchaudio.functional as AF

        feats = []
        for clip in _as_batch(wav).float():
            mfcc = kaldi.mfcc(clip[None], sample_frequency=self.sample_rate, use_energy=False,
                              frame_length=25.0, frame_shift=20.0).T  # [13, T]
            d1 = AF.compute_deltas(mfcc)
            feats.append(torch.cat([mfcc, d1, AF.compute_deltas(d1)]).T)
        return torch.stack(feats)

    @torch.no_grad()
    def fit(self, wavs: Iterable[Tensor], iters: int = 20, max_frames: int = 200_000) -> None:
        parts = [self.features(w).reshape(-1, 39) for w in wavs]
        if not parts:
            raise MERTError("cannot fit the MFCC k-means teacher: no audio given")
        x = torch.cat(parts)
        if x.shape[0] > max_frames:
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))[:max_frames]]
        self.centroids.copy_(kmeans(x.to(self.centroids.device), self.codebook_size, iters=iters, seed=self.seed))
        self.fitted = True
        logger.info("MFCC k-means teacher: %d clusters fitted on %d frames", self.codebook_size, x.shape[0])

    @torch.no_grad()
    def forward(self, wav: Tensor) -> Tensor:
        if not self.fitted:
            raise MERTError("the MFCC k-means teacher is not fitted: call fit() or load a teacher state")
        feats = self.features(wav).to(self.centroids.device)
        labels = nearest(feats.reshape(-1, 39), self.centroids).view(feats.shape[0], 1, feats.shape[1])
        return labels



# ------------------------------------------------------------ musical k-means
def db_spectrum(cqt: Tensor, per_frame: bool = False, floor_db: float = 60.0, silence_db: float = 50.0) -> Tensor:
    """Linear CQT magnitudes [B, T, bins] -> a level-free dB spectrum in [0, 1].

    ``per_frame=False``: dB re each clip's loudest bin, floored at ``-floor_db`` (the same spectrum
    at any gain; silence = 0), so a frame's level relative to its clip remains.
    ``per_frame=True``: dB re each frame's own loudest bin (the spectral *shape*: pitch content and
    timbre, without the frame's loudness); frames more than ``silence_db`` below the clip's
    loudest bin are all zeros (silence), so their noise is not a target.
    """
    floor = 10 ** (-floor_db / 20)
    clip_peak = cqt.amax(dim=(1, 2), keepdim=True).clamp(min=1e-8)
    peak = cqt.amax(dim=2, keepdim=True).clamp(min=1e-8) if per_frame else clip_peak
    out = (20.0 * torch.log10(cqt / peak + floor) / floor_db + 1.0).clamp(min=0.0)
    return _zero_silent_frames(out, peak, clip_peak, silence_db) if per_frame else out


def _zero_silent_frames(out: Tensor, frame_peak: Tensor, clip_peak: Tensor, silence_db: float) -> Tensor:
    """``out`` [B, T, bins] with the frames whose peak is more than ``silence_db`` below the clip's set to 0."""
    return torch.where(frame_peak > clip_peak * 10 ** (-silence_db / 20), out, torch.zeros_like(out))


def shape_spectrum(cqt: Tensor, silence_db: float = 50.0) -> Tensor:
    """Linear CQT magnitudes [B, T, bins] -> each frame divided by its own loudest bin, in [0, 1].

    The frame's spectral shape on the reference's *linear* scale: level-free like
    ``db_spectrum(per_frame=True)``, but the harmonic peaks (pitch) dominate it instead of the
    spectral floor. Frames more than ``silence_db`` below the clip's loudest bin are all zeros.
    """
    clip_peak = cqt.amax(dim=(1, 2), keepdim=True).clamp(min=1e-8)
    peak = cqt.amax(dim=2, keepdim=True).clamp(min=1e-8)
    return _zero_silent_frames(cqt / peak, peak, clip_peak, silence_db)


class MFCCTarget(nn.Module):
    """A continuous timbre target: wav [B, N] at 24 kHz -> MFCCs 1..19 [B, N // 320 + 1, 19].

    On the CQT's frame grid (centred 1024-point STFT, hop 320 = the student's 75 Hz), 64 mel
    bands in dB (power, floored 80 dB below each clip's loudest band as torchaudio's MFCC does),
    orthonormal DCT. c0 (the frame's level) is left out, so the target does not depend on gain;
    frames whose mean mel level is more than ``silence_db`` below the clip's loudest frame are
    zeros, so silence and its noise floor are no target. Not a MERT teacher: the tiny recipe's
    ``mfcc_weight`` (docs/LEARNING.md 7.7). Built from torchaudio's functional ops; the tests
    compare it with ``torchaudio.transforms.MFCC``.
    """

    n_fft, hop_length, n_mels, n_mfcc, top_db = 1024, 320, 64, 20, 80.0

    def __init__(self, sample_rate: int = 24000, silence_db: float = 50.0):
        super().__init__()
        from .compat import ensure_torchaudio_importable

        ensure_torchaudio_importable()
        import torchaudio.functional as AF

        self.sample_rate, self.silence_db = sample_rate, silence_db
        # fixed transforms, rebuilt from the settings: not part of a checkpoint
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self.register_buffer("mel_fb", AF.melscale_fbanks(self.n_fft // 2 + 1, 0.0, sample_rate / 2, self.n_mels,
                                                          sample_rate), persistent=False)  # [freqs, mels]
        self.register_buffer("dct", AF.create_dct(self.n_mfcc, self.n_mels, "ortho"), persistent=False)  # [mels, n_mfcc]

    @property
    def dims(self) -> int:
        return self.n_mfcc - 1

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length + 1

    @torch.no_grad()
    def forward(self, wav: Tensor) -> Tensor:
        wav = _as_batch(wav).float()
        spec = torch.stft(wav, self.n_fft, self.hop_length, window=self.window, center=True, pad_mode="reflect",
                          return_complex=True).abs().pow(2)  # [B, freqs, T]
        db = 10.0 * torch.log10((spec.transpose(1, 2) @ self.mel_fb).clamp(min=1e-10))  # [B, T, mels]
        db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - self.top_db)
        level = db.mean(-1, keepdim=True)  # [B, T, 1]
        audible = level >= level.amax(dim=1, keepdim=True) - self.silence_db
        return torch.where(audible, db @ self.dct[:, 1:], 0.0)


class CQTKMeansTeacher(_CentroidState, nn.Module):
    """Musical k-means codes: residual k-means over a level-free semitone spectrum.

    wav [B, N] at 24 kHz -> codes [B, num_codebooks, N // 320 + 1], 75 Hz, on the CQT's
    frame grid. Each frame is the reference CQT (:class:`CQTTeacher`) in dB re the frame's
    own loudest bin (its spectral shape; ``per_frame=False``: re the clip's loudest bin, which
    keeps the frame's level; see :func:`db_spectrum`), averaged to 84 semitone bins (C1-B7),
    with silent frames all zeros; ``spectrum="linear"``: the frame's linear magnitudes over its
    loudest bin instead of dB, whose codes name the sounding pitches far more than the timbre
    (docs/LEARNING.md). Codebook k
    clusters what books < k left unexplained. A MERT-v0-style *musical* teacher for
    corpora too small for codec codes: its codes are stable while a chord or note lasts
    (so they can be predicted from context) and name pitch content and timbre. It is
    not MERT-v1's EnCodec teacher; fit it with :meth:`fit` on training audio.
    """

    sample_rate = 24000
    bins_per_semitone = 4  # the reference CQT has 48 bins per octave

    SPECTRA = ("db", "linear")

    def __init__(self, num_clusters: int = 128, num_codebooks: int = 1, seed: int = 0,
                 cqt: Optional["CQTTeacher"] = None, per_frame: bool = True, spectrum: str = "db"):
        super().__init__()
        if num_clusters < 2 or num_codebooks < 1:
            raise MERTError(f"cqt-kmeans needs >= 2 clusters and >= 1 codebook, got {num_clusters}, {num_codebooks}")
        if spectrum not in self.SPECTRA:
            raise MERTError(f"cqt-kmeans spectrum must be one of {list(self.SPECTRA)}, got {spectrum!r}")
        if spectrum == "linear" and not per_frame:
            raise MERTError("cqt-kmeans: the linear spectrum is per frame only (a clip-level linear scale keeps the level)")
        self.codebook_size, self.num_codebooks, self.seed = num_clusters, num_codebooks, seed
        self.per_frame, self.spectrum = per_frame, spectrum
        self.cqt = cqt if cqt is not None else CQTTeacher(self.sample_rate)
        self.dim = self.cqt.n_bins // self.bins_per_semitone
        self.register_buffer("centroids", torch.zeros(num_codebooks, num_clusters, self.dim))
        self.fitted = False

    def features_from_cqt(self, cqt: Tensor) -> Tensor:
        """[B, T, 336] linear CQT -> [B, T, 84] level-free semitone spectrum (dB or linear)."""
        x = shape_spectrum(cqt.float()) if self.spectrum == "linear" else db_spectrum(cqt.float(), per_frame=self.per_frame)
        return x.view(x.shape[0], x.shape[1], self.dim, self.bins_per_semitone).mean(-1)

    def state_tensors(self) -> dict:
        return {**super().state_tensors(), "spectrum": torch.tensor([self.SPECTRA.index(self.spectrum)])}

    def load_tensors(self, tensors: dict, source: str) -> None:
        saved = self.SPECTRA[int(tensors["spectrum"][0])] if "spectrum" in tensors else "db"  # states before it: dB
        if saved != self.spectrum:
            raise CheckpointError(f"{source}: the cqt-kmeans state was fitted on the {saved!r} spectrum, this teacher "
                                  f"uses {self.spectrum!r} (set the same cqt_spectrum, or refit)")
        super().load_tensors(tensors, source)

    def codes_from_cqt(self, cqt: Tensor) -> Tensor:
        """[B, T, 336] linear CQT (of the whole clip) -> codes [B, K, T] long."""
        if not self.fitted:
            raise MERTError("the cqt-kmeans teacher is not fitted: call fit() or load a teacher state")
        x = self.features_from_cqt(cqt)
        flat, out = x.reshape(-1, self.dim).to(self.centroids.device), []
        for book in self.centroids:
            assign = nearest(flat, book)
            out.append(assign)
            flat = flat - book[assign]
        return torch.stack(out, 0).view(self.num_codebooks, x.shape[0], x.shape[1]).transpose(0, 1)

    @torch.no_grad()
    def forward(self, wav: Tensor) -> Tensor:
        return self.codes_from_cqt(self.cqt(_as_batch(wav)))

    @torch.no_grad()
    def fit(self, wavs: Iterable[Tensor], iters: int = 20, max_frames: int = 100_000) -> None:
        parts = [self.features_from_cqt(self.cqt(_as_batch(w).to(self.centroids.device))).reshape(-1, self.dim)
                 for w in wavs]
        if not parts:
            raise MERTError("cannot fit the cqt-kmeans teacher: no audio given")
        self.fit_features(torch.cat(parts), iters, max_frames)

    @torch.no_grad()
    def fit_features(self, x: Tensor, iters: int = 20, max_frames: int = 100_000) -> None:
        """Fit on frames of :meth:`features_from_cqt` already computed: x [N, 84]."""
        if x.shape[0] > max_frames:
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))[:max_frames]]
        if x.shape[0] < MIN_FRAMES_PER_CODE * self.codebook_size:
            raise MERTError(f"cqt-kmeans: {x.shape[0]} frames are too few for {self.codebook_size} codes "
                            f"(>= {MIN_FRAMES_PER_CODE} per code): give more audio or fewer clusters")
        residual = x.to(self.centroids.device)
        for k in range(self.num_codebooks):
            centroids = kmeans(residual, self.codebook_size, iters=iters, seed=self.seed + k)
            residual = residual - centroids[nearest(residual, centroids)]
            self.centroids[k].copy_(centroids)
        self.fitted = True
        logger.info("cqt-kmeans teacher: %d codebook(s) x %d codes fitted on %d frames", self.num_codebooks,
                    self.codebook_size, x.shape[0])



# ------------------------------------------------------------ the generator
ACOUSTIC_KINDS = ("encodec", "fitted", "mfcc-kmeans", "cqt-kmeans", "none")
FITTABLE_KINDS = ("fitted", "mfcc-kmeans", "cqt-kmeans")  # teachers with a fitted state


class LabelGenerator(nn.Module):
    """Frozen teachers: wav [B, N] -> (codes [B, K, T] long | None, cqt [B, T, 336] | None).

    ``T`` is the student's frame count for N samples. Build with :meth:`from_spec`.
    Always in eval mode; it has no trainable parameters.
    """

    def __init__(self, acoustic_kind: str, acoustic: Optional[nn.Module], cqt: Optional[CQTTeacher],
                 sample_rate: int):
        super().__init__()
        self.acoustic_kind = acoustic_kind
        self.acoustic = acoustic
        self.cqt = cqt
        self.sample_rate = sample_rate
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_spec(cls, acoustic: str = "encodec", encodec_checkpoint: Optional[str] = None, use_cqt: bool = True,
                  teacher_state: Optional[str] = None, seed: int = 0, num_clusters: Optional[int] = None,
                  num_codebooks: int = 1, cqt_spectrum: str = "db") -> "LabelGenerator":
        """Build the teachers.

        acoustic: ``"encodec"`` (official EnCodec weights, MERT-v1), ``"fitted"``
            (explicit demo/test mode: random seeded EnCodec encoder + k-means
            codebooks; logged), ``"mfcc-kmeans"`` (MERT-v0 style, 16 kHz),
            ``"cqt-kmeans"`` (k-means over a level-free semitone CQT, see
            :class:`CQTKMeansTeacher`) or ``"none"``.
        teacher_state: for the fitted kinds (``FITTABLE_KINDS``), a state file written by
            :meth:`save_state`; loaded when it exists (otherwise call :meth:`fit`).
        num_clusters: codes per codebook of the k-means teachers (default 500 for
            ``mfcc-kmeans``, 128 for ``cqt-kmeans``); num_codebooks, cqt_spectrum (``"db"`` or
            ``"linear"``, see :class:`CQTKMeansTeacher`): ``cqt-kmeans`` only.
        """
        if acoustic not in ACOUSTIC_KINDS:
            raise MERTError(f"unknown acoustic teacher {acoustic!r}; choose one of {list(ACOUSTIC_KINDS)}")
        sample_rate = 16000 if acoustic == "mfcc-kmeans" else 24000
        if acoustic == "encodec":
            teacher = EncodecTeacher.pretrained(encodec_checkpoint)
        elif acoustic == "fitted":
            teacher = EncodecTeacher.random_fitted(seed)
        elif acoustic == "mfcc-kmeans":
            teacher = MFCCKMeansTeacher(num_clusters or 500, sample_rate, seed)
        elif acoustic == "cqt-kmeans":
            teacher = CQTKMeansTeacher(num_clusters or 128, num_codebooks, seed, spectrum=cqt_spectrum)
        else:
            teacher = None
        if teacher is None and not use_cqt:
            raise MERTError("no teacher selected: acoustic='none' and use_cqt=False")
        cqt = None
        if use_cqt:  # cqt-kmeans reads the same CQT: one module, computed once per batch
            cqt = teacher.cqt if isinstance(teacher, CQTKMeansTeacher) else CQTTeacher(sample_rate)
        gen = cls(acoustic, teacher, cqt, sample_rate)
        if teacher_state is not None:
            if acoustic not in FITTABLE_KINDS:
                raise MERTError(f"teacher_state applies to the {', '.join(map(repr, FITTABLE_KINDS))} teachers, "
                                f"not {acoustic!r}")
            if os.path.exists(teacher_state):
                gen.load_state(teacher_state)
        return gen

    # ------------------------------------------------------------ properties
    @property
    def num_codebooks(self) -> int:
        return 0 if self.acoustic is None else self.acoustic.num_codebooks

    @property
    def codebook_size(self) -> int:
        return 0 if self.acoustic is None else self.acoustic.codebook_size

    @property
    def cqt_bins(self) -> int:
        return 0 if self.cqt is None else self.cqt.n_bins

    @property
    def ready(self) -> bool:
        """False for a fitted-mode teacher that has not been fitted or loaded yet."""
        return self.acoustic is None or bool(self.acoustic.fitted)

    def num_frames(self, num_samples: int) -> int:
        """Label frames for ``num_samples`` samples (= the student's frames)."""
        return _student_frames(num_samples)

    def train(self, mode: bool = True):
        """Teachers stay frozen: EnCodec's quantizer would update its codebooks in train mode."""
        return super().train(False)

    # ---------------------------------------------------------------- labels
    @torch.no_grad()
    def forward(self, wav: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """wav [B, N] clean audio at ``self.sample_rate`` -> (codes [B, K, T] long, cqt [B, T, bins] float)."""
        wav = _as_batch(wav)
        frames = self.num_frames(wav.shape[1])
        if frames <= 0:
            raise MERTError(f"{wav.shape[1]} samples is shorter than one frame (400 samples)")
        full_cqt = None if self.cqt is None else self.cqt(wav)
        if self.acoustic is None:
            codes = None
        elif isinstance(self.acoustic, CQTKMeansTeacher) and full_cqt is not None:
            codes = self.acoustic.codes_from_cqt(full_cqt)[:, :, :frames]
        else:
            codes = self.acoustic(wav)[:, :, :frames].long()
        return codes, None if full_cqt is None else full_cqt[:, :frames]

    # -------------------------------------------------------------- fit/state
    def fit(self, wavs: Iterable[Tensor], **kwargs) -> None:
        """Fit a fitted-kind acoustic teacher on training audio, then :meth:`save_state`."""
        if self.acoustic_kind not in FITTABLE_KINDS:
            raise MERTError(f"the {self.acoustic_kind!r} teacher has nothing to fit")
        self.acoustic.fit(wavs, **kwargs)

    def describe(self) -> dict:
        """What produced the labels (written next to offline labels to refuse mixing teachers)."""
        d = {"acoustic": self.acoustic_kind, "sample_rate": self.sample_rate, "num_codebooks": self.num_codebooks,
             "codebook_size": self.codebook_size, "frame_hop": 320, "cqt": None}
        if self.acoustic_kind == "encodec":
            d["encodec_bandwidth"] = ENCODEC_BANDWIDTH
        if self.acoustic_kind in FITTABLE_KINDS and self.ready:
            h = hashlib.sha256()
            for k, v in sorted(self.acoustic.state_tensors().items()):
                h.update(k.encode())
                h.update(v.float().numpy().tobytes())
            d["teacher_state_sha256"] = h.hexdigest()[:16]
        if self.cqt is not None:
            d["cqt"] = {k: v for k, v in CQT_SETTINGS.items()}
        return d

    def save_state(self, path: str) -> None:
        """Write the fitted teacher (safetensors, atomically)."""
        from safetensors.torch import save_file

        if self.acoustic_kind not in FITTABLE_KINDS or not self.ready:
            raise MERTError(f"only a fitted {' / '.join(map(repr, FITTABLE_KINDS))} teacher has a state to save")
        meta = {"format": STATE_FORMAT, "acoustic": self.acoustic_kind, "seed": str(self.acoustic.seed),
                "codebook_size": str(self.codebook_size)}
        with atomic_path(path) as tmp:
            save_file(self.acoustic.state_tensors(), tmp, metadata=meta)

    def load_state(self, path: str) -> None:
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such teacher state") from None
        except Exception as exc:
            raise CheckpointError(f"{path}: not a teacher state file ({exc})") from None
        if meta.get("format") != STATE_FORMAT or meta.get("acoustic") != self.acoustic_kind:
            raise CheckpointError(f"{path}: holds a {meta.get('acoustic', 'unknown')!r} teacher state, "
                                  f"this generator's acoustic teacher is {self.acoustic_kind!r}")
        self.acoustic.load_tensors(tensors, path)
        if self.acoustic_kind == "fitted":
            logger.warning(FITTED_WARNING.format(seed=meta.get("seed", "?")) + f" (state {path})")
