//! Damaged model files never panic the readers: thousands of deterministic
//! mutations (byte flips, truncations, deleted and duplicated lines) of real
//! fixture files must each give either a model that evaluates without
//! panicking or a clear error.

use std::path::Path;

use ml_worker::model::tree::{ParsedTrees, TreeEnsemble};
use ml_worker::model::{lightgbm, xgboost, ModelError};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn mutate(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    match rng.below(4) {
        0 => {
            // flip a few bytes
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
        }
        1 => b.truncate(rng.below(b.len())),
        2 => {
            // replace a byte with a digit or separator, the likeliest to parse
            let i = rng.below(b.len());
            b[i] = b"0123456789-. ,[]{}"[rng.below(18)];
        }
        _ => {
            // drop or duplicate a line
            let lines: Vec<&[u8]> = bytes.split(|c| *c == b'\n').collect();
            let k = rng.below(lines.len());
            let mut out = Vec::new();
            for (i, l) in lines.iter().enumerate() {
                if i == k && rng.below(2) == 0 {
                    continue;
                }
                out.extend_from_slice(l);
                out.push(b'\n');
                if i == k {
                    out.extend_from_slice(l);
                    out.push(b'\n');
                }
            }
            b = out;
        }
    }
    b
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
