"""The trained net as Caffe files, then as an ordinary model package.

The weights go back into Caffe's layout (each layer converter's ``caffe_blobs``), are streamed
into a V2 binary caffemodel beside the net's deploy prototxt, and that pair is converted with
``convert.convert_model`` like any Caffe model: parsed, emitted to ONNX and torch, and verified
blob by blob. The user gets a package for ``extract`` and a caffemodel that Caffe itself loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from convert import ModelPackage, convert_model
from convert.emit_torch import CaffeNet
from convert.generate import write_caffemodel
from convert.ir import Graph


def caffe_layers(graph: Graph, net: CaffeNet) -> Iterator[tuple[str, str, list[np.ndarray]]]:
    """``(layer name, type, blobs in Caffe's layout)`` for every layer, read from the torch net."""
    for node in graph.nodes:
        blobs = node.converter.caffe_blobs(node, net.layers[node.name]) if node.weights else []
        yield node.name, node.type, blobs


def write_caffe(out_dir: Path, stem: str, net_param, graph: Graph, net: CaffeNet) -> tuple[Path, Path]:
    """``<stem>_deploy.prototxt`` and ``<stem>.caffemodel`` (V2 binary) in ``out_dir``."""
    out_dir = Path(out_dir)
    prototxt = out_dir / f"{stem}_deploy.prototxt"
    tmp = prototxt.with_name(f".{prototxt.name}.tmp")
    tmp.write_text(text_format.MessageToString(net_param))
    tmp.replace(prototxt)
    caffemodel = write_caffemodel(out_dir / f"{stem}.caffemodel", caffe_layers(graph, net), net_name=net_param.name)
    return prototxt, caffemodel


def export_package(
    prototxt: Path,
    caffemodel: Path,
    base: ModelPackage,
    *,
    name: str,
    out: Path,
    classes: list[str],
    log: Callable[[str], None] = print,
) -> ModelPackage:
    """Convert the written Caffe files into a verified package with the base model's preprocessing."""
    return convert_model(prototxt, caffemodel, out=out, name=name, preprocess=base.preprocess,
                         mean_image=base.mean_image(), classes=classes, log=log)
