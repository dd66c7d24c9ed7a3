"""What ``AsyncClient.session()`` and ``AsyncClient.gateway()`` return: ``await`` it for the session (gateway),
or ``async with`` it, which also closes it on the way out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Generic, TypeVar

S = TypeVar("S", bound=AbstractAsyncContextManager[Any])


class Opening(Generic[S]):
    """An ``S`` being opened by ``opening()``: awaitable, or an async context manager."""

    def __init__(self, opening: Callable[[], Awaitable[S]]) -> None:
        self._opening = opening
        self._opened: S | None = None

    def __await__(self) -> Generator[Any, None, S]:
        return self._opening().__await__()

    async def __aenter__(self) -> S:
        self._opened = await self._opening()
        return self._opened

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._opened is not None
        await self._opened.__aexit__(exc_type, exc, tb)
