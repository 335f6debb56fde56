//! AVX2 kernels of the exact-sum (IPP-side) bicubic: the same f64 products and sums, in the
//! same order, as the scalar [`Accum`](super::Accum) and [`keys_vertical`](super::keys_vertical),
//! four lanes at a time (no FMA: a fused multiply-add would round differently). Identical bytes,
//! about twice as fast; a unit test compares the two on many sizes.
//!
//! * Horizontal: the part of the source line that the taps read is widened to f64 once; each output pixel then loads its four
//!   source pixels as 4-lane vectors (R, G, B and the next pixel's R), weighs and sums them, and
//!   stores all four lanes at `3x`; the next pixel's store overwrites the stray fourth lane.
//! * Vertical: four output samples per step, rounded half to even, clamped and packed to bytes.

use std::arch::x86_64::*;

use super::{keys_vertical, Taps};

/// Proof that this CPU has AVX2: only [`Avx2::detect`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Avx2(());

impl Avx2 {
    /// `Some` when the CPU supports AVX2.
    pub(super) fn detect() -> Option<Self> {
        std::arch::is_x86_feature_detected!("avx2").then_some(Self(()))
    }

    /// The horizontal pass for source lines of `src_len` pixels, with column taps `xs`.
    ///
    /// # Panics
    /// If a tap lies outside the line (the taps are clamped to it by construction).
    pub(super) fn horizontal(self, xs: &[Taps<f64>], src_len: usize) -> Horizontal<'_> {
        let taps = || xs.iter().flat_map(|(rx, _)| rx.iter().copied());
        let (first, last) = (taps().min().unwrap_or(0), taps().max().unwrap_or(0));
        assert!(last < src_len, "column taps outside the source line");
        Horizontal {
            xs,
            src_len,
            first,
            span: (last + 1 - first) * 3,
            line: Vec::with_capacity((last + 1 - first) * 3 + 1),
        }
    }

    /// The vertical pass of one output row: `out[e]` from sample `e` of the four rows.
    ///
    /// # Panics
    /// If a row is shorter than `out`.
    pub(super) fn vertical(self, rows: [&[f64]; 4], wy: &[f64; 4], out: &mut [u8]) {
        assert!(rows.iter().all(|r| r.len() >= out.len()));
        // SAFETY: `self` proves AVX2; the rows are at least `out.len()` long (checked above).
        unsafe { vertical(rows, wy, out) }
    }
}

/// The horizontal pass with its column taps checked once, for many lines.
pub(super) struct Horizontal<'a> {
    xs: &'a [Taps<f64>],
    src_len: usize,
    /// The first source pixel any tap reads.
    first: usize,
    /// Samples from `first` to the last pixel any tap reads.
    span: usize,
    /// Those samples of the current line widened to f64, plus one spare value.
    line: Vec<f64>,
}

impl Horizontal<'_> {
    /// `out[3x + c]` = the 4-tap sum of channel `c` around output column `x`.
    ///
    /// # Panics
    /// If `line` is not `src_len` RGB pixels or `out` has not room for `3 * xs.len() + 1` values.
    pub(super) fn run(&mut self, line: &[u8], out: &mut [f64]) {
        assert_eq!(line.len(), self.src_len * 3, "source line length");
        assert!(out.len() > self.xs.len() * 3, "room for the spare lane");
        let samples = &line[self.first * 3..][..self.span];
        // SAFETY: `Horizontal` is only made from an `Avx2` proof; every tap lies in
        // `first ..= last` (checked in `Avx2::horizontal`), so the 4-lane load at
        // `3 * (tap - first)` ends at most at `span + 1`, the widened samples' length; the store
        // at `3x` ends at `3x + 4 ≤ 3 * xs.len() + 1 ≤ out.len()`.
        unsafe { horizontal(samples, self.first, self.xs, &mut self.line, out) }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn horizontal(
    samples: &[u8],
    first: usize,
    xs: &[Taps<f64>],
    wide: &mut Vec<f64>,
    out: &mut [f64],
) {
    wide.clear();
    wide.extend(samples.iter().map(|&v| f64::from(v)));
    wide.push(0.0);
    let (src, dst) = (wide.as_ptr(), out.as_mut_ptr());
    for (x, (rx, w)) in xs.iter().enumerate() {
        // SAFETY: in bounds, see `Horizontal::run`.
        unsafe {
            let p0 = _mm256_loadu_pd(src.add((rx[0] - first) * 3));
            let p1 = _mm256_loadu_pd(src.add((rx[1] - first) * 3));
            let p2 = _mm256_loadu_pd(src.add((rx[2] - first) * 3));
            let p3 = _mm256_loadu_pd(src.add((rx[3] - first) * 3));
            let mut acc = _mm256_mul_pd(p0, _mm256_set1_pd(w[0]));
            acc = _mm256_add_pd(acc, _mm256_mul_pd(p1, _mm256_set1_pd(w[1])));
            acc = _mm256_add_pd(acc, _mm256_mul_pd(p2, _mm256_set1_pd(w[2])));
            acc = _mm256_add_pd(acc, _mm256_mul_pd(p3, _mm256_set1_pd(w[3])));
            _mm256_storeu_pd(dst.add(x * 3), acc);
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn vertical(rows: [&[f64]; 4], wy: &[f64; 4], out: &mut [u8]) {
    let [r0, r1, r2, r3] = rows.map(<[f64]>::as_ptr);
    let (w0, w1, w2, w3) = (
        _mm256_set1_pd(wy[0]),
        _mm256_set1_pd(wy[1]),
        _mm256_set1_pd(wy[2]),
        _mm256_set1_pd(wy[3]),
    );
    let (lo, hi) = (_mm256_setzero_pd(), _mm256_set1_pd(255.0));
    let n = out.len();
    let mut e = 0;
    while e + 4 <= n {
        // SAFETY: e + 4 ≤ out.len() ≤ every row's length (checked in `Avx2::vertical`).
        unsafe {
            let mut acc = _mm256_mul_pd(_mm256_loadu_pd(r0.add(e)), w0);
            acc = _mm256_add_pd(acc, _mm256_mul_pd(_mm256_loadu_pd(r1.add(e)), w1));
            acc = _mm256_add_pd(acc, _mm256_mul_pd(_mm256_loadu_pd(r2.add(e)), w2));
            acc = _mm256_add_pd(acc, _mm256_mul_pd(_mm256_loadu_pd(r3.add(e)), w3));
            // Half to even, like the scalar `rint_f64`; then clamp and narrow to bytes.
            let v = _mm256_round_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(acc);
            let v = _mm256_min_pd(_mm256_max_pd(v, lo), hi);
            let i = _mm256_cvtpd_epi32(v);
            let b = _mm_packus_epi16(_mm_packus_epi32(i, i), _mm_setzero_si128());
            out.as_mut_ptr()
                .add(e)
                .cast::<i32>()
                .write_unaligned(_mm_cvtsi128_si32(b));
        }
        e += 4;
    }
    for (e, o) in out.iter_mut().enumerate().skip(e) {
        *o = keys_vertical([rows[0][e], rows[1][e], rows[2][e], rows[3][e]], wy);
    }
}
