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
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
            .args(["run", "--config"])
            .arg(s.dir.path().join("worker.yaml"))
            .args(["--brokers", &s.broker.address(), "--group", group])
            .current_dir(s.dir.path())
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
fn sighup_is_logged_and_ignored_and_the_worker_serves_on() {
    let s = Setup::new(2);
    let group = unique("group");
    let w = Worker::start(&s, &group);
    wait_for("partitions", Duration::from_secs(30), || {
        w.assigned() == Some(2)
    });
    w.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    // still there, still serving
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
    let mut reader = Reader::new(
        &s.broker.address(),
        (&s.predictions, WireFormat::AvroRaw),
        (&s.signals, WireFormat::AvroRaw),
        &s.dead_letters,
    )
    .unwrap();
    reader.read(Duration::from_secs(30), |seen| seen.by_id.len() >= 200);
    assert_eq!(reader.seen.by_id.len(), 200);
    let (_, lines) = w.terminate();
    assert!(
        lines.iter().any(|l| l.contains("SIGHUP")),
        "the SIGHUP is logged: {lines:?}"
    );
    // the drain ran: every model's unload is in the audit store
    let out = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args(["audit", "show", "--db"])
        .arg(s.dir.path().join("audit.db"))
        .env("ML_WORKER_AUDIT_KEY", "group-test-key-0123456789")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("unload").count(), 4, "{text}");
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
