//! A Confluent Schema Registry client on `ureq` (HTTP and HTTPS through
//! rustls, basic auth, timeouts, bodies up to 16 MiB): registers the output
//! schemas under `<topic>-value` and fetches feature-event writer schemas
//! by id. Only what the `avro` wire format needs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::events::{PREDICTION_EVENT_SCHEMA, SIGNAL_EVENT_SCHEMA};
use crate::worker::config::SchemaRegistryConfig;

/// Largest reply read.
const MAX_REPLY_BYTES: u64 = 16 << 20;

pub struct SchemaRegistry {
    agent: ureq::Agent,
    /// Base URL, without a trailing slash.
    base: String,
    /// `Authorization` header value, for basic auth.
    auth: Option<String>,
    /// After a request fails without an HTTP answer (unreachable, timed
    /// out, TLS failure) or with a 5xx, schema lookups are refused until
    /// this instant without asking, so a registry that is down is not
    /// asked once per new schema id (the waiting records ask again every
    /// second, up to 30 s; see `worker::batch`).
    down: Mutex<Option<(Instant, String)>>,
    /// How long `down` lasts.
    backoff: Duration,
}

/// Why a schema lookup failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// The registry answered: no such id, or not a schema.
    Refused(String),
    /// No usable answer (or not asked: the registry was down moments ago);
    /// the same id may work later.
    Unavailable(String),
}

impl std::fmt::Display for LookupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LookupError::Refused(m) => f.write_str(m),
            LookupError::Unavailable(m) => write!(f, "schema registry unavailable: {m}"),
        }
    }
}

#[derive(Deserialize)]
struct IdReply {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaReply {
    schema: String,
}

/// A failed request: why, and whether the registry gave an HTTP answer
/// that is its final word (4xx).
struct Failed(String, bool);

impl SchemaRegistry {
    /// A client for the validated `schema_registry:` settings (reads the CA
    /// file when one is given).
    pub fn new(cfg: &SchemaRegistryConfig) -> Result<SchemaRegistry, String> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("schema_registry.ca_file {}: {e}", ca.display()))?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| format!("schema_registry.ca_file {}: {e}", ca.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "schema_registry.ca_file {}: no PEM certificate in it",
                    ca.display()
                ));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.timeout))
            .http_status_as_error(false)
            .tls_config(tls.build())
            .user_agent(concat!("ml-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let auth = cfg.username.as_ref().map(|user| {
            use base64::Engine;
            let pair = format!("{user}:{}", cfg.password.as_deref().unwrap_or(""));
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        Ok(SchemaRegistry {
            agent,
            base: cfg.url.trim_end_matches('/').to_string(),
            auth,
            down: Mutex::new(None),
            backoff: Duration::from_secs(5),
        })
    }

    /// Another down-time after an outage (tests).
    pub fn with_backoff(mut self, backoff: Duration) -> SchemaRegistry {
        self.backoff = backoff;
        self
    }

    /// Registers (or finds) a schema under `subject`; returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, String> {
        let body = serde_json::json!({ "schema": schema }).to_string();
        let reply = self
            .request(&format!("/subjects/{subject}/versions"), Some(&body))
            .map_err(|e| e.0)?;
        serde_json::from_str::<IdReply>(&reply)
            .map(|r| r.id)
            .map_err(|e| {
                format!(
                    "unexpected reply registering '{subject}': {e}: {}",
                    clip(&reply)
                )
            })
    }

    /// The writer schema with this id.
    pub fn schema(&self, id: u32) -> Result<String, LookupError> {
        let now = Instant::now();
        {
            let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
            match &*down {
                Some((until, why)) if now < *until => {
                    return Err(LookupError::Unavailable(format!(
                        "{why} (not asked again for {:?})",
                        until.saturating_duration_since(now)
                    )))
                }
                _ => *down = None,
            }
        }
        let reply = match self.request(&format!("/schemas/ids/{id}"), None) {
            Ok(reply) => reply,
            Err(Failed(why, answered)) if answered => return Err(LookupError::Refused(why)),
            Err(Failed(why, _)) => {
                *self.down.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now() + self.backoff, why.clone()));
                return Err(LookupError::Unavailable(why));
            }
        };
        serde_json::from_str::<SchemaReply>(&reply)
            .map(|r| r.schema)
            .map_err(|e| {
                LookupError::Refused(format!(
                    "unexpected reply for schema {id}: {e}: {}",
                    clip(&reply)
                ))
            })
    }

    /// Ids of the output schemas for a predictions or signals topic.
    pub fn output_ids(
        &self,
        topic: &str,
        signal: bool,
    ) -> Result<crate::events::SchemaIds, String> {
        let subject = format!("{topic}-value");
        let mut ids = crate::events::SchemaIds::default();
        if signal {
            ids.signal = self.register(&subject, SIGNAL_EVENT_SCHEMA)?;
        } else {
            ids.prediction = self.register(&subject, PREDICTION_EVENT_SCHEMA)?;
        }
        Ok(ids)
    }

    /// One request (GET, or POST with a JSON body); the error says whether
    /// the registry answered for good.
    fn request(&self, path: &str, body: Option<&str>) -> Result<String, Failed> {
        let url = format!("{}{path}", self.base);
        let method = if body.is_some() { "POST" } else { "GET" };
        let unavailable = |e: ureq::Error| Failed(format!("{method} {url}: {e}"), false);
        let accept = "application/vnd.schemaregistry.v1+json, application/json";
        let response = match body {
            Some(b) => {
                let mut r = self
                    .agent
                    .post(&url)
                    .header("Accept", accept)
                    .header("Content-Type", "application/vnd.schemaregistry.v1+json");
                if let Some(a) = &self.auth {
                    r = r.header("Authorization", a);
                }
                r.send(b.as_bytes())
            }
            None => {
                let mut r = self.agent.get(&url).header("Accept", accept);
                if let Some(a) = &self.auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
        };
        let mut response = response.map_err(unavailable)?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_string()
            .map_err(unavailable)?;
        if !(200..300).contains(&status) {
            let why = format!("{method} {url}: HTTP {status}: {}", clip(text.trim()));
            // a registry in trouble (5xx) is down; 4xx is its answer
            return Err(Failed(why, status < 500));
        }
        Ok(text)
    }
}

/// A reply quoted in an error: at most 300 characters, control characters escaped.
fn clip(s: &str) -> String {
    let cut: String = s.chars().take(300).collect();
    crate::text::escape(&cut).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn config(url: &str) -> SchemaRegistryConfig {
        SchemaRegistryConfig {
            url: url.to_string(),
            username: None,
            password: None,
            ca_file: None,
            timeout: Duration::from_secs(2),
        }
    }

    /// A registry stand-in that answers every connection with `reply`
    /// (nothing: close at once) and counts connections.
    fn stand_in(reply: &'static [u8]) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                c.fetch_add(1, Ordering::SeqCst);
                // the whole request (no body on GET), then the reply
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(reply);
            }
        });
        (format!("http://{addr}"), count)
    }

    #[test]
    fn a_registry_that_does_not_answer_is_not_asked_again_until_the_backoff_passes() {
        let (url, count) = stand_in(b"");
        let sr = SchemaRegistry::new(&config(&url))
            .unwrap()
            .with_backoff(Duration::from_millis(300));
        let e = sr.schema(1).unwrap_err();
        assert!(matches!(&e, LookupError::Unavailable(_)), "{e}");
        // other ids, at once: refused without a request
        for id in 2..20 {
            let e = sr.schema(id).unwrap_err();
            assert!(e.to_string().contains("not asked again"), "{e}");
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
        std::thread::sleep(Duration::from_millis(350));
        assert!(matches!(sr.schema(3), Err(LookupError::Unavailable(_))));
        assert_eq!(
            count.load(Ordering::SeqCst),
            2,
            "asked again after the backoff"
        );
    }

    #[test]
    fn an_answer_is_not_an_outage_and_chunked_utf8_bodies_decode() {
        let (url, count) = stand_in(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 21\r\n\r\n{\"error_code\":40403}\n",
        );
        let sr = SchemaRegistry::new(&config(&url)).unwrap();
        for id in [7, 8] {
            let e = sr.schema(id).unwrap_err();
            assert!(
                matches!(&e, LookupError::Refused(m) if m.contains("HTTP 404")),
                "{e}"
            );
        }
        assert_eq!(count.load(Ordering::SeqCst), 2);
        let (url, _) =
            stand_in(b"HTTP/1.1 200 OK\r\nContent-Length: 21\r\n\r\n{\"schema\":\"\\\"long\\\"\"}");
        assert_eq!(
            SchemaRegistry::new(&config(&url))
                .unwrap()
                .schema(1)
                .unwrap(),
            "\"long\""
        );
        // a chunk boundary inside a multi-byte character ("é" split in two)
        let (url, _) = stand_in(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nf\r\n{\"schema\":\"caf\xc3\r\n3\r\n\xa9\"}\r\n0\r\n\r\n",
        );
        assert_eq!(
            SchemaRegistry::new(&config(&url))
                .unwrap()
                .schema(1)
                .unwrap(),
            "café"
        );
    }

    #[test]
    fn an_unreachable_registry_fails_fast_as_unavailable() {
        // a port nothing listens on
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let sr = SchemaRegistry::new(&config(&format!("http://127.0.0.1:{port}"))).unwrap();
        let t = Instant::now();
        assert!(matches!(sr.schema(1), Err(LookupError::Unavailable(_))));
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
