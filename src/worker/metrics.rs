//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoint,
//! with `POST /admin/reload` beside them.
//!
//! Hot paths count into local tallies and merge them here once per batch, so
//! the locks below are taken a few times per batch, not per event.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Upper bounds of the batch size histogram buckets.
const SIZE_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
];

/// Every metric: name, type, help.
const METRICS: &[(&str, &str, &str)] = &[
    (
        "ml_worker_events_in_total",
        "counter",
        "Feature events read, by input topic and model ('' when undecodable).",
    ),
    (
        "ml_worker_events_out_total",
        "counter",
        "Records handed to the producer, by output topic and model.",
    ),
    (
        "ml_worker_outputs_acked_total",
        "counter",
        "Output records acknowledged by the broker.",
    ),
    (
        "ml_worker_publish_retries_total",
        "counter",
        "Output records sent again after a failed delivery.",
    ),
    (
        "ml_worker_publish_failures_total",
        "counter",
        "Output records that failed permanently, by error.",
    ),
    (
        "ml_worker_dead_letters_total",
        "counter",
        "Events sent to the dead-letter topic, by stage.",
    ),
    (
        "ml_worker_fallbacks_total",
        "counter",
        "Predictions served by a fallback model, by model asked for.",
    ),
    (
        "ml_worker_route_predictions_total",
        "counter",
        "Predictions by the model asked for and route: primary (the model or its fallback), canary (its canary's share of symbols), shadow (to the shadow topic).",
    ),
    (
        "ml_worker_shadow_failures_total",
        "counter",
        "Events a shadow model could not score (by stage: validate, inference); the event itself is served.",
    ),
    (
        "ml_worker_signals_total",
        "counter",
        "Signals published, by model and side.",
    ),
    (
        "ml_worker_commits_total",
        "counter",
        "Offset commit requests (periodic, on revocation, at shutdown, at-most-once), by result: every attempt, a re-issued one again.",
    ),
    (
        "ml_worker_transactions_committed_total",
        "counter",
        "Exactly-once: transactions committed (outputs and the input offsets they came from, together).",
    ),
    (
        "ml_worker_transactions_aborted_total",
        "counter",
        "Exactly-once: transactions aborted, by reason; their input is read again from the last commit.",
    ),
    (
        "ml_worker_transaction_commit_latency_seconds",
        "histogram",
        "Exactly-once: from holding the input back for a commit to the broker ending the transaction (outstanding outputs acknowledged, offsets sent, commit).",
    ),
    (
        "ml_worker_at_most_once_skipped_total",
        "counter",
        "At-most-once: events read but not served because their offsets could not be committed first.",
    ),
    (
        "ml_worker_consume_errors_total",
        "counter",
        "Errors the consumer reported (librdkafka retries them), by error; a steady rise means a partition is stuck.",
    ),
    (
        "ml_worker_input_skipped_total",
        "counter",
        "Input records deleted by the broker before they were read (an offset reset jumped over them), by topic and partition.",
    ),
    (
        "ml_worker_backpressure_pauses_total",
        "counter",
        "Times the input partitions were paused because too many events were in flight.",
    ),
    (
        "ml_worker_partition_waits_total",
        "counter",
        "Times a partition was held back at a record whose writer schema was being fetched or whose model was loading (other partitions go on), by what it waited for.",
    ),
    (
        "ml_worker_committed_offset_lag",
        "gauge",
        "Records in an assigned input partition past the worker's last committed offset (its end as last seen, less the committed offset), by topic and partition.",
    ),
    (
        "ml_worker_batch_size",
        "histogram",
        "Rows per inference call, by model.",
    ),
    (
        "ml_worker_inference_latency_seconds",
        "histogram",
        "Inference call duration, by model.",
    ),
    (
        "ml_worker_end_to_end_latency_seconds",
        "histogram",
        "From the input record's timestamp to its prediction being handed to the producer.",
    ),
    (
        "ml_worker_in_flight_events",
        "gauge",
        "Events read but not yet fully acknowledged.",
    ),
    (
        "ml_worker_in_flight_bytes",
        "gauge",
        "Bytes of input values and keys read and not yet handed to the producer.",
    ),
    (
        "ml_worker_paused",
        "gauge",
        "1 while input partitions are paused for backpressure.",
    ),
    (
        "ml_worker_assigned_partitions",
        "gauge",
        "Input partitions assigned to this worker.",
    ),
    (
        "ml_worker_consumer_lag",
        "gauge",
        "Messages behind the partition's high watermark, by topic and partition.",
    ),
    (
        "ml_worker_audit_head",
        "gauge",
        "Id of the newest audit row, labelled with its mac: the chain head for `ml-worker audit verify --head ID:MAC`.",
    ),
    (
        "ml_worker_reloads_total",
        "counter",
        "Registry reloads (SIGHUP, file change, POST /admin/reload), by result: ok (swapped), unchanged, failed (the models loaded before keep serving).",
    ),
    (
        "ml_worker_model_info",
        "gauge",
        "1 for every model the worker serves, by model, version and sha256 (changes with each reload).",
    ),
    (
        "ml_worker_model_unhealthy",
        "gauge",
        "1 for a model that overran its inference deadline; it is not called again until restart.",
    ),
];

type Labels = Vec<(&'static str, String)>;
type Key = (&'static str, Labels);

/// A histogram with fixed buckets.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn latency() -> Histogram {
        Self::with(&BUCKETS)
    }
    pub fn sizes() -> Histogram {
        Self::with(&SIZE_BUCKETS)
    }
    fn with(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }
    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }
    fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.sum += o.sum;
        self.count += o.count;
    }
}

/// The worker's metrics and readiness.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<Key, u64>>,
    histograms: Mutex<BTreeMap<Key, Histogram>>,
    gauges: Mutex<BTreeMap<Key, f64>>,
    /// Acks are counted on the producer's thread, without a lock.
    pub acked: AtomicU64,
    pub in_flight: AtomicUsize,
    pub in_flight_bytes: AtomicUsize,
    pub paused: AtomicBool,
    pub assigned: AtomicUsize,
    pub models_loaded: AtomicBool,
    pub stopping: AtomicBool,
    /// Models that overran a deadline, with the reason; they are not
    /// called again (their events go to the dead-letter topic).
    unhealthy: Mutex<BTreeMap<String, String>>,
    /// The last connection failure the Kafka clients logged, and when:
    /// shown by `/readyz` while not ready (a wrong CA or password).
    kafka_failure: Mutex<Option<(std::time::Instant, String)>>,
}

/// Only declared metrics are rendered: catch a forgotten declaration in tests.
fn declared(name: &str) {
    debug_assert!(
        METRICS.iter().any(|m| m.0 == name),
        "metric {name} is not declared in METRICS"
    );
}

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

impl Metrics {
    pub fn add(&self, name: &'static str, l: &[(&'static str, &str)], n: u64) {
        declared(name);
        if n == 0 {
            return;
        }
        *self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((name, labels(l)))
            .or_insert(0) += n;
    }

    /// Shows a counter's series at 0 before its first event (so
    /// `rate()` and `increase()` see the first one).
    pub fn zero(&self, name: &'static str, l: &[(&'static str, &str)]) {
        declared(name);
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((name, labels(l)))
            .or_insert(0);
    }

    /// The series alerts watch, at 0 from the start: reloads by result,
    /// commits by result, dead letters by stage.
    pub fn zero_known_series(&self) {
        for result in ["ok", "unchanged", "failed"] {
            self.zero("ml_worker_reloads_total", &[("result", result)]);
        }
        for result in ["ok", "error"] {
            self.zero("ml_worker_commits_total", &[("result", result)]);
        }
        for stage in crate::worker::batch::Stage::ALL {
            self.zero("ml_worker_dead_letters_total", &[("stage", stage.as_str())]);
        }
    }

    /// A connection failure a Kafka client logged (the last one is kept).
    pub fn kafka_failed(&self, message: &str) {
        *self.kafka_failure.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((std::time::Instant::now(), message.to_string()));
    }

    /// `, last Kafka connection failure N s ago: ...`, or nothing.
    fn kafka_failure_note(&self) -> String {
        self.kafka_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(at, m)| {
                format!(
                    ", last Kafka connection failure {} s ago: {}",
                    at.elapsed().as_secs(),
                    crate::text::escape(m)
                )
            })
            .unwrap_or_default()
    }

    /// Sum of a counter over all its label values.
    pub fn total(&self, name: &'static str) -> u64 {
        if name == "ml_worker_outputs_acked_total" {
            return self.acked.load(Ordering::Relaxed);
        }
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((n, _), _)| *n == name)
            .map(|(_, v)| v)
            .sum()
    }

    pub fn merge_histogram(&self, name: &'static str, l: &[(&'static str, &str)], h: &Histogram) {
        declared(name);
        if h.count == 0 {
            return;
        }
        self.histograms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((name, labels(l)))
            .or_insert_with(|| Histogram::with(h.bounds))
            .merge(h);
    }

    pub fn set_gauge(&self, name: &'static str, l: &[(&'static str, &str)], v: f64) {
        declared(name);
        self.gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((name, labels(l)), v);
    }

    /// Drops every series of a gauge (e.g. lag of partitions no longer ours).
    pub fn clear_gauge(&self, name: &'static str) {
        self.gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(n, _), _| *n != name);
    }

    /// Ready: models loaded, partitions assigned, not shutting down.
    pub fn ready(&self) -> bool {
        self.models_loaded.load(Ordering::Relaxed)
            && self.assigned.load(Ordering::Relaxed) > 0
            && !self.stopping.load(Ordering::Relaxed)
            && self.unhealthy_models().is_empty()
    }

    /// The audit chain's head (one series: the newest).
    pub fn set_audit_head(&self, id: i64, mac: &str) {
        self.clear_gauge("ml_worker_audit_head");
        self.set_gauge("ml_worker_audit_head", &[("mac", mac)], id as f64);
    }

    /// Marks a model unhealthy (until the worker restarts).
    pub fn mark_unhealthy(&self, model: &str, why: &str) {
        self.unhealthy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(model.to_string())
            .or_insert_with(|| why.to_string());
    }

    /// Forgets a model's unhealthy mark (a reload brought a new version).
    pub fn clear_unhealthy(&self, model: &str) {
        self.unhealthy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(model);
    }

    /// Why a model is unhealthy, if it is.
    pub fn unhealthy(&self, model: &str) -> Option<String> {
        let u = self.unhealthy.lock().unwrap_or_else(|p| p.into_inner());
        if u.is_empty() {
            return None;
        }
        u.get(model).cloned()
    }

    /// Every unhealthy model with its reason.
    pub fn unhealthy_models(&self) -> Vec<(String, String)> {
        self.unhealthy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let hists = self
            .histograms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut gauges = self
            .gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        gauges.insert(
            ("ml_worker_in_flight_events", vec![]),
            self.in_flight.load(Ordering::Relaxed) as f64,
        );
        gauges.insert(
            ("ml_worker_in_flight_bytes", vec![]),
            self.in_flight_bytes.load(Ordering::Relaxed) as f64,
        );
        gauges.insert(
            ("ml_worker_paused", vec![]),
            self.paused.load(Ordering::Relaxed) as u8 as f64,
        );
        gauges.insert(
            ("ml_worker_assigned_partitions", vec![]),
            self.assigned.load(Ordering::Relaxed) as f64,
        );
        for (model, _) in self.unhealthy_models() {
            gauges.insert(("ml_worker_model_unhealthy", vec![("model", model)]), 1.0);
        }
        let fmt_labels = |l: &Labels, extra: Option<(&str, String)>| {
            let mut parts: Vec<String> = l
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            if let Some((k, v)) = extra {
                parts.push(format!("{k}=\"{v}\""));
            }
            if parts.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", parts.join(","))
            }
        };
        for (name, kind, help) in METRICS {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            match *kind {
                "counter" if *name == "ml_worker_outputs_acked_total" => {
                    let _ = writeln!(out, "{name} {}", self.acked.load(Ordering::Relaxed));
                }
                "counter" => {
                    for ((n, l), v) in &counters {
                        if n == name {
                            let _ = writeln!(out, "{name}{} {v}", fmt_labels(l, None));
                        }
                    }
                }
                "gauge" => {
                    for ((n, l), v) in &gauges {
                        if n == name {
                            let _ = writeln!(out, "{name}{} {v}", fmt_labels(l, None));
                        }
                    }
                }
                _ => {
                    for ((n, l), h) in &hists {
                        if n != name {
                            continue;
                        }
                        let mut cum = 0;
                        for (i, c) in h.counts.iter().enumerate() {
                            cum += c;
                            let le = h
                                .bounds
                                .get(i)
                                .map_or("+Inf".to_string(), |b| b.to_string());
                            let _ = writeln!(
                                out,
                                "{name}_bucket{} {cum}",
                                fmt_labels(l, Some(("le", le)))
                            );
                        }
                        let _ = writeln!(out, "{name}_sum{} {}", fmt_labels(l, None), h.sum);
                        let _ = writeln!(out, "{name}_count{} {}", fmt_labels(l, None), h.count);
                    }
                }
            }
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Most connections the endpoint serves at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most connections from one client address at once, so one client
/// holding idle connections cannot keep the health probes out.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 32;
/// A client must send its whole request head within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection (keep-alive included) stays open.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head read (hyper's buffer; its minimum is 8 KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Serves `/metrics`, `/healthz` and `/readyz` until `stop` is set, on a
/// thread of its own (hyper on a single-threaded tokio runtime): each
/// connection is served concurrently, within the limits above, so a slow or
/// idle client delays nobody else. Returns the bound address (useful with
/// port 0).
pub fn serve(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    admin: Admin,
    stop: Arc<AtomicBool>,
) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let admin = Arc::new(admin);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || runtime.block_on(accept_loop(listener, metrics, admin, stop)))?;
    Ok(bound)
}

/// `POST /admin/reload`: where reloads are asked for, and who may ask.
#[derive(Default)]
pub struct Admin {
    /// The reload thread's requests; None: this registry cannot be reloaded.
    pub reload: Option<std::sync::mpsc::Sender<crate::worker::reload::Request>>,
    /// Required as `Authorization: Bearer TOKEN` when set. Unset, only a
    /// listener bound to a loopback address answers.
    pub token: Option<String>,
}

/// How long `POST /admin/reload` waits for the reload before answering
/// 202 (it goes on; the logs and `ml_worker_reloads_total` tell the end).
pub const RELOAD_ANSWER_WAIT: Duration = Duration::from_secs(20);

async fn accept_loop(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    admin: Arc<Admin>,
    stop: Arc<AtomicBool>,
) {
    let loopback = listener
        .local_addr()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(false);
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "metrics endpoint cannot listen");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_client: Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(client) = ClientSlot::take(&per_client, peer.ip()) else {
                    tracing::debug!(client = %peer.ip(), "metrics endpoint: this client's connection limit; connection closed");
                    continue;
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::debug!("metrics endpoint at its connection limit; connection closed");
                    continue;
                };
                let metrics = metrics.clone();
                let admin = admin.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _client = client;
                    let service = hyper::service::service_fn(move |req| {
                        let (metrics, admin) = (metrics.clone(), admin.clone());
                        async move {
                            let response = if req.uri().path() == "/admin/reload" {
                                admin_reload(&req, &admin, loopback).await
                            } else {
                                respond(&req, &metrics)
                            };
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .max_buf_size(MAX_HEAD_BYTES)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                        tracing::debug!(error = %e, "metrics connection ended with an error");
                    }
                });
            }
            _ = tick.tick() => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
        }
    }
}

/// One connection counted against its client's limit (released on drop).
struct ClientSlot {
    counts: Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl ClientSlot {
    fn take(
        counts: &Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<ClientSlot> {
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

type Body = http_body_util::Full<hyper::body::Bytes>;

fn reply(status: hyper::StatusCode, ctype: &'static str, body: String) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(Body::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    response
}

/// Equal, in time that depends on the lengths only.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /admin/reload`: checks who asks, runs a reload on the reload
/// thread and answers with what it did (JSON).
async fn admin_reload<B>(
    req: &hyper::Request<B>,
    admin: &Admin,
    loopback: bool,
) -> hyper::Response<Body> {
    use hyper::{header, Method, StatusCode};
    let json = "application/json";
    let error = |status, message: &str| {
        reply(
            status,
            json,
            serde_json::json!({"result": "refused", "error": message}).to_string() + "\n",
        )
    };
    if req.method() != Method::POST {
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "POST only");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return r;
    }
    match &admin.token {
        Some(token) => {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    // the scheme is case-insensitive (RFC 7235)
                    let (scheme, token) = v.split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then_some(token)
                })
                .unwrap_or("");
            if !same_secret(given.as_bytes(), token.as_bytes()) {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "needs Authorization: Bearer <reload.token>",
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
        }
        None if !loopback => {
            return error(
                StatusCode::FORBIDDEN,
                "this listener is not on a loopback address: set reload.token (or the ML_WORKER_ADMIN_TOKEN environment variable) to reload over it",
            )
        }
        None => {}
    }
    let Some(requests) = &admin.reload else {
        return error(
            StatusCode::CONFLICT,
            "this worker's registry was not opened from a file; it cannot be reloaded",
        );
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let asked = requests.send(crate::worker::reload::Request {
        trigger: crate::worker::reload::Trigger::Http,
        reply: Some(tx),
    });
    if asked.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the reload thread has stopped",
        );
    }
    let answer = tokio::task::spawn_blocking(move || rx.recv_timeout(RELOAD_ANSWER_WAIT)).await;
    match answer {
        Ok(Ok(Ok(done))) => reply(
            StatusCode::OK,
            json,
            serde_json::json!({
                "result": if done.changes.is_empty() { "unchanged" } else { "reloaded" },
                "swapped": done.swapped,
                "took_ms": done.took.as_millis() as u64,
                "changes": done.changes.iter().map(|c| serde_json::json!({
                    "model": c.model, "old_version": c.old, "new_version": c.new, "what": c.what,
                })).collect::<Vec<_>>(),
            })
            .to_string()
                + "\n",
        ),
        Ok(Ok(Err(e))) if e.starts_with("the worker is stopping") => error(StatusCode::SERVICE_UNAVAILABLE, &e),
        Ok(Ok(Err(e))) => reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            json,
            serde_json::json!({
                "result": "failed",
                "error": e,
                "serving": "the models loaded before keep serving",
            })
            .to_string()
                + "\n",
        ),
        _ => reply(
            StatusCode::ACCEPTED,
            json,
            serde_json::json!({
                "result": "running",
                "error": "the reload has not finished yet; see the logs and ml_worker_reloads_total",
            })
            .to_string()
                + "\n",
        ),
    }
}

fn respond<B>(req: &hyper::Request<B>, metrics: &Metrics) -> hyper::Response<Body> {
    use hyper::{Method, StatusCode};
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET | &Method::HEAD, "/readyz") if metrics.ready() => {
            (StatusCode::OK, "text/plain", "ready\n".into())
        }
        (&Method::GET | &Method::HEAD, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!(
                "not ready: models loaded={}, partitions assigned={}, stopping={}{}{}\n",
                metrics.models_loaded.load(Ordering::Relaxed),
                metrics.assigned.load(Ordering::Relaxed),
                metrics.stopping.load(Ordering::Relaxed),
                metrics
                    .unhealthy_models()
                    .iter()
                    .map(|(m, why)| format!(", model '{m}' unhealthy: {why}"))
                    .collect::<String>(),
                metrics.kafka_failure_note()
            ),
        ),
        (&Method::GET | &Method::HEAD, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz, /readyz\n".into(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        ),
    };
    let mut response = hyper::Response::new(Body::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.add(
            "ml_worker_events_in_total",
            &[("topic", "f"), ("model", "a\"b")],
            3,
        );
        let mut h = Histogram::latency();
        h.observe(0.0002);
        h.observe(3.0);
        m.merge_histogram("ml_worker_inference_latency_seconds", &[("model", "m")], &h);
        m.acked.store(7, Ordering::Relaxed);
        let text = m.render();
        assert!(
            text.contains("ml_worker_events_in_total{topic=\"f\",model=\"a\\\"b\"} 3"),
            "{text}"
        );
        assert!(text
            .contains("ml_worker_inference_latency_seconds_bucket{model=\"m\",le=\"0.00025\"} 1"));
        assert!(
            text.contains("ml_worker_inference_latency_seconds_bucket{model=\"m\",le=\"+Inf\"} 2")
        );
        assert!(text.contains("ml_worker_inference_latency_seconds_count{model=\"m\"} 2"));
        assert!(text.contains("ml_worker_outputs_acked_total 7"));
        assert_eq!(m.total("ml_worker_events_in_total"), 3);
    }
}
