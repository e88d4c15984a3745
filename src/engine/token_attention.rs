//! Attention of a few queries over many keys, with the keys' and values' projections folded
//! into the queries: SAM's token-to-image attention, the prompt's 7–10 tokens over the 4096
//! image tokens.
//!
//! The two-way transformer projects all 4096 image tokens to keys and values (two 256 → 128
//! linear layers, 268M multiply-adds a layer) for scores and sums that need far less: with
//! `k_t = x_t·W_k + b_k` for image token `t`, query `q_i` of head `h` scores
//! `q_i·k_t = x_t·(W_k,h q_iᵀ) + q_i·b_k,h`, and the output is
//! `Σ_t p_it v_t = (Σ_t p_it y_t)·W_v,h + b_v,h` (the probabilities sum to 1). So each
//! (head, query) pair becomes one row `a = scale · W_k,h q_iᵀ` of the input's width, the scores of
//! all pairs are one product `X · Aᵀ` (`[4096, 256] x [256, 56]` for 7 tokens and 8 heads), the
//! softmax runs down its columns (the constant `q_i·b_k,h` drops out of it), and the pairs'
//! probabilities gather the unprojected values in one more product `Pᵀ · Y`
//! (`[56, 4096] x [4096, 256]`) before the small `W_v` projection: 117M multiply-adds instead of
//! 275M, both products on samrt's linear kernel, and no `[4096, 128]` key or value tensor. The
//! results differ from the projected order by float rounding only.
//!
//! The image-to-token attention is folded the same way from the other side
//! ([`FoldedImageAttention`]): the few keys go into the query projection, the few values into
//! the output projection that follows.
//!
//! [`fold`] rewrites the typed (decluttered) decoder: a `SamrtAttention` with heads split from
//! its inputs' rows, at most [`MAX_QUERIES`] rows on the few side and at least [`MIN_KEYS`] on the
//! many side, whose projections are samrt's linear layers ([`super::linear`]) used by it alone.
//! Where the linear layers are tract's (no AVX-512/AVX2), nothing matches.

use std::sync::Arc;

use super::threads::par_chunks_mut;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_hir::internal::*;

use super::attention::Attention;
use super::linear::{gemm, gemm_row_major, panel_width, Linear, PackedWeights, TILE_ROWS};
use super::threads::{run_bounds, split_rows};
use super::vector_math::{dispatch_isa, exp_nonpositive, MulAdd};

/// The operator's name in tract's plans and profiles.
pub const OP_TYPE: &str = "SamrtFoldedAttention";
/// Most rows on the few side (tokens: queries, or keys of the image-to-token attention): past a
/// few dozen (head, token) pairs the products stop being cheaper than the projections.
pub const MAX_QUERIES: usize = 16;
/// Fewest rows on the many side (image tokens) for which folding pays.
pub const MIN_KEYS: usize = 256;

/// Folds both directions of the decoder's cross attention in `model`: the tokens' queries over
/// the image ([`FoldedAttention`]) and the image's queries over the tokens
/// ([`FoldedImageAttention`], with the output projection after it). Returns how many were
/// folded; the dead projections go at the next compaction.
pub fn fold(model: &mut TypedModel) -> TractResult<usize> {
    let tokens = fold_token_queries(model)?;
    Ok(tokens + fold_image_queries(model)?)
}

/// Which nodes depend on a model input other than the first (the embedding): the rest a split
/// decoder computes once per image.
fn prompt_dependent(model: &TypedModel, order: &[usize]) -> TractResult<Vec<bool>> {
    let prompt_sources: Vec<usize> = model.input_outlets()?[1..].iter().map(|o| o.node).collect();
    let mut from_prompt = vec![false; model.nodes().len()];
    for &id in order {
        from_prompt[id] = prompt_sources.contains(&id)
            || model.node(id).inputs.iter().any(|i| from_prompt[i.node]);
    }
    Ok(from_prompt)
}

/// `[n, n]` identity weights with a zero bias, for products over projections already made.
fn identity(n: usize) -> (Vec<f32>, Vec<f32>, usize) {
    let w = (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect();
    (w, vec![0.0; n], n)
}

/// The concrete shape of `outlet`, if it has one.
fn concrete(model: &TypedModel, outlet: OutletId) -> TractResult<Option<Vec<usize>>> {
    Ok(model
        .outlet_fact(outlet)?
        .shape
        .as_concrete()
        .map(|s| s.to_vec()))
}

/// Replaces `node`'s first output by `op` on `inputs`.
fn replace(
    model: &mut TypedModel,
    node: usize,
    op: Box<dyn TypedOp>,
    inputs: &[OutletId],
) -> TractResult<()> {
    let name = format!("{}.folded", model.node(node).name);
    let mut patch = TypedModelPatch::default();
    let taps = inputs
        .iter()
        .map(|&i| patch.tap_model(model, i))
        .collect::<TractResult<TVec<_>>>()?;
    let out = patch.wire_node(name, op, &taps)?;
    patch.shunt_outside(model, OutletId::new(node, 0), out[0])?;
    patch.apply(model)
}

/// What a matcher of [`fold_attention`] asks for: replace this node's output by this op on
/// these inputs.
type Rewrite = (usize, Box<dyn TypedOp>, Vec<OutletId>);

/// Runs `matcher` on each attention of `model` with heads split from its inputs' rows (its
/// node, scale, q, k and v, and which nodes depend on the prompt), then applies the rewrites
/// it returns. Returns how many.
fn fold_attention(
    model: &mut TypedModel,
    matcher: impl Fn(&TypedModel, &[bool], usize, f32, [OutletId; 3]) -> TractResult<Option<Rewrite>>,
) -> TractResult<usize> {
    let order = model.eval_order()?;
    let from_prompt = prompt_dependent(model, &order)?;
    let mut rewrites = Vec::new();
    for &id in &order {
        let node = model.node(id);
        let Some(scale) = node
            .op_as::<Attention>()
            .and_then(Attention::split_heads_scale)
        else {
            continue;
        };
        let [q, k, v] = node.inputs[..] else {
            continue;
        };
        rewrites.extend(matcher(model, &from_prompt, id, scale, [q, k, v])?);
    }
    let count = rewrites.len();
    for (id, op, inputs) in rewrites {
        replace(model, id, op, &inputs)?;
    }
    Ok(count)
}

/// The token-to-image attentions ([`FoldedAttention`]).
fn fold_token_queries(model: &mut TypedModel) -> TractResult<usize> {
    fold_attention(model, |model, from_prompt, id, scale, [q, k, v]| {
        let (Some((k_in, k_proj, mut wk)), Some((v_in, v_proj, mut wv))) =
            (projection(model, k)?, projection(model, v)?)
        else {
            return Ok(None);
        };
        // Keys and values from the embedding alone: the split decoder projects them once per
        // image, so the products read those projections, through identity weights.
        let (k_in, v_in) = if !from_prompt[k_in.node] && !from_prompt[v_in.node] {
            (wk, wv) = (identity(wk.2), identity(wv.2));
            (k_proj, v_proj)
        } else {
            (k_in, v_in)
        };
        let (Some(qs), Some(ks), Some(vs)) = (
            concrete(model, q)?,
            concrete(model, k_in)?,
            concrete(model, v_in)?,
        ) else {
            return Ok(None);
        };
        let (c, d) = (wk.0.len() / wk.2, qs.get(3).copied().unwrap_or(0));
        let fits = qs.len() == 4
            && ks.len() == 3
            && ks == vs
            && ks[0] == qs[0]
            && ks[2] == c
            && qs[1] <= MAX_QUERIES
            && ks[1] >= MIN_KEYS
            && wk.2 == qs[2] * d
            && wv.2 == wk.2
            && wv.0.len() == wk.0.len();
        if !fits {
            return Ok(None);
        }
        let op = FoldedAttention {
            heads: qs[2],
            depth: d,
            channels: c,
            scale,
            wk: Arc::new(wk.0),
            wv: Arc::new(wv.0),
            bv: Arc::new(wv.1),
        };
        Ok(Some((
            id,
            Box::new(op) as Box<dyn TypedOp>,
            vec![q, k_in, v_in],
        )))
    })
}

/// The image-to-token attentions with the output projection after them
/// ([`FoldedImageAttention`]): `SamrtAttention` (heads split) whose q is a reshape of samrt's
/// linear layer over at least [`MIN_KEYS`] image tokens, with at most [`MAX_QUERIES`] keys, and
/// whose output goes through the heads' merge (`[b, heads, n, d]` → `[b, n, heads·d]`) into a
/// linear layer alone.
fn fold_image_queries(model: &mut TypedModel) -> TractResult<usize> {
    fold_attention(model, |model, from_prompt, id, scale, [q, k, v]| {
        let Some((q_in, q_proj, mut wq)) = projection(model, q)? else {
            return Ok(None);
        };
        let Some((out_layer, wo, residual)) = merged_heads_projection(model, id)? else {
            return Ok(None);
        };
        // Queries from the embedding alone: their projection is made once per image.
        let q_in = if from_prompt[q_in.node] {
            q_in
        } else {
            wq = identity(wq.2);
            q_proj
        };
        let (Some(xs), Some(qs), Some(ks), Some(vs)) = (
            concrete(model, q_in)?,
            concrete(model, q)?,
            concrete(model, k)?,
            concrete(model, v)?,
        ) else {
            return Ok(None);
        };
        let (heads, d) = (qs[2], qs[3]);
        let c = wq.0.len() / wq.2;
        let fits = xs.len() == 3
            && xs[2] == c
            && ks.len() == 4
            && ks == vs
            && ks[0] == xs[0]
            && ks[1] <= MAX_QUERIES
            && ks[2..] == [heads, d]
            && xs[1] >= MIN_KEYS
            && wq.2 == heads * d
            && wo.0.len() == wq.2 * wo.2;
        if !fits {
            return Ok(None);
        }
        let op = FoldedImageAttention {
            heads,
            depth: d,
            channels: c,
            scale,
            wq: Arc::new(wq.0),
            bq: Arc::new(wq.1),
            wo: Arc::new(wo.0),
            bo: Arc::new(wo.1),
            outputs: wo.2,
            residual: residual.is_some(),
        };
        let mut inputs = vec![q_in, k, v];
        inputs.extend(residual);
        Ok(Some((out_layer, Box::new(op) as Box<dyn TypedOp>, inputs)))
    })
}

/// The linear layer (its node, `(W, b, n)` and residual input) that attention `id`'s output
/// feeds alone through the heads' merge: `MoveAxis` `[b, heads, n, d]` → `[b, n, heads, d]`,
/// then a reshape to `[b, n, heads·d]`.
#[allow(clippy::type_complexity)]
fn merged_heads_projection(
    model: &TypedModel,
    id: usize,
) -> TractResult<Option<(usize, (Vec<f32>, Vec<f32>, usize), Option<OutletId>)>> {
    let only_successor = |node: usize| -> Option<usize> {
        match &model.node(node).outputs[0].successors[..] {
            [one] if one.slot == 0 => Some(one.node),
            _ => None,
        }
    };
    let Some(moved) = only_successor(id) else {
        return Ok(None);
    };
    if model.node(moved).op_as::<AxisOp>() != Some(&AxisOp::Move(1, 2)) {
        return Ok(None);
    }
    let Some(merged) = only_successor(moved) else {
        return Ok(None);
    };
    let (Some(from), Some(to)) = (
        concrete(model, OutletId::new(moved, 0))?,
        concrete(model, OutletId::new(merged, 0))?,
    ) else {
        return Ok(None);
    };
    if !matches!(
        model.node(merged).op_as::<AxisOp>(),
        Some(AxisOp::Reshape(..))
    ) || from.len() != 4
        || to.len() != 3
        || from[..2] != to[..2]
        || from[2] * from[3] != to[2]
    {
        return Ok(None);
    }
    let Some(layer) = only_successor(merged) else {
        return Ok(None);
    };
    let node = model.node(layer);
    let Some(linear) = node.op_as::<Linear>() else {
        return Ok(None);
    };
    let Some(residual) = linear.plain_with_residual() else {
        return Ok(None);
    };
    let (w, b, _, n) = linear.weights();
    Ok(Some((layer, (w, b, n), residual.then(|| node.inputs[1]))))
}

/// `x`, the layer's output and its `(W [k, n] row-major, b, n)` where `outlet` is a reshape
/// splitting the last axis of samrt's linear layer `x · W + b` (no GELU, no residual), both
/// used once.
#[allow(clippy::type_complexity)]
fn projection(
    model: &TypedModel,
    outlet: OutletId,
) -> TractResult<Option<(OutletId, OutletId, (Vec<f32>, Vec<f32>, usize))>> {
    let reshape = model.node(outlet.node);
    if !matches!(reshape.op_as::<AxisOp>(), Some(AxisOp::Reshape(..)))
        || reshape.outputs[0].successors.len() != 1
    {
        return Ok(None);
    }
    let layer = model.node(reshape.inputs[0].node);
    let Some(linear) = layer.op_as::<Linear>() else {
        return Ok(None);
    };
    if layer.outputs[0].successors.len() != 1 {
        return Ok(None);
    }
    let (Some(from), Some(to)) = (
        model.outlet_fact(reshape.inputs[0])?.shape.as_concrete(),
        model.outlet_fact(outlet)?.shape.as_concrete(),
    ) else {
        return Ok(None);
    };
    // [b, keys, heads·d] → [b, keys, heads, d]
    if from.len() != 3 || to.len() != 4 || from[..2] != to[..2] || to[2] * to[3] != from[2] {
        return Ok(None);
    }
    Ok(linear
        .plain_weights()
        .map(|(w, b, _, n)| (layer.inputs[0], reshape.inputs[0], (w, b, n))))
}

/// `softmax(q·kᵀ · scale)·v` per head with `k = x·W_k + b_k` and `v = y·W_v + b_v` folded in
/// (see the module's note). Inputs: q `[b, queries, heads, d]`, x and y `[b, keys, channels]`;
/// output `[b, heads, queries, d]`, as [`Attention`]'s.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldedAttention {
    heads: usize,
    depth: usize,
    channels: usize,
    scale: f32,
    /// `W_k` and `W_v`, `[channels, heads·d]` row-major, and `b_v`.
    wk: Arc<Vec<f32>>,
    wv: Arc<Vec<f32>>,
    bv: Arc<Vec<f32>>,
}

impl Eq for FoldedAttention {}

impl std::hash::Hash for FoldedAttention {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.heads, self.depth, self.channels, self.scale.to_bits()).hash(state);
        for v in self.wk.iter().chain(self.wv.iter()).take(64) {
            v.to_bits().hash(state);
        }
    }
}

impl Op for FoldedAttention {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "heads: {}, d: {}, channels: {}, scale: {}",
            self.heads, self.depth, self.channels, self.scale
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for FoldedAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let q = &inputs[0].shape;
        ensure!(
            q.rank() == 4,
            "{OP_TYPE}: q {q:?} is not [b, queries, heads, d]"
        );
        let shape = tvec![q[0].clone(), q[2].clone(), q[1].clone(), q[3].clone()];
        Ok(tvec!(inputs[0].datum_type.fact(shape)))
    }

    as_op!();
}

impl EvalOp for FoldedAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, x, y) = (&inputs[0], &inputs[1], &inputs[2]);
        let (hd, c) = (self.heads * self.depth, self.channels);
        let [b, queries, heads, d] = q.shape() else {
            bail!("{OP_TYPE}: q {:?} is not [b, queries, heads, d]", q.shape());
        };
        let (b, queries) = (*b, *queries);
        ensure!(
            (*heads, *d) == (self.heads, self.depth)
                && x.shape() == y.shape()
                && x.rank() == 3
                && x.shape()[0] == b
                && x.shape()[2] == c,
            "{OP_TYPE}: q {:?}, keys {:?} and values {:?} for {} heads of {} over {c} channels",
            q.shape(),
            x.shape(),
            y.shape(),
            self.heads,
            self.depth
        );
        let keys = x.shape()[1];
        let (qv, xv, yv) = (
            q.try_as_plain_ram()?,
            x.try_as_plain_ram()?,
            y.try_as_plain_ram()?,
        );
        let (qd, xd, yd) = (
            qv.as_slice::<f32>()?,
            xv.as_slice::<f32>()?,
            yv.as_slice::<f32>()?,
        );
        let mut output = Tensor::zero::<f32>(&[b, self.heads, queries, self.depth])?;
        {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            for bb in 0..b {
                self.run(
                    &qd[bb * queries * hd..(bb + 1) * queries * hd],
                    &xd[bb * keys * c..(bb + 1) * keys * c],
                    &yd[bb * keys * c..(bb + 1) * keys * c],
                    keys,
                    &mut out[bb * queries * hd..(bb + 1) * queries * hd],
                )?;
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl FoldedAttention {
    /// One batch element: q `[queries, heads, d]`, x and y `[keys, channels]`, out
    /// `[heads, queries, d]`.
    fn run(
        &self,
        q: &[f32],
        x: &[f32],
        y: &[f32],
        keys: usize,
        out: &mut [f32],
    ) -> TractResult<()> {
        let (heads, d, c) = (self.heads, self.depth, self.channels);
        let hd = heads * d;
        let queries = q.len() / hd;
        let rows = heads * queries;
        if rows == 0 {
            return Ok(());
        }
        // Aᵀ `[channels, rows]`: row r = (head h, query i) is scale · W_k,h q_iᵀ, as the product
        // W_k · Qᵀ with Q `[rows, heads·d]` holding scale · q_i in head h's columns.
        let width = panel_width();
        let mut qt = vec![0.0f32; hd * rows];
        for h in 0..heads {
            for i in 0..queries {
                for e in 0..d {
                    qt[(h * d + e) * rows + h * queries + i] =
                        self.scale * q[(i * heads + h) * d + e];
                }
            }
        }
        let mut at = vec![0.0f32; c * rows];
        let qt = PackedWeights::new(&qt, &vec![0.0; rows], hd, rows, width);
        gemm(&self.wk, c, &qt, false, &mut at);
        let a = PackedWeights::new(&at, &vec![0.0; rows], c, rows, width);
        // Scores `[keys, rows]`, over tract's threads by rows of keys.
        let mut scores = vec![0.0f32; keys * rows];
        par_chunks_mut(&mut scores, rows, keys * rows * c, |first, chunk| {
            let count = chunk.len() / rows;
            gemm(&x[first * c..(first + count) * c], count, &a, false, chunk);
            Ok(())
        })?;
        // Probabilities down the columns, transposed to `[rows, keys]` (padded with zero rows to
        // whole register tiles), a run of columns a thread.
        let padded = rows.next_multiple_of(TILE_ROWS);
        let mut probs = vec![0.0f32; padded * keys];
        split_rows(&mut probs[..rows * keys], keys, |first, run| {
            column_softmax(&scores, rows, first, run)
        });
        drop(scores);
        // Z = P · Y `[rows, channels]`, Y read in place as the kernel's weights; a run of
        // channel panels a thread, each reading its columns of Y once (stored run after run:
        // `[padded, its channels]` each).
        let mut z = vec![0.0f32; padded * c];
        if c.is_multiple_of(width) {
            let bounds = run_bounds(c / width);
            split_rows(&mut z, padded * width, |panel, run| {
                let n = run.len() / padded;
                gemm_row_major(&probs, padded, &y[panel * width..], keys, n, c, run);
            });
            if bounds.len() > 2 {
                let mut rows_z = vec![0.0f32; padded * c];
                for pair in bounds.windows(2) {
                    let (c0, n) = (pair[0] * width, (pair[1] - pair[0]) * width);
                    let run = &z[padded * c0..padded * (c0 + n)];
                    for (r, row) in run.chunks_exact(n).enumerate() {
                        rows_z[r * c + c0..r * c + c0 + n].copy_from_slice(row);
                    }
                }
                z = rows_z;
            }
        } else {
            let yw = PackedWeights::new(y, &vec![0.0; c], keys, c, width);
            gemm(&probs, padded, &yw, false, &mut z);
        }
        // out[h, i] = z_r · W_v,h + b_v,h: the product Z · W_v (+ b_v), head h's columns of row r.
        let wv = PackedWeights::new(&self.wv, &self.bv, c, hd, width);
        let mut projected = vec![0.0f32; padded * hd];
        gemm(&z, padded, &wv, false, &mut projected);
        for h in 0..heads {
            for i in 0..queries {
                let r = h * queries + i;
                out[r * d..(r + 1) * d]
                    .copy_from_slice(&projected[r * hd + h * d..r * hd + (h + 1) * d]);
            }
        }
        Ok(())
    }
}

/// Image-to-token attention and the output projection after it, `softmax(q·kᵀ · scale)·v`
/// per head with `q = x·W_q + b_q`, then `[heads·d] → W_o + b_o` (+ the residual): with the
/// few keys folded into the query projection, `B = scale · W_q,h k_jᵀ` (and the bias
/// `scale · b_q,h·k_j`) gives the scores of every (head, key) pair as one product `X·B`, and
/// `v_j·W_o,h` the output as one more, `P·(V W_o)`. Inputs: x `[b, n, channels]`, k and v
/// `[b, keys, heads, d]` (and the residual `[b, n, outputs]`); output `[b, n, outputs]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldedImageAttention {
    heads: usize,
    depth: usize,
    channels: usize,
    scale: f32,
    /// `W_q` `[channels, heads·d]`, `b_q`, `W_o` `[heads·d, outputs]` row-major, `b_o`.
    wq: Arc<Vec<f32>>,
    bq: Arc<Vec<f32>>,
    wo: Arc<Vec<f32>>,
    bo: Arc<Vec<f32>>,
    outputs: usize,
    residual: bool,
}

impl Eq for FoldedImageAttention {}

impl std::hash::Hash for FoldedImageAttention {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (
            self.heads,
            self.depth,
            self.channels,
            self.outputs,
            self.residual,
            self.scale.to_bits(),
        )
            .hash(state);
        for v in self.wq.iter().chain(self.wo.iter()).take(64) {
            v.to_bits().hash(state);
        }
    }
}

/// Image tokens [`FoldedImageAttention`] takes at a time: their scores stay in L1/L2 between
/// the two products.
const IMAGE_BLOCK_ROWS: usize = 192;

/// The name of [`FoldedImageAttention`] in plans and profiles.
pub const IMAGE_OP_TYPE: &str = "SamrtFoldedImageAttention";

impl Op for FoldedImageAttention {
    fn name(&self) -> StaticName {
        IMAGE_OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "heads: {}, d: {}, channels: {} → {}, scale: {}, residual: {}",
            self.heads, self.depth, self.channels, self.outputs, self.scale, self.residual
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for FoldedImageAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = &inputs[0].shape;
        ensure!(
            x.rank() == 3,
            "{IMAGE_OP_TYPE}: x {x:?} is not [b, n, channels]"
        );
        let shape = tvec![x[0].clone(), x[1].clone(), self.outputs.to_dim()];
        Ok(tvec!(inputs[0].datum_type.fact(shape)))
    }

    as_op!();
}

impl EvalOp for FoldedImageAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
        let (hd, c, o) = (self.heads * self.depth, self.channels, self.outputs);
        let [b, n, xc] = x.shape() else {
            bail!("{IMAGE_OP_TYPE}: x {:?} is not [b, n, channels]", x.shape());
        };
        let (b, n) = (*b, *n);
        let keys = k.shape().get(1).copied().unwrap_or(0);
        ensure!(
            *xc == c
                && k.shape() == v.shape()
                && k.shape() == [b, keys, self.heads, self.depth]
                && (!self.residual || inputs.get(3).is_some_and(|r| r.shape() == [b, n, o])),
            "{IMAGE_OP_TYPE}: x {:?}, k {:?}, v {:?} for {} heads of {} over {c} channels",
            x.shape(),
            k.shape(),
            v.shape(),
            self.heads,
            self.depth
        );
        let views = inputs
            .iter()
            .map(|t| t.try_as_plain_ram())
            .collect::<TractResult<Vec<_>>>()?;
        let data = views
            .iter()
            .map(|v| v.as_slice::<f32>())
            .collect::<TractResult<Vec<_>>>()?;
        // SAFETY: f32 has no invalid bit patterns, and `run` writes every row.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&[b, n, o])? };
        {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            for bb in 0..b {
                let residual = data.get(3).map(|r| &r[bb * n * o..(bb + 1) * n * o]);
                self.run(
                    &data[0][bb * n * c..(bb + 1) * n * c],
                    &data[1][bb * keys * hd..(bb + 1) * keys * hd],
                    &data[2][bb * keys * hd..(bb + 1) * keys * hd],
                    residual,
                    &mut out[bb * n * o..(bb + 1) * n * o],
                )?;
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl FoldedImageAttention {
    /// One batch element: x `[n, channels]`, k and v `[keys, heads, d]`, out `[n, outputs]`.
    fn run(
        &self,
        x: &[f32],
        k: &[f32],
        v: &[f32],
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) -> TractResult<()> {
        let (heads, d, c, o) = (self.heads, self.depth, self.channels, self.outputs);
        let hd = heads * d;
        let keys = k.len() / hd;
        let n = x.len() / c;
        let pairs = heads * keys;
        if n == 0 {
            return Ok(());
        }
        if pairs == 0 {
            bail!("{IMAGE_OP_TYPE}: no keys");
        }
        // B `[channels, pairs]` and its bias: pair (h, j) is scale · W_q,h k_jᵀ, as the product
        // W_q · Kᵀ with K `[pairs, heads·d]` holding scale · k_j in head h's columns; and
        // V W_o `[pairs, outputs]`: pair (h, j) is v_j,h · W_o,h, as V · W_o likewise.
        let width = panel_width();
        let mut kt = vec![0.0f32; hd * pairs];
        let mut vb = vec![0.0f32; pairs * hd];
        let mut bb = vec![0.0f32; pairs];
        for h in 0..heads {
            for j in 0..keys {
                let col = h * keys + j;
                let (kj, vj) = (
                    &k[(j * heads + h) * d..(j * heads + h + 1) * d],
                    &v[(j * heads + h) * d..(j * heads + h + 1) * d],
                );
                for e in 0..d {
                    kt[(h * d + e) * pairs + col] = self.scale * kj[e];
                }
                vb[col * hd + h * d..col * hd + (h + 1) * d].copy_from_slice(vj);
                let bias = &self.bq[h * d..(h + 1) * d];
                bb[col] = self.scale * bias.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>();
            }
        }
        let mut bw = vec![0.0f32; c * pairs];
        gemm(
            &self.wq,
            c,
            &PackedWeights::new(&kt, &vec![0.0; pairs], hd, pairs, width),
            false,
            &mut bw,
        );
        let mut vw = vec![0.0f32; pairs * o];
        gemm(
            &vb,
            pairs,
            &PackedWeights::new(&self.wo, &vec![0.0; o], hd, o, width),
            false,
            &mut vw,
        );
        let scores_w = PackedWeights::new(&bw, &bb, c, pairs, width);
        let out_w = PackedWeights::new(&vw, &self.bo, pairs, o, width);
        // Rows of image tokens over tract's threads: scores, the softmax of each head's keys,
        // the output rows (and the residual) while in cache.
        par_chunks_mut(out, o, n * (c + o) * pairs, |first, chunk| {
            let mut scores = vec![0.0f32; IMAGE_BLOCK_ROWS * pairs];
            for (b, block) in chunk.chunks_mut(IMAGE_BLOCK_ROWS * o).enumerate() {
                let (row, count) = (first + b * IMAGE_BLOCK_ROWS, block.len() / o);
                let scores = &mut scores[..count * pairs];
                gemm(
                    &x[row * c..(row + count) * c],
                    count,
                    &scores_w,
                    false,
                    scores,
                );
                group_softmax(scores, keys);
                gemm(scores, count, &out_w, false, block);
                if let Some(r) = residual {
                    for (y, r) in block.iter_mut().zip(&r[row * o..(row + count) * o]) {
                        *y += r;
                    }
                }
            }
            Ok(())
        })?;
        Ok(())
    }
}

dispatch_isa!(
    /// Softmax over each run of `group` values of `scores` (each head's keys of each row).
    fn group_softmax(scores: &mut [f32], group: usize) => group_softmax_body
);

#[inline(always)]
fn group_softmax_body<F: MulAdd>(scores: &mut [f32], group: usize) {
    for run in scores.chunks_exact_mut(group) {
        let max = run.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for s in run.iter_mut() {
            *s -= max;
        }
    }
    // One pass of exp over everything: contiguous, so it vectorizes.
    for s in scores.iter_mut() {
        *s = exp_nonpositive::<F>(*s);
    }
    for run in scores.chunks_exact_mut(group) {
        let inv = 1.0 / run.iter().sum::<f32>();
        for s in run.iter_mut() {
            *s = flush_tiny(*s * inv);
        }
    }
}

/// Probabilities below which a term is zero: at most 4096 of them, against a sum of 1, change
/// an f32 result by ~1e-26 of its scale, while a subnormal factor (`exp` of scores 87 below
/// the row's maximum, then divided by the sum) makes every multiply-add it enters take the
/// CPU's slow path (~2x the product's time, measured).
const TINY_PROBABILITY: f32 = 1e-30;

#[inline(always)]
fn flush_tiny(p: f32) -> f32 {
    if p < TINY_PROBABILITY {
        0.0
    } else {
        p
    }
}

dispatch_isa!(
    /// Softmax of columns `first..` of `scores` `[keys, rows]`, one per row of `probs`
    /// (`[.., keys]`, the transpose).
    fn column_softmax(scores: &[f32], rows: usize, first: usize, probs: &mut [f32]) => column_softmax_body
);

#[inline(always)]
fn column_softmax_body<F: MulAdd>(scores: &[f32], rows: usize, first: usize, probs: &mut [f32]) {
    let keys = scores.len() / rows;
    let cols = probs.len() / keys;
    let mut max = vec![f32::NEG_INFINITY; cols];
    for row in scores.chunks_exact(rows) {
        for (m, &s) in max.iter_mut().zip(&row[first..first + cols]) {
            if s > *m {
                *m = s;
            }
        }
    }
    // The transpose in blocks of TRANSPOSE_KEYS keys: each block's score rows stay in L1 while
    // every probability row gets one contiguous run.
    for t0 in (0..keys).step_by(TRANSPOSE_KEYS) {
        let block = TRANSPOSE_KEYS.min(keys - t0);
        for (r, &m) in max.iter().enumerate() {
            let dst = &mut probs[r * keys + t0..r * keys + t0 + block];
            for (j, p) in dst.iter_mut().enumerate() {
                *p = scores[(t0 + j) * rows + first + r] - m;
            }
        }
    }
    for row in probs.chunks_exact_mut(keys) {
        for p in row.iter_mut() {
            *p = exp_nonpositive::<F>(*p);
        }
        // In 16 lanes, so that it vectorizes (a sequential sum cannot be reordered).
        let mut lanes = [0.0f32; 16];
        let mut chunks = row.chunks_exact(16);
        for chunk in &mut chunks {
            for (l, &p) in lanes.iter_mut().zip(chunk) {
                *l += p;
            }
        }
        let inv = 1.0 / (lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>());
        for p in row.iter_mut() {
            *p = flush_tiny(*p * inv);
        }
    }
}

/// Keys per block of [`column_softmax`]'s transpose.
const TRANSPOSE_KEYS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    /// The folded operator against the projected attention it replaces, computed plainly in
    /// f64, on random data of the decoder's shapes (7 queries, 8 heads of 16, 256 channels).
    #[test]
    fn folded_attention_matches_projected_attention() {
        // 256 channels: Y read in place; 200: not whole panels, so packed.
        for c in [256, 200] {
            folded_attention_case(c);
        }
    }

    fn folded_attention_case(c: usize) {
        let (queries, heads, d, keys) = (7, 8, 16, 300);
        let hd = heads * d;
        let mut seed = 1u64;
        let mut rand = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        };
        let q: Vec<f32> = (0..queries * hd).map(|_| rand()).collect();
        let x: Vec<f32> = (0..keys * c).map(|_| rand()).collect();
        let y: Vec<f32> = (0..keys * c).map(|_| rand()).collect();
        let wk: Vec<f32> = (0..c * hd).map(|_| rand() * 0.2).collect();
        let bk: Vec<f32> = (0..hd).map(|_| rand()).collect();
        let wv: Vec<f32> = (0..c * hd).map(|_| rand() * 0.2).collect();
        let bv: Vec<f32> = (0..hd).map(|_| rand()).collect();
        let scale = 0.25;
        let op = FoldedAttention {
            heads,
            depth: d,
            channels: c,
            scale,
            wk: Arc::new(wk.clone()),
            wv: Arc::new(wv.clone()),
            bv: Arc::new(bv.clone()),
        };
        let mut out = vec![0.0; queries * hd];
        op.run(&q, &x, &y, keys, &mut out).unwrap();
        let mut pooled = vec![0.0; queries * hd];
        tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
            tract_onnx::tract_core::tract_linalg::multithread::Executor::multithread(2),
            || op.run(&q, &x, &y, keys, &mut pooled).unwrap(),
        );
        assert_eq!(out, pooled, "2 threads differ from 1");
        let project = |inp: &[f32], w: &[f32], b: &[f32]| -> Vec<f64> {
            let mut p = vec![0.0f64; keys * hd];
            for t in 0..keys {
                for j in 0..hd {
                    p[t * hd + j] = b[j] as f64
                        + (0..c)
                            .map(|ch| inp[t * c + ch] as f64 * w[ch * hd + j] as f64)
                            .sum::<f64>();
                }
            }
            p
        };
        let (k, v) = (project(&x, &wk, &bk), project(&y, &wv, &bv));
        let mut worst = 0.0f64;
        for h in 0..heads {
            for i in 0..queries {
                let qi = &q[(i * heads + h) * d..(i * heads + h + 1) * d];
                let s: Vec<f64> = (0..keys)
                    .map(|t| {
                        scale as f64
                            * (0..d)
                                .map(|e| qi[e] as f64 * k[t * hd + h * d + e])
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|s| (s - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for j in 0..d {
                    let want: f64 =
                        (0..keys).map(|t| e[t] * v[t * hd + h * d + j]).sum::<f64>() / sum;
                    let got = out[(h * queries + i) * d + j] as f64;
                    worst = worst.max((got - want).abs() / (1.0 + want.abs()));
                }
            }
        }
        assert!(worst < 1e-5, "folded attention differs by {worst:e}");
    }

    /// The folded image-to-token attention with its output projection and residual against
    /// the projected computation, plainly in f64 (4096 → 300 image tokens, 7 keys, 8 heads of
    /// 16, 256 channels).
    #[test]
    fn folded_image_attention_matches_projected_attention() {
        let (n, keys, heads, d, c, o) = (300, 7, 8, 16, 256, 256);
        let hd = heads * d;
        let mut seed = 7u64;
        let mut rand = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        };
        let x: Vec<f32> = (0..n * c).map(|_| rand()).collect();
        let k: Vec<f32> = (0..keys * hd).map(|_| rand()).collect();
        let v: Vec<f32> = (0..keys * hd).map(|_| rand()).collect();
        let r: Vec<f32> = (0..n * o).map(|_| rand()).collect();
        let wq: Vec<f32> = (0..c * hd).map(|_| rand() * 0.2).collect();
        let bq: Vec<f32> = (0..hd).map(|_| rand()).collect();
        let wo: Vec<f32> = (0..hd * o).map(|_| rand() * 0.2).collect();
        let bo: Vec<f32> = (0..o).map(|_| rand()).collect();
        let scale = 0.25;
        let op = FoldedImageAttention {
            heads,
            depth: d,
            channels: c,
            scale,
            wq: Arc::new(wq.clone()),
            bq: Arc::new(bq.clone()),
            wo: Arc::new(wo.clone()),
            bo: Arc::new(bo.clone()),
            outputs: o,
            residual: true,
        };
        let mut out = vec![0.0; n * o];
        op.run(&x, &k, &v, Some(&r), &mut out).unwrap();
        let mut pooled = vec![0.0; n * o];
        tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
            tract_onnx::tract_core::tract_linalg::multithread::Executor::multithread(2),
            || op.run(&x, &k, &v, Some(&r), &mut pooled).unwrap(),
        );
        assert_eq!(out, pooled, "2 threads differ from 1");
        let mut worst = 0.0f64;
        for t in 0..n {
            let q: Vec<f64> = (0..hd)
                .map(|j| {
                    bq[j] as f64
                        + (0..c)
                            .map(|ch| x[t * c + ch] as f64 * wq[ch * hd + j] as f64)
                            .sum::<f64>()
                })
                .collect();
            let mut attn = vec![0.0f64; hd];
            for h in 0..heads {
                let s: Vec<f64> = (0..keys)
                    .map(|j| {
                        scale as f64
                            * (0..d)
                                .map(|e| q[h * d + e] * k[(j * heads + h) * d + e] as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|s| (s - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for dd in 0..d {
                    attn[h * d + dd] = (0..keys)
                        .map(|j| e[j] * v[(j * heads + h) * d + dd] as f64)
                        .sum::<f64>()
                        / sum;
                }
            }
            for col in 0..o {
                let want = r[t * o + col] as f64
                    + bo[col] as f64
                    + (0..hd)
                        .map(|j| attn[j] * wo[j * o + col] as f64)
                        .sum::<f64>();
                let got = out[t * o + col] as f64;
                worst = worst.max((got - want).abs() / (1.0 + want.abs()));
            }
        }
        assert!(worst < 1e-5, "folded image attention differs by {worst:e}");
    }
}
