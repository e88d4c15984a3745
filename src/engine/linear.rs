//! Linear layers, `x · W + b` with constant weights (and the GELU after them), as a samrt
//! operator on CPUs with AVX-512.
//!
//! The transformer blocks' linear layers (qkv, proj, fc1, fc2: 40 in the default encoder, half
//! of its arithmetic) are where tract loses most to onnxruntime on SAM's shapes: its AVX-512
//! kernel works on packed activations (a copy of every input, ~50 ms a frame) and reaches
//! 45–157 GFLOP/s on these shapes on this project's machine, where a kernel that reads the
//! activations in place reaches 215–240 (`linear_timing_against_tract`). Here the weights are
//! packed once, when the plan is built, into panels of 32 columns; each 6-row x 32-column tile
//! of the output is twelve AVX-512 accumulators over the whole of k, fed by two weight loads and
//! six broadcasts of the activations per step, plus the bias at the end; blocks of 96 rows keep
//! their activations and one weight panel in L2. The GELU that follows fc1 is applied to each
//! block while it is in cache. Rows are split over tract's thread pool; every row's result
//! is the same at any thread count.
//!
//! [`fuse`] rewrites `MatMul(x, W)` + `Add(b)` (W `[K, N]` and b `[N]` initializers) before tract
//! parses the graph, and takes in a GELU ([`super::depthwise`]'s `SamrtGelu`) that the layer feeds
//! alone. It does so only where the AVX-512 kernel runs: elsewhere tract's own kernels (NEON on
//! the boards) stay in charge. The operator's plain-arithmetic path computes the same on any CPU,
//! for the tests.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::threads::par_chunks_mut;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, attribute_proto::AttributeType, AttributeProto, NodeProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use super::onnx_graph::GraphIndex;
use super::vector_math::{gelu, isa, AlignedVec, Baseline, MulAdd};
#[cfg(target_arch = "x86_64")]
use super::vector_math::{Fused, Isa};

/// The ONNX operator type of a fused linear layer (samrt's domain).
pub const OP_TYPE: &str = "SamrtLinear";
const DOMAIN: &str = "ai.samrt";

/// Rows of a register tile.
pub(super) const TILE_ROWS: usize = 6;
/// Rows below which a layer runs on one thread: split finer, tract's chunks are a row or two
/// each, every one a padded register tile and a task (the decoder's 7-token layers took
/// 2.4 ms on one thread and 3.5–6.7 ms on two).
const SPLIT_ROWS: usize = 8 * TILE_ROWS;
/// Rows of one block (its activations and one weight panel stay in L2), the unit of threading.
const BLOCK_ROWS: usize = 96;

/// Whether this CPU runs the fast kernel (and so whether [`fuse`] rewrites anything).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(isa(), Isa::Avx512 | Isa::Avx2Fma)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

// ---------------------------------------------------------------------------------------------
// The ONNX rewrite.

/// Replaces `MatMul(x, W)` followed by `Add(·, b)` (either operand order), with `W` a 2-d and
/// `b` a 1-d float initializer, and optionally the `SamrtGelu` fed by the `Add` alone, by one
/// `SamrtLinear` node; returns how many. Run after [`super::depthwise::fuse`] (which makes the
/// GELUs) and only when [`available`].
pub fn fuse(graph: &mut pb::GraphProto) -> usize {
    let index = GraphIndex::new(graph);
    let mut removed: HashSet<usize> = HashSet::new();
    let mut fused: HashMap<usize, NodeProto> = HashMap::new();
    for (mm_ix, mm) in index.nodes.iter().enumerate() {
        if mm.op_type != "MatMul" || mm.input.len() != 2 {
            continue;
        }
        let Some(weight) = index.initializers.get(mm.input[1].as_str()).filter(|t| {
            t.dims.len() == 2 && t.data_type == pb::tensor_proto::DataType::Float as i32
        }) else {
            continue;
        };
        let Some((add_ix, bias)) = bias_add(&index, &mm.output[0], weight.dims[1]) else {
            continue;
        };
        let (gelu, output) = gelu_after(&index, add_ix);
        let mut input = vec![mm.input[0].clone(), mm.input[1].clone(), bias.to_string()];
        let mut output = output.to_string();
        let mut last = gelu.unwrap_or(add_ix);
        // A residual `Add(layer, r)` the layer alone feeds: added in the layer's store.
        let residual = match gelu {
            Some(_) => None,
            None => residual_add(&index, add_ix),
        };
        if let Some((residual_ix, r)) = residual {
            input.push(r.to_string());
            output = index.nodes[residual_ix].output[0].clone();
            last = residual_ix;
            removed.insert(residual_ix);
        }
        let node = NodeProto {
            name: format!("{}.samrt_linear", mm.name),
            op_type: OP_TYPE.into(),
            domain: DOMAIN.into(),
            input,
            output: vec![output],
            attribute: vec![gelu_attribute(gelu.is_some())],
            ..Default::default()
        };
        removed.extend([mm_ix, add_ix]);
        removed.extend(gelu);
        // In place of the chain's last node, where its inputs exist.
        fused.insert(last, node);
    }
    let count = fused.len();
    super::layer_norm::splice(graph, fused, &removed);
    count
}

/// The bias of `Add(·, b)` fed by `value` alone: `(add node, bias name)` for a 1-d float
/// initializer of `n` values (either operand order).
pub(super) fn bias_add<'a>(
    index: &GraphIndex<'a>,
    value: &str,
    n: i64,
) -> Option<(usize, &'a str)> {
    let add_ix = index.single_consumer(value, "Add")?;
    let bias = match index.nodes[add_ix].input.as_slice() {
        [a, b] if a == value => b,
        [a, b] if b == value => a,
        _ => return None,
    };
    let t = index.initializers.get(bias.as_str())?;
    (t.data_type == pb::tensor_proto::DataType::Float as i32 && t.dims == [n])
        .then_some((add_ix, bias.as_str()))
}

/// The `Add(·, r)` that the `Add` at `add_ix` feeds alone, with `r` computed (not an
/// initializer: a bias there would be the layer's own): `(add node, r)`.
fn residual_add<'a>(index: &GraphIndex<'a>, add_ix: usize) -> Option<(usize, &'a str)> {
    let value = index.nodes[add_ix].output[0].as_str();
    let residual_ix = index.single_consumer(value, "Add")?;
    let r = match index.nodes[residual_ix].input.as_slice() {
        [a, b] if a == value && b != value => b,
        [a, b] if b == value && a != value => a,
        _ => return None,
    };
    (!index.initializers.contains_key(r.as_str())).then_some((residual_ix, r.as_str()))
}

/// The `SamrtGelu` that the `Add` at `add_ix` feeds alone, if any, and the value the layer then
/// ends with (the GELU's output, or the `Add`'s).
pub(super) fn gelu_after<'a>(index: &GraphIndex<'a>, add_ix: usize) -> (Option<usize>, &'a str) {
    let add_out = index.nodes[add_ix].output[0].as_str();
    let gelu = index
        .single_consumer(add_out, super::depthwise::GELU_OP)
        .filter(|&g| index.nodes[g].domain == DOMAIN);
    (
        gelu,
        gelu.map_or(add_out, |g| index.nodes[g].output[0].as_str()),
    )
}

/// The `gelu` attribute of samrt's linear nodes.
pub(super) fn gelu_attribute(gelu: bool) -> AttributeProto {
    AttributeProto {
        name: "gelu".into(),
        r#type: AttributeType::Int as i32,
        i: gelu as i64,
        ..Default::default()
    }
}

/// The inference rule of a linear layer's output shape: `x`'s, with the last axis `W`'s second.
pub(super) fn output_shape_rule<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    x: &'p TensorProxy,
    w: &'p TensorProxy,
    output: &'p TensorProxy,
) -> InferenceResult {
    s.equals(&x.rank, &output.rank)?;
    s.given_2(&x.shape, &w.shape, move |s, x, w| {
        let mut shape = x.clone();
        if let (Some(last), Some(n)) = (shape.last_mut(), w.get(1)) {
            *last = n.clone();
        }
        s.equals(&output.shape, ShapeFactoid::from(shape))?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// The operator, as tract's parser builds it.

/// Builds a `SamrtLinear` node.
pub fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let gelu = node.get_attr_opt::<i64>("gelu")?.unwrap_or(0) != 0;
    let residual = node.input.len() == 4;
    Ok((expand(LinearExpansion { gelu, residual }), vec![]))
}

#[derive(Debug, Clone)]
struct LinearExpansion {
    gelu: bool,
    /// A fourth input is added to the result (the ONNX `Add`'s broadcasting rules).
    residual: bool,
}

impl Expansion for LinearExpansion {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3 + usize::from(self.residual))?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        if self.residual {
            s.equals(&inputs[3].datum_type, &outputs[0].datum_type)?;
        }
        // A residual has the layer's shape in the graphs this is fused in; one that broadcasts
        // is added by tract's operator after the layer (see `wire`).
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
        let b = model.outlet_fact(inputs[2])?.konst.clone();
        let (Some(w), Some(b)) = (w, b) else {
            bail!("SamrtLinear: weights and bias must be constants");
        };
        ensure!(
            x.datum_type == f32::datum_type()
                && w.datum_type() == f32::datum_type()
                && b.datum_type() == f32::datum_type(),
            "SamrtLinear: f32 only"
        );
        ensure!(
            w.rank() == 2 && b.shape() == [w.shape()[1]],
            "SamrtLinear: weights {:?} and bias {:?}",
            w.shape(),
            b.shape()
        );
        let (k, n) = (w.shape()[0], w.shape()[1]);
        let op = Linear::new(
            w.try_as_plain_ram()?.as_slice::<f32>()?,
            b.try_as_plain_ram()?.as_slice::<f32>()?,
            k,
            n,
            self.gelu,
            panel_width(),
        );
        if !self.residual {
            return model.wire_node(prefix, op, &inputs[..1]);
        }
        let r = model.outlet_fact(inputs[3])?.clone();
        let out = op.output_facts(&[&x])?.remove(0);
        if r.shape == out.shape && r.datum_type == out.datum_type {
            return model.wire_node(prefix, op.with_residual(), &[inputs[0], inputs[3]]);
        }
        let layer = model.wire_node(format!("{prefix}.layer"), op, &inputs[..1])?[0];
        tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast(
            format!("{prefix}.residual"),
            model,
            tract_onnx::tract_core::ops::math::add(),
            &[layer, inputs[3]],
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The typed operator.

/// `W` packed in panels of `width` columns: panel `p` holds rows `0..k` of columns
/// `p·width..(p+1)·width` contiguously, zero-padded past `n`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PackedWeights {
    k: usize,
    n: usize,
    width: usize,
    data: AlignedVec<f32>,
    /// The bias, zero-padded to whole panels.
    bias: AlignedVec<f32>,
}

impl PackedWeights {
    /// Hashes the shape and the first values (what an operator's `Hash` needs).
    pub(super) fn hash_prefix<H: std::hash::Hasher>(&self, state: &mut H) {
        use std::hash::Hash;
        (self.k, self.n, self.width).hash(state);
        for v in self.data.iter().take(64) {
            v.to_bits().hash(state);
        }
    }

    pub(super) fn new(weights: &[f32], bias: &[f32], k: usize, n: usize, width: usize) -> Self {
        let panels = n.div_ceil(width);
        let mut data = AlignedVec::zeroed(panels * k * width);
        for (p, panel) in data.chunks_exact_mut((k * width).max(1)).enumerate() {
            let (col, cols) = (p * width, width.min(n - p * width));
            for (kk, dst) in panel.chunks_exact_mut(width).enumerate() {
                dst[..cols].copy_from_slice(&weights[kk * n + col..kk * n + col + cols]);
            }
        }
        let mut padded = AlignedVec::zeroed(panels * width);
        padded[..n].copy_from_slice(&bias[..n]);
        PackedWeights {
            k,
            n,
            width,
            data,
            bias: padded,
        }
    }
}

/// `y = x · W + b` over the last axis of `x` (then GELU if `gelu`), `W` packed at load.
#[derive(Debug, Clone)]
pub struct Linear {
    weights: Arc<PackedWeights>,
    gelu: bool,
    /// A second input, of the output's shape, is added to the result.
    residual: bool,
}

impl PartialEq for Linear {
    fn eq(&self, other: &Self) -> bool {
        self.gelu == other.gelu && self.residual == other.residual && self.weights == other.weights
    }
}

impl Eq for Linear {}

impl std::hash::Hash for Linear {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (
            self.weights.k,
            self.weights.n,
            self.weights.width,
            self.gelu,
            self.residual,
        )
            .hash(state);
        self.weights.hash_prefix(state);
    }
}

/// The panel width of the kernel this CPU runs.
pub(super) fn panel_width() -> usize {
    if isa().is_avx512() {
        32
    } else {
        16
    }
}

impl Linear {
    /// `weights` row-major `[k, n]`, `bias` `[n]`; `width` 32 (the AVX-512 kernel, only where it
    /// runs) or 16 (plain arithmetic).
    fn new(weights: &[f32], bias: &[f32], k: usize, n: usize, gelu: bool, width: usize) -> Self {
        Linear {
            weights: Arc::new(PackedWeights::new(weights, bias, k, n, width)),
            gelu,
            residual: false,
        }
    }

    /// `W` row-major `[k, n]` and `b`, of a layer without GELU or residual.
    pub(super) fn plain_weights(&self) -> Option<(Vec<f32>, Vec<f32>, usize, usize)> {
        if self.gelu || self.residual {
            return None;
        }
        Some(self.weights())
    }

    /// Whether the layer adds a second input of its output's shape (and applies no GELU).
    pub(super) fn plain_with_residual(&self) -> Option<bool> {
        (!self.gelu).then_some(self.residual)
    }

    /// `W` row-major `[k, n]`, `b`, `k` and `n`.
    pub(super) fn weights(&self) -> (Vec<f32>, Vec<f32>, usize, usize) {
        let PackedWeights {
            k,
            n,
            width,
            data,
            bias,
        } = &*self.weights;
        let (k, n, width) = (*k, *n, *width);
        let mut w = vec![0.0; k * n];
        for (col, p) in (0..n).map(|col| (col, col / width)) {
            for kk in 0..k {
                w[kk * n + col] = data[(p * k + kk) * width + col % width];
            }
        }
        (w, bias[..n].to_vec(), k, n)
    }

    /// The layer plus a residual input of the output's shape.
    fn with_residual(self) -> Self {
        Linear {
            residual: true,
            ..self
        }
    }
}

impl Op for Linear {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "k: {}, n: {}, panels of {}, gelu: {}, residual: {}",
            self.weights.k, self.weights.n, self.weights.width, self.gelu, self.residual
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for Linear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        ensure!(
            shape.last() == Some(&self.weights.k.to_dim()),
            "SamrtLinear: input {:?} for {} inputs per row",
            inputs[0].shape,
            self.weights.k
        );
        *shape.last_mut().unwrap() = self.weights.n.to_dim();
        Ok(tvec!(inputs[0].datum_type.fact(shape)))
    }

    as_op!();
}

impl EvalOp for Linear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let w = &*self.weights;
        let (k, n) = (w.k, w.n);
        ensure!(
            x.shape().last() == Some(&k),
            "SamrtLinear: input {:?} for {k} inputs per row",
            x.shape()
        );
        let mut shape: TVec<usize> = x.shape().into();
        *shape.last_mut().unwrap() = n;
        let view = x.try_as_plain_ram()?;
        let a = view.as_slice::<f32>()?;
        let m = a.len().checked_div(k).unwrap_or(0);
        let residual_view = match self.residual {
            true => {
                let r = &inputs[1];
                ensure!(
                    r.shape() == &shape[..],
                    "SamrtLinear: residual {:?} for output {shape:?}",
                    r.shape()
                );
                Some(r.try_as_plain_ram()?)
            }
            false => None,
        };
        let residual = residual_view
            .as_ref()
            .map(|v| v.as_slice::<f32>())
            .transpose()?;
        // SAFETY: f32 has no invalid bit patterns, and every row of the output is written.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        if m * n > 0 {
            let mut out_view = output.try_as_plain_ram_mut()?;
            let c = out_view.as_slice_mut::<f32>()?;
            let len = c.len();
            // Whole rows per task (tract's split): a row's result does not depend on the split.
            let task = |first: usize, rows: &mut [f32]| -> TractResult<()> {
                let count = rows.len() / n;
                gemm(
                    &a[first * k..(first + count) * k],
                    count,
                    w,
                    self.gelu,
                    rows,
                );
                if let Some(residual) = residual {
                    // While the rows are in cache; `layer + r`, the ONNX Add's operand order
                    // does not change an f32 sum.
                    let r = &residual[first * n..(first + count) * n];
                    for (c, r) in rows.iter_mut().zip(r) {
                        *c += r;
                    }
                }
                Ok(())
            };
            if m < SPLIT_ROWS {
                task(0, c)?;
            } else {
                par_chunks_mut(c, n, len * k.max(1), task)?;
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

// ---------------------------------------------------------------------------------------------
// The computation.

/// The weights one product reads: packed panels with their bias, or a row-major matrix (rows
/// `ldb` apart) read in place without one (`n` a multiple of the panel width).
#[derive(Clone, Copy)]
struct Weights<'a> {
    data: &'a [f32],
    /// Zero-padded to whole panels; empty for none.
    bias: &'a [f32],
    k: usize,
    n: usize,
    width: usize,
    /// `None`: packed panels.
    ldb: Option<usize>,
}

impl<'a> Weights<'a> {
    /// Rows `k0..` of panel `p` and their stride.
    fn panel(&self, p: usize, k0: usize) -> (&'a [f32], usize) {
        match self.ldb {
            None => {
                let start = p * self.k * self.width + k0 * self.width;
                (&self.data[start..], self.width)
            }
            Some(ldb) => (&self.data[k0 * ldb + p * self.width..], ldb),
        }
    }
}

/// `c[m x n] = a[m x k] · W + b` (then GELU), rows contiguous.
pub(super) fn gemm(a: &[f32], m: usize, w: &PackedWeights, gelu: bool, c: &mut [f32]) {
    let weights = Weights {
        data: &w.data,
        bias: &w.bias,
        k: w.k,
        n: w.n,
        width: w.width,
        ldb: None,
    };
    gemm_weights(a, m, weights, gelu, c)
}

/// `c[m x n] = a[m x k] · b` with `b` `k` rows of `n` values `ldb` apart, read in place (not
/// packed: for weights that change every call); `n` a multiple of [`panel_width`].
pub(super) fn gemm_row_major(
    a: &[f32],
    m: usize,
    b: &[f32],
    k: usize,
    n: usize,
    ldb: usize,
    c: &mut [f32],
) {
    let width = panel_width();
    assert!(n.is_multiple_of(width) && n <= ldb && (k == 0 || b.len() >= (k - 1) * ldb + n));
    let weights = Weights {
        data: b,
        bias: &[],
        k,
        n,
        width,
        ldb: Some(ldb),
    };
    gemm_weights(a, m, weights, false, c)
}

fn gemm_weights(a: &[f32], m: usize, w: Weights<'_>, gelu: bool, c: &mut [f32]) {
    assert!(a.len() >= m * w.k && c.len() >= m * w.n);
    match (w.width, isa()) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F (probed).
        (32, Isa::Avx512) => unsafe { gemm_avx512(a, m, w, gelu, c) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (probed).
        (16, Isa::Avx2Fma) => unsafe { gemm_avx2(a, m, w, gelu, c) },
        (16, _) => gemm_body::<16, Generic<Baseline>, Baseline>(a, m, w, gelu, c),
        (width, isa) => panic!("SamrtLinear: panels of {width} on {isa:?}"),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gemm_avx512(a: &[f32], m: usize, w: Weights<'_>, gelu: bool, c: &mut [f32]) {
    gemm_body::<32, Avx512Tile, Fused>(a, m, w, gelu, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemm_avx2(a: &[f32], m: usize, w: Weights<'_>, gelu: bool, c: &mut [f32]) {
    gemm_body::<16, Avx2Tile, Fused>(a, m, w, gelu, c)
}

/// Values of `k` whose slice of a weight panel stays in L1 (16 KB) while a block's row tiles
/// run over it: longer rows are summed in slices, each tile's partial sums kept in `c` between
/// them (the same order of additions, so the same bits).
fn k_slice(k: usize, width: usize) -> usize {
    let most = 4096 / width;
    if k * width <= 6144 {
        return k;
    }
    k.div_ceil(k.div_ceil(most))
}

#[inline(always)]
fn gemm_body<const W: usize, T: TileKernel<W>, F: MulAdd>(
    a: &[f32],
    m: usize,
    w: Weights<'_>,
    gelu: bool,
    c: &mut [f32],
) {
    let (k, n) = (w.k, w.n);
    debug_assert_eq!(w.width, W);
    let panels = n.div_ceil(W);
    let slice = k_slice(k, W);
    let mut tail_a = AlignedVec::<f32>::zeroed(TILE_ROWS * k);
    let mut tile_out = AlignedVec::<f32>::zeroed(TILE_ROWS * W);
    for block in (0..m).step_by(BLOCK_ROWS) {
        let block_end = (block + BLOCK_ROWS).min(m);
        for k0 in (0..k).step_by(slice) {
            let kc = slice.min(k - k0);
            let (first, last) = (k0 == 0, k0 + kc == k);
            for p in 0..panels {
                let (panel, ldb) = w.panel(p, k0);
                assert!(panel.len() >= (kc - 1) * ldb + W);
                let bias = if last && !w.bias.is_empty() {
                    w.bias[p * W..(p + 1) * W].as_ptr()
                } else {
                    std::ptr::null()
                };
                let cols = W.min(n - p * W);
                let mut row = block;
                while row < block_end {
                    let rows = TILE_ROWS.min(block_end - row);
                    let src = if rows == TILE_ROWS {
                        &a[row * k + k0..]
                    } else {
                        for r in 0..rows {
                            tail_a[r * k..r * k + kc]
                                .copy_from_slice(&a[(row + r) * k + k0..(row + r) * k + k0 + kc]);
                        }
                        for r in rows..TILE_ROWS {
                            tail_a[r * k..r * k + kc].fill(0.0);
                        }
                        &tail_a[..]
                    };
                    if rows == TILE_ROWS && cols == W {
                        let dst = &mut c[row * n + p * W..];
                        assert!(dst.len() >= (TILE_ROWS - 1) * n + W);
                        assert!(src.len() >= (TILE_ROWS - 1) * k + kc);
                        // SAFETY: bounds asserted; `src` holds TILE_ROWS rows of kc values.
                        unsafe {
                            T::tile(
                                src.as_ptr(),
                                k,
                                panel.as_ptr(),
                                ldb,
                                kc,
                                !first,
                                bias,
                                dst.as_mut_ptr(),
                                n,
                            )
                        };
                    } else {
                        if !first {
                            for r in 0..rows {
                                let at = (row + r) * n + p * W;
                                tile_out[r * W..r * W + cols].copy_from_slice(&c[at..at + cols]);
                            }
                        }
                        // SAFETY: as above, into the tile buffer of TILE_ROWS rows of W.
                        unsafe {
                            T::tile(
                                src.as_ptr(),
                                k,
                                panel.as_ptr(),
                                ldb,
                                kc,
                                !first,
                                bias,
                                tile_out.as_mut_ptr(),
                                W,
                            )
                        };
                        for r in 0..rows {
                            let dst = &mut c[(row + r) * n + p * W..(row + r) * n + p * W + cols];
                            dst.copy_from_slice(&tile_out[r * W..r * W + cols]);
                        }
                    }
                    row += rows;
                }
            }
        }
        if gelu {
            for v in &mut c[block * n..block_end * n] {
                *v = gelu_of::<F>(*v);
            }
        }
    }
}

#[inline(always)]
fn gelu_of<F: MulAdd>(x: f32) -> f32 {
    gelu::<F>(x)
}

/// A register tile kernel: `c[r][0..W] = (c[r][0..W] if accumulate) + Σₖ a[r][k] · b[k][0..W]
/// (+ bias, unless `bias` is null) for [`TILE_ROWS`] rows, accumulated in the order of k.
trait TileKernel<const W: usize> {
    /// # Safety
    /// `a` holds TILE_ROWS rows of `lda` with `k` values, `b` `k` rows of `ldb` with `W` values, `bias` null or
    /// `W` values, `c` TILE_ROWS rows of `ldc` with `W` values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        k: usize,
        accumulate: bool,
        bias: *const f32,
        c: *mut f32,
        ldc: usize,
    );
}

/// The 6x32 tile in AVX-512 intrinsics: twelve accumulators, two weight loads and six
/// broadcasts per step of k. (Written out: the compiler does not vectorize the plain form in
/// this loop nest.)
#[cfg(target_arch = "x86_64")]
struct Avx512Tile;

#[cfg(target_arch = "x86_64")]
impl TileKernel<32> for Avx512Tile {
    #[inline(always)]
    unsafe fn tile(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        k: usize,
        accumulate: bool,
        bias: *const f32,
        c: *mut f32,
        ldc: usize,
    ) {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract; AVX-512F is enabled in the calling function.
        unsafe {
            let zero = _mm512_setzero_ps();
            let mut acc = [[zero; 2]; TILE_ROWS];
            if accumulate {
                for (r, acc) in acc.iter_mut().enumerate() {
                    acc[0] = _mm512_loadu_ps(c.add(r * ldc));
                    acc[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
                }
            }
            for kk in 0..k {
                let b0 = _mm512_loadu_ps(b.add(kk * ldb));
                let b1 = _mm512_loadu_ps(b.add(kk * ldb + 16));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r * lda + kk));
                    acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
                }
            }
            if !bias.is_null() {
                let bias0 = _mm512_loadu_ps(bias);
                let bias1 = _mm512_loadu_ps(bias.add(16));
                for acc in acc.iter_mut() {
                    acc[0] = _mm512_add_ps(acc[0], bias0);
                    acc[1] = _mm512_add_ps(acc[1], bias1);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * ldc), acc[0]);
                _mm512_storeu_ps(c.add(r * ldc + 16), acc[1]);
            }
        }
    }
}

/// The 6x16 tile in AVX2 + FMA intrinsics: the same schedule on 256-bit registers (twelve
/// accumulators, two weight loads and six broadcasts per step of k), so the same bits.
#[cfg(target_arch = "x86_64")]
struct Avx2Tile;

#[cfg(target_arch = "x86_64")]
impl TileKernel<16> for Avx2Tile {
    #[inline(always)]
    unsafe fn tile(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        k: usize,
        accumulate: bool,
        bias: *const f32,
        c: *mut f32,
        ldc: usize,
    ) {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract; AVX2 and FMA are enabled in the calling function.
        unsafe {
            let zero = _mm256_setzero_ps();
            let mut acc = [[zero; 2]; TILE_ROWS];
            if accumulate {
                for (r, acc) in acc.iter_mut().enumerate() {
                    acc[0] = _mm256_loadu_ps(c.add(r * ldc));
                    acc[1] = _mm256_loadu_ps(c.add(r * ldc + 8));
                }
            }
            for kk in 0..k {
                let b0 = _mm256_loadu_ps(b.add(kk * ldb));
                let b1 = _mm256_loadu_ps(b.add(kk * ldb + 8));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_ps(*a.add(r * lda + kk));
                    acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
                }
            }
            if !bias.is_null() {
                let bias0 = _mm256_loadu_ps(bias);
                let bias1 = _mm256_loadu_ps(bias.add(8));
                for acc in acc.iter_mut() {
                    acc[0] = _mm256_add_ps(acc[0], bias0);
                    acc[1] = _mm256_add_ps(acc[1], bias1);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(c.add(r * ldc), acc[0]);
                _mm256_storeu_ps(c.add(r * ldc + 8), acc[1]);
            }
        }
    }
}

/// The tile in plain arithmetic, for the tests on any CPU.
struct Generic<F>(std::marker::PhantomData<F>);

impl<const W: usize, F: MulAdd> TileKernel<W> for Generic<F> {
    #[inline(always)]
    unsafe fn tile(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        k: usize,
        accumulate: bool,
        bias: *const f32,
        c: *mut f32,
        ldc: usize,
    ) {
        for r in 0..TILE_ROWS {
            for j in 0..W {
                // SAFETY: the caller's contract.
                let mut acc = if accumulate {
                    unsafe { *c.add(r * ldc + j) }
                } else {
                    0.0
                };
                for kk in 0..k {
                    // SAFETY: the caller's contract.
                    acc = F::mul_add(
                        unsafe { *a.add(r * lda + kk) },
                        unsafe { *b.add(kk * ldb + j) },
                        acc,
                    );
                }
                if !bias.is_null() {
                    // SAFETY: the caller's contract.
                    acc += unsafe { *bias.add(j) };
                }
                // SAFETY: the caller's contract.
                unsafe { *c.add(r * ldc + j) = acc };
            }
        }
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

    /// tract's own `x · W + b`, as a plan.
    fn tract_plan(
        shape: &[usize],
        w: &[f32],
        b: &[f32],
        k: usize,
        n: usize,
    ) -> Arc<TypedRunnableModel> {
        let mut model = TypedModel::default();
        let src = model.add_source("x", f32::fact(shape)).unwrap();
        let wt = model
            .add_const("w", Tensor::from_shape(&[k, n], w).unwrap())
            .unwrap();
        let axes = if shape.len() == 2 {
            "mk,kn->mn"
        } else {
            "bmk,kn->bmn"
        };
        let y = model
            .wire_node(
                "mm",
                tract_onnx::tract_core::ops::einsum::EinSum::new(
                    axes.parse().unwrap(),
                    f32::datum_type(),
                ),
                &[src, wt],
            )
            .unwrap();
        let mut bias_shape = vec![1; shape.len() - 1];
        bias_shape.push(n);
        let bt = model
            .add_const("b", Tensor::from_shape(&bias_shape, b).unwrap())
            .unwrap();
        let y = model
            .wire_node("add", tract_onnx::tract_core::ops::math::add(), &[y[0], bt])
            .unwrap();
        model.select_output_outlets(&y).unwrap();
        model.into_optimized().unwrap().into_runnable().unwrap()
    }

    fn run_plan(plan: &Arc<TypedRunnableModel>, x: &Tensor) -> Vec<f32> {
        let out = plan.run(tvec!(x.clone().into_tvalue())).unwrap();
        out[0]
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    fn check(shape: &[usize], n: usize, gelu: bool, width: usize) {
        let k = *shape.last().unwrap();
        let x = Tensor::from_shape(shape, &values(shape.iter().product(), 1)).unwrap();
        let w = values(k * n, 2);
        let b = values(n, 3);
        let mut want = run_plan(&tract_plan(shape, &w, &b, k, n), &x);
        if gelu {
            want.iter_mut().for_each(|v| *v = gelu_of::<Baseline>(*v));
        }
        let op = Linear::new(&w, &b, k, n, gelu, width);
        let got = crate::engine::fast_ops::tests::run(op.clone(), tvec![x.clone().into_tvalue()]);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{shape:?}x{n}: {g} vs {w}"
            );
        }
        let pooled = tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
            tract_onnx::tract_core::tract_linalg::multithread::Executor::multithread(2),
            || crate::engine::fast_ops::tests::run(op, tvec![x.clone().into_tvalue()]),
        );
        assert_eq!(got, pooled, "{shape:?}x{n}: 2 threads differ from 1");
        if !gelu {
            // With a residual: the layer's values plus the residual's, exactly.
            let mut r_shape = x.shape().to_vec();
            *r_shape.last_mut().unwrap() = n;
            let r = Tensor::from_shape(&r_shape, &values(got.len(), 4)).unwrap();
            let op = Linear::new(&w, &b, k, n, false, width).with_residual();
            let with = crate::engine::fast_ops::tests::run(
                op,
                tvec![x.clone().into_tvalue(), r.clone().into_tvalue()],
            );
            let r = r.try_as_plain_ram().unwrap();
            let r = r.as_slice::<f32>().unwrap();
            for ((g, l), r) in with.iter().zip(&got).zip(r) {
                assert_eq!(*g, l + r, "{shape:?}x{n}: residual");
            }
        }
    }

    #[test]
    fn linear_matches_tracts_matmul_and_bias() {
        let mut widths = vec![16];
        if isa().is_avx512() {
            widths.push(32);
        }
        for width in widths {
            // Whole and partial tiles, blocks and panels; a batch axis; GELU fused.
            check(&[1, 7], 5, false, width);
            check(&[203, 40], 70, false, width);
            check(&[2, 97, 33], 64, true, width);
            check(&[300, 128], 32, true, width);
            // Rows summed in slices of k (partial sums kept in the output between them).
            check(&[97, 320], 64, false, width);
            check(&[37, 700], 48, true, width);
        }
    }

    #[test]
    fn tinyvit_linear_layers_are_rewritten() {
        let mut proto = crate::engine::fast_ops::tests::default_encoder_proto();
        let graph = proto.graph.as_mut().unwrap();
        super::super::depthwise::fuse(graph);
        // qkv, proj, fc1, fc2 in each of the 10 blocks; the 10 fc1 take their GELU in.
        assert_eq!(fuse(graph), 40);
        let linear: Vec<&NodeProto> = graph.node.iter().filter(|n| n.op_type == OP_TYPE).collect();
        let with_gelu = linear
            .iter()
            .filter(|n| n.attribute.iter().any(|a| a.name == "gelu" && a.i == 1))
            .count();
        assert_eq!(with_gelu, 10);
        assert!(graph
            .node
            .iter()
            .all(|n| !(n.op_type == "MatMul" && n.name.contains("mlp"))));
    }

    /// Not a test: times the operator against tract's matrix product on the encoder's shapes
    /// (`cargo test --release --lib linear_timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn linear_timing_against_tract() {
        for (m, k, n) in [
            (16384, 128, 512),
            (16384, 512, 128),
            (17689, 128, 384),
            (4096, 320, 1280),
            (4096, 1280, 320),
            (4900, 160, 480),
        ] {
            let x = Tensor::from_shape(&[m, k], &values(m * k, 1)).unwrap();
            let (w, b) = (values(k * n, 2), values(n, 3));
            let op = Linear::new(&w, &b, k, n, false, panel_width());
            let plan = tract_plan(&[m, k], &w, &b, k, n);
            let (mut best_s, mut best_t) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..5 {
                let t = std::time::Instant::now();
                crate::engine::fast_ops::tests::run(op.clone(), tvec![x.clone().into_tvalue()]);
                best_s = best_s.min(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                run_plan(&plan, &x);
                best_t = best_t.min(t.elapsed().as_secs_f64());
            }
            let gflop = 2.0 * (m * k * n) as f64 / 1e9;
            eprintln!(
                "{m}x{k}x{n}: samrt {:.2} ms ({:.0} GFLOP/s), tract {:.2} ms ({:.0} GFLOP/s)",
                best_s * 1e3,
                gflop / best_s,
                best_t * 1e3,
                gflop / best_t
            );
        }
    }
}
