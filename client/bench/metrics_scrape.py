"""Reading the server's Prometheus endpoint: histogram sums and counts, for deltas around a run."""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass

_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")


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


def histogram(text: str, name: str, model: str = "") -> HistogramTotals:
    """Sum and count of histogram ``name`` over all series (or only ``model="…"`` when given)."""
    total = {"_sum": 0.0, "_count": 0.0}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        for suffix in total:
            if m["name"] == name + suffix and (not model or f'model="{model}"' in (m["labels"] or "")):
                total[suffix] += float(m["value"])
    return HistogramTotals(total["_sum"], total["_count"])


@dataclass(frozen=True)
class ServerCounters:
    batch: HistogramTotals
    engine: HistogramTotals

    @classmethod
    def read(cls, url: str, model: str = "") -> ServerCounters:
        text = scrape(url)
        return cls(
            histogram(text, "cellserve_batch_size", model), histogram(text, "cellserve_engine_run_seconds", model)
        )

    def __sub__(self, other: ServerCounters) -> ServerCounters:
        return ServerCounters(self.batch - other.batch, self.engine - other.engine)
