//! The UBJSON reader alone: a document or an error, within the value budget.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ml_worker::model::ubjson;

fuzz_target!(|data: &[u8]| {
    let _ = ubjson::decode(data, 1 << 20);
});
