"""Photos per second of graft's MTCNN (onnxruntime and torch on CPU) vs the same cascade on
OpenCV DNN (the reference in tests/_opencv_faces.py), same images, same run; a Markdown table.

    python bench/bench_faces_mtcnn.py [--crops 100] [--repeat 20] [--rounds 3]

Images are decoded beforehand; each figure is the best of ``--rounds`` passes (one warm-up
pass first). Also counts how many photos' faces agree with the reference (same number).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _opencv_faces import Reference  # noqa: E402
from test_faces_mtcnn import CAFFE, read_rgb, sample_crops  # noqa: E402

from faces.detectors.mtcnn import MTCNN, convert_mtcnn  # noqa: E402


def rate(detect, images: list[np.ndarray], rounds: int) -> float:
    for img in images[:3]:
        detect(img)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for img in images:
            detect(img)
        best = min(best, time.perf_counter() - t)
    return len(images) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crops", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=20, help="passes over test1.jpg per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pkgs = convert_mtcnn(CAFFE, tmp)
        ref = Reference()
        runners = {"graft onnxruntime-cpu": MTCNN(*pkgs, backend="onnxruntime").detect,
                   "graft torch-cpu": MTCNN(*pkgs, backend="torch").detect,
                   "OpenCV DNN (reference)": lambda img: ref.detect(img)}
        sets = {"test1.jpg (450x344, 2 faces)": [read_rgb(CAFFE / "test1.jpg")] * args.repeat,
                f"{args.crops} IMDB-WIKI crops": [read_rgb(p) for p in sample_crops(args.crops)]}
        agree = sum(len(runners["graft onnxruntime-cpu"](img)) == len(ref.detect(img)[0])
                    for img in sets[f"{args.crops} IMDB-WIKI crops"])
        print("| images | " + " | ".join(runners) + " |")
        print("|---|" + "---:|" * len(runners))
        for label, images in sets.items():
            print(f"| {label} | " + " | ".join(f"{rate(fn, images, args.rounds):.1f}" for fn in runners.values()) + " |")
        print(f"\nphotos/s, best of {args.rounds}; same face count as the reference on {agree}/{args.crops} crops")


if __name__ == "__main__":
    main()
