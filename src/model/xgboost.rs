//! XGBoost JSON and UBJSON model files (`Booster.save_model("m.json" | "m.ubj")`),
//! read into the native [`TreeEnsemble`].
//!
//! Supported: `gbtree` and `dart` boosters, numerical and categorical
//! (partition) splits, default directions for missing values, `base_score`
//! (scalar or per-class/per-target vector), and the objectives' transforms.
//! XGBoost computes in `f32`; so does the evaluator for these models.

use std::path::Path;

use serde_json::Value;

use super::tree::{
    bitset_from, FlavorKind, LocalSplit, LocalTree, ParsedTrees, Transform, TreeEnsemble,
    CATEGORICAL, DEFAULT_LEFT, MAX_CAT_WORDS,
};
use super::{ubjson, ModelError};

fn err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Format {
        path: path.to_path_buf(),
        format: "XGBoost",
        reason: reason.into(),
    }
}

/// `kind: xgboost`: XGBoost JSON and UBJSON models, on the native evaluator.
pub struct Loader;

impl super::loader::ModelLoader for Loader {
    fn kind(&self) -> &str {
        "xgboost"
    }

    fn load(
        &self,
        bytes: &[u8],
        ctx: &super::loader::LoadContext<'_>,
    ) -> Result<super::loader::Loaded, ModelError> {
        super::tree::TreeModel::serve(parse(bytes, ctx.path)?, ctx, "xgboost")
    }
}

/// Parses an XGBoost model from JSON text or UBJSON bytes (detected from the
/// first byte: `{` followed by `"` or whitespace is JSON).
pub fn parse(bytes: &[u8], path: &Path) -> Result<ParsedTrees, ModelError> {
    let max_values = max_values(bytes.len());
    let doc: Value = if looks_like_json(bytes) {
        // a JSON value is at least one byte plus a separator: an upper
        // bound on the values, counted before anything is built
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
        serde_json::from_slice(bytes).map_err(|e| err(path, format!("invalid JSON: {e}")))?
    } else {
        ubjson::decode(bytes, max_values).map_err(|e| err(path, format!("invalid UBJSON: {e}")))?
    };
    from_document(&doc).map_err(|e| err(path, e))
}

/// Most values (numbers, strings, containers) a model document may hold:
/// 64 Mi, about 2 GiB once decoded. XGBoost models of thousands of deep
/// trees hold tens of millions.
pub const MAX_DOCUMENT_VALUES: usize = 1 << 26;

/// Most values a document of `len` bytes may hold: one per two bytes (a
/// JSON value takes at least that with its separator; XGBoost's UBJSON
/// takes about 3.4 bytes a value) plus 2 Mi, at most
/// [`MAX_DOCUMENT_VALUES`]. A decoded value takes 32 bytes, so memory
/// stays within 16 times the file plus 64 MiB, however the document
/// declares its counts.
fn max_values(len: usize) -> usize {
    (len / 2 + (1 << 21)).min(MAX_DOCUMENT_VALUES)
}

fn looks_like_json(b: &[u8]) -> bool {
    let mut it = b.iter().skip_while(|c| c.is_ascii_whitespace());
    it.next() == Some(&b'{')
        && matches!(
            it.find(|c| !c.is_ascii_whitespace()),
            Some(b'"') | Some(b'}')
        )
}

/// `doc[a][b]...`, with the path in the error.
fn at<'a>(doc: &'a Value, keys: &[&str]) -> Result<&'a Value, String> {
    let mut v = doc;
    for k in keys {
        v = v
            .get(*k)
            .ok_or_else(|| format!("missing '{}'", keys.join(".")))?;
    }
    Ok(v)
}

/// XGBoost writes most parameters as strings ("3", "5E-1"); accept numbers too.
fn num(v: &Value, what: &str) -> Result<f64, String> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| format!("'{what}' is not a number")),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("'{what}' = '{s}' is not a number")),
        Value::Bool(b) => Ok(*b as u8 as f64),
        _ => Err(format!("'{what}' is not a number")),
    }
}

fn count(v: &Value, what: &str) -> Result<usize, String> {
    let x = num(v, what)?;
    if !(0.0..=1e9).contains(&x) || x.fract() != 0.0 {
        return Err(format!("'{what}' = {x} is not a valid count"));
    }
    Ok(x as usize)
}

/// `base_score` as a list: "5E-1", "[5E-1]", "[1E0,2E0]" or a number.
fn base_scores(v: &Value) -> Result<Vec<f64>, String> {
    match v {
        Value::String(s) => s
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("bad base_score '{s}'"))
            })
            .collect(),
        Value::Array(a) => a.iter().map(|x| num(x, "base_score")).collect(),
        other => Ok(vec![num(other, "base_score")?]),
    }
}

fn array<'a>(tree: &'a Value, key: &str, n: usize) -> Result<&'a Vec<Value>, String> {
    let a = tree
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("tree has no '{key}' array"))?;
    if a.len() != n && n != usize::MAX {
        return Err(format!("'{key}' has {} entries, expected {n}", a.len()));
    }
    Ok(a)
}

fn ints(tree: &Value, key: &str, n: usize) -> Result<Vec<i64>, String> {
    array(tree, key, n)?
        .iter()
        .map(|v| match v {
            Value::Bool(b) => Ok(*b as i64),
            v => v
                .as_i64()
                .or_else(|| v.as_f64().map(|f| f as i64))
                .ok_or_else(|| format!("'{key}' has a non-integer")),
        })
        .collect()
}

fn floats(tree: &Value, key: &str, n: usize) -> Result<Vec<f64>, String> {
    array(tree, key, n)?.iter().map(|v| num(v, key)).collect()
}

/// Output transform, whether `base_score` is in probability space with a
/// logit or log link, and the class count, by objective name.
fn objective(name: &str, num_class: usize) -> Result<(Transform, Link, Option<usize>), String> {
    Ok(match name {
        "binary:logistic" => (Transform::Sigmoid { alpha: 1.0 }, Link::Logit, Some(2)),
        "reg:logistic" => (Transform::Sigmoid { alpha: 1.0 }, Link::Logit, None),
        "binary:logitraw" => (Transform::Identity, Link::Logit, None),
        "binary:hinge" => (Transform::Hinge, Link::Identity, Some(2)),
        "multi:softprob" | "multi:softmax" => (Transform::Softmax, Link::Identity, Some(num_class)),
        "count:poisson" | "reg:gamma" | "reg:tweedie" | "survival:cox" | "survival:aft" => {
            (Transform::Exp, Link::Log, None)
        }
        "reg:squarederror"
        | "reg:squaredlogerror"
        | "reg:pseudohubererror"
        | "reg:absoluteerror"
        | "reg:quantileerror"
        | "reg:linear"
        | "rank:pairwise"
        | "rank:ndcg"
        | "rank:map" => (Transform::Identity, Link::Identity, None),
        other => return Err(format!("unsupported objective '{other}'")),
    })
}

#[derive(Clone, Copy)]
enum Link {
    Identity,
    Logit,
    Log,
}

impl Link {
    /// XGBoost's `ProbToMargin`, in f32.
    fn margin(self, p: f64) -> f64 {
        let p = p as f32;
        (match self {
            Link::Identity => p,
            Link::Logit => -(1.0f32 / p - 1.0).ln(),
            Link::Log => p.ln(),
        }) as f64
    }
}

fn from_document(doc: &Value) -> Result<ParsedTrees, String> {
    // the memory snapshot (`Booster.__getstate__`, XGBoosterSerializeToBuffer)
    // wraps the model as {"Config": ..., "Model": {"learner": ...}}
    let doc = match doc.get("Model") {
        Some(model) if doc.get("learner").is_none() => model,
        _ => doc,
    };
    let learner = at(doc, &["learner"])?;
    let param = at(learner, &["learner_model_param"])?;
    let n_features = count(at(param, &["num_feature"])?, "num_feature")?;
    let num_class = count(at(param, &["num_class"])?, "num_class")?;
    let num_target = param
        .get("num_target")
        .map(|v| count(v, "num_target"))
        .transpose()?
        .unwrap_or(1);
    if n_features > super::MAX_FEATURES || num_class > 100_000 || num_target > 100_000 {
        return Err(format!(
            "implausible model shape: num_feature={n_features}, num_class={num_class}, num_target={num_target}"
        ));
    }
    let obj_name = at(learner, &["objective", "name"])?
        .as_str()
        .ok_or("objective name is not a string")?
        .to_string();
    let (transform, link, classes) = objective(&obj_name, num_class)?;
    if let Some(k) = classes.filter(|k| *k < 2) {
        return Err(format!(
            "objective '{obj_name}' is a classifier with num_class={k}; a classifier needs at least 2 classes"
        ));
    }
    let n_groups = num_class.max(num_target).max(1);

    let booster = at(learner, &["gradient_booster"])?;
    let booster_name = booster
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("gbtree");
    let (model, weights) = match booster_name {
        "gbtree" => (at(booster, &["model"])?, None),
        "dart" => {
            let w = floats(booster, "weight_drop", usize::MAX)?;
            (at(booster, &["gbtree", "model"])?, Some(w))
        }
        other => {
            return Err(format!(
                "booster '{other}' is not supported (only gbtree and dart)"
            ))
        }
    };
    let trees = at(model, &["trees"])?
        .as_array()
        .ok_or("'trees' is not an array")?;
    let tree_info = ints(model, "tree_info", trees.len())?;
    if let Some(w) = &weights {
        if w.len() != trees.len() {
            return Err(format!(
                "dart has {} weights for {} trees",
                w.len(),
                trees.len()
            ));
        }
    }

    let mut ens = TreeEnsemble::empty(FlavorKind::XgBoost, n_features, n_groups);
    for (t, tree) in trees.iter().enumerate() {
        let group = tree_info[t];
        if group < 0 || group as usize >= n_groups {
            return Err(format!("tree {t} belongs to output {group} of {n_groups}"));
        }
        let mut local = read_tree(tree, n_features).map_err(|e| format!("tree {t}: {e}"))?;
        if let Some(w) = &weights {
            let w = w[t] as f32;
            local
                .leaves
                .iter_mut()
                .for_each(|l| *l = (*l as f32 * w) as f64);
        }
        ens.push_tree(local, group as u32)
            .map_err(|e| format!("tree {t}: {e}"))?;
    }

    let base = base_scores(at(param, &["base_score"])?)?;
    ens.base_margin = match base.len() {
        1 => vec![link.margin(base[0]); n_groups],
        n if n == n_groups => base.iter().map(|b| link.margin(*b)).collect(),
        n => return Err(format!("base_score has {n} values for {n_groups} outputs")),
    };
    ens.transform = transform;
    ens.validate()?;

    let feature_names = match learner.get("feature_names").and_then(Value::as_array) {
        Some(a) if a.len() == n_features => a
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect(),
        _ => Vec::new(),
    };
    Ok(ParsedTrees {
        ensemble: ens,
        feature_names,
        objective: obj_name,
        n_classes: classes,
    })
}

/// One XGBoost tree (nodes with `left_children[i] == -1` are leaves whose
/// value is `split_conditions[i]`) in local split/leaf numbering.
fn read_tree(tree: &Value, n_features: usize) -> Result<LocalTree, String> {
    let tp = at(tree, &["tree_param"])?;
    let n = count(at(tp, &["num_nodes"])?, "num_nodes")?;
    if let Some(s) = tp.get("size_leaf_vector") {
        if count(s, "size_leaf_vector")? > 1 {
            return Err(
                "vector-leaf trees (multi_strategy=multi_output_tree) are not supported".into(),
            );
        }
    }
    if n == 0 {
        return Err("tree has no nodes".into());
    }
    let left = ints(tree, "left_children", n)?;
    let right = ints(tree, "right_children", n)?;
    let feature = ints(tree, "split_indices", n)?;
    // XGBoost stores f32; JSON prints the shortest decimal, so round back to
    // the exact f32 the library compares against
    let cond: Vec<f64> = floats(tree, "split_conditions", n)?
        .into_iter()
        .map(|c| c as f32 as f64)
        .collect();
    let default_left = ints(tree, "default_left", n)?;
    let gain = floats(tree, "loss_changes", n).unwrap_or_else(|_| vec![0.0; n]);
    let split_type = match tree.get("split_type") {
        Some(_) => ints(tree, "split_type", n)?,
        None => vec![0; n],
    };
    // categorical splits: node -> category list
    let mut cats: Vec<Option<Vec<u32>>> = vec![None; n];
    if split_type.contains(&1) {
        let nodes = ints(tree, "categories_nodes", usize::MAX)?;
        let segs = ints(tree, "categories_segments", nodes.len())?;
        let sizes = ints(tree, "categories_sizes", nodes.len())?;
        let values = ints(tree, "categories", usize::MAX)?;
        let mut cat_words = 0usize;
        for k in 0..nodes.len() {
            let (node, seg, size) = (nodes[k], segs[k], sizes[k]);
            let end = seg
                .checked_add(size)
                .filter(|e| seg >= 0 && size >= 0 && *e as u64 <= values.len() as u64);
            let (Some(end), true) = (end, node >= 0 && (node as u64) < n as u64) else {
                return Err(format!("categorical split {k} is out of range"));
            };
            let list = &values[seg as usize..end as usize];
            if list.iter().any(|c| *c < 0 || *c >= 1 << 24) {
                return Err(format!("categorical split {k} has an invalid category"));
            }
            // the bitset spans up to the largest category: bound the total
            cat_words += list.iter().map(|c| *c as usize / 32 + 1).max().unwrap_or(0);
            if cat_words > MAX_CAT_WORDS {
                return Err("categorical splits are too large".into());
            }
            cats[node as usize] = Some(bitset_from(list.iter().map(|c| *c as u32)));
        }
    }
    // local numbering: splits and leaves each in node order, root first
    let mut local_ref = vec![0i32; n];
    let (mut n_splits, mut n_leaves) = (0i32, 0i32);
    for i in 0..n {
        if left[i] == -1 {
            local_ref[i] = !n_leaves;
            n_leaves += 1;
        } else {
            local_ref[i] = n_splits;
            n_splits += 1;
        }
    }
    if left[0] != -1 && local_ref[0] != 0 {
        return Err("root is not the first node".into());
    }
    let child = |c: i64| -> Result<i32, String> {
        if c <= 0 || c as usize >= n {
            return Err(format!("child reference {c} out of range"));
        }
        Ok(local_ref[c as usize])
    };
    let mut out = LocalTree::default();
    for i in 0..n {
        if left[i] == -1 {
            out.leaves.push(cond[i]);
            continue;
        }
        if feature[i] < 0 || feature[i] as usize >= n_features {
            return Err(format!(
                "node {i} splits on feature {} of {n_features}",
                feature[i]
            ));
        }
        let mut flags = if default_left[i] != 0 {
            DEFAULT_LEFT
        } else {
            0
        };
        let categories = if split_type[i] == 1 {
            flags |= CATEGORICAL;
            Some(
                cats[i]
                    .clone()
                    .ok_or_else(|| format!("categorical node {i} has no categories"))?,
            )
        } else {
            None
        };
        out.splits.push(LocalSplit {
            feature: feature[i] as u32,
            threshold: cond[i],
            flags,
            left: child(left[i])?,
            right: child(right[i])?,
            gain: gain[i],
            categories,
        });
    }
    if left[0] == -1 {
        // a single-leaf tree
        out.splits.clear();
        out.leaves.truncate(1);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(objective: &str, base: &str) -> Value {
        serde_json::json!({"learner": {
            "learner_model_param": {"base_score": base, "num_class": "0", "num_feature": "2", "num_target": "1"},
            "objective": {"name": objective},
            "gradient_booster": {"name": "gbtree", "model": {"tree_info": [0], "trees": [{
                "tree_param": {"num_nodes": "3", "size_leaf_vector": "1"},
                "left_children": [1, -1, -1], "right_children": [2, -1, -1],
                "split_indices": [1, 0, 0], "split_conditions": [0.5, -1.0, 1.0],
                "default_left": [1, 0, 0], "loss_changes": [2.0, 0.0, 0.0], "split_type": [0, 0, 0]
            }]}}
        }})
    }

    #[test]
    fn reads_a_minimal_regressor() {
        let p = from_document(&doc("reg:squarederror", "[5E-1]")).unwrap();
        let s = p
            .ensemble
            .transformed(&[0.0, 0.4, 0.0, 0.5, 0.0, f64::NAN], 3);
        // strict `<`: 0.5 goes right; NaN goes default-left
        assert_eq!(s, vec![-0.5, 1.5, -0.5]);
    }

    #[test]
    fn logistic_base_score_is_a_probability() {
        let p = from_document(&doc("binary:logistic", "5E-1")).unwrap();
        assert_eq!(p.ensemble.base_margin, vec![0.0]);
        assert_eq!(p.n_classes, Some(2));
    }

    #[test]
    fn unknown_objective_is_named() {
        let e = from_document(&doc("reg:mystery", "0.5")).unwrap_err();
        assert!(e.contains("reg:mystery"), "{e}");
    }
}
