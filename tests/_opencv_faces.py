"""Face detection as a user writes it with OpenCV alone: the independent references that the
faces tests and benches compare graft against. Nothing here imports graft (or pytest), so a
bench's OpenCV subprocess can import it as cheaply as a user's script would start.

- :class:`Reference`: MTCNN, a plain port of kpzhang93's ``detect_face.m`` (as ipazc/mtcnn writes
  it in Python) on ``cv2.dnn.readNetFromCaffe`` of the test bed's det1..det3, NMS as ``nms.m``.
- :class:`UltraFaceCV`: UltraFace RFB-320 on ``cv2.dnn.readNetFromCaffe``: resize to 320x240,
  ``blobFromImage`` (x-127)/128 RGB, forward, the authors' prior decoding
  (``vision/utils/box_utils.py``), ``cv2.dnn.NMSBoxes`` at IoU 0.3, score > 0.7.
- :func:`crop_square`: the box + margin on each side, squared on its longer side, replicate-padded
  where it leaves the photo, resized.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

TESTBED = Path(__file__).resolve().parents[1].parent / "shared" / "testbed"
CAFFE = TESTBED / "caffe" / "mtcnn"
ULTRA = TESTBED / "caffe" / "ultraface"


def ref_nms(boxes, threshold, mode):
    x1, y1, x2, y2, s = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(s, kind="stable")  # MATLAB's sort: ties keep their order, the last is taken
    pick = []
    while order.size:
        i = order[-1]
        pick.append(i)
        rest = order[:-1]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        o = inter / np.minimum(area[i], area[rest]) if mode == "Min" else inter / (area[i] + area[rest] - inter)
        order = rest[o <= threshold]
    return np.array(pick, dtype=int)


def ref_rerec(b):
    b = b.copy()
    h, w = b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]
    side = np.maximum(w, h)
    b[:, 0] = b[:, 0] + w * 0.5 - side * 0.5
    b[:, 1] = b[:, 1] + h * 0.5 - side * 0.5
    b[:, 2:4] = b[:, 0:2] + np.transpose(np.tile(side, (2, 1)))
    return b


def ref_bbreg(b, reg):
    b = b.copy()
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    b[:, 0:4] = np.transpose(np.vstack([b[:, 0] + reg[:, 0] * w, b[:, 1] + reg[:, 1] * h,
                                        b[:, 2] + reg[:, 2] * w, b[:, 3] + reg[:, 3] * h]))
    return b


def ref_pad(b, w, h):
    tmpw = (b[:, 2] - b[:, 0] + 1).astype(np.int32)
    tmph = (b[:, 3] - b[:, 1] + 1).astype(np.int32)
    dx, dy = np.ones(len(b), np.int32), np.ones(len(b), np.int32)
    edx, edy = tmpw.copy(), tmph.copy()
    x, y, ex, ey = (b[:, i].astype(np.int32) for i in range(4))
    t = ex > w
    edx[t] = -ex[t] + w + tmpw[t]
    ex[t] = w
    t = ey > h
    edy[t] = -ey[t] + h + tmph[t]
    ey[t] = h
    t = x < 1
    dx[t] = 2 - x[t]
    x[t] = 1
    t = y < 1
    dy[t] = 2 - y[t]
    y[t] = 1
    return dy, edy, dx, edx, y, ey, x, ex, tmpw, tmph


def ref_crops(img, b, side):
    h, w = img.shape[:2]
    dy, edy, dx, edx, y, ey, x, ex, tmpw, tmph = ref_pad(b, w, h)
    out = np.zeros((len(b), side, side, 3))
    for k in range(len(b)):
        tmp = np.zeros((tmph[k], tmpw[k], 3))
        tmp[dy[k] - 1:edy[k], dx[k] - 1:edx[k]] = img[y[k] - 1:ey[k], x[k] - 1:ex[k]]
        out[k] = cv2.resize(tmp, (side, side), interpolation=cv2.INTER_AREA)
    # MATLAB Caffe's layout: (N, C, W, H)
    return np.ascontiguousarray(((out - 127.5) * 0.0078125).transpose(0, 3, 2, 1), dtype=np.float32)


class Reference:
    """MTCNN (kpzhang93's detect_face.m, as ipazc/mtcnn ports it) on ``cv2.dnn.readNetFromCaffe``."""

    def __init__(self, min_size=20, thresholds=(0.6, 0.7, 0.7), factor=0.709, caffe=CAFFE):
        self.nets = [cv2.dnn.readNetFromCaffe(str(Path(caffe) / f"det{i}.prototxt"), str(Path(caffe) / f"det{i}.caffemodel"))
                     for i in (1, 2, 3)]
        self.min_size, self.t, self.factor = min_size, thresholds, factor

    def run(self, i, blob, names):
        self.nets[i].setInput(blob)
        return self.nets[i].forward(names)

    def detect(self, img):
        """(N, 5) boxes and (N, 10) points [x1..x5, y1..y5] of a uint8 RGB image (the pyramid is
        resized as uint8, the crops as float, as ipazc/mtcnn does), as detect_face.m returns them."""
        h, w = img.shape[:2]
        m = 12.0 / self.min_size
        minl, scales = min(h, w) * m, []
        while minl >= 12:
            scales.append(m * self.factor ** len(scales))
            minl *= self.factor
        total = np.zeros((0, 9))
        for scale in scales:
            hs, ws = int(np.ceil(h * scale)), int(np.ceil(w * scale))
            im = (cv2.resize(img, (ws, hs), interpolation=cv2.INTER_AREA) - 127.5) * 0.0078125
            reg, prob = self.run(0, np.ascontiguousarray(im.transpose(2, 1, 0)[None], dtype=np.float32),
                                 ["conv4-2", "prob1"])
            imap = prob[0, 1].T  # (H, W)
            dx1, dy1, dx2, dy2 = (reg[0, c].T for c in range(4))
            yy, xx = np.where(imap >= self.t[0])
            bb = np.transpose(np.vstack([xx, yy])).astype(float)
            q1, q2 = np.fix((2 * bb + 1) / scale), np.fix((2 * bb + 12) / scale)
            boxes = np.hstack([q1, q2, imap[yy, xx][:, None],
                               np.transpose(np.vstack([dx1[yy, xx], dy1[yy, xx], dx2[yy, xx], dy2[yy, xx]]))])
            if len(boxes):
                total = np.vstack([total, boxes[ref_nms(boxes, 0.5, "Union")]])
        if not len(total):
            return np.zeros((0, 5)), np.zeros((0, 10))
        total = total[ref_nms(total, 0.7, "Union")]
        regw, regh = total[:, 2] - total[:, 0], total[:, 3] - total[:, 1]
        total = np.transpose(np.vstack([total[:, 0] + total[:, 5] * regw, total[:, 1] + total[:, 6] * regh,
                                        total[:, 2] + total[:, 7] * regw, total[:, 3] + total[:, 8] * regh, total[:, 4]]))
        total = ref_rerec(total)
        total[:, 0:4] = np.fix(total[:, 0:4])
        reg, prob = self.run(1, ref_crops(img, total, 24), ["conv5-2", "prob1"])
        score = prob.reshape(-1, 2)[:, 1]
        ok = score > self.t[1]
        total = np.hstack([total[ok, 0:4], score[ok, None]])
        mv = reg.reshape(-1, 4)[ok]
        if not len(total):
            return np.zeros((0, 5)), np.zeros((0, 10))
        pick = ref_nms(total, 0.7, "Union")
        total = ref_rerec(ref_bbreg(total[pick], mv[pick]))
        total = np.fix(total)
        reg, pts, prob = self.run(2, ref_crops(img, total, 48), ["conv6-2", "conv6-3", "prob1"])
        score = prob.reshape(-1, 2)[:, 1]
        ok = score > self.t[2]
        points = pts.reshape(-1, 10)[ok].T
        total = np.hstack([total[ok, 0:4], score[ok, None]])
        mv = reg.reshape(-1, 4)[ok]
        w_, h_ = total[:, 2] - total[:, 0] + 1, total[:, 3] - total[:, 1] + 1
        points[0:5] = np.tile(w_, (5, 1)) * points[0:5] + np.tile(total[:, 0], (5, 1)) - 1
        points[5:10] = np.tile(h_, (5, 1)) * points[5:10] + np.tile(total[:, 1], (5, 1)) - 1
        total = ref_bbreg(total, mv)
        pick = ref_nms(total, 0.7, "Min")
        return total[pick], points.T[pick]


class UltraFaceCV:
    """UltraFace RFB-320 on OpenCV DNN, the authors' demo post-processing; ``detect(bgr)`` ->
    (N, 5) x1, y1, x2, y2, score in pixels, best first."""

    def __init__(self, folder=ULTRA, threshold=0.7, iou=0.3, size=(320, 240)):
        self.net = cv2.dnn.readNetFromCaffe(str(Path(folder) / "RFB-320.prototxt"), str(Path(folder) / "RFB-320.caffemodel"))
        self.threshold, self.iou, self.size = threshold, iou, size
        w, h = size
        priors = []
        for stride, sizes in zip((8, 16, 32, 64), ((10, 16, 24), (32, 48), (64, 96), (128, 192, 256))):
            for j in range(math.ceil(h / stride)):
                for i in range(math.ceil(w / stride)):
                    for m in sizes:
                        priors.append([(i + 0.5) * stride / w, (j + 0.5) * stride / h, m / w, m / h])
        self.priors = np.clip(np.array(priors, np.float32), 0.0, 1.0)

    def detect(self, bgr):
        h, w = bgr.shape[:2]
        im = cv2.resize(bgr, self.size)
        self.net.setInput(cv2.dnn.blobFromImage(im, 1 / 128, self.size, (127, 127, 127), swapRB=True))
        loc, conf = self.net.forward(["boxes", "scores"])
        loc, score = loc.reshape(-1, 4), conf.reshape(-1, 2)[:, 1]
        p = self.priors
        centre = loc[:, :2] * 0.1 * p[:, 2:] + p[:, :2]
        size = np.exp(loc[:, 2:] * 0.2) * p[:, 2:]
        boxes = np.concatenate([centre - size / 2, centre + size / 2], 1) * [w, h, w, h]
        keep = score > self.threshold
        boxes, score = np.clip(boxes[keep], 0, [w, h, w, h]), score[keep]
        if not len(boxes):
            return np.zeros((0, 5))
        rects = [(float(a), float(b), float(c - a), float(d - b)) for a, b, c, d in boxes]
        pick = np.asarray(cv2.dnn.NMSBoxes(rects, score.tolist(), self.threshold, self.iou), int).reshape(-1)
        pick = pick[np.argsort(-score[pick], kind="stable")]
        return np.hstack([boxes[pick], score[pick, None]])


def crop_square(img, box, size=224, margin=0.2):
    """``margin`` x the box's size added on each side, square on the longer side around the centre,
    replicate-padded where it leaves the image, resized to ``size`` (INTER_AREA shrinking)."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    left, top = int(round((x1 + x2) / 2 - side / 2)), int(round((y1 + y2) / 2 - side / 2))
    s = max(1, int(round(side)))
    h, w = img.shape[:2]
    inner = img[max(top, 0):min(top + s, h), max(left, 0):min(left + s, w)]
    pads = (max(0, -top), max(0, top + s - h), max(0, -left), max(0, left + s - w))
    if any(pads):
        inner = cv2.copyMakeBorder(inner, *pads, cv2.BORDER_REPLICATE)
    return cv2.resize(inner, (size, size), interpolation=cv2.INTER_AREA if s > size else cv2.INTER_LINEAR)
