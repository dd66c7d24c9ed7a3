"""The bench report: ratios against the same-run baselines, a table, JSON, and a PNG."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from cellserve.client.bench.baselines.ort import OrtResult
from cellserve.client.bench.measure import Result
from cellserve.client.model_info import ModelInfo


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def same_run_ratios(results: dict[str, Result]) -> dict[str, float | None]:
    """cellserve against the echo and naive servers measured alongside it (one round, or pooled), and the
    compare server (``--compare-serve-arg``) against cellserve."""
    cs = results["cellserve"]
    echo, naive, compare = results.get("echo"), results.get("naive"), results.get("compare")
    ratios = {
        "msgs_vs_echo": _ratio(cs.msgs_per_s, echo.msgs_per_s) if echo else None,
        "p50_vs_echo": _ratio(cs.percentiles_ms()["p50"], echo.percentiles_ms()["p50"]) if echo else None,
        "p99_vs_echo": _ratio(cs.percentiles_ms()["p99"], echo.percentiles_ms()["p99"]) if echo else None,
        "server_cpu_vs_echo": _ratio(cs.server_cpu_s_per_msg, echo.server_cpu_s_per_msg) if echo else None,
        "loop_cpu_vs_echo": _ratio(cs.server_loop_cpu_s_per_msg, echo.server_loop_cpu_s_per_msg) if echo else None,
        "msgs_vs_naive": _ratio(cs.msgs_per_s, naive.msgs_per_s) if naive else None,
    }
    if compare is not None:  # the second cellserve server (--compare-serve-arg) against the first
        ratios["compare_msgs_vs_cellserve"] = _ratio(compare.msgs_per_s, cs.msgs_per_s)
        ratios["compare_p99_vs_cellserve"] = _ratio(compare.percentiles_ms()["p99"], cs.percentiles_ms()["p99"])
        ratios["compare_server_cpu_vs_cellserve"] = _ratio(compare.server_cpu_s_per_msg, cs.server_cpu_s_per_msg)
    return ratios


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def pooled(rounds: list[dict[str, Result]]) -> dict[str, Result]:
    """Each target's rounds pooled into one measurement (``Result.pooled``), for its own figures."""
    return {name: Result.pooled([r[name] for r in rounds]) for name in rounds[0]}


def config_entry(rounds: list[dict[str, Result]], results: dict[str, Result], ort: OrtResult | None) -> dict[str, Any]:
    """One configuration: cellserve, the baselines, and the ratios the README quotes.

    ``results`` are the targets' pooled rounds (:func:`pooled`). A ratio against echo, naive or the
    compare server is the median, over the rounds, of that round's ratio: both sides of it ran minutes
    apart at most, so drift on a shared machine cancels. With one round it is simply that round's ratio.
    The raw-ORT ratios divide the pooled cellserve figures by the one ORT measurement.
    """
    cs = results["cellserve"]
    per_round = [same_run_ratios(r) for r in rounds]
    ratios: dict[str, float | None] = {k: _median([r[k] for r in per_round]) for k in per_round[0]}
    ratios["steps_vs_ort"] = _ratio(cs.steps_per_s, ort.steps_per_s) if ort else None
    ratios["engine_vs_ort"] = _ratio(cs.engine_s_per_call, ort.s_per_call) if ort else None
    figures = {k: {**v.to_json(), "msgs_per_s_rounds": [r[k].msgs_per_s for r in rounds]} for k, v in results.items()}
    baselines: dict[str, Any] = {k: v for k, v in figures.items() if k != "cellserve"}
    if ort is not None:
        baselines["ort"] = ort.to_json()
    return {
        "streams": cs.streams,
        "t": cs.t,
        "cellserve": figures["cellserve"],
        "baselines": baselines,
        "ratios": ratios,
        "round_ratios": per_round,
    }


# The msgs/s ratios shown per round (table) and drawn per round (PNG): key in round_ratios, label, and the
# target the ratio is about (its colour in the PNG).
ROUND_SERIES = (
    ("msgs_vs_echo", "msgs/echo", "echo"),
    ("msgs_vs_naive", "msgs/naive", "naive"),
    ("compare_msgs_vs_cellserve", "compare/cellserve msgs", "compare"),
)


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def table(configs: list[dict[str, Any]]) -> str:
    """Plain-text table: one row per target and configuration, then the ratios."""
    head = f"{'target':>9} {'streams':>7} {'T':>3} {'msgs/s':>10} {'steps/s':>11} {'p50 ms':>8} {'p90 ms':>8} " \
           f"{'p99 ms':>8} {'p99.9 ms':>9} {'batch':>6} {'srv µs/msg':>10} {'loop µs/msg':>11} " \
           f"{'cli µs/msg':>10}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for c in configs:
        rows = [("cellserve", c["cellserve"])] + [(k, v) for k, v in c["baselines"].items() if k != "ort"]
        for name, r in rows:
            p = r["latency_ms"]
            lines.append(
                f"{name:>9} {c['streams']:>7} {c['t']:>3} {r['msgs_per_s']:>10,.0f} {r['steps_per_s']:>11,.0f} "
                f"{p['p50']:>8.2f} {p['p90']:>8.2f} {p['p99']:>8.2f} {p['p99_9']:>9.2f} {_fmt(r['mean_batch'], 1):>6} "
                f"{_fmt(r['server_cpu_us_per_msg'], 0):>10} {_fmt(r['server_loop_cpu_us_per_msg'], 0):>11} "
                f"{_fmt(r['client_cpu_us_per_msg'], 0):>10}"
            )
        ort = c["baselines"].get("ort")
        if ort:
            fixed = " (the graph's batch is fixed at 1: raw ORT runs batch-1 calls)" if ort.get("fixed_batch") else ""
            lines.append(f"{'raw ORT':>9} {'':>7} {c['t']:>3} {'':>10} {ort['steps_per_s']:>11,.0f} "
                         f"{ort['ms_per_call']:>8.3f} ms/call at batch {ort['batch']}{fixed}")  # fmt: skip
        r = c["ratios"]
        lines.append(
            f"{'ratios':>9}  msgs/echo {_fmt(r['msgs_vs_echo'])}  p50/echo {_fmt(r['p50_vs_echo'])}  "
            f"p99/echo {_fmt(r['p99_vs_echo'])}  msgs/naive {_fmt(r['msgs_vs_naive'])}  "
            f"steps/ORT {_fmt(r['steps_vs_ort'])}  engine/ORT {_fmt(r['engine_vs_ort'])}"
        )
        if "echo" in c["baselines"]:
            lines.append(
                f"{'':>9}  server CPU per message/echo {_fmt(r['server_cpu_vs_echo'])}, "
                f"its event loop's/echo's {_fmt(r['loop_cpu_vs_echo'])}"
            )
        if "compare_msgs_vs_cellserve" in r:
            lines.append(
                f"{'':>9}  compare/cellserve: msgs {_fmt(r['compare_msgs_vs_cellserve'])}  "
                f"p99 {_fmt(r['compare_p99_vs_cellserve'])}  server CPU {_fmt(r['compare_server_cpu_vs_cellserve'])}"
            )
        rounds = c["round_ratios"]
        for key, what, _ in ROUND_SERIES:
            if len(rounds) > 1 and rounds[0].get(key) is not None:
                each = " ".join(_fmt(x[key]) for x in rounds)
                lines.append(f"{'':>9}  {what} per round: {each} (the ratios above: medians over {len(rounds)} rounds)")
        lines.append("")
    return "\n".join(lines)


def run_meta(info: ModelInfo, server: str, default_command: str) -> dict[str, Any]:
    """What every bench report records about its run: command, time, model, server and machine."""
    return {
        "command": " ".join(["cellserve", *sys.argv[1:]]) if sys.argv else default_command,
        "unix_time": time.time(),
        "model": {
            "name": info.name,
            "sha256": info.sha256,
            "layers": info.layers,
            "hidden": info.hidden,
            "input_kind": info.input_kind,
            "input_size": info.input_size,
            "output_size": info.output_size,
            # the general contract (issue 25): what a step is, and every state a session carries
            "input_dtype": info.input_dtype,
            "frame": list(info.frame or ()),  # -1: dynamic
            "time_axis": info.time_axis,
            "output_frame": list(info.output_frame or ()),
            "states": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                for t in info.inputs
                if t.role.startswith("state")
            ],
        },
        "server": server,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False))


def write_png(configs: list[dict[str, Any]], path: Path) -> bool:
    """Latency CDF per configuration, and throughput vs concurrency. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    ts = sorted({c["t"] for c in configs})
    by_round = [c for c in configs if len(c["round_ratios"]) > 1
                and any(r.get(key) is not None for r in c["round_ratios"] for key, _, _ in ROUND_SERIES)]  # fmt: skip
    panels = len(ts) + 1 + (1 if by_round else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5))
    styles = {"cellserve": "-", "echo": "--", "naive": ":", "raw ORT": "-.", "compare": (0, (5, 1, 1, 1))}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    by_streams = {s: colors[i % len(colors)] for i, s in enumerate(sorted({c["streams"] for c in configs}))}
    qs = [i / 100 for i in range(101)]
    for ax, t in zip(axes, ts, strict=False):  # one latency-CDF panel per T: colour = streams, style = target
        for c in (c for c in configs if c["t"] == t):
            for name, r in [("cellserve", c["cellserve"])] + [(k, v) for k, v in c["baselines"].items() if k != "ort"]:
                ax.plot(r["latency_cdf_ms"], qs, linestyle=styles.get(name, "-"), color=by_streams[c["streams"]],
                        label=f"{name} s={c['streams']}", linewidth=1.3)  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("round-trip latency per message (ms)")
        ax.set_ylabel("fraction of messages")
        ax.set_title(f"Latency CDF, T={t} steps per message")
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
    target_colors = {"cellserve": colors[0], "echo": colors[1], "naive": colors[2], "raw ORT": colors[3],
                     "compare": colors[4]}  # fmt: skip
    throughput_panel(axes[len(ts)], configs, target_colors)
    if by_round:
        _rounds_panel(axes[-1], by_round, {"echo": colors[1], "naive": colors[2], "compare": colors[4]})
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _throughput_series(configs: list[dict[str, Any]], t: int) -> tuple[list[int], dict[str, list[float]]]:
    """The streams run at ``t``, and each target's steps/s at them (a baseline only where every one has it)."""
    cs = sorted((c for c in configs if c["t"] == t), key=lambda c: c["streams"])
    series = {"cellserve": [c["cellserve"]["steps_per_s"] for c in cs]}
    for name, key in (("echo", "echo"), ("naive", "naive"), ("raw ORT", "ort"), ("compare", "compare")):
        if all(key in c["baselines"] for c in cs):
            series[name] = [c["baselines"][key]["steps_per_s"] for c in cs]
    return [c["streams"] for c in cs], series


def throughput_panel(ax: Any, configs: list[dict[str, Any]], colors: dict[str, str]) -> None:
    """Steps/s against concurrency: a curve per target and T where the run has several stream counts; bars (one
    group per T) where it has one, since a single x-value makes no curve."""
    ts = sorted({c["t"] for c in configs})
    if len({c["streams"] for c in configs}) == 1:
        labelled: set[str] = set()
        for i, t in enumerate(ts):
            _, series = _throughput_series(configs, t)
            width = 0.8 / len(series)
            for j, (name, vals) in enumerate(series.items()):
                x = i + (j - (len(series) - 1) / 2) * width
                ax.bar(x, vals[0], width, color=colors[name], label=None if name in labelled else name)
                ax.annotate(f"{vals[0]:,.0f}", (x, vals[0]), ha="center", va="bottom", fontsize=7)
                labelled.add(name)
        ax.set_xticks(range(len(ts)), [f"T={t}" for t in ts])
        ax.set_xlabel(f"{configs[0]['streams']} concurrent streams")
        ax.set_title("Throughput, one concurrency")
    else:
        t_styles = ["o-", "s--", "^:", "d-."]
        for i, t in enumerate(ts):
            streams, series = _throughput_series(configs, t)
            for name, vals in series.items():
                ax.plot(streams, vals, t_styles[i % len(t_styles)], color=colors[name], label=f"{name} T={t}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title("Throughput vs concurrency")
    ax.set_yscale("log")
    ax.set_ylabel("steps/s (messages/s × T)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")


def _rounds_panel(ax: Any, configs: list[dict[str, Any]], colors: dict[str, str]) -> None:
    """Each round's msgs/s ratio against echo and naive, and the compare server's to cellserve (dots), and
    their medians (bars): the spread a single run would have hidden."""
    labels, labelled = [], set()
    for i, c in enumerate(configs):
        labels.append(f"s={c['streams']}\nT={c['t']}")
        for j, (key, _, name) in enumerate(ROUND_SERIES):
            values = [r[key] for r in c["round_ratios"] if r.get(key) is not None]
            if not values:
                continue
            x = i + (j - 1) * 0.25
            first = name not in labelled
            labelled.add(name)
            what = "compare ÷ cellserve" if name == "compare" else f"÷ {name}"
            ax.plot([x] * len(values), values, "o", color=colors[name], alpha=0.6,
                    label=f"{what}, one round" if first else None)  # fmt: skip
            ax.hlines(c["ratios"][key], x - 0.1, x + 0.1, color=colors[name], linewidth=2.5,
                      label=f"{what}, median" if first else None)  # fmt: skip
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(configs)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("msgs/s ratio within one round")
    ax.set_title(f"Same-round ratios, {len(configs[0]['round_ratios'])} rounds")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both", axis="y")
