//! ONNX `DynamicQuantizeLinear` as a samrt operator: vectorized and split over tract's threads.
//!
//! onnxruntime's `quantize_dynamic` files quantize every activation that enters a matrix
//! product at run time: the tensor's range (extended to hold 0) gives a scale and a zero point,
//! then every value becomes `saturate(round(x / scale) + zero_point)` as u8. tract computes both
//! passes in one thread, value by value (a branchy fold for the range, a rounding and a
//! saturating cast per value): a quarter of a two-thread run of the full-size ViT-B int8 encoder.
//! Here the range is a reduction over blocks of the tensor on tract's pool (min and max are
//! exact, so any split gives the same result), and the quantization runs blockwise on the same
//! pool with the rounding done by the `1.5·2²³` constant (round half to even, as
//! `f32::round_ties_even`), branch-free so that it vectorizes. Scale, zero point and every
//! quantized value are those of tract's operator, bit for bit (tested).

use super::threads::par_chunks_mut;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use super::vector_math::MulAdd;

/// Values per block of either pass.
const BLOCK: usize = 16 * 1024;
/// Adding and subtracting it rounds an f32 of magnitude below 2²² to an integer, half to even.
const ROUNDING: f32 = 12_582_912.0;

/// Builds an ONNX `DynamicQuantizeLinear` node.
pub fn build(
    _ctx: &ParsingContext,
    _node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(DynamicQuantizeExpansion), vec![]))
}

#[derive(Debug, Clone)]
struct DynamicQuantizeExpansion;

impl Expansion for DynamicQuantizeExpansion {
    fn name(&self) -> StaticName {
        "DynamicQuantizeLinear".into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(3)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 3)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        s.equals(&outputs[0].datum_type, u8::datum_type())?;
        s.equals(&outputs[1].datum_type, f32::datum_type())?;
        s.equals(&outputs[1].rank, 0)?;
        s.equals(&outputs[2].datum_type, u8::datum_type())?;
        s.equals(&outputs[2].rank, 0)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(
            format!("{prefix}.samrt_dynamic_quantize"),
            DynamicQuantize,
            &[inputs[0]],
        )
    }
}

/// `DynamicQuantizeLinear` of an f32 tensor: the u8 tensor, its scale and its zero point.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DynamicQuantize;

impl Op for DynamicQuantize {
    fn name(&self) -> StaticName {
        "SamrtDynamicQuantize".into()
    }

    op_as_typed_op!();
}

impl TypedOp for DynamicQuantize {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut quantized = inputs[0].clone();
        quantized.datum_type = u8::datum_type();
        quantized.konst = None;
        quantized.uniform = None;
        Ok(tvec!(quantized, f32::fact([0; 0]), u8::fact([0; 0])))
    }

    as_op!();
}

impl EvalOp for DynamicQuantize {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = inputs[0].cast_to::<f32>()?;
        let view = input.try_as_plain_ram()?;
        let x = view.as_slice::<f32>()?;
        let (scale, zero_point) = scale_and_zero_point(range(x));
        // SAFETY: u8 has no invalid bit patterns, and every value is written below.
        let mut output = unsafe { Tensor::uninitialized::<u8>(input.shape())? };
        {
            let mut out = output.try_as_plain_ram_mut()?;
            let out = out.as_slice_mut::<u8>()?;
            blockwise(x, out, |x, out| quantize(x, scale, zero_point, out))?;
        }
        Ok(tvec!(
            output.into_tvalue(),
            tensor0(scale).into_tvalue(),
            tensor0(zero_point).into_tvalue()
        ))
    }
}

/// The ONNX operator type of samrt's `QuantizeLinear` with a constant scale and u8 zero point
/// (samrt's domain; [`super::linear_int8::fuse_qdq`] writes it for the activations entering its
/// int8 linear layers).
pub const STATIC_OP: &str = "SamrtQuantizeLinear";

/// Builds a `SamrtQuantizeLinear(x, scale, zero_point)` node.
pub fn build_static(
    _ctx: &ParsingContext,
    _node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(StaticQuantizeExpansion), vec![]))
}

#[derive(Debug, Clone)]
struct StaticQuantizeExpansion;

impl Expansion for StaticQuantizeExpansion {
    fn name(&self) -> StaticName {
        STATIC_OP.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        s.equals(&outputs[0].datum_type, u8::datum_type())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let scale = model.outlet_fact(inputs[1])?.konst.clone();
        let zero_point = model.outlet_fact(inputs[2])?.konst.clone();
        let (Some(scale), Some(zero_point)) = (scale, zero_point) else {
            bail!("{STATIC_OP}: the scale and zero point must be constants");
        };
        let op = StaticQuantize {
            scale: scale.cast_to_scalar::<f32>()?,
            zero_point: zero_point.cast_to_scalar::<u8>()?,
        };
        model.wire_node(prefix, op, &[inputs[0]])
    }
}

/// ONNX `QuantizeLinear` to u8 with one scale and zero point, known at load:
/// `saturate(round_half_even(x / scale) + zero_point)`, blockwise over tract's pool.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticQuantize {
    scale: f32,
    zero_point: u8,
}

impl Eq for StaticQuantize {}

impl std::hash::Hash for StaticQuantize {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.scale.to_bits(), self.zero_point).hash(state)
    }
}

impl Op for StaticQuantize {
    fn name(&self) -> StaticName {
        STATIC_OP.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "scale: {}, zero point: {}",
            self.scale, self.zero_point
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for StaticQuantize {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(u8::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

impl EvalOp for StaticQuantize {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        let view = input.try_as_plain_ram()?;
        let x = view.as_slice::<f32>()?;
        // SAFETY: u8 has no invalid bit patterns, and every value is written below.
        let mut output = unsafe { Tensor::uninitialized::<u8>(input.shape())? };
        {
            let mut out = output.try_as_plain_ram_mut()?;
            let out = out.as_slice_mut::<u8>()?;
            blockwise(x, out, |x, out| {
                quantize(x, self.scale, self.zero_point, out)
            })?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

/// `f(x part, out part)` over blocks of [`BLOCK`] values on tract's pool, then the tail.
fn blockwise(
    x: &[f32],
    out: &mut [u8],
    f: impl Fn(&[f32], &mut [u8]) + Sync + Send,
) -> TractResult<()> {
    let len = out.len();
    let (whole, tail) = out.split_at_mut(len / BLOCK * BLOCK);
    if !whole.is_empty() {
        par_chunks_mut(whole, BLOCK, len, |first, blocks| {
            let start = first * BLOCK;
            f(&x[start..start + blocks.len()], blocks);
            Ok(())
        })?;
    }
    let start = whole.len();
    f(&x[start..], tail);
    Ok(())
}

/// `(min(0, min x), max(0, max x))`, NaNs ignored, over tract's pool.
fn range(x: &[f32]) -> (f32, f32) {
    let blocks = x.len().div_ceil(BLOCK);
    let mut ranges = vec![(0f32, 0f32); blocks];
    let _ = par_chunks_mut(&mut ranges, 1, x.len(), |first, part| {
        for (i, r) in part.iter_mut().enumerate() {
            let b = first + i;
            *r = block_range(&x[b * BLOCK..((b + 1) * BLOCK).min(x.len())]);
        }
        Ok(())
    });
    ranges
        .into_iter()
        .fold((0.0, 0.0), |(lo, hi), (a, b)| (min(lo, a), max(hi, b)))
}

#[inline(always)]
fn min(a: f32, b: f32) -> f32 {
    if b < a {
        b
    } else {
        a
    }
}

#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

super::vector_math::dispatch_isa!(fn block_range(x: &[f32]) -> (f32, f32) => block_range_body);

#[inline(always)]
fn block_range_body<F: MulAdd>(x: &[f32]) -> (f32, f32) {
    const LANES: usize = 16;
    let mut lo = [0f32; LANES];
    let mut hi = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            lo[l] = min(lo[l], chunk[l]);
            hi[l] = max(hi[l], chunk[l]);
        }
    }
    let (mut a, mut b) = (0f32, 0f32);
    for l in 0..LANES {
        a = min(a, lo[l]);
        b = max(b, hi[l]);
    }
    for &v in rest {
        a = min(a, v);
        b = max(b, v);
    }
    (a, b)
}

/// Scale and zero point of a range that holds 0, as ONNX (and tract) define them.
fn scale_and_zero_point((min, max): (f32, f32)) -> (f32, u8) {
    let scale = (max - min) / u8::MAX as f32;
    let zero_point = (-min / scale)
        .round_ties_even()
        .max(u8::MIN as f32)
        .min(u8::MAX as f32);
    (scale, zero_point as u8)
}

/// `out = saturate(round_half_even(x / scale) + zero_point)`, for the dynamic operator (values
/// inside the range its scale was made for) and the static one (values anywhere).
fn quantize(x: &[f32], scale: f32, zero_point: u8, out: &mut [u8]) {
    if scale.is_nan() || scale <= 0.0 {
        // An all-zero range: tract's NaN quotients round and saturate to the zero point.
        out.fill(zero_point);
        return;
    }
    quantize_values(x, scale, zero_point, out)
}

super::vector_math::dispatch_isa!(
    fn quantize_values(x: &[f32], scale: f32, zero_point: u8, out: &mut [u8]) => quantize_body
);

#[inline(always)]
fn quantize_body<F: MulAdd>(x: &[f32], scale: f32, zero_point: u8, out: &mut [u8]) {
    let zp = zero_point as f32;
    for (y, &v) in out.iter_mut().zip(x) {
        // Clamped to ±2²² steps, where the rounding constant is exact (the result saturates
        // anyway); a no-op inside the range (|v / scale| ≤ 255).
        let steps = (v / scale).clamp(-4_194_304.0, 4_194_304.0);
        let q = (steps + ROUNDING) - ROUNDING + zp;
        let q = q.clamp(0.0, 255.0);
        *y = ((q + ROUNDING).to_bits() & 0xff) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fast_ops::tests::value_info;
    use tract_onnx::pb::{self, tensor_proto::DataType};

    /// One `DynamicQuantizeLinear` node, as `quantize_dynamic` writes it.
    fn model() -> pb::ModelProto {
        let graph = pb::GraphProto {
            node: vec![pb::NodeProto {
                name: "q".into(),
                op_type: "DynamicQuantizeLinear".into(),
                input: vec!["x".into()],
                output: vec!["y".into(), "scale".into(), "zero_point".into()],
                ..Default::default()
            }],
            input: vec![value_info("x", DataType::Float)],
            output: vec![
                value_info("y", DataType::Uint8),
                value_info("scale", DataType::Float),
                value_info("zero_point", DataType::Uint8),
            ],
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: 7,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(graph),
            ..Default::default()
        }
    }

    fn run(onnx: &tract_onnx::Onnx, x: &Tensor) -> (Vec<u8>, f32, u8, Vec<String>) {
        let model = onnx
            .model_for_proto_model(&model())
            .unwrap()
            .with_input_fact(0, f32::fact(x.shape()).into())
            .unwrap()
            .into_optimized()
            .unwrap();
        let ops = model
            .nodes()
            .iter()
            .map(|n| n.op.name().to_string())
            .collect();
        let out = model
            .into_runnable()
            .unwrap()
            .run(tvec!(x.clone().into_tvalue()))
            .unwrap();
        (
            out[0]
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<u8>()
                .unwrap()
                .to_vec(),
            *out[1]
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap()
                .first()
                .unwrap(),
            *out[2]
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<u8>()
                .unwrap()
                .first()
                .unwrap(),
            ops,
        )
    }

    /// samrt's static `QuantizeLinear` is ONNX's definition (x / scale rounded half to even,
    /// plus the zero point, saturated) on values inside, outside and at the edges of the range,
    /// ties included, at 1 and 2 threads.
    #[test]
    fn static_quantize_is_the_onnx_definition() {
        let (scale, zero_point) = (0.05f32, 37u8);
        let mut x: Vec<f32> = (0..3 * BLOCK + 5)
            .map(|i| ((i * 2_654_435_761usize) % 20_011) as f32 / 1000.0 - 10.0)
            .collect();
        x.extend([0.025, 0.075, -0.025, -1.85, 1e30, -1e30, 10.7, 0.0]);
        let want: Vec<u8> = x
            .iter()
            .map(|&v| ((v / scale).round_ties_even() + zero_point as f32).clamp(0.0, 255.0) as u8)
            .collect();
        let op = StaticQuantize { scale, zero_point };
        let input = Tensor::from_shape(&[1, x.len()], &x).unwrap();
        let run = || {
            let out = op
                .eval(
                    &EvalContext::out_of_plan(),
                    tvec!(input.clone().into_tvalue()),
                )
                .unwrap();
            out[0]
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<u8>()
                .unwrap()
                .to_vec()
        };
        assert_eq!(run(), want);
        let pooled = tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
            tract_onnx::tract_core::tract_linalg::multithread::Executor::multithread(2),
            run,
        );
        assert_eq!(pooled, want);
    }

    /// Every output the same as tract's operator's, at 1 and 2 threads: ONNX's examples, all
    /// positive, all negative, all zero, and activations of several blocks with a tail.
    #[test]
    fn same_bits_as_tracts_operator() {
        let wavy = |n: usize, shift: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 2_654_435_761usize) % 10_007) as f32 / 1000.0 - shift)
                .collect()
        };
        let cases: Vec<Vec<f32>> = vec![
            vec![0., 2., -3., -2.5, 1.34, 0.5],
            vec![-1., -2.1, -1.3, -2.5, -3.34, -4.],
            vec![1., 2.1, 1.3, 2.5, 3.34, 4., 1.5, 2.6, 3.9, 4., 3., 2.345],
            vec![0.0; 40],
            wavy(3 * BLOCK + 77, 3.0),
            wavy(BLOCK * 5, 0.0),
            wavy(1000, 20.0),
        ];
        for x in cases {
            let x = Tensor::from_shape(&[1, x.len()], &x).unwrap();
            let (want, want_scale, want_zp, tract_ops) = run(&tract_onnx::onnx(), &x);
            assert!(
                tract_ops.iter().any(|o| o == "DynamicQuantizeLinearU8"),
                "{tract_ops:?}"
            );
            let samrt = crate::engine::fast_ops::onnx();
            let (got, scale, zp, ops) = run(&samrt, &x);
            assert!(ops.iter().any(|o| o == "SamrtDynamicQuantize"), "{ops:?}");
            assert_eq!((scale.to_bits(), zp), (want_scale.to_bits(), want_zp));
            assert_eq!(got, want, "{} values", x.len());
            let pooled = tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
                tract_onnx::tract_core::tract_linalg::multithread::Executor::multithread(2),
                || run(&samrt, &x),
            );
            assert_eq!(pooled.0, want);
        }
    }
}
