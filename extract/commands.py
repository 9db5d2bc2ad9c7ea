"""``graft extract``: cache embeddings of named blobs for a folder, CSV or Caffe list of images."""

from __future__ import annotations

import argparse
import signal
from typing import Any

from convert.cli_common import (
    add_image_inputs,
    device,
    mean,
    non_negative_float,
    positive,
    positive_float,
    sigterm_as_interrupt,
    size,
)

#: extract.preprocess's RESIZE_MODES and RESIZE_FILTERS keys, named here so ``--help`` imports neither cv2 nor PIL
#: (a test keeps them equal)
RESIZE_MODE_NAMES = ("squash", "shorter-side")
RESIZE_FILTER_NAMES = ("linear", "area", "cubic", "pil-bilinear", "pil-bicubic", "pil-lanczos")


def register(subparsers: Any) -> None:
    """Add the ``extract`` subcommand to graft's command line."""
    p = subparsers.add_parser(
        "extract",
        help="cache embeddings of named blobs for a set of images (resumable)",
        description="Run a converted model over images and cache the named blobs, one row per distinct image "
        "(sha256 of its bytes). Re-running the same command resumes; nothing is computed twice.",
    )
    p.add_argument("--model", required=True, help="model package: a name under artifacts/models/ or a folder")
    p.add_argument("--layer", required=True, action="append", metavar="BLOB[,BLOB...]",
                   help="blob name(s), as in the package manifest (post in-place value; '<blob>/pre_<layer>' for the raw one)")
    src = add_image_inputs(p)
    src.add_argument("--dataset", metavar="NAME", help="name of the dataset these rows become, what fit-head --dataset "
                     "trains on (default: the folder's name or the file's stem; a re-run replaces it)")
    pp = p.add_argument_group("preprocessing overrides (default: the package manifest's)")
    pp.add_argument("--mean", type=mean, metavar="M[,M,M]", help="per-channel mean, model channel order (replaces a mean image)")
    pp.add_argument("--scale", type=positive_float, help="multiply after mean subtraction")
    pp.add_argument("--channel-order", choices=("rgb", "bgr"), help="channel order the network expects")
    pp.add_argument("--resize", type=size, metavar="N|H,W", help="squash-resize to this size first (0: none)")
    pp.add_argument("--crop", type=size, metavar="N|H,W", help="centre crop after resizing (0: none)")
    pp.add_argument("--resize-mode", choices=RESIZE_MODE_NAMES,
                    help="squash (Caffe's: aspect ignored) or shorter-side (keep the aspect, cover --resize, take its centre)")
    pp.add_argument("--resize-filter", choices=RESIZE_FILTER_NAMES,
                    help="linear: OpenCV INTER_LINEAR on uint8, as Caffe (default); pil-bilinear: graft's filter before cv2-exif/2")
    pp.add_argument("--fast-decode", action="store_true", default=None,
                    help="decode big JPEGs at 1/2, 1/4 or 1/8 scale (still >= the resize size): faster on CPU, not Caffe-exact")
    run = p.add_argument_group("running")
    run.add_argument("--backend", choices=("auto", "onnxruntime", "torch"), default="auto")
    run.add_argument("--device", type=device, default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                     help="auto: torch+CUDA (bf16 autocast where the GPU has it, else fp32) when a GPU is visible, else "
                     "onnxruntime on CPU; cuda:N: GPU N (not part of the cache key)")
    run.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                     help="compute precision (part of the cache key); fp16/bf16 need torch on CUDA; auto never picks fp16")
    run.add_argument("--batch-size", type=positive, help="images per forward (default: 8 on CPU, 64 on CUDA)")
    run.add_argument("--workers", type=positive, help="local: decode threads (default: min(4, cores) on CPU, min(16, cores) "
                     "on CUDA); ray: actors (default: the cluster's GPUs / --gpus-per-worker, or its CPUs / --cpus-per-worker)")
    ray = p.add_argument_group("engine (docs/cluster.md)")
    ray.add_argument("--engine", choices=("local", "ray"), default="local",
                     help="local: this process; ray: actors on a Ray cluster (pip install 'graft[ray]'), into the same cache")
    ray.add_argument("--ray-address", metavar="ADDR", help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT "
                     "(default: $RAY_ADDRESS, else a local one-machine cluster for the run)")
    ray.add_argument("--gpus-per-worker", type=non_negative_float, metavar="G",
                     help="GPUs each Ray actor reserves (default: 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--cpus-per-worker", type=positive_float, metavar="C",
                     help="CPUs each Ray actor reserves, also its decode and inference threads "
                     "(default: 1; GPU actors: the cluster's CPUs per GPU)")
    out = p.add_argument_group("cache")
    out.add_argument("--cache", metavar="DIR", help="model cache folder (default: artifacts/cache/<model name>)")
    out.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype")
    out.add_argument("--l2", action="store_true", help="store L2-normalised rows (recorded in the cache key)")
    out.add_argument("--shard-size", type=positive, default=4096, help="rows per shard file (also the most a kill can lose)")
    out.add_argument("--rehash", action="store_true", help="read and hash every file, not trusting the stat memo "
                     "(files whose size, times and inode are unchanged since a past run keep their sha256 unread)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_extract)



def run_extract(args: argparse.Namespace) -> int:
    """CLI entry: load inputs, run, print the summary; exit 1 when any image failed."""
    from convert.errors import GraftError
    from extract.backends import BackendError
    from extract.cache import CacheError
    from extract.pipeline import extract, format_summary
    from extract.preprocess import ImageError
    from extract.sources import SourceError, load_records

    blobs = [b.strip() for spec in args.layer for b in spec.split(",") if b.strip()]
    if not blobs:
        raise GraftError("--layer: no blob names given")
    overrides = {"mean": args.mean, "scale": args.scale, "channel_order": args.channel_order, "resize": args.resize, "crop": args.crop,
                 "resize_mode": args.resize_mode, "resize_filter": args.resize_filter, "fast_decode": args.fast_decode}
    try:
        records = load_records(images=args.images, csv=args.csv, list_file=args.list_file, root=args.root, path_column=args.path_column)
        old = signal.signal(signal.SIGTERM, sigterm_as_interrupt)  # a scheduler's kill flushes buffered rows too
        try:
            summary, _ = extract(
                args.model, blobs, records, cache=args.cache, preprocess=overrides, backend=args.backend, device=args.device,
                precision=args.precision, batch_size=args.batch_size, workers=args.workers, dtype=args.dtype, l2=args.l2,
                shard_size=args.shard_size, progress=not args.no_progress, dataset=args.dataset,
                stat_memo=not args.rehash, engine=args.engine, ray_address=args.ray_address,
                gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
            )
        finally:
            signal.signal(signal.SIGTERM, old)
    except (SourceError, CacheError, BackendError, ImageError, ValueError) as err:
        raise GraftError(str(err)) from err
    print(format_summary(summary))
    return 1 if summary.failed else 0
