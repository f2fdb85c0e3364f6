"""torch.library.opcheck on every compiled op: schema, fake (meta) implementation, autograd
registration and AOT dispatch agree with the real implementation."""

import pytest
import torch

from conftest import DEVICES

OPS = torch.ops.gptext


def _samples(device):
    def t(*shape, grad=False, dtype=torch.float32):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    samples = [
        (OPS.softmax, (t(4, 7, grad=True),), {}),
        (OPS.softmax, (t(2, 3, 5, 9, grad=True), -1, 0.125, True, 3), {}),
        (OPS.softmax, (t(6, 5, grad=True), 0, 2.0, False, 0), {}),
        (OPS.softmax, (t(6, 5, dtype=torch.bfloat16),), {}),
        (OPS.cross_entropy, (t(5, 11, grad=True), torch.tensor([3, 0, -1, 10, 4], device=device), -1), {}),
        (OPS.cross_entropy, (t(4, 9, dtype=torch.bfloat16, grad=True), torch.tensor([1, 8, 0, 2], device=device)), {}),
        (OPS.cross_entropy_backward, (t(3), t(3, 7), torch.tensor([6, -1, 0], device=device), t(3), -1), {}),
        (OPS.layernorm, (t(3, 16, grad=True), t(16, grad=True), t(16, grad=True), 1e-5), {}),
        (OPS.layernorm, (t(2, 3, 8), t(8), None, 1e-5), {}),
        (OPS.layernorm_residual, (t(3, 16, grad=True), t(3, 16, grad=True), t(16, grad=True), t(16, grad=True), 1e-5),
         {}),
        (OPS.layernorm_residual, (t(2, 3, 8, dtype=torch.bfloat16), t(2, 3, 8, dtype=torch.bfloat16),
                                  t(8, dtype=torch.bfloat16), None, 1e-5), {}),
        (OPS.rmsnorm, (t(3, 16, grad=True), t(16, grad=True), 1e-5), {}),
        (OPS.rmsnorm, (t(2, 3, 8, dtype=torch.bfloat16), t(8, dtype=torch.bfloat16), 1e-6), {}),
        (OPS.rmsnorm_residual, (t(3, 16, grad=True), t(3, 16, grad=True), t(16, grad=True), 1e-5), {}),
        (OPS.linear, (t(5, 12, grad=True), t(7, 12, grad=True), t(7, grad=True), "gelu", t(5, 7, grad=True)), {}),
        (OPS.linear, (t(2, 3, 12, grad=True), t(7, 12, grad=True)), {}),
        (OPS.linear, (t(4, 8, grad=True), t(6, 8, grad=True), None, "relu", None), {}),
        (OPS.ffn, (t(5, 8, grad=True), t(32, 8, grad=True), t(32, grad=True), t(8, 32, grad=True), t(8, grad=True),
                   t(5, 8, grad=True)), {}),
        (OPS.ffn, (t(2, 3, 8), t(32, 8), None, t(8, 32), None), {}),
        (OPS.rope, (t(2, 3, 5, 8, grad=True), t(2, 5, 4), t(2, 5, 4)), {}),
        (OPS.rope, (t(1, 2, 5, 4, dtype=torch.bfloat16).transpose(1, 2), t(1, 2, 2), t(1, 2, 2)), {}),
        (OPS.expert_linear, (t(3, 8, grad=True), t(4, 6, 8, grad=True), t(4, 6, grad=True),
                             torch.tensor([[0, 3], [2, 2], [1, 0]], device=device)), {}),
        (OPS.expert_linear, (t(3, 2, 8, grad=True), t(4, 6, 8, grad=True), None,
                             torch.tensor([[0, 3], [2, 2], [1, 0]], device=device, dtype=torch.int32), "swiglu", 1.5),
         {}),
        (OPS.expert_linear, (t(2, 8, dtype=torch.bfloat16), t(3, 6, 8, dtype=torch.bfloat16),
                             t(3, 6, dtype=torch.bfloat16), torch.tensor([[2], [0]], device=device), "swiglu", 7.0), {}),
    ]
    # Attention needs the CUDA kernels' dtypes and head sizes there (fp32 CUDA runs the reference).
    adtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = t(2, 4, 5, 64, grad=True, dtype=adtype), t(2, 2, 7, 64, grad=True, dtype=adtype), \
        t(2, 2, 7, 64, grad=True, dtype=adtype)
    lens = torch.tensor([7, 4], device=device)
    samples += [
        (OPS.attention, (q, k, v, True, 0, None, 0.125), {}),
        (OPS.attention, (q, k, v, True, 3, t(4, grad=True), 0.125, torch.tensor([1, 0], device=device), lens), {}),
        (OPS.attention, (q, k, v, False, 0, None, 0.2), {}),
    ]
    out, lse = OPS.attention(q.detach(), k.detach(), v.detach(), True, 0, None, 0.125)
    samples.append((OPS.attention_backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, True,
                                             0, None, 0.125, None, None), {}))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args, kwargs in _samples(device):
        torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    """The ops trace under torch.compile (fake implementations) and give the eager answer."""
    import gptext

    def block(x, r, w, b, w_fc, b_fc, w_proj, b_proj):
        normed, total = gptext.ops.layernorm_residual(x, r, w, b)
        scores = gptext.ops.softmax(normed @ normed.transpose(-1, -2), causal=True)
        return gptext.ops.ffn(scores @ normed, w_fc, b_fc, w_proj, b_proj, residual=total)

    args = [torch.randn(*s, device=device) for s in [(2, 6, 16), (2, 6, 16), (16,), (16,), (64, 16), (64,), (16, 64),
                                                      (16,)]]
    eager = block(*args)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager)
