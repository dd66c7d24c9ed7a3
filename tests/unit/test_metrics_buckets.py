"""Batch-size quantiles, as Prometheus computes them from our buckets, are sensible for integer batch sizes."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry

from cellserve.server.metrics import Metrics


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile (promql/quantile.go bucketQuantile) over cumulative (le, count) pairs."""
    buckets = sorted(buckets)
    assert math.isinf(buckets[-1][0])
    total = buckets[-1][1]
    rank = q * total
    b = next(i for i, (_, count) in enumerate(buckets) if count >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, below = (buckets[b - 1][0], buckets[b - 1][1]) if b > 0 else (0.0, 0.0)
    end, count = buckets[b][0], buckets[b][1] - below
    return start + (end - start) * (rank - below) / count


def quantiles_of(batch_sizes: list[int], qs: tuple[float, ...]) -> list[float]:
    metrics = Metrics(CollectorRegistry())
    for size in batch_sizes:
        metrics.batch_size.labels(model="m").observe(size)
    (family,) = [f for f in metrics.registry.collect() if f.name == "cellserve_batch_size"]
    buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
    return [histogram_quantile(q, buckets) for q in qs]


QS = (0.01, 0.5, 0.9, 0.99)


@pytest.mark.parametrize("size", [1, 2, 4, 64, 256])
def test_constant_power_of_two_batches_give_that_size_at_every_quantile(size):
    for value in quantiles_of([size] * 1000, QS):
        assert size - 0.001 <= value <= size, (size, value)


def test_no_quantile_falls_below_the_smallest_batch_of_one():
    # the old buckets (lowest le=1) gave p50 = 0.5 and p99 = 0.99 for batches that are all 1
    assert min(quantiles_of([1] * 990 + [64] * 10, QS)) >= 0.999


def test_mixed_batches_land_in_the_right_range():
    p05, p15, p99 = quantiles_of([1] * 100 + [3] * 100 + [64] * 800, (0.05, 0.15, 0.99))
    assert round(p05) == 1
    assert 2 < p15 < 4, "the batches of 3 sit in (2, 3.999]"
    assert 63.999 <= p99 <= 64
