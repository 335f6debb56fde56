"""How exact is Winograd F(4x4, 3x3) in bf16 for each choice of interpolation points?

The fast path's Winograd conv (src/model/cpu/winograd.rs) uses Lavin & Gray's points
(0, +-1, +-2, inf). With `--dtype bf16` its transformed inputs V and weights U are rounded to bf16
before the channel mixes, and that rounding, amplified by the output transform, is where its
error comes from. This script builds the F(4, 3) matrices for any five finite points (plus
infinity) by Toom-Cook, checks them against a plain correlation, and measures one layer's error
(ReLU'd normal input, He-scaled weights, 128 -> 64 channels, 64 tiles) in bf16 and f32 against
float64, next to a direct conv with bf16 inputs and weights.

    bench/cpu/.venv/bin/python bench/winograd_points.py      # any Python with numpy

Needs numpy only; a few seconds. Figures in bench/README.md.
"""

import numpy as np

M, R = 4, 3  # outputs per tile side, kernel side
ALPHA = M + R - 1


def matrices(points):
    """A^T (M x ALPHA), G (ALPHA x R), B^T (ALPHA x ALPHA) for `points` and infinity."""
    at = np.zeros((M, ALPHA))
    g = np.zeros((ALPHA, R))
    for j, p in enumerate(points):
        at[:, j] = [p**i for i in range(M)]
        f = np.prod([p - q for q in points if q != p])
        g[j] = [p**k / f for k in range(R)]
    at[M - 1, ALPHA - 1] = 1.0
    g[ALPHA - 1, R - 1] = 1.0
    # B^T from the identity sum_j A^T[i, j] G[j, k] B^T[j, l] = [l == i + k].
    rows, rhs = [], []
    for i in range(M):
        for k in range(R):
            for l in range(ALPHA):
                row = np.zeros(ALPHA * ALPHA)
                for j in range(ALPHA):
                    row[j * ALPHA + l] = at[i, j] * g[j, k]
                rows.append(row)
                rhs.append(1.0 if l == i + k else 0.0)
    bt = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0].reshape(ALPHA, ALPHA)
    rng = np.random.default_rng(1)
    d, w = rng.standard_normal(ALPHA), rng.standard_normal(R)
    want = [sum(w[k] * d[i + k] for k in range(R)) for i in range(M)]
    assert np.allclose(at @ ((g @ w) * (bt @ d)), want, atol=1e-9), points
    return at, g, bt


def bf16(x):
    """Rounds to bf16 (nearest, ties to even), as float32."""
    b = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32)


def layer(seed, c_in=128, c_out=64, tiles=64):
    rng = np.random.default_rng(seed)
    d = np.maximum(rng.standard_normal((tiles, c_in, ALPHA, ALPHA)), 0).astype(np.float32)
    w = (rng.standard_normal((c_out, c_in, R, R)) * np.sqrt(2 / (R * R * c_in))).astype(np.float32)
    return d, w


def correlate(d, w):
    y = 0.0
    for ky in range(R):
        for kx in range(R):
            patch = d[:, :, ky:ky + M, kx:kx + M].astype(np.float64)
            y = y + np.einsum("tchw,oc->tohw", patch, w[:, :, ky, kx].astype(np.float64))
    return y


def errors(y, want):
    err = np.abs(y - want)
    return err.max() / np.abs(want).max(), np.sqrt((err**2).mean() / (want**2).mean())


def winograd(points, d, w, round_to_bf16):
    at, g, bt = matrices(points)
    v = np.einsum("ij,tcjk,lk->tcil", bt, d.astype(np.float64), bt).astype(np.float32)
    u = np.einsum("ij,ocjk,lk->ocil", g, w.astype(np.float64), g).astype(np.float32)
    if round_to_bf16:
        v, u = bf16(v), bf16(u)
    m = np.einsum("tcij,ocij->toij", v.astype(np.float64), u.astype(np.float64)).astype(np.float32)
    return np.einsum("ij,tojk,lk->toil", at, m.astype(np.float64), at)


def main():
    seeds = range(3)
    layers = [layer(s) for s in seeds]
    wants = [correlate(d, w) for d, w in layers]
    print("max |err| / max |y|, and rms(err) / rms(y), mean over 3 random layers:")
    direct = np.mean([errors(correlate(bf16(d), bf16(w)), y) for (d, w), y in zip(layers, wants)], axis=0)
    print(f"{'direct conv':>24}  bf16 {direct[0]:.4f} rms {direct[1]:.4f}")
    for name, points in [
        ("0, ±1, ±2 (Lavin)", [0, 1, -1, 2, -2]),
        ("0, ±1, 1/2, -2", [0, 1, -1, 0.5, -2]),
        ("0, ±1, 2, -1/2", [0, 1, -1, 2, -0.5]),
        ("0, ±1, ±1/2", [0, 1, -1, 0.5, -0.5]),
        ("0, ±1, 2, 1/2", [0, 1, -1, 2, 0.5]),
    ]:
        b = np.mean([errors(winograd(points, d, w, True), y) for (d, w), y in zip(layers, wants)], axis=0)
        f = np.mean([errors(winograd(points, d, w, False), y)[0] for (d, w), y in zip(layers, wants)])
        print(f"{name:>24}  bf16 {b[0]:.4f} rms {b[1]:.4f}   f32 {f:.1e}")
    np.set_printoptions(precision=4, suppress=True, linewidth=120)
    print("B^T for 0, ±1, 1/2, -2 (each row of the input transform):")
    print(matrices([0, 1, -1, 0.5, -2])[2])


if __name__ == "__main__":
    main()
