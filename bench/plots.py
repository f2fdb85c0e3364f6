"""PNG plots of a results document (matplotlib, Agg: no display needed):

  speedup.png   gptext's speed-up over each other competitor, per case, one panel per op
  roofline.png  share of the device's limits (the binding one) reached per case, gptext
                beside eager and torch.compile, one panel per op
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from . import metrics  # noqa: E402

COMPARED = ("eager", "compile", "torch.matmul", "reference")
ROOFLINE = ("gptext", "eager", "compile")
COLORS = {"gptext": "#1f77b4", "eager": "#ff7f0e", "compile": "#2ca02c", "torch.matmul": "#9467bd",
          "reference": "#7f7f7f"}


def _by_op(document: dict) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for case in document["ops"]:
        grouped.setdefault(case["op"], []).append(case)
    return grouped


# Bars of the roofline plot are cut here and labelled with their value: on a CPU, cached
# working sets and a slow bf16 torch.matmul put some far above 100% (see the run's notes).
ROOFLINE_TOP = 150.0


def _tick(case: dict) -> str:
    return "\n".join([*case["label"].split(" "), metrics.SHORT[case["dtype"]]])


def _figure(document: dict, title: str):
    grouped = _by_op(document)
    widest = max(len(cases) for cases in grouped.values())
    fig, axes = plt.subplots(len(grouped), 1, figsize=(max(8.0, 1.2 * widest + 3), 3.4 * len(grouped)),
                             squeeze=False)
    meta = document["meta"]
    fig.suptitle(f"{title}\n{meta['device']['name']}, {meta['date']} ({meta['mode']} mode)", fontsize=11)
    return fig, zip(axes[:, 0], grouped.items())


def _bars(ax, cases: list[dict], series: tuple[str, ...], value, top: float | None = None) -> None:
    """Grouped bars: one group per case, one bar per series with a value there; a case whose
    gptext rows failed gets its status written instead. Bars above `top` are cut there and
    labelled with their value."""
    present = [s for s in series if any(value(case, s) is not None for case in cases)]
    width = 0.8 / max(len(present), 1)
    for i, name in enumerate(present):
        xs = [x + (i - (len(present) - 1) / 2) * width for x in range(len(cases))]
        ys = [value(case, name) if value(case, name) is not None else math.nan for case in cases]
        if top is not None:
            for x, y in zip(xs, ys):
                if y > top:
                    ax.text(x, top, f"{y:.0f}", ha="center", va="top", fontsize=6, rotation=90, color="white")
            ys = [min(y, top) for y in ys]
        ax.bar(xs, ys, width, label=name, color=COLORS.get(name))
    for x, case in enumerate(cases):
        if case["status"] != "ok":
            ax.text(x, 0.5, case["status"], ha="center", va="bottom", color="red", fontweight="bold",
                    transform=ax.get_xaxis_transform())
    ax.set_xticks(range(len(cases)), [_tick(c) for c in cases], fontsize=7)
    if present:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _speedup(case: dict, name: str) -> float | None:
    return case["speedup"].get(name)


def _roofline(case: dict, name: str) -> float | None:
    entry = next((r for r in case["results"] if r["competitor"] == name), None)
    fraction = entry and entry.get("fraction")
    return 100 * fraction["roofline"] if fraction and fraction["roofline"] is not None else None


def _plot(document: dict, path: Path, title: str, draw) -> None:
    """One panel per op, draw(ax, cases) filling each; saved as a PNG."""
    fig, panels = _figure(document, title)
    for ax, (op, cases) in panels:
        draw(ax, cases)
        ax.set_title(op, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speedup_plot(document: dict, path: Path) -> None:
    def draw(ax, cases):
        _bars(ax, cases, COMPARED, _speedup)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("speed-up (x)")

    _plot(document, path, "gptext speed-up over each competitor (> 1: gptext faster)", draw)


def roofline_plot(document: dict, path: Path) -> None:
    def draw(ax, cases):
        _bars(ax, cases, ROOFLINE, _roofline, top=ROOFLINE_TOP)
        ax.set_ylim(0, ROOFLINE_TOP * 1.15)
        ax.axhline(100.0, color="black", linewidth=0.8)
        ax.set_ylabel("% of limit")

    _plot(document, path, "share of the device's limit reached (copy bandwidth or matmul peak, whichever binds)",
          draw)


def write(document: dict, directory: Path) -> list[Path]:
    """The two plots of a document with kernel rows, into directory; their paths."""
    if not document["ops"]:
        return []
    paths = [directory / "speedup.png", directory / "roofline.png"]
    speedup_plot(document, paths[0])
    roofline_plot(document, paths[1])
    return paths
