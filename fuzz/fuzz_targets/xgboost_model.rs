//! XGBoost JSON and UBJSON models (the format is detected as in the
//! loader): a model that evaluates or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ml_worker::model::xgboost;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = xgboost::parse(data, Path::new("fuzz.ubj")) {
        let e = &p.ensemble;
        if e.n_features <= 10_000 {
            let rows: Vec<f64> = (0..2 * e.n_features).map(|i| [0.5, f64::NAN, -3.0][i % 3]).collect();
            let _ = e.transformed(&rows, 2);
        }
    }
});
