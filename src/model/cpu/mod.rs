//! The fast CPU path, as candle custom ops.
//!
//! candle's own CPU conv re-lays out weights and activations on every call and runs a
//! half-speed GEMM (DiracNet-18 runs about 5× slower on it: the README's "CPU speed" table).
//! These ops instead keep activations in NHWC (channels innermost) from the stem to the head,
//! pack the weights once at load, fuse bias and ReLU into each conv, and run each 3×3 conv as
//! Winograd F(4×4, 3×3) or as a direct conv, whichever is faster for the call ([`Conv3x3`]):
//!
//! ```text
//! [N,3,224,224] NCHW ─ Im2colConv 7×7/2 (+bias, ReLU) ─ MaxPool 3/2 ─▶ [N,56,56,64] NHWC
//!   ─ Conv3x3 (+bias, ReLU) × blocks, MaxPool 2 between groups ─▶ [N,7,7,512] NHWC
//! ```
//!
//! Every conv's output goes through a ReLU before anything else reads it (the next block's
//! leading ReLU, or the head's; max-pooling commutes with ReLU), so each conv applies that ReLU
//! itself. Work is spread over the rayon pool (`--threads`); each work item owns a disjoint part
//! of the output.
//!
//! Files: `gemm.rs` (the packed GEMM and its micro-kernels: AVX-512 or AVX2+FMA chosen at run
//! time by [`Isa::detect`], and the portable twin every SIMD kernel is tested against),
//! `winograd.rs` (the F(4×4, 3×3) transforms), `direct.rs` (the 3×3 conv as im2col + GEMM),
//! `bf16.rs` (bf16 products with f32 sums, AVX512-BF16, for `--dtype bf16`: both 3×3
//! algorithms run their products on it), `amx.rs` (the same products on AMX tiles, and the
//! direct conv's tiles read straight from the input map),
//! this file (the ops: im2col stem, the 3×3 chooser, Winograd conv, max-pool). A new SIMD kernel
//! goes next to its portable twin, behind an [`Isa`] check, with a test that compares the two on
//! ragged shapes.

mod aligned;
mod amx;
pub mod bf16;
#[cfg(all(test, target_arch = "x86_64", target_os = "linux"))]
mod bochs;
mod direct;
pub mod gemm;
mod winograd;

use std::{cell::RefCell, ops::Range};

use candle_core::{backend::BackendStorage, bail, CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use bf16::{Kernel, PackedBf16};
pub use direct::{DirectConv, DirectConvBf16};
pub use gemm::Isa;
use gemm::{Epilogue, PackedB, NR};
#[cfg(target_arch = "x86_64")]
use winograd::{Avx512, V16};
use winograd::{Lanes, ALPHA, M, POINTS, V8};

/// The instruction set the fast path uses on this CPU.
pub fn isa() -> Isa {
    Isa::detect()
}

/// `wanted` if this CPU runs it (and `--cpu-isa` allows it), else the portable kernels.
fn supported(wanted: Isa) -> Isa {
    if wanted <= isa() {
        wanted
    } else {
        Isa::Portable
    }
}

thread_local! {
    /// Per-thread scratch (im2col rows, Winograd tiles), reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with at least `len` floats of this thread's scratch.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// The output buffer, shared by work items that write disjoint parts of it.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every work item writes only the output elements it owns (disjoint by construction).
unsafe impl Send for Shared {}
// SAFETY: as for `Send`: shared only among work items with disjoint parts of the output.
unsafe impl Sync for Shared {}

impl Shared {
    /// The buffer's start (a method, so that closures capture the whole `Shared`).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// The contiguous f32 data of a rank-4 input.
fn input4<'a>(
    name: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<(&'a [f32], [usize; 4])> {
    let CpuStorage::F32(data) = storage else {
        bail!("{name}: needs f32 input, got {:?}", storage.dtype());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{name}: needs a contiguous input");
    };
    let &[a, b, c, d] = layout.dims() else {
        bail!("{name}: needs a rank-4 input, got {:?}", layout.dims());
    };
    Ok((&data[start..end], [a, b, c, d]))
}

/// [`input4`] of an NHWC map that must have `c_in` channels.
fn input_nhwc<'a>(
    name: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
    c_in: usize,
) -> candle_core::Result<(&'a [f32], [usize; 4])> {
    let (x, dims) = input4(name, storage, layout)?;
    if dims[3] != c_in {
        bail!("{name}: input has {} channels, expected {c_in}", dims[3]);
    }
    Ok((x, dims))
}

/// Bias zero-padded to whole GEMM panels.
fn padded_bias(bias: &[f32]) -> Vec<f32> {
    let mut b = bias.to_vec();
    b.resize(bias.len().div_ceil(NR) * NR, 0.0);
    b
}

/// A convolution as im2col + GEMM, NCHW in, NHWC out, with bias and ReLU, and optionally the
/// max-pool after it: the 7×7/2 stem and its 3/2 pool. With the AVX-512 kernels, the windows
/// that lie inside the image are read from it in place (`implicit_row_avx512`: the same sums,
/// no copy); only those that cross its border are copied into rows.
///
/// Pooled in the same pass, the conv's output never exists whole: each work item computes the
/// conv rows under a band of pooled rows into its scratch and pools them (the one row two bands
/// share is computed twice, 1 in 15 at batch 1). At batch 32 that is 103 MB of DiracNet's peak
/// memory, written and read back, that is no longer there.
#[derive(Debug, Clone)]
pub struct Im2colConv {
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    weights: PackedB,
    bias: Vec<f32>,
    isa: Isa,
    pool: Option<MaxPool>,
    /// With the AVX-512 kernels, read the receptive fields of windows inside the image straight
    /// from it ([`implicit_row_avx512`]) instead of copying them into rows; off only to compare.
    implicit: bool,
}

impl Im2colConv {
    /// From PyTorch-layout weights `[c_out, c_in, k, k]` (flattened) and bias `[c_out]`.
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        c_out: usize,
        c_in: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Self {
        let k = c_in * kernel * kernel;
        assert_eq!(weight.len(), c_out * k, "Im2colConv: weight length");
        assert_eq!(bias.len(), c_out, "Im2colConv: bias length");
        Self {
            c_in,
            c_out,
            kernel,
            stride,
            pad,
            weights: PackedB::pack(k, c_out, |r, col| weight[col * k + r]),
            bias: padded_bias(bias),
            isa: isa(),
            pool: None,
            implicit: true,
        }
    }

    /// Copies every receptive field into rows (for tests).
    #[cfg(test)]
    fn with_copies(mut self) -> Self {
        self.implicit = false;
        self
    }

    /// Where each receptive-field value sits in an `[c, h, w]` image relative to its window's
    /// top-left pixel, in PyTorch's weight order; `None` unless the AVX-512 kernel reads the
    /// windows inside the image straight from it.
    fn offsets(&self, h: usize, w: usize) -> Option<Vec<usize>> {
        let kk = self.kernel;
        (self.implicit && self.isa == Isa::Avx512).then(|| {
            (0..self.c_in * kk * kk)
                .map(|i| (i / (kk * kk)) * h * w + (i / kk % kk) * w + i % kk)
                .collect()
        })
    }

    /// Max-pools the conv's output in the same pass.
    pub fn with_pool(mut self, pool: MaxPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Uses `isa`'s kernels when this CPU runs them (for tests and comparisons).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = supported(isa);
        self
    }

    fn out_side(&self, side: usize) -> usize {
        (side + 2 * self.pad).saturating_sub(self.kernel) / self.stride + 1
    }

    /// Bytes of packed weights.
    pub fn bytes(&self) -> usize {
        self.weights.bytes() + self.bias.len() * 4
    }
}

/// Output pixels `0..count` of one row of the stem's conv on AVX-512, without im2col: pixel
/// `i`'s receptive-field value `q` is `x[first + i·stride + offsets[q]]` (its window lies inside
/// the image). Runs of 8 pixels × 2 panels in 16 ZMM accumulators, one broadcast per pixel and
/// value, the products summed in the im2col GEMM's AVX-512 order (the same sums); bias and
/// ReLU, into `dst` (`count` rows of `c_out`).
///
/// # Safety
/// The CPU must support AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn implicit_row_avx512(
    x: &[f32],
    offsets: &[usize],
    first: usize,
    stride: usize,
    count: usize,
    weights: &PackedB,
    bias: &[f32],
    dst: &mut [f32],
    c_out: usize,
) {
    use std::arch::x86_64::*;
    const ROWS: usize = 8;
    let (Some(&last), true) = (offsets.last(), count > 0) else {
        return;
    };
    assert!(
        first + (count - 1) * stride + last < x.len(),
        "stem: window outside"
    );
    assert!(offsets.len() == weights.k() && dst.len() >= count * c_out);
    assert!(bias.len() >= weights.panels() * NR);
    let panels = weights.panels();
    let mut tmp = [0f32; ROWS * 2 * NR];
    for i0 in (0..count).step_by(ROWS) {
        let rows = ROWS.min(count - i0);
        let mut j = 0;
        while j < panels {
            let np = 2.min(panels - j);
            let b = [
                weights.panel(j).as_ptr(),
                weights.panel(j + np - 1).as_ptr(),
            ];
            let start = first + i0 * stride;
            // SAFETY: every read is `x[start + r·stride + offsets[q]]` with r < rows, at most
            // `first + (count − 1)·stride + last`, in bounds (asserted); the panels hold
            // `offsets.len()` rows of NR.
            let acc = unsafe {
                let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
                for (q, &off) in offsets.iter().enumerate() {
                    let b0 = _mm512_loadu_ps(b[0].add(q * NR));
                    let b1 = _mm512_loadu_ps(b[1].add(q * NR));
                    let a = x.as_ptr().add(start + off);
                    for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
                        let av = _mm512_set1_ps(*a.add(r * stride));
                        acc_r[0] = _mm512_fmadd_ps(av, b0, acc_r[0]);
                        if np == 2 {
                            acc_r[1] = _mm512_fmadd_ps(av, b1, acc_r[1]);
                        }
                    }
                }
                acc
            };
            let cols = (c_out - j * NR).min(np * NR);
            for (r, acc_r) in acc.iter().enumerate().take(rows) {
                for (q, &sum) in acc_r.iter().enumerate().take(np) {
                    // SAFETY: `bias` covers every panel (asserted); `tmp` holds 2·NR per row.
                    unsafe {
                        let y =
                            _mm512_add_ps(sum, _mm512_loadu_ps(bias.as_ptr().add((j + q) * NR)));
                        let y = _mm512_max_ps(y, _mm512_setzero_ps());
                        _mm512_storeu_ps(tmp.as_mut_ptr().add(r * 2 * NR + q * NR), y);
                    }
                }
                dst[(i0 + r) * c_out + j * NR..][..cols]
                    .copy_from_slice(&tmp[r * 2 * NR..][..cols]);
            }
            j += np;
        }
    }
}

impl CustomOp1 for Im2colConv {
    fn name(&self) -> &'static str {
        "im2col-conv"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, [n, c, h, w]) = input4(self.name(), storage, layout)?;
        if c != self.c_in || h + 2 * self.pad < self.kernel || w + 2 * self.pad < self.kernel {
            bail!(
                "{}: input {:?} does not fit the kernel",
                self.name(),
                [n, c, h, w]
            );
        }
        let (oh, ow) = (self.out_side(h), self.out_side(w));
        if let Some(pool) = self.pool {
            return self.pooled(x, [n, c, h, w], [oh, ow], pool);
        }
        let k = self.weights.k();
        let offsets = self.offsets(h, w);
        let mut out = vec![0f32; n * oh * ow * self.c_out];
        // One output row per work item: `ow` im2col rows, then one GEMM with bias and ReLU.
        out.par_chunks_mut(ow * self.c_out)
            .enumerate()
            .for_each(|(row, dst)| {
                let (img, oy) = (row / oh, row % oh);
                let image = &x[img * c * h * w..][..c * h * w];
                let offsets = offsets.as_deref();
                with_scratch(ow * k, |a| {
                    self.conv_row(image, h, w, oy, ow, offsets, a, dst)
                });
            });
        Ok((CpuStorage::F32(out), Shape::from((n, oh, ow, self.c_out))))
    }
}

impl Im2colConv {
    /// Conv output row `oy` of image `x` (`[c, h, w]`), with bias and ReLU, into `dst` (`ow ×
    /// c_out`): im2col rows into `a`, then one GEMM; with `offsets` ([`Self::offsets`]: AVX-512
    /// only), the windows that lie inside the image read straight from it instead.
    #[allow(clippy::too_many_arguments)]
    fn conv_row(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        oy: usize,
        ow: usize,
        offsets: Option<&[usize]>,
        a: &mut [f32],
        dst: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if let Some(offsets) = offsets {
            let (kk, s, p) = (self.kernel, self.stride, self.pad);
            // Output columns whose windows lie inside the image, on a row whose windows do.
            let inside = (oy * s >= p && oy * s - p + kk <= h)
                .then(|| p.div_ceil(s)..((w + p).saturating_sub(kk) / s + 1).min(ow))
                .filter(|cols| cols.start < cols.end);
            if let Some(cols) = inside {
                let first = (oy * s - p) * w + cols.start * s - p;
                // SAFETY: `offsets` exist only for `Isa::Avx512`, which runs here.
                unsafe {
                    implicit_row_avx512(
                        x,
                        offsets,
                        first,
                        s,
                        cols.len(),
                        &self.weights,
                        &self.bias,
                        &mut dst[cols.start * self.c_out..],
                        self.c_out,
                    )
                };
                for edge in [0..cols.start, cols.end..ow] {
                    self.copied_rows(x, h, w, oy, edge, a, dst);
                }
                return;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = offsets;
        self.copied_rows(x, h, w, oy, 0..ow, a, dst);
    }

    /// Output columns `cols` of conv row `oy` as im2col rows into `a`, then one GEMM, into their
    /// rows of `dst`.
    #[allow(clippy::too_many_arguments)]
    fn copied_rows(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        oy: usize,
        cols: Range<usize>,
        a: &mut [f32],
        dst: &mut [f32],
    ) {
        if cols.is_empty() {
            return;
        }
        let k = self.weights.k();
        self.im2col_row(x, h, w, oy, cols.clone(), a);
        gemm::gemm(
            self.isa,
            cols.len(),
            a,
            k,
            &self.weights,
            0..self.weights.panels(),
            &mut dst[cols.start * self.c_out..],
            self.c_out,
            self.c_out,
            Epilogue {
                bias: Some(&self.bias),
                relu: true,
            },
        );
    }

    /// The conv, then `pool`, in one pass: work items are bands of pooled rows (see the type).
    fn pooled(
        &self,
        x: &[f32],
        [n, c, h, w]: [usize; 4],
        [oh, ow]: [usize; 2],
        pool: MaxPool,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some([ph, pw]) = pool.out_size(oh, ow) else {
            bail!("{}: bad pooling window for a {oh}×{ow} map", self.name());
        };
        let (k, co) = (self.weights.k(), self.c_out);
        let offsets = self.offsets(h, w);
        // At least four bands per thread, at most 8 pooled rows each.
        let band = (n * ph)
            .div_ceil(4 * rayon::current_num_threads())
            .clamp(1, 8);
        let mut out = vec![0f32; n * ph * pw * co];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((n, ph, pw, co))));
        }
        out.par_chunks_mut(ph * pw * co)
            .enumerate()
            .flat_map(|(img, o)| {
                o.par_chunks_mut(band * pw * co)
                    .enumerate()
                    .map(move |(b, dst)| (img, b * band, dst))
            })
            .for_each(|(img, py0, dst)| {
                let py1 = py0 + dst.len() / (pw * co);
                // The conv rows under pooled rows py0..py1.
                let lo = (py0 * pool.stride).saturating_sub(pool.pad);
                let hi = ((py1 - 1) * pool.stride + pool.kernel)
                    .saturating_sub(pool.pad)
                    .min(oh);
                let image = &x[img * c * h * w..][..c * h * w];
                with_scratch((hi - lo) * ow * co + ow * k, |scratch| {
                    let (rows, a) = scratch.split_at_mut((hi - lo) * ow * co);
                    for (oy, row) in (lo..hi).zip(rows.chunks_exact_mut(ow * co)) {
                        self.conv_row(image, h, w, oy, ow, offsets.as_deref(), a, row);
                    }
                    for (py, d) in (py0..py1).zip(dst.chunks_exact_mut(pw * co)) {
                        // Window rows relative to `lo`: those before it lie outside the map.
                        let top = (py * pool.stride).wrapping_sub(pool.pad).wrapping_sub(lo);
                        pool.row(self.isa, rows, hi - lo, ow, co, top, d);
                    }
                });
            });
        Ok((CpuStorage::F32(out), Shape::from((n, ph, pw, co))))
    }

    /// The im2col rows of output row `oy`, columns `cols`, of one image `x` `[c, h, w]`: row
    /// `ox − cols.start` holds the receptive field in PyTorch's weight order (channel, ky, kx),
    /// zeros outside the image.
    fn im2col_row(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        oy: usize,
        cols: Range<usize>,
        a: &mut [f32],
    ) {
        let (kk, s, p) = (self.kernel, self.stride, self.pad);
        let k = self.c_in * kk * kk;
        for (ox, row) in cols.zip(a.chunks_exact_mut(k)) {
            for ci in 0..self.c_in {
                let plane = &x[ci * h * w..][..h * w];
                for ky in 0..kk {
                    let dst = &mut row[(ci * kk + ky) * kk..][..kk];
                    let iy = (oy * s + ky).wrapping_sub(p);
                    if iy >= h {
                        dst.fill(0.0);
                        continue;
                    }
                    let line = &plane[iy * w..][..w];
                    let x0 = (ox * s).wrapping_sub(p);
                    if x0 < w && x0 + kk <= w {
                        // Interior: no bounds to check; a fixed-size copy for the stem's 7×7.
                        match (dst.first_chunk_mut::<7>(), line[x0..].first_chunk::<7>()) {
                            (Some(d), Some(l)) if kk == 7 => *d = *l,
                            _ => {
                                for (d, &v) in dst.iter_mut().zip(&line[x0..x0 + kk]) {
                                    *d = v;
                                }
                            }
                        }
                        continue;
                    }
                    for (kx, d) in dst.iter_mut().enumerate() {
                        let ix = (ox * s + kx).wrapping_sub(p);
                        *d = if ix < w { line[ix] } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// How a 3×3 layer of the fast path computes: which algorithm (`--conv-impl
/// fast|winograd|direct`), and whether its products run in bf16 (`--dtype bf16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Algo {
    /// Winograd, direct, or each call's choice.
    pub pick: Pick,
    /// Products of bf16-rounded operands summed in f32 (the AVX512-BF16 kernel where the CPU
    /// has it); else f32 throughout.
    pub bf16: bool,
}

/// Which 3×3 algorithm a layer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Winograd F(4×4, 3×3) ([`WinogradConv`]) for every call.
    Winograd,
    /// The direct conv ([`DirectConv`], [`DirectConvBf16`]) for every call.
    Direct,
    /// Each call takes the faster of the two for its size and the kernel set
    /// ([`Conv3x3::direct_wins`]); both weight layouts are held for layers where the direct
    /// conv can win (`side` is the map side the layer will see), Winograd alone elsewhere.
    BySize {
        /// Height and width of the layer's input map.
        side: usize,
    },
}

/// A 3×3, stride-1, pad-1 convolution of the fast path, NHWC, with bias and ReLU: Winograd,
/// direct, or each call choosing by its size; in f32 or bf16.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    /// In f32 or bf16 (it holds its precision).
    winograd: Option<WinogradConv>,
    direct: Option<Direct>,
    isa: Isa,
    bf16: bool,
}

/// The direct conv in the layer's precision.
#[derive(Debug, Clone)]
enum Direct {
    F32(DirectConv),
    Bf16(DirectConvBf16),
}

/// When the f32 direct conv takes a call: at most `DIRECT_MAX_INPUT` transformed-input values
/// per Winograd point (tiles × `c_in`), and at least `DIRECT_MIN_PAIRS` channel pairs
/// (`c_in · c_out`). With few tiles, Winograd streams 36 weights per channel pair (37.7 MB at
/// 512 → 512) for little work, and its input transform, repeated by each work item that takes
/// a share of the output channels, outweighs the product; the direct conv reads a quarter of
/// the weights and copies its input instead. Measured on whole DiracNet-18 passes (AVX-512,
/// 2 threads; bench/README.md): direct is faster for 14×14 maps of 256 channels at batch 1 and
/// 7×7 maps of 512 at batches 1 and 2; Winograd for 7×7 × 512 at batch 4, 14×14 at batch 2,
/// and 28×28 maps (64 → 128 and 128 channels) at batch 1. Only the AVX-512 GEMM runs fast
/// enough for the direct conv's multiplies: with the AVX2 kernels, on the same CPU, DiracNet-18
/// at batch 1 is faster with Winograd everywhere (78.8 against 73.7 img/s).
const DIRECT_MAX_INPUT: usize = 16 * 256;
const DIRECT_MIN_PAIRS: usize = 128 * 256;

/// When the bf16 direct conv takes a call: at most this many output pixels (batch × height ×
/// width): 14×14 maps at batch 1, 7×7 maps up to batch 4. Its products run at twice the f32
/// rate, so the direct conv's 2.25× more multiplies cost less against Winograd's 4× more
/// weights than in f32, at any channel count. Whole DiracNet-18 passes in bf16 (AVX512-BF16,
/// 2 threads, img/s, bench/README.md): at batch 1, 192 / 190 with this bound against 157
/// with Winograd alone and 174 when 28×28 maps go direct too; at batch 8, 257 against 241
/// when 7×7 maps at batch 8 go direct too; batches 2 and 4 tie either way.
const DIRECT_BF16_MAX_PIXELS: usize = 196;

/// Whether bf16 layers run the direct conv alone, whatever their size: where the products run
/// on AMX tiles. Not yet measured (no AMX CPU was at hand): AMX multiplies about 8× faster than
/// AVX512-BF16, which leaves Winograd's f32 transforms (a sixth of a batch-1 pass already with
/// AVX512-BF16) outweighing the 2.25× multiplies it saves, and the AMX direct conv copies no
/// receptive fields (`DirectConvBf16::forward_tiles`). `--conv-impl winograd` compares.
/// [`Backend::conv_description`](crate::model::backend::Backend::conv_description) says so.
pub fn bf16_direct_only() -> bool {
    Kernel::detect() == Kernel::Amx
}

impl Conv3x3 {
    /// From PyTorch-layout weights `[c_out, c_in, 3, 3]` (flattened) and bias `[c_out]`.
    pub fn new(weight: &[f32], bias: &[f32], c_out: usize, c_in: usize, algo: Algo) -> Self {
        let bf16 = algo.bf16;
        let (winograd, direct) = match algo.pick {
            Pick::Winograd => (true, false),
            Pick::Direct => (false, true),
            Pick::BySize { .. } if bf16 && bf16_direct_only() => (false, true),
            Pick::BySize { side } => (
                true,
                Self::direct_wins(isa(), bf16, 1, side, side, c_in, c_out),
            ),
        };
        let winograd = winograd.then(|| {
            let op = WinogradConv::new(weight, bias, c_out, c_in);
            if bf16 {
                op.bf16()
            } else {
                op
            }
        });
        let direct = direct.then(|| {
            if bf16 {
                Direct::Bf16(DirectConvBf16::new(weight, bias, c_out, c_in))
            } else {
                Direct::F32(DirectConv::new(weight, bias, c_out, c_in))
            }
        });
        Self {
            winograd,
            direct,
            isa: isa(),
            bf16,
        }
    }

    /// Uses `isa`'s kernels when this CPU runs them (for tests and comparisons).
    pub fn with_isa(self, isa: Isa) -> Self {
        Self {
            winograd: self.winograd.map(|op| op.with_isa(isa)),
            direct: self.direct.map(|op| match op {
                Direct::F32(op) => Direct::F32(op.with_isa(isa)),
                bf16 => bf16,
            }),
            isa: supported(isa),
            bf16: self.bf16,
        }
    }

    /// True when, with `isa`'s kernels, the direct conv (in bf16 if `bf16`) is the faster for
    /// `n` maps of `h × w`, `c_in → c_out`.
    pub fn direct_wins(
        isa: Isa,
        bf16: bool,
        n: usize,
        h: usize,
        w: usize,
        c_in: usize,
        c_out: usize,
    ) -> bool {
        if bf16 {
            return n * h * w <= DIRECT_BF16_MAX_PIXELS;
        }
        isa == Isa::Avx512
            && n * h.div_ceil(M) * w.div_ceil(M) * c_in <= DIRECT_MAX_INPUT
            && c_in * c_out >= DIRECT_MIN_PAIRS
    }

    /// The algorithms held: `winograd`, `direct` or `winograd+direct`, then `-bf16` in bf16.
    pub fn algorithms(&self) -> &'static str {
        match (&self.winograd, &self.direct, self.bf16) {
            (Some(_), Some(_), false) => "winograd+direct",
            (Some(_), Some(_), true) => "winograd+direct-bf16",
            (None, _, false) => "direct",
            (None, _, true) => "direct-bf16",
            (Some(_), None, false) => "winograd",
            (Some(_), None, true) => "winograd-bf16",
        }
    }

    /// Bytes of packed weights, of every layout held.
    pub fn bytes(&self) -> usize {
        self.winograd.as_ref().map_or(0, WinogradConv::bytes)
            + self.direct.as_ref().map_or(0, |op| match op {
                Direct::F32(op) => op.bytes(),
                Direct::Bf16(op) => op.bytes(),
            })
    }
}

impl CustomOp1 for Conv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let direct = match (&self.winograd, &self.direct) {
            (Some(wino), Some(direct)) => {
                let &[n, h, w, c] = layout.dims() else {
                    bail!(
                        "{}: needs a rank-4 input, got {:?}",
                        self.name(),
                        layout.dims()
                    );
                };
                let c_out = match direct {
                    Direct::F32(op) => op.c_out(),
                    Direct::Bf16(op) => op.c_out(),
                };
                if !Self::direct_wins(self.isa, self.bf16, n, h, w, c, c_out) {
                    return wino.cpu_fwd(storage, layout);
                }
                direct
            }
            (Some(wino), None) => return wino.cpu_fwd(storage, layout),
            (None, Some(direct)) => direct,
            (None, None) => bail!("{}: no weights", self.name()),
        };
        match direct {
            Direct::F32(op) => op.cpu_fwd(storage, layout),
            Direct::Bf16(op) => op.cpu_fwd(storage, layout),
        }
    }
}

/// A 3×3, stride-1, pad-1 convolution, NHWC in and out, with bias and ReLU, as Winograd
/// F(4×4, 3×3) (see `winograd.rs`), its channel mixes in f32 or in bf16 ([`Self::bf16`]).
#[derive(Debug, Clone)]
pub struct WinogradConv {
    c_in: usize,
    /// `c_in` rounded up to 8 (the transforms' lane count); the extra rows of `u` are zero.
    c_in_pad: usize,
    c_out: usize,
    /// Transformed weights, one packed `c_in_pad × c_out` matrix per point.
    u: Points,
    bias: Vec<f32>,
    isa: Isa,
}

/// A Winograd conv's transformed weights, one matrix per point, and the precision of its
/// channel mixes.
#[derive(Debug, Clone)]
enum Points {
    /// f32 products ([`gemm::gemm`]).
    F32(Vec<PackedB>),
    /// Transformed inputs and weights rounded to bf16, products summed in f32
    /// ([`bf16::gemm_bf16`]) on `kernel`.
    Bf16 { u: Vec<PackedBf16>, kernel: Kernel },
}

/// One work item's channel mixes: its transformed input (`v`, one plane per point) and the
/// weights (`u`), in f32 or in bf16.
enum Mix<'a> {
    F32 {
        v: &'a mut [f32],
        u: &'a [PackedB],
    },
    Bf16 {
        v: &'a mut [u16],
        u: &'a [PackedBf16],
        kernel: Kernel,
    },
}

impl Points {
    fn panels(&self) -> usize {
        match self {
            Self::F32(u) => u[0].panels(),
            Self::Bf16 { u, .. } => u[0].panels(),
        }
    }
}

impl WinogradConv {
    /// From PyTorch-layout weights `[c_out, c_in, 3, 3]` (flattened) and bias `[c_out]`.
    pub fn new(weight: &[f32], bias: &[f32], c_out: usize, c_in: usize) -> Self {
        assert_eq!(
            weight.len(),
            c_out * c_in * 9,
            "WinogradConv: weight length"
        );
        assert_eq!(bias.len(), c_out, "WinogradConv: bias length");
        let c_in_pad = c_in.div_ceil(8) * 8;
        // One kernel at a time (a table of all of them in f64 would be 75 MB for 512 → 512).
        let mut u: Vec<PackedB> = (0..POINTS)
            .map(|_| PackedB::zeros(c_in_pad, c_out))
            .collect();
        for (i, g) in weight.chunks_exact(9).enumerate() {
            let (co, ci) = (i / c_in, i % c_in);
            let t = winograd::weight_2d(std::array::from_fn(|y| {
                std::array::from_fn(|x| f64::from(g[y * 3 + x]))
            }));
            for (p, &value) in t.iter().flatten().enumerate() {
                u[p].set(ci, co, value as f32);
            }
        }
        Self {
            c_in,
            c_in_pad,
            c_out,
            u: Points::F32(u),
            bias: padded_bias(bias),
            isa: isa(),
        }
    }

    /// The same conv with its channel mixes in bf16 (`--dtype bf16`): the transformed weights
    /// rounded to bf16 once here, each tile's transformed input as it is made; sums, the
    /// output transform, bias and ReLU in f32. On the AVX512-BF16 kernel where the CPU has it.
    pub fn bf16(self) -> Self {
        let u = match self.u {
            Points::F32(u) => u
                .into_iter()
                .map(|p| PackedBf16::pack(p.k(), p.n(), |row, col| p.get(row, col)))
                .collect(),
            Points::Bf16 { u, .. } => u,
        };
        Self {
            u: Points::Bf16 {
                u,
                kernel: Kernel::detect(),
            },
            ..self
        }
    }

    /// Uses `isa`'s kernels when this CPU runs them (for tests and comparisons); in bf16,
    /// the portable product unless `isa` is AVX-512.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = supported(isa);
        if let (Points::Bf16 { kernel, .. }, false) = (&mut self.u, self.isa == Isa::Avx512) {
            *kernel = Kernel::Portable;
        }
        self
    }

    /// Bytes of packed weights.
    pub fn bytes(&self) -> usize {
        let u = match &self.u {
            Points::F32(u) => u.iter().map(PackedB::bytes).sum::<usize>(),
            Points::Bf16 { u, .. } => u.iter().map(PackedBf16::bytes).sum(),
        };
        u + self.bias.len() * 4
    }
}

/// The most tiles per Winograd block: a block's transformed input for one point (block ×
/// `c_in_pad`) should stay in L2 while the GEMM sweeps every weight panel over it; bigger
/// blocks reuse each weight more often.
fn winograd_block_cap(c_in_pad: usize) -> usize {
    (48 * 1024 / c_in_pad).clamp(24, 144)
}

/// Floats from one Winograd point's plane (`len` floats) to the next: `len` rounded up to
/// whole 4 KiB pages, plus one cache line. A tile's 36 transformed values go to 36 planes; at a
/// plain stride that is a multiple of 4 KiB (144 tiles × 64 channels: 36 KiB) every one of them
/// maps to the same L1 set, and the 12 ways of a set thrash. Skewed by a line per plane, they
/// spread over 36 sets.
fn point_stride(len: usize) -> usize {
    len.div_ceil(1024) * 1024 + 16
}

/// How a conv layer's work is cut: tiles per block, and output panels per work item.
#[derive(Debug, Clone, Copy)]
struct Plan {
    tiles: usize,
    panels: usize,
    block: usize,
    blocks: usize,
    panels_per_item: usize,
    chunks: usize,
}

impl Plan {
    /// Cuts `tiles` tiles × `panels` output panels into work items: blocks of tiles (each
    /// streams the weights of its panels) × chunks of panels (each transforms its tiles' input).
    /// Picks the cut with the least traffic (every block reads the weights once; every chunk
    /// prepares the input once) among those with enough items for every thread and blocks of
    /// at most `cap` tiles (or rows).
    fn new(tiles: usize, cap: usize, panel_count: usize, threads: usize) -> Self {
        let cap = cap.max(1);
        let (t, panels) = (tiles.max(1), panel_count.max(1));
        let want = 2 * threads.max(1);
        let fewest = t.div_ceil(cap);
        let (mut best_cost, mut best) = (usize::MAX, (fewest, 1));
        for blocks in fewest..=t.min(fewest.max(want)) {
            let chunks = want.div_ceil(blocks).clamp(1, panels);
            // Floats moved per point and input channel: weights once per block, the input
            // transform once per chunk.
            let cost = blocks * panels * NR + chunks * t;
            if cost < best_cost {
                (best_cost, best) = (cost, (blocks, chunks));
            }
        }
        let block = t.div_ceil(best.0);
        let blocks = tiles.div_ceil(block);
        let panels_per_item = panels.div_ceil(best.1);
        let chunks = panels.div_ceil(panels_per_item);
        Self {
            tiles,
            panels: panel_count,
            block,
            blocks,
            panels_per_item,
            chunks,
        }
    }

    /// Every work item, in parallel: its tiles (or rows) and its output panels.
    fn items(self) -> impl ParallelIterator<Item = (Range<usize>, Range<usize>)> {
        (0..self.blocks * self.chunks)
            .into_par_iter()
            .map(move |item| {
                let t0 = item / self.chunks * self.block;
                let p0 = item % self.chunks * self.panels_per_item;
                (
                    t0..(t0 + self.block).min(self.tiles),
                    p0..(p0 + self.panels_per_item).min(self.panels),
                )
            })
    }
}

impl CustomOp1 for WinogradConv {
    fn name(&self) -> &'static str {
        "winograd-conv3x3"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, [n, h, w, _]) = input_nhwc(self.name(), storage, layout, self.c_in)?;
        let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
        let panels = self.u.panels();
        let plan = Plan::new(
            n * th * tw,
            winograd_block_cap(self.c_in_pad),
            panels,
            rayon::current_num_threads(),
        );
        let mut out = vec![0f32; n * h * w * self.c_out];
        let shared = Shared(out.as_mut_ptr());
        let isa = self.isa;
        #[cfg(target_arch = "x86_64")]
        let avx512 = Avx512::detect();
        #[cfg(not(target_arch = "x86_64"))]
        let avx512: Option<()> = None;
        let geometry = Geometry { h, w, th, tw };
        let out_len = out.len();
        plan.items().for_each(|(tiles, panels)| {
            let (t0, tn, p0, p1) = (tiles.start, tiles.len(), panels.start, panels.end);
            let len = POINTS
                * (self.input_stride(tn * self.c_in_pad) + point_stride(tn * (p1 - p0) * NR));
            with_scratch(len, |scratch| match (isa, avx512) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the proof shows AVX-512F, AVX2 and FMA.
                (Isa::Avx512, Some(proof)) => unsafe {
                    self.item_avx512(proof, x, shared, out_len, geometry, t0, tn, p0..p1, scratch)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2 and FMA were detected (an `Isa` above portable is made only
                // where it runs).
                (Isa::Avx2Fma | Isa::Avx512, _) => unsafe {
                    self.item_avx2(x, shared, out_len, geometry, t0, tn, p0..p1, scratch)
                },
                _ => self.item::<V8>(
                    (),
                    isa,
                    x,
                    shared,
                    out_len,
                    geometry,
                    t0,
                    tn,
                    p0..p1,
                    scratch,
                ),
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, self.c_out))))
    }
}

/// Map and tile-grid sizes of one Winograd call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

impl WinogradConv {
    /// Floats of scratch from one point's transformed input (`len` values) to the next: in
    /// bf16, two values to a float.
    fn input_stride(&self, len: usize) -> usize {
        match self.u {
            Points::F32(_) => point_stride(len),
            Points::Bf16 { .. } => point_stride(len.div_ceil(2)),
        }
    }

    /// [`Self::item`] compiled for AVX-512, the transforms 16 channels wide.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, AVX2 and FMA (which `proof` shows).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn item_avx512(
        &self,
        proof: Avx512,
        x: &[f32],
        out: Shared,
        out_len: usize,
        g: Geometry,
        t0: usize,
        tn: usize,
        panels: std::ops::Range<usize>,
        scratch: &mut [f32],
    ) {
        self.item::<V16>(
            proof,
            Isa::Avx512,
            x,
            out,
            out_len,
            g,
            t0,
            tn,
            panels,
            scratch,
        )
    }

    /// [`Self::item`] compiled for AVX2+FMA, the transforms 8 channels wide.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn item_avx2(
        &self,
        x: &[f32],
        out: Shared,
        out_len: usize,
        g: Geometry,
        t0: usize,
        tn: usize,
        panels: std::ops::Range<usize>,
        scratch: &mut [f32],
    ) {
        self.item::<V8>(
            (),
            Isa::Avx2Fma,
            x,
            out,
            out_len,
            g,
            t0,
            tn,
            panels,
            scratch,
        )
    }

    /// One work item: tiles `t0..t0+tn`, output channels of `panels`, written through `out`
    /// (`out_len` floats): the items of one call own disjoint (tile, channel) parts of it.
    /// `scratch` holds the transformed tiles and their products. The transforms run `V::N`
    /// channels at a time. No closures in here: they would not inherit the target features of
    /// [`Self::item_avx512`] and [`Self::item_avx2`].
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn item<V: Lanes>(
        &self,
        proof: V::Proof,
        isa: Isa,
        x: &[f32],
        out: Shared,
        out_len: usize,
        g: Geometry,
        t0: usize,
        tn: usize,
        panels: std::ops::Range<usize>,
        scratch: &mut [f32],
    ) {
        let (cp, c) = (self.c_in_pad, self.c_in);
        let col0 = panels.start * NR;
        let cols = (panels.end * NR).min(self.c_out) - col0;
        let cw = (panels.end - panels.start) * NR;
        // Each point's plane starts one cache line further along the cache sets (see
        // `point_stride`), so the 36 planes a tile is scattered to do not all map to one set.
        let (vs, ms) = (self.input_stride(tn * cp), point_stride(tn * cw));
        let v_len = POINTS * vs;
        {
            let (v, m) = scratch[..v_len + POINTS * ms].split_at_mut(v_len);
            let mut mix = match &self.u {
                Points::F32(u) => Mix::F32 { v, u },
                // In bf16 the transformed input takes half the floats: the same memory as
                // `u16`s, plane `p` at `2 · p · vs`.
                Points::Bf16 { u, kernel } => Mix::Bf16 {
                    // SAFETY: `u16` has no stricter alignment than `f32`, any bits are valid
                    // for both, and the `u16` view replaces the `f32` one (moved in).
                    v: unsafe {
                        std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u16>(), 2 * v.len())
                    },
                    u,
                    kernel: *kernel,
                },
            };
            // 1. Input transform: V[p][tile][channel].
            let lanes_n = V::N;
            let mut d = [[V::zero(proof); ALPHA]; ALPHA];
            let mut t = d;
            for ti in 0..tn {
                let (img, ty, tx) = g.tile(t0 + ti);
                let (y0, x0) = ((ty * M).wrapping_sub(1), (tx * M).wrapping_sub(1));
                let inside =
                    ty > 0 && tx > 0 && ty * M + ALPHA - 1 <= g.h && tx * M + ALPHA - 1 <= g.w;
                for cc in (0..cp).step_by(lanes_n) {
                    let lanes = lanes_n.min(c - cc);
                    if inside && lanes == lanes_n {
                        for (dy, row) in d.iter_mut().enumerate() {
                            let base = ((img * g.h + y0 + dy) * g.w + x0) * c + cc;
                            for (dx, v) in row.iter_mut().enumerate() {
                                *v = V::load(proof, &x[base + dx * c..][..lanes_n]);
                            }
                        }
                    } else {
                        for (dy, row) in d.iter_mut().enumerate() {
                            let iy = y0.wrapping_add(dy);
                            for (dx, v) in row.iter_mut().enumerate() {
                                let ix = x0.wrapping_add(dx);
                                *v = if iy < g.h && ix < g.w {
                                    let at = ((img * g.h + iy) * g.w + ix) * c + cc;
                                    V::load(proof, &x[at..][..lanes])
                                } else {
                                    V::zero(proof)
                                };
                            }
                        }
                    }
                    winograd::input_2d(&d, &mut t);
                    // Up to the padded width (a multiple of 8, not always of `V::N`).
                    let width = lanes_n.min(cp - cc);
                    match &mut mix {
                        Mix::F32 { v, .. } => {
                            for (p, val) in t.iter().flatten().enumerate() {
                                val.store(&mut v[p * vs + ti * cp + cc..][..width]);
                            }
                        }
                        Mix::Bf16 { v, .. } => {
                            for (p, val) in t.iter().flatten().enumerate() {
                                val.store_bf16(&mut v[2 * p * vs + ti * cp + cc..][..width]);
                            }
                        }
                    }
                }
            }
            // 2. One channel mix per point: M[p] = V[p] · U[p].
            for p in 0..POINTS {
                let m = &mut m[p * ms..][..tn * cw];
                match &mix {
                    Mix::F32 { v, u } => gemm::gemm(
                        isa,
                        tn,
                        &v[p * vs..][..tn * cp],
                        cp,
                        &u[p],
                        panels.clone(),
                        m,
                        cw,
                        usize::MAX,
                        Epilogue::NONE,
                    ),
                    Mix::Bf16 { v, u, kernel } => bf16::gemm_bf16(
                        *kernel,
                        tn,
                        &v[2 * p * vs..][..tn * cp],
                        cp,
                        &u[p],
                        panels.clone(),
                        m,
                        cw,
                        Epilogue::NONE,
                    ),
                }
            }
            // 3. Output transform, bias, ReLU, into the NHWC output.
            // `cw` and the padded bias are whole panels of 16 columns: full vectors load.
            let mut prods = [[V::zero(proof); ALPHA]; ALPHA];
            let mut y = [[V::zero(proof); M]; M];
            for ti in 0..tn {
                let (img, ty, tx) = g.tile(t0 + ti);
                for co in (0..cols).step_by(lanes_n) {
                    let lanes = lanes_n.min(cols - co);
                    for (i, row) in prods.iter_mut().enumerate() {
                        for (j, v) in row.iter_mut().enumerate() {
                            let at = (i * ALPHA + j) * ms + ti * cw + co;
                            *v = V::load(proof, &m[at..][..lanes_n]);
                        }
                    }
                    winograd::output_2d(&prods, &mut y);
                    let bias = V::load(proof, &self.bias[col0 + co..][..lanes_n]);
                    for (dy, row) in y.iter().enumerate() {
                        let oy = ty * M + dy;
                        if oy >= g.h {
                            break;
                        }
                        for (dx, val) in row.iter().enumerate() {
                            let ox = tx * M + dx;
                            if ox >= g.w {
                                break;
                            }
                            let at = ((img * g.h + oy) * g.w + ox) * self.c_out + col0 + co;
                            assert!(at + lanes <= out_len);
                            // SAFETY: in bounds (checked), and these pixels and channels belong
                            // to this work item alone (see `cpu_fwd`).
                            let dst =
                                unsafe { std::slice::from_raw_parts_mut(out.0.add(at), lanes) };
                            (*val + bias).relu().store(dst);
                        }
                    }
                }
            }
        }
    }
}

impl Geometry {
    /// Image, tile row and tile column of tile `t`.
    #[inline(always)]
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        let per_image = self.th * self.tw;
        (t / per_image, (t % per_image) / self.tw, t % self.tw)
    }
}

/// Max-pooling over NHWC, PyTorch semantics (padding never wins).
#[derive(Debug, Clone, Copy)]
pub struct MaxPool {
    /// Window side.
    pub kernel: usize,
    /// Step.
    pub stride: usize,
    /// Implicit padding on each side.
    pub pad: usize,
}

impl MaxPool {
    /// Output height and width for an `h × w` input; `None` for a window that does not fit
    /// (or a zero stride, or padding as wide as the window).
    fn out_size(&self, h: usize, w: usize) -> Option<[usize; 2]> {
        let (k, s, p) = (self.kernel, self.stride, self.pad);
        if h + 2 * p < k || w + 2 * p < k || s == 0 || p >= k {
            return None;
        }
        Some([(h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1])
    }

    /// One output row into `dst` (`[ow, c]`) from `x` (`[h, w, c]`): the window's rows are
    /// `top..top + kernel` (wrapping: rows at or past `h` lie outside and are skipped).
    /// Compiled for `isa` (the same code: the compiler vectorises the channel loop as wide as
    /// the kernel set allows).
    #[allow(clippy::too_many_arguments)]
    fn row(&self, isa: Isa, x: &[f32], h: usize, w: usize, c: usize, top: usize, dst: &mut [f32]) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: an `Isa::Avx512` is made only where AVX-512F runs.
            Isa::Avx512 => unsafe { self.row_avx512(x, h, w, c, top, dst) },
            _ => self.row_portable(x, h, w, c, top, dst),
        }
    }

    /// [`Self::row_portable`] compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn row_avx512(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        c: usize,
        top: usize,
        dst: &mut [f32],
    ) {
        self.row_portable(x, h, w, c, top, dst)
    }

    #[inline(always)]
    fn row_portable(&self, x: &[f32], h: usize, w: usize, c: usize, top: usize, dst: &mut [f32]) {
        let (k, s, p) = (self.kernel, self.stride, self.pad);
        for (ox, d) in dst.chunks_exact_mut(c).enumerate() {
            d.fill(f32::NEG_INFINITY);
            for ky in 0..k {
                let iy = top.wrapping_add(ky);
                if iy >= h {
                    continue;
                }
                for kx in 0..k {
                    let ix = (ox * s + kx).wrapping_sub(p);
                    if ix >= w {
                        continue;
                    }
                    let src = &x[(iy * w + ix) * c..][..c];
                    for (a, &b) in d.iter_mut().zip(src) {
                        // NaN propagates, as in PyTorch.
                        *a = if b > *a || b.is_nan() { b } else { *a };
                    }
                }
            }
        }
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool-nhwc"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, [n, h, w, c]) = input4(self.name(), storage, layout)?;
        let Some([oh, ow]) = self.out_size(h, w) else {
            bail!("{}: bad window for input {:?}", self.name(), [n, h, w, c]);
        };
        let isa = isa();
        let mut out = vec![0f32; n * oh * ow * c];
        out.par_chunks_mut(ow * c)
            .enumerate()
            .for_each(|(row, dst)| {
                let (img, oy) = (row / oh, row % oh);
                let top = (oy * self.stride).wrapping_sub(self.pad);
                self.row(isa, &x[img * h * w * c..][..h * w * c], h, w, c, top, dst);
            });
        Ok((CpuStorage::F32(out), Shape::from((n, oh, ow, c))))
    }
}

/// The average over the whole map of an NHWC input, `[N, H, W, C]` → `[N, C]`: the head's
/// pooling. Sums each channel over the pixels in order, in f32, then divides by their count
/// (candle's `mean` over the two spatial dims of NHWC took 0.15 ms at batch 1 on a 7×7 × 512
/// map, a thirtieth of a bf16 DiracNet-18 pass; this takes a few µs). Images in parallel.
#[derive(Debug, Clone, Copy)]
pub struct GlobalAvgPool;

impl CustomOp1 for GlobalAvgPool {
    fn name(&self) -> &'static str {
        "global-avg-pool-nhwc"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, [n, h, w, c]) = input4(self.name(), storage, layout)?;
        let pixels = h * w;
        if pixels == 0 {
            bail!("{}: empty map {:?}", self.name(), [n, h, w, c]);
        }
        let mut out = vec![0f32; n * c];
        let image = |(img, dst): (usize, &mut [f32])| {
            for px in x[img * pixels * c..][..pixels * c].chunks_exact(c) {
                for (d, &v) in dst.iter_mut().zip(px) {
                    *d += v;
                }
            }
            for d in dst.iter_mut() {
                *d /= pixels as f32;
            }
        };
        if c > 0 {
            if n > 1 {
                out.par_chunks_mut(c).enumerate().for_each(image);
            } else {
                out.chunks_mut(c).enumerate().for_each(image);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    pub(super) fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                (((i as u32 ^ seed).wrapping_mul(2654435761) >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Layers `(n, c_in, c_out, h, w)` for the AMX direct conv: grids of exactly one tile
    /// (4 × (2 + 2)) and of a tile and a bit; maps narrower than the grid's padding; several
    /// images, so that work items span images; 32 and 64 channels in (one and two steps per
    /// tap); channels out not a multiple of 16 or 32.
    pub(super) const AMX_CONV_SHAPES: [(usize, usize, usize, usize, usize); 5] = [
        (1, 32, 16, 4, 2),
        (2, 32, 17, 5, 6),
        (3, 64, 40, 3, 5),
        (1, 64, 48, 7, 7),
        (2, 32, 33, 1, 14),
    ];

    /// Products `(m, k, n, first panel)` for the AMX driver: exactly one tile, whole and
    /// partial 32-deep steps, a last row block moved back over rows already done, a lone last
    /// panel, a range of panels not from 0, partial last panels.
    pub(super) const AMX_GEMM_SHAPES: [(usize, usize, usize, usize); 5] = [
        (16, 32, 16, 0),
        (17, 33, 40, 0),
        (40, 150, 40, 0),
        (33, 70, 49, 1),
        (50, 301, 80, 2),
    ];

    /// A conv's test case: the input `[n, ci, h, w]`, weights `[co, ci, k, k]` and bias `[co]`,
    /// from [`values`] with seeds `seed`, `seed + 1` and `seed + 2`.
    pub(super) fn conv_case(
        (n, ci, co, h, w): (usize, usize, usize, usize, usize),
        k: usize,
        seed: u32,
    ) -> (Tensor, Vec<f32>, Vec<f32>) {
        let x = values(n * ci * h * w, seed);
        let x = Tensor::from_vec(x, (n, ci, h, w), &Device::Cpu).unwrap();
        (x, values(co * ci * k * k, seed + 1), values(co, seed + 2))
    }

    /// candle's conv (NCHW) as the reference, bias and ReLU applied after.
    fn reference(
        x: &Tensor,
        w: &[f32],
        b: &[f32],
        shape: (usize, usize, usize),
        stride: usize,
        pad: usize,
    ) -> Tensor {
        let (co, ci, k) = shape;
        let wt = Tensor::from_vec(w.to_vec(), (co, ci, k, k), &Device::Cpu).unwrap();
        let bt = Tensor::from_vec(b.to_vec(), (1, co, 1, 1), &Device::Cpu).unwrap();
        x.conv2d(&wt, pad, stride, 1, 1)
            .unwrap()
            .broadcast_add(&bt)
            .unwrap()
            .relu()
            .unwrap()
    }

    /// `op` (NHWC in and out) on the NCHW `x`, the result back in NCHW, to compare with
    /// [`reference`].
    fn on_nhwc(x: &Tensor, op: &impl CustomOp1) -> Tensor {
        x.permute((0, 2, 3, 1))
            .unwrap()
            .contiguous()
            .unwrap()
            .apply_op1_no_bwd(op)
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap()
    }

    fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-6);
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            / scale
    }

    #[test]
    fn winograd_matches_candle_conv_on_ragged_shapes() {
        let isas = Isa::here_saying_skipped();
        // Odd sizes: partial tiles, channels not a multiple of 8 or 16, odd panel counts (48
        // channels: a pair of panels and one alone), two images.
        for &(n, ci, co, h, w) in &[
            (2, 3, 5, 7, 9),
            (1, 16, 32, 8, 8),
            (1, 20, 17, 5, 13),
            (3, 24, 48, 9, 6),
        ] {
            let (x, wv, bv) = conv_case((n, ci, co, h, w), 3, 1);
            let want = reference(&x, &wv, &bv, (co, ci, 3), 1, 1);
            for &isa in &isas {
                let op = WinogradConv::new(&wv, &bv, co, ci).with_isa(isa);
                let got = on_nhwc(&x, &op);
                let err = max_rel_err(&got, &want);
                assert!(err < 1e-5, "{isa:?} {n}x{ci}->{co} {h}x{w}: rel err {err}");
            }
        }
    }

    #[test]
    fn direct_conv_matches_candle_conv_on_ragged_shapes() {
        let isas = Isa::here_saying_skipped();
        // Maps of one pixel and one row, channels not a multiple of 8 or 16, odd panel counts,
        // several images (work items across images), and 9·c_in = 603 > KC (two reduction
        // passes, the second adding to the first).
        for &(n, ci, co, h, w) in &[
            (2, 3, 5, 7, 9),
            (1, 16, 32, 1, 1),
            (3, 20, 17, 1, 13),
            (2, 24, 48, 9, 6),
            (1, 67, 40, 5, 4),
        ] {
            let (x, wv, bv) = conv_case((n, ci, co, h, w), 3, 8);
            let want = reference(&x, &wv, &bv, (co, ci, 3), 1, 1);
            for &isa in &isas {
                let op = DirectConv::new(&wv, &bv, co, ci).with_isa(isa);
                let got = on_nhwc(&x, &op);
                let err = max_rel_err(&got, &want);
                assert!(err < 1e-6, "{isa:?} {n}x{ci}->{co} {h}x{w}: rel err {err}");
            }
        }
    }

    #[test]
    fn bf16_convs_stay_within_bf16_rounding_of_candle_conv_and_kernels_agree() {
        let avx512 = bf16::avx512_bf16() && Isa::Avx512.runs_here();
        if !avx512 {
            println!("SKIPPED: the AVX512-BF16 kernels (this CPU lacks avx512_bf16)");
        }
        // Partial tiles and row blocks, channels not a multiple of 8, 16 or 2 (odd pairs),
        // maps of one pixel, several images.
        for &(n, ci, co, h, w) in &[
            (2, 3, 5, 7, 9),
            (1, 16, 32, 1, 1),
            (3, 21, 17, 4, 13),
            (2, 40, 48, 9, 6),
        ] {
            let (x, wv, bv) = conv_case((n, ci, co, h, w), 3, 18);
            let want = reference(&x, &wv, &bv, (co, ci, 3), 1, 1);
            let direct = DirectConvBf16::new(&wv, &bv, co, ci);
            let wino = WinogradConv::new(&wv, &bv, co, ci).bf16();
            // The portable twins: the scalar product, and (Winograd) the 8-lane transforms.
            let portable = [
                on_nhwc(&x, &direct.clone().portable()),
                on_nhwc(&x, &wino.clone().with_isa(Isa::Portable)),
            ];
            let shape = format!("{n}x{ci}->{co} {h}x{w}");
            for (what, got) in ["direct", "winograd"].iter().zip(&portable) {
                // Inputs and weights rounded to 8 bits of mantissa: up to 2^-8 relative each,
                // mostly cancelling over the sum (seen: 1.8e-3 to 2.4e-3). Winograd rounds the
                // transformed values instead, which its output transform sums with weights up
                // to 8 into values far smaller (seen: 4.3e-3 to 7.1e-2 on these few channels;
                // over whole networks, logits stay within 1.5 %: `tests/weights.rs`).
                let err = max_rel_err(got, &want);
                let bound = if *what == "direct" { 1e-2 } else { 1e-1 };
                assert!(err < bound, "{what} {shape}: rel err {err}");
                assert!(
                    err > 0.0,
                    "{what}: bf16 rounding left no trace: not the bf16 path?"
                );
            }
            if avx512 {
                // The AVX512-BF16 kernels against their twins: the same roundings, the same
                // sums in the same order (equal to the bit on the CPUs tried; 1e-6 allows a
                // CPU that rounds its products' sums differently).
                let fast = [on_nhwc(&x, &direct), on_nhwc(&x, &wino)];
                for ((what, got), twin) in ["direct", "winograd"].iter().zip(&fast).zip(&portable) {
                    let err = max_rel_err(got, twin);
                    assert!(err < 1e-6, "{what} {shape}: kernel vs twin {err}");
                }
            }
        }
    }

    #[test]
    fn the_amx_direct_conv_reads_its_tiles_from_the_padded_map_right() {
        let amx_here = Kernel::Amx.or_below() == Kernel::Amx;
        if !amx_here {
            println!("SKIPPED: the AMX direct conv on the CPU (this CPU lacks amx_bf16)");
        }
        for &(n, ci, co, h, w) in &AMX_CONV_SHAPES {
            let (x, wv, bv) = conv_case((n, ci, co, h, w), 3, 21);
            let op = DirectConvBf16::new(&wv, &bv, co, ci);
            assert!(op.tiles_fit(h, w), "{h}x{w}");
            let nhwc: Vec<f32> = x
                .permute((0, 2, 3, 1))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let out = op.forward_tiles(amx::Model::default, &nhwc, [n, h, w]);
            let got = Tensor::from_vec(out, (n, h, w, co), &Device::Cpu)
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap();
            // The same roundings as the im2col conv on the portable product, summed in
            // another order.
            let twin = on_nhwc(&x, &op.clone().portable());
            let shape = format!("{n}x{ci}->{co} {h}x{w}");
            let err = max_rel_err(&got, &twin);
            assert!(err < 1e-5, "{shape}: tiles vs im2col {err}");
            let want = reference(&x, &wv, &bv, (co, ci, 3), 1, 1);
            let err = max_rel_err(&got, &want);
            assert!(err < 1e-2, "{shape}: tiles vs f32 {err}");
            if amx_here {
                // The op itself on this CPU's tiles.
                let err = max_rel_err(&on_nhwc(&x, &op), &twin);
                assert!(err < 1e-5, "{shape}: AMX vs im2col {err}");
            }
        }
        // One tile needs 16 grid rows, and the channels whole 32-channel steps.
        let op = DirectConvBf16::new(&[0.0; 32 * 9], &[0.0], 1, 32);
        assert!(!op.tiles_fit(1, 13) && op.tiles_fit(1, 14));
        let op = DirectConvBf16::new(&[0.0; 48 * 9], &[0.0], 1, 48);
        assert!(!op.tiles_fit(7, 7));
    }

    #[test]
    fn global_avg_pool_is_the_mean_over_the_map() {
        // One image and several (run in parallel), odd channel counts, a one-pixel map.
        for &(n, h, w, c) in &[(1, 7, 7, 5), (3, 2, 3, 17), (2, 1, 1, 4)] {
            let x =
                Tensor::from_vec(values(n * h * w * c, 31), (n, h, w, c), &Device::Cpu).unwrap();
            let got: Vec<Vec<f32>> = x
                .apply_op1_no_bwd(&GlobalAvgPool)
                .unwrap()
                .to_vec2()
                .unwrap();
            let want: Vec<Vec<f32>> = x.mean((1, 2)).unwrap().to_vec2().unwrap();
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
            }
            assert_eq!(got.len(), n);
        }
    }

    #[test]
    fn conv3x3_holds_and_picks_the_algorithm_its_size_calls_for() {
        // DiracNet-18's layers: the direct conv is held only where some call can use it, and
        // only with the AVX-512 kernels.
        let held = |side, ci, co| {
            let (w, b) = (vec![0.0; co * ci * 9], vec![0.0; co]);
            let algo = Algo {
                pick: Pick::BySize { side },
                bf16: false,
            };
            Conv3x3::new(&w, &b, co, ci, algo).algorithms()
        };
        assert_eq!(held(56, 64, 64), "winograd");
        assert_eq!(held(28, 128, 128), "winograd");
        let big = if isa() == Isa::Avx512 {
            "winograd+direct"
        } else {
            println!("SKIPPED: holding the direct conv (only with the AVX-512 kernels)");
            "winograd"
        };
        assert_eq!(held(14, 256, 256), big);
        assert_eq!(held(7, 512, 512), big);
        // Per call: direct at batch 1 on 14×14 × 256 and 7×7 × 512, and batch 2 on 7×7.
        let avx512 = Isa::Avx512;
        let f32_direct =
            |isa, n, side, ci, co| Conv3x3::direct_wins(isa, false, n, side, side, ci, co);
        assert!(f32_direct(avx512, 1, 14, 256, 256));
        assert!(!f32_direct(avx512, 2, 14, 256, 256));
        assert!(f32_direct(avx512, 2, 7, 512, 512));
        assert!(!f32_direct(avx512, 4, 7, 512, 512));
        assert!(!f32_direct(avx512, 1, 28, 64, 128));
        // Never with the AVX2 or portable kernels.
        assert!(!f32_direct(Isa::Avx2Fma, 1, 7, 512, 512));
        assert!(!f32_direct(Isa::Portable, 1, 7, 512, 512));
        // Either algorithm gives the conv: batch 1 runs direct, batch 4 Winograd, both right.
        let (ci, co) = (512, 512);
        let wv: Vec<f32> = values(co * ci * 9, 11).iter().map(|v| v * 0.05).collect();
        let bv = values(co, 12);
        let algo = Algo {
            pick: Pick::BySize { side: 7 },
            bf16: false,
        };
        let op = Conv3x3::new(&wv, &bv, co, ci, algo);
        for n in [1, 4] {
            let x = Tensor::from_vec(values(n * ci * 49, 13), (n, ci, 7, 7), &Device::Cpu).unwrap();
            let want = reference(&x, &wv, &bv, (co, ci, 3), 1, 1);
            let got = on_nhwc(&x, &op);
            // Winograd over 512 channels in f32: a few 1e-6 per output, relative to the largest.
            let err = max_rel_err(&got, &want);
            assert!(err < 5e-5, "batch {n}: rel err {err}");
        }
    }

    #[test]
    fn winograd_plans_cover_everything_and_keep_weight_traffic_low() {
        // (tiles, input channels, panels, threads) → every tile and panel in exactly one item.
        for &(tiles, c, panels, threads) in &[
            (4, 512, 32, 2),
            (16, 256, 16, 2),
            (196, 64, 4, 2),
            (6272, 64, 4, 2),
            (1, 8, 1, 4),
            (0, 8, 2, 2),
            (37, 24, 3, 3),
        ] {
            let p = Plan::new(tiles, winograd_block_cap(c), panels, threads);
            assert!(p.block * p.blocks >= tiles && p.block * (p.blocks.max(1) - 1) < tiles.max(1));
            assert!(p.panels_per_item * p.chunks >= panels);
            assert!(p.panels_per_item * (p.chunks - 1) < panels);
            assert!(p.block <= winograd_block_cap(c), "{tiles} {c}: {p:?}");
        }
        // Batch 1 on 7×7 maps of 512 channels: one block (the 37.7 MB of weights read once),
        // the output channels split for the threads.
        let p = Plan::new(4, winograd_block_cap(512), 32, 2);
        assert_eq!((p.blocks, p.chunks), (1, 4), "{p:?}");
        // Large maps: tiles split, each input transformed once.
        let p = Plan::new(6272, winograd_block_cap(64), 4, 2);
        assert_eq!(p.chunks, 1, "{p:?}");
    }

    #[test]
    fn im2col_conv_matches_candle_conv() {
        let isas = Isa::here_saying_skipped();
        for &(n, ci, co, h, w, k, s, p) in &[
            (2, 3, 20, 15, 11, 7, 2, 3),
            (1, 2, 16, 6, 6, 3, 1, 1),
            (1, 3, 40, 9, 9, 7, 2, 3),
        ] {
            let (x, wv, bv) = conv_case((n, ci, co, h, w), k, 4);
            let want = reference(&x, &wv, &bv, (co, ci, k), s, p);
            for &isa in &isas {
                let op = Im2colConv::new(&wv, &bv, co, ci, k, s, p).with_isa(isa);
                let got = x
                    .apply_op1_no_bwd(&op)
                    .unwrap()
                    .permute((0, 3, 1, 2))
                    .unwrap();
                assert_eq!(got.dims(), want.dims());
                let err = max_rel_err(&got, &want);
                assert!(err < 1e-6, "{isa:?}: rel err {err}");
            }
        }
    }

    #[test]
    fn the_stem_reading_windows_from_the_image_equals_its_im2col_to_the_bit() {
        let isas = Isa::here_saying_skipped();
        if !isas.contains(&Isa::Avx512) {
            println!("SKIPPED: the stem's AVX-512 kernel without im2col (this CPU lacks AVX-512F)");
            return;
        }
        // The stem's 7×7/2 pad 3, and other geometries: rows and columns whose windows cross
        // the border (copied) around those inside (read in place), runs of 8 pixels and fewer,
        // one and two panels, a partial panel, maps too small for any window inside.
        for &(n, ci, co, h, w, k, s, p) in &[
            (2, 3, 20, 15, 11, 7, 2, 3),
            (1, 3, 64, 40, 37, 7, 2, 3),
            (1, 2, 16, 6, 6, 3, 1, 1),
            (2, 3, 40, 9, 30, 5, 1, 0),
            (1, 3, 17, 4, 4, 7, 2, 3),
        ] {
            let (x, wv, bv) = conv_case((n, ci, co, h, w), k, 24);
            let op = Im2colConv::new(&wv, &bv, co, ci, k, s, p).with_isa(Isa::Avx512);
            let got = x.apply_op1_no_bwd(&op).unwrap();
            let want = x.apply_op1_no_bwd(&op.clone().with_copies()).unwrap();
            let (got, want) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            // The same products in the same order.
            assert!(got == want, "{n}x{ci}->{co} {h}x{w} k{k} s{s} p{p}");
        }
    }

    #[test]
    fn a_pooled_im2col_conv_equals_the_conv_then_the_pool() {
        // Odd map sizes (a last band shorter than the others, windows past the edge), one and
        // several images, the stem's 3/2 pad 1 pool and a 2/2 one.
        let pools = [
            MaxPool {
                kernel: 3,
                stride: 2,
                pad: 1,
            },
            MaxPool {
                kernel: 2,
                stride: 2,
                pad: 0,
            },
        ];
        let isas = Isa::here_saying_skipped();
        for &(n, ci, co, h, w) in &[(1, 3, 20, 37, 29), (3, 2, 16, 22, 8), (2, 3, 17, 5, 5)] {
            let (x, wv, bv) = conv_case((n, ci, co, h, w), 7, 14);
            for pool in pools {
                for &isa in &isas {
                    let conv = Im2colConv::new(&wv, &bv, co, ci, 7, 2, 3).with_isa(isa);
                    let want = x
                        .apply_op1_no_bwd(&conv)
                        .unwrap()
                        .apply_op1_no_bwd(&pool)
                        .unwrap();
                    let got = x.apply_op1_no_bwd(&conv.with_pool(pool)).unwrap();
                    assert_eq!(got.dims(), want.dims());
                    let (got, want) = (
                        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    );
                    // The same products in the same order: equal to the bit.
                    assert!(got == want, "{isa:?} {n}x{ci}->{co} {h}x{w} {pool:?}");
                }
            }
        }
    }

    #[test]
    fn max_pool_rows_agree_on_every_kernel_set_with_nans_and_ragged_channels() {
        let isas = Isa::here_saying_skipped();
        let pool = MaxPool {
            kernel: 3,
            stride: 2,
            pad: 1,
        };
        for (h, w, c) in [(5, 7, 3), (9, 4, 37), (6, 6, 64)] {
            let mut x = values(h * w * c, 17);
            for v in x.iter_mut().step_by(11) {
                *v = f32::NAN;
            }
            let [oh, ow] = pool.out_size(h, w).unwrap();
            let run = |isa| {
                let mut out = vec![0f32; oh * ow * c];
                for (oy, dst) in out.chunks_exact_mut(ow * c).enumerate() {
                    pool.row(isa, &x, h, w, c, (oy * 2).wrapping_sub(1), dst);
                }
                out
            };
            let want = run(Isa::Portable);
            assert!(want.iter().any(|v| v.is_nan()) && want.iter().any(|v| !v.is_nan()));
            for &isa in &isas {
                let got = run(isa);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
                assert!(same, "{isa:?} {h}x{w}x{c}");
            }
        }
    }

    #[test]
    fn max_pool_matches_pytorch_semantics_with_negative_inputs() {
        // 3/2 pad 1 on negative values: the padding must never win (PyTorch pads with -inf).
        let (n, c, h, w) = (1, 3, 5, 6);
        let x = Tensor::from_vec(values(n * c * h * w, 7), (n, h, w, c), &Device::Cpu).unwrap();
        let x = (x - 2.0).unwrap();
        let got = x
            .apply_op1_no_bwd(&MaxPool {
                kernel: 3,
                stride: 2,
                pad: 1,
            })
            .unwrap();
        assert_eq!(got.dims(), &[1, 3, 3, 3]);
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gv = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for oy in 0..3usize {
            for ox in 0..3usize {
                for ch in 0..c {
                    let mut m = f32::NEG_INFINITY;
                    for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
                        for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
                            m = m.max(xv[(iy * w + ix) * c + ch]);
                        }
                    }
                    assert_eq!(gv[(oy * 3 + ox) * c + ch], m);
                    assert!(m < 0.0);
                }
            }
        }
    }
}
