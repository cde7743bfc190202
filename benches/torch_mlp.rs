//! The shipped PyTorch MLP (models/wine_mlp.pt, TorchScript, 13-32-16-3)
//! through ml-worker's torch backend, batches of 1 and 1,000 rows, one
//! intra-op thread: float64 rows in, float32 tensor, forward, softmax,
//! probabilities and class out, as the worker calls it. Each iteration takes
//! the next batch from a pool of 10,000 distinct rows. `tools/bench_torch.py`
//! does the same in Python torch (same model, rows and thread count);
//! `make bench-models` runs both and prints the ratio.

use std::path::Path;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ml_worker::config::load_registry_file;
use ml_worker::model::Batch;
use ml_worker::registry::{Registry, RegistryOptions};

/// The xorshift stream of benches/tree_eval.rs, without missing values.
fn rows(n: usize, nf: usize) -> Vec<f64> {
    let mut state = 0x9e3779b97f4a7c15u64;
    (0..n * nf)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.2
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let specs = load_registry_file(&root.join("config/models.yaml")).expect("shipped registry");
    let spec = specs
        .into_iter()
        .filter(|s| s.name == "wine_mlp")
        .collect::<Vec<_>>();
    let reg = Registry::from_specs(spec, None, RegistryOptions::default());
    let model = reg.get("wine_mlp").expect("wine_mlp loads").model;
    let nf = model.info().features.len();
    let mut g = c.benchmark_group("torch_wine_mlp");
    const POOL: usize = 10_000;
    let pool = rows(POOL, nf);
    for batch in [1usize, 1000] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(BenchmarkId::new("native", batch), |b| {
            let mut at = 0;
            b.iter(|| {
                if at + batch > POOL {
                    at = 0;
                }
                let data = &pool[at * nf..(at + batch) * nf];
                at += batch;
                black_box(model.predict_full(Batch::new(black_box(data), nf).unwrap()))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
