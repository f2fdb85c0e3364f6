"""Terminal tables: fixed-width columns, so that a live run can print each row the moment
it is measured and `python -m bench.report FILE.json` prints the same lines afterwards."""

from __future__ import annotations

from dataclasses import dataclass

from . import metrics
from .results import check_text


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    align: str = ">"


class Table:
    def __init__(self, *columns: Column):
        self.columns = columns

    def header(self) -> str:
        titles = self.line([c.title for c in self.columns])
        return f"{titles}\n{'-' * len(titles)}"

    def line(self, cells: list[str], tail: str = "") -> str:
        text = "  ".join(f"{cell:{c.align}{c.width}}" for c, cell in zip(self.columns, cells))
        return f"{text}  {tail}".rstrip() if tail else text.rstrip()


KERNELS = Table(Column("case", 7, "<"), Column("op", 18, "<"), Column("shape", 21, "<"), Column("dtype", 5, "<"),
                Column("competitor", 13, "<"), Column("impl", 6, "<"), Column("median ms", 10),
                Column("p10-p90 ms", 17), Column("achieved", 11), Column("% limit", 10), Column("gptext x", 8),
                Column("check", 8, "<"))

MODEL = Table(Column("case", 7, "<"), Column("phase", 7, "<"), Column("shape", 12, "<"), Column("dtype", 5, "<"),
              Column("competitor", 10, "<"), Column("median s", 9), Column("p10-p90 s", 15), Column("T(1 new) s", 10),
              Column("tokens/s", 10), Column("gptext x", 8), Column("check", 6, "<"))


def seconds(value: float | None, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    v = value * scale
    return f"{v:.4f}" if v < 1 else f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def spread(time: dict | None, scale: float = 1.0) -> str:
    return f"{seconds(time['p10'], scale)}-{seconds(time['p90'], scale)}" if time else ""


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def percent(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if value < 1 else f"{100 * value:.0f}%"


def achieved(entry: dict) -> str:
    """The rate that counts against the binding limit: GB/s for a memory-bound op (or a
    GEMM so skinny that memory binds it), TFLOP/s otherwise."""
    fraction = entry.get("fraction")
    if not fraction:
        return ""
    if fraction["bound"] == "memory":
        return f"{entry['gbps']:.1f} GB/s"
    tflops = entry["tflops"]
    return f"{tflops:.1f} TF/s" if tflops >= 1 else f"{tflops * 1e3:.1f} GF/s"


def limit_share(entry: dict) -> str:
    fraction = entry.get("fraction")
    if not fraction or fraction["roofline"] is None:
        return ""
    return f"{percent(fraction['roofline'])} {'mem' if fraction['bound'] == 'memory' else 'mma'}"


def _check(entry: dict) -> tuple[str, str]:
    """(check cell, tail): the error ratio of a checked row, the status and reason of any
    row that did not run normally."""
    status = entry["status"]
    if status == "ok":
        ratio = entry.get("error_ratio")
        return (f"ok {ratio:.2f}" if ratio is not None else "", "")
    return status, entry.get("reason", "")


def _lead(record: dict, entry: dict, kind: str, progress: str) -> tuple[bool, list[str]]:
    """(whether entry is the case's first, the case's cells): a case names itself on its
    first line only, so that its competitors read as a block."""
    first = entry is record["results"][0]
    return first, [progress, record[kind], record["label"], metrics.SHORT[record["dtype"]]] if first else [""] * 4


def kernels_title(cases: int) -> str:
    return f"\nKernels: {cases} cases"


def model_size(setup: dict) -> str:
    """The model a section ran: its preset, and what of it was changed (a smaller variant)."""
    overrides = setup.get("overrides") or {}
    changed = f" with {', '.join(f'{k}={v}' for k, v in overrides.items())}" if overrides else ""
    return f"{setup['preset']}{changed} ({setup['parameters'] / 1e6:.0f}M parameters)"


def model_title(setup: dict) -> str:
    hf = setup.get("hf") or {}
    runs = f" ({hf['class']}, {hf['attention']} attention)" if hf.get("class") else ""
    return (f"\nModel: {model_size(setup)} in {setup['dtype']}, the same random weights in gptext, its reference "
            f"and transformers{runs}")


def kernel_line(record: dict, entry: dict, progress: str = "") -> str:
    first, case_cells = _lead(record, entry, "op", progress)
    time = entry.get("time")
    check, tail = _check(entry)
    if not tail and "compile_seconds" in entry:
        tail = f"(first call, compiling: {entry['compile_seconds']:.1f} s)"
    return KERNELS.line(case_cells + [
        entry["competitor"], entry.get("implementation", ""), seconds(time and time["median"], 1e3),
        spread(time, 1e3), achieved(entry), limit_share(entry),
        "" if first else times(metrics.speedup_over(record["results"], entry)), check], tail)


def speedup_key(record: dict) -> str:
    """What a model row's speed-ups compare: a decode's tokens/s (from two medians), else the
    per-round times (the competitors ran the same tokens in the same rounds)."""
    return "tokens_per_s" if record["phase"] == "decode" else "time"


def model_line(record: dict, entry: dict, gate_ok: bool, progress: str = "") -> str:
    """A model row's line; gate_ok: whether the logits check passed (else no speed-ups)."""
    first, case_cells = _lead(record, entry, "phase", progress)
    time = entry.get("time")
    rate = entry.get("tokens_per_s")
    check, tail = ("ok", "") if entry["status"] == "ok" else _check(entry)
    return MODEL.line(case_cells + [
        entry["competitor"], seconds(time and time["median"]), spread(time),
        seconds(entry["time_1"]["median"]) if "time_1" in entry else "",
        f"{rate:.1f}" if rate else ("-" if entry["status"] == "ok" else ""),
        "" if first or not gate_ok else times(metrics.speedup_over(record["results"], entry, speedup_key(record))),
        check], tail)


def headline(document: dict) -> str:
    """Where and when the figures were measured, and the device's limits."""
    meta, limits = document["meta"], document["limits"]
    device, commit = meta["device"], meta["commit"]
    driver = f", driver {device['driver']}" if device.get("driver") else ""
    dirty = " (uncommitted changes)" if commit.get("dirty") else ""
    matmul = ", ".join(f"{dtype} {tflops:.3g} TFLOP/s" for dtype, tflops in limits["matmul_tflops"].items())
    return (f"gptext bench, {meta['mode']} mode: {device['name']} ({device['type']}{driver}), {meta['date']}, "
            f"commit {commit['sha'][:12]}{dirty}\n"
            f"torch {meta['versions']['torch']} (CUDA {meta['versions']['cuda'] or 'none'}), "
            f"gptext {meta['versions']['gptext']}, transformers {meta['versions']['transformers'] or 'not installed'}\n"
            f"device limits measured in this run: copy {limits['copy_gbps']:.1f} GB/s; matmul {matmul}")


def model_check_line(check: dict) -> str:
    if check["status"] == "error":
        return f"logits check ({check['input']}): error: {check.get('reason', '')}"
    return f"logits check ({check['input']}): {check_text(check)}: {check['status']}"


def render(document: dict) -> str:
    """Every table of a results document, as the live run printed them."""
    parts = [headline(document), *document.get("notes", [])]
    if document["ops"]:
        total = len(document["ops"])
        parts += [kernels_title(total), KERNELS.header()]
        for i, record in enumerate(document["ops"], 1):
            parts += [kernel_line(record, entry, f"{i}/{total}") for entry in record["results"]]
    for model in document.get("models", []):
        parts += [model_title(model["setup"]), model_check_line(model["check"]), MODEL.header()]
        total = len(model["rows"])
        for i, record in enumerate(model["rows"], 1):
            parts += [model_line(record, entry, model["check"]["status"] == "ok", f"{i}/{total}")
                      for entry in record["results"]]
    failures = document.get("failures") or []
    parts += ["", f"FAILURES ({len(failures)}):", *failures] if failures else []
    if not document.get("complete", True):
        parts += ["", "(incomplete: the run stopped before its end)"]
    return "\n".join(parts)
