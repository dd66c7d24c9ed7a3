"""A real Prometheus scraping a real `cellserve serve`: the dashboard's and the alerts' PromQL works.

Starts `cellserve serve` (subprocess, free ports, small capacity) and Debian's `prometheus` binary with
the shipped deploy/prometheus/prometheus.yml (target, intervals and rule path rewritten for the test),
drives sessions over the native API (steps, closes, a bad step, a capacity refusal), waits until
Prometheus has scraped the final counts, then asks Prometheus's HTTP API:
- `cellserve_steps_total` equals the steps sent;
- every PromQL expression of the Grafana dashboard evaluates without error and returns data, with its
  template variables substituted ($job, $instance, $model; $__rate_interval → a 10 s window, which
  holds ~10 samples at the test's 1 s scrape interval) and every template-variable query finds values;
- every alert rule's `expr` evaluates without error. Alerts are thresholds over a quantity, and the
  thresholds are (rightly) not crossed by a healthy test server, so "returns data" is checked on the
  expression with its final comparison stripped: the quantity the alert watches must exist;
- Prometheus itself evaluates the loaded rule groups with health "ok";
- the prometheus-adapter rule behind the HPA, expanded as the adapter does, returns sessions per pod.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from deploy_checks import stop_process
from prometheus_server import HTTP_POLL_S, api, prometheus_process, query, unless_exited

from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import to_proto

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CELLSERVE = Path(sys.executable).parent / "cellserve"
RATE_WINDOW = "10s"
CAPACITY = 4
THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*[-+0-9.eE]+\s*$")


@contextmanager
def cellserve_process(model_dir: Path, tmp: Path, wait_until: Any) -> Iterator[dict[str, int]]:
    ready = tmp / "ready.json"
    cmd = [str(CELLSERVE), "serve", "--model-dirs", str(model_dir), "--host", "127.0.0.1", "--port", "0",
           "--metrics-host", "127.0.0.1", "--metrics-port", "auto", "--capacity", str(CAPACITY),
           "--grace-s", "1", "--ready-file", str(ready)]
    log = (tmp / "cellserve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        what = "cellserve's ready file"
        wait_until(unless_exited(proc, ready.exists, what), 60, poll_s=HTTP_POLL_S, what=what)
        yield json.loads(ready.read_text())
    finally:
        stop_process(proc)
        log.close()


# -- traffic -------------------------------------------------------------------------------------------


async def drive_sessions(address: str, model: str) -> int:
    """Steps, client closes, one bad step and one capacity refusal; returns the time steps computed."""
    rng = np.random.default_rng(0)
    sent = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CellServeStub(channel)
        calls = []
        for i in range(CAPACITY):  # fill the pool
            call = stub.Stream()
            await call.write(pb.StreamRequest(open=pb.Open(model=model)))
            assert (await call.read()).WhichOneof("kind") == "opened"
            calls.append(call)
            for seq in range(3 + i):
                x = rng.integers(0, 64, size=seq + 1, dtype=np.int64)  # a chunk of T = seq + 1 tokens
                await call.write(pb.StreamRequest(step=pb.Step(seq=seq, input=to_proto(x))))
                assert (await call.read()).WhichOneof("kind") == "output"
                sent += len(x)
        # A bad step (float64 for a token model) is answered in-stream; the session goes on.
        bad = to_proto(np.zeros(2, dtype=np.float64))
        await calls[0].write(pb.StreamRequest(step=pb.Step(seq=99, input=bad)))
        assert (await calls[0].read()).WhichOneof("kind") == "error"
        # The pool is full: one more session is refused with RESOURCE_EXHAUSTED.
        refused = stub.Stream()
        await refused.write(pb.StreamRequest(open=pb.Open(model=model)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await refused.read()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in calls:  # close every session (reason client)
            await call.write(pb.StreamRequest(close=pb.Close()))
            assert (await call.read()).WhichOneof("kind") == "closed"
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
    return sent


# -- expressions under test ----------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana/dashboards/cellserve.json").read_text())


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's template variables → concrete values (``$__rate_interval`` first: it contains ``$__``)."""
    expr = expr.replace("$__rate_interval", RATE_WINDOW)
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


def adapter_query() -> str:
    """The HPA's metric as prometheus-adapter serves it: metricsQuery with its template expanded."""
    values = yaml.safe_load((DEPLOY / "k8s/autoscaling/prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    series = re.match(r"^(\w+)", rule["seriesQuery"]).group(1)
    return (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'job="cellserve"').replace("<<.GroupBy>>", "instance"))


def empty_or_failing(base: str, exprs: list[str]) -> dict[str, str]:
    """expr → why it is not yet good (error text or 'no data'); empty when all return data."""
    bad = {}
    for expr in exprs:
        try:
            if not query(base, expr):
                bad[expr] = "no data"
        except AssertionError as e:
            bad[expr] = str(e)
    return bad


# -- the test ------------------------------------------------------------------------------------------


def test_dashboard_and_alert_promql_work_against_real_prometheus(tiny_model_dir, tiny_model, tmp_path, wait_until):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("the prometheus binary is absent (Debian package `prometheus`; .ci/run installs it in CI)")
    assert CELLSERVE.exists(), f"{CELLSERVE} missing: pip install -e . first"
    model = tiny_model.manifest.name
    with cellserve_process(tiny_model_dir, tmp_path, wait_until) as ports, \
            prometheus_process(prometheus, ports["metrics_port"], tmp_path, wait_until) as prom:
        instance = f"127.0.0.1:{ports['metrics_port']}"
        sent = asyncio.run(drive_sessions(f"127.0.0.1:{ports['port']}", model))
        assert sent > 0

        def steps_scraped() -> float | None:
            result = query(prom, f'sum(cellserve_steps_total{{job="cellserve", model="{model}"}})')
            return float(result[0]["value"][1]) if result and float(result[0]["value"][1]) == sent else None

        wait_until(steps_scraped, 60, poll_s=HTTP_POLL_S, what=f"prometheus to scrape cellserve_steps_total == {sent}")
        (sample,) = query(prom, f'cellserve_steps_total{{job="cellserve", model="{model}"}}')
        assert float(sample["value"][1]) == sent
        assert sample["metric"]["instance"] == instance

        values = {"job": "cellserve", "instance": instance, "model": model, "datasource": "prometheus"}
        dash = dashboard()
        dash_exprs = [substitute(t["expr"], values) for p in dash["panels"] for t in p["targets"]]
        rules = alert_rules()
        for rule in rules:
            assert THRESHOLD.search(rule["expr"]), f"alert {rule['alert']} has no trailing threshold to strip"
        alert_quantities = [THRESHOLD.sub("", r["expr"]) for r in rules]
        exprs = [*dash_exprs, *alert_quantities, adapter_query()]
        # Rates need two samples after an event: re-check until all have data, or report which do not.
        try:
            wait_until(lambda: not empty_or_failing(prom, exprs), 60, poll_s=HTTP_POLL_S)
        except AssertionError:
            pytest.fail(f"expressions without data or failing: {json.dumps(empty_or_failing(prom, exprs), indent=1)}")

        for rule in rules:  # the full alert expressions (thresholds included) evaluate without error
            query(prom, rule["expr"])

        # Batch sizes are integers >= 1: no quantile Prometheus interpolates from the buckets is below 1.
        low = query(prom, "histogram_quantile(0.01, sum by (le) (cellserve_batch_size_bucket))")  # all-time counts
        assert low and float(low[0]["value"][1]) >= 0.999, low

        for var in dash["templating"]["list"]:
            if var["type"] != "query":
                continue
            selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"]).groups()
            found = api(prom, f"/api/v1/label/{label}/values", **{"match[]": substitute(selector, values)})
            assert values[var["name"]] in found, (var["name"], found)

        def rules_healthy() -> list[dict[str, Any]] | None:
            loaded = [r for g in api(prom, "/api/v1/rules")["groups"] for r in g["rules"]]
            return loaded if loaded and all(r["health"] == "ok" for r in loaded) else None

        what = "prometheus to evaluate every rule with health ok"
        loaded = wait_until(rules_healthy, 30, poll_s=HTTP_POLL_S, what=what)
        assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in rules)
