//! The object detector's plan ([`ObjectDetector`]): a graph cut before its NMS, run by tract on
//! one uint8 image; the thresholds, class filter and NMS are the crate's `detector`.

use std::path::Path;

use tract_onnx::prelude::*;

use super::onnx::{load_guarded, model_error, parse_onnx, shape_of};
use super::{to_f32_vec, Plan};
use crate::error::{Error, Result};

/// An object detector whose graph ends before NMS: one uint8 NHWC RGB image in, decoded `boxes`
/// [1, N, 4] and per-class `scores` [1, N, C] out (see `detector`).
#[derive(Debug)]
pub struct ObjectDetector {
    plan: Plan,
    height: usize,
    width: usize,
}

/// Raw detector outputs for one image.
#[derive(Debug, Clone)]
pub struct DetectorOutputs {
    /// `anchors` boxes of 4 values each.
    pub boxes: Vec<f32>,
    /// `anchors` rows of `classes` scores.
    pub scores: Vec<f32>,
    pub anchors: usize,
    pub classes: usize,
}

impl ObjectDetector {
    /// Builds the plan; the model's input must be uint8 [1, H, W, 3] and its outputs `boxes` and
    /// `scores`.
    pub fn from_onnx_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        load_guarded(path, || Self::load(path, bytes))
    }

    fn load(path: &Path, bytes: &[u8]) -> Result<Self> {
        let mut model = parse_onnx(path, bytes)?;
        model
            .select_outputs_by_name(["boxes", "scores"])
            .map_err(|e| {
                model_error(
                    path,
                    format!("a detector must have outputs named \"boxes\" and \"scores\" ({e:#})"),
                )
            })?;
        let typed = model
            .into_optimized()
            .map_err(|e| model_error(path, format!("cannot be optimized by tract: {e:#}")))?;
        let input = typed
            .input_fact(0)
            .map_err(|e| model_error(path, e.to_string()))?;
        let (height, width) = match input.shape.as_concrete() {
            Some(&[1, h, w, 3]) if input.datum_type == u8::datum_type() => (h, w),
            _ => {
                return Err(model_error(
                    path,
                    format!(
                    "a detector input must be uint8 [1, H, W, 3] (NHWC RGB), this one is {:?} {:?}",
                    input.datum_type,
                    shape_of(input)
                ),
                ))
            }
        };
        let plan = typed
            .into_runnable()
            .map_err(|e| model_error(path, format!("cannot build the detector plan: {e:#}")))?;
        Ok(ObjectDetector {
            plan,
            height,
            width,
        })
    }

    /// The input size the image must be resized to, (height, width).
    pub fn input_size(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// Runs the detector on an interleaved RGB8 image of the input size.
    pub fn detect(&self, rgb: &[u8]) -> Result<DetectorOutputs> {
        let err = |e: TractError| Error::Inference(format!("object detector: {e:#}"));
        let input = Tensor::from_shape(&[1, self.height, self.width, 3], rgb).map_err(err)?;
        let outputs = self.plan.run(tvec!(input.into_tvalue())).map_err(err)?;
        let boxes = to_f32_vec(&outputs[0]).map_err(err)?;
        let scores = to_f32_vec(&outputs[1]).map_err(err)?;
        let anchors = boxes.len() / 4;
        if anchors == 0 || boxes.len() != anchors * 4 || scores.len() % anchors != 0 {
            return Err(Error::Inference(format!(
                "object detector returned {} box values and {} scores, expected [1, N, 4] and [1, N, C]",
                boxes.len(),
                scores.len()
            )));
        }
        let classes = scores.len() / anchors;
        Ok(DetectorOutputs {
            boxes,
            scores,
            anchors,
            classes,
        })
    }
}
