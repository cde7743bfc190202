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
use crate::config::{
    load_registry_file, ConfigError, MissingPolicy, ModelSpec, OnnxOptions, TorchOptions,
};
use crate::model::tree::{ParsedTrees, TreeModel};
use crate::model::{
    lightgbm, onnx, xgboost, Aliased, Model, ModelError, ModelInfo, ModelKind, TaskType,
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
    #[error("model '{model}': {message}")]
    Load { model: String, message: String },
}

/// A model as served: the model itself and whether a fallback stands in.
#[derive(Clone)]
pub struct Served {
    pub model: Arc<dyn Model>,
    /// The name of the model that was asked for, when a fallback serves it.
    pub fallback_for: Option<String>,
}

/// Two entries share a loaded model only if the file and the way it is
/// read are the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    sha256: String,
    kind: ModelKind,
    task_type: TaskType,
    n_features: usize,
    onnx: OnnxOptions,
    torch: TorchOptions,
    /// torch models check NaN inputs against it themselves.
    missing: MissingPolicy,
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
    Loaded(Arc<dyn Model>),
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
pub enum Readiness {
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

/// What a load thread needs: the cache, the audit store, the options.
struct Loader {
    /// Loaded models by file checksum and everything that shapes loading.
    by_checksum: Mutex<HashMap<CacheKey, Arc<dyn Model>>>,
    audit: Option<Arc<AuditStore>>,
    options: RegistryOptions,
}

pub struct Registry {
    order: Vec<String>,
    entries: HashMap<String, Entry>,
    loader: Arc<Loader>,
}

impl Registry {
    /// Reads `models.yaml` and loads the eager models. A model that fails to
    /// load does not fail the registry: it is refused (and audited), and
    /// [`Registry::get`] reports why or serves its fallback.
    pub fn open(
        file: &Path,
        audit: Option<Arc<AuditStore>>,
        options: RegistryOptions,
    ) -> Result<Registry, ConfigError> {
        let specs = load_registry_file(file)?;
        for s in &specs {
            // the size is checked when the model loads (a refusal, audited)
            match check_file(&s.path, u64::MAX) {
                Ok(_) => {}
                Err(e @ (FileError::Missing(_) | FileError::NotRegular(_))) => {
                    return Err(ConfigError::Field {
                        file: file.to_path_buf(),
                        model: s.name.clone(),
                        field: "path",
                        message: format!("model file {} {e}", s.path.display()),
                    })
                }
                Err(_) => {}
            }
        }
        Ok(Self::from_specs(specs, audit, options))
    }

    pub fn from_specs(
        specs: Vec<ModelSpec>,
        audit: Option<Arc<AuditStore>>,
        options: RegistryOptions,
    ) -> Registry {
        let order = specs.iter().map(|s| s.name.clone()).collect();
        let entries = specs
            .into_iter()
            .map(|spec| {
                (
                    spec.name.clone(),
                    Entry {
                        spec,
                        slot: Arc::new(Slot {
                            state: Mutex::new(LoadState::Idle),
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
                if reg.loader.options.load_all || !e.spec.lazy {
                    if let Err(err) = reg.load(e) {
                        tracing::warn!(model = %name, error = %err, "model not loaded");
                    }
                }
            }
        }
        reg
    }

    /// Model names in registry order.
    pub fn names(&self) -> &[String] {
        &self.order
    }

    pub fn spec(&self, name: &str) -> Option<&ModelSpec> {
        self.entries.get(name).map(|e| &e.spec)
    }

    /// The loaded model, if it is loaded (never loads).
    pub fn loaded(&self, name: &str) -> Option<Arc<dyn Model>> {
        match &*self.entries.get(name)?.slot.lock() {
            LoadState::Loaded(m) => Some(m.clone()),
            _ => None,
        }
    }

    /// Whether [`Registry::get`] would answer `name` without waiting for a
    /// load (never loads). Unknown names are settled (as errors).
    /// A load past its deadline is refused here (as a waiter would), so
    /// its fallback, if any, is what is asked about next.
    pub fn readiness(&self, name: &str) -> Readiness {
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
    pub fn start_loading(&self, name: &str) {
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
            let result = loader.load_spec(&spec);
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
    fn wait(&self, entry: &Entry) -> Result<Arc<dyn Model>, RegistryError> {
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

    fn load(&self, entry: &Entry) -> Result<Arc<dyn Model>, RegistryError> {
        self.start(entry);
        self.wait(entry)
    }
}

impl Loader {
    /// Reads the file once (hashing as it reads), checks the pin, parses
    /// those same bytes. Verify and Load rows must reach the audit store,
    /// or the model is not served.
    fn load_spec(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>, RegistryError> {
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

        let info = ModelInfo {
            name: spec.name.clone(),
            version,
            kind: spec.kind,
            sha256: sha.clone(),
            path: spec.path.clone(),
            features: spec.features.clone(),
            target: spec.target.clone(),
            task_type: spec.task_type,
            n_outputs: 1,
            n_classes: None,
            detail: String::new(),
            load_time: Default::default(),
        };
        let key = CacheKey {
            sha256: sha.clone(),
            kind: spec.kind,
            task_type: spec.task_type,
            n_features: spec.features.len(),
            onnx: spec.onnx.clone(),
            torch: spec.torch.clone(),
            missing: spec.missing,
        };
        let cached = self
            .by_checksum
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let model = match cached {
            Some(inner) => shared(inner, info, started),
            None => match load_file(spec, &bytes, info, started, &self.options.onnx) {
                Ok(m) => m,
                Err(e) => {
                    let err = fail(e.to_string());
                    self.audit(AuditEvent::Refuse, spec, None, &sha, err.to_string())
                        .ok(); // logged inside
                    return Err(err);
                }
            },
        };
        let i = model.info();
        if let (Some(max), Some(k)) = (
            spec.signal.as_ref().and_then(|r| r.max_class()),
            i.n_classes,
        ) {
            if max >= k {
                let err = fail(format!(
                    "field 'signal' maps class {max} but the model has {k} classes"
                ));
                self.audit(AuditEvent::Refuse, spec, None, &sha, err.to_string())
                    .ok(); // logged inside
                return Err(err);
            }
        }
        self.audit(
            AuditEvent::Load,
            spec,
            Some(&i.version),
            &sha,
            i.detail.clone(),
        )
        .map_err(|e| {
            fail(format!(
                "not loaded: the audit store refused the load row: {e}"
            ))
        })?;
        tracing::info!(model = %i.name, version = %i.version, kind = %i.kind, sha256 = %i.sha256, detail = %i.detail, "model loaded");
        self.by_checksum
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert_with(|| model.clone());
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
            path: spec.path.display().to_string(),
            sha256: sha.to_string(),
            detail,
        };
        store.record(event, &entry).map(|_| ()).map_err(|e| {
            tracing::error!(model = %spec.name, event = event.as_str(), error = %e, "audit write failed");
            e
        })
    }
}

fn entry_for(info: &ModelInfo) -> AuditEntry {
    AuditEntry {
        model: info.name.clone(),
        version: info.version.clone(),
        kind: info.kind.to_string(),
        path: info.path.display().to_string(),
        sha256: info.sha256.clone(),
        detail: String::new(),
    }
}

/// Serves an already loaded model under another entry's name and version.
fn shared(inner: Arc<dyn Model>, mut info: ModelInfo, started: Instant) -> Arc<dyn Model> {
    let src = inner.info();
    info.n_outputs = src.n_outputs;
    info.n_classes = src.n_classes;
    info.detail = format!("{} (shared with '{}')", src.detail, src.name);
    info.load_time = started.elapsed();
    Arc::new(Aliased { info, inner })
}

/// Parses a model file by kind and checks it against the registry entry.
fn load_file(
    spec: &ModelSpec,
    bytes: &[u8],
    info: ModelInfo,
    started: Instant,
    onnx_rt: &onnx::RuntimeConfig,
) -> Result<Arc<dyn Model>, ModelError> {
    let elapsed = || started.elapsed();
    Ok(match spec.kind {
        ModelKind::Lightgbm => {
            let text = std::str::from_utf8(bytes).map_err(|_| ModelError::Format {
                path: spec.path.clone(),
                format: "LightGBM",
                reason: "not UTF-8 text (is this a binary or pickled model?)".into(),
            })?;
            let mut m = tree_model(lightgbm::parse(text, &spec.path)?, info)?;
            m.info.load_time = elapsed();
            Arc::new(m)
        }
        ModelKind::Xgboost => {
            let mut m = tree_model(xgboost::parse(bytes, &spec.path)?, info)?;
            m.info.load_time = elapsed();
            Arc::new(m)
        }
        ModelKind::Onnx => {
            let mut m = onnx::OnnxModel::load(spec, bytes, info, onnx_rt)?;
            m.info.load_time = elapsed();
            Arc::new(m)
        }
        ModelKind::Pickle => {
            let mut m = crate::model::pickle::load(spec, bytes, info)?;
            m.info.load_time = elapsed();
            Arc::new(m)
        }
        #[cfg(feature = "torch")]
        ModelKind::Torch => {
            let mut m = crate::model::torch::host::HostedTorch::load(spec, bytes, info)?;
            m.info.load_time = elapsed();
            Arc::new(m)
        }
        #[cfg(not(feature = "torch"))]
        ModelKind::Torch => {
            return Err(ModelError::Unsupported(
                "kind 'torch' needs ml-worker built with the `torch` feature (`make build`, or \
                 `cargo build --release --features torch` after `make libtorch`); or export the model to ONNX"
                    .into(),
            ))
        }
    })
}

pub(crate) fn tree_model(
    parsed: ParsedTrees,
    mut info: ModelInfo,
) -> Result<TreeModel, ModelError> {
    let ens = parsed.ensemble;
    if info.features.len() != ens.n_features {
        return Err(ModelError::Input(format!(
            "field 'features' lists {} features but the model file has {}",
            info.features.len(),
            ens.n_features
        )));
    }
    let generic = |n: &str| {
        n.starts_with("Column_")
            || (n.starts_with('f') && n[1..].parse::<u32>().is_ok())
            || n.is_empty()
    };
    if parsed
        .feature_names
        .iter()
        .zip(&info.features)
        .any(|(a, b)| a != b && !generic(a))
    {
        tracing::warn!(model = %info.name, file_features = ?parsed.feature_names, "feature names in the model file differ from 'features' (order is taken from 'features')");
    }
    match (info.task_type, parsed.n_classes) {
        (TaskType::Classification, None) => {
            return Err(ModelError::Input(format!(
                "field 'task_type' is classification but objective '{}' is not a classification objective",
                parsed.objective
            )))
        }
        (TaskType::Classification, Some(k)) => {
            info.n_classes = Some(k);
            info.n_outputs = 1;
        }
        (TaskType::Regression, _) => info.n_outputs = ens.n_groups,
    }
    info.detail = format!(
        "{} {}, {} trees",
        info.kind,
        parsed.objective,
        ens.n_trees()
    );
    Ok(TreeModel {
        info,
        ensemble: ens,
    })
}
