"""Shared test set-up: devices, dtype-relative tolerances, and the CUDA marker.

CUDA tests are marked `cuda` and skipped only when this machine has no GPU. Where a GPU is
present, they run against the compiled kernels (backend "kernels"), so kernels that were
not built for that GPU fail loudly instead of silently testing the reference.
"""

import functools
import platform

import pytest
import torch

import gptext

HAS_CUDA = torch.cuda.is_available()

# Devices every op test runs on: the CPU always, the GPU when there is one.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# (rtol, atol) for comparing a kernel with the fp32 reference, by the tensor's dtype. The
# 16-bit tolerances are a few units in the last place of the storage type (bf16 keeps 8
# significant bits, fp16 11), since both sides round once (the CPU linear twice).
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


@functools.cache
def machine() -> str:
    """The processor, the CPU kernel build in use and the thread count, for failure messages:
    a kernel's result can depend on which build the processor selects."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    info = gptext.build_info()
    return f"{name}; gptext CPU build {info.get('cpu_isa')}; {torch.get_num_threads()} threads"


def assert_close(actual, expected, dtype=None, scale=1.0, msg=None):
    """Compares with the tolerance of `dtype` (default: actual's), widened by `scale`; `msg`
    names what is compared in the failure.
    The two may differ in width (an fp32 result against a float64 oracle): both are compared
    in the wider one."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    wide = torch.promote_types(actual.dtype, expected.dtype)
    torch.testing.assert_close(actual.to(wide), expected.to(wide), rtol=rtol * scale, atol=atol * scale,
                               msg=lambda m: f"{msg + ': ' if msg else ''}{m}\non {machine()}")


def oracle(fn, *args, **kwargs):
    """fn (a reference) with its fp32 tensor arguments in float64, so that an fp32 kernel is
    compared with the exact result rather than with another fp32 computation whose rounding
    depends on this machine's BLAS. 16-bit arguments are passed as they are: the reference
    computes them in fp32 and rounds its result to their format, as the kernels do (and
    fp32 side inputs, such as attention sinks, stay fp32 with them)."""
    first = next(a for a in args if isinstance(a, torch.Tensor))
    if first.dtype != torch.float32:
        return fn(*args, **kwargs)

    def wide(x):
        return x.double() if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x
    return fn(*map(wide, args), **{k: wide(v) for k, v in kwargs.items()})


def check_large_norm_residual(op, ref, x, r, params, offset):
    """A residual norm over a call moving more than 32 MiB (the CPU kernels write its
    outputs with streaming stores, which need aligned rows): x moved `offset` elements off
    alignment, a NaN and infinities planted in rows 5 and 9, which must stay in their rows;
    op(x, r, *params) against ref, the sums exactly."""
    rows, cols = x.shape
    x = torch.cat([torch.zeros(offset, dtype=x.dtype, device=x.device), x.flatten()])[offset:].view(rows, cols)
    x[5, 7], x[9, 100], r[9, 100] = float("nan"), float("inf"), float("-inf")
    normed, total = op(x, r, *params)
    ref_normed, ref_total = ref(x, r, *params)
    torch.testing.assert_close(total, ref_total, rtol=0, atol=0, equal_nan=True)
    finite = torch.ones(rows, dtype=torch.bool, device=x.device)
    finite[[5, 9]] = False
    assert normed[~finite].isnan().all()
    assert_close(normed[finite].float(), ref_normed[finite].float(), x.dtype, scale=2)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def pytest_report_header(config):
    info = gptext.build_info()
    return (f"gptext {gptext.__version__}: extension={'built' if info['extension'] else 'MISSING'}, "
            f"cuda kernels={info['cuda']} ({info['cuda_arch_list']}), cpu isa={info['cpu_isa']}, "
            f"GPU present={HAS_CUDA}")


@pytest.fixture(autouse=True)
def _default_backend():
    """Every test starts on the 'auto' backend and the 'auto' GEMM policy."""
    gptext.set_backend("auto")
    gptext.set_gemm_policy("auto")
    yield
    gptext.set_backend("auto")
    gptext.set_gemm_policy("auto")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state, so that a test draws the same
    inputs alone, in a subset or in the whole run, and a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture
def kernels():
    """Runs the test body on the compiled kernels (an error, not a fallback, if unavailable)."""
    with gptext.backend("kernels"):
        yield


def pytest_sessionstart(session):
    if not gptext.build_info()["extension"]:
        raise pytest.UsageError(
            "gptext._C is not built, so the kernel tests cannot run. Build it first: "
            "pip install --no-build-isolation -e .  (error: "
            f"{gptext.build_info()['extension_error']})")
