//! ml-worker: trained models on a Kafka stream.
//!
//! Layout (one concern per module):
//!
//! - [`config`]: `models.yaml`, parsed with unknown fields refused and
//!   validated into [`config::ModelSpec`]s (each kind's options block by
//!   its loader); errors name file, model and field.
//! - [`registry`]: [`registry::RegistryBuilder`] (the model kinds), loads
//!   and caches models by SHA256, refuses pinned-checksum mismatches, defers
//!   `lazy` models, serves `fallback`s, builds every [`model::ModelInfo`].
//! - [`checksum`]: model files read safely (regular files within a size
//!   limit) and their SHA256.
//! - [`deadline`]: model code on threads of its own, under a deadline.
//! - [`audit`]: append-only, hash-chained SQLite log of model lifecycle events.
//! - [`model`]: the [`model::Model`] trait a format implements, the
//!   [`model::ModelLoader`] that reads one `kind` ([`model::loader`]; the
//!   built-in kinds, one line each: [`model::kinds`]), [`model::ServedModel`] as the registry
//!   serves a model, and one file per format: native LightGBM, XGBoost and
//!   CatBoost tree evaluation ([`model::tree`]), ONNX Runtime
//!   ([`model::onnx`]), TorchScript, pickles read as data.
//! - [`signal`]: per-model rules turning predictions into BUY/SELL/HOLD.
//! - [`text`]: untrusted text escaped for terminals and logs.
//! - [`worker`]: the streaming worker and its `worker.yaml`: the pipeline
//!   ([`worker::run`]), batching ([`worker::batch`]), inference, publishing,
//!   at-least-once offsets ([`worker::offsets`]), metrics ([`worker::metrics`]).
//! - [`cli`]: the `ml-worker` command line, run with a
//!   [`registry::RegistryBuilder`]: `src/main.rs` with the built-in kinds,
//!   a program built on the library with its own added.
//! - [`demo`]: `ml-worker demo` (broker + worker + traffic + summary in one process).
//! - [`bench`]: `ml-worker bench` (baseline, throughput, latency on the embedded broker).
//! - [`service`]: audit + registry + (embedded) broker + worker, as `run` starts them.
//! - [`input`]: CSV and JSON-lines feature files for the offline `predict` CLI.
//! - [`loadgen`]: sample feature traffic and a downstream reader (demo, bench, tests).
//! - [`broker`]: the embedded Kafka broker (librdkafka's mock cluster).
//! - [`events`]: the Avro event contract (`schemas/`) and its wire formats
//!   (`avro` with Confluent framing, `avro-raw`, `json`).
//!
//! Inference is synchronous and batch-shaped: rows in, one output per row out,
//! so callers on an async runtime run it on dedicated threads.
//!
//! # A model kind of your own
//!
//! Implement [`ModelLoader`] (and [`Model`] for what it loads), add it with
//! [`RegistryBuilder::with_loader`], and run [`cli::main`] with the builder:
//! every command, the streaming worker included, serves the new kind.
//! `examples/custom_model.rs` is a complete one.

pub mod audit;
pub mod bench;
pub mod broker;
pub mod checksum;
pub mod cli;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod events;
pub mod input;
pub mod loadgen;
pub mod model;
pub mod ops;
pub mod registry;
pub mod service;
pub mod signal;
pub mod text;
pub mod worker;

pub use model::{
    Batch, EntryHead, KindOptions, LoadContext, Loaded, Model, ModelError, ModelInfo, ModelLoader,
    OptionsBlock, Output, Prediction, ServedModel, TaskType,
};
pub use registry::{Registry, RegistryBuilder};
