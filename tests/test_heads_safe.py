"""Heads saved without pickle (``head.json`` + ``head.npz``): every head type round-trips bit for bit,
loading never unpickles, a description naming an unknown type is refused, and an older
``head.joblib`` loads only with ``allow_pickle`` / ``--allow-pickle``."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from convert.errors import GraftError
from heads import serialize
from heads.estimators import HeadClassifier, HeadRegressor
from heads.fit import fit_head
from heads.persist import PICKLE, load_head, save_estimator
from heads.tasks import resolve_task

MODEL = {"name": "synth", "weights_sha256": "a" * 64, "dir": None}
PREPROCESS = [("standardize", None), ("l2", None), ("l2+standardize", None), ("standardize", 3)]
HEADS = [("classification", "logreg", "sklearn"), ("classification", "ridge", "sklearn"),
         ("classification", "mlp", "sklearn"), ("classification", "mlp", "torch"),
         ("regression", "ridge", "sklearn"), ("regression", "mlp", "sklearn"), ("regression", "mlp", "torch")]


def _data(n: int = 90, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, three string classes (object dtype, as labels from a table are) and a numeric target."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = np.array(["cat", "dog", "eel"], dtype=object)[(X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5)]
    return X, y, 3.0 * X[:, 0] - X[:, 2] + 40.0


def _fit(kind: str, head: str, backend: str, preprocess: str, n_components: int | None, binary: bool = False):
    X, y, t = _data()
    est_cls = HeadClassifier if kind == "classification" else HeadRegressor
    target = (np.where(y == "cat", "cat", "other") if binary else y) if kind == "classification" else t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few MLP epochs: ConvergenceWarning
        est = est_cls(head=head, preprocess=preprocess, n_components=n_components, max_iter=25, hidden_layer_sizes=(7,),
                      mlp_backend=backend).fit(X, target)
    return est, X


def _forbid_unpickling(monkeypatch) -> None:
    """From here on, any attempt to unpickle fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    for mod, name in ((pickle, "loads"), (pickle, "load"), (joblib, "load")):
        monkeypatch.setattr(mod, name, refuse)


@pytest.mark.parametrize(("kind", "head", "backend"), HEADS, ids=["-".join(h) for h in HEADS])
@pytest.mark.parametrize(("preprocess", "n_components"), PREPROCESS, ids=[f"{p}-pca{k}" for p, k in PREPROCESS])
def test_round_trip_is_bit_identical(kind, head, backend, preprocess, n_components, tmp_path, monkeypatch):
    est, X = _fit(kind, head, backend, preprocess, n_components)
    serialize.save(tmp_path, est)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "head.npz"]
    _forbid_unpickling(monkeypatch)
    again = serialize.load(tmp_path)
    assert type(again) is type(est) and again.get_params() == est.get_params()
    pred, want = again.predict(X), est.predict(X)
    assert pred.dtype == want.dtype and np.array_equal(pred, want)
    if kind == "classification":
        np.testing.assert_array_equal(again.predict_proba(X), est.predict_proba(X))
        np.testing.assert_array_equal(again.decision_function(X), est.decision_function(X))
        assert again.classes_.dtype == est.classes_.dtype and again.classes_.tolist() == est.classes_.tolist()
    if head == "mlp":
        assert type(again.mlp_) is type(est.mlp_)
        Z = est.preprocessor_.transform(X)
        np.testing.assert_array_equal(again.mlp_.predict(Z), est.mlp_.predict(Z))  # the MLP's own predict too


@pytest.mark.parametrize("head", ["logreg", "ridge", "mlp"])
def test_binary_and_integer_labels_round_trip(head, tmp_path):
    """Two classes (one logit column, MLP's logistic output) and integer labels keep their dtype."""
    est, X = _fit("classification", head, "sklearn", "standardize", None, binary=True)
    serialize.save(tmp_path, est)
    again = serialize.load(tmp_path)
    np.testing.assert_array_equal(again.predict_proba(X), est.predict_proba(X))
    ints = HeadClassifier(head=head, max_iter=25, hidden_layer_sizes=(5,)).fit(X, (X[:, 0] > 0).astype(np.int64) * 7)
    serialize.save(tmp_path, ints)
    again = serialize.load(tmp_path)
    assert again.predict(X).dtype == np.int64 and np.array_equal(again.predict(X), ints.predict(X))


def test_dataframe_feature_names_round_trip(tmp_path):
    X, y, _ = _data()
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    est = HeadClassifier(head="logreg").fit(df, y)
    serialize.save(tmp_path, est)
    again = serialize.load(tmp_path)
    assert again.feature_names_in_.tolist() == est.feature_names_in_.tolist()
    np.testing.assert_array_equal(again.predict_proba(df), est.predict_proba(df))


def _head_folder(tmp_path: Path, head: str = "logreg") -> tuple[Path, np.ndarray, object]:
    """A head folder written by fit_head, its features and the fitted estimator."""
    X, y, _ = _data(80)
    meta = pd.DataFrame({"path": [f"img/{i}.jpg" for i in range(len(X))], "sha256": [f"{i:064x}" for i in range(len(X))],
                         "lab": y})
    res = fit_head(X, meta, resolve_task(None, "lab", "classification"), model=MODEL, layer="fc7", out=tmp_path / "h",
                   head=head, cv=3, with_learning_curve=False, with_plots=False)
    return res.path, X, res.estimator


def test_fit_head_writes_no_pickle_and_loads_without_one(tmp_path, monkeypatch):
    out, X, est = _head_folder(tmp_path)
    _forbid_unpickling(monkeypatch)
    files = {p.name for p in out.iterdir()}
    assert {"head.json", "head.npz", "card.json"} <= files and PICKLE not in files
    with np.load(out / "head.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    again, card = load_head(out, weights_sha256="a" * 64, layer="fc7", feature_dim=X.shape[1])
    np.testing.assert_array_equal(again.predict_proba(X), est.predict_proba(X))
    assert again.predict(X).tolist() == est.predict(X).tolist() and card["labels"] == ["cat", "dog", "eel"]


@pytest.fixture(scope="module")
def logreg_head(tmp_path_factory) -> Path:
    """One fitted head folder, copied by the tests that damage it."""
    return _head_folder(tmp_path_factory.mktemp("logreg"))[0]


def _copy(head: Path, tmp_path: Path) -> Path:
    shutil.copytree(head, tmp_path / "copy")
    return tmp_path / "copy"


def _tamper(out: Path, edit) -> None:
    desc = json.loads((out / "head.json").read_text())
    edit(desc["estimator"]["$estimator"])
    (out / "head.json").write_text(json.dumps(desc))


@pytest.mark.parametrize(("edit", "match"), [
    (lambda e: e.update(type="os.system"), r"unknown head step type 'os\.system'"),
    (lambda e: e["fitted"]["preprocessor_"]["$estimator"].update(type="builtins.eval"), r"unknown head step type 'builtins\.eval'"),
    (lambda e: e["fitted"].update(__class__={"$objects": ["x"]}), r"unknown parameter\(s\) or attribute\(s\) \['__class__'\]"),
    (lambda e: e["params"].update(cmd="rm -rf /"), r"unknown parameter\(s\) or attribute\(s\) \['cmd'\]"),
    (lambda e: e["fitted"].update(coef_={"$pickle": "gASV"}), "unrecognised entry"),
    (lambda e: e["fitted"].update(coef_={"$scalar": "O", "value": 1}), "bad numpy scalar 'O'"),
    (lambda e: e["fitted"].update(coef_={"$array": "nope"}), "no array 'nope'"),
], ids=["type", "nested-type", "attribute", "parameter", "tag", "scalar-dtype", "array-key"])
def test_tampered_description_is_refused(logreg_head, tmp_path, monkeypatch, edit, match):
    out = _copy(logreg_head, tmp_path)
    _tamper(out, edit)
    _forbid_unpickling(monkeypatch)
    with pytest.raises(GraftError, match=match):
        load_head(out)


def test_object_array_in_npz_is_refused(logreg_head, tmp_path, monkeypatch):
    """An npz member holding a pickled object array is not read (np.load with allow_pickle=False)."""
    out = _copy(logreg_head, tmp_path)
    with np.load(out / "head.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["coef_"] = np.array([print], dtype=object)
    np.savez(out / "head.npz", **arrays)
    _forbid_unpickling(monkeypatch)
    with pytest.raises(GraftError, match="coef_"):
        load_head(out)


def test_saving_an_unknown_type_is_an_error(tmp_path):
    from sklearn.linear_model import LogisticRegression

    X, y, _ = _data()
    with pytest.raises(GraftError, match=r"sklearn\.linear_model\._logistic\.LogisticRegression is not one of graft's head types"):
        serialize.save(tmp_path, LogisticRegression().fit(X, y))


def _make_old(out: Path, est) -> None:
    """The folder as an older graft wrote it: head.joblib beside the card, no safe files."""
    joblib.dump(est, out / PICKLE, compress=3)
    (out / "head.json").unlink()
    (out / "head.npz").unlink()


def test_old_joblib_head_needs_allow_pickle(tmp_path):
    out, X, est = _head_folder(tmp_path, head="mlp")
    _make_old(out, est)
    with pytest.raises(GraftError) as err:
        load_head(out, layer="fc7")
    msg = str(err.value)
    assert "is a pickle" in msg and "runs code" in msg and "--allow-pickle" in msg and "\n" not in msg
    with pytest.raises(GraftError, match="layer 'fc6'"):  # card checks come first, as before
        load_head(out, layer="fc6", allow_pickle=True)
    again, _ = load_head(out, layer="fc7", allow_pickle=True)
    np.testing.assert_array_equal(again.predict_proba(X), est.predict_proba(X))
    # re-saving converts it; the safe files are then read, never the pickle
    save_estimator(out, again, json.loads((out / "card.json").read_text()))
    (out / PICKLE).write_bytes(b"not a pickle")
    conv, _ = load_head(out)
    np.testing.assert_array_equal(conv.predict_proba(X), est.predict_proba(X))


def test_cli_predict_and_export_old_head_with_allow_pickle(tmp_path, capsys):
    """predict / export on a converted toy package: an old joblib head is refused (one line, before
    any image is read) and works with --allow-pickle, giving the safe head's predictions."""
    from PIL import Image

    import cli
    from convert import convert_model
    from convert.generate import generate_caffemodel

    proto = tmp_path / "net.prototxt"
    proto.write_text('input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
                     'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 6 } }\n')
    generate_caffemodel(proto, tmp_path / "net.caffemodel", seed=2)
    pkg = convert_model(proto, tmp_path / "net.caffemodel", out=tmp_path / "pkg", name="toy6", log=lambda m: None)
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    X, y, _ = _data(60)
    meta = pd.DataFrame({"path": [f"img/{i}.jpg" for i in range(len(X))], "sha256": [f"{i:064x}" for i in range(len(X))], "lab": y})
    model = {"name": "toy6", "weights_sha256": pkg.weights_sha256, "dir": str(pkg.dir)}
    res = fit_head(X * 50, meta, resolve_task(None, "lab", "classification"), model=model, layer="fc", out=tmp_path / "h",
                   head="logreg", cv=3, with_learning_curve=False, with_plots=False)
    base = ["--images", str(tmp_path / "imgs"), "--cache", str(tmp_path / "cache"), "--no-progress"]
    assert cli.main(["predict", "--head", str(res.path), "--out", str(tmp_path / "safe.csv"), *base]) == 0
    _make_old(res.path, res.estimator)
    capsys.readouterr()
    assert cli.main(["predict", "--head", str(res.path), "--out", str(tmp_path / "old.csv"), *base]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: head") and "is a pickle" in err and "--allow-pickle" in err and "\n" not in err
    assert not (tmp_path / "old.csv").exists()
    assert cli.main(["predict", "--head", str(res.path), "--out", str(tmp_path / "old.csv"), "--allow-pickle", *base]) == 0
    safe, old = pd.read_csv(tmp_path / "safe.csv"), pd.read_csv(tmp_path / "old.csv")
    pd.testing.assert_frame_equal(safe, old)
    assert cli.main(["export", "--head", str(res.path), "--out", str(tmp_path / "h.onnx")]) == 2
    assert "is a pickle" in capsys.readouterr().err
    assert cli.main(["export", "--head", str(res.path), "--out", str(tmp_path / "h.onnx"), "--allow-pickle"]) == 0
    assert (tmp_path / "h.onnx").exists()


def test_clip_range_survives_the_safe_format(tmp_path):
    from heads.estimators import HeadRegressor
    from heads.serialize import load, save

    rng = np.random.default_rng(1)
    X = rng.standard_normal((80, 5)).astype(np.float32)
    y = 40 + 10 * X[:, 0]
    est = HeadRegressor(alpha=1e-2, clip_range="train").fit(X, y)
    save(tmp_path, est)
    back = load(tmp_path)
    far = X * 10
    assert back.clip_range_ == est.clip_range_ and back.clip_range == "train"
    np.testing.assert_array_equal(back.predict(far), est.predict(far))
    assert back.predict(far).max() <= y.max()
