//! The allowlist: which globals a model pickle may name, and how the
//! recognised objects become native models. Everything is read from the
//! objects' pickled state (fitted attributes, numpy arrays, the libraries'
//! own serialised models); nothing is called.
//!
//! | pickled class | native form |
//! |---|---|
//! | `lightgbm.basic.Booster`, `LGBMRegressor`, `LGBMClassifier` | LightGBM text model inside -> native tree evaluator |
//! | `xgboost.core.Booster`, `XGBRegressor`, `XGBClassifier` | XGBoost raw model bytes inside -> native tree evaluator |
//! | `LinearRegression`, `Ridge`, `Lasso`, `LogisticRegression` | `coef_`, `intercept_` -> linear model |
//! | `DecisionTree*`, `RandomForest*`, `ExtraTrees*` | `tree_` state -> native tree evaluator (sklearn flavour) |
//! | `GradientBoosting*` | `estimators_`, `init_`, `learning_rate` -> native tree evaluator |
//! | `Pipeline` of `StandardScaler` / `MinMaxScaler` steps and one of the above | scalers + model |

use super::numpy::{self, global_name, number, seq, NdArray};
use super::reader::{kind_name, Graph, Id, Obj};
use crate::model::linear::{Linear, LinearModel, Link, Scaler};
use crate::model::tree::{
    FlavorKind, LocalSplit, LocalTree, Transform, TreeEnsemble, TreeModel, DEFAULT_LEFT,
};
use crate::model::{lightgbm, xgboost, Model};
use std::path::Path;

/// Whether a global may appear in a model pickle (as data; never resolved).
pub fn is_allowed(module: &str, name: &str) -> bool {
    const EXACT: &[(&str, &str)] = &[
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.random._pickle", "__randomstate_ctor"),
        ("numpy.random._pickle", "__bit_generator_ctor"),
        ("numpy.random._pickle", "__generator_ctor"),
        ("numpy.random._mt19937", "MT19937"),
        ("numpy.random._pcg64", "PCG64"),
        // the seed of an estimator's random state (GradientBoosting's `_rng`
        // when fitted without random_state): data, never used
        ("numpy.random.bit_generator", "SeedSequence"),
        ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "list"),
        ("builtins", "dict"),
        ("builtins", "tuple"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("builtins", "str"),
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        // joblib.dump's array placeholder, read by the reader as the array
        ("joblib.numpy_pickle", "NumpyArrayWrapper"),
        ("lightgbm.basic", "Booster"),
        ("lightgbm.sklearn", "LGBMRegressor"),
        ("lightgbm.sklearn", "LGBMClassifier"),
        ("xgboost.core", "Booster"),
        ("xgboost.sklearn", "XGBRegressor"),
        ("xgboost.sklearn", "XGBClassifier"),
        ("sklearn.pipeline", "Pipeline"),
        ("sklearn.preprocessing._data", "StandardScaler"),
        ("sklearn.preprocessing._data", "MinMaxScaler"),
        ("sklearn.preprocessing._label", "LabelEncoder"),
        ("sklearn.linear_model._base", "LinearRegression"),
        ("sklearn.linear_model._ridge", "Ridge"),
        ("sklearn.linear_model._coordinate_descent", "Lasso"),
        ("sklearn.linear_model._logistic", "LogisticRegression"),
        ("sklearn.tree._classes", "DecisionTreeRegressor"),
        ("sklearn.tree._classes", "DecisionTreeClassifier"),
        ("sklearn.tree._classes", "ExtraTreeRegressor"),
        ("sklearn.tree._classes", "ExtraTreeClassifier"),
        ("sklearn.tree._tree", "Tree"),
        ("sklearn.ensemble._forest", "RandomForestRegressor"),
        ("sklearn.ensemble._forest", "RandomForestClassifier"),
        ("sklearn.ensemble._forest", "ExtraTreesRegressor"),
        ("sklearn.ensemble._forest", "ExtraTreesClassifier"),
        ("sklearn.ensemble._gb", "GradientBoostingRegressor"),
        ("sklearn.ensemble._gb", "GradientBoostingClassifier"),
        ("sklearn.dummy", "DummyRegressor"),
        ("sklearn.dummy", "DummyClassifier"),
    ];
    // gradient boosting's loss and link objects (sklearn._loss.loss,
    // ._loss, .link), kept as data; the loss is read from `loss`
    EXACT.contains(&(module, name))
        || matches!(
            module,
            "sklearn._loss.loss" | "sklearn._loss._loss" | "sklearn._loss.link"
        )
}

/// A pickled model, converted.
pub struct Converted {
    /// What the pickle held, e.g. `sklearn.pipeline.Pipeline(StandardScaler, LogisticRegression)`.
    pub class: String,
    /// What it became, e.g. `native linear model (softmax, 3 classes)`.
    pub native: String,
    pub steps: Vec<Scaler>,
    pub inner: Box<dyn Model>,
    pub n_features: usize,
    pub classifier: bool,
    /// Values per row (1 for classifiers).
    pub n_outputs: usize,
    pub n_classes: Option<usize>,
    /// The model decides where NaN goes (trees that recorded a side for
    /// missing values); else NaN inputs are refused by default.
    pub handles_missing: bool,
}

/// The class of an object created by NEWOBJ or REDUCE of a class global.
fn class_of(g: &Graph, id: Id) -> Option<(&str, &str)> {
    match g.get(id) {
        Obj::Call { func, .. } => global_name(g, *func),
        _ => None,
    }
}

/// An object's `__dict__` as BUILD set it.
fn state(g: &Graph, id: Id) -> Result<&[(Id, Id)], String> {
    let Obj::Call {
        state: Some(st), ..
    } = g.get(id)
    else {
        return Err("an object without pickled state".into());
    };
    match g.get(*st) {
        Obj::Dict(d) => Ok(d),
        // (dict, slots)
        Obj::Tuple(t) if !t.is_empty() => match g.get(t[0]) {
            Obj::Dict(d) => Ok(d),
            o => Err(format!("object state is {}", kind_name(o))),
        },
        o => Err(format!("object state is {}", kind_name(o))),
    }
}

fn get(g: &Graph, d: &[(Id, Id)], key: &str) -> Option<Id> {
    d.iter()
        .find(|(k, _)| matches!(g.get(*k), Obj::Str(s) if s == key))
        .map(|(_, v)| *v)
}

fn need(g: &Graph, d: &[(Id, Id)], key: &str, class: &str) -> Result<Id, String> {
    get(g, d, key).ok_or_else(|| format!("{class} has no '{key}' (is it fitted?)"))
}

fn text(g: &Graph, id: Id) -> Option<&str> {
    match g.get(id) {
        Obj::Str(s) => Some(s),
        _ => None,
    }
}

/// A fitted parameter array (or a plain number) as `f64`s; every value
/// must be finite (a NaN coefficient would answer NaN, or a confident class).
fn array_f64(g: &Graph, id: Id, what: &str) -> Result<(Vec<usize>, Vec<f64>), String> {
    let (shape, v) = if !numpy::is_array(g, id) {
        // a plain Python number (e.g. intercept_ = 0.0 without fit_intercept)
        number(g, id)
            .map(|v| (Vec::new(), vec![v]))
            .map_err(|e| format!("{what}: {e}"))?
    } else {
        let a = numpy::array(g, id).map_err(|e| format!("{what}: {e}"))?;
        let v = a.f64s().map_err(|e| format!("{what}: {e}"))?;
        (a.shape, v)
    };
    if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(format!(
            "{what} has value {x} at index {i}; fitted parameters must be finite"
        ));
    }
    Ok((shape, v))
}

/// Converts the pickle's root object.
pub fn convert(g: &Graph, path: &Path) -> Result<Converted, String> {
    let root = g.root;
    let (module, name) = class_of(g, root).ok_or_else(|| {
        format!(
            "the pickle holds {}, not a model object",
            kind_name(g.get(root))
        )
    })?;
    let full = format!("{module}.{name}");
    if full == "sklearn.pipeline.Pipeline" {
        let st = state(g, root)?;
        let steps = seq(g, need(g, st, "steps", "Pipeline")?)?;
        let Some((&last, scalers)) = steps.split_last() else {
            return Err("Pipeline has no steps".into());
        };
        let mut out = Vec::new();
        let mut names = Vec::new();
        for &step in scalers {
            let est = *seq(g, step)?
                .get(1)
                .ok_or("a Pipeline step is not (name, estimator)")?;
            if matches!(g.get(est), Obj::None) || text(g, est) == Some("passthrough") {
                continue;
            }
            let (m, n) = class_of(g, est).ok_or("a Pipeline step is not an estimator")?;
            names.push(n.to_string());
            out.push(scaler(g, est, &format!("{m}.{n}"))?);
        }
        let est = *seq(g, last)?
            .get(1)
            .ok_or("a Pipeline step is not (name, estimator)")?;
        let mut c = estimator(g, est, path)?;
        if let Some(n) = out
            .iter()
            .filter_map(Scaler::n_features)
            .find(|&n| n != c.n_features)
        {
            return Err(format!(
                "a Pipeline scaler has {n} features, the model {}",
                c.n_features
            ));
        }
        names.push(c.class.rsplit('.').next().unwrap_or_default().to_string());
        c.class = format!("sklearn.pipeline.Pipeline({})", names.join(", "));
        c.steps = out;
        return Ok(c);
    }
    estimator(g, root, path)
}

fn scaler(g: &Graph, id: Id, class: &str) -> Result<Scaler, String> {
    let st = state(g, id)?;
    match class {
        "sklearn.preprocessing._data.StandardScaler" => {
            let opt = |key: &str| -> Result<Option<Vec<f64>>, String> {
                match get(g, st, key) {
                    None => Ok(None),
                    Some(v) if matches!(g.get(v), Obj::None) => Ok(None),
                    Some(v) => Ok(Some(array_f64(g, v, key)?.1)),
                }
            };
            let with_mean = get(g, st, "with_mean").is_none_or(|v| g.get(v) != &Obj::Bool(false));
            let with_std = get(g, st, "with_std").is_none_or(|v| g.get(v) != &Obj::Bool(false));
            let scale = if with_std { opt("scale_")? } else { None };
            // scikit-learn replaces a zero scale by 1 when fitting: a zero
            // here would divide features into infinities
            if let Some(i) = scale
                .as_ref()
                .and_then(|s| s.iter().position(|v| *v == 0.0))
            {
                return Err(format!("StandardScaler scale_ is 0 at index {i}; a fitted scaler never has a zero scale"));
            }
            Ok(Scaler::Standard {
                mean: if with_mean { opt("mean_")? } else { None },
                scale,
            })
        }
        "sklearn.preprocessing._data.MinMaxScaler" => {
            let scale = array_f64(g, need(g, st, "scale_", "MinMaxScaler")?, "scale_")?.1;
            let min = array_f64(g, need(g, st, "min_", "MinMaxScaler")?, "min_")?.1;
            if scale.len() != min.len() {
                return Err("MinMaxScaler scale_ and min_ differ in length".into());
            }
            let clip = match get(g, st, "clip").map(|v| g.get(v)) {
                Some(Obj::Bool(true)) => {
                    let r = seq(g, need(g, st, "feature_range", "MinMaxScaler")?)?;
                    let (Some(&lo), Some(&hi)) = (r.first(), r.get(1)) else {
                        return Err("MinMaxScaler feature_range is not (min, max)".into());
                    };
                    let (lo, hi) = (number(g, lo)?, number(g, hi)?);
                    if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                        return Err(format!(
                            "MinMaxScaler feature_range ({lo}, {hi}) is not a finite range"
                        ));
                    }
                    Some((lo, hi))
                }
                _ => None,
            };
            Ok(Scaler::MinMax { scale, min, clip })
        }
        other => Err(format!(
            "Pipeline step {other} is not supported (StandardScaler and MinMaxScaler are)"
        )),
    }
}

fn estimator(g: &Graph, id: Id, path: &Path) -> Result<Converted, String> {
    let (module, name) = class_of(g, id).ok_or("not an estimator object")?;
    let class = format!("{module}.{name}");
    let st = state(g, id)?;
    match class.as_str() {
        "lightgbm.basic.Booster" | "lightgbm.sklearn.LGBMRegressor" | "lightgbm.sklearn.LGBMClassifier" => {
            let booster = if name == "Booster" { id } else { need(g, st, "_Booster", name)? };
            let bst = state(g, booster)?;
            let model = need(g, bst, "_handle", "lightgbm Booster")?;
            let model = text(g, model).ok_or("lightgbm Booster '_handle' is not the model text")?;
            let parsed = lightgbm::parse(model, path).map_err(|e| e.to_string())?;
            let native = format!("native LightGBM evaluator ({}, {} trees)", parsed.objective, parsed.ensemble.n_trees());
            Ok(tree_converted(class, native, parsed.ensemble, parsed.n_classes.is_some(), parsed.n_classes, true))
        }
        "xgboost.core.Booster" | "xgboost.sklearn.XGBRegressor" | "xgboost.sklearn.XGBClassifier" => {
            let booster = if name == "Booster" { id } else { need(g, st, "_Booster", name)? };
            let bst = state(g, booster)?;
            let raw = need(g, bst, "handle", "xgboost Booster")?;
            let raw = numpy::bytes_of(g, raw).map_err(|e| format!("xgboost Booster 'handle': {e}"))?;
            let parsed = xgboost::parse(&raw, path).map_err(|e| e.to_string())?;
            let native = format!("native XGBoost evaluator ({}, {} trees)", parsed.objective, parsed.ensemble.n_trees());
            Ok(tree_converted(class, native, parsed.ensemble, parsed.n_classes.is_some(), parsed.n_classes, true))
        }
        "sklearn.linear_model._base.LinearRegression"
        | "sklearn.linear_model._ridge.Ridge"
        | "sklearn.linear_model._coordinate_descent.Lasso"
        | "sklearn.linear_model._logistic.LogisticRegression" => {
            let (shape, coef) = array_f64(g, need(g, st, "coef_", name)?, "coef_")?;
            let (_, intercept) = array_f64(g, need(g, st, "intercept_", name)?, "intercept_")?;
            let logistic = name == "LogisticRegression";
            let (k, nf) = match shape.as_slice() {
                [nf] => (1, *nf),
                [k, nf] => (*k, *nf),
                _ => return Err(format!("{name} coef_ has shape {shape:?}")),
            };
            if nf == 0 || k == 0 {
                return Err(format!("{name} coef_ has shape {shape:?}"));
            }
            let intercept = match intercept.len() {
                n if n == k => intercept,
                1 => vec![intercept[0]; k],
                n => return Err(format!("{name} has {k} coefficient rows but {n} intercepts")),
            };
            let link = match (logistic, k) {
                (false, _) => Link::Identity,
                (true, 1) => Link::Logistic,
                (true, _) => Link::Softmax,
            };
            if logistic {
                if let Some(mc) = get(g, st, "multi_class").and_then(|v| text(g, v)) {
                    if mc == "ovr" && k > 1 {
                        return Err("LogisticRegression with multi_class='ovr' is not supported (multinomial is)".into());
                    }
                }
            }
            let n_outputs = if logistic { 1 } else { k };
            let n_classes = logistic.then_some(if k == 1 { 2 } else { k });
            let native = match link {
                Link::Identity => format!("native linear model ({k} output{})", if k == 1 { "" } else { "s" }),
                Link::Logistic => "native linear model (logistic, 2 classes)".to_string(),
                Link::Softmax => format!("native linear model (softmax, {k} classes)"),
            };
            let linear = Linear { n_features: nf, coef, intercept, link };
            Ok(Converted {
                class,
                native,
                steps: Vec::new(),
                inner: Box::new(LinearModel { linear }),
                n_features: nf,
                classifier: logistic,
                n_outputs,
                n_classes,
                handles_missing: false,
            })
        }
        "sklearn.tree._classes.DecisionTreeRegressor"
        | "sklearn.tree._classes.DecisionTreeClassifier"
        | "sklearn.tree._classes.ExtraTreeRegressor"
        | "sklearn.tree._classes.ExtraTreeClassifier"
        | "sklearn.ensemble._forest.RandomForestRegressor"
        | "sklearn.ensemble._forest.RandomForestClassifier"
        | "sklearn.ensemble._forest.ExtraTreesRegressor"
        | "sklearn.ensemble._forest.ExtraTreesClassifier" => {
            let classifier = name.ends_with("Classifier");
            let trees: Vec<Id> = if module == "sklearn.tree._classes" {
                vec![id]
            } else {
                seq(g, need(g, st, "estimators_", name)?)?.to_vec()
            };
            if trees.is_empty() {
                return Err(format!("{name} has no trees"));
            }
            let n_features = n_features_in(g, st, name)?;
            let n_classes = if classifier { Some(n_classes(g, st, name)?) } else { None };
            let groups = n_classes.unwrap_or(1);
            let mut ens = TreeEnsemble::empty(FlavorKind::Sklearn, n_features, groups);
            ens.max_nodes = node_limit(g);
            // trees pickled by scikit-learn >= 1.3 record where missing
            // values go at every split (and sklearn predicts NaN with them)
            let mut handles_missing = true;
            for &t in &trees {
                let tree = tree_of(g, t)?;
                handles_missing &= tree.has_missing_side;
                add_sklearn_tree(&mut ens, &tree, n_classes, 1.0)?;
            }
            if trees.len() > 1 || module != "sklearn.tree._classes" {
                ens.average_over = Some(trees.len() as f64);
            }
            // a classifier's tree becomes one tree per class here
            ens.copies_per_tree = n_classes.unwrap_or(1);
            ens.validate()?;
            let native = format!(
                "native tree evaluator ({} tree{}{})",
                trees.len(),
                if trees.len() == 1 { "" } else { "s, averaged" },
                n_classes.map(|k| format!(", {k} classes")).unwrap_or_default()
            );
            Ok(tree_converted(class, native, ens, classifier, n_classes, handles_missing))
        }
        "sklearn.ensemble._gb.GradientBoostingRegressor" | "sklearn.ensemble._gb.GradientBoostingClassifier" => {
            gradient_boosting(g, st, class, name)
        }
        other => Err(format!(
            "{other} is not a supported model class; convert it to ONNX (skl2onnx) or a native format"
        )),
    }
}

fn tree_converted(
    class: String,
    native: String,
    ens: TreeEnsemble,
    classifier: bool,
    n_classes: Option<usize>,
    handles_missing: bool,
) -> Converted {
    let n_features = ens.n_features;
    let n_outputs = if classifier { 1 } else { ens.n_groups };
    let n_classes = if classifier {
        Some(n_classes.unwrap_or(2).max(2))
    } else {
        None
    };
    Converted {
        class,
        native,
        steps: Vec::new(),
        inner: Box::new(TreeModel {
            ensemble: ens,
            classification: classifier,
        }),
        n_features,
        classifier,
        n_outputs,
        n_classes,
        handles_missing,
    }
}

fn n_features_in(g: &Graph, st: &[(Id, Id)], name: &str) -> Result<usize, String> {
    let v = number(g, need(g, st, "n_features_in_", name)?)?;
    if (1.0..=1e7).contains(&v) {
        Ok(v as usize)
    } else {
        Err(format!("{name} n_features_in_ is {v}"))
    }
}

fn n_classes(g: &Graph, st: &[(Id, Id)], name: &str) -> Result<usize, String> {
    let id = need(g, st, "n_classes_", name)?;
    let v =
        number(g, id).map_err(|_| format!("{name}: multi-output classifiers are not supported"))?;
    if (1.0..=1e6).contains(&v) {
        Ok(v as usize)
    } else {
        Err(format!("{name} n_classes_ is {v}"))
    }
}

/// Most tree nodes a pickle of this size may expand to: one per 4 bytes
/// (a fitted node takes 64 bytes of node record plus 8 per class value),
/// at least 64 Ki. A tree referenced again and again through the memo
/// costs two bytes a reference and is refused once the copies pass this.
fn node_limit(g: &Graph) -> usize {
    (g.input_len / 4).clamp(1 << 16, crate::model::tree::MAX_NODES)
}

/// A fitted `sklearn.tree._tree.Tree`: per-node arrays.
struct SkTree {
    left: Vec<i64>,
    right: Vec<i64>,
    feature: Vec<i64>,
    threshold: Vec<f64>,
    missing_left: Vec<bool>,
    /// The nodes record a side for missing values (scikit-learn >= 1.3).
    has_missing_side: bool,
    /// `[node_count, n_outputs * max_n_classes]`
    values: Vec<f64>,
    value_width: usize,
}

/// The `tree_` of a DecisionTree* estimator.
fn tree_of(g: &Graph, est: Id) -> Result<SkTree, String> {
    let (_, name) = class_of(g, est).ok_or("a forest member is not an estimator")?;
    if !name.contains("Tree") {
        return Err(format!("a forest member is a {name}, not a tree"));
    }
    let st = state(g, est)?;
    let tree = need(g, st, "tree_", name)?;
    if class_of(g, tree) != Some(("sklearn.tree._tree", "Tree")) {
        return Err("tree_ is not a sklearn.tree._tree.Tree".into());
    }
    let ts = state(g, tree)?;
    let nodes: NdArray =
        numpy::array(g, need(g, ts, "nodes", "Tree")?).map_err(|e| format!("Tree nodes: {e}"))?;
    let n = nodes.len();
    let col = |name: &str| nodes.field(name).map_err(|e| format!("Tree nodes: {e}"));
    let to_i = |v: Vec<f64>| v.into_iter().map(|x| x as i64).collect::<Vec<_>>();
    let left = to_i(col("left_child")?);
    let right = to_i(col("right_child")?);
    let feature = to_i(col("feature")?);
    let threshold = col("threshold")?;
    let (missing_left, has_missing_side) = match nodes.field("missing_go_to_left") {
        Ok(v) => (v.into_iter().map(|x| x != 0.0).collect(), true),
        Err(_) => (vec![false; n], false),
    };
    let (vshape, values) = array_f64(g, need(g, ts, "values", "Tree")?, "Tree values")?;
    if vshape.first() != Some(&n) || vshape.len() != 3 {
        return Err(format!("Tree values have shape {vshape:?} for {n} nodes"));
    }
    let value_width = vshape[1] * vshape[2];
    if value_width == 0 {
        return Err("Tree values have no outputs".into());
    }
    Ok(SkTree {
        left,
        right,
        feature,
        threshold,
        missing_left,
        has_missing_side,
        values,
        value_width,
    })
}

/// numpy's pairwise sum for a short contiguous row (the `prob.sum(axis=1)`
/// that normalises a tree's class fractions).
fn numpy_sum(v: &[f64]) -> f64 {
    if v.len() < 8 {
        let mut s = 0.0;
        for x in v {
            s += x;
        }
        return s;
    }
    if v.len() <= 128 {
        let mut r = [0.0; 8];
        r.copy_from_slice(&v[..8]);
        let mut i = 8;
        while i + 8 <= v.len() {
            for j in 0..8 {
                r[j] += v[i + j];
            }
            i += 8;
        }
        let mut res = (r[0] + r[1]) + (r[2] + r[3]) + ((r[4] + r[5]) + (r[6] + r[7]));
        for x in &v[i..] {
            res += x;
        }
        return res;
    }
    let half = (v.len() / 2) / 8 * 8;
    numpy_sum(&v[..half]) + numpy_sum(&v[half..])
}

/// Adds one sklearn tree: a regressor's leaf value times `scale` into group
/// 0, or one tree per class whose leaves hold the normalised class fraction.
fn add_sklearn_tree(
    ens: &mut TreeEnsemble,
    t: &SkTree,
    n_classes: Option<usize>,
    scale: f64,
) -> Result<(), String> {
    let n = t.left.len();
    if n == 0 {
        return Err("a tree with no nodes".into());
    }
    // local ids: splits in node order, leaves in node order
    let mut split_id = vec![-1i64; n];
    let mut leaf_id = vec![-1i64; n];
    let (mut ns, mut nl) = (0i64, 0i64);
    for i in 0..n {
        if t.left[i] < 0 {
            leaf_id[i] = nl;
            nl += 1;
        } else {
            split_id[i] = ns;
            ns += 1;
        }
    }
    let reference = |c: i64| -> Result<i32, String> {
        let c = usize::try_from(c)
            .ok()
            .filter(|&c| c < n)
            .ok_or_else(|| format!("child {c} out of range"))?;
        let r = if split_id[c] >= 0 {
            split_id[c]
        } else {
            !leaf_id[c]
        };
        i32::try_from(r).map_err(|_| "tree too large".to_string())
    };
    let mut splits = Vec::with_capacity(ns as usize);
    for i in 0..n {
        if t.left[i] < 0 {
            continue;
        }
        let feature = u32::try_from(t.feature[i])
            .map_err(|_| format!("node {i} splits on feature {}", t.feature[i]))?;
        splits.push(LocalSplit {
            feature,
            threshold: t.threshold[i],
            flags: if t.missing_left[i] { DEFAULT_LEFT } else { 0 },
            left: reference(t.left[i])?,
            right: reference(t.right[i])?,
            gain: 0.0,
            categories: None,
        });
    }
    // the root is node 0: when it is a split it is split 0
    let leaves_of = |k: Option<usize>| -> Result<Vec<f64>, String> {
        (0..n)
            .filter(|&i| t.left[i] < 0)
            .map(|i| {
                let row = &t.values[i * t.value_width..(i + 1) * t.value_width];
                Ok(match k {
                    None => scale * row[0],
                    Some(k) => {
                        let classes = n_classes.unwrap_or(1);
                        let probs = row
                            .get(..classes)
                            .ok_or("tree values narrower than the classes")?;
                        let sum = numpy_sum(probs);
                        probs[k] / if sum == 0.0 { 1.0 } else { sum }
                    }
                })
            })
            .collect()
    };
    match n_classes {
        None => ens.push_tree(
            LocalTree {
                splits,
                leaves: leaves_of(None)?,
            },
            0,
        )?,
        Some(classes) => {
            for k in 0..classes {
                ens.push_tree(
                    LocalTree {
                        splits: splits.clone(),
                        leaves: leaves_of(Some(k))?,
                    },
                    k as u32,
                )?;
            }
        }
    }
    Ok(())
}

fn gradient_boosting(
    g: &Graph,
    st: &[(Id, Id)],
    class: String,
    name: &str,
) -> Result<Converted, String> {
    let classifier = name.ends_with("Classifier");
    let loss = get(g, st, "loss").and_then(|v| text(g, v)).unwrap_or("");
    let lr = number(g, need(g, st, "learning_rate", name)?)?;
    let n_features = n_features_in(g, st, name)?;
    let est = numpy::array(g, need(g, st, "estimators_", name)?)
        .map_err(|e| format!("estimators_: {e}"))?;
    if est.dtype.kind != 'O' {
        return Err("estimators_ is not an array of trees".into());
    }
    let (stages, k) = match est.shape.as_slice() {
        [s, k] => (*s, *k),
        s => return Err(format!("estimators_ has shape {s:?}")),
    };
    let n_classes = if classifier {
        Some(n_classes(g, st, name)?)
    } else {
        None
    };
    let transform = match (classifier, loss, k) {
        (false, "squared_error" | "absolute_error" | "huber" | "quantile", 1) => {
            Transform::Identity
        }
        (true, "log_loss", 1) => Transform::Sigmoid { alpha: 1.0 },
        (true, "log_loss", _) => Transform::Softmax,
        (_, l, _) => return Err(format!("{name} with loss '{l}' is not supported")),
    };
    // the initial raw prediction, as sklearn's _init_raw_predictions
    let init = need(g, st, "init_", name)?;
    let base: Vec<f64> = if text(g, init) == Some("zero") {
        vec![0.0; k]
    } else {
        match class_of(g, init) {
            Some(("sklearn.dummy", "DummyRegressor")) if !classifier => {
                let c = array_f64(
                    g,
                    need(g, state(g, init)?, "constant_", "DummyRegressor")?,
                    "constant_",
                )?
                .1;
                vec![*c.first().ok_or("DummyRegressor without a constant")?]
            }
            Some(("sklearn.dummy", "DummyClassifier")) if classifier => {
                let dst = state(g, init)?;
                if get(g, dst, "strategy").and_then(|v| text(g, v)) != Some("prior") {
                    return Err("GradientBoostingClassifier init_ must be a DummyClassifier(strategy='prior')".into());
                }
                let prior = array_f64(
                    g,
                    need(g, dst, "class_prior_", "DummyClassifier")?,
                    "class_prior_",
                )?
                .1;
                let eps = f64::EPSILON;
                let clip = |p: f64| p.clamp(eps, 1.0 - eps);
                if k == 1 {
                    let p = clip(*prior.get(1).ok_or("binary prior without class 1")?);
                    // scipy.special.logit
                    vec![(p / (1.0 - p)).ln()]
                } else {
                    // sklearn's symmetric multinomial logit: log(p) - mean(log(p))
                    let logs: Vec<f64> = prior.iter().map(|&p| clip(p).ln()).collect();
                    let mean = numpy_sum(&logs) / logs.len() as f64;
                    logs.iter().map(|l| l - mean).collect()
                }
            }
            _ => {
                return Err(format!(
                    "{name} with a custom init estimator is not supported"
                ))
            }
        }
    };
    if base.len() != k {
        return Err(format!(
            "{name}: {} initial values for {k} outputs",
            base.len()
        ));
    }
    let mut ens = TreeEnsemble::empty(FlavorKind::Sklearn, n_features, k);
    ens.max_nodes = node_limit(g);
    ens.base_margin = base;
    ens.transform = transform;
    for s in 0..stages {
        for j in 0..k {
            let tree = tree_of(g, est.objects[s * k + j])?;
            let before = ens.trees.len();
            add_sklearn_tree(&mut ens, &tree, None, lr)?;
            for t in &mut ens.trees[before..] {
                t.group = j as u32;
            }
        }
    }
    ens.validate()?;
    let native = format!(
        "native tree evaluator ({stages} stages x {k} tree{}, learning rate {lr}{})",
        if k == 1 { "" } else { "s" },
        n_classes
            .map(|c| format!(", {c} classes"))
            .unwrap_or_default()
    );
    Ok(tree_converted(
        // scikit-learn's gradient boosting refuses NaN inputs
        class, native, ens, classifier, n_classes, false,
    ))
}
