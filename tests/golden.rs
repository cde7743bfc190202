//! ml-worker's predictions against the reference libraries' own, on the
//! fixtures written by `tools/make_fixtures.py` (LightGBM, XGBoost,
//! scikit-learn via ONNX Runtime, PyTorch via libtorch), every row including
//! rows with NaNs.
//!
//! Tolerances (from the issue): LightGBM 1e-9 relative; XGBoost 1e-6
//! relative (it computes in f32); ONNX and torch 1e-5 relative or 1e-6
//! absolute.
//! Class predictions must be equal.

use std::path::{Path, PathBuf};

use ml_worker::config::parse_registry;
use ml_worker::model::{Batch, ImportanceType, MissingPolicy};
use ml_worker::registry::{Registry, RegistryOptions};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    case: String,
    kind: String,
    model_files: Vec<String>,
    task_type: String,
    features: Vec<String>,
    n_classes: Option<usize>,
    inputs: Vec<Vec<Option<f64>>>,
    prediction: Vec<f64>,
    probabilities: Option<Vec<Vec<f64>>>,
    /// torch classifiers: what the model's output tensor holds.
    #[serde(default)]
    torch_output: Option<String>,
    /// pickle cases: the missing-value policy the case is served with.
    #[serde(default)]
    missing: Option<String>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn goldens(kind: &str) -> Vec<Golden> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(fixtures()).expect("tests/fixtures exists") {
        let p = entry.unwrap().path();
        if p.to_string_lossy().ends_with(".golden.json") {
            let g: Golden = serde_json::from_slice(&std::fs::read(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            if g.kind == kind {
                out.push(g);
            }
        }
    }
    out.sort_by(|a, b| a.case.cmp(&b.case));
    out
}

/// |a - b| <= rel * max(|a|, |b|) + abs
fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) + abs
}

/// Loads every model file of every golden case of `kind` and compares the
/// whole batch and every row alone (batch of 1) with the reference. Native
/// evaluators must give a row the same bits whatever the batch; for
/// libtorch, whose kernels block by batch size, both are held to the
/// tolerance instead. Returns the number of (file, row) pairs checked.
fn check_kind(kind: &str, rel: f64, abs: f64) -> usize {
    check_cases(kind, rel, abs, |_| true)
}

/// [`check_kind`] for the cases whose name passes `which`.
fn check_cases(kind: &str, rel: f64, abs: f64, which: impl Fn(&str) -> bool) -> usize {
    let cases: Vec<Golden> = goldens(kind)
        .into_iter()
        .filter(|g| which(&g.case))
        .collect();
    assert!(
        !cases.is_empty(),
        "no {kind} fixtures: run tools/make_fixtures.py"
    );
    let mut checked = 0;
    for g in &cases {
        for file in &g.model_files {
            let name = format!("{}:{file}", g.case);
            // no `missing:`: every case is served with the default policy
            // its model earns (the pickles' NaN rows included)
            let mut yaml = format!(
                "models:\n  - name: {}\n    path: {}\n    kind: {kind}\n    features: {}\n    target: y\n    task_type: {}\n",
                serde_json::to_string(&name).unwrap(),
                serde_json::to_string(&fixtures().join(file)).unwrap(),
                serde_json::to_string(&g.features).unwrap(),
                g.task_type
            );
            if let Some(o) = &g.torch_output {
                yaml.push_str(&format!("    torch: {{output: {o}}}\n"));
            }
            let spec = parse_registry(&yaml, Path::new("golden.yaml"), &fixtures())
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .remove(0);
            let reg = Registry::from_specs(vec![spec], None, RegistryOptions::default());
            let model = reg
                .get(&name)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .model;
            // the pickle cases say what their library does with NaN
            // cases with NaN rows must be served with NaN by default
            if g.missing.as_deref() == Some("nan") {
                assert_eq!(
                    model.info().missing,
                    MissingPolicy::Nan,
                    "{name}: missing-value policy"
                );
            }
            let nf = g.features.len();
            let data: Vec<f64> = g
                .inputs
                .iter()
                .flatten()
                .map(|v| v.unwrap_or(f64::NAN))
                .collect();
            // whole batch, and row by row (batch of 1) must agree
            let pred = model.predict_full(Batch::new(&data, nf).unwrap()).unwrap();
            assert_eq!(pred.values.n_rows(), g.inputs.len(), "{name}");
            let mut worst = 0f64;
            let mut track = |a: f64, b: f64| {
                worst = worst.max((a - b).abs() / a.abs().max(b.abs()).max(1e-300))
            };
            for (i, want) in g.prediction.iter().enumerate() {
                let got = pred.values.row(i)[0];
                if g.task_type == "classification" {
                    assert_eq!(got, *want, "{name} row {i}: class");
                } else {
                    assert!(
                        close(got, *want, rel, abs),
                        "{name} row {i}: got {got}, reference {want}"
                    );
                    track(got, *want);
                }
                let single = model
                    .predict_full(Batch::new(&data[i * nf..(i + 1) * nf], nf).unwrap())
                    .unwrap();
                if kind == "torch" {
                    let (one, want) = (single.values.row(0)[0], g.prediction[i]);
                    assert!(
                        close(one, want, rel, abs),
                        "{name} row {i}: batch of 1 gives {one}, reference {want}"
                    );
                    if let (Some(p1), Some(w)) = (&single.probabilities, &g.probabilities) {
                        for (j, want) in w[i].iter().enumerate() {
                            let v = p1.row(0)[j];
                            assert!(
                                close(v, *want, rel, abs),
                                "{name} row {i} class {j}: batch of 1 gives {v}, reference {want}"
                            );
                        }
                    }
                } else {
                    assert_eq!(
                        single.values.row(0),
                        pred.values.row(i),
                        "{name} row {i}: batch of 1 differs"
                    );
                }
                checked += 1;
            }
            match (&g.probabilities, &pred.probabilities) {
                (Some(want), Some(got)) => {
                    assert_eq!(
                        got.width,
                        g.n_classes.unwrap_or(want[0].len()),
                        "{name}: classes"
                    );
                    for (i, row) in want.iter().enumerate() {
                        for (j, w) in row.iter().enumerate() {
                            let v = got.row(i)[j];
                            assert!(
                                close(v, *w, rel, abs),
                                "{name} row {i} class {j}: got {v}, reference {w}"
                            );
                            track(v, *w);
                        }
                    }
                }
                (None, None) => {}
                (w, g2) => panic!(
                    "{name}: probabilities expected {} got {}",
                    w.is_some(),
                    g2.is_some()
                ),
            }
            eprintln!(
                "{name:48} rows {:4}  max relative difference {worst:.3e}",
                g.inputs.len()
            );
        }
    }
    checked
}

#[test]
fn lightgbm_matches_lightgbm_within_1e9_relative() {
    let n = check_kind("lightgbm", 1e-9, 1e-12);
    assert!(n >= 500, "only {n} rows checked");
}

#[test]
fn catboost_json_matches_catboost_within_1e9_relative() {
    let n = check_kind("catboost", 1e-9, 1e-12);
    assert!(n >= 500, "only {n} rows checked");
}

#[test]
fn xgboost_json_and_ubj_match_xgboost_within_1e6_relative() {
    let n = check_kind("xgboost", 1e-6, 1e-7);
    assert!(n >= 500, "only {n} rows checked");
}

#[test]
fn onnx_matches_onnxruntime_within_1e5_relative() {
    let n = check_kind("onnx", 1e-5, 1e-6);
    assert!(n >= 300, "only {n} rows checked");
}

/// Python torch's predictions, batches of 1,000 and of 1 (`torch` feature).
#[cfg(feature = "torch")]
#[test]
fn torch_matches_python_torch_within_1e5_relative() {
    let n = check_kind("torch", 1e-5, 1e-6);
    assert!(n >= 3000, "only {n} rows checked");
}

/// Pickles read without running them, served by the native evaluators:
/// LightGBM 1e-9 relative, XGBoost 1e-6, scikit-learn 1e-9 relative and
/// 1e-12 absolute (linear models, trees, forests, gradient boosting,
/// pipelines).
#[test]
fn pickles_match_the_training_libraries() {
    let lgb = check_cases("pickle", 1e-9, 1e-12, |c| c.starts_with("pkl_lgb"));
    let xgb = check_cases("pickle", 1e-6, 1e-7, |c| c.starts_with("pkl_xgb"));
    let skl = check_cases("pickle", 1e-9, 1e-12, |c| {
        !c.starts_with("pkl_lgb") && !c.starts_with("pkl_xgb")
    });
    assert!(lgb >= 300 && xgb >= 400 && skl >= 1500, "{lgb} {xgb} {skl}");
}

#[test]
fn fixtures_cover_missing_values_in_every_native_case() {
    for kind in ["lightgbm", "xgboost", "catboost"] {
        for g in goldens(kind) {
            let nan_rows = g
                .inputs
                .iter()
                .filter(|r| r.iter().any(Option::is_none))
                .count();
            assert!(
                nan_rows >= 5,
                "{}: only {nan_rows} rows with missing values",
                g.case
            );
        }
    }
}

#[test]
fn tree_models_report_split_and_gain_importance() {
    let g = goldens("lightgbm")
        .into_iter()
        .find(|g| g.case == "lgb_binary")
        .expect("lgb_binary fixture");
    let text = std::fs::read_to_string(fixtures().join(&g.model_files[0])).unwrap();
    let parsed = ml_worker::model::lightgbm::parse(&text, Path::new("lgb_binary.txt")).unwrap();
    let split = parsed.ensemble.importance(ImportanceType::Split);
    // LightGBM writes its split-count importance at the end of the file
    let section = text
        .split("feature_importances:")
        .nth(1)
        .expect("feature_importances section");
    for line in section.lines().skip(1).take_while(|l| l.contains('=')) {
        let (name, count) = line.split_once('=').unwrap();
        let idx = parsed.feature_names.iter().position(|f| f == name).unwrap();
        assert_eq!(
            split[idx],
            count.parse::<f64>().unwrap(),
            "split importance of {name}"
        );
    }
    let gain = parsed.ensemble.importance(ImportanceType::Gain);
    assert!(gain.iter().sum::<f64>() > 0.0);
}
