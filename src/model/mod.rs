//! The model interface: one trait, one file per format beside it.
//!
//! A [`Model`] takes a [`Batch`] of rows (row-major `f64`, features in the
//! order of the registry's `features` list, NaN for missing) and returns one
//! output per row. Formats:
//!
//! | kind       | file                     | evaluator                          |
//! |------------|--------------------------|------------------------------------|
//! | `lightgbm` | [`lightgbm`] text model  | native, [`tree::TreeEnsemble`]     |
//! | `xgboost`  | [`xgboost`] JSON / UBJSON| native, [`tree::TreeEnsemble`]     |
//! | `catboost` | [`catboost`] JSON        | native, [`tree::TreeEnsemble`]     |
//! | `onnx`     | [`onnx`]                 | ONNX Runtime (loaded dynamically)  |
//! | `torch`    | `torch` TorchScript      | libtorch via tch (`torch` feature) |
//! | `pickle`   | [`pickle`] (never run)   | native trees / [`linear`] models   |
//!
//! Inference is synchronous and batch-shaped; callers on an async runtime run
//! it on a dedicated thread.

pub mod catboost;
pub mod kinds;
pub mod lightgbm;
pub mod linear;
pub mod loader;
pub mod onnx;
pub mod pickle;
#[cfg(feature = "torch")]
pub mod torch;
pub mod tree;
pub mod ubjson;
pub mod xgboost;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use loader::{EntryHead, KindOptions, LoadContext, Loaded, Loaders, ModelLoader, OptionsBlock};

/// Most features a model may list.
pub const MAX_FEATURES: usize = 1_000_000;

/// The `torch` kind: TorchScript through libtorch, in a process of its own.
#[cfg(feature = "torch")]
fn torch_loader() -> torch::Loader {
    torch::Loader
}

/// The `torch` kind in a build without libtorch: every model of it is
/// refused, naming the feature, while the other kinds serve.
#[cfg(not(feature = "torch"))]
fn torch_loader() -> TorchUnavailable {
    TorchUnavailable
}

#[cfg(not(feature = "torch"))]
struct TorchUnavailable;

#[cfg(not(feature = "torch"))]
impl ModelLoader for TorchUnavailable {
    fn kind(&self) -> &str {
        "torch"
    }

    fn parse_options(
        &self,
        _block: Option<&OptionsBlock>,
        _entry: &EntryHead<'_>,
    ) -> Result<KindOptions, String> {
        Ok(KindOptions::none())
    }

    fn load(&self, _bytes: &[u8], _ctx: &LoadContext<'_>) -> Result<Loaded, ModelError> {
        Err(ModelError::Unsupported(
            "kind 'torch' needs ml-worker built with the `torch` feature (`make build`, or \
             `cargo build --release --features torch` after `make libtorch`); or export the model to ONNX"
                .into(),
        ))
    }
}

/// What a model is trained to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskType {
    Regression,
    Classification,
}

impl fmt::Display for TaskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskType::Regression => "regression",
            TaskType::Classification => "classification",
        })
    }
}

/// How absent or NaN features are treated: set per model in `models.yaml`
/// (`missing:`), or, by default, what the loaded model can do
/// ([`Loaded::handles_missing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingPolicy {
    /// Absent features become NaN (the model's own missing-value handling).
    Nan,
    /// The row is refused (a dead letter in the worker) naming the feature.
    Reject,
}

impl fmt::Display for MissingPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MissingPolicy::Nan => "nan",
            MissingPolicy::Reject => "reject",
        })
    }
}

/// Everything known about a loaded model, for logs, the audit store and the CLI.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    /// The `kind` of its registry entry (the loader that read it).
    pub kind: String,
    pub sha256: String,
    pub path: PathBuf,
    pub features: Vec<String>,
    pub target: String,
    pub task_type: TaskType,
    /// Values per row from [`Model::predict`] (1 for classification and
    /// single-target regression).
    pub n_outputs: usize,
    /// Number of classes for classification models.
    pub n_classes: Option<usize>,
    /// A one-line description of the loaded form, e.g. "lightgbm binary, 50 trees".
    pub detail: String,
    /// What happens to a row with an absent or NaN feature (the entry's
    /// `missing:`, else what the model can do).
    pub missing: MissingPolicy,
    #[serde(serialize_with = "ser_duration_us")]
    pub load_time: Duration,
}

fn ser_duration_us<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_micros() as u64)
}

/// A borrowed batch of rows: `data.len() == n_rows * n_features`, row-major.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    data: &'a [f64],
    n_features: usize,
}

impl<'a> Batch<'a> {
    pub fn new(data: &'a [f64], n_features: usize) -> Result<Self, ModelError> {
        if n_features == 0 || !data.len().is_multiple_of(n_features) {
            return Err(ModelError::Input(format!(
                "batch of {} values is not a whole number of rows of {} features",
                data.len(),
                n_features
            )));
        }
        Ok(Batch { data, n_features })
    }

    pub fn n_rows(&self) -> usize {
        self.data.len() / self.n_features
    }

    pub fn n_features(&self) -> usize {
        self.n_features
    }

    pub fn data(&self) -> &'a [f64] {
        self.data
    }

    pub fn row(&self, i: usize) -> &'a [f64] {
        &self.data[i * self.n_features..(i + 1) * self.n_features]
    }

    /// Fails unless the batch has exactly the model's feature count.
    pub fn expect_features(&self, n: usize) -> Result<(), ModelError> {
        if self.n_features != n {
            return Err(ModelError::Input(format!(
                "model expects {n} features per row, got {}",
                self.n_features
            )));
        }
        Ok(())
    }
}

/// A row-major matrix of outputs: `n_rows * width` values.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub values: Vec<f64>,
    pub width: usize,
}

impl Output {
    pub fn n_rows(&self) -> usize {
        self.values.len().checked_div(self.width).unwrap_or(0)
    }

    pub fn row(&self, i: usize) -> &[f64] {
        &self.values[i * self.width..(i + 1) * self.width]
    }

    /// Index of the largest value in each row (first one on ties, as numpy's argmax).
    pub fn argmax(&self) -> Output {
        let values = self
            .values
            .chunks(self.width.max(1))
            .map(|r| {
                let mut best = 0;
                for (j, v) in r.iter().enumerate() {
                    if *v > r[best] {
                        best = j;
                    }
                }
                best as f64
            })
            .collect();
        Output { values, width: 1 }
    }
}

/// Predictions for a batch: the per-row value(s) and, for classifiers, the
/// per-class probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Regression: the predicted value(s). Classification: the class index.
    pub values: Output,
    pub probabilities: Option<Output>,
}

impl Prediction {
    /// The prediction for no rows, in the model's shape.
    pub fn empty(info: &ModelInfo) -> Prediction {
        Prediction {
            values: Output {
                values: Vec::new(),
                width: info.n_outputs,
            },
            probabilities: info.n_classes.map(|k| Output {
                values: Vec::new(),
                width: k,
            }),
        }
    }

    /// Why row `r` cannot be served, if it cannot: a value or a probability
    /// that is NaN or infinite. Such a row is an error (a dead letter in the
    /// worker), never a class or a number: the argmax of NaN scores would
    /// otherwise read as a confident class 0.
    pub fn row_problem(&self, r: usize) -> Option<String> {
        let bad = |o: &Output| o.row(r).iter().copied().find(|v| !v.is_finite());
        if let Some(p) = self.probabilities.as_ref().and_then(bad) {
            return Some(format!("the model returned a non-finite probability ({p})"));
        }
        bad(&self.values).map(|v| format!("the model returned a non-finite value ({v})"))
    }
}

/// Which feature importance to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportanceType {
    /// Number of splits that use the feature.
    Split,
    /// Total loss reduction of those splits.
    Gain,
}

/// Errors from loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: not a valid {format} model: {reason}")]
    Format {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("inference failed: {0}")]
    Runtime(String),
}

/// What every model format implements: rows in, one prediction per row out.
///
/// A model never sees rows of the wrong width, nor, under
/// [`MissingPolicy::Reject`], rows with NaN: [`ServedModel`] checks them,
/// and checks that the answer has one row per input row in the shape the
/// loader announced ([`Loaded`]), so a model's mistake is an error, never a
/// panic or a misread output.
pub trait Model: Send + Sync {
    /// Values (regression: the predicted value(s); classification: the
    /// class index) and, for classifiers, per-class probabilities.
    fn predict(&self, batch: Batch<'_>) -> Result<Prediction, ModelError>;

    /// Per-feature importance, in `features` order, where the format records it.
    fn feature_importance(&self, _kind: ImportanceType) -> Option<Vec<f64>> {
        None
    }

    /// The number of trees, for tree ensembles.
    fn n_trees(&self) -> Option<usize> {
        None
    }
}

/// A loaded model as the registry serves it: what it is ([`ModelInfo`],
/// built once by the registry) and the format's [`Model`].
pub struct ServedModel {
    info: ModelInfo,
    model: std::sync::Arc<dyn Model>,
}

impl ServedModel {
    pub fn new(info: ModelInfo, model: std::sync::Arc<dyn Model>) -> ServedModel {
        ServedModel { info, model }
    }

    /// Name, version, checksum and shape of the model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The number of trees, for tree ensembles (as the model file counts them).
    pub fn n_trees(&self) -> Option<usize> {
        self.model.n_trees()
    }

    /// Why `row` cannot be served under this model's missing-value policy
    /// (the first absent or NaN feature), if it cannot. The one place the
    /// policy is decided: the worker, `predict` and [`ServedModel::predict_full`]
    /// all ask here.
    pub fn missing_problem(&self, row: &[f64]) -> Option<String> {
        if self.info.missing == MissingPolicy::Nan {
            return None;
        }
        let col = row.iter().position(|v| v.is_nan())?;
        Some(missing_reason(
            self.info.features.get(col).map_or("?", String::as_str),
            "missing or NaN",
            &self.info.name,
        ))
    }

    /// Values and probabilities from one pass over the batch. Fails on a
    /// batch of the wrong width, on a row the missing-value policy refuses
    /// (callers that serve rows one by one check [`ServedModel::missing_problem`]
    /// first), and on an answer in the wrong shape.
    pub fn predict_full(&self, batch: Batch<'_>) -> Result<Prediction, ModelError> {
        batch.expect_features(self.info.features.len())?;
        if self.info.missing == MissingPolicy::Reject {
            if let Some(i) = batch.data().iter().position(|v| v.is_nan()) {
                let row = i / batch.n_features();
                let why = self.missing_problem(batch.row(row)).unwrap_or_default();
                return Err(ModelError::Input(format!("row {row}: {why}")));
            }
        }
        if batch.n_rows() == 0 {
            return Ok(Prediction::empty(&self.info));
        }
        let p = self.model.predict(batch)?;
        self.check_shape(&p, batch.n_rows())?;
        Ok(p)
    }

    /// One output per row: the value(s) for regression, the class index for
    /// classification.
    pub fn predict(&self, batch: Batch<'_>) -> Result<Output, ModelError> {
        Ok(self.predict_full(batch)?.values)
    }

    /// Per-class probabilities (classification models only).
    pub fn predict_proba(&self, batch: Batch<'_>) -> Result<Output, ModelError> {
        self.predict_full(batch)?.probabilities.ok_or_else(|| {
            ModelError::Unsupported(format!(
                "model '{}' is a {} model and has no class probabilities",
                self.info.name, self.info.task_type
            ))
        })
    }

    /// Per-feature importance, in `features` order, where the format records
    /// it (one value per feature, or nothing).
    pub fn feature_importance(&self, kind: ImportanceType) -> Option<Vec<f64>> {
        self.model
            .feature_importance(kind)
            .filter(|v| v.len() == self.info.features.len())
    }

    fn check_shape(&self, p: &Prediction, rows: usize) -> Result<(), ModelError> {
        let bad = |what: String| {
            Err(ModelError::Runtime(format!(
                "model '{}' answered {what}",
                self.info.name
            )))
        };
        let v = &p.values;
        if v.width != self.info.n_outputs || v.values.len() != rows * v.width {
            return bad(format!(
                "{} values of width {} for {rows} rows (expected width {})",
                v.values.len(),
                v.width,
                self.info.n_outputs
            ));
        }
        if let Some(k) = self.info.n_classes {
            // a class index, in range (as many classes as probabilities)
            if let Some(c) = v
                .values
                .iter()
                // (a non-finite one is its row's problem: `row_problem`)
                .find(|c| c.is_finite() && !(c.fract() == 0.0 && **c >= 0.0 && **c < k as f64))
            {
                return bad(format!(
                    "class {c}, not one of its {k} classes (0 to {})",
                    k - 1
                ));
            }
        }
        match (&p.probabilities, self.info.n_classes) {
            (None, None) => Ok(()),
            (Some(pr), Some(k)) if pr.width == k && pr.values.len() == rows * k => Ok(()),
            (Some(pr), _) => bad(format!(
                "{} probabilities of width {} for {rows} rows (expected {:?} classes)",
                pr.values.len(),
                pr.width,
                self.info.n_classes
            )),
            (None, Some(k)) => bad(format!("no probabilities (expected {k} classes)")),
        }
    }
}

/// Why a row is refused under `missing: reject`: feature `feature` is
/// `what` ("missing", "NaN"). One wording wherever the policy is applied.
pub fn missing_reason(feature: &str, what: &str, model: &str) -> String {
    format!(
        "feature '{}' is {what}; model '{}' does not accept missing values (missing: reject)",
        crate::text::escape(feature),
        crate::text::escape(model)
    )
}

impl fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServedModel")
            .field("info", &self.info)
            .finish()
    }
}
