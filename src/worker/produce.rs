//! The producer: a scored chunk's outputs are produced in input order
//! (prediction and signal keyed by symbol; dead letters with the original
//! key, value and headers); failed deliveries are retried with backoff. Every output carries its input's slot and offset as delivery
//! opaque; the broker's acknowledgement acks it in the [`OffsetTracker`].
//! Under `exactly-once` the producer is transactional: a failed delivery is
//! not retried but marks the open transaction for abort
//! ([`super::transaction`]), and chunks are dropped unpublished until the
//! transaction is aborted and the input rewound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};

use crate::deadline::Executor;
use crate::events::{Codec, OutputRoute, PredictionEvent, Side, SignalEvent};
use crate::worker::batch::{Chunk, Group, Kind, Stage};
use crate::worker::infer::{infer, refuse_failed_rows, Outcome, Queued};
use crate::worker::metrics::{Histogram, Metrics};
use crate::worker::offsets::{pack, unpack, OffsetTracker};

/// What publishing a chunk counted, for the metrics.
struct Tally {
    outs: Vec<GroupOut>,
    dead_counts: [u64; 5],
    e2e: Histogram,
}

/// Reusable output events and tallies of one model in a chunk.
struct GroupOut {
    prediction: PredictionEvent,
    signal: SignalEvent,
    predictions: u64,
    signals: u64,
    /// by [`Side`] as index
    sides: [u64; 3],
}

impl GroupOut {
    /// The group's events with what every row shares (model, version).
    fn new(g: &Group, o: &Outcome) -> GroupOut {
        let (version, sha256) = o
            .serving
            .as_ref()
            .map(|s| {
                (
                    s.model.info().version.clone(),
                    s.model.info().sha256.clone(),
                )
            })
            .unwrap_or_default();
        let role = g.route.role;
        GroupOut {
            prediction: PredictionEvent {
                event_id: String::new(),
                model: g.route.asked.clone(),
                model_version: version.clone(),
                model_sha256: sha256,
                symbol: String::new(),
                event_time: 0,
                prediction: 0.0,
                probabilities: None,
                fallback: o.serving.as_ref().is_some_and(|s| s.fallback),
                inference_latency_us: 0,
                // another model than the one asked for: a fallback, the
                // canary, the shadow
                served_by: o
                    .serving
                    .as_ref()
                    .filter(|s| s.fallback || role != OutputRoute::Primary)
                    .map(|s| s.model.info().name.clone()),
                route: role,
            },
            signal: SignalEvent {
                event_id: String::new(),
                symbol: String::new(),
                model: g.route.asked.clone(),
                model_version: version,
                event_time: 0,
                side: Side::Hold,
                strength: 0.0,
                prediction: 0.0,
                route: role,
            },
            predictions: 0,
            signals: 0,
            sides: [0; 3],
        }
    }
}

/// An output whose delivery failed and that is sent again.
struct Retry {
    topic: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Option<OwnedHeaders>,
    opaque: usize,
    due: Instant,
}

/// Receives delivery reports on the producer's own thread.
pub struct DeliveryContext {
    tracker: Arc<Mutex<OffsetTracker>>,
    metrics: Arc<Metrics>,
    retries: Mutex<Vec<Retry>>,
    backoff: Mutex<Option<backon::ExponentialBackoff>>,
    /// A delivery failed since the last success (the backoff is running).
    failing: AtomicBool,
    /// The producer hit a fatal error (e.g. idempotence broken): nothing
    /// more can be delivered; the worker stops and restarts from its commits.
    pub fatal: AtomicBool,
    dead_letters: String,
    /// `transactional.id` is set (`exactly-once`).
    transactional: bool,
    /// Repeated client errors, logged once per kind per interval.
    repeats: crate::worker::repeats::Repeats,
    /// Exactly-once: the open transaction failed (a delivery failed, or
    /// the producer refused a record in its state) and must be aborted.
    pub txn_abort: AtomicBool,
    /// Exactly-once: inputs (`source.topic`, `.partition`, `.offset`) whose
    /// prediction or signal the broker refused for good in an aborted
    /// transaction: read again, they become dead letters instead of
    /// aborting every transaction that carries them.
    refused: Mutex<HashMap<(String, i32, i64), RDKafkaErrorCode>>,
    /// `refused` is not empty.
    any_refused: AtomicBool,
}

/// Most inputs remembered in [`DeliveryContext::refused`].
const MAX_REFUSED: usize = 1024;

/// The input an output came from, by its source headers.
fn source_of(msg: &rdkafka::message::OwnedMessage) -> Option<(String, i32, i64)> {
    use rdkafka::message::Headers;
    let (mut topic, mut partition, mut offset) = (None, None, None);
    for h in msg.headers()?.iter() {
        let v = std::str::from_utf8(h.value?).ok()?;
        match h.key {
            "source.topic" => topic = Some(v.to_string()),
            "source.partition" => partition = v.parse().ok(),
            "source.offset" => offset = v.parse().ok(),
            _ => {}
        }
    }
    Some((topic?, partition?, offset?))
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        if self.repeats.log(level, fac, message) {
            self.metrics.kafka_failed(message);
        }
        crate::worker::rebalance::log_line(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error,
            KafkaError::Global(RDKafkaErrorCode::Fatal)
                | KafkaError::MessageProduction(RDKafkaErrorCode::Fatal)
        ) {
            tracing::error!(%error, reason, "fatal producer error: the worker stops");
            self.fatal.store(true, Ordering::Relaxed);
            return;
        }
        self.repeats.client_error("producer", &error, reason);
    }
}

/// Errors that sending again cannot fix.
fn permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidTopic
            | C::UnsupportedForMessageFormat
    )
}

impl DeliveryContext {
    fn next_delay(&self) -> Duration {
        let mut b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let it = b.get_or_insert_with(backoff);
        it.next().unwrap_or(Duration::from_secs(5))
    }
}

fn backoff() -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let (slot, offset) = unpack(opaque);
        if let (true, Err((err, msg))) = (self.transactional, result) {
            // a transaction cannot deliver a record again: it is aborted and
            // its input read again. Reports of a transaction aborted
            // already (purged records) are of slots the rewind replaced:
            // they no longer wait in the tracker and are ignored.
            let current = self
                .tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pending(slot)
                > 0;
            if !current {
                return;
            }
            let code = match err {
                KafkaError::MessageProduction(c) => Some(*c),
                _ => None,
            };
            if msg.topic() != self.dead_letters && code.is_some_and(permanent) {
                if let (Some(source), Some(code)) = (source_of(&msg.detach()), code) {
                    let mut r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
                    if r.len() >= MAX_REFUSED {
                        r.clear();
                    }
                    r.insert(source, code);
                    self.any_refused.store(true, Ordering::Relaxed);
                    self.metrics.add(
                        "ml_worker_publish_failures_total",
                        &[("error", &format!("{err}"))],
                        1,
                    );
                }
            }
            if !self.txn_abort.swap(true, Ordering::SeqCst) {
                tracing::warn!(topic = msg.topic(), error = %err, slot, offset,
                    "delivery failed in the open transaction; it is aborted and its input read again");
            }
            return;
        }
        match result {
            Ok(_) => {
                self.metrics.acked.fetch_add(1, Ordering::Relaxed);
                self.tracker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .ack(slot, offset);
                if self.failing.load(Ordering::Relaxed) {
                    self.failing.store(false, Ordering::Relaxed);
                    *self.backoff.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
            }
            Err((err, msg)) => {
                self.failing.store(true, Ordering::Relaxed);
                let code = match err {
                    KafkaError::MessageProduction(c) => Some(*c),
                    _ => None,
                };
                let mut topic = msg.topic().to_string();
                let mut headers = msg.headers().map(|h| h.detach());
                if code.is_some_and(permanent) {
                    self.metrics.add(
                        "ml_worker_publish_failures_total",
                        &[("error", &format!("{err}"))],
                        1,
                    );
                    if topic == self.dead_letters {
                        // nowhere left to put it: never acked, never committed
                        tracing::error!(topic = %topic, error = %err, slot, offset,
                            "dead letter cannot be published; its input stays uncommitted");
                        return;
                    }
                    tracing::error!(topic = %topic, error = %err, offset, "output refused by the broker; sending it to the dead-letter topic");
                    let h = headers.take().unwrap_or_default();
                    headers = Some(
                        h.insert(header("error.stage", Stage::Publish.as_str()))
                            .insert(header("error.reason", &err.to_string()))
                            .insert(header("error.topic", &topic)),
                    );
                    topic = self.dead_letters.clone();
                } else {
                    tracing::warn!(topic = %topic, error = %err, "delivery failed; retrying");
                }
                let delay = self.next_delay();
                self.retries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Retry {
                        topic,
                        key: msg.key().map(<[u8]>::to_vec),
                        payload: msg.payload().unwrap_or(&[]).to_vec(),
                        headers,
                        opaque,
                        due: Instant::now() + delay,
                    });
            }
        }
    }
}

/// A deterministic id for one output: from the input record's coordinates,
/// the model version and what the output is (`prediction`, `signal`,
/// `dead-letter`). A restart that reads the record again and produces the
/// output again gives it the same id, so a consumer can drop the duplicate
/// (the README's downstream recipe). 32 hex digits (128 bits of SHA-256).
pub fn output_id(topic: &str, partition: i32, offset: i64, version: &str, what: &str) -> String {
    String::from_utf8_lossy(&output_id_hex(topic, partition, offset, version, what)).into_owned()
}

/// [`output_id`] as 32 hex digits on the stack (no allocation: it is made
/// for every output).
fn output_id_hex(topic: &str, partition: i32, offset: i64, version: &str, what: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(topic.as_bytes());
    h.update([0]);
    h.update(partition.to_be_bytes());
    h.update(offset.to_be_bytes());
    h.update(version.as_bytes());
    h.update([0]);
    h.update(what.as_bytes());
    let digest = h.finalize();
    let mut out = [0u8; 32];
    hex::encode_to_slice(&digest[..16], &mut out).expect("32 hex digits for 16 bytes");
    out
}

/// A decimal integer on the stack.
struct Decimal {
    buf: [u8; 20],
    start: usize,
}

impl Decimal {
    fn new(v: i64) -> Decimal {
        let mut buf = [0u8; 20];
        let mut at = buf.len();
        let negative = v < 0;
        let mut n = v.unsigned_abs();
        loop {
            at -= 1;
            buf[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if negative {
            at -= 1;
            buf[at] = b'-';
        }
        Decimal { buf, start: at }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Where an output came from and its id, as headers (`source.topic`,
/// `source.partition`, `source.offset`, `output.id`).
fn source_headers(
    topic: &str,
    partition: i32,
    offset: i64,
    version: &str,
    what: &str,
) -> OwnedHeaders {
    let (p, o) = (Decimal::new(partition.into()), Decimal::new(offset));
    let id = output_id_hex(topic, partition, offset, version, what);
    OwnedHeaders::new_with_capacity(4)
        .insert(header("source.topic", topic.as_bytes()))
        .insert(header("source.partition", p.bytes()))
        .insert(header("source.offset", o.bytes()))
        .insert(header("output.id", &id[..]))
}

fn header<'a, V: rdkafka::message::ToBytes + ?Sized>(
    key: &'a str,
    value: &'a V,
) -> Header<'a, &'a V> {
    Header {
        key,
        value: Some(value),
    }
}

/// The worker's producer with its output codecs.
pub struct Publisher {
    pub producer: ThreadedProducer<DeliveryContext>,
    predictions: (String, Codec),
    signals: (String, Codec),
    /// Shadow models' predictions.
    shadow: (String, Codec),
    dead_letters: String,
    tracker: Arc<Mutex<OffsetTracker>>,
    metrics: Arc<Metrics>,
    /// Set when the shutdown deadline passed: stop waiting for queue space.
    pub abort: Arc<AtomicBool>,
    /// Chunks in [`Publisher::process`] now.
    busy: AtomicUsize,
}

impl Publisher {
    pub fn new(
        config: &rdkafka::ClientConfig,
        predictions: (String, Codec),
        signals: (String, Codec),
        shadow: (String, Codec),
        dead_letters: String,
        tracker: Arc<Mutex<OffsetTracker>>,
        metrics: Arc<Metrics>,
    ) -> Result<Publisher, KafkaError> {
        let ctx = DeliveryContext {
            tracker: tracker.clone(),
            metrics: metrics.clone(),
            retries: Mutex::new(Vec::new()),
            backoff: Mutex::new(None),
            failing: AtomicBool::new(false),
            fatal: AtomicBool::new(false),
            dead_letters: dead_letters.clone(),
            transactional: config.get("transactional.id").is_some(),
            txn_abort: AtomicBool::new(false),
            refused: Mutex::new(HashMap::new()),
            any_refused: AtomicBool::new(false),
            repeats: Default::default(),
        };
        Ok(Publisher {
            producer: config.create_with_context(ctx)?,
            predictions,
            signals,
            shadow,
            dead_letters,
            tracker,
            metrics,
            abort: Arc::new(AtomicBool::new(false)),
            busy: AtomicUsize::new(0),
        })
    }

    /// Sends one record, waiting (with backoff) while the local queue is
    /// full. Returns the error when the record cannot be queued at all.
    fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
        opaque: usize,
    ) -> Result<(), KafkaError> {
        let mut record = BaseRecord::with_opaque_to(topic, opaque).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        let mut delays = None;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    if self.abort.load(Ordering::Relaxed) {
                        return Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull));
                    }
                    let d = delays
                        .get_or_insert_with(|| {
                            ExponentialBuilder::default()
                                .with_min_delay(Duration::from_micros(200))
                                .with_max_delay(Duration::from_millis(100))
                                .without_max_times()
                                .build()
                        })
                        .next()
                        .unwrap_or(Duration::from_millis(100));
                    std::thread::sleep(d);
                    record = r;
                }
                Err((e, _)) => {
                    let c = self.producer.context();
                    if c.transactional
                        && matches!(e, KafkaError::MessageProduction(RDKafkaErrorCode::State))
                    {
                        // the open transaction failed: abort it
                        c.txn_abort.store(true, Ordering::SeqCst);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Sends again the outputs whose delivery failed, when due. Never
    /// blocks: a full local queue puts the record back for the next call.
    pub fn send_retries(&self) {
        let due: Vec<Retry> = {
            let mut r = self
                .producer
                .context()
                .retries
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if r.is_empty() {
                return;
            }
            let now = Instant::now();
            let (due, later) = r.drain(..).partition(|x| x.due <= now);
            *r = later;
            due
        };
        let mut back = Vec::new();
        for x in due {
            let mut record = BaseRecord::with_opaque_to(&x.topic, x.opaque).payload(&x.payload);
            if let Some(k) = &x.key {
                record = record.key(k);
            }
            if let Some(h) = &x.headers {
                record = record.headers(h.clone());
            }
            match self.producer.send(record) {
                Ok(()) => {
                    self.metrics
                        .add("ml_worker_publish_retries_total", &[("topic", &x.topic)], 1)
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    back.push(Retry {
                        due: Instant::now() + Duration::from_millis(10),
                        ..x
                    });
                }
                Err((e, _)) => {
                    let (slot, offset) = unpack(x.opaque);
                    tracing::error!(topic = %x.topic, error = %e, slot, offset, "retry could not be queued; its input stays uncommitted");
                }
            }
        }
        if !back.is_empty() {
            self.producer
                .context()
                .retries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(back);
        }
    }

    /// Whether the producer can no longer deliver anything.
    pub fn fatal(&self) -> bool {
        self.producer.context().fatal.load(Ordering::Relaxed)
    }

    /// Exactly-once: whether the open transaction must be aborted.
    pub fn txn_abort(&self) -> bool {
        self.producer.context().txn_abort.load(Ordering::SeqCst)
    }

    /// Exactly-once: marks the open transaction for abort (`true`), or
    /// clears the mark once a new one began (`false`).
    pub fn set_txn_abort(&self, abort: bool) {
        self.producer
            .context()
            .txn_abort
            .store(abort, Ordering::SeqCst);
    }

    /// Exactly-once: nothing produced now would be committed (the
    /// transaction is to be aborted, or the producer failed for good).
    fn discarding(&self) -> bool {
        let c = self.producer.context();
        c.transactional && (c.txn_abort.load(Ordering::SeqCst) || c.fatal.load(Ordering::Relaxed))
    }

    /// Chunks being scored or published now.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// Exactly-once: whether the broker refused an output of this input
    /// for good in an aborted transaction. Kept until a transaction commits
    /// past the input ([`Publisher::forget_refused_below`]): the one that
    /// carries its dead letter may be aborted too, and the input read again.
    fn refused(&self, topic: &str, partition: i32, offset: i64) -> Option<RDKafkaErrorCode> {
        let c = self.producer.context();
        if !c.any_refused.load(Ordering::Relaxed) {
            return None;
        }
        let r = c.refused.lock().unwrap_or_else(|p| p.into_inner());
        r.get(&(topic.to_string(), partition, offset)).copied()
    }

    /// Exactly-once: a transaction committed `partition` of `topic` up to
    /// `offset`: the refused outputs of the inputs below it are done with.
    pub(super) fn forget_refused_below(&self, topic: &str, partition: i32, offset: i64) {
        let c = self.producer.context();
        if !c.any_refused.load(Ordering::Relaxed) {
            return;
        }
        let mut r = c.refused.lock().unwrap_or_else(|p| p.into_inner());
        r.retain(|(t, p, o), _| !(t == topic && *p == partition && *o < offset));
        if r.is_empty() {
            c.any_refused.store(false, Ordering::Relaxed);
        }
    }

    /// Outputs waiting to be sent again.
    pub fn retries_pending(&self) -> usize {
        self.producer
            .context()
            .retries
            .lock()
            .map(|r| r.len())
            .unwrap_or(0)
    }

    /// Scores a chunk and publishes its outputs in input order. Model code
    /// runs on `executor`, under the serving model's inference deadline.
    /// Returns the emptied chunk for reuse.
    pub fn process(&self, chunk: Chunk, queued: &Queued, executor: &mut Executor) -> Chunk {
        /// Counts a chunk in `busy` until it is done (or its shard panicked).
        struct Busy<'a>(&'a AtomicUsize);
        impl Drop for Busy<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.busy.fetch_add(1, Ordering::SeqCst);
        let _busy = Busy(&self.busy);
        self.process_chunk(chunk, queued, executor)
    }

    fn process_chunk(&self, mut chunk: Chunk, queued: &Queued, executor: &mut Executor) -> Chunk {
        let arena_bytes = chunk.arena.len();
        if self.discarding() {
            // exactly-once: the transaction is being aborted and these
            // records will be read again (nothing tracked, nothing sent)
            queued.remove(&chunk);
            chunk.recycle();
            return chunk;
        }
        // 1. inference, one call per model
        let outcomes: Vec<Outcome> = chunk
            .groups
            .iter_mut()
            .map(|g| infer(g, executor, &self.metrics))
            .collect();
        // 2. rows that failed become dead letters (a failed shadow row
        // is only counted)
        let shadow_failed = refuse_failed_rows(&mut chunk.records, &outcomes);
        self.metrics.add(
            "ml_worker_shadow_failures_total",
            &[("stage", "inference")],
            shadow_failed,
        );
        // 3. every output is tracked before it can be acknowledged
        self.track(&chunk, &outcomes);
        queued
            .events
            .fetch_sub(chunk.records.len(), Ordering::Relaxed);
        // 4. publish in input order
        let tally = self.publish(&mut chunk, &outcomes);
        // 5. metrics
        self.count(&chunk, &outcomes, &tally);
        queued.bytes.fetch_sub(arena_bytes, Ordering::Relaxed);
        chunk.recycle();
        chunk
    }

    /// Tracks every record with the number of outputs it will have.
    fn track(&self, chunk: &Chunk, outcomes: &[Outcome]) {
        let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        for rec in &chunk.records {
            let outputs = match &rec.kind {
                Kind::Event { group, shadow, .. } => {
                    1 + outcomes[*group as usize].signal().is_some() as u32
                        + shadow.is_some() as u32
                }
                Kind::Dead { .. } => 1,
            };
            t.track(rec.slot, rec.offset, outputs);
        }
    }

    /// Encodes and sends each record's outputs (prediction and signal, or
    /// a dead letter), in input order.
    fn publish(&self, chunk: &mut Chunk, outcomes: &[Outcome]) -> Tally {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        // one reusable event per model: per record only the row's fields change
        let mut outs: Vec<GroupOut> = chunk
            .groups
            .iter()
            .zip(outcomes)
            .map(|(g, o)| GroupOut::new(g, o))
            .collect();
        let mut dead_counts = [0u64; 5];
        let mut e2e = Histogram::latency();
        let mut buf = Vec::with_capacity(256);
        let mut records = std::mem::take(&mut chunk.records);
        for mut rec in records.drain(..) {
            if self.discarding() {
                // the transaction failed: the rest is read again after the abort
                break;
            }
            let opaque = pack(rec.slot, rec.offset);
            match &mut rec.kind {
                Kind::Event {
                    group,
                    row,
                    event_id,
                    symbol,
                    event_time,
                    shadow,
                } => {
                    let g = *group as usize;
                    let Ok(p) = &outcomes[g].result else {
                        unreachable!("failed rows were made dead")
                    };
                    let out = &mut outs[g];
                    let pe = &mut out.prediction;
                    let r = *row as usize;
                    pe.event_id.clear();
                    pe.event_id.push_str(chunk.str(event_id));
                    pe.symbol.clear();
                    pe.symbol.push_str(chunk.str(symbol));
                    pe.event_time = *event_time;
                    pe.prediction = p.values.row(r)[0];
                    pe.probabilities = p.probabilities.as_ref().map(|pr| pr.row(r).to_vec());
                    pe.inference_latency_us = outcomes[g].latency_us;
                    buf.clear();
                    self.predictions.1.encode_prediction(pe, &mut buf);
                    let mut failed = None;
                    let headers = source_headers(
                        &rec.topic,
                        rec.partition,
                        rec.offset,
                        &pe.model_version,
                        "prediction",
                    );
                    let sent = match self.refused(&rec.topic, rec.partition, rec.offset) {
                        // exactly-once: the broker refused this event's output
                        // for good in an aborted transaction; a dead letter now
                        Some(code) => Err(KafkaError::MessageProduction(code)),
                        None => self.send(
                            &self.predictions.0,
                            Some(pe.symbol.as_bytes()),
                            &buf,
                            Some(headers),
                            opaque,
                        ),
                    };
                    if let Err(e) = sent {
                        failed = Some(e);
                    } else {
                        out.predictions += 1;
                        if let Some(ts) = rec.timestamp {
                            e2e.observe(now_ms.saturating_sub(ts).max(0) as f64 / 1000.0);
                        }
                    }
                    if let Some(rule) = outcomes[g].signal() {
                        let (side, strength) =
                            rule.apply(pe.prediction, pe.probabilities.as_deref());
                        let se = &mut out.signal;
                        std::mem::swap(&mut se.event_id, &mut pe.event_id);
                        std::mem::swap(&mut se.symbol, &mut pe.symbol);
                        se.event_time = pe.event_time;
                        se.side = side;
                        se.strength = strength;
                        se.prediction = pe.prediction;
                        buf.clear();
                        self.signals.1.encode_signal(se, &mut buf);
                        if failed.is_none() {
                            let headers = source_headers(
                                &rec.topic,
                                rec.partition,
                                rec.offset,
                                &se.model_version,
                                "signal",
                            );
                            if let Err(e) = self.send(
                                &self.signals.0,
                                Some(se.symbol.as_bytes()),
                                &buf,
                                Some(headers),
                                opaque,
                            ) {
                                failed = Some(e);
                            } else {
                                out.signals += 1;
                                out.sides[side as usize] += 1;
                            }
                        } else {
                            // the prediction was not queued: its signal is not sent either
                            self.ack_unsent(rec.slot, rec.offset);
                        }
                    }
                    if let (Some(_), Some(_)) = (&*shadow, &failed) {
                        // tracked, not sent: the input becomes a dead letter
                        self.ack_unsent(rec.slot, rec.offset);
                    }
                    if let (Some((sg, sr)), None) = (*shadow, &failed) {
                        let (sg, sr) = (sg as usize, sr as usize);
                        let Ok(sp) = &outcomes[sg].result else {
                            unreachable!("failed shadow rows were dropped")
                        };
                        let se = &mut outs[sg].prediction;
                        se.event_id.clear();
                        se.event_id.push_str(chunk.str(event_id));
                        se.symbol.clear();
                        se.symbol.push_str(chunk.str(symbol));
                        se.event_time = *event_time;
                        se.prediction = sp.values.row(sr)[0];
                        se.probabilities = sp.probabilities.as_ref().map(|pr| pr.row(sr).to_vec());
                        se.inference_latency_us = outcomes[sg].latency_us;
                        buf.clear();
                        self.shadow.1.encode_prediction(se, &mut buf);
                        let headers = source_headers(
                            &rec.topic,
                            rec.partition,
                            rec.offset,
                            &se.model_version,
                            "shadow",
                        );
                        match self.send(
                            &self.shadow.0,
                            Some(se.symbol.as_bytes()),
                            &buf,
                            Some(headers),
                            opaque,
                        ) {
                            Ok(()) => outs[sg].predictions += 1,
                            Err(e) => {
                                // a shadow output is not worth a dead letter
                                tracing::warn!(error = %e, "a shadow prediction could not be queued");
                                self.ack_unsent(rec.slot, rec.offset);
                            }
                        }
                    }
                    if let Some(e) = failed {
                        if self.discarding() {
                            break;
                        }
                        // swap the failed output for a dead letter of the input
                        self.tracker
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .track(rec.slot, rec.offset, 1);
                        self.ack_unsent(rec.slot, rec.offset);
                        let reason = format!("output could not be queued: {e}");
                        self.dead_letter(chunk, &rec, Stage::Publish, &reason, opaque);
                        dead_counts[Stage::Publish as usize] += 1;
                    }
                }
                Kind::Dead { stage, reason } => {
                    let (stage, reason) = (*stage, std::mem::take(reason));
                    self.dead_letter(chunk, &rec, stage, &reason, opaque);
                    dead_counts[stage as usize] += 1;
                }
            }
        }
        chunk.records = records;
        Tally {
            outs,
            dead_counts,
            e2e,
        }
    }

    /// Adds a chunk's tallies to the metrics.
    fn count(&self, chunk: &Chunk, outcomes: &[Outcome], tally: &Tally) {
        let Tally {
            outs,
            dead_counts,
            e2e,
        } = tally;
        for ((g, out), o) in chunk.groups.iter().zip(outs).zip(outcomes) {
            let model = g.route.asked.as_str();
            let m = &self.metrics;
            let topic = match g.route.role {
                OutputRoute::Shadow => &self.shadow.0,
                _ => &self.predictions.0,
            };
            m.add(
                "ml_worker_events_out_total",
                &[("topic", topic), ("model", model)],
                out.predictions,
            );
            m.add(
                "ml_worker_route_predictions_total",
                &[("model", model), ("route", g.route.role.as_str())],
                out.predictions,
            );
            m.add(
                "ml_worker_events_out_total",
                &[("topic", &self.signals.0), ("model", model)],
                out.signals,
            );
            for side in [Side::Buy, Side::Sell, Side::Hold] {
                m.add(
                    "ml_worker_signals_total",
                    &[("model", model), ("side", side_name(side))],
                    out.sides[side as usize],
                );
            }
            if o.serving.as_ref().is_some_and(|s| s.fallback) {
                m.add(
                    "ml_worker_fallbacks_total",
                    &[("model", model)],
                    out.predictions,
                );
            }
        }
        for stage in Stage::ALL {
            let n = dead_counts[stage as usize];
            self.metrics.add(
                "ml_worker_dead_letters_total",
                &[("stage", stage.as_str())],
                n,
            );
            self.metrics.add(
                "ml_worker_events_out_total",
                &[("topic", &self.dead_letters), ("model", "")],
                n,
            );
        }
        self.metrics
            .merge_histogram("ml_worker_end_to_end_latency_seconds", &[], e2e);
    }

    /// An output that was tracked but never queued counts as done.
    fn ack_unsent(&self, slot: u32, offset: i64) {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ack(slot, offset);
    }

    /// Publishes the original record with the reason in headers.
    fn dead_letter(
        &self,
        chunk: &Chunk,
        rec: &crate::worker::batch::Record,
        stage: Stage,
        reason: &str,
        opaque: usize,
    ) {
        // reasons can quote untrusted input (a model name): keep them short
        let reason = truncate(reason, MAX_REASON);
        let partition = rec.partition.to_string();
        let offset = rec.offset.to_string();
        // the original headers are copied natively: their keys are never
        // parsed (they need not be UTF-8)
        let with_error = |extra: Option<(&str, &str)>| {
            let mut h = rec.headers.clone().unwrap_or_default();
            h = h
                .insert(header("error.stage", stage.as_str()))
                .insert(header("error.reason", reason))
                .insert(header("source.topic", &*rec.topic))
                .insert(header("source.partition", &partition))
                .insert(header("source.offset", &offset))
                .insert(header(
                    "output.id",
                    &output_id(&rec.topic, rec.partition, rec.offset, "", "dead-letter"),
                ));
            if let Some((k, v)) = extra {
                h = h.insert(header(k, v));
            }
            h
        };
        tracing::debug!(stage = stage.as_str(), reason, topic = %rec.topic, partition = rec.partition, offset = rec.offset, "dead letter");
        let key = rec.key.as_ref().map(|k| chunk.bytes(k));
        const OMITTED: (&str, &str) = (
            "payload.omitted",
            "too large to copy; read it at source.topic/partition/offset",
        );
        let mut result = self.send(
            &self.dead_letters,
            key,
            chunk.bytes(&rec.payload),
            Some(with_error(rec.omitted.then_some(OMITTED))),
            opaque,
        );
        if matches!(
            result,
            Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge
            ))
        ) {
            // too large with the headers: the dead letter says where the
            // original is instead of carrying it
            result = self.send(
                &self.dead_letters,
                key,
                &[],
                Some(with_error(Some(OMITTED))),
                opaque,
            );
        }
        if let Err(e) = result {
            tracing::error!(error = %e, topic = %rec.topic, partition = rec.partition, offset = rec.offset,
                "dead letter could not be queued; its input stays uncommitted");
        }
    }

    /// Waits until every queued output is acknowledged, up to `deadline`.
    pub fn flush(&self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = self.producer.flush(left) {
            tracing::warn!(error = %e, "producer flush did not finish");
        }
    }
}

/// Longest `error.reason` header, in bytes.
const MAX_REASON: usize = 1024;

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn side_name(s: crate::events::Side) -> &'static str {
    match s {
        crate::events::Side::Buy => "BUY",
        crate::events::Side::Sell => "SELL",
        crate::events::Side::Hold => "HOLD",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_the_decimal_coordinates_and_the_hex_id() {
        for v in [
            0i64,
            7,
            -1,
            10,
            1234567890123,
            i64::MAX,
            i64::MIN,
            i32::MIN as i64,
        ] {
            assert_eq!(Decimal::new(v).bytes(), v.to_string().as_bytes());
        }
        let id = output_id("t", 3, 42, "v1", "prediction");
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(id.as_bytes(), output_id_hex("t", 3, 42, "v1", "prediction"));
        assert_ne!(id, output_id("t", 3, 42, "v1", "signal"));
        let h = source_headers("t", 3, 42, "v1", "prediction");
        use rdkafka::message::Headers;
        let got: Vec<(String, String)> = h
            .iter()
            .map(|x| {
                (
                    x.key.to_string(),
                    String::from_utf8_lossy(x.value.unwrap()).into_owned(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("source.topic".into(), "t".into()),
                ("source.partition".into(), "3".into()),
                ("source.offset".into(), "42".into()),
                ("output.id".into(), id),
            ]
        );
    }
}
