"""Sessions the SDK moves when their server drains (real servers, loopback, port 0): across mutual-TLS + bearer
servers, idle through a whole drain, keeping the idle timeout, with no taker, onto the one replica of three
left, from 20 threads at once, through a zero-grace drain, with a step cancelled mid-move, and staying put
when the other replica serves other weights."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest
from replica_helpers import drain, token_keys

from cellserve.client import TLS, AsyncClient, ChannelConfig, Client

KEYS = token_keys("3c")
GOOD = "good-token"  # the bearer token both servers accept


def test_a_session_moves_on_drain_between_mutual_tls_servers_with_bearer_auth(
    running_server, pki, tmp_path, tiny_oracle
) -> None:
    """The SDK's transparent resume reuses the whole channel config (TLS, client cert, token) for B."""
    f = pki.write(tmp_path)
    secure = {
        "tls_cert_file": f["server_cert"],
        "tls_key_file": f["server_key"],
        "tls_client_ca_file": f["ca"],
        "auth_tokens": GOOD,
        "token_keys": KEYS,
    }
    config = ChannelConfig(tls=TLS(pki.ca.pem, pki.client.cert, pki.client.key), bearer_token=GOOD)
    tokens = np.random.default_rng(10).integers(0, 256, size=24, dtype=np.int64)
    with running_server(**secure) as a, running_server(**secure) as b:
        targets = [f"localhost:{a.server.port}", f"localhost:{b.server.port}"]
        with Client(targets, config) as client, client.session("tiny") as s:
            ys = [s.step(tokens[:8])]
            drained = drain(a)
            ys.append(s.step(tokens[8:16]))  # answered by A, then moved
            ys.append(s.step(tokens[16:]))  # answered by B
            assert b.server.sessions.sessions and s.steps == 24
            drained.result(30)
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)


def test_async_session_idle_through_a_whole_drain_resumes_on_the_next_target(running_server, tiny_oracle):
    tokens = np.arange(8, dtype=np.int64) * 11 % 256
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:

        async def main() -> np.ndarray:
            async with AsyncClient([a.address, b.address]) as client, await client.session("tiny") as s:
                y0 = await s.step(tokens[:5])
                await asyncio.wrap_future(drain(a, 0.5))
                y1 = await s.step(tokens[5:])
                assert s.steps == 8 and b.server.sessions.sessions
                return np.concatenate([y0, y1])

        ys = asyncio.run(main())
    np.testing.assert_allclose(ys, tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)


def test_sync_session_moved_by_a_drain_keeps_its_idle_timeout(running_server):
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        Client([a.address, b.address]) as client,
        client.session("tiny", idle_timeout_s=1000) as s,
    ):
        s.step([1, 2, 3])
        assert s.idle_timeout_s == 1000
        drain(a)
        s.step([4])
        s.step([5])  # on B now
        assert b.server.sessions.sessions
        assert s.idle_timeout_s == 1000
        assert next(iter(b.server.sessions.sessions.values())).idle_timeout_s == 1000


def test_async_session_moved_by_a_drain_keeps_its_idle_timeout(running_server):
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:

        async def main() -> None:
            async with (
                AsyncClient([a.address, b.address]) as client,
                await client.session("tiny", idle_timeout_s=1000) as s,
            ):
                await s.step([1, 2, 3])
                drained = drain(a)
                await s.step([4])
                await s.step([5])
                await asyncio.wrap_future(drained)
                assert s.idle_timeout_s == 1000

        asyncio.run(main())


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_move_that_finds_no_taker_keeps_the_session_on_the_draining_server(running_server, tiny_oracle, api):
    tokens = np.arange(6, dtype=np.int64) * 5 % 256
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:
        b.call(b.server.stop(0))  # the only other replica is already gone

        if api == "sync":
            with Client([a.address, b.address]) as client, client.session("tiny") as s:
                ys = [s.step(tokens[:3])]
                drained = drain(a)
                ys.append(s.step(tokens[3:4]))
                ys.append(s.step(tokens[4:]))  # A still serves it during its grace
        else:

            async def main() -> list[np.ndarray]:
                async with AsyncClient([a.address, b.address]) as client, await client.session("tiny") as s:
                    ys = [await s.step(tokens[:3])]
                    nonlocal drained
                    drained = drain(a)
                    ys.append(await s.step(tokens[3:4]))
                    ys.append(await s.step(tokens[4:]))
                    return ys

            drained = None
            ys = asyncio.run(main())
        drained.result(30)
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)


def test_a_session_stays_on_its_draining_server_when_the_other_serves_new_weights(
    running_server, tmp_path, tiny_oracle
) -> None:
    """Rolling update to new weights: B refuses the token (FAILED_PRECONDITION), so the SDK keeps the session
    on A for A's grace period instead of losing it; outputs stay exact."""
    from cellserve.model.export import export_random_model

    export_random_model(tmp_path / "v2", name="tiny", layers=2, hidden=32, seed=1)
    tokens = np.arange(9, dtype=np.int64) * 13 % 256
    with (
        running_server(token_keys=KEYS) as a,
        running_server(model_dirs=[tmp_path / "v2"], token_keys=KEYS) as b,
        Client([a.address, b.address]) as client,
        client.session("tiny") as s,
    ):
        ys = [s.step(tokens[:3])]
        drained = drain(a)
        ys += [s.step(tokens[3:6]), s.step(tokens[6:])]  # each step after `draining` tries B, which refuses
        assert s.draining and a.server.sessions.sessions and not b.server.sessions.sessions
        s.close()
        drained.result(30)
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_with_two_of_three_targets_draining_the_session_ends_up_on_the_third(running_server, tiny_oracle, api):
    tokens = np.arange(10, dtype=np.int64) * 9 % 256
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        running_server(token_keys=KEYS) as c,
    ):
        targets = [a.address, b.address, c.address]
        if api == "sync":
            with Client(targets) as client, client.session("tiny") as s:
                ys = [s.step(tokens[:3])]
                drains = [drain(a), drain(b)]
                ys += [s.step(tokens[i : i + 1]) for i in range(3, 10)]
                assert s.steps == 10 and c.server.sessions.sessions
        else:

            async def main() -> list[np.ndarray]:
                nonlocal drains
                async with AsyncClient(targets) as client, await client.session("tiny") as s:
                    ys = [await s.step(tokens[:3])]
                    drains = [drain(a), drain(b)]
                    ys += [await s.step(tokens[i : i + 1]) for i in range(3, 10)]
                    assert s.steps == 10 and c.server.sessions.sessions
                    return ys

            drains: list[Any] = []
            ys = asyncio.run(main())
        for drained in drains:
            drained.result(30)
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens), atol=1e-5, rtol=0)


def test_20_threads_each_with_a_session_move_during_a_drain_and_stay_exact(running_server, tiny_oracle) -> None:
    tokens = np.arange(24, dtype=np.int64) * 7 % 256
    ref = tiny_oracle.sequence(tokens)
    with (
        running_server(token_keys=KEYS) as a,
        running_server(token_keys=KEYS) as b,
        Client([a.address, b.address]) as client,
    ):
        halfway = threading.Barrier(21, timeout=30)
        results: dict[int, Any] = {}

        def run(k: int) -> None:
            try:
                with client.session("tiny") as s:
                    ys = [s.step(tokens[:12])]
                    halfway.wait()
                    halfway.wait()  # A is draining now
                    ys += [s.step(tokens[i : i + 1]) for i in range(12, 24)]
                    results[k] = (np.concatenate(ys), s.steps)
            except Exception as e:  # reported by the assertion below
                results[k] = e

        threads = [threading.Thread(target=run, args=(k,)) for k in range(20)]
        for t in threads:
            t.start()
        halfway.wait()
        drained = drain(a)
        halfway.wait()
        for t in threads:
            t.join(60)
        drained.result(30)
        assert len(b.server.sessions.sessions) == 0  # every session closed on B when its thread finished
    for k, result in results.items():
        assert not isinstance(result, Exception), (k, result)
        ys, steps = result
        assert steps == 24
        np.testing.assert_allclose(ys, ref, atol=1e-5, rtol=0)
    assert len(results) == 20


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_session_stepping_through_a_zero_grace_drain_resumes_with_its_draining_token(running_server, api):
    """Grace 0: the session holds a current token (a final one comes with closed{DRAIN}) and moves to B.
    The server keeps a 1 s flush window after closing them, so that token reaches the client."""
    failures = []
    for trial in range(4):
        with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:
            drained = None
            try:
                if api == "sync":
                    with Client([a.address, b.address]) as client, client.session("tiny") as s:
                        for i in range(60):
                            if i == 5:
                                drained = drain(a, 0)
                            s.step([i])
                else:

                    async def main() -> None:
                        nonlocal drained
                        async with AsyncClient([a.address, b.address]) as client, await client.session("tiny") as s:
                            for i in range(60):
                                if i == 5:
                                    drained = drain(a, 0)
                                await asyncio.wait_for(s.step([i]), 20)

                    asyncio.run(main())
            except Exception as e:
                failures.append(f"trial {trial}: {type(e).__name__}: {e}")
            if drained is not None:
                drained.result(30)
    assert not failures, failures


def test_cancelling_a_step_during_its_move_leaves_the_session_usable(running_server, tiny_oracle, wait_until):
    tokens = np.arange(10, dtype=np.int64) * 7 % 256
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:

        async def main() -> list[np.ndarray]:
            async with AsyncClient([a.address, b.address]) as client, await client.session("tiny") as s:
                await s.step(tokens[:3])
                deadline = int((time.time() + 30) * 1000)
                a.loop.call_soon_threadsafe(a.server.sessions.begin_drain, deadline)
                # no public signal says the `draining` notice reached the session's reader: its inbox does
                await wait_until.aio(lambda: not s._inbox._queue.empty(), timeout_s=20)
                on_a = s._call

                def moved() -> bool:  # the move opened on B (checked every turn of the loop, step still pending)
                    assert not task.done()
                    return s._call is not on_a

                task = asyncio.ensure_future(s.step(tokens[3:4]))
                await wait_until.aio(moved, poll_s=0)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                # the cancelled step's output is lost with the cancel; the session must still go on exactly
                return [await s.step(tokens[i : i + 1]) for i in range(4, 10)]

        ys = asyncio.run(main())
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens)[4:], atol=1e-5, rtol=0)

