//! `models.yaml` and `worker.yaml` as a user (or an attacker with write
//! access to a ConfigMap) might write them: validated settings or an error
//! naming the field, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ml_worker::config::parse_registry;
use ml_worker::worker::config::{parse_worker_config, Overrides};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_registry(text, Path::new("models.yaml"), Path::new("."));
    let _ = parse_worker_config(text, Path::new("worker.yaml"), &Overrides::default());
});
