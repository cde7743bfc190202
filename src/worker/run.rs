//! The worker as a pipeline, top to bottom:
//!
//! 1. **consume** ([`consume`](super::consume)): one thread polls the
//!    assigned partitions, decodes and routes each record, and batches rows
//!    per model ([`batch`](super::batch)); a partition whose record waits for
//!    a schema or a model load is held back, the others go on.
//! 2. **rebalance** ([`rebalance`](super::rebalance)): partitions come and
//!    go inside `poll`; a revoked one's in-flight events finish and are
//!    committed first.
//! 3. **infer** ([`infer`](super::infer)): closed chunks go to inference
//!    shards (a partition always to the same one, so its outputs keep input
//!    order); model code runs under its deadline.
//! 4. **produce** ([`produce`](super::produce)): predictions, signals and
//!    dead letters in input order; each acknowledgement acks its input in
//!    the offset tracker, and [`commit`](super::commit) commits what is safe;
//!    under `exactly-once`, outputs and offsets are committed together in
//!    Kafka transactions ([`transaction`](super::transaction)).
//! 5. **drain** ([`drain`](super::drain)): on stop, finish what was read,
//!    commit, leave the group.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::events::{Codec, SchemaIds, WireFormat};
use crate::worker::batch::Batcher;
use crate::worker::clients::client_configs;
use crate::worker::config::{DeliveryMode, WorkerConfig};
use crate::worker::consume::{turn, Clock};
use crate::worker::drain::drain;
use crate::worker::fetch::FetchQueue;
use crate::worker::infer::Shards;
use crate::worker::metrics::Metrics;
use crate::worker::offsets::{OffsetTracker, Slots};
use crate::worker::produce::Publisher;
use crate::worker::rebalance::WorkerContext;
use crate::worker::reload::{Models, Reloader};
use crate::worker::schema_registry::SchemaRegistry;
use crate::worker::shared::Shared;
use crate::worker::transaction::{self, Txn};

/// Why the worker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("kafka client: {}", crate::worker::clients::describe(.0))]
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
    /// `exactly-once`: the transactional producer was fenced or failed.
    #[error("exactly-once: {0}")]
    Transaction(String),
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

/// A worker's endpoints, once started.
#[derive(Debug, Clone)]
pub struct Started {
    pub metrics_address: std::net::SocketAddr,
    /// `bootstrap.servers` in use.
    pub brokers: String,
}

/// Runs the worker until `stop` is set, then drains and commits.
/// `on_start` is told the metrics address once everything is up.
/// `models` serves the registry (reloaded in place when it came from a
/// file: on SIGHUP (see [`crate::worker::reload::SIGHUPS`]), a file change,
/// `POST /admin/reload`).
pub fn run(
    cfg: Arc<WorkerConfig>,
    brokers: &str,
    models: Arc<Models>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    on_start: impl FnOnce(Started),
) -> Result<Summary, WorkerError> {
    // start: reloads, metrics endpoint, codecs, producer, inference shards, consumer
    let reloader = Reloader::start(models.clone(), &cfg.reload)
        .map_err(|e| WorkerError::Thread(e.to_string()))?;
    let http_stop = Arc::new(AtomicBool::new(false));
    let admin = crate::worker::metrics::Admin {
        reload: models.file().map(|_| reloader.requests()),
        token: cfg.reload.token.clone(),
    };
    metrics.zero_known_series();
    let metrics_address = crate::worker::metrics::serve(
        cfg.metrics_address,
        metrics.clone(),
        admin,
        http_stop.clone(),
    )
    .map_err(|source| WorkerError::Metrics {
        address: cfg.metrics_address,
        source,
    })?;
    let _stop_http = StopOnDrop(http_stop);
    metrics.models_loaded.store(true, Ordering::Relaxed);
    let codecs = Codecs::new(&cfg)?;
    let (consumer_cfg, producer_cfg) = client_configs(&cfg, brokers);
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let publisher = Arc::new(Publisher::new(
        &producer_cfg,
        codecs.predictions,
        codecs.signals,
        codecs.shadow,
        cfg.dead_letters.clone(),
        tracker.clone(),
        metrics.clone(),
    )?);
    // exactly-once: the transactional id registered, the first transaction begun
    let txn = match cfg.mode {
        DeliveryMode::ExactlyOnce => {
            let txn = Arc::new(Txn::new(&cfg));
            transaction::start(&txn, &publisher, &stop).map_err(WorkerError::Transaction)?;
            Some(txn)
        }
        _ => None,
    };
    let thread_error = |e: std::io::Error| WorkerError::Thread(e.to_string());
    let (shards, senders) =
        Shards::start(cfg.inference_threads, &publisher).map_err(thread_error)?;
    let batcher = Batcher::new(
        codecs.input,
        codecs.registry,
        models.current(),
        cfg.clone(),
        senders.len(),
        metrics.clone(),
        shards.pool.clone(),
    )
    .map_err(thread_error)?;
    let shared = Arc::new(Shared {
        batcher: Mutex::new(batcher),
        tracker,
        slots: Mutex::new(Slots::default()),
        senders,
        queued: shards.queued.clone(),
        metrics: metrics.clone(),
        mode: cfg.mode,
        drain_timeout: cfg.shutdown_timeout,
        paused: AtomicBool::new(false),
        publisher: publisher.clone(),
        stopping: AtomicBool::new(false),
        resets: Mutex::new(Vec::new()),
        fetch: OnceLock::new(),
        committed: Mutex::new(Default::default()),
        models,
        txn: txn.clone(),
    });
    let consumer: BaseConsumer<WorkerContext> =
        consumer_cfg.create_with_context(WorkerContext {
            shared: shared.clone(),
            repeats: Default::default(),
        })?;
    // declared after the consumer: dropped before it on every return path
    let fetch = Arc::new(FetchQueue::new(&consumer));
    let _ = shared.fetch.set(Arc::downgrade(&fetch));
    let topics: Vec<&str> = cfg.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(brokers, group = %cfg.group_id, topics = ?cfg.input_topics,
        shards = cfg.inference_threads, metrics = %metrics_address, "worker started");
    on_start(Started {
        metrics_address,
        brokers: brokers.to_string(),
    });

    // consume until stopped, or until a shard or the producer fails
    let mut clock = Clock::new();
    while !stop.load(Ordering::Relaxed) {
        if shards.failed() || publisher.fatal() {
            tracing::error!(
                "stopping: an inference thread failed or the producer hit a fatal error"
            );
            break;
        }
        turn(&consumer, &fetch, &shared, &publisher, &cfg, &mut clock);
    }

    // drain (no reload starts or waits for a swap from now on)
    shared.models.stop();
    let failure = shards.failed() || publisher.fatal();
    let drained = drain(consumer, fetch, shared, shards, &publisher, &cfg);
    let summary = Summary {
        events_in: metrics.total("ml_worker_events_in_total"),
        outputs_acked: metrics.acked.load(Ordering::Relaxed),
        dead_letters: metrics.total("ml_worker_dead_letters_total"),
        in_flight_at_exit: drained.in_flight_at_exit,
        clean: drained.clean,
    };
    tracing::info!(?summary, "worker stopped");
    if let Some(why) = txn.and_then(|t| t.failure()) {
        return Err(WorkerError::Transaction(why));
    }
    if failure {
        return Err(WorkerError::Thread(
            "an inference thread failed or the producer hit a fatal error; uncommitted events are read again on restart".into(),
        ));
    }
    Ok(summary)
}

/// The input and output codecs, with a schema registry client for `avro`
/// topics (output schemas registered at start).
struct Codecs {
    registry: Option<SchemaRegistry>,
    input: Codec,
    predictions: (String, Codec),
    signals: (String, Codec),
    shadow: (String, Codec),
}

impl Codecs {
    fn new(cfg: &WorkerConfig) -> Result<Codecs, WorkerError> {
        let registry = cfg
            .schema_registry
            .as_ref()
            .map(SchemaRegistry::new)
            .transpose()
            .map_err(WorkerError::SchemaRegistry)?;
        let output = |format: WireFormat, topic: &str, signal: bool| {
            let ids = match (format, &registry) {
                (WireFormat::Avro, Some(sr)) => sr
                    .output_ids(topic, signal)
                    .map_err(WorkerError::SchemaRegistry)?,
                _ => SchemaIds::default(),
            };
            Ok::<_, WorkerError>((topic.to_string(), Codec::new(format, ids)))
        };
        let predictions = output(cfg.predictions.format, &cfg.predictions.topic, false)?;
        let signals = output(cfg.signals.format, &cfg.signals.topic, true)?;
        let shadow = output(cfg.shadow.format, &cfg.shadow.topic, false)?;
        Ok(Codecs {
            input: Codec::new(cfg.input_format, SchemaIds::default()),
            predictions,
            signals,
            shadow,
            registry,
        })
    }
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
