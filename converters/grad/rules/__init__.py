"""Gradient rules, one module per family of ops; importing this package registers them all."""

from uncnn_rt.converters.grad.rules import (  # noqa: F401
    conv,
    elementwise,
    linear,
    normalization,
    pooling,
    reductions,
    resize,
    shape_ops,
)
