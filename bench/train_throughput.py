"""Pretraining throughput: audio-hours per hour and model FLOPs utilisation (MFU).

One training step of the recipe's model (``MERTPretrainer``: noise mixture, span
masking, student, codebook + CQT heads, loss, backward, gradient clipping,
AdamW) on random offline-style labels; data loading and teachers are not timed.
Side by side in the same process, the same step with the student's encoder
replaced by ``transformers.HubertModel`` (same weights, same heads and loss):
the ratio of the two is the figure to compare across machines.

FLOPs are counted analytically (see :func:`forward_flops`; training = 3 x
forward, the usual approximation), so MFU does not depend on a profiler.
Peak: the accelerator's dense bf16/fp16 tensor peak from a table, or on a CPU
the fp32 GEMM rate measured in this run (a smoke figure: MFU against what this
CPU does on one large matmul).

    .venv/bin/python bench/train_throughput.py                      # CPU smoke (95M, 2 x 1 s)
    python bench/train_throughput.py --device cuda --precision bf16 --batch 16 --seconds 5
"""
import argparse
import statistics

import torch
from _common import alternate, machine_line, timed
from torch import nn

PEAK_TFLOPS = {  # dense bf16/fp16 tensor-core peaks from the vendors' data sheets
    "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100": 989.4,
    "A100": 312.0, "L40S": 362.1, "A10G": 125.0,
}


# ------------------------------------------------------------------ FLOPs
def forward_flops(config, objective, batch: int, num_samples: int, masked_frames: float) -> float:
    """Multiply-adds x 2 of one forward pass over ``batch`` clips of ``num_samples``.

    conv stem (sum over layers of T_l * C_out * C_in * k), feature projection,
    grouped positional conv, per layer 4 D^2 (q, k, v, out) + 2 T D (scores and
    weighted sum, per frame) + 2 D F (FFN), and the heads on the masked frames
    (projection to K x final_dim, cosine logits against every code, CQT head).
    Norms, activations, softmax and the loss are left out (< 1 %).
    """
    macs, n, c_in = 0, num_samples, 1
    for c_out, k, s in zip(config.conv_dim, config.conv_kernel, config.conv_stride):
        n = (n - k) // s + 1
        macs += n * c_out * c_in * k
        c_in = c_out
    t, d, f = n, config.hidden_size, config.intermediate_size
    macs += t * c_in * d
    macs += t * d * (d // config.num_conv_pos_embedding_groups) * config.num_conv_pos_embeddings
    macs += config.num_hidden_layers * (4 * t * d * d + 2 * t * t * d + 2 * t * d * f)
    per_clip = 2 * macs
    heads = 0
    if objective.use_acoustic:
        k, fd = objective.num_codebooks, objective.final_dim
        heads += masked_frames * (d * k * fd + k * objective.codebook_size * fd)
    if objective.use_cqt:
        heads += masked_frames * d * objective.cqt_bins
    return batch * per_clip + 2 * heads


def measure_cpu_peak(threads: int) -> float:
    """FLOP/s of a 2048^3 fp32 matmul on this CPU (best of 3)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(timed(lambda: a @ b)[0] for _ in range(3))
    return 2 * 2048 ** 3 / best


def gpu_peak(device) -> float:
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    raise SystemExit(f"unknown GPU {name!r}: add its dense bf16 peak to PEAK_TFLOPS")


# ---------------------------------------------------------- HF reference student
class HFStudent(nn.Module):
    """``transformers.HubertModel`` with the student interface ``MERTPretrainer`` uses."""

    def __init__(self, ours):
        super().__init__()
        from transformers import HubertConfig, HubertModel

        from mert_plugin.model import MERTOutput, _GradMultiply

        self._output, self._grad_mult = MERTOutput, _GradMultiply
        self.config = ours.config
        hf_cfg = ours.config.to_hf_dict()
        hf_cfg.pop("model_type"), hf_cfg.pop("architectures")
        self.hf = HubertModel(HubertConfig(**hf_cfg, attn_implementation="sdpa"))
        state = {k.replace("weight_g", "parametrizations.weight.original0")
                 .replace("weight_v", "parametrizations.weight.original1"): v for k, v in ours.state_dict().items()}
        self.hf.load_state_dict(state)
        self.masked_spec_embed = self.hf.masked_spec_embed
        self.feature_grad_mult = 1.0
        self._check_waveform = ours._check_waveform
        self.num_frames = ours.num_frames

    def forward(self, wav, padding_mask=None, mask_time_indices=None):
        features = self.hf.feature_extractor(wav).transpose(1, 2)
        if self.training and self.feature_grad_mult != 1.0:
            features = self._grad_mult.apply(features, self.feature_grad_mult)
        hidden = self.hf.feature_projection(features)
        hidden = self.hf._mask_hidden_states(hidden, mask_time_indices=mask_time_indices)
        last = self.hf.encoder(hidden).last_hidden_state
        return self._output(last, (last,), None, features)


# -------------------------------------------------------------------- step
def build(student, objective, device, lr=5e-4):
    from mert_plugin.objective import MERTPretrainer

    model = MERTPretrainer(student, objective).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    return model, opt


def make_step(model, opt, wav, codes, cqt, device, precision, max_grad_norm=10.0):
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(wav, codes, cqt)
        scaler.scale(out.loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(out.terms["masked_frames"])

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mert-v1-95m")
    ap.add_argument("--batch", type=int, default=2, help="clips per step")
    ap.add_argument("--seconds", type=float, default=1.0, help="clip length (the recipe crops 3-5 s)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                    help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--no-reference", action="store_true", help="skip the transformers side-by-side run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")

    from mert_plugin import MERTModel
    from mert_plugin.objective import ObjectiveConfig

    objective = ObjectiveConfig.from_preset(args.preset)
    ours = MERTModel.from_preset(args.preset, seed=0)
    n = int(args.seconds * ours.sample_rate) // 320 * 320
    frames = ours.num_frames(n)
    g = torch.Generator().manual_seed(0)
    wav = (0.1 * torch.randn(args.batch, n, generator=g)).to(device)
    codes = torch.randint(0, objective.codebook_size, (args.batch, objective.num_codebooks, frames), generator=g)
    cqt = torch.rand(args.batch, frames, objective.cqt_bins, generator=g)
    codes, cqt = codes.to(device), cqt.to(device)

    students = {"mert_plugin": ours}
    if not args.no_reference:
        students["transformers"] = HFStudent(ours)
    steps = {}
    for name, student in students.items():
        model, opt = build(student, objective, device)
        steps[name] = make_step(model, opt, wav, codes, cqt, device, precision)

    for name, step in steps.items():
        for _ in range(args.warmup):
            step()
    # Same masks and noise for both models: each round starts from the same seed.
    timings = alternate(steps, args.steps, device, before=lambda name, round_: torch.manual_seed(round_),
                        keep_results=True)

    if device.type == "cuda":
        peak, peak_note = gpu_peak(device), f"{torch.cuda.get_device_name(device)} dense bf16/fp16 data-sheet peak"
    else:
        peak, peak_note = measure_cpu_peak(args.threads), "fp32 2048^3 matmul measured in this run"
    audio_s = args.batch * n / ours.sample_rate
    print(machine_line(threads=args.threads, device=device, precision=precision))
    print(f"model: {args.preset} ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M), batch {args.batch} x "
          f"{n / ours.sample_rate:.2f} s = {audio_s:.1f} s audio/step, {frames} frames/clip, steps {args.steps}")
    print(f"peak: {peak / 1e12:.2f} TFLOP/s ({peak_note})")
    med = {}
    for name in steps:
        med[name] = timings.median(name)
        flops = 3 * forward_flops(ours.config, objective, args.batch, n, statistics.mean(timings.results[name]))
        print(f"  {name:<13} median {med[name]:7.3f} s/step  {audio_s / med[name]:8.2f} "
              f"audio-h/h  {flops / 1e12:.3f} TFLOP/step  {flops / med[name] / 1e12:7.3f} TFLOP/s  "
              f"MFU {flops / med[name] / peak:6.1%}   (runs: {timings.runs(name, 3)})")
    if "transformers" in med:
        print(f"speed-up (transformers / mert_plugin): {med['transformers'] / med['mert_plugin']:.2f}x")


if __name__ == "__main__":
    main()
