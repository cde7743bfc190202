//! PyTorch models: TorchScript files (`torch.jit.script` / `torch.jit.trace`
//! output) run by libtorch through `tch`, behind the `torch` cargo feature.
//!
//! The module is loaded from the bytes whose SHA256 was checked, put in eval
//! mode, and run without gradients. Input: float32 `[batch, n_features]` in
//! the registry's `features` order. Output: regression values `[batch]` or
//! `[batch, k]`; classification scores `[batch, classes]`, or `[batch, 1]`
//! holding P(class 1) of a binary classifier. `torch: {output: logits}` applies
//! softmax (sigmoid for one column), as Python's `torch.softmax(y, dim=1)`
//! does, in the output's own precision; `output: probabilities` uses them as
//! they are.
//!
//! At load, one row of zeros goes through the model: a file that is not
//! TorchScript, that wants another input width or that returns something
//! other than one tensor of a usable shape is refused there, with libtorch's
//! own reason, instead of failing every batch later.
//!
//! A TorchScript file holds the model's graph and weights; libtorch runs the
//! graph in its interpreter, never Python, and reads the weights with its own
//! restricted unpickler. The graph is code all the same: [`inspect`] checks
//! every operator of every function before libtorch loads the file.

pub mod host;
pub mod inspect;
pub mod options;
pub mod sandbox;
pub(crate) mod shm;

use std::cell::Cell;
use std::io::Cursor;

use tch::{CModule, Device, IValue, Kind, TchError, Tensor};

use std::path::PathBuf;

use super::loader::{EntryHead, KindOptions, LoadContext, Loaded, ModelLoader, OptionsBlock};
use super::{Batch, Model, ModelError, Output, Prediction, TaskType};
pub use options::{TorchDevice, TorchOptions, TorchOutput};

/// `kind: torch`: TorchScript, checked, then run by libtorch in a process
/// of its own ([`host`]).
pub struct Loader;

impl ModelLoader for Loader {
    /// It runs a row of zeros at load (fixing the output widths).
    fn warms_up(&self) -> bool {
        true
    }

    fn kind(&self) -> &str {
        "torch"
    }

    fn parse_options(
        &self,
        block: Option<&OptionsBlock>,
        entry: &EntryHead<'_>,
    ) -> Result<KindOptions, String> {
        let raw = block
            .map(|b| b.parse::<options::RawTorchOptions>())
            .transpose()?;
        Ok(KindOptions::new(options::torch_options(
            raw,
            entry.task_type,
        )?))
    }

    fn load(&self, bytes: &[u8], ctx: &LoadContext<'_>) -> Result<Loaded, ModelError> {
        let spec = TorchSpec {
            name: ctx.name.to_string(),
            path: ctx.path.to_path_buf(),
            n_features: ctx.features.len(),
            task_type: ctx.task_type,
            options: ctx.options::<TorchOptions>().cloned().unwrap_or_default(),
        };
        host::HostedTorch::load(&spec, bytes)
    }
}

/// What a torch model is loaded as.
#[derive(Debug, Clone)]
pub struct TorchSpec {
    pub name: String,
    pub path: PathBuf,
    pub n_features: usize,
    pub task_type: TaskType,
    pub options: TorchOptions,
}

/// A loaded TorchScript module and how to read its output.
pub struct TorchModel {
    module: CModule,
    device: Device,
    output: Option<TorchOutput>,
    threads: usize,
    task_type: TaskType,
    n_outputs: usize,
    n_classes: Option<usize>,
    /// The output's width is known (from the load probe): every batch's
    /// must be the same.
    probed: bool,
}

/// A loaded model's shape and description.
#[derive(Debug, Clone)]
pub struct TorchShape {
    pub n_outputs: usize,
    pub n_classes: Option<usize>,
    pub detail: String,
}

impl TorchModel {
    /// Loads `bytes` (the verified file) as TorchScript on the configured device.
    pub fn load(spec: &TorchSpec, bytes: &[u8]) -> Result<(Self, TorchShape), ModelError> {
        let format_err = |reason: String| ModelError::Format {
            path: spec.path.clone(),
            format: "TorchScript",
            reason,
        };
        // nothing of the file runs before its code is checked: libtorch's
        // loader itself runs `__setstate__`
        inspect::route_warnings();
        let inspection = inspect::check(bytes).map_err(format_err)?;
        if let Some((f, n)) = inspection.inlined_nodes.iter().max_by_key(|(_, n)| *n) {
            tracing::debug!(model = %spec.name, function = %f, nodes = n, "largest TorchScript function once inlined");
        }
        let device = resolve_device(spec.options.device).map_err(ModelError::Unsupported)?;
        let mut module = CModule::load_data_on_device(&mut Cursor::new(bytes), device)
            .map_err(|e| format_err(brief(&e)))?;
        module.set_eval();
        let mut model = TorchModel {
            module,
            device,
            output: spec.options.output,
            threads: spec.options.intra_op_threads,
            task_type: spec.task_type,
            n_outputs: 1,
            n_classes: None,
            probed: false,
        };
        let n = spec.n_features;
        let probe = model.predict(Batch::new(&vec![0.0; n], n)?).map_err(|e| {
            format_err(format!(
                "a [1, {n}] float32 input (the {n} registered features) fails: {}",
                match e {
                    ModelError::Runtime(r) | ModelError::Input(r) => r,
                    other => other.to_string(),
                }
            ))
        })?;
        let n_outputs = probe.values.width;
        let n_classes = probe.probabilities.as_ref().map(|p| p.width);
        let detail = format!(
            "TorchScript, device {}{}, {} intra-op thread{}, {}",
            device_name(device),
            match spec.options.device {
                TorchDevice::Auto => " (auto)",
                _ => "",
            },
            model.threads,
            if model.threads == 1 { "" } else { "s" },
            match (spec.task_type, model.output, n_classes) {
                (TaskType::Classification, Some(TorchOutput::Logits), Some(k)) =>
                    format!("{k} classes from logits"),
                (TaskType::Classification, _, Some(k)) => format!("{k} classes from probabilities"),
                _ => format!("{n_outputs} output value(s) per row"),
            }
        );
        tracing::info!(model = %spec.name, device = %device_name(device), threads = model.threads,
            "torch model loaded");
        model.n_outputs = n_outputs;
        model.n_classes = n_classes;
        model.probed = true;
        Ok((
            model,
            TorchShape {
                n_outputs,
                n_classes,
                detail,
            },
        ))
    }

    /// The module's output for `n_rows` rows, as one tensor on the CPU.
    fn forward(&self, data: &[f64], n_rows: usize, n_features: usize) -> Result<Tensor, TchError> {
        set_threads(self.threads);
        let _no_grad = tch::no_grad_guard();
        let xs: Vec<f32> = data.iter().map(|&v| v as f32).collect();
        let x = Tensor::f_from_slice(&xs)?
            .f_reshape([n_rows as i64, n_features as i64])?
            .f_to_device(self.device)?;
        match self.module.forward_is(&[IValue::Tensor(x)])? {
            IValue::Tensor(t) => t.f_to_device(Device::Cpu),
            other => Err(TchError::Kind(format!(
                "the model returned {}, expected one tensor",
                ivalue_kind(&other)
            ))),
        }
    }

    /// `[rows, width]` values of `t` (1-D or 2-D with `rows` rows) as `f64`.
    /// `widths` says which widths are right, once the load probe has set
    /// the model's (checked before the values are copied).
    fn read(
        t: &Tensor,
        rows: usize,
        widths: Option<&dyn Fn(usize) -> bool>,
    ) -> Result<Output, ModelError> {
        let size = t.size();
        let width = match size.as_slice() {
            [n] if *n as usize == rows => 1,
            [n, k] if *n as usize == rows && *k >= 1 => *k as usize,
            _ => {
                return Err(ModelError::Runtime(format!(
                    "the model returned a tensor of shape {size:?} for {rows} row(s); expected [{rows}] or [{rows}, k]"
                )))
            }
        };
        if widths.is_some_and(|ok| !ok(width)) {
            return Err(ModelError::Runtime(format!(
                "the model returned a tensor of shape {size:?} for {rows} row(s): {width} column(s), \
                 not the width it had at load"
            )));
        }
        let values: Vec<f64> = t
            .f_contiguous()
            .and_then(|c| c.f_flatten(0, -1))
            .and_then(|f| Vec::<f64>::try_from(&f))
            .map_err(|e| ModelError::Runtime(brief(&e)))?;
        Ok(Output { values, width })
    }
}

impl Model for TorchModel {
    fn predict(&self, batch: Batch<'_>) -> Result<Prediction, ModelError> {
        let rows = batch.n_rows();
        let runtime = |e: TchError| ModelError::Runtime(brief(&e));
        let out = self
            .forward(batch.data(), rows, batch.n_features())
            .map_err(runtime)?;
        if self.task_type == TaskType::Regression {
            return Ok(Prediction {
                values: Self::read(
                    &out,
                    rows,
                    self.probed.then_some(&|w: usize| w == self.n_outputs),
                )?,
                probabilities: None,
            });
        }
        let single = out.dim() == 1 || out.size().get(1) == Some(&1);
        let scores = match (self.output, single) {
            (Some(TorchOutput::Logits), true) => out.f_sigmoid().map_err(runtime)?,
            (Some(TorchOutput::Logits), false) => {
                out.f_softmax(1, None::<Kind>).map_err(runtime)?
            }
            _ => out,
        };
        // a binary classifier's one column (P(class 1)) becomes two
        let k = self.n_classes.unwrap_or(0);
        let mut probs = Self::read(
            &scores,
            rows,
            self.probed
                .then_some(&|w: usize| w == k || (k == 2 && w == 1)),
        )?;
        if probs.width == 1 {
            // P(class 1) of a binary classifier
            probs = Output {
                values: probs.values.iter().flat_map(|p| [1.0 - p, *p]).collect(),
                width: 2,
            };
        }
        Ok(Prediction {
            values: probs.argmax(),
            probabilities: Some(probs),
        })
    }
}

/// The libtorch device for a configured one. `auto` is CUDA device 0 when
/// libtorch reports CUDA, else the CPU; an explicit CUDA device that is not
/// there is an error (silently running on the CPU would hide a misconfiguration).
pub(crate) fn resolve_device(d: TorchDevice) -> Result<Device, String> {
    match d {
        TorchDevice::Cpu => Ok(Device::Cpu),
        TorchDevice::Auto if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        TorchDevice::Auto => Ok(Device::Cpu),
        TorchDevice::Cuda(n) => {
            let count = tch::Cuda::device_count().max(0) as usize;
            if n < count {
                Ok(Device::Cuda(n))
            } else {
                Err(format!(
                    "torch device cuda:{n} was asked for, but libtorch reports {count} CUDA device(s){}; \
                     use 'device: cpu' or 'device: auto'",
                    if count == 0 {
                        " (no GPU, or a CPU-only libtorch such as scripts/fetch-libtorch.sh assembles)"
                    } else {
                        ""
                    }
                ))
            }
        }
    }
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".into(),
    }
}

thread_local! {
    /// The intra-op thread count last set on this thread (0: never).
    static THREADS: Cell<usize> = const { Cell::new(0) };
}

/// Sets libtorch's intra-op thread count for this thread's forward passes
/// when it differs from the last one set here (setting it can rebuild a
/// thread pool, so not on every batch).
pub(crate) fn set_threads(n: usize) {
    THREADS.with(|t| {
        if t.get() != n {
            tch::set_num_threads(n.clamp(1, i32::MAX as usize) as i32);
            t.set(n);
        }
    });
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tensor(_) => "a tensor",
        IValue::Double(_) | IValue::Int(_) | IValue::Bool(_) => "a scalar",
        IValue::Tuple(_) => "a tuple",
        IValue::TensorList(_) | IValue::GenericList(_) => "a list",
        IValue::GenericDict(_) => "a dict",
        IValue::String(_) | IValue::StringList(_) => "a string",
        _ => "a non-tensor value",
    }
}

/// libtorch's reason without its C++ backtrace: the last `...Error:` line of
/// a TorchScript traceback, else the first line; at most 400 characters.
fn brief(e: &TchError) -> String {
    let s = e.to_string();
    let line = s
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.contains("Error: ") && !l.starts_with("Exception raised"))
        .or_else(|| s.lines().map(str::trim).find(|l| !l.is_empty()))
        .unwrap_or("unknown libtorch error");
    let line = line.split(" Exception raised from").next().unwrap_or(line);
    let mut out: String = line.chars().take(400).collect();
    if out.len() < line.len() {
        out.push('…');
    }
    out
}
