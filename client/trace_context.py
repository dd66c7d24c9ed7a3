"""The caller's OpenTelemetry trace context, sent with each session's stream so that the server's session span
continues the caller's trace.

Only when OpenTelemetry is installed: the SDK adds no dependency for it, and without it (or with no span
current) nothing is sent. Whatever the application configured is used: its global propagator
(``OTEL_PROPAGATORS``, W3C ``traceparent``/``tracestate`` by default) and its current span.
"""

from __future__ import annotations

import functools
from collections.abc import Callable


@functools.cache
def _injector() -> Callable[[dict[str, str]], None] | None:
    """``opentelemetry.propagate.inject``, looked up once (a failed import is not cached by Python)."""
    try:
        from opentelemetry import propagate
    except ImportError:
        return None
    return propagate.inject


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the current span's context (``traceparent``, ...); () without OpenTelemetry."""
    inject = _injector()
    if inject is None:
        return ()
    carrier: dict[str, str] = {}
    inject(carrier)
    return tuple((key.lower(), value) for key, value in carrier.items())
