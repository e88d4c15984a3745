//! 1x1 convolutions of NCHW tensors (and the GELU after them) as a samrt operator on CPUs with
//! AVX-512: the matrix product `out[o, p] = Σ_c W[o, c] · x[c, p] + b[o]` over the pixels `p`.
//!
//! TinyViT's first stage expands 64 to 256 channels and back at 256x256 pixels (64 MB
//! tensors). tract runs these convolutions as matrix products on a packed copy of the
//! activations: the copy reads 256 rows 256 KB apart a panel at a time (17–38 ms for one
//! 64 MB tensor here) and goes through memory before the product reads it again. Here a block of
//! 256 pixels of every input channel (1 KB runs of each row) is packed into an L2-resident
//! scratch, and 6-channel x 32-pixel register tiles are computed from it at once, the weights
//! read in place; the GELU that follows the expansion is applied to each tile as it is stored.
//! Pixel blocks are split over tract's thread pool; results do not depend on the thread count.
//!
//! [`fuse`] rewrites `Conv` nodes with 1x1 kernels (stride 1, no padding, one group, constant
//! weights and bias) before tract parses the graph, only where the AVX-512 kernel runs
//! ([`super::linear::available`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, attribute_proto::AttributeType, AttributeProto, NodeProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use super::vector_math::{gelu, AlignedVec, Fused};

/// The ONNX operator type of a fused 1x1 convolution (samrt's domain).
pub const OP_TYPE: &str = "SamrtConv1x1";
const DOMAIN: &str = "ai.samrt";

/// Output channels of a register tile.
const TILE_CHANNELS: usize = 6;
/// Pixels of a register tile.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const TILE_PIXELS: usize = 32;
/// Pixels of one block (packed together; the unit of threading).
pub(super) const BLOCK_PIXELS: usize = 256;

// ---------------------------------------------------------------------------------------------
// The ONNX rewrite.

/// Replaces every 1x1 `Conv` (stride 1, no padding, one group, weights `[O, C, 1, 1]` and an
/// optional bias `[O]` as float initializers), with the `SamrtGelu` it feeds alone if any, by one
/// `SamrtConv1x1` node; returns how many. Run after [`super::depthwise::fuse`].
pub fn fuse(graph: &mut pb::GraphProto) -> usize {
    let nodes = &graph.node;
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
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
    let float = |name: &str| {
        initializers
            .get(name)
            .filter(|t| t.data_type == pb::tensor_proto::DataType::Float as i32)
    };
    let mut removed: HashSet<usize> = HashSet::new();
    let mut fused: HashMap<usize, NodeProto> = HashMap::new();
    for (conv_ix, conv) in nodes.iter().enumerate() {
        if conv.op_type != "Conv" || !conv.domain.is_empty() || !(2..=3).contains(&conv.input.len())
        {
            continue;
        }
        let Some(weight) = float(&conv.input[1]) else {
            continue;
        };
        if weight.dims.len() != 4 || weight.dims[2..] != [1, 1] {
            continue;
        }
        if let Some(bias) = conv.input.get(2) {
            if float(bias).is_none_or(|b| b.dims != [weight.dims[0]]) {
                continue;
            }
        }
        let plain = conv.attribute.iter().all(|a| match a.name.as_str() {
            "group" => a.i == 1,
            "kernel_shape" => a.ints == [1, 1],
            "strides" | "dilations" => a.ints.iter().all(|&v| v == 1),
            "pads" => a.ints.iter().all(|&v| v == 0),
            "auto_pad" => a.s.is_empty() || a.s == b"NOTSET",
            _ => false,
        });
        if !plain {
            continue;
        }
        let y = &conv.output[0];
        let gelu = match consumers.get(y.as_str()).map(|c| c.as_slice()) {
            Some([only])
                if !graph_outputs.contains(y.as_str())
                    && nodes[*only].op_type == super::depthwise::GELU_OP
                    && nodes[*only].domain == DOMAIN =>
            {
                Some(*only)
            }
            _ => None,
        };
        let node = NodeProto {
            name: format!("{}.samrt_conv1x1", conv.name),
            op_type: OP_TYPE.into(),
            domain: DOMAIN.into(),
            input: conv.input.clone(),
            output: vec![gelu.map_or(y.clone(), |g| nodes[g].output[0].clone())],
            attribute: vec![AttributeProto {
                name: "gelu".into(),
                r#type: AttributeType::Int as i32,
                i: gelu.is_some() as i64,
                ..Default::default()
            }],
            ..Default::default()
        };
        removed.insert(conv_ix);
        removed.extend(gelu);
        fused.insert(gelu.unwrap_or(conv_ix), node);
    }
    let count = fused.len();
    super::layer_norm::splice(graph, fused, &removed);
    count
}

// ---------------------------------------------------------------------------------------------
// The operator, as tract's parser builds it.

/// Builds a `SamrtConv1x1` node.
pub fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let gelu = node.get_attr_opt::<i64>("gelu")?.unwrap_or(0) != 0;
    Ok((expand(Conv1x1Expansion { gelu }), vec![]))
}

#[derive(Debug, Clone)]
struct Conv1x1Expansion {
    gelu: bool,
}

impl Expansion for Conv1x1Expansion {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        ensure!(
            (2..=3).contains(&inputs.len()),
            "SamrtConv1x1: x, W and an optional bias"
        );
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].rank, 4)?;
        s.equals(&outputs[0].rank, 4)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[0].shape[1], &inputs[1].shape[0])?;
        s.equals(&outputs[0].shape[2], &inputs[0].shape[2])?;
        s.equals(&outputs[0].shape[3], &inputs[0].shape[3])?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let (w, bias) = conv_weights(OP_TYPE, model, inputs)?;
        let (o, c) = (w.shape()[0], w.shape()[1]);
        let op = Conv1x1::new(
            w.try_as_plain_ram()?.as_slice::<f32>()?,
            &bias,
            o,
            c,
            self.gelu,
        );
        model.wire_node(prefix, op, &inputs[..1])
    }
}

/// A fused convolution's constant f32 weights `[O, C, ..]` and its bias (zeros without one),
/// from inputs 1 and 2 of node `op` (input 0 must be f32 too).
pub(super) fn conv_weights(
    op: &str,
    model: &TypedModel,
    inputs: &[OutletId],
) -> TractResult<(Arc<Tensor>, Vec<f32>)> {
    let x = model.outlet_fact(inputs[0])?;
    let w = model
        .outlet_fact(inputs[1])?
        .konst
        .clone()
        .with_context(|| format!("{op}: the weights must be constant"))?;
    ensure!(
        x.datum_type == f32::datum_type() && w.datum_type() == f32::datum_type(),
        "{op}: f32 only"
    );
    let o = w.shape()[0];
    let bias = match inputs.get(2) {
        Some(b) => {
            let b = model
                .outlet_fact(*b)?
                .konst
                .clone()
                .with_context(|| format!("{op}: the bias must be constant"))?;
            b.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()
        }
        None => vec![0.0; o],
    };
    Ok((w, bias))
}

// ---------------------------------------------------------------------------------------------
// The typed operator.

/// `out[n, o, p] = Σ_c W[o, c] · x[n, c, p] + b[o]` (then GELU if `gelu`) over NCHW tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Conv1x1 {
    o: usize,
    c: usize,
    /// `[O rounded up to TILE_CHANNELS, C]`, zero rows past O.
    weights: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    gelu: bool,
}

impl Eq for Conv1x1 {}

impl std::hash::Hash for Conv1x1 {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.o, self.c, self.gelu).hash(state);
        for v in self.weights.iter().take(64) {
            v.to_bits().hash(state);
        }
    }
}

impl Conv1x1 {
    pub(super) fn new(weights: &[f32], bias: &[f32], o: usize, c: usize, gelu: bool) -> Self {
        let rows = o.div_ceil(TILE_CHANNELS) * TILE_CHANNELS;
        let mut w = vec![0f32; rows * c];
        w[..o * c].copy_from_slice(&weights[..o * c]);
        let mut b = vec![0f32; rows];
        b[..o].copy_from_slice(&bias[..o]);
        Conv1x1 {
            o,
            c,
            weights: Arc::new(w),
            bias: Arc::new(b),
            gelu,
        }
    }
}

impl Op for Conv1x1 {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} → {} channels, gelu: {}",
            self.c, self.o, self.gelu
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for Conv1x1 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(
            x.rank() == 4 && x.shape[1] == self.c.to_dim(),
            "SamrtConv1x1: NCHW input of {} channels expected, got {:?}",
            self.c,
            x.shape
        );
        let mut shape: TVec<TDim> = x.shape.iter().cloned().collect();
        shape[1] = self.o.to_dim();
        Ok(tvec!(x.datum_type.fact(shape)))
    }

    as_op!();
}

/// An output pointer shared by a fused convolution's tasks (each writes its own pixels).
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer `offset` values in (a method, so that closures capture the whole `OutPtr`).
    pub(super) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

impl EvalOp for Conv1x1 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = x.shape();
        ensure!(
            shape.len() == 4 && shape[1] == self.c,
            "SamrtConv1x1: NCHW input of {} channels expected, got {shape:?}",
            self.c
        );
        let (n, plane) = (shape[0], shape[2] * shape[3]);
        let out_shape = [n, self.o, shape[2], shape[3]];
        let view = x.try_as_plain_ram()?;
        let data = view.as_slice::<f32>()?;
        // SAFETY: f32 has no invalid bit patterns, and every output value is written.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        let blocks = plane.div_ceil(BLOCK_PIXELS);
        if n * blocks * self.o > 0 {
            let mut out_view = output.try_as_plain_ram_mut()?;
            let out = OutPtr(out_view.as_slice_mut::<f32>()?.as_mut_ptr());
            let units = n * blocks;
            let scratch = || AlignedVec::<f32>::zeroed(self.c * BLOCK_PIXELS);
            let task = |scratch: &mut AlignedVec<f32>, unit: usize| {
                let (image, block) = (unit / blocks, unit % blocks);
                let x = &data[image * self.c * plane..(image + 1) * self.c * plane];
                let pixels = block * BLOCK_PIXELS..((block + 1) * BLOCK_PIXELS).min(plane);
                // SAFETY: units write disjoint pixel ranges of the output; `block_into` writes
                // only inside image `image`'s o x plane values.
                let out_image = out.at(image * self.o * plane);
                unsafe { self.block_into(x, plane, pixels, scratch, out_image) };
            };
            super::threads::for_each_unit(units, scratch, task);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl Conv1x1 {
    /// One block of pixels of one image: `x` its `c x plane` input, `out` its `o x plane`
    /// output.
    ///
    /// # Safety
    /// `out` points at `o x plane` writable values that no other task writes in `pixels`.
    unsafe fn block_into(
        &self,
        x: &[f32],
        plane: usize,
        pixels: std::ops::Range<usize>,
        scratch: &mut [f32],
        out: *mut f32,
    ) {
        let at = out.wrapping_add(pixels.start);
        // SAFETY: the caller's contract, output pixel p at `at + o * plane + (p - start)`.
        unsafe { self.block_strided(x, plane, pixels, scratch, at, plane) }
    }

    /// Pixels `pixels` of `x` (`c` rows `x_plane` apart) into `out`: output channel `o`'s
    /// values at `out + o * out_plane`, from the block's first pixel on. `scratch` holds at
    /// least `c x` [`BLOCK_PIXELS`] values; a block is at most that many pixels.
    ///
    /// # Safety
    /// `out` points at `o` runs of `pixels.len()` writable values `out_plane` apart that no other
    /// task writes.
    pub(super) unsafe fn block_strided(
        &self,
        x: &[f32],
        x_plane: usize,
        pixels: std::ops::Range<usize>,
        scratch: &mut [f32],
        out: *mut f32,
        out_plane: usize,
    ) {
        debug_assert!(pixels.len() <= BLOCK_PIXELS && scratch.len() >= self.c * BLOCK_PIXELS);
        #[cfg(target_arch = "x86_64")]
        {
            use super::vector_math::{isa, Isa};
            // SAFETY: the kernels run where the CPU has their instructions (probed); the
            // caller's contract for `out`.
            match isa() {
                Isa::Avx512 => {
                    return unsafe {
                        self.block_avx512(x, x_plane, pixels, scratch, out, out_plane)
                    }
                }
                Isa::Avx2Fma => {
                    return unsafe { self.block_avx2(x, x_plane, pixels, scratch, out, out_plane) }
                }
                Isa::Baseline => {}
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = scratch;
        // SAFETY: the caller's contract.
        unsafe { self.block_generic(x, x_plane, pixels, out, out_plane) }
    }

    /// Plain arithmetic, for the tests on any CPU.
    unsafe fn block_generic(
        &self,
        x: &[f32],
        plane: usize,
        pixels: std::ops::Range<usize>,
        out: *mut f32,
        out_plane: usize,
    ) {
        for o in 0..self.o {
            let w = &self.weights[o * self.c..(o + 1) * self.c];
            for (i, p) in pixels.clone().enumerate() {
                let mut acc = 0f32;
                for (ch, &wv) in w.iter().enumerate() {
                    acc = wv.mul_add(x[ch * plane + p], acc);
                }
                let v = acc + self.bias[o];
                // SAFETY: the caller's contract.
                unsafe {
                    *out.add(o * out_plane + i) = if self.gelu { gelu::<Fused>(v) } else { v }
                };
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn block_avx512(
        &self,
        x: &[f32],
        plane: usize,
        pixels: std::ops::Range<usize>,
        scratch: &mut [f32],
        out: *mut f32,
        out_plane: usize,
    ) {
        // SAFETY: the caller's contract; AVX-512F is enabled here.
        unsafe { self.block_packed::<Avx512Tile>(x, plane, pixels, scratch, out, out_plane) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_avx2(
        &self,
        x: &[f32],
        plane: usize,
        pixels: std::ops::Range<usize>,
        scratch: &mut [f32],
        out: *mut f32,
        out_plane: usize,
    ) {
        // SAFETY: the caller's contract; AVX2 and FMA are enabled here.
        unsafe { self.block_packed::<Avx2Tile>(x, plane, pixels, scratch, out, out_plane) }
    }

    /// Packs the block's pixels into panels of [`TILE_PIXELS`] and runs tile kernel `T` over
    /// them, [`TILE_CHANNELS`] output channels at a time.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn block_packed<T: PixelTile>(
        &self,
        x: &[f32],
        plane: usize,
        pixels: std::ops::Range<usize>,
        scratch: &mut [f32],
        out: *mut f32,
        out_plane: usize,
    ) {
        let c = self.c;
        let len = pixels.len();
        let panels = len.div_ceil(TILE_PIXELS);
        // Pack: panel q holds c rows of TILE_PIXELS pixels, zero past the block's end.
        // (Whole panels as fixed-size copies: a `memcpy` call per 128 bytes cost more than the
        // copy.)
        let whole = len / TILE_PIXELS;
        for ch in 0..c {
            let row = &x[ch * plane + pixels.start..ch * plane + pixels.end];
            for q in 0..whole {
                let at = (q * c + ch) * TILE_PIXELS;
                let dst: &mut [f32; TILE_PIXELS] =
                    (&mut scratch[at..at + TILE_PIXELS]).try_into().unwrap();
                *dst = row[q * TILE_PIXELS..(q + 1) * TILE_PIXELS]
                    .try_into()
                    .unwrap();
            }
            for q in whole..panels {
                let dst = &mut scratch[(q * c + ch) * TILE_PIXELS..(q * c + ch + 1) * TILE_PIXELS];
                let src = &row[q * TILE_PIXELS..((q + 1) * TILE_PIXELS).min(len)];
                dst[..src.len()].copy_from_slice(src);
                dst[src.len()..].fill(0.0);
            }
        }
        #[repr(C, align(64))]
        struct Lines([f32; TILE_CHANNELS * TILE_PIXELS]);
        let mut tile = Lines([0f32; TILE_CHANNELS * TILE_PIXELS]);
        let tile = &mut tile.0;
        for q in 0..panels {
            let b = scratch[q * c * TILE_PIXELS..].as_ptr();
            let width = TILE_PIXELS.min(len - q * TILE_PIXELS);
            for t in 0..self.o.div_ceil(TILE_CHANNELS) {
                let a = self.weights[t * TILE_CHANNELS * c..].as_ptr();
                let bias = self.bias[t * TILE_CHANNELS..].as_ptr();
                // SAFETY: `a` holds TILE_CHANNELS rows of c weights (padded), `bias`
                // TILE_CHANNELS values, `b` c rows of TILE_PIXELS, `tile` TILE_CHANNELS rows of
                // TILE_PIXELS.
                unsafe { T::tile(a, c, b, bias, tile.as_mut_ptr()) };
                let rows = TILE_CHANNELS.min(self.o - t * TILE_CHANNELS);
                for r in 0..rows {
                    let o = t * TILE_CHANNELS + r;
                    let src = &mut tile[r * TILE_PIXELS..r * TILE_PIXELS + width];
                    if self.gelu {
                        for v in src.iter_mut() {
                            *v = gelu::<Fused>(*v);
                        }
                    }
                    // SAFETY: the caller's contract: row o, pixels of this block.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            out.add(o * out_plane + q * TILE_PIXELS),
                            width,
                        )
                    };
                    if width == TILE_PIXELS {
                        let dst: &mut [f32; TILE_PIXELS] = dst.try_into().unwrap();
                        *dst = (&*src).try_into().unwrap();
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            }
        }
    }
}

/// A register tile: `tile[r][0..TILE_PIXELS] = Σ_ch a[r][ch] · b[ch][0..TILE_PIXELS] + bias[r]`
/// for [`TILE_CHANNELS`] rows, accumulated in channel order (the same bits in every kernel).
#[cfg(target_arch = "x86_64")]
trait PixelTile {
    /// # Safety
    /// `a` holds TILE_CHANNELS rows of `c` values, `b` `c` rows of TILE_PIXELS, `bias`
    /// TILE_CHANNELS values, `tile` TILE_CHANNELS x TILE_PIXELS writable values; the CPU has the
    /// kernel's instructions.
    unsafe fn tile(a: *const f32, c: usize, b: *const f32, bias: *const f32, tile: *mut f32);
}

/// Two 512-bit accumulators per channel.
#[cfg(target_arch = "x86_64")]
struct Avx512Tile;

#[cfg(target_arch = "x86_64")]
impl PixelTile for Avx512Tile {
    #[inline(always)]
    unsafe fn tile(a: *const f32, c: usize, b: *const f32, bias: *const f32, tile: *mut f32) {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract.
        unsafe {
            let zero = _mm512_setzero_ps();
            let mut acc = [[zero; 2]; TILE_CHANNELS];
            for kk in 0..c {
                let b0 = _mm512_loadu_ps(b.add(kk * TILE_PIXELS));
                let b1 = _mm512_loadu_ps(b.add(kk * TILE_PIXELS + 16));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r * c + kk));
                    acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let bias = _mm512_set1_ps(*bias.add(r));
                let dst = tile.add(r * TILE_PIXELS);
                _mm512_storeu_ps(dst, _mm512_add_ps(acc[0], bias));
                _mm512_storeu_ps(dst.add(16), _mm512_add_ps(acc[1], bias));
            }
        }
    }
}

/// The 32 pixels as two halves of 16, each two 256-bit accumulators per channel (twelve of the
/// sixteen registers).
#[cfg(target_arch = "x86_64")]
struct Avx2Tile;

#[cfg(target_arch = "x86_64")]
impl PixelTile for Avx2Tile {
    #[inline(always)]
    unsafe fn tile(a: *const f32, c: usize, b: *const f32, bias: *const f32, tile: *mut f32) {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract.
        unsafe {
            for half in [0, 16] {
                let zero = _mm256_setzero_ps();
                let mut acc = [[zero; 2]; TILE_CHANNELS];
                for kk in 0..c {
                    let b0 = _mm256_loadu_ps(b.add(kk * TILE_PIXELS + half));
                    let b1 = _mm256_loadu_ps(b.add(kk * TILE_PIXELS + half + 8));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let av = _mm256_set1_ps(*a.add(r * c + kk));
                        acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                        acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let bias = _mm256_set1_ps(*bias.add(r));
                    let dst = tile.add(r * TILE_PIXELS + half);
                    _mm256_storeu_ps(dst, _mm256_add_ps(acc[0], bias));
                    _mm256_storeu_ps(dst.add(8), _mm256_add_ps(acc[1], bias));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::tract_linalg::multithread::Executor;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 2_654_435_761usize) % 10_007) as f32 / 5000.0 - 1.0)
            .collect()
    }

    fn reference(
        x: &[f32],
        shape: [usize; 4],
        w: &[f32],
        b: &[f32],
        o: usize,
        gelu_after: bool,
    ) -> Vec<f32> {
        let [n, c, h, wd] = shape;
        let plane = h * wd;
        let mut out = vec![0f32; n * o * plane];
        for img in 0..n {
            for oc in 0..o {
                for p in 0..plane {
                    let mut acc = b[oc] as f64;
                    for ch in 0..c {
                        acc += w[oc * c + ch] as f64 * x[(img * c + ch) * plane + p] as f64;
                    }
                    let v = acc as f32;
                    out[(img * o + oc) * plane + p] = if gelu_after {
                        gelu::<crate::engine::vector_math::Baseline>(v)
                    } else {
                        v
                    };
                }
            }
        }
        out
    }

    #[test]
    fn conv1x1_matches_the_definition() {
        for (shape, o, gelu_after) in [
            ([1, 64, 16, 20], 256, true),
            ([2, 7, 3, 5], 13, false),
            ([1, 256, 9, 40], 64, false),
            ([1, 3, 1, 1], 1, true),
        ] {
            let c = shape[1];
            let x = values(shape.iter().product(), 1);
            let w = values(o * c, 2);
            let b = values(o, 3);
            let want = reference(&x, shape, &w, &b, o, gelu_after);
            let op = Conv1x1::new(&w, &b, o, c, gelu_after);
            let input = || tvec![Tensor::from_shape(&shape, &x).unwrap().into_tvalue()];
            let got = crate::engine::fast_ops::tests::run(op.clone(), input());
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{shape:?} → {o}: {g} vs {w}"
                );
            }
            let pooled = tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope(
                Executor::multithread(2),
                || crate::engine::fast_ops::tests::run(op.clone(), input()),
            );
            assert_eq!(got, pooled, "{shape:?}: 2 threads differ from 1");
        }
    }

    #[test]
    fn tinyvit_pointwise_convolutions_are_rewritten() {
        let mut proto = crate::engine::fast_ops::tests::default_encoder_proto();
        let graph = proto.graph.as_mut().unwrap();
        super::super::depthwise::fuse(graph);
        // layers.0: conv1 and conv3 of 2 MBConv blocks; conv1 and conv3 of 3 patch mergings;
        // the neck's first. conv1 of each takes its GELU in (5).
        assert_eq!(fuse(graph), 11);
        let with_gelu = graph
            .node
            .iter()
            .filter(|n| {
                n.op_type == OP_TYPE && n.attribute.iter().any(|a| a.name == "gelu" && a.i == 1)
            })
            .count();
        assert_eq!(with_gelu, 5);
    }
}
