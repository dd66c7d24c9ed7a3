"""BatchHistogram exports exactly what prometheus-client's Histogram exports for the same observations,
for batches of one value, of many, and of mixed sizes."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from cellserve.server.metrics import LATENCY_BUCKETS, BatchHistogram


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    (family,) = [f for f in registry.collect() if f.name == name]
    return {(s.name, s.labels.get("le", "")): s.value for s in family.samples if not s.name.endswith("_created")}


@pytest.mark.parametrize("sizes", [[1] * 50, [16] * 5, [17] * 5, [64] * 5, [256] * 2, [1, 64, 3, 17, 16, 2]])
def test_exported_buckets_sum_and_count_match_prometheus_histogram(sizes):
    rng = random.Random(sum(sizes))
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("t_ours", "test", "model", LATENCY_BUCKETS, ours).labels("m")
    reference = Histogram("t_ref", "test", ["model"], buckets=LATENCY_BUCKETS, registry=theirs).labels(model="m")
    now = 1000.0
    for size in sizes:
        # values on the bounds themselves (le is inclusive), between them, and above the last one
        elapsed = [rng.choice([*LATENCY_BUCKETS, rng.uniform(0, 0.01), rng.uniform(0, 20)]) for _ in range(size)]
        batch.observe_elapsed(now, [now - e for e in elapsed])
        for e in elapsed:
            reference.observe(now - (now - e))  # the same float arithmetic as the histogram's
    got = {(n.replace("t_ours", "t"), le): v for (n, le), v in samples(ours, "t_ours").items()}
    want = {(n.replace("t_ref", "t"), le): v for (n, le), v in samples(theirs, "t_ref").items()}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert got[("t_count", "")] == sum(sizes)
