"""numpy ↔ ``cellserve.v1.Tensor`` (raw little-endian bytes) on the client side: the codec the server shares
(``cellserve.wire``); a tensor the client cannot decode is a ValueError."""

from __future__ import annotations

from cellserve.wire import to_numpy, to_proto

__all__ = ["to_numpy", "to_proto"]
