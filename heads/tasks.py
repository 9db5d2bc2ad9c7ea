"""Tasks: which label column a head learns, what kind of problem it is, and where labels come from.

A built-in task name (``gender``, ``age``, ``age-group``, ...) is shorthand for a label column
and a kind; any column works with ``label_column=`` and ``kind=``. Labels are read from the
cache's own metadata (extract keeps every CSV column) or from a separate CSV joined on the image
path (exact, then by path suffix, then by file name when that is unambiguous). Rows whose label
is missing are dropped and counted, never silently imputed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePath

import numpy as np
import pandas as pd

from convert.errors import GraftError

KINDS = ("classification", "regression")


@dataclass(frozen=True)
class TaskSpec:
    """What to learn: a task name, its label column and its kind."""

    name: str
    label_column: str
    kind: str
    description: str = ""
    #: other names the column goes by in datasets people have (matched case-insensitively);
    #: empty when the user named the column
    candidates: tuple[str, ...] = ()

    def find_column(self, columns: Sequence[str]) -> str | None:
        """The column of ``columns`` this task reads: its own name, else the first candidate
        present (exact, then ignoring case, ``-``/``_``/spaces)."""
        cols = [str(c) for c in columns]
        if self.label_column in cols:
            return self.label_column
        loose = {_loose(c): c for c in reversed(cols)}
        for cand in (self.label_column, *self.candidates):
            if cand in cols:
                return cand
            if _loose(cand) in loose:
                return loose[_loose(cand)]
        return None


def _loose(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


_GENDER = ("gender", "sex", "is_male", "male", "gender_label")
_AGE = ("age_approx", "age", "age_years", "real_age", "apparent_age", "age_real")
_AGE_GROUP = ("age_group", "agegroup", "age_bucket", "age_class", "young_old")
_IDENTITY = ("identity", "identity_id", "person", "person_id", "subject", "subject_id", "celeb_id", "name", "id")
_LABEL = ("label", "class", "category", "target", "y")

# name -> the task; aliases share one entry. The first candidate is the column the test-bed
# faces use; the others are what other face datasets call it.
BUILTIN_TASKS: dict[str, TaskSpec] = {
    "gender": TaskSpec("gender", "gender", "classification", "gender", _GENDER[1:]),
    "age": TaskSpec("age", "age_approx", "regression", "age in years", _AGE[1:]),
    "age-group": TaskSpec("age-group", "age_group", "classification", "age group (e.g. young / old)", _AGE_GROUP[1:]),
    "young-old": TaskSpec("young-old", "age_group", "classification", "alias of age-group", _AGE_GROUP[1:]),
    "identity": TaskSpec("identity", "identity", "classification", "who is in the picture", _IDENTITY[1:]),
    "label": TaskSpec("label", "label", "classification", "extract's folder-name label", _LABEL[1:]),
}

HASH_COLUMNS = ("sha256", "content_hash", "hash", "digest")


def resolve_task(task: str | None, label_column: str | None = None, kind: str | None = None) -> TaskSpec:
    """A :class:`TaskSpec` from a built-in name, a column + kind, or a name overridden by either."""
    if kind is not None and kind not in KINDS:
        raise GraftError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if task is not None and task in BUILTIN_TASKS:
        base = BUILTIN_TASKS[task]
        if label_column is not None:  # the user named the column: exactly that one
            return TaskSpec(base.name, label_column, kind or base.kind, base.description)
        return TaskSpec(base.name, base.label_column, kind or base.kind, base.description, base.candidates)
    if label_column is None:
        if task is None:
            raise GraftError("give --task NAME or --label-column COLUMN --kind classification|regression")
        names = ", ".join(BUILTIN_TASKS)
        raise GraftError(f"unknown task {task!r} (built-in: {names}); for any other column give --label-column and --kind")
    if kind is None:
        raise GraftError(f"--label-column {label_column} needs --kind classification|regression")
    return TaskSpec(task or _slug(label_column), label_column, kind, f"column {label_column!r}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text.strip().lower()).strip("-") or "task"


def hash_column(meta: pd.DataFrame) -> str | None:
    """The metadata column holding each row's content hash (extract writes ``sha256``)."""
    for c in HASH_COLUMNS:
        if c in meta.columns:
            return c
    return None


def _norm(p: str) -> str:
    return PurePath(str(p).replace("\\", "/")).as_posix().lstrip("./")


def join_labels(meta: pd.DataFrame, labels: pd.DataFrame, path_column: str | None = None) -> pd.DataFrame:
    """Add the columns of ``labels`` to ``meta`` by image path; returns a frame aligned with ``meta``.

    Matching tries, in order: the exact (normalised) path, ``meta.path`` ending with ``/<csv path>``
    (a CSV of relative paths against a cache of absolute ones), then the file name alone when it
    is unique on both sides. Columns of ``labels`` replace same-named metadata columns.
    """
    if "path" not in meta.columns:
        raise GraftError("the cache metadata has no `path` column to join --labels on")
    if path_column is None:
        from extract.sources import PATH_COLUMN_GUESSES, guess_path_column

        path_column = guess_path_column(labels.columns)
        if path_column is None:
            raise GraftError(f"--labels has no path column (looked for {', '.join(PATH_COLUMN_GUESSES)}, any case); "
                             f"columns: {list(labels.columns)}; name it with --labels-path-column")
    if path_column not in labels.columns:
        raise GraftError(f"--labels has no column {path_column!r}; columns: {list(labels.columns)}")
    lab = labels.drop_duplicates(subset=[path_column], keep="first").copy()
    lab_paths = [_norm(p) for p in lab[path_column].astype(str)]
    row_of: dict[str, int] = {p: i for i, p in enumerate(lab_paths)}
    names = [PurePath(p).name for p in lab_paths]
    counts = Counter(names)
    unique_name = {n: i for i, n in enumerate(names) if counts[n] == 1}
    meta_paths = [_norm(p) for p in meta["path"].astype(str)]
    meta_names = pd.Series([PurePath(p).name for p in meta_paths])
    meta_name_dup = set(meta_names[meta_names.duplicated(keep=False)])
    idx = np.full(len(meta), -1, dtype=np.int64)
    for i, p in enumerate(meta_paths):
        j = row_of.get(p)
        if j is None:  # suffix: walk the path's tails
            parts = p.split("/")
            for s in range(1, len(parts) - 1):  # tails of two or more parts; a bare name must be unique
                j = row_of.get("/".join(parts[s:]))
                if j is not None:
                    break
        if j is None and meta_names[i] not in meta_name_dup:
            j = unique_name.get(meta_names[i])
        if j is not None:
            idx[i] = j
    if (idx < 0).all():
        raise GraftError(
            f"no row of --labels matches an image of the cache by path or file name "
            f"(cache e.g. {meta_paths[0] if meta_paths else '-'}; labels e.g. {lab_paths[0] if lab_paths else '-'})"
        )
    extra = lab.drop(columns=[path_column]).reset_index(drop=True)
    joined = extra.reindex(np.where(idx >= 0, idx, len(extra))).reset_index(drop=True)  # missing -> NaN row
    out = meta.reset_index(drop=True).drop(columns=[c for c in extra.columns if c in meta.columns])
    out = pd.concat([out, joined], axis=1)
    out.attrs["labels_unmatched"] = int((idx < 0).sum())
    return out


@dataclass
class LabelledData:
    """Features and labels of the rows that have a label, plus what was dropped and why."""

    X: np.ndarray
    y: np.ndarray
    meta: pd.DataFrame
    spec: TaskSpec
    classes: list | None = None
    dropped: dict[str, int] = field(default_factory=dict)


def _filter_rows(meta: pd.DataFrame, where: list[str] | None) -> np.ndarray:
    keep = np.ones(len(meta), dtype=bool)
    for cond in where or []:
        if "=" not in cond:
            raise GraftError(f"--where takes COLUMN=VALUE, got {cond!r}")
        col, val = cond.split("=", 1)
        if col not in meta.columns:
            raise GraftError(f"--where: no column {col!r}; columns: {list(meta.columns)}")
        values = meta[col].astype(str).to_numpy()
        if not (values == val).any():
            seen = sorted(set(values[:100_000]))
            shown = ", ".join(seen[:10]) + (", ..." if len(seen) > 10 else "")
            raise GraftError(f"--where {cond}: no row has {col} = {val!r}; values of {col!r}: {shown}")
        keep &= values == val
    return keep


def prepare(X: np.ndarray, meta: pd.DataFrame, spec: TaskSpec, *, where: list[str] | None = None) -> LabelledData:
    """Rows of ``X`` / ``meta`` with a usable label for ``spec``; NaN labels dropped and counted.

    Classification labels keep their original values (strings stay strings, so predictions
    say "female", not 0); regression labels must be numeric.
    """
    if len(meta) != len(X):
        raise GraftError(f"features and metadata disagree: {len(X)} rows vs {len(meta)}")
    found = spec.find_column(list(meta.columns))
    if found is None:
        cols = [c for c in meta.columns if c not in HASH_COLUMNS]
        tried = f" (nor {', '.join(spec.candidates)})" if spec.candidates else ""
        raise GraftError(f"label column {spec.label_column!r}{tried} not found; columns: {', '.join(map(str, cols))} "
                         "(use --labels CSV or --label-column)")
    if found != spec.label_column:
        spec = replace(spec, label_column=found)
    dropped: dict[str, int] = {}
    keep = _filter_rows(meta, where)
    if where:
        dropped["filtered_by_where"] = int((~keep).sum())
    raw = meta[spec.label_column]
    if spec.kind == "regression":
        num = pd.to_numeric(raw, errors="coerce")
        bad = num.isna() & raw.notna()
        if bad.any():
            ex = raw[bad].astype(str).iloc[0]
            raise GraftError(f"regression label {spec.label_column!r} is not numeric ({int(bad.sum())} row(s), e.g. {ex!r}); use --kind classification")
        raw = num
    missing = raw.isna().to_numpy().copy()
    if spec.kind == "classification":
        missing |= raw.astype(str).str.strip().isin(["", "nan", "NaN", "None"]).to_numpy() & raw.notna().to_numpy()
    dropped["missing_label"] = int((missing & keep).sum())
    keep &= ~missing
    if spec.kind == "regression":
        finite = np.isfinite(raw.to_numpy(dtype=np.float64, na_value=np.nan))
        dropped["non_finite_label"] = int((~finite & keep).sum())
        keep &= finite
    rows = np.nonzero(keep)[0]
    if len(rows) == 0:
        raise GraftError(f"no row has a {spec.label_column!r} label ({len(meta)} rows, {dropped['missing_label']} missing)")
    feats = np.asarray(X[rows])
    nonfinite = ~np.isfinite(feats).all(axis=1)
    if nonfinite.any():
        dropped["non_finite_features"] = int(nonfinite.sum())
        rows, feats = rows[~nonfinite], feats[~nonfinite]
    sub = meta.iloc[rows].reset_index(drop=True)
    classes = None
    if spec.kind == "classification":
        y = sub[spec.label_column].to_numpy()
        if all(isinstance(v, (int, np.integer, float, np.floating)) and float(v).is_integer() for v in y):
            y = y.astype(np.int64)  # 1.0/0.0 from a CSV with NaNs read as float: keep integers
        else:
            y = y.astype(str)
        classes = sorted(set(y.tolist()))
        if len(classes) < 2:
            raise GraftError(f"label {spec.label_column!r} has a single class ({classes[0]!r}) in {len(y)} row(s): nothing to learn")
    else:
        y = sub[spec.label_column].to_numpy(dtype=np.float64)
    return LabelledData(X=feats, y=y, meta=sub, spec=spec, classes=classes, dropped={k: v for k, v in dropped.items() if v})
