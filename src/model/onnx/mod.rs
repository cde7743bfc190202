//! ONNX models through ONNX Runtime, loaded dynamically (`ort` with
//! `load-dynamic`): the library comes from the PyPI `onnxruntime` wheel
//! (`scripts/fetch-onnxruntime.sh`) and is found without exporting anything.
//!
//! Library search order: `ORT_DYLIB_PATH`; the `--onnxruntime` setting;
//! `.cache/onnxruntime/libonnxruntime.so` under the working directory or any
//! ancestor of the executable's folder; `lib/` beside the executable;
//! `/usr/local/lib`, `/usr/lib`. When none is found, ONNX models fail to load
//! with an error saying how to get it; other kinds are unaffected.
//!
//! Runs ONNX-ML classifiers and regressors (skl2onnx/onnxmltools: `label` +
//! `probabilities`, or a ZipMap sequence of maps) and plain tensor-in,
//! tensor-out networks. Outputs are picked by type and shape; `models.yaml`
//! can name them (`onnx: {input, prediction, probabilities}`).

pub mod external;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session};
use ort::value::{DynMapValueType, DynValue, Tensor, TensorElementType, ValueType};

use super::loader::{EntryHead, KindOptions, LoadContext, Loaded, ModelLoader, OptionsBlock};
use super::{Batch, Model, ModelError, Output, Prediction, TaskType};

/// `onnx:` in a registry entry: which graph input and outputs to use, when
/// ambiguous. By default the single float input is used, `probabilities` is
/// the float output of shape `[N, classes]` (or a ZipMap sequence of maps)
/// and the prediction is the remaining output.
#[derive(Debug, Clone, Default, serde::Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct OnnxOptions {
    /// Name of the graph input that takes the feature matrix.
    #[serde(default)]
    pub input: Option<String>,
    /// Name of the output holding the prediction (value or label).
    #[serde(default)]
    pub prediction: Option<String>,
    /// Name of the output holding class probabilities.
    #[serde(default)]
    pub probabilities: Option<String>,
}

/// `kind: onnx`: ONNX models through ONNX Runtime.
pub struct Loader {
    runtime: RuntimeConfig,
}

impl Loader {
    /// A loader that finds ONNX Runtime through `runtime`.
    pub fn new(runtime: RuntimeConfig) -> Loader {
        Loader { runtime }
    }
}

impl ModelLoader for Loader {
    /// It runs a row of zeros at load (fixing the output widths).
    fn warms_up(&self) -> bool {
        true
    }

    fn kind(&self) -> &str {
        "onnx"
    }

    fn parse_options(
        &self,
        block: Option<&OptionsBlock>,
        _entry: &EntryHead<'_>,
    ) -> Result<KindOptions, String> {
        Ok(KindOptions::new(match block {
            None => OnnxOptions::default(),
            Some(b) => b.parse::<OnnxOptions>()?,
        }))
    }

    fn load(&self, bytes: &[u8], ctx: &LoadContext<'_>) -> Result<Loaded, ModelError> {
        OnnxModel::load(ctx, bytes, &self.runtime)
    }
}

/// Where to find the ONNX Runtime library.
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    /// Explicit library path (`--onnxruntime`); `ORT_DYLIB_PATH` overrides it.
    pub library: Option<PathBuf>,
}

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

const HOW_TO_GET: &str = "run `make onnxruntime` (scripts/fetch-onnxruntime.sh puts the PyPI wheel's library at \
     .cache/onnxruntime/libonnxruntime.so), or point ORT_DYLIB_PATH or --onnxruntime at libonnxruntime.so";

/// The library to load: an explicit path (`ORT_DYLIB_PATH`, then the
/// config) if one is given, else the first default location that exists.
pub fn find_library(cfg: &RuntimeConfig) -> Result<PathBuf, String> {
    let explicit = std::env::var_os("ORT_DYLIB_PATH")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| cfg.library.clone());
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "ONNX Runtime library {} does not exist; {HOW_TO_GET}",
                p.display()
            ))
        };
    }
    let rel = Path::new(".cache/onnxruntime/libonnxruntime.so");
    let mut defaults = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        defaults.push(cwd.join(rel));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        defaults.push(dir.join("lib/libonnxruntime.so"));
        defaults.extend(dir.ancestors().map(|a| a.join(rel)));
    }
    defaults.push(PathBuf::from("/usr/local/lib/libonnxruntime.so"));
    defaults.push(PathBuf::from("/usr/lib/libonnxruntime.so"));
    defaults
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| format!("ONNX Runtime library not found; {HOW_TO_GET}"))
}

/// The process-wide ONNX Runtime environment, loading the library on first use.
fn environment(cfg: &RuntimeConfig) -> Result<&'static Environment, ModelError> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = find_library(cfg)?;
            let abs = std::fs::canonicalize(&path).unwrap_or(path);
            let builder = ort::init_from(&abs).map_err(|e| {
                format!(
                    "cannot load ONNX Runtime from {}: {e}; {HOW_TO_GET}",
                    abs.display()
                )
            })?;
            let env = builder
                .with_name("ml-worker")
                .with_telemetry(false)
                .build()
                .map_err(|e| format!("cannot start ONNX Runtime: {e}"))?;
            tracing::info!(library = %abs.display(), "onnx runtime loaded");
            Ok(env)
        })
        .as_ref()
        .map_err(|e| ModelError::Unsupported(e.clone()))
}

/// Where ONNX Runtime is told external data lives: nowhere (every external
/// tensor has been inlined by [`external::inline`]).
const NO_EXTERNAL_DATA_FOLDER: &str =
    "/nonexistent/ml-worker: external data is inlined before loading";

/// An output's kind and its fixed width, if known.
type Shape = (OutKind, Option<usize>);

/// How an output is read.
#[derive(Debug, Clone, Copy, PartialEq)]
enum OutKind {
    Float,
    Double,
    Int64,
    /// ZipMap: a sequence (one per row) of maps class -> probability.
    SeqMapInt,
    SeqMapString,
}

#[derive(Debug, Clone)]
struct OutSel {
    name: String,
    kind: OutKind,
    /// Last dimension when fixed (classes for probabilities).
    width: Option<usize>,
}

/// An ONNX model: one session (ONNX Runtime runs need exclusive access).
pub struct OnnxModel {
    n_features: usize,
    session: Mutex<Session>,
    input: String,
    input_f64: bool,
    prediction: Option<OutSel>,
    probabilities: Option<OutSel>,
}

fn classify(ty: &ValueType) -> Option<Shape> {
    match ty {
        ValueType::Tensor { ty, shape, .. } => {
            let width = if shape.len() >= 2 {
                shape[1..].iter().try_fold(1usize, |acc, d| {
                    if *d > 0 {
                        acc.checked_mul(*d as usize)
                    } else {
                        None
                    }
                })
            } else {
                Some(1)
            };
            let kind = match ty {
                TensorElementType::Float32 => OutKind::Float,
                TensorElementType::Float64 => OutKind::Double,
                TensorElementType::Int64 => OutKind::Int64,
                _ => return None,
            };
            Some((kind, width))
        }
        ValueType::Sequence(inner) => match inner.as_ref() {
            ValueType::Map {
                key: TensorElementType::Int64,
                value: TensorElementType::Float32,
            } => Some((OutKind::SeqMapInt, None)),
            ValueType::Map {
                key: TensorElementType::String,
                value: TensorElementType::Float32,
            } => Some((OutKind::SeqMapString, None)),
            _ => None,
        },
        _ => None,
    }
}

impl OnnxModel {
    /// Builds a session from the model bytes and picks its input and outputs.
    pub fn load(
        ctx: &LoadContext<'_>,
        bytes: &[u8],
        rt: &RuntimeConfig,
    ) -> Result<Loaded, ModelError> {
        let default = OnnxOptions::default();
        let opts = ctx.options::<OnnxOptions>().unwrap_or(&default);
        let env = environment(rt)?;
        let format_err = |reason: String| ModelError::Format {
            path: ctx.path.to_path_buf(),
            format: "ONNX",
            reason,
        };
        // external tensors are read here, from the model's own folder, so
        // ONNX Runtime never opens a file (it would resolve them against
        // the working directory)
        let dir = ctx.path.parent().unwrap_or(Path::new("."));
        let budget = ctx.max_bytes.saturating_sub(bytes.len() as u64);
        let (bytes, external) = match external::inline(bytes, dir, budget).map_err(&format_err)? {
            Some((inlined, files)) => (std::borrow::Cow::Owned(inlined), files),
            None => (std::borrow::Cow::Borrowed(bytes), Vec::new()),
        };
        let session = Session::builder(env)
            .and_then(|b| {
                b.with_optimization_level(GraphOptimizationLevel::Level3)
                    .map_err(Into::into)
            })
            .and_then(|b| b.with_intra_threads(1).map_err(Into::into))
            // a second barrier: were any external reference left, ONNX
            // Runtime would look for it in a folder that does not exist,
            // not in the working directory
            .and_then(|b| {
                b.with_config_entry(
                    "session.model_external_initializers_file_folder_path",
                    NO_EXTERNAL_DATA_FOLDER,
                )
                .map_err(Into::into)
            })
            .and_then(|mut b| b.commit_from_memory(&bytes))
            .map_err(|e| format_err(e.to_string()))?;

        // input: the named one, else the only one
        let inputs = session.inputs();
        let input = match &opts.input {
            Some(name) => inputs.iter().find(|i| i.name() == name).ok_or_else(|| {
                format_err(format!(
                    "field 'onnx.input': no input named '{name}' (inputs: {:?})",
                    names(inputs)
                ))
            })?,
            None if inputs.len() == 1 => &inputs[0],
            None => {
                return Err(format_err(format!(
                    "{} inputs {:?}: name the feature input with 'onnx.input'",
                    inputs.len(),
                    names(inputs)
                )))
            }
        };
        let input_f64 = match input.dtype() {
            ValueType::Tensor { ty, shape, .. } => {
                if shape.len() != 2 {
                    return Err(format_err(format!(
                        "input '{}' has shape {:?}; expected [batch, features]",
                        input.name(),
                        &shape[..]
                    )));
                }
                if shape[1] > 0 && shape[1] as usize != ctx.features.len() {
                    return Err(ModelError::Input(format!(
                        "field 'features' lists {} features but ONNX input '{}' takes {}",
                        ctx.features.len(),
                        input.name(),
                        shape[1]
                    )));
                }
                match ty {
                    TensorElementType::Float32 => false,
                    TensorElementType::Float64 => true,
                    other => {
                        return Err(format_err(format!(
                            "input '{}' is {other:?}; only float32/float64 inputs are supported",
                            input.name()
                        )))
                    }
                }
            }
            other => {
                return Err(format_err(format!(
                    "input '{}' is {other:?}, not a tensor",
                    input.name()
                )))
            }
        };
        let input_name = input.name().to_string();

        // outputs
        let outs: Vec<(String, Option<Shape>)> = session
            .outputs()
            .iter()
            .map(|o| (o.name().to_string(), classify(o.dtype())))
            .collect();
        let pick = |name: &str, field: &str| -> Result<OutSel, ModelError> {
            match outs.iter().find(|(n, _)| n == name) {
                Some((n, Some((kind, width)))) => Ok(OutSel {
                    name: n.clone(),
                    kind: *kind,
                    width: *width,
                }),
                Some((n, None)) => Err(format_err(format!(
                    "field '{field}': output '{n}' has an unsupported type"
                ))),
                None => Err(format_err(format!(
                    "field '{field}': no output named '{name}' (outputs: {:?})",
                    outs.iter().map(|o| &o.0).collect::<Vec<_>>()
                ))),
            }
        };
        let usable: Vec<OutSel> = outs
            .iter()
            .filter_map(|(n, c)| {
                c.map(|(kind, width)| OutSel {
                    name: n.clone(),
                    kind,
                    width,
                })
            })
            .collect();
        let (prediction, probabilities) = match ctx.task_type {
            TaskType::Regression => {
                let p = match &opts.prediction {
                    Some(n) => pick(n, "onnx.prediction")?,
                    None if usable.iter().any(|o| {
                        matches!(o.kind, OutKind::Int64 | OutKind::SeqMapInt | OutKind::SeqMapString)
                    }) =>
                    {
                        return Err(format_err(format!(
                            "the graph answers a class label and probabilities (outputs: {:?}): it is a classifier; \
                             register it with task_type: classification (or name its regression output in 'onnx.prediction')",
                            outs.iter().map(|o| &o.0).collect::<Vec<_>>()
                        )))
                    }
                    None => {
                        let floats: Vec<&OutSel> = usable
                            .iter()
                            .filter(|o| matches!(o.kind, OutKind::Float | OutKind::Double))
                            .collect();
                        match floats.as_slice() {
                            [one] => (*one).clone(),
                            _ => {
                                return Err(format_err(format!(
                                    "cannot tell which output is the prediction (outputs: {:?}); set 'onnx.prediction'",
                                    outs.iter().map(|o| &o.0).collect::<Vec<_>>()
                                )))
                            }
                        }
                    }
                };
                (Some(p), None)
            }
            TaskType::Classification => {
                let probs = match &opts.probabilities {
                    Some(n) => pick(n, "onnx.probabilities")?,
                    None => usable
                        .iter()
                        .find(|o| matches!(o.kind, OutKind::SeqMapInt | OutKind::SeqMapString))
                        .or_else(|| {
                            usable
                                .iter()
                                .find(|o| o.kind == OutKind::Float && o.name.contains("prob"))
                        })
                        .or_else(|| {
                            usable.iter().find(|o| {
                                matches!(o.kind, OutKind::Float | OutKind::Double)
                                    && o.width != Some(1)
                            })
                        })
                        .cloned()
                        .ok_or_else(|| {
                            format_err(
                                "no output holds class probabilities; set 'onnx.probabilities'"
                                    .into(),
                            )
                        })?,
                };
                let label = match &opts.prediction {
                    Some(n) => Some(pick(n, "onnx.prediction")?),
                    None => usable
                        .iter()
                        .find(|o| o.kind == OutKind::Int64 && o.name != probs.name)
                        .cloned(),
                };
                (label, Some(probs))
            }
        };

        let model = OnnxModel {
            n_features: ctx.features.len(),
            session: Mutex::new(session),
            input: input_name,
            input_f64,
            prediction,
            probabilities,
        };
        let handles_missing = external::graph_ops(&bytes)
            .unwrap_or_default()
            .iter()
            .any(|op| op.starts_with("TreeEnsemble"));
        // one probe row: proves the graph runs and fixes the output widths
        let zeros = vec![0.0; ctx.features.len()];
        let probe = model
            .run(Batch::new(&zeros, ctx.features.len())?)
            .map_err(|e| format_err(format!("a probe row of zeros failed: {e}")))?;
        let n_outputs = probe.values.width;
        let n_classes = probe.probabilities.as_ref().map(|p| p.width);
        let mut detail = format!(
            "onnx, input '{}' ({}), prediction {}, probabilities {}",
            model.input,
            if input_f64 { "float64" } else { "float32" },
            model
                .prediction
                .as_ref()
                .map(|o| format!("'{}'", o.name))
                .unwrap_or_else(|| "argmax".into()),
            model
                .probabilities
                .as_ref()
                .map(|o| format!("'{}'", o.name))
                .unwrap_or_else(|| "none".into()),
        );
        for f in &external {
            detail.push_str(&format!(
                ", external data '{}' ({} bytes used, sha256 {})",
                f.location, f.bytes_used, f.sha256
            ));
            tracing::info!(model = %ctx.name, location = %f.location, sha256 = %f.sha256, bytes = f.bytes_used, "onnx external data read");
        }
        Ok(Loaded {
            model: std::sync::Arc::new(model),
            n_outputs,
            n_classes,
            detail,
            // a tree-ensemble operator records where missing values go
            // (CatBoost, LightGBM and scikit-learn tree exports); what any
            // other graph makes of NaN is its own affair: rejected unless
            // the entry says `missing: nan`
            handles_missing,
        })
    }

    fn run(&self, batch: Batch<'_>) -> Result<Prediction, ModelError> {
        let n = batch.n_rows();
        let nf = batch.n_features();
        let rt = |e: ort::Error| ModelError::Runtime(e.to_string());
        let input: DynValue = if self.input_f64 {
            Tensor::from_array(([n, nf], batch.data().to_vec()))
                .map_err(rt)?
                .into_dyn()
        } else {
            let data: Vec<f32> = batch.data().iter().map(|v| *v as f32).collect();
            Tensor::from_array(([n, nf], data)).map_err(rt)?.into_dyn()
        };
        // a run that passes its deadline is told to stop (crate::deadline)
        let options = std::sync::Arc::new(RunOptions::new().map_err(rt)?);
        let stop = options.clone();
        if !crate::deadline::on_cancel(move || {
            let _ = stop.terminate();
        }) {
            return Err(ModelError::Runtime("cancelled: past its deadline".into()));
        }
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session
            .run_with_options(ort::inputs![self.input.as_str() => input], &*options)
            .map_err(rt)?;
        let get = |sel: &OutSel| -> Result<Output, ModelError> {
            let v = outputs.get(&sel.name).ok_or_else(|| {
                ModelError::Runtime(format!("output '{}' missing from the run", sel.name))
            })?;
            extract(v, sel.kind, n)
                .map_err(|e| ModelError::Runtime(format!("output '{}': {e}", sel.name)))
        };
        // one probability column is P(class 1) of a binary classifier
        let probabilities = self.probabilities.as_ref().map(get).transpose()?.map(|p| {
            if p.width != 1 {
                return p;
            }
            let values = p.values.iter().flat_map(|q| [1.0 - q, *q]).collect();
            Output { values, width: 2 }
        });
        let values = match (&self.prediction, &probabilities) {
            (Some(sel), _) => get(sel)?,
            (None, Some(p)) => p.argmax(),
            (None, None) => {
                return Err(ModelError::Runtime("model has no prediction output".into()))
            }
        };
        Ok(Prediction {
            values,
            probabilities,
        })
    }
}

fn names(outlets: &[ort::value::Outlet]) -> Vec<&str> {
    outlets.iter().map(|o| o.name()).collect()
}

/// Reads an output into a row-major matrix of `n` rows.
fn extract(v: &DynValue, kind: OutKind, n: usize) -> Result<Output, String> {
    let to_output = |shape: &[i64], values: Vec<f64>| -> Result<Output, String> {
        if shape.first().copied() != Some(n as i64) && !(n == 1 && shape.is_empty()) {
            return Err(format!("shape {shape:?} does not have {n} rows"));
        }
        let width = values.len().checked_div(n).unwrap_or(1);
        Ok(Output { values, width })
    };
    match kind {
        OutKind::Float => {
            let (shape, data) = v.try_extract_tensor::<f32>().map_err(|e| e.to_string())?;
            to_output(shape, data.iter().map(|x| *x as f64).collect())
        }
        OutKind::Double => {
            let (shape, data) = v.try_extract_tensor::<f64>().map_err(|e| e.to_string())?;
            to_output(shape, data.to_vec())
        }
        OutKind::Int64 => {
            let (shape, data) = v.try_extract_tensor::<i64>().map_err(|e| e.to_string())?;
            to_output(shape, data.iter().map(|x| *x as f64).collect())
        }
        OutKind::SeqMapInt | OutKind::SeqMapString => {
            let maps = v
                .try_extract_sequence::<DynMapValueType>()
                .map_err(|e| e.to_string())?;
            if maps.len() != n {
                return Err(format!("{} maps for {n} rows", maps.len()));
            }
            let mut values = Vec::new();
            let mut width = None;
            for m in &maps {
                let row: Vec<f64> = if kind == OutKind::SeqMapInt {
                    let mut kv = m
                        .try_extract_key_values::<i64, f32>()
                        .map_err(|e| e.to_string())?;
                    kv.sort_by_key(|(k, _)| *k);
                    kv.into_iter().map(|(_, p)| p as f64).collect()
                } else {
                    let mut kv = m
                        .try_extract_key_values::<String, f32>()
                        .map_err(|e| e.to_string())?;
                    kv.sort_by(|a, b| a.0.cmp(&b.0));
                    kv.into_iter().map(|(_, p)| p as f64).collect()
                };
                if *width.get_or_insert(row.len()) != row.len() {
                    return Err("rows have different numbers of classes".into());
                }
                values.extend(row);
            }
            Ok(Output {
                values,
                width: width.unwrap_or(1),
            })
        }
    }
}

impl Model for OnnxModel {
    fn predict(&self, batch: Batch<'_>) -> Result<Prediction, ModelError> {
        batch.expect_features(self.n_features)?;
        self.run(batch)
    }
}
