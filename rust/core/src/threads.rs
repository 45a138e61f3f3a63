//! The thread pool the core computes on.
//!
//! The core owns its rayon pool instead of using rayon's global one for two reasons: a `num_threads` setting must
//! be honoured after the first call too (rayon's global pool is fixed once built), and a pool inherited across
//! `fork` has no threads behind it — using it in the child deadlocks. The pool is therefore keyed by process id and
//! rebuilt lazily when either the pid or the requested size changes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use faer::Par;

use crate::error::{Error, Result};

/// The largest thread count [`set_num_threads`] accepts. A fixed bound rather than a multiple of this machine's
/// cores, so that a setting valid on one machine is valid on all; far above any core count the core scales to,
/// and low enough that a typo (`10000`) or an unsigned wrap-around is refused before it tries to spawn threads.
pub const MAX_THREADS: usize = 1024;

/// How often the calling thread runs an interrupt check while the pool works.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

struct PoolState {
    pid: u32,
    threads: usize,
    pool: Arc<rayon::ThreadPool>,
}

static POOL: OnceLock<Mutex<Option<PoolState>>> = OnceLock::new();
static REQUESTED: Mutex<usize> = Mutex::new(0);

/// Sets the number of threads the core uses; 0 means one per available core.
///
/// # Errors
/// [`Error::Value`] above [`MAX_THREADS`]; the setting is then unchanged.
pub fn set_num_threads(n: usize) -> Result<()> {
    if n > MAX_THREADS {
        return Err(Error::Value(format!(
            "num_threads {n} is above the maximum of {MAX_THREADS} (0 means one per available core)"
        )));
    }
    *REQUESTED.lock().unwrap_or_else(|e| e.into_inner()) = n;
    Ok(())
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

/// The stop flag a long computation polls between its steps (power iterations, products, batches).
#[derive(Debug, Default)]
pub struct Stop {
    flag: AtomicBool,
}

impl Stop {
    /// [`Error::Interrupted`] once the caller's interrupt check has asked to stop.
    pub fn check(&self) -> Result<()> {
        if self.flag.load(Ordering::Relaxed) {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// [`run`] for work that can be stopped: `interrupt` is called on the calling thread at most every 100 ms while
/// the work runs, and once it returns `true` the work's next [`Stop::check`] fails with [`Error::Interrupted`].
///
/// The check runs on the caller's thread, not the pool's, because a host language may only look at its signals
/// there (Python handles them only on the main thread). Work shorter than one interval never calls it, so it may
/// be expensive. A panic in the work is re-raised here.
pub fn run_interruptible<R: Send>(
    interrupt: Option<&dyn Fn() -> bool>,
    f: impl FnOnce(Par, &Stop) -> Result<R> + Send,
) -> Result<R> {
    let stop = Stop::default();
    let pool = pool();
    let threads = pool.current_num_threads();
    let par = if threads <= 1 { Par::Seq } else { Par::rayon(threads) };
    // Inside the pool already (a single-thread fallback pool runs on the caller) the caller cannot wait and poll.
    let Some(interrupt) = interrupt.filter(|_| pool.current_thread_index().is_none()) else {
        return pool.install(|| f(par, &stop));
    };
    let (done, result) = mpsc::sync_channel(1);
    let stop = &stop;
    pool.in_place_scope(|scope| {
        scope.spawn(move |_| {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(par, stop)));
            let _ = done.send(outcome);
        });
        loop {
            match result.recv_timeout(POLL_INTERVAL) {
                Ok(Ok(r)) => return r,
                Ok(Err(panic)) => std::panic::resume_unwind(panic),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if interrupt() {
                        stop.flag.store(true, Ordering::Relaxed);
                    }
                }
                // The job always sends before its sender drops, even when it panics.
                Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("the pool dropped a job"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_above_the_cap_are_refused() {
        let before = num_threads();
        let e = set_num_threads(MAX_THREADS + 1).unwrap_err();
        assert!(matches!(e, Error::Value(ref m) if m.contains("1025") && m.contains("1024")), "{e}");
        let e = set_num_threads(usize::MAX).unwrap_err();
        assert!(matches!(e, Error::Value(_)), "{e}");
        assert_eq!(num_threads(), before);
    }

    #[test]
    fn an_interrupt_stops_the_work_at_its_next_check() {
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let interrupt = || calls.fetch_add(1, Ordering::Relaxed) >= 1;
        let started = std::time::Instant::now();
        let r: Result<()> = run_interruptible(Some(&interrupt), |_, stop| loop {
            stop.check()?;
            std::thread::sleep(Duration::from_millis(5));
        });
        assert!(matches!(r, Err(Error::Interrupted)));
        assert!(started.elapsed() < Duration::from_secs(2));
        // Short work finishes before the first poll and never calls the check.
        let never = || -> bool { panic!("polled") };
        assert_eq!(run_interruptible(Some(&never), |_, stop| stop.check().map(|()| 7)).unwrap(), 7);
        assert_eq!(run_interruptible(None, |_, _| Ok(8)).unwrap(), 8);
    }

    #[test]
    fn a_panic_in_interruptible_work_reaches_the_caller() {
        let interrupt = || false;
        let caught = std::panic::catch_unwind(|| {
            let _ = run_interruptible::<()>(Some(&interrupt), |_, _| panic!("boom"));
        });
        assert!(caught.is_err());
    }
}
