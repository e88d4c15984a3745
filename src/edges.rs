//! Zero-shot edge detection, as the SAM paper describes it (section 7.1): prompt a regular grid of
//! foreground points (16x16 by default), keep every multimask output (3 per point), remove
//! redundant masks by box NMS, then take Sobel gradients of the unthresholded mask probability maps
//! (sigmoid of the logits), keep the strongest response per pixel, and thin it with edge
//! non-maximum suppression along the gradient direction.

use image::{GrayImage, RgbImage};

use crate::amg::{build_point_grid, mask_to_box};
use crate::boxes::{nms, BoxXyxy};
use crate::error::Result;
use crate::parallel::{parallel_map, parallel_parts, PROMPTS_PER_BATCH};
use crate::postprocess::{upscale_logits, Mask, MASK_THRESHOLD};
use crate::predictor::{Embedding, SamPredictor};
use crate::prompt::Prompt;

/// Edge-detection parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeParams {
    /// Grid points per side (the paper uses 16: 768 masks).
    pub points_per_side: usize,
    /// Box IoU above which NMS drops a redundant mask.
    pub nms_thresh: f32,
}

impl Default for EdgeParams {
    fn default() -> Self {
        EdgeParams {
            points_per_side: 16,
            nms_thresh: 0.7,
        }
    }
}

/// An edge map: gradient magnitude in [0, 1] after non-maximum suppression, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeMap {
    pub width: usize,
    pub height: usize,
    pub strength: Vec<f32>,
}

impl EdgeMap {
    /// The edge map as an 8-bit image (255 = strongest edge).
    pub fn to_image(&self) -> GrayImage {
        let max = self.strength.iter().fold(0f32, |m, &v| m.max(v));
        let scale = if max > 0.0 { 255.0 / max } else { 0.0 };
        let data = self
            .strength
            .iter()
            .map(|&v| (v * scale).round() as u8)
            .collect();
        GrayImage::from_raw(self.width as u32, self.height as u32, data)
            .expect("width * height values")
    }
}

/// Sobel gradients (gx, gy) of a row-major map, with edge pixels replicated.
pub fn sobel(map: &[f32], width: usize, height: usize) -> (Vec<f32>, Vec<f32>) {
    let at = |x: isize, y: isize| {
        let x = x.clamp(0, width as isize - 1) as usize;
        let y = y.clamp(0, height as isize - 1) as usize;
        map[y * width + x]
    };
    let mut gx = vec![0f32; width * height];
    let mut gy = vec![0f32; width * height];
    for y in 0..height as isize {
        for x in 0..width as isize {
            let i = y as usize * width + x as usize;
            gx[i] = (at(x + 1, y - 1) + 2.0 * at(x + 1, y) + at(x + 1, y + 1))
                - (at(x - 1, y - 1) + 2.0 * at(x - 1, y) + at(x - 1, y + 1));
            gy[i] = (at(x - 1, y + 1) + 2.0 * at(x, y + 1) + at(x + 1, y + 1))
                - (at(x - 1, y - 1) + 2.0 * at(x, y - 1) + at(x + 1, y - 1));
        }
    }
    (gx, gy)
}

/// Keeps a pixel only where its magnitude is a maximum along its gradient direction (quantized to
/// 0°, 45°, 90°, 135°), as Canny's thinning step does.
pub fn edge_nms(
    magnitude: &[f32],
    gx: &[f32],
    gy: &[f32],
    width: usize,
    height: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; width * height];
    for y in 0..height {
        for x in 0..width {
            let i = y * width + x;
            let m = magnitude[i];
            if m <= 0.0 {
                continue;
            }
            let angle = gy[i].atan2(gx[i]).to_degrees().rem_euclid(180.0);
            let (dx, dy): (isize, isize) = if !(22.5..157.5).contains(&angle) {
                (1, 0)
            } else if angle < 67.5 {
                (1, 1)
            } else if angle < 112.5 {
                (0, 1)
            } else {
                (-1, 1)
            };
            let neighbour = |sx: isize, sy: isize| {
                let (nx, ny) = (x as isize + sx, y as isize + sy);
                if nx < 0 || ny < 0 || nx >= width as isize || ny >= height as isize {
                    0.0
                } else {
                    magnitude[ny as usize * width + nx as usize]
                }
            };
            if m >= neighbour(dx, dy) && m > neighbour(-dx, -dy) {
                out[i] = m;
            }
        }
    }
    out
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// A candidate mask of the grid: which point and token made it, and its box.
struct Candidate {
    point: usize,
    token: usize,
    bbox: BoxXyxy,
    iou: f32,
}

/// The maximum Sobel response over the given masks' probability maps, with the winning gradient.
struct Accumulator {
    magnitude: Vec<f32>,
    gx: Vec<f32>,
    gy: Vec<f32>,
}

impl Accumulator {
    fn new(len: usize) -> Self {
        Accumulator {
            magnitude: vec![0.0; len],
            gx: vec![0.0; len],
            gy: vec![0.0; len],
        }
    }

    fn add(&mut self, probability: &[f32], width: usize, height: usize) {
        let (gx, gy) = sobel(probability, width, height);
        for i in 0..self.magnitude.len() {
            let m = gx[i].hypot(gy[i]);
            if m > self.magnitude[i] {
                self.magnitude[i] = m;
                self.gx[i] = gx[i];
                self.gy[i] = gy[i];
            }
        }
    }

    fn merge(&mut self, other: Accumulator) {
        for i in 0..self.magnitude.len() {
            if other.magnitude[i] > self.magnitude[i] {
                self.magnitude[i] = other.magnitude[i];
                self.gx[i] = other.gx[i];
                self.gy[i] = other.gy[i];
            }
        }
    }
}

fn probability(
    predictor: &SamPredictor,
    embedding: &Embedding,
    point: [f64; 2],
    token: usize,
) -> Result<Vec<f32>> {
    let (_, tokens) = predictor.decode(embedding, &Prompt::point(point[0], point[1]))?;
    let logits = upscale_logits(
        tokens.logits(token),
        embedding.input_size,
        embedding.original_size,
    );
    Ok(logits.into_iter().map(sigmoid).collect())
}

/// Computes the edge map of an image.
pub fn detect_edges(
    predictor: &SamPredictor,
    image: &RgbImage,
    params: &EdgeParams,
    threads: usize,
) -> Result<EdgeMap> {
    let embedding = predictor.embed(image)?;
    let (width, height) = (image.width() as usize, image.height() as usize);
    let points: Vec<[f64; 2]> = build_point_grid(params.points_per_side.max(1))
        .into_iter()
        .map(|p| [p[0] * width as f64, p[1] * height as f64])
        .collect();
    let indices: Vec<usize> = (0..points.len()).collect();
    // Pass 1: every multimask output's box, for NMS. Masks are not kept (memory stays flat).
    // Batches of the grid, one part of each per thread, each part's points decoded together.
    let mut candidates: Vec<Candidate> = Vec::new();
    for batch in indices.chunks(PROMPTS_PER_BATCH) {
        candidates.extend(parallel_parts(batch, threads, |part| {
            let prompts: Vec<Prompt> = part
                .iter()
                .map(|&i| Prompt::point(points[i][0], points[i][1]))
                .collect();
            let decoded = predictor.decode_batch(&embedding, &prompts)?;
            let mut candidates = Vec::new();
            for (&i, (_, tokens)) in part.iter().zip(&decoded) {
                for token in 1..tokens.tokens() {
                    let logits = upscale_logits(
                        tokens.logits(token),
                        embedding.input_size,
                        embedding.original_size,
                    );
                    let mask = Mask::from_logits(&logits, embedding.original_size, MASK_THRESHOLD);
                    candidates.push(Candidate {
                        point: i,
                        token,
                        bbox: mask_to_box(&mask),
                        iou: tokens.iou_predictions[token],
                    });
                }
            }
            Ok(candidates)
        })?);
    }
    let boxes: Vec<BoxXyxy> = candidates.iter().map(|c| c.bbox).collect();
    let scores: Vec<f32> = candidates.iter().map(|c| c.iou).collect();
    let kept: Vec<&Candidate> = nms(&boxes, &scores, params.nms_thresh)
        .into_iter()
        .map(|i| &candidates[i])
        .collect();
    log::info!(
        "edges: {} masks, {} after NMS",
        candidates.len(),
        kept.len()
    );
    // Pass 2: Sobel of each kept mask's probability map, maximum per pixel, per thread then merged.
    let threads = threads.clamp(1, kept.len().max(1));
    let chunk = kept.len().div_ceil(threads).max(1);
    let chunks: Vec<&[&Candidate]> = kept.chunks(chunk).collect();
    let partials = parallel_map(&chunks, threads, |part| {
        let mut acc = Accumulator::new(width * height);
        for c in part.iter() {
            acc.add(
                &probability(predictor, &embedding, points[c.point], c.token)?,
                width,
                height,
            );
        }
        Ok(acc)
    })?;
    let mut total = Accumulator::new(width * height);
    for p in partials {
        total.merge(p);
    }
    let strength = edge_nms(&total.magnitude, &total.gx, &total.gy, width, height);
    Ok(EdgeMap {
        width,
        height,
        strength,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sobel_and_nms_thin_a_step_to_one_pixel() {
        // A vertical step from 0 to 1 between columns 3 and 4 of an 8x5 map.
        let (w, h) = (8, 5);
        let map: Vec<f32> = (0..w * h)
            .map(|i| if i % w >= 4 { 1.0 } else { 0.0 })
            .collect();
        let (gx, gy) = sobel(&map, w, h);
        assert_eq!(gx[2 * w + 3], 4.0);
        assert_eq!(gx[2 * w + 4], 4.0);
        assert_eq!(gx[2 * w + 1], 0.0);
        assert!(gy.iter().all(|&v| v == 0.0));
        let magnitude: Vec<f32> = gx.iter().zip(&gy).map(|(a, b)| a.hypot(*b)).collect();
        let thin = edge_nms(&magnitude, &gx, &gy, w, h);
        // Of the two equal responses, the one before the step survives: one pixel per row.
        for y in 0..h {
            let row = &thin[y * w..(y + 1) * w];
            assert_eq!(
                row.iter().filter(|&&v| v > 0.0).count(),
                1,
                "row {y}: {row:?}"
            );
            assert_eq!(row[3], 4.0);
        }
        let image = EdgeMap {
            width: w,
            height: h,
            strength: thin,
        }
        .to_image();
        assert_eq!(image.get_pixel(3, 0).0, [255]);
        assert_eq!(image.get_pixel(4, 0).0, [0]);
    }
}
