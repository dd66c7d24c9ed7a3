"""``cellserve bench``: start (or reach) the servers, run every configuration, report.

For each configuration (streams, T) the targets run one after another under the same load
pattern: the bare echo server, cellserve, the naive stateless server; then raw onnxruntime
in-process at the mean batch size cellserve's scheduler formed in that run (batch 1 for a graph whose
batch is fixed at 1: all it can run), at the same T, every state fed back. Inputs for every target
come from the model's description: its dtype and frame, a dynamic frame dim at the manifest's example.
With ``--rounds K`` that sequence runs K times in a changing order (``round_order``); each ratio to
echo, naive or the compare server is the median of the K same-round ratios (``report.config_entry``).
``--compare-serve-arg`` adds a second cellserve server with other flags as one more target
("compare") in every round.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellserve.client.bench.baselines.onnx_model import OnnxModel, manifest_step_frame
from cellserve.client.bench.baselines.ort import ort_ceiling
from cellserve.client.bench.command import BenchError, Target, bench_target, model_dir, run_command
from cellserve.client.bench.legend import legend
from cellserve.client.bench.measure import LoadPlan, Result, round_order, run_load
from cellserve.client.bench.options import DEFAULT_STREAMS, DEFAULT_T, SWEEP_STREAMS, SWEEP_T
from cellserve.client.bench.report import config_entry, pooled, run_meta, table, write_json, write_png
from cellserve.client.bench.serving import ServerProcess, python_module

log = logging.getLogger(__name__)
BASELINES = ("echo", "naive", "ort")


def bench_configs(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(streams, T) pairs to run: the sweep grid, or every pair of the --streams and -T lists."""
    if args.sweep:
        if args.streams is not None or args.t is not None:
            raise BenchError("--sweep runs its own grid of --streams and -T; give either --sweep or the lists")
        return [(s, t) for t in SWEEP_T for s in SWEEP_STREAMS]
    return [(s, t) for t in args.t or [DEFAULT_T] for s in args.streams or [DEFAULT_STREAMS]]


def run_bench(args: argparse.Namespace) -> int:
    return run_command("cellserve bench", lambda: _command(args))


def _command(args: argparse.Namespace) -> int:
    if (args.compare_serve_arg or args.compare_pythonpath) and args.server is not None:
        raise BenchError("--compare-serve-arg starts a second server next to the one the bench starts; "
                         "it cannot be used with --server")  # fmt: skip
    multiplex = args.sessions_per_message is not None
    default = "echo,ort" if multiplex else "echo,naive,ort"
    baselines = [b.strip() for b in (args.baselines or default).split(",") if b.strip()]
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise BenchError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    configs = bench_configs(args)
    if args.rounds < 1:
        raise BenchError(f"--rounds is {args.rounds}; it must be >= 1")
    needed = args.server is None or bool({"naive", "ort"} & set(baselines))
    found = model_dir(args.model_dir, needed=needed, why=": the baselines run the same ONNX file")
    if multiplex:
        from cellserve.client.bench.multiplex import run_multiplex

        return run_multiplex(args, configs, baselines, found)
    report = _run(args, configs, baselines, found)
    print(table(report["configs"]))
    print(legend(report["configs"]))
    out: Path = args.out
    write_json(report, out / "bench.json")
    png = write_png(report["configs"], out / "bench.png")
    print(f"wrote {out / 'bench.json'}" + (f" and {out / 'bench.png'}" if png else " (no matplotlib: no PNG)"))
    return 0


@dataclass(frozen=True)
class Setup:
    """What every configuration of a run drives: cellserve, the baseline servers and the compare server (by
    name), the frame sent, and raw onnxruntime's session (None without the ort baseline)."""

    cs: Target
    targets: dict[str, Target]
    example: tuple[int, ...] | None
    ort_model: OnnxModel | None


@contextmanager
def started(
    args: argparse.Namespace, baselines: list[str], model_dir: Path | None, max_streams: int
) -> Iterator[Setup]:
    """Start (or reach) cellserve, the compare server and the baseline servers; stop them on exit."""
    serve_args = ["--intra-op-threads", str(args.intra_op_threads), *args.serve_arg]
    with (
        bench_target(args.server, args.model, model_dir, serve_args, metrics_url=args.metrics_url,
                     max_streams=max_streams, connect_timeout_s=args.connect_timeout) as cs,
        ExitStack() as stack,
    ):  # fmt: skip
        info = cs.info
        compare = None
        if args.compare_serve_arg or args.compare_pythonpath:
            compare_args = [*serve_args, *args.compare_serve_arg]
            compare = stack.enter_context(bench_target(None, args.model, model_dir, compare_args, name="compare",
                                                       max_streams=max_streams,
                                                       connect_timeout_s=args.connect_timeout,
                                                       pythonpath=args.compare_pythonpath))  # fmt: skip
            if compare.info.sha256 != info.sha256:
                raise BenchError("the compare server serves another model file than the first; compare flags "
                                 "must not change the model")  # fmt: skip
        if model_dir is not None and {"naive", "ort"} & set(baselines):
            local = json.loads((model_dir / "manifest.json").read_text()).get("sha256")
            if local != info.sha256:
                raise RuntimeError(
                    f"the server serves {info.name!r} sha256 {info.sha256[:12]}…, but --model-dir {model_dir} holds "
                    f"sha256 {str(local)[:12]}…; the baselines must run the same model file"
                )
        # the frame sent: the served model's file (checked above), its dynamic dims at its example's sizes; with a
        # --server and no file, the server's own example frame (ModelSummary.example_frame)
        example = tuple(info.example_frame) if info.example_frame else None
        if model_dir is not None and (args.server is None or {"naive", "ort"} & set(baselines)):
            example = manifest_step_frame(model_dir)
        targets = {"cellserve": cs, **_start_baselines(stack, args, baselines, model_dir, cs)}
        if compare is not None:
            targets["compare"] = compare
        threads = args.intra_op_threads  # the server's engine options, so raw ORT is like against like
        ort_model = OnnxModel.load(model_dir, threads) if "ort" in baselines and model_dir is not None else None
        yield Setup(cs, targets, example, ort_model)


def _run(
    args: argparse.Namespace, configs: list[tuple[int, int]], baselines: list[str], model_dir: Path | None
) -> dict:
    max_streams = max(1024, 2 * max(s for s, _ in configs))
    with started(args, baselines, model_dir, max_streams) as setup:
        cs, targets, example, ort_model = setup.cs, setup.targets, setup.example, setup.ort_model
        info = cs.info
        entries = []
        for streams, t in configs:
            plan = LoadPlan(streams, t, args.duration, args.messages, args.warmup,
                            args.procs or min(streams, 2), args.seed, example=example)  # fmt: skip
            names = [n for n in ("echo", "cellserve", "compare", "naive") if n in targets]
            rounds: list[dict[str, Result]] = []
            for r in range(args.rounds):
                measured: dict[str, Result] = {}
                for name in round_order(names, r):
                    target = targets[name]
                    measured[name] = run_load(name, target.address, info, plan, metrics_url=target.metrics_url,
                                              server_pid=target.pid, progress_bar=not args.no_progress,
                                              protocol="cellserve" if name == "compare" else None)  # fmt: skip
                rounds.append(measured)
            results = pooled(rounds)
            ort = None
            if ort_model is not None:
                batch = max(1, round(results["cellserve"].mean_batch or 1))
                ort = ort_ceiling(ort_model, batch, t, seconds=min(2.0, max(0.2, args.duration / 2)), seed=args.seed)
            entries.append(config_entry(rounds, results, ort))
            log.info("bench configuration done", extra={"streams": streams, "t": t})
    return {"meta": meta(args, setup, baselines), "configs": entries}


def meta(args: argparse.Namespace, setup: Setup, baselines: list[str]) -> dict[str, Any]:
    """The report's ``meta``: the run's command, model, server, machine, and how it was measured."""
    return {
        **run_meta(setup.cs.info, setup.cs.describe("started by the bench"), "cellserve bench"),
        "duration_s": args.duration,
        "messages": args.messages,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "compare_serve_args": args.compare_serve_arg,
        "compare_pythonpath": str(args.compare_pythonpath) if args.compare_pythonpath else None,
        "client_procs": args.procs or "min(streams, 2)",
        "baselines": baselines,
        "frame_sent": list(setup.example) if setup.example is not None else None,  # None: dynamic dims at DYNAMIC_DIM
        "onnx_model": setup.ort_model.describe() if setup.ort_model is not None else None,
    }


def _start_baselines(
    stack: ExitStack, args: argparse.Namespace, baselines: list[str], model_dir: Path | None, cs: Target
) -> dict[str, Target]:
    """The echo and naive servers the run asks for, started as subprocesses (no metrics: only their CPU)."""
    argvs = {
        "echo": python_module("cellserve.client.bench.baselines.echo", "--ready-file", "{ready_file}"),
        "naive": python_module("cellserve.client.bench.baselines.naive", "--model-dir", str(model_dir),
                               "--ready-file", "{ready_file}", "--intra-op-threads", str(args.intra_op_threads)),
    }  # fmt: skip
    started = {}
    for name, argv in argvs.items():
        if name in baselines:
            proc = stack.enter_context(ServerProcess(argv, name))
            started[name] = Target(proc.address, proc.pid, None, cs.info)
    return started
