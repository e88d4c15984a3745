//! Golden parity with Meta's pipeline: `tests/reference/make_reference.py` ran the official
//! `segment_anything` transforms and postprocessing with onnxruntime on the same ONNX files; samrt
//! must reproduce its low-res logits (within 1e-3), predicted IoU (within 1e-3) and final masks
//! (IoU ≥ 0.99), for single-mask and multimask output, on every reference photo and prompt.

mod common;

use common::*;
use samrt::engine::LOW_RES_MASK_LEN;
use samrt::{MaskOutput, Size};

const LOGITS_TOLERANCE: f32 = 1e-3;
const IOU_PREDICTION_TOLERANCE: f32 = 1e-3;
const MIN_MASK_IOU: f64 = 0.99;

#[test]
fn matches_meta_reference_pipeline() {
    let reference = load_json("reference/parity.json");
    let predictor = predictor();
    let images = reference["images"].as_array().expect("images");
    assert!(images.len() >= 4, "the reference covers at least 4 photos");
    let mut failures = Vec::new();
    let mut checked = 0;
    for image in images {
        let file = image["file"].as_str().unwrap();
        let photo = samrt::image_io::load_rgb(&data_dir().join(file)).unwrap();
        assert_eq!(
            photo.width() as u64,
            image["width"].as_u64().unwrap(),
            "{file} width"
        );
        assert_eq!(
            photo.height() as u64,
            image["height"].as_u64().unwrap(),
            "{file} height"
        );
        let embedding = predictor.embed(&photo).unwrap();
        let input_size = &image["input_size"];
        assert_eq!(
            embedding.input_size,
            Size::new(
                input_size[0].as_u64().unwrap() as usize,
                input_size[1].as_u64().unwrap() as usize
            ),
            "{file}: resized size"
        );
        if let Some(e) = image["embedding"].as_object() {
            let expected = load_f32(e["file"].as_str().unwrap(), 0, embedding.data().len());
            let diff = max_abs_diff(embedding.data(), &expected);
            let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
            println!("{file}: embedding max abs diff {diff:e} (max |value| {scale})");
            if diff > 1e-3 * scale.max(1.0) {
                failures.push(format!("{file}: embedding differs by {diff:e}"));
            }
        }
        let prompts = image["prompts"].as_array().unwrap();
        for p in prompts {
            let name = p["name"].as_str().unwrap_or("?");
            let mut prompt = prompt_from_json(p);
            if let Some(k) = p["mask_input_from"].as_u64() {
                prompt.mask_input = Some(load_f32_ref(&prompts[k as usize]["low_res"]));
            }
            let single = predictor
                .predict(&embedding, &prompt, MaskOutput::Single)
                .unwrap();
            assert_eq!(single.masks.len(), 1);
            let best = &single.masks[0];
            let expected_logits = load_f32_ref(&p["low_res"]);
            assert_eq!(expected_logits.len(), LOW_RES_MASK_LEN);
            let logits_diff = max_abs_diff(&best.low_res_logits, &expected_logits);
            let iou_diff = (best.iou - p["iou"].as_f64().unwrap() as f32).abs();
            let best_iou = mask_iou(&best.mask, &rle_mask(&p["mask_rle"]));
            println!(
                "{file} {name}: token {} logits diff {logits_diff:e}, iou diff {iou_diff:e}, mask IoU {best_iou:.5}",
                best.token
            );
            if logits_diff > LOGITS_TOLERANCE {
                failures.push(format!(
                    "{file} {name}: low-res logits differ by {logits_diff}"
                ));
            }
            if iou_diff > IOU_PREDICTION_TOLERANCE {
                failures.push(format!(
                    "{file} {name}: predicted IoU differs by {iou_diff}"
                ));
            }
            if best_iou < MIN_MASK_IOU {
                failures.push(format!(
                    "{file} {name}: mask IoU {best_iou} with the reference"
                ));
            }
            if let Some(multi) = p["multimask"].as_object() {
                let prediction = predictor
                    .predict(&embedding, &prompt, MaskOutput::Multimask)
                    .unwrap();
                assert_eq!(prediction.masks.len(), 3);
                assert!(
                    prediction.masks.windows(2).all(|w| w[0].iou >= w[1].iou),
                    "ranked by IoU"
                );
                for m in &prediction.masks {
                    let t = m.token - 1;
                    let iou_diff = (m.iou - multi["iou"][t].as_f64().unwrap() as f32).abs();
                    let token_iou = mask_iou(&m.mask, &rle_mask(&multi["masks_rle"][t]));
                    if iou_diff > IOU_PREDICTION_TOLERANCE || token_iou < MIN_MASK_IOU {
                        failures.push(format!(
                            "{file} {name} multimask token {}: iou diff {iou_diff}, mask IoU {token_iou}",
                            m.token
                        ));
                    }
                }
            }
            checked += 1;
        }
    }
    println!("{checked} prompts checked");
    assert!(
        checked >= 20,
        "the reference has at least 5 prompts on 4 photos"
    );
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}
