//! `MqttSink` against a real broker: each test starts its own `mosquitto` on a free port of
//! 127.0.0.1 and reads what arrives with a subscriber written here on a raw socket (independent of
//! the sink's client code).
//!
//! Without mosquitto the tests print "skipped" and pass, unless `SAMRT_REQUIRE_SERVERS=1` (CI),
//! where they fail. Install: `apt-get install mosquitto mosquitto-clients`.
//!
//! The tests where the broker goes down give the subscriber a persistent session (clean session
//! off, QoS 1) on a broker with persistence on: the broker keeps the messages published while the
//! subscriber is not connected yet, so no test depends on who reconnects first.

#![cfg(target_os = "linux")]

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use common::{find_program, free_port, mosquitto, Broker, TempDir};
use image::RgbImage;
use samrt::service::event::{EventMask, MaskEvent, PromptOrigin};
use samrt::service::sinks::mqtt::{MqttConfig, MqttSink, MQTT_QUEUE_CAPACITY};
use samrt::service::sinks::Sink;
use samrt::{Mask, Prompt};
use serde_json::Value;

/// The longest any wait in these tests may take.
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Finding and running mosquitto.
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// A subscriber on a raw socket (MQTT 3.1.1).
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Inbox {
    /// (topic, payload) in arrival order, but for samrt's status.
    messages: Vec<(String, Vec<u8>)>,
    /// (topic, payload, retained) of `{topic}/status`, in arrival order.
    statuses: Vec<(String, String, bool)>,
    subscribed: bool,
    closed: bool,
}

struct Subscriber {
    writer: Arc<Mutex<TcpStream>>,
    inbox: Arc<Mutex<Inbox>>,
    reader: Option<JoinHandle<()>>,
}

fn mqtt_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&u16::try_from(text.len()).expect("short").to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn mqtt_packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        out.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// One packet: (fixed header, body); `None` at the end of the stream.
fn read_mqtt_packet(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).ok()?;
    let header = byte[0];
    let mut len = 0usize;
    for shift in (0..4).map(|i| 7 * i) {
        stream.read_exact(&mut byte).ok()?;
        len |= usize::from(byte[0] & 0x7F) << shift;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    Some((header, body))
}

impl Subscriber {
    /// Connects; returns the subscriber and CONNACK's session-present flag.
    fn connect(
        broker: &Broker,
        client_id: &str,
        clean_session: bool,
        credentials: Option<(&str, &str)>,
    ) -> (Subscriber, bool) {
        Subscriber::connect_port(broker.port, client_id, clean_session, credentials)
    }

    fn connect_port(
        port: u16,
        client_id: &str,
        clean_session: bool,
        credentials: Option<(&str, &str)>,
    ) -> (Subscriber, bool) {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("subscriber connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        let mut body = Vec::new();
        mqtt_string(&mut body, "MQTT");
        let mut flags = if clean_session { 0x02 } else { 0x00 };
        if credentials.is_some() {
            flags |= 0xC0;
        }
        body.extend_from_slice(&[0x04, flags, 0x00, 60]);
        mqtt_string(&mut body, client_id);
        if let Some((username, password)) = credentials {
            mqtt_string(&mut body, username);
            mqtt_string(&mut body, password);
        }
        stream
            .write_all(&mqtt_packet(0x10, &body))
            .expect("send CONNECT");
        let connack = read_mqtt_packet(&mut stream).expect("CONNACK");
        assert_eq!(connack.0, 0x20, "CONNACK expected, got {connack:?}");
        assert_eq!(connack.1[1], 0, "subscriber refused: {connack:?}");
        let session_present = connack.1[0] & 1 == 1;

        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let writer = Arc::new(Mutex::new(stream.try_clone().expect("clone")));
        let reader = {
            let inbox = Arc::clone(&inbox);
            let writer = Arc::clone(&writer);
            thread::spawn(move || {
                while let Some((header, body)) = read_mqtt_packet(&mut stream) {
                    match header >> 4 {
                        3 => {
                            let qos = (header >> 1) & 3;
                            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                            let topic = String::from_utf8(body[2..2 + topic_len].to_vec())
                                .expect("UTF-8 topic");
                            let mut rest = &body[2 + topic_len..];
                            if qos > 0 {
                                let puback = [0x40, 0x02, rest[0], rest[1]];
                                rest = &rest[2..];
                                let _ = writer.lock().expect("writer").write_all(&puback);
                            }
                            let mut inbox = inbox.lock().expect("inbox");
                            if topic.ends_with("/status") {
                                let text = String::from_utf8_lossy(rest).into_owned();
                                inbox.statuses.push((topic, text, header & 1 == 1));
                            } else {
                                inbox.messages.push((topic, rest.to_vec()));
                            }
                        }
                        9 => inbox.lock().expect("inbox").subscribed = true,
                        _ => {}
                    }
                }
                inbox.lock().expect("inbox").closed = true;
            })
        };
        let subscriber = Subscriber {
            writer,
            inbox,
            reader: Some(reader),
        };
        (subscriber, session_present)
    }

    /// SUBSCRIBE at QoS 1; waits for SUBACK.
    fn subscribe(&self, filter: &str) {
        let mut body = vec![0x00, 0x01];
        mqtt_string(&mut body, filter);
        body.push(1);
        self.writer
            .lock()
            .expect("writer")
            .write_all(&mqtt_packet(0x82, &body))
            .expect("send SUBSCRIBE");
        wait_until("SUBACK", || self.inbox.lock().expect("inbox").subscribed);
    }

    /// The statuses received so far: (topic, payload, retained).
    fn statuses(&self) -> Vec<(String, String, bool)> {
        self.inbox.lock().expect("inbox").statuses.clone()
    }

    fn count(&self) -> usize {
        self.inbox.lock().expect("inbox").messages.len()
    }

    /// Waits until `n` messages arrived; returns all of them.
    fn wait_for(&self, n: usize) -> Vec<(String, Vec<u8>)> {
        let deadline = Instant::now() + DEADLINE;
        while self.count() < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let inbox = self.inbox.lock().expect("inbox");
        assert!(
            inbox.messages.len() >= n,
            "{} of {n} messages arrived within {DEADLINE:?} (subscriber connection closed: {}); \
             ids: {:?}",
            inbox.messages.len(),
            inbox.closed,
            ids(&inbox.messages)
        );
        inbox.messages.clone()
    }

    /// DISCONNECT, then waits for the broker to close the connection.
    fn disconnect(mut self) {
        let _ = self.writer.lock().expect("writer").write_all(&[0xE0, 0x00]);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let Ok(writer) = self.writer.lock() {
            let _ = writer.shutdown(Shutdown::Both);
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Creates the persistent session of `client_id` (subscribed to `samrt/#` at QoS 1) on a broker
/// that is stopped again afterwards.
fn register_persistent_subscriber(broker: &mut Broker, client_id: &str) {
    broker.start();
    let (subscriber, _) = Subscriber::connect(broker, client_id, false, None);
    subscriber.subscribe("samrt/#");
    subscriber.disconnect();
    broker.stop();
}

/// Reconnects the persistent session of `client_id`; fails when the broker lost it.
fn resume_subscriber(broker: &Broker, client_id: &str) -> Subscriber {
    let (subscriber, session_present) = Subscriber::connect(broker, client_id, false, None);
    assert!(
        session_present,
        "mosquitto did not restore the subscriber's session (persistence):\n{}",
        broker.logs()
    );
    subscriber
}

// ---------------------------------------------------------------------------------------------
// Events and checks.
// ---------------------------------------------------------------------------------------------

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// A small event; the source and the masks vary with `id`.
fn event(id: u64) -> MaskEvent {
    let (width, height) = (9usize, 7usize);
    let origin = match id % 6 {
        0 => PromptOrigin::Button,
        1 => PromptOrigin::ButtonLong,
        2 => PromptOrigin::Fixed,
        3 => PromptOrigin::Detector {
            label: Some("cup".into()),
        },
        4 => PromptOrigin::Control {
            request_id: Some(format!("request-{id}")),
        },
        _ => PromptOrigin::Detector { label: None },
    };
    let masks = (0..1 + id % 3)
        .map(|k| {
            let data = (0..width * height)
                .map(|i| (i % width + i / width + k as usize + id as usize).is_multiple_of(4))
                .collect();
            let mask = Mask {
                width,
                height,
                data,
            };
            EventMask::new(mask, 0.5 + k as f32 / 10.0, 0.9)
        })
        .collect();
    MaskEvent {
        id,
        frame: 100 + id,
        frame_origin: "/dev/video0".into(),
        prompt: (id % 6 != 1).then(|| Prompt::point(3.0, 2.0 + id as f64 % 4.0)),
        origin,
        masks,
        latency_ms: 12.3456 + id as f64,
        time: SystemTime::now(),
        image: Arc::new(RgbImage::new(width as u32, height as u32)),
    }
}

/// The event ids of received messages, for failure messages.
fn ids(messages: &[(String, Vec<u8>)]) -> Vec<Option<u64>> {
    messages
        .iter()
        .map(|(_, payload)| {
            serde_json::from_slice::<Value>(payload)
                .ok()
                .and_then(|v| v["id"].as_u64())
        })
        .collect()
}

/// Every event arrived exactly once, in order, on `{prefix}/{source}`, with the JSON of
/// `to_json()`.
fn assert_delivered(received: &[(String, Vec<u8>)], events: &[MaskEvent], prefix: &str) {
    let want_ids: Vec<Option<u64>> = events.iter().map(|e| Some(e.id)).collect();
    assert_eq!(ids(received), want_ids, "event ids received vs emitted");
    for ((topic, payload), event) in received.iter().zip(events) {
        assert_eq!(
            *topic,
            format!("{prefix}/{}", event.origin.kind()),
            "event {}",
            event.id
        );
        let json: Value = serde_json::from_slice(payload).expect("JSON payload");
        assert_eq!(json, event.to_json(), "event {}", event.id);
    }
}

fn sink_config(port: u16, client_id: &str) -> MqttConfig {
    MqttConfig {
        enabled: true,
        port,
        client_id: client_id.into(),
        ..MqttConfig::default()
    }
}

fn emit_all(sink: &mut MqttSink, events: &[MaskEvent]) {
    for event in events {
        sink.emit(event)
            .expect("emit never fails on a running sink");
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn every_event_arrives_once_in_order_at_qos_1_and_0() {
    let Some(exe) = mosquitto() else { return };
    let dir = TempDir::new("order");
    let mut broker = Broker::new(&exe, &dir.0, free_port(), "");
    broker.start();
    let (subscriber, _) = Subscriber::connect(&broker, "test-sub-order", true, None);
    subscriber.subscribe("samrt/#");

    // QoS 1, default topic.
    let events: Vec<MaskEvent> = (0..30).map(event).collect();
    let mut sink = MqttSink::start(&sink_config(broker.port, "samrt-order-1"));
    emit_all(&mut sink, &events);
    let received = subscriber.wait_for(events.len());
    assert_delivered(&received, &events, "samrt/masks");
    sink.flush().expect("all acknowledged");
    assert_eq!(
        (sink.sent(), sink.dropped(), sink.queued()),
        (30, 0, 0),
        "sent, dropped, queued"
    );
    assert!(!sink.connected(), "disconnected after flush");

    // QoS 0, a topic with a trailing slash.
    let more: Vec<MaskEvent> = (30..50).map(event).collect();
    let mut sink = MqttSink::start(&MqttConfig {
        qos: 0,
        topic: "samrt/qos0/".into(),
        ..sink_config(broker.port, "samrt-order-0")
    });
    wait_until("the QoS 0 sink to connect", || sink.connected());
    emit_all(&mut sink, &more);
    let received = subscriber.wait_for(events.len() + more.len());
    assert_delivered(&received[events.len()..], &more, "samrt/qos0");
    sink.flush().expect("all written");
    assert_eq!((sink.sent(), sink.dropped()), (20, 0));
    assert_eq!(subscriber.count(), 50, "no duplicates");
}

#[test]
fn events_wait_while_the_broker_is_down() {
    let Some(exe) = mosquitto() else { return };
    let dir = TempDir::new("outage");
    let mut broker = Broker::persistent(&exe, &dir.0, free_port());
    register_persistent_subscriber(&mut broker, "test-sub-outage");

    // The broker is down when the sink starts.
    let mut sink = MqttSink::start(&sink_config(broker.port, "samrt-outage"));
    let first: Vec<MaskEvent> = (0..8).map(event).collect();
    emit_all(&mut sink, &first);
    wait_until("a failed connection attempt", || {
        sink.last_error().is_some()
    });
    assert!(!sink.connected());
    assert_eq!((sink.sent(), sink.queued()), (0, first.len()));

    broker.start();
    let subscriber = resume_subscriber(&broker, "test-sub-outage");
    assert_delivered(&subscriber.wait_for(first.len()), &first, "samrt/masks");
    wait_until("the PUBACKs", || sink.sent() == first.len() as u64);

    // Down again while connected, events meanwhile, back up. The subscriber leaves first, so that
    // the broker has its PUBACKs and does not redeliver to it after the restart.
    subscriber.disconnect();
    broker.stop();
    wait_until("the sink to notice the outage", || !sink.connected());
    let second: Vec<MaskEvent> = (8..20).map(event).collect();
    emit_all(&mut sink, &second);
    broker.start();
    let subscriber = resume_subscriber(&broker, "test-sub-outage");
    assert_delivered(&subscriber.wait_for(second.len()), &second, "samrt/masks");

    sink.flush().expect("all acknowledged");
    assert_eq!((sink.sent(), sink.dropped(), sink.queued()), (20, 0, 0));
    assert_eq!(subscriber.count(), second.len(), "no duplicates");
}

#[test]
fn full_queue_drops_the_oldest_events() {
    let Some(exe) = mosquitto() else { return };
    let dir = TempDir::new("overflow");
    let mut broker = Broker::persistent(&exe, &dir.0, free_port());
    register_persistent_subscriber(&mut broker, "test-sub-overflow");

    let extra = 10;
    let events: Vec<MaskEvent> = (0..(MQTT_QUEUE_CAPACITY + extra) as u64)
        .map(event)
        .collect();
    let mut sink = MqttSink::start(&sink_config(broker.port, "samrt-overflow"));
    emit_all(&mut sink, &events);
    assert_eq!(
        sink.dropped(),
        extra as u64,
        "dropped while the broker is down"
    );
    assert_eq!(sink.queued(), MQTT_QUEUE_CAPACITY);

    broker.start();
    let subscriber = resume_subscriber(&broker, "test-sub-overflow");
    let received = subscriber.wait_for(MQTT_QUEUE_CAPACITY);
    assert_delivered(&received, &events[extra..], "samrt/masks");
    sink.flush().expect("all acknowledged");
    assert_eq!(
        (sink.sent(), sink.dropped()),
        (MQTT_QUEUE_CAPACITY as u64, extra as u64)
    );
}

#[test]
fn broker_authentication() {
    let Some(exe) = mosquitto() else { return };
    let dir = TempDir::new("auth");
    let password_tool = find_program("mosquitto_passwd", &["/usr/bin", "/usr/local/bin"]);
    let password_file = dir.0.join("passwd");
    let mut extra = "allow_anonymous false\n".to_string();
    if let Some(tool) = &password_tool {
        let status = Command::new(tool)
            .args(["-b", "-c"])
            .arg(&password_file)
            .args(["samrt", "s3cret"])
            .status()
            .expect("run mosquitto_passwd");
        assert!(status.success(), "mosquitto_passwd failed");
        fs::set_permissions(&password_file, fs::Permissions::from_mode(0o644)).expect("chmod");
        extra += &format!("password_file {}\n", password_file.display());
    }
    let mut broker = Broker::new(&exe, &dir.0, free_port(), &extra);
    broker.start();

    // No credentials: refused, with the fix in the error; flush gives up naming what is left.
    let mut sink = MqttSink::start(&MqttConfig {
        flush_timeout_ms: 300,
        ..sink_config(broker.port, "samrt-anonymous")
    });
    emit_all(&mut sink, &[event(0), event(1), event(2)]);
    wait_until("the refusal", || sink.last_error().is_some());
    let error = sink.last_error().unwrap_or_default();
    assert!(
        error.contains("not authorized (check [sinks.mqtt] username and password_file"),
        "{error}"
    );
    assert!(!sink.connected());
    let error = sink.flush().expect_err("nothing can go out").to_string();
    assert!(error.contains("3 messages still queued"), "{error}");

    let Some(_) = password_tool else {
        eprintln!("mosquitto_passwd not found: skipping the part with a password");
        return;
    };
    let credentials = Some(("samrt", "s3cret"));
    let (subscriber, _) = Subscriber::connect(&broker, "test-sub-auth", true, credentials);
    subscriber.subscribe("samrt/#");
    let events: Vec<MaskEvent> = (0..5).map(event).collect();
    // The password from a file (its first line), never from the config.
    let secret = dir.0.join("mqtt-password");
    fs::write(&secret, "s3cret\n").expect("write the password file");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut sink = MqttSink::start(&MqttConfig {
        username: Some("samrt".into()),
        password_file: Some(secret.display().to_string()),
        ..sink_config(broker.port, "samrt-auth")
    });
    emit_all(&mut sink, &events);
    assert_delivered(&subscriber.wait_for(events.len()), &events, "samrt/masks");
    sink.flush().expect("all acknowledged");
}

/// Waits for the status `want` (retained) on the subscriber.
fn wait_for_status(subscriber: &Subscriber, topic: &str, want: &str) {
    wait_until(&format!("{topic} = {want}"), || {
        subscriber
            .statuses()
            .iter()
            .any(|(t, payload, _)| t == topic && payload == want)
    });
}

#[test]
fn status_is_online_while_connected_and_offline_after_a_clean_stop() {
    let Some(exe) = mosquitto() else { return };
    let dir = TempDir::new("status");
    let mut broker = Broker::new(&exe, &dir.0, free_port(), "");
    broker.start();
    let mut sink = MqttSink::start(&sink_config(broker.port, "samrt-status"));
    wait_until("the sink to connect", || sink.connected());
    emit_all(&mut sink, &[event(0)]);
    sink.flush().expect("acknowledged");
    // A subscriber that comes later still gets the last status: it is retained.
    let (late, _) = Subscriber::connect(&broker, "test-sub-status", true, None);
    late.subscribe("samrt/masks/status");
    wait_for_status(&late, "samrt/masks/status", "offline");
    let statuses = late.statuses();
    assert!(
        statuses.iter().all(|(_, _, retained)| *retained),
        "{statuses:?}"
    );

    let (subscriber, _) = Subscriber::connect(&broker, "test-sub-status-2", true, None);
    subscriber.subscribe("samrt/masks/status");
    let sink = MqttSink::start(&sink_config(broker.port, "samrt-status-2"));
    wait_for_status(&subscriber, "samrt/masks/status", "online");
    drop(sink);
    wait_until("offline after the drop", || {
        subscriber.statuses().last().map(|(_, p, _)| p.as_str()) == Some("offline")
    });
}

/// A broker played by the test on a raw socket: accepts one session and never acknowledges.
#[test]
fn several_messages_are_in_flight_at_qos_1() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("address").port();
    let max_inflight = 4;
    let mut sink = MqttSink::start(&MqttConfig {
        max_inflight,
        flush_timeout_ms: 200,
        ..sink_config(port, "samrt-window")
    });
    let (mut stream, _) = listener.accept().expect("the sink connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let (header, _) = read_mqtt_packet(&mut stream).expect("CONNECT");
    assert_eq!(header >> 4, 1, "CONNECT first");
    stream
        .write_all(&[0x20, 0x02, 0x00, 0x00])
        .expect("CONNACK");
    emit_all(&mut sink, &(0..10).map(event).collect::<Vec<_>>());
    // The status, then events, until the window is full; nothing more without a PUBACK.
    let mut packet_ids = Vec::new();
    for _ in 0..max_inflight {
        let (header, body) = read_mqtt_packet(&mut stream).expect("PUBLISH");
        assert_eq!(header >> 4, 3, "PUBLISH, got {header:#x}");
        assert_eq!((header >> 1) & 3, 1, "QoS 1");
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        packet_ids.push([body[2 + topic_len], body[3 + topic_len]]);
    }
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    assert!(
        read_mqtt_packet(&mut stream).is_none(),
        "more than max_inflight = {max_inflight} unacknowledged messages"
    );
    // Each PUBACK frees one slot (in order, as brokers acknowledge: the status, the first event).
    for id in &packet_ids[..2] {
        stream
            .write_all(&[0x40, 0x02, id[0], id[1]])
            .expect("PUBACK");
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    for _ in 0..2 {
        let (header, _) = read_mqtt_packet(&mut stream).expect("the next PUBLISH");
        assert_eq!(header >> 4, 3);
    }
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    assert!(
        read_mqtt_packet(&mut stream).is_none(),
        "the window is full again"
    );
    wait_until("the acknowledged event to count", || sink.sent() == 1);
    assert!(sink.flush().is_err(), "the rest is never acknowledged");
}

/// Runs openssl; panics with its output when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A certificate authority `name`.crt/.key in `dir`.
fn make_ca(dir: &std::path::Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

/// A certificate `name`.crt/.key signed by `ca`, with the extensions of `extensions`.
fn make_cert(dir: &std::path::Path, ca: &str, name: &str, extensions: &str) {
    fs::write(dir.join(format!("{name}.ext")), extensions).expect("write extensions");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
    // mosquitto drops to its own user and must read its key.
    fs::set_permissions(
        dir.join(format!("{name}.key")),
        fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
}

#[test]
fn tls_with_a_ca_and_client_certificates_and_a_wrong_ca_refused() {
    let Some(exe) = mosquitto() else { return };
    let dir = TempDir::new("tls");
    let pki = dir.0.join("pki");
    fs::create_dir_all(&pki).expect("mkdir");
    fs::set_permissions(&pki, fs::Permissions::from_mode(0o755)).expect("chmod");
    make_ca(&pki, "ca");
    make_ca(&pki, "other-ca");
    make_cert(
        &pki,
        "ca",
        "broker",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    make_cert(&pki, "ca", "device", "extendedKeyUsage=clientAuth\n");
    // TLS with client certificates on the broker's first port; the test's subscriber on a
    // second, plain one.
    let plain = free_port();
    let extra = format!(
        "cafile {0}/ca.crt\ncertfile {0}/broker.crt\nkeyfile {0}/broker.key\n\
         require_certificate true\nlistener {plain} 127.0.0.1\n",
        pki.display()
    );
    let mut broker = Broker::new(&exe, &dir.0, free_port(), &extra);
    broker.start();
    wait_until("the plain listener", || {
        TcpStream::connect(("127.0.0.1", plain)).is_ok()
    });
    let (subscriber, _) = Subscriber::connect_port(plain, "test-sub-tls", true, None);
    subscriber.subscribe("samrt/#");
    let file = |name: &str| Some(pki.join(name).display().to_string());
    let tls = |client_id: &str| MqttConfig {
        tls: true,
        ca_file: file("ca.crt"),
        client_cert_file: file("device.crt"),
        client_key_file: file("device.key"),
        flush_timeout_ms: 500,
        ..sink_config(broker.port, client_id)
    };

    let events: Vec<MaskEvent> = (0..12).map(event).collect();
    let mut sink = MqttSink::start(&tls("samrt-tls"));
    emit_all(&mut sink, &events);
    assert_delivered(&subscriber.wait_for(events.len()), &events, "samrt/masks");
    wait_for_status(&subscriber, "samrt/masks/status", "online");
    sink.flush().expect("all acknowledged over TLS");
    assert_eq!(sink.sent(), events.len() as u64);

    // A broker whose certificate the CA does not sign: refused, and the error says what to fix.
    let mut sink = MqttSink::start(&MqttConfig {
        ca_file: file("other-ca.crt"),
        ..tls("samrt-wrong-ca")
    });
    emit_all(&mut sink, &[event(100)]);
    wait_until("the refusal", || sink.last_error().is_some());
    let error = sink.last_error().unwrap_or_default();
    assert!(
        error.contains("certificate") && error.contains("ca_file"),
        "{error}"
    );
    assert!(!sink.connected());
    let error = sink.flush().expect_err("never sent").to_string();
    assert!(error.contains("1 message still queued"), "{error}");

    // Without the client certificate the broker requires: no connection.
    let mut sink = MqttSink::start(&MqttConfig {
        client_cert_file: None,
        client_key_file: None,
        ..tls("samrt-no-client-cert")
    });
    emit_all(&mut sink, &[event(101)]);
    wait_until("the refusal", || sink.last_error().is_some());
    assert!(!sink.connected());
    assert!(sink.flush().is_err());
    assert_eq!(subscriber.count(), events.len(), "nothing else arrived");

    // Plain MQTT against the TLS port: a clear error too.
    let mut sink = MqttSink::start(&MqttConfig {
        flush_timeout_ms: 300,
        ..sink_config(broker.port, "samrt-plain-to-tls")
    });
    wait_until("the failure", || sink.last_error().is_some());
    assert!(!sink.connected());
    assert!(sink.flush().is_ok(), "nothing was queued");
}
