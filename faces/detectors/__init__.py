"""Face detectors by name: a registry of builders, as onnx2torch's converters or timm's models.

``load_detector("ultraface")`` / ``("mtcnn")`` find (or, given ``caffe``, convert) their packages
(:mod:`faces.detectors.packages`); a path to a package folder is UltraFace or MTCNN when its
manifest names it so, else any SSD-style detector (Caffe ``DetectionOutput``, ``[1, 1, N, 7]``).
A builder imports its module when called, so naming detectors costs nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from convert.errors import GraftError

from ..types import Detector
from .packages import Release, find_packages


@dataclass(frozen=True)
class DetectorOptions:
    """What the command line sets for every detector (each reads the ones it has)."""

    device: str = "cpu"
    backend: str = "auto"
    score_threshold: float | None = None  # None: the detector's own default
    max_faces: int | None = None
    class_id: int = 1  # SSD: the label that is a face
    min_size: int = 20  # MTCNN: smallest face, pixels


Builder = Callable[[list, DetectorOptions], Detector]


class Entry(NamedTuple):
    name: str
    releases: tuple[Release, ...]  # packages it needs, by name under the models root
    build: Builder  # (opened packages, options) -> detector


#: detector name -> how to find its packages and build it
DETECTORS: dict[str, Entry] = {}


def register_detector(name: str, releases: tuple[Release, ...]) -> Callable[[Builder], Builder]:
    """Decorator: ``build(packages, options)`` is the detector ``name``; a duplicate is an error."""

    def add(build: Builder) -> Builder:
        if name in DETECTORS:
            raise ValueError(f"detector {name!r} registered twice")
        DETECTORS[name] = Entry(name, releases, build)
        return build

    return add


def _module(name: str) -> Any:
    """``faces.detectors.<name>``, imported on first use; absent: a one-line error."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"{__name__}.{name}":
            raise GraftError(f"detector module faces/detectors/{name}.py is not installed") from None
        raise


@register_detector("ultraface", (Release("ultraface", "RFB-320", "ultraface"),))
def _ultraface(pkgs: list, opts: DetectorOptions) -> Detector:
    return _module("ultraface").UltraFace(pkgs[0], **_common(opts))


@register_detector("mtcnn", tuple(Release(f"mtcnn-det{i}", f"det{i}", "mtcnn") for i in (1, 2, 3)))
def _mtcnn(pkgs: list, opts: DetectorOptions) -> Detector:
    thresholds = (0.6, 0.7, 0.7 if opts.score_threshold is None else opts.score_threshold)
    det = _module("mtcnn").MTCNN(*pkgs, device=opts.device, min_size=opts.min_size, thresholds=thresholds)
    return det if opts.max_faces is None else MaxFaces(det, opts.max_faces)


def _ssd(pkg: Any, opts: DetectorOptions) -> Detector:
    return _module("ssd").SSD(pkg, class_id=opts.class_id, **_common(opts))


def _common(opts: DetectorOptions) -> dict:
    return {"device": opts.device, "backend": opts.backend, "score_threshold": opts.score_threshold,
            "max_faces": opts.max_faces}


class MaxFaces:
    """A detector's best ``n`` faces (for one whose constructor has no such setting)."""

    def __init__(self, inner: Detector, n: int) -> None:
        self.inner, self.n, self.name = inner, n, inner.name

    def detect(self, image: Any) -> list:
        return self.inner.detect(image)[: self.n]


def packages_of(spec: str, caffe: str | Path | None = None) -> tuple[str, list]:
    """(registry name or ``"ssd"``, opened packages) that ``--detector spec`` names."""
    from convert import load_package

    if spec in DETECTORS:
        return spec, find_packages(spec, DETECTORS[spec].releases, caffe)
    path = Path(spec)
    if not (path / "manifest.json").is_file():
        raise GraftError(f"--detector {spec}: not a known detector ({', '.join(sorted(DETECTORS))}) "
                         f"nor a package folder ({path}/manifest.json absent)")
    pkg = load_package(path)
    if pkg.name == "ultraface":
        return "ultraface", [pkg]
    if pkg.name.startswith("mtcnn-det"):  # its siblings are the rest of the cascade
        return "mtcnn", [load_package(path.parent / r.package) for r in DETECTORS["mtcnn"].releases]
    return "ssd", [pkg]


def load_detector(spec: str, *, caffe: str | Path | None = None, device: str = "cpu", backend: str = "auto",
                  score_threshold: float | None = None, max_faces: int | None = None, class_id: int = 1,
                  min_size: int = 20) -> Detector:
    """The detector ``spec`` names (``ultraface``, ``mtcnn`` or a package folder), ready to run."""
    opts = DetectorOptions(device=device, backend=backend, score_threshold=score_threshold, max_faces=max_faces,
                           class_id=class_id, min_size=min_size)
    return build_detector(*packages_of(spec, caffe), opts)


def build_detector(kind: str, pkgs: list, opts: DetectorOptions) -> Detector:
    """The detector of ``packages_of``'s answer."""
    if kind == "ssd":
        return _ssd(pkgs[0], opts)
    return DETECTORS[kind].build(pkgs, opts)


def package_identity(pkgs: list) -> list[dict]:
    """What the crops depend on in a detector's packages: name, weights and graph hashes."""
    return [{"name": p.name, "weights_sha256": p.weights_sha256, "graph_sha256": p.graph_sha256} for p in pkgs]


__all__ = ["DETECTORS", "DetectorOptions", "build_detector", "load_detector", "packages_of", "register_detector"]
