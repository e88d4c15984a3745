//! Sinks: where masks go. Every sink takes the same [`MaskEvent`]; several run at once, fed by one
//! sink thread, so a slow or failing sink is reported and counted but never stops the pipeline.
//!
//! One file per sink, each owning its `[sinks.NAME]` config table; [`SINKS`] is the registry
//! that `samrt run` opens them from.

use std::fmt;

use serde::{Deserialize, Serialize};

pub use super::event::{json_line, MaskEvent};

pub mod display;
pub mod files;
pub mod mqtt;
pub mod stream;

use display::{DisplayConfig, DisplaySink};
use files::{FilesSink, FilesSinkConfig};
use mqtt::{MqttCommands, MqttConfig, MqttSink};
use stream::{StreamSink, StreamSinkConfig};

/// Why a sink could not take an event. The event is counted as lost for that sink only.
#[derive(Debug)]
pub struct SinkError {
    pub sink: String,
    pub reason: String,
}

impl SinkError {
    pub fn new(sink: impl Into<String>, reason: impl fmt::Display) -> Self {
        SinkError {
            sink: sink.into(),
            reason: reason.to_string(),
        }
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sink {}: {}", self.sink, self.reason)
    }
}

impl std::error::Error for SinkError {}

/// A destination for masks. `emit` is called on the sink thread for every event and must not
/// block for long (queue inside if the destination is slow); `flush` is called once at shutdown
/// and may wait a bounded time for queued events to go out.
pub trait Sink: Send {
    /// A short name for logs and stats ("files", "mqtt", ...).
    fn name(&self) -> &str;
    /// Takes one event.
    fn emit(&mut self, event: &MaskEvent) -> Result<(), SinkError> {
        self.emit_line(event, &json_line(&event.to_json()))
    }
    /// Takes one event whose JSON record the service serialized once for every sink
    /// ([`json_line`]: the record and a newline). Sinks that send the record use `line`.
    fn emit_line(&mut self, event: &MaskEvent, line: &[u8]) -> Result<(), SinkError>;
    /// Writes out everything queued; called at shutdown.
    fn flush(&mut self) -> Result<(), SinkError>;
    /// Events this sink accepted but had to drop since the start (full queue, broker down past
    /// the queue's capacity, ...). Reported in the stats.
    fn dropped(&self) -> u64 {
        0
    }
}

/// `[sinks]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct SinksConfig {
    pub files: FilesSinkConfig,
    pub stream: StreamSinkConfig,
    pub mqtt: MqttConfig,
    pub display: DisplayConfig,
}

impl SinksConfig {
    /// Checks the values of every sink's table that serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        self.stream.tcp_addrs()?;
        self.files.validate()?;
        if self.mqtt.enabled {
            self.mqtt
                .validate()
                .map_err(|e| format!("[sinks.mqtt] {e}"))?;
        }
        if self.display.enabled {
            self.display
                .validate()
                .map_err(|e| format!("[sinks.display] {e}"))?;
        }
        Ok(())
    }
}

/// The sinks `samrt run` opened, and MQTT's command topic when it takes commands.
#[derive(Default)]
pub struct OpenSinks {
    pub sinks: Vec<Box<dyn Sink>>,
    /// `[sinks.mqtt] commands`: requests from the broker, answered like the control socket's.
    pub mqtt_commands: Option<MqttCommands>,
}

/// One row of [`SINKS`].
#[derive(Debug, Clone, Copy)]
pub struct SinkBackend {
    /// Its table: `[sinks.NAME]`.
    pub name: &'static str,
    /// Whether the config turns it on.
    pub enabled: fn(&SinksConfig) -> bool,
    /// Opens it from its table; a failure is a start-up error naming the table.
    pub open: fn(&SinksConfig, &mut OpenSinks) -> Result<(), String>,
}

/// Every sink, in the order each event reaches them.
pub const SINKS: &[SinkBackend] = &[
    SinkBackend {
        name: "files",
        enabled: |s| s.files.enabled,
        open: |s, open| {
            open.sinks.push(Box::new(FilesSink::open(&s.files)?));
            Ok(())
        },
    },
    SinkBackend {
        name: "stream",
        enabled: |s| !s.stream.unix.is_empty() || !s.stream.tcp.is_empty(),
        open: |s, open| {
            open.sinks.push(Box::new(StreamSink::open(&s.stream)?));
            Ok(())
        },
    },
    SinkBackend {
        name: "mqtt",
        enabled: |s| s.mqtt.enabled,
        open: |s, open| {
            let mut mqtt = MqttSink::start(&s.mqtt);
            if let Some(failure) = mqtt.failure() {
                return Err(failure.to_string());
            }
            open.mqtt_commands = mqtt.take_commands();
            open.sinks.push(Box::new(mqtt));
            Ok(())
        },
    },
    SinkBackend {
        name: "display",
        enabled: |s| s.display.enabled,
        open: |s, open| {
            let display =
                DisplaySink::open(&s.display).map_err(|e| format!("[sinks.display] {e}"))?;
            open.sinks.push(Box::new(display));
            Ok(())
        },
    },
];

/// Opens every sink the config turns on, in [`SINKS`] order.
pub fn open_sinks(config: &SinksConfig) -> Result<OpenSinks, String> {
    let mut open = OpenSinks::default();
    for backend in SINKS {
        if (backend.enabled)(config) {
            (backend.open)(config, &mut open)?;
        }
    }
    Ok(open)
}
