"""Variants of the dynamic-length int8 graph that were tried for issue #13's CPU target, for
``bench/extract_speed.py --extra``.

Writes into WORKDIR, next to the graphs ``bench/extract_speed.py`` exports there (made here if missing:
``PRESET-dynamic.onnx``, fused attention, and ``PRESET-dynamic-std.onnx``, ``--attention standard``):

* ``int8-pc``, ``int8-rr``, ``int8-u8``: the fused graph quantised as ``--quantize int8`` does
  (``quantize_dynamic``, MatMuls), but with per-channel weight scales, ``reduce_range`` (7-bit weights), or
  uint8 weights;
* ``int8-convinteger``: also the conv stem's layers 1-6 (``Conv`` -> ``ConvInteger``; conv 0 sees the
  waveform and the positional conv is grouped, both stay fp32);
* ``int8-stem-matmul``: the conv stem written as MatMuls in time-major layout (an export with another
  ``ExportWrapper.forward``; same numbers in fp32, parity-gated), so that ``quantize_dynamic`` quantises
  its layers 1-6 like the linear layers (conv 0's 10-tap MatMul stays fp32);
* ``int8-std-allmm``: the standard-attention graph with the attention MatMuls (QK^T, PV) quantised too
  (``MatMulConstBOnly`` off);
* ``ortopt-std`` and ``int8-ortopt-std``: ``onnxruntime.transformers.optimizer.optimize_model``
  (``model_type="bert"``, heads and width of the model) on the standard-attention graph, fp32 and then
  quantised; its fusion counts are printed.

Every variant gets a ``.json`` (the source graph's, with ``precision`` and a ``variant`` line) holding the
export gate's figures (``accuracy_vs_fp32``: per hidden state, mean and lowest frame cosine to PyTorch fp32 on
the exporter's parity cases), which are also printed; a variant under the int8 gate (0.99) is reported, not
refused: this is a benchmark.

    .venv/bin/python bench/onnx_variants.py --workdir W [--preset mert-v1-95m] [--only int8-pc,int8-rr,...]
"""
import argparse
import json
import logging
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VARIANTS = ("int8-pc", "int8-rr", "int8-u8", "int8-convinteger", "int8-stem-matmul", "int8-std-allmm",
            "ortopt-std", "int8-ortopt-std")


def quantize(src, dst, weight_u8=False, ops=("MatMul",), exclude=(), **kw):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(src, dst, weight_type=QuantType.QUInt8 if weight_u8 else QuantType.QInt8,
                     op_types_to_quantize=list(ops), nodes_to_exclude=list(exclude), **kw)


def stem_nodes(path, cfg):
    """Names of conv 0 and the positional conv in a graph (Conv nodes), and of conv 0's MatMul (stem-matmul
    graph: the MatMul whose weight is [conv_kernel[0], conv_dim[0]])."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    keep = []
    for node in proto.graph.node:
        attrs = {a.name: a for a in node.attribute}
        weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type == "Conv" and (weight[1] == 1 or attrs["group"].i != 1):
            keep.append(node.name)
        if node.op_type == "MatMul" and weight == [cfg.conv_kernel[0], cfg.conv_dim[0]]:
            keep.append(node.name)
    return keep


def _conv_as_matmul(x, weight, k, s):
    """Conv1d without padding of time-major ``x`` [B, T, Cin] by ``weight`` [Cout, Cin, k], stride s, as
    MatMuls on reshaped frames (k == s: one; k == s + 1: two) -> [B, T', Cout]."""
    b, t, c = x.shape
    n = (t - k) // s + 1
    w = weight.permute(2, 1, 0)  # [k, Cin, Cout]
    y = x[:, :n * s].reshape(b, n, s * c) @ w[:s].reshape(s * c, -1)
    if k == s + 1:
        y = y + x[:, s:n * s + 1:s] @ w[s]
    elif k != s:
        raise NotImplementedError(f"conv kernel {k}, stride {s}")
    return y


def _stem_matmul_forward(self, audio, num_samples):
    """ExportWrapper.forward with the conv stem as MatMuls, time-major throughout (same numbers)."""
    from mert_plugin.model import conv_output_lengths

    cfg = self.model.config
    lengths = num_samples.to(torch.int64)
    layers = self.model.feature_extractor.conv_layers
    k0, s0 = cfg.conv_kernel[0], cfg.conv_stride[0]
    b, n = audio.shape
    t0 = (n - k0) // s0 + 1
    r = audio[:, :(t0 + 1) * s0].reshape(b, t0 + 1, s0)
    x = torch.cat([r[:, :-1], r[:, 1:]], -1) @ layers[0].conv.weight[:, 0, :].t()  # [B, T0, C] (k0 = 2 s0)
    valid = torch.div(lengths - k0, s0, rounding_mode="floor") + 1
    mask = (torch.arange(t0, device=x.device)[None, :] < valid[:, None]).to(x.dtype)[:, None, :]  # [B, 1, T0]
    count = mask.sum(-1, keepdim=True).clamp(min=1.0)
    norm = layers[0].layer_norm
    d = x - (mask @ x) / count
    x = F.gelu(d * (norm.weight * torch.rsqrt((mask @ (d * d)) / count + norm.eps)) + norm.bias)
    for i, layer in enumerate(layers[1:], 1):
        x = F.gelu(_conv_as_matmul(x, layer.conv.weight, cfg.conv_kernel[i], cfg.conv_stride[i]))
    hidden = self.model.feature_projection(x)
    frames = torch.arange(hidden.shape[1], device=hidden.device)
    states = self.model.encoder(hidden, frames[None, :] < conv_output_lengths(lengths, cfg)[:, None])
    return (states[-1], torch.stack(states, dim=1)) + tuple(states)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--preset", default="mert-v1-95m")
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from extractors import export_onnx as ex
    from mert_plugin import MERTModel

    model = MERTModel.from_preset(args.preset, seed=0).eval()
    cfg = model.config
    src = f"preset {args.preset} (random weights, seed 0)"
    window = int(round(5.0 * cfg.sample_rate))  # the exporter's default test length
    base = os.path.join(args.workdir, args.preset)

    def fp32_graph(name, **kw):
        path = f"{base}-{name}.onnx"
        if not os.path.exists(path):
            t = time.time()
            ex.export_onnx(model, path, source=src, length="dynamic", **kw)
            print(f"export {name}: {time.time() - t:.0f} s", flush=True)
        return path

    def finish(name, src_graph, precision, what):
        path = f"{base}-{name}.onnx"
        with open(ex.metadata_path(src_graph), encoding="utf-8") as f:
            meta = json.load(f)
        meta["export"]["precision"] = precision
        meta["export"]["variant"] = what
        if precision != "fp32":
            acc = ex.check_accuracy(model, path, window, num_threads=args.threads, dynamic=True)
            meta["export"]["accuracy_vs_fp32"] = acc
            print(f"{name}: gate min layer-mean cosine {min(acc['layer_mean_cosine']):.6f}, lowest frame "
                  f"{min(acc['layer_min_cosine']):.6f} ({what})", flush=True)
        else:
            print(f"{name}: written ({what})", flush=True)
        with open(ex.metadata_path(path), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)

    wanted = [v for v in args.only.split(",") if v]
    for name in wanted:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        out = f"{base}-{name}.onnx"
        if name in ("int8-pc", "int8-rr", "int8-u8", "int8-convinteger"):
            fused = fp32_graph("dynamic")
            if name == "int8-convinteger":
                quantize(fused, out, ops=("MatMul", "Conv"), exclude=stem_nodes(fused, cfg))
            else:
                quantize(fused, out, weight_u8=name == "int8-u8", per_channel=name == "int8-pc",
                         reduce_range=name == "int8-rr")
            finish(name, fused, "int8", {"int8-pc": "per-channel weight scales", "int8-rr": "reduce_range",
                                         "int8-u8": "uint8 weights",
                                         "int8-convinteger": "conv stem layers 1-6 as ConvInteger"}[name])
        elif name == "int8-stem-matmul":
            fp32 = f"{base}-stem-matmul.onnx"
            if not os.path.exists(fp32):
                original = ex.ExportWrapper.forward
                ex.ExportWrapper.forward = _stem_matmul_forward
                try:
                    t = time.time()
                    ex.export_onnx(model, fp32, source=src, length="dynamic")
                    print(f"export stem-matmul: {time.time() - t:.0f} s", flush=True)
                finally:
                    ex.ExportWrapper.forward = original
            quantize(fp32, out, exclude=stem_nodes(fp32, cfg))
            finish(name, fp32, "int8", "conv stem layers 1-6 as MatMuls (time-major), quantised with the rest")
        elif name == "int8-std-allmm":
            std = fp32_graph("dynamic-std", attention="standard")
            quantize(std, out, extra_options={"MatMulConstBOnly": False})
            finish(name, std, "int8", "standard attention, attention MatMuls quantised too")
        elif name in ("ortopt-std", "int8-ortopt-std"):
            std = fp32_graph("dynamic-std", attention="standard")
            opt = f"{base}-ortopt-std.onnx"
            if not os.path.exists(opt):
                from onnxruntime.transformers.optimizer import optimize_model

                logging.getLogger("onnxruntime").setLevel(logging.ERROR)
                optimized = optimize_model(std, model_type="bert", num_heads=cfg.num_attention_heads,
                                           hidden_size=cfg.hidden_size, opt_level=0, use_gpu=False)
                fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
                print(f"ortopt-std: onnxruntime.transformers.optimizer fused {fused}", flush=True)
                optimized.save_model_to_file(opt)
                finish("ortopt-std", std, "fp32", f"onnxruntime.transformers.optimizer (bert): {fused}")
            if name == "int8-ortopt-std":
                quantize(opt, out)
                finish(name, std, "int8", "onnxruntime.transformers.optimizer (bert), then int8")


if __name__ == "__main__":
    main()
