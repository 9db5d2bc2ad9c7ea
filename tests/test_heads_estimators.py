"""The heads' estimators: scikit-learn's contract, the solvers' numbers, the ONNX form of each head."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import make_classification, make_regression
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.utils.estimator_checks import parametrize_with_checks

from heads.estimators import FeaturePreprocessor, HeadClassifier, HeadRegressor, fit_ridge, ridge_targets
from heads.export import head_model
from heads.search import _ridge_path, search
from heads.splits import cv_folds

_ESTIMATORS = [
    FeaturePreprocessor(),
    FeaturePreprocessor(mode="l2+standardize", n_components=2),
    HeadClassifier(head="logreg"),
    HeadClassifier(head="ridge", preprocess="l2"),
    HeadClassifier(head="mlp", max_iter=50),
    HeadRegressor(head="ridge"),
    HeadRegressor(head="mlp", max_iter=50),
    HeadClassifier(head="mlp", max_iter=30, mlp_backend="torch"),
    HeadRegressor(head="mlp", max_iter=30, mlp_backend="torch"),
]

# The heads compute in float32 (100k x 4096 features must stay float32), and a float32 BLAS
# product of a permuted matrix may differ in the last bit; scikit-learn's check compares at
# rtol 1e-7 (a float64 tolerance). test_sample_order_invariance_float32 checks the same
# property at float32 precision for every estimator instead.
_FLOAT32_ORDER = {"check_methods_sample_order_invariance": "float32 BLAS: last-bit differences; see below"}


@parametrize_with_checks(_ESTIMATORS, expected_failed_checks=lambda est: _FLOAT32_ORDER)
def test_sklearn_contract(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(estimator)


@pytest.mark.parametrize("estimator", _ESTIMATORS, ids=repr)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_order_invariance_float32(estimator, seed):
    """Every method gives each row the same output whatever the order of the rows (float32 precision)."""
    from sklearn.base import clone, is_classifier

    rng = np.random.RandomState(seed)
    X = 3 * rng.uniform(size=(60, 5))
    y = (X[:, 0] > 1.5).astype(int) if is_classifier(estimator) else X[:, 0] * 2 - X[:, 1]
    est = clone(estimator)
    if getattr(est, "n_components", None) is not None:
        est.n_components = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y)
    idx = rng.permutation(len(X))
    methods = [m for m in ("predict", "transform", "decision_function", "predict_proba") if hasattr(est, m)]
    assert methods
    for method in methods:
        a = np.asarray(getattr(est, method)(X))[idx]
        b = np.asarray(getattr(est, method)(X[idx]))
        if a.dtype.kind in "fc":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=method)
        else:
            np.testing.assert_array_equal(a, b, err_msg=method)


def _clf(k=2, n=300, d=40, seed=0):
    X, y = make_classification(n, d, n_informative=8, n_classes=k, random_state=seed)
    return (np.abs(X) + 1).astype(np.float32), np.array(["cat", "dog", "eel", "fox"])[y]


def test_logreg_matches_sklearn_objective():
    X, y = _clf(k=3)
    ours = HeadClassifier(head="logreg", preprocess="none", alpha=2.0, max_iter=2000).fit(X, y)
    ref = LogisticRegression(C=1 / 2.0, tol=1e-10, max_iter=5000).fit(X, y)
    # 2e-3 with scikit-learn 1.9; 1.6.0's L-BFGS (the declared floor) stops 3e-3 away on 2 of 900
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=4e-3)


def test_ridge_regressor_matches_sklearn():
    X, y = make_regression(200, 30, noise=1.0, random_state=0)
    ours = HeadRegressor(head="ridge", preprocess="none", alpha=3.0).fit(X, y)
    ref = Ridge(alpha=3.0).fit(X, y)
    np.testing.assert_allclose(ours.predict(X), ref.predict(X), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n, d", [(400, 60), (80, 200)])  # primal (d x d) and kernel (n x n) paths
@pytest.mark.parametrize("mode", ["none", "standardize", "l2", "l2+standardize"])
@pytest.mark.parametrize("holdout", [None, 0.25])  # k folds, or one shuffled validation fold (large data)
def test_ridge_path_equals_one_fit_per_penalty(mode, n, d, holdout):
    """The shared-decomposition CV path gives the same validation predictions as separate fits,
    in the order of each fold's validation rows."""
    X, y = _clf(k=3, n=n, d=d)
    yi = np.searchsorted(np.unique(y), y)
    T = ridge_targets(yi, 3)
    folds = cv_folds(yi, None, kind="classification", n_splits=4, holdout=holdout)
    if holdout is not None:
        assert len(folds) == 1 and np.any(np.diff(folds[0][1]) < 0)  # the case that found the bug: shuffled
    alphas = [0.5, 50.0, 5000.0]
    preds = _ridge_path(X, T, folds, mode, alphas)
    for f, (tr, va) in enumerate(folds):
        pre = FeaturePreprocessor(mode=mode).fit(X[tr])
        for j, a in enumerate(alphas):
            coef, b = fit_ridge(pre.transform(X[tr]), T[tr], a)
            np.testing.assert_allclose(preds[f][:, j, :], pre.transform(X[va]) @ coef + b, atol=2e-4)


def test_search_is_reproducible_and_picks_from_grid():
    X, y = _clf(k=2, n=300)
    a = search(X, y, kind="classification", heads=["logreg", "ridge"], cv=3, seed=7)
    b = search(X, y, kind="classification", heads=["logreg", "ridge"], cv=3, seed=7)
    assert a.best == b.best
    assert [r["score"] for r in a.table] == [r["score"] for r in b.table]
    assert a.best["alpha"] in {r["alpha"] for r in a.table if r["head"] == a.best["head"]}


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("head", ["logreg", "ridge", "mlp", "mlp-torch"])
@pytest.mark.parametrize("pre,pca", [("standardize", None), ("l2+standardize", 8), ("none", None)])
def test_onnx_head_equals_predict_proba(k, head, pre, pca):
    X, y = _clf(k=k)
    backend = "torch" if head == "mlp-torch" else "sklearn"
    est = HeadClassifier(head=head.split("-")[0], preprocess=pre, n_components=pca, max_iter=100, mlp_backend=backend).fit(X, y)
    sess = ort.InferenceSession(head_model(est).SerializeToString(), providers=["CPUExecutionProvider"])
    proba, label = sess.run(["probabilities", "label"], {"features": X})
    np.testing.assert_allclose(proba, est.predict_proba(X), atol=1e-5)
    assert label.tolist() == est.predict(X).tolist()


@pytest.mark.parametrize("head", ["ridge", "mlp", "mlp-torch"])
def test_onnx_regressor_equals_predict(head):
    X, y = make_regression(200, 20, noise=1.0, random_state=0)
    backend = "torch" if head == "mlp-torch" else "sklearn"
    est = HeadRegressor(head=head.split("-")[0], preprocess="l2+standardize", max_iter=100, mlp_backend=backend).fit(X, y + 40)
    sess = ort.InferenceSession(head_model(est).SerializeToString(), providers=["CPUExecutionProvider"])
    (pred,) = sess.run(["prediction"], {"features": X.astype(np.float32)})
    np.testing.assert_allclose(pred, est.predict(X), rtol=1e-5, atol=1e-3)


def test_torch_mlp_matches_sklearn_mlp_quality():
    """The torch-trained MLP (the GPU path, run here on the CPU) learns as well as scikit-learn's, and
    keeps only numpy arrays: it pickles and predicts without torch."""
    import pickle

    X, y = make_classification(900, 40, n_informative=8, n_classes=3, class_sep=1.5, random_state=3)
    X, y = X.astype(np.float32), np.array(["cat", "dog", "eel"])[y]
    tr, te = slice(0, 700), slice(700, None)
    scores = {}
    for backend in ("sklearn", "torch"):
        est = HeadClassifier(head="mlp", alpha=1e-3, max_iter=200, mlp_backend=backend).fit(X[tr], y[tr])
        assert est.mlp_backend_ == backend
        scores[backend] = float(np.mean(est.predict(X[te]) == y[te]))
    majority = max(np.mean(y[te] == c) for c in np.unique(y[te]))
    assert scores["torch"] > majority + 0.3
    assert abs(scores["torch"] - scores["sklearn"]) < 0.06, scores
    again = pickle.loads(pickle.dumps(est))
    assert all(isinstance(w, np.ndarray) for w in again.mlp_.coefs_)
    np.testing.assert_array_equal(again.predict_proba(X[te]), est.predict_proba(X[te]))
    # same seed, same net
    twin = HeadClassifier(head="mlp", alpha=1e-3, max_iter=200, mlp_backend="torch").fit(X[tr], y[tr])
    np.testing.assert_allclose(twin.predict_proba(X[te]), est.predict_proba(X[te]), atol=1e-6)


def test_torch_mlp_regression_and_auto_backend():
    from heads.torch_mlp import LARGE_DATA, cuda_available, resolve_mlp_backend

    X, y = make_regression(600, 20, n_informative=10, noise=5.0, random_state=1)
    r2 = {}
    for backend in ("sklearn", "torch"):
        est = HeadRegressor(head="mlp", alpha=1e-3, max_iter=300, mlp_backend=backend).fit(X[:450], y[:450] + 40)
        r2[backend] = est.score(X[450:], y[450:] + 40)
    assert r2["torch"] > 0.8 and r2["torch"] > r2["sklearn"] - 0.1, r2
    assert resolve_mlp_backend("auto", 100, 100) == "sklearn"
    assert resolve_mlp_backend("auto", LARGE_DATA, 1) == ("torch" if cuda_available() else "sklearn")
    with pytest.raises(ValueError, match="mlp_backend"):
        resolve_mlp_backend("jax", 1, 1)


def test_search_balanced_accuracy_equals_sklearn():
    """The search's own balanced accuracy is scikit-learn's, classes missing from y_pred included."""
    from sklearn.metrics import balanced_accuracy_score

    from heads.search import balanced_accuracy

    rng = np.random.default_rng(3)
    for k in (2, 3, 7):
        y_true = rng.integers(0, k, 300)
        y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, k, 300))
        assert balanced_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
    y_true, y_pred = np.array([0, 0, 1, 1, 1]), np.array([0, 2, 2, 1, 1])  # a predicted class never true
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert balanced_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))


def test_scipy_blas_single_thread_limits_only_scipy_and_restores():
    """pip wheels bundle two OpenBLAS pools; during L-BFGS scipy's runs on one thread, numpy's untouched."""
    from pathlib import Path

    from threadpoolctl import threadpool_info

    from heads.blas import _scipy_only_blas, scipy_blas_single_thread

    def threads() -> dict[str, int]:
        return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    before = threads()
    paths = _scipy_only_blas()
    if len(before) > 1:  # numpy's and scipy's own copies (pip wheels, as CI installs)
        assert paths
    with scipy_blas_single_thread():
        inside = threads()
    assert threads() == before
    for path, n in inside.items():
        limited = str(Path(path).resolve()) in paths
        assert n == (1 if limited else before[path]), path


def test_one_validation_fold_races_the_mlp_against_ridge(monkeypatch):
    """Large data (one validation fold): the MLP is probed once, on sampled rows, and screened out
    when ridge is ahead by more than its spread over five parts of the fold; ridge is chosen."""
    import heads.search as hs

    monkeypatch.setattr(hs, "LARGE_N", 1500)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2500, 12)).astype(np.float32)
    y = X @ rng.standard_normal(12) + 0.1 * rng.standard_normal(2500)  # linear: ridge's game
    fits = []
    real = hs.make_head

    def spy(*args, **kwargs):
        est = real(*args, **kwargs)
        fit = est.fit
        est.fit = lambda Z, t: (fits.append(len(Z)), fit(Z, t))[1]
        return est

    monkeypatch.setattr(hs, "make_head", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = hs.search(X, y, kind="regression", heads=["ridge", "mlp"], max_iter=30)
    assert res.cv == "validation fold 0.2"
    mlp = [r for r in res.table if r["head"] == "mlp"]
    assert len(mlp) == 1 and mlp[0]["screened_out"]
    assert fits == [1500]  # one probe, on LARGE_N of the 2,000 training rows
    assert res.best["head"] == "ridge" and -max(r["score"] for r in res.table) < 0.2  # RMSE near the noise
