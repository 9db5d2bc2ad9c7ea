"""The default ``fit-head`` against scikit-learn written by hand, side by side on the same features.

    .venv/bin/python bench/bench_heads_default.py --faces --synthetic 20000x4096

For each task, on the same train / test rows:

- **graft**: ``heads.fit.fit_head`` with every default (``--head auto``: logreg, ridge and mlp
  searched by CV; refit; test report; learning curve; plots; head saved) — the work of
  ``fit-head --task ...`` after the cache is read;
- **scikit-learn**: ``make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=5))`` for
  classification, ``make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 20), cv=5))``
  for regression: fit, then predict the test rows.

Feature sets: ``--faces``: open_nsfw ``pool`` (1,024-d) of the test-bed faces, extracted with
graft once (cached under ``artifacts/bench/``), tasks gender (gender-data rows) and age
(age-data rows), their own train/test split; ``--synthetic NxD``: class-structured features as
in ``bench/bench_heads.py`` (10 classes) and a regression target linear in the latent factors,
80/20 split. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TESTBED = REPO.parent / "shared" / "testbed"
FACES = TESTBED / "faces" / "imdbwiki"
NSFW = TESTBED / "caffe" / "open_nsfw"
WORK = REPO / "artifacts" / "bench" / "heads-default"


def faces_features() -> tuple[np.ndarray, pd.DataFrame]:
    """open_nsfw pool of every test-bed face, with labels.csv's columns (extracted once)."""
    from extract import load_embeddings

    pkg, cache = WORK / "open_nsfw", WORK / "cache"
    if not (pkg / "manifest.json").exists():
        subprocess.run([sys.executable, "cli.py", "convert", "--prototxt", str(NSFW / "deploy.prototxt"), "--caffemodel",
                        str(NSFW / "resnet_50_1by2_nsfw.caffemodel"), "--name", "open_nsfw", "--out", str(pkg),
                        "--resize", "256", "--crop", "224", "--mean", "104,117,123"], cwd=REPO, check=True)
    subprocess.run([sys.executable, "cli.py", "extract", "--model", str(pkg), "--layer", "pool", "--csv", str(FACES / "labels.csv"),
                    "--path-column", "file", "--cache", str(cache), "--no-progress"], cwd=REPO, check=True)
    X, meta = load_embeddings(cache, layer="pool")
    return np.asarray(X, np.float32), meta


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    from bench.bench_heads import make_data

    X, y = make_data(n, dim, 10, seed)
    rng = np.random.default_rng(seed + 1)
    latent = X[:, :64] @ rng.standard_normal((64,), dtype=np.float32)
    age = 40 + 8 * (latent - latent.mean()) / latent.std() + rng.normal(0, 4, n)
    split = np.where(rng.random(n) < 0.8, "train", "test")
    return X, pd.DataFrame({"path": [f"s{i}" for i in range(n)], "sha256": [f"{i:064x}" for i in range(n)],
                            "label": y, "age": age, "split": split})


def by_hand(kind: str, Xtr, ytr, Xte, yte) -> tuple[float, float]:
    """(seconds, test accuracy or MAE) of the hand-written scikit-learn baseline."""
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "classification":
        model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=5))
    else:
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 20), cv=5))
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(Xtr, ytr)
    pred = model.predict(Xte)
    dt = time.perf_counter() - t
    return dt, float(np.mean(pred == yte)) if kind == "classification" else float(np.mean(np.abs(pred - yte)))


def with_graft(X, meta, task: str, column: str, kind: str, where: list[str] | None) -> tuple[float, float, dict]:
    from heads.fit import fit_head
    from heads.tasks import resolve_task

    spec = resolve_task(task if column is None else None, column, kind if column else None)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = fit_head(X, meta, spec, model={"name": "bench", "weights_sha256": None, "dir": None}, layer="pool",
                       where=where, out=Path(tmp) / "head")
        dt = time.perf_counter() - t
    m = res.card["metrics"]["test"]
    return dt, float(m["accuracy"] if kind == "classification" else m["mae"]), res.card


def rows_of(meta: pd.DataFrame, column: str, where: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    keep = meta[column].notna().to_numpy().copy()
    for k, v in where.items():
        keep &= (meta[k].astype(str) == v).to_numpy()
    tr = keep & (meta["split"] == "train").to_numpy()
    te = keep & (meta["split"] == "test").to_numpy()
    return np.nonzero(tr)[0], np.nonzero(te)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", action="store_true", help="open_nsfw pool of the test-bed faces")
    ap.add_argument("--synthetic", action="append", default=[], metavar="NxD", help="synthetic features, e.g. 100000x4096")
    args = ap.parse_args()
    sets = []
    if args.faces:
        X, meta = faces_features()
        sets.append(("test-bed faces, open_nsfw pool", X, meta, [("gender", None, "classification", {"task": "gender-data"}),
                                                                   ("age", None, "regression", {"task": "age-data"})]))
    for spec in args.synthetic:
        n, d = (int(v) for v in spec.lower().split("x"))
        X, meta = synthetic(n, d)
        sets.append((f"synthetic {n:,} x {d:,}", X, meta, [("label", "label", "classification", {}), ("age", "age", "regression", {})]))
    out = []
    for name, X, meta, tasks in sets:
        for task, column, kind, where in tasks:
            tr, te = rows_of(meta, column or ("gender" if task == "gender" else "age_approx"), where)
            col = column or ("gender" if task == "gender" else "age_approx")
            ytr, yte = meta[col].to_numpy()[tr], meta[col].to_numpy()[te]
            if kind == "regression":
                ytr, yte = ytr.astype(float), yte.astype(float)
            else:
                ytr, yte = ytr.astype(str), yte.astype(str)
            s_t, s_m = by_hand(kind, X[tr], ytr, X[te], yte)
            g_t, g_m, card = with_graft(X, meta, task, column, kind, [f"{k}={v}" for k, v in where.items()] or None)
            out.append((name, task, len(tr), len(te), X.shape[1], g_t, g_m, s_t, s_m, card["search"]["best"], kind))
            print(f"{name} {task}: graft {g_t:.1f} s ({g_m:.4f}), scikit-learn {s_t:.1f} s ({s_m:.4f})", file=sys.stderr)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}\n")
    print("| features | task | train / test | graft default s | scikit-learn s | graft / sklearn time | graft test | sklearn test | graft chose |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for name, task, ntr, nte, _d, g_t, g_m, s_t, s_m, best, kind in out:
        metric = "acc" if kind == "classification" else "MAE"
        print(f"| {name} | {task} | {ntr:,} / {nte:,} | {g_t:.1f} | {s_t:.1f} | **{g_t / s_t:.2f}x** | {metric} {g_m:.4f} | "
              f"{metric} {s_m:.4f} | {best['head']}/{best['preprocess']}, alpha {best['alpha']:.3g} |")


if __name__ == "__main__":
    main()
