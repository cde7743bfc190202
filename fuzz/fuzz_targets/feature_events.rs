//! Feature events as they arrive from Kafka, in every wire format, through
//! both decoders (the in-place scan and the full decode): an event or an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ml_worker::events::{Codec, FeatureScan, SchemaIds, WireFormat};

fuzz_target!(|data: &[u8]| {
    let ids = SchemaIds {
        feature: Some(1),
        ..SchemaIds::default()
    };
    for format in [WireFormat::AvroRaw, WireFormat::Avro, WireFormat::Json] {
        let codec = Codec::new(format, ids);
        let mut scan = FeatureScan::default();
        let _ = codec.scan_feature(data, &mut scan);
        let _ = codec.decode_feature(data);
    }
});
