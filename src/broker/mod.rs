//! The embedded broker: librdkafka's in-process mock cluster, speaking the
//! real Kafka protocol on loopback TCP ports, so the worker, its tests, the
//! demo and any external client (`confluent-kafka`, `kcat`, ...) can use it
//! without a Kafka installation.
//!
//! It serves demos and tests, not production data. Its limits:
//! - each partition keeps about 5 MB (or 100,000 batches) of records and
//!   drops the oldest beyond that, consumed or not (hard-coded in
//!   librdkafka); a consumer that falls further behind has its position
//!   reset past them, which the worker reports as skipped input
//!   (`ml_worker_input_skipped_total`);
//! - a record batch larger than [`DEFAULT_MAX_MESSAGE_BYTES`] (1 MiB, as
//!   Kafka's `message.max.bytes`) is refused with "message size too large"
//!   by a proxy in front of each broker ([`proxy`]), instead of pushing the
//!   whole partition out;
//! - topics are created here, not through the admin API; transactions are
//!   accepted but not enforced.

pub mod proxy;

use std::fmt;
use std::net::SocketAddr;

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

/// Largest record batch the embedded broker accepts (1 MiB, Kafka's default).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;

/// A running mock cluster. Dropping it stops the brokers.
///
/// The cluster belongs to a client created with `test.mock.num.brokers`
/// (librdkafka's own way of starting one), which lets it be configured
/// beyond what `MockCluster` exposes: consumer groups rebalance at once
/// instead of after the usual 3 s initial delay, and each broker is
/// advertised at the address of its size-checking [`proxy::Proxy`].
pub struct EmbeddedBroker {
    /// Declared before `owner`: stopped before the cluster goes.
    proxies: Vec<proxy::Proxy>,
    owner: BaseProducer,
}

impl EmbeddedBroker {
    /// Starts `brokers` mock brokers on free loopback ports and creates the
    /// topics; record batches over [`DEFAULT_MAX_MESSAGE_BYTES`] are refused.
    pub fn start(brokers: i32, topics: &[TopicSpec]) -> Result<EmbeddedBroker, BrokerError> {
        Self::start_with(brokers, topics, DEFAULT_MAX_MESSAGE_BYTES)
    }

    /// [`EmbeddedBroker::start`] with another record batch limit.
    pub fn start_with(
        brokers: i32,
        topics: &[TopicSpec],
        max_message_bytes: usize,
    ) -> Result<EmbeddedBroker, BrokerError> {
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
        let real: Vec<SocketAddr> = owner
            .client()
            .mock_cluster()
            .map(|c| c.bootstrap_servers())
            .unwrap_or_default()
            .split(',')
            .filter_map(|a| a.parse().ok())
            .collect();
        if real.len() != brokers as usize {
            return Err(BrokerError::Start(format!(
                "the mock cluster gave {} broker addresses for {brokers} brokers",
                real.len()
            )));
        }
        let mut proxies = Vec::new();
        for (i, addr) in real.iter().enumerate() {
            let p = proxy::Proxy::start(*addr, max_message_bytes)
                .map_err(|e| BrokerError::Start(format!("proxy: {e}")))?;
            let host = std::ffi::CString::new("127.0.0.1").expect("no NUL");
            // SAFETY: as above; the mock copies the host name. Brokers are
            // numbered from 1 in the order of the bootstrap list.
            unsafe {
                let mcluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(native);
                rdkafka::bindings::rd_kafka_mock_broker_set_host_port(
                    mcluster,
                    i as i32 + 1,
                    host.as_ptr(),
                    p.address.port() as std::ffi::c_int,
                );
            }
            proxies.push(p);
        }
        // the proxy reads Produce requests of these versions
        // SAFETY: as above
        let err = unsafe {
            rdkafka::bindings::rd_kafka_mock_set_apiversion(
                rdkafka::bindings::rd_kafka_handle_mock_cluster(native),
                proxy::PRODUCE,
                proxy::PRODUCE_MIN_VERSION,
                proxy::PRODUCE_MAX_VERSION,
            )
        };
        if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(BrokerError::Start(format!(
                "cannot limit the Produce API versions: {err:?}"
            )));
        }
        let broker = EmbeddedBroker { proxies, owner };
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

    /// `host:port,...` for `bootstrap.servers` (the brokers' proxies).
    pub fn bootstrap_servers(&self) -> String {
        self.proxies
            .iter()
            .map(|p| p.address.to_string())
            .collect::<Vec<_>>()
            .join(",")
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
