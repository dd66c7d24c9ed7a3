"""``cellserve bench``: start (or reach) the servers, run every configuration, report.

For each configuration (streams, T) the targets run one after another under the same load
pattern: the bare echo server, cellserve, the naive stateless server; then raw onnxruntime
in-process at the mean batch size cellserve's scheduler formed in that run, at the same T.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

from cellserve.client.bench.measure import LoadPlan, Result, ort_ceiling, run_load
from cellserve.client.bench.onnx_model import OnnxModel
from cellserve.client.bench.options import SWEEP_STREAMS, SWEEP_T
from cellserve.client.bench.report import config_entry, run_meta, table, write_json, write_png
from cellserve.client.bench.serving import ServerProcess, cellserve_process, python_module

log = logging.getLogger(__name__)
BASELINES = ("echo", "naive", "ort")


def shipped_model_dir() -> Path | None:
    spec = importlib.util.find_spec("cellserve.model")  # locates the package; runs none of its code
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / "default" / "manifest.json").is_file():
            return Path(root) / "default"
    return None


def bench_configs(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(streams, T) pairs to run: the sweep grid, or the one configuration the flags name."""
    return [(s, t) for t in SWEEP_T for s in SWEEP_STREAMS] if args.sweep else [(args.streams, args.t)]


def _fail(message: str) -> int:
    print(f"cellserve bench: error: {message}", file=sys.stderr)
    return 2


def run_bench(args: argparse.Namespace) -> int:
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        return _fail(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    configs = bench_configs(args)
    if any(s < 1 or t < 1 for s, t in configs):
        return _fail("--streams and -T must be >= 1")
    model_dir = args.model_dir or shipped_model_dir()
    if model_dir is None and (args.server is None or {"naive", "ort"} & set(baselines)):
        return _fail("--model-dir is needed (no shipped model found): the baselines run the same ONNX file")
    try:
        report = _run(args, configs, baselines, model_dir)
    except (RuntimeError, OSError, TimeoutError) as e:
        return _fail(str(e))
    print(table(report["configs"]))
    out: Path = args.out
    write_json(report, out / "bench.json")
    png = write_png(report["configs"], out / "bench.png")
    print(f"wrote {out / 'bench.json'}" + (f" and {out / 'bench.png'}" if png else " (no matplotlib: no PNG)"))
    return 0


def _run(
    args: argparse.Namespace, configs: list[tuple[int, int]], baselines: list[str], model_dir: Path | None
) -> dict:
    from cellserve.client import Client

    with ExitStack() as stack:
        address, metrics_url = args.server, args.metrics_url
        pids: dict[str, int | None] = {"cellserve": None}
        if address is None:
            max_streams = max(1024, 2 * max(s for s, _ in configs))
            cs = stack.enter_context(cellserve_process(model_dir, args.serve_arg, max_streams))
            address = cs.address
            pids["cellserve"] = cs.pid
            metrics_url = metrics_url or f"http://127.0.0.1:{cs.info['metrics_port']}/metrics"
        with Client(address) as client:
            client.wait_ready(30)
            info = client.model_info(args.model) if args.model else client.list_models()[0]
        if model_dir is not None and {"naive", "ort"} & set(baselines):
            local = json.loads((model_dir / "manifest.json").read_text()).get("sha256")
            if local != info.sha256:
                raise RuntimeError(
                    f"the server serves {info.name!r} sha256 {info.sha256[:12]}…, but --model-dir {model_dir} holds "
                    f"sha256 {str(local)[:12]}…; the baselines must run the same model file"
                )
        addresses = {"cellserve": address}
        if "echo" in baselines:
            echo = stack.enter_context(ServerProcess(python_module("cellserve.client.bench.echo", "--ready-file",
                                                                   "{ready_file}"), "echo"))  # fmt: skip
            addresses["echo"], pids["echo"] = echo.address, echo.pid
        if "naive" in baselines:
            argv = python_module("cellserve.client.bench.naive", "--model-dir", str(model_dir), "--ready-file",
                                 "{ready_file}", "--intra-op-threads", str(args.intra_op_threads))  # fmt: skip
            naive = stack.enter_context(ServerProcess(argv, "naive"))
            addresses["naive"], pids["naive"] = naive.address, naive.pid
        threads = args.intra_op_threads  # the server's engine options, so raw ORT is like against like
        ort_model = OnnxModel.load(model_dir, threads) if "ort" in baselines and model_dir is not None else None
        entries = []
        for streams, t in configs:
            plan = LoadPlan(streams, t, args.duration, args.messages, args.warmup,
                            args.procs or min(streams, 2), args.seed)  # fmt: skip
            results: dict[str, Result] = {}
            for target in ("echo", "cellserve", "naive"):
                if target in addresses:
                    url = metrics_url if target == "cellserve" else None
                    results[target] = run_load(target, addresses[target], info, plan, metrics_url=url,
                                               server_pid=pids[target], progress_bar=not args.no_progress)  # fmt: skip
            ort = None
            if ort_model is not None:
                batch = max(1, round(results["cellserve"].mean_batch or 1))
                ort = ort_ceiling(ort_model, batch, t, seconds=min(2.0, max(0.2, args.duration / 2)), seed=args.seed)
            entries.append(config_entry(results, ort))
            log.info("bench configuration done", extra={"streams": streams, "t": t})
    return {
        "meta": {
            **run_meta(info, "started by the bench" if args.server is None else args.server, "cellserve bench"),
            "duration_s": args.duration,
            "messages": args.messages,
            "warmup_s": args.warmup,
            "client_procs": args.procs or "min(streams, 2)",
            "baselines": baselines,
        },
        "configs": entries,
    }
