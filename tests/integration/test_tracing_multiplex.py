"""Multiplex sessions are traced as Stream's are: a span per session in the caller's trace, every step span under
its own session (kept by the sampler, or always when it failed), and batch spans linking each step they served,
one engine call serving many sessions of one message."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from multiplex_helpers import Gateway
from otlp_helpers import otlp_receiver
from test_tracing import CLIENT_SPAN, CLIENT_TRACE, attrs


def test_multiplex_sessions_steps_and_batches_are_traced(running_server, wait_until):
    n, messages = 6, 3
    x = np.random.default_rng(5).integers(0, 256, size=(n, 2), dtype=np.int64)
    with otlp_receiver() as (receiver, port):
        with running_server(otlp_endpoint=f"http://127.0.0.1:{port}", trace_sampler="always_on") as srv:

            async def main() -> None:
                async with grpc.aio.insecure_channel(srv.address) as channel:
                    gw = Gateway(channel, metadata=(("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),))
                    handles = await gw.open(n)
                    for _ in range(messages):
                        assert not (await gw.step(handles, x)).errors
                    bad = x.copy()
                    bad[2, 0] = 999
                    assert [e.index for e in (await gw.step(handles, bad)).errors] == [2]
                    await gw.call.done_writing()

            asyncio.run(main())
            sessions = wait_until(lambda: len(receiver.named("cellserve.session")) == n and receiver.named(
                "cellserve.session"), what="a span per session")  # fmt: skip
        steps, batches = receiver.named("cellserve.step"), receiver.named("cellserve.batch")
    assert {(s.trace_id.hex(), s.parent_span_id.hex()) for s in sessions} == {(CLIENT_TRACE, CLIENT_SPAN)}
    assert sorted(attrs(s)["cellserve.session.steps"] for s in sessions) == [6] + [8] * (n - 1)
    by_session = {s.span_id: attrs(s)["cellserve.session.id"] for s in sessions}
    for step in steps:  # under its own session's span, naming that session
        assert by_session[step.parent_span_id] == attrs(step)["cellserve.session.id"]
    kept = [attrs(s)["cellserve.step.kept"] for s in steps]
    assert kept.count("sampled") == n * messages + n - 1 and kept.count("error") == 1
    linked = {link.span_id for batch in batches for link in batch.links}
    assert linked == {s.span_id for s in steps if attrs(s)["cellserve.step.kept"] == "sampled"}
    assert max(attrs(b)["cellserve.batch.size"] for b in batches) == n  # one engine call served a whole message
