"""gptext.ops.linear_cross_entropy, a language model's head and loss fused without the
logits: against F.cross_entropy(F.linear(...)) in float64, forward and backward, over dtypes,
chunkings, biases, ignored targets; the gradient's error against eager autograd's; errors;
autocast; GPT.loss."""

import pytest
import torch
import torch.nn.functional as F

import gptext
from gptext import GPT, GPTConfig, ops

from conftest import DEVICES, assert_close


@pytest.fixture(params=["kernels", "reference"])
def backend(request):
    with gptext.backend(request.param):
        yield request.param


def _case(shape, features, classes, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, features, generator=g).to(dtype)
    weight = (torch.randn(classes, features, generator=g) * features ** -0.5).to(dtype)
    b = (torch.randn(classes, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, classes, shape, generator=g)
    targets.view(-1)[1] = -1  # one ignored target
    return x, weight, b, targets


def _grads(loss_fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def _exact(x, weight, b, targets, reduction):
    wide = [t.double() if t is not None else None for t in (x, weight, b)]
    return _grads(lambda x, w, b: F.cross_entropy(F.linear(x, w, b).flatten(0, -2), targets.reshape(-1),
                                                  ignore_index=-1, reduction=reduction), *wide)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, features, classes, chunk", [((37,), 24, 50, 8), ((3, 11), 32, 257, None),
                                                            ((2, 70), 16, 1000, 64), ((5,), 8, 3, 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_pytorch(backend, device, dtype, shape, features, classes, chunk, reduction, bias):
    x, weight, b, targets = (t.to(device) if t is not None else None
                             for t in _case(shape, features, classes, dtype, bias))
    loss, grads = _grads(lambda x, w, b: ops.linear_cross_entropy(x, w, targets, b, ignore_index=-1,
                                                                  reduction=reduction, chunk_rows=chunk), x, weight, b)
    exact, exact_grads = _exact(x, weight, b, targets, reduction)
    # The unfused op in the same dtype: its error against float64 bounds ours.
    _, eager = _grads(lambda x, w, b: ops.cross_entropy(ops.linear(x, w, b), targets, ignore_index=-1,
                                                        reduction=reduction), x, weight, b)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, exact.float(), dtype, scale=4)
    for name, ours, theirs, want in zip(("x", "weight", "bias"), grads, eager, exact_grads):
        if want is None:
            continue
        assert ours.dtype == dtype and ours.shape == want.shape, name
        err = (ours.double() - want).abs().max()
        base = (theirs.double() - want).abs().max()
        # The weight's gradient is summed over chunks: in 16 bits on a CPU, a rounding a chunk.
        chunks = -(-targets.numel() // (chunk or targets.numel()))
        slack = 1.1 if dtype == torch.float32 or name != "weight" else 1.1 + 0.5 * chunks ** 0.5
        assert err <= slack * base + 1e-6 * want.abs().max(), (name, float(err), float(base))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_weight_sum(monkeypatch, dtype):
    """The float32 sum of a 16-bit weight gradient (what a GPU takes) matches the unchunked
    product's error."""
    monkeypatch.setattr(ops, "_wide_weight_sum", lambda x: True)
    x, weight, b, targets = _case((64,), 32, 300, dtype)
    _, (_, dweight, _) = _grads(lambda x, w, b: ops.linear_cross_entropy(x, w, targets, b, ignore_index=-1,
                                                                         chunk_rows=8), x, weight, b)
    _, (_, eager, _) = _grads(lambda x, w, b: ops.cross_entropy(ops.linear(x, w, b), targets, ignore_index=-1),
                              x, weight, b)
    _, (_, want, _) = _exact(x, weight, b, targets, "mean")
    assert (dweight.double() - want).abs().max() <= 1.5 * (eager.double() - want).abs().max()


def test_without_gradients_and_edges(backend):
    x, weight, b, targets = _case((40,), 16, 90, torch.float32)
    with_grad = ops.linear_cross_entropy(x.clone().requires_grad_(), weight, targets, b, ignore_index=-1, chunk_rows=7)
    with torch.no_grad():
        without = ops.linear_cross_entropy(x, weight, targets, b, ignore_index=-1, chunk_rows=7)
    assert torch.equal(with_grad.detach(), without)
    ignored = torch.full_like(targets, -1)
    assert ops.linear_cross_entropy(x, weight, ignored, b, ignore_index=-1).isnan()  # nothing to average
    assert float(ops.linear_cross_entropy(x, weight, ignored, b, ignore_index=-1, reduction="sum")) == 0.0
    empty = ops.linear_cross_entropy(x[:0], weight, targets[:0], b, reduction="sum")
    assert float(empty) == 0.0
    # A strided x (every other row of a wider tensor) gives the contiguous result.
    wide = torch.randn(80, 16)
    assert_close(ops.linear_cross_entropy(wide[::2], weight, targets, b, ignore_index=-1),
                 ops.linear_cross_entropy(wide[::2].contiguous(), weight, targets, b, ignore_index=-1))


def test_errors():
    x, weight, b, targets = _case((6,), 8, 10, torch.float32)
    cases = [
        (dict(reduction="none"), ValueError, "reduction must be 'mean' or 'sum'"),
        (dict(chunk_rows=0), ValueError, "chunk_rows must be a positive int"),
        (dict(targets=targets.float()), TypeError, "targets must be an int64 or int32 tensor"),
        (dict(targets=targets[:5]), ValueError, "targets has shape"),
        (dict(targets=torch.where(targets == 3, 10, targets).index_fill(0, torch.tensor([0]), 10)), IndexError,
         "targets holds 10"),
        (dict(weight=weight[:, :7]), ValueError, "weight"),
    ]
    for change, error, match in cases:
        args = dict(x=x, weight=weight, targets=targets, bias=b, ignore_index=-1) | change
        with pytest.raises(error, match=match):
            ops.linear_cross_entropy(**args)


def test_under_autocast():
    """In a bf16 region the products run in bf16 with float32 weights, as the unfused ops do."""
    x, weight, b, targets = _case((48,), 32, 200, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _grads(lambda x, w, b: ops.linear_cross_entropy(x, w, targets, b, ignore_index=-1,
                                                                      chunk_rows=16), x, weight, b)
        eager, eager_grads = _grads(lambda x, w, b: ops.cross_entropy(ops.linear(x, w, b), targets, ignore_index=-1),
                                    x, weight, b)
    assert all(g.dtype == torch.float32 for g in grads)
    assert_close(loss, eager, torch.bfloat16)
    for ours, theirs in zip(grads, eager_grads):
        assert_close(ours, theirs, torch.bfloat16, scale=4)


@pytest.mark.parametrize("arch", ["gpt2", "gpt-oss"])
def test_model_loss(arch):
    """GPT.loss is model(idx, targets)'s loss, gradients included, and keeps no tensor of the
    logits' size for its backward pass."""
    if arch == "gpt2":
        cfg = GPTConfig(n_embd=32, n_head=2, n_layer=2, vocab_size=500, context_length=32)
    else:
        cfg = GPTConfig.preset("gpt-oss-20b", vocab_size=500, context_length=32, n_embd=32, n_layer=2, n_head=4,
                               n_kv_head=2, head_width=8, n_experts=4, experts_per_token=2, expert_width=16,
                               sliding_window=8)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx, targets = torch.randint(0, 500, (2, 30)), torch.randint(0, 500, (2, 30))
    targets[0, :5] = -1
    _, loss = model(idx, targets)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    largest = []

    def pack(t):
        largest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused = model.loss(idx, targets)
    fused.backward()
    assert_close(fused, loss.detach(), scale=4)
    for name, p in model.named_parameters():
        assert_close(p.grad, expected[name], scale=20, msg=name)
    assert max(largest) < idx.numel() * cfg.vocab_size
    with pytest.raises(ValueError, match="targets has shape"):
        model.loss(idx, targets[:, :-1])


def test_only_the_gradients_asked_for():
    """A frozen weight (or a constant x) gets no gradient, and the others are unchanged."""
    x, weight, b, targets = _case((30,), 16, 70, torch.float32)
    _, (dx, dweight, dbias) = _grads(lambda x, w, b: ops.linear_cross_entropy(x, w, targets, b, ignore_index=-1,
                                                                              chunk_rows=8), x, weight, b)
    leaf = x.clone().requires_grad_()
    ops.linear_cross_entropy(leaf, weight, targets, b, ignore_index=-1, chunk_rows=8).backward()
    assert torch.equal(leaf.grad, dx)
    w_leaf, b_leaf = weight.clone().requires_grad_(), b.clone().requires_grad_()
    ops.linear_cross_entropy(x, w_leaf, targets, b_leaf, ignore_index=-1, chunk_rows=8).backward()
    assert torch.equal(w_leaf.grad, dweight) and torch.equal(b_leaf.grad, dbias)
