//! Winograd convolution for the 3×3, stride-1, pad-1 convs: F(4×4, 3×3).
//!
//! Each 4×4 block of output pixels ("tile") is computed from the 6×6 input patch around it. In
//! the Winograd domain the 3×3 conv becomes 36 independent channel mixes, one per point of the
//! 6×6 transform: `M[p] = V[p] · U[p]` with `V[p]` = (tiles × c_in) transformed input and
//! `U[p]` = (c_in × c_out) transformed weights. That is 36 multiplies per tile and channel pair
//! instead of 144 (4× fewer), paid for by cheap add-only transforms on either side.
//!
//! ```text
//! U = G g Gᵀ   (weights, once at load, in f64, packed for the GEMM)
//! V = Bᵀ d B   (each 6×6 input patch)
//! Y = Aᵀ M A   (each 6×6 product → 4×4 output, then + bias, ReLU)
//! ```
//!
//! The transforms work on 8 channels at a time ([`V8`]), so they vectorise; the channel mixes
//! run on the packed GEMM of [`super::gemm`]. Points are Lavin & Gray's (0, ±1, ±2, ∞); in f32
//! the result differs from a direct conv by a few 1e-7 relative per layer.

use std::ops::{Add, Mul, Neg, Sub};

/// Output pixels per tile side.
pub const M: usize = 4;
/// Input patch side (= transform size).
pub const ALPHA: usize = M + 2;
/// Points of the transform.
pub const POINTS: usize = ALPHA * ALPHA;

/// Eight f32 lanes: the transforms' unit of work (one AVX register; two SSE/NEON registers).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct V8(pub [f32; 8]);

impl V8 {
    /// Loads 8 values, or fewer with zeros after them.
    #[inline(always)]
    pub fn load(s: &[f32]) -> Self {
        match s.first_chunk::<8>() {
            Some(v) => Self(*v),
            None => {
                let mut v = [0f32; 8];
                v[..s.len()].copy_from_slice(s);
                Self(v)
            }
        }
    }

    /// Stores the first `d.len()` (≤ 8) lanes.
    #[inline(always)]
    pub fn store(self, d: &mut [f32]) {
        match d.first_chunk_mut::<8>() {
            Some(d) => *d = self.0,
            None => {
                let n = d.len();
                d.copy_from_slice(&self.0[..n]);
            }
        }
    }

    /// Lane-wise max with zero.
    #[inline(always)]
    pub fn relu(self) -> Self {
        let mut r = self.0;
        for x in &mut r {
            *x = x.max(0.0);
        }
        Self(r)
    }
}

macro_rules! lanewise {
    ($tr:ident, $f:ident, $op:tt) => {
        impl $tr for V8 {
            type Output = V8;
            #[inline(always)]
            fn $f(self, o: V8) -> V8 {
                let mut r = self.0;
                for (x, y) in r.iter_mut().zip(o.0) {
                    *x $op y;
                }
                V8(r)
            }
        }
    };
}
lanewise!(Add, add, +=);
lanewise!(Sub, sub, -=);

impl Mul<V8> for f32 {
    type Output = V8;
    #[inline(always)]
    fn mul(self, v: V8) -> V8 {
        let mut r = v.0;
        for x in &mut r {
            *x *= self;
        }
        V8(r)
    }
}

impl Neg for V8 {
    type Output = V8;
    #[inline(always)]
    fn neg(self) -> V8 {
        let mut r = self.0;
        for x in &mut r {
            *x = -*x;
        }
        V8(r)
    }
}

/// `Bᵀ d` along one axis of six values.
#[inline(always)]
fn input_1d(d: [V8; ALPHA]) -> [V8; ALPHA] {
    let [d0, d1, d2, d3, d4, d5] = d;
    let t42 = d4 - 4.0 * d2; // shared by rows 1 and 2
    let t31 = d3 - 4.0 * d1;
    let u42 = d4 - d2; // shared by rows 3 and 4
    let u31 = 2.0 * (d3 - d1);
    [
        4.0 * d0 - 5.0 * d2 + d4,
        t42 + t31,
        t42 - t31,
        u42 + u31,
        u42 - u31,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// `Aᵀ m` along one axis: six values in, four out.
#[inline(always)]
fn output_1d(m: [V8; ALPHA]) -> [V8; M] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let s12 = m1 + m2;
    let d12 = m1 - m2;
    let s34 = m3 + m4;
    let d34 = m3 - m4;
    [
        m0 + s12 + s34,
        d12 + 2.0 * d34,
        s12 + 4.0 * s34,
        d12 + 8.0 * d34 + m5,
    ]
}

/// `Bᵀ d B` of one 6×6 patch (row-major `d[y][x]`) into `v`, row-major by point.
#[inline(always)]
pub fn input_2d(d: &[[V8; ALPHA]; ALPHA], v: &mut [[V8; ALPHA]; ALPHA]) {
    let mut t = [[V8::default(); ALPHA]; ALPHA];
    for x in 0..ALPHA {
        let col = input_1d([d[0][x], d[1][x], d[2][x], d[3][x], d[4][x], d[5][x]]);
        for i in 0..ALPHA {
            t[i][x] = col[i];
        }
    }
    for i in 0..ALPHA {
        v[i] = input_1d(t[i]);
    }
}

/// `Aᵀ m A` of one 6×6 block of products (row-major by point) into `y[row][col]`.
#[inline(always)]
pub fn output_2d(m: &[[V8; ALPHA]; ALPHA], y: &mut [[V8; M]; M]) {
    let mut s = [[V8::default(); ALPHA]; M];
    for x in 0..ALPHA {
        let col = output_1d([m[0][x], m[1][x], m[2][x], m[3][x], m[4][x], m[5][x]]);
        for i in 0..M {
            s[i][x] = col[i];
        }
    }
    for i in 0..M {
        y[i] = output_1d(s[i]);
    }
}

/// `G g Gᵀ` of one 3×3 kernel (row-major), in f64: the 6×6 transformed weights, by point.
pub fn weight_2d(g: [[f64; 3]; 3]) -> [[f64; ALPHA]; ALPHA] {
    const G: [[f64; 3]; ALPHA] = [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    let mut t = [[0f64; 3]; ALPHA]; // G g
    for i in 0..ALPHA {
        for j in 0..3 {
            t[i][j] = (0..3).map(|k| G[i][k] * g[k][j]).sum();
        }
    }
    let mut u = [[0f64; ALPHA]; ALPHA]; // (G g) Gᵀ
    for i in 0..ALPHA {
        for j in 0..ALPHA {
            u[i][j] = (0..3).map(|k| t[i][k] * G[j][k]).sum();
        }
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One channel: the transforms reproduce a direct 3×3 correlation on a 6×6 patch.
    #[test]
    fn transforms_compute_a_valid_3x3_correlation() {
        let d: [[f32; ALPHA]; ALPHA] =
            std::array::from_fn(|y| std::array::from_fn(|x| ((y * 7 + x * 3) % 11) as f32 - 5.0));
        let g: [[f64; 3]; 3] =
            std::array::from_fn(|y| std::array::from_fn(|x| ((y * 5 + x) % 7) as f64 / 3.0 - 1.0));
        let mut v = [[V8::default(); ALPHA]; ALPHA];
        input_2d(&d.map(|row| row.map(|x| V8([x; 8]))), &mut v);
        let u = weight_2d(g);
        let m: [[V8; ALPHA]; ALPHA] =
            std::array::from_fn(|i| std::array::from_fn(|j| (u[i][j] as f32) * v[i][j]));
        let mut y = [[V8::default(); M]; M];
        output_2d(&m, &mut y);
        for oy in 0..M {
            for ox in 0..M {
                let want: f64 = (0..3)
                    .flat_map(|ky| (0..3).map(move |kx| (ky, kx)))
                    .map(|(ky, kx)| g[ky][kx] * d[oy + ky][ox + kx] as f64)
                    .sum();
                let got = y[oy][ox].0[3];
                assert!(
                    (got as f64 - want).abs() < 1e-4,
                    "({oy},{ox}): {got} vs {want}"
                );
            }
        }
    }
}
