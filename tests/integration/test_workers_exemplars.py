"""With --workers 2 and tracing on, every worker's trace exemplars reach the supervisor's merged OpenMetrics
scrape (each bucket's newest, whichever worker has it), parsed strictly."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import numpy as np
from otlp_helpers import otlp_receiver
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from test_workers import CONNECTIONS, Sessions


def openmetrics(port: int) -> dict[tuple[str, tuple], Any]:
    """An OpenMetrics scrape (what carries exemplars), parsed strictly: samples by name and labels."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s for family in openmetrics_families(text) for s in family.samples
    }


def test_every_workers_exemplars_reach_the_merged_openmetrics_scrape(spawn_server):
    with otlp_receiver() as (_, otlp_port):
        server = spawn_server("--workers", "2", "--otlp-endpoint", f"http://127.0.0.1:{otlp_port}")
        workers = server.ready_info()["workers"]
        asyncio.run(Sessions(server.address, [np.arange(3, dtype=np.int64)] * CONNECTIONS).step_through(3))
        own = [openmetrics(w["metrics_port"]) for w in workers]
        total = openmetrics(server.metrics_port)

    def exemplars(samples: dict, family: str) -> dict[tuple, Any]:
        return {k: s.exemplar for k, s in samples.items() if k[0] == family and s.exemplar is not None}

    for family in ("cellserve_step_latency_seconds_bucket", "cellserve_batch_size_bucket"):
        per_worker = [exemplars(samples, family) for samples in own]
        assert all(per_worker), f"every worker traces steps of its own sessions: {per_worker}"
        merged = exemplars(total, family)
        assert merged.keys() == per_worker[0].keys() | per_worker[1].keys(), family
        for key, exemplar in merged.items():  # each bucket's newest exemplar, whichever worker has it
            newest = max((w[key] for w in per_worker if key in w), key=lambda e: float(e.timestamp))
            assert exemplar.labels == newest.labels, key
    assert total[("cellserve_steps_total", (("model", "tiny"),))].value == 3 * CONNECTIONS
