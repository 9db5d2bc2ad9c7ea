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
from .manifest import FORMAT, Sources, build_manifest, format_summary, graph_sha256
from .paths import models_root
from .store import WEIGHTS_FILE, StreamingSafetensors, group_by_layer, sha256_file

__all__ = ["FORMAT", "ModelPackage", "convert_model", "load_package", "load_torch", "sha256_file"]


def resolve_model_dir(name_or_dir: str | Path) -> Path:
    """A package folder, or a name under ``$GRAFT_ARTIFACTS/models/`` (default ``artifacts/models/``)."""
    p = Path(name_or_dir)
    if (p / "manifest.json").is_file():
        return p
    q = models_root() / str(name_or_dir)
    if (q / "manifest.json").is_file():
        return q
    raise GraftError(f"no model package '{name_or_dir}' (looked for {p}/manifest.json and {q}/manifest.json); run 'convert' first")


class ModelPackage:
    """A converted model on disk; reading it never touches the caffemodel."""

    def __init__(self, path: str | Path):
        self.dir = resolve_model_dir(path)
        where = self.dir / "manifest.json"
        try:
            self.manifest: dict = json.loads(where.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise GraftError(f"{where}: not valid JSON ({err})") from None
        except OSError as err:
            raise GraftError(f"{where}: cannot read ({err.strerror or err})") from None
        if not isinstance(self.manifest, dict):
            raise GraftError(f"{where}: not a graft manifest (a JSON {type(self.manifest).__name__}, not an object)")
        if self.manifest.get("format") != FORMAT:
            raise GraftError(f"{self.dir}: unknown package format {self.manifest.get('format')!r} (expected {FORMAT})")

    name = property(lambda self: self.manifest["name"])
    #: every input: ONNX input name -> {"blob", "shape" (None: batch axis), "image"}
    inputs = property(lambda self: self.manifest.get("inputs") or {self.input_name: {"shape": self.input_shape, "image": True}})
    #: batches must be a multiple of this (1 unless the graph regroups its batch, TSM: 8)
    batch_multiple = property(lambda self: int((self.manifest.get("batch") or {}).get("multiple", 1)))
    preprocess = property(lambda self: self.manifest.get("preprocess"))
    blobs = property(lambda self: self.manifest["blobs"])
    outputs = property(lambda self: list(self.manifest["outputs"]))
    input_name = property(lambda self: self.manifest["input"]["name"])
    input_shape = property(lambda self: list(self.manifest["input"]["shape"]))
    weights_sha256 = property(lambda self: self.manifest["weights_sha256"])

    @property
    def graph_sha256(self) -> str:
        """The net's identity apart from its weights (recorded at convert; computed the same way
        from deploy.prototxt for packages written before it was recorded)."""
        recorded = self.manifest.get("graph_sha256")
        if recorded:
            return recorded
        try:
            return graph_sha256((self.dir / "deploy.prototxt").read_text())
        except OSError as err:
            raise GraftError(f"{self.dir}: cannot read deploy.prototxt ({err.strerror or err})") from None
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
            info = self.blobs[b]
            shape = info.get("symbolic_shape") or ["N" if (d is None) else d for d in info["shape"]]
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
    """The package's torch module (``CaffeNet``), built from deploy.prototxt + weights.safetensors.

    It runs any batch the package accepts (``pkg.batch_multiple``): the graph is rebuilt at
    the declared batch, whose batch axes the modules leave free.
    """
    from .emit_torch import emit_torch
    from .ir import build_graph
    from .parse import load_net_spec
    from .store import read_safetensors

    pkg = pkg if isinstance(pkg, ModelPackage) else ModelPackage(pkg)
    spec = load_net_spec(pkg.dir / "deploy.prototxt")
    weights = group_by_layer(read_safetensors(pkg.dir / WEIGHTS_FILE))
    # None dims keep deploy.prototxt's (the declared batch); older packages recorded only
    # the input size there, not in deploy.prototxt
    shapes = {info.get("blob", name): info["shape"] for name, info in pkg.inputs.items()}
    graph = build_graph(spec, weights, weights_source=WEIGHTS_FILE, input_shapes=shapes)
    net = emit_torch(graph)
    net.package = pkg
    return net


def read_spec(prototxt: str | Path, prototxt_text: str | None = None, outputs: Sequence[str] | None = None):
    """The deploy net to convert: from the file (or a preset's text), cut to ``outputs`` if given."""
    from .parse import net_spec, read_prototxt
    from .prune import prune

    if prototxt_text is not None:
        from google.protobuf import text_format

        from .proto import pb

        net = pb.NetParameter()
        text_format.Parse(prototxt_text, net)
        spec = net_spec(net, source=f"preset {prototxt}")
    else:
        spec = net_spec(read_prototxt(prototxt), source=str(prototxt))
    return prune(spec, outputs, source=str(prototxt)) if outputs else spec


def input_shapes(spec, input_size: Sequence[int] | None) -> dict[str, list[int]]:
    """Declared input shapes, the image input's H, W replaced by ``input_size``."""
    from .ir import main_input

    shapes = {n: list(s) for n, s in spec.inputs.items()}
    if input_size:
        main = main_input(shapes)
        if len(shapes[main]) != 4:
            raise GraftError(f"--input-size needs a 4-D input; '{main}' is {shapes[main]}")
        shapes[main] = shapes[main][:2] + [int(d) for d in input_size]
    return shapes


def _check_destination(out: Path) -> None:
    """Only a model package (or an empty folder) may be replaced."""
    if out.is_file() or out.is_symlink() and not out.is_dir():
        raise GraftError(f"{out}: exists and is a file, not a model package folder")
    if out.is_dir() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise GraftError(f"{out}: exists and is not a model package (no manifest.json); choose another --out")


def verification_feeds(graph, preprocess: dict | None, mean_image: np.ndarray | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Two images (two groups where the graph regroups its batch) per batch-carrying input: the
    image input as preprocessed 0..255 pixels, other inputs standard normal."""
    from .preprocess import random_inputs

    n = 2 * graph.batch_multiple
    rng = np.random.default_rng(seed + 1)
    feeds = {}
    for name, declared in graph.inputs.items():
        shape = list(declared)
        if graph.batch_axes.get(name) is not None:
            shape[0] = n * shape[0] // graph.batch
        if name == graph.main_input and len(shape) == 4:
            feeds[name] = random_inputs(shape, preprocess or {}, mean_image, seed)
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


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
    outputs: Sequence[str] | None = None,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    log=print,
) -> ModelPackage:
    """Convert a Caffe model into a verified package; returns the opened package.

    ``preprocess`` is the manifest's preprocessing dict (see ``convert.preprocess``) for the
    image input (the first 4-D input); when None, Caffe's defaults for it are recorded (BGR,
    no mean, squash to input size). ``prototxt_text`` replaces the prototxt file (presets).
    ``outputs`` keeps only the layers those blobs need (``convert --outputs``).
    """
    from .ir import build_graph, main_input
    from .preprocess import build_preprocess
    from .weights import read_caffemodel

    t0 = time.perf_counter()
    _preload_runtimes()
    caffemodel = Path(caffemodel)
    spec = read_spec(prototxt, prototxt_text, outputs)
    name = name or (Path(prototxt).stem if prototxt_text is None else str(prototxt))
    out = Path(out) if out else models_root() / name
    _check_destination(out)
    shapes = input_shapes(spec, input_size)
    shape = shapes[main_input(shapes)]
    if preprocess is not None and preprocess.get("input_size") not in (None, shape[2:]):
        raise GraftError(f"preprocessing is for {preprocess['input_size']} inputs, the net takes {shape[2:]}")
    model = read_caffemodel(caffemodel)
    # hashing the source (0.3 s for 580 MB) releases the GIL: overlap it with emit and verify
    hasher = ThreadPoolExecutor(1, thread_name_prefix="graft-sha256")
    source_sha = hasher.submit(model.sha256)
    writer = None
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise GraftError(f"{out}: cannot create the package folder ({err.strerror or err})") from None
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            # the deploy layers' blobs go to disk while torch is still importing (see StreamingSafetensors)
            writer = StreamingSafetensors(tmp / WEIGHTS_FILE, {f"{ls.name}.{i}": b for ls in spec.layers
                                                               for i, b in enumerate(_blobs(model, ls.name))},
                                          metadata=WEIGHTS_METADATA)
            graph = build_graph(spec, {n: lw.blobs for n, lw in model.layers.items()},
                                weights_source=str(caffemodel), input_shapes=shapes)
            if preprocess is None and len(shape) == 4:
                preprocess, mean_image = build_preprocess(shape)
            timings = {"parse": time.perf_counter() - t0}
            weights_sha, graph_sha, report = _write_files(tmp, spec, graph, shapes, mean_image, classes, preprocess,
                                                          timings, writer, verify=verify, atol=atol, rtol=rtol)
            writer = None
            src = Sources(prototxt=str(prototxt), prototxt_text=prototxt_text,
                          prototxt_sha=None if prototxt_text is not None else sha256_file(Path(prototxt)),
                          caffemodel=str(caffemodel), caffemodel_sha=source_sha.result(),
                          caffemodel_generation=model.generation, caffemodel_precision=model.precision())
            manifest = build_manifest(name, spec, graph, src, preprocess, classes, report, weights_sha, graph_sha)
            timings["total"] = time.perf_counter() - t0
            manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            _replace_dir(tmp, out)
        except OSError as err:
            _discard(writer, tmp)
            raise GraftError(f"{out}: cannot write the package ({err.strerror or err})") from None
        except BaseException:
            _discard(writer, tmp)
            raise
    finally:
        hasher.shutdown(wait=True)  # the hash reads the map: let it finish before closing
        model.close()
    for note in spec.notes:
        log(f"note: {note}")
    return ModelPackage(out)


WEIGHTS_METADATA = {"format": FORMAT, "layout": "caffe"}


def _blobs(model, layer: str) -> list:
    lw = model.layers.get(layer)
    return lw.blobs if lw is not None else []


def _discard(writer, tmp: Path) -> None:
    if writer is not None:
        writer.abandon()
    shutil.rmtree(tmp, ignore_errors=True)


def _preload_runtimes() -> None:
    """Import torch in a thread (2 s of a VGG-Face convert): meanwhile the caffemodel is read,
    its weights written, the ONNX emitted and run by onnxruntime, none of which needs torch
    (the converters import it lazily) and the slow parts of which release the GIL."""
    import threading

    def load() -> None:
        try:
            import torch  # noqa: F401
        except ImportError:  # reported where it is needed, with the usual message
            pass

    threading.Thread(target=load, name="graft-preload", daemon=True).start()


def _write_files(tmp: Path, spec, graph, shapes, mean_image, classes, preprocess, timings: dict, writer, *,
                 verify: bool, atol: float | None, rtol: float | None) -> tuple[str, str, dict]:
    """weights (already streaming to disk), model.onnx, deploy.prototxt, mean and classes into
    ``tmp``, then verification; returns the weights' and the graph's sha256 and the verification report."""
    import onnx

    from .emit_onnx import emit_onnx
    from .parse import to_v2_prototxt
    from .verify import ATOL, RTOL, verify_package


    t = time.perf_counter()
    arrays = {f"{n.name}.{i}": w for n in graph.nodes for i, w in enumerate(n.weights)}
    spans, weights_sha = writer.finish(arrays)
    refs = {k: (WEIGHTS_FILE, off, n) for k, (off, n) in spans.items()}
    onnx_model = emit_onnx(graph, refs)
    onnx.save(onnx_model, str(tmp / "model.onnx"))
    deploy = to_v2_prototxt(spec, shapes)
    (tmp / "deploy.prototxt").write_text(deploy)
    if mean_image is not None:
        np.save(tmp / "mean.npy", mean_image.astype(np.float32))
    if classes:
        (tmp / "classes.txt").write_text("\n".join(classes) + "\n")
    timings["emit"] = time.perf_counter() - t
    t = time.perf_counter()
    report: dict[str, Any] = {"passed": None, "skipped": True}
    if verify:
        from .layers._common import shared_weights

        def make_net():  # after onnxruntime has run: torch imports meanwhile
            from .emit_torch import emit_torch

            with shared_weights():  # a throw-away net over the mapped caffemodel: no copy
                return emit_torch(graph)

        feeds = verification_feeds(graph, preprocess, mean_image)
        report = verify_package(graph, onnx_model, tmp, make_net, feeds, ATOL if atol is None else atol,
                                RTOL if rtol is None else rtol)
    timings["verify"] = time.perf_counter() - t
    return weights_sha.result(), graph_sha256(deploy), report


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished package into place; an old package is swapped out, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
