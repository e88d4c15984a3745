//! The image encoder in f16 (`--precision f16`): the fp32 plan converted at load with tract's
//! f32 → f16 translation, for the CPUs that compute in half precision (Armv8.2 FP16: Cortex-A76
//! and A78, the Raspberry Pi 5 and the Jetson Orin), where tract runs its fp16 matrix kernels.
//!
//! What stays f32, with casts around it: samrt's operators (attention with its softmax, layer
//! norms, GELU, depthwise convolutions: f32 kernels, and the steps where half precision loses
//! accuracy), tract's softmaxes and reductions, the transcendental element-wise operators, and
//! the convolutions that lose accuracy in f16 ([`conv_keeps_f32`]: measured on the default
//! encoder, 3.1% of embedding error with every convolution in f16, 0.2% without those).
//! Constants feeding only those stay f32 too. The matrix products and convolutions, the
//! element-wise arithmetic between them and the axis moves run in f16. The plan takes and gives
//! f32: the image is converted on the way in, the embedding on the way out.
//!
//! A CPU without fp16 arithmetic (x86_64, the Pi 4's Cortex-A72) is refused with the fallback
//! named: tract would run f16 there through plain software conversions, slower than fp32.

use std::collections::HashSet;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
use tract_onnx::tract_core::ops::cnn::Conv;
use tract_onnx::tract_core::transform::ModelTransform;

/// Set to `1`, lets [`check_cpu`] accept any CPU: the tests exercise the conversion on x86_64,
/// where tract computes f16 in software.
pub const ANY_CPU_ENV: &str = "SAMRT_F16_ANY_CPU";

/// Whether this CPU has half-precision arithmetic (aarch64 `fp16`).
pub fn f16_arithmetic() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("fp16")
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        false
    }
}

/// `Err` with the reason and the fallback when this CPU cannot run f16 well.
pub fn check_cpu() -> std::result::Result<(), String> {
    if f16_arithmetic() || std::env::var(ANY_CPU_ENV).is_ok_and(|v| v == "1") {
        return Ok(());
    }
    Err(refusal())
}

fn refusal() -> String {
    let cpu = if cfg!(target_arch = "aarch64") {
        "this aarch64 CPU has no fp16 arithmetic (a Cortex-A72, such as the Raspberry Pi 4's?)"
    } else {
        "this CPU is not an aarch64 CPU with fp16 arithmetic"
    };
    format!(
        "--precision f16 needs half-precision arithmetic (Armv8.2 FP16: Cortex-A76/A78, \
         Raspberry Pi 5, Jetson Orin) and {cpu}; use --precision fp32 (precision = \"fp32\" in \
         the config), or a model's int8-static encoder where it has one"
    )
}

/// Whether a node of the typed plan keeps computing in f32.
fn keeps_f32(op: &str) -> bool {
    const KEPT: &[&str] = &[
        "ChannelLayerNorm",
        "LastAxisLayerNorm",
        "ShortAxisSoftmax",
        "Softmax",
        "Exp",
        "Erf",
        "Pow",
        "Sqrt",
        "Rsqrt",
        "Recip",
        "Ln",
        "Tanh",
        "Sigmoid",
    ];
    op.starts_with("Samrt") || op.starts_with("Reduce") || KEPT.contains(&op)
}

/// Reductions at least this long stay f32 in a convolution: the neck's 3x3 convolution (256
/// channels, 2304 products a value) in f16 alone costs the default encoder's embedding 2.5% of
/// relative error.
const F32_CONV_REDUCTION: usize = 2048;

/// Whether a node is a convolution that loses accuracy in f16: a strided one (the patch
/// embedding, which reads the image: 0.4% of relative error for its two convolutions on the
/// default encoder) or one of a long reduction ([`F32_CONV_REDUCTION`]).
fn conv_keeps_f32(node: &TypedNode) -> bool {
    let Some(conv) = node.op_as::<Conv>() else {
        return false;
    };
    let spec = &conv.pool_spec;
    let reduction =
        spec.input_channels / conv.group.max(1) * spec.kernel_shape.iter().product::<usize>();
    spec.strides().iter().any(|&s| s > 1) || reduction >= F32_CONV_REDUCTION
}

/// The model with its float computations in f16 except those that [`keeps_f32`], and
/// constants used only by those.
pub(super) fn translate(model: TypedModel) -> TractResult<TypedModel> {
    let mut model = model.into_decluttered()?;
    let kept: HashSet<usize> = model
        .nodes()
        .iter()
        .filter(|n| keeps_f32(&n.op.name()) || conv_keeps_f32(n))
        .map(|n| n.id)
        .collect();
    let mut f32_only = kept.clone();
    for node in model.nodes() {
        let is_const = node
            .op_as::<tract_onnx::tract_core::ops::konst::Const>()
            .is_some();
        let users: Vec<usize> = node
            .outputs
            .iter()
            .flat_map(|o| o.successors.iter().map(|s| s.node))
            .collect();
        if is_const && !users.is_empty() && users.iter().all(|u| kept.contains(u)) {
            f32_only.insert(node.id);
        }
    }
    FloatPrecisionTranslator::with_filter(f32::datum_type(), f16::datum_type(), move |node| {
        !f32_only.contains(&node.id)
    })
    .transform(&mut model)?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_names_the_fallback() {
        let err = refusal();
        assert!(
            err.contains("--precision fp32") && err.contains("Cortex-A76"),
            "{err}"
        );
        assert_eq!(
            check_cpu().is_ok(),
            f16_arithmetic() || std::env::var(ANY_CPU_ENV).is_ok_and(|v| v == "1")
        );
    }
}
