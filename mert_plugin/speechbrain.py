"""MERT as a SpeechBrain lobe, and SpeechBrain inference files for exported models.

``MERTEncoder`` is a plain ``nn.Module`` with SpeechBrain's encoder calling
convention ``forward(wav, wav_lens)``, so any SpeechBrain yaml can use it::

    encoder: !new:mert_plugin.speechbrain.MERTEncoder
        source: path/to/MERT-v1-95M        # HF folder, fairseq .pt, recipe CKPT folder, hub id (huggingface_hub)
        freeze: True
        output_all_hiddens: True           # -> [L+1, B, T, D]
        layers: [4, 5, 6]                  # optional subset of hidden states

It runs on this package's native model (no ``transformers``). ``freeze`` keeps
it in eval mode without gradients, as SpeechBrain's HF wrappers do.

It takes the yaml arguments of SpeechBrain 1.1's own MERT lobe
(``speechbrain.integrations.huggingface.mert.MERT``: ``source``, ``save_path``,
``output_norm``, ``freeze``, ``freeze_feature_extractor``, ``apply_spec_augment``,
``output_all_hiddens``, in that positional order and with its defaults), so a
yaml written for that lobe works by swapping the class name. That lobe loads
MERT-v1 through ``transformers`` with ``trust_remote_code=True`` (the hub's
``modeling_MERT.py``, written for transformers 4.x); this one executes no code
from the model repo, needs no ``transformers`` (whatever its version), runs attention through
``scaled_dot_product_attention`` and reads fairseq and recipe checkpoints too.
Where the two differ, MERT's semantics are kept (see the class docstring).

:func:`save_inference_files` writes ``hyperparams.yaml`` + ``encoder.ckpt``
into a folder so that
``speechbrain.inference.encoders.WaveformEncoder.from_hparams(source=folder)``
loads the model and ``encode_batch(wavs, wav_lens)`` returns its features.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .atomic import atomic_path, atomic_write_text
from .compat import ensure_torchaudio_importable
from .config import MERTConfig
from .errors import ConfigError, MERTError
from .model import MERTModel

ensure_torchaudio_importable()
from speechbrain.utils.checkpoints import mark_as_transfer, register_checkpoint_hooks  # noqa: E402

LayerSpec = Union[None, int, Sequence[int]]
INFERENCE_HPARAMS = "hyperparams.yaml"
INFERENCE_CKPT = "encoder.ckpt"


def _as_config(config: Union[MERTConfig, Dict[str, Any], str]) -> MERTConfig:
    if isinstance(config, MERTConfig):
        return config.validate()
    if isinstance(config, dict):
        return MERTConfig.from_dict(dict(config), source="MERTEncoder config")
    if isinstance(config, (str, os.PathLike)):
        return MERTConfig.from_json_file(os.fspath(config))
    raise ConfigError(f"MERTEncoder config must be a MERTConfig, a dict or a config.json path, "
                      f"got {type(config).__name__}")


@register_checkpoint_hooks
class MERTEncoder(nn.Module):
    """MERT encoder lobe: ``[B, N]`` audio at the model rate -> features.

    Arguments
    ---------
    source : str, optional
        Checkpoint to load: anything :meth:`MERTModel.from_pretrained` accepts (a local
        HF folder, a hub id such as ``m-a-p/MERT-v1-95M`` resolved by ``huggingface_hub``,
        a fairseq ``.pt``, a recipe ``CKPT+...`` folder).
    save_path : str, optional
        Hugging Face cache folder for a hub ``source`` (``cache_dir``; default: the HF
        cache), as SpeechBrain's HF lobes use it. Ignored for local sources.
    output_norm : bool
        Apply ``layer_norm`` over the feature dim to each returned state (per frame).
        SpeechBrain's wav2vec2-family lobes normalise over (time, feature) of each clip
        instead, padding included; per-frame normalisation keeps a frame's features
        independent of the clip's length and padding, as s3prl's
        ``--upstream_feature_normalize`` does.
    freeze : bool
        No gradients and always eval mode (dropout/layerdrop off). Default False, as in
        SpeechBrain's lobe: set ``freeze: True`` for a frozen feature extractor.
    freeze_feature_extractor : bool
        Freeze only the conv stem (fine-tuning the transformer).
    apply_spec_augment : bool
        Accepted for SpeechBrain compatibility; only False (the default there too):
        masking belongs to the recipe (e.g. ``speechbrain.augment``).
    output_all_hiddens : bool
        Return the selected hidden states stacked as ``[L_sel, B, T, D]`` (all ``L+1``
        by default, ``L+1 = 13`` for MERT-v1-95M as in SpeechBrain's lobe).
    preset : str, optional (keyword only)
        Build a randomly initialised preset geometry instead (``mert-tiny``, ...);
        weights then come from a SpeechBrain ``Pretrainer``/``Checkpointer``.
    config : MERTConfig, dict or str, optional (keyword only)
        Geometry as a config object, an HF-style dict or a ``config.json`` path
        (random weights, as with ``preset``). Exactly one of source/preset/config.
    layers : int or list of int, optional (keyword only)
        Indices into the ``L+1`` hidden states (0 = transformer input, negative
        counts from the end). An int returns ``[B, T, D]``; a list returns
        ``[len, B, T, D]``. Default: the last state, or all with ``output_all_hiddens``.
        Layers above the highest selected one are not computed.
    normalize_wav : bool, optional (keyword only)
        Zero-mean unit-variance each clip first, over its valid samples. Default: the
        source's ``preprocessor_config.json`` ``do_normalize`` (as SpeechBrain's lobe reads
        it: False for MERT-v1, True for MERT-v0), else True for 16 kHz models only.
    revision : str, optional (keyword only)
        Hub revision (branch, tag or commit) of a hub ``source``.
    """

    def __init__(self, source: Optional[str] = None, save_path: Optional[str] = None, output_norm: bool = False,
                 freeze: bool = False, freeze_feature_extractor: bool = False, apply_spec_augment: bool = False,
                 output_all_hiddens: bool = False, *, preset: Optional[str] = None,
                 config: Union[None, MERTConfig, Dict[str, Any], str] = None, layers: LayerSpec = None,
                 normalize_wav: Optional[bool] = None, revision: Optional[str] = None):
        super().__init__()
        given = [n for n, v in (("source", source), ("preset", preset), ("config", config)) if v is not None]
        if len(given) != 1:
            raise ConfigError(f"MERTEncoder needs exactly one of source, preset or config; got {given or 'none'}")
        if apply_spec_augment:
            raise ConfigError("MERTEncoder: apply_spec_augment=True is not supported (the encoder never masks "
                              "its input; add masking in the recipe, e.g. speechbrain.augment)")
        folder = None
        if source is not None:
            folder = _source_folder(os.fspath(source), save_path, revision)
            self.model = MERTModel.from_pretrained(folder or source)
        elif preset is not None:
            self.model = MERTModel.from_preset(preset)
        else:
            self.model = MERTModel(_as_config(config))
            self.model.reset_parameters()
        if normalize_wav is None:
            normalize_wav = _do_normalize(folder, self.model.sample_rate)
        self.freeze = bool(freeze)
        self.output_all_hiddens = bool(output_all_hiddens)
        self.output_norm = bool(output_norm)
        self.normalize_wav = bool(normalize_wav)
        self.layers = self._check_layers(layers)
        if self.freeze:
            self.model.requires_grad_(False)
        elif freeze_feature_extractor:
            self.model.feature_extractor.requires_grad_(False)
        self.train(False)

    # ------------------------------------------------------------------ shape
    @property
    def config(self) -> MERTConfig:
        return self.model.config

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def output_size(self) -> int:
        return self.model.config.hidden_size

    def _check_layers(self, layers: LayerSpec):
        n = self.model.config.num_hidden_states
        if layers is None:
            return None
        single = isinstance(layers, int) and not isinstance(layers, bool)
        items = [layers] if single else list(layers)
        if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise ConfigError(f"layers must be an int or a non-empty list of ints, got {layers!r}")
        bad = [i for i in items if not -n <= i < n]
        if bad:
            raise ConfigError(f"layers {bad} out of range: this model has {n} hidden states (0..{n - 1})")
        items = [i % n for i in items]
        return items[0] if single else items

    # ---------------------------------------------------------------- forward
    def train(self, mode: bool = True):
        """A frozen encoder stays in eval mode whatever the Brain asks."""
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    def forward(self, wav: Tensor, wav_lens: Optional[Tensor] = None) -> Tensor:
        """wav [B, N] (or [B, N, 1]); wav_lens [B] relative lengths (1.0 = full) or None.

        Returns [B, T, D] or [L_sel, B, T, D] (see the class docstring). With
        padded batches, note that conv 0's GroupNorm sees the padding, so results
        differ slightly from running each clip alone (MERT_SPEC section 2.4).
        """
        if wav.dim() == 3 and wav.shape[-1] == 1:
            wav = wav.squeeze(-1)
        if wav.dim() != 2:
            raise MERTError(f"MERTEncoder expects wav [batch, samples], got shape {list(wav.shape)}")
        wav = wav.float()
        padding_mask = self._padding_mask(wav, wav_lens)
        if self.normalize_wav:
            wav = _normalize(wav, padding_mask)
        if self.freeze:
            with torch.no_grad():
                return self._encode(wav, padding_mask)
        return self._encode(wav, padding_mask)

    def _encode(self, wav: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        if isinstance(self.layers, int):
            out = self.model(wav, padding_mask=padding_mask, num_layers=self.layers)
            return self._norm(out.hidden_states[self.layers])
        if self.layers is not None:
            out = self.model(wav, padding_mask=padding_mask, num_layers=max(self.layers))
            return torch.stack([self._norm(out.hidden_states[i]) for i in self.layers], dim=0)
        out = self.model(wav, padding_mask=padding_mask)
        if self.output_all_hiddens:
            return torch.stack([self._norm(h) for h in out.hidden_states], dim=0)
        return self._norm(out.last_hidden_state)

    def _norm(self, x: Tensor) -> Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:]) if self.output_norm else x

    @staticmethod
    def _padding_mask(wav: Tensor, wav_lens: Optional[Tensor]) -> Optional[Tensor]:
        if wav_lens is None:
            return None
        lengths = torch.round(wav_lens.to(wav.device).float() * wav.shape[1]).long()
        if bool((lengths >= wav.shape[1]).all()):
            return None  # no padding: identical to an unpadded call
        return torch.arange(wav.shape[1], device=wav.device)[None, :] >= lengths[:, None]

    # -------------------------------------------------------------- weights
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts this lobe's own keys (``model.*``) or a bare MERT state dict (HF names)."""
        if any(k.startswith("model.") for k in state_dict):
            state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    @mark_as_transfer
    def _transfer(self, path):
        """Strict parameter transfer for SpeechBrain's ``Pretrainer`` (its default
        only warns about missing keys, which would leave random weights)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise MERTError(f"{path}: weights do not fit this MERTEncoder geometry: "
                            f"{str(exc).splitlines()[0]}") from None


def _source_folder(source: str, save_path: Optional[str], revision: Optional[str]) -> Optional[str]:
    """The folder a source's files are in: itself, or a hub id's snapshot in the HF cache
    (``save_path`` as ``cache_dir``); None for single-file sources."""
    from .checkpoint import _looks_like_hub_id, resolve_hub_model

    if os.path.isdir(source):
        return source
    if os.path.exists(source) or not _looks_like_hub_id(source):
        return None
    return resolve_hub_model(source, revision=revision, cache_dir=save_path or None,
                             extra_files=("preprocessor_config.json",))


def _do_normalize(folder: Optional[str], sample_rate: int) -> bool:
    """``do_normalize`` of the folder's ``preprocessor_config.json``; else the released models' rule."""
    import json

    path = os.path.join(folder, "preprocessor_config.json") if folder else None
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get("do_normalize")
            if isinstance(value, bool):
                return value
        except (OSError, ValueError, AttributeError):
            pass
    return int(sample_rate) == 16000


def _normalize(wav: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
    """Per-clip zero mean, unit variance over the valid samples (HF Wav2Vec2FeatureExtractor)."""
    valid = torch.ones_like(wav, dtype=torch.bool) if padding_mask is None else ~padding_mask
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = (wav * valid).sum(-1, keepdim=True) / n
    var = (((wav - mean) * valid) ** 2).sum(-1, keepdim=True) / n
    return torch.where(valid, (wav - mean) / torch.sqrt(var + 1e-7), torch.zeros_like(wav))


# --------------------------------------------------------------------- export
_HPARAMS_TEMPLATE = """\
# SpeechBrain inference file for a MERT encoder (written by mert_plugin.speechbrain).
# Load with:
#   from speechbrain.inference.encoders import WaveformEncoder
#   enc = WaveformEncoder.from_hparams(source="<this folder>", savedir="<cache folder>")
#   feats = enc.encode_batch(wavs, wav_lens)   # wavs [B, N] mono at {sample_rate} Hz
# The geometry is spelled out below so the folder needs no other file; the
# weights are {ckpt} (this lobe's state dict).

sample_rate: {sample_rate}

encoder: !new:mert_plugin.speechbrain.MERTEncoder
    config: {config}
    freeze: True
    output_all_hiddens: {output_all_hiddens}
    layers: {layers}
    output_norm: {output_norm}
    normalize_wav: {normalize_wav}

audio_normalizer: !new:speechbrain.dataio.preprocess.AudioNormalizer
    sample_rate: !ref <sample_rate>
    mix: avg-to-mono

modules:
    encoder: !ref <encoder>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        encoder: !ref <encoder>
"""


def save_inference_files(model: Union[MERTModel, str], directory: str, output_all_hiddens: bool = False,
                         layers: LayerSpec = None, output_norm: bool = False,
                         normalize_wav: Optional[bool] = None) -> Dict[str, str]:
    """Write ``hyperparams.yaml`` and ``encoder.ckpt`` for ``WaveformEncoder.from_hparams``.

    ``model`` is a :class:`MERTModel` or anything ``MERTModel.from_pretrained``
    accepts (e.g. the folder written by ``save_pretrained``; the files can sit
    next to ``config.json`` and ``model.safetensors``). ``normalize_wav``
    defaults to True for 16 kHz (MERT-v0) models. Files are written under
    temporary names and renamed. Returns the two paths.
    """
    import json

    if not isinstance(model, MERTModel):
        model = MERTModel.from_pretrained(model)
    if normalize_wav is None:
        normalize_wav = model.sample_rate == 16000
    encoder = MERTEncoder(config=model.config, freeze=True, output_all_hiddens=output_all_hiddens,
                          layers=layers, output_norm=output_norm, normalize_wav=normalize_wav)
    encoder.model.load_state_dict(model.state_dict())
    os.makedirs(directory, exist_ok=True)
    text = _HPARAMS_TEMPLATE.format(
        sample_rate=model.sample_rate, ckpt=INFERENCE_CKPT,
        config=json.dumps(model.config.to_dict(), sort_keys=True),  # JSON is valid YAML flow style
        output_all_hiddens=output_all_hiddens, layers=json.dumps(layers), output_norm=output_norm,
        normalize_wav=normalize_wav)
    paths = {"hparams": os.path.join(directory, INFERENCE_HPARAMS), "ckpt": os.path.join(directory, INFERENCE_CKPT)}
    with atomic_path(paths["ckpt"]) as tmp:
        torch.save({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, tmp)
    atomic_write_text(paths["hparams"], text)
    return paths
