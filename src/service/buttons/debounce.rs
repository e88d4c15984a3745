//! The receiving side of the button: edges on one monotonic clock become debounced presses.

use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn monotonic_clock_moves_forward() {
        let a = monotonic_now();
        let b = monotonic_now();
        assert!(b >= a);
        assert!(a > Duration::ZERO);
    }
}
