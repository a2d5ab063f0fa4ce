"""Checkpoint loading and saving, with no code execution from model files.

Supported sources (:func:`load_checkpoint`):

* a local Hugging Face folder: ``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin`` (or their sharded ``*.index.json`` forms);
* a hub id such as ``m-a-p/MERT-v1-95M`` that is already in the local HF cache
  (never downloaded: this package makes no network calls);
* an original fairseq ``.pt`` checkpoint (``MERT-v1-95M_fairseq.pt``), read by a
  restricted unpickler that builds inert stand-ins for fairseq/omegaconf
  classes instead of importing them;
* a SpeechBrain recipe checkpoint folder (``CKPT+...`` with ``student.ckpt`` and
  ``mert_config.ckpt``) or a plain ``.ckpt``/``.pt`` state dict next to a config.

Tensors are read with safetensors or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import _compat_pickle
import ast
import io
import json
import os
import pickle
import types
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import torch

from .atomic import atomic_path
from .config import MERTConfig
from .errors import CheckpointError, ConfigError

_TOP_LEVEL = ("feature_extractor.", "feature_projection.", "encoder.", "masked_spec_embed")
_ANCHOR = "feature_extractor.conv_layers.0.conv.weight"
SB_STATE_FILE = "student.ckpt"
SB_CONFIG_FILE = "mert_config.ckpt"


# --------------------------------------------------------------------------- API
def load_checkpoint(path_or_id: str, strict_config: bool = True,
                    map_location="cpu") -> Tuple[MERTConfig, Dict[str, torch.Tensor]]:
    """Resolve ``path_or_id`` and return ``(config, state_dict)`` (HF key names)."""
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return _load_dir(path, strict_config, map_location)
    if os.path.isfile(path):
        if path.endswith((".pt", ".pth", ".ckpt")) and _looks_like_fairseq(path):
            return load_fairseq_checkpoint(path, map_location)
        if os.path.basename(path) == "config.json":
            return _load_dir(os.path.dirname(path) or ".", strict_config, map_location)
        raise CheckpointError(f"{path}: not a recognised checkpoint (expected an HF folder, a fairseq "
                              f".pt or a SpeechBrain checkpoint folder)")
    if _looks_like_hub_id(path):
        return _load_dir(resolve_hf_cache(path), strict_config, map_location)
    raise CheckpointError(f"{path}: no such file or folder")


def normalise_state_dict(state: Dict[str, torch.Tensor], model: Optional[torch.nn.Module] = None
                         ) -> "OrderedDict[str, torch.Tensor]":
    """Map any accepted spelling onto this package's (= the HF hub's) key names.

    Handles a model prefix (``hubert.``, ``mert_model.``, ``module.``), the
    torch>=2.1 weight-norm names ``parametrizations.weight.original0/1`` and
    drops pretraining heads (``final_proj``, ``label_embs_concat``, ...).
    """
    prefix = ""
    if _ANCHOR not in state:
        hits = [k for k in state if k.endswith(_ANCHOR)]
        if len(hits) == 1:
            prefix = hits[0][: -len(_ANCHOR)]
    out = OrderedDict()
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        if k.startswith(_TOP_LEVEL):
            out[k] = v
    if model is not None and "masked_spec_embed" not in out and getattr(model, "masked_spec_embed", None) is not None:
        # Inference checkpoints may omit the mask embedding; it is unused outside pretraining.
        out["masked_spec_embed"] = model.masked_spec_embed.detach().clone()
    return out


def save_pretrained(model, directory: str, safe_serialization: bool = True) -> None:
    """Write an HF folder (``model_type: hubert``) that plain ``HubertModel`` loads.

    Files are written under temporary names and renamed, so an interrupted save
    never leaves a half-written model behind.
    """
    os.makedirs(directory, exist_ok=True)
    state = OrderedDict((k, v.detach().contiguous().cpu()) for k, v in model.state_dict().items())
    if safe_serialization:
        from safetensors.torch import save_file

        with atomic_path(os.path.join(directory, "model.safetensors")) as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
    else:
        with atomic_path(os.path.join(directory, "pytorch_model.bin")) as tmp:
            torch.save(state, tmp)
    model.config.save_json(os.path.join(directory, "config.json"))


def resolve_hf_cache(repo_id: str, revision: str = "main") -> str:
    """Folder of ``repo_id`` in the local HF cache; :class:`CheckpointError` if absent."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshots = os.path.join(repo_dir, "snapshots")
    ref = os.path.join(repo_dir, "refs", revision)
    commit = None
    if os.path.isfile(ref):
        with open(ref) as f:
            commit = f.read().strip()
    elif os.path.isdir(snapshots) and len(os.listdir(snapshots)) == 1:
        commit = os.listdir(snapshots)[0]
    folder = os.path.join(snapshots, commit) if commit else None
    if folder and os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    raise CheckpointError(
        f"{repo_id} is not in the local Hugging Face cache (looked for config.json and model weights "
        f"under {repo_dir}/snapshots/). This package never downloads: fetch it where there is network "
        f"(`huggingface-cli download {repo_id}`) and copy the cache, or pass a local folder holding "
        f"config.json + model.safetensors/pytorch_model.bin, or the fairseq .pt file.")


# ------------------------------------------------------------------ HF folders
def _load_dir(path: str, strict_config: bool, map_location) -> Tuple[MERTConfig, Dict[str, torch.Tensor]]:
    if os.path.isfile(os.path.join(path, SB_STATE_FILE)):
        return _load_speechbrain_dir(path, strict_config, map_location)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model folder, or a "
                              f"SpeechBrain checkpoint folder with {SB_STATE_FILE})")
    config = MERTConfig.from_json_file(cfg_path, strict=strict_config)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(path, index)):
            return config, _load_sharded(path, index, map_location)
    for name in ("model.safetensors", "pytorch_model.bin"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            return config, _load_state_file(f, map_location)
    raise CheckpointError(f"{path}: no weights (looked for model.safetensors, pytorch_model.bin and "
                          f"their .index.json shards)")


def _load_sharded(path: str, index: str, map_location) -> Dict[str, torch.Tensor]:
    with open(os.path.join(path, index)) as f:
        weight_map = json.load(f).get("weight_map", {})
    state: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard:
            raise CheckpointError(f"{path}/{index}: shard name {shard!r} points outside the folder")
        state.update(_load_state_file(os.path.join(path, shard), map_location))
    return state


def _load_state_file(f: str, map_location) -> Dict[str, torch.Tensor]:
    try:
        if f.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(f, device=str(map_location))
        state = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated or hostile file
        raise CheckpointError(f"{f}: cannot load weights safely ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{f}: expected a dict of tensors")
    return state


# ------------------------------------------------------------ SpeechBrain
def _load_speechbrain_dir(path: str, strict_config: bool, map_location):
    cfg_file = os.path.join(path, SB_CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"{path}: SpeechBrain checkpoint without {SB_CONFIG_FILE}; cannot tell the geometry")
    config = MERTConfig.from_json_file(cfg_file, strict=strict_config)
    state = _load_state_file(os.path.join(path, SB_STATE_FILE), map_location)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return config, state


# ------------------------------------------------------------------- fairseq
class _Stub:
    """Inert stand-in for a class named in a pickle (never imported or run)."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args
        self.__dict__["_items"] = {}

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("_list", []).extend(values)

    def __repr__(self):
        return f"<stub {self._qualname}>"


# Classes the fairseq MERT checkpoints need, reconstructed as inert stubs.
_STUB_MODULE_PREFIXES = ("fairseq.", "omegaconf.", "mert_fairseq.", "fairseq_cli.")
_STUB_GLOBALS = {("argparse", "Namespace"), ("typing", "Any")}
# Real callables admitted: tensor/storage rebuilding and plain containers only.
_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"),
    ("builtins", "bool"), ("builtins", "bytes"), ("builtins", "object"), ("builtins", "slice"),
    ("copyreg", "_reconstructor"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
    ("torch", "Size"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Protocol-2 pickles (torch.save's default) spell Python 2 names: __builtin__, copy_reg.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        if module.startswith(_STUB_MODULE_PREFIXES) or (module, name) in _STUB_GLOBALS or module in (
                "fairseq", "omegaconf", "enum"):
            return type(name, (_Stub,), {"_qualname": f"{module}.{name}"})
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: not needed by a MERT "
                                     f"checkpoint and unsafe to import")


_TORCH_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
                 "uint8", "bool", "long", "float", "half", "double"}
_restricted_pickle = types.ModuleType("mert_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.__dict__["load"] = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()
_restricted_pickle.__dict__["loads"] = lambda b, **kw: _RestrictedUnpickler(io.BytesIO(b), **kw).load()


def restricted_load(path: str, map_location="cpu") -> Any:
    """``torch.load`` through the restricted unpickler (no imports, no code)."""
    try:
        return torch.load(path, map_location=map_location, pickle_module=_restricted_pickle, weights_only=False)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None


def _looks_like_fairseq(path: str) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return True  # legacy pickle: let restricted_load decide
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith("data.pkl")]
        if not names:
            return False
        blob = z.read(names[0])
    return b"fairseq" in blob or b"omegaconf" in blob or b"cfg" in blob


def plain(obj: Any) -> Any:
    """Turn stubs (omegaconf DictConfig/ListConfig/nodes, Namespace) into plain Python."""
    if isinstance(obj, _Stub):
        d = obj.__dict__
        state = d.get("_state")
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = state[0] or state[1]
        if isinstance(state, dict):
            if "_content" in state:
                return plain(state["_content"])
            if "_val" in state:
                return plain(state["_val"])
            return {k: plain(v) for k, v in state.items()}
        if d.get("_items"):
            return {k: plain(v) for k, v in d["_items"].items()}
        if d.get("_list"):
            return [plain(v) for v in d["_list"]]
        if d.get("_args"):
            return plain(d["_args"][0]) if len(d["_args"]) == 1 else [plain(a) for a in d["_args"]]
        return None
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def _eval_layers(spec: str):
    """Evaluate fairseq's ``conv_feature_layers`` string (``"[(512,10,5)] + [(512,3,2)] * 4"``)
    with a whitelist of list/tuple/int/+/* nodes only."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            vals = [ev(e) for e in node.elts]
            return vals if isinstance(node, ast.List) else tuple(vals)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ConfigError(f"unsupported conv_feature_layers expression: {spec!r}")

    return ev(ast.parse(spec, mode="eval"))


_FAIRSEQ_KEY_MAP = [
    ("post_extract_proj.", "feature_projection.projection."),
    ("encoder.pos_conv.0.", "encoder.pos_conv_embed.conv."),
    ("mask_emb", "masked_spec_embed"),
]


def _map_fairseq_key(k: str) -> Optional[str]:
    if k.startswith("layer_norm."):
        return "feature_projection." + k
    for old, new in _FAIRSEQ_KEY_MAP:
        if k.startswith(old):
            return new + k[len(old):]
    if k.startswith("feature_extractor.conv_layers."):
        parts = k.split(".")  # feature_extractor.conv_layers.{l}.{0|2}.{weight|bias}
        if len(parts) == 5:
            sub = {"0": "conv", "2": "layer_norm"}.get(parts[3])
            return None if sub is None else f"feature_extractor.conv_layers.{parts[2]}.{sub}.{parts[4]}"
    if k.startswith("encoder.layers."):
        k = k.replace(".self_attn_layer_norm.", ".layer_norm.").replace(".self_attn.", ".attention.")
        k = k.replace(".fc1.", ".feed_forward.intermediate_dense.").replace(".fc2.", ".feed_forward.output_dense.")
        return k
    if k.startswith("encoder.layer_norm."):
        return k
    return None  # pretraining heads, CQT/mel branches: not part of the encoder


def load_fairseq_checkpoint(path: str, map_location="cpu") -> Tuple[MERTConfig, Dict[str, torch.Tensor]]:
    """Read an original fairseq MERT/HuBERT ``.pt`` without fairseq installed."""
    ckpt = restricted_load(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    if ckpt.get("cfg") is not None:
        cfg = plain(ckpt["cfg"])
        model_cfg, task_cfg = cfg.get("model") or {}, cfg.get("task") or {}
    elif ckpt.get("args") is not None:
        model_cfg = task_cfg = plain(ckpt["args"]) or {}
    else:
        raise CheckpointError(f"{path}: fairseq checkpoint without 'cfg' or 'args'")
    config = fairseq_config_to_mert(model_cfg, task_cfg, source=path)
    state: Dict[str, torch.Tensor] = OrderedDict()
    for k, v in plain(ckpt["model"]).items():
        new = _map_fairseq_key(k)
        if new is not None and isinstance(v, torch.Tensor):
            state[new] = v
    if "masked_spec_embed" in state and config.mask_time_prob == 0:
        config.mask_time_prob = 0.05
    return config, state


def fairseq_config_to_mert(m: Dict[str, Any], t: Dict[str, Any], source: str = "fairseq") -> MERTConfig:
    if m.get("extractor_mode", "default") != "default":
        raise ConfigError(f"{source}: extractor_mode {m.get('extractor_mode')!r} is not supported")
    if m.get("activation_fn", "gelu") != "gelu":
        raise ConfigError(f"{source}: activation_fn {m.get('activation_fn')!r} is not supported")
    layers = _eval_layers(m.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"))
    dropout = float(m.get("dropout", 0.1))
    cfg = MERTConfig(
        sample_rate=int(t.get("sample_rate", 16000)),
        hidden_size=int(m.get("encoder_embed_dim", 768)),
        num_hidden_layers=int(m.get("encoder_layers", 12)),
        num_attention_heads=int(m.get("encoder_attention_heads", 12)),
        intermediate_size=int(m.get("encoder_ffn_embed_dim", 3072)),
        conv_dim=[int(l[0]) for l in layers], conv_kernel=[int(l[1]) for l in layers],
        conv_stride=[int(l[2]) for l in layers], conv_bias=bool(m.get("conv_bias", False)),
        num_conv_pos_embeddings=int(m.get("conv_pos", 128)),
        num_conv_pos_embedding_groups=int(m.get("conv_pos_groups", 16)),
        do_stable_layer_norm=bool(m.get("layer_norm_first", False)),
        hidden_dropout=dropout, attention_dropout=float(m.get("attention_dropout", 0.1)),
        activation_dropout=float(m.get("activation_dropout", 0.0)),
        feat_proj_dropout=float(m.get("dropout_input", 0.0)),
        layerdrop=float(m.get("encoder_layerdrop", 0.0)),
        mask_time_prob=0.05,
        attention_relax=float(m.get("attention_relax", -1.0)),
        deepnorm=bool(m.get("deepnorm", False)),
        feature_extractor_cqt=bool(m.get("feature_extractor_cqt", False)),
    )
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/")) and not os.path.splitext(s)[1]
