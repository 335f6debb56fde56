//! Image bytes → the normalised `[3, 224, 224]` network input, reproducing the authors'
//! evaluation pipeline (seed v2 `train.py` + `cvtransforms.py`) value for value:
//!
//! ```text
//! img = cv2.imread(path, cv2.IMREAD_COLOR); img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
//! Scale(256)       short side → 256, long side int(256.0 * long / short), cv2.INTER_CUBIC
//! CenterCrop(224)  offsets int(round((side - 224) / 2.)), Python 3 round: half to even
//! x = img.astype(np.float32) / 255.0; x = (x - MEAN) / STD; x.transpose(2, 0, 1) → float32
//! ```
//!
//! The steps are public so that each can be checked against OpenCV on its own:
//! [`decode_rgb8`] → [`resize_crop`] → [`normalize`]; [`preprocess`] chains them.
//!
//! # Which bicubic is "OpenCV's"?
//!
//! `cv2.resize(..., INTER_CUBIC)` on 8-bit images has two implementations, and stock
//! opencv-python on x86-64 uses both:
//!
//! * **Intel IPP** (bundled `ippicv`), used when both source sides are ≥ 4 pixels. It evaluates
//!   the Keys kernel (a = -0.75) in float32 and rounds half to even. IPP is closed and its
//!   operation order could not be pinned down, so we compute the same sum exactly (f64): the two
//!   agree except where the exact value lies within ~2·10⁻⁵ of a rounding boundary and IPP's
//!   float32 error decides, about one value (±1) per 224×224×3 crop (53 of 7.8 million on
//!   photos, ramps and noise of 52 sizes).
//! * **OpenCV's own code**, used for thinner sources (IPP declines them) or with
//!   `cv2.ipp.setUseIPP(False)`: 11-bit fixed-point coefficients, an integer horizontal pass, and
//!   a vertical pass that is float32 for the SIMD-width part of each row and integer for the
//!   tail. Reproduced bit for bit ([`CubicArithmetic::OpenCvNoIpp`]).
//!
//! Decoding must match too. JPEGs go through mozjpeg, a libjpeg-turbo fork with the decoder
//! OpenCV uses (the `image` crate's zune-jpeg rounds the IDCT, the 4:2:0 "fancy" chroma
//! upsampling and YCbCr → RGB differently: ±1–6 levels on up to ~20 % of a photo's pixels).
//! Other formats decode identically through the `image` crate.
//!
//! Only the 224×224 crop is ever computed: an output pixel of a separable resize depends only
//! on its own coordinates and the source, so a 1×5000 image (resized to 256×1 280 000) costs
//! the same as any other.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{
    DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, Rgb, RgbImage,
};

/// Side of the square centre crop fed to the network.
pub const INPUT_SIZE: u32 = 224;
/// Short side after `Scale`, before the crop.
pub const RESIZE_SHORT_SIDE: u32 = 256;
/// Per-channel (RGB) mean of the ImageNet normalisation, on the `[0, 1]` scale.
pub const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
/// Per-channel (RGB) standard deviation of the ImageNet normalisation.
pub const STD: [f64; 3] = [0.229, 0.224, 0.225];
/// Default cap on `width × height` of an input image, checked before any pixel is decoded.
pub const DEFAULT_MAX_PIXELS: u64 = 50_000_000;

/// Why image bytes could not be turned into a network input.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// No bytes at all.
    #[error("empty input: no image bytes")]
    EmptyInput,
    /// Unrecognised signature, or a format this build has no decoder for.
    #[error("not a supported image: {found}")]
    NotAnImage {
        /// What the bytes look like: their first bytes, or the format that was recognised.
        found: String,
    },
    /// The header announces more pixels than allowed (checked before decoding pixels).
    #[error("image is {width}x{height} = {} pixels, over the limit of {limit}", u64::from(*width) * u64::from(*height))]
    TooManyPixels {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The `max_pixels` in force.
        limit: u64,
    },
    /// The header announces a zero width or height.
    #[error("image has no pixels ({width}x{height})")]
    ZeroSize {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
    },
    /// A recognised format that failed to decode: corrupt, truncated, or an unsupported variant
    /// (e.g. some CMYK or 12-bit JPEGs).
    #[error("could not decode {format} image: {message}")]
    DecodeFailed {
        /// The recognised format, e.g. `Png`.
        format: String,
        /// The decoder's message.
        message: String,
    },
}

impl PreprocessError {
    /// Stable snake_case name of the variant, for machine-readable error bodies:
    /// `empty_input`, `not_an_image`, `too_many_pixels`, `zero_size`, `decode_failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::EmptyInput => "empty_input",
            Self::NotAnImage { .. } => "not_an_image",
            Self::TooManyPixels { .. } => "too_many_pixels",
            Self::ZeroSize { .. } => "zero_size",
            Self::DecodeFailed { .. } => "decode_failed",
        }
    }
}

/// Image bytes → normalised CHW float32 input, length `3 * 224 * 224`: [`decode_rgb8`],
/// [`resize_crop`], [`normalize`].
pub fn preprocess(bytes: &[u8], max_pixels: u64) -> Result<Vec<f32>, PreprocessError> {
    let image = decode_rgb8(bytes, max_pixels)?;
    Ok(normalize(&resize_crop(&image)))
}

// ---------------------------------------------------------------------------------------------
// decoding
// ---------------------------------------------------------------------------------------------

/// Decodes JPEG, PNG, BMP, WebP, GIF (first frame) or TIFF to RGB8 the way
/// `cv2.imread(path, cv2.IMREAD_COLOR)` + `BGR2RGB` does: EXIF orientation applied, alpha dropped
/// (not composited), grey replicated to three channels, 16-bit samples reduced to 8 bits.
///
/// JPEG pixels are libjpeg-turbo's (mozjpeg), as in OpenCV; CMYK JPEGs fall back to the
/// `image` crate.
///
/// The format is guessed from the bytes, never from a name. `width × height` is checked against
/// `max_pixels` from the header, before any pixel is decoded or allocated.
pub fn decode_rgb8(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::EmptyInput);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_failed("unknown", e))?;
    let Some(format) = reader.format() else {
        return Err(PreprocessError::NotAnImage {
            found: describe_signature(bytes),
        });
    };
    reader.limits(decoder_limits(max_pixels));
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| map_image_error(e, format))?;

    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(PreprocessError::ZeroSize { width, height });
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(PreprocessError::TooManyPixels {
            width,
            height,
            limit: max_pixels,
        });
    }
    // OpenCV ignores EXIF it cannot parse; so do we.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let rgb = match format {
        ImageFormat::Jpeg => match decode_jpeg_like_libjpeg_turbo(bytes)? {
            Some(rgb) => rgb,
            None => decode_with_image(decoder, format)?,
        },
        _ => decode_with_image(decoder, format)?,
    };
    let mut rgb = DynamicImage::ImageRgb8(rgb);
    rgb.apply_orientation(orientation);
    Ok(rgb.into_rgb8())
}

fn decode_with_image(
    decoder: impl image::ImageDecoder,
    format: ImageFormat,
) -> Result<RgbImage, PreprocessError> {
    let decoded = DynamicImage::from_decoder(decoder).map_err(|e| map_image_error(e, format))?;
    Ok(to_rgb8_like_opencv(decoded, format))
}

/// JPEG pixels exactly as OpenCV's libjpeg-turbo makes them (ISLOW inverse DCT, "fancy"
/// triangle-filter chroma upsampling, its fixed-point YCbCr→RGB). mozjpeg is a libjpeg-turbo
/// fork with the same decoder; the `image` crate's zune-jpeg rounds differently (up to 4 levels
/// off on 4:2:0 files). Returns `None` for CMYK/YCCK files, which libjpeg cannot turn into RGB;
/// those go through the `image` crate.
fn decode_jpeg_like_libjpeg_turbo(bytes: &[u8]) -> Result<Option<RgbImage>, PreprocessError> {
    use mozjpeg::ColorSpace;
    // libjpeg reports fatal errors by unwinding (mozjpeg's error manager uses
    // `resume_unwind`, which skips the panic hook); catch it and turn it into an error.
    let decoded =
        std::panic::catch_unwind(|| -> std::io::Result<Option<(usize, usize, Vec<u8>)>> {
            let d = mozjpeg::Decompress::new_mem(bytes)?;
            if matches!(d.color_space(), ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK) {
                return Ok(None);
            }
            let mut started = d.rgb()?;
            let (w, h) = (started.width(), started.height());
            let pixels = started.read_scanlines::<u8>()?;
            started.finish()?;
            Ok(Some((w, h, pixels)))
        });
    let (w, h, pixels) = match decoded {
        Ok(Ok(Some(d))) => d,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(e)) => return Err(decode_failed("jpeg", e)),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg error".into());
            return Err(decode_failed("jpeg", msg));
        }
    };
    let (w32, h32) = (u32::try_from(w), u32::try_from(h));
    match (w32, h32) {
        (Ok(w32), Ok(h32)) => RgbImage::from_raw(w32, h32, pixels)
            .map(Some)
            .ok_or_else(|| decode_failed("jpeg", "libjpeg returned a short image")),
        _ => Err(decode_failed("jpeg", "image too large")),
    }
}

/// Allocation cap handed to the decoders. The pixel check is the real guard; this backstops
/// decoder-internal buffers: 16 bytes per allowed pixel (RGBA f32, the widest layout) plus
/// 64 MiB for metadata.
fn decoder_limits(max_pixels: u64) -> Limits {
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(16).saturating_add(64 << 20));
    limits
}

/// 8-bit RGB as `IMREAD_COLOR` produces it. The 16-bit reduction differs by codec in OpenCV:
/// libpng's `png_set_strip_16` (and OpenCV's grey TIFF path) keep the high byte (`v >> 8`), while
/// colour TIFFs are scaled with rounding (`(v + 128) / 257`, which is also the `image` crate's
/// conversion).
fn to_rgb8_like_opencv(image: DynamicImage, format: ImageFormat) -> RgbImage {
    let high = |v: u16| (v >> 8) as u8;
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgb16(_) | DynamicImage::ImageRgba16(_)
            if format == ImageFormat::Tiff =>
        {
            image.to_rgb8()
        }
        DynamicImage::ImageRgb16(img) => RgbImage::from_fn(img.width(), img.height(), |x, y| {
            let p = img.get_pixel(x, y);
            Rgb([high(p[0]), high(p[1]), high(p[2])])
        }),
        DynamicImage::ImageRgba16(img) => RgbImage::from_fn(img.width(), img.height(), |x, y| {
            let p = img.get_pixel(x, y);
            Rgb([high(p[0]), high(p[1]), high(p[2])])
        }),
        DynamicImage::ImageLuma16(img) => RgbImage::from_fn(img.width(), img.height(), |x, y| {
            let v = high(img.get_pixel(x, y)[0]);
            Rgb([v, v, v])
        }),
        DynamicImage::ImageLumaA16(img) => RgbImage::from_fn(img.width(), img.height(), |x, y| {
            let v = high(img.get_pixel(x, y)[0]);
            Rgb([v, v, v])
        }),
        // 8-bit grey / grey+alpha / RGBA (alpha dropped, not composited) and float layouts.
        other => other.to_rgb8(),
    }
}

fn decode_failed(format: &str, error: impl std::fmt::Display) -> PreprocessError {
    PreprocessError::DecodeFailed {
        format: format.to_string(),
        message: error.to_string(),
    }
}

fn map_image_error(error: ImageError, format: ImageFormat) -> PreprocessError {
    let name = format!("{format:?}");
    match error {
        ImageError::Unsupported(e)
            if matches!(e.kind(), image::error::UnsupportedErrorKind::Format(_)) =>
        {
            PreprocessError::NotAnImage {
                found: format!("{name} (no decoder for it in this build)"),
            }
        }
        ImageError::Limits(e) => decode_failed(&name, format!("decoder memory limit: {e}")),
        other => decode_failed(&name, other),
    }
}

/// `first bytes 3c 21 44 4f … ("<!DO…")`, for an error message.
fn describe_signature(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(8)];
    let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
    let text: String = head
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    format!(
        "unrecognised signature, first bytes {} ({text:?}), {} bytes in all",
        hex.join(" "),
        bytes.len()
    )
}

// ---------------------------------------------------------------------------------------------
// Scale(256) + CenterCrop(224)
// ---------------------------------------------------------------------------------------------

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
    ((len as f64 - f64::from(INPUT_SIZE)) / 2.0).round_ties_even() as u64
}

/// `Scale(256)` with OpenCV `INTER_CUBIC`, then `CenterCrop(224)`: 224×224 RGB8, as stock
/// opencv-python computes it ([`CubicArithmetic::OpenCvPython`]).
///
/// An image with no pixels (which [`decode_rgb8`] never returns) gives a black crop.
pub fn resize_crop(img: &RgbImage) -> RgbImage {
    resize_crop_with(img, CubicArithmetic::default())
}

/// [`resize_crop`] with a chosen bicubic implementation.
pub fn resize_crop_with(img: &RgbImage, arithmetic: CubicArithmetic) -> RgbImage {
    let (width, height) = img.dimensions();
    if width == 0 || height == 0 {
        return RgbImage::new(INPUT_SIZE, INPUT_SIZE);
    }
    let (dst_w, dst_h) = scaled_size(width, height);
    let (x0, y0) = (crop_offset(dst_w), crop_offset(dst_h));
    if (dst_w, dst_h) == (u64::from(width), u64::from(height)) {
        // Scale is a no-op (cv2.resize to the same size would copy too).
        return image::imageops::crop_imm(img, x0 as u32, y0 as u32, INPUT_SIZE, INPUT_SIZE)
            .to_image();
    }
    resample_window(
        img,
        (dst_w, dst_h),
        (x0, y0),
        (INPUT_SIZE, INPUT_SIZE),
        arithmetic,
    )
}

/// The window `[x0, x0 + out_w) × [y0, y0 + out_h)` of `img` resized to `dst_w × dst_h`.
fn resample_window(
    img: &RgbImage,
    (dst_w, dst_h): (u64, u64),
    (x0, y0): (u64, u64),
    (out_w, out_h): (u32, u32),
    arithmetic: CubicArithmetic,
) -> RgbImage {
    let (w, h) = img.dimensions();
    // opencv-python's IPP hook refuses sources thinner than the 4-tap kernel and falls back.
    let ipp = arithmetic == CubicArithmetic::OpenCvPython && w >= 4 && h >= 4;
    let src = Source {
        data: img.as_raw(),
        row_len: w as usize * 3,
    };
    let data = if ipp {
        let xs = axis(u64::from(w), dst_w, x0, out_w, keys_taps);
        let ys = axis(u64::from(h), dst_h, y0, out_h, keys_taps);
        separable(&src, &xs, &ys, |_, rows, wy| {
            let v = ((rows[0] * wy[0] + rows[1] * wy[1]) + rows[2] * wy[2]) + rows[3] * wy[3];
            rint_f64(v).clamp(0.0, 255.0) as u8
        })
    } else {
        let xs = axis(u64::from(w), dst_w, x0, out_w, opencv_taps);
        let ys = axis(u64::from(h), dst_h, y0, out_h, opencv_taps);
        // OpenCV's vertical pass runs 8 int16 lanes (SSE) at a time over the *full* output row
        // of `dst_w * 3` values and finishes the remainder with scalar code.
        let simd_end = dst_w * 3 / 8 * 8;
        let first = x0 * 3;
        separable(&src, &xs, &ys, |e, rows, b| {
            if first + (e as u64) < simd_end {
                opencv_vertical_simd(rows, b)
            } else {
                opencv_vertical_scalar(rows, b)
            }
        })
    };
    // `data` has exactly out_w * out_h * 3 samples by construction.
    RgbImage::from_raw(out_w, out_h, data).unwrap_or_else(|| RgbImage::new(out_w, out_h))
}

struct Source<'a> {
    data: &'a [u8],
    row_len: usize,
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

/// Runs the horizontal pass once per source row that some output row needs, then
/// `vertical(e, [h0, h1, h2, h3], weights)` for every output sample `e` (row-major, RGB
/// interleaved, counted within the window's row).
fn separable<W: Accum>(
    src: &Source,
    xs: &[Taps<W>],
    ys: &[Taps<W>],
    vertical: impl Fn(usize, [W; 4], &[W; 4]) -> u8,
) -> Vec<u8> {
    let width = xs.len() * 3;
    let (Some(first), Some(last)) = (ys.first(), ys.last()) else {
        return Vec::new();
    };
    // Source rows needed form a band (taps are monotone in the output row).
    let lo = first.0[0];
    let hi = last.0[3];
    let mut slot = vec![usize::MAX; hi - lo + 1];
    // At most 4 distinct rows per output row; usually far fewer when upscaling.
    let mut rows: Vec<W> = Vec::with_capacity(width * (hi - lo + 1).min(4 * ys.len()));
    let mut out = vec![0u8; width * ys.len()];
    for ((ry, wy), out_row) in ys.iter().zip(out.chunks_exact_mut(width)) {
        let mut at = [0usize; 4];
        for (k, &r) in ry.iter().enumerate() {
            if slot[r - lo] == usize::MAX {
                let start = rows.len();
                slot[r - lo] = start;
                rows.resize(start + width, W::default());
                let line = &src.data[r * src.row_len..(r + 1) * src.row_len];
                for ((rx, wx), h) in xs.iter().zip(rows[start..].chunks_exact_mut(3)) {
                    let px = rx.map(|x| &line[x * 3..x * 3 + 3]);
                    for (c, h) in h.iter_mut().enumerate() {
                        *h = W::hsum(px.map(|p| p[c]), wx);
                    }
                }
            }
            at[k] = slot[r - lo];
        }
        let [r0, r1, r2, r3] = at.map(|i| &rows[i..i + width]);
        let samples = r0.iter().zip(r1).zip(r2).zip(r3);
        for (e, (o, (((&h0, &h1), &h2), &h3))) in out_row.iter_mut().zip(samples).enumerate() {
            *o = vertical(e, [h0, h1, h2, h3], wy);
        }
    }
    out
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

// ---------------------------------------------------------------------------------------------
// normalisation
// ---------------------------------------------------------------------------------------------

/// RGB8 → CHW float32 (`3 * width * height` values; `3 * 224 * 224` for a crop):
/// `(v as f32 / 255 - MEAN) / STD`. As in numpy, the division is float32 and the mean/std
/// arithmetic float64 (the constants are Python lists), rounded to float32 at the end; there
/// are only 256 inputs per channel, so it is a table lookup.
pub fn normalize(crop: &RgbImage) -> Vec<f32> {
    let lut: [[f32; 256]; 3] = std::array::from_fn(|c| {
        std::array::from_fn(|v| ((f64::from(v as f32 / 255.0) - MEAN[c]) / STD[c]) as f32)
    });
    let plane = crop.width() as usize * crop.height() as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, px) in crop.pixels().enumerate() {
        for (c, table) in lut.iter().enumerate() {
            out[c * plane + i] = table[usize::from(px[c])];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma};

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

    /// Deterministic pseudo-random RGB image (xorshift), so tests need no fixtures.
    fn noise(width: u32, height: u32, seed: u32) -> RgbImage {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        RgbImage::from_fn(width, height, |_, _| {
            Rgb(std::array::from_fn(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 24) as u8
            }))
        })
    }

    fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Cursor::new(Vec::new());
        image.write_to(&mut bytes, format).expect("encode");
        bytes.into_inner()
    }

    fn kind_of(bytes: &[u8], max_pixels: u64) -> &'static str {
        match decode_rgb8(bytes, max_pixels) {
            Ok(img) => panic!("decoded a {}x{} image", img.width(), img.height()),
            Err(e) => e.kind(),
        }
    }

    /// A PNG that is only a signature, an IHDR for `width × height` RGB8, and an empty IDAT.
    fn png_header(width: u32, height: u32) -> Vec<u8> {
        fn crc32(data: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &b in data {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0xedb8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            png.extend((data.len() as u32).to_be_bytes());
            let body = [kind, data].concat();
            png.extend(&body);
            png.extend(crc32(&body).to_be_bytes());
        };
        let ihdr = [
            &width.to_be_bytes()[..],
            &height.to_be_bytes(),
            &[8, 2, 0, 0, 0],
        ]
        .concat();
        chunk(b"IHDR", &ihdr);
        chunk(b"IDAT", &[]);
        chunk(b"IEND", &[]);
        png
    }

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
                let out = resample_window(&img, (w.into(), h.into()), (0, 0), (w, h), arithmetic);
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

    #[test]
    fn error_kinds() {
        assert_eq!(kind_of(b"", 100), "empty_input");
        assert_eq!(
            kind_of(b"<!DOCTYPE html><html></html>", 100),
            "not_an_image"
        );
        assert_eq!(kind_of(&[0u8; 3], 100), "not_an_image");
        // recognised, but no decoder compiled in
        assert_eq!(
            kind_of(b"qoif\0\0\0\x10\0\0\0\x10\x03\0", 100),
            "not_an_image"
        );
        let msg = decode_rgb8(b"GIF", 100).unwrap_err().to_string();
        assert!(msg.contains("47 49 46"), "{msg}");

        // A header claiming 100000×100000 must be refused before anything is allocated.
        let huge = png_header(100_000, 100_000);
        match decode_rgb8(&huge, DEFAULT_MAX_PIXELS) {
            Err(PreprocessError::TooManyPixels {
                width,
                height,
                limit,
            }) => {
                assert_eq!(
                    (width, height, limit),
                    (100_000, 100_000, DEFAULT_MAX_PIXELS)
                );
            }
            other => panic!("{other:?}"),
        }
        // ... and the same header within the limit fails as a decode error (no pixel data).
        assert_eq!(kind_of(&png_header(10, 10), 100), "decode_failed");

        let png = encode(DynamicImage::ImageRgb8(noise(20, 10, 5)), ImageFormat::Png);
        assert_eq!(
            decode_rgb8(&png, 200).expect("decode").dimensions(),
            (20, 10)
        );
        assert_eq!(kind_of(&png, 199), "too_many_pixels");
        assert_eq!(kind_of(&png[..png.len() / 2], 200), "decode_failed");
        let bmp = encode(DynamicImage::ImageRgb8(noise(20, 10, 5)), ImageFormat::Bmp);
        assert_eq!(kind_of(&bmp[..60], 200), "decode_failed");
        let err = preprocess(&png[..30], 200).unwrap_err();
        assert_eq!(err.kind(), "decode_failed");
    }

    #[test]
    fn grey_alpha_and_sixteen_bit_like_imread() {
        let grey = ImageBuffer::from_fn(6, 5, |x, y| Luma([(x * 40 + y) as u8]));
        let png = encode(DynamicImage::ImageLuma8(grey.clone()), ImageFormat::Png);
        let rgb = decode_rgb8(&png, 100).expect("grey png");
        assert!(rgb
            .enumerate_pixels()
            .all(|(x, y, p)| p.0 == [grey.get_pixel(x, y)[0]; 3]));

        let rgba = image::RgbaImage::from_fn(6, 5, |x, y| image::Rgba([x as u8, y as u8, 7, 0]));
        let png = encode(DynamicImage::ImageRgba8(rgba), ImageFormat::Png);
        let rgb = decode_rgb8(&png, 100).expect("rgba png");
        assert!(rgb
            .enumerate_pixels()
            .all(|(x, y, p)| p.0 == [x as u8, y as u8, 7]));

        // 16 bit: PNG keeps the high byte (libpng strip_16), colour TIFF rounds v / 257,
        // grey TIFF keeps the high byte, as cv2.imread(IMREAD_COLOR) does.
        let v16 = |x: u32, y: u32| (x * 9000 + y * 1234 + 127) as u16;
        let rgb16 = ImageBuffer::from_fn(7, 4, |x, y| Rgb([v16(x, y), 65535 - v16(x, y), 128]));
        let luma16 = ImageBuffer::from_fn(7, 4, |x, y| Luma([v16(x, y)]));
        let high = |v: u16| (v >> 8) as u8;
        let round = |v: u16| ((u32::from(v) + 128) / 257) as u8;
        let png = encode(DynamicImage::ImageRgb16(rgb16.clone()), ImageFormat::Png);
        let out = decode_rgb8(&png, 100).expect("png16");
        assert!(out
            .enumerate_pixels()
            .all(|(x, y, p)| p.0 == [high(v16(x, y)), high(65535 - v16(x, y)), 0]));
        let tif = encode(DynamicImage::ImageRgb16(rgb16), ImageFormat::Tiff);
        let out = decode_rgb8(&tif, 100).expect("tiff16");
        assert!(out
            .enumerate_pixels()
            .all(|(x, y, p)| p.0 == [round(v16(x, y)), round(65535 - v16(x, y)), 0]));
        let tif = encode(DynamicImage::ImageLuma16(luma16), ImageFormat::Tiff);
        let out = decode_rgb8(&tif, 100).expect("grey tiff16");
        assert!(out
            .enumerate_pixels()
            .all(|(x, y, p)| p.0 == [high(v16(x, y)); 3]));
    }

    #[test]
    fn normalize_is_chw_with_numpy_rounding() {
        let img = RgbImage::from_fn(3, 2, |x, y| Rgb([(x + 3 * y) as u8, 255, 0]));
        let out = normalize(&img);
        assert_eq!(out.len(), 18);
        let expect =
            |v: u8, c: usize| ((f64::from(f32::from(v) / 255.0) - MEAN[c]) / STD[c]) as f32;
        for i in 0..6 {
            assert_eq!(out[i], expect(i as u8, 0));
            assert_eq!(out[6 + i], expect(255, 1));
            assert_eq!(out[12 + i], expect(0, 2));
        }
        // numpy: (0.0 - 0.485) / 0.229 = -2.1179039301310043 → float32
        assert_eq!(out[0], -2.117_904_f32);
        assert_eq!(
            normalize(&resize_crop(&noise(300, 400, 1))).len(),
            3 * 224 * 224
        );
    }
}
