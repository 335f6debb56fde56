#!/usr/bin/env python3
"""GPU parity and speed of a CUDA build of diracnet, next to PyTorch eager on the same card.

Run through scripts/gpu-check.sh, which finds the CUDA libraries first. Needs PyTorch with CUDA
(numpy optional). One run, a few minutes:

1. Writes random DiracNet weights (He-scaled, fixed seed) as folded safetensors and a random
   input batch as .npy; the same tensors go to PyTorch.
2. Parity: `diracnet classify --logits` on the GPU in f32 against the CPU build's f32 logits:
   max |error| must be <= 1e-3 x max |logit| (with TF32 off: NVIDIA_TF32_OVERRIDE=0; the
   default-math figure is reported too). f16 (and bf16) report their error and top-1 agreement.
   PyTorch's GPU f32 logits (TF32 off) are compared as well, to show the reference is right.
3. Speed: `diracnet bench` against a PyTorch eager loop (inference_mode, cudnn.benchmark) at
   batch 1, 8, 64, 256, f32 and f16, images/s and the ratio diracnet / PyTorch.

Exit status 1 when the f32 parity check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

BLOCKS = {18: [4, 4, 4, 4], 34: [6, 8, 12, 6]}
WIDTHS = [64, 128, 256, 512]
STEM = 64
CLASSES = 1000


# ----------------------------------------------------------------------------- tensors and files


def random_weights(depth: int, seed: int) -> dict[str, torch.Tensor]:
    """Folded DiracNet weights under diracnet's tensor names, He-scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)

    def conv(c_out: int, c_in: int, k: int) -> torch.Tensor:
        std = (2.0 / (c_in * k * k)) ** 0.5
        return torch.randn(c_out, c_in, k, k, generator=g) * std

    w: dict[str, torch.Tensor] = {
        "features.conv.weight": conv(STEM, 3, 7),
        "features.conv.bias": torch.randn(STEM, generator=g) * 0.01,
    }
    c_in = STEM
    for gi, (width, n) in enumerate(zip(WIDTHS, BLOCKS[depth])):
        for b in range(n):
            w[f"features.group{gi}.block{b}.conv.weight"] = conv(width, c_in, 3)
            w[f"features.group{gi}.block{b}.conv.bias"] = torch.randn(width, generator=g) * 0.01
            c_in = width
    w["fc.weight"] = torch.randn(CLASSES, c_in, generator=g) * (1.0 / c_in) ** 0.5
    w["fc.bias"] = torch.randn(CLASSES, generator=g) * 0.01
    return w


def raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu", torch.float32).contiguous()
    try:
        return t.numpy().tobytes()
    except (RuntimeError, ImportError):  # PyTorch without numpy
        return struct.pack(f"<{t.numel()}f", *t.flatten().tolist())


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    header: dict = {"__metadata__": {"format": "pt", "source": "scripts/gpu_check.py"}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        data = raw_bytes(t)
        header[name] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def write_npy(path: str, t: torch.Tensor) -> None:
    head = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % "".join(
        f"{d}, " for d in t.shape
    )
    head = head.encode("latin1")
    pad = -(10 + len(head) + 1) % 64
    head += b" " * pad + b"\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head)
        f.write(raw_bytes(t))


# ----------------------------------------------------------------------------- PyTorch reference


class DiracNet(torch.nn.Module):
    """The folded DiracNet exactly as diracnet runs it (src/model/layers.rs)."""

    def __init__(self, depth: int):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, STEM, 7, 2, 3)
        self.groups = torch.nn.ModuleList()
        c_in = STEM
        for width, n in zip(WIDTHS, BLOCKS[depth]):
            convs = torch.nn.ModuleList()
            for _ in range(n):
                convs.append(torch.nn.Conv2d(c_in, width, 3, 1, 1))
                c_in = width
            self.groups.append(convs)
        self.fc = torch.nn.Linear(c_in, CLASSES)

    def load(self, w: dict[str, torch.Tensor]) -> "DiracNet":
        with torch.no_grad():
            self.stem.weight.copy_(w["features.conv.weight"])
            self.stem.bias.copy_(w["features.conv.bias"])
            for gi, convs in enumerate(self.groups):
                for b, conv in enumerate(convs):
                    conv.weight.copy_(w[f"features.group{gi}.block{b}.conv.weight"])
                    conv.bias.copy_(w[f"features.group{gi}.block{b}.conv.bias"])
            self.fc.weight.copy_(w["fc.weight"])
            self.fc.bias.copy_(w["fc.bias"])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.stem(x), 3, 2, 1)
        last = len(self.groups) - 1
        for gi, convs in enumerate(self.groups):
            for conv in convs:
                x = conv(F.relu(x))
            if gi != last:
                x = F.max_pool2d(x, 2)
        return self.fc(F.relu(x).mean((2, 3)))


def torch_img_per_s(model, batch: int, dtype, seconds: float) -> float:
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        torch.cuda.synchronize()
        rates, deadline = [], time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(rates) < 3:
            t0 = time.perf_counter()
            n = 0
            while n < 3 or time.perf_counter() - t0 < 0.2:
                model(x)
                n += 1
                if n % 4 == 0:
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
            rates.append(n * batch / (time.perf_counter() - t0))
    return statistics.median(rates)


# ----------------------------------------------------------------------------- diracnet binary


class Binary:
    def __init__(self, path: str, cache: str):
        self.path = path
        self.cache = cache
        help_text = self.run(["classify", "--help"], check=True).stdout
        self.has_dtype = "--dtype" in help_text

    def run(self, args, check=False, env=None):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DIRACNET_")}
        full_env.update({"DIRACNET_CACHE": self.cache, "DIRACNET_LOG": "warn"})
        full_env.update(env or {})
        p = subprocess.run(
            [self.path, *args], capture_output=True, text=True, env=full_env, timeout=300
        )
        if check and p.returncode != 0:
            raise RuntimeError(f"{self.path} {' '.join(args)}: exit {p.returncode}\n{p.stderr}")
        return p

    def dtype_args(self, dtype: str) -> list[str]:
        if self.has_dtype:
            return ["--dtype", dtype]
        if dtype != "f32":
            raise RuntimeError("this diracnet build has no --dtype")
        return []

    def logits(self, weights, npy, device, dtype, env=None) -> torch.Tensor:
        p = self.run(
            ["classify", "--json", "--logits", "--top-k", "1", "--offline", "--model", weights,
             "--device", device, *self.dtype_args(dtype), npy],
            check=True, env=env,
        )
        rows = json.loads(p.stdout)
        return torch.tensor([r["logits"] for r in rows], dtype=torch.float64)

    def bench(self, weights, device, dtype, batch, seconds) -> dict:
        p = self.run(
            ["bench", "--model", weights, "--device", device, *self.dtype_args(dtype),
             "--batch", str(batch), "--seconds", str(seconds), "--warmup", "5", "--json"],
            check=True,
        )
        return json.loads(p.stdout.strip().splitlines()[-1])


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    return {
        "max_abs_err": err,
        "rel_err": err / scale if scale else float("inf"),
        "max_abs_logit": scale,
        "top1_agreement": (got.argmax(1) == ref.argmax(1)).double().mean().item(),
    }


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="CUDA build of diracnet")
    ap.add_argument("--out", default="gpu-check-out")
    ap.add_argument("--depths", default="18", help="comma list: 18,34")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--parity-batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=3.0, help="per benchmark point")
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu-check-")  # weights and inputs stay out of --out
    # One PTX JIT cache for the whole run (diracnet's kernels are PTX for one capability).
    os.environ.setdefault("CUDA_CACHE_PATH", os.path.join(work, "cuda-cache"))
    binary = Binary(args.bin, os.path.join(work, "cache"))
    assert torch.cuda.is_available(), "PyTorch sees no CUDA device"
    props = torch.cuda.get_device_properties(0)
    report: dict = {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "diracnet_has_dtype": binary.has_dtype,
        "tolerance": args.tolerance,
        "parity": {},
        "bench": [],
    }
    print(f"# {props.name} (sm {props.major}.{props.minor}), torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})", flush=True)
    ok = True
    t_start = time.time()
    strict = {"NVIDIA_TF32_OVERRIDE": "0"}
    dtypes = ["f32", "f16", "bf16"] if binary.has_dtype else ["f32"]

    for depth in [int(d) for d in args.depths.split(",")]:
        weights = random_weights(depth, args.seed + depth)
        wpath = os.path.join(work, f"dn{depth}.safetensors")
        write_safetensors(wpath, weights)
        x = torch.randn(args.parity_batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        npy = os.path.join(work, f"input{depth}.npy")
        write_npy(npy, x)

        # ---- parity
        t0 = time.time()
        cpu = binary.logits(wpath, npy, "cpu", "f32")
        model = DiracNet(depth).load(weights).cuda().eval()
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        with torch.inference_mode():
            ref_torch = model(x.cuda()).double().cpu()
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions
        rows = {"torch_cuda_f32_vs_diracnet_cpu": compare(ref_torch, cpu)}
        rows["cuda_f32_strict"] = compare(binary.logits(wpath, npy, "cuda", "f32", strict), cpu)
        rows["cuda_f32_default_math"] = compare(binary.logits(wpath, npy, "cuda", "f32"), cpu)
        for dt in dtypes[1:]:
            rows[f"cuda_{dt}"] = compare(binary.logits(wpath, npy, "cuda", dt), cpu)
        passed = rows["cuda_f32_strict"]["rel_err"] <= args.tolerance
        ok &= passed
        report["parity"][f"diracnet{depth}"] = {"rows": rows, "f32_passed": passed}
        print(f"\n## DiracNet-{depth} parity vs diracnet CPU f32 "
              f"({args.parity_batch} random inputs, {time.time() - t0:.0f} s)")
        print(f"{'run':34} {'max|err|':>10} {'/max|logit|':>12} {'top-1 agree':>12}")
        for name, r in rows.items():
            print(f"{name:34} {r['max_abs_err']:10.2e} {r['rel_err']:12.2e} "
                  f"{100 * r['top1_agreement']:11.1f}%")
        print(f"f32 on the GPU within {args.tolerance:g} x max|logit|: "
              f"{'PASS' if passed else 'FAIL'}", flush=True)

        # ---- speed
        print(f"\n## DiracNet-{depth} img/s (median), diracnet bench vs PyTorch eager")
        print(f"{'dtype':5} {'batch':>5} {'diracnet':>10} {'pytorch':>10} {'ratio':>7}")
        for dt in ["f32", "f16"] if binary.has_dtype else ["f32"]:
            tdt = torch.float32 if dt == "f32" else torch.float16
            tmodel = DiracNet(depth).load(weights).to("cuda", tdt).eval()
            torch.backends.cudnn.benchmark = True
            for batch in [int(b) for b in args.batches.split(",")]:
                ours = binary.bench(wpath, "cuda", dt, batch, args.seconds)
                theirs = torch_img_per_s(tmodel, batch, tdt, args.seconds)
                ratio = ours["img_per_s_median"] / theirs
                report["bench"].append({
                    "depth": depth, "dtype": dt, "batch": batch,
                    "diracnet_img_per_s": ours["img_per_s_median"],
                    "pytorch_img_per_s": theirs, "ratio": ratio, "diracnet": ours,
                })
                print(f"{dt:5} {batch:5d} {ours['img_per_s_median']:10.1f} {theirs:10.1f} "
                      f"{ratio:7.2f}", flush=True)
            del tmodel
            torch.cuda.empty_cache()

    report["seconds"] = time.time() - t_start
    report["passed"] = ok
    with open(os.path.join(args.out, "gpu-check.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"\n{'PASS' if ok else 'FAIL'} ({report['seconds']:.0f} s); "
          f"report: {os.path.join(args.out, 'gpu-check.json')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
