//! TinyViT's MBConv blocks as one samrt operator: `GELU(x + conv3(GELU(dw(GELU(conv1(x))))))`,
//! the 1x1 expansion, the depthwise 3x3 and the 1x1 projection computed row by row so that the
//! expanded activations never leave the cache.
//!
//! The default encoder's first stage runs two of these blocks at 256x256 pixels, expanding 64
//! channels to 256: as separate operators every block writes and reads back three 64 MB tensors
//! (the expansion, the depthwise output, then the projection's input again), ~350 MB of memory
//! traffic, and its 1x1 convolutions and depthwise wait on memory more than they compute; on two
//! cores sharing the memory bus they gained 1.4x from the second one. Here a task takes a band of
//! output rows and walks down it keeping three expanded rows (a ring, each row zero-padded by a
//! column for the depthwise taps), one depthwise output row and its own packing scratch: ~1.3 MB
//! at 256 pixels x 256 channels, in L2. Only `x` is read and the block's output written.
//!
//! Each value is computed with the arithmetic of the separate operators ([`super::conv1x1`]'s
//! tiles, [`super::depthwise`]'s rows, tract's add, samrt's GELU), so the fused block gives the
//! same bits as the unfused chain, at every thread count (a band recomputes the expanded rows
//! at its edges, with the same arithmetic).
//!
//! [`fuse`] rewrites the chain `SamrtConv1x1` (with GELU) → stride-1 `SamrtDepthwise` →
//! `SamrtConv1x1` → `Add` of the block's input → `SamrtGelu` (optional) after
//! [`super::conv1x1::fuse`]; `SAMRT_MBCONV=0` keeps the separate operators.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, attribute_proto::AttributeType, AttributeProto, NodeProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use super::conv1x1::{conv_weights, Conv1x1, OutPtr, BLOCK_PIXELS};
use super::depthwise::{gelu_slice, padded_row_run};
use super::vector_math::AlignedVec;

/// The ONNX operator type of a fused MBConv block (samrt's domain).
pub const OP_TYPE: &str = "SamrtMbConv";
const DOMAIN: &str = "ai.samrt";

/// Bands of output rows per thread. A band recomputes two expanded rows at its edges (the
/// expansion is about half a block's work): at 2 threads a part's 64 rows in 8 bands cost 25%
/// more expansion than in one band, and the blocks gained 1.65x from the second thread; with one
/// band per thread, 1.85x (per-operator profile, minimum of three runs each).
const BANDS_PER_THREAD: usize = 1;

/// Nodes one block is cut into, each a horizontal part of the output (joined by a `Concat`): a
/// press waits for at most the encoder operator in flight (`service::priority`), and a whole
/// block at 256x256 is ~45–90 ms.
const PARTS: usize = 4;

// ---------------------------------------------------------------------------------------------
// The ONNX rewrite.

/// Replaces each MBConv chain (see the module documentation) by one `SamrtMbConv` node with
/// inputs `x, W1, b1, Wdw, bdw, W3, b3`; returns how many. Run after
/// [`super::conv1x1::fuse`].
pub fn fuse(graph: &mut pb::GraphProto) -> usize {
    let nodes = &graph.node;
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        for input in &node.input {
            consumers.entry(input).or_default().push(i);
        }
    }
    let graph_outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let dims: HashMap<&str, &[i64]> = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == pb::tensor_proto::DataType::Float as i32)
        .map(|t| (t.name.as_str(), t.dims.as_slice()))
        .collect();
    // The node that alone reads `value`, if it is not a graph output.
    let only = |value: &str| match consumers.get(value).map(|c| c.as_slice()) {
        Some([one]) if !graph_outputs.contains(value) => Some(*one),
        _ => None,
    };
    let int = |node: &NodeProto, name: &str| {
        node.attribute
            .iter()
            .find(|a| a.name == name)
            .map_or(0, |a| a.i)
    };
    let samrt = |node: &NodeProto, op: &str| node.op_type == op && node.domain == DOMAIN;
    let mut removed: HashSet<usize> = HashSet::new();
    let mut replaced: HashMap<usize, NodeProto> = HashMap::new();
    for (expand_ix, expand) in nodes.iter().enumerate() {
        if !samrt(expand, super::conv1x1::OP_TYPE)
            || int(expand, "gelu") != 1
            || expand.input.len() != 3
        {
            continue;
        }
        let x = &expand.input[0];
        let Some(dw_ix) = only(&expand.output[0]) else {
            continue;
        };
        let dw = &nodes[dw_ix];
        if !samrt(dw, super::depthwise::DEPTHWISE_OP)
            || int(dw, "stride") != 1
            || int(dw, "channels_last") != 0
            || dw.input.len() != 3
            || dw.input[0] != expand.output[0]
        {
            continue;
        }
        let Some(project_ix) = only(&dw.output[0]) else {
            continue;
        };
        let project = &nodes[project_ix];
        if !samrt(project, super::conv1x1::OP_TYPE)
            || int(project, "gelu") != 0
            || project.input.len() != 3
            || project.input[0] != dw.output[0]
        {
            continue;
        }
        let Some(add_ix) = only(&project.output[0]) else {
            continue;
        };
        let add = &nodes[add_ix];
        let residual = match add.input.as_slice() {
            [a, b] if *a == project.output[0] => b,
            [a, b] if *b == project.output[0] => a,
            _ => continue,
        };
        if add.op_type != "Add" || !add.domain.is_empty() || residual != x {
            continue;
        }
        // Weights [hidden, c, 1, 1], [hidden, 1, 3, 3], [c, hidden, 1, 1] and their biases.
        let shapes = [
            &expand.input[1],
            &expand.input[2],
            &dw.input[1],
            &dw.input[2],
            &project.input[1],
            &project.input[2],
        ]
        .map(|name| dims.get(name.as_str()).copied());
        let [Some(w1), Some(b1), Some(wd), Some(bd), Some(w3), Some(b3)] = shapes else {
            continue;
        };
        let (hidden, c) = match w1 {
            [h, c, 1, 1] => (*h, *c),
            _ => continue,
        };
        let consistent = b1 == [hidden]
            && wd == [hidden, 1, 3, 3]
            && bd == [hidden]
            && w3 == [c, hidden, 1, 1]
            && b3 == [c];
        if !consistent {
            continue;
        }
        let act = only(&add.output[0]).filter(|&g| samrt(&nodes[g], super::depthwise::GELU_OP));
        let output = act.map_or(&add.output[0], |g| &nodes[g].output[0]).clone();
        let node = NodeProto {
            name: format!("{}.samrt_mbconv", expand.name),
            op_type: OP_TYPE.into(),
            domain: DOMAIN.into(),
            input: vec![
                x.clone(),
                expand.input[1].clone(),
                expand.input[2].clone(),
                dw.input[1].clone(),
                dw.input[2].clone(),
                project.input[1].clone(),
                project.input[2].clone(),
            ],
            output: vec![output],
            attribute: vec![
                AttributeProto {
                    name: "gelu".into(),
                    r#type: AttributeType::Int as i32,
                    i: act.is_some() as i64,
                    ..Default::default()
                },
                AttributeProto {
                    name: "depthwise_gelu".into(),
                    r#type: AttributeType::Int as i32,
                    i: int(dw, "gelu"),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        removed.extend([expand_ix, dw_ix, project_ix, add_ix]);
        removed.extend(act);
        replaced.insert(act.unwrap_or(add_ix), node);
    }
    let count = replaced.len();
    super::layer_norm::splice(graph, replaced, &removed);
    count
}

// ---------------------------------------------------------------------------------------------
// The operator, as tract's parser builds it.

/// Builds a `SamrtMbConv` node.
pub fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let gelu = node.get_attr_opt::<i64>("gelu")?.unwrap_or(0) != 0;
    let depthwise_gelu = node.get_attr_opt::<i64>("depthwise_gelu")?.unwrap_or(0) != 0;
    Ok((
        expand(MbConvExpansion {
            gelu,
            depthwise_gelu,
        }),
        vec![],
    ))
}

#[derive(Debug, Clone)]
struct MbConvExpansion {
    gelu: bool,
    depthwise_gelu: bool,
}

impl Expansion for MbConvExpansion {
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
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        // Each convolution's constant weights and bias, as the fused convolutions read theirs.
        let weights =
            |at: usize| conv_weights(OP_TYPE, model, &[inputs[0], inputs[at], inputs[at + 1]]);
        let ((w1, b1), (wd, bd), (w3, b3)) = (weights(1)?, weights(3)?, weights(5)?);
        let &[hidden, c, 1, 1] = w1.shape() else {
            bail!(
                "{OP_TYPE}: expansion weights [hidden, c, 1, 1] expected, got {:?}",
                w1.shape()
            );
        };
        ensure!(
            b1.len() == hidden && wd.shape() == [hidden, 1, 3, 3] && bd.len() == hidden,
            "{OP_TYPE}: expansion bias and depthwise weights for {hidden} channels expected"
        );
        ensure!(
            w3.shape() == [c, hidden, 1, 1] && b3.len() == c,
            "{OP_TYPE}: projection weights [{c}, {hidden}, 1, 1] expected"
        );
        let plain = |t: &Tensor| -> TractResult<Vec<f32>> {
            Ok(t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
        };
        let (w1, wd, w3) = (plain(&w1)?, plain(&wd)?, plain(&w3)?);
        let op = MbConv {
            c,
            hidden,
            expand: Conv1x1::new(&w1, &b1, hidden, c, true),
            depthwise: Arc::new(wd.chunks_exact(9).map(|k| k.try_into().unwrap()).collect()),
            depthwise_bias: Arc::new(bd),
            depthwise_gelu: self.depthwise_gelu,
            project: Conv1x1::new(&w3, &b3, c, hidden, false),
            gelu: self.gelu,
            part: 0,
            parts: 1,
        };
        let h = model.outlet_fact(inputs[0])?.shape[2].to_usize().ok();
        let parts = h.map_or(1, |h| PARTS.min(h).max(1));
        if parts == 1 {
            return model.wire_node(prefix, op, &inputs[..1]);
        }
        let mut outputs = tvec![];
        for part in 0..parts {
            let op = MbConv {
                part,
                parts,
                ..op.clone()
            };
            outputs.push(model.wire_node(format!("{prefix}.part{part}"), op, &inputs[..1])?[0]);
        }
        model.wire_node(
            prefix,
            tract_onnx::tract_core::ops::array::TypedConcat::new(2),
            &outputs,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The typed operator.

/// One MBConv block over NCHW f32 tensors of `c` channels, expanded to `hidden`.
#[derive(Debug, Clone, PartialEq)]
pub struct MbConv {
    c: usize,
    hidden: usize,
    /// The 1x1 expansion with its GELU.
    expand: Conv1x1,
    depthwise: Arc<Vec<[f32; 9]>>,
    depthwise_bias: Arc<Vec<f32>>,
    depthwise_gelu: bool,
    /// The 1x1 projection back to `c` channels.
    project: Conv1x1,
    /// GELU after the residual add.
    gelu: bool,
    /// This node computes output rows `part * h / parts..(part + 1) * h / parts` (see [`PARTS`]).
    part: usize,
    parts: usize,
}

impl Eq for MbConv {}

impl std::hash::Hash for MbConv {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.c, self.hidden, self.depthwise_gelu, self.gelu).hash(state);
        (self.part, self.parts).hash(state);
        self.expand.hash(state);
        self.project.hash(state);
    }
}

impl Op for MbConv {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} → {} → {} channels, gelu after the residual: {}, part {} of {}",
            self.c,
            self.hidden,
            self.c,
            self.gelu,
            self.part + 1,
            self.parts
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for MbConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(
            x.rank() == 4 && x.shape[1] == self.c.to_dim(),
            "{OP_TYPE}: NCHW input of {} channels expected, got {:?}",
            self.c,
            x.shape
        );
        let mut shape = x.shape.to_tvec();
        let h = shape[2]
            .to_usize()
            .with_context(|| format!("{OP_TYPE}: the height must be known"))?;
        shape[2] = self.rows(h).len().to_dim();
        Ok(tvec!(x.datum_type.fact(shape)))
    }

    as_op!();
}

/// One task's buffers.
struct Scratch {
    /// Three expanded rows, `hidden` channel rows of `w + 2` values each (zero borders).
    ring: AlignedVec<f32>,
    /// A padded row of zeros: the rows above and below the image.
    zeros: Vec<f32>,
    /// One depthwise output row, `hidden` rows of `w`.
    depthwise: AlignedVec<f32>,
    /// The 1x1 kernels' packed pixel block.
    pack: AlignedVec<f32>,
}

impl EvalOp for MbConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = x.shape();
        ensure!(
            shape.len() == 4 && shape[1] == self.c,
            "{OP_TYPE}: NCHW input of {} channels expected, got {shape:?}",
            self.c
        );
        let (n, h, w) = (shape[0], shape[2], shape[3]);
        let view = x.try_as_plain_ram()?;
        let data = view.as_slice::<f32>()?;
        let rows = self.rows(h);
        // SAFETY: f32 has no invalid bit patterns, and every output value is written.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&[n, self.c, rows.len(), w])? };
        let image = self.c * h * w;
        let out_image = self.c * rows.len() * w;
        if n * out_image == 0 {
            return Ok(tvec!(output.into_tvalue()));
        }
        let threads = super::threads::threads();
        let bands = if threads > 1 {
            (BANDS_PER_THREAD * threads).min(rows.len())
        } else {
            1
        };
        let units = n * bands;
        let out = OutPtr(
            output
                .try_as_plain_ram_mut()?
                .as_slice_mut::<f32>()?
                .as_mut_ptr(),
        );
        let scratch = || Scratch {
            ring: AlignedVec::zeroed(3 * self.hidden * (w + 2)),
            zeros: vec![0.0; w + 2],
            depthwise: AlignedVec::zeroed(self.hidden * w),
            pack: AlignedVec::zeroed(self.hidden.max(self.c) * BLOCK_PIXELS),
        };
        let task = |scratch: &mut Scratch, unit: usize| {
            let (img, band) = (unit / bands, unit % bands);
            let len = rows.len();
            let band = rows.start + band * len / bands..rows.start + (band + 1) * len / bands;
            let x = &data[img * image..(img + 1) * image];
            // SAFETY: bands write disjoint rows of image `img`'s output.
            unsafe {
                self.band(
                    x,
                    (h, w),
                    band,
                    rows.clone(),
                    scratch,
                    out.at(img * out_image),
                )
            };
        };
        super::threads::for_each_unit(units, scratch, task);
        Ok(tvec!(output.into_tvalue()))
    }
}

impl MbConv {
    /// The output rows of the block this node computes, of an input `h` rows high.
    fn rows(&self, h: usize) -> std::ops::Range<usize> {
        self.part * h / self.parts..(self.part + 1) * h / self.parts
    }

    /// Output rows `rows` of one image: `x` its `c x h x w` input, `out` this node's output for
    /// it (rows `part` of the image's).
    ///
    /// # Safety
    /// `out` points at the image's `c x part.len() x w` output, whose rows `rows` (inside
    /// `part`) no other task writes.
    unsafe fn band(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        rows: std::ops::Range<usize>,
        part: std::ops::Range<usize>,
        scratch: &mut Scratch,
        out: *mut f32,
    ) {
        let Scratch {
            ring,
            zeros,
            depthwise,
            pack,
        } = scratch;
        let plane = h * w;
        let out_plane = part.len() * w;
        let seg = w + 2;
        let slot = self.hidden * seg;
        let blocks = |row_start: usize| {
            (0..w)
                .step_by(BLOCK_PIXELS)
                .map(move |b| (row_start + b, b, (b + BLOCK_PIXELS).min(w) - b))
        };
        // The expansion of input row y into ring slot y % 3, one column in.
        let expand_row = |ring: &mut AlignedVec<f32>, pack: &mut AlignedVec<f32>, y: usize| {
            let at = (y % 3) * slot + 1;
            for (start, b, len) in blocks(y * w) {
                // SAFETY: the slot holds `hidden` rows of `seg` values; this writes `len`
                // values from column 1 + b of each, inside the row.
                unsafe {
                    self.expand.block_strided(
                        x,
                        plane,
                        start..start + len,
                        pack,
                        ring.as_mut_ptr().add(at + b),
                        seg,
                    )
                };
            }
        };
        if rows.start > 0 {
            expand_row(ring, pack, rows.start - 1);
        }
        expand_row(ring, pack, rows.start);
        for y in rows {
            if y + 1 < h {
                expand_row(ring, pack, y + 1);
            }
            let row = |ring: &AlignedVec<f32>, yy: Option<usize>, ch: usize| -> *const f32 {
                match yy {
                    Some(yy) if yy < h => ring[(yy % 3) * slot + ch * seg..].as_ptr(),
                    _ => zeros.as_ptr(),
                }
            };
            for ch in 0..self.hidden {
                let [above, at, below] = [y.checked_sub(1), Some(y), Some(y + 1)].map(|yy| {
                    // SAFETY: a ring row or the zero row, `seg` values either way.
                    unsafe { std::slice::from_raw_parts(row(ring, yy, ch), seg) }
                });
                padded_row_run(
                    [above, at, below],
                    &self.depthwise[ch],
                    self.depthwise_bias[ch],
                    self.depthwise_gelu,
                    &mut depthwise[ch * w..(ch + 1) * w],
                );
            }
            for (_, b, len) in blocks(0) {
                // SAFETY: the caller's contract: row y of each output channel, columns b..b+len.
                unsafe {
                    self.project.block_strided(
                        depthwise,
                        w,
                        b..b + len,
                        pack,
                        out.add((y - part.start) * w + b),
                        out_plane,
                    )
                };
            }
            for o in 0..self.c {
                let at = o * plane + y * w;
                let out_at = o * out_plane + (y - part.start) * w;
                // SAFETY: the caller's contract: row y of output channel o.
                let values = unsafe { std::slice::from_raw_parts_mut(out.add(out_at), w) };
                for (v, r) in values.iter_mut().zip(&x[at..at + w]) {
                    *v += *r;
                }
                if self.gelu {
                    gelu_slice(values);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::depthwise::{Depthwise, Gelu};
    use super::*;
    use tract_onnx::tract_core::tract_linalg::multithread::{multithread_tract_scope, Executor};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 2_654_435_761usize) % 10_007) as f32 / 5000.0 - 1.0)
            .collect()
    }

    fn eval(op: impl EvalOp, inputs: TVec<TValue>) -> Tensor {
        let mut out = op.eval(&EvalContext::out_of_plan(), inputs).unwrap();
        out.remove(0).into_tensor()
    }

    /// The fused block against the separate operators it replaces, one after the other as the
    /// unfused plan runs them: the same bits, at 1 and 2 threads, on TinyViT's channel counts
    /// and on rows wider than one pixel block.
    #[test]
    fn fused_blocks_equal_the_separate_operators() {
        for ([n, c, h, w], hidden, gelu) in [
            ([1, 64, 23, 37], 256, true),
            ([2, 8, 5, 300], 24, false),
            ([1, 3, 1, 1], 5, true),
        ] {
            let x = Tensor::from_shape(&[n, c, h, w], &values(n * c * h * w, 1)).unwrap();
            let (w1, b1) = (values(hidden * c, 2), values(hidden, 3));
            let (wd, bd) = (values(hidden * 9, 4), values(hidden, 5));
            let (w3, b3) = (values(c * hidden, 6), values(c, 7));
            let expand = Conv1x1::new(&w1, &b1, hidden, c, true);
            let project = Conv1x1::new(&w3, &b3, c, hidden, false);
            let expanded = eval(expand.clone(), tvec!(x.clone().into_tvalue()));
            let wd_t = Tensor::from_shape(&[hidden, 1, 3, 3], &wd).unwrap();
            let bd_t = Tensor::from_shape(&[hidden], &bd).unwrap();
            let local = eval(
                Depthwise::nchw(1, true),
                tvec!(
                    expanded.into_tvalue(),
                    wd_t.into_tvalue(),
                    bd_t.into_tvalue()
                ),
            );
            let projected = eval(project.clone(), tvec!(local.into_tvalue()));
            let mut want = projected
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap()
                .to_vec();
            let xs = x
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap()
                .to_vec();
            for (v, r) in want.iter_mut().zip(&xs) {
                *v += *r;
            }
            let mut want = Tensor::from_shape(&[n, c, h, w], &want).unwrap();
            if gelu {
                want = eval(Gelu, tvec!(want.into_tvalue()));
            }
            let op = MbConv {
                c,
                hidden,
                expand,
                depthwise: Arc::new(wd.chunks_exact(9).map(|k| k.try_into().unwrap()).collect()),
                depthwise_bias: Arc::new(bd),
                depthwise_gelu: true,
                project,
                gelu,
                part: 0,
                parts: 1,
            };
            let got = eval(op.clone(), tvec!(x.clone().into_tvalue()));
            assert_eq!(got, want, "{:?}: 1 thread", [n, c, h, w]);
            let pooled = multithread_tract_scope(Executor::multithread(2), || {
                eval(op.clone(), tvec!(x.clone().into_tvalue()))
            });
            assert_eq!(pooled, want, "{:?}: 2 threads", [n, c, h, w]);
            // In parts, as the fused graph runs it: the parts joined are the whole.
            let parts = 3.min(h);
            let pieces: Vec<Tensor> = (0..parts)
                .map(|part| {
                    let op = MbConv {
                        part,
                        parts,
                        ..op.clone()
                    };
                    eval(op, tvec!(x.clone().into_tvalue()))
                })
                .collect();
            let joined = Tensor::stack_tensors(2, &pieces).unwrap();
            assert_eq!(joined, want, "{:?}: in {parts} parts", [n, c, h, w]);
        }
    }

    /// The default encoder's two stage-0 MBConv blocks are fused (its patch mergings, whose
    /// depthwise has stride 2 and no residual, are not).
    #[test]
    fn tinyvit_stage_zero_blocks_are_fused() {
        let files = crate::model::ModelFiles::default_model().expect("default model");
        let bytes = std::fs::read(&files.encoder).expect("encoder bytes");
        let onnx = super::super::fast_ops::onnx();
        let mut proto = onnx.proto_model_for_read(&mut &*bytes).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        super::super::depthwise::fuse(graph);
        super::super::conv1x1::fuse(graph);
        assert_eq!(fuse(graph), 2);
        let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
        assert_eq!(count(OP_TYPE), 2);
        // Each block took in two 1x1 convolutions and the GELU after its residual.
        assert_eq!(count(super::super::conv1x1::OP_TYPE), 11 - 4);
        onnx.model_for_proto_model(&proto)
            .expect("the fused graph parses");
    }
}
