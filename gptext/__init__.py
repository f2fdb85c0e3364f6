"""gptext: a GPT runtime whose hot path runs on hand-written CUDA kernels.

    import gptext
    model = gptext.GPT.from_pretrained("path/to/gpt2")   # or GPT(GPTConfig.preset("gpt2-124m"))
    tok = gptext.get_tokenizer("gpt2")
    out = model.generate(torch.tensor([tok.encode("Hello")]), max_new_tokens=20)
    gptext.ops.softmax(x)                                # the ops, on kernels or the reference
    gptext.set_backend("auto" | "kernels" | "reference")
"""

from . import chat, ops, reference, train
from ._version import __version__
from .config import GPTConfig
from .model import GPT
from .tokenizer import get_tokenizer
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
    "GPT",
    "GPTConfig",
    "__version__",
    "backend",
    "build_info",
    "chat",
    "gemm_policy",
    "get_backend",
    "get_tokenizer",
    "kernels_available",
    "ops",
    "reference",
    "set_backend",
    "set_gemm_policy",
    "train",
]
