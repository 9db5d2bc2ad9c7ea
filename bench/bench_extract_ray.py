"""Benchmark ``graft extract --engine ray`` against the local engine, side by side in one run.

The same model (open_nsfw, ResNet-50 at 224x224, blob ``pool``), the same distinct test-bed
faces, each run a ``graft extract`` command into a fresh cache, as a user runs it: the local
engine as it is, the Ray engine joining a cluster started beforehand (``ray start --head
--num-cpus 2``) with 2 CPU workers. Runs alternate (local, ray, local, ray, ...) so both see the
same warm file cache and machine state. Prints a Markdown table for docs/benchmarks.md.

    .venv/bin/python bench/bench_extract_ray.py --n 600 --rounds 2

``images/s`` is what the command prints (computed images / seconds of the decode+infer loop,
model and actor start-up included); ``wall`` is the whole command (interpreter, hashing, writing).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_extract import convert_open_nsfw, distinct_faces  # noqa: E402  (the same model and faces as the other extract benches)
from bench.bench_extract_e2e import link_folder  # noqa: E402

RATE = re.compile(r"throughput: ([0-9.]+) images/s \(([^)]*)\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(cpus: int) -> tuple[str, subprocess.Popen]:
    """``ray start --head --block`` with ``cpus`` CPUs, as a user starts one; stopping that process
    stops this cluster only (``ray stop`` would stop every cluster of the machine)."""
    ray_bin = Path(sys.executable).with_name("ray")
    port = free_port()
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--num-cpus={cpus}", "--num-gpus=0",
                             f"--port={port}", "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(2)  # the GCS answers before the raylet has registered
                return f"127.0.0.1:{port}", proc
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("ray start did not come up within 120 s")


def run(pkg: Path, folder: Path, cache: Path, extra: list[str]) -> tuple[float, float, str]:
    """(wall seconds, the command's images/s, its backend line)."""
    cmd = [sys.executable, str(REPO / "cli.py"), "extract", "--model", str(pkg), "--layer", "pool", "--images",
           str(folder), "--cache", str(cache), "--no-progress", *extra]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-3000:]}")
    wall = time.perf_counter() - t
    m = RATE.search(out.stdout)
    if not m:
        raise SystemExit(f"no throughput line in: {out.stdout}\n{out.stderr}")
    return wall, float(m.group(1)), m.group(2)


def store_rate(tmp: Path, rows: int, dim: int, batch: int = 64) -> float:
    """Rows/s the driver's CacheWriter stores (add + shard commits, fsync'd) of ``dim`` float32
    rows arriving in batches: the Ray engine's write ceiling, whatever the cluster computes."""
    import numpy as np

    from extract.cache import CacheWriter

    rng = np.random.default_rng(0)
    block = rng.standard_normal((batch, dim), dtype=np.float32)
    config = {"weights_sha256": "bench", "preprocess": {}, "dtype": "float32", "l2": False, "precision": "fp32"}
    t = time.perf_counter()
    with CacheWriter(tmp / "store", config, ["fc7"], shard_size=4096) as w:
        for i in range(0, rows, batch):
            w.add([f"{i + j:064x}" for j in range(batch)], [f"img{i + j}.jpg" for j in range(batch)], {"fc7": block})
    rate = rows / (time.perf_counter() - t)
    shutil.rmtree(tmp / "store")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="distinct faces (default 600)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="Ray CPU actors (default 2, one per core here)")
    ap.add_argument("--store-rows", type=int, default=32768, help="rows of the driver's store-rate measurement (0: skip)")
    ap.add_argument("--store-dim", type=int, default=4096, help="their width (default 4096: VGG-Face fc7)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        store = store_rate(tmp, args.store_rows, args.store_dim) if args.store_rows else None
        pkg = convert_open_nsfw(tmp / "open_nsfw")
        folder = link_folder(distinct_faces(args.n), tmp / "faces")
        address, cluster = start_cluster(os.cpu_count() or 2)
        try:
            engines = {"local": [], "ray": ["--engine=ray", f"--ray-address={address}", f"--workers={args.workers}"]}
            results: dict[str, list[tuple[float, float, str]]] = {e: [] for e in engines}
            for r in range(args.rounds):
                for name, extra in engines.items():
                    cache = tmp / f"cache-{name}-{r}"
                    results[name].append(run(pkg, folder, cache, extra))
                    shutil.rmtree(cache)
                    print(f"round {r + 1} {name}: {results[name][-1]}", file=sys.stderr)
        finally:
            os.killpg(cluster.pid, signal.SIGTERM)
            cluster.wait(60)
    best = {e: max(v, key=lambda x: x[1]) for e, v in results.items()}
    print(f"\n{args.n} distinct faces, open_nsfw `pool`, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {args.rounds} rounds alternating (best of each)\n")
    print("| engine | images/s (each round) | wall s (each round) | backend |")
    print("|---|---|---|---|")
    for e, v in results.items():
        print(f"| {e} | {', '.join(f'{x[1]:.1f}' for x in v)} | {', '.join(f'{x[0]:.1f}' for x in v)} | {best[e][2]} |")
    ratio = best["ray"][1] / best["local"][1]
    wall = min(x[0] for x in results["local"]) / min(x[0] for x in results["ray"])
    print(f"\nray / local: {ratio:.2f}x images/s, {wall:.2f}x by wall time (target >= 0.8x)")
    if store:
        mb = store * args.store_dim * 4 / 2**20
        print(f"\ndriver store rate (CacheWriter, {args.store_dim}-d float32, fsync'd shards of 4096): "
              f"{store:,.0f} rows/s = {mb:,.0f} MiB/s")


if __name__ == "__main__":
    main()
