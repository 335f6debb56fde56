//! `Scale(256)` + `CenterCrop(224)` with OpenCV's `INTER_CUBIC`, computing only the crop.

#[cfg(target_arch = "x86_64")]
mod keys_avx2;

use image::RgbImage;

use super::RESIZE_SHORT_SIDE;
use crate::tensor::INPUT_SIZE;

/// Which of OpenCV's two `INTER_CUBIC` implementations [`resize_crop_with`] reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CubicArithmetic {
    /// What stock opencv-python on x86-64 outputs: IPP's result when both source sides are
    /// ≥ 4 pixels (computed as the exact Keys sum, rounded half to even), OpenCV's own
    /// fixed-point code otherwise. Used by [`resize_crop`].
    #[default]
    OpenCvPython,
    /// OpenCV's own code only, as with `cv2.ipp.setUseIPP(False)` (x86-64, SSE baseline):
    /// bit-exact.
    OpenCvNoIpp,
}

/// Size after the seed's `Scale(256)`: the short side becomes 256 and the long side
/// `int(256.0 * long / short)` (truncated); an image whose short side is already 256 is kept.
/// `u64`, because extreme aspect ratios (1×5000 → 256×1 280 000) can overflow `u32`.
pub fn scaled_size(width: u32, height: u32) -> (u64, u64) {
    let (w, h) = (u64::from(width), u64::from(height));
    let s = u64::from(RESIZE_SHORT_SIDE);
    if (w <= h && w == s) || (h <= w && h == s) {
        (w, h)
    } else if w < h {
        (s, (s as f64 * h as f64 / w as f64) as u64)
    } else {
        ((s as f64 * w as f64 / h as f64) as u64, s)
    }
}

/// Offset of the centre crop along a side of `len`: Python's `int(round((len - 224) / 2.))`,
/// whose `round` sends halves to the even neighbour (383 → 79.5 → 80, 341 → 58.5 → 58).
pub fn crop_offset(len: u64) -> u64 {
    ((len as f64 - INPUT_SIZE as f64) / 2.0).round_ties_even() as u64
}

/// `Scale(256)` with OpenCV `INTER_CUBIC`, then `CenterCrop(224)`: 224×224 RGB8, as stock
/// opencv-python computes it ([`CubicArithmetic::OpenCvPython`]).
///
/// An image with no pixels (which [`decode_rgb8`](super::decode_rgb8) never returns) gives a
/// black crop.
pub fn resize_crop(img: &RgbImage) -> RgbImage {
    resize_crop_with(img, CubicArithmetic::default())
}

/// [`resize_crop`] with a chosen bicubic implementation.
pub fn resize_crop_with(img: &RgbImage, arithmetic: CubicArithmetic) -> RgbImage {
    crop_lines(
        &mut Whole(img),
        arithmetic,
        Kernels::detect(),
        &mut |_, _| {},
    )
}

/// The rows of an RGB8 image, asked for one at a time: a decoded image ([`Whole`]), or one
/// still being decoded on another thread.
pub(super) trait Lines {
    /// Width and height in pixels.
    fn size(&self) -> (u32, u32);
    /// Row `r` (`3 * width` bytes), `r < height`.
    fn line(&mut self, r: usize) -> &[u8];
}

/// A decoded image as [`Lines`].
struct Whole<'a>(&'a RgbImage);

impl Lines for Whole<'_> {
    fn size(&self) -> (u32, u32) {
        self.0.dimensions()
    }

    fn line(&mut self, r: usize) -> &[u8] {
        let len = self.0.width() as usize * 3;
        &self.0.as_raw()[r * len..(r + 1) * len]
    }
}

/// [`resize_crop`] of an image given as [`Lines`]; `row_done(y, row)` sees each row of the crop
/// as soon as it is computed, top to bottom.
pub(super) fn resize_crop_lines(
    lines: &mut impl Lines,
    row_done: &mut dyn FnMut(usize, &[u8]),
) -> RgbImage {
    crop_lines(
        lines,
        CubicArithmetic::default(),
        Kernels::detect(),
        row_done,
    )
}

fn crop_lines(
    lines: &mut impl Lines,
    arithmetic: CubicArithmetic,
    kernels: Kernels,
    row_done: &mut dyn FnMut(usize, &[u8]),
) -> RgbImage {
    let (width, height) = lines.size();
    if width == 0 || height == 0 {
        return RgbImage::new(INPUT_SIZE as u32, INPUT_SIZE as u32);
    }
    let (dst_w, dst_h) = scaled_size(width, height);
    let (x0, y0) = (crop_offset(dst_w) as usize, crop_offset(dst_h) as usize);
    if (dst_w, dst_h) == (u64::from(width), u64::from(height)) {
        // Scale is a no-op (cv2.resize to the same size copies); both sides are ≥ 256.
        let side = INPUT_SIZE;
        let mut data = Vec::with_capacity(side * side * 3);
        for y in 0..side {
            let row = &lines.line(y0 + y)[x0 * 3..(x0 + side) * 3];
            data.extend_from_slice(row);
            row_done(y, row);
        }
        let side = INPUT_SIZE as u32;
        return RgbImage::from_raw(side, side, data).unwrap_or_else(|| RgbImage::new(side, side));
    }
    resample_window(
        lines,
        (dst_w, dst_h),
        (x0 as u64, y0 as u64),
        (INPUT_SIZE as u32, INPUT_SIZE as u32),
        arithmetic,
        kernels,
        row_done,
    )
}

/// Which code computes the exact-sum (IPP-side) resize. Both give identical bytes; the AVX2
/// one is about twice as fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernels {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2(keys_avx2::Avx2),
}

impl Kernels {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = keys_avx2::Avx2::detect() {
            return Self::Avx2(avx2);
        }
        Self::Scalar
    }
}

/// The window `[x0, x0 + out_w) × [y0, y0 + out_h)` of `lines` resized to `dst_w × dst_h`.
fn resample_window(
    lines: &mut impl Lines,
    (dst_w, dst_h): (u64, u64),
    (x0, y0): (u64, u64),
    (out_w, out_h): (u32, u32),
    arithmetic: CubicArithmetic,
    kernels: Kernels,
    row_done: &mut dyn FnMut(usize, &[u8]),
) -> RgbImage {
    let (w, h) = lines.size();
    // opencv-python's IPP hook refuses sources thinner than the 4-tap kernel and falls back.
    let ipp = arithmetic == CubicArithmetic::OpenCvPython && w >= 4 && h >= 4;
    let width = out_w as usize * 3;
    let data = if ipp {
        let xs = axis(u64::from(w), dst_w, x0, out_w, keys_taps);
        let ys = axis(u64::from(h), dst_h, y0, out_h, keys_taps);
        match kernels {
            Kernels::Scalar => separable(
                lines,
                width,
                &ys,
                |line, out| horizontal_scalar(line, &xs, out),
                |rows, wy, out| vertical_scalar(rows, out, |_, h| keys_vertical(h, wy)),
                row_done,
            ),
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2(avx2) => {
                let mut horizontal = avx2.horizontal(&xs, w as usize);
                separable(
                    lines,
                    width,
                    &ys,
                    |line, out| horizontal.run(line, out),
                    |rows, wy, out| avx2.vertical(rows, wy, out),
                    row_done,
                )
            }
        }
    } else {
        let xs = axis(u64::from(w), dst_w, x0, out_w, opencv_taps);
        let ys = axis(u64::from(h), dst_h, y0, out_h, opencv_taps);
        // OpenCV's vertical pass runs 8 int16 lanes (SSE) at a time over the *full* output row
        // of `dst_w * 3` values and finishes the remainder with scalar code.
        let simd_end = dst_w * 3 / 8 * 8;
        let first = x0 * 3;
        separable(
            lines,
            width,
            &ys,
            |line, out| horizontal_scalar(line, &xs, out),
            |rows, b, out| {
                vertical_scalar(rows, out, |e, h| {
                    if first + (e as u64) < simd_end {
                        opencv_vertical_simd(h, b)
                    } else {
                        opencv_vertical_scalar(h, b)
                    }
                })
            },
            row_done,
        )
    };
    // `data` has exactly out_w * out_h * 3 samples by construction.
    RgbImage::from_raw(out_w, out_h, data).unwrap_or_else(|| RgbImage::new(out_w, out_h))
}

/// Four source indices (clamped: OpenCV's `BORDER_REPLICATE`) and their weights.
type Taps<W> = ([usize; 4], [W; 4]);

/// Taps of output positions `start .. start + n` of a `src_len → dst_len` resize.
fn axis<W>(
    src_len: u64,
    dst_len: u64,
    start: u64,
    n: u32,
    taps: fn(f64, u64) -> Taps<W>,
) -> Vec<Taps<W>> {
    // OpenCV: inv_scale = dst / src; scale = 1 / inv_scale (not src / dst: the last bit matters).
    let scale = 1.0 / (dst_len as f64 / src_len as f64);
    (start..start + u64::from(n))
        .map(|d| taps((d as f64 + 0.5) * scale - 0.5, src_len))
        .collect()
}

fn clamped(first: i64, src_len: u64) -> [usize; 4] {
    let last = src_len as i64 - 1;
    [0, 1, 2, 3].map(|j| (first + j).clamp(0, last) as usize)
}

/// IPP side: the source coordinate in f64 and the Keys (a = -0.75) weights of the four
/// neighbours at distances 1 + t, t, 1 - t, 2 - t, all in f64.
fn keys_taps(fx: f64, src_len: u64) -> Taps<f64> {
    fn near(x: f64) -> f64 {
        (1.25 * x - 2.25) * x * x + 1.0 // |x| < 1: (a + 2)|x|³ - (a + 3)|x|² + 1
    }
    fn far(x: f64) -> f64 {
        ((-0.75 * x + 3.75) * x - 6.0) * x + 3.0 // 1 ≤ |x| < 2: a|x|³ - 5a|x|² + 8a|x| - 4a
    }
    let sx = fx.floor();
    let t = fx - sx;
    (
        clamped(sx as i64 - 1, src_len),
        [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)],
    )
}

/// OpenCV side: the coordinate is rounded to f32 before `floor`, the weights are computed in f32
/// by `interpolateCubic` (the last as 1 minus the others) and stored as `short` in units of
/// 1/2048 (`INTER_RESIZE_COEF_SCALE`), rounded half to even.
fn opencv_taps(fx: f64, src_len: u64) -> Taps<i32> {
    const A: f32 = -0.75;
    let fx = fx as f32;
    let sx = fx.floor();
    let t = fx - sx;
    let x = t + 1.0;
    let c0 = ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let c1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0;
    let u = 1.0 - t;
    let c2 = ((A + 2.0) * u - (A + 3.0)) * u * u + 1.0;
    let c3 = 1.0 - c0 - c1 - c2;
    let fixed = |c: f32| (c * 2048.0).round_ties_even().clamp(-32768.0, 32767.0) as i32;
    (
        clamped(sx as i64 - 1, src_len),
        [fixed(c0), fixed(c1), fixed(c2), fixed(c3)],
    )
}

/// Horizontal sums as each implementation keeps them between the passes: f64 (exact-sum side)
/// or int (OpenCV's `HResizeCubic<uchar, int, short>`).
trait Accum: Copy + Default {
    fn hsum(s: [u8; 4], w: &[Self; 4]) -> Self;
}

impl Accum for f64 {
    fn hsum(s: [u8; 4], w: &[f64; 4]) -> f64 {
        ((f64::from(s[0]) * w[0] + f64::from(s[1]) * w[1]) + f64::from(s[2]) * w[2])
            + f64::from(s[3]) * w[3]
    }
}

impl Accum for i32 {
    fn hsum(s: [u8; 4], w: &[i32; 4]) -> i32 {
        s.iter().zip(w).map(|(&s, &w)| i32::from(s) * w).sum()
    }
}

/// The horizontal pass over one source line (RGB8): `out[3x + c]` is the 4-tap sum of channel
/// `c` around output column `x`.
fn horizontal_scalar<W: Accum>(line: &[u8], xs: &[Taps<W>], out: &mut [W]) {
    for ((rx, wx), h) in xs.iter().zip(out.chunks_exact_mut(3)) {
        let px = rx.map(|x| &line[x * 3..x * 3 + 3]);
        for (c, h) in h.iter_mut().enumerate() {
            *h = W::hsum(px.map(|p| p[c]), wx);
        }
    }
}

/// The vertical pass over one output row: `out[e] = f(e, [h0, h1, h2, h3])` from the four
/// horizontal rows' sample `e`.
fn vertical_scalar<W: Copy>(rows: [&[W]; 4], out: &mut [u8], f: impl Fn(usize, [W; 4]) -> u8) {
    let [r0, r1, r2, r3] = rows;
    let samples = r0.iter().zip(r1).zip(r2).zip(r3);
    for (e, (o, (((&h0, &h1), &h2), &h3))) in out.iter_mut().zip(samples).enumerate() {
        *o = f(e, [h0, h1, h2, h3]);
    }
}

/// Drives a separable resize of the output rows `ys`, `width` samples each (RGB interleaved):
/// `horizontal(line, sums)` runs once per source line that some output row needs, and
/// `vertical([four rows of sums], weights, out_row)` once per output row, followed by
/// `row_done(y, out_row)`.
///
/// The taps of successive output rows are monotone, so a source line is needed by a run of
/// consecutive output rows and never again once an output row starts past it: four slots
/// (line `r` in slot `r % 4`) hold every line still needed, and stay in cache.
///
/// `sums` is `width + 1` long: the spare value lets vector kernels store whole registers; only
/// the first `width` are read back.
fn separable<W: Copy + Default>(
    lines: &mut impl Lines,
    width: usize,
    ys: &[Taps<W>],
    mut horizontal: impl FnMut(&[u8], &mut [W]),
    mut vertical: impl FnMut([&[W]; 4], &[W; 4], &mut [u8]),
    row_done: &mut dyn FnMut(usize, &[u8]),
) -> Vec<u8> {
    let stride = width + 1;
    let mut sums = vec![W::default(); 4 * stride];
    let mut held = [usize::MAX; 4];
    let mut out = vec![0u8; width * ys.len()];
    for (y, ((ry, wy), out_row)) in ys
        .iter()
        .zip(out.chunks_exact_mut(width.max(1)))
        .enumerate()
    {
        for &r in ry {
            if held[r % 4] != r {
                held[r % 4] = r;
                horizontal(lines.line(r), &mut sums[(r % 4) * stride..][..stride]);
            }
        }
        vertical(ry.map(|r| &sums[(r % 4) * stride..][..width]), wy, out_row);
        row_done(y, out_row);
    }
    out
}

/// The exact-sum side's vertical pass for one sample: the four horizontal sums weighed in f64,
/// rounded half to even and saturated to a byte.
fn keys_vertical([h0, h1, h2, h3]: [f64; 4], wy: &[f64; 4]) -> u8 {
    let v = ((h0 * wy[0] + h1 * wy[1]) + h2 * wy[2]) + h3 * wy[3];
    rint_f64(v).clamp(0.0, 255.0) as u8
}

/// OpenCV's `VResizeCubicVec_32s8u`: float32, beta scaled by 2⁻²², accumulated from the last
/// row up (`muladd` is a separate multiply and add on the SSE baseline), rounded half to even.
fn opencv_vertical_simd(h: [i32; 4], beta: &[i32; 4]) -> u8 {
    const SCALE: f32 = 1.0 / (2048.0 * 2048.0);
    let b = beta.map(|b| b as f32 * SCALE);
    let mut acc = h[3] as f32 * b[3];
    acc += h[2] as f32 * b[2];
    acc += h[1] as f32 * b[1];
    acc += h[0] as f32 * b[0];
    rint_f32(acc).clamp(0.0, 255.0) as u8
}

/// Round half to even, as `cvtsd2si`/`cvtps2dq` do, by the 1.5·2^52 trick (exact for
/// |v| < 2^51, and resampled values stay within ±1000): `f64::round_ties_even` is a libm call on
/// baseline x86-64 (no SSE4.1), several times slower in this hot loop.
fn rint_f64(v: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    (v + MAGIC) - MAGIC
}

/// [`rint_f64`] for f32: 1.5·2^23, exact for |v| < 2^22.
fn rint_f32(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// OpenCV's scalar `VResizeCubic` + `FixedPtCast<int, uchar, 22>`: exact integer sum,
/// `(v + 2²¹) >> 22` (rounds halves up), saturated.
fn opencv_vertical_scalar(h: [i32; 4], beta: &[i32; 4]) -> u8 {
    let v: i64 = h
        .iter()
        .zip(beta)
        .map(|(&h, &b)| i64::from(h) * i64::from(b))
        .sum();
    ((v + (1 << 21)) >> 22).clamp(0, 255) as u8
}

#[cfg(test)]
mod tests {
    use image::Rgb;

    use super::super::testing::noise;
    use super::*;

    // opencv-python 5.0.0, see `opencv_fixed_point_path_matches_cv2`.
    const OPENCV_3X5_SUM: u64 = 17_946_137;
    const OPENCV_3X5_PIXELS: &[(u32, u32, [u8; 3])] = &[
        (0, 0, [51, 100, 185]),
        (223, 0, [164, 214, 33]),
        (0, 223, [21, 71, 155]),
        (223, 223, [135, 185, 155]),
        (100, 57, [181, 133, 189]),
        (13, 200, [12, 65, 125]),
        (219, 5, [169, 219, 23]),
        (222, 111, [0, 57, 109]),
    ];
    const OPENCV_7X6_NO_IPP_SUM: u64 = 19_393_106;
    const OPENCV_7X6_NO_IPP_PIXELS: &[(u32, u32, [u8; 3])] = &[
        (0, 0, [5, 58, 110]),
        (223, 0, [223, 102, 36]),
        (0, 223, [235, 169, 48]),
        (223, 223, [160, 213, 93]),
        (100, 57, [162, 242, 29]),
        (13, 200, [207, 138, 161]),
        (219, 5, [207, 125, 35]),
        (222, 111, [206, 167, 162]),
    ];

    #[test]
    fn crop_offsets_round_half_to_even() {
        assert_eq!(crop_offset(256), 16);
        assert_eq!(crop_offset(383), 80); // 79.5 → 80
        assert_eq!(crop_offset(341), 58); // 58.5 → 58
        assert_eq!(crop_offset(259), 18); // 17.5 → 18
        assert_eq!(crop_offset(1007), 392); // 391.5 → 392
        assert_eq!(crop_offset(1_280_000), 639_888);
    }

    #[test]
    fn scaled_sizes_truncate_like_python() {
        assert_eq!(scaled_size(1000, 257), (996, 256)); // 256 * 1000 / 257 = 996.1
        assert_eq!(scaled_size(257, 1000), (256, 996));
        assert_eq!(scaled_size(449, 300), (383, 256));
        assert_eq!(scaled_size(150, 200), (256, 341));
        assert_eq!(scaled_size(5, 7), (256, 358));
        assert_eq!(scaled_size(500, 500), (256, 256));
        assert_eq!(scaled_size(1, 5000), (256, 1_280_000));
        assert_eq!(scaled_size(5000, 1), (1_280_000, 256));
        // short side already 256: kept as is
        assert_eq!(scaled_size(256, 259), (256, 259));
        assert_eq!(scaled_size(300, 256), (300, 256));
        assert_eq!(scaled_size(256, 256), (256, 256));
        // 256 but not the short side: resized
        assert_eq!(scaled_size(256, 200), (327, 256));
    }

    #[test]
    fn no_resize_when_short_side_is_256() {
        for (w, h) in [(256, 300), (300, 256), (256, 256)] {
            let img = noise(w, h, w + h);
            let expected = image::imageops::crop_imm(
                &img,
                crop_offset(w.into()) as u32,
                crop_offset(h.into()) as u32,
                224,
                224,
            )
            .to_image();
            for arithmetic in [CubicArithmetic::OpenCvPython, CubicArithmetic::OpenCvNoIpp] {
                assert_eq!(resize_crop_with(&img, arithmetic), expected, "{w}x{h}");
            }
        }
    }

    #[test]
    fn resampling_to_the_same_size_is_the_identity() {
        // t = 0 everywhere: weights (0, 1, 0, 0) in both implementations.
        for (w, h) in [(37, 29), (3, 29), (29, 2), (1, 1)] {
            let img = noise(w, h, 3);
            for arithmetic in [CubicArithmetic::OpenCvPython, CubicArithmetic::OpenCvNoIpp] {
                let out = resample_window(
                    &mut Whole(&img),
                    (w.into(), h.into()),
                    (0, 0),
                    (w, h),
                    arithmetic,
                    Kernels::detect(),
                    &mut |_, _| {},
                );
                assert_eq!(out, img, "{w}x{h} {arithmetic:?}");
            }
        }
    }

    #[test]
    fn constant_images_stay_constant() {
        for (w, h) in [
            (300, 500),
            (449, 300),
            (5, 7),
            (3, 700),
            (700, 3),
            (1, 1),
            (2, 3),
        ] {
            for v in [0u8, 1, 17, 128, 254, 255] {
                let img = RgbImage::from_pixel(w, h, Rgb([v, 255 - v, v / 2]));
                for arithmetic in [CubicArithmetic::OpenCvPython, CubicArithmetic::OpenCvNoIpp] {
                    let out = resize_crop_with(&img, arithmetic);
                    assert_eq!(out.dimensions(), (224, 224));
                    assert!(
                        out.pixels().all(|p| *p == Rgb([v, 255 - v, v / 2])),
                        "{w}x{h} value {v} {arithmetic:?}"
                    );
                }
            }
        }
    }

    /// Values from opencv-python 5.0 (`cv2.ipp.setUseIPP(False)`, and the default for the 3×5
    /// source, which IPP declines) on the pattern `(37x + 91y + 53c) % 256`.
    #[test]
    fn opencv_fixed_point_path_matches_cv2() {
        let pattern = |w, h| {
            RgbImage::from_fn(w, h, |x, y| {
                Rgb(std::array::from_fn(|c| {
                    ((37 * x + 91 * y + 53 * c as u32) % 256) as u8
                }))
            })
        };
        let sum = |img: &RgbImage| img.as_raw().iter().map(|&v| u64::from(v)).sum::<u64>();
        let thin = resize_crop(&pattern(3, 5));
        assert_eq!(sum(&thin), OPENCV_3X5_SUM);
        for &(x, y, px) in OPENCV_3X5_PIXELS {
            assert_eq!(thin.get_pixel(x, y).0, px, "3x5 at ({x}, {y})");
        }
        let no_ipp = resize_crop_with(&pattern(7, 6), CubicArithmetic::OpenCvNoIpp);
        assert_eq!(sum(&no_ipp), OPENCV_7X6_NO_IPP_SUM);
        for &(x, y, px) in OPENCV_7X6_NO_IPP_PIXELS {
            assert_eq!(no_ipp.get_pixel(x, y).0, px, "7x6 at ({x}, {y})");
        }
    }

    #[test]
    fn tiny_and_extreme_images_resize_cheaply() {
        let one = resize_crop(&RgbImage::from_pixel(1, 1, Rgb([9, 99, 199])));
        assert!(one.pixels().all(|p| p.0 == [9, 99, 199]));
        // 256×1 280 000 and 1 280 000×256 if fully resized; only the crop is computed.
        for (w, h) in [(1, 5000), (5000, 1), (2, 3), (4, 4), (4, 5000), (5000, 4)] {
            let out = resize_crop(&noise(w, h, 11));
            assert_eq!(out.dimensions(), (224, 224), "{w}x{h}");
        }
    }

    /// The AVX2 kernels compute the scalar ones' products and sums four lanes at a time: the
    /// bytes must be identical, through crops of every shape and windows whose rows are not a
    /// whole number of vectors. (On a CPU without AVX2 there is nothing to compare.)
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_match_the_scalar_ones_bit_for_bit() {
        let Kernels::Avx2(_) = Kernels::detect() else {
            eprintln!("no AVX2 on this CPU: only the scalar kernels run here");
            return;
        };
        let crop = |img: &RgbImage, kernels| {
            crop_lines(
                &mut Whole(img),
                CubicArithmetic::OpenCvPython,
                kernels,
                &mut |_, _| {},
            )
        };
        let sizes = [
            (449, 300),
            (300, 449),
            (257, 1000),
            (1000, 257),
            (4, 4),
            (5, 600),
            (600, 5),
            (17, 13),
            (231, 229),
            (3000, 301),
        ];
        for (i, (w, h)) in sizes.into_iter().enumerate() {
            // Noise overshoots [0, 255] under the bicubic: the clamping is exercised too.
            let img = noise(w, h, i as u32 + 1);
            assert_eq!(
                crop(&img, Kernels::Scalar),
                crop(&img, Kernels::detect()),
                "{w}x{h}"
            );
        }
        for (src, dst, out) in [
            ((9, 8), (20, 17), (7, 5)),
            ((30, 7), (11, 5), (1, 3)),
            ((6, 40), (13, 90), (13, 2)),
        ] {
            let img = noise(src.0, src.1, 99);
            let window = |kernels| {
                resample_window(
                    &mut Whole(&img),
                    dst,
                    (1, 2),
                    out,
                    CubicArithmetic::OpenCvPython,
                    kernels,
                    &mut |_, _| {},
                )
            };
            assert_eq!(
                window(Kernels::Scalar),
                window(Kernels::detect()),
                "{src:?} → {dst:?}"
            );
        }
    }

    #[test]
    fn rows_are_reported_in_order_as_computed() {
        for (w, h) in [(449, 300), (300, 256), (3, 5)] {
            let img = noise(w, h, 4);
            let mut seen = Vec::new();
            let out = crop_lines(
                &mut Whole(&img),
                CubicArithmetic::default(),
                Kernels::detect(),
                &mut |y, row| seen.push((y, row.to_vec())),
            );
            let rows: Vec<_> = out.as_raw().chunks(224 * 3).map(<[u8]>::to_vec).collect();
            assert_eq!(seen.len(), 224, "{w}x{h}");
            assert!(seen
                .iter()
                .enumerate()
                .all(|(i, (y, row))| *y == i && *row == rows[i]));
        }
    }
}
