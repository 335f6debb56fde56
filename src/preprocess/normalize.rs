//! RGB8 crop → the network's normalised CHW float32 input.

use std::sync::LazyLock;

use image::RgbImage;

use super::{MEAN, STD};

/// `(v as f32 / 255 - MEAN[c]) / STD[c]` for every byte `v` and channel `c`.
static TABLE: LazyLock<[[f32; 256]; 3]> = LazyLock::new(|| {
    std::array::from_fn(|c| {
        std::array::from_fn(|v| ((f64::from(v as f32 / 255.0) - MEAN[c]) / STD[c]) as f32)
    })
});

/// RGB8 → CHW float32 (`3 * width * height` values; `3 * 224 * 224` for a crop):
/// `(v as f32 / 255 - MEAN) / STD`. As in numpy, the division is float32 and the mean/std
/// arithmetic float64 (the constants are Python lists), rounded to float32 at the end; there
/// are only 256 inputs per channel, so it is a table lookup.
pub fn normalize(crop: &RgbImage) -> Vec<f32> {
    let plane = crop.width() as usize * crop.height() as usize;
    let mut out = vec![0.0f32; 3 * plane];
    normalize_into(crop.as_raw(), 0, &mut out);
    out
}

/// [`normalize`] for some pixels of an image (RGB8, starting at pixel `first`) into `out`, the
/// whole image's three planes.
pub(super) fn normalize_into(pixels: &[u8], first: usize, out: &mut [f32]) {
    let [tr, tg, tb] = &*TABLE;
    let plane = out.len() / 3;
    let n = pixels.len() / 3;
    let (r, gb) = out.split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    let (r, g, b) = (
        &mut r[first..first + n],
        &mut g[first..first + n],
        &mut b[first..first + n],
    );
    let planes = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
    for (px, ((r, g), b)) in pixels.chunks_exact(3).zip(planes) {
        *r = tr[usize::from(px[0])];
        *g = tg[usize::from(px[1])];
        *b = tb[usize::from(px[2])];
    }
}

#[cfg(test)]
mod tests {
    use image::Rgb;

    use super::super::{resize_crop, testing::noise};
    use super::*;

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
