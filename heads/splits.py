"""Train/test splits and CV folds that keep a group (identity, duplicate image) on one side.

Groups are the union of ``--group-column`` and the content hash: two rows with the same bytes
(the same WIKI photo filed under two tasks, say) or the same identity always land on the same
side, in the hold-out and in every CV fold. When the data brings its own ``split`` column, it is
used as given, and test rows whose group also occurs in train are dropped (and counted) rather
than scored, because scoring them would measure memory, not generalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import (
    GroupKFold,
    GroupShuffleSplit,
    KFold,
    ShuffleSplit,
    StratifiedGroupKFold,
    StratifiedKFold,
    StratifiedShuffleSplit,
)

from convert.errors import GraftError
from heads.tasks import LabelledData, hash_column

TRAIN_VALUES = ("train", "training", "trainval")
TEST_VALUES = ("test", "testing", "val", "valid", "validation")


@dataclass
class Split:
    """Row indices of train and test, the per-row group ids, and how the split was made."""

    train: np.ndarray
    test: np.ndarray
    groups: np.ndarray
    source: str
    grouped: bool
    dropped: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.source}: {len(self.train)} train / {len(self.test)} test"


def _codes(values: pd.Series) -> np.ndarray:
    """Integer ids of a column; a missing value is a group of its own."""
    codes, _ = pd.factorize(values, use_na_sentinel=True)
    codes = codes.astype(np.int64)
    na = codes < 0
    if na.any():
        codes[na] = codes.max(initial=-1) + 1 + np.arange(int(na.sum()))
    return codes


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of two groupings: rows sharing an id in either end up together."""
    n = len(a)
    na, nb = int(a.max(initial=-1)) + 1, int(b.max(initial=-1)) + 1
    rows = np.r_[np.arange(n), np.arange(n)]
    cols = np.r_[n + a, n + na + b]
    m = coo_matrix((np.ones(2 * n), (rows, cols)), shape=(n + na + nb, n + na + nb))
    _, lab = connected_components(m, directed=False)
    return _codes(pd.Series(lab[:n]))


def row_groups(meta: pd.DataFrame, group_column: str | None) -> tuple[np.ndarray, bool]:
    """Group id per row and whether any group holds more than one row."""
    parts = []
    if group_column is not None:
        if group_column not in meta.columns:
            raise GraftError(f"--group-column {group_column!r} not found; columns: {', '.join(map(str, meta.columns))}")
        parts.append(_codes(meta[group_column]))
    hc = hash_column(meta)
    if hc is not None:
        parts.append(_codes(meta[hc]))
    if not parts:
        g = np.arange(len(meta))
    elif len(parts) == 1:
        g = parts[0]
    else:
        g = _merge(parts[0], parts[1])
    return g, len(np.unique(g)) < len(g)


def make_split(
    data: LabelledData,
    *,
    split_column: str | None = "split",
    group_column: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
) -> Split:
    """The data's own train/test split when ``split_column`` has one, else a (stratified, grouped) hold-out."""
    meta, y = data.meta, data.y
    groups, grouped = row_groups(meta, group_column)
    classification = data.spec.kind == "classification"
    dropped: dict[str, int] = {}
    if split_column and split_column in meta.columns:
        col = meta[split_column].astype(str).str.strip().str.lower().to_numpy()
        is_train = np.isin(col, TRAIN_VALUES)
        test_vals = [v for v in TEST_VALUES if (col == v).any()]
        if is_train.any() and test_vals:
            is_test = col == test_vals[0]
            other = ~(is_train | is_test)
            if other.any():
                dropped["outside_train_test_split"] = int(other.sum())
            train = np.nonzero(is_train)[0]
            test = np.nonzero(is_test)[0]
            leak = np.isin(groups[test], groups[train])
            if leak.any():
                what = f"group ({group_column} or identical image)" if group_column else "image content (sha256)"
                dropped[f"test_rows_sharing_{'group' if group_column else 'content'}_with_train"] = int(leak.sum())
                test = test[~leak]
                source = f"column {split_column!r} ({test_vals[0]!r} as test; {int(leak.sum())} test rows sharing {what} with train dropped)"
            else:
                source = f"column {split_column!r} ({test_vals[0]!r} as test)"
            if len(test) == 0:
                raise GraftError(f"split column {split_column!r} leaves no test rows")
            _check_train(y[train], classification)
            return Split(train, test, groups, source, grouped, dropped)
    if not 0.0 < test_size < 1.0:
        raise GraftError(f"--test-size must be between 0 and 1, got {test_size}")
    idx = np.arange(len(y))
    if classification:
        _check_counts(y, 2, "a stratified hold-out")
        if grouped:
            k = max(2, int(round(1.0 / test_size)))
            cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            train, test = next(cv.split(idx, y, groups))
            source = f"stratified group hold-out (1/{k}, seed {seed})"
        else:
            _check_fraction(y, test_size, "--test-size", stratified=True)
            cv = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
            train, test = next(cv.split(idx, y))
            source = f"stratified hold-out ({test_size:g}, seed {seed})"
    else:
        if grouped:
            _check_fraction(np.unique(groups), test_size, "--test-size", what="groups")
            cv = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
            train, test = next(cv.split(idx, y, groups))
            source = f"group hold-out ({test_size:g}, seed {seed})"
        else:
            _check_fraction(y, test_size, "--test-size")
            train, test = next(ShuffleSplit(n_splits=1, test_size=test_size, random_state=seed).split(idx))
            source = f"random hold-out ({test_size:g}, seed {seed})"
    if group_column:
        source += f", groups from {group_column!r}"
    _check_train(y[train], classification)
    return Split(np.sort(train), np.sort(test), groups, source, grouped, dropped)


def _check_train(y_train: np.ndarray, classification: bool) -> None:
    if len(y_train) < 2:
        raise GraftError(f"only {len(y_train)} training row(s)")
    if classification and len(np.unique(y_train)) < 2:
        raise GraftError(f"the training split has a single class ({np.unique(y_train)[0]!r}): nothing to learn")


def _check_fraction(y: np.ndarray, size: float, flag: str, stratified: bool = False, what: str = "rows") -> None:
    """scikit-learn's shuffle splits hold out ceil(size * n) of ``y``'s n items and train on the
    rest; both sides need an item (stratified: one per class), else its ValueError would escape."""
    n, n_out = len(y), math.ceil(size * len(y))
    need = len(np.unique(y)) if stratified else 1
    if n_out < need or n - n_out < need:
        each = f"{need} (one per class)" if stratified else "1"
        raise GraftError(f"{flag} {size:g} of {n} {what} holds out {n_out} and leaves {n - n_out} to train on; "
                         f"each side needs at least {each}: change {flag} or add data")


def _check_counts(y: np.ndarray, need: int, what: str) -> None:
    vals, counts = np.unique(y, return_counts=True)
    low = [(v, c) for v, c in zip(vals, counts) if c < need]
    if low:
        listed = ", ".join(f"{v!r}: {c}" for v, c in low[:5])
        raise GraftError(f"too few samples per class for {what} (need {need} each; {listed}); lower --cv or add data")


def cv_folds(
    y: np.ndarray,
    groups: np.ndarray | None,
    *,
    kind: str,
    n_splits: int = 5,
    holdout: float | None = None,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """CV folds over the *training* rows; one validation fold of size ``holdout`` when given.

    Classification folds are stratified; groups (when any holds two rows) never straddle folds.
    """
    idx = np.arange(len(y))
    grouped = groups is not None and len(np.unique(groups)) < len(groups)
    classification = kind == "classification"
    if holdout is not None:
        if classification and grouped:
            k = max(2, int(round(1.0 / holdout)))
            _check_counts(y, k, f"a grouped validation fold of 1/{k}")
            cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            return [next(cv.split(idx, y, groups))]
        if classification:
            _check_counts(y, 2, "a validation fold")
            _check_fraction(y, holdout, "--holdout", stratified=True)
            return [next(StratifiedShuffleSplit(n_splits=1, test_size=holdout, random_state=seed).split(idx, y))]
        if grouped:
            _check_fraction(np.unique(groups), holdout, "--holdout", what="groups")
            return [next(GroupShuffleSplit(n_splits=1, test_size=holdout, random_state=seed).split(idx, y, groups))]
        _check_fraction(y, holdout, "--holdout")
        return [next(ShuffleSplit(n_splits=1, test_size=holdout, random_state=seed).split(idx))]
    if n_splits < 2:
        raise GraftError(f"--cv must be at least 2, got {n_splits}")
    if classification:
        _check_counts(y, n_splits, f"{n_splits}-fold CV on the training split")
    if grouped:
        n_groups = len(np.unique(groups))
        if n_groups < n_splits:
            raise GraftError(f"{n_groups} groups in the training split: too few for {n_splits}-fold grouped CV")
        cv = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed) if classification else GroupKFold(n_splits, shuffle=True, random_state=seed)
        return list(cv.split(idx, y, groups))
    if len(y) < n_splits:
        raise GraftError(f"{len(y)} training rows: too few for {n_splits}-fold CV")
    cv = StratifiedKFold(n_splits, shuffle=True, random_state=seed) if classification else KFold(n_splits, shuffle=True, random_state=seed)
    return list(cv.split(idx, y))
