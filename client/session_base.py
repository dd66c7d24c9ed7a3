"""What a session shows, alike for the sync ``Session`` and the ``AsyncSession`` (their I/O is theirs)."""

from __future__ import annotations

import operator
from typing import Any, Generic, TypeVar

import numpy as np

from cellserve.client.core import SessionCore
from cellserve.client.model_info import ModelInfo

V = TypeVar("V")


class FromCore(Generic[V]):
    """A read-only session attribute: the core's attribute of the same name (or at ``path``)."""

    def __init__(self, doc: str, path: str = "") -> None:
        self.__doc__ = doc
        self._path = path

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name
        self._get = operator.attrgetter(self._path or name)

    def __get__(self, session: Any, owner: type | None = None) -> V:
        if session is None:  # looked up on the class (help(), docs): the descriptor itself
            return self  # type: ignore[return-value]
        return self._get(session._core)  # type: ignore[no-any-return]

    def __set__(self, session: Any, value: V) -> None:
        raise AttributeError(f"{self._name} is read-only: the session core keeps it")


class SessionBase:
    """Read-only view of a session's core, and the client-side input check."""

    info: ModelInfo  # the model's description; set once the session is open

    session_id = FromCore[str]("The server's id of this session (a new one after each move or resume).")
    steps = FromCore[int]("Steps answered so far, including those before a resume token the session opened with.")
    model = FromCore[str]("The model's name (as asked; the server's name for it once open).")
    target = FromCore[str]("Address of the server holding the session now.")
    draining = FromCore[bool]("The server holding the session announced a drain, and the session has not moved (yet).")
    resume_token = FromCore[bytes](
        "The newest resume token this session holds (steps after it are replayed on a resume); "
        "``snapshot()`` returns an exact one."
    )
    idle_timeout_s = FromCore[int]("The idle timeout the server granted.")
    checkpoint_every = FromCore[int]("Step messages between checkpoints (0 = off).", "policy.checkpoint_every")

    def __init__(self, core: SessionCore) -> None:
        self._core = core

    def _checked(self, x: object) -> np.ndarray:
        return self.info.check_input(x)
