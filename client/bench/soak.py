"""``cellserve bench soak``: churn sessions for minutes and watch the server for leaks.

K workers each loop through sessions with the asyncio SDK: open, a random number of messages of
random T, then a clean ``close`` or an abrupt drop (the channel closed under the stream, half of
the time with a step still in flight). A small share of messages is replaced by an invalid step
(wrong dtype, rank or width, token id out of range, NaN/Inf, empty); each must be answered in the
stream with INVALID_ARGUMENT and leave the session usable. Anything else is an unexpected error.

Every ``--sample-every`` seconds the server's RSS, open fds, state slots and session counters are
read from /metrics, with the client-side step latency percentiles of the window. At the end the
churn stops and the soak waits (bounded) until the server reports every slot free.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from array import array
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from cellserve.client.aio import AsyncClient, AsyncSession
from cellserve.client.bench.report import write_json
from cellserve.client.bench.runner import shipped_model_dir
from cellserve.client.bench.serving import ServerProcess, python_module
from cellserve.client.bench.soak_inputs import UncheckedInfo, bad_step, good_step
from cellserve.client.bench.soak_probe import ServerReading
from cellserve.client.bench.soak_report import build_report, print_summary, write_png
from cellserve.client.errors import CellserveClientError, StepRejected
from cellserve.client.model_info import ModelInfo

log = logging.getLogger(__name__)
EXPECTED_CODE = grpc.StatusCode.INVALID_ARGUMENT  # what every injected bad step must be answered with
MAX_EXAMPLES = 5  # messages kept per unexpected error kind
SETTLE_POLL_S = 0.1  # between /metrics reads while waiting for the slots to be free


@dataclass(frozen=True)
class SoakPlan:
    """The churn and sampling settings (all written into soak.json)."""

    duration_s: float
    workers: int = 32
    min_messages: int = 1
    max_messages: int = 64
    max_t: int = 16
    p_drop: float = 0.25
    p_bad_step: float = 0.02
    think_ms: float = 2.0
    warmup_fraction: float = 0.2
    sample_every_s: float = 5.0
    settle_timeout_s: float = 30.0
    max_rss_growth_pct: float = 5.0
    seed: int = 0
    model: str = ""

    @property
    def warmup_s(self) -> float:
        return self.duration_s * self.warmup_fraction

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SoakPlan:
        seconds = args.seconds if args.seconds is not None else 60.0 * (args.minutes if args.minutes else 10.0)
        return cls(seconds, args.workers, args.min_messages, args.max_messages, args.max_t, args.p_drop,
                   args.p_bad_step, args.think_ms, args.warmup, args.sample_every, args.settle_timeout,
                   args.max_rss_growth, args.seed, args.model)  # fmt: skip

    def problems(self) -> list[str]:
        checks = [
            (self.duration_s > 0, "the soak length must be > 0"),
            (self.workers >= 1, "--workers must be >= 1"),
            (1 <= self.min_messages <= self.max_messages, "need 1 <= --min-messages <= --max-messages"),
            (self.max_t >= 1, "--max-t must be >= 1"),
            (0 <= self.p_drop <= 1 and 0 <= self.p_bad_step <= 1, "probabilities must be in [0, 1]"),
            (self.think_ms >= 0, "--think-ms must be >= 0"),
            (0 <= self.warmup_fraction < 1, "--warmup must be in [0, 1)"),
            (self.sample_every_s > 0 and self.settle_timeout_s > 0, "--sample-every and --settle-timeout must be > 0"),
        ]
        return [msg for ok, msg in checks if not ok]


@dataclass
class Tally:
    """Client-side counts; touched only from the event loop's thread."""

    opened: int = 0
    closed: int = 0
    dropped: int = 0
    dropped_mid_step: int = 0
    messages: int = 0
    steps: int = 0
    injected_sent: Counter[str] = field(default_factory=Counter)
    injected_expected: Counter[str] = field(default_factory=Counter)  # answered with EXPECTED_CODE
    unexpected: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    window: array = field(default_factory=lambda: array("d"))  # latencies (s) since the last sample

    def error(self, kind: str, message: str) -> None:
        self.unexpected[kind] += 1
        kept = self.examples.setdefault(kind, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(message[:300])
        log.warning("soak: unexpected error %s: %s", kind, message[:300])


class Churn:
    """The workers: each loops open → messages → close or drop until ``stop`` is set."""

    def __init__(self, address: str, info: ModelInfo, plan: SoakPlan, tally: Tally) -> None:
        self.address = address
        self.info = info
        self.unchecked = UncheckedInfo.of(info)
        self.plan = plan
        self.tally = tally
        self.stop = asyncio.Event()

    async def worker(self, index: int) -> None:
        rng = np.random.default_rng([self.plan.seed, index])
        client = AsyncClient(self.address)
        try:
            while not self.stop.is_set():
                client = await self._one_session(client, rng)
        finally:
            await client.close()

    async def _one_session(self, client: AsyncClient, rng: np.random.Generator) -> AsyncClient:
        """Run one session; returns the client to use next (a fresh one after a drop or a failure)."""
        p = self.plan
        n = int(rng.integers(p.min_messages, p.max_messages + 1))
        drop = bool(rng.random() < p.p_drop)
        mid_step = drop and bool(rng.random() < 0.5)
        try:
            session = await client.session(p.model or None)
        except CellserveClientError as e:
            self.tally.error(f"open:{e.code.name}", e.details)
            await client.close()
            await self._pause(0.5)  # a failing server is not hammered in a tight loop
            return AsyncClient(self.address)
        self.tally.opened += 1
        try:
            for _ in range(n):
                if self.stop.is_set():
                    break
                if rng.random() < p.p_bad_step:
                    await self._bad_step(session, rng)
                else:
                    await self._good_step(session, rng)
                if p.think_ms > 0:
                    await self._pause(float(rng.exponential(p.think_ms / 1000)))
            if not drop:
                await session.close()
                self.tally.closed += 1
                return client
            if mid_step:  # a step on the wire, its output never read
                await session.send(good_step(self.info, int(rng.integers(1, p.max_t + 1)), rng))
                self.tally.dropped_mid_step += 1
        except CellserveClientError as e:
            self.tally.error(e.code.name, e.details)
        self.tally.dropped += drop
        await client.close()  # cancels the stream without close: the server sees a disconnect
        return AsyncClient(self.address)

    async def _good_step(self, session: AsyncSession, rng: np.random.Generator) -> None:
        t = int(rng.integers(1, self.plan.max_t + 1))
        x = good_step(self.info, t, rng)
        t0 = time.perf_counter()
        try:
            y = await session.step(x)
        except StepRejected as e:  # a valid step rejected: unexpected, but the session goes on
            self.tally.error(f"step:{e.code.name}", e.details)
            return
        self.tally.window.append(time.perf_counter() - t0)
        self.tally.messages += 1
        self.tally.steps += t
        if y.shape != (t, self.info.output_size) or not np.isfinite(y).all():
            self.tally.error("bad_output", f"output shape {list(y.shape)} for T={t}, or not finite")

    async def _bad_step(self, session: AsyncSession, rng: np.random.Generator) -> None:
        kind, x = bad_step(self.info, rng)
        self.tally.injected_sent[kind] += 1
        session.info = self.unchecked
        try:
            await session.step(x)
        except StepRejected as e:
            if e.code == EXPECTED_CODE:
                self.tally.injected_expected[kind] += 1
            else:
                self.tally.error(f"injected:{kind}:{e.code.name}", e.details)
        else:
            self.tally.error(f"injected:{kind}:accepted", f"the server accepted an invalid step ({kind})")
        finally:
            session.info = self.info

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` (the load's think time), or less when the soak stops."""
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            pass


def percentiles_ms(latencies: array) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p99": None}
    a = np.frombuffer(latencies, dtype=np.float64) * 1000
    p50, p99 = np.percentile(a, [50, 99])
    return {"p50": float(p50), "p99": float(p99)}


class Recorder:
    """Samples the server and the tally over time."""

    def __init__(self, metrics_url: str, model: str, pid: int | None, tally: Tally, t0: float) -> None:
        self.metrics_url = metrics_url
        self.model = model
        self.pid = pid
        self.tally = tally
        self.t0 = t0
        self.samples: list[dict[str, object]] = []
        self.all_latencies = array("d")
        self.last: ServerReading | None = None

    async def read(self) -> ServerReading:
        return await asyncio.to_thread(ServerReading.read, self.metrics_url, self.model, self.pid)

    async def sample(self, phase: str) -> dict[str, object]:
        reading = await self.read()
        window, self.tally.window = self.tally.window, array("d")
        self.all_latencies.extend(window)
        tally = self.tally
        sample: dict[str, object] = {
            "t_s": round(time.monotonic() - self.t0, 3),
            "phase": phase,
            **reading.to_json(),
            "client": {
                "opened": tally.opened,
                "closed": tally.closed,
                "dropped": tally.dropped,
                "messages": tally.messages,
                "steps": tally.steps,
                "injected": sum(tally.injected_sent.values()),
                "unexpected": sum(tally.unexpected.values()),
            },
            "latency_ms": {**percentiles_ms(window), "n": len(window)},
        }
        self.samples.append(sample)
        self.last = reading
        return sample

    async def run(self, plan: SoakPlan, stop: asyncio.Event) -> None:
        """Sample every ``plan.sample_every_s`` until ``stop`` is set (then once more, at the stop)."""
        due = self.t0
        while True:
            elapsed = time.monotonic() - self.t0
            await self.sample("warmup" if elapsed < plan.warmup_s else "soak")
            due += plan.sample_every_s
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, due - time.monotonic()))
            except TimeoutError:
                continue
            await self.sample("soak" if time.monotonic() - self.t0 >= plan.warmup_s else "warmup")
            return

    async def settle(self, timeout_s: float) -> tuple[bool, float]:
        """Poll /metrics until every slot is free; (freed, seconds waited)."""
        start = time.monotonic()
        while True:
            reading = await self.read()
            if reading.all_free or time.monotonic() - start >= timeout_s:
                self.last = reading
                return reading.all_free, time.monotonic() - start
            await asyncio.sleep(SETTLE_POLL_S)


async def _progress(plan: SoakPlan, churn: Churn, rec: Recorder, quiet: bool) -> None:
    """A tqdm bar over the soak's seconds on stderr (none with --quiet or when stderr is not a tty)."""
    from tqdm import tqdm

    total = round(plan.duration_s)
    form = "{l_bar}{bar}| {n}/{total} s [{elapsed}<{remaining}{postfix}]"
    with tqdm(total=total, bar_format=form, disable=quiet or not sys.stderr.isatty(), file=sys.stderr) as bar:
        while not churn.stop.is_set():
            try:
                await asyncio.wait_for(churn.stop.wait(), 1.0)
            except TimeoutError:
                pass
            bar.n = min(total, round(time.monotonic() - rec.t0))
            last = rec.last
            bar.set_postfix(
                sessions=churn.tally.opened,
                rss_mb=f"{last.rss_bytes / 2**20:.0f}" if last and last.rss_bytes else "?",
                slots=int(last.slots_used) if last and last.slots_used is not None else "?",
                unexpected=sum(churn.tally.unexpected.values()),
                refresh=False,
            )
            bar.refresh()


async def soak(address: str, metrics_url: str, info: ModelInfo, plan: SoakPlan, pid: int | None,
               quiet: bool) -> tuple[Recorder, Tally, dict[str, object]]:  # fmt: skip
    """Run the churn for ``plan.duration_s``, then stop it and wait for the slots to be free."""
    tally = Tally()
    churn = Churn(address, info, plan, tally)
    rec = Recorder(metrics_url, info.name, pid, tally, time.monotonic())
    before = await rec.read()
    workers = [asyncio.create_task(churn.worker(i)) for i in range(plan.workers)]
    sampler = asyncio.create_task(rec.run(plan, churn.stop))
    progress = asyncio.create_task(_progress(plan, churn, rec, quiet))
    try:
        await asyncio.wait_for(asyncio.shield(churn.stop.wait()), plan.duration_s)
    except TimeoutError:
        pass
    churn.stop.set()
    await sampler  # the last sample under load, taken as the churn stops
    await progress
    done, pending = await asyncio.wait(workers, timeout=60)
    for task in pending:
        task.cancel()
        tally.error("stop_timeout", "a worker did not finish its session within 60 s of the stop")
    for task in done:
        if task.exception() is not None:
            tally.error(f"worker:{type(task.exception()).__name__}", str(task.exception()))
    freed, settle_s = await rec.settle(plan.settle_timeout_s)
    await rec.sample("settled")
    return rec, tally, {"before": before.to_json(), "freed": freed, "settle_s": round(settle_s, 3)}


def _fail(message: str) -> int:
    print(f"cellserve bench soak: error: {message}", file=sys.stderr)
    return 2


def run_soak(args: argparse.Namespace) -> int:
    """``cellserve bench soak``: exit 0 when every check holds, 1 when one fails, 2 on a usage error."""
    plan = SoakPlan.from_args(args)
    problems = plan.problems()
    if problems:
        return _fail("; ".join(problems))
    if args.server is not None and args.metrics_url is None:
        return _fail("--server needs --metrics-url (RSS and slots are read from the server's /metrics)")
    model_dir = args.model_dir or shipped_model_dir()
    if args.server is None and model_dir is None:
        return _fail("--model-dir is needed (no shipped model found)")
    try:
        report = _run(args, plan, model_dir)
    except (RuntimeError, OSError, TimeoutError, CellserveClientError) as e:
        return _fail(str(e))
    print_summary(report)
    out: Path = args.out
    write_json(report, out / "soak.json")
    png = write_png(report, out / "soak.png")
    print(f"wrote {out / 'soak.json'}" + (f" and {out / 'soak.png'}" if png else " (no matplotlib: no PNG)"))
    return 0 if report["passed"] else 1


def _run(args: argparse.Namespace, plan: SoakPlan, model_dir: Path | None) -> dict[str, object]:
    from cellserve.client import Client

    with ExitStack() as stack:
        address, metrics_url, pid = args.server, args.metrics_url, None
        if address is None:
            serve = ["--log-level", "WARNING", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port",
                     "auto", "--metrics-host", "127.0.0.1", "--ready-file", "{ready_file}", "--model-dirs",
                     str(model_dir), *args.serve_arg]  # fmt: skip
            server = stack.enter_context(ServerProcess(python_module("cellserve.server.cli", *serve), "soak"))
            address, pid = server.address, server.pid
            metrics_url = metrics_url or f"http://127.0.0.1:{server.info['metrics_port']}/metrics"
        with Client(address) as client:
            client.wait_ready(30)
            info = client.model_info(plan.model) if plan.model else client.list_models()[0]
        log.info("soak starting", extra={"address": address, "model": info.name, "seconds": plan.duration_s})
        rec, tally, end = asyncio.run(soak(address, metrics_url, info, plan, pid, args.quiet))
    return build_report(
        plan=asdict(plan),
        info=info,
        server="started by the soak" if args.server is None else args.server,
        samples=rec.samples,
        latencies=rec.all_latencies,
        tally=tally,
        end=end,
        note=args.note,
    )
