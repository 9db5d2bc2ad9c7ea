"""The package's ``manifest.json``: written from the graph, read back by ``inspect`` alone.

Shapes are Caffe's, with ``None`` where the size is not fixed: the batch axis (and axes whose
size depends on the data, such as a number of detections). ``batch_axis`` is recorded where
it is not axis 0 (``None``: the value does not grow with the batch), ``symbolic_shape`` where
a ``None`` is not simply ``N``. ``symbolic_shape`` names those
axes as the ONNX model does: ``N`` for a batch of N images, ``N/8`` where the graph regroups
its batch into clips of 8.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .ir import Graph
from .parse import NetSpec

FORMAT = "graft-model/1"
#: bump when a converter computes something else for the same prototxt and weights (a fixed
#: numerics bug): it is part of every package's graph identity, so caches keyed by it recompute
NUMERICS = 1


def graph_sha256(deploy_prototxt: str) -> str:
    """The identity of a package's net apart from its weights: the canonical deploy.prototxt
    graft wrote (every layer, parameter and input shape) and the converters' numerics version.
    A cache or head keyed by it never serves features of another graph."""
    return hashlib.sha256(f"{FORMAT}\nnumerics {NUMERICS}\n{deploy_prototxt}".encode()).hexdigest()


def symbolic_shape(graph: Graph, value: str) -> list:
    from .emit_onnx import value_dims

    return value_dims(graph, value)


def plain_shape(graph: Graph, value: str) -> list:
    return [d if isinstance(d, int) else None for d in symbolic_shape(graph, value)]


def blob_entry(graph: Graph, value: str, producing: dict) -> dict:
    info = graph.values.get(value, {})
    entry = {"shape": plain_shape(graph, value), "layer": info.get("layer"), "kind": info.get("kind")}
    if graph.batch_axes.get(value) != 0:  # absent: axis 0, as in packages written before it was recorded
        entry["batch_axis"] = graph.batch_axes.get(value)
    sym = symbolic_shape(graph, value)
    if sym != ["N" if d is None else d for d in entry["shape"]]:  # absent: each None is N
        entry["symbolic_shape"] = sym
    if value in producing:
        entry["type"] = producing[value].type
    return entry


@dataclass
class Sources:
    """Where the converted files came from."""

    prototxt: str
    prototxt_text: str | None
    prototxt_sha: str | None
    caffemodel: str
    caffemodel_sha: str
    caffemodel_generation: str
    #: how the caffemodel stored its blobs (``CaffeModel.precision()``: precision, blob_precisions)
    caffemodel_precision: dict | None = None


def _prototxt_source(src: Sources, spec: NetSpec) -> dict:
    if src.prototxt_text is not None:
        return {"preset": src.prototxt, "sha256": hashlib.sha256(src.prototxt_text.encode()).hexdigest(),
                "generation": spec.generation}
    return {"path": src.prototxt, "sha256": src.prototxt_sha, "generation": spec.generation}


def build_manifest(name: str, spec: NetSpec, graph: Graph, src: Sources, preprocess: dict | None,
                   classes: list[str] | None, report: dict, weights_sha: str, graph_sha: str) -> dict[str, Any]:
    from . import __version__

    producing = {o: n for n in graph.nodes for o in n.outputs}
    main = graph.main_input
    layers = [{"name": n.name, "type": n.type, "bottoms": n.inputs, "tops": n.outputs,
               "params": int(sum(w.size for w in n.weights))} for n in graph.nodes]
    manifest = {
        "format": FORMAT,
        "graft_version": __version__,
        "name": name,
        "weights_sha256": weights_sha,
        "graph_sha256": graph_sha,
        "source": {"prototxt": _prototxt_source(src, spec),
                   "caffemodel": {"path": src.caffemodel, "sha256": src.caffemodel_sha,
                                  "generation": src.caffemodel_generation, **(src.caffemodel_precision or {})}},
        "input": {"name": main, "blob": graph.values[main]["blob"], "shape": plain_shape(graph, main)},
        "inputs": {n: {"blob": graph.values[n]["blob"], "shape": plain_shape(graph, n), "image": n == main}
                   for n in graph.inputs},
        "batch": {"declared": graph.batch, "multiple": graph.batch_multiple},
        "outputs": graph.outputs,
        "preprocess": preprocess,
        "blobs": {v: blob_entry(graph, v, producing) for v in graph.shapes},
        "layers": layers,
        "params": {"total": graph.param_count},
        "classes": classes,
        "notes": _unknown_field_notes(src) + spec.notes,
        "verification": report,
    }
    if spec.outputs is not None:
        manifest["left_out"] = [{"name": n, "type": t} for n, t in spec.left_out]
    return manifest


def _unknown_field_notes(src: Sources) -> list[str]:
    """The prototxt's fields graft does not know (warned about on stderr when it was read)."""
    from pathlib import Path

    from .parse import unknown_field_notes

    text = src.prototxt_text if src.prototxt_text is not None else Path(src.prototxt).read_text("utf-8", "replace")
    return unknown_field_notes(text)


def format_summary(m: dict) -> str:
    """What ``inspect`` prints: from the manifest alone."""
    lines = [f"model {m['name']}  ({m['format']}, graft {m.get('graft_version')})"]
    src = m["source"]
    p = src["prototxt"]
    lines.append(f"  prototxt   {p.get('path') or 'preset ' + p.get('preset', '')}  [{p['generation']}]  sha256 {p['sha256'][:16]}")
    c = src["caffemodel"]
    lines.append(f"  caffemodel {c['path']}  [{c['generation']}]  sha256 {c['sha256'][:16]}{_fmt_precision(c)}")
    lines.append(f"  weights    sha256 {m['weights_sha256'][:16]}  {m['params']['total']:,} parameters")
    inputs = m.get("inputs") or {m["input"]["name"]: {"shape": m["input"]["shape"], "image": True}}
    for i, (n, info) in enumerate(inputs.items()):
        role = "  (image)" if info.get("image") and len(inputs) > 1 else ""
        lines.append(f"  {'input' if i == 0 else '':<10} {n} {_fmt_shape(info['shape'])}{role}")
    batch = m.get("batch") or {}
    if batch:
        step = "any batch" if batch["multiple"] == 1 else f"batches in multiples of {batch['multiple']}"
        lines.append(f"  batch      declared {batch['declared']}; runs {step}")
    pre = m.get("preprocess")
    if pre:
        mean = pre.get("mean_file") or (", ".join(f"{v:g}" for v in pre["mean"]) if pre.get("mean") else "none")
        lines.append(f"  preprocess {pre['channel_order'].upper()}, resize {pre['resize'][0]}x{pre['resize'][1]}, "
                     f"crop {pre['crop'] or 'none'}, mean {mean}, scale {pre['scale']:g}")
    lines.append(f"  outputs    {', '.join(m['outputs'])}")
    if m.get("classes"):
        lines.append(f"  classes    {len(m['classes'])} ({', '.join(m['classes'][:3])}, ...)")
    if "left_out" in m:
        left = ", ".join(f"{x['name']} ({x['type']})" for x in m["left_out"]) or "none"
        lines.append(f"  left out   {len(m['left_out'])} layer(s) not needed for --outputs: {left}")
    lines.append("")
    lines.append(f"  {'layer':<34} {'type':<14} {'params':>12}  tops")
    for layer in m["layers"]:
        tops = ", ".join(f"{t} {_fmt_blob(m['blobs'][t])}" for t in layer["tops"])
        lines.append(f"  {layer['name']:<34} {layer['type']:<14} {layer['params']:>12,}  {tops}")
    lines.append("")
    lines.extend(_verification_lines(m.get("verification") or {}))
    lines += [f"  note: {note}" for note in m.get("notes") or []]
    return "\n".join(lines)


def _fmt_precision(c: dict) -> str:
    """How the caffemodel stored its weights ('' in manifests from before it was recorded)."""
    if "precision" not in c:
        return ""
    if c["precision"] == "float32":
        return "  float32"
    counts = " + ".join(f"{n} {k}" for k, n in (c.get("blob_precisions") or {}).items())
    return f"  {c['precision']} ({counts} blobs, widened to float32)"


def _verification_lines(v: dict) -> list[str]:
    if v.get("skipped"):
        return ["  verification: skipped (--no-verify)"]
    worst = max(v["blobs"].values(), key=lambda s: s["max_rel"]) if v.get("blobs") else {"max_abs": 0, "max_rel": 0}
    lines = [f"  verification: {'passed' if v['passed'] else 'FAILED'} ({len(v['blobs'])} blobs at batch {v.get('batch', 1)}, "
             f"{v['reference']}; worst max abs {worst['max_abs']:.3g}, rel {worst['max_rel']:.3g}; "
             f"tolerance atol {v['atol']:g} + rtol {v['rtol']:g}·max|ref|)"]
    for blob, a in (v.get("adjudicated") or {}).items():
        if "onnx_vs_float64" in a:
            local = (f"; its layer alone: onnxruntime {a['layer_onnx_vs_float64']:.3g}, torch {a['layer_torch_vs_float64']:.3g}"
                     if "layer_onnx_vs_float64" in a else "")
            lines.append(f"    {blob}: float32 runs differ beyond tolerance; vs float64: onnxruntime "
                         f"{a['onnx_vs_float64']:.3g}, torch {a['torch_vs_float64']:.3g} ({a['closer']} closer){local}; "
                         f"{'accepted' if a['accepted'] else 'refused'} ({a.get('judged_by', 'float64')})")
    return lines


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def _fmt_blob(info: dict) -> str:
    return "(" + ", ".join(str(d) for d in info["symbolic_shape"]) + ")" if "symbolic_shape" in info else _fmt_shape(info["shape"])

