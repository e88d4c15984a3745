//! Attention as one samrt operator: `softmax(q·kᵀ · scale + bias) · v`, for the image encoders'
//! windowed and global attention blocks.
//!
//! tract runs SAM's attention as five to nine operators, each a pass over a heads x queries x keys
//! score tensor: two matrix products, the scale, the bias (TinyViT's learned attention biases;
//! ViT-B's decomposed relative-position bias, two broadcast adds over a 5-d view), the softmax,
//! and the transposes around them. For ViT-B's global blocks that score tensor is 12 x 4096 x 4096
//! floats (805 MB), and tract's broadcast adds are not vectorized on these shapes.
//!
//! [`fuse`] finds the subgraph in the ONNX graph before tract parses it and replaces it by one
//! `SamrtAttention` node. [`Attention`] computes it block by block: for each batch x head (or
//! window x head) it packs keys and values once, then takes query rows in blocks whose scores fit
//! in cache, adds the bias inside (the decomposed relative-position bias as `rel_h[q, kh] +
//! rel_w[q, kw]`, never materialized), takes the softmax, multiplies by the values and writes the
//! rows straight into the output layout the graph wants (the transposes around the block are
//! absorbed). The scratch is one block of scores per thread, never a queries x keys matrix.
//! Batch x head x query-row tasks are split over tract's thread pool. The inner products use
//! register-blocked kernels compiled for AVX-512, AVX2+FMA (chosen at run time) and the target's
//! baseline (NEON on aarch64).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, attribute_proto::AttributeType, AttributeProto, NodeProto};
use tract_onnx::prelude::*;

use tract_onnx::tract_hir::internal::*;

#[cfg(target_arch = "x86_64")]
use super::vector_math::Fused;
use super::vector_math::{exp_nonpositive, isa, prefetch, Baseline, Isa, MulAdd};

/// The ONNX operator type of a fused attention node (samrt's own domain).
pub const OP_TYPE: &str = "SamrtAttention";
const DOMAIN: &str = "ai.samrt";

/// Rows of a kernel tile.
const TILE_ROWS: usize = 6;
/// Score values of one block of query rows, per thread: 192 KB of f32, an L2 share.
const BLOCK_SCORES: usize = 48 * 1024;
/// Query rows of one unit of work (keys and values are packed once per batch index and task).
const TASK_ROWS: usize = 512;
/// Tasks per thread of tract's pool, for balance between them.
const TASKS_PER_THREAD: usize = 8;

/// How the scores are scaled before the bias, as found in the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ScaleOp {
    None,
    Mul,
    Div,
}

/// The additive bias of the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BiasKind {
    /// No bias.
    None,
    /// One tensor broadcast (numpy rules) against the `[batch.., queries, keys]` scores.
    Dense,
    /// Segment Anything's decomposed relative-position bias: `rel_h` of shape
    /// `[batch.., qh, qw, kh, 1]` and `rel_w` of `[batch.., qh, qw, 1, kw]`, added to the scores
    /// viewed as `[batch.., qh, qw, kh, kw]`.
    Decomposed,
}

// ---------------------------------------------------------------------------------------------
// The ONNX rewrite.

/// Replaces every attention subgraph of `graph` by one `SamrtAttention` node; returns how many.
///
/// Matched, from the Softmax: `MatMul(a, b)`, optionally `Mul`/`Div` by a constant, then either
/// `Add`s of bias tensors, or `Reshape` → two `Add`s of unsqueezed relative-position terms →
/// `Reshape`; `Softmax`; `MatMul(·, v)`. Transposes feeding `a`, `b` and `v`, and one transposing
/// the result, are absorbed. Every intermediate value must be used by the chain alone. Whether
/// the shapes fit is checked when tract types the node; the caller falls back to the unfused
/// graph if they do not.
pub fn fuse(graph: &mut pb::GraphProto) -> usize {
    let nodes = &graph.node;
    let mut producer: HashMap<&str, usize> = HashMap::new();
    let mut consumers: HashMap<&str, usize> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        for output in &node.output {
            producer.insert(output, i);
        }
        for input in &node.input {
            *consumers.entry(input).or_default() += 1;
        }
    }
    let graph_outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let single_use = |name: &str| consumers.get(name) == Some(&1) && !graph_outputs.contains(name);
    let is_constant = |name: &str| {
        initializers.contains(name)
            || producer
                .get(name)
                .is_some_and(|&p| nodes[p].op_type == "Constant")
    };
    let op_of = |name: &str| producer.get(name).map(|&p| nodes[p].op_type.as_str());

    let mut removed: HashSet<usize> = HashSet::new();
    let mut fused: HashMap<usize, NodeProto> = HashMap::new();
    for (softmax_ix, softmax) in nodes.iter().enumerate() {
        if softmax.op_type != "Softmax" || softmax.input.len() != 1 {
            continue;
        }
        let mut chain = vec![softmax_ix];
        // Backwards from the softmax: bias adds (and the reshapes around decomposed ones).
        let mut current = softmax.input[0].as_str();
        let mut terms: Vec<String> = Vec::new();
        let mut reshapes = 0;
        let mut scale: Option<(ScaleOp, String)> = None;
        let scores_matmul = loop {
            if !single_use(current) {
                break None;
            }
            let Some(&ix) = producer.get(current) else {
                break None;
            };
            let node = &nodes[ix];
            match node.op_type.as_str() {
                "MatMul" if node.input.len() == 2 => break Some(ix),
                "Reshape" if terms.is_empty() && reshapes == 0 => {
                    reshapes = 1;
                    chain.push(ix);
                    current = &node.input[0];
                }
                "Reshape" if reshapes == 1 && !terms.is_empty() && scale.is_none() => {
                    reshapes = 2;
                    chain.push(ix);
                    current = &node.input[0];
                }
                "Add" if node.input.len() == 2 && reshapes != 2 && scale.is_none() => {
                    let main_side = |name: &str| {
                        matches!(
                            op_of(name),
                            Some("Add" | "Reshape" | "Mul" | "Div" | "MatMul")
                        ) && !is_constant(name)
                    };
                    let (main, term) = if main_side(&node.input[0]) && !main_side(&node.input[1]) {
                        (&node.input[0], &node.input[1])
                    } else if main_side(&node.input[1]) && !main_side(&node.input[0]) {
                        (&node.input[1], &node.input[0])
                    } else {
                        break None;
                    };
                    terms.push(term.clone());
                    chain.push(ix);
                    current = main;
                }
                op @ ("Mul" | "Div") if node.input.len() == 2 && scale.is_none() => {
                    let (main, factor) = if is_constant(&node.input[1]) {
                        (&node.input[0], &node.input[1])
                    } else if op == "Mul" && is_constant(&node.input[0]) {
                        (&node.input[1], &node.input[0])
                    } else {
                        break None;
                    };
                    let op = if op == "Mul" {
                        ScaleOp::Mul
                    } else {
                        ScaleOp::Div
                    };
                    scale = Some((op, factor.clone()));
                    chain.push(ix);
                    current = main;
                }
                _ => break None,
            }
        };
        let Some(scores_ix) = scores_matmul else {
            continue;
        };
        let decomposed = reshapes == 2;
        if (reshapes != 0 && !decomposed) || (decomposed && terms.len() != 2) {
            continue;
        }
        // Decomposed terms are Unsqueeze outputs; the bias is the unsqueezed tensors themselves.
        if decomposed && terms.iter().any(|t| op_of(t) != Some("Unsqueeze")) {
            continue;
        }
        chain.push(scores_ix);
        // Forwards: the softmax feeds the values' MatMul alone.
        let probs = &softmax.output[0];
        if !single_use(probs) {
            continue;
        }
        let Some(values_ix) = nodes
            .iter()
            .position(|n| n.op_type == "MatMul" && n.input.first() == Some(probs))
        else {
            continue;
        };
        chain.push(values_ix);
        let values_node = &nodes[values_ix];
        if values_node.input.len() != 2 {
            continue;
        }
        // Transposes absorbed into the operator's strided reads and writes.
        let absorb = |name: &str, chain: &mut Vec<usize>| -> (String, Vec<i64>) {
            if let Some(&ix) = producer.get(name) {
                let node = &nodes[ix];
                if node.op_type == "Transpose" && single_use(name) {
                    if let Some(perm) = node.attribute.iter().find(|a| a.name == "perm") {
                        chain.push(ix);
                        return (node.input[0].clone(), perm.ints.clone());
                    }
                }
            }
            (name.to_string(), Vec::new())
        };
        let scores = &nodes[scores_ix];
        let (a, a_perm) = absorb(&scores.input[0], &mut chain);
        let (b, b_perm) = absorb(&scores.input[1], &mut chain);
        let (v, v_perm) = absorb(&values_node.input[1], &mut chain);
        let mut output = values_node.output[0].clone();
        let mut out_perm = Vec::new();
        if single_use(&output) {
            if let Some(ix) = nodes
                .iter()
                .position(|n| n.op_type == "Transpose" && n.input.first() == Some(&output))
            {
                if let Some(perm) = nodes[ix].attribute.iter().find(|a| a.name == "perm") {
                    out_perm = perm.ints.clone();
                    output = nodes[ix].output[0].clone();
                    chain.push(ix);
                }
            }
        }
        if chain.iter().any(|ix| removed.contains(ix)) {
            continue;
        }
        let axis = softmax
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map_or(-1, |a| a.i);
        let mut inputs = vec![a, b, v];
        let scale_op = match &scale {
            Some((op, factor)) => {
                inputs.push(factor.clone());
                *op
            }
            None => ScaleOp::None,
        };
        // Terms were collected from the softmax backwards; keep the graph's order.
        inputs.extend(terms.into_iter().rev());
        let ints = |name: &str, ints: Vec<i64>| AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints,
            ..Default::default()
        };
        let int = |name: &str, i: i64| AttributeProto {
            name: name.into(),
            r#type: AttributeType::Int as i32,
            i,
            ..Default::default()
        };
        let node = NodeProto {
            name: format!("{}.samrt_attention", values_node.name),
            op_type: OP_TYPE.into(),
            domain: DOMAIN.into(),
            input: inputs,
            output: vec![output],
            attribute: vec![
                ints("q_perm", a_perm),
                ints("k_perm", b_perm),
                ints("v_perm", v_perm),
                ints("out_perm", out_perm),
                int(
                    "scale_op",
                    match scale_op {
                        ScaleOp::None => 0,
                        ScaleOp::Mul => 1,
                        ScaleOp::Div => 2,
                    },
                ),
                int("softmax_axis", axis),
                int("decomposed", decomposed as i64),
            ],
            ..Default::default()
        };
        removed.extend(chain.iter().copied());
        fused.insert(values_ix, node);
    }
    let count = fused.len();
    super::layer_norm::splice(graph, fused, &removed);
    count
}

// ---------------------------------------------------------------------------------------------
// The operator, as tract's parser builds it.

/// Builds a `SamrtAttention` node.
pub fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let perm = |name: &str| -> TractResult<Vec<usize>> {
        Ok(node.get_attr_opt_vec::<usize>(name)?.unwrap_or_default())
    };
    let scale_op = match node.get_attr_opt::<i64>("scale_op")?.unwrap_or(0) {
        0 => ScaleOp::None,
        1 => ScaleOp::Mul,
        2 => ScaleOp::Div,
        other => bail!("SamrtAttention: unknown scale_op {other}"),
    };
    let expansion = AttentionExpansion {
        q_perm: perm("q_perm")?,
        k_perm: perm("k_perm")?,
        v_perm: perm("v_perm")?,
        out_perm: perm("out_perm")?,
        scale_op,
        softmax_axis: node.get_attr_opt::<i64>("softmax_axis")?.unwrap_or(-1),
        decomposed: node.get_attr_opt::<i64>("decomposed")?.unwrap_or(0) != 0,
        window: match node.get_attr_opt_vec::<usize>("window")? {
            Some(w) => {
                ensure!(
                    w.len() == 5,
                    "SamrtAttention: window takes [height, width, q depth, k depth, v depth]"
                );
                Some(WindowSpec {
                    h: w[0],
                    w: w[1],
                    parts: [w[2], w[3], w[4]],
                })
            }
            None => None,
        },
    };
    Ok((expand(expansion), vec![]))
}

#[derive(Debug, Clone)]
struct AttentionExpansion {
    q_perm: Vec<usize>,
    k_perm: Vec<usize>,
    v_perm: Vec<usize>,
    out_perm: Vec<usize>,
    scale_op: ScaleOp,
    softmax_axis: i64,
    decomposed: bool,
    window: Option<WindowSpec>,
}

/// Windowed attention read from and written to the token grid (see [`super::window_attention`]):
/// the grid is `h` x `w` tokens; each token's row holds, per head, q, k and v of `parts` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowSpec {
    h: usize,
    w: usize,
    parts: [usize; 3],
}

/// A window's geometry, as typed: the spec and the window side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Window {
    spec: WindowSpec,
    side: usize,
}

/// The output shape of windowed attention for a `qkv` shape `[batch, tokens, heads x (q+k+v)]`.
fn window_output_shape<T: Clone + DimLike>(spec: &WindowSpec, qkv: &[T]) -> TractResult<Vec<T>> {
    ensure!(
        qkv.len() == 3,
        "SamrtAttention: windowed qkv must be [batch, tokens, channels]"
    );
    let head: usize = spec.parts.iter().sum();
    let channels = qkv[2].to_usize()?;
    ensure!(
        channels % head == 0,
        "SamrtAttention: {channels} qkv channels are not heads of {head}"
    );
    Ok(vec![
        qkv[0].clone(),
        qkv[1].clone(),
        T::from(channels / head * spec.parts[2]),
    ])
}

/// `shape` transposed by `perm` (ONNX `Transpose`: dimension `i` of the result is dimension
/// `perm[i]` of the input); an empty `perm` is the identity.
fn permuted<T: Clone>(shape: &[T], perm: &[usize]) -> TractResult<Vec<T>> {
    if perm.is_empty() {
        return Ok(shape.to_vec());
    }
    ensure!(
        perm.len() == shape.len() && {
            let mut seen = perm.to_vec();
            seen.sort_unstable();
            seen.iter().enumerate().all(|(i, &p)| i == p)
        },
        "SamrtAttention: permutation {perm:?} does not fit rank {}",
        shape.len()
    );
    Ok(perm.iter().map(|&p| shape[p].clone()).collect())
}

/// The output shape for the given q and v shapes (any dimension type).
fn output_shape<T: Clone>(
    q: &[T],
    v: &[T],
    q_perm: &[usize],
    v_perm: &[usize],
    out_perm: &[usize],
) -> TractResult<Vec<T>> {
    let q = permuted(q, q_perm)?;
    let v = permuted(v, v_perm)?;
    ensure!(
        q.len() >= 2 && v.len() == q.len(),
        "SamrtAttention: q and v must have the same rank, at least 2"
    );
    let mut logical = q.clone();
    *logical.last_mut().unwrap() = v.last().unwrap().clone();
    permuted(&logical, out_perm)
}

impl AttentionExpansion {
    /// The window side of a windowed node, checked against what the rewritten graph computed:
    /// the grid reshape `[b, h, w, c]`, the partition reshape `[b, h/side, side, w/side, side, c]`,
    /// the pads (bottom and right only, less than a window), the reverse reshape `[b, h/side,
    /// w/side, side, side, c]`, the qkv rows (`h·w` tokens) and the padding row.
    fn window_side(
        &self,
        model: &TypedModel,
        spec: WindowSpec,
        inputs: &[OutletId],
    ) -> TractResult<usize> {
        ensure!(
            inputs.len() >= 7,
            "SamrtAttention: windowed takes qkv, the padding row, four shapes and the bias"
        );
        let ints = |i: usize| -> TractResult<Vec<i64>> {
            let fact = model.outlet_fact(inputs[i])?;
            let konst = fact
                .konst
                .as_ref()
                .with_context(|| format!("SamrtAttention: window input {i} is not a constant"))?;
            Ok(konst
                .cast_to::<i64>()?
                .to_plain_array_view::<i64>()?
                .iter()
                .copied()
                .collect())
        };
        let (grid, window, pads, reverse) = (ints(2)?, ints(3)?, ints(4)?, ints(5)?);
        let (h, w) = (spec.h as i64, spec.w as i64);
        ensure!(
            grid.len() == 4 && grid[1] == h && grid[2] == w,
            "SamrtAttention: grid {grid:?} is not {h}x{w}"
        );
        ensure!(
            window.len() == 6 && window[2] == window[4] && window[2] > 0,
            "SamrtAttention: partition {window:?} is not square windows"
        );
        let side = window[2];
        let (nh, nw) = (window[1], window[3]);
        ensure!(
            pads == [0, 0, 0, 0, 0, nh * side - h, nw * side - w, 0]
                && (0..side).contains(&(nh * side - h))
                && (0..side).contains(&(nw * side - w))
                && window[0] == grid[0]
                && window[5] == grid[3],
            "SamrtAttention: pads {pads:?} and partition {window:?} do not fit grid {grid:?}"
        );
        ensure!(
            reverse.len() == 6 && reverse[..5] == [grid[0], nh, nw, side, side],
            "SamrtAttention: reverse partition {reverse:?} does not fit {window:?}"
        );
        let qkv = model
            .outlet_fact(inputs[0])?
            .shape
            .as_concrete()
            .map(|s| s.to_vec());
        let pad = model
            .outlet_fact(inputs[1])?
            .shape
            .as_concrete()
            .map(|s| s.to_vec());
        let head: usize = spec.parts.iter().sum();
        ensure!(
            matches!(&qkv, Some(q) if q.len() == 3 && q[1] == spec.h * spec.w && q[2] % head == 0)
                && matches!((&qkv, &pad), (Some(q), Some(p)) if p.iter().product::<usize>() == q[2]),
            "SamrtAttention: qkv {qkv:?} and padding row {pad:?} do not fit a {h}x{w} grid"
        );
        Ok(side as usize)
    }
}

impl Expansion for AttentionExpansion {
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
            inputs.len() >= 3,
            "SamrtAttention takes q, k, v and optional terms"
        );
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[1].datum_type, &outputs[0].datum_type)?;
        if self.window.is_none() {
            s.equals(&inputs[2].datum_type, &outputs[0].datum_type)?;
        }
        s.equals(&inputs[0].rank, &outputs[0].rank)?;
        if let Some(spec) = self.window {
            s.given(&inputs[0].shape, move |s, qkv| {
                let shape = window_output_shape(&spec, &qkv)?;
                s.equals(&outputs[0].shape, ShapeFactoid::from(shape))?;
                Ok(())
            })?;
            return Ok(());
        }
        s.given_2(&inputs[0].shape, &inputs[2].shape, move |s, q, v| {
            let shape = output_shape(&q, &v, &self.q_perm, &self.v_perm, &self.out_perm)?;
            s.equals(&outputs[0].shape, ShapeFactoid::from(shape))?;
            Ok(())
        })?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let (mut rest, window) = match self.window {
            Some(spec) => {
                let side = self.window_side(model, spec, inputs)?;
                (&inputs[6..], Some(Window { spec, side }))
            }
            None => (&inputs[3..], None),
        };
        let scale = if self.scale_op == ScaleOp::None {
            1.0
        } else {
            let fact = model.outlet_fact(rest[0])?;
            let konst = fact
                .konst
                .as_ref()
                .context("SamrtAttention: the scale is not a constant")?;
            ensure!(
                konst.len() == 1,
                "SamrtAttention: the scale is not a scalar"
            );
            let value = konst.cast_to_scalar::<f32>()?;
            rest = &rest[1..];
            if self.scale_op == ScaleOp::Div {
                1.0 / value
            } else {
                value
            }
        };
        let bias = match (rest.len(), self.decomposed) {
            (0, false) => BiasKind::None,
            (1, false) => BiasKind::Dense,
            (2, true) => BiasKind::Decomposed,
            (n, _) => bail!("SamrtAttention: {n} bias terms are not supported"),
        };
        ensure!(
            window.is_none() || bias != BiasKind::Decomposed,
            "SamrtAttention: windows with a decomposed bias are not supported"
        );
        let op = Attention {
            q_perm: self.q_perm.clone(),
            k_perm: self.k_perm.clone(),
            v_perm: self.v_perm.clone(),
            out_perm: self.out_perm.clone(),
            scale,
            bias,
            window,
        };
        let direct = if window.is_some() { 2 } else { 3 };
        let mut wired: TVec<OutletId> = inputs[..direct].iter().copied().collect();
        wired.extend(rest.iter().copied());
        // The shapes must fit the operator's contract, or the graph is not fused (see `fuse`).
        // With a symbolic dimension (the decoder's plan for any point count) the ranks are
        // checked here and the sizes by `geometry` at every run.
        let facts: Vec<TypedFact> = wired
            .iter()
            .map(|o| model.outlet_fact(*o).cloned())
            .collect::<TractResult<_>>()?;
        ensure!(
            facts.iter().all(|f| f.datum_type == f32::datum_type()),
            "SamrtAttention: f32 only"
        );
        let concrete: Option<Vec<Vec<usize>>> = facts
            .iter()
            .map(|f| f.shape.as_concrete().map(|s| s.to_vec()))
            .collect();
        let batch_rank = match concrete {
            Some(shapes) => {
                let shape_refs: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
                op.geometry(&shape_refs)?.batch.len()
            }
            None => {
                ensure!(
                    window.is_none(),
                    "SamrtAttention: windowed attention needs concrete shapes"
                );
                let q_rank = facts[0].rank();
                ensure!(
                    q_rank >= 2 && facts[1].rank() == q_rank && facts[2].rank() == q_rank,
                    "SamrtAttention: q, k and v must have one rank, at least 2"
                );
                q_rank - 2
            }
        };
        let rank = batch_rank as i64 + 2;
        let axis_ok = match bias {
            // The softmax ran on the [batch.., queries, keys] reshape.
            BiasKind::Decomposed => self.softmax_axis == -1 || self.softmax_axis == 2,
            _ => self.softmax_axis == -1 || self.softmax_axis == rank - 1,
        };
        ensure!(
            axis_ok && (bias != BiasKind::Decomposed || batch_rank == 1),
            "SamrtAttention: softmax axis {} is not the key axis",
            self.softmax_axis
        );
        model.wire_node(prefix, op, &wired)
    }
}

// ---------------------------------------------------------------------------------------------
// The typed operator.

/// `softmax(q·kᵀ · scale + bias) · v` over the last two axes, every leading axis a batch axis.
/// `q`, `k` (given as kᵀ: `[.., d, keys]`) and `v` are read through the permutations of the
/// transposes they came through; the output is written through `out_perm`.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    q_perm: Vec<usize>,
    k_perm: Vec<usize>,
    v_perm: Vec<usize>,
    out_perm: Vec<usize>,
    scale: f32,
    bias: BiasKind,
    /// Windows read from (and results written to) the token grid, padding included.
    window: Option<Window>,
}

impl Eq for Attention {}

impl std::hash::Hash for Attention {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.q_perm.hash(state);
        self.k_perm.hash(state);
        self.v_perm.hash(state);
        self.out_perm.hash(state);
        self.scale.to_bits().hash(state);
        self.bias.hash(state);
        self.window.hash(state);
    }
}

/// Element strides of a C-contiguous shape.
fn strides_of(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![1isize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1] as isize;
    }
    strides
}

/// Strides of `shape` (contiguous) broadcast against `target` (numpy rules, right-aligned): 0
/// where the tensor repeats.
fn broadcast_strides(shape: &[usize], target: &[usize]) -> TractResult<Vec<isize>> {
    ensure!(
        shape.len() <= target.len(),
        "SamrtAttention: bias of rank {} against scores of rank {}",
        shape.len(),
        target.len()
    );
    let own = strides_of(shape);
    let offset = target.len() - shape.len();
    (0..target.len())
        .map(|i| {
            if i < offset {
                return Ok(0);
            }
            let (dim, want) = (shape[i - offset], target[i]);
            if dim == want {
                Ok(own[i - offset])
            } else if dim == 1 {
                Ok(0)
            } else {
                bail!("SamrtAttention: bias shape {shape:?} does not broadcast to {target:?}")
            }
        })
        .collect()
}

/// Where each value lives, in elements, for one call.
#[derive(Debug, Clone)]
struct Geometry {
    batch: Vec<usize>,
    queries: usize,
    depth: usize,
    keys: usize,
    depth_v: usize,
    /// Logical strides `[batch.., rows, cols]` of q, kᵀ, v and the output.
    q: Vec<isize>,
    k: Vec<isize>,
    v: Vec<isize>,
    out: Vec<isize>,
    out_shape: Vec<usize>,
    bias: BiasGeometry,
    window: Option<WindowGeometry>,
}

/// Where a window's tokens live in the grid: window `i` (row-major over batch, window rows,
/// window columns) holds `side` x `side` tokens, those past the grid's edge being padding.
#[derive(Debug, Clone)]
struct WindowGeometry {
    h: usize,
    w: usize,
    side: usize,
    /// Windows down and across.
    down: usize,
    across: usize,
    /// Values of a token's qkv row, of one head's part of it, and of an output row.
    row: usize,
    head: usize,
    out_row: usize,
    /// Offsets of k and v in a head's part.
    k_offset: usize,
    v_offset: usize,
}

/// Marks a window position that is padding.
const PADDING: usize = usize::MAX;

impl WindowGeometry {
    /// Grid token indices of window `index`'s positions, [`PADDING`] outside the grid.
    fn tokens(&self, index: usize, tokens: &mut [usize]) {
        let per_image = self.down * self.across;
        let (image, wy, wx) = (
            index / per_image,
            index % per_image / self.across,
            index % self.across,
        );
        for (r, token) in tokens.iter_mut().enumerate() {
            let (y, x) = (
                wy * self.side + r / self.side,
                wx * self.side + r % self.side,
            );
            *token = if y < self.h && x < self.w {
                (image * self.h + y) * self.w + x
            } else {
                PADDING
            };
        }
    }
}

#[derive(Debug, Clone)]
enum BiasGeometry {
    None,
    /// Strides `[batch.., queries, keys]`.
    Dense(Vec<isize>),
    /// `qw` and the strides `[batch.., qh, qw, k*]` of `rel_h` (k* = kh) and `rel_w` (k* = kw).
    Decomposed {
        qw: usize,
        kw: usize,
        h: Vec<isize>,
        w: Vec<isize>,
    },
}

impl Attention {
    /// The scale of attention over heads split from the projections' rows, without a bias or
    /// windows: q `[b, queries, heads, d]`, k and v `[b, keys, heads, d]` read as
    /// `[b, heads, ..]` (kᵀ as `[b, heads, d, keys]`), the output `[b, heads, queries, d]`.
    pub(super) fn split_heads_scale(&self) -> Option<f32> {
        let plain = self.bias == BiasKind::None
            && self.window.is_none()
            && self.q_perm == [0, 2, 1, 3]
            && self.k_perm == [0, 2, 3, 1]
            && self.v_perm == [0, 2, 1, 3]
            && self.out_perm.is_empty();
        plain.then_some(self.scale)
    }

    /// Checks the shapes of one call's inputs and lays out its strides.
    fn geometry(&self, shapes: &[&[usize]]) -> TractResult<Geometry> {
        if let Some(window) = self.window {
            return self.window_geometry(window, shapes);
        }
        let logical = |shape: &[usize], perm: &[usize]| -> TractResult<(Vec<usize>, Vec<isize>)> {
            Ok((permuted(shape, perm)?, permuted(&strides_of(shape), perm)?))
        };
        let (qs, q) = logical(shapes[0], &self.q_perm)?;
        let (ks, k) = logical(shapes[1], &self.k_perm)?;
        let (vs, v) = logical(shapes[2], &self.v_perm)?;
        let rank = qs.len();
        ensure!(
            rank >= 2 && ks.len() == rank && vs.len() == rank,
            "SamrtAttention: q, k and v must have one rank, at least 2"
        );
        let batch = qs[..rank - 2].to_vec();
        let (queries, depth) = (qs[rank - 2], qs[rank - 1]);
        let (keys, depth_v) = (vs[rank - 2], vs[rank - 1]);
        ensure!(
            ks[..rank - 2] == batch[..] && vs[..rank - 2] == batch[..],
            "SamrtAttention: batch axes differ: q {qs:?}, kᵀ {ks:?}, v {vs:?}"
        );
        ensure!(
            ks[rank - 2] == depth && ks[rank - 1] == keys && keys > 0 && depth > 0,
            "SamrtAttention: kᵀ {ks:?} does not fit q {qs:?} and v {vs:?}"
        );
        let mut logical_out = qs.clone();
        logical_out[rank - 1] = depth_v;
        let out_shape = permuted(&logical_out, &self.out_perm)?;
        let phys = strides_of(&out_shape);
        let out = if self.out_perm.is_empty() {
            phys
        } else {
            // Logical axis j is physical axis i where out_perm[i] == j.
            let mut out = vec![0; rank];
            for (i, &j) in self.out_perm.iter().enumerate() {
                out[j] = phys[i];
            }
            out
        };
        let mut scores_shape = batch.clone();
        scores_shape.extend([queries, keys]);
        let bias = match self.bias {
            BiasKind::None => {
                ensure!(shapes.len() == 3, "SamrtAttention: unexpected bias");
                BiasGeometry::None
            }
            BiasKind::Dense => {
                ensure!(
                    shapes.len() == 4,
                    "SamrtAttention: one bias tensor expected"
                );
                BiasGeometry::Dense(broadcast_strides(shapes[3], &scores_shape)?)
            }
            BiasKind::Decomposed => {
                ensure!(
                    shapes.len() == 5,
                    "SamrtAttention: rel_h and rel_w expected"
                );
                let (h, w) = (shapes[3], shapes[4]);
                ensure!(
                    h.len() == rank + 2 && w.len() == rank + 2,
                    "SamrtAttention: relative-position terms {h:?}, {w:?} for scores {scores_shape:?}"
                );
                let n = h.len();
                let (qh, qw, kh, kw) = (h[n - 4], h[n - 3], h[n - 2], w[n - 1]);
                ensure!(
                    h[n - 1] == 1
                        && w[n - 2] == 1
                        && w[n - 4] == qh
                        && w[n - 3] == qw
                        && qh * qw == queries
                        && kh * kw == keys,
                    "SamrtAttention: relative-position terms {h:?}, {w:?} do not decompose scores {scores_shape:?}"
                );
                let mut target = batch.clone();
                target.extend([qh, qw, kh, 1]);
                let hs = broadcast_strides(h, &target)?;
                target[n - 2] = 1;
                target[n - 1] = kw;
                let ws = broadcast_strides(w, &target)?;
                // [batch.., qh, qw, kh] and [batch.., qh, qw, kw].
                let h = hs[..n - 1].to_vec();
                let mut w = ws[..n - 2].to_vec();
                w.push(ws[n - 1]);
                BiasGeometry::Decomposed { qw, kw, h, w }
            }
        };
        Ok(Geometry {
            batch,
            queries,
            depth,
            keys,
            depth_v,
            q,
            k,
            v,
            out,
            out_shape,
            bias,
            window: None,
        })
    }

    /// [`Self::geometry`] of windowed attention: inputs qkv `[batch, h·w, heads x (q+k+v)]`, the
    /// padding row (what the qkv rows of the partition's zero padding are) and the bias.
    fn window_geometry(&self, window: Window, shapes: &[&[usize]]) -> TractResult<Geometry> {
        let Window { spec, side } = window;
        ensure!(
            shapes.len() == 2 + (self.bias != BiasKind::None) as usize,
            "SamrtAttention: windowed takes qkv, the padding row and the bias"
        );
        let (qkv, pad) = (shapes[0], shapes[1]);
        let head: usize = spec.parts.iter().sum();
        ensure!(
            qkv.len() == 3
                && qkv[1] == spec.h * spec.w
                && qkv[2] % head == 0
                && pad.iter().product::<usize>() == qkv[2]
                && side > 0
                && spec.parts[0] == spec.parts[1],
            "SamrtAttention: qkv {qkv:?} and padding row {pad:?} do not fit {spec:?}"
        );
        let heads = qkv[2] / head;
        let (down, across) = (spec.h.div_ceil(side), spec.w.div_ceil(side));
        let windows = qkv[0] * down * across;
        let tokens = side * side;
        let bias = match self.bias {
            BiasKind::None => BiasGeometry::None,
            BiasKind::Dense => BiasGeometry::Dense(broadcast_strides(
                shapes[2],
                &[windows, heads, tokens, tokens],
            )?),
            BiasKind::Decomposed => bail!("SamrtAttention: windows with a decomposed bias"),
        };
        Ok(Geometry {
            batch: vec![windows, heads],
            queries: tokens,
            depth: spec.parts[0],
            keys: tokens,
            depth_v: spec.parts[2],
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            out: Vec::new(),
            out_shape: vec![qkv[0], qkv[1], heads * spec.parts[2]],
            bias,
            window: Some(WindowGeometry {
                h: spec.h,
                w: spec.w,
                side,
                down,
                across,
                row: qkv[2],
                head,
                out_row: heads * spec.parts[2],
                k_offset: spec.parts[0],
                v_offset: spec.parts[0] + spec.parts[1],
            }),
        })
    }
}

impl Op for Attention {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        if let Some(Window { spec, side }) = &self.window {
            return Ok(vec![format!(
                "scale: {}, bias: {:?}, {side}x{side} windows over a {}x{} grid, parts {:?}",
                self.scale, self.bias, spec.h, spec.w, spec.parts
            )]);
        }
        Ok(vec![format!(
            "scale: {}, bias: {:?}, perms q {:?} k {:?} v {:?} out {:?}",
            self.scale, self.bias, self.q_perm, self.k_perm, self.v_perm, self.out_perm
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for Attention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let q: Vec<TDim> = inputs[0].shape.iter().cloned().collect();
        if let Some(window) = &self.window {
            let shape = window_output_shape(&window.spec, &q)?;
            return Ok(tvec!(inputs[0].datum_type.fact(shape)));
        }
        let v: Vec<TDim> = inputs[2].shape.iter().cloned().collect();
        let shape = output_shape(&q, &v, &self.q_perm, &self.v_perm, &self.out_perm)?;
        Ok(tvec!(inputs[0].datum_type.fact(shape)))
    }

    as_op!();
}

/// The largest scratch (in f32 values) one attention task has held, since the process started:
/// for tests that hold the operator to its block-sized memory.
pub fn peak_scratch_values() -> usize {
    PEAK_SCRATCH.load(Ordering::Relaxed)
}

static PEAK_SCRATCH: AtomicUsize = AtomicUsize::new(0);

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape()).collect();
        let geometry = self.geometry(&shapes)?;
        let views: Vec<_> = inputs
            .iter()
            .map(|t| t.try_as_plain_ram())
            .collect::<TractResult<_>>()?;
        let data: Vec<&[f32]> = views
            .iter()
            .map(|v| v.as_slice::<f32>())
            .collect::<TractResult<_>>()?;
        // SAFETY: f32 has no invalid bit patterns, and the tasks write every output element.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&geometry.out_shape)? };
        {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            run(&geometry, self.scale, &data, out);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

// ---------------------------------------------------------------------------------------------
// The computation.

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Runs the whole call over tract's thread pool. The work is cut into units of (batch index,
/// at most [`TASK_ROWS`] query rows); a task takes a run of consecutive units and one scratch for
/// all of them, so that many small windows do not each allocate. A unit's result does not depend
/// on which task runs it: the same bits at every thread count.
fn run(geometry: &Geometry, scale: f32, data: &[&[f32]], out: &mut [f32]) {
    let batches: usize = geometry.batch.iter().product();
    let row_units = geometry.queries.div_ceil(TASK_ROWS);
    let units = batches * row_units;
    let threads = super::threads::threads();
    let tasks = units.min(threads * TASKS_PER_THREAD);
    let out = OutPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let range = t * units / tasks..(t + 1) * units / tasks;
        // SAFETY: tasks write disjoint (batch, query row) ranges of the output.
        unsafe {
            match isa() {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => task_avx512(geometry, scale, data, out, range),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => task_avx2(geometry, scale, data, out, range),
                Isa::Baseline => task_body::<16, Baseline>(geometry, scale, data, out, range),
            }
        }
    };
    if threads > 1 {
        super::threads::for_each_unit(tasks, || (), |_, unit| task(unit));
    } else {
        (0..tasks).for_each(task);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn task_avx512(
    g: &Geometry,
    scale: f32,
    data: &[&[f32]],
    out: OutPtr,
    units: std::ops::Range<usize>,
) {
    // A few keys and a narrow value (the decoder's image-to-token attention: 7 tokens, heads of
    // 16): 16 lanes (256-bit tiles, which AVX-512 CPUs run) pad a score row and a value row to
    // half of what 32 do.
    if g.window.is_none() && g.keys <= 16 && g.depth_v <= 16 {
        return unsafe { task_body::<16, Fused>(g, scale, data, out, units) };
    }
    unsafe { task_body::<32, Fused>(g, scale, data, out, units) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2(
    g: &Geometry,
    scale: f32,
    data: &[&[f32]],
    out: OutPtr,
    units: std::ops::Range<usize>,
) {
    unsafe { task_body::<16, Fused>(g, scale, data, out, units) }
}

/// `c[r][0..W] = Σₖ a[r][k] · b[k][0..W]` for `R` rows: one register tile.
///
/// # Safety
/// `a` holds `R` rows of `lda` with `k` values each, `b` `k` rows of `ldb` with `W` values from
/// its start, `c` `R` rows of `ldc` with `W` values.
#[inline(always)]
unsafe fn tile<const R: usize, const W: usize, F: MulAdd>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
) {
    // The same sums in intrinsics where the ISA is known from `W` and `F` (AVX-512 runs W = 32
    // fused, AVX2 W = 16 fused; see `run`): the plain form below is not kept in registers.
    #[cfg(target_arch = "x86_64")]
    if F::FUSED && W == 32 {
        return unsafe { tile_avx512::<R>(a, lda, b, ldb, k, c, ldc) };
    }
    #[cfg(target_arch = "x86_64")]
    if F::FUSED && W == 16 {
        return unsafe { tile_avx2::<R>(a, lda, b, ldb, k, c, ldc) };
    }
    let mut acc = [[0f32; W]; R];
    for kk in 0..k {
        let brow = unsafe { &*(b.add(kk * ldb) as *const [f32; W]) };
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = unsafe { *a.add(r * lda + kk) };
            for j in 0..W {
                acc[j] = F::mul_add(av, brow[j], acc[j]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), c.add(r * ldc), W) };
    }
}

/// [`tile`] for W = 32 in AVX-512 intrinsics (inlined into the AVX-512 task only).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_avx512<const R: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract; reached from the AVX-512 task alone.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for kk in 0..k {
            let b0 = _mm512_loadu_ps(b.add(kk * ldb));
            let b1 = _mm512_loadu_ps(b.add(kk * ldb + 16));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r * lda + kk));
                acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc), acc[0]);
            _mm512_storeu_ps(c.add(r * ldc + 16), acc[1]);
        }
    }
}

/// [`tile`] for W = 16 in AVX2 + FMA intrinsics (inlined into the AVX2 task only).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_avx2<const R: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract; reached from the AVX2 task alone.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for kk in 0..k {
            let b0 = _mm256_loadu_ps(b.add(kk * ldb));
            let b1 = _mm256_loadu_ps(b.add(kk * ldb + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*a.add(r * lda + kk));
                acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * ldc), acc[0]);
            _mm256_storeu_ps(c.add(r * ldc + 8), acc[1]);
        }
    }
}

/// `c = a · b` for `rows` (a multiple of [`TILE_ROWS`]) by `cols` (a multiple of `W`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn matmul<const W: usize, F: MulAdd>(
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    k: usize,
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    cols: usize,
) {
    debug_assert!(rows.is_multiple_of(TILE_ROWS) && cols.is_multiple_of(W));
    assert!(a.len() >= (rows - 1) * lda + k || rows == 0);
    assert!(b.len() >= k.saturating_sub(1) * ldb + cols || k == 0);
    assert!(c.len() >= (rows.max(1) - 1) * ldc + cols);
    for j in (0..cols).step_by(W) {
        for i in (0..rows).step_by(TILE_ROWS) {
            // SAFETY: bounds asserted above.
            unsafe {
                tile::<TILE_ROWS, W, F>(
                    a.as_ptr().add(i * lda),
                    lda,
                    b.as_ptr().add(j),
                    ldb,
                    k,
                    c.as_mut_ptr().add(i * ldc + j),
                    ldc,
                )
            };
        }
    }
}

/// `dst[i] = src[start + i·stride]`; a plain copy when `stride` is 1.
#[inline(always)]
fn gather(src: &[f32], start: isize, stride: isize, dst: &mut [f32]) {
    let start = start as usize;
    if stride == 1 {
        dst.copy_from_slice(&src[start..start + dst.len()]);
    } else {
        for (i, x) in dst.iter_mut().enumerate() {
            *x = src[(start as isize + i as isize * stride) as usize];
        }
    }
}

/// `f` over `W` lanes (a power of two) pairwise, halving: vector operations, not a scalar chain.
#[inline(always)]
fn reduce<const W: usize>(mut lanes: [f32; W], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut n = W;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            lanes[i] = f(lanes[i], lanes[i + n]);
        }
    }
    lanes[0]
}

/// Softmax numerators of one row of scores in place, returning `1 / Σ`: `row` holds the `keys`
/// scores then padding up to a multiple of `W`, which is set to -∞ and so takes no part (its
/// `e^x` is below 2⁻¹²⁵, nothing beside a sum ≥ 1; the value products never read it).
#[inline(always)]
fn softmax_numerators<const W: usize, F: MulAdd>(row: &mut [f32], keys: usize) -> f32 {
    debug_assert!(row.len().is_multiple_of(W) && keys <= row.len());
    row[keys..].fill(f32::NEG_INFINITY);
    let mut lanes = [f32::NEG_INFINITY; W];
    for chunk in row.chunks_exact(W) {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = if x > *lane { x } else { *lane };
        }
    }
    let max = reduce(lanes, |a, b| if a > b { a } else { b });
    let mut lanes = [0f32; W];
    for chunk in row.chunks_exact_mut(W) {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            *x = exp_nonpositive::<F>(*x - max);
            *lane += *x;
        }
    }
    1.0 / reduce(lanes, |a, b| a + b)
}

/// Offset of batch index `b` (row-major over `batch`) with the given per-axis strides.
fn batch_offset(batch: &[usize], strides: &[isize], mut b: usize) -> isize {
    let mut offset = 0;
    for (dim, stride) in batch.iter().zip(strides).rev() {
        offset += (b % dim) as isize * stride;
        b /= dim;
    }
    offset
}

fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// One task: the units `units` (see [`run`]), with one scratch.
///
/// # Safety
/// `out` is the output of `g.out_shape`; no other task writes the same units.
#[inline(always)]
unsafe fn task_body<const W: usize, F: MulAdd>(
    g: &Geometry,
    scale: f32,
    data: &[&[f32]],
    out: OutPtr,
    units: std::ops::Range<usize>,
) {
    if let Some(window) = &g.window {
        return unsafe { window_body::<W, F>(g, window, scale, data, out, units) };
    }
    if few_keys(g) {
        return unsafe { few_keys_body::<F>(g, scale, data, out, units) };
    }
    let rank = g.batch.len() + 2;
    let (d, nk, dv) = (g.depth, g.keys, g.depth_v);
    let nk_pad = round_up(nk, W);
    let dv_pad = round_up(dv, W);
    let row_units = g.queries.div_ceil(TASK_ROWS);
    let block = (BLOCK_SCORES / nk_pad / TILE_ROWS * TILE_ROWS)
        .clamp(TILE_ROWS, round_up(g.queries.min(TASK_ROWS), TILE_ROWS));
    let scratch = d * nk_pad + nk * dv_pad + block * (d + nk_pad + dv_pad);
    PEAK_SCRATCH.fetch_max(scratch, Ordering::Relaxed);
    // Padding (kᵀ's columns past nk, v's past dv) stays zero: only the first nk / dv are written.
    let mut kt = vec![0f32; d * nk_pad];
    let mut vp = vec![0f32; nk * dv_pad];
    let mut qp = vec![0f32; block * d];
    let mut s = vec![0f32; block * nk_pad];
    let mut o = vec![0f32; block * dv_pad];

    let (q, k, v) = (data[0], data[1], data[2]);
    let (q_row, q_col) = (g.q[rank - 2], g.q[rank - 1]);
    let (k_row, k_col) = (g.k[rank - 2], g.k[rank - 1]);
    let (v_row, v_col) = (g.v[rank - 2], g.v[rank - 1]);
    let (o_row, o_col) = (g.out[rank - 2], g.out[rank - 1]);

    // q rows are read in place when contiguous (whole tiles; a last partial tile is copied and
    // zero-padded), and v rows when contiguous and either a whole number of tiles wide or
    // followed by other values to read the rest of a tile from (the next head's, say: they
    // only make output columns past dv, which are not stored).
    let q_in_place = q_col == 1;
    let mut v_in_place = false;
    let mut loaded = None;
    for unit in units {
        let (b, chunk) = (unit / row_units, unit % row_units);
        let rows = chunk * TASK_ROWS..((chunk + 1) * TASK_ROWS).min(g.queries);
        let q_base = batch_offset(&g.batch, &g.q, b);
        let o_base = batch_offset(&g.batch, &g.out, b);
        let v_base = batch_offset(&g.batch, &g.v, b);
        if loaded != Some(b) {
            loaded = Some(b);
            let k_base = batch_offset(&g.batch, &g.k, b);
            // kᵀ as d rows of keys, v as key rows of depth_v, zero-padded to the tile width.
            // Read along whichever axis of kᵀ is contiguous in memory.
            if k_row.abs() <= k_col.abs() {
                let last = k_base + (nk as isize - 1) * k_col + (d as isize - 1) * k_row;
                assert!(k_base >= 0 && (last as usize) < k.len() && kt.len() >= d * nk_pad);
                // Keys outer, so that each key's row is read once, contiguously when its
                // stride is 1; stores four keys at a time along kᵀ's rows.
                let mut n = 0;
                while n < nk {
                    let take = (nk - n).min(4);
                    let src = k_base + n as isize * k_col;
                    for dd in 0..d {
                        let row = dd * nk_pad + n;
                        for i in 0..take {
                            // SAFETY: the first and last indices are asserted above, strides ≥ 0.
                            unsafe {
                                *kt.get_unchecked_mut(row + i) = *k.get_unchecked(
                                    (src + i as isize * k_col + dd as isize * k_row) as usize,
                                )
                            };
                        }
                    }
                    n += take;
                }
            } else {
                for dd in 0..d {
                    gather(
                        k,
                        k_base + dd as isize * k_row,
                        k_col,
                        &mut kt[dd * nk_pad..dd * nk_pad + nk],
                    );
                }
            }
            let v_reach = v_base as usize + nk.saturating_sub(1) * v_row as usize + dv_pad;
            v_in_place = v_col == 1 && (dv % W == 0 || v_reach <= v.len());
            if !v_in_place {
                for n in 0..nk {
                    let dst = &mut vp[n * dv_pad..n * dv_pad + dv];
                    gather(v, v_base + n as isize * v_row, v_col, dst);
                }
            }
        }

        let mut start = rows.start;
        while start < rows.end {
            let count = block.min(rows.end - start);
            let padded = round_up(count, TILE_ROWS);
            let direct = if q_in_place {
                count / TILE_ROWS * TILE_ROWS
            } else {
                0
            };
            if direct > 0 {
                let a = &q[(q_base + start as isize * q_row) as usize..];
                matmul::<W, F>(
                    a,
                    q_row as usize,
                    &kt,
                    nk_pad,
                    d,
                    &mut s,
                    nk_pad,
                    direct,
                    nk_pad,
                );
            }
            for r in 0..padded - direct {
                let dst = &mut qp[r * d..(r + 1) * d];
                if direct + r < count {
                    let src = q_base + (start + direct + r) as isize * q_row;
                    gather(q, src, q_col, dst);
                } else {
                    dst.fill(0.0);
                }
            }
            if padded > direct {
                let rest = &mut s[direct * nk_pad..];
                matmul::<W, F>(
                    &qp,
                    d,
                    &kt,
                    nk_pad,
                    d,
                    rest,
                    nk_pad,
                    padded - direct,
                    nk_pad,
                );
            }
            let mut inv_sums = [0f32; BLOCK_SCORES / TILE_ROWS];
            for r in 0..count {
                let row = &mut s[r * nk_pad..(r + 1) * nk_pad];
                add_bias(g, &data[3..], b, start + r, scale, &mut row[..nk]);
                inv_sums[r] = softmax_numerators::<W, F>(row, nk);
            }
            if v_in_place {
                let bv = &v[v_base as usize..];
                matmul::<W, F>(
                    &s,
                    nk_pad,
                    bv,
                    v_row as usize,
                    nk,
                    &mut o,
                    dv_pad,
                    padded,
                    dv_pad,
                );
            } else {
                matmul::<W, F>(&s, nk_pad, &vp, dv_pad, nk, &mut o, dv_pad, padded, dv_pad);
            }
            for (r, &inv) in inv_sums.iter().enumerate().take(count) {
                let dst = o_base + (start + r) as isize * o_row;
                let src = &o[r * dv_pad..r * dv_pad + dv];
                if o_col == 1 {
                    // SAFETY: inside the output; this task alone writes these rows.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.0.offset(dst), dv) };
                    for (y, &x) in dst.iter_mut().zip(src) {
                        *y = x * inv;
                    }
                } else {
                    for (c, &x) in src.iter().enumerate() {
                        // SAFETY: as above.
                        unsafe { *out.0.offset(dst + c as isize * o_col) = x * inv };
                    }
                }
            }
            start += count;
        }
    }
}

/// Lanes of [`few_keys_body`]: query rows at a time, and the head width it takes.
const FEW: usize = 16;

/// Whether [`few_keys_body`] takes this attention: no bias, at most [`FEW`] keys, heads of
/// [`FEW`] values, q and output rows contiguous (SAM's image-to-token attention: 4096 image
/// tokens attending to the prompt's 5–10 tokens in heads of 16).
fn few_keys(g: &Geometry) -> bool {
    let rank = g.batch.len() + 2;
    matches!(g.bias, BiasGeometry::None)
        && g.keys <= FEW
        && g.depth == FEW
        && g.depth_v == FEW
        && g.q[rank - 1] == 1
        && g.out[rank - 1] == 1
}

/// One task of an attention with few keys (see [`few_keys`]), [`FEW`] queries at a time with
/// the queries along the vector lanes: the scores of each key, the softmax over keys and the
/// weighted sum of values are lane-wise operations, with no padding of the keys to a tile
/// width and no horizontal sums. Each query's sums run in a fixed order (results do not depend
/// on the split).
///
/// # Safety
/// `out` is the output of `g.out_shape`; no other task writes the same units.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // (query r of a block is lane r of each array)
unsafe fn few_keys_body<F: MulAdd>(
    g: &Geometry,
    scale: f32,
    data: &[&[f32]],
    out: OutPtr,
    units: std::ops::Range<usize>,
) {
    let rank = g.batch.len() + 2;
    let nk = g.keys;
    let (q, k, v) = (data[0], data[1], data[2]);
    let q_row = g.q[rank - 2];
    let (k_row, k_col) = (g.k[rank - 2], g.k[rank - 1]);
    let (v_row, v_col) = (g.v[rank - 2], g.v[rank - 1]);
    let o_row = g.out[rank - 2];
    let row_units = g.queries.div_ceil(TASK_ROWS);
    // Key n's values (kᵀ's column n) and value row n, for the batch entry loaded.
    let mut keys = [[0f32; FEW]; FEW];
    let mut values = [[0f32; FEW]; FEW];
    let mut loaded = None;
    for unit in units {
        let (b, chunk) = (unit / row_units, unit % row_units);
        if loaded != Some(b) {
            loaded = Some(b);
            let k_base = batch_offset(&g.batch, &g.k, b);
            let v_base = batch_offset(&g.batch, &g.v, b);
            for n in 0..nk {
                for c in 0..FEW {
                    keys[n][c] = k[(k_base + c as isize * k_row + n as isize * k_col) as usize];
                    values[n][c] = v[(v_base + n as isize * v_row + c as isize * v_col) as usize];
                }
            }
        }
        let q_base = batch_offset(&g.batch, &g.q, b);
        let o_base = batch_offset(&g.batch, &g.out, b);
        let rows = chunk * TASK_ROWS..((chunk + 1) * TASK_ROWS).min(g.queries);
        let mut start = rows.start;
        while start < rows.end {
            let count = FEW.min(rows.end - start);
            // qᵀ: row c holds value c of each query (lane = query).
            let mut qt = [[0f32; FEW]; FEW];
            for r in 0..count {
                let at = (q_base + (start + r) as isize * q_row) as usize;
                let row: &[f32; FEW] = q[at..at + FEW].try_into().unwrap();
                for c in 0..FEW {
                    qt[c][r] = row[c];
                }
            }
            let mut scores = [[0f32; FEW]; FEW];
            for n in 0..nk {
                let mut acc = [0f32; FEW];
                for c in 0..FEW {
                    let kv = keys[n][c];
                    for (a, &x) in acc.iter_mut().zip(&qt[c]) {
                        *a = F::mul_add(x, kv, *a);
                    }
                }
                for (s, a) in scores[n].iter_mut().zip(acc) {
                    *s = a * scale;
                }
            }
            let mut max = scores[0];
            for row in &scores[1..nk] {
                for (m, &x) in max.iter_mut().zip(row) {
                    *m = if x > *m { x } else { *m };
                }
            }
            let mut sum = [0f32; FEW];
            for row in &mut scores[..nk] {
                for ((x, &m), s) in row.iter_mut().zip(&max).zip(sum.iter_mut()) {
                    *x = exp_nonpositive::<F>(*x - m);
                    *s += *x;
                }
            }
            let inv = sum.map(|s| 1.0 / s);
            // Output column c of each query: Σₙ pₙ · values[n][c], then / Σ.
            let mut o = [[0f32; FEW]; FEW];
            for (c, o) in o.iter_mut().enumerate() {
                let mut acc = [0f32; FEW];
                for (p, value) in scores[..nk].iter().zip(&values) {
                    let vv = value[c];
                    for (a, &x) in acc.iter_mut().zip(p) {
                        *a = F::mul_add(x, vv, *a);
                    }
                }
                for ((y, a), i) in o.iter_mut().zip(acc).zip(inv) {
                    *y = a * i;
                }
            }
            for r in 0..count {
                let dst = o_base + (start + r) as isize * o_row;
                // SAFETY: inside the output; this task alone writes these rows.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.0.offset(dst), FEW) };
                for (c, y) in dst.iter_mut().enumerate() {
                    *y = o[c][r];
                }
            }
            start += count;
        }
    }
}

/// One task of windowed attention: the (window, head) units `units`, with one scratch. Each
/// unit gathers its window's kᵀ and v (padding positions from the padding row) and the q rows
/// of its tokens inside the grid, and writes their results into the grid's rows; the values
/// and the order of every sum are those of [`task_body`] on the partitioned tensors.
///
/// # Safety
/// `out` is the output of `g.out_shape`; no other task writes the same units.
#[inline(always)]
unsafe fn window_body<const W: usize, F: MulAdd>(
    g: &Geometry,
    wg: &WindowGeometry,
    scale: f32,
    data: &[&[f32]],
    out: OutPtr,
    units: std::ops::Range<usize>,
) {
    let (d, n, dv) = (g.depth, g.keys, g.depth_v);
    let heads = g.batch[1];
    let nk_pad = round_up(n, W);
    let dv_pad = round_up(dv, W);
    let rows_pad = round_up(n, TILE_ROWS);
    PEAK_SCRATCH.fetch_max(
        d * nk_pad + n * dv_pad + rows_pad * (d + nk_pad + dv_pad),
        Ordering::Relaxed,
    );
    // Padding (kᵀ's columns past n, v's past dv) stays zero: only the first n / dv are written.
    let mut kt = vec![0f32; d * nk_pad];
    let mut vp = vec![0f32; n * dv_pad];
    let mut qp = vec![0f32; rows_pad * d];
    let mut s = vec![0f32; rows_pad * nk_pad];
    let mut o = vec![0f32; rows_pad * dv_pad];
    let mut inv_sums = vec![0f32; rows_pad];
    let mut tokens = vec![PADDING; n];
    let mut next_tokens = vec![PADDING; n];
    let windows = g.batch[0];
    let mut queries: Vec<usize> = Vec::with_capacity(n);
    let (qkv, pad) = (data[0], data[1]);
    assert!(qkv.len() >= wg.h * wg.w * wg.row * (g.batch[0] / (wg.down * wg.across)));
    assert!(pad.len() == wg.row && wg.v_offset + dv <= wg.head && d <= wg.k_offset);
    let mut loaded = None;
    for unit in units {
        let (window, head) = (unit / heads, unit % heads);
        if loaded != Some(window) {
            loaded = Some(window);
            wg.tokens(window, &mut tokens);
            queries.clear();
            queries.extend((0..n).filter(|&r| tokens[r] != PADDING));
            if window + 1 < windows {
                wg.tokens(window + 1, &mut next_tokens);
            } else {
                next_tokens.fill(PADDING);
            }
        }
        let part = head * wg.head;
        // The next window's rows of this head, `heads` units ahead: its tokens are scattered
        // over the grid (rows of a tensor that has left the cache), which no hardware
        // prefetcher follows; waiting on them was a quarter of this loop's time.
        for &t in next_tokens.iter().filter(|&&t| t != PADDING) {
            let at = t * wg.row + part;
            for line in (0..wg.head).step_by(16) {
                prefetch(qkv[at + line..].as_ptr());
            }
        }
        let row = |r: usize| -> &[f32] {
            match tokens[r] {
                PADDING => &pad[part..part + wg.head],
                t => &qkv[t * wg.row + part..t * wg.row + part + wg.head],
            }
        };
        for key in 0..n {
            let src = row(key);
            for (dd, &x) in src[wg.k_offset..wg.k_offset + d].iter().enumerate() {
                kt[dd * nk_pad + key] = x;
            }
            vp[key * dv_pad..key * dv_pad + dv]
                .copy_from_slice(&src[wg.v_offset..wg.v_offset + dv]);
        }
        let count = queries.len();
        let padded = round_up(count, TILE_ROWS);
        for (i, &r) in queries.iter().enumerate() {
            qp[i * d..(i + 1) * d].copy_from_slice(&row(r)[..d]);
        }
        qp[count * d..padded * d].fill(0.0);
        matmul::<W, F>(&qp, d, &kt, nk_pad, d, &mut s, nk_pad, padded, nk_pad);
        for (i, &r) in queries.iter().enumerate() {
            let srow = &mut s[i * nk_pad..(i + 1) * nk_pad];
            add_bias(g, &data[2..], unit, r, scale, &mut srow[..n]);
            inv_sums[i] = softmax_numerators::<W, F>(srow, n);
        }
        matmul::<W, F>(&s, nk_pad, &vp, dv_pad, n, &mut o, dv_pad, padded, dv_pad);
        for (i, &r) in queries.iter().enumerate() {
            let dst = tokens[r] * wg.out_row + head * dv;
            let src = &o[i * dv_pad..i * dv_pad + dv];
            // SAFETY: inside the output (token < batch·h·w); this task alone writes this
            // (token, head).
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(dst), dv) };
            for (y, &x) in dst.iter_mut().zip(src) {
                *y = x * inv_sums[i];
            }
        }
    }
}

/// `row = row · scale + bias[query, ..]` for one query's row of scores; `terms` are the bias
/// inputs.
#[inline(always)]
fn add_bias(g: &Geometry, terms: &[&[f32]], b: usize, query: usize, scale: f32, row: &mut [f32]) {
    let batch_rank = g.batch.len();
    match &g.bias {
        BiasGeometry::None => {
            if scale != 1.0 {
                row.iter_mut().for_each(|x| *x *= scale);
            }
        }
        BiasGeometry::Dense(strides) => {
            let bias = terms[0];
            let base = batch_offset(&g.batch, strides, b) + query as isize * strides[batch_rank];
            let col = strides[batch_rank + 1];
            if col == 1 {
                let bias = &bias[base as usize..base as usize + row.len()];
                for (x, &y) in row.iter_mut().zip(bias) {
                    *x = *x * scale + y;
                }
            } else {
                for (n, x) in row.iter_mut().enumerate() {
                    *x = *x * scale + bias[(base + n as isize * col) as usize];
                }
            }
        }
        BiasGeometry::Decomposed { qw, kw, h, w } => {
            let (rel_h, rel_w) = (terms[0], terms[1]);
            let (qi, qj) = ((query / qw) as isize, (query % qw) as isize);
            let hb = batch_offset(&g.batch, h, b) + qi * h[batch_rank] + qj * h[batch_rank + 1];
            let wb = batch_offset(&g.batch, w, b) + qi * w[batch_rank] + qj * w[batch_rank + 1];
            let (hs, ws) = (h[batch_rank + 2], w[batch_rank + 2]);
            // rel_w's key axis is its last, contiguous unless broadcast: no copy per row then.
            let gathered: Vec<f32>;
            let rel_w: &[f32] = if ws == 1 {
                &rel_w[wb as usize..wb as usize + kw]
            } else {
                gathered = (0..*kw)
                    .map(|j| rel_w[(wb + j as isize * ws) as usize])
                    .collect();
                &gathered
            };
            for (i, chunk) in row.chunks_exact_mut(*kw).enumerate() {
                let hv = rel_h[(hb + i as isize * hs) as usize];
                for (x, &wv) in chunk.iter_mut().zip(rel_w) {
                    *x = *x * scale + (hv + wv);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::tract_linalg::multithread::Executor;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 2_654_435_761usize) % 10_007) as f32 / 5000.0 - 1.0)
            .collect()
    }

    /// Plain reference: transpose inputs, scores, bias, softmax in f64, times v, transpose out.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        op: &Attention,
        shapes: &[Vec<usize>],
        data: &[Vec<f32>],
        qh_qw_kh_kw: Option<(usize, usize, usize, usize)>,
    ) -> (Vec<usize>, Vec<f32>) {
        let refs: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
        let g = op.geometry(&refs).unwrap();
        let rank = g.batch.len() + 2;
        let batches: usize = g.batch.iter().product();
        let mut out = vec![0f32; g.out_shape.iter().product()];
        for b in 0..batches {
            let qb = batch_offset(&g.batch, &g.q, b);
            let kb = batch_offset(&g.batch, &g.k, b);
            let vb = batch_offset(&g.batch, &g.v, b);
            let ob = batch_offset(&g.batch, &g.out, b);
            for i in 0..g.queries {
                let mut scores: Vec<f64> = (0..g.keys)
                    .map(|n| {
                        let mut acc = 0f64;
                        for c in 0..g.depth {
                            let qv = data[0][(qb
                                + i as isize * g.q[rank - 2]
                                + c as isize * g.q[rank - 1])
                                as usize];
                            let kv = data[1][(kb
                                + c as isize * g.k[rank - 2]
                                + n as isize * g.k[rank - 1])
                                as usize];
                            acc += qv as f64 * kv as f64;
                        }
                        acc * op.scale as f64
                    })
                    .collect();
                match &g.bias {
                    BiasGeometry::None => {}
                    BiasGeometry::Dense(st) => {
                        for (n, s) in scores.iter_mut().enumerate() {
                            let off = batch_offset(&g.batch, st, b)
                                + i as isize * st[rank - 2]
                                + n as isize * st[rank - 1];
                            *s += data[3][off as usize] as f64;
                        }
                    }
                    BiasGeometry::Decomposed { .. } => {
                        let (_, qw, kh, kw) = qh_qw_kh_kw.unwrap();
                        let (qi, qj) = (i / qw, i % qw);
                        for (n, s) in scores.iter_mut().enumerate() {
                            let (ki, kj) = (n / kw, n % kw);
                            // rel_h [b, qh, qw, kh, 1], rel_w [b, qh, qw, 1, kw], contiguous.
                            let h = data[3][((b * (g.queries) + qi * qw + qj) * kh) + ki];
                            let w = data[4][((b * (g.queries) + qi * qw + qj) * kw) + kj];
                            *s += h as f64 + w as f64;
                        }
                    }
                }
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for c in 0..g.depth_v {
                    let mut acc = 0f64;
                    for (n, e) in exps.iter().enumerate() {
                        let vv =
                            data[2][(vb + n as isize * g.v[rank - 2] + c as isize * g.v[rank - 1])
                                as usize];
                        acc += e / sum * vv as f64;
                    }
                    out[(ob + i as isize * g.out[rank - 2] + c as isize * g.out[rank - 1])
                        as usize] = acc as f32;
                }
            }
        }
        (g.out_shape, out)
    }

    fn eval(op: &Attention, shapes: &[Vec<usize>], data: &[Vec<f32>]) -> Vec<f32> {
        let inputs: TVec<TValue> = shapes
            .iter()
            .zip(data)
            .map(|(s, d)| Tensor::from_shape(s, d).unwrap().into_tvalue())
            .collect();
        crate::engine::fast_ops::tests::run(op.clone(), inputs)
    }

    fn check(op: &Attention, shapes: Vec<Vec<usize>>, rel: Option<(usize, usize, usize, usize)>) {
        let data: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| values(s.iter().product(), 7 * i + 1))
            .collect();
        let (_, want) = reference(op, &shapes, &data, rel);
        let got = eval(op, &shapes, &data);
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 2e-5, "{shapes:?}: max difference {diff}");
        // Every thread count gives the same bits.
        let pooled = tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
            Executor::multithread(2),
            || eval(op, &shapes, &data),
        );
        assert_eq!(got, pooled, "{shapes:?}: 2 threads differ from 1");
    }

    #[test]
    fn tinyvit_window_attention_with_its_transposes_and_dense_bias() {
        // [windows, tokens, heads, head dim] in, heads x tokens x tokens bias, as TinyViT.
        let op = Attention {
            q_perm: vec![0, 2, 1, 3],
            k_perm: vec![0, 2, 3, 1],
            v_perm: vec![0, 2, 1, 3],
            out_perm: vec![0, 2, 1, 3],
            scale: 32f32.powf(-0.5),
            bias: BiasKind::Dense,
            window: None,
        };
        for (windows, tokens, heads, depth) in [(3, 49, 4, 32), (2, 13, 2, 7), (1, 600, 1, 16)] {
            let x = vec![windows, tokens, heads, depth];
            check(
                &op,
                vec![x.clone(), x.clone(), x, vec![heads, tokens, tokens]],
                None,
            );
        }
    }

    /// Windowed attention on the token grid gives, bit for bit, what the partitioned graph
    /// gives: pad the grid with the padding row, partition, split q/k/v, attend, reverse, crop.
    #[test]
    fn windows_on_the_grid_equal_the_partitioned_graph() {
        let tinyvit = |window| Attention {
            q_perm: vec![0, 2, 1, 3],
            k_perm: vec![0, 2, 3, 1],
            v_perm: vec![0, 2, 1, 3],
            out_perm: vec![0, 2, 1, 3],
            scale: 0.3,
            bias: BiasKind::Dense,
            window,
        };
        // (batch, h, w, side, heads, q/k depth, v depth): padding on both edges, on none, and
        // TinyViT's 7x7 windows with 32-wide heads.
        for (batch, h, w, side, heads, d, dv) in [
            (2usize, 10usize, 9usize, 4usize, 2usize, 8usize, 8usize),
            (1, 8, 8, 4, 3, 5, 7),
            (1, 16, 13, 7, 4, 32, 32),
        ] {
            let head = 2 * d + dv;
            let channels = heads * head;
            let n = side * side;
            let (down, across) = (h.div_ceil(side), w.div_ceil(side));
            let qkv = values(batch * h * w * channels, 3);
            let pad = values(channels, 5);
            let bias = values(heads * n * n, 11);
            // The partitioned q, k, v: [windows, n, heads, d].
            let windows = batch * down * across;
            // The grid token at position r of window win, None in the padding.
            let grid_token = |win: usize, r: usize| {
                let (image, wy, wx) = (
                    win / (down * across),
                    win % (down * across) / across,
                    win % across,
                );
                let (y, x) = (wy * side + r / side, wx * side + r % side);
                (y < h && x < w).then(|| (image * h + y) * w + x)
            };
            let mut parts = [vec![], vec![], vec![]];
            let offsets = [(0, d), (d, d), (2 * d, dv)];
            for win in 0..windows {
                for r in 0..n {
                    let row = match grid_token(win, r) {
                        Some(t) => &qkv[t * channels..(t + 1) * channels],
                        None => &pad[..],
                    };
                    for hd in 0..heads {
                        for (part, &(start, len)) in parts.iter_mut().zip(&offsets) {
                            part.extend_from_slice(
                                &row[hd * head + start..hd * head + start + len],
                            );
                        }
                    }
                }
            }
            let partitioned = tinyvit(None);
            let [q, k, v] = parts;
            let windowed_out = eval(
                &partitioned,
                &[
                    vec![windows, n, heads, d],
                    vec![windows, n, heads, d],
                    vec![windows, n, heads, dv],
                    vec![heads, n, n],
                ],
                &[q, k, v, bias.clone()],
            );
            // Reverse and crop: [windows, n, heads·dv] back to [batch, h·w, heads·dv].
            let out_row = heads * dv;
            let mut want = vec![0f32; batch * h * w * out_row];
            for win in 0..windows {
                for r in 0..n {
                    if let Some(t) = grid_token(win, r) {
                        let src = (win * n + r) * out_row;
                        want[t * out_row..(t + 1) * out_row]
                            .copy_from_slice(&windowed_out[src..src + out_row]);
                    }
                }
            }
            let op = tinyvit(Some(Window {
                spec: WindowSpec {
                    h,
                    w,
                    parts: [d, d, dv],
                },
                side,
            }));
            let shapes = vec![
                vec![batch, h * w, channels],
                vec![1, 1, channels],
                vec![heads, n, n],
            ];
            let data = vec![qkv, pad, bias];
            let got = eval(&op, &shapes, &data);
            assert_eq!(got, want, "{batch}x{h}x{w} in {side}x{side} windows");
            let pooled = tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
                Executor::multithread(2),
                || eval(&op, &shapes, &data),
            );
            assert_eq!(got, pooled, "2 threads differ from 1");
        }
    }

    /// Not a test: times the operator on TinyViT's window shapes, for measuring a change
    /// (`cargo test --release --lib window_attention_timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn window_attention_timing() {
        let op = Attention {
            q_perm: vec![0, 2, 1, 3],
            k_perm: vec![0, 2, 3, 1],
            v_perm: vec![0, 2, 1, 3],
            out_perm: vec![0, 2, 1, 3],
            scale: 32f32.powf(-0.5),
            bias: BiasKind::Dense,
            window: None,
        };
        for (windows, tokens, heads) in [(361, 49, 4), (25, 196, 5), (100, 49, 10)] {
            let x = vec![windows, tokens, heads, 32];
            let shapes = [x.clone(), x.clone(), x, vec![heads, tokens, tokens]];
            let inputs: TVec<TValue> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    Tensor::from_shape(s, &values(s.iter().product(), i))
                        .unwrap()
                        .into_tvalue()
                })
                .collect();
            let mut best = f64::INFINITY;
            for _ in 0..20 {
                let start = std::time::Instant::now();
                op.eval(&EvalContext::out_of_plan(), inputs.clone())
                    .unwrap();
                best = best.min(start.elapsed().as_secs_f64());
            }
            let flops = 4.0 * (windows * heads * tokens * tokens * 32) as f64;
            eprintln!(
                "{windows}x{heads} windows of {tokens}: {:.2} ms, {:.1} GFLOP/s",
                best * 1e3,
                flops / best / 1e9
            );
        }
    }

    /// Not a test: times the decoder's attentions (`cargo test --release --lib
    /// decoder_attention_timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn decoder_attention_timing() {
        let op = Attention {
            q_perm: vec![0, 2, 1, 3],
            k_perm: vec![0, 2, 3, 1],
            v_perm: vec![0, 2, 1, 3],
            out_perm: vec![],
            scale: 0.25,
            bias: BiasKind::None,
            window: None,
        };
        for (queries, keys) in [(7, 4096), (4096, 7)] {
            let shapes = [
                vec![1, queries, 8, 16],
                vec![1, keys, 8, 16],
                vec![1, keys, 8, 16],
            ];
            let inputs: TVec<TValue> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    Tensor::from_shape(s, &values(s.iter().product(), i))
                        .unwrap()
                        .into_tvalue()
                })
                .collect();
            let mut best = f64::INFINITY;
            for _ in 0..50 {
                let start = std::time::Instant::now();
                op.eval(&EvalContext::out_of_plan(), inputs.clone())
                    .unwrap();
                best = best.min(start.elapsed().as_secs_f64());
            }
            eprintln!(
                "{queries} queries x {keys} keys, 8 heads of 16: {:.3} ms",
                best * 1e3
            );
        }
    }

    #[test]
    fn few_keys_attention_of_the_decoder() {
        // SAM's image-to-token attention: many queries, the prompt's few tokens as keys,
        // heads of 16, q/k/v given token-major with their transposes absorbed.
        for (queries, keys, out_perm) in
            [(37, 7, vec![]), (600, 16, vec![0, 2, 1, 3]), (5, 1, vec![])]
        {
            let op = Attention {
                q_perm: vec![0, 2, 1, 3],
                k_perm: vec![0, 2, 3, 1],
                v_perm: vec![0, 2, 1, 3],
                out_perm,
                scale: 0.25,
                bias: BiasKind::None,
                window: None,
            };
            let shapes = vec![
                vec![2, queries, 8, 16],
                vec![2, keys, 8, 16],
                vec![2, keys, 8, 16],
            ];
            let refs: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
            assert!(few_keys(&op.geometry(&refs).unwrap()));
            check(&op, shapes, None);
        }
    }

    #[test]
    fn plain_attention_without_bias() {
        let op = Attention {
            q_perm: vec![],
            k_perm: vec![],
            v_perm: vec![],
            out_perm: vec![],
            scale: 0.125,
            bias: BiasKind::None,
            window: None,
        };
        check(
            &op,
            vec![vec![2, 3, 7, 16], vec![2, 3, 16, 37], vec![2, 3, 37, 40]],
            None,
        );
    }

    #[test]
    fn vit_decomposed_relative_position_bias() {
        // ViT-B: kᵀ from a transpose of k, rel_h and rel_w unsqueezed, scale applied to q before.
        let op = Attention {
            q_perm: vec![],
            k_perm: vec![0, 2, 1],
            v_perm: vec![],
            out_perm: vec![],
            scale: 1.0,
            bias: BiasKind::Decomposed,
            window: None,
        };
        for (heads, side, depth) in [(3, 14, 16), (2, 16, 64)] {
            let n = side * side;
            let x = vec![heads, n, depth];
            check(
                &op,
                vec![
                    x.clone(),
                    x.clone(),
                    x,
                    vec![heads, side, side, side, 1],
                    vec![heads, side, side, 1, side],
                ],
                Some((side, side, side, side)),
            );
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused() {
        let op = Attention {
            q_perm: vec![],
            k_perm: vec![],
            v_perm: vec![],
            out_perm: vec![],
            scale: 1.0,
            bias: BiasKind::Dense,
            window: None,
        };
        let q = [2usize, 5, 8];
        let kt = [2usize, 8, 9];
        let v = [2usize, 9, 4];
        assert!(op.geometry(&[&q, &kt, &v, &[5, 9]]).is_ok());
        assert!(op.geometry(&[&q, &kt, &v, &[5, 8]]).is_err());
        assert!(op.geometry(&[&q, &[2, 7, 9], &v, &[5, 9]]).is_err());
        assert!(op.geometry(&[&q, &kt, &[3, 9, 4], &[5, 9]]).is_err());
    }
}
