"""Write ``mert_local.pt``: reference hidden states in s3prl's ``sample_hidden_states`` format.

s3prl's upstream test (``test/test_upstream.py``) feeds ``get_pseudo_wavs(seed=0, padded=True)``
(two clips of 1-3 s at 16 kHz) to ``S3PRLUpstream(name)`` and compares the list of hidden states
``[B, T, D]`` with ``sample_hidden_states/<name>.pt``. This script computes that list for the
seeded ``mert-tiny`` model (``MERTModel.from_preset("mert-tiny", seed=0)``, saved as an HF folder)
WITHOUT the code under test: each clip is resampled 16 -> 24 kHz with
``torchaudio.functional.resample`` (the upstream's documented preprocessing), run alone through
``transformers.HubertModel`` (output_hidden_states), fitted to ``ceil(n / 213)`` frames by
repeating its last frame or trimming (the upstream's documented frame-rate rule, docs/S3PRL.md),
and zero-padded to the longest clip.

    .venv/bin/python tests/data/sample_hidden_states/generate.py

tests/test_s3prl_upstream.py checks the stored file against HubertModel again (so a change of the
seeded weights is caught as a stale reference, not as an upstream bug) and against the upstream.
"""
import math
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RATE_16K = 213  # get_downsample_rates() of a 24 kHz model, in 16 kHz samples


def tiny_folder(path: str) -> str:
    from mert_plugin import MERTModel

    MERTModel.from_preset("mert-tiny", seed=0).save_pretrained(path)
    return path


def reference_hidden_states(folder: str):
    import torchaudio
    from s3prl.util.pseudo_data import get_pseudo_wavs
    from transformers import HubertModel

    model = HubertModel.from_pretrained(folder).eval()
    wavs, wavs_len = get_pseudo_wavs(seed=0, padded=True)
    per_clip = []
    with torch.no_grad():
        for wav, n in zip(wavs, wavs_len.tolist()):
            x = torchaudio.functional.resample(wav[:n].detach(), 16000, 24000)
            states = model(x[None], output_hidden_states=True).hidden_states  # L+1 x [1, T, D]
            want = math.ceil(n / RATE_16K)
            fitted = []
            for h in states:
                h = h[0, :want]
                if h.shape[0] < want:
                    h = torch.cat([h, h[-1:].expand(want - h.shape[0], -1)])
                fitted.append(h)
            per_clip.append(fitted)
    longest = max(c[0].shape[0] for c in per_clip)
    return [torch.stack([torch.nn.functional.pad(c[layer], (0, 0, 0, longest - c[layer].shape[0]))
                         for c in per_clip]) for layer in range(len(per_clip[0]))]


def main() -> int:
    import s3prl_upstream

    s3prl_upstream.register()  # torchaudio/s3prl compatibility fixes before importing s3prl
    with tempfile.TemporaryDirectory() as tmp:
        hs = reference_hidden_states(tiny_folder(os.path.join(tmp, "mert_tiny")))
    target = os.path.join(HERE, "mert_local.pt")
    torch.save([h.contiguous() for h in hs], target)
    print(f"wrote {target}: {len(hs)} x {list(hs[0].shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
