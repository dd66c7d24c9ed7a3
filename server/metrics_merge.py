"""One ``/metrics`` for ``--workers N``: every worker's metrics, read over loopback and summed.

Each worker keeps its own registry (cheap, lock-free per-batch updates; see ``metrics.py``) and
serves it on a private loopback port. On every scrape of the public endpoint the supervisor reads
them all and merges series with the same name and labels:

- counters and histograms (buckets, ``_sum``, ``_count``) are summed; a worker that died and was
  replaced keeps counting through its last values ("retired"), so sums never go backwards;
- gauges are summed (sessions, slots, bytes, memory), except the ones for which a sum means
  nothing: ``*_start_time_seconds`` and ``_created`` take the earliest, ``build_info`` and
  ``process_max_fds`` the largest.
A worker that does not answer one scrape contributes its last values. The workers are read in parallel,
each for at most ``SCRAPE_TIMEOUT_S``: a hung worker (until the supervisor kills it) delays a scrape by
that much, never by more, however many hang.

Workers are read in the OpenMetrics format, so their exemplars (a traced step's ``trace_id``/``span_id`` on its
histogram bucket) survive: each merged series keeps the newest exemplar any live worker has for it, and the
public endpoint shows it to a scrape that asks for OpenMetrics. A dead worker's exemplars go with it.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar, Sample

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 0.5  # a worker answers on loopback in milliseconds; one that does not is busy or hung
ACCEPT = "application/openmetrics-text; version=1.0.0"  # what a worker is asked for: exemplars included
MONOTONIC = ("counter", "histogram", "summary")

Key = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels


@dataclass
class _Family:
    name: str
    documentation: str
    type: str
    samples: dict[Key, float] = field(default_factory=dict)
    exemplars: dict[Key, Exemplar] = field(default_factory=dict)


def _merge_rule(family_type: str, sample_name: str) -> Callable[[float, float], float]:
    if sample_name.endswith("_created") or sample_name.endswith("_start_time_seconds"):
        return min
    if family_type == "gauge" and (sample_name.endswith("build_info") or sample_name == "process_max_fds"):
        return max
    if family_type in MONOTONIC or family_type == "gauge":
        return lambda a, b: a + b
    return max


def parse(text: str) -> dict[str, _Family]:
    """OpenMetrics exposition → families by name (each sample, and its exemplar if any, keyed by name and labels)."""
    out: dict[str, _Family] = {}
    for metric in text_string_to_metric_families(text):
        fam = out.setdefault(metric.name, _Family(metric.name, metric.documentation, metric.type))
        for s in metric.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            fam.samples[key] = s.value
            if s.exemplar is not None:
                fam.exemplars[key] = s.exemplar
    return out


def _newer(a: Exemplar | None, b: Exemplar) -> Exemplar:
    """The more recent of two exemplars of one series (``b`` when neither has a timestamp)."""
    if a is None or float(a.timestamp or 0.0) <= float(b.timestamp or 0.0):  # the parser's Timestamp, or None
        return b
    return a


class MergedMetrics(Collector):
    """A collector whose ``collect()`` is the merge of the live workers' metrics.

    ``workers()`` returns (pid, metrics URL) of the workers running now.
    """

    def __init__(self, workers: Callable[[], list[tuple[int, str]]]) -> None:
        self._workers = workers
        self._last: dict[int, dict[str, _Family]] = {}  # per pid: its last successful scrape
        self._retired: dict[str, _Family] = {}  # monotonic series of workers that are gone
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # the metrics server answers scrapes on threads: one merge at a time
            families = self._scrape()
        yield from merge(families)

    def _scrape(self) -> list[dict[str, _Family]]:
        live = self._workers()
        for pid in set(self._last) - {pid for pid, _ in live}:  # replaced since the last scrape
            self._retire(self._last.pop(pid))
        if live:
            with ThreadPoolExecutor(len(live), thread_name_prefix="cellserve-scrape") as pool:
                for pid, families in zip([pid for pid, _ in live], pool.map(_read, live), strict=True):
                    if families is not None:  # else restarting, busy or hung: its last values stand in
                        self._last[pid] = families
        return [*self._last.values(), self._retired]

    def _retire(self, families: dict[str, _Family]) -> None:
        for name, fam in families.items():
            if fam.type not in MONOTONIC:
                continue
            kept = self._retired.setdefault(name, _Family(name, fam.documentation, fam.type))
            for key, value in fam.samples.items():
                if not key[0].endswith("_created"):
                    kept.samples[key] = kept.samples.get(key, 0.0) + value


def _read(worker: tuple[int, str]) -> dict[str, _Family] | None:
    pid, url = worker
    request = urllib.request.Request(url, headers={"Accept": ACCEPT})
    try:
        with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT_S) as reply:  # a loopback URL of our own worker
            return parse(reply.read().decode())
    except (OSError, HTTPException, ValueError) as e:  # unreachable, cut off mid-answer (died), or not parsable
        log.debug("worker metrics not read", extra={"pid": pid, "error": str(e)})
        return None


def merge(sources: list[dict[str, _Family]]) -> Iterator[Metric]:
    """Families of several processes → one set of families, series by series (rules in the module doc)."""
    merged: dict[str, _Family] = {}
    for families in sources:
        for name, fam in families.items():
            into = merged.setdefault(name, _Family(name, fam.documentation, fam.type))
            for key, value in fam.samples.items():
                have = into.samples.get(key)
                into.samples[key] = value if have is None else _merge_rule(fam.type, key[0])(have, value)
            for key, exemplar in fam.exemplars.items():
                into.exemplars[key] = _newer(into.exemplars.get(key), exemplar)
    for fam in merged.values():
        metric = Metric(fam.name, fam.documentation, fam.type)
        metric.samples = [
            Sample(name, dict(labels), value, exemplar=fam.exemplars.get((name, labels)))
            for (name, labels), value in fam.samples.items()
        ]
        yield metric
