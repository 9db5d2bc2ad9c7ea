"""Small helpers shared by the layer converters."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..errors import GraftError

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


class Lambda(nn.Module):
    """A parameter-free layer: a named function of its inputs."""

    def __init__(self, fn: Callable[..., torch.Tensor | tuple], description: str):
        super().__init__()
        self.fn = fn
        self.description = description

    def forward(self, *xs: torch.Tensor):
        return self.fn(*xs)

    def extra_repr(self) -> str:
        return self.description
