"""SSD's detection layers (weiliu89/caffe): PriorBox and DetectionOutput.

PriorBox's output depends only on shapes, so it is computed once at conversion (numpy, with
Caffe's float/double arithmetic) and stored as a constant: it does not follow the batch.

DetectionOutput decodes the location predictions against the priors, runs a greedy NMS per
image and class on the ``nms_param.top_k`` best candidates above ``confidence_threshold``,
keeps the ``keep_top_k`` best detections per image and writes Caffe's ``[1, 1, N, 7]`` rows
``[image_id, label, score, xmin, ymin, xmax, ymax]``: by image, then label, then score
(descending). When no image has a detection, Caffe writes one row ``[i, -1, ..., -1]`` per
image; both emitters do the same. The ONNX graph uses NonMaxSuppression (all images and
classes folded into its batch axis) and keeps Caffe's tie order (the lower prior index first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import numpy_helper

from ..errors import GraftError
from ..registry import Converter, register
from ._common import TorchModule, to_tensor, torch

# ----------------------------------------------------------------------------- PriorBox


@dataclass(frozen=True)
class PriorSpec:
    min_sizes: tuple[int, ...]  # Caffe truncates them to int (``int min_size_ = min_sizes_[s]``)
    max_sizes: tuple[int, ...]
    aspect_ratios: tuple[float, ...]  # 1 first, then each new ratio (and its flip)
    clip: bool
    variances: tuple[float, ...]  # one or four
    img_hw: tuple[int, int] | None  # img_h/img_w or img_size; None: bottom 1's size
    step_hw: tuple[float, float] | None  # step_h/step_w or step; None: image / feature map
    offset: float

    @property
    def num_priors(self) -> int:
        return len(self.aspect_ratios) * len(self.min_sizes) + len(self.max_sizes)


def prior_spec(node) -> PriorSpec:
    """The layer's parameters, checked as prior_box_layer.cpp's LayerSetUp checks them."""
    p = node.param("prior_box_param")
    name = node.name
    for ext in ("width", "height", "offset_h", "offset_w"):
        if len(getattr(p, ext)):
            raise GraftError(f"layer '{name}': prior_box_param.{ext} is OpenCV's extension, not Caffe's; not supported")
    if not len(p.min_size) or any(m <= 0 for m in p.min_size):
        raise GraftError(f"layer '{name}': PriorBox needs positive min_size values, got {list(p.min_size)}")
    if len(p.max_size) and len(p.max_size) != len(p.min_size):
        raise GraftError(f"layer '{name}': {len(p.max_size)} max_size values for {len(p.min_size)} min_size values")
    if any(mx <= mn for mn, mx in zip(p.min_size, p.max_size)):
        raise GraftError(f"layer '{name}': each max_size must exceed its min_size ({list(p.min_size)}, {list(p.max_size)})")
    f32 = np.float32
    ratios = [1.0]
    for ar in p.aspect_ratio:
        if ar <= 0:
            raise GraftError(f"layer '{name}': aspect_ratio {ar} must be positive")
        if any(abs(ar - r) < 1e-6 for r in ratios):
            continue
        ratios.append(float(f32(ar)))
        if p.flip:
            ratios.append(float(f32(1.0 / float(f32(ar)))))
    var = [float(f32(v)) for v in p.variance] or [float(f32(0.1))]
    if len(var) not in (1, 4) or any(v <= 0 for v in var):
        raise GraftError(f"layer '{name}': PriorBox needs one or four positive variances, got {list(p.variance)}")
    if p.HasField("img_h") or p.HasField("img_w"):
        if p.HasField("img_size"):
            raise GraftError(f"layer '{name}': give either img_size or img_h/img_w, not both")
        img = (int(p.img_h), int(p.img_w))
    else:
        img = (int(p.img_size), int(p.img_size)) if p.HasField("img_size") else None
    if img is not None and min(img) <= 0:
        raise GraftError(f"layer '{name}': image size {img} must be positive")
    if p.HasField("step_h") or p.HasField("step_w"):
        if p.HasField("step"):
            raise GraftError(f"layer '{name}': give either step or step_h/step_w, not both")
        step = (float(f32(p.step_h)), float(f32(p.step_w)))
    else:
        step = (float(f32(p.step)), float(f32(p.step))) if p.HasField("step") else None
    if step is not None and min(step) <= 0:
        raise GraftError(f"layer '{name}': step {step} must be positive")
    return PriorSpec(tuple(int(m) for m in p.min_size), tuple(int(m) for m in p.max_size), tuple(ratios),
                     bool(p.clip), tuple(var), img, step, float(f32(p.offset)))


def prior_boxes(spec: PriorSpec, layer_hw: tuple[int, int], img_hw: tuple[int, int]) -> np.ndarray:
    """prior_box_layer.cpp's Forward_cpu: (1, 2, H·W·num_priors·4), boxes then variances.

    Per cell, for each min_size: the min_size square, the sqrt(min·max) square when max_size
    is given, then one box per aspect ratio other than 1. Centres and steps are float32, box
    corners are computed in double and stored as float32, as in Caffe."""
    f32 = np.float32
    lh, lw = layer_hw
    ih, iw = spec.img_hw or img_hw
    if spec.step_hw is None:
        step_h, step_w = f32(ih) / f32(lh), f32(iw) / f32(lw)
    else:
        step_h, step_w = f32(spec.step_hw[0]), f32(spec.step_hw[1])
    sizes = []  # (box width, box height) per prior of a cell, as Caffe's float box_width/box_height
    for s, mn in enumerate(spec.min_sizes):
        sizes.append((f32(mn), f32(mn)))
        if spec.max_sizes:
            side = f32(math.sqrt(mn * spec.max_sizes[s]))
            sizes.append((side, side))
        for ar in spec.aspect_ratios:
            if abs(ar - 1.0) < 1e-6:
                continue
            sizes.append((f32(mn * math.sqrt(ar)), f32(mn / math.sqrt(ar))))
    bw = np.array([w for w, _ in sizes], np.float64)
    bh = np.array([h for _, h in sizes], np.float64)
    off = f32(spec.offset)
    cx = ((np.arange(lw, dtype=np.float32) + off) * step_w).astype(np.float64)
    cy = ((np.arange(lh, dtype=np.float32) + off) * step_h).astype(np.float64)
    cx = cx[None, :, None]  # (1, W, 1) against (H, W, priors)
    cy = cy[:, None, None]
    boxes = np.stack(np.broadcast_arrays((cx - bw / 2.0) / iw, (cy - bh / 2.0) / ih,
                                         (cx + bw / 2.0) / iw, (cy + bh / 2.0) / ih), axis=-1).astype(np.float32)
    if spec.clip:
        boxes = np.clip(boxes, f32(0), f32(1))
    var = np.broadcast_to(np.asarray(spec.variances, np.float32), boxes.shape)
    return np.stack([boxes.reshape(-1), var.reshape(-1)])[None]


def _prior_inputs(node, shapes) -> tuple[tuple[int, int], tuple[int, int]]:
    spec = prior_spec(node)
    if len(shapes[0]) != 4:
        raise GraftError(f"layer '{node.name}': PriorBox needs a 4-D feature map as bottom 0, got {shapes[0]}")
    if spec.img_hw is None:
        if len(shapes) < 2 or len(shapes[1]) != 4:
            raise GraftError(f"layer '{node.name}': PriorBox needs the 4-D image as bottom 1 (or img_size/img_h/img_w)")
        img = (int(shapes[1][2]), int(shapes[1][3]))
    else:
        img = spec.img_hw
    return (int(shapes[0][2]), int(shapes[0][3])), img


class _Constant(TorchModule):
    """A layer whose output depends only on the shapes fixed at conversion: a buffer."""

    def __init__(self, value: np.ndarray, description: str):
        super().__init__()
        self.register_buffer("value", to_tensor(value), persistent=False)
        self.description = description

    def forward(self, *_inputs: torch.Tensor) -> torch.Tensor:
        return self.value

    def extra_repr(self) -> str:
        return self.description


@register
class PriorBox(Converter):
    """SSD's prior boxes for the package's input size: a constant (1, 2, H·W·priors·4)."""

    types = ("PriorBox",)

    def keeps_batch(self, node) -> bool:
        return False

    def infer(self, node, shapes):
        (lh, lw), _ = _prior_inputs(node, shapes)
        return [(1, 2, lh * lw * prior_spec(node).num_priors * 4)]

    def _value(self, node) -> np.ndarray:
        layer_hw, img_hw = _prior_inputs(node, node.in_shapes)
        return prior_boxes(prior_spec(node), layer_hw, img_hw)

    def onnx(self, node, b):
        b.add("Identity", [b.const(f"{node.name}/priors", self._value(node))], node.outputs, name=node.name)

    def torch(self, node):
        return _Constant(self._value(node), f"priors {tuple(node.out_shapes[0])}")


# ----------------------------------------------------------------------------- DetectionOutput

CORNER, CENTER_SIZE, CORNER_SIZE = 1, 2, 3
CODE_NAMES = {CORNER: "CORNER", CENTER_SIZE: "CENTER_SIZE", CORNER_SIZE: "CORNER_SIZE"}
FLT_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class DetectionSpec:
    num_priors: int
    num_classes: int
    share_location: bool
    labels: tuple[int, ...]  # the classes searched: all but background_label_id
    code_type: int
    variance_in_target: bool
    keep_top_k: int  # -1: all
    confidence_threshold: float  # -FLT_MAX when not set, as Caffe
    nms_threshold: float
    top_k: int  # candidates per class before NMS; -1: all
    eta: float
    clip: bool  # OpenCV's extension: clip decoded boxes to [0, 1]

    @property
    def num_loc_classes(self) -> int:
        return 1 if self.share_location else self.num_classes

    @property
    def candidates(self) -> int:
        """Candidates per (image, class) that NMS looks at."""
        return self.num_priors if self.top_k < 0 else min(self.top_k, self.num_priors)

    @property
    def per_image(self) -> int:
        """The most rows one image can produce (at least the one row of -1s)."""
        n = len(self.labels) * self.candidates
        return max(1, n if self.keep_top_k < 0 else min(n, self.keep_top_k))

    def loc_class(self, label: int) -> int:
        return 0 if self.share_location else label


def _per_image(shape) -> int:
    return int(math.prod(shape[1:]))


def detection_spec(node, shapes) -> DetectionSpec:
    """The layer's parameters and its bottoms' shapes, checked as detection_output_layer.cpp does."""
    p = node.param("detection_output_param")
    name = node.name
    if len(shapes) != 3:
        raise GraftError(f"layer '{name}': DetectionOutput needs 3 bottoms (loc, conf, priors), got {len(shapes)}")
    if not p.HasField("num_classes") or p.num_classes < 1:
        raise GraftError(f"layer '{name}': detection_output_param.num_classes must be set (>= 1)")
    prior = shapes[2]
    if len(prior) != 3 or prior[1] != 2 or prior[2] % 4:
        raise GraftError(f"layer '{name}': priors (bottom 2) must be PriorBox's (1, 2, P*4), got {prior}")
    if shapes[0][0] != shapes[1][0]:
        raise GraftError(f"layer '{name}': loc and conf disagree on the batch: {shapes[0]} vs {shapes[1]}")
    num_priors, num_classes = prior[2] // 4, int(p.num_classes)
    share = bool(p.share_location)
    loc_classes = 1 if share else num_classes
    if _per_image(shapes[0]) != num_priors * loc_classes * 4:
        raise GraftError(f"layer '{name}': loc {shapes[0]} must hold {num_priors} priors x {loc_classes} x 4 values per image")
    if _per_image(shapes[1]) != num_priors * num_classes:
        raise GraftError(f"layer '{name}': conf {shapes[1]} must hold {num_priors} priors x {num_classes} classes per image")
    code = int(p.code_type)
    if code not in CODE_NAMES:
        raise GraftError(f"layer '{name}': unknown code_type {code}")
    nms = p.nms_param
    if nms.nms_threshold < 0:
        raise GraftError(f"layer '{name}': nms_threshold {nms.nms_threshold} must be non-negative")
    if not 0 < nms.eta <= 1:
        raise GraftError(f"layer '{name}': nms_param.eta {nms.eta} must be in (0, 1]")
    if share and p.background_label_id == -1:
        # DecodeBBoxesAll skips the shared boxes (label -1 == background) and Forward aborts
        raise GraftError(f"layer '{name}': background_label_id -1 with share_location: Caffe's DetectionOutput "
                         "aborts here ('Could not find location predictions for label -1'); use share_location: false")
    if not p.normalized_bbox:
        raise GraftError(f"layer '{name}': normalized_bbox: false (OpenCV's pixel boxes) is not supported")
    f32 = np.float32
    return DetectionSpec(
        num_priors=num_priors, num_classes=num_classes, share_location=share,
        labels=tuple(c for c in range(num_classes) if c != p.background_label_id),
        code_type=code, variance_in_target=bool(p.variance_encoded_in_target), keep_top_k=int(p.keep_top_k),
        confidence_threshold=float(f32(p.confidence_threshold)) if p.HasField("confidence_threshold") else -FLT_MAX,
        nms_threshold=float(f32(nms.nms_threshold)), top_k=int(nms.top_k) if nms.HasField("top_k") else -1,
        eta=float(f32(nms.eta)), clip=bool(p.clip))


def decode_boxes(spec: DetectionSpec, loc: torch.Tensor, pbox: torch.Tensor, pvar: torch.Tensor) -> torch.Tensor:
    """bbox_util.cpp's DecodeBBox on (..., P, 4) offsets; priors (P, 4). Same operation order as
    Caffe (float32), and as the ONNX graph."""
    if not spec.variance_in_target:
        loc = loc * pvar
    if spec.code_type == CORNER:
        return pbox + loc
    pmin, pmax = pbox[..., :2], pbox[..., 2:]
    psize = pmax - pmin
    if spec.code_type == CORNER_SIZE:
        return pbox + loc * torch.cat([psize, psize], dim=-1)
    center = loc[..., :2] * psize + (pmin + pmax) / 2
    half = torch.exp(loc[..., 2:]) * psize / 2
    return torch.cat([center - half, center + half], dim=-1)


def jaccard(boxes: torch.Tensor) -> torch.Tensor:
    """bbox_util.cpp's JaccardOverlap (normalized: no +1) between all pairs of (..., K, 4) boxes;
    an inverted box (xmax < xmin or ymax < ymin) has size 0 and overlaps nothing."""
    x0, y0, x1, y1 = (c.contiguous() for c in boxes.unbind(-1))
    w = (torch.minimum(x1[..., :, None], x1[..., None, :]) - torch.maximum(x0[..., :, None], x0[..., None, :])).clamp_(min=0)
    h = (torch.minimum(y1[..., :, None], y1[..., None, :]) - torch.maximum(y0[..., :, None], y0[..., None, :])).clamp_(min=0)
    inter = w.mul_(h)  # > 0 only where both sides overlap, hence neither box is inverted
    size = torch.where((x1 < x0) | (y1 < y0), torch.zeros_like(x0), (x1 - x0) * (y1 - y0))
    union = size[..., :, None] + size[..., None, :] - inter
    return torch.where(inter > 0, inter / union, torch.zeros_like(inter))


def greedy_nms(spec: DetectionSpec, boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """bbox_util.cpp's ApplyNMSFast loop for G groups at once: candidates (G, K, 4) sorted by
    score, ``valid`` (G, K) those above the threshold. A candidate is kept when its IoU with
    every box kept before it is <= the (eta-adaptive, float32) threshold. Returns (G, K) bool."""
    iou = jaccard(boxes)
    kept = torch.zeros_like(valid)
    threshold = torch.full(valid.shape[:1], spec.nms_threshold, dtype=torch.float32, device=boxes.device)
    zero = iou.new_zeros(())
    for i in range(valid.shape[1]):
        worst = torch.where(kept, iou[:, i], zero).amax(dim=1)  # 0 while nothing is kept
        keep = valid[:, i] & (worst <= threshold)
        kept[:, i] = keep
        if spec.eta < 1:
            threshold = torch.where(keep & (threshold > 0.5), threshold * spec.eta, threshold)
    return kept


def no_detections(batch: int, device) -> torch.Tensor:
    """Caffe's output when nothing is detected in any image: [i, -1, -1, -1, -1, -1, -1] per image."""
    rows = torch.full((batch, 7), -1.0, device=device)
    rows[:, 0] = torch.arange(batch, dtype=torch.float32, device=device)
    return rows


#: IoU matrices per NMS chunk (float32 elements): classes are searched in chunks beyond this
NMS_CHUNK = 1 << 24


class _DetectionOutput(TorchModule):
    """The same steps as the ONNX graph: per (image, class) the top_k candidates (stable sort),
    greedy NMS over all groups at once, keep_top_k per image, rows by image, label, rank."""

    def __init__(self, spec: DetectionSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("labels", torch.tensor(spec.labels, dtype=torch.int64), persistent=False)
        self.register_buffer("loc_class", torch.tensor([spec.loc_class(c) for c in spec.labels], dtype=torch.int64),
                             persistent=False)

    def forward(self, loc: torch.Tensor, conf: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        s = self.spec
        batch, P, F = loc.shape[0], s.num_priors, len(s.labels)
        if not F or not s.candidates or not s.keep_top_k:
            return no_detections(batch, loc.device).reshape(1, 1, -1, 7)
        prior = prior.reshape(2, P, 4).float()
        boxes = decode_boxes(s, loc.reshape(batch, P, s.num_loc_classes, 4).transpose(1, 2).float(), prior[0], prior[1])
        if s.clip:
            boxes = boxes.clamp(0.0, 1.0)
        scores = conf.reshape(batch, P, s.num_classes).transpose(1, 2).float()[:, self.labels]  # (B, F, P)
        cand_scores, cand_prior = torch.sort(scores, dim=2, descending=True, stable=True)
        valid = cand_scores[..., :s.candidates] > s.confidence_threshold
        k = int(valid.sum(dim=2).max())  # candidates past the last valid one never matter
        if k == 0:
            return no_detections(batch, loc.device).reshape(1, 1, -1, 7)
        cand_scores, cand_prior, valid = cand_scores[..., :k], cand_prior[..., :k], valid[..., :k]
        image = torch.arange(batch, device=loc.device)[:, None, None]
        cand_boxes = boxes[image, self.loc_class[None, :, None], cand_prior]  # (B, F, k, 4)
        groups = batch * F
        step = max(1, NMS_CHUNK // (k * k))
        flat_boxes, flat_valid = cand_boxes.reshape(groups, k, 4), valid.reshape(groups, k)
        kept = torch.cat([greedy_nms(s, flat_boxes[g:g + step], flat_valid[g:g + step])
                          for g in range(0, groups, step)]).reshape(batch, F * k)
        if -1 < s.keep_top_k < F * k:  # the best keep_top_k per image (ties: lower class, then rank)
            ranked = torch.where(kept, cand_scores.reshape(batch, F * k), torch.full_like(kept, -math.inf, dtype=torch.float32))
            best = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :s.keep_top_k]
            kept = kept & torch.zeros_like(kept).scatter(1, best, True)
        b, slot = torch.nonzero(kept, as_tuple=True)  # row-major: image, class, rank
        f, r = slot // k, slot % k
        if b.numel() == 0:
            return no_detections(batch, loc.device).reshape(1, 1, -1, 7)
        rows = torch.cat([b.float()[:, None], self.labels[f].float()[:, None], cand_scores[b, f, r][:, None],
                          cand_boxes[b, f, r]], dim=1)
        return rows.reshape(1, 1, -1, 7)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"classes={s.num_classes}, labels={list(s.labels)}, code={CODE_NAMES[s.code_type]}, "
                f"nms={s.nms_threshold:g}, top_k={s.top_k}, keep_top_k={s.keep_top_k}")


# ONNX: one named step per function; every intermediate is "<layer>/<what>".


def _i64(b, hint: str, values) -> str:
    return b.const(hint, values, dtype="int64")


def _onnx_decode(b, n: str, s: DetectionSpec, loc: str, prior: str) -> str:
    """(B, loc classes, P, 4) decoded boxes, the same float32 operations as ``decode_boxes``."""
    P = s.num_priors
    x = b.op("Reshape", [loc, _i64(b, f"{n}/loc_shape", [-1, P, s.num_loc_classes, 4])], f"{n}/loc")
    x = b.op("Transpose", [x], f"{n}/loc_by_class", perm=[0, 2, 1, 3])
    pri = b.op("Reshape", [prior, _i64(b, f"{n}/prior_shape", [2, P, 4])], f"{n}/prior")
    pbox, pvar = b.unique(f"{n}/prior_boxes"), b.unique(f"{n}/prior_variances")  # (1, P, 4) each
    b.add("Split", [pri, _i64(b, f"{n}/prior_split", [1, 1])], [pbox, pvar], name=f"{n}/split_prior", axis=0)
    if not s.variance_in_target:
        x = b.op("Mul", [x, pvar], f"{n}/loc_scaled")
    if s.code_type == CORNER:
        return b.op("Add", [pbox, x], f"{n}/boxes")

    def part(v: str, lo: int, hint: str) -> str:
        return b.op("Slice", [v, _i64(b, f"{n}/from{lo}", [lo]), _i64(b, f"{n}/to{lo + 2}", [lo + 2]),
                              _i64(b, f"{n}/last_axis", [-1])], f"{n}/{hint}")

    pmin, pmax = part(pbox, 0, "prior_min"), part(pbox, 2, "prior_max")
    psize = b.op("Sub", [pmax, pmin], f"{n}/prior_size")
    if s.code_type == CORNER_SIZE:
        scale = b.op("Concat", [psize, psize], f"{n}/prior_size4", axis=-1)
        return b.op("Add", [pbox, b.op("Mul", [x, scale], f"{n}/offsets")], f"{n}/boxes")
    two = b.const(f"{n}/two", 2.0)
    pcenter = b.op("Div", [b.op("Add", [pmin, pmax], f"{n}/prior_min_plus_max"), two], f"{n}/prior_center")
    center = b.op("Add", [b.op("Mul", [part(x, 0, "loc_center"), psize], f"{n}/center_offset"), pcenter], f"{n}/center")
    size = b.op("Mul", [b.op("Exp", [part(x, 2, "loc_size")], f"{n}/size_factor"), psize], f"{n}/size")
    half = b.op("Div", [size, two], f"{n}/half_size")
    lo, hi = b.op("Sub", [center, half], f"{n}/box_min"), b.op("Add", [center, half], f"{n}/box_max")
    return b.op("Concat", [lo, hi], f"{n}/boxes", axis=-1)


def _onnx_scores(b, n: str, s: DetectionSpec, conf: str) -> str:
    """(B, searched classes, P) confidences, background dropped."""
    x = b.op("Reshape", [conf, _i64(b, f"{n}/conf_shape", [-1, s.num_priors, s.num_classes])], f"{n}/conf")
    x = b.op("Transpose", [x], f"{n}/conf_by_class", perm=[0, 2, 1])
    if len(s.labels) == s.num_classes:
        return x
    return b.op("Gather", [x, _i64(b, f"{n}/labels_searched", list(s.labels))], f"{n}/scores", axis=1)


def _onnx_candidates(b, n: str, s: DetectionSpec, scores: str, boxes: str) -> tuple[str, str]:
    """nms_param.top_k: the K best priors per (image, class), sorted (ties: lower prior first,
    as Caffe's stable_sort), with their boxes: (B, F, K) scores, (B, F, K, 4) boxes."""
    K = s.candidates
    vals, idx = b.unique(f"{n}/candidate_scores"), b.unique(f"{n}/candidate_priors")
    b.add("TopK", [scores, _i64(b, f"{n}/top_k", [K])], [vals, idx], name=f"{n}/top_k", axis=2, largest=1, sorted=1)
    idx = b.op("Unsqueeze", [idx, _i64(b, f"{n}/axis3", [3])], f"{n}/candidate_priors_col")
    loc_class = np.array([s.loc_class(c) for c in s.labels], np.int64).reshape(1, -1, 1, 1)
    loc_class = b.op("Expand", [_i64(b, f"{n}/loc_class", loc_class), b.op("Shape", [idx], f"{n}/candidate_shape")],
                     f"{n}/candidate_loc_class")
    where = b.op("Concat", [loc_class, idx], f"{n}/candidate_index", axis=3)
    return vals, b.op("GatherND", [boxes, where], f"{n}/candidate_boxes", batch_dims=1)


def _onnx_nms(b, n: str, s: DetectionSpec, cand_scores: str, cand_boxes: str) -> str:
    """Greedy NMS of every (image, class) at once (folded into NMS's batch axis): (B, F*K)
    scores of the kept candidates, -inf elsewhere."""
    K, F = s.candidates, len(s.labels)
    lo = b.op("Slice", [cand_boxes, _i64(b, f"{n}/c0", [0]), _i64(b, f"{n}/c2", [2]), _i64(b, f"{n}/c_axis", [-1])],
              f"{n}/candidate_min")
    hi = b.op("Slice", [cand_boxes, _i64(b, f"{n}/c2b", [2]), _i64(b, f"{n}/c4", [4]), _i64(b, f"{n}/c_axisb", [-1])],
              f"{n}/candidate_max")
    # Caffe gives an inverted box (xmax < xmin) size 0 and no overlap; NMS would swap its
    # corners, so it sees such a box flattened to zero width/height instead.
    hi = b.op("Max", [hi, lo], f"{n}/candidate_max_valid")
    nms_boxes = b.op("Reshape", [b.op("Concat", [lo, hi], f"{n}/nms_boxes_4d", axis=-1),
                                 _i64(b, f"{n}/nms_boxes_shape", [-1, K, 4])], f"{n}/nms_boxes")
    flat = b.op("Reshape", [cand_scores, _i64(b, f"{n}/flat_shape", [-1, K])], f"{n}/candidate_scores_flat")
    nms_scores = b.op("Unsqueeze", [flat, _i64(b, f"{n}/axis1", [1])], f"{n}/nms_scores")
    selected = b.op("NonMaxSuppression", [
        nms_boxes, nms_scores, _i64(b, f"{n}/max_per_class", [K]),
        b.const(f"{n}/nms_threshold", [min(s.nms_threshold, 1.0)]),
        b.const(f"{n}/confidence_threshold", [s.confidence_threshold])], f"{n}/nms")
    pair = b.op("Gather", [selected, _i64(b, f"{n}/pair_columns", [0, 2])], f"{n}/kept_pair", axis=1)
    kept = b.op("GatherND", [flat, pair], f"{n}/kept_scores")
    none = b.op("ConstantOfShape", [b.op("Shape", [flat], f"{n}/flat_size")], f"{n}/no_scores",
                value=numpy_helper.from_array(np.array([-np.inf], np.float32)))
    dense = b.op("ScatterND", [none, pair, kept], f"{n}/kept_dense")
    return b.op("Reshape", [dense, _i64(b, f"{n}/per_image_shape", [-1, F * K])], f"{n}/kept_per_image")


def _onnx_keep_top_k(b, n: str, s: DetectionSpec, dense: str) -> str:
    """(B, F*K) bool: the kept detections, at most keep_top_k per image (the best scores; ties:
    lower class, then better rank)."""
    F, K = len(s.labels), s.candidates
    if not -1 < s.keep_top_k < F * K:
        return b.op("Greater", [dense, b.const(f"{n}/minus_inf", -np.inf)], f"{n}/kept")
    vals, idx = b.unique(f"{n}/best_scores"), b.unique(f"{n}/best_slots")
    b.add("TopK", [dense, _i64(b, f"{n}/keep_top_k", [s.keep_top_k])], [vals, idx], name=f"{n}/keep_top_k_sort",
          axis=1, largest=1, sorted=1)
    real = b.op("Cast", [b.op("Greater", [vals, b.const(f"{n}/minus_inf2", -np.inf)], f"{n}/best_found")],
                f"{n}/best_found_f", to=1)
    zeros = b.op("ConstantOfShape", [b.op("Shape", [dense], f"{n}/dense_size")], f"{n}/zeros",
                 value=numpy_helper.from_array(np.array([0.0], np.float32)))
    mask = b.op("ScatterElements", [zeros, idx, real], f"{n}/best_mask", axis=1)
    return b.op("Greater", [mask, b.const(f"{n}/half", 0.5)], f"{n}/kept")


def _onnx_rows(b, n: str, s: DetectionSpec, dense: str, kept: str, cand_boxes: str) -> str:
    """(M, 7) rows in Caffe's order: image, then label, then score (NonZero walks row-major)."""
    K = s.candidates
    nz = b.op("Transpose", [b.op("NonZero", [kept], f"{n}/kept_index")], f"{n}/kept_rows", perm=[1, 0])
    image, slot = b.unique(f"{n}/row_image"), b.unique(f"{n}/row_slot")
    b.add("Split", [nz, _i64(b, f"{n}/row_split", [1, 1])], [image, slot], name=f"{n}/split_rows", axis=1)
    k = _i64(b, f"{n}/candidates", [K])
    cls, rank = b.op("Div", [slot, k], f"{n}/row_class"), b.op("Mod", [slot, k], f"{n}/row_rank")
    label = b.op("Gather", [b.const(f"{n}/labels", list(s.labels)), cls], f"{n}/row_label")
    label = b.op("Reshape", [label, _i64(b, f"{n}/col", [-1, 1])], f"{n}/row_label_col")
    score = b.op("Unsqueeze", [b.op("GatherND", [dense, nz], f"{n}/row_score_flat"), _i64(b, f"{n}/axis1b", [1])],
                 f"{n}/row_score")
    box = b.op("GatherND", [cand_boxes, b.op("Concat", [image, cls, rank], f"{n}/row_candidate", axis=1)],
               f"{n}/row_box")
    image = b.op("Cast", [image], f"{n}/row_image_f", to=1)
    return b.op("Concat", [image, label, score, box], f"{n}/rows", axis=1)


def _onnx_fallback(b, n: str, loc: str) -> tuple[str, str]:
    """Caffe's rows when nothing is found, [i, -1 x 6] per image: (B, 7); and B as a (1,) tensor."""
    batch = b.op("Slice", [b.op("Shape", [loc], f"{n}/loc_dims"), _i64(b, f"{n}/b0", [0]), _i64(b, f"{n}/b1", [1])],
                 f"{n}/batch")
    count = b.op("Cast", [b.op("Squeeze", [batch], f"{n}/batch_scalar")], f"{n}/batch_f", to=1)
    ids = b.op("Range", [b.const(f"{n}/zero", 0.0), count, b.const(f"{n}/one", 1.0)], f"{n}/image_ids")
    ids = b.op("Unsqueeze", [ids, _i64(b, f"{n}/axis1c", [1])], f"{n}/image_id_col")
    minus = b.op("Expand", [b.const(f"{n}/minus_ones", -np.ones((1, 6))),
                            b.op("Concat", [batch, _i64(b, f"{n}/six", [6])], f"{n}/fallback_shape", axis=0)],
                 f"{n}/fallback_fill")
    return b.op("Concat", [ids, minus], f"{n}/no_detections", axis=1), batch


def emit_detection_output(node, b, s: DetectionSpec) -> None:
    n = node.name
    loc, conf, prior = node.inputs
    fallback, batch = _onnx_fallback(b, n, loc)
    axes01 = _i64(b, f"{n}/axes01", [0, 1])
    if not s.labels or s.candidates == 0 or s.keep_top_k == 0:  # nothing can ever be kept
        b.add("Unsqueeze", [fallback, axes01], node.outputs, name=n)
        return
    boxes = _onnx_decode(b, n, s, loc, prior)
    if s.clip:
        boxes = b.op("Clip", [boxes, b.const(f"{n}/clip_lo", 0.0), b.const(f"{n}/clip_hi", 1.0)], f"{n}/boxes_clipped")
    cand_scores, cand_boxes = _onnx_candidates(b, n, s, _onnx_scores(b, n, s, conf), boxes)
    dense = _onnx_nms(b, n, s, cand_scores, cand_boxes)
    rows = _onnx_rows(b, n, s, dense, _onnx_keep_top_k(b, n, s, dense), cand_boxes)
    # no row at all: Caffe's fallback rows instead (Slice to M rows, or to the B fallback rows)
    m = b.op("Slice", [b.op("Shape", [rows], f"{n}/rows_size"), _i64(b, f"{n}/m0", [0]), _i64(b, f"{n}/m1", [1])],
             f"{n}/num_rows")
    empty = b.op("Cast", [b.op("Equal", [m, _i64(b, f"{n}/zero_rows", [0])], f"{n}/nothing_found")],
                 f"{n}/nothing_found_i", to=7)
    end = b.op("Add", [m, b.op("Mul", [batch, empty], f"{n}/fallback_rows")], f"{n}/end")
    both = b.op("Concat", [rows, fallback], f"{n}/rows_or_fallback", axis=0)
    out = b.op("Slice", [both, _i64(b, f"{n}/start", [0]), end, _i64(b, f"{n}/axis0", [0])], f"{n}/detections")
    b.add("Unsqueeze", [out, axes01], node.outputs, name=n)


@register
class DetectionOutput(Converter):
    """SSD's decoding + per-class NMS + keep_top_k; output [1, 1, N, 7], N found at run time.

    ``infer`` reports the upper bound: declared batch x min(keep_top_k, classes x candidates)."""

    types = ("DetectionOutput",)

    def keeps_batch(self, node) -> bool:
        return False

    def dynamic_axes(self, node):
        return {0: {2: f"{node.name}_detections"}}

    def infer(self, node, shapes):
        spec = detection_spec(node, shapes)
        return [(1, 1, shapes[0][0] * spec.per_image, 7)]

    def onnx(self, node, b):
        spec = detection_spec(node, node.in_shapes)
        if spec.eta < 1:
            raise GraftError(f"layer '{node.name}': nms_param.eta {spec.eta:g} < 1 (adaptive NMS threshold) cannot be "
                             "expressed with ONNX NonMaxSuppression; only the torch module implements it")
        emit_detection_output(node, b, spec)

    def torch(self, node):
        return _DetectionOutput(detection_spec(node, node.in_shapes))

