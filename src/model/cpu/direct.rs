//! The 3×3, stride-1, pad-1 convolution as one matrix product per block of output pixels
//! ("direct": im2col + GEMM, no transform): each output pixel's row of `A` is its 3×3
//! receptive field (`ky`, `kx`, channel), copied from the NHWC input in three runs of `3·c_in`
//! contiguous values; `B` is the raw kernel, packed once, `9·c_in × c_out`.
//!
//! It does 2.25× the multiplies of Winograd F(4×4, 3×3) but reads a quarter of the weights
//! (9 values per channel pair instead of 36): the faster choice where a layer's weights, not
//! its pixels, dominate — the 512-channel 7×7 layers at batch 1 stream 37.7 MB of transformed
//! weights for 4 tiles. Its result is the plain sum of products, as PyTorch's direct conv.
//!
//! In bf16 on AMX (`DirectConvBf16::forward_tiles`) nothing is copied: each tile of `A` is 16
//! evenly spaced pixels of a zero-bordered copy of the map, loaded as it stands.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use super::aligned::Aligned;
use super::amx;
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
/// and the output in f32. On AMX, no receptive fields are copied: the tiles load straight from
/// the map (`DirectConvBf16::forward_tiles`).
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

    /// Whether [`Self::forward_tiles`] takes `h × w` maps: whole 32-channel steps, and a
    /// tile's 16 rows inside one image's grid.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn tiles_fit(&self, h: usize, w: usize) -> bool {
        self.c_in.is_multiple_of(amx::DEPTH) && h * (w + 2) >= amx::ROWS
    }

    /// The conv on AMX tiles (or the tests' model of them, from `make`), with no receptive
    /// fields copied. The input, rounded to bf16, goes into a zero-bordered copy, `h + 2` rows
    /// of `w + 2` pixels per image; output pixels are computed over that copy's rows, `w + 2`
    /// per output row (the last two past the edge: computed, then dropped). Then the 16 pixels
    /// of a tile are 16 evenly spaced pixels of the copy for every tap (`ky`, `kx`): each `A`
    /// tile loads straight from the copy, 32 channels of 16 pixels, `c_in` apart.
    ///
    /// `x` is the `[n, h, w, c_in]` input; [`Self::tiles_fit`] must hold.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn forward_tiles<T: amx::Tiles>(
        &self,
        make: impl Fn() -> T + Sync,
        x: &[f32],
        [n, h, w]: [usize; 3],
    ) -> Vec<f32> {
        assert!(self.tiles_fit(h, w), "forward_tiles: shape");
        assert_eq!(
            x.len(),
            n * h * w * self.c_in,
            "forward_tiles: input length"
        );
        let c = self.c_in;
        let (hp, wp) = (h + 2, w + 2);
        let image = hp * wp;
        let grid = h * wp;
        // Two pixels past the last image: the right taps of its last grid rows (dropped ones)
        // read them.
        // From a cache line: each tile row (32 channels of a pixel) is one line.
        let mut xp = Aligned::<u16>::zeroed((n * image + 2) * c);
        xp.par_chunks_mut(wp * c)
            .enumerate()
            .for_each(|(row, dst)| {
                let (img, y) = (row / hp, row % hp);
                if img < n && (1..=h).contains(&y) {
                    let src = &x[(img * h + y - 1) * w * c..][..w * c];
                    bf16::to_bf16_slice(src, &mut dst[c..(w + 1) * c]);
                }
            });
        let chunks = c / amx::DEPTH;
        let plan = Plan::new(
            n * grid,
            BLOCK_ROWS,
            self.weights.panels(),
            rayon::current_num_threads(),
        );
        let mut out = vec![0f32; n * h * w * self.c_out];
        let shared = Shared(out.as_mut_ptr());
        let out_len = out.len();
        plan.items().for_each(|(rows, panels)| {
            let mut tiles = make();
            let last = panels.end;
            // A work item's rows may span images; a tile's rows never do.
            for img in rows.start / grid..rows.end.div_ceil(grid) {
                let base = img * grid;
                let local = rows.start.max(base) - base..rows.end.min(base + grid) - base;
                let first = img * image;
                let a = |r: [usize; 2], s: usize| {
                    let (tap, chunk) = (s / chunks, s % chunks);
                    let shift = tap / 3 * wp + tap % 3;
                    let at = |t: usize| {
                        let pixel = first + r[t] + shift;
                        xp[pixel * c + chunk * amx::DEPTH..].as_ptr().cast::<u8>()
                    };
                    ([at(0), at(1)], c * 2)
                };
                let finish = |j: usize, q: Range<usize>, block: &amx::Block| {
                    let width = 2.min(last - j) * NR;
                    let cols = (self.c_out - j * NR).min(width);
                    let bias = &self.bias[j * NR..][..width];
                    for q in q {
                        let (y, xx) = (q / wp, q % wp);
                        if xx >= w {
                            continue;
                        }
                        let at = ((img * h + y) * w + xx) * self.c_out + j * NR;
                        assert!(at + cols <= out_len);
                        // SAFETY: in bounds (checked); this pixel's channels of these panels
                        // are this work item's alone (the plan's items are disjoint).
                        let dst =
                            unsafe { std::slice::from_raw_parts_mut(shared.ptr().add(at), cols) };
                        bf16::finish(block.row(q), Some(bias), true, dst);
                    }
                };
                // SAFETY: `local` lies in this image's `grid` rows (≥ 16: `tiles_fit`). A tile
                // of rows r..r + 16 ≤ grid at tap (ky, kx) reads pixels first + r + ky·wp + kx
                // onwards, 16 of them `c` values apart: the last is at most first + grid - 1 +
                // 2·wp + 2 = first + image + 1, inside `xp` (two pixels past the last image);
                // each reads 32 values from channel 32·chunk, inside its `c`. `steps`: 9·c/32,
                // the weights' rows in whole steps.
                unsafe {
                    amx::product(
                        &mut tiles,
                        local,
                        grid,
                        9 * chunks,
                        a,
                        &self.weights,
                        panels.clone(),
                        finish,
                    )
                };
            }
        });
        out
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
        #[cfg(target_arch = "x86_64")]
        if self.kernel.or_below() == Kernel::Amx && self.tiles_fit(h, w) {
            let make = || {
                // SAFETY: `or_below` kept AMX only where `amx::available()`.
                unsafe { amx::Hardware::here() }
            };
            let out = self.forward_tiles(make, x, [n, h, w]);
            return Ok((CpuStorage::F32(out), Shape::from((n, h, w, self.c_out))));
        }
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
