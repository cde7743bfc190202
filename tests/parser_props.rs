//! Bounded robustness runs (in CI) of the parsers the fuzzers in `fuzz/`
//! run for hours: thousands of deterministic mutations of real inputs each
//! give a result or an error, never a panic. Feature events (every wire
//! format, both decoders), the YAML configs, the UBJSON reader, and the ONNX
//! external-data rewriter (which must also never read outside its folder).

mod common;

use std::path::{Path, PathBuf};

use common::{mutate, Rng};
use ml_worker::events::{Codec, FeatureScan, SchemaIds, WireFormat};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path, keep: impl Fn(&Path) -> bool) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && keep(p))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no seeds in {}", dir.display());
    paths
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// `rounds` mutations (one to three edits) of every seed through `run`.
fn survive(seed: u64, seeds: &[Vec<u8>], rounds: usize, run: impl Fn(&[u8])) {
    let mut rng = Rng(seed);
    for s in seeds {
        run(s);
        for _ in 0..rounds {
            let mut b = mutate(&mut rng, s);
            for _ in 0..rng.below(3) {
                b = mutate(&mut rng, &b);
            }
            run(&b);
        }
    }
}

#[test]
fn damaged_feature_events_are_errors_in_every_format() {
    let seeds = files(&root().join("fuzz/seeds/feature_events"), |_| true);
    let ids = SchemaIds {
        feature: Some(1),
        ..SchemaIds::default()
    };
    let codecs: Vec<Codec> = [WireFormat::AvroRaw, WireFormat::Avro, WireFormat::Json]
        .into_iter()
        .map(|f| Codec::new(f, ids))
        .collect();
    survive(0x5eed_0001, &seeds, 1500, |b| {
        for c in &codecs {
            let mut scan = FeatureScan::default();
            let _ = c.scan_feature(b, &mut scan);
            let _ = c.decode_feature(b);
        }
    });
}

#[test]
fn damaged_configs_are_errors_naming_the_file() {
    let mut seeds = files(&root().join("config"), |p| {
        p.extension().is_some_and(|e| e == "yaml")
    });
    seeds.extend(files(&root().join("tests/fixtures/config/invalid"), |_| {
        true
    }));
    survive(0x5eed_0002, &seeds, 300, |b| {
        let Ok(text) = std::str::from_utf8(b) else {
            return;
        };
        if let Err(e) = ml_worker::config::parse_registry(text, Path::new("m.yaml"), Path::new("."))
        {
            assert!(e.to_string().contains("m.yaml"), "{e}");
        }
        let o = ml_worker::worker::config::Overrides::default();
        if let Err(e) =
            ml_worker::worker::config::parse_worker_config(text, Path::new("w.yaml"), &o)
        {
            assert!(e.to_string().contains("w.yaml"), "{e}");
        }
    });
}

#[test]
fn damaged_ubjson_decodes_or_fails_within_its_budget() {
    let seeds = files(&root().join("tests/fixtures"), |p| {
        p.extension().is_some_and(|e| e == "ubj")
    });
    survive(0x5eed_0003, &seeds, 400, |b| {
        let _ = ml_worker::model::ubjson::decode(b, 1 << 20);
    });
}

#[test]
fn damaged_onnx_models_never_make_the_rewriter_read_outside_its_folder() {
    let mut seeds = files(&root().join("tests/fixtures"), |p| {
        p.extension().is_some_and(|e| e == "onnx")
    });
    seeds.extend(files(&root().join("tests/fixtures/hostile"), |p| {
        p.extension().is_some_and(|e| e == "onnx")
    }));
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    std::fs::write(models.join("onnx_external_sibling.weights"), [1u8; 96]).unwrap();
    // a file outside the folder that a mutated location could name
    std::fs::write(dir.path().join("secret.bin"), [0x5au8; 96]).unwrap();
    survive(0x5eed_0004, &seeds, 300, |b| {
        if let Ok(Some((out, files))) =
            ml_worker::model::onnx::external::inline(b, &models, 1 << 20)
        {
            assert!(
                !out.windows(8).any(|w| w == [0x5a; 8]),
                "the secret was read"
            );
            for f in files {
                assert!(!f.location.contains(".."), "{f:?}");
            }
        }
    });
}
