//! A torch model's own process (`ml-worker torch-host`): confined by its
//! seccomp filter, started in `/`, and gone with the model. One test in
//! this binary, so that the processes it sees are its own.
#![cfg(feature = "torch")]

use std::path::Path;

use ml_worker::config::parse_registry;
use ml_worker::model::Batch;
use ml_worker::registry::{Registry, RegistryOptions};

/// Torch hosts (`ml-worker torch-host`) this process started and has not
/// reaped, with their `/proc/PID/status`.
fn torch_hosts() -> Vec<(u32, String)> {
    let me = std::process::id().to_string();
    let mut hosts = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let parent = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .map(str::trim);
        if parent == Some(me.as_str()) && cmdline.windows(10).any(|w| w == b"torch-host") {
            hosts.push((pid, status));
        }
    }
    hosts
}

#[test]
fn each_model_runs_in_a_confined_process_of_its_own_which_ends_with_it() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let yaml = r#"models:
  - name: confined
    path: torch_mlp_regressor.pt
    kind: torch
    features: ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
    target: y
    task_type: regression
    torch: {intra_op_threads: 2}
"#;
    let specs = parse_registry(yaml, Path::new("test.yaml"), &fixtures).unwrap();
    let reg = Registry::from_specs(specs, None, RegistryOptions::default());
    let m = reg.get("confined").unwrap().model;
    assert!(
        m.info().detail.contains("in its own process"),
        "{}",
        m.info().detail
    );
    // two intra-op threads start under the filter and compute
    let p = m
        .predict(Batch::new(&[0.01; 10 * 64], 10).unwrap())
        .unwrap();
    assert_eq!(p.values.len(), 64);
    // a batch larger than the first shared memory (3.2 MB of rows): it
    // grows, and the rows' predictions are the ones they get on their own
    let rows: Vec<f64> = (0..40_000 * 10)
        .map(|i| ((i / 10) % 997) as f64 * 1e-4 + (i % 10) as f64 * 0.01)
        .collect();
    let big = m.predict(Batch::new(&rows, 10).unwrap()).unwrap();
    assert_eq!(big.values.len(), 40_000);
    for at in [0, 1, 996, 997, 39_999] {
        let one = m
            .predict(Batch::new(&rows[at * 10..at * 10 + 10], 10).unwrap())
            .unwrap();
        assert!(
            (one.values[0] - big.values[at]).abs() <= 1e-6 * one.values[0].abs().max(1.0),
            "row {at}: {} alone, {} in the batch",
            one.values[0],
            big.values[at]
        );
    }
    assert_eq!(
        big.values[0], big.values[997],
        "the same row, the same answer"
    );
    let hosts = torch_hosts();
    assert_eq!(hosts.len(), 1, "one model, one host: {hosts:?}");
    for (pid, status) in &hosts {
        // mode 2: a seccomp filter is installed
        assert!(
            status
                .lines()
                .any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
            "host {pid} is not filtered:\n{status}"
        );
        // the OOM killer's first choice
        let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
        assert_eq!(adj.trim(), "1000", "host {pid}");
        // started in /, with none of the worker's environment but libraries
        // and thread settings
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
        assert_eq!(cwd, Path::new("/"), "host {pid}");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let names: Vec<String> = environ
            .split(|b| *b == 0)
            .filter_map(|v| v.split(|b| *b == b'=').next())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .filter(|n| !n.is_empty())
            .collect();
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        // the test's own CARGO_* variables stayed behind
        assert!(
            !names.iter().any(|n| n.starts_with("CARGO"))
                && names.contains(&"ML_WORKER_TORCH_PARENT".to_string()),
            "host {pid} environment: {names:?}"
        );
    }
    let pid = hosts[0].0;
    drop(m);
    drop(reg);
    // the model is gone: so is its process, killed and reaped (no zombie)
    assert!(torch_hosts().is_empty());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "host {pid} left behind"
    );
}
