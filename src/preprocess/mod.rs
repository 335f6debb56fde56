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
//! [`decode_rgb8`] (`decode.rs`) → [`resize_crop`] (`resize/`) → [`normalize`]
//! (`normalize.rs`); [`preprocess`] chains them. For a JPEG preprocessed while no other image
//! is, it overlaps the first two: one thread decodes while another resizes the rows already
//! decoded (the same arithmetic, so the same bytes), which hides most of the resize's time
//! behind the decoder's.
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

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    mpsc,
};

use image::{metadata::Orientation, ImageFormat};

mod decode;
mod normalize;
mod resize;

pub use decode::{decode_rgb8, jpeg_simd};
pub use normalize::normalize;
pub use resize::{crop_offset, resize_crop, resize_crop_with, scaled_size, CubicArithmetic};

use decode::JpegRows;

use crate::tensor::INPUT_SIZE;

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

/// What an image's header says about the work of preprocessing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The format, recognised from the bytes.
    pub format: ImageFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// An upper bound on the memory [`preprocess`] takes at its peak for this image, in bytes:
    /// 12 bytes a pixel for a JPEG; for other formats twice the decoded layout (`width × height
    /// × channels × bytes per sample`) plus 6 bytes a pixel; plus 1 MiB.
    pub peak_bytes: u64,
}

/// Reads an image's header only (microseconds: no pixel is decoded): the format, the size
/// (checked against `max_pixels`, as [`preprocess`] does) and the memory decoding it will take,
/// so that a server can admit the work against a memory budget before starting it.
pub fn probe(bytes: &[u8], max_pixels: u64) -> Result<Probe, PreprocessError> {
    let opened = decode::open(bytes, max_pixels)?;
    let (width, height) = opened.dimensions();
    Ok(Probe {
        format: opened.format,
        width,
        height,
        peak_bytes: opened.decode_cost(),
    })
}

/// Image bytes → normalised CHW float32 input, length `3 * 224 * 224`: [`decode_rgb8`],
/// [`resize_crop`], [`normalize`], with the same result.
///
/// A JPEG that needs no EXIF rotation, preprocessed while no other image is, is resized on a
/// second thread while it is decoded: each output row is resized as soon as the source rows it
/// reads are decoded, which hides most of the resize behind the decoder (1.2 instead of 1.65 ms
/// for a 449×300 photo here). When several images are being preprocessed at once, the cores
/// are busy anyway and the hand-over would only add work, so each is done on one thread.
pub fn preprocess(bytes: &[u8], max_pixels: u64) -> Result<Vec<f32>, PreprocessError> {
    let alone = InProgress::enter();
    preprocess_with(bytes, max_pixels, alone.0)
}

/// [`preprocess`] entirely on the calling thread, never handing rows to a helper: for callers
/// that keep every core busy with images of their own (a helper would only add a thread).
pub fn preprocess_here(bytes: &[u8], max_pixels: u64) -> Result<Vec<f32>, PreprocessError> {
    preprocess_with(bytes, max_pixels, false)
}

fn preprocess_with(
    bytes: &[u8],
    max_pixels: u64,
    pipelined: bool,
) -> Result<Vec<f32>, PreprocessError> {
    let opened = decode::open(bytes, max_pixels)?;
    if pipelined
        && opened.format == ImageFormat::Jpeg
        && opened.orientation == Orientation::NoTransforms
    {
        if let Some(input) = jpeg_pipelined(bytes)? {
            return Ok(input);
        }
    }
    let image = decode::decode_opened(bytes, opened)?;
    Ok(normalize(&resize_crop(&image)))
}

/// RGB pixels, row-major (`height` rows of `width` × R, G, B), → the normalised CHW input: the
/// steps of [`preprocess`] after decoding ([`resize_crop`], [`normalize`]). For images that
/// arrive as pixel arrays (`uint8` `.npy` files).
pub fn from_rgb8(
    width: u32,
    height: u32,
    pixels: Vec<u8>,
    max_pixels: u64,
) -> Result<Vec<f32>, PreprocessError> {
    decode::check_size(width, height, max_pixels)?;
    let len = pixels.len();
    let image = image::RgbImage::from_raw(width, height, pixels).ok_or_else(|| {
        PreprocessError::DecodeFailed {
            format: "RGB array".into(),
            message: format!("{len} bytes for {width}x{height} pixels"),
        }
    })?;
    Ok(normalize(&resize_crop(&image)))
}

/// Counts the [`preprocess`] calls in progress in this process, while it lives; `.0` is true
/// for a call that started with no other in progress.
struct InProgress(bool);

static IN_PROGRESS: AtomicUsize = AtomicUsize::new(0);

impl InProgress {
    fn enter() -> Self {
        Self(IN_PROGRESS.fetch_add(1, Ordering::Relaxed) == 0)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        IN_PROGRESS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Rows per hand-over from the decoding thread to the resizing one: one iMCU row of a 4:2:0
/// JPEG, about 20 hand-overs for a 300-row photo.
const CHUNK_ROWS: usize = 16;

/// Decodes a JPEG on this thread while a scoped helper resizes, crops and normalises it.
/// `None` where that cannot be done (a CMYK file, or no thread to be had): the caller takes the
/// sequential path.
fn jpeg_pipelined(bytes: &[u8]) -> Result<Option<Vec<f32>>, PreprocessError> {
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        let resizer = std::thread::Builder::new()
            .name("preprocess".into())
            .spawn_scoped(scope, move || {
                let mut lines = Streamed::new(rx, CHUNK_ROWS)?;
                // Each crop row is normalised as soon as it is resized.
                let side = INPUT_SIZE;
                let mut input = vec![0.0; 3 * side * side];
                resize::resize_crop_lines(&mut lines, &mut |y, row| {
                    normalize::normalize_into(row, y * side, &mut input)
                });
                Some(input)
            });
        let Ok(resizer) = resizer else {
            return Ok(None);
        };
        // `tx` moves into the sink and drops when decoding ends, however it ends, so the
        // resizer never waits for rows that will not come.
        let decoded = decode::decode_jpeg(bytes, CHUNK_ROWS, move |rows| {
            let _ = tx.send(rows);
        });
        let input = resizer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // After a decoding error the resizer has worked on blank rows: its result is dropped.
        Ok(if decoded? { input } else { None })
    })
}

/// The rows of a JPEG still being decoded on another thread: `line(r)` waits until row `r` has
/// arrived. If decoding stops early (its error is reported by the decoding side), missing rows
/// read as black.
struct Streamed {
    rx: mpsc::Receiver<JpegRows>,
    size: (u32, u32),
    row_len: usize,
    chunk_rows: usize,
    chunks: Vec<Vec<u8>>,
    arrived: usize,
    blank: Vec<u8>,
}

impl Streamed {
    /// Waits for the image size; `None` if decoding stopped before it (an error or a CMYK file).
    fn new(rx: mpsc::Receiver<JpegRows>, chunk_rows: usize) -> Option<Self> {
        let Ok(JpegRows::Size(width, height)) = rx.recv() else {
            return None;
        };
        let size = (u32::try_from(width).ok()?, u32::try_from(height).ok()?);
        (width > 0 && height > 0).then(|| Self {
            rx,
            size,
            row_len: width * 3,
            chunk_rows,
            chunks: Vec::new(),
            arrived: 0,
            blank: vec![0; width * 3],
        })
    }
}

impl resize::Lines for Streamed {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn line(&mut self, r: usize) -> &[u8] {
        while self.arrived <= r {
            match self.rx.recv() {
                Ok(JpegRows::Rows(rows)) => {
                    self.arrived += rows.len() / self.row_len;
                    self.chunks.push(rows);
                }
                Ok(JpegRows::Size(..)) | Err(_) => return &self.blank,
            }
        }
        let (chunk, i) = (r / self.chunk_rows, r % self.chunk_rows);
        &self.chunks[chunk][i * self.row_len..(i + 1) * self.row_len]
    }
}

/// Test images made in code, for the tests of every step.
#[cfg(test)]
mod testing {
    use std::io::Cursor;

    use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

    /// Deterministic pseudo-random RGB image (xorshift), so tests need no fixtures.
    pub(super) fn noise(width: u32, height: u32, seed: u32) -> RgbImage {
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

    /// `image` encoded as `format`.
    pub(super) fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Cursor::new(Vec::new());
        image.write_to(&mut bytes, format).expect("encode");
        bytes.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use image::{DynamicImage, GrayImage, ImageFormat, Luma, Rgb, RgbImage};

    use super::testing::{encode, noise};
    use super::*;

    const CHELSEA: &[u8] = include_bytes!("../../tests/fixtures/images/chelsea.jpg");

    /// The three steps one after another, on one thread.
    fn steps(bytes: &[u8]) -> Result<Vec<f32>, PreprocessError> {
        Ok(normalize(&resize_crop(&decode_rgb8(
            bytes,
            DEFAULT_MAX_PIXELS,
        )?)))
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// A smooth colour ramp (JPEG keeps it close, unlike noise).
    fn ramp(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((x + y) % 256) as u8,
            ])
        })
    }

    #[test]
    fn pipelined_jpeg_decoding_gives_the_steps_bytes() {
        let mut jpegs = vec![("chelsea.jpg".to_string(), CHELSEA.to_vec())];
        for (w, h) in [
            (449, 300),
            (300, 449),
            (257, 1000),
            (1000, 257),
            (256, 300), // no resize, only the crop
            (300, 256),
            (64, 48), // upscaled
            (3, 500), // OpenCV's fixed-point path (IPP declines sources under 4 pixels)
            (1, 1),
        ] {
            for (kind, img) in [("ramp", ramp(w, h)), ("noise", noise(w, h, w ^ h))] {
                let jpeg = encode(DynamicImage::ImageRgb8(img), ImageFormat::Jpeg);
                jpegs.push((format!("{kind} {w}x{h}"), jpeg));
            }
        }
        let grey = GrayImage::from_fn(333, 250, |x, y| Luma([(x ^ y) as u8]));
        jpegs.push((
            "grey 333x250".into(),
            encode(DynamicImage::ImageLuma8(grey), ImageFormat::Jpeg),
        ));
        for (name, jpeg) in &jpegs {
            let expected = bits(&steps(jpeg).expect("decodes"));
            let pipelined = jpeg_pipelined(jpeg).expect("decodes").expect("RGB JPEG");
            assert_eq!(bits(&pipelined), expected, "{name}");
            assert_eq!(
                bits(&preprocess(jpeg, DEFAULT_MAX_PIXELS).expect("decodes")),
                expected
            );
        }
    }

    #[test]
    fn damaged_jpegs_give_the_steps_result() {
        let mut damaged: Vec<Vec<u8>> = [20, 200, 700, CHELSEA.len() / 2, CHELSEA.len() - 2]
            .iter()
            .map(|&n| CHELSEA[..n].to_vec())
            .collect();
        let mut flipped = CHELSEA.to_vec();
        for i in (2000..flipped.len() - 100).step_by(997) {
            flipped[i] ^= 0x5a;
        }
        damaged.push(flipped);
        for (i, bytes) in damaged.iter().enumerate() {
            match (steps(bytes), preprocess(bytes, DEFAULT_MAX_PIXELS)) {
                (Ok(a), Ok(b)) => assert_eq!(bits(&a), bits(&b), "case {i}"),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "case {i}"),
                (a, b) => panic!("case {i}: steps {:?}, pipelined {:?}", a.err(), b.err()),
            }
        }
        let err = preprocess(&CHELSEA[..30], DEFAULT_MAX_PIXELS).unwrap_err();
        assert_eq!(err.kind(), "decode_failed");
    }

    #[test]
    fn streamed_rows_wait_for_the_decoder_and_read_black_after_it_stopped() {
        let (tx, rx) = mpsc::channel();
        drop(tx);
        assert!(Streamed::new(rx, 2).is_none(), "no size: nothing to resize");

        let (tx, rx) = mpsc::channel();
        tx.send(JpegRows::Size(2, 5)).expect("send");
        let mut lines = Streamed::new(rx, 2).expect("size");
        let feeder = std::thread::spawn(move || {
            tx.send(JpegRows::Rows((0..12).collect())).expect("send");
            tx.send(JpegRows::Rows((12..24).collect())).expect("send");
            // stops before the last row
        });
        use resize::Lines;
        assert_eq!(lines.size(), (2, 5));
        assert_eq!(lines.line(3), &[18, 19, 20, 21, 22, 23]);
        assert_eq!(lines.line(0), &[0, 1, 2, 3, 4, 5]);
        feeder.join().expect("feeder");
        assert_eq!(lines.line(4), &[0; 6]);
    }
}
