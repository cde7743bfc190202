//! `ml-worker bench`: end-to-end throughput and latency on the embedded
//! broker, with a pass-through baseline measured in the same run.
//!
//! 1. Baseline: a plain consumer-to-producer loop (same librdkafka settings,
//!    no decode, no inference) copies N records while a producer writes them.
//! 2. Worker: the real worker serves N feature events for one model while the
//!    same producer writes them; done when 2N outputs (prediction + signal)
//!    are acknowledged.
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
    /// Sample rows (`models/samples`).
    pub samples: std::path::PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub events: u64,
    pub baseline_events_per_s: f64,
    pub worker_events_per_s: f64,
    pub ratio: f64,
    pub offered_rate: f64,
    pub latency_events: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
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

    // 1. pass-through baseline
    let (bin, bout) = (
        topic(&broker, "bench-in", 8)?,
        topic(&broker, "bench-out", 8)?,
    );
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let pt = {
        let (b, a, s, i, o) = (
            brokers.clone(),
            acked.clone(),
            stop.clone(),
            bin.clone(),
            bout.clone(),
        );
        std::thread::spawn(move || pass_through(&b, &i, &o, a, s))
    };
    // warm up: the group is joined once the first record comes back
    let traffic = Traffic {
        topic: &bin,
        format: WireFormat::AvroRaw,
        samples: &samples,
        prefix: "warm",
    };
    load.events(&traffic, 0, 100, None, &never)?;
    wait_for("the pass-through to join", Duration::from_secs(30), || {
        acked.load(Ordering::Relaxed) >= 100
    })?;
    let base0 = acked.load(Ordering::Relaxed);
    let start = Instant::now();
    let traffic = Traffic {
        prefix: "base",
        ..traffic
    };
    load.events_windowed(&traffic, 0, opts.events, WINDOW, || {
        acked.load(Ordering::Relaxed) - base0
    })?;
    wait_for("the pass-through", Duration::from_secs(300), || {
        acked.load(Ordering::Relaxed) >= base0 + opts.events
    })?;
    let baseline = opts.events as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    pt.join()
        .map_err(|_| anyhow::anyhow!("pass-through thread panicked"))??;
    eprintln!("bench: pass-through baseline {baseline:.0} events/s");

    // 2. the worker
    let features = topic(&broker, "bench-features", 8)?;
    let predictions = topic(&broker, "bench-predictions", 8)?;
    let signals = topic(&broker, "bench-signals", 8)?;
    let dead = topic(&broker, "bench-dead-letters", 1)?;
    let mut wcfg = cfg.clone();
    wcfg.brokers = brokers.clone();
    wcfg.group_id = "bench-worker".into();
    wcfg.input_topics = vec![features.clone()];
    wcfg.input_format = WireFormat::AvroRaw;
    wcfg.predictions = crate::worker::config::Output {
        topic: predictions.clone(),
        format: WireFormat::AvroRaw,
    };
    wcfg.signals = crate::worker::config::Output {
        topic: signals.clone(),
        format: WireFormat::AvroRaw,
    };
    wcfg.dead_letters = dead.clone();
    wcfg.metrics_address = "127.0.0.1:0".parse().expect("literal address");
    let registry = Arc::new(Registry::open(
        &wcfg.registry,
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
            wcfg.registry.display()
        );
    };
    let outputs_per_event = 1 + spec.signal.is_some() as u64;
    let metrics = Arc::new(Metrics::default());
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (c, m, s) = (Arc::new(wcfg.clone()), metrics.clone(), stop.clone());
        let b = brokers.clone();
        std::thread::spawn(move || crate::worker::run(c, &b, registry, m, s, |_| {}))
    };
    let traffic = Traffic {
        topic: &features,
        format: WireFormat::AvroRaw,
        samples: &samples,
        prefix: "warm",
    };
    load.events(&traffic, 0, 100, None, &never)?;
    wait_for("the worker to join", Duration::from_secs(30), || {
        metrics.acked.load(Ordering::Relaxed) >= 100 * outputs_per_event
    })?;
    let w0 = metrics.acked.load(Ordering::Relaxed);
    let start = Instant::now();
    let sampler = {
        let m = metrics.clone();
        let until = opts.events * outputs_per_event + w0;
        std::thread::spawn(move || {
            let mut last = m.acked.load(Ordering::Relaxed);
            while last < until {
                std::thread::sleep(Duration::from_millis(100));
                let now = m.acked.load(Ordering::Relaxed);
                tracing::debug!(
                    outputs_per_100ms = now - last,
                    in_flight = m.in_flight.load(Ordering::Relaxed),
                    paused = m.paused.load(Ordering::Relaxed),
                    "bench progress"
                );
                last = now;
            }
        })
    };
    let traffic = Traffic {
        prefix: "tput",
        ..traffic
    };
    load.events_windowed(&traffic, 0, opts.events, WINDOW, || {
        (metrics.acked.load(Ordering::Relaxed) - w0) / outputs_per_event
    })?;
    wait_for("the worker", Duration::from_secs(300), || {
        metrics.acked.load(Ordering::Relaxed) >= w0 + outputs_per_event * opts.events
    })?;
    let worker_rate = opts.events as f64 / start.elapsed().as_secs_f64();
    let _ = sampler.join();
    eprintln!(
        "bench: worker {worker_rate:.0} events/s ({:.2} of the baseline)",
        worker_rate / baseline
    );

    // 3. latency at a fixed offered rate, read downstream
    // the reader starts at the end: the throughput run's backlog is not read
    let mut reader = Reader::with_start(
        &brokers,
        (&predictions, WireFormat::AvroRaw),
        (&signals, WireFormat::AvroRaw),
        &dead,
        rdkafka::Offset::End,
    )?;
    reader.light = true;
    reader.read(Duration::from_secs(1), |_| false);
    let skip = reader.seen.latencies_ms.len();
    let n = (opts.rate * opts.latency_for.as_secs_f64()) as u64;
    let traffic = Traffic {
        prefix: "lat",
        ..traffic
    };
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
    let _ = traffic;
    reader.read(opts.latency_for + Duration::from_secs(30), |s| {
        s.latencies_ms.len() >= skip + n as usize
    });
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
    let lat: Vec<f64> = reader.seen.latencies_ms[skip..].to_vec();
    let to_out: Vec<f64> =
        reader.seen.to_output_ms[skip.min(reader.seen.to_output_ms.len())..].to_vec();
    tracing::info!(
        "bench: until the worker produced: p50 {} p99 {} max {} ms",
        quantile(&to_out, 0.5),
        quantile(&to_out, 0.99),
        quantile(&to_out, 1.0)
    );
    if (lat.len() as u64) < n {
        bail!("latency run: {} of {n} predictions arrived", lat.len());
    }
    stop.store(true, Ordering::Relaxed);
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("worker thread panicked"))?
        .context("worker")?;
    drop(broker);
    Ok(BenchReport {
        model: opts.model.clone(),
        events: opts.events,
        baseline_events_per_s: baseline,
        worker_events_per_s: worker_rate,
        ratio: worker_rate / baseline,
        offered_rate: opts.rate,
        latency_events: lat.len(),
        p50_ms: quantile(&lat, 0.5),
        p95_ms: quantile(&lat, 0.95),
        p99_ms: quantile(&lat, 0.99),
        max_ms: quantile(&lat, 1.0),
    })
}
