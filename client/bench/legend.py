"""The legend printed under ``cellserve bench``'s table: what each column and ratio is, against which baseline,
and which values are good or a sign of trouble (the targets are the README's "Against the targets")."""

from __future__ import annotations

import textwrap
from typing import Any

WIDTH = 118  # about the table's

# (label as the table prints it, what it is, how to read it); shown when the run has that figure
COLUMNS = (
    ("msgs/s, steps/s", "messages answered per second, all streams together; steps/s = msgs/s × T", "higher is better"),
    ("p50 … p99.9 ms", "round-trip time of one message (write to reply), each stream closed-loop", "lower is better"),
    ("batch", "mean rows per engine call on the server (its /metrics)", "more rows: fewer, cheaper calls per step"),
    ("srv µs/msg", "the server's CPU per message, its whole process tree", "lower is better"),
    ("loop µs/msg", "of srv, its main thread's: the asyncio event loop every message goes through (and the inline "
     "engine)", "near 1e6 ÷ msgs/s the loop is saturated: the server's bottleneck"),
    ("cli µs/msg", "the load generator's CPU per message, all its processes", "it shares the cores with the server "
     "on a small box: a high value slows every target alike"),
)  # fmt: skip

# (key in a configuration's ratios, label as printed, meaning, good / trouble)
RATIOS = (
    ("msgs_vs_echo", "msgs/echo", "msgs/s ÷ echo's, a bare grpc.aio server replying with the same bytes (what "
     "Python gRPC can carry at all)", "1.0 = gRPC's own ceiling; target ≥ 0.8, below 0.5 is trouble"),
    ("p50_vs_echo", "p50/echo, p99/echo", "latency ÷ echo's at the same streams", "target p99 ≤ 1.5; above 2 is "
     "trouble"),
    ("server_cpu_vs_echo", "server CPU per message/echo", "srv µs/msg ÷ echo's", "target ≤ 1.3"),
    ("msgs_vs_naive", "msgs/naive", "msgs/s ÷ a stateless server that is sent x and the whole state every step",
     "> 1: keeping the state in the server pays; target ≥ 3"),
    ("steps_vs_ort", "steps/ORT", "steps/s ÷ raw onnxruntime in-process, in a tight loop, at the batch cellserve "
     "formed and the same T (the compute ceiling)", "1.0 = nothing but compute; at T=1 the per-message cost "
     "dominates and 0.1–0.2 is normal on 2 shared cores; at T=32 target ≥ 0.8"),
    ("engine_vs_ort", "engine/ORT", "one engine call on the server ÷ the same call in raw onnxruntime",
     "target ≤ 1.2; higher is the engine's gather/scatter or caches the rest of the box left cold"),
    ("compare_msgs_vs_cellserve", "compare/cellserve", "the second server (--compare-serve-arg) ÷ the first",
     "> 1: the compare flags help"),
)  # fmt: skip


def _block(rows: list[tuple[str, str, str]]) -> list[str]:
    width = max(len(label) for label, _, _ in rows)
    return [textwrap.fill(f"  {label:<{width}}  {what}; {verdict}", WIDTH, subsequent_indent=" " * (width + 4))
            for label, what, verdict in rows]  # fmt: skip


def legend(configs: list[dict[str, Any]]) -> str:
    """The table's legend: every column, then each ratio the run has a value of. Ratios are cellserve's figure
    ÷ the baseline's, both measured in this run with the same message sizes (with --rounds: medians of the
    same-round ratios)."""
    known = {k for c in configs for k, v in c["ratios"].items() if v is not None}
    ratios = [(label, what, verdict) for key, label, what, verdict in RATIOS if key in known]
    lines = ["Legend (every figure from this run; '-' = not measured):", *_block(list(COLUMNS))]
    if ratios:
        lines += ["ratios: cellserve's figure ÷ the baseline's, same run, same message sizes:", *_block(ratios)]
    return "\n".join(lines)
