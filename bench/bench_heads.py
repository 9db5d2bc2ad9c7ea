"""Time the heads' hyper-parameter search + refit on large synthetic features with class structure.

    python bench/bench_heads.py --n 10000,30000,100000 --dim 4096 --heads ridge,logreg

Features: ``k`` class centres in a 64-d latent space, mapped to ``dim`` through a fixed random
matrix, plus isotropic noise, ReLU-clipped like a CNN's fc/pool blob; float32. Every run uses
graft's default search (k-fold CV up to 20,000 training rows, one 20 % validation fold above),
on the training split (80 %), then refits the chosen penalty on all training rows and scores the
20 % test rows. Also times ridge with 1 penalty vs the default 20, to show the shared
decomposition. Prints a Markdown table; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heads.search import fit_best, search  # noqa: E402


def make_data(n: int, dim: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = rng.standard_normal((k, 64)).astype(np.float32) * 0.35
    latent = centres[y] + rng.standard_normal((n, 64), dtype=np.float32)
    proj = rng.standard_normal((64, dim), dtype=np.float32) / 8.0
    X = rng.standard_normal((n, dim), dtype=np.float32)
    X += latent @ proj
    np.maximum(X, 0.0, out=X)
    return X, y


def run(n: int, dim: int, k: int, head: str, alphas: list[float] | None, seed: int = 0) -> dict:
    X, y = make_data(n, dim, k, seed)
    n_tr = int(0.8 * n)
    Xtr, ytr, Xte, yte = X[:n_tr], y[:n_tr], X[n_tr:], y[n_tr:]
    t0 = time.perf_counter()
    res = search(Xtr, ytr, kind="classification", heads=[head], alphas=alphas, seed=seed)
    t1 = time.perf_counter()
    est = fit_best(Xtr, ytr, res, kind="classification", seed=seed)
    t2 = time.perf_counter()
    acc = float((est.predict(Xte) == yte).mean())
    return {
        "n": n, "n_train": n_tr, "dim": dim, "classes": k, "head": head, "penalties": len({r["alpha"] for r in res.table}),
        "cv": res.cv, "search_s": round(t1 - t0, 1), "refit_s": round(t2 - t1, 1), "total_s": round(t2 - t0, 1),
        "alpha": res.best["alpha"], "test_accuracy": round(acc, 4),
        "majority_baseline": round(float(np.bincount(yte).max() / len(yte)), 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="10000,30000,100000")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--heads", default="ridge,logreg")
    ap.add_argument("--single-penalty", action="store_true", help="also time ridge with one penalty")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    rows = []
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}", flush=True)
    print("| head | N (train) | penalties | CV | search s | refit s | total s | test acc | majority |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for n in (int(v) for v in args.n.split(",")):
        plans = [(h, None) for h in args.heads.split(",")]
        if args.single_penalty and "ridge" in args.heads:
            plans.insert(1, ("ridge", [float(0.01 * 0.8 * n)]))
        for head, alphas in plans:
            r = run(n, args.dim, args.classes, head, alphas)
            rows.append(r)
            print(f"| {r['head']} | {r['n']:,} ({r['n_train']:,}) | {r['penalties']} | {r['cv']} | {r['search_s']} | "
                  f"{r['refit_s']} | {r['total_s']} | {r['test_accuracy']} | {r['majority_baseline']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
