//! A small f32 matrix product for convolutions: `C = A · B`, optionally `+ bias` and ReLU.
//!
//! `B` (the weights) is packed once, at load, into column panels of [`NR`] columns, each panel
//! `k × NR` contiguous, so the inner loop streams it with unit stride. `A` (activations) is read
//! in place, [`MR`] rows at a time, through a row stride: im2col rows and Winograd tiles are
//! already laid out as rows, so nothing is copied. A register-blocked `MR × NR` micro-kernel does
//! the work: AVX-512 (`MR512 × 2·NR`, two panels at once) or AVX2+FMA (`MR × NR`) when the CPU
//! has it (checked at run time, so one binary runs on any x86-64), plain Rust that the compiler
//! vectorises otherwise (and on other architectures). Every kernel is tested against the
//! portable one on ragged shapes.

use super::aligned::Aligned;

/// Rows of `A` per micro-kernel call.
pub const MR: usize = 6;
/// Columns of a packed panel of `B` (two AVX registers, one AVX-512 register).
pub const NR: usize = 16;
/// Rows of `A` per AVX-512 micro-kernel call, over two panels: 16 ZMM accumulators.
pub const MR512: usize = 8;
/// Reduction steps per pass over `C`: a longer product is summed in slices of `KC`, so that
/// the slice of `B` a micro-kernel streams (`KC × 2·NR`, 64 KiB) stays in L2 while every row
/// tile reuses it, and the rows of `A` it reads stay in L1. Products of `k ≤ KC` (the Winograd
/// channel mixes, the stem) make one pass, as before.
pub const KC: usize = 512;

/// A `k × n` matrix packed into `ceil(n / NR)` panels of `k × NR`, zero-padded on the right.
#[derive(Debug, Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    /// From a cache line: each panel row (16 floats) is one line.
    data: Aligned<f32>,
}

impl PackedB {
    /// Packs the `k × n` matrix whose element `(row, col)` is `at(row, col)`.
    pub fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let panels = n.div_ceil(NR);
        let mut data = Aligned::zeroed(panels * k * NR);
        for (j, panel) in data.chunks_exact_mut(k * NR).enumerate() {
            for (row, dst) in panel.chunks_exact_mut(NR).enumerate() {
                for (c, d) in dst.iter_mut().enumerate() {
                    let col = j * NR + c;
                    if col < n {
                        *d = at(row, col);
                    }
                }
            }
        }
        Self { k, n, data }
    }

    /// A `k × n` matrix of zeros, to fill with [`Self::set`].
    pub fn zeros(k: usize, n: usize) -> Self {
        Self {
            k,
            n,
            data: Aligned::zeroed(n.div_ceil(NR) * k * NR),
        }
    }

    /// Sets element `(row, col)`.
    pub fn set(&mut self, row: usize, col: usize, value: f32) {
        assert!(row < self.k && col < self.n, "PackedB::set out of range");
        self.data[(col / NR * self.k + row) * NR + col % NR] = value;
    }

    /// Element `(row, col)`.
    pub fn get(&self, row: usize, col: usize) -> f32 {
        assert!(row < self.k && col < self.n, "PackedB::get out of range");
        self.data[(col / NR * self.k + row) * NR + col % NR]
    }

    /// Rows (the reduction length).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Number of column panels.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }

    pub(super) fn panel(&self, j: usize) -> &[f32] {
        &self.data[j * self.k * NR..(j + 1) * self.k * NR]
    }
}

/// The instruction set the kernels use, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Anything else: portable code the compiler vectorises for the baseline target.
    Portable,
    /// x86-64 with AVX2 and FMA.
    Avx2Fma,
    /// x86-64 with AVX-512F (and AVX2 and FMA, which every AVX-512 CPU has).
    Avx512,
}

/// The most a user allows (`--cpu-isa`), set before the first [`Isa::detect`].
static LIMIT: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();

impl Isa {
    /// Every kernel set, worst first.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2Fma, Isa::Avx512];

    /// The best kernels this CPU runs, within the cap set by [`Isa::limit`].
    pub fn detect() -> Self {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::ALL
                .into_iter()
                .rev()
                .find(|isa| isa.runs_here())
                .unwrap_or(Isa::Portable);
            best.min(LIMIT.get().copied().unwrap_or(Isa::Avx512))
        })
    }

    /// Caps what [`Isa::detect`] returns (to compare kernel sets on one CPU). Takes effect only
    /// before the first `detect`: false when it came too late.
    pub fn limit(to: Isa) -> bool {
        LIMIT.set(to).is_ok() && Self::detect() <= to
    }

    /// True when `--cpu-isa` capped the kernel sets (which also leaves AMX out).
    pub fn capped() -> bool {
        LIMIT.get().is_some()
    }

    /// True when this CPU has what these kernels need.
    pub fn runs_here(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Name for logs, `/info` and `bench --json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::Avx2Fma => "avx2+fma",
            Self::Portable => "portable",
        }
    }

    /// The kernel sets this CPU runs, for a test to compare; prints `SKIPPED` for each of the
    /// others, so that a test never passes silently for kernels it could not run.
    #[cfg(test)]
    pub(crate) fn here_saying_skipped() -> Vec<Isa> {
        for isa in Self::ALL.into_iter().filter(|i| !i.runs_here()) {
            println!("SKIPPED: the {} kernels (this CPU lacks them)", isa.name());
        }
        Self::ALL.into_iter().filter(|i| i.runs_here()).collect()
    }

    /// Parses a [`Self::name`] (`avx2` also names AVX2+FMA).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "avx512" => Some(Self::Avx512),
            "avx2" | "avx2+fma" => Some(Self::Avx2Fma),
            "portable" => Some(Self::Portable),
            _ => None,
        }
    }
}

/// What to do with each `C` tile once the products are summed.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Added per column (indexed by the global column; at least `panels * NR` long).
    pub bias: Option<&'a [f32]>,
    /// Clamp at zero.
    pub relu: bool,
}

impl Epilogue<'_> {
    /// Store the sums as they are.
    pub const NONE: Epilogue<'static> = Epilogue {
        bias: None,
        relu: false,
    };
}

/// `C[i, col] = Σ_p A[i, p] · B[p, col]` (then the epilogue) for rows `0..m` and the columns of
/// panels `panels`; columns at or beyond `n_valid` are not written.
///
/// `a` holds row `i` at `a[i * lda..][..k]`; `c` holds column `col` of row `i` at
/// `c[i * ldc + col - panels.start * NR]`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    isa: Isa,
    m: usize,
    a: &[f32],
    lda: usize,
    b: &PackedB,
    panels: std::ops::Range<usize>,
    c: &mut [f32],
    ldc: usize,
    n_valid: usize,
    epi: Epilogue<'_>,
) {
    gemm_k(isa, m, a, lda, b, 0..b.k, panels, c, ldc, n_valid, epi);
}

/// [`gemm`] over the reduction steps `ks` only: `Σ_{p ∈ ks}`. Row `i` of `a` still starts at
/// `a[i * lda]` and is read at columns `ks`. The direct conv uses it to skip the kernel rows
/// that fall on padding for a map's top and bottom rows of pixels.
#[allow(clippy::too_many_arguments)]
pub fn gemm_k(
    isa: Isa,
    m: usize,
    a: &[f32],
    lda: usize,
    b: &PackedB,
    ks: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    c: &mut [f32],
    ldc: usize,
    n_valid: usize,
    epi: Epilogue<'_>,
) {
    let k = b.k;
    if m == 0 || panels.is_empty() {
        return;
    }
    assert!(
        ks.start < ks.end && ks.end <= k,
        "gemm: bad reduction range"
    );
    assert!(
        lda >= ks.end && a.len() >= (m - 1) * lda + ks.end,
        "gemm: A too short"
    );
    assert!(panels.end <= b.panels(), "gemm: panel out of range");
    let n_valid = n_valid.min(b.n);
    let col0 = panels.start * NR;
    let width = (panels.end * NR).min(n_valid).saturating_sub(col0);
    assert!(c.len() >= (m - 1) * ldc + width, "gemm: C too short");
    if let Some(bias) = epi.bias {
        assert!(bias.len() >= panels.end * NR, "gemm: bias too short");
    }
    for k0 in ks.clone().step_by(KC) {
        let kn = KC.min(ks.end - k0);
        let last = k0 + kn == ks.end;
        let walk = Walk {
            m,
            a,
            lda,
            b,
            panels: panels.clone(),
            n_valid,
            k0,
            k_end: ks.end,
            accumulate: k0 > ks.start,
            bias: if last { epi.bias } else { None },
        };
        let relu = last && epi.relu;
        // Every tile the walk hands over addresses `rows` rows of A (`kn` values from column
        // `k0`, at stride `lda`), rows `k0..k0+kn` of `panels` whole panels of B, and `rows`
        // rows of `panels · NR` values at stride `ld` in C or the walk's scratch: the asserts
        // above bound them.
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => walk.tiles(c, ldc, MR512, 2, |t| {
                // SAFETY: the tile as above; AVX-512 was detected (an `Isa::Avx512` is made
                // only where it runs).
                unsafe { tile_avx512(t, kn, lda, relu) }
            }),
            _ => walk.tiles(c, ldc, MR, 1, |t| {
                debug_assert_eq!(t.panels, 1);
                // SAFETY: the tile as above; `micro` runs AVX2 only where it was detected.
                unsafe {
                    micro(
                        isa, t.rows, kn, t.a, lda, t.b[0], t.dst, t.ld, t.add, t.bias, relu,
                    )
                }
            }),
        }
    }
}

/// What [`gemm`] computes, for [`Walk::tiles`] to cut into micro-kernel tiles.
struct Walk<'a> {
    m: usize,
    a: &'a [f32],
    lda: usize,
    b: &'a PackedB,
    panels: std::ops::Range<usize>,
    n_valid: usize,
    /// First reduction step of this pass.
    k0: usize,
    /// The end of the reduction (the next pass starts at `k0 + KC` if that is before it).
    k_end: usize,
    /// Add to what C holds (a later pass), instead of overwriting it.
    accumulate: bool,
    bias: Option<&'a [f32]>,
}

/// One micro-kernel call: `rows` rows of A from `a`, `panels` panels of B from `b[0]` (and
/// `b[1]`), into `rows` rows of `panels · NR` values at `dst` (stride `ld`), added to what
/// `dst` holds when `add`.
struct Tile<'a> {
    rows: usize,
    panels: usize,
    a: *const f32,
    b: [*const f32; 2],
    dst: *mut f32,
    ld: usize,
    add: bool,
    bias: Option<&'a [f32]>,
    /// The B panels the walk reads next (as `b`), for the kernel to prefetch as it goes; set on
    /// the first row tile of each column of tiles only (the others find B in cache). Read by
    /// the AVX-512 kernel only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    next: Option<[*const f32; 2]>,
}

impl Walk<'_> {
    /// Calls `kernel` on tiles of up to `mr` rows × `np` (1 or 2) panels covering C, fewer
    /// panels at the end of the range. A tile with columns past `n_valid` is computed into
    /// scratch (holding C's valid columns first when accumulating) and only its valid columns
    /// are copied to C. `kernel` must fill every row and column of its tile.
    fn tiles(&self, c: &mut [f32], ldc: usize, mr: usize, np: usize, mut kernel: impl FnMut(Tile)) {
        debug_assert!((1..=2).contains(&np) && mr <= MR512.max(MR));
        let col0 = self.panels.start * NR;
        let mut tmp = [0f32; MR512 * 2 * NR];
        let mut j = self.panels.start;
        while j < self.panels.end {
            let panels = np.min(self.panels.end - j);
            let width = panels * NR;
            let cols = (self.n_valid.saturating_sub(j * NR)).min(width);
            if cols == 0 {
                break;
            }
            let b0 = self.b.panel(j)[self.k0 * NR..].as_ptr();
            let b1 = if panels == 2 {
                self.b.panel(j + 1)[self.k0 * NR..].as_ptr()
            } else {
                b0
            };
            let bias = self.bias.map(|bias| &bias[j * NR..j * NR + width]);
            // What comes after this column of tiles: the next panels of this pass, else the
            // first panels of the next pass. Its weights stream from memory while this column's
            // first tile computes, instead of after it.
            let next = if j + panels < self.panels.end {
                Some((j + panels, self.k0))
            } else if self.k0 + KC < self.k_end {
                Some((self.panels.start, self.k0 + KC))
            } else {
                None
            }
            .map(|(jn, k0)| {
                let first = self.b.panel(jn)[k0 * NR..].as_ptr();
                let second = if jn + 1 < self.panels.end && np == 2 {
                    self.b.panel(jn + 1)[k0 * NR..].as_ptr()
                } else {
                    first
                };
                [first, second]
            });
            let mut i = 0;
            while i < self.m {
                let rows = mr.min(self.m - i);
                let c_off = i * ldc + j * NR - col0;
                let (dst, ld) = if cols == width {
                    // SAFETY: rows `i..i+rows` of C hold `width` columns from `c_off` (asserted
                    // by `gemm_k`: C covers every valid column of the panels in every row).
                    (unsafe { c.as_mut_ptr().add(c_off) }, ldc)
                } else {
                    if self.accumulate {
                        for r in 0..rows {
                            tmp[r * width..][..cols].copy_from_slice(&c[c_off + r * ldc..][..cols]);
                        }
                    }
                    (tmp.as_mut_ptr(), width)
                };
                kernel(Tile {
                    rows,
                    panels,
                    // SAFETY: row `i < m` of A exists and has columns `k0..k_end` (asserted by
                    // `gemm_k`).
                    a: unsafe { self.a.as_ptr().add(i * self.lda + self.k0) },
                    b: [b0, b1],
                    dst,
                    ld,
                    add: self.accumulate,
                    bias,
                    next: if i == 0 { next } else { None },
                });
                if cols < width {
                    for r in 0..rows {
                        c[c_off + r * ldc..][..cols].copy_from_slice(&tmp[r * width..][..cols]);
                    }
                }
                i += rows;
            }
            j += panels;
        }
    }
}

/// One AVX-512 tile: up to [`MR512`] rows by one or two panels.
///
/// # Safety
/// The CPU must support AVX-512F; the tile as [`Tile`] says.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tile_avx512(t: Tile, k: usize, lda: usize, relu: bool) {
    let Tile {
        rows,
        panels,
        a,
        b: [b0, b1],
        dst,
        ld,
        add,
        bias,
        next,
    } = t;
    // One instantiation per row count, panel count and prefetch: `R` and `P` size the
    // accumulator array, so they must be constants.
    macro_rules! call {
        ($r:literal, $p:literal) => {
            match next {
                Some(pf) => {
                    micro_avx512::<$r, $p, true>(k, a, lda, b0, b1, dst, ld, add, bias, relu, pf)
                }
                None => micro_avx512::<$r, $p, false>(
                    k,
                    a,
                    lda,
                    b0,
                    b1,
                    dst,
                    ld,
                    add,
                    bias,
                    relu,
                    [b0, b1],
                ),
            }
        };
    }
    macro_rules! rows {
        ($p:literal) => {
            match rows {
                8 => call!(8, $p),
                7 => call!(7, $p),
                6 => call!(6, $p),
                5 => call!(5, $p),
                4 => call!(4, $p),
                3 => call!(3, $p),
                2 => call!(2, $p),
                _ => call!(1, $p),
            }
        };
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        if panels == 2 {
            rows!(2)
        } else {
            rows!(1)
        }
    }
}

/// AVX-512 micro-kernel: `R × (P·16)` accumulators in `R·P` ZMM registers, one broadcast of `A`
/// and `P` loads of `B` (one per panel) per step. Starts from what `c` holds when `add`. With
/// `PF`, each step also prefetches into L2 the same rows of the panels at `pf` (only addresses
/// are formed from them: a prefetch never faults, and nothing is read through them).
///
/// # Safety
/// The CPU must support AVX-512F. `a` addresses `R` rows of `k` values at stride `lda`; `b0` (and
/// `b1` when `P == 2`) a `k × NR` panel; `c` `R` rows of `P·NR` values at stride `ldc`; `bias`,
/// when given, `P·NR` values.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn micro_avx512<const R: usize, const P: usize, const PF: bool>(
    k: usize,
    a: *const f32,
    lda: usize,
    b0: *const f32,
    b1: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
    bias: Option<&[f32]>,
    relu: bool,
    pf: [*const f32; 2],
) {
    use std::arch::x86_64::*;
    let panels = [b0, b1];
    // SAFETY: every offset stays inside the regions the caller vouched for.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        if add {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                for (q, x) in acc_r.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(c.add(r * ldc + q * NR));
                }
            }
        }
        for p in 0..k {
            if PF {
                for &next in &pf[..P] {
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(p * NR).cast());
                }
            }
            let mut bv = [_mm512_setzero_ps(); P];
            for (q, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(panels[q].add(p * NR));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r * lda + p));
                for (x, &v) in acc_r.iter_mut().zip(&bv) {
                    *x = _mm512_fmadd_ps(av, v, *x);
                }
            }
        }
        let mut add = [_mm512_setzero_ps(); P];
        if let Some(bias) = bias {
            for (q, v) in add.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(bias.as_ptr().add(q * NR));
            }
        }
        let zero = _mm512_setzero_ps();
        for (r, acc_r) in acc.iter().enumerate() {
            for (q, (&x, &b)) in acc_r.iter().zip(&add).enumerate() {
                let mut y = _mm512_add_ps(x, b);
                if relu {
                    y = _mm512_max_ps(y, zero);
                }
                _mm512_storeu_ps(c.add(r * ldc + q * NR), y);
            }
        }
    }
}

/// One `rows × NR` tile (`rows ≤ MR`), added to what `c` holds when `add`.
///
/// # Safety
/// `a` must address `rows` rows of `k` values at stride `lda`, `b` a `k × NR` panel, `c` `rows`
/// rows of `NR` values at stride `ldc`.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn micro(
    isa: Isa,
    rows: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
    bias: Option<&[f32]>,
    relu: bool,
) {
    macro_rules! dispatch {
        ($f:ident) => {
            match rows {
                6 => $f::<6>(k, a, lda, b, c, ldc, add, bias, relu),
                5 => $f::<5>(k, a, lda, b, c, ldc, add, bias, relu),
                4 => $f::<4>(k, a, lda, b, c, ldc, add, bias, relu),
                3 => $f::<3>(k, a, lda, b, c, ldc, add, bias, relu),
                2 => $f::<2>(k, a, lda, b, c, ldc, add, bias, relu),
                _ => $f::<1>(k, a, lda, b, c, ldc, add, bias, relu),
            }
        };
    }
    // SAFETY: forwarded from the caller; the AVX2 kernel runs only when detected.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => dispatch!(micro_avx2),
            _ => dispatch!(micro_portable),
        }
    }
}

/// Portable micro-kernel: fixed-size accumulators the compiler keeps in vector registers.
///
/// # Safety
/// As [`micro`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn micro_portable<const R: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
    bias: Option<&[f32]>,
    relu: bool,
) {
    let mut acc = [[0f32; NR]; R];
    if add {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: row r of C has NR values (caller's contract).
            unsafe { std::ptr::copy_nonoverlapping(c.add(r * ldc), acc_r.as_mut_ptr(), NR) };
        }
    }
    for p in 0..k {
        // SAFETY: p < k, so the panel row and each A element are in bounds (caller's contract).
        let brow: &[f32; NR] = unsafe { &*(b.add(p * NR) as *const [f32; NR]) };
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // SAFETY: r < R rows of A and p < k columns, in bounds by the caller's contract.
            let av = unsafe { *a.add(r * lda + p) };
            for (x, &bv) in acc_r.iter_mut().zip(brow) {
                *x += av * bv;
            }
        }
    }
    for (r, acc_r) in acc.iter_mut().enumerate() {
        if let Some(bias) = bias {
            for (x, &bv) in acc_r.iter_mut().zip(bias) {
                *x += bv;
            }
        }
        if relu {
            for x in acc_r.iter_mut() {
                *x = x.max(0.0);
            }
        }
        // SAFETY: row r of C has NR values (caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(acc_r.as_ptr(), c.add(r * ldc), NR) };
    }
}

/// AVX2+FMA micro-kernel: `R × 16` accumulators in `2R` YMM registers, one broadcast of `A` and
/// two loads of `B` per step.
///
/// # Safety
/// As [`micro`], and the CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_avx2<const R: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
    bias: Option<&[f32]>,
    relu: bool,
) {
    use std::arch::x86_64::*;
    // SAFETY: every pointer offset stays inside the regions the caller vouched for.
    unsafe {
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        if add {
            for r in 0..R {
                lo[r] = _mm256_loadu_ps(c.add(r * ldc));
                hi[r] = _mm256_loadu_ps(c.add(r * ldc + 8));
            }
        }
        let mut rows = [a; R];
        for (r, row) in rows.iter_mut().enumerate() {
            *row = a.add(r * lda);
        }
        let mut bp = b;
        for _ in 0..k {
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            for r in 0..R {
                let av = _mm256_broadcast_ss(&*rows[r]);
                lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
                hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
                rows[r] = rows[r].add(1);
            }
            bp = bp.add(NR);
        }
        let (bias_lo, bias_hi) = match bias {
            Some(bias) => (
                _mm256_loadu_ps(bias.as_ptr()),
                _mm256_loadu_ps(bias.as_ptr().add(8)),
            ),
            None => (_mm256_setzero_ps(), _mm256_setzero_ps()),
        };
        let zero = _mm256_setzero_ps();
        for r in 0..R {
            let mut x0 = _mm256_add_ps(lo[r], bias_lo);
            let mut x1 = _mm256_add_ps(hi[r], bias_hi);
            if relu {
                x0 = _mm256_max_ps(x0, zero);
                x1 = _mm256_max_ps(x1, zero);
            }
            _mm256_storeu_ps(c.add(r * ldc), x0);
            _mm256_storeu_ps(c.add(r * ldc + 8), x1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn every_isa_matches_a_plain_product_with_ragged_edges() {
        for isa in Isa::here_saying_skipped() {
            for &(m, k, n) in &[
                (1, 1, 1),
                (7, 5, 17),
                (13, 33, 40),
                (6, 64, 16),
                (25, 9, 3),
                (9, 17, 48),
                (16, 7, 33),
                (17, 70, 80),
                // Longer than KC: passes that add to the first; a partial last panel.
                (10, 1100, 40),
                (3, 2 * KC, 17),
            ] {
                let a = values(m * k, 1);
                let bm = values(k * n, 2);
                let bias = values(n.div_ceil(NR) * NR, 3);
                let packed = PackedB::pack(k, n, |r, col| bm[r * n + col]);
                let mut set = PackedB::zeros(k, n);
                for r in 0..k {
                    for col in 0..n {
                        set.set(r, col, bm[r * n + col]);
                    }
                }
                assert_eq!(set.data[..], packed.data[..]);
                let want = reference(m, k, n, &a, &bm);
                let mut c = vec![f32::NAN; m * n];
                let epi = Epilogue {
                    bias: Some(&bias),
                    relu: true,
                };
                gemm(
                    isa,
                    m,
                    &a,
                    k,
                    &packed,
                    0..packed.panels(),
                    &mut c,
                    n,
                    n,
                    epi,
                );
                for i in 0..m {
                    for j in 0..n {
                        let w = (want[i * n + j] + bias[j]).max(0.0);
                        let got = c[i * n + j];
                        assert!(
                            (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{isa:?} {m}x{k}x{n} ({i},{j}): {got} vs {w}"
                        );
                    }
                }
                // A reduction range sums only its steps (and starts afresh: C is not added to).
                if k > 2 {
                    let ks = 1..k - 1;
                    let mut c3 = vec![f32::NAN; m * n];
                    gemm_k(
                        isa,
                        m,
                        &a,
                        k,
                        &packed,
                        ks.clone(),
                        0..packed.panels(),
                        &mut c3,
                        n,
                        n,
                        Epilogue::NONE,
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let w: f32 = ks.clone().map(|p| a[i * k + p] * bm[p * n + j]).sum();
                            let got = c3[i * n + j];
                            assert!(
                                (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "{isa:?} {m}x{k}x{n} k-range ({i},{j}): {got} vs {w}"
                            );
                        }
                    }
                }
                // A panel range writes only its own columns.
                if packed.panels() > 1 {
                    let mut c2 = vec![f32::NAN; m * (n - NR)];
                    let ld = n - NR;
                    gemm(
                        isa,
                        m,
                        &a,
                        k,
                        &packed,
                        1..packed.panels(),
                        &mut c2,
                        ld,
                        n,
                        Epilogue::NONE,
                    );
                    for i in 0..m {
                        for j in NR..n {
                            let w = want[i * n + j];
                            let got = c2[i * ld + j - NR];
                            assert!((got - w).abs() <= 1e-5 * (1.0 + w.abs()));
                        }
                    }
                }
            }
        }
    }
}
