"""Layer converters, one module per family; importing this package fills the registry."""

from . import activation, conv, dense, detection, normalization, pooling, tensor  # noqa: F401
