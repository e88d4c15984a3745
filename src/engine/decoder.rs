//! SAM's prompt encoder + mask decoder ([`MaskDecoder`]): the graph cut to return every mask
//! token, its plans specialized per prompt shape and kept, the image stage split off and cached on
//! the embedding ([`EmbeddingTensor`]), and prompts decoded in batches.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;

use super::encoder::{profile_plan, OpTiming};
use super::onnx::{load_guarded, model_error, parse_onnx, parse_onnx_with, shape_of, Fusions};
use super::{threads, to_f32_vec, token_attention, Plan};
use crate::error::{Error, Result};
use crate::sam_sizes::{EMBEDDING_CHANNELS, EMBEDDING_SIZE, LOW_RES_MASK_LEN, LOW_RES_MASK_SIZE};

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
                    "unexpected decoder outputs: masks {masks_shape:?} and IoU {iou_shape:?}, expected [1, T, {size}, {size}] and [1, T]"
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sam_sizes::EMBEDDING_LEN;

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
