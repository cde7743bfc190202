//! QuickScorer evaluation (Lucchese et al., SIGIR 2015) for ensembles of
//! small numerical trees.
//!
//! Each tree's leaves are numbered left to right and a row keeps one bit per
//! leaf, all set at first. A split whose test fails for the row (the row goes
//! right) clears the bits of the leaves in its left subtree. After every
//! failing split of every tree has been applied, the row's exit leaf in a
//! tree is the lowest bit still set: any leaf left of the exit leaf lies in
//! the left subtree of a split on the path that went right.
//!
//! The failing splits are found per feature, not per tree: the splits on a
//! feature are sorted by threshold, and for a value `x` the ones that send it
//! right are a prefix of that order (`threshold < x` for LightGBM and
//! scikit-learn, `threshold <= x` for XGBoost; a missing value instead fails
//! exactly the splits that send NaN right). So a row costs one pass over the
//! failing splits, with no data-dependent walk down the trees, and then one
//! leaf per tree, added in tree order as the walk adds them (same sums, bit
//! for bit).
//!
//! Used when every tree has at most 64 leaves and only numerical splits with
//! ordered (non-NaN) thresholds; anything else uses the tree walk.

use super::{Flavor, Node, TreeEnsemble, LEAF};

/// Most leaves a tree may have here (one `u64` of leaf bits per tree).
const MAX_LEAVES: usize = 64;

/// Rows evaluated together (their leaf sums are independent chains).
const ROWS: usize = 8;

/// An ensemble's splits regrouped by feature.
#[derive(Debug, Clone)]
pub(super) struct QuickScorer {
    /// Per feature, `start..end` into the split arrays, sorted by threshold.
    by_feature: Vec<(u32, u32)>,
    thresholds: Vec<f64>,
    tree_of: Vec<u32>,
    mask: Vec<u64>,
    /// Per feature, `start..end` into the NaN arrays: the splits that send a
    /// missing value right.
    nan_by_feature: Vec<(u32, u32)>,
    nan_tree_of: Vec<u32>,
    nan_mask: Vec<u64>,
    /// Per tree, where its leaf values start in `leaf_values`.
    leaf_start: Vec<u32>,
    leaf_values: Vec<f64>,
    group: Vec<u32>,
}

/// One split as placed in the tables.
struct Placed {
    feature: u32,
    threshold: f64,
    tree: u32,
    mask: u64,
    nan_right: bool,
}

impl QuickScorer {
    /// The tables for `ens`, or `None` when a tree does not fit them.
    pub(super) fn build(ens: &TreeEnsemble) -> Option<QuickScorer> {
        if ens.has_slow_nodes || ens.trees.len() > u32::MAX as usize {
            return None;
        }
        let mut placed: Vec<Placed> = Vec::new();
        let mut leaf_start = Vec::with_capacity(ens.trees.len());
        let mut leaf_values = Vec::new();
        for (t, tree) in ens.trees.iter().enumerate() {
            leaf_start.push(u32::try_from(leaf_values.len()).ok()?);
            let first = leaf_values.len();
            // in-order: leaves numbered left to right; a split's mask clears
            // the leaves numbered while its left subtree is visited
            enum Visit {
                Enter(u32),
                AfterLeft(u32, usize),
            }
            let mut stack = vec![Visit::Enter(tree.root)];
            while let Some(v) = stack.pop() {
                match v {
                    Visit::Enter(at) => {
                        let node: &Node = ens.nodes.get(at as usize)?;
                        if node.kind == LEAF {
                            if leaf_values.len() - first == MAX_LEAVES {
                                return None;
                            }
                            leaf_values.push(node.value);
                        } else {
                            if node.value.is_nan() {
                                return None;
                            }
                            stack.push(Visit::AfterLeft(at, leaf_values.len() - first));
                            stack.push(Visit::Enter(node.left));
                        }
                    }
                    Visit::AfterLeft(at, from) => {
                        let node = &ens.nodes[at as usize];
                        let to = leaf_values.len() - first;
                        let left_leaves = bits(to) & !bits(from);
                        placed.push(Placed {
                            feature: node.feature,
                            threshold: node.value,
                            tree: t as u32,
                            mask: !left_leaves,
                            nan_right: !node.nan_left,
                        });
                        stack.push(Visit::Enter(node.right));
                    }
                }
            }
        }
        if u32::try_from(placed.len()).is_err() || u32::try_from(leaf_values.len()).is_err() {
            return None;
        }
        // by feature, then threshold (`total_cmp` refines `<` on non-NaN,
        // so "sends x right" stays a prefix); stable, so ties keep tree order
        placed.sort_by(|a, b| {
            a.feature
                .cmp(&b.feature)
                .then(a.threshold.total_cmp(&b.threshold))
        });
        let nf = ens.n_features;
        let mut q = QuickScorer {
            by_feature: vec![(0, 0); nf],
            thresholds: Vec::with_capacity(placed.len()),
            tree_of: Vec::with_capacity(placed.len()),
            mask: Vec::with_capacity(placed.len()),
            nan_by_feature: vec![(0, 0); nf],
            nan_tree_of: Vec::new(),
            nan_mask: Vec::new(),
            leaf_start,
            leaf_values,
            group: ens.trees.iter().map(|t| t.group).collect(),
        };
        // one pass: `placed` is sorted by feature
        let mut at = 0;
        for f in 0..nf {
            let start = q.thresholds.len() as u32;
            let nan_start = q.nan_tree_of.len() as u32;
            while let Some(p) = placed.get(at).filter(|p| p.feature as usize == f) {
                q.thresholds.push(p.threshold);
                q.tree_of.push(p.tree);
                q.mask.push(p.mask);
                if p.nan_right {
                    q.nan_tree_of.push(p.tree);
                    q.nan_mask.push(p.mask);
                }
                at += 1;
            }
            q.by_feature[f] = (start, q.thresholds.len() as u32);
            q.nan_by_feature[f] = (nan_start, q.nan_tree_of.len() as u32);
        }
        if at != placed.len() {
            return None; // a split on a feature the model does not have
        }
        Some(q)
    }

    /// Raw scores, `n_rows * n_groups`, starting from the base margins.
    pub(super) fn raw_scores<F: Flavor>(
        &self,
        ens: &TreeEnsemble,
        data: &[f64],
        n_rows: usize,
    ) -> Vec<f64> {
        let nf = ens.n_features;
        let ng = ens.n_groups;
        let nt = self.group.len();
        let mut acc: Vec<F::Acc> = Vec::with_capacity(n_rows * ng);
        for _ in 0..n_rows {
            acc.extend(ens.base_margin.iter().map(|b| F::from_f64(*b)));
        }
        let mut leaves = vec![0u64; ROWS * nt];
        let mut start = 0;
        while start < n_rows {
            let rows = (n_rows - start).min(ROWS);
            leaves[..rows * nt].fill(u64::MAX);
            for r in 0..rows {
                let v = &mut leaves[r * nt..(r + 1) * nt];
                let row = &data[(start + r) * nf..(start + r + 1) * nf];
                for (f, &x) in row.iter().enumerate() {
                    if x.is_nan() {
                        let (s, e) = self.nan_by_feature[f];
                        let (s, e) = (s as usize, e as usize);
                        for (&t, &m) in self.nan_tree_of[s..e].iter().zip(&self.nan_mask[s..e]) {
                            v[t as usize] &= m;
                        }
                    } else {
                        let x = F::quick_input(x);
                        let (s, e) = self.by_feature[f];
                        let (s, e) = (s as usize, e as usize);
                        let thresholds = &self.thresholds[s..e];
                        let trees = &self.tree_of[s..e];
                        let masks = &self.mask[s..e];
                        for k in 0..thresholds.len() {
                            if !F::quick_right(thresholds[k], x) {
                                break;
                            }
                            v[trees[k] as usize] &= masks[k];
                        }
                    }
                }
            }
            // leaves added in tree order per row, rows interleaved
            for t in 0..nt {
                let base = self.leaf_start[t] as usize;
                let g = self.group[t] as usize;
                for r in 0..rows {
                    let leaf = leaves[r * nt + t].trailing_zeros() as usize;
                    F::add(
                        &mut acc[(start + r) * ng + g],
                        self.leaf_values[base + leaf],
                    );
                }
            }
            start += rows;
        }
        acc.into_iter().map(F::to_f64).collect()
    }
}

/// The lowest `n` bits set.
fn bits(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}
