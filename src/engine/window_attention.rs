//! Windowed attention on the token grid: the window partition, its padding and its reverse
//! absorbed into samrt's attention operator.
//!
//! TinyViT's attention blocks partition the token grid into windows around the attention:
//! a `Reshape` to `[b, h, w, c]`, a `Pad` bottom and right to whole windows, then `Reshape`,
//! `Transpose` and `Reshape` into `[windows, side², c]`; the per-token layer norm and qkv
//! projection, the attention, the output projection; and the reverse: `Reshape`, `Transpose`
//! and `Reshape` back to the padded grid, and two `Slice`s cropping the padding. tract runs each
//! of those moves as a single-threaded copy of the whole activation, a tenth of a two-thread
//! encoder run.
//!
//! The norm and the projections work token by token, so they give the same values on the grid
//! as on the windows. [`fuse`] therefore runs them on the grid itself (`[b, h·w, c]`) and makes
//! the attention node windowed: it gathers each window's tokens from the grid's qkv rows and
//! writes its results into the grid's rows. The padding tokens, zeros before the norm, have one
//! qkv row, the same for all: the same norm and projection applied to a zero token, which tract
//! folds into a constant at load. The partition, the padding of every window's outer tokens, the
//! reverse and the crop are gone, and the padded query rows (8% of a 128x128 grid in 7x7
//! windows) are not computed.
//!
//! The result is the same, bit for bit, as the partitioned graph's with samrt's operators
//! (`SAMRT_WINDOW_ATTENTION=0` keeps the partition, for measuring).

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{self, attribute_proto::AttributeType, AttributeProto, NodeProto};

use super::onnx_graph::GraphIndex;

/// Rewrites every windowed `SamrtAttention` node of `graph` (after [`super::attention::fuse`])
/// that sits inside TinyViT's window partition; returns how many.
pub fn fuse(graph: &mut pb::GraphProto) -> usize {
    let index = GraphIndex::new(graph);
    let mut edits: Vec<Edit> = Vec::new();
    for (ix, node) in graph.node.iter().enumerate() {
        if node.op_type == super::attention::OP_TYPE {
            if let Some(edit) = index.match_block(ix) {
                edits.push(edit);
            }
        }
    }
    let count = edits.len();
    if count == 0 {
        return 0;
    }
    let mut replaced: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut removed: HashSet<usize> = HashSet::new();
    for edit in edits {
        graph.initializer.push(edit.zeros);
        for (ix, node) in edit.changed {
            replaced.insert(ix, vec![node]);
        }
        replaced.insert(edit.attention_ix, edit.attention);
        removed.extend(edit.removed);
    }
    super::layer_norm::splice_many(graph, replaced, &removed);
    count
}

/// One block's rewrite.
struct Edit {
    /// The padding row's nodes, then the windowed attention node, in place of the attention.
    attention_ix: usize,
    attention: Vec<NodeProto>,
    /// Nodes kept with new inputs or outputs.
    changed: Vec<(usize, NodeProto)>,
    removed: Vec<usize>,
    /// The zero token the padding row is computed from.
    zeros: pb::TensorProto,
}

impl<'a> GraphIndex<'a> {
    /// The token-wise node `ix` (a layer norm over the last axis, a linear layer) and its data
    /// input; `None` for anything else.
    fn token_wise(&self, ix: usize) -> Option<&'a str> {
        let node = &self.nodes[ix];
        let constant = |name: &str, rank: usize| {
            self.initializers
                .get(name)
                .is_some_and(|t| t.dims.len() == rank)
        };
        match node.op_type.as_str() {
            "LayerNormalization" => {
                let axis = node.attribute.iter().find(|a| a.name == "axis");
                (axis.is_none_or(|a| a.i == -1) && node.output.len() == 1)
                    .then_some(node.input[0].as_str())
            }
            super::linear::OP_TYPE => Some(node.input[0].as_str()),
            "MatMul" if constant(&node.input[1], 2) => Some(node.input[0].as_str()),
            "Add" if constant(&node.input[1], 1) => Some(node.input[0].as_str()),
            "Add" if constant(&node.input[0], 1) => Some(node.input[1].as_str()),
            _ => None,
        }
    }

    /// Channels of a token entering token-wise node `ix` (from its weights).
    fn channels_in(&self, ix: usize) -> Option<i64> {
        let node = &self.nodes[ix];
        let dims = |name: &str| self.initializers.get(name).map(|t| t.dims.clone());
        match node.op_type.as_str() {
            "LayerNormalization" => dims(&node.input[1])?.first().copied(),
            "MatMul" => dims(&node.input[1])?.first().copied(),
            op if op == super::linear::OP_TYPE => dims(&node.input[1])?.first().copied(),
            _ => None,
        }
    }

    /// Matches the windowed block around attention node `ix`; `None` if it is not one.
    fn match_block(&self, ix: usize) -> Option<Edit> {
        let attention = &self.nodes[ix];
        let attr_ints = |name: &str| self.ints_attr(ix, name).unwrap_or_default();
        let attr_int = |name: &str| {
            attention
                .attribute
                .iter()
                .find(|a| a.name == name)
                .map_or(0, |a| a.i)
        };
        // Heads from axis 2 of [windows, tokens, heads, parts], as TinyViT lays out q, k, v.
        if attr_ints("q_perm") != [0, 2, 1, 3]
            || attr_ints("k_perm") != [0, 2, 3, 1]
            || attr_ints("v_perm") != [0, 2, 1, 3]
            || attr_ints("out_perm") != [0, 2, 1, 3]
            || attr_int("decomposed") != 0
            || attention.attribute.iter().any(|a| a.name == "window")
        {
            return None;
        }
        // q, k, v: the three parts of one Split along the last axis.
        let split_ix = self.producer_of(&attention.input[0], "Split")?;
        let split = &self.nodes[split_ix];
        if split.output[..] != attention.input[..3]
            || !(1..=2).contains(&split.input.len())
            || !attention.input[..3].iter().all(|o| self.single_use(o))
            || self.nodes[split_ix]
                .attribute
                .iter()
                .find(|a| a.name == "axis")
                .map(|a| a.i)
                != Some(3)
        {
            return None;
        }
        // The sizes: an attribute up to opset 12, an input from opset 13.
        let parts = match split.input.get(1) {
            Some(sizes) => self.ints(sizes)?,
            None => self.ints_attr(split_ix, "split")?,
        };
        if parts.len() != 3 || parts[0] != parts[1] {
            return None;
        }
        let heads_reshape = self.producer_of(&split.input[0], "Reshape")?;
        if !self.single_use(&split.input[0]) {
            return None;
        }
        let qkv = self.nodes[heads_reshape].input[0].as_str();
        if !self.single_use(qkv) {
            return None;
        }
        // Back from qkv through token-wise nodes to the partition.
        let mut chain = Vec::new();
        let mut current = qkv;
        let partitioned = loop {
            let &p = self.producer.get(current)?;
            if self.nodes[p].op_type == "Reshape" {
                break p;
            }
            let input = self.token_wise(p)?;
            if !chain.is_empty() && !self.single_use(current) {
                return None;
            }
            chain.push(p);
            current = input;
            if chain.len() > 4 {
                return None;
            }
        };
        if chain.is_empty() {
            return None;
        }
        chain.reverse();
        let transpose = self.producer_of(&self.nodes[partitioned].input[0], "Transpose")?;
        let windows = self.producer_of(&self.nodes[transpose].input[0], "Reshape")?;
        let pad = self.producer_of(&self.nodes[windows].input[0], "Pad")?;
        let grid = self.producer_of(&self.nodes[pad].input[0], "Reshape")?;
        let pad_node = &self.nodes[pad];
        let constant_zero = pad_node.input.get(2).is_none_or(|v| v.is_empty());
        let mode_constant = pad_node
            .attribute
            .iter()
            .find(|a| a.name == "mode")
            .is_none_or(|a| a.s == b"constant");
        if !self.transpose_is(transpose, &[0, 1, 3, 2, 4, 5])
            || !constant_zero
            || !mode_constant
            || pad_node.input.len() < 2
        {
            return None;
        }
        let tokens = self.nodes[grid].input[0].as_str();

        // Forward from the attention: Reshape, token-wise nodes, then the reverse partition.
        let heads_merge = self.single_consumer(&attention.output[0], "Reshape")?;
        let mut out_chain = Vec::new();
        let mut current = self.nodes[heads_merge].output[0].as_str();
        let reverse = loop {
            if !self.single_use(current) {
                return None;
            }
            let next = self.consumers.get(current)?[0];
            if self.nodes[next].op_type == "Reshape" {
                break next;
            }
            if self.token_wise(next) != Some(current) || out_chain.len() > 4 {
                return None;
            }
            out_chain.push(next);
            current = self.nodes[next].output[0].as_str();
        };
        if out_chain.is_empty() {
            return None;
        }
        let projected = current;
        let back = self.single_consumer(&self.nodes[reverse].output[0], "Transpose")?;
        let padded = self.single_consumer(&self.nodes[back].output[0], "Reshape")?;
        let crop_h = self.single_consumer(&self.nodes[padded].output[0], "Slice")?;
        let crop_w = self.single_consumer(&self.nodes[crop_h].output[0], "Slice")?;
        let flat = self.single_consumer(&self.nodes[crop_w].output[0], "Reshape")?;
        if !self.transpose_is(back, &[0, 1, 3, 2, 4, 5]) {
            return None;
        }
        // The crop keeps rows 0..h of axis 1 and columns 0..w of axis 2.
        let crop = |ix: usize, axis: i64| -> Option<i64> {
            let inputs = &self.nodes[ix].input;
            let steps_one = inputs
                .get(4)
                .is_none_or(|s| s.is_empty() || self.ints(s).as_deref() == Some(&[1]));
            (inputs.len() >= 4
                && steps_one
                && self.ints(&inputs[1])? == [0]
                && self.ints(&inputs[3])? == [axis])
            .then(|| self.ints(&inputs[2]))??
            .first()
            .copied()
        };
        let (h, w) = (crop(crop_h, 1)?, crop(crop_w, 2)?);
        if h <= 0 || w <= 0 {
            return None;
        }
        let channels = self.channels_in(chain[0])?;

        // The rewrite.
        let name = &attention.name;
        let zeros_name = format!("{name}.window_zero_token");
        let zeros = pb::TensorProto {
            name: zeros_name.clone(),
            dims: vec![1, 1, channels],
            data_type: pb::tensor_proto::DataType::Float as i32,
            float_data: vec![0.0; channels as usize],
            ..Default::default()
        };
        let mut nodes = Vec::new();
        let mut changed = Vec::new();
        // The padding token's qkv row: the same token-wise nodes on a zero token.
        let mut pad_input = zeros_name.clone();
        for &c in &chain {
            let mut copy = self.nodes[c].clone();
            let data = self.token_wise(c)?.to_string();
            for input in copy.input.iter_mut() {
                if *input == data {
                    *input = pad_input.clone();
                }
            }
            copy.name = format!("{}.window_padding", copy.name);
            copy.output = vec![format!("{}.window_padding", copy.output[0])];
            pad_input = copy.output[0].clone();
            nodes.push(copy);
        }
        // The token-wise nodes on the grid's tokens.
        let first = chain[0];
        let mut on_grid = self.nodes[first].clone();
        let data = self.token_wise(first)?.to_string();
        for input in on_grid.input.iter_mut() {
            if *input == data {
                *input = tokens.to_string();
            }
        }
        changed.push((first, on_grid));
        let ints = |name: &str, ints: Vec<i64>| AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints,
            ..Default::default()
        };
        let mut windowed = attention.clone();
        windowed.name = format!("{name}.windowed");
        let mut inputs = vec![
            qkv.to_string(),
            pad_input,
            self.nodes[grid].input[1].clone(),
            self.nodes[windows].input[1].clone(),
            pad_node.input[1].clone(),
            self.nodes[reverse].input[1].clone(),
        ];
        inputs.extend(attention.input[3..].iter().cloned());
        windowed.input = inputs;
        windowed
            .attribute
            .push(ints("window", vec![h, w, parts[0], parts[1], parts[2]]));
        nodes.push(windowed);
        // The output projection reads the attention's grid rows and feeds what the crop fed.
        let mut first_out = self.nodes[out_chain[0]].clone();
        let merged = self.nodes[heads_merge].output[0].clone();
        for input in first_out.input.iter_mut() {
            if *input == merged {
                *input = attention.output[0].clone();
            }
        }
        let last_out = *out_chain.last().unwrap();
        let flat_output = self.nodes[flat].output[0].clone();
        if out_chain.len() == 1 {
            first_out.output = vec![flat_output];
            changed.push((out_chain[0], first_out));
        } else {
            changed.push((out_chain[0], first_out));
            let mut last = self.nodes[last_out].clone();
            last.output = vec![flat_output];
            changed.push((last_out, last));
        }
        debug_assert_eq!(self.nodes[last_out].output[0], projected);
        Some(Edit {
            attention_ix: ix,
            attention: nodes,
            changed,
            removed: vec![
                split_ix,
                heads_reshape,
                heads_merge,
                reverse,
                back,
                padded,
                crop_h,
                crop_w,
                flat,
            ],
            zeros,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the default model: the ten attention blocks are windowed and the partitions' pads are
    /// left to the shape computations that tract drops (the values are held by the parity tests
    /// and by the operator's own test).
    #[test]
    fn tinyvit_window_partitions_are_absorbed() {
        let mut proto = crate::engine::fast_ops::tests::default_encoder_proto();
        let graph = proto.graph.as_mut().unwrap();
        crate::engine::layer_norm::recompose(graph, crate::engine::layer_norm::ChannelNorms::All);
        assert_eq!(super::super::attention::fuse(graph), 10);
        let splits = graph.node.iter().filter(|n| n.op_type == "Split").count();
        assert_eq!(fuse(graph), 10);
        let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
        assert_eq!(count("Split"), splits - 10);
        let windowed = graph
            .node
            .iter()
            .filter(|n| n.attribute.iter().any(|a| a.name == "window"))
            .count();
        assert_eq!(windowed, 10);
        // Nothing consumes the partitions any more but the shape computations tract drops.
        for node in graph.node.iter().filter(|n| n.op_type == "Pad") {
            let users: Vec<&str> = graph
                .node
                .iter()
                .filter(|n| n.input.contains(&node.output[0]))
                .map(|n| n.op_type.as_str())
                .collect();
            assert!(
                users.iter().all(|u| *u == "Reshape"),
                "{}: {users:?}",
                node.name
            );
        }
        // A second pass finds nothing left to rewrite.
        assert_eq!(fuse(graph), 0);
    }
}
