//! `config/worker.yaml`: parsed raw (`deny_unknown_fields` everywhere), then
//! validated into [`WorkerConfig`] with no I/O. Relative paths resolve
//! against the file's folder. Errors name the file and the dotted field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::events::WireFormat;

/// `brokers` value that starts the embedded broker in-process.
pub const EMBEDDED: &str = "embedded";

/// librdkafka properties the worker sets itself; a pass-through may not
/// override them.
const MANAGED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set 'kafka.brokers'"),
    ("group.id", "set 'kafka.group_id'"),
    (
        "enable.auto.commit",
        "offsets are committed only after outputs are acknowledged",
    ),
    (
        "enable.auto.offset.store",
        "offsets are stored only after outputs are acknowledged",
    ),
    (
        "partition.assignment.strategy",
        "set 'kafka.group_protocol' (classic uses cooperative-sticky)",
    ),
    (
        "enable.idempotence",
        "outputs must be written once and in order (the producer is idempotent)",
    ),
    (
        "acks",
        "an output counts as delivered only once all in-sync replicas have it",
    ),
    ("group.protocol", "set 'kafka.group_protocol'"),
    (
        "transactional.id",
        "set 'delivery.transactional_id' (with 'delivery.mode: exactly-once')",
    ),
    // librdkafka's aliases of the above
    ("metadata.broker.list", "set 'kafka.brokers'"),
    (
        "request.required.acks",
        "an output counts as delivered only once all in-sync replicas have it",
    ),
    (
        "auto.commit.enable",
        "offsets are committed only after outputs are acknowledged",
    ),
];

/// librdkafka properties a pass-through may never set: they load code, run
/// commands, write files or replace the cluster (from librdkafka 2.12's
/// CONFIGURATION.md and rdkafka_conf.c, hidden properties included).
/// Property names are matched case-insensitively and with or without
/// librdkafka's `topic.` prefix.
const REFUSED: &[(&str, &str)] = &[
    (
        "plugin.library.paths",
        "loads shared libraries (their constructors run as the config is read)",
    ),
    (
        "sasl.kerberos.kinit.cmd",
        "is a shell command librdkafka runs at start and at every ticket refresh",
    ),
    (
        "ssl.engine.location",
        "loads an OpenSSL engine (a shared library)",
    ),
    (
        "ssl.engine.id",
        "selects an OpenSSL engine to load (ssl.engine.location)",
    ),
    ("ssl.providers", "loads OpenSSL 3 provider modules"),
    (
        "internal.termination.signal",
        "makes librdkafka take over a signal (SIGTERM would no longer drain the worker)",
    ),
    (
        "ut_handle_ProduceResponse",
        "is an internal test hook that librdkafka calls as a function pointer",
    ),
    (
        "test.mock.num.brokers",
        "replaces the cluster with an in-process mock (use 'kafka.brokers: embedded')",
    ),
    (
        "test.mock.broker.rtt",
        "belongs to librdkafka's in-process mock cluster",
    ),
    (
        "offset.store.method",
        "selects librdkafka's deprecated file offset store, which writes files (offsets are committed to the group)",
    ),
    (
        "offset.store.path",
        "is where librdkafka's deprecated file offset store writes files",
    ),
    (
        "offset.store.sync.interval.ms",
        "belongs to librdkafka's deprecated file offset store",
    ),
];

/// Properties librdkafka pastes into the `sasl.kerberos.kinit.cmd` shell
/// line (`%{sasl.kerberos.principal}` ...): plain names and paths only.
const SHELL_INTERPOLATED: &[&str] = &[
    "sasl.kerberos.principal",
    "sasl.kerberos.keytab",
    "sasl.kerberos.service.name",
];

/// A pass-through property's name as the checks compare it: any case,
/// without librdkafka's `topic.` prefix.
fn property_name(key: &str) -> String {
    let lower = key.trim().to_ascii_lowercase();
    match lower.strip_prefix("topic.") {
        Some(name) => name.to_string(),
        None => lower,
    }
}

/// Why a pass-through librdkafka property is not allowed, if it is not.
fn refused_property(key: &str, value: &str) -> Option<String> {
    let name = property_name(key);
    let name = name.as_str();
    if let Some((_, why)) = MANAGED.iter().find(|(k, _)| *k == name) {
        return Some(format!("is managed by ml-worker: {why}"));
    }
    if let Some((_, why)) = REFUSED.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)) {
        return Some(format!("is refused: it {why}"));
    }
    if name.starts_with("ut_") || name.starts_with("test.") {
        return Some(
            "is refused: librdkafka's internal test properties are not for production".into(),
        );
    }
    if SHELL_INTERPOLATED.contains(&name)
        && !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@._/+=:-".contains(&b))
    {
        return Some(
            "may hold only letters, digits and @._/+=:- (librdkafka pastes it into a shell command line)".into(),
        );
    }
    None
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    kafka: RawKafka,
    input: RawInput,
    outputs: RawOutputs,
    #[serde(default)]
    schema_registry: Option<RawSchemaRegistry>,
    #[serde(default)]
    batching: RawBatching,
    #[serde(default)]
    delivery: RawDelivery,
    /// Model registry file.
    registry: String,
    /// SQLite audit store.
    audit_db: String,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    logging: RawLogging,
    #[serde(default)]
    reload: RawReload,
}

/// Hot reload of `models.yaml` and the model files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReload {
    /// Reload when `models.yaml` or a model file changes.
    #[serde(default = "default_true")]
    watch: bool,
    /// Quiet time after the last change before a watched reload.
    #[serde(default = "default_debounce")]
    debounce_ms: u64,
    /// Bearer token for `POST /admin/reload`.
    #[serde(default)]
    token: Option<String>,
    /// Environment variable holding that token.
    #[serde(default = "default_token_env")]
    token_env: String,
}

impl Default for RawReload {
    fn default() -> Self {
        RawReload {
            watch: true,
            debounce_ms: default_debounce(),
            token: None,
            token_env: default_token_env(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_debounce() -> u64 {
    500
}
fn default_token_env() -> String {
    "ML_WORKER_ADMIN_TOKEN".into()
}

/// Shortest admin token accepted.
const MIN_TOKEN_CHARS: usize = 16;

/// Validates `reload:` (the token from the config or its environment
/// variable; the file's wins).
fn reload(
    r: RawReload,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<crate::worker::reload::ReloadConfig, ConfigError> {
    if !(10..=60_000).contains(&r.debounce_ms) {
        return Err(err(
            "reload.debounce_ms",
            format!("{} is not within 10..=60000", r.debounce_ms),
        ));
    }
    let (token, field) = match r.token {
        Some(t) => (Some(t), "reload.token".to_string()),
        None => (
            std::env::var(&r.token_env).ok().filter(|t| !t.is_empty()),
            format!("reload.token_env ({})", r.token_env),
        ),
    };
    if let Some(t) = &token {
        if t.chars().count() < MIN_TOKEN_CHARS
            || t.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(err(
                &field,
                format!(
                    "the admin token must be at least {MIN_TOKEN_CHARS} characters, without spaces or control characters"
                ),
            ));
        }
    }
    Ok(crate::worker::reload::ReloadConfig {
        watch: r.watch,
        debounce: Duration::from_millis(r.debounce_ms),
        token,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    /// `host:port,...`, or `embedded` for the in-process broker.
    brokers: String,
    /// Consumer group: replicas with the same id share the partitions.
    group_id: String,
    /// Client id reported to the brokers.
    #[serde(default)]
    client_id: Option<String>,
    /// `consumer` (KIP-848, default) or `classic`.
    #[serde(default)]
    group_protocol: Option<GroupProtocol>,
    /// Extra librdkafka properties (TLS, SASL, timeouts, ...), passed through.
    #[serde(default)]
    librdkafka: BTreeMap<String, String>,
    /// librdkafka properties whose values are read from environment
    /// variables at start (property -> variable): secrets such as
    /// `sasl.password` stay out of the file.
    #[serde(default)]
    librdkafka_env: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    /// Topics of feature events.
    topics: Vec<String>,
    /// Wire format of those events.
    format: WireFormat,
    /// Largest record (value and key) read as an event; a larger one is a
    /// dead letter without its value (default 1048576).
    #[serde(default)]
    max_record_bytes: Option<usize>,
}

/// Default `input.max_record_bytes` (a feature event is a few hundred bytes).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    topic: String,
    format: WireFormat,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeadLetters {
    /// Undecodable or unservable events go here, bytes and headers intact.
    topic: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutputs {
    predictions: RawOutput,
    signals: RawOutput,
    dead_letters: RawDeadLetters,
    /// Shadow models' predictions (default: the prediction topic's name
    /// with `.shadow`, in its format).
    #[serde(default)]
    shadow: Option<RawOutput>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchemaRegistry {
    /// Confluent Schema Registry, for `avro` topics: `http://` or `https://`.
    url: String,
    /// Basic auth user (Confluent Cloud: the API key).
    #[serde(default)]
    username: Option<String>,
    /// Basic auth password, in the file (prefer `password_env`).
    #[serde(default)]
    password: Option<String>,
    /// Environment variable holding the basic auth password.
    #[serde(default)]
    password_env: Option<String>,
    /// PEM file of the CA certificate(s) to trust for `https://` instead of
    /// the bundled Mozilla roots (a private CA).
    #[serde(default)]
    ca_file: Option<String>,
    /// Deadline of one request (ms, default 5000).
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// Validated `schema_registry:` settings.
#[derive(Clone, PartialEq, Eq)]
pub struct SchemaRegistryConfig {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
}

impl std::fmt::Debug for SchemaRegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the password
        f.debug_struct("SchemaRegistryConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    #[serde(default)]
    max_batch_size: Option<usize>,
    #[serde(default)]
    max_wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatching {
    /// Rows per inference call, at most.
    #[serde(default = "default_batch")]
    max_batch_size: usize,
    /// How long a partial batch may wait for more rows.
    #[serde(default = "default_wait")]
    max_wait_ms: u64,
    /// Overrides by model name.
    #[serde(default)]
    per_model: BTreeMap<String, RawBatch>,
    /// Inference threads (each owns a share of the partitions); default:
    /// the number of cores, at most 8.
    #[serde(default)]
    inference_threads: Option<usize>,
}

impl Default for RawBatching {
    fn default() -> Self {
        RawBatching {
            max_batch_size: default_batch(),
            max_wait_ms: default_wait(),
            per_model: BTreeMap::new(),
            inference_threads: None,
        }
    }
}

fn default_batch() -> usize {
    1000
}
fn default_wait() -> u64 {
    5
}

/// How the consumer group shares partitions (librdkafka's `group.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    /// KIP-848 (default): the broker assigns partitions incrementally on
    /// heartbeats; a joining replica gets partitions within about two
    /// broker heartbeat intervals, no member stops consuming. Apache Kafka
    /// 4.0 and later, and the embedded broker.
    Consumer,
    /// The classic protocol with cooperative-sticky assignment, for brokers
    /// before Kafka 4.0; session 10 s and heartbeat 1 s unless the
    /// librdkafka pass-through says otherwise.
    Classic,
}

/// Properties that are the broker's under `group_protocol: consumer`.
const CLASSIC_ONLY: &[&str] = &[
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "group.protocol.type",
];

/// When input offsets are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DeliveryMode {
    /// After every output derived from the event is acknowledged (default).
    #[serde(rename = "at-least-once")]
    AtLeastOnce,
    /// As soon as the event is read: a crash may lose in-flight events,
    /// never duplicates them.
    #[serde(rename = "at-most-once")]
    AtMostOnce,
    /// Outputs and input offsets committed together in one Kafka
    /// transaction (KIP-447): a `read_committed` reader downstream sees
    /// each event's outputs exactly once, across crashes and rebalances.
    #[serde(rename = "exactly-once")]
    ExactlyOnce,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    #[serde(default = "default_mode")]
    mode: DeliveryMode,
    /// Events read but not yet committed, at most (backpressure pauses partitions).
    #[serde(default = "default_in_flight")]
    max_in_flight: usize,
    /// Bytes of input records read and not yet handed to the producer, at
    /// most, in MiB (backpressure for big messages).
    #[serde(default = "default_in_flight_mb")]
    max_in_flight_mb: usize,
    /// How often stored offsets are committed.
    #[serde(default = "default_commit")]
    commit_interval_ms: u64,
    /// Drain deadline on SIGTERM/SIGINT.
    #[serde(default = "default_shutdown")]
    shutdown_timeout_ms: u64,
    /// `exactly-once`: the producer's `transactional.id` (default: the
    /// group id and the worker id, `GROUP-HOST-PID`).
    #[serde(default)]
    transactional_id: Option<String>,
    /// `exactly-once`: a transaction is committed after this many input
    /// events at the latest (and every `commit_interval_ms`).
    #[serde(default)]
    transaction_max_events: Option<usize>,
}

impl Default for RawDelivery {
    fn default() -> Self {
        RawDelivery {
            mode: default_mode(),
            max_in_flight: default_in_flight(),
            max_in_flight_mb: default_in_flight_mb(),
            commit_interval_ms: default_commit(),
            shutdown_timeout_ms: default_shutdown(),
            transactional_id: None,
            transaction_max_events: None,
        }
    }
}

fn default_mode() -> DeliveryMode {
    DeliveryMode::AtLeastOnce
}
fn default_in_flight_mb() -> usize {
    256
}
fn default_in_flight() -> usize {
    100_000
}
fn default_commit() -> u64 {
    1000
}
fn default_shutdown() -> u64 {
    10_000
}

/// Default `delivery.transaction_max_events`: the default in-flight limit,
/// so a transaction at full speed lasts a fraction of a second to a second
/// (the worker moves 100,000-400,000 events/s) and an abort redoes at most
/// that much.
pub const DEFAULT_TRANSACTION_MAX_EVENTS: usize = 100_000;

/// librdkafka's `transaction.timeout.ms` default.
const DEFAULT_TRANSACTION_TIMEOUT_MS: u64 = 60_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    /// `/metrics`, `/healthz`, `/readyz` listen here.
    #[serde(default = "default_metrics")]
    address: String,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            address: default_metrics(),
        }
    }
}

fn default_metrics() -> String {
    "127.0.0.1:9100".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    /// JSON lines instead of text.
    #[serde(default)]
    json: bool,
}

/// An output topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub topic: String,
    pub format: WireFormat,
}

/// Batch limits for one model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchLimits {
    pub max_batch_size: usize,
    pub max_wait: Duration,
}

/// A validated worker configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    pub brokers: String,
    pub group_id: String,
    pub client_id: String,
    pub group_protocol: GroupProtocol,
    pub librdkafka: BTreeMap<String, String>,
    pub input_topics: Vec<String>,
    pub input_format: WireFormat,
    /// `input.max_record_bytes`.
    pub max_record_bytes: usize,
    pub predictions: Output,
    pub signals: Output,
    pub dead_letters: String,
    /// Shadow models' predictions.
    pub shadow: Output,
    pub schema_registry: Option<SchemaRegistryConfig>,
    pub batching: BatchLimits,
    pub per_model: BTreeMap<String, BatchLimits>,
    pub inference_threads: usize,
    pub mode: DeliveryMode,
    pub max_in_flight: usize,
    /// `delivery.max_in_flight_mb` in bytes.
    pub max_in_flight_bytes: usize,
    pub commit_interval: Duration,
    pub shutdown_timeout: Duration,
    /// `delivery.transactional_id` (exactly-once; `None`: the default,
    /// see [`WorkerConfig::transactional_id`]).
    pub transactional_id: Option<String>,
    /// `delivery.transaction_max_events` (exactly-once).
    pub transaction_max_events: usize,
    pub registry: PathBuf,
    pub audit_db: PathBuf,
    pub metrics_address: SocketAddr,
    pub log_json: bool,
    pub reload: crate::worker::reload::ReloadConfig,
}

impl WorkerConfig {
    /// Batch limits for a model (its override, else the defaults).
    pub fn limits_for(&self, model: &str) -> BatchLimits {
        self.per_model.get(model).copied().unwrap_or(self.batching)
    }

    /// Whether `brokers` asks for the in-process broker.
    pub fn embedded(&self) -> bool {
        self.brokers == EMBEDDED
    }

    /// The producer's `transactional.id` under `exactly-once`:
    /// `delivery.transactional_id`, else `GROUP-HOST-PID` (the group id and
    /// [`crate::audit::default_worker_id`]): unique per process, so two
    /// replicas never share one, but not stable across restarts.
    pub fn transactional_id(&self) -> String {
        self.transactional_id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.group_id, crate::audit::default_worker_id()))
    }
}

/// Command-line overrides (`--brokers`, `--group`, `--registry`).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub brokers: Option<String>,
    pub group_id: Option<String>,
    pub registry: Option<PathBuf>,
}

/// Validates `schema_registry:` (the password from its environment
/// variable, when named there).
fn schema_registry(
    r: RawSchemaRegistry,
    base: &Path,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<SchemaRegistryConfig, ConfigError> {
    let rest = r
        .url
        .strip_prefix("http://")
        .or_else(|| r.url.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => {}
        _ => {
            return Err(err(
                "schema_registry.url",
                format!(
                    "'{}' is not an http:// or https:// URL",
                    crate::text::escape(&r.url)
                ),
            ))
        }
    }
    if r.url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(err(
            "schema_registry.url",
            "must not contain spaces or control characters".into(),
        ));
    }
    let password = match (r.password, r.password_env) {
        (Some(_), Some(_)) => {
            return Err(err(
                "schema_registry.password_env",
                "give the password or the variable that holds it, not both".into(),
            ))
        }
        (p, None) => p,
        (None, Some(var)) => Some(std::env::var(&var).map_err(|_| {
            err(
                "schema_registry.password_env",
                format!("the environment variable '{var}' is not set"),
            )
        })?),
    };
    if password.is_some() && r.username.is_none() {
        return Err(err(
            "schema_registry.username",
            "a password needs a username".into(),
        ));
    }
    if r.username.as_deref().is_some_and(|u| u.contains(':')) {
        return Err(err(
            "schema_registry.username",
            "must not contain ':' (basic auth)".into(),
        ));
    }
    let timeout = match r.timeout_ms {
        None => Duration::from_secs(5),
        Some(ms) if (1..=600_000).contains(&ms) => Duration::from_millis(ms),
        Some(ms) => {
            return Err(err(
                "schema_registry.timeout_ms",
                format!("{ms} is not within 1..=600000"),
            ))
        }
    };
    Ok(SchemaRegistryConfig {
        url: r.url,
        username: r.username,
        password,
        ca_file: r.ca_file.map(|f| base.join(f)),
        timeout,
    })
}

/// Reads, applies overrides to, and validates a worker config file.
pub fn load_worker_config(file: &Path, overrides: &Overrides) -> Result<WorkerConfig, ConfigError> {
    let text = crate::config::read_config_file(file)?;
    parse_worker_config(&text, file, overrides)
}

pub fn parse_worker_config(
    text: &str,
    file: &Path,
    overrides: &Overrides,
) -> Result<WorkerConfig, ConfigError> {
    let mut raw: Raw = serde_norway::from_str(text).map_err(|e| ConfigError::Yaml {
        file: file.to_path_buf(),
        message: e.to_string(),
    })?;
    if let Some(b) = &overrides.brokers {
        raw.kafka.brokers = b.clone();
    }
    if let Some(g) = &overrides.group_id {
        raw.kafka.group_id = g.clone();
    }
    let base = file.parent().unwrap_or(Path::new("."));
    let registry = match &overrides.registry {
        Some(p) => p.clone(),
        None => base.join(&raw.registry),
    };
    validate(raw, file, base, registry)
}

fn validate(
    mut raw: Raw,
    file: &Path,
    base: &Path,
    registry: PathBuf,
) -> Result<WorkerConfig, ConfigError> {
    let err = |field: &str, message: String| ConfigError::Setting {
        file: file.to_path_buf(),
        field: field.to_string(),
        message,
    };
    if raw.kafka.brokers.trim().is_empty() {
        return Err(err(
            "kafka.brokers",
            "must not be empty (host:port,... or 'embedded')".into(),
        ));
    }
    if raw.kafka.group_id.trim().is_empty() {
        return Err(err("kafka.group_id", "must not be empty".into()));
    }
    let librdkafka = pass_through(&raw.kafka, &err)?;
    for key in librdkafka.keys() {
        if raw.kafka.group_protocol.unwrap_or(GroupProtocol::Consumer) == GroupProtocol::Consumer
            && CLASSIC_ONLY.contains(&key.as_str())
        {
            return Err(err(
                &format!("kafka.librdkafka.{key}"),
                "belongs to the classic group protocol; with 'kafka.group_protocol: consumer' (the \
                 default) the broker sets it (group.consumer.session.timeout.ms, \
                 group.consumer.heartbeat.interval.ms); set 'kafka.group_protocol: classic' to use it"
                    .into(),
            ));
        }
    }
    let max_record_bytes = match raw.input.max_record_bytes {
        None => DEFAULT_MAX_RECORD_BYTES,
        Some(n) if (1024..=100 << 20).contains(&n) => n,
        Some(n) => {
            return Err(err(
                "input.max_record_bytes",
                format!("{n} is not within 1024..=104857600"),
            ))
        }
    };
    if raw.input.topics.is_empty() {
        return Err(err("input.topics", "must list at least one topic".into()));
    }
    let shadow = raw.outputs.shadow.take().unwrap_or_else(|| RawOutput {
        topic: format!("{}.shadow", raw.outputs.predictions.topic),
        format: raw.outputs.predictions.format,
    });
    let topics: Vec<(&str, &str)> = raw
        .input
        .topics
        .iter()
        .map(|t| ("input.topics", t.as_str()))
        .chain([
            (
                "outputs.predictions.topic",
                raw.outputs.predictions.topic.as_str(),
            ),
            ("outputs.signals.topic", raw.outputs.signals.topic.as_str()),
            (
                "outputs.dead_letters.topic",
                raw.outputs.dead_letters.topic.as_str(),
            ),
            ("outputs.shadow.topic", shadow.topic.as_str()),
        ])
        .collect();
    for (field, t) in &topics {
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if t.is_empty() || t.len() > 249 || !t.chars().all(legal) {
            return Err(err(
                field,
                format!("'{t}' is not a valid topic name ([a-zA-Z0-9._-], 1-249)"),
            ));
        }
    }
    for (i, (field, t)) in topics.iter().enumerate() {
        if let Some((other, _)) = topics[..i].iter().find(|(_, u)| u == t) {
            if *field == "input.topics" || other.starts_with("input") {
                return Err(err(
                    field,
                    format!("topic '{t}' is also {other}: outputs must not feed the input"),
                ));
            }
        }
    }
    if [&raw.outputs.predictions.topic, &raw.outputs.signals.topic].contains(&&shadow.topic) {
        return Err(err(
            "outputs.shadow.topic",
            "must differ from the prediction and signal topics (shadow predictions are not real ones)".into(),
        ));
    }
    if raw.outputs.dead_letters.topic == raw.outputs.predictions.topic
        || raw.outputs.dead_letters.topic == raw.outputs.signals.topic
        || raw.outputs.dead_letters.topic == shadow.topic
    {
        return Err(err(
            "outputs.dead_letters.topic",
            "must differ from the prediction and signal topics".into(),
        ));
    }
    let uses_avro = [
        raw.input.format,
        raw.outputs.predictions.format,
        raw.outputs.signals.format,
        shadow.format,
    ]
    .contains(&WireFormat::Avro);
    let schema_registry = match raw.schema_registry {
        Some(r) => Some(schema_registry(r, base, &err)?),
        None if uses_avro => {
            return Err(err("schema_registry.url", "the 'avro' format (Confluent framing) needs a schema registry; use 'avro-raw' without one".into()))
        }
        None => None,
    };
    let limits = |field: &str, size: usize, wait: u64| -> Result<BatchLimits, ConfigError> {
        if !(1..=100_000).contains(&size) {
            return Err(err(
                &format!("{field}max_batch_size"),
                format!("{size} is not within 1..=100000"),
            ));
        }
        if wait > 10_000 {
            return Err(err(
                &format!("{field}max_wait_ms"),
                format!("{wait} ms is more than 10000"),
            ));
        }
        Ok(BatchLimits {
            max_batch_size: size,
            max_wait: Duration::from_millis(wait),
        })
    };
    let batching = limits(
        "batching.",
        raw.batching.max_batch_size,
        raw.batching.max_wait_ms,
    )?;
    let mut per_model = BTreeMap::new();
    for (model, b) in &raw.batching.per_model {
        let field = format!("batching.per_model.{model}.");
        let l = limits(
            &field,
            b.max_batch_size.unwrap_or(batching.max_batch_size),
            b.max_wait_ms.unwrap_or(raw.batching.max_wait_ms),
        )?;
        per_model.insert(model.clone(), l);
    }
    let inference_threads = match raw.batching.inference_threads {
        Some(n) if !(1..=64).contains(&n) => {
            return Err(err(
                "batching.inference_threads",
                format!("must be 1..=64, got {n}"),
            ))
        }
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8),
    };
    let biggest = per_model
        .values()
        .map(|l| l.max_batch_size)
        .chain([batching.max_batch_size])
        .max()
        .unwrap_or(1);
    if raw.delivery.max_in_flight < biggest {
        return Err(err(
            "delivery.max_in_flight",
            format!(
                "{} is smaller than the largest batch ({biggest})",
                raw.delivery.max_in_flight
            ),
        ));
    }
    if !(1..=65_536).contains(&raw.delivery.max_in_flight_mb) {
        return Err(err(
            "delivery.max_in_flight_mb",
            format!(
                "{} is not within 1..=65536 (MiB)",
                raw.delivery.max_in_flight_mb
            ),
        ));
    }
    if !(10..=60_000).contains(&raw.delivery.commit_interval_ms) {
        return Err(err(
            "delivery.commit_interval_ms",
            format!(
                "{} is not within 10..=60000",
                raw.delivery.commit_interval_ms
            ),
        ));
    }
    if raw.delivery.shutdown_timeout_ms > 600_000 {
        return Err(err(
            "delivery.shutdown_timeout_ms",
            "is more than 10 minutes".into(),
        ));
    }
    let transaction_max_events = exactly_once(&raw.delivery, &librdkafka, &err)?;
    let metrics_address: SocketAddr = raw.metrics.address.parse().map_err(|_| {
        err(
            "metrics.address",
            format!("'{}' is not an ip:port address", raw.metrics.address),
        )
    })?;
    if raw.audit_db.trim().is_empty() {
        return Err(err("audit_db", "must not be empty".into()));
    }
    let reload = reload(raw.reload, &err)?;
    Ok(WorkerConfig {
        brokers: raw.kafka.brokers,
        group_id: raw.kafka.group_id,
        group_protocol: raw.kafka.group_protocol.unwrap_or(GroupProtocol::Consumer),
        client_id: raw.kafka.client_id.unwrap_or_else(|| "ml-worker".into()),
        librdkafka,
        input_topics: raw.input.topics,
        input_format: raw.input.format,
        max_record_bytes,
        predictions: Output {
            topic: raw.outputs.predictions.topic,
            format: raw.outputs.predictions.format,
        },
        signals: Output {
            topic: raw.outputs.signals.topic,
            format: raw.outputs.signals.format,
        },
        dead_letters: raw.outputs.dead_letters.topic,
        shadow: Output {
            topic: shadow.topic,
            format: shadow.format,
        },
        schema_registry,
        batching,
        per_model,
        inference_threads,
        mode: raw.delivery.mode,
        max_in_flight: raw.delivery.max_in_flight,
        max_in_flight_bytes: raw.delivery.max_in_flight_mb << 20,
        commit_interval: Duration::from_millis(raw.delivery.commit_interval_ms),
        shutdown_timeout: Duration::from_millis(raw.delivery.shutdown_timeout_ms),
        transactional_id: raw.delivery.transactional_id,
        transaction_max_events,
        registry,
        audit_db: base.join(raw.audit_db),
        metrics_address,
        log_json: raw.logging.json,
        reload,
    })
}

/// The librdkafka pass-through: `kafka.librdkafka`, plus the properties
/// of `kafka.librdkafka_env` read from their environment variables. A
/// property that is refused (`refused_property`), empty, given twice (in
/// any case, with or without `topic.`, in either map), whose variable is
/// unset, or that librdkafka does not accept is an error naming the
/// field. A value from the environment, or of a property that holds a
/// secret, is never shown: librdkafka's own errors quote the value, so
/// they are checked here, one property at a time, and reworded.
fn pass_through(
    kafka: &RawKafka,
    err: &impl Fn(&str, String) -> ConfigError,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    // librdkafka's name of each property given -> the field that gave it
    let mut given: BTreeMap<String, String> = BTreeMap::new();
    let mut accept = |field: String, key: &str, value: String, secret: bool| {
        if let Some(why) = refused_property(key, &value) {
            return Err(err(&field, why));
        }
        if value.is_empty() {
            return Err(err(&field, "has an empty value".into()));
        }
        if let Some(first) = given.insert(property_name(key), field.clone()) {
            return Err(err(
                &field,
                format!(
                    "is given twice (also as '{first}'; librdkafka names match in any case, with \
                     or without 'topic.'): give the value or the variable that holds it, once"
                ),
            ));
        }
        let secret = secret || holds_secret(key);
        check_librdkafka(key, &value, secret).map_err(|why| err(&field, why))?;
        out.insert(key.to_string(), value);
        Ok(())
    };
    for (key, value) in &kafka.librdkafka {
        let field = format!("kafka.librdkafka.{}", crate::text::escape(key));
        accept(field, key, value.clone(), false)?;
    }
    for (key, var) in &kafka.librdkafka_env {
        let field = format!("kafka.librdkafka_env.{}", crate::text::escape(key));
        let value = env_value(var).map_err(|why| err(&field, why))?;
        accept(field, key, value, true)?;
    }
    Ok(out)
}

/// The value of the environment variable `var`, or why not (its value is
/// never in the reason).
fn env_value(var: &str) -> Result<String, String> {
    let valid = !var.is_empty()
        && var.len() <= 256
        && !var.starts_with(|c: char| c.is_ascii_digit())
        && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        let shown: String = crate::text::escape(var).chars().take(64).collect();
        return Err(format!(
            "'{shown}' is not an environment variable name (1-256 letters, digits and _, not \
             starting with a digit)"
        ));
    }
    match std::env::var(var) {
        Ok(v) if v.is_empty() => Err(format!("the environment variable '{var}' is empty")),
        Ok(v) => Ok(v),
        Err(std::env::VarError::NotPresent) => {
            Err(format!("the environment variable '{var}' is not set"))
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(format!("the environment variable '{var}' is not UTF-8"))
        }
    }
}

/// Whether a librdkafka property's value is a secret (passwords, inline
/// keys and certificates, OAUTHBEARER settings), never to be shown.
fn holds_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "pem", "oauthbearer", "jaas", "token"]
        .iter()
        .any(|s| k.contains(s))
}

/// Whether librdkafka takes `key` = `value` (set on an empty client
/// configuration, as `client_configs` will), or why not; librdkafka's
/// description quotes the value, so it is left out for a secret.
fn check_librdkafka(key: &str, value: &str, secret: bool) -> Result<(), String> {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaConfRes;
    match rdkafka::ClientConfig::new()
        .set(key, value)
        .create_native_config()
    {
        Ok(_) => Ok(()),
        Err(KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN, ..)) => Err(
            "is not a librdkafka property (CONFIGURATION.md of librdkafka 2.12 lists them)".into(),
        ),
        Err(KafkaError::ClientConfig(_, desc, ..)) if secret => {
            let hint = crate::worker::clients::build_hint(&desc);
            Err(format!(
                "librdkafka does not accept its value (not shown: it may be a secret){hint}"
            ))
        }
        Err(KafkaError::ClientConfig(_, desc, ..)) => {
            let hint = crate::worker::clients::build_hint(&desc);
            Err(format!(
                "librdkafka does not accept it: {}{hint}",
                crate::text::escape(&desc)
            ))
        }
        Err(e) => Err(format!("librdkafka does not accept it: {e}")),
    }
}

/// Validates the `exactly-once` settings: the transactional id and size,
/// and librdkafka pass-through properties that would break the guarantee
/// (read uncommitted input, messages that never time out inside a
/// transaction, a transaction that can outlive its timeout). Returns
/// `delivery.transaction_max_events`.
fn exactly_once(
    d: &RawDelivery,
    librdkafka: &BTreeMap<String, String>,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<usize, ConfigError> {
    if d.mode != DeliveryMode::ExactlyOnce {
        for (field, set) in [
            ("delivery.transactional_id", d.transactional_id.is_some()),
            (
                "delivery.transaction_max_events",
                d.transaction_max_events.is_some(),
            ),
        ] {
            if set {
                return Err(err(
                    field,
                    "applies only to 'delivery.mode: exactly-once'".into(),
                ));
            }
        }
        return Ok(DEFAULT_TRANSACTION_MAX_EVENTS);
    }
    if let Some(id) = &d.transactional_id {
        if id.is_empty()
            || id.len() > 249
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
        {
            return Err(err(
                "delivery.transactional_id",
                format!(
                    "'{}' is not 1-249 letters, digits and ._-:",
                    crate::text::escape(id)
                ),
            ));
        }
    }
    let max_events = d
        .transaction_max_events
        .unwrap_or(DEFAULT_TRANSACTION_MAX_EVENTS);
    if !(1..=10_000_000).contains(&max_events) {
        return Err(err(
            "delivery.transaction_max_events",
            format!("{max_events} is not within 1..=10000000"),
        ));
    }
    // the pass-through, by librdkafka's name (any case, `topic.` prefix)
    let get = |name: &str| {
        librdkafka.iter().find_map(|(key, v)| {
            (property_name(key) == name).then(|| (crate::text::escape(key).into_owned(), v.trim()))
        })
    };
    if let Some((key, v)) = get("isolation.level") {
        if v != "read_committed" {
            return Err(err(
                &format!("kafka.librdkafka.{key}"),
                format!(
                    "'{}' breaks 'delivery.mode: exactly-once': input must be read \
                     'read_committed' (aborted records would be served)",
                    crate::text::escape(v)
                ),
            ));
        }
    }
    let ms = |key: &str, v: &str| {
        v.parse::<u64>().map_err(|_| {
            err(
                &format!("kafka.librdkafka.{key}"),
                format!(
                    "'{}' is not a number of milliseconds",
                    crate::text::escape(v)
                ),
            )
        })
    };
    let txn_timeout = match get("transaction.timeout.ms") {
        Some((key, v)) => ms(&key, v)?,
        None => DEFAULT_TRANSACTION_TIMEOUT_MS,
    };
    if let Some((key, v)) = get("message.timeout.ms") {
        let m = ms(&key, v)?;
        if m == 0 || m > txn_timeout {
            return Err(err(
                &format!("kafka.librdkafka.{key}"),
                format!(
                    "{m} breaks 'delivery.mode: exactly-once': an output must fail within the \
                     transaction timeout ({txn_timeout} ms, transaction.timeout.ms) so that its \
                     transaction is aborted, not lost"
                ),
            ));
        }
    }
    // a transaction stays open for a commit interval, and a drain or a
    // revocation waits up to the shutdown timeout before committing it
    if d.commit_interval_ms + d.shutdown_timeout_ms >= txn_timeout {
        return Err(err(
            "delivery.commit_interval_ms",
            format!(
                "{} ms plus shutdown_timeout_ms ({} ms) must stay below the transaction \
                 timeout ({txn_timeout} ms, librdkafka's transaction.timeout.ms), or the broker \
                 aborts open transactions",
                d.commit_interval_ms, d.shutdown_timeout_ms
            ),
        ));
    }
    Ok(max_events)
}
