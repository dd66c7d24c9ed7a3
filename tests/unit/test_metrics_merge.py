"""The supervisor's merged ``/metrics`` (``--workers N``) over real worker expositions: sums, and the workers'
exemplars kept in the OpenMetrics exposition (the newest per series), gone with a worker that died."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from cellserve.server.metrics import Metrics
from cellserve.server.metrics_http import start_metrics_server
from cellserve.server.metrics_merge import MergedMetrics


class Worker:
    """A worker's registry served over loopback, as a worker process serves its own for the supervisor."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.metrics = Metrics(CollectorRegistry())
        self.httpd = start_metrics_server("127.0.0.1", 0, self.metrics.registry)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/metrics"

    def traced_step(self, seconds: float, trace_id: str) -> None:
        """One step of ``seconds``, traced: counted, and the exemplar of its latency and batch buckets."""
        ids = {"trace_id": trace_id, "span_id": trace_id[:16]}
        now = time.time()
        self.metrics.steps.labels("tiny").inc()
        self.metrics.step_latency.labels("tiny").observe_elapsed(now, [now - seconds])
        self.metrics.step_latency.labels("tiny").exemplar(seconds, ids)
        self.metrics.batch_size.labels("tiny").observe(1, ids)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started = [Worker(1001), Worker(1002)]
    yield started
    for w in started:
        w.httpd.shutdown()
        w.httpd.server_close()


def merged(live: list[Worker]) -> tuple[CollectorRegistry, list[Worker]]:
    """The supervisor's registry over ``live`` (a list the test may change, as workers die)."""
    registry = CollectorRegistry()
    registry.register(MergedMetrics(lambda: [(w.pid, w.url) for w in live]))
    return registry, live


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], Sample]:
    """The registry's OpenMetrics exposition, parsed back (strictly) into samples by name and labels."""
    text = openmetrics_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def bucket(le: str) -> tuple[str, tuple]:
    return "cellserve_step_latency_seconds_bucket", (("le", le), ("model", "tiny"))


def test_the_merged_openmetrics_exposition_keeps_every_workers_exemplars_the_newest_per_bucket(workers):
    a, b = workers
    a.traced_step(0.0008, "a" * 32)  # le=0.001, only worker a
    a.traced_step(0.02, "c" * 32)  # le=0.025, both workers: b's is newer
    b.traced_step(0.02, "b" * 32)
    registry, _ = merged(list(workers))

    got = samples(registry)
    assert got[bucket("0.001")].value == 1 and got[bucket("0.025")].value == 3  # cumulative, summed
    assert got[("cellserve_steps_total", (("model", "tiny"),))].value == 3
    assert got[bucket("0.001")].exemplar.labels == {"trace_id": "a" * 32, "span_id": "a" * 16}
    assert got[bucket("0.001")].exemplar.value == pytest.approx(0.0008)
    assert got[bucket("0.025")].exemplar.labels["trace_id"] == "b" * 32
    assert got[bucket("0.0005")].exemplar is None
    batch = got[("cellserve_batch_size_bucket", (("le", "1.0"), ("model", "tiny")))]
    assert batch.value == 3 and batch.exemplar.labels["trace_id"] == "b" * 32
    assert " # {" not in generate_latest(registry).decode()  # the classic text format carries none


def test_a_dead_workers_exemplars_go_while_its_counts_stay(workers):
    a, b = workers
    a.traced_step(0.0008, "a" * 32)
    b.traced_step(0.02, "b" * 32)
    registry, live = merged(list(workers))
    assert samples(registry)[bucket("0.001")].exemplar is not None

    live.remove(a)  # replaced: its last values are retired
    got = samples(registry)
    assert got[bucket("0.001")].value == 1 and got[bucket("0.025")].value == 2
    assert got[bucket("0.001")].exemplar is None
    assert got[bucket("0.025")].exemplar.labels["trace_id"] == "b" * 32
