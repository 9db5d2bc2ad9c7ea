"""The embedding cache: shards written atomically, a manifest, an index, and the reader.

Layout (docs/cache-format.md)::

    <cache>/                        one folder per model, default artifacts/cache/<model name>/
      <key>/                        one per (weights, preprocessing, dtype, l2, precision)
        manifest.json               what the key means + the list of complete shards
        emb_<blob>_<id>.npy         (rows, D) embeddings of one blob, row i <-> meta row i
        meta_<id>.parquet           sha256 (+ the path first seen) per row; written last = commit
        datasets/<name>.parquet     path -> sha256 + label columns of what one input read
        failures.csv                path, reason of the last run's bad images

A shard is complete iff its ``meta_<id>.parquet`` exists: embeddings are written first, each
file through a temp name + ``os.replace``, and the meta file last. Anything else is debris of a
killed run and is removed by the next writer. Rows are identified by the sha256 of the file's
bytes, so duplicates and renamed files are computed once.

This module imports only numpy, pandas, pyarrow and the standard library, so caches can be read
without torch or the rest of graft.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "graft-cache/1"
MANIFEST = "manifest.json"
INDEX = "index.parquet"  # graft before named datasets: one index shared by every extract of a key
DATASETS = "datasets"
LEGACY_DATASET = "index"  # the name an old key folder's index.parquet is read under
FAILURES = "failures.csv"
ID_WIDTH = 6
STORAGE_DTYPES = ("float32", "float16")
_META_RE = re.compile(r"^meta_(\d+)\.parquet$")
_EMB_RE = re.compile(r"^emb_(.+)_(\d+)\.npy$")
_DATASET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CacheError(ValueError):
    """A cache that cannot be used as asked (ambiguous key, unknown layer, locked, corrupt)."""


def default_cache_root() -> Path:
    """``$GRAFT_ARTIFACTS/cache`` or ``artifacts/cache`` under the current directory (as
    ``convert.paths.caches_root``, repeated here: this module must not import ``convert``)."""
    return Path(os.environ.get("GRAFT_ARTIFACTS") or "artifacts") / "cache"


def check_dataset_name(name: str) -> str:
    """A dataset name is a file name: letters, digits, ``.``, ``_``, ``-`` (``--dataset`` is checked here)."""
    if not isinstance(name, str) or not _DATASET_RE.match(name) or name.endswith(".parquet"):
        raise CacheError(f"--dataset {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    return name


def blob_file_stem(blob: str) -> str:
    """File-name-safe, reversible form of a blob name (``fc7/pre_relu7`` -> ``fc7%2Fpre_relu7``)."""
    return quote(blob, safe="")


def cache_key(config: Mapping[str, Any]) -> str:
    """Folder name of a key: readable prefix + hash of everything that changes the numbers."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(blob).hexdigest()[:16]
    l2 = "-l2" if config.get("l2") else ""
    return f"{config['dtype']}{l2}-{config.get('precision', 'fp32')}-{digest}"


def _atomic_write_bytes(path: Path, write, fsync: bool = True) -> None:
    """Write through ``<path>.<pid>.tmp`` then ``os.replace``: readers see old or new, never half.
    ``fsync=False`` keeps that against a killed process but not a power loss (for many small files
    whose reader checks them, where an fsync each would cost more than the write)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()))


def _write_parquet(path: Path, df: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    _atomic_write_bytes(path, lambda f: pq.write_table(table, f))


def _npy_rows(path: Path) -> tuple[int, ...] | None:
    """Shape from the .npy header only (no data read); None when unreadable."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
            return tuple(shape)
    except (OSError, ValueError):
        return None


def scan_shards(key_dir: Path) -> list[dict[str, Any]]:
    """Complete shards of a key folder, from the files themselves (the manifest is a summary).

    Pairs ``emb_<blob>_<id>.npy`` with ``meta_<id>.parquet`` by id, never by sort position, and
    drops (with a warning) any embedding file whose row count differs from its meta file.
    """
    names = os.listdir(key_dir) if key_dir.is_dir() else []
    metas = {m.group(1): n for n in names if (m := _META_RE.match(n))}
    embs: dict[str, dict[str, str]] = {}
    for n in names:
        if (m := _EMB_RE.match(n)) and m.group(2) in metas:
            embs.setdefault(m.group(2), {})[m.group(1)] = n
    shards = []
    for sid in sorted(metas, key=int):
        rows = pq.read_metadata(key_dir / metas[sid]).num_rows
        emb = {}
        for stem, fname in sorted(embs.get(sid, {}).items()):
            shape = _npy_rows(key_dir / fname)
            if shape is None or len(shape) != 2 or shape[0] != rows:
                warnings.warn(f"{key_dir / fname}: shape {shape} does not match {rows} rows in {metas[sid]}; ignored", stacklevel=2)
                continue
            emb[stem] = fname
        shards.append({"id": sid, "rows": rows, "meta": metas[sid], "emb": emb})
    return shards


# --------------------------------------------------------------------------------------------
# writer


class CacheWriter:
    """Appends embeddings to one key folder; owns an exclusive lock on it while open.

    The writer, not its caller, guarantees exactly-once: :meth:`needs` says which blobs an image
    still lacks, and :meth:`add` keeps only rows whose blob is missing. Rows are buffered and
    written as a shard every ``shard_size`` rows (or on :meth:`flush`), each shard holding a set
    of rows that all needed the same blobs.
    """

    def __init__(self, key_dir: Path, config: Mapping[str, Any], blobs: Sequence[str], shard_size: int = 4096,
                 info: Mapping[str, Any] | None = None) -> None:
        self.dir = Path(key_dir)
        self.config = dict(config)
        self.info = dict(info or {})  # descriptive only (model name, blob shapes): not part of the key
        self.blobs = list(blobs)
        self.shard_size = max(1, int(shard_size))
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.dir / ".lock", "a+")  # noqa: SIM115 (held for the writer's life)
        try:
            import fcntl

            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no locking
            pass
        except OSError as err:
            self._lock_file.close()
            raise CacheError(f"{self.dir} is being written by another extract run (lock held)") from err
        self._check_config()
        self._clean_debris()
        self.shards = scan_shards(self.dir)
        self.done: dict[str, set[str]] = {b: set() for b in self.blobs}
        stems = {blob_file_stem(b): b for b in self.blobs}
        for shard in self.shards:
            have = [stems[s] for s in shard["emb"] if s in stems]
            if have:
                shas = pq.read_table(self.dir / shard["meta"], columns=["sha256"]).column(0).to_pylist()
                for b in have:
                    self.done[b].update(shas)
        self._next_id = 1 + max((int(s["id"]) for s in self.shards), default=-1)
        self._buffers: dict[tuple[str, ...], list[tuple[list[str], list[str], dict[str, np.ndarray]]]] = {}
        self.rows_written = 0
        self._write_manifest()

    # -- setup --------------------------------------------------------------------------------

    def _check_config(self) -> None:
        path = self.dir / MANIFEST
        if not path.exists():
            return
        old = json.loads(path.read_text())
        if old.get("format") != FORMAT:
            raise CacheError(f"{path}: format {old.get('format')!r}, this graft writes {FORMAT!r}")
        if old.get("config") != json.loads(json.dumps(self.config)):
            raise CacheError(f"{path}: cache key folder holds a different configuration; refusing to mix")

    def _clean_debris(self) -> None:
        """Remove temp files and embeddings whose shard never committed (a killed run)."""
        names = os.listdir(self.dir)
        metas = {m.group(1) for n in names if (m := _META_RE.match(n))}
        for n in names:
            m = _EMB_RE.match(n)
            if n.endswith(".tmp") or (m and m.group(2) not in metas):
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / n).unlink()

    # -- exactly-once -------------------------------------------------------------------------

    def needs(self, sha: str) -> tuple[str, ...]:
        """Blobs (in request order) that image ``sha`` still lacks in this cache."""
        return tuple(b for b in self.blobs if sha not in self.done[b])

    def add(self, shas: Sequence[str], paths: Sequence[str], outputs: Mapping[str, np.ndarray]) -> None:
        """Queue computed rows (all requested blobs); rows/blobs already cached are dropped."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, sha in enumerate(shas):
            need = self.needs(sha)
            if need:
                groups.setdefault(need, []).append(i)
                for b in need:
                    self.done[b].add(sha)  # pending rows count as done: duplicates within a run
        for need, idx in groups.items():
            arrays = {b: self._finish(b, np.asarray(outputs[b])[idx]) for b in need}
            self._buffers.setdefault(need, []).append(([shas[i] for i in idx], [paths[i] for i in idx], arrays))
            if sum(len(s) for s, _, _ in self._buffers[need]) >= self.shard_size:
                self._flush_group(need)

    def _finish(self, blob: str, a: np.ndarray) -> np.ndarray:
        """Flatten to (rows, D), optionally L2-normalise (in float32), cast to the storage dtype."""
        a = np.asarray(a, dtype=np.float32).reshape(len(a), -1)
        if self.config.get("l2"):
            a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        return a.astype(self.config["dtype"], copy=False)

    # -- writing ------------------------------------------------------------------------------

    @property
    def pending_rows(self) -> int:
        return sum(len(s) for parts in self._buffers.values() for s, _, _ in parts)

    def flush(self) -> None:
        """Write every buffered row (call before exiting, also on Ctrl-C)."""
        for need in list(self._buffers):
            self._flush_group(need)

    def _flush_group(self, need: tuple[str, ...]) -> None:
        parts = self._buffers.pop(need, [])
        if not parts:
            return
        shas = [s for p in parts for s in p[0]]
        paths = [s for p in parts for s in p[1]]
        sid = f"{self._next_id:0{ID_WIDTH}d}"
        self._next_id += 1
        emb = {}
        for b in need:
            arr = np.concatenate([p[2][b] for p in parts])
            fname = f"emb_{blob_file_stem(b)}_{sid}.npy"
            _atomic_write_bytes(self.dir / fname, lambda f, arr=arr: np.save(f, arr, allow_pickle=False))
            emb[blob_file_stem(b)] = fname
        meta = pd.DataFrame({"sha256": pd.array(shas, dtype="string"), "path": pd.array(paths, dtype="string")})
        _write_parquet(self.dir / f"meta_{sid}.parquet", meta)  # the commit point of the shard
        self.shards.append({"id": sid, "rows": len(shas), "meta": f"meta_{sid}.parquet", "emb": emb})
        self.rows_written += len(shas)
        self._write_manifest()

    def _write_manifest(self, extra: Mapping[str, Any] | None = None) -> None:
        path = self.dir / MANIFEST
        old = json.loads(path.read_text()) if path.exists() else {}
        blobs = dict(old.get("blobs", {}))
        for shard in self.shards:
            for stem, fname in shard["emb"].items():
                if stem not in {blob_file_stem(b) for b in blobs}:
                    blob = next((b for b in self.blobs if blob_file_stem(b) == stem), None)
                    if blob is not None:
                        shape = _npy_rows(self.dir / fname)
                        blobs[blob] = {"file_stem": f"emb_{stem}", "dim": int(shape[1]) if shape else None}
        for b, shape in self.info.get("blob_shapes", {}).items():
            if b in blobs:
                blobs[b]["shape"] = shape
        rows = {b: sum(s["rows"] for s in self.shards if blob_file_stem(b) in s["emb"]) for b in blobs}
        manifest = {
            "format": FORMAT,
            "key": self.dir.name,
            "config": self.config,
            "model": self.info.get("model", old.get("model")),
            "blobs": blobs,
            "rows": rows,
            "shards": self.shards,
            "failures": FAILURES,
            "runs": old.get("runs", []),
            "datasets": old.get("datasets", {}),
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if extra:
            manifest.update(extra)
        _write_json(path, manifest)

    def record_run(self, info: Mapping[str, Any]) -> None:
        """Append a run summary (backend, precision, counts, time) to the manifest."""
        path = self.dir / MANIFEST
        runs = json.loads(path.read_text()).get("runs", []) if path.exists() else []
        self._write_manifest({"runs": (runs + [dict(info)])[-100:]})

    def write_dataset(self, name: str, records: pd.DataFrame, failed_paths: Iterable[str], *, source: str | None = None,
                      command: str = "extract", explicit: bool = True) -> int:
        """Write this run's (path, sha256, labels) as dataset ``name``; failed paths are dropped.

        A dataset is what one input read, so it is replaced, never merged: a re-run of the same
        folder mirrors the folder, and no run adds rows to a dataset another input made. A name
        derived from the input (``explicit=False``) that already belongs to another input is
        refused rather than overwritten.
        """
        self.check_dataset(name, source, explicit)
        failed = set(failed_paths)
        rows = records[~records["path"].isin(failed) & records["sha256"].notna()].reset_index(drop=True)
        (self.dir / DATASETS).mkdir(exist_ok=True)
        _write_parquet(self.dir / DATASETS / f"{name}.parquet", rows)
        datasets = self._datasets()
        datasets[name] = {"file": f"{DATASETS}/{name}.parquet", "rows": len(rows), "source": source, "command": command,
                          "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")}
        self._write_manifest({"datasets": datasets})
        return len(rows)

    def check_dataset(self, name: str, source: str | None, explicit: bool) -> None:
        """Raise before any work when ``name`` is not a valid name, or is derived and taken by another input."""
        check_dataset_name(name)
        old = self._datasets().get(name)
        if old is not None and not explicit and source is not None and old.get("source") not in (None, source):
            raise CacheError(f"dataset {name!r} in {self.dir} holds {old['source']}, not {source}; name this input with --dataset NAME")

    def _datasets(self) -> dict[str, Any]:
        path = self.dir / MANIFEST
        return dict(json.loads(path.read_text()).get("datasets", {})) if path.exists() else {}

    def write_failures(self, failures: pd.DataFrame) -> Path:
        """failures.csv (path, reason) of this run; replaced on every run."""
        path = self.dir / FAILURES
        _atomic_write_bytes(path, lambda f: f.write(failures[["path", "reason"]].to_csv(index=False).encode()))
        return path

    def close(self) -> None:
        self.flush()
        if not self._lock_file.closed:
            self._lock_file.close()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.flush()
        finally:
            self._lock_file.close()


# --------------------------------------------------------------------------------------------
# reader


def _resolve_model_dir(name_or_dir: str | os.PathLike, cache_root: str | os.PathLike | None) -> Path:
    p = Path(name_or_dir)
    if p.is_dir():
        return p
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    if (root / str(name_or_dir)).is_dir():
        return root / str(name_or_dir)
    raise CacheError(f"no cache for {str(name_or_dir)!r}: not a folder, and {root / str(name_or_dir)} does not exist (run `graft extract` first)")


def list_keys(name_or_dir: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Manifests of every key folder of a model's cache (or of the key folder itself)."""
    d = _resolve_model_dir(name_or_dir, cache_root)
    dirs = [d] if (d / MANIFEST).exists() else sorted(p for p in d.iterdir() if (p / MANIFEST).exists())
    out = []
    for k in dirs:
        m = json.loads((k / MANIFEST).read_text())
        if m.get("format") != FORMAT:
            continue
        m["_dir"] = str(k)
        out.append(m)
    return out


def list_datasets(key_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The datasets of one key folder: name -> {file, rows, source, command, updated}.

    The files are the truth (``datasets/<name>.parquet``); the manifest adds where each came from.
    An old key folder's ``index.parquet`` (every extract before named datasets) is the dataset
    ``index``.
    """
    key_dir = Path(key_dir)
    man = json.loads((key_dir / MANIFEST).read_text()).get("datasets", {}) if (key_dir / MANIFEST).exists() else {}
    out: dict[str, dict[str, Any]] = {}
    files = sorted((key_dir / DATASETS).glob("*.parquet")) if (key_dir / DATASETS).is_dir() else []
    if (key_dir / INDEX).exists() and LEGACY_DATASET not in {f.stem for f in files}:
        files.append(key_dir / INDEX)
    for f in files:
        name = LEGACY_DATASET if f.name == INDEX else f.stem
        info = dict(man.get(name, {}))
        if "updated" not in info:
            info["updated"] = _dt.datetime.fromtimestamp(f.stat().st_mtime, _dt.timezone.utc).isoformat(timespec="microseconds")
        info.setdefault("command", "extract")
        info.setdefault("source", None)
        info["rows"] = pq.read_metadata(f).num_rows
        info["file"] = str(f.relative_to(key_dir))
        out[name] = info
    return out


def _describe_datasets(datasets: Mapping[str, Mapping[str, Any]]) -> str:
    return ", ".join(f"{n} ({d['rows']} rows, {d['command']}, {d.get('source') or '?'})" for n, d in datasets.items()) or "none"


def choose_dataset(key_dir: str | os.PathLike, dataset: str | None = None) -> str | None:
    """``dataset`` if the key folder has it; by default the most recently extracted one (datasets
    ``predict`` wrote are never a default: they are what a head was asked about). None when no
    run has finished yet."""
    datasets = list_datasets(key_dir)
    if dataset is not None:
        if dataset not in datasets:
            raise CacheError(f"no dataset {dataset!r} in {key_dir}; datasets: {_describe_datasets(datasets)}")
        return dataset
    if not datasets:
        return None
    extracted = [n for n, d in datasets.items() if d.get("command") != "predict"]
    if not extracted:
        raise CacheError(f"{key_dir} holds only datasets predict wrote ({_describe_datasets(datasets)}); choose one with --dataset")
    return max(extracted, key=lambda n: datasets[n]["updated"])


def _describe(m: Mapping[str, Any]) -> str:
    c = m["config"]
    pp = c.get("preprocess", {})
    return (
        f"{m['key']} (blobs {sorted(m.get('blobs', {}))}, dtype={c.get('dtype')}, l2={c.get('l2')}, "
        f"precision={c.get('precision')}, channel_order={pp.get('channel_order')}, mean={pp.get('mean')}, "
        f"scale={pp.get('scale')}, resize={pp.get('resize')}, crop={pp.get('crop')})"
    )


def choose_key(
    name_or_dir: str | os.PathLike,
    layer: str | None = None,
    *,
    dtype: str | None = None,
    l2: bool | None = None,
    precision: str | None = None,
    key: str | None = None,
    dataset: str | None = None,
    cache_root: str | os.PathLike | None = None,
) -> tuple[Path, str]:
    """The one key folder holding ``layer`` (and the layer, when the cache holds only one blob):
    every reader chooses the same way, and raises the same :class:`CacheError` when it cannot."""
    keys = list_keys(name_or_dir, cache_root)
    if not keys:
        raise CacheError(f"no cache keys under {_resolve_model_dir(name_or_dir, cache_root)}")
    if layer is None:
        blobs = sorted({b for m in keys for b in m.get("blobs", {})})
        if len(blobs) != 1:
            raise CacheError(f"give layer=: the cache holds blobs {blobs}")
        layer = blobs[0]
    cands = [m for m in keys if layer in m.get("blobs", {})]
    if not cands:
        blobs = sorted({b for m in keys for b in m.get("blobs", {})})
        raise CacheError(f"no embeddings of layer {layer!r}; cached layers: {blobs}")
    if key is not None:
        cands = [m for m in cands if m["key"] == key]
    if dtype is not None:
        cands = [m for m in cands if m["config"].get("dtype") == dtype]
    if l2 is not None:
        cands = [m for m in cands if bool(m["config"].get("l2")) == bool(l2)]
    if precision is not None:
        cands = [m for m in cands if m["config"].get("precision") == precision]
    if dataset is not None and len(cands) > 1:
        cands = [m for m in cands if dataset in list_datasets(m["_dir"])] or cands
    if len(cands) != 1:
        listed = "; ".join(_describe(m) for m in [m for m in keys if layer in m.get("blobs", {})])
        what = "no cache key matches" if not cands else f"{len(cands)} cache keys hold layer {layer!r}"
        raise CacheError(f"{what}; choose with key=/dtype=/l2=/precision=: {listed}")
    return Path(cands[0]["_dir"]), layer


def load_embeddings(
    name_or_dir: str | os.PathLike,
    layer: str | None = None,
    *,
    dtype: str | None = None,
    l2: bool | None = None,
    precision: str | None = None,
    key: str | None = None,
    dataset: str | None = None,
    cache_root: str | os.PathLike | None = None,
    mmap: bool = True,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Embeddings of one blob and their rows: ``X`` (N, D) and ``meta`` (path, sha256, labels).

    ``name_or_dir`` is a model name (looked up under ``artifacts/cache/``), a ``--cache`` folder,
    or one key folder. When several keys hold ``layer`` (two preprocessings, dtypes, ...), choose
    with ``dtype=``, ``l2=``, ``precision=`` or ``key=``; otherwise the error lists them.

    ``dataset`` names what one extract read (default: the key's most recently extracted dataset;
    ``meta.attrs["dataset"]`` says which). One row per path of the dataset: an image present
    under two paths (two labels) appears twice.
    ``X`` is a read-only memory map when the rows are exactly one shard in order; otherwise a
    gathered in-memory array. Indexed paths without embeddings (an interrupted or failed run)
    are left out with a warning.
    """
    key_dir, layer = choose_key(name_or_dir, layer, dtype=dtype, l2=l2, precision=precision, key=key, dataset=dataset,
                                cache_root=cache_root)
    return read_key(key_dir, layer, mmap=mmap, dataset=dataset)


def _blob_store(key_dir: Path, blob: str, mmap: bool = True) -> tuple[list[dict], list[np.ndarray], dict[str, tuple[int, int]]]:
    """``blob``'s complete shards, their arrays, and where each content hash's row is:
    {sha256: (shard, row)}."""
    stem = blob_file_stem(blob)
    shards = [s for s in scan_shards(key_dir) if stem in s["emb"]]
    arrays = [np.load(key_dir / s["emb"][stem], mmap_mode="r" if mmap else None) for s in shards]
    where: dict[str, tuple[int, int]] = {}
    for si, s in enumerate(shards):
        for ri, sha in enumerate(pq.read_table(key_dir / s["meta"], columns=["sha256"]).column(0).to_pylist()):
            where.setdefault(sha, (si, ri))  # a duplicate (two racing writers) is read once
    return shards, arrays, where


def _warn_missing(key_dir: Path, n: int, dataset: str | None, blob: str, stacklevel: int) -> None:
    """One warning, the same from every reader, for dataset rows without an embedding."""
    warnings.warn(f"{key_dir}: {n} image(s) of dataset {dataset!r} have no {blob!r} embedding yet (interrupted or failed run); left out",
                  stacklevel=stacklevel + 1)


def read_rows(key_dir: Path, blob: str, shas: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of ``blob`` by content hash, from the shards alone (not the index): the rows
    found, in order, and a mask of which ``shas`` had one."""
    _, arrays, where = _blob_store(key_dir, blob)
    ok = np.array([sha is not None and sha in where for sha in shas], dtype=bool)
    rows = [arrays[where[sha][0]][where[sha][1]] for sha, k in zip(shas, ok) if k]
    dim = int(arrays[0].shape[1]) if arrays else 0
    return (np.stack(rows) if rows else np.empty((0, dim), np.float32)), ok


def read_key(key_dir: Path, blob: str, mmap: bool = True, dataset: str | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """``(X, meta)`` of ``blob`` and one dataset's rows from one key folder (see :func:`load_embeddings`)."""
    key_dir = Path(key_dir)
    name = choose_dataset(key_dir, dataset)
    shards, arrays, where = _blob_store(key_dir, blob, mmap=mmap)
    if name is not None:
        meta = pd.read_parquet(key_dir / list_datasets(key_dir)[name]["file"])
    else:  # no run finished yet: one row per cached image, paths as first seen
        meta = pd.concat([pd.read_parquet(key_dir / s["meta"]) for s in shards], ignore_index=True) if shards else pd.DataFrame({"sha256": [], "path": []})
        meta = meta.drop_duplicates("sha256")[["path", "sha256"]]
    have = meta["sha256"].isin(where.keys())
    if not have.all():
        _warn_missing(key_dir, int((~have).sum()), name, blob, stacklevel=2)
        meta = meta[have]
    meta = meta.reset_index(drop=True)
    meta.attrs["dataset"] = name
    dim = int(arrays[0].shape[1]) if arrays else 0
    dtype = arrays[0].dtype if arrays else np.dtype(np.float32)
    pos = [where[s] for s in meta["sha256"]]
    if len(arrays) == 1 and [r for _, r in pos] == list(range(arrays[0].shape[0])):
        return arrays[0], meta
    X = np.empty((len(pos), dim), dtype=dtype)
    if pos:
        si = np.fromiter((p[0] for p in pos), dtype=np.int64, count=len(pos))
        ri = np.fromiter((p[1] for p in pos), dtype=np.int64, count=len(pos))
        for s, arr in enumerate(arrays):
            sel = np.nonzero(si == s)[0]
            if len(sel):
                X[sel] = arr[ri[sel]]
    return X, meta


# --------------------------------------------------------------------------------------------
# streaming reader: caches larger than memory


def iter_embeddings(
    name_or_dir: str | os.PathLike,
    layer: str | None = None,
    *,
    batch_size: int = 65536,
    dtype: str | None = None,
    l2: bool | None = None,
    precision: str | None = None,
    key: str | None = None,
    dataset: str | None = None,
    cache_root: str | os.PathLike | None = None,
) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """:func:`load_embeddings` in chunks of at most ``batch_size`` rows, for caches larger than memory.

    The same key, dataset and rows in the same order: ``pd.concat`` of the ``meta`` chunks (each
    indexed by its global row numbers) is load_embeddings' ``meta``, ``np.concatenate`` of the
    ``X`` chunks its ``X``. Memory holds the content-hash index of the shards (about 200 bytes a
    row) plus one chunk: the dataset is read in parquet batches, each chunk's rows gathered from
    memory-mapped shards. Errors about the key or dataset are raised here, not on the first chunk.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    key_dir, layer = choose_key(name_or_dir, layer, dtype=dtype, l2=l2, precision=precision, key=key, dataset=dataset,
                                cache_root=cache_root)
    name = choose_dataset(key_dir, dataset)
    index = _ShaIndex(key_dir, layer)
    if name is None:
        pieces = index.first_seen_pieces(batch_size)
    else:
        path = key_dir / list_datasets(key_dir)[name]["file"]
        missing = index.count_missing(path, batch_size)
        if missing:
            _warn_missing(key_dir, missing, name, layer, stacklevel=2)
        pieces = index.dataset_pieces(path, batch_size)
    return _chunks(index, pieces, int(batch_size), name)


class _ShaIndex:
    """Where each content hash's row of one blob is: a pandas Index over the shards' sha256
    (first occurrence kept, as :func:`_blob_store`) and parallel shard / row arrays, so a chunk
    is located with one vectorised ``get_indexer`` instead of a dict lookup per row."""

    def __init__(self, key_dir: Path, blob: str) -> None:
        self.dir = key_dir
        stem = blob_file_stem(blob)
        self.shards = [s for s in scan_shards(key_dir) if stem in s["emb"]]
        self.files = [key_dir / s["emb"][stem] for s in self.shards]
        shas = [pq.read_table(key_dir / s["meta"], columns=["sha256"]).column(0).to_numpy(zero_copy_only=False)
                for s in self.shards]
        every = np.concatenate(shas) if shas else np.empty(0, object)
        shard = np.repeat(np.arange(len(shas), dtype=np.int32), [len(a) for a in shas])
        row = np.concatenate([np.arange(len(a), dtype=np.int64) for a in shas]) if shas else np.empty(0, np.int64)
        self.index = pd.Index(every, dtype=object, copy=False)
        del shas, every
        if not self.index.is_unique:  # a duplicate (two racing writers) is read once, from its first shard
            first = ~self.index.duplicated(keep="first")
            self.index, shard, row = self.index[first], shard[first], row[first]
        self.shard, self.row = shard, row
        self.dim, self.dtype = 0, np.dtype(np.float32)
        if self.files:
            head = np.load(self.files[0], mmap_mode="r")
            self.dim, self.dtype = int(head.shape[1]), head.dtype

    def locate(self, shas: pd.Series | np.ndarray) -> np.ndarray:
        """Position in the index of each hash; -1 where the blob has no row for it."""
        return self.index.get_indexer(pd.Index(shas, dtype=object)) if len(self.index) else np.full(len(shas), -1, np.int64)

    def count_missing(self, dataset_file: Path, batch_size: int) -> int:
        """Dataset rows without an embedding, read one sha256 batch at a time (for the warning up front)."""
        pf = pq.ParquetFile(dataset_file)
        return sum(int((self.locate(b.column(0).to_numpy(zero_copy_only=False)) < 0).sum())
                   for b in pf.iter_batches(batch_size=batch_size, columns=["sha256"]))

    def dataset_pieces(self, dataset_file: Path, batch_size: int) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
        """(meta rows, index positions) of a dataset's rows that have an embedding, in file order."""
        pf = pq.ParquetFile(dataset_file)
        for batch in pf.iter_batches(batch_size=batch_size):
            meta = _frame(batch, pf.schema_arrow)
            pos = self.locate(meta["sha256"].to_numpy(dtype=object))
            keep = pos >= 0
            yield (meta if keep.all() else meta[keep]), pos[keep]

    def first_seen_pieces(self, batch_size: int) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
        """No dataset yet: one row per cached image (path as first seen), shard by shard, as
        :func:`read_key` builds it from the concatenated shard metas."""
        for si, s in enumerate(self.shards):
            pf = pq.ParquetFile(self.dir / s["meta"])
            start = 0
            for batch in pf.iter_batches(batch_size=batch_size):
                meta = _frame(batch, pf.schema_arrow)
                pos = self.locate(meta["sha256"].to_numpy(dtype=object))
                rows = np.arange(start, start + len(meta))
                start += len(meta)
                first = (pos >= 0) & (self.shard[pos] == si) & (self.row[pos] == rows)
                yield meta[first][["path", "sha256"]], pos[first]

    def gather(self, pos: np.ndarray) -> np.ndarray:
        """The embeddings at index positions ``pos`` (an in-memory array), each shard's rows read
        in sorted order from its memory map."""
        X = np.empty((len(pos), self.dim), self.dtype)
        if not len(pos):
            return X
        shard, row = self.shard[pos], self.row[pos]
        order = np.lexsort((row, shard))
        for sel in np.split(order, np.flatnonzero(np.diff(shard[order])) + 1):
            arr = np.load(self.files[shard[sel[0]]], mmap_mode="r")
            X[sel] = arr[row[sel]]
            del arr
        return X


def _frame(batch: pa.RecordBatch, schema: pa.Schema) -> pd.DataFrame:
    """A parquet batch as ``pd.read_parquet`` would convert it (the file's pandas metadata kept)."""
    return pa.Table.from_batches([batch]).replace_schema_metadata(schema.metadata).to_pandas()


def _chunks(index: _ShaIndex, pieces: Iterator[tuple[pd.DataFrame, np.ndarray]], batch_size: int,
            name: str | None) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """Re-cut pieces of any length into chunks of exactly ``batch_size`` rows (the last may be
    shorter), index them by global row number and gather their embeddings."""
    buf: list[tuple[pd.DataFrame, np.ndarray]] = []
    held, start = 0, 0
    for meta, pos in pieces:
        if len(meta):
            buf.append((meta, pos))
            held += len(meta)
        while held >= batch_size:
            out, buf, held = _take(buf, batch_size), _rest(buf, batch_size), held - batch_size
            yield _chunk(index, out, start, name)
            start += batch_size
    if held:
        yield _chunk(index, buf, start, name)


def _take(buf: list[tuple[pd.DataFrame, np.ndarray]], n: int) -> list[tuple[pd.DataFrame, np.ndarray]]:
    """The first ``n`` rows of the buffered pieces."""
    out, got = [], 0
    for meta, pos in buf:
        k = min(n - got, len(meta))
        out.append((meta.iloc[:k], pos[:k]))
        got += k
        if got == n:
            break
    return out


def _rest(buf: list[tuple[pd.DataFrame, np.ndarray]], n: int) -> list[tuple[pd.DataFrame, np.ndarray]]:
    """The buffered pieces after their first ``n`` rows."""
    out, skip = [], n
    for meta, pos in buf:
        if skip >= len(meta):
            skip -= len(meta)
            continue
        out.append((meta.iloc[skip:], pos[skip:]))
        skip = 0
    return out


def _chunk(index: _ShaIndex, parts: list[tuple[pd.DataFrame, np.ndarray]], start: int,
           name: str | None) -> tuple[np.ndarray, pd.DataFrame]:
    """One ``(X, meta)`` chunk: meta rows numbered from ``start``, their embeddings gathered."""
    meta = pd.concat([m for m, _ in parts]) if len(parts) > 1 else parts[0][0].copy()
    meta.index = pd.RangeIndex(start, start + len(meta))
    meta.attrs["dataset"] = name
    return index.gather(np.concatenate([p for _, p in parts])), meta


def embedding_shape(
    name_or_dir: str | os.PathLike,
    layer: str | None = None,
    *,
    dtype: str | None = None,
    l2: bool | None = None,
    precision: str | None = None,
    key: str | None = None,
    dataset: str | None = None,
    cache_root: str | os.PathLike | None = None,
) -> tuple[int, int]:
    """(rows, dim) that :func:`load_embeddings` would return at most, from file headers alone
    (dataset row count, .npy shapes): a memory check made before anything is read."""
    key_dir, layer = choose_key(name_or_dir, layer, dtype=dtype, l2=l2, precision=precision, key=key, dataset=dataset,
                                cache_root=cache_root)
    stem = blob_file_stem(layer)
    shards = [s for s in scan_shards(key_dir) if stem in s["emb"]]
    shape = _npy_rows(key_dir / shards[0]["emb"][stem]) if shards else None
    dim = int(shape[1]) if shape else 0
    name = choose_dataset(key_dir, dataset)
    rows = list_datasets(key_dir)[name]["rows"] if name is not None else sum(s["rows"] for s in shards)
    return int(rows), dim
