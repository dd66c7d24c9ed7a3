"""OpenTelemetry traces: a span per session, sampled step spans under it, a span per engine call linked to them.

Off unless configured (the ``otlp_*``/``trace_*`` settings, or the standard ``OTEL_*`` variables they mirror):
then :func:`build_tracing` returns None, nothing here is imported on the serving path, and a step costs one
``is None`` check per engine call. On, the server builds one :class:`Tracing` (its own ``TracerProvider``, passed
in: no global provider is set) and hands it to the dataplane and each model's scheduler.

What an operator sees, and why it is shaped so:

- **A session span** from open to close (``cellserve.session``): model, session id, steps, close reason, whether
  it resumed from a token. A W3C ``traceparent`` in the gRPC metadata makes it the child of the caller's span.
  Sessions live for thousands of steps, so one span each is cheap, and every session gets one.
- **Step spans** (``cellserve.step``) under their session, for the share of steps the sampler asks for, decided
  per step with one ``random()`` before anything is built, after the step ran (so that the always-on rules can
  see it): every failed step and every step slower than ``trace_slow_step_ms`` is kept too.
- **Batch spans** (``cellserve.batch``), one per engine call that served a traced step, with a span link to each
  traced step: one trace shows who waited for whom.

Spans leave through a ``BatchSpanProcessor`` (a worker thread, a bounded queue): an unreachable collector never
stalls serving; the outage is logged once, and every span it costs is counted in
``cellserve_trace_spans_dropped_total``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter

from cellserve.server.metrics import HistogramChild
from cellserve.server.trace_config import TraceConfig

log = logging.getLogger(__name__)

# The exporters' own loggers: they log every failed attempt; TracesExporter logs an outage once instead.
EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)


class TracesExporter(SpanExporter):
    """The OTLP exporter, counting the spans a failed export loses and logging an outage once (not per try)."""

    def __init__(self, inner: SpanExporter, dropped: Counter, endpoint: str) -> None:
        self._inner = inner
        self._dropped = dropped.labels(reason="export_failed")
        self._endpoint = endpoint
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:  # an exporter bug must not kill the processor's thread
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            if self._failing:
                log.info("trace export works again", extra={"endpoint": self._endpoint})
                self._failing = False
        else:
            self._dropped.inc(len(spans))
            if not self._failing:
                log.warning(
                    "cannot export traces; their spans are dropped until the collector answers",
                    extra={"endpoint": self._endpoint, "counted_in": "cellserve_trace_spans_dropped_total"},
                )
                self._failing = True
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class CountingBatchProcessor(BatchSpanProcessor):
    """A ``BatchSpanProcessor`` that counts the spans its full queue drops (the SDK only logs them)."""

    def __init__(self, exporter: SpanExporter, dropped: Counter, max_queue_size: int = 2048) -> None:
        super().__init__(exporter, max_queue_size=max_queue_size)
        self._max_queue = max_queue_size
        self._queue_full = dropped.labels(reason="queue_full")

    def on_end(self, span: ReadableSpan) -> None:
        queue = getattr(self._batch_processor, "_queue", ())  # the SDK's deque: drops its oldest span when full
        if len(queue) >= self._max_queue:
            self._queue_full.inc()
        super().on_end(span)


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _exporter(config: TraceConfig) -> SpanExporter:
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=config.endpoint, insecure=config.endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=config.endpoint)


def _provider_sampler(sampler: str) -> Sampler:
    """The provider decides sessions (and batch spans, roots): our own code decides steps before building them."""
    if sampler == "always_off":
        return ALWAYS_OFF
    if sampler.startswith("parentbased_"):
        return ParentBased(ALWAYS_ON)  # a caller's unsampled traceparent leaves its session untraced
    return ALWAYS_ON


class Owner(Protocol):
    """What a traced step knows of its session (a :class:`~cellserve.server.sessions.Session`)."""

    id: str
    trace: SessionTrace | None

    def log_fields(self) -> dict[str, str]: ...


class Step(Protocol):
    """A scheduler request as the tracer reads it."""

    owner: Owner | None
    queued_at: float  # time.perf_counter()


class SessionTrace:
    """A session's span, and the context its step spans hang under."""

    __slots__ = ("context", "span", "tracing")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self.tracing = tracing
        self.span = span
        self.context: Context = trace.set_span_in_context(span)

    def log_fields(self) -> dict[str, str]:
        ctx = self.span.get_span_context()
        return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}

    def step_failed(self, session_id: str, error: BaseException) -> None:
        """A step refused before it reached the scheduler (bad input, a full queue): always kept."""
        now = time.time_ns()
        self.tracing.error_span(self, session_id, error, now, now)

    def end(self, steps: int, reason: str) -> None:
        span = self.span
        span.set_attribute("cellserve.session.steps", steps)
        span.set_attribute("cellserve.session.close_reason", reason)
        if reason == "error":
            span.set_status(Status(StatusCode.ERROR, "the session ended in an error"))
        span.end()


class Tracing:
    """The server's tracer and its export pipeline (built from :class:`TraceConfig`, shut down with the server)."""

    def __init__(self, config: TraceConfig, dropped: Counter, exporter: SpanExporter | None = None) -> None:
        """``exporter``: instead of the OTLP exporter the config names (tests)."""
        self.config = config
        self.step_ratio = config.step_ratio
        self.slow_step_s = config.slow_step_s
        inner = exporter if exporter is not None else _exporter(config)
        for name in EXPORTER_LOGGERS:  # TracesExporter says it once; theirs would repeat per batch and retry
            logger = logging.getLogger(name)
            if not any(isinstance(f, _Quiet) for f in logger.filters):
                logger.addFilter(_Quiet())
        self.processor = CountingBatchProcessor(TracesExporter(inner, dropped, config.endpoint), dropped)
        self.provider = TracerProvider(
            sampler=_provider_sampler(config.sampler),
            resource=Resource.create({"service.name": config.service_name}),
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("cellserve.server")
        self._propagator = TraceContextTextMapPropagator()
        self._roots_off = config.sampler == "parentbased_always_off"
        self._off = config.sampler == "always_off"

    def session(
        self, model: str, session_id: str, *, resumed: bool, carrier: Mapping[str, str] | None
    ) -> SessionTrace | None:
        """Start a session's span (a child of the caller's span when ``carrier`` holds a ``traceparent``); None
        when the sampler leaves this session untraced."""
        if self._off:
            return None
        parent = self._propagator.extract(carrier) if carrier else None
        if self._roots_off and (parent is None or not trace.get_current_span(parent).get_span_context().is_valid):
            return None
        span = self.tracer.start_span(
            "cellserve.session",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "cellserve.model": model,
                "cellserve.session.id": session_id,
                "cellserve.session.resumed_from_token": resumed,
            },
        )
        if not span.is_recording():
            return None
        return SessionTrace(self, span)

    def step_tracer(self, model: str, latency: HistogramChild | None = None) -> StepTracer:
        """``latency``: the model's step-latency histogram, whose buckets get the traced steps as exemplars."""
        return StepTracer(self, model, latency)

    def error_span(
        self, session: SessionTrace, session_id: str, error: BaseException, start_ns: int, end_ns: int, **attrs: Any
    ) -> Span:
        span = self.tracer.start_span(
            "cellserve.step",
            context=session.context,
            start_time=start_ns,
            attributes={"cellserve.session.id": session_id, "cellserve.step.kept": "error", **attrs},
        )
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end(end_time=end_ns)
        return span

    def shutdown(self) -> None:
        """Flush what is queued (bounded by the exporter's timeout) and stop the export thread."""
        self.provider.shutdown()


class StepTracer:
    """One model's step and batch spans, made once per engine call from what the scheduler already measured."""

    def __init__(self, tracing: Tracing, model: str, latency: HistogramChild | None = None) -> None:
        self.tracing = tracing
        self.model = model
        self._latency = latency
        self._tracer = tracing.tracer
        self._ratio = tracing.step_ratio
        self._slow = tracing.slow_step_s
        self._batches = 0

    def delivered(self, group: Sequence[Step], t: int, engine_s: float, end: float) -> dict[str, str] | None:
        """One engine call served ``group`` (``t`` steps each, ``engine_s`` long, outputs ready at ``end``,
        perf_counter). Each step is kept by the sampler's ratio or for its slowness, decided before anything is
        built; a batch span linking the kept steps follows, if any was kept. Returns its ids (the batch and engine
        histograms' exemplar), or None."""
        self._batches += 1
        kept: list[tuple[Step, SessionTrace, str]] | None = None
        ratio, slow, rnd = self._ratio, self._slow, random.random
        for req in group:
            owner = req.owner
            if owner is None or owner.trace is None:
                continue
            if end - req.queued_at > slow:
                why = "slow"
            elif rnd() < ratio:
                why = "sampled"
            else:
                continue
            if kept is None:
                kept = []
            kept.append((req, owner.trace, why))
        if kept is None:
            return None
        offset = time.time_ns() - int(time.perf_counter() * 1e9)  # perf_counter -> epoch ns, once per call
        end_ns = offset + int(end * 1e9)
        start_ns = end_ns - int(engine_s * 1e9)
        batch_id, size = self._batches, len(group)
        links = []
        for req, session, why in kept:
            owner = req.owner
            assert owner is not None
            span = self._tracer.start_span(
                "cellserve.step",
                context=session.context,
                start_time=offset + int(req.queued_at * 1e9),
                attributes={
                    "cellserve.session.id": owner.id,
                    "cellserve.step.kept": why,
                    "cellserve.step.t": t,
                    "cellserve.step.queue_wait_s": max(0.0, (start_ns - offset) / 1e9 - req.queued_at),
                    "cellserve.batch.id": batch_id,
                    "cellserve.batch.size": size,
                    "cellserve.engine.time_s": engine_s,
                },
            )
            span.end(end_time=end_ns)
            context = span.get_span_context()
            links.append(Link(context))
            if self._latency is not None:
                ids = {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}
                self._latency.exemplar(end - req.queued_at, ids)
        batch = self._tracer.start_span(
            "cellserve.batch",
            context=Context(),  # a root: it serves many sessions' traces, tied to them by links
            links=links,
            start_time=start_ns,
            attributes={
                "cellserve.model": self.model,
                "cellserve.batch.id": batch_id,
                "cellserve.batch.size": size,
                "cellserve.step.t": t,
                "cellserve.engine.time_s": engine_s,
            },
        )
        batch.end(end_time=end_ns)
        context = batch.get_span_context()
        return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}

    def failed(self, req: Step, error: BaseException, t: int) -> None:
        """A step the engine failed on alone: always kept."""
        owner = req.owner
        if owner is None or owner.trace is None:
            return
        end_ns = time.time_ns()
        start_ns = end_ns - int((time.perf_counter() - req.queued_at) * 1e9)
        self.tracing.error_span(owner.trace, owner.id, error, start_ns, end_ns, **{"cellserve.step.t": t})
