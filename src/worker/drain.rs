//! Shutting down: stop reading, finish what was read (up to
//! `shutdown_timeout`), make the final commit, leave the group, and let the
//! inference threads end, never waiting past the deadline for a model that
//! does not return. Whatever is not finished stays uncommitted and is read
//! again on restart.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};

use crate::worker::config::WorkerConfig;
use crate::worker::fetch::FetchQueue;
use crate::worker::infer::Shards;
use crate::worker::produce::Publisher;
use crate::worker::rebalance::WorkerContext;
use crate::worker::shared::Shared;

/// How the drain ended.
pub(super) struct Drained {
    /// Everything read was finished and committed in time.
    pub(super) clean: bool,
    /// Events read and not finished (read again on restart).
    pub(super) in_flight_at_exit: usize,
}

/// Drains and closes the consumer; takes everything that must be dropped
/// in order (the fetch queue before its client, the client before the
/// shard channels close).
pub(super) fn drain(
    consumer: BaseConsumer<WorkerContext>,
    fetch: Arc<FetchQueue>,
    shared: Arc<Shared>,
    shards: Shards,
    publisher: &Publisher,
    cfg: &WorkerConfig,
) -> Drained {
    shared.metrics.stopping.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + cfg.shutdown_timeout;
    tracing::info!(in_flight = shared.in_flight(), timeout = ?cfg.shutdown_timeout, "stopping: draining in-flight events");
    if let Ok(assignment) = consumer.assignment() {
        let _ = consumer.pause(&assignment);
    }
    let chunks = shared
        .batcher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take(Instant::now(), true);
    shared.dispatch(&consumer, chunks, shared.senders.len());
    let drained = if shared.txn.is_some() {
        // exactly-once: the open transaction commits everything read, or
        // is aborted (read again on restart)
        shared.txn_finish(&consumer, deadline)
    } else {
        shared.wait_until(deadline, || {
            publisher.send_retries();
            let _ = consumer.poll(Duration::ZERO);
            shared.in_flight() == 0 && publisher.retries_pending() == 0
        })
    };
    if !drained {
        publisher.abort.store(true, Ordering::Relaxed);
    }
    // the final commit, retried (e.g. while a rebalance completes) until the deadline
    let final_deadline = deadline.max(Instant::now() + Duration::from_secs(2));
    while shared.txn.is_none()
        && !shared.commit(&consumer, CommitMode::Sync)
        && Instant::now() < final_deadline
    {
        let _ = consumer.poll(Duration::from_millis(100));
    }
    let in_flight_at_exit = shared.in_flight();
    if in_flight_at_exit > 0 {
        tracing::warn!(
            in_flight = in_flight_at_exit,
            "drain deadline passed: these events stay uncommitted and are read again on restart"
        );
    }
    shared.stopping.store(true, Ordering::Relaxed);
    consumer.unsubscribe();
    // the fetch queue goes before its client
    drop(fetch);
    // close shard channels so the threads end
    drop(consumer);
    let shared = Arc::into_inner(shared);
    drop(shared);
    // inference threads finish what they hold, but never past the drain
    // deadline: a model that does not return must not hold the exit
    let threads = shards.threads;
    let join_deadline = final_deadline.max(Instant::now() + Duration::from_millis(200));
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < join_deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let stuck = threads.iter().filter(|t| !t.is_finished()).count();
    if stuck > 0 {
        tracing::warn!(threads = stuck, "inference threads still busy at the drain deadline; exiting without them (their events stay uncommitted)");
        crate::deadline::abandon(stuck);
    }
    for t in threads.into_iter().filter(|t| t.is_finished()) {
        let _ = t.join();
    }
    publisher.flush(Instant::now() + Duration::from_millis(200));
    Drained {
        clean: drained,
        in_flight_at_exit,
    }
}
