//! 3x3 convolutions of NCHW tensors (padding 1, stride 1 or 2, one group; and the GELU after
//! them) as a samrt operator on the CPUs samrt's linear kernel runs on: each block of output
//! pixels is unfolded into rows of `C·9` inputs (im2col, in L2) and multiplied by the weights
//! packed at load with [`super::linear`]'s kernel, then stored channel-major.
//!
//! tract runs these as a matrix product over a lazily unfolded input whose panels it gathers for
//! every tile (its `LazyIm2col`): TinyViT's patch embedding (3 → 32 channels at 512x512, 32 → 64
//! at 256x256) and the neck (256 → 256 at 64x64, 2304 inputs a pixel) took ~220 ms of a 1-thread
//! encoder run, ~16% of it. Pixel blocks are split over tract's thread pool; results do not
//! depend on the thread count.
//!
//! [`fuse`] rewrites such `Conv` nodes (constant weights and bias) before tract parses the graph,
//! only where the kernel runs ([`super::linear::available`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, attribute_proto::AttributeType, AttributeProto, NodeProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use super::conv1x1::{conv_weights, OutPtr};
use super::linear::{gelu_after, gelu_attribute, gemm, panel_width, PackedWeights};
use super::onnx_graph::GraphIndex;
use super::vector_math::AlignedVec;

/// The ONNX operator type of a fused 3x3 convolution (samrt's domain).
pub const OP_TYPE: &str = "SamrtConv3x3";
const DOMAIN: &str = "ai.samrt";

/// Output pixels of one block (unfolded together; the unit of threading).
const BLOCK_PIXELS: usize = 96;

// ---------------------------------------------------------------------------------------------
// The ONNX rewrite.

/// Replaces every 3x3 `Conv` with padding 1 on each side, stride 1 or 2 (both axes alike), no
/// dilation, one group, weights `[O, C, 3, 3]` and an optional bias `[O]` as float initializers,
/// with the `SamrtGelu` it feeds alone if any, by one `SamrtConv3x3` node; returns how many. Run
/// after [`super::depthwise::fuse`] (which makes the GELUs and takes the depthwise ones).
pub fn fuse(graph: &mut pb::GraphProto) -> usize {
    let index = GraphIndex::new(graph);
    let float = |name: &str| {
        index
            .initializers
            .get(name)
            .copied()
            .filter(|t| t.data_type == pb::tensor_proto::DataType::Float as i32)
    };
    let mut removed: HashSet<usize> = HashSet::new();
    let mut fused: HashMap<usize, NodeProto> = HashMap::new();
    for (conv_ix, conv) in index.nodes.iter().enumerate() {
        if conv.op_type != "Conv" || !conv.domain.is_empty() || !(2..=3).contains(&conv.input.len())
        {
            continue;
        }
        let Some(weight) = float(&conv.input[1]) else {
            continue;
        };
        if weight.dims.len() != 4 || weight.dims[2..] != [3, 3] {
            continue;
        }
        if let Some(bias) = conv.input.get(2) {
            if float(bias).is_none_or(|b| b.dims != [weight.dims[0]]) {
                continue;
            }
        }
        let Some(stride) = stride_of(conv) else {
            continue;
        };
        let (gelu, output) = gelu_after(&index, conv_ix);
        let node = NodeProto {
            name: format!("{}.samrt_conv3x3", conv.name),
            op_type: OP_TYPE.into(),
            domain: DOMAIN.into(),
            input: conv.input.clone(),
            output: vec![output.to_string()],
            attribute: vec![
                gelu_attribute(gelu.is_some()),
                AttributeProto {
                    name: "stride".into(),
                    r#type: AttributeType::Int as i32,
                    i: stride,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        removed.insert(conv_ix);
        removed.extend(gelu);
        fused.insert(gelu.unwrap_or(conv_ix), node);
    }
    let count = fused.len();
    super::layer_norm::splice(graph, fused, &removed);
    count
}

/// The stride of a 3x3 `Conv` this operator takes (1 or 2 on both axes, padding 1 on every
/// side, no dilation, one group), or None.
fn stride_of(conv: &NodeProto) -> Option<i64> {
    let mut stride = 1;
    let mut padded = false;
    let plain = conv.attribute.iter().all(|a| match a.name.as_str() {
        "group" => a.i == 1,
        "kernel_shape" => a.ints == [3, 3],
        "dilations" => a.ints.iter().all(|&v| v == 1),
        "strides" => match a.ints.as_slice() {
            [s, t] if s == t && (*s == 1 || *s == 2) => {
                stride = *s;
                true
            }
            _ => false,
        },
        "pads" => {
            padded = a.ints == [1, 1, 1, 1];
            padded
        }
        "auto_pad" => a.s.is_empty() || a.s == b"NOTSET",
        _ => false,
    });
    (plain && padded).then_some(stride)
}

// ---------------------------------------------------------------------------------------------
// The operator, as tract's parser builds it.

/// Builds a `SamrtConv3x3` node.
pub fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let gelu = node.get_attr_opt::<i64>("gelu")?.unwrap_or(0) != 0;
    let stride = node.get_attr_opt::<i64>("stride")?.unwrap_or(1);
    ensure!(
        stride == 1 || stride == 2,
        "SamrtConv3x3: stride {stride}, 1 or 2 expected"
    );
    Ok((
        expand(Conv3x3Expansion {
            gelu,
            stride: stride as usize,
        }),
        vec![],
    ))
}

#[derive(Debug, Clone)]
struct Conv3x3Expansion {
    gelu: bool,
    stride: usize,
}

/// The output side of a 3x3 convolution with padding 1.
fn out_side(side: usize, stride: usize) -> usize {
    (side + 2 - 3) / stride + 1
}

impl Expansion for Conv3x3Expansion {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        ensure!(
            (2..=3).contains(&inputs.len()),
            "SamrtConv3x3: x, W and an optional bias"
        );
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].rank, 4)?;
        s.equals(&outputs[0].rank, 4)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[0].shape[1], &inputs[1].shape[0])?;
        let stride = self.stride;
        for axis in [2, 3] {
            s.given(&inputs[0].shape[axis], move |s, side| {
                let side = side.to_usize()?;
                s.equals(&outputs[0].shape[axis], out_side(side, stride).to_dim())
            })?;
        }
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let (w, bias) = conv_weights(OP_TYPE, model, inputs)?;
        let (o, c) = (w.shape()[0], w.shape()[1]);
        let op = Conv3x3::new(
            w.try_as_plain_ram()?.as_slice::<f32>()?,
            &bias,
            o,
            c,
            self.stride,
            self.gelu,
        );
        model.wire_node(prefix, op, &inputs[..1])
    }
}

// ---------------------------------------------------------------------------------------------
// The typed operator.

/// `out[n, o, y, x] = Σ_{c, i, j} W[o, c, i, j] · x[n, c, s·y + i − 1, s·x + j − 1] + b[o]`
/// (zero outside the input; then GELU if `gelu`) over NCHW tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Conv3x3 {
    o: usize,
    c: usize,
    stride: usize,
    gelu: bool,
    /// `W` as a `[C·9, O]` matrix, rows in `(c, i, j)` order, packed for [`gemm`].
    weights: Arc<PackedWeights>,
}

impl Eq for Conv3x3 {}

impl std::hash::Hash for Conv3x3 {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.o, self.c, self.stride, self.gelu).hash(state);
        self.weights.hash_prefix(state);
    }
}

impl Conv3x3 {
    fn new(weights: &[f32], bias: &[f32], o: usize, c: usize, stride: usize, gelu: bool) -> Self {
        let k = c * 9;
        // ONNX's [O, C·9] transposed to the [C·9, O] the linear kernel multiplies by.
        let mut matrix = vec![0f32; k * o];
        for (oc, row) in weights.chunks_exact(k).enumerate().take(o) {
            for (kk, &v) in row.iter().enumerate() {
                matrix[kk * o + oc] = v;
            }
        }
        Conv3x3 {
            o,
            c,
            stride,
            gelu,
            weights: Arc::new(PackedWeights::new(&matrix, &bias[..o], k, o, panel_width())),
        }
    }

    /// Unfolds output pixels `pixels` (row-major over the output plane) of one image into
    /// `rows` (`pixels.len()` rows of `C·9`).
    fn unfold(
        &self,
        x: &[f32],
        [h, w]: [usize; 2],
        ow: usize,
        pixels: std::ops::Range<usize>,
        rows: &mut [f32],
    ) {
        let (c, s) = (self.c, self.stride);
        let k = c * 9;
        for (r, p) in pixels.enumerate() {
            let (oy, ox) = (p / ow, p % ow);
            let row = &mut rows[r * k..(r + 1) * k];
            // Input rows oy·s − 1 ..= oy·s + 1, columns ox·s − 1 ..= ox·s + 1.
            let (y0, x0) = ((oy * s) as isize - 1, (ox * s) as isize - 1);
            let inside = y0 >= 0 && x0 >= 0 && y0 as usize + 2 < h && x0 as usize + 2 < w;
            for ch in 0..c {
                let plane = &x[ch * h * w..(ch + 1) * h * w];
                let dst = &mut row[ch * 9..ch * 9 + 9];
                if inside {
                    let at = y0 as usize * w + x0 as usize;
                    for i in 0..3 {
                        dst[i * 3..i * 3 + 3].copy_from_slice(&plane[at + i * w..at + i * w + 3]);
                    }
                } else {
                    for i in 0..3 {
                        for j in 0..3 {
                            let (y, xx) = (y0 + i as isize, x0 + j as isize);
                            dst[i * 3 + j] =
                                if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < w {
                                    plane[y as usize * w + xx as usize]
                                } else {
                                    0.0
                                };
                        }
                    }
                }
            }
        }
    }
}

impl Op for Conv3x3 {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} → {} channels, stride {}, gelu: {}",
            self.c, self.o, self.stride, self.gelu
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for Conv3x3 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(
            x.rank() == 4 && x.shape[1] == self.c.to_dim(),
            "SamrtConv3x3: NCHW input of {} channels expected, got {:?}",
            self.c,
            x.shape
        );
        let mut shape: TVec<TDim> = x.shape.iter().cloned().collect();
        shape[1] = self.o.to_dim();
        for side in &mut shape[2..] {
            *side = out_side(side.to_usize()?, self.stride).to_dim();
        }
        Ok(tvec!(x.datum_type.fact(shape)))
    }

    as_op!();
}

impl EvalOp for Conv3x3 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = x.shape();
        ensure!(
            shape.len() == 4 && shape[1] == self.c,
            "SamrtConv3x3: NCHW input of {} channels expected, got {shape:?}",
            self.c
        );
        let (n, h, w) = (shape[0], shape[2], shape[3]);
        let (oh, ow) = (out_side(h, self.stride), out_side(w, self.stride));
        let (plane, out_plane) = (h * w, oh * ow);
        let view = x.try_as_plain_ram()?;
        let data = view.as_slice::<f32>()?;
        // SAFETY: f32 has no invalid bit patterns, and every output value is written.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&[n, self.o, oh, ow])? };
        let blocks = out_plane.div_ceil(BLOCK_PIXELS);
        let units = n * blocks;
        if units * self.o > 0 {
            let mut out_view = output.try_as_plain_ram_mut()?;
            let out = OutPtr(out_view.as_slice_mut::<f32>()?.as_mut_ptr());
            let (k, o) = (self.c * 9, self.o);
            let scratch = || {
                (
                    AlignedVec::<f32>::zeroed(BLOCK_PIXELS * k),
                    AlignedVec::<f32>::zeroed(BLOCK_PIXELS * o),
                )
            };
            let task = |(rows, products): &mut (AlignedVec<f32>, AlignedVec<f32>), unit: usize| {
                let (image, block) = (unit / blocks, unit % blocks);
                let x = &data[image * self.c * plane..(image + 1) * self.c * plane];
                let pixels = block * BLOCK_PIXELS..((block + 1) * BLOCK_PIXELS).min(out_plane);
                let m = pixels.len();
                self.unfold(x, [h, w], ow, pixels.clone(), rows);
                gemm(rows, m, &self.weights, self.gelu, products);
                // Channel-major: row r of the products is pixel `pixels.start + r`.
                let out_image = out.at(image * o * out_plane + pixels.start);
                for oc in 0..o {
                    for r in 0..m {
                        // SAFETY: units write disjoint pixel ranges of the output, inside
                        // image `image`'s o x out_plane values.
                        unsafe { *out_image.add(oc * out_plane + r) = products[r * o + oc] };
                    }
                }
            };
            super::threads::for_each_unit(units, scratch, task);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::vector_math::{gelu, Baseline};
    use tract_onnx::tract_core::tract_linalg::multithread::Executor;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 2_654_435_761usize) % 10_007) as f32 / 5000.0 - 1.0)
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        [n, c, h, w]: [usize; 4],
        weights: &[f32],
        b: &[f32],
        o: usize,
        stride: usize,
        gelu_after: bool,
    ) -> Vec<f32> {
        let (oh, ow) = (out_side(h, stride), out_side(w, stride));
        let mut out = vec![0f32; n * o * oh * ow];
        for img in 0..n {
            for oc in 0..o {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = b[oc] as f64;
                        for ch in 0..c {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let y = (oy * stride + i) as isize - 1;
                                    let xx = (ox * stride + j) as isize - 1;
                                    if y < 0 || xx < 0 || y as usize >= h || xx as usize >= w {
                                        continue;
                                    }
                                    let v = x[((img * c + ch) * h + y as usize) * w + xx as usize];
                                    acc +=
                                        weights[((oc * c + ch) * 3 + i) * 3 + j] as f64 * v as f64;
                                }
                            }
                        }
                        let v = acc as f32;
                        out[((img * o + oc) * oh + oy) * ow + ox] =
                            if gelu_after { gelu::<Baseline>(v) } else { v };
                    }
                }
            }
        }
        out
    }

    #[test]
    fn conv3x3_matches_the_definition() {
        for (shape, o, stride, gelu_after) in [
            ([1, 3, 20, 18], 32, 2, true),
            ([2, 7, 9, 11], 13, 1, false),
            ([1, 40, 17, 16], 64, 2, false),
            ([1, 30, 12, 12], 40, 1, true),
            ([1, 2, 1, 1], 3, 1, false),
            ([1, 2, 2, 3], 5, 2, false),
        ] {
            let c = shape[1];
            let x = values(shape.iter().product(), 1);
            let w = values(o * c * 9, 2);
            let b = values(o, 3);
            let want = reference(&x, shape, &w, &b, o, stride, gelu_after);
            let op = Conv3x3::new(&w, &b, o, c, stride, gelu_after);
            let input = || tvec![Tensor::from_shape(&shape, &x).unwrap().into_tvalue()];
            let got = crate::engine::fast_ops::tests::run(op.clone(), input());
            assert_eq!(got.len(), want.len(), "{shape:?}");
            for (g, r) in got.iter().zip(&want) {
                assert!(
                    (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "{shape:?}: {g} vs {r}"
                );
            }
            let pooled = tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
                Executor::multithread(2),
                || crate::engine::fast_ops::tests::run(op, input()),
            );
            assert_eq!(got, pooled, "{shape:?}: 2 threads differ from 1");
        }
    }

    #[test]
    fn tinyvit_patch_embedding_and_neck_are_rewritten() {
        if !super::super::linear::available() {
            return;
        }
        let mut proto = crate::engine::fast_ops::tests::default_encoder_proto();
        let graph = proto.graph.as_mut().unwrap();
        super::super::depthwise::fuse(graph);
        let count = fuse(graph);
        // patch_embed's two convolutions (the first with its GELU) and the neck's.
        assert_eq!(count, 3);
        let nodes: Vec<&NodeProto> = graph.node.iter().filter(|n| n.op_type == OP_TYPE).collect();
        assert_eq!(
            nodes
                .iter()
                .filter(|n| n.attribute.iter().any(|a| a.name == "gelu" && a.i == 1))
                .count(),
            1
        );
    }
}
