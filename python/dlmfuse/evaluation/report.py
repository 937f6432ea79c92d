"""The table and the speed-against-quality chart of ``python -m dlmfuse eval``."""

from __future__ import annotations

from typing import Sequence, TextIO

from ..bench.plot import require_matplotlib

__all__ = ["print_table", "eval_figure", "write_plot"]

CACHE_MARKERS = {"none": "o", "prefix": "s", "dual": "^"}


def _share(row: dict) -> str:
    return f"{row['accepted']}/{row['prompts']} ({100 * row['compile_share']:.0f}%)"


def print_table(rows: Sequence[dict], header: str, out: TextIO) -> None:
    """The likelihood line, then one line per (sampler, cache) and the reference line."""
    print(header, file=out)
    for row in rows:
        if row["kind"] == "nll":
            print(f"\nheld-out NLL ({row['windows']} windows x {row['seq_len']} tokens, {row['ratios']} mask ratios "
                  f"each): model bound {row['model_nll']:.3f} nats/token ({row['model_bits_per_byte']:.2f} bits/byte), "
                  f"unigram {row['unigram_nll']:.3f} ({row['unigram_bits_per_byte']:.2f})", file=out)
    samplers = [r for r in rows if r["kind"] == "sampler"]
    width = max([len(r["label"]) for r in rows if r["kind"] in ("sampler", "reference")] + [7])
    print(f"\n{'sampler':<{width}}  {'cache':<6}  {'tok/fwd':>7}  {'fwd calls':>9}  {'s/completion':>12}  "
          f"{'tok/s':>7}  compiles", file=out)
    for r in samplers:
        print(f"{r['label']:<{width}}  {r['cache']:<6}  {r['tokens_per_forward']:>7.2f}  {r['forward_calls']:>9}  "
              f"{r['s_per_completion']:>12.3f}  {r['tokens_per_s']:>7.0f}  {_share(r)}", file=out)
    for r in rows:
        if r["kind"] == "reference":
            print(f"{r['label']:<{width}}  {'-':<6}  {'-':>7}  {'-':>9}  {'-':>12}  {'-':>7}  {_share(r)}", file=out)


def eval_figure(rows: Sequence[dict], title: str):
    """Two panels sharing the y axis (compile share): tokens per forward pass, and tokens per
    second; one colour per sampler, one marker per cache mode, the reference share dashed."""
    plt = require_matplotlib()
    samplers = [r for r in rows if r["kind"] == "sampler"]
    labels = list(dict.fromkeys(r["label"] for r in samplers))
    colours = {label: plt.get_cmap("tab20")(i % 20) for i, label in enumerate(labels)}
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for axis, key, name in ((axes[0], "tokens_per_forward", "tokens per forward pass"),
                            (axes[1], "tokens_per_s", "generated tokens per second (batch 1)")):
        for r in samplers:
            axis.scatter(r[key], r["compile_share"], color=colours[r["label"]],
                         marker=CACHE_MARKERS.get(r["cache"], "x"), s=55, edgecolors="black", linewidths=0.5)
        for r in rows:
            if r["kind"] == "reference":
                axis.axhline(r["compile_share"], color="grey", linestyle="--", linewidth=1)
        axis.set_xlabel(name)
        axis.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].set_ylabel("share of completions that compile")
    axes[0].set_ylim(-0.03, 1.03)
    handles = [plt.Line2D([], [], color=colours[l], marker="o", linestyle="", label=l) for l in labels]
    handles += [plt.Line2D([], [], color="black", marker=m, linestyle="", markerfacecolor="white", label=f"cache={c}")
                for c, m in CACHE_MARKERS.items() if any(r["cache"] == c for r in samplers)]
    if any(r["kind"] == "reference" for r in rows):
        handles.append(plt.Line2D([], [], color="grey", linestyle="--", label="the functions' own code"))
    figure.legend(handles=handles, loc="center left", bbox_to_anchor=(0.79, 0.5), fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 0.78, 1))
    return figure


def write_plot(rows: Sequence[dict], path: str, title: str) -> None:
    plt = require_matplotlib()
    figure = eval_figure(rows, title)
    figure.savefig(path, dpi=120)
    plt.close(figure)
