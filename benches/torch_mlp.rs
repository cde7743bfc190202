//! The shipped PyTorch MLP (models/wine_mlp.pt, TorchScript, 13-32-16-3)
//! through ml-worker's torch backend, batches of 1 and 1,000 rows, one
//! intra-op thread: float64 rows in, float32 tensor, forward, softmax,
//! probabilities and class out, as the worker calls it. Each iteration takes
//! the next batch from a pool of 10,000 distinct rows. `tools/bench_torch.py`
//! does the same in Python torch (same model, rows and thread count);
//! `make bench-models` runs both and prints the ratio.
//!
//! The worker runs each torch model in a process of its own (see
//! src/model/torch/host.rs); `in-process` runs the same model loaded in
//! the benchmark's own process, to show what the isolation costs.

mod common;

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use ml_worker::config::load_registry_file;
use ml_worker::model::torch::{TorchModel, TorchOptions, TorchSpec};
use ml_worker::model::{Batch, Model};
use ml_worker::registry::{Registry, RegistryOptions};

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
    let pool = common::rows(common::POOL, nf, false);
    common::bench_batches(&mut g, &pool, nf, &[1, 1000], |data, _| {
        model.predict_full(Batch::new(data, nf).unwrap())
    });
    // the same model without the process boundary
    let spec = &load_registry_file(&root.join("config/models.yaml"))
        .expect("shipped registry")
        .into_iter()
        .find(|s| s.name == "wine_mlp")
        .expect("wine_mlp");
    let bytes = std::fs::read(&spec.path).expect("wine_mlp.pt");
    let torch_spec = TorchSpec {
        name: spec.name.clone(),
        path: spec.path.clone(),
        n_features: nf,
        task_type: spec.task_type,
        options: spec
            .options
            .get::<TorchOptions>()
            .cloned()
            .expect("torch options"),
    };
    let (local, _) = TorchModel::load(&torch_spec, &bytes).expect("loads in process");
    common::bench_batches_as("in-process", &mut g, &pool, nf, &[1, 1000], |data, _| {
        local.predict(Batch::new(data, nf).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
