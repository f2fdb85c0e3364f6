"""gptext.ops.layernorm and layernorm_residual against the reference and torch."""

import pytest
import torch
import torch.nn.functional as F

import gptext
from gptext import reference

from conftest import DEVICES, assert_close, check_large_norm_residual

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Widths that hit every CUDA variant (warp <= 1024, block <= 16384, streamed beyond) with
# and without a multiple of the vector width, GPT-2's and gpt-oss's included.
WIDTHS = [1, 5, 64, 768, 1000, 1024, 1600, 2880, 2881, 16384, 20000]


def _inputs(rows, cols, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(dtype).to(device)  # noqa: E731
    return make(rows, cols, s=2.0), make(rows, cols), make(cols) + 1, make(cols, s=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", WIDTHS)
def test_residual_matches_reference(kernels, device, dtype, cols):
    rows = 3 if cols > 4096 else 11
    x, r, w, b = _inputs(rows, cols, dtype, device)
    normed, total = gptext.ops.layernorm_residual(x, r, w, b)
    ref_normed, ref_total = reference.layernorm_residual(x, r, w, b)
    assert normed.dtype == dtype and total.dtype == dtype
    torch.testing.assert_close(total, ref_total, rtol=0, atol=0)  # one rounding of x + r, exactly
    assert_close(normed.float(), ref_normed.float(), dtype, scale=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1, 37, 768, 2880, 20000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_plain_layernorm(kernels, device, dtype, cols, with_bias):
    x, _, w, b = _inputs(4, cols, dtype, device)
    b = b if with_bias else None
    y = gptext.ops.layernorm(x, w, b)
    assert_close(y.float(), reference.layernorm(x, w, b).float(), dtype, scale=2)
    if dtype == torch.float32:
        assert_close(y, F.layer_norm(x, (cols,), w, b), scale=4)


@pytest.mark.parametrize("device", DEVICES)
def test_statistics(kernels, device):
    x, r, w, b = _inputs(6, 300, torch.float32, device)
    out, total, mean, rstd = torch.ops.gptext.layernorm_residual(x, r, w, b, 1e-5)
    ref_mean, ref_rstd = reference.layernorm_stats(x + r)
    assert mean.dtype == torch.float32 and mean.shape == (6,)
    assert_close(mean, ref_mean, scale=10)
    assert_close(rstd, ref_rstd, scale=10)


@pytest.mark.parametrize("device", DEVICES)
def test_eps_and_constant_rows(kernels, device):
    x = torch.full((2, 64), 3.0, device=device)  # zero variance: the output is the bias
    w, b = torch.ones(64, device=device), torch.arange(64.0, device=device)
    assert_close(gptext.ops.layernorm(x, w, b, eps=1e-5), b.expand(2, 64))
    x2 = torch.randn(3, 64, device=device)
    assert_close(gptext.ops.layernorm(x2, w, None, eps=0.5), F.layer_norm(x2, (64,), w, None, eps=0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_batched(kernels, device):
    x, r, w, b = _inputs(8, 96, torch.float32, device)
    x3, r3 = x.view(2, 4, 96).transpose(0, 1), r.view(2, 4, 96).transpose(0, 1)
    assert not x3.is_contiguous()
    normed, total = gptext.ops.layernorm_residual(x3, r3, w, b)
    ref_normed, ref_total = reference.layernorm_residual(x3, r3, w, b)
    assert normed.shape == (4, 2, 96)
    assert_close(normed, ref_normed, scale=2)
    assert_close(total, ref_total)
    w_strided = torch.randn(192, device=device)[::2]
    assert_close(gptext.ops.layernorm(x, w_strided, None), reference.layernorm(x, w_strided, None), scale=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_large_outputs(kernels, device, dtype, offset):
    """A call moving more than 32 MiB (the CPU kernels write its outputs with streaming
    stores, which need aligned rows: an odd width and a one-element offset put every row
    off alignment), with non-finite values on the way."""
    x, r, w, b = _inputs(1400, 3073, dtype, device)  # 4.3M values: 34.4 MB read and written in 16 bits
    check_large_norm_residual(gptext.ops.layernorm_residual, reference.layernorm_residual, x, r, (w, b), offset)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned(kernels, device, dtype):
    cols = 2048
    base = torch.randn(3 * cols + 1, device=device).to(dtype)
    x = base[1:].view(3, cols)
    w = torch.ones(cols, device=device, dtype=dtype)
    normed, total = gptext.ops.layernorm_residual(x, x, w, None)
    ref_normed, ref_total = reference.layernorm_residual(x, x, w, None)
    assert_close(normed.float(), ref_normed.float(), dtype, scale=2)
    assert torch.equal(total, ref_total)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows(kernels, device):
    x = torch.empty(0, 16, device=device)
    w = torch.ones(16, device=device)
    normed, total = gptext.ops.layernorm_residual(x, x, w, None)
    assert normed.shape == (0, 16) and total.shape == (0, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradients(kernels, device, dtype, with_bias):
    x, r, w, b = _inputs(5, 48, dtype, device)
    b = b if with_bias else None
    leaves = [t.clone().requires_grad_() for t in (x, r, w) + ((b,) if with_bias else ())]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    g_out, g_sum = torch.randn(5, 48, device=device).to(dtype), torch.randn(5, 48, device=device).to(dtype)

    def run(fn, ts):
        bias = ts[3] if with_bias else None
        normed, total = fn(ts[0], ts[1], ts[2], bias)
        torch.autograd.backward([normed, total], [g_out, g_sum])

    run(gptext.ops.layernorm_residual, leaves)
    run(reference.layernorm_residual, ref_leaves)
    for got, want in zip(leaves, ref_leaves):
        assert_close(got.grad.float(), want.grad.float(), dtype, scale=4)


@pytest.mark.parametrize("bad, error, match", [
    (dict(x=torch.ones(2, 4, dtype=torch.int32)), TypeError, "floating-point"),
    (dict(weight=torch.ones(5)), ValueError, "weight has shape"),
    (dict(bias=torch.ones(3)), ValueError, "bias has shape"),
    (dict(residual=torch.ones(2, 5)), ValueError, "residual has shape"),
    (dict(residual=torch.ones(2, 4, dtype=torch.float64)), TypeError, "dtype"),
    (dict(weight=torch.ones(4, dtype=torch.bfloat16)), TypeError, "dtype"),
    (dict(residual=torch.ones(2, 4, device="meta")), ValueError, "is on meta"),
    (dict(x=torch.ones(2, 0), residual=torch.ones(2, 0), weight=torch.ones(0), bias=None), ValueError, "non-empty"),
    (dict(eps=-1.0), ValueError, "eps"),
])
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_bad_input(backend, bad, error, match):
    args = dict(x=torch.ones(2, 4), residual=torch.ones(2, 4), weight=torch.ones(4), bias=torch.zeros(4), eps=1e-5)
    args.update(bad)
    with gptext.backend(backend), pytest.raises(error, match=match):
        gptext.ops.layernorm_residual(**args)
