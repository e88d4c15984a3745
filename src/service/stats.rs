//! Counters and latency histories the service reports (log lines, systemd STATUS=, the control
//! socket's `{"stats": true}`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use heapless::HistoryBuf;
use serde_json::{json, Value};

/// Samples kept for latency percentiles (a fixed ring: the hot path never allocates).
pub const LATENCY_WINDOW: usize = 256;

/// The service's counters, shared by every thread.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    /// Frames delivered by the source.
    pub captured: AtomicU64,
    /// Frames the source (driver sequence numbers) reports lost.
    pub source_dropped: AtomicU64,
    /// Frames replaced by a newer one before the encoder took them (latest frame wins).
    pub skipped: AtomicU64,
    /// Frames that could not be decoded.
    pub corrupt: AtomicU64,
    /// Source failures (device gone, directory missing), each followed by a reconnect attempt.
    pub source_errors: AtomicU64,
    pub reconnects: AtomicU64,
    pub encoded: AtomicU64,
    pub encode_errors: AtomicU64,
    /// Mask events produced.
    pub events: AtomicU64,
    /// Prompts that failed (outside the image, decoder error).
    pub prompt_errors: AtomicU64,
    /// Prompts refused because the prompt queue was full.
    pub prompts_refused: AtomicU64,
    /// Malformed control-socket messages.
    pub control_errors: AtomicU64,
    /// Events a sink failed to take.
    pub sink_errors: AtomicU64,
    /// Jobs (an encode, a prompt, a frame's prompts) that panicked: caught at the job boundary,
    /// reported, and the service went on. Each is a bug.
    pub panics: AtomicU64,
    /// Times the encoder gave way to a prompt, and for how long in all (µs).
    pub encoder_holds: AtomicU64,
    encoder_held_us: AtomicU64,
    encode_ms: Mutex<HistoryBuf<f32, LATENCY_WINDOW>>,
    /// Press → mask: from a prompt's arrival to its event.
    prompt_ms: Mutex<HistoryBuf<f32, LATENCY_WINDOW>>,
    /// The decoder and postprocessing alone, per prompt: press → mask minus any wait.
    decode_ms: Mutex<HistoryBuf<f32, LATENCY_WINDOW>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            captured: AtomicU64::new(0),
            source_dropped: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            source_errors: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            encoded: AtomicU64::new(0),
            encode_errors: AtomicU64::new(0),
            events: AtomicU64::new(0),
            prompt_errors: AtomicU64::new(0),
            prompts_refused: AtomicU64::new(0),
            control_errors: AtomicU64::new(0),
            sink_errors: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            encoder_holds: AtomicU64::new(0),
            encoder_held_us: AtomicU64::new(0),
            encode_ms: Mutex::new(HistoryBuf::new()),
            prompt_ms: Mutex::new(HistoryBuf::new()),
            decode_ms: Mutex::new(HistoryBuf::new()),
        }
    }
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn record(history: &Mutex<HistoryBuf<f32, LATENCY_WINDOW>>, ms: f64) {
    history
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .write(ms as f32);
}

fn percentile(history: &Mutex<HistoryBuf<f32, LATENCY_WINDOW>>, q: f64) -> Option<f64> {
    let history = history.lock().unwrap_or_else(|e| e.into_inner());
    let mut values: Vec<f32> = history.oldest_ordered().copied().collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f32::total_cmp);
    let index = ((values.len() - 1) as f64 * q).round() as usize;
    Some((values[index] as f64 * 10.0).round() / 10.0)
}

/// The resident set size of this process in bytes (from /proc/self/statm).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page_size.max(4096) as u64)
}

/// Bytes the allocator has handed out and not had back (glibc's `mallinfo2`: in-use heap and
/// mmapped blocks), `None` elsewhere. Unlike the resident size it does not count memory the
/// allocator keeps for reuse (`engine::keep_freed_memory`), so a leak shows here, and only a
/// leak grows it frame after frame.
pub fn heap_bytes() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let info = unsafe { libc::mallinfo2() };
        Some((info.uordblks + info.hblkhd) as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

impl Stats {
    pub fn record_encode_ms(&self, ms: f64) {
        record(&self.encode_ms, ms);
    }

    pub fn record_prompt_ms(&self, ms: f64) {
        record(&self.prompt_ms, ms);
    }

    pub fn record_decode_ms(&self, ms: f64) {
        record(&self.decode_ms, ms);
    }

    /// The encoder held `held` before an operator while prompts were pending.
    pub fn record_encoder_hold(&self, held: Duration) {
        bump(&self.encoder_holds);
        self.encoder_held_us
            .fetch_add(held.as_micros() as u64, Ordering::Relaxed);
    }

    /// Every counter, latency percentiles, frame rates and memory, as one JSON object.
    pub fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let uptime = self.started.elapsed().as_secs_f64();
        let rate = |n: u64| {
            if uptime > 0.0 {
                (n as f64 / uptime * 100.0).round() / 100.0
            } else {
                0.0
            }
        };
        json!({
            "uptime_s": (uptime * 10.0).round() / 10.0,
            "frames_captured": get(&self.captured),
            "frames_dropped_by_source": get(&self.source_dropped),
            "frames_skipped": get(&self.skipped),
            "frames_corrupt": get(&self.corrupt),
            "frames_encoded": get(&self.encoded),
            "capture_fps": rate(get(&self.captured)),
            "encode_fps": rate(get(&self.encoded)),
            "source_errors": get(&self.source_errors),
            "reconnects": get(&self.reconnects),
            "encode_errors": get(&self.encode_errors),
            "events": get(&self.events),
            "prompt_errors": get(&self.prompt_errors),
            "prompts_refused": get(&self.prompts_refused),
            "control_errors": get(&self.control_errors),
            "sink_errors": get(&self.sink_errors),
            "panics": get(&self.panics),
            "encode_ms_p50": percentile(&self.encode_ms, 0.5),
            "prompt_ms_p50": percentile(&self.prompt_ms, 0.5),
            "prompt_ms_p95": percentile(&self.prompt_ms, 0.95),
            "decode_ms_p50": percentile(&self.decode_ms, 0.5),
            "encoder_holds": get(&self.encoder_holds),
            "encoder_held_ms": get(&self.encoder_held_us) / 1000,
            "rss_bytes": resident_bytes(),
            "heap_bytes": heap_bytes(),
        })
    }

    /// A one-line summary for the log and systemd's STATUS=.
    pub fn summary(&self) -> String {
        let s = self.snapshot();
        format!(
            "frames {} captured, {} encoded ({} fps), {} skipped, {} dropped, {} corrupt; encode {} ms; \
             {} events, press→mask p50 {} ms p95 {} ms (decoding {} ms; encoder gave way {} times, {} ms); \
             errors: source {}, prompts {}, sinks {}, panics {}; rss {} MB",
            s["frames_captured"], s["frames_encoded"], s["encode_fps"], s["frames_skipped"],
            s["frames_dropped_by_source"], s["frames_corrupt"], s["encode_ms_p50"], s["events"],
            s["prompt_ms_p50"], s["prompt_ms_p95"], s["decode_ms_p50"], s["encoder_holds"],
            s["encoder_held_ms"], s["source_errors"], s["prompt_errors"],
            s["sink_errors"], s["panics"],
            s["rss_bytes"].as_u64().map_or("?".to_string(), |b| (b >> 20).to_string()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_over_the_window() {
        let stats = Stats::default();
        assert_eq!(stats.snapshot()["prompt_ms_p50"], Value::Null);
        for ms in 1..=1000 {
            stats.record_prompt_ms(ms as f64);
        }
        // Only the last LATENCY_WINDOW samples count: 745..=1000.
        let s = stats.snapshot();
        assert_eq!(s["prompt_ms_p50"], json!(873.0));
        assert_eq!(s["prompt_ms_p95"], json!(987.0));
        assert!(s["rss_bytes"].as_u64().unwrap() > 1 << 20);
        // The heap in use itself is held by the service's soak test (tests/service.rs).
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(s["heap_bytes"].as_u64().unwrap() > 0);
        }
    }
}
