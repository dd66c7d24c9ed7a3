"""`cellserve bench --rounds K`: targets pooled over rounds, ratios as medians of same-round ratios."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellserve.client.bench.command import BenchError
from cellserve.client.bench.measure import Result, round_order
from cellserve.client.bench.report import config_entry, pooled, table
from cellserve.server.cli import main as cellserve_main


def _result(target: str, msgs_per_s: float, p99_ms: float, cpu_us: float | None, *, n: int = 1000) -> Result:
    """A round of ``n`` messages at ``msgs_per_s``, its latencies spread evenly up to ``p99_ms``-ish."""
    latencies = np.linspace(0.0, p99_ms / 0.99, n) / 1e3
    r = Result(target, 64, 1, n, n / msgs_per_s, latencies)
    r.server_cpu_s_per_msg = None if cpu_us is None else cpu_us / 1e6
    r.client_cpu_s_per_msg = 100e-6
    return r


def test_pooling_weights_per_message_figures_by_messages_and_per_call_ones_by_calls():
    a = _result("cellserve", 1000.0, 10.0, 100.0, n=1000)
    b = _result("cellserve", 3000.0, 10.0, 200.0, n=3000)
    a.mean_batch, b.mean_batch = 10.0, 30.0  # 100 engine calls each
    a.engine_s_per_call, b.engine_s_per_call = 1e-3, 3e-3
    both = Result.pooled([a, b])
    assert both.messages == 4000 and math.isclose(both.seconds, 2.0)
    assert math.isclose(both.msgs_per_s, 2000.0)  # all messages over all seconds, not a mean of rates
    assert len(both.latencies_s) == 4000
    assert math.isclose(both.server_cpu_s_per_msg, (1000 * 100e-6 + 3000 * 200e-6) / 4000)
    assert math.isclose(both.mean_batch, 4000 / 200)  # messages over calls, not 25 (weighted by messages)
    assert math.isclose(both.engine_s_per_call, 2e-3)
    assert both.server_loop_cpu_s_per_msg is None  # no round had it
    assert Result.pooled([a]) is a


def test_ratios_are_medians_of_the_same_round_ratios_and_every_round_is_kept():
    # Round 2 is an outlier for echo (a noisy neighbour in its slice): the median ignores it, a pooled
    # ratio would not.
    rounds = [
        {"echo": _result("echo", 10_000.0, 10.0, 100.0), "cellserve": _result("cellserve", 7_000.0, 12.0, 150.0)},
        {"echo": _result("echo", 4_000.0, 10.0, 100.0), "cellserve": _result("cellserve", 7_200.0, 11.0, 140.0)},
        {"echo": _result("echo", 9_000.0, 10.0, 100.0), "cellserve": _result("cellserve", 6_600.0, 13.0, None)},
    ]
    entry = config_entry(rounds, pooled(rounds), None)
    per_round = [r["msgs_vs_echo"] for r in entry["round_ratios"]]
    assert per_round == pytest.approx([0.7, 1.8, 6_600 / 9_000])
    assert entry["ratios"]["msgs_vs_echo"] == pytest.approx(6_600 / 9_000)
    assert entry["ratios"]["p99_vs_echo"] == pytest.approx(1.2, rel=0.01)
    assert entry["ratios"]["p50_vs_echo"] == pytest.approx(1.2, rel=0.01)
    # a round without the server's CPU (None) is left out of that median, not counted as zero
    assert entry["ratios"]["server_cpu_vs_echo"] == pytest.approx((1.5 + 1.4) / 2)
    assert entry["ratios"]["msgs_vs_naive"] is None and entry["ratios"]["steps_vs_ort"] is None
    assert entry["cellserve"]["messages"] == 3000 and entry["baselines"]["echo"]["messages"] == 3000
    assert entry["baselines"]["echo"]["msgs_per_s_rounds"] == pytest.approx([10_000.0, 4_000.0, 9_000.0])
    text = table([entry])
    assert "msgs/echo per round: 0.70 1.80 0.73 (the ratios above: medians over 3 rounds)" in text
    only = [{"cellserve": r["cellserve"]} for r in rounds]
    alone = table([config_entry(only, pooled(only), None)])  # e.g. --baselines ort
    assert "per round" not in alone and "server CPU per message/echo" not in alone


@pytest.mark.parametrize("names", [["echo", "cellserve"], ["echo", "cellserve", "naive"],
                                   ["echo", "cellserve", "compare", "naive"]])  # fmt: skip
def test_round_orders_alternate_every_pair_and_vary_the_first_and_last(names):
    orders = [round_order(names, r) for r in range(2 * len(names))]
    assert orders[0] == names
    assert all(sorted(o) == sorted(names) for o in orders)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            before = [o.index(a) < o.index(b) for o in orders]
            assert before.count(True) == before.count(False), (a, b, orders)  # drift cannot favour one side
    assert {o[0] for o in orders} == set(names) and {o[-1] for o in orders} == set(names)
    assert round_order(["cellserve"], 5) == ["cellserve"]


def test_rounds_below_one_are_refused_in_one_line(capsys):
    assert cellserve_main(["bench", "--rounds", "0", "--server", "127.0.0.1:1", "--baselines", "echo"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "cellserve bench: error: --rounds is 0; it must be >= 1"


def test_streams_and_t_take_lists_and_every_pair_runs():
    import argparse

    from cellserve.client.bench.options import add_bench_flags
    from cellserve.client.bench.runner import bench_configs

    p = argparse.ArgumentParser()
    add_bench_flags(p)
    args = p.parse_args(["--streams", "1,64,256,64", "-T", "1,32"])
    assert args.streams == [1, 64, 256]  # in the order given, each once
    assert bench_configs(args) == [(1, 1), (64, 1), (256, 1), (1, 32), (64, 32), (256, 32)]
    assert bench_configs(p.parse_args([])) == [(16, 1)]
    with pytest.raises(BenchError, match="either --sweep or the lists"):
        bench_configs(p.parse_args(["--sweep", "--streams", "64"]))


@pytest.mark.parametrize("flag", ["--streams", "-T"])
@pytest.mark.parametrize("value", ["0", "64,0", "many", "1,,x", ""])
def test_bad_counts_are_usage_errors_that_say_what_to_give(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        cellserve_main(["bench", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "1,64,256" in err and "Traceback" not in err


def test_a_report_with_rounds_draws_the_same_round_ratio_panel(tmp_path):
    pytest.importorskip("matplotlib")
    from cellserve.client.bench.report import write_png

    rounds = [
        {name: _result(name, rate, 10.0, 100.0) for name, rate in (("echo", 9_000.0), ("cellserve", 6_000.0))}
        for _ in range(2)
    ]
    entry = config_entry(rounds, pooled(rounds), None)
    assert write_png([entry], tmp_path / "bench.png")
    import matplotlib.image

    width = matplotlib.image.imread(tmp_path / "bench.png").shape[1]
    assert write_png([config_entry(rounds[:1], pooled(rounds[:1]), None)], tmp_path / "one.png")
    assert width > matplotlib.image.imread(tmp_path / "one.png").shape[1]  # one panel more than one round gets
    only = [{"cellserve": r["cellserve"]} for r in rounds]
    alone = config_entry(only, pooled(only), None)  # rounds, but no ratio to draw
    assert write_png([alone], tmp_path / "alone.png")
    assert matplotlib.image.imread(tmp_path / "alone.png").shape[1] < width


def test_compare_runs_a_second_server_with_its_flags_in_every_round(tiny_model_dir, tmp_path):
    """`--compare-serve-arg` starts a second cellserve with the extra flag; both run in each round. Its output
    is piped: the table has its legend, and no progress bar clutters stderr (no --no-progress needed)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "cellserve.server.cli", "--log-level", "WARNING", "bench", "--model-dir",
           str(tiny_model_dir), "--streams", "3", "-T", "1", "--messages", "90", "--warmup", "0.1", "--rounds", "2",
           "--baselines", "echo", "--compare-serve-arg=--max-batch=1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compare/cellserve: msgs" in proc.stdout
    assert "Legend" in proc.stdout and "compare/cellserve" in proc.stdout.split("Legend")[1]
    assert "msg/s]" not in proc.stderr and "\r" not in proc.stderr  # tqdm's rate and redraws: no bar
    report = json.loads((out / "bench.json").read_text())
    assert report["meta"]["compare_serve_args"] == ["--max-batch=1"]
    (cfg,) = report["configs"]
    compare, cs = cfg["baselines"]["compare"], cfg["cellserve"]
    assert compare["messages"] == cs["messages"] == 2 * 90  # both ran in both rounds
    assert compare["mean_batch"] == 1.0  # the flag reached the second server (its own /metrics)
    assert cs["mean_batch"] > 1.0  # and not the first: 3 sessions batch together by default
    assert [r["compare_msgs_vs_cellserve"] > 0 for r in cfg["round_ratios"]] == [True, True]
    assert cfg["ratios"]["compare_msgs_vs_cellserve"] == pytest.approx(
        float(np.median([r["compare_msgs_vs_cellserve"] for r in cfg["round_ratios"]]))
    )


def test_compare_cannot_be_used_with_server(capsys):
    argv = ["bench", "--server", "127.0.0.1:1", "--compare-serve-arg=--workers=2", "--baselines", "echo"]
    assert cellserve_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("cellserve bench: error: --compare-serve-arg starts a second server")
