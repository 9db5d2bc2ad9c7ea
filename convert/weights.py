"""Caffemodel (binary NetParameter, V1 or V2) -> {layer name: [arrays]} without copying weights.

A VGG-16-class caffemodel is one ~580 MB protobuf message whose weights are packed
little-endian float32 runs. Parsing it with the protobuf runtime and converting each
repeated field element by element costs seconds and a second copy; instead this module walks
the protobuf wire format over a memory map and hands out ``np.frombuffer`` views of the
packed runs. Only the fields graft needs are decoded: layer name, type and blobs.

Blobs may also come as ``raw_data`` bytes tagged with a ``raw_data_type`` (NVIDIA Caffe's
fields, which OpenCV's ``shrinkCaffeModel`` writes with FLOAT16 half floats, as in OpenCV's own
res10 face detector). They are widened to float32, as OpenCV widens them; each blob remembers
the precision it was stored in (``LayerWeights.precisions``, ``CaffeModel.precision()``).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import GraftError

# NetParameter fields
_NET_LAYERS_V1 = 2
_NET_LAYER_V2 = 100
# LayerParameter (V2) / V1LayerParameter fields
_V2_NAME, _V2_TYPE, _V2_BLOBS = 1, 2, 7
_V1_NAME, _V1_TYPE, _V1_BLOBS = 4, 5, 6
# BlobProto fields
_B_NUM, _B_CHANNELS, _B_HEIGHT, _B_WIDTH, _B_DATA, _B_SHAPE, _B_DOUBLE = 1, 2, 3, 4, 5, 7, 8
_B_RAW_TYPE, _B_RAW = 10, 12
#: BlobProto.Type (raw_data_type) -> (name, little-endian dtype); INT and UINT hold no weights
_RAW_TYPES = {0: ("float64", "<f8"), 1: ("float32", "<f4"), 2: ("float16", "<f2")}
_RAW_TYPE_NAMES = {0: "DOUBLE", 1: "FLOAT", 2: "FLOAT16", 3: "INT", 4: "UINT"}


class _Truncated(Exception):
    pass


@dataclass
class LayerWeights:
    name: str
    type: str  # V2 type string or V1 enum number as text
    blobs: list[np.ndarray] = field(default_factory=list)
    #: the precision each blob was stored in: "float32", "float16" or "float64"
    precisions: list[str] = field(default_factory=list)


@dataclass
class CaffeModel:
    """Weights of a caffemodel by layer name; arrays are read-only views of the mapped file."""

    path: Path
    generation: str
    layers: dict[str, LayerWeights]
    _mmap: mmap.mmap | None = field(default=None, repr=False)

    def precision(self) -> dict:
        """How the blobs were stored: ``{"precision": "float32"|"float16"|"float64"|"mixed",
        "blob_precisions": {name: count}}`` (all blobs of the file, deploy layers or not)."""
        counts: dict[str, int] = {}
        for lw in self.layers.values():
            for p in lw.precisions:
                counts[p] = counts.get(p, 0) + 1
        kinds = sorted(counts)
        name = kinds[0] if len(kinds) == 1 else ("mixed" if kinds else "float32")
        return {"precision": name, "blob_precisions": dict(sorted(counts.items()))}

    def sha256(self) -> str:
        """Digest of the file, read from the map (pages already in memory after parsing)."""
        import hashlib

        if self._mmap is None:
            raise ValueError("caffemodel closed")
        return hashlib.sha256(self._mmap).hexdigest()

    def close(self) -> None:
        self.layers = {}
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # views still alive elsewhere; the map goes with them
                pass
            self._mmap = None


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _Truncated
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf: memoryview, pos: int, end: int):
    """Yield (field number, wire type, value-or-(start, end)) for one message's bytes."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        fnum, wtype = key >> 3, key & 7
        if fnum == 0:
            raise ValueError("field number 0")
        if wtype == 0:
            val, pos = _varint(buf, pos, end)
            yield fnum, wtype, val
        elif wtype == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Truncated
            yield fnum, wtype, (pos, pos + n)
            pos += n
        elif wtype == 5:
            if pos + 4 > end:
                raise _Truncated
            yield fnum, wtype, (pos, pos + 4)
            pos += 4
        elif wtype == 1:
            if pos + 8 > end:
                raise _Truncated
            yield fnum, wtype, (pos, pos + 8)
            pos += 8
        else:
            raise ValueError(f"unsupported wire type {wtype}")


def _blob(buf: memoryview, raw: bytes | mmap.mmap, start: int, end: int, where: str) -> tuple[np.ndarray, str]:
    """One BlobProto -> (array, the precision it was stored in)."""
    legacy = [0, 0, 0, 0]
    shape: list[int] | None = None
    data: np.ndarray | None = None
    precision = "float32"
    singles: list[int] = []  # offsets of unpacked float32 elements (old writers)
    raw_span: tuple[int, int] | None = None
    raw_type: int | None = None
    for fnum, wtype, val in _fields(buf, start, end):
        if fnum in (_B_NUM, _B_CHANNELS, _B_HEIGHT, _B_WIDTH) and wtype == 0:
            legacy[fnum - 1] = val
        elif fnum == _B_SHAPE and wtype == 2:
            shape = []
            for f2, w2, v2 in _fields(buf, val[0], val[1]):
                if f2 == 1 and w2 == 2:  # packed int64
                    p, e = v2
                    while p < e:
                        d, p = _varint(buf, p, e)
                        shape.append(d)
                elif f2 == 1 and w2 == 0:
                    shape.append(v2)
        elif fnum == _B_DATA and wtype == 2:
            a, b = val
            if (b - a) % 4:
                raise ValueError(f"{where}: float data of {b - a} bytes is not a whole number of floats")
            data = np.frombuffer(raw, dtype="<f4", count=(b - a) // 4, offset=a)
        elif fnum == _B_DATA and wtype == 5:
            singles.append(val[0])
        elif fnum == _B_DOUBLE and wtype == 2:
            a, b = val
            data = np.frombuffer(raw, dtype="<f8", count=(b - a) // 8, offset=a).astype(np.float32)
            precision = "float64"
        elif fnum == _B_RAW and wtype == 2:
            raw_span = val
        elif fnum == _B_RAW_TYPE and wtype == 0:
            raw_type = val
    if singles:
        data = np.array([np.frombuffer(raw, "<f4", 1, o)[0] for o in singles], dtype=np.float32)
    if raw_span is not None:
        if data is not None and data.size:
            raise ValueError(f"{where}: holds both float data and raw_data; which one is meant is unclear")
        data, precision = _raw_blob(raw, raw_span, raw_type, where)
    if shape is None:
        shape = legacy if any(legacy) else []
        # legacy 4-D blobs: zero dims mean "absent"
        shape = [d for d in shape] if shape else []
    count = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if data is None:
        data = np.zeros(0, dtype=np.float32)
    if shape and count != data.size:
        raise ValueError(f"{where}: declared shape {tuple(shape)} holds {count} values but the file has {data.size}")
    if not shape:
        shape = [data.size]
    return data.reshape(shape), precision


def _raw_blob(raw: bytes | mmap.mmap, span: tuple[int, int], raw_type: int | None, where: str) -> tuple[np.ndarray, str]:
    """``raw_data`` bytes read as ``raw_data_type`` and widened to float32 (a copy unless FLOAT)."""
    if raw_type is None:
        raise ValueError(f"{where}: raw_data without raw_data_type")
    if raw_type not in _RAW_TYPES:
        label = _RAW_TYPE_NAMES.get(raw_type, str(raw_type))
        raise ValueError(f"{where}: unsupported raw_data_type {label} (graft reads FLOAT16, FLOAT and DOUBLE raw_data)")
    name, dtype = _RAW_TYPES[raw_type]
    a, b = span
    size = np.dtype(dtype).itemsize
    if (b - a) % size:
        raise ValueError(f"{where}: {_RAW_TYPE_NAMES[raw_type]} raw_data of {b - a} bytes is not a whole number "
                         f"of {size}-byte values")
    values = np.frombuffer(raw, dtype=dtype, count=(b - a) // size, offset=a)
    return (values if raw_type == 1 else values.astype(np.float32)), name


def read_caffemodel(path: str | Path) -> CaffeModel:
    """Map a caffemodel and index its layers' blobs by layer name.

    Raises GraftError naming the file for a missing, empty, truncated or non-caffemodel file.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise GraftError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GraftError(f"{path}: is a directory, expected a .caffemodel file") from None
    with fh:
        size = path.stat().st_size
        if size == 0:
            raise GraftError(f"{path}: empty file, not a caffemodel")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    buf = memoryview(mm)
    layers: dict[str, LayerWeights] = {}
    generations: set[str] = set()
    try:
        for fnum, wtype, val in _fields(buf, 0, size):
            if wtype != 2 or fnum not in (_NET_LAYERS_V1, _NET_LAYER_V2):
                continue
            v1 = fnum == _NET_LAYERS_V1
            generations.add("V1" if v1 else "V2")
            name_f, type_f, blobs_f = (_V1_NAME, _V1_TYPE, _V1_BLOBS) if v1 else (_V2_NAME, _V2_TYPE, _V2_BLOBS)
            name, ltype, spans = "", "", []
            for f2, w2, v2 in _fields(buf, val[0], val[1]):
                if f2 == name_f and w2 == 2:
                    name = bytes(buf[v2[0]:v2[1]]).decode("utf-8", "replace")
                elif f2 == type_f:
                    ltype = str(v2) if w2 == 0 else bytes(buf[v2[0]:v2[1]]).decode("utf-8", "replace")
                elif f2 == blobs_f and w2 == 2:
                    spans.append(v2)
            read = [_blob(buf, mm, a, b, f"layer '{name}' blob {i}") for i, (a, b) in enumerate(spans)]
            layers[name] = LayerWeights(name=name, type=ltype, blobs=[r[0] for r in read], precisions=[r[1] for r in read])
    except _Truncated:
        raise GraftError(f"{path}: truncated caffemodel (a message runs past the end of the file)") from None
    except ValueError as err:
        raise GraftError(f"{path}: not a valid caffemodel ({err})") from None
    finally:
        buf.release()
    if not generations:
        raise GraftError(f"{path}: no layers found; not a caffemodel")
    generation = "+".join(sorted(generations))
    return CaffeModel(path=path, generation=generation, layers=layers, _mmap=mm)
