"""Layer converters, one module per family; importing this package fills the registry."""

from . import activation, conv, dense, graph, normalization, pooling, tensor  # noqa: F401
