use ml_worker::model::lightgbm;
use std::path::Path;
use std::time::Instant;
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
fn main() {
    let path = Path::new("models/diabetes_lgbm.txt");
    let ens = lightgbm::parse(&std::fs::read_to_string(path).unwrap(), path)
        .unwrap()
        .ensemble;
    let nf = ens.n_features;
    let base = rows(100, nf);
    let rep: Vec<f64> = base.iter().cycle().take(10000 * nf).cloned().collect();
    for (name, data, n) in [
        ("100", rows(100, nf), 100),
        ("1000", rows(1000, nf), 1000),
        ("10000", rows(10000, nf), 10000),
        ("10000rep", rep, 10000),
    ] {
        let t = Instant::now();
        let mut k = 0;
        while t.elapsed().as_secs_f64() < 2.0 {
            std::hint::black_box(ens.transformed(&data, n));
            k += 1;
        }
        println!(
            "{name}: {:.3} us/row",
            t.elapsed().as_secs_f64() * 1e6 / (k * n) as f64
        );
    }
}
