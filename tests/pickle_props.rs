//! Property test, bounded (runs in CI): the pickle reader and the allowlist
//! converters never panic on mangled input: fixture pickles with bytes
//! flipped, cut, inserted or spliced from another fixture, and random bytes.
//! Each result is a model or an error. `fuzz/` holds the coverage-guided
//! fuzzer for long runs.

use std::path::{Path, PathBuf};

use ml_worker::model::{pickle, Batch, TaskType};
use proptest::prelude::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn corpus() -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pkl"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// Reads and converts `bytes` as a pickle model; predicts a row if it loads.
fn exercise(bytes: &[u8], task: TaskType) {
    if let Ok(m) = pickle::load_unregistered(bytes, 10, task) {
        let _ = m.model.predict(Batch::new(&[0.5; 10], 10).unwrap());
    }
}

#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
    Splice(usize, usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        any::<usize>().prop_map(Edit::Cut),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(a, b, c)| Edit::Splice(a, b, c)),
    ]
}

fn apply(mut data: Vec<u8>, edits: &[Edit], corpus: &[Vec<u8>]) -> Vec<u8> {
    for e in edits {
        let n = data.len().max(1);
        match e {
            Edit::Flip(i, b) => {
                if !data.is_empty() {
                    data[i % n] ^= b | 1;
                }
            }
            Edit::Cut(i) => data.truncate(i % n),
            Edit::Insert(i, b) => {
                let at = i % (data.len() + 1);
                data.splice(at..at, b.iter().copied());
            }
            Edit::Splice(f, from, len) => {
                let other = &corpus[f % corpus.len()];
                if !other.is_empty() {
                    let s = from % other.len();
                    let e = (s + len % 256).min(other.len());
                    let at = from % (data.len() + 1);
                    data.splice(at..at, other[s..e].iter().copied());
                }
            }
        }
    }
    data
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mangled_pickles_never_panic(which in any::<usize>(), edits in proptest::collection::vec(edit(), 1..6), classify in any::<bool>()) {
        let corpus = corpus();
        let base = corpus[which % corpus.len()].clone();
        let data = apply(base, &edits, &corpus);
        let task = if classify { TaskType::Classification } else { TaskType::Regression };
        exercise(&data, task);
    }

    #[test]
    fn random_bytes_after_a_proto_header_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut data = vec![0x80, 4];
        data.extend(body);
        exercise(&data, TaskType::Regression);
    }
}
