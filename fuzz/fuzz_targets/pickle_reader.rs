//! Coverage-guided fuzzing of the pickle reader and the allowlist converters:
//! any input must give a graph or an error, and a graph must convert to a
//! model or an error, never a panic, hang or unbounded allocation.
//!
//! `make fuzz` (or `RUSTC_BOOTSTRAP=1 cargo fuzz run pickle_reader
//! fuzz/corpus/pickle_reader -- -max_total_time=600`), seeded with the
//! fixture pickles.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ml_worker::model::{pickle, Batch, TaskType};

fuzz_target!(|data: &[u8]| {
    let _ = pickle::reader::read(data);
    for task in [TaskType::Regression, TaskType::Classification] {
        if let Ok(m) = pickle::load_unregistered(data, 10, task) {
            let _ = m.model.predict(Batch::new(&[0.5; 10], 10).unwrap());
        }
    }
});
