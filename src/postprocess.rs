//! Mask postprocessing, to the letter of Meta's `Sam.postprocess_masks` and the AMG utilities:
//! bilinear (align_corners=False) 256 -> 1024, crop to the resized size, bilinear to the original
//! size, threshold at [`MASK_THRESHOLD`]; stability score with [`STABILITY_SCORE_OFFSET`]; bounding
//! boxes as `batched_mask_to_box` + `box_xyxy_to_xywh` compute them.

use crate::preprocess::Size;
use crate::sam_sizes::{ENCODER_INPUT_SIZE, LOW_RES_MASK_SIZE};

/// `Sam.mask_threshold`: a pixel belongs to the mask when its logit is above this.
pub const MASK_THRESHOLD: f32 = 0.0;
/// `SamAutomaticMaskGenerator.stability_score_offset`.
pub const STABILITY_SCORE_OFFSET: f32 = 1.0;
/// Weight `SamOnnxModel.select_masks` gives the single-mask token per point beyond 2.5.
pub const SINGLE_MASK_REWEIGHT: f32 = 1000.0;

/// Source indices and weights of PyTorch's linear interpolation along one axis
/// (`upsample_bilinear2d`, align_corners=False, no scale factor given).
struct LinearAxis {
    i0: Vec<usize>,
    i1: Vec<usize>,
    w0: Vec<f32>,
    w1: Vec<f32>,
}

impl LinearAxis {
    fn new(input: usize, output: usize) -> Self {
        let scale = input as f32 / output as f32;
        let mut axis = LinearAxis {
            i0: Vec::with_capacity(output),
            i1: Vec::with_capacity(output),
            w0: Vec::with_capacity(output),
            w1: Vec::with_capacity(output),
        };
        for dst in 0..output {
            let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(input - 1);
            let lambda = (src - i0 as f32).clamp(0.0, 1.0);
            axis.i0.push(i0);
            axis.i1.push(i0 + usize::from(i0 < input - 1));
            axis.w0.push(1.0 - lambda);
            axis.w1.push(lambda);
        }
        axis
    }
}

/// Bilinear resampling of a row-major `src` of `src_size` to `dst_size`, computing only the
/// top-left `keep` part of the output (`keep` ≤ `dst_size`), as PyTorch's
/// `F.interpolate(mode="bilinear", align_corners=False)` followed by a crop would.
///
/// Separable: each source row the kept output reads is interpolated horizontally once, then each
/// output row blends two of those rows. The arithmetic per pixel is PyTorch's
/// `(r0[a]·wx0 + r0[b]·wx1)·wy0 + (r1[a]·wx0 + r1[b]·wx1)·wy1`, in that order, so the result is
/// the same to the bit as computing each pixel on its own.
fn interpolate_bilinear(src: &[f32], src_size: Size, dst_size: Size, keep: Size) -> Vec<f32> {
    let ys = LinearAxis::new(src_size.height, dst_size.height);
    let xs = LinearAxis::new(src_size.width, dst_size.width);
    let (sw, kw) = (src_size.width, keep.width);
    if kw == 0 || keep.height == 0 {
        return Vec::new();
    }
    let rows_read = ys.i1[..keep.height].iter().max().map_or(0, |&r| r + 1);
    let mut horizontal = vec![0.0f32; rows_read * kw];
    for (row, out) in src.chunks_exact(sw).zip(horizontal.chunks_exact_mut(kw)) {
        let taps = xs.i0.iter().zip(&xs.i1).zip(xs.w0.iter().zip(&xs.w1));
        for (o, ((&a, &b), (&wx0, &wx1))) in out.iter_mut().zip(taps) {
            *o = row[a] * wx0 + row[b] * wx1;
        }
    }
    let mut out = vec![0.0f32; keep.height * kw];
    for (y, out_row) in out.chunks_exact_mut(kw).enumerate() {
        let top = &horizontal[ys.i0[y] * kw..(ys.i0[y] + 1) * kw];
        let bottom = &horizontal[ys.i1[y] * kw..(ys.i1[y] + 1) * kw];
        let (wy0, wy1) = (ys.w0[y], ys.w1[y]);
        for ((o, &t), &b) in out_row.iter_mut().zip(top).zip(bottom) {
            *o = t * wy0 + b * wy1;
        }
    }
    out
}

/// `Sam.postprocess_masks` for one 256x256 low-resolution logit mask: the logits at the original
/// image size, row-major.
pub fn upscale_logits(low_res: &[f32], input_size: Size, original_size: Size) -> Vec<f32> {
    let low = Size::new(LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE);
    let padded = Size::new(ENCODER_INPUT_SIZE, ENCODER_INPUT_SIZE);
    let cropped = interpolate_bilinear(low_res, low, padded, input_size);
    interpolate_bilinear(&cropped, input_size, original_size, original_size)
}

/// A binary mask at the original image size, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub data: Vec<bool>,
}

impl Mask {
    /// The mask `logits > threshold`.
    pub fn from_logits(logits: &[f32], size: Size, threshold: f32) -> Self {
        debug_assert_eq!(logits.len(), size.width * size.height);
        Mask {
            width: size.width,
            height: size.height,
            data: logits.iter().map(|&v| v > threshold).collect(),
        }
    }

    /// Number of pixels in the mask.
    pub fn area(&self) -> u64 {
        self.data.iter().filter(|&&b| b).count() as u64
    }

    /// Whether pixel (x, y) is in the mask.
    pub fn get(&self, x: usize, y: usize) -> bool {
        self.data[y * self.width + x]
    }

    /// `[x, y, w, h]` as Meta's AMG computes it: `w = max_x - min_x` (inclusive indices, no +1);
    /// `[0, 0, 0, 0]` for an empty mask.
    pub fn bbox_xywh(&self) -> [u32; 4] {
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for (y, row) in self.data.chunks_exact(self.width).enumerate() {
            if let (Some(first), Some(last)) =
                (row.iter().position(|&b| b), row.iter().rposition(|&b| b))
            {
                x0 = x0.min(first);
                x1 = x1.max(last);
                y0 = y0.min(y);
                y1 = y;
            }
        }
        if x0 == usize::MAX {
            return [0, 0, 0, 0];
        }
        [x0 as u32, y0 as u32, (x1 - x0) as u32, (y1 - y0) as u32]
    }
}

/// `calculate_stability_score`: IoU between the masks thresholded at `threshold + offset` and at
/// `threshold - offset`. Meta's code returns NaN (0/0) when both are empty; this returns 0.
pub fn stability_score(logits: &[f32], threshold: f32, offset: f32) -> f32 {
    let (high, low) = (threshold + offset, threshold - offset);
    let intersections = logits.iter().filter(|&&v| v > high).count();
    let unions = logits.iter().filter(|&&v| v > low).count();
    if unions == 0 {
        return 0.0;
    }
    intersections as f32 / unions as f32
}

/// `SamOnnxModel.select_masks`: the token the official single-mask export returns. With more
/// than 2.5 points (padding point and box corners included) token 0 wins; otherwise the best of
/// the multimask tokens. `argmax` keeps the first of equal scores.
pub fn select_single_mask(iou_predictions: &[f32], num_points: usize) -> usize {
    let bonus = (num_points as f32 - 2.5) * SINGLE_MASK_REWEIGHT;
    let mut best = 0;
    let mut best_score = f32::NEG_INFINITY;
    for (i, &iou) in iou_predictions.iter().enumerate() {
        let score = if i == 0 { iou + bonus } else { iou };
        if score > best_score {
            best = i;
            best_score = score;
        }
    }
    best
}

/// The multimask tokens (1..) ranked by predicted IoU, best first (ties keep token order).
pub fn rank_multimask(iou_predictions: &[f32]) -> Vec<usize> {
    let mut tokens: Vec<usize> = (1..iou_predictions.len()).collect();
    tokens.sort_by(|&a, &b| iou_predictions[b].total_cmp(&iou_predictions[a]));
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each output pixel on its own, the way PyTorch's `upsample_bilinear2d` writes it.
    fn per_pixel_bilinear(src: &[f32], src_size: Size, dst_size: Size, keep: Size) -> Vec<f32> {
        let ys = LinearAxis::new(src_size.height, dst_size.height);
        let xs = LinearAxis::new(src_size.width, dst_size.width);
        let sw = src_size.width;
        let mut out = Vec::with_capacity(keep.height * keep.width);
        for y in 0..keep.height {
            let row0 = &src[ys.i0[y] * sw..(ys.i0[y] + 1) * sw];
            let row1 = &src[ys.i1[y] * sw..(ys.i1[y] + 1) * sw];
            for x in 0..keep.width {
                let (a, b) = (xs.i0[x], xs.i1[x]);
                let top = row0[a] * xs.w0[x] + row0[b] * xs.w1[x];
                let bottom = row1[a] * xs.w0[x] + row1[b] * xs.w1[x];
                out.push(top * ys.w0[y] + bottom * ys.w1[y]);
            }
        }
        out
    }

    #[test]
    fn separable_interpolation_is_bit_identical_to_per_pixel() {
        let cases = [
            (
                Size::new(256, 256),
                Size::new(1024, 1024),
                Size::new(1024, 874),
            ),
            (
                Size::new(1024, 874),
                Size::new(600, 512),
                Size::new(600, 512),
            ),
            (
                Size::new(683, 1024),
                Size::new(1500, 2250),
                Size::new(1500, 2250),
            ),
            (Size::new(7, 5), Size::new(3, 11), Size::new(2, 9)),
            (Size::new(1, 1), Size::new(4, 3), Size::new(4, 3)),
        ];
        for (src_size, dst_size, keep) in cases {
            let src: Vec<f32> = (0..src_size.height * src_size.width)
                .map(|i| ((i * 2_654_435_761usize) % 10_007) as f32 / 313.0 - 16.0)
                .collect();
            let fast = interpolate_bilinear(&src, src_size, dst_size, keep);
            let reference = per_pixel_bilinear(&src, src_size, dst_size, keep);
            assert_eq!(fast.len(), keep.height * keep.width);
            let same = fast
                .iter()
                .zip(&reference)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{src_size:?} -> {dst_size:?} keeping {keep:?} differs"
            );
        }
    }

    #[test]
    fn linear_axis_matches_pytorch_align_corners_false() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 10.]]]]), size=(1, 4), mode="bilinear")
        // -> [0.0, 2.5, 7.5, 10.0]
        let out = interpolate_bilinear(
            &[0.0, 10.0],
            Size::new(1, 2),
            Size::new(1, 4),
            Size::new(1, 4),
        );
        assert_eq!(out, vec![0.0, 2.5, 7.5, 10.0]);
        // Downscaling 4 -> 2 samples at 0.5 and 2.5: [0.5*(0+1), 0.5*(2+3)] of [0, 1, 2, 3].
        let out = interpolate_bilinear(
            &[0.0, 1.0, 2.0, 3.0],
            Size::new(1, 4),
            Size::new(1, 2),
            Size::new(1, 2),
        );
        assert_eq!(out, vec![0.5, 2.5]);
    }

    #[test]
    fn upscale_of_a_constant_is_constant_and_has_the_original_size() {
        let low = vec![3.5f32; LOW_RES_MASK_SIZE * LOW_RES_MASK_SIZE];
        let out = upscale_logits(&low, Size::new(683, 1024), Size::new(1500, 2250));
        assert_eq!(out.len(), 1500 * 2250);
        assert!(out.iter().all(|&v| v == 3.5));
    }

    #[test]
    fn upscale_crops_the_padding_away() {
        // Left half (cols < 128) positive, right half negative: for an image that fills only the
        // left half of the padded square, the whole image is the positive part.
        let mut low = vec![-5.0f32; LOW_RES_MASK_SIZE * LOW_RES_MASK_SIZE];
        for row in low.chunks_exact_mut(LOW_RES_MASK_SIZE) {
            row[..120].fill(5.0);
        }
        let out = upscale_logits(&low, Size::new(1024, 480), Size::new(100, 47));
        let mask = Mask::from_logits(&out, Size::new(100, 47), MASK_THRESHOLD);
        assert_eq!(mask.area(), 100 * 47);
    }

    #[test]
    fn bbox_area_and_stability() {
        let size = Size::new(4, 5);
        let mut logits = vec![-3.0f32; 20];
        logits[5 + 1] = 2.0; // (1, 1)
        logits[10 + 3] = 0.5; // (3, 2)
        let mask = Mask::from_logits(&logits, size, MASK_THRESHOLD);
        assert_eq!(mask.area(), 2);
        assert_eq!(mask.bbox_xywh(), [1, 1, 2, 1]);
        assert!(mask.get(1, 1) && !mask.get(0, 0));
        // > 1.0: one pixel; > -1.0: two pixels.
        assert_eq!(
            stability_score(&logits, MASK_THRESHOLD, STABILITY_SCORE_OFFSET),
            0.5
        );
        assert_eq!(stability_score(&[-9.0; 4], 0.0, 1.0), 0.0);
        let empty = Mask::from_logits(&[-1.0; 20], size, MASK_THRESHOLD);
        assert_eq!(empty.bbox_xywh(), [0, 0, 0, 0]);
    }

    #[test]
    fn single_mask_selection_follows_select_masks() {
        let iou = [0.5, 0.7, 0.9, 0.8];
        // One click + padding point: 2 points, best multimask token.
        assert_eq!(select_single_mask(&iou, 2), 2);
        // Two clicks + padding, or a box and a click: token 0.
        assert_eq!(select_single_mask(&iou, 3), 0);
        // A box alone: two corner points, best multimask token.
        assert_eq!(select_single_mask(&iou, 2), 2);
        assert_eq!(select_single_mask(&[0.1, 0.6, 0.6, 0.2], 1), 1);
        assert_eq!(rank_multimask(&iou), vec![2, 3, 1]);
    }
}
