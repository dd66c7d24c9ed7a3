"""What the soak reads from the server: RSS, open fds, state slots and session counters from /metrics.

RSS comes from ``process_resident_memory_bytes`` (so a remote ``--server`` works); when the soak
started the server itself and the endpoint lacks it, from ``/proc/<pid>/status`` instead.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cellserve.client.bench.metrics_scrape import scrape

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')

Series = dict[str, list[tuple[dict[str, str], float]]]  # metric name -> [(labels, value)]


def parse_exposition(text: str) -> Series:
    """Prometheus text format → name → [(labels, value)] (comments skipped)."""
    series: Series = defaultdict(list)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = {lm["key"]: lm["value"] for lm in _LABEL.finditer(m["labels"] or "")}
        series[m["name"]].append((labels, float(m["value"])))
    return series


def _value(series: Series, name: str, **labels: str) -> float | None:
    """Sum of ``name``'s samples whose labels include ``labels``; None when there is no such sample."""
    hits = [v for got, v in series.get(name, []) if all(got.get(k) == want for k, want in labels.items())]
    return sum(hits) if hits else None


def _by_label(series: Series, name: str, label: str, **labels: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for got, v in series.get(name, []):
        if all(got.get(k) == want for k, want in labels.items()):
            out[got.get(label, "")] += v
    return dict(out)


def proc_rss_bytes(pid: int) -> float | None:
    """VmRSS of a local process from /proc (None where there is no /proc or no such process)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class ServerReading:
    """One reading of the server's metrics for one model."""

    rss_bytes: float | None
    open_fds: float | None
    slots_used: float | None
    slots_free: float | None
    sessions_active: float | None
    opened_total: float | None
    closed_total: dict[str, float] = field(default_factory=dict)  # by reason
    errors_total: dict[str, float] = field(default_factory=dict)  # by gRPC code name
    steps_total: float | None = None

    @property
    def all_free(self) -> bool:
        """True once the server reports no open session and no used slot for the model."""
        return self.sessions_active == 0 and self.slots_used == 0

    @classmethod
    def parse(cls, text: str, model: str, pid: int | None = None) -> ServerReading:
        s = parse_exposition(text)
        rss = _value(s, "process_resident_memory_bytes")
        if rss is None and pid is not None:
            rss = proc_rss_bytes(pid)
        return cls(
            rss_bytes=rss,
            open_fds=_value(s, "process_open_fds"),
            slots_used=_value(s, "cellserve_state_pool_slots", model=model, state="used"),
            slots_free=_value(s, "cellserve_state_pool_slots", model=model, state="free"),
            sessions_active=_value(s, "cellserve_sessions_active", model=model),
            opened_total=_value(s, "cellserve_sessions_opened_total", model=model),
            closed_total=_by_label(s, "cellserve_sessions_closed_total", "reason", model=model),
            errors_total=_by_label(s, "cellserve_errors_total", "code"),
            steps_total=_value(s, "cellserve_steps_total", model=model),
        )

    @classmethod
    def read(cls, url: str, model: str, pid: int | None = None, timeout_s: float = 10.0) -> ServerReading:
        return cls.parse(scrape(url, timeout_s), model, pid)

    def to_json(self) -> dict[str, object]:
        return {
            "rss_bytes": self.rss_bytes,
            "open_fds": self.open_fds,
            "slots_used": self.slots_used,
            "slots_free": self.slots_free,
            "sessions_active": self.sessions_active,
            "opened_total": self.opened_total,
            "closed_total": self.closed_total,
            "errors_total": self.errors_total,
            "steps_total": self.steps_total,
        }
