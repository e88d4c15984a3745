//! Zero-shot instance segmentation from boxes: every box of a detector (COCO detection results or a
//! plain list of boxes) becomes a box prompt, decoded against one embedding, and the mask is
//! attached to the detection record as COCO RLE (`segmentation`), so pycocotools' `loadRes` takes
//! the output as instance-segmentation results.

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::parallel::{parallel_parts, PROMPTS_PER_BATCH};
use crate::predictor::{Embedding, MaskOutput, SamPredictor};
use crate::preprocess::Size;
use crate::prompt::{BoxPrompt, Prompt};
use crate::rle::CocoRle;

/// One input box with the record it came in.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// The box, `[x0, y0, x1, y1]` in image pixels.
    pub bbox: BoxPrompt,
    /// The COCO result record it came from (`image_id`, `category_id`, `bbox`, `score`, ...), or
    /// `None` for a plain box.
    pub record: Option<Map<String, Value>>,
}

fn number(v: &Value, what: &str) -> Result<f64> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| Error::Prompt(format!("{what}: {v} is not a finite number")))
}

fn four_numbers(v: &Value, what: &str) -> Result<[f64; 4]> {
    match v.as_array().map(Vec::as_slice) {
        Some([a, b, c, d]) => Ok([
            number(a, what)?,
            number(b, what)?,
            number(c, what)?,
            number(d, what)?,
        ]),
        _ => Err(Error::Prompt(format!(
            "{what} must be an array of 4 numbers, got {v}"
        ))),
    }
}

/// Parses detections: a JSON array of COCO detection results
/// (`{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`) or of plain boxes `[x0, y0, x1, y1]`.
pub fn parse_detections(json: &str) -> Result<Vec<Detection>> {
    let value: Value = serde_json::from_str(json)
        .map_err(|e| Error::Prompt(format!("detections are not valid JSON: {e}")))?;
    let items = value.as_array().ok_or_else(|| {
        Error::Prompt(
            "detections must be a JSON array of COCO results ({\"bbox\": [x, y, w, h], ...}) or of boxes [x0, y0, x1, y1]"
                .into(),
        )
    })?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(record) => {
                let bbox = record.get("bbox").ok_or_else(|| {
                    Error::Prompt(format!("detection {i} has no \"bbox\": [x, y, w, h]"))
                })?;
                let [x, y, w, h] = four_numbers(bbox, &format!("detection {i} bbox"))?;
                Ok(Detection {
                    bbox: BoxPrompt {
                        x0: x,
                        y0: y,
                        x1: x + w,
                        y1: y + h,
                    },
                    record: Some(record.clone()),
                })
            }
            Value::Array(_) => {
                let [x0, y0, x1, y1] = four_numbers(item, &format!("box {i}"))?;
                Ok(Detection {
                    bbox: BoxPrompt { x0, y0, x1, y1 },
                    record: None,
                })
            }
            other => Err(Error::Prompt(format!(
                "detection {i} is neither a COCO result object nor a box: {other}"
            ))),
        })
        .collect()
}

/// Clips a box to the image; detectors often overshoot the border by a fraction of a pixel. A box
/// with nothing left inside the image is an error.
pub fn clip_box(b: BoxPrompt, image: Size) -> Result<BoxPrompt> {
    let (w, h) = (image.width as f64, image.height as f64);
    let clipped = BoxPrompt {
        x0: b.x0.clamp(0.0, w),
        y0: b.y0.clamp(0.0, h),
        x1: b.x1.clamp(0.0, w),
        y1: b.y1.clamp(0.0, h),
    };
    if clipped.x1 <= clipped.x0 || clipped.y1 <= clipped.y0 {
        return Err(Error::Prompt(format!(
            "box [{}, {}, {}, {}] has no area inside the {}x{} image",
            b.x0, b.y0, b.x1, b.y1, image.width, image.height
        )));
    }
    Ok(clipped)
}

/// One instance mask: the detection, its box after clipping, and SAM's answer.
#[derive(Debug, Clone)]
pub struct Instance {
    pub detection: Detection,
    pub rle: CocoRle,
    pub predicted_iou: f32,
    pub area: u64,
}

impl Instance {
    /// The output record: the input COCO record with `segmentation` and `predicted_iou` added, or
    /// for a plain box `{"bbox": [x, y, w, h], "score": predicted IoU, "segmentation", ...}`.
    pub fn to_record(&self) -> Map<String, Value> {
        let mut record = self.detection.record.clone().unwrap_or_else(|| {
            let b = self.detection.bbox;
            let mut m = Map::new();
            m.insert(
                "bbox".into(),
                serde_json::json!([b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0]),
            );
            m.insert("score".into(), serde_json::json!(self.predicted_iou));
            m
        });
        record.insert(
            "segmentation".into(),
            serde_json::to_value(&self.rle).expect("RLE serializes"),
        );
        record.insert(
            "predicted_iou".into(),
            serde_json::json!(self.predicted_iou),
        );
        record.insert("area".into(), serde_json::json!(self.area));
        record
    }
}

/// Segments every detection against one embedding, on `threads` threads, in input order.
pub fn segment_detections(
    predictor: &SamPredictor,
    embedding: &Embedding,
    detections: &[Detection],
    threads: usize,
) -> Result<Vec<Instance>> {
    let clipped = detections
        .iter()
        .enumerate()
        .map(|(i, d)| {
            clip_box(d.bbox, embedding.original_size)
                .map_err(|e| Error::Prompt(format!("detection {i}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let indices: Vec<usize> = (0..detections.len()).collect();
    // Batches of boxes (bounding the masks held at once), one part of each per thread, each
    // part's boxes decoded together.
    let mut instances = Vec::with_capacity(detections.len());
    for batch in indices.chunks(PROMPTS_PER_BATCH) {
        instances.extend(parallel_parts(batch, threads, |part| {
            let prompts: Vec<Prompt> = part
                .iter()
                .map(|&i| Prompt {
                    bbox: Some(clipped[i]),
                    ..Default::default()
                })
                .collect();
            let predictions = predictor.predict_batch(embedding, &prompts, MaskOutput::Single)?;
            Ok(part
                .iter()
                .zip(predictions)
                .map(|(&i, prediction)| {
                    let best = &prediction.masks[0];
                    Instance {
                        detection: detections[i].clone(),
                        rle: CocoRle::encode(&best.mask),
                        predicted_iou: best.iou,
                        area: best.mask.area(),
                    }
                })
                .collect())
        })?);
    }
    Ok(instances)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coco_results_and_plain_boxes_parse() {
        let d = parse_detections(r#"[{"image_id": 7, "category_id": 3, "bbox": [10, 20, 30, 40], "score": 0.9}, [1, 2, 3, 4]]"#).unwrap();
        assert_eq!(
            d[0].bbox,
            BoxPrompt {
                x0: 10.0,
                y0: 20.0,
                x1: 40.0,
                y1: 60.0
            }
        );
        assert_eq!(d[0].record.as_ref().unwrap()["category_id"], 3);
        assert_eq!(
            d[1].bbox,
            BoxPrompt {
                x0: 1.0,
                y0: 2.0,
                x1: 3.0,
                y1: 4.0
            }
        );
        assert!(d[1].record.is_none());
        for bad in [
            r#"{}"#,
            r#"[{"score": 1}]"#,
            r#"[[1, 2, 3]]"#,
            r#"["box"]"#,
            r#"[{"bbox": [1, 2, "w", 4]}]"#,
            "not json",
        ] {
            assert!(parse_detections(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn boxes_are_clipped_to_the_image() {
        let size = Size::new(100, 200);
        let b = clip_box(
            BoxPrompt {
                x0: -3.0,
                y0: 10.0,
                x1: 200.4,
                y1: 120.0,
            },
            size,
        )
        .unwrap();
        assert_eq!(
            b,
            BoxPrompt {
                x0: 0.0,
                y0: 10.0,
                x1: 200.0,
                y1: 100.0
            }
        );
        assert!(clip_box(
            BoxPrompt {
                x0: 250.0,
                y0: 10.0,
                x1: 300.0,
                y1: 20.0
            },
            size
        )
        .is_err());
    }
}
