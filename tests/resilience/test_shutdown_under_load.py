"""SIGTERM to a real ``cellserve serve`` process under load: 50 sessions stepping from several threads, and
a drain with a live OIP sequence beside native sessions; every session is told, the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import grpc
import numpy as np
from replica_helpers import token_keys

from cellserve.client import Client
from cellserve.oip import grpc_service_pb2 as oip
from cellserve.oip import grpc_service_pb2_grpc as oip_grpc
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

KEYS = token_keys("3c")


def test_sigterm_while_50_sessions_step_from_several_threads(spawn_server, running_server, tiny_oracle) -> None:
    """Every session either finishes or is told `draining` with a current token; the process exits 0."""
    threads, per_thread, length = 5, 10, 200  # long enough that SIGTERM always lands mid-run
    grace = 15
    a = spawn_server("--token-keys", KEYS, "--grace-s", str(grace), "--capacity", "64")
    rng = np.random.default_rng(9)
    seqs = [rng.integers(0, 256, size=length, dtype=np.int64) for _ in range(threads * per_thread)]
    results: dict[int, tuple[np.ndarray, int, bytes, bool]] = {}  # i -> (outputs, steps, token, finished)
    started = threading.Barrier(threads + 1, timeout=60)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            with Client(a.address) as client:
                ids = list(range(w * per_thread, (w + 1) * per_thread))
                sessions = {i: client.session("tiny") for i in ids}
                outs: dict[int, list[np.ndarray]] = {i: [] for i in ids}
                for i in ids:
                    outs[i].append(sessions[i].step(seqs[i][:1]))
                started.wait()
                live = set(ids)
                while live:
                    for i in sorted(live):
                        s = sessions[i]
                        n = s.steps
                        if s.draining or n == length:
                            results[i] = (np.concatenate(outs[i]), n, s.resume_token, n == length)
                            s.close()
                            live.discard(i)
                            continue
                        outs[i].append(s.step(seqs[i][n : n + 1]))
        except BaseException as e:
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    started.wait()
    a.proc.send_signal(signal.SIGTERM)
    for t in pool:
        t.join(60)
    assert not errors, errors
    sent = time.monotonic()
    assert a.proc.wait(timeout=grace + 10) == 0
    assert time.monotonic() - sent < grace + 10
    assert len(results) == threads * per_thread
    drained = [i for i, r in results.items() if not r[3]]
    assert drained  # SIGTERM came while they were stepping
    with running_server(token_keys=KEYS) as b, Client(b.address) as client:
        for i, (got, steps, token, finished) in results.items():
            want = tiny_oracle.sequence(seqs[i])
            np.testing.assert_allclose(got, want[:steps], atol=1e-5, rtol=0)
            if finished:
                continue
            assert token
            with client.session("tiny", resume_token=token) as s:
                # current as of every request the server read before it: at most the one step sent after
                k = s.steps
                assert steps - 1 <= k <= steps, (steps, k)
                np.testing.assert_allclose(s.step(seqs[i][k:]), want[k:], atol=1e-5, rtol=0)


def test_drain_with_a_live_oip_sequence_still_tells_every_native_session_and_exits_0(spawn_server):
    a = spawn_server("--token-keys", KEYS, "--grace-s", "10")

    async def main() -> list[str]:
        async with grpc.aio.insecure_channel(a.address) as ch:
            before = pb_grpc.CellServeStub(ch).Stream()
            await before.write(pb.StreamRequest(open=pb.Open(model="tiny")))
            await before.read()
            seq = oip_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer()
            req = oip.ModelInferRequest(model_name="tiny")
            req.inputs.add(name="x", datatype="INT64", shape=[1, 3]).contents.int64_contents.extend([1, 2, 3])
            req.parameters["sequence_id"].int64_param = 42
            req.parameters["sequence_start"].bool_param = True
            await seq.write(req)
            assert not (await seq.read()).error_message
            after = pb_grpc.CellServeStub(ch).Stream()
            await after.write(pb.StreamRequest(open=pb.Open(model="tiny")))
            await after.read()
            a.proc.send_signal(signal.SIGTERM)
            kinds = []
            for call in (before, after):
                try:
                    kinds.append((await asyncio.wait_for(call.read(), 20)).WhichOneof("kind"))
                except grpc.aio.AioRpcError as e:
                    kinds.append(e.code().name)
            for call in (before, after, seq):
                call.cancel()
            return kinds

    kinds = asyncio.run(main())
    assert kinds == ["draining", "draining"]
    assert a.proc.wait(timeout=30) == 0

