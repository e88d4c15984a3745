//! The MQTT sink: every [`MaskEvent`] goes out as its JSON record ([`MaskEvent::to_json`]) to the
//! topic `{topic}/{source}` of an MQTT 3.1.1 broker, e.g. `samrt/masks/button`.
//!
//! The client is a minimal publisher written against the MQTT 3.1.1 specification (OASIS
//! standard, 29 October 2014) over a plain [`TcpStream`]: CONNECT (clean session, optional user
//! name and password, keep-alive), CONNACK, PUBLISH at QoS 0 or 1 with PUBACK, PINGREQ/PINGRESP and
//! DISCONNECT. No TLS, no will message, no subscriptions, no QoS 2.
//!
//! [`MqttSink::emit`] never touches the network: it serializes the event and pushes it onto a
//! bounded queue of [`MQTT_QUEUE_CAPACITY`] messages; when the queue is full the oldest message is
//! dropped and counted in [`Sink::dropped`]. One worker thread owns the connection. It connects,
//! sends the queue in order (at QoS 1 a message leaves the queue only once the broker acknowledged
//! it, one message in flight at a time), pings the broker when the connection is idle, and when the
//! broker is unreachable it logs one warning per outage and reconnects with exponential backoff
//! (100 ms doubling to 5 s), then resends the unacknowledged message with the DUP flag. While the
//! broker is down events wait in the queue: nothing is lost unless the queue overflows (at QoS 0,
//! a message written into a connection that broke unnoticed is lost too).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use heapless::Deque;
use serde::{Deserialize, Serialize};

use super::sink::{MaskEvent, Sink, SinkError};

/// How many messages wait for the broker at most; past this the oldest is dropped.
pub const MQTT_QUEUE_CAPACITY: usize = 256;

/// The first reconnection delay; it doubles after every failed attempt.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest reconnection delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often an idle connection is checked for a broker that went away.
const LIVENESS_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The largest remaining length MQTT can encode (four bytes of 7 bits).
const MAX_REMAINING_LENGTH: usize = 268_435_455;
/// The longest UTF-8 string or binary field (a two-byte length prefix).
const MAX_FIELD_LENGTH: usize = 65_535;
/// The largest packet body accepted from the broker: a publisher only ever receives CONNACK,
/// PUBACK and PINGRESP (at most 2 bytes of body).
const MAX_INCOMING_BODY: usize = 64;
/// The longest source name appended to the topic ([`PromptOrigin::kind`]).
///
/// [`PromptOrigin::kind`]: super::sink::PromptOrigin::kind
const LONGEST_SOURCE_KIND: usize = "button_long".len();

/// PINGREQ: type 12, no body.
const PINGREQ: [u8; 2] = [0xC0, 0x00];
/// DISCONNECT: type 14, no body.
const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// `[sinks.mqtt]`: publishing masks to an MQTT broker.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct MqttConfig {
    /// Publish masks to an MQTT broker. Default: `false`.
    pub enabled: bool,
    /// The broker's host name or IP address. Default: `"127.0.0.1"`.
    pub host: String,
    /// The broker's TCP port (plain MQTT, no TLS). Default: `1883`.
    pub port: u16,
    /// The topic prefix: each event goes to `{topic}/{source}`, where source is what asked for the
    /// mask (`button`, `button_long`, `fixed`, `detector`, `control`), e.g. `samrt/masks/button`.
    /// Must not be empty, start with `$` or contain the wildcards `+` and `#`; a trailing `/` is
    /// ignored. Default: `"samrt/masks"`.
    pub topic: String,
    /// The MQTT client identifier. Must be unique on the broker: a second client connecting with
    /// the same identifier disconnects the first. Default: `"samrt"`.
    pub client_id: String,
    /// Quality of service: `0` (at most once: no acknowledgement, an event written into a
    /// connection that just broke is lost) or `1` (at least once: an event leaves the queue only
    /// when the broker acknowledged it; after a reconnection it may arrive twice). Default: `1`.
    pub qos: u8,
    /// Seconds without traffic after which the connection is checked with a PINGREQ; the broker
    /// drops clients silent for 1.5 times this. `0` turns keep-alive off. Default: `30`.
    pub keep_alive_s: u16,
    /// User name, when the broker requires authentication; `""` = none. Default: none.
    #[serde(with = "super::config::empty_is_none")]
    pub username: Option<String>,
    /// Password, with `username`; `""` = none. Sent in clear text (no TLS). Default: none.
    #[serde(with = "super::config::empty_is_none")]
    pub password: Option<String>,
    /// Milliseconds to wait for the TCP connection, and for each reply of the broker (CONNACK,
    /// PUBACK, PINGRESP) before the connection counts as broken. Default: `2000`.
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
            keep_alive_s: 30,
            username: None,
            password: None,
            connect_timeout_ms: 2000,
            flush_timeout_ms: 3000,
        }
    }
}

impl MqttConfig {
    /// Checks the values the protocol cannot carry; the error names the field and the fix.
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
        if topic.len() + 1 + LONGEST_SOURCE_KIND > MAX_FIELD_LENGTH {
            return Err(format!(
                "topic: {} bytes, too long for MQTT (at most {} bytes)",
                topic.len(),
                MAX_FIELD_LENGTH - 1 - LONGEST_SOURCE_KIND
            ));
        }
        for (name, value) in [
            ("client_id", Some(&self.client_id)),
            ("username", self.username.as_ref()),
            ("password", self.password.as_ref()),
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
        if self.password.is_some() && self.username.is_none() {
            return Err(
                "password is set without username: MQTT 3.1.1 sends a password only with a \
                 user name"
                    .into(),
            );
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
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wire format (MQTT 3.1.1, section 2 and 3).
// ---------------------------------------------------------------------------------------------

/// A packet that cannot be encoded, or bytes from the broker that are not a valid packet.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WireError {
    /// A remaining length above [`MAX_REMAINING_LENGTH`].
    TooLong(usize),
    /// A string or binary field above [`MAX_FIELD_LENGTH`] bytes.
    FieldTooLong { field: &'static str, len: usize },
    /// A remaining length whose fourth byte still has its continuation bit.
    MalformedLength,
    /// A packet that breaks the specification or that a publisher never receives.
    Malformed(String),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::TooLong(len) => write!(
                f,
                "packet of {len} bytes, MQTT allows at most {MAX_REMAINING_LENGTH}"
            ),
            WireError::FieldTooLong { field, len } => write!(
                f,
                "{field} of {len} bytes, MQTT allows at most {MAX_FIELD_LENGTH}"
            ),
            WireError::MalformedLength => {
                write!(f, "malformed remaining length (more than 4 bytes)")
            }
            WireError::Malformed(what) => write!(f, "malformed packet from the broker: {what}"),
        }
    }
}

/// Appends the remaining length `len` (section 2.2.3): 7 bits a byte, least significant first,
/// the top bit set on every byte but the last; 1 to 4 bytes.
fn encode_remaining_length(len: usize, out: &mut Vec<u8>) -> Result<(), WireError> {
    if len > MAX_REMAINING_LENGTH {
        return Err(WireError::TooLong(len));
    }
    let mut rest = len;
    loop {
        let mut byte = (rest % 128) as u8;
        rest /= 128;
        if rest > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if rest == 0 {
            return Ok(());
        }
    }
}

/// Reads a remaining length from the start of `bytes`: `Ok(Some((length, bytes used)))`,
/// `Ok(None)` when more bytes are needed, an error when a fourth byte still continues.
fn decode_remaining_length(bytes: &[u8]) -> Result<Option<(usize, usize)>, WireError> {
    let mut value = 0usize;
    for (index, &byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(Some((value, index + 1)));
        }
    }
    if bytes.len() >= 4 {
        Err(WireError::MalformedLength)
    } else {
        Ok(None)
    }
}

/// Appends a UTF-8 string or binary field: two bytes of length, big-endian, then the bytes.
fn encode_field(field: &'static str, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
    let len = u16::try_from(bytes.len()).map_err(|_| WireError::FieldTooLong {
        field,
        len: bytes.len(),
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// A fixed header byte followed by its remaining length and `body`.
fn packet(header: u8, body: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(header);
    encode_remaining_length(body.len(), &mut out)?;
    out.extend_from_slice(body);
    Ok(out)
}

/// What a CONNECT packet carries.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConnectOptions<'a> {
    client_id: &'a str,
    keep_alive_s: u16,
    username: Option<&'a str>,
    password: Option<&'a str>,
}

/// CONNECT (section 3.1) with the clean-session flag, no will.
fn encode_connect(options: &ConnectOptions<'_>) -> Result<Vec<u8>, WireError> {
    let mut body = Vec::with_capacity(32);
    encode_field("protocol name", b"MQTT", &mut body)?;
    body.push(4); // protocol level: 3.1.1
    let mut flags = 0x02; // clean session
    if options.username.is_some() {
        flags |= 0x80;
    }
    if options.password.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&options.keep_alive_s.to_be_bytes());
    encode_field("client_id", options.client_id.as_bytes(), &mut body)?;
    if let Some(username) = options.username {
        encode_field("username", username.as_bytes(), &mut body)?;
    }
    if let Some(password) = options.password {
        encode_field("password", password.as_bytes(), &mut body)?;
    }
    packet(0x10, &body)
}

/// PUBLISH (section 3.3), never retained. `packet_id` is `Some` for QoS 1, `None` for QoS 0;
/// `dup` marks a resend and is only valid with QoS 1.
fn encode_publish(
    topic: &str,
    packet_id: Option<u16>,
    dup: bool,
    payload: &[u8],
) -> Result<Vec<u8>, WireError> {
    let mut header = 0x30;
    if packet_id.is_some() {
        header |= 0x02; // QoS 1
        if dup {
            header |= 0x08;
        }
    }
    let body_len = 2 + topic.len() + if packet_id.is_some() { 2 } else { 0 } + payload.len();
    if body_len > MAX_REMAINING_LENGTH {
        return Err(WireError::TooLong(body_len));
    }
    let mut out = Vec::with_capacity(body_len + 5);
    out.push(header);
    encode_remaining_length(body_len, &mut out)?;
    encode_field("topic", topic.as_bytes(), &mut out)?;
    if let Some(id) = packet_id {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(payload);
    Ok(out)
}

/// A packet the broker sends to a publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Incoming {
    ConnAck {
        session_present: bool,
        return_code: u8,
    },
    PubAck {
        packet_id: u16,
    },
    PingResp,
}

/// Decodes one packet from its fixed header byte and body.
fn decode_incoming(header: u8, body: &[u8]) -> Result<Incoming, WireError> {
    let expect_len = |name: &str, len: usize| {
        if body.len() == len {
            Ok(())
        } else {
            Err(WireError::Malformed(format!(
                "{name} with {} bytes of body, expected {len}",
                body.len()
            )))
        }
    };
    match header {
        0x20 => {
            expect_len("CONNACK", 2)?;
            if body[0] & 0xFE != 0 {
                return Err(WireError::Malformed(format!(
                    "CONNACK with reserved flags {:#04x}",
                    body[0]
                )));
            }
            Ok(Incoming::ConnAck {
                session_present: body[0] & 0x01 != 0,
                return_code: body[1],
            })
        }
        0x40 => {
            expect_len("PUBACK", 2)?;
            Ok(Incoming::PubAck {
                packet_id: u16::from_be_bytes([body[0], body[1]]),
            })
        }
        0xD0 => {
            expect_len("PINGRESP", 0)?;
            Ok(Incoming::PingResp)
        }
        other => Err(WireError::Malformed(format!(
            "unexpected packet type {} (fixed header {other:#04x}); a publisher only receives \
             CONNACK, PUBACK and PINGRESP",
            other >> 4
        ))),
    }
}

/// Why the broker refused the connection (CONNACK return codes, section 3.2.2.3).
fn connack_refusal(return_code: u8) -> String {
    match return_code {
        1 => "broker refused: unacceptable protocol version (the broker does not accept MQTT \
              3.1.1)"
            .into(),
        2 => "broker refused: client identifier rejected (check [sinks.mqtt] client_id)".into(),
        3 => "broker refused: server unavailable (the broker is up but does not take clients \
              now)"
            .into(),
        4 => "broker refused: bad user name or password (check [sinks.mqtt] username/password)"
            .into(),
        5 => "broker refused: not authorized (check [sinks.mqtt] username/password)".into(),
        code => format!("broker refused: unknown CONNACK return code {code}"),
    }
}

// ---------------------------------------------------------------------------------------------
// One connection to the broker.
// ---------------------------------------------------------------------------------------------

/// Why the connection failed or broke.
#[derive(Debug)]
enum LinkError {
    /// TCP: unreachable, refused, reset, timed out.
    Network(io::Error),
    /// The broker answered CONNECT with a refusal.
    Refused(String),
    /// The broker sent something that is not MQTT 3.1.1.
    Protocol(String),
}

impl LinkError {
    /// What to check, for the warning.
    fn hint(&self) -> &'static str {
        match self {
            LinkError::Network(_) => {
                "check that the broker is running and reachable at [sinks.mqtt] host/port"
            }
            LinkError::Refused(_) => "fix the broker's settings or [sinks.mqtt]",
            LinkError::Protocol(_) => {
                "check that [sinks.mqtt] host/port is an MQTT 3.1.1 broker (plain TCP, no TLS)"
            }
        }
    }
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Network(error) => write!(f, "{error}"),
            LinkError::Refused(reason) | LinkError::Protocol(reason) => f.write_str(reason),
        }
    }
}

impl From<io::Error> for LinkError {
    fn from(error: io::Error) -> Self {
        LinkError::Network(error)
    }
}

impl From<WireError> for LinkError {
    fn from(error: WireError) -> Self {
        LinkError::Protocol(error.to_string())
    }
}

/// The worker's settings, fixed at start.
#[derive(Debug, Clone)]
struct Settings {
    host: String,
    port: u16,
    /// `host:port`, for messages.
    broker: String,
    topic_prefix: String,
    qos: u8,
    connect_packet: Vec<u8>,
    keep_alive: Option<Duration>,
    /// For the TCP connection and each reply of the broker.
    reply_timeout: Duration,
}

/// A connected session (CONNACK received with return code 0).
struct Connection {
    stream: TcpStream,
    /// Where a clone of `stream` is registered so that stopping can unblock a read.
    shared: Arc<Shared>,
    /// When a packet was last written, for keep-alive.
    last_sent: Instant,
    keep_alive: Option<Duration>,
    reply_timeout: Duration,
}

impl Connection {
    /// Connects, sends CONNECT and waits for CONNACK, all within the reply timeout each. Gives up
    /// (with an error) when a stop was requested.
    fn open(settings: &Settings, shared: &Arc<Shared>) -> Result<Connection, LinkError> {
        let addresses = (settings.host.as_str(), settings.port)
            .to_socket_addrs()
            .map_err(|e| {
                LinkError::Network(io::Error::new(
                    e.kind(),
                    format!("cannot resolve host {:?}: {e}", settings.host),
                ))
            })?;
        let mut last_error = None;
        let mut stream = None;
        for address in addresses {
            match TcpStream::connect_timeout(&address, settings.reply_timeout) {
                Ok(connected) => {
                    stream = Some(connected);
                    break;
                }
                Err(error) => last_error = Some(error),
            }
        }
        let stream = match (stream, last_error) {
            (Some(stream), _) => stream,
            (None, Some(error)) => return Err(error.into()),
            (None, None) => {
                return Err(LinkError::Network(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("host {:?} resolved to no address", settings.host),
                )))
            }
        };
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(settings.reply_timeout))?;
        *shared.socket() = stream.try_clone().ok();
        let mut connection = Connection {
            stream,
            shared: Arc::clone(shared),
            last_sent: Instant::now(),
            keep_alive: settings.keep_alive,
            reply_timeout: settings.reply_timeout,
        };
        // Registered first, checked second: `MqttSink::stop_worker` does the reverse.
        if shared.lock().stop {
            return Err(LinkError::Network(io::Error::new(
                io::ErrorKind::Interrupted,
                "stopping",
            )));
        }
        connection.send(&settings.connect_packet)?;
        let deadline = Instant::now() + connection.reply_timeout;
        match connection.read_packet(deadline, "CONNACK")? {
            Incoming::ConnAck { return_code: 0, .. } => Ok(connection),
            Incoming::ConnAck { return_code, .. } => {
                Err(LinkError::Refused(connack_refusal(return_code)))
            }
            other => Err(LinkError::Protocol(format!(
                "expected CONNACK, the broker sent {other:?}"
            ))),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.stream.write_all(bytes)?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Fills `buf`, failing at `deadline`.
    fn read_full(&mut self, mut buf: &mut [u8], deadline: Instant, what: &str) -> io::Result<()> {
        while !buf.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.no_reply(what));
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the broker closed the connection (waiting for {what})"),
                    ))
                }
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(self.no_reply(what))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn no_reply(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no {what} from the broker within {} ms",
                self.reply_timeout.as_millis()
            ),
        )
    }

    /// Reads one packet, failing at `deadline`; `what` names the awaited packet for errors.
    fn read_packet(&mut self, deadline: Instant, what: &str) -> Result<Incoming, LinkError> {
        let mut header = [0u8; 1];
        self.read_full(&mut header, deadline, what)?;
        let mut length_bytes = Vec::with_capacity(4);
        let body_len = loop {
            let mut byte = [0u8; 1];
            self.read_full(&mut byte, deadline, what)?;
            length_bytes.push(byte[0]);
            if let Some((len, _)) = decode_remaining_length(&length_bytes)? {
                break len;
            }
        };
        if body_len > MAX_INCOMING_BODY {
            return Err(WireError::Malformed(format!(
                "packet with {body_len} bytes of body (fixed header {:#04x}) while waiting for \
                 {what}",
                header[0]
            ))
            .into());
        }
        let mut body = vec![0u8; body_len];
        self.read_full(&mut body, deadline, what)?;
        Ok(decode_incoming(header[0], &body)?)
    }

    /// Writes a PUBLISH and, at QoS 1, waits for the PUBACK of `packet_id`.
    fn publish(&mut self, packet: &[u8], packet_id: Option<u16>) -> Result<(), LinkError> {
        self.send(packet)?;
        let Some(id) = packet_id else {
            return Ok(());
        };
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            match self.read_packet(deadline, "PUBACK")? {
                Incoming::PubAck { packet_id } if packet_id == id => return Ok(()),
                // A late reply to an earlier ping or publish: harmless.
                Incoming::PubAck { .. } | Incoming::PingResp => {}
                other @ Incoming::ConnAck { .. } => {
                    return Err(LinkError::Protocol(format!(
                        "expected PUBACK, the broker sent {other:?}"
                    )))
                }
            }
        }
    }

    /// When the worker should look at the idle connection again.
    fn next_check(&self) -> Instant {
        let liveness = Instant::now() + LIVENESS_CHECK_INTERVAL;
        match self.keep_alive {
            Some(keep_alive) => liveness.min(self.last_sent + keep_alive),
            None => liveness,
        }
    }

    /// On an idle connection: pings when keep-alive is due, else checks that the broker is still
    /// there.
    fn keep_alive(&mut self) -> Result<(), LinkError> {
        match self.keep_alive {
            Some(keep_alive) if self.last_sent.elapsed() >= keep_alive => self.ping(),
            _ => self.check_alive(),
        }
    }

    /// PINGREQ, then waits for PINGRESP.
    fn ping(&mut self) -> Result<(), LinkError> {
        self.send(&PINGREQ)?;
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            match self.read_packet(deadline, "PINGRESP")? {
                Incoming::PingResp => return Ok(()),
                Incoming::PubAck { .. } => {}
                other @ Incoming::ConnAck { .. } => {
                    return Err(LinkError::Protocol(format!(
                        "expected PINGRESP, the broker sent {other:?}"
                    )))
                }
            }
        }
    }

    /// Without blocking: fails when the broker closed the connection (so that nothing is written
    /// into a dead socket), and reads any packet that arrived unasked.
    fn check_alive(&mut self) -> Result<(), LinkError> {
        self.stream.set_nonblocking(true)?;
        let mut byte = [0u8; 1];
        let peeked = self.stream.peek(&mut byte);
        self.stream.set_nonblocking(false)?;
        match peeked {
            Ok(0) => Err(LinkError::Network(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the broker closed the connection",
            ))),
            Ok(_) => {
                let deadline = Instant::now() + self.reply_timeout;
                match self.read_packet(deadline, "packet")? {
                    Incoming::PubAck { .. } | Incoming::PingResp => Ok(()),
                    other @ Incoming::ConnAck { .. } => Err(LinkError::Protocol(format!(
                        "unexpected {other:?} on an open connection"
                    ))),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// DISCONNECT, then closes the socket; errors are moot at this point.
    fn disconnect(mut self) {
        let _ = self.stream.write_all(&DISCONNECT);
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The registered clone would keep the socket open.
        *self.shared.socket() = None;
    }
}

// ---------------------------------------------------------------------------------------------
// The queue shared by `emit` and the worker.
// ---------------------------------------------------------------------------------------------

/// One event waiting for the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QueuedMessage {
    /// The source, appended to the topic prefix.
    kind: &'static str,
    /// The JSON record.
    payload: Vec<u8>,
}

/// An encoded PUBLISH packet, with its packet id at QoS 1.
type Publication = (Vec<u8>, Option<u16>);

/// The queue and the flags that go with it, under one mutex.
struct QueueState {
    messages: Deque<QueuedMessage, MQTT_QUEUE_CAPACITY>,
    /// The worker is writing the front message or waiting for its PUBACK: it must stay in place.
    front_busy: bool,
    /// The packet id the front message was sent with, if it was: a resend reuses it with DUP.
    front_packet_id: Option<u16>,
    /// The id for the next new QoS 1 message (1 to 65535).
    next_packet_id: u16,
    /// Set by flush and drop: the worker disconnects and ends.
    stop: bool,
    /// An overflow was logged; reset when the queue empties.
    overflow_reported: bool,
}

impl QueueState {
    fn new() -> Self {
        QueueState {
            messages: Deque::new(),
            front_busy: false,
            front_packet_id: None,
            next_packet_id: 1,
            stop: false,
            overflow_reported: false,
        }
    }

    /// Appends a message; when the queue is full, first removes the oldest message that is not in
    /// flight. Returns how many messages were dropped (0 or 1).
    fn push(&mut self, message: QueuedMessage) -> u64 {
        let mut dropped = 0;
        if self.messages.is_full() && self.remove_oldest().is_some() {
            dropped += 1;
        }
        if self.messages.push_back(message).is_err() {
            // Only when the single message of a one-slot queue is in flight.
            dropped += 1;
        }
        dropped
    }

    /// Removes the oldest message that the worker is not sending.
    fn remove_oldest(&mut self) -> Option<QueuedMessage> {
        if self.front_busy {
            let in_flight = self.messages.pop_front()?;
            let oldest = self.messages.pop_front();
            // Cannot fail: a slot was just freed.
            let _ = self.messages.push_front(in_flight);
            oldest
        } else {
            self.front_packet_id = None;
            self.messages.pop_front()
        }
    }

    /// Marks the front message in flight and encodes it, with its packet id at QoS 1. An encoding
    /// error (which `emit`'s size check rules out) drops the message.
    fn take_front(
        &mut self,
        topic_prefix: &str,
        qos: u8,
    ) -> Option<Result<Publication, WireError>> {
        let front = self.messages.front()?;
        let topic = format!("{topic_prefix}/{}", front.kind);
        let (packet_id, dup) = if qos == 0 {
            (None, false)
        } else {
            match self.front_packet_id {
                Some(id) => (Some(id), true),
                None => (Some(self.next_packet_id), false),
            }
        };
        let encoded = encode_publish(&topic, packet_id, dup, &front.payload);
        match encoded {
            Ok(packet) => {
                if packet_id.is_some() && !dup {
                    self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
                }
                self.front_busy = true;
                self.front_packet_id = packet_id;
                Some(Ok((packet, packet_id)))
            }
            Err(error) => {
                self.messages.pop_front();
                self.front_packet_id = None;
                Some(Err(error))
            }
        }
    }

    /// The worker is done with the front message: sent (acknowledged at QoS 1) or not.
    fn finish_front(&mut self, sent: bool) {
        self.front_busy = false;
        if sent {
            self.messages.pop_front();
            self.front_packet_id = None;
            if self.messages.is_empty() {
                self.overflow_reported = false;
            }
        }
    }
}

/// What `emit`, `flush` and the worker share.
struct Shared {
    state: Mutex<QueueState>,
    /// Signalled on every change of the state.
    changed: Condvar,
    connected: AtomicBool,
    sent: AtomicU64,
    dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// A clone of the connection's socket, to unblock the worker's reads when stopping.
    socket: Mutex<Option<TcpStream>>,
}

/// What the worker does next.
enum Next {
    Stop,
    /// Nothing to send before the connection's next check.
    Idle,
    Publish {
        packet: Vec<u8>,
        packet_id: Option<u16>,
    },
}

impl Shared {
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

    fn socket(&self) -> MutexGuard<'_, Option<TcpStream>> {
        self.socket.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn request_stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
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

    /// Waits for a message until `wake_at`, then takes the front one.
    fn next(&self, wake_at: Instant, settings: &Settings) -> Next {
        let mut state = self.lock();
        loop {
            if state.stop {
                return Next::Stop;
            }
            match state.take_front(&settings.topic_prefix, settings.qos) {
                Some(Ok((packet, packet_id))) => return Next::Publish { packet, packet_id },
                Some(Err(error)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    log::error!("mqtt: dropped a message that cannot be sent: {error}");
                    self.changed.notify_all();
                }
                None => {
                    if Instant::now() >= wake_at {
                        return Next::Idle;
                    }
                    state = self.wait_until(state, wake_at);
                }
            }
        }
    }

    fn finish_front(&self, sent: bool) {
        self.lock().finish_front(sent);
        if sent {
            self.sent.fetch_add(1, Ordering::Relaxed);
        }
        self.changed.notify_all();
    }

    /// Waits until the queue is empty or `deadline`; returns how many messages are left.
    fn wait_drained(&self, deadline: Instant) -> usize {
        let mut state = self.lock();
        while !state.messages.is_empty() && Instant::now() < deadline {
            state = self.wait_until(state, deadline);
        }
        state.messages.len()
    }

    fn set_last_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }
}

// ---------------------------------------------------------------------------------------------
// The worker thread.
// ---------------------------------------------------------------------------------------------

struct Worker {
    shared: Arc<Shared>,
    settings: Settings,
}

impl Worker {
    fn run(self) {
        let mut connection: Option<Connection> = None;
        // The wait after the next failed attempt; doubles up to `BACKOFF_MAX`.
        let mut backoff = BACKOFF_MIN;
        // How long to wait before the next attempt: none right after a working connection broke.
        let mut delay: Option<Duration> = None;
        // The current connection did something useful (a message, a ping, a liveness check).
        let mut proven = false;
        // A warning was logged for the current outage.
        let mut outage_reported = false;
        loop {
            let Some(link) = connection.as_mut() else {
                if let Some(delay) = delay {
                    if self.shared.sleep_unless_stopped(delay) {
                        break;
                    }
                }
                if self.shared.lock().stop {
                    break;
                }
                match Connection::open(&self.settings, &self.shared) {
                    Ok(opened) => {
                        if outage_reported {
                            log::info!("mqtt: reconnected to broker {}", self.settings.broker);
                        } else {
                            log::info!("mqtt: connected to broker {}", self.settings.broker);
                        }
                        outage_reported = false;
                        proven = false;
                        self.shared.connected.store(true, Ordering::Relaxed);
                        self.shared.set_last_error(None);
                        connection = Some(opened);
                    }
                    Err(_) if self.shared.lock().stop => break,
                    Err(error) => {
                        self.report(&error, &mut outage_reported, "cannot connect to");
                        delay = Some(backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
                continue;
            };
            let result = match self.shared.next(link.next_check(), &self.settings) {
                Next::Stop => break,
                Next::Idle => link.keep_alive(),
                Next::Publish { packet, packet_id } => {
                    let result = link
                        .check_alive()
                        .and_then(|()| link.publish(&packet, packet_id));
                    self.shared.finish_front(result.is_ok());
                    result
                }
            };
            match result {
                Ok(()) => {
                    proven = true;
                    backoff = BACKOFF_MIN;
                }
                Err(error) => {
                    connection = None;
                    self.shared.connected.store(false, Ordering::Relaxed);
                    if self.shared.lock().stop {
                        break;
                    }
                    self.report(&error, &mut outage_reported, "lost the connection to");
                    if proven {
                        // Worked before: retry at once.
                        delay = None;
                    } else {
                        // Broke before doing anything (a message the broker rejects, a flapping
                        // broker): no tight reconnection loop.
                        delay = Some(backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }
        if let Some(link) = connection {
            link.disconnect();
        }
        self.shared.connected.store(false, Ordering::Relaxed);
    }

    /// Records the error; logs it once per outage.
    fn report(&self, error: &LinkError, outage_reported: &mut bool, what: &str) {
        let message = format!("{what} broker {}: {error}", self.settings.broker);
        log::debug!("mqtt: {message}");
        if !*outage_reported {
            log::warn!(
                "mqtt: {message}; {}. Retrying with backoff up to {} s; events wait in the queue \
                 (up to {MQTT_QUEUE_CAPACITY}, then the oldest are dropped)",
                error.hint(),
                BACKOFF_MAX.as_secs()
            );
            *outage_reported = true;
        }
        self.shared.set_last_error(Some(message));
    }
}

// ---------------------------------------------------------------------------------------------
// The sink.
// ---------------------------------------------------------------------------------------------

/// Publishes mask events to an MQTT broker from a worker thread; see the module documentation.
pub struct MqttSink {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    /// Why the sink cannot work at all (invalid config, no thread); `emit` reports it.
    failure: Option<String>,
    topic_prefix: String,
    broker: String,
    flush_timeout: Duration,
}

impl MqttSink {
    /// Starts the worker thread, which connects in the background: this never blocks on the
    /// network and never fails. An invalid config (see [`MqttConfig::validate`]) gives a sink whose
    /// `emit` returns the reason. `enabled` is not looked at: the caller decides to start it.
    pub fn start(config: &MqttConfig) -> MqttSink {
        let shared = Arc::new(Shared {
            state: Mutex::new(QueueState::new()),
            changed: Condvar::new(),
            connected: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_error: Mutex::new(None),
            socket: Mutex::new(None),
        });
        let mut sink = MqttSink {
            shared: Arc::clone(&shared),
            worker: None,
            failure: None,
            topic_prefix: config.topic_prefix().to_string(),
            broker: config.broker_address(),
            flush_timeout: Duration::from_millis(config.flush_timeout_ms),
        };
        let connect_packet = config.validate().and_then(|()| {
            encode_connect(&ConnectOptions {
                client_id: &config.client_id,
                keep_alive_s: config.keep_alive_s,
                username: config.username.as_deref(),
                password: config.password.as_deref(),
            })
            .map_err(|e| e.to_string())
        });
        let connect_packet = match connect_packet {
            Ok(packet) => packet,
            Err(reason) => {
                let reason = format!("invalid [sinks.mqtt] config: {reason}");
                log::error!("mqtt: {reason}");
                shared.set_last_error(Some(reason.clone()));
                sink.failure = Some(reason);
                return sink;
            }
        };
        let settings = Settings {
            host: config.host.trim().to_string(),
            port: config.port,
            broker: sink.broker.clone(),
            topic_prefix: sink.topic_prefix.clone(),
            qos: config.qos,
            connect_packet,
            keep_alive: (config.keep_alive_s > 0)
                .then(|| Duration::from_secs(u64::from(config.keep_alive_s))),
            reply_timeout: Duration::from_millis(config.connect_timeout_ms.max(1)),
        };
        log::info!(
            "mqtt: publishing to broker {} on {}/<source> at QoS {}",
            sink.broker,
            sink.topic_prefix,
            config.qos
        );
        let worker = Worker { shared, settings };
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
        sink
    }

    /// Whether the worker holds an accepted connection to the broker now.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Messages sent since the start: acknowledged by the broker at QoS 1, written at QoS 0.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Messages waiting in the queue, the one in flight included.
    pub fn queued(&self) -> usize {
        self.shared.lock().messages.len()
    }

    /// Why the last connection attempt failed or the connection broke; `None` while connected.
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops the worker and waits for it. `interrupt` also unblocks a wait for the broker (a
    /// reply, not a TCP connection attempt), at the cost of the DISCONNECT when one is pending.
    fn stop_worker(&mut self, interrupt: bool) {
        // Stop first, socket second: `Connection::open` registers first and checks second.
        self.shared.request_stop();
        if interrupt {
            if let Some(socket) = self.shared.socket().as_ref() {
                let _ = socket.shutdown(Shutdown::Read);
            }
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
    fn emit(&mut self, event: &MaskEvent) -> Result<(), SinkError> {
        if let Some(failure) = &self.failure {
            return Err(SinkError::new(self.name(), failure));
        }
        let payload = serde_json::to_vec(&event.to_json())
            .map_err(|e| SinkError::new("mqtt", format!("cannot serialize event: {e}")))?;
        let kind = event.origin.kind();
        // Topic field, packet id, payload.
        let body_len = 2 + self.topic_prefix.len() + 1 + kind.len() + 2 + payload.len();
        if body_len > MAX_REMAINING_LENGTH {
            return Err(SinkError::new(
                "mqtt",
                format!(
                    "event {} is {} bytes of JSON, too large for MQTT (at most {} bytes a message)",
                    event.id,
                    payload.len(),
                    MAX_REMAINING_LENGTH
                ),
            ));
        }
        let mut state = self.shared.lock();
        if state.stop {
            return Err(SinkError::new("mqtt", "the sink was flushed and stopped"));
        }
        let dropped = state.push(QueuedMessage { kind, payload });
        if dropped > 0 {
            self.shared.dropped.fetch_add(dropped, Ordering::Relaxed);
            if !state.overflow_reported {
                state.overflow_reported = true;
                log::warn!(
                    "mqtt: queue full ({MQTT_QUEUE_CAPACITY} messages waiting for broker {}): \
                     dropping the oldest",
                    self.broker
                );
            }
        }
        drop(state);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits up to `flush_timeout_ms` for the queue to drain, then disconnects and stops the
    /// worker; a connection attempt in progress can add up to `connect_timeout_ms`. Later events
    /// are refused.
    fn flush(&mut self) -> Result<(), SinkError> {
        if self.worker.is_none() {
            return Ok(());
        }
        let left = self
            .shared
            .wait_drained(Instant::now() + self.flush_timeout);
        self.stop_worker(left > 0);
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
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.stop_worker(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::time::SystemTime;

    use image::RgbImage;

    use crate::postprocess::Mask;
    use crate::service::sink::{EventMask, PromptOrigin};

    fn remaining_length(len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        encode_remaining_length(len, &mut out).expect("encodable");
        out
    }

    #[test]
    fn remaining_length_encodes_spec_table() {
        // MQTT 3.1.1, table 2.4: the bounds of each byte count.
        let cases: [(usize, &[u8]); 8] = [
            (0, &[0x00]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ];
        for (len, bytes) in cases {
            assert_eq!(remaining_length(len), bytes, "{len}");
            assert_eq!(
                decode_remaining_length(bytes),
                Ok(Some((len, bytes.len()))),
                "{len}"
            );
        }
        assert_eq!(remaining_length(321), [0xC1, 0x02]);
    }

    #[test]
    fn remaining_length_rejects_too_long() {
        let mut out = Vec::new();
        assert_eq!(
            encode_remaining_length(268_435_456, &mut out),
            Err(WireError::TooLong(268_435_456))
        );
        assert!(out.is_empty());
        assert_eq!(
            encode_publish("t", None, false, &vec![0; MAX_REMAINING_LENGTH]),
            Err(WireError::TooLong(MAX_REMAINING_LENGTH + 3))
        );
    }

    #[test]
    fn remaining_length_round_trips() {
        for len in (0..70_000).chain([MAX_REMAINING_LENGTH - 1, 1 << 21, (1 << 14) - 1]) {
            let bytes = remaining_length(len);
            assert_eq!(
                decode_remaining_length(&bytes),
                Ok(Some((len, bytes.len())))
            );
        }
    }

    #[test]
    fn remaining_length_decoding_handles_short_and_malformed_input() {
        assert_eq!(decode_remaining_length(&[]), Ok(None));
        assert_eq!(decode_remaining_length(&[0x80]), Ok(None));
        assert_eq!(decode_remaining_length(&[0xFF, 0xFF, 0xFF]), Ok(None));
        assert_eq!(
            decode_remaining_length(&[0xFF, 0xFF, 0xFF, 0xFF]),
            Err(WireError::MalformedLength)
        );
        assert_eq!(
            decode_remaining_length(&[0x80, 0x80, 0x80, 0x80, 0x01]),
            Err(WireError::MalformedLength)
        );
        // Bytes after the length are not read.
        assert_eq!(decode_remaining_length(&[0x05, 0xFF]), Ok(Some((5, 1))));
    }

    #[test]
    fn connect_matches_spec_layout() {
        let packet = encode_connect(&ConnectOptions {
            client_id: "samrt",
            keep_alive_s: 30,
            username: None,
            password: None,
        })
        .expect("encodable");
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            0x10, 17,                           // CONNECT, remaining length
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name
            0x04,                               // protocol level 3.1.1
            0x02,                               // flags: clean session
            0x00, 30,                           // keep alive
            0x00, 0x05, b's', b'a', b'm', b'r', b't',
        ];
        assert_eq!(packet, expected);

        let packet = encode_connect(&ConnectOptions {
            client_id: "c",
            keep_alive_s: 0x1234,
            username: Some("user"),
            password: Some("pw"),
        })
        .expect("encodable");
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            0x10, 23,
            0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04,
            0xC2,                               // user name, password, clean session
            0x12, 0x34,
            0x00, 0x01, b'c',
            0x00, 0x04, b'u', b's', b'e', b'r',
            0x00, 0x02, b'p', b'w',
        ];
        assert_eq!(packet, expected);

        let long = "x".repeat(70_000);
        let error = encode_connect(&ConnectOptions {
            client_id: &long,
            keep_alive_s: 30,
            username: None,
            password: None,
        })
        .expect_err("too long");
        assert_eq!(
            error,
            WireError::FieldTooLong {
                field: "client_id",
                len: 70_000
            }
        );
    }

    #[test]
    fn publish_matches_spec_layout() {
        assert_eq!(
            encode_publish("a/b", None, false, b"hi").expect("encodable"),
            [0x30, 7, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i']
        );
        assert_eq!(
            encode_publish("a/b", Some(10), false, b"hi").expect("encodable"),
            [0x32, 9, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, b'h', b'i']
        );
        assert_eq!(
            encode_publish("a/b", Some(0x0102), true, b"").expect("encodable"),
            [0x3A, 7, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0x02]
        );
        // DUP is never set at QoS 0.
        assert_eq!(
            encode_publish("t", None, true, b"").expect("encodable")[0],
            0x30
        );
        // A two-byte remaining length.
        let packet = encode_publish("t", Some(1), false, &[7; 200]).expect("encodable");
        assert_eq!(&packet[..7], [0x32, 0xCD, 0x01, 0x00, 0x01, b't', 0x00]);
        assert_eq!(packet.len(), 3 + 205);
    }

    #[test]
    fn fixed_packets_match_spec_layout() {
        assert_eq!(PINGREQ, [0xC0, 0x00]);
        assert_eq!(DISCONNECT, [0xE0, 0x00]);
    }

    #[test]
    fn incoming_packets_decode() {
        assert_eq!(
            decode_incoming(0x20, &[0x00, 0x00]),
            Ok(Incoming::ConnAck {
                session_present: false,
                return_code: 0
            })
        );
        assert_eq!(
            decode_incoming(0x20, &[0x01, 0x05]),
            Ok(Incoming::ConnAck {
                session_present: true,
                return_code: 5
            })
        );
        assert_eq!(
            decode_incoming(0x40, &[0x12, 0x34]),
            Ok(Incoming::PubAck { packet_id: 0x1234 })
        );
        assert_eq!(decode_incoming(0xD0, &[]), Ok(Incoming::PingResp));
    }

    #[test]
    fn malformed_incoming_packets_are_errors() {
        for (header, body) in [
            (0x20, &[0x00][..]),             // CONNACK too short
            (0x20, &[0x02, 0x00][..]),       // CONNACK reserved flag
            (0x40, &[0x00, 0x01, 0x02][..]), // PUBACK too long
            (0xD0, &[0x00][..]),             // PINGRESP with a body
            (0x30, &[0x00, 0x01, b't'][..]), // PUBLISH: never subscribed
            (0x21, &[0x00, 0x00][..]),       // CONNACK with flags
            (0x00, &[][..]),                 // reserved type
        ] {
            assert!(
                matches!(decode_incoming(header, body), Err(WireError::Malformed(_))),
                "{header:#04x} {body:?}"
            );
        }
    }

    #[test]
    fn connack_refusals_name_the_fix() {
        assert_eq!(
            connack_refusal(5),
            "broker refused: not authorized (check [sinks.mqtt] username/password)"
        );
        assert!(connack_refusal(4).contains("username/password"));
        assert!(connack_refusal(2).contains("client_id"));
        assert!(connack_refusal(1).contains("3.1.1"));
        assert!(connack_refusal(3).contains("unavailable"));
        assert!(connack_refusal(200).contains("200"));
    }

    #[test]
    fn config_defaults_and_validation() {
        let config = MqttConfig::default();
        assert!(!config.enabled);
        assert_eq!(
            (config.host.as_str(), config.port, config.topic.as_str()),
            ("127.0.0.1", 1883, "samrt/masks")
        );
        assert_eq!((config.qos, config.keep_alive_s), (1, 30));
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
        // Unknown keys are reported by the config loader (serde_ignored); "" means no user name.
        let parsed: MqttConfig =
            toml::from_str("username = \"\"\npassword = \"\"\n").expect("empty credentials");
        assert_eq!((parsed.username, parsed.password), (None, None));
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
        invalid(|c| c.password = Some("pw".into()), "without username");
        invalid(|c| c.client_id = "x".repeat(70_000), "client_id");
        invalid(|c| c.connect_timeout_ms = 0, "connect_timeout_ms");
    }

    fn message(n: u8) -> QueuedMessage {
        QueuedMessage {
            kind: "button",
            payload: vec![n],
        }
    }

    fn payloads(state: &QueueState) -> Vec<u8> {
        state.messages.iter().map(|m| m.payload[0]).collect()
    }

    #[test]
    fn full_queue_drops_the_oldest_but_not_the_one_in_flight() {
        let mut state = QueueState::new();
        for n in 0..MQTT_QUEUE_CAPACITY {
            assert_eq!(state.push(message(n as u8)), 0);
        }
        assert_eq!(state.push(message(200)), 1);
        assert_eq!(state.messages.len(), MQTT_QUEUE_CAPACITY);
        assert_eq!(payloads(&state)[..2], [1, 2]);
        assert_eq!(payloads(&state).last(), Some(&200));

        // In flight: the message behind it goes instead.
        let Some(Ok((_, Some(id)))) = state.take_front("t", 1) else {
            panic!("a QoS 1 packet");
        };
        assert_eq!(state.push(message(201)), 1);
        assert_eq!(payloads(&state)[..2], [1, 3]);
        state.finish_front(true);
        assert_eq!(payloads(&state)[0], 3);
        assert_eq!(state.front_packet_id, None);
        assert_ne!(state.take_front("t", 1), None);
        assert_eq!(state.front_packet_id, Some(id + 1));
    }

    #[test]
    fn resend_reuses_the_packet_id_with_dup() {
        let mut state = QueueState::new();
        state.push(message(1));
        state.push(message(2));
        let Some(Ok((first, Some(id)))) = state.take_front("samrt", 1) else {
            panic!("a QoS 1 packet");
        };
        assert_eq!(first[0], 0x32);
        state.finish_front(false);
        let Some(Ok((again, Some(same)))) = state.take_front("samrt", 1) else {
            panic!("a QoS 1 packet");
        };
        assert_eq!(same, id);
        assert_eq!(again[0], 0x3A, "DUP set");
        assert_eq!(again[1..], first[1..]);
        state.finish_front(true);
        let Some(Ok((next, Some(next_id)))) = state.take_front("samrt", 1) else {
            panic!("a QoS 1 packet");
        };
        assert_eq!((next[0], next_id), (0x32, id + 1));

        // A message dropped after a failed send does not pass its DUP to the next one.
        let mut state = QueueState::new();
        for n in 0..MQTT_QUEUE_CAPACITY {
            state.push(message(n as u8));
        }
        assert!(state.take_front("t", 1).is_some());
        state.finish_front(false);
        state.push(message(255));
        let Some(Ok((packet, _))) = state.take_front("t", 1) else {
            panic!("a QoS 1 packet");
        };
        assert_eq!(packet[0], 0x32);

        // Packet ids skip 0 when they wrap.
        let mut state = QueueState::new();
        state.next_packet_id = u16::MAX;
        for n in 0..2 {
            state.push(message(n));
            let Some(Ok((_, id))) = state.take_front("t", 1) else {
                panic!("a QoS 1 packet");
            };
            assert_eq!(id, Some(if n == 0 { u16::MAX } else { 1 }));
            state.finish_front(true);
        }
    }

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

    /// A fake broker's side of a connection: reads one packet.
    fn read_client_packet(stream: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut header = [0u8; 1];
        stream.read_exact(&mut header).expect("header");
        let mut length = Vec::new();
        let len = loop {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).expect("length");
            length.push(byte[0]);
            if let Some((len, _)) = decode_remaining_length(&length).expect("valid length") {
                break len;
            }
        };
        let mut body = vec![0; len];
        stream.read_exact(&mut body).expect("body");
        (header[0], body)
    }

    fn accept_session(listener: &TcpListener) -> TcpStream {
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let (header, _) = read_client_packet(&mut stream);
        assert_eq!(header, 0x10, "CONNECT first");
        stream
            .write_all(&[0x20, 0x02, 0x00, 0x00])
            .expect("CONNACK");
        stream
    }

    fn fake_broker_config(listener: &TcpListener) -> MqttConfig {
        MqttConfig {
            enabled: true,
            port: listener.local_addr().expect("address").port(),
            ..MqttConfig::default()
        }
    }

    #[test]
    fn unacknowledged_publish_is_resent_with_dup_after_reconnecting() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut sink = MqttSink::start(&fake_broker_config(&listener));
        sink.emit(&event(7)).expect("queued");

        // First session: take the PUBLISH, then hang up without PUBACK.
        let mut first = accept_session(&listener);
        let (header, body) = read_client_packet(&mut first);
        assert_eq!(header, 0x32, "QoS 1, no DUP");
        drop(first);

        // Second session: the same packet again with DUP; acknowledge it.
        let mut second = accept_session(&listener);
        let (header, again) = read_client_packet(&mut second);
        assert_eq!(header, 0x3A, "QoS 1 with DUP");
        assert_eq!(again, body, "same topic, packet id and payload");
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        assert_eq!(&body[2..2 + topic_len], b"samrt/masks/button");
        let id = [body[2 + topic_len], body[3 + topic_len]];
        let payload: serde_json::Value =
            serde_json::from_slice(&body[4 + topic_len..]).expect("JSON");
        assert_eq!(payload, event(7).to_json());
        second
            .write_all(&[0x40, 0x02, id[0], id[1]])
            .expect("PUBACK");

        // Flush: the queue is drained, then DISCONNECT.
        sink.flush().expect("drained");
        assert_eq!((sink.sent(), sink.dropped(), sink.queued()), (1, 0, 0));
        assert_eq!(read_client_packet(&mut second), (0xE0, vec![]));
        assert!(sink.emit(&event(8)).is_err(), "stopped after flush");
    }

    #[test]
    fn idle_connection_is_pinged() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut sink = MqttSink::start(&MqttConfig {
            keep_alive_s: 1,
            ..fake_broker_config(&listener)
        });
        let mut session = accept_session(&listener);
        let started = Instant::now();
        assert_eq!(read_client_packet(&mut session), (0xC0, vec![]), "PINGREQ");
        assert!(started.elapsed() >= Duration::from_millis(800));
        session.write_all(&[0xD0, 0x00]).expect("PINGRESP");
        assert!(sink.connected());
        sink.flush().expect("nothing queued");
        assert_eq!(read_client_packet(&mut session), (0xE0, vec![]));
    }

    #[test]
    fn refused_connection_is_reported_and_flush_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut sink = MqttSink::start(&MqttConfig {
            flush_timeout_ms: 300,
            ..fake_broker_config(&listener)
        });
        sink.emit(&event(1)).expect("queued");
        sink.emit(&event(2)).expect("queued");
        let (mut stream, _) = listener.accept().expect("accept");
        assert_eq!(read_client_packet(&mut stream).0, 0x10);
        stream
            .write_all(&[0x20, 0x02, 0x00, 0x05])
            .expect("CONNACK");
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.last_error().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let error = sink.last_error().expect("an error");
        assert!(error.contains("not authorized"), "{error}");
        assert!(!sink.connected());
        let error = sink.flush().expect_err("nothing acknowledged").to_string();
        assert!(error.contains("2 messages still queued"), "{error}");
    }

    #[test]
    fn invalid_config_gives_a_sink_that_refuses_events() {
        let mut sink = MqttSink::start(&MqttConfig {
            qos: 2,
            ..MqttConfig::default()
        });
        let error = sink.emit(&event(0)).expect_err("invalid").to_string();
        assert!(error.contains("qos = 2"), "{error}");
        sink.flush().expect("nothing to flush");
    }
}
