//! `samrt run`: the on-board service. Frames from a [`source`] go to the encoder (newest frame
//! wins), prompts from the [`button`], fixed points, the detector and the [`control`] socket are
//! decoded against the newest embedding, and masks go out through every configured [`sink`]:
//! [`files_sink`], [`stream`], [`mqtt`], [`display`]. [`runtime`] wires the threads together.

pub mod button;
pub mod config;
pub mod control;
pub mod display;
pub mod files_sink;
pub mod mqtt;
pub mod notify;
pub mod priority;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod stats;
pub mod stream;
pub mod v4l2;

pub use config::{load_config, ServiceConfig};
pub use runtime::Service;
