"""Traces reach a real OTLP/gRPC receiver (the collector's protocol, from opentelemetry-proto's generated service):
a span per session continuing the caller's traceparent, sampled and always-kept step spans under it, batch spans
linked to the steps they served, and log lines of the session carrying its trace id."""

from __future__ import annotations

import asyncio
import io
import logging
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2
from otlp_helpers import otlp_receiver
from stream_helpers import oip_sequence_request, open_msg, step_msg

from cellserve.oip import grpc_service_pb2_grpc as oip_grpc
from cellserve.server.logs import KeyValueFormatter
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def attrs(span: trace_pb2.Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every log line of the server's process, as ``cellserve serve`` writes them (key=value text)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def run_stream(address: str, steps: int, *, bad_at: int | None = None, metadata: Any = ()) -> list[pb.StreamResponse]:
    """One session: ``steps`` single-token steps (one of float dtype, refused in-stream, at ``bad_at``), then close."""
    tokens = np.random.default_rng(3).integers(0, 256, size=steps, dtype=np.int64)

    def requests() -> Iterator[pb.StreamRequest]:
        yield open_msg()
        for i, token in enumerate(tokens):
            x = np.array([token], dtype=np.float64 if i == bad_at else np.int64)
            yield step_msg(i, x)
        yield pb.StreamRequest(close=pb.Close())

    with grpc.insecure_channel(address) as channel:
        return list(pb_grpc.CellServeStub(channel).Stream(requests(), metadata=metadata, timeout=60))


def test_a_traced_session_reaches_an_otlp_receiver_with_steps_batches_links_and_the_callers_trace(
    running_server, wait_until, captured_logs
):
    steps = 200
    with (
        otlp_receiver() as (receiver, port),
        running_server(
            otlp_endpoint=f"http://127.0.0.1:{port}",
            trace_sampler="parentbased_traceidratio",
            trace_sampler_ratio=0.5,
            trace_slow_step_ms=60_000,  # nothing is slow: what is kept is the sampler's choice, or an error
            service_name="cellserve-test",
        ) as srv,
    ):
        traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
        answers = run_stream(srv.address, steps, bad_at=7, metadata=[("traceparent", traceparent)])
        assert [a.WhichOneof("kind") for a in answers].count("error") == 1
        session_spans = wait_until(lambda: receiver.named("cellserve.session"), what="the session span")
    # the server has stopped: every span was flushed

    (session,) = session_spans
    assert session.trace_id.hex() == CLIENT_TRACE and session.parent_span_id.hex() == CLIENT_SPAN
    s = attrs(session)
    assert s["cellserve.model"] == "tiny" and s["cellserve.session.resumed_from_token"] is False
    assert s["cellserve.session.steps"] == steps - 1 and s["cellserve.session.close_reason"] == "client"
    assert receiver.services == {"cellserve-test"}

    step_spans = receiver.named("cellserve.step")
    assert all(sp.trace_id == session.trace_id and sp.parent_span_id == session.span_id for sp in step_spans)
    kept = [attrs(sp)["cellserve.step.kept"] for sp in step_spans]
    errors = [sp for sp in step_spans if attrs(sp)["cellserve.step.kept"] == "error"]
    assert len(errors) == 1 and errors[0].status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert "float64" in errors[0].status.message
    sampled = kept.count("sampled")
    assert 0 < sampled < steps - 1, kept  # the ratio keeps some steps, not all (chance of either: 2^-198)
    for sp in step_spans:
        a = attrs(sp)
        if a["cellserve.step.kept"] == "sampled":
            assert {"cellserve.step.queue_wait_s", "cellserve.batch.id", "cellserve.engine.time_s"} <= a.keys()
            assert a["cellserve.batch.size"] == 1 and a["cellserve.session.id"] == s["cellserve.session.id"]

    batches = receiver.named("cellserve.batch")
    assert len(batches) == sampled  # one engine call per sampled step here (one session), each linking its step
    by_id = {sp.span_id: sp for sp in step_spans}
    for batch in batches:
        (link,) = batch.links
        step = by_id[link.span_id]
        assert link.trace_id == session.trace_id
        assert attrs(step)["cellserve.batch.id"] == attrs(batch)["cellserve.batch.id"]

    lines = [line for line in captured_logs.getvalue().splitlines() if 'msg="session closed"' in line]
    assert len(lines) == 1
    assert f"trace_id={CLIENT_TRACE}" in lines[0] and f"session_id={s['cellserve.session.id']}" in lines[0]
    assert f"span_id={session.span_id.hex()}" in lines[0]


def test_with_sampling_off_only_failed_and_slow_steps_are_kept(running_server, wait_until):
    with otlp_receiver() as (receiver, port):
        with running_server(otlp_endpoint=f"http://127.0.0.1:{port}", trace_sampler="always_on",
                            trace_sampler_ratio=0.0) as srv:  # fmt: skip
            run_stream(srv.address, 5)
            wait_until(lambda: receiver.named("cellserve.session"), what="the first session span")
        assert len(receiver.named("cellserve.step")) == 5  # always_on: every step, whatever the ratio says
    with otlp_receiver() as (receiver, port):
        with running_server(
            otlp_endpoint=f"http://127.0.0.1:{port}", trace_sampler="traceidratio", trace_sampler_ratio=0.0,
            trace_slow_step_ms=0,
        ) as srv:  # fmt: skip
            run_stream(srv.address, 5)
        assert [attrs(sp)["cellserve.step.kept"] for sp in receiver.named("cellserve.step")] == ["slow"] * 5
    with otlp_receiver() as (receiver, port):
        with running_server(
            otlp_endpoint=f"http://127.0.0.1:{port}", trace_sampler="traceidratio", trace_sampler_ratio=0.0
        ) as srv:
            run_stream(srv.address, 5, bad_at=2)
        assert [attrs(sp)["cellserve.step.kept"] for sp in receiver.named("cellserve.step")] == ["error"]
        assert receiver.named("cellserve.batch") == []  # no traced step ran: no batch span
        assert len(receiver.named("cellserve.session")) == 1


def test_an_unsampled_traceparent_leaves_the_session_untraced_under_a_parentbased_sampler(running_server):
    with otlp_receiver() as (receiver, port):
        with running_server(otlp_endpoint=f"http://127.0.0.1:{port}") as srv:
            run_stream(srv.address, 3, metadata=[("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00")])
            run_stream(srv.address, 3)  # no traceparent: a root session span
        (session,) = receiver.named("cellserve.session")
        assert session.trace_id.hex() != CLIENT_TRACE and not session.parent_span_id
        assert len(receiver.named("cellserve.step")) == 3


def test_with_tracing_off_log_lines_of_a_session_carry_its_id_and_no_trace(running_server, captured_logs):
    with running_server() as srv:
        srv.server.metrics  # noqa: B018 (the server is up)
        answers = run_stream(srv.address, 2)
        opened = answers[0].opened.session_id
    lines = [line for line in captured_logs.getvalue().splitlines() if 'msg="session closed"' in line]
    assert len(lines) == 1 and f"session_id={opened}" in lines[0] and "trace_id" not in lines[0]
    assert srv.server.tracing is None


def test_oip_sequences_get_a_session_span_each_in_the_callers_trace(running_server, captured_logs):
    requests = [
        oip_sequence_request(1, start=True),
        oip_sequence_request(2, start=True),
        oip_sequence_request(1),
        oip_sequence_request(1, end=True),
        oip_sequence_request(2, end=True),
    ]
    with otlp_receiver() as (receiver, port):
        with running_server(otlp_endpoint=f"http://127.0.0.1:{port}") as srv, grpc.insecure_channel(srv.address) as ch:
            metadata = [("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")]
            stub = oip_grpc.GRPCInferenceServiceStub(ch)
            answers = list(stub.ModelStreamInfer(iter(requests), metadata=metadata, timeout=60))
        assert [a.error_message for a in answers] == [""] * 5
        sessions = receiver.named("cellserve.session")
        assert sorted(attrs(s)["cellserve.session.steps"] for s in sessions) == [2, 3]
        assert {(s.trace_id.hex(), s.parent_span_id.hex()) for s in sessions} == {(CLIENT_TRACE, CLIENT_SPAN)}
        assert {attrs(s)["cellserve.session.close_reason"] for s in sessions} == {"client"}
        assert len(receiver.named("cellserve.step")) == 5
    closed = [line for line in captured_logs.getvalue().splitlines() if 'msg="session closed"' in line]
    ids = {(attrs(s)["cellserve.session.id"], s.span_id.hex()) for s in sessions}
    assert {(parse(line)["session_id"], parse(line)["span_id"]) for line in closed} == ids
    assert all(parse(line)["trace_id"] == CLIENT_TRACE for line in closed)


def test_a_generate_session_span_continues_the_callers_traceparent(running_server, wait_until):
    request = pb.GenerateRequest(model="tiny", prompt="def f(x):", max_tokens=3, seed=1)
    metadata = [("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")]
    with otlp_receiver() as (receiver, port):
        with running_server(otlp_endpoint=f"http://127.0.0.1:{port}") as srv, grpc.insecure_channel(srv.address) as ch:
            answers = list(pb_grpc.CellServeStub(ch).Generate(request, metadata=metadata, timeout=60))
            wait_until(lambda: receiver.named("cellserve.session"), what="the Generate session span")
        (session,) = receiver.named("cellserve.session")
    assert len(answers) == 3
    assert (session.trace_id.hex(), session.parent_span_id.hex()) == (CLIENT_TRACE, CLIENT_SPAN)
    assert attrs(session)["cellserve.session.close_reason"] == "client"
    steps = receiver.named("cellserve.step")
    assert steps and all(sp.trace_id == session.trace_id and sp.parent_span_id == session.span_id for sp in steps)


def parse(line: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in line.split() if "=" in pair)


def test_an_openmetrics_scrape_shows_traced_steps_as_exemplars_of_the_step_latency_buckets(running_server):
    with otlp_receiver() as (receiver, port):
        with running_server(otlp_endpoint=f"http://127.0.0.1:{port}") as srv:
            run_stream(srv.address, 4)
            request = urllib.request.Request(
                f"http://127.0.0.1:{srv.metrics_port}/metrics", headers={"Accept": "application/openmetrics-text"}
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
            plain = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
        (session,) = receiver.named("cellserve.session")
    exemplars = [
        line for line in text.splitlines() if line.startswith("cellserve_step_latency_seconds_bucket") and " # " in line
    ]
    assert exemplars, text
    assert all(f'trace_id="{session.trace_id.hex()}"' in line for line in exemplars)
    step_ids = {sp.span_id.hex() for sp in receiver.named("cellserve.step")}
    assert all(any(f'span_id="{i}"' in line for i in step_ids) for line in exemplars)
    batch_ids = {sp.span_id.hex() for sp in receiver.named("cellserve.batch")}
    for family in ("cellserve_batch_size_bucket", "cellserve_engine_run_seconds_bucket"):
        marked = [line for line in text.splitlines() if line.startswith(family) and " # " in line]
        assert marked and all(any(f'span_id="{i}"' in line for i in batch_ids) for line in marked), family
    assert " # {" not in plain  # the classic text format carries none


def test_the_sdk_sends_the_callers_span_so_server_sessions_continue_its_trace(running_server):
    from opentelemetry.sdk.trace import TracerProvider

    from cellserve.client import AsyncClient, Client

    tracer = TracerProvider().get_tracer("the caller")  # the caller's own provider: no global is set

    async def in_async_span(address: str) -> str:
        with tracer.start_as_current_span("async caller") as span:
            async with AsyncClient(address) as client, await client.session("tiny") as s:
                await s.step([1])
        return format(span.get_span_context().span_id, "016x")

    with otlp_receiver() as (receiver, port):
        with running_server(otlp_endpoint=f"http://127.0.0.1:{port}") as srv, Client(srv.address) as client:
            with tracer.start_as_current_span("caller") as span, client.session("tiny") as s:
                s.step([1])
            with client.session("tiny") as s:  # no current span: a root session span
                s.step([1])
            caller = span.get_span_context()
            async_caller = asyncio.run(in_async_span(srv.address))
        parents = sorted((s.trace_id.hex(), s.parent_span_id.hex()) for s in receiver.named("cellserve.session"))
    assert (format(caller.trace_id, "032x"), format(caller.span_id, "016x")) in parents
    assert async_caller in {parent for _, parent in parents}
    assert sum(1 for _, parent in parents if parent == "") == 1
