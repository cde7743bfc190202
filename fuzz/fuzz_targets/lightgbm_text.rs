//! LightGBM text models: any input gives a model that evaluates, or an
//! error; never a panic, a hang or an allocation out of proportion.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ml_worker::model::lightgbm;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = lightgbm::parse(text, Path::new("fuzz.txt")) {
        let e = &p.ensemble;
        let rows: Vec<f64> = (0..2 * e.n_features).map(|i| [0.5, f64::NAN, -3.0][i % 3]).collect();
        let _ = e.transformed(&rows, 2);
    }
});
