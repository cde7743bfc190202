//! The streaming worker end to end: real Kafka protocol traffic, the
//! shipped models, reference predictions. On the embedded broker, or on the
//! cluster `KAFKA_BOOTSTRAP` names (`make test-kafka`: Apache Kafka 4.1);
//! the tests that inject faults into the mock cluster run on it only.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod brokers;
use brokers::{mock_only, Broker};

use ml_worker::events::WireFormat;
use ml_worker::loadgen::{load_samples, Load, Reader, Samples, Traffic};
use ml_worker::registry::RegistryBuilder;
use ml_worker::worker::config::{parse_worker_config, Overrides, WorkerConfig};
use ml_worker::worker::metrics::Metrics;
use ml_worker::worker::reload::{Models, Trigger};
use ml_worker::worker::{Started, Summary};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn unique(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A broker with random topic names and a worker config pointing at it.
struct Setup {
    broker: Broker,
    features: String,
    predictions: String,
    signals: String,
    dead_letters: String,
    group: String,
    dir: tempfile::TempDir,
    samples: Vec<Samples>,
}

impl Setup {
    fn new(partitions: i32) -> Setup {
        let s = Setup {
            broker: Broker::start(),
            features: unique("features"),
            predictions: unique("predictions"),
            signals: unique("signals"),
            dead_letters: unique("dead"),
            group: unique("group"),
            dir: tempfile::tempdir().unwrap(),
            samples: load_samples(&root().join("models/samples")).unwrap(),
        };
        for (t, p) in [
            (&s.features, partitions),
            (&s.predictions, 4),
            (&s.signals, 4),
            (&s.dead_letters, 1),
        ] {
            s.broker.create_topic(t, p);
        }
        s
    }

    fn brokers(&self) -> String {
        self.broker.address()
    }

    fn yaml(&self, format: &str, extra: &str) -> String {
        format!(
            r#"
kafka:
  brokers: "{brokers}"
  group_id: "{group}"
input: {{topics: ["{features}"], format: "{format}"}}
outputs:
  predictions: {{topic: "{predictions}", format: "{format}"}}
  signals: {{topic: "{signals}", format: "{format}"}}
  dead_letters: {{topic: "{dead}"}}
batching: {{max_batch_size: 200, max_wait_ms: 2}}
delivery: {{commit_interval_ms: 100, shutdown_timeout_ms: 10000}}
registry: "{registry}"
audit_db: "{audit}"
metrics: {{address: "127.0.0.1:0"}}
{extra}
"#,
            brokers = self.brokers(),
            group = self.group,
            features = self.features,
            predictions = self.predictions,
            signals = self.signals,
            dead = self.dead_letters,
            registry = root().join("config/models.yaml").display(),
            audit = self.dir.path().join("audit.db").display(),
        )
    }

    fn config(&self, format: &str, extra: &str) -> Arc<WorkerConfig> {
        self.config_from(&self.yaml(format, extra))
    }

    /// Writes `yaml` as this setup's worker.yaml and parses it.
    fn config_from(&self, yaml: &str) -> Arc<WorkerConfig> {
        let file = self.dir.path().join("worker.yaml");
        std::fs::write(&file, yaml).unwrap();
        Arc::new(parse_worker_config(yaml, &file, &Overrides::default()).unwrap())
    }

    fn traffic<'a>(&'a self, format: WireFormat, prefix: &'a str) -> Traffic<'a> {
        Traffic {
            topic: &self.features,
            format,
            samples: &self.samples,
            prefix,
        }
    }

    fn reader(&self, format: WireFormat) -> Reader {
        Reader::new(
            &self.brokers(),
            (&self.predictions, format),
            (&self.signals, format),
            &self.dead_letters,
        )
        .unwrap()
    }

    /// Offsets the group has committed on the input topic, summed.
    fn committed_total(&self, partitions: i32) -> i64 {
        brokers::committed_total(&self.brokers(), &self.group, &self.features, partitions)
    }

    /// Records in the features topic (its partitions' high watermarks): more
    /// than were sent when the test's own (non-idempotent) producer retried
    /// through a broker outage and wrote a record twice.
    fn features_end_total(&self, partitions: i32) -> i64 {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .unwrap();
        (0..partitions)
            .map(|p| {
                c.fetch_watermarks(&self.features, p, Duration::from_secs(10))
                    .unwrap()
                    .1
            })
            .sum()
    }
}

/// A worker running in this process.
struct Running {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Summary>,
    started: Started,
    /// Its registry, reloadable from `cfg.registry`.
    models: Arc<Models>,
}

fn start(cfg: Arc<WorkerConfig>) -> Running {
    start_with(cfg, RegistryBuilder::new())
}

/// A worker whose registry `builder` opens (and reloads) from `cfg.registry`.
fn start_with(cfg: Arc<WorkerConfig>, builder: RegistryBuilder) -> Running {
    // ML_WORKER_LOG=info cargo test -- --nocapture shows the worker's logs
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ML_WORKER_LOG")
                .unwrap_or_else(|_| "off".into()),
        )
        .with_test_writer()
        .try_init();
    let registry = Arc::new(builder.clone().open(&cfg.registry).expect("registry"));
    let stop = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(Metrics::default());
    let models = Models::reloadable(registry, cfg.registry.clone(), builder, metrics.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let s = stop.clone();
    let brokers = cfg.brokers.clone();
    let m = models.clone();
    let handle = std::thread::spawn(move || {
        ml_worker::worker::run(cfg, &brokers, m, metrics, s, |st| {
            let _ = tx.send(st);
        })
        .expect("worker run")
    });
    let started = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("worker start");
    Running {
        stop,
        handle,
        started,
        models,
    }
}

impl Running {
    fn stop(self) -> Summary {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("worker thread")
    }
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, out.split_once("\r\n\r\n").unwrap().1.to_string())
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-12)
}

/// Every prediction matches the reference library's for its sample row.
fn check_against_reference(seen: &ml_worker::loadgen::Seen, samples: &[Samples], prefix: &str) {
    for (id, p) in &seen.by_id {
        let i: u64 = id
            .strip_prefix(&format!("{prefix}-"))
            .unwrap()
            .parse()
            .unwrap();
        let (si, row) = ml_worker::loadgen::event_row(samples, i);
        let s = &samples[si];
        assert_eq!(p.model, s.model, "{id}");
        // tolerances of the runtime issue: LightGBM 1e-9, XGBoost 1e-6, ONNX 1e-5
        let tol = match s.model.as_str() {
            "diabetes_lgbm" => 1e-9,
            "breast_cancer_xgb" => 1e-6,
            _ => 1e-5,
        };
        assert!(
            close(p.prediction, s.expected[row], tol),
            "{id} ({}, row {row}): {} vs reference {}",
            s.model,
            p.prediction,
            s.expected[row]
        );
        if let Some(expected) = &s.probabilities[row] {
            let got = p.probabilities.as_ref().expect("classifier probabilities");
            assert_eq!(got.len(), expected.len());
            for (g, e) in got.iter().zip(expected) {
                assert!(
                    (g - e).abs() <= tol,
                    "{id}: probabilities {got:?} vs {expected:?}"
                );
            }
        }
    }
}

#[test]
fn every_event_gets_one_prediction_matching_the_reference_and_offsets_are_committed() {
    for format in ["avro-raw", "json"] {
        let s = Setup::new(4);
        let cfg = s.config(format, "");
        let w = start(cfg.clone());
        let load = Load::new(&s.brokers()).unwrap();
        let n = 1200u64; // a multiple of the number of sample models (round-robin)
        let stop = AtomicBool::new(false);
        load.events(&s.traffic(cfg.input_format, "e"), 0, n, None, &stop)
            .unwrap();
        load.flush(Duration::from_secs(10)).unwrap();
        let mut reader = s.reader(cfg.input_format);
        reader.read(Duration::from_secs(30), |seen| {
            seen.by_id.len() as u64 >= n && seen.signal_ids.len() as u64 >= n
        });
        let seen = &reader.seen;
        assert_eq!(
            seen.by_id.len() as u64,
            n,
            "{format}: one prediction per event"
        );
        assert_eq!(
            seen.duplicates, 0,
            "{format}: no duplicates without failures"
        );
        assert_eq!(
            seen.signal_ids.len() as u64,
            n,
            "{format}: one signal per event"
        );
        assert!(
            seen.dead_letters.is_empty(),
            "{format}: {:?}",
            seen.dead_letters.first()
        );
        assert_eq!(seen.undecodable, 0);
        check_against_reference(seen, &s.samples, "e");
        // ready, and the metrics saw it all
        assert_eq!(http_get(w.started.metrics_address, "/readyz").0, 200);
        let (code, text) = http_get(w.started.metrics_address, "/metrics");
        assert_eq!(code, 200);
        assert!(text.contains("ml_worker_inference_latency_seconds_bucket{model=\"diabetes_lgbm\""));
        assert!(
            text.contains(&format!(
                "ml_worker_events_in_total{{topic=\"{}\",model=\"wine_rf\"}} {}",
                s.features,
                n / s.samples.len() as u64
            )),
            "{text}"
        );
        // the PyTorch model (TorchScript through libtorch) served its share
        assert!(
            text.contains(&format!(
                "ml_worker_events_in_total{{topic=\"{}\",model=\"wine_mlp\"}} {}",
                s.features,
                n / s.samples.len() as u64
            )),
            "{text}"
        );
        let summary = w.stop();
        assert!(summary.clean, "{summary:?}");
        assert_eq!(summary.events_in, n);
        assert_eq!(summary.outputs_acked, 2 * n);
        assert_eq!(
            s.committed_total(4),
            n as i64,
            "{format}: every input offset committed"
        );
    }
}

#[test]
fn poison_messages_reach_the_dead_letter_topic_with_their_reason_while_good_events_flow() {
    let s = Setup::new(2);
    let cfg = s.config("avro-raw", "");
    let w = start(cfg.clone());
    let load = Load::new(&s.brokers()).unwrap();
    let stop = AtomicBool::new(false);
    let good = 300u64;
    load.events(
        &s.traffic(WireFormat::AvroRaw, "g"),
        0,
        good / 2,
        None,
        &stop,
    )
    .unwrap();
    // the poison, each with a marker in its key
    // a network refuses missing values by default (a tree ensemble, such
    // as wine_rf's ONNX forest, serves them)
    let wine = s.samples.iter().find(|x| x.model == "wine_mlp").unwrap();
    let mut missing = ml_worker::loadgen::event(std::slice::from_ref(wine), "p", 0, 1);
    missing.features.remove(3);
    let mut nan = ml_worker::loadgen::event(std::slice::from_ref(wine), "p", 1, 1);
    nan.features[0].1 = f64::NAN;
    let mut unknown = ml_worker::loadgen::event(&s.samples, "p", 2, 1);
    unknown.model = "no_such_model".into();
    let lgbm = s
        .samples
        .iter()
        .find(|x| x.model == "diabetes_lgbm")
        .unwrap();
    let mut lgbm_missing = ml_worker::loadgen::event(std::slice::from_ref(lgbm), "p", 3, 1);
    lgbm_missing.features.remove(2); // allowed: tree models take NaN
    let mut twice = ml_worker::loadgen::event(std::slice::from_ref(lgbm), "p", 4, 1);
    let again = twice.features[1].clone();
    twice.features.push((again.0, again.1 + 1.0));
    let mut long_ago = ml_worker::loadgen::event(std::slice::from_ref(lgbm), "p", 5, 1);
    long_ago.event_time = i64::MIN;
    let enc = |e: &ml_worker::events::FeatureEvent| {
        let mut b = Vec::new();
        ml_worker::loadgen::encode_feature(WireFormat::AvroRaw, e, &mut b);
        b
    };
    let json = {
        let mut b = Vec::new();
        ml_worker::loadgen::encode_feature(WireFormat::Json, &unknown, &mut b);
        b
    };
    let poison: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "random",
            vec![0xff, 0x13, 0x37, 0x00, 0x99, 0x42],
            "decode",
            "avro",
        ),
        ("json-in-avro-topic", json, "decode", "avro"),
        ("empty", vec![], "decode", ""),
        ("unknown-model", enc(&unknown), "route", "no_such_model"),
        (
            "missing-feature",
            enc(&missing),
            "validate",
            "'alcalinity_of_ash' is missing",
        ),
        ("nan-feature", enc(&nan), "validate", "'alcohol' is NaN"),
        (
            "feature-twice",
            enc(&twice),
            "validate",
            "'sex' appears twice",
        ),
        (
            "bad-event-time",
            enc(&long_ago),
            "validate",
            "event_time -9223372036854775808",
        ),
    ];
    let raw: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", s.brokers())
        .create()
        .unwrap();
    for (key, value, _, _) in &poison {
        // the record's own headers in the worker's namespace are not kept
        // (they would forge or shadow the real reason)
        let h = OwnedHeaders::new()
            .insert(Header {
                key: "trace-id",
                value: Some("abc"),
            })
            .insert(Header {
                key: "error.reason",
                value: Some("ok: forged"),
            })
            .insert(Header {
                key: "source.offset",
                value: Some("-1"),
            });
        raw.send(
            BaseRecord::to(&s.features)
                .key(*key)
                .payload(value.as_slice())
                .headers(h),
        )
        .unwrap();
    }
    raw.send(
        BaseRecord::to(&s.features)
            .key("lgbm-missing")
            .payload(&enc(&lgbm_missing)),
    )
    .unwrap();
    raw.flush(Duration::from_secs(10)).unwrap();
    load.events(
        &s.traffic(WireFormat::AvroRaw, "g"),
        good / 2,
        good / 2,
        None,
        &stop,
    )
    .unwrap();
    load.flush(Duration::from_secs(10)).unwrap();

    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(30), |seen| {
        seen.by_id.len() as u64 > good && seen.dead_letters.len() >= poison.len()
    });
    let seen = &reader.seen;
    assert_eq!(
        seen.dead_letters.len(),
        poison.len(),
        "{:#?}",
        seen.dead_letters
    );
    for (key, value, stage, reason) in &poison {
        let d = seen
            .dead_letters
            .iter()
            .find(|d| d.key.as_deref() == Some(key.as_bytes()))
            .unwrap_or_else(|| panic!("no dead letter for {key}"));
        assert_eq!(&d.value, value, "{key}: original value kept");
        assert_eq!(d.headers["error.stage"], *stage, "{key}: {:?}", d.headers);
        assert!(
            d.headers["error.reason"].contains(reason),
            "{key}: reason {:?} should mention {reason:?}",
            d.headers["error.reason"]
        );
        assert_eq!(d.headers["trace-id"], "abc", "{key}: original headers kept");
        for name in ["error.reason", "error.stage", "source.offset"] {
            assert_eq!(
                d.header_list.iter().filter(|(k, _)| k == name).count(),
                1,
                "{key}: {name} once, the worker's: {:?}",
                d.header_list
            );
        }
        assert!(!d
            .header_list
            .iter()
            .any(|(_, v)| v == "ok: forged" || v == "-1"));
        assert_eq!(d.headers["source.topic"], s.features);
        assert!(d.headers["source.offset"].parse::<i64>().is_ok());
        assert!(d.headers["source.partition"].parse::<i32>().is_ok());
    }
    // every good event predicted, and the missing-feature LightGBM event too
    let good_ids: HashSet<String> = (0..good).map(|i| format!("g-{i}")).collect();
    assert!(good_ids.iter().all(|id| seen.by_id.contains_key(id)));
    assert!(
        seen.by_id.contains_key("p-3"),
        "tree model serves a missing feature as NaN"
    );
    check_against_reference(
        &ml_worker::loadgen::Seen {
            by_id: seen
                .by_id
                .iter()
                .filter(|(k, _)| k.starts_with("g-"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..Default::default()
        },
        &s.samples,
        "g",
    );
    let text = w.started.metrics_address;
    let (_, metrics) = http_get(text, "/metrics");
    assert!(
        metrics.contains("ml_worker_dead_letters_total{stage=\"decode\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("ml_worker_dead_letters_total{stage=\"validate\"} 4"));
    assert!(metrics.contains("ml_worker_dead_letters_total{stage=\"route\"} 1"));
    let summary = w.stop();
    assert!(summary.clean);
    assert_eq!(
        s.committed_total(2),
        good as i64 + poison.len() as i64 + 1,
        "dead-lettered inputs are committed too"
    );
}

/// Sends `n` events at `rate`/s on a thread.
fn produce_in_background(
    s: &Setup,
    prefix: &'static str,
    first: u64,
    n: u64,
    rate: f64,
) -> JoinHandle<()> {
    let (brokers, topic, samples) = (s.brokers(), s.features.clone(), s.samples.clone());
    std::thread::spawn(move || {
        let load = Load::new(&brokers).unwrap();
        let t = Traffic {
            topic: &topic,
            format: WireFormat::AvroRaw,
            samples: &samples,
            prefix,
        };
        load.events(&t, first, n, Some(rate), &AtomicBool::new(false))
            .unwrap();
        load.flush(Duration::from_secs(60)).unwrap();
    })
}

fn missing_ids(seen: &ml_worker::loadgen::Seen, prefix: &str, n: u64) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|id| !seen.by_id.contains_key(id))
        .collect()
}

#[test]
fn broker_down_and_back_up_mid_stream_loses_nothing() {
    if mock_only("takes the broker down and up (mock cluster fault injection)") {
        return;
    }
    let s = Setup::new(4);
    // an outage shorter than the session timeout (the broker's, 30 s on the
    // embedded one): the worker keeps its partitions (a longer one ends in a
    // rebalance, which loses nothing either but re-reads from the last commit)
    let cfg = s.config("avro-raw", "");
    let w = start(cfg);
    let n = 3000;
    let producer = produce_in_background(&s, "b", 0, n, 3000.0);
    std::thread::sleep(Duration::from_millis(400));
    s.broker.embedded().cluster().broker_down(1).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    s.broker.embedded().cluster().broker_up(1).unwrap();
    producer.join().unwrap();
    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(60), |seen| seen.by_id.len() as u64 >= n);
    let missing = missing_ids(&reader.seen, "b", n);
    assert!(
        missing.is_empty(),
        "{} lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let summary = w.stop();
    assert!(summary.clean, "{summary:?}");
    // every input record committed (a retried send can add a duplicate input)
    let end = s.features_end_total(4);
    assert!(end >= n as i64);
    assert_eq!(s.committed_total(4), end);
}

#[test]
fn a_second_worker_joining_takes_partitions_and_together_they_lose_nothing() {
    let s = Setup::new(8);
    let cfg = s.config("avro-raw", "");
    let w1 = start(cfg.clone());
    let n = 12000;
    let producer = produce_in_background(&s, "j", 0, n, 2000.0);
    std::thread::sleep(Duration::from_millis(500));
    let w2 = start(cfg);
    producer.join().unwrap();
    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(60), |seen| seen.by_id.len() as u64 >= n);
    let missing = missing_ids(&reader.seen, "j", n);
    assert!(
        missing.is_empty(),
        "{} lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let s2 = w2.stop();
    // the first worker takes the partitions back (and re-reads whatever the
    // second could not commit while leaving: duplicates, never losses)
    let w1_metrics = w1.started.metrics_address;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !http_get(w1_metrics, "/metrics")
        .1
        .contains("ml_worker_assigned_partitions 8")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "partitions never came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let s1 = w1.stop();
    assert!(
        s1.events_in > 0 && s2.events_in > 0,
        "both took partitions: {s1:?} {s2:?}"
    );
    assert!(s1.events_in + s2.events_in >= n, "{s1:?} {s2:?}");
    assert_eq!(s.committed_total(8), n as i64);
}

#[test]
fn a_worker_killed_with_sigkill_and_restarted_loses_nothing() {
    let s = Setup::new(4);
    let max_in_flight = 2000;
    let extra = "# in-flight window\n".to_string();
    let yaml = s.yaml("avro-raw", &extra).replace(
        "delivery: {commit_interval_ms: 100",
        &format!("delivery: {{max_in_flight: {max_in_flight}, commit_interval_ms: 100"),
    );
    let file = s.dir.path().join("worker.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ml-worker"))
            .args(["run", "--config"])
            .arg(&file)
            .current_dir(root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let n = 8000;
    let mut first = spawn();
    let producer = produce_in_background(&s, "k", 0, n, 4000.0);
    // kill it mid-stream, once it has produced something
    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(30), |seen| seen.by_id.len() >= 1500);
    assert!(
        reader.seen.by_id.len() >= 1500,
        "the first worker never got going"
    );
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    // what the killed worker had committed: nothing before it is read again
    let committed_at_kill = s.committed_total(4);
    let mut second = spawn();
    producer.join().unwrap();
    reader.read(Duration::from_secs(60), |seen| seen.by_id.len() as u64 >= n);
    let missing = missing_ids(&reader.seen, "k", n);
    assert!(
        missing.is_empty(),
        "{} lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // duplicates only from the killed worker's uncommitted window: events
    // at or past its last commit, each at most once more (how wide that
    // window is depends on the broker: commits during the group join can
    // fail and are re-issued, on Kafka more than on the embedded broker)
    let seen = &reader.seen;
    // and downstream can drop them: every prediction says where it came
    // from and carries an id of its own, and a duplicate has the first's
    // key, id, prediction and version
    assert_eq!(seen.without_source, 0, "predictions without source headers");
    assert!(
        seen.unlike_duplicates.is_empty(),
        "{} duplicates differ from the first output, e.g. {:?}",
        seen.unlike_duplicates.len(),
        &seen.unlike_duplicates[..seen.unlike_duplicates.len().min(5)]
    );
    let ids: std::collections::HashSet<_> = seen
        .first_output
        .values()
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(
        ids.len(),
        seen.by_id.len(),
        "output ids are not unique per input"
    );
    eprintln!(
        "SIGKILL restart: {} duplicates, every one with the first output's key, output.id, prediction and version",
        seen.duplicates
    );
    let window = n - committed_at_kill as u64;
    assert!(
        seen.duplicates <= window,
        "{} duplicates, but only {window} events were past the last commit (in-flight limit {max_in_flight})",
        seen.duplicates
    );
    if brokers::external().is_none() {
        // on the embedded broker commits land within an interval: the
        // window is the in-flight limit and about a second of traffic
        assert!(
            seen.duplicates <= max_in_flight as u64 + 1000,
            "{} duplicates for an in-flight window of {max_in_flight}",
            seen.duplicates
        );
    }
    // a graceful stop commits everything
    let pid = second.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = second.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(s.committed_total(4), n as i64);
}

/// A minimal Confluent Schema Registry: `GET /schemas/ids/N` from `known`,
/// `POST /subjects/S/versions` registers (ids from 100). Returns its URL and
/// the subjects registered.
fn fake_schema_registry(known: Vec<(u32, String)>) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    fake_schema_registry_gated(known, None, None)
}

/// The same; a lookup of the `gated` id is answered only once its gate
/// opens (a slow registry), and every lookup answers 503 while `down` is
/// set (a registry in trouble). Connections are served concurrently.
fn fake_schema_registry_gated(
    known: Vec<(u32, String)>,
    gated: Option<(u32, Arc<AtomicBool>)>,
    down: Option<Arc<AtomicBool>>,
) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let subjects = Arc::new(std::sync::Mutex::new(Vec::new()));
    let schemas: Arc<std::sync::Mutex<std::collections::HashMap<u32, String>>> =
        Arc::new(std::sync::Mutex::new(known.into_iter().collect()));
    let registered = subjects.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut s = stream.unwrap();
            let (schemas, registered, gated, down) = (
                schemas.clone(),
                registered.clone(),
                gated.clone(),
                down.clone(),
            );
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // headers, then Content-Length bytes of body
                let (head, mut body) = loop {
                    let n = s.read(&mut chunk).unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break (
                            String::from_utf8_lossy(&buf[..i]).to_string(),
                            buf[i + 4..].to_vec(),
                        );
                    }
                };
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                while body.len() < len {
                    let n = s.read(&mut chunk).unwrap();
                    body.extend_from_slice(&chunk[..n]);
                }
                let mut words = head.split_whitespace();
                let (method, path) = (
                    words.next().unwrap().to_string(),
                    words.next().unwrap().to_string(),
                );
                let asked = path
                    .strip_prefix("/schemas/ids/")
                    .map(|id| id.parse::<u32>().unwrap_or(0));
                if let Some((_, gate)) = gated.filter(|g| Some(g.0) == asked) {
                    let until = Instant::now() + Duration::from_secs(60);
                    while !gate.load(Ordering::Relaxed) && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                let mut schemas = schemas.lock().unwrap();
                let (status, reply) = if method == "POST" && path.starts_with("/subjects/") {
                    let schema: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let id = 100 + schemas.len() as u32;
                    schemas.insert(id, schema["schema"].as_str().unwrap().to_string());
                    let subject = path
                        .trim_start_matches("/subjects/")
                        .trim_end_matches("/versions");
                    registered.lock().unwrap().push(subject.to_string());
                    ("200 OK", serde_json::json!({ "id": id }).to_string())
                } else if asked.is_some() && down.is_some_and(|d| d.load(Ordering::Relaxed)) {
                    (
                        "503 Service Unavailable",
                        r#"{"error_code":50302,"message":"unavailable"}"#.to_string(),
                    )
                } else if let Some(id) = asked {
                    match schemas.get(&id) {
                        Some(sc) => ("200 OK", serde_json::json!({ "schema": sc }).to_string()),
                        None => (
                            "404 Not Found",
                            r#"{"error_code":40403,"message":"Schema not found"}"#.to_string(),
                        ),
                    }
                } else {
                    ("404 Not Found", "{}".to_string())
                };
                drop(schemas);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                );
            });
        }
    });
    (url, subjects)
}

/// Sends an `avro` (Confluent-framed) feature event under schema `id`
/// (8: the evolved writer, with its extra field) to one partition.
fn send_framed(
    p: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    partition: i32,
    e: &ml_worker::events::FeatureEvent,
    id: u32,
) {
    let mut msg = vec![0];
    msg.extend_from_slice(&id.to_be_bytes());
    ml_worker::events::write_feature_datum(e, &mut msg);
    if id == 8 {
        msg.push(12); // "source": a 6-byte string
        msg.extend_from_slice(b"feed-a");
    }
    p.send(
        BaseRecord::to(topic)
            .partition(partition)
            .key(e.symbol.as_bytes())
            .payload(&msg),
    )
    .unwrap();
}

/// The evolved FeatureEvent writer schema (one more field, with a default).
fn evolved_feature_schema() -> String {
    let mut evolved: serde_json::Value =
        serde_json::from_str(ml_worker::events::FEATURE_EVENT_SCHEMA).unwrap();
    evolved["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "source", "type": "string", "default": "unknown"}));
    evolved.to_string()
}

/// A slow schema registry holds back only the partition whose record waits
/// for the schema: the consume thread does not wait on the lookup, the
/// other partition is served meanwhile, and the waiting records are served
/// in order once the schema comes (none dead-lettered, none lost).
#[test]
fn a_slow_schema_lookup_holds_back_only_its_partition() {
    let gate = Arc::new(AtomicBool::new(false));
    let (url, _) = fake_schema_registry_gated(
        vec![
            (7, ml_worker::events::FEATURE_EVENT_SCHEMA.to_string()),
            (8, evolved_feature_schema()),
        ],
        Some((8, gate.clone())),
        None,
    );
    let s = Setup::new(2);
    // the lookup may take 30 s before it times out
    let cfg = s.config(
        "avro",
        &format!("schema_registry: {{url: \"{url}\", timeout_ms: 30000}}"),
    );
    let w = start(cfg);
    let raw: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", s.brokers())
        .create()
        .unwrap();
    let event = |prefix: &str, i: u64| ml_worker::loadgen::event(&s.samples, prefix, i, 1);
    // schema 7 known to the worker first
    send_framed(&raw, &s.features, 1, &event("warm", 0), 7);
    raw.flush(Duration::from_secs(10)).unwrap();
    let mut reader = s.reader(WireFormat::Avro);
    reader.read(Duration::from_secs(30), |seen| !seen.by_id.is_empty());
    // partition 0: records under the slow schema 8; partition 1: schema 7
    let n = 50;
    for i in 0..n {
        send_framed(&raw, &s.features, 0, &event("slow", i), 8);
    }
    for i in 0..n {
        send_framed(&raw, &s.features, 1, &event("fast", i), 7);
    }
    raw.flush(Duration::from_secs(10)).unwrap();
    reader.read(Duration::from_secs(20), |seen| {
        (0..n).all(|i| seen.by_id.contains_key(&format!("fast-{i}")))
    });
    let fast = (0..n)
        .filter(|i| reader.seen.by_id.contains_key(&format!("fast-{i}")))
        .count();
    let slow_early = (0..n)
        .filter(|i| reader.seen.by_id.contains_key(&format!("slow-{i}")))
        .count();
    gate.store(true, Ordering::Relaxed);
    assert_eq!(
        fast as u64, n,
        "the other partition was held up by the lookup"
    );
    assert_eq!(slow_early, 0, "served before its schema came");
    reader.read(Duration::from_secs(30), |seen| {
        (0..n).all(|i| seen.by_id.contains_key(&format!("slow-{i}")))
    });
    assert!(missing_ids(&reader.seen, "slow", n).is_empty());
    assert!(
        reader.seen.dead_letters.is_empty(),
        "{:?}",
        reader.seen.dead_letters.len()
    );
    assert_eq!(reader.seen.duplicates, 0);
    let (_, page) = http_get(w.started.metrics_address, "/metrics");
    assert!(
        metric(&page, "ml_worker_partition_waits_total{for=\"schema\"}").unwrap_or(0.0) >= 1.0,
        "{page}"
    );
    assert!(w.stop().clean);
    assert_eq!(s.committed_total(2), 2 * n as i64 + 1);
}

/// A partition revoked while parked on a schema comes back to this worker
/// readable: librdkafka keeps a partition's pause across unassign and
/// assign, so a parked partition that went to another replica and back
/// used to stay paused for good.
#[test]
fn a_partition_revoked_while_parked_is_read_again_when_it_comes_back() {
    let gate = Arc::new(AtomicBool::new(false));
    let (url, _) = fake_schema_registry_gated(
        vec![
            (7, ml_worker::events::FEATURE_EVENT_SCHEMA.to_string()),
            (8, evolved_feature_schema()),
        ],
        Some((8, gate.clone())),
        None,
    );
    let partitions = 4;
    let s = Setup::new(partitions);
    let cfg = s.config(
        "avro",
        &format!("schema_registry: {{url: \"{url}\", timeout_ms: 60000}}"),
    );
    let a = start(cfg.clone());
    let raw: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", s.brokers())
        .create()
        .unwrap();
    let event = |i: u64| ml_worker::loadgen::event(&s.samples, "rp", i, 1);
    // per partition: a record under the slow schema 8, then 4 under 7
    let mut n = 0;
    for p in 0..partitions {
        send_framed(&raw, &s.features, p, &event(n), 8);
        n += 1;
        for _ in 0..4 {
            send_framed(&raw, &s.features, p, &event(n), 7);
            n += 1;
        }
    }
    raw.flush(Duration::from_secs(10)).unwrap();
    let waits = |addr| {
        let (_, page) = http_get(addr, "/metrics");
        metric(&page, "ml_worker_partition_waits_total{for=\"schema\"}").unwrap_or(0.0)
    };
    let assigned = |addr| {
        let (_, page) = http_get(addr, "/metrics");
        metric(&page, "ml_worker_assigned_partitions").unwrap_or(0.0) as i32
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while waits(a.started.metrics_address) < partitions as f64 {
        assert!(Instant::now() < deadline, "partitions never parked");
        std::thread::sleep(Duration::from_millis(50));
    }
    // a second replica takes some of the parked partitions, then leaves
    let b = start(cfg);
    let deadline = Instant::now() + Duration::from_secs(30);
    while assigned(b.started.metrics_address) == 0 {
        assert!(Instant::now() < deadline, "the second replica got nothing");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(b.stop().clean);
    let deadline = Instant::now() + Duration::from_secs(30);
    while assigned(a.started.metrics_address) < partitions {
        assert!(
            Instant::now() < deadline,
            "the partitions did not come back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // the committed-offset lag covers every assigned partition, also those
    // this worker has not committed since they came back (from librdkafka's
    // statistics, every 5 s): each has its 4 records after the parked one
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, page) = http_get(a.started.metrics_address, "/metrics");
        let lags: Vec<f64> = page
            .lines()
            .filter(|l| l.starts_with("ml_worker_committed_offset_lag{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        if lags.len() == partitions as usize && lags.iter().all(|&l| l == 5.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed-offset lag per partition: {lags:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    gate.store(true, Ordering::Relaxed);
    let mut reader = s.reader(WireFormat::Avro);
    reader.read(Duration::from_secs(30), |seen| seen.by_id.len() as u64 >= n);
    let missing = missing_ids(&reader.seen, "rp", n);
    assert!(missing.is_empty(), "never read again: {missing:?}");
    assert!(reader.seen.dead_letters.is_empty());
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.committed_total(partitions) < n as i64 {
        assert!(
            Instant::now() < deadline,
            "offsets not committed to the end"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(a.stop().clean);
}

/// A registry that answers 503 for a while does not turn good events into
/// dead letters: their partition waits (asking again every second, up to
/// 30 s) and is served once the registry answers; the other partition
/// goes on meanwhile.
#[test]
fn events_wait_out_a_schema_registry_outage_instead_of_being_dead_lettered() {
    let down = Arc::new(AtomicBool::new(false));
    let (url, _) = fake_schema_registry_gated(
        vec![
            (7, ml_worker::events::FEATURE_EVENT_SCHEMA.to_string()),
            (8, evolved_feature_schema()),
        ],
        None,
        Some(down.clone()),
    );
    let s = Setup::new(2);
    let cfg = s.config("avro", &format!("schema_registry: {{url: \"{url}\"}}"));
    let w = start(cfg);
    let raw: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", s.brokers())
        .create()
        .unwrap();
    let event = |prefix: &str, i: u64| ml_worker::loadgen::event(&s.samples, prefix, i, 1);
    send_framed(&raw, &s.features, 1, &event("warm", 0), 7);
    raw.flush(Duration::from_secs(10)).unwrap();
    let mut reader = s.reader(WireFormat::Avro);
    reader.read(Duration::from_secs(30), |seen| !seen.by_id.is_empty());
    down.store(true, Ordering::Relaxed);
    let n = 20;
    for i in 0..n {
        send_framed(&raw, &s.features, 0, &event("out", i), 8);
        send_framed(&raw, &s.features, 1, &event("on", i), 7);
    }
    raw.flush(Duration::from_secs(10)).unwrap();
    reader.read(Duration::from_secs(20), |seen| {
        (0..n).all(|i| seen.by_id.contains_key(&format!("on-{i}")))
    });
    assert!(
        missing_ids(&reader.seen, "on", n).is_empty(),
        "the other partition waited"
    );
    // the outage lasts a few more seconds, then the registry answers
    std::thread::sleep(Duration::from_secs(3));
    down.store(false, Ordering::Relaxed);
    reader.read(Duration::from_secs(30), |seen| {
        (0..n).all(|i| seen.by_id.contains_key(&format!("out-{i}")))
    });
    assert!(missing_ids(&reader.seen, "out", n).is_empty());
    assert!(
        reader.seen.dead_letters.is_empty(),
        "dead-lettered during the outage: {:?}",
        reader
            .seen
            .dead_letters
            .iter()
            .map(|d| d.headers["error.reason"].clone())
            .collect::<Vec<_>>()
    );
    assert!(w.stop().clean);
}

#[test]
fn avro_with_a_schema_registry_reads_shipped_and_evolved_writers_and_registers_outputs() {
    use ml_worker::events::{write_feature_datum, FEATURE_EVENT_SCHEMA};
    // an evolved producer schema: one more field, with a default
    let (url, subjects) = fake_schema_registry(vec![
        (7, FEATURE_EVENT_SCHEMA.to_string()),
        (8, evolved_feature_schema()),
    ]);
    let s = Setup::new(2);
    let cfg = s.config("avro", &format!("schema_registry: {{url: \"{url}\"}}"));
    let w = start(cfg);
    let load = Load::new(&s.brokers()).unwrap();
    let n = 100u64;
    for i in 0..n {
        let e = ml_worker::loadgen::event(&s.samples, "sr", i, 1);
        let id: u32 = if i % 2 == 0 { 7 } else { 8 };
        let mut msg = vec![0];
        msg.extend_from_slice(&id.to_be_bytes());
        write_feature_datum(&e, &mut msg);
        if id == 8 {
            msg.push(12); // "source": a 6-byte string
            msg.extend_from_slice(b"feed-a");
        }
        load.send(&s.features, Some(e.symbol.as_bytes()), &msg)
            .unwrap();
    }
    let mut unknown = vec![0, 0, 0, 0, 99];
    write_feature_datum(
        &ml_worker::loadgen::event(&s.samples, "sr", n, 1),
        &mut unknown,
    );
    load.send(&s.features, Some(b"unknown-id"), &unknown)
        .unwrap();
    load.flush(Duration::from_secs(10)).unwrap();
    let mut reader = s.reader(WireFormat::Avro);
    reader.read(Duration::from_secs(30), |seen| {
        seen.by_id.len() as u64 >= n && !seen.dead_letters.is_empty()
    });
    let seen = &reader.seen;
    assert_eq!(seen.by_id.len() as u64, n, "both writer schemas decode");
    check_against_reference(seen, &s.samples, "sr");
    assert_eq!(seen.dead_letters.len(), 1);
    let reason = &seen.dead_letters[0].headers["error.reason"];
    assert!(reason.contains("99"), "{reason}");
    let subjects = subjects.lock().unwrap().clone();
    assert!(
        subjects.contains(&format!("{}-value", s.predictions)),
        "{subjects:?}"
    );
    assert!(
        subjects.contains(&format!("{}-value", s.signals)),
        "{subjects:?}"
    );
    assert!(w.stop().clean);
}

/// The value of an unlabelled metric in a `/metrics` page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn slow_deliveries_pause_the_input_instead_of_piling_up_and_nothing_is_lost() {
    if mock_only("injects Produce errors (mock cluster fault injection)") {
        return;
    }
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let s = Setup::new(4);
    let yaml = s
        .yaml("avro-raw", "")
        .replace(
            "batching: {max_batch_size: 200",
            "batching: {max_batch_size: 50",
        )
        .replace(
            "delivery: {commit_interval_ms: 100",
            "delivery: {max_in_flight: 200, commit_interval_ms: 100",
        );
    let cfg = s.config_from(&yaml);
    assert_eq!(cfg.max_in_flight, 200);
    // a backlog waits before the worker starts
    let n = 2000;
    produce_in_background(&s, "p", 0, n, 50_000.0)
        .join()
        .unwrap();
    // then the broker refuses the next produce requests (a retriable error):
    // the worker's outputs wait while its input could flow freely
    s.broker.embedded().cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 25],
    );
    let w = start(cfg);
    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(60), |seen| seen.by_id.len() as u64 >= n);
    let missing = missing_ids(&reader.seen, "p", n);
    assert!(missing.is_empty(), "{} lost", missing.len());
    let (_, metrics) = http_get(w.started.metrics_address, "/metrics");
    let pauses = metric(&metrics, "ml_worker_backpressure_pauses_total").unwrap_or(0.0);
    assert!(pauses >= 1.0, "never paused:\n{metrics}");
    // the byte count returns to zero once everything went out (no leak that
    // would pause the input for good)
    assert!(
        metric(&metrics, "ml_worker_in_flight_bytes").is_some(),
        "{metrics}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = http_get(w.started.metrics_address, "/metrics");
        if metric(&m, "ml_worker_in_flight_bytes") == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "bytes never drained:\n{m}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(w.stop().clean);
    assert_eq!(s.committed_total(4), n as i64);
}

#[test]
fn at_most_once_serves_nothing_whose_offsets_could_not_be_committed() {
    if mock_only("injects OffsetCommit errors (mock cluster fault injection)") {
        return;
    }
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let s = Setup::new(2);
    let yaml = s.yaml("avro-raw", "").replace(
        "delivery: {commit_interval_ms: 100",
        "delivery: {mode: \"at-most-once\", commit_interval_ms: 100",
    );
    let cfg = s.config_from(&yaml);
    let n = 500;
    produce_in_background(&s, "q", 0, n, 50_000.0)
        .join()
        .unwrap();
    // the first batch's commit fails on every try
    s.broker.embedded().cluster().request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 3],
    );
    let w = start(cfg);
    // once a commit has failed (its events skipped), later events' commits
    // cover everything read (a partition whose last batch was skipped has
    // its offsets committed by the next batch there)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = http_get(w.started.metrics_address, "/metrics");
        if metric(&metrics, "ml_worker_at_most_once_skipped_total").unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no commit failed:\n{metrics}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let later = 100;
    produce_in_background(&s, "q", n, later, 50_000.0)
        .join()
        .unwrap();
    let n = n + later;
    while s.committed_total(2) < n as i64 {
        assert!(Instant::now() < deadline, "offsets never committed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, metrics) = http_get(w.started.metrics_address, "/metrics");
    let skipped = metric(&metrics, "ml_worker_at_most_once_skipped_total").unwrap_or(0.0) as u64;
    assert!(skipped >= 1 && skipped < n, "skipped {skipped}:\n{metrics}");
    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(30), |seen| {
        seen.by_id.len() as u64 + skipped >= n
    });
    assert_eq!(
        reader.seen.by_id.len() as u64 + skipped,
        n,
        "served + skipped"
    );
    assert_eq!(reader.seen.duplicates, 0);
    assert!(w.stop().clean);
}

/// Periodic commits that fail (as they do during a rebalance) are re-issued
/// at the next interval while the worker is idle: the committed offsets
/// reach the end of the input within `commit_interval_ms` + 2 s after the
/// failures stop, every attempt is counted, and the lag gauge reaches 0.
/// (Async commit results used to be dropped by librdkafka: a failed
/// commit was only re-issued once new events arrived.)
#[test]
fn failed_periodic_commits_are_reissued_while_idle_and_every_attempt_is_counted() {
    if mock_only("injects OffsetCommit errors (mock cluster fault injection)") {
        return;
    }
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let s = Setup::new(2);
    let cfg = s.config("avro-raw", "");
    let n = 300;
    produce_in_background(&s, "c", 0, n, 50_000.0)
        .join()
        .unwrap();
    // the worker reads everything in its first interval; its next commits fail
    let failures = 8;
    s.broker.embedded().cluster().request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 8],
    );
    let w = start(cfg);
    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(30), |seen| seen.by_id.len() as u64 >= n);
    assert!(missing_ids(&reader.seen, "c", n).is_empty());
    // no new events from here on
    let served = Instant::now();
    let commit_interval = Duration::from_millis(100);
    let deadline = served + commit_interval * (failures + 1) + Duration::from_secs(2);
    loop {
        let committed = s.committed_total(2);
        if committed == n as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed offsets stayed at {committed} of {n} while the worker was idle"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // the broker may hold the commit a moment before the worker polls
    // its result
    let counted = Instant::now() + Duration::from_secs(5);
    let (errors, ok, page) = loop {
        let (_, page) = http_get(w.started.metrics_address, "/metrics");
        let errors = metric(&page, "ml_worker_commits_total{result=\"error\"}").unwrap_or(0.0);
        let ok = metric(&page, "ml_worker_commits_total{result=\"ok\"}").unwrap_or(0.0);
        if ok >= 1.0 || Instant::now() > counted {
            break (errors, ok, page);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        errors >= failures as f64 && ok >= 1.0,
        "every commit attempt counted (errors {errors}, ok {ok}):\n{page}"
    );
    // the lag gauge, per partition, once the broker took the last commit
    let lag_deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, page) = http_get(w.started.metrics_address, "/metrics");
        let lags: Vec<f64> = page
            .lines()
            .filter(|l| l.starts_with("ml_worker_committed_offset_lag{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        if lags.len() == 2 && lags.iter().all(|&l| l == 0.0) {
            break;
        }
        assert!(
            Instant::now() < lag_deadline,
            "committed-offset lag per partition: {lags:?}\n{page}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(w.stop().clean);
}

/// `max_batch_size` holds for every inference call, also when records come
/// in bursts of hundreds (a backlog): it used to be checked once per burst
/// of up to 512 records, so a limit of 5 gave batches of hundreds.
#[test]
fn max_batch_size_is_a_hard_limit_per_model_batch_even_from_a_backlog() {
    let s = Setup::new(2);
    let yaml = s.yaml("avro-raw", "").replace(
        "batching: {max_batch_size: 200, max_wait_ms: 2}",
        "batching: {max_batch_size: 5, max_wait_ms: 50}",
    );
    let cfg = s.config_from(&yaml);
    assert_eq!(cfg.batching.max_batch_size, 5);
    let n = 4000;
    produce_in_background(&s, "b", 0, n, 200_000.0)
        .join()
        .unwrap();
    let w = start(cfg);
    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(60), |seen| seen.by_id.len() as u64 >= n);
    assert!(missing_ids(&reader.seen, "b", n).is_empty());
    let (_, page) = http_get(w.started.metrics_address, "/metrics");
    let mut models = 0;
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("ml_worker_batch_size_count{") else {
            continue;
        };
        let (labels, count) = rest.split_once("} ").unwrap();
        let within = format!("ml_worker_batch_size_bucket{{{labels},le=\"5\"}} {count}");
        assert!(
            page.lines().any(|l| l == within),
            "a batch over max_batch_size 5 ({labels}: {count} batches):\n{page}"
        );
        models += 1;
    }
    assert!(models >= 2, "batch sizes of every model:\n{page}");
    assert!(w.stop().clean);
}

#[test]
fn at_most_once_commits_before_publishing_and_still_serves_every_event() {
    let s = Setup::new(2);
    let yaml = s.yaml("avro-raw", "").replace(
        "delivery: {commit_interval_ms: 100",
        "delivery: {mode: \"at-most-once\", commit_interval_ms: 100",
    );
    let cfg = s.config_from(&yaml);
    let w = start(cfg);
    let n = 500;
    produce_in_background(&s, "m", 0, n, 5000.0).join().unwrap();
    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(30), |seen| seen.by_id.len() as u64 >= n);
    assert!(missing_ids(&reader.seen, "m", n).is_empty());
    // offsets were committed as read, before the outputs were sent
    assert_eq!(s.committed_total(2), n as i64);
    assert!(w.stop().clean);
}

/// A feature event for one of the hostile models (features f0..f3).
fn hostile_event(model: &str, id: String, v: f64) -> Vec<u8> {
    let e = ml_worker::events::FeatureEvent {
        event_id: id,
        model: model.into(),
        symbol: "SYM".into(),
        event_time: ml_worker::loadgen::now_ms(),
        features: (0..4).map(|i| (format!("f{i}"), v)).collect(),
    };
    let mut b = Vec::new();
    ml_worker::loadgen::encode_feature(WireFormat::AvroRaw, &e, &mut b);
    b
}

/// A lazy model still loading holds back only the partition whose record
/// names it: with a single inference thread, events for a loaded model on
/// the other partition are served while the load runs (the inference
/// thread used to wait for the load, holding every partition it serves),
/// and the waiting records are decided once the load is over (here: refused
/// at its deadline, as dead letters).
#[test]
fn a_lazy_model_still_loading_holds_back_only_its_partition() {
    let s = Setup::new(2);
    let shipped = std::fs::read_to_string(root().join("config/models.yaml")).unwrap();
    let lgbm = shipped
        .split("\n  - ")
        .find(|m| m.contains("diabetes_lgbm"))
        .unwrap()
        .replace("../models/", &format!("{}/models/", root().display()));
    let load_timeout = Duration::from_secs(8);
    let registry = format!(
        "models:\n  - {}\n  - name: \"lazy_hang\"\n    path: \"{}\"\n    kind: \"onnx\"\n    features: [\"f0\", \"f1\", \"f2\", \"f3\"]\n    target: \"y\"\n    task_type: \"regression\"\n    lazy: true\n    load_timeout_ms: {}\n",
        lgbm.trim_end(),
        root()
            .join("tests/fixtures/hostile/onnx_loop_forever.onnx")
            .display(),
        load_timeout.as_millis()
    );
    let reg_file = s.dir.path().join("models.yaml");
    std::fs::write(&reg_file, registry).unwrap();
    let yaml = s
        .yaml("avro-raw", "")
        .replace(
            &root().join("config/models.yaml").display().to_string(),
            &reg_file.display().to_string(),
        )
        .replace(
            "batching: {max_batch_size: 200, max_wait_ms: 2}",
            "batching: {max_batch_size: 200, max_wait_ms: 2, inference_threads: 1}",
        );
    let cfg = s.config_from(&yaml);
    assert_eq!(cfg.inference_threads, 1);
    let w = start(cfg);
    let raw: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", s.brokers())
        .create()
        .unwrap();
    let waiting = 5;
    for i in 0..waiting {
        let key = format!("lazy-{i}");
        let v = hostile_event("lazy_hang", key.clone(), 1.0);
        raw.send(
            BaseRecord::to(&s.features)
                .partition(0)
                .key(&key)
                .payload(&v),
        )
        .unwrap();
    }
    let diabetes = s
        .samples
        .iter()
        .find(|x| x.model == "diabetes_lgbm")
        .unwrap();
    let good = 100u64;
    let sent = Instant::now();
    for i in 0..good {
        let e = ml_worker::loadgen::event(
            std::slice::from_ref(diabetes),
            "g",
            i,
            ml_worker::loadgen::now_ms(),
        );
        let mut b = Vec::new();
        ml_worker::loadgen::encode_feature(WireFormat::AvroRaw, &e, &mut b);
        raw.send(
            BaseRecord::to(&s.features)
                .partition(1)
                .key("g")
                .payload(&b),
        )
        .unwrap();
    }
    raw.flush(Duration::from_secs(10)).unwrap();
    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(30), |seen| {
        seen.by_id.keys().filter(|k| k.starts_with("g-")).count() as u64 >= good
    });
    let served_in = sent.elapsed();
    assert!(missing_ids(&reader.seen, "g", good).is_empty());
    assert!(
        served_in < load_timeout / 2 && reader.seen.dead_letters.is_empty(),
        "the other partition waited for the load ({served_in:?}, {} dead letters)",
        reader.seen.dead_letters.len()
    );
    // the waiting records: refused once the load passed its deadline
    reader.read(Duration::from_secs(30), |seen| {
        seen.dead_letters.len() >= waiting
    });
    assert_eq!(reader.seen.dead_letters.len(), waiting);
    for d in &reader.seen.dead_letters {
        let reason = &d.headers["error.reason"];
        assert!(reason.contains("deadline"), "{reason}");
    }
    let (_, page) = http_get(w.started.metrics_address, "/metrics");
    assert!(
        metric(&page, "ml_worker_partition_waits_total{for=\"model\"}").unwrap_or(0.0) >= 1.0,
        "{page}"
    );
    assert!(w.stop().clean);
    assert_eq!(s.committed_total(2), good as i64 + waiting as i64);
}

#[test]
fn models_that_never_return_are_cut_off_by_their_deadlines_while_every_other_model_serves() {
    let s = Setup::new(2);
    let hostile = root().join("tests/fixtures/hostile");
    // the shipped LightGBM model, plus three that never return: an ONNX
    // model whose load never ends (lazy, so the first event starts it), an
    // ONNX model and a TorchScript model that loop on positive rows
    let shipped = std::fs::read_to_string(root().join("config/models.yaml")).unwrap();
    let lgbm = shipped
        .split("\n  - ")
        .find(|m| m.contains("diabetes_lgbm"))
        .unwrap()
        .replace("../models/", &format!("{}/models/", root().display()));
    let hang = |name: &str, file: &str, kind: &str, extra: &str| {
        format!(
            "  - name: \"{name}\"\n    path: \"{}\"\n    kind: \"{kind}\"\n    features: [\"f0\", \"f1\", \"f2\", \"f3\"]\n    target: \"y\"\n    task_type: \"regression\"\n{extra}",
            hostile.join(file).display()
        )
    };
    let registry = format!(
        "models:\n  - {}\n{}{}{}{}",
        lgbm.trim_end(),
        hang(
            "lazy_hang",
            "onnx_loop_forever.onnx",
            "onnx",
            "    lazy: true\n    load_timeout_ms: 1500\n"
        ),
        // the same, with a fallback that lists other features: its rows are
        // remapped by name (absent features are missing, which trees take)
        hang(
            "lazy_hang_fb",
            "onnx_loop_forever.onnx",
            "onnx",
            "    lazy: true\n    load_timeout_ms: 1500\n    fallback: \"diabetes_lgbm\"\n"
        ),
        hang(
            "onnx_hang",
            "onnx_loop_on_positive.onnx",
            "onnx",
            "    inference_timeout_ms: 500\n"
        ),
        hang(
            "torch_hang",
            "ts_loop_on_positive.pt",
            "torch",
            "    inference_timeout_ms: 500\n"
        ),
    );
    let reg_file = s.dir.path().join("models.yaml");
    std::fs::write(&reg_file, registry).unwrap();
    let yaml = s
        .yaml("avro-raw", "")
        .replace(
            &root().join("config/models.yaml").display().to_string(),
            &reg_file.display().to_string(),
        )
        .replace("shutdown_timeout_ms: 10000", "shutdown_timeout_ms: 3000");
    let cfg = s.config_from(&yaml);
    let w = start(cfg);

    // good events and hostile ones interleaved on both partitions
    let raw: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", s.brokers())
        .create()
        .unwrap();
    let good = 400u64;
    let diabetes = s
        .samples
        .iter()
        .find(|x| x.model == "diabetes_lgbm")
        .unwrap();
    let mut hostile_keys = Vec::new();
    let mut fallback_ids = Vec::new();
    let mut full_ids = Vec::new();
    for i in 0..good {
        let e = ml_worker::loadgen::event(
            std::slice::from_ref(diabetes),
            "g",
            i,
            ml_worker::loadgen::now_ms(),
        );
        let mut b = Vec::new();
        ml_worker::loadgen::encode_feature(WireFormat::AvroRaw, &e, &mut b);
        let key = format!("good-{i}");
        raw.send(BaseRecord::to(&s.features).key(&key).payload(&b))
            .unwrap();
        if i % 50 == 10 {
            let key = format!("lazy_hang_fb-{i}");
            let v = hostile_event("lazy_hang_fb", key.clone(), 1.0);
            raw.send(BaseRecord::to(&s.features).key(&key).payload(&v))
                .unwrap();
            fallback_ids.push(key);
            // an event with the fallback's own features: served as the
            // fallback would serve it alone (its rows are the event as
            // received, not the lazy model's columns)
            let mut full = e.clone();
            full.model = "lazy_hang_fb".into();
            full.event_id = format!("lazy_hang_fb-full-{i}");
            ml_worker::loadgen::encode_feature(WireFormat::AvroRaw, &full, &mut b);
            raw.send(BaseRecord::to(&s.features).key(&full.event_id).payload(&b))
                .unwrap();
            let (_, row) = ml_worker::loadgen::event_row(std::slice::from_ref(diabetes), i);
            full_ids.push((full.event_id.clone(), diabetes.expected[row]));
            for model in ["lazy_hang", "onnx_hang", "torch_hang"] {
                let key = format!("{model}-{i}");
                let v = hostile_event(model, key.clone(), 1.0);
                raw.send(BaseRecord::to(&s.features).key(&key).payload(&v))
                    .unwrap();
                hostile_keys.push((model, key));
            }
        }
    }
    raw.flush(Duration::from_secs(10)).unwrap();

    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(60), |seen| {
        seen.by_id.keys().filter(|k| k.starts_with("g-")).count() as u64 >= good
            && seen.dead_letters.len() >= hostile_keys.len()
            && fallback_ids.iter().all(|id| seen.by_id.contains_key(id))
            && full_ids.iter().all(|(id, _)| seen.by_id.contains_key(id))
    });
    let seen = &reader.seen;
    for (id, want) in &full_ids {
        let p = seen
            .by_id
            .get(id)
            .unwrap_or_else(|| panic!("{id}: not served by the fallback"));
        assert!(
            p.fallback && (p.prediction - want).abs() <= 1e-9 * want.abs(),
            "{id}: {} by the fallback, {want} by diabetes_lgbm itself",
            p.prediction
        );
    }
    for id in &fallback_ids {
        let p = seen
            .by_id
            .get(id)
            .unwrap_or_else(|| panic!("{id}: not served by the fallback"));
        assert!(p.fallback && p.model == "lazy_hang_fb", "{id}: {p:?}");
        // the output names the model that produced it
        assert_eq!(p.served_by.as_deref(), Some("diabetes_lgbm"), "{id}: {p:?}");
    }
    let missing = missing_ids(seen, "g", good);
    assert!(
        missing.is_empty(),
        "{} good events not predicted, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    for (model, key) in &hostile_keys {
        let d = seen
            .dead_letters
            .iter()
            .find(|d| d.key.as_deref() == Some(key.as_bytes()))
            .unwrap_or_else(|| panic!("no dead letter for {key}"));
        let reason = &d.headers["error.reason"];
        assert!(
            reason.contains("deadline") || reason.contains("unhealthy"),
            "{key}: {reason}"
        );
        if *model == "lazy_hang" {
            assert!(reason.contains("load_timeout_ms"), "{key}: {reason}");
        }
    }
    // the two that overran an inference call are unhealthy, and say so
    let (code, body) = http_get(w.started.metrics_address, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("model 'onnx_hang' unhealthy"), "{body}");
    assert!(body.contains("model 'torch_hang' unhealthy"), "{body}");
    let (_, metrics) = http_get(w.started.metrics_address, "/metrics");
    assert!(
        metrics.contains("ml_worker_model_unhealthy{model=\"onnx_hang\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ml_worker_model_unhealthy{model=\"torch_hang\"} 1"),
        "{metrics}"
    );
    // a stop is honoured within the drain deadline although a TorchScript
    // loop (which nothing can interrupt) still runs on an abandoned thread
    let t = Instant::now();
    let summary = w.stop();
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(summary.clean, "{summary:?}");
    assert_eq!(
        s.committed_total(2),
        (good as usize + hostile_keys.len() + fallback_ids.len() + full_ids.len()) as i64,
        "every input, served or dead-lettered, committed"
    );
}

#[cfg(feature = "torch")]
#[test]
fn a_torchscript_model_that_crashes_libtorch_loses_its_batch_to_dead_letters_and_serves_on() {
    // ts_sigfpe.pt divides INT64_MIN by -1 when f0 > 0.5: SIGFPE inside
    // libtorch. It runs in a process of its own, so the worker lives, the
    // batch's events become dead letters naming the signal, and the next
    // batch starts a new process
    let s = Setup::new(1);
    let reg_file = s.dir.path().join("models.yaml");
    std::fs::write(
        &reg_file,
        format!(
            "models:\n  - name: \"torch_crash\"\n    path: \"{}\"\n    kind: \"torch\"\n    features: [\"f0\", \"f1\", \"f2\", \"f3\"]\n    target: \"y\"\n    task_type: \"regression\"\n",
            root().join("tests/fixtures/hostile/ts_sigfpe.pt").display()
        ),
    )
    .unwrap();
    let yaml = s.yaml("avro-raw", "").replace(
        &root().join("config/models.yaml").display().to_string(),
        &reg_file.display().to_string(),
    );
    let w = start(s.config_from(&yaml));
    let raw: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", s.brokers())
        .create()
        .unwrap();
    let send = |key: &str, v: f64| {
        let e = hostile_event("torch_crash", key.to_string(), v);
        raw.send(BaseRecord::to(&s.features).key(key).payload(&e))
            .unwrap();
        raw.flush(Duration::from_secs(10)).unwrap();
    };
    let mut reader = s.reader(WireFormat::AvroRaw);
    let mut served = 0;
    for round in 0..2 {
        let crash = format!("crash-{round}");
        send(&crash, 1.0);
        reader.read(Duration::from_secs(30), |seen| {
            seen.dead_letters
                .iter()
                .any(|d| d.key.as_deref() == Some(crash.as_bytes()))
        });
        let d = reader
            .seen
            .dead_letters
            .iter()
            .find(|d| d.key.as_deref() == Some(crash.as_bytes()))
            .unwrap_or_else(|| panic!("no dead letter for {crash}"));
        let reason = &d.headers["error.reason"];
        assert!(
            reason.contains("model 'torch_crash': inference failed: the model's process died of signal 8 (SIGFPE"),
            "{reason}"
        );
        // events after the crash are served by a new process
        for i in 0..20 {
            send(&format!("ok-{round}-{i}"), 0.25);
        }
        served += 20;
        reader.read(Duration::from_secs(30), |seen| {
            seen.by_id.keys().filter(|k| k.starts_with("ok-")).count() >= served
        });
        for i in 0..20 {
            let id = format!("ok-{round}-{i}");
            let p = reader
                .seen
                .by_id
                .get(&id)
                .unwrap_or_else(|| panic!("{id}: not served after the crash"));
            assert_eq!(p.prediction, 1.0, "{id}: {p:?}");
        }
    }
    // crashes are not a deadline: the model stays healthy
    let (code, body) = http_get(w.started.metrics_address, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(w.stop().clean);
    assert_eq!(
        s.committed_total(1),
        42,
        "every input, served or dead-lettered, committed"
    );
}

#[test]
fn the_embedded_broker_refuses_a_record_it_cannot_keep_and_input_it_dropped_is_reported() {
    if mock_only("tests the embedded broker's own limits") {
        return;
    }
    let s = Setup::new(1);
    let cfg = s.config("avro-raw", "");
    let diabetes: Vec<Samples> = s
        .samples
        .iter()
        .filter(|x| x.model == "diabetes_lgbm")
        .cloned()
        .collect();
    let send_good = |prefix: &str, first: u64, n: u64| {
        let load = Load::new(&s.brokers()).unwrap();
        let t = Traffic {
            topic: &s.features,
            format: WireFormat::AvroRaw,
            samples: &diabetes,
            prefix,
        };
        load.events(&t, first, n, None, &AtomicBool::new(false))
            .unwrap();
        load.flush(Duration::from_secs(10)).unwrap();
    };

    // 1. a 17 MB record is refused by the broker with an error the producer
    //    sees, and the events around it are all served
    let w = start(cfg.clone());
    send_good("a", 0, 100);
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", s.brokers())
        .set("message.max.bytes", "30000000")
        .set("message.timeout.ms", "10000")
        .create()
        .unwrap();
    let payload = vec![7u8; 17 << 20];
    let delivery = block_on(producer.send(
        rdkafka::producer::FutureRecord::<(), [u8]>::to(&s.features).payload(&payload[..]),
        Duration::from_secs(10),
    ));
    let err = delivery.expect_err("the broker refuses a 17 MB record");
    assert!(err.0.to_string().contains("too large"), "{}", err.0);
    send_good("a", 100, 200);
    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(30), |seen| seen.by_id.len() >= 300);
    let missing = missing_ids(&reader.seen, "a", 300);
    assert!(
        missing.is_empty(),
        "{} events after the big record lost",
        missing.len()
    );
    w.stop();
    assert_eq!(s.committed_total(1), 300);

    // 2. while no worker runs, more than the broker keeps (5 MB a partition)
    //    is written: the committed position's records are dropped
    let filler: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", s.brokers())
        .create()
        .unwrap();
    for i in 0..40 {
        let v = vec![i as u8; 200_000];
        filler
            .send(BaseRecord::<(), [u8]>::to(&s.features).payload(&v[..]))
            .unwrap();
        filler.flush(Duration::from_secs(10)).unwrap();
    }
    send_good("b", 0, 20);
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", s.brokers())
        .create()
        .unwrap();
    let (low, _) = c
        .fetch_watermarks(&s.features, 0, Duration::from_secs(10))
        .unwrap();
    assert!(
        low > 300,
        "the broker kept everything (low watermark {low})"
    );

    // 3. the restarted worker finds its position gone: it says so and
    //    counts what it could not read, then serves what is left
    let w = start(cfg);
    reader.read(Duration::from_secs(30), |seen| {
        (0..20).all(|i| seen.by_id.contains_key(&format!("b-{i}")))
    });
    assert!((0..20).all(|i| reader.seen.by_id.contains_key(&format!("b-{i}"))));
    let want = format!(
        "ml_worker_input_skipped_total{{topic=\"{}\",partition=\"0\"}} {}",
        s.features,
        low - 300
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http_get(w.started.metrics_address, "/metrics");
        if metrics.contains(&want) {
            break;
        }
        assert!(Instant::now() < deadline, "no {want} in {metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
    w.stop();
}

/// Waits for a future on this thread (the delivery of one record).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn records_in_every_compression_codec_are_read() {
    let s = Setup::new(4);
    let cfg = s.config("avro-raw", "");
    let w = start(cfg);
    let diabetes = s
        .samples
        .iter()
        .find(|x| x.model == "diabetes_lgbm")
        .unwrap();
    let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
    for (c, codec) in codecs.iter().enumerate() {
        let p: ThreadedProducer<_> = ClientConfig::new()
            .set("bootstrap.servers", s.brokers())
            .set("compression.type", *codec)
            .set("linger.ms", "20")
            .create()
            .unwrap();
        for i in 0..50u64 {
            let n = c as u64 * 50 + i;
            let e = ml_worker::loadgen::event(std::slice::from_ref(diabetes), "z", n, 1);
            let mut b = Vec::new();
            ml_worker::loadgen::encode_feature(WireFormat::AvroRaw, &e, &mut b);
            p.send(BaseRecord::<(), [u8]>::to(&s.features).payload(&b[..]))
                .unwrap();
        }
        p.flush(Duration::from_secs(10)).unwrap();
    }
    // a compression bomb: 64 MB of zeros, a few kB on the wire
    let p: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", s.brokers())
        .set("compression.type", "gzip")
        .set("message.max.bytes", "100000000")
        .create()
        .unwrap();
    let zeros = vec![0u8; 64 << 20];
    p.send(BaseRecord::to(&s.features).key("bomb").payload(&zeros[..]))
        .unwrap();
    p.flush(Duration::from_secs(30)).unwrap();
    drop(zeros);
    let n = 50 * codecs.len() as u64;
    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(30), |seen| {
        seen.by_id.len() as u64 >= n && !seen.dead_letters.is_empty()
    });
    let bomb = &reader.seen.dead_letters[0];
    assert!(bomb.value.is_empty(), "the huge value is not copied");
    assert!(bomb.key.is_none());
    assert!(
        bomb.headers["error.reason"]
            .contains("record of 67108868 bytes is larger than input.max_record_bytes"),
        "{:?}",
        bomb.headers
    );
    assert!(bomb.headers.contains_key("payload.omitted"));
    let missing = missing_ids(&reader.seen, "z", n);
    assert!(
        missing.is_empty(),
        "{} not read, e.g. {:?} (codec {})",
        missing.len(),
        &missing[..missing.len().min(3)],
        codecs[missing
            .first()
            .map_or(0, |m| m[2..].parse::<usize>().unwrap() / 50)]
    );
    w.stop();
}

/// config/models.yaml copied to `dir/models.yaml` (model paths made
/// absolute) and `edit`ed, written the way deploy tools do: a new file
/// renamed over the old one.
fn registry_copy(dir: &std::path::Path, edit: impl Fn(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(root().join("config/models.yaml"))
        .unwrap()
        .replace(
            "path: \"../models/",
            &format!("path: \"{}/models/", root().display()),
        );
    let file = dir.join("models.yaml");
    let tmp = dir.join(".models.yaml.tmp");
    std::fs::write(&tmp, edit(text)).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    file
}

/// `text` with `version: VERSION` set on `model`'s entry.
fn with_version(text: String, model: &str, version: &str) -> String {
    let entry = format!("- name: \"{model}\"\n");
    assert!(text.contains(&entry), "no entry {model}");
    text.replace(&entry, &format!("{entry}    version: \"{version}\"\n"))
}

/// A worker config of `s` reading the registry at `file`.
fn config_with_registry(s: &Setup, extra: &str, file: &std::path::Path) -> Arc<WorkerConfig> {
    let yaml = s.yaml("avro-raw", extra).replace(
        &root().join("config/models.yaml").display().to_string(),
        &file.display().to_string(),
    );
    s.config_from(&yaml)
}

/// Per input partition, the versions of `model`'s predictions in input
/// order must only move forward through `order` (no output of an older
/// version after one of a newer). Returns how many predictions each
/// version made.
fn versions_in_order(seen: &ml_worker::loadgen::Seen, model: &str, order: &[&str]) -> Vec<usize> {
    let mut by_partition: std::collections::BTreeMap<i32, Vec<(i64, usize)>> = Default::default();
    let mut counts = vec![0; order.len()];
    for (p, o, m, v) in &seen.sources {
        if m != model {
            continue;
        }
        let i = order
            .iter()
            .position(|x| x == v)
            .unwrap_or_else(|| panic!("{model} served by version {v}, which was never loaded"));
        counts[i] += 1;
        by_partition.entry(*p).or_default().push((*o, i));
    }
    for (p, mut outs) in by_partition {
        outs.sort();
        for w in outs.windows(2) {
            assert!(
                w[0].1 <= w[1].1,
                "partition {p}: offset {} served by {} after offset {} by {}",
                w[1].0,
                order[w[1].1],
                w[0].0,
                order[w[0].1]
            );
        }
    }
    counts
}

#[test]
fn a_reload_under_load_swaps_versions_in_order_keeps_serving_after_a_failed_one_and_loses_nothing()
{
    let s = Setup::new(4);
    let file = registry_copy(s.dir.path(), |t| with_version(t, "diabetes_lgbm", "v1"));
    let cfg = config_with_registry(&s, "reload: {watch: false}", &file);
    let audit = Arc::new(ml_worker::audit::AuditStore::open(&cfg.audit_db, "reload-test").unwrap());
    let w = start_with(cfg, RegistryBuilder::new().audit(Some(audit.clone())));
    let n = 9000;
    let producer = produce_in_background(&s, "r", 0, n, 3000.0);
    // every registry swapped out must be freed, with the models only it held
    let old = std::sync::Mutex::new(Vec::new());
    let reload = |version: &str| {
        registry_copy(s.dir.path(), |t| with_version(t, "diabetes_lgbm", version));
        let before = w.models.current();
        let model = before.loaded("diabetes_lgbm").unwrap();
        old.lock()
            .unwrap()
            .push((Arc::downgrade(&before), Arc::downgrade(&model)));
        w.models.reload(Trigger::Call)
    };
    std::thread::sleep(Duration::from_millis(700));
    let done = reload("v2").expect("reload to v2");
    assert!(done.swapped, "{done:?}");
    assert_eq!(done.changes.len(), 1, "{done:?}");
    assert_eq!(done.changes[0].model, "diabetes_lgbm");
    assert_eq!(done.changes[0].old.as_deref(), Some("v1"));
    assert_eq!(done.changes[0].new.as_deref(), Some("v2"));
    std::thread::sleep(Duration::from_millis(700));
    // a wrong pin: refused, v2 keeps serving
    registry_copy(s.dir.path(), |t| {
        with_version(t, "diabetes_lgbm", "bad").replace(
            "223a28d33d8d32d6516dba1e2c93ed481dd9bd5ba5a700e03f8c028185ee0ae7",
            &"0".repeat(64),
        )
    });
    let refused = w
        .models
        .reload(Trigger::Call)
        .expect_err("a wrong pin is refused");
    assert!(
        refused.to_string().contains("checksum mismatch"),
        "{refused}"
    );
    // broken YAML: refused the same way
    std::fs::write(&file, "models: [ {name: ").unwrap();
    let refused = w
        .models
        .reload(Trigger::Call)
        .expect_err("broken YAML is refused");
    assert!(refused.to_string().contains("YAML"), "{refused}");
    std::thread::sleep(Duration::from_millis(500));
    let done = reload("v3").expect("reload to v3");
    assert!(done.swapped && done.changes.len() == 1, "{done:?}");
    assert_eq!(done.changes[0].old.as_deref(), Some("v2"), "{done:?}");
    producer.join().unwrap();

    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(60), |seen| seen.by_id.len() as u64 >= n);
    let missing = missing_ids(&reader.seen, "r", n);
    assert!(
        missing.is_empty(),
        "{} lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(
        reader.seen.dead_letters.len(),
        0,
        "{:?}",
        &reader.seen.dead_letters[..1]
    );
    let counts = versions_in_order(&reader.seen, "diabetes_lgbm", &["v1", "v2", "v3"]);
    eprintln!("diabetes_lgbm predictions by version v1/v2/v3: {counts:?}");
    assert!(
        counts.iter().all(|c| *c > 0),
        "every version served some: {counts:?}"
    );
    // the other models were taken over, not reloaded: one version each
    for (_, _, m, v) in &reader.seen.sources {
        if m != "diabetes_lgbm" {
            assert_eq!(v.len(), 12, "{m} keeps its checksum version: {v}");
        }
    }
    let page = http_get(w.started.metrics_address, "/metrics").1;
    assert_eq!(
        metric(&page, "ml_worker_reloads_total{result=\"ok\"}"),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        metric(&page, "ml_worker_reloads_total{result=\"failed\"}"),
        Some(2.0)
    );
    assert!(
        page.contains("ml_worker_model_info{model=\"diabetes_lgbm\",version=\"v3\""),
        "{page}"
    );
    assert!(
        !page.contains("version=\"v2\""),
        "the old version's series is gone"
    );
    for (registry, model) in old.lock().unwrap().iter() {
        assert!(
            registry.upgrade().is_none(),
            "a swapped-out registry is still held"
        );
        assert!(model.upgrade().is_none(), "a replaced model is still held");
    }
    let summary = w.stop();
    assert!(summary.clean, "{summary:?}");
    assert_eq!(s.committed_total(4), s.features_end_total(4));
    // audited: two swaps (old and new version) and two refusals
    let rows = audit.rows(None, Some(1000)).unwrap();
    let reloads: Vec<&str> = rows
        .iter()
        .filter(|r| r.event == "reload")
        .map(|r| r.detail.as_str())
        .collect();
    assert_eq!(reloads.len(), 4, "{reloads:#?}");
    assert!(
        reloads.iter().any(|d| d.contains("version v1 -> v2")),
        "{reloads:#?}"
    );
    assert!(
        reloads.iter().any(|d| d.contains("version v2 -> v3")),
        "{reloads:#?}"
    );
    assert_eq!(
        reloads
            .iter()
            .filter(|d| d.contains("reload refused"))
            .count(),
        2
    );
}

#[test]
fn file_changes_and_post_admin_reload_swap_the_registry_and_a_removed_model_stops_serving() {
    let s = Setup::new(2);
    let file = registry_copy(s.dir.path(), |t| t);
    let cfg = config_with_registry(&s, "reload: {debounce_ms: 100}", &file);
    let w = start(cfg);
    let addr = w.started.metrics_address;
    let wait_page = |what: &str, cond: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let page = http_get(addr, "/metrics").1;
            if cond(&page) {
                return page;
            }
            assert!(Instant::now() < deadline, "{what}: {page}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // 1. the file watch: a new models.yaml renamed into place
    registry_copy(s.dir.path(), |t| with_version(t, "diabetes_lgbm", "w2"));
    wait_page("the watched change is reloaded", &|p| {
        p.contains("ml_worker_model_info{model=\"diabetes_lgbm\",version=\"w2\"")
    });
    // 2. POST /admin/reload with nothing changed
    let (code, body) = http_post(addr, "/admin/reload", None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"result\":\"unchanged\""), "{body}");
    assert_eq!(http_get(addr, "/admin/reload").0, 405);
    // 3. a removed model: its events become dead letters (unknown model)
    let w_registry = std::fs::read_to_string(&file).unwrap();
    let start_at = w_registry.find("  - name: \"breast_cancer_xgb\"").unwrap();
    let end_at = start_at + w_registry[start_at..].find("\n\n").unwrap() + 2;
    std::fs::write(
        s.dir.path().join(".edit"),
        format!("{}{}", &w_registry[..start_at], &w_registry[end_at..]),
    )
    .unwrap();
    std::fs::rename(s.dir.path().join(".edit"), &file).unwrap();
    let page = wait_page("the removal is reloaded", &|p| {
        !p.contains("ml_worker_model_info{model=\"breast_cancer_xgb\"")
    });
    assert!(
        page.contains("ml_worker_reloads_total{result=\"ok\"} 2"),
        "{page}"
    );
    // 4. a broken file: 422 over HTTP, the models loaded before serve on
    std::fs::write(
        s.dir.path().join(".edit"),
        w_registry.replace(
            "kind: \"lightgbm\"",
            "kind: \"lightgbm\"\n    features: oops",
        ),
    )
    .unwrap();
    std::fs::rename(s.dir.path().join(".edit"), &file).unwrap();
    let (code, body) = http_post(addr, "/admin/reload", None);
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("features"), "{body}");
    let n = 400;
    let load = Load::new(&s.brokers()).unwrap();
    load.events(
        &s.traffic(WireFormat::AvroRaw, "x"),
        0,
        n,
        None,
        &AtomicBool::new(false),
    )
    .unwrap();
    load.flush(Duration::from_secs(10)).unwrap();
    let mut reader = s.reader(WireFormat::AvroRaw);
    reader.read(Duration::from_secs(30), |seen| {
        seen.by_id.len() + seen.dead_letters.len() >= n as usize
    });
    let xgb_events = (0..n)
        .filter(|i| load_samples_model(&s, *i) == "breast_cancer_xgb")
        .count();
    assert!(xgb_events > 0);
    assert_eq!(reader.seen.dead_letters.len(), xgb_events);
    assert!(
        reader.seen.dead_letters.iter().all(|d| d
            .headers
            .get("error.reason")
            .is_some_and(|r| r.contains("unknown model 'breast_cancer_xgb'"))),
        "{:?}",
        reader.seen.dead_letters.first()
    );
    assert_eq!(reader.seen.by_id.len(), n as usize - xgb_events);
    for p in reader.seen.by_id.values() {
        if p.model == "diabetes_lgbm" {
            assert_eq!(p.model_version, "w2");
        }
    }
    // refused over HTTP, and by the watch when it saw the file (unless the
    // POST's reload had already read it)
    let page = http_get(addr, "/metrics").1;
    let failed = metric(&page, "ml_worker_reloads_total{result=\"failed\"}").unwrap_or(0.0);
    assert!((1.0..=2.0).contains(&failed), "{page}");
    assert!(w.stop().clean);
}

/// Which model the `i`-th event of the sample stream names.
fn load_samples_model(s: &Setup, i: u64) -> String {
    let (si, _) = ml_worker::loadgen::event_row(&s.samples, i);
    s.samples[si].model.clone()
}

#[test]
fn post_admin_reload_wants_the_bearer_token_when_one_is_set() {
    let s = Setup::new(1);
    let file = registry_copy(s.dir.path(), |t| t);
    let token = "a-token-of-some-length-0123";
    let cfg = config_with_registry(
        &s,
        &format!("reload: {{watch: false, token: \"{token}\"}}"),
        &file,
    );
    let w = start(cfg);
    let addr = w.started.metrics_address;
    let (code, body) = http_post(addr, "/admin/reload", None);
    assert_eq!(code, 401, "{body}");
    let (code, _) = http_post(addr, "/admin/reload", Some("a-token-of-some-length-0124"));
    assert_eq!(code, 401);
    let (code, body) = http_post(addr, "/admin/reload", Some(token));
    assert_eq!(code, 200, "{body}");
    assert!(w.stop().clean);
}

/// POST `path` (optionally with a bearer token): the status and the body.
fn http_post(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|b| b.1.to_string())
        .unwrap_or_default();
    (code, body)
}

/// `text` (a registry) with `extra` entries appended and `fields` added to
/// `model`'s entry.
fn with_fields(text: String, model: &str, fields: &str) -> String {
    let entry = format!("- name: \"{model}\"\n");
    assert!(text.contains(&entry), "no entry {model}");
    text.replace(&entry, &format!("{entry}    {fields}\n"))
}

/// A second entry for `model`'s file, named `name`, with `version`.
fn twin(text: &str, model: &str, name: &str, version: &str) -> String {
    let at = text.find(&format!("  - name: \"{model}\"\n")).unwrap();
    let end = at + text[at..].find("\n\n").unwrap_or(text.len() - at);
    let entry = text[at..end]
        .replace(
            &format!("name: \"{model}\""),
            &format!("name: \"{name}\"\n    version: \"{version}\""),
        )
        .lines()
        .filter(|l| !l.trim_start().starts_with("sha256:") && !l.trim_start().starts_with("lazy:"))
        .collect::<Vec<_>>()
        .join("\n");
    format!("{text}\n{entry}\n")
}

/// Sends `n` events of the sample stream with symbols `S0`..`S{symbols-1}`
/// (more symbols than the samples' 8, for a canary split).
fn send_with_symbols(s: &Setup, prefix: &str, n: u64, symbols: u64) {
    let load = Load::new(&s.brokers()).unwrap();
    let mut buf = Vec::new();
    for i in 0..n {
        let mut e = ml_worker::loadgen::event(&s.samples, prefix, i, ml_worker::loadgen::now_ms());
        e.symbol = format!("S{}", i % symbols);
        ml_worker::loadgen::encode_feature(WireFormat::AvroRaw, &e, &mut buf);
        load.send(&s.features, Some(e.symbol.as_bytes()), &buf)
            .unwrap();
    }
    load.flush(Duration::from_secs(30)).unwrap();
}

#[test]
fn shadow_predictions_go_only_to_the_shadow_topic_and_a_canary_serves_a_stable_share_of_symbols() {
    use ml_worker::events::OutputRoute;
    use ml_worker::worker::batch::canary_bucket;
    let s = Setup::new(2);
    let shadow_topic = format!("{}.shadow", s.predictions);
    s.broker.create_topic(&shadow_topic, 2);
    let file = registry_copy(s.dir.path(), |t| {
        let t = twin(&t, "diabetes_lgbm", "diabetes_lgbm_next", "next");
        let t = twin(&t, "breast_cancer_xgb", "breast_cancer_xgb_next", "next");
        let t = with_fields(t, "diabetes_lgbm", "shadow: \"diabetes_lgbm_next\"");
        with_fields(
            t,
            "breast_cancer_xgb",
            "canary: {model: \"breast_cancer_xgb_next\", percent: 40}",
        )
    });
    let cfg = config_with_registry(&s, "reload: {watch: false}", &file);
    let symbols = 40;
    let n = 800;
    let mut routes_by_symbol: std::collections::HashMap<String, OutputRoute> = Default::default();
    // twice, with a restart between: the split must not move
    for run in ["c1", "c2"] {
        let w = start(cfg.clone());
        send_with_symbols(&s, run, n, symbols);
        let mut reader = s.reader(WireFormat::AvroRaw);
        let done = |seen: &ml_worker::loadgen::Seen| {
            (0..n).all(|i| seen.by_id.contains_key(&format!("{run}-{i}")))
        };
        reader.read(Duration::from_secs(30), done);
        let mine: Vec<_> = (0..n)
            .map(|i| reader.seen.by_id[&format!("{run}-{i}")].clone())
            .collect();
        assert_eq!(reader.seen.dead_letters.len(), 0);
        for p in &mine {
            assert_ne!(
                p.route,
                OutputRoute::Shadow,
                "a shadow output on the prediction topic: {p:?}"
            );
            match p.model.as_str() {
                "breast_cancer_xgb" => {
                    let canary = canary_bucket("breast_cancer_xgb", p.symbol.as_bytes()) < 4000;
                    let want = if canary {
                        OutputRoute::Canary
                    } else {
                        OutputRoute::Primary
                    };
                    assert_eq!(p.route, want, "{p:?}");
                    if canary {
                        assert_eq!(p.served_by.as_deref(), Some("breast_cancer_xgb_next"));
                        assert_eq!(p.model_version, "next");
                    } else {
                        assert_eq!(p.served_by, None);
                    }
                    let before = routes_by_symbol.insert(p.symbol.clone(), p.route);
                    assert!(
                        before.is_none_or(|r| r == p.route),
                        "{} moved: {p:?}",
                        p.symbol
                    );
                }
                _ => assert_eq!(p.route, OutputRoute::Primary, "{p:?}"),
            }
        }
        // canary signals are real signals, named as such
        let canary_signals = mine
            .iter()
            .filter(|p| p.route == OutputRoute::Canary)
            .filter(|p| reader.seen.signal_routes.get(&p.event_id) == Some(&OutputRoute::Canary))
            .count();
        assert!(canary_signals > 0, "no canary signal");
        assert!(reader
            .seen
            .signal_routes
            .values()
            .all(|r| *r != OutputRoute::Shadow));
        // the shadow topic: one shadow prediction per diabetes event, none else
        let mut shadow = ml_worker::loadgen::Reader::new(
            &s.brokers(),
            (&shadow_topic, WireFormat::AvroRaw),
            (&s.signals, WireFormat::AvroRaw),
            &s.dead_letters,
        )
        .unwrap();
        let diabetes: Vec<&str> = mine
            .iter()
            .filter(|p| p.model == "diabetes_lgbm")
            .map(|p| p.event_id.as_str())
            .collect();
        shadow.read(Duration::from_secs(30), |seen| {
            diabetes.iter().all(|id| seen.by_id.contains_key(*id))
        });
        for id in &diabetes {
            let sp = &shadow.seen.by_id[*id];
            assert_eq!(sp.route, OutputRoute::Shadow);
            assert_eq!(sp.model, "diabetes_lgbm");
            assert_eq!(sp.served_by.as_deref(), Some("diabetes_lgbm_next"));
            assert_eq!(sp.model_version, "next");
            // the same file: the same prediction as the primary's
            let primary = mine.iter().find(|p| p.event_id == *id).unwrap();
            assert_eq!(sp.prediction.to_bits(), primary.prediction.to_bits());
        }
        assert!(shadow
            .seen
            .by_id
            .values()
            .filter(|p| p.event_id.starts_with(run))
            .all(|p| p.model == "diabetes_lgbm"));
        let page = http_get(w.started.metrics_address, "/metrics").1;
        assert!(
            page.contains(
                "ml_worker_route_predictions_total{model=\"breast_cancer_xgb\",route=\"canary\"}"
            ),
            "{page}"
        );
        assert!(page.contains(
            "ml_worker_route_predictions_total{model=\"diabetes_lgbm\",route=\"shadow\"}"
        ));
        assert!(w.stop().clean);
    }
    let canary = routes_by_symbol
        .values()
        .filter(|r| **r == OutputRoute::Canary)
        .count();
    assert!(
        canary > 0 && canary < routes_by_symbol.len(),
        "{routes_by_symbol:?}"
    );
}

#[test]
fn a_kubernetes_configmap_update_a_swapped_data_link_is_reloaded() {
    // what the kubelet does with a mounted ConfigMap: the files are links
    // through `..data`, which is swapped atomically to a new folder
    let s = Setup::new(1);
    let mount = s.dir.path().join("mount");
    std::fs::create_dir(&mount).unwrap();
    let revision = |name: &str, version: &str| {
        let dir = mount.join(name);
        std::fs::create_dir(&dir).unwrap();
        registry_copy(&dir, |t| with_version(t, "diabetes_lgbm", version));
    };
    revision("..2026_12_01_one", "cm-1");
    std::os::unix::fs::symlink("..2026_12_01_one", mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/models.yaml", mount.join("models.yaml")).unwrap();
    let cfg = config_with_registry(&s, "reload: {debounce_ms: 100}", &mount.join("models.yaml"));
    let w = start(cfg);
    let addr = w.started.metrics_address;
    assert!(http_get(addr, "/metrics").1.contains("version=\"cm-1\""));
    revision("..2026_12_02_two", "cm-2");
    std::os::unix::fs::symlink("..2026_12_02_two", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = http_get(addr, "/metrics").1;
        if page.contains("ml_worker_model_info{model=\"diabetes_lgbm\",version=\"cm-2\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ConfigMap update was not reloaded: {page}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // events in the folder that change no watched file reload nothing
    std::fs::write(mount.join("unrelated.txt"), "x").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let page = http_get(addr, "/metrics").1;
    assert_eq!(
        metric(&page, "ml_worker_reloads_total{result=\"ok\"}"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        metric(&page, "ml_worker_reloads_total{result=\"unchanged\"}"),
        Some(0.0),
        "{page}"
    );
    assert!(w.stop().clean);
}

/// Exactly-once (`delivery.mode: exactly-once`): outputs and input offsets
/// in one Kafka transaction.
///
/// librdkafka's mock cluster accepts InitProducerId, AddPartitionsToTxn,
/// AddOffsetsToTxn, TxnOffsetCommit and EndTxn (and injects errors into
/// them), but `rd_kafka_mock_handle_TxnOffsetCommit` stores no offsets and
/// EndTxn writes no commit or abort markers: a `read_committed` reader sees
/// aborted records there, and a restart starts from the beginning. So the
/// mock tests prove the protocol sequence and the worker's error handling
/// (abort, rewind, retry, fencing), not the guarantee; the tests that run
/// on Apache Kafka (`make test-kafka`) prove that.
mod exactly_once {
    use super::*;
    use std::collections::HashMap;

    use ml_worker::events::Codec;
    use ml_worker::worker::WorkerError;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use rdkafka::Message;

    /// The test config in exactly-once mode, `delivery` fields added.
    pub(super) fn yaml(s: &Setup, delivery: &str) -> String {
        let y = s.yaml("avro-raw", "").replace(
            "delivery: {commit_interval_ms: 100",
            &format!("delivery: {{mode: \"exactly-once\", {delivery}commit_interval_ms: 100"),
        );
        assert!(y.contains("exactly-once"));
        y
    }

    /// A worker in this process whose result the test checks.
    pub(super) struct Eos {
        pub(super) stop: Arc<AtomicBool>,
        pub(super) handle: JoinHandle<Result<Summary, WorkerError>>,
        pub(super) metrics: Arc<Metrics>,
    }

    pub(super) fn start_eos(cfg: Arc<WorkerConfig>) -> Eos {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("ML_WORKER_LOG")
                    .unwrap_or_else(|_| "off".into()),
            )
            .with_test_writer()
            .try_init();
        let registry = Arc::new(
            RegistryBuilder::new()
                .open(&cfg.registry)
                .expect("registry"),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(Metrics::default());
        let registry = Models::fixed(registry, metrics.clone());
        let (s, m) = (stop.clone(), metrics.clone());
        let handle = std::thread::spawn(move || {
            let brokers = cfg.brokers.clone();
            ml_worker::worker::run(cfg, &brokers, registry, m, s, |_| {})
        });
        Eos {
            stop,
            handle,
            metrics,
        }
    }

    impl Eos {
        pub(super) fn counter(&self, name: &'static str) -> u64 {
            self.metrics.total(name)
        }
        pub(super) fn stop(self) -> Result<Summary, WorkerError> {
            self.stop.store(true, Ordering::Relaxed);
            self.handle.join().expect("worker thread")
        }
        /// Waits until `name` reaches `n`.
        fn wait_counter(&self, name: &'static str, n: u64, timeout: Duration) {
            let deadline = Instant::now() + timeout;
            while self.counter(name) < n {
                assert!(
                    Instant::now() < deadline && !self.handle.is_finished(),
                    "{name} stayed at {} (wanted {n}); worker finished: {}",
                    self.counter(name),
                    self.handle.is_finished()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Outputs of `topic` by the input they came from (`source.partition`,
    /// `source.offset` headers), read from the beginning with
    /// `isolation.level`, until `want` distinct inputs were seen and 2 s
    /// passed without a new record (or `timeout`).
    pub(super) fn outputs_by_source(
        brokers: &str,
        topic: &str,
        isolation: &str,
        want: usize,
        timeout: Duration,
    ) -> HashMap<(i32, i64), u32> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("count"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", isolation)
            .create()
            .unwrap();
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).unwrap();
        let mut seen: HashMap<(i32, i64), u32> = HashMap::new();
        let end = Instant::now() + timeout;
        let mut last = Instant::now();
        while Instant::now() < end && (seen.len() < want || last.elapsed() < Duration::from_secs(2))
        {
            let Some(Ok(m)) = c.poll(Duration::from_millis(50)) else {
                continue;
            };
            last = Instant::now();
            let h = |k: &str| {
                use rdkafka::message::Headers;
                m.headers().and_then(|h| {
                    h.iter()
                        .find(|x| x.key == k)
                        .and_then(|x| std::str::from_utf8(x.value?).ok()?.parse::<i64>().ok())
                })
            };
            let key = (
                h("source.partition").expect("source.partition") as i32,
                h("source.offset").expect("source.offset"),
            );
            *seen.entry(key).or_insert(0) += 1;
        }
        seen
    }

    /// The events in -> outputs out, in transactions: every event has one
    /// prediction and one signal, transactions are committed (and counted,
    /// with their latency), none aborted, and a stop commits the last one.
    /// On Apache Kafka the group's committed offsets are the input's end and
    /// a `read_committed` reader sees each output once. On the mock this
    /// proves only that the worker speaks the transactional protocol end to
    /// end: the mock stores no transactional offsets (the committed-offset
    /// check is skipped there) and would show aborted records too.
    #[test]
    fn exactly_once_commits_outputs_and_input_offsets_in_transactions() {
        let s = Setup::new(4);
        let cfg = s.config_from(&yaml(&s, "transaction_max_events: 300, "));
        assert_eq!(cfg.transaction_max_events, 300);
        let w = start_eos(cfg);
        let n = 1200u64;
        let load = Load::new(&s.brokers()).unwrap();
        load.events(
            &s.traffic(WireFormat::AvroRaw, "x"),
            0,
            n,
            None,
            &AtomicBool::new(false),
        )
        .unwrap();
        load.flush(Duration::from_secs(10)).unwrap();
        let mut reader = s.reader(WireFormat::AvroRaw);
        reader.read(Duration::from_secs(60), |seen| {
            seen.by_id.len() as u64 >= n && seen.signal_ids.len() as u64 >= n
        });
        let seen = &reader.seen;
        assert!(
            missing_ids(seen, "x", n).is_empty(),
            "{} seen",
            seen.by_id.len()
        );
        assert_eq!(seen.duplicates, 0);
        assert_eq!(seen.signals, n, "one signal per event");
        assert!(seen.dead_letters.is_empty());
        check_against_reference(seen, &s.samples, "x");
        let committed = w.counter("ml_worker_transactions_committed_total");
        assert!(committed >= 1, "no transaction committed");
        assert_eq!(w.counter("ml_worker_transactions_aborted_total"), 0);
        assert_eq!(
            w.counter("ml_worker_commits_total"),
            0,
            "the consumer commits nothing itself"
        );
        let page = w.metrics.render();
        let latency_count =
            metric(&page, "ml_worker_transaction_commit_latency_seconds_count").unwrap();
        assert!(latency_count >= 1.0, "{page}");
        let summary = w.stop().expect("worker");
        assert!(summary.clean, "{summary:?}");
        if brokers::external().is_some() {
            assert_eq!(s.committed_total(4), n as i64, "input offsets committed");
            let by_source = outputs_by_source(
                &s.brokers(),
                &s.predictions,
                "read_committed",
                n as usize,
                Duration::from_secs(30),
            );
            assert_eq!(by_source.len() as u64, n);
            assert!(by_source.values().all(|&c| c == 1));
        } else {
            eprintln!("committed offsets not checked: the mock keeps no transactional offsets");
        }
        eprintln!("exactly-once: {committed} transactions for {n} events");
    }

    /// An abortable error mid-transaction (AddPartitionsToTxn refused:
    /// TOPIC_AUTHORIZATION_FAILED, librdkafka purges the transaction's
    /// records) and one at commit (EndTxn: UNKNOWN_PRODUCER_ID, an abort
    /// with an epoch bump) each abort the transaction, rewind the input to
    /// the last commit and serve it again: every event gets its prediction,
    /// and transactions commit after. Retriable errors (a coordinator
    /// loading, on AddOffsetsToTxn and TxnOffsetCommit) are retried without
    /// an abort. The mock does not prove that the aborted outputs are
    /// invisible downstream (it writes no abort markers, so the reader here
    /// sees them: duplicates are allowed) nor where a restart would resume
    /// (it keeps no transactional offsets; the rewind uses the offsets the
    /// worker's own transactions committed).
    #[test]
    fn exactly_once_aborts_rewinds_and_serves_again_after_abortable_errors() {
        if mock_only("injects transactional request errors (mock cluster fault injection)") {
            return;
        }
        let s = Setup::new(4);
        let cfg = s.config_from(&yaml(&s, ""));
        let cluster = s.broker.embedded().cluster();
        cluster.request_errors(
            RDKafkaApiKey::AddPartitionsToTxn,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        );
        let w = start_eos(cfg);
        let load = Load::new(&s.brokers()).unwrap();
        let never = AtomicBool::new(false);
        let n = 600u64;
        load.events(&s.traffic(WireFormat::AvroRaw, "a"), 0, n, None, &never)
            .unwrap();
        load.flush(Duration::from_secs(10)).unwrap();
        w.wait_counter(
            "ml_worker_transactions_aborted_total",
            1,
            Duration::from_secs(30),
        );
        w.wait_counter(
            "ml_worker_transactions_committed_total",
            1,
            Duration::from_secs(30),
        );
        let mut reader = s.reader(WireFormat::AvroRaw);
        reader.read(Duration::from_secs(30), |seen| seen.by_id.len() as u64 >= n);
        assert!(missing_ids(&reader.seen, "a", n).is_empty());
        // at commit time: an abortable EndTxn, and retriable errors
        let committed = w.counter("ml_worker_transactions_committed_total");
        cluster.request_errors(
            RDKafkaApiKey::AddOffsetsToTxn,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 2],
        );
        cluster.request_errors(
            RDKafkaApiKey::TxnOffsetCommit,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 2],
        );
        cluster.request_errors(
            RDKafkaApiKey::EndTxn,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID],
        );
        load.events(&s.traffic(WireFormat::AvroRaw, "a"), n, n, None, &never)
            .unwrap();
        load.flush(Duration::from_secs(10)).unwrap();
        w.wait_counter(
            "ml_worker_transactions_aborted_total",
            2,
            Duration::from_secs(30),
        );
        w.wait_counter(
            "ml_worker_transactions_committed_total",
            committed + 1,
            Duration::from_secs(30),
        );
        reader.read(Duration::from_secs(30), |seen| {
            seen.by_id.len() as u64 >= 2 * n
        });
        let missing = missing_ids(&reader.seen, "a", 2 * n);
        assert!(
            missing.is_empty(),
            "{} lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        assert!(reader.seen.dead_letters.is_empty());
        // outputs of the aborted transaction come after (no abort markers here)
        reader.read(Duration::from_secs(1), |_| false);
        let aborted = w.counter("ml_worker_transactions_aborted_total");
        eprintln!(
            "exactly-once on the mock: {aborted} aborts; a reader sees {} predictions twice (the mock shows aborted records)",
            reader.seen.duplicates
        );
        let summary = w.stop().expect("worker");
        assert!(summary.clean, "{summary:?}");
    }

    /// An output the broker refuses for good (MSG_SIZE_TOO_LARGE on a
    /// Produce request) fails its transaction, which is aborted; read
    /// again, the inputs whose outputs were refused become dead letters
    /// (`error.stage: publish`), as under at-least-once, instead of failing
    /// every transaction that carries them again; every other input is
    /// predicted. The mock refuses the whole request on command; it does
    /// not prove which records a real broker would refuse.
    #[test]
    fn an_output_refused_for_good_becomes_a_dead_letter_after_the_abort() {
        if mock_only("injects Produce errors (mock cluster fault injection)") {
            return;
        }
        let s = Setup::new(2);
        let cfg = s.config_from(&yaml(&s, ""));
        let n = 400u64;
        // the input first: the injected error is for the worker's producer
        produce_in_background(&s, "r", 0, n, 50_000.0)
            .join()
            .unwrap();
        s.broker.embedded().cluster().request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
        );
        let w = start_eos(cfg);
        w.wait_counter(
            "ml_worker_transactions_aborted_total",
            1,
            Duration::from_secs(30),
        );
        let mut reader = s.reader(WireFormat::AvroRaw);
        let dead_ids = |seen: &ml_worker::loadgen::Seen| -> Vec<String> {
            seen.dead_letters
                .iter()
                .filter_map(|d| {
                    let e = Codec::new(WireFormat::AvroRaw, Default::default())
                        .decode_feature(&d.value)
                        .ok()?;
                    Some(e.event_id)
                })
                .collect()
        };
        reader.read(Duration::from_secs(30), |seen| {
            let dead: HashSet<String> = dead_ids(seen).into_iter().collect();
            (0..n).all(|i| {
                let id = format!("r-{i}");
                seen.by_id.contains_key(&id) || dead.contains(&id)
            })
        });
        let dead = dead_ids(&reader.seen);
        assert!(!dead.is_empty(), "no dead letter for the refused outputs");
        for d in &reader.seen.dead_letters {
            assert_eq!(d.headers["error.stage"], "publish", "{:?}", d.headers);
        }
        let dead: HashSet<String> = dead.into_iter().collect();
        let unserved: Vec<u64> = (0..n)
            .filter(|i| {
                let id = format!("r-{i}");
                !reader.seen.by_id.contains_key(&id) && !dead.contains(&id)
            })
            .collect();
        assert!(
            unserved.is_empty(),
            "{} neither predicted nor dead-lettered",
            unserved.len()
        );
        w.wait_counter(
            "ml_worker_transactions_committed_total",
            1,
            Duration::from_secs(30),
        );
        eprintln!(
            "refused outputs: {} inputs dead-lettered after {} abort(s)",
            dead.len(),
            w.counter("ml_worker_transactions_aborted_total")
        );
        assert!(w.stop().expect("worker").clean);
    }

    /// Fencing stops the worker with an error naming it and commits
    /// nothing after: PRODUCER_FENCED at a commit (EndTxn) ends an
    /// in-process worker's run with `WorkerError::Transaction`; the
    /// `ml-worker run` process whose InitProducerId is answered
    /// INVALID_PRODUCER_EPOCH exits non-zero with a log line saying it was
    /// fenced. The mock only answers with the injected error: no second
    /// producer really took the transactional id over (Apache Kafka does
    /// that in the SIGKILL test, where the restarted worker fences its
    /// zombie).
    #[test]
    fn a_fenced_producer_stops_the_worker_with_an_error_and_commits_nothing_more() {
        if mock_only("injects fencing errors (mock cluster fault injection)") {
            return;
        }
        let s = Setup::new(2);
        let cfg = s.config_from(&yaml(&s, ""));
        let cluster = s.broker.embedded().cluster();
        let w = start_eos(cfg);
        let load = Load::new(&s.brokers()).unwrap();
        let never = AtomicBool::new(false);
        load.events(&s.traffic(WireFormat::AvroRaw, "f"), 0, 200, None, &never)
            .unwrap();
        load.flush(Duration::from_secs(10)).unwrap();
        w.wait_counter(
            "ml_worker_transactions_committed_total",
            1,
            Duration::from_secs(30),
        );
        cluster.request_errors(
            RDKafkaApiKey::EndTxn,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
        );
        let committed = w.counter("ml_worker_transactions_committed_total");
        load.events(&s.traffic(WireFormat::AvroRaw, "f"), 200, 200, None, &never)
            .unwrap();
        load.flush(Duration::from_secs(10)).unwrap();
        // the worker stops by itself
        let deadline = Instant::now() + Duration::from_secs(30);
        while !w.handle.is_finished() {
            assert!(Instant::now() < deadline, "the fenced worker runs on");
            std::thread::sleep(Duration::from_millis(20));
        }
        let after = w.counter("ml_worker_transactions_committed_total");
        let e = w.handle.join().unwrap().expect_err("a fenced worker fails");
        let text = e.to_string();
        assert!(matches!(e, WorkerError::Transaction(_)), "{text}");
        assert!(text.contains("producer fenced"), "{text}");
        assert_eq!(after, committed, "nothing committed after the fencing");

        // the process: fenced at start, a non-zero exit and a line saying so
        let s = Setup::new(2);
        let file = s.dir.path().join("worker.yaml");
        std::fs::write(&file, yaml(&s, "")).unwrap();
        s.broker.embedded().cluster().request_errors(
            RDKafkaApiKey::InitProducerId,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH],
        );
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ml-worker"))
            .args(["run", "--config"])
            .arg(&file)
            .current_dir(root())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("error: exactly-once: producer fenced"),
            "{}\n{stderr}",
            out.status
        );
    }

    /// An `ml-worker run` process, with the lines it writes to stderr.
    struct Process {
        child: std::process::Child,
        lines: Arc<std::sync::Mutex<Vec<String>>>,
        metrics: std::net::SocketAddr,
    }

    impl Process {
        fn spawn(file: &std::path::Path) -> Process {
            use std::io::BufRead;
            let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ml-worker"))
                .args(["run", "--config"])
                .arg(file)
                .current_dir(root())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
            let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (tx, rx) = std::sync::mpsc::channel();
            let keep = lines.clone();
            std::thread::spawn(move || {
                for line in stderr.lines().map_while(Result::ok) {
                    if let Some(rest) = line.split_once("(metrics on http://") {
                        let _ = tx.send(rest.1.split('/').next().unwrap().to_string());
                    }
                    keep.lock().unwrap().push(line);
                }
            });
            let metrics = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|e| {
                    panic!(
                        "the worker does not start ({e}): {:#?}",
                        lines.lock().unwrap()
                    )
                })
                .parse()
                .unwrap();
            Process {
                child,
                lines,
                metrics,
            }
        }

        /// An unlabelled metric's value (None when the worker does not answer).
        fn metric(&self, name: &str) -> Option<f64> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(self.metrics).ok()?;
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut page = String::new();
            s.read_to_string(&mut page).ok()?;
            metric(&page, name)
        }

        fn assigned(&self) -> u64 {
            self.metric("ml_worker_assigned_partitions").unwrap_or(0.0) as u64
        }

        /// SIGTERM; asserts a clean exit within 30 s.
        fn terminate(mut self) {
            let pid = self.child.id().to_string();
            assert!(std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success());
            let t = Instant::now();
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    assert!(
                        status.success(),
                        "{status}: {:#?}",
                        self.lines.lock().unwrap()
                    );
                    return;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "still running after SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    impl Drop for Process {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) {
        let t = Instant::now();
        while !done() {
            assert!(t.elapsed() < timeout, "{what}: not within {timeout:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{what}: after {:.1} s", t.elapsed().as_secs_f64());
    }

    /// The guarantee, on Apache Kafka: 20,000 events over 8 partitions; the
    /// worker (`ml-worker run`, 5 s transactions, a stable
    /// `delivery.transactional_id`) is killed with SIGKILL mid-transaction,
    /// started again (its new producer fences the old one and aborts its
    /// open transaction), and a second replica (the default transactional
    /// id) joins while events flow, so the first revokes partitions with a
    /// transaction open (under the default KIP-848 group protocol). A
    /// `read_committed` reader then sees exactly one prediction and one
    /// signal per input, by event id and by `source.partition` and
    /// `source.offset`; the group's committed offsets are the input's end;
    /// and a `read_uncommitted` reader does see the killed worker's aborted
    /// outputs (predictions of the same inputs twice), so the test would
    /// notice if they were not aborted. Takes about a minute: the killed
    /// member holds its partitions until the broker's session timeout (45 s).
    #[test]
    fn exactly_once_on_kafka_one_output_per_input_through_sigkill_restart_and_rebalance() {
        if brokers::external().is_none() {
            eprintln!(
                "skipped on the embedded broker: it keeps no transactional offsets and writes no \
                 abort markers, so exactly-once is checked on Apache Kafka (make test-kafka)"
            );
            return;
        }
        let s = Setup::new(8);
        let a_file = s.dir.path().join("a.yaml");
        let a_id = unique("eos-a");
        std::fs::write(
            &a_file,
            yaml(&s, &format!("transactional_id: \"{a_id}\", "))
                .replace("commit_interval_ms: 100,", "commit_interval_ms: 5000,"),
        )
        .unwrap();
        let b_file = s.dir.path().join("b.yaml");
        std::fs::write(
            &b_file,
            yaml(&s, "").replace("commit_interval_ms: 100,", "commit_interval_ms: 1000,"),
        )
        .unwrap();
        let n = 20_000u64;
        let first = 12_000u64;
        let a = Process::spawn(&a_file);
        let producer = produce_in_background(&s, "k", 0, first, 1000.0);
        // kill it 1.5 s into its second transaction (the next commit is
        // 3.5 s away): its open transaction holds outputs
        let mut reader = s.reader(WireFormat::AvroRaw);
        reader.read(Duration::from_secs(60), |seen| !seen.by_id.is_empty());
        assert!(!reader.seen.by_id.is_empty(), "no transaction committed");
        std::thread::sleep(Duration::from_millis(1500));
        let acked = a.metric("ml_worker_outputs_acked_total").unwrap_or(0.0);
        drop(a); // SIGKILL
        eprintln!(
            "killed with {acked} outputs acknowledged; {} predictions committed and read",
            reader.seen.by_id.len()
        );
        let a2 = Process::spawn(&a_file);
        wait_until(
            "the restarted worker holds all 8 partitions",
            Duration::from_secs(120),
            || a2.assigned() == 8,
        );
        producer.join().unwrap();
        let b = Process::spawn(&b_file);
        let producer = produce_in_background(&s, "k", first, n - first, 1000.0);
        wait_until(
            "the second replica holds partitions",
            Duration::from_secs(60),
            || b.assigned() > 0,
        );
        producer.join().unwrap();
        reader.read(Duration::from_secs(120), |seen| {
            seen.by_id.len() as u64 >= n && seen.signals >= n
        });
        let committed_a2 = a2.metric("ml_worker_transactions_committed_total");
        let committed_b = b.metric("ml_worker_transactions_committed_total");
        let aborted = |p: &Process| {
            p.metric("ml_worker_transactions_aborted_total{reason=\"revocation\"}")
                .unwrap_or(0.0)
                + p.metric("ml_worker_transactions_aborted_total{reason=\"commit\"}")
                    .unwrap_or(0.0)
                + p.metric("ml_worker_transactions_aborted_total{reason=\"timeout\"}")
                    .unwrap_or(0.0)
                + p.metric("ml_worker_transactions_aborted_total{reason=\"delivery\"}")
                    .unwrap_or(0.0)
        };
        eprintln!(
            "restarted worker: {committed_a2:?} transactions committed, {} aborted; second replica: {committed_b:?} committed, {} aborted",
            aborted(&a2),
            aborted(&b)
        );
        let revoked = a2.assigned();
        a2.terminate();
        b.terminate();
        // whatever came late would show as a duplicate now
        reader.read(Duration::from_secs(2), |_| false);
        let seen = &reader.seen;
        let missing = missing_ids(seen, "k", n);
        assert!(
            missing.is_empty(),
            "{} lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        assert_eq!(seen.duplicates, 0, "read_committed: predictions seen twice");
        assert_eq!(seen.signals, n, "read_committed: one signal per input");
        assert_eq!(seen.signal_ids.len() as u64, n);
        assert!(seen.dead_letters.is_empty());
        assert!(committed_a2.unwrap_or(0.0) >= 1.0 && committed_b.unwrap_or(0.0) >= 1.0);
        assert!(revoked < 8, "the restarted worker kept every partition");
        let by_source = outputs_by_source(
            &s.brokers(),
            &s.predictions,
            "read_committed",
            n as usize,
            Duration::from_secs(60),
        );
        assert_eq!(
            by_source.len() as u64,
            n,
            "read_committed: inputs with a prediction"
        );
        let twice = by_source.values().filter(|&&c| c != 1).count();
        assert_eq!(
            twice, 0,
            "read_committed: inputs without exactly one prediction"
        );
        assert_eq!(s.committed_total(8), n as i64, "committed input offsets");
        let uncommitted = outputs_by_source(
            &s.brokers(),
            &s.predictions,
            "read_uncommitted",
            n as usize,
            Duration::from_secs(60),
        );
        let records: u64 = uncommitted.values().map(|&c| c as u64).sum();
        let repeated = uncommitted.values().filter(|&&c| c > 1).count();
        eprintln!(
            "exactly-once on Kafka: {n} inputs, {n} predictions read_committed; read_uncommitted: \
             {records} predictions, {repeated} inputs with more than one (aborted transactions)"
        );
        assert_eq!(uncommitted.len() as u64, n);
        assert!(
            repeated > 0,
            "the killed worker's open transaction held outputs: read_uncommitted shows them"
        );
    }
}

#[test]
fn a_registry_written_in_place_is_not_reloaded_half_written_and_a_stopping_worker_reloads_nothing()
{
    let s = Setup::new(1);
    let file = registry_copy(s.dir.path(), |t| t);
    let full = std::fs::read_to_string(&file).unwrap();
    let cfg = config_with_registry(&s, "reload: {debounce_ms: 100}", &file);
    let w = start(cfg);
    let addr = w.started.metrics_address;
    // in place, in two parts with a pause longer than the debounce: the
    // first part alone is valid YAML without breast_cancer_xgb
    let cut = full.find("  - name: \"breast_cancer_xgb\"").unwrap();
    let changed = with_version(full.clone(), "diabetes_lgbm", "inplace");
    let cut2 = changed.find("  - name: \"breast_cancer_xgb\"").unwrap();
    assert!(cut2 > cut);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&file)
            .unwrap();
        f.write_all(&changed.as_bytes()[..cut2]).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(800));
        let page = http_get(addr, "/metrics").1;
        assert_eq!(
            metric(&page, "ml_worker_reloads_total{result=\"ok\"}"),
            Some(0.0),
            "reloaded while the file was open for writing: {page}"
        );
        f.write_all(&changed.as_bytes()[cut2..]).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let page = loop {
        let page = http_get(addr, "/metrics").1;
        if metric(&page, "ml_worker_reloads_total{result=\"ok\"}") == Some(1.0) {
            break page;
        }
        assert!(Instant::now() < deadline, "never reloaded: {page}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        page.contains("ml_worker_model_info{model=\"breast_cancer_xgb\""),
        "{page}"
    );
    assert!(page.contains("version=\"inplace\""), "{page}");
    // stopping: a reload is refused at once, not waited for
    let models = w.models.clone();
    let summary = w.stop();
    assert!(summary.clean);
    let t = Instant::now();
    let e = models
        .reload(Trigger::Call)
        .expect_err("refused while stopping");
    assert!(e.to_string().contains("stopping"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(1));
}
