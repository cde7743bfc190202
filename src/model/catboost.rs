//! CatBoost JSON models (`model.save_model(path, format="json")`, checked
//! against catboost 1.2.10), read into the native [`TreeEnsemble`].
//!
//! Supported: float features; symmetric (oblivious) trees
//! (`oblivious_trees`) and the non-symmetric trees of `grow_policy`
//! Depthwise and Lossguide (`trees`, nested `split`/`left`/`right` nodes
//! with `value` leaves); `scale_and_bias`; the losses RMSE, MAE, Quantile,
//! Expectile, MAPE, Huber, Lq, LogCosh (identity), Poisson and Tweedie
//! (exp, as CatBoost's `predict`), Logloss and CrossEntropy (sigmoid),
//! MultiClass (softmax) and MultiClassOneVsAll (sigmoid per class).
//! Refused, with the reason: categorical features (one-hot or CTR splits),
//! text and embedding features, other losses (multi-target regression,
//! ranking, uncertainty).
//!
//! How CatBoost evaluates, and how that maps to the evaluator:
//!
//! - A split sends a row right when `(float)x > border` (both `f32`). Leaf
//!   index bit `i` of an oblivious tree is split `i` of its `splits` list.
//!   The tree becomes a full binary tree whose level `i` tests split `i`, so
//!   leaf `k` of the evaluator is leaf `k` of the file.
//! - NaN: `nan_value_treatment` AsTrue (trained with `nan_mode` Max) sends
//!   NaN right, as `+inf`; AsFalse (`nan_mode` Min) and AsIs (a feature with
//!   no NaN in training, whatever `nan_mode`) send it left.
//! - That is [`FlavorKind::Sklearn`] exactly: `x` cast to `f32`, `x <=
//!   threshold` goes left (the threshold is the border rounded to `f32`),
//!   NaN to the recorded side, sums in `f64`.
//! - Leaves hold `dims` values each, leaf-major (`leaf_values[leaf * dims +
//!   dim]`; a non-symmetric leaf's `value` is a list of `dims`). Each tree
//!   becomes one tree per dimension (output group), with identical splits.
//! - `scale_and_bias` = `[scale, [bias per dimension]]`: CatBoost computes
//!   `scale * sum(leaves) + bias`; here the leaves are multiplied by `scale`
//!   and the bias is the base margin.
//! - Split gains: the export has none, but it has `leaf_weights`, from which
//!   each node gets CatBoost's `PredictionValuesChange` contribution
//!   (`w1 (v1 - m)^2 + w2 (v2 - m)^2` over sibling leaves, or subtrees of
//!   non-symmetric trees, `m` their weighted mean, summed over dimensions);
//!   `Gain` importance is then CatBoost's default feature importance before
//!   its normalisation to 100. Without `leaf_weights` the gains are 0.

use std::collections::HashMap;
use std::path::Path;

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::MAX_FEATURES;

use super::tree::{
    FlavorKind, LocalSplit, LocalTree, ParsedTrees, Transform, TreeEnsemble, DEFAULT_LEFT,
    MAX_NODES,
};
use super::ModelError;

/// Deepest tree accepted (CatBoost grows at most 16 levels).
pub const MAX_DEPTH: usize = 32;

/// Most values (numbers, strings, containers) a model document may hold:
/// 32 Mi; a document of `len` bytes may hold `len / 2 + 2 Mi` (a value
/// takes a byte and a separator), counted before anything is read. Once
/// read, a value takes at most about 80 bytes (a float feature or a node of
/// a non-symmetric tree; a number in a list takes 8; strings add at most
/// their length), so memory stays under about 2.5 GiB whatever the file
/// holds. Real models hold a few million values (10,000 trees of depth 8
/// with their leaf weights: about 5.6 Mi).
pub const MAX_DOCUMENT_VALUES: usize = 1 << 25;

/// The losses served, for the error that names one that is not.
const SUPPORTED: &str = "RMSE, MAE, Quantile, Expectile, MAPE, Huber, Lq, LogCosh, Poisson, \
                         Tweedie, Logloss, CrossEntropy, MultiClass, MultiClassOneVsAll";

/// Why a file is refused: malformed, or a valid model that uses something
/// the evaluator does not do.
enum Problem {
    Format(String),
    Unsupported(String),
}

impl From<String> for Problem {
    fn from(s: String) -> Self {
        Problem::Format(s)
    }
}

impl From<&str> for Problem {
    fn from(s: &str) -> Self {
        Problem::Format(s.to_string())
    }
}

fn err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Format {
        path: path.to_path_buf(),
        format: "CatBoost",
        reason: reason.into(),
    }
}

/// `kind: catboost`: CatBoost JSON models, on the native evaluator.
pub struct Loader;

impl super::loader::ModelLoader for Loader {
    fn kind(&self) -> &str {
        "catboost"
    }

    fn load(
        &self,
        bytes: &[u8],
        ctx: &super::loader::LoadContext<'_>,
    ) -> Result<super::loader::Loaded, ModelError> {
        super::tree::TreeModel::serve(parse(bytes, ctx.path)?, ctx, "catboost")
    }
}

fn to_error(path: &Path, p: Problem) -> ModelError {
    match p {
        Problem::Format(reason) => err(path, reason),
        Problem::Unsupported(reason) => {
            ModelError::Unsupported(format!("{}: CatBoost model: {reason}", path.display()))
        }
    }
}

// ---- the document, as CatBoost writes it (unknown fields are ignored)

#[derive(Deserialize)]
struct Doc {
    #[serde(default)]
    model_info: ModelInfo,
    features_info: Option<FeaturesInfo>,
    oblivious_trees: Option<Vec<ObliviousTree>>,
    trees: Option<Vec<Node>>,
    scale_and_bias: Option<(f64, Numbers)>,
    /// CTR tables (categorical features): only whether there are any.
    ctr_data: Option<HashMap<String, IgnoredAny>>,
}

#[derive(Deserialize, Default)]
struct ModelInfo {
    params: Option<Params>,
    class_params: Option<ClassParams>,
}

#[derive(Deserialize)]
struct Params {
    loss_function: Option<LossFunction>,
}

#[derive(Deserialize)]
struct LossFunction {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct ClassParams {
    #[serde(default)]
    class_names: Vec<IgnoredAny>,
}

#[derive(Deserialize, Default)]
struct FeaturesInfo {
    #[serde(default)]
    float_features: Vec<FloatFeature>,
    #[serde(default)]
    categorical_features: Vec<OtherFeature>,
    #[serde(default)]
    text_features: Vec<OtherFeature>,
    #[serde(default)]
    embedding_features: Vec<OtherFeature>,
}

#[derive(Deserialize)]
struct FloatFeature {
    /// Index among the float features (what splits name).
    feature_index: Option<u64>,
    /// Index among all features: the input column.
    flat_feature_index: Option<u64>,
    nan_value_treatment: Option<String>,
    feature_id: Option<String>,
}

#[derive(Deserialize)]
struct OtherFeature {
    feature_index: Option<u64>,
    flat_feature_index: Option<u64>,
    feature_id: Option<String>,
}

#[derive(Deserialize)]
struct ObliviousTree {
    splits: Vec<Split>,
    leaf_values: Vec<f64>,
    leaf_weights: Option<Vec<f64>>,
}

#[derive(Deserialize)]
struct Split {
    split_type: Option<String>,
    float_feature_index: Option<u64>,
    border: Option<f64>,
    cat_feature_index: Option<u64>,
}

/// A node of a non-symmetric tree: a split with both children, or a leaf.
#[derive(Deserialize)]
struct Node {
    split: Option<Box<Split>>,
    left: Option<Box<Node>>,
    right: Option<Box<Node>>,
    value: Option<Numbers>,
    weight: Option<f64>,
}

/// A number, or a list of them (one per dimension). Read straight from the
/// document (an `untagged` enum would first copy the whole list into
/// serde's generic form: 20-40 times the file's size for a hostile list).
enum Numbers {
    One(f64),
    Many(Vec<f64>),
}

impl<'de> Deserialize<'de> for Numbers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Numbers;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number or a list of numbers")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Numbers, E> {
                Ok(Numbers::One(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Numbers, E> {
                Ok(Numbers::One(v as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Numbers, E> {
                Ok(Numbers::One(v as f64))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Numbers, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(v) = seq.next_element::<f64>()? {
                    out.push(v);
                }
                Ok(Numbers::Many(out))
            }
        }
        d.deserialize_any(Visit)
    }
}

impl Numbers {
    fn as_slice(&self) -> &[f64] {
        match self {
            Numbers::One(v) => std::slice::from_ref(v),
            Numbers::Many(v) => v,
        }
    }
}

/// Parses a CatBoost JSON model.
pub fn parse(bytes: &[u8], path: &Path) -> Result<ParsedTrees, ModelError> {
    parse_limited(bytes, path, MAX_NODES)
}

/// [`parse`] with a node budget (tests lower it).
fn parse_limited(bytes: &[u8], path: &Path, max_nodes: usize) -> Result<ParsedTrees, ModelError> {
    // a JSON value is at least one byte plus a separator: an upper bound on
    // the values, counted before anything is built
    let max_values = (bytes.len() / 2 + (1 << 21)).min(MAX_DOCUMENT_VALUES);
    let separators = bytes
        .iter()
        .filter(|b| matches!(b, b',' | b'[' | b'{' | b':'))
        .count();
    if separators >= max_values {
        return Err(err(
            path,
            format!("the JSON document has more than {max_values} values"),
        ));
    }
    // serde_json refuses nesting deeper than 128 levels, so neither reading
    // nor dropping a hostile tree recurses without bound
    let doc: Doc = serde_json::from_slice(bytes).map_err(|e| err(path, format!("{e}")))?;
    from_document(doc, max_nodes).map_err(|p| to_error(path, p))
}

/// Where a float feature's splits read and send NaN.
#[derive(Clone, Copy)]
struct Column {
    flat: u32,
    nan_left: bool,
}

fn feature_name(id: &Option<String>, flat: Option<u64>, index: Option<u64>) -> String {
    match (id.as_deref().filter(|s| !s.is_empty()), flat, index) {
        (Some(name), Some(f), _) => format!("'{name}' (input column {f})"),
        (Some(name), None, _) => format!("'{name}'"),
        (None, Some(f), _) => format!("at input column {f}"),
        (None, None, Some(i)) => format!("number {i}"),
        (None, None, None) => "(unnamed)".to_string(),
    }
}

fn categorical_refusal(what: &str) -> Problem {
    Problem::Unsupported(format!(
        "it uses categorical feature {what}; ml-worker evaluates CatBoost models on float features \
         only (categorical features need CatBoost's hashing and CTR tables), and CatBoost cannot \
         export such a model to ONNX either (catboost 1.2.10: \"ONNX-ML format export does yet not \
         support categorical features\"). Encode the feature as numbers before training, retrain, \
         and register the model's JSON export (save_model(path, format=\"json\")), or its ONNX \
         export (format=\"onnx\", symmetric trees only) as kind: onnx"
    ))
}

fn from_document(doc: Doc, max_nodes: usize) -> Result<ParsedTrees, Problem> {
    // ---- features
    let info = doc.features_info.unwrap_or_default();
    if let Some(f) = info.categorical_features.first() {
        return Err(categorical_refusal(&feature_name(
            &f.feature_id,
            f.flat_feature_index,
            f.feature_index,
        )));
    }
    if doc.ctr_data.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(categorical_refusal("(the model has CTR tables, ctr_data)"));
    }
    for (kind, list) in [
        ("text", &info.text_features),
        ("embedding", &info.embedding_features),
    ] {
        if let Some(f) = list.first() {
            return Err(Problem::Unsupported(format!(
                "it uses {kind} feature {}; ml-worker evaluates CatBoost models on float features \
                 only (CatBoost itself saves models with {kind} features only in its binary cbm \
                 format, not as JSON or ONNX)",
                feature_name(&f.feature_id, f.flat_feature_index, f.feature_index)
            )));
        }
    }
    if info.float_features.len() > MAX_FEATURES {
        return Err(format!(
            "{} float features; at most {MAX_FEATURES} are supported",
            info.float_features.len()
        )
        .into());
    }
    // by float feature index (what splits name)
    let mut columns: Vec<Option<Column>> = vec![None; info.float_features.len()];
    let mut names: Vec<Option<String>> = Vec::new();
    let mut n_features = 0usize;
    for (i, f) in info.float_features.iter().enumerate() {
        let index = f.feature_index.unwrap_or(i as u64);
        let flat = f.flat_feature_index.unwrap_or(index);
        if index >= columns.len() as u64 {
            return Err(format!(
                "float feature {i} has feature_index {index}; the model lists {} float features",
                columns.len()
            )
            .into());
        }
        if flat >= MAX_FEATURES as u64 {
            return Err(format!(
                "float feature {i} has flat_feature_index {flat}; at most {MAX_FEATURES} features are supported"
            )
            .into());
        }
        let nan_left = match f.nan_value_treatment.as_deref().unwrap_or("AsIs") {
            "AsIs" | "AsFalse" => true,
            "AsTrue" => false,
            other => {
                return Err(format!(
                    "float feature {i} has an unknown nan_value_treatment '{other}' (AsIs, AsFalse or AsTrue)"
                )
                .into())
            }
        };
        if columns[index as usize].is_some() {
            return Err(format!("float feature_index {index} is listed twice").into());
        }
        columns[index as usize] = Some(Column {
            flat: flat as u32,
            nan_left,
        });
        let flat = flat as usize;
        n_features = n_features.max(flat + 1);
        if names.len() <= flat {
            names.resize(flat + 1, None);
        }
        if names[flat].is_some() {
            return Err(format!("flat_feature_index {flat} is listed twice").into());
        }
        names[flat] = Some(f.feature_id.clone().unwrap_or_default());
    }
    let feature_names: Vec<String> = if names.iter().flatten().any(|n| !n.is_empty()) {
        names.into_iter().map(Option::unwrap_or_default).collect()
    } else {
        Vec::new()
    };

    // ---- output dimensions, scale and bias
    let (scale, bias) = match &doc.scale_and_bias {
        Some((scale, bias)) => (*scale, Some(bias.as_slice().to_vec())),
        None => (1.0, None),
    };
    if !scale.is_finite() {
        return Err(format!("scale_and_bias has scale {scale}; it must be finite").into());
    }
    let dims = match (&bias, &doc.oblivious_trees, &doc.trees) {
        (Some(b), _, _) => b.len(),
        (None, Some(t), _) => match t.first() {
            Some(t) => {
                let leaves = 1usize.checked_shl(t.splits.len() as u32).unwrap_or(0);
                if t.splits.len() > MAX_DEPTH || leaves == 0 {
                    return Err(format!("tree 0 is {} levels deep", t.splits.len()).into());
                }
                t.leaf_values.len() / leaves
            }
            None => 1,
        },
        (None, None, Some(t)) => {
            let mut node = t.first();
            while let Some(n) = node.filter(|n| n.value.is_none()) {
                node = n.left.as_deref();
            }
            node.and_then(|n| n.value.as_ref())
                .map_or(1, |v| v.as_slice().len())
        }
        (None, None, None) => 1,
    };
    if dims == 0 || dims > 100_000 {
        return Err(format!("the model has {dims} output dimensions").into());
    }
    let bias = bias.unwrap_or_else(|| vec![0.0; dims]);
    if let Some(b) = bias.iter().find(|b| !b.is_finite()) {
        return Err(format!("scale_and_bias has bias {b}; it must be finite").into());
    }

    // ---- loss: transform and classes
    let loss = doc
        .model_info
        .params
        .as_ref()
        .and_then(|p| p.loss_function.as_ref())
        .map(|l| l.kind.clone())
        .ok_or("the file does not name its loss function (model_info.params.loss_function.type)")?;
    let class_names = doc
        .model_info
        .class_params
        .as_ref()
        .map_or(0, |c| c.class_names.len());
    let (transform, n_classes) = transform(&loss, dims)?;
    if let Some(k) = n_classes {
        if class_names != 0 && class_names != k {
            return Err(format!(
                "loss {loss} with {dims} output dimensions, but class_params lists {class_names} class names"
            )
            .into());
        }
    }

    // ---- trees
    let mut ens = TreeEnsemble::empty(FlavorKind::Sklearn, n_features, dims);
    ens.max_nodes = max_nodes;
    ens.base_margin = bias;
    ens.transform = transform;
    let split = |s: &Split| float_split(s, &columns);
    // splits per feature as CatBoost counts them: once per tree and level
    // (the evaluator's layout repeats a level's split per node and per
    // dimension)
    let mut counts = vec![0.0; n_features];
    match (&doc.oblivious_trees, &doc.trees) {
        (Some(_), Some(_)) => {
            return Err("the file has both 'oblivious_trees' and 'trees'".into());
        }
        (None, None) => {
            return Err("the file has no trees ('oblivious_trees' or 'trees')".into());
        }
        (Some(trees), None) => {
            for (t, tree) in trees.iter().enumerate() {
                let locals = oblivious(tree, dims, scale, &ens, &split)
                    .map_err(|p| prefix(p, &format!("oblivious tree {t}")))?;
                for s in &tree.splits {
                    counts[split(s)?.0 as usize] += 1.0;
                }
                push(&mut ens, locals, t)?;
            }
        }
        (None, Some(trees)) => {
            for (t, tree) in trees.iter().enumerate() {
                let locals = non_symmetric(tree, dims, scale, &ens, &split)
                    .map_err(|p| prefix(p, &format!("tree {t}")))?;
                for s in locals.first().map_or(&[][..], |l| &l.splits) {
                    counts[s.feature as usize] += 1.0;
                }
                push(&mut ens, locals, t)?;
            }
        }
    }
    if ens.trees.is_empty() {
        return Err("the model has no trees".into());
    }
    ens.split_counts = Some(counts);
    ens.copies_per_tree = dims;
    ens.validate()?;
    Ok(ParsedTrees {
        ensemble: ens,
        feature_names,
        objective: loss,
        n_classes,
    })
}

fn prefix(p: Problem, what: &str) -> Problem {
    match p {
        Problem::Format(s) => Problem::Format(format!("{what}: {s}")),
        Problem::Unsupported(s) => Problem::Unsupported(format!("{what}: {s}")),
    }
}

fn push(ens: &mut TreeEnsemble, locals: Vec<LocalTree>, t: usize) -> Result<(), Problem> {
    for (dim, local) in locals.into_iter().enumerate() {
        ens.push_tree(local, dim as u32)
            .map_err(|e| format!("tree {t}: {e}"))?;
    }
    Ok(())
}

/// The output transform and class count of a loss with `dims` dimensions.
fn transform(loss: &str, dims: usize) -> Result<(Transform, Option<usize>), Problem> {
    let one = |t: Transform, classes: Option<usize>| {
        if dims == 1 {
            Ok((t, classes))
        } else {
            Err(Problem::Format(format!(
                "loss {loss} has one output dimension, but scale_and_bias / the leaves have {dims}"
            )))
        }
    };
    let sigmoid = Transform::Sigmoid { alpha: 1.0 };
    match loss {
        "RMSE" | "MAE" | "Quantile" | "Expectile" | "MAPE" | "Huber" | "Lq" | "LogCosh" => {
            one(Transform::Identity, None)
        }
        // CatBoostRegressor.predict returns exp(raw) for these
        "Poisson" | "Tweedie" => one(Transform::Exp, None),
        "Logloss" | "CrossEntropy" => one(sigmoid, Some(2)),
        "MultiClass" | "MultiClassOneVsAll" if dims < 2 => Err(Problem::Format(format!(
            "loss {loss} with {dims} output dimension; a multiclass model has at least 2"
        ))),
        "MultiClass" => Ok((Transform::Softmax, Some(dims))),
        "MultiClassOneVsAll" => Ok((sigmoid, Some(dims))),
        other => Err(Problem::Unsupported(format!(
            "loss function '{other}' is not supported (supported: {SUPPORTED})"
        ))),
    }
}

/// A split's input column, threshold (the border as `f32`) and NaN side.
fn float_split(s: &Split, columns: &[Option<Column>]) -> Result<(u32, f64, bool), Problem> {
    match s.split_type.as_deref() {
        None | Some("FloatFeature") => {}
        Some(t @ ("OneHotFeature" | "OnlineCtr")) => {
            let what = match s.cat_feature_index {
                Some(i) => format!("number {i} (a {t} split)"),
                None => format!("(a {t} split)"),
            };
            return Err(categorical_refusal(&what));
        }
        Some(other) => {
            return Err(Problem::Unsupported(format!(
                "split type '{other}' is not supported (only FloatFeature splits are)"
            )))
        }
    }
    let (Some(f), Some(border)) = (s.float_feature_index, s.border) else {
        return Err("a FloatFeature split needs 'float_feature_index' and 'border'".into());
    };
    let col = usize::try_from(f)
        .ok()
        .and_then(|f| columns.get(f).copied().flatten())
        .ok_or_else(|| {
            format!(
                "split on float feature {f}; features_info lists {} float features",
                columns.len()
            )
        })?;
    // CatBoost keeps borders as f32 and compares (float)x > border
    let threshold = border as f32;
    if !threshold.is_finite() {
        return Err(format!("split border {border} is not a finite float32").into());
    }
    Ok((col.flat, threshold as f64, col.nan_left))
}

/// CatBoost's PredictionValuesChange for two siblings: `w1 (v1 - m)^2 + w2
/// (v2 - m)^2`, `m` their weighted mean (0 when either is empty).
fn pvc(v1: f64, w1: f64, v2: f64, w2: f64) -> f64 {
    if w1 == 0.0 || w2 == 0.0 {
        return 0.0;
    }
    let m = (v1 * w1 + v2 * w2) / (w1 + w2);
    (v1 - m) * (v1 - m) * w1 + (v2 - m) * (v2 - m) * w2
}

/// Refuses a tree of `splits + leaves` nodes per dimension that would not
/// fit the node budget, before anything is built.
fn check_budget(ens: &TreeEnsemble, per_dim: usize, dims: usize) -> Result<(), Problem> {
    let adding = per_dim.saturating_mul(dims);
    if ens.nodes.len().saturating_add(adding) > ens.max_nodes {
        return Err(format!(
            "the model has more than {} tree nodes (the limit for this model file)",
            ens.max_nodes
        )
        .into());
    }
    Ok(())
}

fn scaled(v: f64, scale: f64) -> f64 {
    if scale == 1.0 {
        v
    } else {
        v * scale
    }
}

type SplitFn<'a> = dyn Fn(&Split) -> Result<(u32, f64, bool), Problem> + 'a;

/// An oblivious tree as one full binary tree per dimension: level `i` tests
/// split `i` (leaf index bit `i`); node `2^i - 1 + p` is the one reached
/// with leaf bits `p` decided so far; leaf `k` is CatBoost's leaf `k`.
fn oblivious(
    tree: &ObliviousTree,
    dims: usize,
    scale: f64,
    ens: &TreeEnsemble,
    split: &SplitFn<'_>,
) -> Result<Vec<LocalTree>, Problem> {
    let depth = tree.splits.len();
    if depth > MAX_DEPTH {
        return Err(format!("{depth} levels deep; at most {MAX_DEPTH} are supported").into());
    }
    let leaves = 1usize.checked_shl(depth as u32).unwrap_or(0);
    let expected = leaves.checked_mul(dims).filter(|_| leaves != 0);
    if expected != Some(tree.leaf_values.len()) {
        return Err(format!(
            "{} leaf values for depth {depth} and {dims} dimensions (expected {leaves} x {dims})",
            tree.leaf_values.len()
        )
        .into());
    }
    let weights = match &tree.leaf_weights {
        Some(w) if w.len() != leaves => {
            return Err(format!("{} leaf weights for {leaves} leaves", w.len()).into())
        }
        Some(w) if w.iter().any(|w| !(w.is_finite() && *w >= 0.0)) => {
            return Err(
                "a leaf weight is negative or not finite; weights are counts of training rows"
                    .into(),
            )
        }
        w => w.as_deref(),
    };
    check_budget(ens, 2 * leaves - 1, dims)?;
    let levels: Vec<(u32, f64, bool)> = tree.splits.iter().map(split).collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(dims);
    for dim in 0..dims {
        let value = |leaf: usize| tree.leaf_values[leaf * dims + dim];
        let mut splits = Vec::with_capacity(leaves - 1);
        for (level, &(feature, threshold, nan_left)) in levels.iter().enumerate() {
            for p in 0..1usize << level {
                let child = |bit: usize| -> i32 {
                    let q = p | bit << level;
                    if level + 1 == depth {
                        !(q as i32)
                    } else {
                        ((1usize << (level + 1)) - 1 + q) as i32
                    }
                };
                // PredictionValuesChange of the leaf pairs that differ in
                // bit `level` only and agree with `p` below it
                let gain = match weights {
                    Some(w) => (0..1usize << (depth - level - 1))
                        .map(|high| {
                            let a = p | high << (level + 1);
                            let b = a | 1 << level;
                            pvc(value(a), w[a], value(b), w[b])
                        })
                        .sum(),
                    None => 0.0,
                };
                splits.push(LocalSplit {
                    feature,
                    threshold,
                    flags: if nan_left { DEFAULT_LEFT } else { 0 },
                    left: child(0),
                    right: child(1),
                    gain,
                    categories: None,
                });
            }
        }
        let leaves = (0..leaves).map(|k| scaled(value(k), scale)).collect();
        out.push(LocalTree { splits, leaves });
    }
    Ok(out)
}

/// A non-symmetric tree, numbered depth-first (root = split 0, or leaf 0
/// for a single leaf), one copy per dimension.
fn non_symmetric(
    root: &Node,
    dims: usize,
    scale: f64,
    ens: &TreeEnsemble,
    split: &SplitFn<'_>,
) -> Result<Vec<LocalTree>, Problem> {
    struct Walk<'a> {
        dims: usize,
        split: &'a SplitFn<'a>,
        /// Shared split fields and one gain per dimension.
        splits: Vec<(LocalSplit, Vec<f64>)>,
        /// Leaf values, leaf-major.
        leaves: Vec<f64>,
        has_weights: bool,
        /// Nodes per dimension this tree may still add, of `max_nodes`.
        budget: usize,
        max_nodes: usize,
    }
    impl Walk<'_> {
        /// Returns the node's local reference, its weighted mean value per
        /// dimension and its weight.
        fn visit(&mut self, node: &Node, depth: usize) -> Result<(i32, Vec<f64>, f64), Problem> {
            if self.splits.len() + self.leaves.len() / self.dims >= self.budget {
                return Err(format!(
                    "the model has more than {} tree nodes (the limit for this model file)",
                    self.max_nodes
                )
                .into());
            }
            let weight = node.weight.unwrap_or(0.0);
            if !(weight.is_finite() && weight >= 0.0) {
                return Err(format!("a leaf weight is {weight}; weights are counts of training rows, finite and not negative").into());
            }
            match (&node.split, &node.left, &node.right, &node.value) {
                (None, None, None, Some(v)) => {
                    let v = v.as_slice();
                    if v.len() != self.dims {
                        return Err(format!(
                            "a leaf has {} values for {} dimensions",
                            v.len(),
                            self.dims
                        )
                        .into());
                    }
                    self.has_weights &= node.weight.is_some();
                    let leaf = (self.leaves.len() / self.dims) as i32;
                    self.leaves.extend_from_slice(v);
                    Ok((!leaf, v.to_vec(), weight))
                }
                (Some(s), Some(l), Some(r), None) => {
                    if depth >= MAX_DEPTH {
                        return Err(format!(
                            "deeper than {MAX_DEPTH} levels; at most {MAX_DEPTH} are supported"
                        )
                        .into());
                    }
                    let (feature, threshold, nan_left) = (self.split)(s)?;
                    let at = self.splits.len();
                    self.splits.push((
                        LocalSplit {
                            feature,
                            threshold,
                            flags: if nan_left { DEFAULT_LEFT } else { 0 },
                            left: 0,
                            right: 0,
                            gain: 0.0,
                            categories: None,
                        },
                        Vec::new(),
                    ));
                    let (left, vl, wl) = self.visit(l, depth + 1)?;
                    let (right, vr, wr) = self.visit(r, depth + 1)?;
                    let gains = (0..self.dims)
                        .map(|d| pvc(vl[d], wl, vr[d], wr))
                        .collect();
                    let w = wl + wr;
                    let mean = (0..self.dims)
                        .map(|d| {
                            if w > 0.0 {
                                (vl[d] * wl + vr[d] * wr) / w
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let (s, g) = &mut self.splits[at];
                    s.left = left;
                    s.right = right;
                    *g = gains;
                    Ok((at as i32, mean, w))
                }
                _ => Err(
                    "a node must be a split (with 'split', 'left' and 'right') or a leaf (with 'value')"
                        .into(),
                ),
            }
        }
    }
    let budget = ens.max_nodes.saturating_sub(ens.nodes.len()) / dims;
    let mut walk = Walk {
        dims,
        split,
        splits: Vec::new(),
        leaves: Vec::new(),
        has_weights: true,
        budget,
        max_nodes: ens.max_nodes,
    };
    walk.visit(root, 0)?;
    let n_leaves = walk.leaves.len() / dims;
    check_budget(ens, walk.splits.len() + n_leaves, dims)?;
    let mut out = Vec::with_capacity(dims);
    for dim in 0..dims {
        let splits = walk
            .splits
            .iter()
            .map(|(s, g)| LocalSplit {
                gain: if walk.has_weights { g[dim] } else { 0.0 },
                ..s.clone()
            })
            .collect();
        let leaves = (0..n_leaves)
            .map(|k| scaled(walk.leaves[k * dims + dim], scale))
            .collect();
        out.push(LocalTree { splits, leaves });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tree::predict_trees;
    use crate::model::ImportanceType;
    use serde_json::{json, Value};

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    fn load(case: &str) -> (ParsedTrees, Value) {
        let bytes = std::fs::read(fixtures().join(format!("{case}.json"))).unwrap();
        let parsed = parse(&bytes, Path::new(case)).unwrap_or_else(|e| panic!("{case}: {e}"));
        let golden: Value = serde_json::from_slice(
            &std::fs::read(fixtures().join(format!("{case}.golden.json"))).unwrap(),
        )
        .unwrap();
        (parsed, golden)
    }

    fn rows(golden: &Value) -> (Vec<f64>, usize, usize) {
        let inputs = golden["inputs"].as_array().unwrap();
        let nf = golden["features"].as_array().unwrap().len();
        let data: Vec<f64> = inputs
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter())
            .map(|v| v.as_f64().unwrap_or(f64::NAN))
            .collect();
        (data, inputs.len(), nf)
    }

    fn floats(v: &Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|x| match x.as_array() {
                Some(a) => a.iter().map(|y| y.as_f64().unwrap()).collect(),
                None => vec![x.as_f64().unwrap()],
            })
            .collect()
    }

    /// Largest `|a - b| / max(|a|, |b|)`, failing beyond 1e-9 relative + 1e-12 absolute.
    fn compare(case: &str, what: &str, got: &[f64], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len(), "{case} {what}: length");
        let mut worst = 0f64;
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            let d = (a - b).abs();
            assert!(
                d <= 1e-9 * a.abs().max(b.abs()) + 1e-12,
                "{case} {what} [{i}]: got {a}, CatBoost {b}"
            );
            worst = worst.max(d / a.abs().max(b.abs()).max(1e-300));
        }
        worst
    }

    const CASES: [&str; 6] = [
        "cb_regression",
        "cb_regression_nanmax",
        "cb_binary",
        "cb_multiclass",
        "cb_depthwise",
        "cb_lossguide_multiclass",
    ];

    #[test]
    fn fixtures_match_catboost() {
        for case in CASES {
            let (p, g) = load(case);
            let ens = &p.ensemble;
            let (data, n, nf) = rows(&g);
            assert_eq!(ens.n_features, nf, "{case}");
            assert_eq!(
                p.feature_names,
                floats_names(&g["features"]),
                "{case}: feature names"
            );
            assert!(
                data.iter().filter(|v| v.is_nan()).count() > n,
                "{case}: NaN inputs"
            );
            let raw = ens.raw_scores(&data, n);
            let mut worst = compare(case, "raw", &raw, &floats(&g["raw_formula_val"]));
            // QuickScorer (when it takes the model) and the walk give the same bits
            assert_eq!(
                raw.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                ens.walk_scores(&data, n)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "{case}: quick scorer and walk differ"
            );
            // rows on the borders, a float32 step or a double step away, and
            // beyond the float32 range (the f32 cast and `>`)
            if let Some(border_rows) = g["border_inputs"].as_array() {
                let x: Vec<f64> = floats(&g["border_inputs"]);
                let got = ens.raw_scores(&x, border_rows.len());
                worst = worst.max(compare(
                    case,
                    "border rows",
                    &got,
                    &floats(&g["border_raw_formula_val"]),
                ));
            }
            let classification = g["task_type"] == "classification";
            let pred = predict_trees(ens, &data, n, classification);
            if classification {
                assert_eq!(p.n_classes, g["n_classes"].as_u64().map(|k| k as usize));
                let probs = pred.probabilities.as_ref().unwrap();
                worst = worst.max(compare(
                    case,
                    "probabilities",
                    &probs.values,
                    &floats(&g["probabilities"]),
                ));
                assert_eq!(
                    pred.values.values,
                    floats(&g["prediction"]),
                    "{case}: class"
                );
            } else {
                assert_eq!(p.n_classes, None);
                worst = worst.max(compare(
                    case,
                    "prediction",
                    &pred.values.values,
                    &floats(&g["prediction"]),
                ));
            }
            // every row alone gives the same bits as in the batch
            for r in 0..n {
                let one = ens.raw_scores(&data[r * nf..(r + 1) * nf], 1);
                assert_eq!(
                    one,
                    raw[r * ens.n_groups..(r + 1) * ens.n_groups],
                    "{case} row {r}"
                );
            }
            // Gain importance is CatBoost's PredictionValuesChange before its
            // normalisation to 100
            let gain = ens.importance(ImportanceType::Gain);
            let total: f64 = gain.iter().sum();
            let gain: Vec<f64> = gain.iter().map(|g| g / total * 100.0).collect();
            let fi = compare(
                case,
                "feature importance",
                &gain,
                &floats(&g["feature_importance"]),
            );
            eprintln!(
                "{case:26} rows {n:4}  trees {:4}  max relative difference {worst:.3e} (importance {fi:.3e}), quick scorer: {}",
                ens.n_trees(),
                ens.uses_quick_scorer()
            );
        }
    }

    fn floats_names(v: &Value) -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn objectives_and_shapes() {
        let (p, _) = load("cb_multiclass");
        assert_eq!(p.objective, "MultiClass");
        assert_eq!(p.n_classes, Some(3));
        assert_eq!(p.ensemble.n_groups, 3);
        assert_eq!(p.ensemble.transform, Transform::Softmax);
        assert_eq!(p.ensemble.flavor, FlavorKind::Sklearn);
        let (p, _) = load("cb_binary");
        assert_eq!((p.objective.as_str(), p.n_classes), ("Logloss", Some(2)));
        assert_eq!(p.ensemble.transform, Transform::Sigmoid { alpha: 1.0 });
        let (p, _) = load("cb_regression");
        assert_eq!((p.objective.as_str(), p.n_classes), ("RMSE", None));
        assert_eq!(p.ensemble.base_margin.len(), 1);
        assert!(p.ensemble.base_margin[0] > 100.0);
        // split counts as CatBoost counts them: one per tree and level
        // (30 trees of depth 5), not per node of the expanded layout
        let splits: f64 = p.ensemble.importance(ImportanceType::Split).iter().sum();
        assert_eq!(splits, (30 * 5) as f64);
        assert_eq!(p.ensemble.n_model_trees(), 30);
        // a multiclass model's trees hold a value per class: counted once
        let (p, _) = load("cb_multiclass");
        assert_eq!(p.ensemble.n_model_trees() * 3, p.ensemble.n_trees());
        let (p, _) = load("cb_lossguide_multiclass");
        assert_eq!(p.ensemble.n_model_trees() * 3, p.ensemble.n_trees());
    }

    #[test]
    fn categorical_models_are_refused_with_the_way_out() {
        let bytes = std::fs::read(fixtures().join("cb_categorical.json")).unwrap();
        let e = parse(&bytes, Path::new("cb_categorical.json")).unwrap_err();
        assert!(matches!(e, ModelError::Unsupported(_)), "{e:?}");
        let msg = e.to_string();
        for want in [
            "categorical feature 'color'",
            "input column 2",
            "ONNX",
            "cb_categorical.json",
        ] {
            assert!(msg.contains(want), "{msg}");
        }
    }

    /// A depth-1 regressor on two features, with `f` applied to the document.
    fn doc(f: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut d = json!({
            "features_info": {"float_features": [
                {"feature_index": 0, "flat_feature_index": 0, "nan_value_treatment": "AsTrue", "feature_id": "a", "borders": [0.5]},
                {"feature_index": 1, "flat_feature_index": 1, "nan_value_treatment": "AsIs", "feature_id": "", "borders": []}
            ]},
            "model_info": {"params": {"loss_function": {"type": "RMSE", "params": {}}}},
            "oblivious_trees": [{
                "splits": [{"border": 0.5, "float_feature_index": 0, "split_index": 0, "split_type": "FloatFeature"}],
                "leaf_values": [1.0, 2.0], "leaf_weights": [3, 4]
            }],
            "scale_and_bias": [2, [10]]
        });
        f(&mut d);
        serde_json::to_vec(&d).unwrap()
    }

    fn try_parse(bytes: &[u8]) -> Result<ParsedTrees, String> {
        parse(bytes, Path::new("m.json")).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_a_minimal_model() {
        let p = try_parse(&doc(|_| {})).unwrap();
        assert_eq!(p.feature_names, vec!["a".to_string(), String::new()]);
        let s = p
            .ensemble
            .transformed(&[0.5, 0.0, 0.50000001, 0.0, f64::NAN, 0.0], 3);
        // 0.50000001 rounds to the f32 0.5: not greater; NaN is AsTrue: right
        assert_eq!(s, vec![12.0, 12.0, 14.0]);
    }

    #[test]
    fn hostile_documents_are_errors() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "EOF"),
            (b"[1, 2]".to_vec(), "invalid type"),
            (b"{\"oblivious_trees\": [".to_vec(), "EOF"),
            (
                doc(|d| d["oblivious_trees"][0]["splits"][0]["border"] = json!("x")),
                "invalid type",
            ),
            (
                doc(|d| d["oblivious_trees"][0]["splits"][0]["float_feature_index"] = json!(7)),
                "float feature 7",
            ),
            (
                doc(|d| d["oblivious_trees"][0]["splits"][0]["float_feature_index"] = json!(-1)),
                "invalid value",
            ),
            (
                doc(|d| d["oblivious_trees"][0]["splits"][0]["border"] = json!(1e300)),
                "finite float32",
            ),
            (
                doc(|d| d["oblivious_trees"][0]["leaf_values"] = json!([1.0])),
                "1 leaf values",
            ),
            (
                doc(|d| d["oblivious_trees"][0]["leaf_values"] = json!([1e308, 0])),
                "finite",
            ),
            (
                doc(|d| d["oblivious_trees"][0]["leaf_weights"] = json!([1])),
                "leaf weights",
            ),
            (
                doc(|d| {
                    d["oblivious_trees"][0]["splits"] =
                        json!(vec![d["oblivious_trees"][0]["splits"][0].clone(); 40])
                }),
                "40 levels",
            ),
            (
                doc(|d| d["scale_and_bias"] = json!([1, [0, 0]])),
                "one output dimension",
            ),
            (
                doc(|d| d["scale_and_bias"] = json!(["x", [0]])),
                "invalid type",
            ),
            (doc(|d| d["model_info"] = json!({})), "loss function"),
            (
                doc(|d| d["model_info"]["params"]["loss_function"]["type"] = json!("MultiRMSE")),
                "'MultiRMSE' is not supported",
            ),
            (
                doc(|d| d["model_info"]["params"]["loss_function"]["type"] = json!("MultiClass")),
                "at least 2",
            ),
            (
                doc(|d| {
                    d["features_info"]["float_features"][0]["nan_value_treatment"] =
                        json!("Sometimes")
                }),
                "Sometimes",
            ),
            (
                doc(|d| d["features_info"]["float_features"][1]["feature_index"] = json!(0)),
                "listed twice",
            ),
            (
                doc(|d| {
                    d["features_info"]["float_features"][1]["flat_feature_index"] = json!(5_000_000)
                }),
                "flat_feature_index",
            ),
            (doc(|d| d["oblivious_trees"] = json!([])), "no trees"),
            (
                doc(|d| {
                    d.as_object_mut().unwrap().remove("oblivious_trees");
                }),
                "no trees",
            ),
            (doc(|d| d["trees"] = json!([{"value": 1.0}])), "both"),
            (
                doc(|d| {
                    d["oblivious_trees"][0]["splits"][0]["split_type"] = json!("OneHotFeature")
                }),
                "categorical feature",
            ),
            (
                doc(|d| d["oblivious_trees"][0]["splits"][0]["split_type"] = json!("Estimated")),
                "'Estimated'",
            ),
            (doc(|d| d["ctr_data"] = json!({"x": {}})), "CTR"),
            (
                doc(|d| {
                    d["features_info"]["text_features"] =
                        json!([{"feature_id": "review", "flat_feature_index": 2}])
                }),
                "text feature 'review'",
            ),
            (
                doc(|d| d["features_info"]["embedding_features"] = json!([{"feature_index": 0}])),
                "embedding feature",
            ),
        ];
        for (i, (bytes, want)) in cases.iter().enumerate() {
            let e = try_parse(bytes)
                .err()
                .unwrap_or_else(|| panic!("case {i} parsed"));
            assert!(e.contains(want), "case {i}: {e}");
        }
    }

    fn nonsym(tree: Value) -> Vec<u8> {
        doc(|d| {
            d.as_object_mut().unwrap().remove("oblivious_trees");
            d["trees"] = json!([tree]);
        })
    }

    #[test]
    fn non_symmetric_trees_and_their_limits() {
        let leaf = |v: f64| json!({"value": v, "weight": 1});
        let split = |f: u32, b: f64| json!({"border": b, "float_feature_index": f, "split_type": "FloatFeature"});
        let t = json!({"split": split(0, 0.0), "left": leaf(1.0),
                       "right": {"split": split(1, 1.0), "left": leaf(2.0), "right": leaf(3.0)}});
        let p = try_parse(&nonsym(t)).unwrap();
        let s = p
            .ensemble
            .transformed(&[-1.0, 5.0, 1.0, 0.0, 1.0, 2.0, f64::NAN, f64::NAN], 4);
        // scale 2, bias 10; NaN on feature 0 (AsTrue) right, on feature 1 (AsIs) left
        assert_eq!(s, vec![12.0, 14.0, 16.0, 14.0]);
        let single = try_parse(&nonsym(leaf(4.0))).unwrap();
        assert_eq!(single.ensemble.transformed(&[0.0, 0.0], 1), vec![18.0]);

        let mut deep = leaf(0.0);
        for _ in 0..40 {
            deep = json!({"split": split(0, 0.0), "left": deep, "right": leaf(1.0)});
        }
        assert!(try_parse(&nonsym(deep))
            .unwrap_err()
            .contains("deeper than 32"));
        // nesting beyond serde_json's limit is an error, not a stack overflow
        let mut text = String::new();
        for _ in 0..5000 {
            text.push_str("{\"split\":{\"border\":0,\"float_feature_index\":0},\"right\":{\"value\":1},\"left\":");
        }
        text.push_str("{\"value\":1}");
        text.push_str(&"}".repeat(5000));
        let bytes = nonsym(json!("@")).replace_bytes("\"@\"", &text);
        assert!(try_parse(&bytes).unwrap_err().contains("recursion limit"));

        for (t, want) in [
            (
                json!({"split": split(0, 0.0), "left": leaf(1.0)}),
                "a node must be",
            ),
            (
                json!({"split": split(0, 0.0), "left": leaf(1.0), "right": leaf(1.0), "value": 1}),
                "a node must be",
            ),
            (
                json!({"split": split(9, 0.0), "left": leaf(1.0), "right": leaf(1.0)}),
                "float feature 9",
            ),
            (json!({"value": [1.0, 2.0]}), "2 values for 1 dimensions"),
            (
                json!({"value": "x"}),
                "expected a number or a list of numbers",
            ),
        ] {
            let e = try_parse(&nonsym(t)).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    trait Replace {
        fn replace_bytes(&self, from: &str, to: &str) -> Vec<u8>;
    }
    impl Replace for Vec<u8> {
        fn replace_bytes(&self, from: &str, to: &str) -> Vec<u8> {
            String::from_utf8(self.clone())
                .unwrap()
                .replace(from, to)
                .into_bytes()
        }
    }

    /// Damaged copies of the fixtures (bytes flipped, dropped or repeated)
    /// parse or fail, and whatever parses evaluates, without a panic.
    #[test]
    fn damaged_fixtures_never_panic() {
        let mut state = 0x5eed_cb01_u64;
        let mut next = move |n: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as usize) % n.max(1)
        };
        let (mut parsed, mut failed) = (0, 0);
        for case in ["cb_multiclass", "cb_depthwise", "cb_lossguide_multiclass"] {
            let good = std::fs::read(fixtures().join(format!("{case}.json"))).unwrap();
            for _ in 0..150 {
                let mut b = good.clone();
                for _ in 0..1 + next(4) {
                    let at = next(b.len());
                    match next(4) {
                        0 => b[at] = b"0123456789-.,:{}[]\"e"[next(19)],
                        1 => {
                            b.remove(at);
                        }
                        2 => b.insert(at, b[next(b.len())]),
                        _ => b.truncate(at.max(1)),
                    }
                }
                match parse(&b, Path::new(case)) {
                    Ok(p) => {
                        let n = p.ensemble.n_features;
                        let rows: Vec<f64> =
                            (0..3 * n).map(|i| [f64::NAN, 0.3, -2.0][i % 3]).collect();
                        let s = p.ensemble.transformed(&rows, 3);
                        assert_eq!(s.len(), 3 * p.ensemble.n_groups);
                        parsed += 1;
                    }
                    Err(_) => failed += 1,
                }
            }
        }
        assert!(parsed > 0 && failed > 0, "{parsed} parsed, {failed} failed");
    }

    /// What `MAX_DOCUMENT_VALUES` says a read value costs at most.
    #[test]
    fn read_values_are_small() {
        assert!(
            std::mem::size_of::<Node>() <= 72,
            "{}",
            std::mem::size_of::<Node>()
        );
        assert!(
            std::mem::size_of::<Split>() <= 72,
            "{}",
            std::mem::size_of::<Split>()
        );
        assert!(std::mem::size_of::<FloatFeature>() <= 80);
    }

    #[test]
    fn node_budget_is_checked_before_building() {
        let bytes = std::fs::read(fixtures().join("cb_multiclass.json")).unwrap();
        // 25 trees of depth 4 and 3 classes: 25 * 3 * 31 nodes
        assert!(parse_limited(&bytes, Path::new("m"), 25 * 3 * 31).is_ok());
        let e = parse_limited(&bytes, Path::new("m"), 25 * 3 * 31 - 1).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        let bytes = std::fs::read(fixtures().join("cb_depthwise.json")).unwrap();
        let n = parse(&bytes, Path::new("m")).unwrap().ensemble.nodes.len();
        assert!(parse_limited(&bytes, Path::new("m"), n).is_ok());
        let e = parse_limited(&bytes, Path::new("m"), n - 1).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[test]
    fn losses() {
        for (loss, t, k) in [
            ("MAE", Transform::Identity, None),
            ("Quantile", Transform::Identity, None),
            ("Poisson", Transform::Exp, None),
            ("CrossEntropy", Transform::Sigmoid { alpha: 1.0 }, Some(2)),
        ] {
            let p = try_parse(&doc(|d| {
                d["model_info"]["params"]["loss_function"]["type"] = json!(loss)
            }))
            .unwrap();
            assert_eq!((p.ensemble.transform, p.n_classes), (t, k), "{loss}");
        }
        let two_dims = |loss: &str| {
            doc(|d| {
                d["model_info"]["params"]["loss_function"]["type"] = json!(loss);
                d["scale_and_bias"] = json!([1, [0, 0]]);
                d["oblivious_trees"][0]["leaf_values"] = json!([1, 2, 3, 4]);
            })
        };
        let p = try_parse(&two_dims("MultiClassOneVsAll")).unwrap();
        assert_eq!(p.n_classes, Some(2));
        // leaf-major: leaf 0 = [1, 2], leaf 1 = [3, 4]
        assert_eq!(
            p.ensemble.raw_scores(&[0.0, 0.0, 1.0, 0.0], 2),
            vec![1.0, 2.0, 3.0, 4.0]
        );
        let e = try_parse(&two_dims("RMSEWithUncertainty")).unwrap_err();
        assert!(e.contains("'RMSEWithUncertainty' is not supported"), "{e}");
    }
}
