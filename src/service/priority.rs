//! Prompts before the encoder. The encoder of the next frame runs operator by operator; before
//! each one it waits while a prompt (a press, a control-socket request, segment everything) is
//! queued or being decoded, so that a press shares the cores with at most one encoder operator
//! instead of a whole encode. With no prompt waiting the encoder never stops.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often a held encoder looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// The count of prompts queued or being decoded, which the encoder waits on.
#[derive(Debug, Default)]
pub struct PromptPriority {
    pending: AtomicUsize,
    lock: Mutex<()>,
    idle: Condvar,
}

impl PromptPriority {
    /// A prompt was queued: the encoder holds before its next operator.
    pub fn begin(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    /// A prompt queued with [`Self::begin`] was answered (or refused).
    pub fn end(&self) {
        let before = self.pending.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "PromptPriority::end without begin");
        if before == 1 {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.idle.notify_all();
        }
    }

    /// Prompts queued or being decoded.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Returns at once (`None`) when no prompt is pending; otherwise waits until none is, or
    /// `stop`, and returns how long it held.
    pub fn hold_while_pending(&self, stop: &AtomicBool) -> Option<Duration> {
        if self.pending() == 0 {
            return None;
        }
        let start = Instant::now();
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.pending() > 0 && !stop.load(Ordering::Relaxed) {
            guard = self
                .idle
                .wait_timeout(guard, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(guard);
        Some(start.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn holds_only_while_a_prompt_is_pending() {
        let priority = Arc::new(PromptPriority::default());
        let stop = AtomicBool::new(false);
        assert_eq!(
            priority.hold_while_pending(&stop),
            None,
            "nothing pending: no hold"
        );

        priority.begin();
        priority.begin();
        let released = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (priority, released) = (priority.clone(), released.clone());
            std::thread::spawn(move || {
                let held = priority.hold_while_pending(&AtomicBool::new(false));
                assert!(released.load(Ordering::SeqCst), "held until both ended");
                held
            })
        };
        std::thread::sleep(Duration::from_millis(30));
        priority.end();
        std::thread::sleep(Duration::from_millis(30));
        released.store(true, Ordering::SeqCst);
        priority.end();
        let held = waiter.join().unwrap().expect("held");
        assert!(held >= Duration::from_millis(50), "held {held:?}");
        assert_eq!(priority.pending(), 0);
    }

    #[test]
    fn stop_releases_a_held_encoder() {
        let priority = PromptPriority::default();
        priority.begin();
        let stop = AtomicBool::new(true);
        assert!(priority.hold_while_pending(&stop).is_some());
        assert_eq!(priority.pending(), 1);
    }
}
