"""Face crops: the detector's box (or the 5 landmarks) -> a square ``size`` × ``size`` image.

Box crops: the box grows by ``margin`` × its width (height) on each side, becomes a square on
its longer side around the same centre, and is cut out; where the square leaves the photo it is
**padded by replicating the edge pixels** (``cv2.BORDER_REPLICATE``), never shifted back inside,
so every crop has the face centred at the same scale, and no black bar a network could take for
a feature. Then ``cv2.resize`` to ``size`` (``INTER_AREA`` shrinking, ``INTER_LINEAR`` enlarging).

Aligned crops (``align=True``): a similarity transform (rotation, uniform scale, shift:
``cv2.estimateAffinePartial2D``) takes the 5 landmarks onto the ArcFace / InsightFace 112 × 112
template, scaled to ``size`` with the same ``margin`` around it, applied by ``cv2.warpAffine`` with
the same replicated border.
"""

from __future__ import annotations

import cv2
import numpy as np

from convert.errors import GraftError

#: ArcFace / InsightFace 5-point template in a 112 x 112 crop, in faces.types.LANDMARKS order
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)
BORDER = cv2.BORDER_REPLICATE


def square_box(box: np.ndarray, margin: float) -> np.ndarray:
    """(x1, y1, x2, y2) -> the square (x1, y1, x2, y2) a crop takes: ``margin`` of the box's size
    added on each side, then the longer side, same centre."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    shrink = img.shape[0] > size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def crop_box(image: np.ndarray, box: np.ndarray, size: int, margin: float) -> np.ndarray:
    """The square crop of ``box`` (see the module doc), uint8 ``size`` × ``size``; padded, not shifted."""
    h, w = image.shape[:2]
    sx1, sy1, sx2, sy2 = square_box(box, margin)
    side = max(1, int(round(sx2 - sx1)))
    left, top = int(round(sx1)), int(round(sy1))
    right, bottom = left + side, top + side
    inner = image[max(top, 0):min(bottom, h), max(left, 0):min(right, w)]
    if inner.size == 0:  # the square lies wholly outside the photo (cannot happen for a clipped box)
        inner = image[:1, :1]
    pads = (max(0, -top), max(0, bottom - h), max(0, -left), max(0, right - w))
    if any(pads):
        inner = cv2.copyMakeBorder(inner, *pads, BORDER)
    return _resize(np.ascontiguousarray(inner), size)


def template(size: int, margin: float) -> np.ndarray:
    """Where the 5 landmarks go in an aligned ``size`` crop: the ArcFace template, its 112 × 112
    square shrunk so that ``margin`` of it shows on each side."""
    inner = size / (1 + 2 * margin)
    return ARCFACE_112 / 112.0 * inner + (size - inner) / 2


def similarity(landmarks: np.ndarray, size: int, margin: float) -> np.ndarray:
    """The 2 × 3 similarity matrix taking ``landmarks`` (5, 2) onto :func:`template`."""
    m, _ = cv2.estimateAffinePartial2D(np.asarray(landmarks, np.float32).reshape(5, 2), template(size, margin),
                                       method=cv2.LMEDS)
    if m is None:
        raise ValueError("landmarks do not determine a similarity transform")
    return m


def crop_aligned(image: np.ndarray, landmarks: np.ndarray, size: int, margin: float) -> np.ndarray:
    """The aligned crop (uint8 ``size`` × ``size``). A big shrink first area-downscales the photo,
    so the warp (bilinear) does not alias."""
    m = similarity(landmarks, size, margin)
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    if scale < 0.5:
        f = 1 / int(1 / scale)
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        m = m.copy()
        m[:, :2] /= f
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=BORDER)


def crop_face(image: np.ndarray, box: np.ndarray, landmarks: np.ndarray | None, size: int, margin: float,
              align: bool) -> np.ndarray:
    """The crop the settings ask for: aligned on the landmarks, or the padded square box. ``graft faces``
    always has landmarks for ``--align`` (MTCNN's own, or ONet's on other detectors' boxes); a library
    caller without them gets a one-line :class:`GraftError`, which the command line prints as such."""
    if align:
        if landmarks is None:
            raise GraftError("--align needs 5 landmarks per face, and this face has none (detector without landmarks "
                             "and no MTCNN ONet package, mtcnn-det3, to find them)")
        return crop_aligned(image, landmarks, size, margin)
    return crop_box(image, box, size, margin)
