"""gptext: a GPT runtime whose hot path runs on hand-written CUDA kernels.

    import gptext
    gptext.ops.softmax(x)                      # the ops, on kernels or the reference
    gptext.set_backend("auto" | "kernels" | "reference")
    gptext.kernels_available("cuda")
"""

from . import ops, reference
from ._version import __version__
from .ops import (
    backend,
    build_info,
    gemm_policy,
    get_backend,
    kernels_available,
    set_backend,
    set_gemm_policy,
)

__all__ = [
    "__version__",
    "backend",
    "build_info",
    "gemm_policy",
    "get_backend",
    "kernels_available",
    "ops",
    "reference",
    "set_backend",
    "set_gemm_policy",
]
