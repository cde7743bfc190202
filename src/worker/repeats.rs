//! Client errors that repeat (a broker down, a TLS handshake or a login
//! failing at every reconnect) are logged once per kind per interval, with
//! how many were held back, so a misconfiguration's reason stays in the
//! last lines of a log instead of scrolling away under thousands of
//! identical retries. The counters (`ml_worker_consume_errors_total`) still
//! count every one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often an error of one kind is logged at most.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(30);

/// The most kinds remembered (error codes are a few dozen).
const MAX_KINDS: usize = 256;

/// Errors logged, by kind: when last, and how many since.
pub struct Repeats {
    every: Duration,
    kinds: Mutex<HashMap<String, (Instant, u64)>>,
    /// The last connection failure librdkafka logged (its `FAIL` lines,
    /// which it does not repeat itself): the likely reason behind the
    /// errors that follow.
    last_failure: Mutex<Option<String>>,
}

impl Default for Repeats {
    fn default() -> Repeats {
        Repeats::new(REPEAT_INTERVAL)
    }
}

impl Repeats {
    pub fn new(every: Duration) -> Repeats {
        Repeats {
            every,
            kinds: Mutex::default(),
            last_failure: Mutex::default(),
        }
    }

    /// Whether to log an error of `kind` now: `Some(n)` with the number
    /// held back since it was last logged, `None` to hold this one back.
    pub fn admit(&self, kind: &str) -> Option<u64> {
        let now = Instant::now();
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        match kinds.get_mut(kind) {
            Some((last, held)) if now.duration_since(*last) < self.every => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                if kinds.len() >= MAX_KINDS {
                    kinds.clear();
                }
                kinds.insert(kind.to_string(), (now, 0));
                Some(0)
            }
        }
    }

    /// Logs a client-level error (librdkafka's error callback) of
    /// `client` (`consumer`, `producer`, ...) unless one of its kind was
    /// logged within the interval: with the count held back and the last
    /// connection failure.
    pub fn client_error(&self, client: &str, error: &rdkafka::error::KafkaError, reason: &str) {
        if let Some(held_back) = self.admit(&format!("{client} {}", error_kind(error))) {
            tracing::warn!(
                client,
                %error,
                reason,
                held_back,
                last_connection_failure = self.last_failure().as_deref().unwrap_or("none"),
                "Kafka client error (librdkafka retries; repeats are logged every 30 s)"
            );
        }
    }

    /// Remembers a connection failure librdkafka logged (`FAIL`, a
    /// warning or worse); whether the line was one.
    pub fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) -> bool {
        use rdkafka::config::RDKafkaLogLevel as L;
        let bad = matches!(
            level,
            L::Emerg | L::Alert | L::Critical | L::Error | L::Warning
        );
        if fac == "FAIL" && bad {
            self.failed(message);
        }
        fac == "FAIL" && bad
    }

    fn failed(&self, message: &str) {
        *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.to_string());
    }

    /// The last connection failure logged, if any.
    pub fn last_failure(&self) -> Option<String> {
        self.last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// An error's kind: librdkafka's code (`AllBrokersDown`, `SSL`, ...).
pub fn error_kind(error: &rdkafka::error::KafkaError) -> String {
    error
        .rdkafka_error_code()
        .map_or_else(|| "other".to_string(), |c| format!("{c:?}"))
}

/// The Kafka clients of the operator commands (`produce`, `replay-dlq`):
/// librdkafka's lines into tracing, repeated errors held back, and the
/// last connection failure kept for the error that ends the command.
#[derive(Default)]
pub struct OpsContext {
    pub repeats: Repeats,
}

impl OpsContext {
    /// `; last connection failure: ...`, or nothing: for an error message.
    pub fn why(&self) -> String {
        self.repeats
            .last_failure()
            .map(|f| format!("; last connection failure: {f}"))
            .unwrap_or_default()
    }
}

impl rdkafka::ClientContext for OpsContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.repeats.log(level, fac, message);
        crate::worker::rebalance::log_line(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.repeats.client_error("client", &error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for OpsContext {}

impl rdkafka::producer::ProducerContext for OpsContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_a_kind_is_logged_then_one_per_interval_with_the_count_held_back() {
        let r = Repeats::new(Duration::from_millis(200));
        assert_eq!(r.admit("AllBrokersDown"), Some(0));
        for _ in 0..50 {
            assert_eq!(r.admit("AllBrokersDown"), None);
        }
        assert_eq!(r.admit("Authentication"), Some(0), "kinds are separate");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(r.admit("AllBrokersDown"), Some(50));
        assert_eq!(r.admit("AllBrokersDown"), None);
        assert_eq!(r.last_failure(), None);
        r.log(
            rdkafka::config::RDKafkaLogLevel::Debug,
            "FAIL",
            "ignored: a debug line",
        );
        assert_eq!(r.last_failure(), None);
        r.log(
            rdkafka::config::RDKafkaLogLevel::Error,
            "FAIL",
            "SSL handshake failed: certificate verify failed",
        );
        assert_eq!(
            r.last_failure().as_deref(),
            Some("SSL handshake failed: certificate verify failed")
        );
    }
}
