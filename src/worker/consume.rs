//! One turn of the consume loop: poll the main queue and a burst of the
//! fetch queue into the batcher, hand closed chunks to the shards, hold
//! back partitions that wait for a schema or a model; every 10 ms the
//! housekeeping (retries, skipped-input reports, in-flight gauges,
//! back-pressure, resuming partitions whose wait is over); every
//! `commit_interval`, a commit.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::worker::batch::Hold;
use crate::worker::commit::cached_watermarks;
use crate::worker::config::WorkerConfig;
use crate::worker::fetch::{FetchQueue, Incoming, MAX_BURST};
use crate::worker::metrics::Metrics;
use crate::worker::produce::Publisher;
use crate::worker::rebalance::WorkerContext;
use crate::worker::resets;
use crate::worker::shared::Shared;

/// When the loop last did its periodic work.
pub(super) struct Clock {
    last_commit: Instant,
    last_tick: Instant,
}

impl Clock {
    pub(super) fn new() -> Clock {
        let now = Instant::now();
        Clock {
            last_commit: now,
            last_tick: now,
        }
    }
}

/// How often the housekeeping runs.
const TICK: Duration = Duration::from_millis(10);

/// One turn of the loop: read a burst (waiting at most until the next
/// batch must close, 100 ms when idle), batch it, hand closed chunks to the
/// shards, hold back partitions that wait; then the periodic work.
pub(super) fn turn(
    consumer: &BaseConsumer<WorkerContext>,
    fetch: &FetchQueue,
    shared: &Shared,
    publisher: &Publisher,
    cfg: &WorkerConfig,
    clock: &mut Clock,
) {
    let now = Instant::now();
    let wait = shared
        .batcher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .next_deadline()
        .map_or(Duration::from_millis(100), |d| {
            d.saturating_duration_since(now)
        })
        .min(Duration::from_millis(100));
    read_burst(consumer, fetch, shared, wait);
    let now = Instant::now();
    let (chunks, holds) = {
        let mut b = shared.batcher.lock().unwrap_or_else(|p| p.into_inner());
        if shared.models.has_next() {
            if let Some(next) = shared.models.take_next() {
                // between two records: what was read so far is served by
                // the old registry, everything after by the new one
                b.swap_registry(next);
            }
        }
        (b.take(now, false), b.take_holds())
    };
    shared.dispatch(consumer, chunks, shared.senders.len());
    for h in &holds {
        hold(consumer, h);
    }
    if now.duration_since(clock.last_tick) >= TICK {
        clock.last_tick = now;
        housekeeping(consumer, shared, publisher, cfg);
    }
    if shared.txn.is_some() {
        // exactly-once: the open transaction ends here (committed when due,
        // aborted when it failed)
        if shared.transact(
            consumer,
            now.duration_since(clock.last_commit) >= cfg.commit_interval,
        ) {
            clock.last_commit = Instant::now();
            shared.report_commit_lag(consumer);
        }
    } else if now.duration_since(clock.last_commit) >= cfg.commit_interval {
        clock.last_commit = now;
        shared.commit(consumer, CommitMode::Async);
        shared.report_commit_lag(consumer);
    }
}

/// The main queue first (rebalances, commit results, errors, and records
/// fetched before their partition forwarded to `fetch`), then a burst of
/// records from the fetch queue, waiting there when idle. Every record goes
/// to the batcher with its partition's slot.
fn read_burst(
    consumer: &BaseConsumer<WorkerContext>,
    fetch: &FetchQueue,
    shared: &Shared,
    wait: Duration,
) {
    let metrics = &shared.metrics;
    let mut burst: Option<Instant> = None;
    let mut add = |result: Result<Incoming<'_>, rdkafka::error::KafkaError>| match result {
        Ok(msg) => {
            let now = *burst.get_or_insert_with(Instant::now);
            let slot = shared
                .slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .current_slot(msg.topic, msg.partition);
            match slot {
                Some(slot) => shared
                    .batcher
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .add(msg, slot, now),
                None => tracing::warn!(
                    topic = msg.topic,
                    partition = msg.partition,
                    "record from a partition not assigned here; skipped (not committed)"
                ),
            }
        }
        Err(e) => {
            let code = crate::worker::repeats::error_kind(&e);
            let repeats = &consumer.context().repeats;
            if let Some(held_back) = repeats.admit(&code) {
                tracing::warn!(
                    error = %e,
                    held_back,
                    last_connection_failure = repeats.last_failure().as_deref().unwrap_or("none"),
                    "consumer error (librdkafka retries; repeats are logged every 30 s)"
                );
            }
            metrics.add("ml_worker_consume_errors_total", &[("error", &code)], 1);
        }
    };
    let assigned = metrics.assigned.load(Ordering::Relaxed) > 0;
    let mut polled = 0;
    let mut next = consumer.poll(if assigned { Duration::ZERO } else { wait });
    while let Some(result) = next {
        match result {
            Ok(m) => add(Ok(Incoming::from_message(&m))),
            Err(e) => add(Err(e)),
        }
        polled += 1;
        if polled >= MAX_BURST {
            break;
        }
        next = consumer.poll(Duration::ZERO);
    }
    if assigned {
        fetch.consume(if polled > 0 { Duration::ZERO } else { wait }, &mut add);
    }
}

/// Every [`TICK`]: failed outputs sent again, input skipped by offset
/// resets reported, in-flight gauges, back-pressure, and partitions whose
/// schema or model wait is over resumed.
fn housekeeping(
    consumer: &BaseConsumer<WorkerContext>,
    shared: &Shared,
    publisher: &Publisher,
    cfg: &WorkerConfig,
) {
    let metrics = &shared.metrics;
    publisher.send_retries();
    report_skipped_input(consumer, shared, metrics);
    let in_flight = shared.in_flight();
    let bytes = shared.in_flight_bytes();
    metrics.in_flight.store(in_flight, Ordering::Relaxed);
    metrics.in_flight_bytes.store(bytes, Ordering::Relaxed);
    let paused = shared.paused.load(Ordering::Relaxed);
    if let Some(pause) = backpressure(paused, in_flight, bytes, cfg) {
        set_paused(consumer, shared, pause, in_flight, bytes);
    }
    resume_waited(consumer, shared);
}

/// Logs and counts the input skipped by offset resets librdkafka made
/// since the last call (see [`resets`]).
fn report_skipped_input(
    consumer: &BaseConsumer<WorkerContext>,
    shared: &Shared,
    metrics: &Metrics,
) {
    let found = std::mem::take(&mut *shared.resets.lock().unwrap_or_else(|p| p.into_inner()));
    for r in found {
        let (low, high) = cached_watermarks(consumer, &r.topic, r.partition).unwrap_or((-1, -1));
        let gone = resets::skipped(&r, low, high);
        if gone.is_empty() {
            tracing::warn!(topic = %r.topic, partition = r.partition, from = r.from, to = ?r.to,
                "consumer position reset without skipping input (records may be read again)");
            continue;
        }
        tracing::error!(
            topic = %r.topic,
            partition = r.partition,
            first = gone.start,
            last = gone.end - 1,
            count = gone.end - gone.start,
            "input skipped: offsets {}..={} were deleted by the broker before they were read              (retention, or the embedded broker's 5 MB per partition); they are neither predicted nor dead-lettered",
            gone.start,
            gone.end - 1
        );
        metrics.add(
            "ml_worker_input_skipped_total",
            &[("topic", &r.topic), ("partition", &r.partition.to_string())],
            (gone.end - gone.start) as u64,
        );
    }
}

/// Whether to pause (`Some(true)`) or resume (`Some(false)`) the input:
/// pause at `max_in_flight` events or `max_in_flight_mb` of input bytes,
/// resume once both are down to half.
fn backpressure(paused: bool, events: usize, bytes: usize, cfg: &WorkerConfig) -> Option<bool> {
    let over = events >= cfg.max_in_flight || bytes >= cfg.max_in_flight_bytes;
    let under = events <= cfg.max_in_flight / 2 && bytes <= cfg.max_in_flight_bytes / 2;
    match paused {
        false if over => Some(true),
        true if under => Some(false),
        _ => None,
    }
}

fn set_paused(
    consumer: &BaseConsumer<WorkerContext>,
    shared: &Shared,
    pause: bool,
    in_flight: usize,
    bytes: usize,
) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let r = if pause {
        consumer.pause(&assignment)
    } else {
        // partitions parked on a schema or a model stay paused
        let mut resume = TopicPartitionList::new();
        {
            let slots = shared.slots.lock().unwrap_or_else(|p| p.into_inner());
            let b = shared.batcher.lock().unwrap_or_else(|p| p.into_inner());
            for e in assignment.elements() {
                let parked = slots
                    .current_slot(e.topic(), e.partition())
                    .is_some_and(|slot| b.is_parked(slot));
                if !parked {
                    resume.add_partition(e.topic(), e.partition());
                }
            }
        }
        consumer.resume(&resume)
    };
    match r {
        Ok(()) => {
            if pause {
                shared
                    .metrics
                    .add("ml_worker_backpressure_pauses_total", &[], 1);
            }
            shared.paused.store(pause, Ordering::Relaxed);
            shared.metrics.paused.store(pause, Ordering::Relaxed);
            tracing::info!(in_flight, bytes, paused = pause, "backpressure");
        }
        Err(e) => tracing::warn!(error = %e, "pause/resume failed"),
    }
}

/// Holds a partition back at a record that waits for its schema or model:
/// pauses it and seeks it back there (librdkafka drops what it had
/// fetched past that point; the batcher drops what this burst had).
fn hold(consumer: &BaseConsumer<WorkerContext>, h: &Hold) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&h.topic, h.partition);
    if let Err(e) = consumer.pause(&tpl) {
        tracing::warn!(error = %e, topic = %h.topic, partition = h.partition, "could not pause a waiting partition");
    }
    if let Err(e) = consumer.seek(
        &h.topic,
        h.partition,
        Offset::Offset(h.offset),
        Duration::ZERO,
    ) {
        tracing::warn!(error = %e, topic = %h.topic, partition = h.partition, "could not seek a waiting partition back");
    }
}

/// Resumes the partitions whose schema or model wait is over (unless
/// back-pressure holds every partition: its resume covers them).
fn resume_waited(consumer: &BaseConsumer<WorkerContext>, shared: &Shared) {
    let ready = {
        let mut b = shared.batcher.lock().unwrap_or_else(|p| p.into_inner());
        if !b.parking() {
            return;
        }
        b.take_resumable()
    };
    if ready.is_empty() || shared.paused.load(Ordering::Relaxed) {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for h in &ready {
        tpl.add_partition(&h.topic, h.partition);
        tracing::info!(topic = %h.topic, partition = h.partition, offset = h.offset, "waiting partition resumes");
    }
    if let Err(e) = consumer.resume(&tpl) {
        tracing::warn!(error = %e, "could not resume waiting partitions");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backpressure_pauses_on_events_or_bytes_and_resumes_when_both_are_at_half() {
        let shipped = include_str!("../../config/worker.yaml");
        let yaml = shipped
            .replace("max_in_flight: 100000", "max_in_flight: 1000")
            .replace("max_in_flight_mb: 256", "max_in_flight_mb: 2");
        assert_ne!(yaml, shipped);
        let mut cfg = crate::worker::config::parse_worker_config(
            &yaml,
            std::path::Path::new("config/worker.yaml"),
            &crate::worker::config::Overrides::default(),
        )
        .unwrap();
        let mb = 1 << 20;
        assert_eq!(cfg.max_in_flight_bytes, 2 * mb);
        // running: pause on either limit
        assert_eq!(backpressure(false, 999, 2 * mb - 1, &cfg), None);
        assert_eq!(backpressure(false, 1000, 0, &cfg), Some(true));
        assert_eq!(
            backpressure(false, 1, 2 * mb, &cfg),
            Some(true),
            "a few huge records"
        );
        // paused: resume only when both are at half
        assert_eq!(backpressure(true, 500, mb + 1, &cfg), None);
        assert_eq!(backpressure(true, 501, mb, &cfg), None);
        assert_eq!(backpressure(true, 500, mb, &cfg), Some(false));
        cfg.max_in_flight = 10;
        assert_eq!(backpressure(true, 6, 0, &cfg), None);
    }
}
