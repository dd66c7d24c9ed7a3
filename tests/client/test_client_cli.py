"""CLI: `cellserve models`, `cellserve health`, `cellserve generate --server`, and `cellserve bench` at tiny size."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys

import pytest

from cellserve.client import Client
from cellserve.server.cli import main as cellserve_main


def test_models_prints_one_json_line_per_model(running_server, capsys, tiny_model):
    with running_server() as srv:
        assert cellserve_main(["models", "--server", srv.address]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    m = json.loads(line)
    assert m["name"] == "tiny" and m["sha256"] == tiny_model.manifest.sha256 and m["hidden"] == 32


def test_health_of_the_server_a_model_and_an_unknown_service(running_server, capsys):
    with running_server() as srv:
        capsys.readouterr()
        assert cellserve_main(["health", "--server", srv.address]) == 0
        assert cellserve_main(["health", "--server", srv.address, "--service", "tiny"]) == 0
        assert capsys.readouterr().out.splitlines() == ["SERVING", "SERVING"]
        assert cellserve_main(["health", "--server", srv.address, "--service", "nope"]) == 1
        assert capsys.readouterr().out == "UNKNOWN SERVICE 'nope' (services: '' and one per model: tiny)\n"


def test_health_of_a_dead_server_is_unreachable(capsys):
    assert cellserve_main(["health", "--server", f"127.0.0.1:{_port_nothing_listens_on()}", "--timeout", "3"]) == 1
    assert capsys.readouterr().out.startswith("UNREACHABLE (UNAVAILABLE: ")


def test_models_against_a_dead_server_fails_with_unavailable(capsys):
    assert cellserve_main(["models", "--server", "127.0.0.1:1", "--timeout", "3"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_generate_with_server_streams_the_servers_text(running_server, capsysbinary):
    with running_server() as srv:
        with Client(srv.address) as client:
            want = b"".join(g.text for g in client.generate("ab", 9, temperature=0.9, top_k=20, seed=3))
        argv = ["generate", "--server", srv.address, "--prompt", "ab", "--max-bytes", "9", "--temperature", "0.9",
                "--top-k", "20", "--seed", "3"]  # fmt: skip
        assert cellserve_main(argv) == 0
        assert capsysbinary.readouterr().out == b"ab" + want + b"\n"
        assert cellserve_main([*argv[:-2], "--seed", "3", "--model", "nope"]) == 1
        assert b"NOT_FOUND" in capsysbinary.readouterr().err


def _finite_positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_at_tiny_size_reports_three_baselines_and_sane_ratios(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "cellserve.server.cli", "--log-level", "WARNING", "bench", "--model-dir",
           str(tiny_model_dir), "--streams", "3", "-T", "2", "--messages", "240", "--warmup", "0.1", "--procs", "2",
           "--no-progress", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "msgs/echo" in proc.stdout  # the table was printed
    report = json.loads((out / "bench.json").read_text())
    (cfg,) = report["configs"]
    assert (cfg["streams"], cfg["t"]) == (3, 2)
    assert set(cfg["baselines"]) == {"echo", "naive", "ort"}
    for name in ("echo", "naive"):
        b = cfg["baselines"][name]
        assert b["messages"] == 240 and _finite_positive(b["msgs_per_s"])
        assert math.isclose(b["steps_per_s"], 2 * b["msgs_per_s"])
        assert _finite_positive(b["server_cpu_us_per_msg"]) and _finite_positive(b["client_cpu_us_per_msg"])
        # the main thread is part of the server's CPU (0 is possible: /proc counts in 10 ms ticks, 240 messages)
        assert 0 <= b["server_loop_cpu_us_per_msg"] <= b["server_cpu_us_per_msg"]
    cs = cfg["cellserve"]
    assert cs["messages"] == 240
    lat = cs["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"]
    assert len(cs["latency_cdf_ms"]) == 101 and cs["latency_cdf_ms"] == sorted(cs["latency_cdf_ms"])
    assert 1 <= cs["mean_batch"] <= 3  # read from the server's cellserve_batch_size histogram
    assert _finite_positive(cs["engine_ms_per_call"]) and _finite_positive(cs["server_cpu_us_per_msg"])
    ort = cfg["baselines"]["ort"]
    assert ort["t"] == 2 and ort["batch"] == round(cs["mean_batch"]) and _finite_positive(ort["steps_per_s"])
    assert set(cfg["ratios"]) == {
        "msgs_vs_echo", "p50_vs_echo", "p99_vs_echo", "server_cpu_vs_echo", "loop_cpu_vs_echo",
        "msgs_vs_naive", "steps_vs_ort", "engine_vs_ort",
    }  # fmt: skip
    loop_ratio = cfg["ratios"].pop("loop_cpu_vs_echo")  # None when echo's loop took under a tick
    assert loop_ratio is None or _finite_positive(loop_ratio)
    assert all(_finite_positive(v) for v in cfg["ratios"].values()), cfg["ratios"]
    assert math.isclose(cfg["ratios"]["msgs_vs_echo"], cs["msgs_per_s"] / cfg["baselines"]["echo"]["msgs_per_s"])
    echo_cpu = cfg["baselines"]["echo"]["server_cpu_us_per_msg"]
    assert math.isclose(cfg["ratios"]["server_cpu_vs_echo"], cs["server_cpu_us_per_msg"] / echo_cpu)
    (only_round,) = cfg["round_ratios"]  # one round (the default): its ratios are the config's
    assert only_round.pop("loop_cpu_vs_echo") == loop_ratio
    assert only_round == {k: cfg["ratios"][k] for k in only_round}
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_with_server_takes_the_same_token_and_tls_flags_as_models(running_server, pki, tmp_path, capsysbinary):
    f = pki.write(tmp_path)
    secure = {"tls_cert_file": f["server_cert"], "tls_key_file": f["server_key"], "auth_tokens": "sekrit"}
    with running_server(**secure) as srv:
        server = f"localhost:{srv.server.port}"
        argv = ["generate", "--server", server, "--prompt", "ab", "--max-bytes", "4", "--seed", "1",
                "--tls-root-cert", str(f["ca"])]  # fmt: skip
        assert cellserve_main([*argv, "--token", "sekrit"]) == 0
        out = capsysbinary.readouterr().out
        assert out.startswith(b"ab") and len(out) == 2 + 4 + 1
        assert cellserve_main(argv) == 1  # no token
        assert b"UNAUTHENTICATED" in capsysbinary.readouterr().err
        assert cellserve_main(["models", "--server", server, "--tls-root-cert", str(f["ca"]), "--token", "sekrit"]) == 0


def test_generate_offline_refuses_connection_flags_without_server(capsys):
    assert cellserve_main(["generate", "--token", "x", "--max-bytes", "1"]) == 2
    assert "--token apply to a server: add --server HOST:PORT" in capsys.readouterr().err


def test_bench_checkpoint_at_tiny_size_reports_every_setting_against_off(tiny_model_dir, tmp_path):
    out = tmp_path / "ck"
    cmd = [sys.executable, "-m", "cellserve.server.cli", "--log-level", "WARNING", "bench", "checkpoint",
           "--model-dir", str(tiny_model_dir), "--streams", "2", "--messages", "60", "--rounds", "2", "--warmup",
           "0.1", "--procs", "1", "--every", "1,8", "--no-progress", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "×off" in proc.stdout
    report = json.loads((out / "checkpoint.json").read_text())
    assert [e["checkpoint_every"] for e in report["settings"]] == [0, 1, 8]
    assert report["meta"]["sdk_default_checkpoint_every"] == 8 and report["meta"]["rounds"] == 2
    off = report["settings"][0]
    assert off["label"] == "off" and off["msgs_vs_off"] == 1.0
    for e in report["settings"]:
        assert len(e["msgs_per_s_rounds"]) == 2 and all(_finite_positive(r) for r in e["msgs_per_s_rounds"])
        assert math.isclose(e["msgs_vs_off"], e["msgs_per_s"] / off["msgs_per_s"])
        assert 0 < e["latency_ms"]["p50"] <= e["latency_ms"]["p99"]
        assert _finite_positive(e["server_cpu_us_per_msg"])


def test_bench_checkpoint_refuses_a_bad_every_list(capsys):
    assert cellserve_main(["bench", "checkpoint", "--every", "eight"]) == 2
    assert "give step-message counts like 1,8,64" in capsys.readouterr().err


def _port_nothing_listens_on() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "bench",
    [["bench"], ["bench", "checkpoint"], ["bench", "soak", "--seconds", "1", "--metrics-url", "http://127.0.0.1:1/m"]],
)
def test_bench_without_a_server_says_it_waits_then_fails_in_one_line(bench, capsys):
    address = f"127.0.0.1:{_port_nothing_listens_on()}"
    capsys.readouterr()
    assert cellserve_main([*bench, "--server", address, "--connect-timeout", "0.5"]) == 2
    err = capsys.readouterr().err
    assert f"waiting for the server at {address} (up to 0.5 s, --connect-timeout)" in err
    command = " ".join(bench[:2])
    assert err.splitlines()[-1] == (
        f"cellserve {command}: error: no server answered at {address} within 0.5 s; start one (cellserve serve), "
        "fix --server, or wait longer with --connect-timeout"
    )
    assert "Traceback" not in err


def test_bench_on_a_model_the_server_lacks_fails_in_one_line(running_server, capsys):
    with running_server() as srv:
        capsys.readouterr()  # only what the command writes (an earlier in-process CLI call may have logged here)
        argv = ["bench", "--server", srv.address, "--model", "nope", "--baselines", "echo", "--no-progress"]
        assert cellserve_main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("cellserve bench: error: NOT_FOUND: model 'nope' is not loaded")
    assert "Traceback" not in err


def test_bench_connect_timeout_must_be_positive_seconds(capsys):
    with pytest.raises(SystemExit) as exit_:
        cellserve_main(["bench", "--connect-timeout", "0"])
    assert exit_.value.code == 2
    assert "--connect-timeout: 0 is not > 0 seconds" in capsys.readouterr().err


@pytest.mark.parametrize("sub", ["checkpoint", "soak"])
def test_a_load_bench_flag_before_a_bench_subcommand_is_refused_with_the_right_order(sub, capsys):
    """argparse would let the subcommand's defaults replace it: `bench --server X checkpoint` would start a
    server of its own and never drive X."""
    assert cellserve_main(["--log-level", "WARNING", "bench", "--server", "127.0.0.1:1", sub, "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"cellserve bench: error: --server comes before '{sub}', where flags belong to the load bench, which "
        f"'{sub}' does not run; put them after it: cellserve bench {sub} --server 127.0.0.1:1 --seed 3 "
        f"(see cellserve bench {sub} --help)"
    )
