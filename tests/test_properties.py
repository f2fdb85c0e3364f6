"""Property tests over random shapes for the CPU implementations of the ops."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gptext
from gptext import reference

from conftest import assert_close

SETTINGS = settings(max_examples=40, deadline=None)
dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def _tensor(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


@SETTINGS
@given(rows=st.integers(0, 9), cols=st.integers(1, 3000), dtype=dtypes, seed=st.integers(0, 2**31),
       scale=st.floats(0.01, 10.0))
def test_softmax(rows, cols, dtype, seed, scale):
    x = _tensor((rows, cols), dtype, seed, 4.0)
    with gptext.backend("kernels"):
        y = gptext.ops.softmax(x, scale=scale)
    assert_close(y.float(), reference.softmax(x, scale=scale).float(), dtype)


@SETTINGS
@given(q_len=st.integers(1, 40), extra_keys=st.integers(-5, 60), window=st.one_of(st.none(), st.integers(1, 50)),
       seed=st.integers(0, 2**31))
def test_causal_softmax(q_len, extra_keys, window, seed):
    k_len = max(1, q_len + extra_keys)
    x = _tensor((2, q_len, k_len), torch.float32, seed, 4.0)
    with gptext.backend("kernels"):
        y = gptext.ops.softmax(x, causal=True, window=window)
    assert_close(y, reference.softmax(x, causal=True, window=window))


@SETTINGS
@given(rows=st.integers(0, 9), cols=st.integers(1, 5000), dtype=dtypes, seed=st.integers(0, 2**31),
       bias=st.booleans())
def test_layernorm_residual(rows, cols, dtype, seed, bias):
    x, r = _tensor((rows, cols), dtype, seed, 3.0), _tensor((rows, cols), dtype, seed + 1)
    w, b = _tensor((cols,), dtype, seed + 2), _tensor((cols,), dtype, seed + 3) if bias else None
    with gptext.backend("kernels"):
        normed, total = gptext.ops.layernorm_residual(x, r, w, b)
    ref_normed, ref_total = reference.layernorm_residual(x, r, w, b)
    assert torch.equal(total, ref_total)
    assert_close(normed.float(), ref_normed.float(), dtype, scale=2)


@SETTINGS
@given(m=st.integers(0, 40), n=st.integers(1, 70), k=st.integers(0, 90), dtype=dtypes,
       activation=st.sampled_from([None, "gelu", "relu"]), bias=st.booleans(), residual=st.booleans(),
       seed=st.integers(0, 2**31))
def test_linear(m, n, k, dtype, activation, bias, residual, seed):
    x, w = _tensor((m, k), dtype, seed), _tensor((n, k), dtype, seed + 1, max(k, 1) ** -0.5)
    b = _tensor((n,), dtype, seed + 2) if bias else None
    r = _tensor((m, n), dtype, seed + 3) if residual else None
    with gptext.backend("kernels"):
        y = gptext.ops.linear(x, w, b, activation, r)
    scale = 2 * (max(1.0, k ** 0.5) if dtype == torch.float32 else 1.0)
    assert_close(y.float(), reference.linear(x, w, b, activation, r).float(), dtype, scale=scale)
