"""`cellserve bench-path` at tiny sizes: every session count gets one full batch per round, and the
engine's part, the rest and the same-run raw onnxruntime figure are each there and consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellserve.server.cli import main


def test_bench_path_reports_each_session_count_with_its_engine_share(tiny_model_dir: Path, tmp_path: Path, capsys):
    assert main(["bench-path", "--model-dir", str(tiny_model_dir), "--sessions", "1,4",
                 "--messages", "40", "--warmup", "8", "--out", str(tmp_path)]) == 0  # fmt: skip
    report = json.loads((tmp_path / "path_bench.json").read_text())
    assert [p["sessions"] for p in report["points"]] == [1, 4]
    for p in report["points"]:
        assert p["mean_batch"] == p["sessions"]  # closed loops of equal length: every batch holds all N
        assert p["messages"] == 40
        assert 0 < p["engine_us_per_msg"] < p["path_us_per_msg"]
        assert p["rest_us_per_msg"] == pytest.approx(p["path_us_per_msg"] - p["engine_us_per_msg"])
        assert p["raw_ort_us_per_msg"] > 0 and p["path_over_raw_ort"] > 0
    assert report["meta"]["command"].startswith("cellserve bench-path --model-dir ")
    assert "in-process (no gRPC)" in capsys.readouterr().out


def test_bench_path_refuses_a_bad_session_list(tiny_model_dir: Path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench-path", "--model-dir", str(tiny_model_dir), "--sessions", "0,x"])
    assert "give session counts like 1,8,64" in str(exit_.value)


def test_bench_path_with_tracing_builds_and_batches_the_spans_a_traced_server_would(tiny_model_dir: Path, tmp_path):
    assert main(["bench-path", "--model-dir", str(tiny_model_dir), "--sessions", "2", "--messages", "40",
                 "--warmup", "8", "--trace-ratio", "1", "--out", str(tmp_path)]) == 0  # fmt: skip
    report = json.loads((tmp_path / "path_bench.json").read_text())
    # every step (48) and its batch span (one per 2 steps: 24), and the 2 sessions' spans
    assert report["tracing"] == {"step_ratio": 1.0, "spans": 48 + 24 + 2}
    assert report["meta"]["command"].endswith("--trace-ratio 1.0")
