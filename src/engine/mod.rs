//! The inference engine: the only module that talks to tract.
//!
//! Plans are built at load time and reused for every frame and every prompt:
//! - [`ImageEncoder`]: the SAM image encoder with its input fact fixed to 1x3x1024x1024 and the graph
//!   optimized for it;
//! - [`MaskDecoder`]: the prompt encoder + mask decoder exported by Meta's `SamOnnxModel`, cut so
//!   that it returns the low-resolution logits and predicted IoU of *every* mask token. The in-graph
//!   upsampling (whose output shape depends on the `orig_im_size` value, which tract cannot type)
//!   and the single-mask selection are dropped; both are done in Rust by the caller. Plans are
//!   specialized per prompt shape (number of points, mask input or not) and kept.

mod attention;
mod axis_move;
mod conv1x1;
mod conv3x3;
mod depthwise;
mod fast_ops;
mod half;
mod layer_norm;
mod linear;
mod linear_int8;
mod mbconv;
mod onnx_graph;
mod quantize;
mod threads;
mod token_attention;
mod upscale;
mod vector_math;
mod window_attention;

pub use attention::peak_scratch_values as attention_peak_scratch_values;
pub use half::{f16_arithmetic, ANY_CPU_ENV as F16_ANY_CPU_ENV};

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::knobs::KnobScope;

use crate::error::{panic_message, Error, Result};

/// Side of the square image the encoder takes.
pub const ENCODER_INPUT_SIZE: usize = 1024;
/// Channels of the image embedding.
pub const EMBEDDING_CHANNELS: usize = 256;
/// Side of the square image embedding.
pub const EMBEDDING_SIZE: usize = 64;
/// Side of the square low-resolution masks the decoder returns.
pub const LOW_RES_MASK_SIZE: usize = 256;

/// Number of f32 values in one image embedding (1x256x64x64).
pub const EMBEDDING_LEN: usize = EMBEDDING_CHANNELS * EMBEDDING_SIZE * EMBEDDING_SIZE;
/// Number of f32 values in one low-resolution mask (256x256).
pub const LOW_RES_MASK_LEN: usize = LOW_RES_MASK_SIZE * LOW_RES_MASK_SIZE;

/// Decoder inputs samrt feeds, in the order the plan takes them.
const DECODER_INPUTS: [&str; 5] = [
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
];
/// Decoder outputs samrt starts from (Meta's `SamOnnxModel` names).
const DECODER_OUTPUTS: [&str; 2] = ["low_res_masks", "iou_predictions"];

type Plan = Arc<TypedRunnableModel>;

/// tract settings for optimizing the image encoder, each measured on SAM encoders (README,
/// Performance). tract 0.23 runs TinyViT's patch-embedding convolutions (3x3, stride 2, 3 -> 32
/// -> 64 channels at 512² and 256²) as its direct spatial convolution, 10% of the encoder's time;
/// im2col and a matrix product take 40% of that, 4% of the whole encoder.
const ENCODER_KNOBS: [(&str, &str); 1] = [("TRACT_DISABLE_DIRECT_SPATIAL", "true")];

/// Runs `f` with its own pool of `threads` compute threads for tract's and samrt's operators
/// on this thread, instead of the process-wide one ([`set_compute_threads`]): work on another
/// thread (the service's encoder) then never holds this thread's operators in the shared
/// pool's queue. One thread: single-threaded.
pub fn with_own_compute_pool<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    use tract_onnx::tract_core::tract_linalg::multithread::{multithread_tract_scope, Executor};
    let pool = if threads > 1 {
        Executor::multithread(threads)
    } else {
        Executor::SingleThread
    };
    multithread_tract_scope(pool, f)
}

/// Sets how many threads tract's matrix products may use, process-wide (1: single-threaded, the
/// default). Plans built before and after share the setting.
pub fn set_compute_threads(threads: usize) {
    use tract_onnx::tract_core::tract_linalg::multithread::{set_default_executor, Executor};
    set_default_executor(if threads > 1 {
        Executor::multithread(threads)
    } else {
        Executor::SingleThread
    });
}

/// Tells glibc's allocator to keep the memory a plan frees for the next run.
///
/// Every run allocates the same large tensors (activations of up to 67 MB, im2col and packed
/// matrix buffers). By default glibc serves each allocation above its mmap threshold with a
/// fresh `mmap` and unmaps it when freed, and returns freed heap tops to the OS, so every frame
/// page-faults (and the kernel zeroes) the same hundreds of megabytes again: on this project's
/// machines 20% of an encoder run was spent in the kernel that way. With mmap off and trimming
/// off the heap keeps its pages; peak RSS is what a run needs, as before, and stays there.
/// Process-wide, applied once, when the first plan is built; a no-op outside glibc.
pub fn keep_freed_memory() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    });
}

fn model_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Runs a model load; a panic inside it (tract or samrt's graph rewriting meeting a file they do
/// not expect) becomes the file's error instead of taking the process down.
fn load_guarded<T>(path: &Path, load: impl FnOnce() -> Result<T>) -> Result<T> {
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

fn parse_onnx(path: &Path, bytes: &[u8]) -> Result<InferenceModel> {
    Ok(parse_onnx_with(path, bytes, Fusions::NONE)?.0)
}

fn parse_onnx_fused(
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
struct Fusions {
    /// Attention subgraphs (and windowed ones on the token grid).
    attention: bool,
    /// Linear layers and 1x1 convolutions on samrt's kernels, where they run.
    linear: bool,
    /// Which layer norms over NCHW's channel axis become one operator.
    channel_norms: layer_norm::ChannelNorms,
    /// int8 linear layers (the image encoders).
    int8: bool,
    /// The decoder's output upscaling (ConvTranspose → LayerNorm2d → GELU → ConvTranspose →
    /// GELU) as one operator, where samrt's linear kernel runs (`SAMRT_UPSCALE=0`: off).
    upscale: bool,
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
    const DECODER: Fusions = Fusions {
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
fn parse_onnx_with(path: &Path, bytes: &[u8], fusions: Fusions) -> Result<(InferenceModel, usize)> {
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

fn to_f32_vec(value: &TValue) -> TractResult<Vec<f32>> {
    Ok(value.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
}

/// The model with every declared fact dropped except its inputs', so tract infers them again.
fn without_intermediate_facts(mut model: InferenceModel) -> TractResult<InferenceModel> {
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

fn shape_of(fact: &TypedFact) -> Vec<String> {
    fact.shape.iter().map(|d| d.to_string()).collect()
}

/// The SAM image encoder: normalized, padded 1x3x1024x1024 in, 1x256x64x64 embedding out.
#[derive(Debug)]
pub struct ImageEncoder {
    plan: Plan,
    fused_attention: usize,
    /// The plan computes in f16 ([`EncoderOptions::f16`]).
    f16: bool,
}

/// How the image encoder's plan is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderOptions {
    /// Attention blocks as samrt's fused operator (`engine::attention`) instead of tract's
    /// operators. On by default; `SAMRT_FUSED_ATTENTION=0` turns it off (for measuring).
    pub fused_attention: bool,
    /// The plan converted to f16 at load ([`half`]; CPUs with fp16 arithmetic only).
    pub f16: bool,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        EncoderOptions {
            fused_attention: std::env::var("SAMRT_FUSED_ATTENTION").map_or(true, |v| v != "0"),
            f16: false,
        }
    }
}

impl ImageEncoder {
    /// Builds the optimized plan from the bytes of an ONNX file (`path` is for messages).
    pub fn from_onnx_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        Self::from_onnx_bytes_with(path, bytes, EncoderOptions::default())
    }

    /// [`Self::from_onnx_bytes`] with explicit options.
    pub fn from_onnx_bytes_with(
        path: &Path,
        bytes: &[u8],
        options: EncoderOptions,
    ) -> Result<Self> {
        load_guarded(path, || Self::load(path, bytes, options))
    }

    fn load(path: &Path, bytes: &[u8], options: EncoderOptions) -> Result<Self> {
        if options.f16 {
            half::check_cpu().map_err(|reason| model_error(path, reason))?;
        }
        let (model, fused) = parse_onnx_fused(path, bytes, options.fused_attention)?;
        if fused == 0 {
            return Self::from_model(path, model, 0, options.f16);
        }
        match Self::from_model(path, model, fused, options.f16) {
            Ok(encoder) => Ok(encoder),
            Err(e) => {
                // A subgraph that looked like attention but whose shapes do not fit samrt's
                // operator: tract's own operators compute it.
                log::warn!(
                    "{}: attention not fused ({e}); using tract's operators",
                    path.display()
                );
                Self::from_model(path, parse_onnx(path, bytes)?, 0, options.f16)
            }
        }
    }

    /// Number of attention blocks that run as samrt's fused operator.
    pub fn fused_attention_blocks(&self) -> usize {
        self.fused_attention
    }

    fn from_model(
        path: &Path,
        model: InferenceModel,
        fused_attention: usize,
        f16: bool,
    ) -> Result<Self> {
        let inputs = model
            .input_outlets()
            .map_err(|e| model_error(path, e.to_string()))?
            .len();
        if inputs != 1 {
            return Err(model_error(
                path,
                format!(
                    "an image encoder has exactly one input (the 1x3x{ENCODER_INPUT_SIZE}x{ENCODER_INPUT_SIZE} image), this model has {inputs}; \
                     is this the decoder? pass the encoder with --encoder"
                ),
            ));
        }
        let input_fact: InferenceFact =
            f32::fact([1, 3, ENCODER_INPUT_SIZE, ENCODER_INPUT_SIZE]).into();
        let typed = model
            .clone()
            .with_input_fact(0, input_fact.clone())
            .and_then(|m| m.into_typed())
            // Exports that declare a symbolic batch in their intermediate shapes (e.g. after
            // onnxruntime's quantize_dynamic) cannot be unified with batch 1: retype from the
            // input alone.
            .or_else(|_| {
                without_intermediate_facts(model)
                    .and_then(|m| m.with_input_fact(0, input_fact))
                    .and_then(|m| m.into_typed())
            })
            .map_err(|e| {
                model_error(
                    path,
                    format!(
                        "cannot be typed with a 1x3x{ENCODER_INPUT_SIZE}x{ENCODER_INPUT_SIZE} f32 input ({e:#}); \
                         is it a SAM image encoder?"
                    ),
                )
            })?;
        let outputs = typed
            .output_outlets()
            .map_err(|e| model_error(path, e.to_string()))?;
        let expected = [1, EMBEDDING_CHANNELS, EMBEDDING_SIZE, EMBEDDING_SIZE];
        let output_fact = typed
            .outlet_fact(outputs[0])
            .map_err(|e| model_error(path, e.to_string()))?;
        let matches = outputs.len() == 1
            && output_fact.datum_type == f32::datum_type()
            && output_fact.shape.as_concrete() == Some(&expected[..]);
        if !matches {
            return Err(model_error(
                path,
                format!(
                    "an image encoder must have one f32 output of shape {expected:?}, this model has {} output(s), the first {:?} of {:?}",
                    outputs.len(),
                    shape_of(output_fact),
                    output_fact.datum_type
                ),
            ));
        }
        if std::env::var("SAMRT_KEEP_FREED_MEMORY").map_or(true, |v| v != "0") {
            keep_freed_memory();
        }
        let typed = if f16 {
            half::translate(typed)
                .map_err(|e| model_error(path, format!("cannot be converted to f16: {e:#}")))?
        } else {
            typed
        };
        let plan = KnobScope::new(ENCODER_KNOBS)
            .and_then(|knobs| knobs.enter(|| typed.into_optimized()))
            .and_then(|mut m| {
                let moves = axis_move::replace(&mut m)?;
                log::debug!("encoder: {moves} axis moves on samrt's threaded copy");
                Ok(m)
            })
            .and_then(|m| m.into_runnable())
            .map_err(|e| model_error(path, format!("cannot be optimized by tract: {e:#}")))?;
        Ok(ImageEncoder {
            plan,
            fused_attention,
            f16,
        })
    }

    /// The plan's input: the image as an f32 tensor, or f16 for an f16 plan.
    fn input(&self, image_chw: &[f32]) -> Result<TValue> {
        let shape = [1, 3, ENCODER_INPUT_SIZE, ENCODER_INPUT_SIZE];
        let input = Tensor::from_shape(&shape, image_chw)
            .map_err(|e| Error::Inference(format!("encoder input: {e:#}")))?;
        let input = if self.f16 {
            input
                .cast_to::<f16>()
                .map_err(|e| Error::Inference(format!("encoder input to f16: {e:#}")))?
                .into_owned()
        } else {
            input
        };
        Ok(input.into_tvalue())
    }

    /// Runs the encoder on a normalized, padded CHW image of 3x1024x1024 values.
    pub fn embed(&self, image_chw: &[f32]) -> Result<Vec<f32>> {
        self.embed_yielding(image_chw, &|| {})
    }

    /// Runs the encoder like [`Self::embed`], calling `before_op` before each of its operators:
    /// a caller whose other work must not wait for a whole encode (a button press) holds the
    /// encoder there while that work runs.
    pub fn embed_yielding(&self, image_chw: &[f32], before_op: &dyn Fn()) -> Result<Vec<f32>> {
        let err = |e: TractError| Error::Inference(format!("image encoder: {e:#}"));
        let mut state = tract_onnx::tract_core::plan::SimpleState::new(&self.plan).map_err(err)?;
        let awake = threads::KeepAwake::new();
        let outputs = state
            .run_plan_with_eval(
                tvec!(self.input(image_chw)?),
                |ctx, op_state, node, input| {
                    before_op();
                    awake.ensure();
                    tract_onnx::tract_core::plan::eval(ctx, op_state, node, input)
                },
            )
            .map_err(err)?;
        drop(awake);
        let output = &outputs[0];
        let result = if output.datum_type() == f32::datum_type() {
            to_f32_vec(output)
        } else {
            output
                .cast_to::<f32>()
                .and_then(|t| Ok(t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()))
        };
        result.map_err(|e| Error::Inference(format!("image encoder output: {e:#}")))
    }

    /// Runs the encoder once like [`Self::embed`], timing each operator of its plan.
    pub fn profile(&self, image_chw: &[f32]) -> Result<Vec<OpTiming>> {
        profile_plan(&self.plan, tvec!(self.input(image_chw)?))
    }
}

/// Time one operator of a plan took over a profiled run (see [`ImageEncoder::profile`]).
#[derive(Debug, Clone)]
pub struct OpTiming {
    /// The operator's name in tract's plan (e.g. `OptMatMul`, `Add`, samrt's `SamrtAttention`).
    pub op: String,
    /// The node's name (the ONNX node it came from, for the per-node view).
    pub node: String,
    /// What tract says of the operator (shapes, kernel).
    pub info: String,
    pub elapsed: std::time::Duration,
}

/// Runs `plan` once, timing every node (tract's per-operator profile).
fn profile_plan(plan: &Plan, inputs: TVec<TValue>) -> Result<Vec<OpTiming>> {
    let err = |e: TractError| Error::Inference(format!("profiling: {e:#}"));
    let mut state = tract_onnx::tract_core::plan::SimpleState::new(plan).map_err(err)?;
    let mut timings = Vec::new();
    state
        .run_plan_with_eval(inputs, |ctx, op_state, node, input| {
            let start = std::time::Instant::now();
            let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
            timings.push(OpTiming {
                op: node.op().name().to_string(),
                node: node.name.clone(),
                info: node.op().info().unwrap_or_default().join("; "),
                elapsed: start.elapsed(),
            });
            out
        })
        .map_err(err)?;
    Ok(timings)
}

/// Logits and predicted IoU of every mask token the decoder has (4 for SAM: token 0 is the
/// single-mask output, tokens 1..=3 the multimask outputs).
#[derive(Debug, Clone)]
pub struct DecodedTokens {
    /// `tokens` low-resolution logit masks of 256x256, one after the other.
    pub low_res_logits: Vec<f32>,
    /// Predicted IoU of each token.
    pub iou_predictions: Vec<f32>,
}

impl DecodedTokens {
    /// Number of mask tokens.
    pub fn tokens(&self) -> usize {
        self.iou_predictions.len()
    }

    /// The 256x256 logits of token `i`.
    pub fn logits(&self, i: usize) -> &[f32] {
        &self.low_res_logits[i * LOW_RES_MASK_LEN..(i + 1) * LOW_RES_MASK_LEN]
    }
}

/// The decoder image stages' results on one embedding, by [`DecoderPlan::Split`] id.
type ImageStageCache = Arc<std::sync::Mutex<Vec<(u64, TVec<TValue>)>>>;

/// An image embedding (1x256x64x64) held the way the decoder takes it: made once per image and
/// shared by every prompt and thread without copying. Clones share the decoder's per-image
/// results (see [`MaskDecoder`]), computed at the first prompt and dropped with the last clone.
#[derive(Debug, Clone)]
pub struct EmbeddingTensor {
    value: TValue,
    image_stages: ImageStageCache,
}

impl EmbeddingTensor {
    /// Wraps 256x64x64 values.
    pub fn new(data: &[f32]) -> Result<Self> {
        let tensor = Tensor::from_shape(
            &[1, EMBEDDING_CHANNELS, EMBEDDING_SIZE, EMBEDDING_SIZE],
            data,
        )
        .map_err(|e| Error::Inference(format!("image embedding: {e:#}")))?;
        Ok(EmbeddingTensor {
            value: tensor.into_tvalue(),
            image_stages: Default::default(),
        })
    }

    /// The values, channel-major.
    pub fn as_slice(&self) -> &[f32] {
        self.value
            .try_as_plain_ram()
            .and_then(|view| view.as_slice::<f32>())
            .expect("an embedding tensor is plain f32 by construction")
    }

    /// The outputs of image stage `stage` on this embedding, computed by `run` the first time.
    fn image_stage(
        &self,
        stage: u64,
        run: impl FnOnce(TValue) -> Result<TVec<TValue>>,
    ) -> Result<TVec<TValue>> {
        let lock_err = || Error::Inference("image embedding: a cache lock was poisoned".into());
        let mut stages = self.image_stages.lock().map_err(|_| lock_err())?;
        if let Some((_, outputs)) = stages.iter().find(|(id, _)| *id == stage) {
            return Ok(outputs.clone());
        }
        let outputs = run(self.value.clone())?;
        stages.push((stage, outputs.clone()));
        Ok(outputs)
    }

    /// Number of decoder image stages computed on this embedding so far.
    pub fn cached_image_stages(&self) -> usize {
        self.image_stages.lock().map(|s| s.len()).unwrap_or(0)
    }
}

/// One decoder call's inputs, already in the decoder's coordinate frame (see `prompt`).
#[derive(Debug, Clone, Copy)]
pub struct DecoderInput<'a> {
    /// The image embedding.
    pub embedding: &'a EmbeddingTensor,
    /// `n` (x, y) pairs in the 1024-scaled frame, padding point included.
    pub point_coords: &'a [f32],
    /// `n` labels: 1 foreground, 0 background, 2/3 box corners, -1 padding.
    pub point_labels: &'a [f32],
    /// A previous 256x256 low-resolution logit mask, for iterative refinement.
    pub mask_input: Option<&'a [f32]>,
}

/// How many decoder plans specialized to one prompt shape are kept (see [`MaskDecoder`]).
pub const MAX_DECODER_PLANS: usize = 8;

/// The most prompts [`MaskDecoder::decode_batch`] may run in one decoder call.
pub const MAX_DECODER_BATCH: usize = 16;

/// The prompts one decoder call takes by default: 1, or `SAMRT_DECODER_BATCH` (a power of two
/// up to [`MAX_DECODER_BATCH`]). On the CPUs measured, batches are slower per prompt (README,
/// Performance): every image-token tensor of a call is `batch` times 4 MB (4096 tokens x 256
/// channels) and leaves the cache that one prompt's fits in.
fn default_decoder_batch() -> usize {
    match std::env::var("SAMRT_DECODER_BATCH") {
        Err(_) => 1,
        Ok(v) => match v.parse::<usize>() {
            Ok(b) if valid_decoder_batch(b) => b,
            _ => {
                log::warn!(
                    "SAMRT_DECODER_BATCH={v} ignored: a power of two from 1 to {MAX_DECODER_BATCH}"
                );
                1
            }
        },
    }
}

/// A decoder batch samrt builds plans for: a power of two up to [`MAX_DECODER_BATCH`] (so that
/// [`batch_sizes`] needs few plans).
fn valid_decoder_batch(batch: usize) -> bool {
    batch.is_power_of_two() && batch <= MAX_DECODER_BATCH
}

/// Batch sizes `n` prompts are decoded in: `max` (a power of two) while that many are left, then
/// the powers of two of the rest (13 by 16 → 8, 4, 1), so that at most five plans serve any
/// count.
fn batch_sizes(n: usize, max: usize) -> Vec<usize> {
    let mut sizes = vec![max; n / max];
    let rest = n % max;
    let mut bit = max;
    while bit > 0 {
        if rest & bit != 0 {
            sizes.push(bit);
        }
        bit >>= 1;
    }
    sizes
}

/// What a specialized decoder plan is built for: the number of points the decoder takes
/// (padding point and box corners included), whether a previous mask is given, and how many
/// prompts of that shape one call decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptShape {
    pub points: usize,
    pub mask_input: bool,
    pub batch: usize,
}

impl PromptShape {
    /// A single point plus the padding point, or a box alone: what clicks, button presses,
    /// detector boxes and segment-everything send.
    pub const ONE_POINT: PromptShape = PromptShape {
        points: 2,
        mask_input: false,
        batch: 1,
    };

    fn of(input: &DecoderInput<'_>, batch: usize) -> Self {
        PromptShape {
            points: input.point_labels.len(),
            mask_input: input.mask_input.is_some(),
            batch,
        }
    }
}

/// SAM's prompt encoder + mask decoder.
///
/// Plans are specialized to the shape of the prompt: with the number of points fixed tract
/// optimizes every shape concretely, and without a mask input the `has_mask_input` = 0 branch
/// (the mask downscaling convolutions, multiplied by zero in the exported graph) folds into a
/// constant. Without a mask input, the part of the decoder that depends on the image embedding
/// alone (in SAM's first two-way attention layer: the image tokens plus the positional encoding,
/// and their key, value and query projections) is split off into an image stage, run once per
/// embedding and kept with it ([`EmbeddingTensor`]); each prompt runs only the rest. In the
/// specialized plans the cross attentions between the prompt's few tokens and the 4096 image
/// tokens fold their projections into the tokens' side ([`token_attention`]). The
/// one-point plan is built at load; others at their first use, up to [`MAX_DECODER_PLANS`], after
/// which a plan with a symbolic point count serves the rest.
#[derive(Debug)]
pub struct MaskDecoder {
    /// The cut graph, with its five inputs and symbolic point count.
    model: InferenceModel,
    path: std::path::PathBuf,
    plans: std::sync::Mutex<Vec<(PromptShape, Arc<DecoderPlan>)>>,
    any_shape: std::sync::Mutex<Option<Arc<DecoderPlan>>>,
    /// The most prompts [`Self::decode_batch`] runs in one call.
    max_batch: usize,
}

/// One prompt shape's decoder.
#[derive(Debug)]
enum DecoderPlan {
    /// The whole graph: embedding, coordinates, labels, and the mask inputs it has left.
    Whole(Plan),
    /// The image stage (embedding in, per-image tensors out; `id` names its results in an
    /// embedding's cache) and the prompt stage (coordinates, labels, per-image tensors in).
    Split {
        id: u64,
        image_stage: Plan,
        prompt_stage: Plan,
    },
}

/// Source of [`DecoderPlan::Split`] ids, unique in the process.
static NEXT_IMAGE_STAGE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Splits a decoder graph whose only non-constant inputs are the embedding (input 0) and the
/// prompt into the nodes computed from the embedding and constants alone (the image stage) and
/// the rest (the prompt stage, which takes the image stage's results as extra inputs). None when
/// the image stage would do nothing.
fn split_image_stage(mut model: TypedModel) -> TractResult<Option<(TypedModel, TypedModel)>> {
    use tract_onnx::tract_core::ops::konst::Const;
    model.declutter()?;
    let inputs = model.input_outlets()?.to_vec();
    let outputs = model.output_outlets()?.to_vec();
    let embedding = inputs[0];
    let order = model.eval_order()?;
    let mut image_only = vec![false; model.nodes().len()];
    for &id in &order {
        let node = model.node(id);
        if id == embedding.node {
            image_only[id] = true;
        } else if !node.inputs.is_empty() {
            let from_image = node.inputs.iter().any(|i| image_only[i.node]);
            let image_or_const = node
                .inputs
                .iter()
                .all(|i| image_only[i.node] || model.node(i.node).op_is::<Const>());
            image_only[id] = from_image && image_or_const;
        }
    }
    let mut frontier = vec![];
    for &id in &order {
        if !image_only[id] {
            continue;
        }
        for (slot, output) in model.node(id).outputs.iter().enumerate() {
            let outlet = OutletId::new(id, slot);
            if outputs.contains(&outlet) || output.successors.iter().any(|s| !image_only[s.node]) {
                frontier.push(outlet);
            }
        }
    }
    if frontier.iter().all(|o| o.node == embedding.node) {
        return Ok(None);
    }
    let mut image_stage = model.clone();
    image_stage.set_input_outlets(&[embedding])?;
    image_stage.select_output_outlets(&frontier)?;
    image_stage.compact()?;

    let mut prompt_stage = model;
    let mut prompt_inputs = inputs[1..].to_vec();
    let mut prompt_outputs = outputs.clone();
    for (i, &outlet) in frontier.iter().enumerate() {
        let fact = prompt_stage.outlet_fact(outlet)?.without_value();
        let source = prompt_stage.add_source(format!("image_stage.{i}"), fact)?;
        let successors = prompt_stage.node(outlet.node).outputs[outlet.slot]
            .successors
            .clone();
        for inlet in successors.into_iter().filter(|s| !image_only[s.node]) {
            prompt_stage.add_edge(source, inlet)?;
        }
        for o in prompt_outputs.iter_mut().filter(|o| **o == outlet) {
            *o = source;
        }
        prompt_inputs.push(source);
    }
    prompt_stage.set_input_outlets(&prompt_inputs)?;
    prompt_stage.select_output_outlets(&prompt_outputs)?;
    prompt_stage.compact()?;
    Ok(Some((image_stage, prompt_stage)))
}

/// The cross attentions of a typed decoder with their projections folded into the prompt
/// tokens' side ([`token_attention::fold`]; `SAMRT_FOLDED_ATTENTION=0`: off).
fn fold_token_attention(mut model: TypedModel) -> TractResult<TypedModel> {
    if std::env::var("SAMRT_FOLDED_ATTENTION").map_or(true, |v| v != "0") {
        model.declutter()?;
        let folded = token_attention::fold(&mut model)?;
        log::debug!("decoder: {folded} cross attentions folded");
        model.compact()?;
    }
    Ok(model)
}

/// Follows the first input of each node back from `outlet` to the `Flatten` that feeds the
/// single-mask selection (`SamOnnxModel.select_masks` gathers from a flattened view); its input is
/// the tensor holding every token. A decoder exported without selection has none.
fn pre_selection_outlet(model: &InferenceModel, outlet: OutletId) -> Option<OutletId> {
    let mut outlet = outlet;
    for _ in 0..8 {
        let node = model.node(outlet.node);
        if node.op.name() == "Flatten" {
            return node.inputs.first().copied();
        }
        outlet = *node.inputs.first()?;
    }
    None
}

/// Turns input `index` of `model` into the constant `value`, so the optimizer can fold what
/// depends only on it.
fn input_to_const(model: &mut TypedModel, index: usize, value: Tensor) -> TractResult<()> {
    use tract_onnx::tract_core::ops::konst::Const;
    let outlet = model.input_outlets()?[index];
    model.node_mut(outlet.node).op = Box::new(Const::new(Arc::new(value.clone()))?);
    model.set_outlet_fact(outlet, TypedFact::try_from(value)?)?;
    let inputs: Vec<OutletId> = model
        .input_outlets()?
        .iter()
        .copied()
        .filter(|&o| o != outlet)
        .collect();
    model.set_input_outlets(&inputs)
}

impl MaskDecoder {
    /// Builds the decoder plan from the bytes of an ONNX file exported by Meta's `SamOnnxModel`.
    pub fn from_onnx_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        load_guarded(path, || Self::load(path, bytes))
    }

    fn load(path: &Path, bytes: &[u8]) -> Result<Self> {
        let fusions = Fusions {
            attention: std::env::var("SAMRT_FUSED_ATTENTION").map_or(true, |v| v != "0"),
            ..Fusions::DECODER
        };
        let fused = parse_onnx_with(path, bytes, fusions)
            .and_then(|(model, _)| Self::from_model(path, model));
        match fused {
            Ok(decoder) => Ok(decoder),
            Err(e) => {
                log::warn!(
                    "{}: samrt's fused operators do not fit this decoder ({e}); using tract's",
                    path.display()
                );
                Self::from_model(path, parse_onnx(path, bytes)?)
            }
        }
    }

    fn from_model(path: &Path, mut model: InferenceModel) -> Result<Self> {
        let input_names: Vec<String> = model
            .input_outlets()
            .map_err(|e| model_error(path, e.to_string()))?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let missing: Vec<&str> = DECODER_INPUTS
            .iter()
            .copied()
            .filter(|n| !input_names.iter().any(|i| i == n))
            .collect();
        let mut outlets = vec![];
        let mut missing_outputs = vec![];
        for name in DECODER_OUTPUTS {
            match model.find_outlet_label(name) {
                Some(o) => outlets.push(o),
                None => missing_outputs.push(name),
            }
        }
        if !missing.is_empty() || !missing_outputs.is_empty() {
            return Err(model_error(
                path,
                format!(
                    "not a SAM mask decoder exported by SamOnnxModel: expected inputs {DECODER_INPUTS:?} and outputs {DECODER_OUTPUTS:?}; \
                     missing inputs {missing:?}, missing outputs {missing_outputs:?} (found inputs {input_names:?}); \
                     is this the encoder? pass the decoder with --decoder"
                ),
            ));
        }
        let all_tokens: Vec<OutletId> = outlets
            .iter()
            .map(|&o| pre_selection_outlet(&model, o).unwrap_or(o))
            .collect();
        model
            .set_input_names(DECODER_INPUTS)
            .and_then(|_| model.select_output_outlets(&all_tokens))
            .and_then(|_| model.compact())
            .map_err(|e| model_error(path, format!("cannot cut the decoder graph: {e:#}")))?;
        let decoder = MaskDecoder {
            model,
            path: path.to_path_buf(),
            plans: Default::default(),
            any_shape: Default::default(),
            max_batch: default_decoder_batch(),
        };
        decoder.plan_for(PromptShape::ONE_POINT)?;
        Ok(decoder)
    }

    /// The plan for a batch of `shape`, as [`Self::plan_for`], or `None` where the plan cache is
    /// full and has none (the plan with a symbolic point count takes one prompt a call).
    fn batch_plan(&self, shape: PromptShape) -> Result<Option<Arc<DecoderPlan>>> {
        if shape.batch > 1 {
            let plans = self.plans.lock().map_err(|_| {
                Error::Inference("mask decoder: a plan cache lock was poisoned".into())
            })?;
            if plans.len() >= MAX_DECODER_PLANS && !plans.iter().any(|(s, _)| *s == shape) {
                return Ok(None);
            }
        }
        self.plan_for(shape).map(Some)
    }

    /// The plan for prompts of `shape`, built and kept at its first use.
    fn plan_for(&self, shape: PromptShape) -> Result<Arc<DecoderPlan>> {
        let lock_err = || Error::Inference("mask decoder: a plan cache lock was poisoned".into());
        {
            let plans = self.plans.lock().map_err(|_| lock_err())?;
            if let Some((_, plan)) = plans.iter().find(|(s, _)| *s == shape) {
                return Ok(plan.clone());
            }
            if plans.len() >= MAX_DECODER_PLANS {
                drop(plans);
                return self.any_shape_plan();
            }
        }
        let plan = Arc::new(self.build_plan(shape)?);
        let mut plans = self.plans.lock().map_err(|_| lock_err())?;
        if !plans.iter().any(|(s, _)| *s == shape) {
            plans.push((shape, plan.clone()));
        }
        Ok(plan)
    }

    fn build_plan(&self, shape: PromptShape) -> Result<DecoderPlan> {
        let path = self.path.as_path();
        let typed = self
            .specialized_model(shape)
            .and_then(fold_token_attention)
            .map_err(|e| model_error(path, format!("cannot be typed for {shape:?}: {e:#}")))?;
        if !shape.mask_input {
            match split_image_stage(typed.clone()) {
                Ok(Some((image_stage, prompt_stage))) => {
                    let image_stage = image_stage
                        .into_optimized()
                        .and_then(|m| m.into_runnable())
                        .map_err(|e| {
                            model_error(path, format!("cannot optimize the image stage: {e:#}"))
                        })?;
                    return Ok(DecoderPlan::Split {
                        id: NEXT_IMAGE_STAGE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                        image_stage,
                        prompt_stage: self.finish_plan(Ok(prompt_stage))?,
                    });
                }
                Ok(None) => {}
                Err(e) => log::debug!("decoder for {shape:?} not split: {e:#}"),
            }
        }
        Ok(DecoderPlan::Whole(self.finish_plan(Ok(typed))?))
    }

    /// The plan with a symbolic point count and every input, built at its first use.
    fn any_shape_plan(&self) -> Result<Arc<DecoderPlan>> {
        let mut any = self
            .any_shape
            .lock()
            .map_err(|_| Error::Inference("mask decoder: a plan cache lock was poisoned".into()))?;
        if let Some(plan) = any.as_ref() {
            return Ok(plan.clone());
        }
        let plan = Arc::new(DecoderPlan::Whole(
            self.finish_plan(self.model.clone().into_typed())?,
        ));
        *any = Some(plan.clone());
        Ok(plan)
    }

    /// The graph typed for `shape`, with `has_mask_input` (and without a mask, `mask_input`)
    /// as constants.
    fn specialized_model(&self, shape: PromptShape) -> TractResult<TypedModel> {
        let (n, b) = (shape.points, shape.batch);
        let mut typed = self
            .model
            .clone()
            .with_input_fact(
                0,
                f32::fact([1, EMBEDDING_CHANNELS, EMBEDDING_SIZE, EMBEDDING_SIZE]).into(),
            )?
            .with_input_fact(1, f32::fact([b, n, 2]).into())?
            .with_input_fact(2, f32::fact([b, n]).into())?
            .with_input_fact(
                3,
                f32::fact([1, 1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE]).into(),
            )?
            .with_input_fact(4, f32::fact([1]).into())?
            .into_typed()?;
        let has_mask = Tensor::from_shape(&[1], &[f32::from(u8::from(shape.mask_input))])?;
        input_to_const(&mut typed, 4, has_mask)?;
        if !shape.mask_input {
            let zeros = Tensor::zero::<f32>(&[1, 1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE])?;
            input_to_const(&mut typed, 3, zeros)?;
        }
        Ok(typed)
    }

    /// Optimizes a typed decoder graph, checks its outputs and makes it runnable.
    fn finish_plan(&self, typed: TractResult<TypedModel>) -> Result<Plan> {
        let path = self.path.as_path();
        let typed = typed
            .and_then(|m| m.into_optimized())
            .map_err(|e| model_error(path, format!("cannot be optimized by tract: {e:#}")))?;
        let masks_fact = typed
            .output_fact(0)
            .map_err(|e| model_error(path, e.to_string()))?;
        let iou_fact = typed
            .output_fact(1)
            .map_err(|e| model_error(path, e.to_string()))?;
        let masks_shape = shape_of(masks_fact);
        let iou_shape = shape_of(iou_fact);
        let size = LOW_RES_MASK_SIZE.to_string();
        let shapes_ok = masks_shape.len() == 4
            && masks_shape[2] == size
            && masks_shape[3] == size
            && iou_shape.len() == 2
            && masks_shape[1] == iou_shape[1];
        if !shapes_ok {
            return Err(model_error(
                path,
                format!(
                    "unexpected decoder outputs: masks {masks_shape:?} and IoU {iou_shape:?}, expected [1, T, 256, 256] and [1, T]"
                ),
            ));
        }
        typed
            .into_runnable()
            .map_err(|e| model_error(path, format!("cannot build the decoder plan: {e:#}")))
    }

    /// Runs the one-point plan's image stage on `embedding` and keeps its results there, so the
    /// first prompt on an embedding costs what every later one does (the encoder's thread pays
    /// instead of the prompt's).
    pub fn prepare(&self, embedding: &EmbeddingTensor) -> Result<()> {
        if let DecoderPlan::Split {
            id, image_stage, ..
        } = &*self.plan_for(PromptShape::ONE_POINT)?
        {
            embedding.image_stage(*id, |value| {
                image_stage
                    .run(tvec!(value))
                    .map_err(|e| Error::Inference(format!("mask decoder image stage: {e:#}")))
            })?;
        }
        Ok(())
    }

    /// Number of specialized plans built so far.
    pub fn specialized_plans(&self) -> usize {
        self.plans.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Runs the decoder once and returns every mask token.
    pub fn decode(&self, input: &DecoderInput<'_>) -> Result<DecodedTokens> {
        let plan = self.plan_for(PromptShape::of(input, 1))?;
        Ok(self
            .decode_with(&plan, std::slice::from_ref(input))?
            .remove(0))
    }

    /// How many prompts [`Self::decode_batch`] runs in one decoder call at most: a power of two
    /// up to [`MAX_DECODER_BATCH`] (default 1, see `SAMRT_DECODER_BATCH`).
    pub fn set_max_batch(&mut self, batch: usize) -> Result<()> {
        if !valid_decoder_batch(batch) {
            return Err(Error::Inference(format!(
                "a decoder batch of {batch}: use a power of two from 1 to {MAX_DECODER_BATCH}"
            )));
        }
        self.max_batch = batch;
        Ok(())
    }

    /// Decodes a set of prompts on one embedding, as [`Self::decode`] would one by one: prompts
    /// with the same number of points and no mask input run together, up to the decoder's
    /// batch ([`Self::set_max_batch`]) in one call. Results are in input order.
    pub fn decode_batch(&self, inputs: &[DecoderInput<'_>]) -> Result<Vec<DecodedTokens>> {
        let mut results: Vec<Option<DecodedTokens>> = vec![None; inputs.len()];
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            if !std::ptr::eq(input.embedding, inputs[0].embedding) {
                return Err(Error::Inference(
                    "mask decoder: a prompt batch must share one embedding".into(),
                ));
            }
            if input.mask_input.is_some() {
                results[i] = Some(self.decode(input)?);
                continue;
            }
            let points = input.point_labels.len();
            match groups.iter_mut().find(|(n, _)| *n == points) {
                Some((_, members)) => members.push(i),
                None => groups.push((points, vec![i])),
            }
        }
        for (_, members) in groups {
            let mut rest = &members[..];
            for size in batch_sizes(members.len(), self.max_batch) {
                let (chunk, after) = rest.split_at(size);
                rest = after;
                let batch: Vec<DecoderInput<'_>> = chunk.iter().map(|&i| inputs[i]).collect();
                let decoded = match self.batch_plan(PromptShape::of(&batch[0], size))? {
                    Some(plan) => self.decode_with(&plan, &batch)?,
                    // The plan cache is full: one by one.
                    None => batch
                        .iter()
                        .map(|i| self.decode(i))
                        .collect::<Result<_>>()?,
                };
                for (&i, tokens) in chunk.iter().zip(decoded) {
                    results[i] = Some(tokens);
                }
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Runs the decoder once like [`Self::decode`], timing each operator of the prompt's plan
    /// (the prompt stage where the plan is split; the image stage is cached on the embedding).
    pub fn profile(&self, input: &DecoderInput<'_>) -> Result<Vec<OpTiming>> {
        let plan = self.plan_for(PromptShape::of(input, 1))?;
        let (plan, inputs) = self.plan_inputs(&plan, std::slice::from_ref(input))?;
        profile_plan(plan, inputs)
    }

    /// Runs `plan` on a batch of prompts of its shape; one result per prompt.
    fn decode_with(
        &self,
        plan: &DecoderPlan,
        batch: &[DecoderInput<'_>],
    ) -> Result<Vec<DecodedTokens>> {
        let err = |e: TractError| Error::Inference(format!("mask decoder: {e:#}"));
        let (plan, inputs) = self.plan_inputs(plan, batch)?;
        let awake = threads::KeepAwake::new();
        let outputs = plan.run(inputs).map_err(err)?;
        drop(awake);
        let low_res_logits = to_f32_vec(&outputs[0]).map_err(err)?;
        let iou_predictions = to_f32_vec(&outputs[1]).map_err(err)?;
        let b = batch.len();
        if low_res_logits.len() != iou_predictions.len() * LOW_RES_MASK_LEN
            || !iou_predictions.len().is_multiple_of(b)
        {
            return Err(Error::Inference(format!(
                "mask decoder returned {} logits for {} tokens of {b} prompts",
                low_res_logits.len(),
                iou_predictions.len()
            )));
        }
        let tokens = iou_predictions.len() / b;
        Ok((0..b)
            .map(|i| DecodedTokens {
                low_res_logits: low_res_logits
                    [i * tokens * LOW_RES_MASK_LEN..(i + 1) * tokens * LOW_RES_MASK_LEN]
                    .to_vec(),
                iou_predictions: iou_predictions[i * tokens..(i + 1) * tokens].to_vec(),
            })
            .collect())
    }

    /// The plan to run for a batch of prompts of one shape and its inputs (running the image
    /// stage if the embedding has not had it yet).
    fn plan_inputs<'p>(
        &self,
        plan: &'p DecoderPlan,
        batch: &[DecoderInput<'_>],
    ) -> Result<(&'p Plan, TVec<TValue>)> {
        let input = &batch[0];
        let (b, n) = (batch.len(), input.point_labels.len());
        let err = |e: TractError| Error::Inference(format!("mask decoder: {e:#}"));
        let point_coords: Vec<f32> = batch.iter().flat_map(|i| i.point_coords).copied().collect();
        let point_labels: Vec<f32> = batch.iter().flat_map(|i| i.point_labels).copied().collect();
        let coords = Tensor::from_shape(&[b, n, 2], &point_coords).map_err(err)?;
        let labels = Tensor::from_shape(&[b, n], &point_labels).map_err(err)?;
        let mask_tensor = |mask: Option<&[f32]>| match mask {
            Some(m) => Tensor::from_shape(&[1, 1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE], m),
            None => Tensor::zero::<f32>(&[1, 1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE]),
        };
        let (plan, inputs) = match plan {
            DecoderPlan::Split {
                id,
                image_stage,
                prompt_stage,
            } => {
                if input.mask_input.is_some() {
                    return Err(Error::Inference(
                        "mask decoder: a plan without mask input was given a mask".into(),
                    ));
                }
                let per_image = input.embedding.image_stage(*id, |embedding| {
                    image_stage.run(tvec!(embedding)).map_err(err)
                })?;
                let mut inputs = tvec!(coords.into_tvalue(), labels.into_tvalue());
                inputs.extend(per_image);
                (prompt_stage, inputs)
            }
            DecoderPlan::Whole(plan) => {
                let mut inputs = tvec!(
                    input.embedding.value.clone(),
                    coords.into_tvalue(),
                    labels.into_tvalue()
                );
                let constant_masks = plan.model().input_outlets().map_or(0, |i| i.len()) < 5;
                if !constant_masks {
                    let has_mask = f32::from(u8::from(input.mask_input.is_some()));
                    inputs.push(mask_tensor(input.mask_input).map_err(err)?.into_tvalue());
                    inputs.push(
                        Tensor::from_shape(&[1], &[has_mask])
                            .map_err(err)?
                            .into_tvalue(),
                    );
                } else if input.mask_input.is_some() {
                    inputs.push(mask_tensor(input.mask_input).map_err(err)?.into_tvalue());
                }
                (plan, inputs)
            }
        };
        Ok((plan, inputs))
    }
}

/// An object detector whose graph ends before NMS: one uint8 NHWC RGB image in, decoded `boxes`
/// [1, N, 4] and per-class `scores` [1, N, C] out (see `detector`).
#[derive(Debug)]
pub struct ObjectDetector {
    plan: Plan,
    height: usize,
    width: usize,
}

/// Raw detector outputs for one image.
#[derive(Debug, Clone)]
pub struct DetectorOutputs {
    /// `anchors` boxes of 4 values each.
    pub boxes: Vec<f32>,
    /// `anchors` rows of `classes` scores.
    pub scores: Vec<f32>,
    pub anchors: usize,
    pub classes: usize,
}

impl ObjectDetector {
    /// Builds the plan; the model's input must be uint8 [1, H, W, 3] and its outputs `boxes` and
    /// `scores`.
    pub fn from_onnx_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        load_guarded(path, || Self::load(path, bytes))
    }

    fn load(path: &Path, bytes: &[u8]) -> Result<Self> {
        let mut model = parse_onnx(path, bytes)?;
        model
            .select_outputs_by_name(["boxes", "scores"])
            .map_err(|e| {
                model_error(
                    path,
                    format!("a detector must have outputs named \"boxes\" and \"scores\" ({e:#})"),
                )
            })?;
        let typed = model
            .into_optimized()
            .map_err(|e| model_error(path, format!("cannot be optimized by tract: {e:#}")))?;
        let input = typed
            .input_fact(0)
            .map_err(|e| model_error(path, e.to_string()))?;
        let (height, width) = match input.shape.as_concrete() {
            Some(&[1, h, w, 3]) if input.datum_type == u8::datum_type() => (h, w),
            _ => {
                return Err(model_error(
                    path,
                    format!(
                    "a detector input must be uint8 [1, H, W, 3] (NHWC RGB), this one is {:?} {:?}",
                    input.datum_type,
                    shape_of(input)
                ),
                ))
            }
        };
        let plan = typed
            .into_runnable()
            .map_err(|e| model_error(path, format!("cannot build the detector plan: {e:#}")))?;
        Ok(ObjectDetector {
            plan,
            height,
            width,
        })
    }

    /// The input size the image must be resized to, (height, width).
    pub fn input_size(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// Runs the detector on an interleaved RGB8 image of the input size.
    pub fn detect(&self, rgb: &[u8]) -> Result<DetectorOutputs> {
        let err = |e: TractError| Error::Inference(format!("object detector: {e:#}"));
        let input = Tensor::from_shape(&[1, self.height, self.width, 3], rgb).map_err(err)?;
        let outputs = self.plan.run(tvec!(input.into_tvalue())).map_err(err)?;
        let boxes = to_f32_vec(&outputs[0]).map_err(err)?;
        let scores = to_f32_vec(&outputs[1]).map_err(err)?;
        let anchors = boxes.len() / 4;
        if anchors == 0 || boxes.len() != anchors * 4 || scores.len() % anchors != 0 {
            return Err(Error::Inference(format!(
                "object detector returned {} box values and {} scores, expected [1, N, 4] and [1, N, C]",
                boxes.len(),
                scores.len()
            )));
        }
        let classes = scores.len() / anchors;
        Ok(DetectorOutputs {
            boxes,
            scores,
            anchors,
            classes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::change_axes::AxisOp;

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn default_decoder() -> MaskDecoder {
        let files = crate::model::ModelFiles::default_model().expect("default model");
        let bytes = std::fs::read(&files.decoder).expect("decoder bytes");
        MaskDecoder::from_onnx_bytes(&files.decoder, &bytes).expect("decoder")
    }

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

    /// The layout changes tract keeps in the default encoder's plan (patch mergings, neck) run
    /// on samrt's threaded copy ([`axis_move`]): no large one is left to tract's `MoveAxis`.
    #[test]
    fn encoder_axis_moves_are_threaded() {
        let files = crate::model::ModelFiles::default_model().expect("default model");
        let bytes = std::fs::read(&files.encoder).expect("encoder bytes");
        let encoder = ImageEncoder::from_onnx_bytes(&files.encoder, &bytes).unwrap();
        let model = encoder.plan.model();
        let ours = model
            .nodes()
            .iter()
            .filter(|n| n.op_is::<axis_move::SamrtMoveAxis>())
            .count();
        assert!(ours >= 6, "{ours} axis moves on samrt's copy");
        for node in model.nodes() {
            if let Some(AxisOp::Move(..)) = node.op_as::<AxisOp>() {
                let fact = model.outlet_fact(node.inputs[0]).unwrap();
                let len: usize = fact.shape.as_concrete().unwrap().iter().product();
                assert!(len < axis_move::MIN_ELEMENTS, "{} left to tract", node.name);
            }
        }
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

    /// Deterministic embedding values in [-0.5, 0.5]: `(i * step) % period` scaled.
    fn embedding_values(step: usize, period: usize) -> Vec<f32> {
        (0..EMBEDDING_LEN)
            .map(|i| ((i * step) % period) as f32 / (period - 1) as f32 - 0.5)
            .collect()
    }

    fn op_names(plan: &DecoderPlan) -> Vec<String> {
        let stages = match plan {
            DecoderPlan::Whole(plan) => vec![plan],
            DecoderPlan::Split {
                image_stage,
                prompt_stage,
                ..
            } => vec![image_stage, prompt_stage],
        };
        stages
            .iter()
            .flat_map(|p| p.model().nodes().iter().map(|n| n.op.name().to_string()))
            .collect()
    }

    /// Without a mask input the decoder is split: the image stage runs once per embedding (and
    /// its clones), the prompt stage per prompt, and the result is the whole graph's.
    #[test]
    fn image_stage_runs_once_per_embedding() {
        let decoder = default_decoder();
        let plan = decoder.plan_for(PromptShape::ONE_POINT).unwrap();
        let DecoderPlan::Split {
            image_stage,
            prompt_stage,
            ..
        } = &*plan
        else {
            panic!("the one-point plan is not split: {plan:?}");
        };
        let image_inputs = image_stage.model().input_outlets().unwrap().len();
        let prompt_inputs = prompt_stage.model().input_outlets().unwrap().len();
        assert_eq!(image_inputs, 1, "the image stage takes the embedding alone");
        assert!(
            prompt_inputs > 2,
            "the prompt stage takes per-image tensors"
        );
        let values = embedding_values(104_729, 3001);
        let embedding = EmbeddingTensor::new(&values).unwrap();
        let shared = embedding.clone();
        assert_eq!(embedding.cached_image_stages(), 0);
        decoder.prepare(&shared).unwrap();
        assert_eq!(
            embedding.cached_image_stages(),
            1,
            "clones share the image stage"
        );
        let whole = DecoderPlan::Whole(
            decoder
                .finish_plan(decoder.specialized_model(PromptShape::ONE_POINT))
                .unwrap(),
        );
        for (i, point) in [[300.0f32, 200.0], [10.0, 1000.0], [512.0, 512.0]]
            .iter()
            .enumerate()
        {
            let coords = [point[0], point[1], 0.0, 0.0];
            let input = |embedding| DecoderInput {
                embedding,
                point_coords: &coords,
                point_labels: &[1.0, -1.0],
                mask_input: None,
            };
            let first = if i % 2 == 0 { &embedding } else { &shared };
            let split = decoder.decode(&input(first)).unwrap();
            let reference = decoder
                .decode_with(&whole, &[input(first)])
                .unwrap()
                .remove(0);
            let diff = max_diff(&split.low_res_logits, &reference.low_res_logits);
            assert!(
                diff < 1e-3,
                "point {point:?}: split logits differ by {diff}"
            );
            let diff = max_diff(&split.iou_predictions, &reference.iou_predictions);
            assert!(diff < 1e-4, "point {point:?}: split IoU differs by {diff}");
            assert_eq!(embedding.cached_image_stages(), 1);
        }
        let other =
            EmbeddingTensor::new(&values[..].iter().map(|v| -v).collect::<Vec<_>>()).unwrap();
        assert_eq!(other.cached_image_stages(), 0);
    }

    #[test]
    fn batch_sizes_are_full_batches_then_powers_of_two() {
        assert_eq!(batch_sizes(0, 16), Vec::<usize>::new());
        assert_eq!(batch_sizes(1, 16), vec![1]);
        assert_eq!(batch_sizes(13, 16), vec![8, 4, 1]);
        assert_eq!(batch_sizes(16, 16), vec![16]);
        assert_eq!(batch_sizes(37, 16), vec![16, 16, 4, 1]);
        assert_eq!(batch_sizes(3, 1), vec![1, 1, 1]);
        for n in 0..100 {
            for max in [1, 2, 4, 8, 16] {
                assert_eq!(batch_sizes(n, max).iter().sum::<usize>(), n);
            }
        }
    }

    /// A set of prompts decoded together gives each prompt what decoding it alone gives: point
    /// prompts in batches of 16, 4 and 1, three-point prompts in a batch of 2, a mask prompt
    /// alone, in input order.
    #[test]
    fn batched_prompts_match_one_by_one() {
        let mut decoder = default_decoder();
        assert!(decoder.set_max_batch(3).is_err());
        decoder.set_max_batch(MAX_DECODER_BATCH).unwrap();
        let embedding = EmbeddingTensor::new(&embedding_values(7919, 2001)).unwrap();
        let mask: Vec<f32> = (0..LOW_RES_MASK_LEN)
            .map(|i| ((i % 97) as f32 - 48.0) / 8.0)
            .collect();
        let mut prompts: Vec<(Vec<f32>, Vec<f32>, bool)> = (0..21)
            .map(|i| {
                let (x, y) = (40.0 + 45.0 * i as f32, 980.0 - 37.0 * i as f32);
                (vec![x, y, 0.0, 0.0], vec![1.0, -1.0], false)
            })
            .collect();
        prompts.insert(
            5,
            (
                vec![100.0, 200.0, 300.0, 400.0, 0.0, 0.0],
                vec![1.0, 0.0, -1.0],
                false,
            ),
        );
        prompts.insert(9, (vec![500.0, 500.0, 0.0, 0.0], vec![1.0, -1.0], true));
        prompts.push((
            vec![700.0, 100.0, 650.0, 150.0, 0.0, 0.0],
            vec![1.0, 1.0, -1.0],
            false,
        ));
        let inputs: Vec<DecoderInput<'_>> = prompts
            .iter()
            .map(|(coords, labels, with_mask)| DecoderInput {
                embedding: &embedding,
                point_coords: coords,
                point_labels: labels,
                mask_input: with_mask.then_some(&mask[..]),
            })
            .collect();
        let batched = decoder.decode_batch(&inputs).unwrap();
        assert_eq!(batched.len(), inputs.len());
        for (i, (input, together)) in inputs.iter().zip(&batched).enumerate() {
            let alone = decoder.decode(input).unwrap();
            let diff = max_diff(&together.low_res_logits, &alone.low_res_logits);
            assert!(diff < 1e-3, "prompt {i}: logits differ by {diff}");
            let diff = max_diff(&together.iou_predictions, &alone.iou_predictions);
            assert!(diff < 1e-4, "prompt {i}: IoU differs by {diff}");
        }
        let other = EmbeddingTensor::new(&embedding_values(31, 977)).unwrap();
        let mixed = [
            inputs[0],
            DecoderInput {
                embedding: &other,
                ..inputs[1]
            },
        ];
        let err = decoder.decode_batch(&mixed).unwrap_err().to_string();
        assert!(err.contains("share one embedding"), "{err}");
    }

    /// Every specialized plan computes what the plan with a symbolic point count and every input
    /// computes; past MAX_DECODER_PLANS shapes the cache stops growing and prompts still decode.
    #[test]
    fn specialized_decoder_plans_match_the_symbolic_plan() {
        let decoder = default_decoder();
        assert_eq!(
            decoder.specialized_plans(),
            1,
            "the one-point plan is built at load"
        );
        let values = embedding_values(7919, 2001);
        let embedding = EmbeddingTensor::new(&values).unwrap();
        let mut previous: Option<Vec<f32>> = None;
        for points in 1..=MAX_DECODER_PLANS / 2 + 2 {
            for with_mask in [false, true] {
                let coords: Vec<f32> = (0..points)
                    .flat_map(|i| [100.0 + 97.0 * i as f32, 700.0 - 61.0 * i as f32])
                    .collect();
                let labels: Vec<f32> = (0..points)
                    .map(|i| {
                        if i + 1 == points {
                            -1.0
                        } else {
                            (i % 2) as f32
                        }
                    })
                    .collect();
                let input = DecoderInput {
                    embedding: &embedding,
                    point_coords: &coords,
                    point_labels: &labels,
                    mask_input: previous.as_deref().filter(|_| with_mask),
                };
                let specialized = decoder.decode(&input).unwrap();
                let symbolic = decoder
                    .decode_with(&decoder.any_shape_plan().unwrap(), &[input])
                    .unwrap()
                    .remove(0);
                let diff = max_diff(&specialized.low_res_logits, &symbolic.low_res_logits);
                assert!(
                    diff < 1e-3,
                    "{points} points, mask {with_mask}: logits differ by {diff}"
                );
                let diff = max_diff(&specialized.iou_predictions, &symbolic.iou_predictions);
                assert!(
                    diff < 1e-4,
                    "{points} points, mask {with_mask}: IoU differs by {diff}"
                );
                previous = Some(specialized.logits(0).to_vec());
            }
        }
        assert_eq!(decoder.specialized_plans(), MAX_DECODER_PLANS);
    }

    /// samrt's operators (`fast_ops`) change nothing but speed: the default decoder (opset 17, the
    /// one with `LayerNormalization` and opset-13 `Softmax`) parsed with them computes what
    /// tract's own operators compute.
    #[test]
    fn samrt_operators_match_tracts_on_the_default_model() {
        let files = crate::model::ModelFiles::default_model().expect("default model");
        let tract_only = |path: &Path| {
            let bytes = std::fs::read(path).unwrap();
            tract_onnx::onnx().model_for_read(&mut &*bytes).unwrap()
        };
        let samrt = |path: &Path| parse_onnx(path, &std::fs::read(path).unwrap()).unwrap();
        let values = embedding_values(7919, 2001);
        let embedding = EmbeddingTensor::new(&values).unwrap();
        let ours = MaskDecoder::from_model(&files.decoder, samrt(&files.decoder)).unwrap();
        let theirs = MaskDecoder::from_model(&files.decoder, tract_only(&files.decoder)).unwrap();
        let input = DecoderInput {
            embedding: &embedding,
            point_coords: &[400.0, 300.0, 0.0, 0.0],
            point_labels: &[1.0, -1.0],
            mask_input: None,
        };
        let (a, b) = (ours.decode(&input).unwrap(), theirs.decode(&input).unwrap());
        let diff = max_diff(&a.low_res_logits, &b.low_res_logits);
        assert!(diff < 1e-3, "decoder logits differ by {diff}");
        assert!(max_diff(&a.iou_predictions, &b.iou_predictions) < 1e-4);
        let ours_ops = op_names(&ours.plan_for(PromptShape::ONE_POINT).unwrap());
        assert!(
            ours_ops.iter().any(|n| n == "LastAxisLayerNorm"),
            "{ours_ops:?}"
        );
        assert!(
            ours_ops.iter().any(|n| n == "ShortAxisSoftmax"),
            "{ours_ops:?}"
        );
    }
}
