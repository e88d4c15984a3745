//! Image preprocessing, to the letter of Meta's `segment_anything`:
//! `ResizeLongestSide.apply_image` (longest side to 1024, `int(old * scale + 0.5)`, Pillow's bilinear
//! resize) followed by `Sam.preprocess` (per-channel `(x - mean) / std` in f32, then zero padding at
//! the bottom and right to 1024x1024).

use image::RgbImage;

use crate::resize::resize_bilinear_pil;
use crate::sam_sizes::ENCODER_INPUT_SIZE;

/// `Sam.pixel_mean`, RGB.
pub const PIXEL_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
/// `Sam.pixel_std`, RGB.
pub const PIXEL_STD: [f32; 3] = [58.395, 57.12, 57.375];

/// Per-channel normalization of the encoder input (a model's manifest may give its own).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PixelStats {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for PixelStats {
    /// Meta's `Sam.pixel_mean` / `Sam.pixel_std`.
    fn default() -> Self {
        PixelStats {
            mean: PIXEL_MEAN,
            std: PIXEL_STD,
        }
    }
}

/// Height and width of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub height: usize,
    pub width: usize,
}

impl Size {
    pub fn new(height: usize, width: usize) -> Self {
        Size { height, width }
    }
}

/// `ResizeLongestSide.get_preprocess_shape`: the size an image of `original` size is resized to
/// so that its longest side is `long_side`, with Python's float64 arithmetic and `int(x + 0.5)`.
pub fn preprocess_shape(original: Size, long_side: usize) -> Size {
    let scale = long_side as f64 / original.height.max(original.width) as f64;
    let round = |v: usize| (v as f64 * scale + 0.5) as usize;
    Size::new(round(original.height), round(original.width))
}

/// `ResizeLongestSide(1024).apply_image`: the RGB image resized with Pillow's bilinear filter.
pub fn resize_longest_side(image: &RgbImage) -> RgbImage {
    let original = Size::new(image.height() as usize, image.width() as usize);
    let target = preprocess_shape(original, ENCODER_INPUT_SIZE);
    let pixels = resize_bilinear_pil(
        image.as_raw(),
        original.width,
        original.height,
        3,
        target.width,
        target.height,
    );
    RgbImage::from_raw(target.width as u32, target.height as u32, pixels)
        .expect("resize returns width * height * 3 bytes")
}

/// `Sam.preprocess`: normalizes a resized RGB image into a zero-padded 3x1024x1024 CHW tensor.
pub fn normalize_and_pad(resized: &RgbImage, stats: &PixelStats) -> Vec<f32> {
    let side = ENCODER_INPUT_SIZE;
    let (w, h) = (resized.width() as usize, resized.height() as usize);
    debug_assert!(w <= side && h <= side);
    let mut tensor = vec![0f32; 3 * side * side];
    let raw = resized.as_raw();
    for (c, plane) in tensor.chunks_exact_mut(side * side).enumerate() {
        let (mean, std) = (stats.mean[c], stats.std[c]);
        for y in 0..h {
            let row = &raw[y * w * 3..(y + 1) * w * 3];
            let out = &mut plane[y * side..y * side + w];
            for (o, px) in out.iter_mut().zip(row.chunks_exact(3)) {
                *o = (px[c] as f32 - mean) / std;
            }
        }
    }
    tensor
}

/// An image ready for the encoder, with the sizes the rest of the pipeline needs.
#[derive(Debug, Clone)]
pub struct PreprocessedImage {
    /// Normalized, padded 3x1024x1024 CHW tensor.
    pub tensor: Vec<f32>,
    /// Size of the image the user gave.
    pub original_size: Size,
    /// Size of the image after the longest-side resize (before padding).
    pub input_size: Size,
}

/// The whole preprocessing of one RGB image.
pub fn preprocess(image: &RgbImage, stats: &PixelStats) -> PreprocessedImage {
    let resized = resize_longest_side(image);
    PreprocessedImage {
        tensor: normalize_and_pad(&resized, stats),
        original_size: Size::new(image.height() as usize, image.width() as usize),
        input_size: Size::new(resized.height() as usize, resized.width() as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_shape_matches_python_rounding() {
        // Values computed with segment_anything's ResizeLongestSide.get_preprocess_shape.
        assert_eq!(
            preprocess_shape(Size::new(1500, 2250), 1024),
            Size::new(683, 1024)
        );
        assert_eq!(
            preprocess_shape(Size::new(512, 512), 1024),
            Size::new(1024, 1024)
        );
        assert_eq!(
            preprocess_shape(Size::new(300, 451), 1024),
            Size::new(681, 1024)
        );
        assert_eq!(
            preprocess_shape(Size::new(600, 512), 1024),
            Size::new(1024, 874)
        );
        assert_eq!(
            preprocess_shape(Size::new(1080, 1920), 1024),
            Size::new(576, 1024)
        );
        assert_eq!(
            preprocess_shape(Size::new(1, 4000), 1024),
            Size::new(0, 1024)
        );
    }

    #[test]
    fn normalization_uses_sam_constants_and_pads_with_zero() {
        let image = RgbImage::from_pixel(2, 1, image::Rgb([255, 0, 128]));
        let t = normalize_and_pad(&image, &PixelStats::default());
        let side = ENCODER_INPUT_SIZE;
        assert_eq!(t.len(), 3 * side * side);
        assert_eq!(t[0], (255.0 - 123.675) / 58.395);
        assert_eq!(t[1], (255.0 - 123.675) / 58.395);
        assert_eq!(t[side * side], (0.0 - 116.28) / 57.12);
        assert_eq!(t[2 * side * side + 1], (128.0 - 103.53) / 57.375);
        assert_eq!(t[2], 0.0);
        assert_eq!(t[side], 0.0);
    }
}
