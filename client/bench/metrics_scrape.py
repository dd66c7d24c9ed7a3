"""Reading a server's Prometheus endpoint, parsed by prometheus-client's own text parser.

Samples keep their full names (``…_total``, ``…_sum``, ``…_count``), so callers ask for exactly the
series they read; a value sums every sample whose labels include the ones asked for.
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class HistogramTotals:
    sum: float
    count: float

    def __sub__(self, other: HistogramTotals) -> HistogramTotals:
        return HistogramTotals(self.sum - other.sum, self.count - other.count)

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None


def scrape(url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return resp.read().decode()


class Exposition:
    """One page of the Prometheus text format: sample name → [(labels, value)]."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[s.name].append((s.labels, s.value))

    @classmethod
    def read(cls, url: str, timeout_s: float = 10.0) -> Exposition:
        return cls(scrape(url, timeout_s))

    def _matching(self, name: str, labels: dict[str, str]) -> list[tuple[dict[str, str], float]]:
        return [(got, v) for got, v in self.samples.get(name, []) if all(got.get(k) == w for k, w in labels.items())]

    def value(self, name: str, **labels: str) -> float | None:
        """Sum of ``name``'s samples whose labels include ``labels``; None when there is no such sample."""
        hits = self._matching(name, labels)
        return sum(v for _, v in hits) if hits else None

    def by_label(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """``name``'s matching samples summed per value of ``label``."""
        out: dict[str, float] = defaultdict(float)
        for got, v in self._matching(name, labels):
            out[got.get(label, "")] += v
        return dict(out)

    def histogram(self, name: str, **labels: str) -> HistogramTotals:
        """Sum and count of histogram ``name`` over its matching series."""
        return HistogramTotals(self.value(name + "_sum", **labels) or 0.0, self.value(name + "_count", **labels) or 0.0)


def histogram(text: str, name: str, model: str = "") -> HistogramTotals:
    """Sum and count of histogram ``name`` over all series (or only ``model="…"`` when given)."""
    return Exposition(text).histogram(name, **({"model": model} if model else {}))


@dataclass(frozen=True)
class ServerCounters:
    batch: HistogramTotals
    engine: HistogramTotals

    @classmethod
    def read(cls, url: str, model: str = "") -> ServerCounters:
        page, labels = Exposition.read(url), {"model": model} if model else {}
        return cls(
            page.histogram("cellserve_batch_size", **labels), page.histogram("cellserve_engine_run_seconds", **labels)
        )

    def __sub__(self, other: ServerCounters) -> ServerCounters:
        return ServerCounters(self.batch - other.batch, self.engine - other.engine)
