//! The sizes SAM's models are built for, in one place: the encoder's square input, the image
//! embedding, the decoder's low-resolution masks. Every SAM model samrt runs has them (a model
//! manifest's `image_size` is checked against [`ENCODER_INPUT_SIZE`], the engine checks the
//! encoder's output and the decoder's masks at load). No tract here: the engine re-exports them.

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
