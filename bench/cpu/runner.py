"""One measurement of ONNX Runtime, PyTorch or OpenVINO, in this (fresh) process.

    python runner.py ort           --model dn18.onnx        --batch 8 --threads 2 --seconds 6
    python runner.py torch         --model dn18.safetensors --batch 8 --threads 2 --seconds 6
    python runner.py torch-bf16    --model dn18.safetensors --batch 8 --threads 2 --seconds 6
    python runner.py openvino      --model dn18.onnx        --batch 8 --threads 2 --seconds 6
    python runner.py openvino-bf16 --model dn18.onnx        --batch 8 --threads 2 --seconds 6

`torch` runs channels_last in f32, `torch-bf16` the same with model and input in bf16 (oneDNN's
bf16 kernels: AMX or AVX512-BF16 where the CPU has them). `openvino` reads the ONNX file with
its shapes fixed to the batch, on the CPU plugin with the latency hint and
INFERENCE_PRECISION_HINT f32; `openvino-bf16` with bf16 (OpenVINO's default on AMX CPUs).

Prints one JSON line with the fields of `diracnet bench --json` (model, batch, threads,
img_per_s_median/min/max, iterations, peak_rss_mib) plus system, version, warmup, seconds
and iter_s (every timed iteration, seconds).

Timing: `warmup` untimed passes, then timed passes until at least `seconds` seconds and
at least `min_iters` passes. Peak RSS is VmHWM of this process (interpreter included).
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def vm_hwm_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def make_ort(model, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x):
        return sess.run(None, {name: x})[0]

    return run, f"onnxruntime {ort.__version__}"


def torch_module(depth, weights):
    """nn.Module of the folded DiracNet with the given NumPy weights (f32, eval mode)."""
    import torch
    from torch import nn

    import dnet

    layers = [nn.Conv2d(3, dnet.STEM, 7, 2, 3), nn.MaxPool2d(3, 2, 1)]
    names = ["features.conv"]
    c_in = dnet.STEM
    for g, n in enumerate(dnet.BLOCKS[depth]):
        for b in range(n):
            layers += [nn.ReLU(), nn.Conv2d(c_in, dnet.WIDTHS[g], 3, 1, 1)]
            names.append(f"features.group{g}.block{b}.conv")
            c_in = dnet.WIDTHS[g]
        if g < 3:
            layers.append(nn.MaxPool2d(2, 2))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, dnet.CLASSES)]
    net = nn.Sequential(*layers).eval()
    convs = [m for m in net if isinstance(m, nn.Conv2d)] + [net[-1]]
    with torch.no_grad():
        for m, p in zip(convs, names + ["fc"]):
            m.weight.copy_(torch.from_numpy(weights[p + ".weight"]))
            m.bias.copy_(torch.from_numpy(weights[p + ".bias"]))
    return net


def depth_of(weights):
    import dnet

    n = sum(1 for k in weights if k.startswith("features.group") and k.endswith(".weight"))
    for d, blocks in dnet.BLOCKS.items():
        if sum(blocks) == n:
            return d
    raise ValueError(f"{n} 3x3 convs: neither DiracNet-18 nor -34")


def make_torch(model, threads, channels_last=True, bf16=False):
    import torch

    import dnet

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    weights = dnet.read_safetensors(model)
    net = torch_module(depth_of(weights), weights)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dtype = torch.bfloat16 if bf16 else torch.float32
    net = net.to(dtype=dtype, memory_format=fmt)

    def run(x):
        with torch.inference_mode():
            t = torch.from_numpy(x).to(dtype).contiguous(memory_format=fmt)
            return net(t).float().numpy()

    return run, (f"torch {torch.__version__}" + (" channels_last" if channels_last else "")
                 + (" bf16" if bf16 else ""))


def make_openvino(model, threads, precision):
    """OpenVINO's CPU plugin on the ONNX file, compiled for each input shape on first use
    (static shapes, as a deployment would; ONNX Runtime takes the dynamic batch as it is)."""
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": precision}
    compiled = {}

    def compile_for(shape):
        m = core.read_model(model)
        m.reshape({m.inputs[0].any_name: list(shape)})
        c = core.compile_model(m, "CPU", config)
        got = str(c.get_property("INFERENCE_PRECISION_HINT"))  # e.g. "<type: 'bfloat16'>"
        if {"f32": "float32", "bf16": "bfloat16"}[precision] not in got:
            sys.exit(f"OpenVINO runs {got}, not {precision}, on this CPU")
        return c.create_infer_request(), c.output(0)

    def run(x):
        if x.shape not in compiled:
            compiled[x.shape] = compile_for(x.shape)
        req, out = compiled[x.shape]
        return req.infer({0: x})[out]

    return run, f"openvino {ov.__version__} {precision}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=["ort", "torch", "torch-nchw", "torch-bf16", "openvino",
                                       "openvino-bf16"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-iters", type=int, default=5)
    ap.add_argument("--check", nargs=2, metavar=("INPUT_NPY", "LOGITS_NPY"),
                    help="instead of timing: run INPUT_NPY once, print max |d logit| against LOGITS_NPY")
    ap.add_argument("--tolerance", type=float, default=1e-3,
                    help="--check's bound on max |d logit|, relative to the largest |logit| (default 1e-3)")
    a = ap.parse_args()

    if a.system == "ort":
        run, version = make_ort(a.model, a.threads)
    elif a.system.startswith("openvino"):
        run, version = make_openvino(a.model, a.threads, "bf16" if a.system.endswith("bf16") else "f32")
    else:
        run, version = make_torch(a.model, a.threads, channels_last=(a.system != "torch-nchw"),
                                  bf16=a.system.endswith("bf16"))

    if a.check:
        x, ref = np.load(a.check[0]), np.load(a.check[1])
        got = run(x)
        err = float(np.abs(got - ref).max())
        ok = (err <= a.tolerance * max(float(np.abs(ref).max()), 1.0)
              and bool((got.argmax(1) == ref.argmax(1)).all()))
        print(json.dumps({"system": a.system, "model": os.path.basename(a.model), "version": version,
                          "max_abs_diff": err, "ok": ok}), flush=True)
        sys.exit(0 if ok else 1)

    x = np.random.default_rng(0).standard_normal((a.batch, 3, 224, 224), dtype=np.float32)
    for _ in range(a.warmup):
        run(x)
    times = []
    start = time.perf_counter()
    while len(times) < a.min_iters or time.perf_counter() - start < a.seconds:
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    ips = [a.batch / t for t in times]
    print(json.dumps({
        "model": os.path.basename(a.model),
        "batch": a.batch,
        "threads": a.threads,
        "img_per_s_median": statistics.median(ips),
        "img_per_s_min": min(ips),
        "img_per_s_max": max(ips),
        "iterations": len(times),
        "peak_rss_mib": round(vm_hwm_mib(), 1),
        "system": a.system,
        "version": version,
        "warmup": a.warmup,
        "seconds": a.seconds,
        "iter_s": [round(t, 6) for t in times],
    }), flush=True)


if __name__ == "__main__":
    main()
