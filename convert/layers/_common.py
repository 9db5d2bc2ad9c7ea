"""Small helpers shared by the layer converters."""

from __future__ import annotations

import contextlib
import importlib
import types
import warnings
from collections.abc import Callable

import numpy as np

from ..errors import GraftError


class LazyModule(types.ModuleType):
    """A module imported on first attribute access.

    Why: ``convert`` needs the converters for shapes and ONNX long before it needs torch, and
    importing torch takes 2 s, a third of a VGG-Face convert. With the converters free of it,
    torch imports in a thread while the caffemodel is read, written and checked by onnxruntime.
    """

    def __init__(self, name: str):
        super().__init__(name)

    def __getattr__(self, attr: str):
        module = importlib.import_module(self.__name__)
        return getattr(module, attr)


torch = LazyModule("torch")
nn = LazyModule("torch.nn")
F = LazyModule("torch.nn.functional")

_BOUND: dict[type, type] = {}


class TorchModule:
    """Base class of the converters' torch modules: an ``nn.Module`` once instantiated.

    Defining ``class _Conv(nn.Module)`` would import torch with the converter module; a
    ``TorchModule`` subclass is bound to ``nn.Module`` on first instantiation instead (a
    subclass of both, built once), so ``isinstance(m, _Conv)`` and ``isinstance(m, nn.Module)``
    both hold and ``super().__init__()`` reaches ``nn.Module.__init__``.
    """

    def __new__(cls, *args, **kwargs):
        import torch.nn

        if issubclass(cls, torch.nn.Module):
            return super().__new__(cls)
        bound = _BOUND.get(cls)
        if bound is None:
            bound = _BOUND[cls] = type(cls.__name__, (cls, torch.nn.Module),
                                       {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        return bound(*args, **kwargs)

#: set by ``shared_weights()``: modules view the (read-only) weight arrays instead of copying
_SHARE = False


@contextlib.contextmanager
def shared_weights():
    """Build modules over the caller's arrays without copying (for a throw-away inference-only
    net, e.g. verification straight from the mapped caffemodel); never for training."""
    global _SHARE
    _SHARE = True
    try:
        yield
    finally:
        _SHARE = False


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """A float32 tensor: a private copy, or a view of ``arr`` inside ``shared_weights()``."""
    if _SHARE and arr.dtype == np.float32:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memory: never written here
            return torch.from_numpy(arr)
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))


def param(arr: np.ndarray) -> nn.Parameter:
    return nn.Parameter(to_tensor(arr))


def hw(repeated, h_field: int, w_field: int, has_h: bool, default: int | None, what: str, layer: str) -> tuple[int, int]:
    """Caffe's per-axis spatial values: ``*_h``/``*_w`` win; else one or two repeated values."""
    if has_h:
        return int(h_field), int(w_field)
    vals = [int(v) for v in repeated] if not isinstance(repeated, int) else [repeated]
    if not vals:
        if default is None:
            raise GraftError(f"layer '{layer}': {what} is not set")
        return default, default
    if len(vals) == 1:
        return vals[0], vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    raise GraftError(f"layer '{layer}': {what} has {len(vals)} values; only 2-D is supported")


def axis_index(axis: int, rank: int, layer: str) -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < rank:
        raise GraftError(f"layer '{layer}': axis {axis} out of range for a {rank}-D blob")
    return a


class Lambda(TorchModule):
    """A parameter-free layer: a named function of its inputs."""

    def __init__(self, fn: Callable[..., torch.Tensor | tuple], description: str):
        super().__init__()
        self.fn = fn
        self.description = description

    def forward(self, *xs: torch.Tensor):
        return self.fn(*xs)

    def extra_repr(self) -> str:
        return self.description
