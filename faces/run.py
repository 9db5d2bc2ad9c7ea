"""``graft faces`` as one library call: photos -> detected, cropped faces as a dataset folder.

Per photo: read the bytes, hash them (sha256), skip the photo when ``--out`` already holds its
record; else decode (EXIF orientation applied: ``extract.preprocess.decode``), detect (batched
when the detector can), optionally find landmarks (MTCNN's ONet for detectors without them),
crop (:mod:`faces.align`) and write (:mod:`faces.dataset`). Reading, hashing and decoding run in
worker threads ahead of detection; the window is bounded, so memory stays flat on big folders.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .align import crop_face
from .dataset import FacesFolder
from .detectors import DetectorOptions, build_detector, package_identity, packages_of
from .detectors.packages import Release, find_packages
from .types import Face

#: MTCNN's ONet, which gives landmarks to detectors that have none (``--align``)
ONET = Release("mtcnn-det3", "det3", "mtcnn")


@dataclass
class FacesSummary:
    photos: int = 0
    done_before: int = 0
    computed: int = 0
    faces: int = 0
    no_face: int = 0
    unreadable: int = 0
    seconds: float = 0.0
    out: str = ""
    sheets: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.no_face + self.unreadable


def format_summary(s: FacesSummary) -> str:
    rate = s.computed / s.seconds if s.seconds > 0 else 0.0
    return (f"{s.photos} photos: {s.faces} faces written, {s.computed} computed ({rate:.1f} photos/s), "
            f"{s.done_before} done before, {s.no_face} without a face, {s.unreadable} unreadable "
            f"({s.seconds:.1f} s) -> {s.out}/faces.csv" + (f", failures in {s.out}/failures.csv" if s.failed else ""))


@dataclass
class _Photo:
    row: dict
    sha: str | None = None
    record: dict | None = None  # already done
    image: np.ndarray | None = None  # RGB uint8, to compute
    failure: str | None = None
    done_before: bool = False


def _load(folder: FacesFolder, row: dict) -> _Photo:
    from extract.preprocess import ImageError, _read, decode_bytes

    photo = _Photo(row)
    try:
        data = _read(row["path"])
    except ImageError as err:
        photo.failure = str(err)
        return photo
    photo.sha = hashlib.sha256(data).hexdigest()
    photo.record = folder.read_record(photo.sha)
    photo.done_before = photo.record is not None
    if photo.record is None:
        try:
            photo.image = np.ascontiguousarray(decode_bytes(data)[:, :, ::-1])
        except ImageError as err:
            photo.failure = str(err)
    return photo


def _ahead(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, window: int) -> Iterator[Any]:
    """``map(fn, items)`` in threads, in order, at most ``window`` results held."""
    from extract.pipeline import run_ahead

    with ThreadPoolExecutor(workers, thread_name_prefix="graft-faces") as pool:
        for _, result in run_ahead(pool, fn, items, window):
            yield result


def _batches(photos: Iterable[_Photo], size: int) -> Iterator[list[_Photo]]:
    batch: list[_Photo] = []
    for p in photos:
        batch.append(p)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Cropper:
    """Detector (built on first use: a resumed run that computes nothing loads no net), landmarks, crops."""

    def __init__(self, kind: str, pkgs: list, opts: DetectorOptions, onet: Any, size: int, margin: float,
                 align: bool, largest: bool) -> None:
        self.kind, self.pkgs, self.opts, self.onet = kind, pkgs, opts, onet
        self.size, self.margin, self.align, self.largest = size, margin, align, largest
        self._detector: Any = None

    @property
    def detector(self) -> Any:
        if self._detector is None:
            self._detector = build_detector(self.kind, self.pkgs, self.opts)
        return self._detector

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        det = self.detector
        found = det.detect_batch(images) if hasattr(det, "detect_batch") else [det.detect(im) for im in images]
        if self.largest:
            found = [sorted(f, key=lambda x: -(x.box[2] - x.box[0]) * (x.box[3] - x.box[1]))[:1] for f in found]
        if self.onet is not None:
            from .detectors.mtcnn import onet_landmarks

            for im, faces in zip(images, found):
                if faces and any(f.landmarks is None for f in faces):
                    lms = onet_landmarks(self.onet, im, np.stack([f.box for f in faces]))
                    for f, lm in zip(faces, lms):
                        f.landmarks = np.asarray(lm, np.float64).reshape(5, 2)
        return found

    def crops(self, image: np.ndarray, faces: list[Face]) -> list[np.ndarray]:
        return [crop_face(image, f.box, f.landmarks, self.size, self.margin, self.align) for f in faces]


def make_faces(detector: str, records: pd.DataFrame, out: str | Path, *, caffe: str | Path | None = None, size: int = 224,
               margin: float = 0.2, align: bool = False, largest: bool = False, max_faces: int | None = None,
               score_threshold: float | None = None, min_size: int = 20, class_id: int = 1, device: str = "cpu",
               backend: str = "auto", batch_size: int = 8, workers: int = 2, progress: bool = True,
               sample_sheet: int = 16, log: Callable[[str], None] = print) -> FacesSummary:
    """Detect and crop the faces of every photo in ``records`` (``extract.sources.load_records``) into ``out``."""
    t0 = time.perf_counter()
    kind, pkgs = packages_of(detector, caffe)
    onet = None
    if align and kind != "mtcnn":
        onet = find_packages(f"{detector} --align (landmarks from MTCNN's ONet)", (ONET,), caffe)[0]
    opts = DetectorOptions(device=device, backend=backend, score_threshold=score_threshold, max_faces=max_faces,
                           class_id=class_id, min_size=min_size)
    name = pkgs[0].name if kind == "ssd" else kind
    settings = {"detector": name, "packages": package_identity(pkgs + ([onet] if onet is not None else [])),
                "score_threshold": score_threshold, "max_faces": max_faces, "largest": largest, "size": size,
                "margin": margin, "align": align, "border": "replicate",
                **({"min_size": min_size} if kind == "mtcnn" else {}), **({"class_id": class_id} if kind == "ssd" else {})}
    folder = FacesFolder(out, settings)
    cropper = _Cropper(kind, pkgs, opts, onet, size, margin, align, largest)
    summary = FacesSummary(photos=len(records), out=str(folder.dir))
    done: list[tuple[dict, dict]] = []
    failures: list[tuple[str, str]] = []
    rows = records.to_dict("records")
    from tqdm import tqdm

    bar = tqdm(total=len(rows), unit="photo", disable=not progress, smoothing=0.1, dynamic_ncols=True)
    finished = False
    try:
        loaded = _ahead(lambda r: _load(folder, r), rows, workers, max(4 * batch_size, 16))
        for batch in _batches(loaded, batch_size):
            todo = [p for p in batch if p.image is not None]
            found = cropper.detect([p.image for p in todo]) if todo else []
            for p, faces in zip(todo, found):
                p.record = folder.write(p.sha, p.image.shape, faces, cropper.crops(p.image, faces),
                                        failure=None if faces else "no face")
                p.image = None
                summary.computed += 1
            for p in batch:
                if p.record is None and p.sha is not None:  # read but not decodable: a result too
                    p.record = folder.write(p.sha, (0, 0), [], [], failure=p.failure or "unreadable")
                    summary.computed += 1
                summary.done_before += p.done_before
                if p.record is None:  # missing or unreadable file: retried by the next run
                    summary.unreadable += 1
                    failures.append((p.row["path"], p.failure or "unreadable"))
                else:
                    _count(summary, p.record, failures, p.row["path"])
                    done.append((p.row, p.record))
            bar.update(len(batch))
        finished = True
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - t0
        table = folder.write_tables(done, failures, name)
        if finished and sample_sheet:
            from .report import contact_sheets

            summary.sheets = contact_sheets(folder.dir, table, sample_sheet)
    return summary


def _count(summary: FacesSummary, record: dict, failures: list[tuple[str, str]], path: str) -> None:
    summary.faces += len(record["faces"])
    reason = record.get("failure")
    if reason == "no face":
        summary.no_face += 1
    elif reason:
        summary.unreadable += 1
    if reason:
        failures.append((path, reason))
