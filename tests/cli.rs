//! The `ml-worker` binary end to end: models list/verify, predict from CSV
//! and JSON lines, checksum refusal, bad inputs, and the audit store's
//! tamper detection through the real sqlite3 shell.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

fn ml_worker(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args(args)
        .current_dir(dir)
        .env("ML_WORKER_AUDIT_DB", dir.join("audit.db"))
        .output()
        .expect("run ml-worker")
}

/// `ml-worker predict --model M --input I --registry R` in `dir`.
fn predict(dir: &Path, model: &str, input: &str, registry: &str) -> Output {
    ml_worker(
        dir,
        &[
            "predict",
            "--model",
            model,
            "--input",
            input,
            "--registry",
            registry,
        ],
    )
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn golden(case: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture(&format!("{case}.golden.json"))).unwrap())
        .unwrap()
}

/// A registry in a temp dir with one model copied from the fixtures.
fn registry_with(dir: &Path, case: &str, file: &str, kind: &str, extra: &str) -> PathBuf {
    let g = golden(case);
    std::fs::copy(fixture(file), dir.join(file)).unwrap();
    let features = serde_json::to_string(&g["features"]).unwrap();
    let yaml = format!(
        "models:\n  - name: \"{case}\"\n    path: \"{file}\"\n    kind: \"{kind}\"\n    features: {features}\n    target: \"y\"\n    task_type: \"{}\"\n{extra}",
        g["task_type"].as_str().unwrap()
    );
    let p = dir.join("models.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

#[test]
fn shipped_registry_lists_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let reg = root().join("config/models.yaml");
    let reg = reg.to_str().unwrap();
    let o = ml_worker(dir.path(), &["models", "list", "--registry", reg]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.lines().count() >= 4, "{out}");
    let o = ml_worker(dir.path(), &["models", "verify", "--registry", reg]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.lines().skip(1).all(|l| l.contains(" ok: ")), "{out}");
    let o = ml_worker(dir.path(), &["audit", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn predict_from_csv_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    #[allow(unused_mut)]
    let mut cases = vec![
        ("lgb_regression", "lgb_regression.txt", "lightgbm", ""),
        ("lgb_binary", "lgb_binary.txt", "lightgbm", ""),
        ("xgb_multiclass", "xgb_multiclass.ubj", "xgboost", ""),
    ];
    #[cfg(feature = "torch")]
    cases.push((
        "torch_mlp_classifier",
        "torch_mlp_classifier.pt",
        "torch",
        "    torch: {output: logits}\n",
    ));
    for (case, file, kind, extra) in cases {
        let reg = registry_with(dir.path(), case, file, kind, extra);
        let csv = fixture(&format!("{case}.inputs.csv"));
        let o = predict(
            dir.path(),
            case,
            csv.to_str().unwrap(),
            reg.to_str().unwrap(),
        );
        assert!(o.status.success(), "{case}: {}", text(&o));
        let g = golden(case);
        let want = g["prediction"].as_array().unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), want.len(), "{case}");
        let tol = match kind {
            "xgboost" => 1e-6,
            "torch" => 1e-5,
            _ => 1e-9,
        };
        for (i, (line, w)) in lines.iter().zip(want).enumerate() {
            assert_eq!(line["row"], i);
            let (got, w) = (line["prediction"].as_f64().unwrap(), w.as_f64().unwrap());
            assert!(
                (got - w).abs() <= tol * w.abs().max(1e-3),
                "{case} row {i}: {got} vs {w}"
            );
            if g["task_type"] == "classification" {
                let probs = line["probabilities"].as_array().unwrap();
                let want_p = g["probabilities"][i].as_array().unwrap();
                assert_eq!(probs.len(), want_p.len());
                for (p, q) in probs.iter().zip(want_p) {
                    assert!((p.as_f64().unwrap() - q.as_f64().unwrap()).abs() <= tol);
                }
            } else {
                assert!(line.get("probabilities").is_none());
            }
        }
    }
}

#[test]
fn predict_from_json_lines_treats_absent_features_as_missing() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry_with(
        dir.path(),
        "lgb_regression",
        "lgb_regression.txt",
        "lightgbm",
        "",
    );
    let g = golden("lgb_regression");
    let features: Vec<String> = g["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let mut jsonl = String::new();
    for row in g["inputs"].as_array().unwrap() {
        let mut obj = serde_json::Map::new();
        for (f, v) in features.iter().zip(row.as_array().unwrap()) {
            if !v.is_null() {
                obj.insert(f.clone(), v.clone());
            }
        }
        jsonl.push_str(&serde_json::Value::Object(obj).to_string());
        jsonl.push('\n');
    }
    let input = dir.path().join("rows.jsonl");
    std::fs::write(&input, jsonl).unwrap();
    let o = predict(
        dir.path(),
        "lgb_regression",
        input.to_str().unwrap(),
        reg.to_str().unwrap(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let want = g["prediction"].as_array().unwrap();
    for (line, w) in String::from_utf8_lossy(&o.stdout).lines().zip(want) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (got, w) = (v["prediction"].as_f64().unwrap(), w.as_f64().unwrap());
        assert!((got - w).abs() <= 1e-9 * w.abs(), "{got} vs {w}");
    }
}

/// An ONNX logistic regression refuses missing values by default: `predict`
/// answers the row without a feature with an error naming it (the worker
/// dead-letters the same event) and predicts the others.
#[test]
fn predict_applies_the_models_missing_value_policy_row_by_row() {
    let dir = tempfile::tempdir().unwrap();
    let case = "onnx_skl_logreg";
    let reg = registry_with(dir.path(), case, "onnx_skl_logreg.onnx", "onnx", "");
    let g = golden(case);
    let features: Vec<String> = g["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let mut jsonl = String::new();
    for (i, row) in g["inputs"].as_array().unwrap().iter().take(3).enumerate() {
        let mut obj = serde_json::Map::new();
        for (j, (f, v)) in features.iter().zip(row.as_array().unwrap()).enumerate() {
            if !(i == 1 && j == 4) {
                obj.insert(f.clone(), v.clone());
            }
        }
        jsonl.push_str(&serde_json::Value::Object(obj).to_string());
        jsonl.push('\n');
    }
    let input = dir.path().join("rows.jsonl");
    std::fs::write(&input, jsonl).unwrap();
    let o = predict(
        dir.path(),
        case,
        input.to_str().unwrap(),
        reg.to_str().unwrap(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{}", text(&o));
    let want = g["prediction"].as_array().unwrap();
    for i in [0, 2] {
        assert_eq!(lines[i]["prediction"].as_f64(), want[i].as_f64(), "row {i}");
    }
    let why = lines[1]["error"].as_str().unwrap();
    assert!(
        why.contains(&format!("feature '{}'", features[4])) && why.contains("missing: reject"),
        "{why}"
    );
}

/// `models info`: the loaded model's facts and importance, as text and JSON.
#[test]
fn models_info_prints_shape_trees_and_importance() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry_with(dir.path(), "lgb_binary", "lgb_binary.txt", "lightgbm", "");
    let reg = reg.to_str().unwrap();
    let o = ml_worker(
        dir.path(),
        &["models", "info", "lgb_binary", "--registry", reg, "--json"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "lightgbm");
    assert_eq!(v["n_classes"], 2);
    assert_eq!(v["missing"], "nan");
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
    let n = v["features"].as_array().unwrap().len();
    let gain = v["importance"]["gain"].as_array().unwrap();
    let split = v["importance"]["split"].as_array().unwrap();
    assert_eq!((gain.len(), split.len()), (n, n));
    let splits: f64 = split.iter().map(|x| x.as_f64().unwrap()).sum();
    assert!(splits > 0.0 && v["trees"].as_u64().unwrap() > 0, "{v}");
    let o = ml_worker(
        dir.path(),
        &["models", "info", "lgb_binary", "--registry", reg],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for k in [
        "kind         lightgbm",
        "classes      2",
        "trees",
        "GAIN",
        "SPLITS",
    ] {
        assert!(out.contains(k), "{k}: {out}");
    }
    // a format without importance says so; an unknown name is an error
    let reg = registry_with(dir.path(), "onnx_mlp", "onnx_mlp.onnx", "onnx", "");
    let reg = reg.to_str().unwrap();
    let o = ml_worker(
        dir.path(),
        &["models", "info", "onnx_mlp", "--registry", reg, "--json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["importance"].is_null() && v["trees"].is_null(), "{v}");
    assert_eq!(v["missing"], "reject");
    let o = ml_worker(dir.path(), &["models", "info", "nope", "--registry", reg]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("unknown model 'nope'"), "{}", text(&o));
}

#[test]
fn checksum_mismatch_is_refused_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let pin = format!("    sha256: \"{}\"\n", "0".repeat(64));
    let reg = registry_with(
        dir.path(),
        "lgb_regression",
        "lgb_regression.txt",
        "lightgbm",
        &pin,
    );
    let o = ml_worker(
        dir.path(),
        &["models", "verify", "--registry", reg.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("checksum mismatch") && out.contains(&"0".repeat(64)),
        "{out}"
    );
    let actual = ml_worker::checksum::sha256_file(&dir.path().join("lgb_regression.txt")).unwrap();
    assert!(
        out.contains(&actual),
        "error shows the actual checksum: {out}"
    );

    let o = ml_worker(dir.path(), &["audit", "show", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let refusal = rows
        .iter()
        .find(|r| r["event"] == "refuse")
        .expect("a refuse row");
    assert_eq!(refusal["model"], "lgb_regression");
    assert_eq!(refusal["sha256"], actual.as_str());
    assert!(
        !rows.iter().any(|r| r["event"] == "load"),
        "a refused model must not be loaded"
    );

    // predicting with it fails too, naming the reason
    let csv = fixture("lgb_regression.inputs.csv");
    let o = predict(
        dir.path(),
        "lgb_regression",
        csv.to_str().unwrap(),
        reg.to_str().unwrap(),
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("checksum mismatch"), "{}", text(&o));
}

#[test]
fn fallback_serves_when_the_primary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let g = golden("lgb_regression");
    std::fs::copy(fixture("lgb_regression.txt"), dir.path().join("good.txt")).unwrap();
    std::fs::write(dir.path().join("bad.txt"), "tree\nversion=v4\n").unwrap();
    let features = serde_json::to_string(&g["features"]).unwrap();
    let entry = |name: &str, file: &str, extra: &str| {
        format!("  - name: \"{name}\"\n    path: \"{file}\"\n    kind: \"lightgbm\"\n    features: {features}\n    target: \"y\"\n    task_type: \"regression\"\n{extra}")
    };
    let yaml = format!(
        "models:\n{}{}",
        entry("primary", "bad.txt", "    fallback: \"backup\"\n"),
        entry("backup", "good.txt", "")
    );
    std::fs::write(dir.path().join("models.yaml"), yaml).unwrap();
    let csv = fixture("lgb_regression.inputs.csv");
    let o = predict(dir.path(), "primary", csv.to_str().unwrap(), "models.yaml");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("fallback 'backup'"), "{}", text(&o));
    let o = ml_worker(dir.path(), &["audit", "show"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.lines()
            .any(|l| l.contains("fallback") && l.contains("primary")),
        "{out}"
    );
}

#[test]
fn broken_model_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixture("lgb_binary.txt")).unwrap();
    let xgb = std::fs::read(fixture("xgb_regression.json")).unwrap();
    let ubj = std::fs::read(fixture("xgb_regression.ubj")).unwrap();
    let onnx = std::fs::read(fixture("onnx_mlp.onnx")).unwrap();
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "lgb_binary",
            "lightgbm",
            good[..good.len() / 2].to_vec(),
            "LightGBM",
        ),
        (
            "lgb_binary",
            "lightgbm",
            b"\x80\x04\x95garbage".to_vec(),
            "LightGBM",
        ),
        ("lgb_binary", "lightgbm", Vec::new(), "LightGBM"),
        (
            "xgb_regression",
            "xgboost",
            xgb[..xgb.len() - 100].to_vec(),
            "XGBoost",
        ),
        (
            "xgb_regression",
            "xgboost",
            ubj[..ubj.len() / 3].to_vec(),
            "XGBoost",
        ),
        (
            "xgb_regression",
            "xgboost",
            b"{\"learner\": 5}".to_vec(),
            "XGBoost",
        ),
        // the right bytes under the wrong kind
        ("xgb_regression", "lightgbm", xgb.clone(), "LightGBM"),
        ("lgb_binary", "xgboost", good.clone(), "XGBoost"),
        ("onnx_mlp", "onnx", onnx[..onnx.len() / 2].to_vec(), "ONNX"),
        ("onnx_mlp", "onnx", good.clone(), "ONNX"),
    ];
    for (i, (case, kind, bytes, what)) in cases.into_iter().enumerate() {
        let file = format!("broken{i}.bin");
        std::fs::write(fixture_tmp(dir.path(), &file), &bytes).unwrap();
        let g = golden(case);
        let yaml = format!(
            "models:\n  - name: \"m\"\n    path: \"{file}\"\n    kind: \"{kind}\"\n    features: {}\n    target: \"y\"\n    task_type: \"{}\"\n",
            serde_json::to_string(&g["features"]).unwrap(),
            g["task_type"].as_str().unwrap()
        );
        std::fs::write(dir.path().join("models.yaml"), yaml).unwrap();
        let o = ml_worker(
            dir.path(),
            &["models", "verify", "--registry", "models.yaml"],
        );
        let out = text(&o);
        assert_eq!(o.status.code(), Some(1), "case {i}: {out}");
        assert!(
            out.contains("FAILED") && out.contains(what) && out.contains(&file),
            "case {i}: {out}"
        );
        assert!(!out.contains("panicked"), "case {i}: {out}");
    }
}

fn fixture_tmp(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[test]
fn feature_count_mismatch_and_unsupported_kinds_are_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("lgb_regression.txt"), dir.path().join("m.txt")).unwrap();
    let yaml = "models:\n  - name: \"short\"\n    path: \"m.txt\"\n    kind: \"lightgbm\"\n    features: [\"a\", \"b\"]\n    target: \"y\"\n    task_type: \"regression\"\n  - name: \"pk\"\n    path: \"m.txt\"\n    kind: \"pickle\"\n    features: [\"a\"]\n    target: \"y\"\n    task_type: \"regression\"\n  - name: \"pt\"\n    path: \"m.txt\"\n    kind: \"torch\"\n    features: [\"a\"]\n    target: \"y\"\n    task_type: \"regression\"\n";
    std::fs::write(dir.path().join("models.yaml"), yaml).unwrap();
    let o = ml_worker(
        dir.path(),
        &["models", "verify", "--registry", "models.yaml"],
    );
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("model 'short'") && out.contains("'features' lists 2 features"),
        "{out}"
    );
    assert!(
        out.contains("model 'pk'") && out.contains("not a valid pickle model"),
        "{out}"
    );
    // a LightGBM text file registered as torch is not TorchScript
    assert!(
        out.contains("model 'pt'") && out.contains("not a valid TorchScript model"),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn bad_registry_files_name_file_model_and_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("lgb_regression.txt"), dir.path().join("m.txt")).unwrap();
    let base = "models:\n  - name: \"a\"\n    path: \"m.txt\"\n    kind: \"lightgbm\"\n    features: [\"age\"]\n    target: \"y\"\n    task_type: \"regression\"\n";
    for (yaml, needles) in [
        (
            "models: [\n".to_string(),
            vec!["models.yaml", "invalid YAML"],
        ),
        (
            base.replace("lightgbm", "sklearn"),
            vec![
                "model 'a'",
                "'kind'",
                "unknown kind 'sklearn'",
                "catboost, lightgbm",
            ],
        ),
        (
            base.replace("m.txt", "missing.txt"),
            vec!["model 'a'", "'path'", "missing.txt", "does not exist"],
        ),
        (
            format!("{base}    bogus: 1\n"),
            vec!["unknown field", "bogus"],
        ),
        (
            format!("{base}{}", base.replace("models:\n", "")),
            vec!["model 'a'", "duplicate"],
        ),
    ] {
        std::fs::write(dir.path().join("models.yaml"), &yaml).unwrap();
        let o = ml_worker(dir.path(), &["models", "list", "--registry", "models.yaml"]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(2), "{out}");
        for n in needles {
            assert!(out.contains(n), "missing {n:?} in: {out}");
        }
        assert!(!out.contains("panicked"), "{out}");
    }
}

#[test]
fn a_missing_file_is_named_once_with_its_reason_once() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["models", "list", "--registry", "nope.yaml"][..],
        &["run", "--config", "nope.yaml"][..],
    ] {
        let o = ml_worker(dir.path(), args);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(2), "{out}");
        assert!(out.contains("nope.yaml: cannot read"), "{out}");
        assert_eq!(out.matches("(os error 2)").count(), 1, "{out}");
    }
}

#[test]
fn wrong_csv_header_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry_with(
        dir.path(),
        "lgb_regression",
        "lgb_regression.txt",
        "lightgbm",
        "",
    );
    let csv = dir.path().join("bad.csv");
    std::fs::write(&csv, "age,sex,colour\n1,2,3\n").unwrap();
    let o = predict(
        dir.path(),
        "lgb_regression",
        csv.to_str().unwrap(),
        reg.to_str().unwrap(),
    );
    let out = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains("bad.csv") && out.contains("lacks feature column") && out.contains("bmi"),
        "{out}"
    );
    let o = predict(
        dir.path(),
        "nope",
        csv.to_str().unwrap(),
        reg.to_str().unwrap(),
    );
    assert!(text(&o).contains("unknown model 'nope'"), "{}", text(&o));
}

#[test]
fn audit_verify_detects_a_row_edited_in_the_sqlite3_shell() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry_with(
        dir.path(),
        "lgb_regression",
        "lgb_regression.txt",
        "lightgbm",
        "",
    );
    let o = ml_worker(
        dir.path(),
        &["models", "verify", "--registry", reg.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = ml_worker(dir.path(), &["audit", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("ok: 3 rows"),
        "verify, load, unload: {}",
        text(&o)
    );

    let db = dir.path().join("audit.db");
    let sqlite3 = |sql: &str| {
        Command::new("sqlite3")
            .arg(&db)
            .arg(sql)
            .output()
            .expect("the sqlite3 shell is installed (.ci/run installs it)")
    };
    // the database itself refuses the edit
    let o = sqlite3("UPDATE audit_log SET sha256 = 'forged' WHERE id = 1;");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("append-only"),
        "{}",
        text(&o)
    );
    // someone who drops the trigger can edit, but verify notices
    let o = sqlite3(
        "DROP TRIGGER audit_log_no_update; UPDATE audit_log SET sha256 = 'forged' WHERE id = 1;",
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = ml_worker(dir.path(), &["audit", "verify"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("row 1") && out.contains("edited"), "{out}");
}

#[test]
fn without_onnx_runtime_onnx_models_fail_with_a_fix_and_others_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let reg = root().join("config/models.yaml");
    let o = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args(["models", "verify", "--registry", reg.to_str().unwrap()])
        .current_dir(dir.path())
        .env("ML_WORKER_AUDIT_DB", dir.path().join("audit.db"))
        .env(
            "ORT_DYLIB_PATH",
            dir.path().join("no-such-libonnxruntime.so"),
        )
        .output()
        .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let onnx_line = out
        .lines()
        .find(|l| l.starts_with("wine_rf"))
        .expect("wine_rf line");
    assert!(
        onnx_line.contains("FAILED") && onnx_line.contains("make onnxruntime"),
        "{onnx_line}"
    );
    for name in ["diabetes_lgbm", "breast_cancer_xgb"] {
        let line = out.lines().find(|l| l.starts_with(name)).unwrap();
        assert!(line.contains(" ok: "), "{line}");
    }
}

#[test]
fn a_reader_that_stops_early_is_not_an_error_and_the_unload_is_audited() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let reg = registry_with(
        dir.path(),
        "lgb_regression",
        "lgb_regression.txt",
        "lightgbm",
        "",
    );
    // enough rows to overflow the pipe buffer after the reader is gone
    let mut csv = std::fs::read_to_string(fixture("lgb_regression.inputs.csv")).unwrap();
    let body: String = csv.lines().skip(1).map(|l| format!("{l}\n")).collect();
    for _ in 0..200 {
        csv.push_str(&body);
    }
    let input = dir.path().join("many.csv");
    std::fs::write(&input, csv).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args([
            "predict",
            "--model",
            "lgb_regression",
            "--input",
            input.to_str().unwrap(),
        ])
        .args(["--registry", reg.to_str().unwrap()])
        .current_dir(dir.path())
        .env("ML_WORKER_AUDIT_DB", dir.path().join("audit.db"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"row\":0"), "{first}");
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = ml_worker(dir.path(), &["audit", "show"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("unload"),
        "{}",
        text(&o)
    );
}

#[test]
fn audit_store_edits_the_chain_cannot_hide_are_refused_at_open_and_found_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry_with(
        dir.path(),
        "lgb_regression",
        "lgb_regression.txt",
        "lightgbm",
        "",
    );
    let anchor = dir.path().join("anchor.log");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ml-worker"))
            .args(args)
            .current_dir(dir.path())
            .env("ML_WORKER_AUDIT_DB", dir.path().join("audit.db"))
            .env("ML_WORKER_AUDIT_ANCHOR", &anchor)
            .output()
            .unwrap()
    };
    let verify_models = ["models", "verify", "--registry", reg.to_str().unwrap()];
    let o = run(&verify_models);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&["audit", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("reaches its anchor"), "{}", text(&o));
    let head = std::fs::read_to_string(&anchor)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string();
    assert!(text(&o).contains(&head), "{}", text(&o));

    let db = dir.path().join("audit.db");
    let sqlite3 = |sql: &str| {
        let o = Command::new("sqlite3")
            .arg(&db)
            .arg(sql)
            .output()
            .expect("the sqlite3 shell is installed (.ci/run installs it)");
        assert!(o.status.success(), "{}", text(&o));
    };
    // a trigger that makes every later audit row vanish: refused at open,
    // so no model loads unaudited
    sqlite3("CREATE TRIGGER hide BEFORE INSERT ON audit_log BEGIN SELECT RAISE(IGNORE); END;");
    let o = run(&verify_models);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("tampered") && text(&o).contains("unexpected trigger 'hide'"),
        "{}",
        text(&o)
    );
    let o = run(&["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("unexpected trigger 'hide'"),
        "{}",
        text(&o)
    );
    sqlite3("DROP TRIGGER hide;");

    // every row deleted and the sequence reset: the anchor (and the head
    // from the log) still say what was there
    sqlite3(
        "DROP TRIGGER audit_log_no_delete; DELETE FROM audit_log; DELETE FROM sqlite_sequence; \
         CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END;",
    );
    let o = run(&["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("0 rows checked") && text(&o).contains("not in the store"),
        "{}",
        text(&o)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args(["audit", "verify", "--head", &head])
        .current_dir(dir.path())
        .env("ML_WORKER_AUDIT_DB", &db)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // and the store no longer opens for loading models
    let o = run(&verify_models);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not in the store"), "{}", text(&o));
}

/// `ml-worker bench` with small numbers on the embedded broker: every
/// latency round has the pass-through floor's and the worker's percentiles,
/// and every event is accounted for (backlog and rate events read back, the
/// bench fails otherwise). Speed is not asserted.
#[test]
fn bench_reports_floor_and_worker_latency_per_round() {
    let dir = tempfile::tempdir().unwrap();
    let config = root().join("config/worker.yaml");
    let samples = root().join("models/samples");
    let o = ml_worker(
        dir.path(),
        &[
            "bench",
            "--config",
            config.to_str().unwrap(),
            "--samples",
            samples.to_str().unwrap(),
            "--events",
            "5000",
            "--rounds",
            "1",
            "--latency-rounds",
            "2",
            "--backlog",
            "3000",
            "--rate",
            "2000",
            "--latency-secs",
            "1",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["brokers"], "embedded", "{j}");
    assert_eq!(j["round_ratios"].as_array().unwrap().len(), 1, "{j}");
    assert!(j["ratio"].as_f64().unwrap() > 0.0, "{j}");
    let rounds = j["latency_rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{j}");
    let ordered = |p: &serde_json::Value| {
        let v: Vec<f64> = ["p50_ms", "p99_ms", "p999_ms", "max_ms"]
            .iter()
            .map(|k| p[k].as_f64().unwrap_or_else(|| panic!("{k} in {p}")))
            .collect();
        assert!(v.windows(2).all(|w| w[0] <= w[1]), "{p}");
    };
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["round"], i + 1);
        // which side goes first alternates
        assert_eq!(r["first"], if i % 2 == 0 { "floor" } else { "worker" });
        for side in ["floor", "worker"] {
            let p = &r[side];
            assert_eq!(p["events"], 2000, "round {} {side}: {p}", i + 1);
            assert_eq!(p["backlog_read"], 3000, "round {} {side}: {p}", i + 1);
            assert!(p["catch_up_ms"].as_f64().is_some(), "{p}");
            ordered(p);
        }
        assert!(r["p50_diff_ms"].as_f64().is_some(), "{r}");
        assert!(r["p99_diff_ms"].as_f64().is_some(), "{r}");
    }
    for overall in ["floor_latency", "worker_latency"] {
        assert_eq!(j[overall]["events"], 4000, "{j}");
        ordered(&j[overall]);
    }
    assert_eq!(j["latency_events"], 4000, "{j}");
}

/// A wrong `sha256` pin is a deployment mistake: `run` refuses to start,
/// naming the model, the file and both checksums, instead of reporting
/// ready and dead-lettering the model's events; `optional: true` starts.
#[test]
fn a_wrong_pin_refuses_start_up_unless_the_model_is_optional() {
    let dir = tempfile::tempdir().unwrap();
    let pin = format!("    sha256: \"{}\"\n", "0".repeat(64));
    let cfg = std::fs::read_to_string(root().join("config/worker.yaml"))
        .unwrap()
        .replace("audit_db: \"../data/audit.db\"", "audit_db: \"audit.db\"")
        .replace("address: \"127.0.0.1:9100\"", "address: \"127.0.0.1:0\"");
    assert!(cfg.contains("audit_db: \"audit.db\"") && cfg.contains("127.0.0.1:0"));
    std::fs::write(dir.path().join("worker.yaml"), cfg).unwrap();
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_ml-worker"))
            .args(["run", "--config", "worker.yaml"])
            .current_dir(dir.path())
            .env("ML_WORKER_AUDIT_KEY", "pin-test-key-0123456789abcdef")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    registry_with(
        dir.path(),
        "lgb_regression",
        "lgb_regression.txt",
        "lightgbm",
        &pin,
    );
    let mut child = start();
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the worker started with a wrong pin");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    for want in [
        "model 'lgb_regression'",
        "checksum mismatch",
        &"0".repeat(64),
        "not starting",
        "optional: true",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    // optional: it starts (the model is refused and audited)
    registry_with(
        dir.path(),
        "lgb_regression",
        "lgb_regression.txt",
        "lightgbm",
        &format!("{pin}    optional: true\n"),
    );
    let mut child = start();
    let lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let mut seen = Vec::new();
    for line in lines.map_while(Result::ok) {
        if line.contains("consuming from") {
            break;
        }
        seen.push(line);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "{seen:#?}"
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !seen.iter().any(|l| l.contains("not starting")),
        "{seen:#?}"
    );
}

/// A model whose file is missing, with a fallback: the registry opens, the
/// fallback serves it, and `models verify` says why the model failed.
#[test]
fn a_missing_file_with_a_fallback_is_served_by_the_fallback() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("lgb_regression.txt"), dir.path().join("m.txt")).unwrap();
    let g = golden("lgb_regression");
    let features = serde_json::to_string(&g["features"]).unwrap();
    let yaml = format!(
        "models:\n  - name: gone\n    path: gone.txt\n    kind: lightgbm\n    features: {features}\n    target: y\n    task_type: regression\n    fallback: fb\n  - name: fb\n    path: m.txt\n    kind: lightgbm\n    features: {features}\n    target: y\n    task_type: regression\n"
    );
    std::fs::write(dir.path().join("models.yaml"), yaml).unwrap();
    let o = ml_worker(
        dir.path(),
        &["models", "verify", "--registry", "models.yaml"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().find(|l| l.starts_with("gone")).unwrap();
    assert!(
        line.contains("FAILED")
            && line.contains("gone.txt")
            && line.contains("served by fallback 'fb'"),
        "{line}"
    );
    let csv = dir.path().join("rows.csv");
    std::fs::copy(fixture("lgb_regression.inputs.csv"), &csv).unwrap();
    let o = predict(dir.path(), "gone", csv.to_str().unwrap(), "models.yaml");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("predicting with its fallback 'fb'"),
        "{}",
        text(&o)
    );
}

/// Every command finds the store `run --config` uses: `models verify`,
/// `predict` and `audit show` given `--config` read the worker file's
/// `registry` and `audit_db` (relative to its folder) from any working
/// directory, say which store they use, and the store records absolute,
/// canonical model paths.
#[test]
fn commands_given_the_worker_config_share_its_audit_store() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    registry_with(
        &conf,
        "lgb_regression",
        "lgb_regression.txt",
        "lightgbm",
        "",
    );
    // the model file named through a `..` path
    let yaml = std::fs::read_to_string(conf.join("models.yaml"))
        .unwrap()
        .replace(
            "path: \"lgb_regression.txt\"",
            "path: \"../conf/lgb_regression.txt\"",
        );
    std::fs::write(conf.join("models.yaml"), yaml).unwrap();
    let cfg = std::fs::read_to_string(root().join("config/worker.yaml"))
        .unwrap()
        .replace(
            "audit_db: \"../data/audit.db\"",
            "audit_db: \"state/audit.db\"",
        );
    std::fs::write(conf.join("worker.yaml"), cfg).unwrap();
    let config = conf.join("worker.yaml");
    let config = config.to_str().unwrap();
    let store = std::fs::canonicalize(&conf).unwrap().join("state/audit.db");
    // no ML_WORKER_AUDIT_DB here: the config's store is the default
    let ml_worker = |cwd: &Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ml-worker"))
            .args(args)
            .current_dir(cwd)
            .env_remove("ML_WORKER_AUDIT_DB")
            .env("ML_WORKER_AUDIT_KEY", "shared-store-key-0123456789abcdef")
            .output()
            .unwrap()
    };
    let o = ml_worker(&elsewhere, &["models", "verify", "--config", config]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("audit store {}", store.display())),
        "{}",
        text(&o)
    );
    let input = fixture("lgb_regression.inputs.csv");
    let o = ml_worker(
        dir.path(),
        &[
            "predict",
            "--model",
            "lgb_regression",
            "--input",
            input.to_str().unwrap(),
            "--config",
            config,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = ml_worker(&elsewhere, &["audit", "show", "--json", "--config", config]);
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // verify and load rows from both commands, in the one store
    let loads = rows.iter().filter(|r| r["event"] == "load").count();
    assert!(loads >= 2, "{rows:#?}");
    let canonical = std::fs::canonicalize(conf.join("lgb_regression.txt")).unwrap();
    for r in &rows {
        assert_eq!(r["path"], canonical.display().to_string(), "{r}");
    }
    assert!(store.exists());
}

/// `bench --soak`: a steady offered rate, a line per window (throughput,
/// latency percentiles, RSS), and every offered event out.
#[test]
fn bench_soak_reports_windows_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = root().join("config/worker.yaml");
    let samples = root().join("models/samples");
    let o = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args([
            "bench", "--soak", "3s", "--rate", "1000", "--json", "--config",
        ])
        .arg(&config)
        .arg("--samples")
        .arg(&samples)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["offered"], 3000, "{r}");
    assert_eq!(r["received"], r["offered"], "{r}");
    assert_eq!(r["dead_letters"], 0, "{r}");
    let windows = r["windows"].as_array().unwrap();
    assert!(!windows.is_empty(), "{r}");
    for w in windows {
        assert!(w["rss_mib"].as_f64().unwrap() > 0.0, "{w}");
        assert!(
            w["p999_ms"].as_f64().unwrap() >= w["p50_ms"].as_f64().unwrap(),
            "{w}"
        );
    }
}
