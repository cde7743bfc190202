//! Feature-event traffic for the demo, the benchmark and the end-to-end
//! tests: sample rows of the shipped models (`models/samples/*.csv`, each
//! with the reference library's prediction), a rate-limited producer, and a
//! reader that collects predictions, signals and dead letters downstream.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::events::{
    write_feature_datum, Codec, FeatureEvent, PredictionEvent, SchemaIds, Side, WireFormat,
};

/// Sample rows of one model, with the reference predictions.
#[derive(Debug, Clone)]
pub struct Samples {
    pub model: String,
    pub features: Vec<String>,
    pub rows: Vec<Vec<f64>>,
    /// The reference library's prediction per row.
    pub expected: Vec<f64>,
    /// Class probabilities per row (classifiers).
    pub probabilities: Vec<Option<Vec<f64>>>,
}

/// Reads `dir/*.csv` (model name = file stem).
pub fn load_samples(dir: &Path) -> Result<Vec<Samples>> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading sample folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .collect();
    files.sort();
    for path in files {
        let model = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let mut r =
            csv::Reader::from_path(&path).with_context(|| format!("reading {}", path.display()))?;
        let head: Vec<String> = r.headers()?.iter().map(str::to_string).collect();
        let Some(pi) = head.iter().position(|h| h == "prediction") else {
            bail!("{}: no 'prediction' column", path.display());
        };
        let mut s = Samples {
            model,
            features: head[..pi].to_vec(),
            rows: Vec::new(),
            expected: Vec::new(),
            probabilities: Vec::new(),
        };
        for rec in r.records() {
            let rec = rec?;
            let v: Vec<f64> = rec
                .iter()
                .map(|x| x.parse::<f64>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("{}: non-numeric cell", path.display()))?;
            s.rows.push(v[..pi].to_vec());
            s.expected.push(v[pi]);
            s.probabilities
                .push((v.len() > pi + 1).then(|| v[pi + 1..].to_vec()));
        }
        out.push(s);
    }
    if out.is_empty() {
        bail!("no sample CSVs in {}", dir.display());
    }
    Ok(out)
}

pub const SYMBOLS: [&str; 8] = [
    "AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "JPM",
];

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The `i`-th event of a deterministic stream over the samples:
/// event id `"{prefix}-{i}"`, models round-robin, symbols round-robin.
pub fn event(samples: &[Samples], prefix: &str, i: u64, event_time: i64) -> FeatureEvent {
    let s = &samples[(i % samples.len() as u64) as usize];
    let row = &s.rows[((i / samples.len() as u64) % s.rows.len() as u64) as usize];
    FeatureEvent {
        event_id: format!("{prefix}-{i}"),
        model: s.model.clone(),
        symbol: SYMBOLS[(i % SYMBOLS.len() as u64) as usize].to_string(),
        event_time,
        features: s
            .features
            .iter()
            .cloned()
            .zip(row.iter().copied())
            .collect(),
    }
}

/// Which sample row event `i` carries: (samples index, row index).
pub fn event_row(samples: &[Samples], i: u64) -> (usize, usize) {
    let si = (i % samples.len() as u64) as usize;
    (
        si,
        ((i / samples.len() as u64) % samples[si].rows.len() as u64) as usize,
    )
}

/// Encodes a feature event in a wire format (`avro` uses schema id 1).
pub fn encode_feature(format: WireFormat, e: &FeatureEvent, out: &mut Vec<u8>) {
    out.clear();
    match format {
        WireFormat::AvroRaw => write_feature_datum(e, out),
        WireFormat::Avro => {
            out.push(0);
            out.extend_from_slice(&1u32.to_be_bytes());
            write_feature_datum(e, out);
        }
        WireFormat::Json => {
            let features: serde_json::Map<String, serde_json::Value> = e
                .features
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::json!(v)))
                .collect();
            let j = serde_json::json!({
                "event_id": e.event_id, "model": e.model, "symbol": e.symbol,
                "event_time": e.event_time, "features": features,
            });
            let _ = serde_json::to_writer(&mut *out, &j);
        }
    }
}

/// A stream of sample events for one topic.
#[derive(Clone, Copy)]
pub struct Traffic<'a> {
    pub topic: &'a str,
    pub format: WireFormat,
    pub samples: &'a [Samples],
    /// Event ids are `"{prefix}-{i}"`.
    pub prefix: &'a str,
}

/// A producer for test and benchmark traffic.
pub struct Load {
    producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
}

impl Load {
    pub fn new(brokers: &str) -> Result<Load> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "2")
            .set("queue.buffering.max.messages", "1000000")
            .set("partitioner", "murmur2_random")
            .create()?;
        Ok(Load { producer })
    }

    /// Sends one record, waiting while the local queue is full.
    pub fn send(&self, topic: &str, key: Option<&[u8]>, payload: &[u8]) -> Result<()> {
        let mut rec = BaseRecord::to(topic).payload(payload);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        loop {
            match self.producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_micros(500));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Sends `count` events of `t` starting at `first` at `rate` events/s
    /// (None: as fast as possible), stopping early when `stop` is set.
    /// Returns how many were sent.
    pub fn events(
        &self,
        t: &Traffic<'_>,
        first: u64,
        count: u64,
        rate: Option<f64>,
        stop: &AtomicBool,
    ) -> Result<u64> {
        let start = Instant::now();
        let mut buf = Vec::with_capacity(512);
        for n in 0..count {
            if stop.load(Ordering::Relaxed) {
                return Ok(n);
            }
            if let Some(r) = rate {
                let due = start + Duration::from_secs_f64(n as f64 / r);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            let e = event(t.samples, t.prefix, first + n, now_ms());
            encode_feature(t.format, &e, &mut buf);
            self.send(t.topic, Some(e.symbol.as_bytes()), &buf)?;
        }
        Ok(count)
    }

    /// Sends `count` events as fast as the consumer side keeps up: never
    /// more than `window` ahead of `done()` (events fully processed
    /// downstream). The embedded broker keeps a bounded log per partition,
    /// so an unbounded backlog would be truncated under a slow reader.
    pub fn events_windowed(
        &self,
        t: &Traffic<'_>,
        first: u64,
        count: u64,
        window: u64,
        done: impl Fn() -> u64,
    ) -> Result<()> {
        let mut buf = Vec::with_capacity(512);
        let base = done();
        for n in 0..count {
            while n >= window && done().saturating_sub(base) + window <= n {
                std::thread::sleep(Duration::from_micros(100));
            }
            let e = event(t.samples, t.prefix, first + n, now_ms());
            encode_feature(t.format, &e, &mut buf);
            self.send(t.topic, Some(e.symbol.as_bytes()), &buf)?;
        }
        Ok(())
    }

    /// Waits until everything sent is acknowledged.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.producer.flush(Timeout::After(timeout))?;
        Ok(())
    }
}

/// What a downstream reader saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub predictions: u64,
    /// Prediction events by event id (the last one seen).
    pub by_id: HashMap<String, PredictionEvent>,
    /// Event ids seen more than once.
    pub duplicates: u64,
    pub signals: u64,
    pub sides: BTreeMap<String, u64>,
    pub signal_ids: HashSet<String>,
    pub dead_letters: Vec<DeadLetter>,
    /// End-to-end latency per prediction (ms): read time minus event_time.
    pub latencies_ms: Vec<f64>,
    /// Of that, until the worker produced the prediction (its record
    /// timestamp minus event_time).
    pub to_output_ms: Vec<f64>,
    /// Records that did not decode.
    pub undecodable: u64,
}

/// A dead letter as read back.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// By name (the last of a repeated name).
    pub headers: BTreeMap<String, String>,
    /// In order, repeats included.
    pub header_list: Vec<(String, String)>,
}

/// Reads the worker's output topics from the beginning (no group commits).
pub struct Reader {
    consumer: BaseConsumer,
    predictions: (String, Codec),
    signals: (String, Codec),
    dead_letters: String,
    pub seen: Seen,
    /// Only count and time outputs (no per-event maps): for latency runs.
    pub light: bool,
}

impl Reader {
    /// Reads all three topics from the beginning.
    pub fn new(
        brokers: &str,
        predictions: (&str, WireFormat),
        signals: (&str, WireFormat),
        dead_letters: &str,
    ) -> Result<Reader> {
        Self::with_start(
            brokers,
            predictions,
            signals,
            dead_letters,
            Offset::Beginning,
        )
    }

    /// Reads all three topics from `start` (`Offset::End`: only what is
    /// written from now on).
    pub fn with_start(
        brokers: &str,
        predictions: (&str, WireFormat),
        signals: (&str, WireFormat),
        dead_letters: &str,
        start: Offset,
    ) -> Result<Reader> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("reader-{}", now_ms()))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "1")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for t in [predictions.0, signals.0, dead_letters] {
            let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
            for topic in md.topics() {
                for p in topic.partitions() {
                    tpl.add_partition_offset(t, p.id(), start)?;
                }
            }
        }
        consumer.assign(&tpl)?;
        Ok(Reader {
            consumer,
            predictions: (
                predictions.0.to_string(),
                Codec::new(predictions.1, SchemaIds::default()),
            ),
            signals: (
                signals.0.to_string(),
                Codec::new(signals.1, SchemaIds::default()),
            ),
            dead_letters: dead_letters.to_string(),
            seen: Seen::default(),
            light: false,
        })
    }

    /// Reads for up to `timeout`, or until `done` says so.
    pub fn read(&mut self, timeout: Duration, done: impl Fn(&Seen) -> bool) {
        let end = Instant::now() + timeout;
        while Instant::now() < end && !done(&self.seen) {
            let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(50)) else {
                continue;
            };
            let payload = m.payload().unwrap_or(&[]);
            let s = &mut self.seen;
            if m.topic() == self.predictions.0 {
                match self.predictions.1.decode_prediction(payload) {
                    Ok(p) => {
                        s.predictions += 1;
                        s.latencies_ms.push((now_ms() - p.event_time) as f64);
                        if let Some(ts) = m.timestamp().to_millis() {
                            s.to_output_ms.push((ts - p.event_time) as f64);
                        }
                        if !self.light && s.by_id.insert(p.event_id.clone(), p).is_some() {
                            s.duplicates += 1;
                        }
                    }
                    Err(_) => s.undecodable += 1,
                }
            } else if m.topic() == self.signals.0 {
                match self.signals.1.decode_signal(payload) {
                    Ok(e) => {
                        s.signals += 1;
                        let side = match e.side {
                            Side::Buy => "BUY",
                            Side::Sell => "SELL",
                            Side::Hold => "HOLD",
                        };
                        *s.sides.entry(side.to_string()).or_insert(0) += 1;
                        if !self.light {
                            s.signal_ids.insert(e.event_id);
                        }
                    }
                    Err(_) => s.undecodable += 1,
                }
            } else if m.topic() == self.dead_letters {
                let list: Vec<(String, String)> = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_string(),
                                    String::from_utf8_lossy(x.value.unwrap_or(&[])).to_string(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                s.dead_letters.push(DeadLetter {
                    key: m.key().map(<[u8]>::to_vec),
                    value: payload.to_vec(),
                    headers: list.iter().cloned().collect(),
                    header_list: list,
                });
            }
        }
    }
}

/// The `q`-quantile (0..=1) of unsorted values.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// A stop flag for helper threads.
pub fn flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}
