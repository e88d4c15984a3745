//! Work split over tract's thread pool (the one its matrix products run on), for samrt's
//! operators. Every split goes through [`for_each_unit`] (units with a scratch each), where the
//! calling thread works as one of the pool's threads: [`par_chunks_mut`] (tract-linalg's, on
//! samrt's dispatch) cuts rows, [`split_rows`] one run a thread. [`KeepAwake`]
//! keeps the pool's threads waiting for work between a plan's operators.

use tract_onnx::prelude::TractResult;
use tract_onnx::tract_core::tract_linalg::multithread::{
    current_threading_element_threshold, current_tract_executor, Executor,
};

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
    let runs = cut(
        out,
        bounds
            .windows(2)
            .map(|pair| (pair[0], (pair[1] - pair[0]) * row_len)),
    );
    for_each_unit(
        runs.len(),
        || (),
        |_, part| {
            let (first, run) = take(&runs[part]);
            f(first, run)
        },
    );
}

/// Runs of rows per thread in [`par_chunks_mut`]. tract's own cuts four; every run of a linear
/// layer streams the layer's whole packed weights again, and with two the linear layers gained
/// 1.9–2.0x from the second thread where four gave 1.8–1.85x (six: less).
pub const CHUNKS_PER_THREAD: usize = 2;

/// tract-linalg's `par_chunks_mut` on samrt's dispatch ([`for_each_unit`]): `out` (rows of
/// `row_len`) in up to [`CHUNKS_PER_THREAD`] runs of whole rows per thread, `f(first_row, run)`
/// for each; one run when `total_elems` (the work, in tract's element count) is under tract's
/// threshold.
pub fn par_chunks_mut<T: Send>(
    out: &mut [T],
    row_len: usize,
    total_elems: usize,
    f: impl Fn(usize, &mut [T]) -> TractResult<()> + Sync + Send,
) -> TractResult<()> {
    let n_rows = out.len() / row_len.max(1);
    let threads = threads();
    if threads <= 1 || n_rows < 2 || total_elems < current_threading_element_threshold() {
        return f(0, out);
    }
    let n_chunks = (CHUNKS_PER_THREAD * threads).min(n_rows);
    let chunk_rows = n_rows.div_ceil(n_chunks);
    let sizes = (0..n_rows.div_ceil(chunk_rows)).map(|c| {
        let first = c * chunk_rows;
        (first, (chunk_rows.min(n_rows - first)) * row_len)
    });
    let runs = cut(out, sizes);
    let failure = std::sync::Mutex::new(None);
    for_each_unit(
        runs.len(),
        || (),
        |_, part| {
            let (first, run) = take(&runs[part]);
            if let Err(e) = f(first, run) {
                failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(e);
            }
        },
    );
    match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A run of rows and its first row, taken by the one task that runs it.
type Run<'a, T> = std::sync::Mutex<Option<(usize, &'a mut [T])>>;

/// `out` cut into consecutive runs of the given (first row, length), each taken once.
fn cut<T>(mut out: &mut [T], sizes: impl Iterator<Item = (usize, usize)>) -> Vec<Run<'_, T>> {
    let mut runs = Vec::new();
    for (first, len) in sizes {
        let (run, tail) = std::mem::take(&mut out).split_at_mut(len);
        runs.push(std::sync::Mutex::new(Some((first, run))));
        out = tail;
    }
    runs
}

fn take<'a, T>(run: &Run<'a, T>) -> (usize, &'a mut [T]) {
    run.lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .expect("each part is taken once")
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
        // With the caller working as one of the threads ([`for_each_unit`]), one thread of
        // the pool fewer waits: a waiting thread more than the CPUs would take them from the
        // caller and the helpers.
        let waiting = if caller_works() {
            pool.current_num_threads() - 1
        } else {
            pool.current_num_threads()
        };
        self.state.running.fetch_add(waiting, Ordering::AcqRel);
        let wait = |state: std::sync::Arc<AwakeState>| {
            move || {
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
            }
        };
        if waiting == pool.current_num_threads() {
            let wait = wait(self.state.clone());
            pool.spawn_broadcast(move |_| wait());
        } else {
            for _ in 0..waiting {
                pool.spawn(wait(self.state.clone()));
            }
        }
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

/// Whether the calling thread works on an operator's parts itself ([`for_each_unit`]);
/// `SAMRT_CALLER_WORKS=0` hands them all to the pool (rayon's `install`) and waits asleep.
fn caller_works() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SAMRT_CALLER_WORKS").map_or(true, |v| v != "0"))
}

/// Runs `task(scratch, part)` for every part of `0..parts` on the current executor's pool
/// (an operator's units: blocks, bands, runs of rows),
/// the calling thread working as one of its threads, as onnxruntime's caller does: each
/// participant takes the next part not yet taken (so a thread that falls behind takes fewer),
/// with a scratch of its own from `init`. The caller starts `threads - 1` helpers on the pool,
/// works until no part is left, then waits for the helpers' last parts spinning (yielding the
/// CPU), not asleep: waking a sleeping thread on a virtual machine costs a good part of a
/// millisecond, once per operator. One thread, or one part: in order on this thread.
pub fn for_each_unit<S>(
    parts: usize,
    init: impl Fn() -> S + Sync + Send,
    task: impl Fn(&mut S, usize) + Sync + Send,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pool = match current_tract_executor() {
        Executor::MultiThread(pool) if pool.current_num_threads() > 1 && parts > 1 => pool,
        _ => {
            let mut scratch = init();
            return (0..parts).for_each(|p| task(&mut scratch, p));
        }
    };
    if !caller_works() || pool.current_thread_index().is_some() {
        use rayon::prelude::*;
        return pool.install(|| (0..parts).into_par_iter().for_each_init(init, task));
    }
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let helpers = (pool.current_num_threads() - 1).min(parts - 1);
    /// Counts a part done when its task returns or panics.
    struct Done<'a>(&'a AtomicUsize);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Release);
        }
    }
    let work = || {
        let mut scratch = None;
        loop {
            let part = next.fetch_add(1, Ordering::Relaxed);
            if part >= parts {
                break;
            }
            let _done = Done(&done);
            task(scratch.get_or_insert_with(&init), part);
        }
    };
    pool.in_place_scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(|_| work());
        }
        work();
        // The helpers' last parts; a helper that starts after this finds none left.
        while done.load(Ordering::Acquire) < parts {
            std::thread::yield_now();
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tract_onnx::prelude::TractError;

    use super::*;

    fn on_pool<R>(threads: usize, f: impl FnOnce() -> R) -> R {
        crate::engine::with_own_compute_pool(threads, f)
    }

    #[test]
    fn every_part_runs_once_with_a_scratch_per_participant() {
        for threads in [1, 2, 3] {
            let counts: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
            let scratches = AtomicUsize::new(0);
            on_pool(threads, || {
                for_each_unit(
                    counts.len(),
                    || scratches.fetch_add(1, Ordering::Relaxed),
                    |_, part| {
                        counts[part].fetch_add(1, Ordering::Relaxed);
                    },
                )
            });
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            let made = scratches.load(Ordering::Relaxed);
            assert!(
                (1..=threads).contains(&made),
                "{made} scratches at {threads} threads"
            );
        }
    }

    #[test]
    fn par_chunks_covers_every_row_once_and_reports_an_error() {
        on_pool(2, || {
            let mut out = vec![0usize; 7 * 1000];
            par_chunks_mut(&mut out, 7, usize::MAX, |first, rows| {
                for (r, row) in rows.chunks_mut(7).enumerate() {
                    row.fill(first + r + 1);
                }
                Ok(())
            })
            .unwrap();
            for (r, row) in out.chunks(7).enumerate() {
                assert!(row.iter().all(|&v| v == r + 1), "row {r}");
            }
            let failed = par_chunks_mut(&mut out, 7, usize::MAX, |first, _| {
                if first > 0 {
                    Err(TractError::msg("a part failed"))
                } else {
                    Ok(())
                }
            });
            assert!(failed.unwrap_err().to_string().contains("a part failed"));
        });
    }

    #[test]
    fn a_panicking_part_reaches_the_caller_and_the_pool_goes_on() {
        on_pool(2, || {
            let caught = std::panic::catch_unwind(|| {
                for_each_unit(64, || (), |_, part| assert!(part != 40, "part 40"));
            });
            assert!(caught.is_err());
            let ran = AtomicUsize::new(0);
            for_each_unit(
                64,
                || (),
                |_, _| {
                    ran.fetch_add(1, Ordering::Relaxed);
                },
            );
            assert_eq!(ran.load(Ordering::Relaxed), 64);
        });
    }
}
