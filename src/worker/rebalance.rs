//! The consumer's context: partitions assigned and revoked (a revoked
//! partition's in-flight events finish and are committed before it goes),
//! results of the periodic commits, librdkafka's log and statistics.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};

use crate::worker::config::DeliveryMode;
use crate::worker::offsets::Slot;
use crate::worker::repeats::Repeats;
use crate::worker::resets;
use crate::worker::shared::Shared;

/// The consumer's context: rebalances, commit results, statistics.
pub struct WorkerContext {
    pub(super) shared: Arc<Shared>,
    /// Repeated client errors, logged once per kind per interval.
    pub(super) repeats: Repeats,
}

impl ClientContext for WorkerContext {
    /// librdkafka's log lines, into tracing; offset resets are also kept for
    /// the run loop, which reports the input they skipped.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if self.repeats.log(level, fac, message) {
            self.shared.metrics.kafka_failed(message);
        }
        if fac == "OFFSET" {
            if let Some(r) = resets::parse(message) {
                self.shared
                    .resets
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(r);
            }
        }
        log_line(level, fac, message);
    }

    /// Client-level errors (brokers down, authentication, TLS): logged
    /// once per kind per interval, with the last connection failure.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.repeats.client_error("consumer", &error, reason);
    }

    /// Statistics (every 5 s), for the partitions assigned here only
    /// (librdkafka keeps reporting partitions it no longer consumes):
    /// consumer lag, and the committed offset of a partition this worker has
    /// not committed yet (read by librdkafka at assignment; the partition's
    /// start when nothing was committed), so the committed-offset lag gauge
    /// covers every assigned partition.
    fn stats(&self, stats: Statistics) {
        let s = &self.shared;
        let m = &s.metrics;
        m.clear_gauge("ml_worker_consumer_lag");
        let slots = s.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut committed = s.committed.lock().unwrap_or_else(|p| p.into_inner());
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p < 0 || slots.current_slot(topic, *p).is_none() {
                    continue;
                }
                if part.consumer_lag >= 0 {
                    m.set_gauge(
                        "ml_worker_consumer_lag",
                        &[("topic", topic), ("partition", &p.to_string())],
                        part.consumer_lag as f64,
                    );
                }
                let known = if part.committed_offset >= 0 {
                    part.committed_offset
                } else {
                    part.lo_offset
                };
                if known >= 0 {
                    committed.entry((topic.clone(), *p)).or_insert(known);
                }
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let tpl = match rebalance {
            Rebalance::Revoke(tpl) => tpl,
            Rebalance::Assign(tpl) => {
                // before librdkafka starts fetching them
                if let Some(fetch) = self.shared.fetch.get().and_then(Weak::upgrade) {
                    fetch.attach(tpl);
                }
                return;
            }
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                return;
            }
        };
        let s = &self.shared;
        let revoked: Vec<(String, i32, Option<Slot>)> = {
            let slots = s.slots.lock().unwrap_or_else(|p| p.into_inner());
            tpl.elements()
                .iter()
                .map(|e| {
                    (
                        e.topic().to_string(),
                        e.partition(),
                        slots.current_slot(e.topic(), e.partition()),
                    )
                })
                .collect()
        };
        tracing::info!(
            partitions = revoked.len(),
            "partitions revoked; finishing their in-flight events"
        );
        // everything read so far goes to inference now, then waits for acks
        let chunks = {
            let mut b = s.batcher.lock().unwrap_or_else(|p| p.into_inner());
            let n = b.shards();
            (b.take(Instant::now(), true), n)
        };
        s.dispatch(consumer, chunks.0, chunks.1);
        // the shutdown drain already waited; a revocation during close does not
        let deadline = if s.stopping.load(Ordering::Relaxed) {
            Instant::now()
        } else {
            Instant::now() + s.drain_timeout
        };
        if s.txn.is_some() {
            // exactly-once: the open transaction (which holds outputs of
            // the revoked partitions) is committed or aborted before they go
            s.txn_revoke(consumer, &revoked, deadline);
        } else {
            let drained = s.wait_until(deadline, || {
                s.publisher.send_retries();
                s.queued.events.load(Ordering::Relaxed) == 0 && {
                    let t = s.tracker.lock().unwrap_or_else(|p| p.into_inner());
                    revoked
                        .iter()
                        .all(|(_, _, slot)| slot.is_none_or(|sl| t.pending(sl) == 0))
                }
            });
            if !drained {
                tracing::warn!("revoked partitions still had unacknowledged outputs at the deadline; the new owner will process them again");
            }
        }
        let mut commit = TopicPartitionList::new();
        {
            let mut t = s.tracker.lock().unwrap_or_else(|p| p.into_inner());
            let mut slots = s.slots.lock().unwrap_or_else(|p| p.into_inner());
            for (topic, partition, slot) in &revoked {
                if let Some(slot) = slot {
                    if let Some(c) = t.revoke(*slot) {
                        if s.mode == DeliveryMode::AtLeastOnce {
                            let _ =
                                commit.add_partition_offset(topic, *partition, Offset::Offset(c));
                        }
                    }
                }
                slots.revoke(topic, *partition);
            }
        }
        {
            let mut b = s.batcher.lock().unwrap_or_else(|p| p.into_inner());
            for (_, _, slot) in &revoked {
                if let Some(slot) = slot {
                    b.unpark(*slot);
                }
            }
        }
        if commit.count() > 0 {
            let r = consumer.commit(&commit, CommitMode::Sync);
            s.count_commit(&r);
            if let Err(e) = r {
                tracing::warn!(error = %e, "commit on revocation failed; the new owner reads these events again");
            }
        }
        {
            let mut c = s.committed.lock().unwrap_or_else(|p| p.into_inner());
            for (topic, partition, _) in &revoked {
                c.remove(&(topic.clone(), *partition));
            }
        }
        let n = revoked.len();
        let _ = s
            .metrics
            .assigned
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                Some(a.saturating_sub(n))
            });
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(tpl) = rebalance else {
            return;
        };
        let s = &self.shared;
        {
            let mut t = s.tracker.lock().unwrap_or_else(|p| p.into_inner());
            let mut slots = s.slots.lock().unwrap_or_else(|p| p.into_inner());
            for e in tpl.elements() {
                let slot = slots.assign(e.topic(), e.partition());
                t.assign(slot);
            }
        }
        s.metrics.assigned.fetch_add(tpl.count(), Ordering::Relaxed);
        tracing::info!(partitions = tpl.count(), "partitions assigned");
        // librdkafka keeps a partition's pause across unassign and assign: a
        // partition paused here before (back-pressure, or parked on a schema
        // or a model when it was revoked) would come back paused for good
        let r = if s.paused.load(Ordering::Relaxed) {
            consumer.pause(tpl)
        } else {
            consumer.resume(tpl)
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not set newly assigned partitions' pause state");
        }
    }

    /// Results of the periodic (async) commits, which [`commit_async`]
    /// sends to the queue `poll` serves. A partition that failed (the whole
    /// request, or that partition alone) has its offset handed out again at
    /// the next interval, whether or not new events arrive.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let failed = result.is_err() || offsets.elements().iter().any(|e| e.error().is_err());
        let counted: KafkaResult<()> = match (&result, failed) {
            (Err(e), _) => Err(e.clone()),
            (Ok(()), true) => Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::Fail,
            )),
            (Ok(()), false) => Ok(()),
        };
        self.shared.count_commit(&counted);
        self.shared.committed(offsets);
        if failed {
            let mut retry = TopicPartitionList::new();
            for e in offsets.elements() {
                if result.is_err() || e.error().is_err() {
                    let _ = retry.add_partition_offset(e.topic(), e.partition(), e.offset());
                }
            }
            tracing::warn!(error = ?result.err(), partitions = retry.count(),
                "offset commit failed; re-issued at the next interval");
            self.shared.commit_failed(&retry);
        }
    }
}

/// A librdkafka log line, into tracing at its level.
pub(super) fn log_line(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(facility = fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(facility = fac, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {message}"),
    }
}
