"""Write a caffemodel with seeded random weights for any deploy prototxt, V1 or V2 layout.

For tests and benchmarks: the real VGG-Face weights cannot be had here, so a 580 MB
caffemodel of the same architecture is generated from the real prototxt. Weights are scaled
(He init, BatchNorm statistics with a non-trivial moving-average factor) so that activations
stay in a realistic range through deep nets. Blobs are streamed to disk as packed float32,
one layer at a time, never building the whole message in memory.

    python -m convert.generate deploy.prototxt out.caffemodel --layout V1 --seed 0
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .ir import build_graph
from .parse import load_net_spec

# V1LayerParameter.LayerType numbers, by V2 type string
V1_ENUM = {
    "AbsVal": 35, "ArgMax": 30, "BNLL": 2, "Concat": 3, "Convolution": 4, "Deconvolution": 39, "Dropout": 6, "Eltwise": 25,
    "Exp": 38, "Flatten": 8, "InnerProduct": 14, "LRN": 15, "MVN": 34, "Pooling": 17, "Power": 26, "ReLU": 18,
    "Sigmoid": 19, "Softmax": 20, "Split": 22, "Slice": 33, "TanH": 23, "Threshold": 31,
}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _ld(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _blob_header(shape: tuple[int, ...], nbytes: int, legacy: bool) -> bytes:
    """BlobProto bytes before the packed data payload (the data field's key and length)."""
    if legacy:  # V1 files: num, channels, height, width
        dims = (1,) * (4 - len(shape)) + tuple(shape) if len(shape) <= 4 else shape
        head = b"".join(_key(f, 0) + _varint(int(d)) for f, d in zip((1, 2, 3, 4), dims))
    else:
        head = _ld(7, _ld(1, b"".join(_varint(int(d)) for d in shape)))
    return head + _key(5, 2) + _varint(nbytes)


def random_blobs(layer_type: str, shapes: list[tuple[int, ...]], rng: np.random.Generator) -> list[np.ndarray]:
    """Plausible values for a layer's blobs (He-scaled weights, small biases, sane BN stats)."""
    if layer_type == "BatchNorm":
        c = shapes[0][0]
        s = np.float32(999.982)  # Caffe's moving-average factor after many iterations
        mean = rng.normal(0, 0.2, c).astype(np.float32)
        var = rng.uniform(0.5, 2.0, c).astype(np.float32)
        return [mean * s, var * s, np.array([s], np.float32)]
    if layer_type == "BN":  # forks: slope, bias, mean, variance (PSPNet) or scale, shift (SegNet), 1xCx1x1
        out = [rng.uniform(0.5, 1.5, shapes[0]).astype(np.float32), rng.normal(0, 0.1, shapes[1]).astype(np.float32)]
        if len(shapes) == 4:
            out += [rng.normal(0, 0.2, shapes[2]).astype(np.float32), rng.uniform(0.5, 2.0, shapes[3]).astype(np.float32)]
        return out
    if layer_type in ("Scale", "Bias"):
        out = [rng.uniform(0.5, 1.5, shapes[0]).astype(np.float32)] if layer_type == "Scale" else []
        out += [rng.normal(0, 0.1, s).astype(np.float32) for s in shapes[len(out):]]
        return out
    if layer_type == "PReLU":
        return [rng.uniform(0.05, 0.4, shapes[0]).astype(np.float32)]
    if layer_type == "Normalize":
        return [rng.uniform(5, 20, shapes[0]).astype(np.float32)]
    out = []
    for i, s in enumerate(shapes):
        if i == 0 and len(s) >= 2:
            fan_in = math.prod(s[1:]) if layer_type != "Deconvolution" else s[0] * math.prod(s[2:])
            out.append(rng.standard_normal(s, dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_in)))
        else:
            out.append(rng.normal(0, 0.01, s).astype(np.float32))
    return out


def write_caffemodel(
    out: str | Path,
    layers: Iterable[tuple[str, str, Sequence[np.ndarray]]],
    *,
    net_name: str = "",
    layout: str = "V2",
) -> Path:
    """Stream ``(layer name, V2 type, blobs)`` into a binary caffemodel at ``out`` (atomically).

    Each layer's blobs are written as packed float32 as they arrive, so a generator of layers
    never holds the whole net in memory. Blob shapes are written as given (V2 ``shape``; V1:
    legacy num/channels/height/width). Used for generated weights and for fine-tuned nets.
    """
    layout = layout.upper()
    if layout not in ("V1", "V2"):
        raise ValueError("layout must be V1 or V2")
    v1 = layout == "V1"
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if net_name:
                f.write(_ld(1, net_name.encode()))
            for name, ltype, blobs in layers:
                blobs = [np.ascontiguousarray(b, dtype="<f4") for b in blobs]
                if v1:
                    if ltype not in V1_ENUM:
                        raise ValueError(f"layer '{name}': type {ltype} has no V1 encoding")
                    head = _ld(4, name.encode()) + _key(5, 0) + _varint(V1_ENUM[ltype])
                    blob_field = 6
                else:
                    head = _ld(1, name.encode()) + _ld(2, ltype.encode())
                    blob_field = 7
                blob_heads = [_blob_header(tuple(b.shape), b.nbytes, legacy=v1) for b in blobs]
                blob_sizes = [len(h) + b.nbytes for h, b in zip(blob_heads, blobs)]
                body = len(head) + sum(len(_key(blob_field, 2)) + len(_varint(n)) + n for n in blob_sizes)
                f.write(_key(2 if v1 else 100, 2) + _varint(body) + head)
                for h, b, n in zip(blob_heads, blobs, blob_sizes):
                    f.write(_key(blob_field, 2) + _varint(n) + h)
                    f.write(memoryview(b).cast("B"))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def generate_caffemodel(
    prototxt: str | Path,
    out: str | Path,
    layout: str = "V2",
    seed: int = 0,
    input_size: Sequence[int] | None = None,
    outputs: Sequence[str] | None = None,
) -> Path:
    """Write ``out`` (atomically) with random weights shaped as ``prototxt`` requires.

    ``outputs`` generates only for the layers those blobs need (as ``convert --outputs``).

    ``input_size`` (H, W) replaces the declared spatial size of the image input, as
    ``convert --input-size`` does: a VGG-class net at 32x32 has a small fc6, for quick tests.
    """
    spec = load_net_spec(prototxt)
    if outputs:
        from .prune import prune

        spec = prune(spec, outputs, source=str(prototxt))
    shapes = None
    if input_size:
        from .ir import main_input

        name = main_input(spec.inputs)
        shapes = {name: list(spec.inputs[name][:2]) + [int(d) for d in input_size]}
    graph = build_graph(spec, None, input_shapes=shapes)
    rng = np.random.default_rng(seed)

    def layers():
        for node in graph.nodes:
            shapes = node.converter.weight_shapes(node, node.in_shapes)
            yield node.name, node.type, random_blobs(node.type, shapes, rng) if shapes else []

    return write_caffemodel(out, layers(), net_name=spec.name, layout=layout)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prototxt")
    p.add_argument("out")
    p.add_argument("--layout", default="V2", choices=["V1", "V2"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-size", default=None, help="H[,W]: generate for this input size instead of the declared one")
    p.add_argument("--outputs", default=None, help="BLOB[,BLOB]: only the layers these blobs need")
    a = p.parse_args(argv)
    from .preprocess import parse_size

    outputs = [o for o in (a.outputs or "").split(",") if o.strip()] or None
    path = generate_caffemodel(a.prototxt, a.out, a.layout, a.seed, parse_size(a.input_size, "--input-size"), outputs)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
