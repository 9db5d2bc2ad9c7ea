"""``extract --engine ray``: the same run on a Ray cluster, into the same cache.

Ray Data's batch-inference pattern: a dataset of (path, sha256) rows, ``map_batches`` with an
actor class (:class:`Embedder`) that holds the backend, one actor per GPU (``num_gpus``) or N
CPU actors. What stays on the driver is what makes the cache exact:

- hashing and claiming (:class:`extract.pipeline.RunState`, the local engine's own code): only
  contents the cache lacks are dispatched, each once;
- writing: results stream back to the driver, which adds them to the one
  :class:`extract.cache.CacheWriter` the local engine uses, so shard names, the commit rule
  (meta file last) and the exactly-once bookkeeping are the same code. One writer per key: no
  id race between writers and no reliance on ``flock`` across nodes; the limit is the driver's
  bandwidth (docs/cluster.md).

Faults: Ray restarts an actor that dies and retries its batches (Ray Data's actor pools run
with ``max_restarts=-1, max_task_retries=-1``); rows a retried block returns again are
dropped by the writer, which stores each content once. A killed driver loses only rows not yet in a committed shard:
the re-run finds the rest in the cache.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from extract.backends import BackendError
from extract.cache import CacheWriter
from extract.pipeline import CACHED, DUPLICATE, RunState, Summary, _load_one, _prefetch, check_precision, hash_and_claim
from extract.preprocess import Preprocess

RAY_HINT = "pip install 'graft[ray]' (or pip install 'ray[data]')"
#: batches per block handed to an actor: a retried block recomputes this many; one keeps the tail short (measured faster than 4 on 600 faces)
BATCHES_PER_BLOCK = 1
#: at most this many blocks (Ray keeps one object per block)
MAX_BLOCKS = 20_000


def import_ray() -> Any:
    """``ray`` with Ray Data, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise BackendError(f"--engine ray needs Ray Data, which is not installed ({err}); {RAY_HINT}") from None
    return ray


def _quiet_ray_data(ray: Any) -> None:
    """graft shows one progress bar (rate, ETA); Ray Data's own bars and INFO lines would bury it."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    with contextlib.suppress(AttributeError):
        ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal.progress"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Cluster:
    """A connection to a Ray cluster: an existing one (``address``: ``auto``, ``HOST:PORT``,
    ``ray://...``, or ``$RAY_ADDRESS``), or a local one started for the run and stopped after it.
    In a process that already called ``ray.init`` the running connection is used as it is."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        if self.address is not None and "ray" not in sys.modules:
            _use_auth_token()  # read when ray is imported
        ray = self.ray = import_ray()
        self.started = False
        if not ray.is_initialized():
            _check_reachable(self.address)
            kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
            if self.address is None:
                kwargs["include_dashboard"] = False
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as err:
                msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise BackendError(f"--ray-address {self.address}: cannot connect to a Ray cluster ({msg})") from None
            self.started = True
        _quiet_ray_data(ray)

    def resources(self) -> dict[str, float]:
        return dict(self.ray.cluster_resources())

    def describe(self) -> str:
        r = self.resources()
        where = self.address or ("this process's" if not self.started else "a local one-machine")
        return f"Ray cluster {where} ({r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} GPUs)"

    def plan(self, backend: str, device: str, precision: str, gpus_per_worker: float | None,
             cpus_per_worker: float | None, workers: int | None) -> WorkerPlan:
        """Decide the actors and resolve backend/device/precision; for GPU workers **on a GPU
        worker** (the driver may have no GPU, and the precision, bf16 or fp32, is part of the
        cache key), which also proves graft imports on the cluster's workers."""
        res = self.resources()
        gpus_total, cpus_total = float(res.get("GPU", 0)), float(res.get("CPU", 0))
        if device.startswith("cuda:"):
            raise BackendError(f"--device {device}: with --engine ray each worker gets its own GPU(s) from Ray; "
                               "use --device cuda with --gpus-per-worker")
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if (gpus_total > 0 and device != "cpu") else 0.0
        if device == "cpu" and gpus_per_worker:
            raise BackendError(f"--device cpu with --gpus-per-worker {gpus_per_worker:g}: choose one")
        if gpus_per_worker > 0:
            if gpus_total < gpus_per_worker:
                raise BackendError(f"--gpus-per-worker {gpus_per_worker:g}: {self.describe()} has not that many GPUs; "
                                   "use --device cpu for CPU workers")
            device = "cuda"
        elif device == "cuda":
            raise BackendError(f"--device cuda: {self.describe()} has no GPUs")
        else:
            device = "cpu"
        if cpus_per_worker is None:
            # a GPU worker decodes for its GPU: give it its share of the cores
            cpus_per_worker = max(1.0, math.floor(cpus_total / max(1.0, gpus_total / gpus_per_worker))) if gpus_per_worker else 1.0
        if cpus_per_worker > cpus_total:  # the actors would wait for resources forever
            raise BackendError(f"--cpus-per-worker {cpus_per_worker:g}: {self.describe()} has not that many CPUs")
        if workers is None:
            workers = int(gpus_total // gpus_per_worker) if gpus_per_worker else int(cpus_total // cpus_per_worker)
        workers = max(1, workers)
        if not gpus_per_worker:  # CPU workers: nothing about the machine changes the choice
            kind, device, precision = _resolve_on_worker(backend, device, precision)
            return WorkerPlan(kind, device, precision, workers, float(cpus_per_worker), 0.0)
        remote = self.ray.remote(num_cpus=0, num_gpus=gpus_per_worker)(_resolve_on_worker)
        try:
            kind, device, precision = self.ray.get(remote.remote(backend, device, precision), timeout=600)
        except self.ray.exceptions.GetTimeoutError:
            raise BackendError(f"{self.describe()}: no worker with {gpus_per_worker:g} GPU(s) free within 600 s") from None
        except Exception as err:  # noqa: BLE001 (a RayTaskError wraps the worker's own error)
            raise BackendError(f"on the Ray workers: {worker_error(err)}") from None
        return WorkerPlan(kind, device, precision, workers, float(cpus_per_worker), float(gpus_per_worker))

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """A HOST:PORT nobody listens on makes ``ray.init`` retry for minutes: try the port first."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except ValueError:
        raise BackendError(f"--ray-address {address}: expected HOST:PORT, auto or ray://HOST:PORT") from None
    except OSError as err:
        raise BackendError(f"--ray-address {address}: no Ray cluster answers there ({err.strerror or err}); "
                           "start one with `ray start --head` or pass its address") from None


def _use_auth_token() -> None:
    """Ray >= 2.5x clusters (``ray start``) require a token, and a driver joining one sends it only
    when told to: with a token at hand (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``, the file ``ray start`` writes) and no ``$RAY_AUTH_MODE``, send it. A
    cluster without token authentication accepts the token all the same."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


@dataclass(frozen=True)
class WorkerPlan:
    """What each actor runs (backend kind, device, precision) and reserves (CPUs, GPUs), and how many."""

    kind: str
    device: str
    precision: str
    workers: int
    cpus: float
    gpus: float

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.device} on ray x{self.workers}"


def _resolve_on_worker(backend: str, device: str, precision: str) -> tuple[str, str, str]:
    from extract.backends import resolve

    return resolve(backend, device, precision)


def worker_error(err: BaseException) -> str:
    """The worker's own error message out of Ray's wrappers (RayTaskError, UserCodeException)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None) or err.__cause__
        if isinstance(err, (BackendError, ValueError, ImportError, OSError)) and not type(err).__module__.startswith("ray"):
            return f"{type(err).__name__}: {err}" if isinstance(err, ImportError) else str(err)
        if cause is None:
            break
        err = cause
    text = str(err).strip().splitlines()
    return next((t for t in reversed(text) if t.strip()), type(err).__name__)


class Embedder:
    """The Ray actor: builds the package's backend once, then turns batches of (path, sha256)
    rows into embeddings, decoding with the package's own preprocessing in threads. Bad images
    come back as rows with a reason, never as an exception (an exception would fail the run)."""

    def __init__(self, package: str, weights_sha256: str, blobs: Sequence[str], preprocess: Mapping[str, Any],
                 overrides: Mapping[str, Any], kind: str, device: str, precision: str, threads: int,
                 decode_threads: int) -> None:
        from convert import load_package
        from extract.backends import make_backend
        from extract.pipeline import _ships_uint8, resolve_preprocess

        pkg = load_package(package)
        if pkg.weights_sha256 != weights_sha256:
            raise BackendError(f"{package} on this worker holds other weights than on the driver; "
                               "the package folder must be the same on every node")
        self.pp: Preprocess = resolve_preprocess(pkg, dict(overrides))
        if self.pp.to_dict() != dict(preprocess):
            raise BackendError(f"{package}: this worker preprocesses differently from the driver (another graft version?)")
        self.blobs = list(blobs)
        self.net = make_backend(pkg, self.blobs, kind, device, precision, threads=threads, preprocess=self.pp)
        self.uint8 = _ships_uint8(self.net, None)
        shape = self.pp.input_shape()
        self.shape = (*self.pp.output_size(), self.pp.channels) if (self.uint8 and shape is not None) else shape
        self.pool = ThreadPoolExecutor(max_workers=max(1, decode_threads), thread_name_prefix="graft-decode")
        self.checked = precision == "fp32"
        self.dims: list[int] | None = None

    def _dims(self) -> list[int]:
        """Row width of each blob (for a batch where every image failed)."""
        if self.dims is None:
            c, h, w = self.pp.input_shape()
            x = np.zeros((1, *self.shape), np.uint8) if self.uint8 else np.zeros((1, c, h, w), np.float32)
            out = self.net.run(x)
            self.dims = [int(np.prod(out[b].shape[1:])) for b in self.blobs]
        return self.dims

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        loaded = list(self.pool.map(lambda p: _load_one(self.pp, p, self.shape, self.uint8), paths))
        ok = [i for i, x in enumerate(loaded) if not isinstance(x, str)]
        reasons = np.array(["" if not isinstance(x, str) else x for x in loaded], dtype=object)
        out: dict[str, np.ndarray] = {"path": np.asarray(batch["path"]), "sha256": np.asarray(batch["sha256"]),
                                      "reason": reasons}
        if ok:
            x = np.stack([loaded[i] for i in ok])
            result = self.net.run(x)
            if not self.checked:
                check_precision(self.net, x, result)  # a failing check stops the run before anything is stored
                self.checked = True
            flat = [np.asarray(result[b], np.float32).reshape(len(ok), -1) for b in self.blobs]
            self.dims = [a.shape[1] for a in flat]
        for k, d in enumerate(self._dims()):
            full = np.zeros((len(paths), d), np.float32)
            if ok:
                full[ok] = flat[k]
            out[f"blob{k}"] = full
        out["backend"] = np.array([self.net.name] * len(paths), dtype=object)
        return out


def _blocks(rows: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """The rows in blocks of a few batches: Ray hands whole blocks to actors, so blocks bound the
    work a dead actor's retry repeats and let every actor get some."""
    size = max(batch_size * BATCHES_PER_BLOCK, math.ceil(len(rows) / MAX_BLOCKS))
    return [rows.iloc[i:i + size].reset_index(drop=True) for i in range(0, len(rows), size)]


def run_pipeline_ray(
    records: pd.DataFrame,
    cluster: Cluster,
    plan: WorkerPlan,
    pkg: Any,
    pp: Preprocess,
    overrides: Mapping[str, Any],
    writer: CacheWriter,
    *,
    batch_size: int = 16,
    hash_threads: int | None = None,
    progress: bool = True,
    flush_every_s: float = 30.0,
    dataset: Any = None,
    stat_memo: bool = True,
) -> tuple[Summary, pd.DataFrame]:
    """:func:`extract.pipeline.run_pipeline` with the decode+infer loop on Ray actors.

    The driver hashes and claims (reading each file once, the stat memo sparing re-runs even
    that), dispatches only the contents the cache lacks, and stores what comes back through
    ``writer``; dataset, failures and run record are written exactly as the local engine does.
    """
    from tqdm.auto import tqdm

    ray = cluster.ray
    t0 = time.perf_counter()
    summary = Summary(images=len(records), backend=plan.name, precision=plan.precision, batch_size=batch_size,
                      workers=plan.workers, blobs=list(writer.blobs), cache_dir=str(writer.dir))
    run = RunState.start(records, writer, dataset, stat_memo)
    bad_sha: dict[str, str] = {}
    mininterval = 0.1 if sys.stderr.isatty() else 10.0
    # 1. hash and claim on the driver: what the cache lacks, each content once
    send_path: list[str] = []
    send_sha: list[str] = []
    threads = hash_threads or max(2, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="graft-hash") as pool, \
            tqdm(total=len(run.todo), desc="hash", unit="img", disable=not progress or not run.todo,
                 dynamic_ncols=True, mininterval=mininterval) as bar:
        def work(path: str) -> tuple[str | None, str | None]:
            return hash_and_claim(path, run.known.get(path), run.claims, run.memo)

        for i, path, (sha, skip) in _prefetch(pool, work, run.todo, depth=8 * threads):
            run.shas[i] = sha
            if sha is None:
                run.failures[path] = str(skip)
            elif skip is None:
                send_path.append(path)
                send_sha.append(sha)
            bar.update(1)
    # 2. decode + infer on the actors; the driver stores what comes back
    t1 = time.perf_counter()
    try:
        if send_path:
            _compute(ray, plan, pkg, pp, overrides, writer, send_path, send_sha, batch_size, summary, bad_sha,
                     progress, mininterval, flush_every_s)
    finally:
        writer.flush()  # also on Ctrl-C / SIGTERM: every row that came back is complete, keep it
        if run.memo is not None:
            run.memo.save()
    summary.infer_seconds = time.perf_counter() - t1
    return summary, run.finish(summary, bad_sha, t0)


def _compute(ray: Any, plan: WorkerPlan, pkg: Any, pp: Preprocess, overrides: Mapping[str, Any], writer: CacheWriter,
             paths: list[str], shas: list[str], batch_size: int, summary: Summary, bad_sha: dict[str, str],
             progress: bool, mininterval: float, flush_every_s: float) -> None:
    from tqdm.auto import tqdm

    rows = pd.DataFrame({"path": paths, "sha256": shas})
    blocks = _blocks(rows, batch_size)
    workers = min(plan.workers, len(blocks))
    summary.workers = workers
    ctor = {"package": str(pkg.dir), "weights_sha256": pkg.weights_sha256, "blobs": list(writer.blobs),
            "preprocess": pp.to_dict(), "overrides": {k: v for k, v in overrides.items() if v is not None},
            "kind": plan.kind, "device": plan.device, "precision": plan.precision,
            "threads": max(1, int(plan.cpus)), "decode_threads": max(1, int(plan.cpus))}
    remote_args: dict[str, Any] = {"num_cpus": plan.cpus}
    if plan.gpus:
        remote_args["num_gpus"] = plan.gpus
    ds = ray.data.from_pandas(blocks).map_batches(
        Embedder, fn_constructor_kwargs=ctor, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers), **remote_args)
    stems = list(writer.blobs)
    last_flush = time.perf_counter()
    bar = tqdm(total=len(rows), desc=f"extract (ray, {workers} workers)", unit="img", disable=not progress,
               dynamic_ncols=True, smoothing=0.1, mininterval=mininterval)
    try:
        for b in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            reasons = b["reason"]
            ok = np.array([r == "" for r in reasons], dtype=bool)
            for sha, r in zip(b["sha256"][~ok], reasons[~ok]):
                bad_sha[str(sha)] = str(r)
            if ok.any():
                got = [str(s) for s in b["sha256"][ok]]
                # a block retried after its actor died may repeat rows already received: the writer
                # stores each content once, and only new ones count as computed
                summary.computed += sum(1 for s in got if writer.needs(s))
                writer.add(got, [str(p) for p in b["path"][ok]], {blob: b[f"blob{k}"][ok] for k, blob in enumerate(stems)})
                summary.backend = f"{b['backend'][0]} on ray x{workers}"
            bar.update(len(reasons))
            if (~ok).any():
                bar.set_postfix(failed=len(bad_sha), refresh=False)
            if time.perf_counter() - last_flush > flush_every_s:
                writer.flush()  # bound the work a killed driver loses
                last_flush = time.perf_counter()
    except (KeyboardInterrupt, BackendError):
        raise
    except Exception as err:  # noqa: BLE001 (Ray wraps a worker's error in its own types)
        raise BackendError(f"on the Ray workers: {worker_error(err)}") from None
    finally:
        bar.close()


__all__ = ["CACHED", "DUPLICATE", "Cluster", "Embedder", "WorkerPlan", "import_ray", "run_pipeline_ray"]
