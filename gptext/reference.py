"""Pure-PyTorch reference of every gptext op.

These functions are the fallback wherever the compiled kernels can't run, and the oracle
the tests compare the kernels with. They are written to be read: each computes in fp32 (or
wider, for float64 inputs) and rounds to the input dtype once, at the end, which is the
numerics the kernels promise. Signatures match `gptext.ops`.

The `*_backward` functions are the gradient formulas the compiled ops' autograd uses.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attention",
    "attention_mask",
    "cross_entropy",
    "cross_entropy_backward",
    "expert_linear",
    "ffn",
    "gelu_tanh",
    "gelu_tanh_grad",
    "layernorm",
    "layernorm_backward",
    "layernorm_residual",
    "layernorm_stats",
    "linear",
    "linear_backward",
    "rmsnorm",
    "rmsnorm_backward",
    "rmsnorm_residual",
    "rmsnorm_stats",
    "rope",
    "softmax",
    "softmax_backward",
    "swiglu",
]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or kept as is when it is already wider (float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, the tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d gelu_tanh(x) / dx."""
    inner = _SQRT_2_OVER_PI * (x + 0.044715 * x**3)
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


_ACTIVATIONS = {None: lambda v: v, "none": lambda v: v, "gelu": gelu_tanh, "relu": torch.relu}


def attention_mask(q_len: int, k_len: int, causal: bool = True, window: int | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where query i may attend to key j.

    Queries are aligned to the end of the keys: query i sits at position k_len - q_len + i.
    Causal: keys at or before that position. window: only the last `window` of those.
    """
    if not causal:
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    key = torch.arange(k_len, device=device)[None, :]
    mask = key <= pos
    if window:
        mask &= key > pos - window
    return mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int | None = None,
              sinks: torch.Tensor | None = None, scale: float | None = None, *,
              kv_starts: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale q k^T + mask) v with every score materialised.

    q (B, H, Tq, D); k, v (B, Hkv, Tk, D), query head h reading key/value head
    h // (H / Hkv). For batch b, keys [kv_starts[b], kv_lens[b]) exist (default: all Tk);
    queries are aligned to the end of them (query i sits at position kv_lens[b] - Tq + i).
    `sinks` (H,) are logits that join each row's softmax denominator and carry no value.
    A row with nothing to attend to (and no sink) is zero.
    """
    B, H, Tq, D = q.shape
    Tk, group = k.shape[2], H // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    starts = torch.zeros(B, dtype=torch.long, device=q.device) if kv_starts is None else kv_starts.long()
    lens = torch.full((B,), Tk, dtype=torch.long, device=q.device) if kv_lens is None else kv_lens.long()
    lens = lens.clamp(0, Tk)
    starts = torch.minimum(starts.clamp(min=0), lens)
    key = torch.arange(Tk, device=q.device)[None, None, :]
    held = (key >= starts[:, None, None]) & (key < lens[:, None, None])  # (B, 1, Tk)
    # Keys a batch does not hold are never read (zeros in their place): whatever a cache
    # holds there cannot reach an output or a gradient, even as 0 * NaN.
    keys = _wide(k).masked_fill(~held[..., None], 0.0).repeat_interleave(group, dim=1)
    values = _wide(v).masked_fill(~held[..., None], 0.0).repeat_interleave(group, dim=1)
    scores = (_wide(q) @ keys.transpose(-2, -1)) * scale
    pos = (lens[:, None] - Tq + torch.arange(Tq, device=q.device)[None, :])[:, :, None]  # (B, Tq, 1)
    visible = held.expand(B, Tq, Tk)
    if causal:
        visible = visible & (key <= pos)
        if window:
            visible = visible & (key > pos - window)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, _wide(sinks).view(1, H, 1, 1).expand(B, H, Tq, 1)], dim=-1)
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    e = torch.exp(scores - row_max)
    total = e.sum(-1, keepdim=True)
    # total == 0 for a row with nothing to attend to: divided by 1 instead, so that its
    # gradient (through a sink of -inf too) is 0, not 0 / 0.
    probs = torch.where(total == 0, torch.zeros_like(e), e / torch.where(total == 0, torch.ones_like(total), total))
    return (probs[..., :Tk] @ values).to(q.dtype)


def softmax(x: torch.Tensor, dim: int = -1, *, scale: float | None = None, causal: bool = False,
            window: int | None = None) -> torch.Tensor:
    """softmax(scale * x) along `dim`; with causal, x holds attention scores (..., q_len, k_len)
    and masked keys get probability 0. A row with no visible key is all zeros (not NaN)."""
    scores = _wide(x) * (1.0 if scale is None else scale)
    mask = attention_mask(x.shape[-2], x.shape[-1], True, window, x.device) if causal else None
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    e = torch.exp(scores - row_max)
    total = e.sum(dim, keepdim=True)
    # total == 0 only when every key is masked; a NaN total (NaN input) still propagates, to
    # the visible keys only: a masked key's probability is 0 whatever its row holds.
    probs = torch.where(total == 0, torch.zeros_like(e), e / total)
    if mask is not None:
        probs = probs.masked_fill(~mask, 0.0)
    return probs.to(x.dtype)


def softmax_backward(grad: torch.Tensor, probs: torch.Tensor, dim: int, scale: float) -> torch.Tensor:
    """Gradient of softmax(scale * x) w.r.t. x, from the output probabilities."""
    g, p = _wide(grad), _wide(probs)
    return (scale * p * (g - (g * p).sum(dim, keepdim=True))).to(probs.dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """Per row of logits (rows, classes) against targets (rows,): (loss, lse), both fp32 (rows,):
    lse the log-sum-exp of the row, loss = lse - logits[target]; 0 for a row whose target is
    ignore_index, NaN for a target outside [0, classes) (read on the device, never checked
    on the host)."""
    wide = _wide(logits)
    lse = torch.logsumexp(wide, dim=-1)
    inside = (targets >= 0) & (targets < logits.shape[-1])
    # An ignored row's logits are left out of the graph, so that its gradient is exactly 0
    # even where they hold a NaN (which log_softmax's backward would spread over the row).
    ignored = (targets == ignore_index)[:, None]
    kept = torch.where(ignored, torch.zeros_like(wide), wide)
    picked = torch.log_softmax(kept, -1).gather(-1, targets.clamp(0, max(logits.shape[-1] - 1, 0))[:, None])[:, 0]
    loss = torch.where(inside, -picked, torch.full_like(lse, float("nan")))
    loss = torch.where(targets == ignore_index, torch.zeros_like(lse), loss)
    return loss.float(), lse.float()


def cross_entropy_backward(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                           ignore_index: int = -100) -> torch.Tensor:
    """Gradient of cross_entropy's per-row loss: (softmax(logits) - onehot(target)) * grad[row],
    from the saved log-sum-exp, in logits' dtype; zeros for an ignored (or out-of-range) row."""
    wide = _wide(logits)
    p = torch.exp(wide - lse[:, None].to(wide.dtype))
    valid = (targets != ignore_index) & (targets >= 0) & (targets < logits.shape[-1])
    p = p - torch.nn.functional.one_hot(targets.clamp(0, max(logits.shape[-1] - 1, 0)), logits.shape[-1]).to(p.dtype)
    p = p * torch.where(valid, grad.to(p.dtype), torch.zeros_like(grad, dtype=p.dtype))[:, None]
    return torch.where(valid[:, None], p, torch.zeros_like(p)).to(logits.dtype)


def layernorm_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and 1/sqrt(biased variance + eps) over the last dimension, in fp32."""
    v = _wide(x)
    mean = v.mean(-1)
    var = ((v - mean[..., None]) ** 2).mean(-1)
    return mean, torch.rsqrt(var + eps)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension with fp32 statistics."""
    mean, rstd = layernorm_stats(x, eps)
    out = (_wide(x) - mean[..., None]) * rstd[..., None] * _wide(weight)
    if bias is not None:
        out = out + _wide(bias)
    return out.to(x.dtype)


def layernorm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(layernorm(x + residual), x + residual). The sum is rounded to x's dtype first, so the
    norm is exactly that of the sum returned."""
    total = (_wide(x) + _wide(residual)).to(x.dtype)
    return layernorm(total, weight, bias, eps), total


def layernorm_backward(grad: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                       rstd: torch.Tensor, has_bias: bool):
    """Gradients of layernorm(v) w.r.t. v, weight and bias, from the saved statistics."""
    g, w = _wide(grad), _wide(weight)
    xhat = (_wide(v) - mean[..., None]) * rstd[..., None]
    dxhat = g * w
    dv = rstd[..., None] * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    rows = g.reshape(-1, g.shape[-1])
    dweight = (rows * xhat.reshape(rows.shape)).sum(0).to(weight.dtype)
    dbias = rows.sum(0).to(weight.dtype) if has_bias else None
    return dv.to(v.dtype), dweight, dbias


def rmsnorm_stats(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-row 1/sqrt(mean of squares + eps) over the last dimension, in fp32."""
    v = _wide(x)
    return torch.rsqrt((v * v).mean(-1) + eps)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dimension (gpt-oss, T5): x / rms(x) * weight, fp32 statistics."""
    return (_wide(x) * rmsnorm_stats(x, eps)[..., None] * _wide(weight)).to(x.dtype)


def rmsnorm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual), the sum rounded to x's dtype first."""
    total = (_wide(x) + _wide(residual)).to(x.dtype)
    return rmsnorm(total, weight, eps), total


def rmsnorm_backward(grad: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Gradients of rmsnorm(v) w.r.t. v and weight, from the saved 1/rms."""
    g = _wide(grad)
    xhat = _wide(v) * rstd[..., None]
    dxhat = g * _wide(weight)
    dv = rstd[..., None] * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    rows = g.reshape(-1, g.shape[-1])
    dweight = (rows * xhat.reshape(rows.shape)).sum(0).to(weight.dtype)
    return dv.to(v.dtype), dweight


def _activation(name: str | None):
    if name not in _ACTIVATIONS:
        raise ValueError(f"gptext.ops.linear: activation must be None, 'none', 'gelu' or 'relu', got {name!r}")
    return _ACTIVATIONS[name]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(x @ weight.T + bias) + residual, weight stored [out_features, in_features]."""
    y = _wide(x) @ _wide(weight).T
    if bias is not None:
        y = y + _wide(bias)
    y = _activation(activation)(y)
    if residual is not None:
        y = y + _wide(residual)
    return y.to(x.dtype)


def linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    activation: str | None):
    """Gradients of linear(x, weight, bias, activation, residual) w.r.t. x, weight and bias
    (the residual's gradient is `grad` itself). Recomputes the pre-activation if needed."""
    g = _wide(grad)
    if activation in ("gelu", "relu"):
        pre = _wide(x) @ _wide(weight).T
        if bias is not None:
            pre = pre + _wide(bias)
        g = g * (gelu_tanh_grad(pre) if activation == "gelu" else (pre > 0).to(g.dtype))
    rows_g = g.reshape(-1, g.shape[-1])
    rows_x = _wide(x).reshape(-1, x.shape[-1])
    dx = (g @ _wide(weight)).to(x.dtype)
    dweight = (rows_g.T @ rows_x).to(weight.dtype)
    dbias = rows_g.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


def ffn(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None, w_proj: torch.Tensor,
        b_proj: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """GPT-2's MLP: linear(gelu(linear(x, w_fc, b_fc)), w_proj, b_proj) (+ residual). The hidden
    activation is rounded to x's dtype between the two products, as the kernels store it."""
    hidden = linear(x, w_fc, b_fc, "gelu")
    return linear(hidden, w_proj, b_proj, residual=residual)


# gpt-oss's SwiGLU: the sigmoid's slope.
SWIGLU_ALPHA = 1.702


def swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on h (..., 2 * width) whose columns alternate gate, linear:
    gate * sigmoid(1.702 * gate) * (linear + 1), the gate clamped above at limit and the
    linear half to [-limit, limit]."""
    gate = _wide(h[..., 0::2]).clamp(max=limit)
    linear_half = _wide(h[..., 1::2]).clamp(-limit, limit)
    return (gate * torch.sigmoid(SWIGLU_ALPHA * gate) * (linear_half + 1)).to(h.dtype)


def expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, experts: torch.Tensor,
                  activation: str | None = None, limit: float = 7.0) -> torch.Tensor:
    """A mixture of experts' linear layer for each route (token t's choice s): out[t, s] =
    linear(x[t] (or x[t, s] for a 3-d x), weight[experts[t, s]], bias[experts[t, s]]),
    rounded to x's dtype, then with activation 'swiglu' the gpt-oss SwiGLU of its column
    pairs. One route at a time, each expert's matrix picked on the device (no index is read
    back to the host)."""
    tokens, slots = experts.shape
    rows = x if x.dim() == 3 else x[:, None, :].expand(tokens, slots, x.shape[-1])
    rows, chosen = rows.reshape(tokens * slots, x.shape[-1]), experts.reshape(-1).long()
    outputs = []
    for r in range(rows.shape[0]):
        e = chosen[r:r + 1]
        b = bias.index_select(0, e)[0] if bias is not None else None
        outputs.append(linear(rows[r:r + 1], weight.index_select(0, e)[0], b))
    h = torch.cat(outputs) if outputs else x.new_empty((0, weight.shape[1]))
    if activation == "swiglu":
        h = swiglu(h, limit)
    return h.view(tokens, slots, h.shape[-1])


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B, H, T, D): each head's first and second halves form the pairs (x1, x2),
    rotated by the angles whose cos and sin (B, T, D / 2) are given (gpt-oss's layout, not
    interleaved pairs): (x1 cos - x2 sin, x2 cos + x1 sin), in fp32, rounded once."""
    x1, x2 = _wide(x).chunk(2, dim=-1)
    cos, sin = _wide(cos)[:, None], _wide(sin)[:, None]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
