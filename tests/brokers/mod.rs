//! The broker a Kafka-facing test runs on: the embedded one (librdkafka's
//! mock cluster, started in the test's process), or a real Kafka cluster
//! when `KAFKA_BOOTSTRAP` names one (`make test-kafka` starts Apache Kafka
//! with `scripts/kafka-broker.sh` and runs these tests again against it).
//! Each test prints which; fault injection (a broker going down, injected
//! request errors) exists only on the embedded one, and tests that need it
//! say so and skip on a real broker.

use ml_worker::broker::{EmbeddedBroker, TopicSpec};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub enum Broker {
    Embedded(EmbeddedBroker),
    External(String),
}

impl Broker {
    /// The embedded broker, or the cluster `KAFKA_BOOTSTRAP` names.
    pub fn start() -> Broker {
        match external() {
            Some(b) => {
                eprintln!("broker: Kafka at {b} (KAFKA_BOOTSTRAP)");
                Broker::External(b)
            }
            None => {
                eprintln!("broker: the embedded broker (librdkafka's mock cluster)");
                Broker::Embedded(EmbeddedBroker::start(1, &[]).unwrap())
            }
        }
    }

    pub fn address(&self) -> String {
        match self {
            Broker::Embedded(b) => b.bootstrap_servers(),
            Broker::External(b) => b.clone(),
        }
    }

    /// The mock cluster, for fault injection (embedded only).
    #[allow(dead_code)]
    pub fn embedded(&self) -> &EmbeddedBroker {
        match self {
            Broker::Embedded(b) => b,
            Broker::External(_) => panic!("fault injection needs the embedded broker"),
        }
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        match self {
            Broker::Embedded(b) => b
                .create_topic(&TopicSpec {
                    name: name.to_string(),
                    partitions,
                })
                .unwrap(),
            Broker::External(b) => {
                let admin: AdminClient<_> = ClientConfig::new()
                    .set("bootstrap.servers", b)
                    .create()
                    .unwrap();
                let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
                let r = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(admin.create_topics([&topic], &AdminOptions::new()))
                    .unwrap();
                for t in r {
                    t.unwrap();
                }
            }
        }
    }
}

/// `KAFKA_BOOTSTRAP`, when set.
pub fn external() -> Option<String> {
    std::env::var("KAFKA_BOOTSTRAP")
        .ok()
        .filter(|b| !b.is_empty())
}

/// True (and says why) when a test that injects faults into the embedded
/// broker runs against a real one: it is skipped there.
#[allow(dead_code)]
pub fn mock_only(why: &str) -> bool {
    if external().is_some() {
        eprintln!("skipped on a real broker: {why}");
        return true;
    }
    false
}

/// Offsets `group` has committed on partitions `0..partitions` of `topic`,
/// summed.
pub fn committed_total(brokers: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, std::time::Duration::from_secs(10))
        .unwrap();
    got.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}
