//! librdkafka settings of the worker's consumer and producer: what the
//! worker manages (commits, group protocol, idempotence, partitioner,
//! transactions under `exactly-once`), then the user's `kafka.librdkafka`
//! pass-through.

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::ClientConfig;

use crate::worker::config::{DeliveryMode, GroupProtocol, WorkerConfig};

/// librdkafka settings of the worker's two clients.
pub fn client_configs(cfg: &WorkerConfig, brokers: &str) -> (ClientConfig, ClientConfig) {
    let mut consumer = ClientConfig::new();
    consumer
        .set("bootstrap.servers", brokers)
        .set("group.id", &cfg.group_id)
        .set("client.id", &cfg.client_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        // return fetches quickly when little is waiting (latency over fetch count)
        .set("fetch.wait.max.ms", "2");
    match cfg.group_protocol {
        GroupProtocol::Consumer => {
            consumer.set("group.protocol", "consumer");
        }
        GroupProtocol::Classic => {
            // a dead replica's partitions move after 10 s; a joining one is
            // noticed within a second (librdkafka: 45 s and 3 s)
            consumer
                .set("group.protocol", "classic")
                .set("partition.assignment.strategy", "cooperative-sticky")
                .set("session.timeout.ms", "10000")
                .set("heartbeat.interval.ms", "1000");
        }
    }
    // warnings reach WorkerContext::log (offset resets are reported there)
    consumer.set_log_level(RDKafkaLogLevel::Warning);
    let mut producer = ClientConfig::new();
    producer
        .set("bootstrap.servers", brokers)
        .set("client.id", &cfg.client_id)
        .set("enable.idempotence", "true")
        // 0: retry until delivered; shutdown and pausing bound the wait
        .set("message.timeout.ms", "0")
        // Java clients' partitioner: a symbol lands where they would put it
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set(
            "queue.buffering.max.messages",
            (cfg.max_in_flight * 3 + 10_000).min(10_000_000).to_string(),
        );
    if cfg.mode == DeliveryMode::ExactlyOnce {
        // exactly-once: input from committed transactions only; outputs in
        // transactions, each of which must fail within the transaction
        // timeout (librdkafka's default message timeout then), never hang
        consumer.set("isolation.level", "read_committed");
        producer
            .set("transactional.id", cfg.transactional_id())
            .remove("message.timeout.ms");
    }
    for (k, v) in &cfg.librdkafka {
        consumer.set(k, v);
        producer.set(k, v);
    }
    (consumer, producer)
}

/// A Kafka client error for people: librdkafka's configuration errors
/// quote the value, which may be a password, so only the property is
/// named; plus [`build_hint`].
pub fn describe(e: &rdkafka::error::KafkaError) -> String {
    match e {
        rdkafka::error::KafkaError::ClientConfig(_, desc, key, _) => format!(
            "librdkafka does not accept the property '{}' (its value is not shown){}",
            crate::text::escape(key),
            build_hint(desc)
        ),
        e => {
            let text = e.to_string();
            format!("{text}{}", build_hint(&text))
        }
    }
}

/// What to do when librdkafka refuses a setting this build lacks: TLS and
/// SCRAM/OAUTHBEARER need the `ssl` feature. Empty otherwise.
pub fn build_hint(error: &str) -> &'static str {
    let needs_ssl = error.contains("OpenSSL not available at build time")
        || error.contains("No provider for SASL mechanism");
    if needs_ssl && !cfg!(feature = "ssl") {
        " (this ml-worker was built without the `ssl` feature: TLS and SASL SCRAM/OAUTHBEARER \
         need it; build with `cargo build --release --features ssl`, or `make build`)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::producer::BaseProducer;

    /// A SASL_SSL + SCRAM client is created with the `ssl` feature; without
    /// it librdkafka refuses the setting and the error says to build with
    /// the feature.
    #[test]
    fn tls_and_scram_need_the_ssl_feature_and_say_so() {
        let created = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("security.protocol", "SASL_SSL")
            .set("sasl.mechanisms", "SCRAM-SHA-512")
            .set("sasl.username", "u")
            .set("sasl.password", "p")
            .create::<BaseProducer>();
        if cfg!(feature = "ssl") {
            assert!(created.is_ok(), "{:?}", created.err());
        } else {
            let e = created.err().expect("refused without OpenSSL").to_string();
            assert!(build_hint(&e).contains("--features ssl"), "{e}");
        }
        assert_eq!(build_hint("Broker: Message size too large"), "");
    }
}
