//! JPEG decoding that is bit-identical to Pillow and OpenCV.
//!
//! SAM's reference pipeline (Meta's Python code) reads images with Pillow or OpenCV, and both
//! decode JPEG with libjpeg-turbo: the accurate integer IDCT (`JDCT_ISLOW`), "fancy" (triangle
//! filter) chroma upsampling and libjpeg's fixed-point YCbCr→RGB. The `image` crate decodes JPEG
//! with zune-jpeg instead, whose pixels differ from libjpeg-turbo's by up to ±4 on about a tenth
//! of the pixels of a typical photo — enough to move SAM's mask logits by up to 1.0 and to break
//! parity with the reference. So JPEG goes through the `mozjpeg` crate, which statically builds
//! libjpeg-turbo's decoder (as vendored by MozJPEG) from C with `cc` only: no nasm, no SIMD, no
//! system library. libjpeg-turbo's C and SIMD code paths give identical output for `JDCT_ISLOW`
//! and fancy upsampling, and this module keeps libjpeg's defaults, so the pixels equal those of
//! Pillow's `Image.open(f).convert("RGB")` (checked by `tests/jpeg_decode.rs`). The one known
//! exception is damaged files that still decode: where corrupt data yields DCT coefficients no
//! encoder produces, the SIMD IDCT (Pillow's) saturates where the C IDCT (ours) wraps around, so a
//! few pixels of such a file can differ; whether a file decodes or fails is the same.
//!
//! Errors. libjpeg reports fatal errors through its error manager; `mozjpeg` turns them into an
//! unwind (`std::panic::resume_unwind`, which does not run the panic hook, so nothing is printed),
//! and every call into `mozjpeg` here runs under [`std::panic::catch_unwind`], which turns the
//! payload back into an `Err(String)`. A *truncated* file is not fatal to libjpeg: its source
//! manager only warns (`JWRN_JPEG_EOF`, silenced by `mozjpeg`) and inserts a fake end-of-image
//! marker, so the rest of the image comes out grey. Pillow, on the other hand, refuses such a file
//! ("image file is truncated"). To match, the bytes are fed to libjpeg through [`TrackedBytes`], a
//! reader that records when libjpeg asks for data past the end of the file — exactly the moment
//! the warning is issued — and the decode fails if that happens before the last scanline has been
//! read. Other warnings (e.g. corrupt data in a segment) stay non-fatal, as with Pillow. This needs
//! no `unsafe` code.

use std::cell::Cell;
use std::io::{BufRead, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};

use mozjpeg::{ColorSpace, Decompress};

/// The start of the message of errors that are about a JPEG variant this decoder does not
/// handle (arithmetic coding, 12-bit samples, lossless, unusual colour spaces) rather than about
/// damaged data: a caller may try another decoder for those.
pub const UNSUPPORTED: &str = "unsupported JPEG variant";

/// libjpeg's messages (jerror.h) for features that are not compiled in or not implemented.
const UNSUPPORTED_LIBJPEG_MESSAGES: &[&str] = &[
    "arithmetic coding is not implemented",
    "Unsupported JPEG data precision",
    "Unsupported JPEG process",
    "Unsupported color conversion request",
    "Fractional sampling not implemented",
    "CCIR601 sampling not implemented",
];

/// Rows decoded between two checks for a truncated file, so that a damaged header claiming a huge
/// image fails early instead of decoding megapixels of fill.
const ROWS_PER_CHECK: usize = 16;

/// Decodes a JPEG file in memory to interleaved 8-bit RGB: `(width, height, pixels)`, with
/// `pixels.len() == width * height * 3`, exactly as libjpeg-turbo does by default (and so as
/// Pillow's `Image.open(f).convert("RGB")` does).
///
/// Greyscale JPEGs come out with R = G = B. CMYK and YCCK (Adobe) JPEGs are converted as Pillow
/// converts them (Adobe's inverted CMYK, then Pillow's `CMYK`→`RGB`). EXIF orientation is *not*
/// applied. Every libjpeg error, and a file that ends before the last scanline, is an `Err`; errors
/// that start with [`UNSUPPORTED`] mean the file is valid but of a kind this decoder cannot read.
pub fn decode_jpeg_rgb(bytes: &[u8]) -> Result<(u32, u32, Vec<u8>), String> {
    let hit_eof = Cell::new(false);
    // AssertUnwindSafe: after an unwind nothing captured is used again except `hit_eof`, a plain
    // flag; libjpeg's state is destroyed when the `Decompress` is dropped during the unwind.
    let decoded = catch_unwind(AssertUnwindSafe(|| decode(bytes, &hit_eof)));
    match decoded {
        Ok(result) => result,
        Err(payload) => Err(libjpeg_message(payload)),
    }
}

/// The decoding proper; may unwind with a libjpeg error message.
fn decode(bytes: &[u8], hit_eof: &Cell<bool>) -> Result<(u32, u32, Vec<u8>), String> {
    let truncated = || "premature end of JPEG file: the file is truncated".to_string();
    let reader = TrackedBytes {
        rest: bytes,
        hit_eof,
    };
    let header = Decompress::builder().from_reader(reader).map_err(|e| {
        if hit_eof.get() {
            truncated()
        } else {
            format!("invalid JPEG header: {e}")
        }
    })?;
    let cmyk = match header.color_space() {
        // libjpeg converts these to RGB itself (greyscale by replication).
        ColorSpace::JCS_GRAYSCALE | ColorSpace::JCS_YCbCr | ColorSpace::JCS_RGB => false,
        // As Pillow does: libjpeg gives CMYK (YCCK converted to CMYK), converted below.
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => true,
        other => {
            return Err(format!(
                "{UNSUPPORTED}: colour space {other:?} with {} components",
                header.components().len()
            ))
        }
    };
    let out_space = if cmyk {
        ColorSpace::JCS_CMYK
    } else {
        ColorSpace::JCS_RGB
    };
    let mut started = header
        .to_colorspace(out_space)
        .map_err(|e| format!("cannot start decoding: {e}"))?;
    let (width, height) = (started.width(), started.height());
    let channels = if cmyk { 4 } else { 3 };
    let row_len = width * channels;
    let len = row_len
        .checked_mul(height)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("invalid image size {width}x{height}"))?;
    let mut pixels = Vec::new();
    pixels
        .try_reserve_exact(len)
        .map_err(|_| format!("a {width}x{height} image does not fit in memory"))?;
    pixels.resize(len, 0u8);
    for rows in pixels.chunks_mut(row_len * ROWS_PER_CHECK) {
        // Multi-scan (e.g. progressive) files are read whole when decoding starts.
        if hit_eof.get() {
            return Err(truncated());
        }
        started
            .read_scanlines_into(rows)
            .map_err(|e| format!("cannot read scanlines: {e}"))?;
    }
    if hit_eof.get() {
        return Err(truncated());
    }
    // All pixels are in. If the end of the file is only reached now, while libjpeg looks for the
    // end-of-image marker, the picture is complete and is accepted, as Pillow accepts it (its
    // decoder then suspends with every row read); libjpeg errors here still fail.
    started
        .finish()
        .map_err(|e| format!("cannot finish decoding: {e}"))?;

    let pixels = if cmyk {
        pillow_cmyk_to_rgb(&pixels)
    } else {
        pixels
    };
    let (w, h) = (u32::try_from(width), u32::try_from(height));
    match (w, h) {
        (Ok(w), Ok(h)) => Ok((w, h, pixels)),
        _ => Err(format!("invalid image size {width}x{height}")),
    }
}

/// Converts libjpeg's CMYK output to RGB as Pillow does: Pillow reads CMYK JPEGs as Adobe's
/// inverted CMYK (raw mode `CMYK;I`), and its `convert("RGB")` computes, per channel,
/// `nk - nk * x / 255` (rounded) with `nk = 255 - K` and `x` = C, M or Y. With libjpeg's inverted
/// samples `c = 255 - x` and `k = 255 - K` that is `k - k * (255 - c) / 255`.
fn pillow_cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    // Pillow's MULDIV255: a * b / 255, rounded, in integers.
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let nk = u32::from(px[3]);
        for &c in &px[..3] {
            let x = 255 - u32::from(c);
            rgb.push(nk.saturating_sub(muldiv255(x, nk)) as u8);
        }
    }
    rgb
}

/// Turns the payload of an unwind out of libjpeg (a `String` from `mozjpeg`'s error manager, or a
/// `&str`) into a message.
fn libjpeg_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let raw = crate::error::panic_message(payload.as_ref()).unwrap_or("unknown error");
    let msg = raw.strip_prefix("libjpeg fatal error: ").unwrap_or(raw);
    if UNSUPPORTED_LIBJPEG_MESSAGES.iter().any(|m| msg.contains(m)) {
        format!("{UNSUPPORTED}: {msg}")
    } else {
        format!("libjpeg: {msg}")
    }
}

/// The file's bytes as a reader that records when its end is reached, i.e. when libjpeg asks for
/// more data than the file has.
struct TrackedBytes<'a> {
    rest: &'a [u8],
    hit_eof: &'a Cell<bool>,
}

impl Read for TrackedBytes<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.fill_buf()?.len().min(buf.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for TrackedBytes<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.rest.is_empty() {
            self.hit_eof.set(true);
        }
        Ok(self.rest)
    }

    fn consume(&mut self, amt: usize) {
        self.rest = &self.rest[amt.min(self.rest.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_conversion_matches_pillow_formula() {
        // libjpeg's (inverted) CMYK: c = 255 - C, k = 255 - K.
        assert_eq!(pillow_cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]); // no ink
        assert_eq!(pillow_cmyk_to_rgb(&[0, 0, 0, 255]), [0, 0, 0]); // full C, M, Y
        assert_eq!(pillow_cmyk_to_rgb(&[255, 255, 255, 0]), [0, 0, 0]); // full K
        assert_eq!(pillow_cmyk_to_rgb(&[127, 200, 255, 200]), [100, 157, 200]);
    }

    #[test]
    fn errors_are_values_not_panics() {
        assert!(decode_jpeg_rgb(b"").is_err());
        assert!(decode_jpeg_rgb(b"\xff\xd8").is_err());
        let garbage = decode_jpeg_rgb(b"\xff\xd8\xff\xe0garbage garbage garbage").unwrap_err();
        assert!(!garbage.is_empty());
        assert!(decode_jpeg_rgb(&[0u8; 100]).is_err());
    }
}
