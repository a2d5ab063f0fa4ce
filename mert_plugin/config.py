"""Model configuration: the released MERT geometries and HF ``config.json`` I/O.

Field names follow Hugging Face's ``HubertConfig`` so that a MERT
``config.json`` (``model_type`` ``mert_model``, written by the MERT remote code)
or a plain ``hubert`` one maps onto :class:`MERTConfig` field by field.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List

from .atomic import atomic_write_json
from .errors import ConfigError

# Keys that appear in HF / MERT config.json files but do not change the encoder
# (task heads, tokenizer, generation and bookkeeping fields). They are accepted
# and dropped; any key outside this set and the dataclass fields is an error.
_IGNORED_HF_KEYS = frozenset(
    """
    _name_or_path architectures auto_map model_type transformers_version torch_dtype dtype
    apply_spec_augment bos_token_id eos_token_id pad_token_id vocab_size ctc_loss_reduction
    ctc_zero_infinity classifier_proj_size use_weighted_layer_sum final_dropout tokenizer_class
    feat_extract_activation feat_extract_dropout hidden_dropout_prob initializer_range
    mask_feature_length mask_feature_min_masks mask_feature_prob mask_time_min_masks
    mask_time_length num_feat_extract_layers return_dict output_hidden_states output_attentions
    torchscript use_bfloat16 tf_legacy_loss pruned_heads tie_word_embeddings chunk_size_feed_forward
    is_encoder_decoder is_decoder cross_attention_hidden_size add_cross_attention tie_encoder_decoder
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens finetuning_task
    id2label label2id problem_type prefix sep_token_id decoder_start_token_id task_specific_params
    conv_pos_batch_norm gradient_checkpointing chunk_size_feed_forward architectures_
    """.split()
)


@dataclass
class MERTConfig:
    """Geometry and regularisation of a MERT (HuBERT-style) encoder.

    The defaults are MERT-v1-95M. Use :meth:`from_preset` for the released
    geometries and the small ``mert-tiny`` test/demo model.
    """

    sample_rate: int = 24000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    conv_dim: List[int] = field(default_factory=lambda: [512] * 7)
    conv_kernel: List[int] = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    conv_stride: List[int] = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    feat_proj_layer_norm: bool = True
    layer_norm_eps: float = 1e-5
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    feat_proj_dropout: float = 0.1
    layerdrop: float = 0.05
    mask_time_prob: float = 0.05
    # MERT remote-code fields (all inactive in the released checkpoints).
    attention_relax: float = -1.0
    deepnorm: bool = False
    feature_extractor_cqt: bool = False
    feature_extractor_cqt_bins: int = 336

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str) -> "MERTConfig":
        """Return a preset: ``mert-v1-95m``, ``mert-v1-330m``, ``mert-v0``, ``mert-small`` or ``mert-tiny``."""
        key = name.lower().replace("_", "-")
        if key.startswith("m-a-p/"):
            key = key[len("m-a-p/"):]
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return copy.deepcopy(PRESETS[key])

    # ---------------------------------------------------------------- derived
    @property
    def hop_length(self) -> int:
        """Input samples per output frame (320 for every MERT)."""
        hop = 1
        for s in self.conv_stride:
            hop *= s
        return hop

    @property
    def receptive_field(self) -> int:
        """Input samples seen by one output frame (400 for every MERT)."""
        rf = 1
        for k, s in zip(reversed(self.conv_kernel), reversed(self.conv_stride)):
            rf = (rf - 1) * s + k
        return rf

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_hidden_states(self) -> int:
        """Length of ``hidden_states``: the encoder input plus one per layer."""
        return self.num_hidden_layers + 1

    def num_frames(self, num_samples: int) -> int:
        """Output frames for ``num_samples`` input samples (0 if shorter than the receptive field)."""
        n = int(num_samples)
        for k, s in zip(self.conv_kernel, self.conv_stride):
            if n < k:
                return 0
            n = (n - k) // s + 1
        return n

    # ------------------------------------------------------------- validation
    def validate(self) -> "MERTConfig":
        """Raise :class:`ConfigError` for inconsistent or unsupported settings."""
        problems = []
        ints = ("sample_rate", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        for name in ("hidden_dropout", "attention_dropout", "activation_dropout",
                     "feat_proj_dropout", "layerdrop", "mask_time_prob"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
                problems.append(f"{name} must be a number in [0, 1], got {v!r}")
        if not (len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride)) or not self.conv_dim:
            problems.append("conv_dim, conv_kernel and conv_stride must be non-empty and of equal length, got "
                            f"{len(self.conv_dim)}, {len(self.conv_kernel)}, {len(self.conv_stride)}")
        for name in ("conv_dim", "conv_kernel", "conv_stride"):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in getattr(self, name)):
                problems.append(f"{name} must hold positive integers, got {getattr(self, name)!r}")
        if not problems:
            if self.hidden_size % self.num_attention_heads:
                problems.append(f"hidden_size {self.hidden_size} is not divisible by "
                                f"num_attention_heads {self.num_attention_heads}")
            if self.hidden_size % self.num_conv_pos_embedding_groups:
                problems.append(f"hidden_size {self.hidden_size} is not divisible by "
                                f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}")
        if self.feat_extract_norm != "group":
            problems.append(f"feat_extract_norm {self.feat_extract_norm!r} is not supported (MERT uses 'group')")
        if self.hidden_act != "gelu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (MERT uses exact 'gelu')")
        if not self.feat_proj_layer_norm:
            problems.append("feat_proj_layer_norm=False is not supported (every MERT release uses True)")
        if self.deepnorm:
            problems.append("deepnorm=True is not supported (unused by every MERT release)")
        if self.feature_extractor_cqt:
            problems.append("feature_extractor_cqt=True (CQT input branch) is not supported "
                            "(unused by every MERT release)")
        if problems:
            raise ConfigError("invalid MERT config: " + "; ".join(problems))
        return self

    # ---------------------------------------------------------------- HF I/O
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self, model_type: str = "hubert") -> Dict[str, Any]:
        """A ``config.json`` dict that ``transformers.HubertConfig`` understands."""
        d = self.to_dict()
        d.update(
            model_type=model_type,
            architectures=["HubertModel"] if model_type == "hubert" else ["MERTModel"],
            num_feat_extract_layers=len(self.conv_dim),
            feat_extract_activation="gelu",
            conv_pos_batch_norm=False,
            apply_spec_augment=True,
            mask_time_length=10,
            mask_feature_prob=0.0,
            initializer_range=0.02,
        )
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any], strict: bool = True, source: str = "config") -> "MERTConfig":
        """Build from an HF-style dict. Unknown keys raise unless ``strict=False``."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in _IGNORED_HF_KEYS)
        if unknown and strict:
            raise ConfigError(f"{source}: unknown config fields {unknown} (pass strict=False to ignore them)")
        model_type = d.get("model_type", "hubert")
        if model_type not in ("hubert", "mert_model", "mert"):
            raise ConfigError(f"{source}: model_type {model_type!r} is not a MERT/HuBERT encoder")
        kwargs = {k: d[k] for k in names if k in d}
        if "sample_rate" not in d:
            # Plain HuBERT configs carry no rate; MERT-v0 is a 16 kHz HuBERT.
            kwargs["sample_rate"] = 16000 if model_type == "hubert" else 24000
        for k in ("conv_dim", "conv_kernel", "conv_stride"):
            if k in kwargs:
                if not isinstance(kwargs[k], (list, tuple)):
                    raise ConfigError(f"{source}: {k} must be a list, got {kwargs[k]!r}")
                kwargs[k] = list(kwargs[k])
        try:
            cfg = cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
            raise ConfigError(f"{source}: {exc}") from None
        try:
            return cfg.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str, strict: bool = True) -> "MERTConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(d, strict=strict, source=path)

    def save_json(self, path: str, model_type: str = "hubert") -> None:
        atomic_write_json(path, self.to_hf_dict(model_type))


PRESETS: Dict[str, MERTConfig] = {
    # m-a-p/MERT-v1-95M (post-LN, 24 kHz).
    "mert-v1-95m": MERTConfig(),
    # m-a-p/MERT-v1-330M (pre-LN "stable layer norm", no dropout).
    "mert-v1-330m": MERTConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        do_stable_layer_norm=True, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.075, attention_relax=32.0,
    ),
    # m-a-p/MERT-v0 (a plain 16 kHz HuBERT-base geometry, 50 Hz).
    "mert-v0": MERTConfig(
        sample_rate=16000, activation_dropout=0.1, layerdrop=0.1,
    ),
    # The demo's student: mert-tiny at twice the width (2.7 M parameters). On the demo corpus it
    # learns pitch far better than mert-tiny in the same ~790 updates (0.79-0.86 vs 0.57-0.73 on
    # corpus seeds 0-2); like mert-tiny, it keeps less timbre than its random init (docs/LEARNING.md
    # 7.6). Not a released MERT geometry.
    "mert-small": MERTConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
        conv_dim=[128] * 7, num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=8,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        layerdrop=0.0,
    ),
    # A few-MB model with the same 24 kHz rate, 400-sample receptive field and
    # 320-sample hop as MERT-v1, for tests and quick runs on a CPU.
    "mert-tiny": MERTConfig(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
        conv_dim=[64] * 7, num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=8,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        layerdrop=0.0,
    ),
}
