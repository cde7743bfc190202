//! Model kinds as plug-ins: one [`ModelLoader`] per `kind` of `models.yaml`.
//!
//! A loader says which `kind` it serves, parses and validates its own
//! options block (the entry's key named after the kind, e.g. `onnx:`), and
//! turns the verified bytes of a model file into a [`Model`] plus what the
//! registry needs to know of it ([`Loaded`]). The registry does everything
//! around that once, for every kind: reading the file within its size
//! limit, the SHA256 and its pin, the audit rows, the load deadline,
//! caching by checksum, fallbacks, the missing-value policy, and building
//! [`super::ModelInfo`].
//!
//! The built-in kinds are registered in [`super::kinds::builtin`], one line each;
//! a program built on the library adds its own with
//! [`crate::registry::RegistryBuilder::with_loader`] (see
//! `examples/custom_model.rs`).

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::{Model, ModelError, TaskType};

/// What a loader made of a model file.
#[derive(Clone)]
pub struct Loaded {
    pub model: Arc<dyn Model>,
    /// Values per row in [`super::Prediction::values`]: 1 for classifiers
    /// (the class index) and single-target regression.
    pub n_outputs: usize,
    /// Classes (the width of the probabilities) for classifiers; `None`
    /// for regression.
    pub n_classes: Option<usize>,
    /// One line on the loaded form, for logs, the audit store and `models info`.
    pub detail: String,
    /// Whether the model itself decides what a NaN feature means (trees that
    /// recorded a direction for missing values). The entry's missing-value
    /// policy defaults to `nan` when it does and `reject` when it does not
    /// (linear models, networks).
    pub handles_missing: bool,
}

/// What a loader knows of the entry while it parses its options.
#[derive(Debug, Clone, Copy)]
pub struct EntryHead<'a> {
    pub name: &'a str,
    pub task_type: TaskType,
    pub features: &'a [String],
}

/// A kind's options block as written in `models.yaml` (the entry's key
/// named after its kind).
#[derive(Debug, Clone)]
pub struct OptionsBlock {
    value: serde_norway::Value,
}

impl OptionsBlock {
    pub(crate) fn new(value: serde_norway::Value) -> OptionsBlock {
        OptionsBlock { value }
    }

    /// The block as `T` (use `#[serde(deny_unknown_fields)]` on `T` so a
    /// misspelt option is an error); the error names what was wrong.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_norway::from_value(self.value.clone()).map_err(|e| e.to_string())
    }
}

/// A kind's parsed options, handed back to its loader at load time
/// ([`LoadContext::options`]). Two entries share a loaded model only when
/// their blocks are written the same.
#[derive(Clone)]
pub struct KindOptions {
    value: Arc<dyn Any + Send + Sync>,
    /// The block as written (canonical YAML), for equality and caching.
    key: String,
}

impl KindOptions {
    /// Options of type `T`, as the kind's loader parsed them. Until the
    /// registry file sets its key (the block as written), options made
    /// this way equal only their own clones: two entries given options by
    /// a program never share a loaded model by mistake.
    pub fn new<T: Any + Send + Sync>(value: T) -> KindOptions {
        static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        KindOptions {
            value: Arc::new(value),
            key: format!("\0options #{n}"),
        }
    }

    /// No options (the kind takes none, or the block was absent): equal to
    /// every other `none()`.
    pub fn none() -> KindOptions {
        KindOptions {
            value: Arc::new(()),
            key: String::new(),
        }
    }

    /// The options as the loader stored them; `None` if they are another type.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.value.downcast_ref()
    }

    pub(crate) fn with_key(mut self, key: String) -> KindOptions {
        self.key = key;
        self
    }

    /// The block as written (empty when absent).
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Default for KindOptions {
    fn default() -> Self {
        KindOptions::none()
    }
}

impl PartialEq for KindOptions {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl fmt::Debug for KindOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KindOptions({:?})", self.key)
    }
}

/// Everything a loader gets besides the file's bytes.
#[derive(Debug, Clone, Copy)]
pub struct LoadContext<'a> {
    /// The registry entry's name (for messages).
    pub name: &'a str,
    /// The model file (for messages, and for formats whose file names
    /// others beside it, such as ONNX external data).
    pub path: &'a Path,
    /// The entry's features, in the order rows carry them.
    pub features: &'a [String],
    pub task_type: TaskType,
    /// The entry's file size limit (`limits.max_model_mb`), for formats
    /// that read more than the one file.
    pub max_bytes: u64,
    pub options: &'a KindOptions,
}

impl LoadContext<'_> {
    /// The options the kind's loader parsed for this entry.
    pub fn options<T: Any>(&self) -> Option<&T> {
        self.options.get()
    }

    /// A [`ModelError::Format`] for this entry's file.
    pub fn format_error(&self, format: &'static str, reason: impl Into<String>) -> ModelError {
        ModelError::Format {
            path: self.path.to_path_buf(),
            format,
            reason: reason.into(),
        }
    }
}

/// Reads the model files of one `kind`.
///
/// A loader runs on a thread of its own under the entry's load deadline,
/// on bytes whose SHA256 was already verified; it must not run anything
/// of the file it has not checked, and must fail (never panic) on a
/// hostile file.
pub trait ModelLoader: Send + Sync {
    /// The `kind` it serves in `models.yaml` (lower case, e.g. `lightgbm`).
    fn kind(&self) -> &str;

    /// Parses and validates the entry's options block (absent: `None`).
    /// The error is reported as the entry's field named after the kind.
    /// By default a kind takes no options.
    fn parse_options(
        &self,
        block: Option<&OptionsBlock>,
        entry: &EntryHead<'_>,
    ) -> Result<KindOptions, String> {
        let _ = entry;
        match block {
            None => Ok(KindOptions::none()),
            Some(_) => Err(format!("kind '{}' takes no options", self.kind())),
        }
    }

    /// Makes a model of the verified file `bytes`.
    fn load(&self, bytes: &[u8], ctx: &LoadContext<'_>) -> Result<Loaded, ModelError>;

    /// Whether `load` already ran the model on a row (a warm-up that fixes
    /// its output shape). If not, the registry runs one row of zeros
    /// through the model as it will be served before serving it.
    fn warms_up(&self) -> bool {
        false
    }
}

/// The loaders a registry reads models with, by kind.
#[derive(Clone)]
pub struct Loaders {
    by_kind: BTreeMap<String, Arc<dyn ModelLoader>>,
}

impl Loaders {
    /// No kinds at all.
    pub fn empty() -> Loaders {
        Loaders {
            by_kind: BTreeMap::new(),
        }
    }

    /// Adds `loader`, replacing the loader of the same kind if there is one.
    pub fn with(mut self, loader: impl ModelLoader + 'static) -> Loaders {
        self.add(Arc::new(loader));
        self
    }

    /// Adds `loader`, replacing the loader of the same kind if there is one.
    pub fn add(&mut self, loader: Arc<dyn ModelLoader>) {
        self.by_kind.insert(loader.kind().to_string(), loader);
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn ModelLoader>> {
        self.by_kind.get(kind)
    }

    /// The kinds, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        self.by_kind.keys().map(String::as_str).collect()
    }
}

impl fmt::Debug for Loaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.by_kind.keys()).finish()
    }
}
