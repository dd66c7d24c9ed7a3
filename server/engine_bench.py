"""`cellserve bench-engine`: the engine and state pool in-process, O(batch) check and host round-trip baseline.

For every pool capacity (e.g. 1k and 1M slots) it fills the pool (every slot allocated, so the
memory is really committed), then times ``Engine.run_slots`` per batch size on random slots spread
over the whole pool. In the same run, on the same pool, it times the *host round trip* that a
server keeping state in host memory pays (Triton's ORT path without CUDA shared memory): gather →
copy every state tensor to the host → ``session.run`` with host state → copy the next state back →
scatter. Also in the same run: *raw onnxruntime* — ``session.run`` of the same session on host
arrays with the state fed back, the ceiling an engine call is held to (``res/raw``). It prints a
table with ratios and writes ``engine_bench.json`` (+ ``engine_bench.png`` when matplotlib is there).

Flat per-step time across capacities is the O(batch) evidence; on the CPU the round trip costs
only extra host copies, on CUDA it adds PCIe transfers and syncs: run it with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-engine",
        help="benchmark the engine + state pool in-process: per-step time vs capacity, host round-trip baseline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-dir", type=Path, required=True, help="exported model directory (manifest.json)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the pool lives (default: cpu)")
    p.add_argument("--device-id", type=int, default=0, help="CUDA device ordinal (default: 0)")
    p.add_argument("--capacities", default="1000,1000000", help="comma-separated pool sizes (default: %(default)s)")
    p.add_argument("--batch-sizes", default="1,8,64,256", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="time steps T per message (default: 1)")
    p.add_argument("--iters", type=int, default=200, help="timed engine calls per point and mode (default: 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls per point and mode (default: 20)")
    p.add_argument("--intra-op-threads", type=int, default=1, help="onnxruntime threads (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench-engine"), help="directory for JSON and PNG")
    p.set_defaults(func=_main)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def graph_calls(engine: Any, x: np.ndarray) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """A step's batch ``x`` ([B, T, *frame]) as the engine runs it: its bucket's step shape and the graph's x of
    each call (the whole step with a time axis; one frame per call for a per-frame model)."""
    if engine.time_axis:
        return tuple(x.shape[1:]), [x]
    return tuple(x.shape[2:]), [np.ascontiguousarray(x[:, t]) for t in range(x.shape[1])]


def round_trip_step(engine: Any, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The baseline: the batch's state goes to the host and back every step, beside the pool."""
    ops, pool = engine.ops, engine.pool
    step, calls = graph_calls(engine, x)
    bucket = engine._bucket(x.shape[0], step)  # its graph-layout device buffers, allocated once
    rows = ops.index(slots)
    pool.gather(rows, bucket.states_in)
    states = [ops.download(s) for s in bucket.states_in]  # device → host
    ys = []
    for graph_x in calls:  # → ORT on host arrays, the state carried on the host
        y, states = engine.run_stateless(graph_x, states)
        ys.append(y)
    for out, state in zip(bucket.states_out, states, strict=True):
        ops.copy_in(out, np.ascontiguousarray(state))  # host → device
    pool.scatter(rows, bucket.states_out)
    ops.synchronize()
    return ys[0] if engine.time_axis else np.stack(ys, axis=1)


class RawOrt:
    """The baseline an engine call is held to: ``session.run`` of the same session on host arrays, state fed back."""

    def __init__(self, engine: Any, batch: int) -> None:
        self.states = engine.zero_states(batch)  # every state, graph layout

    def __call__(self, engine: Any, slots: np.ndarray, x: np.ndarray) -> None:
        for graph_x in graph_calls(engine, x)[1]:
            _, self.states = engine.run_stateless(graph_x, self.states)


def gather_scatter_step(engine: Any, slots: np.ndarray, x: np.ndarray) -> None:
    """The pool's share of a step alone: gather the batch's state and scatter it back (the O(batch) part)."""
    ops, pool = engine.ops, engine.pool
    bucket = engine._bucket(x.shape[0], graph_calls(engine, x)[0])
    rows = ops.index(slots)
    pool.gather(rows, bucket.states_in)
    pool.scatter(rows, bucket.states_in)
    ops.synchronize()


def describe_model(model: dict[str, Any]) -> str:
    """The report's model in a few words: an LSTM's sizes, else its state tensors."""
    if model.get("layers"):
        return f"L={model['layers']} H={model['hidden']}"
    states = ", ".join(
        f"{s['name']} {s['dtype']} [{', '.join(str(d) for d in s['shape'])}]" for s in model.get("states", [])
    )
    return f"states {states}"


def model_report(manifest: Any) -> dict[str, Any]:
    """What a report says about the model (``layers``/``hidden`` 0 for a model that is not our LSTM)."""
    return {
        "name": manifest.name,
        "layers": manifest.layers,
        "hidden": manifest.hidden,
        "states": [{"name": s.input, "dtype": s.dtype, "shape": list(s.shape)} for s in manifest.states],
        "state_bytes": manifest.state_bytes,
    }


def random_inputs(engine: Any, batch: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Four valid inputs of shape [B, T] (or [B, T, I]): random token ids in the vocabulary, or normal features."""
    xs = [engine.example_input(batch, steps) for _ in range(4)]
    vocab = engine.manifest.vocab
    for x in xs:
        if vocab is not None:
            x[...] = rng.integers(0, vocab, size=x.shape)
        else:
            x[...] = rng.standard_normal(x.shape)
    return xs


def _time_batch(engines: list[Any], batch: int, args: argparse.Namespace, rng: np.random.Generator) -> list[dict]:
    """One batch size on every pool: calls interleaved across capacities and modes, so load drift hits all alike."""
    n = args.warmup + args.iters
    slot_sets = [
        [rng.choice(e.pool.capacity, size=batch, replace=False).astype(np.int64) for _ in range(n)] for e in engines
    ]
    xs = random_inputs(engines[0], batch, args.steps, rng)
    modes = {"resident": lambda e, s, x: e.run_slots(s, x), "round_trip": round_trip_step}
    modes["gather_scatter"] = gather_scatter_step
    raw = [RawOrt(e, batch) for e in engines]
    modes["raw_ort"] = lambda e, s, x: raw[engines.index(e)](e, s, x)
    times = [{m: [] for m in modes} for _ in engines]
    for i in range(n):
        for k, engine in enumerate(engines):
            for mode, step in modes.items():
                t0 = time.perf_counter()
                step(engine, slot_sets[k][i], xs[i % len(xs)])
                dt = time.perf_counter() - t0
                if i >= args.warmup:
                    times[k][mode].append(dt)
    points = []
    for k in range(len(engines)):
        point: dict[str, Any] = {"batch": batch}
        for mode, samples in times[k].items():
            arr = np.array(samples)
            med = float(np.median(arr))
            point[mode] = {
                "min_us": float(arr.min()) * 1e6,  # on a shared machine the cost without preemption
                "median_us": med * 1e6,
                "p90_us": float(np.percentile(arr, 90)) * 1e6,
                "steps_per_s": batch * args.steps / med,
            }
        points.append(point)
    return points


def _device_bytes(ops: Any) -> int | None:
    if ops.device_type != "cuda":
        return None
    import cupy

    with cupy.cuda.Device(ops.device_id):
        return int(cupy.get_default_memory_pool().total_bytes())


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every capacity × batch size × mode; returns the report (also what the JSON holds)."""
    from cellserve.model.manifest import load_manifest
    from cellserve.server.arrays import array_ops
    from cellserve.server.engine import Engine
    from cellserve.server.state_pool import StatePool

    manifest = load_manifest(args.model_dir)
    ops = array_ops(args.device, args.device_id)
    rng = np.random.default_rng(args.seed)
    batch_sizes = _ints(args.batch_sizes)
    if manifest.fixed_batch is not None and max(batch_sizes) > manifest.fixed_batch:
        raise SystemExit(
            f"model {manifest.name!r} runs at batch {manifest.fixed_batch} only (its graph's batch is fixed); "
            f"pass --batch-sizes {manifest.fixed_batch}"
        )
    report: dict[str, Any] = {
        "device": args.device if args.device == "cpu" else f"cuda:{args.device_id}",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "model": model_report(manifest),
        "steps": args.steps,
        "iters": args.iters,
        "capacities": [],
    }
    engines = []
    for capacity in _ints(args.capacities):  # every pool is built and filled first, then all are timed together
        if max(batch_sizes) > capacity:
            raise SystemExit(f"batch size {max(batch_sizes)} exceeds capacity {capacity}")
        rss_before = rss_bytes()
        pool = StatePool(manifest.states, capacity, ops)
        t0 = time.perf_counter()
        owner = object()
        for _ in range(capacity):  # every slot allocated (and zeroed): the pool's memory is really in use
            pool.allocate(owner)
        fill_s = time.perf_counter() - t0
        engine = Engine(manifest, args.model_dir, pool, intra_op_threads=args.intra_op_threads)
        engine.warmup(batch_sizes)
        engines.append(engine)
        report["capacities"].append(
            {
                "capacity": capacity,
                "pool_bytes": pool.nbytes,
                "fill_seconds": fill_s,
                "rss_bytes_before": rss_before,
                "rss_bytes_filled": rss_bytes(),
                "device_pool_bytes": _device_bytes(ops),
                "points": [],
            }
        )
        log.info("pool filled", extra={"capacity": capacity, "seconds": fill_s})
    for batch in batch_sizes:
        for entry, point in zip(report["capacities"], _time_batch(engines, batch, args, rng), strict=True):
            entry["points"].append(point)
    report["host"]["loadavg_end"] = os.getloadavg()
    report["host"]["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["ratios"] = ratios(report, "median_us")
    report["ratios_min"] = ratios(report, "min_us")
    return report


def ratios(report: dict[str, Any], stat: str = "median_us") -> list[dict[str, Any]]:
    """Per batch size: largest/smallest capacity (flat ≈ 1) and round trip / resident at the largest."""
    caps = sorted(report["capacities"], key=lambda e: e["capacity"])
    small, large = caps[0], caps[-1]
    rows = []
    for ps, pl in zip(small["points"], large["points"], strict=True):
        rows.append(
            {
                "batch": pl["batch"],
                "resident_large_over_small": pl["resident"][stat] / ps["resident"][stat],
                "gather_scatter_large_over_small": pl["gather_scatter"][stat] / ps["gather_scatter"][stat],
                "round_trip_large_over_small": pl["round_trip"][stat] / ps["round_trip"][stat],
                "round_trip_over_resident": pl["round_trip"][stat] / pl["resident"][stat],
                "resident_over_raw_ort": pl["resident"][stat] / pl["raw_ort"][stat],
            }
        )
    return rows


def table(report: dict[str, Any], stat: str = "median_us") -> str:
    """The text table for ``stat`` ("median_us" or "min_us"), ratios included."""
    caps = sorted(report["capacities"], key=lambda e: e["capacity"])
    small, large = caps[0], caps[-1]
    cs, cl = small["capacity"], large["capacity"]
    head = (
        f"{'batch':>5} | {'step µs @' + str(cs):>16} {'@' + str(cl):>9} {'ratio':>5} | "
        f"{'gather+scatter µs @' + str(cs):>26} {'@' + str(cl):>9} {'ratio':>5} | "
        f"{'round-trip µs':>13} {'rt/resident':>11} | {'raw ORT µs':>10} {'res/raw':>7} | {'steps/s':>9}"
    )
    lines = [
        f"device {report['device']}, model {describe_model(report['model'])}, "
        f"T={report['steps']}, {stat[:-3]} of {report['iters']} calls (resident = Engine.run_slots)",
        head,
        "-" * len(head),
    ]
    for ps, pl, r in zip(small["points"], large["points"], ratios(report, stat), strict=True):
        lines.append(
            f"{pl['batch']:>5} | {ps['resident'][stat]:>16.1f} {pl['resident'][stat]:>9.1f} "
            f"{r['resident_large_over_small']:>5.2f} | {ps['gather_scatter'][stat]:>26.1f} "
            f"{pl['gather_scatter'][stat]:>9.1f} {r['gather_scatter_large_over_small']:>5.2f} | "
            f"{pl['round_trip'][stat]:>13.1f} {r['round_trip_over_resident']:>11.2f} | "
            f"{pl['raw_ort'][stat]:>10.1f} {r['resident_over_raw_ort']:>7.2f} | "
            f"{pl['batch'] * report['steps'] / (pl['resident'][stat] * 1e-6):>9.0f}"
        )
    for e in caps:
        lines.append(
            f"capacity {e['capacity']}: pool {e['pool_bytes'] / 2**20:.0f} MiB, "
            f"RSS {e['rss_bytes_filled'] / 2**20:.0f} MiB after filling every slot ({e['fill_seconds']:.1f} s)"
            + (f", device pool {e['device_pool_bytes'] / 2**20:.0f} MiB" if e["device_pool_bytes"] else "")
        )
    return "\n".join(lines)


def write_png(report: dict[str, Any], path: Path) -> bool:
    """Per-call latency vs batch size, one line per capacity and mode. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in report["capacities"]:
        batches = [p["batch"] for p in e["points"]]
        for mode, style in (("resident", "-o"), ("round_trip", "--s"), ("gather_scatter", ":^")):
            ax.plot(batches, [p[mode]["median_us"] for p in e["points"]], style, label=f"{mode}, {e['capacity']} slots")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sessions per engine call)")
    ax.set_ylabel("median µs per engine call")
    ax.set_title(f"cellserve engine on {report['device']}: state resident vs host round trip")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _main(args: argparse.Namespace) -> int:
    report = run_bench(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    png = write_png(report, args.out / "engine_bench.png")
    print(table(report, "median_us"))
    print()
    print(table(report, "min_us"))
    print(f"wrote {args.out / 'engine_bench.json'}" + (" and engine_bench.png" if png else " (no matplotlib: no PNG)"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cellserve.server.engine_bench ARGS``: the same command without the rest of the CLI's imports."""
    parser = argparse.ArgumentParser(prog="python -m cellserve.server.engine_bench")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench-engine", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
