//! The streaming worker: Kafka feature events in, batched inference,
//! prediction and signal events out (at-least-once).
//!
//! - [`config`]: `config/worker.yaml`, parsed raw with unknown fields refused
//!   and validated in one pass; errors name the file and the dotted field.
//! - [`fetch`]: assigned partitions' records read in batches from one queue.
//! - [`offsets`]: which input offsets may be committed (at-least-once).
//! - `transaction`: exactly-once, outputs and input offsets in one Kafka
//!   transaction.

pub mod batch;
pub(crate) mod clients;
mod commit;
pub mod config;
mod consume;
mod drain;
pub mod fetch;
mod infer;
pub mod metrics;
pub mod offsets;
mod produce;
mod rebalance;
pub mod reload;
pub(crate) mod repeats;
pub mod resets;
pub mod run;
pub mod schema_registry;
mod shared;
mod transaction;

pub use clients::client_configs;
pub use run::{run, Started, Summary, WorkerError};
