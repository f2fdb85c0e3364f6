"""Measuring gptext where it runs: a timing harness, the device's own limits measured on
the spot (copy bandwidth, dense matmul throughput), and a per-op profile of a forward pass.
``python -m gptext profile`` and the bench/ suite are built on these.

Timing rules: warm-up calls first; CUDA work is timed with CUDA events around each call
(optionally after flushing L2 so memory-bound kernels read from HBM, not cache); CPU work
with perf_counter; the median of the repeats is the figure, with the 10th-90th percentile
spread beside it. Implementations being compared are timed in alternating rounds
(measure_interleaved), so that a busy spell of a shared machine does not favour one of them.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from . import ops

__all__ = ["DeviceLimits", "Measurement", "OpRecord", "device_limits", "format_profile", "measure",
           "measure_interleaved", "profile_forward", "record_ops", "round_orders"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurement:
    """Seconds per call: the median and the 10th / 90th percentiles of the repeats."""

    median: float
    p10: float
    p90: float
    samples: list[float] = field(repr=False)

    @classmethod
    def of(cls, samples: list[float]) -> "Measurement":
        if not samples:
            raise ValueError("no samples to summarise")
        ordered = sorted(samples)

        def percentile(q: float) -> float:
            position = q * (len(ordered) - 1)
            low, high = math.floor(position), math.ceil(position)
            return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

        return cls(statistics.median(ordered), percentile(0.1), percentile(0.9), list(samples))


class _L2Flush:
    """Overwrites a buffer larger than the GPU's L2 cache, so the next kernel starts cold."""

    def __init__(self, device: torch.device):
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20) or (64 << 20)
        self.buffer = torch.empty(2 * l2 // 4, dtype=torch.float32, device=device)

    def __call__(self):
        self.buffer.fill_(1.0)


def measure(fn, device: torch.device | str = "cpu", *, warmup: int = 3, repeats: int = 20, max_seconds: float = 2.0,
            flush_l2: bool = False) -> Measurement:
    """Times fn() (at least 3 repeats, at most `repeats`, stopping early once the repeats
    have taken max_seconds; the warm-up also stops once it has taken max_seconds)."""
    return measure_interleaved([fn], device, warmup=warmup, repeats=repeats, max_seconds=max_seconds,
                               flush_l2=flush_l2)[0]


def measure_interleaved(fns, device: torch.device | str = "cpu", *, warmup: int = 3, repeats: int = 20,
                        max_seconds: float = 2.0, flush_l2: bool = False, contexts=None) -> list[Measurement]:
    """Times several functions in alternating rounds (one call of each per round), so that
    a slow spell of a shared machine falls on all of them alike rather than on whichever
    was being timed then: the ratios between them stay fair. The order changes from round
    to round (round_orders), so that each follows each of the others equally often: what
    ran just before decides what is still in the caches and predictors, and a small call
    timed right after a large one is slower for it. Each warms up first (stopping
    once its warm-up has taken max_seconds); then at least 3 rounds, at most `repeats`,
    stopping early once the rounds have taken max_seconds per function. contexts: a context
    manager factory per function (or None), entered around each of its calls, outside the
    timed region."""
    device = torch.device(device)
    contexts = list(contexts) if contexts is not None else [contextlib.nullcontext] * len(fns)
    if len(contexts) != len(fns):
        raise ValueError(f"measure_interleaved: {len(fns)} functions but {len(contexts)} contexts")
    contexts = [ctx or contextlib.nullcontext for ctx in contexts]
    for fn, ctx in zip(fns, contexts):
        warmup_end = time.perf_counter() + max_seconds
        with ctx():
            for _ in range(warmup):  # a slow function (seconds a call) warms up once, not `warmup` times
                fn()
                if time.perf_counter() > warmup_end:
                    break
    synchronize(device)
    samples: list[list[float]] = [[] for _ in fns]
    flush = _L2Flush(device) if flush_l2 and device.type == "cuda" else None
    budget_end = time.perf_counter() + max_seconds * len(fns)
    orders = round_orders(len(fns))
    rounds = 0
    while rounds < repeats and (rounds < 3 or time.perf_counter() < budget_end):
        for k in orders[rounds % len(orders)]:
            with contexts[k]():
                samples[k].append(_timed_call(fns[k], device, flush))
        rounds += 1
    return [Measurement.of(times) for times in samples]


def round_orders(n: int) -> list[list[int]]:
    """Orders of n competitors, one per round, in which each follows each of the others
    equally often within a round (a balanced Latin square: n rounds for even n, 2n for odd
    n, where each order also runs reversed). Turning one fixed order from round to round
    would not do that: each competitor would nearly always follow the same one."""
    first = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]
    orders = [[(a + r) % n for a in first] for r in range(n)]
    return orders if n % 2 == 0 else orders + [order[::-1] for order in orders]


def _timed_call(fn, device: torch.device, flush) -> float:
    """Seconds one call of fn takes (CUDA: between events around it, after the L2 flush)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    if flush is not None:
        flush()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3


@dataclass
class DeviceLimits:
    """What this device does at best, measured in the same run as the figures compared to it.

    copy_gbps:     a large device-to-device copy, bytes read + written per second / 1e9
    matmul_tflops: dense matmul (torch.matmul: cuBLAS on CUDA) per dtype, TFLOP/s
    """

    device: str
    name: str
    copy_gbps: float
    matmul_tflops: dict[str, float]

    def as_dict(self) -> dict:
        return {"device": self.device, "name": self.name, "copy_gbps": self.copy_gbps,
                "matmul_tflops": dict(self.matmul_tflops)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        model = ""
    # The vector instructions gptext's CPU kernels use here: a virtual machine's model name
    # ("AMD EPYC") does not tell one processor generation from the next.
    isa = ops.build_info().get("cpu_isa")
    return f"{model or platform.processor() or 'CPU'} ({torch.get_num_threads()} threads{', ' + isa if isa else ''})"


def copy_bandwidth(device: torch.device | str, megabytes: int | None = None) -> float:
    """GB/s of a large copy, counting the bytes read and the bytes written."""
    device = torch.device(device)
    megabytes = megabytes or (1024 if device.type == "cuda" else 256)
    src = torch.ones(megabytes * (1 << 20) // 4, device=device)
    dst = torch.empty_like(src)
    m = measure(lambda: dst.copy_(src), device, warmup=2, repeats=10)
    return 2 * src.numel() * 4 / m.median / 1e9


def matmul_throughput(device: torch.device | str, dtype: torch.dtype, n: int | None = None) -> float:
    """TFLOP/s of an n x n x n torch.matmul (8192 on CUDA, 1024 on CPU by default)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    m = measure(lambda: a @ b, device, warmup=2, repeats=10)
    return 2 * n**3 / m.median / 1e12


def device_limits(device: torch.device | str, dtypes=(torch.float32,)) -> DeviceLimits:
    device = torch.device(device)
    return DeviceLimits(device=str(device), name=device_name(device), copy_gbps=copy_bandwidth(device),
                        matmul_tflops={str(d).removeprefix("torch."): matmul_throughput(device, d) for d in dtypes})


# ---- per-op profile of a forward pass ------------------------------------------------------

@dataclass
class OpRecord:
    op: str
    implementation: str
    shape: str       # the main operand's shape (for GEMMs: M x N x K)
    flops: float
    bytes: float
    seconds: float


def _nbytes(*tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


def _cost(op: str, a: dict, out) -> tuple[str, str, float, float]:
    """(implementation, shape, FLOPs, bytes moved) of one call, from its bound arguments."""
    if op == "attention":
        q, k = a["q"], a["k"]
        (batch, heads, q_len, dim), k_len = q.shape, k.shape[2]
        # score/value pairs computed: causal rows see the keys up to their position
        pairs = q_len * k_len
        if a["causal"]:
            pairs = sum(max(0, min(k_len, k_len - q_len + i + 1)) for i in range(q_len))
        return (ops.implementation(op, q), f"{batch}x{heads}x{q_len}x{dim}/{k.shape[1]}x{k_len}",
                4.0 * batch * heads * pairs * dim, _nbytes(q, k, a["v"], out))
    if op == "cross_entropy":
        logits = a["logits"]
        return (ops.implementation(op, logits), "x".join(map(str, logits.shape)), 4.0 * logits.numel(),
                _nbytes(logits, a["targets"], out))
    x = a["x"]
    if op == "linear":
        w = a["weight"]
        m, n, k = x.numel() // max(x.shape[-1], 1), w.shape[0], w.shape[1]
        return (ops.implementation(op, x, w), f"{m}x{n}x{k}", 2.0 * m * n * k,
                _nbytes(x, w, a.get("bias"), a.get("residual"), out))
    if op == "ffn":
        w_fc, w_proj = a["w_fc"], a["w_proj"]
        m, hidden, width = x.numel() // max(x.shape[-1], 1), w_fc.shape[0], w_fc.shape[1]
        hidden_bytes = 2.0 * m * hidden * x.element_size()  # written by the first GEMM, read by the second
        return (ops.implementation(op, x, w_fc), f"{m}x{width}->{hidden}->{width}", 4.0 * m * hidden * width,
                _nbytes(x, w_fc, a.get("b_fc"), w_proj, a.get("b_proj"), a.get("residual"), out) + hidden_bytes)
    if op == "expert_linear":
        w, chosen = a["weight"], a["experts"]
        routes, (n, k) = chosen.numel(), w.shape[1:]
        experts_read = min(routes, w.shape[0])  # each route reads its expert's matrix; no expert counts twice
        return (ops.implementation(op, x), f"{routes}x{n}x{k}/{w.shape[0]}", 2.0 * routes * n * k,
                _nbytes(x, a.get("bias"), out) + float(experts_read * n * k * w.element_size()))
    shape = "x".join(map(str, x.shape))
    if op == "softmax":
        return ops.implementation(op, x), shape, 5.0 * x.numel(), _nbytes(x, out)
    if op == "rope":
        return ops.implementation(op, x), shape, 3.0 * x.numel(), _nbytes(x, a["cos"], a["sin"], out)
    if op in ("layernorm_residual", "rmsnorm_residual"):
        return ops.implementation(op, x), shape, 9.0 * x.numel(), _nbytes(x, a["residual"], *out)
    return ops.implementation(op, x), shape, 8.0 * x.numel(), _nbytes(x, out)  # layernorm, rmsnorm


@contextlib.contextmanager
def record_ops(device: torch.device | str):
    """Within the block, every gptext op call is timed (synchronised on CUDA) and appended to
    the yielded list as an OpRecord."""
    device = torch.device(device)
    records: list[OpRecord] = []

    def observer(op, fn, args, kwargs):
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        synchronize(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        synchronize(device)
        seconds = time.perf_counter() - start
        records.append(OpRecord(op, *_cost(op, bound.arguments, out), seconds))
        return out

    previous = ops._set_observer(observer)
    try:
        yield records
    finally:
        ops._set_observer(previous)


@torch.no_grad()
def profile_forward(model, idx: torch.Tensor) -> tuple[list[OpRecord], float]:
    """One forward pass of `model` over idx, op by op: (records, seconds of a whole pass).
    The whole pass is timed unrecorded (median of a few), after a warm-up that also settles
    the GEMM policy's choices; the recorded pass synchronises around every op, so each op's
    time includes its own launch latency."""
    device = idx.device
    total = measure(lambda: model(idx), device, warmup=1, repeats=5).median
    with record_ops(device) as records:
        model(idx)
    return records, total


def format_profile(records: list[OpRecord], total: float, limits: DeviceLimits | None, dtype: str) -> str:
    """A table of the op records, one row per call, with the share of the device's limits
    (the higher of FLOP/s over matmul throughput and bytes/s over copy bandwidth), then the
    time spent outside gptext's ops and the total."""
    header = f"{'op':<20}{'implementation':<16}{'shape':<22}{'MFLOP':>10}{'MB':>9}{'time ms':>10}" \
             f"{'GFLOP/s':>10}{'GB/s':>8}{'% limit':>9}"
    lines = [header, "-" * len(header)]
    peak = (limits.matmul_tflops.get(dtype, 0.0) * 1e12) if limits else 0.0
    for r in records:
        flops_rate, byte_rate = r.flops / r.seconds, r.bytes / r.seconds
        if limits:
            # Roofline: the closer of compute (matmul throughput) and memory (copy bandwidth).
            fraction = max(flops_rate / peak if peak else 0.0, byte_rate / (limits.copy_gbps * 1e9))
            share = f"{100 * fraction:8.1f}%"
        else:
            share = f"{'-':>9}"
        lines.append(f"{r.op:<20}{r.implementation:<16}{r.shape:<22}{r.flops / 1e6:>10.2f}{r.bytes / 1e6:>9.2f}"
                     f"{r.seconds * 1e3:>10.3f}{flops_rate / 1e9:>10.1f}{byte_rate / 1e9:>8.1f}{share}")
    in_ops = sum(r.seconds for r in records)
    lines.append("-" * len(header))
    lines.append(f"{'gptext ops':<58}{sum(r.flops for r in records) / 1e6:>10.2f}"
                 f"{sum(r.bytes for r in records) / 1e6:>9.2f}{in_ops * 1e3:>10.3f}")
    lines.append(f"{'other (embeddings, KV cache, Python)':<77}{(total - in_ops) * 1e3:>10.3f}")
    lines.append(f"{'total forward pass':<77}{total * 1e3:>10.3f}")
    return "\n".join(lines)
