"""`cellserve bench-engine` at tiny sizes: report structure, same-run baseline, committed pool memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path


def test_bench_engine_reports_both_capacities_modes_and_finite_ratios(tiny_model_dir: Path, tmp_path: Path):
    # A fresh process: in this one, memory freed by earlier tests would be reused and hide the pool's RSS.
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cellserve.server.cli",
            "bench-engine",
            "--model-dir",
            str(tiny_model_dir),
            "--capacities",
            "1000,65536",
            "--batch-sizes",
            "1,8",
            "--iters",
            "5",
            "--warmup",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "engine_bench.json").read_text())
    assert (tmp_path / "engine_bench.png").stat().st_size > 0
    assert [e["capacity"] for e in report["capacities"]] == [1000, 65536]
    for entry in report["capacities"]:
        assert [p["batch"] for p in entry["points"]] == [1, 8]
        for point in entry["points"]:
            for mode in ("resident", "round_trip", "gather_scatter"):
                assert point[mode]["median_us"] > 0 and point[mode]["p90_us"] >= point[mode]["median_us"]
                assert math.isfinite(point[mode]["steps_per_s"])
    large = report["capacities"][1]
    assert large["pool_bytes"] == 2 * 2 * 65536 * 32 * 4
    # Every slot was allocated (zeroed), so the pool's pages are resident, not just reserved.
    assert large["rss_bytes_filled"] - large["rss_bytes_before"] >= 0.9 * large["pool_bytes"]
    assert [r["batch"] for r in report["ratios"]] == [1, 8]
    for r in report["ratios"]:
        for key in ("resident_large_over_small", "gather_scatter_large_over_small", "round_trip_over_resident"):
            assert math.isfinite(r[key]) and r[key] > 0
    out = run.stdout
    assert "rt/resident" in out and "capacity 65536" in out


def test_bench_engine_measures_a_per_frame_model_with_a_constant_against_raw_onnxruntime(tmp_path: Path):
    """The README's figure for models that are not our LSTM: a per-frame model's T frames per engine call, its
    dynamic frame at the manifest's example, the constant fed, every state carried; raw ORT at the same batch."""
    own_model = str(Path(__file__).resolve().parents[1] / "own_model")
    if own_model not in sys.path:
        sys.path.insert(0, own_model)
    from state_models import MODELS

    from cellserve.model.importer import import_onnx

    spec = MODELS["per_frame"]
    import_onnx(spec.build(tmp_path), tmp_path / "model", name="per_frame", **spec.import_kwargs)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "cellserve.server.cli", "bench-engine", "--model-dir", str(tmp_path / "model"),
            "--capacities", "100", "--batch-sizes", "1,4", "--steps", "3", "--iters", "5", "--warmup", "1",
            "--out", str(out)]  # fmt: skip
    run = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "engine_bench.json").read_text())
    assert report["model"]["states"] == [{"name": "state", "dtype": "float32", "shape": [2, "B", 16]}]
    assert report["steps"] == 3 and [r["batch"] for r in report["ratios"]] == [1, 4]
    assert all(math.isfinite(r["resident_over_raw_ort"]) and r["resident_over_raw_ort"] > 0 for r in report["ratios"])
    assert "states state float32 [2, B, 16]" in run.stdout
