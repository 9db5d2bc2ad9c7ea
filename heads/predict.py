"""``predict``: images -> extract's pipeline and cache -> the saved head -> a CSV.

Without a head, ``predict --model`` reports a classifier package's own output (a fine-tuned net,
or VGG-Face's 2,622 identities) the same way: :func:`predict_with_model`.

Features come from ``extract.pipeline.extract`` with the preprocessing, storage dtype, L2 flag
and precision recorded in the head's card, into the model's usual cache, so images already seen
are not computed again. The head is loaded only after the cache key it read is checked against
the card (model weights, blob, preprocessing): a mismatch is an error naming each difference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from convert.errors import GraftError
from heads.persist import check_card, check_loadable, load_head, read_card

PREPROCESS_OVERRIDES = ("mean", "scale", "channel_order", "resize", "crop", "resize_mode", "resize_filter", "fast_decode")


def predict_frame(est, X: np.ndarray, kind: str) -> pd.DataFrame:
    """``prediction`` and, for classifiers, ``p_<class>`` per class, one row per feature row."""
    if kind != "classification":
        return pd.DataFrame({"prediction": est.predict(X)})
    P = est.predict_proba(X)
    df = pd.DataFrame({"prediction": est.classes_[np.argmax(P, axis=1)]})
    for i, c in enumerate(est.classes_):
        df[f"p_{c}"] = P[:, i]
    return df


def predict_images(
    head_dir: str | os.PathLike,
    *,
    images: str | None = None,
    csv: str | None = None,
    path_column: str | None = None,
    root: str | None = None,
    out: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    backend: str = "auto",
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    allow_pickle: bool = False,
) -> pd.DataFrame:
    """Predict every image of a folder (or CSV); returns the table and writes it to ``out`` if given.

    Images that cannot be read get an empty prediction and their reason in ``error``.
    ``allow_pickle``: also load an older head's ``head.joblib`` (a pickle: it runs code).
    """
    card = read_card(head_dir)
    check_loadable(head_dir, allow_pickle=allow_pickle)  # refuse a pickle before extracting anything
    blob = card["layer"]
    where = model or card["model"].get("dir") or card["model"].get("name")
    cfg = (card.get("cache") or {}).get("config") or {}
    pp = cfg.get("preprocess") or {}
    overrides = {k: pp.get(k) for k in PREPROCESS_OVERRIDES if k in pp}
    records, summary, failures = _extract(
        dict(images=images, csv=csv, root=root, path_column=path_column),
        str(where), [blob], cache=cache, preprocess=overrides or None, backend=backend, device=device,
        precision=cfg.get("precision") or "auto", batch_size=batch_size, workers=workers,
        dtype=cfg.get("dtype") or "float32", l2=bool(cfg.get("l2", False)), progress=progress,
    )
    key_dir = Path(summary.cache_dir)
    key_cfg = json.loads((key_dir / "manifest.json").read_text()).get("config")
    diffs = check_card(card, weights_sha256=(key_cfg or {}).get("weights_sha256"), layer=blob, cache_config=key_cfg if cfg else None)
    if diffs:
        raise GraftError(f"head {head_dir} does not match the features just extracted: " + "; ".join(diffs))
    X, ok = _rows(key_dir, blob, records)
    est, card = load_head(head_dir, layer=blob, feature_dim=int(X.shape[1]) if len(X) else None, allow_pickle=allow_pickle)
    pred = predict_frame(est, X, card["task"]["kind"]) if ok.any() else pd.DataFrame()
    return _write(_assemble(records, pred, ok, failures), out)


def predict_with_model(
    model: str | os.PathLike,
    *,
    images: str | None = None,
    csv: str | None = None,
    path_column: str | None = None,
    root: str | None = None,
    out: str | os.PathLike | None = None,
    blob: str | None = None,
    top_k: int = 5,
    cache: str | os.PathLike | None = None,
    backend: str = "auto",
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """A package's own prediction (a fine-tuned net, VGG-Face's identities): the argmax of its
    output blob (``prob``), named by the package's classes, with ``p_<class>`` columns for up to
    20 classes, else the ``top_k`` classes and their scores; an output of one value per image
    without classes (a regression net) is the prediction itself."""
    from convert import load_package

    pkg = load_package(model)
    blob = blob or pkg.outputs[0]
    records, summary, failures = _extract(
        dict(images=images, csv=csv, root=root, path_column=path_column), str(pkg.dir), [blob], cache=cache,
        backend=backend, device=device, batch_size=batch_size, workers=workers, progress=progress,
    )
    X, ok = _rows(Path(summary.cache_dir), blob, records)
    S = X.reshape(len(X), -1)
    k = S.shape[1] if len(S) else 0
    names = np.array(pkg.classes if pkg.classes and len(pkg.classes) == k else [str(i) for i in range(k)], dtype=object)
    pred = pd.DataFrame()
    if ok.any() and k == 1 and not pkg.classes:  # one value per image: a regression output (e.g. a fine-tuned age)
        pred = pd.DataFrame({"prediction": S[:, 0]})
    elif ok.any():
        order = np.argsort(-S, axis=1, kind="stable")
        pred = pd.DataFrame({"prediction": names[order[:, 0]], "score": S[np.arange(len(S)), order[:, 0]]})
        if k <= 20:
            for i, c in enumerate(names):
                pred[f"p_{c}"] = S[:, i]
        else:
            for j in range(min(top_k, k)):
                pred[f"top{j + 1}"] = names[order[:, j]]
                pred[f"p_top{j + 1}"] = S[np.arange(len(S)), order[:, j]]
    return _write(_assemble(records, pred, ok, failures), out)


def _extract(source: dict, model: str, blobs: list[str], **kwargs):
    """The input's records and extract's (summary, failures) for them; bad input is a GraftError."""
    from extract.pipeline import Dataset, extract
    from extract.sources import dataset_name, input_source, load_records

    try:
        records = load_records(**source)
        # the images asked about get predict's own dataset: stored, never part of a training set
        where = {k: source.get(k) for k in ("images", "csv")}
        own = Dataset(f"predict-{dataset_name(**where)}", source=input_source(**where), command="predict", explicit=True)
        return (records, *extract(model, blobs, records, dataset=own, **kwargs))
    except (ValueError, OSError) as err:  # extract's SourceError / CacheError / BackendError are ValueErrors
        if isinstance(err, FileNotFoundError):
            raise
        raise GraftError(str(err)) from err


def _rows(key_dir: Path, blob: str, records: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Cached features of ``records``' images, by content hash (extract gave each its sha256),
    and which have one."""
    from extract.cache import read_rows

    shas = [None if pd.isna(s) else str(s) for s in records["sha256"]] if "sha256" in records else [None] * len(records)
    X, ok = read_rows(key_dir, blob, shas)
    return np.asarray(X, np.float32), ok


def _assemble(records: pd.DataFrame, pred: pd.DataFrame, ok: np.ndarray, failures: pd.DataFrame) -> pd.DataFrame:
    """One row per input image: path, rel_path, the prediction columns (empty where it failed), error."""
    paths = records["path"].astype(str).tolist()
    res = pd.DataFrame({"path": paths})
    if "rel_path" in records:
        res["rel_path"] = records["rel_path"].to_numpy()
    for col in pred.columns:
        full = pd.Series([None] * len(paths), dtype=object)
        full[ok] = pred[col].to_numpy()
        res[col] = full
    reasons = dict(zip(failures["path"].astype(str), failures["reason"].astype(str))) if len(failures) else {}
    res["error"] = [reasons.get(p, "" if k else "no features") for p, k in zip(paths, ok)]
    return res


def _write(res: pd.DataFrame, out: str | os.PathLike | None) -> pd.DataFrame:
    """Write ``res`` to ``out`` atomically (when given); returns it."""
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(out).with_name(f".{Path(out).name}.tmp")
        res.to_csv(tmp, index=False)
        os.replace(tmp, out)
    return res
