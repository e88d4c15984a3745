//! int8 linear layers, `scale · (x_q − x_zp) · W_q + b` with constant int8 weights (and the GELU
//! after them), as a samrt operator on CPUs with AVX-512 VNNI.
//!
//! An int8 encoder's linear layers are tract's slowest part of it: onnxruntime's
//! `quantize_dynamic` writes each as `MatMulInteger` → `Cast` → `Mul` (the scales) → `Add` (the
//! bias), and tract runs them as an int8 product on packed activations, a zero-point sum over
//! every row (`Reduce<Sum>`), an int32 tensor, a single-threaded cast of it to f32 and two
//! element-wise passes: on the full-size ViT-B encoder slower than samrt's f32 linear kernel
//! ([`super::linear`]). Here the weights are packed once, at load, into panels of 32 columns in
//! the `vpdpbusd` layout (four consecutive k of a column in each 32-bit lane) with their column
//! sums; each 6-row x 32-column tile of the output is twelve AVX-512 accumulators of exact int32
//! products over the whole of k, fed by two weight loads and six 4-byte broadcasts of the u8
//! activations per four k, read in place. The zero point comes off as `x_zp · Σₖ W[k, j]`, then
//! the tile is converted to f32, multiplied by the scale and the bias added, each step rounded as
//! tract's `Cast`, `Mul` and `Add` round it: the same bits as tract's chain (tested). The GELU
//! that follows fc1 is applied to each block while it is in cache. Rows are split over tract's
//! thread pool.
//!
//! [`fuse`] rewrites the `quantize_dynamic` chain before tract parses the graph, where the
//! weights' zero point is 0 (onnxruntime's symmetric int8 weights) and k is a multiple of 4, and
//! only where the VNNI kernel runs; [`fuse_qdq`] does the same for static `QuantizeLinear` →
//! `DequantizeLinear` → `MatMul` graphs with per-channel weights (samrt's own int8,
//! `models/tools/export_sam.py --quantize int8-static`); where VNNI is missing (the boards), it
//! rewrites those into tract's `MatMulInteger`, which tract runs on its int8 kernels. The
//! plain-arithmetic path of the operator computes the same on any CPU, for the tests.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::threads::par_chunks_mut;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, attribute_proto::AttributeType, AttributeProto, NodeProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use super::linear::{bias_add, gelu_after, gelu_attribute, output_shape_rule};
use super::onnx_graph::GraphIndex;
#[cfg(target_arch = "x86_64")]
use super::vector_math::Fused;
use super::vector_math::{gelu, Baseline, MulAdd};

/// The ONNX operator type of a fused int8 linear layer (samrt's domain).
pub const OP_TYPE: &str = "SamrtLinearInt8";
const DOMAIN: &str = "ai.samrt";

/// Rows of a register tile.
const TILE_ROWS: usize = 6;
/// Columns of a weight panel (two AVX-512 registers of int32).
const WIDTH: usize = 32;
/// Rows of one block (its activations and one weight panel stay in L2), the unit of threading.
const BLOCK_ROWS: usize = 96;

/// Whether this CPU runs the VNNI kernel (and so whether [`fuse`] rewrites anything).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

// ---------------------------------------------------------------------------------------------
// The ONNX rewrites.

/// The int8 values of an initializer (raw or typed data).
fn int8_values(t: &pb::TensorProto) -> Option<Vec<i8>> {
    if t.data_type != pb::tensor_proto::DataType::Int8 as i32 {
        return None;
    }
    let len = t.dims.iter().product::<i64>() as usize;
    let values: Vec<i8> = if !t.raw_data.is_empty() {
        t.raw_data.iter().map(|&b| b as i8).collect()
    } else {
        t.int32_data.iter().map(|&v| v as i8).collect()
    };
    (values.len() == len).then_some(values)
}

/// Whether `name` is an int8 initializer of zeros.
fn zero_int8(index: &GraphIndex, name: &str) -> bool {
    index
        .initializers
        .get(name)
        .and_then(|t| int8_values(t))
        .is_some_and(|v| v.iter().all(|&z| z == 0))
}

/// A 2-d int8 initializer `[k, n]` with k a multiple of 4.
fn int8_weights<'a>(index: &GraphIndex<'a>, name: &str) -> Option<&'a pb::TensorProto> {
    index.initializers.get(name).copied().filter(|t| {
        t.data_type == pb::tensor_proto::DataType::Int8 as i32
            && t.dims.len() == 2
            && t.dims[0] % 4 == 0
    })
}

/// The node `SamrtLinearInt8(x_q, W_q, x_zp, scale, b)` in place of a chain ending at `add_ix`,
/// which takes in the GELU that the `Add` feeds alone.
fn linear_node(
    index: &GraphIndex,
    name: &str,
    inputs: [&str; 5],
    add_ix: usize,
    removed: &mut HashSet<usize>,
) -> (usize, NodeProto) {
    let (gelu, output) = gelu_after(index, add_ix);
    removed.insert(add_ix);
    removed.extend(gelu);
    let node = NodeProto {
        name: format!("{name}.samrt_linear_int8"),
        op_type: OP_TYPE.into(),
        domain: DOMAIN.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        attribute: vec![gelu_attribute(gelu.is_some())],
        ..Default::default()
    };
    // In place of the chain's last node, where its inputs exist.
    (gelu.unwrap_or(add_ix), node)
}

/// Replaces onnxruntime's dynamic int8 linear layer, `MatMulInteger(x_q, W_q, x_zp, 0)` →
/// `Cast(float)` → `Mul(·, scale)` → `Add(·, b)` (and the `SamrtGelu` the `Add` feeds alone), with
/// `W_q` a 2-d int8 initializer and `b` a 1-d float one, by one `SamrtLinearInt8` node; returns
/// how many. Run after [`super::depthwise::fuse`] (which makes the GELUs), only when
/// [`available`].
pub fn fuse(graph: &mut pb::GraphProto) -> usize {
    let index = GraphIndex::new(graph);
    let mut removed: HashSet<usize> = HashSet::new();
    let mut fused: HashMap<usize, NodeProto> = HashMap::new();
    for (mm_ix, mm) in index.nodes.iter().enumerate() {
        if mm.op_type != "MatMulInteger" || mm.input.len() != 4 {
            continue;
        }
        let Some(weight) = int8_weights(&index, &mm.input[1]) else {
            continue;
        };
        if mm.input[2].is_empty() || !zero_int8(&index, &mm.input[3]) {
            continue;
        }
        let Some(cast_ix) = index.single_consumer(&mm.output[0], "Cast") else {
            continue;
        };
        let cast = &index.nodes[cast_ix];
        let to_float = cast
            .attribute
            .iter()
            .any(|a| a.name == "to" && a.i == pb::tensor_proto::DataType::Float as i64);
        let Some(mul_ix) = index
            .single_consumer(&cast.output[0], "Mul")
            .filter(|_| to_float)
        else {
            continue;
        };
        let scale = match index.nodes[mul_ix].input.as_slice() {
            [a, b] if *a == cast.output[0] => b,
            [a, b] if *b == cast.output[0] => a,
            _ => continue,
        };
        let Some((add_ix, bias)) = bias_add(&index, &index.nodes[mul_ix].output[0], weight.dims[1])
        else {
            continue;
        };
        let inputs = [
            mm.input[0].as_str(),
            mm.input[1].as_str(),
            mm.input[2].as_str(),
            scale.as_str(),
            bias,
        ];
        let (at, node) = linear_node(&index, &mm.name, inputs, add_ix, &mut removed);
        removed.extend([mm_ix, cast_ix, mul_ix]);
        fused.insert(at, node);
    }
    let count = fused.len();
    super::layer_norm::splice(graph, fused, &removed);
    count
}

/// A one-element initializer of type `data_type`.
fn scalar_initializer(
    index: &GraphIndex,
    name: &str,
    data_type: pb::tensor_proto::DataType,
) -> bool {
    index
        .initializers
        .get(name)
        .is_some_and(|t| t.data_type == data_type as i32 && t.dims.iter().product::<i64>() == 1)
}

/// Replaces the static QDQ linear layer, `DequantizeLinear(x_q, x_scale, x_zp)` (one scale, u8)
/// and `DequantizeLinear(W_q, w_scale, 0)` (int8 `[k, n]`, one scale or one per column) →
/// `MatMul` → `Add(·, b)` (and the `SamrtGelu` the `Add` feeds alone), with `vnni` by one
/// `SamrtLinearInt8` node on the same `x_q` and the scales' product (a `Mul` of constants, folded
/// at load), without it by `MatMulInteger(x_q, W_q, x_zp)` → `Cast` → `Mul(·, x_scale · w_scale)`
/// before the `Add`: tract's int8 matrix product (its dot-product kernels on Cortex-A76/A78)
/// instead of the float one it would run on dequantized values. The `QuantizeLinear` that makes
/// `x_q` (one constant scale, u8) becomes samrt's threaded [`super::quantize::STATIC_OP`].
/// Returns how many linear layers. Run after [`super::depthwise::fuse`].
pub fn fuse_qdq(graph: &mut pb::GraphProto, vnni: bool) -> usize {
    use pb::tensor_proto::DataType;
    let index = GraphIndex::new(graph);
    let mut removed: HashSet<usize> = HashSet::new();
    let mut fused: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut layers = 0;
    for (mm_ix, mm) in index.nodes.iter().enumerate() {
        if mm.op_type != "MatMul" || mm.input.len() != 2 {
            continue;
        }
        let (Some(dq_x), Some(dq_w)) = (
            index.producer_of(&mm.input[0], "DequantizeLinear"),
            index.producer_of(&mm.input[1], "DequantizeLinear"),
        ) else {
            continue;
        };
        let (x, w) = (&index.nodes[dq_x], &index.nodes[dq_w]);
        if x.input.len() != 3
            || w.input.len() != 3
            || !scalar_initializer(&index, &x.input[1], DataType::Float)
            || !scalar_initializer(&index, &x.input[2], DataType::Uint8)
            || !zero_int8(&index, &w.input[2])
        {
            continue;
        }
        let Some(weight) = int8_weights(&index, &w.input[0]) else {
            continue;
        };
        let n = weight.dims[1];
        let per_column = index
            .initializers
            .get(w.input[1].as_str())
            .is_some_and(|t| {
                let axis = w
                    .attribute
                    .iter()
                    .find(|a| a.name == "axis")
                    .map_or(1, |a| a.i);
                t.data_type == DataType::Float as i32
                    && ((t.dims.iter().product::<i64>() == 1)
                        || (t.dims == [n] && (axis == 1 || axis == -1)))
            });
        if !per_column {
            continue;
        }
        let Some((add_ix, bias)) = bias_add(&index, &mm.output[0], n) else {
            continue;
        };
        let scale = format!("{}.samrt_int8_scale", mm.name);
        let product = NodeProto {
            name: scale.clone(),
            op_type: "Mul".into(),
            input: vec![x.input[1].clone(), w.input[1].clone()],
            output: vec![scale.clone()],
            ..Default::default()
        };
        let (at, chain) = if vnni {
            let inputs = [
                x.input[0].as_str(),
                w.input[0].as_str(),
                x.input[2].as_str(),
                scale.as_str(),
                bias,
            ];
            let (at, node) = linear_node(&index, &mm.name, inputs, add_ix, &mut removed);
            (at, vec![product, node])
        } else {
            let chain = integer_chain(mm, product, &x.input[0], &w.input[0], &x.input[2]);
            (mm_ix, chain)
        };
        removed.insert(mm_ix);
        // The activation's quantization as samrt's operator (tract's runs on one thread).
        if let Some(q_ix) = index.producer_of(&x.input[0], "QuantizeLinear") {
            let q = &index.nodes[q_ix];
            if q.input.len() == 3
                && scalar_initializer(&index, &q.input[1], DataType::Float)
                && scalar_initializer(&index, &q.input[2], DataType::Uint8)
            {
                let mut ours = q.clone();
                ours.op_type = super::quantize::STATIC_OP.into();
                ours.domain = DOMAIN.into();
                ours.attribute.clear();
                fused.insert(q_ix, vec![ours]);
            }
        }
        for dq in [dq_x, dq_w] {
            if index.single_use(&index.nodes[dq].output[0]) {
                removed.insert(dq);
            }
        }
        fused.insert(at, chain);
        layers += 1;
    }
    super::layer_norm::splice_many(graph, fused, &removed);
    layers
}

/// `MatMulInteger(x_q, W_q, x_zp)` → `Cast(float)` → `Mul(·, scale)` into `mm`'s output, after
/// the node `product` that makes the scale.
fn integer_chain(
    mm: &NodeProto,
    product: NodeProto,
    xq: &str,
    wq: &str,
    xzp: &str,
) -> Vec<NodeProto> {
    let value = |suffix: &str| format!("{}.samrt_{suffix}", mm.name);
    let node = |op: &str, inputs: Vec<String>, output: String| NodeProto {
        name: output.clone(),
        op_type: op.into(),
        input: inputs,
        output: vec![output],
        ..Default::default()
    };
    let mut cast = node("Cast", vec![value("int32")], value("float"));
    cast.attribute.push(AttributeProto {
        name: "to".into(),
        r#type: AttributeType::Int as i32,
        i: pb::tensor_proto::DataType::Float as i64,
        ..Default::default()
    });
    let scale = product.output[0].clone();
    vec![
        product,
        node(
            "MatMulInteger",
            vec![xq.into(), wq.into(), xzp.into()],
            value("int32"),
        ),
        cast,
        node("Mul", vec![value("float"), scale], mm.output[0].clone()),
    ]
}

// ---------------------------------------------------------------------------------------------
// The operator, as tract's parser builds it.

/// Builds a `SamrtLinearInt8` node.
pub fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let gelu = node.get_attr_opt::<i64>("gelu")?.unwrap_or(0) != 0;
    Ok((expand(LinearInt8Expansion { gelu }), vec![]))
}

#[derive(Debug, Clone)]
struct LinearInt8Expansion {
    gelu: bool,
}

impl Expansion for LinearInt8Expansion {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 5)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        output_shape_rule(s, &inputs[0], &inputs[1], &outputs[0])
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let x = model.outlet_fact(inputs[0])?.clone();
        let w = model.outlet_fact(inputs[1])?.konst.clone();
        let b = model.outlet_fact(inputs[4])?.konst.clone();
        let (Some(w), Some(b)) = (w, b) else {
            bail!("SamrtLinearInt8: weights and bias must be constants");
        };
        ensure!(
            x.datum_type == u8::datum_type()
                && w.datum_type() == i8::datum_type()
                && b.datum_type() == f32::datum_type(),
            "SamrtLinearInt8: u8 activations, i8 weights and an f32 bias, not {:?}, {:?}, {:?}",
            x.datum_type,
            w.datum_type(),
            b.datum_type()
        );
        ensure!(
            w.rank() == 2 && w.shape()[0].is_multiple_of(4) && b.shape() == [w.shape()[1]],
            "SamrtLinearInt8: weights {:?} and bias {:?}",
            w.shape(),
            b.shape()
        );
        let (k, n) = (w.shape()[0], w.shape()[1]);
        let op = LinearInt8::new(
            w.try_as_plain_ram()?.as_slice::<i8>()?,
            b.try_as_plain_ram()?.as_slice::<f32>()?,
            k,
            n,
            self.gelu,
        );
        model.wire_node(prefix, op, &[inputs[0], inputs[2], inputs[3]])
    }
}

// ---------------------------------------------------------------------------------------------
// The typed operator.

/// `W` packed in panels of [`WIDTH`] columns for `vpdpbusd`: in panel `p`, group `g` of four
/// rows holds, column by column, `W[4g..4g+4, p·WIDTH + j]`; zero-padded past `n`.
#[derive(Debug, Clone, PartialEq)]
struct PackedInt8 {
    k: usize,
    n: usize,
    data: Vec<i8>,
    /// `Σₖ W[k, j]`, zero-padded to whole panels.
    column_sums: Vec<i32>,
    /// The bias, zero-padded to whole panels.
    bias: Vec<f32>,
}

impl PackedInt8 {
    fn new(weights: &[i8], bias: &[f32], k: usize, n: usize) -> Self {
        assert!(k.is_multiple_of(4) && weights.len() == k * n && bias.len() == n);
        let panels = n.div_ceil(WIDTH);
        let groups = k / 4;
        let mut data = vec![0i8; panels * groups * WIDTH * 4];
        let mut column_sums = vec![0i32; panels * WIDTH];
        for (kk, row) in weights.chunks_exact(n).enumerate() {
            let (g, t) = (kk / 4, kk % 4);
            for (col, &v) in row.iter().enumerate() {
                let (p, j) = (col / WIDTH, col % WIDTH);
                data[((p * groups + g) * WIDTH + j) * 4 + t] = v;
                column_sums[col] += v as i32;
            }
        }
        let mut padded = vec![0f32; panels * WIDTH];
        padded[..n].copy_from_slice(bias);
        PackedInt8 {
            k,
            n,
            data,
            column_sums,
            bias: padded,
        }
    }

    fn panel(&self, p: usize) -> &[i8] {
        let len = self.k * WIDTH;
        &self.data[p * len..(p + 1) * len]
    }
}

/// `y = scale · (x − x_zp) · W + b` over the last axis of u8 `x` (then GELU if `gelu`), for a
/// scalar u8 `x_zp` and a scalar or per-column f32 `scale` (run-time inputs), `W` packed at load.
#[derive(Debug, Clone)]
pub struct LinearInt8 {
    weights: Arc<PackedInt8>,
    gelu: bool,
}

impl PartialEq for LinearInt8 {
    fn eq(&self, other: &Self) -> bool {
        self.gelu == other.gelu && self.weights == other.weights
    }
}

impl Eq for LinearInt8 {}

impl std::hash::Hash for LinearInt8 {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.weights.k, self.weights.n, self.gelu).hash(state);
        self.weights
            .data
            .iter()
            .take(256)
            .for_each(|v| v.hash(state));
    }
}

impl LinearInt8 {
    /// `weights` row-major `[k, n]` (k a multiple of 4), `bias` `[n]`.
    fn new(weights: &[i8], bias: &[f32], k: usize, n: usize, gelu: bool) -> Self {
        LinearInt8 {
            weights: Arc::new(PackedInt8::new(weights, bias, k, n)),
            gelu,
        }
    }
}

impl Op for LinearInt8 {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "k: {}, n: {}, gelu: {}",
            self.weights.k, self.weights.n, self.gelu
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for LinearInt8 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        ensure!(
            shape.last() == Some(&self.weights.k.to_dim()),
            "SamrtLinearInt8: input {:?} for {} inputs per row",
            inputs[0].shape,
            self.weights.k
        );
        *shape.last_mut().unwrap() = self.weights.n.to_dim();
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

impl EvalOp for LinearInt8 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, zero_point, scale) = args_3!(inputs);
        let w = &*self.weights;
        let (k, n) = (w.k, w.n);
        ensure!(
            x.shape().last() == Some(&k),
            "SamrtLinearInt8: input {:?} for {k} inputs per row",
            x.shape()
        );
        let zero_point = zero_point.cast_to_scalar::<u8>()? as i32;
        let scale_view = scale.try_as_plain_ram()?;
        let scale = scale_view.as_slice::<f32>()?;
        let mut scales = vec![0f32; w.bias.len()];
        match scale.len() {
            1 => scales[..n].fill(scale[0]),
            len if len == n => scales[..n].copy_from_slice(scale),
            len => bail!("SamrtLinearInt8: {len} scales for {n} columns"),
        }
        let mut shape: TVec<usize> = x.shape().into();
        *shape.last_mut().unwrap() = n;
        let view = x.try_as_plain_ram()?;
        let a = view.as_slice::<u8>()?;
        let m = a.len().checked_div(k).unwrap_or(0);
        // SAFETY: f32 has no invalid bit patterns, and every row of the output is written.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        if m * n > 0 {
            let mut out_view = output.try_as_plain_ram_mut()?;
            let c = out_view.as_slice_mut::<f32>()?;
            let len = c.len();
            let epilogue = Epilogue {
                zero_point,
                scales: &scales,
                gelu: self.gelu,
            };
            // Whole rows per task (tract's split): a row's result does not depend on the split.
            par_chunks_mut(c, n, len * k.max(1) / 4, |first, rows| {
                let count = rows.len() / n;
                gemm(
                    &a[first * k..(first + count) * k],
                    count,
                    w,
                    &epilogue,
                    rows,
                );
                Ok(())
            })?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

// ---------------------------------------------------------------------------------------------
// The computation.

/// What each tile's int32 sums become: `((Σ − zp · Σₖ W) as f32) · scale + bias`.
struct Epilogue<'a> {
    zero_point: i32,
    /// Per column, padded to whole panels.
    scales: &'a [f32],
    gelu: bool,
}

/// `c[m x n]` from `a[m x k]` (u8, rows contiguous) and the packed weights.
fn gemm(a: &[u8], m: usize, w: &PackedInt8, e: &Epilogue, c: &mut [f32]) {
    assert!(a.len() >= m * w.k && c.len() >= m * w.n);
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX-512F, BW and VNNI (probed).
        return unsafe { gemm_vnni(a, m, w, e, c) };
    }
    gemm_body::<Generic, Baseline>(a, m, w, e, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn gemm_vnni(a: &[u8], m: usize, w: &PackedInt8, e: &Epilogue, c: &mut [f32]) {
    gemm_body::<VnniTile, Fused>(a, m, w, e, c)
}

#[inline(always)]
fn gemm_body<T: TileKernel, F: MulAdd>(
    a: &[u8],
    m: usize,
    w: &PackedInt8,
    e: &Epilogue,
    c: &mut [f32],
) {
    let (k, n) = (w.k, w.n);
    let panels = n.div_ceil(WIDTH);
    let mut tail_a = vec![0u8; TILE_ROWS * k];
    let mut tile_out = vec![0f32; TILE_ROWS * WIDTH];
    for block in (0..m).step_by(BLOCK_ROWS) {
        let block_end = (block + BLOCK_ROWS).min(m);
        for p in 0..panels {
            let panel = w.panel(p);
            let cols = WIDTH.min(n - p * WIDTH);
            let at = p * WIDTH;
            let tile = TileEpilogue {
                zero_point: e.zero_point,
                column_sums: &w.column_sums[at..at + WIDTH],
                scales: &e.scales[at..at + WIDTH],
                bias: &w.bias[at..at + WIDTH],
            };
            let mut row = block;
            while row < block_end {
                let rows = TILE_ROWS.min(block_end - row);
                let src = if rows == TILE_ROWS {
                    &a[row * k..(row + rows) * k]
                } else {
                    tail_a.fill(0);
                    tail_a[..rows * k].copy_from_slice(&a[row * k..(row + rows) * k]);
                    &tail_a[..]
                };
                if rows == TILE_ROWS && cols == WIDTH {
                    let dst = &mut c[row * n + at..];
                    assert!(dst.len() >= (TILE_ROWS - 1) * n + WIDTH);
                    // SAFETY: bounds asserted; `src` holds TILE_ROWS rows of k values.
                    unsafe { T::tile(src.as_ptr(), k, panel.as_ptr(), &tile, dst.as_mut_ptr(), n) };
                } else {
                    // SAFETY: as above, into the tile buffer of TILE_ROWS rows of WIDTH.
                    unsafe {
                        T::tile(
                            src.as_ptr(),
                            k,
                            panel.as_ptr(),
                            &tile,
                            tile_out.as_mut_ptr(),
                            WIDTH,
                        )
                    };
                    for r in 0..rows {
                        let dst = &mut c[(row + r) * n + at..(row + r) * n + at + cols];
                        dst.copy_from_slice(&tile_out[r * WIDTH..r * WIDTH + cols]);
                    }
                }
                row += rows;
            }
        }
        if e.gelu {
            for v in &mut c[block * n..block_end * n] {
                *v = gelu::<F>(*v);
            }
        }
    }
}

/// One panel's share of the [`Epilogue`]: [`WIDTH`] values each.
struct TileEpilogue<'a> {
    zero_point: i32,
    column_sums: &'a [i32],
    scales: &'a [f32],
    bias: &'a [f32],
}

/// A register tile kernel: `c[r][0..WIDTH]` for [`TILE_ROWS`] rows of `k` u8 activations against
/// one packed panel, through the [`TileEpilogue`].
trait TileKernel {
    /// # Safety
    /// `a` holds TILE_ROWS rows of `k` values, `b` one packed panel of `k` rows, `c`
    /// TILE_ROWS rows of `ldc` with WIDTH values.
    unsafe fn tile(a: *const u8, k: usize, b: *const i8, e: &TileEpilogue, c: *mut f32, ldc: usize);
}

/// The 6x32 tile in AVX-512 VNNI intrinsics: twelve int32 accumulators, two weight loads and
/// six broadcasts of four activations per four k.
#[cfg(target_arch = "x86_64")]
struct VnniTile;

#[cfg(target_arch = "x86_64")]
impl TileKernel for VnniTile {
    #[inline(always)]
    unsafe fn tile(
        a: *const u8,
        k: usize,
        b: *const i8,
        e: &TileEpilogue,
        c: *mut f32,
        ldc: usize,
    ) {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract; AVX-512F/BW/VNNI are enabled in the calling function.
        unsafe {
            let zero = _mm512_setzero_si512();
            let mut acc = [[zero; 2]; TILE_ROWS];
            for g in 0..k / 4 {
                let b0 = _mm512_loadu_si512(b.add(g * WIDTH * 4) as *const _);
                let b1 = _mm512_loadu_si512(b.add(g * WIDTH * 4 + 64) as *const _);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let four = (a.add(r * k + g * 4) as *const i32).read_unaligned();
                    let av = _mm512_set1_epi32(four);
                    acc[0] = _mm512_dpbusd_epi32(acc[0], av, b0);
                    acc[1] = _mm512_dpbusd_epi32(acc[1], av, b1);
                }
            }
            let zp = _mm512_set1_epi32(e.zero_point);
            let mut sums = [zero; 2];
            let mut scales = [_mm512_setzero_ps(); 2];
            let mut bias = [_mm512_setzero_ps(); 2];
            for h in 0..2 {
                let col = _mm512_loadu_si512(e.column_sums.as_ptr().add(h * 16) as *const _);
                sums[h] = _mm512_mullo_epi32(zp, col);
                scales[h] = _mm512_loadu_ps(e.scales.as_ptr().add(h * 16));
                bias[h] = _mm512_loadu_ps(e.bias.as_ptr().add(h * 16));
            }
            for (r, acc) in acc.iter().enumerate() {
                for h in 0..2 {
                    let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[h], sums[h]));
                    let v = _mm512_add_ps(_mm512_mul_ps(v, scales[h]), bias[h]);
                    _mm512_storeu_ps(c.add(r * ldc + h * 16), v);
                }
            }
        }
    }
}

/// The tile in plain arithmetic, for the tests on any CPU.
struct Generic;

impl TileKernel for Generic {
    #[inline(always)]
    unsafe fn tile(
        a: *const u8,
        k: usize,
        b: *const i8,
        e: &TileEpilogue,
        c: *mut f32,
        ldc: usize,
    ) {
        for r in 0..TILE_ROWS {
            for j in 0..WIDTH {
                let mut acc = 0i32;
                for kk in 0..k {
                    let (g, t) = (kk / 4, kk % 4);
                    // SAFETY: the caller's contract.
                    let (x, w) = unsafe {
                        (
                            *a.add(r * k + kk) as i32,
                            *b.add((g * WIDTH + j) * 4 + t) as i32,
                        )
                    };
                    acc += x * w;
                }
                let v = (acc - e.zero_point * e.column_sums[j]) as f32;
                // SAFETY: the caller's contract.
                unsafe { *c.add(r * ldc + j) = v * e.scales[j] + e.bias[j] };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fast_ops::tests::value_info;
    use tract_onnx::pb::tensor_proto::DataType;

    fn values(n: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((((i + seed) * 2_654_435_761usize) % 10_007) as f32 / 5000.0 - 1.0) * scale)
            .collect()
    }

    fn tensor(name: &str, dims: &[i64], data_type: DataType, raw: Vec<u8>) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: data_type as i32,
            raw_data: raw,
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            name: output.into(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    /// `quantize_dynamic`'s linear layer, as it writes it: `x` `[rows, k]` to `[rows, n]`.
    fn dynamic_model(k: usize, n: usize) -> pb::ModelProto {
        let w: Vec<u8> = values(k * n, 2, 127.0)
            .iter()
            .map(|&v| (v.round() as i8) as u8)
            .collect();
        let bias: Vec<u8> = values(n, 3, 1.0)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut nodes = vec![NodeProto {
            name: "q".into(),
            op_type: "DynamicQuantizeLinear".into(),
            input: vec!["x".into()],
            output: vec!["xq".into(), "xs".into(), "xzp".into()],
            ..Default::default()
        }];
        nodes.push(node("MatMulInteger", &["xq", "w", "xzp", "wzp"], "mm"));
        let mut cast = node("Cast", &["mm"], "mmf");
        cast.attribute.push(AttributeProto {
            name: "to".into(),
            r#type: AttributeType::Int as i32,
            i: DataType::Float as i64,
            ..Default::default()
        });
        nodes.push(cast);
        nodes.push(node("Mul", &["xs", "ws"], "s"));
        nodes.push(node("Mul", &["mmf", "s"], "scaled"));
        nodes.push(node("Add", &["b", "scaled"], "y"));
        let graph = pb::GraphProto {
            node: nodes,
            initializer: vec![
                tensor("w", &[k as i64, n as i64], DataType::Int8, w),
                tensor("wzp", &[], DataType::Int8, vec![0]),
                tensor("ws", &[], DataType::Float, 0.0123f32.to_le_bytes().to_vec()),
                tensor("b", &[n as i64], DataType::Float, bias),
            ],
            input: vec![value_info("x", DataType::Float)],
            output: vec![value_info("y", DataType::Float)],
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

    fn run(proto: &pb::ModelProto, x: &Tensor, threads: usize) -> (Vec<f32>, Vec<String>) {
        let plan = crate::engine::fast_ops::onnx()
            .model_for_proto_model(proto)
            .unwrap()
            .with_input_fact(0, f32::fact(x.shape()).into())
            .unwrap()
            .into_optimized()
            .unwrap();
        let ops = plan
            .nodes()
            .iter()
            .map(|n| n.op.name().to_string())
            .collect();
        let plan = plan.into_runnable().unwrap();
        let out = tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
            tract_onnx::tract_core::tract_linalg::multithread::Executor::multithread(threads),
            || plan.run(tvec!(x.clone().into_tvalue())).unwrap(),
        );
        let values = out[0]
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec();
        (values, ops)
    }

    /// The operator gives tract's `MatMulInteger` → `Cast` → `Mul` → `Add` bit for bit, at 1
    /// and 2 threads: whole and partial tiles, blocks and panels.
    #[test]
    fn same_bits_as_tracts_dynamic_int8_chain() {
        for (rows, k, n) in [(1, 4, 5), (7, 64, 32), (203, 40, 70), (300, 128, 96)] {
            let proto = dynamic_model(k, n);
            let x = Tensor::from_shape(&[rows, k], &values(rows * k, 1, 3.0)).unwrap();
            let (want, tract_ops) = run(&proto, &x, 1);
            assert!(tract_ops.iter().all(|o| o != OP_TYPE), "{tract_ops:?}");
            let mut fused = proto.clone();
            assert_eq!(fuse(fused.graph.as_mut().unwrap()), 1);
            let (got, ops) = run(&fused, &x, 1);
            assert!(ops.iter().any(|o| o == OP_TYPE), "{ops:?}");
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{rows}x{k}x{n} [{i}]: {g} vs {w}");
            }
            assert_eq!(
                run(&fused, &x, 2).0,
                got,
                "{rows}x{k}x{n}: 2 threads differ"
            );
        }
    }

    /// The reduced ViT-B fixture's `quantize_dynamic` encoder: qkv, proj, lin1 and lin2 of both
    /// blocks become samrt's operator, lin1 with its GELU.
    #[test]
    fn vit_b_dynamic_int8_linear_layers_are_rewritten() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/vit_b_reduced/encoder.int8.onnx"
        );
        let bytes = std::fs::read(path).unwrap();
        let mut proto = crate::engine::fast_ops::onnx()
            .proto_model_for_read(&mut &*bytes)
            .unwrap();
        let graph = proto.graph.as_mut().unwrap();
        super::super::depthwise::fuse(graph);
        assert_eq!(fuse(graph), 8);
        let gelus = graph
            .node
            .iter()
            .filter(|n| n.op_type == OP_TYPE)
            .filter(|n| n.attribute.iter().any(|a| a.name == "gelu" && a.i == 1))
            .count();
        assert_eq!(gelus, 2);
        assert!(graph.node.iter().all(|n| n.op_type != "MatMulInteger"));
    }

    /// The fixture's static int8 encoder (`--quantize int8-static`): its eight linear layers.
    #[test]
    fn vit_b_static_int8_linear_layers_are_rewritten() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/vit_b_reduced/encoder.int8-static.onnx"
        );
        let bytes = std::fs::read(path).unwrap();
        let mut proto = crate::engine::fast_ops::onnx()
            .proto_model_for_read(&mut &*bytes)
            .unwrap();
        let graph = proto.graph.as_mut().unwrap();
        super::super::depthwise::fuse(graph);
        assert_eq!(fuse(graph), 0);
        let mut portable = graph.clone();
        assert_eq!(fuse_qdq(graph, true), 8);
        // Only the attention's activation-by-activation products stay MatMuls.
        let matmuls = graph.node.iter().filter(|n| n.op_type == "MatMul").count();
        assert_eq!(matmuls, 4);
        // Two of the activations' DequantizeLinear stay for `Shape` nodes (whose values tract
        // folds at load, leaving the dequantization unused).
        let index = GraphIndex::new(graph);
        for dq in graph
            .node
            .iter()
            .filter(|n| n.op_type == "DequantizeLinear")
        {
            let users = &index.consumers[dq.output[0].as_str()];
            assert!(
                users.iter().all(|&u| graph.node[u].op_type == "Shape"),
                "{}",
                dq.name
            );
        }
        // Without VNNI: tract's integer products.
        assert_eq!(fuse_qdq(&mut portable, false), 8);
        let integer = portable
            .node
            .iter()
            .filter(|n| n.op_type == "MatMulInteger")
            .count();
        assert_eq!(integer, 8);
    }

    /// A static QDQ linear layer with per-column weight scales: samrt's operator against
    /// tract's `QuantizeLinear` → `DequantizeLinear` → `MatMul` → `Add` in f32 (an exact int32
    /// sum then one scaling, against a float sum of dequantized products: float rounding apart).
    #[test]
    fn static_qdq_chain_matches_tracts_float_chain() {
        let (rows, k, n) = (77, 96, 40);
        let w: Vec<u8> = values(k * n, 2, 127.0)
            .iter()
            .map(|&v| (v.round() as i8) as u8)
            .collect();
        let f32s = |v: Vec<f32>| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let ws = values(n, 5, 0.01).iter().map(|v| v.abs() + 1e-3).collect();
        let mut dq_w = node("DequantizeLinear", &["w", "ws", "wzp"], "wf");
        dq_w.attribute.push(AttributeProto {
            name: "axis".into(),
            r#type: AttributeType::Int as i32,
            i: 1,
            ..Default::default()
        });
        let graph = pb::GraphProto {
            node: vec![
                node("QuantizeLinear", &["x", "xs", "xzp"], "xq"),
                node("DequantizeLinear", &["xq", "xs", "xzp"], "xf"),
                dq_w,
                node("MatMul", &["xf", "wf"], "mm"),
                node("Add", &["mm", "b"], "y"),
            ],
            initializer: vec![
                tensor("xs", &[], DataType::Float, 0.025f32.to_le_bytes().to_vec()),
                tensor("xzp", &[], DataType::Uint8, vec![121]),
                tensor("w", &[k as i64, n as i64], DataType::Int8, w),
                tensor("ws", &[n as i64], DataType::Float, f32s(ws)),
                tensor("wzp", &[n as i64], DataType::Int8, vec![0; n]),
                tensor("b", &[n as i64], DataType::Float, f32s(values(n, 3, 1.0))),
            ],
            input: vec![value_info("x", DataType::Float)],
            output: vec![value_info("y", DataType::Float)],
            ..Default::default()
        };
        let proto = pb::ModelProto {
            ir_version: 7,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(graph),
            ..Default::default()
        };
        let x = Tensor::from_shape(&[rows, k], &values(rows * k, 1, 3.0)).unwrap();
        let (want, _) = run(&proto, &x, 1);
        let top = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut variants = vec![false];
        if available() {
            variants.push(true);
        }
        for vnni in variants {
            let mut fused = proto.clone();
            assert_eq!(fuse_qdq(fused.graph.as_mut().unwrap(), vnni), 1);
            let (got, ops) = run(&fused, &x, 2);
            assert_eq!(ops.iter().any(|o| o == OP_TYPE), vnni, "{ops:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * top, "vnni {vnni}: {g} vs {w}");
            }
        }
    }

    /// The plain-arithmetic tile gives the VNNI tile's values (where it runs), GELU included.
    #[test]
    fn generic_and_vnni_kernels_agree() {
        let (m, k, n) = (100, 96, 70);
        let w: Vec<i8> = values(k * n, 2, 127.0)
            .iter()
            .map(|&v| v.round() as i8)
            .collect();
        let b = values(n, 3, 1.0);
        let a: Vec<u8> = values(m * k, 1, 127.0)
            .iter()
            .map(|&v| (v + 128.0) as u8)
            .collect();
        let packed = PackedInt8::new(&w, &b, k, n);
        let mut scales = vec![0f32; packed.bias.len()];
        scales[..n].copy_from_slice(&values(n, 4, 0.01));
        let e = Epilogue {
            zero_point: 131,
            scales: &scales,
            gelu: true,
        };
        let mut want = vec![0f32; m * n];
        gemm_body::<Generic, Baseline>(&a, m, &packed, &e, &mut want);
        // The plain definition.
        for i in 0..m {
            for j in 0..n {
                let acc: i32 = (0..k)
                    .map(|kk| (a[i * k + kk] as i32 - 131) * w[kk * n + j] as i32)
                    .sum();
                let v = gelu::<Baseline>(acc as f32 * scales[j] + b[j]);
                assert_eq!(v.to_bits(), want[i * n + j].to_bits(), "[{i}, {j}]");
            }
        }
        let mut got = vec![0f32; m * n];
        gemm(&a, m, &packed, &e, &mut got);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    /// Not a test: times the operator against samrt's f32 linear kernel on ViT-B's shapes
    /// (`cargo test --release --lib linear_int8_timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn linear_int8_timing() {
        for (m, k, n) in [(4096, 768, 2304), (4096, 768, 3072), (4096, 3072, 768)] {
            let w: Vec<i8> = values(k * n, 2, 127.0)
                .iter()
                .map(|&v| v.round() as i8)
                .collect();
            let b = values(n, 3, 1.0);
            let op = LinearInt8::new(&w, &b, k, n, false);
            let a: Vec<u8> = values(m * k, 1, 127.0)
                .iter()
                .map(|&v| (v + 128.0) as u8)
                .collect();
            let x = Tensor::from_shape(&[m, k], &a).unwrap();
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                crate::engine::fast_ops::tests::run(
                    op.clone(),
                    tvec![
                        x.clone().into_tvalue(),
                        tensor0(128u8).into_tvalue(),
                        tensor0(0.01f32).into_tvalue()
                    ],
                );
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gop = 2.0 * (m * k * n) as f64 / 1e9;
            eprintln!(
                "{m}x{k}x{n}: {:.2} ms ({:.0} GOP/s)",
                best * 1e3,
                gop / best
            );
        }
    }
}
