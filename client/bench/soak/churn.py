"""The soak's load: workers that each loop open → messages → close or drop, and what they counted.

A small share of messages is replaced by an invalid step (``inputs.bad_step``); each must be answered
in the stream with INVALID_ARGUMENT and leave the session usable. Anything else is an unexpected error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np

from cellserve.client.aio import AsyncClient, AsyncSession
from cellserve.client.bench.soak.inputs import UncheckedInfo, bad_step, good_step, output_fits
from cellserve.client.bench.soak.plan import SoakPlan
from cellserve.client.errors import CellserveClientError, StepRejected
from cellserve.client.model_info import ModelInfo

log = logging.getLogger(__name__)
EXPECTED_CODE = grpc.StatusCode.INVALID_ARGUMENT  # what every injected bad step must be answered with
MAX_EXAMPLES = 5  # messages kept per unexpected error kind
SESSION_COUNTS = ("opened", "closed", "dropped", "dropped_mid_step")  # how sessions went


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``stop``; True if it is set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return stop.is_set()
    return True


@dataclass
class Tally:
    """Client-side counts; touched only from the event loop's thread."""

    counts: Counter[str] = field(default_factory=Counter)  # SESSION_COUNTS, and the answered messages, steps
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

    def sessions(self) -> dict[str, int]:
        return {k: self.counts[k] for k in SESSION_COUNTS}


class Churn:
    """The workers: each loops open → messages → close or drop until ``stop`` is set."""

    def __init__(self, address: str, info: ModelInfo, plan: SoakPlan, tally: Tally) -> None:
        self.address, self.info, self.plan, self.tally = address, info, plan, tally
        self.unchecked = UncheckedInfo.of(info)
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
        p, counts = self.plan, self.tally.counts
        n = int(rng.integers(p.min_messages, p.max_messages + 1))
        drop = bool(rng.random() < p.p_drop)
        mid_step = drop and bool(rng.random() < 0.5)
        try:
            session = await client.session(p.model or None)
        except CellserveClientError as e:
            self.tally.error(f"open:{e.code.name}", e.details)
            await client.close()
            await stopped_within(self.stop, 0.5)  # a failing server is not hammered in a tight loop
            return AsyncClient(self.address)
        counts["opened"] += 1
        try:
            for _ in range(n):
                if self.stop.is_set():
                    break
                if rng.random() < p.p_bad_step:
                    await self._bad_step(session, rng)
                else:
                    await self._good_step(session, rng)
                if p.think_ms > 0:
                    await stopped_within(self.stop, float(rng.exponential(p.think_ms / 1000)))
            if not drop:
                await session.close()
                counts["closed"] += 1
                return client
            if mid_step:  # a step on the wire, its output never read
                await session.send(good_step(self.info, int(rng.integers(1, p.max_t + 1)), rng))
                counts["dropped_mid_step"] += 1
        except CellserveClientError as e:
            self.tally.error(e.code.name, e.details)
        counts["dropped"] += drop
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
        self.tally.counts.update(messages=1, steps=t)
        if not output_fits(y, self.info, t) or not np.isfinite(y).all():
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
