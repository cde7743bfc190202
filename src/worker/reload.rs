//! Hot reload: a new registry made from `models.yaml` while the worker
//! serves the old one, then swapped in whole.
//!
//! [`Models`] holds the registry the worker serves. A reload
//! ([`Models::reload`]) reads `models.yaml` again and builds the next
//! registry beside it ([`RegistryBuilder::reopen`]: unchanged models are
//! taken over, added and changed ones are loaded, verified and warmed up);
//! any failure changes nothing. The consume thread takes the new registry
//! between two records ([`Models::take_next`]) and closes every open batch
//! first, so batches already cut finish on the models they were cut for,
//! and per partition no output of the old registry follows one of the new
//! (a partition's batches go to one inference shard, in order). The old
//! registry, and every model only it held, is freed when its last batch
//! is done.
//!
//! Triggers ([`Reloader`]): SIGHUP, a change to `models.yaml` or to a
//! registered model file (watched, debounced), and `POST /admin/reload`
//! on the metrics listener. One reload runs at a time.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::audit::{AuditEntry, AuditEvent, AuditStore};
use crate::registry::{Change, Registry, RegistryBuilder, ReloadError};
use crate::worker::metrics::Metrics;

/// What asked for a reload (logged and audited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    Watch,
    Http,
    /// A program (tests, the soak bench).
    Call,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::Watch => "file change",
            Trigger::Http => "POST /admin/reload",
            Trigger::Call => "call",
        }
    }
}

/// What a successful reload did.
#[derive(Debug, Clone)]
pub struct Reloaded {
    /// Model by model; empty: nothing changed and nothing was swapped.
    pub changes: Vec<Change>,
    /// The new registry is served (the consume thread took it).
    pub swapped: bool,
    pub took: Duration,
}

impl Reloaded {
    /// One line for logs and the HTTP answer.
    pub fn summary(&self) -> String {
        if self.changes.is_empty() {
            return "no change".into();
        }
        self.changes
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// How long a reload waits for the consume thread to take the new
/// registry before it answers (the swap still happens at the next turn).
const SWAP_WAIT: Duration = Duration::from_secs(10);

/// The registry the worker serves, and how to make the next one.
pub struct Models {
    current: Mutex<Arc<Registry>>,
    /// Made by a reload, not yet taken by the consume thread.
    next: Mutex<Option<Arc<Registry>>>,
    taken: Condvar,
    /// Where reloads read from; None: this registry is fixed.
    source: Option<(PathBuf, RegistryBuilder)>,
    /// One reload at a time.
    busy: Mutex<()>,
    metrics: Arc<Metrics>,
    /// Bumped by every swap.
    generation: AtomicU64,
    /// The worker is stopping: no reload starts, none waits for a swap.
    stopping: AtomicBool,
}

impl Models {
    /// A registry that is never reloaded.
    pub fn fixed(registry: Arc<Registry>, metrics: Arc<Metrics>) -> Arc<Models> {
        Self::make(registry, None, metrics)
    }

    /// `registry`, opened from `file` with `builder`, reloaded from there.
    pub fn reloadable(
        registry: Arc<Registry>,
        file: PathBuf,
        builder: RegistryBuilder,
        metrics: Arc<Metrics>,
    ) -> Arc<Models> {
        Self::make(registry, Some((file, builder)), metrics)
    }

    fn make(
        registry: Arc<Registry>,
        source: Option<(PathBuf, RegistryBuilder)>,
        metrics: Arc<Metrics>,
    ) -> Arc<Models> {
        publish_model_info(&metrics, &registry);
        Arc::new(Models {
            current: Mutex::new(registry),
            next: Mutex::new(None),
            taken: Condvar::new(),
            source,
            busy: Mutex::new(()),
            metrics,
            generation: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        })
    }

    /// The registry served now.
    pub fn current(&self) -> Arc<Registry> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The worker stops: reloads are refused from now on, and one waiting
    /// for its swap gives up (the consume thread takes none any more).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        self.taken.notify_all();
    }

    /// The registry served last (at exit).
    pub fn into_current(self) -> Arc<Registry> {
        self.current.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// How many swaps there were.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The registry file reloads read, if any.
    pub fn file(&self) -> Option<&Path> {
        self.source.as_ref().map(|(f, _)| f.as_path())
    }

    /// The next registry, once per reload (the consume thread's call; it
    /// swaps it in before reading on).
    pub(crate) fn take_next(&self) -> Option<Arc<Registry>> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let registry = next.take()?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = registry.clone();
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.taken.notify_all();
        Some(registry)
    }

    /// Whether a new registry waits to be taken (a cheap check per turn).
    pub(crate) fn has_next(&self) -> bool {
        self.next.lock().map(|n| n.is_some()).unwrap_or(false)
    }

    /// Reads `models.yaml` again and, if anything changed, hands the new
    /// registry to the consume thread (waiting up to 10 s for it to be
    /// taken). A failure changes nothing; it is logged, counted and
    /// audited.
    pub fn reload(&self, trigger: Trigger) -> Result<Reloaded, ReloadError> {
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ReloadError::Stopping);
        }
        let started = Instant::now();
        let Some((file, builder)) = &self.source else {
            return Err(ReloadError::Other(
                "this worker's registry was not opened from a file; it cannot be reloaded".into(),
            ));
        };
        tracing::info!(trigger = trigger.as_str(), file = %file.display(), "reloading the model registry");
        let previous = self.current();
        let result = builder.clone().reopen(file, &previous);
        let audit = builder.audit_store().cloned();
        let (registry, changes) = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(trigger = trigger.as_str(), error = %e,
                    "reload refused; the models loaded before keep serving");
                self.metrics
                    .add("ml_worker_reloads_total", &[("result", "failed")], 1);
                audit_failure(audit.as_deref(), file, trigger, &e);
                return Err(e);
            }
        };
        if changes.is_empty() {
            tracing::info!(trigger = trigger.as_str(), "reload: nothing changed");
            self.metrics
                .add("ml_worker_reloads_total", &[("result", "unchanged")], 1);
            return Ok(Reloaded {
                changes,
                swapped: false,
                took: started.elapsed(),
            });
        }
        let registry = Arc::new(registry);
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = Some(registry.clone());
        let swapped = self.wait_taken(SWAP_WAIT);
        for c in &changes {
            if c.old != c.new {
                // a new version starts healthy
                self.metrics.clear_unhealthy(&c.model);
            }
        }
        publish_model_info(&self.metrics, &registry);
        self.metrics
            .add("ml_worker_reloads_total", &[("result", "ok")], 1);
        audit_changes(audit.as_deref(), &registry, trigger, &changes);
        let done = Reloaded {
            changes,
            swapped,
            took: started.elapsed(),
        };
        tracing::info!(trigger = trigger.as_str(), took_ms = done.took.as_millis() as u64,
            swapped, changes = %done.summary(), "reload done");
        Ok(done)
    }

    fn wait_taken(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        while next.is_some() {
            let now = Instant::now();
            if now >= deadline || self.stopping.load(Ordering::SeqCst) {
                return false;
            }
            next = self
                .taken
                .wait_timeout(next, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Files a change to which should reload: `models.yaml` and every
    /// registered model file.
    fn watched_files(&self) -> BTreeSet<PathBuf> {
        let mut out = BTreeSet::new();
        let Some(file) = self.file() else {
            return out;
        };
        out.insert(absolute(file));
        let registry = self.current();
        for name in registry.names() {
            if let Some(spec) = registry.spec(name) {
                out.insert(absolute(&spec.path));
            }
        }
        out
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `ml_worker_model_info{model,version,sha256}` = 1 for every loaded model.
fn publish_model_info(metrics: &Metrics, registry: &Registry) {
    metrics.clear_gauge("ml_worker_model_info");
    for name in registry.names() {
        if let Some(m) = registry.loaded(name) {
            let i = m.info();
            metrics.set_gauge(
                "ml_worker_model_info",
                &[
                    ("model", name),
                    ("version", &i.version),
                    ("sha256", &i.sha256),
                ],
                1.0,
            );
        }
    }
}

/// One `reload` row per changed model: its old and new version.
fn audit_changes(
    audit: Option<&AuditStore>,
    registry: &Registry,
    trigger: Trigger,
    changes: &[Change],
) {
    let Some(audit) = audit else { return };
    for c in changes {
        let loaded = registry.loaded(&c.model);
        let spec = registry.spec(&c.model);
        let entry = AuditEntry {
            model: c.model.clone(),
            version: c.new.clone().unwrap_or_default(),
            kind: spec.map(|s| s.kind.clone()).unwrap_or_default(),
            path: spec
                .map(|s| absolute(&s.path).display().to_string())
                .unwrap_or_default(),
            sha256: loaded.map(|m| m.info().sha256.clone()).unwrap_or_default(),
            detail: format!(
                "{} (by {}): version {} -> {}",
                c.what,
                trigger.as_str(),
                c.old.as_deref().unwrap_or("-"),
                c.new.as_deref().unwrap_or("-")
            ),
        };
        if let Err(e) = audit.record(AuditEvent::Reload, &entry) {
            tracing::error!(model = %c.model, error = %e, "audit write failed");
        }
    }
}

/// A failed reload's row: the registry file and why.
fn audit_failure(audit: Option<&AuditStore>, file: &Path, trigger: Trigger, e: &ReloadError) {
    let Some(audit) = audit else { return };
    let entry = AuditEntry {
        path: absolute(file).display().to_string(),
        detail: format!(
            "reload refused (by {}); the models loaded before keep serving: {e}",
            trigger.as_str()
        ),
        ..AuditEntry::default()
    };
    if let Err(e) = audit.record(AuditEvent::Reload, &entry) {
        tracing::error!(error = %e, "audit write failed");
    }
}

/// A reload asked for over HTTP: the answer goes back on `reply`.
pub struct Request {
    pub trigger: Trigger,
    pub reply: Option<Sender<Result<Reloaded, String>>>,
}

/// How reloads are triggered (`reload:` in `worker.yaml`).
#[derive(Clone, PartialEq)]
pub struct ReloadConfig {
    /// Watch `models.yaml` and the model files.
    pub watch: bool,
    /// Quiet time after the last change before a watched reload.
    pub debounce: Duration,
    /// Bearer token `POST /admin/reload` requires (always when set; when
    /// unset, the endpoint answers on a loopback listener only).
    pub token: Option<String>,
}

impl std::fmt::Debug for ReloadConfig {
    /// The token is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadConfig")
            .field("watch", &self.watch)
            .field("debounce", &self.debounce)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: true,
            debounce: Duration::from_millis(500),
            token: None,
        }
    }
}

/// SIGHUPs received: the process's signal handler adds one, every
/// running [`Reloader`] reloads once for each change it sees.
pub static SIGHUPS: AtomicU64 = AtomicU64::new(0);

/// The reload thread: runs the reloads every trigger asks for, one at a
/// time (file changes debounced).
pub struct Reloader {
    requests: Sender<Request>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reloader {
    pub fn start(models: Arc<Models>, cfg: &ReloadConfig) -> std::io::Result<Reloader> {
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let watch = cfg.watch && models.file().is_some();
        // the watch and what the files look like are taken now, before the
        // worker reports it started: a change right after is not missed
        let changed = Arc::new(AtomicBool::new(false));
        let writing: Arc<Mutex<BTreeSet<PathBuf>>> = Arc::default();
        let watcher = if watch {
            Watch::start(&models, changed.clone(), writing.clone())
        } else {
            None
        };
        let seen = Fingerprint::of(&models.watched_files());
        let files = Watched {
            watcher,
            changed,
            writing,
            seen,
            signals: SIGHUPS.load(Ordering::Relaxed),
        };
        let (debounce, halt) = (cfg.debounce, stop.clone());
        let thread = std::thread::Builder::new()
            .name("reload".into())
            .spawn(move || reload_loop(models, rx, files, debounce, halt))?;
        Ok(Reloader {
            requests: tx,
            stop,
            thread: Some(thread),
        })
    }

    /// A handle that asks for reloads (the HTTP endpoint's).
    pub fn requests(&self) -> Sender<Request> {
        self.requests.clone()
    }
}

impl Drop for Reloader {
    /// Stops the thread, after the reload it runs if any.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The file watch as the reload thread gets it.
struct Watched {
    watcher: Option<Watch>,
    /// An event in a watched folder since the last look.
    changed: Arc<AtomicBool>,
    /// Watched files written in place and not closed since.
    writing: Arc<Mutex<BTreeSet<PathBuf>>>,
    /// The watched files as the served registry read them.
    seen: Fingerprint,
    /// SIGHUPs counted before the worker started.
    signals: u64,
}

fn reload_loop(
    models: Arc<Models>,
    requests: Receiver<Request>,
    files: Watched,
    debounce: Duration,
    stop: Arc<AtomicBool>,
) {
    let Watched {
        mut watcher,
        changed,
        writing,
        mut seen,
        signals: mut served_signals,
    } = files;
    // (first change, last change) since the last watched reload
    let mut changes: Option<(Instant, Instant)> = None;
    // the most a stream of changes delays a watched reload
    let longest = (debounce * 10).max(Duration::from_secs(5));
    while !stop.load(Ordering::Relaxed) {
        let request = match requests.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => Some(r),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if changed.swap(false, Ordering::Relaxed) {
            // debounced: the reload waits for `debounce` without changes
            let now = Instant::now();
            changes = Some((changes.map_or(now, |c| c.0), now));
        }
        let mut run = request.map(|r| (r.trigger, r.reply));
        let hups = SIGHUPS.load(Ordering::Relaxed);
        if run.is_none() && hups != served_signals && models.file().is_some() {
            served_signals = hups;
            run = Some((Trigger::Signal, None));
        }
        // a watched file written in place and not closed yet is not read
        // half-written (an editor, a slow copy), up to OPEN_WRITE_WAIT
        let open = !writing.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
        let due = changes.is_some_and(|(first, last)| {
            if open {
                first.elapsed() >= OPEN_WRITE_WAIT
            } else {
                last.elapsed() >= debounce || first.elapsed() >= longest
            }
        });
        if run.is_none() && due {
            changes = None;
            writing.lock().unwrap_or_else(|p| p.into_inner()).clear();
            // an event in a watched folder: a reload only when a watched
            // file (followed through links, e.g. a Kubernetes ConfigMap's
            // `..data` swap) is not what it was
            if Fingerprint::of(&models.watched_files()) != seen {
                run = Some((Trigger::Watch, None));
            }
        }
        let Some((trigger, reply)) = run else {
            continue;
        };
        // requests queued meanwhile are answered by this same reload (a
        // flood of POSTs costs one reload at a time, not one each)
        let mut replies: Vec<_> = reply.into_iter().collect();
        replies.extend(requests.try_iter().filter_map(|r| r.reply));
        let before = Fingerprint::of(&models.watched_files());
        let result = models.reload(trigger).map_err(|e| e.to_string());
        for reply in replies {
            let _ = reply.send(result.clone());
        }
        // what this reload read (a change during it is seen next time)
        seen = before.extended(&models.watched_files());
        if let Some(w) = &mut watcher {
            w.refresh(&models);
        }
    }
}

/// What the watched files are now, each followed through links: device,
/// inode, size and modification time (None: cannot be read).
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint(std::collections::BTreeMap<PathBuf, Option<FileStat>>);

/// Device, inode, size, modification time (s, ns).
type FileStat = (u64, u64, u64, i64, i64);

impl Fingerprint {
    fn of(files: &BTreeSet<PathBuf>) -> Fingerprint {
        Fingerprint(files.iter().map(|f| (f.clone(), Self::file(f))).collect())
    }

    fn file(f: &Path) -> Option<FileStat> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(f).ok()?;
        Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
    }

    /// These fingerprints for the files they have, fresh ones for the
    /// others of `files`; only `files`.
    fn extended(mut self, files: &BTreeSet<PathBuf>) -> Fingerprint {
        self.0.retain(|f, _| files.contains(f));
        for f in files {
            self.0.entry(f.clone()).or_insert_with(|| Self::file(f));
        }
        self
    }
}

/// The file watcher: the folders of `models.yaml` and of every model file
/// (editors and deploy tools replace files by renaming, and a Kubernetes
/// ConfigMap swaps a `..data` link beside them, so folders are watched; an
/// event there sets `changed`, and [`Fingerprint`] says whether a watched
/// file really changed).
struct Watch {
    watcher: notify::RecommendedWatcher,
    folders: BTreeSet<PathBuf>,
}

/// The longest a watched reload waits for a watched file written in place
/// to be closed.
const OPEN_WRITE_WAIT: Duration = Duration::from_secs(60);

impl Watch {
    /// `writing`: watched files written in place and not closed since.
    fn start(
        models: &Models,
        changed: Arc<AtomicBool>,
        writing: Arc<Mutex<BTreeSet<PathBuf>>>,
    ) -> Option<Watch> {
        use notify::event::{AccessKind, AccessMode, DataChange, ModifyKind};
        use notify::EventKind;
        let watched = models.watched_files();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if !relevant(&event.kind) {
                return;
            }
            changed.store(true, Ordering::Relaxed);
            let mut w = writing.lock().unwrap_or_else(|p| p.into_inner());
            for path in event.paths.iter().filter(|p| watched.contains(*p)) {
                match event.kind {
                    EventKind::Modify(ModifyKind::Data(DataChange::Any | DataChange::Content))
                    | EventKind::Modify(ModifyKind::Any) => {
                        w.insert(path.clone());
                    }
                    EventKind::Access(AccessKind::Close(AccessMode::Write))
                    | EventKind::Create(_)
                    | EventKind::Remove(_)
                    | EventKind::Modify(ModifyKind::Name(_)) => {
                        w.remove(path);
                    }
                    _ => {}
                }
            }
        });
        let watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the model files; reload with SIGHUP or POST /admin/reload");
                return None;
            }
        };
        let mut w = Watch {
            watcher,
            folders: BTreeSet::new(),
        };
        w.refresh(models);
        Some(w)
    }

    /// Watches the folders of the files the registry uses now.
    fn refresh(&mut self, models: &Models) {
        use notify::Watcher as _;
        let files = models.watched_files();
        let folders: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        for gone in self.folders.difference(&folders) {
            let _ = self.watcher.unwatch(gone);
        }
        for new in folders.difference(&self.folders) {
            if let Err(e) = self.watcher.watch(new, notify::RecursiveMode::NonRecursive) {
                tracing::warn!(folder = %new.display(), error = %e, "cannot watch this folder; changes in it need SIGHUP or POST /admin/reload");
            }
        }
        self.folders = folders;
    }
}

/// Events that may change a file's content (reads and metadata do not).
fn relevant(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    use notify::EventKind;
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Any | EventKind::Other => false,
    }
}
