"""weights.safetensors: written by streaming each array once, read by safetensors/numpy/torch.

The file doubles as the ONNX model's external data: ``write_safetensors`` returns each
tensor's byte span, which ``emit_onnx`` records as (location, offset, length).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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


def _header(entries: Sequence[tuple[str, tuple[int, ...], int]], metadata: Mapping[str, str] | None) -> tuple[bytes, dict]:
    """The JSON header (unpadded) and {name: (data offset, nbytes)} for (name, shape, nbytes) entries."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    pos, spans = 0, {}
    for name, shape, n in entries:
        header[name] = {"dtype": "F32", "shape": [int(d) for d in shape], "data_offsets": [pos, pos + n]}
        spans[name] = (pos, n)
        pos += n
    return json.dumps(header, separators=(",", ":")).encode(), spans


class StreamingSafetensors:
    """A safetensors file whose data is written in a background thread *before* the final
    shapes are known; the header (with those shapes) goes in last, into space reserved for it.

    Why: writing VGG-Face's 580 MB takes 1.5 s on this project's machines, importing torch
    2 s, and the converters need torch before they can say which shapes the blobs take. The
    write releases the GIL, so the two overlap. Blob sizes never change between the
    caffemodel and the package (shapes only drop legacy 1s), so the layout is fixed up front;
    ``finish`` checks that, and the caller rewrites the file the plain way if it does not hold.
    """

    SLACK = 64  # header bytes reserved per tensor beyond its caffemodel shape (a shape is rarely longer)

    def __init__(self, path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
        self.path, self.metadata = Path(path), metadata
        self.arrays = dict(arrays)
        raw, _ = _header([(k, a.shape, int(a.size) * 4) for k, a in self.arrays.items()], metadata)
        reserve = len(raw) + self.SLACK * len(self.arrays) + 256
        self.header_len = reserve + (-(8 + reserve)) % 64  # data 64-byte aligned (see write_safetensors)
        self.base = 8 + self.header_len
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_data, name="graft-weights-writer", daemon=True)
        self._thread.start()

    def _write_data(self) -> None:
        try:
            with open(self.path, "wb") as f:
                f.seek(self.base)
                for arr in self.arrays.values():
                    f.write(memoryview(np.ascontiguousarray(arr, dtype="<f4")).cast("B"))
        except BaseException as err:  # re-raised by finish() in the caller's thread
            self._error = err

    def finish(self, arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, tuple[int, int]], Future]:
        """Write the header for ``arrays`` (the final names and shapes); returns ({name: (absolute
        offset, nbytes)}, a future of the file's sha256). When ``arrays`` does not match what was
        written (a layer left blobs of the caffemodel unused), the file is rewritten the plain way."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        same = list(arrays) == list(self.arrays) and all(
            int(a.size) == int(self.arrays[k].size) for k, a in arrays.items())
        raw, spans = _header([(k, a.shape, int(a.size) * 4) for k, a in arrays.items()], self.metadata)
        digest: Future = Future()
        if not same or len(raw) > self.header_len:
            spans, sha = write_safetensors(self.path, arrays, self.metadata)
            digest.set_result(sha)
            return spans, digest
        with open(self.path, "r+b") as f:
            f.write(struct.pack("<Q", self.header_len) + raw + b" " * (self.header_len - len(raw)))
        pool = ThreadPoolExecutor(1, thread_name_prefix="graft-weights-sha256")
        digest = pool.submit(sha256_file, self.path)
        pool.shutdown(wait=False)
        return {k: (self.base + off, n) for k, (off, n) in spans.items()}, digest

    def abandon(self) -> None:
        self._thread.join()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
