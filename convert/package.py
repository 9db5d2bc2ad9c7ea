"""Write and read model packages (docs/model-package.md).

``convert_model`` runs parse -> graph -> emit -> verify and writes the package into a
temporary folder beside the destination, renamed into place only when complete and verified:
a failed or interrupted conversion never leaves a half-written package.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GraftError
from .store import WEIGHTS_FILE, group_by_layer, write_safetensors

FORMAT = "graft-model/1"
DEFAULT_ROOT = Path("artifacts") / "models"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_model_dir(name_or_dir: str | Path) -> Path:
    """A package folder, or a name under ``artifacts/models/``."""
    p = Path(name_or_dir)
    if (p / "manifest.json").is_file():
        return p
    q = DEFAULT_ROOT / str(name_or_dir)
    if (q / "manifest.json").is_file():
        return q
    raise GraftError(f"no model package '{name_or_dir}' (looked for {p}/manifest.json and {q}/manifest.json); run 'convert' first")


class ModelPackage:
    """A converted model on disk; reading it never touches the caffemodel."""

    def __init__(self, path: str | Path):
        self.dir = resolve_model_dir(path)
        try:
            self.manifest: dict = json.loads((self.dir / "manifest.json").read_text())
        except json.JSONDecodeError as err:
            raise GraftError(f"{self.dir / 'manifest.json'}: not valid JSON ({err})") from None
        if self.manifest.get("format") != FORMAT:
            raise GraftError(f"{self.dir}: unknown package format {self.manifest.get('format')!r} (expected {FORMAT})")

    name = property(lambda self: self.manifest["name"])
    preprocess = property(lambda self: self.manifest.get("preprocess"))
    blobs = property(lambda self: self.manifest["blobs"])
    outputs = property(lambda self: list(self.manifest["outputs"]))
    input_name = property(lambda self: self.manifest["input"]["name"])
    input_shape = property(lambda self: list(self.manifest["input"]["shape"]))
    weights_sha256 = property(lambda self: self.manifest["weights_sha256"])
    onnx_path = property(lambda self: self.dir / "model.onnx")
    classes = property(lambda self: self.manifest.get("classes"))

    def mean_image(self) -> np.ndarray | None:
        pre = self.preprocess or {}
        return np.load(self.dir / pre["mean_file"]) if pre.get("mean_file") else None

    def check_blobs(self, blobs: Sequence[str]) -> list[str]:
        unknown = [b for b in blobs if b not in self.blobs]
        if unknown:
            raise GraftError(f"model '{self.name}' has no blob {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(self.blobs)}")
        return list(blobs)

    def onnx_path_for(self, blobs: Sequence[str]) -> Path:
        """An ONNX graph with the same weights whose outputs are ``blobs`` (written once, cached)."""
        import onnx
        from onnx import TensorProto, helper

        blobs = self.check_blobs(blobs)
        if list(blobs) == self.outputs:
            return self.onnx_path
        key = hashlib.sha256("\n".join(blobs).encode()).hexdigest()[:12]
        target = self.dir / f"model.view-{key}.onnx"
        if target.is_file():
            return target
        model = onnx.load(str(self.onnx_path), load_external_data=False)
        del model.graph.output[:]
        for b in blobs:
            shape = ["N" if (d is None) else d for d in self.blobs[b]["shape"]]
            model.graph.output.append(helper.make_tensor_value_info(b, TensorProto.FLOAT, shape))
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            onnx.save(model, str(tmp))
            os.replace(tmp, target)
        except OSError as err:
            raise GraftError(f"{self.dir}: cannot write {target.name} ({err}); is the package read-only?") from None
        return target

    def summary(self) -> str:
        return format_summary(self.manifest)


def load_package(name_or_dir: str | Path) -> ModelPackage:
    return ModelPackage(name_or_dir)


def load_torch(pkg: str | Path | ModelPackage):
    """The package's torch module (``CaffeNet``), built from deploy.prototxt + weights.safetensors."""
    from .emit_torch import emit_torch
    from .ir import build_graph
    from .parse import load_net_spec
    from .store import read_safetensors

    pkg = pkg if isinstance(pkg, ModelPackage) else ModelPackage(pkg)
    spec = load_net_spec(pkg.dir / "deploy.prototxt")
    weights = group_by_layer(read_safetensors(pkg.dir / WEIGHTS_FILE))
    shape = pkg.input_shape
    graph = build_graph(spec, weights, weights_source=WEIGHTS_FILE,
                        input_shapes={pkg.input_name: [1 if shape[0] is None else shape[0]] + shape[1:]})
    net = emit_torch(graph)
    net.package = pkg
    return net


def _source(path: Path, generation: str) -> dict:
    return {"path": str(path), "sha256": sha256_file(path), "generation": generation}


def convert_model(
    prototxt: str | Path,
    caffemodel: str | Path,
    out: str | Path | None = None,
    name: str | None = None,
    *,
    preprocess: dict | None = None,
    mean_image: np.ndarray | None = None,
    classes: list[str] | None = None,
    input_size: list[int] | None = None,
    prototxt_text: str | None = None,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    log=print,
) -> ModelPackage:
    """Convert a Caffe model into a verified package; returns the opened package.

    ``preprocess`` is the manifest's preprocessing dict (see ``convert.preprocess``); when
    None, Caffe's defaults for the input are recorded (BGR, no mean, squash to input size).
    ``prototxt_text`` replaces the prototxt file (presets).
    """
    from .emit_onnx import emit_onnx
    from .emit_torch import emit_torch
    from .ir import build_graph
    from .parse import net_spec, read_prototxt, to_v2_prototxt
    from .preprocess import build_preprocess, random_inputs
    from .verify import ATOL, RTOL, verify_package
    from .weights import read_caffemodel

    t0 = time.perf_counter()
    caffemodel = Path(caffemodel)
    if prototxt_text is not None:
        from google.protobuf import text_format

        from .proto import pb

        net = pb.NetParameter()
        text_format.Parse(prototxt_text, net)
        spec = net_spec(net, source=str(prototxt))
    else:
        spec = net_spec(read_prototxt(prototxt), source=str(prototxt))
    name = name or (Path(prototxt).stem if prototxt_text is None else str(prototxt))
    out = Path(out) if out else DEFAULT_ROOT / name
    input_name, declared = next(iter(spec.inputs.items()))
    if len(spec.inputs) > 1:
        raise GraftError(f"{prototxt}: nets with several inputs ({', '.join(spec.inputs)}) are not supported yet")
    shape = list(declared)
    if input_size:
        if len(shape) != 4:
            raise GraftError(f"--input-size needs a 4-D input; '{input_name}' is {shape}")
        shape = shape[:2] + list(input_size)
    model = read_caffemodel(caffemodel)
    # hashing the source (0.3 s for 580 MB) releases the GIL: overlap it with emit and verify
    hasher = ThreadPoolExecutor(1, thread_name_prefix="graft-sha256")
    source_sha = hasher.submit(model.sha256)
    try:
        graph = build_graph(spec, {n: lw.blobs for n, lw in model.layers.items()},
                            weights_source=str(caffemodel), input_shapes={input_name: shape})
        if preprocess is None and len(shape) == 4:
            preprocess, mean_image = build_preprocess(shape)
        elif preprocess is not None and preprocess.get("input_size") not in (None, shape[2:]):
            raise GraftError(f"preprocessing is for {preprocess['input_size']} inputs, the net takes {shape[2:]}")
        t_parse = time.perf_counter()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            arrays = {f"{n.name}.{i}": w for n in graph.nodes for i, w in enumerate(n.weights)}
            spans, weights_sha = write_safetensors(tmp / WEIGHTS_FILE, arrays, metadata={"format": FORMAT, "layout": "caffe"})
            refs = {k: (WEIGHTS_FILE, off, n) for k, (off, n) in spans.items()}
            onnx_model = emit_onnx(graph, refs)
            import onnx

            onnx.save(onnx_model, str(tmp / "model.onnx"))
            (tmp / "deploy.prototxt").write_text(to_v2_prototxt(spec))
            if mean_image is not None:
                np.save(tmp / "mean.npy", mean_image.astype(np.float32))
            if classes:
                (tmp / "classes.txt").write_text("\n".join(classes) + "\n")
            t_emit = time.perf_counter()
            report: dict[str, Any] = {"passed": None, "skipped": True}
            if verify:
                from .layers._common import shared_weights

                with shared_weights():  # a throw-away net over the mapped caffemodel: no copy
                    net = emit_torch(graph)
                batch = [1] + shape[1:]
                x = random_inputs(batch, preprocess or {}, mean_image)
                report = verify_package(graph, onnx_model, tmp, net, x, atol or ATOL, rtol or RTOL)
                del net
                if not report["passed"]:
                    worst = max(report["failed"], key=lambda v: report["blobs"][v]["max_rel"])
                    s = report["blobs"][worst]
                    raise GraftError(
                        f"verification failed: onnxruntime and torch disagree on {len(report['failed'])} blob(s), worst "
                        f"'{worst}' (max abs {s['max_abs']:.3g}, rel {s['max_rel']:.3g}); package not written")
            t_verify = time.perf_counter()
            manifest = _manifest(name, spec, graph, model, prototxt, caffemodel, prototxt_text, shape, preprocess,
                                 classes, report, weights_sha, source_sha.result())
            manifest["timings_s"] = {"parse": round(t_parse - t0, 3), "emit": round(t_emit - t_parse, 3),
                                     "verify": round(t_verify - t_emit, 3), "total": round(time.perf_counter() - t0, 3)}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        hasher.shutdown(wait=True)  # the hash reads the map: let it finish before closing
        model.close()
    for note in spec.notes:
        log(f"note: {note}")
    return ModelPackage(out)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished package into place; an old package is swapped out, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _manifest(name, spec, graph, model, prototxt, caffemodel, prototxt_text, shape, preprocess, classes, report, weights_sha,
              caffemodel_sha) -> dict:
    from . import __version__
    from .parse import unknown_field_notes

    # the prototxt's fields graft does not know (warned about on stderr when it was read)
    unknown = unknown_field_notes(prototxt_text if prototxt_text is not None else Path(prototxt).read_text("utf-8", "replace"))
    batch_dynamic = shape[0] == 1

    def dims(s):
        s = list(s)
        return [None] + s[1:] if batch_dynamic and s else s

    producing = {o: n for n in graph.nodes for o in n.outputs}
    blobs = {}
    for v, s in graph.shapes.items():
        info = graph.values.get(v, {})
        blobs[v] = {"shape": dims(s), "layer": info.get("layer"), "kind": info.get("kind")}
        if v in producing:
            blobs[v]["type"] = producing[v].type
    if prototxt_text is not None:
        psrc = {"preset": str(prototxt), "sha256": hashlib.sha256(prototxt_text.encode()).hexdigest(), "generation": spec.generation}
    else:
        psrc = _source(Path(prototxt), spec.generation)
    layers = [{"name": n.name, "type": n.type, "bottoms": n.inputs, "tops": n.outputs,
               "params": int(sum(w.size for w in n.weights))} for n in graph.nodes]
    return {
        "format": FORMAT,
        "graft_version": __version__,
        "name": name,
        "weights_sha256": weights_sha,
        "source": {"prototxt": psrc, "caffemodel": {"path": str(caffemodel), "sha256": caffemodel_sha,
                                                    "generation": model.generation, **model.precision()}},
        "input": {"name": next(iter(graph.inputs)), "shape": dims(shape)},
        "outputs": graph.outputs,
        "preprocess": preprocess,
        "blobs": blobs,
        "layers": layers,
        "params": {"total": graph.param_count},
        "classes": classes,
        "notes": unknown + spec.notes,
        "verification": report,
    }


def format_summary(m: dict) -> str:
    """What ``inspect`` prints: from the manifest alone."""
    lines = [f"model {m['name']}  ({m['format']}, graft {m.get('graft_version')})"]
    src = m["source"]
    p = src["prototxt"]
    lines.append(f"  prototxt   {p.get('path') or 'preset ' + p.get('preset', '')}  [{p['generation']}]  sha256 {p['sha256'][:16]}")
    c = src["caffemodel"]
    lines.append(f"  caffemodel {c['path']}  [{c['generation']}]  sha256 {c['sha256'][:16]}{_fmt_precision(c)}")
    lines.append(f"  weights    sha256 {m['weights_sha256'][:16]}  {m['params']['total']:,} parameters")
    lines.append(f"  input      {m['input']['name']} {_fmt_shape(m['input']['shape'])}")
    pre = m.get("preprocess")
    if pre:
        mean = pre.get("mean_file") or (", ".join(f"{v:g}" for v in pre["mean"]) if pre.get("mean") else "none")
        lines.append(f"  preprocess {pre['channel_order'].upper()}, resize {pre['resize'][0]}x{pre['resize'][1]}, "
                     f"crop {pre['crop'] or 'none'}, mean {mean}, scale {pre['scale']:g}")
    lines.append(f"  outputs    {', '.join(m['outputs'])}")
    if m.get("classes"):
        lines.append(f"  classes    {len(m['classes'])} ({', '.join(m['classes'][:3])}, ...)")
    lines.append("")
    lines.append(f"  {'layer':<34} {'type':<14} {'params':>12}  tops")
    for layer in m["layers"]:
        tops = ", ".join(f"{t} {_fmt_shape(m['blobs'][t]['shape'])}" for t in layer["tops"])
        lines.append(f"  {layer['name']:<34} {layer['type']:<14} {layer['params']:>12,}  {tops}")
    v = m.get("verification") or {}
    lines.append("")
    if v.get("skipped"):
        lines.append("  verification: skipped (--no-verify)")
    else:
        worst = max(v["blobs"].values(), key=lambda s: s["max_rel"]) if v.get("blobs") else {"max_abs": 0, "max_rel": 0}
        lines.append(f"  verification: {'passed' if v['passed'] else 'FAILED'} ({len(v['blobs'])} blobs, {v['reference']}; "
                     f"worst max abs {worst['max_abs']:.3g}, rel {worst['max_rel']:.3g}; tolerance atol {v['atol']:g} + rtol {v['rtol']:g}·max|ref|)")
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


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"
