//! `ml-worker bench`: end-to-end throughput and latency of the worker, each
//! against a pass-through floor measured in the same run, on the embedded
//! broker or on an existing cluster (`--brokers`).
//!
//! Throughput (rounds alternate 1 and 2; the medians are reported, so a
//! drift in the shared machine's speed hits both):
//! 1. Baseline: a plain consumer-to-producer loop (no decode, no inference)
//!    copies N records while a producer writes them.
//! 2. Worker: the real worker serves N feature events for one model while the
//!    same producer writes them; done when 2N outputs (prediction + signal)
//!    are acknowledged.
//!
//! The producer never runs more than a window ahead (the embedded broker's
//! log per partition is bounded).
//!
//! Latency (`latency_rounds` rounds; each has a floor phase and a worker
//! phase, which goes first alternates): on fresh topics, a backlog of
//! feature events is written with nothing reading it; then the consumer
//! starts (the pass-through, or a fresh worker) and the same producer offers
//! events at a fixed rate. A downstream reader times each rate event's
//! output (the pass-through's copy, decoded, or the worker's prediction):
//! read time minus its event time. Backlog events are counted, not timed;
//! every event must come out once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Message, Offset};
use serde::Serialize;

use crate::broker::{EmbeddedBroker, TopicSpec};
use crate::events::WireFormat;
use crate::loadgen::{
    encode_feature, event, load_samples, now_ms, quantile, Load, Reader, Samples, Seen, Traffic,
};
use crate::model::onnx;
use crate::registry::{Registry, RegistryOptions};
use crate::worker::config::WorkerConfig;
use crate::worker::metrics::Metrics;
use crate::worker::reload::{Models, Trigger};

/// Events the producer may run ahead of the pipeline (the embedded broker
/// truncates a partition's log beyond a few tens of thousands of records).
const WINDOW: u64 = 40_000;

/// Partitions of the latency phases' input and output topics.
const LATENCY_PARTITIONS: i32 = 8;

/// Event ids of a latency phase: `backlog-{i}` (counted, not timed) and
/// `rate-{i}` (offered at the fixed rate, timed).
const BACKLOG: &str = "backlog";
const TIMED: &str = "rate";

/// `linger.ms` of the latency phases' producer (backlog and rate events):
/// librdkafka's default, and the Java client's since Kafka 4.0, so what an
/// upstream producer left at its defaults does. It sets how many records a
/// batch holds, which the embedded broker is sensitive to: it returns one
/// batch per partition per fetch and finds it by walking the partition's
/// batches from the oldest. At 2 ms (about 5 records a batch per partition
/// at 20,000 events/s over 8 partitions) that walk took 70% of the broker
/// thread's time after a few seconds (perf: `rd_kafka_mock_msgset_find`)
/// and every consumer, floor and worker alike, fell seconds behind.
const PRODUCER_LINGER_MS: u32 = 5;

/// The most backlog bytes per partition the bench writes to the embedded
/// broker, which keeps about 5 MB a partition (librdkafka's mock,
/// hard-coded) and drops the oldest records beyond, read or not; the rest
/// is room for rate events not yet read.
const EMBEDDED_BACKLOG_BYTES: u64 = 4_000_000;

/// A record's bytes in a batch besides its key and value (length,
/// attributes, deltas, key and value lengths, header count; generous).
const RECORD_OVERHEAD: u64 = 16;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Events per throughput run.
    pub events: u64,
    /// Offered rate of the latency phases (events/s).
    pub rate: f64,
    /// How long each latency phase offers events at `rate`.
    pub latency_for: Duration,
    /// Events written before each latency phase's consumer starts.
    pub backlog: u64,
    /// Latency rounds (a floor phase and a worker phase each).
    pub latency_rounds: usize,
    /// An existing cluster (`host:port,...`); None: the embedded broker.
    pub brokers: Option<String>,
    /// The model the events are for.
    pub model: String,
    /// Throughput rounds (baseline then worker, alternating); medians reported.
    pub rounds: usize,
    /// Sample rows (`models/samples`).
    pub samples: PathBuf,
}

/// Latency percentiles (ms): read downstream minus event time.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Events timed.
    pub events: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    fn of(lat: &[f64]) -> Percentiles {
        let mut v = lat.to_vec();
        v.sort_by(f64::total_cmp);
        let q = |q: f64| {
            v.get(((v.len().max(1) - 1) as f64 * q).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        Percentiles {
            events: v.len(),
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: q(1.0),
        }
    }
}

/// One latency phase: a backlog, then events at the offered rate.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyPhase {
    /// Backlog events whose output was read downstream (all of them).
    pub backlog_read: u64,
    /// From the consumer's start until the last backlog event's output was
    /// read downstream (joining the group included).
    pub catch_up_ms: f64,
    /// The rate events (all of them timed).
    #[serde(flatten)]
    pub latency: Percentiles,
    /// The rate events offered after the catch-up (steady state).
    pub after_catch_up: Percentiles,
}

/// A latency round: the pass-through floor and the worker, one after the other.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRound {
    /// 1-based.
    pub round: usize,
    /// Which phase ran first: "floor" or "worker" (alternates by round).
    pub first: String,
    pub floor: LatencyPhase,
    pub worker: LatencyPhase,
    /// worker - floor
    pub p50_diff_ms: f64,
    /// worker - floor
    pub p99_diff_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    /// `embedded`, or the `--brokers` address.
    pub brokers: String,
    pub events: u64,
    pub rounds: usize,
    /// worker / baseline of each round
    pub round_ratios: Vec<f64>,
    pub baseline_events_per_s: f64,
    pub worker_events_per_s: f64,
    pub ratio: f64,
    /// Where the CPU went in each throughput run (µs per event by thread).
    pub baseline_cpu: String,
    pub worker_cpu: String,
    /// Latency phases: offered rate (events/s), seconds at that rate, backlog.
    pub offered_rate: f64,
    pub latency_secs: f64,
    pub backlog: u64,
    pub latency_rounds: Vec<LatencyRound>,
    /// Over all rounds (every timed event of every round).
    pub floor_latency: Percentiles,
    pub worker_latency: Percentiles,
    /// Over all rounds, the events offered after each phase's catch-up.
    pub floor_after_catch_up: Percentiles,
    pub worker_after_catch_up: Percentiles,
    /// worker - floor, over all rounds
    pub p50_diff_ms: f64,
    pub p99_diff_ms: f64,
    /// The worker over all rounds (as `worker_latency`; p95 only here).
    pub latency_events: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Wall time of the whole bench.
    pub elapsed_s: f64,
}

struct Counting(Arc<AtomicU64>);
impl ClientContext for Counting {}
impl ProducerContext for Counting {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if r.is_ok() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A pass-through's clients, and where its copies go.
struct PassThrough {
    consumer: ClientConfig,
    producer: ClientConfig,
    /// Copy each record to the partition it came from (else: its key's).
    same_partition: bool,
}

impl PassThrough {
    /// The throughput baseline.
    fn throughput(brokers: &str, group: &str) -> PassThrough {
        let mut consumer = ClientConfig::new();
        consumer
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("fetch.wait.max.ms", "10");
        let mut producer = ClientConfig::new();
        producer
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            .set("queue.buffering.max.messages", "1000000");
        PassThrough {
            consumer,
            producer,
            same_partition: false,
        }
    }

    /// The latency floor. A fair floor waits where the worker waits: its
    /// clients are the worker's own (`worker::client_configs`: group
    /// protocol, `fetch.wait.max.ms` 2, `linger.ms` 5, idempotence, and the
    /// configuration's `kafka.librdkafka` pass-through), in a group of its
    /// own. Copies keep their partition, so the output is spread as evenly
    /// as the input (the bench's 8 symbols hash onto 6 partitions; see
    /// `Load::spread_over`).
    fn floor(cfg: &WorkerConfig, brokers: &str, group: &str) -> PassThrough {
        let (mut consumer, mut producer) = crate::worker::client_configs(cfg, brokers);
        consumer.set("group.id", group);
        // the copies are not sent in transactions (exactly-once configs)
        producer.remove("transactional.id");
        PassThrough {
            consumer,
            producer,
            same_partition: true,
        }
    }
}

/// Copies `input` to `output` byte for byte until `stop`.
fn pass_through(
    pt: PassThrough,
    input: &str,
    output: &str,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let consumer: BaseConsumer = pt.consumer.create()?;
    let producer: ThreadedProducer<Counting> = pt.producer.create_with_context(Counting(acked))?;
    consumer.subscribe(&[input])?;
    let mut last_commit = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let mut rec = BaseRecord::to(output).payload(m.payload().unwrap_or(&[]));
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if pt.same_partition {
            rec = rec.partition(m.partition());
        }
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        if last_commit.elapsed() > Duration::from_secs(1) {
            last_commit = Instant::now();
            let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Async);
        }
    }
    let _ = producer.flush(Duration::from_secs(5));
    Ok(())
}

/// CPU seconds used so far by this process's threads, by thread name
/// (librdkafka names its threads `rdk:*`; the mock broker is `rdk:mock`).
fn thread_cpu() -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(p.join("comm")),
            std::fs::read_to_string(p.join("stat")),
        ) else {
            continue;
        };
        let Some(rest) = stat.rsplit(')').next() else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let name = comm
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .to_string();
        *out.entry(name).or_insert(0.0) += (ticks(11) + ticks(12)) / 100.0;
    }
    out
}

/// Per-thread-group CPU µs per event between two [`thread_cpu`] samples.
fn cpu_per_event(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
    events: u64,
) -> String {
    let mut parts: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (v - before.get(k).unwrap_or(&0.0)) * 1e6 / events as f64,
            )
        })
        .filter(|(_, us)| *us >= 0.05)
        .collect();
    parts.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = parts.iter().map(|p| p.1).sum();
    format!(
        "{total:.2} us/event CPU: {}",
        parts
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// SIGINT or SIGTERM arrived while the bench ran on an existing cluster.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
    // a second signal ends the process at once (async-signal-safe)
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
    }
}

/// On an existing cluster, SIGINT and SIGTERM end the bench through its
/// error path, so its topics and groups are deleted (a second signal ends
/// it at once, leaving them: their names start with `ml-worker-bench-`).
fn catch_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic and resets the handler
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// An error when the bench was interrupted.
fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("bench: interrupted (its topics and groups are being deleted)");
    }
    Ok(())
}

fn wait_for(what: &str, timeout: Duration, done: impl Fn() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > timeout {
            bail!("bench: timed out waiting for {what}");
        }
        interrupted()?;
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(start.elapsed())
}

/// Where the bench's topics live: the embedded broker, or an existing
/// cluster (`--brokers`), where they get unique names and are deleted at
/// the end (best effort), with the bench's consumer groups.
struct Cluster {
    /// Metadata and watermarks. Declared first: dropped before the broker.
    probe: BaseConsumer,
    admin: Option<AdminClient<DefaultClientContext>>,
    embedded: Option<EmbeddedBroker>,
    brokers: String,
    /// Topic and group names on an existing cluster start with this.
    prefix: String,
    topics: Mutex<Vec<String>>,
    groups: Mutex<Vec<String>>,
}

fn names(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Waits for an admin request (its futures need no particular runtime).
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .build()?
        .block_on(f))
}

impl Cluster {
    /// `brokers`: None or `embedded` for the embedded broker.
    fn start(brokers: Option<&str>) -> Result<Cluster> {
        let (embedded, admin, brokers, prefix) = match brokers.filter(|b| *b != "embedded") {
            None => {
                let broker = EmbeddedBroker::start(1, &[])?;
                let b = broker.bootstrap_servers();
                (Some(broker), None, b, String::new())
            }
            Some(b) => {
                catch_signals();
                let admin: AdminClient<DefaultClientContext> =
                    ClientConfig::new().set("bootstrap.servers", b).create()?;
                let prefix = format!("ml-worker-bench-{}-{}-", std::process::id(), now_ms());
                (None, Some(admin), b.to_string(), prefix)
            }
        };
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "ml-worker-bench-probe")
            .create()?;
        probe
            .fetch_metadata(None, Duration::from_secs(15))
            .with_context(|| format!("bench: no answer from the brokers at {brokers}"))?;
        Ok(Cluster {
            probe,
            admin,
            embedded,
            brokers,
            prefix,
            topics: Mutex::default(),
            groups: Mutex::default(),
        })
    }

    fn name(&self) -> String {
        if self.embedded.is_some() {
            "embedded".into()
        } else {
            self.brokers.clone()
        }
    }

    /// Creates a topic (replication 1); returns its name.
    fn topic(&self, name: &str, partitions: i32) -> Result<String> {
        let Some(admin) = &self.admin else {
            let broker = self.embedded.as_ref().expect("embedded or admin");
            broker.create_topic(&TopicSpec {
                name: name.to_string(),
                partitions,
            })?;
            return Ok(name.to_string());
        };
        let name = format!("{}{name}", self.prefix);
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let new = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
        for r in block_on(admin.create_topics([&new], &opts))?? {
            r.map_err(|(t, e)| anyhow!("bench: cannot create topic {t}: {e}"))?;
        }
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.clone());
        // usable once every partition has a leader
        wait_for(&format!("topic {name}"), Duration::from_secs(30), || {
            self.probe
                .fetch_metadata(Some(&name), Duration::from_secs(5))
                .is_ok_and(|md| {
                    md.topics().iter().any(|t| {
                        t.error().is_none()
                            && t.partitions().len() == partitions as usize
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    })
                })
        })?;
        Ok(name)
    }

    /// A consumer group id (deleted at the end on an existing cluster).
    fn group(&self, name: &str) -> String {
        if self.admin.is_none() {
            return name.to_string();
        }
        let g = format!("{}{name}", self.prefix);
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(g.clone());
        g
    }

    /// Checks that all `expected` records written to the fresh `topic` are
    /// there: none dropped by the broker's retention.
    fn check_backlog(&self, topic: &str, expected: u64) -> Result<()> {
        let md = self
            .probe
            .fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let (mut written, mut dropped) = (0, 0);
        for t in md.topics() {
            for p in t.partitions() {
                let (low, high) =
                    self.probe
                        .fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
                written += high.max(0) as u64;
                dropped += low.max(0) as u64;
            }
        }
        if written != expected || dropped > 0 {
            bail!(
                "bench: backlog on {topic}: {written} of {expected} events written, {dropped} \
                 already dropped by the broker (the embedded broker keeps about 5 MB a \
                 partition): lower --backlog or use --brokers"
            );
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let Some(admin) = &self.admin else {
            return;
        };
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let topics = std::mem::take(&mut *self.topics.lock().unwrap_or_else(|p| p.into_inner()));
        let groups = std::mem::take(&mut *self.groups.lock().unwrap_or_else(|p| p.into_inner()));
        if !groups.is_empty() {
            // a group unknown to the broker (never joined) is no failure
            let failed = block_on(admin.delete_groups(&names(&groups), &opts))
                .ok()
                .and_then(Result::ok)
                .map(|r| {
                    r.into_iter()
                        .filter(|r| {
                            !matches!(
                                r,
                                Ok(_) | Err((_, rdkafka::error::RDKafkaErrorCode::GroupIdNotFound))
                            )
                        })
                        .count()
                });
            if failed != Some(0) {
                eprintln!(
                    "bench: could not delete all of its consumer groups ({}*)",
                    self.prefix
                );
            }
        }
        if !topics.is_empty() {
            let failed = block_on(admin.delete_topics(&names(&topics), &opts))
                .ok()
                .and_then(Result::ok)
                .map(|r| r.iter().filter(|r| r.is_err()).count());
            if failed != Some(0) {
                eprintln!(
                    "bench: could not delete all of its topics ({}*)",
                    self.prefix
                );
            }
        }
    }
}

/// A worker's four topics.
struct WorkerTopics {
    features: String,
    predictions: String,
    signals: String,
    dead_letters: String,
}

impl WorkerTopics {
    fn create(cluster: &Cluster, name: &str, partitions: i32) -> Result<WorkerTopics> {
        Ok(WorkerTopics {
            features: cluster.topic(&format!("{name}-features"), partitions)?,
            predictions: cluster.topic(&format!("{name}-predictions"), partitions)?,
            signals: cluster.topic(&format!("{name}-signals"), partitions)?,
            dead_letters: cluster.topic(&format!("{name}-dead-letters"), 1)?,
        })
    }
}

/// A worker on its own topics, in this process.
struct BenchWorker {
    /// Its consumer group.
    group: String,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<crate::worker::Summary, crate::worker::WorkerError>>,
}

impl BenchWorker {
    fn start(
        cfg: &WorkerConfig,
        cluster: &Cluster,
        name: &str,
        topics: &WorkerTopics,
        models: impl FnOnce(Arc<Metrics>) -> Arc<Models>,
    ) -> Result<BenchWorker> {
        let mut wcfg = cfg.clone();
        wcfg.brokers = cluster.brokers.clone();
        wcfg.group_id = cluster.group(&format!("{name}-worker"));
        wcfg.input_topics = vec![topics.features.clone()];
        wcfg.input_format = WireFormat::AvroRaw;
        wcfg.predictions = crate::worker::config::Output {
            topic: topics.predictions.clone(),
            format: WireFormat::AvroRaw,
        };
        wcfg.signals = crate::worker::config::Output {
            topic: topics.signals.clone(),
            format: WireFormat::AvroRaw,
        };
        wcfg.dead_letters = topics.dead_letters.clone();
        wcfg.metrics_address = "127.0.0.1:0".parse().expect("literal address");
        let group = wcfg.group_id.clone();
        let metrics = Arc::new(Metrics::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (b, m, s) = (wcfg.brokers.clone(), metrics.clone(), stop.clone());
            let c = Arc::new(wcfg);
            let models = models(metrics.clone());
            std::thread::Builder::new()
                .name("consumer".into())
                .spawn(move || crate::worker::run(c, &b, models, m, s, |_| {}))?
        };
        Ok(BenchWorker {
            group,
            metrics,
            stop,
            thread,
        })
    }

    fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("worker thread panicked"))?
            .context("worker")?;
        Ok(())
    }
}

/// The largest encoded event of `count` from `prefix`, in bytes (values
/// differ by sample row and id length).
fn largest_event(samples: &[Samples], prefix: &str, count: u64) -> u64 {
    let rows = samples.iter().map(|s| s.rows.len()).sum::<usize>().max(1) as u64;
    let mut buf = Vec::new();
    (count.saturating_sub(rows)..count)
        .map(|i| {
            let e = event(samples, prefix, i, now_ms());
            encode_feature(WireFormat::AvroRaw, &e, &mut buf);
            (buf.len() + e.symbol.len()) as u64 + RECORD_OVERHEAD
        })
        .max()
        .unwrap_or(0)
}

/// The throughput rounds' medians.
struct Throughput {
    rounds: usize,
    round_ratios: Vec<f64>,
    baseline: f64,
    worker: f64,
    baseline_cpu: String,
    worker_cpu: String,
}

fn throughput(
    cfg: &WorkerConfig,
    opts: &BenchOptions,
    cluster: &Cluster,
    samples: &[Samples],
    registry: Arc<Registry>,
    outputs_per_event: u64,
) -> Result<Throughput> {
    let brokers = cluster.brokers.clone();
    let load = Load::new(&brokers)?;
    let never = AtomicBool::new(false);
    let stop = Arc::new(AtomicBool::new(false));

    // the pass-through baseline
    let (bin, bout) = (
        cluster.topic("bench-in", 8)?,
        cluster.topic("bench-out", 8)?,
    );
    let acked = Arc::new(AtomicU64::new(0));
    let pt = {
        let settings = PassThrough::throughput(&brokers, &cluster.group("bench-pass-through"));
        let (a, s, i, o) = (acked.clone(), stop.clone(), bin.clone(), bout.clone());
        std::thread::Builder::new()
            .name("pass-through".into())
            .spawn(move || pass_through(settings, &i, &o, a, s))?
    };
    let base_traffic = Traffic {
        topic: &bin,
        format: WireFormat::AvroRaw,
        samples,
        prefix: "warm",
    };
    // warm up: the group is joined once the first record comes back
    load.events(&base_traffic, 0, 100, None, &never)?;
    wait_for("the pass-through to join", Duration::from_secs(30), || {
        acked.load(Ordering::Relaxed) >= 100
    })?;

    // the worker
    let topics = WorkerTopics::create(cluster, "bench", 8)?;
    let w = BenchWorker::start(cfg, cluster, "bench", &topics, |m| {
        Models::fixed(registry, m)
    })?;
    let metrics = w.metrics.clone();
    let worker_traffic = Traffic {
        topic: &topics.features,
        format: WireFormat::AvroRaw,
        samples,
        prefix: "warm",
    };
    load.events(&worker_traffic, 0, 100, None, &never)?;
    wait_for("the worker to join", Duration::from_secs(30), || {
        metrics.acked.load(Ordering::Relaxed) >= 100 * outputs_per_event
    })?;

    // rounds alternate baseline and worker, so drift in the machine's speed
    // hits both; the medians are reported
    let mut rounds = Vec::new();
    for round in 0..opts.rounds.max(1) {
        let first = round as u64 * opts.events;
        let base0 = acked.load(Ordering::Relaxed);
        let cpu0 = thread_cpu();
        let start = Instant::now();
        let t = Traffic {
            prefix: "base",
            ..base_traffic
        };
        load.events_windowed(&t, first, opts.events, WINDOW, || {
            acked.load(Ordering::Relaxed) - base0
        })?;
        wait_for("the pass-through", Duration::from_secs(300), || {
            acked.load(Ordering::Relaxed) >= base0 + opts.events
        })?;
        let baseline = opts.events as f64 / start.elapsed().as_secs_f64();
        let baseline_cpu = cpu_per_event(&cpu0, &thread_cpu(), opts.events);

        let w0 = metrics.acked.load(Ordering::Relaxed);
        let cpu0 = thread_cpu();
        let start = Instant::now();
        let t = Traffic {
            prefix: "tput",
            ..worker_traffic
        };
        load.events_windowed(&t, first, opts.events, WINDOW, || {
            (metrics.acked.load(Ordering::Relaxed) - w0) / outputs_per_event
        })?;
        wait_for("the worker", Duration::from_secs(300), || {
            metrics.acked.load(Ordering::Relaxed) >= w0 + outputs_per_event * opts.events
        })?;
        let worker_rate = opts.events as f64 / start.elapsed().as_secs_f64();
        let worker_cpu = cpu_per_event(&cpu0, &thread_cpu(), opts.events);
        eprintln!(
            "bench: round {}: baseline {baseline:.0}/s, worker {worker_rate:.0}/s = {:.2}",
            round + 1,
            worker_rate / baseline
        );
        rounds.push((baseline, worker_rate, baseline_cpu, worker_cpu));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let baseline = median(rounds.iter().map(|r| r.0).collect());
    let worker_rate = median(rounds.iter().map(|r| r.1).collect());
    // the CPU breakdown of the round closest to the medians
    let mid = rounds
        .iter()
        .min_by(|a, b| {
            (a.1 - worker_rate)
                .abs()
                .total_cmp(&(b.1 - worker_rate).abs())
        })
        .expect("at least one round");
    let (baseline_cpu, worker_cpu) = (mid.2.clone(), mid.3.clone());
    let round_ratios: Vec<f64> = rounds.iter().map(|r| r.1 / r.0).collect();

    stop.store(true, Ordering::Relaxed);
    pt.join()
        .map_err(|_| anyhow!("pass-through thread panicked"))??;
    w.stop()?;
    Ok(Throughput {
        rounds: rounds.len(),
        round_ratios,
        baseline,
        worker: worker_rate,
        baseline_cpu,
        worker_cpu,
    })
}

/// The consumer a latency phase measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Floor,
    Worker,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Floor => "floor",
            Side::Worker => "worker",
        }
    }
}

/// A phase's consumer while it runs.
enum Running {
    PassThrough {
        stop: Arc<AtomicBool>,
        acked: Arc<AtomicU64>,
        thread: std::thread::JoinHandle<Result<()>>,
    },
    Worker(BenchWorker),
}

impl Running {
    /// Stops it; returns how many outputs the broker acknowledged.
    fn stop(self) -> Result<u64> {
        match self {
            Running::PassThrough {
                stop,
                acked,
                thread,
            } => {
                stop.store(true, Ordering::Relaxed);
                thread
                    .join()
                    .map_err(|_| anyhow!("pass-through thread panicked"))??;
                Ok(acked.load(Ordering::Relaxed))
            }
            Running::Worker(w) => {
                let metrics = w.metrics.clone();
                w.stop()?;
                Ok(metrics.acked.load(Ordering::Relaxed))
            }
        }
    }
}

/// Latencies (ms) of a phase's rate events, or of several phases.
#[derive(Default)]
struct Latencies {
    all: Vec<f64>,
    /// Of the events offered after the catch-up.
    after_catch_up: Vec<f64>,
}

impl Latencies {
    fn extend(&mut self, other: Latencies) {
        self.all.extend(other.all);
        self.after_catch_up.extend(other.after_catch_up);
    }
}

/// What the latency phases share.
struct Latency<'a> {
    cfg: &'a WorkerConfig,
    opts: &'a BenchOptions,
    cluster: &'a Cluster,
    samples: &'a [Samples],
    registry: Arc<Registry>,
    outputs_per_event: u64,
    /// The producer of backlogs and rate events: spread evenly over the
    /// partitions (see `Load::spread_over`).
    load: Load,
}

impl Latency<'_> {
    /// One phase on fresh topics: backlog, consumer start, events at the
    /// offered rate, each timed downstream. Returns the phase and its
    /// latencies (ms).
    fn phase(&self, side: Side, round: usize) -> Result<(LatencyPhase, Latencies)> {
        let (opts, cluster) = (self.opts, self.cluster);
        let brokers = &cluster.brokers;
        let name = format!("lat{}-{}", round + 1, side.name());
        let n = (opts.rate * opts.latency_for.as_secs_f64()).round() as u64;
        let backlog = opts.backlog;
        // topics, and the reader downstream, assigned before anything is
        // written; each event gives one output on the floor, a prediction
        // and a signal from the worker
        let (input, output, mut reader, outputs_per_event) = match side {
            Side::Floor => {
                let input = cluster.topic(&format!("{name}-in"), LATENCY_PARTITIONS)?;
                let output = cluster.topic(&format!("{name}-out"), LATENCY_PARTITIONS)?;
                // the pass-through copies feature events: decode them for
                // their ids and event times
                let reader = Reader::feature_events(
                    brokers,
                    (&output, WireFormat::AvroRaw),
                    Offset::Beginning,
                )?;
                (input, Err(output), reader, 1)
            }
            Side::Worker => {
                let topics = WorkerTopics::create(cluster, &name, LATENCY_PARTITIONS)?;
                // predictions are timed; signals are counted where the
                // worker's producer has them acknowledged, not read back
                // (on the embedded broker every topic read costs its one
                // broker thread, which the floor would not pay)
                let reader = Reader::outputs(
                    brokers,
                    (&topics.predictions, WireFormat::AvroRaw),
                    None,
                    &topics.dead_letters,
                    Offset::Beginning,
                )?;
                let features = topics.features.clone();
                (features, Ok(topics), reader, self.outputs_per_event)
            }
        };
        reader.light = true;
        reader.timed_prefix = Some(format!("{TIMED}-"));

        // the backlog, with nothing reading it
        let never = AtomicBool::new(false);
        let traffic = Traffic {
            topic: &input,
            format: WireFormat::AvroRaw,
            samples: self.samples,
            prefix: BACKLOG,
        };
        self.load.events(&traffic, 0, backlog, None, &never)?;
        self.load.flush(Duration::from_secs(120))?;
        cluster.check_backlog(&input, backlog)?;
        // the reader's fetches are under way before anything comes out
        reader.read(Duration::from_millis(500), |_| false);

        // the consumer starts; events are offered at the rate from now on
        let started = Instant::now();
        let started_ms = now_ms();
        let running = match &output {
            Err(output) => {
                let settings = PassThrough::floor(self.cfg, brokers, &cluster.group(&name));
                let stop = Arc::new(AtomicBool::new(false));
                let acked = Arc::new(AtomicU64::new(0));
                let (s, a, i, o) = (stop.clone(), acked.clone(), input.clone(), output.clone());
                let thread = std::thread::Builder::new()
                    .name("pass-through".into())
                    .spawn(move || pass_through(settings, &i, &o, a, s))?;
                Running::PassThrough {
                    stop,
                    acked,
                    thread,
                }
            }
            Ok(topics) => {
                Running::Worker(BenchWorker::start(self.cfg, cluster, &name, topics, |m| {
                    Models::fixed(self.registry.clone(), m)
                })?)
            }
        };
        let all_in = |s: &Seen| {
            s.untimed >= backlog && s.latencies_ms.len() as u64 >= n
                || INTERRUPTED.load(Ordering::Relaxed)
        };
        let stop_offering = AtomicBool::new(false);
        let measured = std::thread::scope(|scope| -> Result<Option<Duration>> {
            let offer = scope.spawn(|| -> Result<()> {
                let t = Traffic {
                    prefix: TIMED,
                    ..traffic
                };
                self.load
                    .events(&t, 0, n, Some(opts.rate), &stop_offering)?;
                self.load.flush(Duration::from_secs(60))
            });
            let deadline = started + opts.latency_for + Duration::from_secs(60);
            let left = || deadline.saturating_duration_since(Instant::now());
            reader.read(left(), |s| {
                s.untimed >= backlog || INTERRUPTED.load(Ordering::Relaxed)
            });
            let catch_up = (reader.seen.untimed >= backlog).then(|| started.elapsed());
            reader.read(left(), all_in);
            stop_offering.store(true, Ordering::Relaxed);
            offer
                .join()
                .map_err(|_| anyhow!("producer thread panicked"))??;
            Ok(catch_up)
        });
        let stopped = running.stop();
        interrupted()?;
        let catch_up = measured?;
        let acked = stopped?;

        // every event came out once: backlog and rate events read, every
        // output acknowledged, no dead letters
        let s = &reader.seen;
        let timed = s.latencies_ms.len() as u64;
        let mut wrong = Vec::new();
        if s.untimed != backlog {
            wrong.push(format!(
                "{} of {backlog} backlog events came out",
                s.untimed
            ));
        }
        if timed != n {
            wrong.push(format!("{timed} of {n} rate events came out"));
        }
        let outputs = outputs_per_event * (backlog + n);
        if acked != outputs {
            wrong.push(format!("{acked} of {outputs} outputs acknowledged"));
        }
        if !s.dead_letters.is_empty() || s.undecodable > 0 {
            wrong.push(format!(
                "{} dead letters, {} undecodable outputs",
                s.dead_letters.len(),
                s.undecodable
            ));
        }
        if !wrong.is_empty() {
            bail!(
                "bench: latency round {}, {}: {}{}",
                round + 1,
                side.name(),
                wrong.join("; "),
                if cluster.embedded.is_some() {
                    " (the embedded broker keeps about 5 MB a partition and drops the oldest \
                     records: a reader further behind loses them; lower --backlog or --rate, \
                     or use --brokers)"
                } else {
                    ""
                }
            );
        }
        let catch_up_ms = catch_up.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        let caught_up_at = started_ms + catch_up_ms.ceil() as i64;
        let after_catch_up: Vec<f64> = (s.latencies_ms.iter().zip(&s.timed_event_times))
            .filter(|(_, &t)| t >= caught_up_at)
            .map(|(&l, _)| l)
            .collect();
        let phase = LatencyPhase {
            backlog_read: s.untimed,
            catch_up_ms,
            latency: Percentiles::of(&s.latencies_ms),
            after_catch_up: Percentiles::of(&after_catch_up),
        };
        Ok((
            phase,
            Latencies {
                all: reader.seen.latencies_ms,
                after_catch_up,
            },
        ))
    }

    /// The rounds: floor and worker alternate which goes first.
    fn rounds(&self) -> Result<(Vec<LatencyRound>, Latencies, Latencies)> {
        let mut rounds = Vec::new();
        let (mut floor_all, mut worker_all) = (Latencies::default(), Latencies::default());
        for round in 0..self.opts.latency_rounds.max(1) {
            let order = if round % 2 == 0 {
                [Side::Floor, Side::Worker]
            } else {
                [Side::Worker, Side::Floor]
            };
            let (mut floor, mut worker) = (None, None);
            for side in order {
                let (phase, lat) = self.phase(side, round)?;
                match side {
                    Side::Floor => {
                        floor_all.extend(lat);
                        floor = Some(phase);
                    }
                    Side::Worker => {
                        worker_all.extend(lat);
                        worker = Some(phase);
                    }
                }
            }
            let (floor, worker) = (
                floor.expect("both sides ran"),
                worker.expect("both sides ran"),
            );
            let r = LatencyRound {
                round: round + 1,
                first: order[0].name().to_string(),
                p50_diff_ms: worker.latency.p50_ms - floor.latency.p50_ms,
                p99_diff_ms: worker.latency.p99_ms - floor.latency.p99_ms,
                floor,
                worker,
            };
            let line = |p: &LatencyPhase| {
                format!(
                    "p50 {:.0} p99 {:.0} p999 {:.0} max {:.0} ms, catch-up {:.0} ms",
                    p.latency.p50_ms,
                    p.latency.p99_ms,
                    p.latency.p999_ms,
                    p.latency.max_ms,
                    p.catch_up_ms
                )
            };
            eprintln!(
                "bench: latency round {}: floor {}; worker {}",
                r.round,
                line(&r.floor),
                line(&r.worker)
            );
            rounds.push(r);
        }
        Ok((rounds, floor_all, worker_all))
    }
}

/// Runs the throughput rounds, then the latency rounds, and reports.
/// The sample rows of the benchmarked model.
fn model_samples(opts: &BenchOptions) -> Result<Vec<Samples>> {
    let samples: Vec<Samples> = load_samples(&opts.samples)?
        .into_iter()
        .filter(|s| s.model == opts.model)
        .collect();
    if samples.is_empty() {
        bail!(
            "no sample rows for model '{}' in {}",
            opts.model,
            opts.samples.display()
        );
    }
    Ok(samples)
}

pub fn run(
    cfg: &WorkerConfig,
    opts: &BenchOptions,
    onnx: onnx::RuntimeConfig,
) -> Result<BenchReport> {
    let began = Instant::now();
    let samples = model_samples(opts)?;
    let registry = Arc::new(Registry::open(
        &cfg.registry,
        None,
        RegistryOptions {
            onnx,
            ..Default::default()
        },
    )?);
    let Some(spec) = registry.spec(&opts.model) else {
        bail!(
            "model '{}' is not in {}",
            opts.model,
            cfg.registry.display()
        );
    };
    let outputs_per_event = 1 + spec.signal.is_some() as u64;
    let cluster = Cluster::start(opts.brokers.as_deref())?;
    if cluster.embedded.is_some() {
        // the backlog waits unread: it must fit what a partition keeps
        let per_partition = opts.backlog.div_ceil(LATENCY_PARTITIONS as u64)
            * largest_event(&samples, BACKLOG, opts.backlog);
        if per_partition > EMBEDDED_BACKLOG_BYTES {
            bail!(
                "--backlog {}: about {:.1} MB per partition, more than the bench writes to the \
                 embedded broker ({:.1} MB; it keeps about 5 MB a partition and drops the \
                 oldest); lower --backlog or use --brokers",
                opts.backlog,
                per_partition as f64 / 1e6,
                EMBEDDED_BACKLOG_BYTES as f64 / 1e6
            );
        }
    }

    let tp = throughput(
        cfg,
        opts,
        &cluster,
        &samples,
        registry.clone(),
        outputs_per_event,
    )?;
    let latency = Latency {
        cfg,
        opts,
        cluster: &cluster,
        samples: &samples,
        registry,
        outputs_per_event,
        load: Load::with_linger(&cluster.brokers, PRODUCER_LINGER_MS)?
            .spread_over(LATENCY_PARTITIONS),
    };
    let (latency_rounds, floor_all, worker_all) = latency.rounds()?;
    drop(latency);
    let brokers = cluster.name();
    drop(cluster);
    let (floor, worker) = (
        Percentiles::of(&floor_all.all),
        Percentiles::of(&worker_all.all),
    );
    Ok(BenchReport {
        model: opts.model.clone(),
        brokers,
        events: opts.events,
        rounds: tp.rounds,
        round_ratios: tp.round_ratios,
        baseline_events_per_s: tp.baseline,
        worker_events_per_s: tp.worker,
        ratio: tp.worker / tp.baseline,
        baseline_cpu: tp.baseline_cpu,
        worker_cpu: tp.worker_cpu,
        offered_rate: opts.rate,
        latency_secs: opts.latency_for.as_secs_f64(),
        backlog: opts.backlog,
        latency_rounds,
        p50_diff_ms: worker.p50_ms - floor.p50_ms,
        p99_diff_ms: worker.p99_ms - floor.p99_ms,
        latency_events: worker.events,
        p50_ms: worker.p50_ms,
        p95_ms: quantile(&worker_all.all, 0.95),
        floor_after_catch_up: Percentiles::of(&floor_all.after_catch_up),
        worker_after_catch_up: Percentiles::of(&worker_all.after_catch_up),
        p99_ms: worker.p99_ms,
        p999_ms: worker.p999_ms,
        max_ms: worker.max_ms,
        floor_latency: floor,
        worker_latency: worker,
        elapsed_s: began.elapsed().as_secs_f64(),
    })
}

impl std::fmt::Display for BenchReport {
    /// The human-readable report: throughput, then a latency table.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "model {} on {} ({} events per throughput run, median of {} rounds; round ratios {})",
            self.model,
            self.brokers,
            self.events,
            self.rounds,
            self.round_ratios
                .iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        )?;
        writeln!(
            f,
            "pass-through baseline  {:>10.0} events/s",
            self.baseline_events_per_s
        )?;
        writeln!(
            f,
            "worker (pred + signal) {:>10.0} events/s  = {:.2} of baseline",
            self.worker_events_per_s, self.ratio
        )?;
        writeln!(f, "  baseline CPU: {}", self.baseline_cpu)?;
        writeln!(f, "  worker CPU:   {}", self.worker_cpu)?;
        writeln!(
            f,
            "latency: a backlog of {} events, then {:.0} events/s for {} s ({} timed per phase); \
             ms from event time to read downstream",
            self.backlog,
            self.offered_rate,
            self.latency_secs,
            self.worker_latency.events / self.latency_rounds.len().max(1)
        )?;
        writeln!(
            f,
            "             |  pass-through floor               |  worker                           | worker - floor"
        )?;
        writeln!(
            f,
            "round first  |   p50   p99  p999   max  catch-up |   p50   p99  p999   max  catch-up |   p50    p99"
        )?;
        // "-" where there is nothing to measure (no event after the catch-up)
        let ms = |v: f64, width: usize| {
            if v.is_nan() {
                format!("{:>width$}", "-")
            } else {
                format!("{v:>width$.0}")
            }
        };
        let cells = |p: &Percentiles| {
            [p.p50_ms, p.p99_ms, p.p999_ms, p.max_ms]
                .map(|v| ms(v, 6))
                .concat()
        };
        let diff = |w: &Percentiles, fl: &Percentiles| {
            let d = |v: f64, width: usize| {
                if v.is_nan() {
                    format!("{:>width$}", "-")
                } else {
                    format!("{v:>+width$.0}")
                }
            };
            d(w.p50_ms - fl.p50_ms, 6) + &d(w.p99_ms - fl.p99_ms, 7)
        };
        for r in &self.latency_rounds {
            writeln!(
                f,
                "{:>5} {:<6} |{}{:>10.0} |{}{:>10.0} |{}",
                r.round,
                r.first,
                cells(&r.floor.latency),
                r.floor.catch_up_ms,
                cells(&r.worker.latency),
                r.worker.catch_up_ms,
                diff(&r.worker.latency, &r.floor.latency)
            )?;
        }
        writeln!(
            f,
            "  all        |{}{:>10} |{}{:>10} |{}",
            cells(&self.floor_latency),
            "",
            cells(&self.worker_latency),
            "",
            diff(&self.worker_latency, &self.floor_latency)
        )?;
        writeln!(
            f,
            "the same, of the events offered after the catch-up (steady state):"
        )?;
        for r in &self.latency_rounds {
            writeln!(
                f,
                "{:>5} {:<6} |{}{:>10} |{}{:>10} |{}",
                r.round,
                r.first,
                cells(&r.floor.after_catch_up),
                "",
                cells(&r.worker.after_catch_up),
                "",
                diff(&r.worker.after_catch_up, &r.floor.after_catch_up)
            )?;
        }
        writeln!(
            f,
            "  all        |{}{:>10} |{}{:>10} |{}",
            cells(&self.floor_after_catch_up),
            "",
            cells(&self.worker_after_catch_up),
            "",
            diff(&self.worker_after_catch_up, &self.floor_after_catch_up)
        )
    }
}

/// One reporting window of a soak.
#[derive(Debug, Clone, Serialize)]
pub struct SoakWindow {
    /// Seconds since the offer started, at the window's end.
    pub at_s: f64,
    /// Predictions read downstream in the window, per second.
    pub events_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Resident memory of this process (the worker runs in it), MiB.
    pub rss_mib: f64,
    /// Reloads that swapped the registry in the window.
    pub reloads: u64,
}

/// `ml-worker bench --soak DURATION`: what a steady offered rate did over time.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub model: String,
    pub brokers: String,
    pub offered_rate: f64,
    pub duration_s: f64,
    pub offered: u64,
    /// Events whose prediction was read downstream.
    pub received: u64,
    pub dead_letters: u64,
    pub windows: Vec<SoakWindow>,
    /// `--reload-every`: reloads done (each loads the model anew), failed.
    pub reloads: u64,
    pub reloads_failed: u64,
    /// The slowest reload (read, verify, load, warm up, swap), ms.
    pub reload_max_ms: f64,
}

/// How often a soak reports.
const SOAK_WINDOW: Duration = Duration::from_secs(10);

/// This process's resident memory, MiB (0 where /proc is not there).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Offers events for `duration` at `opts.rate` to a worker on its own
/// topics, in this process, and prints throughput, latency percentiles
/// (event time to prediction read downstream) and RSS every 10 s, so a
/// leak or a latency creep shows. Every offered event must come out.
///
/// `reload_every`: a copy of `models.yaml` gives the model a new version
/// that often and the registry is reloaded (a real load of the model file,
/// verified and warmed up, then the swap), so what reloads cost in
/// latency and whether they leak shows in the same windows.
pub fn soak(
    cfg: &WorkerConfig,
    opts: &BenchOptions,
    duration: Duration,
    reload_every: Option<Duration>,
    kinds: crate::registry::RegistryBuilder,
    mut line: impl FnMut(&SoakWindow),
) -> Result<SoakReport> {
    let samples = model_samples(opts)?;
    // reloads read a copy of the registry whose model version changes
    let copy = match reload_every {
        Some(_) => Some(RegistryCopy::new(&cfg.registry, &opts.model)?),
        None => None,
    };
    let registry_file = copy
        .as_ref()
        .map_or(cfg.registry.clone(), |c| c.file.clone());
    let registry = Arc::new(kinds.clone().open(&registry_file)?);
    if registry.spec(&opts.model).is_none() {
        bail!(
            "model '{}' is not in {}",
            opts.model,
            cfg.registry.display()
        );
    }
    let cluster = Cluster::start(opts.brokers.as_deref())?;
    let topics = WorkerTopics::create(&cluster, "soak", LATENCY_PARTITIONS)?;
    let mut reader = Reader::outputs(
        &cluster.brokers,
        (&topics.predictions, WireFormat::AvroRaw),
        None,
        &topics.dead_letters,
        Offset::Beginning,
    )?;
    reader.light = true;
    reader.timed_prefix = Some(format!("{TIMED}-"));
    let models_slot = Mutex::new(None);
    let worker = BenchWorker::start(cfg, &cluster, "soak", &topics, |m| {
        let models = Models::reloadable(registry, registry_file.clone(), kinds, m);
        *models_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(models.clone());
        models
    })?;
    let models = models_slot
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .ok_or_else(|| anyhow!("the worker did not take its registry"))?;
    let reloads = AtomicU64::new(0);
    let reloads_failed = AtomicU64::new(0);
    let reload_max_us = AtomicU64::new(0);
    let load =
        Load::with_linger(&cluster.brokers, PRODUCER_LINGER_MS)?.spread_over(LATENCY_PARTITIONS);
    let n = (opts.rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let traffic = Traffic {
        topic: &topics.features,
        format: WireFormat::AvroRaw,
        samples: &samples,
        prefix: TIMED,
    };
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let mut windows = Vec::new();
    let mut received = 0u64;
    let result = std::thread::scope(|scope| -> Result<()> {
        let offer = scope.spawn(|| -> Result<()> {
            load.events(&traffic, 0, n, Some(opts.rate), &stop)?;
            load.flush(Duration::from_secs(60))
        });
        if let (Some(every), Some(copy)) = (reload_every, &copy) {
            let (stop, models, reloads) = (&stop, &models, &reloads);
            let (failed, max_us) = (&reloads_failed, &reload_max_us);
            scope.spawn(move || {
                let mut next = Instant::now() + every;
                let mut version = 0u64;
                // one reload per `every` of the offer, the last at its end
                while !stop.load(Ordering::Relaxed) && next <= started + duration {
                    if Instant::now() < next {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    next += every;
                    version += 1;
                    let done = copy
                        .with_version(&format!("soak-{version}"))
                        .map_err(|e| crate::registry::ReloadError::Other(e.to_string()))
                        .and_then(|()| models.reload(Trigger::Call));
                    match done {
                        Ok(d) if d.swapped => {
                            reloads.fetch_add(1, Ordering::Relaxed);
                            max_us.fetch_max(d.took.as_micros() as u64, Ordering::Relaxed);
                        }
                        Ok(_) | Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        // after the offer, a minute for the last events to come out
        let deadline = started + duration + Duration::from_secs(60);
        let mut window_start = Instant::now();
        let mut reloads_seen = 0;
        loop {
            let end = (window_start + SOAK_WINDOW).min(deadline);
            let before = received;
            reader.read(end.saturating_duration_since(Instant::now()), |s| {
                before + s.latencies_ms.len() as u64 >= n || INTERRUPTED.load(Ordering::Relaxed)
            });
            let now = Instant::now();
            let lat = &reader.seen.latencies_ms[..];
            if !lat.is_empty() || now >= deadline {
                let w = SoakWindow {
                    at_s: started.elapsed().as_secs_f64(),
                    events_per_s: lat.len() as f64 / (now - window_start).as_secs_f64().max(1e-3),
                    p50_ms: quantile(lat, 0.5),
                    p99_ms: quantile(lat, 0.99),
                    p999_ms: quantile(lat, 0.999),
                    rss_mib: rss_mib(),
                    reloads: reloads.load(Ordering::Relaxed) - reloads_seen,
                };
                reloads_seen += w.reloads;
                line(&w);
                windows.push(w);
            }
            // the window's measurements are summed up: dropped, so this
            // process's RSS is the worker's, not the bench's bookkeeping
            received += reader.seen.latencies_ms.len() as u64;
            reader.seen.latencies_ms.clear();
            reader.seen.timed_event_times.clear();
            reader.seen.to_output_ms.clear();
            window_start = now;
            if received >= n || now >= deadline || INTERRUPTED.load(Ordering::Relaxed) {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        offer
            .join()
            .map_err(|_| anyhow!("producer thread panicked"))?
    });
    let stopped = worker.stop();
    result?;
    stopped?;
    interrupted()?;
    let seen = &reader.seen;
    let report = SoakReport {
        model: opts.model.clone(),
        brokers: cluster.name(),
        offered_rate: opts.rate,
        duration_s: duration.as_secs_f64(),
        offered: n,
        received,
        dead_letters: seen.dead_letters.len() as u64,
        windows,
        reloads: reloads.load(Ordering::Relaxed),
        reloads_failed: reloads_failed.load(Ordering::Relaxed),
        reload_max_ms: reload_max_us.load(Ordering::Relaxed) as f64 / 1000.0,
    };
    if report.reloads_failed > 0 {
        bail!(
            "soak: {} of {} reloads failed or did not swap",
            report.reloads_failed,
            report.reloads + report.reloads_failed
        );
    }
    if report.received != n || report.dead_letters != 0 {
        bail!(
            "soak: {} of {n} offered events came out, {} dead letters",
            report.received,
            report.dead_letters
        );
    }
    Ok(report)
}

impl std::fmt::Display for SoakWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>7.1} s  {:>9.0} events/s  p50 {:>6.1} ms  p99 {:>6.1} ms  p999 {:>6.1} ms  RSS {:>7.1} MiB  reloads {}",
            self.at_s, self.events_per_s, self.p50_ms, self.p99_ms, self.p999_ms, self.rss_mib, self.reloads
        )
    }
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (first, last) = (self.windows.first(), self.windows.last());
        writeln!(
            f,
            "soak: model {} on {}, {:.0} events/s offered for {:.0} s: {} of {} events out, {} dead letters",
            self.model, self.brokers, self.offered_rate, self.duration_s, self.received, self.offered, self.dead_letters
        )?;
        if let (Some(a), Some(b)) = (first, last) {
            writeln!(
                f,
                "RSS {:.1} MiB at the first window, {:.1} MiB at the last ({:+.1}%)",
                a.rss_mib,
                b.rss_mib,
                (b.rss_mib / a.rss_mib.max(1e-9) - 1.0) * 100.0
            )?;
        }
        if self.reloads + self.reloads_failed > 0 {
            writeln!(
                f,
                "reloads: {} swapped, {} failed, the slowest {:.1} ms",
                self.reloads, self.reloads_failed, self.reload_max_ms
            )?;
        }
        Ok(())
    }
}

/// A copy of `models.yaml` in a folder of its own (model paths made
/// absolute) whose entry for one model gets a new `version:` on demand.
struct RegistryCopy {
    dir: PathBuf,
    file: PathBuf,
    yaml: serde_norway::Value,
    model: String,
}

impl RegistryCopy {
    fn new(original: &std::path::Path, model: &str) -> Result<RegistryCopy> {
        let text = std::fs::read_to_string(original)
            .with_context(|| format!("reading {}", original.display()))?;
        let mut yaml: serde_norway::Value = serde_norway::from_str(&text)
            .with_context(|| format!("parsing {}", original.display()))?;
        let base = original
            .parent()
            .map(std::path::absolute)
            .transpose()?
            .unwrap_or_default();
        let models = yaml
            .get_mut("models")
            .and_then(|m| m.as_sequence_mut())
            .ok_or_else(|| anyhow!("{}: no models list", original.display()))?;
        for m in models {
            if let Some(path) = m.get("path").and_then(|p| p.as_str()).map(str::to_string) {
                m["path"] = base.join(path).display().to_string().into();
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("ml-worker-soak-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("models.yaml");
        let copy = RegistryCopy {
            dir,
            file,
            yaml,
            model: model.to_string(),
        };
        copy.write(&copy.yaml)?;
        Ok(copy)
    }

    fn with_version(&self, version: &str) -> Result<()> {
        let mut yaml = self.yaml.clone();
        if let Some(models) = yaml.get_mut("models").and_then(|m| m.as_sequence_mut()) {
            for m in models {
                if m.get("name").and_then(|n| n.as_str()) == Some(self.model.as_str()) {
                    m["version"] = version.into();
                }
            }
        }
        self.write(&yaml)
    }

    /// Written whole, then renamed over the old file.
    fn write(&self, yaml: &serde_norway::Value) -> Result<()> {
        let tmp = self.file.with_extension("yaml.tmp");
        std::fs::write(&tmp, serde_norway::to_string(yaml)?)?;
        std::fs::rename(&tmp, &self.file)?;
        Ok(())
    }
}

impl Drop for RegistryCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One delivery mode's medians in [`delivery_modes`].
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// Events per second from the first acknowledged output to the group's
    /// committed offsets reaching the end of the input.
    pub events_per_s: f64,
    /// Events per second to the last acknowledged output.
    pub acked_events_per_s: f64,
    /// CPU of this process (the worker and its clients) per event, µs.
    pub cpu_us_per_event: f64,
    /// Transactions committed in the median round (exactly-once).
    pub transactions: u64,
}

/// `ml-worker bench --delivery-modes`: exactly-once against at-least-once.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryReport {
    pub model: String,
    pub brokers: String,
    pub events: u64,
    pub rounds: usize,
    pub commit_interval_ms: u64,
    pub at_least_once: ModeResult,
    pub exactly_once: ModeResult,
    /// exactly-once / at-least-once events/s (medians).
    pub ratio: f64,
    /// The same ratio per round.
    pub round_ratios: Vec<f64>,
    pub elapsed_s: f64,
}

/// Exactly-once's throughput as a share of at-least-once's, on an existing
/// cluster, same input and machine, in one run. Each round gives each mode
/// (alternating, and which goes first alternates, so drift and order hit
/// both) a fresh 8-partition topic already
/// holding `opts.events` events for `opts.model` and a fresh worker in this
/// process (the config's batching and `commit_interval_ms`), timed from its
/// first acknowledged output until the group's committed offsets reach the
/// end of the input: under exactly-once offsets are committed with the
/// outputs, so that is when the last output is visible to a
/// `read_committed` reader. Medians over `opts.rounds` are reported.
pub fn delivery_modes(
    cfg: &WorkerConfig,
    opts: &BenchOptions,
    kinds: crate::registry::RegistryBuilder,
) -> Result<DeliveryReport> {
    use crate::worker::config::DeliveryMode;
    const PARTITIONS: i32 = 8;
    let began = Instant::now();
    let Some(brokers) = opts.brokers.as_deref().filter(|b| *b != "embedded") else {
        bail!(
            "--delivery-modes needs a Kafka cluster (--brokers host:port): the embedded broker \
             accepts transactions but stores no transactional offsets, so exactly-once cannot \
             finish there"
        );
    };
    let samples = model_samples(opts)?;
    let registry = Arc::new(kinds.open(&cfg.registry)?);
    let Some(spec) = registry.spec(&opts.model) else {
        bail!(
            "model '{}' is not in {}",
            opts.model,
            cfg.registry.display()
        );
    };
    let outputs_per_event = 1 + spec.signal.is_some() as u64;
    let n = opts.events;
    let cluster = Cluster::start(Some(brokers))?;
    let never = AtomicBool::new(false);
    let total_cpu = || thread_cpu().values().sum::<f64>();
    let modes = [
        ("at-least-once", DeliveryMode::AtLeastOnce),
        ("exactly-once", DeliveryMode::ExactlyOnce),
    ];
    // per mode: (events/s, acked events/s, CPU µs per event, transactions)
    let mut results: [Vec<(f64, f64, f64, u64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..opts.rounds.max(1) {
        // which mode goes first alternates too
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (name, mode) = &modes[i];
            interrupted()?;
            let tag = format!("delivery-{}-{name}", round + 1);
            let topics = WorkerTopics::create(&cluster, &tag, PARTITIONS)?;
            {
                let load = Load::new(&cluster.brokers)?;
                let t = Traffic {
                    topic: &topics.features,
                    format: WireFormat::AvroRaw,
                    samples: &samples,
                    prefix: "d",
                };
                load.events(&t, 0, n, None, &never)?;
                load.flush(Duration::from_secs(300))?;
            }
            let mut wcfg = cfg.clone();
            wcfg.mode = *mode;
            wcfg.transactional_id = None;
            let w = BenchWorker::start(&wcfg, &cluster, &tag, &topics, |m| {
                Models::fixed(registry.clone(), m)
            })?;
            let offsets: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &cluster.brokers)
                .set("group.id", &w.group)
                .create()?;
            let committed = || -> i64 {
                let mut tpl = rdkafka::TopicPartitionList::new();
                for p in 0..PARTITIONS {
                    tpl.add_partition(&topics.features, p);
                }
                offsets
                    .committed_offsets(tpl, Duration::from_secs(10))
                    .map(|l| {
                        l.elements()
                            .iter()
                            .filter_map(|e| match e.offset() {
                                Offset::Offset(o) => Some(o),
                                _ => None,
                            })
                            .sum()
                    })
                    .unwrap_or(0)
            };
            wait_for(
                "the worker's first output",
                Duration::from_secs(120),
                || w.metrics.acked.load(Ordering::Relaxed) > 0 || w.thread.is_finished(),
            )?;
            let t0 = Instant::now();
            let cpu0 = total_cpu();
            let mut acked_at = None;
            while committed() < n as i64 {
                if acked_at.is_none()
                    && w.metrics.acked.load(Ordering::Relaxed) >= outputs_per_event * n
                {
                    acked_at = Some(t0.elapsed());
                }
                if w.thread.is_finished() {
                    return w
                        .stop()
                        .and(Err(anyhow!("bench: the {name} worker stopped")));
                }
                if t0.elapsed() > Duration::from_secs(600) {
                    bail!("bench: {name}: offsets not committed to the end within 600 s");
                }
                if let Err(e) = interrupted() {
                    return w.stop().and(Err(e));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let elapsed = t0.elapsed();
            let cpu = (total_cpu() - cpu0) * 1e6 / n as f64;
            let txns = w.metrics.total("ml_worker_transactions_committed_total");
            w.stop()?;
            let rate = n as f64 / elapsed.as_secs_f64();
            let acked = n as f64 / acked_at.unwrap_or(elapsed).as_secs_f64();
            eprintln!(
                "bench: round {}: {name}: {rate:.0} events/s to the last commit, {acked:.0} to \
                 the last acknowledgement, {cpu:.1} us CPU per event, {txns} transactions",
                round + 1
            );
            results[i].push((rate, acked, cpu, txns));
        }
    }
    let median = |v: &[(f64, f64, f64, u64)]| -> ModeResult {
        let mid = |f: fn(&(f64, f64, f64, u64)) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let rate = mid(|r| r.0);
        ModeResult {
            events_per_s: rate,
            acked_events_per_s: mid(|r| r.1),
            cpu_us_per_event: mid(|r| r.2),
            transactions: v.iter().find(|r| r.0 == rate).map_or(0, |r| r.3),
        }
    };
    let (alo, eos) = (median(&results[0]), median(&results[1]));
    Ok(DeliveryReport {
        model: opts.model.clone(),
        brokers: cluster.name(),
        events: n,
        rounds: results[0].len(),
        commit_interval_ms: cfg.commit_interval.as_millis() as u64,
        ratio: eos.events_per_s / alo.events_per_s,
        round_ratios: results[0]
            .iter()
            .zip(&results[1])
            .map(|(a, e)| e.0 / a.0)
            .collect(),
        at_least_once: alo,
        exactly_once: eos,
        elapsed_s: began.elapsed().as_secs_f64(),
    })
}

impl std::fmt::Display for DeliveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "delivery modes: {} events of {} on {}, commit_interval_ms {}, {} rounds (medians)",
            self.events, self.model, self.brokers, self.commit_interval_ms, self.rounds
        )?;
        for (name, r) in [
            ("at-least-once", &self.at_least_once),
            ("exactly-once", &self.exactly_once),
        ] {
            writeln!(
                f,
                "  {name:<14} {:>10.0} events/s to the last commit, {:>10.0} to the last \
                 acknowledgement, {:.1} us CPU per event, {} transactions",
                r.events_per_s, r.acked_events_per_s, r.cpu_us_per_event, r.transactions
            )?;
        }
        writeln!(
            f,
            "  exactly-once / at-least-once: {:.2} (rounds: {})",
            self.ratio,
            self.round_ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}
