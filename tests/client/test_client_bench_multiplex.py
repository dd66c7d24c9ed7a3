"""`cellserve bench --sessions-per-message K`: a gateway's load over Multiplex streams, its same-run baselines
(raw onnxruntime at batch K, echo of the same messages, echo at --echo-streams single-session streams), the JSON
ratios the issue asks for and the PNG. No timing is asserted: only that every figure is measured and reported."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from multiprocessing import Value

import numpy as np
import pytest

from cellserve.client.bench.baselines.ort import OrtResult
from cellserve.client.bench.baselines.sizes import message_sizes, multiplex_sizes
from cellserve.client.bench.load import LoadSpec, Window, _closed_loop
from cellserve.client.bench.measure import Result
from cellserve.client.bench.multiplex_load import Pipe, pipe_loop, step_field, step_request, varint
from cellserve.client.bench.multiplex_report import config_entry, legend, table
from cellserve.client.bench.report import pooled
from cellserve.client.tensors import to_proto
from cellserve.server.cli import main as cellserve_main
from cellserve.v1 import cellserve_pb2 as pb


def _spec(**overrides: object) -> LoadSpec:
    fields: dict = {"target": "multiplex", "address": "", "model": "m", "streams": 1, "t": 1, "input_kind": "tokens",
                    "input_size": 256, "output_size": 256, "layers": 2, "hidden": 32, "warmup_s": 0.0,
                    "duration_s": 0.0, "messages_per_stream": 1, "seed": 0, "sessions": 64,
                    "multiplex": True}  # fmt: skip
    return LoadSpec(**{**fields, **overrides})


def test_the_bench_runs_a_multiplex_load_and_writes_the_acceptance_ratios_and_a_png(tiny_model_dir, tmp_path):
    """A short count-bound run against a started server: every target measured, both ratios the issue names in
    bench.json, a PNG; piped output gets the legend and no progress bar."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "cellserve.server.cli", "--log-level", "WARNING", "bench", "--model-dir",
           str(tiny_model_dir), "--sessions-per-message", "3", "--streams", "2", "-T", "2", "--inflight", "2",
           "--echo-streams", "4", "--messages", "40", "--warmup", "0.1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    meta = report["meta"]
    assert (meta["mode"], meta["inflight"], meta["echo_streams"], meta["baselines"]) == ("multiplex", [2], 4,
                                                                                         ["echo", "ort"])  # fmt: skip
    (cfg,) = report["configs"]
    assert (cfg["streams"], cfg["t"], cfg["sessions_per_message"], cfg["inflight"]) == (2, 2, 3, 2)
    cs = cfg["cellserve"]
    assert cs["messages"] == 40 and cs["sessions_per_message"] == 3
    assert cs["steps_per_s"] == pytest.approx(cs["msgs_per_s"] * 3 * 2)  # session-steps: K rows of T each
    assert cs["mean_batch"] >= 3  # the server's batches hold whole messages of 3 sessions (or more, merged)
    assert cs["server_cpu_us_per_session_step"] > 0 and cs["latency_ms"]["p99"] > 0
    echo, single, ort = (cfg["baselines"][k] for k in ("echo", "echo_single", "ort"))
    assert (echo["streams"], echo["sessions_per_message"], echo["messages"]) == (2, 3, 40)
    assert (single["streams"], single["sessions_per_message"]) == (4, 1)
    assert (ort["batch"], ort["t"]) == (3, 2)
    r = cfg["ratios"]
    assert r["steps_vs_raw_ort"] == pytest.approx(cs["steps_per_s"] / ort["steps_per_s"])  # one round
    assert len(ort["steps_per_s_rounds"]) == 1 and cfg["round_ratios"][0]["steps_vs_raw_ort"] == r["steps_vs_raw_ort"]
    assert r["steps_vs_echo_msgs"] == pytest.approx(cs["steps_per_s"] / (single["msgs_per_s"] * 2))  # one round
    assert r["msgs_vs_echo"] == pytest.approx(cs["msgs_per_s"] / echo["msgs_per_s"])
    assert r["engine_vs_ort"] > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "steps/raw ORT" in proc.stdout and "Legend" in proc.stdout and "echo_single" in proc.stdout
    assert "msg/s]" not in proc.stderr and "\r" not in proc.stderr  # no progress bar in piped output


def _round(msgs_per_s: float, echo_single: float, n: int = 100) -> dict[str, Result]:
    lat = np.linspace(1e-3, 2e-3, n)
    return {"cellserve": Result("cellserve", 4, 1, n, n / msgs_per_s, lat, rows=64),
            "echo_single": Result("echo_single", 64, 1, n, n / echo_single, lat)}  # fmt: skip


def test_raw_ort_runs_in_every_round_and_its_ratio_is_the_median_of_same_round_ratios():
    """A box whose load drifts between rounds moves cellserve and raw ORT together: each round's ratio is taken
    within the round, as the echo ratios are, and the table shows them all."""
    rounds = [_round(500.0, 4000.0), _round(150.0, 3000.0), _round(600.0, 5000.0)]  # round 2: a busy box
    orts = [OrtResult(64, 1, 100, 64 / 40_000), OrtResult(64, 1, 100, 64 / 12_000), OrtResult(64, 1, 100, 64 / 48_000)]
    entry = config_entry(rounds, pooled(rounds), orts, inflight=2)
    per_round = [r["steps_vs_raw_ort"] for r in entry["round_ratios"]]
    assert per_round == pytest.approx([0.8, 0.8, 0.8])
    assert entry["ratios"]["steps_vs_raw_ort"] == pytest.approx(0.8)  # a pooled ratio would not be
    assert entry["ratios"]["steps_vs_echo_msgs"] == pytest.approx(7.68)  # of 8.0, 3.2 and 38,400 / 5,000
    assert entry["baselines"]["ort"]["steps_per_s_rounds"] == pytest.approx([40_000, 12_000, 48_000])
    assert entry["ratios"]["steps_vs_raw_ort_formed"] is None and entry["inflight"] == 2
    text = table([entry])
    assert "steps_vs_raw_ort per round: 0.80 0.80 0.80" in text and "steps/echo msgs 7.68 (echo at 64 streams)" in text
    assert "steps/raw ORT" in legend([entry]) and "steps_vs_echo_msgs" in legend([entry])
    bare = config_entry(rounds[:1], pooled(rounds[:1]), [])  # --baselines echo: no raw ORT
    assert bare["ratios"]["steps_vs_raw_ort"] is None and "ort" not in bare["baselines"]
    assert "steps/raw ORT -" in table([bare])


def test_a_compare_server_is_held_to_the_same_baselines():
    """--compare-serve-arg=--workers=2 beside the default server: its session-steps against the same round's raw ORT
    and single-session echo, as cellserve's are."""
    rounds = [_round(500.0, 4000.0), _round(400.0, 4000.0)]
    for r, rate in zip(rounds, (900.0, 600.0), strict=True):
        r["compare"] = Result("compare", 4, 1, 100, 100 / rate, np.linspace(1e-3, 2e-3, 100), rows=64)
    orts = [OrtResult(64, 1, 100, 64 / 64_000), OrtResult(64, 1, 100, 64 / 32_000)]
    entry = config_entry(rounds, pooled(rounds), orts)
    assert [r["compare_steps_vs_raw_ort"] for r in entry["round_ratios"]] == pytest.approx([0.9, 1.2])
    assert entry["ratios"]["compare_steps_vs_raw_ort"] == pytest.approx(1.05)  # the median of two
    assert entry["ratios"]["compare_steps_vs_echo_msgs"] == pytest.approx((14.4 + 9.6) / 2)
    assert entry["ratios"]["compare_steps_vs_cellserve"] == pytest.approx((1.8 + 1.5) / 2)
    assert "compare's steps/raw ORT 1.05" in table([entry])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--baselines", "naive"], "the naive baseline steps one session per message"),
        (["--sweep"], "--sweep is the single-session grid"),
        (["--echo-streams", "0"], "--echo-streams is 0"),
    ],
)
def test_multiplex_flags_that_cannot_work_are_refused_in_one_line(argv, says, capsys):
    assert cellserve_main(["bench", "--server", "127.0.0.1:1", "--sessions-per-message", "8", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("cellserve bench: error: ") and says in err


def test_a_step_request_is_a_multiplex_request_with_its_seq_and_columns():
    x = np.arange(6, dtype=np.int64).reshape(3, 2)  # [K=3, T=2]
    field = step_field(pb.StepSessions(handles=[7, 300, 70_000], input=to_proto(x)).SerializeToString())
    for seq in (2, 127, 128, 1 << 40):
        req = pb.MultiplexRequest.FromString(step_request(seq, field))
        assert req.seq == seq and req.WhichOneof("kind") == "step"
        assert list(req.step.handles) == [7, 300, 70_000] and req.step.input.raw == x.tobytes()
    assert varint(300) == pb.MultiplexRequest(seq=300).SerializeToString()[1:]


def test_multiplex_sizes_are_k_sessions_of_stream_steps():
    (req1, reply1), (req64, reply64) = message_sizes(_spec(sessions=1)), multiplex_sizes(_spec())
    assert 64 * 256 * 4 < reply64 < 64 * 256 * 4 + 64  # y [64, 1, 256] float32 and a header
    assert reply64 == pytest.approx(64 * reply1, rel=0.05)
    assert 64 * 8 < req64 < 64 * req1 + 64 * 3  # x [64, 1] int64 and 64 handles


def test_a_pipelined_stream_keeps_at_most_d_in_flight_and_counts_exactly_its_messages():
    """The writer runs D messages ahead of the reader, answers are matched to writes in order, and a count-bound
    run ends with exactly its messages timed (the window open from the start)."""
    depth, n = 3, 50
    in_flight, most, answered = [], [0], []

    async def main() -> tuple[list[float], int]:
        ready = asyncio.Queue()

        async def send(i: int) -> None:
            in_flight.append(i)
            most[0] = max(most[0], len(in_flight))
            await ready.put(i)

        async def recv() -> None:
            i = await ready.get()
            await asyncio.sleep(0)  # the answer takes a turn of the loop
            assert in_flight.pop(0) == i
            answered.append(i)

        async def close() -> None:
            return None

        spec = _spec(inflight=depth, messages_per_stream=n)
        return await pipe_loop(spec, Window(0.0, 0.0), Pipe(send, recv, close), Value("q", 0))

    lat, sent = asyncio.run(main())
    assert len(lat) == sent == n and answered == list(range(n))
    assert most[0] == depth
    assert all(x >= 0 for x in lat)


def test_one_message_in_flight_is_the_plain_closed_loop():
    calls: list[str] = []

    async def main() -> tuple[list[float], int]:
        async def send(i: int) -> None:
            calls.append(f"send {i}")

        async def recv() -> None:
            calls.append("recv")

        async def close() -> None:
            return None

        spec = _spec(inflight=1, messages_per_stream=3)
        pipe = Pipe(send, recv, close)
        got = await pipe_loop(spec, Window(0.0, 0.0), pipe, Value("q", 0))
        assert got[1] == (await _closed_loop(spec, Window(0.0, 0.0), pipe.roundtrip, Value("q", 0)))[1]
        return got

    lat, sent = asyncio.run(main())
    assert (len(lat), sent) == (3, 3)
    assert calls[:6] == ["send 0", "recv", "send 1", "recv", "send 2", "recv"]
