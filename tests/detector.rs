//! The bundled object detector (SSD MobileNetV2 COCO, models/ssd_mobilenet_v2_coco) against the
//! reference made by tests/reference/make_detector.py with onnxruntime on the same graph: the
//! same input pixels, and the same detections after threshold and per-class NMS.

mod common;

use std::path::Path;

use common::*;
use samrt::detector::{Detector, DetectorParams};

fn detector() -> Detector {
    Detector::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/ssd_mobilenet_v2_coco"))
        .unwrap()
}

#[test]
fn detections_match_the_reference() {
    let detector = detector();
    let dir = data_dir().join("reference/detector");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 2);
    for file in files {
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let photo = samrt::image_io::load_rgb(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join(reference["image"].as_str().unwrap()),
        )
        .unwrap();
        let input = image::open(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(reference["input"]["file"].as_str().unwrap()),
        )
        .unwrap()
        .to_rgb8();
        assert!(
            detector.input_pixels(&photo) == input.as_raw().as_slice(),
            "{}: detector input differs from Pillow's",
            file.display()
        );
        let found = detector.detect(&photo, &DetectorParams::default()).unwrap();
        let expected = reference["detections"].as_array().unwrap();
        assert_eq!(found.len(), expected.len(), "{}: {found:?}", file.display());
        for (d, e) in found.iter().zip(expected) {
            assert_eq!(d.class_index as u64, e["class_index"].as_u64().unwrap());
            assert_eq!(d.label.as_deref(), e["label"].as_str());
            assert!((f64::from(d.score) - e["score"].as_f64().unwrap()).abs() < 1e-4);
            let b = e["box_xyxy_pixels"].as_array().unwrap();
            for (ours, theirs) in [d.bbox.x0, d.bbox.y0, d.bbox.x1, d.bbox.y1].iter().zip(b) {
                assert!(
                    (ours - theirs.as_f64().unwrap()).abs() < 0.5,
                    "{}: box {:?} vs {b:?}",
                    file.display(),
                    d.bbox
                );
            }
        }
        println!("{}: {} detections match", file.display(), found.len());
    }
}

#[test]
fn class_filter_and_unknown_classes() {
    let detector = detector();
    let photo = samrt::image_io::load_rgb(&data_dir().join("images/grace_hopper.jpg")).unwrap();
    let only_ties = DetectorParams {
        classes: Some(vec!["tie".into()]),
        ..Default::default()
    };
    let found = detector.detect(&photo, &only_ties).unwrap();
    assert!(!found.is_empty() && found.iter().all(|d| d.label.as_deref() == Some("tie")));
    let bad = DetectorParams {
        classes: Some(vec!["unicorn".into()]),
        ..Default::default()
    };
    let err = detector.detect(&photo, &bad).unwrap_err().to_string();
    assert!(err.contains("unicorn") && err.contains("person"), "{err}");
    let err = Detector::load(Path::new("/nonexistent-detector"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("manifest.json"), "{err}");
}

#[test]
fn instances_from_the_on_board_detector() {
    let photo = data_dir().join("images/2011_000006.jpg");
    let detector_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/ssd_mobilenet_v2_coco");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_samrt"))
        .args([
            "instances",
            photo.to_str().unwrap(),
            "--detector",
            detector_dir.to_str().unwrap(),
            "--classes",
            "person",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(records.len(), 3, "three people");
    for r in &records {
        assert_eq!(r["label"], "person");
        assert_eq!(r["category_id"], 0);
        let mask = rle_mask(&r["segmentation"]);
        let b: Vec<f64> = r["bbox"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        // Most of the mask lies inside its detection box.
        let mut inside = 0u64;
        for y in 0..mask.height {
            for x in 0..mask.width {
                if mask.get(x, y)
                    && (x as f64) >= b[0] - 2.0
                    && (x as f64) <= b[0] + b[2] + 2.0
                    && (y as f64) >= b[1] - 2.0
                    && (y as f64) <= b[1] + b[3] + 2.0
                {
                    inside += 1;
                }
            }
        }
        assert!(
            mask.area() > 1000 && inside as f64 >= 0.9 * mask.area() as f64,
            "{r}"
        );
    }
}
