"""Photos per second of ``graft faces``' detectors (UltraFace RFB-320, MTCNN) at graft's default
settings against the same detector run through OpenCV DNN, same images, same run; Markdown tables.

    .venv/bin/python bench/bench_faces.py --n 200 --copies 40 --rounds 3

OpenCV is the script a user would otherwise write (tests/_opencv_faces.py, nothing of graft):
``cv2.dnn.readNetFromCaffe`` on the test bed's prototxt/caffemodel; UltraFace: resize to 320x240,
``blobFromImage`` (x-127)/128 RGB, one photo per forward, the authors' prior decoding and
``cv2.dnn.NMSBoxes``; MTCNN: the ``detect_face.m`` port the MTCNN tests compare against.

Two measurements, methods alternating within each round, medians reported:

1. detection only, in process, on photos decoded beforehand (graft: the detector ``graft faces``
   builds, UltraFace fed ``--batch-size`` 8 photos per forward as the command does);
2. end to end from the files, each a fresh process timed from spawn to exit: ``cli.py faces
   --detector X --images DIR --out <fresh> --no-progress --sample-sheet 0`` against an OpenCV
   script doing imread -> detect -> crop (margin 0.2, square, replicate-padded, 224) -> imwrite.

Images: (i) ``--n`` distinct IMDB-WIKI gender-data crops (one face each, 200-500 px) and (ii)
MTCNN's demo photo test1.jpg (450x344, 2 faces) as ``--copies`` distinct files (re-encoded at
JPEG qualities 99, 98, ...; flipped past 40), since graft skips photos whose bytes it has seen.
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
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import cv2  # noqa: E402
from _opencv_faces import CAFFE, TESTBED, ULTRA, Reference, UltraFaceCV  # noqa: E402

#: OpenCV's own thread count, before graft is imported: extract.preprocess sets it to 1 (its decode
#: threads would oversubscribe the cores), which would leave the in-process OpenCV DNN one core
CV_THREADS = cv2.getNumThreads()
GENDER = TESTBED / "faces" / "imdbwiki" / "gender-data"

OPENCV = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import cv2
from _opencv_faces import Reference, UltraFaceCV, crop_square
detector, src, out = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
out.mkdir(parents=True)
det = UltraFaceCV() if detector == "ultraface" else Reference()
n = 0
for f in sorted(p for p in src.rglob("*") if p.is_file()):
    bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
    boxes = det.detect(bgr) if detector == "ultraface" else det.detect(bgr[:, :, ::-1])[0]
    for k, b in enumerate(boxes):
        cv2.imwrite(str(out / f"{f.stem}_{k}.jpg"), crop_square(bgr, b, 224, 0.2), [cv2.IMWRITE_JPEG_QUALITY, 95])
        n += 1
print(n)
"""


def distinct_crops(n: int, seed: int = 0) -> list[Path]:
    """``n`` gender-data crops with distinct bytes, a seeded sample over the four folders."""
    seen, files = set(), []
    for p in sorted(GENDER.rglob("*.jpg")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            files.append(p)
    pick = np.random.default_rng(seed).choice(len(files), n, replace=False)
    return [files[i] for i in sorted(pick)]


def link_folder(files: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        os.symlink(f, folder / f"{i:05d}.jpg")
    return folder


def demo_copies(n: int, folder: Path) -> Path:
    """test1.jpg as ``n`` files of distinct bytes: JPEG qualities 99, 98, ... 60, then mirrored."""
    import cv2

    folder.mkdir(parents=True)
    img, seen = cv2.imread(str(CAFFE / "test1.jpg")), set()
    for i in range(n):
        im = img if i < 40 else img[:, ::-1]
        ok, data = cv2.imencode(".jpg", np.ascontiguousarray(im), [cv2.IMWRITE_JPEG_QUALITY, 99 - i % 40])
        assert ok and data.tobytes() not in seen
        seen.add(data.tobytes())
        (folder / f"{i:05d}.jpg").write_bytes(data.tobytes())
    return folder


def prepare_packages(artifacts: Path) -> None:
    """UltraFace and MTCNN converted into ``artifacts/models`` as ``graft faces --caffe`` would."""
    os.environ["GRAFT_ARTIFACTS"] = str(artifacts)
    from faces.detectors import DETECTORS
    from faces.detectors.mtcnn import any_size_onnx
    from faces.detectors.packages import find_packages

    find_packages("ultraface", DETECTORS["ultraface"].releases, ULTRA)
    any_size_onnx(find_packages("mtcnn", DETECTORS["mtcnn"].releases, CAFFE)[0])


def graft_detector(kind: str):
    """The detector ``graft faces --detector kind`` builds with its default flags."""
    from faces.detectors import DetectorOptions, build_detector, packages_of

    return build_detector(*packages_of(kind), DetectorOptions())


def rounds(methods: dict, n: int, count: int) -> dict[str, list[float]]:
    """Each method's seconds per pass, ``count`` rounds, methods alternating (a warm-up first)."""
    for fn in methods.values():
        fn(warm=True)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(count):
        order = list(methods) if r % 2 == 0 else list(methods)[::-1]
        for m in order:
            t = time.perf_counter()
            methods[m]()
            times[m].append(time.perf_counter() - t)
    return times


def in_process(kind: str, rgb: list[np.ndarray], bgr: list[np.ndarray], count: int, batch: int) -> tuple:
    det = graft_detector(kind)
    ref = UltraFaceCV() if kind == "ultraface" else Reference()
    found = {}

    def graft(warm: bool = False) -> None:
        cv2.setNumThreads(1)  # as in `graft faces`
        ims = rgb[:batch] if warm else rgb
        if hasattr(det, "detect_batch"):
            out = [f for i in range(0, len(ims), batch) for f in det.detect_batch(ims[i:i + batch])]
        else:
            out = [det.detect(im) for im in ims]
        found["graft"] = sum(map(len, out))

    def opencv(warm: bool = False) -> None:
        cv2.setNumThreads(CV_THREADS)  # as in a user's script
        ims = bgr[:batch] if warm else bgr
        if kind == "ultraface":
            out = [ref.detect(im) for im in ims]
        else:
            out = [ref.detect(im[:, :, ::-1])[0] for im in ims]
        found["opencv"] = sum(map(len, out))

    times = rounds({"graft": graft, "opencv": opencv}, len(rgb), count)
    return times, found


def run(cmd: list[str], ok: tuple[int, ...] = (0,)) -> str:
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd[:5])}... failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout


def end_to_end(kind: str, folder: Path, tmp: Path, count: int) -> tuple:
    k = {"graft": 0, "opencv": 0}
    found = {}

    def graft(warm: bool = False) -> None:
        k["graft"] += 1
        out = tmp / f"graft-{kind}-{folder.name}-{k['graft']}"
        # exit 1: some photo had no face (it is in failures.csv): a result, not an error
        said = run([sys.executable, "cli.py", "faces", "--detector", kind, "--images", str(folder), "--out", str(out),
                    "--no-progress", "--sample-sheet", "0"], ok=(0, 1))
        found["graft"] = int(said.split(" faces written")[0].split()[-1])

    def opencv(warm: bool = False) -> None:
        k["opencv"] += 1
        out = tmp / f"cv-{kind}-{folder.name}-{k['opencv']}"
        found["opencv"] = int(run([sys.executable, "-c", OPENCV, str(REPO / "tests"), kind, str(folder), str(out)]))

    methods = {"graft": graft, "opencv": opencv}
    times = {m: [] for m in methods}
    for r in range(count):  # no warm-up pass: each run is a fresh process anyway
        for m in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
            t = time.perf_counter()
            methods[m]()
            times[m].append(time.perf_counter() - t)
    return times, found


def row(label: str, n: int, times: dict, found: dict) -> str:
    g, c = n / float(np.median(times["graft"])), n / float(np.median(times["opencv"]))
    fmt = lambda ts: " / ".join(f"{t:.2f}" for t in ts)  # noqa: E731
    return (f"| {label} | {n} | {g:.1f} | {c:.1f} | **{g / c:.2f}x** | {fmt(times['graft'])} | {fmt(times['opencv'])} | "
            f"{found['graft']} / {found['opencv']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="distinct IMDB-WIKI crops (default 200)")
    ap.add_argument("--copies", type=int, default=40, help="distinct re-encodings of test1.jpg (default 40)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--detectors", default="ultraface,mtcnn")
    ap.add_argument("--skip", choices=("none", "in-process", "e2e"), default="none")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        prepare_packages(tmp / "artifacts")
        sets = {"IMDB-WIKI crops (1 face each)": link_folder(distinct_crops(args.n), tmp / "crops"),
                "test1.jpg re-encoded (450x344, 2 faces)": demo_copies(args.copies, tmp / "demo")}
        decoded = {}
        for label, folder in sets.items():
            files = sorted(folder.iterdir())
            bgr = [cv2.imread(str(f), cv2.IMREAD_COLOR) for f in files]
            decoded[label] = ([np.ascontiguousarray(b[:, :, ::-1]) for b in bgr], bgr)
        tables: dict[str, list[str]] = {"in-process": [], "e2e": []}
        for kind in args.detectors.split(","):
            for label, folder in sets.items():
                rgb, bgr = decoded[label]
                name = f"{kind}, {label}"
                if args.skip != "in-process":
                    times, found = in_process(kind, rgb, bgr, args.rounds, 8)
                    tables["in-process"].append(row(name, len(rgb), times, found))
                    print(tables["in-process"][-1], file=sys.stderr)
                if args.skip != "e2e":
                    times, found = end_to_end(kind, folder, tmp, args.rounds)
                    tables["e2e"].append(row(name, len(rgb), times, found))
                    print(tables["e2e"][-1], file=sys.stderr)

    import onnxruntime

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python "
          f"{platform.python_version()}, OpenCV {cv2.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"both at their default thread counts (OpenCV {CV_THREADS}, graft's cv2 1); {args.rounds} alternating rounds, medians\n")
    head = ("| detector, images | photos | graft photos/s | OpenCV DNN photos/s | graft / OpenCV | graft s per round "
            "| OpenCV s per round | faces graft / OpenCV |\n|---|---:|---:|---:|---:|---|---|---|")
    titles = {"in-process": "Detection only (photos decoded beforehand, in process)",
              "e2e": "End to end from the files (fresh process each: start-up, read, detect, crop, write)"}
    for key, lines in tables.items():
        if lines:
            print(f"**{titles[key]}**\n\n{head}")
            print("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
