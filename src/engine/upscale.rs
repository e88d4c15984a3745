//! SAM's mask decoder output upscaling as one samrt operator, on CPUs where samrt's linear-layer
//! kernel runs ([`super::linear::available`]).
//!
//! `output_upscaling` is `ConvTranspose2d(256, 64, 2, stride 2)` → `LayerNorm2d(64)` → GELU →
//! `ConvTranspose2d(64, 32, 2, stride 2)` → GELU, from the 64x64 image tokens to 32 planes of
//! 256x256. tract runs it as eight operators, each a pass over 4–8 MB: two matrix products on
//! packed copies, two scatter-adds of the transposed convolutions, the channel norm as three
//! broadcasting passes, two GELUs (~40% of a prompt's decoder time on this project's machine).
//! A 2x2 transposed convolution with stride 2 does not overlap: each input pixel alone makes a
//! 2x2 block of output pixels, so each input pixel alone makes a 4x4 block of the final planes.
//! Here one input row at a time is gathered into a pixels x channels block and goes through both
//! stages in cache: the first convolution as a matrix product `[pixels, 256] · [256, 2·2·64]`
//! (samrt's linear kernel, weights packed at load), the channel norm and GELU on each 64-value
//! output pixel, the second as `[pixels·4, 64] · [64, 2·2·32]` with its GELU, then the values
//! are written to their places in the planes. Rows are split over tract's thread pool; results
//! do not depend on the thread count.
//!
//! [`fuse`] rewrites the chain after [`super::layer_norm::recompose`] has made the norm one
//! `SamrtChannelNorm` node and [`super::depthwise::fuse`] the GELUs `SamrtGelu` nodes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, attribute_proto::AttributeType, AttributeProto, NodeProto};
use tract_onnx::prelude::*;

use tract_onnx::tract_hir::internal::*;

use super::linear::{gemm, panel_width, PackedWeights};
use super::vector_math::{gelu, MulAdd};

/// The ONNX operator type of the fused upscaling (samrt's domain).
pub const OP_TYPE: &str = "SamrtUpscale";
const DOMAIN: &str = "ai.samrt";

// ---------------------------------------------------------------------------------------------
// The ONNX rewrite.

/// Replaces `ConvTranspose` (2x2, stride 2) → `SamrtChannelNorm` → `SamrtGelu` →
/// `ConvTranspose` (2x2, stride 2) → `SamrtGelu`, every intermediate value used by the chain
/// alone and every weight an initializer, by one `SamrtUpscale` node; returns how many.
pub fn fuse(graph: &mut pb::GraphProto) -> usize {
    let nodes = &graph.node;
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        for input in &node.input {
            consumers.entry(input).or_default().push(i);
        }
        for output in &node.output {
            producer.insert(output, i);
        }
    }
    let graph_outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let initializers: HashMap<&str, &pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let float_dims = |name: &str| {
        initializers
            .get(name)
            .filter(|t| t.data_type == pb::tensor_proto::DataType::Float as i32)
            .map(|t| t.dims.clone())
    };
    // The only consumer of `name`, if it has type `op`.
    let single = |name: &str, op: &str| -> Option<usize> {
        if graph_outputs.contains(name) {
            return None;
        }
        match consumers.get(name).map(|c| c.as_slice()) {
            Some([only]) if nodes[*only].op_type == op => Some(*only),
            _ => None,
        }
    };
    // A 2x2 stride-2 transposed convolution with initializer weights `[C, O, 2, 2]` and bias
    // `[O]`: its (C, O).
    let conv_transpose = |node: &NodeProto| -> Option<(i64, i64)> {
        if node.op_type != "ConvTranspose" || !node.domain.is_empty() || node.input.len() != 3 {
            return None;
        }
        let plain = node.attribute.iter().all(|a| match a.name.as_str() {
            "group" => a.i == 1,
            "kernel_shape" | "strides" => a.ints == [2, 2],
            "dilations" => a.ints.iter().all(|&v| v == 1),
            "pads" | "output_padding" => a.ints.iter().all(|&v| v == 0),
            "auto_pad" => a.s.is_empty() || a.s == b"NOTSET",
            _ => false,
        });
        let w = float_dims(&node.input[1])?;
        let b = float_dims(&node.input[2])?;
        (plain && w.len() == 4 && w[2..] == [2, 2] && b == [w[1]]).then_some((w[0], w[1]))
    };
    let mut removed: HashSet<usize> = HashSet::new();
    let mut fused: HashMap<usize, NodeProto> = HashMap::new();
    for (first_ix, first) in nodes.iter().enumerate() {
        let Some((_, mid)) = conv_transpose(first) else {
            continue;
        };
        let Some(norm_ix) = single(&first.output[0], super::layer_norm::CHANNEL_NORM_OP) else {
            continue;
        };
        let norm = &nodes[norm_ix];
        let per_channel = |name: &str| float_dims(name).is_some_and(|d| d == [mid, 1, 1]);
        if norm.input.len() != 3 || !per_channel(&norm.input[1]) || !per_channel(&norm.input[2]) {
            continue;
        }
        let Some(gelu1_ix) = single(&norm.output[0], super::depthwise::GELU_OP) else {
            continue;
        };
        let Some(second_ix) = single(&nodes[gelu1_ix].output[0], "ConvTranspose") else {
            continue;
        };
        let second = &nodes[second_ix];
        if conv_transpose(second).is_none_or(|(c, _)| c != mid) {
            continue;
        }
        let Some(gelu2_ix) = single(&second.output[0], super::depthwise::GELU_OP) else {
            continue;
        };
        let mut chain = vec![first_ix, norm_ix, gelu1_ix, second_ix, gelu2_ix];
        // The input as SAM's decoder makes it, `src.transpose(1, 2).view(b, c, h, w)`: the
        // operator reads the tokens `[b, h·w, c]` instead (`layout = "tokens"`).
        let mut input = first.input[0].clone();
        let mut tokens = false;
        if let Some(&reshape_ix) = producer.get(input.as_str()) {
            let reshape = &nodes[reshape_ix];
            let transpose = producer
                .get(reshape.input[0].as_str())
                .map(|&i| (i, &nodes[i]));
            if let Some((transpose_ix, transpose)) = transpose {
                let perm = transpose.attribute.iter().find(|a| a.name == "perm");
                if reshape.op_type == "Reshape"
                    && transpose.op_type == "Transpose"
                    && perm.is_some_and(|a| a.ints == [0, 2, 1])
                    && single(&reshape.output[0], "ConvTranspose") == Some(first_ix)
                    && single(&transpose.output[0], "Reshape") == Some(reshape_ix)
                {
                    input = transpose.input[0].clone();
                    tokens = true;
                    chain.extend([reshape_ix, transpose_ix]);
                }
            }
        }
        // The output as SAM's decoder uses it, `(hyper_in @ upscaled.view(b, c, h·w)).view(b,
        // t, h, w)`: the operator multiplies each pixel by the hypernetwork's `[b, t, c]` and
        // writes the masks (`hyper = 1`); the 32 upscaled planes are never stored.
        let mut output = nodes[gelu2_ix].output.clone();
        let mut hyper = None;
        let upscaled = &nodes[gelu2_ix].output[0];
        let users: Vec<usize> = consumers
            .get(upscaled.as_str())
            .cloned()
            .unwrap_or_default();
        let reshapes: Vec<usize> = users
            .iter()
            .copied()
            .filter(|&u| nodes[u].op_type != "Shape")
            .collect();
        if let ([reshape8], false) = (
            reshapes.as_slice(),
            graph_outputs.contains(upscaled.as_str()),
        ) {
            let reshape8 = *reshape8;
            if nodes[reshape8].op_type == "Reshape" && nodes[reshape8].input[0] == *upscaled {
                if let Some(matmul) = single(&nodes[reshape8].output[0], "MatMul") {
                    if nodes[matmul].input[1] == nodes[reshape8].output[0] {
                        if let Some(reshape9) = single(&nodes[matmul].output[0], "Reshape") {
                            hyper = Some(nodes[matmul].input[0].clone());
                            output = nodes[reshape9].output.clone();
                            chain.extend([reshape8, matmul, reshape9]);
                        }
                    }
                }
            }
        }
        if chain.iter().any(|ix| removed.contains(ix)) {
            continue;
        }
        let mut attribute: Vec<AttributeProto> = norm
            .attribute
            .iter()
            .filter(|a| a.name == "epsilon")
            .cloned()
            .collect();
        if attribute.is_empty() {
            attribute.push(AttributeProto {
                name: "epsilon".into(),
                r#type: AttributeType::Float as i32,
                f: 1e-6,
                ..Default::default()
            });
        }
        attribute.push(AttributeProto {
            name: "tokens".into(),
            r#type: AttributeType::Int as i32,
            i: i64::from(tokens),
            ..Default::default()
        });
        let mut inputs = vec![
            input,
            first.input[1].clone(),
            first.input[2].clone(),
            norm.input[1].clone(),
            norm.input[2].clone(),
            second.input[1].clone(),
            second.input[2].clone(),
        ];
        inputs.extend(hyper);
        let node = NodeProto {
            name: format!("{}.samrt_upscale", first.name),
            op_type: OP_TYPE.into(),
            domain: DOMAIN.into(),
            input: inputs,
            output,
            attribute,
            ..Default::default()
        };
        // In place of the chain's last node, after every input it reads.
        let last = *chain.iter().max().expect("a chain");
        removed.extend(chain);
        fused.insert(last, node);
    }
    let count = fused.len();
    super::layer_norm::splice(graph, fused, &removed);
    if count > 0 {
        // The shape computations of the values no longer made.
        super::onnx_graph::remove_dead_nodes(graph);
    }
    count
}

// ---------------------------------------------------------------------------------------------
// The operator, as tract's parser builds it.

/// Builds a `SamrtUpscale` node.
pub fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let epsilon = node.get_attr_opt::<f32>("epsilon")?.unwrap_or(1e-6);
    let tokens = node.get_attr_opt::<i64>("tokens")?.unwrap_or(0) != 0;
    let hyper = node.input.len() == 8;
    Ok((
        expand(UpscaleExpansion {
            epsilon,
            tokens,
            hyper,
        }),
        vec![],
    ))
}

#[derive(Debug, Clone)]
struct UpscaleExpansion {
    epsilon: f32,
    /// The input is `[N, H·W, C]` tokens of a square grid instead of `[N, C, H, W]`.
    tokens: bool,
    /// An eighth input `[N, T, O]` multiplies each output pixel: the output is `[N, T, 4H, 4W]`.
    hyper: bool,
}

/// The side of the square grid of `hw` tokens.
fn grid_side(hw: usize) -> TractResult<usize> {
    let side = (hw as f64).sqrt().round() as usize;
    ensure!(
        side * side == hw,
        "SamrtUpscale: {hw} tokens are not a square grid"
    );
    Ok(side)
}

impl Expansion for UpscaleExpansion {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 7 + usize::from(self.hyper))?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&outputs[0].rank, 4)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        if self.hyper {
            s.equals(&outputs[0].shape[1], &inputs[7].shape[1])?;
        } else {
            s.equals(&outputs[0].shape[1], &inputs[5].shape[1])?;
        }
        if self.tokens {
            s.equals(&inputs[0].rank, 3)?;
            s.given(&inputs[0].shape[1], move |s, hw| {
                let side = grid_side(hw.to_usize()?)? as i64;
                s.equals(&outputs[0].shape[2], (side * 4).to_dim())?;
                s.equals(&outputs[0].shape[3], (side * 4).to_dim())
            })
        } else {
            s.equals(&inputs[0].rank, 4)?;
            s.given(&inputs[0].shape[2], move |s, h| {
                s.equals(&outputs[0].shape[2], h * 4)
            })?;
            s.given(&inputs[0].shape[3], move |s, w| {
                s.equals(&outputs[0].shape[3], w * 4)
            })
        }
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let mut constants = vec![];
        for &input in &inputs[1..7] {
            let value =
                model.outlet_fact(input)?.konst.clone().context(
                    "SamrtUpscale: weights, biases and norm parameters must be constants",
                )?;
            ensure!(
                value.datum_type() == f32::datum_type(),
                "SamrtUpscale: f32 only"
            );
            constants.push(value);
        }
        let values = |i: usize| -> TractResult<&[f32]> {
            constants[i].try_as_plain_ram()?.as_slice::<f32>()
        };
        let (w1, w2) = (constants[0].shape(), constants[4].shape());
        ensure!(
            w1.len() == 4 && w2.len() == 4 && w2[0] == w1[1],
            "SamrtUpscale: weights {w1:?} and {w2:?}"
        );
        let op = Upscale::new(
            [w1[0], w1[1], w2[1]],
            [
                values(0)?,
                values(1)?,
                values(2)?,
                values(3)?,
                values(4)?,
                values(5)?,
            ],
            self.epsilon,
            self.tokens,
            self.hyper,
        );
        let mut wired = vec![inputs[0]];
        if self.hyper {
            wired.push(inputs[7]);
        }
        model.wire_node(prefix, op, &wired)
    }
}

// ---------------------------------------------------------------------------------------------
// The typed operator.

/// The fused upscaling: `x [N, C, H, W]` (or tokens `[N, H·W, C]`) → `[N, O, 4H, 4W]`, or with
/// the hypernetwork's `[N, T, O]` the masks `[N, T, 4H, 4W]`.
#[derive(Debug, Clone)]
pub struct Upscale {
    tokens: bool,
    hyper: bool,
    /// Input channels, channels after the first convolution (and the norm), output channels.
    channels: [usize; 3],
    /// The first convolution as `[C, 2·2·M]` (column `(a·2 + b)·M + m` for output pixel
    /// `(2i + a, 2j + b)`, channel m), its bias repeated per column.
    first: Arc<PackedWeights>,
    /// The norm's weight and bias, M values each.
    norm: Arc<(Vec<f32>, Vec<f32>)>,
    epsilon: f32,
    /// The second convolution as `[M, 2·2·O]`, laid out like the first.
    second: Arc<PackedWeights>,
}

/// A 2x2 transposed convolution's weights `[C, O, 2, 2]` and bias `[O]` as a `[C, 4·O]` matrix
/// with columns `(a·2 + b)·O + o`.
fn as_matrix(weights: &[f32], bias: &[f32], c: usize, o: usize) -> PackedWeights {
    let mut matrix = vec![0f32; c * 4 * o];
    for ci in 0..c {
        for oi in 0..o {
            for ab in 0..4 {
                matrix[ci * 4 * o + ab * o + oi] = weights[(ci * o + oi) * 4 + ab];
            }
        }
    }
    let repeated: Vec<f32> = (0..4).flat_map(|_| bias[..o].iter().copied()).collect();
    PackedWeights::new(&matrix, &repeated, c, 4 * o, panel_width())
}

impl Upscale {
    /// `values`: first weights and bias, norm weight and bias, second weights and bias.
    fn new(
        channels: [usize; 3],
        values: [&[f32]; 6],
        epsilon: f32,
        tokens: bool,
        hyper: bool,
    ) -> Self {
        let [c, m, o] = channels;
        Upscale {
            tokens,
            hyper,
            channels,
            first: Arc::new(as_matrix(values[0], values[1], c, m)),
            norm: Arc::new((values[2][..m].to_vec(), values[3][..m].to_vec())),
            epsilon,
            second: Arc::new(as_matrix(values[4], values[5], m, o)),
        }
    }

    /// Input row `i` of one image: `x` its `C x H x W` values (or `H·W x C` tokens), `out` its
    /// `O x 4H x 4W` planes, or with `hyper` (`T x O`) its `T x 4H x 4W` masks.
    ///
    /// # Safety
    /// `out` points at the image's writable output planes, rows `4i..4i+4` of which no other
    /// task writes.
    unsafe fn row(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        i: usize,
        hyper: Option<&[f32]>,
        out: *mut f32,
    ) {
        let [c, m, o] = self.channels;
        let plane = h * w;
        // Pixels x channels: the tokens as they are, or gathered from the planes.
        let gathered;
        let a = if self.tokens {
            &x[i * w * c..(i + 1) * w * c]
        } else {
            let mut a = vec![0f32; w * c];
            for ci in 0..c {
                let src = &x[ci * plane + i * w..ci * plane + (i + 1) * w];
                for (j, &v) in src.iter().enumerate() {
                    a[j * c + ci] = v;
                }
            }
            gathered = a;
            &gathered[..]
        };
        // First convolution: row j holds output pixels (a, b) of m channels each, i.e. `4·w`
        // rows of m channels.
        let mut mid = vec![0f32; w * 4 * m];
        gemm(a, w, &self.first, false, &mut mid);
        let (weight, bias) = &*self.norm;
        norm_gelu(&mut mid, weight, bias, self.epsilon);
        // Second convolution with its GELU: row (j, a, b) holds final pixels (a2, b2) of o
        // channels each.
        let mut last = vec![0f32; w * 4 * 4 * o];
        gemm(&mid, 4 * w, &self.second, true, &mut last);
        // With the hypernetwork, each pixel's o values become its t mask values.
        let (last, o) = match hyper {
            Some(hyper) => {
                let t = hyper.len() / o;
                let mut masks = vec![0f32; w * 16 * t];
                hyper_products(&last, hyper, o, &mut masks);
                (masks, t)
            }
            None => (last, o),
        };
        // Output pixel (4i + 2·ra + a2, 4j + 2·rb + b2) of channel oi is
        // last[((j·4 + ra·2 + rb)·4 + a2·2 + b2)·o + oi]: each output row is written whole,
        // left to right.
        let width = 4 * w;
        for oi in 0..o {
            for (ra, a2) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let y = 4 * i + 2 * ra + a2;
                // SAFETY: row y of plane oi is inside the image's planes, on rows of `i`.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out.add((oi * 4 * h + y) * width), width)
                };
                for (xo, d) in dst.iter_mut().enumerate() {
                    let (j, rb, b2) = (xo / 4, (xo / 2) % 2, xo % 2);
                    *d = last[((j * 4 + ra * 2 + rb) * 4 + a2 * 2 + b2) * o + oi];
                }
            }
        }
    }
}

super::vector_math::dispatch_isa!(
    /// `masks[p·t + k] = Σ_c hyper[k·o + c] · pixels[p·o + c]` for every pixel p (`o` values
    /// each) and each of the `t` rows of `hyper`.
    fn hyper_products(pixels: &[f32], hyper: &[f32], o: usize, masks: &mut [f32]) => hyper_products_body
);

#[inline(always)]
fn hyper_products_body<F: MulAdd>(pixels: &[f32], hyper: &[f32], o: usize, masks: &mut [f32]) {
    const LANES: usize = 16;
    let t = hyper.len() / o;
    let whole = o / LANES * LANES;
    for (px, out) in pixels.chunks_exact(o).zip(masks.chunks_exact_mut(t)) {
        for (row, m) in hyper.chunks_exact(o).zip(out.iter_mut()) {
            let mut acc = [0f32; LANES];
            for (x, y) in px[..whole]
                .chunks_exact(LANES)
                .zip(row[..whole].chunks_exact(LANES))
            {
                for l in 0..LANES {
                    acc[l] = F::mul_add(x[l], y[l], acc[l]);
                }
            }
            let mut width = LANES / 2;
            while width > 0 {
                for l in 0..width {
                    acc[l] += acc[l + width];
                }
                width /= 2;
            }
            let mut sum = acc[0];
            for (x, y) in px[whole..].iter().zip(&row[whole..]) {
                sum = F::mul_add(*x, *y, sum);
            }
            *m = sum;
        }
    }
}

super::vector_math::dispatch_isa!(
    /// LayerNorm over each pixel's channels (`weight.len()` values), then GELU, in place.
    fn norm_gelu(values: &mut [f32], weight: &[f32], bias: &[f32], epsilon: f32) => norm_gelu_body
);

#[inline(always)]
fn norm_gelu_body<F: MulAdd>(values: &mut [f32], weight: &[f32], bias: &[f32], epsilon: f32) {
    let m = weight.len();
    for px in values.chunks_exact_mut(m) {
        let mean = px.iter().sum::<f32>() / m as f32;
        let variance = px.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / m as f32;
        let denominator = (variance + epsilon).sqrt();
        for ((v, &g), &b) in px.iter_mut().zip(weight).zip(bias) {
            *v = gelu::<F>((*v - mean) / denominator * g + b);
        }
    }
}

impl PartialEq for Upscale {
    fn eq(&self, other: &Self) -> bool {
        self.channels == other.channels
            && self.tokens == other.tokens
            && self.hyper == other.hyper
            && self.epsilon == other.epsilon
            && self.first == other.first
            && self.norm == other.norm
            && self.second == other.second
    }
}

impl Eq for Upscale {}

impl std::hash::Hash for Upscale {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.channels.hash(state);
        self.tokens.hash(state);
        self.hyper.hash(state);
        self.epsilon.to_bits().hash(state);
    }
}

impl Op for Upscale {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let [c, m, o] = self.channels;
        Ok(vec![format!(
            "{c} → {m} → {o} channels, 4x the size; input {}{}",
            if self.tokens { "tokens" } else { "NCHW" },
            if self.hyper {
                ", times the hypernetwork"
            } else {
                ""
            }
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for Upscale {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = &inputs[0].shape;
        let channels = if self.hyper {
            let hyper = &inputs[1].shape;
            ensure!(
                hyper.len() == 3 && hyper[2] == self.channels[2].to_dim(),
                "SamrtUpscale: hypernetwork [N, T, {}] expected, got {hyper:?}",
                self.channels[2]
            );
            hyper[1].clone()
        } else {
            self.channels[2].to_dim()
        };
        let (h, w) = if self.tokens {
            ensure!(
                x.len() == 3 && x[2] == self.channels[0].to_dim(),
                "SamrtUpscale: tokens of {} channels expected, got {x:?}",
                self.channels[0]
            );
            let side = grid_side(x[1].to_usize()?)?.to_dim();
            (side.clone(), side)
        } else {
            ensure!(
                x.len() == 4 && x[1] == self.channels[0].to_dim(),
                "SamrtUpscale: NCHW input of {} channels expected, got {x:?}",
                self.channels[0]
            );
            (x[2].clone(), x[3].clone())
        };
        let shape = tvec![x[0].clone(), channels, h * 4, w * 4];
        Ok(tvec!(inputs[0].datum_type.fact(shape)))
    }

    as_op!();
}

/// A raw output pointer shared by tasks that write disjoint rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the output tensor.
        unsafe { self.0.add(offset) }
    }
}

impl EvalOp for Upscale {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let shape = x.shape();
        let [c, _, o] = self.channels;
        let (n, h, w) = if self.tokens {
            ensure!(
                shape.len() == 3 && shape[2] == c,
                "SamrtUpscale: tokens of {c} channels expected, got {shape:?}"
            );
            let side = grid_side(shape[1])?;
            (shape[0], side, side)
        } else {
            ensure!(
                shape.len() == 4 && shape[1] == c,
                "SamrtUpscale: NCHW input of {c} channels expected, got {shape:?}"
            );
            (shape[0], shape[2], shape[3])
        };
        let view = x.try_as_plain_ram()?;
        let data = view.as_slice::<f32>()?;
        let hyper_view = match self.hyper {
            true => {
                let hyper = &inputs[1];
                ensure!(
                    hyper.rank() == 3 && hyper.shape()[0] == n && hyper.shape()[2] == o,
                    "SamrtUpscale: hypernetwork [{n}, T, {o}] expected, got {:?}",
                    hyper.shape()
                );
                Some(hyper.try_as_plain_ram()?)
            }
            false => None,
        };
        let hyper_data = hyper_view
            .as_ref()
            .map(|v| v.as_slice::<f32>())
            .transpose()?;
        let channels = hyper_data.map_or(o, |hyper| hyper.len() / n / o);
        // SAFETY: f32 has no invalid bit patterns, and every output value is written.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&[n, channels, 4 * h, 4 * w])? };
        let units = n * h;
        if units * w > 0 {
            let mut out_view = output.try_as_plain_ram_mut()?;
            let out = OutPtr(out_view.as_slice_mut::<f32>()?.as_mut_ptr());
            let task = |unit: usize| {
                let (image, i) = (unit / h, unit % h);
                let x = &data[image * c * h * w..(image + 1) * c * h * w];
                let hyper = hyper_data
                    .map(|hyper| &hyper[image * channels * o..(image + 1) * channels * o]);
                // SAFETY: each unit writes rows 4i..4i+4 of its own image's planes.
                unsafe { self.row(x, (h, w), i, hyper, out.at(image * channels * 16 * h * w)) };
            };
            super::threads::for_each_unit(units, || (), |_, unit| task(unit));
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 2_654_435_761usize) % 10_007) as f32 / 5000.0 - 1.0)
            .collect()
    }

    /// The chain as written: two transposed convolutions, the channel norm, the GELUs, each a
    /// loop over its definition (f64 sums).
    fn reference(
        x: &[f32],
        [n, c, h, w]: [usize; 4],
        m: usize,
        o: usize,
        p: &[Vec<f32>],
    ) -> Vec<f32> {
        let conv_t =
            |x: &[f64], (c, h, w): (usize, usize, usize), wt: &[f32], b: &[f32], o: usize| {
                let mut y = vec![0f64; o * 4 * h * w];
                for oi in 0..o {
                    for yy in 0..2 * h {
                        for xx in 0..2 * w {
                            let (i, a, j, bb) = (yy / 2, yy % 2, xx / 2, xx % 2);
                            let mut s = f64::from(b[oi]);
                            for ci in 0..c {
                                s += x[(ci * h + i) * w + j]
                                    * f64::from(wt[((ci * o + oi) * 2 + a) * 2 + bb]);
                            }
                            y[(oi * 2 * h + yy) * 2 * w + xx] = s;
                        }
                    }
                }
                y
            };
        let gelu = |v: f64| 0.5 * v * (1.0 + libm_erf(v / std::f64::consts::SQRT_2));
        let mut out = vec![];
        for image in 0..n {
            let xi: Vec<f64> = x[image * c * h * w..(image + 1) * c * h * w]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let mut y = conv_t(&xi, (c, h, w), &p[0], &p[1], m);
            let plane = 4 * h * w;
            for px in 0..plane {
                let mean = (0..m).map(|k| y[k * plane + px]).sum::<f64>() / m as f64;
                let var = (0..m)
                    .map(|k| (y[k * plane + px] - mean).powi(2))
                    .sum::<f64>()
                    / m as f64;
                for k in 0..m {
                    let v = (y[k * plane + px] - mean) / (var + 1e-6).sqrt() * f64::from(p[2][k])
                        + f64::from(p[3][k]);
                    y[k * plane + px] = gelu(v);
                }
            }
            let z = conv_t(&y, (m, 2 * h, 2 * w), &p[4], &p[5], o);
            out.extend(z.into_iter().map(|v| gelu(v) as f32));
        }
        out
    }

    /// erf by its series and continued fraction is more than the test needs: Abramowitz and
    /// Stegun 7.1.26 has 1.5e-7 absolute error.
    fn libm_erf(x: f64) -> f64 {
        let t = 1.0 / (1.0 + 0.3275911 * x.abs());
        let y = 1.0
            - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
                + 0.254829592)
                * t
                * (-x * x).exp();
        y.copysign(x)
    }

    /// Each form of the operator (NCHW or token input, planes or hypernetwork masks out) against
    /// the chain's definition, at one and two threads.
    #[test]
    fn upscaling_matches_its_definition_at_any_thread_count() {
        let (n, c, h, w, m, o, t) = (2, 20, 3, 3, 8, 20, 3);
        let x = values(n * c * h * w, 1);
        let p = vec![
            values(c * m * 4, 2).iter().map(|v| v * 0.3).collect(),
            values(m, 3),
            values(m, 4).iter().map(|v| v + 1.5).collect(),
            values(m, 5),
            values(m * o * 4, 6)
                .iter()
                .map(|v| v * 0.5)
                .collect::<Vec<f32>>(),
            values(o, 7),
        ];
        let planes = reference(&x, [n, c, h, w], m, o, &p);
        let hyper = values(n * t * o, 8);
        let plane = 16 * h * w;
        let masks: Vec<f32> = (0..n * t * plane)
            .map(|i| {
                let (image, k, px) = (i / (t * plane), (i / plane) % t, i % plane);
                (0..o)
                    .map(|oi| {
                        f64::from(hyper[(image * t + k) * o + oi])
                            * f64::from(planes[(image * o + oi) * plane + px])
                    })
                    .sum::<f64>() as f32
            })
            .collect();
        let tokens: Vec<f32> = (0..n * h * w * c)
            .map(|i| {
                let (image, px, ci) = (i / (h * w * c), (i / c) % (h * w), i % c);
                x[(image * c + ci) * h * w + px]
            })
            .collect();
        let nchw = Tensor::from_shape(&[n, c, h, w], &x).unwrap();
        let tokens = Tensor::from_shape(&[n, h * w, c], &tokens).unwrap();
        let hyper = Tensor::from_shape(&[n, t, o], &hyper).unwrap();
        for (as_tokens, with_hyper) in [(false, false), (true, false), (false, true), (true, true)]
        {
            let op = Upscale::new(
                [c, m, o],
                [&p[0], &p[1], &p[2], &p[3], &p[4], &p[5]],
                1e-6,
                as_tokens,
                with_hyper,
            );
            let mut inputs = tvec![if as_tokens {
                tokens.clone()
            } else {
                nchw.clone()
            }
            .into_tvalue()];
            if with_hyper {
                inputs.push(hyper.clone().into_tvalue());
            }
            let want = if with_hyper { &masks } else { &planes };
            let got = crate::engine::fast_ops::tests::run(op.clone(), inputs.clone());
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "tokens {as_tokens}, hyper {with_hyper}: {g} vs {w}"
                );
            }
            let pooled = tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
                tract_onnx::tract_core::tract_linalg::multithread::Executor::multithread(2),
                || crate::engine::fast_ops::tests::run(op, inputs),
            );
            assert_eq!(got, pooled, "2 threads differ from 1");
        }
    }
}
