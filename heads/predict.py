"""``predict``: images -> extract's pipeline and cache -> the saved head -> a CSV.

Features come from ``extract.pipeline.extract`` with the preprocessing, storage dtype, L2 flag
and precision recorded in the head's card, into the model's usual cache, so images already seen
are not computed again. The head is loaded only after the cache key it read is checked against
the card (model weights, blob, preprocessing): a mismatch is an error naming each difference.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from convert.errors import GraftError
from heads.persist import check_card, load_head, read_card

PREPROCESS_OVERRIDES = ("mean", "scale", "channel_order", "resize", "crop")


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
) -> pd.DataFrame:
    """Predict every image of a folder (or CSV); returns the table and writes it to ``out`` if given.

    Images that cannot be read get an empty prediction and their reason in ``error``.
    """
    from extract.cache import read_key
    from extract.pipeline import extract
    from extract.sources import load_records

    card = read_card(head_dir)
    blob = card["layer"]
    where = model or card["model"].get("dir") or card["model"].get("name")
    cfg = (card.get("cache") or {}).get("config") or {}
    pp = cfg.get("preprocess") or {}
    overrides = {k: pp.get(k) for k in PREPROCESS_OVERRIDES if k in pp}
    try:
        records = load_records(images=images, csv=csv, root=root, path_column=path_column)
        summary, failures = extract(
            str(where), [blob], records, cache=cache, preprocess=overrides or None, backend=backend, device=device,
            precision=cfg.get("precision") or "auto", batch_size=batch_size, workers=workers,
            dtype=cfg.get("dtype") or "float32", l2=bool(cfg.get("l2", False)), progress=progress,
        )
    except (ValueError, OSError) as err:  # extract's SourceError / CacheError / BackendError are ValueErrors
        if isinstance(err, FileNotFoundError):
            raise
        raise GraftError(str(err)) from err
    key_dir = Path(summary.cache_dir)
    import json

    key_cfg = json.loads((key_dir / "manifest.json").read_text()).get("config")
    diffs = check_card(card, weights_sha256=(key_cfg or {}).get("weights_sha256"), layer=blob, cache_config=key_cfg if cfg else None)
    if diffs:
        raise GraftError(f"head {head_dir} does not match the features just extracted: " + "; ".join(diffs))
    X, meta = read_key(key_dir, blob)
    row_of = {p: i for i, p in enumerate(meta["path"].astype(str))}
    sha_row = {s: i for i, s in enumerate(meta["sha256"].astype(str))}
    paths = records["path"].astype(str).tolist()
    shas = records["sha256"].astype(str).tolist() if "sha256" in records else [None] * len(paths)
    rows = [row_of.get(p, sha_row.get(s, -1) if s else -1) for p, s in zip(paths, shas)]
    ok = np.array([r >= 0 for r in rows], dtype=bool)
    est, card = load_head(head_dir, layer=blob, feature_dim=int(X.shape[1]) if len(X) else None)
    res = pd.DataFrame({"path": paths})
    if "rel_path" in records:
        res["rel_path"] = records["rel_path"].to_numpy()
    pred = predict_frame(est, np.asarray(X[[r for r in rows if r >= 0]], np.float32), card["task"]["kind"]) if ok.any() else pd.DataFrame()
    for col in pred.columns:
        full = pd.Series([None] * len(paths), dtype=object)
        full[ok] = pred[col].to_numpy()
        res[col] = full
    reasons = dict(zip(failures["path"].astype(str), failures["reason"].astype(str))) if len(failures) else {}
    res["error"] = [reasons.get(p, "" if k else "no features") for p, k in zip(paths, ok)]
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(out).with_name(f".{Path(out).name}.tmp")
        res.to_csv(tmp, index=False)
        os.replace(tmp, out)
    return res
