//! `samrt run`: the on-board service. Frames from a [`source`] go to the encoder (newest frame
//! wins), prompts from the [`button`], fixed points, the detector and the [`control`] socket are
//! decoded against the newest embedding, and masks go out through every configured [`sink`].

pub mod button;
pub mod display;
pub mod mqtt;
pub mod sink;
pub mod source;
pub mod v4l2;
