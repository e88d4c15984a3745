//! On-board object detection whose boxes prompt SAM (zero-shot instance segmentation).
//!
//! A detector directory holds `manifest.json`, the ONNX graph cut before its NMS (tract runs it)
//! and `labels.txt`. samrt resizes the image to the detector's input (Pillow-exact bilinear,
//! stretched), runs the graph, then thresholds scores, filters classes and runs greedy per-class NMS
//! in Rust. The manifest says how boxes are laid out (`yxyx` as TF's SSD exports, `xyxy`, or
//! `cxcywh` as YOLO-style heads give them), so other detectors plug in without code.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::Deserialize;

pub use crate::boxes::box_iou;
use crate::boxes::nms_in_order;
use crate::engine::ObjectDetector;
use crate::error::{Error, Result};
use crate::model::read_model_file;
use crate::prompt::BoxPrompt;
use crate::resize::resize_bilinear_pil;

/// Default score threshold.
pub const DEFAULT_SCORE_THRESHOLD: f32 = 0.5;
/// Default NMS threshold: a box overlapping a kept box of its class by more than this is dropped.
pub const DEFAULT_NMS_IOU: f32 = 0.5;

/// How the `boxes` output lays out a box.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoxFormat {
    /// ymin, xmin, ymax, xmax (TF Object Detection API).
    Yxyx,
    /// xmin, ymin, xmax, ymax.
    Xyxy,
    /// centre x, centre y, width, height (YOLO-style heads).
    Cxcywh,
}

#[derive(Debug, Deserialize)]
struct ManifestBoxes {
    format: BoxFormat,
    normalized: bool,
}

#[derive(Debug, Deserialize)]
struct ManifestOutputs {
    boxes: ManifestBoxes,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    name: String,
    file: String,
    labels: String,
    outputs: ManifestOutputs,
    #[serde(default)]
    sha256: std::collections::HashMap<String, String>,
}

/// Detection parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorParams {
    /// Keep boxes whose class score is at least this.
    pub score_threshold: f32,
    /// Per-class NMS: drop a box whose IoU with a kept one is above this.
    pub nms_iou: f32,
    /// Keep only these labels (all when `None`).
    pub classes: Option<Vec<String>>,
}

impl Default for DetectorParams {
    fn default() -> Self {
        DetectorParams {
            score_threshold: DEFAULT_SCORE_THRESHOLD,
            nms_iou: DEFAULT_NMS_IOU,
            classes: None,
        }
    }
}

/// One detected object.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectedObject {
    /// Score column of the detector (the COCO category id for the bundled SSD).
    pub class_index: usize,
    pub label: Option<String>,
    pub score: f32,
    /// The box in original-image pixels, clipped to the image.
    pub bbox: BoxPrompt,
}

/// A loaded detector.
#[derive(Debug)]
pub struct Detector {
    pub name: String,
    detector: ObjectDetector,
    labels: Vec<Option<String>>,
    format: BoxFormat,
    normalized: bool,
}

/// Parses `labels.txt`: lines `<index> <name>`, or one name per line (index = line number).
pub fn parse_labels(text: &str) -> Vec<Option<String>> {
    let mut labels: Vec<Option<String>> = Vec::new();
    for (line_no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (index, name) = match line.split_once(char::is_whitespace) {
            Some((k, name)) if k.parse::<usize>().is_ok() => {
                (k.parse::<usize>().unwrap_or(line_no), name.trim())
            }
            _ => (line_no, line),
        };
        if labels.len() <= index {
            labels.resize(index + 1, None);
        }
        labels[index] = Some(name.to_string());
    }
    labels
}

fn manifest_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Detector {
    /// Loads a detector directory (`manifest.json`, the ONNX file and the labels it names), checking
    /// the sha256 of every file the manifest lists.
    pub fn load(dir: &Path) -> Result<Self> {
        let manifest_path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
            manifest_error(&manifest_path, format!("cannot be read ({e}); a detector directory holds manifest.json, the ONNX file and labels"))
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
            manifest_error(&manifest_path, format!("is not a detector manifest: {e}"))
        })?;
        let file: PathBuf = dir.join(&manifest.file);
        let bytes = read_model_file(
            &file,
            manifest.sha256.get(&manifest.file).map(String::as_str),
        )?;
        let detector = ObjectDetector::from_onnx_bytes(&file, &bytes)?;
        let labels_path = dir.join(&manifest.labels);
        let labels_bytes = read_model_file(
            &labels_path,
            manifest.sha256.get(&manifest.labels).map(String::as_str),
        )?;
        let labels = parse_labels(&String::from_utf8_lossy(&labels_bytes));
        Ok(Detector {
            name: manifest.name,
            detector,
            labels,
            format: manifest.outputs.boxes.format,
            normalized: manifest.outputs.boxes.normalized,
        })
    }

    /// The label of a score column.
    pub fn label(&self, class_index: usize) -> Option<&str> {
        self.labels.get(class_index).and_then(|l| l.as_deref())
    }

    /// The detector's input: the image stretched to the input size with Pillow's bilinear filter.
    pub fn input_pixels(&self, image: &RgbImage) -> Vec<u8> {
        let (h, w) = self.detector.input_size();
        resize_bilinear_pil(
            image.as_raw(),
            image.width() as usize,
            image.height() as usize,
            3,
            w,
            h,
        )
    }

    /// Detects objects: score threshold, class filter, per-class greedy NMS; sorted by score,
    /// then class, then anchor.
    pub fn detect(&self, image: &RgbImage, params: &DetectorParams) -> Result<Vec<DetectedObject>> {
        if let Some(classes) = &params.classes {
            for c in classes {
                if !self.labels.iter().flatten().any(|l| l == c) {
                    return Err(Error::Prompt(format!(
                        "class {c:?} is not a label of detector {} (labels: {})",
                        self.name,
                        self.labels
                            .iter()
                            .flatten()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
        }
        let out = self.detector.detect(&self.input_pixels(image))?;
        let (in_h, in_w) = self.detector.input_size();
        let (scale_x, scale_y) = if self.normalized {
            (1.0, 1.0)
        } else {
            (1.0 / in_w as f64, 1.0 / in_h as f64)
        };
        // Boxes as normalized [x0, y0, x1, y1] clipped to [0, 1].
        let boxes: Vec<[f64; 4]> = out
            .boxes
            .chunks_exact(4)
            .map(|b| {
                let b = [
                    f64::from(b[0]),
                    f64::from(b[1]),
                    f64::from(b[2]),
                    f64::from(b[3]),
                ];
                let [x0, y0, x1, y1] = match self.format {
                    BoxFormat::Yxyx => [b[1], b[0], b[3], b[2]],
                    BoxFormat::Xyxy => b,
                    BoxFormat::Cxcywh => [
                        b[0] - b[2] / 2.0,
                        b[1] - b[3] / 2.0,
                        b[0] + b[2] / 2.0,
                        b[1] + b[3] / 2.0,
                    ],
                };
                [
                    (x0 * scale_x).clamp(0.0, 1.0),
                    (y0 * scale_y).clamp(0.0, 1.0),
                    (x1 * scale_x).clamp(0.0, 1.0),
                    (y1 * scale_y).clamp(0.0, 1.0),
                ]
            })
            .collect();
        let mut found: Vec<(f32, usize, usize)> = Vec::new();
        for class in 0..out.classes {
            if let Some(classes) = &params.classes {
                if !self
                    .label(class)
                    .is_some_and(|l| classes.iter().any(|c| c == l))
                {
                    continue;
                }
            }
            let score = |a: usize| out.scores[a * out.classes + class];
            let mut candidates: Vec<usize> = (0..out.anchors)
                .filter(|&a| score(a) >= params.score_threshold)
                .collect();
            candidates.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
            let kept = nms_in_order(&boxes, &candidates, f64::from(params.nms_iou));
            found.extend(kept.into_iter().map(|a| (score(a), class, a)));
        }
        found.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let (w, h) = (f64::from(image.width()), f64::from(image.height()));
        Ok(found
            .into_iter()
            .map(|(score, class, a)| {
                let [x0, y0, x1, y1] = boxes[a];
                DetectedObject {
                    class_index: class,
                    label: self.label(class).map(str::to_string),
                    score,
                    bbox: BoxPrompt {
                        x0: x0 * w,
                        y0: y0 * h,
                        x1: x1 * w,
                        y1: y1 * h,
                    },
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_with_ids_and_plain_lists() {
        let l = parse_labels("0  person\n1  bicycle\n\n3  motorcycle\n");
        assert_eq!(l[0].as_deref(), Some("person"));
        assert_eq!(l[2], None);
        assert_eq!(l[3].as_deref(), Some("motorcycle"));
        let plain = parse_labels("cat\ndog\n");
        assert_eq!(plain[1].as_deref(), Some("dog"));
    }
}
