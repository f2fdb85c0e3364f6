"""gptext.ops.attention (fused: flash-style on CUDA, blockwise online softmax on CPU)
against the reference that materialises every score."""

import math

import pytest
import torch

import gptext
from gptext import reference

from conftest import DEVICES, HAS_CUDA, assert_close, oracle

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA_DTYPES = [torch.bfloat16, torch.float16]


def dtypes_for(device):
    return CUDA_DTYPES if device == "cuda" else CPU_DTYPES


def qkv(batch, heads, kv_heads, q_len, k_len, dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    return make(batch, heads, q_len, dim), make(batch, kv_heads, k_len, dim), make(batch, kv_heads, k_len, dim)


# (batch, heads, kv_heads, q_len, k_len): GQA ratios 1/3/4/8, prefill, decode (Tq = 1), chunked
# prefill (Tq < Tk), more queries than keys, lengths off every tile size; decode with fewer
# than four query rows per kv head (the CPU's per-row path) and with more (its row blocks).
SHAPES = [(2, 4, 4, 37, 37), (1, 8, 2, 64, 64), (2, 8, 1, 1, 200), (1, 4, 1, 17, 130), (1, 2, 2, 9, 5),
          (1, 16, 2, 129, 129), (2, 3, 3, 1, 150), (1, 3, 1, 1, 70)]
OPTIONS = [dict(causal=True), dict(causal=False), dict(causal=True, window=16), dict(causal=True, sinks=True),
           dict(causal=True, window=7, sinks=True)]


def _options(opts, heads, device):
    kwargs = dict(opts)
    if kwargs.pop("sinks", False):
        kwargs["sinks"] = torch.linspace(-2, 2, heads, device=device)
    return kwargs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("dim", [64, 128])
def test_matches_reference(kernels, device, shape, opts, dim):
    for dtype in dtypes_for(device):
        q, k, v = qkv(*shape, dim, dtype, device)
        kwargs = _options(opts, shape[1], device)
        out = gptext.ops.attention(q, k, v, **kwargs)
        assert out.shape == q.shape and out.dtype == dtype
        assert_close(out.float(), oracle(reference.attention, q, k, v, **kwargs), dtype, scale=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [8, 20, 24, 80])
def test_cpu_any_head_dim(kernels, dtype, dim):
    """Head sizes off the 8- and 16-value vector steps of the CPU dot products (tails)."""
    q, k, v = qkv(2, 6, 3, 11, 14, dim, dtype, "cpu")
    out = gptext.ops.attention(q, k, v, scale=0.3)
    assert_close(out.float(), oracle(reference.attention, q, k, v, scale=0.3), dtype, scale=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [8, 16, 32, 48, 64, 80, 128, 144, 256])
def test_cpu_decode_rows_any_head_dim_and_cache_length(kernels, dtype, dim):
    """A decode step without grouped heads (one query row per kv head: the CPU's per-row
    path, which holds whole-vector heads in registers) over caches of every length around
    its 16- and 64-key steps, with sinks, a window, padding and a partly filled cache."""
    for k_len in [1, 2, 15, 16, 17, 63, 64, 65, 130]:
        q, k, v = qkv(2, 3, 3, 1, k_len, dim, dtype, "cpu", seed=k_len)
        for kwargs in [dict(), dict(sinks=torch.tensor([-1.0, 0.5, 3.0])), dict(window=9),
                       dict(kv_starts=torch.tensor([0, k_len // 2]), kv_lens=torch.tensor([k_len, k_len]))]:
            out = gptext.ops.attention(q, k, v, **kwargs)
            assert_close(out.float(), oracle(reference.attention, q, k, v, **kwargs), dtype, scale=2)
    q, k, v = qkv(1, 2, 2, 2, 40, dim, dtype, "cpu")  # two queries a head; a cache filled to 0 keys
    assert (gptext.ops.attention(q, k, v, kv_lens=torch.tensor([0])) == 0).all()


@pytest.mark.parametrize("dim", [32, 96, 160, 256])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_cpu_bf16_prefill_any_tile_dim(kernels, dim, opts):
    """bf16 prefill with at least 32 query rows per kv head: on a processor with AMX it runs
    on tiles (build_info()["cpu_amx"]), 32-key blocks and 16-row chunks, so lengths off
    both, head sizes of 1-8 32-dim tiles, and a padded, partly filled cache."""
    assert isinstance(gptext.build_info()["cpu_amx"], bool)
    for shape in [(1, 2, 2, 45, 45), (2, 4, 1, 9, 77), (1, 3, 3, 33, 100)]:
        q, k, v = qkv(*shape, dim, torch.bfloat16, "cpu", seed=dim)
        kwargs = _options(opts, shape[1], "cpu")
        out = gptext.ops.attention(q, k, v, **kwargs)
        assert_close(out.float(), oracle(reference.attention, q, k, v, **kwargs), torch.bfloat16, scale=2)
    q, k, v = qkv(2, 4, 2, 20, 70, dim, torch.bfloat16, "cpu")
    starts, lens = torch.tensor([0, 33]), torch.tensor([70, 50])
    out = gptext.ops.attention(q, k, v, kv_starts=starts, kv_lens=lens)
    assert_close(out.float(), oracle(reference.attention, q, k, v, kv_starts=starts, kv_lens=lens), torch.bfloat16,
                 scale=2)


@pytest.mark.parametrize("dim", [32, 64, 80, 128, 256])
def test_cpu_bf16_grouped_decode_any_cache_length(kernels, dim):
    """bf16 passes of 4-31 query rows per kv head (decode steps of grouped heads, short
    chunks of a few heads): on AMX, one 16-row chunk or a full and a partial one against
    packed key tiles of 16 and value tiles of 32 keys, so caches of every length around
    both, read from a longer cache buffer (rows of a view), with sinks, a window and
    padding, and the whole buffer told by kv_lens how much is written; 80 is not a whole
    number of 32-dim tiles and takes the fp32 vectors."""
    for heads, kv_heads, q_len in [(8, 1, 1), (16, 2, 1), (4, 1, 1), (12, 3, 2), (20, 1, 1), (3, 1, 9)]:
        for k_len in [1, 15, 16, 17, 31, 32, 33, 100]:
            q, k_cache, v_cache = qkv(2, heads, kv_heads, q_len, 128, dim, torch.bfloat16, "cpu", seed=k_len)
            k, v = k_cache[:, :, :k_len], v_cache[:, :, :k_len]
            for kwargs in [dict(), dict(sinks=torch.linspace(-1, 2, heads)), dict(window=9),
                           dict(kv_starts=torch.tensor([0, k_len // 2]), kv_lens=torch.tensor([k_len, k_len]))]:
                out = gptext.ops.attention(q, k, v, **kwargs)
                assert_close(out.float(), oracle(reference.attention, q, k, v, **kwargs), torch.bfloat16, scale=2)
            # The whole buffer with kv_lens: slots past the written keys hold NaN and are never read.
            k_cache[:, :, k_len:], v_cache[:, :, k_len:] = float("nan"), float("nan")
            lens = torch.tensor([k_len, k_len])
            out = gptext.ops.attention(q, k_cache, v_cache, kv_lens=lens)
            assert_close(out.float(), oracle(reference.attention, q, k, v), torch.bfloat16, scale=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 4, 2, 9, 13, 20), (1, 4, 2, 20, 40, 64)], ids=["rows", "tiles"])
def test_cpu_16bit_gradients(kernels, dtype, shape):
    """Backward from the forward's log-sum-exp: per row, and (40 rows a kv head, bf16) from
    the AMX forward where the processor has it."""
    q, k, v = qkv(*shape, dtype, "cpu")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.clone().float().requires_grad_() for t in (q, k, v)]
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    gptext.ops.attention(*leaves, causal=True).backward(grad)
    reference.attention(*ref_leaves, causal=True).backward(grad.float())
    for ours, ref in zip(leaves, ref_leaves):
        assert ours.grad.dtype == dtype
        assert_close(ours.grad.float(), ref.grad, dtype, scale=4)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_and_partial_cache(kernels, device):
    """kv_starts (left padding) and kv_lens (a cache filled to different lengths)."""
    for dtype in dtypes_for(device):
        q, k, v = qkv(3, 4, 2, 2, 90, 64, dtype, device)
        starts = torch.tensor([0, 5, 40], device=device)
        lens = torch.tensor([90, 60, 41], device=device)
        out = gptext.ops.attention(q, k, v, kv_starts=starts, kv_lens=lens)
        assert_close(out.float(), oracle(reference.attention, q, k, v, kv_starts=starts, kv_lens=lens), dtype,
                     scale=2)
        # the same as attending over each sequence's real keys alone
        for b in range(3):
            alone = gptext.ops.attention(q[b:b + 1], k[b:b + 1, :, starts[b]:lens[b]], v[b:b + 1, :, starts[b]:lens[b]])
            assert_close(out[b:b + 1].float(), alone.float(), dtype, scale=2)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(kernels, device):
    """q, k, v as the model makes them: permuted views of one (B, T, 3, H, D) projection."""
    for dtype in dtypes_for(device):
        qkv_proj = torch.randn(2, 40, 3, 4, 64, device=device).to(dtype)
        q, k, v = qkv_proj.permute(2, 0, 3, 1, 4)
        assert not q.is_contiguous()
        assert_close(gptext.ops.attention(q, k, v).float(), oracle(reference.attention, q, k, v), dtype, scale=2)
        # head_dim not contiguous: copied first
        qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert_close(gptext.ops.attention(qt, k, v).float(), oracle(reference.attention, q, k, v), dtype, scale=2)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_with_nothing_to_see(kernels, device):
    dtype = dtypes_for(device)[0]
    q, k, v = qkv(1, 2, 2, 6, 3, 64, dtype, device)  # queries 0-2 sit before the first key
    out = gptext.ops.attention(q, k, v)
    assert torch.isfinite(out).all() and (out[:, :, :3] == 0).all()
    sinks = torch.zeros(2, device=device)
    assert (gptext.ops.attention(q, k, v, sinks=sinks)[:, :, :3] == 0).all()  # a sink carries no value
    empty = gptext.ops.attention(q, k[:, :, :0], v[:, :, :0])
    assert (empty == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty(kernels, device):
    dtype = dtypes_for(device)[0]
    q, k, v = qkv(0, 2, 2, 3, 3, 64, dtype, device)
    assert gptext.ops.attention(q, k, v).shape == (0, 2, 3, 64)
    q, k, v = qkv(1, 2, 2, 0, 3, 64, dtype, device)
    assert gptext.ops.attention(q, k, v).shape == (1, 2, 0, 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("shape", [(2, 4, 2, 19, 19), (1, 8, 1, 3, 70), (1, 2, 2, 70, 70), (2, 3, 3, 2, 70)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gradients(kernels, device, opts, shape):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = qkv(*shape, 64, dtype, device)
    kwargs = _options(opts, shape[1], device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.clone().float().requires_grad_() for t in (q, k, v)]
    sinks = kwargs.pop("sinks", None)
    grads = []
    for inputs, fn in ((leaves, gptext.ops.attention), (ref_leaves, reference.attention)):
        s = None if sinks is None else sinks.clone().requires_grad_()
        out = fn(*inputs, sinks=s, **kwargs)
        out.backward(torch.ones_like(out) + torch.arange(out.shape[-1], device=device) / out.shape[-1])
        grads.append([t.grad for t in inputs] + ([s.grad] if s is not None else []))
    for got, want in zip(*grads):
        assert_close(got.float(), want.float(), dtype, scale=4)


@pytest.mark.parametrize("device", DEVICES)
def test_keys_a_batch_does_not_hold_are_never_read(kernels, device):
    """NaN in the cache slots outside [kv_starts, kv_lens) (padding, keys not yet written)
    reaches no output and no gradient, in the kernels and in the reference; rows that see no
    key, and a sink of -inf, give zeros and zero gradients."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = qkv(3, 4, 2, 40, 70, 64, dtype, device)
    starts, lens = torch.tensor([0, 5, 20], device=device), torch.tensor([70, 50, 30], device=device)
    for b in range(3):
        for t in (k, v):
            t[b, :, :starts[b]], t[b, :, lens[b]:] = float("nan"), float("nan")
    sinks = torch.tensor([float("-inf"), 0.5, -1.0, 2.0], device=device)
    grads = []
    for fn, wide in ((gptext.ops.attention, None), (reference.attention, torch.float64)):  # the oracle in fp64
        leaves = [t.to(wide or t.dtype, copy=True).requires_grad_() for t in (q, k, v, sinks)]
        out = fn(*leaves[:3], kv_starts=starts, kv_lens=lens, sinks=leaves[3])
        assert torch.isfinite(out).all() and (out[2, :, :30] == 0).all()  # batch 2: 10 keys for 40 queries
        out.float().square().sum().backward()
        grads.append([t.grad for t in leaves])
        assert all(torch.isfinite(g).all() for g in grads[-1]), fn
        assert (leaves[1].grad[1, :, :5] == 0).all() and (leaves[2].grad[1, :, 50:] == 0).all()
    # Rows that see one key have a q gradient of exactly 0, which fp32 leaves at the rounding
    # of dO . v - dO . out (a few 1e-6 here): hence twice test_gradients' margin.
    for got, want in zip(*grads):
        assert_close(got.float(), want.float(), dtype, scale=8)


def test_model_scale_default_and_errors():
    q, k, v = qkv(1, 4, 2, 5, 5, 16, torch.float32, "cpu")
    assert_close(gptext.ops.attention(q, k, v), gptext.ops.attention(q, k, v, scale=1 / math.sqrt(16)))
    cases = [
        (dict(k=k[:, :1].repeat(1, 3, 1, 1), v=v[:, :1].repeat(1, 3, 1, 1)), ValueError, "multiple of"),
        (dict(v=v[:, :, :4]), ValueError, "same shape"),
        (dict(q=q[..., :8]), ValueError, "head_dim"),
        (dict(q=q[0]), ValueError, "4-d"),
        (dict(k=k.double(), v=v.double()), TypeError, "dtype"),
        (dict(window=3, causal=False), ValueError, "needs causal"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(sinks=torch.zeros(3)), ValueError, "sinks"),
        (dict(sinks=torch.zeros(4, dtype=torch.long)), TypeError, "sinks must be a floating-point"),
        (dict(kv_lens=torch.tensor([2.0])), ValueError, "kv_lens"),
        (dict(kv_starts=torch.tensor([0, 1])), ValueError, "kv_starts"),
    ]
    for backend in ("kernels", "reference"):
        for bad, error, match in cases:
            args = dict(q=q, k=k, v=v)
            args.update(bad)
            with gptext.backend(backend), pytest.raises(error, match=match):
                gptext.ops.attention(**args)


@pytest.mark.cuda
def test_cuda_fp32_and_other_head_dims_fall_back(monkeypatch):
    from gptext import ops

    monkeypatch.setattr(ops, "_warned", set())
    q, k, v = qkv(1, 2, 2, 8, 8, 64, torch.float32, "cuda")
    with pytest.warns(RuntimeWarning, match="fused CUDA attention"):
        out = gptext.ops.attention(q, k, v)
    assert_close(out, oracle(reference.attention, q, k, v))
    with gptext.backend("kernels"), pytest.raises(RuntimeError, match="head_dim"):
        gptext.ops.attention(*qkv(1, 2, 2, 8, 8, 80, torch.bfloat16, "cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("k_len", [1000, 8192])
@pytest.mark.parametrize("heads,kv_heads", [(12, 12), (64, 8)])
def test_cuda_split_kv_decode(kernels, dtype, k_len, heads, kv_heads):
    """One query over a long cache: the split-KV path, with its combine step."""
    q, k, v = qkv(1, heads, kv_heads, 1, k_len, 64, dtype, "cuda")
    sinks = torch.randn(heads, device="cuda")
    for kwargs in (dict(), dict(window=128), dict(sinks=sinks)):
        out = gptext.ops.attention(q, k, v, **kwargs)
        assert_close(out.float(), oracle(reference.attention, q, k, v, **kwargs), dtype, scale=2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_long_prefill(kernels, dtype):
    q, k, v = qkv(2, 4, 2, 1000, 1000, 128, dtype, "cuda")
    assert_close(gptext.ops.attention(q, k, v).float(), oracle(reference.attention, q, k, v), dtype, scale=2)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only answer")
def test_attention_runs_on_cpu_kernels():
    assert gptext.ops.implementation("attention", torch.ones(1, 1, 1, 4)) == "cpu"
