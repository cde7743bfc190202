//! Model code under a deadline.
//!
//! A model file can make a load or an inference call run forever (an ONNX
//! `Loop` without end, a TorchScript `while`). Model code therefore runs on
//! a thread of its own, and its caller waits at most the deadline. When the
//! deadline passes the caller goes on (the load is refused, the rows become
//! dead letters, the model is marked unhealthy) and the thread is
//! abandoned: what runs there is told to stop ([`Cancel`]: ONNX Runtime
//! runs are terminated), and anything that cannot be stopped (libtorch has
//! no way to interrupt a TorchScript loop) keeps that thread busy until it
//! returns or the process exits. [`abandoned`] counts such threads, so the
//! process can exit without waiting for them or running C++ destructors
//! under them ([`exit`]).

use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Threads abandoned at a deadline that are still running model code.
static ABANDONED: AtomicUsize = AtomicUsize::new(0);

/// Stack of a thread that runs model code: libtorch's TorchScript parser and
/// compiler recurse over the model's code (bounded by the inspector, see
/// `model/torch/inspect.cpp`), ONNX Runtime over nested graphs. Reserved
/// address space, touched only as far as used.
pub const MODEL_THREAD_STACK: usize = 256 << 20;

/// Threads abandoned at a deadline that are still running model code.
pub fn abandoned() -> usize {
    ABANDONED.load(Ordering::Relaxed)
}

/// The deadline passed (or the job panicked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Overrun {
    #[error("did not finish within its deadline of {} ms", .0.as_millis())]
    TimedOut(Duration),
    #[error("panicked: {0}")]
    Panicked(String),
}

/// Stops the model code of one job, as far as it can be stopped.
#[derive(Default)]
pub struct Cancel {
    state: Mutex<CancelState>,
}

#[derive(Default)]
struct CancelState {
    cancelled: bool,
    finished: bool,
    counted: bool,
    hooks: Vec<Box<dyn Fn() + Send>>,
}

impl Cancel {
    /// The deadline passed: runs the stop hooks; while the job still runs
    /// its thread counts as abandoned.
    pub fn cancel(&self) {
        let hooks = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.cancelled {
                return;
            }
            s.cancelled = true;
            if !s.finished {
                s.counted = true;
                ABANDONED.fetch_add(1, Ordering::Relaxed);
            }
            std::mem::take(&mut s.hooks)
        };
        for h in hooks {
            h();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.state.lock().map(|s| s.cancelled).unwrap_or(true)
    }

    fn finish(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.finished = true;
        s.hooks.clear();
        if std::mem::take(&mut s.counted) {
            ABANDONED.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

thread_local! {
    /// The job running on this thread, if it runs under a deadline.
    static CURRENT: RefCell<Option<Arc<Cancel>>> = const { RefCell::new(None) };
}

/// Registers `hook` to run when the current job's deadline passes (runs it
/// at once if it already has). Returns whether the job is still live; no-op
/// (and `true`) outside a job. Model code that can be interrupted (an ONNX
/// Runtime run) registers its interruption here.
pub fn on_cancel(hook: impl Fn() + Send + 'static) -> bool {
    CURRENT.with(|c| match &*c.borrow() {
        None => true,
        Some(cancel) => {
            let mut s = cancel.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.cancelled {
                drop(s);
                hook();
                false
            } else {
                s.hooks.push(Box::new(hook));
                true
            }
        }
    })
}

/// Runs `f` as the job of `cancel` on this thread.
fn as_job<T>(cancel: Arc<Cancel>, f: impl FnOnce() -> T) -> Result<T, Overrun> {
    CURRENT.with(|c| *c.borrow_mut() = Some(cancel.clone()));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CURRENT.with(|c| *c.borrow_mut() = None);
    cancel.finish();
    r.map_err(|p| Overrun::Panicked(panic_text(&p)))
}

/// A panic's message (model code's: untrusted, escaped).
fn panic_text(p: &Box<dyn Any + Send>) -> String {
    let text = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    crate::text::escape(&text).into_owned()
}

/// Runs `f` on a new thread named `name`, waiting at most `timeout`.
pub fn run<T: Send + 'static>(
    name: &str,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Overrun> {
    let cancel = Arc::new(Cancel::default());
    let (tx, rx) = sync_channel(1);
    let job = cancel.clone();
    std::thread::Builder::new()
        .name(name.to_string())
        .stack_size(MODEL_THREAD_STACK)
        .spawn(move || {
            let _ = tx.send(as_job(job, f));
        })
        .map_err(|e| Overrun::Panicked(format!("cannot start a thread: {e}")))?;
    wait(rx, timeout, &cancel)
}

/// Starts `f` as the job of `cancel` on a new thread named `name`, without
/// waiting: the caller keeps `cancel` and calls [`Cancel::cancel`] when its
/// deadline passes.
pub fn spawn(
    name: &str,
    cancel: Arc<Cancel>,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .stack_size(MODEL_THREAD_STACK)
        .spawn(move || {
            let _ = as_job(cancel, f);
        })
        .map(|_| ())
}

fn wait<T>(
    rx: std::sync::mpsc::Receiver<Result<T, Overrun>>,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<T, Overrun> {
    match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(RecvTimeoutError::Timeout) => {
            cancel.cancel();
            Err(Overrun::TimedOut(timeout))
        }
        Err(RecvTimeoutError::Disconnected) => Err(Overrun::Panicked("the thread ended".into())),
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread that runs jobs one at a time under a deadline each; a job that
/// overruns is abandoned with its thread, and a new thread takes the next.
pub struct Executor {
    name: String,
    tx: Sender<Job>,
}

impl Executor {
    pub fn new(name: &str) -> std::io::Result<Executor> {
        Ok(Executor {
            name: name.to_string(),
            tx: Self::spawn(name)?,
        })
    }

    fn spawn(name: &str) -> std::io::Result<Sender<Job>> {
        let (tx, rx) = channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_string())
            .stack_size(MODEL_THREAD_STACK)
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(tx)
    }

    /// Runs `f` on the executor's thread, waiting at most `timeout`.
    pub fn run<T: Send + 'static>(
        &mut self,
        timeout: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Overrun> {
        let cancel = Arc::new(Cancel::default());
        let (rtx, rrx) = sync_channel(1);
        let c = cancel.clone();
        let job: Job = Box::new(move || {
            let _ = rtx.send(as_job(c, f));
        });
        if let Err(e) = self.tx.send(job) {
            // the thread is gone (it cannot be: jobs catch panics); start anew
            self.tx = Self::spawn(&self.name)
                .map_err(|err| Overrun::Panicked(format!("cannot start a thread: {err}")))?;
            self.tx
                .send(e.0)
                .map_err(|_| Overrun::Panicked("the executor thread ended".into()))?;
        }
        let r = wait(rrx, timeout, &cancel);
        if matches!(r, Err(Overrun::TimedOut(_))) {
            // the old thread finishes (or not) on its own; its channel closes
            match Self::spawn(&self.name) {
                Ok(tx) => self.tx = tx,
                Err(e) => tracing::error!(error = %e, "cannot start a new inference thread"),
            }
        }
        r
    }
}

/// Counts `n` threads that are still running model code and will not be
/// waited for (the worker's inference threads at the drain deadline), so
/// [`exit`] does not run destructors under them.
pub fn abandon(n: usize) {
    ABANDONED.fetch_add(n, Ordering::Relaxed);
}

/// Exits the process with `code`. When model code is still running on an
/// abandoned thread, exits without running C++ static destructors (which
/// could wait on, or tear down libraries under, that thread).
pub fn exit(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    if abandoned() > 0 {
        // SAFETY: ends the process; nothing after it runs
        unsafe { libc::_exit(code) }
    }
    std::process::exit(code)
}

/// Exits the process at once with `code`: nothing else runs (no drain, no
/// destructors). For a second shutdown signal.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stderr().flush();
    // SAFETY: ends the process; nothing after it runs
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    #[test]
    fn a_job_within_its_deadline_returns_its_value() {
        assert_eq!(run("t", Duration::from_secs(5), || 7), Ok(7));
        let mut e = Executor::new("e").unwrap();
        for i in 0..100 {
            assert_eq!(e.run(Duration::from_secs(5), move || i * 2), Ok(i * 2));
        }
    }

    #[test]
    fn an_overrun_is_abandoned_cancelled_and_the_next_job_runs_on_a_new_thread() {
        let mut e = Executor::new("e").unwrap();
        let stopped = Arc::new(AtomicBool::new(false));
        let s = stopped.clone();
        let t = Instant::now();
        let r = e.run(Duration::from_millis(100), move || {
            // a job that stops only when told to (like an ONNX run)
            let flag = Arc::new(AtomicBool::new(false));
            let f = flag.clone();
            on_cancel(move || f.store(true, Ordering::Relaxed));
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
            }
            s.store(true, Ordering::Relaxed);
        });
        assert_eq!(r, Err(Overrun::TimedOut(Duration::from_millis(100))));
        assert!(t.elapsed() < Duration::from_secs(2));
        // the next job does not wait for the abandoned one
        assert_eq!(e.run(Duration::from_secs(5), || 1), Ok(1));
        let t = Instant::now();
        while !stopped.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(stopped.load(Ordering::Relaxed), "the cancel hook ran");
    }

    #[test]
    fn a_panic_is_an_error_not_a_dead_executor() {
        let mut e = Executor::new("e").unwrap();
        let r: Result<(), _> = e.run(Duration::from_secs(5), || panic!("boom"));
        assert_eq!(r, Err(Overrun::Panicked("boom".into())));
        assert_eq!(e.run(Duration::from_secs(5), || 2), Ok(2));
    }
}
