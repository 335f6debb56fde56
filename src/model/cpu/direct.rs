//! The 3×3, stride-1, pad-1 convolution as one matrix product per block of output pixels
//! ("direct": im2col + GEMM, no transform): each output pixel's row of `A` is its 3×3
//! receptive field (`ky`, `kx`, channel), copied from the NHWC input in three runs of `3·c_in`
//! contiguous values; `B` is the raw kernel, packed once, `9·c_in × c_out`.
//!
//! It does 2.25× the multiplies of Winograd F(4×4, 3×3) but reads a quarter of the weights
//! (9 values per channel pair instead of 36): the faster choice where a layer's weights, not
//! its pixels, dominate — the 512-channel 7×7 layers at batch 1 stream 37.7 MB of transformed
//! weights for 4 tiles. Its result is the plain sum of products, as PyTorch's direct conv.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use super::bf16::{self, Kernel, PackedBf16};
use super::gemm::{self, Epilogue, Isa, PackedB, NR};
use super::{input_nhwc, isa, padded_bias, supported, with_scratch, Plan, Shared};

/// The most output pixels per work item: the rows of `A` a pass over [`gemm::KC`] reduction
/// steps reads (`rows × KC` floats, 256 KiB) stay in L2 while every weight panel sweeps them.
const BLOCK_ROWS: usize = 128;

/// Row `i` of `a` (rows of `lda` ≥ 9·c values): the receptive field of output pixel `r0 + i`
/// of the `[n, h, w, c]` map `x`, in the order (ky, kx, channel), `zero` outside the map and
/// after the `9·c` values. Inside the map a kernel row is one run of `3·c` values.
fn im2col<T: Copy>(x: &[T], [h, w, c]: [usize; 3], r0: usize, lda: usize, zero: T, a: &mut [T]) {
    for (i, row) in a.chunks_exact_mut(lda).enumerate() {
        let r = r0 + i;
        let (img, y, xx) = (r / (h * w), r / w % h, r % w);
        row[9 * c..].fill(zero);
        for (ky, dst) in row[..9 * c].chunks_exact_mut(3 * c).enumerate() {
            let iy = (y + ky).wrapping_sub(1);
            if iy >= h {
                dst.fill(zero);
                continue;
            }
            let line = &x[(img * h + iy) * w * c..][..w * c];
            if xx >= 1 && xx + 1 < w {
                dst.copy_from_slice(&line[(xx - 1) * c..][..3 * c]);
                continue;
            }
            for (kx, d) in dst.chunks_exact_mut(c).enumerate() {
                let ix = (xx + kx).wrapping_sub(1);
                if ix < w {
                    d.copy_from_slice(&line[ix * c..][..c]);
                } else {
                    d.fill(zero);
                }
            }
        }
    }
}

/// Element `(row, col)` of the 3×3 kernels `weight` (`[c_out, c_in, 3, 3]`, flattened) as a
/// `(ky, kx, c_in) × c_out` matrix: the order of the receptive fields [`im2col`] copies.
fn kernel_matrix(weight: &[f32], c_in: usize) -> impl Fn(usize, usize) -> f32 + '_ {
    move |row, col| weight[(col * c_in + row % c_in) * 9 + row / c_in]
}

/// Copies a work item's products (rows of `panels.len() · NR` values from pixel `r0` on) into
/// their pixels' channels of `panels` in the `[pixels, c_out]` output `out` (`out_len` floats).
///
/// # Safety
/// No other thread may write those pixels' channels meanwhile (each item owns its own).
unsafe fn scatter(
    out: Shared,
    out_len: usize,
    c_out: usize,
    r0: usize,
    panels: &Range<usize>,
    prod: &[f32],
) {
    let col0 = panels.start * NR;
    let cols = (panels.end * NR).min(c_out) - col0;
    for (i, src) in prod.chunks_exact(panels.len() * NR).enumerate() {
        let at = (r0 + i) * c_out + col0;
        assert!(at + cols <= out_len);
        // SAFETY: in bounds (checked); the caller owns these pixels' channels.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(at), cols) };
        dst.copy_from_slice(&src[..cols]);
    }
}

/// A 3×3, stride-1, pad-1 convolution, NHWC in and out, with bias and ReLU, as im2col + GEMM.
#[derive(Debug, Clone)]
pub struct DirectConv {
    c_in: usize,
    c_out: usize,
    /// `(ky, kx, c_in) × c_out`, packed.
    weights: PackedB,
    bias: Vec<f32>,
    isa: Isa,
}

impl DirectConv {
    /// From PyTorch-layout weights `[c_out, c_in, 3, 3]` (flattened) and bias `[c_out]`.
    pub fn new(weight: &[f32], bias: &[f32], c_out: usize, c_in: usize) -> Self {
        assert_eq!(weight.len(), c_out * c_in * 9, "DirectConv: weight length");
        assert_eq!(bias.len(), c_out, "DirectConv: bias length");
        let weights = PackedB::pack(9 * c_in, c_out, kernel_matrix(weight, c_in));
        Self {
            c_in,
            c_out,
            weights,
            bias: padded_bias(bias),
            isa: isa(),
        }
    }

    /// Uses `isa`'s kernels when this CPU runs them (for tests and comparisons).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = supported(isa);
        self
    }

    /// Output channels.
    pub fn c_out(&self) -> usize {
        self.c_out
    }

    /// Bytes of packed weights.
    pub fn bytes(&self) -> usize {
        self.weights.bytes() + self.bias.len() * 4
    }

    /// From output pixel `r` of `h × w` maps, at most `left` pixels on: how many share `r`'s
    /// kernel rows on the map, and those rows (`1..3` on the top row, `0..2` on the bottom one,
    /// `1..2` on a map one pixel high).
    fn run(h: usize, w: usize, r: usize, left: usize) -> (usize, Range<usize>) {
        let (y, x) = (r / w % h, r % w);
        let taps = usize::from(y == 0)..3 - usize::from(y + 1 == h);
        let run = if y == 0 || y + 1 == h {
            w - x
        } else {
            (h - 1 - y) * w - x
        };
        (run.min(left), taps)
    }
}

impl CustomOp1 for DirectConv {
    fn name(&self) -> &'static str {
        "direct-conv3x3"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, [n, h, w, _]) = input_nhwc(self.name(), storage, layout, self.c_in)?;
        let rows = n * h * w;
        let plan = Plan::new(
            rows,
            BLOCK_ROWS,
            self.weights.panels(),
            rayon::current_num_threads(),
        );
        let k = self.weights.k();
        let mut out = vec![0f32; rows * self.c_out];
        let shared = Shared(out.as_mut_ptr());
        let out_len = out.len();
        plan.items().for_each(|(pixels, panels)| {
            let (r0, rn) = (pixels.start, pixels.len());
            let cw = panels.len() * NR;
            with_scratch(rn * (k + cw), |scratch| {
                let (a, prod) = scratch.split_at_mut(rn * k);
                im2col(x, [h, w, self.c_in], r0, k, 0.0, a);
                // Runs of pixels whose kernel rows on the map are the same: the first kernel
                // row of a map's top row of pixels, and the last of its bottom row, fall on
                // padding, and those products are skipped (a tenth of a 7×7 map's).
                let mut i = 0;
                while i < rn {
                    let (run, taps) = Self::run(h, w, r0 + i, rn - i);
                    let c3 = 3 * self.c_in;
                    gemm::gemm_k(
                        self.isa,
                        run,
                        &a[i * k..],
                        k,
                        &self.weights,
                        taps.start * c3..taps.end * c3,
                        panels.clone(),
                        &mut prod[i * cw..],
                        cw,
                        usize::MAX,
                        Epilogue {
                            bias: Some(&self.bias),
                            relu: true,
                        },
                    );
                    i += run;
                }
                // SAFETY: the plan's items are disjoint; these pixels' channels of `panels`
                // are this item's alone.
                unsafe { scatter(shared, out_len, self.c_out, r0, &panels, prod) };
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, self.c_out))))
    }
}

/// [`DirectConv`] in bf16: the input map rounded to bf16 once, its receptive fields copied from
/// that, weights packed in bf16 pairs, products summed in f32 ([`bf16::gemm_bf16`]); bias, ReLU
/// and the output in f32.
#[derive(Debug, Clone)]
pub struct DirectConvBf16 {
    c_in: usize,
    c_out: usize,
    /// `(ky, kx, c_in) × c_out`, in bf16 pairs.
    weights: PackedBf16,
    bias: Vec<f32>,
    /// The product's kernel.
    kernel: Kernel,
}

impl DirectConvBf16 {
    /// From PyTorch-layout weights `[c_out, c_in, 3, 3]` (flattened) and bias `[c_out]`.
    pub fn new(weight: &[f32], bias: &[f32], c_out: usize, c_in: usize) -> Self {
        assert_eq!(
            weight.len(),
            c_out * c_in * 9,
            "DirectConvBf16: weight length"
        );
        assert_eq!(bias.len(), c_out, "DirectConvBf16: bias length");
        let weights = PackedBf16::pack(9 * c_in, c_out, kernel_matrix(weight, c_in));
        Self {
            c_in,
            c_out,
            weights,
            bias: padded_bias(bias),
            kernel: Kernel::detect(),
        }
    }

    /// Uses the portable kernel even where AVX512-BF16 runs (for tests).
    pub fn portable(mut self) -> Self {
        self.kernel = Kernel::Portable;
        self
    }

    /// Output channels.
    pub fn c_out(&self) -> usize {
        self.c_out
    }

    /// Bytes of packed weights.
    pub fn bytes(&self) -> usize {
        self.weights.bytes() + self.bias.len() * 4
    }
}

impl CustomOp1 for DirectConvBf16 {
    fn name(&self) -> &'static str {
        "direct-conv3x3-bf16"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, [n, h, w, _]) = input_nhwc(self.name(), storage, layout, self.c_in)?;
        let rows = n * h * w;
        let lda = self.weights.k().div_ceil(2) * 2;
        // The map in bf16 once: each value goes into up to nine receptive fields.
        let mut x16 = vec![0u16; x.len()];
        x16.par_chunks_mut(1 << 16)
            .zip(x.par_chunks(1 << 16))
            .for_each(|(d, s)| bf16::to_bf16_slice(s, d));
        // As the f32 conv: blocks of pixels × chunks of output panels, each block's weights
        // read once (at batch 8 on 7×7 maps, blocks of pixels alone read them eight times).
        let plan = Plan::new(
            rows,
            BLOCK_ROWS,
            self.weights.panels(),
            rayon::current_num_threads(),
        );
        let mut out = vec![0f32; rows * self.c_out];
        let shared = Shared(out.as_mut_ptr());
        let out_len = out.len();
        plan.items().for_each(|(pixels, panels)| {
            let (r0, rn) = (pixels.start, pixels.len());
            A16.with(|a| {
                let mut a = a.borrow_mut();
                if a.len() < rn * lda {
                    a.resize(rn * lda, 0);
                }
                let a = &mut a[..rn * lda];
                im2col(&x16, [h, w, self.c_in], r0, lda, 0, a);
                with_scratch(rn * panels.len() * NR, |prod| {
                    bf16::gemm_bf16(
                        self.kernel,
                        rn,
                        a,
                        lda,
                        &self.weights,
                        panels.clone(),
                        prod,
                        panels.len() * NR,
                        Epilogue {
                            bias: Some(&self.bias),
                            relu: true,
                        },
                    );
                    // SAFETY: the plan's items are disjoint; these pixels' channels of
                    // `panels` are this item's alone.
                    unsafe { scatter(shared, out_len, self.c_out, r0, &panels, prod) };
                });
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, self.c_out))))
    }
}

thread_local! {
    /// Per-thread bf16 receptive fields, reused across calls.
    static A16: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}
