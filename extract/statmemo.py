"""A stat memo: (path, size, mtime_ns, ctime_ns, inode, device) -> sha256, so a re-run over files
already hashed reads none of them.

Images are identified by the sha256 of their bytes; hashing 2,267 JPEGs means reading them all
again on every run. The memo (``files.parquet`` next to a model's key folders) remembers each
file's stat signature and hash, as git's index and rsync do, and a signature that still matches
stands for the hash. Two guards keep it honest:

- a file modified within :data:`RACY_S` of being hashed is not memoised (its mtime could repeat
  for different contents, git's "racily clean" problem);
- every run re-hashes a few memo hits at random (:data:`SPOT_CHECKS`); one mismatch and the whole
  memo is dropped for that run (a file system whose timestamps lie, a restored backup).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pandas as pd

MEMO = "files.parquet"
RACY_S = 2.0
SPOT_CHECKS = 8
_COLUMNS = ("path", "size", "mtime_ns", "ctime_ns", "inode", "device", "sha256")

Signature = tuple[int, int, int, int, int]


def signature(st: os.stat_result) -> Signature:
    """What must be unchanged for a memoised hash to stand: size, mtime, ctime, inode, device."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class StatMemo:
    """The memo of one cache folder; :meth:`lookup` is a stat per path, :meth:`save` rewrites the file atomically."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / MEMO
        self._known: dict[str, tuple[Signature, str]] = {}
        self._new: dict[str, tuple[Signature, str]] = {}
        if self.path.exists():
            with contextlib.suppress(Exception):  # an unreadable memo is only a slower run
                df = pd.read_parquet(self.path)
                for row in df.itertuples(index=False):
                    self._known[row.path] = ((row.size, row.mtime_ns, row.ctime_ns, row.inode, row.device), row.sha256)

    def __len__(self) -> int:
        return len(self._known)

    def lookup(self, path: str) -> str | None:
        """The memoised sha256 of ``path`` if its stat signature is unchanged, else None."""
        hit = self._known.get(path)
        if hit is None:
            return None
        try:
            sig = signature(os.stat(path))
        except OSError:
            return None
        return hit[1] if hit[0] == sig else None

    def remember(self, path: str, st: os.stat_result, sha: str, hashed_at: float | None = None) -> None:
        """Memoise ``sha`` for ``path`` as stat'ed before reading (unless modified too recently)."""
        now = time.time() if hashed_at is None else hashed_at
        if now - st.st_mtime_ns / 1e9 < RACY_S:
            return
        self._new[path] = (signature(st), sha)

    def spot_check(self, hits: Mapping[str, str], rehash: Callable[[str], str | None], k: int = SPOT_CHECKS,
                   seed: int | None = None) -> bool:
        """Re-hash up to ``k`` random memo hits; False (and the memo forgotten) on any mismatch."""
        rng = random.Random(seed)
        sample = rng.sample(sorted(hits), min(k, len(hits)))
        if all(rehash(p) == hits[p] for p in sample):
            return True
        self._known.clear()
        return False

    def forget(self, paths: Iterable[str]) -> None:
        for p in paths:
            self._known.pop(p, None)

    def save(self) -> None:
        """Merge this run's hashes into the file (write to a temp name, then rename)."""
        if not self._new:
            return
        merged = {**self._known, **self._new}
        df = pd.DataFrame([(p, *sig, sha) for p, (sig, sha) in merged.items()], columns=list(_COLUMNS))
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            df.to_parquet(tmp, index=False)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache folder: the memo is an optimisation, never a failure
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._known = merged
        self._new = {}
