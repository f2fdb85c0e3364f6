"""gptext's benchmark suite: honest, reproducible comparisons on the device at hand.

    python -m bench [--quick | --full] [--device cpu|cuda] ...   run it (see --help)
    python -m bench.report FILE.json                            print a results file's tables
    python -m bench.report --readme README.md [FILES...]        regenerate README's results section
    bench/gpu_suite.sh OUTDIR [COMMIT]                          build, test and benchmark on a GPU host

Two sections. Kernels: each gptext op against eager PyTorch of the same computation,
torch.compile of that eager function, and gptext's own pure-PyTorch reference (on CUDA,
also its two GEMM policies and a bare torch.matmul), every gptext output checked against
the reference before it is timed. Model: GPT-2 prefill and decode tokens/s, gptext on its
kernels and on its reference against Hugging Face transformers on the same weights.

Every figure sits beside the device's own limits, measured in the same run (copy
bandwidth, matmul throughput per dtype), and goes into a JSON file with the environment it
came from (see bench.results for the schema).

Modules: plan (what runs: shapes, dtypes, timings per device and mode), metrics (the
arithmetic: bytes, FLOPs, rates, speed-ups, the correctness tolerance), kernels and model
(the two sections), results (the JSON file and its schema), tables (terminal tables),
plots (PNG), report (README), suite (the command line).
"""
