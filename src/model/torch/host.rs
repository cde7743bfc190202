//! TorchScript models run in a process of their own.
//!
//! libtorch was not written for hostile input: its TorchScript compiler and
//! CPU kernels trust their arguments (an integer division of the smallest
//! integer by -1 raises SIGFPE, a hostile `batch_sizes` corrupts the heap,
//! a cast to the wrong class reads past an object). The operator check
//! ([`super::inspect`]) keeps files and code execution out; this keeps
//! whatever libtorch does wrong out of the worker. Each torch model gets a
//! child process (`ml-worker torch-host`) that inspects, loads and runs it
//! and talks to the worker over its stdin and stdout:
//!
//! - a child that crashes fails the call it was making (the rows become dead
//!   letters, the load is refused) and the worker carries on; the next call
//!   starts a new child (after 3 crashes in a row the model is refused for
//!   good);
//! - a deadline kills the child (SIGKILL): the call really stops, no thread
//!   is left spinning;
//! - the child's stderr (libtorch's warnings) reaches the worker's log one
//!   escaped line at a time; it dies with the worker (`PR_SET_PDEATHSIG`)
//!   and never writes a core file.
//!
//! Requests and replies are frames on the pipes: a `u32` little-endian
//! length, then a tag byte and the body. A batch's rows and its predictions
//! travel through memory the two share ([`super::shm`]), not the pipe: the
//! worker copies the rows in once, the model reads them in place, and the
//! cost of the process boundary is a few microseconds a call plus that copy.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::shm::{self, Shm};
use super::{TorchDevice, TorchOutput};
use crate::model::{Batch, Model, ModelError, Output, Prediction, TaskType};

/// Largest frame either side reads (a batch of 100,000 rows of 500 features).
const MAX_FRAME: usize = 512 << 20;
/// Pipe capacity asked for (Linux's default ceiling for unprivileged
/// processes, `/proc/sys/fs/pipe-max-size`).
const PIPE_BYTES: libc::c_int = 1 << 20;
/// The most columns a torch model's output may have (its width, or its
/// number of classes).
const MAX_WIDTH: usize = 1 << 16;
/// The largest reply a host may send but predictions (an error, the loaded
/// model's description); a host that sends more is ended.
const MAX_REPLY: usize = 1 << 20;
/// The longest error message or model description taken from a host.
const MAX_TEXT: usize = 4096;
/// Lines of a host's stderr logged per second at most (after a burst of
/// as many), and the longest line logged; the rest is read and dropped, so
/// the host never blocks on a full pipe.
const STDERR_LINES_PER_S: u32 = 20;
const STDERR_LINE_BYTES: usize = 2000;
/// Crashes in a row after which a model is refused for good.
const MAX_CRASHES: u32 = 3;
/// The command line argument that makes the binary a torch host.
pub const HOST_COMMAND: &str = "torch-host";

/// The worker's pid, for the child to check that it is still there.
const PARENT_ENV: &str = "ML_WORKER_TORCH_PARENT";
/// The descriptor of the shared batch memory in the child.
const SHM_ENV: &str = "ML_WORKER_TORCH_SHM";

/// What the child needs to load a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoadRequest {
    name: String,
    path: PathBuf,
    n_features: usize,
    classification: bool,
    output: Option<String>,
    device: String,
    threads: usize,
}

/// What the child says about a loaded model.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Loaded {
    n_outputs: usize,
    n_classes: Option<usize>,
    detail: String,
}

/// Error kinds across the pipe.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum Kind {
    Format,
    Input,
    Unsupported,
    Runtime,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Failure {
    kind: Kind,
    message: String,
}

fn to_failure(e: &ModelError) -> Failure {
    let (kind, message) = match e {
        ModelError::Format { reason, .. } => (Kind::Format, reason.clone()),
        ModelError::Input(m) => (Kind::Input, m.clone()),
        ModelError::Unsupported(m) => (Kind::Unsupported, m.clone()),
        ModelError::Runtime(m) => (Kind::Runtime, m.clone()),
        ModelError::Io { source, .. } => (Kind::Runtime, source.to_string()),
    };
    Failure { kind, message }
}

fn from_failure(mut f: Failure, path: &std::path::Path) -> ModelError {
    f.message = crate::text::clip(&f.message, MAX_TEXT).into_owned();
    match f.kind {
        Kind::Format => ModelError::Format {
            path: path.to_path_buf(),
            format: "TorchScript",
            reason: f.message,
        },
        Kind::Input => ModelError::Input(f.message),
        Kind::Unsupported => ModelError::Unsupported(f.message),
        Kind::Runtime => ModelError::Runtime(f.message),
    }
}

fn write_frame(w: &mut impl Write, tag: u8, parts: &[&[u8]]) -> std::io::Result<()> {
    let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a frame of {len} bytes"),
        ));
    }
    // one write: the other side wakes once
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&(len as u32).to_le_bytes());
    frame.push(tag);
    for p in parts {
        frame.extend_from_slice(p);
    }
    w.write_all(&frame)?;
    w.flush()
}

/// How long the host polls for the next request, and the worker for a
/// reply, before sleeping in `read`: waking a sleeping process costs tens of
/// microseconds (about 65 µs a round trip on a virtual machine's idle CPU),
/// and a reply (a model's forward pass) or the next batch often comes sooner.
/// The worker waits longer: it is waiting for its own answer.
const HOST_SPIN: std::time::Duration = std::time::Duration::from_micros(100);
const WORKER_SPIN: std::time::Duration = std::time::Duration::from_millis(2);

/// Polls `fd` for up to `budget` until it has something to read, yielding
/// the CPU between polls (to the worker's other threads, if they want it).
fn spin_until_readable(fd: std::os::fd::RawFd, budget: std::time::Duration) {
    let start = std::time::Instant::now();
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    while start.elapsed() < budget {
        // SAFETY: one pollfd, zero timeout; sched_yield has no arguments
        unsafe {
            if libc::poll(&mut p, 1, 0) != 0 {
                return;
            }
            libc::sched_yield();
        }
    }
}

/// A frame's tag and body length, refused over `max` bytes.
fn read_head(r: &mut impl Read, max: usize) -> std::io::Result<(u8, usize)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let n = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    if n == 0 || n > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {n} bytes, at most {max} expected"),
        ));
    }
    Ok((head[4], n - 1))
}

fn read_frame(r: &mut impl Read, max: usize) -> std::io::Result<(u8, Vec<u8>)> {
    let (tag, n) = read_head(r, max)?;
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf)?;
    Ok((tag, buf))
}

// frames carry f64s as their in-memory bytes: little-endian machines only
const _: () = assert!(cfg!(target_endian = "little"));

/// The bytes of `v` (little-endian `f64`s), without a copy.
fn f64_bytes(v: &[f64]) -> &[u8] {
    // SAFETY: any f64 is 8 initialised bytes; u8 has no alignment needs
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn f64s(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// `u32` at `at`, if there.
fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

fn encode_output(o: &Output, out: &mut Vec<u8>) {
    out.extend_from_slice(&(o.width as u32).to_le_bytes());
    out.extend_from_slice(&(o.values.len() as u32).to_le_bytes());
    out.extend_from_slice(f64_bytes(&o.values));
}

fn decode_output(b: &[u8], at: &mut usize) -> Option<Output> {
    let width = u32_at(b, *at)?;
    let n = u32_at(b, *at + 4)?;
    let start = *at + 8;
    let end = start.checked_add(n.checked_mul(8)?)?;
    let values = f64s(b.get(start..end)?);
    *at = end;
    Some(Output { values, width })
}

/// The child: serves one model on stdin/stdout until stdin closes.
pub fn serve() -> ! {
    // SAFETY: plain libc calls on this process
    unsafe {
        // die with the worker; never write a core file of a hostile model
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // the worker may have died before that took effect
        let parent = std::env::var(PARENT_ENV)
            .ok()
            .and_then(|p| p.parse::<libc::pid_t>().ok());
        if parent.is_some_and(|p| p != libc::getppid()) {
            libc::_exit(1);
        }
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
    }
    // out of memory, the kernel kills this process before the worker
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    super::inspect::WARN_TO_STDERR.store(true, std::sync::atomic::Ordering::Relaxed);
    // libtorch's compiler recurses on deep code: the deadline's model
    // thread stack, as in the worker
    let served = std::thread::Builder::new()
        .name("torch-host".into())
        .stack_size(crate::deadline::MODEL_THREAD_STACK)
        .spawn(serve_loop)
        .map_err(|e| e.to_string())
        .and_then(|h| h.join().map_err(|_| "panicked".to_string()))
        .and_then(|r| r.map_err(|e| e.to_string()));
    let code = match served {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("torch host: {e}");
            1
        }
    };
    // SAFETY: ends the process without running libtorch's destructors
    unsafe { libc::_exit(code) }
}

fn serve_loop() -> std::io::Result<()> {
    use std::os::fd::FromRawFd;
    // frames go out on a private copy of stdout; fd 1 becomes stderr, so
    // nothing libtorch prints can corrupt a frame
    // SAFETY: plain descriptor calls; `frames` owns the new descriptor
    let mut output = unsafe {
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::io::BufWriter::new(std::fs::File::from_raw_fd(fd))
    };
    let mut input = std::io::BufReader::new(std::io::stdin().lock());
    let mut model: Option<super::TorchModel> = None;
    // SAFETY: the descriptor the worker passed for this purpose
    let mut shared = std::env::var(SHM_ENV)
        .ok()
        .and_then(|v| v.parse::<std::os::fd::RawFd>().ok())
        .filter(|fd| *fd > 2)
        .map(|fd| unsafe { Shm::inherit(fd) });
    loop {
        if input.buffer().is_empty() {
            spin_until_readable(0, HOST_SPIN);
        }
        let (tag, n) = match read_head(&mut input, MAX_FRAME) {
            Ok(h) => h,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let reply: Result<(u8, Vec<u8>), Failure> = match tag {
            b'L' => {
                let mut body = vec![0u8; n];
                input.read_exact(&mut body)?;
                load_in_child(&body).map(|(m, loaded)| {
                    model = Some(m);
                    (b'l', serde_json::to_vec(&loaded).unwrap_or_default())
                })
            }
            b'P' => {
                let mut body = vec![0u8; n];
                input.read_exact(&mut body)?;
                match (&model, shared.as_mut()) {
                    (Some(m), Some(shm)) => predict_in_child(m, shm, &body),
                    _ => Err(Failure {
                        kind: Kind::Runtime,
                        message: "no model loaded, or no shared memory".into(),
                    }),
                }
            }
            other => Err(Failure {
                kind: Kind::Runtime,
                message: format!("unknown request {other}"),
            }),
        };
        match reply {
            Ok((tag, b)) => write_frame(&mut output, tag, &[&b])?,
            Err(f) => write_frame(
                &mut output,
                b'e',
                &[&serde_json::to_vec(&f).unwrap_or_default()],
            )?,
        }
    }
}

fn load_in_child(body: &[u8]) -> Result<(super::TorchModel, Loaded), Failure> {
    let bad = |m: &str| Failure {
        kind: Kind::Runtime,
        message: m.to_string(),
    };
    let json_len = u32_at(body, 0).ok_or_else(|| bad("short load request"))?;
    let json = body
        .get(4..4 + json_len)
        .ok_or_else(|| bad("short load request"))?;
    let req: LoadRequest = serde_json::from_slice(json).map_err(|e| bad(&e.to_string()))?;
    let bytes = &body[4 + json_len..];
    let spec = super::TorchSpec {
        name: req.name.clone(),
        path: req.path.clone(),
        n_features: req.n_features,
        task_type: if req.classification {
            TaskType::Classification
        } else {
            TaskType::Regression
        },
        options: super::TorchOptions {
            output: match req.output.as_deref() {
                Some("logits") => Some(TorchOutput::Logits),
                Some(_) => Some(TorchOutput::Probabilities),
                None => None,
            },
            device: match req.device.as_str() {
                "auto" => TorchDevice::Auto,
                d => d
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse().ok())
                    .map_or(TorchDevice::Cpu, TorchDevice::Cuda),
            },
            intra_op_threads: req.threads,
        },
    };
    confine(spec.options.device, spec.options.intra_op_threads)?;
    let (m, shape) = super::TorchModel::load(&spec, bytes).map_err(|e| to_failure(&e))?;
    let loaded = Loaded {
        n_outputs: shape.n_outputs,
        n_classes: shape.n_classes,
        detail: shape.detail,
    };
    Ok((m, loaded))
}

/// Initialises libtorch (CPU detection, thread pool, the device) with a
/// small computation, then installs the seccomp filter ([`super::sandbox`]):
/// nothing of the model has been read yet.
fn confine(device: TorchDevice, threads: usize) -> Result<(), Failure> {
    let fail = |kind, message: String| Failure { kind, message };
    let device = super::resolve_device(device).map_err(|m| fail(Kind::Unsupported, m))?;
    super::set_threads(threads);
    let warm = || -> Result<f64, tch::TchError> {
        let _no_grad = tch::no_grad_guard();
        let x = tch::Tensor::f_ones([256, 256], (tch::Kind::Float, device))?;
        let y = x.f_matmul(&x)?.f_relu()?.f_softmax(1, tch::Kind::Float)?;
        y.f_sum(tch::Kind::Double)?
            .f_to_device(tch::Device::Cpu)?
            .f_double_value(&[])
    };
    warm().map_err(|e| fail(Kind::Runtime, format!("libtorch does not start: {e}")))?;
    let filters = super::sandbox::filters(std::process::id()).and_then(|f| f.apply());
    if let Err(e) = filters {
        eprintln!("the torch host runs without its system-call filter: {e}");
    }
    Ok(())
}

/// A predict request: the feature count and row count (`u32`s) and the
/// shared memory's length (`u64`); the rows are at its start, the reply
/// goes right after them ('q' and its length), or on the pipe ('p') if it
/// does not fit.
fn predict_in_child(
    m: &super::TorchModel,
    shm: &mut Shm,
    body: &[u8],
) -> Result<(u8, Vec<u8>), Failure> {
    let bad = |message: String| Failure {
        kind: Kind::Runtime,
        message,
    };
    let (Some(nf), Some(rows), Some(len)) = (
        u32_at(body, 0),
        u32_at(body, 4),
        body.get(8..16)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
    ) else {
        return Err(bad("malformed predict request".into()));
    };
    shm.resize(len as usize, false)
        .map_err(|e| bad(e.to_string()))?;
    let n = nf
        .checked_mul(rows)
        .ok_or_else(|| bad("malformed predict request".into()))?;
    let data = shm
        .f64s(n)
        .ok_or_else(|| bad("the rows are past the shared memory".into()))?;
    let batch = Batch::new(data, nf).map_err(|e| to_failure(&e))?;
    let p = m.predict(batch).map_err(|e| to_failure(&e))?;
    let mut out = Vec::with_capacity(16 + 8 * p.values.values.len());
    encode_output(&p.values, &mut out);
    match &p.probabilities {
        None => out.push(0),
        Some(pr) => {
            out.push(1);
            encode_output(pr, &mut out);
        }
    }
    if out.len() + 5 > MAX_FRAME {
        return Err(Failure {
            kind: Kind::Runtime,
            message: format!(
                "the model's output for {rows} rows is {} MiB, more than a reply holds ({} MiB)",
                out.len() >> 20,
                MAX_FRAME >> 20
            ),
        });
    }
    let at = n * 8;
    if at + out.len() <= shm.size() {
        shm.write(at, &out);
        return Ok((b'q', (out.len() as u64).to_le_bytes().to_vec()));
    }
    Ok((b'p', out))
}

/// The executable that serves as a torch host: `ML_WORKER_TORCH_HOST`,
/// else this executable if it is `ml-worker`, else an `ml-worker` beside it
/// or one folder up (tests and benchmarks run from `target/*/deps`).
fn host_executable() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ML_WORKER_TORCH_HOST").filter(|p| !p.is_empty()) {
        // absolute: the host starts in `/`
        return std::fs::canonicalize(&p)
            .map_err(|e| format!("ML_WORKER_TORCH_HOST={}: {e}", PathBuf::from(&p).display()));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    if exe.file_name().is_some_and(|n| n == "ml-worker") {
        return Ok(exe);
    }
    let dir = exe
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    for candidate in [dir.join("ml-worker"), dir.join("../ml-worker")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err("torch models run in an `ml-worker torch-host` process, and no ml-worker executable was found \
         beside this one; set ML_WORKER_TORCH_HOST to its path"
        .into())
}

/// Environment variables a torch host keeps: where libraries are, locale,
/// and the thread-pool and device settings libtorch reads.
fn host_env(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    const EXACT: &[&str] = &[
        "PATH",
        "LD_LIBRARY_PATH",
        "LANG",
        "TZ",
        "TMPDIR",
        "RUST_BACKTRACE",
    ];
    const PREFIX: &[&str] = &[
        "LC_",
        "OMP_",
        "MKL_",
        "KMP_",
        "OPENBLAS_",
        "CUDA_",
        "NVIDIA_",
        "TORCH_",
        "PYTORCH_",
    ];
    let secret = ["KEY", "PASSWORD", "SECRET", "TOKEN", "CREDENTIAL"]
        .iter()
        .any(|s| name.to_ascii_uppercase().contains(s));
    !secret && (EXACT.contains(&name) || PREFIX.iter().any(|p| name.starts_with(p)))
}

/// A running child and its pipes.
struct Host {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    shm: Shm,
    killer: Killer,
}

impl Host {
    /// What went wrong, in words, after reading from or writing to the
    /// child failed with `e`: a malformed reply (the child is then ended,
    /// as it is dropped), or how it ended (waiting up to 100 ms for it).
    fn failed(&mut self, e: &std::io::Error) -> String {
        if e.kind() == std::io::ErrorKind::InvalidData {
            return format!("sent a malformed reply ({e}) and was stopped");
        }
        died(&mut self.child, &self.killer)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.killer.reap(|| {
            let _ = self.child.kill();
            ((), self.child.wait().is_ok())
        });
    }
}

/// Kills a child from a deadline's thread, never after the child was
/// reaped (its pid could by then name another process).
#[derive(Clone)]
struct Killer {
    pid: u32,
    alive: Arc<Mutex<bool>>,
}

impl Killer {
    fn kill(&self) {
        let alive = self.alive.lock().unwrap_or_else(|p| p.into_inner());
        if *alive {
            // SAFETY: a signal to our own child, not yet reaped
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }

    /// Runs `f`, which may reap the child (it says whether it did), with
    /// kills held off.
    fn reap<T>(&self, f: impl FnOnce() -> (T, bool)) -> T {
        let mut alive = self.alive.lock().unwrap_or_else(|p| p.into_inner());
        let (r, reaped) = f();
        if reaped {
            *alive = false;
        }
        r
    }
}

/// The state of a model's host process.
struct State {
    host: Option<Host>,
    crashes: u32,
}

/// A TorchScript model served by a child process.
pub struct HostedTorch {
    name: String,
    path: PathBuf,
    n_outputs: usize,
    n_classes: Option<usize>,
    /// The load frame's body, kept to start a new child after a crash.
    load: Vec<u8>,
    state: Mutex<State>,
}

impl HostedTorch {
    /// Starts a host process and loads `bytes` (the verified file) in it.
    pub fn load(
        spec: &super::TorchSpec,
        bytes: &[u8],
    ) -> Result<crate::model::loader::Loaded, ModelError> {
        let req = LoadRequest {
            name: spec.name.clone(),
            path: spec.path.clone(),
            n_features: spec.n_features,
            classification: spec.task_type == TaskType::Classification,
            output: spec.options.output.map(|o| match o {
                TorchOutput::Logits => "logits".to_string(),
                TorchOutput::Probabilities => "probabilities".to_string(),
            }),
            device: spec.options.device.to_string(),
            threads: spec.options.intra_op_threads,
        };
        let json = serde_json::to_vec(&req).map_err(|e| ModelError::Runtime(e.to_string()))?;
        let mut load = Vec::with_capacity(4 + json.len() + bytes.len());
        load.extend_from_slice(&(json.len() as u32).to_le_bytes());
        load.extend_from_slice(&json);
        load.extend_from_slice(bytes);
        let mut model = HostedTorch {
            name: spec.name.clone(),
            path: spec.path.clone(),
            n_outputs: 1,
            n_classes: None,
            load,
            state: Mutex::new(State {
                host: None,
                crashes: 0,
            }),
        };
        let loaded = {
            let mut state = model.state.lock().unwrap_or_else(|p| p.into_inner());
            model.start(&mut state)?
        };
        model.n_outputs = loaded.n_outputs;
        model.n_classes = loaded.n_classes;
        Ok(crate::model::loader::Loaded {
            model: Arc::new(model),
            n_outputs: loaded.n_outputs,
            n_classes: loaded.n_classes,
            detail: format!("{} (in its own process)", loaded.detail),
            // a network's answer to NaN is NaN or worse: refused by default
            handles_missing: false,
        })
    }

    /// Starts a child and loads the model in it.
    fn start(&self, state: &mut State) -> Result<Loaded, ModelError> {
        let exe = host_executable().map_err(ModelError::Unsupported)?;
        let shm = Shm::create(shm::MIN_BYTES)
            .map_err(|e| ModelError::Runtime(format!("torch host: {e}")))?;
        let shm_fd = shm.raw_fd();
        let mut command = Command::new(&exe);
        // SAFETY: fcntl is async-signal-safe; the child keeps the memory's
        // descriptor across exec (only the child: the flag is per process)
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(shm_fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
            .arg(HOST_COMMAND)
            // none of the worker's secrets (audit key, SASL passwords) in
            // a process that runs model code
            .env_clear()
            .envs(std::env::vars_os().filter(|(k, _)| host_env(k)))
            .env(PARENT_ENV, std::process::id().to_string())
            .env(SHM_ENV, shm_fd.to_string())
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn(command).map_err(|e| {
            ModelError::Unsupported(format!(
                "cannot start the torch host {}: {e}",
                exe.display()
            ))
        })?;
        let pid = child.id();
        let killer = Killer {
            pid,
            alive: Arc::new(Mutex::new(true)),
        };
        // its stderr (libtorch's warnings): one escaped log line each
        if let Some(err) = child.stderr.take() {
            let name = self.name.clone();
            let _ = std::thread::Builder::new()
                .name("torch-host-log".into())
                .spawn(move || log_lines(err, &name, pid));
        }
        let (stdin, stdout) = (
            child.stdin.take().expect("piped"),
            child.stdout.take().expect("piped"),
        );
        // a model file of megabytes: in fewer turns than 64 KiB each
        for fd in [stdin.as_raw_fd(), stdout.as_raw_fd()] {
            // SAFETY: fcntl on a pipe this process holds; failure is harmless
            unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_BYTES) };
        }
        let mut host = Host {
            stdin,
            stdout,
            shm,
            child,
            killer: killer.clone(),
        };
        // a deadline kills the child: the load really stops
        crate::deadline::on_cancel(move || killer.kill());
        let reply = write_frame(&mut host.stdin, b'L', &[&self.load])
            .and_then(|_| read_frame(&mut host.stdout, MAX_REPLY));
        let loaded = match reply {
            Ok((b'l', b)) => {
                let mut loaded = serde_json::from_slice::<Loaded>(&b)
                    .map_err(|e| ModelError::Runtime(format!("torch host: {e}")))?;
                let too_wide = |n: usize| n == 0 || n > MAX_WIDTH;
                if too_wide(loaded.n_outputs) || loaded.n_classes.is_some_and(too_wide) {
                    return Err(ModelError::Unsupported(format!(
                        "the model has {} outputs{}; a torch model may have 1 to {MAX_WIDTH}",
                        loaded.n_outputs,
                        loaded
                            .n_classes
                            .map(|k| format!(" and {k} classes"))
                            .unwrap_or_default()
                    )));
                }
                loaded.detail = crate::text::clip(&loaded.detail, MAX_TEXT).into_owned();
                loaded
            }
            Ok((b'e', b)) => {
                let f: Failure = serde_json::from_slice(&b)
                    .map_err(|e| ModelError::Runtime(format!("torch host: {e}")))?;
                return Err(from_failure(f, &self.path));
            }
            Ok((t, _)) => {
                return Err(ModelError::Runtime(format!(
                    "torch host: unexpected reply {t}"
                )))
            }
            Err(e) => {
                return Err(ModelError::Format {
                    path: self.path.clone(),
                    format: "TorchScript",
                    reason: format!("the process loading it {}", host.failed(&e)),
                })
            }
        };
        state.host = Some(host);
        Ok(loaded)
    }

    fn predict_hosted(&self, batch: Batch<'_>) -> Result<Prediction, ModelError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.crashes >= MAX_CRASHES {
            return Err(ModelError::Runtime(format!(
                "the model's process crashed {MAX_CRASHES} times in a row; it is not started again"
            )));
        }
        if state.host.is_none() {
            self.start(&mut state)?;
        }
        let host = state.host.as_mut().expect("started");
        let killer = host.killer.clone();
        crate::deadline::on_cancel(move || killer.kill());
        // the rows into the shared memory, room for the reply after them
        let data = f64_bytes(batch.data());
        // both at most MAX_WIDTH (checked at load)
        let width = self.n_outputs + self.n_classes.unwrap_or(0);
        let need = batch
            .n_rows()
            .saturating_mul(width)
            .saturating_mul(8)
            .saturating_add(64)
            .saturating_add(data.len());
        if need > shm::MAX_BYTES {
            return Err(ModelError::Input(format!(
                "a batch of {} MiB with its predictions is more than a torch model's process takes at once ({} MiB)",
                need >> 20,
                shm::MAX_BYTES >> 20
            )));
        }
        if need > host.shm.size() {
            let size = need
                .next_power_of_two()
                .clamp(shm::MIN_BYTES, shm::MAX_BYTES);
            host.shm
                .resize(size, true)
                .map_err(|e| ModelError::Runtime(format!("torch host: {e}")))?;
        }
        host.shm.write(0, data);
        let mut body = Vec::with_capacity(16);
        body.extend_from_slice(&(batch.n_features() as u32).to_le_bytes());
        body.extend_from_slice(&(batch.n_rows() as u32).to_le_bytes());
        body.extend_from_slice(&(host.shm.size() as u64).to_le_bytes());
        let reply = write_frame(&mut host.stdin, b'P', &[&body]).and_then(|_| {
            spin_until_readable(host.stdout.as_raw_fd(), WORKER_SPIN);
            // the predictions, or an error message
            read_frame(&mut host.stdout, need.max(MAX_REPLY))
        });
        // a reply in the shared memory: copied out, then read like one from the pipe
        let reply = match reply {
            Ok((b'q', b)) => {
                let len = b
                    .get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                match len.and_then(|len| host.shm.read(data.len(), usize::try_from(len).ok()?)) {
                    Some(b) => Ok((b'p', b)),
                    None => {
                        return Err(ModelError::Runtime(
                            "torch host: a reply past the shared memory".into(),
                        ))
                    }
                }
            }
            other => other,
        };
        match reply {
            Ok((b'p', b)) => {
                state.crashes = 0;
                let mut at = 0;
                let values = decode_output(&b, &mut at);
                let probabilities = match b.get(at) {
                    Some(1) => {
                        at += 1;
                        Some(decode_output(&b, &mut at))
                    }
                    _ => None,
                };
                let rows = batch.n_rows();
                // the shape the model has, for as many rows as were sent
                let fits = |o: &Output, width: usize| {
                    o.width == width && Some(o.values.len()) == rows.checked_mul(width)
                };
                match (values, probabilities, self.n_classes) {
                    (Some(values), None, None) if fits(&values, self.n_outputs) => Ok(Prediction {
                        values,
                        probabilities: None,
                    }),
                    (Some(values), Some(Some(p)), Some(k))
                        if fits(&values, self.n_outputs) && fits(&p, k) =>
                    {
                        Ok(Prediction {
                            values,
                            probabilities: Some(p),
                        })
                    }
                    _ => Err(ModelError::Runtime(format!(
                        "torch host: a reply that is not {} output{} for each of {rows} rows",
                        self.n_outputs,
                        if self.n_outputs == 1 { "" } else { "s" }
                    ))),
                }
            }
            Ok((b'e', b)) => {
                state.crashes = 0;
                let f: Failure = serde_json::from_slice(&b)
                    .map_err(|e| ModelError::Runtime(format!("torch host: {e}")))?;
                Err(from_failure(f, &self.path))
            }
            Ok((t, _)) => Err(ModelError::Runtime(format!(
                "torch host: unexpected reply {t}"
            ))),
            Err(e) => {
                let mut host = state.host.take().expect("present");
                state.crashes += 1;
                let why = host.failed(&e);
                tracing::error!(model = %self.name, crashes = state.crashes, "torch model process {why}");
                Err(ModelError::Runtime(format!("the model's process {why}")))
            }
        }
    }
}

/// Logs what a host writes to its stderr, a line at a time: each line cut
/// to [`STDERR_LINE_BYTES`], at most [`STDERR_LINES_PER_S`] a second (the
/// number dropped is logged when lines may be logged again). Reads until
/// the host closes it, whatever it writes: the host never blocks on it and
/// the worker never holds more than one line.
fn log_lines(err: impl Read, name: &str, pid: u32) {
    let mut r = BufReader::with_capacity(64 << 10, err);
    let mut line: Vec<u8> = Vec::with_capacity(STDERR_LINE_BYTES);
    let mut cut = false;
    let mut tokens = STDERR_LINES_PER_S;
    let mut refill = std::time::Instant::now();
    let mut dropped = 0u64;
    let mut emit = |line: &[u8], cut: bool| {
        if refill.elapsed() >= std::time::Duration::from_secs(1) {
            refill = std::time::Instant::now();
            tokens = STDERR_LINES_PER_S;
            if dropped > 0 {
                tracing::warn!(model = %name, pid, "torch host: {dropped} more lines of its stderr not logged (at most {STDERR_LINES_PER_S} a second)");
                dropped = 0;
            }
        }
        if tokens == 0 {
            dropped += 1;
            return;
        }
        tokens -= 1;
        let text = String::from_utf8_lossy(line);
        let more = if cut { " (line cut)" } else { "" };
        tracing::warn!(model = %name, pid, "torch host: {text}{more}");
    };
    loop {
        let buf = match r.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(b) => b,
        };
        let (chunk, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = STDERR_LINE_BYTES - line.len();
        cut |= chunk.len() > room;
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = end.unwrap_or(buf.len());
        r.consume(used);
        if end.is_some() {
            emit(&line, cut);
            line.clear();
            cut = false;
        }
    }
    if !line.is_empty() {
        emit(&line, cut);
    }
}

/// Starts `command` from a thread that lives as long as the worker: the
/// child's `PR_SET_PDEATHSIG` fires when the *thread* that started it ends,
/// and loads and restarts happen on short-lived threads.
fn spawn(command: Command) -> std::io::Result<Child> {
    type Request = (Command, std::sync::mpsc::SyncSender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<Request>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let started = std::thread::Builder::new()
            .name("torch-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            });
        if let Err(e) = started {
            tracing::error!("cannot start the torch spawner thread: {e}");
        }
        Mutex::new(tx)
    });
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    let sent = spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((command, reply));
    if sent.is_err() {
        return Err(std::io::Error::other("the torch spawner thread is gone"));
    }
    answer
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the torch spawner thread is gone")))
}

/// How a child ended, in words (waiting up to 100 ms for it to end).
fn died(child: &mut Child, killer: &Killer) -> String {
    let status = (0..50).find_map(|_| {
        match killer.reap(|| {
            let r = child.try_wait();
            let reaped = matches!(r, Ok(Some(_)));
            (r, reaped)
        }) {
            Ok(Some(s)) => Some(s),
            _ => {
                std::thread::sleep(std::time::Duration::from_millis(2));
                None
            }
        }
    });
    use std::os::unix::process::ExitStatusExt;
    match status.and_then(|s| s.signal()) {
        Some(sig) => format!("died of signal {sig} ({})", signal_name(sig)),
        None => match status.and_then(|s| s.code()) {
            Some(c) => format!("exited with status {c}"),
            None => "stopped answering".into(),
        },
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV: invalid memory access",
        libc::SIGFPE => "SIGFPE: arithmetic fault",
        libc::SIGABRT => "SIGABRT: aborted",
        libc::SIGKILL => "SIGKILL: killed, e.g. at its deadline",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        _ => "a signal",
    }
}

impl Model for HostedTorch {
    fn predict(&self, batch: Batch<'_>) -> Result<Prediction, ModelError> {
        self.predict_hosted(batch)
    }
}
