"""``graft faces``: photos -> a folder of face crops with ``faces.csv``, the dataset ``extract`` reads.

Registering imports nothing heavy (no cv2, pandas, onnxruntime); the run imports ``faces.run``.
"""

from __future__ import annotations

import argparse
import signal
from typing import Any

from convert.cli_common import (
    add_image_inputs,
    device,
    fraction,
    non_negative,
    non_negative_float,
    positive,
    sigterm_as_interrupt,
)


def register(subparsers: Any) -> None:
    """Add the ``faces`` subcommand to graft's command line."""
    p = subparsers.add_parser(
        "faces", help="detect and crop faces: photos -> a folder of crops + faces.csv (resumable)",
        description="Detect faces in photos, crop them (square, margin, padded at the border; --align: "
        "similarity-aligned on 5 landmarks) and write crops/, faces.csv and failures.csv under --out. "
        "Re-running resumes: photos already done (by content hash) are skipped.")
    p.add_argument("--detector", required=True, metavar="NAME|PKG",
                   help="ultraface, mtcnn, or a converted SSD-style package folder (DetectionOutput [1,1,N,7])")
    p.add_argument("--caffe", metavar="DIR", help="folder of the released Caffe files (RFB-320.*, det1..det3.*): "
                   "converted once into artifacts/models/ when the packages are absent")
    add_image_inputs(p, csv_help="CSV with a path column; every other column is carried to faces.csv")
    out = p.add_argument_group("crops")
    out.add_argument("--out", required=True, metavar="DIR", help="output folder (crops/, records/, faces.csv, failures.csv, sheets/)")
    out.add_argument("--size", type=positive, default=224, help="crop side in pixels (default 224)")
    out.add_argument("--margin", type=non_negative_float, default=0.2,
                     help="added on each side, as a fraction of the box (or the template's) size (default 0.2)")
    out.add_argument("--align", action="store_true", help="similarity-align on the 5 landmarks to the ArcFace template "
                     "(ultraface/SSD: landmarks from MTCNN's ONet, package mtcnn-det3)")
    out.add_argument("--largest", action="store_true", help="keep only the largest face of each photo")
    out.add_argument("--max-faces", type=positive, help="keep at most this many faces per photo, best score first")
    out.add_argument("--sample-sheet", type=non_negative, default=16, metavar="N",
                     help="photos on the contact sheets in --out/sheets/ (0: none; default 16)")
    det = p.add_argument_group("detection")
    det.add_argument("--score-threshold", type=fraction, help="face score above which a detection counts "
                     "(default: ultraface 0.7, mtcnn 0.7 at ONet, SSD 0.5)")
    det.add_argument("--min-size", type=positive, default=20, help="mtcnn: smallest face in pixels (default 20)")
    det.add_argument("--class-id", type=non_negative, default=1, help="SSD package: the label that is a face (default 1)")
    det.add_argument("--device", type=device, default="cpu", metavar="{auto,cpu,cuda,cuda:N}", help="default cpu")
    det.add_argument("--backend", choices=("auto", "onnxruntime", "torch"), default="auto",
                     help="auto: onnxruntime on CPU, torch on CUDA")
    det.add_argument("--batch-size", type=positive, default=8, help="photos per forward for fixed-size detectors (default 8)")
    det.add_argument("--workers", type=positive, default=2, help="threads reading, hashing and decoding photos (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_faces)


def run_faces(args: argparse.Namespace) -> int:
    """CLI entry: load inputs, run, print the summary; exit 1 when any photo failed or had no face."""
    from convert.errors import GraftError
    from extract.backends import BackendError
    from extract.sources import SourceError, load_records
    from faces.run import format_summary, make_faces

    try:
        records = load_records(images=args.images, csv=args.csv, list_file=args.list_file, root=args.root,
                               path_column=args.path_column)
        old = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
        try:
            summary = make_faces(
                args.detector, records, args.out, caffe=args.caffe, size=args.size, margin=args.margin, align=args.align,
                largest=args.largest, max_faces=args.max_faces, score_threshold=args.score_threshold,
                min_size=args.min_size, class_id=args.class_id, device=args.device, backend=args.backend,
                batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
                sample_sheet=args.sample_sheet)
        finally:
            signal.signal(signal.SIGTERM, old)
    except (SourceError, BackendError) as err:
        raise GraftError(str(err)) from err
    print(format_summary(summary))
    return 1 if summary.failed else 0
