//! The decoder thread's work: each [`Job`] decoded against the newest embedding (prompts,
//! segment everything, the per-frame fixed points and detector boxes), its event sent to the
//! sinks and its answer to whoever asked. A panic inside a job is caught here ([`guarded`]).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Sender, SyncSender};
use std::time::{Duration, Instant, SystemTime};

use image::RgbImage;
use serde_json::Value;

use super::config::ServiceConfig;
use super::event::{json_line, EventMask, MaskEvent, PromptOrigin};
use super::pipeline::{EncodedFrame, Job, Reply, Shared};
use super::stats::{bump, Stats};
use crate::amg::AmgParams;
use crate::detector::{Detector, DetectorParams};
use crate::error::panic_message;
use crate::predictor::{MaskOutput, Prediction, SamPredictor};
use crate::prompt::{PointLabel, PointPrompt, Prompt};

/// Runs `job`; a panic inside it becomes an error naming `what`, counted in `panics` and logged.
pub(super) fn guarded<T>(
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
pub(super) struct Decoder<'a> {
    pub(super) predictor: &'a SamPredictor,
    pub(super) detector: Option<&'a Detector>,
    pub(super) config: &'a ServiceConfig,
    pub(super) shared: &'a Shared,
    /// Each event with its JSON record, serialized once for every sink.
    pub(super) events: SyncSender<(MaskEvent, Vec<u8>)>,
    pub(super) next_event_id: u64,
    pub(super) threads: usize,
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
    pub(super) fn run_job(&mut self, job: Job) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
