//! Quality on real photographs with ground-truth instance masks (labelme's annotated PASCAL VOC
//! examples, see tests/data/images/PROVENANCE.md): point and box mIoU of samrt must stay within
//! 0.01 of the reference pipeline's on the same prompts.

mod common;

use std::collections::HashMap;

use common::*;
use samrt::{MaskOutput, Prompt};

const MAX_MIOU_GAP: f64 = 0.01;

#[test]
fn miou_on_ground_truth_matches_the_reference_pipeline() {
    let quality = load_json("reference/quality.json");
    let predictor = predictor();
    let instances = quality["instances"].as_array().expect("instances");
    assert!(!instances.is_empty());
    let mut embeddings = HashMap::new();
    let (mut point_sum, mut box_sum) = (0.0, 0.0);
    for inst in instances {
        let file = inst["image"].as_str().unwrap();
        let embedding = embeddings.entry(file.to_string()).or_insert_with(|| {
            let photo = samrt::image_io::load_rgb(&data_dir().join(file)).unwrap();
            predictor.embed(&photo).unwrap()
        });
        let gt = rle_mask(&inst["gt_rle"]);
        let p = &inst["point"];
        let point = Prompt::point(p[0].as_f64().unwrap(), p[1].as_f64().unwrap());
        let b: Vec<f64> = inst["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let bbox = Prompt::boxed(b[0], b[1], b[2], b[3]);
        let point_iou = mask_iou(
            &predictor
                .predict(embedding, &point, MaskOutput::Single)
                .unwrap()
                .masks[0]
                .mask,
            &gt,
        );
        let box_iou = mask_iou(
            &predictor
                .predict(embedding, &bbox, MaskOutput::Single)
                .unwrap()
                .masks[0]
                .mask,
            &gt,
        );
        println!(
            "{file} {}: point IoU {point_iou:.4} (reference {:.4}), box IoU {box_iou:.4} (reference {:.4})",
            inst["label"], inst["reference"]["point_iou"], inst["reference"]["box_iou"]
        );
        point_sum += point_iou;
        box_sum += box_iou;
    }
    let n = instances.len() as f64;
    let (point_miou, box_miou) = (point_sum / n, box_sum / n);
    let reference = &quality["reference_miou"];
    let (ref_point, ref_box) = (
        reference["point"].as_f64().unwrap(),
        reference["box"].as_f64().unwrap(),
    );
    println!("{n} instances: point mIoU {point_miou:.4} (reference {ref_point:.4}), box mIoU {box_miou:.4} (reference {ref_box:.4})");
    assert!(
        (point_miou - ref_point).abs() <= MAX_MIOU_GAP,
        "point mIoU {point_miou} vs reference {ref_point}"
    );
    assert!(
        (box_miou - ref_box).abs() <= MAX_MIOU_GAP,
        "box mIoU {box_miou} vs reference {ref_box}"
    );
}
