"""Encoder throughput: mert_plugin.MERTModel vs transformers.HubertModel, side by side.

Same random MERT-v1-95M weights, same clip, same thread count, one process.
Runs alternate (ours, reference, ours, ...) so that load on a shared machine
hits both alike; the ratio of medians is the figure to read, not the absolute
times. Prints seconds of audio per wall second and the max abs difference of
all hidden states.

    .venv/bin/python bench/encoder_speed.py [--seconds 30] [--threads 2] [--repeats 3] [--preset mert-v1-95m]
"""
import argparse

import torch
from _common import alternate, machine_line


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="mert-v1-95m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import HubertConfig, HubertModel

    from mert_plugin import MERTConfig, MERTModel

    cfg = MERTConfig.from_preset(args.preset)
    ours = MERTModel.from_preset(args.preset, seed=0).eval()
    hf_cfg = cfg.to_hf_dict()
    hf_cfg.pop("model_type"), hf_cfg.pop("architectures")
    ref = HubertModel(HubertConfig(**hf_cfg)).eval()
    ref.load_state_dict(_to_hf(ours))
    dtype = getattr(torch, args.dtype)
    ours.to(args.device, dtype)
    ref.to(args.device, dtype)

    wav = torch.randn(1, int(args.seconds * cfg.sample_rate), device=args.device, dtype=dtype) * 0.1

    def run_ours():
        return ours(wav).hidden_states

    def run_ref():
        return ref(wav, output_hidden_states=True).hidden_states

    with torch.inference_mode():
        a, b = run_ours(), run_ref()  # warm-up, and the parity figure
        diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a[:-1], b[:-1]))
        diff = max(diff, (a[-1].float() - ref(wav).last_hidden_state.float()).abs().max().item())
        del a, b
        timings = alternate({"mert_plugin": run_ours, "transformers": run_ref}, args.repeats, args.device)

    med = {k: timings.median(k) for k in timings.wall}
    print(machine_line(threads=args.threads, device=args.device, dtype=args.dtype))
    print(f"clip: {args.seconds:.0f} s at {cfg.sample_rate} Hz, preset {args.preset}, repeats {args.repeats}")
    for k, v in med.items():
        print(f"  {k:<13} median {v:7.2f} s  -> {args.seconds / v:7.1f} s audio / s   (runs: {timings.runs(k)})")
    print(f"speed-up (transformers / mert_plugin): {med['transformers'] / med['mert_plugin']:.2f}x")
    print(f"max |diff| over all hidden states: {diff:.2e}")


def _to_hf(model):
    """Our state dict with the weight-norm names the in-memory HF module uses."""
    return {k.replace("weight_g", "parametrizations.weight.original0")
            .replace("weight_v", "parametrizations.weight.original1"): v for k, v in model.state_dict().items()}


if __name__ == "__main__":
    main()
