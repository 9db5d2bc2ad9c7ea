"""Tasks, labels, splits, errors, reports and persistence, on the test bed's real labels with
synthetic features (the real-feature tests are in test_heads_real.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from convert.errors import GraftError
from heads.fit import fit_head
from heads.persist import load_head
from heads.splits import cv_folds, make_split
from heads.tasks import join_labels, prepare, resolve_task

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "testbed" / "faces" / "imdbwiki"
MODEL = {"name": "synth", "weights_sha256": "a" * 64, "dir": None}


@pytest.fixture(scope="module")
def faces_meta() -> pd.DataFrame:
    """labels.csv as extract's metadata would look: path, sha256 of the bytes, every label column."""
    if not (FACES / "labels.csv").exists():
        pytest.skip("test bed absent: ../shared/testbed/faces/imdbwiki")
    d = pd.read_csv(FACES / "labels.csv").rename(columns={"file": "path"})
    d["sha256"] = [hashlib.sha256((FACES / p).read_bytes()).hexdigest() for p in d["path"]]
    return d


def _features(meta: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """Noise plus a weak gender and age signal (stands in for embeddings); as in a real cache,
    every copy of one image (same sha256) gets the same features."""
    per_image = meta.groupby("sha256", sort=True).agg(gender=("gender", "first"), age=("age_approx", "first"))
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((len(per_image), 32)).astype(np.float32)
    F[:, 0] += 1.5 * (per_image["gender"] == "male").to_numpy()
    F[:, 1] += per_image["age"].fillna(30).to_numpy(dtype=np.float32) / 8
    return F[per_image.index.get_indexer(meta["sha256"])]


def test_builtin_tasks_and_errors():
    assert resolve_task("gender").label_column == "gender"
    age = resolve_task("age")
    assert (age.label_column, age.kind) == ("age_approx", "regression")
    assert resolve_task("young-old").label_column == "age_group"
    assert resolve_task(None, "Gender", "classification").name == "gender"
    with pytest.raises(GraftError, match="unknown task"):
        resolve_task("shoe-size")
    with pytest.raises(GraftError, match="needs --kind"):
        resolve_task(None, "Gender")


def test_gender_fit_report_and_card(faces_meta, tmp_path):
    X = _features(faces_meta)
    res = fit_head(X, faces_meta, resolve_task("gender"), model=MODEL, layer="pool", out=tmp_path / "g", cv=3)
    files = {p.name for p in (tmp_path / "g").iterdir()}
    assert {"head.json", "head.npz", "card.json", "report.json", "report.md", "confusion_matrix.png", "roc.png", "learning_curve.png",
            "test_predictions.csv"} <= files and "head.joblib" not in files
    rep = json.loads((tmp_path / "g" / "report.json").read_text())
    # the data's own split: 500 F + 500 M train, 58 F + 50 M test; age-data rows have no gender
    assert rep["data"]["class_counts"] == {"train": {"female": 500, "male": 500}, "test": {"female": 58, "male": 50}}
    assert rep["data"]["dropped"]["missing_label"] == int(faces_meta["gender"].isna().sum())
    m, b = rep["test"]["metrics"], rep["test"]["baseline"]
    assert m["accuracy"] > b["accuracy"] + 0.15 and b["accuracy"] == pytest.approx(58 / 108)
    assert set(m["per_class"]) == {"female", "male"} and m["roc_auc"] > 0.8
    assert np.array(m["confusion_matrix"]["matrix"]).sum() == 108
    assert [r["n_train"] for r in rep["learning_curve"]] == [100, 250, 500, 750, 1000]
    card = res.card
    assert card["labels"] == ["female", "male"] and card["layer"] == "pool" and card["versions"]["scikit-learn"]
    pred = pd.read_csv(tmp_path / "g" / "test_predictions.csv")
    assert set(pred["prediction"]) <= {"female", "male"} and {"p_female", "p_male"} <= set(pred.columns)


def test_age_regression_drops_leaked_duplicates(faces_meta, tmp_path):
    """age_approx is labelled in both tasks; 23 gender-data test photos are age-data train photos."""
    X = _features(faces_meta)
    res = fit_head(X, faces_meta, resolve_task("age"), model=MODEL, layer="pool", out=tmp_path / "a", head="ridge",
                   with_learning_curve=False)
    data = res.report["data"]
    assert data["dropped"]["test_rows_sharing_content_with_train"] == 23
    m, b = res.report["test"]["metrics"], res.report["test"]["baseline"]
    assert m["rmse"] < b["rmse"] and m["r2"] > 0.2 and b["r2"] <= 0.0
    assert (tmp_path / "a" / "pred_vs_true.png").exists()


def test_split_hygiene_with_group_column(faces_meta):
    """Without a split column, --group-column keeps each group on one side of the hold-out and of every fold."""
    meta = faces_meta[faces_meta["task"] == "gender-data"].drop(columns=["split"]).reset_index(drop=True)
    meta["person"] = meta["path"].str.extract(r"/(\d+)_")[0].astype(float) // 1000  # coarse groups for the test
    data = prepare(_features(meta), meta, resolve_task("gender"))
    split = make_split(data, group_column="person", seed=3)
    people = data.meta["person"].to_numpy()
    assert not set(people[split.train]) & set(people[split.test])
    assert not set(data.meta["path"].iloc[split.train]) & set(data.meta["path"].iloc[split.test])
    assert not set(data.meta["sha256"].iloc[split.train]) & set(data.meta["sha256"].iloc[split.test])
    assert "group" in split.source
    folds = cv_folds(data.y[split.train], split.groups[split.train], kind="classification", n_splits=4)
    for tr, va in folds:
        assert not set(split.groups[split.train][tr]) & set(split.groups[split.train][va])


def test_stratified_holdout_without_split_column(faces_meta):
    meta = faces_meta[faces_meta["task"] == "age-data"].drop(columns=["split"]).reset_index(drop=True)
    data = prepare(_features(meta), meta, resolve_task("age-group"))
    split = make_split(data, test_size=0.25, seed=0)
    frac = [np.mean(data.y[idx] == "old") for idx in (split.train, split.test)]
    assert abs(frac[0] - frac[1]) < 0.03
    assert not set(data.meta["sha256"].iloc[split.train]) & set(data.meta["sha256"].iloc[split.test])


def test_labels_csv_join_by_suffix_and_name(faces_meta):
    meta = faces_meta[["path", "sha256"]].copy()
    meta["path"] = "/data/faces/" + meta["path"]  # absolute paths in the cache, relative in the CSV
    lab = faces_meta[["path", "gender"]].rename(columns={"path": "file"})
    out = join_labels(meta, lab)
    assert out["gender"].fillna("-").tolist() == faces_meta["gender"].fillna("-").tolist()
    names = meta["path"].str.rsplit("/", n=1).str[-1]
    unique, dup = names[~names.duplicated(keep=False)].iloc[0], names[names.duplicated(keep=False)].iloc[0]
    lab2 = pd.DataFrame({"file": [unique, dup], "Gender": ["F", "M"]})  # file names only
    out2 = join_labels(meta, lab2)
    assert out2["Gender"].tolist().count("F") == 1 and "M" not in out2["Gender"].tolist()  # an ambiguous name joins nothing
    with pytest.raises(GraftError, match="no row of --labels matches"):
        join_labels(meta, pd.DataFrame({"file": ["nope.jpg"], "g": ["x"]}))


def _tiny(n=40, seed=0):
    rng = np.random.default_rng(seed)
    meta = pd.DataFrame({"path": [f"img/{i}.jpg" for i in range(n)], "sha256": [f"{i:064x}" for i in range(n)]})
    return rng.standard_normal((n, 8)).astype(np.float32), meta


def test_error_single_class():
    X, meta = _tiny()
    meta["lab"] = "a"
    with pytest.raises(GraftError, match="single class"):
        fit_head(X, meta, resolve_task(None, "lab", "classification"), model=MODEL, layer="x")


def test_error_missing_label_column():
    X, meta = _tiny()
    with pytest.raises(GraftError, match=r"label column 'gender' \(nor sex, is_male, male, gender_label\) not found; columns: path"):
        fit_head(X, meta, resolve_task("gender"), model=MODEL, layer="x")


@pytest.mark.parametrize("task, column", [("gender", "Gender"), ("gender", "sex"), ("age", "age"), ("age", "Age"),
                                          ("age", "age_approx"), ("identity", "Person ID"), ("label", "class")])
def test_tasks_find_their_column(task, column):
    """Built-in tasks read the column datasets call them (``age``, ``Gender``, ``sex``...); a named column is exact."""
    from heads.tasks import prepare

    X, meta = _tiny()
    meta[column] = (np.arange(len(meta)) % 2).astype(float) + 20 if task == "age" else np.where(np.arange(len(meta)) % 2, "a", "b")
    meta["other"] = 1.0
    data = prepare(X, meta, resolve_task(task))
    assert data.spec.label_column == column and len(data.y) == len(meta)
    with pytest.raises(GraftError, match="not found"):
        prepare(X, meta, resolve_task(task, "missing", "classification"))


def test_path_column_guessed_any_case():
    from extract.sources import guess_path_column

    assert guess_path_column(["Gender", "image_names"]) == "image_names"
    assert guess_path_column(["Image Path", "age"]) == "Image Path"
    assert guess_path_column(["FILE", "x"]) == "FILE"
    assert guess_path_column(["a", "b"]) is None


def test_error_where_matches_no_row():
    X, meta = _tiny()
    meta["lab"] = np.where(X[:, 0] > 0, "pos", "neg")
    meta["split"] = "train"
    with pytest.raises(GraftError, match=r"--where split=tset: no row has split = 'tset'; values of 'split': train"):
        fit_head(X, meta, resolve_task(None, "lab", "classification"), model=MODEL, layer="x", where=["split=tset"])


def test_error_too_few_per_class_for_cv():
    X, meta = _tiny()
    meta["lab"] = ["a"] * 36 + ["b"] * 4
    meta["split"] = "train"
    meta.loc[[0, 1, 36], "split"] = "test"
    with pytest.raises(GraftError, match="too few samples per class for 5-fold CV"):
        fit_head(X, meta, resolve_task(None, "lab", "classification"), model=MODEL, layer="x", cv=5)


def test_nan_labels_dropped_and_counted(tmp_path):
    X, meta = _tiny(60)
    meta["y"] = np.r_[np.linspace(0, 1, 55), [np.nan] * 5]
    X[:, 0] += meta["y"].fillna(0).to_numpy() * 3
    res = fit_head(X, meta, resolve_task(None, "y", "regression"), model=MODEL, layer="x", out=tmp_path / "h",
                   head="ridge", cv=3, with_learning_curve=False, with_plots=False)
    assert res.report["data"]["dropped"]["missing_label"] == 5
    assert res.report["data"]["n_rows"] == 55
    assert "missing label: 5" in (tmp_path / "h" / "report.md").read_text()


def test_error_non_numeric_regression_label():
    X, meta = _tiny()
    meta["y"] = ["x"] * 40
    with pytest.raises(GraftError, match="not numeric"):
        fit_head(X, meta, resolve_task(None, "y", "regression"), model=MODEL, layer="x")


def test_load_checks_card_and_rewrite_is_atomic(tmp_path):
    X, meta = _tiny(80)
    meta["lab"] = np.where(X[:, 0] > 0, "pos", "neg")
    out = tmp_path / "h"
    kw = dict(model=MODEL, layer="fc7", out=out, head="logreg", cv=3, with_learning_curve=False, with_plots=False)
    fit_head(X, meta, resolve_task(None, "lab", "classification"), **kw)
    est, card = load_head(out, weights_sha256="a" * 64, layer="fc7", feature_dim=8)
    assert est.classes_.tolist() == ["neg", "pos"] and card["labels"] == ["neg", "pos"]
    assert (est.predict(X) == meta["lab"]).mean() > 0.9
    with pytest.raises(GraftError) as err:
        load_head(out, weights_sha256="b" * 64, layer="fc6", feature_dim=4096)
    msg = str(err.value)
    assert "weights sha256" in msg and "layer 'fc6'" in msg and "4096-d" in msg and "\n" not in msg
    fit_head(X, meta, resolve_task(None, "lab", "classification"), **{**kw, "seed": 1})  # replaces the folder
    assert json.loads((out / "card.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]  # no temp or old folders left


def test_predict_with_model_top_k_and_class_names(tmp_path):
    """``predict --model``: a many-class package (here 30 generated classes) lists the top k by score,
    named from classes.txt, in order, matching a direct onnxruntime run of its prob."""
    from PIL import Image

    from convert import convert_model
    from convert.generate import generate_caffemodel
    from heads.predict import predict_with_model

    proto = tmp_path / "net.prototxt"
    proto.write_text('input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
                     'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 30 } }\n'
                     'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')
    generate_caffemodel(proto, tmp_path / "net.caffemodel", seed=3)
    names = [f"id_{i:02d}" for i in range(30)]
    pkg = convert_model(proto, tmp_path / "net.caffemodel", out=tmp_path / "pkg", name="toy30", classes=names, log=lambda m: None)
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    res = predict_with_model(pkg.dir, images=str(tmp_path / "imgs"), top_k=3, cache=tmp_path / "cache",
                             out=tmp_path / "p.csv", progress=False)
    assert list(res.columns) == ["path", "rel_path", "prediction", "score", "top1", "p_top1", "top2", "p_top2", "top3",
                                 "p_top3", "error"]
    from extract.cache import load_embeddings

    X, meta = load_embeddings(tmp_path / "cache", layer="prob", dataset="predict-imgs")
    for _, row in res.iterrows():
        p = X[int(np.flatnonzero(meta["path"].to_numpy() == row["path"])[0])]
        order = np.argsort(-p, kind="stable")[:3]  # saturated softmax: ties go to the lower class index
        assert [row["top1"], row["top2"], row["top3"]] == [names[j] for j in order]
        assert row["prediction"] == names[order[0]] and row["score"] == pytest.approx(p[order[0]])
        assert row["p_top1"] >= row["p_top2"] >= row["p_top3"]
    assert (res["error"].fillna("") == "").all()


def test_predict_with_model_single_output_is_a_value(tmp_path):
    """A package whose output is one number per image and has no classes (a regression net):
    ``prediction`` is that number."""
    from PIL import Image

    from convert import convert_model
    from convert.generate import generate_caffemodel
    from extract.cache import load_embeddings
    from heads.predict import predict_with_model

    proto = tmp_path / "net.prototxt"
    proto.write_text('input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
                     'layer { name: "age" type: "InnerProduct" bottom: "data" top: "age" inner_product_param { num_output: 1 } }\n')
    generate_caffemodel(proto, tmp_path / "net.caffemodel", seed=1)
    pkg = convert_model(proto, tmp_path / "net.caffemodel", out=tmp_path / "pkg", name="toy-age", log=lambda m: None)
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    res = predict_with_model(pkg.dir, images=str(tmp_path / "imgs"), cache=tmp_path / "cache", progress=False)
    assert list(res.columns) == ["path", "rel_path", "prediction", "error"]
    X, meta = load_embeddings(tmp_path / "cache", layer="age", dataset="predict-imgs")
    want = dict(zip(meta["path"], X[:, 0]))
    np.testing.assert_allclose(res["prediction"].astype(float), [want[p] for p in res["path"]], rtol=1e-6)


def test_regression_clips_to_the_training_range(tmp_path):
    """An age head never predicts outside the ages it was trained on (default), in Python and in ONNX."""
    import onnxruntime as ort

    from heads.estimators import HeadRegressor
    from heads.export import head_model

    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 6)).astype(np.float32)
    y = np.clip(30 + 10 * X[:, 0], 18, 60)
    far = np.full((3, 6), 0.0, np.float32)
    far[:, 0] = [-9.0, 0.0, 9.0]  # a linear head extrapolates to 30 -/+ 90 years here
    free = HeadRegressor(alpha=1e-3).fit(X, y)
    assert free.predict(far).min() < 0 and free.clip_range_ is None
    clipped = HeadRegressor(alpha=1e-3, clip_range="train").fit(X, y)
    assert clipped.clip_range_ == (y.min(), y.max())
    np.testing.assert_allclose(clipped.predict(far)[[0, 2]], [y.min(), y.max()])
    sess = ort.InferenceSession(head_model(clipped).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["prediction"], {"features": far})[0], clipped.predict(far), rtol=1e-5)
    with pytest.raises(ValueError, match="low must be below high"):
        HeadRegressor(clip_range=(5, 1)).fit(X, y)


def test_search_races_heads_against_ridge():
    """Racing + halving: on linear data the MLP stops after its first-fold probe; on data only
    a non-linear head can separate (XOR of two features) it is cross-validated and chosen."""
    from heads.search import search

    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 10)).astype(np.float32)
    linear = np.where(X[:, 0] + 0.5 * X[:, 1] > 0, "a", "b")
    res = search(X, linear, kind="classification", heads=["logreg", "ridge", "mlp"], cv=4, max_iter=100)
    mlp = [r for r in res.table if r["head"] == "mlp"]
    assert mlp and all(r["screened_out"] and len(r["fold_scores"]) == 1 for r in mlp) and len(mlp) == 1
    assert res.best["head"] in ("logreg", "ridge")
    logreg = [r for r in res.table if r["head"] == "logreg"]
    assert sum(not r["screened_out"] for r in logreg) == 2 and all(len(r["fold_scores"]) == 4 for r in logreg if not r["screened_out"])

    xor = np.where((X[:, 0] > 0) ^ (X[:, 1] > 0), "a", "b")
    res = search(X, xor, kind="classification", heads=["logreg", "ridge", "mlp"], cv=4, max_iter=200)
    assert res.best["head"] == "mlp"
    assert any(r["head"] == "mlp" and not r["screened_out"] and len(r["fold_scores"]) == 4 for r in res.table)
