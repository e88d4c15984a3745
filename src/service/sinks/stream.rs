//! The stream sink: every event as a JSON line to every subscriber of a Unix and/or TCP socket.
//! Writes never block the pipeline: each subscriber has a bounded buffer, and one that falls
//! behind past it is disconnected. A writer thread of its own sends what a socket did not take at
//! once as soon as the subscriber reads, without waiting for the next event.

use std::io::{ErrorKind, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{MaskEvent, Sink, SinkError};

/// `[sinks.stream]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct StreamSinkConfig {
    /// Unix socket path that streams every event as a JSON line; "" = off.
    pub unix: String,
    /// TCP address that streams every event as a JSON line, e.g. "127.0.0.1:7878"; "" = off.
    pub tcp: String,
    /// Let `tcp` be an address beyond loopback (every subscriber that reaches it reads every
    /// event, unauthenticated).
    pub allow_remote: bool,
    /// Subscribers served at once.
    pub max_clients: usize,
    /// A subscriber that falls this far behind is disconnected.
    pub client_buffer_bytes: usize,
}

impl Default for StreamSinkConfig {
    fn default() -> Self {
        StreamSinkConfig {
            unix: String::new(),
            tcp: String::new(),
            allow_remote: false,
            max_clients: 8,
            client_buffer_bytes: 4 << 20,
        }
    }
}

impl StreamSinkConfig {
    /// The addresses `tcp` names (none when off), refused when one is beyond loopback without
    /// `allow_remote`.
    pub fn tcp_addrs(&self) -> Result<Vec<std::net::SocketAddr>, String> {
        use std::net::ToSocketAddrs;
        if self.tcp.is_empty() {
            return Ok(Vec::new());
        }
        let addrs: Vec<_> = self
            .tcp
            .to_socket_addrs()
            .map_err(|e| {
                format!(
                    "[sinks.stream] tcp = {:?} is not a HOST:PORT address ({e}); e.g. \"127.0.0.1:7878\"",
                    self.tcp
                )
            })?
            .collect();
        if let Some(remote) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            if !self.allow_remote {
                return Err(format!(
                    "[sinks.stream] tcp = {:?} listens beyond loopback ({remote}): anyone who reaches it reads every event, unauthenticated. Use a 127.0.0.1 address (and an SSH tunnel), or set allow_remote = true",
                    self.tcp
                ));
            }
        }
        Ok(addrs)
    }
}

const NAME: &str = "stream";
const ACCEPT_POLL: Duration = Duration::from_millis(50);
/// How often the writer retries a subscriber whose socket was full.
const WRITE_RETRY: Duration = Duration::from_millis(2);

/// A connected subscriber: a Unix or TCP stream, non-blocking.
trait Subscriber: Write + Send {}
impl<T: Write + Send> Subscriber for T {}

struct Client {
    stream: Box<dyn Subscriber>,
    peer: String,
    pending: Vec<u8>,
}

impl Client {
    /// Writes as much of the pending bytes as the socket takes now; false if the peer is gone.
    fn pump(&mut self) -> bool {
        while !self.pending.is_empty() {
            match self.stream.write(&self.pending) {
                Ok(0) => return false,
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// Serves subscribers on the configured sockets.
pub struct StreamSink {
    clients: Arc<Mutex<Vec<Client>>>,
    /// Signalled when `emit` leaves bytes pending, for the writer.
    pending: Arc<Condvar>,
    stop: Arc<AtomicBool>,
    acceptors: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
    client_buffer_bytes: usize,
    dropped: u64,
}

impl std::fmt::Debug for StreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSink")
            .field("unix_path", &self.unix_path)
            .finish()
    }
}

fn accept_loop<L, S>(
    listener: L,
    accept: impl Fn(&L) -> std::io::Result<(S, String)> + Send + 'static,
    clients: Arc<Mutex<Vec<Client>>>,
    stop: Arc<AtomicBool>,
    max_clients: usize,
) -> JoinHandle<()>
where
    L: Send + 'static,
    S: Subscriber + 'static,
{
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match accept(&listener) {
                Ok((stream, peer)) => {
                    let mut clients = clients.lock().unwrap_or_else(|e| e.into_inner());
                    if clients.len() >= max_clients {
                        log::warn!("stream sink: refusing subscriber {peer}: already {max_clients} (raise [sinks.stream] max_clients)");
                        continue;
                    }
                    log::info!("stream sink: subscriber {peer} connected");
                    clients.push(Client {
                        stream: Box::new(stream),
                        peer,
                        pending: Vec::new(),
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
                Err(e) => {
                    log::warn!("stream sink: accept failed: {e}");
                    std::thread::sleep(ACCEPT_POLL);
                }
            }
        }
    })
}

/// Sends pending bytes while a subscriber's socket takes them; sleeps while nothing is pending.
fn write_loop(
    clients: Arc<Mutex<Vec<Client>>>,
    pending: Arc<Condvar>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut guard = clients.lock().unwrap_or_else(|e| e.into_inner());
        while !stop.load(Ordering::Relaxed) {
            guard.retain_mut(|client| {
                let alive = client.pump();
                if !alive {
                    log::info!("stream sink: subscriber {} disconnected", client.peer);
                }
                alive
            });
            let wait = if guard.iter().any(|c| !c.pending.is_empty()) {
                WRITE_RETRY
            } else {
                ACCEPT_POLL
            };
            guard = pending
                .wait_timeout(guard, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    })
}

impl StreamSink {
    /// Binds the configured sockets (a stale Unix socket file is replaced).
    pub fn open(config: &StreamSinkConfig) -> Result<Self, String> {
        let clients = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut acceptors = Vec::new();
        let mut unix_path = None;
        if !config.unix.is_empty() {
            let path = PathBuf::from(&config.unix);
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).map_err(|e| {
                format!("[sinks.stream] cannot listen on {}: {e} (is the directory there and writable? under systemd use RuntimeDirectory=samrt)", path.display())
            })?;
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let peer_name = path.display().to_string();
            acceptors.push(accept_loop(
                listener,
                move |l: &UnixListener| {
                    let (s, _) = l.accept()?;
                    s.set_nonblocking(true)?;
                    Ok((s, format!("unix:{peer_name}")))
                },
                clients.clone(),
                stop.clone(),
                config.max_clients,
            ));
            unix_path = Some(path);
        }
        let addrs = config.tcp_addrs()?;
        if !addrs.is_empty() {
            let listener = TcpListener::bind(&addrs[..])
                .map_err(|e| format!("[sinks.stream] cannot listen on tcp {}: {e}", config.tcp))?;
            match listener.local_addr() {
                Ok(a) if !a.ip().is_loopback() => log::warn!(
                    "stream sink: listening on {a}, beyond loopback (allow_remote = true): every event to whoever connects"
                ),
                Ok(a) => log::info!("stream sink: listening on {a}"),
                Err(_) => {}
            }
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            acceptors.push(accept_loop(
                listener,
                |l: &TcpListener| {
                    let (s, peer) = l.accept()?;
                    s.set_nonblocking(true)?;
                    s.set_nodelay(true)?;
                    Ok((s, format!("tcp:{peer}")))
                },
                clients.clone(),
                stop.clone(),
                config.max_clients,
            ));
        }
        let pending = Arc::new(Condvar::new());
        let writer = Some(write_loop(clients.clone(), pending.clone(), stop.clone()));
        Ok(StreamSink {
            clients,
            pending,
            stop,
            acceptors,
            writer,
            unix_path,
            client_buffer_bytes: config.client_buffer_bytes,
            dropped: 0,
        })
    }

    /// Subscribers connected now.
    pub fn subscribers(&self) -> usize {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Sink for StreamSink {
    fn name(&self) -> &str {
        NAME
    }

    fn emit_line(&mut self, _event: &MaskEvent, line: &[u8]) -> Result<(), SinkError> {
        let limit = self.client_buffer_bytes;
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let mut lagging = 0;
        clients.retain_mut(|client| {
            if client.pending.len() + line.len() > limit {
                log::warn!("stream sink: subscriber {} is {} bytes behind: disconnected (raise client_buffer_bytes or read faster)", client.peer, client.pending.len());
                lagging += 1;
                return false;
            }
            client.pending.extend_from_slice(line);
            let alive = client.pump();
            if !alive {
                log::info!("stream sink: subscriber {} disconnected", client.peer);
            }
            alive
        });
        let behind = clients.iter().any(|c| !c.pending.is_empty());
        drop(clients);
        if behind {
            self.pending.notify_one();
        }
        self.dropped += lagging;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        while Instant::now() < deadline {
            clients.retain_mut(|c| c.pump());
            if clients.iter().all(|c| c.pending.is_empty()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let behind = clients.iter().filter(|c| !c.pending.is_empty()).count();
        Err(SinkError::new(
            NAME,
            format!("{behind} subscribers did not read their last events within 2 s"),
        ))
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl Drop for StreamSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.pending.notify_one();
        for handle in self.acceptors.drain(..).chain(self.writer.take()) {
            let _ = handle.join();
        }
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_beyond_loopback_needs_allow_remote() {
        let config = |tcp: &str, allow_remote: bool| StreamSinkConfig {
            tcp: tcp.into(),
            allow_remote,
            ..Default::default()
        };
        let err = StreamSink::open(&config("0.0.0.0:0", false)).unwrap_err();
        assert!(err.contains("allow_remote = true"), "{err}");
        let sink = StreamSink::open(&config("0.0.0.0:0", true)).unwrap();
        assert_eq!(sink.subscribers(), 0);
        drop(sink);
        StreamSink::open(&config("127.0.0.1:0", false)).unwrap();
    }

    /// An event larger than the socket's buffer reaches a subscriber that reads slowly, whole,
    /// without a later event to push its rest.
    #[test]
    fn a_partly_written_event_is_finished_without_waiting_for_the_next() {
        use crate::postprocess::Mask;
        use crate::service::event::{EventMask, PromptOrigin};
        use std::io::{BufRead, BufReader};
        use std::os::unix::net::UnixStream;

        let path = std::env::temp_dir().join(format!("samrt-stream-{}.sock", std::process::id()));
        let mut sink = StreamSink::open(&StreamSinkConfig {
            unix: path.display().to_string(),
            client_buffer_bytes: 64 << 20,
            ..Default::default()
        })
        .unwrap();
        let subscriber = UnixStream::connect(&path).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.subscribers() == 0 {
            assert!(Instant::now() < deadline, "the subscriber was not accepted");
            std::thread::sleep(Duration::from_millis(5));
        }
        // A noisy mask: megabytes of RLE counts, far more than a socket buffers.
        let (width, height) = (1500, 1000);
        let mut state = 0x2545_F491_u64;
        let data = (0..width * height)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                state >> 63 == 1
            })
            .collect();
        let mask = Mask {
            width,
            height,
            data,
        };
        let event = MaskEvent {
            id: 0,
            frame: 0,
            frame_origin: "test".into(),
            origin: PromptOrigin::Fixed,
            prompt: None,
            masks: vec![EventMask::new(mask, 0.9, 0.8)],
            latency_ms: 1.0,
            time: std::time::SystemTime::now(),
            image: Arc::new(image::RgbImage::new(width as u32, height as u32)),
        };
        sink.emit(&event).unwrap();
        assert!(
            !sink.clients.lock().unwrap()[0].pending.is_empty(),
            "the test needs an event the socket cannot take at once ({} bytes)",
            event.to_json().to_string().len()
        );
        // Read slowly at first, then all of it; no second event.
        std::thread::sleep(Duration::from_millis(200));
        subscriber
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(&subscriber).read_line(&mut line).unwrap();
        let record: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(record, event.to_json());
        drop(sink);
        let _ = std::fs::remove_file(&path);
    }
}
