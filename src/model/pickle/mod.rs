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

use super::{Batch, Model, ModelError, ModelInfo, Prediction};
use crate::config::{MissingPolicy, ModelSpec};
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
    pub info: ModelInfo,
    pub steps: Vec<Scaler>,
    pub inner: Box<dyn Model>,
    allow_nan: bool,
}

impl Model for PickleModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn predict_full(&self, batch: Batch<'_>) -> Result<Prediction, ModelError> {
        super::check_input(&batch, &self.info, self.allow_nan)?;
        if self.steps.is_empty() {
            return self.inner.predict_full(batch);
        }
        let n = batch.n_features();
        let mut data = batch.data().to_vec();
        for s in &self.steps {
            s.apply(&mut data, n);
        }
        self.inner.predict_full(Batch::new(&data, n)?)
    }

    fn feature_importance(&self, kind: super::ImportanceType) -> Option<Vec<f64>> {
        self.inner.feature_importance(kind)
    }
}

/// Loads a pickle outside any registry, as a model of `n_features` features
/// named `f0`, `f1`, ... (the fuzzer, the property tests, tools that inspect
/// a file).
pub fn load_unregistered(
    bytes: &[u8],
    n_features: usize,
    task_type: super::TaskType,
    missing: MissingPolicy,
) -> Result<PickleModel, ModelError> {
    let features: Vec<String> = (0..n_features).map(|i| format!("f{i}")).collect();
    let spec = ModelSpec {
        name: "unregistered".into(),
        path: "unregistered.pkl".into(),
        kind: super::ModelKind::Pickle,
        features: features.clone(),
        target: "y".into(),
        task_type,
        version: None,
        sha256: None,
        lazy: false,
        fallback: None,
        description: None,
        onnx: Default::default(),
        torch: Default::default(),
        signal: None,
        missing,
        limits: Default::default(),
    };
    let info = ModelInfo {
        name: spec.name.clone(),
        version: String::new(),
        kind: spec.kind,
        sha256: String::new(),
        path: spec.path.clone(),
        features,
        target: spec.target.clone(),
        task_type,
        n_outputs: 1,
        n_classes: None,
        detail: String::new(),
        load_time: Default::default(),
    };
    load(&spec, bytes, info)
}

/// Reads a pickle file and converts what it holds, per the allowlist.
pub fn load(
    spec: &ModelSpec,
    bytes: &[u8],
    mut info: ModelInfo,
) -> Result<PickleModel, ModelError> {
    let format_err = |reason: String| ModelError::Format {
        path: spec.path.clone(),
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
            spec.path.display(),
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
            spec.path.display(),
            if unknown.len() == 1 {
                "a global"
            } else {
                "globals"
            },
            unknown.join(", ")
        )));
    }
    let converted = convert::convert(&graph, spec, &info).map_err(format_err)?;
    if converted.n_features != spec.features.len() {
        return Err(ModelError::Input(format!(
            "field 'features' lists {} features but the pickled model has {}",
            spec.features.len(),
            converted.n_features
        )));
    }
    let task_ok = matches!(
        (spec.task_type, converted.classifier),
        (super::TaskType::Classification, true) | (super::TaskType::Regression, false)
    );
    if !task_ok {
        return Err(ModelError::Input(format!(
            "task_type is {} but the pickle holds a {}",
            spec.task_type,
            if converted.classifier {
                "classifier"
            } else {
                "regressor"
            }
        )));
    }
    let inner_info = converted.inner.info();
    info.n_outputs = inner_info.n_outputs;
    info.n_classes = inner_info.n_classes;
    info.detail = format!("pickle {} -> {}", converted.class, converted.native);
    Ok(PickleModel {
        info,
        steps: converted.steps,
        inner: converted.inner,
        allow_nan: spec.missing == MissingPolicy::Nan,
    })
}
