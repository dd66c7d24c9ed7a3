"""``cellserve bench checkpoint``: what crash-safe sessions cost, as msgs/s against checkpointing off.

The same server, the same load (N closed-loop SDK sessions, ``await s.step`` of T steps, from the same
client processes) runs once per setting of ``checkpoint_every`` (off, then every 1, 8, 64 step messages
by default), round after round in a changing order (``measure.round_order``) so that drift on a shared
machine spreads over all settings. Each setting's msgs/s is the median of its rounds; the ratios divide
by "off" from the same run. A table goes to stdout and the report to ``checkpoint.json``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from cellserve.client.bench.command import BenchError, bench_target, model_dir, run_command
from cellserve.client.bench.measure import PERCENTILES, LoadPlan, Result, round_order, run_load
from cellserve.client.bench.report import run_meta, write_json
from cellserve.client.ops import DEFAULT_CHECKPOINT_EVERY

log = logging.getLogger(__name__)
OFF = 0


def settings_from(text: str) -> list[int]:
    """``"1,8,64"`` → [0, 1, 8, 64]: "off" (0) always runs first, as the baseline."""
    try:
        every = sorted({int(v) for v in text.split(",") if v.strip()} - {OFF})
    except ValueError:
        raise BenchError(f"--every is {text!r}; give step-message counts like 1,8,64") from None
    if not every or every[0] < 1:
        raise BenchError(f"--every is {text!r}; give at least one count >= 1 (off runs anyway)")
    return [OFF, *every]


def run_checkpoint_bench(args: argparse.Namespace) -> int:
    return run_command("cellserve bench checkpoint", lambda: _command(args))


def _command(args: argparse.Namespace) -> int:
    settings = settings_from(args.every)
    if args.streams < 1 or args.t < 1 or args.rounds < 1:
        raise BenchError("--streams, -T and --rounds must be >= 1")
    found = model_dir(args.model_dir, needed=args.server is None, why=" when the bench starts the server")
    report = _run(args, settings, found)
    print(table(report))
    out: Path = args.out
    write_json(report, out / "checkpoint.json")
    print(f"wrote {out / 'checkpoint.json'}")
    return 0


def _run(args: argparse.Namespace, settings: list[int], model_dir: Path | None) -> dict[str, Any]:
    with bench_target(args.server, args.model, model_dir, args.serve_arg, max_streams=max(1024, 2 * args.streams),
                      connect_timeout_s=args.connect_timeout) as target:  # fmt: skip
        info = target.info
        results: dict[int, list[Result]] = {n: [] for n in settings}
        for r in range(args.rounds):
            for n in round_order(settings, r):
                plan = LoadPlan(args.streams, args.t, args.duration, args.messages, args.warmup,
                                args.procs or min(args.streams, 2), args.seed, checkpoint_every=n)  # fmt: skip
                results[n].append(run_load("sdk", target.address, info, plan, server_pid=target.pid,
                                           progress_bar=not args.no_progress))  # fmt: skip
                log.info("checkpoint bench setting done", extra={"round": r, "checkpoint_every": n})
    meta = run_meta(info, target.describe("started by the bench"), "cellserve bench checkpoint")
    meta.update({"streams": args.streams, "t": args.t, "rounds": args.rounds, "duration_s": args.duration,
                 "messages": args.messages, "warmup_s": args.warmup, "client_procs": args.procs or "min(streams, 2)",
                 "sdk_default_checkpoint_every": DEFAULT_CHECKPOINT_EVERY})  # fmt: skip
    return {"meta": meta, "settings": [_entry(n, results[n], results[OFF]) for n in settings]}


def _entry(every: int, rounds: list[Result], off: list[Result]) -> dict[str, Any]:
    rates = [r.msgs_per_s for r in rounds]
    median = statistics.median(rates)
    latencies = np.concatenate([r.latencies_s for r in rounds]) * 1e3
    cpu = [r.server_cpu_s_per_msg for r in rounds if r.server_cpu_s_per_msg is not None]
    off_cpu = [r.server_cpu_s_per_msg for r in off if r.server_cpu_s_per_msg is not None]
    return {
        "checkpoint_every": every,
        "label": "off" if every == OFF else f"every {every}",
        "msgs_per_s": median,
        "msgs_per_s_rounds": rates,
        "latency_ms": {f"p{p:g}".replace(".", "_"): float(np.percentile(latencies, p)) for p in PERCENTILES},
        "server_cpu_us_per_msg": statistics.median(cpu) * 1e6 if cpu else None,
        "msgs_vs_off": median / statistics.median(r.msgs_per_s for r in off),
        "server_cpu_vs_off": statistics.median(cpu) / statistics.median(off_cpu) if cpu and off_cpu else None,
    }


def table(report: dict[str, Any]) -> str:
    m = report["meta"]
    head = f"{'checkpoint':>11} {'msgs/s':>9} {'×off':>6} {'p50 ms':>7} {'p99 ms':>7} {'srv µs/msg':>10} {'×off':>6}"
    lines = [f"SDK sessions: {m['streams']} streams, T={m['t']}, {m['rounds']} rounds (median)", head, "-" * len(head)]
    for e in report["settings"]:
        cpu, cpu_x = e["server_cpu_us_per_msg"], e["server_cpu_vs_off"]
        lines.append(
            f"{e['label']:>11} {e['msgs_per_s']:>9,.0f} {e['msgs_vs_off']:>6.3f} {e['latency_ms']['p50']:>7.2f} "
            f"{e['latency_ms']['p99']:>7.2f} {'-' if cpu is None else f'{cpu:,.0f}':>10} "
            f"{'-' if cpu_x is None else f'{cpu_x:.3f}':>6}"
        )
    return "\n".join(lines)
