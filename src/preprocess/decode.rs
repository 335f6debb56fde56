//! Image bytes → RGB8, as `cv2.imread(path, cv2.IMREAD_COLOR)` + `cv2.cvtColor(BGR2RGB)`
//! make it.

use std::{ffi::c_int, io::Cursor, panic::AssertUnwindSafe};

use image::metadata::Orientation;
use image::{
    DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, Rgb, RgbImage,
};

use super::PreprocessError;
use crate::panic::panic_message;

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
    decode_opened(bytes, open(bytes, max_pixels)?)
}

/// An image whose header has been read and checked against the limits.
pub(super) struct Opened<D> {
    /// The format, recognised from the bytes.
    pub(super) format: ImageFormat,
    /// The EXIF orientation (none when absent or unreadable, as in OpenCV).
    pub(super) orientation: Orientation,
    decoder: D,
}

/// Recognises the format and reads the header: size checked against `max_pixels`, EXIF
/// orientation read; no pixel decoded yet.
pub(super) fn open(
    bytes: &[u8],
    max_pixels: u64,
) -> Result<Opened<impl ImageDecoder + '_>, PreprocessError> {
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
    check_size(width, height, max_pixels)?;
    // OpenCV ignores EXIF it cannot parse; so do we.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    Ok(Opened {
        format,
        orientation,
        decoder,
    })
}

impl<D: ImageDecoder> Opened<D> {
    /// Width and height from the header.
    pub(super) fn dimensions(&self) -> (u32, u32) {
        self.decoder.dimensions()
    }

    /// An upper bound on the memory decoding this image takes at its peak, in bytes, from its
    /// header alone (what [`super::probe`] reports):
    ///
    /// * JPEG (libjpeg): the RGB8 output (3 bytes a pixel), a progressive file's coefficient
    ///   buffers (2 bytes per sample, at most 3 samples a pixel: 6), and the copy an EXIF
    ///   rotation makes (3): 12 bytes a pixel.
    /// * Other formats (the `image` crate): the decoded image in its own layout
    ///   (`width × height × channels × bytes per sample`), as much again for the decoder's
    ///   working buffers (a GIF's canvas, a WebP's or TIFF's planes), the RGB8 conversion (3)
    ///   and the rotated copy (3).
    ///
    /// Plus 1 MiB for decoder state and the network input.
    pub(super) fn decode_cost(&self) -> u64 {
        let (width, height) = self.decoder.dimensions();
        let pixels = u64::from(width) * u64::from(height);
        let image = match self.format {
            ImageFormat::Jpeg => pixels.saturating_mul(12),
            _ => self
                .decoder
                .total_bytes()
                .saturating_mul(2)
                .saturating_add(pixels.saturating_mul(6)),
        };
        image.saturating_add(1 << 20)
    }
}

/// Decodes an [`open`]ed image (`bytes` are the same file).
pub(super) fn decode_opened(
    bytes: &[u8],
    opened: Opened<impl ImageDecoder>,
) -> Result<RgbImage, PreprocessError> {
    let Opened {
        format,
        orientation,
        decoder,
    } = opened;
    let rgb = match format {
        ImageFormat::Jpeg => match jpeg_rgb8(bytes)? {
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
    decoder: impl ImageDecoder,
    format: ImageFormat,
) -> Result<RgbImage, PreprocessError> {
    let decoded = DynamicImage::from_decoder(decoder).map_err(|e| map_image_error(e, format))?;
    Ok(to_rgb8_like_opencv(decoded, format))
}

/// What [`decode_jpeg`] hands over, in this order: the size, then the rows, top to bottom.
pub(super) enum JpegRows {
    /// Width and height in pixels.
    Size(usize, usize),
    /// The next rows, RGB8; whole rows, `chunk_rows` of them except perhaps in the last chunk.
    Rows(Vec<u8>),
}

/// Decodes a JPEG to RGB8 exactly as OpenCV's libjpeg-turbo does (ISLOW inverse DCT, "fancy"
/// triangle-filter chroma upsampling, its fixed-point YCbCr→RGB). mozjpeg is a libjpeg-turbo
/// fork with the same decoder; the `image` crate's zune-jpeg rounds differently (up to 4 levels
/// off on 4:2:0 files).
///
/// `sink` gets the size, then the rows in chunks of `chunk_rows` as they are decoded, so another
/// thread can work on the top of the image while the bottom is still being decoded. Returns
/// `false`, having handed over nothing, for CMYK/YCCK files, which libjpeg cannot turn into RGB.
/// EXIF orientation is not applied.
pub(super) fn decode_jpeg(
    bytes: &[u8],
    chunk_rows: usize,
    mut sink: impl FnMut(JpegRows),
) -> Result<bool, PreprocessError> {
    use mozjpeg::ColorSpace;
    // libjpeg reports fatal errors by unwinding (mozjpeg's error manager uses
    // `resume_unwind`, which skips the panic hook); catch it and turn it into an error.
    let decoded = std::panic::catch_unwind(AssertUnwindSafe(|| -> std::io::Result<bool> {
        let d = mozjpeg::Decompress::builder()
            .with_err(strict_error_mgr())
            .from_mem(bytes)?;
        if matches!(d.color_space(), ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK) {
            return Ok(false);
        }
        let mut started = d.rgb()?;
        let (width, height) = (started.width(), started.height());
        sink(JpegRows::Size(width, height));
        if chunk_rows >= height {
            // All at once, into one fallibly reserved buffer.
            sink(JpegRows::Rows(started.read_scanlines::<u8>()?));
        } else {
            let mut left = height;
            while left > 0 {
                let n = chunk_rows.clamp(1, left);
                let mut rows = vec![0u8; n * width * 3];
                started.read_scanlines_into(&mut rows)?;
                sink(JpegRows::Rows(rows));
                left -= n;
            }
        }
        started.finish()?;
        Ok(true)
    }));
    match decoded {
        Ok(Ok(rgb)) => Ok(rgb),
        Ok(Err(e)) => Err(decode_failed("jpeg", e)),
        Err(payload) => Err(decode_failed(
            "jpeg",
            panic_message(&*payload, "libjpeg error"),
        )),
    }
}

/// An image of `width × height` may be preprocessed: it has pixels, at most `max_pixels`.
pub(super) fn check_size(width: u32, height: u32, max_pixels: u64) -> Result<(), PreprocessError> {
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
    Ok(())
}

extern "C" {
    /// libjpeg-turbo's own test of its SIMD inverse DCT: 1 when the library was built with its
    /// SIMD code (`nasm` present at build time) and this CPU runs it. Defined in both builds
    /// (`jsimd_none.c` answers 0).
    fn jsimd_can_idct_islow() -> c_int;
}

/// True when JPEGs decode with libjpeg-turbo's SIMD code. Without `nasm` at build time
/// mozjpeg-sys falls back to plain C (about 3× slower), and cargo hides its warning, so the
/// server reports this in `/info` and logs a warning.
pub fn jpeg_simd() -> bool {
    // SAFETY: `int jsimd_can_idct_islow(void)`: no arguments; it reads the CPU's features into
    // the library's thread-local state and returns an int.
    unsafe { jsimd_can_idct_islow() != 0 }
}

/// libjpeg's error manager as we configure it: a fatal error unwinds with libjpeg's message
/// (caught by [`decode_jpeg`]), and so does a warning that the data ran out
/// (`JWRN_JPEG_EOF`: "premature end of JPEG file"; `JWRN_HIT_MARKER`: "premature end of data
/// segment"). libjpeg's default, and OpenCV's, is to fill the missing part of a truncated file
/// with grey and go on: the server would classify a mostly blank image with confidence. Other
/// warnings (e.g. extraneous bytes before a marker, common in camera files whose pixels are
/// whole) are ignored, as OpenCV does.
fn strict_error_mgr() -> mozjpeg_sys::jpeg_error_mgr {
    // SAFETY: `jpeg_error_mgr` is a C struct of integers, raw pointers and `Option`s of function
    // pointers, for all of which all-zero bytes are valid (null, `None`); `jpeg_std_error` then
    // fills in every field.
    let mut err: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    // SAFETY: `err` is a valid, exclusively borrowed error manager for the call's duration.
    unsafe {
        mozjpeg_sys::jpeg_std_error(&mut err);
    }
    err.error_exit = Some(jpeg_fatal);
    err.emit_message = Some(jpeg_message);
    err
}

/// libjpeg's `error_exit`: unwinds with its message (it must not return).
extern "C-unwind" fn jpeg_fatal(cinfo: &mut mozjpeg_sys::jpeg_common_struct) {
    let message = jpeg_message_text(cinfo);
    std::panic::resume_unwind(Box::new(message));
}

/// libjpeg's `emit_message`: a level below 0 is a warning; running out of data is fatal to us.
extern "C-unwind" fn jpeg_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct, level: c_int) {
    if level >= 0 {
        return; // trace messages
    }
    // SAFETY: libjpeg calls this with `cinfo.err` pointing at the error manager it was created
    // with, which lives as long as the decompressor.
    let code = unsafe { cinfo.err.as_ref() }.map_or(0, |e| e.msg_code);
    if code == mozjpeg_sys::JWRN_JPEG_EOF as c_int || code == mozjpeg_sys::JWRN_HIT_MARKER as c_int
    {
        std::panic::resume_unwind(Box::new(
            "premature end of JPEG data: the file is truncated".to_string(),
        ));
    }
}

/// The text of libjpeg's current message, as its `format_message` writes it.
fn jpeg_message_text(cinfo: &mut mozjpeg_sys::jpeg_common_struct) -> String {
    // JMSG_LENGTH_MAX in jerror.h.
    let mut buffer = [0u8; 200];
    // SAFETY: as in `jpeg_message`, `cinfo.err` is the live error manager.
    let format = unsafe { cinfo.err.as_ref() }.and_then(|e| e.format_message);
    if let Some(format) = format {
        // SAFETY: libjpeg's `format_message(cinfo, char *buffer)` writes at most JMSG_LENGTH_MAX
        // bytes, NUL included, into `buffer`. The binding declares the buffer as `&[u8; 80]`;
        // a pointer to our 200-byte buffer has the same ABI (one thin pointer), and C writes
        // through it, which is why it is passed as `*mut u8` instead.
        unsafe {
            let format: unsafe extern "C-unwind" fn(&mut mozjpeg_sys::jpeg_common_struct, *mut u8) =
                std::mem::transmute(format);
            format(cinfo, buffer.as_mut_ptr());
        }
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    match std::str::from_utf8(&buffer[..end]) {
        Ok("") | Err(_) => "libjpeg error".to_string(),
        Ok(text) => text.to_string(),
    }
}

/// [`decode_jpeg`] into one image; `None` for CMYK/YCCK files.
fn jpeg_rgb8(bytes: &[u8]) -> Result<Option<RgbImage>, PreprocessError> {
    let (mut size, mut data) = ((0, 0), Vec::new());
    let rgb = decode_jpeg(bytes, usize::MAX, |part| match part {
        JpegRows::Size(w, h) => size = (w, h),
        JpegRows::Rows(rows) => data = rows,
    })?;
    if !rgb {
        return Ok(None);
    }
    match (u32::try_from(size.0), u32::try_from(size.1)) {
        (Ok(w), Ok(h)) => RgbImage::from_raw(w, h, data)
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

#[cfg(test)]
mod tests {
    use image::{ImageBuffer, Luma};

    use super::super::{
        testing::{encode, noise},
        DEFAULT_MAX_PIXELS,
    };
    use super::*;

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
    }

    #[test]
    fn a_truncated_jpeg_is_a_decode_error_not_a_grey_image() {
        let jpeg = encode(DynamicImage::ImageRgb8(noise(64, 48, 3)), ImageFormat::Jpeg);
        assert_eq!(
            decode_rgb8(&jpeg, 10_000).expect("whole").dimensions(),
            (64, 48)
        );
        for keep in [jpeg.len() / 2, jpeg.len() - 8] {
            let cut = &jpeg[..keep];
            let e = decode_rgb8(cut, 10_000).expect_err("truncated");
            assert_eq!(e.kind(), "decode_failed", "{e}");
            assert!(e.to_string().contains("premature end"), "{e}");
            // The pipelined path (one image in progress) says the same.
            let e = super::super::preprocess(cut, 10_000).expect_err("truncated");
            assert!(e.to_string().contains("premature end"), "{e}");
        }
        // A fatal libjpeg error still comes back with libjpeg's own message.
        let mut bad = jpeg.clone();
        let sof = bad
            .windows(2)
            .position(|w| w == [0xff, 0xc0])
            .expect("a baseline SOF");
        bad[sof + 4] = 13; // sample precision 13: not a JPEG libjpeg decodes
        let e = decode_rgb8(&bad, 10_000).expect_err("bad precision");
        assert_eq!(e.kind(), "decode_failed", "{e}");
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
}
