//! What the model benchmarks share: the row stream (the Python reference
//! scripts in `tools/` generate the same rows) and the batch loop.

use criterion::measurement::WallTime;
use criterion::{black_box, BenchmarkGroup, BenchmarkId, Throughput};

/// Rows in the pool each benchmark draws its batches from.
pub const POOL: usize = 10_000;

/// Deterministic rows in roughly the training range (standardised
/// features): an xorshift stream, with about 5% missing values when
/// `with_missing`.
pub fn rows(n: usize, nf: usize, with_missing: bool) -> Vec<f64> {
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n * nf)
        .map(|_| {
            if with_missing && next() < 0.05 {
                f64::NAN
            } else {
                (next() - 0.5) * 0.2
            }
        })
        .collect()
}

/// One benchmark per batch size: each iteration scores the next `batch`
/// rows of `pool` (wrapping around), as a stream brings new rows, so no run
/// is helped by branch predictors learning repeated data.
pub fn bench_batches<T>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    pool: &[f64],
    nf: usize,
    batches: &[usize],
    score: impl FnMut(&[f64], usize) -> T,
) {
    bench_batches_as("native", g, pool, nf, batches, score)
}

/// [`bench_batches`] under another label.
pub fn bench_batches_as<T>(
    label: &str,
    g: &mut BenchmarkGroup<'_, WallTime>,
    pool: &[f64],
    nf: usize,
    batches: &[usize],
    mut score: impl FnMut(&[f64], usize) -> T,
) {
    let n_rows = pool.len() / nf;
    for &batch in batches {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(BenchmarkId::new(label, batch), |b| {
            let mut at = 0;
            b.iter(|| {
                if at + batch > n_rows {
                    at = 0;
                }
                let data = &pool[at * nf..(at + batch) * nf];
                at += batch;
                black_box(score(black_box(data), batch))
            })
        });
    }
}
