//! Committing input offsets: what the tracker says is safe, periodically
//! (async, re-issued when it fails), on revocation and at shutdown (sync),
//! and before serving under at-most-once; every attempt counted, and the
//! committed-offset lag per partition.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use crate::worker::batch::Chunk;
use crate::worker::config::DeliveryMode;
use crate::worker::rebalance::WorkerContext;
use crate::worker::shared::Shared;

impl Shared {
    /// (a few tries). Returns whether they were.
    pub(super) fn commit_read(
        &self,
        consumer: &BaseConsumer<WorkerContext>,
        chunk: &Chunk,
    ) -> bool {
        let mut next: HashMap<(&str, i32), i64> = HashMap::new();
        for r in &chunk.records {
            let o = next.entry((&r.topic, r.partition)).or_insert(0);
            *o = (*o).max(r.offset + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in next {
            let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset));
        }
        for attempt in 1..=3 {
            let r = consumer.commit(&tpl, CommitMode::Sync);
            self.count_commit(&r);
            match r {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "at-most-once commit failed");
                    std::thread::sleep(Duration::from_millis(50 * attempt));
                }
            }
        }
        false
    }
    /// A commit failed: its offsets are handed out again next time.
    pub(super) fn commit_failed(&self, offsets: &TopicPartitionList) {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        for e in offsets.elements() {
            if let (Some(slot), Offset::Offset(o)) =
                (slots.current_slot(e.topic(), e.partition()), e.offset())
            {
                t.commit_failed(slot, o);
            }
        }
    }
    /// commit (if any) succeeded.
    pub(super) fn commit(&self, consumer: &BaseConsumer<WorkerContext>, mode: CommitMode) -> bool {
        // at-most-once commits before serving; exactly-once in transactions
        if self.mode != DeliveryMode::AtLeastOnce {
            return true;
        }
        let moved = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_committable();
        if moved.is_empty() {
            return true;
        }
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut tpl = TopicPartitionList::new();
        for (slot, offset) in moved {
            if let Some((topic, partition)) = slots.name(slot) {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset));
            }
        }
        drop(slots);
        if tpl.count() == 0 {
            return true;
        }
        let result = match mode {
            CommitMode::Sync => consumer.commit(&tpl, mode),
            CommitMode::Async => commit_async(consumer, &tpl),
        };
        // an async commit's result comes to `commit_callback`, unless it
        // failed before it was sent
        if matches!(mode, CommitMode::Sync) || result.is_err() {
            self.count_commit(&result);
            match &result {
                Ok(()) => self.committed(&tpl),
                Err(_) => self.commit_failed(&tpl),
            }
        }
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "offset commit failed; it is retried");
                false
            }
        }
    }
    /// measures from them.
    pub(super) fn committed(&self, offsets: &TopicPartitionList) {
        let mut c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        for e in offsets.elements() {
            if let (Ok(()), Offset::Offset(o)) = (e.error(), e.offset()) {
                c.insert((e.topic().to_string(), e.partition()), o);
            }
        }
    }
    /// saw, no request) less its committed offset.
    pub(super) fn report_commit_lag(&self, consumer: &BaseConsumer<WorkerContext>) {
        let committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        let m = &self.metrics;
        m.clear_gauge("ml_worker_committed_offset_lag");
        for ((topic, partition), offset) in committed.iter() {
            let Some((_, high)) =
                cached_watermarks(consumer, topic, *partition).filter(|&(_, high)| high >= 0)
            else {
                continue;
            };
            m.set_gauge(
                "ml_worker_committed_offset_lag",
                &[("topic", topic), ("partition", &partition.to_string())],
                (high - offset).max(0) as f64,
            );
        }
    }

    pub(super) fn count_commit(&self, r: &KafkaResult<()>) {
        let result = if r.is_ok() { "ok" } else { "error" };
        self.metrics
            .add("ml_worker_commits_total", &[("result", result)], 1);
    }
}

/// An asynchronous commit whose result reaches `commit_callback`.
/// `rd_kafka_commit(async)` sends its result nowhere the application sees
/// (rust-rdkafka takes results as events, not through `offset_commit_cb`),
/// so a failed periodic commit went unnoticed and was never re-issued; this
/// asks for the result on the consumer queue, which `poll` serves.
fn commit_async(
    consumer: &BaseConsumer<WorkerContext>,
    tpl: &TopicPartitionList,
) -> KafkaResult<()> {
    use rdkafka::types::RDKafkaErrorCode;
    let rk = consumer.client().native_ptr();
    // SAFETY: the consumer's live handle; the queue reference is released
    // here (the commit holds its own); `tpl` is copied by librdkafka
    let err = unsafe {
        let queue = rdkafka::bindings::rd_kafka_queue_get_consumer(rk);
        if queue.is_null() {
            return Err(rdkafka::error::KafkaError::ConsumerCommit(
                RDKafkaErrorCode::UnknownGroup,
            ));
        }
        let err = rdkafka::bindings::rd_kafka_commit_queue(
            rk,
            tpl.ptr(),
            queue,
            None,
            std::ptr::null_mut(),
        );
        rdkafka::bindings::rd_kafka_queue_destroy(queue);
        err
    };
    match RDKafkaErrorCode::from(err) {
        RDKafkaErrorCode::NoError => Ok(()),
        code => Err(rdkafka::error::KafkaError::ConsumerCommit(code)),
    }
}

/// The low and high watermarks librdkafka last saw for a partition (no
/// request).
pub(super) fn cached_watermarks(
    consumer: &BaseConsumer<WorkerContext>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the consumer's live handle; librdkafka reads its cached
    // watermarks into the two locals
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    let ok =
        rdkafka::types::RDKafkaErrorCode::from(err) == rdkafka::types::RDKafkaErrorCode::NoError;
    ok.then_some((low, high))
}
