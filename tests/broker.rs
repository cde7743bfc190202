//! The embedded broker speaks real Kafka protocol: a librdkafka producer and
//! consumer group move messages through it, in-process and through the
//! `ml-worker broker` command, which stops cleanly on SIGTERM.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ml_worker::broker::{parse_topics, EmbeddedBroker};
use ml_worker::worker::fetch::FetchQueue;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::Message;

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Produces `n` keyed messages and reads them back with a consumer group;
/// returns the distinct payloads seen.
fn round_trip(bootstrap: &str, topic: &str, n: usize) -> HashSet<String> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for i in 0..n {
        let payload = format!("message-{i}");
        let key = format!("k{}", i % 7);
        producer
            .send(BaseRecord::to(topic).payload(&payload).key(&key))
            .unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("group"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            seen.insert(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
        }
    }
    seen
}

#[test]
fn messages_go_through_the_in_process_broker() {
    let topic = unique("t");
    let broker = EmbeddedBroker::start(1, &parse_topics(&format!("{topic}:3")).unwrap()).unwrap();
    let seen = round_trip(&broker.bootstrap_servers(), &topic, 500);
    assert_eq!(seen.len(), 500);
}

#[test]
fn broker_command_serves_clients_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("cmd");
    let address_file = dir.path().join("bootstrap.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args([
            "broker",
            "--topics",
            &format!("{topic}:2"),
            "--address-file",
        ])
        .arg(&address_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let bootstrap = wait_for(&address_file);
    assert!(
        bootstrap.starts_with("127.0.0.1:") || bootstrap.starts_with("localhost:"),
        "{bootstrap}"
    );
    assert_eq!(round_trip(&bootstrap, &topic, 200).len(), 200);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "broker did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    assert!(code.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&bootstrap));
}

#[test]
fn bad_topic_specs_are_refused_by_the_command() {
    let o = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args(["broker", "--topics", "features:zero"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--topics") && err.contains("'zero'"), "{err}");
}

fn wait_for(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            return s.trim().to_string();
        }
        assert!(Instant::now() < deadline, "no address file");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A consumer whose assigned partitions forward to a `FetchQueue`.
struct Forwarding {
    fetch: std::sync::Mutex<Option<std::sync::Arc<FetchQueue>>>,
}

impl rdkafka::ClientContext for Forwarding {}

impl rdkafka::consumer::ConsumerContext for Forwarding {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        if let rdkafka::consumer::Rebalance::Assign(tpl) = rebalance {
            if let Some(f) = self.fetch.lock().unwrap().as_ref() {
                f.attach(tpl);
            }
        }
    }
}

#[test]
fn the_fetch_queue_reads_every_record_in_partition_order_with_key_headers_and_timestamp() {
    use rdkafka::message::{Header, OwnedHeaders};
    let topic = unique("fq");
    let broker = EmbeddedBroker::start(1, &parse_topics(&format!("{topic}:3")).unwrap()).unwrap();
    let bootstrap = broker.bootstrap_servers();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let n = 3000;
    for i in 0..n {
        let payload = format!("v{i}");
        let key = format!("k{i}");
        let mut r = BaseRecord::to(&topic)
            .key(&key)
            .partition(i % 3)
            .timestamp(1_700_000_000_000 + i64::from(i));
        // every third record is a tombstone, every fifth carries headers
        if i % 3 != 1 {
            r = r.payload(&payload);
        }
        if i % 5 == 0 {
            r = r.headers(
                OwnedHeaders::new()
                    .insert(Header {
                        key: "trace",
                        value: Some(&payload),
                    })
                    .insert(Header {
                        key: "empty",
                        value: None::<&str>,
                    }),
            );
        }
        producer.send(r).unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let consumer: BaseConsumer<Forwarding> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", unique("group"))
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create_with_context(Forwarding {
            fetch: Default::default(),
        })
        .unwrap();
    let fetch = std::sync::Arc::new(FetchQueue::new(&consumer));
    *consumer.context().fetch.lock().unwrap() = Some(fetch.clone());
    consumer.subscribe(&[&topic]).unwrap();

    let mut next_offset = [0i64; 3];
    let (mut seen, mut on_main_queue, mut bursts) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen < n && Instant::now() < deadline {
        while let Some(r) = consumer.poll(Duration::ZERO) {
            r.unwrap();
            on_main_queue += 1;
        }
        let taken = fetch.consume(Duration::from_millis(50), |r| {
            let m = r.unwrap();
            assert_eq!(m.topic, topic);
            let p = m.partition as usize;
            assert_eq!(m.offset, next_offset[p], "partition {p} in order, no gaps");
            next_offset[p] += 1;
            let i = (m.offset * 3) as i32 + m.partition; // the producer's index
            assert_eq!(m.key, Some(format!("k{i}").as_bytes()));
            assert_eq!(m.timestamp, Some(1_700_000_000_000 + i64::from(i)));
            if i % 3 == 1 {
                assert_eq!(m.payload, None, "tombstone {i}");
            } else {
                assert_eq!(m.payload, Some(format!("v{i}").as_bytes()));
            }
            match &m.headers {
                Some(h) => {
                    use rdkafka::message::Headers;
                    assert_eq!(i % 5, 0);
                    assert_eq!(h.count(), 2);
                    assert_eq!(h.get(0).key, "trace");
                    assert_eq!(h.get(0).value, Some(format!("v{i}").as_bytes()));
                    assert_eq!(h.get(1).key, "empty");
                    assert_eq!(h.get(1).value, None);
                }
                None => assert_ne!(i % 5, 0, "record {i} lost its headers"),
            }
            seen += 1;
        });
        if taken > 1 {
            bursts += 1;
        }
    }
    assert_eq!(seen, n, "every record read");
    assert_eq!(on_main_queue, 0, "no record bypassed the fetch queue");
    assert!(bursts > 0, "records come in bursts, not one per call");
    drop(fetch);
    consumer.context().fetch.lock().unwrap().take();
}
