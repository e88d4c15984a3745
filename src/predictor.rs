//! The facade: load a SAM-family model once, embed an image once, decode any number of prompts
//! against the cached embedding.
//!
//! ```no_run
//! use samrt::{ModelFiles, Prompt, SamPredictor, MaskOutput};
//! let predictor = SamPredictor::load(&ModelFiles::default_model()?)?;
//! let image = samrt::image_io::load_rgb("photo.jpg".as_ref())?;
//! let embedding = predictor.embed(&image)?;
//! let prediction = predictor.predict(&embedding, &Prompt::point(320.0, 240.0), MaskOutput::Single)?;
//! println!("area {} score {}", prediction.masks[0].mask.area(), prediction.masks[0].iou);
//! # Ok::<(), samrt::Error>(())
//! ```

use image::RgbImage;

use crate::engine::{
    DecodedTokens, DecoderInput, EmbeddingTensor, EncoderOptions, ImageEncoder, MaskDecoder,
};
use crate::error::{Error, Result};
use crate::model::{read_model_file, ModelFiles};
use crate::postprocess::{
    rank_multimask, select_single_mask, stability_score, upscale_logits, Mask, MASK_THRESHOLD,
    STABILITY_SCORE_OFFSET,
};
use crate::preprocess::{preprocess, preprocess_shape, PixelStats, PreprocessedImage, Size};
use crate::prompt::{DecoderPrompt, Prompt};
use crate::sam_sizes::ENCODER_INPUT_SIZE;

/// An image embedding with the sizes needed to map prompts in and masks out.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// 1x256x64x64 values, as the decoder takes them.
    tensor: EmbeddingTensor,
    /// Size of the image the user gave.
    pub original_size: Size,
    /// Size after the longest-side resize to 1024.
    pub input_size: Size,
}

impl Embedding {
    /// The 1x256x64x64 values, channel-major.
    pub fn data(&self) -> &[f32] {
        self.tensor.as_slice()
    }
}

/// Which masks a prediction returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskOutput {
    /// The one mask Meta's single-mask ONNX export returns (`SamOnnxModel.select_masks`).
    Single,
    /// SAM's three masks for ambiguous prompts, ranked by predicted IoU.
    Multimask,
}

/// One mask with its scores.
#[derive(Debug, Clone)]
pub struct PredictedMask {
    /// The mask at the original image size.
    pub mask: Mask,
    /// Its 256x256 low-resolution logits, usable as the next prompt's `mask_input`.
    pub low_res_logits: Vec<f32>,
    /// The decoder's predicted IoU.
    pub iou: f32,
    /// Stability score (offset [`STABILITY_SCORE_OFFSET`]) of the full-resolution logits.
    pub stability: f32,
    /// Which mask token of the decoder it is (0: single-mask token, 1..=3: multimask tokens).
    pub token: usize,
}

/// The masks for one prompt, best first.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub masks: Vec<PredictedMask>,
}

/// A loaded SAM model: encoder and decoder plans, built once.
#[derive(Debug)]
pub struct SamPredictor {
    encoder: ImageEncoder,
    decoder: MaskDecoder,
    model_name: String,
    pixel_stats: PixelStats,
}

impl SamPredictor {
    /// Loads and optimizes both models, checking checksums where `files` carries them.
    pub fn load(files: &ModelFiles) -> Result<Self> {
        let encoder_bytes = read_model_file(&files.encoder, files.encoder_sha256.as_deref())?;
        let options = EncoderOptions {
            f16: files.precision == crate::model::F16,
            ..EncoderOptions::default()
        };
        let encoder = ImageEncoder::from_onnx_bytes_with(&files.encoder, &encoder_bytes, options)?;
        drop(encoder_bytes);
        let decoder_bytes = read_model_file(&files.decoder, files.decoder_sha256.as_deref())?;
        let decoder = MaskDecoder::from_onnx_bytes(&files.decoder, &decoder_bytes)?;
        Ok(SamPredictor {
            encoder,
            decoder,
            model_name: files.name.clone(),
            pixel_stats: files.pixel_stats,
        })
    }

    /// The model's name.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Preprocesses an RGB image for the encoder; fails for images too thin to resize.
    pub fn preprocess(&self, image: &RgbImage) -> Result<PreprocessedImage> {
        let original = Size::new(image.height() as usize, image.width() as usize);
        let input = preprocess_shape(original, ENCODER_INPUT_SIZE);
        if input.width == 0 || input.height == 0 {
            return Err(Error::UnsupportedImage(format!(
                "a {}x{} image is too thin: its short side would be resized to 0 pixels (crop or pad it first)",
                original.width, original.height
            )));
        }
        Ok(preprocess(image, &self.pixel_stats))
    }

    /// Runs the image encoder on a preprocessed image, then the decoder's per-image stage (see
    /// [`MaskDecoder`]), so every prompt on the embedding costs the same.
    pub fn encode(&self, image: &PreprocessedImage) -> Result<Embedding> {
        self.encode_yielding(image, &|| {})
    }

    /// Encodes like [`Self::encode`], calling `before_op` before each operator of the encoder
    /// and before the decoder's per-image stage: the service holds the encoder there while a
    /// prompt is decoded, so that presses never wait for a whole encode.
    pub fn encode_yielding(
        &self,
        image: &PreprocessedImage,
        before_op: &dyn Fn(),
    ) -> Result<Embedding> {
        let values = self.encoder.embed_yielding(&image.tensor, before_op)?;
        let tensor = EmbeddingTensor::new(&values)?;
        before_op();
        self.decoder.prepare(&tensor)?;
        Ok(Embedding {
            tensor,
            original_size: image.original_size,
            input_size: image.input_size,
        })
    }

    /// Runs the image encoder once, timing each operator of its plan (`samrt bench --profile`).
    pub fn profile_encoder(
        &self,
        image: &PreprocessedImage,
    ) -> Result<Vec<crate::engine::OpTiming>> {
        self.encoder.profile(&image.tensor)
    }

    /// Runs the decoder once on `prompt`, timing each operator of its plan (`samrt bench decoder
    /// --profile`).
    pub fn profile_decoder(
        &self,
        embedding: &Embedding,
        prompt: &Prompt,
    ) -> Result<Vec<crate::engine::OpTiming>> {
        prompt.validate(embedding.original_size)?;
        let decoder_prompt = prompt.to_decoder(embedding.original_size, embedding.input_size);
        self.decoder.profile(&DecoderInput {
            embedding: &embedding.tensor,
            point_coords: &decoder_prompt.point_coords,
            point_labels: &decoder_prompt.point_labels,
            mask_input: prompt.mask_input.as_deref(),
        })
    }

    /// Preprocesses and encodes an image: the once-per-frame step.
    pub fn embed(&self, image: &RgbImage) -> Result<Embedding> {
        self.encode(&self.preprocess(image)?)
    }

    /// Validates a prompt and runs the decoder: the once-per-prompt step.
    pub fn decode(
        &self,
        embedding: &Embedding,
        prompt: &Prompt,
    ) -> Result<(DecoderPrompt, DecodedTokens)> {
        prompt.validate(embedding.original_size)?;
        let decoder_prompt = prompt.to_decoder(embedding.original_size, embedding.input_size);
        let tokens = self.decoder.decode(&DecoderInput {
            embedding: &embedding.tensor,
            point_coords: &decoder_prompt.point_coords,
            point_labels: &decoder_prompt.point_labels,
            mask_input: prompt.mask_input.as_deref(),
        })?;
        Ok((decoder_prompt, tokens))
    }

    /// Validates and decodes a set of prompts on one embedding, as [`Self::decode`] would one
    /// by one: prompts of one shape share decoder calls (`MaskDecoder::decode_batch`). Results
    /// are in prompt order; the first invalid prompt is the error.
    pub fn decode_batch(
        &self,
        embedding: &Embedding,
        prompts: &[Prompt],
    ) -> Result<Vec<(DecoderPrompt, DecodedTokens)>> {
        let decoder_prompts: Vec<DecoderPrompt> = prompts
            .iter()
            .map(|prompt| {
                prompt.validate(embedding.original_size)?;
                Ok(prompt.to_decoder(embedding.original_size, embedding.input_size))
            })
            .collect::<Result<_>>()?;
        let inputs: Vec<DecoderInput<'_>> = prompts
            .iter()
            .zip(&decoder_prompts)
            .map(|(prompt, decoder_prompt)| DecoderInput {
                embedding: &embedding.tensor,
                point_coords: &decoder_prompt.point_coords,
                point_labels: &decoder_prompt.point_labels,
                mask_input: prompt.mask_input.as_deref(),
            })
            .collect();
        let tokens = self.decoder.decode_batch(&inputs)?;
        Ok(decoder_prompts.into_iter().zip(tokens).collect())
    }

    /// Decodes a set of prompts together ([`Self::decode_batch`]) and postprocesses each one's
    /// masks, as [`Self::predict`] would one by one.
    pub fn predict_batch(
        &self,
        embedding: &Embedding,
        prompts: &[Prompt],
        output: MaskOutput,
    ) -> Result<Vec<Prediction>> {
        self.decode_batch(embedding, prompts)?
            .iter()
            .map(|(decoder_prompt, tokens)| {
                self.postprocess(embedding, decoder_prompt.num_points(), tokens, output)
            })
            .collect()
    }

    /// Turns decoder tokens into masks at the original image size.
    pub fn postprocess(
        &self,
        embedding: &Embedding,
        num_points: usize,
        tokens: &DecodedTokens,
        output: MaskOutput,
    ) -> Result<Prediction> {
        let chosen = match output {
            MaskOutput::Single => vec![select_single_mask(&tokens.iou_predictions, num_points)],
            MaskOutput::Multimask if tokens.tokens() < 2 => {
                return Err(Error::Inference(
                    "this decoder returns a single mask token; multimask output needs a decoder that exposes all of SAM's mask tokens"
                        .into(),
                ))
            }
            MaskOutput::Multimask => rank_multimask(&tokens.iou_predictions),
        };
        let masks = chosen
            .into_iter()
            .map(|token| {
                let low_res = tokens.logits(token);
                let logits = upscale_logits(low_res, embedding.input_size, embedding.original_size);
                PredictedMask {
                    mask: Mask::from_logits(&logits, embedding.original_size, MASK_THRESHOLD),
                    stability: stability_score(&logits, MASK_THRESHOLD, STABILITY_SCORE_OFFSET),
                    low_res_logits: low_res.to_vec(),
                    iou: tokens.iou_predictions[token],
                    token,
                }
            })
            .collect();
        Ok(Prediction { masks })
    }

    /// Decodes a prompt and postprocesses its masks.
    pub fn predict(
        &self,
        embedding: &Embedding,
        prompt: &Prompt,
        output: MaskOutput,
    ) -> Result<Prediction> {
        let (decoder_prompt, tokens) = self.decode(embedding, prompt)?;
        self.postprocess(embedding, decoder_prompt.num_points(), &tokens, output)
    }
}
