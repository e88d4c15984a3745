//! The MQTT sink: every [`MaskEvent`] goes out as its JSON record ([`MaskEvent::to_json`]) to the
//! topic `{topic}/{source}` of an MQTT 3.1.1 broker, e.g. `samrt/masks/button`.
//!
//! The client is [`rumqttc`], over TCP or over TLS (`tls = true`: rustls with the ring provider,
//! the broker checked against `ca_file`, optionally a client certificate). The user name comes
//! from the config, the password from `password_file`, never from the config itself; a relative
//! file name is a systemd credential (`LoadCredential=` in the unit, read from
//! `$CREDENTIALS_DIRECTORY`).
//!
//! Topics under the prefix:
//! - `{topic}/{source}`: the events, at `qos`;
//! - `{topic}/status`: retained, `online` once connected, `offline` at a clean stop and, as the
//!   last will, when the broker loses samrt without one (a crash, a pulled cable);
//! - `{topic}/cmd` (with `commands = true`): requests exactly as the control socket takes them
//!   (points, box, everything, button, stats, with `id`); each answer goes to `{topic}/cmd/reply`.
//!
//! [`MqttSink::emit`] never touches the network: it serializes the event and puts it on a bounded
//! queue of [`MQTT_QUEUE_CAPACITY`] messages; when the queue is full the oldest message not yet
//! handed to the client is dropped and counted in [`Sink::dropped`]. Up to `max_inflight` messages
//! are in flight at once; at QoS 1 a message leaves the queue only when the broker acknowledged it.
//! One worker thread drives the connection: when the broker is unreachable it logs one warning per
//! outage and reconnects with exponential backoff (100 ms doubling to 5 s). Every session is clean,
//! and after a reconnection the messages that were in flight are sent again, in order, before the
//! rest: nothing is lost unless the queue overflows (at QoS 0, a message written into a connection
//! that broke unnoticed is lost too).

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rumqttc::{
    Client, ConnectReturnCode, Connection, ConnectionError, Event, Incoming, LastWill, MqttOptions,
    Outgoing, QoS, RecvTimeoutError, TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use super::{MaskEvent, Sink, SinkError};

/// How many messages (events and command replies) wait for the broker at most; past this the
/// oldest is dropped.
pub const MQTT_QUEUE_CAPACITY: usize = 256;
/// The most messages in flight that `max_inflight` may ask for.
pub const MAX_INFLIGHT: u16 = 64;
/// The retained status while connected.
pub const STATUS_ONLINE: &str = "online";
/// The retained status after a clean stop, and the last will.
pub const STATUS_OFFLINE: &str = "offline";
/// The longest command accepted on `{topic}/cmd` (as the control socket's longest line).
pub const MAX_COMMAND_BYTES: usize = crate::service::pipeline::MAX_REQUEST_BYTES;
/// Commands received and not yet answered; one more is answered "busy".
const MAX_COMMANDS_WAITING: usize = 16;
/// Debian's bundle of the system's certificate authorities: the broker's certificate is checked
/// against it when `tls = true` and `ca_file` is not set.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The first reconnection delay; it doubles after every failed attempt.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest reconnection delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the worker waits for the connection before it looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// How long a stop waits for the `offline` status and the DISCONNECT to go out.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest packet MQTT can encode (a remaining length of four bytes of 7 bits).
const MAX_PACKET: usize = 268_435_455;
/// The longest UTF-8 string or binary field (a two-byte length prefix).
const MAX_FIELD_LENGTH: usize = 65_535;
/// The longest name appended to the topic prefix: a source ([`PromptOrigin::kind`]) or `cmd/reply`.
///
/// [`PromptOrigin::kind`]: crate::service::event::PromptOrigin::kind
const LONGEST_SUBTOPIC: usize = "button_long".len();

/// `[sinks.mqtt]`: publishing masks to an MQTT broker, and taking commands from it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct MqttConfig {
    /// Publish masks to an MQTT broker. Default: `false`.
    pub enabled: bool,
    /// The broker's host name or IP address; with TLS, the name its certificate must carry.
    /// Default: `"127.0.0.1"`.
    pub host: String,
    /// The broker's port: usually 1883 for plain MQTT, 8883 for MQTT over TLS. Default: `1883`.
    pub port: u16,
    /// The topic prefix: each event goes to `{topic}/{source}`, where source is what asked for the
    /// mask (`button`, `button_long`, `fixed`, `detector`, `control`), e.g. `samrt/masks/button`;
    /// the status is `{topic}/status`, commands `{topic}/cmd`. Must not be empty, start with `$`
    /// or contain the wildcards `+` and `#`; a trailing `/` is ignored. Default: `"samrt/masks"`.
    pub topic: String,
    /// The MQTT client identifier. Must be unique on the broker: a second client connecting with
    /// the same identifier disconnects the first. Default: `"samrt"`.
    pub client_id: String,
    /// Quality of service: `0` (at most once: no acknowledgement, an event written into a
    /// connection that just broke is lost) or `1` (at least once: an event leaves the queue only
    /// when the broker acknowledged it; after a reconnection it may arrive twice). Default: `1`.
    pub qos: u8,
    /// Messages sent and not yet acknowledged at once (1 to 64). Default: `16`.
    pub max_inflight: u16,
    /// Seconds without traffic after which the connection is checked with a PINGREQ; the broker
    /// drops clients silent for 1.5 times this, and then publishes the last will. `0` turns
    /// keep-alive off. Default: `30`.
    pub keep_alive_s: u16,
    /// User name, when the broker requires authentication; `""` = none. Default: none.
    #[serde(with = "crate::service::fields::empty_is_none")]
    pub username: Option<String>,
    /// The file holding the password (its first line), with `username`; `""` = none. A relative
    /// name is a systemd credential: `LoadCredential=mqtt-password:/etc/samrt/mqtt-password` in
    /// the unit and `password_file = "mqtt-password"` here. Keep it readable by samrt only.
    /// Default: none.
    #[serde(with = "crate::service::fields::empty_is_none")]
    pub password_file: Option<String>,
    /// Refused: a password in the config is readable by every user of the device. Use
    /// `password_file`.
    #[serde(with = "crate::service::fields::empty_is_none", skip_serializing)]
    pub password: Option<String>,
    /// MQTT over TLS: the broker's certificate is checked against `ca_file` and `host`.
    /// Default: `false`.
    pub tls: bool,
    /// PEM file of the certificate authorities that sign the broker's certificate; `""` = the
    /// system's (`/etc/ssl/certs/ca-certificates.crt`). Relative = a systemd credential.
    /// Default: none.
    #[serde(with = "crate::service::fields::empty_is_none")]
    pub ca_file: Option<String>,
    /// PEM file of samrt's own certificate, for brokers that require client certificates
    /// (`require_certificate true` in mosquitto), with `client_key_file`. Default: none.
    #[serde(with = "crate::service::fields::empty_is_none")]
    pub client_cert_file: Option<String>,
    /// PEM file of the private key of `client_cert_file` (PKCS#8, PKCS#1 or SEC1). Relative = a
    /// systemd credential. Default: none.
    #[serde(with = "crate::service::fields::empty_is_none")]
    pub client_key_file: Option<String>,
    /// Take requests on `{topic}/cmd` and answer on `{topic}/cmd/reply`: whoever may publish
    /// there can prompt samrt and press its software button, so restrict the topic on the broker
    /// (an ACL). Default: `false`.
    pub commands: bool,
    /// Milliseconds to wait for the TCP and TLS connection and the broker's CONNACK (rounded up to
    /// whole seconds). Default: `2000`.
    pub connect_timeout_ms: u64,
    /// Milliseconds the shutdown waits for queued events to reach the broker. Default: `3000`.
    pub flush_timeout_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 1883,
            topic: "samrt/masks".into(),
            client_id: "samrt".into(),
            qos: 1,
            max_inflight: 16,
            keep_alive_s: 30,
            username: None,
            password_file: None,
            password: None,
            tls: false,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            commands: false,
            connect_timeout_ms: 2000,
            flush_timeout_ms: 3000,
        }
    }
}

impl MqttConfig {
    /// Checks the values the protocol cannot carry; the error names the field and the fix. Files
    /// are read at [`MqttSink::start`].
    pub fn validate(&self) -> Result<(), String> {
        if self.qos > 1 {
            return Err(format!(
                "qos = {}: must be 0 or 1 (QoS 2 is not supported)",
                self.qos
            ));
        }
        if self.host.trim().is_empty() {
            return Err("host is empty: give the broker's host name or IP address".into());
        }
        let topic = self.topic_prefix();
        if topic.is_empty() {
            return Err(format!(
                "topic = {:?}: must not be empty (e.g. \"samrt/masks\")",
                self.topic
            ));
        }
        if topic.contains(['+', '#']) {
            return Err(format!(
                "topic = {:?}: contains a wildcard ('+' or '#'), which only subscriptions may use; \
                 give a plain prefix such as \"samrt/masks\"",
                self.topic
            ));
        }
        if topic.starts_with('$') {
            return Err(format!(
                "topic = {:?}: topics starting with '$' are reserved for the broker",
                self.topic
            ));
        }
        if topic.contains('\0') {
            return Err(format!(
                "topic = {:?}: must not contain a NUL character",
                self.topic
            ));
        }
        if topic.len() + 1 + LONGEST_SUBTOPIC > MAX_FIELD_LENGTH {
            return Err(format!(
                "topic: {} bytes, too long for MQTT (at most {} bytes)",
                topic.len(),
                MAX_FIELD_LENGTH - 1 - LONGEST_SUBTOPIC
            ));
        }
        for (name, value) in [
            ("client_id", Some(&self.client_id)),
            ("username", self.username.as_ref()),
        ] {
            if let Some(value) = value {
                if value.len() > MAX_FIELD_LENGTH {
                    return Err(format!(
                        "{name}: {} bytes, too long for MQTT (at most {MAX_FIELD_LENGTH})",
                        value.len()
                    ));
                }
            }
        }
        if self.password.is_some() {
            return Err(
                "password: a password in the config file is readable by every user of the \
                 device; put it in a file only samrt can read and set password_file = \
                 \"/etc/samrt/mqtt-password\" (or a systemd credential: LoadCredential= in the \
                 unit, password_file = \"<its name>\")"
                    .into(),
            );
        }
        if self.password_file.is_some() && self.username.is_none() {
            return Err(
                "password_file is set without username: MQTT 3.1.1 sends a password only with a \
                 user name"
                    .into(),
            );
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(
                "client_cert_file and client_key_file go together: set both (a client \
                 certificate) or neither"
                    .into(),
            );
        }
        if !self.tls
            && (self.ca_file.is_some()
                || self.client_cert_file.is_some()
                || self.client_key_file.is_some())
        {
            return Err(
                "ca_file, client_cert_file and client_key_file need tls = true (the connection \
                 is plain TCP without it)"
                    .into(),
            );
        }
        if self.max_inflight == 0 || self.max_inflight > MAX_INFLIGHT {
            return Err(format!(
                "max_inflight = {}: must be 1 to {MAX_INFLIGHT}",
                self.max_inflight
            ));
        }
        if self.connect_timeout_ms == 0 {
            return Err("connect_timeout_ms = 0: must be at least 1".into());
        }
        Ok(())
    }

    /// The topic without its trailing slashes.
    fn topic_prefix(&self) -> &str {
        self.topic.trim_end_matches('/')
    }

    /// `host:port`, for messages.
    fn broker_address(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }

    /// The client options: identity, credentials, last will, TLS. Reads the files; the error
    /// names the key, the file and the fix.
    fn options(&self) -> Result<MqttOptions, String> {
        let mut options = MqttOptions::new(&self.client_id, self.host.trim(), self.port);
        options
            .set_clean_session(true)
            .set_keep_alive(Duration::from_secs(u64::from(self.keep_alive_s)))
            .set_inflight(self.max_inflight)
            .set_max_packet_size(MAX_COMMAND_BYTES + MAX_FIELD_LENGTH + 16, MAX_PACKET)
            .set_last_will(LastWill::new(
                status_topic(self.topic_prefix()),
                STATUS_OFFLINE,
                QoS::AtLeastOnce,
                true,
            ));
        if let Some(username) = &self.username {
            let password = match &self.password_file {
                Some(file) => read_password(&credential_path("password_file", file)?)?,
                None => String::new(),
            };
            options.set_credentials(username, password);
        }
        if self.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(self.tls_config()?),
            )));
        }
        Ok(options)
    }

    /// rustls' client configuration (ring; TLS 1.2 and 1.3).
    fn tls_config(&self) -> Result<rustls::ClientConfig, String> {
        let ca_path = match &self.ca_file {
            Some(file) => credential_path("ca_file", file)?,
            None => PathBuf::from(SYSTEM_CA_BUNDLE),
        };
        let mut roots = rustls::RootCertStore::empty();
        for certificate in read_certificates("ca_file", &ca_path)? {
            roots.add(certificate).map_err(|e| {
                format!(
                    "ca_file {}: a certificate rustls cannot use as an authority: {e}",
                    ca_path.display()
                )
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => {
                let cert_path = credential_path("client_cert_file", cert)?;
                let key_path = credential_path("client_key_file", key)?;
                let chain = read_certificates("client_cert_file", &cert_path)?;
                let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
                    format!(
                        "client_key_file {}: no private key read ({e}): give the PEM key \
                         (-----BEGIN PRIVATE KEY-----) of client_cert_file",
                        key_path.display()
                    )
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!(
                        "client_cert_file {} and client_key_file {} do not go together: {e}",
                        cert_path.display(),
                        key_path.display()
                    )
                })
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

/// `{prefix}/status`.
fn status_topic(prefix: &str) -> String {
    format!("{prefix}/status")
}

/// Where a file key points: an absolute path as given; a relative name is a systemd credential,
/// in `$CREDENTIALS_DIRECTORY`.
fn credential_path(key: &str, value: &str) -> Result<PathBuf, String> {
    let path = Path::new(value);
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) => Ok(Path::new(&dir).join(path)),
        None => Err(format!(
            "{key} = {value:?} is a relative name, which means a systemd credential, but \
             $CREDENTIALS_DIRECTORY is not set: give an absolute path, or load it in the unit \
             with LoadCredential={value}:/etc/samrt/{value}"
        )),
    }
}

/// The first line of the password file; warns when other users may read it.
fn read_password(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "password_file {}: {e} (the file must exist and be readable by samrt)",
            path.display()
        )
    })?;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            log::warn!(
                "mqtt: password_file {} is readable by every user: chmod 600 it (or use a \
                 systemd credential)",
                path.display()
            );
        }
    }
    let password = text.lines().next().unwrap_or("").to_string();
    if password.is_empty() {
        return Err(format!(
            "password_file {}: the first line is empty: write the password on it",
            path.display()
        ));
    }
    if password.len() > MAX_FIELD_LENGTH {
        return Err(format!(
            "password_file {}: {} bytes, too long for MQTT (at most {MAX_FIELD_LENGTH})",
            path.display(),
            password.len()
        ));
    }
    Ok(password)
}

/// Every certificate of a PEM file; none is an error.
fn read_certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let unreadable = |e: &dyn std::fmt::Display| {
        format!(
            "{key} {}: {e} (a PEM file of certificates, -----BEGIN CERTIFICATE-----, readable by \
             samrt)",
            path.display()
        )
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(&e))?;
    if certificates.is_empty() {
        return Err(unreadable(&"no certificate in it"));
    }
    Ok(certificates)
}

// ---------------------------------------------------------------------------------------------
// The queue.
// ---------------------------------------------------------------------------------------------

/// What a queued message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A mask event: counted in `sent`, `queued` and `dropped`.
    Event,
    /// The answer to a command.
    Reply,
    /// `online` or `offline` on the status topic (retained); never dropped.
    Status,
}

/// Where a message is on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not handed to the client yet.
    Waiting,
    /// Handed to the client, not written yet.
    Submitted,
    /// Written with this packet id, waiting for the PUBACK (QoS 1).
    InFlight(u16),
}

#[derive(Debug)]
struct Message {
    seq: u64,
    kind: Kind,
    topic: String,
    payload: Vec<u8>,
    qos: QoS,
    stage: Stage,
}

/// The queue and the flags that go with it, under one mutex.
#[derive(Debug, Default)]
struct QueueState {
    /// In order; the messages handed to the client are always before the waiting ones.
    messages: VecDeque<Message>,
    /// The sequence numbers handed to the client, in order: the client writes them in this order,
    /// and reports each with `Outgoing::Publish(packet id)`.
    submitted: VecDeque<u64>,
    next_seq: u64,
    /// The broker accepted the connection (CONNACK) and it has not broken since.
    connected: bool,
    /// Set by flush and drop: the worker says goodbye and ends.
    stop: bool,
    /// An overflow was logged; reset when the queue empties.
    overflow_reported: bool,
}

impl QueueState {
    /// Events and replies waiting or in flight (not the status).
    fn pending(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.kind != Kind::Status)
            .count()
    }

    fn events(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.kind == Kind::Event)
            .count()
    }

    /// Appends a message; when the queue is full, first removes the oldest one not handed to the
    /// client. Returns whether an event was dropped.
    fn push(&mut self, kind: Kind, topic: String, payload: Vec<u8>, qos: QoS) -> bool {
        let mut dropped_event = false;
        if kind != Kind::Status && self.pending() >= MQTT_QUEUE_CAPACITY {
            if let Some(index) = self
                .messages
                .iter()
                .position(|m| m.kind != Kind::Status && m.stage == Stage::Waiting)
            {
                dropped_event = self.messages.remove(index).map(|m| m.kind) == Some(Kind::Event);
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let message = Message {
            seq,
            kind,
            topic,
            payload,
            qos,
            stage: Stage::Waiting,
        };
        if kind == Kind::Status {
            // Before every other waiting message; replaces a status not sent yet.
            self.messages
                .retain(|m| !(m.kind == Kind::Status && m.stage == Stage::Waiting));
            let first_waiting = self
                .messages
                .iter()
                .position(|m| m.stage == Stage::Waiting)
                .unwrap_or(self.messages.len());
            self.messages.insert(first_waiting, message);
        } else {
            self.messages.push_back(message);
        }
        dropped_event
    }

    /// Messages handed to the client and not finished.
    fn busy(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.stage != Stage::Waiting)
            .count()
    }

    /// The client wrote the oldest submitted message with `packet_id`: at QoS 0 it is done
    /// (returned), at QoS 1 it waits for its PUBACK.
    fn written(&mut self, packet_id: u16) -> Option<Message> {
        let seq = self.submitted.pop_front()?;
        let index = self.messages.iter().position(|m| m.seq == seq)?;
        if self.messages[index].qos == QoS::AtMostOnce {
            self.messages.remove(index)
        } else {
            self.messages[index].stage = Stage::InFlight(packet_id);
            None
        }
    }

    /// The broker acknowledged `packet_id`: that message is done.
    fn acknowledged(&mut self, packet_id: u16) -> Option<Message> {
        let index = self
            .messages
            .iter()
            .position(|m| m.stage == Stage::InFlight(packet_id))?;
        self.messages.remove(index)
    }

    /// The connection broke: every message handed to the client waits again, in order (the next
    /// session is clean, so the client forgets them).
    fn reset(&mut self) {
        self.connected = false;
        self.submitted.clear();
        for message in &mut self.messages {
            message.stage = Stage::Waiting;
        }
    }
}

/// What the sink, the command replies and the worker share.
struct Core {
    state: Mutex<QueueState>,
    /// Signalled on every change of the state.
    changed: Condvar,
    client: Client,
    prefix: String,
    qos: QoS,
    max_inflight: usize,
    connected: AtomicBool,
    sent: AtomicU64,
    dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_until<'a>(
        &self,
        guard: MutexGuard<'a, QueueState>,
        deadline: Instant,
    ) -> MutexGuard<'a, QueueState> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.changed.wait_timeout(guard, left) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    /// Queues a message and hands what the window allows to the client. Returns whether an event
    /// was dropped to make room.
    fn enqueue(&self, kind: Kind, topic: String, payload: Vec<u8>, qos: QoS) -> bool {
        let mut state = self.lock();
        let dropped = state.push(kind, topic, payload, qos);
        self.feed(&mut state);
        drop(state);
        self.changed.notify_all();
        dropped
    }

    /// Hands waiting messages to the client, in order, while connected and fewer than
    /// `max_inflight` are in flight.
    fn feed(&self, state: &mut QueueState) {
        if !state.connected {
            return;
        }
        let mut busy = state.busy();
        let QueueState {
            messages,
            submitted,
            ..
        } = state;
        for message in messages.iter_mut() {
            if busy >= self.max_inflight {
                break;
            }
            if message.stage != Stage::Waiting {
                continue;
            }
            let retain = message.kind == Kind::Status;
            match self.client.try_publish(
                message.topic.as_str(),
                message.qos,
                retain,
                message.payload.clone(),
            ) {
                Ok(()) => {
                    message.stage = Stage::Submitted;
                    submitted.push_back(message.seq);
                    busy += 1;
                }
                // The client's channel is full (a subscription or disconnect took a slot): the
                // next event of the connection feeds again.
                Err(_) => break,
            }
        }
    }

    /// The client wrote a message with `packet_id`; at QoS 0 that frees its slot.
    fn on_written(&self, packet_id: u16) {
        let mut state = self.lock();
        let done = state.written(packet_id);
        self.feed(&mut state);
        drop(state);
        self.finished(done);
        self.changed.notify_all();
    }

    /// The broker acknowledged `packet_id`: the message is done and its slot free.
    fn on_acknowledged(&self, packet_id: u16) {
        let mut state = self.lock();
        let done = state.acknowledged(packet_id);
        self.feed(&mut state);
        drop(state);
        self.finished(done);
        self.changed.notify_all();
    }

    /// A message is done: counted when it is an event.
    fn finished(&self, message: Option<Message>) {
        if let Some(message) = message {
            if message.kind == Kind::Event {
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits until no event or reply is queued, or `deadline`; returns how many are left.
    fn wait_drained(&self, deadline: Instant) -> usize {
        let mut state = self.lock();
        while state.pending() > 0 && Instant::now() < deadline {
            state = self.wait_until(state, deadline);
        }
        state.pending()
    }

    fn request_stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
    }

    fn stopping(&self) -> bool {
        self.lock().stop
    }

    /// Sleeps `duration` unless a stop is requested; returns whether it was.
    fn sleep_unless_stopped(&self, duration: Duration) -> bool {
        let deadline = Instant::now() + duration;
        let mut state = self.lock();
        while !state.stop && Instant::now() < deadline {
            state = self.wait_until(state, deadline);
        }
        state.stop
    }

    fn set_last_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }
}

// ---------------------------------------------------------------------------------------------
// Commands.
// ---------------------------------------------------------------------------------------------

/// The commands received on `{topic}/cmd`, for the service to answer ([`MqttSink::take_commands`]).
pub struct MqttCommands {
    received: Receiver<Vec<u8>>,
    core: Arc<Core>,
}

impl MqttCommands {
    /// The next command's payload, waiting up to `timeout`; `None` when none came or the sink
    /// stopped.
    pub fn next(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.received.recv_timeout(timeout).ok()
    }

    /// Publishes an answer on `{topic}/cmd/reply` (queued like an event, at the sink's QoS).
    pub fn reply(&self, answer: &serde_json::Value) {
        reply(&self.core, answer);
    }
}

fn reply(core: &Core, answer: &serde_json::Value) {
    let topic = format!("{}/cmd/reply", core.prefix);
    core.enqueue(
        Kind::Reply,
        topic,
        answer.to_string().into_bytes(),
        core.qos,
    );
}

// ---------------------------------------------------------------------------------------------
// The worker thread.
// ---------------------------------------------------------------------------------------------

struct Worker {
    core: Arc<Core>,
    connection: Connection,
    broker: String,
    tls: bool,
    commands: Option<SyncSender<Vec<u8>>>,
    connect_timeout: Duration,
}

impl Worker {
    fn run(mut self) {
        let command_topic = format!("{}/cmd", self.core.prefix);
        // The wait after the next failed attempt; doubles up to `BACKOFF_MAX`.
        let mut backoff = BACKOFF_MIN;
        // A warning was logged for the current outage.
        let mut outage_reported = false;
        let mut ever_connected = false;
        loop {
            if self.core.stopping() {
                break;
            }
            let wait = if self.core.connected.load(Ordering::Relaxed) {
                POLL
            } else {
                // The client bounds the connection attempt; stopping it half way would restart it.
                self.connect_timeout + POLL
            };
            match self.connection.recv_timeout(wait) {
                Ok(Ok(Event::Incoming(Incoming::ConnAck(_)))) => {
                    if outage_reported {
                        log::info!("mqtt: reconnected to broker {}", self.broker);
                    } else if !ever_connected {
                        log::info!("mqtt: connected to broker {}", self.broker);
                    }
                    outage_reported = false;
                    ever_connected = true;
                    self.core.set_last_error(None);
                    self.core.connected.store(true, Ordering::Relaxed);
                    if self.commands.is_some() {
                        if let Err(e) = self
                            .core
                            .client
                            .try_subscribe(command_topic.as_str(), QoS::AtLeastOnce)
                        {
                            log::error!("mqtt: cannot subscribe to {command_topic}: {e}");
                        }
                    }
                    self.core.lock().connected = true;
                    self.core.enqueue(
                        Kind::Status,
                        status_topic(&self.core.prefix),
                        STATUS_ONLINE.into(),
                        QoS::AtLeastOnce,
                    );
                }
                Ok(Ok(Event::Outgoing(Outgoing::Publish(packet_id)))) => {
                    self.core.on_written(packet_id);
                }
                Ok(Ok(Event::Incoming(Incoming::PubAck(ack)))) => {
                    backoff = BACKOFF_MIN;
                    self.core.on_acknowledged(ack.pkid);
                }
                Ok(Ok(Event::Incoming(Incoming::Publish(publish)))) => {
                    if publish.topic == command_topic {
                        self.command(publish.payload.to_vec());
                    }
                }
                Ok(Ok(Event::Incoming(Incoming::PingResp | Incoming::SubAck(_)))) => {
                    backoff = BACKOFF_MIN;
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    self.core.connected.store(false, Ordering::Relaxed);
                    self.core.lock().reset();
                    self.core.changed.notify_all();
                    if self.core.stopping() {
                        break;
                    }
                    let (message, hint) = self.describe(&error, ever_connected);
                    log::debug!("mqtt: {message}");
                    if !outage_reported {
                        log::warn!(
                            "mqtt: {message}; {hint}. Retrying with backoff up to {} s; events \
                             wait in the queue (up to {MQTT_QUEUE_CAPACITY}, then the oldest are \
                             dropped)",
                            BACKOFF_MAX.as_secs()
                        );
                        outage_reported = true;
                    }
                    self.core.set_last_error(Some(format!("{message}; {hint}")));
                    if self.core.sleep_unless_stopped(backoff) {
                        break;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.goodbye();
    }

    /// A command: handed to the service, or answered "busy" when too many wait.
    fn command(&self, payload: Vec<u8>) {
        let Some(commands) = &self.commands else {
            return;
        };
        if payload.len() > MAX_COMMAND_BYTES {
            reply(
                &self.core,
                &serde_json::json!({
                    "error": format!("command longer than {MAX_COMMAND_BYTES} bytes")
                }),
            );
            return;
        }
        if let Err(TrySendError::Full(_)) = commands.try_send(payload) {
            reply(
                &self.core,
                &serde_json::json!({
                    "error": format!(
                        "busy: {MAX_COMMANDS_WAITING} commands wait for an answer, try again"
                    )
                }),
            );
        }
    }

    /// At a stop while connected: `offline` on the status topic (retained), then DISCONNECT
    /// (after which the broker does not publish the last will).
    fn goodbye(&mut self) {
        if !self.core.connected.load(Ordering::Relaxed) {
            return;
        }
        let deadline = Instant::now() + GOODBYE_TIMEOUT;
        let status = status_topic(&self.core.prefix);
        self.core.enqueue(
            Kind::Status,
            status,
            STATUS_OFFLINE.into(),
            QoS::AtLeastOnce,
        );
        let mut disconnecting = false;
        while Instant::now() < deadline {
            if !disconnecting {
                let status_done = !self
                    .core
                    .lock()
                    .messages
                    .iter()
                    .any(|m| m.kind == Kind::Status);
                if status_done {
                    if self.core.client.try_disconnect().is_err() {
                        break;
                    }
                    disconnecting = true;
                }
            }
            match self.connection.recv_timeout(POLL) {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => break,
                Ok(Ok(Event::Outgoing(Outgoing::Publish(packet_id)))) => {
                    self.core.on_written(packet_id);
                }
                Ok(Ok(Event::Incoming(Incoming::PubAck(ack)))) => {
                    self.core.on_acknowledged(ack.pkid);
                }
                Ok(Ok(_)) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.core.connected.store(false, Ordering::Relaxed);
        self.core.changed.notify_all();
    }

    /// The error for the log and `last_error`, and what to check.
    fn describe(&self, error: &ConnectionError, ever_connected: bool) -> (String, &'static str) {
        let what = if ever_connected {
            "lost the connection to"
        } else {
            "cannot connect to"
        };
        let text = error.to_string();
        let hint = match error {
            ConnectionError::ConnectionRefused(code) => {
                let reason = match code {
                    ConnectReturnCode::BadUserNamePassword => {
                        "bad user name or password (check [sinks.mqtt] username and \
                         password_file)"
                    }
                    ConnectReturnCode::NotAuthorized => {
                        "not authorized (check [sinks.mqtt] username and password_file, and the \
                         broker's ACL)"
                    }
                    ConnectReturnCode::BadClientId => {
                        "client identifier rejected (check [sinks.mqtt] client_id)"
                    }
                    ConnectReturnCode::ServiceUnavailable => {
                        "server unavailable (the broker is up but does not take clients now)"
                    }
                    ConnectReturnCode::RefusedProtocolVersion => {
                        "unacceptable protocol version (the broker does not accept MQTT 3.1.1)"
                    }
                    ConnectReturnCode::Success => "refused",
                };
                return (
                    format!("{what} broker {}: broker refused: {reason}", self.broker),
                    "fix the broker's settings or [sinks.mqtt]",
                );
            }
            _ if self.tls && (text.contains("certificate") || text.contains("TLS")) => {
                "the broker's certificate must be signed by an authority in [sinks.mqtt] ca_file \
                 and name [sinks.mqtt] host; with client certificates, the broker must accept \
                 client_cert_file"
            }
            ConnectionError::Io(_) | ConnectionError::NetworkTimeout if self.tls => {
                "check that the broker is running and reachable at [sinks.mqtt] host/port, and \
                 that this port speaks TLS (tls = true)"
            }
            ConnectionError::MqttState(_) if !self.tls => {
                "check that [sinks.mqtt] host/port is an MQTT 3.1.1 broker without TLS (or set \
                 tls = true)"
            }
            _ => "check that the broker is running and reachable at [sinks.mqtt] host/port",
        };
        (format!("{what} broker {}: {text}", self.broker), hint)
    }
}

// ---------------------------------------------------------------------------------------------
// The sink.
// ---------------------------------------------------------------------------------------------

/// Publishes mask events to an MQTT broker from a worker thread; see the module documentation.
pub struct MqttSink {
    core: Option<Arc<Core>>,
    worker: Option<JoinHandle<()>>,
    commands: Option<MqttCommands>,
    /// Why the sink cannot work at all (invalid config or files, no thread); `emit` reports it.
    failure: Option<String>,
    broker: String,
    flush_timeout: Duration,
}

impl MqttSink {
    /// Reads the config's files and starts the worker thread, which connects in the background:
    /// this never blocks on the network and never fails. An invalid config (see
    /// [`MqttConfig::validate`]) or an unreadable file gives a sink whose `emit` returns the
    /// reason. `enabled` is not looked at: the caller decides to start it.
    pub fn start(config: &MqttConfig) -> MqttSink {
        let mut sink = MqttSink {
            core: None,
            worker: None,
            commands: None,
            failure: None,
            broker: config.broker_address(),
            flush_timeout: Duration::from_millis(config.flush_timeout_ms),
        };
        let options = match config.validate().and_then(|()| config.options()) {
            Ok(options) => options,
            Err(reason) => {
                let reason = format!("invalid [sinks.mqtt] config: {reason}");
                log::error!("mqtt: {reason}");
                sink.failure = Some(reason);
                return sink;
            }
        };
        // Room for every message in flight, a subscription and a disconnect.
        let (client, mut connection) = Client::new(options, usize::from(config.max_inflight) + 4);
        let connect_timeout_s = config.connect_timeout_ms.div_ceil(1000).max(1);
        connection
            .eventloop
            .network_options
            .set_connection_timeout(connect_timeout_s);
        let core = Arc::new(Core {
            state: Mutex::new(QueueState::default()),
            changed: Condvar::new(),
            client,
            prefix: config.topic_prefix().to_string(),
            qos: if config.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            max_inflight: usize::from(config.max_inflight),
            connected: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        let commands = config.commands.then(|| {
            let (sender, received) = mpsc::sync_channel(MAX_COMMANDS_WAITING);
            sink.commands = Some(MqttCommands {
                received,
                core: Arc::clone(&core),
            });
            sender
        });
        log::info!(
            "mqtt: publishing to broker {} on {}/<source> at QoS {}, status on {}{}",
            sink.broker,
            core.prefix,
            config.qos,
            status_topic(&core.prefix),
            if config.commands {
                format!(
                    ", commands on {0}/cmd, answers on {0}/cmd/reply",
                    core.prefix
                )
            } else {
                String::new()
            }
        );
        let worker = Worker {
            core: Arc::clone(&core),
            connection,
            broker: sink.broker.clone(),
            tls: config.tls,
            commands,
            connect_timeout: Duration::from_secs(connect_timeout_s),
        };
        match thread::Builder::new()
            .name("samrt-mqtt".into())
            .spawn(move || worker.run())
        {
            Ok(handle) => sink.worker = Some(handle),
            Err(error) => {
                let reason = format!("cannot start the MQTT thread: {error}");
                log::error!("mqtt: {reason}");
                sink.failure = Some(reason);
            }
        }
        sink.core = Some(core);
        sink
    }

    /// Why the sink cannot work (an invalid config, an unreadable file, no thread), if so.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The commands of `{topic}/cmd`, once (with `commands = true`).
    pub fn take_commands(&mut self) -> Option<MqttCommands> {
        self.commands.take()
    }

    /// Whether the worker holds an accepted connection to the broker now.
    pub fn connected(&self) -> bool {
        self.core
            .as_ref()
            .is_some_and(|c| c.connected.load(Ordering::Relaxed))
    }

    /// Events sent since the start: acknowledged by the broker at QoS 1, written at QoS 0.
    pub fn sent(&self) -> u64 {
        self.core
            .as_ref()
            .map_or(0, |c| c.sent.load(Ordering::Relaxed))
    }

    /// Events waiting in the queue, those in flight included.
    pub fn queued(&self) -> usize {
        self.core.as_ref().map_or(0, |c| c.lock().events())
    }

    /// Why the last connection attempt failed or the connection broke (or why the sink cannot
    /// start); `None` while connected.
    pub fn last_error(&self) -> Option<String> {
        if let Some(failure) = &self.failure {
            return Some(failure.clone());
        }
        self.core.as_ref().and_then(|c| {
            c.last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        })
    }

    /// Stops the worker (after its goodbye) and waits for it.
    fn stop_worker(&mut self) {
        if let Some(core) = &self.core {
            core.request_stop();
        }
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                log::error!("mqtt: the MQTT thread panicked");
            }
        }
    }
}

impl Sink for MqttSink {
    fn name(&self) -> &str {
        "mqtt"
    }

    /// Queues the event's JSON record; never waits for the network.
    fn emit_line(&mut self, event: &MaskEvent, line: &[u8]) -> Result<(), SinkError> {
        if let Some(failure) = &self.failure {
            return Err(SinkError::new(self.name(), failure));
        }
        let Some(core) = &self.core else {
            return Err(SinkError::new("mqtt", "the sink is not running"));
        };
        let payload = line.strip_suffix(b"\n").unwrap_or(line).to_vec();
        let topic = format!("{}/{}", core.prefix, event.origin.kind());
        // Topic field, packet id, payload, within the largest packet MQTT can encode.
        if 2 + topic.len() + 2 + payload.len() > MAX_PACKET - 5 {
            return Err(SinkError::new(
                "mqtt",
                format!(
                    "event {} is {} bytes of JSON, too large for MQTT (at most {} bytes a message)",
                    event.id,
                    payload.len(),
                    MAX_PACKET - 5 - 4 - topic.len()
                ),
            ));
        }
        if core.stopping() {
            return Err(SinkError::new("mqtt", "the sink was flushed and stopped"));
        }
        if core.enqueue(Kind::Event, topic, payload, core.qos) {
            core.dropped.fetch_add(1, Ordering::Relaxed);
            let mut state = core.lock();
            if !state.overflow_reported {
                state.overflow_reported = true;
                log::warn!(
                    "mqtt: queue full ({MQTT_QUEUE_CAPACITY} messages waiting for broker {}): \
                     dropping the oldest",
                    self.broker
                );
            }
        }
        Ok(())
    }

    /// Waits up to `flush_timeout_ms` for the queue to drain, then publishes `offline`,
    /// disconnects and stops the worker; a connection attempt in progress can add up to
    /// `connect_timeout_ms`. Later events are refused.
    fn flush(&mut self) -> Result<(), SinkError> {
        let Some(core) = self.core.clone() else {
            return Ok(());
        };
        if self.worker.is_none() {
            return Ok(());
        }
        let left = core.wait_drained(Instant::now() + self.flush_timeout);
        self.stop_worker();
        if left > 0 {
            return Err(SinkError::new(
                "mqtt",
                format!(
                    "{left} message{} still queued after {} ms, not sent: {}",
                    if left == 1 { "" } else { "s" },
                    self.flush_timeout.as_millis(),
                    self.last_error().unwrap_or_else(|| format!(
                        "broker {} too slow to acknowledge",
                        self.broker
                    ))
                ),
            ));
        }
        Ok(())
    }

    fn dropped(&self) -> u64 {
        self.core
            .as_ref()
            .map_or(0, |c| c.dropped.load(Ordering::Relaxed))
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    use image::RgbImage;

    use crate::postprocess::Mask;
    use crate::service::event::{EventMask, PromptOrigin};

    fn event(id: u64) -> MaskEvent {
        let mask = Mask {
            width: 4,
            height: 3,
            data: (0..12).map(|i: usize| i.is_multiple_of(3)).collect(),
        };
        MaskEvent {
            id,
            frame: id,
            frame_origin: "unit".into(),
            origin: PromptOrigin::Button,
            prompt: None,
            masks: vec![EventMask::new(mask, 0.5, 0.75)],
            latency_ms: 1.0,
            time: SystemTime::UNIX_EPOCH,
            image: Arc::new(RgbImage::new(4, 3)),
        }
    }

    #[test]
    fn config_defaults_and_validation() {
        let config = MqttConfig::default();
        assert!(!config.enabled);
        assert_eq!(
            (config.host.as_str(), config.port, config.topic.as_str()),
            ("127.0.0.1", 1883, "samrt/masks")
        );
        assert_eq!(
            (config.qos, config.keep_alive_s, config.max_inflight),
            (1, 30, 16)
        );
        assert!(!config.tls && !config.commands);
        assert_eq!(config.validate(), Ok(()));

        let parsed: MqttConfig =
            toml::from_str("enabled = true\nport = 1884\nqos = 0\n").expect("a partial config");
        assert_eq!(
            parsed,
            MqttConfig {
                enabled: true,
                port: 1884,
                qos: 0,
                ..MqttConfig::default()
            }
        );
        // Unknown keys are reported by the config loader (serde_ignored); "" means none.
        let parsed: MqttConfig =
            toml::from_str("username = \"\"\npassword_file = \"\"\nca_file = \"\"\n")
                .expect("empty values");
        assert_eq!(
            (parsed.username, parsed.password_file, parsed.ca_file),
            (None, None, None)
        );
        let round_trip: MqttConfig =
            toml::from_str(&toml::to_string(&MqttConfig::default()).expect("TOML"))
                .expect("parses back");
        assert_eq!(round_trip, MqttConfig::default());

        let invalid = |change: fn(&mut MqttConfig), needle: &str| {
            let mut config = MqttConfig::default();
            change(&mut config);
            let error = config.validate().expect_err(needle);
            assert!(error.contains(needle), "{error:?} lacks {needle:?}");
        };
        invalid(|c| c.qos = 2, "qos = 2");
        invalid(|c| c.host = " ".into(), "host");
        invalid(|c| c.topic = String::new(), "empty");
        invalid(|c| c.topic = "/".into(), "empty");
        invalid(|c| c.topic = "samrt/#".into(), "wildcard");
        invalid(|c| c.topic = "samrt/+/masks".into(), "wildcard");
        invalid(|c| c.topic = "$SYS/x".into(), "reserved");
        invalid(|c| c.password = Some("pw".into()), "password_file");
        invalid(
            |c| c.password_file = Some("/etc/samrt/pw".into()),
            "without username",
        );
        invalid(|c| c.client_id = "x".repeat(70_000), "client_id");
        invalid(|c| c.connect_timeout_ms = 0, "connect_timeout_ms");
        invalid(|c| c.max_inflight = 0, "max_inflight");
        invalid(|c| c.max_inflight = MAX_INFLIGHT + 1, "max_inflight");
        invalid(|c| c.ca_file = Some("/ca.pem".into()), "tls = true");
        invalid(
            |c| {
                c.tls = true;
                c.client_cert_file = Some("/cert.pem".into());
            },
            "go together",
        );
    }

    #[test]
    fn relative_files_are_systemd_credentials() {
        assert_eq!(
            credential_path("ca_file", "/etc/samrt/ca.pem"),
            Ok(PathBuf::from("/etc/samrt/ca.pem"))
        );
        // The variable is process-wide; only this test touches it.
        std::env::remove_var("CREDENTIALS_DIRECTORY");
        let error = credential_path("password_file", "mqtt-password").unwrap_err();
        assert!(
            error.contains("CREDENTIALS_DIRECTORY") && error.contains("LoadCredential="),
            "{error}"
        );
        std::env::set_var("CREDENTIALS_DIRECTORY", "/run/credentials/samrt.service");
        assert_eq!(
            credential_path("password_file", "mqtt-password"),
            Ok(PathBuf::from(
                "/run/credentials/samrt.service/mqtt-password"
            ))
        );
        std::env::remove_var("CREDENTIALS_DIRECTORY");
    }

    #[test]
    fn unreadable_files_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("samrt-mqtt-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.txt");
        std::fs::write(&empty, "\n").unwrap();
        let error = read_password(&empty).unwrap_err();
        assert!(error.contains("first line is empty"), "{error}");
        let good = dir.join("pw.txt");
        std::fs::write(&good, "s3cret\n").unwrap();
        assert_eq!(read_password(&good).as_deref(), Ok("s3cret"));
        let error = read_password(&dir.join("missing")).unwrap_err();
        assert!(
            error.contains("password_file") && error.contains("missing"),
            "{error}"
        );
        let error = read_certificates("ca_file", &good).unwrap_err();
        assert!(
            error.contains("no certificate") && error.contains("ca_file"),
            "{error}"
        );
        let config = MqttConfig {
            tls: true,
            ca_file: Some(good.display().to_string()),
            ..MqttConfig::default()
        };
        let mut sink = MqttSink::start(&config);
        let error = sink.last_error().unwrap();
        assert!(
            error.contains("ca_file") && error.contains("BEGIN CERTIFICATE"),
            "{error}"
        );
        assert!(sink.flush().is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn push(state: &mut QueueState, n: usize) -> bool {
        state.push(
            Kind::Event,
            format!("t/{n}"),
            vec![n as u8],
            QoS::AtLeastOnce,
        )
    }

    fn payloads(state: &QueueState) -> Vec<u8> {
        state.messages.iter().map(|m| m.payload[0]).collect()
    }

    #[test]
    fn full_queue_drops_the_oldest_not_in_flight() {
        let mut state = QueueState::default();
        for n in 0..MQTT_QUEUE_CAPACITY {
            assert!(!push(&mut state, n));
        }
        // The two oldest are in flight.
        for message in state.messages.iter_mut().take(2) {
            message.stage = Stage::Submitted;
        }
        assert!(push(&mut state, 0xF0));
        assert_eq!(state.pending(), MQTT_QUEUE_CAPACITY);
        assert_eq!(&payloads(&state)[..3], &[0, 1, 3]);
        assert_eq!(*payloads(&state).last().unwrap(), 0xF0);
        // A status never counts against the capacity and goes before the waiting messages.
        state.push(
            Kind::Status,
            "t/status".into(),
            vec![0xAA],
            QoS::AtLeastOnce,
        );
        assert_eq!(state.pending(), MQTT_QUEUE_CAPACITY);
        assert_eq!(&payloads(&state)[..3], &[0, 1, 0xAA]);
        // A newer status replaces one not sent yet.
        state.push(
            Kind::Status,
            "t/status".into(),
            vec![0xBB],
            QoS::AtLeastOnce,
        );
        assert_eq!(&payloads(&state)[..4], &[0, 1, 0xBB, 3]);
    }

    #[test]
    fn written_and_acknowledged_messages_leave_in_any_order_and_a_break_resends_in_order() {
        let mut state = QueueState::default();
        for n in 0..4 {
            push(&mut state, n);
        }
        for message in state.messages.iter_mut().take(3) {
            message.stage = Stage::Submitted;
            state.submitted.push_back(message.seq);
        }
        assert!(state.written(7).is_none());
        assert!(state.written(8).is_none());
        assert_eq!(state.messages[0].stage, Stage::InFlight(7));
        assert_eq!(state.messages[2].stage, Stage::Submitted);
        // The broker acknowledges the second first.
        assert_eq!(state.acknowledged(8).map(|m| m.payload), Some(vec![1]));
        assert!(state.acknowledged(8).is_none(), "acknowledged twice");
        state.reset();
        assert!(state.submitted.is_empty() && !state.connected);
        assert_eq!(payloads(&state), vec![0, 2, 3]);
        assert!(state.messages.iter().all(|m| m.stage == Stage::Waiting));
        // At QoS 0 a written message is done.
        let mut state = QueueState::default();
        state.push(Kind::Event, "t".into(), vec![9], QoS::AtMostOnce);
        state.messages[0].stage = Stage::Submitted;
        state.submitted.push_back(state.messages[0].seq);
        assert_eq!(state.written(0).map(|m| m.payload), Some(vec![9]));
        assert!(state.messages.is_empty());
    }

    #[test]
    fn invalid_config_gives_a_sink_that_refuses_events() {
        let config = MqttConfig {
            qos: 2,
            ..MqttConfig::default()
        };
        let mut sink = MqttSink::start(&config);
        assert!(!sink.connected());
        let event = event(1);
        let error = sink.emit(&event).unwrap_err().to_string();
        assert!(error.contains("qos = 2"), "{error}");
        assert!(sink.flush().is_ok());
    }
}
