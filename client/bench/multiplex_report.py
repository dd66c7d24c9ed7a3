"""The report of ``cellserve bench --sessions-per-message K``: ratios to the same-run baselines, a table with its
legend, the JSON entry of each configuration, and a PNG.

Ratios against the echo targets and the compare server are medians of same-round ratios (as ``report``'s are);
the raw-ORT ratios divide the pooled cellserve figures by the one onnxruntime measurement after the rounds.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from cellserve.client.bench.baselines.ort import OrtResult
from cellserve.client.bench.measure import Result
from cellserve.client.bench.report import _fmt, _median, _ratio

ROWS = ("cellserve", "compare", "echo", "echo_single")  # table order


def same_round_ratios(results: dict[str, Result]) -> dict[str, float | None]:
    """One round: cellserve against the echo of the same messages, the session-steps against single-session echo's
    messages (each of them T steps: ÷ msgs/s × T), and the compare server against cellserve."""
    cs, echo, single, compare = (results.get(k) for k in ("cellserve", "echo", "echo_single", "compare"))
    assert cs is not None
    lat = cs.percentiles_ms()
    ratios = {
        "steps_vs_echo_msgs": _ratio(cs.steps_per_s, single.msgs_per_s * single.t) if single else None,
        "msgs_vs_echo": _ratio(cs.msgs_per_s, echo.msgs_per_s) if echo else None,
        "p50_vs_echo": _ratio(lat["p50"], echo.percentiles_ms()["p50"]) if echo else None,
        "p99_vs_echo": _ratio(lat["p99"], echo.percentiles_ms()["p99"]) if echo else None,
        "server_cpu_vs_echo": _ratio(cs.server_cpu_s_per_msg, echo.server_cpu_s_per_msg) if echo else None,
    }
    if compare is not None:
        ratios["compare_steps_vs_cellserve"] = _ratio(compare.steps_per_s, cs.steps_per_s)
        ratios["compare_p99_vs_cellserve"] = _ratio(compare.percentiles_ms()["p99"], lat["p99"])
        ratios["compare_server_cpu_vs_cellserve"] = _ratio(compare.server_cpu_s_per_msg, cs.server_cpu_s_per_msg)
    return ratios


def _figures(r: Result, rounds: list[dict[str, Result]], name: str) -> dict[str, Any]:
    steps_per_msg = r.rows * r.t
    cpu = None if r.server_cpu_s_per_msg is None else r.server_cpu_s_per_msg * 1e6 / steps_per_msg
    return {
        **r.to_json(),
        "streams": r.streams,
        "sessions_per_message": r.rows,
        "server_cpu_us_per_session_step": cpu,
        "msgs_per_s_rounds": [x[name].msgs_per_s for x in rounds],
    }


def config_entry(
    rounds: list[dict[str, Result]],
    results: dict[str, Result],
    ort_rounds: list[OrtResult],
    formed: OrtResult | None = None,
    *,
    inflight: int = 1,
) -> dict[str, Any]:
    """One configuration: cellserve, the baselines, and the ratios (``steps_vs_raw_ort`` and
    ``steps_vs_echo_msgs`` are the issue's acceptance figures). ``ort_rounds``: raw ORT at batch K, one per round
    (or none)."""
    cs = results["cellserve"]
    per_round = [same_round_ratios(r) for r in rounds]
    for i, ratios_r in enumerate(per_round):  # each round's cellserve over that round's raw ORT
        ort_r = ort_rounds[i] if i < len(ort_rounds) else None
        ratios_r["steps_vs_raw_ort"] = _ratio(rounds[i]["cellserve"].steps_per_s, ort_r.steps_per_s) if ort_r else None
        compare, single = rounds[i].get("compare"), rounds[i].get("echo_single")
        if compare is not None:  # the compare server against the same baselines (e.g. --workers=2)
            ratios_r["compare_steps_vs_raw_ort"] = _ratio(compare.steps_per_s, ort_r.steps_per_s) if ort_r else None
            ratios_r["compare_steps_vs_echo_msgs"] = (
                _ratio(compare.steps_per_s, single.msgs_per_s * single.t) if single else None
            )
    ratios: dict[str, float | None] = {k: _median([r[k] for r in per_round]) for k in per_round[0]}
    ort = OrtResult.pooled(ort_rounds) if ort_rounds else None
    ratios["steps_vs_raw_ort_formed"] = _ratio(cs.steps_per_s, formed.steps_per_s) if formed else None
    nearest = formed or ort
    ratios["engine_vs_ort"] = _ratio(cs.engine_s_per_call, nearest.s_per_call) if nearest else None
    baselines: dict[str, Any] = {k: _figures(v, rounds, k) for k, v in results.items() if k != "cellserve"}
    if ort is not None:
        baselines["ort"] = {**ort.to_json(), "steps_per_s_rounds": [o.steps_per_s for o in ort_rounds]}
    if formed is not None:
        baselines["ort_formed"] = formed.to_json()
    return {
        "streams": cs.streams,
        "t": cs.t,
        "sessions_per_message": cs.rows,
        "inflight": inflight,
        "cellserve": _figures(cs, rounds, "cellserve"),
        "baselines": baselines,
        "ratios": ratios,
        "round_ratios": per_round,
    }


def table(configs: list[dict[str, Any]]) -> str:
    """Plain text: a row per target and configuration, raw onnxruntime, then the ratios."""
    head = (f"{'target':>11} {'streams':>7} {'K':>4} {'T':>3} {'inflt':>5} {'msgs/s':>9} {'steps/s':>10} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'srv µs/msg':>10} {'srv µs/step':>11} {'loop µs/msg':>11} "
            f"{'cli µs/msg':>10}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for c in configs:
        figures = {"cellserve": c["cellserve"], **c["baselines"]}
        for name in (n for n in ROWS if n in figures):
            r, p = figures[name], figures[name]["latency_ms"]
            inflight = c["inflight"] if name != "echo_single" else 1
            lines.append(
                f"{name:>11} {r['streams']:>7} {r['sessions_per_message']:>4} {c['t']:>3} {inflight:>5} "
                f"{r['msgs_per_s']:>9,.0f} {r['steps_per_s']:>10,.0f} {p['p50']:>8.2f} {p['p99']:>8.2f} "
                f"{_fmt(r['mean_batch'], 1):>6} {_fmt(r['server_cpu_us_per_msg'], 0):>10} "
                f"{_fmt(r['server_cpu_us_per_session_step'], 1):>11} {_fmt(r['server_loop_cpu_us_per_msg'], 0):>11} "
                f"{_fmt(r['client_cpu_us_per_msg'], 0):>10}"
            )
        for key in ("ort", "ort_formed"):
            ort = c["baselines"].get(key)
            if ort:
                formed = " (the batch the server formed)" if key == "ort_formed" else ""
                lines.append(f"{'raw ORT':>11} {'':>7} {ort['batch']:>4} {c['t']:>3} {'':>5} {'':>9} "
                             f"{ort['steps_per_s']:>10,.0f} {ort['ms_per_call']:>8.3f} ms per call at batch "
                             f"{ort['batch']}{formed}")  # fmt: skip
        r = c["ratios"]
        single = c["baselines"].get("echo_single")
        lines.append(
            f"{'ratios':>11}  steps/raw ORT {_fmt(r['steps_vs_raw_ort'])}"
            + (f" (formed batch: {_fmt(r['steps_vs_raw_ort_formed'])})" if r["steps_vs_raw_ort_formed"] else "")
            + f"  steps/echo msgs {_fmt(r['steps_vs_echo_msgs'])}"
            + (f" (echo at {single['streams']} streams)" if single else "")
            + f"  msgs/echo {_fmt(r['msgs_vs_echo'])}  p99/echo {_fmt(r['p99_vs_echo'])}"
            f"  engine/ORT {_fmt(r['engine_vs_ort'])}"
        )
        if "compare_steps_vs_cellserve" in r:
            lines.append(f"{'':>11}  compare/cellserve: steps {_fmt(r['compare_steps_vs_cellserve'])}  "
                         f"p99 {_fmt(r['compare_p99_vs_cellserve'])}  "
                         f"server CPU {_fmt(r['compare_server_cpu_vs_cellserve'])}; compare's steps/raw ORT "
                         f"{_fmt(r['compare_steps_vs_raw_ort'])}  steps/echo msgs "
                         f"{_fmt(r['compare_steps_vs_echo_msgs'])}")  # fmt: skip
        rounds = c["round_ratios"]
        for key in ("steps_vs_raw_ort", "steps_vs_echo_msgs", "msgs_vs_echo", "compare_steps_vs_raw_ort"):
            if len(rounds) > 1 and rounds[0].get(key) is not None:
                each = " ".join(_fmt(x[key]) for x in rounds)
                lines.append(f"{'':>11}  {key} per round: {each} (above: the median)")
        lines.append("")
    return "\n".join(lines)


# (label as printed, what it is; good / trouble), shown under the table
LEGEND = (
    ("msgs/s, steps/s", "Multiplex messages answered per second; session-steps/s = msgs/s × K × T (echo_single: "
     "msgs/s × T); higher is better"),
    ("K, inflt", "sessions each message steps; messages a stream keeps in flight (--inflight)"),
    ("p50, p99 ms", "round trip of one message (all K sessions), write to answer; with inflt > 1 it includes the "
     "wait behind the stream's earlier messages"),
    ("batch", "mean rows per engine call on the server: K when each message is one call, up to max_batch when "
     "streams merge"),
    ("srv µs/msg, /step", "the server's CPU (its whole process tree) per message and per session-step"),
    ("loop µs/msg", "of that, its main thread's (the asyncio event loop, and the inline engine); near 1e6 ÷ msgs/s "
     "the loop is saturated"),
    ("cli µs/msg", "the load generator's CPU per message; it shares the cores with the server on a small box"),
    ("echo", "a bare grpc.aio echo server, the same streams, in-flight depth and message sizes as cellserve's"),
    ("echo_single", "the same echo server at --echo-streams streams of one session's Stream step and output each: "
     "what one-session-per-message gRPC carries at all"),
    ("raw ORT", "onnxruntime in-process in a tight loop at batch K (and at the batch the server formed, where that "
     "differs), the same T, every state fed back: the compute ceiling"),
    ("steps/raw ORT", "session-steps/s ÷ raw ORT's (steps_vs_raw_ort); 1.0 = nothing but compute; target ≥ 0.8 at "
     "K=64, T=1, 4 streams; lower means the serving path costs more than the compute"),
    ("steps/echo msgs", "session-steps/s ÷ echo_single's msgs/s × T (steps_vs_echo_msgs): how far past gRPC's "
     "per-message ceiling the gateway API goes; targets ≥ 5 (shipped model) and ≥ 10 (H=32)"),
    ("msgs/echo, p99/echo", "msgs/s and p99 ÷ echo's with the same messages: the transport's share; the compute "
     "usually holds msgs/echo far below 1"),
    ("engine/ORT", "one engine call on the server ÷ raw ORT's call at the nearest batch; target ≤ 1.2"),
)  # fmt: skip


def legend(configs: list[dict[str, Any]]) -> str:
    """The legend: each column, baseline and ratio of :func:`table`."""
    width = max(len(label) for label, _ in LEGEND)
    lines = ["Legend (every figure from this run; '-' = not measured):"]
    lines += [textwrap.fill(f"  {label:<{width}}  {what}", 118, subsequent_indent=" " * (width + 4))
              for label, what in LEGEND]  # fmt: skip
    return "\n".join(lines)


def write_png(configs: list[dict[str, Any]], path: Path) -> bool:
    """Latency CDF per message, and session-steps/s of each target as bars per configuration (categories, not a
    curve). False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"cellserve": "-", "compare": "-.", "echo": "--", "echo_single": ":"}
    qs = [i / 100 for i in range(101)]
    labels = [f"s={c['streams']} K={c['sessions_per_message']}\nT={c['t']} D={c['inflight']}" for c in configs]
    for i, c in enumerate(configs):
        for name, r in {"cellserve": c["cellserve"], **c["baselines"]}.items():
            if name in styles:
                ax_lat.plot(r["latency_cdf_ms"], qs, linestyle=styles[name], color=colors[i % len(colors)],
                            label=f"{name} s={r['streams']} K={r['sessions_per_message']} T={c['t']} "
                                  f"D={c['inflight'] if name != 'echo_single' else 1}",
                            linewidth=1.3)  # fmt: skip
    ax_lat.set_xscale("log")
    ax_lat.set_xlabel("round-trip latency per message (ms)")
    ax_lat.set_ylabel("fraction of messages")
    ax_lat.set_title("Latency CDF per message")
    ax_lat.legend(fontsize=6)
    ax_lat.grid(alpha=0.3)
    bars = {"cellserve": "cellserve", "compare": "compare", "raw ORT, batch K": "ort",
            "raw ORT, formed batch": "ort_formed", "echo, same messages": "echo",
            "echo_single msgs/s × T": "echo_single"}  # fmt: skip
    shown = [b for b, key in bars.items() if any(key == "cellserve" or key in c["baselines"] for c in configs)]
    width, labelled = 0.8 / len(shown), set()
    for j, name in enumerate(shown):
        key = bars[name]
        for i, c in enumerate(configs):
            r = c["cellserve"] if key == "cellserve" else c["baselines"].get(key)
            if r is None:
                continue
            x = i + (j - (len(shown) - 1) / 2) * width
            ax_tp.bar(x, r["steps_per_s"], width, color=colors[j % len(colors)],
                      label=None if name in labelled else name)  # fmt: skip
            labelled.add(name)
            ax_tp.annotate(f"{r['steps_per_s']:,.0f}", (x, r['steps_per_s']), ha="center", va="bottom", fontsize=6,
                           rotation=90)  # fmt: skip
    ax_tp.set_xticks(range(len(configs)), labels, fontsize=7)
    ax_tp.set_yscale("log")
    top = max(b.get_height() for b in ax_tp.patches)
    ax_tp.set_ylim(top=top * 8)  # room for the legend above the bars
    ax_tp.set_ylabel("session-steps/s (log)")
    ax_tp.set_title("Session-steps/s against the same-run baselines")
    ax_tp.legend(fontsize=7, ncol=3, loc="upper center")
    ax_tp.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
