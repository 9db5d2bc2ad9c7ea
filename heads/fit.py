"""``fit_head``: cached features + labels -> split -> CV search -> refit -> test report -> head folder.

Library entry points behind ``graft fit-head``:

* :func:`fit_head` works on arrays already in memory (``X``, ``meta``), e.g. from a notebook.
* :func:`fit_head_from_cache` reads extract's cache (``extract.load_embeddings``), joins a
  labels CSV if given, records which model / cache key the features came from, and calls it.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from convert.errors import GraftError
from convert.paths import heads_root
from heads.estimators import CLASSIFIER_HEADS, REGRESSOR_HEADS
from heads.evaluate import evaluate, learning_curve
from heads.memory import check_fit_memory
from heads.persist import AtomicDir, library_versions, now, save_estimator
from heads.report import write_report
from heads.search import fit_best, search
from heads.splits import make_split
from heads.tasks import TaskSpec, join_labels, prepare


@dataclass
class FitResult:
    """Where the head was written, the fitted estimator, its card and report."""

    path: Path
    estimator: Any
    card: dict
    report: dict


def _import_pyplot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def slug(text: str) -> str:
    """A folder-name-safe form of a task, model or blob name (``fc7/pre_relu7`` -> ``fc7_pre_relu7``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def default_out(task: str, model: str, layer: str) -> Path:
    """``artifacts/heads/<task>-<model>-<layer>/``."""
    return heads_root() / f"{slug(task)}-{slug(model)}-{slug(layer)}"


def _heads_for(kind: str, head: str | Sequence[str] | None) -> list[str]:
    if head is None or head == "auto" or head == ["auto"]:
        return list(CLASSIFIER_HEADS if kind == "classification" else REGRESSOR_HEADS)
    return [head] if isinstance(head, str) else list(head)


def fit_head(
    X: np.ndarray,
    meta: pd.DataFrame,
    spec: TaskSpec,
    *,
    model: dict,
    layer: str,
    cache: dict | None = None,
    head: str | Sequence[str] | None = "auto",
    preprocess: Sequence[str] = ("standardize",),
    n_components: int | None = None,
    alphas: Sequence[float] | None = None,
    split_column: str | None = "split",
    group_column: str | None = None,
    test_size: float = 0.2,
    cv: int = 5,
    holdout: float | None = None,
    scoring: str | None = None,
    hidden_layer_sizes: tuple[int, ...] = (256,),
    max_iter: int = 300,
    mlp_backend: str = "auto",
    seed: int = 0,
    clip_range: str | tuple[float, float] | None = "train",
    where: list[str] | None = None,
    with_learning_curve: bool = True,
    with_plots: bool = True,
    out: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Fit, evaluate and save one head; every choice is made on the training split only.

    ``model`` is ``{"name", "weights_sha256", "dir"}`` of the features' model, ``cache`` the
    cache key (``{"dir", "key", "config"}``) they came from; both go into the card so that
    ``predict`` can refuse features of another model, blob or preprocessing.
    """
    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    if with_plots:  # matplotlib's import (~0.5 s of Python) overlaps the search's BLAS, which drops the GIL
        threading.Thread(target=_import_pyplot, name="graft-import-pyplot", daemon=True).start()
    data = prepare(X, meta, spec, where=where)
    if data.spec.label_column != spec.label_column:
        say(f"{spec.name}: no {spec.label_column!r} column, using {data.spec.label_column!r}")
    spec = data.spec
    split = make_split(data, split_column=split_column, group_column=group_column, test_size=test_size, seed=seed)
    say(f"{spec.name}: {len(data.y)} labelled rows; {split.describe()}")
    Xtr, ytr = np.asarray(data.X[split.train], np.float32), data.y[split.train]
    Xte, yte = np.asarray(data.X[split.test], np.float32), data.y[split.test]
    heads = _heads_for(spec.kind, head)
    res = search(
        Xtr, ytr, kind=spec.kind, heads=heads, preprocess=preprocess, n_components=n_components, alphas=alphas,
        groups=split.groups[split.train] if split.grouped else None, cv=cv, holdout=holdout, scoring=scoring,
        hidden_layer_sizes=hidden_layer_sizes, max_iter=max_iter, mlp_backend=mlp_backend, seed=seed, log=say,
    )
    say(f"chosen by {res.cv} CV ({res.scoring}): {res.best} in {res.seconds:.1f} s")
    t1 = time.perf_counter()
    est = fit_best(Xtr, ytr, res, kind=spec.kind, n_components=n_components, hidden_layer_sizes=hidden_layer_sizes,
                   max_iter=max(max_iter, 500), mlp_backend=mlp_backend, seed=seed, clip_range=clip_range)
    fit_seconds = time.perf_counter() - t1
    ev = evaluate(est, Xte, yte, ytr, spec.kind)
    lc = learning_curve(est, Xtr, ytr, Xte, yte, spec.kind, seed=seed) if with_learning_curve else []
    name = f"{spec.name}-{model.get('name')}-{layer}"
    class_counts = None
    if spec.kind == "classification":
        class_counts = {side: {str(k): int(v) for k, v in zip(*np.unique(yy, return_counts=True))} for side, yy in (("train", ytr), ("test", yte))}
    summary_keys = ("accuracy", "balanced_accuracy", "roc_auc", "macro_f1") if spec.kind == "classification" else ("rmse", "mae", "r2")
    versions = library_versions()
    report = {
        "name": name,
        "created": now(),
        "task": {"name": spec.name, "label_column": spec.label_column, "kind": spec.kind,
                 "clip_range": list(est.clip_range_) if getattr(est, "clip_range_", None) is not None else None},
        "features": {"model": model.get("name"), "layer": layer, "dim": int(Xtr.shape[1])},
        "data": {
            "n_rows": int(len(data.y)),
            "n_train": int(len(ytr)),
            "n_test": int(len(yte)),
            "split": split.source,
            "group_column": group_column,
            "dropped": {**data.dropped, **split.dropped},
            "class_counts": class_counts,
            "labels_unmatched": meta.attrs.get("labels_unmatched"),
        },
        "search": {"scoring": res.scoring, "cv": res.cv, "best": res.best, "seconds": round(res.seconds, 3), "table": res.table},
        "test": {"n_test": ev["n_test"], "metrics": ev["metrics"], "baseline": ev["baseline"]},
        "learning_curve": lc,
        "timings": {"search_s": round(res.seconds, 3), "refit_s": round(fit_seconds, 3), "total_s": round(time.perf_counter() - t0, 3)},
        "seed": seed,
        "versions": versions,
    }
    card = {
        "format": "graft-head/1",
        "name": name,
        "created": report["created"],
        "task": report["task"],
        "labels": [str(c) if not isinstance(c, (int, np.integer)) else int(c) for c in est.classes_] if spec.kind == "classification" else None,
        "model": {k: model.get(k) for k in ("name", "weights_sha256", "dir")},
        "layer": layer,
        "feature_dim": int(Xtr.shape[1]),
        "cache": cache,
        "preprocess": {"mode": est.preprocess, "n_components": est.n_components},
        "head": {"type": est.head, "alpha": float(est.alpha), "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in est.get_params().items()},
                 "mlp_trained_by": getattr(est, "mlp_backend_", None)},
        "search": {"scoring": res.scoring, "cv": res.cv, "best": res.best, "candidates": sorted({r["head"] for r in res.table})},
        "split": {"source": split.source, "group_column": group_column, "n_train": int(len(ytr)), "n_test": int(len(yte))},
        "metrics": {
            "test": {k: ev["metrics"].get(k) for k in summary_keys},
            "baseline": {k: ev["baseline"].get(k) for k in summary_keys},
        },
        "seed": seed,
        "versions": versions,
    }
    target = Path(out) if out is not None else default_out(spec.name, model.get("name") or "model", layer)
    with AtomicDir(target) as tmp:
        save_estimator(tmp, est, card)
        write_report(tmp, report, ev["curves"] if with_plots else None)
        pd.DataFrame(
            {"path": data.meta["path"].iloc[split.test].to_numpy() if "path" in data.meta else split.test,
             "true": yte, **_prediction_columns(est, Xte, spec.kind)}
        ).to_csv(tmp / "test_predictions.csv", index=False)
    say(f"wrote {target}")
    return FitResult(path=target, estimator=est, card=card, report=report)


def _prediction_columns(est, X: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """``prediction`` plus ``p_<class>`` per class (classification) for a CSV."""
    if kind != "classification":
        return {"prediction": est.predict(X)}
    P = est.predict_proba(X)
    cols = {"prediction": est.classes_[np.argmax(P, axis=1)]}
    for i, c in enumerate(est.classes_):
        cols[f"p_{c}"] = P[:, i]
    return cols


def model_info(model: str | os.PathLike | None, cache_config: dict | None) -> dict:
    """Name, weights sha256 and folder of the model package; falls back to the cache's record."""
    info: dict[str, Any] = {"name": None, "weights_sha256": None, "dir": None}
    if model is not None:
        try:
            from convert import load_package

            pkg = load_package(str(model))
            info = {"name": pkg.manifest.get("name") or Path(pkg.dir).name, "weights_sha256": pkg.weights_sha256, "dir": str(pkg.dir)}
        except (ImportError, FileNotFoundError, GraftError, ValueError, KeyError, OSError):
            info["name"] = Path(str(model)).name
    if cache_config and not info["weights_sha256"]:
        info["weights_sha256"] = cache_config.get("weights_sha256")
    if info["weights_sha256"] and cache_config and cache_config.get("weights_sha256") not in (None, info["weights_sha256"]):
        raise GraftError(f"the cache's features come from weights {cache_config['weights_sha256'][:12]}…, not from model {info['name']} ({info['weights_sha256'][:12]}…)")
    return info


def default_cache_of(model: str | os.PathLike) -> str | os.PathLike:
    """The cache ``extract --model MODEL`` wrote: ``<caches root>/<package name>`` for a package
    folder or a package name; anything else is passed on as it is (a cache folder, a name)."""
    import json

    from convert.paths import caches_root, models_root

    for cand in (Path(str(model)), models_root() / str(model)):
        manifest = cand / "manifest.json"
        try:
            m = json.loads(manifest.read_text()) if manifest.is_file() else None
        except (OSError, ValueError):
            m = None
        if isinstance(m, dict) and str(m.get("format", "")).startswith("graft-model/"):
            return caches_root() / (m.get("name") or cand.resolve().name)
    return model


def cache_info(source: str | os.PathLike, layer: str, key: str | None = None, dataset: str | None = None) -> dict | None:
    """The cache key folder ``load_embeddings`` reads for ``layer``: {"dir", "key", "config", "model"},
    and with ``dataset`` (the name it read) that dataset's {name, rows, source}."""
    try:
        from extract import list_keys
    except ImportError:
        return None
    try:
        keys = [m for m in list_keys(source) if layer in m.get("blobs", {})]
    except (ValueError, OSError):
        return None
    if key is not None:
        keys = [m for m in keys if m.get("key") == key]
    if dataset is not None and len(keys) > 1:
        from extract.cache import list_datasets

        keys = [m for m in keys if dataset in list_datasets(m["_dir"])] or keys
    if len(keys) != 1:
        return None
    m = keys[0]
    info = {"dir": m.get("_dir"), "key": m.get("key"), "config": m.get("config"), "model": m.get("model")}
    if dataset is not None:
        from extract.cache import list_datasets

        d = list_datasets(m["_dir"]).get(dataset, {})
        info["dataset"] = {"name": dataset, "rows": d.get("rows"), "source": d.get("source")}
    return info


def fit_head_from_cache(
    spec: TaskSpec,
    *,
    model: str | os.PathLike | None,
    layer: str,
    cache: str | os.PathLike | None = None,
    cache_key: str | None = None,
    dataset: str | None = None,
    labels: str | os.PathLike | None = None,
    labels_path_column: str | None = None,
    **kwargs: Any,
) -> FitResult:
    """Load extract's cache of ``layer`` (``cache`` folder, else the model's default cache), join
    ``labels`` if given, and :func:`fit_head`; refused up front (GraftError) when the fit's memory
    estimate exceeds what is available (``heads.memory``)."""
    from extract import load_embeddings
    from extract.cache import embedding_shape

    if cache is None and model is None:
        raise GraftError("give --model (its default cache) or --cache DIR")
    source = cache if cache is not None else default_cache_of(model)
    try:
        rows, dim = embedding_shape(source, layer, key=cache_key, dataset=dataset)
        check_fit_memory(rows, dim)  # from shapes, before a row is read: a memory map would hide the cost
        X, meta = load_embeddings(source, layer, key=cache_key, dataset=dataset)
    except ValueError as err:  # extract's CacheError is a ValueError
        raise GraftError(str(err)) from err
    used = meta.attrs.get("dataset")
    if labels is not None:
        from extract.sources import read_csv_file  # missing, binary, empty or malformed: one error line

        lab = read_csv_file(labels, "--labels")
        meta = join_labels(meta, lab, labels_path_column)
    cinfo = cache_info(source, layer, cache_key, used)
    log = kwargs.get("log")
    if log is not None and used is not None:
        log(f"dataset: {used} ({len(meta)} rows{', chosen as the most recently extracted' if dataset is None else ''})")
    if model is None and cinfo and cinfo.get("model"):  # the cache remembers its package
        model = cinfo["model"].get("package") or cinfo["model"].get("name")
    minfo = model_info(model, cinfo.get("config") if cinfo else None)
    if minfo["name"] is None:
        minfo["name"] = Path(str(source)).name
    return fit_head(np.asarray(X), meta, spec, model=minfo, layer=layer, cache=cinfo, **kwargs)
