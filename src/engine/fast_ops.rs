//! Operators samrt gives tract where its own are slow on SAM's shapes, registered in place of the
//! ONNX parser's (see [`onnx`]). Each computes what the ONNX operator defines, in f32.
//!
//! - `LayerNormalization` over the last axis: tract 0.23 expands it into seven operators (mean,
//!   subtract, square, mean, rsqrt, multiply, scale and shift) that each make a pass over the
//!   tensor; on the decoder's 4096x256 image tokens that is ~5 ms a norm on this project's
//!   machine. One pass per row here.
//! - `Softmax` over a short last axis (at most [`SHORT_SOFTMAX_AXIS`] values): tract's softmax is
//!   built for long rows; the decoder's image-to-token attention has rows of 7 (8 heads x 4096
//!   image tokens), ~4 ms a layer. Longer rows stay with tract's.
//!
//! Both split their rows over tract's thread pool (`par_chunks_mut`: whole rows per task, so
//! results do not depend on the thread count). Attention is in [`super::attention`].

use std::sync::OnceLock;

use super::threads::par_chunks_mut;
use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

/// tract's ONNX parser with samrt's operators registered.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    TRACT_OPS.get_or_init(|| onnx.op_register.clone());
    onnx.op_register
        .insert("LayerNormalization", layer_normalization);
    onnx.op_register.insert("Softmax", softmax);
    onnx.op_register
        .insert(super::layer_norm::CHANNEL_NORM_OP, channel_layer_norm);
    onnx.op_register
        .insert(super::attention::OP_TYPE, super::attention::build);
    onnx.op_register.insert(
        super::depthwise::DEPTHWISE_OP,
        super::depthwise::build_depthwise,
    );
    onnx.op_register
        .insert(super::depthwise::GELU_OP, super::depthwise::build_gelu);
    onnx.op_register
        .insert(super::linear::OP_TYPE, super::linear::build);
    onnx.op_register
        .insert(super::conv1x1::OP_TYPE, super::conv1x1::build);
    onnx.op_register
        .insert(super::conv3x3::OP_TYPE, super::conv3x3::build);
    onnx.op_register
        .insert(super::mbconv::OP_TYPE, super::mbconv::build);
    onnx.op_register
        .insert(super::upscale::OP_TYPE, super::upscale::build);
    onnx.op_register
        .insert(super::linear_int8::OP_TYPE, super::linear_int8::build);
    onnx.op_register
        .insert(super::quantize::STATIC_OP, super::quantize::build_static);
    onnx.op_register
        .insert("DynamicQuantizeLinear", super::quantize::build);
    onnx
}

/// tract's own operator builders, for the cases samrt's operators do not take.
static TRACT_OPS: OnceLock<OnnxOpRegister> = OnceLock::new();

/// Builds `node` with tract's own builder for its operator.
fn tract_op(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    match TRACT_OPS.get().and_then(|ops| ops.0.get(&node.op_type)) {
        Some(builder) => builder(ctx, node),
        None => bail!("{}: tract has no builder for it", node.op_type),
    }
}

/// Inference rules of an operator whose inputs all have the output's type and whose first input
/// has the output's shape.
fn same_type_and_shape<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
    arity: usize,
) -> InferenceResult {
    check_input_arity(inputs, arity)?;
    check_output_arity(outputs, 1)?;
    for input in inputs {
        s.equals(&input.datum_type, &outputs[0].datum_type)?;
    }
    s.equals(&inputs[0].shape, &outputs[0].shape)?;
    Ok(())
}

/// The output fact of an operator that keeps its first input's type and shape.
fn like_first_input(inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
    Ok(tvec!(inputs[0].datum_type.fact(inputs[0].shape.clone())))
}

/// The longest last axis [`ShortAxisSoftmax`] takes.
pub const SHORT_SOFTMAX_AXIS: usize = 16;

fn softmax(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    if ctx.onnx_operator_set_version >= 13 {
        let axis: isize = node.get_attr_opt("axis")?.unwrap_or(-1);
        return Ok((expand(SoftmaxExpansion { axis }), vec![]));
    }
    // Before opset 13 Softmax flattens from `axis`: tract's.
    tract_op(ctx, node)
}

/// ONNX `Softmax` (opset 13+): samrt's op on a short last f32 axis, tract's otherwise.
#[derive(Debug, Clone)]
struct SoftmaxExpansion {
    axis: isize,
}

impl Expansion for SoftmaxExpansion {
    fn name(&self) -> StaticName {
        "Softmax".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        same_type_and_shape(s, inputs, outputs, 1)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let fact = model.outlet_fact(inputs[0])?.clone();
        let rank = fact.rank() as isize;
        let last = fact.shape.last().and_then(|d| d.to_usize().ok());
        let short = fact.datum_type == f32::datum_type()
            && (self.axis == -1 || self.axis == rank - 1)
            && last.is_some_and(|n| (1..=SHORT_SOFTMAX_AXIS).contains(&n));
        if short {
            model.wire_node(prefix, ShortAxisSoftmax, inputs)
        } else {
            tract_onnx::tract_hir::ops::nn::Softmax::new(self.axis).wire(prefix, model, inputs)
        }
    }
}

/// Softmax over a short last axis of an f32 tensor, row by row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShortAxisSoftmax;

impl Op for ShortAxisSoftmax {
    fn name(&self) -> StaticName {
        "ShortAxisSoftmax".into()
    }

    op_as_typed_op!();
}

impl EvalOp for ShortAxisSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let mut x = x.into_tensor();
        let width = x.shape().last().copied().unwrap_or(1);
        if width > 0 {
            let mut view = x.try_as_plain_ram_mut()?;
            let data = view.as_slice_mut::<f32>()?;
            let len = data.len();
            par_chunks_mut(data, width, len, |_, rows| {
                for row in rows.chunks_exact_mut(width) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for v in row.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|v| *v *= inv);
                }
                Ok(())
            })?;
        }
        Ok(tvec!(x.into_tvalue()))
    }
}

impl TypedOp for ShortAxisSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        like_first_input(inputs)
    }

    as_op!();
}

fn layer_normalization(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let axis: isize = node.get_attr_opt("axis")?.unwrap_or(-1);
    let epsilon: f32 = node.get_attr_opt("epsilon")?.unwrap_or(1e-5);
    let extra_outputs = node.output.iter().skip(1).any(|o| !o.is_empty());
    if axis == -1 && node.input.len() == 3 && !extra_outputs {
        return Ok((expand(LastAxisLayerNormExpansion { epsilon }), vec![]));
    }
    tract_op(ctx, node)
}

#[derive(Debug, Clone)]
struct LastAxisLayerNormExpansion {
    epsilon: f32,
}

impl Expansion for LastAxisLayerNormExpansion {
    fn name(&self) -> StaticName {
        "LastAxisLayerNorm".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        same_type_and_shape(s, inputs, outputs, 3)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(
            prefix,
            LastAxisLayerNorm {
                epsilon: self.epsilon,
            },
            inputs,
        )
    }
}

/// `LayerNormalization` (ONNX, axis -1, scale and bias) in one pass per row, in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LastAxisLayerNorm {
    pub epsilon: f32,
}

impl std::hash::Hash for LastAxisLayerNorm {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.epsilon.to_bits().hash(state)
    }
}

impl Eq for LastAxisLayerNorm {}

impl Op for LastAxisLayerNorm {
    fn name(&self) -> StaticName {
        "LastAxisLayerNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("epsilon: {}", self.epsilon)])
    }

    op_as_typed_op!();
}

impl EvalOp for LastAxisLayerNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, scale, bias) = args_3!(inputs);
        let datum_type = x.datum_type();
        let x = x.cast_to::<f32>()?;
        let scale = scale.cast_to::<f32>()?;
        let bias = bias.cast_to::<f32>()?;
        let width = x.shape().last().copied().unwrap_or(1);
        let scale = scale.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        ensure!(
            scale.len() == width && bias.len() == width,
            "LayerNormalization: scale ({}) and bias ({}) must have the last axis' length {width}",
            scale.len(),
            bias.len()
        );
        // Into a new tensor, each task copying its rows while normalizing them: the input is
        // often shared (the residual after the norm), and `into_tensor` would copy all of it on
        // one thread first.
        // SAFETY: f32 has no invalid bit patterns, and every row is written below.
        let mut out = unsafe { Tensor::uninitialized::<f32>(x.shape())? };
        if width > 0 {
            let src_view = x.try_as_plain_ram()?;
            let src = src_view.as_slice::<f32>()?;
            let mut view = out.try_as_plain_ram_mut()?;
            let data = view.as_slice_mut::<f32>()?;
            let len = data.len();
            par_chunks_mut(data, width, len, |first, rows| {
                rows.copy_from_slice(&src[first * width..first * width + rows.len()]);
                for row in rows.chunks_exact_mut(width) {
                    normalize_row(row, &scale, &bias, self.epsilon);
                }
                Ok(())
            })?;
        }
        let mut x = out;
        if datum_type != f32::datum_type() {
            x = x.cast_to_dt(datum_type)?.into_owned();
        }
        Ok(tvec!(x.into_tvalue()))
    }
}

/// Lanes of the partial sums below: wide enough for the compiler to keep them in vector registers.
const LANES: usize = 16;

/// The sum of `f(v)` over `values`, in [`LANES`] partial sums.
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `(x - mean) / sqrt(var + eps) * scale + bias` over one row, variance biased (ONNX).
fn normalize_row(row: &mut [f32], scale: &[f32], bias: &[f32], epsilon: f32) {
    let n = row.len() as f32;
    let mean = lane_sum(row, |v| v) / n;
    let variance = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
    let inv_std = 1.0 / (variance + epsilon).sqrt();
    for ((v, s), b) in row.iter_mut().zip(scale).zip(bias) {
        *v = (*v - mean) * inv_std * s + b;
    }
}

impl TypedOp for LastAxisLayerNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        like_first_input(inputs)
    }

    as_op!();
}

/// Builds a `SamrtChannelNorm` node ([`super::layer_norm::recompose`]).
fn channel_layer_norm(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let epsilon: f32 = node.get_attr_opt("epsilon")?.unwrap_or(1e-6);
    Ok((expand(ChannelLayerNormExpansion { epsilon }), vec![]))
}

#[derive(Debug, Clone)]
struct ChannelLayerNormExpansion {
    epsilon: f32,
}

impl Expansion for ChannelLayerNormExpansion {
    fn name(&self) -> StaticName {
        "ChannelLayerNorm".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        same_type_and_shape(s, inputs, outputs, 3)?;
        s.equals(&inputs[0].rank, 4)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        for input in inputs {
            ensure!(
                model.outlet_fact(*input)?.datum_type == f32::datum_type(),
                "SamrtChannelNorm: f32 only"
            );
        }
        model.wire_node(
            prefix,
            ChannelLayerNorm {
                epsilon: self.epsilon,
            },
            inputs,
        )
    }
}

/// Layer normalization over the channel axis of an NCHW f32 tensor (SAM's `LayerNorm2d`):
/// per pixel, `(x - mean) / sqrt(variance + ε) · weight[c] + bias[c]` over the C channels,
/// variance biased. Inputs: x, weight and bias of C values (any shape, e.g. `[C, 1, 1]`).
/// Statistics are taken over pixel ranges, then channel planes normalized, both on tract's pool.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelLayerNorm {
    epsilon: f32,
}

impl std::hash::Hash for ChannelLayerNorm {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.epsilon.to_bits().hash(state);
    }
}

impl Eq for ChannelLayerNorm {}

impl Op for ChannelLayerNorm {
    fn name(&self) -> StaticName {
        "ChannelLayerNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("epsilon: {}", self.epsilon)])
    }

    op_as_typed_op!();
}

impl TypedOp for ChannelLayerNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        like_first_input(inputs)
    }

    as_op!();
}

impl EvalOp for ChannelLayerNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, weight, bias) = args_3!(inputs);
        let mut x = x.into_tensor();
        let shape = x.shape().to_vec();
        ensure!(shape.len() == 4, "ChannelLayerNorm: NCHW input expected");
        let (n, c, plane) = (shape[0], shape[1], shape[2] * shape[3]);
        let weight = weight.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        ensure!(
            weight.len() == c && bias.len() == c,
            "ChannelLayerNorm: weight ({}) and bias ({}) must have the {c} channels",
            weight.len(),
            bias.len()
        );
        if n * c * plane == 0 {
            return Ok(tvec!(x.into_tvalue()));
        }
        let mut view = x.try_as_plain_ram_mut()?;
        let data = view.as_slice_mut::<f32>()?;
        let mut stats = vec![[0f32; 2]; plane];
        for image in data.chunks_exact_mut(c * plane) {
            {
                let image: &[f32] = image;
                par_chunks_mut(&mut stats, 1, plane * c, |first, stats| {
                    channel_stats(image, c, plane, first, stats, self.epsilon);
                    Ok(())
                })?;
            }
            let stats = &stats;
            par_chunks_mut(image, plane, c * plane, |first, planes| {
                for (i, values) in planes.chunks_exact_mut(plane).enumerate() {
                    let (w, b) = (weight[first + i], bias[first + i]);
                    for (v, [mean, inv_std]) in values.iter_mut().zip(stats) {
                        *v = (*v - mean) * inv_std * w + b;
                    }
                }
                Ok(())
            })?;
        }
        Ok(tvec!(x.into_tvalue()))
    }
}

/// Mean and `1 / sqrt(variance + ε)` over the `c` channels of the pixels `first..` that `stats`
/// covers, accumulated channel by channel (each a contiguous run of pixels).
fn channel_stats(
    image: &[f32],
    c: usize,
    plane: usize,
    first: usize,
    stats: &mut [[f32; 2]],
    epsilon: f32,
) {
    let len = stats.len();
    let rows = |ch: usize| &image[ch * plane + first..ch * plane + first + len];
    let mut acc = vec![0f32; len];
    for ch in 0..c {
        for (a, &v) in acc.iter_mut().zip(rows(ch)) {
            *a += v;
        }
    }
    let inv_c = 1.0 / c as f32;
    for (s, a) in stats.iter_mut().zip(&mut acc) {
        s[0] = *a * inv_c;
        *a = 0.0;
    }
    for ch in 0..c {
        for ((a, &v), s) in acc.iter_mut().zip(rows(ch)).zip(stats.iter()) {
            let d = v - s[0];
            *a += d * d;
        }
    }
    for (s, a) in stats.iter_mut().zip(&acc) {
        s[1] = 1.0 / (*a * inv_c + epsilon).sqrt();
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use tract_onnx::pb;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 2_654_435_761usize) % 10_007) as f32 / 1000.0 - 5.0)
            .collect()
    }

    /// A graph input or output of type `elem_type`, shape left to inference.
    pub(in crate::engine) fn value_info(
        name: &str,
        elem_type: pb::tensor_proto::DataType,
    ) -> pb::ValueInfoProto {
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: elem_type as i32,
                    shape: None,
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The default model's encoder as an ONNX proto, for the rewrites' tests.
    pub(in crate::engine) fn default_encoder_proto() -> pb::ModelProto {
        let files = crate::model::ModelFiles::default_model().expect("default model");
        let bytes = std::fs::read(&files.encoder).expect("encoder bytes");
        onnx().proto_model_for_read(&mut &*bytes).unwrap()
    }

    /// Evaluates `op` out of a plan; its first output's f32 values.
    pub(in crate::engine) fn run(op: impl EvalOp, inputs: TVec<TValue>) -> Vec<f32> {
        let out = op.eval(&EvalContext::out_of_plan(), inputs).unwrap();
        out[0]
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn layer_norm_matches_the_onnx_definition() {
        for (rows, width) in [(3, 1), (2, 7), (5, 16), (4, 17), (3, 256)] {
            let x = values(rows * width, width);
            let scale = values(width, 1);
            let bias = values(width, 2);
            let inputs = tvec!(
                Tensor::from_shape(&[1, rows, width], &x)
                    .unwrap()
                    .into_tvalue(),
                Tensor::from_shape(&[width], &scale).unwrap().into_tvalue(),
                Tensor::from_shape(&[width], &bias).unwrap().into_tvalue()
            );
            let got = run(LastAxisLayerNorm { epsilon: 1e-6 }, inputs);
            for (r, row) in x.chunks(width).enumerate() {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
                let var =
                    row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
                for (i, &v) in row.iter().enumerate() {
                    let want =
                        (v as f64 - mean) / (var + 1e-6).sqrt() * scale[i] as f64 + bias[i] as f64;
                    let diff = (got[r * width + i] as f64 - want).abs();
                    assert!(diff < 1e-4 * (1.0 + want.abs()), "{rows}x{width}: {diff}");
                }
            }
        }
    }

    #[test]
    fn short_axis_softmax_matches_tracts_softmax() {
        for width in [1, 2, 7, SHORT_SOFTMAX_AXIS] {
            let x = values(3 * 5 * width, width);
            let input = Tensor::from_shape(&[3, 5, width], &x).unwrap();
            let got = run(ShortAxisSoftmax, tvec!(input.clone().into_tvalue()));
            let tract = tract_onnx::tract_core::ops::nn::Softmax {
                axes: tvec![2],
                ..Default::default()
            };
            let want = run(tract, tvec!(input.into_tvalue()));
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-5, "rows of {width}: {diff}");
            for row in got.chunks(width) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
    }
}
