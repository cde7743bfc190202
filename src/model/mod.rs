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
//! | `onnx`     | [`onnx`]                 | ONNX Runtime (loaded dynamically)  |
//! | `torch`    | `torch` TorchScript      | libtorch via tch (`torch` feature) |
//! | `pickle`   | [`pickle`] (never run)   | native trees / [`linear`] models   |
//!
//! Inference is synchronous and batch-shaped; callers on an async runtime run
//! it on a dedicated thread.

pub mod lightgbm;
pub mod linear;
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

/// The file format of a registered model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Lightgbm,
    Xgboost,
    Onnx,
    Pickle,
    Torch,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Lightgbm => "lightgbm",
            ModelKind::Xgboost => "xgboost",
            ModelKind::Onnx => "onnx",
            ModelKind::Pickle => "pickle",
            ModelKind::Torch => "torch",
        })
    }
}

/// Everything known about a loaded model, for logs, the audit store and the CLI.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub kind: ModelKind,
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

/// The one model interface every format implements.
pub trait Model: Send + Sync {
    /// Name, version, checksum and shape of the model.
    fn info(&self) -> &ModelInfo;

    /// One output per row: the value(s) for regression, the class index for
    /// classification.
    fn predict(&self, batch: Batch<'_>) -> Result<Output, ModelError> {
        Ok(self.predict_full(batch)?.values)
    }

    /// Per-class probabilities (classification models only).
    fn predict_proba(&self, batch: Batch<'_>) -> Result<Output, ModelError> {
        self.predict_full(batch)?.probabilities.ok_or_else(|| {
            ModelError::Unsupported(format!(
                "model '{}' is a {} model and has no class probabilities",
                self.info().name,
                self.info().task_type
            ))
        })
    }

    /// Values and probabilities from one pass over the batch.
    fn predict_full(&self, batch: Batch<'_>) -> Result<Prediction, ModelError>;

    /// Per-feature importance, in `features` order, where the format records it.
    fn feature_importance(&self, _kind: ImportanceType) -> Option<Vec<f64>> {
        None
    }
}

/// Checks a batch against a model's registered features: the feature count,
/// and, unless `allow_nan` (`missing: nan`), an error naming the first NaN
/// (missing) feature, for models that would otherwise take NaN silently.
pub fn check_input(batch: &Batch<'_>, info: &ModelInfo, allow_nan: bool) -> Result<(), ModelError> {
    batch.expect_features(info.features.len())?;
    if allow_nan {
        return Ok(());
    }
    match batch.data().iter().position(|v| v.is_nan()) {
        None => Ok(()),
        Some(i) => {
            let (row, col) = (i / batch.n_features(), i % batch.n_features());
            Err(ModelError::Input(format!(
                "feature '{}' is missing or NaN in row {row}; model '{}' does not accept missing values (missing: reject)",
                info.features.get(col).map_or("?", String::as_str),
                info.name
            )))
        }
    }
}

/// Serves a loaded model under another registry entry's name, so that two
/// entries pointing at the same file share one loaded copy.
pub struct Aliased {
    pub info: ModelInfo,
    pub inner: std::sync::Arc<dyn Model>,
}

impl Model for Aliased {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn predict_full(&self, batch: Batch<'_>) -> Result<Prediction, ModelError> {
        self.inner.predict_full(batch)
    }
    fn feature_importance(&self, kind: ImportanceType) -> Option<Vec<f64>> {
        self.inner.feature_importance(kind)
    }
}
