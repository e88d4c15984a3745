//! The control socket: other processes send prompts as line-delimited JSON on a Unix socket and
//! read each answer on the same connection, one line per request, in order.
//!
//! Requests (one JSON object per line; `id` is optional and echoed back):
//!
//! ```text
//! {"id": "a", "points": [[x, y], [x, y, 0]], "box": [x0, y0, x1, y1], "multimask": false}
//! {"id": "b", "everything": true}
//! {"button": "short"}          a software button press (also "long"); answered {"ok": true}
//! {"stats": true}              the service's counters
//! ```
//!
//! Answers are the mask event's JSON record (as every sink gets it, with `request_id`), or
//! `{"id": ..., "error": "..."}`. A malformed line is answered with an error; the connection
//! and the service go on.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use super::buttons::SoftwareButton;
use super::config::{ControlConfig, ServiceConfig};
use super::event::PromptOrigin;
use super::pipeline::{submit, Job, Shared};
use super::stats::bump;
use crate::prompt::{point_from_values, BoxPrompt, Prompt};

pub use super::pipeline::MAX_REQUEST_BYTES;
/// How long a software "short" press is held.
const SOFTWARE_SHORT_PRESS: Duration = Duration::from_millis(80);
const POLL: Duration = Duration::from_millis(100);

/// One request, as parsed from a line.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Request {
    /// Read from the raw JSON (so that even a request that fails to parse echoes it); listed
    /// here so that `deny_unknown_fields` accepts it.
    #[allow(dead_code)]
    id: Option<Value>,
    points: Option<Vec<Vec<f64>>>,
    #[serde(rename = "box")]
    bbox: Option<[f64; 4]>,
    multimask: Option<bool>,
    everything: Option<bool>,
    button: Option<String>,
    stats: Option<bool>,
}

/// What a request asks for.
#[derive(Debug, PartialEq)]
pub enum Action {
    Prompt {
        prompt: Prompt,
        multimask: Option<bool>,
    },
    Everything,
    Button {
        long: bool,
    },
    Stats,
}

/// A parsed request: its id (as a string) and action.
#[derive(Debug, PartialEq)]
pub struct ControlRequest {
    pub id: Option<String>,
    pub action: Action,
}

/// Parses one request line; the error says what is wrong and what is expected.
pub fn parse_request(line: &str) -> Result<ControlRequest, (Option<String>, String)> {
    let value: Value = serde_json::from_str(line).map_err(|e| {
        (
            None,
            format!("not JSON ({e}); send one JSON object per line"),
        )
    })?;
    let id = value.get("id").map(|id| match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    let fail = |reason: String| (id.clone(), reason);
    let request: Request = serde_json::from_value(value.clone()).map_err(|e| {
        fail(format!(
            "{e}; expected keys: id, points, box, multimask, everything, button, stats"
        ))
    })?;
    let wants_prompt = request.points.is_some() || request.bbox.is_some();
    let actions = [
        wants_prompt,
        request.everything == Some(true),
        request.button.is_some(),
        request.stats == Some(true),
    ];
    if actions.iter().filter(|&&a| a).count() != 1 {
        return Err(fail(
            "give exactly one of: points and/or box, \"everything\": true, \"button\", \"stats\": true".into(),
        ));
    }
    let action = if wants_prompt {
        let points = request
            .points
            .unwrap_or_default()
            .iter()
            .map(|p| point_from_values(p).map_err(|e| fail(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let bbox = request
            .bbox
            .map(|[x0, y0, x1, y1]| BoxPrompt { x0, y0, x1, y1 });
        Action::Prompt {
            prompt: Prompt {
                points,
                bbox,
                mask_input: None,
            },
            multimask: request.multimask,
        }
    } else if request.everything == Some(true) {
        Action::Everything
    } else if let Some(button) = request.button {
        match button.as_str() {
            "short" => Action::Button { long: false },
            "long" => Action::Button { long: true },
            other => {
                return Err(fail(format!(
                    "button {other:?}: give \"short\" or \"long\""
                )))
            }
        }
    } else {
        Action::Stats
    };
    Ok(ControlRequest { id, action })
}

/// The listening socket.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    max_clients: usize,
    reply_timeout: Duration,
}

impl ControlServer {
    /// Binds the socket (replacing a stale one) with mode 0660: the service's group may send.
    pub fn bind(config: &ControlConfig) -> Result<Self, String> {
        let path = PathBuf::from(&config.socket);
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                return Err(format!(
                    "[control] socket {} is in use: is another samrt running?",
                    path.display()
                ));
            }
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path).map_err(|e| {
            format!("[control] cannot listen on {}: {e} (is the directory there and writable? under systemd use RuntimeDirectory=samrt)", path.display())
        })?;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660));
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("[control] {e}"))?;
        Ok(ControlServer {
            listener,
            path,
            max_clients: config.max_clients,
            reply_timeout: Duration::from_secs_f64(config.reply_timeout_s),
        })
    }

    /// Accepts clients until the service stops; each client is served on its own thread.
    pub fn serve(
        &self,
        jobs: SyncSender<Job>,
        shared: &Shared,
        config: &ServiceConfig,
        button: Option<SoftwareButton>,
    ) {
        let clients = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            while !shared.stopping() {
                match self.listener.accept() {
                    Ok((mut stream, _)) => {
                        if clients.load(Ordering::Relaxed) >= self.max_clients {
                            let _ = writeln!(
                                stream,
                                "{}",
                                json!({"error": format!("too many clients (max_clients = {})", self.max_clients)})
                            );
                            continue;
                        }
                        clients.fetch_add(1, Ordering::Relaxed);
                        let jobs = jobs.clone();
                        let button = button.clone();
                        let clients = &clients;
                        scope.spawn(move || {
                            let client = Client {
                                stream,
                                responder: Responder {
                                    jobs,
                                    shared,
                                    config,
                                    button,
                                    reply_timeout: self.reply_timeout,
                                    via: "control socket",
                                },
                            };
                            if let Err(e) = client.serve() {
                                log::debug!("control client: {e}");
                            }
                            clients.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL / 2),
                    Err(e) => {
                        log::warn!("control socket: accept failed: {e}");
                        std::thread::sleep(POLL);
                    }
                }
            }
        });
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Client<'a> {
    stream: UnixStream,
    responder: Responder<'a>,
}

/// Answers requests, whichever way they came (the control socket, MQTT's `{topic}/cmd`).
pub struct Responder<'a> {
    pub jobs: SyncSender<Job>,
    pub shared: &'a Shared,
    pub config: &'a ServiceConfig,
    pub button: Option<SoftwareButton>,
    pub reply_timeout: Duration,
    /// Where requests come from, for the log: "control socket", "mqtt command".
    pub via: &'static str,
}

impl Client<'_> {
    fn serve(mut self) -> std::io::Result<()> {
        self.stream.set_nonblocking(false)?;
        self.stream.set_read_timeout(Some(POLL))?;
        let mut reader = self.stream.try_clone()?;
        let mut pending: Vec<u8> = Vec::new();
        let mut skipping = false;
        let mut chunk = [0u8; 4096];
        loop {
            // Answer every complete line first.
            while let Some(newline) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=newline).collect();
                if std::mem::take(&mut skipping) {
                    continue;
                }
                let answer = self.responder.answer(&line[..line.len() - 1]);
                writeln!(self.stream, "{answer}")?;
            }
            if pending.len() > MAX_REQUEST_BYTES {
                pending.clear();
                if !skipping {
                    bump(&self.responder.shared.stats.control_errors);
                    writeln!(
                        self.stream,
                        "{}",
                        json!({"error": format!("request longer than {MAX_REQUEST_BYTES} bytes")})
                    )?;
                }
                skipping = true;
            }
            if self.responder.shared.stopping() {
                return Ok(());
            }
            match reader.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Responder<'_> {
    /// The answer to one request line (without its newline): the mask event's record, the
    /// stats, `{"ok": true}` or `{"id": ..., "error": ...}`.
    pub fn answer(&self, line: &[u8]) -> Value {
        let received = Instant::now();
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if text.is_empty() {
            return json!({"error": "empty line: send one JSON object per line"});
        }
        let request = match parse_request(text) {
            Ok(request) => request,
            Err((id, error)) => {
                bump(&self.shared.stats.control_errors);
                log::warn!("{}: bad request: {error}", self.via);
                return json!({"id": id, "error": error});
            }
        };
        let id = request.id.clone();
        let (reply_tx, reply_rx) = mpsc::channel();
        let origin = PromptOrigin::Control {
            request_id: id.clone(),
        };
        let job = match request.action {
            Action::Stats => return json!({"id": id, "stats": self.shared.stats.snapshot()}),
            Action::Button { long } => {
                let Some(button) = &self.button else {
                    return json!({"id": id, "error": "the software button is off: set [prompts.button] backend = \"software\""});
                };
                let held = if long {
                    Duration::from_millis(self.config.prompts.button.long_press_ms)
                        + SOFTWARE_SHORT_PRESS
                } else {
                    SOFTWARE_SHORT_PRESS
                };
                button.press(held);
                return json!({"id": id, "ok": true});
            }
            Action::Everything => Job::Everything {
                origin,
                received,
                reply: Some(reply_tx),
            },
            Action::Prompt { prompt, multimask } => Job::Prompt {
                origin,
                prompt,
                multimask: multimask.unwrap_or(self.config.prompts.multimask),
                received,
                reply: Some(reply_tx),
            },
        };
        if !submit(&self.jobs, job, self.shared, "control request") {
            return json!({"id": id, "error": "busy: the prompt queue is full, try again"});
        }
        match reply_rx.recv_timeout(self.reply_timeout) {
            Ok(Ok(event)) => event,
            Ok(Err(error)) => json!({"id": id, "error": error}),
            Err(_) => {
                json!({"id": id, "error": format!("no answer within {} s (raise [control] reply_timeout_s)", self.reply_timeout.as_secs_f64())})
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::{PointLabel, PointPrompt};

    #[test]
    fn parses_each_action() {
        let r =
            parse_request(r#"{"id": "a", "points": [[10, 20], [30, 40, 0]], "box": [1, 2, 3, 4]}"#)
                .unwrap();
        assert_eq!(r.id.as_deref(), Some("a"));
        let Action::Prompt { prompt, multimask } = r.action else {
            panic!()
        };
        assert_eq!(multimask, None);
        assert_eq!(
            prompt.points[1],
            PointPrompt {
                x: 30.0,
                y: 40.0,
                label: PointLabel::Background
            }
        );
        assert_eq!(
            prompt.bbox,
            Some(BoxPrompt {
                x0: 1.0,
                y0: 2.0,
                x1: 3.0,
                y1: 4.0
            })
        );
        assert_eq!(
            parse_request(r#"{"id": 7, "everything": true}"#).unwrap(),
            ControlRequest {
                id: Some("7".into()),
                action: Action::Everything
            }
        );
        assert_eq!(
            parse_request(r#"{"button": "long"}"#).unwrap().action,
            Action::Button { long: true }
        );
        assert_eq!(
            parse_request(r#"{"stats": true}"#).unwrap().action,
            Action::Stats
        );
    }

    #[test]
    fn malformed_requests_say_why() {
        let cases = [
            ("{\"points\": [[1, 2]", "not JSON"),
            ("[1, 2]", "invalid type"),
            (
                r#"{"id": "x", "pionts": [[1, 2]]}"#,
                "unknown field `pionts`",
            ),
            (r#"{"points": [[1]]}"#, "[x, y] or [x, y, label]"),
            (r#"{"points": [[1, 2, 5]]}"#, "label"),
            (r#"{"stats": true, "everything": true}"#, "exactly one"),
            (r#"{}"#, "exactly one"),
            (r#"{"button": "double"}"#, "\"short\" or \"long\""),
        ];
        for (line, expected) in cases {
            let (_, error) = parse_request(line).unwrap_err();
            assert!(error.contains(expected), "{line}: {error}");
        }
        let (id, _) = parse_request(r#"{"id": "x", "pionts": []}"#).unwrap_err();
        assert_eq!(id.as_deref(), Some("x"));
    }
}
