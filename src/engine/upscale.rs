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
use tract_onnx::tract_core::tract_linalg::multithread::{current_tract_executor, Executor};
use tract_onnx::tract_hir::internal::*;

use super::linear::{gemm, panel_width, PackedWeights};
use super::vector_math::{gelu, Fused};

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
    for (i, node) in nodes.iter().enumerate() {
        for input in &node.input {
            consumers.entry(input).or_default().push(i);
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
        let chain = [first_ix, norm_ix, gelu1_ix, second_ix, gelu2_ix];
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
        let node = NodeProto {
            name: format!("{}.samrt_upscale", first.name),
            op_type: OP_TYPE.into(),
            domain: DOMAIN.into(),
            input: vec![
                first.input[0].clone(),
                first.input[1].clone(),
                first.input[2].clone(),
                norm.input[1].clone(),
                norm.input[2].clone(),
                second.input[1].clone(),
                second.input[2].clone(),
            ],
            output: nodes[gelu2_ix].output.clone(),
            attribute,
            ..Default::default()
        };
        removed.extend(chain);
        fused.insert(gelu2_ix, node);
    }
    let count = fused.len();
    super::layer_norm::splice(graph, fused, &removed);
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
    Ok((expand(UpscaleExpansion { epsilon }), vec![]))
}

#[derive(Debug, Clone)]
struct UpscaleExpansion {
    epsilon: f32,
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
        check_input_arity(inputs, 7)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].rank, 4)?;
        s.equals(&outputs[0].rank, 4)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[0].shape[1], &inputs[5].shape[1])?;
        s.given(&inputs[0].shape[2], move |s, h| {
            s.equals(&outputs[0].shape[2], h * 4)
        })?;
        s.given(&inputs[0].shape[3], move |s, w| {
            s.equals(&outputs[0].shape[3], w * 4)
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let mut constants = vec![];
        for &input in &inputs[1..] {
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
        );
        model.wire_node(prefix, op, &inputs[..1])
    }
}

// ---------------------------------------------------------------------------------------------
// The typed operator.

/// The fused upscaling: `x [N, C, H, W]` → `[N, O, 4H, 4W]`.
#[derive(Debug, Clone)]
pub struct Upscale {
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
    fn new(channels: [usize; 3], values: [&[f32]; 6], epsilon: f32) -> Self {
        let [c, m, o] = channels;
        Upscale {
            channels,
            first: Arc::new(as_matrix(values[0], values[1], c, m)),
            norm: Arc::new((values[2][..m].to_vec(), values[3][..m].to_vec())),
            epsilon,
            second: Arc::new(as_matrix(values[4], values[5], m, o)),
        }
    }

    /// Input row `i` of one image: `x` its `C x H x W` values, `out` its `O x 4H x 4W` planes.
    ///
    /// # Safety
    /// `out` points at the image's `O x 4H x 4W` writable values, rows `4i..4i+4` of which no
    /// other task writes.
    unsafe fn row(&self, x: &[f32], (h, w): (usize, usize), i: usize, out: *mut f32) {
        let [c, m, o] = self.channels;
        let plane = h * w;
        // Gather: pixels x channels.
        let mut a = vec![0f32; w * c];
        for ci in 0..c {
            let src = &x[ci * plane + i * w..ci * plane + (i + 1) * w];
            for (j, &v) in src.iter().enumerate() {
                a[j * c + ci] = v;
            }
        }
        // First convolution: row j holds output pixels (a, b) of m channels each, i.e. `4·w`
        // rows of m channels.
        let mut mid = vec![0f32; w * 4 * m];
        gemm(&a, w, &self.first, false, &mut mid);
        let (weight, bias) = &*self.norm;
        for px in mid.chunks_exact_mut(m) {
            let mean = px.iter().sum::<f32>() / m as f32;
            let variance = px.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / m as f32;
            let denominator = (variance + self.epsilon).sqrt();
            for ((v, &g), &b) in px.iter_mut().zip(weight).zip(bias) {
                *v = gelu::<Fused>((*v - mean) / denominator * g + b);
            }
        }
        // Second convolution with its GELU: row (j, a, b) holds final pixels (a2, b2) of o
        // channels each.
        let mut last = vec![0f32; w * 4 * 4 * o];
        gemm(&mid, 4 * w, &self.second, true, &mut last);
        let width = 4 * w;
        for j in 0..w {
            for ab in 0..4 {
                let (ra, rb) = (ab / 2, ab % 2);
                let row = &last[(j * 4 + ab) * 4 * o..(j * 4 + ab + 1) * 4 * o];
                for ab2 in 0..4 {
                    let (a2, b2) = (ab2 / 2, ab2 % 2);
                    let y = 4 * i + 2 * ra + a2;
                    let xo = 4 * j + 2 * rb + b2;
                    for (oi, &v) in row[ab2 * o..(ab2 + 1) * o].iter().enumerate() {
                        // SAFETY: (oi, y, xo) is inside the image's planes, on rows of `i`.
                        unsafe { *out.add((oi * 4 * h + y) * width + xo) = v };
                    }
                }
            }
        }
    }
}

impl PartialEq for Upscale {
    fn eq(&self, other: &Self) -> bool {
        self.channels == other.channels
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
        self.epsilon.to_bits().hash(state);
    }
}

impl Op for Upscale {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let [c, m, o] = self.channels;
        Ok(vec![format!("{c} → {m} → {o} channels, 4x the size")])
    }

    op_as_typed_op!();
}

impl TypedOp for Upscale {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = &inputs[0].shape;
        ensure!(
            x.len() == 4 && x[1] == self.channels[0].to_dim(),
            "SamrtUpscale: NCHW input of {} channels expected, got {x:?}",
            self.channels[0]
        );
        let shape = tvec![
            x[0].clone(),
            self.channels[2].to_dim(),
            x[2].clone() * 4,
            x[3].clone() * 4
        ];
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
        let x = args_1!(inputs);
        let shape = x.shape();
        let [c, _, o] = self.channels;
        ensure!(
            shape.len() == 4 && shape[1] == c,
            "SamrtUpscale: NCHW input of {c} channels expected, got {shape:?}"
        );
        let (n, h, w) = (shape[0], shape[2], shape[3]);
        let view = x.try_as_plain_ram()?;
        let data = view.as_slice::<f32>()?;
        // SAFETY: f32 has no invalid bit patterns, and every output value is written.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&[n, o, 4 * h, 4 * w])? };
        let units = n * h;
        if units * w > 0 {
            let mut out_view = output.try_as_plain_ram_mut()?;
            let out = OutPtr(out_view.as_slice_mut::<f32>()?.as_mut_ptr());
            let task = |unit: usize| {
                let (image, i) = (unit / h, unit % h);
                let x = &data[image * c * h * w..(image + 1) * c * h * w];
                // SAFETY: each unit writes rows 4i..4i+4 of its own image's planes.
                unsafe { self.row(x, (h, w), i, out.at(image * o * 16 * h * w)) };
            };
            match current_tract_executor() {
                Executor::MultiThread(pool) if pool.current_num_threads() > 1 && units > 1 => {
                    use rayon::prelude::*;
                    pool.install(|| (0..units).into_par_iter().for_each(task))
                }
                _ => (0..units).for_each(task),
            }
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

    #[test]
    fn upscaling_matches_its_definition_at_any_thread_count() {
        let (n, c, h, w, m, o) = (2, 20, 3, 5, 8, 4);
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
        let want = reference(&x, [n, c, h, w], m, o, &p);
        let op = Upscale::new([c, m, o], [&p[0], &p[1], &p[2], &p[3], &p[4], &p[5]], 1e-6);
        let input = Tensor::from_shape(&[n, c, h, w], &x).unwrap();
        let got =
            crate::engine::fast_ops::tests::run(op.clone(), tvec![input.clone().into_tvalue()]);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
        let pooled = tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
            tract_onnx::tract_core::tract_linalg::multithread::Executor::multithread(2),
            || crate::engine::fast_ops::tests::run(op, tvec![input.into_tvalue()]),
        );
        assert_eq!(got, pooled, "2 threads differ from 1");
    }
}
