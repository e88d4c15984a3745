//! Reading images from files into the 8-bit RGB the pipeline takes.
//!
//! The format is taken from the file's content, not its name; EXIF orientation is applied (as
//! OpenCV's `imread`, which Meta's examples use, does); greyscale is replicated to three channels,
//! alpha is dropped and 16-bit or float samples are scaled to 8 bits.

use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::error::{Error, Result};

/// Converts any decoded image to 8-bit RGB.
pub fn to_rgb8(image: DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    }
}

/// Decodes an image from memory (`path` is for messages).
pub fn decode_rgb(path: &Path, bytes: &[u8]) -> Result<RgbImage> {
    let err = |reason: String| Error::Image {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.is_empty() {
        return Err(err("the file is empty".into()));
    }
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?;
    if reader.format().is_none() {
        return Err(err("unrecognized image format".into()));
    }
    if reader.format() == Some(ImageFormat::Jpeg) {
        // libjpeg-turbo's pixels, as Pillow and OpenCV decode them (see `crate::jpeg`); the
        // `image` crate is only asked for the EXIF orientation, or for JPEG variants libjpeg
        // as built here does not read.
        match crate::jpeg::decode_jpeg_rgb(bytes) {
            Ok((width, height, pixels)) => {
                let orientation = reader
                    .into_decoder()
                    .and_then(|mut decoder| decoder.orientation())
                    .unwrap_or(Orientation::NoTransforms);
                let rgb = RgbImage::from_raw(width, height, pixels).ok_or_else(|| {
                    err("corrupt or truncated image data (wrong pixel count)".into())
                })?;
                let mut image = DynamicImage::ImageRgb8(rgb);
                image.apply_orientation(orientation);
                return Ok(to_rgb8(image));
            }
            Err(e) if e.starts_with(crate::jpeg::UNSUPPORTED) => {
                log::debug!(
                    "{}: {e}; decoding with the image crate instead",
                    path.display()
                );
            }
            Err(e) => return Err(err(format!("corrupt or truncated image data ({e})"))),
        }
    }
    let mut decoder = reader.into_decoder().map_err(|e| err(e.to_string()))?;
    let orientation = decoder.orientation().map_err(|e| err(e.to_string()))?;
    let mut image = DynamicImage::from_decoder(decoder)
        .map_err(|e| err(format!("corrupt or truncated image data ({e})")))?;
    image.apply_orientation(orientation);
    if image.width() == 0 || image.height() == 0 {
        return Err(err("the image has no pixels".into()));
    }
    Ok(to_rgb8(image))
}

/// Reads an image file as 8-bit RGB.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    decode_rgb(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Luma, Rgba};
    use std::io::Cursor;

    fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), format)
            .unwrap();
        bytes
    }

    #[test]
    fn greyscale_rgba_and_16_bit_become_rgb8() {
        let p = Path::new("x.png");
        let grey = DynamicImage::ImageLuma8(image::ImageBuffer::from_pixel(3, 2, Luma([77u8])));
        let rgb = decode_rgb(p, &encode(grey, ImageFormat::Png)).unwrap();
        assert_eq!((rgb.width(), rgb.height()), (3, 2));
        assert_eq!(rgb.get_pixel(2, 1).0, [77, 77, 77]);

        let rgba = DynamicImage::ImageRgba8(image::ImageBuffer::from_pixel(
            2,
            2,
            Rgba([10u8, 20, 30, 0]),
        ));
        assert_eq!(
            decode_rgb(p, &encode(rgba, ImageFormat::Png))
                .unwrap()
                .get_pixel(0, 0)
                .0,
            [10, 20, 30]
        );

        let deep =
            DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(2, 2, Luma([65535u16])));
        assert_eq!(
            decode_rgb(p, &encode(deep, ImageFormat::Png))
                .unwrap()
                .get_pixel(1, 1)
                .0,
            [255, 255, 255]
        );
    }

    #[test]
    fn bad_files_get_clear_errors() {
        let p = Path::new("photo.jpg");
        let msg = |bytes: &[u8]| decode_rgb(p, bytes).unwrap_err().to_string();
        assert!(msg(b"").contains("empty"));
        assert!(msg(b"this is not an image at all").contains("unrecognized image format"));
        let png = encode(DynamicImage::new_rgb8(64, 64), ImageFormat::Png);
        let truncated = msg(&png[..png.len() / 2]);
        assert!(truncated.contains("photo.jpg"), "{truncated}");
        let missing = load_rgb(Path::new("/nonexistent/photo.jpg"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/photo.jpg"), "{missing}");
    }
}
