//! The streaming worker: Kafka feature events in, batched inference,
//! prediction and signal events out (at-least-once).
//!
//! - [`config`]: `config/worker.yaml`, parsed raw with unknown fields refused
//!   and validated in one pass; errors name the file and the dotted field.
//! - [`offsets`]: which input offsets may be committed (at-least-once).

pub mod config;
pub mod offsets;
