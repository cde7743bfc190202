//! Inference: each shard's thread takes closed chunks in order, runs every
//! model group of a chunk through the model that serves it (on an executor,
//! under the model's inference deadline; an unhealthy model is not called),
//! decides each record's outputs, and hands the chunk to the producer.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use crate::deadline::{Executor, Overrun};
use crate::model::{Batch, Prediction};
use crate::worker::batch::{Chunk, ChunkPool, Group, Kind, Record, Serving, Stage};
use crate::worker::metrics::{Histogram, Metrics};
use crate::worker::produce::Publisher;

/// What inference made of one group of a chunk.
pub(super) struct Outcome {
    /// The predictions, or why every row of the group is refused.
    pub(super) result: Result<Prediction, (Stage, String)>,
    pub(super) serving: Option<Arc<Serving>>,
    /// Rows refused on their own (`(row, why)`), e.g. by a fallback that
    /// rejects a missing feature.
    pub(super) row_errors: Vec<(u32, String)>,
    pub(super) latency_us: i64,
}

impl Outcome {
    pub(super) fn signal(&self) -> Option<&crate::signal::SignalRule> {
        self.serving.as_ref().and_then(|s| s.signal.as_ref())
    }

    pub(super) fn model_name(&self) -> &str {
        self.serving
            .as_ref()
            .map_or("", |s| s.model.info().name.as_str())
    }
}

/// Runs one group's rows through the model that serves them, under its
/// inference deadline; an unhealthy model is not called.
pub(super) fn infer(g: &mut Group, executor: &mut Executor, metrics: &Metrics) -> Outcome {
    let mut outcome = Outcome {
        result: Err((Stage::Inference, "no rows".into())),
        serving: None,
        row_errors: Vec::new(),
        latency_us: 0,
    };
    if g.n_rows == 0 {
        return outcome;
    }
    let serving = match g.route.serving() {
        Ok(s) => s,
        Err(e) => {
            outcome.result = Err((Stage::Route, e));
            return outcome;
        }
    };
    outcome.serving = Some(serving.clone());
    let name = serving.model.info().name.clone();
    if let Some(why) = metrics.unhealthy(&name) {
        outcome.result = Err((
            Stage::Inference,
            format!("model '{name}' is unhealthy: {why}"),
        ));
        return outcome;
    }
    let (rows, row_errors) = serving.rows(std::mem::take(&mut g.rows), g.n_rows);
    outcome.row_errors = row_errors;
    let nf = serving.model.info().features.len();
    let model = serving.model.clone();
    let t = Instant::now();
    let run = executor.run(serving.inference_timeout, move || {
        let r = Batch::new(&rows, nf).and_then(|b| model.predict_full(b));
        (r, rows)
    });
    let dt = t.elapsed();
    outcome.latency_us = dt.as_micros() as i64;
    let route = g.route.name.as_str();
    outcome.result = match run {
        Ok((r, rows)) => {
            g.rows = rows; // its capacity is reused
            r.map_err(|e| (Stage::Inference, format!("model '{name}': {e}")))
        }
        Err(Overrun::TimedOut(d)) => {
            let why = format!(
                "an inference call did not finish within its deadline of {} ms (inference_timeout_ms)",
                d.as_millis()
            );
            tracing::error!(model = %name, rows = g.n_rows, reason = %why,
                "model marked unhealthy; its events go to the dead-letter topic");
            metrics.mark_unhealthy(&name, &why);
            Err((
                Stage::Inference,
                format!("model '{name}': {why}; the model is marked unhealthy"),
            ))
        }
        Err(Overrun::Panicked(p)) => {
            Err((Stage::Inference, format!("model '{name}' panicked: {p}")))
        }
    };
    let mut h = Histogram::latency();
    h.observe(dt.as_secs_f64());
    metrics.merge_histogram(
        "ml_worker_inference_latency_seconds",
        &[("model", route)],
        &h,
    );
    let mut s = Histogram::sizes();
    s.observe(g.n_rows as f64);
    metrics.merge_histogram("ml_worker_batch_size", &[("model", route)], &s);
    if let Err((_, e)) = &outcome.result {
        tracing::warn!(model = %route, error = %e, rows = g.n_rows, "inference failed; rows go to the dead-letter topic");
    }
    outcome
}

/// Decides every record's outputs: the rows inference refused (the whole
/// group, a row on its own, or a non-finite value) become dead letters.
/// A shadow row that failed is dropped (the event is served all the
/// same); returns how many were.
pub(super) fn refuse_failed_rows(records: &mut [Record], outcomes: &[Outcome]) -> u64 {
    let mut shadow_failed = 0;
    for rec in records.iter_mut() {
        if let Kind::Event {
            shadow: shadow @ Some(_),
            ..
        } = &mut rec.kind
        {
            let (g, r) = shadow
                .map(|(g, r)| (g as usize, r as usize))
                .expect("matched");
            let o = &outcomes[g];
            let ok = match &o.result {
                Err(_) => false,
                Ok(p) => {
                    !o.row_errors.iter().any(|(i, _)| *i as usize == r)
                        && p.row_problem(r).is_none()
                }
            };
            if !ok {
                *shadow = None;
                shadow_failed += 1;
            }
        }
    }
    for rec in records {
        if let Kind::Event { group, row, .. } = &rec.kind {
            let (g, r) = (*group as usize, *row as usize);
            let o = &outcomes[g];
            let refused = match &o.result {
                Err((stage, e)) => Some((*stage, e.clone())),
                Ok(p) => o
                    .row_errors
                    .iter()
                    .find(|(i, _)| *i as usize == r)
                    .map(|(_, why)| (Stage::Validate, why.clone()))
                    .or_else(|| {
                        p.row_problem(r).map(|why| {
                            (
                                Stage::Inference,
                                format!("model '{}': {why} for this row", o.model_name()),
                            )
                        })
                    }),
            };
            if let Some((stage, reason)) = refused {
                rec.kind = Kind::Dead { stage, reason };
            }
        }
    }
    shadow_failed
}

/// Records handed to inference shards and not yet through them: counted
/// by the consumer thread when it dispatches a chunk, and by the shard when
/// it is done with it.
#[derive(Debug, Default)]
pub struct Queued {
    /// Records not yet tracked for acknowledgement.
    pub events: AtomicUsize,
    /// Bytes of their values and keys (the chunks' arenas), until the
    /// chunk's outputs are handed to the producer.
    pub bytes: AtomicUsize,
}

impl Queued {
    pub fn add(&self, chunk: &Chunk) {
        self.events
            .fetch_add(chunk.records.len(), Ordering::Relaxed);
        self.bytes.fetch_add(chunk.arena.len(), Ordering::Relaxed);
    }

    pub fn remove(&self, chunk: &Chunk) {
        self.events
            .fetch_sub(chunk.records.len(), Ordering::Relaxed);
        self.bytes.fetch_sub(chunk.arena.len(), Ordering::Relaxed);
    }
}

/// The body of an inference thread: scores chunks until the channel closes.
/// A panic here (a bug) must not leave a shard silently dead: it sets
/// `failed`, and the worker stops (its inputs stay uncommitted).
fn inference_loop(
    publisher: Arc<Publisher>,
    rx: Receiver<Chunk>,
    queued: Arc<Queued>,
    pool: ChunkPool,
    failed: Arc<AtomicBool>,
    mut executor: Executor,
) {
    while let Ok(chunk) = rx.recv() {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            publisher.process(chunk, &queued, &mut executor)
        }));
        let Ok(empty) = run else {
            tracing::error!("inference thread panicked; the worker stops");
            failed.store(true, Ordering::Relaxed);
            return;
        };
        if let Ok(mut p) = pool.lock() {
            if p.len() < 8 {
                p.push(empty);
            }
        }
    }
}

/// The inference threads: one per shard, each with the executor its model
/// code runs on.
pub(super) struct Shards {
    pub(super) threads: Vec<std::thread::JoinHandle<()>>,
    /// Set when a thread panicked (a bug): the worker stops.
    pub(super) failed: Arc<AtomicBool>,
    pub(super) queued: Arc<Queued>,
    pub(super) pool: ChunkPool,
}

impl Shards {
    /// Starts `n` inference threads; returns them and their channels.
    pub(super) fn start(
        n: usize,
        publisher: &Arc<Publisher>,
    ) -> std::io::Result<(Shards, Vec<Sender<Chunk>>)> {
        let shards = Shards {
            threads: Vec::new(),
            failed: Arc::new(AtomicBool::new(false)),
            queued: Arc::new(Queued::default()),
            pool: Arc::default(),
        };
        let mut shards = shards;
        let mut senders = Vec::new();
        for i in 0..n {
            let (tx, rx) = channel::<Chunk>();
            senders.push(tx);
            let (p, q, pl, f) = (
                publisher.clone(),
                shards.queued.clone(),
                shards.pool.clone(),
                shards.failed.clone(),
            );
            // model code runs on its own thread, under a deadline
            let executor = Executor::new(&format!("model-{i}"))?;
            shards.threads.push(
                std::thread::Builder::new()
                    .name(format!("inference-{i}"))
                    .spawn(move || inference_loop(p, rx, q, pl, f, executor))?,
            );
        }
        Ok((shards, senders))
    }

    /// Whether an inference thread failed.
    pub(super) fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}
