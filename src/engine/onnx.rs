//! Loading an ONNX file into tract, for every model samrt runs: the parse with samrt's operators
//! ([`fast_ops`]) and graph rewrites ([`Fusions`]; the rewrites' lookups are in
//! [`super::onnx_graph`]), the guards every load goes through (a panic inside the engine, a graph
//! tract is known to compute wrong) and the error a bad file becomes.

use std::path::Path;

use tract_onnx::prelude::*;

use super::{
    attention, conv1x1, conv3x3, depthwise, fast_ops, layer_norm, linear, linear_int8, mbconv,
    to_f32_vec, upscale, window_attention,
};
use crate::error::{panic_message, Error, Result};

pub(super) fn model_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Runs a model load; a panic inside it (tract or samrt's graph rewriting meeting a file they do
/// not expect) becomes the file's error instead of taking the process down.
pub(super) fn load_guarded<T>(path: &Path, load: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)) {
        Ok(result) => result,
        Err(payload) => Err(model_error(
            path,
            format!(
                "loading it failed inside the engine ({}): the file is damaged or not a \
                 supported export; re-copy or re-export it",
                panic_message(payload.as_ref()).unwrap_or("no message")
            ),
        )),
    }
}

pub(super) fn parse_onnx(path: &Path, bytes: &[u8]) -> Result<InferenceModel> {
    Ok(parse_onnx_with(path, bytes, Fusions::NONE)?.0)
}

pub(super) fn parse_onnx_fused(
    path: &Path,
    bytes: &[u8],
    fuse_attention: bool,
) -> Result<(InferenceModel, usize)> {
    let fusions = if fuse_attention {
        Fusions::ENCODER
    } else {
        Fusions::NONE
    };
    parse_onnx_with(path, bytes, fusions)
}

/// Which of samrt's graph rewrites [`parse_onnx_with`] applies beyond the last-axis layer
/// norms, GELUs and depthwise convolutions that every graph gets.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fusions {
    /// Attention subgraphs (and windowed ones on the token grid).
    pub(super) attention: bool,
    /// Linear layers and 1x1 convolutions on samrt's kernels, where they run.
    pub(super) linear: bool,
    /// Which layer norms over NCHW's channel axis become one operator.
    pub(super) channel_norms: layer_norm::ChannelNorms,
    /// int8 linear layers (the image encoders).
    pub(super) int8: bool,
    /// The decoder's output upscaling (ConvTranspose → LayerNorm2d → GELU → ConvTranspose →
    /// GELU) as one operator, where samrt's linear kernel runs (`SAMRT_UPSCALE=0`: off).
    pub(super) upscale: bool,
}

impl Fusions {
    const NONE: Fusions = Fusions {
        attention: false,
        linear: false,
        channel_norms: layer_norm::ChannelNorms::None,
        int8: false,
        upscale: false,
    };
    const ENCODER: Fusions = Fusions {
        attention: true,
        linear: true,
        channel_norms: layer_norm::ChannelNorms::All,
        int8: true,
        upscale: false,
    };
    /// (The decoder's other channel norms, in the mask input's downscaling, stay tract's: with
    /// samrt's, the service's resident memory grew frame after frame in tests/service.rs's soak
    /// test, not yet understood.)
    pub(super) const DECODER: Fusions = Fusions {
        attention: true,
        linear: true,
        channel_norms: layer_norm::ChannelNorms::AfterConvTranspose,
        int8: false,
        upscale: true,
    };
}

/// Parses an ONNX file. Spelled-out last-axis layer normalizations become one operator first
/// ([`layer_norm::recompose`]; `SAMRT_LAYER_NORM=0` keeps them, for measuring), GELUs and
/// depthwise 3x3 convolutions samrt's ([`depthwise::fuse`]; `SAMRT_DEPTHWISE_GELU=0`), those
/// between transposes of tokens channels-last ([`depthwise::fuse_channels_last`];
/// `SAMRT_CHANNELS_LAST=0`). With
/// `fuse_attention` (the image encoders) also: static int8 linear layers as tract's integer
/// products ([`linear_int8::fuse_qdq`]); channel-axis layer norms; attention subgraphs
/// ([`attention::fuse`]), windowed ones on the token grid without their partition
/// ([`window_attention::fuse`]; `SAMRT_WINDOW_ATTENTION=0`); linear layers and 1x1 convolutions where samrt's AVX-512 kernels run
/// ([`linear::fuse`], [`conv1x1::fuse`], [`conv3x3::fuse`]; `SAMRT_LINEAR=0`, `SAMRT_CONV1X1=0`,
/// `SAMRT_CONV3X3=0`), int8 linear
/// layers where its VNNI kernel runs ([`linear_int8::fuse`], [`linear_int8::fuse_qdq`];
/// `SAMRT_LINEAR_INT8=0`). (The decoder's
/// channel norms stay tract's: with samrt's, the service's resident memory grew frame after
/// frame in tests/service.rs's soak test, not yet understood.) Returns the model and how many
/// attention blocks were fused.
pub(super) fn parse_onnx_with(
    path: &Path,
    bytes: &[u8],
    fusions: Fusions,
) -> Result<(InferenceModel, usize)> {
    if bytes.is_empty() {
        return Err(model_error(
            path,
            "the file is empty (re-copy the model file)",
        ));
    }
    let unreadable = |e: TractError| {
        model_error(
            path,
            format!(
                "not a readable ONNX model, or truncated ({e:#}); re-copy or re-export the file"
            ),
        )
    };
    let onnx = fast_ops::onnx();
    let mut proto = onnx
        .proto_model_for_read(&mut &*bytes)
        .map_err(unreadable)?;
    let mut fused = 0;
    let upscale = fusions.upscale
        && linear::available()
        && std::env::var("SAMRT_UPSCALE").map_or(true, |v| v != "0");
    if let Some(graph) = proto.graph.as_mut() {
        if std::env::var("SAMRT_LAYER_NORM").map_or(true, |v| v != "0") {
            let channel_norms = match fusions.channel_norms {
                layer_norm::ChannelNorms::AfterConvTranspose if !upscale => {
                    layer_norm::ChannelNorms::None
                }
                other => other,
            };
            layer_norm::recompose(graph, channel_norms);
        }
        if std::env::var("SAMRT_DEPTHWISE_GELU").map_or(true, |v| v != "0") {
            depthwise::fuse(graph);
            if std::env::var("SAMRT_CHANNELS_LAST").map_or(true, |v| v != "0") {
                depthwise::fuse_channels_last(graph);
            }
        }
        if fusions.linear
            && linear::available()
            && std::env::var("SAMRT_LINEAR").map_or(true, |v| v != "0")
        {
            linear::fuse(graph);
            if std::env::var("SAMRT_CONV1X1").map_or(true, |v| v != "0") {
                conv1x1::fuse(graph);
                if std::env::var("SAMRT_MBCONV").map_or(true, |v| v != "0") {
                    mbconv::fuse(graph);
                }
            }
            if std::env::var("SAMRT_CONV3X3").map_or(true, |v| v != "0") {
                conv3x3::fuse(graph);
            }
        }
        if upscale {
            upscale::fuse(graph);
        }
        if fusions.int8 {
            let vnni = linear_int8::available()
                && std::env::var("SAMRT_LINEAR_INT8").map_or(true, |v| v != "0");
            if vnni {
                linear_int8::fuse(graph);
            }
            linear_int8::fuse_qdq(graph, vnni);
        }
        if fusions.attention {
            fused = attention::fuse(graph);
            if std::env::var("SAMRT_WINDOW_ATTENTION").map_or(true, |v| v != "0") {
                window_attention::fuse(graph);
            }
        }
    }
    let model = onnx.model_for_proto_model(&proto).map_err(unreadable)?;
    reject_known_miscompilations(path, &model)?;
    Ok((model, fused))
}

/// Refuses graphs that tract 0.23 is known to compute wrong. A Softmax between a
/// DequantizeLinear and a QuantizeLinear (what onnxruntime's static QDQ quantization puts around
/// attention) is folded by tract into a per-element lookup table, so every output becomes 1.0
/// (tests/data/quant/qdq_softmax_qdq.onnx).
fn reject_known_miscompilations(path: &Path, model: &InferenceModel) -> Result<()> {
    for node in model.nodes() {
        if !node.op.name().contains("Softmax") {
            continue;
        }
        let fed_by_dequantize = node
            .inputs
            .first()
            .is_some_and(|i| model.node(i.node).op.name() == "DequantizeLinear");
        let feeds_quantize = node
            .outputs
            .iter()
            .flat_map(|o| &o.successors)
            .any(|s| model.node(s.node).op.name() == "QuantizeLinear");
        if fed_by_dequantize && feeds_quantize {
            return Err(model_error(
                path,
                format!(
                    "node {:?} is a Softmax between DequantizeLinear and QuantizeLinear (static QDQ quantization), which tract 0.23 \
                     computes wrong (all ones); quantize with onnxruntime's quantize_dynamic instead (models/tools/export_sam.py --quantize int8-dynamic)",
                    node.name
                ),
            ));
        }
    }
    Ok(())
}

/// Runs a single-input, single-output f32 ONNX graph once, after the same checks as the SAM
/// models; for probing a graph, and for the quantization regression tests.
pub fn run_f32_graph(
    path: &Path,
    bytes: &[u8],
    shape: &[usize],
    input: &[f32],
) -> Result<Vec<f32>> {
    let model = parse_onnx(path, bytes)?;
    let err = |e: TractError| Error::Inference(format!("{}: {e:#}", path.display()));
    let plan = model
        .with_input_fact(0, f32::fact(shape).into())
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(err)?;
    let tensor = Tensor::from_shape(shape, input).map_err(err)?;
    let outputs = plan.run(tvec!(tensor.into_tvalue())).map_err(err)?;
    to_f32_vec(&outputs[0]).map_err(err)
}

/// The model with every declared fact dropped except its inputs', so tract infers them again.
pub(super) fn without_intermediate_facts(mut model: InferenceModel) -> TractResult<InferenceModel> {
    let inputs: Vec<OutletId> = model.input_outlets()?.to_vec();
    for id in 0..model.nodes().len() {
        for slot in 0..model.node(id).outputs.len() {
            let outlet = OutletId::new(id, slot);
            if !inputs.contains(&outlet) {
                model.set_outlet_fact(outlet, InferenceFact::default())?;
            }
        }
    }
    Ok(model)
}

pub(super) fn shape_of(fact: &TypedFact) -> Vec<String> {
    fact.shape.iter().map(|d| d.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every attention block of the default TinyViT encoder (2 + 6 + 2) is fused, and the fused
    /// graph loses no node it needs: its ONNX graph after the rewrite parses and types.
    #[test]
    fn every_tinyvit_attention_block_is_fused() {
        let files = crate::model::ModelFiles::default_model().expect("default model");
        let bytes = std::fs::read(&files.encoder).expect("encoder bytes");
        let (model, fused) = parse_onnx_fused(&files.encoder, &bytes, true).unwrap();
        assert_eq!(fused, 10);
        let softmaxes = model
            .nodes()
            .iter()
            .filter(|n| n.op.name().contains("Softmax"))
            .count();
        assert_eq!(softmaxes, 0, "a Softmax was left unfused");
        let (_, unfused) = parse_onnx_fused(&files.encoder, &bytes, false).unwrap();
        assert_eq!(unfused, 0);
    }

    #[test]
    fn every_tinyvit_spelled_out_layer_norm_is_recomposed() {
        let files = crate::model::ModelFiles::default_model().expect("default model");
        let bytes = std::fs::read(&files.encoder).expect("encoder bytes");
        let onnx = fast_ops::onnx();
        let mut proto = onnx.proto_model_for_read(&mut &*bytes).unwrap();
        // 2 norms (attention, MLP) in each of the 10 transformer blocks, and the neck's two
        // channel-axis norms.
        assert_eq!(
            layer_norm::recompose(proto.graph.as_mut().unwrap(), layer_norm::ChannelNorms::All),
            22
        );
        let graph = proto.graph.as_ref().unwrap();
        let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
        assert_eq!(count("Pow"), 0);
        assert_eq!(count("LayerNormalization"), 20);
        assert_eq!(count(layer_norm::CHANNEL_NORM_OP), 2);
    }
}
