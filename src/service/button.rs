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

use std::fmt;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Now, on the clock the GPIO backends stamp their edges with (`CLOCK_MONOTONIC`: time since
/// boot, not counting suspend). Compare it with [`ButtonEdge::at`] and
/// [`ButtonPress::released_at`], e.g. for latencies.
#[cfg(unix)]
pub fn monotonic_now() -> Duration {
    let mut ts = std::mem::MaybeUninit::<libc::timespec>::uninit();
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime writes only to it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, ts.as_mut_ptr()) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) cannot fail");
    // SAFETY: clock_gettime returned 0, so it initialised `ts`.
    let ts = unsafe { ts.assume_init() };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Now, on a monotonic clock (time since the first call: no GPIO backend exists off Unix).
#[cfg(not(unix))]
pub fn monotonic_now() -> Duration {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(std::time::Instant::now).elapsed()
}

/// One level change of the button, as a backend saw it: what backends send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ButtonEdge {
    /// The button is now pressed (`active_low` already applied).
    pub pressed: bool,
    /// When, on the backend's monotonic clock (see [`monotonic_now`]).
    pub at: Duration,
}

/// How long the button was held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PressKind {
    /// Held for less than `long_press_ms`.
    Short,
    /// Held for `long_press_ms` or longer.
    Long,
}

/// A debounced press, reported when the button is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ButtonPress {
    pub kind: PressKind,
    /// From the accepted press edge to the accepted release edge; never shorter than the
    /// debounce time.
    pub held: Duration,
    /// The time of the release edge, on the backend's clock.
    pub released_at: Duration,
}

/// Turns raw edges into presses: pure logic, no clock, no I/O.
///
/// * The first edge that changes the level is accepted at once; any edge less than `debounce`
///   after the last accepted change is contact bounce and ignored.
/// * Edges that repeat the current level are ignored (a lost event, a bounce that ends where
///   it started).
/// * A press is reported on release; held ≥ `long_press` is [`PressKind::Long`].
/// * A release without a press (the service started while the button was held) is ignored.
/// * An edge older than the previous one (out of order) is ignored.
///
/// The debouncer also remembers the level of the last ignored edge. When the next edge arrives
/// after the window and that level differs from the accepted one, the bounce window ended at
/// the other level, so the line really went there:
///
/// * accepted pressed, settled released: a glitch shorter than `debounce`; it is dropped, no
///   press is reported and the next press is measured from its own edge;
/// * accepted released, settled pressed: the line was pressed again inside the window (a
///   dropout while held); the release was already reported and a new press starts at that
///   edge.
#[derive(Debug, Clone)]
pub struct Debouncer {
    debounce: Duration,
    long_press: Duration,
    /// The accepted (debounced) level.
    pressed: bool,
    /// When the accepted level last changed; `None` before the first accepted edge.
    last_change: Option<Duration>,
    /// When the accepted press began (valid while `pressed`).
    pressed_at: Duration,
    /// The level and time of the last edge seen, accepted or not.
    raw: Option<ButtonEdge>,
}

impl Debouncer {
    /// A debouncer that starts released.
    pub fn new(debounce: Duration, long_press: Duration) -> Self {
        Debouncer {
            debounce,
            long_press,
            pressed: false,
            last_change: None,
            pressed_at: Duration::ZERO,
            raw: None,
        }
    }

    /// The debounce time.
    pub fn debounce(&self) -> Duration {
        self.debounce
    }

    /// The shortest hold that makes a long press.
    pub fn long_press(&self) -> Duration {
        self.long_press
    }

    /// The accepted (debounced) level.
    pub fn is_pressed(&self) -> bool {
        self.pressed
    }

    /// Whether `at` (not earlier than the last edge) is inside the bounce window of the last
    /// accepted change.
    fn in_window(&self, at: Duration) -> bool {
        self.last_change
            .is_some_and(|change| at.saturating_sub(change) < self.debounce)
    }

    /// Feeds one edge; returns the press it completes, if any.
    pub fn feed(&mut self, edge: ButtonEdge) -> Option<ButtonPress> {
        if self.raw.is_some_and(|last| edge.at < last.at) {
            // Out of order (another clock, a backend restart): it cannot be placed, drop it.
            return None;
        }
        if self.in_window(edge.at) {
            self.raw = Some(edge);
            return None;
        }
        // Out of the window of the last accepted change: settle the level the window ended at.
        if let Some(raw) = self.raw {
            if raw.pressed != self.pressed {
                self.pressed = raw.pressed;
                self.last_change = Some(raw.at);
                // Released: the press was a glitch and is dropped. Pressed: a new press.
                self.pressed_at = raw.at;
            }
        }
        if self.in_window(edge.at) {
            self.raw = Some(edge);
            return None;
        }
        self.raw = Some(edge);
        if edge.pressed == self.pressed {
            return None;
        }
        self.pressed = edge.pressed;
        self.last_change = Some(edge.at);
        if edge.pressed {
            self.pressed_at = edge.at;
            return None;
        }
        let held = edge.at.saturating_sub(self.pressed_at);
        let kind = if held >= self.long_press {
            PressKind::Long
        } else {
            PressKind::Short
        };
        Some(ButtonPress {
            kind,
            held,
            released_at: edge.at,
        })
    }
}

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

/// One row of [`BUTTON_BACKENDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ButtonBackendInfo {
    pub kind: ButtonBackendKind,
    /// The cargo feature that compiles it in; `None`: always there.
    pub feature: Option<&'static str>,
    /// Whether this build has it.
    pub compiled_in: bool,
    /// One line for `--help` and error messages.
    pub about: &'static str,
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
    },
    ButtonBackendInfo {
        kind: ButtonBackendKind::Software,
        feature: None,
        compiled_in: true,
        about: "presses from the control socket (and tests); no hardware",
    },
    ButtonBackendInfo {
        kind: ButtonBackendKind::Rppal,
        feature: Some("rppal"),
        compiled_in: cfg!(feature = "rppal"),
        about: "Raspberry Pi GPIO (BCM pin), Pi 4 and Pi 5",
    },
    ButtonBackendInfo {
        kind: ButtonBackendKind::Cdev,
        feature: Some("gpio-cdev"),
        compiled_in: cfg!(feature = "gpio-cdev"),
        about: "Linux GPIO character device (chip + line offset): Jetson, any Linux",
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
fn not_built(feature: &str) -> String {
    format!("samrt was built without the `{feature}` feature: rebuild with `--features {feature}`")
}

/// Presses the button from code. Both edges are sent at once through the same channel and
/// debouncer as hardware edges; the hold is in their timestamps, nothing sleeps. Clones share
/// one timeline, so presses made one after another never overlap.
#[derive(Clone)]
pub struct SoftwareButton {
    edges: SyncSender<ButtonEdge>,
    debounce: Duration,
    /// The earliest time the next press edge may carry: the last release plus the debounce
    /// time, so that the debouncer does not take it for bounce.
    next_press: Arc<Mutex<Duration>>,
}

impl fmt::Debug for SoftwareButton {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftwareButton")
            .field("debounce", &self.debounce)
            .finish_non_exhaustive()
    }
}

impl SoftwareButton {
    /// A software button sending on `edges`; `debounce` is the debounce time of the receiving
    /// [`Debouncer`].
    pub fn new(edges: SyncSender<ButtonEdge>, debounce: Duration) -> Self {
        SoftwareButton {
            edges,
            debounce,
            next_press: Arc::new(Mutex::new(Duration::ZERO)),
        }
    }

    /// Sends a press edge stamped now (or just after the previous software press, if that is
    /// later) and a release edge stamped `held` after it. A hold shorter than the debounce time
    /// is lengthened to it, so a software press is never taken for bounce. Blocks while the
    /// channel is full; does nothing once the receiver is gone.
    pub fn press(&self, held: Duration) {
        let held = held.max(self.debounce);
        let mut next_press = self
            .next_press
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let at = monotonic_now().max(*next_press);
        let released = at + held;
        *next_press = released + self.debounce;
        let sent = self
            .edges
            .send(ButtonEdge { pressed: true, at })
            .and_then(|()| {
                self.edges.send(ButtonEdge {
                    pressed: false,
                    at: released,
                })
            });
        if sent.is_err() {
            log::debug!("software button press dropped: the button receiver is gone");
        }
    }
}

/// Keeps a started button backend alive. Dropping it stops the backend: the interrupt is
/// unregistered, the reading thread is joined, and the senders it holds are dropped (so the
/// receiver sees the channel disconnect once no [`SoftwareButton`] clone is left either).
pub struct ButtonHandle {
    kind: ButtonBackendKind,
    inner: HandleInner,
}

/// What a handle holds; the backends are never read, only kept alive until their `Drop`.
enum HandleInner {
    /// `none`: holds the sender so the channel stays open while the handle lives.
    Idle(#[allow(dead_code)] SyncSender<ButtonEdge>),
    Software(SoftwareButton),
    #[cfg(feature = "rppal")]
    Rppal(#[allow(dead_code)] rppal_backend::RppalButton),
    #[cfg(feature = "gpio-cdev")]
    Cdev(#[allow(dead_code)] cdev_backend::CdevButton),
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
        match &self.inner {
            HandleInner::Software(button) => Some(button.clone()),
            _ => None,
        }
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
) -> Result<ButtonHandle, String> {
    config.validate()?;
    let info = button_backend(config.backend);
    if !info.compiled_in {
        return Err(not_built(
            info.feature
                .expect("a backend that can be left out has a feature"),
        ));
    }
    let inner = match config.backend {
        ButtonBackendKind::None => HandleInner::Idle(edges),
        ButtonBackendKind::Software => {
            HandleInner::Software(SoftwareButton::new(edges, config.debounce()))
        }
        ButtonBackendKind::Rppal => start_rppal(config, edges)?,
        ButtonBackendKind::Cdev => start_cdev(config, edges)?,
    };
    Ok(ButtonHandle {
        kind: config.backend,
        inner,
    })
}

#[cfg(feature = "rppal")]
fn start_rppal(
    config: &ButtonConfig,
    edges: SyncSender<ButtonEdge>,
) -> Result<HandleInner, String> {
    rppal_backend::RppalButton::start(config, edges).map(HandleInner::Rppal)
}

#[cfg(not(feature = "rppal"))]
fn start_rppal(_: &ButtonConfig, _: SyncSender<ButtonEdge>) -> Result<HandleInner, String> {
    Err(not_built("rppal"))
}

#[cfg(feature = "gpio-cdev")]
fn start_cdev(config: &ButtonConfig, edges: SyncSender<ButtonEdge>) -> Result<HandleInner, String> {
    cdev_backend::CdevButton::start(config, edges).map(HandleInner::Cdev)
}

#[cfg(not(feature = "gpio-cdev"))]
fn start_cdev(_: &ButtonConfig, _: SyncSender<ButtonEdge>) -> Result<HandleInner, String> {
    Err(not_built("gpio-cdev"))
}

/// How to give a user GPIO access, for permission errors.
#[cfg(any(feature = "rppal", feature = "gpio-cdev"))]
const GPIO_GROUP_FIX: &str = "add the user to the `gpio` group (`sudo usermod -aG gpio $USER`, \
     then log in again), or under systemd give the service `SupplementaryGroups=gpio`";

#[cfg(feature = "rppal")]
mod rppal_backend {
    use std::sync::mpsc::SyncSender;

    use rppal::gpio::{Error, Event, Gpio, InputPin, Trigger};

    use super::{ButtonConfig, ButtonEdge, GPIO_GROUP_FIX};

    /// The input pin with its interrupt; rppal's poll thread runs the callback.
    pub(super) struct RppalButton {
        pin: InputPin,
    }

    /// The edge a Raspberry Pi interrupt event stands for.
    pub(super) fn edge_of(event: &Event, active_low: bool) -> Option<ButtonEdge> {
        let high = match event.trigger {
            Trigger::RisingEdge => true,
            Trigger::FallingEdge => false,
            Trigger::Disabled | Trigger::Both => return None,
        };
        Some(ButtonEdge {
            pressed: high != active_low,
            at: event.timestamp,
        })
    }

    /// What went wrong, and the fix.
    pub(super) fn error_message(error: &Error, pin: u32) -> String {
        let what = format!("button backend `rppal` (BCM pin {pin})");
        match error {
            Error::UnknownModel => format!(
                "{what}: this is not a Raspberry Pi (rppal cannot identify the model); on other \
                 boards use `backend = \"cdev\"` (build with `--features gpio-cdev`)"
            ),
            Error::PermissionDenied(path) => {
                format!("{what}: permission denied opening {path}: {GPIO_GROUP_FIX}")
            }
            Error::PinUsed(_) => format!("{what}: the pin is already in use by samrt"),
            Error::PinNotAvailable(_) => format!(
                "{what}: this Raspberry Pi has no such GPIO pin (BCM numbers; the 40-pin header \
                 has GPIO 2 to 27)"
            ),
            Error::Io(io) if io.raw_os_error() == Some(libc::EBUSY) => format!(
                "{what}: the pin is busy: another program or a kernel driver (a device-tree \
                 overlay) holds it; stop it (`gpioinfo` shows the consumer) or pick another pin"
            ),
            Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                format!("{what}: permission denied: {GPIO_GROUP_FIX}")
            }
            Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound => format!(
                "{what}: no GPIO device found ({io}): is this a Raspberry Pi with /dev/gpiomem \
                 and /dev/gpiochip*?"
            ),
            other => format!("{what}: {other}"),
        }
    }

    impl RppalButton {
        pub(super) fn start(
            config: &ButtonConfig,
            edges: SyncSender<ButtonEdge>,
        ) -> Result<Self, String> {
            let message = |error: Error| error_message(&error, config.pin);
            let bcm =
                u8::try_from(config.pin).map_err(|_| message(Error::PinNotAvailable(u8::MAX)))?;
            let gpio = Gpio::new().map_err(message)?;
            let pin = gpio.get(bcm).map_err(message)?;
            let mut pin = if config.active_low {
                pin.into_input_pullup()
            } else {
                pin.into_input_pulldown()
            };
            let active_low = config.active_low;
            pin.set_async_interrupt(Trigger::Both, None, move |event: Event| {
                if let Some(edge) = edge_of(&event, active_low) {
                    // Never block the interrupt thread: a full channel drops the edge.
                    let _ = edges.try_send(edge);
                }
            })
            .map_err(message)?;
            Ok(RppalButton { pin })
        }
    }

    impl Drop for RppalButton {
        fn drop(&mut self) {
            // Stops and joins rppal's poll thread; dropping the pin then resets its bias.
            if let Err(error) = self.pin.clear_async_interrupt() {
                log::warn!("button: stopping the GPIO interrupt failed: {error}");
            }
        }
    }
}

#[cfg(feature = "gpio-cdev")]
mod cdev_backend {
    use std::io;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::{SyncSender, TrySendError};
    use std::sync::Arc;
    use std::thread::{self, JoinHandle};
    use std::time::Duration;

    use gpiocdev::line::{Bias, EdgeDetection, EdgeEvent, EdgeKind, EventClock};
    use gpiocdev::{Chip, Request};

    use super::{ButtonConfig, ButtonEdge, GPIO_GROUP_FIX};

    /// How often the reading thread looks at its stop flag.
    const STOP_POLL: Duration = Duration::from_millis(100);
    /// Consecutive read errors (e.g. EINTR) tolerated before the thread gives up.
    const MAX_ERRORS: u32 = 50;

    /// The reading thread and its stop flag.
    pub(super) struct CdevButton {
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    /// The edge a line event stands for; the request is active-low when the button is, so a
    /// rising edge is always a press.
    pub(super) fn edge_of(event: &EdgeEvent) -> ButtonEdge {
        ButtonEdge {
            pressed: event.kind == EdgeKind::Rising,
            at: Duration::from_nanos(event.timestamp_ns),
        }
    }

    /// Why the chip could not be opened, and the fix.
    pub(super) fn open_error(chip: &str, error: &io::Error) -> String {
        let what = format!("button backend `cdev` ({chip})");
        match error.kind() {
            io::ErrorKind::NotFound => format!(
                "{what}: no such GPIO chip: list the chips with `gpiodetect` (or \
                 `ls /dev/gpiochip*`) and set `[button] chip`"
            ),
            io::ErrorKind::PermissionDenied => {
                format!("{what}: permission denied: {GPIO_GROUP_FIX}")
            }
            _ => format!("{what}: cannot open: {error}"),
        }
    }

    impl CdevButton {
        pub(super) fn start(
            config: &ButtonConfig,
            edges: SyncSender<ButtonEdge>,
        ) -> Result<Self, String> {
            let chip_path = config.chip.as_str();
            let line = config.pin;
            let what = format!("button backend `cdev` (line {line} on {chip_path})");
            // Open it ourselves first: std's io::Error tells a missing chip from a permission.
            std::fs::File::open(chip_path).map_err(|e| open_error(chip_path, &e))?;
            let chip = Chip::from_path(chip_path).map_err(|e| format!("{what}: {e}"))?;
            let info = chip.info().map_err(|e| format!("{what}: {e}"))?;
            if line >= info.num_lines {
                return Err(format!(
                    "{what}: {chip_path} ({}) has lines 0 to {}: set `[button] pin` to a line \
                     offset (`gpioinfo {chip_path}` lists them)",
                    info.label,
                    info.num_lines.saturating_sub(1)
                ));
            }
            let line_info = chip.line_info(line).map_err(|e| format!("{what}: {e}"))?;
            if line_info.used {
                return Err(format!(
                    "{what}: the line is busy, used by \"{}\": stop that program or driver, or \
                     pick another line",
                    line_info.consumer
                ));
            }
            drop(chip);
            let mut builder = Request::builder();
            builder
                .on_chip(chip_path)
                .with_consumer("samrt-button")
                .with_line(line)
                .as_input()
                .with_bias(if config.active_low {
                    Bias::PullUp
                } else {
                    Bias::PullDown
                })
                .with_edge_detection(EdgeDetection::BothEdges)
                .with_event_clock(EventClock::Monotonic);
            if config.active_low {
                builder.as_active_low();
            }
            let request = builder.request().map_err(|e| {
                format!(
                    "{what}: requesting the line failed: {e} (busy: another program holds it; \
                     permission: {GPIO_GROUP_FIX})"
                )
            })?;
            let stop = Arc::new(AtomicBool::new(false));
            let thread = thread::Builder::new()
                .name("button-cdev".to_string())
                .spawn({
                    let stop = Arc::clone(&stop);
                    move || read_edges(&request, &edges, &stop)
                })
                .map_err(|e| format!("{what}: cannot start the reading thread: {e}"))?;
            Ok(CdevButton {
                stop,
                thread: Some(thread),
            })
        }
    }

    /// The reading thread: waits for line events and only sends them on.
    fn read_edges(request: &Request, edges: &SyncSender<ButtonEdge>, stop: &AtomicBool) {
        let mut errors = 0;
        while !stop.load(Ordering::Relaxed) {
            let event = match request.wait_edge_event(STOP_POLL) {
                Ok(false) => continue,
                Ok(true) => request.read_edge_event(),
                Err(error) => Err(error),
            };
            match event {
                Ok(event) => {
                    errors = 0;
                    match edges.try_send(edge_of(&event)) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => {
                            log::warn!("button: edge dropped, the button channel is full");
                        }
                        Err(TrySendError::Disconnected(_)) => return,
                    }
                }
                // EINTR and the like pass; a line that keeps failing (chip gone) ends the thread.
                Err(error) => {
                    errors += 1;
                    if errors >= MAX_ERRORS {
                        log::error!("button: reading GPIO events failed, button stopped: {error}");
                        return;
                    }
                    log::debug!("button: reading GPIO events: {error}");
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    impl Drop for CdevButton {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                if thread.join().is_err() {
                    log::warn!("button: the GPIO reading thread panicked");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};

    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const NS: Duration = Duration::from_nanos(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn edge(pressed: bool, at: Duration) -> ButtonEdge {
        ButtonEdge { pressed, at }
    }

    fn debouncer() -> Debouncer {
        Debouncer::new(ms(30), ms(1000))
    }

    /// Feeds every edge; returns the presses reported.
    fn run(debouncer: &mut Debouncer, edges: &[(bool, Duration)]) -> Vec<ButtonPress> {
        edges
            .iter()
            .filter_map(|&(pressed, at)| debouncer.feed(edge(pressed, at)))
            .collect()
    }

    fn press(kind: PressKind, held: Duration, released_at: Duration) -> ButtonPress {
        ButtonPress {
            kind,
            held,
            released_at,
        }
    }

    /// `count` edges alternating from `first`, 0.7 ms apart from `start`: contact bounce that
    /// settles on the level of the last one (`first` when `count` is odd).
    fn bounce(first: bool, start: Duration, count: u32) -> Vec<(bool, Duration)> {
        (0..count)
            .map(|i| {
                (
                    first == (i % 2 == 0),
                    start + i * Duration::from_micros(700),
                )
            })
            .collect()
    }

    #[test]
    fn clean_press_is_short() {
        let mut d = debouncer();
        assert_eq!(d.feed(edge(true, ms(1000))), None);
        assert!(d.is_pressed());
        assert_eq!(
            d.feed(edge(false, ms(1200))),
            Some(press(PressKind::Short, ms(200), ms(1200)))
        );
        assert!(!d.is_pressed());
    }

    #[test]
    fn bouncy_press_reports_once() {
        let mut d = debouncer();
        // 7 edges in 4.2 ms on press (ends pressed), 7 on release (ends released).
        let mut edges = bounce(true, ms(1000), 7);
        edges.extend(bounce(false, ms(1400), 7));
        assert_eq!(
            run(&mut d, &edges),
            [press(PressKind::Short, ms(400), ms(1400))]
        );
        assert!(!d.is_pressed());
        // A second bouncy press right after still counts, once.
        let mut edges = bounce(true, ms(2000), 7);
        edges.extend(bounce(false, ms(3500), 7));
        assert_eq!(
            run(&mut d, &edges),
            [press(PressKind::Long, ms(1500), ms(3500))]
        );
    }

    #[test]
    fn bounce_that_ends_on_the_other_level_is_settled() {
        // The press bounces and the last bounce edge is a release: the line is released, so
        // the "press" was a glitch; the real press that follows is measured from its own edge.
        let mut d = debouncer();
        let mut edges = bounce(true, ms(1000), 4); // P R P R within 2.1 ms
        edges.push((true, ms(2000)));
        edges.push((false, ms(2300)));
        assert_eq!(
            run(&mut d, &edges),
            [press(PressKind::Short, ms(300), ms(2300))]
        );
    }

    #[test]
    fn long_press() {
        let mut d = debouncer();
        let presses = run(&mut d, &[(true, ms(500)), (false, ms(2000))]);
        assert_eq!(presses, [press(PressKind::Long, ms(1500), ms(2000))]);
    }

    #[test]
    fn release_without_press_is_ignored() {
        // The service started while the button was held: the first edge is a release.
        let mut d = debouncer();
        assert_eq!(d.feed(edge(false, ms(100))), None);
        assert!(!d.is_pressed());
        let presses = run(&mut d, &[(true, ms(400)), (false, ms(600))]);
        assert_eq!(presses, [press(PressKind::Short, ms(200), ms(600))]);
    }

    #[test]
    fn repeated_same_level_edges_are_ignored() {
        let mut d = debouncer();
        let edges = [
            (true, ms(100)),
            (true, ms(300)), // lost release + press, or a repeat: still the same press
            (false, ms(500)),
            (false, ms(700)),
        ];
        assert_eq!(
            run(&mut d, &edges),
            [press(PressKind::Short, ms(400), ms(500))]
        );
    }

    #[test]
    fn glitch_shorter_than_debounce_is_no_press() {
        let mut d = debouncer();
        assert_eq!(d.feed(edge(true, ms(1000))), None);
        assert_eq!(d.feed(edge(false, ms(1010))), None);
        // Nothing completes the glitch; the next real press is measured from its own edge,
        // not from the glitch (which would make it a long press).
        let presses = run(&mut d, &[(true, ms(5000)), (false, ms(5100))]);
        assert_eq!(presses, [press(PressKind::Short, ms(100), ms(5100))]);
    }

    #[test]
    fn press_right_after_a_glitch_is_recovered() {
        // Glitch at 1000..1010, real press at 1035: past the glitch's window, but inside the
        // window of its (settled) end. The press edge is bounce-filtered but remembered, so the
        // release still completes it, measured from the press edge.
        let mut d = debouncer();
        let edges = [
            (true, ms(1000)),
            (false, ms(1010)),
            (true, ms(1035)),
            (false, ms(1300)),
        ];
        assert_eq!(
            run(&mut d, &edges),
            [press(PressKind::Short, ms(265), ms(1300))]
        );
    }

    #[test]
    fn dropout_while_held_splits_the_press() {
        // The contact opens for 2 ms during a hold: the release is reported at once (presses
        // are reported on release) and the rest of the hold is a second press.
        let mut d = debouncer();
        let edges = [
            (true, ms(0)),
            (false, ms(600)),
            (true, ms(602)),
            (false, ms(2000)),
        ];
        assert_eq!(
            run(&mut d, &edges),
            [
                press(PressKind::Short, ms(600), ms(600)),
                press(PressKind::Long, ms(1398), ms(2000)),
            ]
        );
    }

    #[test]
    fn debounce_boundary() {
        // An edge exactly `debounce` after the accepted change is accepted...
        let mut d = debouncer();
        assert_eq!(d.feed(edge(true, ms(100))), None);
        assert_eq!(
            d.feed(edge(false, ms(130))),
            Some(press(PressKind::Short, ms(30), ms(130)))
        );
        // ...and so is a press exactly `debounce` after that release.
        assert_eq!(d.feed(edge(true, ms(160))), None);
        assert!(d.is_pressed());

        // One nanosecond less is bounce.
        let mut d = debouncer();
        assert_eq!(d.feed(edge(true, ms(100))), None);
        assert_eq!(d.feed(edge(false, ms(130) - NS)), None);
        assert!(d.is_pressed());
    }

    #[test]
    fn long_press_boundary() {
        let mut d = debouncer();
        let presses = run(&mut d, &[(true, ms(0)), (false, ms(1000))]);
        assert_eq!(presses, [press(PressKind::Long, ms(1000), ms(1000))]);
        let presses = run(&mut d, &[(true, ms(2000)), (false, ms(3000) - NS)]);
        assert_eq!(
            presses,
            [press(PressKind::Short, ms(1000) - NS, ms(3000) - NS)]
        );
    }

    #[test]
    fn zero_debounce_accepts_every_change() {
        let mut d = Debouncer::new(Duration::ZERO, ms(1000));
        let edges = [(true, ms(0)), (false, ms(0)), (true, ms(1)), (false, ms(3))];
        assert_eq!(
            run(&mut d, &edges),
            [
                press(PressKind::Short, ms(0), ms(0)),
                press(PressKind::Short, ms(2), ms(3)),
            ]
        );
    }

    #[test]
    fn edges_from_the_past_are_ignored() {
        let mut d = debouncer();
        assert_eq!(d.feed(edge(true, ms(1000))), None);
        assert_eq!(d.feed(edge(false, ms(10))), None);
        assert_eq!(d.feed(edge(true, ms(20))), None);
        assert!(d.is_pressed());
        assert_eq!(
            d.feed(edge(false, ms(1100))),
            Some(press(PressKind::Short, ms(100), ms(1100)))
        );
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
        (start_button(&config, tx), rx)
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

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_now();
        let b = monotonic_now();
        assert!(b >= a);
        assert!(a > Duration::ZERO);
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
