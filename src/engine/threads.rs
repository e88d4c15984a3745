//! Work split over tract's thread pool (the one its matrix products run on), for samrt's
//! operators whose parts are not independent rows that `par_chunks_mut` would cut finely.

use tract_onnx::tract_core::tract_linalg::multithread::{current_tract_executor, Executor};

/// Threads of tract's executor for this call (1 outside a multithreaded executor).
pub fn threads() -> usize {
    match current_tract_executor() {
        Executor::MultiThread(pool) => pool.current_num_threads(),
        _ => 1,
    }
}

/// Cuts `out` (rows of `row_len`) into one run of whole rows per thread, as even as rows allow,
/// and calls `f(first_row, run)` for each, in parallel. One thread: `f(0, out)`.
pub fn split_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let bounds = run_bounds(out.len() / row_len.max(1));
    if bounds.len() <= 2 {
        return f(0, out);
    }
    let mut runs = Vec::with_capacity(bounds.len() - 1);
    let mut rest = out;
    for pair in bounds.windows(2) {
        let (run, tail) = rest.split_at_mut((pair[1] - pair[0]) * row_len);
        runs.push((pair[0], run));
        rest = tail;
    }
    match current_tract_executor() {
        Executor::MultiThread(pool) => {
            use rayon::prelude::*;
            pool.install(|| runs.into_par_iter().for_each(|(first, run)| f(first, run)))
        }
        _ => runs.into_iter().for_each(|(first, run)| f(first, run)),
    }
}

/// Where [`split_rows`] cuts `rows` rows: the first row of each run, then `rows`.
pub fn run_bounds(rows: usize) -> Vec<usize> {
    let tasks = threads().min(rows).max(1);
    (0..=tasks).map(|t| t * rows / tasks).collect()
}

/// Keeps the compute pool's threads busy-waiting for work while a plan runs, as onnxruntime's
/// threads spin between its operators.
///
/// Between two operators rayon's idle threads go to sleep within microseconds, and each
/// operator's split wakes them again. On a virtual machine a sleeping vCPU is handed to someone
/// else and takes its time to come back: one 2-thread encoder gained 1.6–1.7x over one thread
/// where two 1-thread encoders side by side each ran at full speed. While a `KeepAwake` lives,
/// every thread of the pool runs a task that picks up the pool's work as it comes
/// (`rayon::yield_now`) and otherwise yields the CPU; a task that finds nothing for
/// [`AWAKE_IDLE`] (a prompt holding the encoder, the end of a run) ends, and
/// [`KeepAwake::ensure`] restarts them. `SAMRT_KEEP_AWAKE=0` leaves rayon's own sleeping.
pub struct KeepAwake {
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
    state: std::sync::Arc<AwakeState>,
}

#[derive(Default)]
struct AwakeState {
    stop: std::sync::atomic::AtomicBool,
    running: std::sync::atomic::AtomicUsize,
}

/// How long a waiting thread looks for work before it sleeps as rayon's do (an encoder's
/// operators follow each other within microseconds; a prompt holds it for milliseconds).
pub const AWAKE_IDLE: std::time::Duration = std::time::Duration::from_micros(500);

impl KeepAwake {
    /// For the pool of the current executor (nothing to do single-threaded).
    pub fn new() -> Self {
        let pool = match current_tract_executor() {
            // (Not from inside the pool: this thread's own waiting task could never start,
            // and the drop would wait for it.)
            Executor::MultiThread(pool)
                if pool.current_num_threads() > 1
                    && pool.current_thread_index().is_none()
                    && std::env::var("SAMRT_KEEP_AWAKE").map_or(true, |v| v != "0") =>
            {
                Some(pool)
            }
            _ => None,
        };
        let keep = KeepAwake {
            pool,
            state: Default::default(),
        };
        keep.ensure();
        keep
    }

    /// Starts the waiting tasks again where they have ended.
    pub fn ensure(&self) {
        use std::sync::atomic::Ordering;
        let Some(pool) = &self.pool else {
            return;
        };
        if self.state.running.load(Ordering::Acquire) > 0 {
            return;
        }
        self.state
            .running
            .fetch_add(pool.current_num_threads(), Ordering::AcqRel);
        let state = self.state.clone();
        pool.spawn_broadcast(move |_| {
            let mut idle_since: Option<std::time::Instant> = None;
            while !state.stop.load(Ordering::Acquire) {
                match rayon::yield_now() {
                    Some(rayon::Yield::Executed) => idle_since = None,
                    _ => {
                        if idle_since
                            .get_or_insert_with(std::time::Instant::now)
                            .elapsed()
                            > AWAKE_IDLE
                        {
                            break;
                        }
                        std::thread::yield_now();
                    }
                }
            }
            state.running.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

impl Default for KeepAwake {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.state.stop.store(true, Ordering::Release);
        if self.pool.is_some() {
            while self.state.running.load(Ordering::Acquire) > 0 {
                std::thread::yield_now();
            }
        }
    }
}

/// Runs `task(scratch, unit)` for every unit of `0..units` over tract's pool, each of the
/// pool's tasks with a scratch from `init` (rayon's `for_each_init`). One thread, or one unit:
/// in order, with one scratch.
pub fn for_each_unit<S>(
    units: usize,
    init: impl Fn() -> S + Sync + Send,
    task: impl Fn(&mut S, usize) + Sync + Send,
) {
    match current_tract_executor() {
        Executor::MultiThread(pool) if pool.current_num_threads() > 1 && units > 1 => {
            use rayon::prelude::*;
            pool.install(|| (0..units).into_par_iter().for_each_init(init, task))
        }
        _ => {
            let mut scratch = init();
            (0..units).for_each(|u| task(&mut scratch, u))
        }
    }
}
