"""The real-world zoo: every deploy prototxt in ``../shared/testbed/caffe/zoo/`` converts, and
matches OpenCV's independent Caffe importer blob by blob wherever OpenCV can run it.

The folder is walked, so adding a prototxt there adds a test. Nets without real weights get
seeded random ones generated from the prototxt (``convert.generate``); a few big ones are tested
at a smaller input size (``--input-size``) so the walk stays quick — the layers, parameters
and declaration quirks are the same, only H and W shrink. The real-weight nets run at their
own size.

Where OpenCV cannot create a layer type, the OpenCV copy of the net is cut before it (that
layer and all that depends on it); where OpenCV runs a fork's type under its standard name
with the same meaning, the copy is renamed (``DepthwiseConvolution`` → ``Convolution``).
DetectionOutput rows are compared as box sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from _convert_helpers import CAFFE, as_shape, assert_close, needs_testbed, run_ort, run_torch

ZOO = CAFFE / "zoo"

pytestmark = needs_testbed


@dataclass
class ZooNet:
    """How the walk treats one zoo folder; the defaults fit any new deploy prototxt."""

    input_size: tuple[int, int] | None = None  # None: the declared size
    outputs: list[str] | None = None  # convert --outputs (a trunk without a fork's post-processing)
    pre: dict = field(default_factory=dict)  # build_preprocess flags
    opencv_rename: dict[str, str] = field(default_factory=dict)  # fork type -> OpenCV's equivalent
    opencv_cut: set[str] = field(default_factory=set)  # types OpenCV cannot create: cut from its copy
    opencv: str = ""  # a reason when OpenCV cannot be the reference at all
    slow: bool = False


IMAGENET = dict(mean="104,117,123")
NETS: dict[str, ZooNet] = {
    "bvlc_alexnet": ZooNet(input_size=(67, 67), pre=IMAGENET),
    "vgg16_ilsvrc": ZooNet(input_size=(32, 32), pre=IMAGENET),
    "resnet50_kaiming": ZooNet(pre=IMAGENET),
    # inputs scaled to about ±0.5: with random weights, raw 0..255 pixels decode every box to ±1e8
    # with a score of exactly 1 (ties, which Caffe's and OpenCV's sorts order differently)
    "ssd300_vgg16_voc": ZooNet(pre=dict(mean="104,117,123", scale=1 / 255), slow=True),
    "pspnet50_ade20k": ZooNet(pre=dict(mean="103.939,116.779,123.68"), slow=True,
                              opencv="OpenCV cannot parse PSPNet's bn_param (UnknownField should have at least 2 items)"),
    "fcn8s_voc": ZooNet(input_size=(64, 64), pre=dict(mean="104.00698793,116.66876762,122.67891434"), slow=True),
    "yolov3_darknet2caffe": ZooNet(input_size=(128, 128), outputs=["layer82-conv", "layer94-conv", "layer106-conv"],
                                   pre=dict(channel_order="rgb", scale=1 / 255), opencv_cut={"Upsample"}),
    "mobilenet_yolov3_lite_tusimple": ZooNet(pre=dict(mean="103.94,116.78,123.68", scale=0.017),
                                             opencv_rename={"DepthwiseConvolution": "Convolution"}),
    "shufflenet_v2_x0.5": ZooNet(pre=dict(mean="103.94,116.78,123.68", scale=0.017)),
    "mobilenet_v3_small": ZooNet(pre=dict(mean="103.94,116.78,123.68", scale=0.017),
                                 opencv_rename={"DepthwiseConvolution": "Convolution"}),
    "sphereface20": ZooNet(pre=dict(mean="127.5", scale=0.0078125)),
    "tsm_resnet50_x2paddle": ZooNet(pre=IMAGENET, slow=True,
                                    opencv="OpenCV 4.14 cannot run this prototxt (kernel[i] > 0 in getKernelSize)"),
    "wechat_qrcode_detect": ZooNet(pre=dict(channel_order="gray", scale=1 / 255)),
    "wechat_qrcode_sr": ZooNet(pre=dict(channel_order="gray", scale=1 / 255)),
    "colorization_v2": ZooNet(pre=dict(channel_order="gray", mean="50")),
}


def zoo_folders() -> list:
    if not ZOO.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"zoo absent: {ZOO}"))]
    out = []
    for d in sorted(p for p in ZOO.iterdir() if (p / "deploy.prototxt").is_file()):
        cfg = NETS.get(d.name, ZooNet())
        out.append(pytest.param(d.name, id=d.name, marks=[pytest.mark.slow] if cfg.slow else []))
    return out


FOLDERS = zoo_folders()


def test_every_zoo_folder_is_walked():
    """A folder the walk knows by name but the test bed lacks is a stale entry here."""
    if not ZOO.is_dir():
        pytest.skip(f"zoo absent: {ZOO}")
    present = {d.name for d in ZOO.iterdir() if (d / "deploy.prototxt").is_file()}
    assert set(NETS) <= present, f"configured but absent: {set(NETS) - present}"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """name -> (config, prototxt, caffemodel, package, test input shape); converted once."""
    from convert import convert_model
    from convert.generate import generate_caffemodel
    from convert.parse import load_net_spec
    from convert.preprocess import build_preprocess

    root = tmp_path_factory.mktemp("zoo")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cfg = NETS.get(name, ZooNet())
            proto = ZOO / name / "deploy.prototxt"
            real = sorted((ZOO / name).glob("*.caffemodel"))
            work = root / name
            work.mkdir(exist_ok=True)
            weights = real[0] if real else generate_caffemodel(proto, work / "generated.caffemodel", seed=1,
                                                               input_size=cfg.input_size, outputs=cfg.outputs)
            spec = load_net_spec(proto)
            shape = list(next(iter(spec.inputs.values())))
            if cfg.input_size:
                shape = shape[:2] + list(cfg.input_size)
            pre, mean_img = build_preprocess(shape, **cfg.pre)
            pkg = convert_model(proto, weights, work / "pkg", name, preprocess=pre, mean_image=mean_img,
                                input_size=list(cfg.input_size) if cfg.input_size else None,
                                log=lambda _m: None, **({"outputs": cfg.outputs} if cfg.outputs else {}))
            cache[name] = (cfg, proto, Path(weights), pkg, shape)
        return cache[name]

    return get


def image_input(pkg, shape, seed: int = 0) -> np.ndarray:
    """Random 0..255 pixels through the package's mean and scale: what the net sees in use."""
    x = np.random.default_rng(seed).uniform(0, 255, size=shape)
    pre = pkg.preprocess
    if pre.get("mean"):
        x = x - np.asarray(pre["mean"]).reshape(1, -1, 1, 1)
    return (x * pre["scale"]).astype(np.float32)


@pytest.mark.parametrize("name", FOLDERS)
def test_zoo_net_converts_and_verifies(zoo, name):
    cfg, _, _, pkg, _ = zoo(name)
    v = pkg.manifest["verification"]
    assert v["passed"] is True, f"{name}: verification {v.get('failed')}"
    assert len(v["blobs"]) == sum(1 for b in pkg.blobs.values() if b["kind"] != "input")
    if cfg.outputs:
        assert pkg.outputs == cfg.outputs


# ----------------------------------------------------------------------------- vs OpenCV


def opencv_copy(proto: Path, pkg, shape: list[int], cfg: ZooNet, out: Path) -> tuple[Path, dict[str, str]]:
    """The converted deploy net as OpenCV should run it: V2 syntax, the test's input shape,
    the fork types renamed, the layers OpenCV cannot create (and their dependants) cut.
    Returns the prototxt and {kept layer: its first Caffe top}."""
    from google.protobuf import text_format

    from convert.proto import pb

    net = pb.NetParameter()
    text_format.Parse((pkg.dir / "deploy.prototxt").read_text(), net)
    keep = pb.NetParameter(name=net.name)
    cut_blobs: set[str] = set()
    kept: dict[str, str] = {}
    for layer in net.layer:
        if layer.type == "Input":
            layer.input_param.ClearField("shape")
            layer.input_param.shape.add().dim.extend(shape)
        elif layer.type in cfg.opencv_cut or cut_blobs & set(layer.bottom):
            cut_blobs.update(layer.top)
            continue
        layer.type = cfg.opencv_rename.get(layer.type, layer.type)
        keep.layer.add().CopyFrom(layer)
        kept[layer.name] = layer.top[0] if len(layer.top) else ""
    out.write_text(text_format.MessageToString(keep))
    return out, kept


def detections(rows: np.ndarray) -> np.ndarray:
    """The real rows of a DetectionOutput: not Caffe's all -1 'nothing found' row, not OpenCV's
    all-zero padding up to keep_top_k (a detection has a score above 0)."""
    rows = rows.reshape(-1, 7)
    return rows[(rows[:, 1] >= 0) & (rows[:, 2] > 0)]


def box_sets_match(ref: np.ndarray, got: np.ndarray, what: str) -> None:
    """DetectionOutput [1, 1, N, 7]: the same rows up to order: same image and label, IoU >= 0.99
    (or the same corners, for the empty boxes random weights decode), score within 1e-4."""
    ref, got = detections(ref), detections(got)
    assert len(ref) == len(got), f"{what}: {len(got)} detections, OpenCV {len(ref)}"
    used = np.zeros(len(got), bool)
    for r in ref:
        same = (got[:, 0] == r[0]) & (got[:, 1] == r[1]) & ~used & (np.abs(got[:, 2] - r[2]) <= 1e-4)
        lo, hi = np.maximum(got[:, 3:5], r[3:5]), np.minimum(got[:, 5:7], r[5:7])
        inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
        union = np.prod(got[:, 5:7] - got[:, 3:5], axis=1) + np.prod(r[5:7] - r[3:5]) - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, inter / union, 0.0)
        corners = np.abs(got[:, 3:] - r[3:]).max(axis=1) <= 1e-4 * max(1.0, float(np.abs(r[3:]).max()))
        ok = same & ((iou >= 0.99) | corners)
        assert ok.any(), f"{what}: no match for OpenCV's {r}"
        used[int(np.argmax(ok))] = True


@pytest.mark.parametrize("name", FOLDERS)
def test_zoo_net_matches_opencv(zoo, name, tmp_path):
    cv2 = pytest.importorskip("cv2")
    from convert import load_torch

    cfg, proto, weights, pkg, shape = zoo(name)
    if cfg.opencv:
        pytest.skip(cfg.opencv)
    cv_proto, kept = opencv_copy(proto, pkg, shape, cfg, tmp_path / "opencv.prototxt")
    net = cv2.dnn.readNetFromCaffe(str(cv_proto), str(weights))
    net.enableFusion(False)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    x = image_input(pkg, shape)
    layers = [li for li in pkg.manifest["layers"] if li["name"] in kept and li["type"] not in ("Split", "Silence")]
    assert layers, f"{name}: OpenCV keeps no layer"
    cv_names = set(net.getLayerNames())
    # OpenCV names a layer after its top when the two differ and nothing else claims the top
    ids = [li["name"] if li["name"] in cv_names else kept[li["name"]] for li in layers]
    net.setInput(x)
    ref = dict(zip(ids, net.forward(ids)))
    values = [li["tops"][0] for li in layers]
    ours = run_ort(pkg.onnx_path_for(values), {pkg.input_name: x}, values)
    ours_t = run_torch(load_torch(pkg), x, values)
    torch_net = load_torch(pkg)
    cv_value = {v: as_shape(ref[i], ours[v].shape) for i, v in zip(ids, values)}
    cv_value[pkg.input_name] = x
    for li, i, v in zip(layers, ids, values):
        if li["type"] == "DetectionOutput":
            for runtime, got in (("onnx", ours[v]), ("torch", ours_t[v])):
                box_sets_match(ref[i], got, f"{name} {runtime}: layer {li['name']}")
            continue
        # 1. the layer alone, fed OpenCV's own bottoms: the layer's numerics, to float32 noise
        if all(b in cv_value for b in li["bottoms"]):
            import torch

            with torch.inference_mode():
                out = torch_net.layers[li["name"]](*[torch.from_numpy(np.ascontiguousarray(cv_value[b]))
                                                    for b in li["bottoms"]])
            out = (out if isinstance(out, torch.Tensor) else out[0]).numpy()
            assert_close(cv_value[v], out, f"{name}: layer {li['name']} ({li['type']}) alone, torch vs OpenCV")
        # 2. the whole net up to here: float32 differences grow through deep random-weight nets
        #    (saturated softmaxes over logits in the hundreds), hence the looser bound
        for runtime, got in (("onnx", ours[v]), ("torch", ours_t[v])):
            assert_close(cv_value[v], got, f"{name} {runtime}: layer {li['name']} ({li['type']}) -> {v}",
                         rtol=END_TO_END_RTOL)


#: whole-net tolerance, relative to the blob's largest magnitude (per layer: RTOL, 1e-4)
END_TO_END_RTOL = 1e-3
