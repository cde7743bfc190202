//! The worker as a service: audit store, model registry, the embedded
//! broker when the config asks for it, then the consume loop until stopped.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::audit::{default_worker_id, AuditStore};
use crate::broker::{EmbeddedBroker, TopicSpec};
use crate::registry::RegistryBuilder;
use crate::worker::config::WorkerConfig;
use crate::worker::metrics::Metrics;
use crate::worker::reload::Models;
use crate::worker::{Started, Summary};

/// Partitions of topics the embedded broker creates for a worker config.
pub fn embedded_topics(cfg: &WorkerConfig) -> Vec<TopicSpec> {
    let mut topics: Vec<TopicSpec> = cfg
        .input_topics
        .iter()
        .map(|t| TopicSpec {
            name: t.clone(),
            partitions: 8,
        })
        .collect();
    for t in [
        &cfg.predictions.topic,
        &cfg.signals.topic,
        &cfg.shadow.topic,
    ] {
        topics.push(TopicSpec {
            name: t.clone(),
            partitions: 8,
        });
    }
    topics.push(TopicSpec {
        name: cfg.dead_letters.clone(),
        partitions: 1,
    });
    topics
}

/// Opens the audit store and the registry, starts the embedded broker if
/// `kafka.brokers` is `embedded`, and runs the worker until `stop` is set.
/// `kinds`: the model kinds and registry options (an audit store is added).
pub fn serve(
    cfg: Arc<WorkerConfig>,
    kinds: RegistryBuilder,
    stop: Arc<AtomicBool>,
    on_start: impl FnOnce(&Started),
) -> Result<Summary> {
    if let Some(dir) = cfg.audit_db.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the audit store's folder {}", dir.display()))?;
    }
    let metrics = Arc::new(Metrics::default());
    let audit = Arc::new(AuditStore::open(&cfg.audit_db, &default_worker_id())?);
    // the chain head, where the database's editor cannot rewrite it
    let m = metrics.clone();
    audit.on_head(Box::new(move |head| m.set_audit_head(head.id, &head.mac)));
    let kinds = kinds.audit(Some(audit));
    let registry = Arc::new(kinds.clone().open(&cfg.registry)?);
    // a wrong pin is a deployment mistake: refuse to start rather than
    // report ready and dead-letter the model's events (`optional: true`
    // serves without it)
    let wrong = registry.pin_mismatches();
    if !wrong.is_empty() {
        anyhow::bail!(
            "{}: {}; not starting (fix the pin or the file, or mark the model `optional: true`)",
            cfg.registry.display(),
            wrong
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let broker = if cfg.embedded() {
        let b = EmbeddedBroker::start(1, &embedded_topics(&cfg))?;
        tracing::info!(bootstrap = %b.bootstrap_servers(), "embedded broker started");
        Some(b)
    } else {
        None
    };
    let brokers = broker
        .as_ref()
        .map_or_else(|| cfg.brokers.clone(), |b| b.bootstrap_servers());
    let models = Models::reloadable(registry, cfg.registry.clone(), kinds, metrics.clone());
    let summary = crate::worker::run(cfg, &brokers, models.clone(), metrics, stop, |s| {
        on_start(&s)
    })?;
    // the registry served last, once its batches are done: every model's
    // `unload` row
    if let Some(mut r) = Arc::into_inner(models).and_then(|m| Arc::into_inner(m.into_current())) {
        r.unload_all();
    }
    drop(broker);
    Ok(summary)
}
