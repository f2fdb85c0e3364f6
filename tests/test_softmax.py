"""gptext.ops.softmax against the reference and torch, on every device, with the
attention-score options (scale, causal mask aligned to the end of the keys, window)."""

import math

import pytest
import torch

import gptext
from gptext import reference

from conftest import DEVICES, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Row lengths that hit every CUDA variant and its tails: warp (<= 1024, with and without a
# multiple of the 16-byte vector), block (<= 16384) and online (longer), including GPT-2's
# vocabulary.
COLS = [1, 7, 32, 37, 256, 1000, 1024, 1025, 4097, 16384, 16385, 50257]


def _scores(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", COLS)
def test_matches_reference(kernels, device, dtype, cols):
    rows = 3 if cols > 4096 else 13
    x = _scores((rows, cols), dtype, device)
    y = gptext.ops.softmax(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y.float(), reference.softmax(x).float(), dtype)
    # fp32 rows are distributions to rounding
    torch.testing.assert_close(y.float().sum(-1), torch.ones(rows, device=device), rtol=0, atol=cols * 2e-7 + 1e-2 *
                               (dtype != torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_softmax_fp32(kernels, device):
    x = _scores((64, 333), torch.float32, device)
    assert_close(gptext.ops.softmax(x), torch.softmax(x, -1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [0, 1, -2])
def test_other_dims_and_non_contiguous(kernels, device, dim):
    x = _scores((9, 17, 5), torch.float32, device)
    assert_close(gptext.ops.softmax(x, dim), torch.softmax(x, dim))
    xt = x.transpose(0, 2)  # non-contiguous
    assert not xt.is_contiguous()
    assert_close(gptext.ops.softmax(xt), torch.softmax(xt, -1))
    xs = x[:, ::2, :]  # strided slice
    assert_close(gptext.ops.softmax(xs, dim), torch.softmax(xs, dim))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_rows(kernels, device, dtype):
    """A contiguous view starting one element into its storage defeats 16-byte alignment."""
    for cols in (64, 2048, 20000):
        base = _scores((4 * cols + 1,), dtype, device)
        x = base[1:].view(4, cols)
        assert_close(gptext.ops.softmax(x).float(), reference.softmax(x).float(), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_large_output(kernels, device, dtype, causal):
    """A call moving more than 32 MiB (its output written with streaming stores on the
    CPU), rows off alignment (odd width, one-element offset), masked prefixes of every
    length."""
    rows, cols = 131, 64541  # 8.5M values: 33.8 MB read and written in 16 bits
    x = _scores((rows * cols + 1,), dtype, device)[1:].view(rows, cols)
    y = gptext.ops.softmax(x, scale=0.5, causal=causal)
    assert_close(y.float(), reference.softmax(x, scale=0.5, causal=causal).float(), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0,), (2, 0, 3)])
def test_empty(kernels, device, shape):
    x = torch.randn(shape, device=device)
    y = gptext.ops.softmax(x)
    assert y.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_len,k_len", [(1, 1), (5, 5), (1, 9), (4, 37), (33, 33), (3, 1030), (2, 20000)])
@pytest.mark.parametrize("window", [None, 1, 4, 128])
def test_causal_and_window(kernels, device, dtype, q_len, k_len, window):
    x = _scores((2, 3, q_len, k_len), dtype, device)
    scale = 1 / math.sqrt(64)
    y = gptext.ops.softmax(x, scale=scale, causal=True, window=window)
    expected = reference.softmax(x, scale=scale, causal=True, window=window)
    assert_close(y.float(), expected.float(), dtype)
    mask = reference.attention_mask(q_len, k_len, True, window, device)
    assert (y[..., ~mask] == 0).all(), "masked keys must get exactly zero probability"


def test_reference_causal_against_explicit_mask():
    """The reference's causal rule, checked against a mask written out by hand."""
    x = torch.randn(2, 4, dtype=torch.float64)  # q_len 2, k_len 4: queries at positions 2 and 3
    y = reference.softmax(x, causal=True, window=2)
    allowed = torch.tensor([[False, True, True, False], [False, False, True, True]])
    manual = torch.softmax(x.masked_fill(~allowed, float("-inf")), -1)
    torch.testing.assert_close(y, manual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cols", [8, 3000, 30000])
def test_fully_masked_rows_are_zero(kernels, device, cols):
    # More queries than keys: the first queries sit before the first key and see nothing.
    x = _scores((6, cols), torch.float32, device)[None]
    y = gptext.ops.softmax(x[:, :, :3].expand(1, 6, 3).contiguous(), causal=True)
    assert torch.isfinite(y).all()
    assert (y[0, :3] == 0).all() and torch.allclose(y[0, 3:].sum(-1), torch.ones(3, device=device))
    # Every entry -inf (an explicit mask in the scores) also gives zeros, not NaN.
    z = gptext.ops.softmax(torch.full((2, cols), float("-inf"), device=device))
    assert (z == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [16, 37, 5000, 20000, 50257])
def test_nan_propagates(kernels, device, dtype, cols):
    """A NaN makes its row NaN wherever it sits (mid-row, the last column: a tail element
    outside the vector loops) and even when nothing else in the row is finite, as in
    PyTorch; the other rows are untouched."""
    x = torch.randn(5, cols, device=device)
    x[0, cols // 2] = float("nan")
    x[1, -1] = float("nan")
    x[2] = float("nan")
    x[3] = float("-inf")
    x[3, 0] = float("nan")
    y = gptext.ops.softmax(x.to(dtype))
    assert torch.isnan(y[:4]).all() and torch.isfinite(y[4]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [40, 1030, 20000, 70000])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_masked_keys_stay_zero_beside_a_nan(kernels, device, dtype, cols, poison):
    """A visible NaN (or +inf) makes its row's visible keys NaN, and its masked keys 0 still,
    in every row-length variant (warp, block, cluster or online) and in the reference."""
    x = torch.randn(4, cols, device=device)
    x[0, 5] = poison  # row 0 (query at position cols - 4) sees keys [0, cols - 3)
    x[1, -2] = poison  # row 1 sees keys [0, cols - 2): a masked key may hold anything
    for y in (gptext.ops.softmax(x.to(dtype), causal=True), reference.softmax(x.to(dtype), causal=True)):
        assert torch.isnan(y[0, :cols - 3]).all() and (y[0, cols - 3:] == 0).all()
        assert torch.isfinite(y[1:]).all() and (y[1, cols - 2:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_are_stable(kernels, device):
    x = torch.tensor([[1e4, 1e4 - 1, -1e4], [88.0, 89.0, 90.0]], device=device)
    assert_close(gptext.ops.softmax(x), torch.softmax(x, -1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient(kernels, device, dtype):
    x = _scores((3, 5, 7), dtype, device).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    g = _scores((3, 5, 7), dtype, device, seed=1)
    gptext.ops.softmax(x, scale=0.5, causal=True, window=3).backward(g)
    reference.softmax(x_ref, scale=0.5, causal=True, window=3).backward(g)
    assert_close(x.grad.float(), x_ref.grad.float(), dtype, scale=2)


@pytest.mark.parametrize("bad, error, match", [
    (dict(x=torch.ones(3, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(dim=2), IndexError, "out of range"),
    (dict(scale=0.0), ValueError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(window=4), ValueError, "needs causal"),
    (dict(window=-1, causal=True), ValueError, "window"),
    (dict(causal=True, dim=0), ValueError, "dim=-1"),
    (dict(x=torch.ones(5), causal=True), ValueError, "q_len, k_len"),
])
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_bad_input(backend, bad, error, match):
    args = dict(x=torch.ones(4, 5), dim=-1)
    args.update(bad)
    x = args.pop("x")
    with gptext.backend(backend), pytest.raises(error, match=match):
        gptext.ops.softmax(x, **args)
