"""One measurement: spawn the load workers against one target, collect latencies, read server metrics."""

from __future__ import annotations

import multiprocessing as mp
import queue
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellserve.client.bench.baselines.sizes import session_state_bytes
from cellserve.client.bench.load import LoadSpec, StartSync, WorkerResult, worker
from cellserve.client.bench.metrics_scrape import ServerCounters
from cellserve.client.bench.procfs import TreeUsage, tree_usage

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
SNAPSHOT_LEAD_S = 0.05  # a count-bound run's server snapshot, at most this long before its window opens


@dataclass
class Result:
    """What one target did in one configuration."""

    target: str
    streams: int
    t: int
    messages: int
    seconds: float
    latencies_s: np.ndarray
    mean_batch: float | None = None
    engine_s_per_call: float | None = None
    client_cpu_s_per_msg: float | None = None  # load generator CPU per message (all workers)
    server_cpu_s_per_msg: float | None = None  # server process tree's CPU per message in the window (bench-started)
    server_loop_cpu_s_per_msg: float | None = None  # of that, its main threads' (the event loops) alone
    rows: int = 1  # sessions each message steps (Multiplex: --sessions-per-message)

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds

    @property
    def steps_per_s(self) -> float:
        """Session-steps per second: messages × sessions per message × T."""
        return self.msgs_per_s * self.t * self.rows

    def percentiles_ms(self) -> dict[str, float]:
        q = np.percentile(self.latencies_s, PERCENTILES) * 1e3
        return {f"p{p:g}".replace(".", "_"): float(v) for p, v in zip(PERCENTILES, q, strict=True)}

    @classmethod
    def pooled(cls, rounds: list[Result]) -> Result:
        """One target's rounds as one measurement: messages and seconds add up, latencies join; per-message
        figures are averaged weighted by each round's messages, per-call ones (mean batch, engine time per
        call) by its engine calls (messages / mean batch)."""
        if len(rounds) == 1:
            return rounds[0]
        first = rounds[0]

        def weighted(attr: str, by_calls: bool = False) -> float | None:
            pairs = [(getattr(r, attr), r.messages / r.mean_batch if by_calls and r.mean_batch else r.messages)
                     for r in rounds if getattr(r, attr) is not None]  # fmt: skip
            total = sum(w for _, w in pairs)
            return sum(v * w for v, w in pairs) / total if pairs and total else None

        return cls(
            first.target,
            first.streams,
            first.t,
            sum(r.messages for r in rounds),
            sum(r.seconds for r in rounds),
            np.concatenate([r.latencies_s for r in rounds]),
            mean_batch=weighted("mean_batch", by_calls=True),
            engine_s_per_call=weighted("engine_s_per_call", by_calls=True),
            client_cpu_s_per_msg=weighted("client_cpu_s_per_msg"),
            server_cpu_s_per_msg=weighted("server_cpu_s_per_msg"),
            server_loop_cpu_s_per_msg=weighted("server_loop_cpu_s_per_msg"),
            rows=first.rows,
        )

    def to_json(self) -> dict[str, Any]:
        cdf_q = np.linspace(0, 100, 101)
        return {
            "messages": self.messages,
            "seconds": self.seconds,
            "msgs_per_s": self.msgs_per_s,
            "steps_per_s": self.steps_per_s,
            "latency_ms": self.percentiles_ms(),
            "latency_cdf_ms": [float(v) for v in np.percentile(self.latencies_s, cdf_q) * 1e3],
            "mean_batch": self.mean_batch,
            "engine_ms_per_call": _scaled(self.engine_s_per_call, 1e3),
            "client_cpu_us_per_msg": _scaled(self.client_cpu_s_per_msg, 1e6),
            "server_cpu_us_per_msg": _scaled(self.server_cpu_s_per_msg, 1e6),
            "server_loop_cpu_us_per_msg": _scaled(self.server_loop_cpu_s_per_msg, 1e6),
        }


def _scaled(v: float | None, k: float) -> float | None:
    return None if v is None else v * k


@dataclass(frozen=True)
class LoadPlan:
    streams: int
    t: int
    duration_s: float
    messages: int  # total per run; 0 = duration-bound
    warmup_s: float
    procs: int
    seed: int
    checkpoint_every: int = 0  # the sdk target's sessions
    example: tuple[int, ...] | None = None  # the frame sent where the model's is dynamic (None: DYNAMIC_DIM)
    sessions: int = 1  # sessions stepped per message (Multiplex); 1 with multiplex False: one Stream session each
    inflight: int = 1  # messages each stream keeps in flight (Multiplex and its echo only)
    multiplex: bool = False  # Multiplex messages (cellserve's Multiplex RPC, or echo of their sizes)


def round_order(names: list[str], r: int) -> list[str]:
    """The targets' order in round ``r``: reversed every other round, so that each pair of targets runs
    one way round as often as the other, and rotated by one every two rounds, so that none always runs
    first or last."""
    k = (r // 2) % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if r % 2 else order


def server_cpu_per_msg(before: TreeUsage, after: TreeUsage, messages: int) -> tuple[float, float | None]:
    """The server tree's CPU seconds per message between two readings, and its main threads' (None when
    the tree's processes changed: one that left took its main thread's CPU with it)."""
    server_s = after.cpu_s - before.cpu_s
    if after.pids != before.pids:
        return server_s / max(1, messages), None
    loop_s = after.main_threads_cpu_s - before.main_threads_cpu_s
    # A part never exceeds its whole: the main threads are read a moment after their processes (a tick may
    # land in between), and the two sums round differently when they are equal.
    return server_s / max(1, messages), min(loop_s, server_s) / max(1, messages)


def run_load(
    target: str,
    address: str,
    info: Any,
    plan: LoadPlan,
    *,
    metrics_url: str | None = None,
    server_pid: int | None = None,
    progress_bar: bool = True,
    protocol: str | None = None,
) -> Result:
    """Drive ``address`` with ``plan.streams`` closed-loop streams split over worker processes. ``target``
    names the result; ``protocol`` (default: ``target``) is how the workers talk to it (e.g. a second
    cellserve server, named "compare", speaks "cellserve")."""
    ctx = mp.get_context("spawn")  # never fork a process that may hold gRPC state
    procs = max(1, min(plan.procs, plan.streams))
    shares = [plan.streams // procs + (1 if i < plan.streams % procs else 0) for i in range(procs)]
    per_stream = -(-plan.messages // plan.streams) if plan.messages else 0
    sync = StartSync(ctx, procs)
    progress = ctx.Value("q", 0)
    results: Any = ctx.Queue()
    workers = []
    for i, n in enumerate(shares):
        spec = LoadSpec(
            target=protocol or target, address=address, model=info.name, streams=n, t=plan.t,
            input_kind=info.input_kind, input_size=info.input_size, output_size=info.output_size,
            layers=info.layers, hidden=info.hidden,
            warmup_s=plan.warmup_s, duration_s=plan.duration_s if not plan.messages else 0.0,
            messages_per_stream=per_stream, seed=plan.seed * 1000 + i, checkpoint_every=plan.checkpoint_every,
            input_dtype=getattr(info, "input_dtype", ""), frame=getattr(info, "frame", None),
            output_frame=getattr(info, "output_frame", None), state_bytes=session_state_bytes(info),
            example=plan.example, sessions=plan.sessions, inflight=plan.inflight, multiplex=plan.multiplex,
        )  # fmt: skip
        p = ctx.Process(target=worker, args=(spec, sync, progress, results), daemon=True)
        p.start()
        workers.append(p)
    try:
        return _collect(
            target, plan, per_stream, sync, progress, results, workers, metrics_url, server_pid, info, progress_bar
        )
    finally:
        for p in workers:
            p.join(30)
            if p.is_alive():
                p.terminate()


def terminal_bar(total: int | None, desc: str, wanted: bool) -> Any:
    """A tqdm bar on stderr, drawn only when ``wanted`` (no ``--no-progress``) and stderr is a terminal: piped or
    redirected output (a log, CI, ``| tee``) gets no carriage-return clutter."""
    from tqdm import tqdm

    shown = wanted and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="msg", disable=not shown, leave=False, file=sys.stderr)


def _collect(
    target: str,
    plan: LoadPlan,
    per_stream: int,
    sync: StartSync,
    progress: Any,
    results: Any,
    workers: list,
    metrics_url: str | None,
    server_pid: int | None,
    info: Any,
    progress_bar: bool,
) -> Result:
    try:
        window = sync.publish(plan.warmup_s, 0.0 if plan.messages else plan.duration_s)
    except Exception as e:  # a broken barrier: some worker failed while opening its streams
        raise RuntimeError(f"{target}: load workers failed to start: {_first_error(results)}") from e
    total = per_stream * plan.streams if plan.messages else None
    bar = terminal_bar(total, f"{target:>9} s={plan.streams} T={plan.t}", wanted=progress_bar)
    # Warm-up runs; the window opens. A count-bound window may close within milliseconds of opening (a small
    # model, few messages): its snapshot is taken a little before, or a busy box could take it after them all.
    lead = min(SNAPSHOT_LEAD_S, plan.warmup_s / 2) if plan.messages else 0.0
    time.sleep(max(0.0, window.start_at - lead - time.time()))
    before = ServerSnapshot.take(server_pid, metrics_url, info.name)
    after: ServerSnapshot | None = None
    got: list[WorkerResult] = []
    while len(got) < len(workers):
        now = time.time()
        if after is None and window.end_at and now >= window.end_at:
            after = ServerSnapshot.take(server_pid, metrics_url, info.name)
        try:
            got.append(results.get(timeout=0.1))
        except queue.Empty:
            if not any(p.is_alive() for p in workers) and results.empty():
                raise RuntimeError(f"{target}: load workers died without a result") from None
        bar.n = progress.value
        bar.refresh()
    bar.close()
    errors = [r.error for r in got if r.error]
    if errors:
        raise RuntimeError(f"{target}: load worker failed: {errors[0]}")
    if after is None:
        after = ServerSnapshot.take(server_pid, metrics_url, info.name)
    lat = np.concatenate([np.frombuffer(r.latencies, np.float64) for r in got])
    end = window.end_at or max(r.finished for r in got)
    result = Result(target, plan.streams, plan.t, len(lat), max(end - window.start_at, 1e-9), lat, rows=plan.sessions)
    result.client_cpu_s_per_msg = sum(r.cpu_s for r in got) / max(1, sum(r.sent for r in got))
    if before.usage is not None and after.usage is not None:
        result.server_cpu_s_per_msg, result.server_loop_cpu_s_per_msg = server_cpu_per_msg(
            before.usage, after.usage, len(lat)
        )
    if before.counters is not None and after.counters is not None:
        delta = after.counters - before.counters
        result.mean_batch = delta.batch.mean
        result.engine_s_per_call = delta.engine.mean
    return result


@dataclass(frozen=True)
class ServerSnapshot:
    """The target server's CPU time (its process tree: every worker) and (cellserve only) metric counters now."""

    usage: TreeUsage | None
    counters: ServerCounters | None

    @classmethod
    def take(cls, pid: int | None, metrics_url: str | None, model: str) -> ServerSnapshot:
        return cls(tree_usage(pid), ServerCounters.read(metrics_url, model) if metrics_url else None)


def _first_error(results: Any) -> str:
    try:
        return results.get(timeout=5).error or "unknown error"
    except queue.Empty:
        return "no error reported"
