//! Layer normalizations that an exporter spelled out, put back together.
//!
//! PyTorch exports `nn.LayerNorm` at ONNX opsets before 17 (TinyViT's attention and MLP norms in
//! the default encoder, opset 12) as nine operators: `ReduceMean`, `Sub`, `Pow(·, 2)`,
//! `ReduceMean`, `Add(ε)`, `Sqrt`, `Div`, `Mul(weight)`, `Add(bias)`. tract runs the last two as
//! broadcasting binary operators that are not vectorized on these shapes (1–2 ms each on a
//! 4096x160 tensor on this project's machine, where the whole norm takes well under 1 ms in one
//! pass). [`recompose`] replaces each such chain over the last axis by one ONNX
//! `LayerNormalization` node, which [`super::fast_ops`] runs in one pass per row, and each over
//! NCHW's channel axis (SAM's `LayerNorm2d`, in the encoders' necks and the decoder's output
//! upscaling; tract takes ~20 ms for one on the neck's 256x64x64 here) by a `SamrtChannelNorm`
//! node. The result is the same computation: mean, biased variance,
//! `(x - mean) / sqrt(variance + ε) · weight + bias`.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{self, attribute_proto::AttributeType, AttributeProto, NodeProto};

/// The ONNX operator type of a layer norm over NCHW's channel axis (samrt's domain), run by
/// [`super::fast_ops::ChannelLayerNorm`].
pub const CHANNEL_NORM_OP: &str = "SamrtChannelNorm";

/// Which layer norms over NCHW's channel axis [`recompose`] rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelNorms {
    None,
    All,
    /// Those of a `ConvTranspose`'s output (the decoder's upscaling, which
    /// [`super::upscale`] then takes whole).
    AfterConvTranspose,
}

/// Replaces every spelled-out layer normalization of `graph` over the last axis by one
/// `LayerNormalization` node, and every one over NCHW's channel axis (SAM's `LayerNorm2d`, weight
/// and bias `[C, 1, 1]`) by one `SamrtChannelNorm` node; returns how many. Every intermediate
/// value must be used by the chain alone (the centred input by its `Pow` and `Div`); the weight
/// and bias must be initializers and ε and the exponent 2 constants.
pub fn recompose(graph: &mut pb::GraphProto, channel_axis: ChannelNorms) -> usize {
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
    // The only consumer of `name`, if it has exactly one and it has type `op`.
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
        scalar_value(tensor)
    };
    // A float initializer of the dimensions `dims` wants: `[C]` for the last axis, `[C, 1, 1]`
    // for the channel axis of NCHW.
    let per_channel = |name: &str, axis: i64| {
        initializers.get(name).is_some_and(|t| {
            let shape_ok = match axis {
                -1 => t.dims.len() == 1,
                _ => t.dims.len() == 3 && t.dims[1..] == [1, 1],
            };
            shape_ok && t.data_type == pb::tensor_proto::DataType::Float as i32
        })
    };
    // ReduceMean over one axis, keeping it, axes as an attribute (opset < 18): the last axis
    // or NCHW's channel axis (LayerNorm2d).
    let mean_axis = |node: &NodeProto| -> Option<i64> {
        let axes = node.attribute.iter().find(|a| a.name == "axes")?;
        let keeps = node.attribute.iter().all(|a| match a.name.as_str() {
            "axes" => true,
            "keepdims" => a.i == 1,
            _ => false,
        });
        match axes.ints.as_slice() {
            [axis @ (-1 | 1)] if node.op_type == "ReduceMean" && node.input.len() == 1 && keeps => {
                Some(*axis)
            }
            _ => None,
        }
    };
    // The other input of a two-input node, given one.
    let other = |node: &NodeProto, one: &str| -> Option<String> {
        match node.input.as_slice() {
            [a, b] if a == one => Some(b.clone()),
            [a, b] if b == one => Some(a.clone()),
            _ => None,
        }
    };

    let mut removed: HashSet<usize> = HashSet::new();
    let mut fused: HashMap<usize, NodeProto> = HashMap::new();
    'chains: for (mean_ix, mean) in nodes.iter().enumerate() {
        let Some(axis) = mean_axis(mean) else {
            continue;
        };
        let x = &mean.input[0];
        let after_conv_transpose = || {
            producer
                .get(x.as_str())
                .is_some_and(|&p| nodes[p].op_type == "ConvTranspose")
        };
        let wanted = match channel_axis {
            _ if axis == -1 => true,
            ChannelNorms::None => false,
            ChannelNorms::All => true,
            ChannelNorms::AfterConvTranspose => after_conv_transpose(),
        };
        if !wanted {
            continue;
        }
        let Some(sub_ix) = single(&mean.output[0], "Sub") else {
            continue;
        };
        let sub = &nodes[sub_ix];
        if sub.input.len() != 2 || sub.input[0] != *x || sub.input[1] != mean.output[0] {
            continue;
        }
        let centred = &sub.output[0];
        // The centred input goes to exactly a Pow and a Div.
        let centred_uses = uses(centred);
        if centred_uses.len() != 2 {
            continue;
        }
        let (mut pow_ix, mut div_ix) = (None, None);
        for &u in centred_uses {
            match nodes[u].op_type.as_str() {
                "Pow" => pow_ix = Some(u),
                "Div" => div_ix = Some(u),
                _ => continue 'chains,
            }
        }
        let (Some(pow_ix), Some(div_ix)) = (pow_ix, div_ix) else {
            continue;
        };
        let pow = &nodes[pow_ix];
        let div = &nodes[div_ix];
        if pow.input.len() != 2 || pow.input[0] != *centred || scalar(&pow.input[1]) != Some(2.0) {
            continue;
        }
        if div.input.len() != 2 || div.input[0] != *centred {
            continue;
        }
        let Some(variance_ix) = single(&pow.output[0], "ReduceMean") else {
            continue;
        };
        if mean_axis(&nodes[variance_ix]) != Some(axis) {
            continue;
        }
        let Some(eps_ix) = single(&nodes[variance_ix].output[0], "Add") else {
            continue;
        };
        let eps_node = &nodes[eps_ix];
        let Some(epsilon) = other(eps_node, &nodes[variance_ix].output[0])
            .as_deref()
            .and_then(scalar)
        else {
            continue;
        };
        let Some(sqrt_ix) = single(&eps_node.output[0], "Sqrt") else {
            continue;
        };
        let sqrt = &nodes[sqrt_ix];
        if div.input[1] != sqrt.output[0] || uses(&sqrt.output[0]) != [div_ix] {
            continue;
        }
        let Some(mul_ix) = single(&div.output[0], "Mul") else {
            continue;
        };
        let mul = &nodes[mul_ix];
        let Some(weight) = other(mul, &div.output[0]).filter(|w| per_channel(w, axis)) else {
            continue;
        };
        let Some(add_ix) = single(&mul.output[0], "Add") else {
            continue;
        };
        let add = &nodes[add_ix];
        let Some(bias) = other(add, &mul.output[0]).filter(|b| per_channel(b, axis)) else {
            continue;
        };
        let chain = [
            mean_ix,
            sub_ix,
            pow_ix,
            variance_ix,
            eps_ix,
            sqrt_ix,
            div_ix,
            mul_ix,
            add_ix,
        ];
        if chain.iter().any(|ix| removed.contains(ix)) {
            continue;
        }
        let epsilon = AttributeProto {
            name: "epsilon".into(),
            r#type: AttributeType::Float as i32,
            f: epsilon,
            ..Default::default()
        };
        let node = if axis == -1 {
            NodeProto {
                name: format!("{}.samrt_layer_norm", mean.name),
                op_type: "LayerNormalization".into(),
                input: vec![x.clone(), weight, bias],
                output: vec![add.output[0].clone()],
                attribute: vec![
                    AttributeProto {
                        name: "axis".into(),
                        r#type: AttributeType::Int as i32,
                        i: -1,
                        ..Default::default()
                    },
                    epsilon,
                ],
                ..Default::default()
            }
        } else {
            NodeProto {
                name: format!("{}.samrt_channel_norm", mean.name),
                op_type: CHANNEL_NORM_OP.into(),
                domain: "ai.samrt".into(),
                input: vec![x.clone(), weight, bias],
                output: vec![add.output[0].clone()],
                attribute: vec![epsilon],
                ..Default::default()
            }
        };
        removed.extend(chain);
        // The new node takes the place of the last one, where all its inputs exist.
        fused.insert(add_ix, node);
    }
    let count = fused.len();
    splice(graph, fused, &removed);
    count
}

/// Rebuilds `graph.node` after a rewrite: node `i` becomes `replaced[i]` where given, is dropped
/// where in `removed`, and stays otherwise (the rewrites' shared last step).
pub(super) fn splice(
    graph: &mut pb::GraphProto,
    replaced: HashMap<usize, NodeProto>,
    removed: &HashSet<usize>,
) {
    let replaced = replaced.into_iter().map(|(i, n)| (i, vec![n])).collect();
    splice_many(graph, replaced, removed)
}

/// [`splice`] where a node may be replaced by several, in order.
pub(super) fn splice_many(
    graph: &mut pb::GraphProto,
    mut replaced: HashMap<usize, Vec<NodeProto>>,
    removed: &HashSet<usize>,
) {
    if replaced.is_empty() && removed.is_empty() {
        return;
    }
    let old = std::mem::take(&mut graph.node);
    for (i, node) in old.into_iter().enumerate() {
        if let Some(new) = replaced.remove(&i) {
            graph.node.extend(new);
        } else if !removed.contains(&i) {
            graph.node.push(node);
        }
    }
}

/// The value of a one-element f32 tensor (raw or typed data).
pub(super) fn scalar_value(t: &pb::TensorProto) -> Option<f32> {
    if t.data_type != pb::tensor_proto::DataType::Float as i32
        || t.dims.iter().product::<i64>() != 1
    {
        return None;
    }
    if let [v] = t.float_data.as_slice() {
        return Some(*v);
    }
    let raw: [u8; 4] = t.raw_data.as_slice().try_into().ok()?;
    Some(f32::from_le_bytes(raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{tensor_proto::DataType, TensorProto, ValueInfoProto};
    use tract_onnx::prelude::*;

    fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Float as i32,
            float_data: values.to_vec(),
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str, axes: Option<i64>) -> NodeProto {
        NodeProto {
            name: format!("/norm/{output}"),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute: axes
                .map(|axis| AttributeProto {
                    name: "axes".into(),
                    r#type: AttributeType::Ints as i32,
                    ints: vec![axis],
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    fn value_info(name: &str) -> ValueInfoProto {
        crate::engine::fast_ops::tests::value_info(name, DataType::Float)
    }

    /// `y = LayerNorm(x) over the last axis of 8, spelled out as PyTorch exports it at opset 12`;
    /// with `extra_use`, the centred input is also a graph output.
    fn spelled_out(axis: i64, extra_use: bool) -> pb::ModelProto {
        spelled_out_with(axis, extra_use, &[8])
    }

    /// [`spelled_out`] with weight and bias of `dims` (their first is the normalized width).
    fn spelled_out_with(axis: i64, extra_use: bool, dims: &[i64]) -> pb::ModelProto {
        let width = dims[0];
        let weight: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 * 0.25).collect();
        let bias: Vec<f32> = (0..width).map(|i| i as f32 * 0.1 - 0.3).collect();
        let mut output = vec![value_info("y")];
        if extra_use {
            output.push(value_info("centred"));
        }
        let graph = pb::GraphProto {
            node: vec![
                node("ReduceMean", &["x"], "mean", Some(axis)),
                node("Sub", &["x", "mean"], "centred", None),
                node("Pow", &["centred", "two"], "squared", None),
                node("ReduceMean", &["squared"], "variance", Some(axis)),
                node("Add", &["variance", "eps"], "shifted", None),
                node("Sqrt", &["shifted"], "std", None),
                node("Div", &["centred", "std"], "normed", None),
                node("Mul", &["normed", "weight"], "scaled", None),
                node("Add", &["scaled", "bias"], "y", None),
            ],
            initializer: vec![
                float_tensor("two", &[], &[2.0]),
                float_tensor("eps", &[], &[1e-5]),
                float_tensor("weight", dims, &weight),
                float_tensor("bias", dims, &bias),
            ],
            input: vec![value_info("x")],
            output,
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: 7,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 12,
            }],
            graph: Some(graph),
            ..Default::default()
        }
    }

    fn run(proto: &pb::ModelProto, x: &Tensor) -> Vec<f32> {
        let model = crate::engine::fast_ops::onnx()
            .model_for_proto_model(proto)
            .unwrap()
            .with_input_fact(0, f32::fact(x.shape()).into())
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let out = model.run(tvec!(x.clone().into_tvalue())).unwrap();
        out[0]
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_spelled_out_last_axis_norm_becomes_one_layer_normalization() {
        let x: Vec<f32> = (0..2 * 3 * 8)
            .map(|i| ((i * 37) % 23) as f32 / 4.0 - 2.0)
            .collect();
        let x = Tensor::from_shape(&[2, 3, 8], &x).unwrap();
        let original = spelled_out(-1, false);
        let want = run(&original, &x);
        let mut proto = original.clone();
        assert_eq!(
            recompose(proto.graph.as_mut().unwrap(), ChannelNorms::All),
            1
        );
        let graph = proto.graph.as_ref().unwrap();
        assert_eq!(graph.node.len(), 1);
        assert_eq!(graph.node[0].op_type, "LayerNormalization");
        let got = run(&proto, &x);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn other_axes_and_shared_values_are_left_alone() {
        let mut proto = spelled_out(1, false);
        assert_eq!(
            recompose(proto.graph.as_mut().unwrap(), ChannelNorms::All),
            0
        );
        let mut proto = spelled_out_with(2, false, &[8, 1, 1]);
        assert_eq!(
            recompose(proto.graph.as_mut().unwrap(), ChannelNorms::All),
            0
        );
        let mut proto = spelled_out(-1, true);
        assert_eq!(
            recompose(proto.graph.as_mut().unwrap(), ChannelNorms::All),
            0
        );
        assert_eq!(proto.graph.unwrap().node.len(), 9);
    }

    #[test]
    fn a_spelled_out_channel_norm_becomes_samrts_channel_norm() {
        // NCHW with 8 channels, weight and bias [8, 1, 1]: SAM's LayerNorm2d.
        let x: Vec<f32> = (0..2 * 8 * 3 * 5)
            .map(|i| ((i * 37) % 29) as f32 / 4.0 - 3.0)
            .collect();
        let x = Tensor::from_shape(&[2, 8, 3, 5], &x).unwrap();
        let original = spelled_out_with(1, false, &[8, 1, 1]);
        let want = run(&original, &x);
        let mut proto = original.clone();
        assert_eq!(
            recompose(proto.graph.as_mut().unwrap(), ChannelNorms::All),
            1
        );
        let graph = proto.graph.as_ref().unwrap();
        assert_eq!(graph.node.len(), 1);
        assert_eq!(graph.node[0].op_type, CHANNEL_NORM_OP);
        let got = run(&proto, &x);
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let pooled = tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
            tract_onnx::tract_core::tract_linalg::multithread::Executor::multithread(2),
            || run(&proto, &x),
        );
        assert_eq!(got, pooled, "2 threads differ from 1");
    }
}
