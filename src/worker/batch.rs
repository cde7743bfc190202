//! From Kafka records to micro-batches: decode, route by model name,
//! validate features, and gather rows per model.
//!
//! Batches are cut from the input stream in order. A [`Chunk`] holds
//! consecutive records of the partitions of one inference shard and, per
//! model, one row matrix. A chunk closes as soon as a model's rows reach
//! that model's `max_batch_size` (so no inference call is larger), or when
//! its oldest row has waited that model's `max_wait`. Records that cannot be served stay in the chunk as dead
//! letters, in their place, so outputs and commits keep input order.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::message::OwnedHeaders;

use crate::config::MissingPolicy;
use crate::events::{Codec, DecodeError, FeatureEvent, FeatureScan, OutputRoute};
use crate::model::ServedModel;
use crate::registry::{Readiness, Registry};
use crate::signal::SignalRule;
use crate::worker::config::{BatchLimits, WorkerConfig};
use crate::worker::fetch::Incoming;
use crate::worker::metrics::Metrics;
use crate::worker::offsets::Slot;
use crate::worker::schema_registry::{LookupError, SchemaRegistry};

/// Where an event was refused (the `error.stage` header of a dead letter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Not a feature event in the topic's wire format.
    Decode,
    /// The model it names is not registered or cannot be served.
    Route,
    /// A feature is missing or NaN where the model forbids it.
    Validate,
    /// The model failed or returned a non-finite value.
    Inference,
    /// An output could not be published.
    Publish,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Decode,
        Stage::Route,
        Stage::Validate,
        Stage::Inference,
        Stage::Publish,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Route => "route",
            Stage::Validate => "validate",
            Stage::Inference => "inference",
            Stage::Publish => "publish",
        }
    }
}

/// How events for one model name are served.
///
/// A route is made on the consume thread and never waits for a load: for
/// a model that is loaded (or settled on its fallback) it is complete at
/// once; for a lazy model not loaded yet, its load is started in the
/// background and the route is resolved by the inference thread that gets
/// its first batch ([`Route::serving`]), within the load deadline.
pub struct Route {
    /// The model this route's rows go to: the name events ask for, or a
    /// canary's or shadow's model.
    pub name: String,
    /// The name the events asked for (the outputs' `model`).
    pub asked: String,
    /// What its outputs are: the model's own, its canary's, its shadow's.
    pub role: OutputRoute,
    /// A share of symbols served by another model instead (its route, and
    /// the share in hundredths of a percent).
    canary: Option<(Arc<Route>, u32)>,
    /// Another model scoring the same rows for the shadow topic.
    pub shadow: Option<Arc<Route>>,
    /// The rows' columns: the serving model's features (the asked-for
    /// model's while it loads).
    features: Vec<String>,
    /// feature name -> column
    index: HashMap<String, usize>,
    pub missing: MissingPolicy,
    pub limits: BatchLimits,
    serving: OnceLock<Result<Arc<Serving>, String>>,
    /// The registry answers for it without waiting (seen once, kept).
    settled: std::sync::atomic::AtomicBool,
    /// The registry it was made from: a batch cut for it is served by that
    /// registry's models even after a reload swapped in another.
    registry: Arc<Registry>,
}

/// The model that serves a route, once known.
pub struct Serving {
    pub model: Arc<ServedModel>,
    /// A fallback model serves the route's name.
    pub fallback: bool,
    /// The serving model's signal rule.
    pub signal: Option<SignalRule>,
    pub inference_timeout: Duration,
    /// For each of the serving model's features, its column in the route's
    /// rows (`None`: absent, NaN); `None` when the layouts are the same (a
    /// lazy model's fallback may list other features).
    remap: Option<Vec<Option<usize>>>,
    /// The serving model's missing-value policy.
    missing: MissingPolicy,
    /// Rows come from a route that did not apply that policy already (a
    /// lazy model's route is made before its policy is known, a fallback
    /// has its own): [`Serving::rows`] applies it.
    check_missing: bool,
}

impl Serving {
    /// Asks the registry who serves `name` (waiting for a load that runs,
    /// at most until its deadline), for rows laid out as `columns` (`None`:
    /// as the serving model lists its features).
    fn resolve(
        name: &str,
        columns: Option<&[String]>,
        route_missing: Option<MissingPolicy>,
        registry: &Registry,
    ) -> Result<Arc<Serving>, String> {
        let served = registry.get(name).map_err(|e| e.to_string())?;
        let info = served.model.info();
        let spec = registry
            .spec(&info.name)
            .ok_or_else(|| format!("model '{}' has no registry entry", info.name))?;
        if info.n_outputs != 1 {
            return Err(format!(
                "model '{}' returns {} values per row; a PredictionEvent carries one",
                info.name, info.n_outputs
            ));
        }
        let remap = columns.filter(|c| info.features != *c).map(|columns| {
            info.features
                .iter()
                .map(|f| columns.iter().position(|c| c == f))
                .collect()
        });
        Ok(Arc::new(Serving {
            fallback: served.fallback_for.is_some(),
            signal: spec.signal.clone(),
            inference_timeout: spec.limits.inference_timeout,
            // `None`: the route takes this policy itself
            check_missing: info.missing == MissingPolicy::Reject
                && (remap.is_some() || route_missing == Some(MissingPolicy::Nan)),
            remap,
            missing: info.missing,
            model: served.model,
        }))
    }

    /// The serving model's rows from a route's rows: `rows` itself when the
    /// layouts agree, else the remapped rows and, per row, why it cannot be
    /// served (a feature the serving model rejects as missing).
    pub fn rows(&self, rows: Vec<f64>, n_rows: usize) -> (Vec<f64>, Vec<(u32, String)>) {
        let mut out = match &self.remap {
            None if !self.check_missing => return (rows, Vec::new()),
            None => rows,
            Some(map) => {
                let nf_in = rows.len().checked_div(n_rows).unwrap_or(0);
                let mut out = Vec::with_capacity(n_rows * map.len());
                for row in rows.chunks_exact(nf_in.max(1)).take(n_rows) {
                    out.extend(map.iter().map(|c| c.map_or(f64::NAN, |c| row[c])));
                }
                out
            }
        };
        let mut bad = Vec::new();
        if self.check_missing {
            let nf = self.model.info().features.len().max(1);
            for (r, row) in out.chunks_exact_mut(nf).enumerate() {
                if let Some(why) = self.model.missing_problem(row) {
                    let why = if self.fallback {
                        format!("{why} (serving as fallback)")
                    } else {
                        why
                    };
                    bad.push((r as u32, why));
                    // the batch goes on without it
                    row.fill(0.0);
                }
            }
        }
        (out, bad)
    }
}

/// Where a symbol falls in a model's canary split: 0..10,000, from a hash
/// of the model's name and the symbol (FNV-1a, 64 bits, then the
/// SplitMix64 finaliser), so it is the same on every replica and across
/// restarts. The symbol goes to the canary when this is below the share
/// in hundredths of a percent (`percent` × 100).
pub fn canary_bucket(model: &str, symbol: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in model.as_bytes().iter().chain([0u8].iter()).chain(symbol) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h % 10_000) as u32
}

impl Route {
    /// The route of a registered name: its model (or fallback), with its
    /// canary and shadow routes when it has them.
    fn new(name: &str, registry: &Arc<Registry>, cfg: &WorkerConfig) -> Result<Route, String> {
        let mut route = Self::serving_as(name, name, OutputRoute::Primary, registry, cfg)?;
        let spec = registry
            .spec(name)
            .ok_or_else(|| format!("unknown model '{name}'"))?;
        if let Some(c) = &spec.canary {
            let r = Self::serving_as(&c.model, name, OutputRoute::Canary, registry, cfg)
                .map_err(|e| format!("canary of '{name}': {e}"))?;
            route.canary = Some((Arc::new(r), (c.percent * 100.0).round() as u32));
        }
        if let Some(s) = &spec.shadow {
            let r = Self::serving_as(s, name, OutputRoute::Shadow, registry, cfg)
                .map_err(|e| format!("shadow of '{name}': {e}"))?;
            route.shadow = Some(Arc::new(r));
        }
        // settled only when every model it may need is
        let others = route.canary.iter().map(|c| &c.0).chain(&route.shadow);
        if !others.into_iter().all(|r| r.settled()) {
            route
                .settled
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(route)
    }

    /// The route to model `name` for events that asked for `asked`.
    fn serving_as(
        name: &str,
        asked: &str,
        role: OutputRoute,
        registry: &Arc<Registry>,
        cfg: &WorkerConfig,
    ) -> Result<Route, String> {
        let spec = registry
            .spec(name)
            .ok_or_else(|| format!("unknown model '{name}'"))?;
        let make = |features: &[String], missing| Route {
            name: name.to_string(),
            asked: asked.to_string(),
            role,
            canary: None,
            shadow: None,
            features: features.to_vec(),
            index: features
                .iter()
                .enumerate()
                .map(|(i, f)| (f.clone(), i))
                .collect(),
            missing,
            limits: cfg.limits_for(name),
            serving: OnceLock::new(),
            settled: std::sync::atomic::AtomicBool::new(false),
            registry: registry.clone(),
        };
        match registry.readiness(name) {
            Readiness::Settled => {
                let serving = Serving::resolve(name, None, None, registry)?;
                let route = make(&serving.model.info().features, serving.missing);
                let _ = route.serving.set(Ok(serving));
                route
                    .settled
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(route)
            }
            Readiness::Pending => {
                registry.start_loading(name);
                // which model serves is known once it loads: the rows carry
                // the columns of every model that may (the model's, then
                // its fallbacks' own), so a fallback's rows are the event
                // as received
                let mut columns = spec.features.clone();
                let mut have: std::collections::HashSet<&str> =
                    spec.features.iter().map(String::as_str).collect();
                let mut at = spec.fallback.as_deref();
                for _ in 0..registry.names().len() {
                    let Some(fb) = at.and_then(|f| registry.spec(f)) else {
                        break;
                    };
                    for f in &fb.features {
                        if have.insert(f) {
                            columns.push(f.clone());
                        }
                    }
                    at = fb.fallback.as_deref();
                }
                // and absent features are NaN until then: the serving
                // model's policy is applied to its rows ([`Serving::rows`])
                let missing = match spec.missing {
                    Some(m) if columns.len() == spec.features.len() => m,
                    _ => MissingPolicy::Nan,
                };
                Ok(make(&columns, missing))
            }
        }
    }

    /// Whether the registry can answer for this route without waiting for
    /// a load (the consume thread holds a partition's records back until
    /// then, see [`Batcher`]).
    pub fn settled(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.settled.load(Ordering::Relaxed) {
            return true;
        }
        let others = self.canary.iter().map(|c| &c.0).chain(&self.shadow);
        let now = matches!(self.registry.readiness(&self.name), Readiness::Settled)
            && others.into_iter().all(|r| r.settled());
        if now {
            self.settled.store(true, Ordering::Relaxed);
        }
        now
    }

    /// Who serves this route, resolved once (this may wait for a lazy
    /// load, at most until its deadline: call it off the consume thread).
    pub fn serving(&self) -> Result<Arc<Serving>, String> {
        self.serving
            .get_or_init(|| {
                Serving::resolve(
                    &self.name,
                    Some(&self.features),
                    Some(self.missing),
                    &self.registry,
                )
            })
            .clone()
    }

    /// Starts loading every model this route may need.
    fn start_loading(&self) {
        self.registry.start_loading(&self.name);
        for r in self.canary.iter().map(|c| &c.0).chain(&self.shadow) {
            r.start_loading();
        }
    }

    /// The route that serves `symbol`: the canary's for its share of
    /// symbols, else this one.
    fn for_symbol(self: &Arc<Self>, symbol: &[u8]) -> Arc<Route> {
        match &self.canary {
            Some((canary, share)) if canary_bucket(&self.asked, symbol) < *share => canary.clone(),
            _ => self.clone(),
        }
    }

    /// Whether this route was made from `registry`.
    fn of(&self, registry: &Arc<Registry>) -> bool {
        Arc::ptr_eq(&self.registry, registry)
    }

    pub fn n_features(&self) -> usize {
        self.index.len()
    }

    /// Writes the event's features into `row` in model order; absent
    /// features are NaN. Under `reject`, names the first absent or NaN one.
    fn fill<'a, I>(&self, features: I, row: &mut [f64]) -> Result<(), String>
    where
        I: Iterator<Item = (&'a [u8], f64)> + Clone,
    {
        row.fill(f64::NAN);
        let names = &self.features;
        let column = |k: &[u8]| {
            std::str::from_utf8(k)
                .ok()
                .and_then(|k| self.index.get(k))
                .copied()
        };
        let twice = |i: usize| {
            format!(
                "feature '{}' appears twice in the event; which value was meant is unknowable",
                crate::text::escape(&names[i])
            )
        };
        // fast path: the event lists the model's features in model order
        let mut it = features.clone();
        let mut in_order = true;
        for (slot, name) in row.iter_mut().zip(names) {
            match it.next() {
                Some((k, v)) if k == name.as_bytes() => *slot = v,
                _ => {
                    in_order = false;
                    break;
                }
            }
        }
        if in_order {
            // anything after them must not name one of them again
            if let Some(i) = it.find_map(|(k, _)| column(k)) {
                return Err(twice(i));
            }
        } else {
            row.fill(f64::NAN);
            let mut seen = vec![false; row.len()];
            for (k, v) in features.clone() {
                if let Some(i) = column(k) {
                    if std::mem::replace(&mut seen[i], true) {
                        return Err(twice(i));
                    }
                    row[i] = v;
                }
            }
        }
        if self.missing == MissingPolicy::Reject {
            if let Some(i) = row.iter().position(|v| v.is_nan()) {
                let present = features.clone().any(|(k, _)| k == names[i].as_bytes());
                let what = if present { "NaN" } else { "missing" };
                return Err(crate::model::missing_reason(&names[i], what, &self.name));
            }
        }
        Ok(())
    }
}

/// What became of one input record.
pub enum Kind {
    /// Row `row` of group `group`.
    Event {
        group: u32,
        row: u32,
        /// in the chunk's arena
        event_id: Range<usize>,
        symbol: Range<usize>,
        event_time: i64,
        /// The shadow's group and row, when the route has a shadow.
        shadow: Option<(u32, u32)>,
    },
    /// Refused: goes to the dead-letter topic.
    Dead { stage: Stage, reason: String },
}

/// One input record, in input order.
pub struct Record {
    pub slot: Slot,
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Input record timestamp (ms), when it has one.
    pub timestamp: Option<i64>,
    /// Value and key, in the chunk's arena.
    pub payload: Range<usize>,
    pub key: Option<Range<usize>>,
    pub headers: Option<OwnedHeaders>,
    pub kind: Kind,
    /// The value was too large to keep (`input.max_record_bytes`): it is
    /// not in the arena, and its dead letter says where to read it.
    pub omitted: bool,
}

/// The rows of one model within a chunk.
pub struct Group {
    pub route: Arc<Route>,
    pub rows: Vec<f64>,
    pub n_rows: usize,
    first: Instant,
}

/// Consecutive records of one shard, ready for inference.
pub struct Chunk {
    pub arena: Vec<u8>,
    pub records: Vec<Record>,
    pub groups: Vec<Group>,
    /// Closes at this instant even if no group is full.
    deadline: Option<Instant>,
    full: bool,
}

impl Chunk {
    /// Empties a processed chunk for reuse (its buffers keep their capacity).
    pub fn recycle(&mut self) {
        self.arena.clear();
        self.records.clear();
        self.groups.clear();
        self.deadline = None;
        self.full = false;
    }

    fn new() -> Chunk {
        Chunk {
            arena: Vec::new(),
            records: Vec::new(),
            groups: Vec::new(),
            deadline: None,
            full: false,
        }
    }

    pub fn bytes(&self, r: &Range<usize>) -> &[u8] {
        &self.arena[r.clone()]
    }

    /// A string kept in the arena (event id, symbol).
    pub fn str(&self, r: &Range<usize>) -> &str {
        FeatureScan::str(&self.arena, r)
    }

    fn push_bytes(&mut self, b: &[u8]) -> Range<usize> {
        let start = self.arena.len();
        self.arena.extend_from_slice(b);
        start..self.arena.len()
    }
}

/// Processed chunks come back here so their buffers are reused.
pub type ChunkPool = Arc<std::sync::Mutex<Vec<Chunk>>>;

/// Per-batch tallies, merged into [`Metrics`] when a chunk is cut. Model
/// labels are registered names only ("" otherwise), so untrusted events
/// cannot grow the metric's label set.
#[derive(Default)]
struct Tally {
    /// (topic, model) -> events; a handful of entries, searched linearly
    events_in: Vec<(Arc<str>, String, u64)>,
}

impl Tally {
    fn count(&mut self, topic: &Arc<str>, model: &str) {
        match self
            .events_in
            .iter_mut()
            .find(|(t, m, _)| Arc::ptr_eq(t, topic) && m == model)
        {
            Some(e) => e.2 += 1,
            None => self.events_in.push((topic.clone(), model.to_string(), 1)),
        }
    }
}

/// How long a schema id the registry could not give is answered from memory.
const MISS_RETRY: std::time::Duration = std::time::Duration::from_secs(30);
/// Most such ids remembered (a stream of random ids must not grow memory).
const MISS_CACHE_CAP: usize = 1024;

/// Schema ids the registry could not give, with the reason, each answered
/// from memory until `retry` has passed; at most `cap` are kept (expired
/// ones, then the oldest, are forgotten first).
struct MissCache {
    entries: HashMap<u32, (Instant, String)>,
    cap: usize,
    retry: std::time::Duration,
}

impl MissCache {
    fn new(cap: usize, retry: std::time::Duration) -> Self {
        MissCache {
            entries: HashMap::new(),
            cap: cap.max(1),
            retry,
        }
    }

    /// The remembered reason, if `id` failed less than `retry` before `now`.
    fn get(&self, id: u32, now: Instant) -> Option<&str> {
        self.entries
            .get(&id)
            .filter(|(at, _)| now.saturating_duration_since(*at) < self.retry)
            .map(|(_, why)| why.as_str())
    }

    fn insert(&mut self, id: u32, why: String, now: Instant) {
        if self.entries.len() >= self.cap && !self.entries.contains_key(&id) {
            let retry = self.retry;
            self.entries
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < retry);
            if self.entries.len() >= self.cap {
                if let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| *k)
                {
                    self.entries.remove(&oldest);
                }
            }
        }
        self.entries.insert(id, (now, why));
    }
}

/// What a held-back partition waits for.
enum Wait {
    /// The writer schema with this id, being fetched.
    Schema(u32),
    /// This route's model, being loaded.
    Model(Arc<Route>),
}

/// A partition whose reading stopped at a record that cannot be decided
/// yet: its schema is being fetched or its model loaded. Its later records
/// are dropped unread (the consumer is paused there and sought back to
/// `offset`), and it is read again from `offset` once the wait is over.
/// Other partitions go on meanwhile.
struct Parked {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    wait: Wait,
}

/// A partition to pause and seek back, or to resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub topic: Arc<str>,
    pub partition: i32,
    /// Where reading starts again.
    pub offset: i64,
}

/// Schema lookups that may run at once.
const SCHEMA_LOOKUP_THREADS: usize = 4;

/// Writer-schema lookups on threads of their own: the consume thread asks
/// and goes on; the answer is picked up when the waiting partition is read
/// again. Each lookup is bounded by the registry client's timeout.
struct SchemaLookups {
    ask: std::sync::mpsc::Sender<u32>,
    answers: Arc<std::sync::Mutex<HashMap<u32, Result<String, LookupError>>>>,
    /// Asked and not answered yet.
    asked: std::collections::HashSet<u32>,
    /// Ids the registry could not answer (down, timed out, 5xx): since
    /// when, and when to ask again. Their records wait, up to
    /// [`UNAVAILABLE_WAIT`].
    unavailable: HashMap<u32, (Instant, Instant)>,
}

/// How long a record waits for a registry that does not answer before it
/// goes to the dead-letter topic.
const UNAVAILABLE_WAIT: Duration = Duration::from_secs(30);
/// How often a registry that did not answer is asked again for an id.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);
/// Most ids waiting on an unavailable registry at once (more are
/// dead-lettered at once: a flood of random ids must not grow memory).
const UNAVAILABLE_CAP: usize = 1024;

impl SchemaLookups {
    fn start(sr: Arc<SchemaRegistry>) -> std::io::Result<SchemaLookups> {
        let (ask, questions) = std::sync::mpsc::channel::<u32>();
        let questions = Arc::new(std::sync::Mutex::new(questions));
        let answers: Arc<std::sync::Mutex<HashMap<u32, _>>> = Arc::default();
        // a few at once, so one slow id does not queue the others; they end
        // when the Batcher (the sender) is dropped
        for i in 0..SCHEMA_LOOKUP_THREADS {
            let (sr, questions, out) = (sr.clone(), questions.clone(), answers.clone());
            std::thread::Builder::new()
                .name(format!("schema-lookup-{i}"))
                .spawn(move || loop {
                    let next = questions.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(id) = next else { return };
                    let answer = sr.schema(id);
                    out.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id, answer);
                })?;
        }
        Ok(SchemaLookups {
            ask,
            answers,
            asked: Default::default(),
            unavailable: HashMap::new(),
        })
    }

    /// The answer for `id`, if it came (taken: asked again next time).
    fn take(&mut self, id: u32) -> Option<Result<String, LookupError>> {
        let a = self
            .answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)?;
        self.asked.remove(&id);
        Some(a)
    }

    fn answered(&self, id: u32) -> bool {
        self.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
    }

    /// Whether a record waiting for `id` may be read again: its answer
    /// came, or it is time to ask again after the registry did not answer.
    fn ready(&self, id: u32, now: Instant) -> bool {
        if self.answered(id) {
            return true;
        }
        match self.unavailable.get(&id) {
            Some(&(_, again)) => now >= again,
            None => !self.asked.contains(&id),
        }
    }

    /// Asks for `id` unless it is being asked already.
    fn ask(&mut self, id: u32) {
        if self.asked.insert(id) && self.ask.send(id).is_err() {
            self.asked.remove(&id);
        }
    }
}

/// A record not decoded: refused (why), or to be decided later.
enum Undecided {
    Refused(String),
    Wait(Wait),
}

/// Builds chunks for `shards` inference threads.
///
/// The consume thread never waits here on the network or on a model load:
/// a record whose writer schema is not known yet, or whose model is still
/// loading, parks its partition ([`Batcher::take_holds`]) while the lookup
/// or load goes on elsewhere; the run loop pauses the partition and seeks
/// it back to that record, and resumes it when [`Batcher::take_resumable`]
/// says the wait is over (bounded by the registry timeout and the load
/// deadline).
pub struct Batcher {
    codec: Codec,
    /// Fetches writer schemas of `avro` input by id.
    lookups: Option<SchemaLookups>,
    /// Partitions held back, by slot.
    parked: HashMap<Slot, Parked>,
    /// Newly parked partitions, for the run loop to pause and seek.
    holds: Vec<Hold>,
    /// Schema ids the registry could not give.
    unknown_ids: MissCache,
    registry: Arc<Registry>,
    cfg: Arc<WorkerConfig>,
    routes: HashMap<String, Result<Arc<Route>, String>>,
    topics: HashMap<String, Arc<str>>,
    open: Vec<Option<Chunk>>,
    /// Chunks closed because a group reached its `max_batch_size` (or the
    /// chunk its record bound), in the order they closed: the next
    /// [`Batcher::take`] hands them out first.
    ready: Vec<Chunk>,
    tally: Tally,
    metrics: Arc<Metrics>,
    /// Records held in open chunks.
    held: usize,
    /// Reused by every scan.
    scan: FeatureScan,
    /// The last route used (most streams repeat a few models).
    last_route: Option<Arc<Route>>,
    last_topic: Option<Arc<str>>,
    pool: ChunkPool,
}

impl Batcher {
    pub fn new(
        codec: Codec,
        schema_registry: Option<SchemaRegistry>,
        registry: Arc<Registry>,
        cfg: Arc<WorkerConfig>,
        shards: usize,
        metrics: Arc<Metrics>,
        pool: ChunkPool,
    ) -> std::io::Result<Batcher> {
        let lookups = schema_registry
            .map(|sr| SchemaLookups::start(Arc::new(sr)))
            .transpose()?;
        Ok(Batcher {
            codec,
            lookups,
            parked: HashMap::new(),
            holds: Vec::new(),
            unknown_ids: MissCache::new(MISS_CACHE_CAP, MISS_RETRY),
            registry,
            cfg,
            routes: HashMap::new(),
            topics: HashMap::new(),
            open: (0..shards.max(1)).map(|_| None).collect(),
            ready: Vec::new(),
            tally: Tally::default(),
            metrics,
            held: 0,
            scan: FeatureScan::default(),
            last_route: None,
            last_topic: None,
            pool,
        })
    }

    /// Partitions parked since the last call: pause each and seek it back
    /// to `offset`.
    pub fn take_holds(&mut self) -> Vec<Hold> {
        std::mem::take(&mut self.holds)
    }

    /// Whether any partition is parked.
    pub fn parking(&self) -> bool {
        !self.parked.is_empty()
    }

    /// Whether this partition is held back (it stays paused through
    /// back-pressure resumes).
    pub fn is_parked(&self, slot: Slot) -> bool {
        self.parked.contains_key(&slot)
    }

    /// Parked partitions whose wait is over: resume each (it is read
    /// again from its parked record).
    pub fn take_resumable(&mut self) -> Vec<Hold> {
        let now = Instant::now();
        let mut out = Vec::new();
        let (registry, codec, lookups) = (&self.registry, &self.codec, &self.lookups);
        self.parked.retain(|_, p| {
            let over = match &p.wait {
                Wait::Schema(id) => {
                    codec.knows_feature_writer(*id)
                        || lookups.as_ref().is_none_or(|l| l.ready(*id, now))
                }
                // a reload replaced the registry: read again, routed anew
                Wait::Model(route) => !route.of(registry) || route.settled(),
            };
            if over {
                out.push(Hold {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    offset: p.offset,
                });
            }
            !over
        });
        out
    }

    /// Forgets a revoked partition's parking.
    pub fn unpark(&mut self, slot: Slot) {
        if let Some(p) = self.parked.remove(&slot) {
            self.holds
                .retain(|h| !(h.topic == p.topic && h.partition == p.partition));
        }
    }

    pub fn shards(&self) -> usize {
        self.open.len()
    }

    /// Records read but not yet handed to a shard.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Bytes of the held records' values and keys.
    pub fn held_bytes(&self) -> usize {
        self.open
            .iter()
            .flatten()
            .chain(&self.ready)
            .map(|c| c.arena.len())
            .sum()
    }

    fn route(&mut self, name: &str) -> Result<Arc<Route>, String> {
        if let Some(r) = &self.last_route {
            if r.name == name {
                return Ok(r.clone());
            }
        }
        let r = self.route_uncached(name);
        if let Ok(r) = &r {
            self.last_route = Some(r.clone());
        }
        r
    }

    fn route_uncached(&mut self, name: &str) -> Result<Arc<Route>, String> {
        if let Some(r) = self.routes.get(name) {
            return r.clone();
        }
        let r = Route::new(name, &self.registry, &self.cfg).map(Arc::new);
        // names come from untrusted events: only registered ones are cached
        // (and logged once); unknown names are counted in the dead-letter
        // metrics, not logged one by one
        if self.registry.spec(name).is_some() {
            if let Err(e) = &r {
                tracing::warn!(model = %name, reason = %e, "events for this model go to the dead-letter topic");
            }
            self.routes.insert(name.to_string(), r.clone());
        } else {
            tracing::debug!(model = %name, "event for an unregistered model");
        }
        r
    }

    /// Adds one record read from `slot` (dropped unread while its
    /// partition is parked: it is read again after the seek back).
    pub fn add(&mut self, msg: Incoming<'_>, slot: Slot, now: Instant) {
        // (no hashing per record unless a partition waits)
        if !self.parked.is_empty() && self.parked.contains_key(&slot) {
            return;
        }
        let topic = match &self.last_topic {
            Some(t) if **t == *msg.topic => t.clone(),
            _ => {
                let t = match self.topics.get(msg.topic) {
                    Some(t) => t.clone(),
                    None => {
                        let t: Arc<str> = Arc::from(msg.topic);
                        self.topics.insert(msg.topic.to_string(), t.clone());
                        t
                    }
                };
                self.last_topic = Some(t.clone());
                t
            }
        };
        let shard = slot as usize % self.open.len();
        let mut chunk = match self.open[shard].take() {
            Some(c) => c,
            None => self
                .pool
                .lock()
                .ok()
                .and_then(|mut p| p.pop())
                .unwrap_or_else(Chunk::new),
        };
        let size = msg.payload.map_or(0, <[u8]>::len) + msg.key.map_or(0, <[u8]>::len);
        let omitted = size > self.cfg.max_record_bytes;
        let mark = chunk.arena.len();
        // a record over the limit is not copied (a compressed batch can
        // hold a huge value); its dead letter points at it instead
        let payload = chunk.push_bytes(if omitted {
            &[]
        } else {
            msg.payload.unwrap_or(&[])
        });
        let key = msg.key.filter(|_| !omitted).map(|k| chunk.push_bytes(k));
        let kind = if omitted {
            self.tally.count(&topic, "");
            Kind::Dead {
                stage: Stage::Decode,
                reason: format!(
                    "record of {size} bytes is larger than input.max_record_bytes ({})",
                    self.cfg.max_record_bytes
                ),
            }
        } else if msg.payload.is_none() {
            self.tally.count(&topic, "");
            Kind::Dead {
                stage: Stage::Decode,
                reason: "record has no value (tombstone)".to_string(),
            }
        } else {
            match self.classify(&mut chunk, &topic, payload.clone(), now) {
                Ok(kind) => kind,
                Err(wait) => {
                    // not decided yet: the partition waits from this record
                    chunk.arena.truncate(mark);
                    self.open[shard] = Some(chunk);
                    let hold = Hold {
                        topic: topic.clone(),
                        partition: msg.partition,
                        offset: msg.offset,
                    };
                    let what = match &wait {
                        Wait::Schema(id) => format!("writer schema {id}"),
                        Wait::Model(r) => format!("model '{}' to load", r.name),
                    };
                    tracing::info!(topic = %hold.topic, partition = hold.partition, offset = hold.offset,
                        "partition waits for {what}; other partitions go on");
                    self.metrics.add(
                        "ml_worker_partition_waits_total",
                        &[(
                            "for",
                            match wait {
                                Wait::Schema(_) => "schema",
                                Wait::Model(_) => "model",
                            },
                        )],
                        1,
                    );
                    self.parked.insert(
                        slot,
                        Parked {
                            topic: hold.topic.clone(),
                            partition: hold.partition,
                            offset: hold.offset,
                            wait,
                        },
                    );
                    self.holds.push(hold);
                    return;
                }
            }
        };
        chunk.records.push(Record {
            slot,
            topic,
            partition: msg.partition,
            offset: msg.offset,
            timestamp: msg.timestamp,
            payload,
            key,
            headers: msg.headers,
            kind,
            omitted,
        });
        self.held += 1;
        if chunk.records.len() >= self.cfg.batching.max_batch_size.max(1) * 4 {
            chunk.full = true; // mostly dead letters: bound the chunk anyway
        }
        if chunk.deadline.is_none() {
            chunk.deadline = Some(now + self.cfg.batching.max_wait);
        }
        // a full chunk closes now, not at the end of the burst: the shard's
        // next record starts a new one, so no batch passes its limit
        if chunk.full {
            self.ready.push(chunk);
        } else {
            self.open[shard] = Some(chunk);
        }
    }

    /// Decodes, routes and validates the value at `payload` in the arena,
    /// placing its row in its model's group; or says what the record must
    /// wait for (nothing of it is counted or kept then).
    fn classify(
        &mut self,
        chunk: &mut Chunk,
        topic: &Arc<str>,
        payload: Range<usize>,
        now: Instant,
    ) -> Result<Kind, Wait> {
        let mut scan = std::mem::take(&mut self.scan);
        let kind = match self.codec.scan_feature(chunk.bytes(&payload), &mut scan) {
            Some(Ok(())) => {
                // the allocation-free path: every string stays in the arena
                let at = |r: &Range<usize>| payload.start + r.start..payload.start + r.end;
                let model = FeatureScan::str(chunk.bytes(&payload), &scan.model);
                let route = self.route(model);
                if let Err(wait) = self.wait_for_load(&route) {
                    self.scan = scan;
                    return Err(wait);
                }
                let label = if self.registry.spec(model).is_some() {
                    model
                } else {
                    ""
                };
                self.tally.count(topic, label);
                match route {
                    Err(reason) => Kind::Dead {
                        stage: Stage::Route,
                        reason,
                    },
                    Ok(route) => {
                        let (event_id, symbol) = (at(&scan.event_id), at(&scan.symbol));
                        let event_time = scan.event_time;
                        let arena = std::mem::take(&mut chunk.arena);
                        let bytes = &arena[payload.clone()];
                        let features = scan.features.iter().map(|(r, v)| (&bytes[r.clone()], *v));
                        let (kind, skipped) = place_routed(
                            chunk,
                            route,
                            &arena[symbol.clone()],
                            features,
                            now,
                            event_id,
                            symbol,
                            event_time,
                        );
                        chunk.arena = arena;
                        self.shadow_skipped(skipped);
                        kind
                    }
                }
            }
            Some(Err(e)) => {
                self.tally.count(topic, "");
                Kind::Dead {
                    stage: Stage::Decode,
                    reason: e.to_string(),
                }
            }
            None => {
                let bytes = chunk.bytes(&payload).to_vec();
                match self.decode(&bytes) {
                    Err(Undecided::Wait(wait)) => {
                        self.scan = scan;
                        return Err(wait);
                    }
                    Err(Undecided::Refused(reason)) => {
                        self.tally.count(topic, "");
                        Kind::Dead {
                            stage: Stage::Decode,
                            reason,
                        }
                    }
                    Ok(e) => {
                        let route = self.route(&e.model);
                        if let Err(wait) = self.wait_for_load(&route) {
                            self.scan = scan;
                            return Err(wait);
                        }
                        let label = if self.registry.spec(&e.model).is_some() {
                            e.model.as_str()
                        } else {
                            ""
                        };
                        self.tally.count(topic, label);
                        match route {
                            Err(reason) => Kind::Dead {
                                stage: Stage::Route,
                                reason,
                            },
                            Ok(route) => {
                                let event_id = chunk.push_bytes(e.event_id.as_bytes());
                                let symbol = chunk.push_bytes(e.symbol.as_bytes());
                                let features = e.features.iter().map(|(k, v)| (k.as_bytes(), *v));
                                let (kind, skipped) = place_routed(
                                    chunk,
                                    route,
                                    e.symbol.as_bytes(),
                                    features,
                                    now,
                                    event_id,
                                    symbol,
                                    e.event_time,
                                );
                                self.shadow_skipped(skipped);
                                kind
                            }
                        }
                    }
                }
            }
        };
        self.scan = scan;
        Ok(kind)
    }

    /// Counts (and logs at debug) a row a shadow could not take.
    fn shadow_skipped(&self, why: Option<String>) {
        if let Some(why) = why {
            tracing::debug!(reason = %why, "shadow skipped this event");
            self.metrics.add(
                "ml_worker_shadow_failures_total",
                &[("stage", "validate")],
                1,
            );
        }
    }

    /// Whether a routed record must wait for its model's load (which is
    /// started, if it was not).
    fn wait_for_load(&self, route: &Result<Arc<Route>, String>) -> Result<(), Wait> {
        match route {
            Ok(r) if !r.settled() => {
                r.start_loading();
                Err(Wait::Model(r.clone()))
            }
            _ => Ok(()),
        }
    }

    /// Decodes a feature event; an `avro` record with a schema id not seen
    /// before waits while its writer schema is fetched from the schema
    /// registry (by [`SchemaLookups`], off this thread).
    fn decode(&mut self, bytes: &[u8]) -> Result<FeatureEvent, Undecided> {
        match self.codec.decode_feature(bytes) {
            Err(DecodeError::UnknownSchemaId(id)) if self.lookups.is_some() => {
                // asked again at most every MISS_RETRY
                if let Some(why) = self.unknown_ids.get(id, Instant::now()) {
                    return Err(Undecided::Refused(why.to_string()));
                }
                let lookups = self.lookups.as_mut().expect("checked");
                let now = Instant::now();
                if lookups.unavailable.get(&id).is_some_and(|u| now < u.1) {
                    return Err(Undecided::Wait(Wait::Schema(id)));
                }
                let Some(answer) = lookups.take(id) else {
                    lookups.ask(id);
                    return Err(Undecided::Wait(Wait::Schema(id)));
                };
                // no answer from the registry: the record waits and the id
                // is asked again, up to UNAVAILABLE_WAIT
                let since = match &answer {
                    Err(LookupError::Unavailable(_)) => {
                        let since = lookups.unavailable.get(&id).map_or(now, |u| u.0);
                        let room = lookups.unavailable.len() < UNAVAILABLE_CAP
                            || lookups.unavailable.contains_key(&id);
                        if now.duration_since(since) < UNAVAILABLE_WAIT && room {
                            lookups
                                .unavailable
                                .insert(id, (since, now + UNAVAILABLE_RETRY));
                            return Err(Undecided::Wait(Wait::Schema(id)));
                        }
                        Some(since)
                    }
                    _ => None,
                };
                lookups.unavailable.remove(&id);
                let fetched = answer.and_then(|schema| {
                    self.codec
                        .register_feature_writer(id, &schema)
                        .map_err(|e| LookupError::Refused(e.to_string()))
                });
                match fetched {
                    Ok(()) => {
                        tracing::info!(schema_id = id, "feature event writer schema fetched");
                        self.codec
                            .decode_feature(bytes)
                            .map_err(|e| Undecided::Refused(e.to_string()))
                    }
                    Err(e) => {
                        let waited = since.map_or(String::new(), |t| {
                            format!(" (waited {} s)", now.duration_since(t).as_secs())
                        });
                        let why = format!("schema id {id}: {e}{waited}");
                        tracing::warn!(reason = %why, "undecodable schema id");
                        // an answer is remembered for the id; an outage is
                        // remembered by the client, for every id
                        if matches!(e, LookupError::Refused(_)) {
                            self.unknown_ids.insert(id, why.clone(), Instant::now());
                        }
                        Err(Undecided::Refused(why))
                    }
                }
            }
            r => r.map_err(|e| Undecided::Refused(e.to_string())),
        }
    }

    /// The earliest instant an open chunk must close (now, when a closed
    /// one waits).
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.ready.is_empty() {
            return Some(Instant::now());
        }
        self.open.iter().flatten().filter_map(|c| c.deadline).min()
    }

    /// Chunks that are full or past their deadline (all, with `all`), each
    /// shard's in input order.
    /// Serves the records read from now on with `registry` (a reload):
    /// every open chunk closes first, so what was read before is handed out
    /// (by the next [`Batcher::take`]) ahead of anything routed anew, and
    /// is served by the models it was routed to.
    pub fn swap_registry(&mut self, registry: Arc<Registry>) {
        for slot in &mut self.open {
            if let Some(c) = slot.take() {
                self.ready.push(c);
            }
        }
        self.registry = registry;
        self.routes.clear();
        self.last_route = None;
    }

    pub fn take(&mut self, now: Instant, all: bool) -> Vec<Chunk> {
        let mut out = std::mem::take(&mut self.ready);
        for c in &out {
            self.held -= c.records.len();
        }
        for slot in &mut self.open {
            let due = slot
                .as_ref()
                .is_some_and(|c| all || c.full || c.deadline.is_some_and(|d| d <= now));
            if due {
                let c = slot.take().expect("checked");
                self.held -= c.records.len();
                out.push(c);
            }
        }
        if !out.is_empty() {
            for (topic, model, n) in self.tally.events_in.drain(..) {
                self.metrics.add(
                    "ml_worker_events_in_total",
                    &[("topic", &topic), ("model", &model)],
                    n,
                );
            }
        }
        out
    }
}

/// Latest `event_time` accepted: 9999-12-31T23:59:59.999Z, in ms.
const MAX_EVENT_TIME_MS: i64 = 253_402_300_799_999;

/// Puts a decoded event's row into its model's group.
fn place<'a>(
    chunk: &mut Chunk,
    route: Arc<Route>,
    features: impl Iterator<Item = (&'a [u8], f64)> + Clone,
    now: Instant,
    event_id: Range<usize>,
    symbol: Range<usize>,
    event_time: i64,
) -> Kind {
    // downstream readers turn it into a date (Avro timestamp-millis)
    if !(0..=MAX_EVENT_TIME_MS).contains(&event_time) {
        return Kind::Dead {
            stage: Stage::Validate,
            reason: format!(
                "event_time {event_time} is not a time between 1970-01-01 and 9999-12-31 (milliseconds since the epoch)"
            ),
        };
    }
    let gi = match chunk
        .groups
        .iter()
        .position(|g| Arc::ptr_eq(&g.route, &route))
    {
        Some(i) => i,
        None => {
            chunk.groups.push(Group {
                rows: Vec::with_capacity(route.n_features() * 64),
                route: route.clone(),
                n_rows: 0,
                first: now,
            });
            let wait = chunk.groups.last().expect("pushed").first + route.limits.max_wait;
            chunk.deadline = Some(chunk.deadline.map_or(wait, |d| d.min(wait)));
            chunk.groups.len() - 1
        }
    };
    let g = &mut chunk.groups[gi];
    let nf = route.n_features();
    let start = g.rows.len();
    g.rows.resize(start + nf, f64::NAN);
    if let Err(reason) = route.fill(features, &mut g.rows[start..]) {
        g.rows.truncate(start);
        return Kind::Dead {
            stage: Stage::Validate,
            reason,
        };
    }
    let row = g.n_rows as u32;
    g.n_rows += 1;
    if g.n_rows >= route.limits.max_batch_size.max(1) {
        chunk.full = true;
    }
    Kind::Event {
        group: gi as u32,
        row,
        event_id,
        symbol,
        event_time,
        shadow: None,
    }
}

/// Places an event's row in the route that serves its symbol (the
/// canary's for its share), and in the shadow's group too when the route
/// has one. Returns the record's kind and, when the shadow could not take
/// the row, why (the event is served all the same).
#[allow(clippy::too_many_arguments)]
fn place_routed<'a>(
    chunk: &mut Chunk,
    route: Arc<Route>,
    symbol_bytes: &[u8],
    features: impl Iterator<Item = (&'a [u8], f64)> + Clone,
    now: Instant,
    event_id: Range<usize>,
    symbol: Range<usize>,
    event_time: i64,
) -> (Kind, Option<String>) {
    let chosen = route.for_symbol(symbol_bytes);
    let mut kind = place(
        chunk,
        chosen,
        features.clone(),
        now,
        event_id.clone(),
        symbol.clone(),
        event_time,
    );
    let mut skipped = None;
    if let (Kind::Event { shadow, .. }, Some(sr)) = (&mut kind, &route.shadow) {
        match place(
            chunk,
            sr.clone(),
            features,
            now,
            event_id,
            symbol,
            event_time,
        ) {
            Kind::Event { group, row, .. } => *shadow = Some((group, row)),
            Kind::Dead { reason, .. } => skipped = Some(reason),
        }
    }
    (kind, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_canary_takes_its_share_of_10000_symbols_within_2_points_stably() {
        for percent in [1.0, 5.0, 10.0, 25.0, 50.0, 90.0] {
            for model in ["diabetes_lgbm", "m"] {
                let share = (percent * 100.0) as u32;
                let symbols: Vec<String> = (0..10_000).map(|i| format!("SYM{i}")).collect();
                let canary = symbols
                    .iter()
                    .filter(|s| canary_bucket(model, s.as_bytes()) < share)
                    .count();
                let got = canary as f64 / 100.0;
                assert!(
                    (got - percent).abs() <= 2.0,
                    "{model}: {percent}% asked, {got}% of symbols"
                );
            }
        }
        // a pure function of the model and the symbol: the same on every
        // replica and after a restart (values pinned: a change of the hash
        // would move symbols between models)
        assert_eq!(
            canary_bucket("diabetes_lgbm", b"AAPL"),
            canary_bucket("diabetes_lgbm", b"AAPL")
        );
        let pinned: Vec<u32> = ["AAPL", "MSFT", "SYM0"]
            .iter()
            .map(|s| canary_bucket("diabetes_lgbm", s.as_bytes()))
            .collect();
        assert_eq!(pinned, PINNED_BUCKETS.to_vec(), "{pinned:?}");
        // 0 and 100 percent: none and all
        assert!((0..1000).all(|i| canary_bucket("m", format!("{i}").as_bytes()) < 10_000));
    }

    /// `canary_bucket("diabetes_lgbm", …)` of AAPL, MSFT, SYM0.
    const PINNED_BUCKETS: [u32; 3] = [8517, 8002, 8852];

    #[test]
    fn schema_misses_expire_and_stay_bounded() {
        let t0 = Instant::now();
        let mut c = MissCache::new(3, Duration::from_secs(30));
        c.insert(1, "gone".into(), t0);
        assert_eq!(c.get(1, t0 + Duration::from_secs(29)), Some("gone"));
        assert_eq!(c.get(1, t0 + Duration::from_secs(30)), None);
        // full: the oldest is forgotten first
        c.insert(2, "b".into(), t0 + Duration::from_secs(1));
        c.insert(3, "c".into(), t0 + Duration::from_secs(2));
        c.insert(4, "d".into(), t0 + Duration::from_secs(3));
        assert_eq!(c.entries.len(), 3);
        assert_eq!(c.get(1, t0 + Duration::from_secs(3)), None);
        assert_eq!(c.get(4, t0 + Duration::from_secs(3)), Some("d"));
        // expired entries go before live ones
        c.insert(5, "e".into(), t0 + Duration::from_secs(32));
        assert_eq!(c.entries.len(), 2);
        // a flood of distinct ids never grows past the cap
        for id in 100..10_000 {
            c.insert(id, "x".into(), t0 + Duration::from_secs(40));
        }
        assert_eq!(c.entries.len(), 3);
    }
}
