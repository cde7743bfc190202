//! The hand-written Avro codec against apache-avro and the shipped schemas:
//! bytes written by one are read by the other, evolved writer schemas are
//! resolved, old readers read new outputs, and malformed input is an error,
//! never a panic.

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use ml_worker::events::*;

fn schema(text: &str) -> Schema {
    Schema::parse_str(text).unwrap()
}

fn sample_feature() -> FeatureEvent {
    FeatureEvent {
        event_id: "e-1".into(),
        model: "diabetes_lgbm".into(),
        symbol: "ÄAPL".into(),
        event_time: 1_764_000_000_123,
        features: vec![
            ("age".into(), 0.038),
            ("bmi".into(), -1.5e-3),
            ("s1".into(), f64::MAX),
        ],
    }
}

fn avro_feature_value(e: &FeatureEvent) -> Value {
    Value::Record(vec![
        ("event_id".into(), Value::String(e.event_id.clone())),
        ("model".into(), Value::String(e.model.clone())),
        ("symbol".into(), Value::String(e.symbol.clone())),
        ("event_time".into(), Value::TimestampMillis(e.event_time)),
        (
            "features".into(),
            Value::Map(
                e.features
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::Double(*v)))
                    .collect(),
            ),
        ),
    ])
}

fn read_with(writer: &Schema, reader: Option<&Schema>, mut bytes: &[u8]) -> Value {
    let r = GenericDatumReader::builder(writer)
        .maybe_reader_schema(reader)
        .build()
        .unwrap();
    let v = r.read_value(&mut bytes).unwrap();
    assert!(bytes.is_empty(), "trailing bytes");
    v
}

fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
    let Value::Record(fields) = v else {
        panic!("not a record")
    };
    &fields
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no field {name}"))
        .1
}

#[test]
fn feature_events_written_by_apache_avro_decode_and_ours_read_back() {
    let s = schema(FEATURE_EVENT_SCHEMA);
    let e = sample_feature();
    let bytes = GenericDatumWriter::builder(&s)
        .build()
        .unwrap()
        .write_value_to_vec(avro_feature_value(&e))
        .unwrap();
    let codec = Codec::new(WireFormat::AvroRaw, SchemaIds::default());
    let mut got = codec.decode_feature(&bytes).unwrap();
    got.features.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, e);

    let mut ours = Vec::new();
    write_feature_datum(&e, &mut ours);
    let v = read_with(&s, None, &ours);
    assert_eq!(field(&v, "symbol"), &Value::String("ÄAPL".into()));
    assert_eq!(codec.decode_feature(&ours).unwrap(), e);
}

#[test]
fn prediction_and_signal_datums_read_with_apache_avro() {
    let p = PredictionEvent {
        event_id: "e-1".into(),
        model: "m".into(),
        model_version: "v1".into(),
        model_sha256: "ab".repeat(32),
        symbol: "X".into(),
        event_time: -5,
        prediction: 1.0,
        probabilities: Some(vec![0.25, 0.75]),
        fallback: true,
        inference_latency_us: 1234,
        served_by: Some("other".into()),
        route: Default::default(),
    };
    let mut out = Vec::new();
    write_prediction_datum(&p, &mut out);
    let v = read_with(&schema(PREDICTION_EVENT_SCHEMA), None, &out);
    assert_eq!(
        field(&v, "served_by"),
        &Value::Union(1, Box::new(Value::String("other".into())))
    );
    // and back, through the worker's own reader; a datum written before
    // `served_by` existed (it ends after inference_latency_us) still reads
    let codec = ml_worker::events::Codec::new(WireFormat::AvroRaw, Default::default());
    assert_eq!(codec.decode_prediction(&out).unwrap(), p);
    let mut old = Vec::new();
    write_prediction_datum(
        &PredictionEvent {
            served_by: None,
            route: Default::default(),
            ..p.clone()
        },
        &mut old,
    );
    old.pop(); // route
    old.pop(); // the null branch of served_by
    assert_eq!(
        codec.decode_prediction(&old).unwrap(),
        PredictionEvent {
            served_by: None,
            route: Default::default(),
            ..p.clone()
        }
    );
    assert_eq!(field(&v, "event_time"), &Value::TimestampMillis(-5));
    assert_eq!(
        field(&v, "probabilities"),
        &Value::Union(
            1,
            Box::new(Value::Array(vec![Value::Double(0.25), Value::Double(0.75)]))
        )
    );
    assert_eq!(field(&v, "fallback"), &Value::Boolean(true));
    assert_eq!(field(&v, "inference_latency_us"), &Value::Long(1234));

    let mut out = Vec::new();
    write_prediction_datum(
        &PredictionEvent {
            probabilities: None,
            route: Default::default(),
            ..p
        },
        &mut out,
    );
    let v = read_with(&schema(PREDICTION_EVENT_SCHEMA), None, &out);
    assert_eq!(
        field(&v, "probabilities"),
        &Value::Union(0, Box::new(Value::Null))
    );

    let sig = SignalEvent {
        event_id: "e-1".into(),
        symbol: "X".into(),
        model: "m".into(),
        model_version: "v1".into(),
        event_time: 7,
        side: Side::Sell,
        strength: 0.5,
        prediction: -2.0,
        route: Default::default(),
    };
    let mut out = Vec::new();
    write_signal_datum(&sig, &mut out);
    let v = read_with(&schema(SIGNAL_EVENT_SCHEMA), None, &out);
    assert_eq!(field(&v, "side"), &Value::Enum(1, "SELL".into()));
    assert_eq!(field(&v, "prediction"), &Value::Double(-2.0));
    assert_eq!(field(&v, "route"), &Value::Enum(0, "primary".into()));
    let canary = SignalEvent {
        route: ml_worker::events::OutputRoute::Canary,
        ..sig.clone()
    };
    let mut out = Vec::new();
    write_signal_datum(&canary, &mut out);
    let v = read_with(&schema(SIGNAL_EVENT_SCHEMA), None, &out);
    assert_eq!(field(&v, "route"), &Value::Enum(1, "canary".into()));
    assert_eq!(codec.decode_signal(&out).unwrap(), canary);
    // a signal written before `route` existed reads as primary
    out.pop();
    assert_eq!(codec.decode_signal(&out).unwrap(), sig);
}

#[test]
fn old_readers_read_outputs_of_an_evolved_schema() {
    // a reader from before `fallback` and `probabilities` existed
    let old = r#"{"type": "record", "name": "PredictionEvent", "namespace": "ml_worker.v1", "fields": [
        {"name": "event_id", "type": "string"}, {"name": "model", "type": "string"},
        {"name": "prediction", "type": "double"}]}"#;
    let p = PredictionEvent {
        event_id: "e".into(),
        model: "m".into(),
        model_version: "v".into(),
        model_sha256: "s".into(),
        symbol: "X".into(),
        event_time: 1,
        prediction: 3.5,
        probabilities: Some(vec![1.0]),
        fallback: false,
        inference_latency_us: 9,
        served_by: None,
        route: Default::default(),
    };
    let mut out = Vec::new();
    write_prediction_datum(&p, &mut out);
    let v = read_with(&schema(PREDICTION_EVENT_SCHEMA), Some(&schema(old)), &out);
    assert_eq!(field(&v, "prediction"), &Value::Double(3.5));
}

#[test]
fn confluent_frames_use_the_fast_path_or_a_registered_evolved_writer() {
    let ids = SchemaIds {
        feature: Some(7),
        prediction: 8,
        signal: 9,
    };
    let mut codec = Codec::new(WireFormat::Avro, ids);
    let e = sample_feature();
    let mut msg = vec![0, 0, 0, 0, 7];
    write_feature_datum(&e, &mut msg);
    assert_eq!(codec.decode_feature(&msg).unwrap(), e);

    // a producer's v2 schema adds a field with a default, in the middle
    let v2 = FEATURE_EVENT_SCHEMA.replace(
        r#"{"name": "symbol", "type": "string"},"#,
        r#"{"name": "symbol", "type": "string"}, {"name": "venue", "type": ["null", "string"], "default": null},"#,
    );
    assert_ne!(v2, FEATURE_EVENT_SCHEMA);
    let s2 = schema(&v2);
    let mut value = avro_feature_value(&e);
    if let Value::Record(f) = &mut value {
        f.insert(
            3,
            (
                "venue".into(),
                Value::Union(1, Box::new(Value::String("XNAS".into()))),
            ),
        );
    }
    let datum = GenericDatumWriter::builder(&s2)
        .build()
        .unwrap()
        .write_value_to_vec(value)
        .unwrap();
    let mut msg = vec![0, 0, 0, 0, 42];
    msg.extend_from_slice(&datum);
    assert_eq!(
        codec.decode_feature(&msg).unwrap_err(),
        DecodeError::UnknownSchemaId(42)
    );
    codec.register_feature_writer(42, &v2).unwrap();
    let mut got = codec.decode_feature(&msg).unwrap();
    got.features.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, e);

    // outputs carry their own ids
    let mut out = Vec::new();
    codec.encode_signal(
        &SignalEvent {
            event_id: "e".into(),
            symbol: "X".into(),
            model: "m".into(),
            model_version: "v".into(),
            event_time: 0,
            side: Side::Buy,
            strength: 1.0,
            prediction: 1.0,
            route: Default::default(),
        },
        &mut out,
    );
    assert_eq!(&out[..5], &[0, 0, 0, 0, 9]);
}

#[test]
fn json_events_read_null_as_missing_and_write_nan_as_null() {
    let codec = Codec::new(WireFormat::Json, SchemaIds::default());
    let msg = br#"{"event_id": "e", "model": "m", "symbol": "X", "event_time": 5, "features": {"a": 1.5, "b": null}}"#;
    let mut e = codec.decode_feature(msg).unwrap();
    e.features.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(e.features[0], ("a".to_string(), 1.5));
    assert!(e.features[1].1.is_nan());
    let err = codec
        .decode_feature(br#"{"event_id": "e"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("json:") && err.contains("model"), "{err}");
    // a feature named twice: which value was meant is unknowable
    let twice = br#"{"event_id": "e", "model": "m", "symbol": "X", "event_time": 5, "features": {"a": 1.5, "b": 2, "a": 9}}"#;
    let err = codec.decode_feature(twice).unwrap_err().to_string();
    assert!(err.contains("feature 'a' appears twice"), "{err}");

    let mut out = Vec::new();
    codec.encode_prediction(
        &PredictionEvent {
            event_id: "e".into(),
            model: "m".into(),
            model_version: "v".into(),
            model_sha256: "s".into(),
            symbol: "X".into(),
            event_time: 5,
            prediction: f64::NAN,
            probabilities: None,
            fallback: false,
            inference_latency_us: 3,
            served_by: None,
            route: Default::default(),
        },
        &mut out,
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(
        v["prediction"].is_null() && v["probabilities"].is_null(),
        "{v}"
    );
    assert_eq!(v["inference_latency_us"], 3);
}

#[test]
fn malformed_messages_are_errors_never_panics() {
    let raw = Codec::new(WireFormat::AvroRaw, SchemaIds::default());
    let framed = Codec::new(
        WireFormat::Avro,
        SchemaIds {
            feature: Some(1),
            ..Default::default()
        },
    );
    let mut good = Vec::new();
    write_feature_datum(&sample_feature(), &mut good);
    // every truncation
    for n in 0..good.len() {
        let e = raw.decode_feature(&good[..n]).unwrap_err().to_string();
        assert!(e.contains("truncated") || e.contains("byte"), "{n}: {e}");
    }
    // trailing garbage
    let mut long = good.clone();
    long.push(1);
    assert!(raw
        .decode_feature(&long)
        .unwrap_err()
        .to_string()
        .contains("trailing"));
    // a block count far beyond the message
    let mut huge = Vec::new();
    write_feature_datum(
        &FeatureEvent {
            features: vec![],
            ..sample_feature()
        },
        &mut huge,
    );
    huge.pop();
    huge.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0x0f]);
    assert!(raw
        .decode_feature(&huge)
        .unwrap_err()
        .to_string()
        .contains("exceeds"));
    // framing
    assert_eq!(
        framed.decode_feature(&[0, 0]).unwrap_err(),
        DecodeError::ShortFrame(2)
    );
    assert_eq!(
        framed.decode_feature(&[123, 0, 0, 0, 1]).unwrap_err(),
        DecodeError::BadMagic(123)
    );
    // random bytes (deterministic xorshift)
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..20_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = (state % 64) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|i| (state >> (i % 8 * 8)) as u8 ^ i as u8)
            .collect();
        let _ = raw.decode_feature(&bytes);
        let _ = framed.decode_feature(&bytes);
    }
}

#[test]
fn shipped_schemas_parse_and_name_the_contract_fields() {
    for (text, fields) in [
        (
            FEATURE_EVENT_SCHEMA,
            vec!["event_id", "model", "symbol", "event_time", "features"],
        ),
        (
            PREDICTION_EVENT_SCHEMA,
            vec![
                "event_id",
                "model",
                "model_version",
                "model_sha256",
                "symbol",
                "event_time",
                "prediction",
                "probabilities",
                "fallback",
                "inference_latency_us",
                "served_by",
                "route",
            ],
        ),
        (
            SIGNAL_EVENT_SCHEMA,
            vec![
                "event_id",
                "symbol",
                "model",
                "model_version",
                "event_time",
                "side",
                "strength",
                "prediction",
                "route",
            ],
        ),
    ] {
        let Schema::Record(r) = schema(text) else {
            panic!("not a record")
        };
        assert_eq!(r.name.namespace(), Some("ml_worker.v1"));
        let names: Vec<&str> = r.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, fields);
    }
}
