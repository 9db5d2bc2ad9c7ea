"""The extraction loop: hash -> skip what is cached -> decode in workers -> infer -> shard.

Images are identified by the sha256 of their bytes, so the loop computes each distinct image once
per cache key: duplicates, renamed files and everything a killed run had committed are skipped.
Decoding runs ahead in a thread pool (OpenCV, PIL and numpy release the GIL) while the main thread runs
the network, so the two overlap. Interrupted runs lose at most the rows not yet flushed to a shard.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from convert.package import sha256_file
from extract.backends import device_kind, submit
from extract.cache import CacheWriter
from extract.preprocess import ImageError, Preprocess
from extract.statmemo import StatMemo


@dataclass(frozen=True)
class Dataset:
    """Where a run's rows (path, sha256, labels) go: one named dataset of the key folder.

    ``explicit`` is False for a name derived from the input, which may then not take over a
    dataset another input wrote; ``command`` is ``predict`` for the images a head was asked
    about, which fit-head never picks by default."""

    name: str
    source: str | None = None
    command: str = "extract"
    explicit: bool = False


@dataclass
class Summary:
    """What a run did; printed by the CLI and appended to the cache manifest."""

    images: int = 0  # rows in the input
    unique: int = 0  # distinct contents among the readable ones
    cached: int = 0  # distinct contents already complete in the cache before this run
    computed: int = 0  # distinct contents run through the network now
    failed: int = 0  # input rows that could not be used
    seconds: float = 0.0  # wall time of the whole run
    infer_seconds: float = 0.0  # wall time of the decode+infer loop
    backend: str = ""
    precision: str = ""
    batch_size: int = 0
    workers: int = 0
    blobs: list[str] = field(default_factory=list)
    cache_dir: str = ""
    failures_path: str | None = None
    dataset: str | None = None
    #: reduced precision only: per blob, the lowest cosine of the first batch against fp32
    precision_check: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        """Throughput of the decode+infer loop (computed images per second)."""
        return self.computed / self.infer_seconds if self.infer_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images_per_s"] = round(self.images_per_s, 2)
        return d


def hash_or_reason(path: str) -> tuple[str | None, str | None]:
    """(sha256 of the bytes: the image's identity in every cache, None) or (None, reason) for
    files that cannot even be read."""
    try:
        if os.path.isdir(path):
            return None, "is a folder"
        if os.path.getsize(path) == 0:
            return None, "empty file"
        return sha256_file(path), None
    except FileNotFoundError:
        return None, "missing file"
    except OSError as err:
        return None, f"unreadable: {err.strerror or err}"


def _load_one(pp: Preprocess, path: str, shape: tuple[int, ...] | None, uint8: bool = False) -> np.ndarray | str:
    """Decoded network input (float32 CHW, or ``uint8``: HWC pixels the backend normalises), or
    the failure reason (never raises: workers must not die)."""
    try:
        x = pp.load_uint8(path) if uint8 else pp.load(path)
    except ImageError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 (any decoder bug is one bad image, not a dead run)
        return f"{type(err).__name__}: {err}"
    if shape is not None and x.shape != shape:
        return f"preprocessed to {x.shape}, the network takes {shape}"
    return x


def run_ahead(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], depth: int) -> Iterator[tuple[Any, Any]]:
    """Yield ``(item, fn(item))`` in order while up to ``depth`` calls run ahead in ``pool``."""
    it = iter(items)
    queue: deque[tuple[Any, Future]] = deque()
    for item in it:
        queue.append((item, pool.submit(fn, item)))
        if len(queue) >= depth:
            break
    while queue:
        item, fut = queue.popleft()
        nxt = next(it, _END)
        if nxt is not _END:
            queue.append((nxt, pool.submit(fn, nxt)))
        yield item, fut.result()


_END = object()


def _prefetch(pool: ThreadPoolExecutor, fn: Callable[[str], Any], items: Sequence[tuple[int, str]], depth: int) -> Iterator[tuple[int, str, Any]]:
    """Yield ``(i, path, fn(path))`` in order while up to ``depth`` calls run ahead."""
    for (i, path), result in run_ahead(pool, lambda item: fn(item[1]), items, depth):
        yield i, path, result


DUPLICATE = "duplicate"  # another path of this run holds the same bytes and computes them
CACHED = "cached"  # the cache already holds every requested blob of these bytes


class _Claims:
    """Which contents this run has taken on: the first path of each sha256 computes it, the rest
    (duplicates) and contents the cache already holds are skipped before decoding."""

    def __init__(self, writer: CacheWriter) -> None:
        self.writer = writer
        self.seen: set[str] = set()
        self.cached: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, sha: str) -> str | None:
        """None when the caller must compute ``sha``; else DUPLICATE or CACHED."""
        with self._lock:
            if sha in self.seen:
                return DUPLICATE
            self.seen.add(sha)
            if not self.writer.needs(sha):
                self.cached.add(sha)
                return CACHED
            return None


def hash_and_claim(path: str, sha: str | None, claims: _Claims, memo: StatMemo | None) -> tuple[str | None, str | None]:
    """One file, in a worker: its sha256 (read and hashed unless the memo knew it) and whether
    this run computes it. Returns (sha, None: compute it | DUPLICATE | CACHED) or (None, reason)."""
    if sha is None:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        sha, reason = hash_or_reason(path)
        if sha is None:
            return None, reason or "unreadable"
        if memo is not None and st is not None:
            memo.remember(path, st, sha)
    return sha, claims.claim(sha)


def _hash_claim_load(path: str, sha: str | None, claims: _Claims, memo: StatMemo | None, pp: Preprocess,
                     shape: tuple[int, ...] | None, uint8: bool = False) -> tuple[str | None, np.ndarray | str]:
    """:func:`hash_and_claim`, then the network input if this run must compute it. Returns
    (sha, array | DUPLICATE | CACHED | reason)."""
    sha, skip = hash_and_claim(path, sha, claims, memo)
    if sha is None or skip is not None:
        return sha, skip or "unreadable"
    return sha, _load_one(pp, path, shape, uint8)


#: ``extract --engine``: this process (threads) or a Ray cluster (extract.ray_engine)
ENGINES = ("local", "ray")

#: the lowest cosine to fp32 a reduced-precision run may have on its first batch, per blob
MIN_COSINE = 0.999


def check_precision(backend: Any, x: np.ndarray, out: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The first batch again in fp32: per blob, the lowest cosine of an image's reduced-precision
    features to its fp32 ones. Below ``MIN_COSINE`` (LRN or Normalize squaring activations past
    fp16's range gives zeros and NaN) the run stops before anything is stored."""
    from extract.backends import BackendError

    ref = backend.run_fp32(x)
    cos = {}
    for b, got in out.items():
        a = np.asarray(got, np.float64).reshape(len(x), -1)
        r = np.asarray(ref[b], np.float64).reshape(len(x), -1)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            c = (a * r).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(r, axis=1))
        same = np.all(a == r, axis=1)  # identical (also all-zero) rows agree exactly
        c = np.where(same, 1.0, np.nan_to_num(c, nan=-1.0))
        cos[b] = round(float(c.min()), 6)
    bad = {b: c for b, c in cos.items() if c < MIN_COSINE}
    if bad:
        worst = min(bad, key=bad.get)
        raise BackendError(f"--precision {backend.precision}: blob {worst!r} has cosine {bad[worst]:.4f} to fp32 on the "
                           f"first batch (below {MIN_COSINE}); use --precision fp32")
    return cos


def _ships_uint8(backend: Any, device_preprocess: bool | None) -> bool:
    """Whether workers hand the backend uint8 pixels (it normalises them on its device)."""
    able = bool(getattr(backend, "takes_uint8", False))
    if device_preprocess is None:
        return able and device_kind(getattr(backend, "device", "cpu")) == "cuda"
    if device_preprocess and not able:
        raise ValueError(f"backend {getattr(backend, 'name', backend)!r} cannot normalise uint8 batches itself")
    return bool(device_preprocess)


def run_pipeline(
    records: pd.DataFrame,
    backend: Any,
    writer: CacheWriter,
    pp: Preprocess,
    *,
    batch_size: int = 16,
    workers: int = 2,
    progress: bool = True,
    flush_every_s: float = 30.0,
    dataset: Dataset | str | None = None,
    stat_memo: bool = True,
    device_preprocess: bool | None = None,
) -> tuple[Summary, pd.DataFrame]:
    """Compute every image of ``records`` the cache lacks; returns the summary and the failures.

    ``records`` gains a ``sha256`` column. The run's rows become ``dataset`` (a :class:`Dataset`
    or a name; default: named after the records' source), replacing a dataset of that name, and
    the failures file is written at the end, so an interrupted run leaves the previous dataset
    untouched (its shards are still kept). ``stat_memo`` lets files whose stat signature is
    unchanged since a past run keep their hash unread (``extract.statmemo``).
    ``device_preprocess`` ships uint8 pixels and lets the backend normalise them (default: torch
    on CUDA); each batch is submitted before the previous one is stored, so the device computes
    while the host decodes and writes.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    summary = Summary(images=len(records), backend=getattr(backend, "name", type(backend).__name__),
                      precision=getattr(backend, "precision", "fp32"), batch_size=batch_size, workers=workers,
                      blobs=list(writer.blobs), cache_dir=str(writer.dir))
    run = RunState.start(records, writer, dataset, stat_memo)
    shas, failures, claims, memo, known, todo = run.shas, run.failures, run.claims, run.memo, run.known, run.todo
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="graft-decode") as pool:
        use_u8 = _ships_uint8(backend, device_preprocess)
        in_shape = pp.input_shape()
        if use_u8 and in_shape is not None:
            in_shape = (*pp.output_size(), pp.channels)
        bad_sha: dict[str, str] = {}
        t1 = time.perf_counter()
        last_flush = t1
        # in a log file (no terminal) a line every 10 s, not a carriage return every 0.1 s
        bar = tqdm(total=len(todo), desc="extract", unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1,
                   mininterval=0.1 if sys.stderr.isatty() else 10.0)
        try:
            batch: list[np.ndarray] = []
            batch_sha: list[str] = []
            batch_path: list[str] = []

            pending: list[tuple[Callable[[], Mapping[str, np.ndarray]], list[str], list[str]]] = []

            def finish() -> None:
                """Store the batch in flight (its blobs wait on the device until now)."""
                result, shas_, paths_ = pending.pop()
                writer.add(shas_, paths_, result())
                summary.computed += len(shas_)
                bar.update(len(shas_))

            def run_batch() -> None:
                x = np.stack(batch)
                result = submit(backend, x)
                if summary.precision != "fp32" and not summary.precision_check:
                    out = result()
                    summary.precision_check = check_precision(backend, x, out)
                    result = lambda out=out: out  # noqa: E731
                if pending:
                    finish()  # the previous batch, while this one computes
                pending.append((result, list(batch_sha), list(batch_path)))
                batch.clear()
                batch_sha.clear()
                batch_path.clear()

            def work(path: str) -> tuple[str | None, np.ndarray | str]:
                return _hash_claim_load(path, known.get(path), claims, memo, pp, in_shape, use_u8)

            for i, path, (sha, x) in _prefetch(pool, work, todo, depth=max(2 * batch_size, 4 * workers)):
                shas[i] = sha
                if sha is None:
                    failures[path] = str(x)
                    bar.update(1)
                elif isinstance(x, str):
                    if x not in (DUPLICATE, CACHED):
                        bad_sha[sha] = x
                        bar.set_postfix(failed=len(bad_sha), refresh=False)
                    bar.update(1)
                else:
                    batch.append(x)
                    batch_sha.append(sha)
                    batch_path.append(path)
                    if len(batch) >= batch_size:
                        run_batch()
                        if time.perf_counter() - last_flush > flush_every_s:
                            writer.flush()  # bound the work a kill can lose
                            last_flush = time.perf_counter()
            if batch:
                run_batch()
            if pending:
                finish()
        finally:
            if pending:  # Ctrl-C between batches: the one in flight is complete, keep it
                with contextlib.suppress(Exception):
                    finish()
            bar.close()
            writer.flush()  # also on Ctrl-C: every computed row is complete, keep it
            if memo is not None:
                memo.save()
        summary.infer_seconds = time.perf_counter() - t1
    summary.backend = getattr(backend, "name", summary.backend)
    return summary, run.finish(summary, bad_sha, t0)


@dataclass
class RunState:
    """What every engine shares around its compute loop: the input's paths and their hashes, the
    claims (which contents this run computes), the stat memo, and the end of a run (the dataset,
    failures.csv and the manifest's run record), so a cache is the same whichever engine wrote it."""

    records: pd.DataFrame
    writer: CacheWriter
    dataset: Dataset
    paths: list[str]
    shas: list[str | None]
    claims: _Claims
    memo: StatMemo | None
    known: dict[str, str]
    todo: list[tuple[int, str]]
    failures: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, records: pd.DataFrame, writer: CacheWriter, dataset: Dataset | str | None, stat_memo: bool) -> RunState:
        """Check the dataset name, look every path up in the stat memo, and list what must be read:
        ``todo`` is every (row, path) not known to be cached or a duplicate without opening it."""
        ds = _dataset_of(records, dataset)
        writer.check_dataset(ds.name, ds.source, ds.explicit)
        paths = records["path"].astype(str).tolist()
        shas: list[str | None] = [None] * len(paths)
        claims = _Claims(writer)
        memo = StatMemo(writer.dir.parent) if stat_memo else None
        known: dict[str, str] = {}
        if memo is not None and len(memo):
            known = {p: sha for p in paths if (sha := memo.lookup(p)) is not None}
            if known and not memo.spot_check(known, lambda p: hash_or_reason(p)[0]):
                warnings.warn(f"{memo.path}: a file's content changed under an unchanged stat signature; "
                              "every file is hashed again this run", stacklevel=3)
                known = {}
        todo: list[tuple[int, str]] = []
        for i, path in enumerate(paths):
            sha = known.get(path)
            if sha is not None and (sha in claims.seen or not writer.needs(sha)):
                claims.claim(sha)  # known and nothing to compute: the file is not even opened
                shas[i] = sha
            else:
                todo.append((i, path))
        return cls(records, writer, ds, paths, shas, claims, memo, known, todo)

    def finish(self, summary: Summary, bad_sha: Mapping[str, str], t0: float) -> pd.DataFrame:
        """Write the run's dataset (failed paths left out), failures.csv and the run record; fill
        the summary's counts. Returns the failures (path, reason)."""
        records, writer, failures = self.records, self.writer, self.failures
        records["sha256"] = pd.array(self.shas, dtype="string")
        summary.unique = len(self.claims.seen)
        summary.cached = len(self.claims.cached)
        for path, sha in zip(self.paths, self.shas):
            if sha is not None and sha in bad_sha:
                failures[path] = bad_sha[sha]
        summary.failed = len(failures)
        fail_df = pd.DataFrame({"path": list(failures), "reason": list(failures.values())})
        writer.write_dataset(self.dataset.name, records, failures, source=self.dataset.source,
                             command=self.dataset.command, explicit=self.dataset.explicit)
        summary.dataset = self.dataset.name
        if failures or (writer.dir / "failures.csv").exists():
            summary.failures_path = str(writer.write_failures(fail_df)) if failures else None
            if not failures:
                (writer.dir / "failures.csv").unlink()
        summary.seconds = time.perf_counter() - t0
        writer.record_run({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary.as_dict()})
        return fail_df


def _dataset_of(records: pd.DataFrame, dataset: Dataset | str | None) -> Dataset:
    """The run's dataset: as given, or named after the records' single source."""
    if isinstance(dataset, Dataset):
        return dataset
    from extract.sources import dataset_name, input_source

    sources = records["source"].dropna().astype(str).unique().tolist() if "source" in records else []
    src = input_source(images=sources[0]) if len(sources) == 1 and sources[0] else None
    if dataset is not None:
        return Dataset(str(dataset), source=src, explicit=True)
    if src is None:
        raise ValueError("records come from several sources (or none): give the dataset a name (--dataset NAME)")
    is_dir = os.path.isdir(src)
    return Dataset(dataset_name(images=src) if is_dir else dataset_name(csv=src), source=src)


def format_summary(s: Summary) -> str:
    """The few lines the CLI prints at the end of a run."""
    lines = [
        f"images: {s.images} ({s.unique} distinct; {s.cached} already cached, {s.computed} computed, {s.failed} failed)",
        f"throughput: {s.images_per_s:.1f} images/s ({s.backend}, {s.precision}, batch {s.batch_size}, {s.workers} workers); total {s.seconds:.1f} s",
        f"cache: {s.cache_dir} (blobs: {', '.join(s.blobs)}{'; dataset: ' + s.dataset if s.dataset else ''})",
    ]
    if s.failures_path:
        lines.append(f"failures: {s.failed} image(s) skipped, listed in {s.failures_path}")
    return "\n".join(lines)



def check_extractable(pkg: Any) -> None:
    """extract feeds one image tensor in batches of any size: a package that takes several
    inputs, or batches only in multiples (TSM's clips of 8 frames), cannot be run that way."""
    inputs = getattr(pkg, "inputs", None) or {}
    if len(inputs) > 1:
        raise ValueError(f"model {pkg.name} takes {len(inputs)} inputs ({', '.join(inputs)}); extract feeds images to "
                         "single-input models only (use load_torch or the ONNX model directly)")
    step = getattr(pkg, "batch_multiple", 1)
    if step != 1:
        raise ValueError(f"model {pkg.name} runs only batches in multiples of {step} (its graph groups them); "
                         "extract runs images one by one or in batches of any size")


def resolve_preprocess(pkg: Any, overrides: dict[str, Any] | None = None) -> Preprocess:
    """The package's preprocessing with command-line overrides applied (``None`` = keep)."""
    d = dict(pkg.preprocess)
    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "mean" in ov:
        d["mean_file"] = None  # a per-channel mean given by hand replaces the mean image
    d.update(ov)
    if not d.get("input_size") and pkg.input_shape and len(pkg.input_shape) == 4 and pkg.input_shape[2]:
        d["input_size"] = list(pkg.input_shape[2:])
    mean_image = None
    if d.get("mean_file") and d.get("mean") is None:
        mf = Path(d["mean_file"])
        mean_image = np.load(mf if mf.is_absolute() else Path(pkg.dir) / mf)
    return Preprocess.from_dict(d, mean_image=mean_image)


def cache_config(weights_sha256: str, pp: Preprocess, dtype: str, l2: bool, precision: str,
                 graph_sha256: str | None = None) -> dict[str, Any]:
    """Everything that changes the cached numbers: the identity of a cache key folder. The graph
    counts as much as the weights: the same caffemodel under a corrected prototxt (a ReLU slope,
    a pooling method) is another net."""
    config = {"weights_sha256": weights_sha256, "preprocess": pp.to_dict(), "dtype": dtype, "l2": bool(l2),
              "precision": precision}
    if graph_sha256 is not None:
        config["graph_sha256"] = graph_sha256
    return config


def extract(
    model: str | Path,
    blobs: Sequence[str],
    records: pd.DataFrame,
    *,
    cache: str | Path | None = None,
    preprocess: dict[str, Any] | None = None,
    backend: str = "auto",
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    dtype: str = "float32",
    l2: bool = False,
    shard_size: int = 4096,
    progress: bool = True,
    dataset: Dataset | str | None = None,
    stat_memo: bool = True,
    engine: str = "local",
    ray_address: str | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
) -> tuple[Summary, pd.DataFrame]:
    """Embeddings of ``blobs`` of a model package for every image of ``records``, cached.

    ``engine="ray"`` runs the decode+infer loop on a Ray cluster (``ray_address``; default
    ``$RAY_ADDRESS`` or a local one-machine cluster), ``workers`` actors reserving
    ``gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs each (``extract.ray_engine``); the
    cache is the same either way.

    ``dataset`` names the key's dataset this run's rows become (a :class:`Dataset`, or a name);
    default: derived from ``records``' source (``train`` for a folder ``data/train``). ``predict``
    passes its own, so the images it is asked about never join a training set.

    ``model`` is a package name or folder (``convert.load_package``); ``cache`` the model's cache
    folder (default ``artifacts/cache/<model name>``); the key folder inside it is chosen by the
    weights, preprocessing, dtype, l2 and precision.
    """
    from convert import load_package
    from extract.backends import LazyBackend, default_batch_size, default_workers
    from extract.cache import STORAGE_DTYPES, cache_key, default_cache_root

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"--dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    pkg = load_package(model)
    check_extractable(pkg)
    blobs = list(dict.fromkeys(blobs))
    unknown = [b for b in blobs if b not in pkg.blobs]
    if unknown:
        import difflib

        def near(b: str) -> list[str]:
            written = [n for n, info in pkg.blobs.items() if isinstance(info, dict) and info.get("layer") == b]
            return written or difflib.get_close_matches(b, list(pkg.blobs), n=3)

        hints = {b: near(b) for b in unknown}
        hint = "; ".join(f"{b!r} (did you mean {', '.join(h)}?)" if h else repr(b) for b, h in hints.items())
        raise ValueError(f"model {pkg.manifest.get('name', model)} has no blob {hint}; blobs: {', '.join(pkg.blobs)}")
    pp = resolve_preprocess(pkg, preprocess)
    if pp.output_size() is None:
        raise ValueError("the package gives no input size; pass --resize H,W")
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {ENGINES}, got {engine!r}")
    name = pkg.manifest.get("name") or Path(pkg.dir).name
    model_dir = Path(cache) if cache is not None else default_cache_root() / name
    info = {"model": {"name": name, "package": str(pkg.dir), "weights_sha256": pkg.weights_sha256},
            "blob_shapes": {b: pkg.blobs[b].get("shape") for b in blobs}}
    if engine == "ray":
        from extract.ray_engine import Cluster, run_pipeline_ray

        cluster = Cluster(ray_address)
        try:
            plan = cluster.plan(backend, device, precision, gpus_per_worker, cpus_per_worker, workers)
            config = cache_config(pkg.weights_sha256, pp, dtype, l2, plan.precision, pkg.graph_sha256)
            with CacheWriter(model_dir / cache_key(config), config, blobs, shard_size=shard_size, info=info) as writer:
                return run_pipeline_ray(records, cluster, plan, pkg, pp, preprocess or {}, writer,
                                        batch_size=batch_size or default_batch_size(plan.device), progress=progress,
                                        dataset=dataset, stat_memo=stat_memo)
        finally:
            cluster.close()
    net = LazyBackend(pkg, blobs, backend=backend, device=device, precision=precision, preprocess=pp)
    config = cache_config(pkg.weights_sha256, pp, dtype, l2, net.precision, pkg.graph_sha256)
    writer = CacheWriter(model_dir / cache_key(config), config, blobs, shard_size=shard_size, info=info)
    try:
        return run_pipeline(records, net, writer, pp,
                            batch_size=batch_size or default_batch_size(net.device),
                            workers=workers or default_workers(net.device), progress=progress,
                            dataset=dataset, stat_memo=stat_memo)
    finally:
        writer.close()
