//! Pillow-exact bilinear resampling (what Meta's `ResizeLongestSide.apply_image` uses via torchvision's `to_pil_image` + `resize`).
//!
//! This is a transcription of Pillow's `src/libImaging/Resample.c` (checked pixel for
//! pixel against Pillow 13.0.0 by `tests/pil_resize.rs`), restricted to what
//! `Image.resize((w, h), Image.BILINEAR)` does on 8-bit images with the default box:
//!
//! * Separable two-pass convolution with the triangle filter (support 1). When an axis
//!   shrinks, the filter is stretched by the scale factor (antialiasing): support and
//!   kernel width grow, arguments are divided by it.
//! * Coefficients are computed in `f64` per output pixel (window from rounding
//!   `center ± support`, weights normalised by their sum) and then converted to fixed
//!   point with `PRECISION_BITS = 32 - 8 - 2 = 22` fractional bits, rounding half away
//!   from zero.
//! * Each output sample is `clip8((1 << 21) + Σ pixel·k)`, i.e. `>> 22` clamped to
//!   `0..=255`, accumulated in `i32`.
//! * The first pass writes an 8-bit intermediate image (so the second pass sees rounded
//!   values), and covers only the rows (or columns) the second pass reads, like Pillow's
//!   `ybox_first..ybox_last`. Normally the horizontal pass runs first; Pillow 13 runs the
//!   vertical one first when the height shrinks by more than twice as many pixels as the
//!   width (see `vertical_first`). A pass is skipped when its axis keeps its size (for
//!   that axis the kernel would be the identity anyway); if both sizes are unchanged,
//!   `Image.resize` returns a copy.
//! * Two- and four-channel images are treated as Pillow's `LA` / `RGBA`: `Image.resize`
//!   converts them to premultiplied `La` / `RGBa` first and back afterwards, with
//!   Pillow's integer rounding (`MULDIV255` on the way in, `255 * c / a` truncated and
//!   clamped on the way out, colour left as is where alpha is 0 or 255).

use std::ops::Range;

/// Fractional bits of the fixed-point coefficients (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Rounding offset every accumulator starts from.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Resize an interleaved 8-bit image with `channels` channels (1..=4), row-major, exactly as Pillow's
/// `Image.resize((dst_width, dst_height), Image.BILINEAR)` does.
///
/// Channel counts map to Pillow modes: 1 = `L`, 2 = `LA`, 3 = `RGB`, 4 = `RGBA` (alpha
/// last). For 2 and 4 channels the resampling is done on premultiplied colour, as Pillow
/// does for `LA`/`RGBA` (so colour under fully transparent pixels is not preserved).
///
/// Preconditions (checked with `debug_assert!` only; the caller validates):
/// all four sizes are at least 1, `1 <= channels <= 4`, and
/// `src.len() == src_width * src_height * channels`.
///
/// Returns `dst_width * dst_height * channels` bytes, row-major, interleaved.
pub fn resize_bilinear_pil(
    src: &[u8],
    src_width: usize,
    src_height: usize,
    channels: usize,
    dst_width: usize,
    dst_height: usize,
) -> Vec<u8> {
    debug_assert!(
        (1..=4).contains(&channels),
        "channels must be 1..=4, got {channels}"
    );
    debug_assert!(src_width >= 1 && src_height >= 1, "empty source image");
    debug_assert!(dst_width >= 1 && dst_height >= 1, "empty destination image");
    debug_assert_eq!(
        src.len(),
        src_width * src_height * channels,
        "source buffer size"
    );

    // `Image.resize`: same size (and default box) -> `self.copy()`, before any mode
    // conversion.
    if src_width == dst_width && src_height == dst_height {
        return src.to_vec();
    }

    let geometry = Geometry {
        src_width,
        src_height,
        dst_width,
        dst_height,
    };
    match channels {
        1 => resample::<1>(src, &geometry),
        3 => resample::<3>(src, &geometry),
        2 => {
            let premultiplied = premultiply::<2>(src);
            let mut out = resample::<2>(&premultiplied, &geometry);
            unpremultiply::<2>(&mut out);
            out
        }
        4 => {
            let premultiplied = premultiply::<4>(src);
            let mut out = resample::<4>(&premultiplied, &geometry);
            unpremultiply::<4>(&mut out);
            out
        }
        _ => panic!("resize_bilinear_pil: channels must be 1..=4, got {channels}"),
    }
}

#[derive(Clone, Copy)]
struct Geometry {
    src_width: usize,
    src_height: usize,
    dst_width: usize,
    dst_height: usize,
}

/// Fixed-point resampling coefficients for one axis (Pillow's `precompute_coeffs` +
/// `normalize_coeffs_8bpc`).
struct Coeffs {
    /// Kernel stride in `weights`.
    ksize: usize,
    /// Per output index: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `out_size * ksize` weights in 2.22 fixed point; taps past a window's count are 0.
    weights: Vec<i32>,
}

impl Coeffs {
    /// Window and weights of output index `i`.
    #[inline(always)]
    fn get(&self, i: usize) -> (usize, &[i32]) {
        let (first, count) = self.bounds[i];
        let start = i * self.ksize;
        (first, &self.weights[start..start + count])
    }
}

/// Pillow's `bilinear_filter` (triangle).
#[inline(always)]
fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` for the box `(0, in_size)` and the bilinear filter,
/// followed by `normalize_coeffs_8bpc`. The floating-point operations are written in the
/// same order as the C code so that every rounding step matches.
fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    // `box` is passed as C `float`s; `in1 - in0` is a float subtraction (exact here).
    let in0 = 0.0f32;
    let in1 = in_size as f32;
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    // Bilinear support is 1.0.
    let support = 1.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;

    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0.0f64; ksize];
    let in_size_i = in_size as i64;

    for (xx, kk_out) in weights.chunks_exact_mut(ksize).enumerate() {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        let mut ww = 0.0f64;
        // C `(int)` casts truncate toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size_i);
        let count = (xmax - xmin).max(0) as usize;
        for (x, kx) in k.iter_mut().enumerate().take(count) {
            let w = bilinear_filter(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (kx, out) in k.iter().zip(kk_out.iter_mut()).take(count) {
            let v = if ww != 0.0 { *kx / ww } else { *kx };
            *out = if v < 0.0 {
                (-0.5 + v * f64::from(1u32 << PRECISION_BITS)) as i32
            } else {
                (0.5 + v * f64::from(1u32 << PRECISION_BITS)) as i32
            };
        }
        bounds.push((xmin as usize, count));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

/// Pillow's `clip8`: drop the fraction bits and clamp to `0..=255`.
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Whether Pillow 13 runs the vertical pass before the horizontal one.
///
/// The `Resample.c` this port was read from (a 12.x-era revision) always resampled
/// horizontally first. Pillow 13.0.0, the reference here, resamples vertically first
/// when the height shrinks by more than twice as many pixels as the width does (or the
/// width grows); upstream this is PR #9549 ("If height is scaled down significantly more
/// than width, resize vertically first"). The exact condition below was established by
/// probing the installed Pillow 13.0.0 (comparing `resize` with the two single-axis
/// resizes chained in either order) on 1400+ random size pairs, many straddling the
/// boundary, without a single disagreement. The order changes results (each pass rounds
/// to 8 bits), so it has to match.
fn vertical_first(g: &Geometry) -> bool {
    let shrink_w = g.src_width as i64 - g.dst_width as i64;
    let shrink_h = g.src_height as i64 - g.dst_height as i64;
    shrink_h > 0 && 2 * shrink_w < shrink_h
}

/// `ImagingResampleInner` for an image with `C` interleaved channels and different
/// source and destination sizes.
fn resample<const C: usize>(src: &[u8], g: &Geometry) -> Vec<u8> {
    let need_horizontal = g.dst_width != g.src_width;
    let need_vertical = g.dst_height != g.src_height;
    let src_stride = g.src_width * C;
    let mut out = vec![0u8; g.dst_width * g.dst_height * C];

    match (need_horizontal, need_vertical) {
        (true, false) => {
            let horiz = precompute_coeffs(g.src_width, g.dst_width);
            let rows = 0..g.src_height;
            horizontal_pass::<C>(src, src_stride, 0, rows, &horiz, &mut out);
        }
        (false, true) => {
            let vert = precompute_coeffs(g.src_height, g.dst_height);
            vertical_pass(src, src_stride, 0, 0, &vert, &mut out);
        }
        (true, true) if vertical_first(g) => {
            let horiz = precompute_coeffs(g.src_width, g.dst_width);
            let vert = precompute_coeffs(g.src_height, g.dst_height);
            // Only the source columns the horizontal pass reads.
            let cols = used_range(&horiz);
            let temp_stride = cols.len() * C;
            let mut temp = vec![0u8; temp_stride * g.dst_height];
            vertical_pass(src, src_stride, cols.start * C, 0, &vert, &mut temp);
            let rows = 0..g.dst_height;
            horizontal_pass::<C>(&temp, temp_stride, cols.start, rows, &horiz, &mut out);
        }
        (true, true) => {
            let horiz = precompute_coeffs(g.src_width, g.dst_width);
            let vert = precompute_coeffs(g.src_height, g.dst_height);
            // Only the source rows the vertical pass reads (`ybox_first..ybox_last`).
            let rows = used_range(&vert);
            let temp_stride = g.dst_width * C;
            let mut temp = vec![0u8; temp_stride * rows.len()];
            let row_offset = rows.start;
            horizontal_pass::<C>(src, src_stride, 0, rows, &horiz, &mut temp);
            vertical_pass(&temp, temp_stride, 0, row_offset, &vert, &mut out);
        }
        (false, false) => out.copy_from_slice(src),
    }
    out
}

/// Input indices read by any output of `coeffs` (windows are increasing).
fn used_range(coeffs: &Coeffs) -> Range<usize> {
    let first = coeffs.bounds.first().map_or(0, |&(first, _)| first);
    let last = coeffs
        .bounds
        .last()
        .map_or(0, |&(first, count)| first + count);
    first..last
}

/// `ImagingResampleHorizontal_8bpc`: resample the rows `rows` of `src` (row stride
/// `src_stride` bytes, first stored column = input column `col_offset`) into the
/// consecutive rows of `dst`, whose width is `coeffs.bounds.len()` pixels.
fn horizontal_pass<const C: usize>(
    src: &[u8],
    src_stride: usize,
    col_offset: usize,
    rows: Range<usize>,
    coeffs: &Coeffs,
    dst: &mut [u8],
) {
    let dst_stride = coeffs.bounds.len() * C;
    debug_assert_eq!(dst.len(), rows.len() * dst_stride);
    let src_rows = src[rows.start * src_stride..rows.end * src_stride].chunks_exact(src_stride);
    for (src_row, dst_row) in src_rows.zip(dst.chunks_exact_mut(dst_stride)) {
        for (xx, out_px) in dst_row.chunks_exact_mut(C).enumerate() {
            let (first, k) = coeffs.get(xx);
            let first = first - col_offset;
            let window = &src_row[first * C..(first + k.len()) * C];
            let mut acc = [HALF; C];
            for (px, &w) in window.chunks_exact(C).zip(k) {
                for c in 0..C {
                    acc[c] += i32::from(px[c]) * w;
                }
            }
            for c in 0..C {
                out_px[c] = clip8(acc[c]);
            }
        }
    }
}

/// `ImagingResampleVertical_8bpc`: resample into `dst` (rows of `dst.len() /
/// coeffs.bounds.len()` bytes) from the rows of `src` (stride `src_stride` bytes, first
/// stored row = input row `row_offset`), reading each row from byte `col_byte_offset`.
/// Channels are independent here, so rows are processed as flat byte runs; the integer
/// sums are the same as Pillow's pixel-by-pixel loop.
fn vertical_pass(
    src: &[u8],
    src_stride: usize,
    col_byte_offset: usize,
    row_offset: usize,
    coeffs: &Coeffs,
    dst: &mut [u8],
) {
    let row_len = dst.len() / coeffs.bounds.len();
    let mut acc = vec![0i32; row_len];
    for (yy, dst_row) in dst.chunks_exact_mut(row_len).enumerate() {
        let (first, k) = coeffs.get(yy);
        let first = first - row_offset;
        acc.fill(HALF);
        for (y, &w) in k.iter().enumerate() {
            let start = (first + y) * src_stride + col_byte_offset;
            for (a, &p) in acc.iter_mut().zip(&src[start..start + row_len]) {
                *a += i32::from(p) * w;
            }
        }
        for (o, &a) in dst_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
}

/// Pillow's `MULDIV255(a, b)`: `a * b / 255`, rounded.
#[inline(always)]
fn muldiv255(a: u8, b: u8) -> u8 {
    let tmp = u32::from(a) * u32::from(b) + 128;
    (((tmp >> 8) + tmp) >> 8) as u8
}

/// `RGBA -> RGBa` / `LA -> La` (Pillow's `rgbA2rgba` / `lA2la`): alpha is the last channel.
fn premultiply<const C: usize>(src: &[u8]) -> Vec<u8> {
    let mut out = src.to_vec();
    for px in out.chunks_exact_mut(C) {
        let alpha = px[C - 1];
        for v in &mut px[..C - 1] {
            *v = muldiv255(*v, alpha);
        }
    }
    out
}

/// `RGBa -> RGBA` / `La -> LA` (Pillow's `rgba2rgbA` / `la2lA`), in place.
fn unpremultiply<const C: usize>(img: &mut [u8]) {
    for px in img.chunks_exact_mut(C) {
        let alpha = u32::from(px[C - 1]);
        if alpha == 0 || alpha == 255 {
            continue;
        }
        for v in &mut px[..C - 1] {
            *v = ((255 * u32::from(*v)) / alpha).min(255) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes.
    fn noise(len: usize, seed: u32) -> Vec<u8> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn identity_size_is_a_copy() {
        for channels in 1..=4 {
            let src = noise(7 * 5 * channels, channels as u32);
            assert_eq!(
                resize_bilinear_pil(&src, 7, 5, channels, 7, 5),
                src,
                "channels {channels}"
            );
        }
    }

    #[test]
    fn one_pixel_source_fills_the_output() {
        let px = [12u8, 200, 77, 255];
        for channels in 1..=4 {
            let src = &px[4 - channels..];
            for (w, h) in [(1, 1), (5, 3), (1, 9), (1024, 1)] {
                let out = resize_bilinear_pil(src, 1, 1, channels, w, h);
                assert_eq!(out.len(), w * h * channels);
                for got in out.chunks_exact(channels) {
                    assert_eq!(got, src, "channels {channels}, {w}x{h}");
                }
            }
        }
    }

    #[test]
    fn one_pixel_outputs() {
        // 3x1 -> 1x1: scale 3, support 3, window 0..3 with weights 2/3, 1, 2/3 -> the
        // plain weighted mean (2*0 + 3*90 + 2*30) / 7 = 47.1.
        assert_eq!(resize_bilinear_pil(&[0, 90, 30], 3, 1, 1, 1, 1), vec![47]);
        // Same along the other axis.
        assert_eq!(resize_bilinear_pil(&[0, 90, 30], 1, 3, 1, 1, 1), vec![47]);
        // A constant image stays constant however it is shrunk.
        let src = vec![123u8; 17 * 9 * 3];
        assert_eq!(resize_bilinear_pil(&src, 17, 9, 3, 1, 1), vec![123; 3]);
        assert_eq!(resize_bilinear_pil(&src, 17, 9, 3, 4, 1), vec![123; 12]);
    }

    #[test]
    fn hand_checked_upscale() {
        // 2 -> 4: centers 0.25, 0.75, 1.25, 1.75. Windows [0], [0,1], [0,1], [1] with
        // weights 1 | .75 .25 | .25 .75 | 1; 255 * .25 = 63.75 -> 64, 255 * .75 -> 191.
        // (Pillow 13: [0, 64, 191, 255].)
        assert_eq!(
            resize_bilinear_pil(&[0, 255], 2, 1, 1, 4, 1),
            vec![0, 64, 191, 255]
        );
        assert_eq!(
            resize_bilinear_pil(&[0, 255], 1, 2, 1, 1, 4),
            vec![0, 64, 191, 255]
        );
    }

    #[test]
    fn hand_checked_antialiased_downscale() {
        // 4 -> 2: scale 2, so support 2 and the triangle is stretched by 2. Output 0:
        // center 1, window 0..3, weights .75 .75 .25 (/1.75) -> (300 + 200) / 7 = 71.4;
        // output 1: center 3, window 1..4, weights .25 .75 .75 -> (100 + 600 + 120) / 7
        // = 117.1. (Pillow 13: [71, 117], both orientations.)
        let src = [0u8, 100, 200, 40];
        assert_eq!(resize_bilinear_pil(&src, 4, 1, 1, 2, 1), vec![71, 117]);
        assert_eq!(resize_bilinear_pil(&src, 1, 4, 1, 1, 2), vec![71, 117]);
    }

    #[test]
    fn hand_checked_rgba_is_premultiplied() {
        // Opaque orange next to a fully transparent blue, 2 -> 4 wide. Premultiplied the
        // blue pixel is all zero, so it adds no colour: pixel 1 is (150, 75, 0, 191)
        // premultiplied -> 255*150/191 = 200, 255*75/191 = 100; pixel 2 is
        // (50, 25, 0, 64) -> 199, 99; pixel 3 keeps the premultiplied zeros.
        // (Pillow 13 gives exactly this.)
        let src = [200u8, 100, 0, 255, 0, 0, 250, 0];
        let want = vec![
            200, 100, 0, 255, 200, 100, 0, 191, 199, 99, 0, 64, 0, 0, 0, 0,
        ];
        assert_eq!(resize_bilinear_pil(&src, 2, 1, 4, 4, 1), want);
    }

    #[test]
    fn pass_order_rule() {
        let g = |src_width, src_height, dst_width, dst_height| Geometry {
            src_width,
            src_height,
            dst_width,
            dst_height,
        };
        // Boundary probed on Pillow 13.0.0: 96x128 -> (64 | 65)x64.
        assert!(!vertical_first(&g(96, 128, 64, 64)));
        assert!(vertical_first(&g(96, 128, 65, 64)));
        // Width up, height down; width down, height up.
        assert!(vertical_first(&g(160, 120, 211, 53)));
        assert!(!vertical_first(&g(160, 120, 57, 150)));
        // Camera frames: 16:9 to SAM's 1024 is horizontal first, 600x1280 is not.
        assert!(!vertical_first(&g(1920, 1080, 1024, 576)));
        assert!(!vertical_first(&g(1080, 1920, 576, 1024)));
        assert!(vertical_first(&g(600, 1280, 480, 1024)));
        // Never when the height grows.
        assert!(!vertical_first(&g(200, 200, 800, 400)));
    }

    #[test]
    fn coefficients_match_pillow_layout() {
        // 1920 -> 1024 (the SAM camera case): scale 1.875, support 1.875, ksize 5.
        let c = precompute_coeffs(1920, 1024);
        assert_eq!(c.ksize, 5);
        assert_eq!(c.bounds.len(), 1024);
        for i in 0..1024 {
            let (first, k) = c.get(i);
            assert!(!k.is_empty() && first + k.len() <= 1920);
            let sum: i32 = k.iter().sum();
            assert!(
                (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i32,
                "sum {sum} at {i}"
            );
        }
        // Upscaling: support 1, ksize 3, at most 3 taps.
        let c = precompute_coeffs(512, 1024);
        assert_eq!(c.ksize, 3);
        assert!(c.bounds.iter().all(|&(_, n)| (1..=3).contains(&n)));
    }

    #[test]
    fn channels_are_independent_without_alpha() {
        // An RGB resize equals three L resizes of the planes.
        let (w, h, dw, dh) = (13, 11, 7, 17);
        let rgb = noise(w * h * 3, 9);
        let out = resize_bilinear_pil(&rgb, w, h, 3, dw, dh);
        for c in 0..3 {
            let plane: Vec<u8> = rgb.iter().skip(c).step_by(3).copied().collect();
            let want = resize_bilinear_pil(&plane, w, h, 1, dw, dh);
            let got: Vec<u8> = out.iter().skip(c).step_by(3).copied().collect();
            assert_eq!(got, want, "channel {c}");
        }
    }
}
