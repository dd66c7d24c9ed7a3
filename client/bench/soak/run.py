"""``cellserve bench soak``: run the churn for the soak's length, sample it, settle, report."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import time
from dataclasses import asdict
from pathlib import Path

from cellserve.client.bench.command import BenchError, bench_target, model_dir, run_command
from cellserve.client.bench.report import write_json
from cellserve.client.bench.soak.churn import Churn, Tally, stopped_within
from cellserve.client.bench.soak.plan import SoakPlan
from cellserve.client.bench.soak.probe import ServerReading
from cellserve.client.bench.soak.recorder import Recorder, progress
from cellserve.client.bench.soak.report import build_report, print_summary, write_png
from cellserve.client.model_info import ModelInfo

log = logging.getLogger(__name__)
COMMAND = "cellserve bench soak"
STOP_TIMEOUT_S = 60.0  # for the workers to finish their sessions once the churn stops


async def soak(address: str, metrics_url: str, info: ModelInfo, plan: SoakPlan, pid: int | None,
               quiet: bool) -> tuple[Recorder, Tally, dict[str, object]]:  # fmt: skip
    """Run the churn for ``plan.duration_s``, then stop it and wait for the slots to be free."""
    tally = Tally()
    churn = Churn(address, info, plan, tally)
    rec = Recorder(functools.partial(ServerReading.read, metrics_url, info.name, pid), tally, time.monotonic())
    before = await rec.read()
    workers = [asyncio.create_task(churn.worker(i)) for i in range(plan.workers)]
    sampler = asyncio.create_task(rec.run(plan, churn.stop))
    bar = asyncio.create_task(progress(plan, churn, rec, quiet))
    await stopped_within(churn.stop, plan.duration_s)
    churn.stop.set()
    await sampler  # the last sample under load, taken as the churn stops
    await bar
    done, pending = await asyncio.wait(workers, timeout=STOP_TIMEOUT_S)
    for task in pending:
        task.cancel()
        tally.error("stop_timeout", "a worker did not finish its session within 60 s of the stop")
    for task in done:
        if task.exception() is not None:
            tally.error(f"worker:{type(task.exception()).__name__}", str(task.exception()))
    freed, settle_s = await rec.settle(plan.settle_timeout_s)
    await rec.sample("settled")
    return rec, tally, {"before": before.to_json(), "freed": freed, "settle_s": round(settle_s, 3)}


def run_soak(args: argparse.Namespace) -> int:
    """``cellserve bench soak``: exit 0 when every check holds, 1 when one fails, 2 on a usage error."""
    return run_command(COMMAND, lambda: _command(args))


def _command(args: argparse.Namespace) -> int:
    plan = SoakPlan.from_args(args)
    problems = plan.problems()
    if problems:
        raise BenchError("; ".join(problems))
    if args.server is not None and args.metrics_url is None:
        raise BenchError("--server needs --metrics-url (RSS and slots are read from the server's /metrics)")
    report = _run(args, plan, model_dir(args.model_dir, needed=args.server is None))
    print_summary(report)
    out: Path = args.out
    write_json(report, out / "soak.json")
    png = write_png(report, out / "soak.png")
    print(f"wrote {out / 'soak.json'}" + (f" and {out / 'soak.png'}" if png else " (no matplotlib: no PNG)"))
    return 0 if report["passed"] else 1


def _run(args: argparse.Namespace, plan: SoakPlan, model_dir: Path | None) -> dict[str, object]:
    with bench_target(args.server, plan.model, model_dir, args.serve_arg, metrics_url=args.metrics_url,
                      max_streams=None, name="soak", log_level="WARNING",
                      connect_timeout_s=args.connect_timeout) as target:  # fmt: skip
        assert target.metrics_url is not None  # given with --server, else the started server's
        log.info("soak starting", extra={"address": target.address, "model": target.info.name,
                                         "seconds": plan.duration_s})  # fmt: skip
        rec, tally, end = asyncio.run(soak(target.address, target.metrics_url, target.info, plan, target.pid,
                                           args.quiet))  # fmt: skip
    return build_report(
        plan=asdict(plan),
        info=target.info,
        server=target.describe("started by the soak"),
        samples=rec.samples,
        latencies=rec.all_latencies,
        tally=tally,
        end=end,
        note=args.note,
    )
