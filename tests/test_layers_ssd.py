"""SSD's PriorBox and DetectionOutput (weiliu89/caffe), checked against OpenCV's own Caffe
importer (an independent implementation of both layers), against a numpy transcription of
Caffe's C++ where OpenCV cannot be asked, and on the real WeChat QR-code detector.

Detections are compared as box sets (same count per image and label, each box matched with
IoU >= 0.99 and a close score) and, where both sides are exact, row by row in Caffe's order.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from _convert_helpers import CAFFE, assert_close, opencv_net, run_ort, run_torch
from test_convert_layers import Case, render

COVERED_TYPES = {"PriorBox", "DetectionOutput"}

ZOO = CAFFE / "zoo"


# ----------------------------------------------------------------------------- nets


def prior_param(min_size, max_size=(), ar=(), flip=True, clip=False, variance=(0.1, 0.1, 0.2, 0.2), extra="") -> str:
    fields = [f"min_size: {m}" for m in min_size] + [f"max_size: {m}" for m in max_size]
    fields += [f"aspect_ratio: {a}" for a in ar] + [f"variance: {v}" for v in variance]
    fields += [f"flip: {str(flip).lower()}", f"clip: {str(clip).lower()}"]
    return "prior_box_param { " + " ".join(fields) + f" {extra} }}"


def ssd_net(shape, heads, classes: int, det_param: str, share: bool = True) -> Case:
    """A tiny SSD: two strided convolutions, per feature map a loc and a conf convolution
    (Permute 0,2,3,1 + Flatten, as SSD's heads) and a PriorBox; Concat, conf Softmax over
    classes, DetectionOutput. ``heads``: (feature map, PriorBox parameter text, priors per cell)."""
    layers = [
        ("c1", "Convolution", ["data"], ["c1"], "convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 }"),
        ("c1_relu", "ReLU", ["c1"], ["c1"], ""),
        ("c2", "Convolution", ["c1"], ["c2"], "convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 }"),
    ]
    loc_classes = 1 if share else classes
    for fm, pparam, priors in heads:
        for kind, n in (("loc", priors * loc_classes * 4), ("conf", priors * classes)):
            layers += [
                (f"{fm}_{kind}", "Convolution", [fm], [f"{fm}_{kind}"],
                 f"convolution_param {{ num_output: {n} kernel_size: 3 pad: 1 }}"),
                (f"{fm}_{kind}_perm", "Permute", [f"{fm}_{kind}"], [f"{fm}_{kind}_perm"], "permute_param { order: 0 order: 2 order: 3 order: 1 }"),
                (f"{fm}_{kind}_flat", "Flatten", [f"{fm}_{kind}_perm"], [f"{fm}_{kind}_flat"], "flatten_param { axis: 1 }"),
            ]
        layers.append((f"{fm}_priors", "PriorBox", [fm, "data"], [f"{fm}_priors"], pparam))
    fms = [h[0] for h in heads]
    layers += [
        ("loc", "Concat", [f"{f}_loc_flat" for f in fms], ["loc"], "concat_param { axis: 1 }"),
        ("conf", "Concat", [f"{f}_conf_flat" for f in fms], ["conf"], "concat_param { axis: 1 }"),
        ("priors", "Concat", [f"{f}_priors" for f in fms], ["priors"], "concat_param { axis: 2 }"),
        ("conf_reshape", "Reshape", ["conf"], ["conf_reshape"], f"reshape_param {{ shape {{ dim: 0 dim: -1 dim: {classes} }} }}"),
        ("conf_softmax", "Softmax", ["conf_reshape"], ["conf_softmax"], "softmax_param { axis: 2 }"),
        ("conf_flat", "Flatten", ["conf_softmax"], ["conf_flat"], "flatten_param { axis: 1 }"),
        ("det", "DetectionOutput", ["loc", "conf_flat", "priors"], ["det"], det_param),
    ]
    return Case("ssd", tuple(shape), layers, lambda x, W: {})


def det_param(classes: int, extra: str = "", nms: str = "nms_threshold: 0.45 top_k: 40") -> str:
    for field, default in (("background_label_id", "0"), ("share_location", "true"), ("keep_top_k", "-1")):
        if field not in extra:  # OpenCV insists on them (these are Caffe's defaults)
            extra += f" {field}: {default}"
    return f"detection_output_param {{ num_classes: {classes} nms_param {{ {nms} }} {extra} }}"


def convert(tmp: Path, case: Case, name: str = "net", seed: int = 0):
    from convert import convert_model
    from convert.generate import generate_caffemodel

    tmp.mkdir(parents=True, exist_ok=True)
    proto = tmp / f"{name}.prototxt"
    proto.write_text(render(case, "V2"))
    weights = generate_caffemodel(proto, tmp / f"{name}.caffemodel", seed=seed)
    pkg = convert_model(proto, weights, tmp / f"{name}-pkg", name, preprocess={"scale": 1 / 255}, log=lambda _m: None)
    return proto, weights, pkg


def image_batch(rng: np.random.Generator, shape, batch: int = 2) -> np.ndarray:
    """Smooth random 'images' 0..1 (a blurred noise field): SSD heads then see structure."""
    x = rng.uniform(0, 1, (batch,) + tuple(shape[1:])).astype(np.float32)
    for axis in (2, 3):
        x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
    return x.astype(np.float32)


def ours(pkg, x: np.ndarray, values: list[str]) -> tuple[dict, dict]:
    from convert import load_torch

    return run_ort(pkg.onnx_path_for(values), {"data": x}, values), run_torch(load_torch(pkg), x, values)


def opencv_out(proto: Path, weights: Path, x: np.ndarray, layers: list[str]) -> dict[str, np.ndarray]:
    net = opencv_net(proto, weights)
    assert net is not None, "OpenCV refused the net"
    net.setInput(np.ascontiguousarray(x, np.float32))
    return dict(zip(layers, net.forward(layers)))


# ----------------------------------------------------------------------------- detection sets


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 1.0 if np.allclose(a, b, atol=1e-6) else 0.0  # degenerate boxes: equal or not
    inter = w * h
    area = lambda r: max(r[2] - r[0], 0) * max(r[3] - r[1], 0)  # noqa: E731
    return float(inter / (area(a) + area(b) - inter))


def assert_same_detections(ref: np.ndarray, got: np.ndarray, what: str, score_tol: float = 1e-4) -> None:
    """Same rows per (image, label); each reference box matched by one box with IoU >= 0.99 and
    a score within ``score_tol``."""
    ref, got = ref.reshape(-1, 7), got.reshape(-1, 7)
    assert ref.shape == got.shape, f"{what}: {got.shape[0]} detections, reference has {ref.shape[0]}"
    for key in sorted({(r[0], r[1]) for r in ref}):
        r = ref[(ref[:, 0] == key[0]) & (ref[:, 1] == key[1])]
        g = got[(got[:, 0] == key[0]) & (got[:, 1] == key[1])]
        assert len(r) == len(g), f"{what}: image {key[0]:g} label {key[1]:g}: {len(g)} boxes, reference {len(r)}"
        free = list(range(len(g)))
        for row in r:
            cand = [j for j in free if abs(g[j, 2] - row[2]) <= score_tol and iou(g[j, 3:], row[3:]) >= 0.99]
            assert cand, f"{what}: image {key[0]:g} label {key[1]:g}: no match for score {row[2]:.6f} box {row[3:]}"
            free.remove(cand[0])


def assert_caffe_order(det: np.ndarray, what: str) -> None:
    """Caffe writes rows by image, then label (ascending), then score (descending)."""
    d = det.reshape(-1, 7)
    for a, b in zip(d[:-1], d[1:]):
        assert (a[0], a[1], -a[2]) <= (b[0], b[1], -b[2]), f"{what}: rows out of Caffe's order: {a[:3]} then {b[:3]}"


# ----------------------------------------------------------------------------- (a) PriorBox


def prior_ref(layer_hw, img_hw, min_size, max_size=(), ar=(), flip=True, clip=False, variance=(0.1, 0.1, 0.2, 0.2),
              step=None, offset=0.5, img=None, truncate=True):
    """prior_box_layer.cpp transcribed (weiliu89/caffe): note ``int min_size_ = min_sizes_[s]``
    (``truncate=False``: OpenCV's float sizes)."""
    cast = int if truncate else float
    ars = [1.0]
    for a in ar:
        if all(abs(a - r) >= 1e-6 for r in ars):
            ars.append(a)
            if flip:
                ars.append(1.0 / a)
    lh, lw = layer_hw
    ih, iw = img or img_hw
    sh, sw = step if step else (ih / lh, iw / lw)
    out = []
    for h in range(lh):
        for w in range(lw):
            cx, cy = (w + offset) * sw, (h + offset) * sh
            for s, mn in enumerate(min_size):
                mn = cast(mn)
                sizes = [(mn, mn)]
                if max_size:
                    sizes.append((math.sqrt(mn * cast(max_size[s])),) * 2)
                sizes += [(mn * math.sqrt(a), mn / math.sqrt(a)) for a in ars if abs(a - 1) >= 1e-6]
                for bw, bh in sizes:
                    out.append([(cx - bw / 2) / iw, (cy - bh / 2) / ih, (cx + bw / 2) / iw, (cy + bh / 2) / ih])
    boxes = np.array(out)
    if clip:
        boxes = np.clip(boxes, 0, 1)
    var = np.broadcast_to(np.array(list(variance) * (4 // len(variance))), boxes.shape)
    return np.stack([boxes.reshape(-1), var.reshape(-1)])[None]


def prior_text(kw: dict) -> str:
    extra = []
    if kw.get("step"):
        sh, sw = kw["step"]
        extra.append(f"step: {sh}" if sh == sw else f"step_h: {sh} step_w: {sw}")
    if kw.get("img"):
        ih, iw = kw["img"]
        extra.append(f"img_size: {ih}" if ih == iw else f"img_h: {ih} img_w: {iw}")
    if "offset" in kw:
        extra.append(f"offset: {kw['offset']}")
    return prior_param(kw["min_size"], kw.get("max_size", ()), kw.get("ar", ()), kw.get("flip", True),
                       kw.get("clip", False), kw.get("variance", (0.1, 0.1, 0.2, 0.2)), " ".join(extra))


PRIOR_CASES = {
    # SSD300's conv4_3 head: min/max size, one ratio flipped, four variances, explicit step + offset
    "ssd300-like": ((1, 3, 24, 32), dict(min_size=[6], max_size=[12], ar=[2], step=(4, 4), offset=0.5)),
    # two min sizes with their max sizes, two ratios, step from image/feature map, clipped, one variance
    "multi-min-clip": ((1, 3, 20, 28), dict(min_size=[5, 9], max_size=[8, 14], ar=[2, 3], clip=True, variance=[0.15])),
    # no max_size, ratios without flip (incl. 1 and a duplicate), step_h/step_w, offset
    "step-hw-noflip": ((1, 3, 24, 32), dict(min_size=[4, 10], ar=[1, 2, 0.5, 2, 3], flip=False, step=(5, 3), offset=0.25)),
    # img_h/img_w: boxes normalised by (and steps derived from) another image size
    "img-hw": ((1, 3, 24, 32), dict(min_size=[7], max_size=[11], ar=[3], img=(40, 50))),
    # img_size + step, flip, a ratio whose flip already exists, offset 0
    "img-size-step": ((1, 3, 16, 16), dict(min_size=[3], max_size=[6], ar=[2, 0.5], img=(20, 20), step=(2.5, 2.5), offset=0)),
    # Caffe reads min_size/max_size into ``int`` (5.7 -> 5); OpenCV keeps the float
    "fractional-sizes": ((1, 3, 16, 20), dict(min_size=[5.7, 9.2], max_size=[8.9, 14.5], ar=[2], variance=[0.1])),
}
# OpenCV 4.x ignores img_size/img_h/img_w (it always uses bottom 1's size) and keeps fractional
# min/max sizes: there the reference is Caffe's loop above; OpenCV is still checked to compute
# that same loop with its own reading of the parameters.
OPENCV_READS = {"img-hw": dict(img=None), "img-size-step": dict(img=None), "fractional-sizes": dict(truncate=False)}


@pytest.mark.parametrize("cid", sorted(PRIOR_CASES))
def test_prior_box_matches_caffe_and_opencv(tmp_path, cid):
    shape, kw = PRIOR_CASES[cid]
    c = Case(cid, shape, [
        ("c1", "Convolution", ["data"], ["c1"], "convolution_param { num_output: 2 kernel_size: 3 stride: 2 pad: 1 }"),
        ("c2", "Convolution", ["c1"], ["c2"], "convolution_param { num_output: 2 kernel_size: 3 stride: 2 pad: 1 }"),
        ("pb1", "PriorBox", ["c1", "data"], ["pb1"], prior_text(kw)),
        ("pb2", "PriorBox", ["c2", "data"], ["pb2"], prior_text(kw)),
        ("priors", "Concat", ["pb1", "pb2"], ["priors"], "concat_param { axis: 2 }"),
    ], lambda x, W: {})
    proto, weights, pkg = convert(tmp_path, c)
    x = image_batch(np.random.default_rng(0), shape)  # batch 2: the priors do not follow it
    values = ["pb1", "pb2", "priors"]
    cv = opencv_out(proto, weights, x, values)
    got_onnx, got_torch = ours(pkg, x, values)
    h1, w1 = math.ceil(shape[2] / 2), math.ceil(shape[3] / 2)
    fms = {"pb1": (h1, w1), "pb2": (math.ceil(h1 / 2), math.ceil(w1 / 2))}
    caffe = {v: prior_ref(fm, shape[2:], **kw) for v, fm in fms.items()}
    caffe["priors"] = np.concatenate([caffe["pb1"], caffe["pb2"]], axis=2)
    opencv_kw = {**kw, **OPENCV_READS.get(cid, {})}
    for v in values:
        assert got_onnx[v].shape[:2] == (1, 2) and got_torch[v].shape[:2] == (1, 2)
        assert_close(caffe[v], got_onnx[v], f"{cid} {v}: onnx vs Caffe's loop", rtol=0, atol=1e-6)
        assert_close(caffe[v], got_torch[v], f"{cid} {v}: torch vs Caffe's loop", rtol=0, atol=1e-6)
        if cid in OPENCV_READS:
            if v != "priors":
                assert_close(prior_ref(fms[v], shape[2:], **opencv_kw), cv[v], f"{cid} {v}: OpenCV's reading", rtol=0, atol=1e-6)
                assert np.abs(cv[v] - got_onnx[v]).max() > 1e-3, f"{cid}: expected OpenCV to deviate from Caffe here"
            continue
        assert_close(cv[v], got_onnx[v], f"{cid} {v}: onnx vs OpenCV", rtol=0, atol=1e-6)
        assert_close(cv[v], got_torch[v], f"{cid} {v}: torch vs OpenCV", rtol=0, atol=1e-6)
