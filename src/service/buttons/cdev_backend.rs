//! `backend = "cdev"`: a line of a Linux GPIO character device through gpiocdev (Jetson, any
//! Linux), read by a thread of its own.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use gpiocdev::line::{Bias, EdgeDetection, EdgeEvent, EdgeKind, EventClock};
use gpiocdev::{Chip, Request};

use super::{Button, ButtonConfig, ButtonEdge, GPIO_GROUP_FIX};

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

impl Button for CdevButton {}
