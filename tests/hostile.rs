//! Hostile model files (tests/fixtures/hostile, written by
//! tools/hostile_fixtures.py with the real libraries) through the real
//! binary: nothing of a refused file runs, no host file is read or
//! written, memory stays bounded, and every refusal names what was wrong.
//!
//! Each test runs `ml-worker` in a scratch working directory that holds a
//! `hostile_target.sh` and a `config/worker.yaml` with a secret: the files
//! the hostile models try to write and read.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn hostile(name: &str) -> PathBuf {
    root().join("tests/fixtures/hostile").join(name)
}

const TARGET: &str = "#!/bin/sh\necho safe\n";
const SECRET: &str =
    "kafka:\n  librdkafka: {sasl.password: \"hunter2-hunter2-hunter2-hunter2-hunter2\"}\n";

/// A scratch working directory with the bait files.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hostile_target.sh"), TARGET).unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/worker.yaml"), SECRET).unwrap();
    dir
}

fn assert_bait_untouched(dir: &Path) {
    assert_eq!(
        std::fs::read_to_string(dir.join("hostile_target.sh")).unwrap(),
        TARGET,
        "the model wrote a host file"
    );
}

/// One model registered in `dir/models.yaml`.
fn registry(dir: &Path, path: &Path, kind: &str, n_features: usize, extra: &str) -> PathBuf {
    let features: Vec<String> = (0..n_features).map(|i| format!("\"f{i}\"")).collect();
    let yaml = format!(
        "models:\n  - name: \"m\"\n    path: \"{}\"\n    kind: \"{kind}\"\n    features: [{}]\n    target: \"y\"\n    task_type: \"regression\"\n{extra}",
        path.display(),
        features.join(", ")
    );
    let p = dir.join("models.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

struct Run {
    code: Option<i32>,
    out: String,
    /// Peak resident memory of the process, in KiB.
    max_rss_kb: i64,
}

/// Runs `ml-worker ARGS` in `dir`, and measures its peak memory.
fn ml_worker(dir: &Path, args: &[&str]) -> Run {
    let out_path = dir.join(".stdout");
    let err_path = dir.join(".stderr");
    // reaped with wait4 below, which also gives its peak memory
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args(args)
        .current_dir(dir)
        .env("ML_WORKER_AUDIT_DB", dir.join("audit.db"))
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run ml-worker");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain libc call on our own child; `rusage` is written by it
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    let code = if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else {
        None
    };
    let out = format!(
        "{}{}",
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    Run {
        code,
        out,
        max_rss_kb: usage.ru_maxrss,
    }
}

/// `ml-worker predict --model m --input in.csv --registry REG` in `dir`.
fn predict(dir: &Path, registry: &Path) -> Run {
    ml_worker(
        dir,
        &[
            "predict",
            "--model",
            "m",
            "--input",
            "in.csv",
            "--registry",
            registry.to_str().unwrap(),
        ],
    )
}

fn verify(dir: &Path, registry: &Path) -> Run {
    ml_worker(
        dir,
        &["models", "verify", "--registry", registry.to_str().unwrap()],
    )
}

/// `models verify` fails for the one model, saying all of `needles`.
fn assert_refused(run: &Run, needles: &[&str]) {
    assert_eq!(run.code, Some(1), "{}", run.out);
    assert!(run.out.contains("FAILED"), "{}", run.out);
    for n in needles {
        assert!(run.out.contains(n), "missing {n:?} in: {}", run.out);
    }
    assert!(!run.out.contains("panicked"), "{}", run.out);
}

#[cfg(feature = "torch")]
#[test]
fn torchscript_that_reaches_the_host_is_refused_before_anything_of_it_runs() {
    for (file, op) in [
        ("ts_file_writer.pt", "aten::from_file"),
        ("ts_file_reader.pt", "aten::from_file"),
        // libtorch's loader would run this __setstate__ while loading
        ("ts_setstate_writer.pt", "__setstate__"),
        ("ts_hook_reader.pt", "aten::from_file"),
        ("ts_fork.pt", "prim::fork"),
        ("ts_uninitialised.pt", "aten::empty"),
    ] {
        let dir = scratch();
        let reg = registry(dir.path(), &hostile(file), "torch", 4, "");
        let run = verify(dir.path(), &reg);
        assert_refused(&run, &["refused before anything of it ran", op]);
        assert_bait_untouched(dir.path());
        // the refusal is audited
        let audit = ml_worker(dir.path(), &["audit", "show"]);
        assert!(audit.out.contains("refuse"), "{file}: {}", audit.out);
        // and predict refuses it the same way
        std::fs::write(dir.path().join("in.csv"), "f0,f1,f2,f3\n1,0,0,0\n").unwrap();
        let run = predict(dir.path(), &reg);
        assert_eq!(run.code, Some(2), "{file}: {}", run.out);
        assert!(run.out.contains(op), "{file}: {}", run.out);
        assert!(!run.out.contains("hunter2"), "{file}: {}", run.out);
        assert_bait_untouched(dir.path());
    }
}

#[cfg(feature = "torch")]
#[test]
fn torchscript_code_that_attacks_libtorch_itself_is_refused_before_it_runs() {
    let dir = scratch();
    for (file, why) in [
        // an object read through an unrelated class: out-of-bounds memory
        (
            "ts_type_confusion.pt",
            "prim::unchecked_cast from __torch__.",
        ),
        // the parser recurses per bracket: a stack overflow aborts the process
        ("ts_deep_nesting.pt", "brackets nested deeper than 200"),
        // 2^24 nodes once inlined: gigabytes and minutes in libtorch's compiler
        (
            "ts_exponential_inlining.pt",
            "expands to more than 200,000 graph nodes",
        ),
    ] {
        let reg = registry(dir.path(), &hostile(file), "torch", 4, "");
        let t = std::time::Instant::now();
        let run = verify(dir.path(), &reg);
        assert_refused(&run, &[why]);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "{file}: {:?}",
            t.elapsed()
        );
        assert!(
            run.max_rss_kb < 400 * 1024,
            "{file}: {} MiB",
            run.max_rss_kb / 1024
        );
    }
    // a model's warning cannot forge a log line: it is one escaped line
    let reg = registry(
        dir.path(),
        &hostile("ts_warning_forges_log.pt"),
        "torch",
        4,
        "",
    );
    let run = verify(dir.path(), &reg);
    assert_eq!(run.code, Some(0), "{}", run.out);
    assert!(!run.out.contains('\x1b'), "{}", run.out);
    let forged: Vec<&str> = run
        .out
        .lines()
        .filter(|l| l.contains("audit_head=1:forged"))
        .collect();
    assert!(!forged.is_empty(), "{}", run.out);
    for l in forged {
        assert!(
            l.contains("libtorch warning:"),
            "a forged line of its own: {l}"
        );
    }
}

#[cfg(feature = "torch")]
#[test]
fn a_non_finite_output_is_an_error_for_its_row_not_a_number() {
    let dir = scratch();
    let reg = registry(dir.path(), &hostile("ts_reciprocal.pt"), "torch", 2, "");
    std::fs::write(dir.path().join("in.csv"), "f0,f1\n2,0\n0,1\n4,1\n").unwrap();
    let run = predict(dir.path(), &reg);
    assert_eq!(run.code, Some(1), "{}", run.out);
    let lines: Vec<serde_json::Value> = run
        .out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{}", run.out);
    assert_eq!(lines[0]["prediction"], 0.5);
    assert!(lines[1]["error"]
        .as_str()
        .unwrap()
        .contains("non-finite value (inf)"));
    assert!(lines[1].get("prediction").is_none());
    assert_eq!(lines[2]["prediction"], 0.25);
    assert!(
        run.out.contains("1 of 3 row(s) have no prediction"),
        "{}",
        run.out
    );
}

#[cfg(feature = "torch")]
#[test]
fn a_torchscript_model_that_crashes_libtorch_fails_its_call_and_the_process_carries_on() {
    // INT64_MIN // -1 in TorchScript: the CPU faults (SIGFPE) inside
    // libtorch, which would end the worker; it ends the model's own process
    let dir = scratch();
    let reg = registry(dir.path(), &hostile("ts_sigfpe.pt"), "torch", 4, "");
    let run = verify(dir.path(), &reg);
    assert_eq!(run.code, Some(0), "zeros pass: {}", run.out);
    assert!(run.out.contains("in its own process"), "{}", run.out);
    std::fs::write(dir.path().join("in.csv"), "f0,f1,f2,f3\n1,1,1,1\n").unwrap();
    let run = predict(dir.path(), &reg);
    assert_eq!(run.code, Some(2), "{}", run.out);
    assert!(
        run.out
            .contains("the model's process died of signal 8 (SIGFPE"),
        "{}",
        run.out
    );
    assert!(!run.out.contains("panicked"), "{}", run.out);
    // (tests/worker.rs shows a worker serving on after such a crash)
}

/// The model's folder for the ONNX external-data tests: `models/` in the
/// scratch directory, with the model copied in.
fn onnx_model_dir(dir: &Path, file: &str) -> PathBuf {
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::copy(hostile(file), models.join(file)).unwrap();
    models.join(file)
}

#[test]
fn onnx_external_data_is_read_from_the_model_folder_only() {
    // the attack: location "config/worker.yaml", which ONNX Runtime would
    // resolve against the working directory (where the secret is)
    let dir = scratch();
    let model = onnx_model_dir(dir.path(), "onnx_external_reads_config.onnx");
    let reg = registry(dir.path(), &model, "onnx", 4, "");
    let run = verify(dir.path(), &reg);
    assert_refused(
        &run,
        &["external data 'config/worker.yaml'", "model's folder"],
    );
    assert!(!run.out.contains("hunter2"), "{}", run.out);
    assert_bait_untouched(dir.path());

    for (file, why) in [
        // data_location as a varint ONNX Runtime reads as EXTERNAL
        (
            "onnx_external_wide_location.onnx",
            "external data 'config/worker.yaml'",
        ),
        ("onnx_external_parent.onnx", "leaves the model's folder"),
        ("onnx_external_absolute.onnx", "absolute path"),
    ] {
        let model = onnx_model_dir(dir.path(), file);
        let reg = registry(dir.path(), &model, "onnx", 4, "");
        assert_refused(&verify(dir.path(), &reg), &[why]);
    }
}

#[test]
fn onnx_external_data_beside_the_model_works_and_is_audited() {
    let dir = scratch();
    let model = onnx_model_dir(dir.path(), "onnx_external_sibling.onnx");
    let weights = dir.path().join("models/onnx_external_sibling.weights");
    std::fs::copy(hostile("onnx_external_sibling.weights"), &weights).unwrap();
    let reg = registry(dir.path(), &model, "onnx", 4, "");
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(hostile("onnx_external_sibling.golden.json")).unwrap(),
    )
    .unwrap();
    let mut csv = String::from("f0,f1,f2,f3\n");
    for row in golden["inputs"].as_array().unwrap() {
        let r: Vec<String> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.to_string())
            .collect();
        csv.push_str(&r.join(","));
        csv.push('\n');
    }
    std::fs::write(dir.path().join("in.csv"), csv).unwrap();
    // a regression model with 4 outputs: predict prints the vector
    let run = predict(dir.path(), &reg);
    assert_eq!(run.code, Some(0), "{}", run.out);
    let want = golden["outputs"].as_array().unwrap();
    let got: Vec<serde_json::Value> = run
        .out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        for (a, b) in g["prediction"]
            .as_array()
            .unwrap()
            .iter()
            .zip(w.as_array().unwrap())
        {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
    // the external file's checksum is in the load row
    let sha = ml_worker_checksum(&weights);
    let audit = ml_worker(dir.path(), &["audit", "show"]);
    assert!(
        audit
            .out
            .contains("external data 'onnx_external_sibling.weights'"),
        "{}",
        audit.out
    );
    assert!(audit.out.contains(&sha), "{}", audit.out);

    // the same weights through a symbolic link are refused
    std::fs::remove_file(&weights).unwrap();
    std::fs::copy(
        hostile("onnx_external_sibling.weights"),
        dir.path().join("elsewhere.weights"),
    )
    .unwrap();
    std::os::unix::fs::symlink(dir.path().join("elsewhere.weights"), &weights).unwrap();
    assert_refused(&verify(dir.path(), &reg), &["symbolic link"]);
}

fn ml_worker_checksum(p: &Path) -> String {
    ml_worker::checksum::sha256_file(p).unwrap()
}

#[test]
fn memory_bombs_are_refused_within_bounded_memory() {
    let dir = scratch();
    // a 2 GiB sparse file: refused from its size, never read
    let sparse = dir.path().join("sparse.txt");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let mut peaks = Vec::new();
    for (path, kind, n, needles) in [
        (
            hostile("xgb_ubj_null_bomb.ubj"),
            "xgboost",
            4,
            &["more than", "values"][..],
        ),
        (
            hostile("pkl_forest_memo_bomb.pkl"),
            "pickle",
            4,
            &["tree nodes"][..],
        ),
        (
            hostile("lgb_max_feature_idx.txt"),
            "lightgbm",
            10,
            &["max_feature_idx=9999999", "more than 1000000 features"][..],
        ),
        (
            sparse.clone(),
            "lightgbm",
            10,
            &[
                "2147483648 bytes, more than the limit",
                "limits.max_model_mb",
            ][..],
        ),
    ] {
        let reg = registry(dir.path(), &path, kind, n, "");
        let run = verify(dir.path(), &reg);
        assert_refused(&run, needles);
        peaks.push((path.file_name().unwrap().to_owned(), run.max_rss_kb));
        assert!(
            run.max_rss_kb < 400 * 1024,
            "{path:?} took {} MiB",
            run.max_rss_kb / 1024
        );
    }
    eprintln!("peak memory of the refused bombs (KiB): {peaks:?}");
}

#[test]
fn paths_that_are_not_regular_files_are_named_for_what_they_are() {
    let dir = scratch();
    let fifo = dir.path().join("model.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (path, what) in [
        (dir.path().join("config"), "is a directory"),
        (fifo, "is a FIFO (named pipe)"),
        (PathBuf::from("/dev/zero"), "is a character device"),
    ] {
        let reg = registry(dir.path(), &path, "lightgbm", 10, "");
        let run = verify(dir.path(), &reg);
        assert_eq!(run.code, Some(2), "{}", run.out);
        assert!(run.out.contains(what), "{}", run.out);
        assert!(!run.out.contains("does not exist"), "{}", run.out);
    }
}

#[test]
fn non_finite_parameters_and_impossible_shapes_are_refused_at_load() {
    let dir = scratch();
    for (file, kind, n, task, needle) in [
        (
            "lgb_nan_leaves.txt",
            "lightgbm",
            10,
            "regression",
            "leaf 0 has value NaN",
        ),
        (
            "xgb_nan_base_score.json",
            "xgboost",
            30,
            "classification",
            "base score",
        ),
        (
            "xgb_nan_split.json",
            "xgboost",
            30,
            "classification",
            "threshold NaN",
        ),
        (
            "lgb_multiclass_one_class.txt",
            "lightgbm",
            13,
            "classification",
            "num_class=1",
        ),
    ] {
        let reg = registry(dir.path(), &hostile(file), kind, n, "");
        let yaml = std::fs::read_to_string(&reg).unwrap().replace(
            "task_type: \"regression\"",
            &format!("task_type: \"{task}\""),
        );
        std::fs::write(&reg, yaml).unwrap();
        let run = verify(dir.path(), &reg);
        assert_refused(&run, &[needle]);
    }
}

#[test]
fn loads_and_inference_calls_that_never_end_are_cut_off_at_their_deadlines() {
    let dir = scratch();
    // the load's warm-up row enters a Loop that never ends
    let reg = registry(
        dir.path(),
        &hostile("onnx_loop_forever.onnx"),
        "onnx",
        4,
        "    load_timeout_ms: 1500\n",
    );
    let t = std::time::Instant::now();
    let run = verify(dir.path(), &reg);
    assert_refused(
        &run,
        &["did not finish within its deadline of 1500 ms (load_timeout_ms)"],
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    let audit = ml_worker(dir.path(), &["audit", "show"]);
    assert!(audit.out.contains("load_timeout_ms"), "{}", audit.out);

    // models that load (zeros pass) but never return on a positive row:
    // ONNX Runtime's run is terminated, libtorch's loop is abandoned
    std::fs::write(dir.path().join("in.csv"), "f0,f1,f2,f3\n1,1,1,1\n").unwrap();
    let mut cases = vec![("onnx_loop_on_positive.onnx", "onnx")];
    if cfg!(feature = "torch") {
        cases.push(("ts_loop_on_positive.pt", "torch"));
    }
    for (file, kind) in cases {
        let reg = registry(
            dir.path(),
            &hostile(file),
            kind,
            4,
            "    inference_timeout_ms: 500\n",
        );
        let t = std::time::Instant::now();
        let run = predict(dir.path(), &reg);
        assert_eq!(run.code, Some(2), "{file}: {}", run.out);
        assert!(
            run.out
                .contains("inference did not finish within its deadline of 500 ms"),
            "{file}: {}",
            run.out
        );
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "{file}: {:?}",
            t.elapsed()
        );
    }
}

#[test]
fn a_librdkafka_plugin_in_the_config_is_refused_and_never_loaded() {
    let dir = scratch();
    // a shared library whose constructor leaves a mark
    let mark = dir.path().join("constructor-ran");
    let src = dir.path().join("evil.c");
    std::fs::write(
        &src,
        format!(
            "#include <stdio.h>\n__attribute__((constructor)) static void evil(void) {{ FILE *f = fopen(\"{}\", \"w\"); if (f) fclose(f); }}\n\
             int conf_init(void *conf, void **plug_opaquep, char *errstr, size_t errstr_size) {{ return 0; }}\n",
            mark.display()
        ),
    )
    .unwrap();
    let so = dir.path().join("evil.so");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&src)
        .status()
        .expect("a C compiler");
    assert!(built.success());
    let shipped = std::fs::read_to_string(root().join("config/worker.yaml")).unwrap();
    let yaml = shipped
        .replace(
            "librdkafka: {}",
            &format!(
                "librdkafka: {{\"plugin.library.paths\": \"{}\"}}",
                so.display()
            ),
        )
        .replace(
            "registry: \"models.yaml\"",
            &format!(
                "registry: \"{}\"",
                root().join("config/models.yaml").display()
            ),
        );
    assert_ne!(yaml, shipped);
    let cfg = dir.path().join("worker.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let run = ml_worker(dir.path(), &["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(run.code, Some(2), "{}", run.out);
    assert!(
        run.out.contains(
            "kafka.librdkafka.plugin.library.paths': is refused: it loads shared libraries"
        ),
        "{}",
        run.out
    );
    assert!(!mark.exists(), "the plugin's constructor ran");
}

#[test]
fn control_characters_from_files_are_escaped_in_everything_printed() {
    let dir = scratch();
    // a model file whose objective carries a terminal escape and a carriage
    // return (to overwrite the line with a forged "ok"), and a version with
    // the same in models.yaml
    let text = std::fs::read_to_string(root().join("tests/fixtures/lgb_regression.txt")).unwrap();
    let forged = text.replace("objective=regression", "objective=regression\x1b[2K\rok:");
    assert_ne!(forged, text);
    let model = dir.path().join("forged.txt");
    std::fs::write(&model, forged).unwrap();
    let good = root().join("tests/fixtures/lgb_regression.txt");
    let yaml = format!(
        "models:\n  - name: \"forged\"\n    path: \"{}\"\n    kind: \"lightgbm\"\n    features: [{f}]\n    target: \"y\"\n    task_type: \"regression\"\n  - name: \"versioned\"\n    path: \"{}\"\n    kind: \"lightgbm\"\n    features: [{f}]\n    target: \"y\"\n    task_type: \"regression\"\n    version: \"v1\\e[2K\\rok\"\n",
        model.display(),
        good.display(),
        f = (0..10).map(|i| format!("\"f{i}\"")).collect::<Vec<_>>().join(", ")
    );
    let reg = dir.path().join("models.yaml");
    std::fs::write(&reg, yaml).unwrap();
    let runs = [
        verify(dir.path(), &reg),
        ml_worker(
            dir.path(),
            &["models", "list", "--registry", reg.to_str().unwrap()],
        ),
        ml_worker(dir.path(), &["audit", "show"]),
    ];
    for run in &runs {
        assert!(
            !run.out.contains('\x1b') && !run.out.contains('\r'),
            "raw control characters in: {:?}",
            run.out
        );
    }
    assert!(
        runs[0]
            .out
            .contains("unknown objective 'regression\\u{1b}[2K'"),
        "{}",
        runs[0].out
    );
    assert!(runs[1].out.contains("v1\\u{1b}[2K\\rok"), "{}", runs[1].out);
    assert!(runs[2].out.contains("v1\\u{1b}[2K\\rok"), "{}", runs[2].out);
}

#[test]
fn sigterm_is_honoured_within_the_drain_deadline_while_a_model_call_hangs() {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    use std::io::BufRead;
    let dir = scratch();
    // a model stuck in its inference call far longer than the drain deadline
    let reg = registry(
        dir.path(),
        &hostile("onnx_loop_on_positive.onnx"),
        "onnx",
        4,
        "    inference_timeout_ms: 120000\n",
    );
    let shipped = std::fs::read_to_string(root().join("config/worker.yaml")).unwrap();
    let yaml = shipped
        .replace(
            "registry: \"models.yaml\"",
            &format!("registry: \"{}\"", reg.display()),
        )
        .replace("audit_db: \"../data/audit.db\"", "audit_db: \"audit.db\"")
        .replace("address: \"127.0.0.1:9100\"", "address: \"127.0.0.1:0\"")
        .replace("shutdown_timeout_ms: 10000", "shutdown_timeout_ms: 2000");
    let cfg = dir.path().join("worker.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ml-worker"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let brokers = loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the worker starts");
        if let Some(rest) = line.strip_prefix("ml-worker: consuming from ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let e = ml_worker::events::FeatureEvent {
        event_id: "hang-1".into(),
        model: "m".into(),
        symbol: "S".into(),
        event_time: ml_worker::loadgen::now_ms(),
        features: (0..4).map(|i| (format!("f{i}"), 1.0)).collect(),
    };
    let mut value = Vec::new();
    ml_worker::loadgen::encode_feature(ml_worker::events::WireFormat::AvroRaw, &e, &mut value);
    let p: ThreadedProducer<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    p.send(BaseRecord::<(), [u8]>::to("features").payload(&value[..]))
        .unwrap();
    p.flush(std::time::Duration::from_secs(10)).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2)); // the call is under way
    let t = std::time::Instant::now();
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(8),
            "still running {:?} after SIGTERM with a 2 s drain deadline",
            t.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
