"""`cellserve bench` read by someone who did not write it: a legend under the table, no progress bar in piped
output, and no one-point "curve" in the PNG."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest

from cellserve.client.bench.baselines.ort import OrtResult
from cellserve.client.bench.legend import legend
from cellserve.client.bench.measure import Result, terminal_bar
from cellserve.client.bench.report import config_entry, pooled, table


def _result(target: str, streams: int, msgs_per_s: float, *, t: int = 1, n: int = 500) -> Result:
    r = Result(target, streams, t, n, n / msgs_per_s, np.linspace(1e-4, 2e-3, n))
    r.server_cpu_s_per_msg, r.server_loop_cpu_s_per_msg, r.client_cpu_s_per_msg = 150e-6, 120e-6, 100e-6
    return r


def _entry(streams: int, targets: tuple[str, ...] = ("echo", "cellserve", "naive"), *, t: int = 1) -> dict:
    rounds = [{name: _result(name, streams, 1000.0 * (i + 1), t=t) for i, name in enumerate(targets)}]
    results = pooled(rounds)
    results["cellserve"].mean_batch, results["cellserve"].engine_s_per_call = 30.0, 1e-3
    return config_entry(rounds, results, OrtResult(30, t, 100, 0.5e-3))


def test_the_legend_explains_every_column_and_each_ratio_the_run_has():
    full = legend([_entry(64)])
    for label in ("msgs/s", "p50", "batch", "srv µs/msg", "loop µs/msg", "cli µs/msg", "msgs/echo", "p99/echo",
                  "msgs/naive", "steps/ORT", "engine/ORT"):  # fmt: skip
        assert label in full, label
    # each says against what and which values are good: the figures a new user could not read before
    assert "raw onnxruntime" in full and "batch cellserve formed" in full
    assert "target ≤ 1.2" in full  # engine/ORT
    assert "saturated" in full  # loop µs/msg
    assert "shares the cores" in full  # cli µs/msg
    echo_only = legend([_entry(64, ("echo", "cellserve"))])
    assert "msgs/naive" not in echo_only and "msgs/echo" in echo_only  # only ratios the run has a value of
    assert "compare/cellserve" not in full
    assert table([_entry(64)]).splitlines()[0].split() == ["target", "streams", "T", "msgs/s", "steps/s", "p50", "ms",
                                                          "p90", "ms", "p99", "ms", "p99.9", "ms", "batch", "srv",
                                                          "µs/msg", "loop", "µs/msg", "cli", "µs/msg"]  # fmt: skip


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_draws_only_on_a_terminal(monkeypatch):
    for stream, drawn in ((io.StringIO(), False), (_Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = terminal_bar(100, "cellserve s=1 T=1", wanted=True)
        bar.update(50)
        bar.refresh()
        bar.close()
        assert ("cellserve s=1 T=1" in stream.getvalue()) is drawn
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    terminal_bar(10, "x", wanted=False).close()  # --no-progress on a terminal
    assert quiet.getvalue() == ""


@pytest.mark.parametrize(("streams", "curves"), [((64,), False), ((1, 64), True)])
def test_throughput_is_a_curve_only_over_several_stream_counts(streams, curves):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellserve.client.bench.report import throughput_panel

    configs = [_entry(s, t=t) for t in (1, 32) for s in streams]
    fig, ax = plt.subplots()
    colors = {"cellserve": "C0", "echo": "C1", "naive": "C2", "raw ORT": "C3", "compare": "C4"}
    throughput_panel(ax, configs, colors)
    drawn = [line for line in ax.get_lines() if line.get_linestyle() not in ("None", "")]
    if curves:
        assert len(drawn) == 4 * 2 and all(len(line.get_xdata()) == len(streams) for line in drawn)
        assert not ax.patches
    else:
        assert not drawn  # no line through one point
        assert len(ax.patches) == 4 * 2  # a bar per target (cellserve, echo, naive, raw ORT) and T
        assert [t.get_text() for t in ax.get_xticklabels()] == ["T=1", "T=32"]
    plt.close(fig)
