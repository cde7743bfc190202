//! Native tree evaluator throughput on the shipped 150-tree LightGBM model,
//! for batches of 1, 100 and 10,000 rows. Each iteration takes the next
//! batch from a pool of 10,000 distinct rows (as a stream would bring new
//! rows), so no run is helped by branch predictors learning repeated data. `tools/bench_reference.py` runs
//! LightGBM's own `Booster.predict` (one thread) on the same model and rows;
//! `make bench-models` runs both and prints the ratio.

use std::path::Path;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ml_worker::model::lightgbm;

/// Deterministic rows in roughly the training range (standardised diabetes
/// features), with about 5% missing values.
fn rows(n: usize, nf: usize) -> Vec<f64> {
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n * nf)
        .map(|_| {
            if next() < 0.05 {
                f64::NAN
            } else {
                (next() - 0.5) * 0.2
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/diabetes_lgbm.txt");
    let text = std::fs::read_to_string(&path)
        .expect("models/diabetes_lgbm.txt (run tools/make_fixtures.py)");
    let parsed = lightgbm::parse(&text, &path).expect("valid model");
    let ens = parsed.ensemble;
    let nf = ens.n_features;
    let mut g = c.benchmark_group(format!("lightgbm_{}_trees", ens.n_trees()));
    const POOL: usize = 10_000;
    let pool = rows(POOL, nf);
    for batch in [1usize, 100, 10_000] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(BenchmarkId::new("native", batch), |b| {
            let mut at = 0;
            b.iter(|| {
                if at + batch > POOL {
                    at = 0;
                }
                let data = &pool[at * nf..(at + batch) * nf];
                at += batch;
                black_box(ens.transformed(black_box(data), batch))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
