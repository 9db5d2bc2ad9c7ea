"""Benchmark ``graft extract`` on CPU against OpenCV DNN and a batch-size-1 PyTorch loop.

All three run the same model (open_nsfw, converted once) with the same preprocessing (squash to
256x256, centre crop 224, BGR, mean 104/117/123) on the same JPEG face crops, end to end from
the file, in one process with the same number of threads, and print a Markdown table.

    .venv/bin/python bench/bench_extract.py --n 200 --n-bs1 40 --threads 2 --rounds 3

Numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TESTBED = REPO.parent / "shared" / "testbed"
PROTO = TESTBED / "caffe" / "open_nsfw" / "deploy.prototxt"
WEIGHTS = TESTBED / "caffe" / "open_nsfw" / "resnet_50_1by2_nsfw.caffemodel"
FACES = TESTBED / "faces" / "imdbwiki"
MEAN = (104.0, 117.0, 123.0)


def convert_open_nsfw(out: Path) -> Path:
    cmd = [sys.executable, "cli.py", "convert", "--prototxt", str(PROTO), "--caffemodel", str(WEIGHTS), "--name", "open_nsfw",
           "--out", str(out), "--resize", "256", "--crop", "224", "--mean", "104,117,123", "--channel-order", "bgr"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return out


def bench_graft(pkg: Path, files: list[str], threads: int, backend: str, batch_size: int | None) -> tuple[float, np.ndarray]:
    """graft's pipeline, end to end (hash, decode in workers, infer, write shards); model load excluded."""
    import pandas as pd

    from convert import load_package
    from extract.backends import default_batch_size, default_workers, make_backend
    from extract.cache import CacheWriter, cache_key, read_key
    from extract.pipeline import cache_config, resolve_preprocess, run_pipeline

    p = load_package(pkg)
    pp = resolve_preprocess(p)
    net = make_backend(p, ["pool"], backend=backend, device="cpu", threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        config = cache_config(p.weights_sha256, pp, "float32", False, "fp32")
        records = pd.DataFrame({"path": files, "rel_path": files, "source": "bench"})
        with CacheWriter(Path(tmp) / cache_key(config), config, ["pool"]) as writer:
            t = time.perf_counter()
            summary, _ = run_pipeline(records, net, writer, pp, batch_size=batch_size or default_batch_size("cpu"),
                                      workers=default_workers("cpu"), progress=False)
            elapsed = time.perf_counter() - t
        X, _ = read_key(writer.dir, "pool", mmap=False)
    assert summary.computed == len(files) and summary.failed == 0
    return len(files) / elapsed, np.asarray(X)


def bench_opencv(files: list[str], threads: int, batch_size: int) -> tuple[float, np.ndarray]:
    """cv2.dnn on the original caffemodel: imread -> resize 256 -> centre crop 224 -> blobFromImages(mean).

    blobFromImages(crop=True) would not crop a 256x256 image: it resizes it to 224x224 first."""
    import cv2

    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromCaffe(str(PROTO), str(WEIGHTS))
    outs = []
    t = time.perf_counter()
    for i in range(0, len(files), batch_size):
        ims = [cv2.resize(cv2.imread(f, cv2.IMREAD_COLOR), (256, 256))[16:240, 16:240] for f in files[i : i + batch_size]]
        net.setInput(cv2.dnn.blobFromImages(ims, 1.0, (224, 224), MEAN, swapRB=False, crop=False))
        outs.append(net.forward("pool").reshape(len(ims), -1).copy())
    return len(files) / (time.perf_counter() - t), np.concatenate(outs)


def bench_torch_bs1(pkg: Path, files: list[str], threads: int) -> tuple[float, np.ndarray]:
    """The naive loop: graft's preprocessing (decode included), then convert's torch module, one image at a time."""
    import torch

    from convert import load_package, load_torch
    from extract.pipeline import resolve_preprocess

    torch.set_num_threads(threads)
    p = load_package(pkg)
    pp = resolve_preprocess(p)
    net = load_torch(p).eval()
    outs = []
    t = time.perf_counter()
    with torch.inference_mode():
        for f in files:
            x = torch.from_numpy(pp.load(f))[None]
            outs.append(net(x, blobs=["pool"])["pool"].reshape(1, -1).numpy())
    return len(files) / (time.perf_counter() - t), np.concatenate(outs)


def distinct_faces(n: int) -> list[Path]:
    """The first ``n`` (0: all) test-bed faces with distinct contents, sorted by path."""
    seen: set[str] = set()
    files = []
    for p in sorted(FACES.rglob("*.jpg")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            files.append(p)
    return files[:n] if n else files


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="images (the first N test-bed faces, sorted)")
    ap.add_argument("--n-bs1", type=int, default=120, help="images for the slow batch-size-1 torch loop")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=None, help="graft batch size (default: graft's)")
    ap.add_argument("--opencv-batch", type=int, default=8)
    ap.add_argument("--package", type=Path, help="an already converted open_nsfw package (default: convert to a temp dir)")
    ap.add_argument("--skip-torch-batched", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all methods, alternating; medians reported")
    args = ap.parse_args()

    # distinct contents only: graft would compute a duplicate once, the other loops twice
    files = [str(p) for p in distinct_faces(args.n)]
    torch_threads = args.threads
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        pkg = args.package or convert_open_nsfw(Path(tmp) / "open_nsfw")
        # warm-up the page cache so every method reads the same warm files
        for f in files:
            Path(f).read_bytes()
        # the methods alternate within each round and the median round counts: a shared VM's speed
        # drifts by 10-30 % over a minute, which would otherwise favour whichever ran first
        runs: dict[str, list[tuple[float, np.ndarray]]] = {}
        cv_name = f"OpenCV {__import__('cv2').__version__} DNN (batch {args.opencv_batch})"
        for r in range(args.rounds):
            runs.setdefault("graft extract (onnxruntime CPU)", []).append(
                bench_graft(pkg, files, args.threads, "onnxruntime", args.batch_size))
            if not args.skip_torch_batched:
                runs.setdefault("graft extract (--backend torch, CPU)", []).append(
                    bench_graft(pkg, files, torch_threads, "torch", args.batch_size))
            runs.setdefault(cv_name, []).append(bench_opencv(files, args.threads, args.opencv_batch))
            runs.setdefault("PyTorch loop, batch size 1", []).append(bench_torch_bs1(pkg, files[: args.n_bs1], torch_threads))
            print(f"round {r + 1}: " + ", ".join(f"{k.split(' (')[0]} {v[-1][0]:.1f}" for k, v in runs.items()), file=sys.stderr)
        results = {k: (float(np.median([rate for rate, _ in v])), v[0][1]) for k, v in runs.items()}
        per_round = {k: [round(rate, 1) for rate, _ in v] for k, v in runs.items()}
        bs1_rate = results["PyTorch loop, batch size 1"][0]

    ref_rate, ref_x = results["graft extract (onnxruntime CPU)"]
    cv_key = next(k for k in results if k.startswith("OpenCV"))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads={args.threads}; "
          f"{len(files)} images ({args.n_bs1} for the bs-1 loop); python {platform.python_version()}\n")
    print(f"| method | images/s (median of {args.rounds}) | per round | graft speed-up | mean cosine vs graft |")
    print("|---|---:|---|---:|---:|")
    for name, (rate, x) in results.items():
        n = min(len(x), len(ref_x))
        rounds = " / ".join(f"{v:.1f}" for v in per_round[name])
        print(f"| {name} | {rate:.1f} | {rounds} | {ref_rate / rate:.2f}x | {cosine(x[:n], ref_x[:n]):.5f} |")
    print(f"\nvs OpenCV: {ref_rate / results[cv_key][0]:.2f}x (target >= 1.2x); "
          f"vs bs-1 PyTorch: {ref_rate / bs1_rate:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
