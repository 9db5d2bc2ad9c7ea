"""Hyper-parameter (and head) choice by cross-validation on the training split only.

Three paths, one result table:

* **ridge** without PCA: per fold, sufficient statistics (sum, Gram, cross-products) of the
  globally centred features are summed per fold, so every fold's *train* statistics are
  totals minus that fold, standardisation included, exactly. One eigendecomposition per fold
  then prices every penalty at a (d x d) x (d x k) product: 20 penalties cost about one.
* **logreg**: per fold, a penalty path from strong to weak, each fit warm-started from the
  previous one (a later fold's path from the first fold's solution); with a single validation
  fold (large data) the path stops early once the validation score has fallen twice in a row.
* **mlp** (and ridge with PCA): one fit per fold and penalty.

logreg and mlp are searched by racing and successive halving (as scikit-learn's
``HalvingGridSearchCV``): ridge is scored first, on every fold; a head whose best first-fold
score is behind ridge's by more than the spread of ridge's fold scores goes no further (an MLP
is probed at one penalty before its others are tried); otherwise every penalty is scored on the
first fold and only the best third of each head's penalties on the remaining folds. The choice
is made among those fully cross-validated; the others stay in the table, marked
``screened_out``. With one validation fold (large data) the race is the same, ridge's spread
measured on five parts of that fold; the MLP is searched on :data:`LARGE_N` sampled training
rows (halving over rows, as ``HalvingGridSearchCV``'s ``resource="n_samples"``) and refit once
on all of them.

Scores are "higher is better": balanced accuracy (default) or accuracy for classification,
negative RMSE (default) or R^2 for regression. Ties go to the stronger penalty.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import r2_score
from sklearn.preprocessing import LabelEncoder

from convert.errors import GraftError
from heads.estimators import (
    CLASSIFIER_HEADS,
    PREPROCESS_MODES,
    REGRESSOR_HEADS,
    FeaturePreprocessor,
    HeadClassifier,
    HeadRegressor,
    fit_logistic,
    fit_ridge,
    l2_rows,
    make_head,
    ridge_targets,
)
from heads.splits import cv_folds

SCORINGS = {"classification": ("balanced_accuracy", "accuracy"), "regression": ("neg_rmse", "r2")}
LARGE_N = 20000  # above this many training rows, one validation fold replaces k-fold CV
LOGREG_PENALTIES = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)  # alpha / n: per-row L2 strength, strong to weak
SEARCH_TOL = 1e-4  # gradient tolerance of search fits: validation scores settle long before 1e-5
RIDGE_PENALTIES = tuple(np.logspace(-4, 2, 20))  # alpha / n on standardised features
MLP_ALPHAS = (1e-4, 1e-2, 1.0)
HALVING = 3  # successive halving: a third of each head's penalties go on past the first fold


@dataclass
class SearchResult:
    """The chosen parameters, every candidate's CV scores, and how the folds were made."""

    best: dict
    table: list[dict]
    scoring: str
    cv: str
    seconds: float
    warm_start: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """scikit-learn's ``balanced_accuracy_score`` (mean recall over the classes in ``y_true``)
    without its input validation, which costs more than the score on a search's hundred calls."""
    classes, t = np.unique(np.asarray(y_true), return_inverse=True)
    hit = (np.asarray(y_true) == np.asarray(y_pred)).astype(np.float64)
    return float(np.mean(np.bincount(t, weights=hit, minlength=len(classes)) / np.bincount(t, minlength=len(classes))))


def score(kind: str, scoring: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Higher-is-better score of predictions (labels for classification, values for regression)."""
    if scoring == "balanced_accuracy":
        return balanced_accuracy(y_true, y_pred)
    if scoring == "accuracy":
        return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))
    if scoring == "neg_rmse":
        return -float(np.sqrt(np.mean((np.asarray(y_true, float) - y_pred) ** 2)))
    if scoring == "r2":
        return float(r2_score(y_true, y_pred))
    raise GraftError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS[kind])}")


def default_grid(head: str, n_train: int) -> list[float]:
    """Penalties to try; linear-model penalties scale with n (their loss is a sum over rows)."""
    if head == "logreg":
        return [p * n_train for p in LOGREG_PENALTIES]
    if head == "ridge":
        return [float(p * n_train) for p in RIDGE_PENALTIES]
    return list(MLP_ALPHAS)


def _decide(S: np.ndarray) -> np.ndarray:
    """Class index from ridge / logistic scores (one column: sign)."""
    return (S[:, 0] > 0).astype(np.int64) if S.shape[1] == 1 else np.argmax(S, axis=1)


def _ridge_path(
    X: np.ndarray, T: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], mode: str, alphas: Sequence[float]
) -> list[np.ndarray]:
    """Validation predictions (n_val, k) per fold and penalty, one eigendecomposition per fold."""
    Xp = l2_rows(X) if mode.startswith("l2") else X
    mu0 = Xp.mean(axis=0, dtype=np.float64).astype(np.float32)
    Zg = Xp - mu0  # global centring: per-fold corrections stay small, so float32 Grams stay accurate
    del Xp
    d = Zg.shape[1]
    n = len(Zg)
    member = np.full(n, -1, dtype=np.int64)  # a row's validation fold (disjoint in k-fold and hold-out)
    for f, (_, va) in enumerate(folds):
        member[va] = f
    parts = [np.nonzero(member == f)[0] for f in range(len(folds))]
    rest = np.nonzero(member < 0)[0]  # hold-out: rows never validated
    # every fold has fewer training rows than features: the kernel path needs only column sums
    # and sums of squares (for the fold's mean and scale), not the (d x d) Grams
    dual = n - min(len(p) for p in parts) < d
    stats = []
    for rows in [*parts, rest]:
        Zr = Zg[rows]
        Tr = T[rows]
        if dual:
            second = np.einsum("ij,ij->j", Zr, Zr, dtype=np.float64)  # the Gram's diagonal
            cross = np.zeros((d, T.shape[1]))
        else:
            second = (Zr.T @ Zr).astype(np.float64) if len(rows) else np.zeros((d, d))
            cross = (Zr.T @ Tr.astype(np.float32)).astype(np.float64) if len(rows) else np.zeros((d, T.shape[1]))
        stats.append((len(rows), Zr.sum(axis=0, dtype=np.float64), second, cross, Tr.sum(axis=0)))
    tot = [sum(s[i] for s in stats) for i in range(5)]
    preds: list[np.ndarray] = []
    for f in range(len(folds)):
        nt, s, G, ty, sy = (tot[i] - stats[f][i] for i in range(5))
        mu = s / nt
        ym = sy / nt
        var = (G - nt * mu * mu) if dual else np.diag(G) - nt * mu * mu
        if mode.endswith("standardize"):
            sd = np.sqrt(np.maximum(var, 0.0) / nt)
            sd[sd < 1e-8] = 1.0
        else:
            sd = np.ones(d)
        if dual:  # fewer training rows than features: the (n x n) kernel is the smaller eigenproblem
            preds.append(_ridge_path_dual(Zg, T, folds[f], mu, sd, ym, alphas))
            continue
        C = G - nt * np.outer(mu, mu)
        Cxy = ty - nt * np.outer(mu, ym)
        C = C / np.outer(sd, sd)
        Cxy = Cxy / sd[:, None]
        e, V = np.linalg.eigh(C)
        B = V.T @ Cxy
        Ws = [((V * (1.0 / (np.maximum(e, 0.0) + a))) @ B) / sd[:, None] for a in alphas]
        W = np.concatenate(Ws, axis=1).astype(np.float32)
        b = np.concatenate([ym - mu @ w for w in Ws])
        va = folds[f][1]  # in the fold's own order (a hold-out fold is shuffled), as the caller scores it
        P = (Zg[va] @ W).astype(np.float64) + b
        preds.append(P.reshape(len(va), len(alphas), T.shape[1]))
    return preds


def _ridge_path_dual(Zg: np.ndarray, T: np.ndarray, fold: tuple[np.ndarray, np.ndarray], mu: np.ndarray, sd: np.ndarray,
                     ym: np.ndarray, alphas: Sequence[float]) -> np.ndarray:
    """One fold's validation predictions (n_val, len(alphas), k) from the kernel form:
    (Z^T Z + aI)^-1 Z^T = Z^T (Z Z^T + aI)^-1, so one (n x n) eigendecomposition prices every
    penalty, as the primal path does with its (d x d) one; the same solution, cheaper when n < d."""
    tr, va = fold
    Zs = ((Zg[tr] - mu) / sd).astype(np.float32)
    Zv = ((Zg[va] - mu) / sd).astype(np.float32)
    K = (Zs @ Zs.T).astype(np.float64)
    e, U = np.linalg.eigh(K)
    B = U.T @ (T[tr] - ym)
    M = (Zv @ Zs.T).astype(np.float64) @ U
    P = [M @ (B / (np.maximum(e, 0.0) + a)[:, None]) + ym for a in alphas]
    return np.stack(P, axis=1)


def search(
    X: np.ndarray,
    y: np.ndarray,
    *,
    kind: str,
    heads: Sequence[str],
    preprocess: Sequence[str] = ("standardize",),
    n_components: int | None = None,
    alphas: Sequence[float] | None = None,
    groups: np.ndarray | None = None,
    cv: int = 5,
    holdout: float | None = None,
    scoring: str | None = None,
    hidden_layer_sizes: tuple[int, ...] = (256,),
    max_iter: int = 300,
    mlp_backend: str = "auto",
    seed: int = 0,
    log=None,
) -> SearchResult:
    """Score every (head, preprocessing, penalty) on folds of the training rows; pick the best.

    ``holdout`` (a fraction) replaces k-fold CV by one validation fold; it is chosen
    automatically above :data:`LARGE_N` training rows. ``alphas`` overrides every head's grid.
    """
    t0 = time.perf_counter()
    scoring = scoring or SCORINGS[kind][0]
    if scoring not in SCORINGS[kind]:
        raise GraftError(f"--scoring for {kind}: one of {', '.join(SCORINGS[kind])}")
    allowed = CLASSIFIER_HEADS if kind == "classification" else REGRESSOR_HEADS
    for h in heads:
        if h not in allowed:
            raise GraftError(f"head {h!r} does not do {kind}; choose from {', '.join(allowed)}")
    for m in preprocess:
        if m not in PREPROCESS_MODES:
            raise GraftError(f"--preprocess {m!r}: choose from {', '.join(PREPROCESS_MODES)}")
    if holdout is None and len(y) > LARGE_N:
        holdout = 0.2
    folds = cv_folds(y, groups, kind=kind, n_splits=cv, holdout=holdout, seed=seed)
    cv_desc = f"validation fold {holdout:g}" if holdout is not None else f"{cv}-fold"
    if groups is not None and len(np.unique(groups)) < len(groups):
        cv_desc += ", grouped"
    if kind == "classification":
        yi = LabelEncoder().fit_transform(y)
        k = int(yi.max()) + 1
    else:
        yi = np.asarray(y, np.float64)
        k = 1
    X = np.asarray(X, dtype=np.float32)
    table: list[dict] = []
    warm: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    say = log or (lambda msg: None)

    def add(head: str, mode: str, alpha: float, fold_scores: list[float], seconds: float, screened: bool = False) -> None:
        table.append(
            {
                "head": head,
                "preprocess": mode,
                "alpha": float(alpha),
                "score": float(np.mean(fold_scores)),
                "std": float(np.std(fold_scores)),
                "fold_scores": [float(s) for s in fold_scores],
                "seconds": round(seconds, 3),
                "screened_out": screened,  # scored on the first fold only, not a contender
            }
        )

    part_scores: dict[tuple[str, float], list[float]] = {}  # one validation fold: ridge's scores on its fifths

    def race_bar() -> tuple[float, float] | None:
        """(ridge's best first-fold score, the spread of its fold scores) once ridge is scored:
        the bar the other heads must come near on the first fold to be cross-validated. With one
        validation fold the spread is that of ridge's best on five parts of it (each part as
        large as a fold of 5-fold CV would be), the same measure of noise."""
        rows = [r for r in table if r["head"] == "ridge" and (len(r["fold_scores"]) > 1 or (r["preprocess"], r["alpha"]) in part_scores)]
        if not rows:
            return None
        best = max(rows, key=lambda r: r["score"])
        spread = best["fold_scores"] if len(folds) > 1 else part_scores[(best["preprocess"], best["alpha"])]
        return max(r["fold_scores"][0] for r in rows), float(np.std(spread))

    # ridge first (its whole path costs about one fit): its scores are the bar of the race
    for head in sorted(heads, key=lambda h: h != "ridge" or n_components is not None):
        grid = sorted(alphas if alphas else default_grid(head, len(y)), reverse=True)
        for mode in preprocess:
            t1 = time.perf_counter()
            if head == "ridge" and n_components is None:
                T = ridge_targets(yi, k) if kind == "classification" else yi[:, None]
                preds = _ridge_path(X, T, folds, mode, grid)
                va0 = folds[0][1]
                fifths = (np.array_split(np.random.default_rng(seed).permutation(len(va0)), 5)
                          if len(folds) == 1 and len(va0) >= 5 * 20 else None)
                for j, a in enumerate(grid):
                    fs = []
                    for (_, va), P in zip(folds, preds):
                        out = P[:, j, :]
                        pred = _decide(out) if kind == "classification" else out[:, 0]
                        fs.append(score(kind, scoring, yi[va], pred))
                    if fifths is not None:  # one validation fold: its five parts measure ridge's noise
                        part_scores[(mode, a)] = [score(kind, scoring, yi[va0[q]], pred[q]) for q in fifths]
                    add(head, mode, a, fs, (time.perf_counter() - t1) / len(grid))
                say(f"  ridge/{mode}: {len(grid)} penalties x {len(folds)} fold(s) in {time.perf_counter() - t1:.1f} s")
                continue
            def run_fold(f: int, penalties: Sequence[float], head: str = head, mode: str = mode) -> dict[float, tuple[float, float]]:
                """(score, seconds) of each penalty on fold ``f``; logreg walks them strong to weak, warm-started."""
                tr, va = folds[f]
                if head == "mlp" and holdout is not None and len(tr) > LARGE_N:
                    # successive halving over rows: the MLP is searched on a sample, refit once on all
                    tr = np.sort(np.random.default_rng(seed).choice(tr, LARGE_N, replace=False))
                pre = FeaturePreprocessor(mode=mode, n_components=n_components, random_state=seed)
                Ztr = pre.fit_transform(X[tr])
                Zva = pre.transform(X[va])
                # a later fold starts from the first fold's solution at its strongest penalty:
                # the folds share most rows, so L-BFGS starts near the answer
                init = warm.get((head, mode, max(penalties))) if f > 0 and head == "logreg" else None
                best, falls = -np.inf, 0
                got: dict[float, tuple[float, float]] = {}
                for a in sorted(penalties, reverse=True):
                    t2 = time.perf_counter()
                    if head == "logreg":
                        coef, b, _ = fit_logistic(Ztr, yi[tr], k, a, init=init, max_iter=max_iter, tol=SEARCH_TOL)
                        init = (coef, b)
                        s = score(kind, scoring, yi[va], _decide(Zva @ coef + b))
                        if f == 0:
                            warm[(head, mode, a)] = init
                    elif head == "ridge":
                        T = ridge_targets(yi[tr], k) if kind == "classification" else yi[tr][:, None]
                        coef, b = fit_ridge(Ztr, T, a)
                        P = Zva @ coef + b
                        s = score(kind, scoring, yi[va], _decide(P) if kind == "classification" else P[:, 0])
                    else:
                        est = make_head(kind, head="mlp", preprocess="none", alpha=a, hidden_layer_sizes=hidden_layer_sizes,
                                        max_iter=max_iter, random_state=seed, mlp_backend=mlp_backend)
                        est.fit(Ztr, yi[tr])
                        s = score(kind, scoring, yi[va], est.predict(Zva))
                    got[a] = (s, time.perf_counter() - t2)
                    if holdout is not None and head == "logreg":  # early stop along the path
                        falls = falls + 1 if s < best else 0
                        best = max(best, s)
                        if falls >= 2:
                            break
                return got

            # racing: a head clearly behind ridge on the first fold goes no further (an MLP is
            # probed at its middle penalty before the others are tried)
            bar = race_bar()
            first: dict[float, tuple[float, float]] = {}
            if bar is not None and head == "mlp" and len(grid) > 2:
                first = run_fold(0, [grid[len(grid) // 2]])
            if not first or bar is None or max(v[0] for v in first.values()) >= bar[0] - bar[1]:
                first.update(run_fold(0, [a for a in grid if a not in first]))
            behind = bar is not None and max(v[0] for v in first.values()) < bar[0] - bar[1]
            if behind:
                for a in sorted(first, reverse=True):
                    add(head, mode, a, [first[a][0]], first[a][1], screened=True)
                say(f"  {head}/{mode}: {max(v[0] for v in first.values()):.4f} on the first fold, behind ridge's "
                    f"{bar[0]:.4f} by more than its fold spread {bar[1]:.4f}: not cross-validated ({time.perf_counter() - t1:.1f} s)")
                continue
            # successive halving: every penalty on the first fold, the best third on the others
            keep = sorted(first, key=lambda a: (-first[a][0], -a))[: max(1, -(-len(first) // HALVING))] if len(folds) > 1 else list(first)
            scores = {a: [first[a][0]] for a in first}
            times = {a: first[a][1] for a in first}
            for f in range(1, len(folds)):
                for a, (s, dt) in run_fold(f, keep).items():
                    scores[a].append(s)
                    times[a] += dt
            for a in sorted(scores, reverse=True):
                add(head, mode, a, scores[a], times[a], screened=a not in keep)
            say(f"  {head}/{mode}: {len(first)} penalties on 1 fold, the best {len(keep)} on {len(folds)} in {time.perf_counter() - t1:.1f} s")
    # best mean score; ties: the head listed first, then the stronger penalty
    order = {h: i for i, h in enumerate(heads)}
    best_row = max([r for r in table if not r["screened_out"]], key=lambda r: (round(r["score"], 10), -order[r["head"]], r["alpha"]))
    best = {"head": best_row["head"], "preprocess": best_row["preprocess"], "alpha": best_row["alpha"]}
    ws = warm.get((best["head"], best["preprocess"], best["alpha"])) if holdout is not None else None
    return SearchResult(best=best, table=table, scoring=scoring, cv=cv_desc, seconds=time.perf_counter() - t0, warm_start=ws)


def fit_best(
    X: np.ndarray,
    y: np.ndarray,
    result: SearchResult,
    *,
    kind: str,
    n_components: int | None = None,
    hidden_layer_sizes: tuple[int, ...] = (256,),
    max_iter: int = 500,
    mlp_backend: str = "auto",
    seed: int = 0,
    clip_range: str | tuple[float, float] | None = None,
) -> HeadClassifier | HeadRegressor:
    """Refit the chosen head on all training rows (logreg warm-started from the validation fit);
    a regression head clips its predictions to ``clip_range``."""
    extra = {"clip_range": clip_range} if kind == "regression" else {}
    est = make_head(kind, **result.best, n_components=n_components, hidden_layer_sizes=tuple(hidden_layer_sizes),
                    max_iter=max_iter, random_state=seed, mlp_backend=mlp_backend, **extra)
    if kind == "classification" and result.best["head"] == "logreg" and result.warm_start is not None:
        return est.fit(X, y, init=result.warm_start)
    return est.fit(X, y)
