//! The `ml-worker` command line, as a library function: `src/main.rs` runs
//! it with the built-in model kinds, and a program built on the library
//! runs it with its own kinds added ([`main`], `examples/custom_model.rs`):
//! every command (`run`, `predict`, `models`, ...) then serves them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::audit::{default_worker_id, AuditOptions, AuditStore, Head};
use crate::checksum::sha256_file;
use crate::input::read_rows;
use crate::model::{onnx, Batch, ImportanceType, Prediction, TaskType};
use crate::registry::{RegistryBuilder, RegistryOptions};
use crate::text::escape;
use crate::worker::config::{load_worker_config, Overrides};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Parser)]
#[command(
    name = "ml-worker",
    version,
    about = "Serve trained ML models on a Kafka stream"
)]
struct Cli {
    /// ONNX Runtime shared library (overrides the default search; ORT_DYLIB_PATH overrides this).
    #[arg(long, global = true, value_name = "PATH")]
    onnxruntime: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect and verify the registered models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Predict offline from a CSV or JSON-lines feature file; prints JSON lines.
    Predict {
        /// Registered model name.
        #[arg(long)]
        model: String,
        /// CSV with a header of feature names, or JSON lines (.jsonl) of {"feature": value}.
        #[arg(long)]
        input: PathBuf,
        #[command(flatten)]
        stores: Stores,
    },
    /// The streaming worker: consume feature events, infer, publish predictions and signals.
    Run {
        /// Worker configuration.
        #[arg(long, default_value = "config/worker.yaml")]
        config: PathBuf,
        /// Override `kafka.brokers` (`host:port,...` or `embedded`).
        #[arg(long)]
        brokers: Option<String>,
        /// Override `kafka.group_id`.
        #[arg(long)]
        group: Option<String>,
        /// Override the model registry file.
        #[arg(long)]
        registry: Option<PathBuf>,
    },
    /// Everything in one process: embedded broker, the worker on the shipped models, sample traffic, a summary.
    Demo {
        #[arg(long, default_value = "config/worker.yaml")]
        config: PathBuf,
        /// Feature events to send.
        #[arg(long, default_value_t = 60_000)]
        events: u64,
        /// Events per second.
        #[arg(long, default_value_t = 20_000.0)]
        rate: f64,
        /// One event in this many is poison (0: none).
        #[arg(long, default_value_t = 2_000)]
        poison_every: u64,
        #[arg(long, default_value = "models/samples")]
        samples: PathBuf,
    },
    /// Benchmark: throughput and latency of the worker, each against a pass-through floor in the same run.
    Bench {
        /// Worker configuration (batching, delivery; brokers and topics are the bench's own).
        #[arg(long, default_value = "config/worker.yaml")]
        config: PathBuf,
        /// Run against this cluster (`host:port,...`; topics are created and
        /// deleted, replication 1) instead of the embedded broker.
        #[arg(long)]
        brokers: Option<String>,
        /// Events per throughput run.
        #[arg(long, default_value_t = 300_000)]
        events: u64,
        /// Throughput rounds (baseline and worker alternate; medians reported).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1000))]
        rounds: u64,
        /// Latency rounds: a pass-through floor phase and a worker phase each.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
        latency_rounds: u64,
        /// Events written before a latency phase's consumer starts (not timed).
        #[arg(long, default_value_t = 100_000)]
        backlog: u64,
        /// Events/s offered in a latency phase (timed).
        #[arg(long, default_value_t = 20_000.0)]
        rate: f64,
        /// How long a latency phase offers events at --rate, seconds.
        #[arg(long, default_value_t = 10.0)]
        latency_secs: f64,
        /// Model the events are for.
        #[arg(long, default_value = "diabetes_lgbm")]
        model: String,
        /// Sample rows of the shipped models.
        #[arg(long, default_value = "models/samples")]
        samples: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Instead of the benchmark: offer events at --rate for this long
        /// (e.g. 10m) and print throughput, p50/p99/p999 latency and RSS
        /// every 10 s.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        soak: Option<std::time::Duration>,
        /// With --soak: give the model a new version and reload the
        /// registry this often (e.g. 1s), to see what reloads cost.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION", requires = "soak")]
        reload_every: Option<std::time::Duration>,
        /// Instead of the benchmark: exactly-once's throughput against
        /// at-least-once's on a Kafka cluster (--brokers), --events per
        /// mode and round, the config's commit_interval_ms.
        #[arg(long, requires = "brokers", conflicts_with = "soak")]
        delivery_modes: bool,
    },
    /// Send synthetic feature events for the registered models to the input
    /// topic of a config (its wire format and cluster), at a steady rate.
    Produce {
        #[arg(long, default_value = "config/worker.yaml")]
        config: PathBuf,
        /// Override `kafka.brokers` (needed when the config says `embedded`).
        #[arg(long)]
        brokers: Option<String>,
        /// Events per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// How long to send (e.g. 30s, 10m).
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        duration: Option<std::time::Duration>,
        /// How many events to send (with --duration: whichever comes first).
        #[arg(long)]
        events: Option<u64>,
        /// Only this registered model's events (default: every model in turn).
        #[arg(long)]
        model: Option<String>,
        /// Sample rows per model (`<model>.csv`); others get random values.
        #[arg(long, value_name = "DIR")]
        samples: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to the input topic they came from (after a
    /// fix), with their original key, value and headers.
    ReplayDlq {
        #[arg(long, default_value = "config/worker.yaml")]
        config: PathBuf,
        /// Override `kafka.brokers` (needed when the config says `embedded`).
        #[arg(long)]
        brokers: Option<String>,
        /// Only dead letters refused at this stage: decode, route, validate, inference, publish.
        #[arg(long)]
        stage: Option<String>,
        /// Only dead letters written since then: an RFC 3339 time
        /// (2026-12-03T08:00:00Z) or a duration ago (2h). Default: those not
        /// replayed before by this config's group.
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Say what would be sent; send nothing, remember nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run an embedded Kafka broker (librdkafka's mock cluster) until stopped.
    Broker {
        /// Topics to create, `name:partitions,...`.
        #[arg(long, default_value = crate::broker::DEFAULT_TOPICS)]
        topics: String,
        /// Number of brokers in the cluster.
        #[arg(long, default_value_t = 1)]
        brokers: i32,
        /// Also write the bootstrap address to this file (for scripts).
        #[arg(long, value_name = "PATH")]
        address_file: Option<PathBuf>,
        /// Largest record batch accepted, in bytes; larger ones are refused
        /// with "message size too large" (the broker keeps about 5 MB a partition).
        #[arg(long, default_value_t = crate::broker::DEFAULT_MAX_MESSAGE_BYTES as u64,
              value_parser = clap::value_parser!(u64).range(1024..=4_194_304))]
        max_message_bytes: u64,
    },
    /// Inspect and verify the audit store.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

/// Where a command finds the registry and the audit store: given, or the
/// ones a worker configuration names (as `run` resolves them, relative to
/// the configuration's folder), or the defaults.
#[derive(clap::Args, Clone)]
struct Stores {
    /// models.yaml (default: the --config worker file's `registry`, else
    /// config/models.yaml).
    #[arg(long)]
    registry: Option<PathBuf>,
    /// The audit store loads are recorded in (default: the --config worker
    /// file's `audit_db`, else data/audit.db).
    #[arg(long, env = "ML_WORKER_AUDIT_DB")]
    audit_db: Option<PathBuf>,
    /// A worker configuration (worker.yaml) whose registry and audit store
    /// to use, the ones `ml-worker run --config` uses.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl Stores {
    /// The registry file alone (no audit store).
    fn registry_only(&self) -> Result<PathBuf> {
        Ok(match (&self.registry, &self.config) {
            (Some(r), _) => r.clone(),
            (None, Some(c)) => load_worker_config(c, &Overrides::default())?.registry,
            (None, None) => PathBuf::from("config/models.yaml"),
        })
    }

    /// The registry file and the audit store, the latter named on stderr.
    fn resolve(&self) -> Result<(PathBuf, PathBuf)> {
        let cfg = match &self.config {
            Some(c) => Some(load_worker_config(c, &Overrides::default())?),
            None => None,
        };
        let registry = self.registry.clone().unwrap_or_else(|| {
            cfg.as_ref().map_or_else(
                || PathBuf::from("config/models.yaml"),
                |c| c.registry.clone(),
            )
        });
        let audit_db = audit_store(self.audit_db.clone(), cfg.as_ref());
        Ok((registry, audit_db))
    }
}

/// The audit store: given, or the worker configuration's, or data/audit.db;
/// said on stderr, so two commands that disagree show it.
fn audit_store(
    given: Option<PathBuf>,
    cfg: Option<&crate::worker::config::WorkerConfig>,
) -> PathBuf {
    let db = given.unwrap_or_else(|| {
        cfg.map_or_else(|| PathBuf::from("data/audit.db"), |c| c.audit_db.clone())
    });
    let shown = std::fs::canonicalize(&db).unwrap_or_else(|_| db.clone());
    eprintln!(
        "ml-worker: audit store {}",
        escape(&shown.display().to_string())
    );
    db
}

/// [`audit_store`] for the audit commands' `--db` / `--config`.
fn audit_db_of(db: Option<PathBuf>, config: Option<&Path>) -> Result<PathBuf> {
    let cfg = match config {
        Some(c) => Some(load_worker_config(c, &Overrides::default())?),
        None => None,
    };
    Ok(audit_store(db, cfg.as_ref()))
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// One model in detail: kind, version, sha256, features, task, classes,
    /// trees, missing-value policy and feature importance (gain and split,
    /// where the format records them). Loads the model (audited).
    Info {
        /// Registered model name.
        name: String,
        #[command(flatten)]
        stores: Stores,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// One line per model: name, version, kind, sha256, status (loads nothing).
    List {
        #[command(flatten)]
        stores: Stores,
    },
    /// Load and verify every model (lazy ones too); exit non-zero if any fails.
    Verify {
        #[command(flatten)]
        stores: Stores,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Print audit rows, oldest first.
    Show {
        /// The audit store (default: the --config worker file's `audit_db`,
        /// else data/audit.db).
        #[arg(long, env = "ML_WORKER_AUDIT_DB")]
        db: Option<PathBuf>,
        /// A worker configuration whose audit store to read.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Only this model's rows.
        #[arg(long)]
        model: Option<String>,
        /// Only the newest N rows.
        #[arg(long)]
        limit: Option<usize>,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Re-check the keyed hash chain and the schema; exit non-zero if any
    /// row was edited, removed or forged, or the store was altered. The key
    /// comes from ML_WORKER_AUDIT_KEY, ML_WORKER_AUDIT_KEY_FILE or <db>.key.
    Verify {
        /// The audit store (default: the --config worker file's `audit_db`,
        /// else data/audit.db).
        #[arg(long, env = "ML_WORKER_AUDIT_DB")]
        db: Option<PathBuf>,
        /// A worker configuration whose audit store to read.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Anchor file the chain head was appended to; the store must reach its last head.
        #[arg(long, env = "ML_WORKER_AUDIT_ANCHOR", value_name = "FILE")]
        anchor: Option<PathBuf>,
        /// A chain head seen elsewhere (the log's audit_head, the
        /// ml_worker_audit_head metric), as ID:MAC; the store must contain it.
        #[arg(long, value_name = "ID:MAC")]
        head: Option<String>,
    },
}

/// Runs the command line (`std::env::args`) with the model kinds of
/// `kinds` (its options are set per command) and exits.
pub fn main(kinds: RegistryBuilder) -> ! {
    // a torch model's own process (see src/model/torch/host.rs): before
    // anything else, it speaks frames on stdin/stdout, not a command line
    #[cfg(feature = "torch")]
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == crate::model::torch::host::HOST_COMMAND)
    {
        crate::model::torch::host::serve();
    }
    let cli = Cli::parse();
    // `run` logs as its config says (or as --log-json says)
    if !matches!(cli.command, Command::Run { .. }) {
        init_logging(cli.log_json);
    }
    let code: u8 = match run(cli, &kinds) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", escape(&chain_message(&e)));
            2
        }
    };
    // without waiting on (or tearing libraries down under) model code
    // abandoned at a deadline
    crate::deadline::exit(code.into())
}

/// The error and its causes, `: `-joined, leaving out a cause whose text the
/// message already ends with (many errors here name their cause themselves).
fn chain_message(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ML_WORKER_LOG")
        .unwrap_or_else(|_| "warn".into());
    // control characters in log fields (from model files, events) escaped
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(|| crate::text::SafeWriter(std::io::stderr()));
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn run(cli: Cli, kinds: &RegistryBuilder) -> Result<u8> {
    let onnx = onnx::RuntimeConfig {
        library: cli.onnxruntime.clone(),
    };
    // the registry for a command: these kinds, these options
    let kinds = |options: RegistryOptions| {
        kinds.clone().options(RegistryOptions {
            onnx: onnx.clone(),
            ..options
        })
    };
    match cli.command {
        Command::Models {
            command: ModelsCommand::Info { name, stores, json },
        } => {
            let (registry, audit_db) = stores.resolve()?;
            models_info(
                &name,
                &registry,
                &audit_db,
                json,
                kinds(RegistryOptions {
                    load_none: true,
                    ..Default::default()
                }),
            )
        }
        Command::Models {
            command: ModelsCommand::List { stores },
        } => models_list(
            &stores.registry_only()?,
            kinds(RegistryOptions {
                load_none: true,
                ..Default::default()
            }),
        ),
        Command::Models {
            command: ModelsCommand::Verify { stores },
        } => {
            let (registry, audit_db) = stores.resolve()?;
            models_verify(
                &registry,
                &audit_db,
                kinds(RegistryOptions {
                    load_all: true,
                    ..Default::default()
                }),
            )
        }
        Command::Predict {
            model,
            input,
            stores,
        } => {
            let (registry, audit_db) = stores.resolve()?;
            predict(
                &model,
                &input,
                &registry,
                &audit_db,
                kinds(RegistryOptions {
                    load_none: true,
                    ..Default::default()
                }),
            )
        }
        Command::Audit {
            command:
                AuditCommand::Show {
                    db,
                    config,
                    model,
                    limit,
                    json,
                },
        } => audit_show(
            &audit_db_of(db, config.as_deref())?,
            model.as_deref(),
            limit,
            json,
        ),
        Command::Run {
            config,
            brokers,
            group,
            registry,
        } => {
            let overrides = Overrides {
                brokers,
                group_id: group,
                registry,
            };
            run_worker(
                &config,
                &overrides,
                kinds(RegistryOptions::default()),
                cli.log_json,
            )
        }
        Command::Demo {
            config,
            events,
            rate,
            poison_every,
            samples,
        } => {
            if rate.is_nan() || rate <= 0.0 || events == 0 {
                bail!("--rate must be positive and --events at least 1");
            }
            let cfg = load_worker_config(&config, &Overrides::default())?;
            let opts = crate::demo::DemoOptions {
                events,
                rate,
                samples,
                poison_every,
            };
            crate::demo::run(&cfg, &opts, kinds(RegistryOptions::default()))?;
            Ok(0)
        }
        Command::Bench {
            config,
            brokers,
            events,
            rounds,
            latency_rounds,
            backlog,
            rate,
            latency_secs,
            model,
            samples,
            json,
            soak,
            reload_every,
            delivery_modes,
        } => {
            let ok = rate > 0.0 && rate.is_finite() && latency_secs > 0.0 && latency_secs <= 3600.0;
            if !ok {
                bail!("--rate must be positive and --latency-secs within 0..=3600");
            }
            if events == 0 {
                bail!("--events must be at least 1");
            }
            let cfg = load_worker_config(&config, &Overrides::default())?;
            let opts = crate::bench::BenchOptions {
                events,
                rate,
                latency_for: std::time::Duration::from_secs_f64(latency_secs),
                backlog,
                latency_rounds: latency_rounds as usize,
                brokers,
                model,
                rounds: rounds as usize,
                samples,
            };
            if delivery_modes {
                let r =
                    crate::bench::delivery_modes(&cfg, &opts, kinds(RegistryOptions::default()))?;
                print_report(&r, json)?;
                return Ok(0);
            }
            if let Some(duration) = soak {
                let r = crate::bench::soak(
                    &cfg,
                    &opts,
                    duration,
                    reload_every,
                    kinds(RegistryOptions::default()),
                    |w| {
                        if !json {
                            println!("{w}");
                        }
                    },
                )?;
                print_report(&r, json)?;
                return Ok(0);
            }
            let r = crate::bench::run(&cfg, &opts, onnx.clone())?;
            print_report(&r, json)?;
            Ok(0)
        }
        Command::Produce {
            config,
            brokers,
            rate,
            duration,
            events,
            model,
            samples,
            json,
        } => {
            let cfg = load_worker_config(&config, &Overrides::default())?;
            let brokers = cluster_of(&cfg, brokers)?;
            if let Some(dir) = &samples {
                crate::ops::check_samples(dir)?;
            }
            let specs = crate::config::load_registry_file_with(
                &cfg.registry,
                &kinds(RegistryOptions::default()).loaders(),
            )?;
            let opts = crate::ops::ProduceOptions {
                rate,
                duration,
                events,
                model,
                samples,
            };
            let done = crate::ops::produce(&cfg, &brokers, &specs, &opts)?;
            print_report(&done, json)?;
            Ok(0)
        }
        Command::ReplayDlq {
            config,
            brokers,
            stage,
            since,
            dry_run,
            json,
        } => {
            let cfg = load_worker_config(&config, &Overrides::default())?;
            let brokers = cluster_of(&cfg, brokers)?;
            let since = since.as_deref().map(parse_since).transpose()?;
            let opts = crate::ops::ReplayOptions {
                stage,
                since,
                dry_run,
            };
            let done = crate::ops::replay_dead_letters(&cfg, &brokers, &opts)?;
            print_report(&done, json)?;
            Ok(0)
        }
        Command::Broker {
            topics,
            brokers,
            address_file,
            max_message_bytes,
        } => run_broker(
            &topics,
            brokers,
            address_file.as_deref(),
            max_message_bytes as usize,
        ),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    db,
                    config,
                    anchor,
                    head,
                },
        } => audit_verify(
            &audit_db_of(db, config.as_deref())?,
            anchor,
            head.as_deref(),
        ),
    }
}

/// The cluster an operator command talks to: `--brokers`, else the
/// config's (`embedded` lives inside a worker process: not reachable).
fn cluster_of(
    cfg: &crate::worker::config::WorkerConfig,
    brokers: Option<String>,
) -> Result<String> {
    let b = brokers.unwrap_or_else(|| cfg.brokers.clone());
    if b == "embedded" {
        bail!("the config's kafka.brokers is 'embedded' (a broker inside a worker process); give --brokers host:port");
    }
    Ok(b)
}

/// `--since`: an RFC 3339 time, or a duration ago.
fn parse_since(s: &str) -> Result<std::time::SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    match humantime::parse_duration(s) {
        Ok(d) => std::time::SystemTime::now()
            .checked_sub(d)
            .filter(|t| *t >= std::time::UNIX_EPOCH)
            .ok_or_else(|| anyhow::anyhow!("--since '{s}' reaches before 1970")),
        Err(_) => bail!(
            "--since '{s}': neither an RFC 3339 time (2026-12-03T08:00:00Z) nor a duration (2h)"
        ),
    }
}

fn run_broker(
    topics: &str,
    brokers: i32,
    address_file: Option<&Path>,
    max_message_bytes: usize,
) -> Result<u8> {
    let topics =
        crate::broker::parse_topics(topics).map_err(|e| anyhow::anyhow!("--topics: {e}"))?;
    let broker = crate::broker::EmbeddedBroker::start_with(brokers, &topics, max_message_bytes)?;
    let address = broker.bootstrap_servers();
    if let Some(path) = address_file {
        // write-then-rename, so a reader never sees a partial address
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{address}\n"))
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    let names: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    println!(
        "embedded broker: bootstrap.servers={address} topics={}",
        names.join(",")
    );
    println!(
        "for demos and tests: each partition keeps about 5 MB (older records are dropped, read or not); \
         record batches over {max_message_bytes} bytes are refused"
    );
    println!("stop with Ctrl-C or SIGTERM");
    std::io::stdout().flush()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(shutdown_signal())?;
    eprintln!("embedded broker: stopping");
    drop(broker);
    Ok(0)
}

fn run_worker(
    config: &Path,
    overrides: &Overrides,
    kinds: RegistryBuilder,
    log_json: bool,
) -> Result<u8> {
    let cfg = load_worker_config(config, overrides)?;
    init_logging(log_json || cfg.log_json);
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signal(stop.clone(), cfg.shutdown_timeout + Duration::from_secs(5))?;
    let summary = crate::service::serve(Arc::new(cfg), kinds, stop, |started| {
        tracing::info!(metrics = %started.metrics_address, brokers = %started.brokers, "ready for events");
        eprintln!(
            "ml-worker: consuming from {} (metrics on http://{}/metrics)",
            started.brokers, started.metrics_address
        );
    })?;
    eprintln!(
        "ml-worker: stopped: {} events in, {} outputs acknowledged, {} dead letters{}",
        summary.events_in,
        summary.outputs_acked,
        summary.dead_letters,
        if summary.clean {
            String::new()
        } else {
            format!(
                "; {} events left uncommitted (read again on restart)",
                summary.in_flight_at_exit
            )
        }
    );
    Ok(0)
}

/// Sets `stop` on the first SIGINT/SIGTERM; a second one exits at once
/// (nothing is lost: uncommitted events are read again on restart), and so
/// does the first one's `grace` running out (the drain deadline plus the
/// final commit and leaving the group: a broker that does not answer must
/// not hold the exit). SIGHUP reloads the model registry (see
/// [`crate::worker::reload`]); its default action would kill the worker
/// without a drain. The handlers are in place when this returns.
fn stop_on_signal(stop: Arc<AtomicBool>, grace: Duration) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int, mut hup) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                let mut stops = 0;
                let overdue = tokio::time::sleep(Duration::MAX);
                tokio::pin!(overdue);
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                        _ = hup.recv() => {
                            eprintln!("ml-worker: SIGHUP: reloading the model registry");
                            crate::worker::reload::SIGHUPS.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        _ = &mut overdue, if stops > 0 => {
                            eprintln!(
                                "ml-worker: still stopping {grace:?} after the signal (shutdown_timeout_ms + 5 s); exiting now, uncommitted events are read again on restart"
                            );
                            crate::deadline::exit_now(1);
                        }
                    }
                    stops += 1;
                    if stops == 1 {
                        eprintln!(
                            "ml-worker: stopping (draining in-flight events; signal again to exit now)"
                        );
                        stop.store(true, Ordering::Relaxed);
                        overdue
                            .as_mut()
                            .reset(tokio::time::Instant::now() + grace);
                    } else {
                        eprintln!(
                            "ml-worker: exiting now; uncommitted events are read again on restart"
                        );
                        crate::deadline::exit_now(130);
                    }
                }
            })
        })?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM; SIGHUP is ignored (as by the worker).
async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => return r,
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => eprintln!("SIGHUP ignored; stop with Ctrl-C or SIGTERM"),
        }
    }
}

fn open_audit(path: &Path) -> Result<Arc<AuditStore>> {
    Ok(Arc::new(AuditStore::open(path, &default_worker_id())?))
}

fn models_list(registry: &Path, kinds: RegistryBuilder) -> Result<u8> {
    let reg = kinds.open(registry)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<24} {:<14} {:<9} {:<64} STATUS",
        "NAME", "VERSION", "KIND", "SHA256"
    )?;
    for name in reg.names() {
        let spec = reg.spec(name).context("registry lost a model")?;
        let (sha, status) = match sha256_file(&spec.path) {
            Ok(sha) => {
                let status = match &spec.sha256 {
                    Some(p) if *p != sha => "checksum mismatch".to_string(),
                    Some(_) => "pinned".to_string(),
                    None => "unpinned".to_string(),
                };
                (sha, status)
            }
            Err(e) => (
                String::from("-"),
                format!("unreadable: {}", escape(&e.to_string())),
            ),
        };
        let version = spec
            .version
            .clone()
            .unwrap_or_else(|| sha.chars().take(12).collect());
        let lazy = if spec.lazy { ", lazy" } else { "" };
        writeln!(
            out,
            "{:<24} {:<14} {:<9} {:<64} {status}{lazy}",
            escape(name),
            escape(&version),
            escape(&spec.kind),
            sha
        )?;
    }
    Ok(0)
}

/// `models info NAME`: everything known about one loaded model.
fn models_info(
    name: &str,
    registry: &Path,
    audit_db: &Path,
    json: bool,
    kinds: RegistryBuilder,
) -> Result<u8> {
    let audit = open_audit(audit_db)?;
    let mut reg = kinds.audit(Some(audit)).open(registry)?;
    let served = reg.get(name)?;
    let m = served.model;
    let i = m.info();
    let gain = m.feature_importance(ImportanceType::Gain);
    let split = m.feature_importance(ImportanceType::Split);
    let description = reg.spec(&i.name).and_then(|s| s.description.clone());
    let doc = serde_json::json!({
        "name": i.name,
        "served_for": served.fallback_for,
        "kind": i.kind,
        "version": i.version,
        "sha256": i.sha256,
        "path": i.path,
        "description": description,
        "task_type": i.task_type,
        "target": i.target,
        "n_outputs": i.n_outputs,
        "n_classes": i.n_classes,
        "trees": m.n_trees(),
        "missing": i.missing,
        "detail": i.detail,
        "load_time_us": i.load_time.as_micros() as u64,
        "features": i.features,
        "importance": match (&gain, &split) {
            (None, None) => serde_json::Value::Null,
            _ => serde_json::json!({"gain": gain, "split": split}),
        },
    });
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{doc}")?;
        reg.unload_all();
        return Ok(0);
    }
    if let Some(orig) = &served.fallback_for {
        writeln!(
            out,
            "(model '{}' is unavailable; this is its fallback)",
            escape(orig)
        )?;
    }
    let line = |out: &mut dyn Write, k: &str, v: &str| writeln!(out, "{k:<12} {}", escape(v));
    line(&mut out, "name", &i.name)?;
    line(&mut out, "kind", &i.kind)?;
    line(&mut out, "version", &i.version)?;
    line(&mut out, "sha256", &i.sha256)?;
    line(&mut out, "path", &i.path.display().to_string())?;
    if let Some(d) = &description {
        line(&mut out, "description", d)?;
    }
    line(
        &mut out,
        "task",
        &format!("{} (target '{}')", i.task_type, i.target),
    )?;
    match i.n_classes {
        Some(k) => line(&mut out, "classes", &k.to_string())?,
        None => line(&mut out, "outputs", &format!("{} per row", i.n_outputs))?,
    }
    if let Some(t) = m.n_trees() {
        line(&mut out, "trees", &t.to_string())?;
    }
    line(&mut out, "missing", &i.missing.to_string())?;
    line(&mut out, "detail", &i.detail)?;
    line(
        &mut out,
        "load time",
        &format!("{:.1} ms", i.load_time.as_secs_f64() * 1e3),
    )?;
    writeln!(out, "features     {}", i.features.len())?;
    // by gain (the format's order where there is none)
    let mut order: Vec<usize> = (0..i.features.len()).collect();
    if let Some(g) = &gain {
        order.sort_by(|&a, &b| g[b].total_cmp(&g[a]).then(a.cmp(&b)));
    }
    let cell = |v: &Option<Vec<f64>>, j: usize, digits: usize| {
        v.as_ref()
            .map_or("-".to_string(), |v| format!("{:.digits$}", v[j]))
    };
    writeln!(
        out,
        "  {:>5}  {:<32} {:>18} {:>10}",
        "#", "FEATURE", "GAIN", "SPLITS"
    )?;
    for j in order {
        writeln!(
            out,
            "  {:>5}  {:<32} {:>18} {:>10}",
            j,
            escape(&i.features[j]),
            cell(&gain, j, 6),
            cell(&split, j, 0)
        )?;
    }
    if gain.is_none() && split.is_none() {
        writeln!(
            out,
            "(the {} format records no feature importance)",
            escape(&i.kind)
        )?;
    }
    reg.unload_all();
    Ok(0)
}

fn models_verify(registry: &Path, audit_db: &Path, kinds: RegistryBuilder) -> Result<u8> {
    let audit = open_audit(audit_db)?;
    let mut reg = kinds.audit(Some(audit)).open(registry)?;
    let mut failed = 0;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<24} {:<14} {:<9} {:<64} STATUS",
        "NAME", "VERSION", "KIND", "SHA256"
    )?;
    for name in reg.names().to_vec() {
        let spec = reg.spec(&name).context("registry lost a model")?.clone();
        match reg.loaded(&name) {
            Some(m) => {
                let i = m.info();
                writeln!(
                    out,
                    "{:<24} {:<14} {:<9} {:<64} ok: {}",
                    escape(&name),
                    escape(&i.version),
                    escape(&i.kind),
                    i.sha256,
                    escape(&i.detail)
                )?;
            }
            None => {
                failed += 1;
                let reason = match (reg.get(&name), reg.failure(&name)) {
                    (Err(e), _) => e.to_string(),
                    (Ok(s), why) => format!(
                        "{} (served by fallback '{}')",
                        why.map_or("not loaded".to_string(), |e| e.to_string()),
                        s.model.info().name
                    ),
                };
                writeln!(
                    out,
                    "{:<24} {:<14} {:<9} {:<64} FAILED: {}",
                    escape(&name),
                    "-",
                    escape(&spec.kind),
                    "-",
                    escape(&reason)
                )?;
            }
        }
    }
    reg.unload_all();
    Ok(if failed == 0 { 0 } else { 1 })
}

fn predict(
    model: &str,
    input: &Path,
    registry: &Path,
    audit_db: &Path,
    kinds: RegistryBuilder,
) -> Result<u8> {
    let audit = open_audit(audit_db)?;
    let mut reg = kinds.audit(Some(audit)).open(registry)?;
    let served = reg.get(model)?;
    let m = served.model;
    let info = m.info();
    if let Some(orig) = &served.fallback_for {
        eprintln!(
            "warning: model '{}' is unavailable; predicting with its fallback '{}'",
            escape(orig),
            escape(&info.name)
        );
    }
    let mut rows = read_rows(input, &info.features)?;
    let n_rows = Batch::new(&rows.data, rows.n_features)?.n_rows();
    // the model's missing-value policy, row by row, as the worker applies
    // it: a refused row gets its reason, the others their prediction
    let mut refused = std::collections::HashMap::new();
    for (i, row) in rows
        .data
        .chunks_exact_mut(rows.n_features.max(1))
        .enumerate()
    {
        if let Some(why) = m.missing_problem(row) {
            refused.insert(i, why);
            row.fill(0.0);
        }
    }
    let timeout = reg
        .spec(&info.name)
        .map_or(crate::config::DEFAULT_INFERENCE_TIMEOUT, |s| {
            s.limits.inference_timeout
        });
    let model = m.clone();
    let pred = crate::deadline::run("predict", timeout, move || {
        model.predict_full(Batch::new(&rows.data, rows.n_features)?)
    })
    .map_err(|e| match e {
        crate::deadline::Overrun::TimedOut(_) => anyhow::anyhow!(
            "model '{}': inference {e} (inference_timeout_ms)",
            info.name
        ),
        _ => anyhow::anyhow!("model '{}': inference {e}", info.name),
    })?
    .with_context(|| format!("model '{}'", info.name))?;
    let written = write_predictions(&pred, info.task_type, n_rows, &refused);
    reg.unload_all();
    match written {
        // a reader that stops early (`| head`) is not an error
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(e.into()),
        Ok(0) => Ok(0),
        Ok(failed) => {
            eprintln!(
                "error: {failed} of {} row(s) have no prediction (see their \"error\")",
                n_rows
            );
            Ok(1)
        }
    }
}

/// One JSON line per row on stdout: its prediction, or `error` when the
/// row was refused (`refused`: a missing value the model does not take) or
/// the model's output for it is not finite. Returns the number of such rows.
fn write_predictions(
    pred: &Prediction,
    task: TaskType,
    n_rows: usize,
    refused: &std::collections::HashMap<usize, String>,
) -> std::io::Result<usize> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut failed = 0;
    for i in 0..n_rows {
        if let Some(why) = refused.get(&i).cloned().or_else(|| pred.row_problem(i)) {
            failed += 1;
            writeln!(out, "{}", serde_json::json!({"row": i, "error": why}))?;
            continue;
        }
        let values = pred.values.row(i);
        let prediction = match (task, values) {
            (TaskType::Classification, [c]) => serde_json::json!(*c as i64),
            (_, [v]) => json_number(*v),
            (_, vs) => serde_json::Value::Array(vs.iter().map(|v| json_number(*v)).collect()),
        };
        let mut line = serde_json::json!({"row": i, "prediction": prediction});
        if let Some(p) = &pred.probabilities {
            line["probabilities"] =
                serde_json::Value::Array(p.row(i).iter().map(|v| json_number(*v)).collect());
        }
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(failed)
}

/// A JSON number, or null for NaN/infinity (which JSON cannot carry).
fn json_number(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

fn audit_show(db: &Path, model: Option<&str>, limit: Option<usize>, json: bool) -> Result<u8> {
    if !db.exists() {
        bail!("audit store {} does not exist", db.display());
    }
    let store = AuditStore::inspect(db, &AuditOptions::from_env())?;
    let mut out = std::io::stdout().lock();
    for r in store.rows(model, limit)? {
        if json {
            writeln!(out, "{}", serde_json::to_string(&r)?)?;
        } else {
            writeln!(
                out,
                "{:>5} {} {:<8} {:<20} {:<14} {:<9} {} {} {}",
                r.id,
                escape(&r.ts),
                escape(&r.event),
                escape(&r.model),
                escape(&r.version),
                escape(&r.kind),
                escape(&r.sha256.chars().take(16).collect::<String>()),
                escape(&r.worker_id),
                escape(&r.detail)
            )?;
        }
    }
    Ok(0)
}

fn audit_verify(db: &Path, anchor: Option<PathBuf>, head: Option<&str>) -> Result<u8> {
    if !db.exists() {
        bail!("audit store {} does not exist", db.display());
    }
    let options = AuditOptions {
        anchor_file: anchor,
        ..AuditOptions::from_env()
    };
    let store = AuditStore::inspect(db, &options)?;
    let head: Option<Head> = head
        .map(|h| {
            h.parse()
                .map_err(|e: String| anyhow::anyhow!("--head: {e}"))
        })
        .transpose()?;
    let anchored = store.anchored_head()?.is_some();
    let report = store.verify_with(head.as_slice())?;
    let head_text = report
        .head
        .as_ref()
        .map_or_else(|| "none".to_string(), |h| h.to_string());
    if report.ok() {
        let checked = if head.is_none() && !anchored {
            ", no anchor given (compare the head with the log or ml_worker_audit_head)"
        } else {
            ", reaches its anchor"
        };
        let legacy = if report.unkeyed_rows > 0 {
            format!(
                "; rows 1..={} predate the keyed chain (hash-chained only)",
                report.unkeyed_rows
            )
        } else {
            String::new()
        };
        println!(
            "ok: {} rows, keyed hash chain intact, head {head_text}{checked}{legacy}",
            report.rows
        );
        Ok(0)
    } else {
        println!(
            "FAILED: {} rows checked (head {head_text}), {} problem(s):",
            report.rows,
            report.problems.len()
        );
        for p in &report.problems {
            println!("  {}", crate::text::escape(p));
        }
        Ok(1)
    }
}

/// A command's report on stdout: one JSON line with `--json`, else its
/// human-readable form.
fn print_report<T: serde::Serialize + std::fmt::Display>(report: &T, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
