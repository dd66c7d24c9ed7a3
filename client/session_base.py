"""What a session shows, alike for the sync ``Session`` and the ``AsyncSession`` (their I/O is theirs)."""

from __future__ import annotations

import numpy as np

from cellserve.client.core import SessionCore
from cellserve.client.model_info import ModelInfo


class SessionBase:
    """Read-only view of a session's core, and the client-side input check."""

    info: ModelInfo  # the model's description; set once the session is open

    def __init__(self, core: SessionCore) -> None:
        self._core = core

    @property
    def session_id(self) -> str:
        """The server's id of this session (a new one after each move or resume)."""
        return self._core.session_id

    @property
    def steps(self) -> int:
        """Steps answered so far, including those before a resume token the session opened with."""
        return self._core.steps

    @property
    def model(self) -> str:
        return self._core.model

    @property
    def target(self) -> str:
        """Address of the server holding the session now."""
        return self._core.target

    @property
    def draining(self) -> bool:
        """The server holding the session announced a drain, and the session has not moved (yet)."""
        return self._core.draining

    @property
    def resume_token(self) -> bytes:
        """The newest resume token this session holds (steps after it are replayed on a resume);
        ``snapshot()`` returns an exact one."""
        return self._core.resume_token

    @property
    def idle_timeout_s(self) -> int:
        """The idle timeout the server granted."""
        return self._core.idle_timeout_s

    @property
    def checkpoint_every(self) -> int:
        return self._core.policy.checkpoint_every

    def _checked(self, x: object) -> np.ndarray:
        return self.info.check_input(x)
