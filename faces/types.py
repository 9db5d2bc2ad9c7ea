"""What every face detector returns, and what the rest of ``faces`` consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

#: landmark order, as MTCNN's ONet gives them (and the alignment template is written in)
LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass
class Face:
    """One detected face, in pixel coordinates of the (EXIF-oriented) photo.

    ``box`` is (x1, y1, x2, y2) floats; ``landmarks`` is (5, 2) x, y in :data:`LANDMARKS` order
    (the subject's left eye is on the image's left for a frontal face, as MTCNN names them), or
    None when the detector gives none."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray | None = None


class Detector(Protocol):
    """A face detector: one RGB uint8 (H, W, 3) photo in, faces out, best score first."""

    name: str

    def detect(self, image: np.ndarray) -> list[Face]:
        ...
