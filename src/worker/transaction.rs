//! Exactly-once (`delivery.mode: exactly-once`): consume, transform and
//! produce in Kafka transactions (KIP-447). A worker's outputs (predictions,
//! signals, dead letters) and the input offsets they came from are
//! committed in one transaction of its transactional producer; a
//! `read_committed` reader downstream sees each input's outputs once,
//! whatever crashes, restarts and rebalances happen.
//!
//! The pipeline hands chunks to inference shards, which produce outputs
//! and ack their inputs in the [`OffsetTracker`] as the broker
//! acknowledges them. A transaction ends on the consume thread, the only
//! one that hands out work:
//!
//! 1. **commit** (every `commit_interval_ms`, or after
//!    `transaction_max_events` input events): it stops handing out chunks
//!    and waits until every chunk handed out is through its shard and every
//!    output is acknowledged. The tracker's committable offsets are then
//!    exactly where the shards stand: every output in the transaction comes
//!    from an input below them, every input below them has its outputs in
//!    this or an earlier transaction. Records still held in the batcher are
//!    above them and not produced yet. The offsets go to the transaction
//!    (`send_offsets_to_transaction` with the consumer's group metadata, so
//!    a zombie of an old group generation is fenced), the transaction is
//!    committed and the next one begun before the next chunk is handed out.
//! 2. **abort** (a delivery failed, the producer refused a record in the
//!    transaction's state, an abortable error at commit, or the outputs were
//!    not acknowledged within `shutdown_timeout_ms`): shards drop the chunks
//!    they get, the batcher's records are dropped, and once no shard is
//!    busy the transaction is aborted and every assigned partition rewound:
//!    sought back to its committed offset, with a fresh slot (so reports of
//!    the aborted transaction's records, which arrive late, are not taken
//!    for the new ones'), a fresh tracker, and parked partitions released.
//!    Then the next transaction begins.
//! 3. **fenced or fatal** (`PRODUCER_FENCED`, `INVALID_PRODUCER_EPOCH`, a
//!    fatal producer error): nothing more is committed; the worker stops
//!    and exits with an error naming it, and its replacement resumes from
//!    the last committed transaction.
//!
//! Revocation commits the open transaction (after the same wait) before
//! the partitions go, or aborts it; a drain (SIGTERM) commits it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};

use crate::worker::config::WorkerConfig;
use crate::worker::metrics::Histogram;
use crate::worker::offsets::{OffsetTracker, Slot};
use crate::worker::produce::Publisher;
use crate::worker::rebalance::WorkerContext;
use crate::worker::shared::Shared;

/// How long one transactional API call may take before it is tried again.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long retriable errors of a commit or an abort are retried.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// The transactional state of a worker.
pub(super) struct Txn {
    /// The producer's `transactional.id`.
    id: String,
    max_events: usize,
    /// Input events handed to shards since the transaction began.
    events: AtomicUsize,
    /// A transaction is open (begun, not yet committed or aborted).
    open: AtomicBool,
    /// Offsets this worker's transactions committed, by partition, while
    /// the partition is assigned here: where an abort rewinds it when the
    /// broker does not say (librdkafka's mock cluster keeps no transactional
    /// offsets).
    committed: Mutex<HashMap<(String, i32), i64>>,
    /// Why the worker stops (fenced, a fatal error): nothing more is
    /// committed.
    failed: OnceLock<String>,
}

impl Txn {
    pub(super) fn new(cfg: &WorkerConfig) -> Txn {
        Txn {
            id: cfg.transactional_id(),
            max_events: cfg.transaction_max_events,
            events: AtomicUsize::new(0),
            open: AtomicBool::new(false),
            committed: Mutex::new(HashMap::new()),
            failed: OnceLock::new(),
        }
    }

    /// Counts input events handed to shards.
    pub(super) fn dispatched(&self, n: usize) {
        self.events.fetch_add(n, Ordering::Relaxed);
    }

    /// Why the worker stopped committing, if it did.
    pub(super) fn failure(&self) -> Option<String> {
        self.failed.get().cloned()
    }
}

/// Registers the transactional id with the broker (fencing any earlier
/// producer with the same id and aborting its open transaction), then
/// begins the first transaction. Retriable errors are retried until `stop`.
pub(super) fn start(txn: &Txn, publisher: &Publisher, stop: &AtomicBool) -> Result<(), String> {
    let producer = &publisher.producer;
    loop {
        match producer.init_transactions(CALL_TIMEOUT) {
            Ok(()) => break,
            Err(e) if retriable(&e) && !stop.load(Ordering::Relaxed) => {
                tracing::warn!(error = %e, transactional_id = %txn.id, "init_transactions: retrying");
            }
            Err(e) => return Err(describe(&e, &txn.id)),
        }
    }
    producer
        .begin_transaction()
        .map_err(|e| describe(&e, &txn.id))?;
    txn.open.store(true, Ordering::SeqCst);
    tracing::info!(transactional_id = %txn.id, "exactly-once: transactional producer ready");
    Ok(())
}

/// Whether an error of a transactional call may be retried as it is.
fn retriable(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(t) => t.is_retriable() && !t.is_fatal() && !t.txn_requires_abort(),
        _ => false,
    }
}

/// Whether an error says another producer took this transactional id.
fn fenced(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    )
}

/// What a failed transactional call means, for the log and the exit.
fn describe(e: &KafkaError, id: &str) -> String {
    if fenced(e) {
        format!(
            "producer fenced: another producer with transactional.id '{id}' took over \
             (this worker's replacement, or a replica sharing its delivery.transactional_id): {e}"
        )
    } else {
        format!("transactional producer '{id}' failed: {e}")
    }
}

/// Calls `call` until it succeeds, fails for good, or `RETRY_FOR` passed.
fn retry(what: &str, mut call: impl FnMut(Duration) -> KafkaResult<()>) -> KafkaResult<()> {
    let deadline = Instant::now() + RETRY_FOR;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match call(left.clamp(Duration::from_millis(500), CALL_TIMEOUT)) {
            Err(e) if retriable(&e) && Instant::now() < deadline => {
                tracing::warn!(error = %e, "{what}: retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

impl Shared {
    fn txn(&self) -> &Txn {
        self.txn.as_deref().expect("exactly-once state")
    }

    /// Nothing handed out is still in a shard or waiting for the broker.
    fn txn_idle(&self) -> bool {
        self.queued.events.load(Ordering::SeqCst) == 0
            && self.publisher.busy() == 0
            && self
                .tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .in_flight()
                == 0
    }

    /// On every turn of the loop: aborts a failed transaction, commits one
    /// that is due (`interval_due`, or `transaction_max_events` reached).
    /// Returns whether the commit interval starts again.
    pub(super) fn transact(
        &self,
        consumer: &BaseConsumer<WorkerContext>,
        interval_due: bool,
    ) -> bool {
        let txn = self.txn();
        if txn.failed.get().is_some() {
            return false;
        }
        if self.publisher.txn_abort() {
            self.txn_abort(consumer, "delivery", true);
            return true;
        }
        let events = txn.events.load(Ordering::Relaxed);
        if events == 0 {
            return interval_due;
        }
        if !interval_due && events < txn.max_events {
            return false;
        }
        self.txn_commit(consumer, Instant::now() + self.drain_timeout, true);
        true
    }

    /// Before partitions are revoked: commits the open transaction (every
    /// partition's outputs and offsets, the revoked ones' included), or
    /// aborts it; never leaves the revoked partitions' outputs in an open
    /// transaction. Returns whether it committed.
    pub(super) fn txn_revoke(
        &self,
        consumer: &BaseConsumer<WorkerContext>,
        revoked: &[(String, i32, Option<Slot>)],
        deadline: Instant,
    ) -> bool {
        let txn = self.txn();
        let next = !self.stopping.load(Ordering::Relaxed);
        let committed = if txn.failed.get().is_some() {
            false
        } else if !txn.open.load(Ordering::SeqCst) {
            true
        } else if self.publisher.txn_abort() {
            self.txn_abort(consumer, "revocation", next);
            false
        } else {
            self.txn_commit(consumer, deadline, next)
        };
        if !committed && txn.failed.get().is_none() {
            tracing::warn!(
                partitions = revoked.len(),
                "exactly-once: the open transaction was aborted before the revocation; \
                 the new owner reads the revoked partitions from the last commit"
            );
        }
        // an abort rewound the revoked partitions too, under new slots: the
        // caller revokes the slots it knew, these are revoked here
        {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
            for (topic, partition, old) in revoked {
                if let Some(now) = slots.current_slot(topic, *partition) {
                    if Some(now) != *old {
                        t.revoke(now);
                    }
                }
            }
        }
        // the revoked partitions' commits are their new owner's now
        let mut c = txn.committed.lock().unwrap_or_else(|p| p.into_inner());
        for (topic, partition, _) in revoked {
            c.remove(&(topic.clone(), *partition));
        }
        committed
    }

    /// At shutdown: commits the open transaction (everything read was
    /// handed out already), waiting until `deadline` for its outputs;
    /// aborts it when they do not come. Begins none after. Returns whether
    /// everything read was committed.
    pub(super) fn txn_finish(
        &self,
        consumer: &BaseConsumer<WorkerContext>,
        deadline: Instant,
    ) -> bool {
        let txn = self.txn();
        if txn.failed.get().is_some() {
            return false;
        }
        if !txn.open.load(Ordering::SeqCst) {
            return true;
        }
        if self.publisher.txn_abort() {
            self.txn_abort(consumer, "shutdown", false);
            return false;
        }
        self.txn_commit(consumer, deadline, false)
    }

    /// Commits the open transaction once nothing is in flight (waiting
    /// until `deadline`), with the input offsets that are then where
    /// reading stands; begins the next when `next`. An abortable error, or
    /// outputs not acknowledged in time, abort it instead (and rewind, when
    /// `next`). Returns whether it committed.
    fn txn_commit(
        &self,
        consumer: &BaseConsumer<WorkerContext>,
        deadline: Instant,
        next: bool,
    ) -> bool {
        let txn = self.txn();
        let started = Instant::now();
        // this thread hands out no chunk until it returns: wait for those
        // handed out to be produced and acknowledged
        let idle = self.wait_until(deadline, || {
            self.publisher.txn_abort() || self.publisher.fatal() || self.txn_idle()
        });
        if self.publisher.fatal() {
            self.txn_fail("the transactional producer hit a fatal error".into());
            return false;
        }
        if self.publisher.txn_abort() {
            self.txn_abort(consumer, "delivery", next);
            return false;
        }
        if !idle {
            tracing::warn!(
                timeout = ?self.drain_timeout,
                "exactly-once: outputs were not acknowledged in time; aborting the transaction"
            );
            self.txn_abort(consumer, "timeout", next);
            return false;
        }
        let offsets = self.txn_offsets();
        let producer = &self.publisher.producer;
        if offsets.count() > 0 {
            let Some(group) = consumer.group_metadata() else {
                tracing::warn!(
                    "exactly-once: no consumer group metadata; aborting the transaction"
                );
                self.txn_abort(consumer, "commit", next);
                return false;
            };
            let r = retry("send_offsets_to_transaction", |t| {
                producer.send_offsets_to_transaction(&offsets, &group, t)
            });
            if let Err(e) = r {
                self.txn_error(consumer, &e, next);
                return false;
            }
        }
        if let Err(e) = retry("commit_transaction", |t| producer.commit_transaction(t)) {
            self.txn_error(consumer, &e, next);
            return false;
        }
        txn.open.store(false, Ordering::SeqCst);
        txn.events.store(0, Ordering::Relaxed);
        {
            let mut c = txn.committed.lock().unwrap_or_else(|p| p.into_inner());
            for e in offsets.elements() {
                if let Offset::Offset(o) = e.offset() {
                    c.insert((e.topic().to_string(), e.partition()), o);
                    // committed past them: their dead letters are in
                    self.publisher
                        .forget_refused_below(e.topic(), e.partition(), o);
                }
            }
        }
        self.committed(&offsets);
        let m = &self.metrics;
        m.add("ml_worker_transactions_committed_total", &[], 1);
        let mut h = Histogram::latency();
        h.observe(started.elapsed().as_secs_f64());
        m.merge_histogram("ml_worker_transaction_commit_latency_seconds", &[], &h);
        if next {
            self.txn_begin();
        }
        true
    }

    /// The input offsets that moved since the last commit, by name.
    fn txn_offsets(&self) -> TopicPartitionList {
        let moved = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_committable();
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut tpl = TopicPartitionList::new();
        for (slot, offset) in moved {
            if let Some((topic, partition)) = slots.name(slot) {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset));
            }
        }
        tpl
    }

    /// A commit or its offsets failed: fenced or fatal stops the worker;
    /// anything else aborts the transaction.
    fn txn_error(&self, consumer: &BaseConsumer<WorkerContext>, e: &KafkaError, next: bool) {
        let txn = self.txn();
        let fatal = fenced(e) || matches!(e, KafkaError::Transaction(t) if t.is_fatal());
        if fatal {
            self.txn_fail(describe(e, &txn.id));
            return;
        }
        tracing::warn!(error = %e, "exactly-once: commit failed; aborting the transaction");
        self.txn_abort(consumer, "commit", next);
    }

    /// Begins the next transaction.
    fn txn_begin(&self) {
        let txn = self.txn();
        match self.publisher.producer.begin_transaction() {
            Ok(()) => {
                txn.events.store(0, Ordering::Relaxed);
                txn.open.store(true, Ordering::SeqCst);
            }
            Err(e) => self.txn_fail(describe(&e, &txn.id)),
        }
    }

    /// Aborts the open transaction: shards drop what they get, the batcher
    /// drops what it holds, and once no shard is busy the transaction is
    /// aborted. When `next`, every assigned partition is rewound to its
    /// committed offset and the next transaction begun.
    fn txn_abort(&self, consumer: &BaseConsumer<WorkerContext>, reason: &'static str, next: bool) {
        let txn = self.txn();
        self.publisher.set_txn_abort(true);
        let dropped = {
            let mut b = self.batcher.lock().unwrap_or_else(|p| p.into_inner());
            let chunks = b.take(Instant::now(), true);
            let _ = b.take_holds();
            chunks.iter().map(|c| c.records.len()).sum::<usize>()
        };
        // a shard still publishing would put outputs of input that is read
        // again into the next transaction: none may be busy before it
        // begins (at the end, nothing begins: a late output fails outside
        // a transaction)
        let deadline = Instant::now() + self.drain_timeout.max(Duration::from_secs(1));
        let idle = !next
            || self.wait_until(deadline, || {
                self.queued.events.load(Ordering::SeqCst) == 0 && self.publisher.busy() == 0
            });
        if !idle {
            self.txn_fail(format!(
                "an inference shard was still busy {:?} after the transaction failed; \
                 it cannot be aborted safely",
                self.drain_timeout
            ));
            return;
        }
        let producer = &self.publisher.producer;
        if let Err(e) = retry("abort_transaction", |t| producer.abort_transaction(t)) {
            self.txn_fail(format!(
                "{} (aborting the transaction; the broker aborts it after transaction.timeout.ms)",
                describe(&e, &txn.id)
            ));
            return;
        }
        txn.open.store(false, Ordering::SeqCst);
        txn.events.store(0, Ordering::Relaxed);
        self.metrics.add(
            "ml_worker_transactions_aborted_total",
            &[("reason", reason)],
            1,
        );
        tracing::warn!(
            reason,
            held_dropped = dropped,
            "exactly-once: transaction aborted; its input is read again from the last commit"
        );
        if !next {
            return;
        }
        if let Err(why) = self.txn_rewind(consumer) {
            self.txn_fail(why);
            return;
        }
        self.publisher.set_txn_abort(false);
        self.txn_begin();
    }

    /// Seeks every assigned partition back to its committed offset and
    /// gives it a fresh slot and tracker state; releases parked partitions.
    fn txn_rewind(&self, consumer: &BaseConsumer<WorkerContext>) -> Result<(), String> {
        let txn = self.txn();
        let assignment = consumer
            .assignment()
            .map_err(|e| format!("rewinding after an abort: no assignment: {e}"))?;
        let mut ask = TopicPartitionList::new();
        for e in assignment.elements() {
            ask.add_partition(e.topic(), e.partition());
        }
        // the group's committed offsets (read_committed: stable ones only,
        // librdkafka waits for a transaction in the middle of committing)
        let broker = consumer.committed_offsets(ask, CALL_TIMEOUT);
        let own = txn
            .committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for e in assignment.elements() {
            let key = (e.topic().to_string(), e.partition());
            let stored = match &broker {
                Ok(list) => list
                    .find_partition(e.topic(), e.partition())
                    .map(|p| p.offset()),
                Err(_) => None,
            };
            let to =
                match (stored, own.get(&key)) {
                    // both are commits of this partition: the later one holds
                    (Some(Offset::Offset(o)), Some(&mine)) => Offset::Offset(o.max(mine)),
                    (Some(Offset::Offset(o)), None) => Offset::Offset(o),
                    (_, Some(&o)) => Offset::Offset(o),
                    // nothing committed yet: where reading began
                    (Some(_), None) => Offset::Beginning,
                    (None, None) => {
                        return Err(format!(
                        "rewinding after an abort: the committed offset of {}[{}] is unknown ({})",
                        e.topic(),
                        e.partition(),
                        broker.as_ref().err().map_or("not returned".into(), |e| e.to_string())
                    ))
                    }
                };
            consumer
                .seek(e.topic(), e.partition(), to, Duration::ZERO)
                .map_err(|err| {
                    format!(
                        "rewinding after an abort: seeking {}[{}] to {to:?}: {err}",
                        e.topic(),
                        e.partition()
                    )
                })?;
            tracing::info!(topic = e.topic(), partition = e.partition(), offset = ?to, "rewound");
        }
        {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
            let mut b = self.batcher.lock().unwrap_or_else(|p| p.into_inner());
            *t = OffsetTracker::default();
            for e in assignment.elements() {
                if let Some(old) = slots.current_slot(e.topic(), e.partition()) {
                    b.unpark(old);
                }
                t.assign(slots.assign(e.topic(), e.partition()));
            }
        }
        // partitions parked on a schema or a model read again from their
        // rewound offset (back-pressure keeps everything paused until it
        // resumes, and resumes these too)
        if !self.paused.load(Ordering::Relaxed) {
            if let Err(e) = consumer.resume(&assignment) {
                tracing::warn!(error = %e, "could not resume partitions after a rewind");
            }
        }
        Ok(())
    }

    /// Fenced, or a fatal error: stops the worker; nothing more is
    /// committed.
    fn txn_fail(&self, why: String) {
        let txn = self.txn();
        if txn.failed.set(why.clone()).is_ok() {
            tracing::error!(
                transactional_id = %txn.id,
                "exactly-once: {why}; the worker stops (exit status non-zero) and commits nothing \
                 more; a restart resumes from the last committed transaction"
            );
        }
        txn.open.store(false, Ordering::SeqCst);
        // the run loop stops on it; shards drop what they get
        self.publisher
            .producer
            .context()
            .fatal
            .store(true, Ordering::Relaxed);
    }
}
