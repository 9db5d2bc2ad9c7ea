"""Layer converters, one module per family; importing this package fills the registry."""

from . import activation, conv, dense, embed, normalization, pooling, reduce, spp, tensor, tile  # noqa: F401
