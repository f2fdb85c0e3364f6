"""The suite's arithmetic, kept free of timing so that it can be tested exactly: dtype
names, the correctness tolerance, rates, fractions of the device's limits, speed-ups."""

from __future__ import annotations

import math
import statistics

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
ALIASES = {**{name: name for name in DTYPES}, **{short: name for name, short in SHORT.items()}}

# (rtol, atol) of a gptext output against gptext's reference. Both round to the storage
# type once, so a few units in its last place separate them: bf16 keeps 8 significant
# bits, fp16 11. atol is relative to the RMS of the expected output (see error_ratio).
TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": (3e-2, 3e-2), "float16": (4e-3, 4e-3)}
# A dot product of K terms accumulates rounding error like sqrt(K); GEMM tolerances grow
# with it beyond this K.
GEMM_K_FREE = 1024


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(text: str) -> str:
    """'bf16' / 'bfloat16' -> 'bfloat16'; ValueError for anything else."""
    try:
        return ALIASES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {text!r}; use one of {', '.join(sorted(ALIASES))}") from None


def tolerance(dtype: str, k: int | None = None) -> tuple[float, float]:
    rtol, atol = TOLERANCES[dtype]
    widen = max(1.0, math.sqrt(k / GEMM_K_FREE)) if k else 1.0
    return rtol * widen, atol * widen


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def error_ratio(actual, expected, rtol: float, atol: float, row_rms: bool = False) -> float:
    """The worst |actual - expected| / (atol * rms(expected) + rtol * |expected|) over every
    element of every output: <= 1 passes. Scaling atol by the output's RMS keeps the test
    meaningful for outputs far from 1 (softmax over 50257 columns is ~2e-5 everywhere, so
    a fixed atol would pass zeros). row_rms: the RMS of each last-dimension row instead of
    the whole output's, for outputs whose rows differ in scale by design (causal attention:
    row t averages t + 1 values, so late rows of a long sequence are ~1/sqrt(t) the size of
    early ones, and a whole-output RMS would hold early rows to a tolerance that shrinks with
    the sequence's length). A shape mismatch or a NaN where the other has none is infinitely
    wrong."""
    actual, expected = _as_tuple(actual), _as_tuple(expected)
    if len(actual) != len(expected):
        return math.inf
    worst = 0.0
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            return math.inf
        a, e = a.float(), e.float()
        nan_a, nan_e = torch.isnan(a), torch.isnan(e)
        if not torch.equal(nan_a, nan_e):
            return math.inf
        if e.numel() == 0:
            continue
        a, e = a.masked_fill(nan_a, 0.0), e.masked_fill(nan_e, 0.0)
        if row_rms and e.dim() > 0:
            rms = e.pow(2).mean(-1, keepdim=True).sqrt()
            rms = torch.where(rms > 0, rms, torch.ones_like(rms))
        else:
            rms = float(e.pow(2).mean().sqrt()) or 1.0
        allowance = atol * rms + rtol * e.abs()
        worst = max(worst, float(((a - e).abs() / allowance).max()))
    return worst


def relative_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in fp32: one figure for a whole model's logits."""
    a, e = actual.float(), expected.float()
    norm = float(e.pow(2).sum().sqrt())
    return float((a - e).pow(2).sum().sqrt()) / (norm if norm > 0 else 1.0)


def rates(flops: float, nbytes: float, seconds: float) -> dict:
    """Achieved TFLOP/s and GB/s."""
    return {"tflops": flops / seconds / 1e12, "gbps": nbytes / seconds / 1e9}


def limit_fractions(flops: float, nbytes: float, seconds: float, copy_gbps: float,
                    matmul_tflops: float | None) -> dict:
    """Shares of the device's limits: memory (bytes/s over copy bandwidth), compute (FLOP/s
    over matmul throughput in the op's dtype), and the roofline share, the larger of the
    two: how close the op runs to the time the slower of the two resources allows."""
    achieved = rates(flops, nbytes, seconds)
    memory = achieved["gbps"] / copy_gbps if copy_gbps else None
    compute = achieved["tflops"] / matmul_tflops if matmul_tflops else None
    known = {name: v for name, v in (("memory", memory), ("compute", compute)) if v is not None}
    bound = max(known, key=known.get) if known else None
    return {"memory": memory, "compute": compute, "roofline": known.get(bound), "bound": bound}


def speedup(competitor: float | None, gptext: float | None, higher_is_better: bool = False) -> float | None:
    """How many times faster gptext is than the competitor (> 1: gptext wins), from their
    times (or, with higher_is_better, their rates)."""
    if not competitor or not gptext:
        return None
    return gptext / competitor if higher_is_better else competitor / gptext


FAILED = ("WRONG", "error")


def _value(entry: dict, key: str) -> float | None:
    value = entry.get(key)
    return value["median"] if isinstance(value, dict) else value


def paired_speedup(competitor: dict | None, gptext: dict | None) -> float | None:
    """The median over rounds of competitor time / gptext time, from two "time" records
    measured in the same alternating rounds (their i-th samples come from one round), else
    None. On a shared machine whose speed changes from minute to minute, each round's ratio
    compares the two at the same moment, and the median of those ratios moves far less than
    the ratio of the medians."""
    if not (isinstance(competitor, dict) and isinstance(gptext, dict)):
        return None
    if not (competitor.get("interleaved") and gptext.get("interleaved")):
        return None
    ours, theirs = gptext.get("samples") or [], competitor.get("samples") or []
    if not ours or len(ours) != len(theirs) or min(ours) <= 0:
        return None
    return statistics.median(t / g for t, g in zip(theirs, ours))


def speedup_over(entries: list[dict], entry: dict, key: str = "time") -> float | None:
    """gptext's speed-up over one competitor's entry of a case: by "time", the median of the
    per-round ratios where both were timed in the same rounds (paired_speedup), else the
    ratio of the median times; or by "tokens_per_s". entries are the case's entries so far,
    gptext's first, then its other implementations (pinned GEMM policies), then the
    competitors: none while any gptext implementation has failed, so that a wrong result
    is never counted as a win."""
    headline = entries[0]
    if entry is headline or headline["competitor"] != "gptext" or any(e["status"] in FAILED for e in entries):
        return None
    if key == "time":
        paired = paired_speedup(entry.get("time"), headline.get("time"))
        if paired is not None:
            return paired
    return speedup(_value(entry, key), _value(headline, key), higher_is_better=key == "tokens_per_s")


def decode_rate(new_tokens: int, batch: int, seconds_n: float, seconds_1: float) -> float | None:
    """Decode tokens/s from two generate calls on the same prompts: one making new_tokens
    tokens, one making 1. Both run the same prefill and sample one token from it; the
    difference is exactly new_tokens - 1 decode steps of `batch` sequences. None when noise
    made the difference non-positive."""
    steps = new_tokens - 1
    spent = seconds_n - seconds_1
    if steps < 1 or spent <= 0:
        return None
    return steps * batch / spent
