//! The push button: a short press prompts the decoder with the configured points, a long press
//! segments everything.
//!
//! Two halves, joined by a channel:
//!
//! * A **backend** ([`start_button`], chosen by `[button] backend`) turns level changes of the
//!   line into [`ButtonEdge`]s and only sends them on a [`SyncSender`]. Hardware callbacks do
//!   nothing else: no debouncing, no locking, no logging, no allocation, no blocking (a full
//!   channel drops the edge).
//! * The **receiving side** feeds the edges to a [`Debouncer`], pure logic with no clock of its
//!   own, which filters contact bounce and classifies each press as [`PressKind::Short`] or
//!   [`PressKind::Long`] when the button is released.
//!
//! Edge times are on one monotonic clock for every backend: the kernel's `CLOCK_MONOTONIC`, the
//! clock GPIO edge events are stamped with (uAPI v2 default), and the clock [`monotonic_now`]
//! reads, which the [`SoftwareButton`] uses.
//!
//! | backend    | feature     | what                                                            |
//! |------------|-------------|-----------------------------------------------------------------|
//! | `none`     | -           | no button (the default)                                         |
//! | `software` | -           | presses made by code: tests, the control socket                 |
//! | `rppal`    | `rppal`     | Raspberry Pi GPIO (BCM pin number), interrupt on both edges     |
//! | `cdev`     | `gpio-cdev` | Linux GPIO character device (Jetson, any Linux): chip + line    |
//!
//! A backend whose feature is off keeps its place in [`BUTTON_BACKENDS`] and fails in
//! [`start_button`] with an error naming the feature to rebuild with.
//!
//! Each started backend is a [`Button`] (dropping it stops it), started by its
//! [`BUTTON_BACKENDS`] row; a failure is a [`ButtonError`] that names the fix.
//!
//! Files: this one holds the `[button]` config, the trait, the error, the registry and
//! [`start_button`];
//! `debounce.rs` the edges and the [`Debouncer`]; one file per backend (`software.rs`,
//! `rppal_backend.rs`, `cdev_backend.rs`).

use std::fmt;
use std::sync::mpsc::SyncSender;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod debounce;
mod software;

pub use debounce::{monotonic_now, ButtonEdge, ButtonPress, Debouncer, PressKind};
pub use software::SoftwareButton;

/// Which backend reads the button (`[button] backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ButtonBackendKind {
    /// No button.
    #[default]
    None,
    /// Presses made by code (tests, the control socket); no hardware.
    Software,
    /// Raspberry Pi GPIO through rppal (feature `rppal`).
    Rppal,
    /// Linux GPIO character device through gpiocdev (feature `gpio-cdev`).
    Cdev,
}

impl ButtonBackendKind {
    /// The name used in the config.
    pub fn name(self) -> &'static str {
        match self {
            ButtonBackendKind::None => "none",
            ButtonBackendKind::Software => "software",
            ButtonBackendKind::Rppal => "rppal",
            ButtonBackendKind::Cdev => "cdev",
        }
    }
}

impl fmt::Display for ButtonBackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `[button]` section of the config.
///
/// ```toml
/// [button]
/// backend = "rppal"        # none | software | rppal | cdev
/// pin = 17                 # BCM pin (rppal) / line offset on `chip` (cdev)
/// chip = "/dev/gpiochip0"  # cdev only
/// active_low = true        # button to ground, internal pull-up
/// debounce_ms = 30
/// long_press_ms = 1000
/// points = [[320, 240]]    # empty: the frame centre
/// ```
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct ButtonConfig {
    /// Which backend reads the button: `"none"` (no button, the default), `"software"` (presses
    /// only from the control socket), `"rppal"` (Raspberry Pi GPIO; build with
    /// `--features rppal`) or `"cdev"` (Linux GPIO character device, e.g. Jetson; build with
    /// `--features gpio-cdev`).
    pub backend: ButtonBackendKind,
    /// The button's GPIO: the BCM pin number for `rppal` (e.g. 17 is header pin 11), the line
    /// offset on `chip` for `cdev` (list them with `gpioinfo`). Default 17.
    pub pin: u32,
    /// The GPIO character device holding the line, for `cdev` only (list them with
    /// `gpiodetect`). Default `"/dev/gpiochip0"`.
    pub chip: String,
    /// `true` (the default): the button connects the pin to ground and the pin's internal
    /// pull-up is enabled, so pressed reads low. `false`: the button connects the pin to 3.3 V
    /// and the internal pull-down is enabled.
    pub active_low: bool,
    /// Contact bounce filter, in milliseconds: an edge within this time of the last accepted
    /// change is ignored, and so is a press shorter than it. Default 30.
    pub debounce_ms: u64,
    /// A press held at least this long, in milliseconds, is a long press (segment everything);
    /// shorter is a short press (prompt with `points`). Must exceed `debounce_ms`. Default 1000.
    pub long_press_ms: u64,
    /// Pixel points `[x, y]` (frame pixels, origin top left) that a short press prompts with,
    /// all as foreground points of one prompt. Empty (the default): the frame centre.
    pub points: Vec<[f64; 2]>,
}

impl Default for ButtonConfig {
    fn default() -> Self {
        ButtonConfig {
            backend: ButtonBackendKind::None,
            pin: 17,
            chip: "/dev/gpiochip0".to_string(),
            active_low: true,
            debounce_ms: 30,
            long_press_ms: 1000,
            points: Vec::new(),
        }
    }
}

impl ButtonConfig {
    /// The debounce time.
    pub fn debounce(&self) -> Duration {
        Duration::from_millis(self.debounce_ms)
    }

    /// The shortest hold that makes a long press.
    pub fn long_press(&self) -> Duration {
        Duration::from_millis(self.long_press_ms)
    }

    /// A debouncer with this config's times.
    pub fn debouncer(&self) -> Debouncer {
        Debouncer::new(self.debounce(), self.long_press())
    }

    /// Checks the values that do not need hardware; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.long_press_ms <= self.debounce_ms {
            return Err(format!(
                "[button] long_press_ms ({}) must be longer than debounce_ms ({}): every press \
                 lasts at least the debounce time",
                self.long_press_ms, self.debounce_ms
            ));
        }
        match self.backend {
            ButtonBackendKind::Rppal if self.pin > u32::from(u8::MAX) => {
                return Err(format!(
                    "[button] pin = {} is not a BCM pin number (the 40-pin header has GPIO 2 to 27)",
                    self.pin
                ));
            }
            ButtonBackendKind::Cdev if self.chip.trim().is_empty() => {
                return Err(
                    "[button] chip is empty: name the GPIO character device, e.g. \
                     \"/dev/gpiochip0\" (list them with `gpiodetect`)"
                        .to_string(),
                );
            }
            _ => {}
        }
        for (i, [x, y]) in self.points.iter().enumerate() {
            if !(x.is_finite() && y.is_finite() && *x >= 0.0 && *y >= 0.0) {
                return Err(format!(
                    "[button] points[{i}] = [{x}, {y}]: coordinates must be finite frame pixels, \
                     0 or more"
                ));
            }
        }
        Ok(())
    }
}

/// A started button backend. It sends [`ButtonEdge`]s on the channel it was started with (from
/// its hardware callback or reading thread, nothing else) until it is dropped, which stops it.
pub trait Button: Send {
    /// The software button behind it: the `software` backend's; `None` for the others.
    fn software(&self) -> Option<SoftwareButton> {
        None
    }
}

/// Why a button backend could not start, with the fix (a missing feature, chip, permission,
/// a busy line, a bad value in `[button]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ButtonError(pub String);

impl fmt::Display for ButtonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ButtonError {}

impl From<String> for ButtonError {
    fn from(message: String) -> Self {
        ButtonError(message)
    }
}

/// How a backend starts: from `[button]`, sending on the channel.
pub type StartButton =
    fn(&ButtonConfig, SyncSender<ButtonEdge>) -> Result<Box<dyn Button>, ButtonError>;

/// One row of [`BUTTON_BACKENDS`].
#[derive(Debug, Clone, Copy)]
pub struct ButtonBackendInfo {
    pub kind: ButtonBackendKind,
    /// The cargo feature that compiles it in; `None`: always there.
    pub feature: Option<&'static str>,
    /// Whether this build has it.
    pub compiled_in: bool,
    /// One line for `--help` and error messages.
    pub about: &'static str,
    /// Starts it (a backend that is not compiled in fails naming its feature).
    pub start: StartButton,
}

impl ButtonBackendInfo {
    /// The name used in the config.
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }
}

/// Every button backend, in config order, and whether this build has it.
pub const BUTTON_BACKENDS: &[ButtonBackendInfo] = &[
    ButtonBackendInfo {
        kind: ButtonBackendKind::None,
        feature: None,
        compiled_in: true,
        about: "no button",
        start: |_, edges| Ok(Box::new(NoButton(edges))),
    },
    ButtonBackendInfo {
        kind: ButtonBackendKind::Software,
        feature: None,
        compiled_in: true,
        about: "presses from the control socket (and tests); no hardware",
        start: |config, edges| Ok(Box::new(SoftwareButton::new(edges, config.debounce()))),
    },
    ButtonBackendInfo {
        kind: ButtonBackendKind::Rppal,
        feature: Some("rppal"),
        compiled_in: cfg!(feature = "rppal"),
        about: "Raspberry Pi GPIO (BCM pin), Pi 4 and Pi 5",
        start: start_rppal,
    },
    ButtonBackendInfo {
        kind: ButtonBackendKind::Cdev,
        feature: Some("gpio-cdev"),
        compiled_in: cfg!(feature = "gpio-cdev"),
        about: "Linux GPIO character device (chip + line offset): Jetson, any Linux",
        start: start_cdev,
    },
];

/// The [`BUTTON_BACKENDS`] row of `kind`.
pub fn button_backend(kind: ButtonBackendKind) -> &'static ButtonBackendInfo {
    BUTTON_BACKENDS
        .iter()
        .find(|info| info.kind == kind)
        .expect("every ButtonBackendKind has a row in BUTTON_BACKENDS")
}

/// The error of a backend whose feature is off.
fn not_built(feature: &str) -> ButtonError {
    ButtonError(format!(
        "samrt was built without the `{feature}` feature: rebuild with `--features {feature}`"
    ))
}

/// `backend = "none"`: holds the sender so the channel stays open while the handle lives.
struct NoButton(#[allow(dead_code)] SyncSender<ButtonEdge>);

impl Button for NoButton {}

impl Button for SoftwareButton {
    fn software(&self) -> Option<SoftwareButton> {
        Some(self.clone())
    }
}

/// Keeps a started button backend alive. Dropping it stops the backend: the interrupt is
/// unregistered, the reading thread is joined, and the senders it holds are dropped (so the
/// receiver sees the channel disconnect once no [`SoftwareButton`] clone is left either).
pub struct ButtonHandle {
    kind: ButtonBackendKind,
    backend: Box<dyn Button>,
}

impl ButtonHandle {
    /// The backend running.
    pub fn kind(&self) -> ButtonBackendKind {
        self.kind
    }

    /// The backend's config name.
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// The software button, for the `software` backend; `None` for the others.
    pub fn software(&self) -> Option<SoftwareButton> {
        self.backend.software()
    }
}

impl fmt::Debug for ButtonHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ButtonHandle")
            .field("backend", &self.kind.name())
            .finish_non_exhaustive()
    }
}

/// Starts the backend `config.backend` sending [`ButtonEdge`]s on `edges`. The error says what
/// is wrong and how to fix it (a missing feature, a missing chip, a permission, a busy line).
pub fn start_button(
    config: &ButtonConfig,
    edges: SyncSender<ButtonEdge>,
) -> Result<ButtonHandle, ButtonError> {
    config.validate()?;
    let info = button_backend(config.backend);
    if !info.compiled_in {
        return Err(not_built(
            info.feature
                .expect("a backend that can be left out has a feature"),
        ));
    }
    Ok(ButtonHandle {
        kind: config.backend,
        backend: (info.start)(config, edges)?,
    })
}

#[cfg(feature = "rppal")]
fn start_rppal(
    config: &ButtonConfig,
    edges: SyncSender<ButtonEdge>,
) -> Result<Box<dyn Button>, ButtonError> {
    Ok(Box::new(rppal_backend::RppalButton::start(config, edges)?))
}

#[cfg(not(feature = "rppal"))]
fn start_rppal(
    _: &ButtonConfig,
    _: SyncSender<ButtonEdge>,
) -> Result<Box<dyn Button>, ButtonError> {
    Err(not_built("rppal"))
}

#[cfg(feature = "gpio-cdev")]
fn start_cdev(
    config: &ButtonConfig,
    edges: SyncSender<ButtonEdge>,
) -> Result<Box<dyn Button>, ButtonError> {
    Ok(Box::new(cdev_backend::CdevButton::start(config, edges)?))
}

#[cfg(not(feature = "gpio-cdev"))]
fn start_cdev(_: &ButtonConfig, _: SyncSender<ButtonEdge>) -> Result<Box<dyn Button>, ButtonError> {
    Err(not_built("gpio-cdev"))
}

/// How to give a user GPIO access, for permission errors.
#[cfg(any(feature = "rppal", feature = "gpio-cdev"))]
const GPIO_GROUP_FIX: &str = "add the user to the `gpio` group (`sudo usermod -aG gpio $USER`, \
     then log in again), or under systemd give the service `SupplementaryGroups=gpio`";

#[cfg(feature = "rppal")]
mod rppal_backend;

#[cfg(feature = "gpio-cdev")]
mod cdev_backend;

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[cfg(any(feature = "rppal", feature = "gpio-cdev"))]
    fn edge(pressed: bool, at: Duration) -> ButtonEdge {
        ButtonEdge { pressed, at }
    }

    #[test]
    fn config_defaults() {
        let config = ButtonConfig::default();
        assert_eq!(config.backend, ButtonBackendKind::None);
        assert_eq!(config.pin, 17);
        assert_eq!(config.chip, "/dev/gpiochip0");
        assert!(config.active_low);
        assert_eq!(config.debounce(), ms(30));
        assert_eq!(config.long_press(), ms(1000));
        assert!(config.points.is_empty());
        config.validate().unwrap();
        // An empty section is the default.
        let parsed: ButtonConfig = toml::from_str("").unwrap();
        assert_eq!(parsed, config);
    }

    #[test]
    fn config_parses_toml() {
        let config: ButtonConfig = toml::from_str(
            r#"
            backend = "cdev"
            pin = 5
            chip = "/dev/gpiochip1"
            active_low = false
            debounce_ms = 10
            long_press_ms = 800
            points = [[320, 240], [10.5, 20.25]]
            "#,
        )
        .unwrap();
        assert_eq!(config.backend, ButtonBackendKind::Cdev);
        assert_eq!(config.pin, 5);
        assert_eq!(config.chip, "/dev/gpiochip1");
        assert!(!config.active_low);
        assert_eq!(config.debounce_ms, 10);
        assert_eq!(config.long_press_ms, 800);
        assert_eq!(config.points, [[320.0, 240.0], [10.5, 20.25]]);
        config.validate().unwrap();
        // Round trip.
        let again: ButtonConfig = toml::from_str(&toml::to_string(&config).unwrap()).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn config_backend_names_are_lowercase() {
        for info in BUTTON_BACKENDS {
            let config: ButtonConfig =
                toml::from_str(&format!("backend = \"{}\"", info.name())).unwrap();
            assert_eq!(config.backend, info.kind);
            assert_eq!(info.kind.to_string(), info.name());
        }
        assert!(toml::from_str::<ButtonConfig>("backend = \"Rppal\"").is_err());
        assert!(toml::from_str::<ButtonConfig>("backend = \"gpio\"").is_err());
    }

    #[test]
    fn config_validate() {
        let bad = |config: ButtonConfig, needle: &str| {
            let error = config.validate().unwrap_err();
            assert!(
                error.contains(needle),
                "{error:?} should mention {needle:?}"
            );
        };
        let base = ButtonConfig::default;
        bad(
            ButtonConfig {
                long_press_ms: 30,
                ..base()
            },
            "long_press_ms",
        );
        bad(
            ButtonConfig {
                backend: ButtonBackendKind::Rppal,
                pin: 256,
                ..base()
            },
            "pin",
        );
        bad(
            ButtonConfig {
                backend: ButtonBackendKind::Cdev,
                chip: " ".into(),
                ..base()
            },
            "chip",
        );
        bad(
            ButtonConfig {
                points: vec![[1.0, 2.0], [f64::NAN, 3.0]],
                ..base()
            },
            "points[1]",
        );
        bad(
            ButtonConfig {
                points: vec![[-1.0, 2.0]],
                ..base()
            },
            "points[0]",
        );
        // A large line offset is fine for cdev (the chip decides), and an empty chip is fine
        // for rppal (unused).
        ButtonConfig {
            backend: ButtonBackendKind::Cdev,
            pin: 1000,
            ..base()
        }
        .validate()
        .unwrap();
        ButtonConfig {
            backend: ButtonBackendKind::Rppal,
            chip: String::new(),
            ..base()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn backend_table_lists_every_kind_once() {
        let kinds = [
            ButtonBackendKind::None,
            ButtonBackendKind::Software,
            ButtonBackendKind::Rppal,
            ButtonBackendKind::Cdev,
        ];
        assert_eq!(BUTTON_BACKENDS.len(), kinds.len());
        for kind in kinds {
            let rows = BUTTON_BACKENDS.iter().filter(|r| r.kind == kind).count();
            assert_eq!(rows, 1, "{kind}");
            let info = button_backend(kind);
            assert_eq!(info.name(), kind.name());
            if info.feature.is_none() {
                assert!(info.compiled_in, "{kind}");
            }
        }
        assert!(button_backend(ButtonBackendKind::None).compiled_in);
        assert!(button_backend(ButtonBackendKind::Software).compiled_in);
        assert_eq!(
            button_backend(ButtonBackendKind::Rppal).compiled_in,
            cfg!(feature = "rppal")
        );
        assert_eq!(
            button_backend(ButtonBackendKind::Cdev).compiled_in,
            cfg!(feature = "gpio-cdev")
        );
    }

    fn start(config: ButtonConfig) -> (Result<ButtonHandle, String>, Receiver<ButtonEdge>) {
        let (tx, rx) = sync_channel(16);
        (start_button(&config, tx).map_err(|e| e.to_string()), rx)
    }

    #[test]
    fn start_button_validates_the_config() {
        let (result, _rx) = start(ButtonConfig {
            backend: ButtonBackendKind::Software,
            long_press_ms: 10,
            ..ButtonConfig::default()
        });
        assert!(result.unwrap_err().contains("long_press_ms"));
    }

    #[test]
    fn software_backend_end_to_end() {
        let (handle, rx) = start(ButtonConfig {
            backend: ButtonBackendKind::Software,
            ..ButtonConfig::default()
        });
        let handle = handle.unwrap();
        assert_eq!(handle.name(), "software");
        let button = handle
            .software()
            .expect("the software backend has a button");
        let before = monotonic_now();
        button.press(ms(50));
        button.press(ms(1500));
        let edges: Vec<ButtonEdge> = rx.try_iter().collect();
        assert_eq!(edges.len(), 4, "{edges:?}");
        assert!(edges[0].at >= before && edges[0].at <= monotonic_now());
        assert!(edges.windows(2).all(|w| w[0].at < w[1].at), "{edges:?}");
        let mut debouncer = ButtonConfig::default().debouncer();
        let presses: Vec<ButtonPress> = edges
            .into_iter()
            .filter_map(|e| debouncer.feed(e))
            .collect();
        let kinds: Vec<PressKind> = presses.iter().map(|p| p.kind).collect();
        assert_eq!(kinds, [PressKind::Short, PressKind::Long]);
        assert_eq!(presses[0].held, ms(50));
        assert_eq!(presses[1].held, ms(1500));
    }

    #[test]
    fn software_presses_never_collapse() {
        let (handle, rx) = start(ButtonConfig {
            backend: ButtonBackendKind::Software,
            ..ButtonConfig::default()
        });
        let handle = handle.unwrap();
        // Clones share one timeline; a hold shorter than the debounce time is lengthened.
        let a = handle.software().unwrap();
        let b = a.clone();
        a.press(ms(1));
        b.press(Duration::ZERO);
        a.press(ms(40));
        let mut debouncer = ButtonConfig::default().debouncer();
        let held: Vec<Duration> = rx
            .try_iter()
            .filter_map(|e| debouncer.feed(e))
            .map(|p| p.held)
            .collect();
        assert_eq!(held, [ms(30), ms(30), ms(40)]);
    }

    #[test]
    fn none_backend_keeps_the_channel_open_until_dropped() {
        let (handle, rx) = start(ButtonConfig::default());
        let handle = handle.unwrap();
        assert_eq!(handle.kind(), ButtonBackendKind::None);
        assert!(handle.software().is_none());
        assert_eq!(rx.recv_timeout(MS), Err(RecvTimeoutError::Timeout));
        drop(handle);
        assert_eq!(rx.recv_timeout(MS), Err(RecvTimeoutError::Disconnected));
    }

    #[test]
    fn software_button_outlives_its_handle() {
        let (handle, rx) = start(ButtonConfig {
            backend: ButtonBackendKind::Software,
            ..ButtonConfig::default()
        });
        let button = handle.unwrap().software().unwrap();
        button.press(ms(100));
        assert_eq!(rx.try_iter().count(), 2);
        drop(rx);
        button.press(ms(100)); // the receiver is gone: nothing happens, no panic
    }

    #[test]
    fn handle_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<ButtonHandle>();
        assert_send::<SoftwareButton>();
    }

    #[cfg(not(feature = "rppal"))]
    #[test]
    fn rppal_without_feature_names_the_feature() {
        let (result, _rx) = start(ButtonConfig {
            backend: ButtonBackendKind::Rppal,
            ..ButtonConfig::default()
        });
        assert_eq!(
            result.unwrap_err(),
            "samrt was built without the `rppal` feature: rebuild with `--features rppal`"
        );
    }

    #[cfg(not(feature = "gpio-cdev"))]
    #[test]
    fn cdev_without_feature_names_the_feature() {
        let (result, _rx) = start(ButtonConfig {
            backend: ButtonBackendKind::Cdev,
            ..ButtonConfig::default()
        });
        assert_eq!(
            result.unwrap_err(),
            "samrt was built without the `gpio-cdev` feature: rebuild with `--features gpio-cdev`"
        );
    }

    #[cfg(feature = "rppal")]
    #[test]
    fn rppal_events_become_edges() {
        use rppal::gpio::{Event, Trigger};
        let event = |trigger| Event {
            timestamp: ms(1234),
            seqno: 1,
            trigger,
        };
        // Active low: falling is a press.
        assert_eq!(
            rppal_backend::edge_of(&event(Trigger::FallingEdge), true),
            Some(edge(true, ms(1234)))
        );
        assert_eq!(
            rppal_backend::edge_of(&event(Trigger::RisingEdge), true),
            Some(edge(false, ms(1234)))
        );
        // Active high: rising is a press.
        assert_eq!(
            rppal_backend::edge_of(&event(Trigger::RisingEdge), false),
            Some(edge(true, ms(1234)))
        );
        assert_eq!(rppal_backend::edge_of(&event(Trigger::Both), false), None);
    }

    #[cfg(feature = "rppal")]
    #[test]
    fn rppal_errors_name_the_fix() {
        use rppal::gpio::Error;
        let message =
            rppal_backend::error_message(&Error::PermissionDenied("/dev/gpiomem".into()), 17);
        assert!(message.contains("/dev/gpiomem"), "{message}");
        assert!(message.contains("`gpio` group"), "{message}");
        assert!(message.contains("SupplementaryGroups=gpio"), "{message}");
        let message = rppal_backend::error_message(&Error::UnknownModel, 17);
        assert!(message.contains("not a Raspberry Pi"), "{message}");
        assert!(message.contains("cdev"), "{message}");
        let busy = Error::Io(std::io::Error::from_raw_os_error(libc::EBUSY));
        let message = rppal_backend::error_message(&busy, 17);
        assert!(message.contains("busy"), "{message}");
    }

    #[cfg(feature = "rppal")]
    #[test]
    fn rppal_start_fails_cleanly_off_a_pi() {
        let (result, _rx) = start(ButtonConfig {
            backend: ButtonBackendKind::Rppal,
            ..ButtonConfig::default()
        });
        // On a real Pi this may succeed; anywhere else it must be an explained error.
        if let Err(error) = result {
            assert!(error.starts_with("button backend `rppal`"), "{error}");
        }
    }

    #[cfg(feature = "gpio-cdev")]
    #[test]
    fn cdev_events_become_edges() {
        use gpiocdev::line::{EdgeEvent, EdgeKind};
        let event = |kind| EdgeEvent {
            timestamp_ns: 1_234_000_000,
            kind,
            offset: 17,
            seqno: 1,
            line_seqno: 1,
        };
        assert_eq!(
            cdev_backend::edge_of(&event(EdgeKind::Rising)),
            edge(true, ms(1234))
        );
        assert_eq!(
            cdev_backend::edge_of(&event(EdgeKind::Falling)),
            edge(false, ms(1234))
        );
    }

    #[cfg(feature = "gpio-cdev")]
    #[test]
    fn cdev_errors_name_the_fix() {
        let (result, _rx) = start(ButtonConfig {
            backend: ButtonBackendKind::Cdev,
            chip: "/nonexistent/gpiochip99".into(),
            ..ButtonConfig::default()
        });
        let error = result.unwrap_err();
        assert!(error.contains("no such GPIO chip"), "{error}");
        assert!(error.contains("gpiodetect"), "{error}");
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let message = cdev_backend::open_error("/dev/gpiochip0", &denied);
        assert!(message.contains("`gpio` group"), "{message}");
        assert!(message.contains("SupplementaryGroups=gpio"), "{message}");
    }
}
