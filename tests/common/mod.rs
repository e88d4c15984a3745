//! Helpers shared by the integration tests: paths, the reference files, mask comparisons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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

/// Where Debian's mosquitto broker is, if installed. When `SAMRT_REQUIRE_SERVERS=1` (set by
/// `.ci/run`) a missing broker fails the test; otherwise the caller skips with a notice.
pub fn mosquitto_binary(test: &str) -> Option<PathBuf> {
    let found = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var("SAMRT_REQUIRE_SERVERS").as_deref() != Ok("1"),
            "{test}: mosquitto is not installed (apt-get install mosquitto mosquitto-clients)"
        );
        eprintln!("{test}: skipped: mosquitto not installed (apt-get install mosquitto mosquitto-clients)");
    }
    found
}

/// A free TCP port on loopback (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A mosquitto broker on loopback, with persistence in its own directory (so a durable
/// subscriber's queued messages survive a restart); killed on drop.
pub struct Broker {
    binary: PathBuf,
    dir: PathBuf,
    pub port: u16,
    child: Option<std::process::Child>,
}

impl Broker {
    pub fn start(binary: &Path, dir: &Path, port: u16) -> Self {
        std::fs::create_dir_all(dir).expect("broker dir");
        let config = dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n{}",
                dir.display(),
                // As root, mosquitto would switch to its own user and could not write here.
                if is_root() { "user root\n" } else { "" }
            ),
        )
        .expect("broker config");
        let mut broker = Broker {
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            port,
            child: None,
        };
        broker.restart();
        broker
    }

    /// Starts the broker (again) and waits until it accepts connections.
    pub fn restart(&mut self) {
        let log = std::fs::File::create(self.dir.join("mosquitto.log")).expect("broker log");
        let child = std::process::Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let port = self.port;
        wait_for(
            "mosquitto to listen",
            std::time::Duration::from_secs(10),
            || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
        );
    }

    /// Stops the broker the way systemd would (SIGTERM: it saves its sessions), and waits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(child.id(), 15);
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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

    pub fn received(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Sends a signal to a process.
pub fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, signal) };
}
