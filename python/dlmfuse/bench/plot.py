"""The ratio chart of a benchmark run (``--plot out.png``).

One panel per op family, one group of horizontal bars per dlmfuse line of the report (a workload,
or a dlmfuse variant of it such as a cache mode), one bar per peer that line is compared with
(each bar is a container labelled with its peer's name):
``peer time / dlmfuse time`` on a log axis (> 1: dlmfuse faster), the median over rounds with the
interquartile range as an error bar and the value written after the bar. Colours name the peers
in a single legend outside the panels. Floors are not bars (the table gives "% of floor").
"""

from __future__ import annotations

from typing import Sequence

from .common import KIND_DLMFUSE, format_ratio
from .report import line_label

__all__ = ["MissingMatplotlib", "require_matplotlib", "ratio_figure", "write_plot"]

BAR_SLOT_INCHES = 0.24    # vertical room per bar: more than a 7-point label needs
PANEL_EXTRA_INCHES = 0.9  # title and x axis of a panel
TITLE_INCHES = 0.6        # the figure's title (two lines when the run has a warning)
LABEL_ROOM = 4.0          # the x axis extends this factor past the largest bar, for its value label


class MissingMatplotlib(RuntimeError):
    """--plot was asked for but matplotlib is not installed."""


def require_matplotlib():
    """Return matplotlib.pyplot (non-interactive backend) or raise :class:`MissingMatplotlib`
    saying how to get it."""
    try:
        import matplotlib
    except ImportError as error:
        raise MissingMatplotlib("--plot needs matplotlib, which is not installed: "
                                "pip install matplotlib (or dlmfuse[bench])") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plotted_lines(rows: Sequence[dict]) -> dict:
    """{family: [dlmfuse rows with peer ratios]}, in run order."""
    families: dict = {}
    for row in rows:
        if row["kind"] == KIND_DLMFUSE and row["status"] == "ok" and row.get("peer_ratios"):
            families.setdefault(row["family"], []).append(row)
    return families


def ratio_figure(rows: Sequence[dict]):
    """The chart as a matplotlib Figure (the caller saves or inspects it, then closes it).
    A run in which no peer ran gives a figure with one empty panel saying so."""
    plt = require_matplotlib()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    families = _plotted_lines(rows)
    peers = list(dict.fromkeys(name for lines in families.values() for r in lines for name in r["peer_ratios"]))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(peers)}
    heights = [len(lines) * max(len(r["peer_ratios"]) for r in lines) * BAR_SLOT_INCHES + PANEL_EXTRA_INCHES
               for lines in families.values()] or [2.0]
    fig, axes = plt.subplots(len(heights), 1, figsize=(9.0, sum(heights) + TITLE_INCHES), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    device = rows[0]["device"] if rows else "?"
    title = f"dlmfuse vs peers on {device}: peer time / dlmfuse time (>1: dlmfuse faster)"
    if any((r.get("machine") or {}).get("busy") for r in rows):
        title += "\nWARNING: the machine was busy during this run; these ratios may not reproduce"
    fig.suptitle(title, fontsize=9)
    if not families:
        axes[0, 0].set_axis_off()
        axes[0, 0].text(0.5, 0.5, "no peer ran: nothing to compare", ha="center", va="center")
        return fig
    handles = {}
    for ax, (family, lines) in zip(axes[:, 0], families.items()):
        height = 0.8 / max(len(r["peer_ratios"]) for r in lines)
        values = [1.0]
        for i, row in enumerate(lines):
            names = [name for name in peers if name in row["peer_ratios"]]  # legend order
            for k, name in enumerate(names):
                r = row["peer_ratios"][name]
                y = i + (k - (len(names) - 1) / 2) * height
                bars = ax.barh([y], [r["ratio"]], height, xerr=[[r["ratio"] - r["q1"]], [r["q3"] - r["ratio"]]],
                               color=colors[name], label=name, error_kw={"elinewidth": 0.8, "capsize": 2})
                handles.setdefault(name, bars)
                ax.text(r["q3"] * 1.08, y, f"{format_ratio(r['ratio'])}x", va="center", fontsize=7,
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
                values += [r["q1"], r["q3"]]
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 1.5, max(values) * LABEL_ROOM)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(range(len(lines)))
        ax.set_yticklabels([line_label(r) for r in lines], fontsize=7)
        ax.set_ylim(len(lines) - 0.5, -0.5)  # first line on top, as in the table
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(family, fontsize=9, loc="left")
    axes[0, 0].legend([handles[n] for n in peers], peers, title="peer", fontsize=7, title_fontsize=7,
                      loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def write_plot(rows: Sequence[dict], path: str) -> None:
    """PNG of :func:`ratio_figure` (the legend outside the panels is kept in the image)."""
    plt = require_matplotlib()
    fig = ratio_figure(rows)
    try:
        fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
