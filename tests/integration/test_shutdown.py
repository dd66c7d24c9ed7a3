"""`cellserve serve` as a real process: ready file, SIGTERM/SIGINT stop it cleanly with exit code 0."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellserve.server.tensors import to_numpy
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import to_proto


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_an_idle_server_with_exit_code_0(spawn_server, sig):
    server = spawn_server("--grace-s", "5")
    proc, info = server.proc, {"port": server.port}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{info['port']}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_sigterm_finishes_in_flight_work_and_exits_within_the_grace(spawn_server, wait_until):
    server = spawn_server("--grace-s", "2")
    proc, info = server.proc, {"port": server.port}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{info['port']}") as ch:
            stub = pb_grpc.CellServeStub(ch)
            requests: list[pb.StreamRequest] = [pb.StreamRequest(open=pb.Open(model="tiny"))]

            def gen():
                yield from requests
                # keep the stream open (no half-close) until the server process has exited
                wait_until(lambda: proc.poll() is not None, timeout_s=60)

            requests.append(pb.StreamRequest(step=pb.Step(seq=1, input=to_proto(np.array([1, 2], dtype=np.int64)))))
            call = stub.Stream(gen())
            assert next(call).WhichOneof("kind") == "opened"
            out = next(call)
            assert out.output.seq == 1 and to_numpy(out.output.output).shape == (2, 256)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            kinds: list[str] = []
            try:  # the open stream ends (never hangs): drained with a message, or cut after the grace
                for response in call:
                    kinds.append(response.WhichOneof("kind"))
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), code
            assert "output" not in kinds  # nothing was lost: the one step was answered before the signal
            assert proc.wait(timeout=30) == 0
            assert time.monotonic() - start < 2 + 15
    finally:
        proc.kill()



def test_a_second_sigterm_is_ignored_and_a_second_sigint_ends_the_drain_at_once(spawn_server, wait_until):
    server = spawn_server("--grace-s", "600")  # far longer than the test may take: only the signal can end it
    proc = server.proc
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]

    def logged(text: str) -> bool:
        return any(text in line for line in list(lines))

    try:
        with grpc.insecure_channel(server.address) as ch:

            def requests():
                yield pb.StreamRequest(open=pb.Open(model="tiny"))
                wait_until(lambda: proc.poll() is not None, timeout_s=120)  # no half-close: the session stays

            call = pb_grpc.CellServeStub(ch).Stream(requests())
            assert next(call).WhichOneof("kind") == "opened"
            proc.send_signal(signal.SIGTERM)
            assert next(call).WhichOneof("kind") == "draining"
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: logged("already draining; signal ignored"), timeout_s=30)
            assert proc.poll() is None  # still waiting for its session
            proc.send_signal(signal.SIGINT)
            kinds = [r.WhichOneof("kind") for r in call]
            assert kinds[-1] == "closed" and "draining" in kinds  # the final token, then the drain's close
            assert proc.wait(timeout=60) == 0
        wait_until(lambda: logged("second interrupt: ending the drain's grace period now"), timeout_s=10)
        assert logged("closed_at_grace_end=1")
    finally:
        proc.kill()
