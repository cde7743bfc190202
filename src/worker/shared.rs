//! What the consume loop, the rebalance callbacks (which run inside
//! `poll`, on the loop's thread) and the drain share: the batcher, the
//! offset tracker, the inference shards' channels, and the counts of what
//! is in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;

use crate::worker::batch::{Batcher, Chunk};
use crate::worker::config::DeliveryMode;
use crate::worker::fetch::FetchQueue;
use crate::worker::infer::Queued;
use crate::worker::metrics::Metrics;
use crate::worker::offsets::{OffsetTracker, Slots};
use crate::worker::produce::Publisher;
use crate::worker::rebalance::WorkerContext;
use crate::worker::resets;
use crate::worker::transaction::Txn;

/// State shared by the loop and the rebalance callbacks (which run inside
/// `poll`, on the loop's thread).
pub(super) struct Shared {
    pub(super) batcher: Mutex<Batcher>,
    pub(super) tracker: Arc<Mutex<OffsetTracker>>,
    pub(super) slots: Mutex<Slots>,
    pub(super) senders: Vec<Sender<Chunk>>,
    /// Records handed to shards and not yet tracked.
    pub(super) queued: Arc<Queued>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) mode: DeliveryMode,
    pub(super) drain_timeout: Duration,
    pub(super) paused: AtomicBool,
    pub(super) publisher: Arc<Publisher>,
    /// Shutting down: revocations do not wait for a second drain.
    pub(super) stopping: AtomicBool,
    /// Offset resets librdkafka logged, for the run loop to report.
    pub(super) resets: Mutex<Vec<resets::OffsetReset>>,
    /// Where newly assigned partitions forward their records. Weak: the
    /// run loop holds the queue and drops it before the consumer, on every
    /// path (the queue must not outlive its client).
    pub(super) fetch: OnceLock<Weak<FetchQueue>>,
    /// Offsets the broker has taken, by partition (for the lag gauge).
    pub(super) committed: Mutex<HashMap<(String, i32), i64>>,
    /// The registry served, and the next one a reload made.
    pub(super) models: Arc<crate::worker::reload::Models>,
    /// The transactions of `exactly-once` (`None` otherwise).
    pub(super) txn: Option<Arc<Txn>>,
}

impl Shared {
    /// Hands closed chunks to their shards (at-most-once: commits first).
    pub(super) fn dispatch(
        &self,
        consumer: &BaseConsumer<WorkerContext>,
        chunks: Vec<Chunk>,
        shards: usize,
    ) {
        for chunk in chunks {
            if chunk.records.is_empty() {
                continue;
            }
            if self.mode == DeliveryMode::AtMostOnce && !self.commit_read(consumer, &chunk) {
                // served now, they could be served again by whoever reads
                // from the last commit: at most once means not at all
                let n = chunk.records.len();
                tracing::error!(
                    events = n,
                    "at-most-once: offsets could not be committed; these events are not served"
                );
                self.metrics
                    .add("ml_worker_at_most_once_skipped_total", &[], n as u64);
                continue;
            }
            let shard = chunk.records[0].slot as usize % shards;
            if let Some(txn) = &self.txn {
                txn.dispatched(chunk.records.len());
            }
            self.queued.add(&chunk);
            if let Err(e) = self.senders[shard].send(chunk) {
                // the shard is gone (only at exit): these inputs stay uncommitted
                self.queued.remove(&e.0);
                tracing::error!("inference shard {shard} stopped; batch left uncommitted");
            }
        }
    }
    /// Waits until `done` holds or the drain deadline passes.
    pub(super) fn wait_until(&self, deadline: Instant, done: impl Fn() -> bool) -> bool {
        while !done() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    pub(super) fn in_flight(&self) -> usize {
        let tracked = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .in_flight();
        let held = self.batcher.lock().map(|b| b.held()).unwrap_or(0);
        tracked + self.queued.events.load(Ordering::Relaxed) + held
    }
    /// Bytes of input values and keys read and not yet handed to the producer.
    pub(super) fn in_flight_bytes(&self) -> usize {
        let held = self.batcher.lock().map(|b| b.held_bytes()).unwrap_or(0);
        self.queued.bytes.load(Ordering::Relaxed) + held
    }
}
