"""Layer converters, one module per family; importing this package fills the registry."""

from . import activation, bounded, conv, dense, fork_bn, normalization, pooling, resize, shuffle, tensor  # noqa: F401
