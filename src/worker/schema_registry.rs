//! A small Confluent Schema Registry client (plain HTTP): registers the
//! output schemas under `<topic>-value` and fetches feature-event writer
//! schemas by id. Only what the `avro` wire format needs.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::events::{PREDICTION_EVENT_SCHEMA, SIGNAL_EVENT_SCHEMA};

pub struct SchemaRegistry {
    /// `host:port`
    authority: String,
    /// path prefix, without a trailing slash
    prefix: String,
    /// Connect, read and write timeout of one request.
    timeout: Duration,
    /// After a request fails without an HTTP answer (unreachable, timed
    /// out, garbled), schema lookups are refused until this instant without
    /// asking: the lookups run on the consumer thread, which must not wait
    /// on a registry that is down for every new schema id.
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

impl SchemaRegistry {
    /// `url` is `http://host:port[/prefix]` (validated with the config).
    pub fn new(url: &str) -> SchemaRegistry {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        SchemaRegistry {
            authority: authority.to_string(),
            prefix: prefix.to_string(),
            timeout: Duration::from_secs(5),
            down: Mutex::new(None),
            backoff: Duration::from_secs(5),
        }
    }

    /// Other request timeout and down-time (tests).
    pub fn with_timeouts(mut self, timeout: Duration, backoff: Duration) -> SchemaRegistry {
        self.timeout = timeout;
        self.backoff = backoff;
        self
    }

    /// Registers (or finds) a schema under `subject`; returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, String> {
        let body = serde_json::json!({ "schema": schema }).to_string();
        let reply = self
            .request(
                "POST",
                &format!("/subjects/{subject}/versions"),
                Some(&body),
            )
            .map_err(|e| e.0)?;
        serde_json::from_str::<IdReply>(&reply)
            .map(|r| r.id)
            .map_err(|e| format!("unexpected reply registering '{subject}': {e}: {reply}"))
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
        let reply = match self.request("GET", &format!("/schemas/ids/{id}"), None) {
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
                LookupError::Refused(format!("unexpected reply for schema {id}: {e}: {reply}"))
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

    /// One HTTP request; the error says whether the registry answered.
    fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<String, Failed> {
        let url = format!("http://{}{}{}", self.authority, self.prefix, path);
        let fail = |e: std::io::Error| Failed(format!("{method} {url}: {e}"), false);
        let mut s = self.connect().map_err(fail)?;
        s.set_read_timeout(Some(self.timeout)).map_err(fail)?;
        s.set_write_timeout(Some(self.timeout)).map_err(fail)?;
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nAccept: application/vnd.schemaregistry.v1+json, application/json\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.prefix,
            self.authority,
            body.len()
        );
        s.write_all(request.as_bytes()).map_err(fail)?;
        let mut raw = Vec::new();
        s.take(16 << 20).read_to_end(&mut raw).map_err(fail)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, rest) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| Failed(format!("{method} {url}: malformed HTTP reply"), false))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| Failed(format!("{method} {url}: malformed status line"), false))?;
        let chunked = head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        });
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        if !(200..300).contains(&status) {
            let why = format!("{method} {url}: HTTP {status}: {}", body.trim());
            // a registry in trouble (5xx) is down; 4xx is its answer
            return Err(Failed(why, status < 500));
        }
        Ok(body)
    }
}

/// A failed request: why, and whether the registry gave an HTTP answer.
struct Failed(String, bool);

impl SchemaRegistry {
    /// A connection to the first address of `authority` that answers
    /// within the timeout.
    fn connect(&self) -> std::io::Result<TcpStream> {
        let mut last = None;
        for addr in self.authority.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))
    }
}

/// Decodes a chunked HTTP body.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A registry stand-in that answers every connection with `reply`
    /// (nothing: close at once) and counts connections.
    fn stand_in(reply: &'static str) -> (String, Arc<AtomicUsize>) {
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
                let _ = s.write_all(reply.as_bytes());
            }
        });
        (format!("http://{addr}"), count)
    }

    #[test]
    fn a_registry_that_does_not_answer_is_not_asked_again_until_the_backoff_passes() {
        let (url, count) = stand_in("");
        let sr = SchemaRegistry::new(&url)
            .with_timeouts(Duration::from_secs(2), Duration::from_millis(300));
        let e = sr.schema(1).unwrap_err();
        assert!(
            matches!(&e, LookupError::Unavailable(m) if m.contains("malformed")),
            "{e}"
        );
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
    fn an_answer_is_not_an_outage() {
        let (url, count) = stand_in(
            "HTTP/1.1 404 Not Found\r\nContent-Length: 21\r\n\r\n{\"error_code\":40403}\n",
        );
        let sr = SchemaRegistry::new(&url);
        for id in [7, 8] {
            let e = sr.schema(id).unwrap_err();
            assert!(
                matches!(&e, LookupError::Refused(m) if m.contains("HTTP 404")),
                "{e}"
            );
        }
        assert_eq!(count.load(Ordering::SeqCst), 2);
        let (url, _) =
            stand_in("HTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\n{\"schema\":\"\\\"long\\\"\"}");
        assert_eq!(SchemaRegistry::new(&url).schema(1).unwrap(), "\"long\"");
    }

    #[test]
    fn an_unreachable_registry_fails_fast_as_unavailable() {
        // a port nothing listens on
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let sr = SchemaRegistry::new(&format!("http://127.0.0.1:{port}"));
        let t = Instant::now();
        assert!(matches!(sr.schema(1), Err(LookupError::Unavailable(_))));
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
