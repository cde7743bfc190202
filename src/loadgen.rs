//! Feature-event traffic for the demo, the benchmark and the end-to-end
//! tests: sample rows of the shipped models (`models/samples/*.csv`, each
//! with the reference library's prediction), a rate-limited producer, and a
//! reader that collects predictions, signals and dead letters downstream.

use std::borrow::Cow;
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
    write_feature_datum, Codec, FeatureEvent, FeatureScan, PredictionEvent, SchemaIds, Side,
    WireFormat,
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

/// Hands `rec` to `producer`, waiting while its local queue is full.
pub fn send_waiting<K, P, C>(
    producer: &ThreadedProducer<C>,
    mut rec: BaseRecord<'_, K, P, ()>,
) -> Result<(), KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
    C: rdkafka::producer::ProducerContext<DeliveryOpaque = ()>,
{
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                std::thread::sleep(Duration::from_micros(500));
            }
            Err((e, _)) => return Err(e),
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
    /// Event `i` goes to partition `i % n` instead of its key's partition.
    spread: Option<i32>,
}

impl Load {
    pub fn new(brokers: &str) -> Result<Load> {
        Self::with_linger(brokers, 2)
    }

    /// A producer whose batches wait up to `linger_ms` for more records
    /// (librdkafka's default is 5).
    pub fn with_linger(brokers: &str, linger_ms: u32) -> Result<Load> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", linger_ms.to_string())
            .set("queue.buffering.max.messages", "1000000")
            .set("partitioner", "murmur2_random")
            .create()?;
        Ok(Load {
            producer,
            spread: None,
        })
    }

    /// Events from [`Load::events`] and [`Load::events_windowed`] go to the
    /// topic's `partitions` partitions in turn (event `i` to `i %
    /// partitions`), keys unchanged. The 8 sample symbols hash onto only 6
    /// of 8 partitions, 3 of them onto one, which then holds 37.5% of a
    /// stream: too much for the embedded broker's ~5 MB per partition when
    /// a backlog is written before anything reads it.
    pub fn spread_over(mut self, partitions: i32) -> Load {
        self.spread = Some(partitions.max(1));
        self
    }

    /// Sends one record, waiting while the local queue is full.
    pub fn send(&self, topic: &str, key: Option<&[u8]>, payload: &[u8]) -> Result<()> {
        self.send_to(topic, None, key, payload)
    }

    /// Sends one record to a partition (None: its key's), waiting while
    /// the local queue is full.
    fn send_to(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<()> {
        let mut rec = BaseRecord::to(topic).payload(payload);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        Ok(send_waiting(&self.producer, rec)?)
    }

    /// The partition event `i` goes to (None: its key's).
    fn partition_of(&self, i: u64) -> Option<i32> {
        self.spread.map(|n| (i % n as u64) as i32)
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
            self.send_event(t, first + n, &mut buf)?;
        }
        Ok(count)
    }

    /// Encodes event `i` of `t` and sends it to its partition.
    fn send_event(&self, t: &Traffic<'_>, i: u64, buf: &mut Vec<u8>) -> Result<()> {
        let e = event(t.samples, t.prefix, i, now_ms());
        encode_feature(t.format, &e, buf);
        self.send_to(
            t.topic,
            self.partition_of(i),
            Some(e.symbol.as_bytes()),
            buf,
        )
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
            self.send_event(t, first + n, &mut buf)?;
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
    /// Per event id, the first prediction's key and `output.id` header.
    pub first_output: HashMap<String, (Option<Vec<u8>>, Option<String>)>,
    /// Event ids whose repeated prediction differs from the first in key,
    /// `output.id`, prediction or model version (a restart's duplicate
    /// must not).
    pub unlike_duplicates: Vec<String>,
    /// Predictions without `source.topic`/`source.partition`/`source.offset`
    /// and `output.id` headers.
    pub without_source: u64,
    /// Every prediction's input partition and offset (its `source.*`
    /// headers), model and model version, in the order read.
    pub sources: Vec<(i32, i64, String, String)>,
    pub signals: u64,
    pub sides: BTreeMap<String, u64>,
    pub signal_ids: HashSet<String>,
    /// Each signal's route, by event id.
    pub signal_routes: HashMap<String, crate::events::OutputRoute>,
    pub dead_letters: Vec<DeadLetter>,
    /// Feature events read (a topic of feature events, e.g. a pass-through's
    /// copies: [`Reader::feature_events`]).
    pub features: u64,
    /// End-to-end latency per prediction or feature event (ms): read time
    /// minus event_time. Only of events whose id has
    /// [`Reader::timed_prefix`], when that is set.
    pub latencies_ms: Vec<f64>,
    /// The event_time of each of those, in the same order.
    pub timed_event_times: Vec<i64>,
    /// Of that, until the worker produced the prediction (its record
    /// timestamp minus event_time).
    pub to_output_ms: Vec<f64>,
    /// Predictions and feature events read whose id lacks
    /// [`Reader::timed_prefix`] (not timed).
    pub untimed: u64,
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

/// Reads the worker's output topics from the beginning (no group commits),
/// or a topic of feature events ([`Reader::feature_events`]).
pub struct Reader {
    consumer: BaseConsumer,
    predictions: Option<(String, Codec)>,
    signals: Option<(String, Codec)>,
    dead_letters: Option<String>,
    features: Option<(String, Codec)>,
    /// Scratch for reading feature events without allocating.
    scan: FeatureScan,
    pub seen: Seen,
    /// Only count and time outputs (no per-event maps): for latency runs.
    pub light: bool,
    /// Time only events whose id starts with this (None: all); the others
    /// are counted in [`Seen::untimed`].
    pub timed_prefix: Option<String>,
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
        Self::outputs(brokers, predictions, Some(signals), dead_letters, start)
    }

    /// Reads the worker's outputs from `start`; signals only when given.
    pub fn outputs(
        brokers: &str,
        predictions: (&str, WireFormat),
        signals: Option<(&str, WireFormat)>,
        dead_letters: &str,
        start: Offset,
    ) -> Result<Reader> {
        let mut topics = vec![predictions.0, dead_letters];
        topics.extend(signals.map(|s| s.0));
        let mut r = Self::open(brokers, &topics, start)?;
        let codec =
            |(t, f): (&str, WireFormat)| (t.to_string(), Codec::new(f, SchemaIds::default()));
        r.predictions = Some(codec(predictions));
        r.signals = signals.map(codec);
        r.dead_letters = Some(dead_letters.to_string());
        Ok(r)
    }

    /// Reads feature events (as the worker's input, or copied from it by a
    /// pass-through) from `start`, timing each like a prediction: read time
    /// minus its event_time.
    pub fn feature_events(
        brokers: &str,
        features: (&str, WireFormat),
        start: Offset,
    ) -> Result<Reader> {
        let mut r = Self::open(brokers, &[features.0], start)?;
        r.features = Some((
            features.0.to_string(),
            Codec::new(features.1, SchemaIds::default()),
        ));
        Ok(r)
    }

    /// A reader assigned every partition of `topics` from `start`.
    fn open(brokers: &str, topics: &[&str], start: Offset) -> Result<Reader> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("reader-{}", now_ms()))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "1")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for &t in topics {
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
            predictions: None,
            signals: None,
            dead_letters: None,
            features: None,
            scan: FeatureScan::default(),
            seen: Seen::default(),
            light: false,
            timed_prefix: None,
        })
    }

    /// Whether event `id` is timed (see [`Reader::timed_prefix`]); counts
    /// it in [`Seen::untimed`] when not.
    fn timed(prefix: Option<&str>, s: &mut Seen, id: &str) -> bool {
        let timed = prefix.is_none_or(|p| id.starts_with(p));
        if !timed {
            s.untimed += 1;
        }
        timed
    }

    /// Reads for up to `timeout`, or until `done` says so.
    pub fn read(&mut self, timeout: Duration, done: impl Fn(&Seen) -> bool) {
        let end = Instant::now() + timeout;
        while Instant::now() < end && !done(&self.seen) {
            let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(50)) else {
                continue;
            };
            let payload = m.payload().unwrap_or(&[]);
            let prefix = self.timed_prefix.as_deref();
            let s = &mut self.seen;
            let topic = m.topic();
            if let Some(codec) = codec_for(&self.predictions, topic) {
                match codec.decode_prediction(payload) {
                    Ok(p) => {
                        s.predictions += 1;
                        if Self::timed(prefix, s, &p.event_id) {
                            s.latencies_ms.push((now_ms() - p.event_time) as f64);
                            s.timed_event_times.push(p.event_time);
                            if let Some(ts) = m.timestamp().to_millis() {
                                s.to_output_ms.push((ts - p.event_time) as f64);
                            }
                        }
                        if !self.light {
                            let header = |k: &str| {
                                m.headers().and_then(|h| {
                                    h.iter().find(|x| x.key == k).map(|x| {
                                        String::from_utf8_lossy(x.value.unwrap_or(&[])).into_owned()
                                    })
                                })
                            };
                            let id = header("output.id");
                            if ["source.topic", "source.partition", "source.offset"]
                                .iter()
                                .any(|k| header(k).is_none())
                                || id.is_none()
                            {
                                s.without_source += 1;
                            }
                            if let (Some(part), Some(off)) = (
                                header("source.partition").and_then(|v| v.parse().ok()),
                                header("source.offset").and_then(|v| v.parse().ok()),
                            ) {
                                s.sources.push((
                                    part,
                                    off,
                                    p.model.clone(),
                                    p.model_version.clone(),
                                ));
                            }
                            let key = m.key().map(<[u8]>::to_vec);
                            let id_now = p.event_id.clone();
                            match s.by_id.insert(p.event_id.clone(), p) {
                                None => {
                                    s.first_output.insert(id_now, (key, id));
                                }
                                Some(before) => {
                                    s.duplicates += 1;
                                    let now = &s.by_id[&id_now];
                                    let same = s.first_output.get(&id_now) == Some(&(key, id))
                                        && before.prediction.to_bits() == now.prediction.to_bits()
                                        && before.model_version == now.model_version;
                                    if !same {
                                        s.unlike_duplicates.push(id_now);
                                    }
                                }
                            }
                        }
                    }
                    Err(_) => s.undecodable += 1,
                }
            } else if let Some(codec) = codec_for(&self.features, topic) {
                let scan = &mut self.scan;
                // the allocation-free scan where the format allows it
                let read = match codec.scan_feature(payload, scan) {
                    Some(r) => r.map(|()| {
                        (
                            Cow::Borrowed(FeatureScan::str(payload, &scan.event_id)),
                            scan.event_time,
                        )
                    }),
                    None => codec
                        .decode_feature(payload)
                        .map(|e| (Cow::Owned(e.event_id), e.event_time)),
                };
                match read {
                    Ok((id, event_time)) => {
                        s.features += 1;
                        if Self::timed(prefix, s, &id) {
                            s.latencies_ms.push((now_ms() - event_time) as f64);
                            s.timed_event_times.push(event_time);
                            if let Some(ts) = m.timestamp().to_millis() {
                                s.to_output_ms.push((ts - event_time) as f64);
                            }
                        }
                    }
                    Err(_) => s.undecodable += 1,
                }
            } else if let Some(codec) = codec_for(&self.signals, topic) {
                match codec.decode_signal(payload) {
                    Ok(e) => {
                        s.signals += 1;
                        let side = match e.side {
                            Side::Buy => "BUY",
                            Side::Sell => "SELL",
                            Side::Hold => "HOLD",
                        };
                        *s.sides.entry(side.to_string()).or_insert(0) += 1;
                        if !self.light {
                            s.signal_routes.insert(e.event_id.clone(), e.route);
                            s.signal_ids.insert(e.event_id);
                        }
                    }
                    Err(_) => s.undecodable += 1,
                }
            } else if self.dead_letters.as_deref() == Some(topic) {
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

/// The codec of a reader's topic, if `topic` is it.
fn codec_for<'a>(t: &'a Option<(String, Codec)>, topic: &str) -> Option<&'a Codec> {
    t.as_ref().filter(|(name, _)| name == topic).map(|(_, c)| c)
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
