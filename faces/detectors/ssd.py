"""Any converted SSD-style detector: a package whose output is Caffe's ``DetectionOutput``.

Its rows, ``[1, 1, N, 7]`` for the whole batch, are (image_id, label, score, x1, y1, x2, y2) with
the corners as fractions of the input; Caffe has already applied its NMS and ``keep_top_k``, and
an image with nothing found gives one row of -1s. Here a face is a row of ``class_id`` (default
1, the first non-background label) scoring above the threshold (default 0.5), scaled to the photo.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from convert.errors import GraftError

from ..types import Face
from .net import PackageNet

SCORE_THRESHOLD = 0.5


def detection_blob(pkg: Any) -> str:
    """The package output shaped (1, 1, N, 7); a one-line error when it has none."""
    for name in pkg.outputs:
        shape = pkg.blobs[name]["shape"]
        if len(shape) == 4 and shape[-1] == 7 and shape[:2] == [1, 1]:
            return name
    raise GraftError(f"--detector {pkg.dir}: not a detector graft knows (ultraface, mtcnn) and no output is "
                     f"Caffe DetectionOutput [1, 1, N, 7] (outputs: {', '.join(pkg.outputs)})")


def rows_to_faces(rows: np.ndarray, image_id: int, width: int, height: int, class_id: int = 1,
                  threshold: float = SCORE_THRESHOLD, max_faces: int | None = None) -> list[Face]:
    """DetectionOutput rows (M, 7) -> the faces of image ``image_id`` in pixels, best first, clipped."""
    mine = rows[(rows[:, 0] == image_id) & (rows[:, 1] == class_id) & (rows[:, 2] > threshold)]
    mine = mine[np.argsort(-mine[:, 2], kind="stable")][: max_faces or None]
    faces = []
    for r in mine:
        box = np.clip(r[3:7].astype(np.float64), 0.0, 1.0) * [width, height, width, height]
        if box[2] > box[0] and box[3] > box[1]:
            faces.append(Face(box=box, score=float(r[2])))
    return faces


class SSD:
    """A DetectionOutput package as a :class:`faces.types.Detector`; photos batch at its input size."""

    def __init__(self, pkg: Any, *, class_id: int = 1, device: str = "cpu", backend: str = "auto",
                 score_threshold: float | None = None, max_faces: int | None = None) -> None:
        self.name = pkg.name
        self.blob = detection_blob(pkg)
        self.net = PackageNet(pkg, [self.blob], device=device, backend=backend)
        self.class_id = class_id
        self.score_threshold = SCORE_THRESHOLD if score_threshold is None else score_threshold
        self.max_faces = max_faces

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        rows = self.net(images)[self.blob].reshape(-1, 7)
        return [rows_to_faces(rows, k, im.shape[1], im.shape[0], self.class_id, self.score_threshold, self.max_faces)
                for k, im in enumerate(images)]

    def detect(self, image: np.ndarray) -> list[Face]:
        return self.detect_batch([image])[0]
