"""Fast extraction modes on a trained model: probe scores and frame cosines against fp32 (issue #13).

The accuracy contract of ``mert-extract``'s fast modes has two parts: every hidden state's frames stay close to
fp32 (cosine), and the features score as well in the demo's probes, "within the seed spread". The cosine part is
measured by ``bench/extract_speed.py`` and the export gates; this script measures both on a *trained* model, the
one a ``python -m mert_plugin.demo`` run pretrained, over its whole corpus.

For each mode, the corpus clips of the chosen tasks go through the real command-line tools, as a user would run
them (subprocesses, ``--threads`` each):

* ``torch fp32`` (the reference): ``mert-extract --model DEMO/pretrain/export``;
* ``torch bf16``: the same with ``--precision bf16`` (autocast);
* ``onnx fp32``, ``onnx fp16``, ``onnx int8``: ``mert-export-onnx --length dynamic [--quantize fp16|int8]`` of the
  same model (the exporter's default attention, ``fused`` for dynamic graphs since 2026-11-30), then
  ``mert-extract --model GRAPH.onnx``. Dynamic graphs, so that every mode uses the same 30 s
  windows (each clip of the demo corpus is one pass); the demo's own ``DEMO/onnx/*.onnx`` are fixed 5 s graphs,
  whose windows would differ from torch's on clips longer than 5 s and mix context into the comparison.

``mert-extract`` writes every frame (``--pooling none --layers all``); the probe mean-pools them over time (what
``--pooling mean`` writes) and runs exactly as the demo's ``probe()`` does (:func:`mert_plugin.probe.run_probe`,
MLP probes, weighted sum of layers, seeds 0 1 2; no baselines).

Criteria for each fast mode (all must pass, else its verdict is NO):

1. **cosine**: on every clip, every hidden state's mean frame cosine to torch fp32 >= ``CONTRACT_COSINE`` (0.99,
   the contract of ``bench/extract_speed.py`` and the int8 export gate);
2. **frame**: every single frame of every clip >= ``CONTRACT_FRAME`` (0.98, as in ``bench/extract_speed.py``: a
   layer mean can hide a few lost frames);
3. **export gate** (ONNX modes): the gate the graph's JSON records passed (``extractors.export_onnx.recorded_gate``);
4. **probe, per task**: ``|score - score_fp32| <= std_fp32 + std_mode`` (scores: test split, weighted-sum
   probe, mean and std over seeds; the sum of the two seed spreads is the demo's own rule for calling two feature
   sets different, ``mert_plugin.demo.verdict_checks``).

Outputs go to ``--workdir`` (default ``DEMO/fast_mode_probes``): graphs, features (about 0.7 GB per mode for the
demo's mert-tiny on its 40-piece corpus), probe reports, and ``runs/<modes>_<tasks>/summary.json``. Everything
resumes: exported graphs and extracted features are reused on a rerun, so a second run with other ``--tasks``
or ``--modes`` only probes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fast_mode_probes.py --demo-dir demo_output
        [--workdir W] [--model WEIGHTS] [--modes bf16,onnx,fp16,int8] [--tasks pitch instrument] [--seeds 0 1 2]
        [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONTRACT_COSINE = 0.99
CONTRACT_FRAME = 0.98  # the lowest single frame's cosine (bench/extract_speed.py's CONTRACT_FRAME)
REFERENCE = "torch fp32"
# short name -> (mode, backend, torch --precision or onnx --quantize)
MODES = {"fp32": (REFERENCE, "torch", None), "bf16": ("torch bf16", "torch", "bf16"),
         "onnx": ("onnx fp32", "onnx", None), "fp16": ("onnx fp16", "onnx", "fp16"),
         "int8": ("onnx int8", "onnx", "int8")}


# ------------------------------------------------------------------------------------------- criteria
# The probe criterion: the difference of the means is within the summed seed spread. One definition of
# the spread for this equivalence check and for the demo's better/worse rule (mert_plugin/probe/compare.py).
from mert_plugin.probe.compare import within_spread  # noqa: E402


def cosine_summary(per_clip: Mapping[str, np.ndarray], frames: Mapping[str, np.ndarray]) -> dict:
    """Aggregate frame cosines. ``per_clip``: clip -> [L] mean frame cosine per hidden state; ``frames``:
    clip -> [L] lowest frame cosine per hidden state. Returns the per-layer mean over clips, the worst clip's
    lowest layer mean (the criterion), that clip, and the lowest single frame."""
    clips = list(per_clip)
    means = np.stack([per_clip[c] for c in clips])            # [clips, L]
    worst = np.unravel_index(int(np.argmin(means)), means.shape)
    return {"clips": len(clips), "layer_mean": [float(v) for v in means.mean(0)],
            "worst_clip_layer_mean": float(means[worst]), "worst_clip": clips[worst[0]], "worst_layer": int(worst[1]),
            "min_frame": float(min(float(frames[c].min()) for c in clips))}


def mode_verdicts(probe: Mapping[str, Mapping], cosines: Mapping[str, dict], modes: Sequence[str],
                  contract: float = CONTRACT_COSINE, gates: Optional[Mapping[str, tuple]] = None,
                  frame_contract: float = CONTRACT_FRAME) -> Dict[str, List[tuple]]:
    """Every criterion of every fast mode: ``{mode: [(name, passed, detail), ...]}``. ``probe`` is
    ``run_probe``'s ``report["probe"]``; a mode or task absent from it fails (nothing measured, nothing met).
    ``gates``: ``{mode: recorded_gate(graph JSON)}`` of the ONNX modes; a mode not in it (torch) has no gate
    criterion."""
    out = {}
    for mode in modes:
        checks = []
        cos = cosines.get(mode)
        if cos is None:
            checks.append((f"cosine >= {contract}", False, "not measured"))
            checks.append((f"frame >= {frame_contract}", False, "not measured"))
        else:
            checks.append((f"cosine >= {contract}", cos["worst_clip_layer_mean"] >= contract,
                           f"worst clip's layer mean {cos['worst_clip_layer_mean']:.6f}"))
            checks.append((f"frame >= {frame_contract}", cos["min_frame"] >= frame_contract,
                           f"lowest frame {cos['min_frame']:.6f}"))
        if gates is not None and mode in gates:
            checks.append(("export gate", bool(gates[mode][0]), gates[mode][1]))
        for task, e in probe.items():
            if mode not in e or REFERENCE not in e:
                checks.append((f"{task} within seed spread", False, "not probed"))
                continue
            diff, spread = e[mode] - e[REFERENCE], e[f"{REFERENCE}_std"] + e[f"{mode}_std"]
            checks.append((f"{task} within seed spread", within_spread(e[REFERENCE], e[f"{REFERENCE}_std"], e[mode],
                                                                       e[f"{mode}_std"]),
                           f"{diff:+.3f} vs {spread:.3f}"))
        out[mode] = checks
    return out


# ------------------------------------------------------------------------------------------- steps
def demo_pieces(demo_dir: Path, model: Optional[str] = None) -> dict:
    """The demo's corpus folder and model folder (``model``, when given, replaces the demo's)."""
    need = {"corpus": demo_dir / "corpus" / "corpus.json"}
    if model is None:
        need["model"] = demo_dir / "pretrain" / "export" / "config.json"
    missing = [str(p.relative_to(demo_dir)) for p in need.values() if not p.is_file()]
    if not demo_dir.is_dir() or missing:
        raise SystemExit(f"error: {demo_dir} is not a finished `python -m mert_plugin.demo` output folder: "
                      f"missing {', '.join(missing) if demo_dir.is_dir() else 'the folder itself'} (the corpus with its "
                      f"task CSVs and the pretrained model the recipe exported). Run `python -m mert_plugin.demo "
                      f"--out {demo_dir}` first, or pass --demo-dir of one that finished.")
    if model is None:
        return {"corpus": need["corpus"].parent, "model": need["model"].parent}
    return {"corpus": need["corpus"].parent, "model": Path(model).resolve() if os.path.exists(model) else model}


def task_clips(corpus: Path, tasks: Optional[Sequence[str]]) -> tuple:
    """The corpus tasks (all, or ``tasks``) and the sorted union of their clip paths."""
    from mert_plugin.corpus.tables import read_task_csv
    from mert_plugin.probe.run import corpus_tasks

    specs = corpus_tasks(corpus, tasks)
    clips = sorted({p for spec in specs.values() for p in read_task_csv(spec["csv_path"]).paths})
    return list(specs), clips


def link_inputs(corpus: Path, clips: Sequence[str], folder: Path) -> None:
    """A folder of links mirroring the clips' corpus paths, so that mert-extract's outputs land where the probe
    looks for them (``FEATURES/<clip path without extension>.npy``) and only these clips are extracted."""
    if folder.exists():
        shutil.rmtree(folder)  # our own folder of links (rmtree removes links, never their targets)
    for rel in clips:
        link = folder / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(corpus / rel, link)


def run(cmd: List[str], what: str) -> tuple:
    tool = {"extractors.cli": "mert-extract", "extractors.export_onnx": "mert-export-onnx"}.get(cmd[2], cmd[2])
    print("    $ " + " ".join([tool] + cmd[3:]), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    tail = [l for l in done.stdout.splitlines() if l.strip()][-3:]
    for line in tail:
        print(f"      {line}", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {what} failed (exit {done.returncode}); output above")
    return seconds, done.stdout


def export_graph(model_dir, work: Path, quantize: Optional[str], threads: int) -> Path:
    path = work / "onnx" / f"trained-dynamic{'-' + quantize if quantize else ''}.onnx"
    if path.is_file() and path.with_suffix(".json").is_file():
        source = json.loads(path.with_suffix(".json").read_text())["export"]["source"]
        if source != str(model_dir):
            raise SystemExit(f"error: {path} was exported from {source}, not {model_dir}: use another --workdir")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "extractors.export_onnx", "--model", str(model_dir), "--output", str(path),
           "--length", "dynamic", "--threads", str(threads)] + (["--quantize", quantize] if quantize else [])
    seconds, _ = run(cmd, f"mert-export-onnx {quantize or 'fp32'}")
    print(f"    exported {path.name} in {seconds:.0f} s", flush=True)
    return path


def extract(mode: str, model: Path, inputs: Path, out: Path, precision: Optional[str], threads: int) -> Optional[float]:
    """Run mert-extract; its wall seconds, or None when every output was already there (a rerun)."""
    cmd = [sys.executable, "-m", "extractors.cli", str(inputs), "--model", str(model), "--output-dir", str(out),
           "--pooling", "none", "--layers", "all", "--device", "cpu", "--threads", str(threads), "--no-progress"]
    if precision:
        cmd += ["--precision", precision]
    seconds, log = run(cmd, f"mert-extract ({mode})")
    done = re.search(r"(\d+) written, (\d+) already done", log)
    return None if done and int(done.group(1)) == 0 else seconds


def frame_cosines_vs(ref_dir: Path, got_dir: Path, clips: Sequence[str]) -> dict:
    from extractors.export_onnx import frame_cosines
    from mert_plugin.probe.features import feature_file

    per_clip, lowest = {}, {}
    for rel in clips:
        ref, got = np.load(feature_file(ref_dir, rel)), np.load(feature_file(got_dir, rel))
        if ref.shape != got.shape:
            raise SystemExit(f"error: {rel}: {got_dir.name} has shape {got.shape}, fp32 {ref.shape}")
        cos = frame_cosines(got, ref)                              # [L, T]
        per_clip[rel], lowest[rel] = cos.mean(-1), cos.min(-1)
    return cosine_summary(per_clip, lowest)


# ------------------------------------------------------------------------------------------- report
def print_report(probe: Mapping, cosines: Mapping, fast: Sequence[str], seconds: Mapping, verdicts: Mapping,
                 gates: Optional[Mapping[str, tuple]] = None) -> None:
    names = [REFERENCE] + list(fast)
    print("\n== probe scores (test split, weighted-sum MLP probe, mean ± std over seeds) ==")
    print(f"{'task':<11} {'metric':<9} {'mode':<11} {'score':>15} {'diff vs fp32':>13} {'seed spread':>12}  within")
    for task, e in probe.items():
        for i, m in enumerate(names):
            if m not in e:
                continue
            head = f"{task:<11} {e['metric']:<9}" if i == 0 else " " * 21
            score = f"{e[m]:.3f} ± {e[f'{m}_std']:.3f}"
            if m == REFERENCE:
                print(f"{head} {m:<11} {score:>15} {'(reference)':>13}")
                continue
            diff, spread = e[m] - e[REFERENCE], e[f"{REFERENCE}_std"] + e[f"{m}_std"]
            ok = within_spread(e[REFERENCE], e[f"{REFERENCE}_std"], e[m], e[f"{m}_std"])
            print(f"{head} {m:<11} {score:>15} {diff:>+13.3f} {spread:>12.3f}  {'PASS' if ok else 'FAIL'}")
    print("\n== frame cosine to torch fp32, every frame of every clip ==")
    print(f"{'mode':<11} {'clips':>6} {'min layer mean':>15} {'worst clip layer mean':>22} {'min frame':>10} "
          f"{'extract s':>10}  cosine >= {CONTRACT_COSINE}  frame >= {CONTRACT_FRAME}  export gate")

    def secs(mode):  # wall s of mert-extract (decoding included); "reused": features of an earlier run
        return "reused" if seconds.get(mode) is None else f"{seconds[mode]:.0f}"

    print(f"{REFERENCE:<11} {'':>6} {'(reference)':>15} {'':>22} {'':>10} {secs(REFERENCE):>10}")
    for m in fast:
        c = cosines[m]
        gate = (gates or {}).get(m)
        print(f"{m:<11} {c['clips']:>6} {min(c['layer_mean']):>15.6f} {c['worst_clip_layer_mean']:>22.6f} "
              f"{c['min_frame']:>10.6f} {secs(m):>10}  "
              f"{'PASS' if c['worst_clip_layer_mean'] >= CONTRACT_COSINE else 'FAIL':<14}"
              f"{'PASS' if c['min_frame'] >= CONTRACT_FRAME else 'FAIL':<14}"
              f"{'-' if gate is None else ('PASS' if gate[0] else 'FAIL') + f' ({gate[1]})'}")
    print(f"\nCriteria (each mode against {REFERENCE}): on every clip every hidden state's mean frame cosine to fp32 >= "
          f"{CONTRACT_COSINE}; every frame's cosine >= {CONTRACT_FRAME}; ONNX graphs: the export gate their JSON "
          f"records passed; on every task |score - fp32| <= std_fp32 + std_mode (the demo's summed seed spread).")
    for m in fast:
        failed = [f"{n} ({d})" for n, ok, d in verdicts[m] if not ok]
        print(f"  {m:<11} meets the contract on this model: {'NO' if failed else 'YES'}"
              + (f"; failed: {'; '.join(failed)}" if failed else f" (all {len(verdicts[m])} criteria)"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", required=True, help="a `python -m mert_plugin.demo` output folder")
    ap.add_argument("--workdir", help="graphs, features and reports (default: DEMO/fast_mode_probes)")
    ap.add_argument("--model", help="other weights to measure on the demo's corpus (anything mert-extract reads as "
                                    "a PyTorch checkpoint; default: DEMO/pretrain/export, the demo's trained model)")
    ap.add_argument("--modes", default="bf16,onnx,fp16,int8",
                    help="fast modes next to the torch fp32 reference: bf16 (torch autocast), onnx (fp32 graph), "
                         "fp16, int8 (quantised graphs); default all")
    ap.add_argument("--tasks", nargs="+", help="probe only these corpus tasks (default: all); fewer clips to extract")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="probe seeds (default 0 1 2, the demo's)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads of every tool (default 1)")
    args = ap.parse_args(argv)

    demo = Path(args.demo_dir).resolve()
    pieces = demo_pieces(demo, args.model)
    keys = [k.strip() for k in args.modes.split(",") if k.strip()]
    bad = [k for k in keys if k not in MODES or k == "fp32"]
    if bad:
        ap.error(f"--modes: unknown {bad}; choose from bf16, onnx, fp16, int8")
    work = Path(args.workdir).resolve() if args.workdir else demo / "fast_mode_probes"
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    from mert_plugin.probe import run_probe

    tasks, clips = task_clips(pieces["corpus"], args.tasks)
    fast = [MODES[k][0] for k in keys]
    print(f"demo {demo}: model {pieces['model']}, {len(clips)} clips of tasks {', '.join(tasks)}; "
          f"modes {REFERENCE} (reference), {', '.join(fast)}; {args.threads} thread(s); work in {work}", flush=True)
    inputs = work / "inputs"
    link_inputs(pieces["corpus"], clips, inputs)

    from extractors.export_onnx import recorded_gate
    from extractors.onnx_model import metadata_path

    folders, seconds, gates, attention = {}, {}, {}, {}
    for key in ["fp32"] + keys:
        mode, backend, prec = MODES[key]
        print(f"\n-- {mode}", flush=True)
        model = pieces["model"] if backend == "torch" else export_graph(pieces["model"], work, prec, args.threads)
        if backend == "onnx":
            meta = metadata_path(model)
            meta = json.loads(Path(meta).read_text()) if os.path.isfile(meta) else None
            gates[mode] = recorded_gate(meta)
            attention[mode] = (meta or {}).get("export", {}).get("attention", "not recorded")
        folders[mode] = work / "features" / mode.replace(" ", "-")
        seconds[mode] = extract(mode, model, inputs, folders[mode], prec if backend == "torch" else None, args.threads)
    cosines = {}
    for mode in fast:
        cosines[mode] = frame_cosines_vs(folders[REFERENCE], folders[mode], clips)

    tag = f"{'-'.join(keys) or 'fp32'}_{'-'.join(tasks)}"
    out = work / "runs" / tag
    print(f"\n-- probing {len(tasks)} task(s) x {len(folders)} feature sets x {len(args.seeds)} seeds -> {out}",
          flush=True)
    t0 = time.perf_counter()
    report = run_probe(out, corpus_dir=pieces["corpus"], tasks=tasks, baselines=(), seeds=args.seeds,
                       feature_sets={m: str(f) for m, f in folders.items()}, progress=False)
    print(f"    ({time.perf_counter() - t0:.0f} s)")
    verdicts = mode_verdicts(report["probe"], cosines, fast, gates=gates)
    print_report(report["probe"], cosines, fast, seconds, verdicts, gates)
    summary = {"demo_dir": str(demo), "model": str(pieces["model"]), "tasks": tasks, "seeds": args.seeds,
               "threads": args.threads, "clips": len(clips), "extract_seconds": seconds, "cosine": cosines,
               "export_gate": {m: {"passed": bool(ok), "detail": d} for m, (ok, d) in gates.items()},
               "graph_attention": attention,
               "probe": {t: {m: [e[m], e[f"{m}_std"]] for m in folders} for t, e in report["probe"].items()},
               "criteria": {m: [{"name": n, "passed": bool(ok), "detail": d} for n, ok, d in v]
                            for m, v in verdicts.items()},
               "meets_contract": {m: all(ok for _, ok, _ in v) for m, v in verdicts.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nsummary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
