//! Registry behaviour: lazy loading, sharing a loaded file by checksum,
//! ONNX output selection by name, and the audit rows each step writes.

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

fn registry(yaml: &str, audit: Option<Arc<AuditStore>>) -> Registry {
    let specs = parse_registry(yaml, Path::new("test.yaml"), &fixtures()).unwrap();
    Registry::from_specs(specs, audit, RegistryOptions::default())
}

#[test]
fn lazy_models_load_on_first_use_only() {
    let dir = tempfile::tempdir().unwrap();
    let audit = Arc::new(AuditStore::open(&dir.path().join("a.db"), "w").unwrap());
    let yaml = format!(
        "models:\n  - name: eager\n    path: lgb_regression.txt\n    kind: lightgbm\n    features: {DIABETES}\n    target: y\n    task_type: regression\n  - name: later\n    path: lgb_poisson.txt\n    kind: lightgbm\n    features: {DIABETES}\n    target: y\n    task_type: regression\n    lazy: true\n"
    );
    let reg = registry(&yaml, Some(audit.clone()));
    assert!(reg.loaded("eager").is_some());
    assert!(reg.loaded("later").is_none());
    assert!(audit.rows(Some("later"), None).unwrap().is_empty());
    let m = reg.get("later").unwrap().model;
    assert_eq!(m.info().name, "later");
    assert!(reg.loaded("later").is_some());
    let events: Vec<String> = audit
        .rows(Some("later"), None)
        .unwrap()
        .into_iter()
        .map(|r| r.event)
        .collect();
    assert_eq!(events, vec!["verify", "load"]);
    // a second get does not load again
    reg.get("later").unwrap();
    assert_eq!(audit.rows(Some("later"), None).unwrap().len(), 2);
}

#[test]
fn two_entries_for_one_file_share_the_loaded_model() {
    let yaml = format!(
        "models:\n  - name: a\n    path: lgb_regression.txt\n    kind: lightgbm\n    features: {DIABETES}\n    target: y\n    task_type: regression\n  - name: b\n    path: lgb_regression.txt\n    kind: lightgbm\n    features: {DIABETES}\n    target: y\n    task_type: regression\n    version: v2\n"
    );
    let reg = registry(&yaml, None);
    let a = reg.get("a").unwrap().model;
    let b = reg.get("b").unwrap().model;
    assert_eq!(b.info().name, "b");
    assert_eq!(b.info().version, "v2");
    assert_eq!(a.info().sha256, b.info().sha256);
    assert!(
        b.info().detail.contains("shared with 'a'"),
        "{}",
        b.info().detail
    );
    let row = vec![0.01; 10];
    let batch = Batch::new(&row, 10).unwrap();
    assert_eq!(a.predict(batch).unwrap(), b.predict(batch).unwrap());
}

#[test]
fn version_defaults_to_the_short_checksum() {
    let yaml = format!(
        "models:\n  - name: a\n    path: lgb_regression.txt\n    kind: lightgbm\n    features: {DIABETES}\n    target: y\n    task_type: regression\n"
    );
    let reg = registry(&yaml, None);
    let m = reg.get("a").unwrap().model;
    let sha = ml_worker::checksum::sha256_file(&fixtures().join("lgb_regression.txt")).unwrap();
    assert_eq!(m.info().sha256, sha);
    assert_eq!(m.info().version, sha[..12]);
}

#[test]
fn onnx_outputs_can_be_named_and_a_wrong_name_is_an_error() {
    let wine = r#"["alcohol", "malic_acid", "ash", "alcalinity_of_ash", "magnesium", "total_phenols", "flavanoids", "nonflavanoid_phenols", "proanthocyanins", "color_intensity", "hue", "od280_od315_of_diluted_wines", "proline"]"#;
    let entry = |name: &str, onnx: &str| {
        format!("  - name: {name}\n    path: onnx_rf_classifier_zipmap.onnx\n    kind: onnx\n    features: {wine}\n    target: y\n    task_type: classification\n    onnx: {onnx}\n")
    };
    let yaml = format!(
        "models:\n{}{}",
        entry(
            "named",
            "{input: input, prediction: output_label, probabilities: output_probability}"
        ),
        entry("wrong", "{probabilities: nope}")
    );
    let reg = registry(&yaml, None);
    let m = reg.get("named").unwrap().model;
    assert_eq!(m.info().n_classes, Some(3));
    let e = reg
        .get("wrong")
        .err()
        .expect("a wrong output name fails")
        .to_string();
    assert!(
        e.contains("onnx.probabilities") && e.contains("nope") && e.contains("output_probability"),
        "{e}"
    );
}

#[test]
fn regression_model_has_no_probabilities() {
    let yaml = format!(
        "models:\n  - name: a\n    path: xgb_regression.ubj\n    kind: xgboost\n    features: {DIABETES}\n    target: y\n    task_type: regression\n"
    );
    let reg = registry(&yaml, None);
    let m = reg.get("a").unwrap().model;
    let row = vec![0.0; 10];
    let e = m
        .predict_proba(Batch::new(&row, 10).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no class probabilities"), "{e}");
    let e = m
        .predict(Batch::new(&row[..9], 9).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("expects 10 features"), "{e}");
}

#[test]
fn a_model_is_not_served_when_the_audit_store_refuses_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let audit = Arc::new(AuditStore::open(&db, "w").unwrap());
    // break the store behind its back
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("DROP TABLE audit_log;")
        .unwrap();
    let yaml = format!(
        "models:\n  - name: a\n    path: lgb_regression.txt\n    kind: lightgbm\n    features: {DIABETES}\n    target: y\n    task_type: regression\n"
    );
    let reg = registry(&yaml, Some(audit));
    let e = reg.get("a").err().expect("refused").to_string();
    assert!(e.contains("audit store refused the verify row"), "{e}");
}

#[test]
fn a_signal_rule_naming_a_class_the_model_lacks_is_refused() {
    let yaml = format!(
        "models:\n  - name: a\n    path: lgb_binary.txt\n    kind: lightgbm\n    features: {}\n    target: y\n    task_type: classification\n    signal: {{classes: {{1: BUY, 2: SELL}}}}\n",
        std::fs::read_to_string(fixtures().join("lgb_binary.golden.json"))
            .map(|t| serde_json::from_str::<serde_json::Value>(&t).unwrap()["features"].to_string())
            .unwrap()
    );
    let reg = registry(&yaml, None);
    let e = reg.get("a").err().expect("refused").to_string();
    assert!(
        e.contains("field 'signal' maps class 2 but the model has 2 classes"),
        "{e}"
    );
}

/// Built without the `torch` feature (`--no-default-features`), a torch
/// model fails to load saying how to get it; the other models still serve.
#[cfg(not(feature = "torch"))]
#[test]
fn without_the_torch_feature_torch_models_fail_with_a_fix_and_others_still_work() {
    let yaml = format!(
        "models:\n  - name: net\n    path: torch_mlp_regressor.pt\n    kind: torch\n    features: {DIABETES}\n    target: y\n    task_type: regression\n    lazy: true\n  - name: trees\n    path: lgb_regression.txt\n    kind: lightgbm\n    features: {DIABETES}\n    target: y\n    task_type: regression\n"
    );
    let reg = registry(&yaml, None);
    let e = reg.get("net").err().expect("no torch support").to_string();
    assert!(e.contains("`torch` feature") && e.contains("ONNX"), "{e}");
    let m = reg.get("trees").unwrap().model;
    assert_eq!(
        m.predict(Batch::new(&[0.0; 10], 10).unwrap())
            .unwrap()
            .values
            .len(),
        1
    );
}

#[test]
fn a_catboost_model_with_a_categorical_feature_is_refused_naming_it() {
    let yaml = "models:\n  - name: cat\n    path: cb_categorical.json\n    kind: catboost\n    features: [a, b, color, d]\n    target: y\n    task_type: regression\n";
    let reg = registry(yaml, None);
    let Err(e) = reg.get("cat") else {
        panic!("a categorical CatBoost model was served")
    };
    let text = e.to_string();
    assert!(
        text.contains("model 'cat'") && text.contains("'color'") && text.contains("categorical"),
        "{text}"
    );
    // the format's own error is the source, typed
    let source = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<Arc<ModelError>>())
        .unwrap_or_else(|| panic!("no ModelError source: {e:?}"));
    assert!(std::ptr::eq(&**source, e.model_error().unwrap()));
    assert!(
        matches!(&**source, ModelError::Unsupported(_)),
        "{source:?}"
    );
}

#[test]
fn an_unknown_kind_is_refused_naming_the_kinds_available() {
    let yaml = "models:\n  - name: m\n    path: lgb_regression.txt\n    kind: sklearn\n    features: [a]\n    target: y\n    task_type: regression\n";
    let e = parse_registry(yaml, Path::new("test.yaml"), &fixtures())
        .unwrap_err()
        .to_string();
    for k in ["catboost", "lightgbm", "onnx", "pickle", "torch", "xgboost"] {
        assert!(e.contains(k), "{e}");
    }
    assert!(
        e.contains("'kind'") && e.contains("unknown kind 'sklearn'"),
        "{e}"
    );
    // another kind's options block is named as such
    let yaml = format!(
        "models:\n  - name: m\n    path: lgb_regression.txt\n    kind: lightgbm\n    features: {DIABETES}\n    target: y\n    task_type: regression\n    onnx: {{input: x}}\n"
    );
    let e = parse_registry(&yaml, Path::new("test.yaml"), &fixtures())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'onnx'") && e.contains("only applies to kind onnx"),
        "{e}"
    );
    // a kind without options refuses a block of its own name
    let yaml = yaml.replace("onnx: {input: x}", "lightgbm: {x: 1}");
    let e = parse_registry(&yaml, Path::new("test.yaml"), &fixtures())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'lightgbm'") && e.contains("takes no options"),
        "{e}"
    );
}

/// A LightGBM pickle serves rows with NaN by default, as LightGBM does
/// (the same model as a text file always did); `missing: reject` still
/// refuses them, naming the feature, in `predict_full` as for the worker.
#[test]
fn pickled_boosters_take_nan_by_default_and_reject_when_told() {
    let entry = |name: &str, extra: &str| {
        format!("  - name: {name}\n    path: pkl_lgbm_regressor.pkl\n    kind: pickle\n    features: {DIABETES}\n    target: y\n    task_type: regression\n{extra}")
    };
    let yaml = format!(
        "models:\n{}{}",
        entry("default", ""),
        entry("strict", "    missing: reject\n")
    );
    let dir = tempfile::tempdir().unwrap();
    let audit = Arc::new(AuditStore::open(&dir.path().join("a.db"), "w").unwrap());
    let reg = registry(&yaml, Some(audit.clone()));
    // the policy each was served with is in its load row
    for (name, policy) in [("default", "nan"), ("strict", "reject")] {
        let rows = audit.rows(Some(name), None).unwrap();
        assert!(
            rows.iter()
                .any(|r| r.event == "load"
                    && r.detail.ends_with(&format!("missing values: {policy}"))),
            "{name}: {:?}",
            rows.iter().map(|r| &r.detail).collect::<Vec<_>>()
        );
    }
    let mut row = vec![0.1; 10];
    row[2] = f64::NAN;
    let default = reg.get("default").unwrap().model;
    assert_eq!(default.info().missing, ml_worker::model::MissingPolicy::Nan);
    let v = default.predict(Batch::new(&row, 10).unwrap()).unwrap();
    assert!(v.values[0].is_finite());
    let strict = reg.get("strict").unwrap().model;
    let e = strict
        .predict(Batch::new(&row, 10).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("feature 'bmi'") && e.contains("missing: reject"),
        "{e}"
    );
    assert!(strict.missing_problem(&row).is_some());
    assert!(default.missing_problem(&row).is_none());
}

/// A kind of the user's own that misbehaves: a loader that panics is
/// refused at once with the panic's text (not at its load deadline), and a
/// model whose answer has the wrong shape is an error, never a misread row.
#[test]
fn a_user_kind_that_panics_or_answers_the_wrong_shape_is_an_error() {
    use ml_worker::model::{LoadContext, Loaded, Model, ModelLoader, Output, Prediction};
    use ml_worker::registry::RegistryBuilder;

    struct Panics;
    impl ModelLoader for Panics {
        fn kind(&self) -> &str {
            "panics"
        }
        fn load(&self, _: &[u8], _: &LoadContext<'_>) -> Result<Loaded, ModelError> {
            panic!("boom in load")
        }
    }
    /// Right for one row (so it passes the warm-up), two rows otherwise.
    struct TwoRows;
    impl Model for TwoRows {
        fn predict(&self, b: Batch<'_>) -> Result<Prediction, ModelError> {
            Ok(Prediction {
                values: Output {
                    values: vec![1.0; b.n_rows().min(2)],
                    width: 1,
                },
                probabilities: None,
            })
        }
    }
    struct Lies;
    impl ModelLoader for Lies {
        fn kind(&self) -> &str {
            "lies"
        }
        fn load(&self, _: &[u8], _: &LoadContext<'_>) -> Result<Loaded, ModelError> {
            Ok(Loaded {
                model: Arc::new(TwoRows),
                n_outputs: 1,
                n_classes: None,
                detail: "always two rows".into(),
                handles_missing: true,
            })
        }
    }
    let builder = RegistryBuilder::new().with_loader(Panics).with_loader(Lies);
    let yaml = "models:\n  - name: p\n    path: lgb_regression.txt\n    kind: panics\n    features: [a]\n    target: y\n    task_type: regression\n  - name: l\n    path: lgb_regression.txt\n    kind: lies\n    features: [a]\n    target: y\n    task_type: regression\n    load_timeout_ms: 600000\n";
    let specs = ml_worker::config::parse_registry_with(
        yaml,
        Path::new("test.yaml"),
        &fixtures(),
        &builder.loaders(),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let reg = builder.from_specs(specs);
    let e = reg
        .get("p")
        .err()
        .expect("a panicking loader serves nothing");
    assert!(
        e.to_string()
            .contains("'panics' loader panicked: boom in load"),
        "{e}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let m = reg.get("l").unwrap().model;
    let e = m
        .predict_full(Batch::new(&[1.0, 2.0, 3.0], 1).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model 'l' answered 2 values") && e.contains("3 rows"),
        "{e}"
    );
    // the built-in kinds know nothing of these
    let e = parse_registry(yaml, Path::new("test.yaml"), &fixtures())
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown kind 'panics'"), "{e}");
}

/// What the loaders and the registry refuse at load, before an event is
/// served: a classifier registered as a regression, a duplicated options
/// block, a model that cannot answer a row of zeros (the warm-up), a class
/// index out of range; and two entries of one file with other feature
/// names do not share a loaded model (each loader checks its entry).
#[test]
fn registry_refusals_at_load_and_no_sharing_across_feature_names() {
    let entry = |name: &str, file: &str, kind: &str, features: &str, task: &str| {
        format!("  - name: {name}\n    path: {file}\n    kind: {kind}\n    features: {features}\n    target: y\n    task_type: {task}\n")
    };
    // a binary classifier's objective, registered as a regression
    let yaml = format!(
        "models:\n{}",
        entry(
            "b",
            "lgb_binary.txt",
            "lightgbm",
            &golden_features("lgb_binary"),
            "regression"
        )
    );
    let e = registry(&yaml, None).get("b").err().unwrap().to_string();
    assert!(
        e.contains("is a classification objective") && e.contains("task_type: classification"),
        "{e}"
    );
    let yaml = format!(
        "models:\n{}",
        entry(
            "o",
            "onnx_skl_logreg.onnx",
            "onnx",
            &golden_features("onnx_skl_logreg"),
            "regression"
        )
    );
    let e = registry(&yaml, None).get("o").err().unwrap().to_string();
    assert!(e.contains("it is a classifier"), "{e}");
    // the same options block twice: refused, not the last one kept
    let yaml = format!(
        "models:\n{}    onnx: {{prediction: nonexistent}}\n    onnx: {{prediction: label}}\n",
        entry(
            "o",
            "onnx_skl_logreg.onnx",
            "onnx",
            &golden_features("onnx_skl_logreg"),
            "classification"
        )
    );
    let e = parse_registry(&yaml, Path::new("test.yaml"), &fixtures())
        .unwrap_err()
        .to_string();
    assert!(e.contains("duplicate field `onnx`"), "{e}");
    // one file, features in another order: the second entry is loaded
    // (and checked) on its own
    let names: Vec<String> = serde_json::from_str(DIABETES).unwrap();
    let mut swapped = names.clone();
    swapped.swap(0, 1);
    let yaml = format!(
        "models:\n{}{}",
        entry(
            "a",
            "lgb_regression.txt",
            "lightgbm",
            DIABETES,
            "regression"
        ),
        entry(
            "s",
            "lgb_regression.txt",
            "lightgbm",
            &serde_json::to_string(&swapped).unwrap(),
            "regression"
        )
    );
    let reg = registry(&yaml, None);
    let (a, s) = (reg.get("a").unwrap().model, reg.get("s").unwrap().model);
    assert!(!a.info().detail.contains("shared"), "{}", a.info().detail);
    assert!(!s.info().detail.contains("shared"), "{}", s.info().detail);
}

fn golden_features(case: &str) -> String {
    let g: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join(format!("{case}.golden.json"))).unwrap(),
    )
    .unwrap();
    serde_json::to_string(&g["features"]).unwrap()
}

/// A user's model that cannot answer is refused at load (the warm-up row),
/// and a class index out of range is an error, not a published class.
#[test]
fn a_user_model_that_cannot_answer_is_refused_at_load() {
    use ml_worker::model::{LoadContext, Loaded, Model, ModelLoader, Output, Prediction};
    use ml_worker::registry::RegistryBuilder;
    struct Class(f64);
    impl Model for Class {
        fn predict(&self, b: Batch<'_>) -> Result<Prediction, ModelError> {
            let n = b.n_rows();
            Ok(Prediction {
                values: Output {
                    values: vec![self.0; n],
                    width: 1,
                },
                probabilities: Some(Output {
                    values: vec![0.5; 2 * n],
                    width: 2,
                }),
            })
        }
    }
    struct Classes;
    impl ModelLoader for Classes {
        fn kind(&self) -> &str {
            "classes"
        }
        fn load(&self, bytes: &[u8], _: &LoadContext<'_>) -> Result<Loaded, ModelError> {
            // the file says which class it answers
            let c: f64 = std::str::from_utf8(bytes).unwrap().trim().parse().unwrap();
            Ok(Loaded {
                model: Arc::new(Class(c)),
                n_outputs: 1,
                n_classes: Some(2),
                detail: String::new(),
                handles_missing: false,
            })
        }
    }
    let dir = tempfile::tempdir().unwrap();
    for (f, c) in [("ok", "1"), ("seven", "7"), ("half", "0.5")] {
        std::fs::write(dir.path().join(f), c).unwrap();
    }
    let builder = RegistryBuilder::new().with_loader(Classes);
    let entry = |name: &str| {
        format!("  - name: {name}\n    path: {name}\n    kind: classes\n    features: [a]\n    target: y\n    task_type: classification\n")
    };
    let yaml = format!(
        "models:\n{}{}{}",
        entry("ok"),
        entry("seven"),
        entry("half")
    );
    let specs = ml_worker::config::parse_registry_with(
        &yaml,
        Path::new("t.yaml"),
        dir.path(),
        &builder.loaders(),
    )
    .unwrap();
    let reg = builder.from_specs(specs);
    assert!(reg.get("ok").is_ok());
    for (name, want) in [
        ("seven", "class 7, not one of its 2 classes"),
        ("half", "class 0.5"),
    ] {
        let e = reg.get(name).err().unwrap().to_string();
        assert!(e.contains("probe row of zeros") && e.contains(want), "{e}");
    }
}

#[test]
fn a_reopened_registry_takes_unchanged_models_over_reloads_changed_ones_and_names_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let audit = Arc::new(AuditStore::open(&dir.path().join("a.db"), "w").unwrap());
    let file = dir.path().join("models.yaml");
    let entry = |name: &str, path: &str, extra: &str| {
        format!(
            "  - name: {name}\n    path: {}/{path}\n    kind: lightgbm\n    features: {DIABETES}\n    target: y\n    task_type: regression\n{extra}",
            fixtures().display()
        )
    };
    let write = |entries: &[String]| {
        std::fs::write(&file, format!("models:\n{}", entries.concat())).unwrap();
    };
    write(&[
        entry("a", "lgb_regression.txt", ""),
        entry("b", "lgb_poisson.txt", ""),
        entry("gone", "lgb_poisson.txt", "    version: g1\n"),
    ]);
    let builder = ml_worker::registry::RegistryBuilder::new().audit(Some(audit.clone()));
    let first = builder.clone().open(&file).unwrap();
    let a_before = first.loaded("a").unwrap();
    let rows_before = audit.rows(None, None).unwrap().len();
    // a: a canary added (same model); b: a new version; gone: removed; c: added
    write(&[
        entry(
            "a",
            "lgb_regression.txt",
            "    canary: {model: b, percent: 5}\n",
        ),
        entry("b", "lgb_poisson.txt", "    version: b2\n"),
        entry("c", "lgb_regression.txt", ""),
    ]);
    let (second, changes) = builder.clone().reopen(&file, &first).unwrap();
    let what: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(changes.len(), 4, "{what:#?}");
    assert!(
        Arc::ptr_eq(&a_before, &second.loaded("a").unwrap()),
        "a is taken over, not loaded again"
    );
    assert!(
        what[0].starts_with("a: same model; canary: none -> b 5%"),
        "{what:#?}"
    );
    assert_eq!(changes[1].new.as_deref(), Some("b2"));
    assert_eq!(changes[2].model, "c");
    assert_eq!(changes[2].what, "added");
    assert_eq!(changes[3].model, "gone");
    assert_eq!(changes[3].what, "removed");
    assert_eq!(changes[3].old.as_deref(), Some("g1"));
    // only b and c were loaded (verify + load each); a was not
    let new_rows = audit.rows(None, None).unwrap().len() - rows_before;
    assert_eq!(new_rows, 4);
    // nothing changed: no changes
    let (_, none) = builder.clone().reopen(&file, &second).unwrap();
    assert!(none.is_empty(), "{none:?}");
    // a broken model file refuses the whole reload
    let broken = dir.path().join("broken.txt");
    std::fs::write(&broken, "tree\nnot a model").unwrap();
    std::fs::write(
        &file,
        format!(
            "models:\n  - name: a\n    path: {}\n    kind: lightgbm\n    features: {DIABETES}\n    target: y\n    task_type: regression\n",
            broken.display()
        ),
    )
    .unwrap();
    let err = builder
        .clone()
        .reopen(&file, &second)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("model 'a'"), "{err}");
    // unless that model is optional
    std::fs::write(
        &file,
        std::fs::read_to_string(&file).unwrap() + "    optional: true\n",
    )
    .unwrap();
    let (third, _) = builder.reopen(&file, &second).unwrap();
    assert!(third.loaded("a").is_none());
}

#[test]
fn a_reload_is_not_blocked_by_an_unchanged_entry_that_failed_before() {
    // a missing file with a fallback: served by the fallback at start, and
    // a reload that changes another model goes through (as at start-up)
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("models.yaml");
    let entry = |name: &str, path: &str, extra: &str| {
        format!(
            "  - name: {name}\n    path: {path}\n    kind: lightgbm\n    features: {DIABETES}\n    target: y\n    task_type: regression\n{extra}"
        )
    };
    let good = fixtures().join("lgb_regression.txt").display().to_string();
    let gone = dir.path().join("not-there.txt").display().to_string();
    let write = |version: &str| {
        std::fs::write(
            &file,
            format!(
                "models:\n{}{}",
                entry("a", &good, &format!("    version: {version}\n")),
                entry("b", &gone, "    fallback: a\n")
            ),
        )
        .unwrap();
    };
    write("1");
    let builder = ml_worker::registry::RegistryBuilder::new();
    let first = builder.clone().open(&file).unwrap();
    assert!(first.failure("b").is_some());
    assert_eq!(first.get("b").unwrap().fallback_for.as_deref(), Some("b"));
    write("2");
    let (second, changes) = builder.clone().reopen(&file, &first).unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(second.get("b").unwrap().model.info().version, "2");
    // but a model that loaded before and breaks now refuses the reload
    std::fs::write(
        &file,
        format!(
            "models:\n{}{}",
            entry("a", &gone, "    version: 3\n"),
            entry("b", &gone, "    fallback: a\n")
        ),
    )
    .unwrap();
    assert!(builder.reopen(&file, &second).is_err());
}

#[test]
fn a_canary_must_find_its_features_in_the_models_events_and_a_new_entry_with_a_fallback_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let good = fixtures().join("lgb_regression.txt").display().to_string();
    let entry = |name: &str, path: &str, features: &str, extra: &str| {
        format!(
            "  - name: {name}\n    path: {path}\n    kind: lightgbm\n    features: {features}\n    target: y\n    task_type: regression\n{extra}"
        )
    };
    let other = r#"["x0", "x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "x9"]"#;
    let yaml = format!(
        "models:\n{}{}",
        entry(
            "a",
            &good,
            DIABETES,
            "    canary: {model: odd, percent: 50}\n"
        ),
        entry("odd", &good, other, "")
    );
    let e = parse_registry(&yaml, Path::new("t.yaml"), &fixtures())
        .expect_err("refused")
        .to_string();
    assert!(e.contains("canary") && e.contains("x0"), "{e}");
    // a shadow may need more (what the events lack is missing)
    let yaml = yaml.replace("canary: {model: odd, percent: 50}", "shadow: odd");
    parse_registry(&yaml, Path::new("t.yaml"), &fixtures()).unwrap();
    // a reload adding a model whose file is missing, with a fallback: served
    // by the fallback, as at start-up
    let file = dir.path().join("models.yaml");
    std::fs::write(
        &file,
        format!("models:\n{}", entry("a", &good, DIABETES, "")),
    )
    .unwrap();
    let builder = ml_worker::registry::RegistryBuilder::new();
    let first = builder.clone().open(&file).unwrap();
    let gone = dir.path().join("gone.txt").display().to_string();
    std::fs::write(
        &file,
        format!(
            "models:\n{}{}",
            entry("a", &good, DIABETES, ""),
            entry("b", &gone, DIABETES, "    fallback: a\n")
        ),
    )
    .unwrap();
    let (second, _) = builder.reopen(&file, &first).unwrap();
    assert_eq!(second.get("b").unwrap().fallback_for.as_deref(), Some("b"));
}
