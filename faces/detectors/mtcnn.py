"""MTCNN (Zhang et al. 2016) on graft-converted packages: the published cascade, step for step.

The nets are kpzhang93's det1 (PNet), det2 (RNet), det3 (ONet). They were trained in MATLAB
Caffe, which hands the net every image with H and W swapped; the packages record that
(``"transpose": true``) and ``extract.preprocess.Preprocess.normalize`` applies it, so crops are
cut from the upright image and only the net sees them transposed. PNet's maps then come back
as (x, y) and the regressions and landmarks are in image (x, y) order, as the reference reads them.

The logic is the reference's (kpzhang93's ``detect_face.m``, as ported by ipazc/mtcnn): its
1-based box conventions (``fix``, ``+1`` widths, ``-1`` on landmarks) are kept, so boxes and
points are the numbers the reference prints. Resizing is ``cv2.resize`` INTER_AREA, as the
Python ports do.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from faces.types import Face

__all__ = ["MTCNN", "any_size_onnx", "convert_mtcnn", "mtcnn_preprocess", "nms", "onet_landmarks"]

#: input side of det1, det2, det3
SIDES = (12, 24, 48)
MEAN, SCALE = 127.5, 0.0078125
ANY_SIZE_ONNX = "model.any-size.onnx"


# -- conversion -------------------------------------------------------------------------------

def mtcnn_preprocess(side: int) -> dict:
    """The manifest preprocessing of one MTCNN net: RGB, (x - 127.5) * 0.0078125, transposed
    (``convert.presets``' ``mtcnn``, what ``graft convert --preset mtcnn`` records)."""
    from convert.preprocess import build_preprocess
    from convert.presets import get_preset

    pre, _ = build_preprocess([1, 3, side, side], defaults=get_preset("mtcnn").preprocess)
    return pre


def _is_current(out: Path, caffemodel: Path, pre: dict) -> bool:
    """Whether ``out`` is a package of these weights (source sha256) with this preprocessing."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    from convert.store import sha256_file

    source = (manifest.get("source") or {}).get("caffemodel") or {}
    return source.get("sha256") == sha256_file(caffemodel) and manifest.get("preprocess") == pre


def convert_mtcnn(caffe_dir: str | Path, out_root: str | Path) -> tuple[Path, Path, Path]:
    """det1..det3 in ``caffe_dir`` -> ``out_root/mtcnn-det1..3`` (packages of the same weights kept),
    converted as the ``faces`` registry does (:func:`faces.detectors.packages.convert_release`),
    plus det1's any-size ONNX graph (:func:`any_size_onnx`)."""
    from faces.detectors.packages import Release, convert_release

    caffe_dir, out_root = Path(caffe_dir), Path(out_root)
    outs = []
    for i, side in enumerate(SIDES, start=1):
        release = Release(f"mtcnn-det{i}", f"det{i}", "mtcnn")
        out = out_root / release.package
        if not _is_current(out, caffe_dir / f"det{i}.caffemodel", mtcnn_preprocess(side)):
            convert_release(release, caffe_dir, out)
        outs.append(out)
    any_size_onnx(outs[0])
    return outs[0], outs[1], outs[2]


#: ops whose ONNX form does not depend on the spatial size (Softmax only over channels)
_SIZE_FREE_OPS = {"Conv", "PRelu", "Relu", "MaxPool", "Softmax"}


def any_size_onnx(pkg: Any) -> Path:
    """det1's ONNX graph with H and W left free (written once into the package).

    The package's graph is fixed at 12x12, where Caffe's round-up pooling equals a plain pool;
    at other sizes it rounds up, which for unpadded windows no smaller than their stride is
    exactly ONNX's ``ceil_mode=1``. Re-exporting the graph once beats the alternatives: a
    package per pyramid size, or torch (slower than onnxruntime on CPU for these small convs)."""
    import onnx

    pkg = _package(pkg)
    target = pkg.dir / ANY_SIZE_ONNX
    if target.is_file():
        return target
    model = onnx.load(str(pkg.onnx_path), load_external_data=False)
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type not in _SIZE_FREE_OPS or node.op_type == "Softmax" and attrs.get("axis") != 1:
            raise ValueError(f"{pkg.dir}: node {node.name} ({node.op_type}) depends on the input size")
        if node.op_type == "MaxPool":
            kernel, stride = attrs["kernel_shape"], attrs.get("strides", [1, 1])
            if any(attrs.get("pads", [0])) or any(k < s for k, s in zip(kernel, stride)):
                raise ValueError(f"{pkg.dir}: pool {node.name} is padded or strides past its window")
            node.attribute.append(onnx.helper.make_attribute("ceil_mode", 1))
    del model.graph.value_info[:]
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for d, name in zip(dims[2:], ("H", "W")):
            d.ClearField("dim_value")
            d.dim_param = f"{name}_{value.name}"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, target)
    return target


def _package(pkg: Any):
    from convert import ModelPackage

    return pkg if isinstance(pkg, ModelPackage) else ModelPackage(pkg)


# -- running the nets -------------------------------------------------------------------------

class _AnySize:
    """det1 as ``OrtBackend`` sees a package, through the any-size graph."""

    def __init__(self, pkg: Any) -> None:
        self.pkg = pkg

    def onnx_path_for(self, blobs: Sequence[str]) -> Path:
        return any_size_onnx(self.pkg)


def _ceil_pools(net: Any) -> None:
    """The torch module's unpadded max pools round up, as Caffe's (see :func:`any_size_onnx`)."""
    import torch.nn.functional as F

    from convert.layers.pooling import Pool

    for m in net.modules():
        if isinstance(m, Pool):
            g = m.g
            if not g["max"] or any(g["pad"]) or any(m.pad) or any(k < s for k, s in zip(g["kernel"], g["stride"])):
                raise ValueError("det1 has a pool whose rounding cannot be made size-free")
            m.forward = functools.partial(F.max_pool2d, kernel_size=g["kernel"], stride=g["stride"], ceil_mode=True)


class _Net:
    """One package with its backend: float RGB (N, H, W, 3) batches in, {blob: array} out."""

    def __init__(self, pkg: Any, backend: str, device: str, any_size: bool = False) -> None:
        from extract.backends import make_backend, resolve
        from extract.preprocess import Preprocess

        self.pkg = _package(pkg)
        self.pre = Preprocess.from_dict(self.pkg.preprocess or {})
        if not self.pre.transpose or self.pre.channel_order != "rgb":
            raise ValueError(f"{self.pkg.dir}: not an MTCNN package (convert it with convert_mtcnn: RGB, transposed)")
        self.outputs = self.pkg.outputs
        # fp32 always: thresholds on probabilities near 0.6-0.7 are not for bf16
        kind, device, _ = resolve(backend, device, "fp32")
        source = _AnySize(self.pkg) if any_size and kind == "onnxruntime" else self.pkg
        self.backend = make_backend(source, self.outputs, kind, device, "fp32")
        if any_size and kind == "torch":
            _ceil_pools(self.backend.net)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.backend.run(self.pre.normalize(batch))


def _blob(out: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    """The output whose Caffe name starts with ``prefix`` (``conv4-2``/``conv5-2``/``conv6-2`` ...)."""
    return next(v for k, v in out.items() if k.startswith(prefix))


# -- the reference's box arithmetic ------------------------------------------------------------

def nms(boxes: np.ndarray, threshold: float, mode: str = "Union") -> np.ndarray:
    """Indices kept by greedy NMS, best score first (of equal scores the later box, as MATLAB's
    stable sort in ``nms.m``), with the reference's pixel-inclusive areas.

    'Union' is ``cv2.dnn.NMSBoxes`` on (x, y, w+1, h+1) rectangles, which then computes the same
    overlap; OpenCV has no intersection-over-minimum, so 'Min' is numpy, as ``nms.m`` writes it."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    x1, y1, x2, y2, s = (boxes[:, i] for i in range(5))
    w, h = x2 - x1 + 1, y2 - y1 + 1
    if mode == "Union":
        # fed last box first: of equal scores OpenCV keeps the first it sees, nms.m the last
        rects = np.stack([x1, y1, w, h], 1)[::-1].tolist()
        kept = np.asarray(cv2.dnn.NMSBoxes(rects, s[::-1].tolist(), 0.0, float(threshold)), np.int64).reshape(-1)
        return len(boxes) - 1 - kept
    area = w * h
    order = np.argsort(s, kind="stable")[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = iw * ih
        overlap = inter / np.minimum(area[i], area[rest]) if mode == "Min" else inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """``rerec``: the square of the longer side around each box's centre."""
    boxes = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    boxes[:, 0] += w * 0.5 - side * 0.5
    boxes[:, 1] += h * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, 0:2] + side[:, None]
    return boxes


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """``bbreg``: move the corners by ``reg`` times the (inclusive) width and height."""
    boxes = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, 0:4] += reg[:, 0:4] * np.stack([w, h, w, h], 1)
    return boxes


def _crops(image: np.ndarray, boxes: np.ndarray, side: int) -> np.ndarray:
    """``pad`` + crop + resize: each (integer, 1-based inclusive) box cut from the image, zeros
    where it leaves the image, resized to ``side`` x ``side``; float32 (N, side, side, 3)."""
    h, w = image.shape[:2]
    out = np.zeros((len(boxes), side, side, 3), np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes[:, :4].astype(np.int64)):
        tmp = np.zeros((y2 - y1 + 1, x2 - x1 + 1, 3), np.float32)
        sx1, sy1, sx2, sy2 = max(x1, 1), max(y1, 1), min(x2, w), min(y2, h)
        if sx2 >= sx1 and sy2 >= sy1:
            tmp[sy1 - y1:sy2 - y1 + 1, sx1 - x1:sx2 - x1 + 1] = image[sy1 - 1:sy2, sx1 - 1:sx2]
        out[k] = cv2.resize(tmp, (side, side), interpolation=cv2.INTER_AREA)
    return out


def _valid(boxes: np.ndarray) -> np.ndarray:
    """Boxes that still have a pixel after ``fix`` (the reference would crash on the others)."""
    return boxes[(boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])]


def _scales(h: int, w: int, min_size: float, factor: float) -> list[float]:
    m = 12.0 / min_size
    side, scales = min(h, w) * m, []
    while side >= 12:
        scales.append(m * factor ** len(scales))
        side *= factor
    return scales


def _pnet_boxes(prob: np.ndarray, reg: np.ndarray, scale: float, threshold: float) -> np.ndarray:
    """``generateBoundingBox``: (x1, y1, x2, y2, score, dx1, dy1, dx2, dy2) of every 12x12 cell
    (stride 2) scoring >= threshold. The maps come from a transposed input: axis 0 is x."""
    xs, ys = np.nonzero(prob >= threshold)
    cells = np.stack([xs, ys], 1).astype(np.float64)
    q1 = np.fix((2 * cells + 1) / scale)
    q2 = np.fix((2 * cells + 12) / scale)
    return np.concatenate([q1, q2, prob[xs, ys][:, None], reg[:, xs, ys].T], 1)


def _landmarks(boxes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """ONet's relative [x1..x5, y1..y5] on its (square, inclusive) input boxes -> (N, 5, 2) pixels."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    xs = w[:, None] * points[:, 0:5] + boxes[:, 0:1] - 1
    ys = h[:, None] * points[:, 5:10] + boxes[:, 1:2] - 1
    return np.stack([xs, ys], 2)


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"MTCNN takes an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return image


# -- the detector -------------------------------------------------------------------------------

class MTCNN:
    """The three-stage cascade; ``detect`` gives faces best score first.

    ``det1``..``det3`` are graft packages (name, folder or ``ModelPackage``) from
    :func:`convert_mtcnn`; ``backend``/``device`` as ``extract`` takes them (auto: onnxruntime on
    CPU, torch on CUDA), always fp32. PNet runs each pyramid level whole through a graph with
    free H and W (:func:`any_size_onnx`; on CPU onnxruntime ran the cascade twice as fast as
    torch: 22 vs 13 photos/s on 100 test-bed crops, 2 cores); RNet and ONet take all their crops in
    one batch (bench/bench_faces.py compares the cascade with OpenCV DNN).

    Boxes and landmarks are the reference's numbers (its MATLAB, 1-based box arithmetic), which
    on the test bed agree with the cascade run by OpenCV DNN to 1e-4 px."""

    name = "mtcnn"

    def __init__(self, det1: Any, det2: Any, det3: Any, *, device: str = "cpu", backend: str = "auto",
                 min_size: float = 20, thresholds: Sequence[float] = (0.6, 0.7, 0.7), factor: float = 0.709,
                 nms: Sequence[float] = (0.5, 0.7, 0.7)) -> None:
        self.det1, self.det2, self.det3 = det1, det2, det3
        self.device, self.backend = device, backend
        self.min_size, self.thresholds, self.factor, self.nms = min_size, tuple(thresholds), factor, tuple(nms)
        self.pnet = _Net(det1, backend, device, any_size=True)
        self.rnet = _Net(det2, backend, device)
        self.onet = _Net(det3, backend, device)

    def detect(self, image: np.ndarray) -> list[Face]:
        boxes, points = self.detect_arrays(image)
        return [Face(box=b[:4].copy(), score=float(b[4]), landmarks=p) for b, p in zip(boxes, points)]

    def detect_arrays(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 5) boxes x1, y1, x2, y2, score and (N, 5, 2) landmarks, best score first."""
        image = _rgb(image)
        boxes = self.stage1(image)
        if len(boxes):
            boxes = self.stage2(image, boxes)
        if not len(boxes):
            return np.zeros((0, 5)), np.zeros((0, 5, 2))
        return self.stage3(image, boxes)

    def stage1(self, image: np.ndarray) -> np.ndarray:
        """PNet over the pyramid -> regressed, squared, ``fix``-ed candidate boxes (N, 5)."""
        h, w = image.shape[:2]
        found = []
        for scale in _scales(h, w, self.min_size, self.factor):
            hs, ws = int(np.ceil(h * scale)), int(np.ceil(w * scale))
            level = cv2.resize(image, (ws, hs), interpolation=cv2.INTER_AREA)
            out = self.pnet(level[None])
            boxes = _pnet_boxes(out["prob1"][0, 1], _blob(out, "conv4-2")[0], scale, self.thresholds[0])
            found.append(boxes[nms(boxes, self.nms[0])])
        boxes = np.concatenate(found) if found else np.zeros((0, 9))
        if not len(boxes):
            return boxes[:, :5]
        boxes = boxes[nms(boxes, self.nms[1])]
        w_, h_ = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        moved = boxes[:, 0:4] + boxes[:, 5:9] * np.stack([w_, h_, w_, h_], 1)
        boxes = _square(np.concatenate([moved, boxes[:, 4:5]], 1))
        boxes[:, 0:4] = np.fix(boxes[:, 0:4])
        return _valid(boxes)

    def stage2(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """RNet on 24x24 crops: threshold, NMS, regression, square."""
        out = self.rnet(_crops(image, boxes, SIDES[1]))
        score = out["prob1"].reshape(len(boxes), 2)[:, 1]
        keep = score > self.thresholds[1]
        boxes = np.concatenate([boxes[keep, 0:4], score[keep, None]], 1)
        reg = _blob(out, "conv5-2").reshape(len(score), 4)[keep]
        pick = nms(boxes, self.nms[2])
        boxes = _square(_regress(boxes[pick], reg[pick]))
        return _valid(np.fix(boxes))

    def stage3(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ONet on 48x48 crops: score, regression, landmarks; final NMS by the smaller area."""
        score, reg, points = _onet(self.onet, image, boxes)
        keep = score > self.thresholds[2]
        landmarks = _landmarks(boxes[keep], points[keep])
        boxes = _regress(np.concatenate([boxes[keep, 0:4], score[keep, None]], 1), reg[keep])
        pick = nms(boxes, self.nms[2], "Min")
        return boxes[pick], landmarks[pick]


def _onet(onet: _Net, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out = onet(_crops(image, boxes, SIDES[2]))
    n = len(boxes)
    return (out["prob1"].reshape(n, 2)[:, 1], _blob(out, "conv6-2").reshape(n, 4),
            _blob(out, "conv6-3").reshape(n, 10))


def onet_landmarks(det3: Any, image: np.ndarray, boxes: np.ndarray, *, device: str = "cpu",
                   backend: str = "auto") -> np.ndarray:
    """The 5 landmarks (N, 5, 2) ONet finds in given (x1, y1, x2, y2) boxes, each squared and
    ``fix``-ed as the cascade does before ONet: aligns another detector's faces.

    ``det3`` is a package, or an :class:`MTCNN`'s ONet (``detector.onet``) to reuse its session."""
    image = _rgb(image)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(boxes):
        return np.zeros((0, 5, 2))
    onet = det3 if isinstance(det3, _Net) else _Net(det3, backend, device)
    boxes = np.fix(_square(np.concatenate([boxes, np.zeros((len(boxes), 1))], 1)))
    boxes[:, 2:4] = np.maximum(boxes[:, 2:4], boxes[:, 0:2])
    _, _, points = _onet(onet, image, boxes)
    return _landmarks(boxes, points)
