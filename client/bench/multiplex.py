"""``cellserve bench --sessions-per-message K``: a gateway's load over the Multiplex RPC, and its same-run baselines.

Each of the ``--streams`` S streams is one Multiplex stream holding K sessions; every message steps all K of them
(``[K, T, *frame]``), closed-loop or ``--inflight`` D messages ahead. Per configuration (S, T, K, D), in every round
and in a changing order (``measure.round_order``), run:
- ``cellserve``: that load (session-steps/s = msgs/s × K × T; latency per message);
- ``echo``: the bare echo server with the same streams, in-flight depth and message sizes (``sizes.multiplex_sizes``):
  what Python gRPC can carry of these messages at all;
- ``echo_single``: the echo server at ``--echo-streams`` (64) streams of one session's Stream step and output each,
  the figure the issue's "≥ 5× echo's msgs/s at 64 streams" divides by (``steps_vs_echo_msgs``);
- ``compare``: a second cellserve server (``--compare-serve-arg``/``--compare-pythonpath``), the same load.
- ``ort``: raw onnxruntime in-process at batch K and the same T (``steps_vs_raw_ort``, a median of same-round ratios
  like the echo ones).
After the rounds, raw onnxruntime runs again at the batch the server formed when that differs from K by more than a
tenth (``steps_vs_raw_ort_formed``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cellserve.client.bench.baselines.ort import OrtResult, ort_ceiling
from cellserve.client.bench.command import BenchError
from cellserve.client.bench.measure import LoadPlan, Result, round_order, run_load
from cellserve.client.bench.multiplex_report import config_entry, legend, table, write_png
from cellserve.client.bench.report import pooled, write_json
from cellserve.client.bench.runner import Setup, meta, started

log = logging.getLogger(__name__)
TARGETS = ("echo_single", "echo", "cellserve", "compare")  # the first round's order
FORMED_OFF_BY = 0.1  # raw ORT runs again at the formed batch when it is this far from K


def run_multiplex(
    args: argparse.Namespace, configs: list[tuple[int, int]], baselines: list[str], model_dir: Path | None
) -> int:
    """Run every (streams, T) × K configuration, print the table and its legend, write bench.json and bench.png."""
    if args.sweep:
        raise BenchError("--sweep is the single-session grid; with --sessions-per-message give --streams and -T")
    if "naive" in baselines:
        raise BenchError("the naive baseline steps one session per message; with --sessions-per-message choose "
                         "from echo,ort")  # fmt: skip
    if args.echo_streams < 1:
        raise BenchError(f"--echo-streams is {args.echo_streams}; it must be >= 1")
    runs = [(s, t, k, d) for s, t in configs for k in args.sessions_per_message for d in args.inflight]
    max_streams = max(1024, 2 * max(args.echo_streams, *(s for s, _, _, _ in runs)))
    with started(args, baselines, model_dir, max_streams) as setup:
        entries = [_configuration(args, setup, s, t, k, d) for s, t, k, d in runs]
    report = {
        "meta": {
            **meta(args, setup, baselines),
            "mode": "multiplex",
            "inflight": args.inflight,
            "echo_streams": args.echo_streams,
        },
        "configs": entries,
    }
    print(table(entries))
    print(legend(entries))
    out: Path = args.out
    write_json(report, out / "bench.json")
    png = write_png(entries, out / "bench.png")
    print(f"wrote {out / 'bench.json'}" + (f" and {out / 'bench.png'}" if png else " (no matplotlib: no PNG)"))
    return 0


def _configuration(args: argparse.Namespace, setup: Setup, streams: int, t: int, k: int, inflight: int) -> dict:
    """One (streams, T, K, in flight): every target and raw onnxruntime at batch K in every round (then raw
    onnxruntime at the batch the server formed, where that is not K); its report entry."""
    info = setup.cs.info
    mux = LoadPlan(streams, t, args.duration, args.messages, args.warmup, args.procs or min(streams, 2), args.seed,
                   example=setup.example, sessions=k, inflight=inflight, multiplex=True)  # fmt: skip
    single = LoadPlan(args.echo_streams, t, args.duration, args.messages, args.warmup,
                      args.procs or min(args.echo_streams, 2), args.seed, example=setup.example)  # fmt: skip
    # target -> (server, load, how the load talks to it)
    runs = {"cellserve": ("cellserve", mux, "multiplex"), "compare": ("compare", mux, "multiplex"),
            "echo": ("echo", mux, "echo"), "echo_single": ("echo", single, "echo")}  # fmt: skip
    names = [n for n in TARGETS if runs[n][0] in setup.targets] + (["ort"] if setup.ort_model is not None else [])
    seconds = min(2.0, max(0.2, args.duration / 2))  # raw ORT's share of a round
    rounds: list[dict[str, Result]] = []
    ort_rounds: list[OrtResult] = []
    for r in range(args.rounds):
        measured: dict[str, Result] = {}
        for name in round_order(names, r):
            if name == "ort":  # in the round, like the others: a box whose load drifts moves both sides of a ratio
                assert setup.ort_model is not None
                ort_rounds.append(ort_ceiling(setup.ort_model, k, t, seconds=seconds, seed=args.seed))
                continue
            server, plan, protocol = runs[name]
            target = setup.targets[server]
            measured[name] = run_load(name, target.address, info, plan, metrics_url=target.metrics_url,
                                      server_pid=target.pid, progress_bar=not args.no_progress,
                                      protocol=protocol)  # fmt: skip
        rounds.append(measured)
    results = pooled(rounds)
    formed: OrtResult | None = None
    batch = results["cellserve"].mean_batch
    if (
        ort_rounds
        and batch is not None
        and abs(round(batch) - ort_rounds[0].batch) > FORMED_OFF_BY * ort_rounds[0].batch
    ):
        assert setup.ort_model is not None
        formed = ort_ceiling(setup.ort_model, max(1, round(batch)), t, seconds=seconds, seed=args.seed)
    log.info("bench configuration done", extra={"streams": streams, "t": t, "sessions_per_message": k})
    return config_entry(rounds, results, ort_rounds, formed, inflight=inflight)
