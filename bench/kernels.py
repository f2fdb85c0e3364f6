"""The kernel section: for each case, every competitor's implementation of the op, the
correctness gate, and the timings.

Competitors (all fed the same inputs):
  gptext         gptext's compiled kernels (backend "kernels", the GEMM policy as set)
  gptext-wmma    CUDA linear only: the policy pinned to gptext's WMMA kernel
  gptext-cublas  CUDA linear only: the policy pinned to cuBLAS + gptext's epilogue
  torch.matmul   CUDA linear only: the bare cuBLAS product x @ W.T, no epilogue: the
                 floor of any cuBLAS-based linear (not the same computation, so unchecked)
  eager          the same computation in eager PyTorch
  compile        torch.compile of that eager function (fresh per case, static shapes)
  gptext-unfused attention only: gptext's path before fused attention (scores = q k^T,
                 gptext's causal softmax, then @ v); timed but not gated
  reference      gptext's pure-PyTorch reference (gptext.reference)

For attention the eager competitor is F.scaled_dot_product_attention (on CUDA its flash
backend where it applies), and attention_bwd times the backward pass alone.

Every gptext implementation is run once and compared with the reference's output before
it is timed; a mismatch makes it WRONG, it is not timed, and no speed-up is claimed for
the case.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import gptext
from gptext import ops, profiling, reference

from . import metrics, results
from .plan import EPILOGUES, Case, Timing

LN_EPS = 1e-5


@dataclass(frozen=True)
class OpSpec:
    """How to make one op's inputs, its three implementations, and its cost.

    bound(case): "memory" or "compute", the limit the op is measured against;
    inputs(case, randn) -> tuple of tensors (None for absent optional ones);
    functions(case) -> (gptext, eager, reference), each called with those inputs;
    cost(case) -> (FLOPs, bytes): the bytes the op must move at least, each input read
    once and each output written once; gemm_k(case): K of its GEMMs (None: not a GEMM);
    widen: a factor on the dtype's tolerance, for ops whose result compounds roundings;
    row_rms: atol scales with each output row's RMS (see metrics.error_ratio).
    """

    bound: Callable
    inputs: Callable
    functions: Callable
    cost: Callable
    gemm_k: Callable = lambda case: None
    widen: float = 1.0
    row_rms: bool = False

    def tolerance(self, case) -> tuple[float, float]:
        rtol, atol = metrics.tolerance(case.dtype, self.gemm_k(case))
        return rtol * self.widen, atol * self.widen


def _itemsize(case: Case) -> int:
    return metrics.DTYPES[case.dtype].itemsize


def _softmax_functions(case):
    return (lambda x: ops.softmax(x), lambda x: torch.softmax(x, -1), lambda x: reference.softmax(x))


# cross_entropy: the classifier's loss in training, forward and backward together (the
# loss and the logits' gradient), shape (rows, vocabulary). Eager takes F.cross_entropy of
# a float32 copy of the logits, as a model computing its loss in float32 does.
def _cross_entropy_inputs(case, randn):
    rows, vocab = case.shape
    logits = randn((rows, vocab), 2.0)
    g = torch.Generator().manual_seed(rows)
    return logits, torch.randint(0, vocab, (rows,), generator=g).to(logits.device)


def _trained(loss_fn):
    """A loss's forward and backward as one call: (*tensors, targets) -> (loss, the gradient
    of each tensor)."""
    def call(*inputs):
        *tensors, targets = inputs
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in tensors]
            loss = loss_fn(*leaves, targets)
            grads = torch.autograd.grad(loss, leaves)
        return (loss.detach(), *grads)
    return call


def _cross_entropy_functions(case):
    def reference_loss(logits, targets):
        loss, _ = reference.cross_entropy(logits, targets)
        return loss.mean()

    return (_trained(lambda x, t: ops.cross_entropy(x, t)), _trained(lambda x, t: F.cross_entropy(x.float(), t)),
            _trained(reference_loss))


def _cross_entropy_cost(case):
    rows, vocab = case.shape
    # The logits read by the forward and again by the backward, their gradient written.
    return 6.0 * rows * vocab, float(3 * rows * vocab * _itemsize(case) + 8 * rows)


# linear_cross_entropy: a language model's head and loss in training, forward and backward
# together (the loss and the gradients of x and of the weight), shape (rows, K, vocabulary).
# Eager: F.linear, then F.cross_entropy of the logits in float32.
def _linear_cross_entropy_inputs(case, randn):
    rows, k, vocab = case.shape
    g = torch.Generator().manual_seed(rows)
    x = randn((rows, k))
    return x, randn((vocab, k), k ** -0.5), torch.randint(0, vocab, (rows,), generator=g).to(x.device)


def _linear_cross_entropy_functions(case):
    return (_trained(lambda x, w, t: ops.linear_cross_entropy(x, w, t)),
            _trained(lambda x, w, t: F.cross_entropy(F.linear(x, w).float(), t)),
            _trained(lambda x, w, t: reference.cross_entropy(reference.linear(x, w), t)[0].mean()))


def _linear_cross_entropy_cost(case):
    rows, k, vocab = case.shape
    # Three GEMMs (the logits, x's and the weight's gradients); x and the weight read, their
    # gradients written.
    return 6.0 * rows * k * vocab, float(2 * (rows * k + vocab * k) * _itemsize(case) + 8 * rows)


def _layernorm_residual_inputs(case, randn):
    cols = case.shape[-1]
    return randn(case.shape), randn(case.shape), randn((cols,), 0.1, 1.0), randn((cols,), 0.1)


def _layernorm_residual_functions(case):
    def eager(x, r, w, b):
        total = x + r
        return F.layer_norm(total, (total.shape[-1],), w, b, LN_EPS), total

    return (lambda x, r, w, b: ops.layernorm_residual(x, r, w, b, LN_EPS), eager,
            lambda x, r, w, b: reference.layernorm_residual(x, r, w, b, LN_EPS))


def _rmsnorm_residual_inputs(case, randn):
    return randn(case.shape), randn(case.shape), randn((case.shape[-1],), 0.1, 1.0)


def _rmsnorm_residual_functions(case):
    def eager(x, r, w):
        total = x + r
        return F.rms_norm(total, (total.shape[-1],), w, LN_EPS), total

    return (lambda x, r, w: ops.rmsnorm_residual(x, r, w, LN_EPS), eager,
            lambda x, r, w: reference.rmsnorm_residual(x, r, w, LN_EPS))


def _linear_inputs(case, randn):
    m, k, n = case.shape
    has_bias, _, has_residual = EPILOGUES[case.epilogue]
    return (randn((m, k)), randn((n, k), k ** -0.5), randn((n,), 0.1) if has_bias else None,
            randn((m, n)) if has_residual else None)


def _linear_functions(case):
    activation = EPILOGUES[case.epilogue][1]

    def eager(x, w, b, r):
        y = F.linear(x, w, b)
        if activation == "gelu":
            y = F.gelu(y, approximate="tanh")
        return y if r is None else y + r

    return (lambda x, w, b, r: ops.linear(x, w, b, activation, r), eager,
            lambda x, w, b, r: reference.linear(x, w, b, activation, r))


def _linear_cost(case):
    m, k, n = case.shape
    has_bias, _, has_residual = EPILOGUES[case.epilogue]
    elements = m * k + n * k + m * n + (n if has_bias else 0) + (m * n if has_residual else 0)
    return 2.0 * m * n * k, float(elements * _itemsize(case))


def _ffn_inputs(case, randn):
    m, width = case.shape
    hidden = 4 * width
    return (randn((m, width)), randn((hidden, width), width ** -0.5), randn((hidden,), 0.1),
            randn((width, hidden), hidden ** -0.5), randn((width,), 0.1))


def _ffn_functions(case):
    def eager(x, w_fc, b_fc, w_proj, b_proj):
        return F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate="tanh"), w_proj, b_proj)

    return (lambda *t: ops.ffn(*t), eager, lambda *t: reference.ffn(*t))


def _ffn_cost(case):
    m, width = case.shape
    hidden = 4 * width
    elements = 2 * m * width + 2 * hidden * width + hidden + width
    return 4.0 * m * hidden * width, float(elements * _itemsize(case))


# RoPE cases: shape (batch, heads, positions, head_dim); x is a projection's output
# (batch, positions, heads x head_dim) viewed head-split, as the model passes it.
def _rope_inputs(case, randn):
    batch, heads, positions, dim = case.shape
    x = randn((batch, positions, heads * dim)).view(batch, positions, heads, dim).transpose(1, 2)
    angles = randn((batch, positions, dim // 2), 3.0).float()
    return x, angles.cos(), angles.sin()


def _rope_functions(case):
    def eager(x, cos, sin):
        x1, x2 = x.float().chunk(2, dim=-1)
        cos, sin = cos[:, None], sin[:, None]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return (lambda *t: ops.rope(*t), eager, lambda *t: reference.rope(*t))


def _rope_cost(case):
    batch, heads, positions, dim = case.shape
    return 6.0 * _elements(case) / 2, float(2 * _elements(case) * _itemsize(case) + 2 * batch * positions * dim * 2)


# Expert linear cases: shape (tokens, slots, experts, N, K); epilogue "swiglu" (x shared
# by a token's slots, the SwiGLU fused: an MoE's first product) or "routes" (one row of x
# per route: its second). A decode case (tokens x slots <= experts) gives every route a
# different expert, so each expert read is one the op must make; a prefill case (more
# routes) draws the experts at random, so that each expert has a group of routes.
def _expert_prefill(case) -> bool:
    tokens, slots, experts, _, _ = case.shape
    return tokens * slots > experts


def _expert_inputs(case, randn):
    tokens, slots, experts, n, k = case.shape
    x = randn((tokens, slots, k) if case.epilogue == "routes" else (tokens, k))
    weight, bias = randn((experts, n, k), k ** -0.5), randn((experts, n), 0.1)
    g = torch.Generator().manual_seed(experts)
    if _expert_prefill(case):
        chosen = torch.randint(0, experts, (tokens * slots,), generator=g)
    else:
        chosen = torch.randperm(experts, generator=g)[:tokens * slots]
    return x, weight, bias, chosen.view(tokens, slots).to(x.device)


def _expert_functions(case):
    activation = "swiglu" if case.epilogue == "swiglu" else None

    def swiglu(h):
        gate, linear = h[:, 0::2].clamp(max=7.0), h[:, 1::2].clamp(-7.0, 7.0)
        return gate * torch.sigmoid(1.702 * gate) * (linear + 1)

    def eager(x, weight, bias, chosen):
        # Decode: the experts' matrices gathered per route, then one batched product: what
        # PyTorch does without a host-side grouping by expert (which a CUDA graph could not
        # hold). Prefill: the routes grouped by expert on the host, one product an expert (as
        # transformers' gpt-oss does).
        tokens, slots = chosen.shape
        picked = chosen.reshape(-1)
        rows = (x if x.dim() == 3 else x[:, None].expand(tokens, slots, x.shape[-1])).reshape(-1, x.shape[-1])
        if not _expert_prefill(case):
            h = torch.baddbmm(bias[picked][:, None], rows[:, None], weight[picked].transpose(1, 2))[:, 0]
            return (swiglu(h) if activation else h).view(tokens, slots, -1)
        order = picked.argsort(stable=True)
        out = rows.new_empty((picked.numel(), weight.shape[1] // 2 if activation else weight.shape[1]))
        start = 0
        for e, count in enumerate(torch.bincount(picked, minlength=weight.shape[0]).tolist()):
            routes = order[start:start + count]
            start += count
            if count:
                h = F.linear(rows[routes], weight[e], bias[e])
                out[routes] = swiglu(h) if activation else h
        return out.view(tokens, slots, -1)

    return (lambda *t: ops.expert_linear(*t, activation), eager, lambda *t: reference.expert_linear(*t, activation))


def _expert_cost(case):
    tokens, slots, experts, n, k = case.shape
    routes = tokens * slots
    rows = routes if case.epilogue == "routes" else tokens
    out = routes * (n // 2 if case.epilogue == "swiglu" else n)
    matrices = experts if _expert_prefill(case) else routes  # read once an expert, or once a route
    return 2.0 * routes * n * k, float((matrices * (n * k + n) + rows * k + out) * _itemsize(case))


# expert_linear_bwd: the backward pass alone (dx, dweight, dbias) of the same cases. gptext's
# runs on the op (the SwiGLU input recomputed, dx as expert_linear over the transposed
# matrices, dweight one product an expert); eager differentiates the host-grouped loop;
# the reference its route-by-route products.
def _expert_bwd_inputs(case, randn):
    x, weight, bias, chosen = _expert_inputs(case, randn)
    tokens, slots, _, n, _ = case.shape
    return x, weight, bias, chosen, randn((tokens, slots, n // 2 if case.epilogue == "swiglu" else n))


def _expert_bwd_functions(case):
    return tuple(_BackwardOnly(fn) for fn in _expert_functions(case))


def _expert_bwd_cost(case):
    flops, _ = _expert_cost(case)
    tokens, slots, experts, n, k = case.shape
    routes = tokens * slots
    rows = routes if case.epilogue == "routes" else tokens
    # Two products (dx, dweight) against the forward's one; x, the weights and the output
    # gradient read, dx, dweight and dbias written.
    out = routes * (n // 2 if case.epilogue == "swiglu" else n)
    return 2.0 * flops, float((2 * rows * k + 2 * experts * (n * k + n) + out) * _itemsize(case))


def _elements(case) -> int:
    return math.prod(case.shape)


# Attention cases: shape (batch, heads, kv_heads, q_len, k_len, head_dim); the epilogue
# field says "causal" or "" (every key visible). Causal cases have q_len == k_len or
# q_len == 1, where SDPA's top-left causal mask and gptext's end-aligned one agree.
def _attention_inputs(case, randn):
    batch, heads, kv_heads, q_len, k_len, dim = case.shape
    return randn((batch, heads, q_len, dim)), randn((batch, kv_heads, k_len, dim)), randn((batch, kv_heads, k_len, dim))


def _expand_kv(q, k, v):
    group = q.shape[1] // k.shape[1]
    return (k, v) if group == 1 else (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))


def _sdpa(q, k, v, causal):
    k, v = _expand_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] > 1)


def _unfused_attention(q, k, v, causal):
    k, v = _expand_kv(q, k, v)
    probs = ops.softmax(q @ k.transpose(-2, -1), scale=q.shape[-1] ** -0.5, causal=causal)
    return probs @ v


def _attention_functions(case):
    causal = case.epilogue == "causal"
    return (lambda q, k, v: ops.attention(q, k, v, causal=causal), lambda q, k, v: _sdpa(q, k, v, causal),
            lambda q, k, v: reference.attention(q, k, v, causal=causal))


def _attention_pairs(case) -> int:
    """(query, key) pairs attended: a causal query sees the keys up to its position."""
    _, _, _, q_len, k_len, _ = case.shape
    if case.epilogue != "causal":
        return q_len * k_len
    return sum(min(k_len, k_len - q_len + i + 1) for i in range(q_len))


def _attention_cost(case):
    batch, heads, kv_heads, q_len, k_len, dim = case.shape
    elements = 2 * batch * heads * q_len * dim + 2 * batch * kv_heads * k_len * dim  # q, out; k, v
    return 4.0 * batch * heads * _attention_pairs(case) * dim, float(elements * _itemsize(case))


class _BackwardOnly:
    """The backward pass of an implementation, timed alone: called with its inputs and then
    the output's gradient, the first call on a set of inputs runs the forward and keeps its
    graph; every call returns the gradients of the first `leaves` inputs (the others, such
    as expert indices, are not differentiable)."""

    def __init__(self, forward, leaves: int = 3):
        self.forward, self.leaves = forward, leaves
        self.graph = None

    def __call__(self, *args):
        *inputs, grad = args
        if self.graph is None or self.graph[0] is not inputs[0]:
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in inputs[:self.leaves]]
                self.graph = (inputs[0], leaves, self.forward(*leaves, *inputs[self.leaves:]))
        _, leaves, out = self.graph
        with torch.enable_grad():
            return torch.autograd.grad(out, leaves, grad, retain_graph=True)


def _attention_bwd_inputs(case, randn):
    q, k, v = _attention_inputs(case, randn)
    return q, k, v, randn(q.shape)


def _attention_bwd_functions(case):
    return tuple(_BackwardOnly(fn) for fn in _attention_functions(case))


def _attention_bwd_cost(case):
    flops, nbytes = _attention_cost(case)
    # Five products against the forward's two; q, k, v, out and grad_out read, three gradients written.
    return 2.5 * flops, 2.0 * nbytes + nbytes / 2


def _attention_bound(case):
    return "memory" if case.shape[3] == 1 else "compute"  # decode streams the cache


OP_SPECS = {
    "softmax": OpSpec(lambda case: "memory", lambda case, randn: (randn(case.shape, 2.0),), _softmax_functions,
                      lambda case: (5.0 * _elements(case), 2.0 * _elements(case) * _itemsize(case))),
    "cross_entropy": OpSpec(lambda case: "memory", _cross_entropy_inputs, _cross_entropy_functions,
                            _cross_entropy_cost),
    "linear_cross_entropy": OpSpec(lambda case: "compute", _linear_cross_entropy_inputs,
                                   _linear_cross_entropy_functions, _linear_cross_entropy_cost,
                                   lambda case: max(case.shape[0], case.shape[2]), widen=2.0),
    "layernorm_residual": OpSpec(
        lambda case: "memory", _layernorm_residual_inputs, _layernorm_residual_functions,
        lambda case: (9.0 * _elements(case), float((4 * _elements(case) + 2 * case.shape[-1]) * _itemsize(case)))),
    "rmsnorm_residual": OpSpec(
        lambda case: "memory", _rmsnorm_residual_inputs, _rmsnorm_residual_functions,
        lambda case: (7.0 * _elements(case), float((4 * _elements(case) + case.shape[-1]) * _itemsize(case)))),
    "linear": OpSpec(lambda case: "compute", _linear_inputs, _linear_functions, _linear_cost,
                     lambda case: case.shape[1]),
    "ffn": OpSpec(lambda case: "compute", _ffn_inputs, _ffn_functions, _ffn_cost, lambda case: 4 * case.shape[1]),
    "rope": OpSpec(lambda case: "memory", _rope_inputs, _rope_functions, _rope_cost),
    "expert_linear": OpSpec(lambda case: "compute" if _expert_prefill(case) else "memory", _expert_inputs,
                            _expert_functions, _expert_cost, lambda case: case.shape[4]),
    "expert_linear_bwd": OpSpec(lambda case: "compute", _expert_bwd_inputs, _expert_bwd_functions,
                                _expert_bwd_cost, lambda case: max(case.shape[3], case.shape[0] * case.shape[1]),
                                widen=2.0),
    "attention": OpSpec(_attention_bound, _attention_inputs, _attention_functions, _attention_cost, row_rms=True),
    # Gradients compound roundings the forward's do not: delta = rowsum(dO * O) uses the
    # 16-bit output, and every dQ / dK element sums k_len of them (the tests allow 4x too).
    "attention_bwd": OpSpec(lambda case: "compute", _attention_bwd_inputs, _attention_bwd_functions,
                            _attention_bwd_cost, lambda case: case.shape[4], widen=4.0, row_rms=True),
}


@dataclass
class Competitor:
    name: str
    fn: Callable
    checked: bool              # a gptext implementation: gated on the reference's output
    context: Callable = contextlib.nullcontext  # entered around its check and its timing
    policy: str | None = None  # the GEMM policy it pins (CUDA linear)
    compiled: bool = False


@contextlib.contextmanager
def _on_kernels(policy: str | None):
    """gptext's compiled kernels (an error, never a silent fallback), with the GEMM policy
    pinned when one is given."""
    previous = gptext.gemm_policy()
    with gptext.backend("kernels"):
        if policy:
            gptext.set_gemm_policy(policy)
        try:
            yield
        finally:
            gptext.set_gemm_policy(previous)


def competitors(case: Case, device: torch.device, with_compile: bool) -> list[Competitor]:
    gptext_fn, eager_fn, reference_fn = OP_SPECS[case.op].functions(case)
    field = [Competitor("gptext", gptext_fn, True, lambda: _on_kernels(None))]
    if device.type == "cuda" and case.op == "linear":
        field += [Competitor(f"gptext-{p}", gptext_fn, True, lambda p=p: _on_kernels(p), policy=p)
                  for p in ("wmma", "cublas")]
        field.append(Competitor("torch.matmul", lambda x, w, b, r: torch.matmul(x, w.t()), False))
    if case.op == "attention":
        # Timed, not gated: its 16-bit scores lose precision that the fused kernel keeps (the
        # scores stay fp32 there), so it can miss the fused kernel's tolerance.
        causal = case.epilogue == "causal"
        field.append(Competitor("gptext-unfused", lambda q, k, v: _unfused_attention(q, k, v, causal), False,
                                lambda: _on_kernels(None)))
    field.append(Competitor("eager", eager_fn, False))
    if with_compile and not case.op.startswith("attention"):  # SDPA is already one fused op
        field.append(Competitor("compile", eager_fn, False, compiled=True))
    field.append(Competitor("reference", reference_fn, False))
    return field


class CompileBudget:
    """Seconds torch.compile may spend compiling across the run (None: no limit); once
    spent, the remaining cases skip the compile competitor, saying so."""

    def __init__(self, seconds: float | None):
        self.left = seconds

    def spent(self) -> bool:
        return self.left is not None and self.left <= 0

    def spend(self, seconds: float) -> None:
        if self.left is not None:
            self.left -= seconds


def make_inputs(case: Case, device: torch.device, seed: int) -> tuple:
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = metrics.DTYPES[case.dtype]

    def randn(shape, scale=1.0, shift=0.0):
        values = torch.randn(shape, generator=generator, device=device) * scale + shift
        return values.to(dtype)

    return OP_SPECS[case.op].inputs(case, randn)


def _compile(competitor: Competitor, inputs, device, budget: CompileBudget):
    """(compiled function, seconds its first call took). A fresh compile per case: dynamo
    caches per code object and falls back to eager past its recompile limit, which would
    time eager under the compile label."""
    torch._dynamo.reset()
    compiled = torch.compile(competitor.fn, dynamic=False, fullgraph=True)
    start = time.perf_counter()
    compiled(*inputs)
    profiling.synchronize(device)
    seconds = time.perf_counter() - start
    budget.spend(seconds)
    return compiled, seconds


def _prepare_competitor(competitor: Competitor, case: Case, inputs, expected, device,
                        budget: CompileBudget) -> tuple[dict, Callable | None]:
    """(entry, the call to time): compiles where asked and checks gptext's result against
    the reference. The call is None when the competitor can't run (the entry says why)."""
    entry = {"competitor": competitor.name, "status": "ok"}
    spec = OP_SPECS[case.op]
    fn = competitor.fn
    try:
        with competitor.context():
            if competitor.policy and ops.linear_backend(inputs[0], inputs[1]) != competitor.policy:
                return {**entry, "status": "n/a", "reason": f"{case.dtype} runs on "
                        f"{ops.linear_backend(inputs[0], inputs[1])} under the {competitor.policy} policy"}, None
            if competitor.compiled:
                if budget.spent():
                    return {**entry, "status": "skipped", "reason": "the run's compile budget is spent"}, None
                fn, entry["compile_seconds"] = _compile(competitor, inputs, device, budget)
            if competitor.checked:
                rtol, atol = spec.tolerance(case)
                ratio = metrics.error_ratio(fn(*inputs), expected, rtol, atol, spec.row_rms)
                entry["error_ratio"] = ratio
                if not ratio <= 1.0:
                    return {**entry, "status": "WRONG",
                            "reason": f"differs from the reference by {ratio:.3g}x the tolerance"}, None
                weight = inputs[1] if case.op in ("linear", "ffn") else None
                entry["implementation"] = ops.implementation(case.op.removesuffix("_bwd"), inputs[0], weight)
    except Exception as error:  # noqa: BLE001 - any failure is reported in its row, and the run goes on
        return {**entry, "status": "error" if competitor.checked else "unavailable",
                "reason": results.reason(error)}, None
    return entry, lambda: fn(*inputs)


def _time_competitors(prepared: list[tuple[Competitor, dict, Callable | None]], device, timing: Timing) -> None:
    """Times every runnable competitor of a case together, in alternating rounds; a failure
    while timing marks only that competitor's entry."""
    runnable = [(competitor, entry, call) for competitor, entry, call in prepared if call is not None]
    try:
        times = timing.measure_together([call for _, _, call in runnable], device, flush_l2=True,
                                        contexts=[competitor.context for competitor, _, _ in runnable])
    except Exception:  # noqa: BLE001 - find which one fails: time them one by one
        times = []
        for competitor, entry, call in runnable:
            try:
                with competitor.context():
                    times.append(timing.measure(call, device, flush_l2=True))
            except Exception as error:  # noqa: BLE001
                times.append(None)
                entry.update(status="error" if competitor.checked else "unavailable", reason=results.reason(error))
    for (_, entry, _), measured in zip(runnable, times):
        if measured is not None:
            entry["time"] = measured


def _rates(entry: dict, case: Case, limits: dict) -> None:
    flops, nbytes = OP_SPECS[case.op].cost(case)
    seconds = entry["time"]["median"]
    entry.update(metrics.rates(flops, nbytes, seconds))
    # A memory-bound op's FLOPs are not matmul FLOPs: only copy bandwidth limits it.
    peak = limits["matmul_tflops"].get(case.dtype) if OP_SPECS[case.op].bound(case) == "compute" else None
    entry["fraction"] = metrics.limit_fractions(flops, nbytes, seconds, limits["copy_gbps"], peak)


def run_case(case: Case, device: torch.device, timing: Timing, limits: dict, *, with_compile: bool = True,
             budget: CompileBudget | None = None, seed: int = 0, field: list[Competitor] | None = None,
             on_entry: Callable[[dict, dict], None] = lambda record, entry: None) -> dict:
    """Runs every competitor of one case; returns the case's record (see bench.results).
    The competitors are prepared (compiled, checked) one by one, then timed together in
    alternating rounds. on_entry(record, entry) is called for each entry once all are timed,
    for live progress."""
    budget = budget or CompileBudget(None)
    spec = OP_SPECS[case.op]
    flops, nbytes = spec.cost(case)
    rtol, atol = spec.tolerance(case)
    record = {"op": case.op, "family": case.family, "label": case.label, "shape": list(case.shape),
              "dtype": case.dtype, "epilogue": case.epilogue, "bound": spec.bound(case), "flops": flops, "bytes": nbytes,
              "tolerance": {"rtol": rtol, "atol": atol}, "results": []}
    with torch.no_grad():
        inputs = make_inputs(case, device, seed)
        field = field if field is not None else competitors(case, device, with_compile)
        expected = spec.functions(case)[2](*inputs)
        prepared = [(competitor, *_prepare_competitor(competitor, case, inputs, expected, device, budget))
                    for competitor in field]
        _time_competitors(prepared, device, timing)
        for _, entry, _ in prepared:
            if "time" in entry:
                _rates(entry, case, limits)
            record["results"].append(entry)
            on_entry(record, entry)
        del inputs, expected, prepared
    if device.type == "cuda":
        torch.cuda.empty_cache()
    finish_case(record)
    return record


def finish_case(record: dict) -> None:
    """The case's status and gptext's speed-up over each competitor. A case is ok only when
    every gptext implementation in it passed; otherwise it claims no speed-up at all."""
    entries = record["results"]
    failed = [r["status"] for r in entries if r["status"] in metrics.FAILED]
    record["status"] = "WRONG" if "WRONG" in failed else "error" if failed else "ok"
    record["implementation"] = entries[0].get("implementation") if entries else None
    speedups = {r["competitor"]: metrics.speedup_over(entries, r) for r in entries}
    record["speedup"] = {name: x for name, x in speedups.items() if x is not None}
