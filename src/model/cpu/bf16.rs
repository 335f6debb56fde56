//! bf16 matrix products with f32 accumulation: what the CPU bf16 path (`--dtype bf16`) runs
//! every 3×3 conv's products on.
//!
//! bf16 keeps f32's exponent and 8 bits of mantissa, so the product of two bf16 values is exact
//! in f32 and only the sums round. AVX512-BF16's `vdpbf16ps` multiplies 16 pairs of bf16 pairs
//! and adds both products to 16 f32 lanes: twice the multiplies of an f32 FMA per instruction.
//! It wants each operand as (k, k+1) pairs in one 32-bit lane, so the weights are packed once
//! into panels of [`NR`] columns whose rows are such pairs ("VNNI" layout, also what AMX's
//! `tdpbf16ps` reads), and the activations are rows of bf16 with an even length.
//!
//! Here: round-to-nearest-even f32 → bf16, the pair packing, and the product with its kernels
//! ([`Kernel`]): AVX512-BF16, AMX tiles (`amx.rs`), and the portable twin both are tested
//! against.

use super::aligned::Aligned;
use super::amx;
use super::gemm::{Epilogue, Isa, NR};

/// f32 → bf16, rounding to nearest, ties to even (as `vcvtne2ps2bf16`); NaN stays NaN.
/// Branch-free, so that loops of it vectorise.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet = ((bits >> 16) as u16) | 0x40;
    if x.is_nan() {
        quiet
    } else {
        rounded
    }
}

/// [`to_bf16`] of every value of `src` into `dst` (as long), compiled for AVX-512 where the
/// kernel set has it (the same code: branch-free, so it vectorises 16 wide).
pub fn to_bf16_slice(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "to_bf16_slice: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if super::isa() == super::Isa::Avx512 {
        // SAFETY: an `Isa::Avx512` is detected only where AVX-512F (and AVX2) run.
        return unsafe { to_bf16_slice_avx512(src, dst) };
    }
    to_bf16_slice_portable(src, dst);
}

/// [`to_bf16_slice_portable`] compiled for AVX-512.
///
/// # Safety
/// The CPU must support AVX-512F and AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
unsafe fn to_bf16_slice_avx512(src: &[f32], dst: &mut [u16]) {
    to_bf16_slice_portable(src, dst);
}

#[inline(always)]
fn to_bf16_slice_portable(src: &[f32], dst: &mut [u16]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = to_bf16(x);
    }
}

/// bf16 → f32 (exact).
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Whether the AVX512-BF16 kernel runs here: the CPU has it, and `--cpu-isa` allows AVX-512.
pub fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::isa() == super::Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The bf16 product kernels, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// Scalar code: the twin the others are tested against.
    Portable,
    /// AVX512-BF16's `vdpbf16ps`.
    Avx512,
    /// AMX tiles (`tdpbf16ps`), and AVX512-BF16 for products of fewer than 16 rows.
    Amx,
}

impl Kernel {
    /// The best kernel here: AMX where the CPU and the OS have it and `--cpu-isa` is `auto`
    /// (any cap, `avx512` included, leaves it out), else AVX512-BF16 where it runs, else the
    /// portable one. The AMX kernel is first checked against the portable one on a product both
    /// compute exactly; should they differ, it is not used, and an error says so.
    pub fn detect() -> Self {
        static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            if !avx512_bf16() {
                Kernel::Portable
            } else if Isa::capped() || !amx::available() {
                Kernel::Avx512
            } else if let Err(e) = amx_agrees() {
                tracing::error!("the AMX kernel is not used: {e}; bf16 runs on AVX512-BF16");
                Kernel::Avx512
            } else {
                Kernel::Amx
            }
        })
    }

    /// This kernel if it runs here, else the best one below it that does.
    pub fn or_below(self) -> Self {
        match self {
            Kernel::Amx if amx::available() && avx512_bf16() => Kernel::Amx,
            Kernel::Amx | Kernel::Avx512 if avx512_bf16() => Kernel::Avx512,
            _ => Kernel::Portable,
        }
    }

    /// Name for logs, `/info`, `/metrics` and `bench --json`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx512 => "avx512_bf16",
            Kernel::Amx => "amx_bf16",
        }
    }
}

/// The AMX kernel's product equals the portable one's where both are exact.
fn amx_agrees() -> Result<(), String> {
    agrees_on_an_exact_product(|m, a, lda, b, c, ldc| {
        gemm_bf16(
            Kernel::Amx,
            m,
            a,
            lda,
            b,
            0..b.panels(),
            c,
            ldc,
            Epilogue::NONE,
        )
    })
}

/// A product computed by `product` (`m`, `a`, `lda`, `b`, `c`, `ldc` as for [`gemm_bf16`],
/// every panel) equals the portable kernel's, on values on a grid of 1/2048 whose sums stay
/// under 2^24 grid steps (so that every order of summing is exact), over edges of every kind
/// for AMX: a partial last step, a last row block moved back, a lone last panel.
pub(super) fn agrees_on_an_exact_product(
    product: impl Fn(usize, &[u16], usize, &PackedBf16, &mut [f32], usize),
) -> Result<(), String> {
    let (m, k, n) = (40, 150, 40);
    let a: Vec<u16> = (0..m * k)
        .map(|i| to_bf16(((i * 37 % 101) as f32 - 50.0) / 64.0))
        .collect();
    let b = PackedBf16::pack(k, n, |r, c| ((r * 53 + c * 29) % 89) as f32 / 32.0 - 1.375);
    let mut want = vec![f32::NAN; m * n];
    let all = 0..b.panels();
    gemm_bf16(
        Kernel::Portable,
        m,
        &a,
        k,
        &b,
        all,
        &mut want,
        n,
        Epilogue::NONE,
    );
    let mut got = vec![f32::NAN; m * n];
    product(m, &a, k, &b, &mut got, n);
    match got.iter().zip(&want).position(|(x, y)| x != y) {
        None => Ok(()),
        Some(at) => Err(format!(
            "its product differs from the portable kernel's at ({}, {}): {} against {}",
            at / n,
            at % n,
            got[at],
            want[at]
        )),
    }
}

/// A `k × n` matrix in bf16, packed into `ceil(n / NR)` panels of `ceil(k / 2)` rows of `NR`
/// (k, k+1) pairs, zero-padded on the right, and below to a multiple of 16 rows (an AMX
/// tile's depth; also pads an odd `k`).
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    k: usize,
    n: usize,
    /// Rows of pairs per panel: `ceil(k / 2)` rounded up to a multiple of 16.
    rows: usize,
    /// Each value: bf16 of row `2q` in the low half, of row `2q + 1` in the high half. From a
    /// cache line: each panel row (16 pairs) is one line.
    data: Aligned<u32>,
}

impl PackedBf16 {
    /// Packs the `k × n` matrix whose element `(row, col)` is `at(row, col)`, rounded to bf16.
    pub fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let (pairs, panels) = (k.div_ceil(2), n.div_ceil(NR));
        let rows = pairs.div_ceil(amx::ROWS) * amx::ROWS;
        let mut data = Aligned::zeroed(panels * rows * NR);
        for (j, panel) in data.chunks_exact_mut(rows * NR).enumerate() {
            for (q, row) in panel.chunks_exact_mut(NR).take(pairs).enumerate() {
                for (c, d) in row.iter_mut().enumerate() {
                    let col = j * NR + c;
                    if col >= n {
                        continue;
                    }
                    let lo = to_bf16(at(2 * q, col));
                    let hi = if 2 * q + 1 < k {
                        to_bf16(at(2 * q + 1, col))
                    } else {
                        0
                    };
                    *d = u32::from(lo) | u32::from(hi) << 16;
                }
            }
        }
        Self { k, n, rows, data }
    }

    /// Rows (the reduction length).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Number of column panels.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// Panel `j`: its rows of pairs, [`NR`] values each.
    pub(super) fn panel(&self, j: usize) -> &[u32] {
        let len = self.rows * NR;
        &self.data[j * len..(j + 1) * len]
    }
}

/// Rows of `A` per AVX-512 micro-kernel call (over two panels: 16 ZMM accumulators).
const MR: usize = 8;

/// `C[i, col] = Σ_p A[i, p] · B[p, col]` in f32 from bf16 `A` and `B` (then the epilogue), for
/// rows `0..m` and the columns of panels `panels`; columns at or beyond `n` are not written.
///
/// `a` holds row `i` at `a[i * lda..][..k]` as bf16 bits, `k` rounded up to even (the pad
/// value is multiplied by zero weights, but must not be NaN or infinite: use 0); `c` holds
/// column `col` of row `i` at `c[i * ldc + col - panels.start * NR]`. Runs on `kernel`, or on
/// the best one below it where this CPU lacks it ([`Kernel::or_below`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    kernel: Kernel,
    m: usize,
    a: &[u16],
    lda: usize,
    b: &PackedBf16,
    panels: std::ops::Range<usize>,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
) {
    let k2 = b.k.div_ceil(2) * 2;
    if m == 0 || panels.is_empty() {
        return;
    }
    assert!(panels.end <= b.panels(), "gemm_bf16: panel out of range");
    let col0 = panels.start * NR;
    let width_all = (panels.end * NR).min(b.n) - col0;
    assert!(
        lda >= k2 && a.len() >= (m - 1) * lda + k2,
        "gemm_bf16: A too short"
    );
    assert!(
        c.len() >= (m - 1) * ldc + width_all && ldc >= width_all,
        "gemm_bf16: C too short"
    );
    if let Some(bias) = epi.bias {
        assert!(bias.len() >= panels.end * NR, "gemm_bf16: bias too short");
    }
    match kernel.or_below() {
        #[cfg(target_arch = "x86_64")]
        Kernel::Amx if m >= amx::ROWS => {
            // SAFETY: `or_below` kept AMX only where `amx::available()`.
            let mut tiles = unsafe { amx::Hardware::here() };
            gemm_tiles(&mut tiles, m, a, lda, b, panels, c, ldc, epi);
        }
        kernel => gemm_vectors(kernel >= Kernel::Avx512, m, a, lda, b, panels, c, ldc, epi),
    }
}

/// `dst[i] = sums[i] + bias[i]`, clamped at zero if `relu`, for `i < dst.len()` (`bias`, when
/// there is one, and `sums` at least as long). Compiled for AVX-512 where the kernels run it.
#[inline]
pub(super) fn finish(sums: &[f32], bias: Option<&[f32]>, relu: bool, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::isa() == Isa::Avx512 {
        // SAFETY: an `Isa::Avx512` is detected only where AVX-512F runs.
        return unsafe { finish_avx512(sums, bias, relu, dst) };
    }
    finish_portable(sums, bias, relu, dst);
}

/// [`finish_portable`] compiled for AVX-512.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn finish_avx512(sums: &[f32], bias: Option<&[f32]>, relu: bool, dst: &mut [f32]) {
    finish_portable(sums, bias, relu, dst);
}

#[inline(always)]
fn finish_portable(sums: &[f32], bias: Option<&[f32]>, relu: bool, dst: &mut [f32]) {
    let sums = &sums[..dst.len()];
    match (bias, relu) {
        (Some(bias), true) => {
            for ((d, &s), &b) in dst.iter_mut().zip(sums).zip(&bias[..sums.len()]) {
                *d = (s + b).max(0.0);
            }
        }
        (Some(bias), false) => {
            for ((d, &s), &b) in dst.iter_mut().zip(sums).zip(&bias[..sums.len()]) {
                *d = s + b;
            }
        }
        (None, true) => {
            for (d, &s) in dst.iter_mut().zip(sums) {
                *d = s.max(0.0);
            }
        }
        (None, false) => dst.copy_from_slice(sums),
    }
}

/// [`gemm_bf16`] on AMX tiles (or the tests' model of them), checked as there.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn gemm_tiles(
    tiles: &mut impl amx::Tiles,
    m: usize,
    a: &[u16],
    lda: usize,
    b: &PackedBf16,
    panels: std::ops::Range<usize>,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
) {
    let col0 = panels.start * NR;
    let last = panels.end;
    amx::gemm(tiles, m, a, lda, b, panels, |j, rows, block| {
        let width = 2.min(last - j) * NR;
        let cols = (b.n - j * NR).min(width);
        let bias = epi.bias.map(|bias| &bias[j * NR..j * NR + width]);
        for i in rows {
            let dst = &mut c[i * ldc + j * NR - col0..][..cols];
            finish(block.row(i), bias, epi.relu, dst);
        }
    });
}

/// [`gemm_bf16`] on vectors: the AVX512-BF16 kernel (`avx512`, where the CPU has it) or the
/// portable one.
#[allow(clippy::too_many_arguments)]
fn gemm_vectors(
    avx512: bool,
    m: usize,
    a: &[u16],
    lda: usize,
    b: &PackedBf16,
    panels: std::ops::Range<usize>,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
) {
    let k2 = b.k.div_ceil(2) * 2;
    let col0 = panels.start * NR;
    let avx512 = avx512 && avx512_bf16();
    let mut tmp = [0f32; MR * 2 * NR];
    let mut j = panels.start;
    while j < panels.end {
        let panels = 2.min(panels.end - j);
        let width = panels * NR;
        let cols = (b.n - j * NR).min(width);
        let bias = epi.bias.map(|bias| &bias[j * NR..j * NR + width]);
        let mut i = 0;
        while i < m {
            let rows = MR.min(m - i);
            let a_rows = &a[i * lda..];
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // Whole panels go straight into `c`, the epilogue applied on the way; a last,
                // partial one through `tmp`.
                let whole = cols == width;
                let (out, ldo, epi) = if whole {
                    let at = i * ldc + j * NR - col0;
                    assert!(at + (rows - 1) * ldc + width <= c.len());
                    (c[at..].as_mut_ptr(), ldc, Some((bias, epi.relu)))
                } else {
                    (tmp.as_mut_ptr(), width, None)
                };
                // SAFETY: AVX512-BF16 was detected; `a_rows` holds `rows` rows of `k2` values at
                // stride `lda` (asserted by the caller), each panel `k2 / 2` rows of NR pairs;
                // `out` has `rows` rows of `width` floats `ldo` apart (checked above, or `tmp`),
                // and a bias `width` long.
                unsafe {
                    micro_avx512(
                        rows,
                        k2 / 2,
                        a_rows.as_ptr(),
                        lda,
                        [b.panel(j).as_ptr(), b.panel(j + panels - 1).as_ptr()],
                        panels,
                        out,
                        ldo,
                        epi,
                    )
                };
                if whole {
                    i += rows;
                    continue;
                }
            }
            if !avx512 {
                micro_portable(rows, k2 / 2, a_rows, lda, b, j, panels, &mut tmp);
            }
            for r in 0..rows {
                let dst = &mut c[(i + r) * ldc + j * NR - col0..][..cols];
                finish(&tmp[r * width..][..width], bias, epi.relu, dst);
            }
            i += rows;
        }
        j += panels;
    }
}

/// The portable twin of [`micro_avx512`]: for each pair, the odd product then the even one is
/// added to the f32 sum, each addition rounded, as `vdpbf16ps` does.
#[allow(clippy::too_many_arguments)]
fn micro_portable(
    rows: usize,
    pairs: usize,
    a: &[u16],
    lda: usize,
    b: &PackedBf16,
    j: usize,
    panels: usize,
    out: &mut [f32],
) {
    let width = panels * NR;
    for r in 0..rows {
        for q in 0..panels {
            let panel = b.panel(j + q);
            for col in 0..NR {
                let mut acc = 0f32;
                for p in 0..pairs {
                    let (a0, a1) = (
                        from_bf16(a[r * lda + 2 * p]),
                        from_bf16(a[r * lda + 2 * p + 1]),
                    );
                    let w = panel[p * NR + col];
                    let (b0, b1) = (from_bf16(w as u16), from_bf16((w >> 16) as u16));
                    acc += a1 * b1;
                    acc += a0 * b0;
                }
                out[r * width + q * NR + col] = acc;
            }
        }
    }
}

/// AVX512-BF16 micro-kernel: up to [`MR`] rows × one or two panels; per pair of reduction steps,
/// one broadcast of an `A` pair per row and one `vdpbf16ps` per row and panel. With `epi`, adds
/// the bias (when there is one) and clamps at zero (when asked) before storing, as [`finish`].
///
/// # Safety
/// The CPU must support AVX-512F and AVX512-BF16. `a` addresses `rows` rows of `2·pairs` bf16
/// at stride `lda`; `b[q]` (`q < panels`) a panel of `pairs` rows of NR pairs; `out` `rows` rows
/// of `panels · NR` floats, `ldo` apart; a bias, `panels · NR` floats.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro_avx512(
    rows: usize,
    pairs: usize,
    a: *const u16,
    lda: usize,
    b: [*const u32; 2],
    panels: usize,
    out: *mut f32,
    ldo: usize,
    epi: Option<(Option<&[f32]>, bool)>,
) {
    use std::arch::x86_64::*;
    // SAFETY: every offset stays inside the regions the caller vouched for.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b[0].add(p * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b[1].add(p * NR).cast()));
            for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
                let pair = a.add(r * lda + 2 * p).cast::<i32>().read_unaligned();
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], av, b0);
                if panels == 2 {
                    acc_r[1] = _mm512_dpbf16_ps(acc_r[1], av, b1);
                }
            }
        }
        let (bias, relu) = epi.unwrap_or((None, false));
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            for (q, &x) in acc_r.iter().enumerate().take(panels) {
                let x = match bias {
                    Some(bias) => _mm512_add_ps(x, _mm512_loadu_ps(bias[q * NR..][..NR].as_ptr())),
                    None => x,
                };
                // As `f32::max`: a NaN sum gives 0 (the second operand).
                let x = if relu {
                    _mm512_max_ps(x, _mm512_setzero_ps())
                } else {
                    x
                };
                _mm512_storeu_ps(out.add(r * ldo + q * NR), x);
            }
        }
    }
}

/// Values that rounding to bf16 must get right (for the tests of every rounding twin): ties to
/// even down and up, NaNs of both signs (and a signalling one), infinity, values that round to
/// infinity, negative zero, a subnormal.
#[cfg(test)]
pub(super) const HARD_CASES: [f32; 10] = [
    1.0 + 1.0 / 256.0,
    f32::from_bits(0x3f81_8000),
    f32::NAN,
    -f32::NAN,
    f32::INFINITY,
    f32::MAX,
    -0.0,
    1e-40,
    f32::from_bits(0x7f80_0001),
    -3.0e38,
];

#[cfg(test)]
mod tests {
    use super::super::tests::AMX_GEMM_SHAPES;
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 700.0 - 1.4)
            .collect()
    }

    #[test]
    fn rounding_a_slice_equals_rounding_each_value() {
        let mut src = values(1000, 4);
        src.extend(HARD_CASES);
        let mut dst = vec![0u16; src.len() - 3];
        to_bf16_slice(&src[3..], &mut dst);
        for (x, d) in src[3..].iter().zip(&dst) {
            assert_eq!(*d, to_bf16(*x), "{x}");
        }
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties go to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // Just above halfway rounds up.
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        // 1.0078125 + half a step ties to even: up to 1.015625.
        assert_eq!(to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        // The largest finite f32 rounds to infinity, as in hardware.
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
    }

    /// The products to compare: the portable kernel, the AMX driver on the software model of
    /// the tiles, and the CPU's kernels where it has them (saying which it lacks).
    fn kernels_here() -> Vec<&'static str> {
        let mut kernels = vec!["portable", "amx model"];
        for (kernel, flag) in [(Kernel::Avx512, "avx512_bf16"), (Kernel::Amx, "amx_bf16")] {
            if kernel.or_below() == kernel {
                kernels.push(kernel.name());
            } else {
                println!(
                    "SKIPPED: the {} kernel (this CPU lacks {flag})",
                    kernel.name()
                );
            }
        }
        kernels
    }

    #[test]
    fn bf16_products_match_the_rounded_inputs_in_f64_on_ragged_shapes() {
        let kernels = kernels_here();
        // Odd k (a zero-padded last pair), partial row tiles, one panel alone, partial panels;
        // then AMX's edges.
        let vectors = [(1, 1, 1, 0), (7, 5, 17, 0), (9, 64, 48, 0), (3, 300, 16, 0)];
        for (m, k, n, first_panel) in vectors.into_iter().chain(AMX_GEMM_SHAPES) {
            let a = values(m * k, 1);
            let bm = values(k * n, 2);
            let bias = values(n.div_ceil(NR) * NR, 3);
            let packed = PackedBf16::pack(k, n, |r, col| bm[r * n + col]);
            // Rows a little longer than the reduction, to catch a kernel that reads `k2`-apart.
            let lda = k.div_ceil(2) * 2 + 6;
            let mut a16 = vec![0u16; m * lda];
            for i in 0..m {
                for p in 0..k {
                    a16[i * lda + p] = to_bf16(a[i * k + p]);
                }
            }
            let col0 = first_panel * NR;
            let ldc = n - col0 + 3;
            let mut results = Vec::new();
            // The tiles take 16 rows at least (fewer run on AVX512-BF16).
            let tiles = |k: &&str| m >= amx::ROWS || !k.starts_with("amx");
            for kernel in kernels.iter().copied().filter(tiles) {
                let mut c = vec![f32::NAN; m * ldc];
                let epi = Epilogue {
                    bias: Some(&bias),
                    relu: true,
                };
                let panels = first_panel..packed.panels();
                match kernel {
                    "portable" => gemm_bf16(
                        Kernel::Portable,
                        m,
                        &a16,
                        lda,
                        &packed,
                        panels,
                        &mut c,
                        ldc,
                        epi,
                    ),
                    "amx model" => gemm_tiles(
                        &mut amx::Model::default(),
                        m,
                        &a16,
                        lda,
                        &packed,
                        panels,
                        &mut c,
                        ldc,
                        epi,
                    ),
                    name => {
                        let kernel = [Kernel::Avx512, Kernel::Amx]
                            .into_iter()
                            .find(|k| k.name() == name)
                            .unwrap();
                        gemm_bf16(kernel, m, &a16, lda, &packed, panels, &mut c, ldc, epi)
                    }
                }
                for i in 0..m {
                    for j in col0..n {
                        // The products of the bf16-rounded inputs, summed in f64.
                        let want: f64 = (0..k)
                            .map(|p| {
                                f64::from(from_bf16(a16[i * lda + p]))
                                    * f64::from(from_bf16(to_bf16(bm[p * n + j])))
                            })
                            .sum::<f64>()
                            + f64::from(bias[j]);
                        let want = want.max(0.0);
                        let got = f64::from(c[i * ldc + j - col0]);
                        assert!(
                            (got - want).abs()
                                <= 1e-5 * (1.0 + k as f64).sqrt() * (1.0 + want.abs()),
                            "{kernel} {m}x{k}x{n} ({i},{j}): {got} vs {want}"
                        );
                    }
                    // Beyond the last column, in the padding of `c`: untouched.
                    assert!(c[i * ldc + n - col0..][..3].iter().all(|x| x.is_nan()));
                }
                results.push((kernel, c));
            }
            // Every kernel sums the same products; the twins add in their kernels' order (the
            // AVX512-BF16 kernel equals the portable one to the bit on the CPUs tried; 1e-6
            // allows a CPU that rounds its sums differently), AMX in 32-deep steps.
            let (_, portable) = &results[0];
            for (kernel, c) in &results[1..] {
                let worst = portable
                    .iter()
                    .zip(c)
                    .filter(|(a, _)| !a.is_nan())
                    .map(|(a, b)| (a - b).abs() / (1.0 + a.abs()))
                    .fold(0f32, f32::max);
                let bound = if *kernel == "avx512_bf16" { 1e-6 } else { 1e-5 };
                assert!(worst <= bound, "{kernel} {m}x{k}x{n}: differs by {worst}");
            }
        }
    }

    #[test]
    fn the_amx_self_check_passes_on_a_right_product_and_fails_on_a_wrong_one() {
        let model = |m, a: &[u16], lda, b: &PackedBf16, c: &mut [f32], ldc| {
            let all = 0..b.panels();
            gemm_tiles(
                &mut amx::Model::default(),
                m,
                a,
                lda,
                b,
                all,
                c,
                ldc,
                Epilogue::NONE,
            )
        };
        assert_eq!(agrees_on_an_exact_product(model), Ok(()));
        let off_by_one_step = |m, a: &[u16], lda, b: &PackedBf16, c: &mut [f32], ldc| {
            model(m, a, lda, b, c, ldc);
            c[ldc + 3] += 1.0 / 2048.0;
        };
        let e = agrees_on_an_exact_product(off_by_one_step).unwrap_err();
        assert!(e.contains("at (1, 3)"), "{e}");
        if Kernel::Amx.or_below() == Kernel::Amx {
            assert_eq!(amx_agrees(), Ok(()));
            assert_eq!(Kernel::detect(), Kernel::Amx);
        } else {
            println!("SKIPPED: the AMX self-check on the CPU (this CPU lacks amx_bf16)");
            assert_ne!(Kernel::detect(), Kernel::Amx);
        }
    }
}
