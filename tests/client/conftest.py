"""The ``sdk`` fixture: the same behaviour test runs through the sync ``Client`` and the ``AsyncClient``.

The asyncio side runs on an event loop in a helper thread; the test calls it through a thin blocking
view with the sync API's shape (``client.session(...)``, ``s.step(x)``, ``s.snapshot()``,
``client.gateway(...)``, ``gw.step(...)``, ``with``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from cellserve.client import AsyncClient, Client

CALL_TIMEOUT_S = 60.0  # bound on any one SDK call of a test (a hang fails the test instead of the suite)


class _Loop:
    """An event loop in a daemon thread; ``run(coro)`` blocks for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sdk-test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT_S)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class _BlockingAsyncSession:
    def __init__(self, loop: _Loop, session: Any) -> None:
        self._loop, self.aio = loop, session

    def step(self, x: Any) -> Any:
        return self._loop.run(self.aio.step(x))

    def snapshot(self) -> bytes:
        return self._loop.run(self.aio.snapshot())

    def close(self) -> None:
        self._loop.run(self.aio.close())

    def __getattr__(self, name: str) -> Any:  # session_id, steps, target, draining, ...
        return getattr(self.aio, name)

    def __enter__(self) -> _BlockingAsyncSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.run(self.aio.__aexit__(*exc))


class _BlockingAsyncGateway:
    """The ``AsyncGateway`` seen through the sync ``Gateway``'s shape."""

    def __init__(self, loop: _Loop, gateway: Any) -> None:
        self._loop, self.aio = loop, gateway

    def open(self, *args: Any, **kwargs: Any) -> Any:
        return self._loop.run(self.aio.open(*args, **kwargs))

    def step(self, *args: Any) -> Any:
        return self._loop.run(self.aio.step(*args))

    def step_arrays(self, *args: Any) -> Any:
        return self._loop.run(self.aio.step_arrays(*args))

    def snapshot(self, *args: Any) -> Any:
        return self._loop.run(self.aio.snapshot(*args))

    def close(self, *args: Any) -> Any:
        return self._loop.run(self.aio.close(*args))

    def __getattr__(self, name: str) -> Any:  # keys, session, streams, info, ...
        return getattr(self.aio, name)

    def __contains__(self, key: object) -> bool:
        return key in self.aio

    def __len__(self) -> int:
        return len(self.aio)

    def __enter__(self) -> _BlockingAsyncGateway:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.run(self.aio.__aexit__(*exc))


class _BlockingAsyncClient:
    def __init__(self, loop: _Loop, *args: Any, **kwargs: Any) -> None:
        self._loop = loop

        async def make() -> AsyncClient:
            return AsyncClient(*args, **kwargs)  # grpc.aio channels belong to the loop they are made on

        self.aio = loop.run(make())

    def session(self, *args: Any, **kwargs: Any) -> _BlockingAsyncSession:
        async def opening() -> Any:
            return await self.aio.session(*args, **kwargs)

        return _BlockingAsyncSession(self._loop, self._loop.run(opening()))

    def gateway(self, *args: Any, **kwargs: Any) -> _BlockingAsyncGateway:
        async def opening() -> Any:
            return await self.aio.gateway(*args, **kwargs)

        return _BlockingAsyncGateway(self._loop, self._loop.run(opening()))

    def __enter__(self) -> _BlockingAsyncClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.run(self.aio.close())


class Sdk:
    """``sdk.client(targets, **options)``: a ``Client``, or a blocking view of an ``AsyncClient``."""

    def __init__(self, api: str) -> None:
        self.api = api
        self._loop: _Loop | None = None

    def client(self, *args: Any, **kwargs: Any) -> Any:
        if self.api == "sync":
            return Client(*args, **kwargs)
        if self._loop is None:
            self._loop = _Loop()
        return _BlockingAsyncClient(self._loop, *args, **kwargs)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.stop()


@pytest.fixture(params=["sync", "async"])
def sdk(request: pytest.FixtureRequest) -> Iterator[Sdk]:
    s = Sdk(request.param)
    yield s
    s.close()
