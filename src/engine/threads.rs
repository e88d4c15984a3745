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
