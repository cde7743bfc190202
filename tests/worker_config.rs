//! `worker.yaml`: the shipped file is valid, overrides apply, and every file
//! under tests/fixtures/config/invalid is refused with the error its first
//! line (`# expect: ...`) names.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ml_worker::events::WireFormat;
use ml_worker::worker::config::{load_worker_config, DeliveryMode, Overrides};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn shipped_config_is_valid_and_resolves_paths() {
    let c = load_worker_config(&root().join("config/worker.yaml"), &Overrides::default()).unwrap();
    assert!(c.embedded());
    assert_eq!(c.input_topics, vec!["features"]);
    assert_eq!(c.input_format, WireFormat::AvroRaw);
    assert_eq!(c.predictions.topic, "predictions");
    assert_eq!(c.signals.topic, "signals");
    assert_eq!(c.dead_letters, "dead-letters");
    assert_eq!(c.mode, DeliveryMode::AtLeastOnce);
    assert_eq!(c.limits_for("anything").max_batch_size, 1000);
    assert_eq!(c.limits_for("anything").max_wait, Duration::from_millis(2));
    assert_eq!(c.registry, root().join("config/models.yaml"));
    assert!(c.registry.is_file());
    assert_eq!(c.audit_db, root().join("config/../data/audit.db"));
}

#[test]
fn command_line_overrides_win() {
    let o = Overrides {
        brokers: Some("127.0.0.1:9092".into()),
        group_id: Some("g2".into()),
        registry: Some(PathBuf::from("/elsewhere/models.yaml")),
    };
    let c = load_worker_config(&root().join("config/worker.yaml"), &o).unwrap();
    assert!(!c.embedded());
    assert_eq!(c.brokers, "127.0.0.1:9092");
    assert_eq!(c.group_id, "g2");
    assert_eq!(c.registry, Path::new("/elsewhere/models.yaml"));
}

#[test]
fn per_model_batching_overrides_the_defaults() {
    let text = std::fs::read_to_string(root().join("config/worker.yaml"))
        .unwrap()
        .replace("  per_model: {}", "  per_model: {fast: {max_wait_ms: 1}}");
    let c = ml_worker::worker::config::parse_worker_config(
        &text,
        Path::new("w.yaml"),
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(c.limits_for("fast").max_wait, Duration::from_millis(1));
    assert_eq!(c.limits_for("fast").max_batch_size, 1000);
}

#[test]
fn invalid_configs_are_refused_naming_the_field() {
    let dir = root().join("tests/fixtures/config/invalid");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .expect("first line '# expect: ...'");
        let e = load_worker_config(&path, &Overrides::default())
            .expect_err(&path.display().to_string())
            .to_string();
        assert!(
            e.contains(expect),
            "{}: expected {expect:?} in {e:?}",
            path.display()
        );
        assert!(e.contains(&path.display().to_string()), "{e}");
        n += 1;
    }
    assert!(n >= 10, "only {n} invalid fixtures");
}

#[test]
fn the_group_protocol_is_kip_848_by_default_and_classic_takes_session_settings() {
    use ml_worker::worker::config::GroupProtocol;
    let shipped = std::fs::read_to_string(root().join("config/worker.yaml")).unwrap();
    let parse = |text: &str| {
        ml_worker::worker::config::parse_worker_config(
            text,
            Path::new("w.yaml"),
            &Overrides::default(),
        )
    };
    assert_eq!(
        parse(&shipped).unwrap().group_protocol,
        GroupProtocol::Consumer
    );
    let classic = shipped
        .replace(
            "group_protocol: \"consumer\"",
            "group_protocol: \"classic\"",
        )
        .replace(
            "librdkafka: {}",
            "librdkafka: {\"session.timeout.ms\": \"30000\"}",
        );
    assert_ne!(classic, shipped);
    let c = parse(&classic).unwrap();
    assert_eq!(c.group_protocol, GroupProtocol::Classic);
    assert_eq!(c.librdkafka["session.timeout.ms"], "30000");
}

#[test]
fn exactly_once_takes_a_transactional_id_and_configures_both_clients_for_transactions() {
    let shipped = std::fs::read_to_string(root().join("config/worker.yaml")).unwrap();
    let parse = |text: &str| {
        ml_worker::worker::config::parse_worker_config(
            text,
            Path::new("w.yaml"),
            &Overrides::default(),
        )
        .unwrap()
    };
    let mode = "mode: \"at-least-once\"";
    assert!(shipped.contains(mode));
    // at-least-once: no transactions, outputs retried until delivered
    let c = parse(&shipped);
    let (consumer, producer) = ml_worker::worker::client_configs(&c, "b:9092");
    assert_eq!(producer.get("transactional.id"), None);
    assert_eq!(producer.get("message.timeout.ms"), Some("0"));
    assert_eq!(consumer.get("isolation.level"), None);
    // exactly-once with the defaults: GROUP-HOST-PID, 100,000 events
    let c = parse(&shipped.replace(mode, "mode: \"exactly-once\""));
    assert_eq!(c.mode, DeliveryMode::ExactlyOnce);
    assert_eq!(c.transactional_id, None);
    assert_eq!(c.transaction_max_events, 100_000);
    let id = format!("ml-worker-{}", ml_worker::audit::default_worker_id());
    assert_eq!(c.transactional_id(), id);
    let (consumer, producer) = ml_worker::worker::client_configs(&c, "b:9092");
    assert_eq!(producer.get("transactional.id"), Some(id.as_str()));
    assert_eq!(producer.get("enable.idempotence"), Some("true"));
    assert_eq!(
        producer.get("message.timeout.ms"),
        None,
        "librdkafka's default: the transaction timeout"
    );
    assert_eq!(consumer.get("isolation.level"), Some("read_committed"));
    assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
    // set explicitly, with pass-through settings that keep the guarantee
    let c = parse(
        &shipped
            .replace(
                mode,
                "mode: \"exactly-once\"\n  transactional_id: \"scorer-0\"\n  transaction_max_events: 5000",
            )
            .replace(
                "librdkafka: {}",
                "librdkafka: {\"isolation.level\": \"read_committed\", \"transaction.timeout.ms\": \"30000\", \"message.timeout.ms\": \"20000\"}",
            ),
    );
    assert_eq!(c.transactional_id(), "scorer-0");
    assert_eq!(c.transaction_max_events, 5000);
    let (_, producer) = ml_worker::worker::client_configs(&c, "b:9092");
    assert_eq!(producer.get("transactional.id"), Some("scorer-0"));
    assert_eq!(producer.get("message.timeout.ms"), Some("20000"));
}

#[test]
fn librdkafka_env_reads_secrets_from_the_environment_and_checks_them_like_the_file() {
    let shipped = std::fs::read_to_string(root().join("config/worker.yaml")).unwrap();
    let parse = |pass: &str, env: &str| {
        ml_worker::worker::config::parse_worker_config(
            &shipped.replace(
                "librdkafka: {}",
                &format!("librdkafka: {pass}\n  librdkafka_env: {env}"),
            ),
            Path::new("w.yaml"),
            &Overrides::default(),
        )
        .map_err(|e| e.to_string())
    };
    // variables unique to this test (the environment is the process's)
    let secret = "s3cr3t \"quoted\" $HOME `x`";
    std::env::set_var("ML_WORKER_TEST_SASL_PASSWORD_A81F", secret);
    std::env::set_var("ML_WORKER_TEST_EMPTY_A81F", "");
    std::env::set_var("ML_WORKER_TEST_PLUGIN_A81F", "/tmp/evil.so");
    let c = parse(
        r#"{"sasl.username": "ml-worker"}"#,
        r#"{"sasl.password": "ML_WORKER_TEST_SASL_PASSWORD_A81F"}"#,
    )
    .unwrap();
    assert_eq!(c.librdkafka["sasl.password"], secret, "taken verbatim");
    let (consumer, producer) = ml_worker::worker::client_configs(&c, "b:9092");
    assert_eq!(consumer.get("sasl.password"), Some(secret));
    assert_eq!(producer.get("sasl.password"), Some(secret));
    assert_eq!(producer.get("sasl.username"), Some("ml-worker"));

    let cases = [
        (
            r#"{}"#,
            r#"{"sasl.password": "ML_WORKER_TEST_EMPTY_A81F"}"#,
            "field 'kafka.librdkafka_env.sasl.password': the environment variable 'ML_WORKER_TEST_EMPTY_A81F' is empty",
        ),
        (
            r#"{"sasl.password": "in-the-file"}"#,
            r#"{"sasl.password": "ML_WORKER_TEST_SASL_PASSWORD_A81F"}"#,
            "field 'kafka.librdkafka_env.sasl.password': is given twice (also as 'kafka.librdkafka.sasl.password'",
        ),
        (
            r#"{}"#,
            r#"{"sasl.password": "ML_WORKER_TEST_SASL_PASSWORD_A81F", "topic.SASL.PASSWORD": "ML_WORKER_TEST_SASL_PASSWORD_A81F"}"#,
            "is given twice",
        ),
        // librdkafka's own errors quote the value: reworded
        (
            r#"{}"#,
            r#"{"sasl.pasword": "ML_WORKER_TEST_SASL_PASSWORD_A81F"}"#,
            "field 'kafka.librdkafka_env.sasl.pasword': is not a librdkafka property",
        ),
        (
            r#"{}"#,
            r#"{"isolation.level": "ML_WORKER_TEST_SASL_PASSWORD_A81F"}"#,
            "field 'kafka.librdkafka_env.isolation.level': librdkafka does not accept its value (not shown",
        ),
        (
            r#"{}"#,
            r#"{"sasl.password": "NOT=A NAME"}"#,
            "'NOT=A NAME' is not an environment variable name",
        ),
        (
            r#"{}"#,
            r#"{"plugin.library.paths": "ML_WORKER_TEST_PLUGIN_A81F"}"#,
            "field 'kafka.librdkafka_env.plugin.library.paths': is refused",
        ),
        (
            r#"{}"#,
            r#"{"enable.auto.commit": "ML_WORKER_TEST_SASL_PASSWORD_A81F"}"#,
            "field 'kafka.librdkafka_env.enable.auto.commit': is managed by ml-worker",
        ),
        (
            r#"{}"#,
            r#"{"sasl.kerberos.principal": "ML_WORKER_TEST_SASL_PASSWORD_A81F"}"#,
            "field 'kafka.librdkafka_env.sasl.kerberos.principal': may hold only letters",
        ),
    ];
    for (pass, env, expect) in cases {
        let e = parse(pass, env).expect_err(env);
        assert!(e.contains(expect), "expected {expect:?} in {e:?}");
        assert!(
            !e.contains("s3cr3t"),
            "a variable's value is never shown: {e}"
        );
    }
    // in the file: librdkafka's reason, unless the property holds a secret
    let e = parse(r#"{"isolation.level": "dirty"}"#, "{}").unwrap_err();
    assert!(
        e.contains("field 'kafka.librdkafka.isolation.level': librdkafka does not accept it: ")
            && e.contains("dirty"),
        "{e}"
    );
    // a configuration error librdkafka gives when a client is made (it
    // checks some values only then) names the property, not its value
    let e = rdkafka::error::KafkaError::ClientConfig(
        rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
        "Invalid value \"s3cr3t\" for configuration property \"sasl.password\"".into(),
        "sasl.password".into(),
        "s3cr3t".into(),
    );
    let shown = ml_worker::worker::WorkerError::Kafka(e).to_string();
    assert!(
        shown.contains("'sasl.password'") && !shown.contains("s3cr3t"),
        "{shown}"
    );
}

/// The worker configurations the deployment files ship (compose's file, the
/// Kubernetes ConfigMap's `worker.yaml`) pass the worker's own parser, with
/// the variables the Deployment sets from Secrets.
#[test]
fn the_deployment_files_worker_configs_are_valid() {
    let compose = std::fs::read_to_string(root().join("deploy/compose/worker.yaml")).unwrap();
    let cm: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(root().join("deploy/k8s/configmap-worker.yaml")).unwrap(),
    )
    .unwrap();
    let k8s = cm["data"]["worker.yaml"].as_str().unwrap().to_string();
    std::env::set_var("KAFKA_SASL_USERNAME", "user-from-the-secret");
    std::env::set_var("KAFKA_SASL_PASSWORD", "from-the-secret");
    for (name, text) in [("compose", compose), ("k8s", k8s)] {
        if name == "k8s" && !cfg!(feature = "ssl") {
            // SASL_SSL and SCRAM: refused at load, saying to build with `ssl`
            let e = ml_worker::worker::config::parse_worker_config(
                &text,
                Path::new("w.yaml"),
                &Overrides::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("--features ssl"), "{e}");
            continue;
        }
        let c = ml_worker::worker::config::parse_worker_config(
            &text,
            Path::new("/etc/ml-worker/config/worker.yaml"),
            &Overrides::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!c.embedded(), "{name}: a real cluster");
        assert!(
            !c.metrics_address.ip().is_loopback(),
            "{name}: scraped from outside"
        );
        if name == "k8s" {
            assert_eq!(c.librdkafka["sasl.username"], "user-from-the-secret");
            assert_eq!(c.librdkafka["sasl.password"], "from-the-secret");
        }
    }
}
