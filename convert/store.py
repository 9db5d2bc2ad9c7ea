"""weights.safetensors: written by streaming each array once, read by safetensors/numpy/torch.

The file doubles as the ONNX model's external data: ``write_safetensors`` returns each
tensor's byte span, which ``emit_onnx`` records as (location, offset, length).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

WEIGHTS_FILE = "weights.safetensors"


def write_safetensors(path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> tuple[dict[str, tuple[int, int]], str]:
    """Write float32 arrays in the safetensors layout.

    Returns ({name: (absolute offset, nbytes)}, sha256 of the file), hashing as it writes.

    The header is padded so that data starts 64-byte aligned (the format allows trailing
    spaces in the header), which lets onnxruntime map weights without copying.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    spans = {}
    for name, arr in arrays.items():
        n = int(arr.size) * 4
        header[name] = {"dtype": "F32", "shape": [int(d) for d in arr.shape], "data_offsets": [pos, pos + n]}
        spans[name] = (pos, n)
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    pad = (-(8 + len(raw))) % 64
    raw += b" " * pad
    base = 8 + len(raw)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            digest.update(chunk)
        for arr in arrays.values():
            view = memoryview(np.ascontiguousarray(arr, dtype="<f4")).cast("B")
            f.write(view)
            digest.update(view)
    return {k: (base + off, n) for k, (off, n) in spans.items()}, digest.hexdigest()


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors as numpy arrays grouped by nothing: ``{"conv1.0": array, ...}``."""
    from safetensors.numpy import load_file

    return load_file(str(path))


def group_by_layer(arrays: Mapping[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """``{"conv1.0": w, "conv1.1": b}`` -> ``{"conv1": [w, b]}`` (blob order kept)."""
    layers: dict[str, dict[int, np.ndarray]] = {}
    for key, arr in arrays.items():
        layer, _, idx = key.rpartition(".")
        layers.setdefault(layer, {})[int(idx)] = arr
    return {k: [v[i] for i in sorted(v)] for k, v in layers.items()}
