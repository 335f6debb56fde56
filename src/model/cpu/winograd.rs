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
//! The transforms work on 8 or 16 channels at a time ([`V8`], `V16`: one AVX or AVX-512
//! register), so they vectorise; the channel mixes run on the packed GEMM of [`super::gemm`].
//! Points are Lavin & Gray's (0, ±1, ±2, ∞); in f32 the result differs from a direct conv by a
//! few 1e-7 relative per layer.
//!
//! With `--dtype bf16` the transforms still run in f32, and `V` and `U` are rounded to bf16 for
//! the channel mixes, which sum in f32 on [`super::bf16`]'s product. Rounding the transformed
//! values costs more than rounding a direct conv's inputs: the output transform sums products
//! with weights up to 8 into values far smaller. Measured: up to 7 % of a layer's largest
//! output on a few random channels (the direct conv in bf16: 0.2 %), and over whole networks
//! 0.8 % of the largest logit on the fixture model (direct alone: 0.3 %), within the 1.5 % that
//! `tests/weights.rs` holds `--dtype bf16` to.

use std::ops::{Add, Mul, Neg, Sub};

use super::bf16::to_bf16;

/// Output pixels per tile side.
pub const M: usize = 4;
/// Input patch side (= transform size).
pub const ALPHA: usize = M + 2;
/// Points of the transform.
pub const POINTS: usize = ALPHA * ALPHA;

/// A small vector of f32 lanes: the transforms' unit of work, so that they vectorise.
///
/// A value can only be made with a [`Lanes::Proof`] that the CPU runs the type's instructions,
/// so the arithmetic on values that exist needs no further check.
pub trait Lanes:
    Copy + Add<Output = Self> + Sub<Output = Self> + Neg<Output = Self> + Mul<f32, Output = Self>
{
    /// What shows that this CPU runs the type's instructions.
    type Proof: Copy;
    /// Lanes per vector.
    const N: usize;
    /// All zeros.
    fn zero(proof: Self::Proof) -> Self;
    /// Loads `N` values, or fewer with zeros after them.
    fn load(proof: Self::Proof, s: &[f32]) -> Self;
    /// Stores the first `min(d.len(), N)` lanes.
    fn store(self, d: &mut [f32]);
    /// Stores the first `min(d.len(), N)` lanes rounded to bf16 ([`to_bf16`]: nearest, ties to
    /// even; NaN stays NaN).
    fn store_bf16(self, d: &mut [u16]);
    /// Lane-wise max with zero.
    fn relu(self) -> Self;
}

/// Eight f32 lanes in a plain array, element-wise ops: the compiler turns them into vector
/// instructions of the width its caller's target features allow (one AVX register, two
/// SSE/NEON ones). The AVX2 kernels and the portable twin.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct V8(pub [f32; 8]);

impl Lanes for V8 {
    type Proof = ();
    const N: usize = 8;

    #[inline(always)]
    fn zero((): ()) -> Self {
        Self([0.0; 8])
    }

    #[inline(always)]
    fn load((): (), s: &[f32]) -> Self {
        match s.first_chunk::<8>() {
            Some(v) => Self(*v),
            None => {
                let mut v = [0f32; 8];
                v[..s.len()].copy_from_slice(s);
                Self(v)
            }
        }
    }

    #[inline(always)]
    fn store(self, d: &mut [f32]) {
        match d.first_chunk_mut::<8>() {
            Some(d) => *d = self.0,
            None => {
                let n = d.len();
                d.copy_from_slice(&self.0[..n]);
            }
        }
    }

    #[inline(always)]
    fn store_bf16(self, d: &mut [u16]) {
        for (d, &x) in d.iter_mut().zip(&self.0) {
            *d = to_bf16(x);
        }
    }

    #[inline(always)]
    fn relu(self) -> Self {
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

impl Mul<f32> for V8 {
    type Output = V8;
    #[inline(always)]
    fn mul(self, k: f32) -> V8 {
        let mut r = self.0;
        for x in &mut r {
            *x *= k;
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

#[cfg(target_arch = "x86_64")]
pub use avx512::{Avx512, V16};

/// Sixteen lanes in one AVX-512 register. Written with intrinsics: the same element-wise code
/// on a 16-float array, under AVX-512, is vectorised across the transforms' rows instead, with
/// gathers, and runs 2–3× slower than [`V8`].
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::{Add, Mul, Neg, Sub};

    use super::Lanes;
    use crate::model::cpu::Isa;

    /// Proof that this CPU runs AVX-512F: only [`Avx512::detect`] makes one.
    #[derive(Debug, Clone, Copy)]
    pub struct Avx512(());

    impl Avx512 {
        /// `Some` on a CPU with AVX-512F (and the AVX2 and FMA that come with it).
        pub fn detect() -> Option<Self> {
            Isa::Avx512.runs_here().then_some(Self(()))
        }
    }

    /// Sixteen f32 lanes in a ZMM register; made only with an [`Avx512`] proof.
    #[derive(Debug, Clone, Copy)]
    pub struct V16(__m512);

    /// The mask of the first `n` (≤ 16) lanes.
    #[inline(always)]
    fn first(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }

    impl Lanes for V16 {
        type Proof = Avx512;
        const N: usize = 16;

        #[inline(always)]
        fn zero(_: Avx512) -> Self {
            // SAFETY: the proof shows the CPU has AVX-512F.
            Self(unsafe { _mm512_setzero_ps() })
        }

        #[inline(always)]
        fn load(_: Avx512, s: &[f32]) -> Self {
            // SAFETY: the proof shows AVX-512F; the masked load reads only the first
            // `min(len, 16)` floats, all inside `s` (masked-off lanes do not fault).
            Self(unsafe { _mm512_maskz_loadu_ps(first(s.len()), s.as_ptr()) })
        }

        #[inline(always)]
        fn store(self, d: &mut [f32]) {
            // SAFETY: a `V16` exists only where AVX-512F does (its proof); the masked store
            // writes only the first `min(len, 16)` floats, all inside `d`.
            unsafe { _mm512_mask_storeu_ps(d.as_mut_ptr(), first(d.len()), self.0) }
        }

        #[inline(always)]
        fn store_bf16(self, d: &mut [u16]) {
            // SAFETY: a `V16` exists only where AVX-512F does (its proof); the masked store
            // writes only the first `min(len, 16)` values, all inside `d`.
            unsafe {
                // As `to_bf16`: add 0x7fff plus the lowest kept bit, keep the high half; a NaN
                // keeps its high half with the quiet bit set.
                let bits = _mm512_castps_si512(self.0);
                let high = _mm512_srli_epi32::<16>(bits);
                let odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
                let bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
                let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
                let quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0);
                let halves = _mm512_mask_blend_epi32(nan, rounded, quiet);
                _mm512_mask_cvtepi32_storeu_epi16(d.as_mut_ptr().cast(), first(d.len()), halves)
            }
        }

        #[inline(always)]
        fn relu(self) -> Self {
            // SAFETY: a `V16` exists only where AVX-512F does. NaN gives 0, as `f32::max`.
            Self(unsafe { _mm512_max_ps(self.0, _mm512_setzero_ps()) })
        }
    }

    macro_rules! op {
        ($tr:ident, $f:ident, $intr:ident) => {
            impl $tr for V16 {
                type Output = V16;
                #[inline(always)]
                fn $f(self, o: V16) -> V16 {
                    // SAFETY: a `V16` exists only where AVX-512F does (its proof).
                    V16(unsafe { $intr(self.0, o.0) })
                }
            }
        };
    }
    op!(Add, add, _mm512_add_ps);
    op!(Sub, sub, _mm512_sub_ps);

    impl Mul<f32> for V16 {
        type Output = V16;
        #[inline(always)]
        fn mul(self, k: f32) -> V16 {
            // SAFETY: a `V16` exists only where AVX-512F does (its proof).
            V16(unsafe { _mm512_mul_ps(self.0, _mm512_set1_ps(k)) })
        }
    }

    impl Neg for V16 {
        type Output = V16;
        #[inline(always)]
        fn neg(self) -> V16 {
            // SAFETY: a `V16` exists only where AVX-512F does (its proof). `0 - x` would
            // turn -0 into +0; flipping the sign bit is exact, as `-x` on an f32.
            V16(unsafe {
                _mm512_castsi512_ps(_mm512_xor_si512(
                    _mm512_castps_si512(self.0),
                    _mm512_set1_epi32(i32::MIN),
                ))
            })
        }
    }
}

/// `Bᵀ d` along one axis of six values.
#[inline(always)]
fn input_1d<V: Lanes>(d: [V; ALPHA]) -> [V; ALPHA] {
    let [d0, d1, d2, d3, d4, d5] = d;
    let t42 = d4 - d2 * 4.0; // shared by rows 1 and 2
    let t31 = d3 - d1 * 4.0;
    let u42 = d4 - d2; // shared by rows 3 and 4
    let u31 = (d3 - d1) * 2.0;
    [
        d0 * 4.0 - d2 * 5.0 + d4,
        t42 + t31,
        t42 - t31,
        u42 + u31,
        u42 - u31,
        d1 * 4.0 - d3 * 5.0 + d5,
    ]
}

/// `Aᵀ m` along one axis: six values in, four out.
#[inline(always)]
fn output_1d<V: Lanes>(m: [V; ALPHA]) -> [V; M] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let s12 = m1 + m2;
    let d12 = m1 - m2;
    let s34 = m3 + m4;
    let d34 = m3 - m4;
    [
        m0 + s12 + s34,
        d12 + d34 * 2.0,
        s12 + s34 * 4.0,
        d12 + d34 * 8.0 + m5,
    ]
}

/// `Bᵀ d B` of one 6×6 patch (row-major `d[y][x]`) into `v`, row-major by point.
#[inline(always)]
pub fn input_2d<V: Lanes>(d: &[[V; ALPHA]; ALPHA], v: &mut [[V; ALPHA]; ALPHA]) {
    let mut t = *d; // every value overwritten
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
pub fn output_2d<V: Lanes>(m: &[[V; ALPHA]; ALPHA], y: &mut [[V; M]; M]) {
    let mut s = [m[0]; M]; // every value overwritten
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

    /// The AVX-512 lanes compute what the portable ones do, to the bit: two V8 halves against
    /// one V16, on every transform, with partial loads and stores.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_lanes_equal_two_times_eight_to_the_bit() {
        let Some(proof) = Avx512::detect() else {
            println!("SKIPPED: AVX-512 lanes (this CPU lacks AVX-512F)");
            return;
        };
        let vals: Vec<f32> = (0..ALPHA * ALPHA * 16)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 37.0)
            .collect();
        let at = |y: usize, x: usize| &vals[(y * ALPHA + x) * 16..][..16];
        let d16: [[V16; ALPHA]; ALPHA] =
            std::array::from_fn(|y| std::array::from_fn(|x| V16::load(proof, at(y, x))));
        let d8: [[[V8; ALPHA]; ALPHA]; 2] = std::array::from_fn(|h| {
            std::array::from_fn(|y| std::array::from_fn(|x| V8::load((), &at(y, x)[h * 8..])))
        });
        let mut v16 = d16;
        input_2d(&d16, &mut v16);
        let mut y16 = [[V16::zero(proof); M]; M];
        output_2d(&v16, &mut y16);
        for (h, d) in d8.iter().enumerate() {
            let mut v8 = *d;
            input_2d(d, &mut v8);
            let mut y8 = [[V8::zero(()); M]; M];
            output_2d(&v8, &mut y8);
            let half = |a: V16| {
                let mut out = [0f32; 16];
                a.store(&mut out);
                out[h * 8..][..8].to_vec()
            };
            for (a, b) in v16.iter().flatten().zip(v8.iter().flatten()) {
                assert_eq!(half(*a), b.0.to_vec());
                assert_eq!(half((-*a * 0.5).relu()), (-*b * 0.5).relu().0.to_vec());
            }
            for (a, b) in y16.iter().flatten().zip(y8.iter().flatten()) {
                assert_eq!(half(*a), b.0.to_vec());
                assert_eq!(half(a.relu()), b.relu().0.to_vec());
            }
        }
        // Partial loads fill with zeros; partial stores write only their length.
        let v = V16::load(proof, &vals[..5]);
        let mut out = [9f32; 7];
        v.store(&mut out);
        assert_eq!(&out[..5], &vals[..5]);
        assert_eq!(&out[5..], &[0.0, 0.0]);
        let mut short = [9f32; 3];
        v.store(&mut short);
        assert_eq!(&short, &vals[..3]);
        // Rounding to bf16 (the bf16 Winograd's stores): each lane as `to_bf16`, with ties,
        // NaNs, infinities, subnormals and values that round to infinity; partial stores
        // write only their length.
        let mut special: Vec<f32> = vals[..6].to_vec();
        special.extend(super::super::bf16::HARD_CASES);
        let v = V16::load(proof, &special);
        for len in [16, 9, 8, 1] {
            let mut got = [7u16; 17];
            v.store_bf16(&mut got[..len]);
            let mut want = [7u16; 17];
            V8::load((), &special[..8]).store_bf16(&mut want[..len.min(8)]);
            if len > 8 {
                V8::load((), &special[8..]).store_bf16(&mut want[8..len]);
            }
            assert_eq!(got, want, "{len} lanes");
            for (g, &x) in got[..len].iter().zip(&special) {
                assert_eq!(*g, to_bf16(x), "{x}");
            }
        }
    }

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
            std::array::from_fn(|i| std::array::from_fn(|j| v[i][j] * (u[i][j] as f32)));
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
