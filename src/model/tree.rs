//! Native evaluator for gradient-boosted tree ensembles (LightGBM, XGBoost).
//!
//! All trees live in flat arrays: one `Vec<Node>` of internal nodes, one
//! `Vec<f64>` of leaf values, one `Vec<u32>` of categorical bitsets. A child
//! reference is an `i32`: `>= 0` is an internal node index, `< 0` is leaf
//! `!child`. Evaluation walks blocks of rows tree by tree, so one tree's nodes
//! stay in cache while a block of rows goes through it, and allocates nothing
//! per row or per node.
//!
//! The two libraries differ in how a split decides and in arithmetic, so the
//! walk is generic over a [`Flavor`] and monomorphised for each:
//! LightGBM sums leaf values in `f64` and sends `x <= threshold` left;
//! XGBoost compares and sums in `f32` and sends `x < threshold` left.

use super::{Batch, ImportanceType, Model, ModelError, ModelInfo, Output, Prediction};

/// What a tree model file says, beyond its trees.
#[derive(Debug, Clone)]
pub struct ParsedTrees {
    pub ensemble: TreeEnsemble,
    pub feature_names: Vec<String>,
    pub objective: String,
    /// Number of classes when the objective is a classification objective.
    pub n_classes: Option<usize>,
}

/// A LightGBM or XGBoost model served by the native evaluator.
pub struct TreeModel {
    pub info: ModelInfo,
    pub ensemble: TreeEnsemble,
}

impl Model for TreeModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn predict_full(&self, batch: Batch<'_>) -> Result<Prediction, ModelError> {
        batch.expect_features(self.ensemble.n_features)?;
        let classification = self.info.task_type == super::TaskType::Classification;
        Ok(predict_trees(
            &self.ensemble,
            batch.data(),
            batch.n_rows(),
            classification,
        ))
    }

    fn feature_importance(&self, kind: ImportanceType) -> Option<Vec<f64>> {
        Some(self.ensemble.importance(kind))
    }
}

/// Node flag: categorical split.
pub const CATEGORICAL: u8 = 1;
/// Node flag: a missing value goes left.
pub const DEFAULT_LEFT: u8 = 2;
/// LightGBM missing type in bits 2-3: none (NaN is treated as 0.0).
pub const MISSING_NONE: u8 = 0;
/// LightGBM missing type: zero (and NaN) are missing.
pub const MISSING_ZERO: u8 = 1 << 2;
/// LightGBM missing type: NaN is missing.
pub const MISSING_NAN: u8 = 2 << 2;
const MISSING_MASK: u8 = 3 << 2;

/// LightGBM's `kZeroThreshold`.
const ZERO_THRESHOLD: f64 = 1e-35;

/// An internal (split) node.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    /// Numerical: the split threshold. Categorical: index into `cat_ranges`.
    pub threshold: f64,
    pub feature: u32,
    pub left: i32,
    pub right: i32,
    pub flags: u8,
}

/// One tree: where its root is and which output group it adds to.
#[derive(Debug, Clone, Copy)]
pub struct TreeRoot {
    /// Internal node index (`>= 0`) or `!leaf` (`< 0`) for a single-leaf tree.
    pub root: i32,
    pub group: u32,
}

/// Which library's arithmetic and split rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlavorKind {
    LightGbm,
    XgBoost,
}

/// The transform from raw scores (margins) to outputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    Identity,
    /// `1 / (1 + exp(-alpha * x))` per output.
    Sigmoid {
        alpha: f64,
    },
    /// Softmax across the groups of a row.
    Softmax,
    Exp,
    /// LightGBM `regression sqrt`: `sign(x) * x^2`.
    SignedSquare,
    /// LightGBM `cross_entropy_lambda`: `log(1 + exp(x))`.
    Log1pExp,
    /// XGBoost `binary:hinge`: 1 if the margin is positive, else 0.
    Hinge,
}

/// A whole ensemble in flat arrays, ready to evaluate.
#[derive(Debug, Clone)]
pub struct TreeEnsemble {
    pub flavor: FlavorKind,
    pub nodes: Vec<Node>,
    pub leaves: Vec<f64>,
    pub trees: Vec<TreeRoot>,
    /// `(start, len)` into `cat_bits`, one per categorical split.
    pub cat_ranges: Vec<(u32, u32)>,
    pub cat_bits: Vec<u32>,
    /// Split gain of each internal node (for feature importance).
    pub gains: Vec<f64>,
    pub n_features: usize,
    /// Raw outputs per row (number of classes for multiclass, else 1).
    pub n_groups: usize,
    /// Initial margin per group.
    pub base_margin: Vec<f64>,
    /// Divide raw scores by this before the transform (LightGBM random forest).
    pub average_over: Option<f64>,
    pub transform: Transform,
}

/// Rows per evaluation block: the block's accumulators stay in L1.
const BLOCK: usize = 64;

impl TreeEnsemble {
    /// Checks the internal consistency of the arrays so evaluation cannot index
    /// out of bounds or loop, whatever the model file said.
    pub fn validate(&self) -> Result<(), String> {
        let n_nodes = self.nodes.len() as i64;
        let n_leaves = self.leaves.len() as i64;
        let check_child = |c: i32, from: usize| -> Result<(), String> {
            if c >= 0 {
                // children always come after their parent: no cycles
                if (c as i64) >= n_nodes || (c as usize) <= from {
                    return Err(format!("node {from} has invalid child {c}"));
                }
            } else if (!c as i64) >= n_leaves {
                return Err(format!("node {from} refers to missing leaf {}", !c));
            }
            Ok(())
        };
        for (i, n) in self.nodes.iter().enumerate() {
            if n.feature as usize >= self.n_features {
                return Err(format!(
                    "node {i} splits on feature {} but the model has {} features",
                    n.feature, self.n_features
                ));
            }
            check_child(n.left, i)?;
            check_child(n.right, i)?;
            if n.flags & CATEGORICAL != 0 {
                let idx = n.threshold;
                if !(idx >= 0.0 && (idx as usize) < self.cat_ranges.len()) {
                    return Err(format!(
                        "categorical node {i} has invalid category index {idx}"
                    ));
                }
            }
        }
        for &(start, len) in &self.cat_ranges {
            if start as usize + len as usize > self.cat_bits.len() {
                return Err("categorical bitset out of range".into());
            }
        }
        for (t, tree) in self.trees.iter().enumerate() {
            if tree.group as usize >= self.n_groups {
                return Err(format!(
                    "tree {t} adds to output {} of {}",
                    tree.group, self.n_groups
                ));
            }
            if tree.root >= 0 && tree.root as i64 >= n_nodes {
                return Err(format!("tree {t} has invalid root"));
            }
            if tree.root < 0 && (!tree.root as i64) >= n_leaves {
                return Err(format!("tree {t} has invalid root leaf"));
            }
        }
        if self.base_margin.len() != self.n_groups {
            return Err("base score length differs from the number of outputs".into());
        }
        Ok(())
    }

    /// Raw scores (margins), `n_rows * n_groups`, before averaging and transform.
    pub fn raw_scores(&self, data: &[f64], n_rows: usize) -> Vec<f64> {
        match self.flavor {
            FlavorKind::LightGbm => self.walk::<LightGbm>(data, n_rows),
            FlavorKind::XgBoost => self.walk::<XgBoost>(data, n_rows),
        }
    }

    fn walk<F: Flavor>(&self, data: &[f64], n_rows: usize) -> Vec<f64> {
        let nf = self.n_features;
        let ng = self.n_groups;
        let mut out = vec![0f64; n_rows * ng];
        let mut acc = [F::Acc::default(); BLOCK];
        let mut leaf_of = [0usize; BLOCK];
        for block_start in (0..n_rows).step_by(BLOCK) {
            let rows = (n_rows - block_start).min(BLOCK);
            let block = &data[block_start * nf..(block_start + rows) * nf];
            for g in 0..ng {
                acc[..rows].fill(F::from_f64(self.base_margin[g]));
                for tree in self.trees.iter().filter(|t| t.group as usize == g) {
                    for (r, slot) in leaf_of[..rows].iter_mut().enumerate() {
                        *slot = self.leaf::<F>(tree.root, &block[r * nf..(r + 1) * nf]);
                    }
                    for r in 0..rows {
                        F::add(&mut acc[r], self.leaves[leaf_of[r]]);
                    }
                }
                for r in 0..rows {
                    out[(block_start + r) * ng + g] = F::to_f64(acc[r]);
                }
            }
        }
        out
    }

    #[inline(always)]
    fn leaf<F: Flavor>(&self, root: i32, row: &[f64]) -> usize {
        let mut at = root;
        while at >= 0 {
            // SAFETY-free: `validate` guarantees indices are in range; the
            // bounds checks stay and are cheap next to the data-dependent branch.
            let node = &self.nodes[at as usize];
            let x = row[node.feature as usize];
            let left = if node.flags & CATEGORICAL != 0 {
                F::categorical_left(self, node, x)
            } else {
                F::numerical_left(node, x)
            };
            at = if left { node.left } else { node.right };
        }
        !at as usize
    }

    /// Scores after averaging and the objective's transform, `n_rows * n_groups`.
    pub fn transformed(&self, data: &[f64], n_rows: usize) -> Vec<f64> {
        let mut scores = self.raw_scores(data, n_rows);
        if let Some(n) = self.average_over {
            for s in &mut scores {
                *s /= n;
            }
        }
        match self.flavor {
            FlavorKind::LightGbm => apply_transform_f64(self.transform, &mut scores, self.n_groups),
            FlavorKind::XgBoost => apply_transform_f32(self.transform, &mut scores, self.n_groups),
        }
        scores
    }

    /// Split counts or total gains per feature.
    pub fn importance(&self, kind: ImportanceType) -> Vec<f64> {
        let mut imp = vec![0.0; self.n_features];
        for (i, n) in self.nodes.iter().enumerate() {
            imp[n.feature as usize] += match kind {
                ImportanceType::Split => 1.0,
                ImportanceType::Gain => self.gains.get(i).copied().unwrap_or(0.0),
            };
        }
        imp
    }

    /// Number of trees.
    pub fn n_trees(&self) -> usize {
        self.trees.len()
    }
}

/// Predictions for a tree ensemble under a task type: for classifiers the
/// transformed scores are probabilities (binary: `[1-p, p]`) and the value is
/// the argmax class.
pub fn predict_trees(
    ens: &TreeEnsemble,
    data: &[f64],
    n_rows: usize,
    classification: bool,
) -> Prediction {
    let scores = ens.transformed(data, n_rows);
    if !classification {
        return Prediction {
            values: Output {
                values: scores,
                width: ens.n_groups,
            },
            probabilities: None,
        };
    }
    let probs = if ens.n_groups == 1 {
        let mut p = Vec::with_capacity(n_rows * 2);
        for s in scores {
            p.push(1.0 - s);
            p.push(s);
        }
        Output {
            values: p,
            width: 2,
        }
    } else {
        Output {
            values: scores,
            width: ens.n_groups,
        }
    };
    Prediction {
        values: probs.argmax(),
        probabilities: Some(probs),
    }
}

fn apply_transform_f64(t: Transform, s: &mut [f64], groups: usize) {
    match t {
        Transform::Identity => {}
        Transform::Sigmoid { alpha } => s
            .iter_mut()
            .for_each(|x| *x = 1.0 / (1.0 + (-alpha * *x).exp())),
        Transform::Exp => s.iter_mut().for_each(|x| *x = x.exp()),
        Transform::SignedSquare => s.iter_mut().for_each(|x| *x = x.signum() * *x * *x),
        Transform::Log1pExp => s.iter_mut().for_each(|x| *x = x.exp().ln_1p()),
        Transform::Hinge => s
            .iter_mut()
            .for_each(|x| *x = if *x > 0.0 { 1.0 } else { 0.0 }),
        Transform::Softmax => {
            for row in s.chunks_mut(groups.max(1)) {
                // LightGBM's Common::Softmax
                let wmax = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut wsum = 0.0;
                for v in row.iter_mut() {
                    *v = (*v - wmax).exp();
                    wsum += *v;
                }
                for v in row.iter_mut() {
                    *v /= wsum;
                }
            }
        }
    }
}

fn apply_transform_f32(t: Transform, s: &mut [f64], groups: usize) {
    let f = |x: &mut f64, g: fn(f32) -> f32| *x = g(*x as f32) as f64;
    match t {
        Transform::Identity => {}
        Transform::Sigmoid { .. } => s
            .iter_mut()
            .for_each(|x| f(x, |v| 1.0 / (1.0 + (-v).exp()))),
        Transform::Exp => s.iter_mut().for_each(|x| f(x, f32::exp)),
        Transform::SignedSquare => s.iter_mut().for_each(|x| f(x, |v| v.signum() * v * v)),
        Transform::Log1pExp => s.iter_mut().for_each(|x| f(x, |v| v.exp().ln_1p())),
        Transform::Hinge => s
            .iter_mut()
            .for_each(|x| *x = if *x > 0.0 { 1.0 } else { 0.0 }),
        Transform::Softmax => {
            for row in s.chunks_mut(groups.max(1)) {
                // XGBoost's common::Softmax: f32 values, f64 sum
                let wmax = row
                    .iter()
                    .map(|v| *v as f32)
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut wsum = 0.0f64;
                for v in row.iter_mut() {
                    let e = (*v as f32 - wmax).exp();
                    *v = e as f64;
                    wsum += e as f64;
                }
                for v in row.iter_mut() {
                    *v = (*v as f32 / wsum as f32) as f64;
                }
            }
        }
    }
}

/// Split rules and arithmetic of one library.
trait Flavor {
    type Acc: Copy + Default;
    fn from_f64(v: f64) -> Self::Acc;
    fn to_f64(a: Self::Acc) -> f64;
    fn add(a: &mut Self::Acc, leaf: f64);
    fn numerical_left(node: &Node, x: f64) -> bool;
    fn categorical_left(ens: &TreeEnsemble, node: &Node, x: f64) -> bool;
}

#[inline(always)]
fn in_bitset(ens: &TreeEnsemble, node: &Node, cat: u32) -> bool {
    let (start, len) = ens.cat_ranges[node.threshold as usize];
    let word = (cat / 32) as usize;
    word < len as usize && (ens.cat_bits[start as usize + word] >> (cat % 32)) & 1 == 1
}

struct LightGbm;

impl Flavor for LightGbm {
    type Acc = f64;
    fn from_f64(v: f64) -> f64 {
        v
    }
    fn to_f64(a: f64) -> f64 {
        a
    }
    #[inline(always)]
    fn add(a: &mut f64, leaf: f64) {
        *a += leaf;
    }

    /// LightGBM `Tree::NumericalDecision`.
    #[inline(always)]
    fn numerical_left(node: &Node, x: f64) -> bool {
        let missing = node.flags & MISSING_MASK;
        let mut x = x;
        if x.is_nan() && missing != MISSING_NAN {
            x = 0.0;
        }
        if (missing == MISSING_ZERO && (-ZERO_THRESHOLD..=ZERO_THRESHOLD).contains(&x))
            || (missing == MISSING_NAN && x.is_nan())
        {
            return node.flags & DEFAULT_LEFT != 0;
        }
        x <= node.threshold
    }

    /// LightGBM `Tree::CategoricalDecision`: NaN and negatives go right,
    /// categories in the bitset go left.
    #[inline(always)]
    fn categorical_left(ens: &TreeEnsemble, node: &Node, x: f64) -> bool {
        if x.is_nan() {
            return false;
        }
        let c = x as i32; // C++ static_cast<int>: truncation toward zero
        if c < 0 {
            return false;
        }
        in_bitset(ens, node, c as u32)
    }
}

struct XgBoost;

impl Flavor for XgBoost {
    type Acc = f32;
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    fn to_f64(a: f32) -> f64 {
        a as f64
    }
    #[inline(always)]
    fn add(a: &mut f32, leaf: f64) {
        *a += leaf as f32;
    }

    #[inline(always)]
    fn numerical_left(node: &Node, x: f64) -> bool {
        if x.is_nan() {
            return node.flags & DEFAULT_LEFT != 0;
        }
        (x as f32) < node.threshold as f32
    }

    /// XGBoost `common::Decision`: categories in the set go right; invalid
    /// (negative, non-representable) or unseen categories go left.
    #[inline(always)]
    fn categorical_left(ens: &TreeEnsemble, node: &Node, x: f64) -> bool {
        if x.is_nan() {
            return node.flags & DEFAULT_LEFT != 0;
        }
        let v = x as f32;
        if v < 0.0 || v >= (1u32 << 24) as f32 {
            return true;
        }
        !in_bitset(ens, node, v as u32)
    }
}

/// One split of a tree as a format parser reads it, before flattening.
#[derive(Debug, Clone)]
pub struct LocalSplit {
    pub feature: u32,
    /// Numerical threshold; ignored for categorical splits.
    pub threshold: f64,
    pub flags: u8,
    /// Local child references: `>= 0` a split of this tree, `< 0` leaf `!c`.
    pub left: i32,
    pub right: i32,
    pub gain: f64,
    /// Category bitset for categorical splits.
    pub categories: Option<Vec<u32>>,
}

/// A tree as read from a file: splits and leaves with local indices; the root
/// is split 0, or leaf 0 when there are no splits.
#[derive(Debug, Clone, Default)]
pub struct LocalTree {
    pub splits: Vec<LocalSplit>,
    pub leaves: Vec<f64>,
}

impl TreeEnsemble {
    /// An empty ensemble to push trees into.
    pub fn empty(flavor: FlavorKind, n_features: usize, n_groups: usize) -> Self {
        TreeEnsemble {
            flavor,
            nodes: Vec::new(),
            leaves: Vec::new(),
            trees: Vec::new(),
            cat_ranges: Vec::new(),
            cat_bits: Vec::new(),
            gains: Vec::new(),
            n_features,
            n_groups,
            base_margin: vec![0.0; n_groups],
            average_over: None,
            transform: Transform::Identity,
        }
    }

    /// Appends a tree, renumbering its splits depth-first (so a child always
    /// follows its parent and the left path is contiguous in memory).
    /// Fails on out-of-range references, shared subtrees and cycles.
    pub fn push_tree(&mut self, tree: LocalTree, group: u32) -> Result<(), String> {
        let leaf_base = self.leaves.len() as i64;
        let n_leaves = tree.leaves.len() as i64;
        let map_leaf = |c: i32| -> Result<i32, String> {
            let l = !c as i64;
            if l >= n_leaves {
                return Err(format!("reference to leaf {l}, the tree has {n_leaves}"));
            }
            i32::try_from(leaf_base + l)
                .map(|g| !g)
                .map_err(|_| "too many leaves".to_string())
        };
        let root = if tree.splits.is_empty() {
            if tree.leaves.is_empty() {
                return Err("tree has neither splits nor leaves".into());
            }
            map_leaf(-1)?
        } else {
            let mut seen = vec![false; tree.splits.len()];
            // (local split, slot in self.nodes of the parent's child field to patch)
            let mut stack: Vec<(usize, Option<(usize, bool)>)> = vec![(0, None)];
            let mut root = 0;
            while let Some((local, parent)) = stack.pop() {
                if std::mem::replace(&mut seen[local], true) {
                    return Err(format!(
                        "split {local} is reached twice (cycle or shared subtree)"
                    ));
                }
                let s = &tree.splits[local];
                let at = self.nodes.len();
                let global = i32::try_from(at).map_err(|_| "too many nodes".to_string())?;
                match parent {
                    None => root = global,
                    Some((p, true)) => self.nodes[p].left = global,
                    Some((p, false)) => self.nodes[p].right = global,
                }
                let mut threshold = s.threshold;
                if s.flags & CATEGORICAL != 0 {
                    let bits = s.categories.as_deref().unwrap_or(&[]);
                    threshold = self.cat_ranges.len() as f64;
                    self.cat_ranges
                        .push((self.cat_bits.len() as u32, bits.len() as u32));
                    self.cat_bits.extend_from_slice(bits);
                }
                let mut node = Node {
                    threshold,
                    feature: s.feature,
                    left: 0,
                    right: 0,
                    flags: s.flags,
                };
                for (child, is_left) in [(s.right, false), (s.left, true)] {
                    if child >= 0 {
                        if child as usize >= tree.splits.len() {
                            return Err(format!("split {local} refers to missing split {child}"));
                        }
                        stack.push((child as usize, Some((at, is_left))));
                    } else if is_left {
                        node.left = map_leaf(child)?;
                    } else {
                        node.right = map_leaf(child)?;
                    }
                }
                self.nodes.push(node);
                self.gains.push(s.gain);
            }
            root
        };
        self.leaves.extend_from_slice(&tree.leaves);
        self.trees.push(TreeRoot { root, group });
        Ok(())
    }
}

/// Builds a bitset of `u32` words from a list of category values.
pub fn bitset_from(categories: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut bits = Vec::new();
    for c in categories {
        let w = (c / 32) as usize;
        if bits.len() <= w {
            bits.resize(w + 1, 0);
        }
        bits[w] |= 1 << (c % 32);
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x0 <= 0.5 ? (x1 <= 1.0 ? 1 : 2) : 3
    fn stump() -> TreeEnsemble {
        TreeEnsemble {
            flavor: FlavorKind::LightGbm,
            nodes: vec![
                Node {
                    threshold: 0.5,
                    feature: 0,
                    left: 1,
                    right: !2,
                    flags: MISSING_NAN | DEFAULT_LEFT,
                },
                Node {
                    threshold: 1.0,
                    feature: 1,
                    left: !0,
                    right: !1,
                    flags: MISSING_NONE,
                },
            ],
            leaves: vec![1.0, 2.0, 3.0],
            trees: vec![TreeRoot { root: 0, group: 0 }],
            cat_ranges: vec![],
            cat_bits: vec![],
            gains: vec![10.0, 5.0],
            n_features: 2,
            n_groups: 1,
            base_margin: vec![0.0],
            average_over: None,
            transform: Transform::Identity,
        }
    }

    #[test]
    fn walks_numerical_splits_and_missing_values() {
        let e = stump();
        let rows = [0.0, 0.0, 0.0, 2.0, 1.0, 0.0, f64::NAN, f64::NAN];
        // NaN on node 0 goes default-left; NaN on node 1 (missing none) is 0.0 -> left
        assert_eq!(e.raw_scores(&rows, 4), vec![1.0, 2.0, 3.0, 1.0]);
    }

    #[test]
    fn validate_rejects_cycles_and_bad_features() {
        let mut e = stump();
        e.nodes[1].left = 0;
        assert!(e.validate().is_err());
        let mut e = stump();
        e.nodes[0].feature = 7;
        assert!(e.validate().unwrap_err().contains("feature 7"));
        assert!(stump().validate().is_ok());
    }

    #[test]
    fn importance_counts_splits_and_gains() {
        let e = stump();
        assert_eq!(e.importance(ImportanceType::Split), vec![1.0, 1.0]);
        assert_eq!(e.importance(ImportanceType::Gain), vec![10.0, 5.0]);
    }

    #[test]
    fn bitset_membership() {
        let bits = bitset_from([1, 33, 64]);
        assert_eq!(bits, vec![2, 2, 1]);
    }
}
