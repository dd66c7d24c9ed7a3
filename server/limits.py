"""Admission limits shared by every streaming RPC (native Stream and Generate, OIP ModelStreamInfer)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cellserve.server.errors import ResourceExhausted


class StreamLimit:
    """At most ``max_streams`` streaming RPCs at once; one more is RESOURCE_EXHAUSTED, naming the setting."""

    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self.active = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self.active >= self.max_streams:
            raise ResourceExhausted(
                f"server has {self.max_streams} streams open (setting max_streams: Stream, Generate and OIP "
                "streams together); retry later or on another replica"
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
