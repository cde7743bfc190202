//! `ml-worker bench`: end-to-end throughput and latency on the embedded
//! broker, with a pass-through baseline measured in the same run.
//!
//! 1. Baseline: a plain consumer-to-producer loop (no decode, no inference)
//!    copies N records while a producer writes them.
//! 2. Worker: the real worker serves N feature events for one model while the
//!    same producer writes them; done when 2N outputs (prediction + signal)
//!    are acknowledged.
//!
//! Both run side by side in one process; rounds alternate 1 and 2 and the
//! medians are reported, so a drift in the shared machine's speed hits both.
//! The producer never runs more than a window ahead (the embedded broker's
//! log per partition is bounded).
//!
//! 3. Latency: events offered at a fixed rate; a downstream reader measures
//!    each prediction's arrival minus its event time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Message};
use serde::Serialize;

use crate::broker::{EmbeddedBroker, TopicSpec};
use crate::events::WireFormat;
use crate::loadgen::{load_samples, quantile, Load, Reader, Samples, Traffic};
use crate::model::onnx;
use crate::registry::{Registry, RegistryOptions};
use crate::worker::config::WorkerConfig;
use crate::worker::metrics::Metrics;

/// Events the producer may run ahead of the pipeline (the embedded broker
/// truncates a partition's log beyond a few tens of thousands of records).
const WINDOW: u64 = 40_000;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Events per throughput run.
    pub events: u64,
    /// Offered rate of the latency run (events/s).
    pub rate: f64,
    /// Length of the latency run.
    pub latency_for: Duration,
    /// The model the events are for.
    pub model: String,
    /// Throughput rounds (baseline then worker, alternating); medians reported.
    pub rounds: usize,
    /// Sample rows (`models/samples`).
    pub samples: std::path::PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub events: u64,
    pub rounds: usize,
    /// worker / baseline of each round
    pub round_ratios: Vec<f64>,
    pub baseline_events_per_s: f64,
    pub worker_events_per_s: f64,
    pub ratio: f64,
    pub offered_rate: f64,
    pub latency_events: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Where the CPU went in each throughput run (µs per event by thread).
    pub baseline_cpu: String,
    pub worker_cpu: String,
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

/// Copies `input` to `output` byte for byte until `stop`.
fn pass_through(
    brokers: &str,
    input: &str,
    output: &str,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-pass-through")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let producer: ThreadedProducer<Counting> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(Counting(acked))?;
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

fn wait_for(what: &str, timeout: Duration, done: impl Fn() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > timeout {
            bail!("bench: timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(start.elapsed())
}

/// A worker on its own topics, in this process.
struct BenchWorker {
    features: String,
    predictions: String,
    signals: String,
    dead_letters: String,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<crate::worker::Summary, crate::worker::WorkerError>>,
}

impl BenchWorker {
    fn start(
        cfg: &WorkerConfig,
        broker: &EmbeddedBroker,
        name: &str,
        registry: Arc<Registry>,
    ) -> Result<BenchWorker> {
        let mut wcfg = cfg.clone();
        wcfg.brokers = broker.bootstrap_servers();
        wcfg.group_id = format!("{name}-worker");
        wcfg.input_topics = vec![topic(broker, &format!("{name}-features"), 8)?];
        wcfg.input_format = WireFormat::AvroRaw;
        wcfg.predictions = crate::worker::config::Output {
            topic: topic(broker, &format!("{name}-predictions"), 8)?,
            format: WireFormat::AvroRaw,
        };
        wcfg.signals = crate::worker::config::Output {
            topic: topic(broker, &format!("{name}-signals"), 8)?,
            format: WireFormat::AvroRaw,
        };
        wcfg.dead_letters = topic(broker, &format!("{name}-dead-letters"), 1)?;
        wcfg.metrics_address = "127.0.0.1:0".parse().expect("literal address");
        let metrics = Arc::new(Metrics::default());
        let stop = Arc::new(AtomicBool::new(false));
        let w = BenchWorker {
            features: wcfg.input_topics[0].clone(),
            predictions: wcfg.predictions.topic.clone(),
            signals: wcfg.signals.topic.clone(),
            dead_letters: wcfg.dead_letters.clone(),
            metrics: metrics.clone(),
            stop: stop.clone(),
            thread: {
                let b = wcfg.brokers.clone();
                let c = Arc::new(wcfg);
                std::thread::Builder::new()
                    .name("consumer".into())
                    .spawn(move || crate::worker::run(c, &b, registry, metrics, stop, |_| {}))?
            },
        };
        Ok(w)
    }

    fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("worker thread panicked"))?
            .context("worker")?;
        Ok(())
    }
}

fn topic(broker: &EmbeddedBroker, name: &str, partitions: i32) -> Result<String> {
    broker.create_topic(&TopicSpec {
        name: name.to_string(),
        partitions,
    })?;
    Ok(name.to_string())
}

/// Runs the three phases and reports.
pub fn run(
    cfg: &WorkerConfig,
    opts: &BenchOptions,
    onnx: onnx::RuntimeConfig,
) -> Result<BenchReport> {
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
    let broker = EmbeddedBroker::start(1, &[])?;
    let brokers = broker.bootstrap_servers();
    let load = Load::new(&brokers)?;
    let never = AtomicBool::new(false);
    let stop = Arc::new(AtomicBool::new(false));

    // the pass-through baseline
    let (bin, bout) = (
        topic(&broker, "bench-in", 8)?,
        topic(&broker, "bench-out", 8)?,
    );
    let acked = Arc::new(AtomicU64::new(0));
    let pt = {
        let (b, a, s, i, o) = (
            brokers.clone(),
            acked.clone(),
            stop.clone(),
            bin.clone(),
            bout.clone(),
        );
        std::thread::Builder::new()
            .name("pass-through".into())
            .spawn(move || pass_through(&b, &i, &o, a, s))?
    };
    let base_traffic = Traffic {
        topic: &bin,
        format: WireFormat::AvroRaw,
        samples: &samples,
        prefix: "warm",
    };
    // warm up: the group is joined once the first record comes back
    load.events(&base_traffic, 0, 100, None, &never)?;
    wait_for("the pass-through to join", Duration::from_secs(30), || {
        acked.load(Ordering::Relaxed) >= 100
    })?;

    // the worker
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
    let w = BenchWorker::start(cfg, &broker, "bench", registry.clone())?;
    let (features, metrics) = (w.features.clone(), w.metrics.clone());
    let worker_traffic = Traffic {
        topic: &features,
        format: WireFormat::AvroRaw,
        samples: &samples,
        prefix: "warm",
    };
    load.events(&worker_traffic, 0, 100, None, &never)?;
    wait_for("the worker to join", Duration::from_secs(30), || {
        metrics.acked.load(Ordering::Relaxed) >= 100 * outputs_per_event
    })?;

    // throughput: rounds alternate baseline and worker, so drift in the
    // machine's speed hits both; the medians are reported
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
        .map_err(|_| anyhow::anyhow!("pass-through thread panicked"))??;
    w.stop()?;

    // latency at a fixed offered rate, read downstream, by a fresh worker on
    // fresh topics (the embedded broker slows down as its logs fill up: its
    // fetch path scans a partition's log)
    let w = BenchWorker::start(cfg, &broker, "latency", registry)?;
    let features = w.features.clone();
    wait_for(
        "the latency worker to join",
        Duration::from_secs(30),
        || w.metrics.ready(),
    )?;
    let mut reader = Reader::new(
        &brokers,
        (&w.predictions, WireFormat::AvroRaw),
        (&w.signals, WireFormat::AvroRaw),
        &w.dead_letters,
    )?;
    reader.light = true;
    reader.read(Duration::from_secs(1), |_| false);
    let skip = reader.seen.latencies_ms.len();
    let n = (opts.rate * opts.latency_for.as_secs_f64()) as u64;
    let producer = {
        let (b, t) = (brokers.clone(), features.clone());
        let samples = samples.clone();
        let rate = opts.rate;
        std::thread::spawn(move || -> Result<()> {
            let load = Load::new(&b)?;
            let tr = Traffic {
                topic: &t,
                format: WireFormat::AvroRaw,
                samples: &samples,
                prefix: "lat",
            };
            load.events(&tr, 0, n, Some(rate), &AtomicBool::new(false))?;
            load.flush(Duration::from_secs(30))?;
            Ok(())
        })
    };
    reader.read(opts.latency_for + Duration::from_secs(30), |s| {
        s.latencies_ms.len() >= skip + n as usize
    });
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
    let lat: Vec<f64> = reader.seen.latencies_ms[skip..].to_vec();
    if (lat.len() as u64) < n {
        bail!("latency run: {} of {n} predictions arrived", lat.len());
    }
    w.stop()?;
    drop(reader);
    drop(load);
    drop(broker);
    Ok(BenchReport {
        model: opts.model.clone(),
        events: opts.events,
        rounds: rounds.len(),
        baseline_events_per_s: baseline,
        worker_events_per_s: worker_rate,
        ratio: worker_rate / baseline,
        round_ratios,
        offered_rate: opts.rate,
        latency_events: lat.len(),
        p50_ms: quantile(&lat, 0.5),
        p95_ms: quantile(&lat, 0.95),
        p99_ms: quantile(&lat, 0.99),
        max_ms: quantile(&lat, 1.0),
        baseline_cpu,
        worker_cpu,
    })
}
