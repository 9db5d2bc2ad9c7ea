"""Prototxt (text, V1 or V2) -> :class:`NetSpec`: inputs and deploy layers in order.

V1 nets (``layers { type: CONVOLUTION }``) and V2 nets (``layer { type: "Convolution" }``)
become the same spec; a layer's parameters stay in the protobuf message, whose
``*_param`` fields have the same names in both generations.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from . import prototxt_fields
from .errors import GraftError
from .proto import pb

# V1 enum names -> V2 type strings (caffe-semantics.md, "Formats").
V1_TYPES: dict[str, str] = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DATA": "Data", "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN", "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

# Layers that only make sense while training: dropped from a deploy net with a note.
TRAINING_ONLY = {
    "Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData", "HDF5Output", "Python",
    "Accuracy", "SoftmaxWithLoss", "EuclideanLoss", "HingeLoss", "InfogainLoss", "ContrastiveLoss",
    "MultinomialLogisticLoss", "SigmoidCrossEntropyLoss",
}


@dataclass
class LayerSpec:
    """One deploy layer: its Caffe name and V2 type string, blob names, and parameter message."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    msg: Any = field(repr=False)  # LayerParameter or V1LayerParameter

    def param(self, field_name: str) -> Any:
        """The ``<field_name>`` sub-message (defaults filled in when absent)."""
        if field_name not in self.msg.DESCRIPTOR.fields_by_name:
            # V1 messages lack some V2-only params (batch_norm_param, ...): defaults apply.
            return getattr(pb.LayerParameter(), field_name)
        return getattr(self.msg, field_name)


@dataclass
class NetSpec:
    name: str
    generation: str  # "V1" or "V2"
    inputs: dict[str, list[int]]
    layers: list[LayerSpec]
    notes: list[str] = field(default_factory=list)
    #: graph outputs chosen by ``--outputs`` (None: the blobs no layer reads)
    outputs: list[str] | None = None
    #: (name, type) of the layers ``--outputs`` left out
    left_out: list[tuple[str, str]] = field(default_factory=list)


def read_text_message(path: str | Path, message: Any, label: str = "", expected: str = "a .prototxt file",
                      notes: list[str] | None = None) -> str:
    """Parse a text-format file into ``message`` (NetParameter, SolverParameter, ...); returns the text.

    A missing file or a syntax error is a GraftError naming ``label`` + the file (and the line).
    Fields the schema does not know are ignored; when ``notes`` is given, each is named there
    once (``layer 'pool1' (Pooling): unknown field 'pooling_param.foo' ignored``).
    """
    path = Path(path)
    where = f"{label}{path}"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise GraftError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise GraftError(f"{where}: is a directory, expected {expected}") from None
    try:
        text_format.Parse(text, message, allow_unknown_field=True)
    except text_format.ParseError as err:
        hint = ""
        if "Invalid field value: [" in str(err):  # protobuf < 6.31 cannot skip a list-valued unknown field
            from google.protobuf import __version__ as pb_version

            hint = (f" (protobuf {pb_version} cannot skip a fork's field written as a list [a, b]: "
                    "pip install 'protobuf>=6.31', or write the field once per value)")
        raise GraftError(f"{where}: prototxt syntax error at line {str(err).split(':')[0]}: {_after_location(err)}{hint}") from None
    if notes is not None:
        notes.extend(unknown_field_notes(text, message.DESCRIPTOR))
    return text


def read_prototxt(path: str | Path, notes: list[str] | None = None) -> Any:
    """Parse a prototxt into a NetParameter; a syntax error names the file and line.

    Each field the schema does not know (a fork's) is one ``warning: <file>: ...`` line on
    stderr, once per process, and is appended to ``notes`` when given.
    """
    net = pb.NetParameter()
    found: list[str] = []
    read_text_message(path, net, notes=found)
    for note in found:
        _warn_once(f"warning: {path}: {note}")
    if notes is not None:
        notes.extend(found)
    return net


def unknown_field_notes(text: str, descriptor: Any = None) -> list[str]:
    """The fields of a prototxt's text that graft's schema lacks, one note each (NetParameter
    unless ``descriptor`` says otherwise); training-only layers are not reported."""
    found = prototxt_fields.unknown_fields(text, descriptor or pb.NetParameter.DESCRIPTOR)
    return prototxt_fields.notes(found, V1_TYPES, TRAINING_ONLY)


_WARNED: set[str] = set()


def _warn_once(line: str) -> None:
    """One stderr line per distinct warning per process (a file parsed twice warns once)."""
    if line not in _WARNED:
        _WARNED.add(line)
        print(line, file=sys.stderr)


def _after_location(err: Exception) -> str:
    parts = str(err).split(" : ", 1)
    return parts[1] if len(parts) == 2 else str(err)


def _is_excluded(msg: Any) -> bool:
    """Include/exclude rules evaluated for a TEST-phase deploy net."""
    test = pb.NetState().phase  # TEST
    if len(msg.include):
        return not any((not r.HasField("phase")) or r.phase == test for r in msg.include)
    return any(r.HasField("phase") and r.phase == test for r in msg.exclude)


def input_layer_shapes(msg: Any, name: str, source: str) -> dict[str, list[int]]:
    """An ``Input`` layer's tops and shapes: one ``input_param.shape`` per top, or one for all."""
    shapes = list(msg.input_param.shape)
    tops = list(msg.top)
    if not tops:
        raise GraftError(f"{source}: Input layer '{name}' has no top")
    if not shapes:
        raise GraftError(f"{source}: Input layer '{name}' declares no shape")
    if len(shapes) not in (1, len(tops)):
        raise GraftError(f"{source}: Input layer '{name}' has {len(tops)} tops but {len(shapes)} shapes (give one, or one per top)")
    return {top: [int(d) for d in (shapes[i] if len(shapes) > 1 else shapes[0]).dim] for i, top in enumerate(tops)}


def net_spec(net: Any, source: str = "prototxt") -> NetSpec:
    """Normalise a NetParameter of either generation into a :class:`NetSpec`."""
    if len(net.layer) and len(net.layers):
        raise GraftError(f"{source}: mixes V1 'layers' and V2 'layer' entries; use one generation")
    generation = "V1" if len(net.layers) else "V2"
    inputs: dict[str, list[int]] = {}
    names = list(net.input)
    if len(set(names)) != len(names):
        raise GraftError(f"{source}: input names {names} repeat")
    if names:
        if len(net.input_shape):
            if len(net.input_shape) != len(names):
                raise GraftError(f"{source}: {len(names)} inputs but {len(net.input_shape)} input_shape entries")
            for n, s in zip(names, net.input_shape):
                inputs[n] = [int(d) for d in s.dim]
        else:
            dims = list(net.input_dim)
            if len(dims) != 4 * len(names):
                raise GraftError(f"{source}: {len(names)} inputs need {4 * len(names)} input_dim values, found {len(dims)}")
            for i, n in enumerate(names):
                inputs[n] = [int(d) for d in dims[4 * i: 4 * i + 4]]
    notes: list[str] = []
    layers: list[LayerSpec] = []
    raw = net.layers if generation == "V1" else net.layer
    for msg in raw:
        if generation == "V1":
            enum_name = pb.V1LayerParameter.LayerType.Name(msg.type) if msg.type in pb.V1LayerParameter.LayerType.values() else str(msg.type)
            ltype = V1_TYPES.get(enum_name, enum_name)
        else:
            ltype = msg.type
        name = msg.name or f"{ltype.lower()}_{len(layers)}"
        if _is_excluded(msg):
            notes.append(f"dropped layer '{name}' ({ltype}): not in the TEST phase")
            continue
        if ltype == "Input":
            for top, shape in input_layer_shapes(msg, name, source).items():
                if top in inputs:
                    raise GraftError(f"{source}: input '{top}' is declared twice")
                inputs[top] = shape
            continue
        if ltype in TRAINING_ONLY:
            notes.append(f"dropped training-only layer '{name}' ({ltype})")
            continue
        layers.append(LayerSpec(name=name, type=ltype, bottoms=list(msg.bottom), tops=list(msg.top), msg=msg))
    if not inputs:
        raise GraftError(f"{source}: the net declares no input (need 'input'+'input_dim'/'input_shape' or an Input layer)")
    for n, shape in inputs.items():
        if not shape or any(d <= 0 for d in shape):
            raise GraftError(f"{source}: input '{n}' has shape {shape}; every input needs at least one dim, all positive")
    return NetSpec(name=net.name, generation=generation, inputs=inputs, layers=layers, notes=notes)


def load_net_spec(path: str | Path) -> NetSpec:
    return net_spec(read_prototxt(path), source=str(path))


def to_v2_prototxt(spec: NetSpec, inputs: Mapping[str, Sequence[int]] | None = None) -> str:
    """The deploy net in V2 syntax (what the package stores as ``deploy.prototxt``); ``inputs``
    replaces declared input shapes (``--input-size``)."""
    out = pb.NetParameter()
    out.name = spec.name
    for name, declared in spec.inputs.items():
        shape = [int(d) for d in (inputs or {}).get(name, declared)]
        layer = out.layer.add(name=name, type="Input")
        layer.top.append(name)
        layer.input_param.shape.add().dim.extend(shape)
    v2_fields = pb.LayerParameter.DESCRIPTOR.fields_by_name
    for ls in spec.layers:
        layer = out.layer.add(name=ls.name, type=ls.type)
        layer.bottom.extend(ls.bottoms)
        layer.top.extend(ls.tops)
        for fd, value in ls.msg.ListFields():
            if fd.name.endswith("_param") and fd.name in v2_fields and fd.name != "transform_param":
                getattr(layer, fd.name).CopyFrom(value)
        if ls.msg.DESCRIPTOR.name == "LayerParameter":
            for p in ls.msg.param:
                layer.param.add().CopyFrom(p)
        elif ls.msg.DESCRIPTOR.name == "V1LayerParameter":
            # V1 blobs_lr / weight_decay become V2 ParamSpec lr_mult / decay_mult.
            for i, lr in enumerate(ls.msg.blobs_lr):
                ps = layer.param.add(lr_mult=lr)
                if i < len(ls.msg.weight_decay):
                    ps.decay_mult = ls.msg.weight_decay[i]
    return text_format.MessageToString(out)
