"""Teacher labelling speed: EnCodec codes + CQT, in seconds of audio per wall second.

Measures, in one process on the same clip and thread count:

* EnCodec 24 kHz codes at 6 kbps (encoder + 8-stage RVQ). A random-init
  encoder with fitted codebooks costs exactly what the official one does (same
  graph, same shapes), so no download is needed;
* the reference CQT target two ways, alternating so that load on a shared
  machine hits both alike: nnAudio's ``CQT1992v2`` forward (the reference) and
  ``mert_plugin.teachers.CQTTeacher`` (same kernels, zero taps skipped), with
  their max relative difference;
* the whole ``LabelGenerator`` (codes + CQT, as ``mert-labels`` runs it).

Wall time is the figure that matters on an idle machine. On a shared one it
mostly measures the neighbours, so the process CPU time is printed too:
"audio s per CPU s" times the thread count estimates the idle wall-clock rate
(exact only if the threads scale perfectly; an upper bound otherwise).

    .venv/bin/python bench/teacher_speed.py [--seconds 10] [--threads 2] [--repeats 5] [--device cpu|cuda]
"""
import argparse
import logging

import torch
from _common import alternate, load_average, machine_line


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = load_average()
    logging.basicConfig(level=logging.ERROR)  # the fitted teacher's warnings are expected here

    from mert_plugin.teachers import LabelGenerator

    gen = LabelGenerator.from_spec("fitted", use_cqt=True)
    gen.fit([torch.randn(1, 5 * 24000) * 0.1], iters=2)  # codebook values do not change the cost
    gen.to(args.device)
    reference_cqt = gen.cqt.reference_module().to(args.device)
    wav = torch.randn(args.batch, int(args.seconds * 24000), device=args.device) * 0.1
    audio_seconds = args.batch * args.seconds

    runs = {
        "encodec codes": lambda: gen.acoustic(wav),
        "cqt nnAudio (reference)": lambda: reference_cqt(wav),
        "cqt mert_plugin": lambda: gen.cqt(wav),
        "labels: codes + cqt": lambda: gen(wav),
    }
    with torch.inference_mode():
        ours, ref = gen.cqt(wav), reference_cqt(wav).transpose(1, 2)  # warm-up and parity
        rel = float((ours - ref).abs().max() / ref.abs().max())
        for fn in runs.values():
            fn()
        timings = alternate(runs, args.repeats, args.device)

    print("# " + machine_line(threads=args.threads, device=args.device))
    print(f"# clip {args.batch} x {args.seconds:g} s, median of {args.repeats}; "
          f"CQT max rel diff vs nnAudio {rel:.1e}")
    print(f"# load average before the run: {load}")
    print(f"{'step':<26}{'median s':>10}{'x real time':>13}{'CPU s':>9}{'audio s / CPU s':>17}")
    for name in runs:
        med, cmed = timings.median(name), timings.median_cpu(name)
        print(f"{name:<26}{med:>10.3f}{audio_seconds / med:>13.1f}{cmed:>9.3f}{audio_seconds / cmed:>17.1f}")
    speedup = timings.median("cqt nnAudio (reference)") / timings.median("cqt mert_plugin")
    print(f"CQT speed-up over nnAudio's forward: {speedup:.2f}x")


if __name__ == "__main__":
    main()
