"""Checkpoint loading and saving, with no code execution from model files.

Supported sources (:func:`load_checkpoint`):

* a local Hugging Face folder: ``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin`` (or their sharded ``*.index.json`` forms);
* a hub id such as ``m-a-p/MERT-v1-95M``, resolved by ``huggingface_hub`` as
  ``transformers`` resolves it (:func:`resolve_hub_model`): downloaded into the HF
  cache when the hub can be reached, read from the cache otherwise or when
  ``HF_HUB_OFFLINE=1`` / ``local_files_only=True``; ``revision`` picks a branch,
  tag or commit;
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
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .atomic import atomic_path
from .config import MERTConfig
from .errors import CheckpointError, ConfigError

_TOP_LEVEL = ("feature_extractor.", "feature_projection.", "encoder.", "masked_spec_embed")
_ANCHOR = "feature_extractor.conv_layers.0.conv.weight"
SB_STATE_FILE = "student.ckpt"
SB_CONFIG_FILE = "mert_config.ckpt"


# --------------------------------------------------------------------------- API
def load_checkpoint(path_or_id: str, strict_config: bool = True, map_location="cpu", *,
                    revision: Optional[str] = None, cache_dir: Optional[str] = None,
                    local_files_only: bool = False, token: Union[None, bool, str] = None,
                    force_download: bool = False) -> Tuple[MERTConfig, Dict[str, torch.Tensor]]:
    """Resolve ``path_or_id`` and return ``(config, state_dict)`` (HF key names).

    A local path wins over a hub id of the same spelling (as in ``transformers``). The
    keyword arguments apply to hub ids only (see :func:`resolve_hub_model`).
    """
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
        folder = resolve_hub_model(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                   token=token, force_download=force_download)
        return _load_dir(folder, strict_config, map_location)
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


PREPROCESSOR_FILE = "preprocessor_config.json"


def preprocessor_config(sample_rate: int, do_normalize: Optional[bool] = None) -> Dict[str, Any]:
    """The ``Wav2Vec2FeatureExtractor`` settings the hub's MERT folders hold (``preprocessor_config.json``).

    ``do_normalize`` defaults to the released models' files: False at 24 kHz (MERT-v1: raw
    audio, as pretrained), True at 16 kHz (MERT-v0's processor normalises each clip).
    """
    if do_normalize is None:
        do_normalize = int(sample_rate) == 16000
    return {"do_normalize": bool(do_normalize), "feature_extractor_type": "Wav2Vec2FeatureExtractor",
            "feature_size": 1, "padding_side": "right", "padding_value": 0.0,
            "return_attention_mask": True, "sampling_rate": int(sample_rate)}


_MODEL_CARD = """\
---
library_name: transformers
pipeline_tag: feature-extraction
tags:
- music
- audio
- mert
- hubert
- self-supervised-learning
---

# {name}

A MERT music encoder ([arXiv 2306.00107](https://arxiv.org/abs/2306.00107)) written by
`mert_plugin`'s `save_pretrained`: {layers} transformer layers x {hidden}, {rate} Hz mono input,
{fps:g} frames per second, {states} hidden states (the transformer input and every layer).
The config is a plain `model_type: hubert` one: no remote code is needed.

```python
from transformers import AutoFeatureExtractor, HubertModel
processor = AutoFeatureExtractor.from_pretrained("<this folder or repo>")   # Wav2Vec2FeatureExtractor, do_normalize={norm}
model = HubertModel.from_pretrained("<this folder or repo>")
inputs = processor(wav, sampling_rate={rate}, return_tensors="pt")         # wav: 1-D float array at {rate} Hz
hidden_states = model(**inputs, output_hidden_states=True).hidden_states  # {states} x [1, T, {hidden}]

from mert_plugin import MERTModel
model = MERTModel.from_pretrained("<this folder or repo>")
```
{pre_ln}
Training data, intended use, licence and evaluation: to be written by the model's author.
"""


def save_pretrained(model, directory: str, safe_serialization: bool = True,
                    do_normalize: Optional[bool] = None) -> None:
    """Write an HF folder (``model_type: hubert``) that plain ``HubertModel`` loads.

    Next to ``config.json`` and the weights it writes what the hub's MERT folders hold:
    ``preprocessor_config.json`` (``Wav2Vec2FeatureExtractor``, so ``AutoFeatureExtractor``
    loads it; see :func:`preprocessor_config`), and a model-card stub ``README.md`` unless the
    folder already has one (a card someone wrote is never overwritten). Files are written
    under temporary names and renamed, so an interrupted save never leaves a half-written
    model behind.
    """
    from .atomic import atomic_write_json, atomic_write_text

    os.makedirs(directory, exist_ok=True)
    state = OrderedDict((k, v.detach().contiguous().cpu()) for k, v in model.state_dict().items())
    if safe_serialization:
        from safetensors.torch import save_file

        with atomic_path(os.path.join(directory, "model.safetensors")) as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
    else:
        with atomic_path(os.path.join(directory, "pytorch_model.bin")) as tmp:
            torch.save(state, tmp)
    config = model.config
    config.save_json(os.path.join(directory, "config.json"))
    pre = preprocessor_config(config.sample_rate, do_normalize)
    atomic_write_json(os.path.join(directory, PREPROCESSOR_FILE), pre)
    card = os.path.join(directory, "README.md")
    if not os.path.exists(card):
        hop = 1
        for s in config.conv_stride:
            hop *= s
        pre_ln = ("\nThis is a pre-LN model (`do_stable_layer_norm`). As in MERT's own code, the last hidden state is "
                  "layer-normed; `transformers` >= 5 returns it un-normed, `MERTModel` normed.\n"
                  if config.do_stable_layer_norm else "")
        atomic_write_text(card, _MODEL_CARD.format(
            name=os.path.basename(os.path.abspath(directory)), layers=config.num_hidden_layers,
            hidden=config.hidden_size, rate=config.sample_rate, fps=config.sample_rate / hop,
            states=config.num_hidden_layers + 1, norm=pre["do_normalize"], pre_ln=pre_ln))


# Weight files tried in order, as transformers does: safetensors first, then torch pickles
# (loaded with weights_only=True). A repo's other files (the fairseq .pt, remote code) are never fetched.
_HUB_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def resolve_hub_model(repo_id: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                      local_files_only: bool = False, token: Union[None, bool, str] = None,
                      force_download: bool = False, extra_files: Sequence[str] = ()) -> str:
    """Snapshot folder of hub model ``repo_id`` holding ``config.json`` and its weights.

    Resolution is ``huggingface_hub``'s own (``hf_hub_download``), as in
    ``transformers``' ``from_pretrained``: the files are downloaded into the HF cache
    (``cache_dir``, default ``$HF_HUB_CACHE`` or ``$HF_HOME/hub``) when the hub can be
    reached and are read from the cache when it cannot, when ``HF_HUB_OFFLINE=1`` is
    set or with ``local_files_only=True``. ``revision`` is a branch, tag or commit
    (default ``main``). Only ``config.json``, the first weight file found in the order
    ``model.safetensors``, its ``.index.json``, ``pytorch_model.bin``, its ``.index.json``
    (plus the shards an index names) are fetched, at the commit ``config.json`` resolved to,
    and ``extra_files`` (e.g. ``preprocessor_config.json``) when the repo has them. Raises :class:`CheckpointError` with the reason and what to do.
    """
    try:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:  # pragma: no cover - huggingface_hub is a declared dependency
        raise CheckpointError(f"{repo_id}: loading a hub id needs huggingface_hub (pip install huggingface_hub), "
                              f"or pass a local folder") from None
    offline = bool(local_files_only or constants.is_offline_mode())
    if force_download and offline:
        raise CheckpointError(f"{repo_id}: force_download (s3prl's -r) needs the hub, but "
                              f"{'HF_HUB_OFFLINE is set' if constants.is_offline_mode() else 'local_files_only=True'}")
    where = cache_dir or constants.HF_HUB_CACHE
    rev = revision or "main"

    def fetch(filename: str, rev: Optional[str]) -> str:
        return hf_hub_download(repo_id, filename, revision=rev, cache_dir=cache_dir, token=token,
                               local_files_only=offline, force_download=force_download,
                               library_name="mert-plugin")

    def not_cached(what: str) -> CheckpointError:
        how = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode() else
               "local_files_only=True" if local_files_only else "the hub could not be reached")
        return CheckpointError(
            f"{repo_id} (revision {rev}): {what} is not in the Hugging Face cache {where} and {how}. "
            f"Download it where there is network (`hf download {repo_id}`) and copy the cache "
            f"(models--{repo_id.replace('/', '--')}/), or pass a local folder holding config.json + "
            f"model.safetensors/pytorch_model.bin, or the fairseq .pt file.")

    try:
        config = fetch("config.json", revision)
    except (GatedRepoError, RepositoryNotFoundError) as exc:
        raise CheckpointError(f"{repo_id}: no such model on the hub, or it is private/gated and needs a token "
                              f"(HF_TOKEN or token=...) [{type(exc).__name__}]") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: no revision {rev!r} on the hub") from None
    except LocalEntryNotFoundError:
        raise not_cached("config.json") from None
    except EntryNotFoundError:
        raise CheckpointError(f"{repo_id} (revision {rev}): the repo has no config.json; not a model folder") from None
    except (OSError, ValueError) as exc:  # network or cache trouble not covered above
        raise CheckpointError(f"{repo_id}: cannot resolve on the hub ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    folder = os.path.dirname(config)
    # As transformers does, the other files are fetched at the commit that config.json resolved to
    # (the snapshot folder's name): one consistent revision, and a cached file needs no hub call.
    commit = os.path.basename(folder)
    names = [n for n in _HUB_WEIGHTS if not force_download and isinstance(
        try_to_load_from_cache(repo_id, n, cache_dir=cache_dir, revision=commit), str)] or list(_HUB_WEIGHTS)
    missing_locally = False
    for name in names:
        try:
            weights = fetch(name, commit)
        except LocalEntryNotFoundError:
            missing_locally = True  # offline or unreachable: another spelling may be cached
            continue
        except EntryNotFoundError:
            continue  # the repo has no such file: try the next spelling
        if name.endswith(".index.json"):
            for shard in _index_shards(weights):
                fetch(shard, commit)
        for extra in extra_files:  # optional files: absent from the repo or the cache is fine
            if force_download or not isinstance(
                    try_to_load_from_cache(repo_id, extra, cache_dir=cache_dir, revision=commit), str):
                try:
                    fetch(extra, commit)
                except (EntryNotFoundError, OSError, ValueError):
                    pass
        return folder
    if missing_locally:
        raise not_cached("no weight file (model.safetensors or pytorch_model.bin)")
    raise CheckpointError(f"{repo_id} (revision {rev}): the repo holds no model.safetensors or pytorch_model.bin "
                          f"(a fairseq .pt can be downloaded and passed as a file)")


def _index_shards(index_file: str) -> List[str]:
    with open(index_file, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map", {})
    shards = sorted(set(weight_map.values()))
    bad = [s for s in shards if not isinstance(s, str) or os.path.basename(s) != s]
    if bad:
        raise CheckpointError(f"{index_file}: shard name {bad[0]!r} points outside the folder")
    return shards


def resolve_hf_cache(repo_id: str, revision: str = "main") -> str:
    """Folder of ``repo_id`` in the local HF cache only (``resolve_hub_model`` with
    ``local_files_only=True``); :class:`CheckpointError` if absent."""
    return resolve_hub_model(repo_id, revision=revision, local_files_only=True)


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
