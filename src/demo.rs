//! `ml-worker demo`: the whole system in one process. An embedded broker,
//! the worker on the shipped models, a producer of sample feature events
//! (with a little poison), and a downstream reader; live progress, then a
//! summary.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::audit::{default_worker_id, AuditStore};
use crate::broker::EmbeddedBroker;
use crate::loadgen::{
    encode_feature, event, load_samples, now_ms, quantile, Load, Reader, Samples,
};
use crate::registry::RegistryBuilder;
use crate::service::embedded_topics;
use crate::worker::config::WorkerConfig;
use crate::worker::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub events: u64,
    pub rate: f64,
    pub samples: std::path::PathBuf,
    /// One event in this many is poison (undecodable, unknown model, or
    /// missing a feature the model requires); 0: none.
    pub poison_every: u64,
}

/// The poison the demo sends, in turn.
fn poison(samples: &[Samples], n: u64, out: &mut Vec<u8>) -> &'static str {
    match n % 3 {
        0 => {
            out.clear();
            out.extend_from_slice(b"\xde\xad\xbe\xef not an event");
            "garbage bytes"
        }
        1 => {
            let mut e = event(samples, "poison", n, now_ms());
            e.model = "model_nobody_registered".into();
            encode_feature(crate::events::WireFormat::AvroRaw, &e, out);
            "unknown model"
        }
        _ => {
            let wine: Vec<Samples> = samples
                .iter()
                // a network: it refuses missing values (the forest serves them)
                .filter(|s| s.model == "wine_mlp")
                .cloned()
                .collect();
            let src = if wine.is_empty() { samples } else { &wine[..] };
            let mut e = event(src, "poison", n, now_ms());
            e.features.pop();
            encode_feature(crate::events::WireFormat::AvroRaw, &e, out);
            "missing feature"
        }
    }
}

/// Runs the demo with the model kinds (and registry options) of `kinds`.
pub fn run(cfg: &WorkerConfig, opts: &DemoOptions, kinds: RegistryBuilder) -> Result<()> {
    let samples = load_samples(&opts.samples)?;
    let mut cfg = cfg.clone();
    // the demo's traffic is avro-raw, whatever the config's formats
    cfg.input_format = crate::events::WireFormat::AvroRaw;
    cfg.predictions.format = crate::events::WireFormat::AvroRaw;
    cfg.signals.format = crate::events::WireFormat::AvroRaw;
    if std::net::TcpListener::bind(cfg.metrics_address).is_err() {
        cfg.metrics_address = "127.0.0.1:0".parse().expect("literal address");
    }
    let broker = EmbeddedBroker::start(1, &embedded_topics(&cfg))?;
    let brokers = broker.bootstrap_servers();
    println!(
        "embedded broker on {brokers}; topics {} -> {}, {}, {}",
        cfg.input_topics.join(","),
        cfg.predictions.topic,
        cfg.signals.topic,
        cfg.dead_letters
    );

    if let Some(dir) = cfg.audit_db.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let audit = Arc::new(AuditStore::open(&cfg.audit_db, &default_worker_id())?);
    let audit_before = audit.rows(None, Some(1))?.last().map_or(0, |r| r.id);
    let registry = Arc::new(kinds.audit(Some(audit.clone())).open(&cfg.registry)?);
    for name in registry.names() {
        match registry.get(name) {
            Ok(s) => {
                let i = s.model.info();
                println!(
                    "model {name}: {} {} ({}), version {}, sha256 {}…",
                    i.kind,
                    i.task_type,
                    i.detail,
                    i.version,
                    &i.sha256[..12]
                );
            }
            Err(e) => println!("model {name}: not served: {e}"),
        }
    }

    let metrics = Arc::new(Metrics::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = {
        let (c, r, m, s, b) = (
            Arc::new(cfg.clone()),
            crate::worker::reload::Models::fixed(registry.clone(), metrics.clone()),
            metrics.clone(),
            stop.clone(),
            brokers.clone(),
        );
        std::thread::spawn(move || {
            crate::worker::run(c, &b, r, m, s, move |st| {
                let _ = tx.send(st);
            })
        })
    };
    let started = rx
        .recv_timeout(Duration::from_secs(60))
        .context("the worker did not start")?;
    println!(
        "worker started; metrics on http://{}/metrics",
        started.metrics_address
    );
    // the embedded broker keeps a bounded log: start sending once the
    // worker has joined its group and holds partitions
    let joined = Instant::now();
    while !metrics.ready() {
        if joined.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("demo: the worker was not assigned partitions within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "worker ready after {:.1} s (group joined, partitions assigned)",
        joined.elapsed().as_secs_f64()
    );

    let mut reader = Reader::new(
        &brokers,
        (&cfg.predictions.topic, cfg.predictions.format),
        (&cfg.signals.topic, cfg.signals.format),
        &cfg.dead_letters,
    )?;
    reader.light = true;
    let produced = Arc::new(AtomicU64::new(0));
    let poisoned = Arc::new(AtomicU64::new(0));
    let producer = {
        let (b, topic, samples, opts) = (
            brokers.clone(),
            cfg.input_topics[0].clone(),
            samples.clone(),
            opts.clone(),
        );
        let (produced, poisoned) = (produced.clone(), poisoned.clone());
        std::thread::spawn(move || -> Result<()> {
            let load = Load::new(&b)?;
            let start = Instant::now();
            let mut buf = Vec::new();
            for n in 0..opts.events {
                let due = start + Duration::from_secs_f64(n as f64 / opts.rate);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                if opts.poison_every > 0 && n % opts.poison_every == opts.poison_every - 1 {
                    poison(&samples, n / opts.poison_every, &mut buf);
                    load.send(&topic, Some(b"poison"), &buf)?;
                    poisoned.fetch_add(1, Ordering::Relaxed);
                } else {
                    let e = event(&samples, "demo", n, now_ms());
                    encode_feature(crate::events::WireFormat::AvroRaw, &e, &mut buf);
                    load.send(&topic, Some(e.symbol.as_bytes()), &buf)?;
                }
                produced.fetch_add(1, Ordering::Relaxed);
            }
            load.flush(Duration::from_secs(30))?;
            Ok(())
        })
    };

    let start = Instant::now();
    let mut last = Instant::now();
    let total = opts.events;
    let deadline = Duration::from_secs_f64(total as f64 / opts.rate) + Duration::from_secs(60);
    loop {
        reader.read(Duration::from_millis(200), |_| false);
        let s = &reader.seen;
        let done = s.predictions + s.dead_letters.len() as u64;
        if last.elapsed() >= Duration::from_secs(1) || done >= total {
            last = Instant::now();
            println!(
                "  {:>5.1}s  produced {:>7}  worker read {:>7}  predictions {:>7}  signals {:>7}  dead letters {:>4}  in flight {:>5}",
                start.elapsed().as_secs_f64(),
                produced.load(Ordering::Relaxed),
                metrics.total("ml_worker_events_in_total"),
                s.predictions,
                s.signals,
                s.dead_letters.len(),
                metrics.in_flight.load(Ordering::Relaxed)
            );
        }
        if done >= total && s.signals + poisoned.load(Ordering::Relaxed) >= total {
            break;
        }
        if start.elapsed() > deadline {
            anyhow::bail!("demo: outputs stopped arriving ({done} of {total})");
        }
    }
    let elapsed = start.elapsed();
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
    stop.store(true, Ordering::Relaxed);
    let summary = worker
        .join()
        .map_err(|_| anyhow::anyhow!("worker thread panicked"))??;
    if let Some(mut r) = Arc::into_inner(registry) {
        r.unload_all();
    }
    // clients go before the broker they talk to (no disconnect noise)
    let seen = std::mem::take(&mut reader.seen);
    drop(reader);
    drop(broker);

    let s = &seen;
    let lat = &s.latencies_ms;
    println!("\nsummary");
    println!(
        "  events          {} in {:.1} s = {:.0} events/s (offered {:.0}/s)",
        total,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        opts.rate
    );
    println!("  latency         p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms (event time to prediction read downstream)",
        quantile(lat, 0.5), quantile(lat, 0.95), quantile(lat, 0.99), quantile(lat, 1.0));
    println!("  predictions     {}", s.predictions);
    println!(
        "  signals         {} ({})",
        s.signals,
        s.sides
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for d in &s.dead_letters {
        let stage = d.headers.get("error.stage").cloned().unwrap_or_default();
        let reason = d.headers.get("error.reason").cloned().unwrap_or_default();
        let short: String = reason.chars().take(70).collect();
        *reasons.entry(format!("{stage}: {short}")).or_insert(0) += 1;
    }
    println!("  dead letters    {}", s.dead_letters.len());
    for (r, n) in &reasons {
        println!("    {n:>5} x {r}");
    }
    println!(
        "  committed       {} events in, {} outputs acknowledged, {} left in flight",
        summary.events_in, summary.outputs_acked, summary.in_flight_at_exit
    );
    let rows: Vec<_> = audit
        .rows(None, None)?
        .into_iter()
        .filter(|r| r.id > audit_before)
        .collect();
    println!(
        "  audit rows      {} written to {}",
        rows.len(),
        cfg.audit_db.display()
    );
    for r in &rows {
        println!(
            "    #{:<4} {:<8} {:<18} {:<12} {}",
            r.id, r.event, r.model, r.version, r.detail
        );
    }
    Ok(())
}
