//! Lookups over an ONNX graph for samrt's rewrites: who produces and who consumes each value,
//! the initializers, and the constants of a node's attributes and inputs.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{self, NodeProto};

/// The graph's nodes indexed by the values they produce and consume.
pub(super) struct GraphIndex<'a> {
    pub(super) nodes: &'a [NodeProto],
    pub(super) producer: HashMap<&'a str, usize>,
    pub(super) consumers: HashMap<&'a str, Vec<usize>>,
    pub(super) outputs: HashSet<&'a str>,
    pub(super) initializers: HashMap<&'a str, &'a pb::TensorProto>,
}

impl<'a> GraphIndex<'a> {
    pub(super) fn new(graph: &'a pb::GraphProto) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, node) in graph.node.iter().enumerate() {
            for output in &node.output {
                producer.insert(output.as_str(), i);
            }
            for input in &node.input {
                consumers.entry(input.as_str()).or_default().push(i);
            }
        }
        GraphIndex {
            nodes: &graph.node,
            producer,
            consumers,
            outputs: graph.output.iter().map(|o| o.name.as_str()).collect(),
            initializers: graph
                .initializer
                .iter()
                .map(|t| (t.name.as_str(), t))
                .collect(),
        }
    }

    /// The node producing `name`, if it is of type `op`.
    pub(super) fn producer_of(&self, name: &str, op: &str) -> Option<usize> {
        self.producer
            .get(name)
            .copied()
            .filter(|&i| self.nodes[i].op_type == op)
    }

    /// The only consumer of `name`, if it is of type `op` and `name` is not a graph output.
    pub(super) fn single_consumer(&self, name: &str, op: &str) -> Option<usize> {
        if self.outputs.contains(name) {
            return None;
        }
        match self.consumers.get(name).map(|c| c.as_slice()) {
            Some([only]) if self.nodes[*only].op_type == op => Some(*only),
            _ => None,
        }
    }

    pub(super) fn single_use(&self, name: &str) -> bool {
        !self.outputs.contains(name) && self.consumers.get(name).is_some_and(|c| c.len() == 1)
    }

    /// The values of an int64 constant (a `Constant` node or an initializer).
    pub(super) fn ints(&self, name: &str) -> Option<Vec<i64>> {
        let tensor = match self.producer_of(name, "Constant") {
            Some(ix) => self.nodes[ix]
                .attribute
                .iter()
                .find(|a| a.name == "value")
                .and_then(|a| a.t.as_ref())?,
            None => self.initializers.get(name)?,
        };
        if tensor.data_type != pb::tensor_proto::DataType::Int64 as i32 {
            return None;
        }
        if !tensor.int64_data.is_empty() {
            return Some(tensor.int64_data.clone());
        }
        let raw = &tensor.raw_data;
        (raw.len() % 8 == 0).then(|| {
            raw.chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
    }

    pub(super) fn ints_attr(&self, ix: usize, name: &str) -> Option<Vec<i64>> {
        self.nodes[ix]
            .attribute
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.ints.clone())
    }

    pub(super) fn transpose_is(&self, ix: usize, perm: &[i64]) -> bool {
        self.ints_attr(ix, "perm").as_deref() == Some(perm)
    }
}

/// Removes the nodes whose every output is neither consumed nor a graph output, until none is
/// left (a rewrite that replaced a value's consumers leaves its shape computations behind).
pub(super) fn remove_dead_nodes(graph: &mut pb::GraphProto) {
    loop {
        let used: HashSet<&str> = graph
            .node
            .iter()
            .flat_map(|n| n.input.iter().map(|i| i.as_str()))
            .chain(graph.output.iter().map(|o| o.name.as_str()))
            .collect();
        let dead: Vec<usize> = graph
            .node
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.output
                    .iter()
                    .all(|o| o.is_empty() || !used.contains(o.as_str()))
            })
            .map(|(i, _)| i)
            .collect();
        if dead.is_empty() {
            return;
        }
        let dead: HashSet<usize> = dead.into_iter().collect();
        let old = std::mem::take(&mut graph.node);
        graph.node = old
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !dead.contains(i))
            .map(|(_, n)| n)
            .collect();
    }
}
