"""Caffe -> model package (ONNX + PyTorch + manifest), verified blob by blob.

Data flow: ``parse`` (prototxt, caffemodel) -> ``ir`` (named, shaped graph) -> ``emit_onnx`` /
``emit_torch`` (one converter per layer family in ``layers/``) -> ``verify`` -> ``package``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import GraftError
from .package import ModelPackage, convert_model, load_package, load_torch

__all__ = ["GraftError", "ModelPackage", "convert_model", "load_package", "load_torch", "__version__"]
