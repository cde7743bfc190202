//! The embedded broker: librdkafka's in-process mock cluster, speaking the
//! real Kafka protocol on loopback TCP ports, so the worker, its tests, the
//! demo and any external client (`confluent-kafka`, `kcat`, ...) can use it
//! without a Kafka installation.
//!
//! Limits (see librdkafka's mock cluster docs): topics are created here, not
//! through the admin API; each partition keeps a bounded log, so a consumer
//! that falls far behind a producer reads past deleted records.

use std::fmt;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};
use rdkafka::ClientConfig;

/// A topic to create: `name:partitions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
}

impl fmt::Display for TopicSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.partitions)
    }
}

/// The topics the shipped `config/worker.yaml` uses.
pub const DEFAULT_TOPICS: &str = "features:8,predictions:8,signals:8,dead-letters:1";

/// Parses `name:partitions,name:partitions,...` (a bare `name` gets 1 partition).
pub fn parse_topics(spec: &str) -> Result<Vec<TopicSpec>, String> {
    let mut out: Vec<TopicSpec> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, partitions) = match item.split_once(':') {
            Some((n, p)) => {
                let p: i32 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("topic '{item}': partitions '{p}' is not a number"))?;
                (n.trim(), p)
            }
            None => (item, 1),
        };
        if !(1..=1000).contains(&partitions) {
            return Err(format!(
                "topic '{name}': partitions must be 1..=1000, got {partitions}"
            ));
        }
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if name.is_empty() || name.len() > 249 || !name.chars().all(legal) {
            return Err(format!("topic '{name}': names use 1-249 of [a-zA-Z0-9._-]"));
        }
        if out.iter().any(|t| t.name == name) {
            return Err(format!("topic '{name}' is listed twice"));
        }
        out.push(TopicSpec {
            name: name.to_string(),
            partitions,
        });
    }
    if out.is_empty() {
        return Err("no topics given".into());
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot start the embedded broker: {0}")]
    Start(String),
    #[error("cannot create topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
}

/// A running mock cluster. Dropping it stops the brokers.
///
/// The cluster belongs to a client created with `test.mock.num.brokers`
/// (librdkafka's own way of starting one), which lets it be configured
/// beyond what `MockCluster` exposes: consumer groups rebalance at once
/// instead of after the usual 3 s initial delay.
pub struct EmbeddedBroker {
    owner: BaseProducer,
}

impl EmbeddedBroker {
    /// Starts `brokers` mock brokers on free loopback ports and creates the topics.
    pub fn start(brokers: i32, topics: &[TopicSpec]) -> Result<EmbeddedBroker, BrokerError> {
        if !(1..=16).contains(&brokers) {
            return Err(BrokerError::Start(format!(
                "broker count must be 1..=16, got {brokers}"
            )));
        }
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .create()
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        let native = owner.client().native_ptr();
        // SAFETY: `native` is a live client handle owned by `owner`; the mock
        // cluster it returns lives as long as that client, and the call only
        // sets a broker-side default.
        unsafe {
            let mcluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(native);
            if mcluster.is_null() {
                return Err(BrokerError::Start(
                    "librdkafka did not start a mock cluster".into(),
                ));
            }
            rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(mcluster, 0);
        }
        let broker = EmbeddedBroker { owner };
        for t in topics {
            broker.create_topic(t)?;
        }
        Ok(broker)
    }

    pub fn create_topic(&self, t: &TopicSpec) -> Result<(), BrokerError> {
        let replication = 1;
        self.cluster()
            .create_topic(&t.name, t.partitions, replication)
            .map_err(|e| BrokerError::Topic {
                topic: t.to_string(),
                reason: e.to_string(),
            })
    }

    /// `host:port,...` for `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster().bootstrap_servers()
    }

    /// The mock cluster itself, for fault injection (broker down/up, request
    /// errors, round-trip delays).
    pub fn cluster(&self) -> MockCluster<'_, DefaultProducerContext> {
        self.owner
            .client()
            .mock_cluster()
            .expect("checked at start: this client owns a mock cluster")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_specs_parse_and_bad_ones_are_named() {
        let t = parse_topics(DEFAULT_TOPICS).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(
            t[3],
            TopicSpec {
                name: "dead-letters".into(),
                partitions: 1
            }
        );
        assert_eq!(parse_topics("a").unwrap()[0].partitions, 1);
        assert!(parse_topics("a:x").unwrap_err().contains("'x'"));
        assert!(parse_topics("a:0").unwrap_err().contains("1..=1000"));
        assert!(parse_topics("a b:1").unwrap_err().contains("'a b'"));
        assert!(parse_topics("a:1,a:2").unwrap_err().contains("twice"));
        assert!(parse_topics(" , ").is_err());
    }
}
