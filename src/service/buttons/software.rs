//! `backend = "software"`: presses made by code (the control socket, MQTT commands, tests).

use std::fmt;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::debounce::{monotonic_now, ButtonEdge};

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
    /// [`Debouncer`](super::Debouncer).
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
