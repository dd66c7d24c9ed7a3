"""Prometheus metrics on an injected registry. Code calls ``metrics.x.observe()``, never the client lib."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from cellserve import __version__

# Latencies from ~50 µs (a batched CPU step) to 10 s (a long chunk under load).
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


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
        self.step_latency = Histogram(
            p + "step_latency_seconds",
            "Per message, from submit to result.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            p + "queue_wait_seconds",
            "Time a step waited in the scheduler queue before its batch ran.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
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
        self.build_info = Gauge(p + "build_info", "Always 1; labels carry the build.", ["version"], registry=registry)
        self.build_info.labels(version=__version__).set(1)
        # process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total ... (Linux /proc): the soak
        # bench and operators watch them for leaks. Unprefixed, as every Prometheus client exports them.
        ProcessCollector(registry=registry)
