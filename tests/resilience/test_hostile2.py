"""Hostile checks, round 2, of the SDK's move/failover and the watcher-based secret reload (real servers,
loopback, port 0): reader tasks after many sessions, a session used after its client closed, two of three
targets draining at once, 20 threads moving during a drain, a move whose new server dies, the tokens file
replaced by a directory symlink or rewritten thousands of times under load, TLS rotated 50 times under
streams, and the watcher across a server restart in one process.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cellserve.client import TLS, AsyncClient, ChannelConfig, Client, UnavailableError
from cellserve.client.errors import CellserveClientError
from cellserve.server.security import AcceptedTokens
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

KEYS = '{"active": "k1", "keys": {"k1": "' + "3c" * 32 + '"}}'


def _drain(srv: Any, grace_s: float = 30) -> Any:
    return asyncio.run_coroutine_threadsafe(srv.server.drain(grace_s), srv.loop)


def _accepted(stub: pb_grpc.CellServeStub, token: str) -> bool:
    try:
        stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        return False
    return True


# -- the async SDK's reader tasks and lifetime -----------------------------------------------------


def test_500_async_sessions_opened_and_closed_leave_no_reader_task_and_no_server_session(running_server) -> None:
    with running_server() as srv:

        async def main() -> None:
            async with AsyncClient(srv.address) as client:
                before = asyncio.all_tasks()
                for i in range(500):
                    async with await client.session("tiny") as s:
                        await s.step([i % 256])
                readers = [t for t in asyncio.all_tasks() - before if t.get_name() == "cellserve-session-reader"]
                if readers:  # the last session's reader sees the end of its stream a moment after close()
                    _, pending = await asyncio.wait(readers, timeout=10)
                    assert not pending, f"{len(pending)} reader tasks still running after close()"

        asyncio.run(main())
        assert not srv.server.sessions.sessions


def test_an_async_session_used_after_its_client_closed_raises_a_client_error_at_once(
    wait_until, running_server
) -> None:
    with running_server() as srv:

        async def main() -> None:
            client = AsyncClient(srv.address)
            s = await client.session("tiny")
            await s.step([1])
            await client.close()
            with pytest.raises(CellserveClientError):
                await asyncio.wait_for(s.step([2]), 10)
            await asyncio.wait_for(s.close(), 10)  # still idempotent and quick

        asyncio.run(main())
        wait_until(lambda: not srv.server.sessions.sessions)  # the cancelled stream freed its slot


# -- moves ---------------------------------------------------------------------------------------


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
                drains = [_drain(a), _drain(b)]
                ys += [s.step(tokens[i : i + 1]) for i in range(3, 10)]
                assert s.steps == 10 and c.server.sessions.sessions
        else:

            async def main() -> list[np.ndarray]:
                nonlocal drains
                async with AsyncClient(targets) as client, await client.session("tiny") as s:
                    ys = [await s.step(tokens[:3])]
                    drains = [_drain(a), _drain(b)]
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
        drained = _drain(a)
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


def test_a_session_whose_new_server_dies_after_the_move_raises_unavailable_not_a_wrong_output(running_server):
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:

        async def main() -> None:
            async with AsyncClient([a.address, b.address], resume_timeout_s=2) as client, client.session("tiny") as s:
                await s.step([1, 2, 3])
                drained = _drain(a)
                await s.step([4])  # moves to B, then A has no session left and stops
                await asyncio.wrap_future(drained)
                assert b.server.sessions.sessions
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(b.server.stop(0), b.loop))
                with pytest.raises(UnavailableError):
                    await asyncio.wait_for(s.step([5]), 30)

        asyncio.run(main())


# -- secret files ----------------------------------------------------------------------------------


def test_a_tokens_file_replaced_by_a_symlink_to_a_directory_keeps_its_tokens(running_server, tmp_path: Path):
    path, elsewhere = tmp_path / "tokens", tmp_path / "a-directory"
    elsewhere.mkdir()
    path.write_text("file-token\n")
    with (
        running_server(auth_tokens="ops", auth_tokens_file=path) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        stub = pb_grpc.CellServeStub(ch)
        path.unlink()
        path.symlink_to(elsewhere, target_is_directory=True)
        srv.server.auth_tokens.poll()  # the watcher's check, without waiting for it
        assert _accepted(stub, "file-token") and _accepted(stub, "ops")
        path.unlink()
        path.write_text("next-token\n")
        srv.server.auth_tokens.poll()
        assert _accepted(stub, "next-token") and not _accepted(stub, "file-token")


def test_thousands_of_tokens_file_rewrites_under_8_clients_never_fail_a_call(running_server, tmp_path: Path):
    path = tmp_path / "tokens"
    path.write_text("tok-0\n")
    with running_server(auth_tokens="ops", auth_tokens_file=path) as srv:
        stop, errors = threading.Event(), []
        calls = [0] * 8

        def call(k: int) -> None:
            with grpc.insecure_channel(srv.address) as ch:
                stub = pb_grpc.CellServeStub(ch)
                while not stop.is_set():
                    try:
                        stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer ops"),), timeout=10)
                        calls[k] += 1
                    except grpc.RpcError as e:
                        errors.append(e.code())

        threads = [threading.Thread(target=call, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for i in range(1, 1501):
            if i % 2:  # in place
                path.write_text(f"tok-{i}\n")
            else:  # atomic replace
                tmp = tmp_path / "tokens.tmp"
                tmp.write_text(f"tok-{i}\n")
                tmp.replace(path)
            if i % 100 == 0:
                srv.server.auth_tokens.poll()  # the watcher runs too: both read concurrently
        stop.set()
        for t in threads:
            t.join(30)
        srv.server.auth_tokens.poll()
        assert not errors and all(calls)
        assert srv.server.auth_tokens.accepts(b"tok-1500") and not srv.server.auth_tokens.accepts(b"tok-1499")


def test_tls_rotated_50_times_while_sessions_open_and_close(running_server, pki, tmp_path) -> None:
    f = pki.write(tmp_path)
    with running_server(tls_cert_file=f["server_cert"], tls_key_file=f["server_key"]) as srv:
        config = ChannelConfig(tls=TLS(pki.ca.pem))
        stop, errors, done = threading.Event(), [], [0]

        def sessions() -> None:
            while not stop.is_set():
                try:
                    with Client(f"localhost:{srv.server.port}", config, timeout_s=10) as c, c.session("tiny") as s:
                        assert s.step([1, 2]).shape == (2, 256)
                        done[0] += 1
                except Exception as e:  # reported by the assertion below
                    errors.append(repr(e))

        threads = [threading.Thread(target=sessions) for _ in range(3)]
        for t in threads:
            t.start()
        for _ in range(50):
            leaf = pki.ca.issue("localhost")
            f["server_cert"].write_bytes(leaf.cert)
            f["server_key"].write_bytes(leaf.key)
            srv.server.tls.poll()
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors and done[0] > 0
        assert srv.server.tls.reloads == 50


def test_the_file_watcher_stops_with_its_server_and_a_new_server_in_the_same_process_watches(
    wait_until, running_server, tmp_path: Path
) -> None:
    def watchers() -> int:
        return sum(t.name == "cellserve-secret-files" and t.is_alive() for t in threading.enumerate())

    path = tmp_path / "tokens"
    path.write_text("first\n")
    before = watchers()
    with running_server(auth_tokens_file=path):
        assert watchers() == before + 1
    assert watchers() == before
    path.write_text("second\n")
    with running_server(auth_tokens_file=path) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.CellServeStub(ch)
        assert _accepted(stub, "second") and not _accepted(stub, "first")
        path.write_text("third\n")
        wait_until(lambda: not _accepted(stub, "second"))  # this server's own watcher saw the change
        assert _accepted(stub, "third")


# -- found by hostile testing (round 2), fixed since ------------------------------------------------


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_session_stepping_through_a_zero_grace_drain_resumes_with_its_draining_token(running_server, api):
    """Grace 0: the session holds a current token (a final one comes with closed{DRAIN}) and moves to B.
    The server keeps a 1 s flush window after closing them, so that token reaches the client."""
    failures = []
    for trial in range(4):
        with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:
            drained = None

            def drain_a() -> object:
                return asyncio.run_coroutine_threadsafe(a.server.drain(0), a.loop)

            try:
                if api == "sync":
                    with Client([a.address, b.address]) as client, client.session("tiny") as s:
                        for i in range(60):
                            if i == 5:
                                drained = drain_a()
                            s.step([i])
                else:

                    async def main() -> None:
                        nonlocal drained
                        async with AsyncClient([a.address, b.address]) as client, await client.session("tiny") as s:
                            for i in range(60):
                                if i == 5:
                                    drained = drain_a()
                                await asyncio.wait_for(s.step([i]), 20)

                    asyncio.run(main())
            except Exception as e:
                failures.append(f"trial {trial}: {type(e).__name__}: {e}")
            if drained is not None:
                drained.result(30)
    assert not failures, failures


def test_cancelling_a_step_during_its_move_leaves_the_session_usable(running_server, tiny_oracle):
    tokens = np.arange(10, dtype=np.int64) * 7 % 256
    with running_server(token_keys=KEYS) as a, running_server(token_keys=KEYS) as b:

        async def main() -> list[np.ndarray]:
            async with AsyncClient([a.address, b.address]) as client, await client.session("tiny") as s:
                await s.step(tokens[:3])
                deadline = int((time.time() + 30) * 1000)
                a.loop.call_soon_threadsafe(a.server.sessions.begin_drain, deadline)
                until = time.monotonic() + 20
                while s._inbox._queue.empty():  # the `draining` notice reached the session's reader
                    assert time.monotonic() < until
                    await asyncio.sleep(0.01)
                on_a = s._call
                task = asyncio.ensure_future(s.step(tokens[3:4]))
                while s._call is on_a:  # until the move opens on B
                    assert not task.done()
                    await asyncio.sleep(0)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                # the cancelled step's output is lost with the cancel; the session must still go on exactly
                return [await s.step(tokens[i : i + 1]) for i in range(4, 10)]

        ys = asyncio.run(main())
    np.testing.assert_allclose(np.concatenate(ys), tiny_oracle.sequence(tokens)[4:], atol=1e-5, rtol=0)


def test_a_token_rewritten_in_place_to_one_of_the_same_size_is_revoked(tmp_path):
    """ctime changes with any write, even when the mtime is put back (cp --preserve)."""
    path = tmp_path / "tokens"
    path.write_text("tok-aaaa\n")
    tokens = AcceptedTokens(None, path)
    before = os.stat(path)
    path.write_text("tok-bbbb\n")  # same size, same inode
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    tokens.poll()
    assert not tokens.accepts(b"tok-aaaa"), "a revoked token is still accepted after the watcher's poll"
    assert tokens.accepts(b"tok-bbbb")


def test_a_step_cancelled_while_its_request_is_being_written_leaves_the_session_usable(running_server, tiny_oracle):
    """The write is shielded: the call survives; the step still runs (its output is discarded), and
    ``s.steps`` says so once the next step is answered."""
    tokens = np.arange(6, dtype=np.int64) * 3 % 256
    with running_server() as srv:

        async def main() -> tuple[list[np.ndarray], int]:
            async with AsyncClient(srv.address) as client, client.session("tiny") as s:
                ys = [await s.step(tokens[:3])]
                task = asyncio.ensure_future(s.step(tokens[3:4]))
                await asyncio.sleep(0)  # the step is now inside its write
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                ys += [await s.step(tokens[i : i + 1]) for i in range(4, 6)]
                return ys, s.steps

        ys, steps = asyncio.run(main())
    want = tiny_oracle.sequence(tokens)
    assert steps == 6  # the cancelled step ran (once)
    np.testing.assert_allclose(np.concatenate(ys), np.concatenate([want[:3], want[4:]]), atol=1e-5, rtol=0)


def test_a_cancelled_steps_output_is_discarded_and_the_session_continues_after_it(running_server, tiny_oracle):
    tokens = np.arange(6, dtype=np.int64) * 5 % 256
    with running_server() as srv:

        async def main() -> tuple[list[np.ndarray], int]:
            async with AsyncClient(srv.address) as client, await client.session("tiny") as s:
                ys = [await s.step(tokens[:3])]
                task = asyncio.ensure_future(s.step(tokens[3:4]))
                await asyncio.sleep(0)  # the step is now inside its write (an event-loop turn, not a timing wait)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                ys += [await s.step(tokens[i : i + 1]) for i in range(4, 6)]  # the cancelled one ran first
                return ys, s.steps

        ys, steps = asyncio.run(main())
    want = tiny_oracle.sequence(tokens)
    assert steps == 6
    np.testing.assert_allclose(np.concatenate(ys), np.concatenate([want[:3], want[4:]]), atol=1e-5, rtol=0)
