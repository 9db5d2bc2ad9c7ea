"""``faces`` -> ``extract`` -> ``fit-head`` on the IMDB-WIKI gender faces, beside the crops as given.

    .venv/bin/python bench/bench_faces_e2e.py --n 0

Every stage is the command a user runs (``cli.py ...`` in a fresh process, timed from spawn to
exit), under a temporary ``GRAFT_ARTIFACTS``, so nothing lands in the repository:

(a) crops as given: ``extract --model open_nsfw --layer pool --images gender-data/train``, then
    ``fit-head --task label`` (the class folders female / male are the labels);
(b) ``faces --detector ultraface --largest`` over the same photos, then ``extract --csv
    OUT/faces.csv --root OUT`` and ``fit-head`` with the same settings;
(c) the same with ``--detector mtcnn --align``.

fit-head makes its own stratified 80/20 hold-out (seed 0) with its default search (logreg /
ridge / mlp by 5-fold CV on the training split); the detector datasets are grouped by
``photo_sha256``. Photos where no face was found are simply absent from (b) / (c), so their
test sets differ slightly from (a)'s: the table gives each one's size.

The model is open_nsfw (``pool``, 1,024-d, real weights, converted from the test bed as
bench/bench_extract.py does). It is **not a face model** (there are no real VGG-Face weights
here), so the absolute accuracies are modest; what is measured is crops as given vs detector crops.
"""

from __future__ import annotations

import argparse
import json
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
from bench.bench_extract import PROTO, TESTBED, WEIGHTS  # noqa: E402  (the same model as the extract benches)

GENDER = TESTBED / "faces" / "imdbwiki" / "gender-data"
ULTRA = TESTBED / "caffe" / "ultraface"
MTCNN = TESTBED / "caffe" / "mtcnn"


def cli(env: dict[str, str], *argv: str, ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    """``cli.py argv`` as a fresh process: (seconds, stdout); a failure stops the bench."""
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "cli.py", *argv], cwd=REPO, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode not in ok:
        raise SystemExit(f"graft {' '.join(argv[:6])}... failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return dt, res.stdout


def subset(n: int, folder: Path) -> Path:
    """gender-data/train, or ``n`` of its photos (half of each class, first by name) as symlinks."""
    if not n:
        return GENDER / "train"
    for cls in ("female", "male"):
        (folder / cls).mkdir(parents=True)
        for f in sorted((GENDER / "train" / cls).iterdir())[: n // 2]:
            os.symlink(f, folder / cls / f.name)
    return folder


def fit(env: dict[str, str], tmp: Path, dataset: str, extra: list[str]) -> tuple[float, dict]:
    out = tmp / "heads" / dataset
    dt, _ = cli(env, "fit-head", "--task", "label", "--model", "open_nsfw", "--layer", "pool", "--dataset", dataset,
                "--out", str(out), "--no-learning-curve", "--no-plots", "--quiet", *extra)
    return dt, json.loads((out / "card.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=0, help="photos of gender-data/train, half per class (0: all 1,000)")
    ap.add_argument("--detectors", default="ultraface,mtcnn", help="comma list of ultraface, mtcnn")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        env = dict(os.environ, GRAFT_ARTIFACTS=str(tmp / "artifacts"))
        models = tmp / "artifacts" / "models"
        t_convert, _ = cli(env, "convert", "--prototxt", str(PROTO), "--caffemodel", str(WEIGHTS), "--name", "open_nsfw",
                           "--out", str(models / "open_nsfw"), "--resize", "256", "--crop", "224", "--mean", "104,117,123",
                           "--channel-order", "bgr")
        photos = subset(args.n, tmp / "photos")
        n_photos = sum(1 for p in photos.rglob("*") if p.is_file())
        rows = []

        t_ex, _ = cli(env, "extract", "--model", "open_nsfw", "--layer", "pool", "--images", str(photos), "--dataset", "given",
                      "--no-progress")
        t_fit, card = fit(env, tmp, "given", [])
        rows.append(("crops as given", n_photos, n_photos, None, t_ex, t_fit, card))
        print(f"crops as given: extract {t_ex:.1f} s, fit-head {t_fit:.1f} s", file=sys.stderr)

        runs = {"ultraface": ("ultraface crops (`--largest`)", ["--detector", "ultraface", "--caffe", str(ULTRA)]),
                "mtcnn": ("mtcnn aligned crops (`--align --largest`)", ["--detector", "mtcnn", "--caffe", str(MTCNN), "--align"])}
        for kind in args.detectors.split(","):
            label, flags = runs[kind]
            out = tmp / f"faces-{kind}"
            # exit 1: some photo had no face (listed in failures.csv)
            t_faces, said = cli(env, "faces", *flags, "--images", str(photos), "--out", str(out), "--largest",
                                "--no-progress", "--sample-sheet", "0", ok=(0, 1))
            n_faces = int(said.split(" faces written")[0].split()[-1])
            t_ex, _ = cli(env, "extract", "--model", "open_nsfw", "--layer", "pool", "--csv", str(out / "faces.csv"),
                          "--root", str(out), "--dataset", kind, "--no-progress")
            t_fit, card = fit(env, tmp, kind, ["--group-column", "photo_sha256"])
            rows.append((label, n_photos, n_faces, t_faces, t_ex, t_fit, card))
            print(f"{label}: faces {t_faces:.1f} s ({n_faces} faces), extract {t_ex:.1f} s, fit-head {t_fit:.1f} s",
                  file=sys.stderr)

    import cv2

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python "
          f"{platform.python_version()}, OpenCV {cv2.__version__}; photos: "
          f"{'all of' if not args.n else f'{n_photos} of'} gender-data/train (female / male folders); open_nsfw "
          f"converted in {t_convert:.1f} s\n")
    print("Features: open_nsfw `pool` (1,024-d). **open_nsfw is not a face model** (no real VGG-Face weights "
          "here), so absolute accuracies are modest; compare the rows.\n")
    print("| crops | photos | faces found | train / test | head | test accuracy | test balanced accuracy | "
          "baseline accuracy | faces s | extract s | fit-head s |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for label, n, found, t_faces, t_ex, t_fit, card in rows:
        m, b, s = card["metrics"]["test"], card["metrics"]["baseline"], card["split"]
        head = card["head"]["type"] + (f"/{card['preprocess']['mode']}" if card.get("preprocess") else "")
        bal = m.get("balanced_accuracy")
        print(f"| {label} | {n} | {found} | {s['n_train']} / {s['n_test']} | {head} | {m['accuracy']:.4f} | "
              f"{'-' if bal is None else f'{bal:.4f}'} | {b['accuracy']:.4f} | "
              f"{'-' if t_faces is None else f'{t_faces:.1f}'} | {t_ex:.1f} | {t_fit:.1f} |")
    accs = [r[6]["metrics"]["test"]["accuracy"] for r in rows]
    if len(accs) > 1:
        n_test = rows[0][6]["split"]["n_test"]
        se = float(np.sqrt(accs[0] * (1 - accs[0]) / n_test))
        print(f"\nOne test split of about {n_test} photos: a difference under ~{2 * se:.3f} (2 standard errors of "
              f"the as-given accuracy) is noise.")


if __name__ == "__main__":
    main()
