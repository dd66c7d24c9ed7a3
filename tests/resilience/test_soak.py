"""``cellserve bench soak`` at test size: churn against a real server process, then every slot free."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from cellserve.client import Client, StepRejected
from cellserve.client.bench.soak.inputs import UncheckedInfo, bad_step, good_step
from cellserve.client.bench.soak.probe import ServerReading
from cellserve.client.bench.soak.report import rss_summary
from cellserve.server.cli import build_parser
from cellserve.server.cli import main as cellserve_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def soak_argv(server: object, out: Path, *extra: str) -> list[str]:
    return ["--log-level", "WARNING", "bench", "soak", "--server", server.address,  # type: ignore[attr-defined]
            "--metrics-url", f"http://127.0.0.1:{server.metrics_port}/metrics",  # type: ignore[attr-defined]
            "--out", str(out), "--quiet", *extra]  # fmt: skip


def test_short_soak_churns_without_unexpected_errors_and_frees_every_slot(spawn_server, tmp_path):
    server = spawn_server()
    argv = soak_argv(server, tmp_path, "--seconds", "8", "--workers", "8", "--max-messages", "16", "--max-t", "8",
                     "--p-drop", "0.3", "--p-bad-step", "0.1", "--sample-every", "1",
                     "--max-rss-growth", "1000")  # RSS growth over 8 s is noise: not judged here  # fmt: skip
    assert cellserve_main(argv) == 0
    report = json.loads((tmp_path / "soak.json").read_text())
    assert {"meta", "settings", "samples", "summary", "checks", "passed"} <= set(report)
    assert report["passed"] and all(c["ok"] for c in report["checks"].values())
    s = report["summary"]
    assert s["unexpected"] == {"total": 0, "by_kind": {}, "examples": {}}
    injected = s["injected"]
    assert injected["sent"] > 0 and injected["answered_invalid_argument"] == injected["sent"]
    assert all(k["sent"] == k["invalid_argument"] for k in injected["by_kind"].values())
    # the server counted exactly the injected steps as errors, and nothing else
    assert s["server_counters"]["errors_by_code"] == {"INVALID_ARGUMENT": injected["sent"]}
    sessions = s["sessions"]
    assert sessions["closed"] > 0 and sessions["dropped"] > 0
    assert sessions["opened"] == sessions["closed"] + sessions["dropped"] == s["server_counters"]["opened"]
    assert sum(s["server_counters"]["closed_by_reason"].values()) == sessions["opened"]
    assert s["slots_used_end"] == 0 and s["sessions_active_end"] == 0
    assert 1 <= s["max_slots_used_sampled"] <= 8
    assert s["latency_ms"]["all"]["p50"] <= s["latency_ms"]["all"]["p99"]
    samples = report["samples"]
    assert sum(x["phase"] == "soak" for x in samples) >= 3 and samples[-1]["phase"] == "settled"
    assert all(x["rss_bytes"] > 0 for x in samples)
    assert s["rss"]["measured"] and s["rss"]["baseline_mb"] > 0
    assert (tmp_path / "soak.png").read_bytes()[:8] == PNG_MAGIC


def test_soak_fails_when_a_slot_is_still_used_at_the_end(spawn_server, tmp_path):
    server = spawn_server()
    with Client(server.address) as client, client.session() as held:  # a session the soak does not own
        held.step([1, 2, 3])
        argv = soak_argv(server, tmp_path, "--seconds", "2", "--workers", "2", "--sample-every", "1",
                         "--settle-timeout", "1", "--max-rss-growth", "1000")  # fmt: skip
        assert cellserve_main(argv) == 1
    report = json.loads((tmp_path / "soak.json").read_text())
    assert not report["passed"]
    assert report["checks"]["slots_all_free_at_end"] == {"ok": False, "value": 1.0}
    assert report["checks"]["no_unexpected_errors"]["ok"]


@pytest.mark.parametrize("kind", ["tokens", "features"])
def test_every_injected_bad_step_kind_is_invalid_argument_and_the_session_goes_on(kind, running_server, tmp_path):
    from cellserve.model.export import export_random_model

    export_random_model(tmp_path, name="m", input_kind=kind, input_size=5, output_size=3, layers=1, hidden=8)
    rng = np.random.default_rng(0)
    with running_server(model_dirs=[tmp_path]) as srv, Client(srv.address) as client, client.session() as s:
        info = s.info
        seen: set[str] = set()
        for _ in range(200):
            name, x = bad_step(info, rng)
            seen.add(name)
            s.info = UncheckedInfo.of(info)
            with pytest.raises(StepRejected) as e:
                s.step(x)
            s.info = info
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, (name, e.value)
            assert s.step(good_step(info, 2, rng)).shape == (2, 3)
        assert len(seen) == 6
        assert s.steps == 400


def test_rss_growth_above_the_limit_fails_the_check():
    samples = [{"t_s": float(t), "phase": phase, "rss_bytes": rss}
               for t, phase, rss in [(0, "warmup", 90e6), (1, "soak", 100e6), (2, "soak", 103e6), (3, "soak", 106e6),
                                     (4, "settled", 106e6)]]  # fmt: skip
    ok, bad = rss_summary(samples, 10.0), rss_summary(samples, 5.0)
    assert ok["growth_pct"] == pytest.approx(6.0) and ok["ok"]
    assert not bad["ok"] and bad["baseline_mb"] == pytest.approx(100e6 / 2**20, abs=0.01)
    assert bad["slope_mb_per_min_after_warmup"] == pytest.approx(3e6 / 2**20 * 60, rel=1e-3)
    assert not rss_summary([{**x, "rss_bytes": None} for x in samples], 5.0)["ok"]  # unmeasured never passes


def test_server_reading_picks_the_models_series_from_the_exposition():
    text = "\n".join([
        "# HELP process_resident_memory_bytes Resident memory size in bytes.",
        "process_resident_memory_bytes 1.5e+08",
        'cellserve_state_pool_slots{model="a",state="used"} 3.0',
        'cellserve_state_pool_slots{model="a",state="free"} 4093.0',
        'cellserve_state_pool_slots{model="b",state="used"} 7.0',
        'cellserve_sessions_active{model="a"} 3.0',
        'cellserve_sessions_closed_total{model="a",reason="client"} 5.0',
        'cellserve_sessions_closed_total{model="a",reason="disconnect"} 2.0',
        'cellserve_errors_total{code="INVALID_ARGUMENT"} 4.0',
    ])  # fmt: skip
    r = ServerReading.parse(text, "a")
    assert (r.rss_bytes, r.slots_used, r.slots_free, r.sessions_active) == (1.5e8, 3.0, 4093.0, 3.0)
    assert r.closed_total == {"client": 5.0, "disconnect": 2.0} and r.errors_total == {"INVALID_ARGUMENT": 4.0}
    assert not r.all_free and r.opened_total is None


def test_bench_and_bench_soak_both_explain_themselves(capsys):
    for argv, needles in ((["bench", "--help"], ("--streams", "soak")),
                          (["bench", "soak", "--help"], ("--minutes", "--workers", "--max-rss-growth"))):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            cellserve_main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert all(n in out for n in needles), out
    plain = build_parser().parse_args(["bench", "--streams", "4", "-T", "2"])
    assert plain.func.__name__ == "_bench" and plain.streams == [4] and plain.t == [2] and plain.bench_command is None
    soak = build_parser().parse_args(["bench", "soak", "--seconds", "3"])
    assert soak.func.__name__ == "_soak" and soak.seconds == 3


def test_soak_against_a_server_needs_its_metrics_url(capsys):
    assert cellserve_main(["bench", "soak", "--server", "127.0.0.1:1", "--seconds", "1"]) == 2
    assert "--metrics-url" in capsys.readouterr().err
