"""gptext.ops.expert_linear (a mixture of experts' linear layers, per route or grouped by
expert) against the reference, against each route's expert written out with F.linear, and
in gpt-oss's MoE, where it runs without reading the routing back to the host."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

import gptext
from gptext import GPT, GPTConfig, reference
from gptext.model import MoE

from conftest import DEVICES, assert_close, oracle

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(tokens, slots, n, k, dtype, device, experts=5, per_route=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)  # noqa: E731
    x = make(tokens, slots, k) if per_route else make(tokens, k)
    weight = make(experts, n, k) * max(k, 1) ** -0.5
    b = make(experts, n) if bias else None
    chosen = torch.randint(0, experts, (tokens, slots), generator=g).to(device)
    return x, weight, b, chosen


def _written_out(x, weight, bias, chosen, activation=None, limit=7.0, rounding=None):
    """Each route with F.linear on its own expert, in float64, the product rounded to
    `rounding` (default x's dtype) before the SwiGLU, as the op promises. The rounding
    passes the gradient straight through, so that float64 leaves (a gradient's oracle)
    still see the op's rounded values at the clamp: a product within half an ulp of the
    limit is clamped on one side of the rounding and not on the other, and the SwiGLU's
    gradient jumps there."""
    tokens, slots = chosen.shape
    rounding = rounding or x.dtype
    out = []
    for t in range(tokens):
        for s in range(slots):
            e = int(chosen[t, s])
            row = (x[t, s] if x.dim() == 3 else x[t]).double()
            h = F.linear(row, weight[e].double(), bias[e].double() if bias is not None else None)
            h = h + (h.to(rounding).double() - h).detach()
            out.append(reference.swiglu(h, limit) if activation == "swiglu" else h)
    return torch.stack(out).view(tokens, slots, -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(6, 8), (64, 64), (37, 45), (100, 2880), (2, 1), (1, 0)])
@pytest.mark.parametrize("per_route", [False, True])
def test_matches_reference(kernels, device, dtype, n, k, per_route):
    x, w, b, chosen = _inputs(3, 4, n, k, dtype, device, per_route=per_route)
    y = gptext.ops.expert_linear(x, w, b, chosen)
    assert y.shape == (3, 4, n) and y.dtype == dtype
    assert_close(y, oracle(reference.expert_linear, x, w, b, chosen).to(dtype), scale=2)
    assert_close(y.double(), _written_out(x, w, b, chosen), dtype, scale=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(12, 16), (2, 7), (5760 // 40, 2880), (66, 33)])
def test_swiglu(kernels, device, dtype, n, k):
    x, w, b, chosen = _inputs(5, 2, n, k, dtype, device)
    w = w * 8  # products well past the clamp, so that the limit matters
    # In fp32 the sums' rounding (which grows with K, and differs between the CPU builds'
    # orders of summation) dominates, and the SwiGLU's slope of up to limit + 1 multiplies it.
    scale = 2 * k ** 0.5 if dtype == torch.float32 else 4
    for limit in (7.0, 0.5):
        y = gptext.ops.expert_linear(x, w, b, chosen, "swiglu", limit)
        assert y.shape == (5, 2, n // 2)
        assert_close(y.double(), _written_out(x, w, b, chosen, "swiglu", limit), dtype, scale=scale)
    clamped = gptext.ops.expert_linear(x, w, b, chosen, "swiglu", 0.5)
    assert not torch.allclose(y.float(), gptext.ops.expert_linear(x, w, b, chosen, "swiglu", 7.0).float())
    assert torch.equal(clamped, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k, activation", [(64, 64, None), (37, 45, None), (66, 33, "swiglu"), (130, 136, "swiglu")])
@pytest.mark.parametrize("per_route", [False, True])
def test_many_routes_grouped_by_expert(kernels, device, dtype, n, k, activation, per_route):
    # A prefill's routes: more than 64 and than twice the experts, so the kernels group them
    # by expert (one GEMM an expert). Expert 7 of 9 is never chosen; expert 0 takes a run of
    # more routes than a GEMM tile has rows.
    x, w, b, chosen = _inputs(50, 4, n, k, dtype, device, experts=9, per_route=per_route)
    chosen[chosen == 7] = 3
    chosen[:40, 0] = 0
    scale = 4 if activation is None or dtype != torch.float32 else 2 * k ** 0.5
    y = gptext.ops.expert_linear(x, w, b, chosen, activation)
    assert y.shape == (50, 4, n // 2 if activation else n)
    assert_close(y.double(), _written_out(x, w, b, chosen, activation), dtype, scale=scale)


@pytest.mark.parametrize("device", DEVICES)
def test_without_bias_int32_indices_and_strided_inputs(kernels, device):
    x, w, _, chosen = _inputs(4, 3, 24, 40, torch.float32, device, bias=False)
    expected = _written_out(x, w, None, chosen)
    assert_close(gptext.ops.expert_linear(x, w, None, chosen.int()).double(), expected, torch.float32, scale=2)
    wide = torch.randn(4, 80, device=device)
    wide[:, ::2] = x
    strided_x = wide[:, ::2]
    strided_w = w.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, another layout
    assert not strided_x.is_contiguous() and not strided_w.is_contiguous()
    y = gptext.ops.expert_linear(strided_x, strided_w, None, chosen.t().contiguous().t())
    assert_close(y.double(), expected, torch.float32, scale=2)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(kernels, device):
    x, w, b, _ = _inputs(3, 2, 6, 8, torch.float32, device)
    none = torch.zeros(0, 2, dtype=torch.long, device=device)
    assert gptext.ops.expert_linear(x[:0], w, b, none).shape == (0, 2, 6)
    assert gptext.ops.expert_linear(x[:0], w, b, none, "swiglu").shape == (0, 2, 3)
    assert gptext.ops.expert_linear(x, w, b, torch.zeros(3, 0, dtype=torch.long, device=device)).shape == (3, 0, 6)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_bad_inputs(backend):
    x, w, b, chosen = _inputs(3, 2, 6, 8, torch.float32, "cpu")
    op = gptext.ops.expert_linear
    with gptext.backend(backend):
        with pytest.raises(IndexError, match="outside"):
            op(x, w, b, torch.tensor([[0, 5], [1, 1], [2, 2]]))
        with pytest.raises(IndexError, match="outside"):
            op(x, w, b, torch.tensor([[0, 1], [-1, 1], [2, 2]]))
        with pytest.raises(TypeError, match="experts must be an int64 or int32"):
            op(x, w, b, chosen.float())
        with pytest.raises(ValueError, match="experts must be 2-d"):
            op(x, w, b, chosen.reshape(-1))
        with pytest.raises(ValueError, match="x has shape"):
            op(x[:2], w, b, chosen)
        with pytest.raises(ValueError, match="features"):
            op(x[:, :7], w, b, chosen)
        with pytest.raises(ValueError, match="weight must be 3-d"):
            op(x, w[0], b, chosen)
        with pytest.raises(ValueError, match="bias has shape"):
            op(x, w, b[:, :5], chosen)
        with pytest.raises(TypeError, match="dtype"):
            op(x, w.double(), b, chosen)
        with pytest.raises(ValueError, match="even number"):
            op(x, w[:, :5], b[:, :5], chosen, "swiglu")
        with pytest.raises(ValueError, match="limit"):
            op(x, w, b, chosen, "swiglu", 0.0)
        with pytest.raises(ValueError, match="activation"):
            op(x, w, b, chosen, "gelu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [3, 80])  # 6 routes go one by one, 160 grouped by expert
@pytest.mark.parametrize("activation", [None, "swiglu"])
@pytest.mark.parametrize("per_route", [False, True])
def test_gradients(kernels, device, dtype, tokens, activation, per_route):
    x, w, b, chosen = _inputs(tokens, 2, 6, 8, dtype, device, per_route=per_route)
    chosen[0, 1] = chosen[0, 0]  # an expert chosen twice by one token: its gradients add
    chosen[chosen == 4] = 3  # an expert no route chose: a zero gradient
    inputs = [t.clone().requires_grad_(True) for t in (x, w, b)]
    grad = torch.randn(tokens, 2, 3 if activation else 6, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    gptext.ops.expert_linear(*inputs, chosen, activation, 1.5).backward(grad)
    wanted = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    _written_out(*wanted, chosen, activation, 1.5, rounding=dtype).backward(grad.double())
    for got, want in zip(inputs, wanted):
        assert got.grad.dtype == dtype
        assert_close(got.grad, want.grad.to(dtype), dtype, scale=10 * max(1, tokens // 10))
    assert inputs[1].grad[chosen.unique()].abs().sum() > 0 and not inputs[1].grad[4].any()


def test_gradients_of_the_weights_alone_and_without_bias(kernels):
    # The first layer of an MoE: x needs no gradient; a bias-free layer has none to give.
    x, w, _, chosen = _inputs(40, 4, 10, 12, torch.float32, "cpu", bias=False)
    w.requires_grad_(True)
    gptext.ops.expert_linear(x, w, None, chosen, "swiglu").sum().backward()
    want = w.detach().clone().requires_grad_(True)
    _written_out(x, want, None, chosen, "swiglu").sum().backward()
    assert_close(w.grad, want.grad.float())


# ---- in the gpt-oss model -------------------------------------------------------------

def _oss(**overrides):
    torch.manual_seed(0)
    cfg = GPTConfig.preset("gpt-oss-20b", vocab_size=97, context_length=64, n_embd=32, n_layer=2, n_head=4,
                           n_kv_head=2, head_width=8, n_experts=6, experts_per_token=2, expert_width=24,
                           sliding_window=4, **overrides)
    return GPT(cfg).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_and_grouped_moe_agree(kernels, monkeypatch, dtype):
    # A batch both ways: routed (expert_linear, no host sync) and grouped (GEMMs per expert).
    model = _oss().to(dtype)
    moe = model.model.layers[0].mlp
    x = torch.randn(2, 7, 32).to(dtype)
    with torch.no_grad():
        routed = moe(x)
        monkeypatch.setattr(MoE, "groups_on_host", classmethod(lambda cls, *args: True))
        grouped = moe(x)
    assert_close(routed.float(), grouped.float(), dtype, scale=2)


def test_routed_and_grouped_moe_train_alike(kernels, monkeypatch):
    # Training takes expert_linear (its backward groups the weight gradient by expert): the
    # gradients of every MoE parameter and of its input match the grouped GEMMs'.
    moe = _oss().model.layers[0].mlp.train()
    x = torch.randn(2, 40, 32)  # 160 routes: grouped inside expert_linear too
    grads = []
    for host in (False, True):
        monkeypatch.setattr(MoE, "groups_on_host", classmethod(lambda cls, *args: host))
        moe.zero_grad()
        leaf = x.clone().requires_grad_(True)
        (moe(leaf) * torch.linspace(-1, 1, 32)).sum().backward()
        grads.append([leaf.grad] + [p.grad.clone() for p in moe.parameters()])
    for routed, grouped in zip(*grads):
        assert_close(routed, grouped, scale=2)
    assert grads[0][0].abs().sum() > 0 and grads[0][-1].abs().sum() > 0


def test_routed_moe_reads_nothing_back(monkeypatch):
    # Under fake tensors a value read back to the host (.tolist(), int(), bool()) raises:
    # the decode step's MoE must not need one, which is what lets a CUDA graph capture it.
    moe = _oss().model.layers[1].mlp
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(4, 1, 32)
        assert moe(x).shape == (4, 1, 32)  # 8 routes: the routed path
        monkeypatch.setattr(MoE, "groups_on_host", classmethod(lambda cls, *args: True))
        # the grouped path sizes its groups from the routing (bincount, then .tolist())
        with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
            moe(x)


def test_prefill_moe_reads_nothing_back_on_the_kernels():
    # 160 routes: past ROUTED_MAX_ROUTES, yet on the compiled kernels expert_linear groups
    # them by expert itself, so the MoE still reads nothing back (the reference backend does).
    moe = _oss().model.layers[1].mlp
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(80, 1, 32)
        with gptext.backend("kernels"):
            assert moe(x).shape == (80, 1, 32)
        with gptext.backend("reference"), pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
            moe(x)


def test_generate_is_the_same_either_way(kernels, monkeypatch):
    # Greedy decode over the routed steps equals decode over grouped ones.
    model = _oss()
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    routed = model.generate(prompt, max_new_tokens=8, temperature=0)
    monkeypatch.setattr(MoE, "groups_on_host", classmethod(lambda cls, *args: True))
    assert torch.equal(model.generate(prompt, max_new_tokens=8, temperature=0), routed)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_graph_decode_of_gpt_oss(dtype):
    # head_dim 64 for the fused CUDA attention; the decode step captured with the routed MoE.
    torch.manual_seed(0)
    cfg = GPTConfig.preset("gpt-oss-20b", vocab_size=97, context_length=64, n_embd=64, n_layer=2, n_head=4,
                           n_kv_head=2, head_width=64, n_experts=6, experts_per_token=2, expert_width=32,
                           sliding_window=4)
    model = GPT(cfg).to("cuda", dtype).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    with gptext.backend("kernels"):
        graphed = model.generate(prompts, max_new_tokens=12, temperature=0, cuda_graph=True)
        eager = model.generate(prompts, max_new_tokens=12, temperature=0, cuda_graph=False)
    for a, b in zip(graphed, eager):
        assert torch.equal(a, b)
    # 80 routes a step: the kernels' grouped form, still graph-capturable; not the reference's.
    many = torch.randint(0, 97, (40, 3), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with gptext.backend("kernels"):
        graphed = model.generate(many, max_new_tokens=4, temperature=0, cuda_graph=True)
        assert torch.equal(graphed, model.generate(many, max_new_tokens=4, temperature=0, cuda_graph=False))
    with gptext.backend("reference"), pytest.raises(ValueError, match="routes"):
        model.generate(many, max_new_tokens=2, cuda_graph=True)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [2, 100])  # per route, and grouped by expert
def test_cuda_out_of_range_expert_gives_nan(tokens):
    x, w, b, chosen = _inputs(tokens, 1, 8, 16, torch.bfloat16, "cuda")
    chosen[1] = 9
    chosen[-1] = -1
    with gptext.backend("kernels"):
        y = gptext.ops.expert_linear(x, w, b, chosen)
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and torch.isnan(y[-1]).all()
        assert torch.isfinite(y[2:-1]).all()
