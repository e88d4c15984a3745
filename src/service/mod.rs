//! `samrt run`: the on-board service. Frames from a [`sources`] backend go to the encoder (newest
//! frame wins), prompts from the [`buttons`], fixed points, the detector, the [`control`] socket
//! and MQTT commands are decoded against the newest embedding ([`jobs`]), and each [`event`] goes
//! out through every configured [`sinks`] backend (files, stream, MQTT, display).
//!
//! Modules depend one way: [`runtime`] wires the threads together from [`sources`], [`buttons`],
//! [`control`], [`jobs`] and [`sinks`]; those share what flows between the threads through
//! [`pipeline`] and [`event`]; [`config`] gathers the backends' own config tables.

pub mod buttons;
pub mod config;
pub mod control;
pub mod event;
pub mod fields;
pub mod jobs;
pub mod notify;
pub mod pipeline;
pub mod priority;
pub mod runtime;
pub mod sinks;
pub mod sources;
pub mod stats;

pub use config::{load_config, ServiceConfig};
pub use runtime::Service;
