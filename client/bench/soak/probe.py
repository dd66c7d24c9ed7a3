"""What the soak reads from the server: RSS, open fds, state slots and session counters from /metrics.

RSS and open fds come from ``process_resident_memory_bytes`` and ``process_open_fds`` (so a remote
``--server`` works); when the soak started the server itself and the endpoint lacks them, from the
server's process tree in ``/proc`` instead (``cellserve.client.bench.procfs``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cellserve.client.bench.metrics_scrape import Exposition
from cellserve.client.bench.procfs import tree_usage


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
        return cls.of(Exposition(text), model, pid)

    @classmethod
    def read(cls, url: str, model: str, pid: int | None = None, timeout_s: float = 10.0) -> ServerReading:
        return cls.of(Exposition.read(url, timeout_s), model, pid)

    @classmethod
    def of(cls, page: Exposition, model: str, pid: int | None = None) -> ServerReading:
        """The reading for ``model`` from a parsed page (``pid``: the local server, for RSS/fds it lacks)."""
        rss, fds = page.value("process_resident_memory_bytes"), page.value("process_open_fds")
        local = tree_usage(pid) if pid is not None and (rss is None or fds is None) else None
        if local is not None:
            rss = local.rss_bytes if rss is None else rss
            fds = local.open_fds if fds is None else fds
        return cls(
            rss_bytes=rss,
            open_fds=fds,
            slots_used=page.value("cellserve_state_pool_slots", model=model, state="used"),
            slots_free=page.value("cellserve_state_pool_slots", model=model, state="free"),
            sessions_active=page.value("cellserve_sessions_active", model=model),
            opened_total=page.value("cellserve_sessions_opened_total", model=model),
            closed_total=page.by_label("cellserve_sessions_closed_total", "reason", model=model),
            errors_total=page.by_label("cellserve_errors_total", "code"),
            steps_total=page.value("cellserve_steps_total", model=model),
        )

    def to_json(self) -> dict[str, object]:
        return asdict(self)
