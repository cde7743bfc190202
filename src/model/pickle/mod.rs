//! Pickle model files, read without executing anything.
//!
//! [`reader`] turns the opcodes into a graph of data; the allowlist in
//! [`convert`] recognises the model classes it knows (LightGBM and XGBoost
//! boosters and their scikit-learn wrappers, scikit-learn linear models,
//! trees, forests, gradient boosting, and pipelines of scalers) and rebuilds
//! them as native models: the same tree evaluator and linear-model code the
//! other formats use. Anything else is refused naming what it references;
//! globals that could run code (`os.system`, `subprocess`, `builtins.eval`,
//! ...) are named as dangerous. Nothing a file names is ever imported or
//! called.

pub mod convert;
pub mod numpy;
pub mod reader;

use std::path::Path;

use super::loader::{LoadContext, Loaded, ModelLoader};
use super::{Batch, Model, ModelError, Prediction};
use crate::model::linear::Scaler;

/// Modules and names whose mere presence makes a pickle hostile: importing
/// or calling them runs code, touches files or processes, or loads more code.
const DANGEROUS_MODULES: &[&str] = &[
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "shutil",
    "socket",
    "importlib",
    "marshal",
    "pickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "runpy",
    "code",
    "codeop",
    "ctypes",
    "pty",
    "platform",
    "webbrowser",
    "multiprocessing",
    "threading",
    "asyncio",
    "pathlib",
    "tempfile",
    "io",
    "urllib",
    "http",
    "ftplib",
    "smtplib",
    "telnetlib",
    "types",
    "inspect",
    "operator",
    "functools",
    "pip",
    "setuptools",
];

/// `builtins` names that evaluate, import, open or reach into objects.
const DANGEROUS_BUILTINS: &[&str] = &[
    "eval",
    "exec",
    "compile",
    "open",
    "__import__",
    "getattr",
    "setattr",
    "delattr",
    "globals",
    "locals",
    "vars",
    "input",
    "breakpoint",
    "help",
    "memoryview",
    "type",
    "object",
    "super",
    "classmethod",
    "staticmethod",
    "property",
    "apply",
    "execfile",
    "file",
    "reload",
];

/// Whether `module.name` is a global that could run code if resolved.
pub fn is_dangerous(module: &str, name: &str) -> bool {
    let top = module.split('.').next().unwrap_or(module);
    let builtin = matches!(module, "builtins" | "__builtin__" | "__builtins__");
    (builtin && DANGEROUS_BUILTINS.contains(&name))
        || DANGEROUS_MODULES.contains(&top)
        || DANGEROUS_MODULES.contains(&module)
}

/// A model rebuilt from a pickle: optional scalers, then a native model.
pub struct PickleModel {
    pub steps: Vec<Scaler>,
    pub inner: Box<dyn Model>,
}

impl Model for PickleModel {
    fn predict(&self, batch: Batch<'_>) -> Result<Prediction, ModelError> {
        if self.steps.is_empty() {
            return self.inner.predict(batch);
        }
        let n = batch.n_features();
        let mut data = batch.data().to_vec();
        for s in &self.steps {
            s.apply(&mut data, n);
        }
        self.inner.predict(Batch::new(&data, n)?)
    }

    fn feature_importance(&self, kind: super::ImportanceType) -> Option<Vec<f64>> {
        self.inner.feature_importance(kind)
    }

    fn n_trees(&self) -> Option<usize> {
        self.inner.n_trees()
    }
}

/// `kind: pickle`: scikit-learn, LightGBM and XGBoost pickles, read as data
/// (never run) and rebuilt as native models.
pub struct Loader;

impl ModelLoader for Loader {
    fn kind(&self) -> &str {
        "pickle"
    }

    fn load(&self, bytes: &[u8], ctx: &LoadContext<'_>) -> Result<Loaded, ModelError> {
        load(ctx, bytes)
    }
}

/// Loads a pickle outside any registry, as a model of `n_features` features
/// named `f0`, `f1`, ... (the fuzzer, the property tests, tools that inspect
/// a file).
pub fn load_unregistered(
    bytes: &[u8],
    n_features: usize,
    task_type: super::TaskType,
) -> Result<Loaded, ModelError> {
    let features: Vec<String> = (0..n_features).map(|i| format!("f{i}")).collect();
    let ctx = LoadContext {
        name: "unregistered",
        path: Path::new("unregistered.pkl"),
        features: &features,
        task_type,
        max_bytes: u64::MAX,
        options: &Default::default(),
    };
    load(&ctx, bytes)
}

/// Reads a pickle file and converts what it holds, per the allowlist.
pub fn load(ctx: &LoadContext<'_>, bytes: &[u8]) -> Result<Loaded, ModelError> {
    let format_err = |reason: String| ModelError::Format {
        path: ctx.path.to_path_buf(),
        format: "pickle",
        reason,
    };
    let graph = reader::read(bytes).map_err(|e| format_err(e.to_string()))?;
    let dangerous: Vec<String> = graph
        .globals
        .iter()
        .filter(|(m, n)| is_dangerous(m, n))
        .map(|(m, n)| format!("{m}.{n}"))
        .collect();
    if !dangerous.is_empty() {
        return Err(ModelError::Unsupported(format!(
            "{}: refused: the pickle references {} that could run code if loaded by Python: {} \
             (nothing was run; ml-worker never executes pickles)",
            ctx.path.display(),
            if dangerous.len() == 1 {
                "a global"
            } else {
                "globals"
            },
            dangerous.join(", ")
        )));
    }
    let unknown: Vec<String> = graph
        .globals
        .iter()
        .filter(|(m, n)| !convert::is_allowed(m, n))
        .map(|(m, n)| format!("{m}.{n}"))
        .collect();
    if !unknown.is_empty() {
        return Err(ModelError::Unsupported(format!(
            "{}: unsupported pickle: it references {} outside the allowlist of model classes: {}; \
             convert the model to ONNX (skl2onnx, onnxmltools) or its native format \
             (LightGBM Booster.save_model, XGBoost save_model to .json/.ubj)",
            ctx.path.display(),
            if unknown.len() == 1 {
                "a global"
            } else {
                "globals"
            },
            unknown.join(", ")
        )));
    }
    let converted = convert::convert(&graph, ctx.path).map_err(format_err)?;
    if converted.n_features != ctx.features.len() {
        return Err(ModelError::Input(format!(
            "field 'features' lists {} features but the pickled model has {}",
            ctx.features.len(),
            converted.n_features
        )));
    }
    let task_ok = matches!(
        (ctx.task_type, converted.classifier),
        (super::TaskType::Classification, true) | (super::TaskType::Regression, false)
    );
    if !task_ok {
        return Err(ModelError::Input(format!(
            "task_type is {} but the pickle holds a {}",
            ctx.task_type,
            if converted.classifier {
                "classifier"
            } else {
                "regressor"
            }
        )));
    }
    Ok(Loaded {
        detail: format!("pickle {} -> {}", converted.class, converted.native),
        n_outputs: converted.n_outputs,
        n_classes: converted.n_classes,
        handles_missing: converted.handles_missing,
        model: std::sync::Arc::new(PickleModel {
            steps: converted.steps,
            inner: converted.inner,
        }),
    })
}
