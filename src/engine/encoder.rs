//! The SAM image encoder ([`ImageEncoder`]): its plan built for the 1x3x1024x1024 input, and
//! the per-operator profile of a run ([`OpTiming`]), which the mask decoder gives too.

use std::path::Path;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::knobs::KnobScope;

use super::onnx::{
    load_guarded, model_error, parse_onnx, parse_onnx_fused, shape_of, without_intermediate_facts,
};
use super::{axis_move, half, keep_freed_memory, threads, to_f32_vec, Plan};
use crate::error::{Error, Result};
use crate::sam_sizes::{EMBEDDING_CHANNELS, EMBEDDING_SIZE, ENCODER_INPUT_SIZE};

/// tract settings for optimizing the image encoder, each measured on SAM encoders (README,
/// Performance). tract 0.23 runs TinyViT's patch-embedding convolutions (3x3, stride 2, 3 -> 32
/// -> 64 channels at 512² and 256²) as its direct spatial convolution, 10% of the encoder's time;
/// im2col and a matrix product take 40% of that, 4% of the whole encoder.
const ENCODER_KNOBS: [(&str, &str); 1] = [("TRACT_DISABLE_DIRECT_SPATIAL", "true")];

/// The SAM image encoder: normalized, padded 1x3x1024x1024 in, 1x256x64x64 embedding out.
#[derive(Debug)]
pub struct ImageEncoder {
    plan: Plan,
    fused_attention: usize,
    /// The plan computes in f16 ([`EncoderOptions::f16`]).
    f16: bool,
}

/// How the image encoder's plan is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderOptions {
    /// Attention blocks as samrt's fused operator (`engine::attention`) instead of tract's
    /// operators. On by default; `SAMRT_FUSED_ATTENTION=0` turns it off (for measuring).
    pub fused_attention: bool,
    /// The plan converted to f16 at load ([`half`]; CPUs with fp16 arithmetic only).
    pub f16: bool,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        EncoderOptions {
            fused_attention: std::env::var("SAMRT_FUSED_ATTENTION").map_or(true, |v| v != "0"),
            f16: false,
        }
    }
}

impl ImageEncoder {
    /// Builds the optimized plan from the bytes of an ONNX file (`path` is for messages).
    pub fn from_onnx_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        Self::from_onnx_bytes_with(path, bytes, EncoderOptions::default())
    }

    /// [`Self::from_onnx_bytes`] with explicit options.
    pub fn from_onnx_bytes_with(
        path: &Path,
        bytes: &[u8],
        options: EncoderOptions,
    ) -> Result<Self> {
        load_guarded(path, || Self::load(path, bytes, options))
    }

    fn load(path: &Path, bytes: &[u8], options: EncoderOptions) -> Result<Self> {
        if options.f16 {
            half::check_cpu().map_err(|reason| model_error(path, reason))?;
        }
        let (model, fused) = parse_onnx_fused(path, bytes, options.fused_attention)?;
        if fused == 0 {
            return Self::from_model(path, model, 0, options.f16);
        }
        match Self::from_model(path, model, fused, options.f16) {
            Ok(encoder) => Ok(encoder),
            Err(e) => {
                // A subgraph that looked like attention but whose shapes do not fit samrt's
                // operator: tract's own operators compute it.
                log::warn!(
                    "{}: attention not fused ({e}); using tract's operators",
                    path.display()
                );
                Self::from_model(path, parse_onnx(path, bytes)?, 0, options.f16)
            }
        }
    }

    /// Number of attention blocks that run as samrt's fused operator.
    pub fn fused_attention_blocks(&self) -> usize {
        self.fused_attention
    }

    fn from_model(
        path: &Path,
        model: InferenceModel,
        fused_attention: usize,
        f16: bool,
    ) -> Result<Self> {
        let inputs = model
            .input_outlets()
            .map_err(|e| model_error(path, e.to_string()))?
            .len();
        if inputs != 1 {
            return Err(model_error(
                path,
                format!(
                    "an image encoder has exactly one input (the 1x3x{ENCODER_INPUT_SIZE}x{ENCODER_INPUT_SIZE} image), this model has {inputs}; \
                     is this the decoder? pass the encoder with --encoder"
                ),
            ));
        }
        let input_fact: InferenceFact =
            f32::fact([1, 3, ENCODER_INPUT_SIZE, ENCODER_INPUT_SIZE]).into();
        let typed = model
            .clone()
            .with_input_fact(0, input_fact.clone())
            .and_then(|m| m.into_typed())
            // Exports that declare a symbolic batch in their intermediate shapes (e.g. after
            // onnxruntime's quantize_dynamic) cannot be unified with batch 1: retype from the
            // input alone.
            .or_else(|_| {
                without_intermediate_facts(model)
                    .and_then(|m| m.with_input_fact(0, input_fact))
                    .and_then(|m| m.into_typed())
            })
            .map_err(|e| {
                model_error(
                    path,
                    format!(
                        "cannot be typed with a 1x3x{ENCODER_INPUT_SIZE}x{ENCODER_INPUT_SIZE} f32 input ({e:#}); \
                         is it a SAM image encoder?"
                    ),
                )
            })?;
        let outputs = typed
            .output_outlets()
            .map_err(|e| model_error(path, e.to_string()))?;
        let expected = [1, EMBEDDING_CHANNELS, EMBEDDING_SIZE, EMBEDDING_SIZE];
        let output_fact = typed
            .outlet_fact(outputs[0])
            .map_err(|e| model_error(path, e.to_string()))?;
        let matches = outputs.len() == 1
            && output_fact.datum_type == f32::datum_type()
            && output_fact.shape.as_concrete() == Some(&expected[..]);
        if !matches {
            return Err(model_error(
                path,
                format!(
                    "an image encoder must have one f32 output of shape {expected:?}, this model has {} output(s), the first {:?} of {:?}",
                    outputs.len(),
                    shape_of(output_fact),
                    output_fact.datum_type
                ),
            ));
        }
        if std::env::var("SAMRT_KEEP_FREED_MEMORY").map_or(true, |v| v != "0") {
            keep_freed_memory();
        }
        let typed = if f16 {
            half::translate(typed)
                .map_err(|e| model_error(path, format!("cannot be converted to f16: {e:#}")))?
        } else {
            typed
        };
        let plan = KnobScope::new(ENCODER_KNOBS)
            .and_then(|knobs| knobs.enter(|| typed.into_optimized()))
            .and_then(|mut m| {
                let moves = axis_move::replace(&mut m)?;
                log::debug!("encoder: {moves} axis moves on samrt's threaded copy");
                Ok(m)
            })
            .and_then(|m| m.into_runnable())
            .map_err(|e| model_error(path, format!("cannot be optimized by tract: {e:#}")))?;
        Ok(ImageEncoder {
            plan,
            fused_attention,
            f16,
        })
    }

    /// The plan's input: the image as an f32 tensor, or f16 for an f16 plan.
    fn input(&self, image_chw: &[f32]) -> Result<TValue> {
        let shape = [1, 3, ENCODER_INPUT_SIZE, ENCODER_INPUT_SIZE];
        let input = Tensor::from_shape(&shape, image_chw)
            .map_err(|e| Error::Inference(format!("encoder input: {e:#}")))?;
        let input = if self.f16 {
            input
                .cast_to::<f16>()
                .map_err(|e| Error::Inference(format!("encoder input to f16: {e:#}")))?
                .into_owned()
        } else {
            input
        };
        Ok(input.into_tvalue())
    }

    /// Runs the encoder on a normalized, padded CHW image of 3x1024x1024 values.
    pub fn embed(&self, image_chw: &[f32]) -> Result<Vec<f32>> {
        self.embed_yielding(image_chw, &|| {})
    }

    /// Runs the encoder like [`Self::embed`], calling `before_op` before each of its operators:
    /// a caller whose other work must not wait for a whole encode (a button press) holds the
    /// encoder there while that work runs.
    pub fn embed_yielding(&self, image_chw: &[f32], before_op: &dyn Fn()) -> Result<Vec<f32>> {
        let err = |e: TractError| Error::Inference(format!("image encoder: {e:#}"));
        let mut state = tract_onnx::tract_core::plan::SimpleState::new(&self.plan).map_err(err)?;
        let awake = threads::KeepAwake::new();
        let outputs = state
            .run_plan_with_eval(
                tvec!(self.input(image_chw)?),
                |ctx, op_state, node, input| {
                    before_op();
                    awake.ensure();
                    tract_onnx::tract_core::plan::eval(ctx, op_state, node, input)
                },
            )
            .map_err(err)?;
        drop(awake);
        let output = &outputs[0];
        let result = if output.datum_type() == f32::datum_type() {
            to_f32_vec(output)
        } else {
            output
                .cast_to::<f32>()
                .and_then(|t| Ok(t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()))
        };
        result.map_err(|e| Error::Inference(format!("image encoder output: {e:#}")))
    }

    /// Runs the encoder once like [`Self::embed`], timing each operator of its plan.
    pub fn profile(&self, image_chw: &[f32]) -> Result<Vec<OpTiming>> {
        profile_plan(&self.plan, tvec!(self.input(image_chw)?))
    }
}

/// Time one operator of a plan took over a profiled run (see [`ImageEncoder::profile`]).
#[derive(Debug, Clone)]
pub struct OpTiming {
    /// The operator's name in tract's plan (e.g. `OptMatMul`, `Add`, samrt's `SamrtAttention`).
    pub op: String,
    /// The node's name (the ONNX node it came from, for the per-node view).
    pub node: String,
    /// What tract says of the operator (shapes, kernel).
    pub info: String,
    pub elapsed: std::time::Duration,
}

/// Runs `plan` once, timing every node (tract's per-operator profile).
pub(super) fn profile_plan(plan: &Plan, inputs: TVec<TValue>) -> Result<Vec<OpTiming>> {
    let err = |e: TractError| Error::Inference(format!("profiling: {e:#}"));
    let mut state = tract_onnx::tract_core::plan::SimpleState::new(plan).map_err(err)?;
    let mut timings = Vec::new();
    state
        .run_plan_with_eval(inputs, |ctx, op_state, node, input| {
            let start = std::time::Instant::now();
            let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
            timings.push(OpTiming {
                op: node.op().name().to_string(),
                node: node.name.clone(),
                info: node.op().info().unwrap_or_default().join("; "),
                elapsed: start.elapsed(),
            });
            out
        })
        .map_err(err)?;
    Ok(timings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::change_axes::AxisOp;

    /// The layout changes tract keeps in the default encoder's plan (patch mergings, neck) run
    /// on samrt's threaded copy ([`axis_move`]): no large one is left to tract's `MoveAxis`.
    #[test]
    fn encoder_axis_moves_are_threaded() {
        let files = crate::model::ModelFiles::default_model().expect("default model");
        let bytes = std::fs::read(&files.encoder).expect("encoder bytes");
        let encoder = ImageEncoder::from_onnx_bytes(&files.encoder, &bytes).unwrap();
        let model = encoder.plan.model();
        let ours = model
            .nodes()
            .iter()
            .filter(|n| n.op_is::<axis_move::SamrtMoveAxis>())
            .count();
        assert!(ours >= 6, "{ours} axis moves on samrt's copy");
        for node in model.nodes() {
            if let Some(AxisOp::Move(..)) = node.op_as::<AxisOp>() {
                let fact = model.outlet_fact(node.inputs[0]).unwrap();
                let len: usize = fact.shape.as_concrete().unwrap().iter().product();
                assert!(len < axis_move::MIN_ELEMENTS, "{} left to tract", node.name);
            }
        }
    }
}
