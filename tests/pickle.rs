//! Pickles are read as data, never run: hostile files are refused with a
//! clear error naming what they reference, the refusal is audited, no
//! payload runs (a payload that would create a file; the file does not
//! appear, while Python's own unpickler does create it), and nothing panics.
//! Golden predictions of the allowlisted classes are in golden.rs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ml_worker::audit::AuditStore;
use ml_worker::config::parse_registry;
use ml_worker::registry::{Registry, RegistryOptions};

/// Where the hostile fixtures' payloads write (tools/pickle_fixtures.py).
const PWNED: &str = "/tmp/ml-worker-pickle-payload-ran";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn entry(name: &str, path: &Path, task: &str) -> String {
    format!(
        "  - name: {name}\n    path: \"{}\"\n    kind: pickle\n    features: [\"x\"]\n    target: y\n    task_type: {task}\n",
        path.display()
    )
}

fn hostile(name: &str) -> PathBuf {
    fixtures().join("hostile").join(format!("{name}.pkl"))
}

/// (fixture, what the refusal must name)
const HOSTILE: &[(&str, &[&str])] = &[
    ("os_system", &["could run code", "posix.system"]),
    ("subprocess_call", &["could run code", "subprocess.call"]),
    ("builtins_eval", &["could run code", "builtins.eval"]),
    ("builtins_exec", &["could run code", "builtins.exec"]),
    (
        "builtins_getattr",
        &["could run code", "builtins.getattr", "builtins.__import__"],
    ),
    (
        "importlib_import",
        &["could run code", "importlib.import_module"],
    ),
    ("marshal_loads", &["could run code", "marshal.loads"]),
    ("model_with_payload", &["could run code", "posix.system"]),
    (
        "unsupported_svr",
        &["outside the allowlist", "sklearn.svm._classes.SVR", "ONNX"],
    ),
    ("truncated", &["not a valid pickle model", "truncated"]),
    (
        "deep_nesting",
        &["not a valid pickle model", "not a model object"],
    ),
    (
        "deep_lists",
        &["not a valid pickle model", "not a model object"],
    ),
    (
        "huge_length",
        &["not a valid pickle model", "declared length"],
    ),
    (
        "huge_bytes8",
        &["not a valid pickle model", "declared length"],
    ),
    (
        "not_a_pickle",
        &["not a valid pickle model", "protocol 2 or later"],
    ),
    (
        "empty",
        &["not a valid pickle model", "protocol 2 or later"],
    ),
    (
        "joblib_compressed",
        &[
            "not a valid pickle model",
            "a compressed file (zlib",
            "without compress",
        ],
    ),
];

#[test]
fn hostile_pickles_are_refused_naming_why_audited_and_nothing_runs() {
    let _ = std::fs::remove_file(PWNED);
    let dir = tempfile::tempdir().unwrap();
    let audit = Arc::new(AuditStore::open(&dir.path().join("a.db"), "w").unwrap());
    let yaml = format!(
        "models:\n{}",
        HOSTILE
            .iter()
            .map(|(n, _)| entry(n, &hostile(n), "regression"))
            .collect::<String>()
    );
    let specs = parse_registry(&yaml, Path::new("test.yaml"), &fixtures()).unwrap();
    let reg = Registry::from_specs(specs, Some(audit.clone()), RegistryOptions::default());
    for (name, want) in HOSTILE {
        let e = match reg.get(name) {
            Ok(_) => panic!("{name} loaded"),
            Err(e) => e.to_string(),
        };
        for w in *want {
            assert!(e.contains(w), "{name}: '{w}' not in: {e}");
        }
        let rows = audit.rows(Some(name), None).unwrap();
        assert!(
            rows.iter()
                .any(|r| r.event == "refuse" && r.detail.contains(want[0])),
            "{name}: no refusal in the audit store: {:?}",
            rows.iter()
                .map(|r| (&r.event, &r.detail))
                .collect::<Vec<_>>()
        );
    }
    assert!(
        !Path::new(PWNED).exists(),
        "a payload ran: {PWNED} was created"
    );
}

/// The payload is real: Python's own unpickler runs it (and creates the
/// file); ml-worker, given the same file, does not.
#[test]
fn the_os_system_payload_is_live_under_python_and_inert_here() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("created-by-payload");
    // the fixtures' payloads touch PWNED; this one aims at the test's folder
    let file = dir.path().join("payload.pkl");
    let mut bin = vec![0x80, 2];
    bin.extend_from_slice(b"cposix\nsystem\n");
    let cmd = format!("touch {}", marker.display());
    bin.push(b'X');
    bin.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    bin.extend_from_slice(cmd.as_bytes());
    bin.extend_from_slice(b"\x85R.");
    std::fs::write(&file, &bin).unwrap();

    let yaml = format!("models:\n{}", entry("p", &file, "regression"));
    let specs = parse_registry(&yaml, Path::new("test.yaml"), dir.path()).unwrap();
    let reg = Registry::from_specs(specs, None, RegistryOptions::default());
    let e = reg.get("p").err().expect("refused").to_string();
    assert!(e.contains("posix.system"), "{e}");
    assert!(!marker.exists(), "ml-worker ran the payload");

    let python = Command::new("python3")
        .args([
            "-c",
            "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))",
        ])
        .arg(&file)
        .status();
    match python {
        Ok(s) if s.success() => assert!(
            marker.exists(),
            "Python unpickled the file but the payload did not run: the test proves nothing"
        ),
        other => eprintln!("python3 not available ({other:?}); the live check is skipped"),
    }
}

#[test]
fn models_verify_lists_the_pickled_class_and_its_native_form() {
    let dir = tempfile::tempdir().unwrap();
    let diabetes = r#"["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]"#;
    let wine = r#"["alcohol", "malic_acid", "ash", "alcalinity_of_ash", "magnesium", "total_phenols", "flavanoids", "nonflavanoid_phenols", "proanthocyanins", "color_intensity", "hue", "od280_od315_of_diluted_wines", "proline"]"#;
    let yaml = format!(
        "models:\n  - name: gb\n    path: \"{}\"\n    kind: pickle\n    features: {diabetes}\n    target: y\n    task_type: regression\n  - name: logreg\n    path: \"{}\"\n    kind: pickle\n    features: {wine}\n    target: y\n    task_type: classification\n  - name: booster\n    path: \"{}\"\n    kind: pickle\n    features: {diabetes}\n    target: y\n    task_type: regression\n    missing: nan\n  - name: evil\n    path: \"{}\"\n    kind: pickle\n    features: [x]\n    target: y\n    task_type: regression\n",
        fixtures().join("pkl_gradient_boosting_regressor.pkl").display(),
        fixtures().join("pkl_logreg_multinomial.pkl").display(),
        fixtures().join("pkl_xgb_booster.pkl").display(),
        hostile("os_system").display(),
    );
    std::fs::write(dir.path().join("models.yaml"), yaml).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args(["models", "verify", "--registry", "models.yaml"])
        .current_dir(dir.path())
        .env("ML_WORKER_AUDIT_DB", dir.path().join("audit.db"))
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(1), "{out}");
    for want in [
        "pickle sklearn.ensemble._gb.GradientBoostingRegressor -> native tree evaluator (40 stages",
        "pickle sklearn.pipeline.Pipeline(MinMaxScaler, LogisticRegression) -> native linear model (softmax, 3 classes)",
        "pickle xgboost.core.Booster -> native XGBoost evaluator (reg:squarederror, 20 trees)",
        "posix.system",
    ] {
        assert!(out.contains(want), "'{want}' not in:\n{out}");
    }
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn a_pickle_whose_task_or_width_differs_from_the_registry_is_refused() {
    let diabetes = r#"["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]"#;
    let file = fixtures().join("pkl_ridge.pkl");
    let yaml = format!(
        "models:\n  - name: as_classifier\n    path: \"{p}\"\n    kind: pickle\n    features: {diabetes}\n    target: y\n    task_type: classification\n  - name: narrow\n    path: \"{p}\"\n    kind: pickle\n    features: [a, b]\n    target: y\n    task_type: regression\n",
        p = file.display()
    );
    let specs = parse_registry(&yaml, Path::new("test.yaml"), &fixtures()).unwrap();
    let reg = Registry::from_specs(specs, None, RegistryOptions::default());
    let e = reg.get("as_classifier").err().unwrap().to_string();
    assert!(
        e.contains("task_type is classification but the pickle holds a regressor"),
        "{e}"
    );
    let e = reg.get("narrow").err().unwrap().to_string();
    assert!(
        e.contains("lists 2 features but the pickled model has 10"),
        "{e}"
    );
}

#[test]
fn protocol_5_out_of_band_buffers_are_read_when_given_and_refused_when_absent() {
    use ml_worker::model::pickle::{numpy, reader};
    let data = std::fs::read(fixtures().join("oob_array.pkl")).unwrap();
    let buf = std::fs::read(fixtures().join("oob_array.buf0")).unwrap();
    let g = reader::read_with_buffers(&data, vec![buf], reader::Limits::default()).unwrap();
    let a = numpy::array(&g, g.root).unwrap();
    assert_eq!(a.shape, vec![3, 4]);
    let want: Vec<f64> = (0..12).map(|i| i as f64 * 0.5).collect();
    assert_eq!(a.f64s().unwrap(), want);
    let e = reader::read(&data).unwrap_err().to_string();
    assert!(e.contains("out-of-band buffer #0"), "{e}");
}
