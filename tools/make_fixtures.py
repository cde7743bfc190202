#!/usr/bin/env python3
"""Golden fixtures from the reference libraries.

Trains small models with LightGBM, XGBoost, scikit-learn and CatBoost on datasets that
ship with scikit-learn (no download), writes them in every supported format
under tests/fixtures/ together with inputs (including NaNs) and the libraries'
own predictions, and writes the shipped example models under models/.
Deterministic and rerunnable: `make fixtures` (or
`.cache/venv/bin/python tools/make_fixtures.py`).

Golden file format (tests/fixtures/<case>.golden.json):
  case, kind (lightgbm|xgboost|onnx|torch|pickle|catboost), model_files (relative to tests/fixtures),
  task_type, features, n_classes, library, inputs (NaN as null),
  prediction (value, or class index), probabilities (null for regression);
  torch cases add torch_output (logits|probabilities) for classifiers;
  pickle cases add pickle_protocol and missing (nan|reject);
  catboost cases add raw_formula_val and feature_importance (tools/catboost_fixtures.py).
"""
import json
import math
import re
import warnings
from pathlib import Path

import lightgbm as lgb
import numpy as np
import onnxruntime as ort
import sklearn
import xgboost as xgb
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
MODELS = ROOT / "models"
SEED = 42


def clean(name):
    return re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")


def dataset(loader):
    d = loader()
    return d.data.astype(np.float64), d.target, [clean(f) for f in d.feature_names]


def with_nan(x, frac, rng):
    x = x.copy()
    x[rng.random(x.shape) < frac] = np.nan
    return x


def test_rows(x, rng, nan=True, n=120):
    """Held-out rows with ~10% NaN cells, an all-NaN row, an all-zero row and extremes."""
    x = x[:n].copy()
    if nan:
        x = with_nan(x, 0.10, rng)
        x[0, :] = np.nan
    x[1, :] = 0.0
    x[2, :] = 1e6
    x[3, :] = -1e6
    return x


def jnum(v):
    v = float(v)
    return None if math.isnan(v) else v


def write_golden(case, kind, files, task, features, x, pred, probs, library, n_classes=None, csv=False, extra=None):
    doc = {
        "case": case,
        "kind": kind,
        "model_files": files,
        "task_type": task,
        "features": features,
        "n_classes": n_classes,
        "library": library,
        "inputs": [[jnum(v) for v in row] for row in x],
        "prediction": [float(p) for p in pred],
        "probabilities": None if probs is None else [[float(p) for p in row] for row in probs],
        **(extra or {}),
    }
    (FIX / f"{case}.golden.json").write_text(json.dumps(doc) + "\n")
    if csv:
        lines = [",".join(features)]
        for row in x:
            lines.append(",".join("" if math.isnan(v) else repr(float(v)) for v in row))
        (FIX / f"{case}.inputs.csv").write_text("\n".join(lines) + "\n")
    sizes = ", ".join(f"{f} {(FIX / f).stat().st_size:,} B" for f in files)
    print(f"{case:28s} rows={len(x):4d}  {sizes}")


LGB_VER = f"lightgbm {lgb.__version__}"
XGB_VER = f"xgboost {xgb.__version__}"
ORT_VER = f"onnxruntime {ort.__version__}"
TORCH_VER = f"torch {__import__('torch').__version__}"


def lgb_case(case, x_tr, y_tr, x_te, features, params, rounds, task, csv=False, cat=None):
    p = {"verbose": -1, "num_threads": 1, "seed": SEED, "deterministic": True, "num_leaves": 15}
    p.update(params)
    ds = lgb.Dataset(x_tr, y_tr, feature_name=features, categorical_feature=cat or "auto", free_raw_data=False)
    booster = lgb.train(p, ds, num_boost_round=rounds)
    path = FIX / f"{case}.txt"
    booster.save_model(str(path))
    out = booster.predict(x_te, num_threads=1)
    if task == "classification":
        probs = np.column_stack([1 - out, out]) if out.ndim == 1 else out
        write_golden(case, "lightgbm", [path.name], task, features, x_te, probs.argmax(1), probs, LGB_VER,
                     n_classes=probs.shape[1], csv=csv)
    else:
        write_golden(case, "lightgbm", [path.name], task, features, x_te, out, None, LGB_VER, csv=csv)
    return booster


def xgb_case(case, x_tr, y_tr, x_te, features, params, rounds, task, csv=False, feature_types=None):
    p = {"nthread": 1, "seed": SEED, "max_depth": 4, "eta": 0.3, "tree_method": "hist"}
    p.update(params)
    kw = {}
    if feature_types:
        kw = {"feature_types": feature_types, "enable_categorical": True}
    dtr = xgb.DMatrix(x_tr, y_tr, feature_names=features, **kw)
    booster = xgb.train(p, dtr, num_boost_round=rounds)
    files = [f"{case}.json", f"{case}.ubj"]
    for f in files:
        booster.save_model(str(FIX / f))
    # float32 from XGBoost; a binary case's 1 - p in float32 too, as XGBClassifier.predict_proba computes it
    out = booster.predict(xgb.DMatrix(x_te, feature_names=features, **kw))
    if task == "classification":
        probs = np.column_stack([np.float32(1) - out, out]) if out.ndim == 1 else out
        write_golden(case, "xgboost", files, task, features, x_te, probs.argmax(1), probs, XGB_VER,
                     n_classes=probs.shape[1], csv=csv)
    else:
        write_golden(case, "xgboost", files, task, features, x_te, out, None, XGB_VER, csv=csv)
    return booster


def save_onnx(onx, *paths):
    """Canonical bytes, so regenerated files keep their SHA256.

    Converters name the graph with a random UUID (fixed name here), and skl2onnx
    emits opset_import in set order, which varies with PYTHONHASHSEED, sometimes
    with a domain listed twice: keep one entry per domain (highest version),
    sorted by domain.
    """
    onx.graph.name = paths[0].stem
    best = {}
    for o in onx.opset_import:
        best[o.domain] = max(best.get(o.domain, 0), o.version)
    del onx.opset_import[:]
    for domain in sorted(best):
        onx.opset_import.add(domain=domain, version=best[domain])
    for p in paths:
        p.write_bytes(onx.SerializeToString())


def onnx_run(path, x):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x.astype(np.float32)})


def categorical_data(rng, n):
    """4 numeric features + 2 integer categorical features with strong effects."""
    num = rng.normal(size=(n, 4))
    c1 = rng.integers(0, 16, n)
    c2 = rng.integers(0, 41, n)
    eff1 = rng.normal(scale=3.0, size=16)
    eff2 = rng.normal(scale=2.0, size=41)
    y = num[:, 0] * 1.5 - num[:, 1] + eff1[c1] + eff2[c2] + rng.normal(scale=0.1, size=n)
    x = np.column_stack([num, c1, c2]).astype(np.float64)
    return x, y


def write_models_readme(features):
    skl = f"scikit-learn {sklearn.__version__}"
    rows = [
        ("diabetes_lgbm.txt", "LightGBM text model, regression (L2), 150 trees, num_leaves 31, learning_rate 0.05; "
         "about 5% of training cells set to NaN (missing_type=NaN).", "`load_diabetes` (target: disease progression)",
         LGB_VER, features["diabetes_lgbm"]),
        ("breast_cancer_xgb.json", "XGBoost JSON model, binary:logistic, 100 trees, max_depth 4, eta 0.1; about 5% of "
         "training cells set to NaN (learned default directions). Output: probability of class 1 (benign).",
         "`load_breast_cancer`", XGB_VER, features["breast_cancer_xgb"]),
        ("wine_rf.onnx", "scikit-learn RandomForestClassifier (20 trees, max_depth 6) converted with skl2onnx, "
         "zipmap disabled: input `input` float32 [N, 13]; outputs `label` (int64 [N]) and `probabilities` "
         "(float32 [N, 3]). Same model as tests/fixtures/onnx_rf_classifier.onnx.", "`load_wine` (3 cultivars)",
         f"{skl}, {ORT_VER}", features["wine_rf"]),
        ("wine_mlp.pt", "PyTorch MLP classifier (13-32-16-3, ReLU; standardises its input with buffers from the "
         "training data), saved with `torch.jit.script`: input float32 [N, 13], output logits [N, 3] "
         "(`torch: {output: logits}`). Same model as tests/fixtures/torch_mlp_classifier.pt.",
         "`load_wine` (3 cultivars)", TORCH_VER, features["wine_mlp"]),
    ]
    out = ["# Shipped example models", "",
           "Generated by `python tools/make_fixtures.py` (or `make fixtures`) with the reference libraries pinned in",
           "`tools/requirements.txt`; fixed seeds, single-threaded, so reruns give the same files. The data sets ship",
           "with scikit-learn (no download); 70/30 train/test split, `random_state=42`. Feature names are",
           "scikit-learn's, lower-cased with every other character run replaced by `_`.", ""]
    for name, what, data, lib, feats in rows:
        out += [f"## {name}", "", what, "", f"- data: {data}", f"- produced with: {lib}",
                f"- features ({len(feats)}, in model order): " + ", ".join(f"`{f}`" for f in feats), ""]
    (MODELS / "README.md").write_text("\n".join(out))


def write_samples(name, feats, x, pred, probs):
    """models/samples/<name>.csv: feature rows with the reference prediction
    (`prediction`; classifiers also `p0`, `p1`, ...). repr() keeps every bit."""
    out = MODELS / "samples"
    out.mkdir(exist_ok=True)
    x = x[:100]
    head = list(feats) + ["prediction"] + ([f"p{k}" for k in range(probs.shape[1])] if probs is not None else [])
    lines = [",".join(head)]
    for i in range(len(x)):
        vals = [repr(float(v)) for v in x[i]] + [repr(float(pred[i]))]
        if probs is not None:
            vals += [repr(float(v)) for v in probs[i]]
        lines.append(",".join(vals))
    (out / f"{name}.csv").write_text("\n".join(lines) + "\n")


def main():
    FIX.mkdir(parents=True, exist_ok=True)
    MODELS.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    xd, yd, fd = dataset(load_diabetes)
    xb, yb, fb = dataset(load_breast_cancer)
    xw, yw, fw = dataset(load_wine)
    xd_tr, xd_te, yd_tr, _ = train_test_split(xd, yd, test_size=0.3, random_state=SEED)
    xb_tr, xb_te, yb_tr, _ = train_test_split(xb, yb, test_size=0.3, random_state=SEED)
    xw_tr, xw_te, yw_tr, _ = train_test_split(xw, yw, test_size=0.3, random_state=SEED)
    xd_trn = with_nan(xd_tr, 0.05, rng)
    xb_trn = with_nan(xb_tr, 0.05, rng)
    xd_t = test_rows(xd_te, rng)
    xb_t = test_rows(xb_te, rng)
    xw_t = test_rows(np.vstack([xw_te, xw_te * 1.1]), rng)
    xd_t_clean = test_rows(xd_te, rng, nan=False)
    xb_t_clean = test_rows(xb_te, rng, nan=False)

    # ---- LightGBM
    lgb_reg = lgb_case("lgb_regression", xd_trn, yd_tr, xd_t, fd, {"objective": "regression"}, 60, "regression", csv=True)
    lgb_case("lgb_regression_zero", xd_trn, yd_tr, xd_t, fd, {"objective": "regression", "zero_as_missing": True}, 30,
             "regression")
    lgb_case("lgb_poisson", xd_trn, yd_tr, xd_t, fd, {"objective": "poisson"}, 30, "regression")
    lgb_case("lgb_binary", xb_trn, yb_tr, xb_t, fb, {"objective": "binary"}, 50, "classification", csv=True)
    lgb_case("lgb_multiclass", xw_tr, yw_tr, xw_t, fw, {"objective": "multiclass", "num_class": 3}, 30, "classification")
    lgb_case("lgb_multiclassova", xw_tr, yw_tr, xw_t, fw, {"objective": "multiclassova", "num_class": 3}, 20,
             "classification")
    lgb_case("lgb_rf", xd_trn, yd_tr, xd_t, fd,
             {"objective": "regression", "boosting": "rf", "bagging_fraction": 0.7, "bagging_freq": 1}, 20, "regression")
    xc, yc = categorical_data(rng, 3000)
    xc_te, _ = categorical_data(np.random.default_rng(SEED + 1), 120)
    xc_te = with_nan(xc_te, 0.10, rng)
    xc_te[0, :] = np.nan  # all missing
    xc_te[1, :] = 0.0  # all zero (category 0)
    xc_te[2, :] = 1e6  # extreme numerics, huge unseen categories
    xc_te[3, :] = -1e6  # extreme numerics, negative categories
    xc_te[4:10, 4] = [-1, 99, 16, 3.7, -0.5, 1e9]  # negative, unseen, fractional (truncated), -0.5 -> int 0
    xc_te[10:16, 5] = [-3, 41, 400, 2.2, np.nan, 17]
    xc_te[16, :4] = 1e6  # extreme numerics with ordinary categories
    xc_te[17, :4] = -1e6
    xc_te[18, 5] = 99
    fc = ["num0", "num1", "num2", "num3", "cat_a", "cat_b"]
    lgb_case("lgb_categorical", xc, yc, xc_te, fc,
             {"objective": "regression", "min_data_per_group": 5, "cat_smooth": 1.0, "max_cat_to_onehot": 4}, 40,
             "regression", cat=[4, 5])
    assert re.search(r"num_cat=[1-9]", (FIX / "lgb_categorical.txt").read_text()), "no categorical split"

    # ---- XGBoost
    xgb_case("xgb_regression", xd_trn, yd_tr, xd_t, fd, {"objective": "reg:squarederror"}, 60, "regression")
    xgb_case("xgb_binary", xb_trn, yb_tr, xb_t, fb, {"objective": "binary:logistic"}, 50, "classification")
    xgb_case("xgb_multiclass", xw_tr, yw_tr, xw_t, fw, {"objective": "multi:softprob", "num_class": 3}, 30,
             "classification", csv=True)
    xgb_case("xgb_poisson", xd_trn, yd_tr, xd_t, fd, {"objective": "count:poisson"}, 30, "regression")
    # same test rows as lgb_categorical: XGBoost 3.2 predicts negative / >= 2^24 categories (invalid: left)
    xgb_case("xgb_categorical", xc, yc, xc_te, fc,
             {"objective": "reg:squarederror", "max_cat_to_onehot": 1}, 40, "regression",
             feature_types=["q", "q", "q", "q", "c", "c"])

    # ---- ONNX
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType as MLFloat
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    onx = convert_lightgbm(lgb_reg, initial_types=[("input", MLFloat([None, len(fd)]))], target_opset=15)
    save_onnx(onx, FIX / "onnx_lgb_regression.onnx")
    out = onnx_run(FIX / "onnx_lgb_regression.onnx", xd_t)
    write_golden("onnx_lgb_regression", "onnx", ["onnx_lgb_regression.onnx"], "regression", fd, xd_t,
                 out[0].reshape(-1), None, ORT_VER)

    pipe = Pipeline([("scale", StandardScaler()), ("logreg", LogisticRegression(max_iter=2000))]).fit(xb_tr, yb_tr)
    onx = convert_sklearn(pipe, initial_types=[("input", FloatTensorType([None, len(fb)]))],
                          options={id(pipe): {"zipmap": False}})
    save_onnx(onx, FIX / "onnx_skl_logreg.onnx")
    label, probs = onnx_run(FIX / "onnx_skl_logreg.onnx", xb_t_clean)
    write_golden("onnx_skl_logreg", "onnx", ["onnx_skl_logreg.onnx"], "classification", fb, xb_t_clean, label, probs,
                 ORT_VER, n_classes=2)

    rf = RandomForestClassifier(n_estimators=20, max_depth=6, random_state=SEED, n_jobs=1).fit(xw_tr, yw_tr)
    onx = convert_sklearn(rf, initial_types=[("input", FloatTensorType([None, len(fw)]))],
                          options={id(rf): {"zipmap": False}})
    save_onnx(onx, FIX / "onnx_rf_classifier.onnx", MODELS / "wine_rf.onnx")
    xw_clean = test_rows(np.vstack([xw_te, xw_te * 1.1]), rng, nan=False)
    label, probs = onnx_run(FIX / "onnx_rf_classifier.onnx", xw_clean)
    write_golden("onnx_rf_classifier", "onnx", ["onnx_rf_classifier.onnx"], "classification", fw, xw_clean, label,
                 probs, ORT_VER, n_classes=3)

    onx = convert_sklearn(rf, initial_types=[("input", FloatTensorType([None, len(fw)]))])
    save_onnx(onx, FIX / "onnx_rf_classifier_zipmap.onnx")
    label, maps = onnx_run(FIX / "onnx_rf_classifier_zipmap.onnx", xw_clean)
    probs = [[m[k] for k in sorted(m)] for m in maps]
    write_golden("onnx_rf_classifier_zipmap", "onnx", ["onnx_rf_classifier_zipmap.onnx"], "classification", fw,
                 xw_clean, label, probs, ORT_VER, n_classes=3)

    mlp = Pipeline([("scale", StandardScaler()),
                    ("mlp", MLPRegressor(hidden_layer_sizes=(32, 16), max_iter=3000, random_state=SEED))])
    with warnings.catch_warnings():  # max_iter is reached; the fixture only needs a fixed model
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(xd_tr, yd_tr)
    onx = convert_sklearn(mlp, initial_types=[("input", FloatTensorType([None, len(fd)]))])
    save_onnx(onx, FIX / "onnx_mlp.onnx")
    out = onnx_run(FIX / "onnx_mlp.onnx", xd_t_clean)
    write_golden("onnx_mlp", "onnx", ["onnx_mlp.onnx"], "regression", fd, xd_t_clean, out[0].reshape(-1), None,
                 ORT_VER)

    # a hand-built network with one sigmoid column: P(class 1) of a binary classifier, [N, 1]
    from onnx import TensorProto, helper, numpy_helper
    scaler = StandardScaler().fit(xb_tr)
    lr = LogisticRegression(max_iter=2000).fit(scaler.transform(xb_tr), yb_tr)
    w = (lr.coef_[0] / scaler.scale_).astype(np.float32).reshape(-1, 1)
    b = np.array([lr.intercept_[0] - float(np.dot(lr.coef_[0], scaler.mean_ / scaler.scale_))], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["z0"]), helper.make_node("Add", ["z0", "b"], ["z"]),
         helper.make_node("Sigmoid", ["z"], ["prob"])],
        "onnx_sigmoid_binary",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, len(fb)])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [None, 1])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onx = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    save_onnx(onx, FIX / "onnx_sigmoid_binary.onnx")
    p1 = onnx_run(FIX / "onnx_sigmoid_binary.onnx", xb_t_clean)[0].reshape(-1).astype(np.float64)
    probs = np.column_stack([1 - p1, p1])
    write_golden("onnx_sigmoid_binary", "onnx", ["onnx_sigmoid_binary.onnx"], "classification", fb, xb_t_clean,
                 probs.argmax(1), probs, ORT_VER, n_classes=2)

    # ---- shipped example models
    booster = lgb.train({"objective": "regression", "num_leaves": 31, "learning_rate": 0.05, "verbose": -1,
                         "num_threads": 1, "seed": SEED, "deterministic": True},
                        lgb.Dataset(xd_trn, yd_tr, feature_name=fd), num_boost_round=150)
    booster.save_model(str(MODELS / "diabetes_lgbm.txt"))
    bx = xgb.train({"objective": "binary:logistic", "max_depth": 4, "eta": 0.1, "nthread": 1, "seed": SEED},
                   xgb.DMatrix(xb_trn, yb_tr, feature_names=fb), num_boost_round=100)
    bx.save_model(str(MODELS / "breast_cancer_xgb.json"))

    # ---- PyTorch (TorchScript); also the shipped models/wine_mlp.pt
    import torch_fixtures
    torch_ver = torch_fixtures.make(FIX, MODELS, write_golden, write_samples, {
        "diabetes": ((xd_tr, xd_te, yd_tr), fd),
        "wine": ((xw_tr, xw_te, yw_tr), fw),
        "breast_cancer": ((xb_tr, xb_te, yb_tr), fb),
    }, SEED)

    # ---- pickles of every allowlisted class, and hostile pickles
    import pickle_fixtures
    pickle_fixtures.make(FIX, write_golden, {
        "diabetes": ((xd_tr, xd_te, yd_tr), fd),
        "wine": ((xw_tr, xw_te, yw_tr), fw),
        "breast_cancer": ((xb_tr, xb_te, yb_tr), fb),
    }, SEED)

    # ---- CatBoost JSON exports (and the ONNX exports of three of them)
    import catboost_fixtures
    cb_ver = catboost_fixtures.make(FIX, write_golden, {
        "diabetes": ((xd_tr, xd_te, yd_tr), fd),
        "wine": ((xw_tr, xw_te, yw_tr), fw),
        "breast_cancer": ((xb_tr, xb_te, yb_tr), fb),
    }, SEED)

    shipped = [("diabetes_lgbm", fd), ("breast_cancer_xgb", fb), ("wine_rf", fw), ("wine_mlp", fw)]
    write_models_readme(dict(shipped))

    # sample events for the shipped models (demo, bench, end-to-end tests), each
    # row with the reference library's own prediction
    wine = onnx_run(MODELS / "wine_rf.onnx", xw_te)
    write_samples("diabetes_lgbm", fd, xd_te, booster.predict(xd_te), None)
    pb = bx.predict(xgb.DMatrix(xb_te, feature_names=fb)).astype(np.float64)
    write_samples("breast_cancer_xgb", fb, xb_te, (pb > 0.5).astype(np.int64), np.column_stack([1 - pb, pb]))
    write_samples("wine_rf", fw, xw_te, wine[0], wine[1].astype(np.float64))
    print(f"\nsklearn {sklearn.__version__}, {LGB_VER}, {XGB_VER}, {ORT_VER}, {torch_ver}, {cb_ver}")
    for name, feats in shipped:
        print(f"{name}: {json.dumps(feats)}")
    for p in sorted(MODELS.iterdir()):
        print(f"models/{p.name}: {p.stat().st_size:,} B")
    total = sum(p.stat().st_size for p in list(FIX.iterdir()) + list(MODELS.iterdir()) if p.is_file())
    print(f"total fixture + model bytes: {total:,}")


if __name__ == "__main__":
    main()
