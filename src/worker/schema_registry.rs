//! A small Confluent Schema Registry client (plain HTTP): registers the
//! output schemas under `<topic>-value` and fetches feature-event writer
//! schemas by id. Only what the `avro` wire format needs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::Deserialize;

use crate::events::{PREDICTION_EVENT_SCHEMA, SIGNAL_EVENT_SCHEMA};

pub struct SchemaRegistry {
    /// `host:port`
    authority: String,
    /// path prefix, without a trailing slash
    prefix: String,
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
        }
    }

    /// Registers (or finds) a schema under `subject`; returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> Result<u32, String> {
        let body = serde_json::json!({ "schema": schema }).to_string();
        let reply = self.request(
            "POST",
            &format!("/subjects/{subject}/versions"),
            Some(&body),
        )?;
        serde_json::from_str::<IdReply>(&reply)
            .map(|r| r.id)
            .map_err(|e| format!("unexpected reply registering '{subject}': {e}: {reply}"))
    }

    /// The writer schema with this id.
    pub fn schema(&self, id: u32) -> Result<String, String> {
        let reply = self.request("GET", &format!("/schemas/ids/{id}"), None)?;
        serde_json::from_str::<SchemaReply>(&reply)
            .map(|r| r.schema)
            .map_err(|e| format!("unexpected reply for schema {id}: {e}: {reply}"))
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

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<String, String> {
        let url = format!("http://{}{}{}", self.authority, self.prefix, path);
        let fail = |e: std::io::Error| format!("{method} {url}: {e}");
        let mut s = TcpStream::connect(&self.authority).map_err(fail)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(fail)?;
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(fail)?;
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nAccept: application/vnd.schemaregistry.v1+json, application/json\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.prefix,
            self.authority,
            body.len()
        )
        .map_err(fail)?;
        let mut raw = Vec::new();
        s.take(16 << 20).read_to_end(&mut raw).map_err(fail)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, rest) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("{method} {url}: malformed HTTP reply"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| format!("{method} {url}: malformed status line"))?;
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
            return Err(format!("{method} {url}: HTTP {status}: {}", body.trim()));
        }
        Ok(body)
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
