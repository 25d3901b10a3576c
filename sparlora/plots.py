"""Figures of a method comparison, written as PNG with matplotlib's Agg renderer.

Figures are built with `matplotlib.figure.Figure`, not pyplot, so no display and no
global backend state are involved. Each function returns the series it drew, in
percent, so tests can check the numbers without reading pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from sparlora.compare import Run
    from sparlora.score import ScoreResult

DPI = 120
# Ten colors, then the same colors dashed and dotted, so up to 30 runs stay apart.
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
          "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
LINE_STYLES = ("-", "--", ":")
HIGHLIGHTED_METHOD = "sparlora"


def line_style(index: int) -> dict:
    """Return the color and line style of the `index`-th series of a figure."""
    return {"color": COLORS[index % len(COLORS)], "linestyle": LINE_STYLES[(index // len(COLORS)) % len(LINE_STYLES)]}


def legend_label(text: str) -> str:
    """Return `text` as matplotlib shows it literally: `$` escaped (no math mode), and a
    leading space before `_`, since matplotlib leaves labels that start with `_` out of legends."""
    text = text.replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text


def add_legend(figure: Figure, axes) -> None:
    """Place the legend of `axes` to the right of the plot area, where it covers no data."""
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    figure.tight_layout()


def plot_dev_cer(runs: Sequence["Run"], path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Draw the dev CER after each epoch, one line per run; return {run tag: (epochs, CER %)}.

    Runs without dev CER are left out. Nothing is written when no run has one.
    """
    series = {}
    for run in runs:
        points = [(int(record["epoch"]), 100 * record["dev_cer"]) for record in run.epochs if "dev_cer" in record]
        if points:
            series[run.tag] = ([epoch for epoch, _ in points], [cer for _, cer in points])
    if not series:
        return {}

    methods = {run.tag: run.method for run in runs}
    figure = Figure(figsize=(8.0, 4.4), dpi=DPI)
    axes = figure.add_subplot()
    for index, (tag, (epochs, cers)) in enumerate(series.items()):
        width = 2.4 if methods[tag] == HIGHLIGHTED_METHOD else 1.2
        axes.plot(epochs, cers, marker="o", markersize=3, linewidth=width, label=legend_label(tag), **line_style(index))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("dev CER (%)")
    axes.set_title("Dev CER per epoch")
    axes.grid(alpha=0.3)
    add_legend(figure, axes)
    figure.savefig(path, bbox_inches="tight")
    return series


def plot_cer_vs_rank(runs: Sequence["Run"], test_sets: Sequence[str], path: Path,
                     base: Mapping[str, "ScoreResult"] | None = None) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Draw test CER against rank, one panel per test set and one line per method.

    Returns {test set: {method: (ranks, CER %)}} for methods with a rank. A method
    without rank (full fine-tuning) and the base model's zero-shot CER are drawn as
    horizontal lines. Nothing is written when no method has two ranks or more, since one
    point per method shows no trend.
    """
    ranked = {}
    for run in runs:
        if run.rank > 0:
            ranked.setdefault(run.method, []).append(run)
    if not any(len({run.rank for run in method_runs}) > 1 for method_runs in ranked.values()):
        return {}
    unranked = [run for run in runs if run.rank == 0]

    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    figure = Figure(figsize=(3.6 * len(test_sets) + 2.0, 4.0), dpi=DPI)
    all_ranks = sorted({run.rank for run in runs if run.rank > 0})
    for index, test_set in enumerate(test_sets):
        axes = figure.add_subplot(1, len(test_sets), index + 1)
        series[test_set] = {}
        for style_index, (method, method_runs) in enumerate(sorted(ranked.items())):
            points = sorted((run.rank, run.scores[test_set].cer) for run in method_runs if run.scores[test_set].cer is not None)
            ranks = [rank for rank, _ in points]
            cers = [100 * cer for _, cer in points]
            series[test_set][method] = (ranks, cers)
            width = 2.4 if method == HIGHLIGHTED_METHOD else 1.2
            axes.plot(ranks, cers, marker="o", linewidth=width, label=legend_label(method), **line_style(style_index))
        for offset, run in enumerate(unranked):
            if run.scores[test_set].cer is not None:
                color = line_style(len(ranked) + offset)["color"]
                axes.axhline(100 * run.scores[test_set].cer, linestyle="--", color=color, label=legend_label(f"{run.method} (no rank)"))
        if base and test_set in base and base[test_set].cer is not None:
            axes.axhline(100 * base[test_set].cer, linestyle=":", color="black", label="base model, zero-shot")
        axes.set_xscale("log", base=2)
        axes.set_xticks(all_ranks, [str(rank) for rank in all_ranks])
        axes.set_xlabel("rank")
        axes.set_ylabel("CER (%)")
        axes.set_title(test_set)
        axes.grid(alpha=0.3)
    add_legend(figure, figure.axes[-1])
    figure.savefig(path, bbox_inches="tight")
    return series
