//! Replicas of `ml-worker run` as a user runs them: separate processes on
//! the shipped `config/worker.yaml` (no librdkafka overrides; only topic
//! names, paths and the metrics port changed), sharing one consumer group.
//!
//! The broker is the embedded one (librdkafka's mock cluster, started in
//! this process), or a real Kafka cluster when `KAFKA_BOOTSTRAP` names one
//! (`.ci/run` starts Apache Kafka with `scripts/kafka-broker.sh` and runs
//! this file again against it); each test prints which.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

mod brokers;
use brokers::Broker;

use ml_worker::events::WireFormat;
use ml_worker::loadgen::{load_samples, Load, Reader, Traffic};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Topics of one test, and the shipped worker config pointed at them.
struct Setup {
    broker: Broker,
    features: String,
    predictions: String,
    signals: String,
    dead_letters: String,
    dir: tempfile::TempDir,
}

/// Fresh topic names: features, predictions, signals, dead letters.
fn topic_names() -> [String; 4] {
    [
        unique("features"),
        unique("predictions"),
        unique("signals"),
        unique("dead"),
    ]
}

impl Setup {
    fn new(partitions: i32) -> Setup {
        let s = Setup::on(Broker::start(), topic_names());
        s.broker.create_topic(&s.features, partitions);
        for t in [&s.predictions, &s.signals] {
            s.broker.create_topic(t, 4);
        }
        s.broker.create_topic(&s.dead_letters, 1);
        s
    }

    /// On a broker whose topics exist already.
    fn on(broker: Broker, names: [String; 4]) -> Setup {
        let [features, predictions, signals, dead_letters] = names;
        let s = Setup {
            broker,
            features,
            predictions,
            signals,
            dead_letters,
            dir: tempfile::tempdir().unwrap(),
        };
        let shipped = std::fs::read_to_string(root().join("config/worker.yaml")).unwrap();
        let replace = [
            (
                "topics: [\"features\"]",
                format!("topics: [\"{}\"]", s.features),
            ),
            (
                "topic: \"predictions\"",
                format!("topic: \"{}\"", s.predictions),
            ),
            ("topic: \"signals\"", format!("topic: \"{}\"", s.signals)),
            (
                "topic: \"dead-letters\"",
                format!("topic: \"{}\"", s.dead_letters),
            ),
            (
                "registry: \"models.yaml\"",
                format!(
                    "registry: \"{}\"",
                    root().join("config/models.yaml").display()
                ),
            ),
            (
                "audit_db: \"../data/audit.db\"",
                "audit_db: \"audit.db\"".into(),
            ),
            (
                "address: \"127.0.0.1:9100\"",
                "address: \"127.0.0.1:0\"".into(),
            ),
        ];
        let mut yaml = shipped.clone();
        for (from, to) in replace {
            assert!(yaml.contains(from), "config/worker.yaml has no {from}");
            yaml = yaml.replace(from, &to);
        }
        assert!(
            yaml.contains("librdkafka: {}"),
            "the shipped config, without librdkafka overrides"
        );
        std::fs::write(s.dir.path().join("worker.yaml"), yaml).unwrap();
        s
    }

    /// Edits this setup's worker.yaml.
    fn edit_config(&self, from: &str, to: &str) {
        let file = self.dir.path().join("worker.yaml");
        let yaml = std::fs::read_to_string(&file).unwrap();
        assert!(yaml.contains(from), "worker.yaml has no {from}");
        std::fs::write(&file, yaml.replace(from, to)).unwrap();
    }

    /// A reader of this setup's outputs, from their beginning.
    fn reader(&self) -> Reader {
        Reader::new(
            &self.broker.address(),
            (&self.predictions, WireFormat::AvroRaw),
            (&self.signals, WireFormat::AvroRaw),
            &self.dead_letters,
        )
        .unwrap()
    }

    fn committed_total(&self, group: &str, partitions: i32) -> i64 {
        brokers::committed_total(&self.broker.address(), group, &self.features, partitions)
    }
}

/// An `ml-worker run` process and its stderr lines.
struct Worker {
    child: Child,
    lines: Receiver<String>,
    metrics: std::net::SocketAddr,
    started: Instant,
}

impl Worker {
    fn start(s: &Setup, group: &str) -> Worker {
        Worker::start_on(s, group, &s.broker.address(), &[])
    }

    /// On `brokers` (another listener of the setup's broker), with `env`.
    fn start_on(s: &Setup, group: &str, brokers: &str, env: &[(&str, &str)]) -> Worker {
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
            .args(["run", "--config"])
            .arg(s.dir.path().join("worker.yaml"))
            .args(["--brokers", brokers, "--group", group])
            .current_dir(s.dir.path())
            .envs(env.iter().copied())
            .env("ML_WORKER_AUDIT_KEY", "group-test-key-0123456789")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        let metrics = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("the worker does not start ({e}): {seen:#?}"));
            seen.push(line.clone());
            if let Some(rest) = line.split_once("(metrics on http://") {
                break rest.1.split('/').next().unwrap().parse().unwrap();
            }
        };
        Worker {
            child,
            lines,
            metrics,
            started,
        }
    }

    /// `ml_worker_assigned_partitions`.
    fn assigned(&self) -> Option<u64> {
        metric(self.metrics, "ml_worker_assigned_partitions")
    }

    fn signal(&self, sig: &str) {
        assert!(Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success());
    }

    /// SIGTERM, then how long the process took to end (asserting it ended
    /// well).
    fn terminate(mut self) -> (Duration, Vec<String>) {
        let t = Instant::now();
        self.signal("TERM");
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status}");
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "still running after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (t.elapsed(), self.lines.try_iter().collect())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn metric(addr: std::net::SocketAddr, name: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut page = String::new();
    s.read_to_string(&mut page).ok()?;
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

#[test]
fn a_second_replica_on_the_shipped_config_takes_partitions_within_10_s_and_sigterm_drains_in_time()
{
    second_replica_and_sigterm("at-least-once");
}

/// The same under `delivery.mode: exactly-once` (the shipped config's
/// defaults otherwise): the first replica's revocation commits its open
/// transaction, and SIGTERM's drain commits the last one, in time. On
/// Apache Kafka a `read_committed` reader sees each prediction once and the
/// group's offsets end at the input's end; the embedded broker keeps no
/// transactional offsets and shows aborted records, so there only the
/// timings and that nothing is lost are checked.
#[test]
fn exactly_once_replicas_hand_partitions_over_and_sigterm_commits_in_time() {
    second_replica_and_sigterm("exactly-once");
}

fn second_replica_and_sigterm(mode: &str) {
    let s = Setup::new(6);
    s.edit_config("mode: \"at-least-once\"", &format!("mode: \"{mode}\""));
    let exactly_once = mode == "exactly-once";
    let group = unique("group");
    let samples = load_samples(&root().join("models/samples")).unwrap();
    // events all along: 12,000 at 1,000/s
    let n = 12_000;
    let address = s.broker.address();
    let producer = {
        let (address, features, samples) = (address.clone(), s.features.clone(), samples.clone());
        std::thread::spawn(move || {
            let t = Traffic {
                topic: &features,
                format: WireFormat::AvroRaw,
                samples: &samples,
                prefix: "g",
            };
            let load = Load::new(&address).unwrap();
            let sent = load
                .events(&t, 0, n, Some(1000.0), &AtomicBool::new(false))
                .unwrap();
            load.flush(Duration::from_secs(30)).unwrap();
            sent
        })
    };
    let a = Worker::start(&s, &group);
    wait_for(
        "the first replica holds all 6 partitions",
        Duration::from_secs(30),
        || a.assigned() == Some(6),
    );
    let b = Worker::start(&s, &group);
    wait_for(
        "the second replica holds partitions",
        Duration::from_secs(10),
        || b.assigned().unwrap_or(0) > 0,
    );
    let took = b.started.elapsed();
    eprintln!("second replica: partitions {took:?} after it was started");
    assert!(took <= Duration::from_secs(10), "{took:?}");
    wait_for(
        "the split settles at 3 and 3",
        Duration::from_secs(15),
        || a.assigned() == Some(3) && b.assigned() == Some(3),
    );
    // the first leaves mid-stream: within its drain deadline (10 s)
    std::thread::sleep(Duration::from_secs(1));
    let (took, _) = a.terminate();
    eprintln!("first replica: SIGTERM to exit {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    wait_for(
        "the second takes over all 6",
        Duration::from_secs(15),
        || b.assigned() == Some(6),
    );
    assert_eq!(producer.join().unwrap(), n);
    // every event predicted (at least once), and committed
    let mut reader = Reader::new(
        &address,
        (&s.predictions, WireFormat::AvroRaw),
        (&s.signals, WireFormat::AvroRaw),
        &s.dead_letters,
    )
    .unwrap();
    reader.read(Duration::from_secs(60), |seen| seen.by_id.len() as u64 >= n);
    let missing: Vec<u64> = (0..n)
        .filter(|i| !reader.seen.by_id.contains_key(&format!("g-{i}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let (took, _) = b.terminate();
    eprintln!("second replica: SIGTERM to exit {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    if exactly_once && brokers::external().is_none() {
        eprintln!("exactly-once on the embedded broker: no transactional offsets to check");
        return;
    }
    assert_eq!(s.committed_total(&group, 6), n as i64);
    if exactly_once {
        reader.read(Duration::from_secs(2), |_| false);
        assert_eq!(
            reader.seen.duplicates, 0,
            "read_committed: a prediction twice"
        );
    }
}

#[test]
fn sighup_reloads_the_registry_and_the_worker_serves_on() {
    let s = Setup::new(2);
    // a copy of the shipped registry, not watched: SIGHUP is the trigger
    let registry = s.dir.path().join("models.yaml");
    let shipped = std::fs::read_to_string(root().join("config/models.yaml"))
        .unwrap()
        .replace(
            "path: \"../models/",
            &format!("path: \"{}/models/", root().display()),
        );
    std::fs::write(&registry, &shipped).unwrap();
    let worker_yaml = s.dir.path().join("worker.yaml");
    let cfg = std::fs::read_to_string(&worker_yaml)
        .unwrap()
        .replace(
            &root().join("config/models.yaml").display().to_string(),
            &registry.display().to_string(),
        )
        .replace("  watch: true ", "  watch: false ");
    assert!(
        cfg.contains("watch: false"),
        "the shipped config has reload.watch"
    );
    std::fs::write(&worker_yaml, cfg).unwrap();
    let group = unique("group");
    let w = Worker::start(&s, &group);
    wait_for("partitions", Duration::from_secs(30), || {
        w.assigned() == Some(2)
    });
    std::fs::write(
        &registry,
        shipped.replace(
            "- name: \"diabetes_lgbm\"\n",
            "- name: \"diabetes_lgbm\"\n    version: \"hup-2\"\n",
        ),
    )
    .unwrap();
    w.signal("HUP");
    wait_for("the reload", Duration::from_secs(30), || {
        metric(w.metrics, "ml_worker_reloads_total{result=\"ok\"}") == Some(1)
    });
    // still there, serving the new version
    let samples = load_samples(&root().join("models/samples")).unwrap();
    let t = Traffic {
        topic: &s.features,
        format: WireFormat::AvroRaw,
        samples: &samples,
        prefix: "h",
    };
    let load = Load::new(&s.broker.address()).unwrap();
    load.events(&t, 0, 200, None, &AtomicBool::new(false))
        .unwrap();
    load.flush(Duration::from_secs(10)).unwrap();
    let mut reader = s.reader();
    reader.read(Duration::from_secs(30), |seen| seen.by_id.len() >= 200);
    assert_eq!(reader.seen.by_id.len(), 200);
    let diabetes: Vec<_> = reader
        .seen
        .by_id
        .values()
        .filter(|p| p.model == "diabetes_lgbm")
        .collect();
    assert!(!diabetes.is_empty());
    assert!(diabetes.iter().all(|p| p.model_version == "hup-2"));
    let (_, lines) = w.terminate();
    assert!(
        lines.iter().any(|l| l.contains("SIGHUP")),
        "the SIGHUP is logged: {lines:?}"
    );
    // audited: the reload with both versions, then every model's unload
    // at the drain
    let out = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args(["audit", "show", "--db"])
        .arg(s.dir.path().join("audit.db"))
        .env("ML_WORKER_AUDIT_KEY", "group-test-key-0123456789")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("unload").count(), 4, "{text}");
    let reload = text
        .lines()
        .find(|l| l.contains("reload"))
        .unwrap_or_else(|| panic!("no reload row: {text}"));
    assert!(reload.contains("hup-2"), "{reload}");
}

/// A broker that stops answering (its process frozen with SIGSTOP) cannot
/// hold a stopping worker past its deadline: SIGTERM ends the process
/// within `shutdown_timeout_ms` + 5 s (the final commit and leaving the
/// group cannot finish; the events stay uncommitted and are read again).
#[test]
fn sigterm_ends_the_worker_in_time_even_when_the_broker_stops_answering() {
    if brokers::mock_only("freezes an embedded broker's process with SIGSTOP") {
        return;
    }
    for protocol in ["consumer", "classic"] {
        sigterm_with_a_frozen_broker(protocol);
    }
}

fn sigterm_with_a_frozen_broker(protocol: &str) {
    let names = topic_names();
    let dir = tempfile::tempdir().unwrap();
    let address_file = dir.path().join("address");
    let topics = format!(
        "{}:4,{}:4,{}:4,{}:1",
        names[0], names[1], names[2], names[3]
    );
    let mut broker = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args(["broker", "--topics", &topics, "--address-file"])
        .arg(&address_file)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let address = {
        let t = Instant::now();
        loop {
            if let Ok(a) = std::fs::read_to_string(&address_file) {
                if !a.trim().is_empty() {
                    break a.trim().to_string();
                }
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no broker address");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let s = Setup::on(Broker::External(address), names);
    s.edit_config("shutdown_timeout_ms: 10000", "shutdown_timeout_ms: 2000");
    s.edit_config(
        "group_protocol: \"consumer\"",
        &format!("group_protocol: \"{protocol}\""),
    );
    let group = unique("group");
    let mut w = Worker::start(&s, &group);
    wait_for("partitions", Duration::from_secs(30), || {
        w.assigned().unwrap_or(0) == 4
    });
    let kill = |sig: &str, pid: u32| {
        assert!(Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap()
            .success())
    };
    kill("STOP", broker.id());
    let t = Instant::now();
    w.signal("TERM");
    let status = loop {
        if let Some(status) = w.child.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = w.child.kill();
            kill("CONT", broker.id());
            let _ = broker.kill();
            panic!("still running 30 s after SIGTERM with the broker frozen");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t.elapsed();
    kill("CONT", broker.id());
    let _ = broker.kill();
    let _ = broker.wait();
    let lines: Vec<String> = w.lines.try_iter().collect();
    eprintln!("{protocol} protocol, SIGTERM with the broker frozen: exited in {took:?} ({status})");
    assert!(
        took < Duration::from_secs(2 + 5 + 2),
        "took {took:?}: {lines:#?}"
    );
}

/// `ml-worker` with `args` (the setup's config and broker added); its
/// stdout, asserting it succeeded.
fn ml_worker(s: &Setup, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args(args)
        .arg("--config")
        .arg(s.dir.path().join("worker.yaml"))
        .args(["--brokers", &s.broker.address()])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ml-worker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn ml_worker_produce_drives_the_worker_end_to_end() {
    let s = Setup::new(2);
    let group = unique("group");
    let w = Worker::start(&s, &group);
    let report = ml_worker(
        &s,
        &[
            "produce",
            "--events",
            "500",
            "--rate",
            "5000",
            "--samples",
            "models/samples",
            "--json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["events"], 500, "{report}");
    assert_eq!(report["topic"], s.features.as_str());
    let per_model = report["per_model"].as_object().unwrap();
    assert_eq!(
        per_model.len(),
        4,
        "every registered model in turn: {report}"
    );
    let mut reader = s.reader();
    reader.read(Duration::from_secs(30), |seen| seen.by_id.len() >= 500);
    assert_eq!(
        reader.seen.by_id.len(),
        500,
        "{:?}",
        reader.seen.dead_letters.first()
    );
    assert!(reader
        .seen
        .by_id
        .keys()
        .all(|id| id.starts_with("produce-")));
    for (model, n) in per_model {
        let got = reader
            .seen
            .by_id
            .values()
            .filter(|p| p.model == *model)
            .count();
        assert_eq!(got as u64, n.as_u64().unwrap(), "{model}");
    }
    // one model only, for a duration
    let report = ml_worker(
        &s,
        &[
            "produce",
            "--duration",
            "1s",
            "--rate",
            "200",
            "--model",
            "diabetes_lgbm",
            "--json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let n = report["events"].as_u64().unwrap();
    assert!((150..=210).contains(&n), "{report}");
    assert_eq!(report["per_model"]["diabetes_lgbm"].as_u64(), Some(n));
    w.terminate();
}

#[test]
fn replay_dlq_resubmits_dead_letters_after_a_fix_once_and_with_their_headers() {
    let s = Setup::new(2);
    // a registry without wine_mlp: its events are dead letters (route)
    let registry = s.dir.path().join("models.yaml");
    let shipped = std::fs::read_to_string(root().join("config/models.yaml"))
        .unwrap()
        .replace(
            "path: \"../models/",
            &format!("path: \"{}/models/", root().display()),
        );
    let at = shipped.find("  - name: \"wine_mlp\"").unwrap();
    let end = at
        + shipped[at..]
            .find("\n\n")
            .map_or(shipped.len() - at, |e| e + 2);
    let without = format!("{}{}", &shipped[..at], &shipped[end..]);
    std::fs::write(&registry, &without).unwrap();
    s.edit_config(
        &format!(
            "registry: \"{}\"",
            root().join("config/models.yaml").display()
        ),
        &format!("registry: \"{}\"", registry.display()),
    );
    let group = unique("group");
    let w = Worker::start(&s, &group);
    // events with a header of their own
    let samples = load_samples(&root().join("models/samples")).unwrap();
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", s.broker.address())
        .create()
        .unwrap();
    let n = 200u64;
    let mut buf = Vec::new();
    for i in 0..n {
        let e = ml_worker::loadgen::event(&samples, "dlq", i, ml_worker::loadgen::now_ms());
        ml_worker::loadgen::encode_feature(WireFormat::AvroRaw, &e, &mut buf);
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "trace-id",
            value: Some(format!("t-{i}").as_str()),
        });
        producer
            .send(
                rdkafka::producer::BaseRecord::to(&s.features)
                    .key(e.symbol.as_bytes())
                    .payload(&buf)
                    .headers(headers),
            )
            .unwrap();
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10)).unwrap();
    let mut reader = s.reader();
    reader.read(Duration::from_secs(30), |seen| {
        seen.by_id.len() + seen.dead_letters.len() >= n as usize
    });
    let refused = reader.seen.dead_letters.len();
    assert_eq!(refused as u64, n / 4, "wine_mlp's quarter is refused");
    // and one written by hand whose source.partition the input lacks: it
    // goes back by its key instead
    let mut e = ml_worker::loadgen::event(&samples, "dlq", 3, ml_worker::loadgen::now_ms());
    e.event_id = "dlq-hostile".into();
    ml_worker::loadgen::encode_feature(WireFormat::AvroRaw, &e, &mut buf);
    let mut h = rdkafka::message::OwnedHeaders::new();
    for (k, v) in [
        ("trace-id", "t-hostile"),
        ("error.stage", "route"),
        ("source.topic", s.features.as_str()),
        ("source.partition", "99"),
        ("source.offset", "0"),
    ] {
        h = h.insert(rdkafka::message::Header {
            key: k,
            value: Some(v),
        });
    }
    producer
        .send(
            rdkafka::producer::BaseRecord::to(&s.dead_letters)
                .key(e.symbol.as_bytes())
                .payload(&buf)
                .headers(h),
        )
        .unwrap();
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10)).unwrap();
    let dead = refused + 1;
    // a dry run sends nothing and remembers nothing
    let dry = ml_worker(
        &s,
        &["replay-dlq", "--stage", "route", "--dry-run", "--json"],
    );
    let dry: serde_json::Value = serde_json::from_str(&dry).unwrap();
    assert_eq!(
        dry["sent"][&s.features].as_u64(),
        Some(dead as u64),
        "{dry}"
    );
    // the fix: wine_mlp registered again (the worker reloads the file)
    std::fs::write(&registry, &shipped).unwrap();
    wait_for("the reload", Duration::from_secs(30), || {
        metric(w.metrics, "ml_worker_reloads_total{result=\"ok\"}") == Some(1)
    });
    // another stage's dead letters only: none (and that filter's progress
    // is its own)
    let other = ml_worker(&s, &["replay-dlq", "--stage", "inference", "--json"]);
    let other: serde_json::Value = serde_json::from_str(&other).unwrap();
    assert!(other["sent"].as_object().unwrap().is_empty(), "{other}");
    assert_eq!(other["read"].as_u64(), Some(dead as u64), "{other}");
    let replay = ml_worker(&s, &["replay-dlq", "--stage", "route", "--json"]);
    let replay: serde_json::Value = serde_json::from_str(&replay).unwrap();
    assert_eq!(
        replay["sent"][&s.features].as_u64(),
        Some(dead as u64),
        "{replay}"
    );
    assert_eq!(replay["by_stage"]["route"].as_u64(), Some(dead as u64));
    reader.read(Duration::from_secs(30), |seen| {
        seen.by_id.len() > n as usize
    });
    assert_eq!(
        reader.seen.by_id.len(),
        n as usize + 1,
        "every event served after the replay, the hand-written one too"
    );
    assert!(reader.seen.by_id.contains_key("dlq-hostile"));
    // once: a second run finds nothing new; --since reads them again
    let again = ml_worker(&s, &["replay-dlq", "--stage", "route", "--json"]);
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["read"].as_u64(), Some(0), "{again}");
    // (librdkafka's mock cluster answers a time lookup with the end: on
    // the mock this only shows the command runs)
    let since = ml_worker(&s, &["replay-dlq", "--since", "1h", "--dry-run", "--json"]);
    let since: serde_json::Value = serde_json::from_str(&since).unwrap();
    if brokers::external().is_some() {
        assert_eq!(since["read"].as_u64(), Some(dead as u64), "{since}");
    }
    // the replayed records kept their own header and lost the worker's
    let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", s.broker.address())
        .set("group.id", unique("peek"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    rdkafka::consumer::Consumer::subscribe(&c, &[s.features.as_str()]).unwrap();
    let (mut seen, deadline) = (0, Instant::now() + Duration::from_secs(20));
    while seen < n + dead as u64 && Instant::now() < deadline {
        let Some(Ok(m)) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        seen += 1;
        use rdkafka::message::{Headers, Message};
        let keys: Vec<String> = m
            .headers()
            .map(|h| h.iter().map(|x| x.key.to_string()).collect())
            .unwrap_or_default();
        assert_eq!(keys, vec!["trace-id".to_string()], "{keys:?}");
    }
    assert_eq!(
        seen,
        n + dead as u64,
        "the input holds the events and their replays"
    );
    w.terminate();
}

/// TLS and SASL through the pass-through, the way `deploy/k8s` configures
/// them: the worker and `ml-worker produce` on Apache Kafka's SASL_SSL
/// listener (SCRAM-SHA-512, the broker's certificate checked against the
/// test CA), the password only in an environment variable named by
/// `kafka.librdkafka_env`. `scripts/kafka-broker.sh` opens that listener;
/// the embedded broker has none (skipped there). Needs the `ssl` feature
/// (`make` builds with it).
#[cfg(feature = "ssl")]
#[test]
fn the_worker_runs_over_sasl_ssl_with_the_password_from_the_environment() {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(bootstrap), Some(ca), Some(user), Some(password)) = (
        var("KAFKA_SASL_SSL_BOOTSTRAP"),
        var("KAFKA_SSL_CA"),
        var("KAFKA_SASL_USERNAME"),
        var("KAFKA_SASL_PASSWORD"),
    ) else {
        eprintln!("skipped: no SASL_SSL listener (scripts/kafka-broker.sh run opens one)");
        return;
    };
    let s = Setup::new(2);
    s.edit_config(
        "librdkafka: {}",
        &format!(
            "librdkafka: {{\"security.protocol\": \"SASL_SSL\", \"sasl.mechanisms\": \"SCRAM-SHA-512\", \
             \"sasl.username\": \"{user}\", \"ssl.ca.location\": \"{ca}\"}}\n  \
             librdkafka_env: {{\"sasl.password\": \"ML_WORKER_TEST_KAFKA_PASSWORD\"}}"
        ),
    );
    let secret = [("ML_WORKER_TEST_KAFKA_PASSWORD", password.as_str())];
    let group = unique("group");
    let w = Worker::start_on(&s, &group, &bootstrap, &secret);
    wait_for("partitions over SASL_SSL", Duration::from_secs(30), || {
        w.assigned() == Some(2)
    });
    let produce = |env: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_ml-worker"))
            .args([
                "produce", "--events", "300", "--rate", "3000", "--json", "--config",
            ])
            .arg(s.dir.path().join("worker.yaml"))
            .args(["--brokers", &bootstrap, "--samples", "models/samples"])
            .current_dir(root())
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let out = produce(&secret);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // read back on the plaintext listener: the same topics
    let mut reader = s.reader();
    reader.read(Duration::from_secs(30), |seen| seen.by_id.len() >= 300);
    assert_eq!(reader.seen.by_id.len(), 300);
    assert!(reader.seen.dead_letters.is_empty());
    wait_for("every offset committed", Duration::from_secs(20), || {
        s.committed_total(&group, 2) == 300
    });
    // without the variable nothing starts, and the error names it
    let out = produce(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kafka.librdkafka_env.sasl.password")
            && err.contains("'ML_WORKER_TEST_KAFKA_PASSWORD' is not set"),
        "{err}"
    );
    let (_, lines) = w.terminate();
    assert!(
        !lines.iter().any(|l| l.contains(&password)),
        "the password is never logged"
    );
    // a wrong password: not ready, and /readyz says why; few log lines
    let wrong = [("ML_WORKER_TEST_KAFKA_PASSWORD", "not-the-password")];
    let w = Worker::start_on(&s, &unique("group"), &bootstrap, &wrong);
    let mut body = String::new();
    wait_for(
        "/readyz to name the failure",
        Duration::from_secs(20),
        || {
            body = http_body(w.metrics, "/readyz");
            body.contains("last Kafka connection failure") && body.contains("SASL authentication")
        },
    );
    assert!(body.starts_with("not ready:"), "{body}");
    std::thread::sleep(Duration::from_secs(3));
    let (_, lines) = w.terminate();
    assert!(
        lines.len() < 60,
        "repeated errors are held back: {} lines: {:#?}",
        lines.len(),
        &lines[..lines.len().min(80)]
    );
}

/// The body of `GET path`.
#[cfg(feature = "ssl")]
fn http_body(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut page = String::new();
    let _ = s.read_to_string(&mut page);
    page.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// `ml-worker bench --delivery-modes` runs both modes to the end on Apache
/// Kafka and reports them (small numbers: it works, speed is not asserted);
/// on the embedded broker it refuses, saying why.
#[test]
fn bench_delivery_modes_compares_exactly_once_with_at_least_once() {
    let run = |brokers: &str| {
        Command::new(env!("CARGO_BIN_EXE_ml-worker"))
            .args(["bench", "--delivery-modes", "--brokers", brokers])
            .args(["--events", "3000", "--rounds", "1", "--json"])
            .current_dir(root())
            .output()
            .unwrap()
    };
    let out = run("embedded");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stores no transactional offsets"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let Some(kafka) = brokers::external() else {
        eprintln!("skipped the run: measured on Apache Kafka (KAFKA_BOOTSTRAP)");
        return;
    };
    let out = run(&kafka);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["events"], 3000);
    for mode in ["at_least_once", "exactly_once"] {
        let rate = r[mode]["events_per_s"].as_f64().unwrap();
        assert!(rate > 0.0 && rate.is_finite(), "{r}");
    }
    assert_eq!(r["at_least_once"]["transactions"], 0, "{r}");
    assert!(
        r["exactly_once"]["transactions"].as_u64().unwrap() >= 1,
        "{r}"
    );
    assert!(r["ratio"].as_f64().unwrap() > 0.0);
}
