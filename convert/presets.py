"""Models graft knows by name: their deploy net and preprocessing, so a user needs only weights.

``vgg-face``: the released VGG-Face deploy net (Parkhi et al. 2015: VGG-16, fc8 = 2,622
identities, Softmax ``prob``), written out here layer by layer with the release's names, and
its preprocessing (224×224 squash, BGR, mean B 93.5940 G 104.7624 R 129.1863, no scaling).

``ultraface`` and ``mtcnn``: preprocessing only (``prototxt`` None: the user gives the released
deploy net with ``--prototxt``), the face detectors ``graft faces`` runs. UltraFace RFB-320
(Linzaer): RGB, 320×240 (W×H), (x − 127) / 128. MTCNN (Zhang et al. 2016, trained in MATLAB
Caffe): RGB, H and W transposed, (x − 127.5) × 0.0078125, at each net's own input size.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GraftError


@dataclass(frozen=True)
class Preset:
    name: str
    prototxt: str | None  # None: preprocessing only, the deploy net comes from --prototxt
    preprocess: dict
    description: str


def _vgg_face_prototxt() -> str:
    lines = ['name: "VGG_FACE_16_layer"', 'input: "data"'] + [f"input_dim: {d}" for d in (1, 3, 224, 224)]

    def layer(name, ltype, bottom, top, body=""):
        lines.append(f'layer {{\n  bottom: "{bottom}"\n  top: "{top}"\n  name: "{name}"\n  type: "{ltype}"\n{body}}}')

    bottom = "data"
    for block, (n_convs, channels) in enumerate([(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)], start=1):
        for i in range(1, n_convs + 1):
            name = f"conv{block}_{i}"
            layer(name, "Convolution", bottom, name,
                  f"  convolution_param {{\n    num_output: {channels}\n    pad: 1\n    kernel_size: 3\n  }}\n")
            layer(f"relu{block}_{i}", "ReLU", name, name)
            bottom = name
        layer(f"pool{block}", "Pooling", bottom, f"pool{block}",
              "  pooling_param {\n    pool: MAX\n    kernel_size: 2\n    stride: 2\n  }\n")
        bottom = f"pool{block}"
    for fc, n_out in ((6, 4096), (7, 4096)):
        layer(f"fc{fc}", "InnerProduct", bottom, f"fc{fc}", f"  inner_product_param {{\n    num_output: {n_out}\n  }}\n")
        layer(f"relu{fc}", "ReLU", f"fc{fc}", f"fc{fc}")
        layer(f"drop{fc}", "Dropout", f"fc{fc}", f"fc{fc}", "  dropout_param {\n    dropout_ratio: 0.5\n  }\n")
        bottom = f"fc{fc}"
    layer("fc8", "InnerProduct", "fc7", "fc8", "  inner_product_param {\n    num_output: 2622\n  }\n")
    layer("prob", "Softmax", "fc8", "prob")
    return "\n".join(lines) + "\n"


PRESETS: dict[str, Preset] = {
    "vgg-face": Preset(
        name="vgg-face",
        prototxt=_vgg_face_prototxt(),
        preprocess={"channel_order": "bgr", "mean": [93.5940, 104.7624, 129.1863], "scale": 1.0,
                    "resize": [224, 224], "crop": 0},
        description="VGG-Face (VGG-16, 2,622 identities), Oxford VGG 2015; weights CC BY-NC 4.0",
    ),
    "ultraface": Preset(
        name="ultraface",
        prototxt=None,
        preprocess={"channel_order": "rgb", "mean": [127.0, 127.0, 127.0], "scale": 1 / 128, "resize": [240, 320], "crop": 0},
        description="Ultra-Light-Fast-Generic-Face-Detector-1MB RFB-320 (Linzaer), deploy net from --prototxt; MIT",
    ),
    "mtcnn": Preset(
        name="mtcnn",
        prototxt=None,
        preprocess={"channel_order": "rgb", "mean": [127.5, 127.5, 127.5], "scale": 0.0078125, "crop": 0, "transpose": True},
        description="MTCNN det1/det2/det3 (kpzhang93), MATLAB-trained (transposed input), deploy net from --prototxt; MIT",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise GraftError(f"unknown preset '{name}' (known: {', '.join(sorted(PRESETS))})") from None
