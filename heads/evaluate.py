"""Honest scores on the test split, each beside a baseline that learned nothing from the features.

Classification: accuracy, balanced accuracy, ROC-AUC, per-class precision / recall / F1 and the
confusion matrix, beside the majority class of the training split. Regression: RMSE, MAE and
R^2, beside the training mean. The learning curve refits the chosen head (hyper-parameters
fixed) on growing subsets of the training split and scores each on the same test split.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    mean_absolute_error,
    precision_recall_fscore_support,
    r2_score,
    roc_auc_score,
    roc_curve,
)
from sklearn.model_selection import StratifiedShuffleSplit

LEARNING_CURVE_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


def _py(v):
    """Labels as JSON-friendly Python values."""
    return v.item() if isinstance(v, np.generic) else v


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None, classes: np.ndarray) -> dict:
    """Accuracy, balanced accuracy, ROC-AUC (binary, or one-vs-rest macro), per-class P/R/F1, confusion."""
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "roc_auc": None,
    }
    present = np.isin(classes, y_true)
    if proba is not None and present.sum() >= 2:
        if len(classes) == 2:
            out["roc_auc"] = float(roc_auc_score(y_true == classes[1], proba[:, 1]))
        elif present.all():
            out["roc_auc"] = float(roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    out["per_class"] = {
        str(c): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(classes)
    }
    out["macro_f1"] = float(np.mean(f))
    out["confusion_matrix"] = {
        "labels": [str(c) for c in classes],
        "matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
        "rows": "true",
        "columns": "predicted",
    }
    return out


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    y_true = np.asarray(y_true, float)
    y_pred = np.asarray(y_pred, float)
    return {
        "rmse": float(np.sqrt(np.mean((y_true - y_pred) ** 2))),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "r2": float(r2_score(y_true, y_pred)) if len(y_true) > 1 else None,
    }


def baseline_metrics(kind: str, y_train: np.ndarray, y_test: np.ndarray, classes: np.ndarray | None = None) -> dict:
    """Scores of predicting the training majority class (or mean) for every test row."""
    if kind == "classification":
        vals, counts = np.unique(y_train, return_counts=True)
        majority = vals[np.argmax(counts)]
        prior = np.array([np.mean(y_train == c) for c in classes])
        proba = np.tile(prior, (len(y_test), 1))
        m = classification_metrics(y_test, np.asarray([majority] * len(y_test)), proba, classes)
        m["roc_auc"] = 0.5 if m["roc_auc"] is not None else None  # constant scores: AUC is 0.5 by definition
        m["predicts"] = str(majority)
        return m
    mean = float(np.mean(y_train))
    m = regression_metrics(y_test, np.full(len(y_test), mean))
    m["predicts"] = mean
    return m


def evaluate(est, X_test: np.ndarray, y_test: np.ndarray, y_train: np.ndarray, kind: str) -> dict:
    """Test-split metrics of a fitted head with a baseline beside them, and the raw curves for plots."""
    if kind == "classification":
        classes = est.classes_
        proba = est.predict_proba(X_test)
        pred = classes[np.argmax(proba, axis=1)]
        metrics = classification_metrics(y_test, pred, proba, classes)
        curves = {"y_true": y_test, "y_pred": pred, "proba": proba, "classes": classes}
        if len(classes) == 2 and metrics["roc_auc"] is not None:
            fpr, tpr, _ = roc_curve(y_test == classes[1], proba[:, 1])
            curves["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
        base = baseline_metrics(kind, y_train, y_test, classes)
    else:
        pred = est.predict(X_test)
        metrics = regression_metrics(y_test, pred)
        curves = {"y_true": y_test, "y_pred": pred}
        base = baseline_metrics(kind, y_train, y_test)
    return {"metrics": metrics, "baseline": base, "n_test": int(len(y_test)), "curves": curves}


def learning_curve(
    est,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    kind: str,
    *,
    fractions=LEARNING_CURVE_FRACTIONS,
    seed: int = 0,
) -> list[dict]:
    """Test score of the chosen head refit on growing (stratified) subsets of the training split
    (``est`` itself, already fitted on all of it, is the last point)."""
    rows = []
    n = len(y_train)
    for frac in fractions:
        m = max(2, int(round(frac * n)))
        if m >= n:
            idx = np.arange(n)
        elif kind == "classification":
            k = len(np.unique(y_train))
            if m < 2 * k:
                continue
            try:
                idx, _ = next(StratifiedShuffleSplit(n_splits=1, train_size=m, random_state=seed).split(np.zeros(n), y_train))
            except ValueError:
                continue
        else:
            idx = np.random.default_rng(seed).permutation(n)[:m]
        if len(idx) == n:
            e = est  # the whole training split: the head itself, not a second fit of it
        else:
            e = clone(est)
            if hasattr(e, "n_components") and e.n_components is not None:
                e.set_params(n_components=min(e.n_components, len(idx)))
            e.fit(X_train[idx], y_train[idx])
        pred_te = e.predict(X_test)
        pred_tr = e.predict(X_train[idx])
        if kind == "classification":
            row = {
                "n_train": int(len(idx)),
                "test_accuracy": float(accuracy_score(y_test, pred_te)),
                "test_balanced_accuracy": float(balanced_accuracy_score(y_test, pred_te)),
                "train_accuracy": float(accuracy_score(y_train[idx], pred_tr)),
                "baseline_accuracy": float(baseline_metrics(kind, y_train[idx], y_test, e.classes_)["accuracy"]),
            }
        else:
            row = {
                "n_train": int(len(idx)),
                "test_rmse": regression_metrics(y_test, pred_te)["rmse"],
                "test_r2": regression_metrics(y_test, pred_te)["r2"],
                "train_rmse": regression_metrics(y_train[idx], pred_tr)["rmse"],
                "baseline_rmse": baseline_metrics(kind, y_train[idx], y_test)["rmse"],
            }
        rows.append(row)
    return rows
