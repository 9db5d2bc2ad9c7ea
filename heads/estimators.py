"""Heads behind the scikit-learn estimator contract: one preprocessor, three learners.

Every head is *feature preprocessing* (L2 rows, standardise, optional PCA) followed by a
learner: ``logreg`` (multinomial / binary logistic regression, L-BFGS on float32 features),
``ridge`` (closed-form ridge; classification by one-vs-rest ±1 targets) or ``mlp``
(scikit-learn's ``MLPClassifier`` / ``MLPRegressor``, or the same net trained by torch on a GPU:
``heads.torch_mlp``). The linear learners store their
weights in the preprocessed space (``coef_``, ``intercept_``), so ``heads.export`` can write
the whole head as a few ONNX nodes.

One penalty parameter, ``alpha``, serves every learner (logistic regression uses C = 1/alpha,
with scikit-learn's scaling), so one search grid fits all of them.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .blas import scipy_blas_single_thread
from .torch_mlp import TorchMLP, resolve_mlp_backend

PREPROCESS_MODES = ("none", "standardize", "l2", "l2+standardize")
CLASSIFIER_HEADS = ("logreg", "ridge", "mlp")
REGRESSOR_HEADS = ("ridge", "mlp")
_EPS = 1e-12

__all__ = [
    "CLASSIFIER_HEADS",
    "PREPROCESS_MODES",
    "REGRESSOR_HEADS",
    "FeaturePreprocessor",
    "HeadClassifier",
    "HeadRegressor",
    "fit_logistic",
    "fit_ridge",
    "l2_rows",
    "make_head",
]


def l2_rows(X: np.ndarray) -> np.ndarray:
    """Divide each row by its L2 norm (floored at 1e-12, so a zero row stays zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64)).astype(X.dtype)
    return X / np.maximum(norms, _EPS)[:, None]


def _check_mode(mode: str) -> None:
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {mode!r}")


class FeaturePreprocessor(TransformerMixin, BaseEstimator):
    """L2-normalise rows and/or standardise columns, then optionally project on PCA components.

    Kept as explicit arrays (``mean_``, ``scale_``, ``components_``) rather than a sklearn
    Pipeline so the export can rebuild it with Sub/Div/MatMul nodes.

    Parameters
    ----------
    mode : {"none", "standardize", "l2", "l2+standardize"}
    n_components : int or None
        PCA dimensions after the mode's steps; None keeps all features.
    random_state : int
        Seed of the randomized PCA solver.
    """

    def __init__(self, *, mode: str = "standardize", n_components: int | None = None, random_state: int = 0):
        self.mode = mode
        self.n_components = n_components
        self.random_state = random_state

    def fit(self, X, y=None):
        self._fit_transform(X)
        return self

    def fit_transform(self, X, y=None, **fit_params):
        return self._fit_transform(X)

    def _fit_transform(self, X) -> np.ndarray:
        _check_mode(self.mode)
        X = validate_data(self, X, dtype=np.float32, reset=True)
        Z = l2_rows(X) if self.mode.startswith("l2") else X.copy()
        d = Z.shape[1]
        if self.mode.endswith("standardize"):
            self.mean_ = Z.mean(axis=0, dtype=np.float64).astype(np.float32)
            std = Z.std(axis=0, dtype=np.float64)
            std[std < 1e-8] = 1.0
            self.scale_ = std.astype(np.float32)
            Z -= self.mean_
            Z /= self.scale_
        else:
            self.mean_ = np.zeros(d, np.float32)
            self.scale_ = np.ones(d, np.float32)
        if self.n_components is not None:
            from sklearn.decomposition import PCA

            if not isinstance(self.n_components, numbers.Integral) or self.n_components < 1:
                raise ValueError(f"n_components must be a positive int, got {self.n_components!r}")
            k = min(int(self.n_components), Z.shape[0], d)
            pca = PCA(n_components=k, random_state=self.random_state).fit(Z)
            self.pca_mean_ = pca.mean_.astype(np.float32)
            self.components_ = pca.components_.astype(np.float32)
            Z = (Z - self.pca_mean_) @ self.components_.T
        else:
            self.pca_mean_ = None
            self.components_ = None
        self.n_features_out_ = Z.shape[1]
        return Z

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "scale_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        Z = l2_rows(X) if self.mode.startswith("l2") else X
        Z = (Z - self.mean_) / self.scale_
        if self.components_ is not None:
            Z = (Z - self.pca_mean_) @ self.components_.T
        return Z.astype(np.float32, copy=False)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


# ----------------------------------------------------------------------------- learners


def fit_logistic(
    Z: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    alpha: float,
    *,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    max_iter: int = 500,
    tol: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, int]:
    """L2-penalised logistic regression by full-batch L-BFGS; returns (coef (d, k), intercept (k,), n_iter).

    Objective: mean cross-entropy + alpha / (2 n) * ||W||^2 (scikit-learn's C = 1/alpha, scaled
    by n). Binary problems use one logit column (sigmoid), others softmax. Matrix products run
    in float32 on the features (memory-bound at 100k x 4096), the optimiser state in float64.
    ``init`` warm-starts along a penalty path.
    """
    n, d = Z.shape
    k = 1 if n_classes == 2 else n_classes
    if k == 1:
        T = y.astype(np.float64)[:, None]
    else:
        T = np.zeros((n, k), np.float64)
        T[np.arange(n), y] = 1.0
    w0 = np.zeros(d * k + k) if init is None else np.concatenate([init[0].ravel(), init[1].ravel()]).astype(np.float64)
    if init is None and k > 1:
        prior = np.bincount(y, minlength=k) / n
        w0[d * k :] = np.log(np.maximum(prior, 1e-12))
    elif init is None:
        p = min(max(y.mean(), 1e-6), 1 - 1e-6)
        w0[-1] = np.log(p / (1 - p))

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        W = w[: d * k].reshape(d, k)
        b = w[d * k :]
        logits = (Z @ W.astype(np.float32)).astype(np.float64) + b
        if k == 1:
            loss = np.mean(np.logaddexp(0.0, logits) - T * logits)
            G = expit(logits) - T
        else:
            lsm = log_softmax(logits, axis=1)
            loss = -np.sum(T * lsm) / n
            G = np.exp(lsm) - T
        G /= n
        gW = (Z.T @ G.astype(np.float32)).astype(np.float64) + (alpha / n) * W
        loss += 0.5 * alpha / n * float(np.sum(W * W))
        return float(loss), np.concatenate([gW.ravel(), G.sum(axis=0)])

    with scipy_blas_single_thread():  # heads/blas.py: two OpenBLAS pools fighting cost 10-20x here
        res = minimize(fun, w0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-10})
    if not res.success and res.nit >= max_iter:
        warnings.warn(f"logistic regression stopped after {max_iter} iterations", ConvergenceWarning, stacklevel=2)
    return res.x[: d * k].reshape(d, k).astype(np.float32), res.x[d * k :].astype(np.float32), int(res.nit)


def fit_ridge(Z: np.ndarray, Y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge with an unpenalised intercept by centring; returns (coef (d, k), intercept (k,)).

    Solves the smaller of the primal (d x d Gram) and dual (n x n kernel) system; the solve is
    float64, the primal Gram of the centred features float32 (it dominates at 100k x 4096).
    """
    mu = Z.mean(axis=0, dtype=np.float64)
    ym = Y.mean(axis=0)
    Yc = Y - ym
    n, d = Z.shape
    if n >= d:  # centred float32 Gram (sgemm: the one O(n d^2) step), solved in float64
        Zc = Z - mu.astype(np.float32)
        A = (Zc.T @ Zc).astype(np.float64)
        B = (Zc.T @ Yc.astype(np.float32)).astype(np.float64)
        A[np.diag_indices_from(A)] += alpha
        W = np.linalg.solve(A, B) if alpha > 0 else np.linalg.lstsq(A, B, rcond=None)[0]
    else:
        Zc = Z.astype(np.float64) - mu
        K = Zc @ Zc.T
        K[np.diag_indices_from(K)] += alpha
        W = Zc.T @ (np.linalg.solve(K, Yc) if alpha > 0 else np.linalg.lstsq(K, Yc, rcond=None)[0])
    b = ym - mu @ W
    return W.astype(np.float32), b.astype(np.float32)


def ridge_targets(y: np.ndarray, n_classes: int) -> np.ndarray:
    """±1 targets as in RidgeClassifier: one column for two classes, one per class otherwise."""
    if n_classes == 2:
        return np.where(y == 1, 1.0, -1.0)[:, None]
    T = -np.ones((len(y), n_classes))
    T[np.arange(len(y)), y] = 1.0
    return T


# ----------------------------------------------------------------------------- estimators


class _HeadBase(BaseEstimator):
    """Shared parameters and plumbing; subclasses say which learners are allowed."""

    _heads: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        head: str = "ridge",
        preprocess: str = "standardize",
        n_components: int | None = None,
        alpha: float = 1.0,
        hidden_layer_sizes: tuple[int, ...] = (256,),
        max_iter: int = 500,
        random_state: int = 0,
        mlp_backend: str = "auto",
    ):
        self.head = head
        self.preprocess = preprocess
        self.n_components = n_components
        self.alpha = alpha
        self.hidden_layer_sizes = hidden_layer_sizes
        self.max_iter = max_iter
        self.random_state = random_state
        self.mlp_backend = mlp_backend

    def _validate_params_inline(self) -> None:
        if self.head not in self._heads:
            raise ValueError(f"head must be one of {self._heads}, got {self.head!r}")
        _check_mode(self.preprocess)
        if not isinstance(self.alpha, numbers.Real) or self.alpha < 0:
            raise ValueError(f"alpha must be a non-negative number, got {self.alpha!r}")

    def _fit_preprocessor(self, X) -> np.ndarray:
        self.preprocessor_ = FeaturePreprocessor(
            mode=self.preprocess, n_components=self.n_components, random_state=self.random_state
        )
        Z = self.preprocessor_.fit_transform(X)
        self.n_features_in_ = self.preprocessor_.n_features_in_
        return Z

    def _transform(self, X) -> np.ndarray:
        check_is_fitted(self, "preprocessor_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return self.preprocessor_.transform(X)

    def _fit_mlp(self, Z: np.ndarray, y: np.ndarray, task: str):
        """scikit-learn's MLP, or :class:`TorchMLP` (same network and attributes) on a GPU for large data."""
        params = dict(
            hidden_layer_sizes=tuple(self.hidden_layer_sizes),
            alpha=float(self.alpha),
            max_iter=self.max_iter,
            early_stopping=len(Z) >= 20,  # too few rows to hold out an early-stopping set
            n_iter_no_change=10,
            random_state=self.random_state,
        )
        self.mlp_backend_ = resolve_mlp_backend(self.mlp_backend, *Z.shape)
        if self.mlp_backend_ == "torch":
            return TorchMLP(task, **params).fit(Z, y)
        cls = MLPClassifier if task == "classification" else MLPRegressor
        return cls(**params).fit(Z, y)


class HeadClassifier(ClassifierMixin, _HeadBase):
    """A classification head on cached features.

    Parameters
    ----------
    head : {"logreg", "ridge", "mlp"}
    preprocess : {"none", "standardize", "l2", "l2+standardize"}
    n_components : int or None
        PCA dimensions after preprocessing.
    alpha : float
        Penalty strength (logreg: C = 1/alpha; ridge: the ridge penalty; mlp: L2 weight decay).
    hidden_layer_sizes : tuple of int
        MLP hidden layers.
    max_iter : int
    random_state : int
    mlp_backend : {"auto", "sklearn", "torch"}
        Who trains the MLP: ``auto`` uses torch when a GPU is present and the data is large
        (rows x features >= 2e7), scikit-learn otherwise. Both give the same attributes.

    Attributes
    ----------
    classes_ : ndarray
        Labels in the order of ``predict_proba``'s columns (strings stay strings).
    preprocessor_ : FeaturePreprocessor
    coef_, intercept_ : ndarray
        Linear heads only, in the preprocessed feature space; binary heads have one column.
    mlp_ : MLPClassifier or TorchMLP
        MLP head only.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.r_[np.zeros((5, 3)), np.ones((5, 3))]; y = ["a"] * 5 + ["b"] * 5
    >>> HeadClassifier(head="logreg").fit(X, y).predict([[1.0, 1.0, 1.0]]).tolist()
    ['b']
    """

    _heads = CLASSIFIER_HEADS

    def __init__(
        self,
        *,
        head: str = "logreg",
        preprocess: str = "standardize",
        n_components: int | None = None,
        alpha: float = 1.0,
        hidden_layer_sizes: tuple[int, ...] = (256,),
        max_iter: int = 500,
        random_state: int = 0,
        mlp_backend: str = "auto",
    ):
        super().__init__(
            head=head,
            preprocess=preprocess,
            n_components=n_components,
            alpha=alpha,
            hidden_layer_sizes=hidden_layer_sizes,
            max_iter=max_iter,
            random_state=random_state,
            mlp_backend=mlp_backend,
        )

    def fit(self, X, y, *, init: tuple[np.ndarray, np.ndarray] | None = None):
        """Fit preprocessing then the learner; ``init`` (coef, intercept) warm-starts logreg."""
        self._validate_params_inline()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        enc = LabelEncoder().fit(y)
        self.classes_ = enc.classes_
        if len(self.classes_) < 2:
            raise ValueError(f"need at least two classes, got one class: {self.classes_.tolist()}")
        yi = enc.transform(y)
        Z = self._fit_preprocessor(X)
        k = len(self.classes_)
        if self.head == "logreg":
            self.coef_, self.intercept_, self.n_iter_ = fit_logistic(
                Z, yi, k, float(self.alpha), init=init, max_iter=self.max_iter
            )
        elif self.head == "ridge":
            self.coef_, self.intercept_ = fit_ridge(Z, ridge_targets(yi, k), float(self.alpha))
            self.n_iter_ = 1
        else:
            self.mlp_ = self._fit_mlp(Z, yi, "classification")
            self.n_iter_ = self.mlp_.n_iter_
        return self

    def decision_function(self, X) -> np.ndarray:
        """Raw scores: logits (logreg/ridge) or the MLP's log-probabilities; 1-D for two classes."""
        Z = self._transform(X)
        if self.head == "mlp":
            S = np.log(np.maximum(self.mlp_.predict_proba(Z), 1e-300))
            return S[:, 1] - S[:, 0] if S.shape[1] == 2 else S
        S = Z @ self.coef_ + self.intercept_
        return S[:, 0] if S.shape[1] == 1 else S

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities. Ridge is not probabilistic: its scores pass through a softmax
        (binary: sigmoid of twice the score), useful for ranking, not calibrated."""
        check_is_fitted(self, "classes_")
        if self.head == "mlp":
            return self.mlp_.predict_proba(self._transform(X))
        S = np.asarray(self.decision_function(X), np.float64)
        if S.ndim == 1:
            p = expit(2.0 * S if self.head == "ridge" else S)
            return np.c_[1.0 - p, p]
        return softmax(S, axis=1)

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self, "classes_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.poor_score = True
        return tags


class HeadRegressor(RegressorMixin, _HeadBase):
    """A regression head on cached features (same parameters as :class:`HeadClassifier`).

    Attributes
    ----------
    preprocessor_ : FeaturePreprocessor
    coef_ : ndarray of shape (d, 1)
    intercept_ : ndarray of shape (1,)
    mlp_ : MLPRegressor or TorchMLP
        MLP head only.
    clip_range_ : (low, high) or None
        Predictions are clipped to it (``clip_range``: "train" = the training targets' range).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.arange(20.0).reshape(10, 2); y = X.sum(axis=1)
    >>> round(float(HeadRegressor(alpha=1e-6).fit(X, y).predict([[3.0, 4.0]])[0]), 3)
    7.0
    """

    _heads = REGRESSOR_HEADS

    def __init__(
        self,
        *,
        head: str = "ridge",
        preprocess: str = "standardize",
        n_components: int | None = None,
        alpha: float = 1.0,
        hidden_layer_sizes: tuple[int, ...] = (256,),
        max_iter: int = 500,
        random_state: int = 0,
        mlp_backend: str = "auto",
        clip_range: str | tuple[float, float] | None = None,
    ):
        super().__init__(head=head, preprocess=preprocess, n_components=n_components, alpha=alpha,
                         hidden_layer_sizes=hidden_layer_sizes, max_iter=max_iter, random_state=random_state,
                         mlp_backend=mlp_backend)
        self.clip_range = clip_range

    def _resolve_clip(self, y: np.ndarray) -> tuple[float, float] | None:
        """``"train"``: the training targets' range (an age head never predicts -15 years);
        ``(lo, hi)``: as given; None: no clipping."""
        c = self.clip_range
        if c is None:
            return None
        if isinstance(c, str):
            if c != "train":
                raise ValueError(f"clip_range must be None, 'train' or (low, high), got {c!r}")
            return (float(y.min()), float(y.max()))
        lo, hi = (float(v) for v in c)
        if not lo < hi:
            raise ValueError(f"clip_range low must be below high, got {c!r}")
        return (lo, hi)

    def fit(self, X, y):
        self._validate_params_inline()
        X, y = validate_data(self, X, y, dtype=np.float32, y_numeric=True)
        y = np.asarray(y, np.float64)
        if y.ndim != 1:
            raise ValueError("HeadRegressor takes a 1-D target")
        self.clip_range_ = self._resolve_clip(y)
        Z = self._fit_preprocessor(X)
        if self.head == "ridge":
            self.coef_, self.intercept_ = fit_ridge(Z, y[:, None], float(self.alpha))
            self.n_iter_ = 1
        else:
            # scale the target so the MLP's default learning rate suits any unit (years, pixels, ...)
            self.y_mean_, self.y_scale_ = float(y.mean()), float(y.std() or 1.0)
            self.mlp_ = self._fit_mlp(Z, (y - self.y_mean_) / self.y_scale_, "regression")
            self.n_iter_ = self.mlp_.n_iter_
        return self

    def predict(self, X) -> np.ndarray:
        Z = self._transform(X)
        if self.head == "mlp":
            pred = self.mlp_.predict(Z) * self.y_scale_ + self.y_mean_
        else:
            pred = (Z @ self.coef_ + self.intercept_)[:, 0].astype(np.float64)
        clip = getattr(self, "clip_range_", None)  # heads saved before clipping existed have none
        return pred if clip is None else np.clip(pred, clip[0], clip[1])

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.regressor_tags.poor_score = True
        return tags


def make_head(kind: str, **params) -> HeadClassifier | HeadRegressor:
    """The estimator for ``kind`` ("classification" or "regression") with these parameters."""
    if kind == "classification":
        return HeadClassifier(**params)
    if kind == "regression":
        return HeadRegressor(**params)
    raise ValueError(f"kind must be 'classification' or 'regression', got {kind!r}")
