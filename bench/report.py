"""Reports from results files.

    python -m bench.report FILE.json [...]               print each file's tables
    python -m bench.report --readme README.md [FILES...]  regenerate README's results section

The README section is the text between the lines <!-- bench:begin --> and
<!-- bench:end -->, rebuilt from the given results files (default: the committed
bench/results/*.json) and nothing else: the same files always give the same text. It is
grouped by device, GPUs first, newest run first, and every table is captioned with its
device's name and the run's date. Without a GPU result it says so before anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import metrics, tables
from .results import REPO, load

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
RESULTS_DIR = REPO / "bench" / "results"
# Competitors that get a speed-up column in the README, in this order; gptext's two pinned
# GEMM policies are left to the JSON (the table names the GEMM that ran instead).
README_COMPETITORS = {"eager": "vs eager", "compile": "vs torch.compile", "reference": "vs reference",
                      "torch.matmul": "vs torch.matmul"}
MODEL_COMPETITORS = {"hf": "transformers", "reference": "gptext reference"}


class ReportError(Exception):
    """A problem with the README or the results files: one line on stderr, exit status 2."""


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _day(document: dict) -> str:
    return document["meta"]["date"][:10]


def _where(document: dict) -> str:
    return f"{document['meta']['device']['name']}, {_day(document)}"


def _gptext_entry(case: dict) -> dict | None:
    return next((r for r in case["results"] if r["competitor"] == "gptext"), None)


def kernel_rows(document: dict) -> tuple[list[str], list[list[str]], int]:
    """(header, rows, sweep cases left out) of the kernel table: the key rows, one per
    case outside the row sweeps (which the JSON and the plots chart)."""
    present = {r["competitor"] for case in document["ops"] for r in case["results"]}
    columns = [name for name in README_COMPETITORS if name in present]
    header = ["op", "shape", "dtype", "gptext (ran on)", *[README_COMPETITORS[c] for c in columns], "% of limit"]
    rows, left_out = [], 0
    for case in document["ops"]:
        if case["family"] == "sweep":
            left_out += 1
            continue
        entry = _gptext_entry(case) or {}
        time = entry.get("time")
        ran = f"{tables.seconds(time['median'], 1e3)} ms ({case.get('implementation') or '-'})" if time else "-"
        if case["status"] == "ok":
            speedups = [tables.times(case["speedup"].get(c)) for c in columns]
        else:
            speedups = [f"**{case['status']}**"] * len(columns)
        rows.append([case["op"], case["label"], metrics.SHORT[case["dtype"]], ran, *speedups,
                     tables.limit_share(entry) or "-"])
    return header, rows, left_out


def _rate(row: dict, competitor: str) -> str:
    entry = next((r for r in row["results"] if r["competitor"] == competitor), None)
    if not entry:
        return "-"
    if entry["status"] != "ok":
        return entry["status"]
    return f"{entry['tokens_per_s']:.1f}" if entry.get("tokens_per_s") else "-"


def model_rows(section: dict) -> tuple[list[str], list[list[str]]]:
    header = ["phase", "batch x tokens", "gptext tokens/s",
              *[f"{label} tokens/s" for label in MODEL_COMPETITORS.values()],
              *[f"vs {label}" for label in MODEL_COMPETITORS.values()]]
    rows = []
    for row in section["rows"]:
        if row["status"] == "ok":
            speedups = [tables.times(row["speedup"].get(c)) for c in MODEL_COMPETITORS]
        else:
            speedups = [f"**{row['status']}**"] * len(MODEL_COMPETITORS)
        rows.append([row["phase"], row["label"], _rate(row, "gptext"),
                     *[_rate(row, c) for c in MODEL_COMPETITORS], *speedups])
    return header, rows


def document_section(path: str, document: dict) -> list[str]:
    meta, limits = document["meta"], document["limits"]
    device, versions = meta["device"], meta["versions"]
    matmul = ", ".join(f"{metrics.SHORT.get(d, d)} {v:.3g} TFLOP/s" for d, v in limits["matmul_tflops"].items())
    driver = f", driver {device['driver']}" if device.get("driver") else ""
    dirty = " with uncommitted changes" if meta["commit"].get("dirty") else ""
    incomplete = " **Incomplete run** (stopped before its end)." if not document["complete"] else ""
    lines = [f"Run of {_day(document)}, `{path}`: {meta['mode']} mode, commit `{meta['commit']['sha'][:12]}`"
             f"{dirty}, torch {versions['torch']} (CUDA {versions['cuda'] or 'none'}{driver}). Limits measured in "
             f"the same run: copy {limits['copy_gbps']:.1f} GB/s; matmul {matmul}.{incomplete}", ""]
    if document.get("notes"):
        lines += ["Notes: " + "; ".join(document["notes"]) + ".", ""]
    if document["ops"]:
        header, rows, left_out = kernel_rows(document)
        sweeps = f" ({left_out} row-sweep cases are in the JSON and plots.)" if left_out else ""
        lines += [f"**Kernels on {_where(document)}**: gptext's median time and the GEMM or device it ran on, "
                  f"its speed-up over each competitor (> 1: gptext faster), and its share of the binding limit "
                  f"(mem: copy bandwidth, mma: matmul peak).{sweeps}", "", *_markdown(header, rows), ""]
    for model in document["models"]:
        if not model["rows"]:
            continue
        setup = model["setup"]
        lines += [f"**Model on {_where(document)}**: {tables.model_size(setup)} in {metrics.SHORT[setup['dtype']]}, "
                  f"the same random weights in all three; {tables.model_check_line(model['check'])}. Decode tokens/s "
                  f"come from generate(N) minus generate(1) (the method is in the JSON).", "",
                  *_markdown(*model_rows(model)), ""]
    failures = document.get("failures") or []
    if failures:
        lines += [f"Failures in this run ({len(failures)}): " + "; ".join(failures), ""]
    return lines


def readme_section(files: list[tuple[str, dict]]) -> str:
    """The generated text between the markers (without them)."""
    lines = ["<!-- generated by `python -m bench.report --readme README.md` from bench/results/*.json: "
             "edit those files, not this section -->", ""]
    gpu = [f for f in files if f[1]["meta"]["device"]["type"] == "cuda"]
    if not files:
        lines += ["No benchmark results have been committed yet, GPU or CPU: run `python -m bench` (or "
                  "`bench/gpu_suite.sh` on a GPU host) and commit its results.json under `bench/results/`.", ""]
    elif not gpu:
        lines += ["**No GPU results have been committed yet**: every CUDA figure is still missing, and the tables "
                  "below were measured on a CPU only.", ""]

    newest_first = sorted(sorted(files, key=lambda f: f[0]), key=lambda f: f[1]["meta"]["date"], reverse=True)
    gpus_first = sorted(newest_first, key=lambda f: (f[1]["meta"]["device"]["type"] != "cuda",
                                                     f[1]["meta"]["device"]["name"]))
    device = None
    for path, document in gpus_first:
        here = document["meta"]["device"]
        if (here["type"], here["name"]) != device:
            device = here["type"], here["name"]
            lines += [f"### {'GPU' if here['type'] == 'cuda' else here['type'].upper()}: {here['name']}", ""]
        lines += document_section(path, document)
    return "\n".join(lines).rstrip() + "\n"


def replace_section(text: str, section: str) -> str:
    """text with the lines between the markers replaced by section."""
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ReportError(f"the README needs exactly one line {BEGIN} followed by one line {END} "
                          f"(found {len(begins)} and {len(ends)}{', in the wrong order' if begins and ends else ''})")
    return "".join(lines[: begins[0] + 1]) + section + "".join(lines[ends[0]:])


def _label(path: Path, readme: Path) -> str:
    try:
        return path.resolve().relative_to(readme.resolve().parent).as_posix()
    except ValueError:
        return path.name


def update_readme(readme: Path, files: list[Path]) -> bool:
    """Regenerates the README's section from files; whether the README changed."""
    try:
        text = readme.read_text()
    except OSError as error:
        raise ReportError(f"{readme}: cannot read ({error})") from None
    try:
        loaded = [(_label(p, readme), load(p)) for p in files]
    except ValueError as error:
        raise ReportError(str(error)) from None
    new = replace_section(text, readme_section(loaded))
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=None,
                        help="regenerate this README's section between the bench markers")
    parser.add_argument("files", nargs="*", type=Path,
                        help="results files (with --readme, default: bench/results/*.json)")
    args = parser.parse_args(argv)
    try:
        if args.readme:
            files = args.files or sorted(RESULTS_DIR.glob("*.json"))
            changed = update_readme(args.readme, files)
            print(f"{args.readme}: {'updated' if changed else 'already up to date'} from {len(files)} results file(s)")
            return 0
        if not args.files:
            parser.error("give results files to print, or --readme README.md")
        for i, path in enumerate(args.files):
            try:
                document = load(path)
            except ValueError as error:
                raise ReportError(str(error)) from None
            print(("\n" if i else "") + f"== {path}\n" + tables.render(document))
        return 0
    except ReportError as error:
        print(f"python -m bench.report: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
