//! The `torch` kind: TorchScript through libtorch. Golden comparisons are in
//! golden.rs; here, configuration, bad files and bad input (each a clear
//! error, never a crash), the device and thread settings, and the audit row.
#![cfg(feature = "torch")]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ml_worker::audit::AuditStore;
use ml_worker::config::parse_registry;
use ml_worker::model::{Batch, ModelError};
use ml_worker::registry::{Registry, RegistryOptions};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

const DIABETES: &str = r#"["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]"#;

fn entry(name: &str, path: &str, features: &str, task: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    path: {path}\n    kind: torch\n    features: {features}\n    target: y\n    task_type: {task}\n{extra}"
    )
}

fn registry(models: &[String], audit: Option<Arc<AuditStore>>) -> Registry {
    let yaml = format!("models:\n{}", models.concat());
    let specs = parse_registry(&yaml, Path::new("test.yaml"), &fixtures()).unwrap();
    Registry::from_specs(specs, audit, RegistryOptions::default())
}

/// The error loading `name` gives, as text.
fn load_error(reg: &Registry, name: &str) -> String {
    match reg.get(name) {
        Ok(_) => panic!("{name} loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn files_that_are_not_torchscript_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("noise.pt"),
        b"\x80\x02not a zip archive at all",
    )
    .unwrap();
    std::fs::write(dir.path().join("empty.pt"), b"").unwrap();
    let truncated = std::fs::read(fixtures().join("torch_mlp_regressor.pt")).unwrap();
    std::fs::write(
        dir.path().join("truncated.pt"),
        &truncated[..truncated.len() / 2],
    )
    .unwrap();
    let models: Vec<String> = ["noise.pt", "empty.pt", "truncated.pt"]
        .iter()
        .map(|f| {
            entry(
                f.trim_end_matches(".pt"),
                &dir.path().join(f).display().to_string(),
                DIABETES,
                "regression",
                "",
            )
        })
        .chain([entry(
            "lightgbm_text",
            "lgb_regression.txt",
            DIABETES,
            "regression",
            "",
        )])
        .collect();
    let reg = registry(&models, None);
    for name in ["noise", "empty", "truncated", "lightgbm_text"] {
        let e = load_error(&reg, name);
        assert!(e.contains("not a valid TorchScript model"), "{name}: {e}");
        assert!(!e.contains("Exception raised from"), "{name}: {e}");
    }
}

#[test]
fn a_model_that_wants_another_input_width_is_refused_at_load() {
    let nine = r#"["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5"]"#;
    let reg = registry(
        &[entry(
            "narrow",
            "torch_mlp_regressor.pt",
            nine,
            "regression",
            "",
        )],
        None,
    );
    let e = load_error(&reg, "narrow");
    assert!(e.contains("[1, 9] float32 input"), "{e}");
    assert!(e.contains("shape") || e.contains("size"), "{e}");
}

#[test]
fn a_model_returning_a_tuple_is_refused_at_load() {
    let reg = registry(
        &[entry(
            "pair",
            "torch_tuple_output.pt",
            DIABETES,
            "regression",
            "",
        )],
        None,
    );
    let e = load_error(&reg, "pair");
    assert!(e.contains("returned a tuple, expected one tensor"), "{e}");
}

#[test]
fn nan_inputs_are_an_error_naming_the_feature_unless_the_model_takes_them() {
    let reg = registry(
        &[
            entry(
                "strict",
                "torch_mlp_regressor.pt",
                DIABETES,
                "regression",
                "",
            ),
            entry(
                "lenient",
                "torch_mlp_regressor.pt",
                DIABETES,
                "regression",
                "    missing: nan\n",
            ),
        ],
        None,
    );
    let mut rows = vec![0.01; 20];
    rows[12] = f64::NAN; // row 1, feature 2 (bmi)
    let strict = reg.get("strict").unwrap().model;
    match strict.predict(Batch::new(&rows, 10).unwrap()) {
        Err(ModelError::Input(msg)) => {
            assert!(msg.contains("'bmi'") && msg.contains("row 1"), "{msg}")
        }
        other => panic!("expected an input error, got {other:?}"),
    }
    // `missing: nan` passes NaN on; the network's output for that row is NaN
    // (the worker dead-letters non-finite predictions)
    let lenient = reg.get("lenient").unwrap().model;
    let out = lenient.predict(Batch::new(&rows, 10).unwrap()).unwrap();
    assert!(out.values[0].is_finite() && out.values[1].is_nan());
}

#[test]
fn wrong_feature_count_in_a_batch_is_an_input_error() {
    let reg = registry(
        &[entry(
            "m",
            "torch_mlp_regressor.pt",
            DIABETES,
            "regression",
            "",
        )],
        None,
    );
    let m = reg.get("m").unwrap().model;
    let e = m.predict(Batch::new(&[0.0; 9], 9).unwrap()).unwrap_err();
    assert!(e.to_string().contains("expects 10 features"), "{e}");
    // an empty batch is fine
    assert!(m
        .predict(Batch::new(&[], 10).unwrap())
        .unwrap()
        .values
        .is_empty());
}

#[test]
fn a_cuda_device_that_is_not_there_is_a_clear_error_and_auto_falls_back_to_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let audit = Arc::new(AuditStore::open(&dir.path().join("a.db"), "w").unwrap());
    let cuda = tch::Cuda::device_count();
    let reg = registry(
        &[
            entry(
                "far",
                "torch_mlp_regressor.pt",
                DIABETES,
                "regression",
                &format!("    torch: {{device: \"cuda:{cuda}\"}}\n"),
            ),
            entry(
                "auto",
                "torch_mlp_classifier.pt",
                r#"["alcohol", "malic_acid", "ash", "alcalinity_of_ash", "magnesium", "total_phenols", "flavanoids", "nonflavanoid_phenols", "proanthocyanins", "color_intensity", "hue", "od280_od315_of_diluted_wines", "proline"]"#,
                "classification",
                "    torch: {output: logits, device: auto, intra_op_threads: 2}\n",
            ),
        ],
        Some(audit.clone()),
    );
    let e = load_error(&reg, "far");
    assert!(
        e.contains(&format!("cuda:{cuda} was asked for")) && e.contains("device: cpu"),
        "{e}"
    );
    let m = reg.get("auto").unwrap().model;
    let want = if cuda > 0 {
        "device cuda:0 (auto)"
    } else {
        "device cpu (auto)"
    };
    assert!(m.info().detail.contains(want), "{}", m.info().detail);
    assert!(m.info().detail.contains("2 intra-op threads"));
    assert_eq!(m.info().n_classes, Some(3));
    // the device is in the audit store
    let rows = audit.rows(Some("auto"), None).unwrap();
    assert!(
        rows.iter()
            .any(|r| r.event == "load" && r.detail.contains(want)),
        "{:?}",
        rows.iter()
            .map(|r| (&r.event, &r.detail))
            .collect::<Vec<_>>()
    );
}

#[test]
fn classifiers_must_say_what_their_output_holds() {
    let yaml = format!(
        "models:\n{}",
        entry(
            "c",
            "torch_mlp_classifier.pt",
            DIABETES,
            "classification",
            ""
        )
    );
    let e = parse_registry(&yaml, Path::new("test.yaml"), &fixtures()).unwrap_err();
    assert!(e.to_string().contains("field 'torch'") && e.to_string().contains("output: logits"));
    for (opt, want) in [
        ("{output: scores}", "unknown output 'scores'"),
        ("{output: logits, device: tpu}", "unknown device 'tpu'"),
        ("{output: logits, intra_op_threads: 0}", "out of range"),
        ("{output: logits, colour: red}", "unknown field"),
    ] {
        let yaml = format!(
            "models:\n{}",
            entry(
                "c",
                "torch_mlp_classifier.pt",
                DIABETES,
                "classification",
                &format!("    torch: {opt}\n")
            )
        );
        let e = parse_registry(&yaml, Path::new("test.yaml"), &fixtures()).unwrap_err();
        assert!(e.to_string().contains(want), "{opt}: {e}");
    }
}
