"""The soak's view over time: a sample of the server and of the churn's tally every few seconds."""

from __future__ import annotations

import asyncio
import sys
import time
from array import array
from collections.abc import Callable

import numpy as np

from cellserve.client.bench.soak.churn import Churn, Tally, stopped_within
from cellserve.client.bench.soak.plan import SoakPlan
from cellserve.client.bench.soak.probe import ServerReading

SETTLE_POLL_S = 0.1  # between /metrics reads while waiting for the slots to be free


def percentiles_ms(latencies: array) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p99": None}
    a = np.frombuffer(latencies, dtype=np.float64) * 1000
    p50, p99 = np.percentile(a, [50, 99])
    return {"p50": float(p50), "p99": float(p99)}


class Recorder:
    """Samples the server (through ``probe``, a blocking read) and the tally over time."""

    def __init__(self, probe: Callable[[], ServerReading], tally: Tally, t0: float) -> None:
        self.probe, self.tally, self.t0 = probe, tally, t0
        self.samples: list[dict[str, object]] = []
        self.all_latencies = array("d")
        self.last: ServerReading | None = None

    async def read(self) -> ServerReading:
        return await asyncio.to_thread(self.probe)

    def _phase(self, plan: SoakPlan) -> str:
        return "soak" if time.monotonic() - self.t0 >= plan.warmup_s else "warmup"

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
                **{k: tally.counts[k] for k in ("opened", "closed", "dropped", "messages", "steps")},
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
            await self.sample(self._phase(plan))
            due += plan.sample_every_s
            if await stopped_within(stop, max(0.0, due - time.monotonic())):
                await self.sample(self._phase(plan))
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


async def progress(plan: SoakPlan, churn: Churn, rec: Recorder, quiet: bool) -> None:
    """A tqdm bar over the soak's seconds on stderr (none with --quiet or when stderr is not a tty)."""
    from tqdm import tqdm

    total = round(plan.duration_s)
    form = "{l_bar}{bar}| {n}/{total} s [{elapsed}<{remaining}{postfix}]"
    with tqdm(total=total, bar_format=form, disable=quiet or not sys.stderr.isatty(), file=sys.stderr) as bar:
        while not await stopped_within(churn.stop, 1.0):
            bar.n = min(total, round(time.monotonic() - rec.t0))
            last = rec.last
            bar.set_postfix(
                sessions=churn.tally.counts["opened"],
                rss_mb=f"{last.rss_bytes / 2**20:.0f}" if last and last.rss_bytes else "?",
                slots=int(last.slots_used) if last and last.slots_used is not None else "?",
                unexpected=sum(churn.tally.unexpected.values()),
                refresh=False,
            )
            bar.refresh()
