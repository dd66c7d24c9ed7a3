"""The SDK sends the caller's trace context when OpenTelemetry is installed, and nothing (no error) without it."""

from __future__ import annotations

import sys

import pytest

from cellserve.client import trace_context


@pytest.fixture
def fresh_injector():
    trace_context._injector.cache_clear()
    yield
    trace_context._injector.cache_clear()


def test_without_opentelemetry_nothing_is_sent(monkeypatch, fresh_injector):
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if it were not installed: its import fails
    assert trace_context.trace_metadata() == ()


def test_with_opentelemetry_the_current_span_is_sent_as_traceparent(fresh_injector):
    from opentelemetry.sdk.trace import TracerProvider

    assert trace_context.trace_metadata() == ()  # no span current: nothing to continue
    with TracerProvider().get_tracer("t").start_as_current_span("caller") as span:
        metadata = dict(trace_context.trace_metadata())
    ctx = span.get_span_context()
    version, trace_id, span_id, flags = metadata["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert int(flags, 16) & 1  # sampled
