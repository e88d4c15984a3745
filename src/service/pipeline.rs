//! What the service's threads share and what flows between them: frames (newest wins), encoded
//! frames, jobs for the decoder thread and the state every thread reads. Both [`super::control`]
//! and [`super::runtime`] work on these; neither imports the other for them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use image::RgbImage;
use serde_json::Value;

use super::event::PromptOrigin;
use super::priority::PromptPriority;
use super::stats::{bump, Stats};
use crate::predictor::Embedding;
use crate::prompt::Prompt;

/// The longest request line accepted (the control socket's lines, MQTT command payloads);
/// longer ones are answered with an error and skipped.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How often blocked threads look at the stop flag.
pub const POLL: Duration = Duration::from_millis(50);

/// A frame with its sequence number (counted by the service from 1).
#[derive(Debug, Clone)]
pub struct Frame {
    pub seq: u64,
    pub origin: String,
    pub image: Arc<RgbImage>,
}

/// A frame and its embedding: what prompts are decoded against.
#[derive(Debug)]
pub struct EncodedFrame {
    pub frame: Frame,
    pub embedding: Embedding,
}

/// The answer to a control-socket request: the event's JSON, or why there is none.
pub type Reply = Result<Value, String>;

/// Work for the decoder thread.
#[derive(Debug)]
pub enum Job {
    /// Decode one prompt against the newest embedding.
    Prompt {
        origin: PromptOrigin,
        prompt: Prompt,
        multimask: bool,
        received: Instant,
        reply: Option<Sender<Reply>>,
    },
    /// Segment everything in the newest frame.
    Everything {
        origin: PromptOrigin,
        received: Instant,
        reply: Option<Sender<Reply>>,
    },
    /// A frame was encoded: run the per-frame prompts (fixed points, detector).
    Encoded(Arc<EncodedFrame>),
}

/// State every thread shares.
#[derive(Debug, Default)]
pub struct Shared {
    pub stats: Stats,
    /// Prompts queued or decoding, which the encoder gives way to.
    pub priority: PromptPriority,
    pub(super) stop: AtomicBool,
    newest: Mutex<Option<Arc<EncodedFrame>>>,
    newest_changed: Condvar,
}

impl Shared {
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The newest encoded frame, waiting up to `timeout` for the first one.
    pub fn newest(&self, timeout: Duration) -> Option<Arc<EncodedFrame>> {
        let deadline = Instant::now() + timeout;
        let mut newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        while newest.is_none() {
            let now = Instant::now();
            if now >= deadline || self.stopping() {
                return None;
            }
            newest = self
                .newest_changed
                .wait_timeout(newest, (deadline - now).min(POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        newest.clone()
    }

    pub(super) fn publish(&self, encoded: Arc<EncodedFrame>) {
        *self.newest.lock().unwrap_or_else(|e| e.into_inner()) = Some(encoded);
        self.newest_changed.notify_all();
    }
}

/// A one-frame slot: capture overwrites, the encoder takes. Latest frame wins.
#[derive(Debug, Default)]
pub struct LatestFrame {
    slot: Mutex<(Option<Frame>, bool)>,
    ready: Condvar,
}

impl LatestFrame {
    /// Stores a frame; returns true if it replaced one the encoder never took.
    pub fn put(&self, frame: Frame) -> bool {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        let replaced = slot.0.replace(frame).is_some();
        self.ready.notify_one();
        replaced
    }

    /// No more frames will come: `take` returns `None` once the slot is empty.
    pub fn close(&self) {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.ready.notify_all();
    }

    /// The newest frame, waiting for one; `None` when closed and empty, or on stop.
    pub fn take(&self, stop: &AtomicBool) -> Option<Frame> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(frame) = slot.0.take() {
                return Some(frame);
            }
            if slot.1 || stop.load(Ordering::Relaxed) {
                return None;
            }
            slot = self
                .ready
                .wait_timeout(slot, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Sleeps up to `duration`, waking early on stop; false if stopping.
pub(super) fn sleep_unless_stopped(shared: &Shared, duration: Duration) -> bool {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        if shared.stopping() {
            return false;
        }
        std::thread::sleep(POLL.min(deadline - Instant::now()));
    }
    !shared.stopping()
}

/// Queues a job, refusing (and reporting) it when the queue is full; false if refused.
/// Prompts and segment-everything requests hold the encoder until they are answered.
pub fn submit(jobs: &SyncSender<Job>, job: Job, shared: &Shared, what: &str) -> bool {
    let prioritized = matches!(job, Job::Prompt { .. } | Job::Everything { .. });
    if prioritized {
        // Before the send, so that the decoder's `end` never comes first.
        shared.priority.begin();
    }
    let sent = jobs.try_send(job);
    if prioritized && sent.is_err() {
        shared.priority.end();
    }
    match sent {
        Ok(()) => true,
        Err(TrySendError::Full(job)) => {
            bump(&shared.stats.prompts_refused);
            log::warn!("{what} refused: the prompt queue is full (raise [service] prompt_queue)");
            if let Job::Prompt {
                reply: Some(reply), ..
            }
            | Job::Everything {
                reply: Some(reply), ..
            } = job
            {
                let _ = reply.send(Err("busy: the prompt queue is full, try again".into()));
            }
            false
        }
        Err(TrySendError::Disconnected(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64) -> Frame {
        Frame {
            seq,
            origin: String::new(),
            image: Arc::new(RgbImage::new(2, 2)),
        }
    }

    #[test]
    fn latest_frame_wins_and_close_ends_the_stream() {
        let latest = LatestFrame::default();
        let stop = AtomicBool::new(false);
        assert!(!latest.put(frame(1)));
        assert!(latest.put(frame(2)), "frame 1 was never taken: replaced");
        assert_eq!(latest.take(&stop).unwrap().seq, 2);
        std::thread::scope(|scope| {
            let taker = scope.spawn(|| latest.take(&stop).map(|f| f.seq));
            std::thread::sleep(Duration::from_millis(30));
            latest.put(frame(3));
            assert_eq!(taker.join().unwrap(), Some(3));
        });
        latest.put(frame(4));
        latest.close();
        assert_eq!(
            latest.take(&stop).unwrap().seq,
            4,
            "a frame taken before close is still encoded"
        );
        assert!(latest.take(&stop).is_none());
    }
}
