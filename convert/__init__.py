"""Caffe -> model package (ONNX + PyTorch + manifest), verified blob by blob.

Data flow: ``parse`` (prototxt, caffemodel) -> ``ir`` (named, shaped graph) -> ``emit_onnx`` /
``emit_torch`` (one converter per layer family in ``layers/``) -> ``verify`` -> ``package``.
``convert.errors`` and ``convert.cli_common``, which every subcommand's parser needs, import
nothing heavy: ``package`` (numpy, protobuf) loads on first use of its names.
"""

from __future__ import annotations

from typing import Any

from .errors import GraftError

__version__ = "0.1.0"

__all__ = ["GraftError", "ModelPackage", "convert_model", "load_package", "load_torch", "__version__"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import package

        return getattr(package, name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
