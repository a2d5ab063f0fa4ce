"""Convert any checkpoint the MERT upstream reads into a plain HF folder (s3prl's ``convert.py`` role).

s3prl's hubert/wav2vec2 upstreams ship a ``convert.py`` that turns a fairseq
checkpoint into a fairseq-free file. Here every source is already read without
fairseq (a restricted unpickler for fairseq ``.pt``), so conversion is optional;
it produces ``config.json`` + ``model.safetensors``, which loads faster, needs
no unpickling at all and also loads in ``transformers.HubertModel``::

    python -m s3prl_upstream.convert MERT-v1-95M_fairseq.pt mert_v1_95m_hf/
    python -m s3prl_upstream.run_downstream -m train -u mert -k mert_v1_95m_hf/ -d ...
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from mert_plugin import MERTModel
from mert_plugin.errors import MERTError, run_cli


def convert(source: str, output_dir: str, force: bool = False) -> str:
    """Load ``source`` (HF folder, fairseq ``.pt``, SpeechBrain ``CKPT+...`` folder) and save an HF folder."""
    if os.path.exists(os.path.join(output_dir, "config.json")) and not force:
        raise MERTError(f"{output_dir}: already holds a model (config.json); pass --force to overwrite")
    model = MERTModel.from_pretrained(source)
    model.save_pretrained(output_dir)  # files are written under temporary names, then renamed
    return output_dir


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s3prl_upstream.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="HF folder, fairseq .pt, or SpeechBrain recipe CKPT+... folder")
    parser.add_argument("output_dir", help="folder to write config.json + model.safetensors into")
    parser.add_argument("--force", action="store_true", help="overwrite a model already in output_dir")
    args = parser.parse_args(argv)
    return run_cli(lambda: _run(args), user_error_status=1)


def _run(args) -> int:
    print(f"wrote {convert(args.source, args.output_dir, args.force)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
