"""gptext.ops.rmsnorm and rmsnorm_residual (gpt-oss's norm) against the reference, torch's
F.rms_norm and an RMSNorm written out here."""

import pytest
import torch
import torch.nn.functional as F

import gptext
from gptext import reference

from conftest import DEVICES, assert_close, check_large_norm_residual

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Every CUDA variant (warp <= 1024, block <= 16384, streamed beyond), with and without a
# multiple of the vector width; gpt-oss's 2880 included.
WIDTHS = [1, 5, 64, 768, 1000, 1024, 2880, 2881, 16384, 20000]


def _inputs(rows, cols, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(dtype).to(device)  # noqa: E731
    return make(rows, cols, s=2.0) + 0.5, make(rows, cols), make(cols) + 1  # an offset mean: RMS is not std


def _written_out(v, weight, eps):
    """RMSNorm as gpt-oss writes it, in float64."""
    v = v.double()
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", WIDTHS)
def test_residual_matches_reference(kernels, device, dtype, cols):
    rows = 3 if cols > 4096 else 11
    x, r, w = _inputs(rows, cols, dtype, device)
    normed, total = gptext.ops.rmsnorm_residual(x, r, w)
    ref_normed, ref_total = reference.rmsnorm_residual(x, r, w)
    assert normed.dtype == dtype and total.dtype == dtype and normed.shape == x.shape
    torch.testing.assert_close(total, ref_total, rtol=0, atol=0)  # one rounding of x + r, exactly
    assert_close(normed.float(), ref_normed.float(), dtype, scale=2)
    assert_close(normed.double(), _written_out(total, w, 1e-5), dtype, scale=4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1, 37, 768, 2880, 20000])
def test_plain_rmsnorm(kernels, device, dtype, cols):
    x, _, w = _inputs(4, cols, dtype, device)
    y = gptext.ops.rmsnorm(x, w)
    assert_close(y.float(), reference.rmsnorm(x, w).float(), dtype, scale=2)
    if dtype == torch.float32:
        assert_close(y, F.rms_norm(x, (cols,), w, eps=1e-5), scale=4)
        # A LayerNorm would differ: the rows have a mean of about 0.5.
        assert not torch.allclose(y, F.layer_norm(x, (cols,), w, None, eps=1e-5), atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_and_eps(kernels, device):
    x, r, w = _inputs(6, 300, torch.float32, device)
    out, total, rstd = torch.ops.gptext.rmsnorm_residual(x, r, w, 1e-5)
    assert rstd.dtype == torch.float32 and rstd.shape == (6,)
    assert_close(rstd, reference.rmsnorm_stats(x + r), scale=10)
    zeros = torch.zeros(2, 64, device=device)  # rms 0: the eps keeps it finite, the output is 0
    assert torch.equal(gptext.ops.rmsnorm(zeros, torch.ones(64, device=device)), zeros)
    assert_close(gptext.ops.rmsnorm(x, w, eps=0.5), _written_out(x, w, 0.5).float(), scale=4)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_batched_and_empty(kernels, device):
    x, r, w = _inputs(8, 96, torch.float32, device)
    x3, r3 = x.view(2, 4, 96).transpose(0, 1), r.view(2, 4, 96).transpose(0, 1)
    assert not x3.is_contiguous()
    normed, total = gptext.ops.rmsnorm_residual(x3, r3, w)
    ref_normed, ref_total = reference.rmsnorm_residual(x3, r3, w)
    assert normed.shape == (4, 2, 96)
    assert_close(normed, ref_normed, scale=2)
    assert_close(total, ref_total)
    w_strided = torch.randn(192, device=device)[::2]
    assert_close(gptext.ops.rmsnorm(x, w_strided), reference.rmsnorm(x, w_strided), scale=2)
    empty = torch.empty(0, 16, device=device)
    normed, total = gptext.ops.rmsnorm_residual(empty, empty, torch.ones(16, device=device))
    assert normed.shape == (0, 16) and total.shape == (0, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_large_misaligned_with_non_finite(kernels, device, dtype, offset):
    """More than 32 MiB (the CPU kernels' streaming stores), rows off alignment, and a NaN
    and infinities that must stay in their rows."""
    x, r, w = _inputs(1400, 3073, dtype, device)
    check_large_norm_residual(gptext.ops.rmsnorm_residual, reference.rmsnorm_residual, x, r, (w,), offset)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients(kernels, device, dtype):
    x, r, w = _inputs(5, 48, dtype, device)
    leaves = [t.clone().requires_grad_() for t in (x, r, w)]
    g_out, g_sum = torch.randn(5, 48, device=device).to(dtype), torch.randn(5, 48, device=device).to(dtype)
    normed, total = gptext.ops.rmsnorm_residual(*leaves)
    torch.autograd.backward([normed, total], [g_out, g_sum])
    # The oracle: autograd through the written-out formula in float64.
    wide = [t.detach().double().requires_grad_() for t in (x, r, w)]
    v = wide[0] + wide[1]
    torch.autograd.backward([_written_out(v, wide[2], 1e-5), v], [g_out.double(), g_sum.double()])
    for got, want in zip(leaves, wide):
        assert_close(got.grad.double(), want.grad, dtype, scale=8)
    y = gptext.ops.rmsnorm(leaves[0], leaves[2])
    (gx, gw) = torch.autograd.grad(y, (leaves[0], leaves[2]), g_out)
    (wx, ww) = torch.autograd.grad(_written_out(wide[0], wide[2], 1e-5), (wide[0], wide[2]), g_out.double())
    assert_close(gx.double(), wx, dtype, scale=8)
    assert_close(gw.double(), ww, dtype, scale=8)


@pytest.mark.parametrize("bad, error, match", [
    (dict(x=torch.ones(2, 4, dtype=torch.int32)), TypeError, "floating-point"),
    (dict(weight=torch.ones(5)), ValueError, "weight has shape"),
    (dict(residual=torch.ones(2, 5)), ValueError, "residual has shape"),
    (dict(residual=torch.ones(2, 4, dtype=torch.float64)), TypeError, "dtype"),
    (dict(weight=torch.ones(4, dtype=torch.bfloat16)), TypeError, "dtype"),
    (dict(residual=torch.ones(2, 4, device="meta")), ValueError, "is on meta"),
    (dict(x=torch.ones(2, 0), residual=torch.ones(2, 0), weight=torch.ones(0)), ValueError, "non-empty"),
    (dict(eps=float("nan")), ValueError, "eps"),
])
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_bad_input(backend, bad, error, match):
    args = dict(x=torch.ones(2, 4), residual=torch.ones(2, 4), weight=torch.ones(4), eps=1e-5)
    args.update(bad)
    with gptext.backend(backend), pytest.raises(error, match=match):
        gptext.ops.rmsnorm_residual(**args)
