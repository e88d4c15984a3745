//! Helpers shared by the integration tests: paths, the reference files, mask comparisons.
#![allow(dead_code)]

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use samrt::{CocoRle, Mask, ModelFiles, SamPredictor};
use serde_json::Value;

/// `tests/data`.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
}

/// The default model, loaded once per test binary.
pub fn predictor() -> &'static SamPredictor {
    static PREDICTOR: OnceLock<SamPredictor> = OnceLock::new();
    PREDICTOR.get_or_init(|| {
        SamPredictor::load(&ModelFiles::default_model().expect("default model"))
            .expect("load default model")
    })
}

/// A JSON file under tests/data.
pub fn load_json(relative: &str) -> Value {
    let path = data_dir().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `len` little-endian f32 values at element `offset` of a file under tests/data.
pub fn load_f32(relative: &str, offset: usize, len: usize) -> Vec<f32> {
    let path = data_dir().join(relative);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let slice = &bytes[offset * 4..(offset + len) * 4];
    slice
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// A `{"file", "offset", "len"}` reference to f32 values.
pub fn load_f32_ref(v: &Value) -> Vec<f32> {
    load_f32(
        v["file"].as_str().expect("file"),
        v["offset"].as_u64().expect("offset") as usize,
        v["len"].as_u64().expect("len") as usize,
    )
}

/// ‖a − b‖ / ‖b‖.
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (diff / norm).sqrt()
}

/// A golden prompt's `masks_rle`: a JSON array, or (older goldens) a Python-repr string of one.
pub fn golden_mask_rles(prompt: &Value) -> Vec<Value> {
    match &prompt["masks_rle"] {
        Value::String(s) => serde_json::from_str(&s.replace('\'', "\"")).expect("masks_rle"),
        v => v.as_array().expect("masks_rle").clone(),
    }
}

/// A COCO RLE JSON object decoded to a mask.
pub fn rle_mask(v: &Value) -> Mask {
    let rle: CocoRle = serde_json::from_value(v.clone()).expect("RLE object");
    rle.decode().expect("valid RLE")
}

/// Intersection over union of two masks of the same size (1 when both are empty).
pub fn mask_iou(a: &Mask, b: &Mask) -> f64 {
    assert_eq!(
        (a.width, a.height),
        (b.width, b.height),
        "mask sizes differ"
    );
    let (mut inter, mut union) = (0u64, 0u64);
    for (&x, &y) in a.data.iter().zip(&b.data) {
        inter += u64::from(x && y);
        union += u64::from(x || y);
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Largest absolute difference between two slices of the same length.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Points and box of a reference prompt (`"points": [[x, y, label]], "box": [..] | null`).
pub fn prompt_from_json(v: &Value) -> samrt::Prompt {
    let points = v["points"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let values: Vec<f64> = p
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|n| n.as_f64().unwrap())
                        .collect();
                    samrt::prompt::point_from_values(&values).unwrap()
                })
                .collect()
        })
        .unwrap_or_default();
    let bbox = v["box"].as_array().map(|b| {
        let n: Vec<f64> = b.iter().map(|n| n.as_f64().unwrap()).collect();
        samrt::BoxPrompt {
            x0: n[0],
            y0: n[1],
            x1: n[2],
            y1: n[3],
        }
    });
    samrt::Prompt {
        points,
        bbox,
        mask_input: None,
    }
}

/// A fresh, empty directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "samrt-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `check` every 20 ms until it returns `Some`, panicking with `what` after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A `mosquitto_sub` durable subscriber (client id `id`, QoS 1) printing "topic payload" lines.
pub struct Subscriber {
    child: std::process::Child,
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Subscriber {
    pub fn start(port: u16, topic: &str, id: &str) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                topic,
                "-v",
                "-q",
                "1",
                "-c",
                "-i",
                id,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto_sub (apt-get install mosquitto-clients)");
        let stdout = child.stdout.take().expect("stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        Subscriber { child, lines }
    }

    /// Every "topic payload" line but those of samrt's retained `{topic}/status`.
    pub fn received(&self) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|l| !l.split(' ').next().unwrap_or("").ends_with("/status"))
            .collect()
    }

    /// Every line, status included.
    pub fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal to a process.
pub fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, signal) };
}

// ---------------------------------------------------------------------------------------------
// mosquitto, for the MQTT tests (`.ci/run` installs it; without it they skip, unless
// SAMRT_REQUIRE_SERVERS=1).
// ---------------------------------------------------------------------------------------------

/// The longest a broker may take to start or stop.
const BROKER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// `name` on PATH or in one of `dirs`.
pub fn find_program(name: &str, dirs: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(dirs.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The mosquitto binary; `None` (after saying so) when the test is to be skipped.
pub fn mosquitto() -> Option<PathBuf> {
    required_program(
        "mosquitto",
        &["/usr/sbin", "/usr/local/sbin"],
        "apt-get install mosquitto mosquitto-clients",
    )
}

/// A program a test needs (`.ci/run` installs it): `None`, after saying so, when it is missing
/// and the test is to be skipped; a failure instead with SAMRT_REQUIRE_SERVERS=1.
pub fn required_program(name: &str, dirs: &[&str], install: &str) -> Option<PathBuf> {
    if let Some(found) = find_program(name, dirs) {
        return Some(found);
    }
    if std::env::var("SAMRT_REQUIRE_SERVERS").as_deref() == Ok("1") {
        panic!(
            "{name} is not installed and SAMRT_REQUIRE_SERVERS=1 requires it: install it with \
             `{install}`"
        );
    }
    eprintln!(
        "skipped: {name} not installed ({install}; SAMRT_REQUIRE_SERVERS=1 turns this into a \
         failure)"
    );
    None
}

/// A port of 127.0.0.1 that was free a moment ago, never the same twice in one test binary (its
/// tests run in parallel: two brokers must not be handed one port).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().expect("local address").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A mosquitto process on one port, started and stopped at will; killed on drop, whatever the
/// exit path of the test.
pub struct Broker {
    exe: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Broker {
    /// Writes the config (`extra` appended; anonymous clients allowed unless `extra` says
    /// otherwise) without starting the broker.
    pub fn new(exe: &Path, dir: &Path, port: u16, extra: &str) -> Broker {
        // World-writable: run as root, mosquitto drops to its own user and must still write its
        // database and log here.
        std::fs::create_dir_all(dir).expect("create the broker directory");
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod 777");
        let config = dir.join("mosquitto.conf");
        let anonymous = if extra.contains("allow_anonymous") {
            ""
        } else {
            "allow_anonymous true\n"
        };
        let text = format!(
            "listener {port} 127.0.0.1\n{anonymous}log_dest file {log}\n{extra}\n",
            log = dir.join("mosquitto.log").display()
        );
        fs::write(&config, text).expect("write mosquitto.conf");
        Broker {
            exe: exe.to_path_buf(),
            config,
            dir: dir.to_path_buf(),
            port,
            child: None,
        }
    }

    /// Persistence on: sessions and queued messages survive a graceful [`Broker::stop`].
    pub fn persistent(exe: &Path, dir: &Path, port: u16) -> Broker {
        let extra = format!(
            "persistence true\npersistence_location {}/\n",
            dir.display()
        );
        Broker::new(exe, dir, port, &extra)
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts mosquitto and waits until it accepts connections.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let output = |name: &str| {
            File::create(self.dir.join(name))
                .map(Stdio::from)
                .expect("create an output file")
        };
        let child = Command::new(&self.exe)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(output("stdout.txt"))
            .stderr(output("stderr.txt"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.exe.display()));
        self.child = Some(child);
        let deadline = Instant::now() + BROKER_DEADLINE;
        loop {
            if TcpStream::connect_timeout(&self.address(), Duration::from_millis(200)).is_ok() {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                self.kill();
                panic!(
                    "mosquitto did not start on port {} ({exited:?}):\n{}",
                    self.port,
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, so that mosquitto saves its database, then waits for the exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = libc::pid_t::try_from(child.id()).expect("a pid");
        // SAFETY: sends a signal to our own child process, which has not been reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + BROKER_DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("mosquitto ignored SIGTERM:\n{}", self.logs());
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn logs(&self) -> String {
        ["mosquitto.log", "stdout.txt", "stderr.txt"]
            .iter()
            .map(|name| fs::read_to_string(self.dir.join(name)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Seeded mutation, for the bad-input tests: the same seed gives the same cases on every run.
// ---------------------------------------------------------------------------------------------

/// A byte mutator in the manner of a dumb fuzzer (bit flips, random and boundary bytes, deleted,
/// repeated and inserted runs, truncation), driven by a seeded xorshift64* generator.
pub struct Mutator(u64);

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Mutator(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// 0..n (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// `input` with one to four mutations, each at a position in `within` (clamped to the input).
    pub fn mutate_within(&mut self, input: &[u8], within: std::ops::Range<usize>) -> Vec<u8> {
        const BOUNDARY: [u8; 12] = [
            0, 0xFF, 0x7F, 0x80, b'"', b'[', b']', b'{', b'}', b'-', b'9', b'.',
        ];
        let mut out = input.to_vec();
        for _ in 0..1 + self.below(4) {
            let end = within.end.min(out.len());
            let start = within.start.min(end);
            let at = start + self.below(end - start);
            match self.below(7) {
                0 if at < out.len() => out[at] ^= 1 << self.below(8),
                1 if at < out.len() => out[at] = self.next_u64() as u8,
                2 if at < out.len() => out[at] = BOUNDARY[self.below(BOUNDARY.len())],
                3 => {
                    let len = self.below(16).min(out.len() - at);
                    out.drain(at..at + len);
                }
                4 => {
                    let len = self.below(16).min(out.len() - at);
                    let run = out[at..at + len].to_vec();
                    out.splice(at..at, run);
                }
                5 => {
                    let run: Vec<u8> = (0..1 + self.below(8))
                        .map(|_| self.next_u64() as u8)
                        .collect();
                    out.splice(at..at, run);
                }
                _ => out.truncate(at),
            }
        }
        out
    }

    /// `input` with one to four mutations anywhere.
    pub fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        self.mutate_within(input, 0..input.len())
    }
}
