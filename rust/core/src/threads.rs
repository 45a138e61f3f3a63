//! The thread pool the core computes on.
//!
//! The core owns its rayon pool instead of using rayon's global one for two reasons: a `num_threads` setting must
//! be honoured after the first call too (rayon's global pool is fixed once built), and a pool inherited across
//! `fork` has no threads behind it — using it in the child deadlocks. The pool is therefore keyed by process id and
//! rebuilt lazily when either the pid or the requested size changes.

use std::sync::{Arc, Mutex, OnceLock};

use faer::Par;

struct PoolState {
    pid: u32,
    threads: usize,
    pool: Arc<rayon::ThreadPool>,
}

static POOL: OnceLock<Mutex<Option<PoolState>>> = OnceLock::new();
static REQUESTED: Mutex<usize> = Mutex::new(0);

/// Sets the number of threads the core uses; 0 means one per available core.
pub fn set_num_threads(n: usize) {
    *REQUESTED.lock().unwrap_or_else(|e| e.into_inner()) = n;
}

/// The number of threads the next core call will use.
pub fn num_threads() -> usize {
    let n = *REQUESTED.lock().unwrap_or_else(|e| e.into_inner());
    if n == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    } else {
        n
    }
}

fn pool() -> Arc<rayon::ThreadPool> {
    let threads = num_threads();
    let pid = std::process::id();
    let mut guard = POOL.get_or_init(|| Mutex::new(None)).lock().unwrap_or_else(|e| e.into_inner());
    match guard.as_ref() {
        Some(state) if state.pid == pid && state.threads == threads => state.pool.clone(),
        _ => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("lowrank-core-{i}"))
                .build()
                .map(Arc::new)
                .unwrap_or_else(|_| {
                    // A pool that cannot spawn threads (exhausted limits) still runs the work on the caller.
                    Arc::new(
                        rayon::ThreadPoolBuilder::new()
                            .num_threads(1)
                            .use_current_thread()
                            .build()
                            .expect("single-thread pool"),
                    )
                });
            // An old pool from before a fork has no live threads; dropping it would try to join them, so leak it.
            if let Some(old) = guard.take() {
                if old.pid != pid {
                    std::mem::forget(old);
                }
            }
            *guard = Some(PoolState { pid, threads, pool: pool.clone() });
            pool
        }
    }
}

/// Runs `f` inside the core's pool and hands it the matching faer parallelism.
pub fn run<R: Send>(f: impl FnOnce(Par) -> R + Send) -> R {
    let pool = pool();
    let threads = pool.current_num_threads();
    pool.install(|| f(if threads <= 1 { Par::Seq } else { Par::rayon(threads) }))
}
