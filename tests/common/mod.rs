//! Helpers shared by the integration tests: paths, the reference files, mask comparisons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use samrt::{CocoRle, Mask, ModelFiles, SamPredictor};
use serde_json::Value;

/// `tests/data`.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
}

/// The default model, loaded once per test binary.
pub fn predictor() -> &'static SamPredictor {
    static PREDICTOR: OnceLock<SamPredictor> = OnceLock::new();
    PREDICTOR.get_or_init(|| {
        SamPredictor::load(&ModelFiles::default_model().expect("default model"))
            .expect("load default model")
    })
}

/// A JSON file under tests/data.
pub fn load_json(relative: &str) -> Value {
    let path = data_dir().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `len` little-endian f32 values at element `offset` of a file under tests/data.
pub fn load_f32(relative: &str, offset: usize, len: usize) -> Vec<f32> {
    let path = data_dir().join(relative);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let slice = &bytes[offset * 4..(offset + len) * 4];
    slice
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// A `{"file", "offset", "len"}` reference to f32 values.
pub fn load_f32_ref(v: &Value) -> Vec<f32> {
    load_f32(
        v["file"].as_str().expect("file"),
        v["offset"].as_u64().expect("offset") as usize,
        v["len"].as_u64().expect("len") as usize,
    )
}

/// A COCO RLE JSON object decoded to a mask.
pub fn rle_mask(v: &Value) -> Mask {
    let rle: CocoRle = serde_json::from_value(v.clone()).expect("RLE object");
    rle.decode().expect("valid RLE")
}

/// Intersection over union of two masks of the same size (1 when both are empty).
pub fn mask_iou(a: &Mask, b: &Mask) -> f64 {
    assert_eq!(
        (a.width, a.height),
        (b.width, b.height),
        "mask sizes differ"
    );
    let (mut inter, mut union) = (0u64, 0u64);
    for (&x, &y) in a.data.iter().zip(&b.data) {
        inter += u64::from(x && y);
        union += u64::from(x || y);
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Largest absolute difference between two slices of the same length.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Points and box of a reference prompt (`"points": [[x, y, label]], "box": [..] | null`).
pub fn prompt_from_json(v: &Value) -> samrt::Prompt {
    let points = v["points"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let values: Vec<f64> = p
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|n| n.as_f64().unwrap())
                        .collect();
                    samrt::prompt::point_from_values(&values).unwrap()
                })
                .collect()
        })
        .unwrap_or_default();
    let bbox = v["box"].as_array().map(|b| {
        let n: Vec<f64> = b.iter().map(|n| n.as_f64().unwrap()).collect();
        samrt::BoxPrompt {
            x0: n[0],
            y0: n[1],
            x1: n[2],
            y1: n[3],
        }
    });
    samrt::Prompt {
        points,
        bbox,
        mask_input: None,
    }
}
