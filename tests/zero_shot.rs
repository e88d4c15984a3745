//! Zero-shot tasks against Meta's reference code (`tests/reference/make_amg_reference.py` runs
//! Meta's `SamAutomaticMaskGenerator`, unmodified, with its predictor backed by onnxruntime on the
//! same ONNX files): automatic mask generation and instance masks from detector boxes.

mod common;

use common::*;
use samrt::amg::{generate, AmgParams};
use samrt::instances::{parse_detections, segment_detections};
use serde_json::Value;

const MIN_MATCH_IOU: f64 = 0.9;
const MIN_MATCHED_FRACTION: f64 = 0.95;
const MAX_COUNT_GAP: f64 = 0.05;

fn params_from(reference: &Value) -> AmgParams {
    let p = &reference["params"];
    let f = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("param {k}"));
    AmgParams {
        points_per_side: f("points_per_side") as usize,
        points_per_batch: f("points_per_batch") as usize,
        pred_iou_thresh: f("pred_iou_thresh") as f32,
        stability_score_thresh: f("stability_score_thresh") as f32,
        stability_score_offset: f("stability_score_offset") as f32,
        box_nms_thresh: f("box_nms_thresh") as f32,
        crop_n_layers: f("crop_n_layers") as usize,
        crop_nms_thresh: f("crop_nms_thresh") as f32,
        crop_overlap_ratio: f("crop_overlap_ratio"),
        crop_n_points_downscale_factor: f("crop_n_points_downscale_factor") as usize,
        min_mask_region_area: f("min_mask_region_area") as usize,
    }
}

fn check_amg_case(case: &str) {
    let reference = load_json(&format!("reference/amg/{case}.json"));
    let params = params_from(&reference);
    let photo =
        samrt::image_io::load_rgb(&data_dir().join(reference["image"].as_str().unwrap())).unwrap();
    let ours = generate(predictor(), &photo, &params, 2).unwrap();
    let expected = reference["masks"].as_array().unwrap();
    let ours_masks: Vec<_> = ours.iter().map(|m| m.mask()).collect();
    let mut matched = 0;
    let mut same_order = 0;
    for (i, record) in expected.iter().enumerate() {
        let reference_mask = rle_mask(&record["segmentation"]);
        let best = ours_masks
            .iter()
            .enumerate()
            .map(|(j, m)| (j, mask_iou(m, &reference_mask)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((j, iou)) = best {
            if iou >= MIN_MATCH_IOU {
                matched += 1;
                let m = &ours[j];
                assert!(
                    (f64::from(m.predicted_iou) - record["predicted_iou"].as_f64().unwrap()).abs()
                        < 2e-3,
                    "{case} mask {i}: predicted IoU"
                );
                assert!(
                    (f64::from(m.stability_score) - record["stability_score"].as_f64().unwrap())
                        .abs()
                        < 2e-2,
                    "{case} mask {i}: stability"
                );
                let crop: Vec<u64> = record["crop_box"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as u64)
                    .collect();
                assert_eq!(
                    m.crop_box_xywh().map(|v| v as u64).to_vec(),
                    crop,
                    "{case} mask {i}: crop box"
                );
                same_order += usize::from(j == i);
                if iou == 1.0 {
                    // Identical masks: our COCO RLE string is byte for byte pycocotools'.
                    assert_eq!(
                        m.rle().counts,
                        record["segmentation"]["counts"].as_str().unwrap(),
                        "{case} mask {i}: RLE string"
                    );
                }
            }
        }
    }
    let (n_ours, n_ref) = (ours.len() as f64, expected.len() as f64);
    println!("{case}: {n_ours} masks (reference {n_ref}), {matched} reference masks matched with IoU >= {MIN_MATCH_IOU}, {same_order} at the same rank");
    assert!(
        (n_ours - n_ref).abs() <= MAX_COUNT_GAP * n_ref,
        "{case}: {n_ours} masks, reference {n_ref}"
    );
    assert!(
        matched as f64 >= MIN_MATCHED_FRACTION * n_ref,
        "{case}: only {matched} of {n_ref} reference masks matched"
    );
    // Records are what pycocotools reads: the RLE round-trips and area/bbox agree with the mask.
    for (m, bitmap) in ours.iter().zip(&ours_masks) {
        assert_eq!(m.rle().decode().as_ref(), Some(bitmap));
        assert_eq!(m.area(), bitmap.area());
        let [x, y, w, h] = bitmap.bbox_xywh();
        assert_eq!(m.bbox_xywh(), [x as f32, y as f32, w as f32, h as f32]);
    }
}

#[test]
fn automatic_masks_match_meta_on_a_portrait() {
    check_amg_case("grace_hopper_pps16");
}

#[test]
fn automatic_masks_with_crops_and_small_region_removal_match_meta() {
    check_amg_case("apc_pps8_crop1");
}

#[test]
fn instance_masks_from_coco_detections_match_meta() {
    let reference = load_json("reference/amg/instances_rocket.json");
    let photo =
        samrt::image_io::load_rgb(&data_dir().join(reference["image"].as_str().unwrap())).unwrap();
    let embedding = predictor().embed(&photo).unwrap();
    let detections = parse_detections(&reference["detections"].to_string()).unwrap();
    let found = segment_detections(predictor(), &embedding, &detections, 2).unwrap();
    let expected = reference["results"].as_array().unwrap();
    assert_eq!(found.len(), expected.len());
    for (i, (inst, want)) in found.iter().zip(expected).enumerate() {
        let iou = mask_iou(
            &inst.rle.decode().unwrap(),
            &rle_mask(&want["segmentation"]),
        );
        assert!(iou >= 0.99, "instance {i}: mask IoU {iou}");
        assert!(
            (f64::from(inst.predicted_iou) - want["score"].as_f64().unwrap()).abs() < 1e-3,
            "instance {i}"
        );
        let record = inst.to_record();
        for key in ["image_id", "category_id", "bbox", "score"] {
            assert_eq!(
                record[key], reference["detections"][i][key],
                "instance {i}: {key} is carried over"
            );
        }
        assert_eq!(
            record["segmentation"]["size"],
            serde_json::json!([photo.height(), photo.width()])
        );
    }
}

#[test]
fn edges_follow_object_boundaries_and_are_thin() {
    use samrt::edges::{detect_edges, EdgeParams};
    use samrt::{MaskOutput, Prompt};
    let photo = samrt::image_io::load_rgb(&data_dir().join("images/grace_hopper.jpg")).unwrap();
    let params = EdgeParams {
        points_per_side: 8,
        ..Default::default()
    };
    let edges = detect_edges(predictor(), &photo, &params, 2).unwrap();
    let (w, h) = (edges.width, edges.height);
    let max = edges.strength.iter().fold(0f32, |m, &v| m.max(v));
    let strong: Vec<bool> = edges.strength.iter().map(|&v| v > 0.2 * max).collect();
    // Thin: no 2x2 block is entirely strong edge.
    let thick = (0..h - 1)
        .flat_map(|y| (0..w - 1).map(move |x| (x, y)))
        .filter(|&(x, y)| {
            strong[y * w + x]
                && strong[y * w + x + 1]
                && strong[(y + 1) * w + x]
                && strong[(y + 1) * w + x + 1]
        })
        .count();
    assert!(thick < (w * h) / 2000, "{thick} 2x2 blocks of edge pixels");
    // The face mask's boundary is found: most boundary pixels have a strong edge within 2 px.
    let embedding = predictor().embed(&photo).unwrap();
    let face = predictor()
        .predict(&embedding, &Prompt::point(264.0, 240.0), MaskOutput::Single)
        .unwrap();
    let mask = &face.masks[0].mask;
    let near_edge = |x: usize, y: usize| {
        (y.saturating_sub(2)..(y + 3).min(h))
            .any(|yy| (x.saturating_sub(2)..(x + 3).min(w)).any(|xx| strong[yy * w + xx]))
    };
    let (mut boundary, mut found) = (0, 0);
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let inside = mask.get(x, y);
            if inside
                && (!mask.get(x - 1, y)
                    || !mask.get(x + 1, y)
                    || !mask.get(x, y - 1)
                    || !mask.get(x, y + 1))
            {
                boundary += 1;
                found += usize::from(near_edge(x, y));
            }
        }
    }
    let recall = found as f64 / boundary as f64;
    let density = strong.iter().filter(|&&s| s).count() as f64 / (w * h) as f64;
    println!(
        "edges: boundary recall {recall:.3} over {boundary} pixels, edge density {density:.3}"
    );
    assert!(
        recall >= 0.8,
        "only {recall} of the face boundary is on an edge"
    );
    assert!(density < 0.15, "edge map is not selective: {density}");
}
