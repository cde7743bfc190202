//! The dashboard and the alert rules against a real Prometheus scraping a
//! running worker: every metric name they use must be one the worker
//! exports, with the labels they group, match and print by.
//!
//! A worker process (`ml-worker run`) on the embedded broker (or the cluster
//! `KAFKA_BOOTSTRAP` names) serves sample events, poison (dead letters), a
//! model served by its fallback, and reloads (unchanged, failed); Debian's
//! `prometheus` scrapes it every second with `deploy/prometheus/*.yml`
//! loaded as rule files. Then, through Prometheus's HTTP API:
//!
//! - every `ml_worker_*` name in `deploy/grafana/dashboards/*.json` and the
//!   rule files is in the scraped metadata (the worker declares it), as a
//!   histogram where it is used with `_bucket`, `_sum` or `_count`;
//! - the metrics this traffic produces have series, and every label a query
//!   or legend uses is on a series of a metric of that query;
//! - every dashboard query runs (non-empty where its metrics have series);
//! - every alert rule evaluates without error.
//!
//! Skipped, saying why, when no `prometheus` binary is found
//! (`make validate-deploy` installs Debian's package; PROMETHEUS_BIN
//! overrides the search).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

// the broker module of the Kafka-facing tests; this file uses only Broker
#[allow(dead_code)]
mod brokers;
use brokers::Broker;

use ml_worker::events::WireFormat;
use ml_worker::loadgen::{encode_feature, event, load_samples, Load, Traffic};

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

/// `PROMETHEUS_BIN`, else `prometheus` on the PATH.
fn find_binary(name: &str, var: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request to the worker's HTTP endpoint: (status, body).
fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    let status = page
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = page.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (status, body)
}

/// Prometheus's HTTP API: `data` of a successful answer.
struct Api(String);

impl Api {
    fn get(&self, path: &str, params: &[(&str, &str)]) -> Result<serde_json::Value, String> {
        let mut req = ureq::get(format!("{}{path}", self.0));
        for (k, v) in params {
            req = req.query(*k, *v);
        }
        let body = match req.call() {
            Ok(mut r) => r.body_mut().read_to_string().map_err(|e| e.to_string())?,
            Err(e) => return Err(format!("{path} {params:?}: {e}")),
        };
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(format!("{path} {params:?}: {body}"));
        }
        Ok(v["data"].clone())
    }

    fn query(&self, q: &str) -> Result<Vec<serde_json::Value>, String> {
        let d = self.get("/api/v1/query", &[("query", q)])?;
        Ok(d["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of a one-series instant query.
    fn scalar(&self, q: &str) -> Option<f64> {
        let r = self.query(q).ok()?;
        r.first()?["value"][1].as_str()?.parse().ok()
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every `ml_worker_*` name in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("ml_worker_") {
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// Label names a PromQL expression (and its legend or annotations) uses:
/// in `by`/`without`/`on`/`ignoring`/`group_left`/`group_right` lists, in
/// selectors, as `{{label}}` and `$labels.label`.
fn label_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .then(|| s.to_string())
    };
    for kw in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        let mut rest = text;
        while let Some(i) = rest.find(kw) {
            let before = rest[..i].chars().next_back();
            let after = rest[i + kw.len()..].trim_start();
            rest = &rest[i + kw.len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(list) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
                out.extend(list.0.split(',').filter_map(ident));
            }
        }
    }
    // selectors: {name="...", other=~"..."}; legends: {{name}}
    let mut rest = text;
    while let Some(i) = rest.find('{') {
        rest = &rest[i + 1..];
        if let Some(legend) = rest.strip_prefix('{') {
            if let Some((name, _)) = legend.split_once("}}") {
                out.extend(ident(name));
            }
            continue;
        }
        let Some((inside, _)) = rest.split_once('}') else {
            break;
        };
        let mut s = inside;
        while let Some(op) = s.find(['=', '!']) {
            let name = s[..op].rsplit([',', ' ', '{']).next().unwrap_or("");
            out.extend(ident(name));
            // past the quoted value
            let Some(q) = s[op..].find('"') else { break };
            let v = &s[op + q + 1..];
            let Some(close) = v.find('"') else { break };
            s = &v[close + 1..];
        }
    }
    let mut rest = text;
    while let Some(i) = rest.find("$labels.") {
        rest = &rest[i + "$labels.".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        out.extend(ident(&rest[..end]));
    }
    for target in ["le", "job", "instance", "__name__"] {
        out.remove(target);
    }
    out
}

/// A query of the dashboard or the rules: where, expression, and the text
/// whose labels must exist (expression + legend or annotations).
struct Use {
    place: String,
    expr: String,
    labels_text: String,
}

fn dashboard_uses(file: &Path) -> Vec<Use> {
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut panels: Vec<serde_json::Value> = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        panels.push(p.clone());
        panels.extend(p["panels"].as_array().cloned().unwrap_or_default());
    }
    let mut uses = Vec::new();
    for p in &panels {
        for t in p["targets"].as_array().cloned().unwrap_or_default() {
            let expr = t["expr"].as_str().unwrap_or("").to_string();
            let legend = t["legendFormat"].as_str().unwrap_or("");
            uses.push(Use {
                place: format!(
                    "{} panel '{}' {}",
                    file.file_name().unwrap().to_string_lossy(),
                    p["title"].as_str().unwrap_or(""),
                    t["refId"].as_str().unwrap_or("")
                ),
                labels_text: format!("{expr} {legend}"),
                expr,
            });
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            // label_values(SELECTOR, LABEL)
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|s| s.strip_suffix(')'))
                .and_then(|s| s.rsplit_once(','))
                .unwrap_or_else(|| panic!("variable {}: {q}", v["name"]));
            uses.push(Use {
                place: format!("variable ${}", v["name"].as_str().unwrap()),
                expr: inner.0.to_string(),
                labels_text: format!("{} {{{{{}}}}}", inner.0, inner.1.trim()),
            });
        }
    }
    uses
}

fn rule_uses(file: &Path) -> Vec<Use> {
    let doc: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut uses = Vec::new();
    for g in doc["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap();
            let expr = r["expr"].as_str().unwrap().to_string();
            let annotations = serde_norway::to_string(&r["annotations"]).unwrap_or_default();
            uses.push(Use {
                place: format!(
                    "{} rule {name}",
                    file.file_name().unwrap().to_string_lossy()
                ),
                labels_text: format!("{expr} {annotations}"),
                expr,
            });
        }
    }
    uses
}

/// Grafana's variables, as the test's Prometheus has them.
fn substitute(expr: &str) -> String {
    let mut e = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1s")
        .replace("$__range", "5m");
    for var in ["$job", "$model", "${job}", "${model}"] {
        e = e.replace(var, ".*");
    }
    e
}

/// Files under `dir` whose names end with `suffix`, sorted.
fn files(dir: &str, suffix: &str, skip: Option<&str>) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(suffix) && !skip.is_some_and(|s| n.ends_with(s))
        })
        .collect();
    v.sort();
    v
}

/// Metrics the traffic below makes, so they must have series.
const PRODUCED: &[&str] = &[
    "ml_worker_events_in_total",
    "ml_worker_events_out_total",
    "ml_worker_outputs_acked_total",
    "ml_worker_dead_letters_total",
    "ml_worker_fallbacks_total",
    "ml_worker_route_predictions_total",
    "ml_worker_signals_total",
    "ml_worker_commits_total",
    "ml_worker_batch_size",
    "ml_worker_inference_latency_seconds",
    "ml_worker_end_to_end_latency_seconds",
    "ml_worker_in_flight_events",
    "ml_worker_in_flight_bytes",
    "ml_worker_paused",
    "ml_worker_assigned_partitions",
    "ml_worker_consumer_lag",
    "ml_worker_committed_offset_lag",
    "ml_worker_reloads_total",
    "ml_worker_model_info",
];

#[test]
fn every_metric_the_dashboard_and_alerts_use_is_exported_by_a_running_worker() {
    let Some(prometheus) = find_binary("prometheus", "PROMETHEUS_BIN") else {
        eprintln!(
            "skipped: no prometheus binary (make validate-deploy installs Debian's prometheus package; or set PROMETHEUS_BIN)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // what the deployment files use
    let dashboards = files("deploy/grafana/dashboards", ".json", None);
    let rule_files = files("deploy/prometheus", ".yml", Some("_test.yml"));
    assert!(!dashboards.is_empty() && !rule_files.is_empty());
    let mut uses = Vec::new();
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in dashboards.iter().chain(&rule_files) {
        let text = std::fs::read_to_string(f).unwrap();
        for n in metric_names(&text) {
            used.entry(n)
                .or_default()
                .insert(f.strip_prefix(root()).unwrap().display().to_string());
        }
        if f.extension().is_some_and(|e| e == "json") {
            uses.extend(dashboard_uses(f));
        } else {
            uses.extend(rule_uses(f));
        }
    }
    eprintln!(
        "{} metric names in {} dashboards and {} rule files, {} queries",
        used.len(),
        dashboards.len(),
        rule_files.len(),
        uses.len()
    );

    // the worker: the shipped models, one with a missing file served by its
    // fallback, on fresh topics
    let broker = Broker::start();
    let address = broker.address();
    let [features, predictions, signals, dead] =
        ["features", "predictions", "signals", "dead"].map(unique);
    broker.create_topic(&features, 4);
    broker.create_topic(&predictions, 2);
    broker.create_topic(&signals, 2);
    broker.create_topic(&dead, 1);
    let models_dir = root().join("models");
    let shipped = std::fs::read_to_string(root().join("config/models.yaml")).unwrap();
    let registry = shipped.replace(
        "path: \"../models/",
        &format!("path: \"{}/", models_dir.display()),
    ) + &format!(
        r#"
  - name: "diabetes_candidate"
    path: "{}/not-there.txt"
    kind: "lightgbm"
    features: ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
    target: "disease_progression"
    task_type: "regression"
    fallback: "diabetes_lgbm"
    optional: true
"#,
        d.display()
    );
    std::fs::write(d.join("models.yaml"), &registry).unwrap();
    std::fs::write(
        d.join("worker.yaml"),
        format!(
            r#"kafka: {{brokers: "{address}", group_id: "{group}", client_id: "ml-worker", librdkafka: {{}}}}
input: {{topics: ["{features}"], format: "avro-raw"}}
outputs:
  predictions: {{topic: "{predictions}", format: "avro-raw"}}
  signals: {{topic: "{signals}", format: "avro-raw"}}
  dead_letters: {{topic: "{dead}"}}
batching: {{max_batch_size: 32, max_wait_ms: 2}}
delivery: {{max_in_flight: 64, commit_interval_ms: 200, shutdown_timeout_ms: 5000}}
registry: "models.yaml"
audit_db: "audit.db"
metrics: {{address: "127.0.0.1:0"}}
reload: {{watch: false}}
"#,
            group = unique("prometheus-test"),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args(["run", "--config"])
        .arg(d.join("worker.yaml"))
        .current_dir(d)
        .env("ML_WORKER_AUDIT_KEY", "prometheus-test-key-0123456789")
        .env_remove("ML_WORKER_ADMIN_TOKEN")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let worker = Process(child);
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let metrics: std::net::SocketAddr = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("the worker does not start ({e}): {seen:#?}"));
        seen.push(line.clone());
        if let Some(rest) = line.split_once("(metrics on http://") {
            break rest.1.split('/').next().unwrap().parse().unwrap();
        }
    };
    eprintln!("worker: metrics on {metrics}");

    // Prometheus: scrapes it every second, with the rule files loaded
    let prometheus_port = free_port();
    let rules_yaml: Vec<String> = rule_files
        .iter()
        .map(|f| format!("\"{}\"", f.display()))
        .collect();
    std::fs::write(
        d.join("prometheus.yml"),
        format!(
            r#"global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [{}]
scrape_configs:
  - job_name: ml-worker
    static_configs: [{{targets: ["{metrics}"]}}]
"#,
            rules_yaml.join(", ")
        ),
    )
    .unwrap();
    let log = std::fs::File::create(d.join("prometheus.log")).unwrap();
    let _prometheus = Process(
        Command::new(&prometheus)
            .arg(format!(
                "--config.file={}",
                d.join("prometheus.yml").display()
            ))
            .arg(format!("--storage.tsdb.path={}", d.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let api = Api(format!("http://127.0.0.1:{prometheus_port}"));
    let prom_log = || std::fs::read_to_string(d.join("prometheus.log")).unwrap_or_default();
    let t = Instant::now();
    while ureq::get(format!("{}/-/ready", api.0)).call().is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "prometheus not ready: {}",
            prom_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "prometheus ({}) on 127.0.0.1:{prometheus_port}",
        prometheus.display()
    );

    // traffic: sample events of every model, poison, the fallback's model
    let samples = load_samples(&models_dir.join("samples")).unwrap();
    let load = Load::new(&address).unwrap();
    let traffic = Traffic {
        topic: &features,
        format: WireFormat::AvroRaw,
        samples: &samples,
        prefix: "p",
    };
    let n = 2000;
    load.events(&traffic, 0, n, Some(2000.0), &AtomicBool::new(false))
        .unwrap();
    let mut buf = Vec::new();
    let mut extra = 0;
    for i in 0..40u64 {
        let mut e = event(&samples, "odd", i, ml_worker::loadgen::now_ms());
        e.model = if i % 2 == 0 {
            "no_such_model".into() // route: a dead letter
        } else {
            let diabetes = samples.iter().position(|s| s.model == "diabetes_lgbm");
            let row = event(&samples, "odd", diabetes.unwrap() as u64, e.event_time);
            e.features = row.features;
            "diabetes_candidate".into() // served by diabetes_lgbm
        };
        encode_feature(WireFormat::AvroRaw, &e, &mut buf);
        load.send(&features, Some(e.symbol.as_bytes()), &buf)
            .unwrap();
        load.send(
            &features,
            Some(b"POISON"),
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff not an avro datum",
        )
        .unwrap();
        extra += 2;
    }
    load.flush(Duration::from_secs(30)).unwrap();
    let total = n + extra;

    // reloads: one unchanged, one refused (a broken registry), then back
    let (status, body) = http(metrics, "POST", "/admin/reload");
    assert_eq!(status, 200, "reload: {body}");
    std::fs::write(d.join("models.yaml"), "models: [this is not a registry\n").unwrap();
    let (status, body) = http(metrics, "POST", "/admin/reload");
    assert_eq!(status, 422, "a broken registry is refused: {body}");
    std::fs::write(d.join("models.yaml"), &registry).unwrap();

    // Prometheus has it all
    let wait = Duration::from_secs(90);
    wait_for("prometheus scrapes every event", wait, || {
        api.scalar("sum(ml_worker_events_in_total)")
            .is_some_and(|v| v as u64 >= total)
    });
    for q in [
        "ml_worker_reloads_total{result=\"failed\"}",
        "ml_worker_fallbacks_total",
        "ml_worker_consumer_lag",
        "ml_worker_committed_offset_lag",
    ] {
        wait_for(&format!("prometheus has {q}"), wait, || {
            api.query(q).is_ok_and(|r| !r.is_empty())
        });
    }
    // a few more scrapes for rate() and for the rules to evaluate
    std::thread::sleep(Duration::from_secs(4));

    // the worker's exposition passes promtool's lint
    if let Some(promtool) = find_binary("promtool", "PROMTOOL_BIN") {
        let (_, page) = http(metrics, "GET", "/metrics");
        let mut lint = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        lint.stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .unwrap();
        let out = lint.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // 1. every name is declared by the worker (scraped metadata)
    let metadata = api.get("/api/v1/metadata", &[]).unwrap();
    let mut problems = Vec::new();
    let mut base_of = BTreeMap::new();
    for (name, where_) in &used {
        let (base, histogram_part) = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                let b = name.strip_suffix(s)?;
                (metadata[b][0]["type"] == "histogram").then_some((b, true))
            })
            .unwrap_or((name.as_str(), false));
        base_of.insert(name.clone(), base.to_string());
        match metadata[base][0]["type"].as_str() {
            None => problems.push(format!(
                "{name} (in {where_:?}) is not a metric the worker exports"
            )),
            Some(t) if histogram_part && t != "histogram" => {
                problems.push(format!("{name}: {base} is a {t}, not a histogram"))
            }
            Some(_) => {}
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    for m in PRODUCED {
        assert!(
            metadata[*m].is_array(),
            "{m}: the worker no longer exports it"
        );
    }

    // 2. series and their labels
    let series = api
        .get(
            "/api/v1/series",
            &[("match[]", "{__name__=~\"ml_worker_.+\"}")],
        )
        .unwrap();
    let mut labels_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in series.as_array().unwrap() {
        let name = s["__name__"].as_str().unwrap();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| {
                let b = name.strip_suffix(suf)?;
                (metadata[b][0]["type"] == "histogram").then_some(b)
            })
            .unwrap_or(name);
        let set = labels_of.entry(base.to_string()).or_default();
        set.extend(s.as_object().unwrap().keys().cloned());
    }
    for m in PRODUCED {
        assert!(
            labels_of.contains_key(*m),
            "{m}: no series after this traffic"
        );
    }
    let quiet: Vec<&String> = base_of
        .values()
        .filter(|b| !labels_of.contains_key(*b))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    eprintln!("exported, no series in this run (labels not checked): {quiet:?}");
    for u in &uses {
        let metrics_here: BTreeSet<String> = metric_names(&u.expr)
            .iter()
            .map(|n| base_of.get(n).cloned().unwrap_or_else(|| n.clone()))
            .collect();
        if metrics_here.is_empty() {
            continue;
        }
        let all_live = metrics_here.iter().all(|m| labels_of.contains_key(m));
        for l in label_names(&u.labels_text) {
            let found = metrics_here
                .iter()
                .any(|m| labels_of.get(m).is_some_and(|s| s.contains(&l)));
            if !found && all_live {
                problems.push(format!(
                    "{}: label '{l}' is on no series of {metrics_here:?}",
                    u.place
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");

    // 3. every dashboard query runs, with data where its metrics have series
    for u in uses.iter().filter(|u| !u.place.contains(" rule ")) {
        let q = substitute(&u.expr);
        match api.query(&q) {
            Err(e) => problems.push(format!("{}: {e}", u.place)),
            Ok(r) => {
                let live = metric_names(&u.expr).iter().all(|n| {
                    labels_of.contains_key(base_of.get(n).map_or(n.as_str(), |b| b.as_str()))
                });
                if live && r.is_empty() {
                    problems.push(format!("{}: no data for {q}", u.place));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");

    // 4. every rule is loaded and evaluates without error
    let expected_rules = uses.iter().filter(|u| u.place.contains(" rule ")).count();
    let mut rules = Vec::new();
    wait_for("every rule evaluated", wait, || {
        let Ok(data) = api.get("/api/v1/rules", &[]) else {
            return false;
        };
        rules = data["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        rules.len() == expected_rules && rules.iter().all(|r| r["health"] != "unknown")
    });
    for r in &rules {
        if r["health"] != "ok" {
            problems.push(format!(
                "rule {}: {} {}",
                r["name"], r["health"], r["lastError"]
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    let firing: Vec<String> = rules
        .iter()
        .filter(|r| r["state"] != "inactive")
        .map(|r| format!("{} ({})", r["name"], r["state"]))
        .collect();
    eprintln!(
        "{} metric names, {} queries, {} rules checked; rules not inactive: {firing:?}",
        used.len(),
        uses.len(),
        rules.len()
    );
    drop(worker);
}

#[test]
fn label_and_name_extraction() {
    assert_eq!(
        metric_names("rate(ml_worker_a_total[5m]) / xml_worker_b + ml_worker_c_bucket{le=\"1\"}"),
        ["ml_worker_a_total", "ml_worker_c_bucket"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        label_names(
            r#"sum by (job, topic) (x{model=~"$model", stage!="a,b"}) / on (job) group_left(side) y {{route}} $labels.partition"#
        ),
        ["model", "partition", "route", "side", "stage", "topic"]
            .map(String::from)
            .into()
    );
}
