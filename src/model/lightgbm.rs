//! LightGBM text model files (`Booster.save_model`), read into the native
//! [`TreeEnsemble`].
//!
//! Supported: `gbdt`/`dart`/`goss`/`rf` boosting (`average_output`), numerical
//! and categorical splits, `missing_type` None/Zero/NaN with `default_left`,
//! and the objectives' output transforms (sigmoid, softmax, one-vs-all
//! sigmoid, exp, `regression sqrt`, `cross_entropy_lambda`). Linear trees are
//! refused with a clear error.

use std::collections::HashMap;
use std::path::Path;

use super::tree::{
    FlavorKind, LocalSplit, LocalTree, ParsedTrees, Transform, TreeEnsemble, CATEGORICAL,
    MAX_CAT_WORDS,
};
use super::ModelError;
use super::MAX_FEATURES;

fn err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Format {
        path: path.to_path_buf(),
        format: "LightGBM",
        reason: reason.into(),
    }
}

/// `kind: lightgbm`: LightGBM text models, on the native evaluator.
pub struct Loader;

impl super::loader::ModelLoader for Loader {
    fn kind(&self) -> &str {
        "lightgbm"
    }

    fn load(
        &self,
        bytes: &[u8],
        ctx: &super::loader::LoadContext<'_>,
    ) -> Result<super::loader::Loaded, ModelError> {
        let text = std::str::from_utf8(bytes).map_err(|_| {
            ctx.format_error(
                "LightGBM",
                "not UTF-8 text (is this a binary or pickled model?)",
            )
        })?;
        super::tree::TreeModel::serve(parse(text, ctx.path)?, ctx, "lightgbm")
    }
}

/// Parses a LightGBM text model.
pub fn parse(text: &str, path: &Path) -> Result<ParsedTrees, ModelError> {
    let mut lines = text.lines().map(str::trim_end).peekable();
    match lines.next() {
        Some("tree") => {}
        _ => return Err(err(path, "missing the leading 'tree' line")),
    }
    let mut header: HashMap<&str, &str> = HashMap::new();
    let mut flags: Vec<&str> = Vec::new();
    while let Some(line) = lines.peek() {
        if line.starts_with("Tree=") || *line == "end of trees" {
            break;
        }
        let line = lines.next().unwrap_or_default();
        match line.split_once('=') {
            Some((k, v)) => {
                header.insert(k, v);
            }
            None if !line.is_empty() => flags.push(line),
            None => {}
        }
    }
    let num = |key: &str| -> Result<usize, ModelError> {
        let v = header
            .get(key)
            .ok_or_else(|| err(path, format!("header has no '{key}'")))?;
        v.trim()
            .parse()
            .map_err(|_| err(path, format!("header '{key}={v}' is not a number")))
    };
    let n_features = num("max_feature_idx")?
        .checked_add(1)
        .ok_or_else(|| err(path, "bad max_feature_idx"))?;
    let num_class = num("num_class")?;
    let per_iter = num("num_tree_per_iteration")?;
    if per_iter == 0 || per_iter > 100_000 {
        return Err(err(
            path,
            format!("implausible num_tree_per_iteration={per_iter}"),
        ));
    }
    if n_features > MAX_FEATURES {
        return Err(err(
            path,
            format!(
                "max_feature_idx={} declares more than {MAX_FEATURES} features",
                n_features - 1
            ),
        ));
    }
    let objective = header
        .get("objective")
        .copied()
        .unwrap_or("custom")
        .trim()
        .to_string();
    // (absent: none; nothing is allocated per declared feature)
    let feature_names: Vec<String> = match header.get("feature_names") {
        Some(v) => v.split(' ').map(str::to_string).collect(),
        None => Vec::new(),
    };
    if header.contains_key("feature_names") && feature_names.len() != n_features {
        return Err(err(
            path,
            format!(
                "{} feature names for max_feature_idx+1 = {n_features}",
                feature_names.len()
            ),
        ));
    }

    let mut ens = TreeEnsemble::empty(FlavorKind::LightGbm, n_features, per_iter);
    let mut tree_index = 0usize;
    let mut ended = false;
    while let Some(line) = lines.next() {
        if line == "end of trees" {
            ended = true;
            break;
        }
        if line.is_empty() {
            continue;
        }
        if !line.starts_with("Tree=") {
            return Err(err(
                path,
                format!("expected 'Tree=' or 'end of trees', found '{}'", clip(line)),
            ));
        }
        let mut fields: HashMap<&str, &str> = HashMap::new();
        while let Some(l) = lines.peek() {
            if l.is_empty() || l.starts_with("Tree=") || *l == "end of trees" {
                break;
            }
            let l = lines.next().unwrap_or_default();
            if let Some((k, v)) = l.split_once('=') {
                fields.insert(k, v);
            }
        }
        let tree =
            parse_tree(&fields, n_features).map_err(|e| err(path, format!("{line}: {e}")))?;
        let group = (tree_index % per_iter) as u32;
        ens.push_tree(tree, group)
            .map_err(|e| err(path, format!("{line}: {e}")))?;
        tree_index += 1;
    }
    if !ended {
        return Err(err(path, "file ends before 'end of trees' (truncated?)"));
    }
    if tree_index == 0 {
        return Err(err(path, "model has no trees"));
    }
    if flags.contains(&"average_output") {
        ens.average_over = Some((tree_index / per_iter) as f64);
    }
    let (transform, classes) =
        objective_transform(&objective, num_class).map_err(|e| err(path, e))?;
    ens.transform = transform;
    if let Some(k) = classes {
        if k < 2 {
            return Err(err(
                path,
                format!("objective '{objective}' is a classifier with num_class={k}; a classifier needs at least 2 classes"),
            ));
        }
        if k > 2 && k != per_iter {
            return Err(err(
                path,
                format!("{k} classes but {per_iter} trees per iteration"),
            ));
        }
    }
    ens.validate().map_err(|e| err(path, e))?;
    Ok(ParsedTrees {
        ensemble: ens,
        feature_names,
        objective,
        n_classes: classes,
    })
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(60) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Output transform and number of classes of a LightGBM objective string,
/// e.g. `binary sigmoid:1`, `multiclass num_class:3`, `regression sqrt`.
fn objective_transform(
    objective: &str,
    num_class: usize,
) -> Result<(Transform, Option<usize>), String> {
    let mut parts = objective.split_whitespace();
    let name = parts.next().unwrap_or("custom");
    let mut params: HashMap<&str, &str> = HashMap::new();
    let mut sqrt = false;
    for p in parts {
        match p.split_once(':') {
            Some((k, v)) => {
                params.insert(k, v);
            }
            None if p == "sqrt" => sqrt = true,
            None => {}
        }
    }
    let sigmoid = || -> Result<f64, String> {
        match params.get("sigmoid") {
            Some(v) => v
                .parse()
                .map_err(|_| format!("objective '{objective}': bad sigmoid '{v}'")),
            None => Ok(1.0),
        }
    };
    Ok(match name {
        "binary" => (Transform::Sigmoid { alpha: sigmoid()? }, Some(2)),
        "multiclass" | "softmax" => (Transform::Softmax, Some(num_class)),
        "multiclassova" | "multiclass_ova" | "ova" | "ovr" => {
            (Transform::Sigmoid { alpha: sigmoid()? }, Some(num_class))
        }
        "cross_entropy" | "xentropy" => (Transform::Sigmoid { alpha: 1.0 }, None),
        "cross_entropy_lambda" | "xentlambda" => (Transform::Log1pExp, None),
        "poisson" | "gamma" | "tweedie" => (Transform::Exp, None),
        "regression"
        | "regression_l2"
        | "l2"
        | "mean_squared_error"
        | "mse"
        | "l2_root"
        | "root_mean_squared_error"
        | "rmse"
        | "regression_l1"
        | "l1"
        | "mean_absolute_error"
        | "mae"
        | "huber"
        | "fair"
        | "quantile"
        | "mape"
        | "mean_absolute_percentage_error" => (
            if sqrt {
                Transform::SignedSquare
            } else {
                Transform::Identity
            },
            None,
        ),
        "lambdarank" | "rank_xendcg" | "xendcg" | "xe_ndcg" | "xe_ndcg_mart" | "xendcg_mart"
        | "custom" | "none" | "null" | "na" => (Transform::Identity, None),
        other => return Err(format!("unknown objective '{other}'")),
    })
}

fn parse_list<T: std::str::FromStr>(
    fields: &HashMap<&str, &str>,
    key: &str,
    n: usize,
) -> Result<Vec<T>, String> {
    let v = fields.get(key).ok_or_else(|| format!("missing '{key}'"))?;
    let out = v
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<T>()
                .map_err(|_| format!("'{key}' has a bad value '{}'", clip(s)))
        })
        .collect::<Result<Vec<T>, String>>()?;
    if out.len() != n {
        return Err(format!("'{key}' has {} values, expected {n}", out.len()));
    }
    Ok(out)
}

fn parse_tree(fields: &HashMap<&str, &str>, n_features: usize) -> Result<LocalTree, String> {
    let num_leaves: usize = fields
        .get("num_leaves")
        .ok_or("missing 'num_leaves'")?
        .parse()
        .map_err(|_| "bad 'num_leaves'")?;
    if num_leaves == 0 || num_leaves > 1 << 24 {
        return Err(format!("implausible num_leaves={num_leaves}"));
    }
    if fields.get("is_linear").is_some_and(|v| v.trim() != "0") {
        return Err(
            "linear trees (linear_tree=true) are not supported; convert the model to ONNX".into(),
        );
    }
    let leaves: Vec<f64> = parse_list(fields, "leaf_value", num_leaves)?;
    let n = num_leaves - 1;
    if n == 0 {
        return Ok(LocalTree {
            splits: vec![],
            leaves,
        });
    }
    let feature: Vec<u32> = parse_list(fields, "split_feature", n)?;
    let threshold: Vec<f64> = parse_list(fields, "threshold", n)?;
    let decision: Vec<i16> = parse_list(fields, "decision_type", n)?;
    let left: Vec<i32> = parse_list(fields, "left_child", n)?;
    let right: Vec<i32> = parse_list(fields, "right_child", n)?;
    let gain: Vec<f64> = match fields.get("split_gain") {
        Some(_) => parse_list(fields, "split_gain", n)?,
        None => vec![0.0; n],
    };
    let num_cat: usize = fields
        .get("num_cat")
        .map(|v| v.parse().map_err(|_| "bad 'num_cat'"))
        .transpose()?
        .unwrap_or(0);
    if num_cat > n {
        return Err(format!("num_cat={num_cat} exceeds the {n} splits"));
    }
    let (bounds, cat_words): (Vec<usize>, Vec<u32>) = if num_cat > 0 {
        let bounds: Vec<usize> = parse_list(fields, "cat_boundaries", num_cat + 1)?;
        let total = *bounds.last().unwrap_or(&0);
        let words: Vec<u32> = parse_list(fields, "cat_threshold", total)?;
        if bounds.windows(2).any(|w| w[0] > w[1]) {
            return Err("'cat_boundaries' is not increasing".into());
        }
        (bounds, words)
    } else {
        (vec![], vec![])
    };
    let mut splits = Vec::with_capacity(n);
    let mut cat_total = 0usize;
    for i in 0..n {
        if feature[i] as usize >= n_features {
            return Err(format!(
                "split {i} uses feature {} of {n_features}",
                feature[i]
            ));
        }
        // LightGBM decision_type: bit 0 categorical, bit 1 default-left, bits 2-3 missing type
        let d = decision[i] as u8;
        let mut categories = None;
        if d & CATEGORICAL != 0 {
            let idx = threshold[i];
            if !(idx >= 0.0 && (idx as usize) < num_cat) {
                return Err(format!(
                    "split {i} refers to category set {idx} of {num_cat}"
                ));
            }
            let c = idx as usize;
            let set = &cat_words[bounds[c]..bounds[c + 1]];
            cat_total += set.len();
            if cat_total > MAX_CAT_WORDS {
                return Err("categorical splits are too large".into());
            }
            categories = Some(set.to_vec());
        }
        splits.push(LocalSplit {
            feature: feature[i],
            threshold: threshold[i],
            flags: d & 0x0f,
            left: left[i],
            right: right[i],
            gain: gain[i],
            categories,
        });
    }
    Ok(LocalTree { splits, leaves })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = "tree\nversion=v4\nnum_class=1\nnum_tree_per_iteration=1\nlabel_index=0\nmax_feature_idx=1\nobjective=binary sigmoid:2\nfeature_names=a b\n\nTree=0\nnum_leaves=2\nnum_cat=0\nsplit_feature=1\nsplit_gain=3.5\nthreshold=0.5\ndecision_type=10\nleft_child=-1\nright_child=-2\nleaf_value=-1 1\nshrinkage=1\n\n\nend of trees\n";

    #[test]
    fn parses_a_minimal_binary_model() {
        let p = parse(TINY, Path::new("tiny.txt")).unwrap();
        assert_eq!(p.feature_names, vec!["a", "b"]);
        assert_eq!(p.n_classes, Some(2));
        let s = p
            .ensemble
            .transformed(&[0.0, 0.0, 0.0, 1.0, 0.0, f64::NAN], 3);
        let sig = |x: f64| 1.0 / (1.0 + (-2.0 * x).exp());
        assert_eq!(s, vec![sig(-1.0), sig(1.0), sig(-1.0)]);
    }

    #[test]
    fn truncated_file_is_an_error() {
        let cut = &TINY[..TINY.len() - 14];
        let e = parse(cut, Path::new("m.txt")).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn out_of_range_child_is_an_error() {
        let bad = TINY.replace("right_child=-2", "right_child=-9");
        let e = parse(&bad, Path::new("m.txt")).unwrap_err().to_string();
        assert!(e.contains("leaf 8"), "{e}");
    }

    #[test]
    fn linear_trees_are_refused() {
        let bad = TINY.replace("shrinkage=1", "is_linear=1\nshrinkage=1");
        let e = parse(&bad, Path::new("m.txt")).unwrap_err().to_string();
        assert!(e.contains("linear trees"), "{e}");
    }
}
