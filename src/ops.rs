//! Operator commands against a running cluster:
//!
//! - [`produce`] (`ml-worker produce`): synthetic feature events for the
//!   registered models, at a steady rate, in the configured wire format;
//! - [`replay_dead_letters`] (`ml-worker replay-dlq`): dead letters sent
//!   back to the input topic they came from, after a fix.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::worker::repeats::OpsContext;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::ModelSpec;
use crate::events::{write_feature_datum, FeatureEvent, WireFormat, FEATURE_EVENT_SCHEMA};
use crate::loadgen::{load_samples, Samples, SYMBOLS};
use crate::worker::config::WorkerConfig;

/// What `ml-worker produce` sends.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// Events per second.
    pub rate: f64,
    /// Stop after this long (with `events`: whichever comes first).
    pub duration: Option<Duration>,
    /// Stop after this many events.
    pub events: Option<u64>,
    /// Only this model's events (default: every registered model in turn).
    pub model: Option<String>,
    /// Sample rows (`<model>.csv` with the model's feature columns); models
    /// without a file get random values in [0, 1).
    pub samples: Option<std::path::PathBuf>,
}

/// What `ml-worker produce` did.
#[derive(Debug, Clone, Serialize)]
pub struct Produced {
    pub topic: String,
    pub format: String,
    pub events: u64,
    pub per_model: BTreeMap<String, u64>,
    /// Until every event was delivered.
    pub seconds: f64,
    /// The rate events were sent at.
    pub events_per_s: f64,
}

/// One model's rows: from its sample file, or random.
struct Source {
    spec: ModelSpec,
    rows: Option<Vec<Vec<f64>>>,
}

/// Sends synthetic FeatureEvents for the registered models to the first
/// input topic of `cfg` at `opts.rate`, keyed by symbol, in the input's
/// wire format (`avro`: the FeatureEvent schema registered under
/// `<topic>-value`). Every event is delivered before this returns.
pub fn produce(
    cfg: &WorkerConfig,
    brokers: &str,
    specs: &[ModelSpec],
    opts: &ProduceOptions,
) -> Result<Produced> {
    if !(opts.rate > 0.0 && opts.rate.is_finite() && opts.rate <= 10_000_000.0) {
        bail!("--rate must be within 0 (exclusive) and 10,000,000 events/s");
    }
    if opts.duration.is_none() && opts.events.is_none() {
        bail!("say how much to send: --duration D or --events N");
    }
    let topic = cfg
        .input_topics
        .first()
        .ok_or_else(|| anyhow!("the config lists no input topic"))?
        .clone();
    let samples: Vec<Samples> = match &opts.samples {
        Some(dir) => load_samples(dir)?,
        None => Vec::new(),
    };
    let sources: Vec<Source> = specs
        .iter()
        .filter(|s| opts.model.as_ref().is_none_or(|m| *m == s.name))
        .map(|spec| Source {
            rows: samples
                .iter()
                .find(|s| s.model == spec.name && s.features == spec.features)
                .map(|s| s.rows.clone()),
            spec: spec.clone(),
        })
        .collect();
    if sources.is_empty() {
        bail!(
            "model '{}' is not registered",
            opts.model.as_deref().unwrap_or_default()
        );
    }
    let schema_id = match cfg.input_format {
        WireFormat::Avro => {
            let sr = cfg.schema_registry.as_ref().ok_or_else(|| {
                anyhow!("input format 'avro' needs schema_registry in the config")
            })?;
            let client = crate::worker::schema_registry::SchemaRegistry::new(sr)
                .map_err(|e| anyhow!("schema registry: {e}"))?;
            client
                .register(&format!("{topic}-value"), FEATURE_EVENT_SCHEMA)
                .map_err(|e| anyhow!("registering the FeatureEvent schema: {e}"))?
        }
        _ => 0,
    };
    let (_, mut producer_cfg) = crate::worker::client_configs(cfg, brokers);
    producer_cfg.set("message.timeout.ms", "60000");
    let producer: ThreadedProducer<OpsContext> = producer_cfg
        .create_with_context(OpsContext::default())
        .map_err(|e| {
            anyhow::anyhow!(
                "creating the producer: {}",
                crate::worker::clients::describe(&e)
            )
        })?;
    let run = format!(
        "produce-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let started = Instant::now();
    let limit = opts.events.unwrap_or(u64::MAX);
    let mut per_model: BTreeMap<String, u64> = BTreeMap::new();
    let mut random = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = Vec::with_capacity(512);
    let mut i = 0u64;
    while i < limit && opts.duration.is_none_or(|d| started.elapsed() < d) {
        // steady: event i leaves at start + i / rate
        let due = started + Duration::from_secs_f64(i as f64 / opts.rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
            continue;
        }
        let source = &sources[(i % sources.len() as u64) as usize];
        let turn = i / sources.len() as u64;
        let values: Vec<f64> = match &source.rows {
            Some(rows) if !rows.is_empty() => rows[(turn % rows.len() as u64) as usize].clone(),
            _ => source
                .spec
                .features
                .iter()
                .map(|_| next_unit(&mut random))
                .collect(),
        };
        let event = FeatureEvent {
            event_id: format!("{run}-{i}"),
            model: source.spec.name.clone(),
            symbol: SYMBOLS[(i % SYMBOLS.len() as u64) as usize].to_string(),
            event_time: crate::loadgen::now_ms(),
            features: source.spec.features.iter().cloned().zip(values).collect(),
        };
        encode(cfg.input_format, schema_id, &event, &mut buf);
        send(
            &producer,
            &topic,
            None,
            Some(event.symbol.as_bytes()),
            &buf,
            None,
        )?;
        *per_model.entry(event.model).or_insert(0) += 1;
        i += 1;
    }
    let sending = started.elapsed().as_secs_f64();
    producer.flush(Duration::from_secs(60)).map_err(|e| {
        anyhow!(
            "not every event was delivered within 60 s: {e}{}",
            producer.context().why()
        )
    })?;
    Ok(Produced {
        topic,
        format: serde_json::to_value(cfg.input_format)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        events: i,
        per_model,
        seconds: started.elapsed().as_secs_f64(),
        events_per_s: i as f64 / sending.max(1e-9),
    })
}

/// A uniform value in [0, 1) (SplitMix64).
fn next_unit(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// A feature event in `format` (`avro`: Confluent framing with `schema_id`).
fn encode(format: WireFormat, schema_id: u32, e: &FeatureEvent, out: &mut Vec<u8>) {
    match format {
        WireFormat::Avro => {
            out.clear();
            out.push(0);
            out.extend_from_slice(&schema_id.to_be_bytes());
            write_feature_datum(e, out);
        }
        other => crate::loadgen::encode_feature(other, e, out),
    }
}

/// Sends one record, waiting while the local queue is full.
fn send<C: rdkafka::producer::ProducerContext<DeliveryOpaque = ()>>(
    producer: &ThreadedProducer<C>,
    topic: &str,
    partition: Option<i32>,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: Option<OwnedHeaders>,
) -> Result<()> {
    let mut rec = BaseRecord::to(topic).payload(payload);
    if let Some(k) = key {
        rec = rec.key(k);
    }
    if let Some(p) = partition {
        rec = rec.partition(p);
    }
    if let Some(h) = headers {
        rec = rec.headers(h);
    }
    crate::loadgen::send_waiting(producer, rec).map_err(|e| anyhow!("sending to {topic}: {e}"))
}

/// What `ml-worker replay-dlq` sends back.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Only dead letters of this stage (`decode`, `route`, `validate`,
    /// `inference`, `publish`).
    pub stage: Option<String>,
    /// Only dead letters written at or after this time (default: those
    /// not replayed before, by this config's replay group).
    pub since: Option<SystemTime>,
    /// Report what would be sent; send nothing, remember nothing.
    pub dry_run: bool,
}

/// What `ml-worker replay-dlq` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Replayed {
    /// Dead letters read (up to the topic's end when the command started).
    pub read: u64,
    /// Sent back (or, with --dry-run, that would be), by input topic.
    pub sent: BTreeMap<String, u64>,
    /// Sent back by the stage that had refused them.
    pub by_stage: BTreeMap<String, u64>,
    /// Not sent, by reason.
    pub skipped: BTreeMap<String, u64>,
    pub dry_run: bool,
}

/// The consumer group that remembers how far replays got: one per
/// `--stage` filter (`<group_id>.replay-dlq.<stage>`, or `.all`), so a
/// replay of one stage does not mark another stage's dead letters done.
pub fn replay_group(cfg: &WorkerConfig, opts: &ReplayOptions) -> String {
    format!(
        "{}.replay-dlq.{}",
        cfg.group_id,
        opts.stage.as_deref().unwrap_or("all")
    )
}

/// Headers a dead letter carries that are the worker's, not the
/// original record's: dropped on replay.
fn worker_header(key: &str) -> bool {
    key.starts_with("error.")
        || key.starts_with("source.")
        || key == "output.id"
        || key == "payload.omitted"
}

/// Reads the dead-letter topic up to its end (from where this config's
/// replay group left off, or from `since`), and sends each dead letter
/// that passes the filter back to the input topic and partition it came
/// from (`source.topic`, which must be one of the config's input topics,
/// and `source.partition`), with its original key, value and headers (the
/// worker's `error.*`, `source.*`, `output.id` headers dropped). Offsets
/// are committed for the replay group ([`replay_group`]) only after
/// everything was delivered, so a second run with the same `--stage` sends
/// only newer dead letters.
pub fn replay_dead_letters(
    cfg: &WorkerConfig,
    brokers: &str,
    opts: &ReplayOptions,
) -> Result<Replayed> {
    if let Some(s) = &opts.stage {
        let stages: Vec<&str> = crate::worker::batch::Stage::ALL
            .iter()
            .map(|s| s.as_str())
            .collect();
        if !stages.contains(&s.as_str()) {
            bail!("--stage '{s}' is not one of {}", stages.join(", "));
        }
    }
    let (consumer_cfg, mut producer_cfg) = crate::worker::client_configs(cfg, brokers);
    producer_cfg.set("message.timeout.ms", "60000");
    let mut consumer_cfg: ClientConfig = consumer_cfg;
    consumer_cfg
        .set("group.id", replay_group(cfg, opts))
        .set("group.protocol", "classic")
        .remove("partition.assignment.strategy");
    let consumer: BaseConsumer<OpsContext> = consumer_cfg
        .create_with_context(OpsContext::default())
        .map_err(|e| {
            anyhow::anyhow!(
                "creating the consumer: {}",
                crate::worker::clients::describe(&e)
            )
        })?;
    let topic = &cfg.dead_letters;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(|e| {
        anyhow!(
            "reading {topic}'s partitions: {e}{}",
            consumer.context().why()
        )
    })?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        bail!("dead-letter topic '{topic}' does not exist or has no partitions");
    }
    // where to start and where the topic ends now
    let mut start = TopicPartitionList::new();
    for p in &partitions {
        start.add_partition(topic, *p);
    }
    let start = match opts.since {
        Some(t) => {
            let ms = t
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let mut at = TopicPartitionList::new();
            for p in &partitions {
                at.add_partition_offset(topic, *p, Offset::Offset(ms))?;
            }
            consumer.offsets_for_times(at, timeout)?
        }
        None => consumer.committed_offsets(start, timeout)?,
    };
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut assign = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, *p, timeout)?;
        let from = match start.find_partition(topic, *p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            // nothing committed, or no record at or after `since`
            Some(Offset::End) => high,
            _ => low,
        };
        if from < high {
            ends.insert(*p, high);
            assign.add_partition_offset(topic, *p, Offset::Offset(from))?;
        }
    }
    let producer: ThreadedProducer<Deliveries> = producer_cfg
        .create_with_context(Deliveries::default())
        .context("creating the producer")?;
    let mut partitions_of: HashMap<String, i32> = HashMap::new();
    for t in &cfg.input_topics {
        let n = consumer
            .fetch_metadata(Some(t), timeout)
            .ok()
            .and_then(|m| m.topics().first().map(|t| t.partitions().len() as i32))
            .unwrap_or(0);
        partitions_of.insert(t.clone(), n);
    }
    let mut out = Replayed {
        dry_run: opts.dry_run,
        ..Replayed::default()
    };
    let mut done = TopicPartitionList::new();
    if !ends.is_empty() {
        consumer.assign(&assign)?;
        let mut idle_since = Instant::now();
        while !ends.is_empty() {
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                if idle_since.elapsed() > Duration::from_secs(30) {
                    bail!("no dead letters arrived for 30 s before the topic's end; nothing was committed");
                }
                continue;
            };
            idle_since = Instant::now();
            let m = m.context("reading the dead-letter topic")?;
            let p = m.partition();
            let Some(end) = ends.get(&p).copied() else {
                continue;
            };
            if m.offset() >= end {
                ends.remove(&p);
                continue;
            }
            out.read += 1;
            replay_one(&m, cfg, &partitions_of, opts, &producer, &mut out)?;
            if m.offset() + 1 >= end {
                ends.remove(&p);
            }
            done.add_partition_offset(topic, p, Offset::Offset(m.offset() + 1))
                .ok();
        }
    }
    producer.flush(Duration::from_secs(60)).map_err(|e| {
        anyhow!(
            "not every replayed record was delivered within 60 s ({e}{}); nothing was committed",
            producer.context().client.why()
        )
    })?;
    let failed = producer
        .context()
        .failed
        .load(std::sync::atomic::Ordering::Relaxed);
    if failed > 0 {
        bail!(
            "{failed} replayed records were not delivered ({}); nothing was committed: run it again",
            producer
                .context()
                .first_error
                .lock()
                .map(|e| e.clone().unwrap_or_default())
                .unwrap_or_default()
        );
    }
    if !opts.dry_run && done.count() > 0 {
        consumer.commit(&done, rdkafka::consumer::CommitMode::Sync)?;
    }
    Ok(out)
}

/// Sends one dead letter back (or counts why not).
fn replay_one(
    m: &rdkafka::message::BorrowedMessage<'_>,
    cfg: &WorkerConfig,
    partitions_of: &HashMap<String, i32>,
    opts: &ReplayOptions,
    producer: &ThreadedProducer<Deliveries>,
    out: &mut Replayed,
) -> Result<()> {
    let mut skip = |why: &str| *out.skipped.entry(why.to_string()).or_insert(0) += 1;
    let mut get = HashMap::new();
    if let Some(h) = m.headers() {
        for x in h.iter() {
            if worker_header(x.key) {
                get.insert(
                    x.key.to_string(),
                    String::from_utf8_lossy(x.value.unwrap_or(&[])).into_owned(),
                );
            }
        }
    }
    let stage = get.get("error.stage").cloned().unwrap_or_default();
    if opts.stage.as_ref().is_some_and(|s| *s != stage) {
        skip(&format!("stage {stage} (not asked for)"));
        return Ok(());
    }
    if get.contains_key("payload.omitted") {
        skip("value was too large to keep (payload.omitted)");
        return Ok(());
    }
    let Some(source) = get.get("source.topic") else {
        skip("no source.topic header");
        return Ok(());
    };
    if !cfg.input_topics.contains(source) {
        // a header cannot send records to any topic it names
        skip("source.topic is not an input topic of this config");
        return Ok(());
    }
    // the input partition it came from, when the topic still has it (else
    // the key's partition)
    let count = partitions_of.get(source).copied().unwrap_or(0);
    let partition = get
        .get("source.partition")
        .and_then(|p| p.parse::<i32>().ok())
        .filter(|p| (0..count).contains(p));
    let mut headers = OwnedHeaders::new();
    if let Some(h) = m.headers() {
        for x in h.iter().filter(|x| !worker_header(x.key)) {
            headers = headers.insert(Header {
                key: x.key,
                value: x.value,
            });
        }
    }
    *out.sent.entry(source.clone()).or_insert(0) += 1;
    *out.by_stage.entry(stage).or_insert(0) += 1;
    if opts.dry_run {
        return Ok(());
    }
    send(
        producer,
        source,
        partition,
        m.key(),
        m.payload().unwrap_or(&[]),
        Some(headers),
    )
}

impl std::fmt::Display for Replayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: u64 = self.sent.values().sum();
        writeln!(
            f,
            "replay-dlq: {} dead letters read, {} {}",
            self.read,
            total,
            if self.dry_run {
                "would be sent back (dry run: nothing sent, nothing committed)"
            } else {
                "sent back"
            }
        )?;
        for (t, n) in &self.sent {
            writeln!(f, "  to {t}: {n}")?;
        }
        for (s, n) in &self.by_stage {
            writeln!(f, "  refused at {s}: {n}")?;
        }
        for (why, n) in &self.skipped {
            writeln!(f, "  skipped, {why}: {n}")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Produced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "produce: {} events to {} ({}) in {:.1} s ({:.0} events/s)",
            self.events, self.topic, self.format, self.seconds, self.events_per_s
        )?;
        for (m, n) in &self.per_model {
            writeln!(f, "  {m}: {n}")?;
        }
        Ok(())
    }
}

/// Checks that a path-like `--samples` folder exists (a clear error early).
pub fn check_samples(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!("--samples {}: not a folder", dir.display());
    }
    Ok(())
}

/// Counts replayed records the broker did not take.
#[derive(Default)]
struct Deliveries {
    failed: std::sync::atomic::AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
    client: OpsContext,
}

impl rdkafka::ClientContext for Deliveries {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.client.log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.client.error(error, reason);
    }
}

impl rdkafka::producer::ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Ok(mut f) = self.first_error.lock() {
                f.get_or_insert_with(|| e.to_string());
            }
        }
    }
}
