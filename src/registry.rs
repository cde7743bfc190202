//! The model registry: loads the models of `models.yaml`, verifies their
//! SHA256, records every lifecycle event in the audit store, caches loaded
//! models by checksum, defers `lazy` models to first use and serves a model's
//! `fallback` when it cannot be loaded.
//!
//! A load (read, verify, parse, warm-up) runs on a thread of its own under
//! the model's `load_timeout_ms`; every caller waiting for it waits at most
//! until that deadline, after which the model is refused (and audited) and
//! the load thread is abandoned ([`crate::deadline`]). [`Registry::start_loading`]
//! starts a lazy load without waiting, so the worker's consume thread never
//! waits on one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use crate::audit::{AuditEntry, AuditError, AuditEvent, AuditStore};
use crate::checksum::{check_file, read_and_hash, FileError};
use crate::config::{load_registry_file_with, ConfigError, ModelSpec};
use crate::model::{
    onnx, LoadContext, Loaded, Loaders, MissingPolicy, ModelError, ModelInfo, ModelLoader,
    ServedModel, TaskType,
};

/// Why a model could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown model '{0}'")]
    UnknownModel(String),
    #[error("model '{model}': {path}: checksum mismatch: expected sha256 {expected}, actual {actual}; model refused")]
    ChecksumMismatch {
        model: String,
        path: String,
        expected: String,
        actual: String,
    },
    /// The model file could not be read or made into a model: the
    /// format's own error is the source.
    #[error("model '{model}': {source}")]
    Model {
        model: String,
        #[source]
        source: Arc<ModelError>,
    },
    #[error("model '{model}': {message}")]
    Load { model: String, message: String },
}

impl RegistryError {
    /// The format's error, when the model file could not be made into a model.
    pub fn model_error(&self) -> Option<&ModelError> {
        match self {
            RegistryError::Model { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A model as served: the model itself and whether a fallback stands in.
#[derive(Clone)]
pub struct Served {
    pub model: Arc<ServedModel>,
    /// The name of the model that was asked for, when a fallback serves it.
    pub fallback_for: Option<String>,
}

/// Most values per row a model may answer (regression outputs).
pub const MAX_OUTPUTS: usize = 65_536;
/// Most classes a classifier may have.
pub const MAX_CLASSES: usize = 1_000_000;

/// Two entries share a loaded model only if the file and the way it is
/// read are the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    sha256: String,
    kind: String,
    task_type: TaskType,
    /// A loader checks the entry's features against its file (names, not
    /// just their count): an entry with other features loads its own.
    features: Vec<String>,
    /// The kind's options block as written.
    options: String,
}

/// Where one entry's load stands.
enum LoadState {
    /// Not asked for yet (a lazy model).
    Idle,
    /// A load thread runs; waiters give up at `deadline`.
    Loading {
        deadline: Instant,
        cancel: Arc<crate::deadline::Cancel>,
    },
    Loaded(Arc<ServedModel>),
    /// A failure is remembered (a refused file stays refused until reload).
    Failed(RegistryError),
}

/// An entry's load state, shared with its load thread.
struct Slot {
    state: Mutex<LoadState>,
    changed: Condvar,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, LoadState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One registry entry.
struct Entry {
    spec: ModelSpec,
    slot: Arc<Slot>,
    fallback_audited: OnceLock<()>,
}

/// Whether an entry can be served without waiting.
#[derive(Clone)]
pub(crate) enum Readiness {
    /// Loaded, or settled on its fallback: [`Registry::get`] answers at once.
    Settled,
    /// It (or the fallback that would serve it) is not loaded yet.
    Pending,
}

/// Options for how models are loaded.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Load every model now, including `lazy` ones (used by `models verify`).
    pub load_all: bool,
    /// Load nothing now (used by `models list`).
    pub load_none: bool,
    /// Where to find the ONNX Runtime library (see [`onnx::RuntimeConfig`]).
    pub onnx: onnx::RuntimeConfig,
}

/// What a load thread needs: the loaders, the cache, the audit store, the options.
struct Loader {
    loaders: Loaders,
    /// Loaded models by file checksum and everything that shapes loading,
    /// with the name of the entry that loaded it.
    by_checksum: Mutex<HashMap<CacheKey, (Loaded, String)>>,
    audit: Option<Arc<AuditStore>>,
    options: RegistryOptions,
}

/// Builds a [`Registry`]: the built-in model kinds plus any added with
/// [`RegistryBuilder::with_loader`], an audit store, options.
///
/// ```no_run
/// # use ml_worker::registry::RegistryBuilder;
/// # struct MyLoader;
/// # impl ml_worker::model::ModelLoader for MyLoader {
/// #     fn kind(&self) -> &str { "mine" }
/// #     fn load(&self, _: &[u8], _: &ml_worker::model::LoadContext<'_>)
/// #         -> Result<ml_worker::model::Loaded, ml_worker::model::ModelError> {
/// #         Err(ml_worker::model::ModelError::Unsupported("an example".into()))
/// #     }
/// # }
/// let registry = RegistryBuilder::new()
///     .with_loader(MyLoader)
///     .open(std::path::Path::new("config/models.yaml"))?;
/// # Ok::<(), ml_worker::config::ConfigError>(())
/// ```
#[derive(Clone, Default)]
pub struct RegistryBuilder {
    added: Vec<Arc<dyn ModelLoader>>,
    audit: Option<Arc<AuditStore>>,
    options: RegistryOptions,
}

impl RegistryBuilder {
    /// The built-in kinds, no audit store, default options.
    pub fn new() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// Adds a model kind (replacing a built-in one of the same name).
    pub fn with_loader(mut self, loader: impl ModelLoader + 'static) -> RegistryBuilder {
        self.added.push(Arc::new(loader));
        self
    }

    /// Records every model's lifecycle in `audit`.
    pub fn audit(mut self, audit: Option<Arc<AuditStore>>) -> RegistryBuilder {
        self.audit = audit;
        self
    }

    /// The audit store the registry records into, if any.
    pub fn audit_store(&self) -> Option<&Arc<AuditStore>> {
        self.audit.as_ref()
    }

    pub fn options(mut self, options: RegistryOptions) -> RegistryBuilder {
        self.options = options;
        self
    }

    /// The kinds this builder's registry reads, by name.
    pub fn loaders(&self) -> Loaders {
        let mut loaders = crate::model::kinds::builtin(&self.options.onnx);
        for l in &self.added {
            loaders.add(l.clone());
        }
        loaders
    }

    /// Reads `models.yaml` and loads the eager models. A model that fails to
    /// load does not fail the registry: it is refused (and audited), and
    /// [`Registry::get`] reports why or serves its fallback.
    pub fn open(self, file: &Path) -> Result<Registry, ConfigError> {
        let specs = self.read_specs(file)?;
        Ok(self.from_specs(specs))
    }

    /// `models.yaml`'s entries, validated, with every model file present
    /// (a missing file with a fallback is the load's to refuse).
    fn read_specs(&self, file: &Path) -> Result<Vec<ModelSpec>, ConfigError> {
        let specs = load_registry_file_with(file, &self.loaders())?;
        for s in &specs {
            // the size is checked when the model loads (a refusal, audited);
            // a missing file with a fallback is refused the same way, and
            // the fallback serves
            match check_file(&s.path, u64::MAX) {
                Ok(_) => {}
                Err(FileError::Missing(_) | FileError::NotRegular(_)) if s.fallback.is_some() => {}
                Err(e @ (FileError::Missing(_) | FileError::NotRegular(_))) => {
                    return Err(ConfigError::Field {
                        file: file.to_path_buf(),
                        model: s.name.clone(),
                        field: "path".into(),
                        message: format!("model file {} {e}", s.path.display()),
                    })
                }
                Err(_) => {}
            }
        }
        Ok(specs)
    }

    /// Reads `file` again for a registry to replace `previous`, all or
    /// nothing: a model whose entry and file (by SHA256) are unchanged is
    /// taken over as loaded, without a load or an audit row; every added or
    /// changed model is loaded (a lazy one too, when `previous` had it
    /// loaded), verified and warmed up. Any failure (the YAML, a missing
    /// file, a wrong pin, a model that does not load, unless it is
    /// `optional`) refuses the whole reload: nothing of it serves, and its
    /// models are freed when the error is dropped.
    pub fn reopen(
        self,
        file: &Path,
        previous: &Registry,
    ) -> Result<(Registry, Vec<Change>), ReloadError> {
        let specs = self.read_specs(file).map_err(ReloadError::Config)?;
        let mut kept = HashMap::new();
        for spec in &specs {
            let Some(old) = previous.entries.get(&spec.name) else {
                continue;
            };
            let Some(m) = previous.loaded(&spec.name) else {
                continue;
            };
            if same_model(&old.spec, spec)
                && crate::checksum::sha256_file(&spec.path).is_ok_and(|s| s == m.info().sha256)
            {
                kept.insert(spec.name.clone(), m);
            }
        }
        let was_loaded = |name: &str| previous.loaded(name).is_some();
        let registry = self.build(specs, |name| kept.get(name).cloned(), was_loaded);
        let mut failures: Vec<RegistryError> = Vec::new();
        for name in &registry.order {
            let e = &registry.entries[name];
            // an entry that failed before, unchanged, is no new failure (a
            // missing file with a fallback keeps being served by the
            // fallback, as at start-up); it must not block other changes
            let failed_before = previous.failure(name).is_some()
                && previous.spec(name).is_some_and(|s| s == &e.spec);
            // a new entry with a fallback is served by it, as at start-up
            let new_with_fallback = previous.spec(name).is_none() && e.spec.fallback.is_some();
            if e.spec.optional || failed_before || new_with_fallback {
                continue;
            }
            if let LoadState::Failed(err) = &*e.slot.lock() {
                failures.push(err.clone());
            }
        }
        for err in registry.pin_mismatches() {
            if !failures.iter().any(|f| f.to_string() == err.to_string()) {
                failures.push(err);
            }
        }
        if !failures.is_empty() {
            return Err(ReloadError::Refused(failures));
        }
        let changes = registry.changes_since(previous, &kept);
        Ok((registry, changes))
    }

    /// A registry of validated entries (parsed with [`RegistryBuilder::loaders`]).
    pub fn from_specs(self, specs: Vec<ModelSpec>) -> Registry {
        self.build(specs, |_| None, |_| false)
    }

    /// The registry of `specs`: an entry `loaded` answers for starts as
    /// that model; the others load now unless they are lazy (and not
    /// `eager`) or the options say otherwise.
    fn build(
        self,
        specs: Vec<ModelSpec>,
        loaded: impl Fn(&str) -> Option<Arc<ServedModel>>,
        eager: impl Fn(&str) -> bool,
    ) -> Registry {
        let loaders = self.loaders();
        let RegistryBuilder { audit, options, .. } = self;
        let order = specs.iter().map(|s| s.name.clone()).collect();
        let entries = specs
            .into_iter()
            .map(|spec| {
                let state = match loaded(&spec.name) {
                    Some(m) => LoadState::Loaded(m),
                    None => LoadState::Idle,
                };
                (
                    spec.name.clone(),
                    Entry {
                        spec,
                        slot: Arc::new(Slot {
                            state: Mutex::new(state),
                            changed: Condvar::new(),
                        }),
                        fallback_audited: OnceLock::new(),
                    },
                )
            })
            .collect();
        let reg = Registry {
            order,
            entries,
            loader: Arc::new(Loader {
                loaders,
                by_checksum: Mutex::new(HashMap::new()),
                audit,
                options,
            }),
        };
        if !reg.loader.options.load_none {
            // one after the other (two entries of one file share one
            // load), each under its own deadline
            for name in &reg.order {
                let e = &reg.entries[name];
                if reg.loader.options.load_all || !e.spec.lazy || eager(name) {
                    if let Err(err) = reg.load(e) {
                        tracing::warn!(model = %name, error = %err, "model not loaded");
                    }
                }
            }
        }
        reg
    }
}

/// What a reload changed for one model name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub model: String,
    /// The version served before (None: the model is new).
    pub old: Option<String>,
    /// The version served after (None: removed, or lazy and not loaded).
    pub new: Option<String>,
    /// What changed, in words.
    pub what: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        write!(
            f,
            "{}: {} ({} -> {})",
            self.model,
            self.what,
            v(&self.old),
            v(&self.new)
        )
    }
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(ConfigError),
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Refused(Vec<RegistryError>),
    #[error("{0}")]
    Other(String),
    #[error("the worker is stopping; nothing was reloaded")]
    Stopping,
}

/// The routing and serving settings that differ, in words (for the
/// reload's audit row): shadow, canary, fallback, signal rule, lazy,
/// optional, description.
fn settings_changed(a: &ModelSpec, b: &ModelSpec) -> String {
    fn opt<T: std::fmt::Debug>(v: &Option<T>) -> String {
        v.as_ref().map_or("none".into(), |v| format!("{v:?}"))
    }
    let canary = |s: &ModelSpec| {
        s.canary
            .as_ref()
            .map_or("none".into(), |c| format!("{} {}%", c.model, c.percent))
    };
    let mut out = Vec::new();
    let mut diff = |what: &str, x: String, y: String| {
        if x != y {
            out.push(format!("{what}: {x} -> {y}"));
        }
    };
    diff("shadow", opt(&a.shadow), opt(&b.shadow));
    diff("canary", canary(a), canary(b));
    diff("fallback", opt(&a.fallback), opt(&b.fallback));
    diff("signal", opt(&a.signal), opt(&b.signal));
    diff("lazy", a.lazy.to_string(), b.lazy.to_string());
    diff("optional", a.optional.to_string(), b.optional.to_string());
    diff("description", opt(&a.description), opt(&b.description));
    if out.is_empty() {
        "settings changed".into()
    } else {
        out.join(", ")
    }
}

/// Whether two entries make the same loaded model (fields that only route
/// or describe, such as the signal rule or a fallback, may differ).
fn same_model(a: &ModelSpec, b: &ModelSpec) -> bool {
    let strip = |s: &ModelSpec| ModelSpec {
        signal: None,
        description: None,
        fallback: None,
        shadow: None,
        canary: None,
        lazy: false,
        optional: false,
        ..s.clone()
    };
    strip(a) == strip(b)
}

pub struct Registry {
    order: Vec<String>,
    entries: HashMap<String, Entry>,
    loader: Arc<Loader>,
}

impl Registry {
    /// [`RegistryBuilder::open`] with the built-in kinds.
    pub fn open(
        file: &Path,
        audit: Option<Arc<AuditStore>>,
        options: RegistryOptions,
    ) -> Result<Registry, ConfigError> {
        RegistryBuilder::new()
            .audit(audit)
            .options(options)
            .open(file)
    }

    /// [`RegistryBuilder::from_specs`] with the built-in kinds.
    pub fn from_specs(
        specs: Vec<ModelSpec>,
        audit: Option<Arc<AuditStore>>,
        options: RegistryOptions,
    ) -> Registry {
        RegistryBuilder::new()
            .audit(audit)
            .options(options)
            .from_specs(specs)
    }

    /// What changed from `previous` to this registry (`kept`: the models
    /// taken over as loaded), name by name, in this registry's order then
    /// the removed ones.
    fn changes_since(
        &self,
        previous: &Registry,
        kept: &HashMap<String, Arc<ServedModel>>,
    ) -> Vec<Change> {
        let version = |r: &Registry, name: &str| {
            r.loaded(name)
                .map(|m| m.info().version.clone())
                .or_else(|| r.spec(name).and_then(|s| s.version.clone()))
        };
        let mut out = Vec::new();
        for name in &self.order {
            let spec = &self.entries[name].spec;
            let (old, new) = (version(previous, name), version(self, name));
            let what = match previous.spec(name) {
                None => "added".to_string(),
                // lazy, loaded by neither: it loads from its file when asked
                Some(before)
                    if before == spec
                        && previous.loaded(name).is_none()
                        && self.loaded(name).is_none() =>
                {
                    continue
                }
                Some(before) if kept.contains_key(name) => {
                    if before == spec {
                        continue;
                    }
                    format!("same model; {}", settings_changed(before, spec))
                }
                Some(_) => match self.loaded(name) {
                    Some(m) => format!("loaded sha256 {}", m.info().sha256),
                    None => "entry changed (lazy: loads on first use)".to_string(),
                },
            };
            out.push(Change {
                model: name.clone(),
                old,
                new,
                what,
            });
        }
        for name in &previous.order {
            if !self.entries.contains_key(name) {
                out.push(Change {
                    model: name.clone(),
                    old: version(previous, name),
                    new: None,
                    what: "removed".to_string(),
                });
            }
        }
        out
    }

    /// The kinds this registry reads.
    pub fn loaders(&self) -> &Loaders {
        &self.loader.loaders
    }

    /// Why `name` was refused, if it was (never loads).
    pub fn failure(&self, name: &str) -> Option<RegistryError> {
        match &*self.entries.get(name)?.slot.lock() {
            LoadState::Failed(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// Every pinned model whose file does not match its pin, except those
    /// marked `optional`. A model already loaded was checked as it loaded
    /// (and a refused one says why); only the others' files are read and
    /// hashed here. Refuses nothing.
    pub fn pin_mismatches(&self) -> Vec<RegistryError> {
        let mut out = Vec::new();
        for name in &self.order {
            let entry = &self.entries[name];
            let spec = &entry.spec;
            let (Some(expected), false) = (&spec.sha256, spec.optional) else {
                continue;
            };
            match &*entry.slot.lock() {
                LoadState::Loaded(_) => continue,
                LoadState::Failed(e @ RegistryError::ChecksumMismatch { .. }) => {
                    out.push(e.clone());
                    continue;
                }
                _ => {}
            }
            // an unreadable file is the load's to report (and audit)
            if let Ok(actual) = crate::checksum::sha256_file(&spec.path) {
                if actual != *expected {
                    out.push(RegistryError::ChecksumMismatch {
                        model: name.clone(),
                        path: spec.path.display().to_string(),
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
        }
        out
    }

    /// Model names in registry order.
    pub fn names(&self) -> &[String] {
        &self.order
    }

    pub fn spec(&self, name: &str) -> Option<&ModelSpec> {
        self.entries.get(name).map(|e| &e.spec)
    }

    /// The loaded model, if it is loaded (never loads).
    pub fn loaded(&self, name: &str) -> Option<Arc<ServedModel>> {
        match &*self.entries.get(name)?.slot.lock() {
            LoadState::Loaded(m) => Some(m.clone()),
            _ => None,
        }
    }

    /// Whether [`Registry::get`] would answer `name` without waiting for a
    /// load (never loads). Unknown names are settled (as errors).
    /// A load past its deadline is refused here (as a waiter would), so
    /// its fallback, if any, is what is asked about next.
    pub(crate) fn readiness(&self, name: &str) -> Readiness {
        let mut at = name;
        for _ in 0..=self.order.len() {
            let Some(e) = self.entries.get(at) else {
                return Readiness::Settled;
            };
            let overdue = match &*e.slot.lock() {
                LoadState::Loaded(_) => return Readiness::Settled,
                LoadState::Idle => return Readiness::Pending,
                LoadState::Loading { deadline, .. } if Instant::now() < *deadline => {
                    return Readiness::Pending
                }
                LoadState::Loading { .. } => true,
                LoadState::Failed(_) => false,
            };
            if overdue {
                // refuses it (audited) without waiting: the deadline passed
                let _ = self.wait(e);
            }
            match &e.spec.fallback {
                None => return Readiness::Settled,
                Some(fb) => at = fb,
            }
        }
        Readiness::Settled
    }

    /// Starts loading `name` (and, if it has failed, its fallback) on a
    /// thread of its own, without waiting.
    pub(crate) fn start_loading(&self, name: &str) {
        let mut at = name;
        for _ in 0..=self.order.len() {
            let Some(e) = self.entries.get(at) else {
                return;
            };
            self.start(e);
            match (&*e.slot.lock(), &e.spec.fallback) {
                (LoadState::Failed(_), Some(fb)) => at = fb,
                _ => return,
            }
        }
    }

    /// The model for `name`, loading it if lazy (waiting at most until its
    /// load deadline); when it cannot be loaded and has a fallback, the
    /// fallback serves (audited once per model).
    pub fn get(&self, name: &str) -> Result<Served, RegistryError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| RegistryError::UnknownModel(name.to_string()))?;
        match self.load(entry) {
            Ok(model) => Ok(Served {
                model,
                fallback_for: None,
            }),
            Err(err) => {
                let Some(fb) = &entry.spec.fallback else {
                    return Err(err);
                };
                let served = self.get(fb)?;
                if entry.fallback_audited.set(()).is_ok() {
                    tracing::warn!(model = %name, fallback = %fb, reason = %err, "serving through fallback");
                    // a failed fallback row is logged; serving goes on
                    let _ = self.loader.audit(
                        AuditEvent::Fallback,
                        &entry.spec,
                        None,
                        "",
                        format!("served by '{fb}': {err}"),
                    );
                }
                Ok(Served {
                    model: served.model,
                    fallback_for: Some(name.to_string()),
                })
            }
        }
    }

    /// Unloads every loaded model (audited). The registry serves nothing after.
    pub fn unload_all(&mut self) {
        for name in &self.order {
            let Some(entry) = self.entries.get(name) else {
                continue;
            };
            let state = std::mem::replace(&mut *entry.slot.lock(), LoadState::Idle);
            let (LoadState::Loaded(m), Some(audit)) = (state, &self.loader.audit) else {
                continue;
            };
            if let Err(e) = audit.record(AuditEvent::Unload, &entry_for(m.info())) {
                tracing::error!(model = %name, error = %e, "audit write failed");
            }
        }
        self.loader
            .by_checksum
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Starts the entry's load thread if nothing has started it.
    fn start(&self, entry: &Entry) {
        let mut state = entry.slot.lock();
        if !matches!(*state, LoadState::Idle) {
            return;
        }
        let cancel = Arc::new(crate::deadline::Cancel::default());
        *state = LoadState::Loading {
            deadline: Instant::now() + entry.spec.limits.load_timeout,
            cancel: cancel.clone(),
        };
        drop(state);
        let (loader, spec, slot) = (self.loader.clone(), entry.spec.clone(), entry.slot.clone());
        let started = crate::deadline::spawn(&format!("load-{}", spec.name), cancel, move || {
            // a loader that panics (a user's kind, a format bug) refuses
            // the model now, with the panic's text, instead of at the deadline
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loader.load_spec(&spec)))
                    .unwrap_or_else(|p| {
                        let text = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "a panic".into());
                        let err = RegistryError::Load {
                            model: spec.name.clone(),
                            message: format!(
                                "the '{}' loader panicked: {}",
                                spec.kind,
                                crate::text::escape(&text)
                            ),
                        };
                        loader
                            .audit(AuditEvent::Refuse, &spec, None, "", err.to_string())
                            .ok(); // logged inside
                        Err(err)
                    });
            let mut state = slot.lock();
            match (&*state, result) {
                (LoadState::Loading { .. }, Ok(m)) => *state = LoadState::Loaded(m),
                (LoadState::Loading { .. }, Err(e)) => *state = LoadState::Failed(e),
                // past its deadline: already refused; the late result is dropped
                (_, r) => tracing::warn!(model = %spec.name, ok = r.is_ok(),
                    "a load finished after its deadline; its result is discarded"),
            }
            slot.changed.notify_all();
        });
        if let Err(e) = started {
            let mut state = entry.slot.lock();
            *state = LoadState::Failed(RegistryError::Load {
                model: entry.spec.name.clone(),
                message: format!("cannot start a load thread: {e}"),
            });
            entry.slot.changed.notify_all();
        }
    }

    /// Waits for the entry's load, at most until its deadline; a load that
    /// passes it is refused (audited) and its thread abandoned.
    fn wait(&self, entry: &Entry) -> Result<Arc<ServedModel>, RegistryError> {
        let mut state = entry.slot.lock();
        loop {
            match &*state {
                LoadState::Loaded(m) => return Ok(m.clone()),
                LoadState::Failed(e) => return Err(e.clone()),
                LoadState::Idle => {
                    return Err(RegistryError::Load {
                        model: entry.spec.name.clone(),
                        message: "not loaded".into(),
                    })
                }
                LoadState::Loading { deadline, cancel } => {
                    let now = Instant::now();
                    if now >= *deadline {
                        cancel.cancel();
                        let err = RegistryError::Load {
                            model: entry.spec.name.clone(),
                            message: format!(
                                "loading did not finish within its deadline of {} ms (load_timeout_ms); the model is refused",
                                entry.spec.limits.load_timeout.as_millis()
                            ),
                        };
                        *state = LoadState::Failed(err.clone());
                        entry.slot.changed.notify_all();
                        drop(state);
                        tracing::error!(model = %entry.spec.name, error = %err, "model load timed out");
                        self.loader
                            .audit(AuditEvent::Refuse, &entry.spec, None, "", err.to_string())
                            .ok(); // logged inside
                        return Err(err);
                    }
                    let left = *deadline - now;
                    state = entry
                        .slot
                        .changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    fn load(&self, entry: &Entry) -> Result<Arc<ServedModel>, RegistryError> {
        self.start(entry);
        self.wait(entry)
    }
}

impl Loader {
    /// Reads the file once (hashing as it reads), checks the pin, parses
    /// those same bytes. Verify and Load rows must reach the audit store,
    /// or the model is not served.
    fn load_spec(&self, spec: &ModelSpec) -> Result<Arc<ServedModel>, RegistryError> {
        let started = Instant::now();
        let fail = |message: String| RegistryError::Load {
            model: spec.name.clone(),
            message,
        };
        let (bytes, sha) = match read_and_hash(&spec.path, spec.limits.max_bytes) {
            Ok(read) => read,
            Err(e) => {
                let err = fail(format!("{}: {e}", spec.path.display()));
                self.audit(AuditEvent::Refuse, spec, None, "", err.to_string())
                    .ok(); // logged inside
                return Err(err);
            }
        };
        if let Some(expected) = &spec.sha256 {
            if *expected != sha {
                let err = RegistryError::ChecksumMismatch {
                    model: spec.name.clone(),
                    path: spec.path.display().to_string(),
                    expected: expected.clone(),
                    actual: sha.clone(),
                };
                self.audit(AuditEvent::Refuse, spec, None, &sha, err.to_string())
                    .ok(); // logged inside
                return Err(err);
            }
        }
        let version = spec
            .version
            .clone()
            .unwrap_or_else(|| sha[..12].to_string());
        let pinned = if spec.sha256.is_some() {
            "pinned checksum matches"
        } else {
            "checksum computed (not pinned)"
        };
        self.audit(
            AuditEvent::Verify,
            spec,
            Some(&version),
            &sha,
            pinned.to_string(),
        )
        .map_err(|e| {
            fail(format!(
                "not loaded: the audit store refused the verify row: {e}"
            ))
        })?;

        let key = CacheKey {
            sha256: sha.clone(),
            kind: spec.kind.clone(),
            task_type: spec.task_type,
            features: spec.features.clone(),
            options: spec.options.key().to_string(),
        };
        let cached = self
            .by_checksum
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let refuse = |err: RegistryError| {
            self.audit(AuditEvent::Refuse, spec, None, &sha, err.to_string())
                .ok(); // logged inside
            err
        };
        let (loaded, shared_with) = match cached {
            Some((loaded, owner)) => (loaded, Some(owner)),
            None => match self.load_file(spec, &bytes) {
                Ok(loaded) => (loaded, None),
                Err(e) => return Err(refuse(e)),
            },
        };
        let detail = match &shared_with {
            Some(owner) => format!("{} (shared with '{owner}')", loaded.detail),
            None => loaded.detail.clone(),
        };
        let info = ModelInfo {
            name: spec.name.clone(),
            version,
            kind: spec.kind.clone(),
            sha256: sha.clone(),
            path: spec.path.clone(),
            features: spec.features.clone(),
            target: spec.target.clone(),
            task_type: spec.task_type,
            n_outputs: loaded.n_outputs,
            n_classes: loaded.n_classes,
            detail,
            missing: spec.missing.unwrap_or(if loaded.handles_missing {
                MissingPolicy::Nan
            } else {
                MissingPolicy::Reject
            }),
            load_time: started.elapsed(),
        };
        let model = Arc::new(ServedModel::new(info, loaded.model.clone()));
        let warmed_up = self.loaders.get(&spec.kind).is_some_and(|l| l.warms_up());
        if shared_with.is_none() && !warmed_up {
            // one row of zeros through the model as it will be served: a
            // model that cannot answer (a wrong shape, a class out of
            // range, a panic) is refused now, within the load deadline,
            // not event by event (a non-finite answer for zeros is that
            // row's problem: the model may not be defined there)
            let n = spec.features.len();
            let zeros = vec![0.0; n];
            let probe = crate::model::Batch::new(&zeros, n).and_then(|b| model.predict_full(b));
            if let Err(why) = probe {
                return Err(refuse(RegistryError::Model {
                    model: spec.name.clone(),
                    source: Arc::new(ModelError::Runtime(format!(
                        "a probe row of zeros (the warm-up at load) fails: {why}"
                    ))),
                }));
            }
        }
        let i = model.info();
        if let (Some(max), Some(k)) = (
            spec.signal.as_ref().and_then(|r| r.max_class()),
            i.n_classes,
        ) {
            if max >= k {
                return Err(refuse(fail(format!(
                    "field 'signal' maps class {max} but the model has {k} classes"
                ))));
            }
        }
        self.audit(
            AuditEvent::Load,
            spec,
            Some(&i.version),
            &sha,
            format!("{}; missing values: {}", i.detail, i.missing),
        )
        .map_err(|e| {
            fail(format!(
                "not loaded: the audit store refused the load row: {e}"
            ))
        })?;
        tracing::info!(model = %i.name, version = %i.version, kind = %i.kind, sha256 = %i.sha256, detail = %i.detail, "model loaded");
        if shared_with.is_none() {
            self.by_checksum
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key)
                .or_insert_with(|| (loaded, spec.name.clone()));
        }
        Ok(model)
    }

    /// Appends an audit row (no-op without a store). Failures are logged and
    /// returned; callers decide whether the model may still be served.
    fn audit(
        &self,
        event: AuditEvent,
        spec: &ModelSpec,
        version: Option<&str>,
        sha: &str,
        detail: String,
    ) -> Result<(), AuditError> {
        let Some(store) = &self.audit else {
            return Ok(());
        };
        let entry = AuditEntry {
            model: spec.name.clone(),
            version: version
                .map(str::to_string)
                .or_else(|| spec.version.clone())
                .unwrap_or_default(),
            kind: spec.kind.to_string(),
            path: audit_path(&spec.path),
            sha256: sha.to_string(),
            detail,
        };
        store.record(event, &entry).map(|_| ()).map_err(|e| {
            tracing::error!(model = %spec.name, event = event.as_str(), error = %e, "audit write failed");
            e
        })
    }
}

/// A model file's path as the audit store records it: absolute and
/// canonical (links and `..` resolved), whatever folder a command ran in;
/// absolute at least when the file is gone.
fn audit_path(p: &Path) -> String {
    std::fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

fn entry_for(info: &ModelInfo) -> AuditEntry {
    AuditEntry {
        model: info.name.clone(),
        version: info.version.clone(),
        kind: info.kind.to_string(),
        path: audit_path(&info.path),
        sha256: info.sha256.clone(),
        detail: String::new(),
    }
}

impl Loader {
    /// The entry's loader makes a model of the verified bytes; its answer
    /// is checked to be a model of the entry's task.
    fn load_file(&self, spec: &ModelSpec, bytes: &[u8]) -> Result<Loaded, RegistryError> {
        let model_err = |source: ModelError| RegistryError::Model {
            model: spec.name.clone(),
            source: Arc::new(source),
        };
        let loader = self
            .loaders
            .get(&spec.kind)
            .ok_or_else(|| RegistryError::Load {
                model: spec.name.clone(),
                message: format!(
                    "no loader for kind '{}' (the kinds available: {})",
                    spec.kind,
                    self.loaders.kinds().join(", ")
                ),
            })?;
        let ctx = LoadContext {
            name: &spec.name,
            path: &spec.path,
            features: &spec.features,
            task_type: spec.task_type,
            max_bytes: spec.limits.max_bytes,
            options: &spec.options,
        };
        let loaded = loader.load(bytes, &ctx).map_err(model_err)?;
        let shape_ok = match (spec.task_type, loaded.n_classes) {
            (TaskType::Classification, Some(k)) => loaded.n_outputs == 1 && k >= 2,
            (TaskType::Regression, None) => loaded.n_outputs >= 1,
            _ => false,
        };
        if loaded.n_outputs > MAX_OUTPUTS || loaded.n_classes.is_some_and(|k| k > MAX_CLASSES) {
            return Err(model_err(ModelError::Unsupported(format!(
                "the '{}' loader made a model of {} values per row and {:?} classes; \
                 at most {MAX_OUTPUTS} values and {MAX_CLASSES} classes are served",
                spec.kind, loaded.n_outputs, loaded.n_classes
            ))));
        }
        if !shape_ok {
            return Err(model_err(ModelError::Unsupported(format!(
                "the '{}' loader made a {} model of {} value(s) per row and {} classes; \
                 a {} model needs {}",
                spec.kind,
                spec.task_type,
                loaded.n_outputs,
                loaded.n_classes.map_or("no".to_string(), |k| k.to_string()),
                spec.task_type,
                match spec.task_type {
                    TaskType::Classification =>
                        "one value per row (the class) and 2 or more classes",
                    TaskType::Regression => "one or more values per row and no classes",
                }
            ))));
        }
        Ok(loaded)
    }
}
