//! The two tree evaluators agree bit for bit: QuickScorer (used for
//! ensembles of numerical trees with at most 64 leaves) and the tree walk
//! (everything else), on every LightGBM and XGBoost fixture, under each
//! split flavour, on rows built to sit on and around every threshold, at
//! f32 rounding boundaries, zeros of both signs, infinities and NaN.
//! The golden tests compare both paths with the libraries themselves.

use std::path::Path;

use ml_worker::model::tree::{
    FlavorKind, LocalSplit, LocalTree, TreeEnsemble, DEFAULT_LEFT, FAST, MISSING_NAN,
};
use ml_worker::model::{lightgbm, xgboost};

fn fixture(name: &str) -> TreeEnsemble {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let bytes = std::fs::read(&path).unwrap();
    let parsed = if name.ends_with(".txt") {
        lightgbm::parse(std::str::from_utf8(&bytes).unwrap(), &path)
    } else {
        xgboost::parse(&bytes, &path)
    };
    parsed.unwrap_or_else(|e| panic!("{name}: {e}")).ensemble
}

/// Rows whose values are the model's thresholds, their f64 and f32
/// neighbours, special values and pseudo-random values in the threshold
/// range, mixed across features.
fn probe_rows(ens: &TreeEnsemble) -> (Vec<f64>, usize) {
    let nf = ens.n_features;
    let mut per_feature: Vec<Vec<f64>> = vec![
        vec![
            0.0,
            -0.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e-36,
            -1e-36
        ];
        nf
    ];
    for n in ens.nodes.iter().filter(|n| n.kind == FAST) {
        let t = n.value;
        let t32 = t as f32;
        per_feature[n.feature as usize].extend([
            t,
            t.next_up(),
            t.next_down(),
            t32 as f64,
            t32.next_up() as f64,
            t32.next_down() as f64,
            (t32 as f64 + t32.next_up() as f64) / 2.0,
        ]);
    }
    let mut state = 0x243f6a8885a308d3u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let n_rows = 3000;
    let mut data = Vec::with_capacity(n_rows * nf);
    for _ in 0..n_rows {
        for values in &per_feature {
            data.push(values[(next() % values.len() as u64) as usize]);
        }
    }
    (data, n_rows)
}

fn assert_same(name: &str, ens: &TreeEnsemble) {
    let (data, n_rows) = probe_rows(ens);
    // batches of several sizes (QuickScorer works in blocks of rows)
    for batch in [1usize, 8, 9, n_rows] {
        for (b, rows) in data.chunks(batch * ens.n_features).enumerate() {
            let n = rows.len() / ens.n_features;
            let quick = ens.raw_scores(rows, n);
            let walk = ens.walk_scores(rows, n);
            for (i, (q, w)) in quick.iter().zip(&walk).enumerate() {
                assert!(
                    q.to_bits() == w.to_bits(),
                    "{name} ({:?}): batch {batch} #{b}, output {i}: quick {q} walk {w}",
                    ens.flavor
                );
            }
        }
    }
}

#[test]
fn quick_scorer_and_the_walk_agree_on_every_tree_fixture() {
    let names = [
        "lgb_binary.txt",
        "lgb_categorical.txt",
        "lgb_multiclass.txt",
        "lgb_multiclassova.txt",
        "lgb_poisson.txt",
        "lgb_regression.txt",
        "lgb_regression_zero.txt",
        "lgb_rf.txt",
        "xgb_binary.json",
        "xgb_binary.ubj",
        "xgb_categorical.json",
        "xgb_multiclass.json",
        "xgb_poisson.ubj",
        "xgb_regression.json",
    ];
    let mut quick = 0;
    for name in names {
        let ens = fixture(name);
        if ens.uses_quick_scorer() {
            quick += 1;
        }
        assert_same(name, &ens);
        // the same numerical trees under the other split rules
        if ens.has_slow_nodes {
            continue;
        }
        for flavor in [
            FlavorKind::LightGbm,
            FlavorKind::XgBoost,
            FlavorKind::Sklearn,
        ] {
            let mut other = fixture(name);
            other.flavor = flavor;
            assert_same(name, &other);
        }
    }
    assert!(quick >= 8, "QuickScorer took only {quick} fixtures");
}

#[test]
fn quick_scorer_takes_small_numerical_trees_and_leaves_the_rest_to_the_walk() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/diabetes_lgbm.txt");
    let text = std::fs::read_to_string(&shipped).unwrap();
    let ens = lightgbm::parse(&text, &shipped).unwrap().ensemble;
    assert!(ens.uses_quick_scorer(), "the shipped 150-tree model");
    // categorical splits and zero-as-missing take the walk
    assert!(!fixture("lgb_categorical.txt").uses_quick_scorer());
    assert!(!fixture("xgb_categorical.json").uses_quick_scorer());
}

/// A balanced tree of `2^depth` leaves; thresholds spread over [-1, 1],
/// NaN direction alternating.
fn balanced(depth: u32, seed: u64) -> LocalTree {
    let mut tree = LocalTree::default();
    fn grow(tree: &mut LocalTree, depth: u32, lo: f64, hi: f64, seed: u64) -> i32 {
        if depth == 0 {
            tree.leaves.push(lo * 10.0 + seed as f64);
            return !(tree.leaves.len() as i32 - 1);
        }
        let at = tree.splits.len();
        let mid = (lo + hi) / 2.0;
        tree.splits.push(LocalSplit {
            feature: (at as u64 + seed) as u32 % 3,
            threshold: mid,
            flags: MISSING_NAN
                | if at.is_multiple_of(2) {
                    DEFAULT_LEFT
                } else {
                    0
                },
            left: 0,
            right: 0,
            gain: 1.0,
            categories: None,
        });
        let left = grow(tree, depth - 1, lo, mid, seed);
        let right = grow(tree, depth - 1, mid, hi, seed);
        tree.splits[at].left = left;
        tree.splits[at].right = right;
        at as i32
    }
    grow(&mut tree, depth, -1.0, 1.0, seed);
    tree
}

#[test]
fn trees_of_up_to_64_leaves_take_quick_scorer_and_larger_ones_the_walk() {
    for (depth, quick) in [(0, true), (1, true), (6, true), (7, false)] {
        for flavor in [
            FlavorKind::LightGbm,
            FlavorKind::XgBoost,
            FlavorKind::Sklearn,
        ] {
            let mut ens = TreeEnsemble::empty(flavor, 3, 1);
            for t in 0..20 {
                ens.push_tree(balanced(depth, t), 0).unwrap();
            }
            ens.validate().unwrap();
            assert_eq!(ens.uses_quick_scorer(), quick, "depth {depth}");
            assert_same(&format!("balanced depth {depth}"), &ens);
        }
    }
}
