//! The service's threads and how data flows between them:
//!
//! ```text
//! capture ──newest frame──▶ encoder ──newest embedding──▶ decoder ──events──▶ sinks
//!                                     button ──prompts──▶    ▲
//!                                     control ──prompts──────┘
//! ```
//!
//! Capture never waits for inference: it overwrites a one-frame slot, and the encoder always
//! takes the newest frame. Prompts wait in a bounded queue and are decoded against the newest
//! embedding; events wait in a bounded queue for the sinks. Nothing grows without bound.
//! Prompts come before the encoder: while one is queued or decoding, the encoder of the next
//! frame holds before its next operator ([`PromptPriority`]), so a press never waits for an
//! encode.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use image::RgbImage;
use serde_json::Value;

use super::button::{start_button, ButtonEdge, ButtonHandle, ButtonPress, Debouncer, PressKind};
use super::config::ServiceConfig;
use super::control::{ControlServer, Responder};
use super::display::DisplaySink;
use super::files_sink::FilesSink;
use super::mqtt::{MqttCommands, MqttSink};
use super::notify::Notifier;
use super::priority::PromptPriority;
use super::sink::{json_line, EventMask, MaskEvent, PromptOrigin, Sink};
use super::source::{open_source, FrameSource, SourceError};
use super::stats::{bump, Stats};
use super::stream::StreamSink;
use crate::amg::AmgParams;
use crate::detector::{Detector, DetectorParams};
use crate::error::panic_message;
use crate::model::ModelFiles;
use crate::parallel::default_threads;
use crate::predictor::{Embedding, MaskOutput, Prediction, SamPredictor};
use crate::prompt::{PointLabel, PointPrompt, Prompt};

/// The longest wait between reconnect attempts of a source that is gone.
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);
/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

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
    stop: AtomicBool,
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

    fn publish(&self, encoded: Arc<EncodedFrame>) {
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
fn sleep_unless_stopped(shared: &Shared, duration: Duration) -> bool {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        if shared.stopping() {
            return false;
        }
        std::thread::sleep(POLL.min(deadline - Instant::now()));
    }
    !shared.stopping()
}

/// A warning that repeats at most once per `every` (a camera unplugged for an hour logs a line
/// a minute, not a line a frame).
#[derive(Debug)]
struct RateLimitedLog {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn new(every: Duration) -> Self {
        RateLimitedLog {
            every,
            last: None,
            suppressed: 0,
        }
    }

    fn warn(&mut self, message: impl FnOnce() -> String) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < self.every) {
            self.suppressed += 1;
            return;
        }
        let more = std::mem::take(&mut self.suppressed);
        if more > 0 {
            log::warn!("{} ({more} more like it since the last report)", message());
        } else {
            log::warn!("{}", message());
        }
        self.last = Some(now);
    }
}

fn capture_loop(
    mut source: Box<dyn FrameSource>,
    latest: &LatestFrame,
    shared: &Shared,
    initial_backoff: Duration,
) {
    let stats = &shared.stats;
    let mut seq = 0u64;
    let mut backoff = initial_backoff;
    let mut corrupt_log = RateLimitedLog::new(Duration::from_secs(60));
    while !shared.stopping() {
        match source.next_frame() {
            Ok(captured) => {
                seq += 1;
                bump(&stats.captured);
                stats
                    .source_dropped
                    .fetch_add(captured.dropped_before, Ordering::Relaxed);
                backoff = initial_backoff;
                let replaced = latest.put(Frame {
                    seq,
                    origin: captured.origin,
                    image: Arc::new(captured.image),
                });
                if replaced {
                    bump(&stats.skipped);
                }
            }
            Err(SourceError::Corrupt(reason)) => {
                bump(&stats.corrupt);
                corrupt_log.warn(|| format!("skipping a frame: {reason}"));
            }
            Err(SourceError::Finished) => {
                log::info!("source {} finished after {seq} frames", source.describe());
                break;
            }
            Err(SourceError::Disconnected(reason)) => {
                bump(&stats.source_errors);
                log::warn!(
                    "source {}: {reason}; retrying in {:.1} s",
                    source.describe(),
                    backoff.as_secs_f64()
                );
                loop {
                    if !sleep_unless_stopped(shared, backoff) {
                        break;
                    }
                    backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
                    match source.reconnect() {
                        Ok(()) => {
                            bump(&stats.reconnects);
                            log::info!("source {} is back", source.describe());
                            break;
                        }
                        Err(e) => {
                            bump(&stats.source_errors);
                            log::warn!(
                                "source still unavailable: {e}; retrying in {:.1} s",
                                backoff.as_secs_f64()
                            );
                        }
                    }
                }
            }
        }
    }
    latest.close();
}

fn encode_loop(
    predictor: &SamPredictor,
    latest: &LatestFrame,
    shared: &Shared,
    jobs: &SyncSender<Job>,
    per_frame_prompts: bool,
) {
    let stats = &shared.stats;
    let mut errors = RateLimitedLog::new(Duration::from_secs(60));
    while let Some(frame) = latest.take(&shared.stop) {
        let start = Instant::now();
        // Until the first frame is encoded a prompt has nothing to be decoded against: it
        // waits for this encode instead of holding it.
        let first = shared.newest(Duration::ZERO).is_none();
        let give_way = || {
            if first {
                return;
            }
            if let Some(held) = shared.priority.hold_while_pending(&shared.stop) {
                stats.record_encoder_hold(held);
            }
        };
        give_way();
        let embedded = guarded(stats, "the encoder", || {
            predictor
                .preprocess(&frame.image)
                .and_then(|image| predictor.encode_yielding(&image, &give_way))
                .map_err(|e| e.to_string())
        });
        match embedded {
            Ok(embedding) => {
                stats.record_encode_ms(start.elapsed().as_secs_f64() * 1e3);
                bump(&stats.encoded);
                let encoded = Arc::new(EncodedFrame { frame, embedding });
                shared.publish(encoded.clone());
                if per_frame_prompts {
                    // The per-frame prompts of a frame not yet reached are dropped, not queued:
                    // the next frame's replace them.
                    if let Err(TrySendError::Full(_)) = jobs.try_send(Job::Encoded(encoded)) {
                        bump(&stats.prompts_refused);
                    }
                }
            }
            Err(e) => {
                bump(&stats.encode_errors);
                errors
                    .warn(|| format!("cannot encode frame {} ({}): {e}", frame.seq, frame.origin));
            }
        }
    }
}

/// Runs `job`; a panic inside it becomes an error naming `what`, counted in `panics` and logged.
fn guarded<T>(
    stats: &Stats,
    what: &str,
    job: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
        Ok(result) => result,
        Err(payload) => {
            bump(&stats.panics);
            let message = panic_message(payload.as_ref()).unwrap_or("a panic without a message");
            log::error!(
                "{what} panicked: {message}. The job was dropped and the service goes on; this is \
                 a bug, please report it with the log"
            );
            Err(format!(
                "internal error in {what}: {message} (a bug: the job was dropped, the service \
                 goes on)"
            ))
        }
    }
}

/// A prompt job, for messages: "control prompt", "segment everything".
fn job_name(origin: &PromptOrigin, has_prompt: bool) -> String {
    if has_prompt {
        format!("{} prompt", origin.kind())
    } else {
        "segment everything".to_string()
    }
}

/// Debug builds only (what the tests run): a control request whose id is
/// `$SAMRT_DEBUG_PANIC_REQUEST` panics inside its job, so that the tests see a real panic caught
/// at the job boundary. Release builds have no such hook.
fn inject_panic(origin: &PromptOrigin) {
    if cfg!(debug_assertions) {
        if let PromptOrigin::Control {
            request_id: Some(id),
        } = origin
        {
            if std::env::var("SAMRT_DEBUG_PANIC_REQUEST").is_ok_and(|want| &want == id) {
                panic!("injected by SAMRT_DEBUG_PANIC_REQUEST for request {id:?}");
            }
        }
    }
}

/// What the decoder thread needs besides its queue.
struct Decoder<'a> {
    predictor: &'a SamPredictor,
    detector: Option<&'a Detector>,
    config: &'a ServiceConfig,
    shared: &'a Shared,
    /// Each event with its JSON record, serialized once for every sink.
    events: SyncSender<(MaskEvent, Vec<u8>)>,
    next_event_id: u64,
    threads: usize,
}

impl Decoder<'_> {
    fn first_frame_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.config.service.first_frame_timeout_s)
    }

    fn emit(
        &mut self,
        encoded: &EncodedFrame,
        origin: PromptOrigin,
        prompt: Option<Prompt>,
        masks: Vec<EventMask>,
        received: Instant,
    ) -> Value {
        let latency_ms = received.elapsed().as_secs_f64() * 1e3;
        self.shared.stats.record_prompt_ms(latency_ms);
        let event = MaskEvent {
            id: self.next_event_id,
            frame: encoded.frame.seq,
            frame_origin: encoded.frame.origin.clone(),
            origin,
            prompt,
            masks,
            latency_ms,
            time: SystemTime::now(),
            image: encoded.frame.image.clone(),
        };
        self.next_event_id += 1;
        bump(&self.shared.stats.events);
        let json = event.to_json();
        let line = json_line(&json);
        // Blocks while the sinks are behind: an event once produced is never dropped here.
        let _ = self.events.send((event, line));
        json
    }

    fn decode_prompt(
        &mut self,
        encoded: &EncodedFrame,
        prompt: &Prompt,
        multimask: bool,
    ) -> Result<Vec<EventMask>, String> {
        let output = if multimask {
            MaskOutput::Multimask
        } else {
            MaskOutput::Single
        };
        let start = Instant::now();
        let prediction = self
            .predictor
            .predict(&encoded.embedding, prompt, output)
            .map_err(|e| e.to_string())?;
        self.shared
            .stats
            .record_decode_ms(start.elapsed().as_secs_f64() * 1e3);
        Ok(event_masks(prediction))
    }

    fn everything(&mut self, encoded: &EncodedFrame) -> Result<Vec<EventMask>, String> {
        let params = AmgParams {
            points_per_side: self.config.prompts.everything.points_per_side,
            crop_n_layers: self.config.prompts.everything.crop_n_layers,
            ..AmgParams::default()
        };
        let masks =
            crate::amg::generate(self.predictor, &encoded.frame.image, &params, self.threads)
                .map_err(|e| e.to_string())?;
        Ok(masks
            .iter()
            .map(|m| EventMask::new(m.mask(), m.predicted_iou, m.stability_score))
            .collect())
    }

    fn fail(&self, reply: Option<Sender<Reply>>, what: &str, error: String) {
        bump(&self.shared.stats.prompt_errors);
        log::warn!("{what}: {error}");
        if let Some(reply) = reply {
            let _ = reply.send(Err(error));
        }
    }

    /// Decodes `prompt` (or segments everything when `None`) against the newest embedding,
    /// emits the event and answers `reply`.
    fn answer(
        &mut self,
        origin: PromptOrigin,
        prompt: Option<Prompt>,
        multimask: bool,
        received: Instant,
        reply: Option<Sender<Reply>>,
    ) {
        let what = job_name(&origin, prompt.is_some());
        inject_panic(&origin);
        let Some(encoded) = self.shared.newest(self.first_frame_timeout()) else {
            return self.fail(
                reply,
                &what,
                "no frame has been encoded yet (is the source delivering frames? see the log)"
                    .into(),
            );
        };
        let masks = match &prompt {
            Some(prompt) => self.decode_prompt(&encoded, prompt, multimask),
            None => self.everything(&encoded),
        };
        match masks {
            Ok(masks) => {
                let json = self.emit(&encoded, origin, prompt, masks, received);
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(json));
                }
            }
            Err(e) => self.fail(reply, &what, e),
        }
    }

    /// Runs one job. A panic inside it (a bug, in samrt or a model's operator) is caught here:
    /// counted, logged, answered as an error to whoever asked, and the next job runs.
    fn run_job(&mut self, job: Job) {
        match job {
            Job::Prompt {
                origin,
                prompt,
                multimask,
                received,
                reply,
            } => self.answer_guarded(origin, Some(prompt), multimask, received, reply),
            Job::Everything {
                origin,
                received,
                reply,
            } => self.answer_guarded(origin, None, false, received, reply),
            Job::Encoded(encoded) => {
                let shared = self.shared;
                if let Err(error) = guarded(&shared.stats, "the per-frame prompts", || {
                    self.per_frame(&encoded);
                    Ok(())
                }) {
                    self.fail(None, "the per-frame prompts", error);
                }
            }
        }
    }

    /// [`Self::answer`] under [`guarded`]: a panic is answered to `reply` as an error. Ends the
    /// prompt's hold on the encoder either way.
    fn answer_guarded(
        &mut self,
        origin: PromptOrigin,
        prompt: Option<Prompt>,
        multimask: bool,
        received: Instant,
        reply: Option<Sender<Reply>>,
    ) {
        let shared = self.shared;
        let what = job_name(&origin, prompt.is_some());
        let asked = reply.clone();
        let outcome = guarded(&shared.stats, &what, || {
            self.answer(origin, prompt, multimask, received, reply);
            Ok(())
        });
        if let Err(error) = outcome {
            self.fail(asked, &what, error);
        }
        shared.priority.end();
    }

    fn per_frame(&mut self, encoded: &EncodedFrame) {
        let received = Instant::now();
        let n = self.shared.stats.encoded.load(Ordering::Relaxed);
        let fixed = &self.config.prompts.fixed;
        if fixed.every_n_frames > 0 && (n - 1).is_multiple_of(fixed.every_n_frames) {
            let prompt = points_prompt(&fixed.points, &encoded.frame.image);
            match self.decode_prompt(encoded, &prompt, self.config.prompts.multimask) {
                Ok(masks) => {
                    self.emit(encoded, PromptOrigin::Fixed, Some(prompt), masks, received);
                }
                Err(e) => self.fail(None, "fixed prompt", e),
            }
        }
        let detector_config = &self.config.prompts.detector;
        if let Some(detector) = self.detector {
            if !(n - 1).is_multiple_of(detector_config.every_n_frames) {
                return;
            }
            let params = DetectorParams {
                score_threshold: detector_config.score_threshold,
                classes: (!detector_config.classes.is_empty())
                    .then(|| detector_config.classes.clone()),
                ..DetectorParams::default()
            };
            let mut objects = match detector.detect(&encoded.frame.image, &params) {
                Ok(objects) => objects,
                Err(e) => return self.fail(None, "detector", e.to_string()),
            };
            objects.sort_by(|a, b| b.score.total_cmp(&a.score));
            objects.truncate(detector_config.max_boxes);
            // A box that is not a valid prompt fails alone.
            let mut valid = Vec::with_capacity(objects.len());
            for object in objects {
                let prompt = Prompt {
                    bbox: Some(object.bbox),
                    ..Prompt::default()
                };
                match prompt.validate(encoded.embedding.original_size) {
                    Ok(()) => valid.push((object, prompt)),
                    Err(e) => self.fail(None, "detector box", e.to_string()),
                }
            }
            let (objects, prompts): (Vec<_>, Vec<_>) = valid.into_iter().unzip();
            // Every box of the frame decoded together.
            let start = Instant::now();
            let predictions =
                match self
                    .predictor
                    .predict_batch(&encoded.embedding, &prompts, MaskOutput::Single)
                {
                    Ok(predictions) => predictions,
                    Err(e) => return self.fail(None, "detector boxes", e.to_string()),
                };
            if !prompts.is_empty() {
                let per_box = start.elapsed().as_secs_f64() * 1e3 / prompts.len() as f64;
                self.shared.stats.record_decode_ms(per_box);
            }
            for ((object, prompt), prediction) in objects.into_iter().zip(prompts).zip(predictions)
            {
                let masks = event_masks(prediction);
                self.emit(
                    encoded,
                    PromptOrigin::Detector {
                        label: object.label,
                    },
                    Some(prompt),
                    masks,
                    received,
                );
            }
        }
    }
}

/// A prediction's masks as an event carries them.
fn event_masks(prediction: Prediction) -> Vec<EventMask> {
    prediction
        .masks
        .into_iter()
        .map(|m| EventMask::new(m.mask, m.iou, m.stability))
        .collect()
}

/// One prompt of foreground `points` (a short button press's, the fixed points), or the frame
/// centre when there are none.
pub fn points_prompt(points: &[[f64; 2]], frame: &RgbImage) -> Prompt {
    let points = if points.is_empty() {
        vec![PointPrompt {
            x: frame.width() as f64 / 2.0,
            y: frame.height() as f64 / 2.0,
            label: PointLabel::Foreground,
        }]
    } else {
        points
            .iter()
            .map(|p| PointPrompt {
                x: p[0],
                y: p[1],
                label: PointLabel::Foreground,
            })
            .collect()
    };
    Prompt {
        points,
        ..Prompt::default()
    }
}

fn button_loop(
    edges: Receiver<ButtonEdge>,
    mut debouncer: Debouncer,
    config: &ServiceConfig,
    shared: &Shared,
    jobs: &SyncSender<Job>,
) {
    while !shared.stopping() {
        let edge = match edges.recv_timeout(POLL) {
            Ok(edge) => edge,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let Some(press) = debouncer.feed(edge) else {
            continue;
        };
        let received = Instant::now();
        log::info!(
            "button: {:?} press ({} ms)",
            press.kind,
            press.held.as_millis()
        );
        let job = match press.kind {
            PressKind::Long => Job::Everything {
                origin: PromptOrigin::ButtonLong,
                received,
                reply: None,
            },
            PressKind::Short => {
                let Some(encoded) = shared.newest(Duration::ZERO) else {
                    log::warn!("button press before the first frame was encoded: ignored");
                    continue;
                };
                Job::Prompt {
                    origin: PromptOrigin::Button,
                    prompt: points_prompt(&config.prompts.button.points, &encoded.frame.image),
                    multimask: config.prompts.multimask,
                    received,
                    reply: None,
                }
            }
        };
        submit(jobs, job, shared, press_name(&press));
    }
}

fn press_name(press: &ButtonPress) -> &'static str {
    match press.kind {
        PressKind::Short => "button press",
        PressKind::Long => "long button press",
    }
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

fn sink_loop(
    events: Receiver<(MaskEvent, Vec<u8>)>,
    mut sinks: Vec<Box<dyn Sink>>,
    shared: &Shared,
) {
    let mut logs: Vec<RateLimitedLog> = sinks
        .iter()
        .map(|_| RateLimitedLog::new(Duration::from_secs(30)))
        .collect();
    for (event, line) in events {
        for (sink, log) in sinks.iter_mut().zip(&mut logs) {
            if let Err(e) = sink.emit_line(&event, &line) {
                bump(&shared.stats.sink_errors);
                log.warn(|| e.to_string());
            }
        }
    }
    for sink in &mut sinks {
        if let Err(e) = sink.flush() {
            log::warn!("at shutdown: {e}");
        }
        if sink.dropped() > 0 {
            log::warn!(
                "sink {}: {} events dropped since start",
                sink.name(),
                sink.dropped()
            );
        }
    }
}

/// Everything `samrt run` opened at start-up: each failure here is a clear start-up error.
pub struct Service {
    config: ServiceConfig,
    predictor: SamPredictor,
    detector: Option<Detector>,
    source: Box<dyn FrameSource>,
    sinks: Vec<Box<dyn Sink>>,
    button: ButtonHandle,
    button_edges: Receiver<ButtonEdge>,
    control: Option<ControlServer>,
    /// `[sinks.mqtt] commands`: requests from the broker, answered like the control socket's.
    mqtt_commands: Option<MqttCommands>,
    threads: usize,
}

impl Service {
    /// Loads the models and opens the source, button, control socket and sinks.
    pub fn open(config: ServiceConfig) -> Result<Service, String> {
        let threads = if config.model.threads == 0 {
            default_threads()
        } else {
            config.model.threads
        };
        crate::engine::set_compute_threads(threads);
        let mut files = if config.model.dir.is_empty() {
            ModelFiles::default_model()
        } else {
            ModelFiles::from_dir(config.model.dir.as_ref())
        }
        .map_err(|e| format!("[model] {e}"))?;
        if !config.model.precision.is_empty() {
            files = files
                .with_precision(&config.model.precision)
                .map_err(|e| format!("[model] {e}"))?;
        }
        let predictor = SamPredictor::load(&files).map_err(|e| format!("[model] {e}"))?;
        log::info!(
            "model {} loaded ({threads} threads)",
            predictor.model_name()
        );
        let detector = if config.prompts.detector.enabled {
            let dir = if config.prompts.detector.dir.is_empty() {
                crate::model::default_detector_dir()
                    .map_err(|e| format!("[prompts.detector] {e}"))?
            } else {
                config.prompts.detector.dir.clone().into()
            };
            Some(Detector::load(&dir).map_err(|e| format!("[prompts.detector] {e}"))?)
        } else {
            None
        };
        let source = open_source(&config.source).map_err(|e| format!("[source] {e}"))?;
        log::info!("source: {}", source.describe());
        let (edge_tx, button_edges) = mpsc::sync_channel(64);
        let button = start_button(&config.prompts.button, edge_tx)
            .map_err(|e| format!("[prompts.button] {e}"))?;
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        let s = &config.sinks;
        if s.files.enabled {
            sinks.push(Box::new(FilesSink::open(&s.files)?));
        }
        if !s.stream.unix.is_empty() || !s.stream.tcp.is_empty() {
            sinks.push(Box::new(StreamSink::open(&s.stream)?));
        }
        let mut mqtt_commands = None;
        if s.mqtt.enabled {
            let mut mqtt = MqttSink::start(&s.mqtt);
            if let Some(failure) = mqtt.failure() {
                return Err(failure.to_string());
            }
            mqtt_commands = mqtt.take_commands();
            sinks.push(Box::new(mqtt));
        }
        if s.display.enabled {
            sinks.push(Box::new(
                DisplaySink::open(&s.display).map_err(|e| format!("[sinks.display] {e}"))?,
            ));
        }
        if sinks.is_empty() && config.control.socket.is_empty() {
            log::warn!("no sinks and no control socket are configured: masks go nowhere");
        }
        let control = if config.control.socket.is_empty() {
            None
        } else {
            Some(ControlServer::bind(&config.control)?)
        };
        Ok(Service {
            config,
            predictor,
            detector,
            source,
            sinks,
            button,
            button_edges,
            control,
            mqtt_commands,
            threads,
        })
    }

    /// Runs until `shutdown` receives (SIGTERM/SIGINT) or the source finishes, then drains: frames
    /// already taken are encoded, queued prompts are decoded, every event reaches every sink and
    /// the sinks are flushed.
    pub fn run(self, shutdown: Receiver<()>, notifier: &Notifier) -> Result<(), String> {
        let Service {
            config,
            predictor,
            detector,
            source,
            sinks,
            button,
            button_edges,
            control,
            mqtt_commands,
            threads,
        } = self;
        let shared = Shared::default();
        let latest = LatestFrame::default();
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(config.service.prompt_queue);
        let (event_tx, event_rx) =
            mpsc::sync_channel::<(MaskEvent, Vec<u8>)>(config.service.sink_queue);
        let per_frame_prompts = config.prompts.fixed.every_n_frames > 0 || detector.is_some();
        let debouncer = Debouncer::new(
            Duration::from_millis(config.prompts.button.debounce_ms),
            Duration::from_millis(config.prompts.button.long_press_ms),
        );
        let software_button = button.software();
        let initial_backoff = Duration::from_millis(config.service.reconnect_initial_ms.max(1));
        let source_finished = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let capture = scope.spawn(|| {
                capture_loop(source, &latest, &shared, initial_backoff);
                source_finished.store(true, Ordering::Relaxed);
            });
            let (predictor_ref, latest_ref, shared_ref, config_ref) =
                (&predictor, &latest, &shared, &config);
            let encoder_jobs = job_tx.clone();
            let encoder = scope.spawn(move || {
                encode_loop(
                    predictor_ref,
                    latest_ref,
                    shared_ref,
                    &encoder_jobs,
                    per_frame_prompts,
                )
            });
            let button_jobs = job_tx.clone();
            let button_thread = scope.spawn(move || {
                button_loop(
                    button_edges,
                    debouncer,
                    config_ref,
                    shared_ref,
                    &button_jobs,
                )
            });
            let control_scope = control.as_ref().map(|server| {
                let jobs = job_tx.clone();
                let software_button = software_button.clone();
                scope.spawn(move || server.serve(jobs, shared_ref, config_ref, software_button))
            });
            let mqtt_scope = mqtt_commands.map(|commands| {
                let responder = Responder {
                    jobs: job_tx.clone(),
                    shared: shared_ref,
                    config: config_ref,
                    button: software_button.clone(),
                    reply_timeout: Duration::from_secs_f64(config_ref.control.reply_timeout_s),
                    via: "mqtt command",
                };
                scope.spawn(move || {
                    while !responder.shared.stopping() {
                        if let Some(command) = commands.next(POLL) {
                            commands.reply(&responder.answer(&command));
                        }
                    }
                })
            });
            // The decoder's operators run on a pool of their own: in the shared one they would
            // wait behind the tasks of the encoder operator in flight when a prompt arrives.
            let decoder = scope.spawn(|| {
                crate::engine::with_own_compute_pool(threads, || {
                    let mut decoder = Decoder {
                        predictor: &predictor,
                        detector: detector.as_ref(),
                        config: &config,
                        shared: &shared,
                        events: event_tx,
                        next_event_id: 0,
                        threads,
                    };
                    for job in job_rx {
                        decoder.run_job(job);
                    }
                })
            });
            let sink_thread = scope.spawn(|| sink_loop(event_rx, sinks, &shared));

            notifier.notify("READY=1");
            notifier.notify("STATUS=running; waiting for the first frame");
            log::info!("samrt is running");
            let stats_every = (config.service.stats_interval_s > 0.0)
                .then(|| Duration::from_secs_f64(config.service.stats_interval_s));
            let watchdog_every = notifier.watchdog_timeout().map(|t| t / 2);
            let tick = [
                stats_every,
                watchdog_every,
                Some(Duration::from_millis(250)),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(POLL);
            let mut last_stats = Instant::now();
            let mut last_ping = Instant::now();
            loop {
                match shutdown.recv_timeout(tick) {
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                        log::info!("shutting down: draining prompts and flushing sinks");
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                }
                // The watchdog stops when a thread died (a panic): systemd then restarts samrt.
                // An encoder that ended with a finished source is not a failure.
                let encoder_alive =
                    !encoder.is_finished() || source_finished.load(Ordering::Relaxed);
                let pipeline_alive =
                    encoder_alive && !decoder.is_finished() && !sink_thread.is_finished();
                if source_finished.load(Ordering::Relaxed)
                    && encoder.is_finished()
                    && control_scope.is_none()
                    && mqtt_scope.is_none()
                {
                    log::info!(
                        "the source finished and there is no control socket or MQTT command \
                         topic: stopping"
                    );
                    break;
                }
                if let Some(every) = watchdog_every {
                    if pipeline_alive && last_ping.elapsed() >= every {
                        notifier.notify("WATCHDOG=1");
                        last_ping = Instant::now();
                    }
                }
                if let Some(every) = stats_every {
                    if last_stats.elapsed() >= every {
                        let summary = shared.stats.summary();
                        log::info!("stats: {summary}");
                        notifier.notify(&format!("STATUS={summary}"));
                        last_stats = Instant::now();
                    }
                }
            }
            notifier.notify("STOPPING=1");
            shared.stop.store(true, Ordering::Relaxed);
            // Producers first, so that the decoder's queue closes once they are done.
            let _ = capture.join();
            let _ = encoder.join();
            drop(button);
            let _ = button_thread.join();
            if let Some(handle) = control_scope {
                let _ = handle.join();
            }
            if let Some(handle) = mqtt_scope {
                let _ = handle.join();
            }
            drop(job_tx);
            // The decoder finishes every queued prompt, then closes the sinks' queue.
            let _ = decoder.join();
            let _ = sink_thread.join();
            log::info!("final stats: {}", shared.stats.summary());
        });
        Ok(())
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

    #[test]
    fn button_prompt_defaults_to_the_centre() {
        let image = RgbImage::new(640, 480);
        let centre = points_prompt(&[], &image);
        assert_eq!((centre.points[0].x, centre.points[0].y), (320.0, 240.0));
        let fixed = points_prompt(&[[10.0, 20.0], [30.0, 40.0]], &image);
        assert_eq!(fixed.points.len(), 2);
        assert_eq!(fixed.points[1].y, 40.0);
    }
}
