"""gptext.ops.cross_entropy, the fused classifier loss: against F.cross_entropy on float32
copies of the logits, forward and backward, over dtypes, shapes, reductions, ignored
targets; errors; the models' loss through it."""

import pytest
import torch
import torch.nn.functional as F

import gptext
from gptext import GPT, GPTConfig, ops, reference

from conftest import DEVICES, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["kernels", "reference"])
def backend(request):
    with gptext.backend(request.param):
        yield request.param


def _case(shape, dtype, device, seed=0, ignore=-1, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=g) * spread).to(dtype).to(device)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if targets.numel() > 2:
        targets.view(-1)[1] = ignore  # one ignored target
    return logits, targets.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (7, 97), (3, 4, 11), (33, 1000), (4, 50257)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_pytorch(backend, device, dtype, shape, reduction):
    logits, targets = _case(shape, dtype, device)
    leaf, ref_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = ops.cross_entropy(leaf, targets, ignore_index=-1, reduction=reduction)
    theirs = F.cross_entropy(ref_leaf.double().reshape(-1, shape[-1]), targets.reshape(-1), ignore_index=-1,
                             reduction=reduction)
    assert ours.dtype == torch.float32
    assert_close(ours, theirs.float().view(ours.shape), torch.float32, scale=20)  # fp32 math on the stored logits
    g = torch.rand(ours.shape, generator=torch.Generator().manual_seed(1)).to(device)
    ours.backward(g)
    theirs.backward(g.double().view(theirs.shape))
    assert leaf.grad.dtype == dtype
    assert_close(leaf.grad.float(), ref_leaf.grad.float(), dtype, scale=4)
    if targets.numel() > 2:  # the ignored row's gradient is exactly zero
        assert not leaf.grad.reshape(-1, shape[-1])[1].any()


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits(backend, device):
    logits = torch.tensor([[1e4, 1e4 - 1, -1e4], [0.0, float("-inf"), 2.0], [-3e38, 3e38, 0.0]], device=device)
    targets = torch.tensor([1, 2, 1], device=device)
    leaf = logits.clone().requires_grad_()
    loss = ops.cross_entropy(leaf, targets, reduction="none")
    expected = F.cross_entropy(logits.double(), targets, reduction="none").float()
    assert torch.isfinite(loss).all()
    assert_close(loss, expected)
    loss.sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad[1, 1] == 0  # a -inf logit has no probability


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [7, 97, 50257])
def test_nan_logits_give_nan(backend, device, dtype, cols):
    """A NaN logit makes its row's loss and gradient NaN wherever it sits (mid-row, the last
    column, every column), as F.cross_entropy does, so a diverged run cannot look finite;
    an ignored row stays 0 and the other rows are untouched."""
    logits, targets = _case((6, cols), dtype, device)
    targets[1] = 0
    logits[0, cols // 2] = float("nan")
    logits[1, -1] = float("nan")
    logits[2] = float("nan")
    logits[3] = float("-inf")
    logits[3, 1] = float("nan")
    logits[4, -1] = float("nan")
    targets[4] = -1  # ignored
    leaf = logits.clone().requires_grad_()
    loss = ops.cross_entropy(leaf, targets, ignore_index=-1, reduction="none")
    assert torch.isnan(loss[:4]).all() and loss[4] == 0 and torch.isfinite(loss[5])
    loss.sum().backward()
    grad = leaf.grad.float()
    assert torch.isnan(grad[:4]).all() and (grad[4] == 0).all() and torch.isfinite(grad[5]).all()
    assert ops.cross_entropy(logits, targets, ignore_index=-1).isnan()


@pytest.mark.parametrize("device", DEVICES)
def test_strided_empty_and_all_ignored(backend, device):
    base, targets = _case((6, 40), torch.float32, device)
    view = base.t().contiguous().t()[::2]  # column-major rows, every other one
    assert not view.is_contiguous()
    assert_close(ops.cross_entropy(view, targets[::2]), F.cross_entropy(view, targets[::2], ignore_index=-100))
    empty = torch.zeros(0, 10, device=device)
    none = torch.zeros(0, dtype=torch.long, device=device)
    assert ops.cross_entropy(empty, none, reduction="none").shape == (0,)
    assert float(ops.cross_entropy(empty, none, reduction="sum")) == 0.0
    assert ops.cross_entropy(empty, none).isnan()  # as F.cross_entropy: no target to average over
    ignored = torch.full((6,), -1, device=device)
    assert ops.cross_entropy(base, ignored, ignore_index=-1).isnan()
    assert float(ops.cross_entropy(base, ignored, ignore_index=-1, reduction="sum")) == 0.0


def test_errors():
    logits, targets = _case((4, 10), torch.float32, "cpu", ignore=-100)
    cases = [
        ((logits.long(), targets), TypeError, "logits must be a floating-point tensor"),
        ((logits, targets.float()), TypeError, "targets must be an int64 or int32 tensor"),
        ((logits, targets[:3]), ValueError, r"targets has shape \(3,\); expected \(4,\)"),
        ((torch.zeros(4, 0), targets), ValueError, "non-empty last"),
        ((logits, torch.tensor([0, 1, 10, 2])), IndexError, r"targets holds 10, outside \[0, 10\)"),
        ((logits, torch.tensor([0, 1, -5, 2])), IndexError, "targets holds -5"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            ops.cross_entropy(*args)
    with pytest.raises(ValueError, match="reduction must be"):
        ops.cross_entropy(logits, targets, reduction="avg")
    assert ops.cross_entropy(logits, targets.int()).dtype == torch.float32  # int32 targets are taken


@pytest.mark.cuda
def test_out_of_range_targets_give_nan_on_cuda(backend):
    logits = torch.randn(3, 10, device="cuda")
    loss = ops.cross_entropy(logits, torch.tensor([0, 12, 3], device="cuda"), reduction="none")
    assert loss[1].isnan() and torch.isfinite(loss[[0, 2]]).all()


def test_reference_matches_pytorch():
    logits, targets = _case((9, 31), torch.float32, "cpu")
    loss, lse = reference.cross_entropy(logits, targets, -1)
    assert_close(lse, torch.logsumexp(logits, -1))
    assert_close(loss, F.cross_entropy(logits, targets, ignore_index=-1, reduction="none"))
    grad = reference.cross_entropy_backward(torch.ones(9), logits, targets, lse, -1)
    leaf = logits.clone().requires_grad_()
    F.cross_entropy(leaf, targets, ignore_index=-1, reduction="sum").backward()
    assert_close(grad, leaf.grad)


@pytest.mark.parametrize("arch", ["gpt2", "gpt-oss"])
def test_the_models_loss_is_pytorchs(arch):
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT(GPTConfig(vocab_size=101, context_length=16, n_embd=32, n_layer=1, n_head=2))
    else:
        model = GPT(GPTConfig.preset("gpt-oss-20b", vocab_size=101, context_length=16, n_embd=32, n_layer=1, n_head=4,
                                     n_kv_head=2, head_width=8, n_experts=4, experts_per_token=2, expert_width=16,
                                     sliding_window=4))
    idx = torch.randint(0, 101, (3, 16))
    targets = torch.randint(0, 101, (3, 16))
    targets[0, :5] = -1
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits.double().view(-1, 101), targets.view(-1), ignore_index=-1)
    assert_close(loss, expected.float(), scale=10)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
