"""UltraFace RFB-320 (Linzaer, Ultra-Light-Fast-Generic-Face-Detector-1MB), a converted package.

The Caffe graph ends before post-processing: ``boxes`` (1, 4420, 4) are raw SSD offsets against
the authors' priors (their ``version-RFB-320_without_postprocessing.onnx`` gives the same
numbers), ``scores`` (1, 4420, 2) softmax (background, face). Decoding follows the authors'
``vision/utils/box_utils.py`` (``generate_priors``, ``convert_locations_to_boxes``, centre
variance 0.1, size variance 0.2) and their demo (score > 0.7, hard NMS at IoU 0.3, here
OpenCV's ``cv2.dnn.NMSBoxes``). The input is fixed (320 × 240), so photos batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from ..types import Face
from .net import PackageNet

MIN_BOXES = ((10, 16, 24), (32, 48), (64, 96), (128, 192, 256))
STRIDES = (8, 16, 32, 64)
CENTER_VARIANCE, SIZE_VARIANCE = 0.1, 0.2
SCORE_THRESHOLD, NMS_IOU = 0.7, 0.3


def generate_priors(width: int = 320, height: int = 240) -> np.ndarray:
    """(N, 4) priors (cx, cy, w, h), fractions of the input, in the heads' order (authors' code)."""
    priors = []
    for stride, sizes in zip(STRIDES, MIN_BOXES):
        fw, fh = math.ceil(width / stride), math.ceil(height / stride)
        for j in range(fh):
            for i in range(fw):
                for m in sizes:
                    priors.append(((i + 0.5) * stride / width, (j + 0.5) * stride / height, m / width, m / height))
    return np.clip(np.asarray(priors, np.float32), 0.0, 1.0)


def decode_boxes(locations: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Raw offsets (..., N, 4) -> corner boxes (x1, y1, x2, y2), fractions of the input."""
    centre = locations[..., :2] * CENTER_VARIANCE * priors[:, 2:] + priors[:, :2]
    size = np.exp(locations[..., 2:] * SIZE_VARIANCE) * priors[:, 2:]
    return np.concatenate([centre - size / 2, centre + size / 2], axis=-1)


def select(boxes: np.ndarray, scores: np.ndarray, width: int, height: int, threshold: float = SCORE_THRESHOLD,
           max_faces: int | None = None, iou: float = NMS_IOU) -> list[Face]:
    """One photo's decoded fractional boxes (N, 4) and face scores (N,) -> faces in pixels, best first,
    clipped to the photo."""
    keep = scores > threshold
    if not keep.any():
        return []
    b = boxes[keep] * np.asarray([width, height, width, height], np.float32)
    b = np.clip(b, 0, [width, height, width, height])
    s = scores[keep]
    rects = [(float(x1), float(y1), float(x2 - x1), float(y2 - y1)) for x1, y1, x2, y2 in b]
    picked = np.asarray(cv2.dnn.NMSBoxes(rects, s.astype(float).tolist(), threshold, iou, top_k=max_faces or 0)).reshape(-1)
    picked = sorted(picked.tolist(), key=lambda i: -s[i])[: max_faces or None]
    return [Face(box=b[i].astype(np.float64), score=float(s[i])) for i in picked if b[i, 2] > b[i, 0] and b[i, 3] > b[i, 1]]


class UltraFace:
    """The RFB-320 package as a :class:`faces.types.Detector`, with a batched :meth:`detect_batch`."""

    name = "ultraface"

    def __init__(self, pkg: Any, *, device: str = "cpu", backend: str = "auto", score_threshold: float | None = None,
                 max_faces: int | None = None) -> None:
        self.net = PackageNet(pkg, ["boxes", "scores"], device=device, backend=backend)
        h, w = self.net.input_hw
        self.priors = generate_priors(w, h)
        self.score_threshold = SCORE_THRESHOLD if score_threshold is None else score_threshold
        self.max_faces = max_faces

    def decode(self, raw_boxes: np.ndarray, scores: np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[list[Face]]:
        """The net's outputs for a batch -> faces per photo (``sizes``: each photo's (H, W))."""
        boxes = decode_boxes(raw_boxes, self.priors)
        return [select(boxes[k], scores[k, :, 1], w, h, self.score_threshold, self.max_faces)
                for k, (h, w) in enumerate(sizes)]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        out = self.net(images)
        return self.decode(out["boxes"], out["scores"], [im.shape[:2] for im in images])

    def detect(self, image: np.ndarray) -> list[Face]:
        return self.detect_batch([image])[0]
