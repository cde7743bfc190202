//! The event contract (`schemas/*.avsc`, namespace `ml_worker.v1`) and its
//! wire formats.
//!
//! | format     | bytes on the wire                                               |
//! |------------|-----------------------------------------------------------------|
//! | `avro`     | Confluent framing: magic `0`, 4-byte big-endian schema id, datum |
//! | `avro-raw` | the bare Avro datum, written with the schema in `schemas/`      |
//! | `json`     | one JSON object, the same field names                           |
//!
//! The hot path reads and writes datums of the shipped schemas with a small
//! hand-written Avro codec (no intermediate value tree). Confluent messages
//! whose schema id names another (evolved) writer schema are resolved
//! against the shipped reader schema by `apache-avro`, so producers may add
//! fields with defaults without breaking this reader. Decoding never panics:
//! every malformed message is a [`DecodeError`] naming what was wrong.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::RwLock;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value as AvroValue;
use apache_avro::Schema;
use serde::{Deserialize, Serialize};

/// The shipped schemas.
pub const FEATURE_EVENT_SCHEMA: &str = include_str!("../schemas/feature_event.avsc");
pub const PREDICTION_EVENT_SCHEMA: &str = include_str!("../schemas/prediction_event.avsc");
pub const SIGNAL_EVENT_SCHEMA: &str = include_str!("../schemas/signal_event.avsc");

/// Confluent wire-format magic byte.
const MAGIC: u8 = 0;

/// A row of features for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureEvent {
    pub event_id: String,
    /// Registry name of the model to score it with.
    pub model: String,
    pub symbol: String,
    /// Milliseconds since the Unix epoch.
    pub event_time: i64,
    /// Feature name to value, in message order; an absent feature is missing.
    pub features: Vec<(String, f64)>,
}

/// One model output for one feature event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionEvent {
    pub event_id: String,
    pub model: String,
    pub model_version: String,
    pub model_sha256: String,
    pub symbol: String,
    pub event_time: i64,
    pub prediction: f64,
    pub probabilities: Option<Vec<f64>>,
    pub fallback: bool,
    pub inference_latency_us: i64,
    /// When a fallback, a canary or a shadow served it, the model that
    /// produced it (`model` names the one the event asked for).
    #[serde(default)]
    pub served_by: Option<String>,
    /// Which route of the model asked for produced it.
    #[serde(default)]
    pub route: OutputRoute,
}

/// Which route of a model an output came from (`route` in the outputs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputRoute {
    /// The model asked for (or its fallback).
    #[default]
    Primary,
    /// The model's canary, for this symbol.
    Canary,
    /// The model's shadow (its predictions go to the shadow topic only).
    Shadow,
}

impl OutputRoute {
    /// Index in the Avro enum's symbols.
    fn index(self) -> i64 {
        match self {
            OutputRoute::Primary => 0,
            OutputRoute::Canary => 1,
            OutputRoute::Shadow => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OutputRoute::Primary => "primary",
            OutputRoute::Canary => "canary",
            OutputRoute::Shadow => "shadow",
        }
    }
}

/// Direction of a trading signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Side {
    Buy,
    Sell,
    Hold,
}

impl Side {
    /// Index in the Avro enum's symbols.
    fn index(self) -> i64 {
        match self {
            Side::Buy => 0,
            Side::Sell => 1,
            Side::Hold => 2,
        }
    }
}

/// A trading signal derived from a prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalEvent {
    pub event_id: String,
    pub symbol: String,
    pub model: String,
    pub model_version: String,
    pub event_time: i64,
    pub side: Side,
    pub strength: f64,
    pub prediction: f64,
    /// `canary` when the model's canary served this symbol.
    #[serde(default)]
    pub route: OutputRoute,
}

/// How a topic's messages are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireFormat {
    /// Confluent Schema Registry framing around an Avro datum.
    #[serde(rename = "avro")]
    Avro,
    /// The bare Avro datum.
    #[serde(rename = "avro-raw")]
    AvroRaw,
    /// One JSON object per message.
    #[serde(rename = "json")]
    Json,
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("avro: {0}")]
    Avro(String),
    #[error("confluent framing: message of {0} bytes is shorter than the 5-byte header")]
    ShortFrame(usize),
    #[error("confluent framing: magic byte is {0}, expected 0 (is the topic really 'avro'?)")]
    BadMagic(u8),
    #[error("confluent framing: unknown schema id {0} (not registered with this worker)")]
    UnknownSchemaId(u32),
    #[error("json: {0}")]
    Json(String),
}

/// A cursor over an Avro binary datum.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str) -> DecodeError {
        DecodeError::Avro(format!("{what} at byte {}", self.pos))
    }

    /// Zig-zag varint long (at most 10 bytes).
    fn long(&mut self, field: &str) -> Result<i64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..70).step_by(7) {
            let byte = *self
                .b
                .get(self.pos)
                .ok_or_else(|| self.err(&format!("'{field}': truncated")))?;
            self.pos += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok((v >> 1) as i64 ^ -((v & 1) as i64));
            }
        }
        Err(self.err(&format!("'{field}': varint longer than 10 bytes")))
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], DecodeError> {
        if self.b.len() - self.pos < n {
            return Err(self.err(&format!("'{field}': truncated (needs {n} more bytes)")));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn string(&mut self, field: &str) -> Result<String, DecodeError> {
        let n = self.long(field)?;
        if n < 0 {
            return Err(self.err(&format!("'{field}': negative length {n}")));
        }
        let bytes = self.take(n as usize, field)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.err(&format!("'{field}': invalid UTF-8")))
    }

    fn double(&mut self, field: &str) -> Result<f64, DecodeError> {
        let b = self.take(8, field)?;
        Ok(f64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }

    fn done(&self) -> Result<(), DecodeError> {
        if self.pos != self.b.len() {
            return Err(DecodeError::Avro(format!(
                "{} trailing bytes after the datum (wrong schema?)",
                self.b.len() - self.pos
            )));
        }
        Ok(())
    }
}

/// A feature event located in its datum without copying: strings and
/// feature names are byte ranges of the message (checked UTF-8). The hot
/// path of the worker reads events this way; [`Codec::decode_feature`] is
/// the owned equivalent.
#[derive(Debug, Default, Clone)]
pub struct FeatureScan {
    pub event_id: Range<usize>,
    pub model: Range<usize>,
    pub symbol: Range<usize>,
    pub event_time: i64,
    pub features: Vec<(Range<usize>, f64)>,
}

impl FeatureScan {
    /// A string field of the scanned message.
    pub fn str<'a>(bytes: &'a [u8], r: &Range<usize>) -> &'a str {
        // ranges were checked as UTF-8 when scanned
        std::str::from_utf8(&bytes[r.clone()]).unwrap_or_default()
    }
}

impl Cursor<'_> {
    fn str_range(&mut self, field: &str) -> Result<Range<usize>, DecodeError> {
        let n = self.long(field)?;
        if n < 0 {
            return Err(self.err(&format!("'{field}': negative length {n}")));
        }
        let start = self.pos;
        let bytes = self.take(n as usize, field)?;
        if std::str::from_utf8(bytes).is_err() {
            return Err(self.err(&format!("'{field}': invalid UTF-8")));
        }
        Ok(start..self.pos)
    }
}

/// Scans a FeatureEvent datum (shipped schema) starting at `start`.
fn scan_feature_datum(
    bytes: &[u8],
    start: usize,
    out: &mut FeatureScan,
) -> Result<(), DecodeError> {
    let mut c = Cursor {
        b: bytes,
        pos: start,
    };
    out.event_id = c.str_range("event_id")?;
    out.model = c.str_range("model")?;
    out.symbol = c.str_range("symbol")?;
    out.event_time = c.long("event_time")?;
    out.features.clear();
    // each entry is at least 9 bytes (a length and a double)
    while let Some(count) = c.block("features", 9)? {
        for _ in 0..count {
            let k = c.str_range("features key")?;
            let v = c.double("features value")?;
            out.features.push((k, v));
        }
    }
    c.done()
}

/// Reads a FeatureEvent datum written with the shipped schema.
fn read_feature_datum(bytes: &[u8]) -> Result<FeatureEvent, DecodeError> {
    let mut scan = FeatureScan::default();
    scan_feature_datum(bytes, 0, &mut scan)?;
    let text = |r: &Range<usize>| FeatureScan::str(bytes, r).to_string();
    Ok(FeatureEvent {
        event_id: text(&scan.event_id),
        model: text(&scan.model),
        symbol: text(&scan.symbol),
        event_time: scan.event_time,
        features: scan.features.iter().map(|(k, v)| (text(k), *v)).collect(),
    })
}

impl Cursor<'_> {
    /// The next block header of an Avro array or map: its entry count, or
    /// `None` at the end. A negative count is followed by the block's size
    /// in bytes; the count is bounded by what is left of the message
    /// (each entry takes at least `min_entry` bytes).
    fn block(&mut self, field: &str, min_entry: usize) -> Result<Option<usize>, DecodeError> {
        let mut count = self.long(field)?;
        if count == 0 {
            return Ok(None);
        }
        if count < 0 {
            count = count
                .checked_neg()
                .ok_or_else(|| self.err(&format!("'{field}': bad block count")))?;
            self.long(field)?;
        }
        if count as u64 > ((self.b.len() - self.pos) / min_entry) as u64 {
            return Err(self.err(&format!(
                "'{field}': block of {count} entries exceeds the message"
            )));
        }
        Ok(Some(count as usize))
    }

    fn doubles(&mut self, field: &str) -> Result<Vec<f64>, DecodeError> {
        let mut out = Vec::new();
        while let Some(count) = self.block(field, 8)? {
            for _ in 0..count {
                out.push(self.double(field)?);
            }
        }
        Ok(out)
    }

    fn byte(&mut self, field: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }
}

/// Reads a PredictionEvent datum written with the shipped schema.
fn read_prediction_datum(bytes: &[u8]) -> Result<PredictionEvent, DecodeError> {
    let mut c = Cursor { b: bytes, pos: 0 };
    let e = PredictionEvent {
        event_id: c.string("event_id")?,
        model: c.string("model")?,
        model_version: c.string("model_version")?,
        model_sha256: c.string("model_sha256")?,
        symbol: c.string("symbol")?,
        event_time: c.long("event_time")?,
        prediction: c.double("prediction")?,
        probabilities: match c.long("probabilities")? {
            0 => None,
            1 => Some(c.doubles("probabilities")?),
            u => return Err(c.err(&format!("'probabilities': union branch {u}"))),
        },
        fallback: match c.byte("fallback")? {
            0 => false,
            1 => true,
            b => return Err(c.err(&format!("'fallback': boolean byte {b}"))),
        },
        inference_latency_us: c.long("inference_latency_us")?,
        served_by: None,
        route: OutputRoute::Primary,
    };
    // written before `served_by` existed: the datum ends here
    if c.pos == c.b.len() {
        return Ok(e);
    }
    let e = PredictionEvent {
        served_by: match c.long("served_by")? {
            0 => None,
            1 => Some(c.string("served_by")?),
            u => return Err(c.err(&format!("'served_by': union branch {u}"))),
        },
        ..e
    };
    // written before `route` existed
    if c.pos == c.b.len() {
        return Ok(e);
    }
    let e = PredictionEvent {
        route: read_route(&mut c)?,
        ..e
    };
    c.done()?;
    Ok(e)
}

/// Reads a SignalEvent datum written with the shipped schema.
fn read_signal_datum(bytes: &[u8]) -> Result<SignalEvent, DecodeError> {
    let mut c = Cursor { b: bytes, pos: 0 };
    let e = SignalEvent {
        event_id: c.string("event_id")?,
        symbol: c.string("symbol")?,
        model: c.string("model")?,
        model_version: c.string("model_version")?,
        event_time: c.long("event_time")?,
        side: match c.long("side")? {
            0 => Side::Buy,
            1 => Side::Sell,
            2 => Side::Hold,
            s => return Err(c.err(&format!("'side': enum index {s}"))),
        },
        strength: c.double("strength")?,
        prediction: c.double("prediction")?,
        route: OutputRoute::Primary,
    };
    // written before `route` existed: the datum ends here
    if c.pos == c.b.len() {
        return Ok(e);
    }
    let e = SignalEvent {
        route: read_route(&mut c)?,
        ..e
    };
    c.done()?;
    Ok(e)
}

fn read_route(c: &mut Cursor<'_>) -> Result<OutputRoute, DecodeError> {
    match c.long("route")? {
        0 => Ok(OutputRoute::Primary),
        1 => Ok(OutputRoute::Canary),
        2 => Ok(OutputRoute::Shadow),
        r => Err(c.err(&format!("'route': enum index {r}"))),
    }
}

fn put_long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_long(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

fn put_double(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Writes a FeatureEvent datum with the shipped schema.
pub fn write_feature_datum(e: &FeatureEvent, out: &mut Vec<u8>) {
    put_str(out, &e.event_id);
    put_str(out, &e.model);
    put_str(out, &e.symbol);
    put_long(out, e.event_time);
    if !e.features.is_empty() {
        put_long(out, e.features.len() as i64);
        for (k, v) in &e.features {
            put_str(out, k);
            put_double(out, *v);
        }
    }
    put_long(out, 0);
}

/// Writes a PredictionEvent datum with the shipped schema.
pub fn write_prediction_datum(e: &PredictionEvent, out: &mut Vec<u8>) {
    put_str(out, &e.event_id);
    put_str(out, &e.model);
    put_str(out, &e.model_version);
    put_str(out, &e.model_sha256);
    put_str(out, &e.symbol);
    put_long(out, e.event_time);
    put_double(out, e.prediction);
    match &e.probabilities {
        None => put_long(out, 0),
        Some(p) => {
            put_long(out, 1);
            if !p.is_empty() {
                put_long(out, p.len() as i64);
                for v in p {
                    put_double(out, *v);
                }
            }
            put_long(out, 0);
        }
    }
    out.push(e.fallback as u8);
    put_long(out, e.inference_latency_us);
    match &e.served_by {
        None => put_long(out, 0),
        Some(m) => {
            put_long(out, 1);
            put_str(out, m);
        }
    }
    put_long(out, e.route.index());
}

/// Writes a SignalEvent datum with the shipped schema.
pub fn write_signal_datum(e: &SignalEvent, out: &mut Vec<u8>) {
    put_str(out, &e.event_id);
    put_str(out, &e.symbol);
    put_str(out, &e.model);
    put_str(out, &e.model_version);
    put_long(out, e.event_time);
    put_long(out, e.side.index());
    put_double(out, e.strength);
    put_double(out, e.prediction);
    put_long(out, e.route.index());
}

/// JSON form of a feature event: features may be numbers or null (missing).
#[derive(Deserialize)]
struct JsonFeatureEvent {
    event_id: String,
    model: String,
    symbol: String,
    event_time: i64,
    features: JsonFeatures,
}

/// The `features` object in message order; a name given twice is an error
/// (which value was meant is unknowable, and JSON parsers disagree).
struct JsonFeatures(Vec<(String, f64)>);

impl<'de> Deserialize<'de> for JsonFeatures {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = JsonFeatures;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of feature names to numbers or null")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<JsonFeatures, A::Error> {
                let mut out: Vec<(String, f64)> = Vec::with_capacity(m.size_hint().unwrap_or(8));
                let mut seen = std::collections::HashSet::new();
                while let Some((k, v)) = m.next_entry::<String, Option<f64>>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!(
                            "feature '{}' appears twice",
                            crate::text::escape(&k)
                        )));
                    }
                    out.push((k, v.unwrap_or(f64::NAN)));
                }
                Ok(JsonFeatures(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Encodes and decodes events in one wire format. Confluent schema ids of
/// the shipped schemas are given at construction; other writer schemas of
/// feature events can be registered (e.g. fetched from a schema registry).
pub struct Codec {
    format: WireFormat,
    feature_reader: Schema,
    /// Confluent id of the shipped FeatureEvent schema (decoded by the fast path).
    feature_id: Option<u32>,
    prediction_id: u32,
    signal_id: u32,
    /// Other writer schemas for feature events, by Confluent id.
    writers: RwLock<HashMap<u32, Schema>>,
    /// Ids (from a schema registry) under which the shipped schema is registered.
    shipped_ids: Vec<u32>,
}

/// Confluent ids of the shipped schemas (as registered in a schema registry).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchemaIds {
    pub feature: Option<u32>,
    pub prediction: u32,
    pub signal: u32,
}

impl Codec {
    pub fn new(format: WireFormat, ids: SchemaIds) -> Codec {
        Codec {
            format,
            // the shipped schema is compiled in and covered by tests
            feature_reader: Schema::parse_str(FEATURE_EVENT_SCHEMA)
                .expect("schemas/feature_event.avsc is valid"),
            feature_id: ids.feature,
            prediction_id: ids.prediction,
            signal_id: ids.signal,
            writers: RwLock::new(HashMap::new()),
            shipped_ids: Vec::new(),
        }
    }

    /// Whether `id` names the shipped FeatureEvent schema.
    fn is_shipped(&self, id: u32) -> bool {
        Some(id) == self.feature_id || self.shipped_ids.contains(&id)
    }

    pub fn format(&self) -> WireFormat {
        self.format
    }

    /// Whether feature events framed with schema `id` are decodable.
    pub fn knows_feature_writer(&self, id: u32) -> bool {
        self.is_shipped(id)
            || self
                .writers
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&id)
    }

    /// Makes feature events written with `schema_json` under Confluent id
    /// `id` decodable (resolved against the shipped reader schema).
    pub fn register_feature_writer(
        &mut self,
        id: u32,
        schema_json: &str,
    ) -> Result<(), DecodeError> {
        let schema = Schema::parse_str(schema_json)
            .map_err(|e| DecodeError::Avro(format!("schema {id}: {e}")))?;
        if schema.canonical_form() == self.feature_reader.canonical_form() {
            // the shipped schema under this id: the fast path reads it
            if !self.is_shipped(id) {
                self.shipped_ids.push(id);
            }
            return Ok(());
        }
        GenericDatumReader::builder(&schema)
            .reader_schema(&self.feature_reader)
            .build()
            .map_err(|e| {
                DecodeError::Avro(format!("schema {id} cannot be read as FeatureEvent: {e}"))
            })?;
        self.writers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, schema);
        Ok(())
    }

    /// The allocation-free path: scans `bytes` when the format allows it
    /// (`avro-raw`, or `avro` framed with the shipped schema's id). `None`
    /// means "use [`Codec::decode_feature`]" (JSON, other writer schemas,
    /// and every malformed frame, so errors read the same either way).
    pub fn scan_feature(
        &self,
        bytes: &[u8],
        out: &mut FeatureScan,
    ) -> Option<Result<(), DecodeError>> {
        match self.format {
            WireFormat::AvroRaw => Some(scan_feature_datum(bytes, 0, out)),
            WireFormat::Avro
                if bytes.len() >= 5
                    && bytes[0] == MAGIC
                    && self.is_shipped(u32::from_be_bytes([
                        bytes[1], bytes[2], bytes[3], bytes[4],
                    ])) =>
            {
                Some(scan_feature_datum(bytes, 5, out))
            }
            _ => None,
        }
    }

    pub fn decode_feature(&self, bytes: &[u8]) -> Result<FeatureEvent, DecodeError> {
        match self.format {
            WireFormat::AvroRaw => read_feature_datum(bytes),
            WireFormat::Avro => {
                if bytes.len() < 5 {
                    return Err(DecodeError::ShortFrame(bytes.len()));
                }
                if bytes[0] != MAGIC {
                    return Err(DecodeError::BadMagic(bytes[0]));
                }
                let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
                let datum = &bytes[5..];
                if self.is_shipped(id) {
                    return read_feature_datum(datum);
                }
                let writers = self.writers.read().unwrap_or_else(|p| p.into_inner());
                let writer = writers.get(&id).ok_or(DecodeError::UnknownSchemaId(id))?;
                self.resolve_feature(writer, datum)
            }
            WireFormat::Json => {
                let j: JsonFeatureEvent =
                    serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
                Ok(FeatureEvent {
                    event_id: j.event_id,
                    model: j.model,
                    symbol: j.symbol,
                    event_time: j.event_time,
                    features: j.features.0,
                })
            }
        }
    }

    /// Decodes with another writer schema, resolved against the shipped one.
    fn resolve_feature(
        &self,
        writer: &Schema,
        mut datum: &[u8],
    ) -> Result<FeatureEvent, DecodeError> {
        let reader = GenericDatumReader::builder(writer)
            .reader_schema(&self.feature_reader)
            .build()
            .map_err(|e| DecodeError::Avro(e.to_string()))?;
        let value = reader
            .read_value(&mut datum)
            .map_err(|e| DecodeError::Avro(e.to_string()))?;
        if !datum.is_empty() {
            return Err(DecodeError::Avro(format!(
                "{} trailing bytes after the datum",
                datum.len()
            )));
        }
        feature_from_value(value)
    }

    /// Decodes a prediction (for downstream readers: demo, bench, tests).
    /// `avro` records are read with the shipped schema whatever their id.
    pub fn decode_prediction(&self, bytes: &[u8]) -> Result<PredictionEvent, DecodeError> {
        match self.format {
            WireFormat::AvroRaw => read_prediction_datum(bytes),
            WireFormat::Avro => read_prediction_datum(unframe(bytes)?),
            WireFormat::Json => {
                serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))
            }
        }
    }

    /// Decodes a signal (see [`Codec::decode_prediction`]).
    pub fn decode_signal(&self, bytes: &[u8]) -> Result<SignalEvent, DecodeError> {
        match self.format {
            WireFormat::AvroRaw => read_signal_datum(bytes),
            WireFormat::Avro => read_signal_datum(unframe(bytes)?),
            WireFormat::Json => {
                serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))
            }
        }
    }

    pub fn encode_prediction(&self, e: &PredictionEvent, out: &mut Vec<u8>) {
        match self.format {
            WireFormat::AvroRaw => write_prediction_datum(e, out),
            WireFormat::Avro => {
                frame(out, self.prediction_id);
                write_prediction_datum(e, out)
            }
            WireFormat::Json => json_into(out, e),
        }
    }

    pub fn encode_signal(&self, e: &SignalEvent, out: &mut Vec<u8>) {
        match self.format {
            WireFormat::AvroRaw => write_signal_datum(e, out),
            WireFormat::Avro => {
                frame(out, self.signal_id);
                write_signal_datum(e, out)
            }
            WireFormat::Json => json_into(out, e),
        }
    }
}

/// The datum inside a Confluent frame.
fn unframe(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    if bytes.len() < 5 {
        return Err(DecodeError::ShortFrame(bytes.len()));
    }
    if bytes[0] != MAGIC {
        return Err(DecodeError::BadMagic(bytes[0]));
    }
    Ok(&bytes[5..])
}

fn frame(out: &mut Vec<u8>, id: u32) {
    out.push(MAGIC);
    out.extend_from_slice(&id.to_be_bytes());
}

/// JSON cannot carry NaN or infinity; serde_json writes them as `null`.
fn json_into<T: Serialize>(out: &mut Vec<u8>, e: &T) {
    // writing these plain structs to a Vec cannot fail
    let _ = serde_json::to_writer(out, e);
}

/// A resolved `FeatureEvent` record value into the struct.
fn feature_from_value(value: AvroValue) -> Result<FeatureEvent, DecodeError> {
    let AvroValue::Record(fields) = value else {
        return Err(DecodeError::Avro("not a record".into()));
    };
    let mut e = FeatureEvent {
        event_id: String::new(),
        model: String::new(),
        symbol: String::new(),
        event_time: 0,
        features: Vec::new(),
    };
    for (name, v) in fields {
        match (name.as_str(), v) {
            ("event_id", AvroValue::String(s)) => e.event_id = s,
            ("model", AvroValue::String(s)) => e.model = s,
            ("symbol", AvroValue::String(s)) => e.symbol = s,
            ("event_time", AvroValue::TimestampMillis(t) | AvroValue::Long(t)) => e.event_time = t,
            ("features", AvroValue::Map(m)) => {
                for (k, v) in m {
                    match v {
                        AvroValue::Double(d) => e.features.push((k, d)),
                        other => {
                            return Err(DecodeError::Avro(format!(
                                "feature '{k}' is {other:?}, not a double"
                            )))
                        }
                    }
                }
            }
            (other, v) => {
                return Err(DecodeError::Avro(format!(
                    "unexpected field '{other}' = {v:?}"
                )))
            }
        }
    }
    Ok(e)
}
