"""A real Prometheus (exemplar storage on) accepts the exemplars of a traced `cellserve serve`: the trace ids it
stores for the step-latency buckets are those of spans the server sent to its collector."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from deploy_checks import stop_process
from otlp_helpers import otlp_receiver
from prometheus_server import HTTP_POLL_S, api, prometheus_process, unless_exited

from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import to_proto

pytestmark = pytest.mark.e2e

CELLSERVE = Path(sys.executable).parent / "cellserve"


def steps(address: str, n: int) -> None:
    def requests():
        yield pb.StreamRequest(open=pb.Open(model="tiny"))
        for seq in range(n):
            yield pb.StreamRequest(step=pb.Step(seq=seq, input=to_proto(np.array([seq % 64], dtype=np.int64))))
        yield pb.StreamRequest(close=pb.Close())

    with grpc.insecure_channel(address) as channel:
        answers = list(pb_grpc.CellServeStub(channel).Stream(requests(), timeout=60))
    assert [a.WhichOneof("kind") for a in answers].count("output") == n


def test_prometheus_stores_the_step_latency_exemplars_of_a_traced_server(tiny_model_dir, tmp_path, wait_until):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("the prometheus binary is absent (Debian package `prometheus`; .ci/run installs it in CI)")
    ready = tmp_path / "ready.json"
    with otlp_receiver() as (receiver, otlp_port):
        cmd = [str(CELLSERVE), "serve", "--model-dirs", str(tiny_model_dir), "--host", "127.0.0.1", "--port", "0",
               "--metrics-host", "127.0.0.1", "--metrics-port", "auto", "--grace-s", "1", "--ready-file", str(ready),
               "--otlp-endpoint", f"http://127.0.0.1:{otlp_port}", "--trace-sampler", "always_on"]  # fmt: skip
        log = (tmp_path / "cellserve.log").open("w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(unless_exited(proc, ready.exists, "ready file"), 60, poll_s=HTTP_POLL_S, what="ready file")
            ports = json.loads(ready.read_text())
            extra = ("--enable-feature=exemplar-storage",)
            with prometheus_process(prometheus, ports["metrics_port"], tmp_path, wait_until, extra) as prom:
                start = time.time() - 60
                steps(f"127.0.0.1:{ports['port']}", 20)

                def stored() -> list:
                    data = api(prom, "/api/v1/query_exemplars", query="cellserve_step_latency_seconds_bucket",
                               start=str(start), end=str(time.time() + 60))  # fmt: skip
                    return [e for series in data for e in series["exemplars"]]

                exemplars = wait_until(stored, 60, poll_s=HTTP_POLL_S, what="exemplars scraped by Prometheus")
                wait_until(lambda: receiver.named("cellserve.step"), 30, what="the step spans at the receiver")
        finally:
            stop_process(proc)
            log.close()
    sent = {sp.trace_id.hex() for sp in receiver.named("cellserve.step")}
    assert {e["labels"]["trace_id"] for e in exemplars} <= sent
    assert all(len(e["labels"]["span_id"]) == 16 for e in exemplars)
