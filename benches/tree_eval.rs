//! Native tree evaluator throughput on the shipped 150-tree LightGBM model,
//! for batches of 1, 100 and 10,000 rows. Each iteration takes the next
//! batch from a pool of 10,000 distinct rows (as a stream would bring new
//! rows), so no run is helped by branch predictors learning repeated data. `tools/bench_reference.py` runs
//! LightGBM's own `Booster.predict` (one thread) on the same model and rows;
//! `make bench-models` runs both and prints the ratio. The `served` rows
//! run the same model as the registry serves it (loaded through its
//! `ModelLoader`, behind `ServedModel`'s width, missing-value and shape
//! checks), to show what the plug-in boundary costs.

mod common;

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use ml_worker::model::lightgbm;

fn bench(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/diabetes_lgbm.txt");
    let text = std::fs::read_to_string(&path)
        .expect("models/diabetes_lgbm.txt (run tools/make_fixtures.py)");
    let parsed = lightgbm::parse(&text, &path).expect("valid model");
    let ens = parsed.ensemble;
    let nf = ens.n_features;
    let mut g = c.benchmark_group(format!("lightgbm_{}_trees", ens.n_trees()));
    let pool = common::rows(common::POOL, nf, true);
    common::bench_batches(&mut g, &pool, nf, &[1, 100, 10_000], |data, n| {
        ens.transformed(data, n)
    });
    let specs = ml_worker::config::load_registry_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("config/models.yaml"),
    )
    .expect("shipped registry");
    let spec: Vec<_> = specs
        .into_iter()
        .filter(|s| s.name == "diabetes_lgbm")
        .collect();
    let reg = ml_worker::registry::Registry::from_specs(spec, None, Default::default());
    let served = reg.get("diabetes_lgbm").expect("diabetes_lgbm loads").model;
    common::bench_batches_as("served", &mut g, &pool, nf, &[1, 100, 10_000], |data, _| {
        served.predict_full(ml_worker::model::Batch::new(data, nf).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
