//! Automatic mask generation ("segment everything"), a port of Meta's `SamAutomaticMaskGenerator`
//! and `segment_anything.utils.amg`, as small pure functions plus one driver, [`generate`].
//!
//! A grid of single-point prompts is decoded (multimask, tokens 1..=3) against the embedding of the
//! image and of each zoomed crop; masks are kept when their predicted IoU and stability are high
//! enough and they do not touch a crop edge that is not an image edge; duplicates are removed by box
//! NMS within each crop and across crops; optionally small islands and holes are removed, followed
//! by another NMS. Masks are stored as run lengths as soon as they are made, so memory stays
//! bounded by the number of kept masks, not by the grid.

use image::RgbImage;

pub use crate::boxes::{nms, BoxXyxy};
use crate::engine::DecodedTokens;
use crate::error::{Error, Result};
use crate::parallel::parallel_parts;
use crate::postprocess::{stability_score, upscale_logits, Mask, MASK_THRESHOLD};
use crate::predictor::{Embedding, SamPredictor};
use crate::prompt::Prompt;
use crate::rle::{counts_to_string, decode_counts, encode_counts, encode_counts_at, CocoRle};

/// `SamAutomaticMaskGenerator` parameters; [`Default`] gives Meta's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct AmgParams {
    /// Points sampled along one side of the image (the grid has `points_per_side²` points).
    pub points_per_side: usize,
    /// Points decoded per batch (bounds the memory of one batch; results do not depend on it).
    pub points_per_batch: usize,
    /// Keep masks whose predicted IoU is above this.
    pub pred_iou_thresh: f32,
    /// Keep masks whose stability score is at least this.
    pub stability_score_thresh: f32,
    /// Logit offset of the stability score.
    pub stability_score_offset: f32,
    /// Box IoU above which NMS drops a duplicate mask within a crop.
    pub box_nms_thresh: f32,
    /// Crop layers: layer `i` (1-based) has `(2^i)²` overlapping crops.
    pub crop_n_layers: usize,
    /// Box IoU above which NMS drops a duplicate mask across crops.
    pub crop_nms_thresh: f32,
    /// Overlap of the first layer's crops, as a fraction of the image's short side.
    pub crop_overlap_ratio: f64,
    /// Points per side in layer `i` are `points_per_side / factor^i`.
    pub crop_n_points_downscale_factor: usize,
    /// If > 0, remove islands and fill holes smaller than this many pixels.
    pub min_mask_region_area: usize,
}

impl Default for AmgParams {
    fn default() -> Self {
        AmgParams {
            points_per_side: 32,
            points_per_batch: 64,
            pred_iou_thresh: 0.88,
            stability_score_thresh: 0.95,
            stability_score_offset: 1.0,
            box_nms_thresh: 0.7,
            crop_n_layers: 0,
            crop_nms_thresh: 0.7,
            crop_overlap_ratio: 512.0 / 1500.0,
            crop_n_points_downscale_factor: 1,
            min_mask_region_area: 0,
        }
    }
}

impl AmgParams {
    /// Checks the parameters, with the reason for any that cannot work.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Prompt(format!("automatic mask generation: {what}")));
        if self.points_per_side == 0 {
            return bad("points_per_side must be at least 1".into());
        }
        if self.points_per_batch == 0 {
            return bad("points_per_batch must be at least 1".into());
        }
        if self.crop_n_points_downscale_factor == 0 {
            return bad("crop_n_points_downscale_factor must be at least 1".into());
        }
        for (name, v) in [
            ("pred_iou_thresh", self.pred_iou_thresh),
            ("stability_score_thresh", self.stability_score_thresh),
            ("box_nms_thresh", self.box_nms_thresh),
            ("crop_nms_thresh", self.crop_nms_thresh),
        ] {
            if !v.is_finite() {
                return bad(format!("{name} must be a finite number, got {v}"));
            }
        }
        if !(0.0..1.0).contains(&self.crop_overlap_ratio) {
            return bad(format!(
                "crop_overlap_ratio must be in [0, 1), got {}",
                self.crop_overlap_ratio
            ));
        }
        if self.crop_n_layers > 4 {
            return bad(format!(
                "crop_n_layers {} would run {} crops; use at most 4",
                self.crop_n_layers,
                (1..=self.crop_n_layers)
                    .map(|i| 4usize.pow(i as u32))
                    .sum::<usize>()
                    + 1
            ));
        }
        Ok(())
    }
}

/// One generated mask, with the fields of Meta's output record.
#[derive(Debug, Clone, PartialEq)]
pub struct AmgMask {
    /// Height and width of the image.
    pub size: [usize; 2],
    /// Uncompressed COCO run lengths (column-major, starting with zeros).
    pub counts: Vec<u32>,
    /// Mask box in image pixels, `[x0, y0, x1, y1]` inclusive.
    pub bbox: BoxXyxy,
    pub predicted_iou: f32,
    /// The grid point that produced the mask, in image pixels.
    pub point: [f64; 2],
    pub stability_score: f32,
    /// The crop it was generated in, `[x0, y0, x1, y1]`.
    pub crop_box: [usize; 4],
}

impl AmgMask {
    /// Number of pixels in the mask (`area_from_rle`).
    pub fn area(&self) -> u64 {
        self.counts
            .iter()
            .skip(1)
            .step_by(2)
            .map(|&c| u64::from(c))
            .sum()
    }

    /// The mask as COCO compressed RLE.
    pub fn rle(&self) -> CocoRle {
        CocoRle {
            size: self.size,
            counts: counts_to_string(&self.counts),
        }
    }

    /// The mask as a bitmap.
    pub fn mask(&self) -> Mask {
        decode_counts(&self.counts, self.size[0], self.size[1])
            .expect("counts made by samrt cover the image")
    }

    /// `[x, y, w, h]` as Meta's record gives it (`w = x1 - x0`).
    pub fn bbox_xywh(&self) -> [f32; 4] {
        let [x0, y0, x1, y1] = self.bbox;
        [x0, y0, x1 - x0, y1 - y0]
    }

    /// The crop box as `[x, y, w, h]`.
    pub fn crop_box_xywh(&self) -> [usize; 4] {
        let [x0, y0, x1, y1] = self.crop_box;
        [x0, y0, x1 - x0, y1 - y0]
    }
}

/// `build_point_grid`: `n²` points in [0, 1]², cell centres, row by row (x fastest), computed as
/// `np.linspace(1/(2n), 1 - 1/(2n), n)` does in float64.
pub fn build_point_grid(n: usize) -> Vec<[f64; 2]> {
    let offset = 1.0 / (2.0 * n as f64);
    let (start, stop) = (offset, 1.0 - offset);
    let one_side: Vec<f64> = (0..n)
        .map(|i| {
            if n == 1 {
                start
            } else if i == n - 1 {
                stop
            } else {
                i as f64 * ((stop - start) / (n - 1) as f64) + start
            }
        })
        .collect();
    one_side
        .iter()
        .flat_map(|&y| one_side.iter().map(move |&x| [x, y]))
        .collect()
}

/// `build_all_layer_point_grids`.
pub fn build_all_layer_point_grids(
    n_per_side: usize,
    n_layers: usize,
    scale_per_layer: usize,
) -> Vec<Vec<[f64; 2]>> {
    (0..=n_layers)
        .map(|i| {
            build_point_grid((n_per_side as f64 / (scale_per_layer as f64).powi(i as i32)) as usize)
        })
        .collect()
}

/// `generate_crop_boxes`: the whole image (layer 0), then for each layer `i` ≥ 1 a grid of
/// `2^i × 2^i` overlapping crops; boxes `[x0, y0, x1, y1]` with the layer of each.
pub fn generate_crop_boxes(
    height: usize,
    width: usize,
    n_layers: usize,
    overlap_ratio: f64,
) -> Vec<([usize; 4], usize)> {
    let mut boxes = vec![([0, 0, width, height], 0)];
    let short_side = height.min(width) as f64;
    let crop_len = |orig_len: usize, n_crops: usize, overlap: usize| -> usize {
        ((overlap as f64 * (n_crops - 1) as f64 + orig_len as f64) / n_crops as f64).ceil() as usize
    };
    for layer in 0..n_layers {
        let n_crops_per_side = 1usize << (layer + 1);
        let overlap = (overlap_ratio * short_side * (2.0 / n_crops_per_side as f64)) as usize;
        let crop_w = crop_len(width, n_crops_per_side, overlap);
        let crop_h = crop_len(height, n_crops_per_side, overlap);
        let x0s: Vec<usize> = (0..n_crops_per_side)
            .map(|i| (crop_w - overlap) * i)
            .collect();
        let y0s: Vec<usize> = (0..n_crops_per_side)
            .map(|i| (crop_h - overlap) * i)
            .collect();
        // itertools.product(x0s, y0s): x outer, y inner.
        for &x0 in &x0s {
            for &y0 in &y0s {
                boxes.push((
                    [x0, y0, (x0 + crop_w).min(width), (y0 + crop_h).min(height)],
                    layer + 1,
                ));
            }
        }
    }
    boxes
}

/// `batched_mask_to_box` for one mask: `[x0, y0, x1, y1]` inclusive, `[0, 0, 0, 0]` when empty.
pub fn mask_to_box(mask: &Mask) -> BoxXyxy {
    let [x, y, w, h] = mask.bbox_xywh();
    [x as f32, y as f32, (x + w) as f32, (y + h) as f32]
}

/// `is_box_near_crop_edge`: whether a box (in crop coordinates) lies within 20 px of an edge of
/// its crop that is not also an edge of the image.
pub fn is_box_near_crop_edge(bbox: BoxXyxy, crop_box: [usize; 4], image_box: [usize; 4]) -> bool {
    const ATOL: f32 = 20.0;
    let (dx, dy) = (crop_box[0] as f32, crop_box[1] as f32);
    let uncropped = [bbox[0] + dx, bbox[1] + dy, bbox[2] + dx, bbox[3] + dy];
    (0..4).any(|i| {
        let near_crop = (uncropped[i] - crop_box[i] as f32).abs() <= ATOL;
        let near_image = (uncropped[i] - image_box[i] as f32).abs() <= ATOL;
        near_crop && !near_image
    })
}

/// Labels of the 8-connected components of `mask`'s true pixels, in raster order of their first
/// pixel, and their sizes (`cv2.connectedComponentsWithStats(mask, 8)` without the background).
pub fn connected_components(mask: &Mask) -> (Vec<u32>, Vec<u64>) {
    let (w, h) = (mask.width, mask.height);
    let mut labels = vec![0u32; w * h];
    let mut sizes = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !mask.data[start] || labels[start] != 0 {
            continue;
        }
        sizes.push(0u64);
        let label = sizes.len() as u32;
        labels[start] = label;
        stack.push(start);
        while let Some(p) = stack.pop() {
            sizes[label as usize - 1] += 1;
            let (x, y) = ((p % w) as isize, (p / w) as isize);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                        continue;
                    }
                    let q = ny as usize * w + nx as usize;
                    if mask.data[q] && labels[q] == 0 {
                        labels[q] = label;
                        stack.push(q);
                    }
                }
            }
        }
    }
    (labels, sizes)
}

/// Which kind of small region [`remove_small_regions`] removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmallRegion {
    /// Background regions enclosed by the mask: filled.
    Holes,
    /// Disconnected parts of the mask: removed (the largest is kept if all are small).
    Islands,
}

/// `remove_small_regions`: the mask without holes or islands smaller than `area_thresh`, and
/// whether anything changed.
pub fn remove_small_regions(mask: &Mask, area_thresh: f64, mode: SmallRegion) -> (Mask, bool) {
    let holes = mode == SmallRegion::Holes;
    let working = Mask {
        width: mask.width,
        height: mask.height,
        data: mask.data.iter().map(|&b| b != holes).collect(),
    };
    let (labels, sizes) = connected_components(&working);
    let small: Vec<bool> = sizes.iter().map(|&s| (s as f64) < area_thresh).collect();
    if !small.iter().any(|&s| s) {
        return (mask.clone(), false);
    }
    let data = if holes {
        // Keep label 0 (the mask itself) and fill the small background regions.
        labels
            .iter()
            .map(|&l| l == 0 || small[l as usize - 1])
            .collect()
    } else {
        let mut keep: Vec<bool> = small.iter().map(|&s| !s).collect();
        if !keep.iter().any(|&k| k) {
            let largest = sizes
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
                .map(|(i, _)| i);
            if let Some(i) = largest {
                keep[i] = true;
            }
        }
        labels
            .iter()
            .map(|&l| l != 0 && keep[l as usize - 1])
            .collect()
    };
    (
        Mask {
            width: mask.width,
            height: mask.height,
            data,
        },
        true,
    )
}

/// The masks some grid points yield, decoded together (`SamPredictor::decode_batch`), in point
/// order.
fn masks_for_points(
    predictor: &SamPredictor,
    embedding: &Embedding,
    crop_points: &[[f64; 2]],
    crop_box: [usize; 4],
    image_size: [usize; 2],
    params: &AmgParams,
) -> Result<Vec<AmgMask>> {
    let prompts: Vec<Prompt> = crop_points
        .iter()
        .map(|p| Prompt::point(p[0], p[1]))
        .collect();
    let decoded = predictor.decode_batch(embedding, &prompts)?;
    let mut out = Vec::new();
    for (&point, (_, tokens)) in crop_points.iter().zip(&decoded) {
        out.extend(masks_for_point(
            embedding, tokens, point, crop_box, image_size, params,
        ));
    }
    Ok(out)
}

/// The masks one grid point's decoder tokens yield, after the IoU, stability and crop-edge
/// filters.
fn masks_for_point(
    embedding: &Embedding,
    tokens: &DecodedTokens,
    crop_point: [f64; 2],
    crop_box: [usize; 4],
    image_size: [usize; 2],
    params: &AmgParams,
) -> Vec<AmgMask> {
    let [height, width] = image_size;
    let mut out = Vec::new();
    for token in 1..tokens.tokens() {
        let iou = tokens.iou_predictions[token];
        if params.pred_iou_thresh > 0.0 && iou <= params.pred_iou_thresh {
            continue;
        }
        let logits = upscale_logits(
            tokens.logits(token),
            embedding.input_size,
            embedding.original_size,
        );
        let stability = stability_score(&logits, MASK_THRESHOLD, params.stability_score_offset);
        if params.stability_score_thresh > 0.0 && stability < params.stability_score_thresh {
            continue;
        }
        let mask = Mask::from_logits(&logits, embedding.original_size, MASK_THRESHOLD);
        drop(logits);
        let bbox = mask_to_box(&mask);
        if is_box_near_crop_edge(bbox, crop_box, [0, 0, width, height]) {
            continue;
        }
        let (dx, dy) = (crop_box[0], crop_box[1]);
        out.push(AmgMask {
            size: image_size,
            counts: encode_counts_at(&mask, dx, dy, height, width),
            bbox: [
                bbox[0] + dx as f32,
                bbox[1] + dy as f32,
                bbox[2] + dx as f32,
                bbox[3] + dy as f32,
            ],
            predicted_iou: iou,
            point: [crop_point[0] + dx as f64, crop_point[1] + dy as f64],
            stability_score: stability,
            crop_box,
        });
    }
    out
}

/// `_process_crop`: embeds one crop, decodes its grid and keeps the masks that survive the filters
/// and NMS, in image coordinates.
fn process_crop(
    predictor: &SamPredictor,
    image: &RgbImage,
    crop_box: [usize; 4],
    grid: &[[f64; 2]],
    params: &AmgParams,
    threads: usize,
) -> Result<Vec<AmgMask>> {
    let [x0, y0, x1, y1] = crop_box;
    let crop = image::imageops::crop_imm(
        image,
        x0 as u32,
        y0 as u32,
        (x1 - x0) as u32,
        (y1 - y0) as u32,
    )
    .to_image();
    let embedding = predictor.embed(&crop)?;
    let (crop_w, crop_h) = ((x1 - x0) as f64, (y1 - y0) as f64);
    let points: Vec<[f64; 2]> = grid
        .iter()
        .map(|p| [p[0] * crop_w, p[1] * crop_h])
        .collect();
    let image_size = [image.height() as usize, image.width() as usize];
    let mut masks = Vec::new();
    for batch in points.chunks(params.points_per_batch) {
        // One part of the batch per thread, each part's points decoded together.
        masks.extend(parallel_parts(batch, threads, |part| {
            masks_for_points(predictor, &embedding, part, crop_box, image_size, params)
        })?);
    }
    let boxes: Vec<BoxXyxy> = masks.iter().map(|m| m.bbox).collect();
    let scores: Vec<f32> = masks.iter().map(|m| m.predicted_iou).collect();
    Ok(select(masks, &nms(&boxes, &scores, params.box_nms_thresh)))
}

fn select(masks: Vec<AmgMask>, keep: &[usize]) -> Vec<AmgMask> {
    let mut slots: Vec<Option<AmgMask>> = masks.into_iter().map(Some).collect();
    keep.iter().filter_map(|&i| slots[i].take()).collect()
}

/// `postprocess_small_regions`: removes small islands and holes, then NMS preferring the masks
/// that did not change.
pub fn postprocess_small_regions(
    masks: Vec<AmgMask>,
    min_area: usize,
    nms_thresh: f32,
) -> Vec<AmgMask> {
    if masks.is_empty() {
        return masks;
    }
    let mut updated = Vec::with_capacity(masks.len());
    let mut scores = Vec::with_capacity(masks.len());
    for m in &masks {
        let mask = m.mask();
        let (mask, holes_changed) =
            remove_small_regions(&mask, min_area as f64, SmallRegion::Holes);
        let (mask, islands_changed) =
            remove_small_regions(&mask, min_area as f64, SmallRegion::Islands);
        let changed = holes_changed || islands_changed;
        scores.push(if changed { 0.0 } else { 1.0 });
        updated.push(changed.then(|| (mask_to_box(&mask), encode_counts(&mask))));
    }
    let boxes: Vec<BoxXyxy> = masks
        .iter()
        .zip(&updated)
        .map(|(m, u)| u.as_ref().map_or(m.bbox, |(b, _)| *b))
        .collect();
    let keep = nms(&boxes, &scores, nms_thresh);
    let mut masks = masks;
    for &i in &keep {
        if let Some((bbox, counts)) = updated[i].take() {
            masks[i].bbox = bbox;
            masks[i].counts = counts;
        }
    }
    select(masks, &keep)
}

/// `SamAutomaticMaskGenerator.generate`: every mask of the image, in Meta's order. Decoding runs on
/// `threads` threads (results do not depend on it).
pub fn generate(
    predictor: &SamPredictor,
    image: &RgbImage,
    params: &AmgParams,
    threads: usize,
) -> Result<Vec<AmgMask>> {
    params.validate()?;
    let (height, width) = (image.height() as usize, image.width() as usize);
    let grids = build_all_layer_point_grids(
        params.points_per_side,
        params.crop_n_layers,
        params.crop_n_points_downscale_factor,
    );
    let crops = generate_crop_boxes(
        height,
        width,
        params.crop_n_layers,
        params.crop_overlap_ratio,
    );
    let mut masks = Vec::new();
    for (crop_box, layer) in &crops {
        log::info!(
            "automatic masks: crop {crop_box:?} (layer {layer}), {} points",
            grids[*layer].len()
        );
        masks.extend(process_crop(
            predictor,
            image,
            *crop_box,
            &grids[*layer],
            params,
            threads,
        )?);
    }
    if crops.len() > 1 {
        let boxes: Vec<BoxXyxy> = masks.iter().map(|m| m.bbox).collect();
        let scores: Vec<f32> = masks
            .iter()
            .map(|m| {
                let [x0, y0, x1, y1] = m.crop_box;
                1.0 / ((x1 - x0) * (y1 - y0)) as f32
            })
            .collect();
        masks = select(masks, &nms(&boxes, &scores, params.crop_nms_thresh));
    }
    if params.min_mask_region_area > 0 {
        masks = postprocess_small_regions(
            masks,
            params.min_mask_region_area,
            params.box_nms_thresh.max(params.crop_nms_thresh),
        );
    }
    Ok(masks)
}

/// Object proposals (the SAM paper's zero-shot proposal task): the generated masks ranked by
/// predicted IoU, then stability (both descending; ties keep generation order), the best `k`.
pub fn rank_proposals(mut masks: Vec<AmgMask>, k: usize) -> Vec<AmgMask> {
    masks.sort_by(|a, b| {
        b.predicted_iou
            .total_cmp(&a.predicted_iou)
            .then(b.stability_score.total_cmp(&a.stability_score))
    });
    masks.truncate(k);
    masks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposals_are_ranked_by_predicted_iou_then_stability() {
        let mask = |iou: f32, stability: f32| AmgMask {
            size: [1, 1],
            counts: vec![0, 1],
            bbox: [0.0; 4],
            predicted_iou: iou,
            point: [0.5, 0.5],
            stability_score: stability,
            crop_box: [0, 0, 1, 1],
        };
        let ranked = rank_proposals(
            vec![
                mask(0.9, 0.96),
                mask(0.95, 0.97),
                mask(0.9, 0.99),
                mask(0.5, 1.0),
            ],
            3,
        );
        let keys: Vec<(f32, f32)> = ranked
            .iter()
            .map(|m| (m.predicted_iou, m.stability_score))
            .collect();
        assert_eq!(keys, vec![(0.95, 0.97), (0.9, 0.99), (0.9, 0.96)]);
    }

    fn mask_from_rows(rows: &[&str]) -> Mask {
        let width = rows[0].len();
        let data = rows
            .iter()
            .flat_map(|r| r.chars().map(|c| c == '#'))
            .collect();
        Mask {
            width,
            height: rows.len(),
            data,
        }
    }

    #[test]
    fn point_grids_match_numpy() {
        // segment_anything.utils.amg.build_point_grid(3)
        let third = 0.16666666666666666;
        let g = build_point_grid(3);
        assert_eq!(g.len(), 9);
        assert_eq!(g[0], [third, third]);
        assert_eq!(g[1], [0.5, third]);
        assert_eq!(g[2], [0.8333333333333334, third]);
        assert_eq!(g[3], [third, 0.5]);
        assert_eq!(build_point_grid(1), vec![[0.5, 0.5]]);
        let layers = build_all_layer_point_grids(32, 2, 2);
        assert_eq!(
            layers.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![1024, 256, 64]
        );
        assert_eq!(layers[0][0], [1.0 / 64.0, 1.0 / 64.0]);
        assert_eq!(layers[0][1023], [1.0 - 1.0 / 64.0, 1.0 - 1.0 / 64.0]);
    }

    #[test]
    fn crop_boxes_match_meta() {
        // generate_crop_boxes((907, 1210), 1, 512 / 1500)
        let boxes = generate_crop_boxes(907, 1210, 1, 512.0 / 1500.0);
        let expected = [
            ([0, 0, 1210, 907], 0),
            ([0, 0, 760, 608], 1),
            ([0, 299, 760, 907], 1),
            ([451, 0, 1210, 608], 1),
            ([451, 299, 1210, 907], 1),
        ];
        assert_eq!(boxes, expected);
        // generate_crop_boxes((600, 512), 2, 512 / 1500)[0][5:8]
        let boxes = generate_crop_boxes(600, 512, 2, 512.0 / 1500.0);
        assert_eq!(boxes.len(), 1 + 4 + 16);
        let layer2: Vec<[usize; 4]> = boxes[5..8].iter().map(|b| b.0).collect();
        assert_eq!(
            layer2,
            vec![[0, 0, 194, 216], [0, 129, 194, 345], [0, 258, 194, 474]]
        );
    }

    #[test]
    fn crop_edge_filter_matches_meta() {
        // is_box_near_crop_edge([[5,5,100,100],[30,30,100,100],[30,30,560,100]], [0,0,580,400], [0,0,1000,800])
        let crop = [0, 0, 580, 400];
        let image = [0, 0, 1000, 800];
        assert!(!is_box_near_crop_edge(
            [5.0, 5.0, 100.0, 100.0],
            crop,
            image
        ));
        assert!(!is_box_near_crop_edge(
            [30.0, 30.0, 100.0, 100.0],
            crop,
            image
        ));
        assert!(is_box_near_crop_edge(
            [30.0, 30.0, 560.0, 100.0],
            crop,
            image
        ));
        // In crop coordinates: a box at the crop's left edge, which is not the image's.
        assert!(is_box_near_crop_edge(
            [0.0, 50.0, 40.0, 80.0],
            [300, 0, 600, 400],
            image
        ));
    }

    #[test]
    fn counts_of_a_placed_crop_decode_to_the_padded_mask() {
        let crop = mask_from_rows(&["#..", "##.", "..#"]);
        let counts = encode_counts_at(&crop, 2, 1, 6, 7);
        let mut padded = Mask {
            width: 7,
            height: 6,
            data: vec![false; 42],
        };
        for y in 0..3 {
            for x in 0..3 {
                padded.data[(y + 1) * 7 + x + 2] = crop.get(x, y);
            }
        }
        assert_eq!(decode_counts(&counts, 6, 7), Some(padded));
        assert_eq!(decode_counts(&counts, 6, 6), None);
    }

    #[test]
    fn small_holes_are_filled_and_small_islands_removed() {
        let mask = mask_from_rows(&["#####....", "#.#.#....", "#####..#.", "........."]);
        let (filled, changed) = remove_small_regions(&mask, 2.0, SmallRegion::Holes);
        assert!(changed);
        assert_eq!(
            filled,
            mask_from_rows(&["#####....", "#####....", "#####..#.", "........."])
        );
        let (cleaned, changed) = remove_small_regions(&mask, 2.0, SmallRegion::Islands);
        assert!(changed);
        assert_eq!(
            cleaned,
            mask_from_rows(&["#####....", "#.#.#....", "#####....", "........."])
        );
        // Nothing small: unchanged.
        assert!(!remove_small_regions(&mask, 1.0, SmallRegion::Islands).1);
        // Every island small: the largest is kept.
        let (largest, _) = remove_small_regions(&mask, 100.0, SmallRegion::Islands);
        assert_eq!(
            largest,
            mask_from_rows(&["#####....", "#.#.#....", "#####....", "........."])
        );
        // 8-connectivity: diagonal pixels are one component.
        let (_, sizes) = connected_components(&mask_from_rows(&["#.", ".#"]));
        assert_eq!(sizes, vec![2]);
    }

    #[test]
    fn records_follow_meta_conventions() {
        let m = AmgMask {
            size: [3, 3],
            counts: vec![1, 2, 6],
            bbox: [0.0, 1.0, 0.0, 2.0],
            predicted_iou: 0.9,
            point: [0.5, 1.5],
            stability_score: 0.96,
            crop_box: [0, 0, 3, 3],
        };
        assert_eq!(m.area(), 2);
        assert_eq!(m.bbox_xywh(), [0.0, 1.0, 0.0, 1.0]);
        assert_eq!(m.crop_box_xywh(), [0, 0, 3, 3]);
        assert_eq!(m.mask(), mask_from_rows(&["...", "#..", "#.."]));
        assert_eq!(m.rle().decode().unwrap(), m.mask());
        assert!(AmgParams {
            points_per_side: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(AmgParams {
            crop_overlap_ratio: 1.5,
            ..Default::default()
        }
        .validate()
        .is_err());
        AmgParams::default().validate().unwrap();
    }
}
