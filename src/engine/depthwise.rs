//! Depthwise 3x3 convolutions and GELU as samrt operators, the GELU fused into the convolution
//! that feeds it.
//!
//! TinyViT's first stage works at 256x256 with 256 channels: each of its tensors is 64 MB, and
//! the stage is bound by memory traffic. tract runs its depthwise 3x3 convolutions (15 in the
//! default encoder) at a third of the speed memory allows on these shapes, and the exact GELU
//! after them as a separate pass (scale, erf, combine) over the tensor. Here a convolution reads
//! each channel plane once and writes the activated result once.
//!
//! [`fuse`] rewrites the ONNX graph before tract parses it: every GELU spelled out as PyTorch
//! exports it (`Div(x, √2)`, `Erf`, `Add(1)`, `Mul(x)`, `Mul(0.5)`) becomes a `SamrtGelu` node,
//! and every depthwise 3x3 `Conv` (one input channel per group, padding 1, stride 1 or 2, a
//! constant bias) a `SamrtDepthwise` node, which takes the GELU in when the convolution feeds it
//! alone. Both compute in f32 what the ONNX operators define; GELU's `erf` is
//! [`super::vector_math::erf`], as accurate as tract's own.

use std::collections::{HashMap, HashSet};

use super::threads::par_chunks_mut;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, attribute_proto::AttributeType, AttributeProto, NodeProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use super::vector_math::{gelu, MulAdd};

/// The ONNX operator type of a depthwise 3x3 convolution (samrt's domain).
pub const DEPTHWISE_OP: &str = "SamrtDepthwise";
/// The ONNX operator type of a GELU (samrt's domain).
pub const GELU_OP: &str = "SamrtGelu";
const DOMAIN: &str = "ai.samrt";

// ---------------------------------------------------------------------------------------------
// The ONNX rewrite.

/// What [`fuse`] replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rewritten {
    /// Depthwise convolutions, with or without their GELU.
    pub depthwise: usize,
    /// GELUs, inside a convolution or on their own.
    pub gelu: usize,
}

/// Replaces the spelled-out GELUs and the depthwise 3x3 convolutions of `graph` (see the module
/// documentation). Every intermediate value of a GELU must be used by the chain alone.
pub fn fuse(graph: &mut pb::GraphProto) -> Rewritten {
    let nodes = &graph.node;
    let mut producer: HashMap<&str, usize> = HashMap::new();
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        for output in &node.output {
            producer.insert(output, i);
        }
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
    let uses = |name: &str| -> &[usize] {
        if graph_outputs.contains(name) {
            return &[];
        }
        consumers.get(name).map_or(&[], |c| c.as_slice())
    };
    let single = |name: &str, op: &str| -> Option<usize> {
        match uses(name) {
            [only] if nodes[*only].op_type == op => Some(*only),
            _ => None,
        }
    };
    let scalar = |name: &str| -> Option<f32> {
        let tensor = match initializers.get(name) {
            Some(t) => *t,
            None => {
                let node = &nodes[*producer.get(name)?];
                if node.op_type != "Constant" {
                    return None;
                }
                node.attribute
                    .iter()
                    .find(|a| a.name == "value")?
                    .t
                    .as_ref()?
            }
        };
        super::layer_norm::scalar_value(tensor)
    };
    let other = |node: &NodeProto, one: &str| -> Option<String> {
        match node.input.as_slice() {
            [a, b] if a == one => Some(b.clone()),
            [a, b] if b == one => Some(a.clone()),
            _ => None,
        }
    };
    let near = |value: Option<f32>, want: f32| value.is_some_and(|v| (v - want).abs() <= 1e-6);

    // GELUs, keyed by their input: (the chain's nodes, its output).
    let mut gelus: HashMap<String, (Vec<usize>, String)> = HashMap::new();
    for (div_ix, div) in nodes.iter().enumerate() {
        if div.op_type != "Div" || div.input.len() != 2 {
            continue;
        }
        let x = &div.input[0];
        if !near(scalar(&div.input[1]), std::f32::consts::SQRT_2) {
            continue;
        }
        let Some(erf_ix) = single(&div.output[0], "Erf") else {
            continue;
        };
        let Some(add_ix) = single(&nodes[erf_ix].output[0], "Add") else {
            continue;
        };
        let add = &nodes[add_ix];
        if !near(
            other(add, &nodes[erf_ix].output[0])
                .as_deref()
                .and_then(scalar),
            1.0,
        ) {
            continue;
        }
        let Some(mul_ix) = single(&add.output[0], "Mul") else {
            continue;
        };
        let mul = &nodes[mul_ix];
        if other(mul, &add.output[0]).as_ref() != Some(x) {
            continue;
        }
        let Some(half_ix) = single(&mul.output[0], "Mul") else {
            continue;
        };
        let half = &nodes[half_ix];
        if !near(other(half, &mul.output[0]).as_deref().and_then(scalar), 0.5) {
            continue;
        }
        gelus.insert(
            x.clone(),
            (
                vec![div_ix, erf_ix, add_ix, mul_ix, half_ix],
                half.output[0].clone(),
            ),
        );
    }

    let mut removed: HashSet<usize> = HashSet::new();
    let mut replaced: HashMap<usize, NodeProto> = HashMap::new();
    let mut fused = Rewritten::default();
    let int = |name: &str, i: i64| AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    };
    for (conv_ix, conv) in nodes.iter().enumerate() {
        let Some(stride) = depthwise_3x3(conv, &initializers) else {
            continue;
        };
        let y = &conv.output[0];
        // The GELU is taken in when the convolution's output goes to it alone.
        let gelu = gelus
            .get(y)
            .filter(|(chain, _)| {
                let mut users = uses(y).to_vec();
                users.sort_unstable();
                users == [chain[0], chain[3]] || users == [chain[3], chain[0]]
            })
            .cloned();
        let output = gelu.as_ref().map_or(y.clone(), |(_, out)| out.clone());
        let node = NodeProto {
            name: format!("{}.samrt_depthwise", conv.name),
            op_type: DEPTHWISE_OP.into(),
            domain: DOMAIN.into(),
            input: conv.input.clone(),
            output: vec![output],
            attribute: vec![int("stride", stride), int("gelu", gelu.is_some() as i64)],
            ..Default::default()
        };
        if let Some((chain, _)) = gelu {
            removed.extend(chain);
            gelus.remove(y);
            fused.gelu += 1;
        }
        removed.insert(conv_ix);
        replaced.insert(conv_ix, node);
        fused.depthwise += 1;
    }
    for (x, (chain, output)) in gelus {
        let node = NodeProto {
            name: format!("{}.samrt_gelu", nodes[chain[0]].name),
            op_type: GELU_OP.into(),
            domain: DOMAIN.into(),
            input: vec![x],
            output: vec![output],
            ..Default::default()
        };
        // In place of the chain's last node, where its input exists.
        removed.extend(&chain);
        replaced.insert(chain[4], node);
        fused.gelu += 1;
    }
    super::layer_norm::splice(graph, replaced, &removed);
    fused
}

/// Makes every stride-1 `SamrtDepthwise` node that sits between TinyViT's moves to and from
/// NCHW channels-last: `Transpose([0, 2, 1])` of the tokens `[b, h·w, c]`, `Reshape` to
/// `[b, c, h, w]`, the convolution, `Reshape` to `[b, c, h·w]`, `Transpose([0, 2, 1])` back. The
/// node then reads and writes the tokens themselves, and the two whole-tensor transposes are
/// gone. Returns how many.
pub fn fuse_channels_last(graph: &mut pb::GraphProto) -> usize {
    let index = super::onnx_graph::GraphIndex::new(graph);
    let nodes = index.nodes;
    let single = |name: &str, op: &str| index.single_consumer(name, op);
    let swaps_last_two = |ix: usize| index.transpose_is(ix, &[0, 2, 1]);
    let mut removed: HashSet<usize> = HashSet::new();
    let mut replaced: HashMap<usize, NodeProto> = HashMap::new();
    for (ix, node) in nodes.iter().enumerate() {
        let stride_one = node
            .attribute
            .iter()
            .any(|a| a.name == "stride" && a.i == 1);
        if node.op_type != DEPTHWISE_OP || !stride_one || node.input.len() != 3 {
            continue;
        }
        let matched = (|| {
            let to_grid = index.producer_of(&node.input[0], "Reshape")?;
            let to_nchw = index.producer_of(&nodes[to_grid].input[0], "Transpose")?;
            (single(&node.input[0], DEPTHWISE_OP) == Some(ix)
                && swaps_last_two(to_nchw)
                && single(&nodes[to_nchw].output[0], "Reshape") == Some(to_grid))
            .then_some(())?;
            let from_grid = single(&node.output[0], "Reshape")?;
            let back = single(&nodes[from_grid].output[0], "Transpose")?;
            swaps_last_two(back).then_some((to_nchw, to_grid, from_grid, back))
        })();
        let Some((to_nchw, to_grid, from_grid, back)) = matched else {
            continue;
        };
        let mut new = node.clone();
        new.input = vec![
            nodes[to_nchw].input[0].clone(),
            node.input[1].clone(),
            node.input[2].clone(),
            nodes[to_grid].input[1].clone(),
        ];
        new.output = vec![nodes[back].output[0].clone()];
        new.attribute.push(AttributeProto {
            name: "channels_last".into(),
            r#type: AttributeType::Int as i32,
            i: 1,
            ..Default::default()
        });
        removed.extend([to_nchw, to_grid, from_grid, back]);
        // In place of the last node, where every input exists.
        replaced.insert(back, new);
        removed.insert(ix);
    }
    let count = replaced.len();
    super::layer_norm::splice(graph, replaced, &removed);
    count
}

/// The stride (1 or 2) of a depthwise 3x3 convolution with padding 1, dilation 1 and constant
/// weights `[C, 1, 3, 3]` and bias `[C]`; `None` for any other `Conv`.
fn depthwise_3x3(conv: &NodeProto, initializers: &HashMap<&str, &pb::TensorProto>) -> Option<i64> {
    if conv.op_type != "Conv" || !conv.domain.is_empty() || conv.input.len() != 3 {
        return None;
    }
    let float = |name: &str| {
        initializers
            .get(name)
            .filter(|t| t.data_type == pb::tensor_proto::DataType::Float as i32)
    };
    let weight = float(&conv.input[1])?;
    let bias = float(&conv.input[2])?;
    let channels = *weight.dims.first()?;
    if weight.dims != [channels, 1, 3, 3] || bias.dims != [channels] {
        return None;
    }
    let mut stride = 1;
    for a in &conv.attribute {
        let ok = match a.name.as_str() {
            "group" => a.i == channels,
            "kernel_shape" => a.ints == [3, 3],
            "pads" => a.ints == [1, 1, 1, 1],
            "dilations" => a.ints == [1, 1],
            "auto_pad" => a.s.is_empty() || a.s == b"NOTSET",
            "strides" => {
                stride = *a.ints.first().unwrap_or(&0);
                a.ints.len() == 2 && a.ints[0] == a.ints[1] && (stride == 1 || stride == 2)
            }
            _ => false,
        };
        if !ok {
            return None;
        }
    }
    let has = |name: &str| conv.attribute.iter().any(|a| a.name == name);
    (has("group") && has("pads")).then_some(stride)
}

// ---------------------------------------------------------------------------------------------
// The operators, as tract's parser builds them.

/// Builds a `SamrtDepthwise` node.
pub fn build_depthwise(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let stride = node.get_attr_opt::<i64>("stride")?.unwrap_or(1);
    ensure!(
        stride == 1 || stride == 2,
        "SamrtDepthwise: stride {stride}"
    );
    let channels_last = node.get_attr_opt::<i64>("channels_last")?.unwrap_or(0) != 0;
    ensure!(
        !channels_last || stride == 1,
        "SamrtDepthwise: channels-last takes stride 1"
    );
    let op = Depthwise {
        stride: stride as usize,
        gelu: node.get_attr_opt::<i64>("gelu")?.unwrap_or(0) != 0,
        grid: None,
    };
    Ok((expand(DepthwiseExpansion { op, channels_last }), vec![]))
}

/// Builds a `SamrtGelu` node.
pub fn build_gelu(
    _ctx: &ParsingContext,
    _node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(GeluExpansion), vec![]))
}

#[derive(Debug, Clone)]
struct DepthwiseExpansion {
    op: Depthwise,
    /// Tokens `[n, h·w, c]` in and out; a fourth input, the `[n, c, h, w]` shape, gives h, w.
    channels_last: bool,
}

impl Expansion for DepthwiseExpansion {
    fn name(&self) -> StaticName {
        DEPTHWISE_OP.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3 + self.channels_last as usize)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        if self.channels_last {
            s.equals(&inputs[0].rank, 3)?;
            s.equals(&inputs[0].shape, &outputs[0].shape)?;
            return Ok(());
        }
        s.equals(&inputs[0].rank, 4)?;
        s.equals(&outputs[0].rank, 4)?;
        s.given(&inputs[0].shape, move |s, shape| {
            let out = self.op.output_shape(&shape);
            s.equals(&outputs[0].shape, ShapeFactoid::from(out))?;
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
        for input in &inputs[..3] {
            ensure!(
                model.outlet_fact(*input)?.datum_type == f32::datum_type(),
                "SamrtDepthwise: f32 only"
            );
        }
        if !self.channels_last {
            return model.wire_node(prefix, self.op.clone(), inputs);
        }
        let grid = model
            .outlet_fact(inputs[3])?
            .konst
            .as_ref()
            .context("SamrtDepthwise: the grid shape is not a constant")?
            .cast_to::<i64>()?
            .to_plain_array_view::<i64>()?
            .iter()
            .copied()
            .collect::<Vec<i64>>();
        let tokens = model
            .outlet_fact(inputs[0])?
            .shape
            .as_concrete()
            .map(|s| s.to_vec());
        let fits = match (&tokens, grid.as_slice()) {
            (Some(t), &[n, c, h, w]) => {
                t.len() == 3
                    && t[0] as i64 == n
                    && t[2] as i64 == c
                    && h > 0
                    && w > 0
                    && t[1] as i64 == h * w
            }
            _ => false,
        };
        ensure!(
            fits,
            "SamrtDepthwise: tokens {tokens:?} do not fit the grid {grid:?}"
        );
        let op = Depthwise {
            grid: Some((grid[2] as usize, grid[3] as usize)),
            ..self.op.clone()
        };
        model.wire_node(prefix, op, &inputs[..3])
    }
}

#[derive(Debug, Clone)]
struct GeluExpansion;

impl Expansion for GeluExpansion {
    fn name(&self) -> StaticName {
        GELU_OP.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        if model.outlet_fact(inputs[0])?.datum_type == f32::datum_type() {
            model.wire_node(prefix, Gelu, inputs)
        } else {
            // Other types: tract's own exact GELU.
            model.wire_node(
                prefix,
                tract_onnx::tract_core::ops::element_wise::ElementWiseOp(
                    Box::new(tract_onnx::tract_core::ops::nn::GeluExact {}),
                    None,
                ),
                inputs,
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The typed operators.

/// Depthwise 3x3 convolution of an NCHW f32 tensor, padding 1, stride 1 or 2, plus the bias,
/// then GELU if `gelu`. Inputs: x `[N, C, H, W]`, weights `[C, 1, 3, 3]`, bias `[C]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Depthwise {
    stride: usize,
    gelu: bool,
    /// Channels-last: x and the output are tokens `[N, h·w, C]` of this grid (stride 1).
    grid: Option<(usize, usize)>,
}

impl Depthwise {
    /// The NCHW convolution of `stride`, with the GELU after it if `gelu`.
    #[cfg(test)]
    pub(super) fn nchw(stride: usize, gelu: bool) -> Self {
        Depthwise {
            stride,
            gelu,
            grid: None,
        }
    }

    /// `[N, C, H, W]` → `[N, C, (H - 1) / s + 1, (W - 1) / s + 1]` (padding 1, kernel 3).
    fn output_shape<D: DimLike>(&self, input: &[D]) -> TVec<D> {
        let mut shape: TVec<D> = input.into();
        if self.stride == 2 {
            for d in &mut shape[2..] {
                *d = d.clone().divceil(2);
            }
        }
        shape
    }
}

impl Op for Depthwise {
    fn name(&self) -> StaticName {
        DEPTHWISE_OP.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "stride: {}, gelu: {}{}",
            self.stride,
            self.gelu,
            match self.grid {
                Some((h, w)) => format!(", channels last on a {h}x{w} grid"),
                None => String::new(),
            }
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for Depthwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        if self.grid.is_some() {
            ensure!(inputs[0].rank() == 3, "SamrtDepthwise: tokens expected");
            return Ok(tvec!(inputs[0].datum_type.fact(inputs[0].shape.clone())));
        }
        ensure!(inputs[0].rank() == 4, "SamrtDepthwise: NCHW input expected");
        Ok(tvec!(inputs[0]
            .datum_type
            .fact(self.output_shape(&inputs[0].shape))))
    }

    as_op!();
}

impl EvalOp for Depthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, w, b) = args_3!(inputs);
        if let Some(grid) = self.grid {
            return self.eval_channels_last(grid, &x, &w, &b);
        }
        let shape = x.shape();
        ensure!(shape.len() == 4, "SamrtDepthwise: NCHW input expected");
        let (n, c, h, wd) = (shape[0], shape[1], shape[2], shape[3]);
        ensure!(
            w.shape() == [c, 1, 3, 3] && b.shape() == [c],
            "SamrtDepthwise: weights {:?} and bias {:?} for {c} channels",
            w.shape(),
            b.shape()
        );
        let out_shape = self.output_shape(shape);
        let (oh, ow) = (out_shape[2], out_shape[3]);
        let x = x.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        let w = w.try_as_plain_ram()?;
        let w = w.as_slice::<f32>()?;
        let b = b.try_as_plain_ram()?;
        let b = b.as_slice::<f32>()?;
        // SAFETY: f32 has no invalid bit patterns, and every output plane is written below.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        let plane = oh * ow;
        if plane > 0 && n * c > 0 {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            let len = out.len();
            let geometry = Plane {
                h,
                w: wd,
                ow,
                stride: self.stride,
                gelu: self.gelu,
            };
            par_chunks_mut(out, plane, len, |first, planes| {
                let mut rows = vec![0f32; 3 * scratch_row(wd)];
                for (i, out) in planes.chunks_exact_mut(plane).enumerate() {
                    let p = first + i;
                    let ch = p % c;
                    let input = &x[p * h * wd..(p + 1) * h * wd];
                    let weights: &[f32; 9] = w[ch * 9..ch * 9 + 9].try_into().unwrap();
                    plane_run(&geometry, input, weights, b[ch], out, &mut rows);
                }
                Ok(())
            })?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl Depthwise {
    /// Channels-last: tokens `[n, h·w, c]` in and out, one task per block of output rows.
    fn eval_channels_last(
        &self,
        (h, w): (usize, usize),
        x: &Tensor,
        weights: &Tensor,
        bias: &Tensor,
    ) -> TractResult<TVec<TValue>> {
        let shape = x.shape();
        ensure!(
            shape.len() == 3 && shape[1] == h * w,
            "SamrtDepthwise: tokens {shape:?} for a {h}x{w} grid"
        );
        let c = shape[2];
        ensure!(
            weights.shape() == [c, 1, 3, 3] && bias.shape() == [c],
            "SamrtDepthwise: weights {:?} and bias {:?} for {c} channels",
            weights.shape(),
            bias.shape()
        );
        let x = x.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        let weights = weights.try_as_plain_ram()?;
        let weights = weights.as_slice::<f32>()?;
        // Tap-major weights [9][c]: each tap's channels contiguous, as the tokens' are.
        let mut taps = vec![0f32; 9 * c];
        for ch in 0..c {
            for tap in 0..9 {
                taps[tap * c + ch] = weights[ch * 9 + tap];
            }
        }
        let bias = bias.try_as_plain_ram()?;
        let bias = bias.as_slice::<f32>()?;
        // SAFETY: f32 has no invalid bit patterns, and every output row is written below.
        let mut output = unsafe { Tensor::uninitialized::<f32>(shape)? };
        let row = w * c;
        if row > 0 && shape[0] * h > 0 {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            let len = out.len();
            let grid = TokenGrid {
                h,
                w,
                c,
                gelu: self.gelu,
            };
            par_chunks_mut(out, row, len, |first, rows| {
                for (i, out) in rows.chunks_exact_mut(row).enumerate() {
                    let (image, y) = ((first + i) / h, (first + i) % h);
                    token_row(
                        &grid,
                        &x[image * h * row..(image + 1) * h * row],
                        y,
                        &taps,
                        bias,
                        out,
                    );
                }
                Ok(())
            })?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

/// One image's token grid, channels last.
#[derive(Debug, Clone, Copy)]
struct TokenGrid {
    h: usize,
    w: usize,
    c: usize,
    gelu: bool,
}

super::vector_math::dispatch_isa!(
    /// Output row `y` (`w x c`) of the image `input` (`h x w x c`).
    fn token_row(grid: &TokenGrid, input: &[f32], y: usize, taps: &[f32], bias: &[f32], out: &mut [f32]) => token_row_body
);

/// Each output value is [`dot9`]'s sum in the kernel's order, plus the bias: the bits of the
/// NCHW path, computed 16 channels at a time.
#[inline(always)]
fn token_row_body<F: MulAdd>(
    grid: &TokenGrid,
    input: &[f32],
    y: usize,
    taps: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    const LANES: usize = 16;
    let (h, w, c) = (grid.h, grid.w, grid.c);
    // Taps outside the grid multiply zeros: they are skipped, which leaves every sum the
    // same (x + 0 = x; the centre tap is always inside).
    let rows = (y == 0) as usize..3 - (y + 1 == h) as usize;
    for x in 0..w {
        let cols = (x == 0) as usize..3 - (x + 1 == w) as usize;
        let dst = &mut out[x * c..(x + 1) * c];
        let mut c0 = 0;
        while c0 + LANES <= c {
            let mut acc = [0f32; LANES];
            for dy in rows.clone() {
                for dx in cols.clone() {
                    let o = ((y + dy - 1) * w + x + dx - 1) * c + c0;
                    let v: &[f32; LANES] = input[o..o + LANES].try_into().unwrap();
                    let t = (dy * 3 + dx) * c + c0;
                    let k: &[f32; LANES] = taps[t..t + LANES].try_into().unwrap();
                    for l in 0..LANES {
                        // Separate multiply and add, as dot9.
                        acc[l] += k[l] * v[l];
                    }
                }
            }
            let b: &[f32; LANES] = bias[c0..c0 + LANES].try_into().unwrap();
            let d: &mut [f32; LANES] = (&mut dst[c0..c0 + LANES]).try_into().unwrap();
            for l in 0..LANES {
                let o = acc[l] + b[l];
                d[l] = if grid.gelu { gelu::<F>(o) } else { o };
            }
            c0 += LANES;
        }
        for ch in c0..c {
            let mut acc = 0f32;
            for dy in rows.clone() {
                for dx in cols.clone() {
                    let o = ((y + dy - 1) * w + x + dx - 1) * c + ch;
                    acc += taps[(dy * 3 + dx) * c + ch] * input[o];
                }
            }
            let o = acc + bias[ch];
            dst[ch] = if grid.gelu { gelu::<F>(o) } else { o };
        }
    }
}

/// One channel plane's convolution.
#[derive(Debug, Clone, Copy)]
struct Plane {
    h: usize,
    w: usize,
    ow: usize,
    stride: usize,
    gelu: bool,
}

super::vector_math::dispatch_isa!(
    /// One channel plane's `out` (`oh x ow`) from `input` (`h x w`); `rows` is scratch for three
    /// padded rows.
    fn plane_run(plane: &Plane, input: &[f32], weights: &[f32; 9], bias: f32, out: &mut [f32], rows: &mut [f32]) => plane_body
);

/// For each output row, the three input rows it reads are copied zero-padded into `rows`
/// (stride 2: split into even and odd padded columns, so that every tap is a contiguous
/// read), then each output value is the nine products in the kernel's order, plus the bias.
#[inline(always)]
fn plane_body<F: MulAdd>(
    plane: &Plane,
    input: &[f32],
    k: &[f32; 9],
    bias: f32,
    out: &mut [f32],
    rows: &mut [f32],
) {
    let (h, w, ow) = (plane.h, plane.w, plane.ow);
    let stride = plane.stride;
    // Padded column j holds input column j - 1; columns 0 and w + 1 are zero.
    let seg = scratch_row(w);
    let half = seg / 2;
    for (y, out_row) in out.chunks_exact_mut(ow).enumerate() {
        for r in 0..3 {
            let dst = &mut rows[r * seg..(r + 1) * seg];
            dst.fill(0.0);
            let iy = (y * stride + r) as isize - 1;
            if iy < 0 || iy as usize >= h {
                continue;
            }
            let src = &input[iy as usize * w..(iy as usize + 1) * w];
            if stride == 1 {
                dst[1..w + 1].copy_from_slice(src);
            } else {
                let (even, odd) = dst.split_at_mut(half);
                for (j, &v) in src.iter().enumerate() {
                    let pj = j + 1;
                    if pj % 2 == 0 {
                        even[pj / 2] = v;
                    } else {
                        odd[pj / 2] = v;
                    }
                }
            }
        }
        let (r0, rest) = rows.split_at(seg);
        let (r1, r2) = rest.split_at(seg);
        let (r2, _) = r2.split_at(seg);
        if stride == 1 {
            padded_row_body::<F>([r0, r1, r2], k, bias, false, out_row);
        } else {
            // Output x reads padded columns 2x, 2x + 1, 2x + 2: even[x], odd[x], even[x + 1].
            fn split(r: &[f32], half: usize, ow: usize) -> (&[f32], &[f32]) {
                let (even, odd) = r.split_at(half);
                (&even[..ow + 1], &odd[..ow])
            }
            let ((e0, o0), (e1, o1)) = (split(r0, half, ow), split(r1, half, ow));
            let (e2, o2) = split(r2, half, ow);
            for (x, o) in out_row.iter_mut().enumerate() {
                let v = [
                    e0[x],
                    o0[x],
                    e0[x + 1],
                    e1[x],
                    o1[x],
                    e1[x + 1],
                    e2[x],
                    o2[x],
                    e2[x + 1],
                ];
                *o = dot9(k, v) + bias;
            }
        }
        if plane.gelu {
            for o in out_row.iter_mut() {
                *o = gelu::<F>(*o);
            }
        }
    }
}

super::vector_math::dispatch_isa!(
    /// One output row of a stride-1 depthwise 3x3 convolution of one channel, from its three
    /// input rows (above, at, below; zeros outside the image) each already zero-padded by one
    /// column on both sides (`out.len() + 2` values): the arithmetic of a whole plane's rows.
    pub(super) fn padded_row_run(rows: [&[f32]; 3], weights: &[f32; 9], bias: f32, gelu_after: bool, out: &mut [f32]) => padded_row_body
);

#[inline(always)]
fn padded_row_body<F: MulAdd>(
    rows: [&[f32]; 3],
    k: &[f32; 9],
    bias: f32,
    gelu_after: bool,
    out: &mut [f32],
) {
    let w = out.len();
    let [r0, r1, r2] = rows.map(|r| &r[..w + 2]);
    for (x, o) in out.iter_mut().enumerate() {
        let v = [
            r0[x],
            r0[x + 1],
            r0[x + 2],
            r1[x],
            r1[x + 1],
            r1[x + 2],
            r2[x],
            r2[x + 1],
            r2[x + 2],
        ];
        *o = dot9(k, v) + bias;
    }
    if gelu_after {
        for o in out.iter_mut() {
            *o = gelu::<F>(*o);
        }
    }
}

/// Scratch values per padded row for an input row of `w`: `w + 2` padded columns, or for
/// stride 2 two halves of `w / 2 + 2` (even and odd columns).
fn scratch_row(w: usize) -> usize {
    2 * (w / 2 + 2)
}

/// `Σ k[i]·v[i]` in the kernel's order.
#[inline(always)]
fn dot9(k: &[f32; 9], v: [f32; 9]) -> f32 {
    // Separate multiply and add: the same bits with every instruction set.
    let mut acc = k[0] * v[0];
    for i in 1..9 {
        acc += k[i] * v[i];
    }
    acc
}

/// GELU (exact) of an f32 tensor, element by element over tract's thread pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Gelu;

impl Op for Gelu {
    fn name(&self) -> StaticName {
        GELU_OP.into()
    }

    op_as_typed_op!();
}

impl TypedOp for Gelu {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].datum_type.fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Values per task of [`Gelu`]'s split.
const GELU_CHUNK: usize = 4096;

impl EvalOp for Gelu {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut x = args_1!(inputs).into_tensor();
        {
            let mut view = x.try_as_plain_ram_mut()?;
            let data = view.as_slice_mut::<f32>()?;
            let len = data.len();
            let (whole, tail) = data.split_at_mut(len / GELU_CHUNK * GELU_CHUNK);
            par_chunks_mut(whole, GELU_CHUNK, len, |_, chunk| {
                gelu_slice(chunk);
                Ok(())
            })?;
            gelu_slice(tail);
        }
        Ok(tvec!(x.into_tvalue()))
    }
}

super::vector_math::dispatch_isa!(
    /// Exact GELU of each value, in place ([`Gelu`]'s arithmetic).
    pub(super) fn gelu_slice(values: &mut [f32]) => gelu_slice_body
);

#[inline(always)]
fn gelu_slice_body<F: MulAdd>(values: &mut [f32]) {
    for v in values {
        *v = gelu::<F>(*v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::vector_math::erf;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 2_654_435_761usize) % 10_007) as f32 / 2500.0 - 2.0)
            .collect()
    }

    /// The ONNX definition, in f64: zero padding 1, 3x3 taps, bias, optional exact GELU.
    fn reference(op: &Depthwise, shape: [usize; 4], x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let [n, c, h, wd] = shape;
        let s = op.stride;
        let (oh, ow) = ((h - 1) / s + 1, (wd - 1) / s + 1);
        let mut out = Vec::with_capacity(n * c * oh * ow);
        for p in 0..n * c {
            let ch = p % c;
            for y in 0..oh {
                for xx in 0..ow {
                    let mut acc = b[ch] as f64;
                    for i in 0..3 {
                        for j in 0..3 {
                            let iy = (y * s + i) as isize - 1;
                            let ix = (xx * s + j) as isize - 1;
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                let v = x[p * h * wd + iy as usize * wd + ix as usize];
                                acc += w[ch * 9 + i * 3 + j] as f64 * v as f64;
                            }
                        }
                    }
                    if op.gelu {
                        let e = erf::<crate::engine::vector_math::Baseline>(
                            (acc / std::f64::consts::SQRT_2) as f32,
                        );
                        acc = 0.5 * acc * (1.0 + e as f64);
                    }
                    out.push(acc as f32);
                }
            }
        }
        out
    }

    #[test]
    fn depthwise_matches_the_onnx_convolution() {
        for stride in [1, 2] {
            for gelu in [false, true] {
                let op = Depthwise {
                    stride,
                    gelu,
                    grid: None,
                };
                for shape in [[1, 3, 7, 9], [2, 4, 8, 8], [1, 2, 1, 1], [1, 5, 16, 33]] {
                    let c = shape[1];
                    let x = values(shape.iter().product(), 3);
                    let w = values(c * 9, 5);
                    let b = values(c, 7);
                    let inputs = tvec![
                        Tensor::from_shape(&shape, &x).unwrap().into_tvalue(),
                        Tensor::from_shape(&[c, 1, 3, 3], &w).unwrap().into_tvalue(),
                        Tensor::from_shape(&[c], &b).unwrap().into_tvalue(),
                    ];
                    let want = reference(&op, shape, &x, &w, &b);
                    let got = crate::engine::fast_ops::tests::run(op.clone(), inputs.clone());
                    assert_eq!(got.len(), want.len());
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() < 1e-5 * (1.0 + w.abs()),
                            "{op:?} {shape:?}: {g} vs {w}"
                        );
                    }
                    let pooled =
                        tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
                            tract_onnx::tract_core::tract_linalg::multithread::Executor::multithread(2),
                            || crate::engine::fast_ops::tests::run(op.clone(), inputs),
                        );
                    assert_eq!(got, pooled, "{op:?} {shape:?}: 2 threads differ from 1");
                }
            }
        }
    }

    /// Channels-last on tokens `[n, h·w, c]` gives the NCHW path's bits, transposed: channel
    /// counts with and without a remainder past 16 lanes, grids of one row and one column.
    #[test]
    fn channels_last_equals_the_nchw_convolution() {
        for gelu in [false, true] {
            for [n, c, h, w] in [[1, 32, 7, 9], [2, 21, 5, 4], [1, 3, 1, 6], [1, 48, 6, 1]] {
                let x = values(n * c * h * w, 3);
                let weights = values(c * 9, 5);
                let b = values(c, 7);
                let nchw = Depthwise {
                    stride: 1,
                    gelu,
                    grid: None,
                };
                let planes = crate::engine::fast_ops::tests::run(
                    nchw.clone(),
                    tvec![
                        Tensor::from_shape(&[n, c, h, w], &x).unwrap().into_tvalue(),
                        Tensor::from_shape(&[c, 1, 3, 3], &weights)
                            .unwrap()
                            .into_tvalue(),
                        Tensor::from_shape(&[c], &b).unwrap().into_tvalue(),
                    ],
                );
                // The same images as tokens [n, h·w, c].
                let mut tokens = vec![0f32; x.len()];
                let mut want = vec![0f32; x.len()];
                for i in 0..n {
                    for ch in 0..c {
                        for p in 0..h * w {
                            let (t, q) = ((i * h * w + p) * c + ch, (i * c + ch) * h * w + p);
                            tokens[t] = x[q];
                            want[t] = planes[q];
                        }
                    }
                }
                let op = Depthwise {
                    grid: Some((h, w)),
                    ..nchw
                };
                let inputs = tvec![
                    Tensor::from_shape(&[n, h * w, c], &tokens)
                        .unwrap()
                        .into_tvalue(),
                    Tensor::from_shape(&[c, 1, 3, 3], &weights)
                        .unwrap()
                        .into_tvalue(),
                    Tensor::from_shape(&[c], &b).unwrap().into_tvalue(),
                ];
                let got = crate::engine::fast_ops::tests::run(op.clone(), inputs.clone());
                assert_eq!(got, want, "{op:?} {n}x{c}x{h}x{w}");
                let pooled =
                    tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
                        tract_onnx::tract_core::tract_linalg::multithread::Executor::multithread(2),
                        || crate::engine::fast_ops::tests::run(op.clone(), inputs),
                    );
                assert_eq!(got, pooled, "2 threads differ from 1");
            }
        }
    }

    #[test]
    fn gelu_op_is_the_exact_gelu_at_any_length() {
        for len in [0, 1, 17, GELU_CHUNK * 3 + 5] {
            let x = values(len, 11);
            let got = crate::engine::fast_ops::tests::run(
                Gelu,
                tvec![Tensor::from_shape(&[len], &x).unwrap().into_tvalue()],
            );
            for (g, &v) in got.iter().zip(&x) {
                let want =
                    0.5 * v as f64 * (1.0 + libm_free_erf(v as f64 / std::f64::consts::SQRT_2));
                assert!((*g as f64 - want).abs() < 2e-6, "gelu({v}): {g} vs {want}");
            }
        }
    }

    /// erf by its Taylor series (|x| < 3 here).
    fn libm_free_erf(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn tinyvit_depthwise_convolutions_and_gelus_are_rewritten() {
        let mut proto = crate::engine::fast_ops::tests::default_encoder_proto();
        let graph = proto.graph.as_mut().unwrap();
        let rewritten = fuse(graph);
        // 15 depthwise 3x3 convolutions; 23 GELUs, 5 of them right after a depthwise one.
        assert_eq!(
            rewritten,
            Rewritten {
                depthwise: 15,
                gelu: 23
            }
        );
        let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
        assert_eq!(count("Erf"), 0);
        assert_eq!(count(GELU_OP), 18);
        assert_eq!(count(DEPTHWISE_OP), 15);
        let with_gelu = graph
            .node
            .iter()
            .filter(|n| {
                n.op_type == DEPTHWISE_OP
                    && n.attribute.iter().any(|a| a.name == "gelu" && a.i == 1)
            })
            .count();
        assert_eq!(with_gelu, 5);
        // The rest of the convolutions stay tract's.
        assert_eq!(count("Conv"), 29 - 15);
        // The ten local convolutions between the attention and the MLP, on 14x14.. grids of
        // tokens, read and write the tokens channels-last.
        let transposes = count("Transpose");
        assert_eq!(fuse_channels_last(graph), 10);
        let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
        assert_eq!(count("Transpose"), transposes - 20);
        assert_eq!(count(DEPTHWISE_OP), 15);
    }
}
