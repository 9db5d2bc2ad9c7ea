"""Net surgery on the prototxt: cut the deploy net at a blob, append a new classifier or regressor.

The result is a real Caffe net (a V2 ``NetParameter``): the input, every layer the cut blob
depends on (verbatim, with its ``param`` specs), then InnerProduct ``<last IP>_<task>`` with Caffe
fillers and, for a classifier, ``num_output`` = number of classes and Softmax ``prob``; for a
regressor ``num_output`` 1, no Softmax (the InnerProduct's top is the net's output) and a
constant bias filler at the training targets' mean. It is what one would write by hand for
``caffe train``, and what the fine-tuned package's ``deploy.prototxt`` becomes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from convert import ModelPackage
from convert.errors import GraftError
from convert.parse import read_prototxt
from convert.proto import pb

PROB = "prob"

#: Caffe filler type -> (filler message, shape, rng) -> array; fan_in = count / shape[0], as Caffe
Filler = Callable[[object, tuple[int, ...], np.random.Generator], np.ndarray]
FILLERS: dict[str, Filler] = {
    "constant": lambda f, shape, rng: np.full(shape, f.value, np.float32),
    "gaussian": lambda f, shape, rng: rng.normal(f.mean, f.std, shape).astype(np.float32),
    "uniform": lambda f, shape, rng: rng.uniform(f.min, f.max, shape).astype(np.float32),
    "xavier": lambda f, shape, rng: _scaled(rng.uniform(-1.0, 1.0, shape), 3.0, f, shape),
    "msra": lambda f, shape, rng: _scaled(rng.standard_normal(shape), 2.0, f, shape),
}


def _scaled(unit: np.ndarray, k: float, f, shape: tuple[int, ...]) -> np.ndarray:
    """Xavier: U(±sqrt(3/n)); MSRA: N(0, sqrt(2/n)); n = fan in, fan out or their mean."""
    fan_in = math.prod(shape) / shape[0]
    fan_out = math.prod(shape) / shape[1] if len(shape) > 1 else fan_in
    n = {0: fan_in, 1: fan_out, 2: (fan_in + fan_out) / 2}[int(f.variance_norm)]
    return (unit * math.sqrt(k / n)).astype(np.float32)


def fill(filler, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A blob initialised as Caffe's ``FillerParameter`` says."""
    if filler.type not in FILLERS:
        raise GraftError(f"filler type {filler.type!r} is not supported (known: {', '.join(FILLERS)})")
    return FILLERS[filler.type](filler, tuple(shape), rng)


@dataclass
class Surgery:
    """The new net and what was done to get it."""

    net: object  # pb.NetParameter, V2
    from_blob: str  # the value cut at, as the package names it (maybe '<blob>/pre_<layer>')
    bottom: str  # its Caffe blob name in the new net
    new_layer: str  # the appended InnerProduct (its top has the same name)
    kept: list[str]  # base layers kept, in order
    cut: list[str]  # base layers dropped
    softmax: bool = True  # a Softmax 'prob' follows the new layer (classification)

    @property
    def output(self) -> str:
        """The net's output blob: ``prob`` for a classifier, the new layer's top for a regressor."""
        return PROB if self.softmax else self.new_layer

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.net.layer if layer.type != "Input"]


def default_from_blob(pkg: ModelPackage) -> str:
    """The input blob of the net's last InnerProduct (``fc7`` for VGG-Face, ``pool`` for open_nsfw)."""
    ips = [layer for layer in pkg.manifest["layers"] if layer["type"] == "InnerProduct"]
    if not ips:
        raise GraftError(f"model '{pkg.name}' has no InnerProduct layer: name the blob to train from with --from-blob")
    return ips[-1]["bottoms"][0]


def default_layer_name(pkg: ModelPackage, task: str) -> str:
    """``<last InnerProduct>_<task>`` (``fc8_gender``), as Caffe fine-tuning recipes name it."""
    ips = [layer["name"] for layer in pkg.manifest["layers"] if layer["type"] == "InnerProduct"]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", task).strip("_") or "task"
    return f"{ips[-1] if ips else 'fc'}_{slug}"


def _ancestors(layers: list[dict], value: str) -> set[str]:
    """Names of the layers that ``value`` depends on (the producing layer included)."""
    producer = {t: layer for layer in layers for t in layer["tops"]}
    need, seen, out = [value], set(), set()
    while need:
        v = need.pop()
        if v in seen or v not in producer:
            continue
        seen.add(v)
        layer = producer[v]
        out.add(layer["name"])
        need.extend(layer["bottoms"])
    return out


def cut_and_append(
    pkg: ModelPackage,
    n_classes: int,
    *,
    task: str,
    from_blob: str | None = None,
    new_layer: str | None = None,
    init: str = "gaussian",
    softmax: bool = True,
    bias: float = 0.0,
) -> Surgery:
    """The package's deploy net cut at ``from_blob`` with a new ``n_classes``-output InnerProduct on top.

    ``init``: ``gaussian`` (std 0.01, Caffe's fine-tuning default) or ``xavier`` for the new
    weights; the bias starts at ``bias`` (a constant filler: 0 for a classifier, the training
    targets' mean for a regressor). The new layer gets Caffe's usual multipliers (weights lr 1 /
    decay 1, bias lr 2 / decay 0) unless overridden later. ``softmax``: append Softmax ``prob``
    (a classifier); without it the new layer's top is the net's output (a regressor).
    """
    from_blob = from_blob or default_from_blob(pkg)
    pkg.check_blobs([from_blob])
    layers = pkg.manifest["layers"]
    keep = _ancestors(layers, from_blob)
    base = read_prototxt(pkg.dir / "deploy.prototxt")
    by_name = {layer.name: layer for layer in base.layer}
    if from_blob == pkg.input_name:
        bottom = from_blob
    else:
        producer = next(layer for layer in layers if from_blob in layer["tops"])
        bottom = by_name[producer["name"]].top[producer["tops"].index(from_blob)]
    net = pb.NetParameter()
    net.name = base.name
    kept = []
    for layer in base.layer:
        if layer.type == "Input" or layer.name in keep:
            net.layer.add().CopyFrom(layer)
            kept += [layer.name] if layer.type != "Input" else []
    new_layer = new_layer or default_layer_name(pkg, task)
    names = {layer.name for layer in net.layer}
    blobs = {t for layer in net.layer for t in layer.top}
    for name, what in ((new_layer, "the new layer (--new-layer)"), (PROB, "the new Softmax")):
        if name == PROB and not softmax:
            continue
        if name in names or name in blobs:
            raise GraftError(f"{what} would be named '{name}', which the kept net already uses; pick another --new-layer")
    if softmax and new_layer == PROB:
        raise GraftError(f"the new layer cannot be named '{PROB}': the Softmax after it is; pick another --new-layer")
    if init not in ("gaussian", "xavier"):
        raise GraftError(f"--init must be gaussian or xavier, got {init!r}")
    ip = net.layer.add(name=new_layer, type="InnerProduct")
    ip.bottom.append(bottom)
    ip.top.append(new_layer)
    ip.param.add(lr_mult=1.0, decay_mult=1.0)
    ip.param.add(lr_mult=2.0, decay_mult=0.0)
    p = ip.inner_product_param
    p.num_output = int(n_classes)
    if init == "gaussian":
        p.weight_filler.type, p.weight_filler.std = "gaussian", 0.01
    else:
        p.weight_filler.type = "xavier"
    p.bias_filler.type, p.bias_filler.value = "constant", float(bias)
    if softmax:
        sm = net.layer.add(name=PROB, type="Softmax")
        sm.bottom.append(new_layer)
        sm.top.append(PROB)
    cut = [layer["name"] for layer in layers if layer["name"] not in keep]
    return Surgery(net=net, from_blob=from_blob, bottom=bottom, new_layer=new_layer, kept=kept, cut=cut, softmax=softmax)


def new_layer_weights(surgery: Surgery, in_features: int, seed: int) -> list[np.ndarray]:
    """Initial [weights (num_output, in), bias] of the appended layer from its fillers."""
    ip = next(layer for layer in surgery.net.layer if layer.name == surgery.new_layer)
    p = ip.inner_product_param
    rng = np.random.default_rng(seed)
    return [fill(p.weight_filler, (p.num_output, in_features), rng), fill(p.bias_filler, (p.num_output,), rng)]


def new_layer_bias(surgery: Surgery) -> float:
    """The constant the appended layer's bias starts at (the training targets' mean for a regressor)."""
    ip = next(layer for layer in surgery.net.layer if layer.name == surgery.new_layer)
    return float(ip.inner_product_param.bias_filler.value)
