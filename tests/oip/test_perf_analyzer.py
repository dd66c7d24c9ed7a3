"""Triton's own load tool, unmodified, against a real cellserve server: perf_analyzer in sequence mode.

perf_analyzer ships as a binary in the tritonclient wheel (dev extra). It links ``libcudart.so.12``
(PyPI ``nvidia-cuda-runtime-cu12``, dev extra) and ``libb64.so.0d`` (Debian ``libb64-0d``, which
``.ci/run`` installs). Missing libraries skip the test locally and fail it under CI.

It reads ModelMetadata/ModelConfig and builds its requests from them: it sends every listed input,
and for a sequence-batched model it drives sequences with start/end flags. So this checks that
cellserve describes its state as Triton's *implicit* state (only ``x`` listed).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

PERF_ANALYZER = Path(sys.executable).parent / "perf_analyzer"
TIMEOUT_S = 120  # perf_analyzer's own bound is the measurement settings below (a few seconds)


def _cudart_dir() -> str | None:
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return str(lib) if (lib / "libcudart.so.12").exists() else None


def perf_analyzer_env() -> dict[str, str]:
    """The environment perf_analyzer runs in; skips (fails under CI) when it or its libraries are missing."""
    env = dict(os.environ)
    problems = []
    if not PERF_ANALYZER.exists():
        problems.append(f"{PERF_ANALYZER} missing (tritonclient wheel, dev extra)")
    cudart = _cudart_dir()
    if cudart is None:
        problems.append("libcudart.so.12 missing (pip install nvidia-cuda-runtime-cu12, dev extra)")
    else:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (cudart, env.get("LD_LIBRARY_PATH")) if p)
    if not problems:
        ldd = subprocess.run(["ldd", str(PERF_ANALYZER)], capture_output=True, text=True, env=env, timeout=30)
        problems += [f"{line.strip()} (libb64.so.0d: apt-get install libb64-0d)" if "libb64" in line
                     else line.strip() for line in ldd.stdout.splitlines() if "not found" in line]
    if problems:
        why = "perf_analyzer cannot run: " + "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must have it (.ci/run and the dev extra install it)")
        pytest.skip(why)
    return env


def test_unmodified_perf_analyzer_streams_sequences_with_zero_data(running_server, tmp_path, wait_until):
    env = perf_analyzer_env()
    report = tmp_path / "perf.csv"
    with running_server(capacity=64) as srv:
        proc = subprocess.run(
            [
                str(PERF_ANALYZER),
                "-m", "tiny",
                "-u", srv.address,
                "-i", "grpc",
                "--streaming",  # sequences over ModelStreamInfer, state kept by the server
                "--input-data", "zero",  # perf_analyzer's default is random, out of a token model's vocabulary
                "--shape", "x:4",  # x is [T] per request (T dynamic): 4 steps a request
                "--concurrency-range", "2",
                "--measurement-mode", "count_windows",
                "--measurement-request-count", "50",
                "--max-trials", "3",
                "--stability-percentage", "100",
                "-f", str(report),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=TIMEOUT_S,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output
        assert "error" not in output.lower(), output

        def sample(name: str, **labels: str) -> float:
            return srv.registry.get_sample_value(name, labels) or 0.0

        opened = sample("cellserve_sessions_opened_total", model="tiny")
        steps = sample("cellserve_steps_total", model="tiny")
        errors = {code: sample("cellserve_errors_total", code=code) for code in ("INVALID_ARGUMENT", "UNIMPLEMENTED")}
        # perf_analyzer ended its stream: every sequence's slot comes back to the pool.
        wait_until(lambda: sample("cellserve_state_pool_slots", model="tiny", state="free") == 64)
    (row,) = list(csv.DictReader(report.open()))
    assert row["Concurrency"] == "2" and float(row["Inferences/Second"]) > 0
    assert opened >= 2, "perf_analyzer's sequences are cellserve sessions"
    assert steps >= 4 * 50 and steps % 4 == 0, "every request ran its 4 steps"
    assert errors == {"INVALID_ARGUMENT": 0, "UNIMPLEMENTED": 0}
