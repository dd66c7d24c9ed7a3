"""Stateless ModelInfer borrows pool slots through the dataplane, so the slot gauges count its rows."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from cellserve.oip import grpc_service_pb2 as oip
from cellserve.oip import grpc_service_pb2_grpc as oip_grpc


def _slots(srv: Any, state: str) -> float | None:
    return srv.registry.get_sample_value("cellserve_state_pool_slots", {"model": "tiny", "state": state})


def test_stateless_model_infer_counts_its_borrowed_slots_while_it_runs(running_server, tiny_oracle):
    rows = 3
    with running_server(capacity=8) as srv:
        (model,) = list(srv.server.models)
        engine = model.engine
        run_slots = engine.run_slots
        seen: list[tuple[float | None, float | None]] = []

        def observed(slots: np.ndarray, x: np.ndarray) -> np.ndarray:  # the gauges as the engine runs the rows
            seen.append((_slots(srv, "used"), _slots(srv, "free")))
            return run_slots(slots, x)

        engine.run_slots = observed
        x = np.random.default_rng(3).integers(0, 256, size=(rows, 5), dtype=np.int64)  # [B, T]
        request = oip.ModelInferRequest(model_name="tiny")
        request.inputs.add(name="x", datatype="INT64", shape=list(x.shape))
        request.raw_input_contents.append(x.astype("<i8").tobytes())
        request.outputs.add(name="y")
        with grpc.insecure_channel(srv.address) as channel:
            response = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        engine.run_slots = run_slots
        after = (_slots(srv, "used"), _slots(srv, "free"))
    assert seen and seen[0] == (rows, 8 - rows), seen  # every row's slot counted while the engine holds it
    assert after == (0, 8)  # and given back when the request is answered
    y = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(response.outputs[0].shape)
    np.testing.assert_allclose(y, tiny_oracle.run(x)[0], atol=1e-5, rtol=0)
