//! Damaged model files never panic the readers: thousands of deterministic
//! mutations (byte flips, truncations, deleted and duplicated lines) of real
//! fixture files must each give either a model that evaluates without
//! panicking or a clear error.

use std::path::Path;

use ml_worker::model::tree::{ParsedTrees, TreeEnsemble};
use ml_worker::model::{lightgbm, xgboost, ModelError};

mod common;

use common::{mutate, Rng};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn exercise(ens: &TreeEnsemble) {
    let nf = ens.n_features.min(1000);
    if nf != ens.n_features {
        return;
    }
    let rows: Vec<f64> = (0..4 * nf)
        .map(|i| [0.0, f64::NAN, -1e6, 1e6, 3.0][i % 5])
        .collect();
    let out = ens.transformed(&rows, 4);
    assert_eq!(out.len(), 4 * ens.n_groups);
}

/// Mutates each file 400 times; every result must parse into a model that
/// evaluates, or fail with an error naming the file.
fn survive(
    seed: u64,
    names: &[&str],
    parse: impl Fn(&[u8], &Path) -> Result<ParsedTrees, ModelError>,
) {
    let mut rng = Rng(seed);
    let (mut ok, mut refused) = (0, 0);
    for name in names {
        let original = fixture(name);
        for _ in 0..400 {
            let bytes = mutate(&mut rng, &original);
            match parse(&bytes, Path::new(name)) {
                Ok(p) => {
                    exercise(&p.ensemble);
                    ok += 1;
                }
                Err(e) => {
                    assert!(e.to_string().contains(name), "{e}");
                    refused += 1;
                }
            }
        }
    }
    assert!(refused > 100 && ok > 10, "ok {ok}, refused {refused}");
}

#[test]
fn damaged_lightgbm_files_never_panic() {
    survive(
        0x1234_5678_9abc_def1,
        &[
            "lgb_binary.txt",
            "lgb_categorical.txt",
            "lgb_multiclass.txt",
        ],
        |b, p| {
            let text = std::str::from_utf8(b)
                .map_err(|e| ModelError::Input(format!("{}: {e}", p.display())))?;
            lightgbm::parse(text, p)
        },
    );
}

#[test]
fn damaged_xgboost_files_never_panic() {
    survive(
        0x0fed_cba9_8765_4321,
        &[
            "xgb_multiclass.json",
            "xgb_categorical.ubj",
            "xgb_binary.ubj",
            "xgb_categorical.json",
        ],
        xgboost::parse,
    );
}
