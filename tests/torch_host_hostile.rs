//! A torch host that lies: the worker treats what its model's process sends
//! back as untrusted (a libtorch bug turned into code execution would let a
//! model file write anything on the pipes). A shell script stands in for
//! the host (`ML_WORKER_TORCH_HOST`, process-wide: one test in this
//! binary); it answers the load and then replies with what a hostile host
//! could send. What this does not prove: that a real host is unable to send
//! these (the seccomp filter and `tests/torch_host.rs` cover that side).
#![cfg(feature = "torch")]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ml_worker::config::parse_registry;
use ml_worker::model::Batch;
use ml_worker::registry::{Registry, RegistryOptions};

/// A frame as `printf` writes it: length (u32 LE, tag included), tag, body.
fn frame(tag: u8, body: &[u8]) -> String {
    let mut bytes = ((body.len() + 1) as u32).to_le_bytes().to_vec();
    bytes.push(tag);
    bytes.extend_from_slice(body);
    bytes.iter().map(|b| format!("\\x{b:02x}")).collect()
}

fn loaded(n_outputs: u64) -> String {
    frame(
        b'l',
        format!(r#"{{"n_outputs":{n_outputs},"n_classes":null,"detail":"fake"}}"#).as_bytes(),
    )
}

/// An inline prediction reply: `width`, the values, no probabilities.
fn values(width: u32, vals: &[f64]) -> String {
    let mut body = width.to_le_bytes().to_vec();
    body.extend_from_slice(&(vals.len() as u32).to_le_bytes());
    for v in vals {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.push(0);
    frame(b'p', &body)
}

/// Loads a model through a fake host running `script` (after the load
/// reply `load`), and predicts 3 rows with it.
fn run(dir: &Path, name: &str, load: &str, script: &str) -> Result<Vec<f64>, String> {
    let host = dir.join(format!("{name}.sh"));
    std::fs::write(
        &host,
        format!("#!/bin/bash\nprintf '{load}'\nsleep 0.2\n{script}\nexec sleep 30\n"),
    )
    .unwrap();
    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::env::set_var("ML_WORKER_TORCH_HOST", &host);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let yaml = format!(
        r#"models:
  - name: {name}
    path: torch_mlp_regressor.pt
    kind: torch
    features: ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
    target: y
    task_type: regression
"#
    );
    let specs = parse_registry(&yaml, Path::new("test.yaml"), &fixtures).unwrap();
    let reg = Registry::from_specs(specs, None, RegistryOptions::default());
    let m = reg.get(name).map_err(|e| e.to_string())?.model;
    m.predict(Batch::new(&[0.01; 30], 10).unwrap())
        .map(|p| p.values)
        .map_err(|e| e.to_string())
}

/// This process's peak resident memory, in KiB.
fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn replies_from_a_lying_torch_host_are_errors_never_panics_or_unbounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // the honest fake: three rows, three values
    let ok = format!("printf '{}'", values(1, &[1.0, 2.0, 3.0]));
    assert_eq!(run(d, "honest", &loaded(1), &ok), Ok(vec![1.0, 2.0, 3.0]));

    // fewer values than rows (the worker would index past them)
    let short = format!("printf '{}'", values(1, &[1.0]));
    let e = run(d, "short", &loaded(1), &short).unwrap_err();
    assert!(
        e.contains("a reply that is not 1 output for each of 3 rows"),
        "{e}"
    );

    // another width than the model had at load, and a width of zero
    for (name, width, vals) in [("wide", 2, vec![0.0; 6]), ("zero", 0, vec![])] {
        let script = format!("printf '{}'", values(width, &vals));
        let e = run(d, name, &loaded(1), &script).unwrap_err();
        assert!(e.contains("a reply that is not 1 output"), "{name}: {e}");
    }

    // a frame header announcing 2 GiB: refused before anything is allocated
    let huge = "printf '\\xff\\xff\\xff\\x7fp'";
    let e = run(d, "huge", &loaded(1), huge).unwrap_err();
    assert!(
        e.contains("sent a malformed reply (a frame of 2147483647 bytes"),
        "{e}"
    );

    // a model said to have 2^64 - 1 outputs
    let e = run(d, "outputs", &loaded(u64::MAX), "").unwrap_err();
    assert!(e.contains("a torch model may have 1 to 65536"), "{e}");

    // error messages: one of 512 KiB is cut; one of 8 MiB is not read
    for (name, len) in [("long", 512usize << 10), ("longer", 8 << 20)] {
        let json = r#"{"kind":"Runtime","message":""}"#.len();
        let head: String = ((1 + json + len) as u32)
            .to_le_bytes()
            .iter()
            .chain(b"e")
            .map(|b| format!("\\x{b:02x}"))
            .collect();
        let script = format!(
            "printf '{head}'; printf '{{\"kind\":\"Runtime\",\"message\":\"'; \
             head -c {len} /dev/zero | tr '\\0' A; printf '\"}}'"
        );
        let e = run(d, name, &loaded(1), &script).unwrap_err();
        if len < 1 << 20 {
            assert!(
                e.len() < 5000 && e.ends_with(&format!("... ({len} bytes in all)")),
                "{}",
                &e[..200.min(e.len())]
            );
        } else {
            assert!(
                e.contains(&format!(
                    "sent a malformed reply (a frame of {} bytes",
                    1 + json + len
                )),
                "{}",
                &e[..200.min(e.len())]
            );
        }
    }

    // 64 MiB on stderr without a newline, then an answer: the worker keeps
    // one cut line, not the 64 MiB
    let before = peak_kib();
    let flood = format!(
        "head -c 67108864 /dev/zero | tr '\\0' B >&2; printf '{}'",
        values(1, &[4.0, 5.0, 6.0])
    );
    assert_eq!(run(d, "flood", &loaded(1), &flood), Ok(vec![4.0, 5.0, 6.0]));
    let grew = peak_kib().saturating_sub(before);
    assert!(grew < 32 << 10, "peak memory grew {grew} KiB");
}
