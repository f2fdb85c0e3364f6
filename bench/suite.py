"""``python -m bench``: runs the model and kernel sections on one device, prints each row as
it is measured, and writes results.json (rewritten after every case) and two plots into
the output directory. Exit status: 0, or 1 when any gptext row is WRONG or failed, 2 for
bad arguments."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import sys
import time
from pathlib import Path

import torch

import gptext
from gptext import profiling

from . import kernels, metrics, model, results, tables
from .plan import DTYPES, KERNEL_TIMING, MODELS, OPS, Timing, kernel_cases, model_plans

OUT_ROOT = results.REPO / "bench" / "out"


class UsageError(Exception):
    """Bad arguments: one line on stderr, exit status 2."""


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark gptext's kernels against eager PyTorch, torch.compile and gptext's reference, and "
                    "GPT-2 and gpt-oss prefill/decode against Hugging Face transformers, on this machine's device.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="fewer shapes and dtypes: a few minutes on a small CPU (the default, and what `make bench` "
                           "runs)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="every shape and dtype of the device's plan (about four minutes on an H100)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    parser.add_argument("--ops", default=",".join(OPS),
                        help=f"kernel ops to run, comma-separated, or 'none' (default: {','.join(OPS)})")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated: fp32, bf16, fp16 (default: the mode's, e.g. fp32,bf16 for quick CPU)")
    parser.add_argument("--shapes", default="",
                        help="keep only the kernel cases whose shape label contains one of these comma-separated "
                             "strings (e.g. 4096x1024,->50257)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="include torch.compile (default: on, except in quick mode on a CPU)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave torch.compile out")
    parser.add_argument("--compile-budget", type=float, default=None, metavar="SECONDS",
                        help="stop compiling once this many seconds went into torch.compile (later cases skip it)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"model sections to run, comma-separated, or 'none' (default: {','.join(MODELS)})")
    parser.add_argument("--no-model", dest="models", action="store_const", const="none",
                        help="skip the model sections (--models none)")
    parser.add_argument("--model-dtype", default=None,
                        help="dtype of the model sections: fp32, bf16 or fp16 (default: the device's, fp32 on a CPU, "
                             "bf16 on CUDA)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time budget of each kernel measurement (default: the mode's)")
    parser.add_argument("--repeats", type=int, default=None, help="most repeats per kernel measurement")
    parser.add_argument("--out", default=None, help="output directory (default: bench/out/<name>)")
    parser.add_argument("--name", default=None, help="name of the default output directory (default: a UTC timestamp)")
    parser.set_defaults(mode="quick")
    return parser.parse_args(argv)


@dataclasses.dataclass
class Settings:
    mode: str
    device: torch.device
    ops: list[str]
    dtypes: list[str]
    shapes: list[str]
    compile: bool
    compile_budget: float | None
    models: list[str]
    model_dtype: str | None
    timing: Timing
    out: Path
    notes: list[str]


def settings_from(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: the suite runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here")
    ops = [] if args.ops.strip() == "none" else _list(args.ops)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise UsageError(f"--ops: unknown {', '.join(unknown)}; choose from {', '.join(OPS)} or 'none'")
    try:
        dtypes = [metrics.parse_dtype(d) for d in _list(args.dtypes)] if args.dtypes else \
            list(DTYPES[device.type, args.mode])
    except ValueError as error:
        raise UsageError(f"--dtypes: {error}") from None
    try:
        model_dtype = metrics.parse_dtype(args.model_dtype) if args.model_dtype else None
    except ValueError as error:
        raise UsageError(f"--model-dtype: {error}") from None
    models = [] if args.models.strip() == "none" else _list(args.models)
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        raise UsageError(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)} or 'none'")
    notes = []
    with_compile = args.compile
    if with_compile is None:
        with_compile = not (device.type == "cpu" and args.mode == "quick")
        if not with_compile:
            notes.append("torch.compile: left out (quick mode on a CPU, where compiling each shape takes tens of "
                         "seconds; --compile or --full includes it)")
    elif not with_compile:
        notes.append("torch.compile: left out (--no-compile)")
    timing = KERNEL_TIMING[device.type, args.mode]
    if args.max_seconds is not None:
        timing = dataclasses.replace(timing, max_seconds=args.max_seconds)
    if args.repeats is not None:
        timing = dataclasses.replace(timing, repeats=args.repeats)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else OUT_ROOT / (args.name or f"{stamp}-{device.type}-{args.mode}")
    return Settings(args.mode, device, ops, dtypes, _list(args.shapes), with_compile, args.compile_budget,
                    models, model_dtype, timing, out, notes)


class Run:
    """The results document of one run, printed and saved as it fills."""

    def __init__(self, settings: Settings, argv: list[str]):
        self.settings = settings
        self.path = settings.out / "results.json"
        device = settings.device
        print(f"gptext bench ({settings.mode}) on {device}: measuring the device's limits ...", flush=True)
        start = time.perf_counter()
        limits = profiling.device_limits(device, dtypes=[metrics.DTYPES[d] for d in settings.dtypes])
        recorded = {"ops": settings.ops, "dtypes": settings.dtypes, "shapes": settings.shapes,
                    "compile": settings.compile, "compile_budget": settings.compile_budget,
                    "models": settings.models, "model_dtype": settings.model_dtype, "gemm_policy": gptext.gemm_policy(),
                    "tf32": torch.backends.cuda.matmul.allow_tf32, "timing": vars(settings.timing),
                    "threads": torch.get_num_threads()}
        self.document = {"schema": results.SCHEMA, "complete": False,
                         "meta": results.meta(settings.mode, argv, device, limits.name, recorded),
                         "limits": limits.as_dict(), "notes": settings.notes, "ops": [], "models": [],
                         "errors": [], "failures": [], "seconds": {"limits": time.perf_counter() - start}}
        self.save()
        print(tables.headline(self.document), *settings.notes, sep="\n", flush=True)

    def save(self) -> None:
        results.save(self.document, self.path)

    @contextlib.contextmanager
    def guard(self, what: str):
        """Records an exception that escapes a whole case or section (inputs that do not
        fit, a CUDA error) as a failure of the run, and goes on with the next."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - reported, counted as a failure, and the run goes on
            self.document["errors"].append(f"{what}: {results.reason(error)}")
            print(f"error: {self.document['errors'][-1]}", flush=True)

    def kernels(self) -> None:
        s = self.settings
        cases = kernel_cases(s.device.type, s.mode, s.ops, s.dtypes, s.shapes)
        if not cases:
            return
        print(tables.kernels_title(len(cases)), tables.KERNELS.header(), sep="\n", flush=True)
        budget = kernels.CompileBudget(s.compile_budget)
        start = time.perf_counter()
        for i, case in enumerate(cases, 1):
            progress = f"{i}/{len(cases)}"
            with self.guard(f"{case.op} {case.label} {case.dtype}"):
                self.document["ops"].append(kernels.run_case(
                    case, s.device, s.timing, self.document["limits"], with_compile=s.compile, budget=budget,
                    seed=i, on_entry=lambda rec, entry: print(tables.kernel_line(rec, entry, progress), flush=True)))
            self.document["seconds"]["kernels"] = time.perf_counter() - start
            self.save()
        print(f"kernels: {len(cases)} cases in {self.document['seconds']['kernels']:.0f} s", flush=True)

    def models(self) -> None:
        """Each model section in turn; one that fails is recorded and the next runs."""
        plans = model_plans(self.settings.device.type, self.settings.mode, self.settings.models)
        start = time.perf_counter()
        for plan in plans:
            if self.settings.model_dtype:
                plan = dataclasses.replace(plan, dtype=self.settings.model_dtype)
            self.model(plan)
            self.document["seconds"]["models"] = time.perf_counter() - start
        print(f"models: {len(plans)} section(s) in {time.perf_counter() - start:.0f} s", flush=True)

    def model(self, plan) -> None:
        sections = self.document["models"]
        index = len(sections)

        def on_update(section):
            if len(sections) == index:
                print(tables.model_title(section["setup"]), tables.model_check_line(section["check"]),
                      tables.MODEL.header(), sep="\n", flush=True)
                sections.append(section)
            sections[index] = section
            self.save()

        def on_entry(record, entry):
            section = sections[index]
            progress = f"{len(section['rows']) + 1}/{len(plan.cases)}"
            print(tables.model_line(record, entry, section["check"]["status"] == "ok", progress), flush=True)

        start = time.perf_counter()
        with self.guard(f"model section {plan.handle}"):
            model.run(plan, self.settings.device, on_entry, on_update)
        gc.collect()  # the section's three models, before the next section builds its own
        if self.settings.device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"model {plan.handle}: {len(plan.cases)} cases in {time.perf_counter() - start:.0f} s", flush=True)

    def finish(self) -> int:
        beyond = sum(1 for case in self.document["ops"] for r in case["results"]
                     if ((r.get("fraction") or {}).get("roofline") or 0) > 1)
        if beyond:
            self.document["notes"].append(
                f"{beyond} row(s) reach more than 100% of a limit measured in this run: the limits are what a large "
                f"copy and torch.matmul achieve here, not hard ceilings (on a CPU, small working sets stay in cache "
                f"between repeats, and torch.matmul in bf16 is slow where the CPU lacks bf16 instructions)")
            print(f"\nnote: {self.document['notes'][-1]}")
        try:  # matplotlib is optional: a GPU host may lack it, and the JSON holds every figure
            from . import plots
        except ImportError as error:
            plots = None
            self.document["notes"].append(f"plots: left out ({results.reason(error)})")
            print(f"note: {self.document['notes'][-1]}")
        self.document["failures"] = results.failures(self.document)
        self.document["complete"] = True
        self.save()
        written = [self.path, *(plots.write(self.document, self.settings.out) if plots else [])]
        failures = self.document["failures"]
        if failures:
            print(f"\nFAILURES ({len(failures)}):", *failures, sep="\n")
        print("\nwrote " + ", ".join(str(p) for p in written), flush=True)
        return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = settings_from(parse_args(argv))
    except UsageError as error:
        print(f"python -m bench: error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    run = Run(settings, argv)
    # The model first: its whole-pipeline timings are the most sensitive to what a process
    # has already done, and torch.compile (kernel section) leaves workers and caches behind.
    run.models()
    run.kernels()
    status = run.finish()
    print(f"{'FAILED' if status else 'done'} in {time.perf_counter() - start:.0f} s")
    return status
