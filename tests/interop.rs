//! Clients nobody here wrote: Python `confluent-kafka` produces feature
//! events (Avro by `fastavro`, and JSON) through the embedded broker and
//! ml-worker's codec reads them; ml-worker's prediction and signal datums
//! decode with `fastavro`. Needs `.cache/venv-kafka` (`make python-kafka`).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ml_worker::broker::{parse_topics, EmbeddedBroker};
use ml_worker::events::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;

fn python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/venv-kafka/bin/python");
    assert!(
        p.is_file(),
        "{} is missing: run `make python-kafka`",
        p.display()
    );
    p
}

fn interop(args: &[&str]) -> Command {
    let mut c = Command::new(python());
    c.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/interop.py"))
        .args(args);
    c
}

fn consume_decoded(
    bootstrap: &str,
    topic: &str,
    n: usize,
    codec: &Codec,
) -> Vec<(String, FeatureEvent)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{topic}-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            out.push((key, codec.decode_feature(m.payload().unwrap()).unwrap()));
        }
    }
    out
}

fn check_python_events(format: &str, wire: WireFormat) {
    let topic = format!("interop-{format}-{}", std::process::id());
    let broker = EmbeddedBroker::start(1, &parse_topics(&format!("{topic}:4")).unwrap()).unwrap();
    let n = 300;
    let o = interop(&[
        "produce",
        &broker.bootstrap_servers(),
        &topic,
        &n.to_string(),
        format,
    ])
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let events = consume_decoded(
        &broker.bootstrap_servers(),
        &topic,
        n,
        &Codec::new(wire, SchemaIds::default()),
    );
    assert_eq!(events.len(), n);
    let mut ids = std::collections::HashSet::new();
    for (key, e) in events {
        let i: usize = e.event_id.strip_prefix("py-").unwrap().parse().unwrap();
        assert!(ids.insert(i), "duplicate {i}");
        assert_eq!(key, e.symbol);
        assert_eq!(e.symbol, format!("SYM{}", i % 7));
        assert_eq!(e.model, "diabetes_lgbm");
        assert_eq!(e.event_time, 1_764_000_000_000 + i as i64);
        let f: HashMap<String, f64> = e.features.into_iter().collect();
        for j in 0..4 {
            let want = i as f64 * 0.5 + j as f64;
            match f.get(&format!("f{j}")) {
                Some(v) => assert_eq!(*v, want),
                None => assert!(j == 2 && i.is_multiple_of(5), "event {i} lacks f{j}"),
            }
        }
    }
}

#[test]
fn confluent_kafka_avro_raw_events_decode() {
    check_python_events("avro-raw", WireFormat::AvroRaw);
}

#[test]
fn confluent_kafka_json_events_decode() {
    check_python_events("json", WireFormat::Json);
}

fn fastavro_decode(kind: &str, datums: &[Vec<u8>]) -> Vec<serde_json::Value> {
    let mut child = interop(&["decode", kind])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for d in datums {
        writeln!(stdin, "{}", hex::encode(d)).unwrap();
    }
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn fastavro_reads_our_prediction_and_signal_datums() {
    let p = PredictionEvent {
        event_id: "e-1".into(),
        model: "wine_rf".into(),
        model_version: "v1".into(),
        model_sha256: "ab".repeat(32),
        symbol: "SYM1".into(),
        event_time: 1_764_000_000_123,
        prediction: 2.0,
        probabilities: Some(vec![0.1, 0.2, 0.7]),
        fallback: true,
        inference_latency_us: 42,
        served_by: None,
        route: Default::default(),
    };
    let mut a = Vec::new();
    write_prediction_datum(&p, &mut a);
    let mut b = Vec::new();
    write_prediction_datum(
        &PredictionEvent {
            probabilities: None,
            fallback: false,
            route: Default::default(),
            ..p.clone()
        },
        &mut b,
    );
    let got = fastavro_decode("prediction", &[a, b]);
    assert_eq!(got[0], serde_json::to_value(&p).unwrap());
    assert!(got[1]["probabilities"].is_null() && got[1]["fallback"] == false);

    let s = SignalEvent {
        event_id: "e-1".into(),
        symbol: "SYM1".into(),
        model: "wine_rf".into(),
        model_version: "v1".into(),
        event_time: -1,
        side: Side::Hold,
        strength: 0.0,
        prediction: 1.5,
        route: Default::default(),
    };
    let mut d = Vec::new();
    write_signal_datum(&s, &mut d);
    assert_eq!(
        fastavro_decode("signal", &[d])[0],
        serde_json::to_value(&s).unwrap()
    );
}

/// Sends SIGTERM and waits; the process must exit cleanly.
fn terminate(mut child: std::process::Child, what: &str) {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{what} exited with {status}");
}

/// The Python client, a real third-party Kafka client, drives the worker:
/// `ml-worker broker` and `ml-worker run` as separate processes; Python
/// produces feature events and checks every prediction and signal it reads
/// back against the reference library's prediction for that row.
fn python_drives_the_worker(format: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = env!("CARGO_BIN_EXE_ml-worker");
    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("bootstrap");
    let broker = Command::new(bin)
        .args(["broker", "--address-file"])
        .arg(&addr_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !addr_file.exists() {
        assert!(Instant::now() < deadline, "broker did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let bootstrap = std::fs::read_to_string(&addr_file)
        .unwrap()
        .trim()
        .to_string();
    let shipped = std::fs::read_to_string(root.join("config/worker.yaml")).unwrap();
    let yaml = shipped
        .replace("\"avro-raw\"", &format!("\"{format}\""))
        .replace(
            "registry: \"models.yaml\"",
            &format!(
                "registry: \"{}\"",
                root.join("config/models.yaml").display()
            ),
        )
        .replace(
            "audit_db: \"../data/audit.db\"",
            &format!("audit_db: \"{}\"", dir.path().join("audit.db").display()),
        )
        .replace("127.0.0.1:9100", "127.0.0.1:0");
    let config = dir.path().join("worker.yaml");
    std::fs::write(&config, yaml).unwrap();
    let worker = Command::new(bin)
        .args(["run", "--config"])
        .arg(&config)
        .args(["--brokers", &bootstrap, "--group", &format!("py-{format}")])
        .current_dir(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let samples = root.join("models/samples");
    let out = interop(&[
        "drive",
        &bootstrap,
        format,
        samples.to_str().unwrap(),
        "300",
    ])
    .output()
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{format}: {report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(r["predictions"], 300, "{report}");
    assert_eq!(r["signals"], 300, "{report}");
    terminate(worker, "ml-worker run");
    terminate(broker, "ml-worker broker");
}

#[test]
fn confluent_kafka_drives_the_worker_avro_raw() {
    python_drives_the_worker("avro-raw");
}

#[test]
fn confluent_kafka_drives_the_worker_json() {
    python_drives_the_worker("json");
}
