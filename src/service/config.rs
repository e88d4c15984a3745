//! The service's TOML configuration: one schema, every key documented in
//! `boards/samrt.example.toml` (a test checks that file against this schema). Unknown keys are
//! warned about and ignored; invalid values are errors that name the key and the fix.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::buttons::ButtonConfig;
use super::fields::non_negative;
use super::sinks::SinksConfig;
use super::sources::SourceConfig;

/// The whole configuration of `samrt run`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ServiceConfig {
    pub model: ModelConfig,
    pub source: SourceConfig,
    pub prompts: PromptsConfig,
    pub control: ControlConfig,
    pub sinks: SinksConfig,
    pub service: RuntimeConfig,
}

/// `[model]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ModelConfig {
    /// Model directory (manifest.json, encoder, decoder); "" = the default model.
    pub dir: String,
    /// Precision listed in the model's manifest ("fp32", "int8"); "" = the manifest's default.
    pub precision: String,
    /// Threads for tract's matrix products and for decoding; 0 = every CPU.
    pub threads: usize,
}

/// `[prompts]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct PromptsConfig {
    /// Return SAM's three ranked masks per prompt instead of one.
    pub multimask: bool,
    pub fixed: FixedPromptsConfig,
    pub detector: DetectorPromptsConfig,
    pub button: ButtonConfig,
    pub everything: EverythingConfig,
}

/// `[prompts.fixed]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct FixedPromptsConfig {
    /// Foreground points [x, y] in frame pixels, decoded together as one prompt.
    pub points: Vec<[f64; 2]>,
    /// Prompt on every Nth encoded frame; 0 = off.
    pub every_n_frames: u64,
}

/// `[prompts.detector]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct DetectorPromptsConfig {
    /// Run the detector on encoded frames and segment each box.
    pub enabled: bool,
    /// Detector directory (manifest.json, ONNX, labels); "" = the bundled SSD-MobileNetV2.
    pub dir: String,
    /// Keep boxes whose class score is at least this.
    pub score_threshold: f32,
    /// Only these labels ([] = all).
    pub classes: Vec<String>,
    /// Segment at most this many boxes per frame (highest scores first).
    pub max_boxes: usize,
    /// Run on every Nth encoded frame (1 = every frame).
    pub every_n_frames: u64,
}

impl Default for DetectorPromptsConfig {
    fn default() -> Self {
        DetectorPromptsConfig {
            enabled: false,
            dir: String::new(),
            score_threshold: crate::detector::DEFAULT_SCORE_THRESHOLD,
            classes: Vec::new(),
            max_boxes: 10,
            every_n_frames: 1,
        }
    }
}

/// `[prompts.everything]`: a long press segments everything (Meta's automatic mask generator).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct EverythingConfig {
    /// Grid points per side (Meta's default 32 takes minutes on a Pi; 16 is a quarter of that).
    pub points_per_side: usize,
    /// Crop layers (Meta's default 0).
    pub crop_n_layers: usize,
}

impl Default for EverythingConfig {
    fn default() -> Self {
        EverythingConfig {
            points_per_side: 16,
            crop_n_layers: 0,
        }
    }
}

/// `[control]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ControlConfig {
    /// Unix socket for line-delimited JSON requests from other processes; "" = off.
    pub socket: String,
    /// Clients served at once; more are answered with an error and closed.
    pub max_clients: usize,
    /// How long a request waits for its masks before it is answered with an error.
    pub reply_timeout_s: f64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: String::new(),
            max_clients: 8,
            reply_timeout_s: 120.0,
        }
    }
}

/// `[service]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct RuntimeConfig {
    /// Seconds between stats lines in the log (and STATUS= to systemd); 0 = off.
    pub stats_interval_s: f64,
    /// Prompts waiting to be decoded; more are refused (and reported) rather than queued.
    pub prompt_queue: usize,
    /// Mask events waiting for the sinks.
    pub sink_queue: usize,
    /// Wait this long for a source that is gone before trying again (doubles up to 30 s).
    pub reconnect_initial_ms: u64,
    /// How long a prompt waits for the first frame to be encoded.
    pub first_frame_timeout_s: f64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            stats_interval_s: 60.0,
            prompt_queue: 64,
            sink_queue: 64,
            reconnect_initial_ms: 500,
            first_frame_timeout_s: 60.0,
        }
    }
}

/// A parsed configuration with the keys that were ignored.
#[derive(Debug)]
pub struct LoadedConfig {
    pub config: ServiceConfig,
    /// Dotted paths of unknown keys (warned about, ignored).
    pub unknown_keys: Vec<String>,
}

/// Parses a configuration from TOML text; `base` resolves relative paths (the config file's
/// directory).
pub fn parse_config(text: &str, base: &Path) -> Result<LoadedConfig, String> {
    let deserializer = toml::de::Deserializer::parse(text).map_err(|e| e.to_string())?;
    let mut unknown_keys = Vec::new();
    let mut config: ServiceConfig =
        serde_ignored::deserialize(deserializer, |path| unknown_keys.push(path.to_string()))
            .map_err(|e| e.to_string())?;
    unknown_keys.sort();
    config.resolve_paths(base);
    config.validate()?;
    Ok(LoadedConfig {
        config,
        unknown_keys,
    })
}

/// Reads and parses a configuration file.
pub fn load_config(path: &Path) -> Result<LoadedConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_config(&text, base).map_err(|e| format!("config {}: {e}", path.display()))
}

fn resolve(base: &Path, value: &mut String) {
    if !value.is_empty() && Path::new(value.as_str()).is_relative() {
        *value = base.join(value.as_str()).to_string_lossy().into_owned();
    }
}

impl ServiceConfig {
    /// Makes every relative path relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(base, &mut self.model.dir);
        resolve(base, &mut self.source.files.path);
        resolve(base, &mut self.prompts.detector.dir);
        resolve(base, &mut self.control.socket);
        resolve(base, &mut self.sinks.files.dir);
        resolve(base, &mut self.sinks.stream.unix);
        if self.sinks.display.device != "memory" {
            resolve(base, &mut self.sinks.display.device);
        }
    }

    /// Checks values that serde cannot; the error names the key and what it accepts.
    pub fn validate(&self) -> Result<(), String> {
        self.source.validate()?;
        for (i, p) in self.prompts.fixed.points.iter().enumerate() {
            if !(p[0].is_finite() && p[1].is_finite()) {
                return Err(format!("prompts.fixed.points[{i}] is not a finite [x, y]"));
            }
        }
        if self.prompts.fixed.every_n_frames > 0 && self.prompts.fixed.points.is_empty() {
            return Err(
                "prompts.fixed.every_n_frames is set but prompts.fixed.points is empty".into(),
            );
        }
        if self.prompts.detector.enabled && self.prompts.detector.every_n_frames == 0 {
            return Err("prompts.detector.every_n_frames must be at least 1".into());
        }
        self.prompts
            .button
            .validate()
            .map_err(|e| format!("[prompts.button] {e}"))?;
        if self.prompts.everything.points_per_side == 0 {
            return Err("prompts.everything.points_per_side must be at least 1".into());
        }
        if self.control.max_clients == 0 || self.sinks.stream.max_clients == 0 {
            return Err(
                "control.max_clients and sinks.stream.max_clients must be at least 1".into(),
            );
        }
        non_negative(self.control.reply_timeout_s, "control.reply_timeout_s")?;
        self.sinks.validate()?;
        non_negative(self.service.stats_interval_s, "service.stats_interval_s")?;
        non_negative(
            self.service.first_frame_timeout_s,
            "service.first_frame_timeout_s",
        )?;
        if self.service.prompt_queue == 0 || self.service.sink_queue == 0 {
            return Err("service.prompt_queue and service.sink_queue must be at least 1".into());
        }
        Ok(())
    }
}

/// Dotted paths of every key in a TOML table (tables themselves excluded), for checking that
/// the example config documents the whole schema.
pub fn key_paths(value: &toml::Value) -> BTreeSet<String> {
    fn walk(prefix: &str, value: &toml::Value, out: &mut BTreeSet<String>) {
        if let toml::Value::Table(table) = value {
            for (key, child) in table {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                if child.is_table() {
                    walk(&path, child, out);
                } else {
                    out.insert(path);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk("", value, &mut out);
    out
}

/// Every key of the schema, from the defaults.
pub fn schema_keys() -> BTreeSet<String> {
    key_paths(&toml::Value::try_from(ServiceConfig::default()).expect("the config serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::sinks::stream::StreamSinkConfig;
    use crate::service::sources::SourceKind;

    #[test]
    fn unknown_keys_are_reported_not_fatal() {
        let loaded = parse_config(
            "[source]\nkind = \"synthetic\"\ncolour = 3\n[sinks.files]\ndirr = \"x\"\n",
            Path::new("/etc/samrt"),
        )
        .unwrap();
        assert_eq!(loaded.unknown_keys, ["sinks.files.dirr", "source.colour"]);
        assert_eq!(loaded.config.source.kind, SourceKind::Synthetic);
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = parse_config("[source]\nkind = \"webcam\"\n", Path::new(".")).unwrap_err();
        assert!(err.contains("webcam"), "{err}");
        let err = parse_config("[source]\nkind = \"files\"\n", Path::new(".")).unwrap_err();
        assert!(err.contains("[source.files] path"), "{err}");
        let err = parse_config(
            "[source]\nkind = \"synthetic\"\n[prompts.fixed]\nevery_n_frames = 2\n",
            Path::new("."),
        )
        .unwrap_err();
        assert!(err.contains("prompts.fixed.points"), "{err}");
    }

    #[test]
    fn the_tcp_stream_stays_on_loopback_unless_allowed() {
        let config = |tcp: &str, allow: bool| {
            format!("[source]\nkind = \"synthetic\"\n[sinks.stream]\ntcp = \"{tcp}\"\nallow_remote = {allow}\n")
        };
        for local in ["127.0.0.1:7878", "[::1]:7878", "localhost:7878"] {
            parse_config(&config(local, false), Path::new(".")).unwrap();
        }
        for remote in ["0.0.0.0:7878", "[::]:7878", "192.0.2.7:7878"] {
            let err = parse_config(&config(remote, false), Path::new(".")).unwrap_err();
            assert!(
                err.contains("[sinks.stream] tcp") && err.contains("allow_remote = true"),
                "{err}"
            );
            let loaded = parse_config(&config(remote, true), Path::new(".")).unwrap();
            assert!(loaded.config.sinks.stream.allow_remote);
        }
        let err = parse_config(&config("7878", false), Path::new(".")).unwrap_err();
        assert!(err.contains("HOST:PORT"), "{err}");
        assert!(!StreamSinkConfig::default().allow_remote);
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let loaded = parse_config(
            "[source.files]\npath = \"frames\"\n[sinks.files]\ndir = \"/var/lib/samrt\"\n",
            Path::new("/etc/samrt"),
        )
        .unwrap();
        assert_eq!(loaded.config.source.files.path, "/etc/samrt/frames");
        assert_eq!(loaded.config.sinks.files.dir, "/var/lib/samrt");
    }
}
