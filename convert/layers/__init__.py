"""Layer converters, one module per family; importing this package fills the registry."""

from . import (  # noqa: F401
    activation,
    bounded,
    conv,
    dense,
    detection,
    embed,
    fork_bn,
    graph,
    normalization,
    pooling,
    reduce,
    resize,
    shuffle,
    spp,
    tensor,
    tile,
)
