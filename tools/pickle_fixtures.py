"""Pickle fixtures (called by make_fixtures.py): every allowlisted model
class pickled by the real libraries (protocols 2 to 5 across the cases),
with golden predictions, and hostile pickles that must be refused.

Cases (tests/fixtures/<case>.pkl + <case>.golden.json, kind "pickle"):
  LightGBM Booster / LGBMRegressor / LGBMClassifier, XGBoost Booster /
  XGBRegressor / XGBClassifier, LinearRegression, Ridge, Lasso,
  LogisticRegression (binary and multinomial), DecisionTree*, RandomForest*,
  ExtraTrees*, GradientBoosting*, Pipeline(StandardScaler|MinMaxScaler, ...),
  and two files written by joblib.dump (uncompressed).
Hostile (tests/fixtures/hostile/*.pkl): code-execution payloads (os.system,
subprocess, builtins.eval/exec/getattr, importlib, marshal) that would
create a file named in the payload, truncated files, deep nesting, huge
declared lengths, a model class outside the allowlist.
"""
import os
import pickle
import pickletools

import lightgbm as lgb
import numpy as np
import xgboost as xgb
from sklearn.ensemble import (ExtraTreesClassifier, ExtraTreesRegressor, GradientBoostingClassifier,
                              GradientBoostingRegressor, RandomForestClassifier, RandomForestRegressor)
from sklearn.linear_model import Lasso, LinearRegression, LogisticRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

# where hostile payloads would write if they ran (the test checks it stays absent)
PWNED = "/tmp/ml-worker-pickle-payload-ran"


def dump(obj, path, protocol):
    if protocol == "joblib":
        import joblib
        joblib.dump(obj, path)
        return
    data = pickle.dumps(obj, protocol=protocol)
    path.write_bytes(pickletools.optimize(data) if protocol >= 2 else data)


class Payload:
    """Unpickling calls func(*args)."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile(out):
    import builtins
    import importlib
    import marshal
    import subprocess
    out.mkdir(exist_ok=True)
    cases = {
        "os_system": Payload(os.system, (f"touch {PWNED}",)),
        "subprocess_call": Payload(subprocess.call, (["touch", PWNED],)),
        "builtins_eval": Payload(builtins.eval, (f"open('{PWNED}', 'w')",)),
        "builtins_exec": Payload(builtins.exec, (f"open('{PWNED}', 'w').close()",)),
        "builtins_getattr": Payload(builtins.getattr, (Payload(builtins.__import__, ("os",)), "system")),
        "importlib_import": Payload(importlib.import_module, ("os",)),
        "marshal_loads": Payload(marshal.loads, (marshal.dumps(compile("1", "x", "eval")),)),
    }
    for name, obj in cases.items():
        (out / f"{name}.pkl").write_bytes(pickle.dumps(obj, protocol=4))
    # the payload hidden inside a real model's state
    lr = LinearRegression().fit([[0.0], [1.0]], [0.0, 1.0])
    lr.note = Payload(os.system, (f"touch {PWNED}",))
    (out / "model_with_payload.pkl").write_bytes(pickle.dumps(lr, protocol=4))
    # a class outside the allowlist
    from sklearn.svm import SVR
    (out / "unsupported_svr.pkl").write_bytes(pickle.dumps(SVR().fit([[0.0], [1.0]], [0.0, 1.0]), protocol=4))
    good = pickle.dumps(LinearRegression().fit([[0.0], [1.0]], [0.0, 1.0]), protocol=4)
    (out / "truncated.pkl").write_bytes(good[: len(good) // 2])
    (out / "deep_nesting.pkl").write_bytes(b"\x80\x04" + b"(" * 200_000 + b"N" + b"t" * 200_000 + b".")
    (out / "deep_lists.pkl").write_bytes(b"\x80\x04" + b"]" * 100_000 + b"a" * 99_999 + b".")
    (out / "huge_length.pkl").write_bytes(b"\x80\x04\x8d" + (2**62).to_bytes(8, "little") + b"x.")
    (out / "huge_bytes8.pkl").write_bytes(b"\x80\x04\x8e" + (2**63 - 1).to_bytes(8, "little") + b".")
    (out / "not_a_pickle.pkl").write_bytes(b"tree\nversion=v4\n")
    (out / "empty.pkl").write_bytes(b"")
    import joblib
    joblib.dump(LinearRegression().fit([[0.0], [1.0]], [0.0, 1.0]), out / "joblib_compressed.pkl", compress=3)


def make(fix, write_golden, data, seed):
    rng = np.random.default_rng(seed)
    (xd_tr, xd_te, yd_tr), fd = data["diabetes"]
    (xw_tr, xw_te, yw_tr), fw = data["wine"]
    (xb_tr, xb_te, yb_tr), fb = data["breast_cancer"]
    ver = f"scikit-learn {__import__('sklearn').__version__}, lightgbm {lgb.__version__}, xgboost {xgb.__version__}"

    def with_nan(x, frac=0.05):
        x = x.copy()
        x[rng.random(x.shape) < frac] = np.nan
        return x

    def case(name, model, x, protocol, classifier, allow_nan=False, predict=None):
        dump(model, fix / f"{name}.pkl", protocol)
        if predict is not None:
            pred, probs = predict(x)
        elif classifier:
            probs = model.predict_proba(x).astype(np.float64)
            pred, probs = probs.argmax(1), probs
        else:
            pred, probs = model.predict(x).astype(np.float64), None
        extra = {"pickle_protocol": protocol if protocol != "joblib" else 4, "joblib": protocol == "joblib",
                 "missing": "nan" if allow_nan else "reject"}
        write_golden(name, "pickle", [f"{name}.pkl"], "classification" if classifier else "regression",
                     data_features[id(x)], x, pred, probs, ver,
                     n_classes=None if probs is None else probs.shape[1], extra=extra)

    data_features = {}

    def rows(x, feats):
        data_features[id(x)] = feats
        return x

    xd = rows(xd_te.copy(), fd)
    xdn = rows(with_nan(xd_te), fd)
    xw = rows(xw_te.copy(), fw)
    xb = rows(xb_te.copy(), fb)
    xbn = rows(with_nan(xb_te), fb)

    # ---- LightGBM and XGBoost (native evaluators); NaN rows included
    p = {"verbose": -1, "num_threads": 1, "seed": seed, "deterministic": True}
    booster = lgb.train({"objective": "regression", "num_leaves": 15, **p},
                        lgb.Dataset(with_nan(xd_tr), yd_tr), num_boost_round=30)
    case("pkl_lgb_booster", booster, xdn, 4, False, allow_nan=True)
    case("pkl_lgbm_regressor", lgb.LGBMRegressor(n_estimators=30, num_leaves=15, **p).fit(with_nan(xd_tr), yd_tr),
         xdn, 5, False, allow_nan=True)
    case("pkl_lgbm_classifier", lgb.LGBMClassifier(n_estimators=20, num_leaves=7, **p).fit(xw_tr, yw_tr),
         xw, 2, True, allow_nan=True)
    bx = xgb.train({"objective": "reg:squarederror", "max_depth": 3, "nthread": 1, "seed": seed},
                   xgb.DMatrix(with_nan(xd_tr), yd_tr), num_boost_round=20)
    case("pkl_xgb_booster", bx, xdn, 4, False, allow_nan=True,
         predict=lambda x: (bx.predict(xgb.DMatrix(x)).astype(np.float64), None))
    case("pkl_xgb_regressor", xgb.XGBRegressor(n_estimators=20, max_depth=3, n_jobs=1, random_state=seed)
         .fit(with_nan(xd_tr), yd_tr), xdn, 5, False, allow_nan=True)
    xc = xgb.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1, random_state=seed).fit(with_nan(xb_tr), yb_tr)
    case("pkl_xgb_classifier", xc, xbn, 4, True, allow_nan=True)

    # ---- scikit-learn linear models
    case("pkl_linear_regression", LinearRegression().fit(xd_tr, yd_tr), xd, 2, False)
    case("pkl_ridge", Ridge(alpha=0.5).fit(xd_tr, yd_tr), xd, 3, False)
    case("pkl_lasso", Lasso(alpha=0.1).fit(xd_tr, yd_tr), xd, 5, False)
    case("pkl_logreg_binary", Pipeline([("scale", StandardScaler()),
                                        ("lr", LogisticRegression(max_iter=5000))]).fit(xb_tr, yb_tr),
         xb, 4, True)
    case("pkl_logreg_multinomial", Pipeline([("scale", MinMaxScaler()),
                                             ("lr", LogisticRegression(max_iter=5000))]).fit(xw_tr, yw_tr),
         xw, 5, True)

    # ---- scikit-learn trees; trees and forests take NaN (sklearn >= 1.4)
    case("pkl_decision_tree_regressor", DecisionTreeRegressor(max_depth=6, random_state=seed)
         .fit(with_nan(xd_tr), yd_tr), xdn, 4, False, allow_nan=True)
    case("pkl_decision_tree_classifier", DecisionTreeClassifier(max_depth=5, random_state=seed).fit(xw_tr, yw_tr),
         xw, 2, True)
    case("pkl_random_forest_regressor", RandomForestRegressor(n_estimators=15, max_depth=6, random_state=seed,
                                                              n_jobs=1).fit(with_nan(xd_tr), yd_tr),
         xdn, 5, False, allow_nan=True)
    case("pkl_random_forest_classifier", RandomForestClassifier(n_estimators=15, max_depth=6, random_state=seed,
                                                                n_jobs=1).fit(xb_tr, yb_tr), xb, 4, True)
    case("pkl_extra_trees_regressor", ExtraTreesRegressor(n_estimators=15, max_depth=6, random_state=seed,
                                                          n_jobs=1).fit(xd_tr, yd_tr), xd, 4, False)
    case("pkl_extra_trees_classifier", ExtraTreesClassifier(n_estimators=15, max_depth=6, random_state=seed,
                                                            n_jobs=1).fit(xw_tr, yw_tr), xw, 3, True)
    case("pkl_gradient_boosting_regressor", GradientBoostingRegressor(n_estimators=40, max_depth=3,
                                                                      random_state=seed).fit(xd_tr, yd_tr),
         xd, 4, False)
    case("pkl_gradient_boosting_binary", GradientBoostingClassifier(n_estimators=30, max_depth=3,
                                                                    random_state=seed).fit(xb_tr, yb_tr),
         xb, 5, True)
    case("pkl_gradient_boosting_multiclass", GradientBoostingClassifier(n_estimators=20, max_depth=2,
                                                                        random_state=seed).fit(xw_tr, yw_tr),
         xw, 4, True)
    # fitted without random_state (scikit-learn's default): the estimator
    # keeps numpy's global random state, with its SeedSequence, in the
    # pickle (so this case differs from run to run; its golden goes with it)
    case("pkl_gradient_boosting_unseeded", GradientBoostingRegressor(n_estimators=20, max_depth=3)
         .fit(xd_tr, yd_tr), xd, 4, False)
    case("pkl_pipeline_scaled_forest", Pipeline([("scale", StandardScaler()),
                                                 ("rf", RandomForestRegressor(n_estimators=10, max_depth=5,
                                                                              random_state=seed, n_jobs=1))])
         .fit(xd_tr, yd_tr), xd, 4, False)

    # joblib.dump (uncompressed): arrays follow the pickle opcodes; object
    # arrays (gradient boosting's estimators_) are nested pickle streams
    case("pkl_joblib_random_forest_classifier",
         RandomForestClassifier(n_estimators=8, max_depth=5, random_state=seed, n_jobs=1).fit(xw_tr, yw_tr),
         xw, "joblib", True)
    case("pkl_joblib_gradient_boosting_regressor",
         GradientBoostingRegressor(n_estimators=20, max_depth=3, random_state=seed).fit(xd_tr, yd_tr),
         xd, "joblib", False)

    hostile(fix / "hostile")

    # protocol 5 with an out-of-band buffer: the array's bytes live outside the pickle
    arr = np.arange(12, dtype=np.float64).reshape(3, 4) * 0.5
    buffers = []
    (fix / "oob_array.pkl").write_bytes(pickle.dumps(arr, protocol=5, buffer_callback=buffers.append))
    (fix / "oob_array.buf0").write_bytes(bytes(buffers[0].raw()))
