//! The consume loop: poll, batch, hand chunks to inference threads, commit
//! what is safe, pause when too much is in flight, and drain on shutdown.
//!
//! Threads: this loop (poll, decode, route, batch, commit), `inference`
//! shards (score and produce; a partition always goes to the same shard, so
//! its outputs keep input order), librdkafka's own threads, and the metrics
//! endpoint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientConfig, ClientContext, Offset, Statistics, TopicPartitionList};

use crate::events::{Codec, SchemaIds, WireFormat};
use crate::registry::Registry;
use crate::worker::batch::{Batcher, Chunk, Hold};
use crate::worker::config::{DeliveryMode, GroupProtocol, WorkerConfig};
use crate::worker::fetch::{FetchQueue, Incoming, MAX_BURST};
use crate::worker::metrics::Metrics;
use crate::worker::offsets::{OffsetTracker, Slot, Slots};
use crate::worker::publish::{inference_loop, Publisher, Queued};
use crate::worker::resets;
use crate::worker::schema_registry::SchemaRegistry;

/// Why the worker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("schema registry: {0}")]
    SchemaRegistry(String),
    #[error("metrics endpoint {address}: {source}")]
    Metrics {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Thread(String),
}

/// What a run did, for logs and the demo summary.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub events_in: u64,
    pub outputs_acked: u64,
    pub dead_letters: u64,
    pub in_flight_at_exit: usize,
    pub clean: bool,
}

/// State shared by the loop and the rebalance callbacks (which run inside
/// `poll`, on the loop's thread).
struct Shared {
    batcher: Mutex<Batcher>,
    tracker: Arc<Mutex<OffsetTracker>>,
    slots: Mutex<Slots>,
    senders: Vec<Sender<Chunk>>,
    /// Records handed to shards and not yet tracked.
    queued: Arc<Queued>,
    metrics: Arc<Metrics>,
    mode: DeliveryMode,
    drain_timeout: Duration,
    paused: AtomicBool,
    publisher: Arc<Publisher>,
    /// Shutting down: revocations do not wait for a second drain.
    stopping: AtomicBool,
    /// Offset resets librdkafka logged, for the run loop to report.
    resets: Mutex<Vec<resets::OffsetReset>>,
    /// Where newly assigned partitions forward their records. Weak: the
    /// run loop holds the queue and drops it before the consumer, on every
    /// path (the queue must not outlive its client).
    fetch: OnceLock<Weak<FetchQueue>>,
    /// Offsets the broker has taken, by partition (for the lag gauge).
    committed: Mutex<HashMap<(String, i32), i64>>,
}

impl Shared {
    /// Hands closed chunks to their shards (at-most-once: commits first).
    fn dispatch(&self, consumer: &BaseConsumer<WorkerContext>, chunks: Vec<Chunk>, shards: usize) {
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
            self.queued.add(&chunk);
            if let Err(e) = self.senders[shard].send(chunk) {
                // the shard is gone (only at exit): these inputs stay uncommitted
                self.queued.remove(&e.0);
                tracing::error!("inference shard {shard} stopped; batch left uncommitted");
            }
        }
    }

    /// At-most-once: the chunk's offsets are committed before any output
    /// (a few tries). Returns whether they were.
    fn commit_read(&self, consumer: &BaseConsumer<WorkerContext>, chunk: &Chunk) -> bool {
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
    fn commit_failed(&self, offsets: &TopicPartitionList) {
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

    /// Commits every offset that moved. Sync or async; returns whether the
    /// commit (if any) succeeded.
    fn commit(&self, consumer: &BaseConsumer<WorkerContext>, mode: CommitMode) -> bool {
        if self.mode == DeliveryMode::AtMostOnce {
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

    /// The broker took these offsets: the committed-offset lag gauge
    /// measures from them.
    fn committed(&self, offsets: &TopicPartitionList) {
        let mut c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        for e in offsets.elements() {
            if let (Ok(()), Offset::Offset(o)) = (e.error(), e.offset()) {
                c.insert((e.topic().to_string(), e.partition()), o);
            }
        }
    }

    /// Sets `ml_worker_committed_offset_lag` for every assigned partition
    /// whose commit is known: its end (the high watermark librdkafka last
    /// saw, no request) less its committed offset.
    fn report_commit_lag(&self, consumer: &BaseConsumer<WorkerContext>) {
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

    fn count_commit(&self, r: &KafkaResult<()>) {
        let result = if r.is_ok() { "ok" } else { "error" };
        self.metrics
            .add("ml_worker_commits_total", &[("result", result)], 1);
    }

    /// Waits until `done` holds or the drain deadline passes.
    fn wait_until(&self, deadline: Instant, done: impl Fn() -> bool) -> bool {
        while !done() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    fn in_flight(&self) -> usize {
        let tracked = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .in_flight();
        let held = self.batcher.lock().map(|b| b.held()).unwrap_or(0);
        tracked + self.queued.events.load(Ordering::Relaxed) + held
    }

    /// Bytes of input values and keys read and not yet handed to the producer.
    fn in_flight_bytes(&self) -> usize {
        let held = self.batcher.lock().map(|b| b.held_bytes()).unwrap_or(0);
        self.queued.bytes.load(Ordering::Relaxed) + held
    }
}

/// The consumer's context: rebalances, commit results, statistics.
pub struct WorkerContext {
    shared: Arc<Shared>,
}

impl ClientContext for WorkerContext {
    /// librdkafka's log lines, into tracing; offset resets are also kept for
    /// the run loop, which reports the input they skipped.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if fac == "OFFSET" {
            if let Some(r) = resets::parse(message) {
                self.shared
                    .resets
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(r);
            }
        }
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

    fn stats(&self, stats: Statistics) {
        let m = &self.shared.metrics;
        m.clear_gauge("ml_worker_consumer_lag");
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    m.set_gauge(
                        "ml_worker_consumer_lag",
                        &[("topic", topic), ("partition", &p.to_string())],
                        part.consumer_lag as f64,
                    );
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
        if s.paused.load(Ordering::Relaxed) {
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error = %e, "could not pause newly assigned partitions");
            }
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

/// librdkafka settings of the worker's two clients.
fn client_configs(cfg: &WorkerConfig, brokers: &str) -> (ClientConfig, ClientConfig) {
    let mut consumer = ClientConfig::new();
    consumer
        .set("bootstrap.servers", brokers)
        .set("group.id", &cfg.group_id)
        .set("client.id", &cfg.client_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        // return fetches quickly when little is waiting (latency over fetch count)
        .set("fetch.wait.max.ms", "2");
    match cfg.group_protocol {
        GroupProtocol::Consumer => {
            consumer.set("group.protocol", "consumer");
        }
        GroupProtocol::Classic => {
            // a dead replica's partitions move after 10 s; a joining one is
            // noticed within a second (librdkafka: 45 s and 3 s)
            consumer
                .set("group.protocol", "classic")
                .set("partition.assignment.strategy", "cooperative-sticky")
                .set("session.timeout.ms", "10000")
                .set("heartbeat.interval.ms", "1000");
        }
    }
    // warnings reach WorkerContext::log (offset resets are reported there)
    consumer.set_log_level(RDKafkaLogLevel::Warning);
    let mut producer = ClientConfig::new();
    producer
        .set("bootstrap.servers", brokers)
        .set("client.id", &cfg.client_id)
        .set("enable.idempotence", "true")
        // 0: retry until delivered; shutdown and pausing bound the wait
        .set("message.timeout.ms", "0")
        // Java clients' partitioner: a symbol lands where they would put it
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set(
            "queue.buffering.max.messages",
            (cfg.max_in_flight * 3 + 10_000).min(10_000_000).to_string(),
        );
    for (k, v) in &cfg.librdkafka {
        consumer.set(k, v);
        producer.set(k, v);
    }
    (consumer, producer)
}

/// A worker's endpoints, once started.
#[derive(Debug, Clone)]
pub struct Started {
    pub metrics_address: std::net::SocketAddr,
    /// `bootstrap.servers` in use.
    pub brokers: String,
}

/// Runs the worker until `stop` is set, then drains and commits.
/// `on_start` is told the metrics address once everything is up.
pub fn run(
    cfg: Arc<WorkerConfig>,
    brokers: &str,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    on_start: impl FnOnce(Started),
) -> Result<Summary, WorkerError> {
    let http_stop = Arc::new(AtomicBool::new(false));
    let metrics_address =
        crate::worker::metrics::serve(cfg.metrics_address, metrics.clone(), http_stop.clone())
            .map_err(|source| WorkerError::Metrics {
                address: cfg.metrics_address,
                source,
            })?;
    let _stop_http = StopOnDrop(http_stop);
    metrics.models_loaded.store(true, Ordering::Relaxed);

    // codecs (with a schema registry for `avro` topics)
    let registry_client = cfg
        .schema_registry
        .as_ref()
        .map(SchemaRegistry::new)
        .transpose()
        .map_err(WorkerError::SchemaRegistry)?;
    let ids = |format: WireFormat, topic: &str, signal: bool| -> Result<SchemaIds, WorkerError> {
        match (format, &registry_client) {
            (WireFormat::Avro, Some(sr)) => sr
                .output_ids(topic, signal)
                .map_err(WorkerError::SchemaRegistry),
            _ => Ok(SchemaIds::default()),
        }
    };
    let input_codec = Codec::new(cfg.input_format, SchemaIds::default());
    let predictions = (
        cfg.predictions.topic.clone(),
        Codec::new(
            cfg.predictions.format,
            ids(cfg.predictions.format, &cfg.predictions.topic, false)?,
        ),
    );
    let signals = (
        cfg.signals.topic.clone(),
        Codec::new(
            cfg.signals.format,
            ids(cfg.signals.format, &cfg.signals.topic, true)?,
        ),
    );

    let (consumer_cfg, producer_cfg) = client_configs(&cfg, brokers);
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let publisher = Arc::new(Publisher::new(
        &producer_cfg,
        predictions,
        signals,
        cfg.dead_letters.clone(),
        tracker.clone(),
        metrics.clone(),
        registry.clone(),
    )?);

    let shards = cfg.inference_threads;
    let queued = Arc::new(Queued::default());
    let pool: crate::worker::batch::ChunkPool = Arc::default();
    let failed = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    let mut threads = Vec::new();
    for i in 0..shards {
        let (tx, rx) = channel::<Chunk>();
        senders.push(tx);
        let (p, q, pl, f) = (
            publisher.clone(),
            queued.clone(),
            pool.clone(),
            failed.clone(),
        );
        // model code runs on its own thread, under a deadline
        let executor = crate::deadline::Executor::new(&format!("model-{i}"))
            .map_err(|e| WorkerError::Thread(e.to_string()))?;
        threads.push(
            std::thread::Builder::new()
                .name(format!("inference-{i}"))
                .spawn(move || inference_loop(p, rx, q, pl, f, executor))
                .map_err(|e| WorkerError::Thread(e.to_string()))?,
        );
    }
    let batcher = Batcher::new(
        input_codec,
        registry_client,
        registry,
        cfg.clone(),
        shards,
        metrics.clone(),
        pool,
    )
    .map_err(|e| WorkerError::Thread(e.to_string()))?;
    let shared = Arc::new(Shared {
        batcher: Mutex::new(batcher),
        tracker: tracker.clone(),
        slots: Mutex::new(Slots::default()),
        senders,
        queued: queued.clone(),
        metrics: metrics.clone(),
        mode: cfg.mode,
        drain_timeout: cfg.shutdown_timeout,
        paused: AtomicBool::new(false),
        publisher: publisher.clone(),
        stopping: AtomicBool::new(false),
        resets: Mutex::new(Vec::new()),
        fetch: OnceLock::new(),
        committed: Mutex::new(HashMap::new()),
    });
    let consumer: BaseConsumer<WorkerContext> =
        consumer_cfg.create_with_context(WorkerContext {
            shared: shared.clone(),
        })?;
    let topics: Vec<&str> = cfg.input_topics.iter().map(String::as_str).collect();
    // declared after the consumer: dropped before it on every return path
    let fetch = Arc::new(FetchQueue::new(&consumer));
    let _ = shared.fetch.set(Arc::downgrade(&fetch));
    consumer.subscribe(&topics)?;
    tracing::info!(brokers, group = %cfg.group_id, topics = ?cfg.input_topics, shards, metrics = %metrics_address, "worker started");
    on_start(Started {
        metrics_address,
        brokers: brokers.to_string(),
    });

    let mut last_commit = Instant::now();
    let mut last_tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if failed.load(Ordering::Relaxed) || publisher.fatal() {
            tracing::error!(
                "stopping: an inference thread failed or the producer hit a fatal error"
            );
            break;
        }
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
        // the main queue first (rebalances, commit results, errors, and
        // records fetched before their partition forwarded to `fetch`), then
        // a burst of records from the fetch queue, waiting there when idle
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
                tracing::warn!(error = %e, "consumer error (librdkafka retries)");
                let code = e
                    .rdkafka_error_code()
                    .map_or_else(|| "other".to_string(), |c| format!("{c:?}"));
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
        let now = Instant::now();
        let (chunks, holds) = {
            let mut b = shared.batcher.lock().unwrap_or_else(|p| p.into_inner());
            (b.take(now, false), b.take_holds())
        };
        shared.dispatch(&consumer, chunks, shards);
        for h in &holds {
            hold(&consumer, h);
        }

        if now.duration_since(last_tick) >= Duration::from_millis(10) {
            last_tick = now;
            publisher.send_retries();
            report_skipped_input(&consumer, &shared, &metrics);
            let in_flight = shared.in_flight();
            let bytes = shared.in_flight_bytes();
            metrics.in_flight.store(in_flight, Ordering::Relaxed);
            metrics.in_flight_bytes.store(bytes, Ordering::Relaxed);
            let paused = shared.paused.load(Ordering::Relaxed);
            if let Some(pause) = backpressure(paused, in_flight, bytes, &cfg) {
                set_paused(&consumer, &shared, pause, in_flight, bytes);
            }
            resume_waited(&consumer, &shared);
        }
        if now.duration_since(last_commit) >= cfg.commit_interval {
            last_commit = now;
            shared.commit(&consumer, CommitMode::Async);
            shared.report_commit_lag(&consumer);
        }
    }

    // drain: stop reading, finish what was read, commit, leave the group
    metrics.stopping.store(true, Ordering::Relaxed);
    let failure = failed.load(Ordering::Relaxed) || publisher.fatal();
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
    shared.dispatch(&consumer, chunks, shards);
    let drained = shared.wait_until(deadline, || {
        publisher.send_retries();
        let _ = consumer.poll(Duration::ZERO);
        shared.in_flight() == 0 && publisher.retries_pending() == 0
    });
    if !drained {
        publisher.abort.store(true, Ordering::Relaxed);
    }
    // the final commit, retried (e.g. while a rebalance completes) until the deadline
    let final_deadline = deadline.max(Instant::now() + Duration::from_secs(2));
    while !shared.commit(&consumer, CommitMode::Sync) && Instant::now() < final_deadline {
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
    let summary = Summary {
        events_in: metrics.total("ml_worker_events_in_total"),
        outputs_acked: metrics.acked.load(Ordering::Relaxed),
        dead_letters: metrics.total("ml_worker_dead_letters_total"),
        in_flight_at_exit,
        clean: drained,
    };
    tracing::info!(?summary, "worker stopped");
    if failure {
        return Err(WorkerError::Thread(
            "an inference thread failed or the producer hit a fatal error; uncommitted events are read again on restart".into(),
        ));
    }
    Ok(summary)
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
fn cached_watermarks(
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

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
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
