"""CatBoost fixtures (called by make_fixtures.py): small CatBoost models
exported as JSON (`save_model(path, format="json")`) with golden
predictions from CatBoost itself, and the ONNX exports of three of them with
golden predictions from ONNX Runtime.

Cases (tests/fixtures/<case>.json + <case>.golden.json, kind "catboost"):
  cb_regression            diabetes, RMSE, symmetric trees, NaN in training and test rows, nan_mode Min
  cb_regression_nanmax     the same data with nan_mode Max
  cb_binary                breast cancer, Logloss (NaN in training and test rows)
  cb_multiclass            wine, MultiClass, 3 classes (NaN in training and test rows)
  cb_depthwise             diabetes, RMSE, grow_policy Depthwise (JSON writes nested `trees`)
  cb_lossguide_multiclass  wine, MultiClass, grow_policy Lossguide (leaf `value` lists)
Golden values: `predict(prediction_type="RawFormulaVal")` for regression;
`predict_proba` for classifiers (class index = argmax); every case also
records `raw_formula_val` (the margins, one list per row) and
`feature_importance` (CatBoost's default PredictionValuesChange, which sums
to 100; it is computed from the leaf values and `leaf_weights`).
cb_regression's golden file also holds `border_inputs` and
`border_raw_formula_val`: rows on and next to the split borders (see
border_rows).

ONNX (tests/fixtures/onnx_cb_<case>.onnx + .golden.json, kind "onnx"): the
exports (`format="onnx"`) of cb_regression, cb_binary and cb_multiclass,
predicted by ONNX Runtime on the same rows as float32. The exported
TreeEnsemble sends NaN where CatBoost does: on these fixtures every row,
NaN rows included, agrees with CatBoost within 1e-5 relative + 1e-6
absolute (float32 arithmetic). A row that did not would be left out of the
ONNX golden file (`make` prints it; the golden file lists such rows under
`rows_left_out`, empty here). CatBoost exports only symmetric trees without categorical
or text features to ONNX ("Can save non symmetric trees only in cbm, Json,
or Pmml format"; "ONNX-ML format export does yet not support categorical
features").

cb_categorical.json: a model with one categorical feature (CTR splits),
which ml-worker refuses (no golden file).

The JSON exports are written back compact (same numbers, no whitespace)
with `model_guid` and `train_finish_time` fixed, and the ONNX exports with
those metadata fixed too, so that a rerun gives the same bytes.
"""
import json

import numpy as np
import onnx
import onnxruntime as ort
from catboost import CatBoostClassifier, CatBoostRegressor, Pool
from catboost import __version__ as CB_VERSION

FIXED_META = {"model_guid": "00000000-00000000-00000000-00000000", "train_finish_time": "2000-01-01T00:00:00Z"}


def test_rows(x, rng, n=120):
    """As make_fixtures.test_rows: ~10% NaN cells, an all-NaN row, an all-zero row and extremes."""
    x = x[:n].copy()
    x[rng.random(x.shape) < 0.10] = np.nan
    x[0, :] = np.nan
    x[1, :] = 0.0
    x[2, :] = 1e6
    x[3, :] = -1e6
    return x


def save_json(model, path):
    model.save_model(str(path), format="json")
    doc = json.loads(path.read_text())
    doc["model_info"].update(FIXED_META)
    path.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")


def save_onnx(model, path):
    model.save_model(str(path), format="onnx")
    m = onnx.load(str(path))
    for p in m.metadata_props:
        if p.key in FIXED_META:
            p.value = FIXED_META[p.key]
    path.write_bytes(m.SerializeToString())


def onnx_run(path, x):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)}), [o.name for o in sess.get_outputs()]


def border_rows(stem, model, rng):
    """Adds to <stem>.golden.json rows on and around the borders of the first
    10 trees (the border as float32, the next float32 up and down, the next
    double up and down, which round to the border), and values beyond the
    float32 range, with CatBoost's raw predictions: `border_inputs`,
    `border_raw_formula_val`. nan_mode Min models split NaN off at the border
    -FLT_MAX (NaN and -inf are not greater), Max ones at +FLT_MAX."""
    doc = json.loads(stem.with_suffix(".json").read_text())
    n = len(doc["features_info"]["float_features"])
    rows = []
    for tree in doc["oblivious_trees"][:10]:
        for split in tree["splits"]:
            b = np.float32(split["border"])
            with np.errstate(over="ignore"):  # nan_mode Min's NaN border is -FLT_MAX
                near = [b, np.nextafter(b, np.float32(np.inf)), np.nextafter(b, np.float32(-np.inf))]
            near = [float(v) for v in near] + [np.nextafter(float(b), np.inf), np.nextafter(float(b), -np.inf)]
            for v in filter(np.isfinite, near):
                r = rng.normal(scale=0.05, size=n)
                r[split["float_feature_index"]] = v
                rows.append(r)
    for v in [1e39, -1e39, 3.5e38, -3.5e38, 5e-46, -5e-46]:
        rows.append(np.full(n, v))
    x = np.array(rows)
    golden = stem.parent / f"{stem.name}.golden.json"
    g = json.loads(golden.read_text())
    g["border_inputs"] = x.tolist()
    g["border_raw_formula_val"] = [float(v) for v in model.predict(x, prediction_type="RawFormulaVal")]
    golden.write_text(json.dumps(g) + "\n")


def make(fix, write_golden, data, seed):
    rng = np.random.default_rng(seed)
    (xd_tr, xd_te, yd_tr), fd = data["diabetes"]
    (xw_tr, xw_te, yw_tr), fw = data["wine"]
    (xb_tr, xb_te, yb_tr), fb = data["breast_cancer"]
    ver = f"catboost {CB_VERSION}"
    ort_ver = f"onnxruntime {ort.__version__}, {ver}"

    def with_nan(x, frac=0.05):
        x = x.copy()
        x[rng.random(x.shape) < frac] = np.nan
        return x

    xd_trn, xb_trn, xw_trn = with_nan(xd_tr), with_nan(xb_tr), with_nan(xw_tr)
    xd_t = test_rows(xd_te, rng)
    xb_t = test_rows(xb_te, rng)
    xw_t = test_rows(np.vstack([xw_te, xw_te * 1.1]), rng)

    def fit(cls, x, y, feats, **params):
        p = {"random_seed": seed, "thread_count": 1, "verbose": 0, "allow_writing_files": False,
             "learning_rate": 0.1}
        p.update(params)
        return cls(**p).fit(Pool(x, y, feature_names=feats))

    def case(name, model, x, feats, classifier):
        save_json(model, fix / f"{name}.json")
        raw = model.predict(x, prediction_type="RawFormulaVal")
        raw = raw.reshape(len(x), -1).astype(np.float64)
        extra = {"raw_formula_val": [[float(v) for v in r] for r in raw],
                 "feature_importance": [float(v) for v in model.get_feature_importance(type="PredictionValuesChange")]}
        if classifier:
            probs = model.predict_proba(x).astype(np.float64)
            write_golden(name, "catboost", [f"{name}.json"], "classification", feats, x, probs.argmax(1), probs,
                         ver, n_classes=probs.shape[1], extra=extra)
        else:
            write_golden(name, "catboost", [f"{name}.json"], "regression", feats, x, raw[:, 0], None, ver,
                         extra=extra)

    def onnx_case(name, model, x, feats, classifier):
        path = fix / f"{name}.onnx"
        save_onnx(model, path)
        outs, names = onnx_run(path, x)
        if classifier:
            # outputs: label (int64 [N]) and probabilities (a ZipMap: one {class: p} map per row)
            maps = outs[names.index("probabilities")]
            probs = np.array([[m[k] for k in sorted(m)] for m in maps], dtype=np.float64)
            want = model.predict_proba(x)
            agree = np.all(np.abs(probs - want) <= 1e-5 * np.abs(want) + 1e-6, axis=1)
            pred = outs[names.index("label")]
        else:
            pred = outs[0].reshape(-1).astype(np.float64)
            want = model.predict(x, prediction_type="RawFormulaVal")
            agree = np.abs(pred - want) <= 1e-5 * np.abs(want) + 1e-6
            probs = None
        left_out = [int(i) for i in np.flatnonzero(~agree)]
        if left_out:
            print(f"{name}: {len(left_out)} rows where the ONNX export differs from CatBoost left out: {left_out}")
        keep = agree
        write_golden(name, "onnx", [path.name], "classification" if classifier else "regression", feats, x[keep],
                     pred[keep], None if probs is None else probs[keep], ort_ver,
                     n_classes=None if probs is None else probs.shape[1], extra={"rows_left_out": left_out})

    reg = fit(CatBoostRegressor, xd_trn, yd_tr, fd, loss_function="RMSE", iterations=30, depth=5, nan_mode="Min")
    case("cb_regression", reg, xd_t, fd, False)
    border_rows(fix / "cb_regression", reg, rng)
    onnx_case("onnx_cb_regression", reg, xd_t, fd, False)

    m = fit(CatBoostRegressor, xd_trn, yd_tr, fd, loss_function="RMSE", iterations=30, depth=4, nan_mode="Max")
    case("cb_regression_nanmax", m, xd_t, fd, False)

    binary = fit(CatBoostClassifier, xb_trn, yb_tr, fb, loss_function="Logloss", iterations=30, depth=4)
    case("cb_binary", binary, xb_t, fb, True)
    onnx_case("onnx_cb_binary", binary, xb_t, fb, True)

    multi = fit(CatBoostClassifier, xw_trn, yw_tr, fw, loss_function="MultiClass", iterations=25, depth=4)
    case("cb_multiclass", multi, xw_t, fw, True)
    onnx_case("onnx_cb_multiclass", multi, xw_t, fw, True)

    m = fit(CatBoostRegressor, xd_trn, yd_tr, fd, loss_function="RMSE", iterations=25, depth=4,
            grow_policy="Depthwise")
    case("cb_depthwise", m, xd_t, fd, False)

    m = fit(CatBoostClassifier, xw_trn, yw_tr, fw, loss_function="MultiClass", iterations=20, depth=6,
            grow_policy="Lossguide", max_leaves=8)
    case("cb_lossguide_multiclass", m, xw_t, fw, True)

    # one categorical feature ("color", 6 values) with CTR splits: refused by ml-worker
    n = 400
    num = rng.normal(size=(n, 3))
    color = rng.integers(0, 6, n)
    y = num[:, 0] + color * 0.7 + rng.normal(scale=0.1, size=n)
    cols = [num[:, 0].tolist(), num[:, 1].tolist(), [f"c{c}" for c in color], num[:, 2].tolist()]
    pool = Pool([list(r) for r in zip(*cols)], y, cat_features=[2], feature_names=["a", "b", "color", "d"])
    m = CatBoostRegressor(iterations=10, depth=3, random_seed=seed, thread_count=1, verbose=0,
                          allow_writing_files=False).fit(pool)
    save_json(m, fix / "cb_categorical.json")
    print(f"{'cb_categorical':28s} (refusal fixture)  cb_categorical.json "
          f"{(fix / 'cb_categorical.json').stat().st_size:,} B")
    return ver
