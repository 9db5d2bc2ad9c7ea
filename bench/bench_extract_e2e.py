"""``python cli.py extract`` as a user runs it, against OpenCV DNN run the same way, plus re-runs.

Each method is a fresh process timed from spawn to exit (interpreter start, imports, model
load, every image read from JPEG, the cache written), on the same images and model (open_nsfw,
converted once; OpenCV runs the original caffemodel with Caffe's data path: imread, resize to
256x256 with INTER_LINEAR, centre crop 224, mean 104/117/123). Two image sets: the test-bed
faces (200-500 px JPEGs) and the same faces as small crops (160 px JPEGs, where decoding at
reduced DCT scale gains nothing). Methods alternate within each round; medians are reported.
Then the re-run: the same extract again over a fully cached folder, timed against the first.

    .venv/bin/python bench/bench_extract_e2e.py --n 400 --rounds 3 --threads 2 --rerun-n 0

``--rerun-n 0`` re-runs over every test-bed face (2,267). Numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
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
from bench.bench_extract import FACES, PROTO, WEIGHTS, distinct_faces  # noqa: E402  (the same model and faces as the in-process bench)

OPENCV = r"""
import sys, time, numpy as np, cv2
files, threads, batch, out = open(sys.argv[1]).read().split("\n"), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cv2.setNumThreads(threads)
net = cv2.dnn.readNetFromCaffe(sys.argv[5], sys.argv[6])
outs = []
for i in range(0, len(files), batch):
    ims = []
    for f in files[i:i + batch]:
        im = cv2.resize(cv2.imread(f, cv2.IMREAD_COLOR), (256, 256), interpolation=cv2.INTER_LINEAR)
        ims.append(im[16:240, 16:240])
    net.setInput(cv2.dnn.blobFromImages(ims, 1.0, (224, 224), (104.0, 117.0, 123.0), swapRB=False, crop=False))
    outs.append(net.forward("pool").reshape(len(ims), -1).copy())
np.save(out, np.concatenate(outs))
"""


def link_folder(files: list[Path], folder: Path) -> Path:
    """A flat folder of symlinks to ``files`` (one input for both methods)."""
    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        os.symlink(f, folder / f"{i:05d}.jpg")
    return folder


def small_crops(files: list[Path], folder: Path, side: int = 160) -> Path:
    """The faces as ``side`` px JPEGs (quality 92), what a face detector's crops look like."""
    import cv2

    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        im = cv2.imread(str(f), cv2.IMREAD_COLOR)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA),
                    [cv2.IMWRITE_JPEG_QUALITY, 92])
    return folder


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}… failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return dt


def graft_cmd(pkg: Path, folder: Path, cache: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "cli.py", "extract", "--model", str(pkg), "--layer", "pool", "--images", str(folder),
            "--cache", str(cache), "--no-progress", *extra]


def opencv_cmd(folder: Path, threads: int, batch: int, out: Path, listing: Path) -> list[str]:
    files = sorted(str(p) for p in folder.iterdir())
    listing.write_text("\n".join(files))
    return [sys.executable, "-c", OPENCV, str(listing), str(threads), str(batch), str(out), str(PROTO), str(WEIGHTS)]


def graft_features(cache: Path, folder: Path) -> np.ndarray:
    from extract import load_embeddings

    X, meta = load_embeddings(cache, layer="pool")
    order = {os.path.basename(p): i for i, p in enumerate(meta["path"])}
    return np.asarray(X)[[order[p.name] for p in sorted(folder.iterdir())]]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="distinct faces per set (default 400)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--opencv-batch", type=int, default=8)
    ap.add_argument("--rerun-n", type=int, default=0, help="test-bed files for the re-run measurement, duplicates "
                    "included as a user's folder has them (0: all 2,267; -1: skip)")
    ap.add_argument("--profile-rerun", action="store_true", help="print a cProfile of one re-run")
    ap.add_argument("--graft-args", default="", help="extra extract flags, e.g. '--fast-decode'")
    args = ap.parse_args()

    import cv2

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    extra = args.graft_args.split()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        pkg = tmp / "open_nsfw"
        subprocess.run([sys.executable, "cli.py", "convert", "--prototxt", str(PROTO), "--caffemodel", str(WEIGHTS),
                        "--name", "open_nsfw", "--out", str(pkg), "--resize", "256", "--crop", "224", "--mean",
                        "104,117,123", "--channel-order", "bgr"], cwd=REPO, check=True, capture_output=True)
        faces = distinct_faces(args.n)
        sets = {"test-bed faces (200-500 px)": link_folder(faces, tmp / "faces"),
                "small crops (160 px)": small_crops(faces, tmp / "small")}
        for folder in sets.values():  # warm the page cache for both methods alike
            for f in folder.iterdir():
                f.read_bytes()
        rows = []
        for label, folder in sets.items():
            g_times, c_times = [], []
            for r in range(args.rounds):
                cache = tmp / f"cache-{folder.name}-{r}"
                g_times.append(timed(graft_cmd(pkg, folder, cache, extra), env))
                out = tmp / f"cv-{folder.name}.npy"
                c_times.append(timed(opencv_cmd(folder, args.threads, args.opencv_batch, out, tmp / "list.txt"), env))
                print(f"{label} round {r + 1}: graft {g_times[-1]:.2f} s, OpenCV {c_times[-1]:.2f} s", file=sys.stderr)
            cos = cosines(graft_features(tmp / f"cache-{folder.name}-0", folder), np.load(out))
            n = len(list(folder.iterdir()))
            g, c = n / float(np.median(g_times)), n / float(np.median(c_times))
            rows.append((label, n, g, c, g_times, c_times, cos))

        rerun = None
        if args.rerun_n >= 0:
            every = sorted(FACES.rglob("*.jpg"))
            allf = link_folder(every[: args.rerun_n] if args.rerun_n else every, tmp / "all")
            cache = tmp / "cache-rerun"
            first = timed(graft_cmd(pkg, allf, cache, extra), env)
            again = [timed(graft_cmd(pkg, allf, cache, extra), env) for _ in range(max(1, args.rounds))]
            rerun = (len(list(allf.iterdir())), first, again)
            if args.profile_rerun:
                subprocess.run([sys.executable, "-m", "cProfile", "-s", "cumulative", "cli.py", *graft_cmd(pkg, allf, cache, extra)[2:]],
                               cwd=REPO, env=env)

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads={args.threads}; "
          f"python {platform.python_version()}, OpenCV {cv2.__version__}; graft flags: {' '.join(extra) or '(defaults)'}\n")
    print("| images | n | graft images/s | OpenCV DNN images/s | graft / OpenCV | graft s per round | OpenCV s per round | cosine mean / min |")
    print("|---|---:|---:|---:|---:|---|---|---|")
    for label, n, g, c, gt, ct, cos in rows:
        print(f"| {label} | {n} | {g:.1f} | {c:.1f} | **{g / c:.2f}x** | {' / '.join(f'{t:.1f}' for t in gt)} | "
              f"{' / '.join(f'{t:.1f}' for t in ct)} | {cos.mean():.6f} / {cos.min():.6f} |")
    if rerun:
        n, first, again = rerun
        med = float(np.median(again))
        print(f"\nre-run over {n} fully cached images: first run {first:.1f} s, re-runs {' / '.join(f'{t:.2f}' for t in again)} s "
              f"(median {med:.2f} s = **{100 * med / first:.1f} %** of the first; target <= 10 %)")


if __name__ == "__main__":
    main()
