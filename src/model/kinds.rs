//! The built-in model kinds: one line each. Adding a format is its file
//! under `src/model/` (a [`ModelLoader`](super::ModelLoader)) and its line here.

use super::loader::Loaders;

/// The built-in kinds; `onnx` finds ONNX Runtime through `onnx_runtime`.
pub fn builtin(onnx_runtime: &super::onnx::RuntimeConfig) -> Loaders {
    Loaders::empty()
        .with(super::lightgbm::Loader)
        .with(super::xgboost::Loader)
        .with(super::catboost::Loader)
        .with(super::onnx::Loader::new(onnx_runtime.clone()))
        .with(super::pickle::Loader)
        .with(super::torch_loader())
}
