"""gptext's ops: one Python function per op, each dispatching to the compiled kernels
(torch.ops.gptext, from gptext._C) or to the pure-PyTorch reference (gptext.reference).

Backends (``gptext.set_backend`` / ``with gptext.backend(...)``):
  auto       compiled kernels where they support the device and dtype, else the reference
             (with one warning per reason);
  kernels    compiled kernels, or a RuntimeError saying why they can't serve the call;
  reference  pure PyTorch.

Inputs are checked here, the same way for both backends, and bad ones raise ValueError /
TypeError / IndexError naming the argument. The compiled ops get autograd formulas (the
reference formulas for now) and fake implementations, so they train and work under
torch.compile; ``torch.library.opcheck`` passes on each.

Each public op first offers its call to the extension's ``_try_<op>`` entry point, which
serves a plain CPU tensor of a kernel dtype whose arguments pass the C++ checks and
declines (None) anything else; a declined call takes the checked path here (``_<op>``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings

import torch
import torch.nn.functional as F

from . import reference

try:
    from . import _C  # importing it registers torch.ops.gptext

    _EXTENSION_ERROR = None
except ImportError as error:  # not built: everything still runs on the reference
    _EXTENSION_ERROR = f"{type(error).__name__}: {error}"

__all__ = [
    "attention",
    "backend",
    "build_info",
    "cross_entropy",
    "expert_linear",
    "ffn",
    "gemm_policy",
    "get_backend",
    "implementation",
    "kernels_available",
    "layernorm",
    "layernorm_residual",
    "linear",
    "linear_backend",
    "linear_cross_entropy",
    "rmsnorm",
    "rmsnorm_residual",
    "rope",
    "set_backend",
    "set_gemm_policy",
    "softmax",
]

BACKENDS = ("auto", "kernels", "reference")
GEMM_POLICIES = ("auto", "wmma", "cublas")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = (None, "none", "gelu", "relu")

_backend = "auto"
_warned: set[str] = set()
# Set by gptext.profiling while it records (_set_observer): called as
# _observer(op, fn, args, kwargs) in place of an op's checked implementation (fn, the _<op>
# below), to time it. While it is set, the _try_<op> entry points decline every call, so
# each goes there.
_observer = None


def _observed(op: str):
    """Hands each call of an op's checked implementation to the active observer, if any."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if _observer is None:
                return fn(*args, **kwargs)
            return _observer(op, fn, args, kwargs)
        return call
    return wrap


# The ops' default overloads, looked up once (an attribute lookup on torch.ops per call
# costs more than a small kernel on the CPU): torch.compile traces these.
_OVERLOADS: dict = {}
# Outside torch.compile, the checked path calls each op through gptext._C._call_<op>, which
# goes through the same dispatcher (autograd, fake tensors, dispatch modes and the profiler
# all still apply) for about 3 us less per call than an OpOverload on a CPU, and below
# autograd when no gradient can flow: torch.library's autograd wrapper costs several us
# more, even under no_grad. See csrc/python_module.cpp.
_DIRECT: dict = {}


def _compiled(op: str, *args):
    """torch.ops.gptext.<op>(*args), by the shortest path that keeps its meaning."""
    if torch.compiler.is_compiling():
        fn = _OVERLOADS.get(op)
        if fn is None:
            fn = _OVERLOADS[op] = getattr(torch.ops.gptext, op).default
        return fn(*args)
    fn = _DIRECT.get(op)
    if fn is None:
        fn = _DIRECT[op] = getattr(_C, "_call_" + op)
    return fn(*args)


def _declined(*args):
    """A _try_<op> entry point's answer without the extension, and what torch.compile traces
    in its place: None, the call goes through the checked path (which torch.compile traces
    to the op's OpOverload)."""
    return None


if _EXTENSION_ERROR is None:
    (_try_softmax, _try_layernorm, _try_layernorm_residual, _try_rmsnorm, _try_rmsnorm_residual, _try_linear,
     _try_ffn, _try_attention, _try_rope) = (
        _C._try_softmax, _C._try_layernorm, _C._try_layernorm_residual, _C._try_rmsnorm, _C._try_rmsnorm_residual,
        _C._try_linear, _C._try_ffn, _C._try_attention, _C._try_rope)
    # A polyfill is looked up by the C function it stands for, so the ops below call the
    # entry points themselves (not the wrappers this returns), with no is_compiling test.
    for _entry in (_try_softmax, _try_layernorm, _try_layernorm_residual, _try_rmsnorm, _try_rmsnorm_residual,
                   _try_linear, _try_ffn, _try_attention, _try_rope):
        torch.compiler.substitute_in_graph(_entry, skip_signature_check=True)(_declined)
    del _entry
else:
    _try_softmax = _try_layernorm = _try_layernorm_residual = _try_rmsnorm = _try_rmsnorm_residual = _declined
    _try_linear = _try_ffn = _try_attention = _try_rope = _declined


def _sync_direct() -> None:
    """Tells the extension whether its _try_<op> entry points may serve calls: not on the
    reference backend, nor while a profiling observer records."""
    if _EXTENSION_ERROR is None:
        _C._set_direct(_backend != "reference" and _observer is None)


def _set_observer(observer):
    """Installs gptext.profiling's observer (or None); returns the previous one."""
    global _observer
    previous, _observer = _observer, observer
    _sync_direct()
    return previous


# ---- backend selection -------------------------------------------------------------------

def set_backend(name: str) -> None:
    """Selects where gptext's ops run: 'auto', 'kernels' or 'reference' (process-wide)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"gptext backend must be one of {BACKENDS}, got {name!r}")
    _backend = name
    _sync_direct()


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str):
    """``with gptext.backend("reference"): ...`` runs the block on that backend."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _extension_loaded() -> bool:
    return _EXTENSION_ERROR is None


@functools.lru_cache(maxsize=None)
def _build() -> dict:
    if not _extension_loaded():
        return {"cuda": False, "cuda_arch_list": "", "cuda_runtime": 0, "cpu_isa": None}
    return json.loads(torch.ops.gptext._build_info())


@functools.lru_cache(maxsize=None)
def _cuda_kernel_arch(index: int) -> int:
    """Compute capability of the kernel binary that runs on GPU `index` (0: none)."""
    return int(torch.ops.gptext._cuda_binary_arch(index))


@torch.compiler.assume_constant_result
def _device_gap(device: torch.device) -> str | None:
    """Why the compiled kernels can't run on `device`, or None if they can. A constant to
    torch.compile, which runs it while tracing instead of tracing the extension's queries."""
    if not _extension_loaded():
        return f"the compiled extension gptext._C is not available ({_EXTENSION_ERROR})"
    if device.type in ("cpu", "meta"):
        return None
    if device.type != "cuda":
        return f"gptext has no compiled kernels for {device.type} tensors"
    if not _build()["cuda"]:
        return "gptext._C was built without CUDA (see README: building with CUDA)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _cuda_kernel_arch(index) == 0:
        major, minor = torch.cuda.get_device_capability(index)
        return (f"the CUDA kernels were built for TORCH_CUDA_ARCH_LIST={_build()['cuda_arch_list']!r}, "
                f"which cannot run on {torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    return None


def kernels_available(device: str | torch.device = "cuda") -> bool:
    """True when gptext's compiled kernels can run on that device (type)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return False
    return _device_gap(device) is None


def _use_kernels(op: str, x: torch.Tensor) -> bool:
    """Whether this call runs on the compiled kernels (decided by the backend setting and by
    the first tensor's device and dtype)."""
    if _backend == "reference":
        return False
    if x.is_cpu and _EXTENSION_ERROR is None and x.dtype in KERNEL_DTYPES:
        return True  # the common case on a CPU, answered without building a torch.device
    gap = _device_gap(x.device)
    if gap is None and x.dtype not in KERNEL_DTYPES:
        gap = f"the kernels take float32, float16 or bfloat16, not {x.dtype}"
    return gap is None or _fall_back(op, gap)


def _fall_back(op: str, gap: str) -> bool:
    """The compiled kernels can't serve this call because of `gap`: an error on the
    'kernels' backend, else one warning per reason. Returns False (use the reference)."""
    if _backend == "kernels":
        raise RuntimeError(f"gptext.ops.{op}: backend 'kernels' was requested but {gap}")
    if gap not in _warned:
        _warned.add(gap)
        warnings.warn(f"gptext: using the PyTorch reference instead of the compiled kernels: {gap}",
                      RuntimeWarning, stacklevel=5)  # the caller of the public op
    return False


def build_info() -> dict:
    """What was built and what can run here: versions, CUDA arches, usable devices."""
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": _extension_loaded(),
        "extension_error": _EXTENSION_ERROR,
        **_build(),
        "gemm_policy": gemm_policy(),
        "devices": [{"device": "cpu", "kernels": kernels_available("cpu")}],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            info["devices"].append({
                "device": f"cuda:{index}",
                "name": torch.cuda.get_device_name(index),
                "capability": f"sm_{major}{minor}",
                "kernels": _device_gap(torch.device("cuda", index)) is None,
                "kernel_binary": f"sm_{_cuda_kernel_arch(index)}" if info["cuda"] else None,
            })
    return info


def set_gemm_policy(policy: str) -> None:
    """How `linear` picks its GEMM on CUDA: 'auto' (measure both, keep the faster per shape),
    'wmma' (gptext's Tensor Core kernel) or 'cublas'. Also settable with GPTEXT_GEMM."""
    if policy not in GEMM_POLICIES:
        raise ValueError(f"gptext GEMM policy must be one of {GEMM_POLICIES}, got {policy!r}")
    if _extension_loaded():
        torch.ops.gptext._set_gemm_policy(policy)


def gemm_policy() -> str:
    return torch.ops.gptext._gemm_policy() if _extension_loaded() else "auto"


def linear_backend(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which implementation `linear(x, weight, ...)` runs now: 'wmma', 'cublas' (CUDA; an
    'auto' shape not yet measured reports 'cublas'), 'cpu' or 'reference'."""
    if not _use_kernels("linear", x):
        return "reference"
    return torch.ops.gptext._linear_backend(x, weight)


def implementation(op: str, x: torch.Tensor, weight: torch.Tensor | None = None) -> str:
    """Which implementation a call of `op` on x runs: 'reference', or the compiled kernels'
    device type ('cpu', 'cuda'), or for the GEMM ops ('linear', 'ffn' with its first
    weight) the GEMM: 'wmma', 'cublas' or 'cpu'. Never warns."""
    if _backend == "reference" or _device_gap(x.device) is not None or x.dtype not in KERNEL_DTYPES or (
            op == "attention" and _attention_gap(x) is not None):
        return "reference"
    if weight is not None:
        return torch.ops.gptext._linear_backend(x, weight)
    return x.device.type


# ---- input checks shared by both backends --------------------------------------------------

def _check_tensor(op: str, name: str, t, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"gptext.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"gptext.ops.{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"gptext.ops.{op}: {name} has dtype {t.dtype} but x has {like.dtype}")
        if not (t.is_cpu and like.is_cpu) and t.device != like.device:
            raise ValueError(f"gptext.ops.{op}: {name} is on {t.device} but x is on {like.device}")


def _check_shape(op: str, name: str, t: torch.Tensor, shape) -> None:
    if t.shape != shape:
        raise ValueError(f"gptext.ops.{op}: {name} has shape {tuple(t.shape)}; expected {tuple(shape)}")


def _check_norm(op: str, x, weight, bias, eps) -> None:
    _check_tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"gptext.ops.{op}: x must have a non-empty last (normalised) dimension, got shape "
                         f"{tuple(x.shape)}")
    width = (x.shape[-1],)
    _check_tensor(op, "weight", weight, x)
    _check_shape(op, "weight", weight, width)
    if bias is not None:
        _check_tensor(op, "bias", bias, x)
        _check_shape(op, "bias", bias, width)
    if not (eps >= 0 and eps < _INF):
        raise ValueError(f"gptext.ops.{op}: eps must be a finite number >= 0, got {eps}")


def _check_norm_residual(op: str, x, residual, weight, bias, eps) -> None:
    _check_norm(op, x, weight, bias, eps)
    _check_tensor(op, "residual", residual, x)
    _check_shape(op, "residual", residual, x.shape)


_INF = float("inf")


def _check_linear(op: str, x, weight, bias, activation, residual) -> None:
    _check_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"gptext.ops.{op}: x must have at least one dimension")
    _check_tensor(op, "weight", weight, x)
    if weight.dim() != 2:
        raise ValueError(f"gptext.ops.{op}: weight must be 2-d [out_features, in_features], got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"gptext.ops.{op}: x has {x.shape[-1]} features in its last dimension but weight "
                         f"{tuple(weight.shape)} expects {weight.shape[1]}")
    if bias is not None:
        _check_tensor(op, "bias", bias, x)
        _check_shape(op, "bias", bias, (weight.shape[0],))
    if activation not in ACTIVATIONS:
        raise ValueError(f"gptext.ops.{op}: activation must be None, 'gelu' or 'relu', got {activation!r}")
    if residual is not None:
        _check_tensor(op, "residual", residual, x)
        _check_shape(op, "residual", residual, (*x.shape[:-1], weight.shape[0]))


def _check_ffn(x, w_fc, b_fc, w_proj, b_proj, residual) -> None:
    _check_linear("ffn", x, w_fc, b_fc, "gelu", None)
    _check_tensor("ffn", "w_proj", w_proj, x)
    width, hidden = x.shape[-1], w_fc.shape[0]
    _check_shape("ffn", "w_proj", w_proj, (width, hidden))
    if b_proj is not None:
        _check_tensor("ffn", "b_proj", b_proj, x)
        _check_shape("ffn", "b_proj", b_proj, (width,))
    if residual is not None:
        _check_tensor("ffn", "residual", residual, x)
        _check_shape("ffn", "residual", residual, x.shape)


def _check_attention(q, k, v, causal, window, sinks, scale, kv_starts, kv_lens) -> None:
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(op, name, t, None if name == "q" else q)
        if t.dim() != 4:
            raise ValueError(f"gptext.ops.attention: {name} must be 4-d (batch, heads, positions, head_dim), got "
                             f"shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"gptext.ops.attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"gptext.ops.attention: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch and "
                         f"head_dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"gptext.ops.attention: q's {q.shape[1]} heads must be a multiple of k's {k.shape[1]} "
                         f"(grouped-query attention)")
    if q.shape[3] == 0:
        raise ValueError("gptext.ops.attention: head_dim must be positive")
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"gptext.ops.attention: scale must be a positive finite number, got {scale}")
    if window < 0:
        raise ValueError(f"gptext.ops.attention: window must be a positive number of keys or None, got {window}")
    if window and not causal:
        raise ValueError("gptext.ops.attention: a window needs causal=True")
    if sinks is not None:
        _check_tensor(op, "sinks", sinks)
        if sinks.shape != (q.shape[1],) or sinks.device != q.device:
            raise ValueError(f"gptext.ops.attention: sinks must be a ({q.shape[1]},) tensor on {q.device}, got "
                             f"{tuple(sinks.shape)} on {sinks.device}")
    for name, t in (("kv_starts", kv_starts), ("kv_lens", kv_lens)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.is_floating_point() or t.shape != (q.shape[0],)
                              or t.device != q.device):
            raise ValueError(f"gptext.ops.attention: {name} must be an integer ({q.shape[0]},) tensor on {q.device}")


def _check_rope(x, cos, sin) -> None:
    _check_tensor("rope", "x", x)
    if x.dim() != 4:
        raise ValueError(f"gptext.ops.rope: x must be 4-d (batch, heads, positions, head_dim), got shape "
                         f"{tuple(x.shape)}")
    if x.shape[-1] % 2:
        raise ValueError(f"gptext.ops.rope: head_dim must be even (its two halves are rotated as pairs), got "
                         f"{x.shape[-1]}")
    want = (x.shape[0], x.shape[2], x.shape[3] // 2)
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"gptext.ops.rope: {name} must be a float32 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if not (t.is_cpu and x.is_cpu) and t.device != x.device:
            raise ValueError(f"gptext.ops.rope: {name} is on {t.device} but x is on {x.device}")
        _check_shape("rope", name, t, want)


def _check_expert_linear(x, weight, bias, experts, activation, limit) -> None:
    op = "expert_linear"
    _check_tensor(op, "x", x)
    _check_tensor(op, "weight", weight, x)
    if not isinstance(experts, torch.Tensor) or experts.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"gptext.ops.expert_linear: experts must be an int64 or int32 tensor, got "
                        f"{getattr(experts, 'dtype', type(experts).__name__)}")
    if not (experts.is_cpu and x.is_cpu) and experts.device != x.device:
        raise ValueError(f"gptext.ops.expert_linear: experts is on {experts.device} but x is on {x.device}")
    if experts.dim() != 2:
        raise ValueError(f"gptext.ops.expert_linear: experts must be 2-d (tokens, slots), got shape "
                         f"{tuple(experts.shape)}")
    if weight.dim() != 3 or weight.shape[0] == 0:
        raise ValueError(f"gptext.ops.expert_linear: weight must be 3-d (experts, out_features, in_features) with at "
                         f"least one expert, got shape {tuple(weight.shape)}")
    tokens, slots = experts.shape
    if x.shape[:-1] not in ((tokens,), (tokens, slots)):
        raise ValueError(f"gptext.ops.expert_linear: x has shape {tuple(x.shape)}; expected (tokens, in_features) or "
                         f"(tokens, slots, in_features) with (tokens, slots) = {tuple(experts.shape)} as experts has")
    if x.shape[-1] != weight.shape[2]:
        raise ValueError(f"gptext.ops.expert_linear: x has {x.shape[-1]} features in its last dimension but weight "
                         f"{tuple(weight.shape)} expects {weight.shape[2]}")
    if bias is not None:
        _check_tensor(op, "bias", bias, x)
        _check_shape(op, "bias", bias, weight.shape[:2])
    if activation not in (None, "none", "swiglu"):
        raise ValueError(f"gptext.ops.expert_linear: activation must be None or 'swiglu', got {activation!r}")
    if activation == "swiglu":
        if weight.shape[1] % 2:
            raise ValueError(f"gptext.ops.expert_linear: SwiGLU needs an even number of output features (gate and "
                             f"linear columns alternate), got {weight.shape[1]}")
        if not (limit > 0 and limit < _INF):
            raise ValueError(f"gptext.ops.expert_linear: limit must be a positive finite number, got {limit}")


# Head sizes the fused CUDA attention kernels are compiled for.
CUDA_ATTENTION_HEAD_DIMS = (64, 128)


def _attention_gap(q: torch.Tensor) -> str | None:
    """Why the fused CUDA attention can't take q (the CPU kernels take any shape)."""
    if q.device.type == "cuda" and (q.dtype not in (torch.float16, torch.bfloat16)
                                    or q.shape[-1] not in CUDA_ATTENTION_HEAD_DIMS):
        return (f"the fused CUDA attention takes bfloat16/float16 with head_dim in {CUDA_ATTENTION_HEAD_DIMS}, not "
                f"{q.dtype} with head_dim {q.shape[-1]}")
    return None


def _attention_kernels(q: torch.Tensor) -> bool:
    """Whether the compiled attention serves this call (else the reference does)."""
    gap = _attention_gap(q) if _backend != "reference" else None
    return _use_kernels("attention", q) if gap is None else _fall_back("attention", gap)


# ---- torch.autocast ------------------------------------------------------------------------
# Inside a torch.autocast region the ops cast their floating-point arguments as PyTorch's
# own ops of the same kind do: the products (linear, ffn, attention, expert_linear) run in
# the region's dtype, and the normalisations in the widest of their arguments' dtypes (so
# float32 weights keep the residual stream and the normed rows in float32). A float32
# residual added to a product is added after it, in float32, as `F.linear(...) + residual`
# would be. softmax and rope keep their input's dtype (their math is float32 already;
# rope's cos and sin are float32). The casts are differentiable: gradients reach float32
# weights in float32. Outside a region nothing changes; the CPU entry points decline calls
# inside one (csrc/python_module.cpp), which then come here.

def _autocast_dtype(x) -> torch.dtype | None:
    """The dtype of the torch.autocast region enabled for tensor x's device type, else None."""
    if not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled():
        return None
    if not isinstance(x, torch.Tensor) or x.device.type not in ("cpu", "cuda"):
        return None
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _autocast_off(x: torch.Tensor):
    """A region with autocast off on x's device type: an op runs there once it has cast its
    arguments, so that the reference computes as it does outside autocast."""
    return torch.autocast(x.device.type, enabled=False)


def _cast(dtype: torch.dtype, *tensors):
    """The floating-point tensors among `tensors` in `dtype` (others as they are)."""
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t
                 for t in tensors)


def _widest(*tensors) -> torch.dtype:
    """The widest floating-point dtype among `tensors` (None entries ignored)."""
    dtype = None
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


# ---- the ops ----------------------------------------------------------------------------------

def softmax(x: torch.Tensor, dim: int = -1, *, scale: float | None = None, causal: bool = False,
            window: int | None = None) -> torch.Tensor:
    """softmax(scale * x) along `dim`, computed in fp32.

    As attention scores, x is (..., q_len, k_len), dim is -1, and `causal` masks the keys
    after each query (queries aligned to the end of the keys, so q_len < k_len works for
    decoding); `window` keeps only the last `window` keys of each query. Masked positions,
    and whole rows with nothing visible, come out as 0.
    """
    y = _try_softmax(x, dim, 1.0 if scale is None else scale, causal, 0 if window is None else window)
    return _softmax(x, dim, scale=scale, causal=causal, window=window) if y is None else y


@_observed("softmax")
def _softmax(x, dim=-1, *, scale=None, causal=False, window=None):
    _check_tensor("softmax", "x", x)
    if x.dim() < 1:
        raise ValueError("gptext.ops.softmax: x must have at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise IndexError(f"gptext.ops.softmax: dim {dim} is out of range for a {x.dim()}-d tensor")
    scale = 1.0 if scale is None else float(scale)
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"gptext.ops.softmax: scale must be a positive finite number, got {scale}")
    window = 0 if window is None else int(window)
    if window < 0:
        raise ValueError(f"gptext.ops.softmax: window must be a positive number of keys or None, got {window}")
    if window and not causal:
        raise ValueError("gptext.ops.softmax: a window needs causal=True")
    if causal and (x.dim() < 2 or dim % x.dim() != x.dim() - 1):
        raise ValueError("gptext.ops.softmax: causal masking needs scores shaped (..., q_len, k_len) and dim=-1")
    if _use_kernels("softmax", x):
        return _compiled("softmax", x, dim, scale, bool(causal), window)
    return reference.softmax(x, dim, scale=scale, causal=causal, window=window)


CROSS_ENTROPY_REDUCTIONS = ("mean", "sum", "none")


def _check_targets(op: str, targets, name: str, t: torch.Tensor, last: str) -> None:
    """Clear errors for class targets that do not fit tensor `name` (t) without its last
    (`last`) dimension."""
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"gptext.ops.{op}: targets must be an int64 or int32 tensor, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != t.shape[:-1]:
        raise ValueError(f"gptext.ops.{op}: targets has shape {tuple(targets.shape)}; expected "
                         f"{tuple(t.shape[:-1])}, {name}'s without the {last} dimension")
    if targets.device != t.device:
        raise ValueError(f"gptext.ops.{op}: targets is on {targets.device} but {name} is on {t.device}")


def _check_target_range(op: str, flat: torch.Tensor, classes: int, ignore_index: int) -> None:
    """IndexError for a target outside [0, classes) that is not ignore_index, on the CPU (on
    a GPU the check would read the targets back to the host: the loss comes out NaN)."""
    if flat.is_cpu and flat.numel() and not torch.compiler.is_compiling():
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= classes))
        if bool(bad.any()):
            raise IndexError(f"gptext.ops.{op}: targets holds {int(flat[bad][0])}, outside [0, {classes}) "
                             f"(and not ignore_index {ignore_index})")




def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """The cross-entropy of logits (..., classes) against integer targets (...), as
    F.cross_entropy(logits.float(), targets) gives it, fused: each row's log-sum-exp in fp32
    from one read of the logits (in their own dtype: no float32 copy of a vocabulary-wide
    tensor), and the backward writes the logits' gradient, softmax minus the target's one-hot
    times the loss's gradient, in one more pass from the saved log-sum-exp, rounded once to
    the logits' dtype. reduction "mean" (over the targets that are not ignore_index, NaN when
    none is), "sum", or "none" (fp32, targets' shape, 0 at ignored targets). A target
    outside [0, classes) raises IndexError on the CPU and gives a NaN loss on CUDA, where
    checking would read the targets back to the host."""
    return _cross_entropy(logits, targets, ignore_index, reduction)


@_observed("cross_entropy")
def _cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    _check_tensor("cross_entropy", "logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"gptext.ops.cross_entropy: logits must have a non-empty last (class) dimension, got "
                         f"shape {tuple(logits.shape)}")
    _check_targets("cross_entropy", targets, "logits", logits, "class")
    if reduction not in CROSS_ENTROPY_REDUCTIONS:
        raise ValueError(f"gptext.ops.cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    classes = logits.shape[-1]
    rows, flat = logits.reshape(-1, classes), targets.reshape(-1).long()
    _check_target_range("cross_entropy", flat, classes, ignore_index)
    loss = _per_row_cross_entropy(rows, flat, ignore_index)[0]
    if reduction == "none":
        return loss.view(targets.shape)
    total = loss.sum()
    return total if reduction == "sum" else total / (flat != ignore_index).sum()


def _per_row_cross_entropy(logits, targets, ignore_index):
    """(loss, lse) of each row of checked 2-d logits against checked int64 targets."""
    if _use_kernels("cross_entropy", logits):
        return torch.ops.gptext.cross_entropy.default(logits, targets, int(ignore_index))
    return reference.cross_entropy(logits, targets, int(ignore_index))


def _per_row_cross_entropy_grad(grad, logits, targets, lse, ignore_index):
    """The logits' gradient of _per_row_cross_entropy's loss, rows scaled by grad (fp32)."""
    if _use_kernels("cross_entropy", logits):
        return torch.ops.gptext.cross_entropy_backward.default(grad, logits, targets, lse, int(ignore_index))
    return reference.cross_entropy_backward(grad, logits, targets, lse, int(ignore_index))


# linear_cross_entropy's default chunk: as many rows (a multiple of 64, at least 64) as make
# this many bytes of logits. Fewer rows cost GEMM efficiency and, in 16 bits, one more pass
# over the float32 weight gradient per chunk; more cost memory.
LINEAR_CROSS_ENTROPY_CHUNK_BYTES = 128 << 20


def _chunk_rows(classes: int, dtype: torch.dtype) -> int:
    rows = LINEAR_CROSS_ENTROPY_CHUNK_BYTES // (classes * torch.empty((), dtype=dtype).element_size())
    return max(64, rows // 64 * 64)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         chunk_rows: int | None = None) -> torch.Tensor:
    """cross_entropy(linear(x, weight, bias), targets, ignore_index, reduction) without the
    logits: a language model's head and loss fused, for training and scoring. x (..., K),
    weight (classes, K), targets x.shape[:-1]; reduction "mean" or "sum" (a scalar, fp32).

    The rows go `chunk_rows` at a time (default: 128 MiB of logits, at least 64 rows): each
    chunk's logits are made by `linear`, reduced by `cross_entropy`'s kernels and, when a
    gradient is wanted, turned straight into their gradient, whose products with the weight
    and with x (the GEMMs of linear's backward) run in the same pass; the backward then only
    scales those gradients. So neither the logits (rows x classes, 0.8 GB in fp32 for 4096
    rows of GPT-2's vocabulary) nor their gradient ever exist whole: the extra memory is
    x's gradient and the weight's. x's gradient is what cross_entropy(linear(..)) gives; the
    weight's is summed over the chunks in fp32, except where linear's backward runs in 16
    bits on a CPU (see there): then the GEMM adds each chunk's product into a gradient in
    the weight's dtype, a rounding a chunk."""
    return _linear_cross_entropy(x, weight, targets, bias, ignore_index, reduction, chunk_rows)


def _linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, reduction="mean", chunk_rows=None):
    # Not observed as one op: the profiler sees its linear calls, the kernels' bulk.
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, weight, bias = _cast(dtype, x, weight, bias)
        with _autocast_off(x):
            return _linear_cross_entropy(x, weight, targets, bias, ignore_index, reduction, chunk_rows)
    _check_linear("linear_cross_entropy", x, weight, bias, None, None)
    _check_targets("linear_cross_entropy", targets, "x", x, "feature")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"gptext.ops.linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r} "
                         f"(for each row's loss, use cross_entropy on linear's logits)")
    classes = weight.shape[0]
    if classes == 0:
        raise ValueError("gptext.ops.linear_cross_entropy: weight has no rows (no classes)")
    chunk_rows = _chunk_rows(classes, x.dtype) if chunk_rows is None else chunk_rows
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"gptext.ops.linear_cross_entropy: chunk_rows must be a positive int, got {chunk_rows!r}")
    rows, flat = x.reshape(-1, x.shape[-1]), targets.reshape(-1).long()
    _check_target_range("linear_cross_entropy", flat, classes, ignore_index)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    # Each row's share of the result: the mean's 1 / count (NaN, as cross_entropy's, when
    # every target is ignored), or 1.
    share = (1.0 / (flat != ignore_index).sum().float() if reduction == "mean"
             else torch.ones((), dtype=torch.float32, device=x.device))
    if wants_grad:
        return _LinearCrossEntropy.apply(rows, weight, bias, flat, int(ignore_index), chunk_rows, share)
    return _head_loss_chunks(rows, weight, bias, flat, ignore_index, chunk_rows, share)[0]


def _wide_weight_sum(x: torch.Tensor) -> bool:
    """Whether linear_cross_entropy sums a 16-bit weight gradient over its chunks in float32."""
    return x.device.type != "cpu"


def _head_loss_chunks(rows, weight, bias, targets, ignore_index, chunk_rows, share, need=(False, False, False)):
    """linear_cross_entropy's pass over its chunks of rows: (loss, dx, dweight, dbias), each
    row's loss weighted by `share` (a 0-d fp32 tensor), and the gradients `need` asks for
    (of rows, weight, bias; None for the others) made with that weight, as the logits'
    gradient would carry it."""
    need_dx, need_dweight, need_dbias = need
    in_storage = _backward_in_storage_dtype(rows)
    wide_weight = weight if in_storage or weight.dtype == torch.float32 or not need_dx else weight.float()
    dx = torch.empty_like(rows) if need_dx else None
    # The weight's gradient sums over the chunks in float32, except for 16-bit products on a
    # CPU: there it sums in place in their dtype (each chunk's product added by the GEMM,
    # rounded once), as an fp32 sum would read and write a float32 copy of the whole matrix
    # per chunk, which measured 1.4x slower at GPT-2's head. On a GPU that pass is a small
    # part of the GEMM's time.
    wide_sum = not in_storage or _wide_weight_sum(rows)
    dweight = (torch.zeros(weight.shape, dtype=torch.float32 if wide_sum else weight.dtype, device=weight.device)
               if need_dweight else None)
    dbias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_dbias else None
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], chunk_rows):
        part, picked = rows[start:start + chunk_rows], targets[start:start + chunk_rows]
        logits = linear(part, weight, bias)
        loss, lse = _per_row_cross_entropy(logits, picked, ignore_index)
        total += loss.sum()
        if not any(need):
            continue
        grad = _per_row_cross_entropy_grad(share.expand(part.shape[0]).contiguous(), logits, picked, lse,
                                           ignore_index)
        del logits
        if dbias is not None:
            dbias += grad.sum(0, dtype=torch.float32)
        if in_storage:  # the products in the 16-bit dtype, fp32 accumulation inside the GEMM
            if need_dx:
                dx[start:start + chunk_rows] = grad @ weight
            if need_dweight and wide_sum:
                dweight += grad.T @ part
            elif need_dweight:
                dweight.addmm_(grad.T, part)
        else:
            wide = grad.float()
            if need_dx:
                dx[start:start + chunk_rows] = wide @ wide_weight
            if need_dweight:
                dweight.addmm_(wide.T, part.float())
    return total * share, dx, dweight, dbias


class _LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy's loss with its gradients made in the forward pass
    (_head_loss_chunks); the backward scales them by the loss's gradient (1 for a plain
    backward())."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, ignore_index, chunk_rows, share):
        loss, dx, dweight, dbias = _head_loss_chunks(rows, weight, bias, targets, ignore_index, chunk_rows, share,
                                                     ctx.needs_input_grad[:3])
        ctx.save_for_backward(dx, dweight, dbias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_total):
        dx, dweight, dbias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_total.float()
        return (dx * scale.to(dx.dtype) if dx is not None else None,
                (dweight * scale).to(weight_dtype) if dweight is not None else None,
                (dbias * scale).to(bias_dtype) if dbias is not None else None,
                None, None, None, None)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension (fp32 statistics, biased variance)."""
    y = _try_layernorm(x, weight, bias, eps)
    return _layernorm(x, weight, bias, eps) if y is None else y[0]


@_observed("layernorm")
def _layernorm(x, weight, bias=None, eps=1e-5):
    if _autocast_dtype(x) is not None:
        x, weight, bias = _cast(_widest(x, weight, bias), x, weight, bias)
        with _autocast_off(x):
            return _layernorm.__wrapped__(x, weight, bias, eps)
    _check_norm("layernorm", x, weight, bias, eps)
    if _use_kernels("layernorm", x):
        return _compiled("layernorm", x, weight, bias, eps)[0]
    return reference.layernorm(x, weight, bias, eps)


def layernorm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(layernorm(x + residual), x + residual) in one pass: the pre-LN block's residual add
    fused with the next norm. Returns (normed, new residual stream)."""
    y = _try_layernorm_residual(x, residual, weight, bias, eps)
    return _layernorm_residual(x, residual, weight, bias, eps) if y is None else (y[0], y[1])


@_observed("layernorm_residual")
def _layernorm_residual(x, residual, weight, bias=None, eps=1e-5):
    if _autocast_dtype(x) is not None:
        x, residual, weight, bias = _cast(_widest(x, residual, weight, bias), x, residual, weight, bias)
        with _autocast_off(x):
            return _layernorm_residual.__wrapped__(x, residual, weight, bias, eps)
    _check_norm_residual("layernorm_residual", x, residual, weight, bias, eps)
    if _use_kernels("layernorm_residual", x):
        out, total, _, _ = _compiled("layernorm_residual", x, residual, weight, bias, eps)
        return out, total
    return reference.layernorm_residual(x, residual, weight, bias, eps)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * weight, fp32 statistics."""
    y = _try_rmsnorm(x, weight, eps)
    return _rmsnorm(x, weight, eps) if y is None else y[0]


@_observed("rmsnorm")
def _rmsnorm(x, weight, eps=1e-5):
    if _autocast_dtype(x) is not None:
        x, weight = _cast(_widest(x, weight), x, weight)
        with _autocast_off(x):
            return _rmsnorm.__wrapped__(x, weight, eps)
    _check_norm("rmsnorm", x, weight, None, eps)
    if _use_kernels("rmsnorm", x):
        return _compiled("rmsnorm", x, weight, eps)[0]
    return reference.rmsnorm(x, weight, eps)


def rmsnorm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual) in one pass, as layernorm_residual does for
    LayerNorm. Returns (normed, new residual stream)."""
    y = _try_rmsnorm_residual(x, residual, weight, eps)
    return _rmsnorm_residual(x, residual, weight, eps) if y is None else (y[0], y[1])


@_observed("rmsnorm_residual")
def _rmsnorm_residual(x, residual, weight, eps=1e-5):
    if _autocast_dtype(x) is not None:
        x, residual, weight = _cast(_widest(x, residual, weight), x, residual, weight)
        with _autocast_off(x):
            return _rmsnorm_residual.__wrapped__(x, residual, weight, eps)
    _check_norm_residual("rmsnorm_residual", x, residual, weight, None, eps)
    if _use_kernels("rmsnorm_residual", x):
        out, total, _ = _compiled("rmsnorm_residual", x, residual, weight, eps)
        return out, total
    return reference.rmsnorm_residual(x, residual, weight, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(x @ weight.T + bias) + residual with the epilogue fused into the GEMM.

    weight is [out_features, in_features] as PyTorch stores it; activation is None, 'gelu'
    (tanh form) or 'relu'. On CUDA, bf16/fp16 run on gptext's WMMA kernel or cuBLAS as the
    GEMM policy decides (``set_gemm_policy``); fp32 runs on cuBLAS.
    """
    y = _try_linear(x, weight, bias, activation or "none", residual)
    return _linear(x, weight, bias, activation, residual) if y is None else y


@_observed("linear")
def _linear(x, weight, bias=None, activation=None, residual=None):
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, weight, bias = _cast(dtype, x, weight, bias)
        with _autocast_off(x):
            if isinstance(residual, torch.Tensor) and residual.dtype != dtype:
                return _linear.__wrapped__(x, weight, bias, activation) + residual
            return _linear.__wrapped__(x, weight, bias, activation, residual)
    _check_linear("linear", x, weight, bias, activation, residual)
    if _use_kernels("linear", x):
        return _compiled("linear", x, weight, bias, activation or "none", residual)
    return reference.linear(x, weight, bias, activation, residual)


def ffn(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None, w_proj: torch.Tensor,
        b_proj: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """GPT-2's MLP, linear(gelu(linear(x, w_fc, b_fc)), w_proj, b_proj) (+ residual), as two
    GEMMs with fused epilogues (bias+GELU, then bias+residual)."""
    y = _try_ffn(x, w_fc, b_fc, w_proj, b_proj, residual)
    return _ffn(x, w_fc, b_fc, w_proj, b_proj, residual) if y is None else y


@_observed("ffn")
def _ffn(x, w_fc, b_fc, w_proj, b_proj, residual=None):
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, w_fc, b_fc, w_proj, b_proj = _cast(dtype, x, w_fc, b_fc, w_proj, b_proj)
        with _autocast_off(x):
            if isinstance(residual, torch.Tensor) and residual.dtype != dtype:
                return _ffn.__wrapped__(x, w_fc, b_fc, w_proj, b_proj) + residual
            return _ffn.__wrapped__(x, w_fc, b_fc, w_proj, b_proj, residual)
    _check_ffn(x, w_fc, b_fc, w_proj, b_proj, residual)
    if _use_kernels("ffn", x):
        return _compiled("ffn", x, w_fc, b_fc, w_proj, b_proj, residual)
    return reference.ffn(x, w_fc, b_fc, w_proj, b_proj, residual)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on x (B, H, T, D), gpt-oss's layout: each head's first and
    second halves are the pairs (x1, x2), rotated to (x1 cos - x2 sin, x2 cos + x1 sin) by
    the angles of each sequence's positions, cos and sin float32 (B, T, D / 2). fp32 math,
    one rounding; the result is contiguous (B, H, T, D) whatever x's strides (a head-split
    view of a projection's output is read in place)."""
    y = _try_rope(x, cos, sin)
    return _rope(x, cos, sin) if y is None else y


@_observed("rope")
def _rope(x, cos, sin):
    _check_rope(x, cos, sin)
    if _use_kernels("rope", x):
        return _compiled("rope", x, cos, sin)
    return reference.rope(x, cos, sin)


def expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, experts: torch.Tensor,
                  activation: str | None = None, limit: float = 7.0) -> torch.Tensor:
    """A mixture of experts' linear layer, route by route, with each expert's matrix read in
    place: out[t, s] = x[t] @ weight[e].T + bias[e] for e = experts[t, s] (x[t, s] instead
    of x[t] when x is 3-d), accumulated in fp32 and rounded to x's dtype.

    x (tokens, K) or (tokens, slots, K); weight (experts, N, K); bias (experts, N) or None;
    experts (tokens, slots) int64/int32, each in [0, experts). Returns (tokens, slots, N), or
    with activation 'swiglu' (tokens, slots, N / 2): gpt-oss's clamped SwiGLU of each
    column pair (2j the gate, 2j + 1 the linear half; see reference.swiglu), applied to the
    rounded product. The indices stay on the device: on CUDA the call reads no value back
    to the host, so a step that uses it can be captured in a CUDA graph; an index out of
    range raises IndexError on the CPU and gives NaN rows on CUDA. Few routes (a decode
    step) go one by one, each streaming its expert's matrix; many (a prefill: more than 64
    and than twice the experts) are grouped by expert, one GEMM an expert over its routes'
    rows (on CUDA sorted on the device, in bf16/fp16 on a grouped Tensor Core GEMM).
    """
    return _expert_linear(x, weight, bias, experts, activation, limit)


def _expert_linear_grads(grad, x, weight, bias, experts, activation, limit, needs):
    """expert_linear's gradients (x, weight, bias; None where `needs` says no) on the op
    itself: the SwiGLU's pre-activation recomputed by it, dx as expert_linear with each
    expert's matrix transposed (route by route or grouped, as the forward), the bias
    gradient summed on the device, and the weight gradient one product an expert over its
    routes' rows, which reads the group sizes back to the host once (a training step may)."""
    op = torch.ops.gptext.expert_linear
    tokens, slots = experts.shape
    num_experts, n, k = weight.shape
    if activation == "swiglu":
        h = op(x, weight, bias, experts, "none", limit).detach().requires_grad_(True)
        with torch.enable_grad():
            (dh,) = torch.autograd.grad(reference.swiglu(h, limit), h, grad)
    else:
        dh = grad
    dh = dh.contiguous()
    dx = dweight = dbias = None
    if needs[0]:
        rows = op(dh, weight.transpose(1, 2).contiguous(), None, experts, "none", limit)  # (tokens, slots, K)
        dx = rows if x.dim() == 3 else rows.sum(1, dtype=torch.float32).to(x.dtype)
    chosen, dh = experts.reshape(-1).long(), dh.reshape(-1, n)
    if needs[2] and bias is not None:
        dbias = torch.zeros((num_experts, n), dtype=torch.float32, device=dh.device)
        dbias = dbias.index_add_(0, chosen, dh.float()).to(bias.dtype)
    if needs[1]:
        inputs = (x if x.dim() == 3 else x[:, None].expand(tokens, slots, k)).reshape(-1, k)
        dweight = torch.zeros_like(weight)
        order, start = chosen.argsort(stable=True), 0
        for e, count in enumerate(torch.bincount(chosen, minlength=num_experts).tolist()):
            if count:
                picked = order[start:start + count]
                torch.mm(dh.index_select(0, picked).t(), inputs.index_select(0, picked), out=dweight[e])
                start += count
    return dx, dweight, dbias


@_observed("expert_linear")
def _expert_linear(x, weight, bias, experts, activation=None, limit=7.0):
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, weight, bias = _cast(dtype, x, weight, bias)
        with _autocast_off(x):
            return _expert_linear.__wrapped__(x, weight, bias, experts, activation, limit)
    limit = float(limit)
    _check_expert_linear(x, weight, bias, experts, activation, limit)
    if _use_kernels("expert_linear", x):
        return _compiled("expert_linear", x, weight, bias, experts, activation or "none", limit)
    # The reference reads the indices back to check them (an index out of range would be a
    # device-side assert on CUDA), except where nothing may be read back: a CUDA graph being
    # captured, or torch.compile tracing.
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if experts.numel() and not capturing and not torch.compiler.is_compiling():
        low, high = int(experts.min()), int(experts.max())
        if low < 0 or high >= weight.shape[0]:
            raise IndexError(f"gptext.ops.expert_linear: experts holds {low if low < 0 else high}, outside "
                             f"[0, {weight.shape[0]}) for a weight of {weight.shape[0]} experts")
    return reference.expert_linear(x, weight, bias, experts, activation, limit)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int | None = None,
              sinks: torch.Tensor | None = None, scale: float | None = None, *,
              kv_starts: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Fused attention: softmax(scale q k^T) v without materialising the scores.

    q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with H a multiple of Hkv (grouped-query
    attention: query head h reads key/value head h // (H / Hkv)). Returns (B, H, Tq, D).
    causal:    queries aligned to the end of the keys (query i at position Tk - Tq + i), so
               decode (Tq = 1) and chunked prefill are the same call.
    window:    each query sees at most the last `window` keys up to itself.
    sinks:     per-head logits (H,) that join each softmax denominator only (gpt-oss).
    scale:     default 1/sqrt(D).
    kv_starts, kv_lens: optional (B,) integer tensors: for batch b only keys
               [kv_starts[b], kv_lens[b]) exist (left padding; a preallocated cache filled
               to kv_lens[b]), and the queries align to kv_lens[b]. Values are clamped to
               [0, Tk].
    Strided inputs are read in place when head_dim is contiguous. A query with no visible
    key (and no sink) gets zeros.
    """
    # (A q that is not a tensor passes scale None, which the entry point declines.)
    y = _try_attention(q, k, v, causal, 0 if window is None else window, sinks,
                       q.shape[-1] ** -0.5 if scale is None and isinstance(q, torch.Tensor) else scale,
                       kv_starts, kv_lens)
    return _attention(q, k, v, causal, window, sinks, scale, kv_starts=kv_starts, kv_lens=kv_lens) if y is None else y[0]


@_observed("attention")
def _attention(q, k, v, causal=True, window=None, sinks=None, scale=None, *, kv_starts=None, kv_lens=None):
    dtype = _autocast_dtype(q)
    if dtype is not None:
        q, k, v = _cast(dtype, q, k, v)  # the sinks stay as they are (float32 side inputs)
        with _autocast_off(q):
            return _attention.__wrapped__(q, k, v, causal, window, sinks, scale, kv_starts=kv_starts, kv_lens=kv_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    window = 0 if window is None else int(window)
    _check_attention(q, k, v, causal, window, sinks, scale, kv_starts, kv_lens)
    if _attention_kernels(q):
        return _compiled("attention", q, k, v, bool(causal), window, sinks, scale, kv_starts, kv_lens)[0]
    return reference.attention(q, k, v, causal, window, sinks, scale, kv_starts=kv_starts, kv_lens=kv_lens)


# ---- autograd formulas and fake implementations of the compiled ops ------------------------

def _backward_in_storage_dtype(x: torch.Tensor) -> bool:
    """Whether linear's and ffn's backward products run in x's 16-bit dtype itself (fp32
    accumulation inside the GEMM, one rounding of each result) rather than in float32: on
    CUDA, and on a CPU whose bf16 (fp16) products gptext runs on the processor's own bf16
    (fp16) dot products (build_info's cpu_bf16_gemm, cpu_f16_gemm); elsewhere torch's 16-bit
    CPU matmul is far slower than converting to float32 first."""
    if x.dtype == torch.float32:
        return False
    if x.device.type != "cpu":
        return True
    key = {torch.bfloat16: ("cpu_bf16_gemm", "bf16"), torch.float16: ("cpu_f16_gemm", "fp16")}.get(x.dtype)
    return key is not None and _build().get(key[0]) == key[1]


def _linear_grads(grad, x, weight, bias, activation, pre=None):
    """Gradients of linear(x, weight, bias, activation) with respect to x, weight and bias.
    In float32, and for 16-bit inputs where _backward_in_storage_dtype says no, the
    reference's (every product in float32, each result rounded once). Otherwise the products
    run in the inputs' dtype, as eager PyTorch's backward does: the activation's slope at
    the pre-activation (`pre`, or recomputed) taken in float32, the bias gradient summed in
    float32 from the unrounded result, the two GEMMs on its rounding to the inputs' dtype."""
    if not _backward_in_storage_dtype(x):
        return reference.linear_backward(grad, x, weight, bias, activation)
    out_features, in_features = weight.shape
    if activation in ("gelu", "relu"):
        pre = F.linear(x, weight, bias) if pre is None else pre
        slope = reference.gelu_tanh_grad(pre.float()) if activation == "gelu" else (pre > 0).float()
        wide = grad.float() * slope
    else:
        wide = grad
    rows = wide.reshape(-1, out_features)
    dbias = rows.sum(0, dtype=torch.float32).to(bias.dtype) if bias is not None else None
    rows = rows.to(x.dtype)
    dx = (rows @ weight).view(*x.shape[:-1], in_features)
    dweight = rows.T @ x.reshape(-1, in_features)
    return dx, dweight, dbias


def _register_compiled_ops() -> None:
    lib = "gptext::"

    @torch.library.register_fake(lib + "softmax")
    def _softmax_fake(x, dim=-1, scale=1.0, causal=False, window=0):
        return x.new_empty(x.shape)

    def _softmax_setup(ctx, inputs, output):
        _, dim, scale, _, _ = inputs
        ctx.save_for_backward(output)
        ctx.dim, ctx.scale = dim, scale

    def _softmax_backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        return reference.softmax_backward(grad, probs, ctx.dim, ctx.scale), None, None, None, None

    torch.library.register_autograd(lib + "softmax", _softmax_backward, setup_context=_softmax_setup)

    def _stats_like(x):
        return x.new_empty(x.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake(lib + "layernorm")
    def _layernorm_fake(x, weight, bias, eps=1e-5):
        _check_norm("layernorm", x, weight, bias, eps)
        return x.new_empty(x.shape), _stats_like(x), _stats_like(x)

    def _layernorm_setup(ctx, inputs, output):
        x, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None

    def _layernorm_backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = reference.layernorm_backward(grad_out, x, weight, mean, rstd, ctx.has_bias)
        return dx, dweight, dbias, None

    torch.library.register_autograd(lib + "layernorm", _layernorm_backward, setup_context=_layernorm_setup)

    @torch.library.register_fake(lib + "layernorm_residual")
    def _layernorm_residual_fake(x, residual, weight, bias, eps=1e-5):
        _check_norm_residual("layernorm_residual", x, residual, weight, bias, eps)
        return x.new_empty(x.shape), x.new_empty(x.shape), _stats_like(x), _stats_like(x)

    def _layernorm_residual_setup(ctx, inputs, output):
        _, _, weight, bias, _ = inputs
        _, total, mean, rstd = output
        ctx.save_for_backward(total, weight, mean, rstd)
        ctx.has_bias = bias is not None

    def _layernorm_residual_backward(ctx, grad_out, grad_total, _grad_mean, _grad_rstd):
        total, weight, mean, rstd = ctx.saved_tensors
        dv, dweight, dbias = reference.layernorm_backward(grad_out, total, weight, mean, rstd, ctx.has_bias)
        if grad_total is not None:
            dv = dv + grad_total
        return dv, dv, dweight, dbias, None

    torch.library.register_autograd(lib + "layernorm_residual", _layernorm_residual_backward,
                                    setup_context=_layernorm_residual_setup)

    @torch.library.register_fake(lib + "rmsnorm")
    def _rmsnorm_fake(x, weight, eps=1e-5):
        _check_norm("rmsnorm", x, weight, None, eps)
        return x.new_empty(x.shape), _stats_like(x)

    def _rmsnorm_setup(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])

    def _rmsnorm_backward(ctx, grad_out, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = reference.rmsnorm_backward(grad_out, x, weight, rstd)
        return dx, dweight, None

    torch.library.register_autograd(lib + "rmsnorm", _rmsnorm_backward, setup_context=_rmsnorm_setup)

    @torch.library.register_fake(lib + "rmsnorm_residual")
    def _rmsnorm_residual_fake(x, residual, weight, eps=1e-5):
        _check_norm_residual("rmsnorm_residual", x, residual, weight, None, eps)
        return x.new_empty(x.shape), x.new_empty(x.shape), _stats_like(x)

    def _rmsnorm_residual_setup(ctx, inputs, output):
        _, _, weight, _ = inputs
        _, total, rstd = output
        ctx.save_for_backward(total, weight, rstd)

    def _rmsnorm_residual_backward(ctx, grad_out, grad_total, _grad_rstd):
        total, weight, rstd = ctx.saved_tensors
        dv, dweight = reference.rmsnorm_backward(grad_out, total, weight, rstd)
        if grad_total is not None:
            dv = dv + grad_total
        return dv, dv, dweight, None

    torch.library.register_autograd(lib + "rmsnorm_residual", _rmsnorm_residual_backward,
                                    setup_context=_rmsnorm_residual_setup)

    @torch.library.register_fake(lib + "linear")
    def _linear_fake(x, weight, bias=None, activation="none", residual=None):
        _check_linear("linear", x, weight, bias, activation, residual)
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    def _linear_setup(ctx, inputs, output):
        x, weight, bias, activation, residual = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.activation, ctx.has_residual = activation, residual is not None

    def _linear_backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = _linear_grads(grad, x, weight, bias, ctx.activation)
        return dx, dweight, dbias, None, grad if ctx.has_residual else None

    torch.library.register_autograd(lib + "linear", _linear_backward, setup_context=_linear_setup)

    @torch.library.register_fake(lib + "cross_entropy")
    def _cross_entropy_fake(logits, targets, ignore_index=-100):
        return logits.new_empty(logits.shape[:1], dtype=torch.float32), logits.new_empty(logits.shape[:1],
                                                                                          dtype=torch.float32)

    def _cross_entropy_setup(ctx, inputs, output):
        logits, targets, ignore_index = inputs
        _, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index

    def _cross_entropy_backward(ctx, grad_loss, _grad_lse):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.ops.gptext.cross_entropy_backward(grad_loss.float().contiguous(), logits, targets, lse,
                                                       ctx.ignore_index)
        return grad, None, None

    torch.library.register_autograd(lib + "cross_entropy", _cross_entropy_backward, setup_context=_cross_entropy_setup)

    @torch.library.register_fake(lib + "cross_entropy_backward")
    def _cross_entropy_backward_fake(grad, logits, targets, lse, ignore_index):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake(lib + "ffn")
    def _ffn_fake(x, w_fc, b_fc, w_proj, b_proj, residual=None):
        _check_ffn(x, w_fc, b_fc, w_proj, b_proj, residual)
        return x.new_empty((*x.shape[:-1], w_proj.shape[0]))

    def _ffn_setup(ctx, inputs, output):
        x, w_fc, b_fc, w_proj, b_proj, residual = inputs
        ctx.save_for_backward(x, w_fc, b_fc, w_proj, b_proj)
        ctx.has_residual = residual is not None

    def _ffn_backward(ctx, grad):
        x, w_fc, b_fc, w_proj, b_proj = ctx.saved_tensors
        if _backward_in_storage_dtype(x):
            pre = F.linear(x, w_fc, b_fc)  # recomputed (the forward keeps no hidden): the hidden and its slope
            hidden = reference.gelu_tanh(pre.float()).to(x.dtype)
        else:
            pre, hidden = None, reference.linear(x, w_fc, b_fc, "gelu")
        dhidden, dw_proj, db_proj = _linear_grads(grad, hidden, w_proj, b_proj, None)
        dx, dw_fc, db_fc = _linear_grads(dhidden, x, w_fc, b_fc, "gelu", pre)
        return dx, dw_fc, db_fc, dw_proj, db_proj, grad if ctx.has_residual else None

    torch.library.register_autograd(lib + "ffn", _ffn_backward, setup_context=_ffn_setup)

    @torch.library.register_fake(lib + "rope")
    def _rope_fake(x, cos, sin):
        _check_rope(x, cos, sin)
        return x.new_empty(x.shape)

    def _rope_setup(ctx, inputs, output):
        _, cos, sin = inputs
        ctx.save_for_backward(cos, sin)

    def _rope_backward(ctx, grad):
        # A rotation's transpose is the rotation by the opposite angles.
        cos, sin = ctx.saved_tensors
        return torch.ops.gptext.rope(grad, cos, -sin), None, None

    torch.library.register_autograd(lib + "rope", _rope_backward, setup_context=_rope_setup)

    @torch.library.register_fake(lib + "expert_linear")
    def _expert_linear_fake(x, weight, bias, experts, activation="none", limit=7.0):
        _check_expert_linear(x, weight, bias, experts, activation, limit)
        n = weight.shape[1] // 2 if activation == "swiglu" else weight.shape[1]
        return x.new_empty((*experts.shape, n))

    def _expert_linear_setup(ctx, inputs, output):
        x, weight, bias, experts, activation, limit = inputs
        ctx.save_for_backward(x, weight, bias, experts)
        ctx.activation, ctx.limit = activation, limit

    def _expert_linear_backward(ctx, grad):
        x, weight, bias, experts = ctx.saved_tensors
        if torch.compiler.is_compiling() or torch._guards.detect_fake_mode((x, weight, grad)) is not None:
            # Traced (torch.compile, opcheck): the reference forward, recomputed with autograd
            # on and differentiated, as it needs no group sizes on the host.
            inputs = [t.detach().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
            with torch.enable_grad():
                out = reference.expert_linear(*inputs, experts, ctx.activation, ctx.limit)
                wanted = [t for t in inputs if t is not None]
                grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
            dx, dweight, dbias = (next(grads) if t is not None else None for t in inputs)
        else:
            dx, dweight, dbias = _expert_linear_grads(grad, x, weight, bias, experts, ctx.activation, ctx.limit,
                                                      ctx.needs_input_grad[:3])
        return dx, dweight, dbias, None, None, None

    torch.library.register_autograd(lib + "expert_linear", _expert_linear_backward,
                                    setup_context=_expert_linear_setup)

    @torch.library.register_fake(lib + "attention")
    def _attention_fake(q, k, v, causal=True, window=0, sinks=None, scale=1.0, kv_starts=None, kv_lens=None):
        _check_attention(q, k, v, causal, window, sinks, scale, kv_starts, kv_lens)
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    def _attention_setup(ctx, inputs, output):
        q, k, v, causal, window, sinks, scale, kv_starts, kv_lens = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, sinks, kv_starts, kv_lens)
        ctx.causal, ctx.window, ctx.scale = causal, window, scale

    def _attention_backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, sinks, kv_starts, kv_lens = ctx.saved_tensors
        dq, dk, dv, dsinks = torch.ops.gptext.attention_backward(
            grad_out, q, k, v, out, lse, ctx.causal, ctx.window, sinks, ctx.scale, kv_starts, kv_lens)
        return dq, dk, dv, None, None, (dsinks.to(sinks.dtype) if sinks is not None else None), None, None, None

    torch.library.register_autograd(lib + "attention", _attention_backward, setup_context=_attention_setup)

    @torch.library.register_fake(lib + "attention_backward")
    def _attention_backward_fake(grad_out, q, k, v, out, lse, causal, window, sinks, scale, kv_starts, kv_lens):
        sinks_grad = q.new_empty((q.shape[1],) if sinks is not None else (0,), dtype=torch.float32)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), sinks_grad


if _extension_loaded():
    _register_compiled_ops()
    _sync_direct()
