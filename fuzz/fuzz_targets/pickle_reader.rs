//! Coverage-guided fuzzing of the pickle reader and the allowlist converters:
//! any input must give a graph or an error, and a graph must convert to a
//! model or an error, never a panic, hang or unbounded allocation.
//!
//! `make fuzz` (or `RUSTC_BOOTSTRAP=1 cargo fuzz run pickle_reader
//! fuzz/corpus/pickle_reader -- -max_total_time=600`), seeded with the
//! fixture pickles.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ml_worker::config::{MissingPolicy, ModelSpec};
use ml_worker::model::{pickle, Batch, Model, ModelInfo, ModelKind, TaskType};

fuzz_target!(|data: &[u8]| {
    let _ = pickle::reader::read(data);
    for task in [TaskType::Regression, TaskType::Classification] {
        let spec = ModelSpec {
            name: "m".into(),
            path: "m.pkl".into(),
            kind: ModelKind::Pickle,
            features: (0..10).map(|i| format!("f{i}")).collect(),
            target: "y".into(),
            task_type: task,
            version: None,
            sha256: None,
            lazy: false,
            fallback: None,
            description: None,
            onnx: Default::default(),
            torch: Default::default(),
            signal: None,
            missing: MissingPolicy::Nan,
        };
        let info = ModelInfo {
            name: "m".into(),
            version: "v".into(),
            kind: ModelKind::Pickle,
            sha256: String::new(),
            path: "m.pkl".into(),
            features: spec.features.clone(),
            target: "y".into(),
            task_type: task,
            n_outputs: 1,
            n_classes: None,
            detail: String::new(),
            load_time: Default::default(),
        };
        if let Ok(m) = pickle::load(&spec, data, info) {
            let _ = m.predict_full(Batch::new(&[0.5; 10], 10).unwrap());
        }
    }
});
