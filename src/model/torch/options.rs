//! `torch:` in a registry entry: what a classifier's output holds, the
//! device and the intra-op thread count; parsed and validated by the
//! `torch` loader.

use serde::Deserialize;

use crate::model::TaskType;

/// `torch:` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTorchOptions {
    /// Classification: `logits` (softmax, or sigmoid for one column, is
    /// applied) or `probabilities` (used as they are).
    #[serde(default)]
    output: Option<String>,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available). Default `cpu`.
    #[serde(default)]
    device: Option<String>,
    /// libtorch intra-op threads for this model's forward passes (default 1:
    /// the worker already runs one inference thread per core).
    #[serde(default)]
    intra_op_threads: Option<i64>,
}

/// What a classifier's TorchScript output holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TorchOutput {
    /// Raw scores: softmax across columns (sigmoid for a single column).
    Logits,
    /// Already probabilities.
    Probabilities,
}

/// Where a torch model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TorchDevice {
    Cpu,
    /// A CUDA device by index (`cuda` is `cuda:0`).
    Cuda(usize),
    /// CUDA device 0 when libtorch reports one, else the CPU.
    Auto,
}

impl std::fmt::Display for TorchDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TorchDevice::Cpu => f.write_str("cpu"),
            TorchDevice::Cuda(n) => write!(f, "cuda:{n}"),
            TorchDevice::Auto => f.write_str("auto"),
        }
    }
}

/// Validated `torch:` options (defaults when the block is absent).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TorchOptions {
    /// `None` for regression models.
    pub output: Option<TorchOutput>,
    pub device: TorchDevice,
    pub intra_op_threads: usize,
}

impl Default for TorchOptions {
    fn default() -> Self {
        TorchOptions {
            output: None,
            device: TorchDevice::Cpu,
            intra_op_threads: 1,
        }
    }
}

/// Most intra-op threads a model may ask for.
const MAX_TORCH_THREADS: i64 = 256;

pub(crate) fn torch_options(
    raw: Option<RawTorchOptions>,
    task_type: TaskType,
) -> Result<TorchOptions, String> {
    let raw = raw.unwrap_or_default();
    let output = match (raw.output.as_deref(), task_type) {
        (None, TaskType::Regression) => None,
        (None, TaskType::Classification) => {
            return Err("a classification model needs 'output: logits' or 'output: probabilities' (what its tensor holds)".into());
        }
        (Some(_), TaskType::Regression) => {
            return Err("'output' applies to classification models only; a regression model's output is the value".into());
        }
        (Some("logits"), _) => Some(TorchOutput::Logits),
        (Some("probabilities"), _) => Some(TorchOutput::Probabilities),
        (Some(other), _) => {
            return Err(format!(
                "unknown output '{other}' (expected logits or probabilities)"
            ));
        }
    };
    let device = match raw.device.as_deref().map(str::trim) {
        None | Some("cpu") => TorchDevice::Cpu,
        Some("auto") => TorchDevice::Auto,
        Some("cuda") => TorchDevice::Cuda(0),
        Some(d) => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => TorchDevice::Cuda(n),
            _ => {
                return Err(format!(
                    "unknown device '{d}' (expected cpu, cuda, cuda:N or auto)"
                ));
            }
        },
    };
    let intra_op_threads = match raw.intra_op_threads {
        None => 1,
        Some(n) if (1..=MAX_TORCH_THREADS).contains(&n) => n as usize,
        Some(n) => {
            return Err(format!(
                "intra_op_threads {n} is out of range (1 to {MAX_TORCH_THREADS})"
            ));
        }
    };
    Ok(TorchOptions {
        output,
        device,
        intra_op_threads,
    })
}
