"""Finding a detector's converted packages, or converting them once from the released Caffe files.

A detector named ``ultraface`` or ``mtcnn`` reads graft packages under the models root
(``$GRAFT_ARTIFACTS/models``: ``ultraface``; ``mtcnn-det1``, ``mtcnn-det2``, ``mtcnn-det3``). When
one is absent and ``--caffe DIR`` names the folder of the released files (``RFB-320.prototxt`` +
``.caffemodel``; ``det1..det3``), it is converted there once, with the preset's preprocessing
(``convert.presets``), exactly as the ``graft convert`` command in the error message would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from convert.errors import GraftError
from convert.paths import models_root


class Release(NamedTuple):
    """One package a detector needs: its name under the models root and the released files."""

    package: str  # e.g. "mtcnn-det1"
    stem: str  # the released prototxt / caffemodel stem, e.g. "det1"
    preset: str  # convert.presets name holding the preprocessing


def convert_command(r: Release, caffe: str | Path = "DIR") -> str:
    """The ``graft convert`` line that makes ``r``'s package."""
    d = Path(caffe)
    return (f"graft convert --preset {r.preset} --prototxt {d / (r.stem + '.prototxt')} "
            f"--caffemodel {d / (r.stem + '.caffemodel')} --name {r.package}")


def convert_release(r: Release, caffe: Path, out: Path) -> Any:
    """Convert ``r`` from the Caffe files in ``caffe`` into ``out`` (verified, as ``graft convert``)."""
    from convert.ir import main_input
    from convert.package import convert_model, input_shapes, read_spec
    from convert.preprocess import build_preprocess
    from convert.presets import get_preset

    proto, weights = caffe / f"{r.stem}.prototxt", caffe / f"{r.stem}.caffemodel"
    missing = [str(p) for p in (proto, weights) if not p.is_file()]
    if missing:
        raise GraftError(f"--caffe {caffe}: no {' or '.join(missing)} (the released {r.package} files)")
    shapes = input_shapes(read_spec(proto), None)
    pre, _ = build_preprocess(shapes[main_input(shapes)], defaults=get_preset(r.preset).preprocess)
    return convert_model(proto, weights, out, r.package, preprocess=pre, log=lambda _m: None)


def find_packages(detector: str, releases: tuple[Release, ...], caffe: str | Path | None = None) -> list[Any]:
    """The opened packages of ``releases``, converted from ``caffe`` where absent; else a
    one-line error giving the exact commands."""
    from convert import load_package

    root = models_root()
    absent = [r for r in releases if not (root / r.package / "manifest.json").is_file()]
    if absent and caffe is None:
        how = "; ".join(convert_command(r) for r in absent)
        raise GraftError(f"--detector {detector}: no package {', '.join(r.package for r in absent)} under {root}; "
                         f"give --caffe DIR (the folder of the released Caffe files) or run: {how}")
    if absent:
        caffe = Path(caffe)  # type: ignore[arg-type]
        if not caffe.is_dir():
            raise GraftError(f"--caffe {caffe}: not a folder")
        for r in absent:
            convert_release(r, caffe, root / r.package)
    return [load_package(root / r.package) for r in releases]
