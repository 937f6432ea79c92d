"""The ratio chart: one panel per family, the expected bars per peer (cache modes included, floors
and overheads not), the legend outside the panels, and no text drawn over another."""

import io
import itertools
import warnings

import pytest

pytest.importorskip("matplotlib")

import torch  # noqa: E402

from dlmfuse import bench  # noqa: E402
from dlmfuse.bench import common, machine, plot, runner, sampling  # noqa: E402
from dlmfuse.bench.report import line_label  # noqa: E402

CPU = torch.device("cpu")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def impl(self, name, seconds, kind="peer", peers=None, jitter=(1.0, 1.1, 0.95)):
        factors = itertools.cycle(jitter)

        def call():
            self.now += seconds * next(factors)
            return torch.zeros(1)
        return common.Impl(name, lambda: call, kind=kind, peers=peers)


@pytest.fixture
def rows(monkeypatch):
    """Rows of three families (attention, sampling, generate) with peers, a dlmfuse variant
    compared with one peer only, an overhead, a floor and cache modes."""
    clock = FakeClock()
    monkeypatch.setattr(runner, "time", clock)
    monkeypatch.setattr(machine, "calibration_seconds", lambda device: 1e-3)
    monkeypatch.setattr(machine, "start_of_run", lambda device: machine.RunLoad(0.0, 2))

    def workload(wid, desc, family, impls):
        return common.Workload(wid, desc, family, {}, lambda device: common.Case(impls=impls))

    workloads = [
        workload("C1", "block-causal 32 L=1024", "attention",
                 [clock.impl("dlmfuse", 1.0, kind="dlmfuse"), clock.impl("sdpa", 3.5), clock.impl("flex", 1.7),
                  clock.impl("flex.create_block_mask", 0.5, kind="overhead")]),
        workload("A1", "dense L=1024", "attention",
                 [clock.impl("dlmfuse", 1.0, kind="dlmfuse"), clock.impl("sdpa", 0.95), clock.impl("flex", 1.2)]),
        workload("S1", "sample [8, 32, 32000] float32 T=1", "sampling",
                 [clock.impl("dlmfuse", 1.0, kind="dlmfuse"), clock.impl("llada-fp64", 14.0),
                  clock.impl("dlmfuse.greedy", 0.8, kind="dlmfuse", peers=("torch-greedy",)),
                  clock.impl("torch-greedy", 2.0), clock.impl("floor.amax", 0.3, kind="floor")]),
        workload("E1", "generate B=1 P=64 gen=64", "generate",
                 [clock.impl("dlmfuse", 1.0, kind="dlmfuse"), clock.impl("llada-loop", 2.0),
                  clock.impl("dlmfuse.prefix", 0.6, kind="dlmfuse"), clock.impl("dlmfuse.dual", 0.5, kind="dlmfuse"),
                  clock.impl("dlmfuse.dual+threshold", 0.1, kind="dlmfuse")]),
    ]
    return bench.run(workloads, device=CPU, timing=common.Timing(warmup=0, repeats=6), out=io.StringIO(),
                     progress=io.StringIO())


def bars_by_peer(ax):
    """{peer: [bar width, ...]} of the panel's bar containers, top to bottom."""
    found = {}
    for container in ax.containers:
        if hasattr(container, "patches"):
            for patch in container.patches:
                found.setdefault(container.get_label(), []).append((patch.get_y(), patch.get_width()))
    return {name: [w for _, w in sorted(bars)] for name, bars in found.items()}


def test_one_panel_per_family_with_the_expected_series(rows):
    fig = plot.ratio_figure(rows)
    try:
        axes = fig.axes
        assert [ax.get_title(loc="left") for ax in axes] == ["attention", "sampling", "generate"]
        attention, sampling_ax, generate = axes
        expected = {"sdpa": [3.5, 0.95], "flex": [1.7, 1.2]}
        got = bars_by_peer(attention)
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name] == pytest.approx(expected[name], rel=1e-9)
        got = bars_by_peer(sampling_ax)
        assert got.keys() == {"llada-fp64", "torch-greedy"}
        assert got["llada-fp64"] == pytest.approx([14.0]) and got["torch-greedy"] == pytest.approx([2.0, 2.5])
        # Every cache mode is its own line with its ratio to the reference loop.
        assert [t.get_text() for t in generate.get_yticklabels()] == [
            "E1 generate B=1 P=64 gen=64", "E1 generate B=1 P=64 gen=64 / prefix",
            "E1 generate B=1 P=64 gen=64 / dual", "E1 generate B=1 P=64 gen=64 / dual+threshold"]
        assert bars_by_peer(generate)["llada-loop"] == pytest.approx([2.0, 2.0 / 0.6, 4.0, 20.0])
        # Floors and overheads are not series; each peer is once in the legend.
        legend = axes[0].get_legend()
        assert [t.get_text() for t in legend.get_texts()] == ["sdpa", "flex", "llada-fp64", "torch-greedy",
                                                               "llada-loop"]
        # Every value label says its bar's ratio.
        labels = sorted(t.get_text() for ax in axes for t in ax.texts)
        assert labels == sorted(["3.50x", "0.95x", "1.70x", "1.20x", "14.0x", "2.00x", "2.50x",
                                 "2.00x", "3.33x", "4.00x", "20.0x"])
    finally:
        plot.require_matplotlib().close(fig)


def _extents(fig):
    renderer = fig.canvas.get_renderer()
    texts = [fig._suptitle] + [t for ax in fig.axes for t in
                               ax.texts + ax.get_yticklabels() + ax.get_xticklabels() + [ax.title, ax._left_title]]
    legend = fig.axes[0].get_legend()
    texts += legend.get_texts() + [legend.get_title()]
    return renderer, [(t.get_text(), t.get_window_extent(renderer)) for t in texts
                      if t.get_visible() and t.get_text() and t.get_window_extent(renderer).width > 0], legend


def test_nothing_overlaps_and_the_legend_is_outside(rows):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Tight layout not applied": the layout did not fit
        fig = plot.ratio_figure(rows)
    try:
        fig.canvas.draw()
        renderer, extents, legend = _extents(fig)
        overlaps = [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(extents, 2) if box_a.overlaps(box_b)]
        assert overlaps == []
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
        for ax in fig.axes:  # value labels stay inside their panel (the axis leaves them room)
            panel = ax.get_window_extent(renderer)
            for text in ax.texts:
                label = text.get_window_extent(renderer)
                assert panel.x0 <= label.x0 and label.x1 <= panel.x1, text.get_text()
    finally:
        plot.require_matplotlib().close(fig)


def test_real_rows_plot_their_peers(tmp_path):
    """A real tiny sampling run: the panel's series are the peers that ran, greedy included."""
    rows = bench.run([sampling.workload(sampling.SampleSpec("T1", B=2, L=3, V=97))], device=CPU,
                     timing=common.Timing(warmup=0, repeats=3), out=io.StringIO(), progress=io.StringIO())
    fig = plot.ratio_figure(rows)
    try:
        (ax,) = fig.axes
        assert set(bars_by_peer(ax)) == {"llada-fp64", "torch-greedy"}
        assert [t.get_text() for t in ax.get_yticklabels()] == [line_label(r) for r in rows if r["kind"] == "dlmfuse"]
    finally:
        plot.require_matplotlib().close(fig)
    path = tmp_path / "plot.png"
    plot.write_plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_busy_run_says_so_in_the_title(rows):
    quiet = plot.ratio_figure(rows)
    # The smallest figure: one panel, one line, one bar.
    one_line = [dict(r, peer_ratios={"sdpa": r["peer_ratios"]["sdpa"]}) for r in rows
                if r["workload"] == "C1" and r["impl"] == "dlmfuse"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the two-line title must fit too
        busy = plot.ratio_figure([dict(r, machine=dict(r["machine"], busy=True)) for r in one_line])
    try:
        assert "WARNING" not in quiet._suptitle.get_text()
        assert "WARNING: the machine was busy" in busy._suptitle.get_text()
    finally:
        plot.require_matplotlib().close(quiet)
        plot.require_matplotlib().close(busy)


def test_a_run_without_peers_says_so():
    fig = plot.ratio_figure([])
    try:
        assert [t.get_text() for t in fig.axes[0].texts] == ["no peer ran: nothing to compare"]
    finally:
        plot.require_matplotlib().close(fig)
