//! Running independent decoder calls on several threads. tract plans are shared read-only and
//! each call builds its own state, so one plan serves every thread; each thread runs its calls'
//! operators single-threaded.

use crate::error::{Error, Result};

/// The number of threads to use by default: the CPUs available to this process.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `f` on every item on up to `threads` threads and returns the results in item order; the
/// first error wins.
pub fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(&f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        // Each thread runs its operators single-threaded: independent calls side by side use
        // the cores better than every call splitting each operator over a shared pool.
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                scope.spawn(|| {
                    crate::engine::with_own_compute_pool(1, || {
                        part.iter().map(&f).collect::<Result<Vec<R>>>()
                    })
                })
            })
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for handle in handles {
            let part = handle
                .join()
                .map_err(|_| Error::Inference("a decoding thread panicked".into()))??;
            out.extend(part);
        }
        Ok(out)
    })
}

/// Prompts decoded per batch by the grid and box tasks (`edges`, `instances`; split over the
/// threads with [`parallel_parts`]): bounds the decoder outputs and masks held at once (1 MB of
/// low-resolution logits a prompt), as Meta's `points_per_batch` does.
pub const PROMPTS_PER_BATCH: usize = 64;

/// Splits `items` into one contiguous part per thread (up to `threads`), runs `f` on each part
/// (a part's prompts decoded together) and returns the parts' results concatenated in item order.
pub fn parallel_parts<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&[T]) -> Result<Vec<R>> + Sync,
) -> Result<Vec<R>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&[T]> = items.chunks(items.len().div_ceil(threads.max(1))).collect();
    Ok(parallel_map(&parts, threads, |part| f(part))?
        .into_iter()
        .flatten()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_reports_errors() {
        let items: Vec<u32> = (0..103).collect();
        for threads in [1, 2, 7, 500] {
            let out = parallel_map(&items, threads, |&i| Ok(i * 2)).unwrap();
            assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        }
        let err = parallel_map(&items, 3, |&i| {
            if i == 50 {
                Err(Error::Prompt("fifty".into()))
            } else {
                Ok(i)
            }
        });
        assert!(err.unwrap_err().to_string().contains("fifty"));
        assert!(parallel_map(&Vec::<u32>::new(), 4, |&i| Ok(i))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn parts_keep_order() {
        let items: Vec<u32> = (0..103).collect();
        for threads in [1, 2, 7, 500] {
            let out = parallel_parts(&items, threads, |part| {
                Ok(part.iter().map(|i| i * 2).collect())
            })
            .unwrap();
            assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        }
        assert!(parallel_parts(&Vec::<u32>::new(), 4, |_| Ok(vec![1]))
            .unwrap()
            .is_empty());
    }
}
