//! The inference engine: the only module that talks to tract.
//!
//! Plans are built at load time and reused for every frame and every prompt:
//! - [`ImageEncoder`] (`encoder.rs`): the SAM image encoder with its input fact fixed to
//!   1x3x1024x1024 and the graph optimized for it;
//! - [`MaskDecoder`] (`decoder.rs`): the prompt encoder + mask decoder exported by Meta's
//!   `SamOnnxModel`, cut so that it returns the low-resolution logits and predicted IoU of *every*
//!   mask token. The in-graph upsampling (whose output shape depends on the `orig_im_size` value,
//!   which tract cannot type) and the single-mask selection are dropped; both are done in Rust by
//!   the caller. Plans are specialized per prompt shape (number of points, mask input or not) and
//!   kept;
//! - [`ObjectDetector`] (`detector.rs`): a detector graph cut before its NMS.
//!
//! Each is loaded by `onnx.rs`: parsing with samrt's operators (`fast_ops.rs`), samrt's graph
//! rewrites (over the lookups of `onnx_graph.rs`), the guards and the load errors. samrt's
//! operators and the rewrites that put them in a graph: `attention.rs`, `window_attention.rs`,
//! `token_attention.rs`, `layer_norm.rs`, `depthwise.rs`, `linear.rs`, `linear_int8.rs`,
//! `quantize.rs`, `conv1x1.rs`, `conv3x3.rs`, `mbconv.rs`, `upscale.rs`, `axis_move.rs`, on
//! `vector_math.rs` and `threads.rs`; the f16 encoder: `half.rs`. The sizes SAM's models are
//! built for are [`crate::sam_sizes`], re-exported here. This file: the compute threads and the
//! allocator setting every plan shares.

mod attention;
mod axis_move;
mod conv1x1;
mod conv3x3;
mod decoder;
mod depthwise;
mod detector;
mod encoder;
mod fast_ops;
mod half;
mod layer_norm;
mod linear;
mod linear_int8;
mod mbconv;
mod onnx;
mod onnx_graph;
mod quantize;
mod threads;
mod token_attention;
mod upscale;
mod vector_math;
mod window_attention;

pub use attention::peak_scratch_values as attention_peak_scratch_values;
pub use decoder::{
    DecodedTokens, DecoderInput, EmbeddingTensor, MaskDecoder, PromptShape, MAX_DECODER_BATCH,
    MAX_DECODER_PLANS,
};
pub use detector::{DetectorOutputs, ObjectDetector};
pub use encoder::{EncoderOptions, ImageEncoder, OpTiming};
pub use half::{f16_arithmetic, ANY_CPU_ENV as F16_ANY_CPU_ENV};
pub use onnx::run_f32_graph;

pub use crate::sam_sizes::{
    EMBEDDING_CHANNELS, EMBEDDING_LEN, EMBEDDING_SIZE, ENCODER_INPUT_SIZE, LOW_RES_MASK_LEN,
    LOW_RES_MASK_SIZE,
};

use std::sync::Arc;

use tract_onnx::prelude::*;

type Plan = Arc<TypedRunnableModel>;

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

fn to_f32_vec(value: &TValue) -> TractResult<Vec<f32>> {
    Ok(value.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
}
