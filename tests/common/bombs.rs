//! Memory bombs: small files that announce a huge image. Each decodes (or starts decoding) a
//! `side × side` picture, hundreds of MiB, from a file of a few hundred KB at most. Shared by
//! the server test (`tests/server/limits.rs`) and the bench (`bench/hostile.rs`).

use std::io::Cursor;

/// One bomb: its name and its bytes.
pub struct Bomb {
    /// Format and kind, e.g. `png16`.
    pub name: &'static str,
    /// Its `Content-Type`, e.g. `image/png`.
    pub content_type: &'static str,
    /// The file.
    pub bytes: Vec<u8>,
}

/// The bombs of side `side`: a 16-bit RGB PNG, a progressive JPEG (whole, and truncated to
/// its first 3,000 bytes), a lossless WebP, a GIF and an LZW-compressed TIFF, all of one
/// colour.
pub fn bombs(side: u32) -> Vec<Bomb> {
    let n = side as usize;
    let png16 = {
        let img: image::ImageBuffer<image::Rgb<u16>, Vec<u16>> =
            image::ImageBuffer::from_pixel(side, side, image::Rgb([1000, 20000, 40000]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let rgb = vec![90u8; n * n * 3];
    let jpeg = {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        c.set_size(n, n);
        c.set_fastest_defaults();
        c.set_quality(50.0);
        c.set_progressive_mode();
        let mut started = c.start_compress(Vec::new()).unwrap();
        started.write_scanlines(&rgb).unwrap();
        started.finish().unwrap()
    };
    let webp = {
        let mut out = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut out)
            .encode(&rgb, side, side, image::ExtendedColorType::Rgb8)
            .unwrap();
        out
    };
    let gif = {
        let mut out = Vec::new();
        let side = u16::try_from(side).expect("GIF sides fit in 16 bits");
        let mut e = gif::Encoder::new(&mut out, side, side, &[90, 90, 90, 0, 0, 0]).unwrap();
        let frame = gif::Frame {
            width: side,
            height: side,
            buffer: std::borrow::Cow::Owned(vec![0u8; n * n]),
            ..gif::Frame::default()
        };
        e.write_frame(&frame).unwrap();
        drop(e);
        out
    };
    let tiff = {
        let mut out = Cursor::new(Vec::new());
        tiff::encoder::TiffEncoder::new(&mut out)
            .unwrap()
            .with_compression(tiff::encoder::Compression::Lzw)
            .write_image::<tiff::encoder::colortype::RGB8>(side, side, &rgb)
            .unwrap();
        out.into_inner()
    };
    vec![
        Bomb {
            name: "gif",
            content_type: "image/gif",
            bytes: gif,
        },
        Bomb {
            name: "tiff-lzw",
            content_type: "image/tiff",
            bytes: tiff,
        },
        Bomb {
            name: "png16",
            content_type: "image/png",
            bytes: png16,
        },
        Bomb {
            name: "jpeg-progressive-truncated",
            content_type: "image/jpeg",
            bytes: jpeg[..3000.min(jpeg.len())].to_vec(),
        },
        Bomb {
            name: "jpeg-progressive",
            content_type: "image/jpeg",
            bytes: jpeg,
        },
        Bomb {
            name: "webp-lossless",
            content_type: "image/webp",
            bytes: webp,
        },
    ]
}

/// Peak resident memory of process `pid` (`VmHWM`), MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024.0
}
