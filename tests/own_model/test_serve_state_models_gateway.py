"""Gateways (Multiplex) over every stateful class of issue 25: many sessions per message, columnar, equal to the
batch-1 onnxruntime oracle (fixtures in conftest.py, the oracle in state_model_oracle.py)."""

from __future__ import annotations

import asyncio

import numpy as np
from state_model_oracle import FRAME_SIZES, WAIT_S, Plan, tolerance
from state_models import MODELS

from cellserve.client import AsyncClient


def test_gateway_sessions_of_every_class_equal_the_batch_1_oracle(server, oracles):
    """Many sessions per message, columnar [N, T, *frame], for each class (rows of one message share T and
    frame); interleaved with single SDK sessions of the same model."""
    rng = np.random.default_rng(26)
    n, messages = 5, 4

    async def main() -> dict[str, tuple[list[np.ndarray], np.ndarray, Plan]]:
        out = {}
        async with AsyncClient(server.address) as client:

            async def one(name: str) -> None:
                spec = MODELS[name]
                frame = tuple(int(rng.choice(FRAME_SIZES)) if d is None else d for d in spec.frame)
                xs = [rng.standard_normal((n, int(rng.integers(1, 4)), *frame)).astype(spec.x_dtype)
                      for _ in range(messages)]  # fmt: skip
                single = Plan(name, rng)
                async with client.gateway(name, keys=[f"k{i}" for i in range(n)]) as gw, client.session(name) as s:
                    ys = []
                    for i, x in enumerate(xs):
                        ys.append(await gw.step_arrays([f"k{j}" for j in range(n)], x))
                        single.outputs.append(await s.step(single.chunks[i]))
                out[name] = (xs, np.concatenate(ys, axis=1), single)

            await asyncio.wait_for(asyncio.gather(*(one(name) for name in MODELS)), WAIT_S)
        return out

    for name, (xs, y, single) in asyncio.run(main()).items():
        for i in range(n):
            want = oracles[name].run([x[i] for x in xs])
            np.testing.assert_allclose(y[i], want, atol=tolerance(name), rtol=0, err_msg=f"{name} row {i}")
        single.check(oracles[name])
