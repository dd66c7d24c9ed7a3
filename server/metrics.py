"""Prometheus metrics on an injected registry. Code calls ``metrics.x.observe()``, never the client lib."""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import Exemplar, HistogramMetricFamily, Metric

from cellserve import __version__

# Latencies from ~50 µs (a batched CPU step) to 10 s (a long chunk under load).
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 10)
# Batch sizes are integers, and histogram_quantile interpolates linearly inside a bucket (from 0 in the lowest
# one), so a lone le=1 bucket makes an all-ones p50 come out as 0.5. Each power of two p gets a bucket
# (p - 0.001, p] that holds exactly the batches of size p: where batches are 1 or a full max_batch (a power of
# two by default) every quantile comes out as p; the bucket (p, 2p - 0.001] in between holds p+1 .. 2p-1.
BATCH_BUCKETS = tuple(b for p in (2**i for i in range(11)) for b in (p - 0.001, p))  # 0.999, 1, ..., 1023.999, 1024


class Metrics:
    """Every metric cellserve exports (names prefixed ``cellserve_``; no session ids in labels)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        p = "cellserve_"
        self.sessions_active = Gauge(p + "sessions_active", "Open sessions.", ["model"], registry=registry)
        self.sessions_opened = Counter(
            p + "sessions_opened", "Sessions opened (resumed ones included).", ["model"], registry=registry
        )
        self.sessions_closed = Counter(
            p + "sessions_closed",
            "Sessions closed, by reason: client, idle, disconnect, drain, error.",
            ["model", "reason"],
            registry=registry,
        )
        self.steps = Counter(p + "steps", "Time steps computed (a chunk of T counts T).", ["model"], registry=registry)
        self.session_steps = Counter(
            p + "session_steps",
            "Sessions' steps computed: a Multiplex message stepping N sessions counts N, a chunk of T counts 1.",
            ["model"],
            registry=registry,
        )
        self.step_messages = Counter(
            p + "step_messages",
            "Step messages batched: a Stream step, an OIP row, a Multiplex message of many sessions' steps counts 1.",
            ["model"],
            registry=registry,
        )
        # Observed once per batch for all of its messages (observe_elapsed): per-message values, per-batch cost.
        self.step_latency = BatchHistogram(
            p + "step_latency_seconds",
            "Per step request (a session's message, a stateless OIP row): queued until its output is ready.",
            "model",
            LATENCY_BUCKETS,
            registry,
        )
        self.queue_wait = BatchHistogram(
            p + "queue_wait_seconds",
            "Time a step waited in the scheduler queue before its batch ran.",
            "model",
            LATENCY_BUCKETS,
            registry,
        )
        self.batch_size = Histogram(
            p + "batch_size", "Sessions per engine call.", ["model"], buckets=BATCH_BUCKETS, registry=registry
        )
        self.engine_run = Histogram(
            p + "engine_run_seconds",
            "One engine call: gather, onnxruntime run, scatter.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.state_pool_bytes = Gauge(
            p + "state_pool_bytes", "Bytes preallocated for h and c.", ["model"], registry=registry
        )
        self.state_pool_slots = Gauge(
            p + "state_pool_slots", "State pool slots by state (used|free).", ["model", "state"], registry=registry
        )
        self.errors = Counter(p + "errors", "Errors returned to clients, by gRPC code.", ["code"], registry=registry)
        self.engine_failures = Counter(
            p + "engine_failures",
            "Steps the engine failed on, each isolated from the rest of its batch, by gRPC code answered.",
            ["model", "code"],
            registry=registry,
        )
        self.streams_paused = Gauge(
            p + "streams_paused",
            "Streams not being read because their client is not reading its answers (max_stream_buffer_bytes).",
            registry=registry,
        )
        self.trace_spans_dropped = Counter(
            p + "trace_spans_dropped",
            "Trace spans lost on the way to the collector, by reason: export_failed (the collector did not take "
            "them), queue_full (spans came faster than they could be sent).",
            ["reason"],
            registry=registry,
        )
        self.build_info = Gauge(p + "build_info", "Always 1; labels carry the build.", ["version"], registry=registry)
        self.build_info.labels(version=__version__).set(1)
        # process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total ... (Linux /proc): the soak
        # bench and operators watch them for leaks. Unprefixed, as every Prometheus client exports them.
        ProcessCollector(registry=registry)


class BatchHistogram:
    """A labelled histogram of durations that arrive a batch at a time: ``labels(v).observe_elapsed(now, starts)``.

    Exported exactly like prometheus-client's ``Histogram`` (``_bucket{le}``, ``_sum``, ``_count``),
    but a batch costs one locked update instead of one per value.
    """

    def __init__(
        self, name: str, documentation: str, label: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.bounds = (*(float(b) for b in buckets), math.inf)  # upper bounds ("le"), +Inf last
        self._lock = threading.Lock()  # the /metrics thread reads while the event loop writes
        self._children: dict[str, HistogramChild] = {}
        registry.register(self)

    def labels(self, value: str) -> HistogramChild:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = HistogramChild(self.bounds, self._lock)
        return child

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=[self.label])]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            rows = [
                (value, list(accumulate(child.counts)), child.sum, list(child.exemplars))
                for value, child in self._children.items()
            ]
        for value, cumulative, total, exemplars in rows:
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = [
                (_le(b), float(n)) if e is None else (_le(b), float(n), e)
                for b, n, e in zip(self.bounds, cumulative, exemplars, strict=True)
            ]
            family.add_metric([value], buckets, total)
        yield family


class HistogramChild:
    """One label value's bucket counts (not cumulative) and sum."""

    def __init__(self, bounds: tuple[float, ...], lock: threading.Lock) -> None:
        self._bounds = bounds
        self._lock = lock
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.exemplars: list[Exemplar | None] = [None] * len(bounds)  # the latest per bucket (OpenMetrics only)

    def observe_elapsed(self, now: float, starts: Sequence[float], times: Sequence[int] | None = None) -> None:
        """Add ``now - start`` for every start time (seconds): each lands in the first bucket whose bound is >= it;
        ``times[i]``: start i counts that many times (a gateway message's rows share their start).

        A bisect per value: ~0.25 µs each, where one numpy call costs ~8 µs whatever the batch (measured), so
        this is cheaper up to a few dozen values and within ~0.1 µs per value above.
        """
        values = [now - t for t in starts]
        buckets = [bisect_left(self._bounds, v) for v in values]
        with self._lock:
            counts = self.counts
            if times is None:
                for b in buckets:
                    counts[b] += 1
                self.sum += sum(values)
            else:
                for b, n in zip(buckets, times, strict=True):
                    counts[b] += n
                self.sum += sum(v * n for v, n in zip(values, times, strict=True))

    def exemplar(self, value: float, labels: dict[str, str]) -> None:
        """Keep ``labels`` (a trace's ids) as the exemplar of ``value``'s bucket, already counted by
        ``observe_elapsed``: a dashboard's slow bucket then links to one trace that landed in it. Called only for
        traced steps, so it costs nothing with tracing off."""
        bucket = bisect_left(self._bounds, value)
        with self._lock:
            self.exemplars[bucket] = Exemplar(labels, value, time.time())


def _le(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))
