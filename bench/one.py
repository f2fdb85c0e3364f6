"""python -m bench.one OP LABEL DTYPE [--calls N] [--impl gptext|eager|reference]

Runs one benchmark case's implementation a few times and nothing else, for a profiler:

    ncu --launch-skip 1 --launch-count 1 --section SpeedOfLight --section Occupancy \\
        python -m bench.one softmax 8192x50257 bf16
    nsys profile python -m bench.one attention "1x12/12x1x8192x64 causal" bf16

LABEL is a case label as the bench tables print it, DTYPE fp32, bf16 or fp16; the case
must be in the device's full plan (bench/plan.py), and its inputs are the bench's own
(bench.kernels.make_inputs, seed 0). Prints what ran and how long the last call took.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import gptext
from gptext import profiling

from . import metrics
from .kernels import OP_SPECS, make_inputs
from .plan import kernel_cases

IMPLEMENTATIONS = ("gptext", "eager", "reference")


def find_case(device_type: str, op: str, label: str, dtype: str):
    """The case of the device's full plan with this op, label and dtype (ValueError if none)."""
    cases = [c for c in kernel_cases(device_type, "full", ops=(op,), dtypes=(dtype,)) if c.label == label]
    if not cases:
        labels = sorted({c.label for c in kernel_cases(device_type, "full", ops=(op,))})
        raise ValueError(f"no {op} case labelled {label!r} in {dtype} on {device_type}; labels: {', '.join(labels)}")
    return cases[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.one", description=__doc__.split("\n\n")[0])
    parser.add_argument("op", choices=sorted(OP_SPECS))
    parser.add_argument("label", help="the case's shape label, e.g. 8192x50257 or '1x12/12x1x8192x64 causal'")
    parser.add_argument("dtype", help="fp32, bf16 or fp16")
    parser.add_argument("--calls", type=int, default=3, help="how many calls (default 3: a profiler can skip the first)")
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, default="gptext")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dtype = metrics.parse_dtype(args.dtype)
        case = find_case(device.type, args.op, args.label, dtype)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    spec = OP_SPECS[case.op]
    fn = dict(zip(IMPLEMENTATIONS, spec.functions(case)))[args.impl]
    inputs = make_inputs(case, device, seed=0)
    with torch.no_grad(), gptext.backend("kernels" if args.impl == "gptext" else "auto"):
        for _ in range(args.calls):
            start = time.perf_counter()
            fn(*inputs)
            profiling.synchronize(device)
            seconds = time.perf_counter() - start
    print(f"{case.op} {case.label} {case.dtype} ({args.impl}) on {device}: {args.calls} calls, "
          f"the last {seconds * 1e3:.3f} ms (wall, synchronised)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
