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
from _convert_helpers import CAFFE, assert_close, needs_testbed, opencv_net, run_ort, run_torch
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


def opencv_detections(det: np.ndarray) -> np.ndarray:
    """OpenCV pads its output to keep_top_k rows per image with rows of zeros: drop those."""
    d = det.reshape(-1, 7)
    return d[np.any(d[:, 1:] != 0, axis=1)].reshape(1, 1, -1, 7)


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



def test_prior_box_follows_the_package_input_size(tmp_path):
    """``convert --input-size``: the priors are computed for the size the package takes."""
    from convert import convert_model
    from convert.generate import generate_caffemodel

    kw = dict(min_size=[4], max_size=[9], ar=[2])
    c = Case("size", (1, 3, 16, 16), [
        ("c1", "Convolution", ["data"], ["c1"], "convolution_param { num_output: 2 kernel_size: 3 stride: 2 pad: 1 }"),
        ("pb", "PriorBox", ["c1", "data"], ["pb"], prior_text(kw)),
    ], lambda x, W: {})
    proto = tmp_path / "net.prototxt"
    proto.write_text(render(c, "V2"))
    weights = generate_caffemodel(proto, tmp_path / "net.caffemodel")
    pkg = convert_model(proto, weights, tmp_path / "pkg", "size", preprocess={"scale": 1 / 255}, input_size=[20, 28],
                        log=lambda _m: None)
    got_onnx, got_torch = ours(pkg, image_batch(np.random.default_rng(2), (1, 3, 20, 28)), ["pb"])
    ref = prior_ref((10, 14), (20, 28), **kw)
    assert_close(ref, got_onnx["pb"], "onnx at the package's input size", rtol=0, atol=1e-6)
    assert_close(ref, got_torch["pb"], "torch at the package's input size", rtol=0, atol=1e-6)

# ----------------------------------------------------------------------------- (b) DetectionOutput

F32 = np.float32


def decode_ref(pb, pv, d, code: str, encoded: bool):
    """bbox_util.cpp DecodeBBox for one prior (float32, Caffe's operation order)."""
    if encoded:
        pv = np.ones(4, F32)  # variance_encoded_in_target: the offsets are used as they are
    if code == "CORNER":
        return [pb[i] + pv[i] * d[i] for i in range(4)]
    pw, ph = pb[2] - pb[0], pb[3] - pb[1]
    if code == "CORNER_SIZE":
        return [pb[0] + pv[0] * d[0] * pw, pb[1] + pv[1] * d[1] * ph, pb[2] + pv[2] * d[2] * pw, pb[3] + pv[3] * d[3] * ph]
    cx = pv[0] * d[0] * pw + (pb[0] + pb[2]) / F32(2)
    cy = pv[1] * d[1] * ph + (pb[1] + pb[3]) / F32(2)
    w, h = np.exp(pv[2] * d[2]) * pw, np.exp(pv[3] * d[3]) * ph
    return [cx - w / F32(2), cy - h / F32(2), cx + w / F32(2), cy + h / F32(2)]


def jaccard_ref(a, b) -> F32:
    """bbox_util.cpp JaccardOverlap (normalized): IntersectBBox, BBoxSize 0 for inverted boxes."""
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return F32(0)
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if not (w > 0 and h > 0):
        return F32(0)
    size = lambda r: F32(0) if (r[2] < r[0] or r[3] < r[1]) else (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    inter = w * h
    return inter / (size(a) + size(b) - inter)


def detection_ref(loc, conf, prior, num_classes, share_location=True, background_label_id=0, code_type="CORNER",
                  variance_encoded_in_target=False, keep_top_k=-1, confidence_threshold=None, nms_threshold=0.3,
                  top_k=-1, eta=1.0, clip=False) -> np.ndarray:
    """detection_output_layer.cpp Forward_cpu + ApplyNMSFast, transcribed: [1, 1, N, 7]
    (``clip``: OpenCV's extension, decoded boxes clipped to [0, 1])."""
    batch, P = loc.shape[0], prior.shape[2] // 4
    L = 1 if share_location else num_classes
    pbox, pvar = prior[0, 0].reshape(P, 4).astype(F32), prior[0, 1].reshape(P, 4).astype(F32)
    loc = loc.reshape(batch, P, L, 4).astype(F32)
    conf = conf.reshape(batch, P, num_classes).astype(F32)
    thr = F32(confidence_threshold) if confidence_threshold is not None else -np.finfo(F32).max
    rows = []
    for i in range(batch):
        boxes = {c: [decode_ref(pbox[p], pvar[p], loc[i, p, c], code_type, variance_encoded_in_target) for p in range(P)]
                 for c in range(L)}
        if clip:
            boxes = {c: [[min(max(v, F32(0)), F32(1)) for v in bx] for bx in b] for c, b in boxes.items()}
        indices = {}
        for c in range(num_classes):
            if c == background_label_id:
                continue
            scores, bx = conf[i, :, c], boxes[0 if share_location else c]
            cand = sorted([(s, p) for p, s in enumerate(scores) if s > thr], key=lambda t: -t[0])  # stable
            cand = cand[:top_k] if top_k > -1 else cand
            kept, adaptive = [], F32(nms_threshold)
            for _, p in cand:
                keep = all(jaccard_ref(bx[p], bx[k]) <= adaptive for k in kept)
                if keep:
                    kept.append(p)
                if keep and eta < 1 and adaptive > 0.5:
                    adaptive = F32(adaptive * F32(eta))
            indices[c] = kept
        if keep_top_k > -1 and sum(map(len, indices.values())) > keep_top_k:
            pairs = sorted([(conf[i, p, c], c, p) for c in sorted(indices) for p in indices[c]], key=lambda t: -t[0])
            indices = {}
            for _, c, p in pairs[:keep_top_k]:
                indices.setdefault(c, []).append(p)
        for c in sorted(indices):
            for p in indices[c]:
                rows.append([i, c, conf[i, p, c], *boxes[0 if share_location else c][p]])
    if not rows:
        rows = [[i] + [-1] * 6 for i in range(batch)]
    return np.asarray(rows, np.float32).reshape(1, 1, -1, 7)


HEADS = [("c1", prior_param([6], [12], [2], extra="step: 2"), 4), ("c2", prior_param([12], [20], [2, 3], extra="step: 4"), 6)]
SHAPE = (1, 3, 24, 32)
CLASSES = 4

# id: (DetectionOutput fields, nms_param fields, OpenCV comparable?[, heads])
DET_CASES = {
    "center-size-keep-top-k": ("code_type: CENTER_SIZE keep_top_k: 30 confidence_threshold: 0.3", "nms_threshold: 0.45 top_k: 40", True),
    "corner-large-keep-top-k": ("code_type: CORNER keep_top_k: 500 confidence_threshold: 0.4", "nms_threshold: 0.45 top_k: 40", True),
    "not-shared-no-background": ("share_location: false background_label_id: -1 code_type: CENTER_SIZE keep_top_k: 60 "
                                 "confidence_threshold: 0.4", "nms_threshold: 0.45 top_k: 40", True),
    "not-shared-corner": ("share_location: false code_type: CORNER keep_top_k: 30 confidence_threshold: 0.4",
                          "nms_threshold: 0.5 top_k: 30", True),
    "background-2-small-top-k": ("background_label_id: 2 code_type: CORNER keep_top_k: 20 confidence_threshold: 0.3",
                                 "nms_threshold: 0.3 top_k: 10", True),
    # every prior a candidate (one head only: the reference's loops are slow)
    "no-threshold-no-top-k": ("code_type: CENTER_SIZE keep_top_k: 25", "nms_threshold: 0.6", True, HEADS[1:]),
    "clip": ("code_type: CENTER_SIZE keep_top_k: 30 confidence_threshold: 0.3 clip: true", "nms_threshold: 0.45 top_k: 40", True),
    # OpenCV 4.x has no CORNER_SIZE, wants priors without variances for variance_encoded_in_target,
    # writes one row of zeros (not Caffe's [i, -1, ...] per image) when nothing is found, and
    # crashes (segmentation fault) with Caffe's default keep_top_k -1
    "corner-all-kept": ("code_type: CORNER confidence_threshold: 0.4", "nms_threshold: 0.45 top_k: 40", False),
    "corner-size": ("code_type: CORNER_SIZE keep_top_k: 30 confidence_threshold: 0.3", "nms_threshold: 0.45 top_k: 40", False),
    "variance-in-target": ("code_type: CENTER_SIZE variance_encoded_in_target: true keep_top_k: 30 confidence_threshold: 0.3",
                           "nms_threshold: 0.45 top_k: 40", False),
    "nothing-found": ("code_type: CENTER_SIZE confidence_threshold: 0.99", "nms_threshold: 0.45 top_k: 40", False),
}


def parse_fields(text: str) -> dict:
    """'a: 1 b: CORNER c: true' -> {'a': 1.0, 'b': 'CORNER', 'c': True} (the reference's kwargs)."""
    toks = text.replace(":", " ").split()
    out = {}
    for k, v in zip(toks[::2], toks[1::2]):
        out[k] = {"true": True, "false": False}.get(v, v if v.isalpha() or "_" in v else float(v))
    for k in ("keep_top_k", "top_k", "background_label_id"):
        if k in out:
            out[k] = int(out[k])
    return out


@pytest.fixture(scope="module")
def det_built(tmp_path_factory):
    cache = {}

    def get(cid: str):
        if cid not in cache:
            fields, nms, _, *heads = DET_CASES[cid]
            c = ssd_net(SHAPE, heads[0] if heads else HEADS, CLASSES, det_param(CLASSES, fields, nms), share="share_location: false" not in fields)
            cache[cid] = convert(tmp_path_factory.mktemp(cid), c)
        return cache[cid]

    return get


@pytest.mark.parametrize("cid", sorted(DET_CASES))
def test_detection_output_matches_caffe_and_opencv(det_built, cid):
    fields, nms, opencv_ok, *_ = DET_CASES[cid]
    proto, weights, pkg = det_built(cid)
    x = image_batch(np.random.default_rng(3), SHAPE)  # batch 2
    values = ["loc", "conf_flat", "priors", "det"]
    got_onnx, got_torch = ours(pkg, x, values)
    det_o, det_t = got_onnx["det"], got_torch["det"]
    assert det_o.shape == det_t.shape and det_o.shape[:2] == (1, 1) and det_o.shape[3] == 7
    assert_close(det_o, det_t, f"{cid}: onnx vs torch", rtol=0, atol=1e-6)
    # Caffe's loops on the very blobs our DetectionOutput read: same rows, same order
    kw = {**parse_fields(fields), **parse_fields(nms)}
    ref = detection_ref(got_onnx["loc"], got_onnx["conf_flat"], got_onnx["priors"], CLASSES, **kw)
    assert ref.shape == det_o.shape, f"{cid}: {det_o.shape[2]} rows, Caffe's loop {ref.shape[2]}"
    assert_close(ref, det_o, f"{cid}: onnx vs Caffe's loop", rtol=0, atol=2e-6)
    assert_close(ref, det_t, f"{cid}: torch vs Caffe's loop", rtol=0, atol=2e-6)
    assert_caffe_order(det_o, cid)
    assert set(det_o[0, 0, :, 0]) == {0.0, 1.0}, "rows for both images"
    if cid == "nothing-found":
        np.testing.assert_array_equal(det_o, np.array([[[[0] + [-1] * 6, [1] + [-1] * 6]]], np.float32))
    if opencv_ok:
        cv = opencv_detections(opencv_out(proto, weights, x, ["det"])["det"])
        assert_same_detections(cv, det_o, f"{cid}: onnx vs OpenCV")
        assert_same_detections(cv, det_t, f"{cid}: torch vs OpenCV")


# ----------------------------------------------------------------------------- hand-made inputs


def det_alone(priors: np.ndarray, classes: int, param: str, share: bool = True, onnx: bool = True):
    """A net of one DetectionOutput over three inputs (loc, conf, priors): (onnx model or None, torch net)."""
    from google.protobuf import text_format

    from convert.emit_onnx import emit_onnx
    from convert.emit_torch import emit_torch
    from convert.ir import build_graph
    from convert.parse import net_spec
    from convert.proto import pb

    P = priors.shape[2] // 4
    L = 1 if share else classes
    text = (f'input: "loc" input_shape {{ dim: 1 dim: {P * L * 4} }} input: "conf" input_shape {{ dim: 1 dim: {P * classes} }} '
            f'input: "priors" input_shape {{ dim: 1 dim: 2 dim: {P * 4} }} '
            f'layer {{ name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "priors" top: "det" {param} }}')
    net = pb.NetParameter()
    text_format.Parse(text, net)
    graph = build_graph(net_spec(net), {})
    return emit_onnx(graph) if onnx else None, emit_torch(graph), graph


def run_alone(model, net, loc, conf, priors) -> tuple[np.ndarray, np.ndarray]:
    import torch

    feeds = {"loc": loc.astype(np.float32), "conf": conf.astype(np.float32), "priors": priors.astype(np.float32)}
    onnx_out = run_ort(model, feeds, ["det"])["det"] if model is not None else None
    with torch.inference_mode():
        torch_out = net(*(torch.from_numpy(v) for v in feeds.values()))["det"].numpy()
    return onnx_out, torch_out


def priors_of(boxes, variance=(0.1, 0.1, 0.2, 0.2)) -> np.ndarray:
    b = np.asarray(boxes, np.float32)
    return np.stack([b.reshape(-1), np.tile(np.asarray(variance, np.float32), len(b))])[None]


def scores_of(fg: np.ndarray) -> np.ndarray:
    """(B, P) foreground scores -> (B, P*2) [background, foreground] confidences."""
    return np.stack([1 - fg, fg], axis=-1).reshape(fg.shape[0], -1)


def check_alone(priors, loc, conf, classes, param, share=True, onnx=True, **ref_kw):
    model, net, _ = det_alone(priors, classes, param, share, onnx)
    got_onnx, got_torch = run_alone(model, net, loc, conf, priors)
    ref = detection_ref(loc, conf, priors, classes, share_location=share, **ref_kw)
    assert_close(ref, got_torch, "torch vs Caffe's loop", rtol=0, atol=1e-6)
    if onnx:
        assert_close(ref, got_onnx, "onnx vs Caffe's loop", rtol=0, atol=1e-6)
    return ref


def test_inverted_box_overlaps_nothing():
    """CORNER offsets can turn a box inside out (xmax < xmin): Caffe gives it size 0 and IoU 0,
    so it survives NMS; ONNX NonMaxSuppression would have swapped its corners and suppressed it."""
    priors = priors_of([[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]])
    loc = np.zeros((1, 12), np.float32)
    loc[0, 4:8] = [4.0, 0.0, -4.0, 0.0]  # prior 1: xmin 0.5, xmax 0.1 once decoded (variance 0.1)
    conf = scores_of(np.array([[0.9, 0.8, 0.7]]))
    ref = check_alone(priors, loc, conf, 2, det_param(2, "code_type: CORNER", "nms_threshold: 0.3"),
                      code_type="CORNER", nms_threshold=0.3)
    assert ref.shape[2] == 3 and ref[0, 0, 1, 5] < ref[0, 0, 1, 3]


def test_top_k_limits_candidates_before_nms():
    """nms_param.top_k picks the candidates NMS looks at: a box ranked past top_k is never kept,
    even when a better one was suppressed (ONNX's max_output_boxes_per_class would keep it)."""
    priors = priors_of([[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.52, 0.5], [0.6, 0.6, 0.9, 0.9]])
    loc = np.zeros((1, 12), np.float32)
    conf = scores_of(np.array([[0.9, 0.8, 0.7]]))
    ref = check_alone(priors, loc, conf, 2, det_param(2, "code_type: CORNER", "nms_threshold: 0.5 top_k: 2"),
                      code_type="CORNER", nms_threshold=0.5, top_k=2)
    assert ref.shape[2] == 1


def test_ties_keep_the_lower_prior_and_batch_image_ids():
    """Equal scores: Caffe's stable sort puts the lower prior first (it wins NMS, and keep_top_k);
    an image with no detection writes no row while the other image has some."""
    priors = priors_of([[0.1, 0.1, 0.5, 0.5], [0.11, 0.1, 0.51, 0.5], [0.6, 0.6, 0.9, 0.9], [0.6, 0.1, 0.9, 0.4]])
    loc = np.zeros((2, 16), np.float32)
    fg = np.array([[0.7, 0.7, 0.6, 0.6], [0.1, 0.1, 0.1, 0.1]], np.float32)
    param = det_param(2, "code_type: CORNER keep_top_k: 2 confidence_threshold: 0.2", "nms_threshold: 0.5")
    ref = check_alone(priors, loc, scores_of(fg), 2, param, code_type="CORNER", keep_top_k=2, confidence_threshold=0.2,
                      nms_threshold=0.5)
    np.testing.assert_allclose(ref[0, 0, :, :3], [[0, 1, 0.7], [0, 1, 0.6]], atol=1e-6)
    np.testing.assert_allclose(ref[0, 0, :, 3:], [[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]], atol=1e-6)


def test_eta_adaptive_threshold_in_torch_and_refused_in_onnx(tmp_path):
    """eta < 1 lowers the NMS threshold after each kept box (while it is above 0.5): torch follows
    Caffe's loop; ONNX NonMaxSuppression has a fixed threshold, so converting says so."""
    from convert.errors import GraftError

    rng = np.random.default_rng(5)
    centers = rng.uniform(0.2, 0.8, (30, 2)).astype(np.float32)
    priors = priors_of(np.concatenate([centers - 0.15, centers + 0.15], axis=1))
    loc = rng.normal(0, 1, (2, 30 * 4)).astype(np.float32)
    conf = scores_of(rng.uniform(0, 1, (2, 30)).astype(np.float32))
    param = det_param(2, "code_type: CENTER_SIZE", "nms_threshold: 0.8 eta: 0.8")
    ref = check_alone(priors, loc, conf, 2, param, onnx=False, code_type="CENTER_SIZE", nms_threshold=0.8, eta=0.8)
    fixed = detection_ref(loc, conf, priors, 2, code_type="CENTER_SIZE", nms_threshold=0.8)
    assert ref.shape[2] < fixed.shape[2], "eta should have suppressed more"
    with pytest.raises(GraftError, match=r"layer 'det': nms_param.eta 0.8 < 1"):
        det_alone(priors, 2, param)


# ----------------------------------------------------------------------------- (c) real models


def qr_like(rng: np.random.Generator, modules: int = 25) -> np.ndarray:
    """A QR-code-like pattern (random modules, the three finder patterns, timing lines) with a
    quiet zone, 0/255, one pixel per module."""
    m = rng.uniform(size=(modules, modules)) > 0.5
    for r, c in ((0, 0), (0, modules - 7), (modules - 7, 0)):
        for i in range(-1, 8):
            for j in range(-1, 8):
                if 0 <= r + i < modules and 0 <= c + j < modules:
                    m[r + i, c + j] = max(abs(i - 3), abs(j - 3)) in (0, 1, 3)
    m[6, 8:-8] = m[8:-8, 6] = np.arange(modules - 16) % 2 == 0
    return np.pad(np.where(m, 0, 255).astype(np.uint8), 4, constant_values=255)


def wechat_inputs(cv2) -> dict[str, np.ndarray]:
    """opencv_contrib's preprocessing (cubic resize to 384, gray, x1/255) of a real photo, the photo
    with a code pasted in, and a synthetic page with two codes."""
    photo = cv2.imread(str(CAFFE / "mtcnn" / "test1.jpg"), cv2.IMREAD_GRAYSCALE)
    photo = cv2.resize(photo, (384, 384), interpolation=cv2.INTER_CUBIC)
    pasted = photo.copy()
    pasted[40:200, 180:340] = cv2.resize(qr_like(np.random.default_rng(0)), (160, 160), interpolation=cv2.INTER_NEAREST)
    page = np.full((384, 384), 230, np.uint8)
    for k, (r, c) in enumerate(((200, 50), (30, 220))):
        page[r:r + 120, c:c + 120] = cv2.resize(qr_like(np.random.default_rng(k + 1)), (120, 120), interpolation=cv2.INTER_NEAREST)
    as_input = lambda *imgs: (np.stack(imgs).astype(np.float32) / 255)[:, None]  # noqa: E731
    return {"photo": as_input(photo), "codes": as_input(pasted, page)}


def not_in_place_on_input(src: Path, dst: Path) -> Path:
    """The same net with the in-place BatchNorm+Scale on the input ``data`` writing ``data_norm``
    (graft's graph cannot yet name an input that a layer overwrites in place)."""
    from google.protobuf import text_format

    from convert.parse import read_prototxt

    net = read_prototxt(src)
    for layer in net.layer:
        if layer.type != "Input" and layer.name != "data/bn":
            layer.bottom[:] = ["data_norm" if b == "data" else b for b in layer.bottom]
        if layer.name in ("data/bn", "data/bn/scale"):
            layer.top[:] = ["data_norm"]
    dst.write_text(text_format.MessageToString(net))
    return dst


@needs_testbed
def test_wechat_qrcode_detector_matches_opencv(tmp_path):
    """The real WeChat QR detector (real weights): a photo with no code gives Caffe's row of -1s
    (OpenCV: only zero padding rows), codes are found as OpenCV finds them, at batch 2."""
    cv2 = pytest.importorskip("cv2")
    from convert import convert_model

    zoo = ZOO / "wechat_qrcode_detect"
    proto = not_in_place_on_input(zoo / "deploy.prototxt", tmp_path / "deploy.prototxt")
    pkg = convert_model(proto, zoo / "detect.caffemodel", tmp_path / "qr", "qr",
                        preprocess={"scale": 1 / 255, "channel_order": "gray"}, log=lambda _m: None)
    assert pkg.manifest["verification"]["passed"] is True
    net = opencv_net(zoo / "deploy.prototxt", zoo / "detect.caffemodel")
    for what, x in wechat_inputs(cv2).items():
        net.setInput(x)
        cv = opencv_detections(net.forward("detection_output"))
        got_onnx, got_torch = ours(pkg, x, ["detection_output"])
        det_o, det_t = got_onnx["detection_output"], got_torch["detection_output"]
        assert_close(det_o, det_t, f"{what}: onnx vs torch", rtol=0, atol=1e-5)
        if what == "photo":
            assert cv.shape[2] == 0
            np.testing.assert_array_equal(det_o, [[[[0, -1, -1, -1, -1, -1, -1]]]])
            continue
        assert sorted(det_o[0, 0, :, 0].tolist()) == [0, 1, 1], "one code in the photo, two on the page"
        assert np.all(det_o[0, 0, :, 1] == 1) and np.all(det_o[0, 0, :, 2] > 0.9)
        assert_same_detections(cv, det_o, f"{what}: onnx vs OpenCV", score_tol=1e-4)
        assert_same_detections(cv, det_t, f"{what}: torch vs OpenCV", score_tol=1e-4)


@needs_testbed
@pytest.mark.slow
def test_ssd300_vgg16_matches_opencv(tmp_path):
    """The zoo's SSD300 (VOC, 21 classes, 8732 priors from 6 PriorBox heads; DetectionOutput with
    ``include { phase: TEST }`` and a ``save_output_param`` naming absent paths) with generated
    weights (105 MB; 4-6 s here): keep_top_k 200 detections as OpenCV finds them."""
    from convert import convert_model
    from convert.generate import generate_caffemodel

    zoo = ZOO / "ssd300_vgg16_voc"
    weights = generate_caffemodel(zoo / "deploy.prototxt", tmp_path / "ssd300.caffemodel", seed=0)
    pkg = convert_model(zoo / "deploy.prototxt", weights, tmp_path / "ssd300", "ssd300", preprocess={"scale": 1 / 255},
                        verify=False, log=lambda _m: None)
    priors = [li for li in pkg.manifest["layers"] if li["type"] == "PriorBox"]
    assert len(priors) == 6 and pkg.blobs["mbox_priorbox"]["shape"][1:] == [2, 8732 * 4]
    x = image_batch(np.random.default_rng(0), (1, 3, 300, 300), batch=1)
    cv = opencv_out(zoo / "deploy.prototxt", weights, x, ["mbox_priorbox", "detection_out"])
    got_onnx, got_torch = ours(pkg, x, ["mbox_priorbox", "detection_out"])
    assert_close(cv["mbox_priorbox"], got_onnx["mbox_priorbox"], "priors: onnx vs OpenCV", rtol=0, atol=1e-6)
    det_o, det_t = got_onnx["detection_out"], got_torch["detection_out"]
    assert det_o.shape == (1, 1, 200, 7)
    assert_close(det_o, det_t, "onnx vs torch", rtol=0, atol=1e-5)
    assert_caffe_order(det_o, "ssd300")
    assert_same_detections(opencv_detections(cv["detection_out"]), det_o, "onnx vs OpenCV")


# ----------------------------------------------------------------------------- graph, hooks, errors


def test_onnx_post_processing_is_readable_and_batch_free():
    """Every node of the SSD post-processing is named after its layer ('det/<step>'; the builder
    suffixes names it has seen as values); no Reshape or Expand target bakes a batch size in."""
    from onnx import numpy_helper

    priors = priors_of([[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]])
    for share, classes in ((True, 3), (False, 3)):
        model, _, graph = det_alone(priors, classes, det_param(classes, f"share_location: {str(share).lower()} keep_top_k: 3"),
                                    share)
        names = [nd.name for nd in model.graph.node]
        assert len(set(names)) == len(names) and all(n.startswith("det/") for n in names[:-1])
        assert model.graph.node[-1].name.startswith("det") and list(model.graph.node[-1].output) == ["det"]
        ops = {nd.op_type for nd in model.graph.node}
        assert {"NonMaxSuppression", "TopK", "GatherND", "ScatterND"} <= ops
        consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for nd in model.graph.node:
            if nd.op_type == "Reshape":
                assert consts[nd.input[1]][0] in (-1, 0, 2), f"{nd.name}: batch baked into {consts[nd.input[1]]}"
            if nd.op_type == "Expand":
                assert nd.input[1] not in consts, f"{nd.name}: static Expand target"
        node = graph.node("det")
        assert node.converter.keeps_batch(node) is False
        assert node.converter.dynamic_axes(node) == {0: {2: "det_detections"}}
        # the upper bound: declared batch 1 x min(keep_top_k 3, 2 classes x 2 candidates)
        assert node.out_shapes == [(1, 1, 3, 7)]


def test_prior_box_is_a_constant_initializer(tmp_path):
    import onnx

    c = Case("pb", (1, 3, 8, 8), [
        ("c1", "Convolution", ["data"], ["c1"], "convolution_param { num_output: 2 kernel_size: 3 stride: 2 pad: 1 }"),
        ("pb", "PriorBox", ["c1", "data"], ["pb"], prior_param([2], [4], [2])),
    ], lambda x, W: {})
    _, _, pkg = convert(tmp_path, c)
    model = onnx.load(str(pkg.onnx_path), load_external_data=False)
    (node,) = [nd for nd in model.graph.node if list(nd.output) == ["pb"]]
    assert node.op_type == "Identity" and node.input[0] in {t.name for t in model.graph.initializer}
    from convert import load_torch

    net = load_torch(pkg)
    assert len(list(net.layers["pb"].parameters())) == 0  # nothing learned: caffe_blobs round-trips empty
    assert net.layers["pb"].__class__.__name__ == "_Constant"


BAD = [
    ("PriorBox", "prior_box_param { max_size: 4 }", "PriorBox needs positive min_size"),
    ("PriorBox", "prior_box_param { min_size: 4 max_size: 3 }", "each max_size must exceed its min_size"),
    ("PriorBox", "prior_box_param { min_size: 4 min_size: 6 max_size: 8 }", "1 max_size values for 2 min_size"),
    ("PriorBox", "prior_box_param { min_size: 4 variance: 0.1 variance: 0.2 }", "one or four positive variances"),
    ("PriorBox", "prior_box_param { min_size: 4 step: 2 step_h: 2 step_w: 2 }", "either step or step_h/step_w"),
    ("PriorBox", "prior_box_param { min_size: 4 img_size: 8 img_h: 8 img_w: 8 }", "either img_size or img_h/img_w"),
    ("PriorBox", "prior_box_param { min_size: 4 width: 3 height: 3 }", "OpenCV's extension"),
    ("DetectionOutput", "detection_output_param { share_location: true }", "num_classes must be set"),
    ("DetectionOutput", "detection_output_param { num_classes: 3 }", "conf .* must hold 2 priors x 3 classes"),
    ("DetectionOutput", "detection_output_param { num_classes: 2 share_location: false }", "loc .* must hold 2 priors x 2 x 4"),
    ("DetectionOutput", "detection_output_param { num_classes: 2 background_label_id: -1 }", "background_label_id -1 with share_location"),
    ("DetectionOutput", "detection_output_param { num_classes: 2 nms_param { eta: 1.5 } }", r"eta 1.5 must be in \(0, 1\]"),
    ("DetectionOutput", "detection_output_param { num_classes: 2 normalized_bbox: false }", "normalized_bbox: false"),
]


@pytest.mark.parametrize(("ltype", "param", "message"), BAD, ids=[f"{t}-{m[:24]}" for t, _, m in BAD])
def test_bad_parameters_are_one_line_errors(ltype, param, message):
    from google.protobuf import text_format

    from convert.errors import GraftError
    from convert.ir import build_graph
    from convert.parse import net_spec
    from convert.proto import pb

    if ltype == "PriorBox":
        text = (f'input: "fm" input_shape {{ dim: 1 dim: 2 dim: 4 dim: 4 }} input: "data" input_shape {{ dim: 1 dim: 3 dim: 8 dim: 8 }} '
                f'layer {{ name: "bad" type: "PriorBox" bottom: "fm" bottom: "data" top: "p" {param} }}')
    else:  # two priors, two classes
        text = ('input: "loc" input_shape { dim: 1 dim: 8 } input: "conf" input_shape { dim: 1 dim: 4 } '
                'input: "priors" input_shape { dim: 1 dim: 2 dim: 8 } '
                f'layer {{ name: "bad" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "priors" top: "d" {param} }}')
    net = pb.NetParameter()
    text_format.Parse(text, net)
    with pytest.raises(GraftError, match=f"layer 'bad': .*{message}") as err:
        build_graph(net_spec(net), {})
    assert "\n" not in str(err.value)
