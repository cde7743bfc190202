//! `examples/custom_model.rs` end to end: a model kind the library does not
//! ship (`zscore`), registered by a program built on the library, served by
//! its `predict` and by its streaming worker on an embedded broker (its own
//! process, real Kafka protocol). The expected values are computed here,
//! independently of the example's code, from the model file.
//!
//! The example binary is built by `cargo test --all-targets` (what
//! `make test` runs), or `cargo build --example custom_model`.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ml_worker::events::{PredictionEvent, WireFormat};
use ml_worker::loadgen::{encode_feature, event, event_row, load_samples};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use rdkafka::Message;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn example_dir() -> PathBuf {
    root().join("examples/custom_model")
}

/// target/<profile>/examples/custom_model, beside this test's own folder
/// (`cargo build --examples`, which `make test` runs first), or the newest
/// copy `cargo test --all-targets` built under a hashed name.
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples");
    let plain = dir.join("custom_model");
    if plain.exists() {
        return plain;
    }
    let hashed = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("custom_model-") && p.extension().is_none()
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    hashed.unwrap_or_else(|| {
        panic!(
            "{} is not built: run `cargo build --examples` (make test does)",
            plain.display()
        )
    })
}

/// The model file, evaluated here: bias + sum of w * clip((x - mean) / std),
/// a missing feature contributing nothing.
struct Alpha {
    features: Vec<String>,
    mean: Vec<f64>,
    std: Vec<f64>,
    weights: Vec<f64>,
    bias: f64,
}

const CLIP: f64 = 3.0;

impl Alpha {
    fn read() -> Alpha {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(example_dir().join("alpha.json")).unwrap())
                .unwrap();
        let nums = |k: &str| -> Vec<f64> {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        Alpha {
            features: v["features"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect(),
            mean: nums("mean"),
            std: nums("std"),
            weights: nums("weights"),
            bias: v["bias"].as_f64().unwrap(),
        }
    }

    fn eval(&self, row: &HashMap<String, f64>) -> f64 {
        let mut acc = self.bias;
        for (j, f) in self.features.iter().enumerate() {
            if let Some(x) = row.get(f) {
                acc += self.weights[j] * ((x - self.mean[j]) / self.std[j]).clamp(-CLIP, CLIP);
            }
        }
        acc
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs()) + 1e-15
}

#[test]
fn predict_serves_the_custom_kind_rows_with_gaps_included() {
    let dir = tempfile::tempdir().unwrap();
    let input = example_dir().join("rows_with_gaps.jsonl");
    let o = Command::new(example())
        .args(["predict", "--model", "alpha", "--registry"])
        .arg(example_dir().join("models.yaml"))
        .arg("--input")
        .arg(&input)
        .arg("--audit-db")
        .arg(dir.path().join("audit.db"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let alpha = Alpha::read();
    let rows: Vec<HashMap<String, f64>> = std::fs::read_to_string(&input)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        rows.iter().any(|r| r.len() < alpha.features.len()),
        "no row with a gap"
    );
    let out: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), rows.len());
    for (i, (line, row)) in out.iter().zip(&rows).enumerate() {
        let got = line["prediction"].as_f64().unwrap();
        assert!(
            close(got, alpha.eval(row)),
            "row {i}: {got} vs {}",
            alpha.eval(row)
        );
    }
}

/// A process's stderr lines, on a channel.
fn lines_of(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_streaming_worker_serves_the_custom_kind() {
    let dir = tempfile::tempdir().unwrap();
    // the embedded broker in a process of its own
    let address_file = dir.path().join("address");
    let broker = Killed(
        Command::new(env!("CARGO_BIN_EXE_ml-worker"))
            .args([
                "broker",
                "--topics",
                "features:2,predictions:2,signals:2,dead-letters:1",
                "--address-file",
            ])
            .arg(&address_file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    let brokers = loop {
        if let Ok(a) = std::fs::read_to_string(&address_file) {
            if !a.trim().is_empty() {
                break a.trim().to_string();
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no broker address");
        std::thread::sleep(Duration::from_millis(20));
    };
    // the example's worker.yaml, in JSON, its registry where it is
    let cfg = std::fs::read_to_string(example_dir().join("worker.yaml"))
        .unwrap()
        .replace("format: \"avro-raw\"", "format: \"json\"")
        .replace(
            "registry: \"models.yaml\"",
            &format!(
                "registry: {}",
                serde_json::to_string(&example_dir().join("models.yaml")).unwrap()
            ),
        )
        .replace(
            "audit_db: \"../../data/audit.db\"",
            "audit_db: \"audit.db\"",
        )
        .replace("address: \"127.0.0.1:9101\"", "address: \"127.0.0.1:0\"");
    assert!(cfg.contains("format: \"json\"") && cfg.contains("127.0.0.1:0"));
    std::fs::write(dir.path().join("worker.yaml"), cfg).unwrap();
    let mut child = Command::new(example())
        .args(["run", "--config"])
        .arg(dir.path().join("worker.yaml"))
        .args(["--brokers", &brokers, "--group", "custom-kind"])
        .env("ML_WORKER_AUDIT_KEY", "custom-model-test-key-0123456789")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut child);
    let worker = Killed(child);
    let mut seen = Vec::new();
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("the worker does not start ({e}): {seen:#?}"));
        if line.contains("(metrics on http://") {
            break;
        }
        seen.push(line);
    }

    let samples = load_samples(&example_dir().join("samples")).unwrap();
    let n = 400u64;
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let mut buf = Vec::new();
    for i in 0..n {
        let e = event(&samples, "cm", i, 1_700_000_000_000 + i as i64);
        encode_feature(WireFormat::Json, &e, &mut buf);
        producer
            .send(BaseRecord::to("features").key(&e.symbol).payload(&buf))
            .unwrap();
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10)).unwrap();

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "custom-kind-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["predictions"]).unwrap();
    let mut got: HashMap<String, PredictionEvent> = HashMap::new();
    let t = Instant::now();
    while (got.len() as u64) < n && t.elapsed() < Duration::from_secs(60) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let p: PredictionEvent = serde_json::from_slice(m.payload().unwrap()).unwrap();
            got.insert(p.event_id.clone(), p);
        }
    }
    assert_eq!(
        got.len() as u64,
        n,
        "predictions for {} of {n} events",
        got.len()
    );
    let alpha = Alpha::read();
    let sha = ml_worker::checksum::sha256_file(&example_dir().join("alpha.json")).unwrap();
    for i in 0..n {
        let p = &got[&format!("cm-{i}")];
        let (si, ri) = event_row(&samples, i);
        let row: HashMap<String, f64> = samples[si]
            .features
            .iter()
            .cloned()
            .zip(samples[si].rows[ri].iter().copied())
            .collect();
        assert_eq!(p.model, "alpha");
        assert_eq!(p.model_sha256, sha);
        assert!(
            close(p.prediction, alpha.eval(&row)),
            "event {i}: {} vs {}",
            p.prediction,
            alpha.eval(&row)
        );
    }
    // the clients close while the broker is there to answer them
    drop(consumer);
    drop(producer);
    drop(worker);
    drop(broker);
}
