"""gptext.ops.linear (GEMM + fused epilogue) and gptext.ops.ffn against the reference; on
CUDA under each GEMM policy (gptext's WMMA kernel, cuBLAS, and the measured choice)."""

import pytest
import torch
import torch.nn.functional as F

import gptext
from gptext import reference

from conftest import DEVICES, HAS_CUDA, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, N, K): one row (decode), tile tails in every dimension, K not a multiple of 8 (no
# cp.async), K = 0, and GPT-2-like shapes.
SHAPES = [(1, 1, 1), (1, 64, 768), (7, 13, 29), (33, 65, 17), (64, 64, 64), (130, 257, 96), (5, 3, 0),
          (200, 768, 768), (129, 2304, 768)]
POLICIES = ["auto", "wmma", "cublas"]


def _operands(m, n, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, s: (torch.randn(*shape, generator=g) * s).to(dtype).to(device)  # noqa: E731
    return make(m, k, s=1.0), make(n, k, s=max(k, 1) ** -0.5), make(n, s=0.5), make(m, n, s=1.0)


def _tolerance_scale(dtype, k):
    # Accumulation order differs between implementations; the error grows like sqrt(K).
    return 1.0 if dtype != torch.float32 else max(1.0, k ** 0.5)


def _check_every_epilogue(x, w, b, r, dtype, activations):
    """linear(x, w) with and without the bias b and the residual r, under each activation,
    against the reference."""
    for bias in (None, b):
        for residual in (None, r):
            for activation in activations:
                y = gptext.ops.linear(x, w, bias, activation, residual=residual)
                expected = reference.linear(x, w, bias, activation, residual).float()
                assert y.shape == expected.shape and y.dtype == dtype
                assert_close(y.float(), expected, dtype, scale=2 * _tolerance_scale(dtype, x.shape[-1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
def test_matches_reference(kernels, device, dtype, m, n, k, activation):
    x, w, b, r = _operands(m, n, k, dtype, device)
    policies = POLICIES if device == "cuda" and dtype != torch.float32 else ["auto"]
    expected = reference.linear(x, w, b, activation, r).float()
    for policy in policies:
        gptext.set_gemm_policy(policy)
        y = gptext.ops.linear(x, w, b, activation, residual=r)
        assert y.shape == (m, n) and y.dtype == dtype
        assert_close(y.float(), expected, dtype, scale=2 * _tolerance_scale(dtype, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13, 16])
def test_cpu_few_rows_every_epilogue(kernels, dtype, m):
    """Decode-sized products (the CPU's skinny GEMM: row tiles, 64-column epilogue blocks;
    in bf16 dot products or AMX tiles where the processor has them) with K off the vector
    width and off the 32-value tile (odd, too), N off the 4-row, 16- and 32-column and
    64-column steps, rows of x strided, and each combination of bias, activation and
    residual."""
    for n, k in [(131, 37), (64, 100), (7, 16), (50, 33)]:
        x, w, b, r = _operands(m, n, k, dtype, "cpu", seed=n)
        if n == 50:
            x = torch.cat([x, torch.ones_like(x)], dim=1)[:, :k]  # rows 2k apart
            assert m == 1 or not x.is_contiguous()
        _check_every_epilogue(x, w, b, r, dtype, (None, "gelu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [17, 31, 48, 100, 512, 513])
def test_cpu_prefill_rows_every_epilogue(kernels, dtype, m):
    """Prefill-sized products: in bf16 where the processor has AMX, gptext's AMX GEMM (rows
    packed in blocks of 16, pairs of blocks and 32-column blocks, up to 512 rows; 513 goes
    to oneDNN), with a last block of rows, a last column block and the last 32 k values each
    short in some case, rows of x strided, and each combination of bias, activation and
    residual."""
    for n, k in [(131, 37), (64, 96), (48, 33), (20, 0)]:
        x, w, b, r = _operands(m, n, k, dtype, "cpu", seed=m + n)
        if n == 48:
            x = torch.cat([x, torch.ones_like(x)], dim=1)[:, :k]  # rows 2k apart
            assert not x.is_contiguous()
        _check_every_epilogue(x, w, b, r, dtype, (None, "gelu", "relu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [9, 40])
def test_cpu_column_blocks_every_epilogue(kernels, dtype, m):
    """Products wider than the CPU's column block (1024 output columns a call of ATen's
    GEMM, then gptext's epilogue from the fp32 block into the output's columns; in fp32,
    and in 16 bits where the processor has no 16-bit arithmetic): two whole blocks and a
    short one, a single block and one column more, rows of x strided, K = 0, and each
    combination of bias, activation and residual."""
    for n, k in [(2 * 1024 + 37, 33), (1025, 16), (1100, 0)]:
        x, w, b, r = _operands(m, n, k, dtype, "cpu", seed=m + n)
        if n == 1025:
            x = torch.cat([x, torch.ones_like(x)], dim=1)[:, :k]  # rows 2k apart
            assert not x.is_contiguous()
        _check_every_epilogue(x, w, b, r, dtype, (None, "gelu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 40, 600])
def test_gelu_over_its_whole_range(kernels, device, dtype, m):
    """GELU of every magnitude through each path of linear (on a CPU: the skinny GEMM, the
    AMX GEMM or the epilogue after ATen's): the product is exact (x = 1, K = 1), so the
    output is GELU of the weight column, against PyTorch's, with its -0 far below zero and
    NaN at -inf and NaN."""
    values = torch.cat([torch.linspace(-30, 30, 601), torch.tensor([-1e4, -1e30, -3e38, 1e4, 3e38]),
                        torch.tensor([float("-inf"), float("inf"), float("nan")])])
    w = values.view(-1, 1).to(dtype).to(device)
    x = torch.ones(m, 1, dtype=dtype, device=device)
    y = gptext.ops.linear(x, w, None, "gelu")
    expected = F.gelu(w.float().view(1, -1), approximate="tanh").expand(m, -1)
    rtol, atol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-5)}[dtype]
    torch.testing.assert_close(y.float(), expected, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_optional_parts_and_batch_dims(kernels, device, dtype):
    x, w, b, _ = _operands(12, 40, 24, dtype, device)
    x3 = x.view(3, 4, 24)
    assert_close(gptext.ops.linear(x3, w).float(), reference.linear(x3, w).float(), dtype, scale=2)
    assert_close(gptext.ops.linear(x3, w, None, "gelu").float(), reference.linear(x3, w, None, "gelu").float(),
                 dtype, scale=2)
    r3 = torch.randn(3, 4, 40, device=device).to(dtype)
    assert_close(gptext.ops.linear(x3, w, residual=r3).float(), reference.linear(x3, w, residual=r3).float(), dtype,
                 scale=2)


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_matches_torch(kernels, device):
    x, w, b, _ = _operands(31, 45, 67, torch.float32, device)
    assert_close(gptext.ops.linear(x, w, b), F.linear(x, w, b), scale=10)
    assert_close(gptext.ops.linear(x, w, b, "gelu"), F.gelu(F.linear(x, w, b), approximate="tanh"), scale=10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_misaligned(kernels, device, dtype):
    x, w, b, _ = _operands(20, 24, 32, dtype, device)
    wt = w.t().contiguous().t()  # same values, transposed storage
    xs = torch.randn(20, 64, device=device).to(dtype)[:, ::2]
    assert not wt.is_contiguous() and not xs.is_contiguous()
    assert_close(gptext.ops.linear(xs, wt, b).float(), reference.linear(xs, wt, b).float(), dtype, scale=2)
    base = torch.randn(20 * 32 + 1, device=device).to(dtype)
    xm = base[1:].view(20, 32)  # contiguous but not 16-byte aligned
    for policy in (POLICIES if device == "cuda" else ["auto"]):
        gptext.set_gemm_policy(policy)
        assert_close(gptext.ops.linear(xm, w, b).float(), reference.linear(xm, w, b).float(), dtype, scale=2)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(kernels, device):
    w = torch.randn(8, 16, device=device)
    assert gptext.ops.linear(torch.empty(0, 16, device=device), w).shape == (0, 8)
    assert gptext.ops.linear(torch.empty(2, 0, 16, device=device), w).shape == (2, 0, 8)
    y = gptext.ops.linear(torch.empty(3, 0, device=device), torch.empty(4, 0, device=device),
                          torch.ones(4, device=device), "gelu")
    assert_close(y, reference.gelu_tanh(torch.ones(3, 4, device=device)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
def test_gradients(kernels, device, dtype, activation):
    x, w, b, r = _operands(6, 10, 12, dtype, device)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    g = torch.randn(6, 10, device=device).to(dtype)
    gptext.ops.linear(*leaves[:3], activation, residual=leaves[3]).backward(g)
    reference.linear(*ref_leaves[:3], activation, residual=ref_leaves[3]).backward(g)
    for got, want in zip(leaves, ref_leaves):
        assert_close(got.grad.float(), want.grad.float(), dtype, scale=4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,width", [(1, 8), (9, 24), (64, 96)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_ffn(kernels, device, dtype, m, width, with_residual):
    g = torch.Generator().manual_seed(3)
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    x = make(m, width)
    w_fc, b_fc = make(4 * width, width, scale=width ** -0.5), make(4 * width, scale=0.1)
    w_proj, b_proj = make(width, 4 * width, scale=(4 * width) ** -0.5), make(width, scale=0.1)
    r = make(m, width) if with_residual else None
    y = gptext.ops.ffn(x, w_fc, b_fc, w_proj, b_proj, residual=r)
    assert_close(y.float(), reference.ffn(x, w_fc, b_fc, w_proj, b_proj, r).float(), dtype,
                 scale=2 * _tolerance_scale(dtype, 4 * width))


@pytest.mark.parametrize("device", DEVICES)
def test_ffn_gradients(kernels, device):
    x = torch.randn(5, 16, device=device)
    params = [torch.randn(64, 16, device=device) * 0.25, torch.randn(64, device=device) * 0.1,
              torch.randn(16, 64, device=device) * 0.125, torch.randn(16, device=device) * 0.1,
              torch.randn(5, 16, device=device)]
    leaves = [t.clone().requires_grad_() for t in [x] + params]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    g = torch.randn(5, 16, device=device)
    gptext.ops.ffn(*leaves[:5], residual=leaves[5]).backward(g)
    reference.ffn(*ref_leaves[:5], residual=ref_leaves[5]).backward(g)
    for got, want in zip(leaves, ref_leaves):
        assert_close(got.grad, want.grad, scale=20)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_storage_dtype", [True, False])
def test_16_bit_gradients_are_as_accurate_as_eager_pytorchs(kernels, device, dtype, in_storage_dtype, monkeypatch):
    # Both ways of taking linear's and ffn's backward in 16 bits (products in the dtype itself,
    # or in float32) against float64, each no further from it than eager autograd in that dtype.
    monkeypatch.setattr(gptext.ops, "_backward_in_storage_dtype", lambda x: in_storage_dtype)
    gen = torch.Generator().manual_seed(7)
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(dtype).to(device)  # noqa: E731
    x, w_fc, b_fc = make(33, 48), make(192, 48, scale=48 ** -0.5), make(192, scale=0.1)
    w_proj, b_proj = make(48, 192, scale=192 ** -0.5), make(48, scale=0.1)
    g = {48: make(33, 48), 192: make(33, 192)}  # the output gradient, by output width

    def grads(fn, cast):
        leaves = [t.detach().clone().to(cast).requires_grad_() for t in (x, w_fc, b_fc, w_proj, b_proj)]
        out = fn(*leaves)
        out.backward(g[out.shape[-1]].to(cast))
        return [t.grad.double() if t.grad is not None else torch.zeros(t.shape, dtype=torch.float64)
                for t in leaves]  # the linear case leaves the projection unused

    def eager_mlp(x, w_fc, b_fc, w_proj, b_proj):
        return F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate="tanh"), w_proj, b_proj)

    def eager_linear(x, w_fc, b_fc, *_):
        return F.gelu(F.linear(x, w_fc, b_fc), approximate="tanh")

    cases = [(lambda *t: gptext.ops.ffn(*t), eager_mlp),
             (lambda x, w, b, *_: gptext.ops.linear(x, w, b, "gelu"), eager_linear)]
    for ours, eager in cases:
        exact = grads(eager, torch.float64)
        for got, base, want in zip(grads(ours, dtype), grads(eager, dtype), exact):
            if not want.abs().sum():  # the unused projection of the linear case
                continue
            err = lambda a: float((a - want).norm() / want.norm())  # noqa: E731
            assert err(got) <= 1.1 * err(base), (err(got), err(base))


@pytest.mark.parametrize("bad, error, match", [
    (dict(x=torch.ones(2, 4, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(weight=torch.ones(3, 5)), ValueError, "features"),
    (dict(weight=torch.ones(12)), ValueError, "2-d"),
    (dict(bias=torch.ones(4)), ValueError, "bias has shape"),
    (dict(activation="swish"), ValueError, "activation"),
    (dict(residual=torch.ones(2, 4)), ValueError, "residual has shape"),
    (dict(weight=torch.ones(3, 4, dtype=torch.float16)), TypeError, "dtype"),
    (dict(x=torch.ones(2, 4, device="meta")), ValueError, "is on"),
])
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_bad_input(backend, bad, error, match):
    args = dict(x=torch.ones(2, 4), weight=torch.ones(3, 4), bias=torch.ones(3), activation=None, residual=None)
    args.update(bad)
    with gptext.backend(backend), pytest.raises(error, match=match):
        gptext.ops.linear(**args)


def test_ffn_bad_shapes():
    x = torch.ones(2, 4)
    with pytest.raises(ValueError, match="w_proj has shape"):
        gptext.ops.ffn(x, torch.ones(16, 4), None, torch.ones(4, 8), None)
    with pytest.raises(ValueError, match="b_proj has shape"):
        gptext.ops.ffn(x, torch.ones(16, 4), None, torch.ones(4, 16), torch.ones(16))


def test_gemm_policy_api():
    with pytest.raises(ValueError, match="GEMM policy"):
        gptext.set_gemm_policy("fastest")
    gptext.set_gemm_policy("cublas")
    assert gptext.gemm_policy() == "cublas"
    gptext.set_gemm_policy("auto")
    assert gptext.gemm_policy() == "auto"
    assert gptext.ops.linear_backend(torch.ones(2, 4), torch.ones(3, 4)) == "cpu"
    with gptext.backend("reference"):
        assert gptext.ops.linear_backend(torch.ones(2, 4), torch.ones(3, 4)) == "reference"


@pytest.mark.cuda
def test_cuda_policy_reports_choice():
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    gptext.set_gemm_policy("wmma")
    assert gptext.ops.linear_backend(x, w) == "wmma"
    gptext.set_gemm_policy("cublas")
    assert gptext.ops.linear_backend(x, w) == "cublas"
    gptext.set_gemm_policy("auto")
    gptext.ops.linear(x, w)  # measures this shape class once
    assert gptext.ops.linear_backend(x, w) in ("wmma", "cublas")
    assert gptext.ops.linear_backend(x.float(), w.float()) == "cublas"  # fp32 always


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only answer")
def test_no_gpu_means_no_cuda_kernels():
    assert not gptext.kernels_available("cuda")
    assert gptext.kernels_available("cpu")
