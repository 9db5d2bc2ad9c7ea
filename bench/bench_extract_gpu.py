"""End-to-end extraction from JPEG files vs the same backend's model-only throughput (GPU target).

The target (issue "extract"): on one GPU, the VGG-Face-size package at 224x224 extracts end to
end from JPEG files at >= 85 % of the backend's model-only images/s (the data path is never the
bottleneck); on an H100, >= 5,000 images/s in bf16.

    python bench/bench_extract_gpu.py --n 20000 --batch-size 256 --precision bf16          # on a GPU host
    python bench/bench_extract_gpu.py --device cpu --precision fp32 --n 64 --batch-size 8 \\
        --package artifacts/models/det3 --blob conv5                                          # smoke test on a CPU

Without ``--package`` the VGG-Face package is made once: a 580 MB caffemodel with seeded random
weights from the test bed's real prototxt (``convert.generate``), converted with ``--preset
vgg-face``. The cache deduplicates by content, so the benchmark first writes N *distinct* JPEGs
(test-bed face crops, each with a few pixels changed, re-encoded at quality 90) under
artifacts/bench/faces-<N>/. Model-only = ``backend.run`` on already preprocessed batches (host to
device copy and results back included, as in the pipeline); end to end = ``run_pipeline`` (hash,
decode + preprocess in worker threads, inference, cache shard writes) into a fresh cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TESTBED = REPO.parent / "shared" / "testbed"
FACES = TESTBED / "faces" / "imdbwiki"
VGG_PROTOTXT = TESTBED / "caffe" / "vggface" / "VGG_FACE_deploy.v2_upgraded.prototxt"
VGG_MODEL = REPO / "artifacts" / "gen" / "vgg_face_v1.caffemodel"
VGG_PACKAGE = REPO / "artifacts" / "bench" / "vgg-face"


def vgg_face_package() -> Path:
    """The VGG-Face-architecture package (generated weights), made once."""
    import subprocess

    from convert.generate import generate_caffemodel

    if (VGG_PACKAGE / "manifest.json").is_file():
        return VGG_PACKAGE
    if not VGG_PROTOTXT.is_file():
        raise SystemExit(f"{VGG_PROTOTXT} not found: the benchmark needs ../shared/testbed (or pass --package)")
    if not VGG_MODEL.is_file():
        VGG_MODEL.parent.mkdir(parents=True, exist_ok=True)
        generate_caffemodel(VGG_PROTOTXT, VGG_MODEL, layout="V1")
    subprocess.run([sys.executable, "cli.py", "convert", "--preset", "vgg-face", "--caffemodel", str(VGG_MODEL),
                    "--out", str(VGG_PACKAGE)], cwd=REPO, check=True)
    return VGG_PACKAGE


def distinct_jpegs(n: int, threads: int) -> list[str]:
    """N distinct JPEG files made from the test-bed faces (cached between runs)."""
    from PIL import Image

    out = REPO / "artifacts" / "bench" / f"faces-{n}"
    done = out / ".complete"
    files = [str(out / f"{i:07d}.jpg") for i in range(n)]
    if done.is_file():
        return files
    sources = sorted(FACES.rglob("*.jpg"))
    if not sources:
        raise SystemExit(f"no JPEG faces under {FACES}")
    out.mkdir(parents=True, exist_ok=True)

    def make(i: int) -> None:
        with Image.open(sources[i % len(sources)]) as im:
            a = np.array(im.convert("RGB"))
        rng = np.random.default_rng(i)
        ys, xs = rng.integers(0, a.shape[0], 4), rng.integers(0, a.shape[1], 4)
        a[ys, xs] = rng.integers(0, 256, (4, 3), dtype=np.uint8)
        Image.fromarray(a).save(files[i], quality=90)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(make, range(n)))
    done.touch()
    return files


def model_only(net, batch: np.ndarray, seconds: float) -> float:
    """images/s of the backend on one batch already in host memory (as the pipeline hands it:
    uint8 pixels when the backend normalises them), one batch in flight as in the pipeline."""
    from extract.backends import submit

    for _ in range(3):
        net.run(batch)
    n, t, pending = 0, time.perf_counter(), None
    while time.perf_counter() - t < seconds:
        nxt = submit(net, batch)
        if pending is not None:
            pending()
        pending = nxt
        n += len(batch)
    pending()
    return n / (time.perf_counter() - t)


def main() -> None:
    from convert.cli_common import device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, help="model package (default: the generated VGG-Face package)")
    ap.add_argument("--blob", default="fc7")
    ap.add_argument("--n", type=int, default=20000, help="distinct JPEG files end to end")
    ap.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"))
    ap.add_argument("--device", default="cuda", type=device, help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, help="decode threads (default: graft's for the device)")
    ap.add_argument("--seconds", type=float, default=10.0, help="model-only timing window")
    args = ap.parse_args()

    import pandas as pd

    from convert import load_package
    from extract.backends import default_workers, device_kind, make_backend, parse_device
    from extract.cache import CacheWriter, cache_key
    from extract.pipeline import cache_config, resolve_preprocess, run_pipeline

    pkg = load_package(args.package or vgg_face_package())
    pkg.check_blobs([args.blob])
    pp = resolve_preprocess(pkg)
    workers = args.workers or default_workers(args.device)
    files = distinct_jpegs(args.n, max(4, os.cpu_count() or 1))
    net = make_backend(pkg, [args.blob], backend=args.backend, device=args.device, precision=args.precision, preprocess=pp)
    u8 = bool(getattr(net, "takes_uint8", False)) and device_kind(args.device) == "cuda"  # what run_pipeline ships there
    load = pp.load_uint8 if u8 else pp.load
    batch = np.stack([load(f) for f in files[: args.batch_size]] * (args.batch_size // min(args.batch_size, len(files))))
    batch = batch[: args.batch_size]
    mo = model_only(net, batch, args.seconds)
    records = pd.DataFrame({"path": files, "rel_path": files, "source": "bench"})
    with tempfile.TemporaryDirectory() as tmp:
        config = cache_config(pkg.weights_sha256, pp, "float32", False, net.precision)
        with CacheWriter(Path(tmp) / cache_key(config), config, [args.blob]) as writer:
            t = time.perf_counter()
            summary, _ = run_pipeline(records, net, writer, pp, batch_size=args.batch_size, workers=workers, progress=False)
            e2e_s = time.perf_counter() - t
    if summary.computed != len(files) or summary.failed:
        raise SystemExit(f"pipeline computed {summary.computed} of {len(files)} ({summary.failed} failed)")
    e2e = len(files) / e2e_s
    device = platform.processor() or platform.machine()
    if device_kind(args.device) == "cuda":
        import torch

        device = torch.cuda.get_device_name(parse_device(args.device)[1])
    result = {
        "device": device, "cpu_cores": os.cpu_count(), "package": pkg.manifest["name"], "blob": args.blob,
        "input": pkg.input_shape, "backend": net.name, "precision": net.precision, "batch_size": args.batch_size,
        "workers": workers, "host_to_device": "uint8 NHWC, normalised on the device" if u8 else "float32 NCHW",
        "images": len(files), "model_only_images_per_s": round(mo, 1),
        "end_to_end_images_per_s": round(e2e, 1), "end_to_end_over_model_only": round(e2e / mo, 3),
        "target": ">= 0.85 of model-only; >= 5000 images/s bf16 on an H100 (VGG-Face, 224x224)",
    }
    print(json.dumps(result, indent=1))
    dest = REPO / "artifacts" / "bench" / "extract_gpu.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
