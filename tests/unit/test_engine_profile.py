"""Proof from onnxruntime's own profile that run_slots makes no copies of h/c (CPU side of the one code path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cellserve.model.manifest import load_manifest
from cellserve.server.engine import Engine
from cellserve.server.state_pool import StatePool

BATCH, STEPS = 3, 5  # distinct from L=2, H=32, vocab 256, so shapes identify tensors


def shapes(event: dict[str, Any], key: str) -> list[list[int]]:
    return [next(iter(d.values())) for d in event["args"].get(key, [])]


def test_profiled_run_slots_has_no_memcpy_and_computes_state_in_place(tiny_model_dir: Path, tmp_path: Path):
    manifest = load_manifest(tiny_model_dir)
    layers, hidden = manifest.layers, manifest.hidden
    pool = StatePool(manifest.states, capacity=16)
    for _ in range(16):
        pool.allocate(object())
    engine = Engine(manifest, tiny_model_dir, pool, intra_op_threads=1, profile_prefix=str(tmp_path / "ort"))
    rng = np.random.default_rng(0)
    runs = 3
    for _ in range(runs):
        slots = rng.choice(16, size=BATCH, replace=False).astype(np.int64)
        engine.run_slots(slots, rng.integers(0, 256, size=(BATCH, STEPS), dtype=np.int64))
    trace_path = engine.end_profiling()
    with open(trace_path) as f:
        trace = json.load(f)
    nodes = [e for e in trace if e.get("cat") == "Node"]

    # The profile covers exactly our runs, and every kernel ran where the pool lives.
    assert sum(1 for e in trace if e.get("name") == "model_run") == runs
    assert nodes and {e["args"]["provider"] for e in nodes} == {"CPUExecutionProvider"}
    # No copy node of any kind: onnxruntime found every bound tensor already on its device.
    assert not [e for e in nodes if e["args"]["op_name"].startswith("Memcpy")]
    # The state is read and produced at the batch's shape by the graph itself: per-layer LSTM
    # nodes take [1, B, H] h/c slices and hn/cn come out of a node as [L, B, H] once per run.
    lstm = [e for e in nodes if e["args"]["op_name"] == "LSTM"]
    assert len(lstm) == layers * runs
    assert all(shapes(e, "input_type_shape")[2:4] == [[1, BATCH, hidden]] * 2 for e in lstm)
    state_out = [e for e in nodes if shapes(e, "output_type_shape") == [[layers, BATCH, hidden]]]
    assert len(state_out) == 2 * runs  # hn and cn
