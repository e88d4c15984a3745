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
//! frame holds before its next operator ([`PromptPriority`](super::priority::PromptPriority)), so a press never waits for an
//! encode.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::buttons::{start_button, ButtonEdge, ButtonHandle, ButtonPress, Debouncer, PressKind};
use super::config::ServiceConfig;
use super::control::{ControlServer, Responder};
use super::event::{MaskEvent, PromptOrigin};
use super::jobs::{guarded, points_prompt, Decoder};
use super::notify::Notifier;
use super::pipeline::{
    sleep_unless_stopped, submit, EncodedFrame, Frame, Job, LatestFrame, Shared, POLL,
};
use super::sinks::mqtt::MqttCommands;
use super::sinks::{open_sinks, Sink};
use super::sources::{open_source, FrameSource, SourceError};
use super::stats::bump;
use crate::detector::Detector;
use crate::model::ModelFiles;
use crate::parallel::default_threads;
use crate::predictor::SamPredictor;

/// The longest wait between reconnect attempts of a source that is gone.
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);
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
        let opened = open_sinks(&config.sinks)?;
        let (sinks, mqtt_commands) = (opened.sinks, opened.mqtt_commands);
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
