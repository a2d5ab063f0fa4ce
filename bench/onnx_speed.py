"""ONNX extraction path vs transformers.HubertModel: speed on a 30 s clip, and peak memory on long tracks.

Speed: the same random MERT weights (default MERT-v1-95M geometry) exported by
``mert-export-onnx`` and loaded into plain ``transformers.HubertModel`` (via
``save_pretrained``); one process, the same thread count for both (default 2).
The ONNX path is what ``OnnxPredictMERT`` and ``mert-extract --backend onnx``
run: 5 s windows with 1 s overlap, stitched, all hidden states. The reference
runs the whole clip in one pass with ``output_hidden_states=True``. Runs
alternate (onnx, hf, onnx, ...) so load on a shared machine hits both; read the
ratios (of medians, and of the fastest runs, which other processes disturbed
least). Also printed: MERTModel eager (whole clip) for context.

Memory: ``mert-extract`` on tracks of several lengths (default 1 and 10 minutes,
44.1 kHz stereo WAV, all hidden states written), each in a fresh subprocess;
peak RSS from ``wait4``. Flat across lengths = bounded memory.

    .venv/bin/python bench/onnx_speed.py [--graph mert95m.onnx] [--threads 2] [--repeats 3] \\
        [--memory-minutes 1,10] [--backends onnx,torch] [--skip-speed] [--skip-memory]
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from _common import alternate, load_average, machine_line, timed

SR = 24000


def music(seconds, rate=SR, channels=1, seed=0):
    """A chord progression with a little noise (float32 [N] or [N, C])."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    roots = np.array([220.0, 174.6, 261.6, 196.0])[(t // 2).astype(int) % 4]
    x = sum(0.15 * np.sin(2 * np.pi * roots * r * t) for r in (1.0, 1.26, 1.5)) + 0.01 * rng.standard_normal(t.size)
    x = x.astype(np.float32)
    return np.stack([x, 0.8 * x], axis=1) if channels == 2 else x


def speed(args, graph_path, hf_dir, model):
    from transformers import HubertModel

    from extractors.onnx_model import OnnxMERT
    from mert_plugin import extract_features

    torch.set_num_threads(args.threads)
    hf = HubertModel.from_pretrained(hf_dir).eval()
    onnx = OnnxMERT(graph_path, num_threads=args.threads)
    clip = music(args.seconds)
    wav = torch.from_numpy(clip)[None]

    def run_onnx():
        return onnx.encode(clip, batch_size=args.batch_size)

    def run_hf():
        with torch.inference_mode():
            return hf(wav, output_hidden_states=True).hidden_states

    def run_ours():
        with torch.inference_mode():
            return model(wav).hidden_states

    # Warm-up, and checks that each path computes what it should.
    got = run_onnx()
    windowed = extract_features(model, torch.from_numpy(clip)).numpy()
    hf_states, ours = run_hf(), run_ours()
    onnx_vs_torch = float(np.abs(got - windowed).max())
    hf_vs_ours = max(float((a - b).abs().max()) for a, b in zip(hf_states, ours))
    load = load_average()
    timings = alternate({"onnx": run_onnx, "hf": run_hf, "ours": run_ours}, args.repeats)
    med = {k: timings.median(k) for k in timings.wall}
    best = {k: timings.best(k) for k in timings.wall}
    med_cpu = {k: timings.median_cpu(k) for k in timings.wall}
    print(f"\n== speed: {args.seconds:g} s clip, {args.threads} threads, median of {args.repeats} "
          f"(after 1 warm-up) ==")
    print(f"  ONNX path (5 s windows, 1 s overlap, batch {args.batch_size}):  {med['onnx']:7.2f} s  "
          f"(runs {timings.runs('onnx')})")
    print(f"  transformers.HubertModel (one pass):          {med['hf']:7.2f} s  "
          f"(runs {timings.runs('hf')})")
    print(f"  mert_plugin.MERTModel eager (one pass):       {med['ours']:7.2f} s  "
          f"(runs {timings.runs('ours')})")
    print(f"  ratio HubertModel / ONNX path = {med['hf'] / med['onnx']:.2f}x of medians, "
          f"{best['hf'] / best['onnx']:.2f}x of fastest runs   "
          f"(MERTModel / ONNX = {med['ours'] / med['onnx']:.2f}x, {best['ours'] / best['onnx']:.2f}x)")
    print(f"  process CPU s (median): ONNX {med_cpu['onnx']:.2f}, HubertModel {med_cpu['hf']:.2f}, "
          f"MERTModel {med_cpu['ours']:.2f}; ratio HubertModel / ONNX = {med_cpu['hf'] / med_cpu['onnx']:.2f}x")
    print(f"  load average before / after: {load} / {load_average()}")
    print(f"  checks: ONNX vs windowed MERTModel max|diff| = {onnx_vs_torch:.2e}; "
          f"HubertModel vs MERTModel max|diff| = {hf_vs_ours:.2e}")


# A child's ru_maxrss includes the memory of the process it was forked from (it
# survives exec), so the command is started from a small fresh interpreter.
_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.buffer.write(err)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def peak_rss(cmd):
    """Run ``cmd``; return (exit code, wall seconds, peak RSS in MiB) of that command alone."""
    wall, _, done = timed(lambda: subprocess.run([sys.executable, "-c", _LAUNCHER] + cmd, capture_output=True,
                                                 text=True))
    rc, maxrss_kib = (int(v) for v in done.stdout.split())
    if rc != 0:
        print(done.stderr, file=sys.stderr)
    return rc, wall, maxrss_kib / 1024.0


def memory(args, graph_path, hf_dir, work):
    import soundfile as sf

    print(f"\n== peak RSS of mert-extract (fresh subprocess each; 44.1 kHz stereo WAV; all hidden states "
          f"written; {args.threads} threads) ==")
    for minutes in args.memory_minutes:
        track = os.path.join(work, f"track_{minutes:g}min.wav")
        if not os.path.exists(track):
            sf.write(track, music(minutes * 60, rate=44100, channels=2), 44100, subtype="PCM_16")
        for backend in args.backends:
            out = os.path.join(work, f"out_{backend}_{minutes:g}")
            model = graph_path if backend == "onnx" else hf_dir
            cmd = [sys.executable, "-m", "extractors.cli", track, "--model", model, "--output-dir", out,
                   "--threads", str(args.threads), "--no-progress", "--overwrite", "--batch-size", str(args.batch_size)]
            rc, wall, rss = peak_rss(cmd)
            shape = np.load(os.path.join(out, os.path.basename(track)[:-4] + ".npy"), mmap_mode="r").shape \
                if rc == 0 else None
            print(f"  {backend:5s} {minutes:5g} min: peak RSS {rss:7.0f} MiB, {wall:6.1f} s wall "
                  f"(real-time factor {wall / (minutes * 60):.3f}), output {shape}, exit {rc}")
            if rc == 0:
                os.unlink(os.path.join(out, os.path.basename(track)[:-4] + ".npy"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mert-v1-95m")
    ap.add_argument("--graph", help="reuse an exported graph made from --preset with seed 0")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--memory-minutes", default="1,10")
    ap.add_argument("--backends", default="onnx,torch")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--workdir", help="keep tracks, exports and outputs here (default: a temp folder)")
    args = ap.parse_args()
    args.memory_minutes = [float(m) for m in args.memory_minutes.split(",") if m]
    args.backends = [b for b in args.backends.split(",") if b]
    torch.set_num_threads(args.threads)

    import onnxruntime
    import transformers

    from extractors.export_onnx import export_onnx
    from mert_plugin import MERTModel

    print(machine_line(onnxruntime=onnxruntime.__version__, transformers=transformers.__version__))
    work = args.workdir or tempfile.mkdtemp(prefix="mert-onnx-bench-")
    os.makedirs(work, exist_ok=True)
    model = MERTModel.from_preset(args.preset, seed=0).eval()
    hf_dir = os.path.join(work, "hf")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        model.save_pretrained(hf_dir)
    graph = args.graph or os.path.join(work, f"{args.preset}.onnx")
    if not os.path.exists(graph):
        seconds, _, meta = timed(lambda: export_onnx(model, graph,
                                                     source=f"preset {args.preset} (random weights, seed 0)"))
        diff = max(meta["export"]["parity_max_abs_diff"].values())
        print(f"export: {seconds:.1f} s, {os.path.getsize(graph) / 2**20:.0f} MiB, parity max|diff| {diff:.2e}")
    if not args.skip_speed:
        speed(args, graph, hf_dir, model)
    if not args.skip_memory:
        del model
        memory(args, graph, hf_dir, work)


if __name__ == "__main__":
    main()
