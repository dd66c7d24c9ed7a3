"""`cellserve bench-path`: the serving path below gRPC, in-process, per message.

For every session count N it opens N sessions and runs N closed loops on one event loop, each doing
per message what the native ``Stream`` handler does between ``context.read()`` and ``context.write()``:
parse the request bytes, decode the tensor, ``DataPlane.step`` (input check, the inline scheduler,
the engine, delivery), and encode the output bytes. No gRPC, no client and no other process share the
time, so the figures hold still on a noisy machine where ``cellserve bench`` does not.

It reports, per message: the whole path, the engine's part of it (``Engine.run_slots``, from the
``cellserve_engine_run_seconds`` metric), the rest (``path - engine``: our Python), and raw
onnxruntime at the same batch measured in the same run (``session.run`` on host arrays, state fed
back). Writes ``path_bench.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-path",
        help="benchmark the serving path below gRPC in-process: µs per message at N sessions, engine and rest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-dir", type=Path, required=True, help="exported model directory (manifest.json)")
    p.add_argument("--sessions", default="1,8,64", help="comma-separated session counts N (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="time steps T per message (default: 1)")
    p.add_argument("--messages", type=int, default=2000, help="timed messages per N, over all sessions (default: 2000)")
    p.add_argument("--warmup", type=int, default=200, help="untimed messages per N first (default: 200)")
    p.add_argument("--intra-op-threads", type=int, default=1, help="onnxruntime threads (default: 1)")
    p.add_argument(
        "--trace-ratio",
        type=float,
        default=None,
        help="trace with OpenTelemetry, keeping this share of steps: spans are built and batched as a server does, "
        "then discarded instead of sent (the server's side of tracing's cost); default: tracing off",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench-path"), help="directory for path_bench.json")
    p.set_defaults(func=_main)


TOTALS = ("cellserve_engine_run_seconds_sum", "cellserve_batch_size_sum", "cellserve_batch_size_count")


def _counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"cellserve bench-path: error: --sessions {text!r}: give session counts like 1,8,64")
    return counts


async def _measure(plane: Any, registry: Any, model: Any, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``n`` closed loops; per-message wall and CPU time, the engine's time and the batches formed."""
    from cellserve.client.tensors import to_proto
    from cellserve.server.engine_bench import random_inputs
    from cellserve.server.tensors import encode_output, to_numpy
    from cellserve.v1 import cellserve_pb2 as pb

    x = random_inputs(model.engine, 1, args.steps, np.random.default_rng(args.seed + n))[0][0]
    request = pb.StreamRequest(step=pb.Step(seq=1, input=to_proto(x))).SerializeToString()
    sessions = [plane.open(model.name) for _ in range(n)]

    async def loop(session: Any, messages: int) -> None:
        for _ in range(messages):
            step = pb.StreamRequest.FromString(request).step
            y = await plane.step(session, to_numpy(step.input))
            encode_output(step.seq, y)

    async def run(total: int) -> None:
        per = -(-total // n)  # every session sends the same number: each batch holds all n
        await asyncio.gather(*(loop(s, per) for s in sessions))

    def totals() -> list[float]:  # engine seconds, messages batched, batches: as the metrics have them now
        labels = {"model": model.name}
        return [registry.get_sample_value(name, labels) or 0.0 for name in TOTALS]

    await run(args.warmup)
    before = totals()
    wall, cpu = time.perf_counter(), time.process_time()
    await run(args.messages)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    engine_s, msgs, batches = (after - b for after, b in zip(totals(), before, strict=True))
    for s in sessions:
        plane.close(s, "client")
    return {"wall_s": wall, "cpu_s": cpu, "engine_s": engine_s, "messages": msgs, "mean_batch": msgs / batches}


def _raw_ort_us(model: Any, batch: int, steps: int, calls: int) -> float:
    """Raw onnxruntime at ``batch`` (bench-engine's baseline): median µs per call, after 5 untimed calls."""
    from cellserve.server.engine_bench import RawOrt

    engine, raw = model.engine, RawOrt(model.engine, batch)
    x = engine.example_input(batch, steps)
    times = []
    for i in range(calls + 5):
        t0 = time.perf_counter()
        raw(engine, None, x)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e6


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    from cellserve.server.dataplane import DataPlane
    from cellserve.server.metrics import Metrics
    from cellserve.server.models import ModelRepository
    from cellserve.server.resume_token import TokenCodec, TokenKeys
    from cellserve.server.sessions import SessionManager
    from cellserve.server.settings import Settings

    counts = _counts(args.sessions)
    settings = Settings(
        model_dirs=[args.model_dir],
        intra_op_threads=args.intra_op_threads,
        max_batch=max(counts),
        capacity=max(counts),
        metrics_port=0,
    )
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    discarded: list[int] = []
    tracing = _tracing(args.trace_ratio, metrics, discarded) if args.trace_ratio is not None else None
    models = ModelRepository.load(settings, metrics, tracing)
    (model,) = list(models)
    sessions = SessionManager(models, settings, metrics)
    plane = DataPlane(models, sessions, TokenCodec(TokenKeys.generate(), settings.token_ttl_s), settings, tracing)

    async def main() -> list[dict[str, Any]]:
        model.engine.warmup(list(range(1, model.scheduler.max_batch + 1)))  # a fixed-batch graph: 1
        model.scheduler.start()
        try:
            return [await _measure(plane, registry, model, n, args) for n in counts]
        finally:
            await model.scheduler.stop()
            if tracing is not None:
                tracing.shutdown()

    points = []
    for n, r in zip(counts, asyncio.run(main()), strict=True):
        msgs = r["messages"]
        path = r["wall_s"] / msgs * 1e6
        engine = r["engine_s"] / msgs * 1e6
        batch = round(r["mean_batch"])
        raw = _raw_ort_us(model, batch, args.steps, max(15, args.messages // batch)) / batch
        points.append(
            {
                "sessions": n,
                "mean_batch": r["mean_batch"],
                "messages": msgs,
                "path_us_per_msg": path,
                "cpu_us_per_msg": r["cpu_s"] / msgs * 1e6,
                "engine_us_per_msg": engine,
                "rest_us_per_msg": path - engine,
                "raw_ort_us_per_msg": raw,
                "path_over_raw_ort": path / raw,
            }
        )
    from cellserve.server.engine_bench import model_report

    return {
        "meta": {
            "command": (
                f"cellserve bench-path --model-dir {args.model_dir} --sessions {args.sessions} --steps {args.steps} "
                f"--messages {args.messages} --warmup {args.warmup} --intra-op-threads {args.intra_op_threads}"
                + (f" --trace-ratio {args.trace_ratio}" if args.trace_ratio is not None else "")
            ),
            "unix_time": time.time(),
            "cpu_count": os.cpu_count(),
            "loadavg": os.getloadavg(),
        },
        "model": {**model_report(model.manifest), "sha256": model.manifest.sha256},
        "steps": args.steps,
        "points": points,
        **({"tracing": {"step_ratio": args.trace_ratio, "spans": sum(discarded)}} if tracing is not None else {}),
    }


def table(report: dict[str, Any]) -> str:
    from cellserve.server.engine_bench import describe_model

    head = (
        f"{'sessions':>8} {'batch':>6} | {'path µs/msg':>11} {'engine':>8} {'rest':>8} | "
        f"{'raw ORT µs/msg':>14} {'path/raw':>8}"
    )
    title = f"model {describe_model(report['model'])}, T={report['steps']}, in-process (no gRPC)"
    lines = [title, head, "-" * len(head)]
    for p in report["points"]:
        lines.append(
            f"{p['sessions']:>8} {p['mean_batch']:>6.1f} | {p['path_us_per_msg']:>11.1f} "
            f"{p['engine_us_per_msg']:>8.1f} {p['rest_us_per_msg']:>8.1f} | "
            f"{p['raw_ort_us_per_msg']:>14.1f} {p['path_over_raw_ort']:>8.2f}"
        )
    return "\n".join(lines)


def _tracing(ratio: float, metrics: Any, discarded: list[int]) -> Any:
    """A server's tracing at ``ratio`` of steps, whose exporter takes every batch of spans and drops it (its size
    appended to ``discarded``)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from cellserve.server.settings import Settings
    from cellserve.server.trace_config import TraceConfig
    from cellserve.server.tracing import Tracing

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            discarded.append(len(spans))
            return SpanExportResult.SUCCESS

    settings = Settings(otlp_endpoint="http://127.0.0.1:4317", trace_sampler="traceidratio", trace_sampler_ratio=ratio)
    config = TraceConfig.resolve(settings, {})
    assert config is not None
    return Tracing(config, metrics.trace_spans_dropped, exporter=Discard())


def _main(args: argparse.Namespace) -> int:
    report = run_bench(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "path_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"wrote {args.out / 'path_bench.json'}")
    return 0
