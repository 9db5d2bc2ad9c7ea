"""Convert a VGG-Face-size caffemodel end to end vs OpenCV reading it and running one forward.

Both run as fresh processes (imports included), alternating, in the same run; the ratio of
wall time and of peak resident memory is what the target is about (<= 1.5x each).

    python bench/bench_convert.py [--rounds 3]

The 580 MB caffemodel is generated once (seeded random weights, V1 binary layout, from the
test bed's real VGG-Face prototxt) under artifacts/gen/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT.parent / "shared" / "testbed" / "caffe" / "vggface"
PROTOTXT = TESTBED / "VGG_FACE_deploy.v2_upgraded.prototxt"
MODEL = ROOT / "artifacts" / "gen" / "vgg_face_v1.caffemodel"

OPENCV = """
import sys, numpy as np, cv2
net = cv2.dnn.readNetFromCaffe(sys.argv[1], sys.argv[2])
net.setInput(np.random.default_rng(0).uniform(0, 255, (1, 3, 224, 224)).astype(np.float32))
out = net.forward()
assert out.shape == (1, 2622)
"""


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not PROTOTXT.is_file():
        raise SystemExit(f"{PROTOTXT} not found: the benchmark needs ../shared/testbed")
    if not MODEL.is_file():
        MODEL.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "convert.generate", str(PROTOTXT), str(MODEL), "--layout", "V1"],
                       cwd=ROOT, check=True)
    out_dir = ROOT / "artifacts" / "bench" / "vgg-face"
    ours = [sys.executable, "cli.py", "convert", "--preset", "vgg-face", "--caffemodel", str(MODEL), "--out", str(out_dir)]
    ref = [sys.executable, "-c", OPENCV, str(PROTOTXT), str(MODEL)]
    inspect = [sys.executable, "cli.py", "inspect", str(out_dir)]
    run(ref)  # warm the page cache for both
    rows = {"opencv": [], "graft": [], "inspect": []}
    for _ in range(args.rounds):
        rows["opencv"].append(run(ref))
        rows["graft"].append(run(ours))
        rows["inspect"].append(run(inspect))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for k, v in rows.items()}
    result = {
        "model_mb": round(MODEL.stat().st_size / 1e6, 1),
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "opencv_s": round(med["opencv"][0], 2), "opencv_peak_mb": round(med["opencv"][1]),
        "graft_s": round(med["graft"][0], 2), "graft_peak_mb": round(med["graft"][1]),
        "inspect_s": round(med["inspect"][0], 2),
        "time_ratio": round(med["graft"][0] / med["opencv"][0], 2),
        "memory_ratio": round(med["graft"][1] / med["opencv"][1], 2),
    }
    manifest = json.loads((out_dir / "manifest.json").read_text())
    result["graft_stages_s"] = manifest["timings_s"]
    print(json.dumps(result, indent=1))
    dest = ROOT / "artifacts" / "bench" / "convert.json"
    dest.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
