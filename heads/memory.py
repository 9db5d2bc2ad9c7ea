"""Refuse a fit that cannot fit in memory, before any embedding is read (rather than swap).

The estimate is made from shapes alone (``extract.cache.embedding_shape``: dataset row count,
.npy headers), since ``load_embeddings`` may hand back a memory map that costs nothing until read.
"""

from __future__ import annotations

import os
import re
import sys

from convert.errors import GraftError

#: float32 copies of the (rows x dim) features alive at the peak of ``fit_head``, counted from the
#: code: the loaded X (gathered from the shards), ``prepare``'s labelled rows ``X[rows]``, the
#: train/test float32 split, then inside the search the preprocessed / centred training copy
#: (``l2_rows`` / ``Xp - mu0`` or ``FeaturePreprocessor``'s ``X.copy()``) and a CV fold's
#: ``X[tr]`` beside it: about five; fold-sized temporaries and the solvers' float64 state
#: (d x d or d x k) come on top, so five is a floor, not a margin.
FIT_COPIES = 5
ENV = "GRAFT_MEMORY_LIMIT"
_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """``123``, ``512M``, ``2G``, ``1.5GiB`` -> bytes (binary multiples)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise GraftError(f"{ENV}={text!r}: expected bytes, e.g. 800000000, 512M or 2G")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])


def available_memory() -> int | None:
    """Bytes the fit may use: ``$GRAFT_MEMORY_LIMIT`` if set, else what the OS says is available
    (Linux ``MemAvailable``, elsewhere free physical pages); None when unknown (no check)."""
    if os.environ.get(ENV, "").strip():
        return parse_bytes(os.environ[ENV])
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def fit_bytes(rows: int, dim: int) -> int:
    """Estimated peak bytes of ``fit_head`` on ``rows`` x ``dim`` features (see :data:`FIT_COPIES`)."""
    return int(rows) * int(dim) * 4 * FIT_COPIES


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_fit_memory(rows: int, dim: int) -> None:
    """Raise GraftError (one line, exit status 2) when the fit's estimate exceeds the memory available."""
    avail = available_memory()
    need = fit_bytes(rows, dim)
    if avail is None or need <= avail:
        return
    raise GraftError(
        f"fit-head on {rows} rows x {dim} dims needs about {_size(need)} ({FIT_COPIES} float32 copies of the features) "
        f"but {_size(avail)} is available{f' ({ENV})' if os.environ.get(ENV, '').strip() else ''}; "
        "fit a smaller extracted dataset (--dataset NAME), or stream the cache with extract.iter_embeddings into an "
        "incremental estimator (e.g. SGDClassifier.partial_fit)"
    )
