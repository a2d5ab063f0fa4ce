"""s3prl's ``run_downstream.py`` with the MERT upstreams and music downstream registered.

Usage (every s3prl ``run_downstream.py`` option works unchanged)::

    python -m s3prl_upstream.run_downstream -m train -u mert -k /path/to/MERT-v1-95M \\
        -d music_classification -n my_exp -o "config.downstream_expert.datarc.csv=/data/genre.csv"
    mert-s3prl-downstream -m evaluate -e result/downstream/my_exp/dev-best.ckpt

Before handing over to ``s3prl.run_downstream.main()`` it applies
:func:`s3prl_upstream.register` and these launcher fixes, each only when needed:

* ``-c`` missing and ``./downstream/<d>/config.yaml`` absent (s3prl's pip
  package ships no downstream configs): use the config shipped here for ``<d>``;
* ``--device`` not given on a machine without CUDA: ``--device cpu`` (s3prl's
  default ``cuda`` fails there, also when evaluating a checkpoint);
* ``LOCAL_RANK`` set by ``torchrun`` (which passes no ``--local_rank``): pass it
  on, so the runner initialises DDP; ``--local-rank`` (torch.distributed.launch
  since torch 2.0) is rewritten to ``--local_rank``;
* ``tensorboardX`` (imported by the runner, not declared by s3prl): a clear error if missing;
* ``--hub huggingface``: a clear error on huggingface_hub >= 1.0, where it cannot work;
* ``-e`` / ``-a``: a missing, truncated or hostile checkpoint (objects other than tensors and
  plain data, or code in the config strings s3prl ``eval()``s) is refused with one line.

User errors (bad checkpoint, missing file, bad CSV) print one ``error:`` line and exit 1.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import pickle
import sys
import zipfile
from typing import List, Optional

from mert_plugin.errors import MERTError, run_cli

PREFIX = "[mert-s3prl]"


def _note(message: str) -> None:
    print(f"{PREFIX} {message}", file=sys.stderr)


def _known_args(argv: List[str]) -> argparse.Namespace:
    """The few run_downstream.py options the launcher looks at (same spellings as s3prl)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("-m", "--mode")
    p.add_argument("-c", "--config")
    p.add_argument("-d", "--downstream")
    p.add_argument("-e", "--past_exp")
    p.add_argument("-a", "--auto_resume", action="store_true")
    p.add_argument("-p", "--expdir")
    p.add_argument("-n", "--expname")
    p.add_argument("--device")
    p.add_argument("--local_rank")
    p.add_argument("--hub")
    return p.parse_known_args(argv)[0]


def prepare_argv(argv: List[str], environ: Optional[dict] = None) -> List[str]:
    """Return the argument list for s3prl's runner, with the launcher fixes applied."""
    environ = os.environ if environ is None else environ
    argv = [("--local_rank" + a[len("--local-rank"):]) if a.startswith("--local-rank") else a for a in argv]
    if any(a in ("-h", "--help") for a in argv):
        return argv
    args = _known_args(argv)
    argv = _absolute_upstream_ckpt(argv)
    if args.local_rank is None and "LOCAL_RANK" in environ:
        argv += ["--local_rank", environ["LOCAL_RANK"]]
    if args.device is None:
        import torch

        if not torch.cuda.is_available():
            argv += ["--device", "cpu"]
            _note("no CUDA device: using --device cpu")
    if args.hub == "huggingface":
        import huggingface_hub

        if not hasattr(huggingface_hub.HfApi, "login"):
            raise MERTError(f"--hub huggingface needs huggingface_hub < 1.0 (installed: "
                            f"{huggingface_hub.__version__}); pass a local checkpoint with -u mert -k <path> instead")
    resume_from = _resume_source(args)
    if resume_from is not None:
        _check_past_exp(resume_from)
    if args.past_exp is not None:
        pass  # s3prl takes args and config from the checkpoint
    elif args.config is not None:
        if not os.path.isfile(args.config):
            raise MERTError(f"-c {args.config}: no such config file")
    elif args.mode in ("train", "evaluate", "inference") and args.downstream:
        if not os.path.isfile(f"./downstream/{args.downstream}/config.yaml"):
            argv += ["-c", _shipped_config(args.downstream)]
    return argv


def _resume_source(args: argparse.Namespace) -> Optional[str]:
    """What s3prl will resume from: ``-e``, or with ``-a`` an experiment folder holding checkpoints."""
    if args.past_exp is not None:
        return args.past_exp
    expdir = args.expdir or f"result/downstream/{args.expname}"
    if args.auto_resume and glob.glob(os.path.join(expdir, "states-*.ckpt")):
        return expdir
    return None


def _check_past_exp(past_exp: str) -> str:
    """The checkpoint s3prl will load for ``-e``; fail clearly where s3prl would hit an
    AssertionError or a zip error."""
    if not os.path.exists(past_exp):
        raise MERTError(f"-e {past_exp}: no such checkpoint or experiment folder")
    ckpt = past_exp
    if os.path.isdir(past_exp):
        found = glob.glob(os.path.join(past_exp, "states-*.ckpt"))
        if not found:
            raise MERTError(f"-e {past_exp}: folder has no states-*.ckpt to resume from")
        # the one s3prl picks: the highest step
        ckpt = max(found, key=lambda p: int(p.rsplit("-", 1)[-1].split(".")[0]))
    if not zipfile.is_zipfile(ckpt):
        raise MERTError(f"{ckpt}: not a complete torch checkpoint (truncated, e.g. by a job killed while "
                        f"saving, or not a checkpoint); delete it to resume from an earlier one")
    return ckpt


def check_checkpoint_config(ckpt: str) -> None:
    """Refuse a runner checkpoint whose ``Config`` carries code for s3prl's ``eval()``.

    Resuming, s3prl evaluates ``optimizer.name`` and ``scheduler.name``
    (``eval(f"get_{name}")``) and downstreams evaluate ``modelrc`` ``select``/``pooling``
    names, all taken from the checkpoint. They must be plain identifiers. The file is
    read with ``weights_only=True`` and ``mmap=True`` (tensors are not read into memory).
    """
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    config = state.get("Config") if isinstance(state, dict) else None
    if not isinstance(config, dict):
        raise MERTError(f"{ckpt}: not an s3prl runner checkpoint (no Config)")
    bad = [f"{section}.name={sub['name']!r}" for section in ("optimizer", "scheduler")
           if isinstance(sub := config.get(section), dict) and not _is_identifier(sub.get("name", "x"))]
    bad += _non_identifier_names(config.get("downstream_expert", {}).get("modelrc"), "downstream_expert.modelrc")
    if bad:
        raise MERTError(f"{ckpt}: refused: its config holds names that s3prl evaluates as code and that are "
                        f"not plain identifiers: {', '.join(bad)}")


def _is_identifier(value) -> bool:
    return isinstance(value, str) and value.isidentifier()


def _non_identifier_names(rc, where: str) -> List[str]:
    if not isinstance(rc, dict):
        return []
    out = []
    for key, value in rc.items():
        if key in ("select", "pooling") and not _is_identifier(value):
            out.append(f"{where}.{key}={value!r}")
        elif isinstance(value, dict):
            out += _non_identifier_names(value, f"{where}.{key}")
    return out


def _absolute_upstream_ckpt(argv: List[str]) -> List[str]:
    """Store ``-k`` as an absolute path (s3prl saves it in the checkpoint for ``-e`` from elsewhere)."""
    out = list(argv)
    for i, a in enumerate(out):
        if a in ("-k", "--upstream_ckpt") and i + 1 < len(out) and os.path.exists(out[i + 1]):
            out[i + 1] = os.path.abspath(out[i + 1])
        elif a.startswith("--upstream_ckpt=") and os.path.exists(a.split("=", 1)[1]):
            out[i] = "--upstream_ckpt=" + os.path.abspath(a.split("=", 1)[1])
    return out


def _shipped_config(downstream: str) -> str:
    from . import config_path, shipped_configs

    if downstream not in shipped_configs():
        raise MERTError(f"no config for -d {downstream}: s3prl's pip package ships no downstream configs "
                        f"and ./downstream/{downstream}/config.yaml does not exist; pass -c <yaml> "
                        f"(configs shipped here: {', '.join(shipped_configs())})")
    path = config_path(downstream)
    _note(f"using the shipped config {path}")
    return path


def check_runner_dependencies() -> None:
    if importlib.util.find_spec("tensorboardX") is None:
        raise MERTError("s3prl's runner imports tensorboardX, which s3prl 0.4.18 does not declare: "
                        "pip install tensorboardX (or pip install 'mert-plugin[s3prl]')")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _run(argv), user_error_status=1)


def _run(argv: List[str]) -> int:
    try:
        argv = prepare_argv(argv)
        check_runner_dependencies()
        from . import register

        applied = register()
        if applied:
            _note(f"compatibility fixes applied: {', '.join(applied)}")
        resume_from = _resume_source(_known_args(argv))
        if resume_from is not None:
            check_checkpoint_config(_check_past_exp(resume_from))
        from s3prl import run_downstream

        sys.argv = [run_downstream.__file__] + argv
        run_downstream.main()
    except pickle.UnpicklingError as exc:
        # s3prl loads its checkpoints with torch.load(weights_only=True): a file holding
        # anything but tensors and plain data is refused, never unpickled.
        lines = [l for l in str(exc).splitlines() if "GLOBAL" in l or "global" in l]
        reason = lines[0].strip() if lines else type(exc).__name__
        source = _known_args(argv).past_exp or "checkpoint"
        raise MERTError(f"{source}: refused to load: it holds objects other than tensors and plain data "
                        f"({reason})") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
