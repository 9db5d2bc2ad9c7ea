"""graft's MTCNN against the same cascade run by OpenCV's own Caffe importer, on real photos.

The reference below is a plain port of kpzhang93's ``detect_face.m`` (as ipazc/mtcnn writes it
in Python) whose nets are ``cv2.dnn.readNetFromCaffe`` on the test bed's prototxts and
caffemodels, and whose NMS is ``nms.m`` in numpy: nothing of graft's converter, runtime or NMS.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from faces.detectors.mtcnn import MTCNN, any_size_onnx, convert_mtcnn, onet_landmarks

TESTBED = Path(__file__).resolve().parents[1].parent / "shared" / "testbed"
CAFFE = TESTBED / "caffe" / "mtcnn"
CROPS = TESTBED / "faces" / "imdbwiki" / "gender-data"

pytestmark = pytest.mark.skipif(not CAFFE.is_dir() or not CROPS.is_dir(), reason=f"test bed absent: {TESTBED}")


def read_rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(path))[:, :, ::-1])


def sample_crops(n: int = 100, seed: int = 0) -> list[Path]:
    files = sorted(CROPS.rglob("*.jpg"))
    return [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), n, replace=False))]


# -- the reference: detect_face.m on OpenCV DNN ---------------------------------------------------

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
    def __init__(self, min_size=20, thresholds=(0.6, 0.7, 0.7), factor=0.709):
        self.nets = [cv2.dnn.readNetFromCaffe(str(CAFFE / f"det{i}.prototxt"), str(CAFFE / f"det{i}.caffemodel"))
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


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    return convert_mtcnn(CAFFE, tmp_path_factory.mktemp("mtcnn"))


@pytest.fixture(scope="module")
def detector(packages):
    return MTCNN(*packages)


@pytest.fixture(scope="module")
def reference():
    return Reference()


def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# -- tests --------------------------------------------------------------------------------------

def test_packages_record_mtcnn_preprocessing_and_are_reused(packages, tmp_path):
    import json

    for pkg, side in zip(packages, (12, 24, 48)):
        pre = json.loads((pkg / "manifest.json").read_text())["preprocess"]
        assert pre["channel_order"] == "rgb" and pre["transpose"] is True
        assert pre["mean"] == [127.5] * 3 and pre["scale"] == 0.0078125 and pre["input_size"] == [side, side]
    stamps = [(p / "manifest.json").stat().st_mtime_ns for p in packages]
    again = convert_mtcnn(CAFFE, packages[0].parent)
    assert [(p / "manifest.json").stat().st_mtime_ns for p in again] == stamps


@pytest.mark.parametrize("hw", [(12, 12), (31, 45), (57, 40), (100, 77)])
def test_pnet_any_size_matches_caffe_rounding(packages, hw):
    """The re-exported det1 graph at odd sizes (Caffe rounds its pool up) equals OpenCV's det1."""
    import onnxruntime as ort

    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, *hw)).astype(np.float32)
    session = ort.InferenceSession(str(any_size_onnx(packages[0])), providers=["CPUExecutionProvider"])
    ours = session.run(["conv4-2", "prob1"], {"data": x})
    net = cv2.dnn.readNetFromCaffe(str(CAFFE / "det1.prototxt"), str(CAFFE / "det1.caffemodel"))
    net.setInput(x)
    theirs = net.forward(["conv4-2", "prob1"])
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_pnet_torch_any_size_matches_onnx(packages):
    """The torch backend's det1 rounds its pool up as well (torch is what auto picks on CUDA)."""
    from faces.detectors.mtcnn import _Net

    img = np.random.default_rng(2).uniform(0, 255, (1, 37, 53, 3)).astype(np.float32)
    a = _Net(packages[0], "onnxruntime", "cpu", any_size=True)(img)
    b = _Net(packages[0], "torch", "cpu", any_size=True)(img)
    for k in a:
        assert a[k].shape == b[k].shape == (1, a[k].shape[1], 22, 14)  # transposed; pool rounds 51 up to 26
        np.testing.assert_allclose(a[k], b[k], atol=1e-4)


def test_test1_matches_opencv_reference(detector, reference):
    img = read_rgb(CAFFE / "test1.jpg")
    ref_boxes, ref_points = reference.detect(img)
    faces = detector.detect(img)
    assert len(ref_boxes) >= 2 and len(faces) == len(ref_boxes)
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True)
    for rb, rp in zip(ref_boxes, ref_points):
        f = max(faces, key=lambda f: iou(f.box, rb))
        assert iou(f.box, rb) >= 0.9
        assert np.abs(f.box - rb[:4]).max() <= 3
        assert abs(f.score - rb[4]) < 1e-3
        assert np.abs(f.landmarks - np.stack([rp[:5], rp[5:]], 1)).max() <= 3


def test_imdbwiki_crops_detected_with_plausible_landmarks(detector):
    """One face per crop: found in >= 98%; eyes above nose above mouth corners, left eye left of
    the right, on every face; inside the box on nearly all (a profile's nose may stick out)."""
    files = sample_crops(100)
    found, ordered, inside, t0 = 0, 0, 0, time.perf_counter()
    for path in files:
        faces = detector.detect(read_rgb(path))
        if not faces:
            continue
        found += 1
        (x1, y1, x2, y2), lm = faces[0].box, faces[0].landmarks
        ordered += bool(lm[:2, 1].max() < lm[2, 1] < lm[3:, 1].min() and lm[0, 0] < lm[1, 0])
        inside += bool((lm[:, 0] >= x1).all() and (lm[:, 0] <= x2).all() and (lm[:, 1] >= y1).all() and (lm[:, 1] <= y2).all())
    rate = found / len(files)
    print(f"MTCNN on {len(files)} IMDB-WIKI crops: detected {rate:.0%}; landmarks ordered {ordered}/{found}, "
          f"inside the box {inside}/{found}; {len(files) / (time.perf_counter() - t0):.1f} photos/s")
    assert rate >= 0.98
    assert ordered == found
    assert inside >= 0.95 * found


def test_onet_landmarks_on_the_boxes_onet_saw_equal_detect(detector, packages):
    """Given the boxes the cascade hands ONet, onet_landmarks is its third stage's landmarks
    (within 1 px: squaring a ``fix``-ed square again may move it a pixel); given the final,
    regressed boxes it sees another crop, and agrees within a few percent of the face."""
    rel = []
    for path in [CAFFE / "test1.jpg", *sample_crops(10, seed=3)]:
        img = read_rgb(path)
        boxes, want = detector.detect_arrays(img)
        if not len(boxes):
            continue
        seen = detector.stage2(img, detector.stage1(img))[:, :4]
        got = onet_landmarks(detector.onet, img, seen)
        for lm in want:  # each face's landmarks come from one of the boxes ONet saw
            assert np.abs(got - lm).max(axis=(1, 2)).min() <= 1, path
        again = onet_landmarks(detector.onet, img, boxes[:, :4])
        rel += list(np.abs(again - want).max(axis=(1, 2)) / (boxes[:, 2] - boxes[:, 0]))
    print(f"onet_landmarks on final boxes vs detect: median {np.median(rel):.1%}, max {np.max(rel):.1%} of the box width")
    assert np.median(rel) <= 0.03
    assert onet_landmarks(packages[2], img, np.zeros((0, 4))).shape == (0, 5, 2)


def test_imdbwiki_crops_match_opencv_reference(detector, reference):
    """Same faces as the OpenCV-DNN cascade on 20 crops: count, boxes, scores, landmarks."""
    for path in sample_crops(20, seed=5):
        img = read_rgb(path)
        ref_boxes, ref_points = reference.detect(img)
        boxes, points = detector.detect_arrays(img)
        assert len(boxes) == len(ref_boxes), path
        np.testing.assert_allclose(boxes[:, :4], ref_boxes[:, :4], atol=3, err_msg=str(path))
        np.testing.assert_allclose(boxes[:, 4], ref_boxes[:, 4], atol=1e-3, err_msg=str(path))
        np.testing.assert_allclose(points, np.stack([ref_points[:, :5], ref_points[:, 5:]], 2), atol=3, err_msg=str(path))


def test_no_faces_and_bad_input(detector):
    assert detector.detect(np.zeros((10, 10, 3), np.uint8)) == []  # smaller than min_size: no pyramid
    assert detector.detect(np.full((120, 90, 3), 128, np.uint8)) == []
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect(np.zeros((50, 50), np.uint8))
