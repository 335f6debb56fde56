"""Write DiracNet-18/34 random weights as safetensors and the identical network as ONNX.

    python make_models.py --out DIR [--depth 18 34] [--seed 0] [--force]

Writes DIR/dn{D}.safetensors and DIR/dn{D}.onnx (and DIR/dn{D}.stamp, so an existing
pair is reused only when it was made the same way). Then, once per depth, checks that
the ONNX graph is the same network: ONNX Runtime against a float64 NumPy reference on
one batch of 2 (max |d logit| must stay below 1e-3 times the logits' range).
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dnet  # noqa: E402

STAMP_VERSION = 1


def ort_logits(path, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def check_input(n=2):
    return np.random.default_rng(12345).standard_normal((n, 3, 224, 224), dtype=np.float32)


def ensure_models(out, depths, seed=0, force=False):
    """Make (or reuse) the model files; returns {depth: paths}."""
    os.makedirs(out, exist_ok=True)
    paths = {}
    for depth in depths:
        st = os.path.join(out, f"dn{depth}.safetensors")
        ox = os.path.join(out, f"dn{depth}.onnx")
        stamp_path = os.path.join(out, f"dn{depth}.stamp")
        paths[depth] = {"safetensors": st, "onnx": ox,
                        "check_input": os.path.join(out, "check_input.npy"),
                        "check_logits": os.path.join(out, f"dn{depth}.check_logits.npy")}
        stamp = {"version": STAMP_VERSION, "depth": depth, "seed": seed}
        try:
            with open(stamp_path) as f:
                fresh = json.load(f) == stamp
        except (OSError, ValueError):
            fresh = False
        if fresh and not force and all(os.path.exists(p) for p in paths[depth].values()):
            print(f"dn{depth}: reusing {st} and {ox}", file=sys.stderr)
            continue

        import onnx

        w = dnet.random_weights(depth, seed)
        dnet.write_safetensors(w, st)
        onnx.save(dnet.onnx_model(depth, w), ox)

        x = check_input()
        ref = dnet.reference_logits(depth, w, x)
        got = ort_logits(ox, x)
        err = float(np.abs(got - ref).max())
        scale = float(np.abs(ref).max())
        ok = err <= 1e-3 * max(scale, 1.0) and (got.argmax(1) == ref.argmax(1)).all()
        print(f"dn{depth}: ONNX Runtime vs NumPy f64 reference, batch 2: max |d logit| = {err:.2e}"
              f" at |logit| <= {scale:.2f}, top-1 {'same' if ok else 'DIFFERENT'}", file=sys.stderr)
        if not ok:
            sys.exit(f"dn{depth}: the ONNX graph does not compute the reference network")
        np.save(paths[depth]["check_input"], x)
        np.save(paths[depth]["check_logits"], ref.astype(np.float32))
        with open(stamp_path, "w") as f:
            json.dump(stamp, f)
    return paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--depth", type=int, nargs="+", default=[18, 34], choices=[18, 34])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    ensure_models(a.out, a.depth, a.seed, a.force)


if __name__ == "__main__":
    main()
