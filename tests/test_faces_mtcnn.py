"""graft's MTCNN against the same cascade run by OpenCV's own Caffe importer, on real photos.

The reference (tests/_opencv_faces.py) is a plain port of kpzhang93's ``detect_face.m`` (as ipazc/mtcnn writes it
in Python) whose nets are ``cv2.dnn.readNetFromCaffe`` on the test bed's prototxts and
caffemodels, and whose NMS is ``nms.m`` in numpy: nothing of graft's converter, runtime or NMS.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from _opencv_faces import Reference

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
